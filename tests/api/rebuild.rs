//! `ledger replay rebuild`: blue/green rebuilds of the read models from the log, through the
//! library and the binary, while the API keeps serving and the live workers keep applying.

use crate::helpers::*;
use crate::read_models::assert_stats_parity;
use ledger::http::auth::Role;
use ledger_projections::{booking_board, daily_stats};
use ledger_replay::rebuild::{rebuild, Rebuild, RebuildReport};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use uuid::Uuid;

fn ok(a: Answer) -> Answer {
    assert!(a.status == 200 || a.status == 201, "{a:?}");
    a
}

fn position(a: &Answer) -> i64 {
    a.body["position"]
        .as_i64()
        .unwrap_or_else(|| panic!("no position in {a:?}"))
}

async fn head(app: &TestApp) -> i64 {
    ledger_replay::head_position(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The start of slot `k`: two-hour slots from 2030-07-01T00:00Z on, twelve a day.
fn slot(k: u32) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2030-07-01T00:00:00Z")
        .unwrap_or_else(|e| panic!("{e}"))
        .to_utc()
        + chrono::Duration::days(i64::from(k / 12))
        + chrono::Duration::hours(2 * i64::from(k % 12))
}

/// A booking of `resource` for slot `k` (see [`slot`]), for 3.
fn body_for_slot(venue: Uuid, resource: Uuid, k: u32) -> Value {
    let start = slot(k);
    json!({
        "venue_id": venue,
        "resource_id": resource,
        "starts_at": start.to_rfc3339(),
        "ends_at": (start + chrono::Duration::hours(2)).to_rfc3339(),
        "party_size": 3,
        "customer": {"name": "Ada Lovelace", "email": unique_email()},
    })
}

/// A realistic day at one venue: bookings confirmed, checked in, no-shows, a cancellation, a
/// reschedule, a deposit captured and partly refunded. Returns (venue, table, room, bookings).
async fn workload(app: &TestApp) -> (Uuid, Uuid, Uuid, Vec<Uuid>) {
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let door = app.token(Role::Door);
    let mut bookings = Vec::new();
    for (resource, start, end) in [
        (table, 8, 9),
        (table, 10, 11),
        (table, 12, 13),
        (table, 14, 15),
        (room, 18, 20),
        (room, 20, 22),
    ] {
        bookings.push(ok(app.book(&staff, venue, resource, start, end).await).id());
    }
    for &b in &bookings[..4] {
        ok(app.confirm(&staff, b).await);
    }
    for (b, action, token) in [
        (bookings[1], "check-in", &door),
        (bookings[2], "no-show", &door),
        (bookings[4], "cancel", &staff),
    ] {
        ok(app
            .post(&format!("/v1/bookings/{b}/{action}"), token, json!({}))
            .await);
    }
    ok(app
        .post(
            &format!("/v1/bookings/{}/reschedule", bookings[3]),
            &staff,
            json!({"starts_at": at(16), "ends_at": at(17)}),
        )
        .await);
    let payment = ok(app.authorise(&staff, bookings[0], 5000).await).id();
    for (action, amount) in [("capture", 5000), ("refund", 1500)] {
        ok(app
            .post(
                &format!("/v1/payments/{payment}/{action}"),
                &staff,
                json!({"amount_minor": amount}),
            )
            .await);
    }
    (venue, table, room, bookings)
}

/// Waits until both read models have applied the whole log (each query waits on its own).
async fn caught_up(app: &TestApp, venue: Uuid, booking: Uuid) -> i64 {
    let at = head(app).await;
    let admin = app.token(Role::Admin);
    ok(get(
        app,
        &format!("/v1/bookings/{booking}?min_position={at}"),
        &admin,
    )
    .await);
    ok(get(
        app,
        &format!("/v1/venues/{venue}/stats?from=2030-06-01&to=2030-06-02&min_position={at}"),
        &admin,
    )
    .await);
    at
}

async fn status_of(app: &TestApp, booking: Uuid, at: i64) -> String {
    let a = ok(get(
        app,
        &format!("/v1/bookings/{booking}?min_position={at}"),
        &app.token(Role::Admin),
    )
    .await);
    a.body["status"].as_str().unwrap_or_default().to_owned()
}

/// Breaks the live read models behind the projections' backs: a booking's status on the board,
/// and a day's covers in the stats.
async fn corrupt(app: &TestApp, booking: Uuid) {
    sqlx::query("UPDATE rm_bookings SET status = 'cancelled' WHERE booking_id = $1")
        .bind(booking)
        .execute(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let n = sqlx::query("UPDATE rm_daily_stats SET covers = covers + 100")
        .execute(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .rows_affected();
    assert!(n > 0, "the workload made daily stats");
}

fn differing(report: &RebuildReport, table: &str) -> i64 {
    report
        .differences
        .iter()
        .find(|d| d.table == table)
        .map(|d| d.differing_rows)
        .unwrap_or(0)
}

/// GETs (board, detail, stats) and, now and then, a new booking, in a loop until `stop`: the
/// statuses of the GETs, and the bookings made.
fn traffic(
    app: &TestApp,
    venue: Uuid,
    room: Uuid,
    booking: Uuid,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<u16>, Vec<Uuid>)> {
    let (client, base) = (app.client.clone(), app.base.clone());
    let staff = app.token(Role::Staff).0;
    let manager = app.token(Role::Manager).0;
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        let mut made = Vec::new();
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) || statuses.is_empty() {
            for path in [
                format!("/v1/bookings/{booking}"),
                format!("/v1/bookings?venue_id={venue}&date=2030-06-01"),
                format!("/v1/venues/{venue}/stats?from=2030-06-01&to=2031-05-31"),
            ] {
                let r = client
                    .get(format!("{base}{path}"))
                    .bearer_auth(&manager)
                    .send()
                    .await;
                statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
            }
            if n % 4 == 0 {
                let r = client
                    .post(format!("{base}/v1/bookings"))
                    .bearer_auth(&staff)
                    .json(&body_for_slot(venue, room, n / 4))
                    .send()
                    .await;
                if let Ok(r) = r {
                    assert_eq!(r.status().as_u16(), 201);
                    if let Ok(v) = r.json::<Value>().await {
                        if let Some(id) = v["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()) {
                            made.push(id);
                        }
                    }
                }
            }
            n += 1;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        (statuses, made)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_repairs_corrupted_read_models_while_the_api_keeps_serving() {
    let app = spawn_app().await;
    let (venue, table, room, bookings) = workload(&app).await;
    let victim = bookings[0];
    let at = caught_up(&app, venue, victim).await;
    assert_eq!(status_of(&app, victim, at).await, "confirmed");
    corrupt(&app, victim).await;
    assert_eq!(status_of(&app, victim, at).await, "cancelled", "corrupted");

    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&app, venue, room, victim, stop.clone());

    // The board, step by step: the shadow tables hold the fold of the log while the API still
    // reads the live (corrupted) table, until the swap.
    let mut board = Rebuild::start(&app.pool, booking_board::NAME)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut seen = Vec::new();
    board
        .fold(&mut |p| seen.push(p))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(board.position() >= at, "folded up to the head");
    assert!(seen.last().is_some_and(|p| p.position == board.position()));
    assert_eq!(
        status_of(&app, victim, at).await,
        "cancelled",
        "live until the swap"
    );
    let shadow: String = sqlx::query_scalar(&format!(
        "SELECT status FROM {}.rm_bookings WHERE booking_id = $1",
        board.shadow_schema()
    ))
    .bind(victim)
    .fetch_one(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(shadow, "confirmed", "the shadow is the fold of the log");
    // Meanwhile new events arrive, and the live worker keeps applying them to the live tables.
    let folded = board.position();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut conn = app.pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
        let live = ledger_projections::checkpoint(&mut conn, booking_board::NAME)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if live >= folded + 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the live worker stalled at {live}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let report = board.swap().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(report.checkpoint >= folded + 3, "{report:?}");
    assert!(
        report.events_folded >= folded + 3,
        "caught up in the swap: {report:?}"
    );
    assert_eq!(differing(&report, "rm_bookings"), 1, "{report:?}");
    assert_eq!(report.differences.len(), 1, "{report:?}");
    assert!(
        report.events_folded >= at && report.checkpoint >= at,
        "{report:?}"
    );
    assert_eq!(
        status_of(&app, victim, report.checkpoint).await,
        "confirmed"
    );

    // The stats, in one call.
    let stats = rebuild(&app.pool, daily_stats::NAME, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(differing(&stats, "rm_daily_stats") >= 1, "{stats:?}");
    assert!(
        stats.summary().starts_with("daily_stats: "),
        "{}",
        stats.summary()
    );

    stop.store(true, Ordering::Relaxed);
    let (statuses, made) = load.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every read during the rebuild answered 200: {statuses:?}"
    );
    assert!(!made.is_empty(), "bookings were made during the rebuild");

    // Every booking made during the rebuild is on the board, and the stats equal a plain fold of
    // the log and a fresh projection.
    let at = head(&app).await;
    for b in &made {
        assert_eq!(status_of(&app, *b, at).await, "pending");
    }
    assert_stats_parity(&app).await;
    // A second rebuild finds nothing to repair: the live tables are the fold of the log.
    for name in ledger_projections::PROJECTIONS {
        let again = rebuild(&app.pool, name, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(again.differences.is_empty(), "{again:?}");
    }
    // The swapped-in tables look like the migrations made them (index names included).
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'rm_bookings' ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        indexes,
        [
            "rm_bookings_board",
            "rm_bookings_changes",
            "rm_bookings_pkey",
            "rm_bookings_subject"
        ]
    );

    // The live workers go on applying after the swap.
    let staff = app.token(Role::Staff);
    // Slot 12 000 (day 1000 at 00:00 UTC, 02:00 in Berlin) on the table: nobody else's day.
    let after = ok(app
        .post("/v1/bookings", &staff, body_for_slot(venue, table, 12_000))
        .await);
    let local = slot(12_000)
        .with_timezone(&chrono_tz::Europe::Berlin)
        .date_naive();
    assert_eq!(
        status_of(&app, after.id(), position(&after)).await,
        "pending"
    );
    let day = ok(get(
        &app,
        &format!(
            "/v1/venues/{venue}/stats?from={local}&to={local}&min_position={}",
            position(&after)
        ),
        &app.token(Role::Manager),
    )
    .await);
    assert_eq!(day.body["days"][0]["bookings"], 1, "{day:?}");
    assert_eq!(day.body["days"][0]["covers"], 3, "{day:?}");
}

fn ledger(args: &[&str], database_url: &str) -> tokio::task::JoinHandle<std::process::Output> {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"));
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn");
    // Blocking: on its own thread, so the API and the workers of this runtime go on meanwhile.
    tokio::task::spawn_blocking(move || {
        command
            .output()
            .unwrap_or_else(|e| panic!("running ledger: {e}"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_replay_rebuild_repairs_the_read_models_and_refuses_unknown_names() {
    let app = spawn_app().await;
    let (venue, table, room, bookings) = workload(&app).await;
    let victim = bookings[2];
    let at = caught_up(&app, venue, victim).await;
    assert_eq!(status_of(&app, victim, at).await, "no_show");
    corrupt(&app, victim).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&app, venue, room, victim, stop.clone());
    let out = ledger(&["replay", "rebuild"], &app.database_url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    stop.store(true, Ordering::Relaxed);
    let (statuses, _) = load.await.unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one summary per projection: {stdout}");
    assert!(lines[0].starts_with("booking_board: "), "{stdout}");
    assert!(
        lines[0].contains("differences found: 1 (rm_bookings: 1 rows differ"),
        "{stdout}"
    );
    assert!(lines[1].starts_with("daily_stats: "), "{stdout}");
    assert!(
        lines[1].contains("rm_daily_stats") && lines[0].contains("events/s"),
        "{stdout}"
    );
    assert!(
        !stderr.contains('\r') && !stderr.contains('\u{1b}'),
        "no progress bar off a terminal: {stderr:?}"
    );
    let at = head(&app).await;
    assert_eq!(status_of(&app, victim, at).await, "no_show", "repaired");
    assert_stats_parity(&app).await;

    // One projection by name; nothing left to repair.
    let out = ledger(
        &["replay", "rebuild", "--projection", "daily_stats"],
        &app.database_url,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("differences found: 0"), "{stdout}");

    // An unknown name: exit 2 with the list of names, and nothing touched.
    let out = ledger(
        &["replay", "rebuild", "--projection", "nope"],
        &app.database_url,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("booking_board") && stderr.contains("daily_stats"),
        "{stderr}"
    );

    // The live workers go on after the CLI's swap.
    let staff = app.token(Role::Staff);
    let after = ok(app
        .post("/v1/bookings", &staff, body_for_slot(venue, table, 12_000))
        .await);
    assert_eq!(
        status_of(&app, after.id(), position(&after)).await,
        "pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilding_after_an_erasure_brings_no_personal_data_back() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let admin = app.token(Role::Admin);
    let email = unique_email();
    let b = ok(app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &email),
        )
        .await);
    let subject = b.body["subject_id"].as_str().unwrap_or_default().to_owned();
    let cert = ok(app
        .post(&format!("/v1/subjects/{subject}/erase"), &admin, json!({}))
        .await);
    let erased_at = position(&cert);
    let before = ok(get(
        &app,
        &format!("/v1/bookings/{}?min_position={erased_at}", b.id()),
        &staff,
    )
    .await);
    assert_eq!(
        (&before.body["customer"], &before.body["erased"]),
        (&Value::Null, &json!(true))
    );

    for name in ledger_projections::PROJECTIONS {
        rebuild(&app.pool, name, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let at = head(&app).await;
    let detail = ok(get(
        &app,
        &format!("/v1/bookings/{}?min_position={at}", b.id()),
        &staff,
    )
    .await);
    assert_eq!(detail.body["customer"], Value::Null, "{detail:?}");
    assert_eq!(detail.body["notes"], Value::Null, "{detail:?}");
    assert_eq!(detail.body["erased"], true, "{detail:?}");
    assert_eq!(detail.body["status"], "pending");
    let board = ok(get(&app, &format!("/v1/bookings?venue_id={venue}"), &staff).await);
    assert_eq!(board.body["items"][0]["erased"], true, "{board:?}");
    assert_eq!(board.body["items"][0]["customer"], Value::Null, "{board:?}");
    // The rebuilt row holds the sealed envelope, never the plaintext.
    let stored: Value =
        sqlx::query_scalar("SELECT customer FROM rm_bookings WHERE booking_id = $1")
            .bind(b.id())
            .fetch_one(&app.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(!stored.to_string().contains(&email), "{stored}");
    assert!(!stored.to_string().contains("Grace Hopper"), "{stored}");
}

/// With no projection worker running (the API alone), a rebuild builds the read models from
/// nothing: the live side is brought to the shadow's position under the checkpoint lock, the
/// two agree, and the queries waiting on `min_position` are woken by the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_without_workers_builds_the_read_models_and_wakes_waiting_queries() {
    let app = spawn_api_only().await;
    let (venue, _, _, bookings) = workload(&app).await;
    let at = head(&app).await;
    let manager = app.token(Role::Manager);
    let waiting = {
        let (client, base, token) = (app.client.clone(), app.base.clone(), manager.0.clone());
        let path = format!("/v1/bookings/{}?min_position={at}", bookings[0]);
        tokio::spawn(async move {
            let r = client
                .get(format!("{base}{path}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        })
    };
    for name in ledger_projections::PROJECTIONS {
        let report = rebuild(&app.pool, name, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (report.live_checkpoint, report.checkpoint),
            (0, at),
            "{report:?}"
        );
        assert!(report.differences.is_empty(), "{report:?}");
        assert_eq!(report.events_folded, at, "{report:?}");
    }
    let (status, body) = waiting.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("confirmed")),
        "{body}"
    );
    let stats = ok(get(
        &app,
        &format!("/v1/venues/{venue}/stats?from=2030-06-01&to=2030-06-01&min_position={at}"),
        &manager,
    )
    .await);
    // Six bookings on 2030-06-01 (Berlin), one cancelled (the other five count two covers each).
    assert_eq!(stats.body["days"][0]["bookings"], 6, "{stats:?}");
    assert_eq!(stats.body["days"][0]["covers"], 10, "{stats:?}");
    assert_eq!(stats.body["days"][0]["no_shows"], 1, "{stats:?}");
    assert_eq!(stats.body["days"][0]["captured_minor"], 5000, "{stats:?}");
    assert_eq!(stats.body["days"][0]["refunded_minor"], 1500, "{stats:?}");
}

/// The stored name of a generated event's type.
fn static_type(t: &str) -> &'static str {
    [
        "VenueRegistered",
        "ResourceAdded",
        "BookingRequested",
        "BookingRescheduled",
        "BookingConfirmed",
        "BookingCancelled",
        "GuestCheckedIn",
        "BookingNoShow",
        "PaymentAuthorized",
        "PaymentCaptured",
        "PaymentRefunded",
        "PaymentFailed",
        "CommandAudited",
    ]
    .into_iter()
    .find(|k| *k == t)
    .unwrap_or_else(|| panic!("no such event type {t}"))
}

/// A log of more than one page of every kind of event, appended through the append pipeline: the
/// rebuild's pages (read ahead, rows of earlier pages loaded by key), its deferred indexes and its
/// swap give exactly what the per-event fold of the same log gives, and a second rebuild finds
/// nothing to repair but what was broken meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_over_several_pages_equals_the_per_event_fold_of_the_log() {
    use crate::read_models::{
        all_events, drop_database, fold_into, fresh_schema, rows_of, scratch_database, LogGenerator,
    };
    use ledger::store::append::{AppendRequest, Appender, StreamAppend};
    use ledger_events::envelope::{ExpectedVersion, Metadata, NewEvent};
    let (pool, admin, name) = scratch_database().await;
    // Erasures need keys in the key store; the property test covers them.
    let generated: Vec<_> = LogGenerator::log(42, ledger_replay::rebuild::PAGE as usize + 2_500)
        .into_iter()
        .filter(|e| e.event_type != "SubjectErased")
        .collect();
    let url = crate::helpers::with_database(&crate::helpers::admin_url(), &name);
    let (appender, writer) =
        Appender::spawn(pool.clone(), &url).unwrap_or_else(|e| panic!("{e:#}"));
    for chunk in generated.chunks(200) {
        let mut pending = Vec::new();
        for e in chunk {
            let appender = appender.clone();
            let request = AppendRequest {
                streams: vec![StreamAppend {
                    stream_id: e.stream_id.clone(),
                    expected: ExpectedVersion::Any,
                    events: vec![NewEvent {
                        event_id: e.event_id,
                        event_type: static_type(&e.event_type),
                        schema_version: 1,
                        payload: e.payload.clone(),
                    }],
                }],
                metadata: Metadata {
                    actor: "generator".into(),
                    role: "staff".into(),
                    command: "Generate".into(),
                    request_id: e.event_id,
                    correlation_id: e.event_id,
                    causation_id: e.event_id,
                },
                slot: None,
                idempotency: None,
            };
            pending.push(tokio::spawn(async move { appender.append(request).await }));
        }
        for p in pending {
            p.await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e:?}"));
        }
    }
    drop(appender);
    let _ = writer.await;
    let log = all_events(&pool).await;
    assert_eq!(log.len(), generated.len());
    let head = log.last().map(|e| e.global_position).unwrap_or(0);
    assert!(
        head > ledger_replay::rebuild::PAGE,
        "more than one page: {head}"
    );

    for projection in ledger_projections::PROJECTIONS {
        // No worker: the live tables are empty, brought to the shadow's position in the swap.
        let report = rebuild(&pool, projection, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((report.events_folded, report.checkpoint), (head, head));
        assert!(report.differences.is_empty(), "{report:?}");
        let per_event = format!("per_event_{projection}");
        fresh_schema(&pool, &per_event, projection).await;
        fold_into(&pool, &per_event, projection, &log, true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let rebuilt = rows_of(&pool, "public", projection).await;
        assert!(rebuilt.iter().all(|(_, rows)| !rows.is_empty()));
        assert!(
            rebuilt == rows_of(&pool, &per_event, projection).await,
            "{projection}: the rebuild differs from the per-event fold"
        );
    }

    // Broken behind the projections' backs, then rebuilt: exactly the broken rows differ.
    sqlx::query(
        "UPDATE rm_bookings SET status = 'broken' WHERE booking_id IN \
           (SELECT booking_id FROM rm_bookings ORDER BY booking_id LIMIT 3)",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(
        "DELETE FROM rm_daily_stats WHERE (venue_id, local_date) IN \
                   (SELECT venue_id, local_date FROM rm_daily_stats LIMIT 2)",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let board = rebuild(&pool, booking_board::NAME, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(differing(&board, "rm_bookings"), 3, "{board:?}");
    assert_eq!(board.differences.len(), 1, "{board:?}");
    let stats = rebuild(&pool, daily_stats::NAME, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(differing(&stats, "rm_daily_stats"), 2, "{stats:?}");
    assert_eq!(
        stats.differences[0].live_rows + 2,
        stats.differences[0].shadow_rows,
        "{stats:?}"
    );
    for projection in ledger_projections::PROJECTIONS {
        assert!(
            rows_of(&pool, "public", projection).await
                == rows_of(&pool, &format!("per_event_{projection}"), projection).await,
            "{projection}: repaired"
        );
    }
    // The swapped-in tables carry the indexes the migrations made, under their names.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public' \
            AND tablename IN ('rm_bookings', 'rm_payments', 'rm_resources') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        indexes,
        [
            "rm_bookings_board",
            "rm_bookings_changes",
            "rm_bookings_pkey",
            "rm_bookings_subject",
            "rm_payments_booking",
            "rm_payments_pkey",
            "rm_resources_pkey",
            "rm_resources_venue"
        ]
    );
    drop_database(pool, admin, &name).await;
}
