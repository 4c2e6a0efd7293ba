-- The event log: the source of truth. Append-only, gapless positions in commit order, hash-chained.

CREATE TABLE events (
    global_position bigint      PRIMARY KEY CHECK (global_position > 0),
    event_id        uuid        NOT NULL UNIQUE,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL DEFAULT 1,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL,
    -- SHA-256(0x00 || canonical bytes of this row) and SHA-256(previous entry_hash || leaf_hash).
    leaf_hash       bytea       NOT NULL CHECK (length(leaf_hash) = 32),
    entry_hash      bytea       NOT NULL CHECK (length(entry_hash) = 32),
    UNIQUE (stream_id, stream_version)
);

-- Deliberately no other index: each costs every append. Readers that need one (audit by time,
-- by actor) add it with the feature that needs it.

-- The head of the log. Every append takes this row FOR UPDATE and holds it to commit: that is what
-- makes positions gapless and in commit order (a reader at position N never sees N+1 before N).
CREATE TABLE log_head (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    position    bigint      NOT NULL,
    entry_hash  bytea       NOT NULL CHECK (length(entry_hash) = 32),
    -- recorded_at never goes backwards along the log, even if a clock does.
    recorded_at timestamptz NOT NULL
);

INSERT INTO log_head (position, entry_hash, recorded_at)
VALUES (0, decode(repeat('00', 32), 'hex'), '1970-01-01T00:00:00Z');

CREATE FUNCTION refuse_log_rewrite() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on events is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_are_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_log_rewrite();

CREATE TRIGGER events_are_never_truncated
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_log_rewrite();

REVOKE UPDATE, DELETE, TRUNCATE ON events FROM PUBLIC;
