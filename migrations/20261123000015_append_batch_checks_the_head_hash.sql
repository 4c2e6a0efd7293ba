-- append_batch checks the entry hash of the head it extends, not only its position.
--
-- The writer now sends a batch while the one before it is still running on the same connection
-- (pipelining, ADR 0001 seventh session): the batch was planned on the head the one before leaves,
-- and if that one is refused, the next finds the head where it was and is refused as stale. A
-- position alone would not always tell: after a refusal, another process could move the head to
-- the very position the plan assumed, with other events, and the plan's hash chain would then not
-- continue the log's. The entry hash tells (it covers every event before it), under the same lock.
-- The old signature is dropped: a caller that does not name the hash it extends has no place.

DROP FUNCTION append_batch(bigint, text[], bigint[], bigint, bytea, timestamptz, text[], uuid[],
    uuid[], timestamptz[], timestamptz[], bigint[], uuid[], text[], bigint[], text[], int[],
    jsonb[], jsonb[], timestamptz[], bytea[], bytea[], bytea[], bytea[], smallint[], jsonb[],
    bigint[], int[], uuid[]);

CREATE FUNCTION append_batch(
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
    SELECT * FROM unnest(ev_positions, ev_ids, ev_streams, ev_versions, ev_types, ev_schema,
                         ev_payloads, ev_metadata, ev_recorded_at, ev_leaf_hashes,
                         ev_entry_hashes);
    IF cardinality(idem_keys) > 0 THEN
        INSERT INTO idempotency_keys (key_hash, request_hmac, status, response, position)
        SELECT * FROM unnest(idem_keys, idem_hmacs, idem_statuses, idem_responses, idem_positions);
    END IF;
    UPDATE log_head SET position = new_head, entry_hash = new_entry_hash,
                        recorded_at = new_recorded_at;
    PERFORM pg_notify('ledger_log', new_head::text);
    outcome := 'appended';
END
$$;
