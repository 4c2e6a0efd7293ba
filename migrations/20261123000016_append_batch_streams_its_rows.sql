-- append_batch streams its rows into the inserts instead of materialising them first.
--
-- `INSERT … SELECT * FROM unnest(a, b, …)` is a function scan: Postgres builds every row of the
-- batch into a tuplestore, then reads them back out to insert them (measured: ~5% of the writer's
-- backend at 64 submitters, ADR 0001 ninth session). The same arrays unnested in the select list
-- are a ProjectSet, which hands each row to the insert as it is made. The arrays of one batch
-- always have the same length (the writer builds them row by row), so the two forms insert the
-- same rows in the same order. Nothing else changes; the signature is the same.

CREATE OR REPLACE FUNCTION append_batch(
    expected_head    bigint,
    expected_hash    bytea,
    check_streams    text[],
    check_versions   bigint[],
    new_head         bigint,
    new_entry_hash   bytea,
    new_recorded_at  timestamptz,
    slot_kinds       text[],
    slot_bookings    uuid[],
    slot_resources   uuid[],
    slot_starts      timestamptz[],
    slot_ends        timestamptz[],
    ev_positions     bigint[],
    ev_ids           uuid[],
    ev_streams       text[],
    ev_versions      bigint[],
    ev_types         text[],
    ev_schema        int[],
    ev_payloads      jsonb[],
    ev_metadata      jsonb[],
    ev_recorded_at   timestamptz[],
    ev_leaf_hashes   bytea[],
    ev_entry_hashes  bytea[],
    idem_keys        bytea[],
    idem_hmacs       bytea[],
    idem_statuses    smallint[],
    idem_responses   jsonb[],
    idem_positions   bigint[],
    sealed_rows      int[],
    sealed_subjects  uuid[],
    OUT outcome      text,
    OUT refused      int[]
)
LANGUAGE plpgsql AS $$
DECLARE
    head      bigint;
    head_hash bytea;
BEGIN
    refused := '{}';
    SELECT position, entry_hash INTO head, head_hash FROM log_head FOR UPDATE;
    IF head <> expected_head OR head_hash <> expected_hash THEN
        outcome := 'stale';
        RETURN;
    END IF;
    IF cardinality(check_streams) > 0 OR cardinality(idem_keys) > 0 THEN
        IF append_beliefs_stale(check_streams, check_versions, idem_keys) THEN
            outcome := 'stale';
            RETURN;
        END IF;
    END IF;
    IF cardinality(sealed_rows) > 0 THEN
        refused := append_sealed_under_erased(sealed_rows, sealed_subjects, ev_types, ev_payloads);
        IF refused IS NOT NULL THEN
            outcome := 'subject-erased';
            RETURN;
        END IF;
        refused := '{}';
    END IF;
    IF cardinality(slot_kinds) > 0 THEN
        SELECT array_agg(i) INTO refused
          FROM unnest(apply_slot_changes(slot_kinds, slot_bookings, slot_resources,
                                         slot_starts, slot_ends)) WITH ORDINALITY AS r(held, i)
         WHERE NOT held;
        IF refused IS NOT NULL THEN
            -- Undoes the slot changes already applied: the statement fails as a whole.
            RAISE EXCEPTION 'slot changes refused' USING ERRCODE = 'LG001',
                  DETAIL = array_to_string(refused, ',');
        END IF;
        refused := '{}';
    END IF;
    INSERT INTO events (global_position, event_id, stream_id, stream_version, event_type,
                        schema_version, payload, metadata, recorded_at, leaf_hash, entry_hash)
    SELECT unnest(ev_positions), unnest(ev_ids), unnest(ev_streams), unnest(ev_versions),
           unnest(ev_types), unnest(ev_schema), unnest(ev_payloads), unnest(ev_metadata),
           unnest(ev_recorded_at), unnest(ev_leaf_hashes), unnest(ev_entry_hashes);
    IF cardinality(idem_keys) > 0 THEN
        INSERT INTO idempotency_keys (key_hash, request_hmac, status, response, position)
        SELECT unnest(idem_keys), unnest(idem_hmacs), unnest(idem_statuses), unnest(idem_responses),
               unnest(idem_positions);
    END IF;
    UPDATE log_head SET position = new_head, entry_hash = new_entry_hash,
                        recorded_at = new_recorded_at;
    PERFORM pg_notify('ledger_log', new_head::text);
    outcome := 'appended';
END
$$;
