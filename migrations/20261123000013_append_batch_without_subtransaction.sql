-- append_batch without a subtransaction, and without statements for what a batch does not hold.
--
-- Until now the slot changes and the inserts ran in a `BEGIN … EXCEPTION` block, so that a
-- refused slot or a stale version (a unique violation) undid them and the function could answer
-- with an outcome. That block is a subtransaction: every row of every batch carried a
-- subtransaction id, which each later reader of `events` (relay, projections, audits) resolved
-- through pg_subtrans until hint bits were set, and the writer paid to open and release it on
-- every batch. The statement is its own transaction (autocommit), so an error undoes all of it
-- just as well: a refused slot now raises `LG001` with the refused changes (1-based) in DETAIL,
-- and a stale version or a key stored meanwhile surfaces as the unique violation itself, which
-- the writer reads as "stale" by its constraint. A clash on `event_id` (not a belief, a bug)
-- is an error the writer reports, where the old block took it for a stale belief and retried it
-- for ever.
--
-- The beliefs check and the idempotency insert run only when the batch has something for them,
-- as plain IFs (PL/pgSQL evaluates those without starting an executor).

CREATE OR REPLACE FUNCTION append_beliefs_stale(check_streams text[], check_versions bigint[], idem_keys bytea[])
RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF cardinality(check_streams) > 0 THEN
        IF EXISTS (SELECT 1 FROM unnest(check_streams, check_versions) AS c(stream, version)
                    WHERE coalesce((SELECT max(stream_version) FROM events e
                                     WHERE e.stream_id = c.stream), 0) <> c.version) THEN
            RETURN true;
        END IF;
    END IF;
    IF cardinality(idem_keys) > 0 THEN
        RETURN EXISTS (SELECT 1 FROM idempotency_keys WHERE key_hash = ANY(idem_keys));
    END IF;
    RETURN false;
END
$$;

CREATE OR REPLACE FUNCTION append_batch(
    expected_head    bigint,
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
    head bigint;
BEGIN
    refused := '{}';
    SELECT position INTO head FROM log_head FOR UPDATE;
    IF head <> expected_head THEN
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
