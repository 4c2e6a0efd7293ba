//! Personal data at rest and in logs: customer name, email, phone, notes and a cancel reason never
//! rest in plaintext — not in a `pg_dump` of the database, not in idempotency records or the key
//! store, not in TRACE-level logs, not in the Postgres statement log (`log_statement = 'all'`, bind
//! parameters included), not in any message of the test's JetStream stream read through a
//! consumer nor in the stream's store files on disk, not in `/metrics`. Every scan has a positive
//! control: a marker known to be there is found by the same scan.
//!
//! Its own test binary because it installs a process-wide `tracing` subscriber that writes every
//! log line (TRACE and up, every target) into an in-memory buffer. The statement log and the
//! JetStream store are files of the services `./dev.sh` runs: it exports their paths as
//! `LEDGER_PG_LOG` and `LEDGER_NATS_STORE_DIR`.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use base64::Engine;
use helpers::*;
use ledger::http::auth::Role;
use serde_json::{json, Value};
use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// The in-memory log sink.

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    fn contents(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs (once per process) a TRACE subscriber for every target writing into the buffer.
fn logs() -> &'static LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = LogBuffer::default();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(buffer.clone())
            .try_init()
            .unwrap_or_else(|e| panic!("installing the test subscriber: {e}"));
        buffer
    })
}

// ---------------------------------------------------------------------------------------------
// Markers and the scanner.

/// Unique personal values of one test run.
struct Markers {
    name: String,
    email: String,
    phone: String,
    notes: String,
    reason: String,
    /// A second email, used by a customer's own booking.
    customer_email: String,
    /// Sent only in a refused request (a wrongly typed field).
    refused_value: String,
    /// Searched for but never booked, and sent in a URL path and a query string.
    unknown_email: String,
}

impl Markers {
    fn fresh() -> Self {
        let u = || Uuid::new_v4().simple().to_string();
        let digits = Uuid::new_v4().as_u128() % 1_000_000_000_000;
        Markers {
            name: format!("Zelda Marker {}", u()),
            email: format!("pii-{}@example.org", u()),
            phone: format!("+49 {digits:012}"),
            notes: format!("allergic to marker {}", u()),
            reason: format!("marker reason {}", u()),
            customer_email: format!("own-{}@example.org", u()),
            refused_value: format!("refused-{}", u()),
            unknown_email: format!("nobody-{}@example.org", u()),
        }
    }

    /// What must never be found: each value, its distinctive part alone, and the forms plaintext
    /// takes when stored as bytes (hex, as `pg_dump` prints `bytea`) or base64.
    fn needles(&self) -> Vec<String> {
        let values = [
            &self.name,
            &self.email,
            &self.phone,
            &self.notes,
            &self.reason,
            &self.customer_email,
            &self.refused_value,
            &self.unknown_email,
        ];
        let mut needles = Vec::new();
        for v in values {
            needles.push(v.to_string());
            // The unique tail (uuid or digits) catches a value stored transformed around it.
            if let Some(tail) = v.rsplit([' ', '-', '@']).find(|t| t.len() >= 12) {
                needles.push(tail.to_string());
            }
            needles.push(hex::encode(v.as_bytes()));
            let whole = v.len() / 3 * 3;
            needles.push(base64::engine::general_purpose::STANDARD.encode(&v.as_bytes()[..whole]));
        }
        needles
    }
}

/// The needles found in `haystack` (case-insensitively: emails are normalised to lower case).
fn found_in(haystack: &str, needles: &[String]) -> Vec<String> {
    let lower = haystack.to_lowercase();
    needles
        .iter()
        .filter(|n| lower.contains(&n.to_lowercase()))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Driving the API with the markers.

/// Books, reschedules and cancels with the markers, through staff and a customer, with
/// idempotency keys, plus refused commands carrying them; reads them back (detail, board, the
/// customer's bookings), searches the subject by email and exports it (admin and the customer),
/// and sends a marker in a URL path and a query string. Returns (booking, subject).
async fn exercise(app: &TestApp, m: &Markers) -> (Uuid, Uuid) {
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let body = json!({
        "venue_id": venue, "resource_id": table,
        "starts_at": at(18), "ends_at": at(20), "party_size": 2,
        "customer": {"name": m.name, "email": m.email, "phone": m.phone},
        "notes": m.notes,
    });
    let key = [("idempotency-key", "pii-booking")];
    let booked = app
        .post_with("/v1/bookings", &staff, body.clone(), &key)
        .await;
    assert_eq!(booked.status, 201, "{booked:?}");
    let replay = app
        .post_with("/v1/bookings", &staff, body.clone(), &key)
        .await;
    assert_eq!(replay.body, booked.body);
    let booking = booked.id();
    let subject = booked.body["subject_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("no subject_id: {booked:?}"));

    // Refused requests carrying the same personal data: a clash, a bad party size, a wrong type.
    let clash = app.post("/v1/bookings", &staff, body.clone()).await;
    assert_eq!(clash.status, 409, "{clash:?}");
    let mut too_big = body.clone();
    too_big["party_size"] = json!(99);
    assert_eq!(app.post("/v1/bookings", &staff, too_big).await.status, 422);
    let mut wrong = body.clone();
    wrong["party_size"] = json!(m.refused_value);
    assert_eq!(app.post("/v1/bookings", &staff, wrong).await.status, 400);
    let mut bad_email = body.clone();
    bad_email["customer"]["email"] = json!(format!("{} at nowhere", m.refused_value));
    assert_eq!(
        app.post("/v1/bookings", &staff, bad_email).await.status,
        422
    );

    let moved = app
        .post(
            &format!("/v1/bookings/{booking}/reschedule"),
            &staff,
            json!({"starts_at": at(19), "ends_at": at(21), "resource_id": room}),
        )
        .await;
    assert_eq!(moved.status, 200, "{moved:?}");
    let cancelled = app
        .post_with(
            &format!("/v1/bookings/{booking}/cancel"),
            &staff,
            json!({"reason": m.reason}),
            &[("idempotency-key", "pii-cancel")],
        )
        .await;
    assert_eq!(cancelled.status, 200, "{cancelled:?}");

    // A customer's own booking.
    let customer = app.token_with(Role::Customer, Some(Uuid::now_v7()), None);
    let own = app
        .post(
            "/v1/bookings",
            &customer,
            json!({
                "venue_id": venue, "resource_id": table,
                "starts_at": at(10), "ends_at": at(11), "party_size": 1,
                "customer": {"name": m.name, "email": m.customer_email},
            }),
        )
        .await;
    assert_eq!(own.status, 201, "{own:?}");
    // A stranger trying the customer's email is refused (and audited).
    let stranger = app.token_with(Role::Customer, Some(Uuid::now_v7()), None);
    let refused = app
        .post(
            "/v1/bookings",
            &stranger,
            json!({
                "venue_id": venue, "resource_id": table,
                "starts_at": at(12), "ends_at": at(13), "party_size": 1,
                "customer": {"name": m.name, "email": m.customer_email},
            }),
        )
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");

    // Every read path that opens personal data, the search by email and the export.
    let admin = app.token(Role::Admin);
    let read = |path: String, token: &Token| {
        app.send(
            app.client
                .get(format!("{}{path}", app.base))
                .bearer_auth(&token.0),
        )
    };
    let at = own.body["position"].as_i64().unwrap_or(0);
    let detail = read(format!("/v1/bookings/{booking}?min_position={at}"), &staff).await;
    assert_eq!(
        detail.body["customer"]["phone"],
        json!(m.phone),
        "{detail:?}"
    );
    let board = read(format!("/v1/bookings?venue_id={venue}"), &staff).await;
    assert_eq!(board.status, 200, "{board:?}");
    let found = app
        .post("/v1/subjects/search", &admin, json!({"email": m.email}))
        .await;
    assert_eq!(found.body["subject_id"], json!(subject), "{found:?}");
    let nobody = app
        .post(
            "/v1/subjects/search",
            &admin,
            json!({"email": m.unknown_email}),
        )
        .await;
    assert_eq!(nobody.status, 404, "{nobody:?}");
    let export = read(format!("/v1/subjects/{subject}/export"), &admin).await;
    assert_eq!(export.status, 200, "{export:?}");
    let opened = export.body["bookings"][0].clone();
    assert_eq!(
        (
            &opened["customer"]["email"],
            &opened["notes"],
            &opened["cancel_reason"]
        ),
        (&json!(m.email), &json!(m.notes), &json!(m.reason)),
        "the export opens every field: {export:?}"
    );
    let own_subject = own.body["subject_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mine = read(format!("/v1/subjects/{own_subject}/export"), &customer).await;
    assert_eq!(mine.status, 200, "{mine:?}");
    let theirs = read(format!("/v1/customers/{own_subject}/bookings"), &customer).await;
    assert_eq!(theirs.status, 200, "{theirs:?}");
    // Personal data where it does not belong: in a path and a query string.
    let in_path = read(format!("/v1/subjects/{}/export", m.unknown_email), &admin).await;
    assert_eq!(in_path.status, 404, "{in_path:?}");
    let in_query = read(format!("/v1/bookings?venue_id={}", m.unknown_email), &staff).await;
    assert_eq!(in_query.status, 400, "{in_query:?}");
    (booking, subject)
}

// ---------------------------------------------------------------------------------------------
// pg_dump.

fn pg_dump(database_url: &str) -> String {
    let bin = std::env::var("LEDGER_PG_BIN")
        .map(|dir| format!("{dir}/pg_dump"))
        .unwrap_or_else(|_| "pg_dump".into());
    let out = Command::new(&bin)
        .arg("--no-owner")
        .arg("--dbname")
        .arg(database_url)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    assert!(
        out.status.success(),
        "{bin} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dump.contains("COPY public.events"),
        "the dump holds the log"
    );
    dump
}

fn assert_sealed(value: &Value, subject: Uuid, what: &str) {
    let map = value
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not a sealed envelope: {value}"));
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["ct", "kid", "n", "sub", "v"], "{what}: {value}");
    assert_eq!(value["v"], 1, "{what}");
    assert_eq!(
        value["sub"],
        json!(subject),
        "{what}: sealed under the subject's key"
    );
    assert!(
        value["kid"]
            .as_str()
            .and_then(|k| Uuid::parse_str(k).ok())
            .is_some(),
        "{what}: kid"
    );
    let b64 = |field: &str| {
        value[field]
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .unwrap_or_else(|| panic!("{what}.{field} is not base64: {value}"))
    };
    assert_eq!(b64("n").len(), 24, "{what}: a 24-byte nonce");
    assert!(b64("ct").len() > 16, "{what}: ciphertext and tag");
}

#[tokio::test]
async fn personal_data_rests_nowhere_in_plaintext() {
    logs();
    let app = spawn_app().await;
    let m = Markers::fresh();
    let needles = m.needles();
    let (booking, subject) = exercise(&app, &m).await;

    // The log holds sealed envelopes where personal data would be.
    let requested = app.events_of("BookingRequested").await;
    let ours = requested
        .iter()
        .find(|(stream, _, _)| stream == &format!("booking-{booking}"))
        .unwrap_or_else(|| panic!("no BookingRequested for {booking}"));
    assert_sealed(&ours.1["customer"], subject, "BookingRequested.customer");
    for field in ["name", "email", "phone", "notes"] {
        assert!(ours.1.get(field).is_none(), "{field} beside the envelope");
    }
    let cancelled = app.events_of("BookingCancelled").await;
    assert_eq!(cancelled.len(), 1);
    assert_sealed(
        &cancelled[0].1["reason"],
        subject,
        "BookingCancelled.reason",
    );

    // Idempotency records and the key store, read directly.
    let idempotency: Vec<String> = sqlx::query_scalar(
        "SELECT encode(key_hash, 'hex') || encode(request_hmac, 'hex') || response::text \
         FROM idempotency_keys",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(idempotency.len(), 2, "the booking and the cancel");
    let keystore: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(k)::text FROM keystore.subject_keys k \
         UNION ALL SELECT row_to_json(l)::text FROM keystore.subject_lookup l",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(keystore.len() >= 4, "keys and lookups exist: {keystore:?}");
    for (what, rows) in [("idempotency_keys", &idempotency), ("keystore", &keystore)] {
        let leaked = found_in(&rows.join("\n"), &needles);
        assert!(leaked.is_empty(), "{what} holds personal data: {leaked:?}");
    }

    // The whole database, dumped.
    let dump = pg_dump(&app.database_url);
    let leaked = found_in(&dump, &needles);
    assert!(leaked.is_empty(), "pg_dump holds personal data: {leaked:?}");

    // Positive control: the same scan finds plaintext that is there.
    let control = format!("control-{}", Uuid::new_v4().simple());
    sqlx::query("CREATE TABLE pii_scan_control (note text, raw bytea)")
        .execute(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("INSERT INTO pii_scan_control VALUES ($1, $2)")
        .bind(&control)
        .bind(format!("bytes-{control}").into_bytes())
        .execute(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dump = pg_dump(&app.database_url);
    assert!(
        found_in(&dump, std::slice::from_ref(&control)) == [control.as_str()],
        "the scan finds plaintext in a dump"
    );
    let in_bytes = hex::encode(format!("bytes-{control}"));
    assert_eq!(
        found_in(&dump, std::slice::from_ref(&in_bytes)),
        [in_bytes],
        "the scan finds plaintext stored as bytea"
    );
}

#[tokio::test]
async fn personal_data_never_reaches_the_logs() {
    let logs = logs();
    let app = spawn_app().await;
    let m = Markers::fresh();
    let needles = m.needles();
    exercise(&app, &m).await;

    // Positive control: a line logged through `tracing` is in the buffer the scan reads.
    let control = format!("log-control-{}", Uuid::new_v4().simple());
    tracing::info!(marker = %control, "positive control for the log scan");
    let captured = logs.contents();
    assert_eq!(
        found_in(&captured, std::slice::from_ref(&control)),
        [control],
        "the scan finds what was logged"
    );
    // The subscriber really captured the app at TRACE, not just our control line.
    assert!(
        captured.contains("TRACE") || captured.contains("DEBUG"),
        "debug/trace lines are captured"
    );
    assert!(
        captured.contains("request done"),
        "the app's request logs are captured"
    );

    let leaked = found_in(&captured, &needles);
    assert!(
        leaked.is_empty(),
        "the logs hold personal data: {leaked:?}\n{}",
        captured
            .lines()
            .filter(|l| !found_in(l, &leaked).is_empty())
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The Postgres statement log.

/// A file of the services `./dev.sh` runs, named by an environment variable it exports.
fn service_path(variable: &str) -> std::path::PathBuf {
    std::env::var_os(variable)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            panic!("{variable} is not set: run the tests with ./dev.sh test (or eval \"$(./dev.sh env --test)\")")
        })
}

/// What was appended to `path` since it was `from` bytes long.
fn read_from(path: &std::path::Path, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.seek(SeekFrom::Start(from))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Polls `check` for up to 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn personal_data_never_reaches_the_postgres_statement_log() {
    let log = service_path("LEDGER_PG_LOG");
    let from = std::fs::metadata(&log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()))
        .len();
    // Set on the database before the app connects: every session of the app logs every
    // statement, with its bind parameters in full.
    let app = spawn_app_with_database_settings(&[
        ("log_statement", "all"),
        ("log_parameter_max_length", "-1"),
    ])
    .await;
    let (statement, parameters): (String, String) = sqlx::query_as(
        "SELECT current_setting('log_statement'), current_setting('log_parameter_max_length')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((statement.as_str(), parameters.as_str()), ("all", "-1"));
    let m = Markers::fresh();
    let needles = m.needles();
    let (booking, _) = exercise(&app, &m).await;

    // Positive control: a marker sent as a bind parameter through the app's pool is logged.
    let control = format!("statement-control-{}", Uuid::new_v4().simple());
    let echoed: String = sqlx::query_scalar("SELECT $1::text")
        .bind(&control)
        .fetch_one(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(echoed, control);
    eventually("the statement log shows the control parameter", || {
        !found_in(&read_from(&log, from), std::slice::from_ref(&control)).is_empty()
    })
    .await;
    let logged = read_from(&log, from);
    assert!(
        logged.contains("parameters: $1 = '") && logged.contains(&control),
        "bind parameters are logged"
    );
    // The app's own statements and parameters are there too, not just ours.
    assert!(
        logged.contains("append_batch") && logged.contains(&booking.to_string()),
        "the app's statements and parameters are logged"
    );

    let leaked = found_in(&logged, &needles);
    assert!(
        leaked.is_empty(),
        "the statement log holds personal data: {leaked:?}\n{}",
        logged
            .lines()
            .filter(|l| !found_in(l, &leaked).is_empty())
            .take(5)
            .map(|l| l.chars().take(400).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// JetStream: messages read through a consumer, and the store files on disk.

/// Every file under the store directory of JetStream stream `stream`, read whole.
fn stream_store_files(store: &std::path::Path, stream: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    fn walk(
        dir: &std::path::Path,
        stream: &str,
        inside: bool,
        out: &mut Vec<(std::path::PathBuf, Vec<u8>)>,
    ) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                let here = inside
                    || (entry.file_name() == stream
                        && dir.file_name().is_some_and(|p| p == "streams"));
                walk(&path, stream, here, out);
            } else if inside {
                if let Ok(bytes) = std::fs::read(&path) {
                    out.push((path, bytes));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(store, stream, false, &mut out);
    out
}

fn text_of(files: &[(std::path::PathBuf, Vec<u8>)]) -> String {
    files
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every message of `stream`, read from the start through an ephemeral pull consumer:
/// subject, headers and payload of each, as text.
async fn read_through_consumer(
    js: &async_nats::jetstream::Context,
    stream: &str,
    expected: usize,
) -> Vec<String> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    use futures::StreamExt;
    let consumer = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("{stream}: {e}"))
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("consumer on {stream}: {e}"));
    let mut seen = Vec::new();
    while seen.len() < expected {
        let mut batch = consumer
            .fetch()
            .max_messages(expected - seen.len())
            .expires(std::time::Duration::from_secs(2))
            .messages()
            .await
            .unwrap_or_else(|e| panic!("fetch from {stream}: {e}"));
        let before = seen.len();
        while let Some(m) = batch.next().await {
            let m = m.unwrap_or_else(|e| panic!("message of {stream}: {e}"));
            let headers = m
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .map(|(k, vs)| {
                    let vs: Vec<&str> = vs.iter().map(|v| v.as_str()).collect();
                    format!("{k}: {}", vs.join(","))
                })
                .collect::<Vec<_>>()
                .join("\n");
            seen.push(format!(
                "{}\n{headers}\n{}",
                m.subject,
                String::from_utf8_lossy(&m.payload)
            ));
        }
        assert!(
            seen.len() > before,
            "{stream}: no more messages after {}",
            seen.len()
        );
    }
    seen
}

#[tokio::test]
async fn personal_data_never_rests_in_jetstream_messages_or_store_files() {
    let store = service_path("LEDGER_NATS_STORE_DIR");
    let app = spawn_app().await;
    let m = Markers::fresh();
    let needles = m.needles();
    exercise(&app, &m).await;
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| panic!("NATS_URL is not set"));
    let js = async_nats::jetstream::new(
        async_nats::connect(&nats_url)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );

    // The relay has published the whole log (stream sequence = global position).
    let head: i64 = sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let last = match js.get_stream(&app.stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
            Err(_) => 0,
        };
        if last as i64 >= head {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "published {last} of {head}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (last_event,): (Uuid,) =
        sqlx::query_as("SELECT event_id FROM events WHERE global_position = $1")
            .bind(head)
            .fetch_one(&app.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));

    // Every message, read through a consumer. Control: the consumer sees our events (their ids
    // are in the messages), so the scan reads real messages.
    let messages = read_through_consumer(&js, &app.stream, head as usize).await;
    let all = messages.join("\n");
    assert!(
        all.contains(&last_event.to_string()),
        "the consumer read the log"
    );
    let leaked = found_in(&all, &needles);
    assert!(
        leaked.is_empty(),
        "JetStream messages hold personal data: {leaked:?}"
    );

    // The stream's files on disk. Control: they hold our events (the last one's id), so the
    // messages have reached the files the scan reads.
    eventually("the stream's store files hold the last event", || {
        text_of(&stream_store_files(&store, &app.stream)).contains(&last_event.to_string())
    })
    .await;
    let files = stream_store_files(&store, &app.stream);
    assert!(
        files
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "blk")),
        "message blocks found under {}: {:?}",
        store.display(),
        files.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    let leaked = found_in(&text_of(&files), &needles);
    assert!(
        leaked.is_empty(),
        "the JetStream store holds personal data: {leaked:?}"
    );

    // Positive control: plaintext published to a scratch stream is found by the same scans, in
    // what a consumer reads and in that stream's store files.
    let id = Uuid::new_v4().simple().to_string();
    let scratch = format!("PII_CONTROL_{id}");
    let control = format!("jetstream-control-{id}");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: scratch.clone(),
        subjects: vec![format!("piicontrol{id}")],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    js.publish(format!("piicontrol{id}"), control.clone().into())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let read = read_through_consumer(&js, &scratch, 1).await.join("\n");
    assert_eq!(
        found_in(&read, std::slice::from_ref(&control)),
        std::slice::from_ref(&control)
    );
    eventually("the scan finds plaintext in a stream's store files", || {
        found_in(
            &text_of(&stream_store_files(&store, &scratch)),
            std::slice::from_ref(&control),
        ) == std::slice::from_ref(&control)
    })
    .await;
    let _ = js.delete_stream(&scratch).await;
}

// ---------------------------------------------------------------------------------------------
// /metrics.

#[tokio::test]
async fn personal_data_never_shows_in_metrics() {
    let app = spawn_app().await;
    let m = Markers::fresh();
    let needles = m.needles();
    exercise(&app, &m).await;
    let head: i64 = sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200);
    let body = r.text().await.unwrap_or_default();
    // Positive control: the body the scan reads is this app's, after the exercise.
    let control = format!("ledger_log_head_position {head}\n");
    assert_eq!(
        found_in(&body, std::slice::from_ref(&control)),
        [control],
        "{body}"
    );
    let leaked = found_in(&body, &needles);
    assert!(
        leaked.is_empty(),
        "/metrics holds personal data: {leaked:?}\n{body}"
    );
}
