-- Signed checkpoints of the log (see events/src/checkpoint.rs). Auditors keep copies outside the
-- system; these rows are only the ledger's own record of what it signed.
CREATE TABLE log_checkpoints (
    size       bigint      PRIMARY KEY,
    checkpoint jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
