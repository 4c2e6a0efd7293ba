-- Postgres alone: append_batch called as the writer calls it, one commit per call, timed in a loop.
-- Signature as of migration 16. Run it against a scratch database, never one you keep: it appends
-- rows whose hashes are not chained, so `ledger replay verify` fails on that log afterwards.
--   createdb ledger_harness && DATABASE_URL=.../ledger_harness ledger migrate
--   PGOPTIONS="-c h.batches=1000 -c h.n=32" psql -X -q -d ledger_harness -f docs/bench/append_batch_harness.sql
-- h.n events per call (booking-shaped, each with a sealed envelope, as `ledger bench append`'s
-- pipeline run); prints the wall time per event, payload parsing (text[] -> jsonb[]) included.
-- Calls with h.n=1 and h.n=32 give the fixed cost of a call and the cost of a row.
DO $$
DECLARE
  run text := gen_random_uuid()::text;
  ptxt text := '{"booking_id":"0193a3c0-0000-7000-8000-000000000001","venue_id":"0193a3c0-0000-7000-8000-000000000002","resource_id":"0193a3c0-0000-7000-8000-000000000003","starts_at":"2030-06-01T18:00:00Z","ends_at":"2030-06-01T20:00:00Z","party_size":4,"subject_id":"0193a3c0-0000-7000-8000-000000000004","customer":{"v":1,"sub":"0193a3c0-0000-7000-8000-000000000005","kid":"0193a3c0-0000-7000-8000-000000000006","n":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","ct":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}';
  mtxt text := '{"actor":"bench","role":"staff","command":"RequestBooking","request_id":"0193a3c0-0000-7000-8000-000000000007","correlation_id":"0193a3c0-0000-7000-8000-000000000007","causation_id":"0193a3c0-0000-7000-8000-000000000007"}';
  head bigint; hh bytea; t0 timestamptz; total interval := '0'; r int; o text; ref int[];
  pays text[]; metas text[]; pos bigint[]; ids uuid[]; st text[]; hs bytea[]; rs int[]; subs uuid[]; ts timestamptz[]; vs bigint[]; tys text[]; sch int[];
  nb int := current_setting('h.batches')::int;
  n int := current_setting('h.n')::int;
BEGIN
  FOR r IN 1..nb LOOP
    SELECT position, entry_hash INTO head, hh FROM log_head;
    SELECT array_agg(ptxt), array_agg(mtxt), array_agg(head+i), array_agg(gen_random_uuid()),
           array_agg('booking-'||run||'-'||((head+i)%64)||'-'||(head+i)), array_agg(sha256(int8send(head+i))),
           array_agg(i::int), array_agg('0193a3c0-0000-7000-8000-000000000005'::uuid), array_agg(now()),
           array_agg(1::bigint), array_agg('BookingRequested'::text), array_agg(1)
      INTO pays, metas, pos, ids, st, hs, rs, subs, ts, vs, tys, sch FROM generate_series(1, n) i;
    t0 := clock_timestamp();
    SELECT outcome, refused INTO o, ref FROM append_batch(head, hh, '{}', '{}', head+n, sha256(int8send(head+n)), now(),
       '{}', '{}', '{}', '{}', '{}', pos, ids, st, vs, tys, sch, pays::jsonb[], metas::jsonb[], ts, hs, hs,
       '{}', '{}', '{}', '{}', '{}', rs, subs);
    IF o <> 'appended' THEN RAISE EXCEPTION 'outcome %', o; END IF;
    COMMIT;
    total := total + (clock_timestamp()-t0);
  END LOOP;
  RAISE NOTICE 'us_per_row %', round((extract(epoch from total)*1e6/(nb*n))::numeric,2);
END $$;
