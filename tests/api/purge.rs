//! Idempotency records are purged once past `LEDGER_IDEMPOTENCY_RETENTION_HOURS` (48 here), by
//! every API process, safely when several purge at once; younger records stay and still replay; a
//! retry after its record was purged is a new command.

use crate::helpers::*;
use ledger::http::auth::Role;
use ledger::store::purge::{self, PurgeMetrics, Retention};
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// The production retention, purged every 100 ms instead of every 10 minutes.
fn fast() -> Retention {
    Retention {
        every: Duration::from_millis(100),
        ..Retention::default()
    }
}

/// Moves the idempotency record of the command answered at `position` back by `hours`, as if it
/// had been written then (as the superuser; the app never rewrites `created_at`).
async fn age(pool: &PgPool, position: i64, hours: i32) {
    let moved = sqlx::query(
        "UPDATE idempotency_keys SET created_at = now() - make_interval(hours => $2) \
          WHERE position = $1",
    )
    .bind(position)
    .bind(hours)
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .rows_affected();
    assert_eq!(moved, 1, "one record answered position {position}");
}

async fn record_exists(pool: &PgPool, position: i64) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM idempotency_keys WHERE position = $1)")
        .bind(position)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `n` records written `hours` ago, of no command (random keys), straight into the table.
async fn insert_records(pool: &PgPool, n: i64, hours: i32) {
    sqlx::query(
        "INSERT INTO idempotency_keys (key_hash, request_hmac, status, response, position, created_at) \
         SELECT sha256(convert_to(gen_random_uuid()::text, 'UTF8')), '\\x00', 201, '{}', 0, \
                now() - make_interval(hours => $2) \
           FROM generate_series(1, $1)",
    )
    .bind(n)
    .bind(hours)
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

async fn count_older_than(pool: &PgPool, hours: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1)",
    )
    .bind(hours)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn metric(base: &str, client: &reqwest::Client, name: &str) -> f64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Waits (up to 2 s: the counter moves right after the delete commits) until `name` is `value`.
async fn until_metric(base: &str, client: &reqwest::Client, name: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let now = metric(base, client, name).await;
        if now == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {now}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 10 s) until no record older than `hours` is left.
async fn until_purged(pool: &PgPool, hours: i32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count_older_than(pool, hours).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "records older than {hours} h were not purged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn records_past_the_retention_are_purged_and_younger_ones_still_replay() {
    let app = spawn_with(Spawn {
        read_side: false,
        idempotency_retention: Some(fast()),
        ..Spawn::default()
    })
    .await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let send = |body: serde_json::Value, key: String| {
        let staff = &staff;
        let app = &app;
        async move {
            app.post_with("/v1/bookings", staff, body, &[("idempotency-key", &key)])
                .await
        }
    };
    // Three bookings under three keys: one written 49 h ago (past the retention), one 47 h ago
    // (past the contract's 24 h, within the retention), one just now.
    let mut made = Vec::new();
    for (hours, resource, start) in [(49, table, 10), (47, table, 14), (0, room, 18)] {
        let body = booking_body(venue, resource, start, start + 2, &unique_email());
        let key = format!("key-{}", Uuid::new_v4());
        let first = send(body.clone(), key.clone()).await;
        assert_eq!(first.status, 201, "{first:?}");
        let position = first.body["position"].as_i64().unwrap_or(-1);
        if hours > 0 {
            age(&app.pool, position, hours).await;
        }
        made.push((hours, body, key, first, position));
    }
    until_purged(&app.pool, 48).await;
    until_metric(
        &app.base,
        &app.client,
        "ledger_idempotency_purged_total",
        1.0,
    )
    .await;
    assert!(
        metric(
            &app.base,
            &app.client,
            "ledger_idempotency_purge_runs_total"
        )
        .await
            >= 1.0
    );

    let events = app.count_all_events().await;
    for (hours, body, key, first, position) in &made[1..] {
        assert!(record_exists(&app.pool, *position).await, "{hours} h old");
        let again = send(body.clone(), key.clone()).await;
        assert_eq!(
            (again.status, &again.body),
            (first.status, &first.body),
            "{hours} h old: the first answer, replayed"
        );
    }
    assert_eq!(
        app.count_all_events().await,
        events,
        "replays append nothing"
    );

    // The purged one: its retry is a new command, decided on the state now. Its first booking
    // holds the slot, so booking it again is refused rather than answered as before.
    let (_, body, key, first, position) = &made[0];
    assert!(!record_exists(&app.pool, *position).await);
    let again = send(body.clone(), key.clone()).await;
    again.assert_problem(409, "slot-unavailable");
    assert_eq!(app.count_events("BookingRequested").await, 3);
    // A lifecycle command retried after its record went is decided again too.
    let booking = first.id();
    let confirm_key = format!("key-{}", Uuid::new_v4());
    let confirmed = app
        .post_with(
            &format!("/v1/bookings/{booking}/confirm"),
            &staff,
            json!({}),
            &[("idempotency-key", &confirm_key)],
        )
        .await;
    assert_eq!(confirmed.status, 200, "{confirmed:?}");
    age(
        &app.pool,
        confirmed.body["position"].as_i64().unwrap_or(-1),
        49,
    )
    .await;
    until_purged(&app.pool, 48).await;
    let retried = app
        .post_with(
            &format!("/v1/bookings/{booking}/confirm"),
            &staff,
            json!({}),
            &[("idempotency-key", &confirm_key)],
        )
        .await;
    retried.assert_problem(409, "invalid-transition");
}

#[tokio::test]
async fn several_api_processes_purge_together_and_delete_each_record_once() {
    let app = spawn_with(Spawn {
        read_side: false,
        idempotency_retention: Some(fast()),
        ..Spawn::default()
    })
    .await;
    let second = app
        .second_api_with(|s| s.idempotency_retention = fast())
        .await;
    // More than two batches of old records, and young ones that must stay.
    let old = 2 * purge::BATCH + 500;
    insert_records(&app.pool, old, 72).await;
    insert_records(&app.pool, 40, 30).await;
    until_purged(&app.pool, 48).await;
    // Each record is counted by the one process that deleted it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let by_first = metric(&app.base, &app.client, "ledger_idempotency_purged_total").await;
        let by_second = metric(&second, &app.client, "ledger_idempotency_purged_total").await;
        if by_first + by_second == old as f64 {
            break;
        }
        assert!(
            by_first + by_second < old as f64 && tokio::time::Instant::now() < deadline,
            "{by_first} + {by_second} purged, not {old}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        count_older_than(&app.pool, 24).await,
        40,
        "younger ones stay"
    );
}

#[tokio::test]
async fn concurrent_purges_share_the_work_without_deleting_twice() {
    let app = spawn_api_only().await;
    let old = 5 * purge::BATCH + 123;
    insert_records(&app.pool, old, 49).await;
    insert_records(&app.pool, 10, 47).await;
    let metrics = std::sync::Arc::new(PurgeMetrics::default());
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (pool, metrics) = (app.pool.clone(), metrics.clone());
            tokio::spawn(async move { purge::purge_expired(&pool, 48, &metrics).await })
        })
        .collect();
    let mut total = 0;
    for run in runs {
        total += run
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(total, old as u64);
    // A purger stops at a short batch only when every old row left is another's to delete.
    let left = purge::purge_expired(&app.pool, 48, &metrics)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(left, 0);
    assert_eq!(
        metrics.purged.load(std::sync::atomic::Ordering::Relaxed),
        old as u64
    );
    assert_eq!(count_older_than(&app.pool, 48).await, 0);
    assert_eq!(count_older_than(&app.pool, 24).await, 10);
}

#[tokio::test]
async fn a_retention_below_the_contracts_day_stops_serve_with_exit_2_naming_it() {
    for (value, ok) in [("23", false), ("48h", false), ("24", true)] {
        let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledger"));
        serve
            .args(["serve", "--only", "api"])
            .env_clear()
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env("LEDGER_LISTEN", "127.0.0.1:0")
            .env("LEDGER_JWT_SECRET", "j".repeat(32))
            .env(
                "LEDGER_MASTER_KEY",
                ledger_events::pii::MasterKey::generate().to_base64(),
            )
            .env("LEDGER_WEBHOOK_SECRET", "whsec")
            .env("LEDGER_IDEMPOTENCY_RETENTION_HOURS", value)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(30), serve.output())
            .await
            .unwrap_or_else(|_| panic!("serve with {value:?} did not stop"))
            .unwrap_or_else(|e| panic!("{e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if ok {
            // Valid: it gets past configuration and fails on the unreachable database instead.
            assert_eq!(out.status.code(), Some(1), "{value:?}: {stderr}");
            assert!(
                !stderr.contains("LEDGER_IDEMPOTENCY_RETENTION_HOURS"),
                "{stderr}"
            );
        } else {
            assert_eq!(out.status.code(), Some(2), "{value:?}: {stderr}");
            assert!(
                stderr.contains("LEDGER_IDEMPOTENCY_RETENTION_HOURS"),
                "{value:?}: {stderr}"
            );
        }
    }
}
