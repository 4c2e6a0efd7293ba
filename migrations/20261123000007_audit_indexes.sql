-- Indexes for the audit reads (ledger-replay): who did what, and what was recorded when.
-- Each index costs every append, so only what the audit endpoints need.

-- `GET /v1/audit/actions?actor=`: one actor's events in global order, paged by position.
CREATE INDEX events_actor_position ON events ((metadata->>'actor'), global_position);

-- Time ranges (`from`/`to` without an actor). `recorded_at` never goes backwards along the log,
-- so it follows the physical order of the table: a BRIN index answers ranges for a tiny fraction
-- of a B-tree's size and append cost. As-of reads need none of this: they read one stream
-- through its `(stream_id, stream_version)` key and filter its few rows by time.
CREATE INDEX events_recorded_at ON events USING brin (recorded_at);
