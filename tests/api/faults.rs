//! Fault tests with real processes: the relay and the projection workers run as `ledger serve
//! --only …` processes and are killed with SIGKILL mid-flow while commands keep coming.

use crate::helpers::*;
use ledger::http::auth::Role;
use ledger_events::booking::{self, BookingEvent};
use ledger_events::envelope::DomainEvent;
use ledger_events::pii::MasterKey;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub(crate) struct Parts {
    database_url: String,
    pub(crate) nats_url: String,
    pub(crate) stream: String,
    subjects: String,
    jwt: String,
    master_key: String,
    /// Where the parts' logs (warnings and errors) go, one file per process; nowhere when `None`.
    pub(crate) logs: Option<std::path::PathBuf>,
}

impl Parts {
    pub(crate) fn spawn(&self, part: &str) -> Child {
        let (stderr, level) = match &self.logs {
            Some(dir) => {
                let path = dir.join(format!("ledger-{part}-{}.log", Uuid::new_v4().simple()));
                match std::fs::File::create(&path) {
                    Ok(f) => (std::process::Stdio::from(f), "warn"),
                    Err(e) => panic!("cannot create {}: {e}", path.display()),
                }
            }
            None => (std::process::Stdio::null(), "error"),
        };
        Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(["serve", "--only", part])
            .env("DATABASE_URL", &self.database_url)
            .env("NATS_URL", &self.nats_url)
            .env("LEDGER_NATS_STREAM", &self.stream)
            .env("LEDGER_NATS_SUBJECTS", &self.subjects)
            .env("LEDGER_JWT_SECRET", &self.jwt)
            .env("LEDGER_MASTER_KEY", &self.master_key)
            .env("LEDGER_WEBHOOK_SECRET", "unused-by-these-parts")
            .env("LEDGER_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", level)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start ledger serve --only {part}: {e}"))
    }
}

pub(crate) async fn sigkill(child: &mut Child) {
    // tokio's kill() is SIGKILL: no shutdown path runs.
    let _ = child.kill().await;
}

pub(crate) async fn checkpoints(app: &TestApp) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT projection, position FROM projection_checkpoints")
        .fetch_all(&app.pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .collect()
}

pub(crate) async fn head(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(&app.pool)
        .await
        .unwrap_or(-1)
}

pub(crate) fn parts(app: &TestApp, nats_url: String) -> Parts {
    let id = Uuid::new_v4().simple().to_string();
    Parts {
        database_url: app.database_url.clone(),
        nats_url,
        stream: format!("LEDGER_FAULT_{id}"),
        subjects: format!("fault{id}.events"),
        jwt: "a-test-secret-that-is-long-enough-for-hs256!".into(),
        master_key: MasterKey::generate().to_base64(),
        logs: None,
    }
}

/// Bookings, confirmations, cancellations and payments, one after another, while faults happen.
fn commands_flow(
    app: &TestApp,
    venue: Uuid,
    table: Uuid,
    room: Uuid,
    staff: &Token,
) -> tokio::task::JoinHandle<i32> {
    let (base, client, token) = (app.base.clone(), app.client.clone(), staff.0.clone());
    tokio::spawn(async move {
        let mut accepted = 0;
        for i in 0..90u32 {
            let resource = if i % 2 == 0 { table } else { room };
            let starts = format!("2030-07-{:02}T{:02}:00:00Z", 1 + i / 20, i % 20);
            let ends = format!("2030-07-{:02}T{:02}:30:00Z", 1 + i / 20, i % 20);
            let b = client
                .post(format!("{base}/v1/bookings"))
                .bearer_auth(&token)
                .json(
                    &json!({"venue_id": venue, "resource_id": resource, "starts_at": starts,
                    "ends_at": ends, "party_size": 2,
                    "customer": {"name": "Fault Guest", "email": format!("fault{i}@example.org")}}),
                )
                .send()
                .await;
            let Ok(b) = b else { continue };
            if b.status() != 201 {
                continue;
            }
            accepted += 1;
            let body: serde_json::Value = b.json().await.unwrap_or_default();
            let id = body["id"].as_str().unwrap_or_default().to_owned();
            let action = match i % 3 {
                0 => "confirm",
                1 => "cancel",
                _ => continue,
            };
            let _ = client
                .post(format!("{base}/v1/bookings/{id}/{action}"))
                .bearer_auth(&token)
                .json(&json!({}))
                .send()
                .await;
            if i % 5 == 0 {
                let _ = client
                    .post(format!("{base}/v1/bookings/{id}/payments"))
                    .bearer_auth(&token)
                    .json(&json!({"amount_minor": 1000, "currency": "EUR", "kind": "deposit"}))
                    .send()
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        accepted
    })
}

/// Once the faults are over: both read models include the whole log, NATS holds each event once
/// at its position, and the read models equal a fresh fold of the log.
pub(crate) async fn assert_settled(app: &TestApp, parts: &Parts) {
    // Everything settles: both read models include the whole log.
    let head = head(app).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let cp = checkpoints(app).await;
        if ledger_projections::PROJECTIONS
            .iter()
            .all(|p| cp.get(*p).copied().unwrap_or(0) >= head)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "read models stuck at {cp:?}, head {head}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // In NATS once each, in order: the stream sequence is the position, the id the event id.
    let js = async_nats::jetstream::new(
        async_nats::connect(&parts.nats_url)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let mut stream = js
        .get_stream(&parts.stream)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let info = stream
        .info()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .clone();
    assert_eq!(
        (info.state.messages as i64, info.state.last_sequence as i64),
        (head, head)
    );
    let ids: Vec<(i64, Uuid)> =
        sqlx::query_as("SELECT global_position, event_id FROM events ORDER BY 1")
            .fetch_all(&app.pool)
            .await
            .unwrap_or_default();
    for (position, event_id) in &ids {
        let m = stream
            .direct_get(*position as u64)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let msg_id = m
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned());
        assert_eq!(msg_id, Some(event_id.to_string()), "position {position}");
    }

    // Applied once: the booking board equals a fresh fold of the log, booking by booking.
    let rows: Vec<(Uuid, String, Uuid, chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(
        "SELECT booking_id, status, resource_id, starts_at, version FROM rm_bookings",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap_or_default();
    let events = ledger_replay::read_all(&app.pool, 0, i64::MAX)
        .await
        .unwrap_or_default();
    let mut folded: BTreeMap<Uuid, (Option<booking::Booking>, i64)> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.stream_id.starts_with("booking-"))
    {
        let event = BookingEvent::decode(&e.event_type, e.schema_version, &e.payload)
            .unwrap_or_else(|err| panic!("{err}"));
        let id = Uuid::parse_str(&e.stream_id["booking-".len()..]).unwrap_or_default();
        let entry = folded.entry(id).or_insert((None, 0));
        entry.0 = booking::evolve(entry.0.take(), &event);
        entry.1 = e.stream_version;
    }
    assert_eq!(rows.len(), folded.len());
    for (id, status, resource, starts, version) in rows {
        let (b, v) = &folded[&id];
        let b = b
            .as_ref()
            .unwrap_or_else(|| panic!("booking {id} folds to nothing"));
        assert_eq!(
            (status.as_str(), resource, starts, version),
            (b.status.as_str(), b.resource_id.0, b.slot.starts_at, *v),
            "booking {id}"
        );
    }
    // And the daily stats equal a plain fold and a fresh rebuild.
    crate::read_models::assert_stats_parity(app).await;

    let _ = js.delete_stream(&parts.stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_relay_and_the_projectors_mid_flow_loses_nothing_and_applies_nothing_twice() {
    let app = spawn_api_only().await;
    let parts = parts(&app, std::env::var("NATS_URL").unwrap_or_default());
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let flow = commands_flow(&app, venue, table, room, &staff);
    let mut relay = parts.spawn("relay");
    let mut projector = parts.spawn("projector");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        sigkill(&mut relay).await;
        relay = parts.spawn("relay");
        tokio::time::sleep(Duration::from_millis(300)).await;
        sigkill(&mut projector).await;
        projector = parts.spawn("projector");
    }
    let accepted = flow.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(accepted > 50, "commands kept flowing ({accepted} bookings)");
    assert_settled(&app, &parts).await;
    sigkill(&mut relay).await;
    sigkill(&mut projector).await;
}

/// A nats-server of the test's own (the shared one must not be killed under other tests).
struct Nats {
    bin: String,
    port: u16,
    store: std::path::PathBuf,
    child: Option<Child>,
}

impl Nats {
    async fn start(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin));
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_and_restarting_nats_server_mid_flow_loses_nothing() {
    let bin = std::env::var("LEDGER_NATS_BIN").unwrap_or_else(|_| "nats-server".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let store = std::env::temp_dir().join(format!("ledger-fault-nats-{}", Uuid::new_v4().simple()));
    let mut nats = Nats {
        bin,
        port,
        store: store.clone(),
        child: None,
    };
    nats.start().await;
    let app = spawn_api_only().await;
    let parts = parts(&app, format!("nats://127.0.0.1:{port}"));
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let mut relay = parts.spawn("relay");
    let mut projector = parts.spawn("projector");
    let flow = commands_flow(&app, venue, table, room, &staff);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        nats.kill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        nats.start().await;
    }
    let accepted = flow.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        accepted > 50,
        "commands kept flowing without NATS ({accepted} bookings)"
    );
    assert_settled(&app, &parts).await;
    sigkill(&mut relay).await;
    sigkill(&mut projector).await;
    nats.kill().await;
    let _ = std::fs::remove_dir_all(&store);
}
