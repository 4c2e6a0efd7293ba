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

-- Applies the slot changes of a batch in order, each in its own subtransaction, and says for each
-- whether it held. One round trip for the whole batch instead of a savepoint per command.
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
BEGIN
    FOR i IN 1 .. coalesce(array_length(kinds, 1), 0) LOOP
        BEGIN
            IF kinds[i] = 'reserve' THEN
                INSERT INTO booking_slots (booking_id, resource_id, slot)
                VALUES (booking_ids[i], resource_ids[i], tstzrange(starts[i], ends[i], '[)'));
            ELSIF kinds[i] = 'move' THEN
                UPDATE booking_slots
                   SET resource_id = resource_ids[i], slot = tstzrange(starts[i], ends[i], '[)')
                 WHERE booking_id = booking_ids[i];
                IF NOT FOUND THEN
                    INSERT INTO booking_slots (booking_id, resource_id, slot)
                    VALUES (booking_ids[i], resource_ids[i], tstzrange(starts[i], ends[i], '[)'));
                END IF;
            ELSIF kinds[i] = 'release' THEN
                DELETE FROM booking_slots WHERE booking_id = booking_ids[i];
            ELSE
                RAISE EXCEPTION 'unknown slot change %', kinds[i];
            END IF;
            results := results || true;
        EXCEPTION WHEN exclusion_violation OR unique_violation THEN
            results := results || false;
        END;
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
