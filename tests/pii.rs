//! Personal data at rest and in logs: customer name, email, phone, notes and a cancel reason never
//! rest in plaintext — not in a `pg_dump` of the database, not in idempotency records or the key
//! store, not in TRACE-level logs.
//!
//! Its own test binary because it installs a process-wide `tracing` subscriber that writes every
//! log line (TRACE and up, every target) into an in-memory buffer.

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
/// idempotency keys, plus refused commands carrying them. Returns (booking, subject).
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
