//! The relay against a real nats-server with JetStream: each test its own stream and subjects.

use crate::helpers::*;
use async_nats::jetstream;
use ledger::http::auth::Role;
use ledger::relay::{Relay, RelayConfig};
use std::time::Duration;
use uuid::Uuid;

async fn nats() -> async_nats::Client {
    let url = std::env::var("NATS_URL")
        .unwrap_or_else(|_| panic!("NATS_URL is not set: run the tests with ./dev.sh test"));
    async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach nats-server at NATS_URL: {e}"))
}

fn config(batch: i64) -> RelayConfig {
    let id = Uuid::new_v4().simple().to_string();
    RelayConfig {
        stream: format!("LEDGER_TEST_{id}"),
        subject_prefix: format!("test{id}.events"),
        batch,
    }
}

async fn stream_of(config: &RelayConfig) -> jetstream::stream::Stream {
    jetstream::new(nats().await)
        .get_stream(&config.stream)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Test streams live on the shared dev nats-server: remove them when done.
async fn drop_stream(config: &RelayConfig) {
    let _ = jetstream::new(nats().await)
        .delete_stream(&config.stream)
        .await;
}

async fn head(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(&app.pool)
        .await
        .unwrap_or(-1)
}

#[tokio::test]
async fn the_relay_publishes_every_event_once_in_order_as_the_stream_sequence() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let email = unique_email();
    let b = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &email),
        )
        .await;
    assert_eq!(b.status, 201);
    app.book(&staff, venue, room, 18, 20).await;
    let config = config(2);
    let relay = Relay::new(app.pool.clone(), nats().await, config.clone());
    let published = relay
        .publish_pending()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = head(&app).await;
    assert_eq!(published as i64, head);
    assert_eq!(relay.published_position().await.ok(), Some(head));

    let stream = stream_of(&config).await;
    let rows: Vec<(i64, Uuid, String)> =
        sqlx::query_as("SELECT global_position, event_id, stream_id FROM events ORDER BY 1")
            .fetch_all(&app.pool)
            .await
            .unwrap_or_default();
    for (position, event_id, stream_id) in rows {
        let m = stream
            .direct_get(position as u64)
            .await
            .unwrap_or_else(|e| panic!("message {position}: {e}"));
        assert_eq!(m.sequence, position as u64);
        let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
        let msg_id = m.headers.get(async_nats::header::NATS_MESSAGE_ID);
        assert_eq!(
            msg_id.map(|v| v.as_str().to_owned()),
            Some(event_id.to_string())
        );
        assert_eq!(header("Ledger-Position"), Some(position.to_string()));
        let category = stream_id.split('-').next().unwrap_or_default();
        assert_eq!(
            m.subject.as_str(),
            format!("{}.{category}", config.subject_prefix)
        );
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        assert_eq!(body["position"], position);
        assert_eq!(body["event_id"], event_id.to_string());
        let text = String::from_utf8_lossy(&m.payload);
        assert!(!text.contains(&email), "no plaintext personal data in NATS");
        assert!(
            !text.contains("Grace Hopper"),
            "no plaintext personal data in NATS"
        );
    }

    // Nothing new: nothing published. New events: only they are.
    assert_eq!(relay.publish_pending().await.ok(), Some(0));
    app.book(&staff, venue, table, 8, 9).await;
    assert_eq!(relay.publish_pending().await.ok(), Some(1));
    assert_eq!(relay.published_position().await.ok(), Some(head + 1));
    drop_stream(&config).await;
}

#[tokio::test]
async fn two_relays_racing_publish_each_event_exactly_once() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    for h in 0..6 {
        app.book(&staff, venue, table, h, h + 1).await;
    }
    let config = config(3);
    let a = Relay::new(app.pool.clone(), nats().await, config.clone());
    let b = Relay::new(app.pool.clone(), nats().await, config.clone());
    let (ra, rb) = tokio::join!(a.publish_pending(), b.publish_pending());
    let (ra, rb) = (
        ra.unwrap_or_else(|e| panic!("{e}")),
        rb.unwrap_or_else(|e| panic!("{e}")),
    );
    let head = head(&app).await;
    let mut stream = stream_of(&config).await;
    let info = stream.info().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        info.state.messages as i64, head,
        "each event once (a: {ra}, b: {rb})"
    );
    assert_eq!(info.state.last_sequence as i64, head);
    assert!(
        ra + rb >= head as u64,
        "between them they published everything"
    );
}

#[tokio::test]
async fn the_running_relay_follows_the_log_and_standbys_stay_idle() {
    // spawn_app runs the active relay of this database, on the test's own stream.
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    // Two more relays of the same database wait as standbys (on another stream, so that anything
    // they published would show).
    let standby_config = config(100);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let standbys: Vec<_> = futures::future::join_all((0..2).map(|_| nats()))
        .await
        .into_iter()
        .map(|n| {
            tokio::spawn(
                Relay::new(app.pool.clone(), n, standby_config.clone()).run(shutdown.clone()),
            )
        })
        .collect();
    app.book(&staff, venue, table, 18, 20).await;
    let watcher = Relay::new(app.pool.clone(), nats().await, app.relay.clone());
    let head = head(&app).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while watcher.published_position().await.unwrap_or(0) < head {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the active relay did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let standby_stream = jetstream::new(nats().await)
        .get_stream(&standby_config.stream)
        .await;
    assert!(standby_stream.is_err(), "a standby published nothing");
    shutdown.cancel();
    for task in standbys {
        let result = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(
            matches!(result, Ok(Ok(Ok(())))),
            "standbys stop cleanly: {result:?}"
        );
    }
}
