-- An erasure no longer scans the log under the head lock.
--
-- The `SubjectErased` trigger runs inside the append that records the erasure, which holds the
-- log head lock: its count of the events sealed under the subject's key read the whole of
-- `events`, and every append of every process waited for it (on a log of millions, seconds).
-- The trigger now shreds the key and stores the certificate at once, marked `coverage_pending`;
-- what it covers (the sealed events and their streams) is filled in by
-- `keystore.erasure_certificate(subject)`, which whoever reads the certificate first calls (the
-- erase command itself, right after its append commits). It reads only positions before the
-- erasure's own, which never change: no event can be inserted below the head, and the append
-- guard refuses personal data sealed under an erased subject's key after it. So the
-- certificate is the same whenever and by whichever process it is completed, as before.

ALTER TABLE keystore.erasure_certificates
    ADD COLUMN coverage_pending boolean NOT NULL DEFAULT false;

CREATE OR REPLACE FUNCTION keystore.shred_on_subject_erased() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    subject   uuid := (NEW.payload->>'subject_id')::uuid;
    retention int  := (NEW.payload->>'backup_retention_days')::int;
    utc       constant text := 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"';
BEGIN
    -- The row stays as a fence: no key is ever minted again for this subject.
    UPDATE keystore.subject_keys SET wrapped_key = NULL, erased_at = NEW.recorded_at
     WHERE subject_id = subject;
    DELETE FROM keystore.subject_lookup WHERE subject_id = subject;
    INSERT INTO keystore.erasure_certificates (subject_id, certificate, coverage_pending)
    VALUES (subject, jsonb_build_object(
        'subject_id', subject,
        'erased_at', to_char(NEW.recorded_at AT TIME ZONE 'UTC', utc),
        'key_id', NEW.payload->>'key_id',
        'key_fingerprint', NEW.payload->>'key_fingerprint',
        'position', NEW.global_position,
        'event_id', NEW.event_id,
        'covers', jsonb_build_object(
            'personal_fields', jsonb_build_array(
                'customer.name', 'customer.email', 'customer.phone', 'notes',
                'cancellation_reason'),
            'sealed_copies', jsonb_build_array(
                'the event log (Postgres table events): the events above keep their ciphertext, which no key opens any more',
                'the booking_board read model (rm_bookings, and the shadow tables of a rebuild), which copies the sealed envelopes',
                'the NATS JetStream stream the relay publishes the log to, and the messages its consumers read'),
            'destroyed', jsonb_build_array(
                'the subject''s wrapped data key (keystore.subject_keys keeps the row without a key, as a fence: no key is ever minted again for this subject)',
                'the email lookup (keystore.subject_lookup: the HMAC blind index of the email)',
                'the unwrapped key cached by every API process (dropped on NOTIFY ledger_erasure)')),
        'does_not_cover', jsonb_build_array(
            'non-personal facts of the bookings and payments, which stay: venue, resource, times, party size, statuses, amounts and currencies',
            'the pseudonymous subject id and which bookings and payments belong to it',
            'database backups taken before erased_at: they hold the wrapped key (which the master key opens) until backups_expire_at',
            'copies of personal data made outside this system: e-mails, printouts, exports already handed out'),
        'backup_retention_days', retention,
        'backups_expire_at',
            to_char((NEW.recorded_at + make_interval(days => retention)) AT TIME ZONE 'UTC', utc)
    ), true)
    ON CONFLICT (subject_id) DO NOTHING;
    PERFORM pg_notify('ledger_erasure', subject::text);
    RETURN NULL;
END
$$;

-- The subject's erasure certificate (unsigned; the API signs it), its coverage completed first
-- if still pending. NULL when the subject was never erased.
CREATE FUNCTION keystore.erasure_certificate(subject uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    cert     jsonb;
    pending  boolean;
    erased   bigint;
    covered  bigint;
    sealed   jsonb;
    streams  jsonb;
BEGIN
    SELECT certificate, coverage_pending INTO cert, pending
      FROM keystore.erasure_certificates WHERE subject_id = subject;
    IF cert IS NULL OR NOT pending THEN
        RETURN cert;
    END IF;
    -- Completed once: a second reader waits here, then finds it done.
    SELECT certificate, coverage_pending INTO cert, pending
      FROM keystore.erasure_certificates WHERE subject_id = subject FOR UPDATE;
    IF NOT pending THEN
        RETURN cert;
    END IF;
    erased := (cert->>'position')::bigint;
    SELECT count(*),
           coalesce(jsonb_agg(jsonb_build_object('position', global_position,
                                                 'stream', stream_id,
                                                 'type', event_type)
                              ORDER BY global_position), '[]'),
           coalesce(jsonb_agg(DISTINCT stream_id), '[]')
      INTO covered, sealed, streams
      FROM events
     WHERE global_position < erased
       AND (payload->'customer'->>'sub' = subject::text
            OR payload->'reason'->>'sub' = subject::text);
    cert := jsonb_set(jsonb_set(cert, '{covers,sealed_events}', sealed),
                      '{covers,streams}', streams)
            || jsonb_build_object('events_covered', covered);
    UPDATE keystore.erasure_certificates
       SET certificate = cert, coverage_pending = false
     WHERE subject_id = subject;
    RETURN cert;
END
$$;
