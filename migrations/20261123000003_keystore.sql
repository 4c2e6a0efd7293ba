-- Per-subject data keys for crypto-shredding. Mutable on purpose: erasure destroys a key here,
-- never an event. Kept in its own schema so dumps and grants can treat it apart.

CREATE SCHEMA keystore;

CREATE TABLE keystore.subject_keys (
    subject_id  uuid        PRIMARY KEY,
    key_id      uuid        NOT NULL UNIQUE,
    -- The data key wrapped by the key-encryption key; NULL once erased. The row stays as a fence
    -- so no key is ever minted again for an erased subject.
    wrapped_key bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    erased_at   timestamptz,
    CHECK ((wrapped_key IS NULL) = (erased_at IS NOT NULL))
);

-- Email → subject through an HMAC blind index: the address itself is never stored.
CREATE TABLE keystore.subject_lookup (
    blind_index bytea PRIMARY KEY CHECK (length(blind_index) = 32),
    subject_id  uuid  NOT NULL REFERENCES keystore.subject_keys (subject_id)
);

CREATE INDEX subject_lookup_subject ON keystore.subject_lookup (subject_id);
