-- append_batch also refuses personal data sealed under a key shredded meanwhile (see the check
-- before the slot changes). Same signature; replaced whole, as functions are.
DROP FUNCTION append_batch(bigint, text[], bigint[], bigint, bytea, timestamptz, text[], uuid[], uuid[], timestamptz[], timestamptz[], bigint[], uuid[], text[], bigint[], text[], int[], jsonb[], jsonb[], timestamptz[], bytea[], bytea[], bytea[], bytea[], smallint[], jsonb[], bigint[]);

CREATE FUNCTION append_batch(
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
    IF EXISTS (SELECT 1 FROM unnest(check_streams, check_versions) AS c(stream, version)
                WHERE coalesce((SELECT max(stream_version) FROM events e
                                 WHERE e.stream_id = c.stream), 0) <> c.version)
       -- Before slots: a retry must be answered as a replay, not as its own slot conflict.
       OR (coalesce(array_length(idem_keys, 1), 0) > 0
           AND EXISTS (SELECT 1 FROM idempotency_keys WHERE key_hash = ANY(idem_keys))) THEN
        outcome := 'stale';
        RETURN;
    END IF;
    -- Personal data sealed under a key that has been shredded meanwhile (an erasure committed
    -- between the handler sealing it and this append) must not enter the log: those commands are
    -- refused so their handlers decide again (a returning customer then gets a new subject).
    -- Erased before this batch, or by a `SubjectErased` earlier in this same batch.
    WITH sealed AS (
        SELECT i, s.subject
          FROM unnest(ev_payloads) WITH ORDINALITY AS p(payload, i),
               LATERAL (VALUES ((p.payload->'customer'->>'sub')::uuid),
                               ((p.payload->'reason'->>'sub')::uuid)) AS s(subject)
         WHERE s.subject IS NOT NULL
    ), erased_here AS (
        SELECT j, (payload->>'subject_id')::uuid AS subject
          FROM unnest(ev_payloads, ev_types) WITH ORDINALITY AS e(payload, kind, j)
         WHERE kind = 'SubjectErased'
    )
    SELECT array_agg(DISTINCT sealed.i::int) INTO refused
      FROM sealed
     WHERE EXISTS (SELECT 1 FROM keystore.subject_keys k
                    WHERE k.subject_id = sealed.subject AND k.wrapped_key IS NULL)
        OR EXISTS (SELECT 1 FROM erased_here
                    WHERE erased_here.subject = sealed.subject AND erased_here.j < sealed.i);
    IF refused IS NOT NULL THEN
        outcome := 'subject-erased';
        RETURN;
    END IF;
    refused := '{}';
    -- One subtransaction for the batch: undone as a whole when a slot is refused or a belief
    -- turns out stale.
    BEGIN
        IF coalesce(array_length(slot_kinds, 1), 0) > 0 THEN
            SELECT array_agg(i) INTO refused
              FROM unnest(apply_slot_changes(slot_kinds, slot_bookings, slot_resources,
                                             slot_starts, slot_ends)) WITH ORDINALITY AS r(held, i)
             WHERE NOT held;
            IF refused IS NOT NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'LG001';
            END IF;
            refused := '{}';
        END IF;
        INSERT INTO events (global_position, event_id, stream_id, stream_version, event_type,
                            schema_version, payload, metadata, recorded_at, leaf_hash, entry_hash)
        SELECT * FROM unnest(ev_positions, ev_ids, ev_streams, ev_versions, ev_types, ev_schema,
                             ev_payloads, ev_metadata, ev_recorded_at, ev_leaf_hashes,
                             ev_entry_hashes);
        INSERT INTO idempotency_keys (key_hash, request_hmac, status, response, position)
        SELECT * FROM unnest(idem_keys, idem_hmacs, idem_statuses, idem_responses, idem_positions);
    EXCEPTION
        WHEN SQLSTATE 'LG001' THEN
            outcome := 'slots-refused';
            RETURN;
        WHEN unique_violation THEN
            refused := '{}';
            outcome := 'stale';
            RETURN;
    END;
    UPDATE log_head SET position = new_head, entry_hash = new_entry_hash,
                        recorded_at = new_recorded_at;
    PERFORM pg_notify('ledger_log', new_head::text);
    outcome := 'appended';
END
$$;
