-- Crypto-shredding. Appending a `SubjectErased` event shreds the subject's key in the same
-- transaction (this trigger runs inside the append), so the log and the key store never disagree:
-- no event says "erased" while the key still opens, and no key is gone without its event.

CREATE TABLE keystore.erasure_certificates (
    subject_id  uuid        PRIMARY KEY REFERENCES keystore.subject_keys (subject_id),
    certificate jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION keystore.shred_on_subject_erased() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    subject uuid := (NEW.payload->>'subject_id')::uuid;
    covered bigint;
BEGIN
    -- Exact: the append holds the log head lock, so no event is being added meanwhile.
    SELECT count(*) INTO covered FROM events
     WHERE payload->'customer'->>'sub' = subject::text
        OR payload->'reason'->>'sub' = subject::text;
    -- The row stays as a fence: no key is ever minted again for this subject.
    UPDATE keystore.subject_keys SET wrapped_key = NULL, erased_at = NEW.recorded_at
     WHERE subject_id = subject;
    DELETE FROM keystore.subject_lookup WHERE subject_id = subject;
    INSERT INTO keystore.erasure_certificates (subject_id, certificate)
    VALUES (subject, jsonb_build_object(
        'subject_id', subject,
        'erased_at', NEW.recorded_at,
        'events_covered', covered,
        'key_fingerprint', NEW.payload->>'key_fingerprint',
        'position', NEW.global_position,
        'event_id', NEW.event_id,
        'covers', 'the personal fields sealed under this subject''s key: booking names, emails, phones and notes, and cancellation reasons, in the log, read models, NATS and every copy of them',
        'does_not_cover', 'the pseudonymous subject id, amounts, times and statuses, which stay; copies of personal data made outside this system',
        'backups', 'database backups taken before erased_at still hold the wrapped key until they expire under the operator''s retention policy'
    ))
    ON CONFLICT (subject_id) DO NOTHING;
    PERFORM pg_notify('ledger_erasure', subject::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER subject_erased_shreds_the_key
    AFTER INSERT ON events
    FOR EACH ROW WHEN (NEW.event_type = 'SubjectErased')
    EXECUTE FUNCTION keystore.shred_on_subject_erased();
