-- The erasure certificate says exactly what it covers and what it does not, and when the last
-- backup holding the shredded key expires. The API signs it (Ed25519, the checkpoints' key) when
-- it answers, so what is stored here must depend on nothing but the log: it is computed from the
-- `SubjectErased` event (its time, key fingerprint and the backup retention the erasing process
-- was configured with) and from the events sealed under the subject's key. Times are UTC with six
-- fractional digits, whatever the session's TimeZone.
--
-- Same trigger, function replaced; certificates written before this migration stay as they were.

CREATE OR REPLACE FUNCTION keystore.shred_on_subject_erased() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    subject   uuid := (NEW.payload->>'subject_id')::uuid;
    retention int  := (NEW.payload->>'backup_retention_days')::int;
    utc       constant text := 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"';
    covered   bigint;
    sealed    jsonb;
    streams   jsonb;
BEGIN
    -- Exact: the append holds the log head lock, so no event is being added meanwhile.
    SELECT count(*),
           coalesce(jsonb_agg(jsonb_build_object('position', global_position,
                                                 'stream', stream_id,
                                                 'type', event_type)
                              ORDER BY global_position), '[]'),
           coalesce(jsonb_agg(DISTINCT stream_id), '[]')
      INTO covered, sealed, streams
      FROM events
     WHERE payload->'customer'->>'sub' = subject::text
        OR payload->'reason'->>'sub' = subject::text;
    -- The row stays as a fence: no key is ever minted again for this subject.
    UPDATE keystore.subject_keys SET wrapped_key = NULL, erased_at = NEW.recorded_at
     WHERE subject_id = subject;
    DELETE FROM keystore.subject_lookup WHERE subject_id = subject;
    INSERT INTO keystore.erasure_certificates (subject_id, certificate)
    VALUES (subject, jsonb_build_object(
        'subject_id', subject,
        'erased_at', to_char(NEW.recorded_at AT TIME ZONE 'UTC', utc),
        'events_covered', covered,
        'key_id', NEW.payload->>'key_id',
        'key_fingerprint', NEW.payload->>'key_fingerprint',
        'position', NEW.global_position,
        'event_id', NEW.event_id,
        'covers', jsonb_build_object(
            'personal_fields', jsonb_build_array(
                'customer.name', 'customer.email', 'customer.phone', 'notes',
                'cancellation_reason'),
            'sealed_events', sealed,
            'streams', streams,
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
    ))
    ON CONFLICT (subject_id) DO NOTHING;
    PERFORM pg_notify('ledger_erasure', subject::text);
    RETURN NULL;
END
$$;
