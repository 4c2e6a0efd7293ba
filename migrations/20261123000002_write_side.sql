-- Write-side tables: written in the same transaction as the events they follow, rebuildable from the log.

CREATE EXTENSION IF NOT EXISTS btree_gist;

-- Live slots. The exclusion constraint is the proof that no two live bookings of one resource
-- overlap (half-open ranges: touching end-to-start is fine).
CREATE TABLE booking_slots (
    booking_id  uuid      PRIMARY KEY,
    resource_id uuid      NOT NULL,
    slot        tstzrange NOT NULL,
    CONSTRAINT booking_slots_no_overlap EXCLUDE USING gist (resource_id WITH =, slot WITH &&)
);

-- Applies the slot changes of a batch in order and says for each whether it held. A refused
-- change has no effect. The check before each write is race-free because every caller holds the
-- log head lock; the exclusion constraint stays as the proof (a miss would fail the statement,
-- never double-book). No subtransaction per change: a batch of bookings would overflow the
-- per-backend subtransaction cache and slow every snapshot in the cluster.
CREATE FUNCTION apply_slot_changes(
    kinds        text[],
    booking_ids  uuid[],
    resource_ids uuid[],
    starts       timestamptz[],
    ends         timestamptz[]
) RETURNS boolean[]
LANGUAGE plpgsql AS $$
DECLARE
    results boolean[] := '{}';
    wanted  tstzrange;
    taken   boolean;
BEGIN
    FOR i IN 1 .. coalesce(array_length(kinds, 1), 0) LOOP
        IF kinds[i] = 'release' THEN
            DELETE FROM booking_slots WHERE booking_id = booking_ids[i];
            results := results || true;
            CONTINUE;
        END IF;
        wanted := tstzrange(starts[i], ends[i], '[)');
        SELECT EXISTS (SELECT 1 FROM booking_slots
                        WHERE resource_id = resource_ids[i] AND slot && wanted
                          AND booking_id <> booking_ids[i])
          INTO taken;
        IF taken THEN
            results := results || false;
        ELSIF kinds[i] = 'reserve' OR kinds[i] = 'move' THEN
            INSERT INTO booking_slots (booking_id, resource_id, slot)
            VALUES (booking_ids[i], resource_ids[i], wanted)
            ON CONFLICT (booking_id) DO UPDATE
               SET resource_id = EXCLUDED.resource_id, slot = EXCLUDED.slot;
            results := results || true;
        ELSE
            RAISE EXCEPTION 'unknown slot change %', kinds[i];
        END IF;
    END LOOP;
    RETURN results;
END
$$;

-- Idempotent commands. The key is stored as an HMAC (callers may put anything in a header), the
-- request fingerprint is an HMAC too (bodies hold personal data), and the response holds none.
CREATE TABLE idempotency_keys (
    key_hash     bytea       PRIMARY KEY,
    request_hmac bytea       NOT NULL,
    status       smallint    NOT NULL,
    response     jsonb       NOT NULL,
    position     bigint      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- Commits one batch of the append pipeline in a single round trip.
--
-- The writer planned the batch (positions, versions, hash chain) on what it believes: the log
-- head, the current version of each stream the batch touches, and that its idempotency keys are
-- new. It learns these from its own previous commits, or from one read when it does not know.
-- Here, under the head row lock, every belief is checked; if one is wrong (another process
-- appended, or a cached version is stale) nothing is written and the writer re-reads and plans
-- again. Most beliefs are checked by the unique constraints themselves: a writer never believes
-- a stream is further along than it is (versions only grow), so inserting the version after the
-- believed one collides exactly when the belief is stale. Only streams the batch merely requires
-- at a version (no event appended) are looked up, and the batch's idempotency keys.
-- Slot changes are applied in order; if any is refused, the whole batch is undone and the
-- refused indexes returned, so the writer can drop those commands and plan again.
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
