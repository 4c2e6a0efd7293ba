//! `/metrics`: HTTP requests by route template (never the raw path or query) and status class, a
//! latency histogram, and the relay's position read from the configured stream
//! (`LEDGER_NATS_STREAM`), not a hard-coded name.

use crate::helpers::*;
use ledger::http::auth::Role;
use std::time::Duration;
use uuid::Uuid;

async fn metrics(app: &TestApp) -> String {
    app.client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default()
}

/// The value of the sample `series` (name and labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn http_requests_are_counted_by_route_template_and_status_class() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let email = unique_email();
    let b = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &email),
        )
        .await;
    assert_eq!(b.status, 201, "{b:?}");
    let id = b.id();
    let at = b.body["position"].as_i64().unwrap_or(-1);
    let get = |path: String| {
        app.send(
            app.client
                .get(format!("{}{path}", app.base))
                .bearer_auth(&staff.0),
        )
    };
    for _ in 0..3 {
        assert_eq!(
            get(format!("/v1/bookings/{id}?min_position={at}"))
                .await
                .status,
            200
        );
    }
    let missing = Uuid::new_v4();
    assert_eq!(get(format!("/v1/bookings/{missing}")).await.status, 404);
    // A path no route matches, with personal data in it and in its query.
    let probe = Uuid::new_v4();
    assert_eq!(
        get(format!("/v1/no-such/{probe}?email={email}"))
            .await
            .status,
        404
    );

    let text = metrics(&app).await;
    let series = |method: &str, route: &str, status: &str| {
        format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"")
    };
    let detail_ok = series("GET", "/v1/bookings/{id}", "2xx");
    assert_eq!(
        sample(&text, &format!("ledger_http_requests_total{{{detail_ok}}}")),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "ledger_http_requests_total{{{}}}",
                series("GET", "/v1/bookings/{id}", "4xx")
            )
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "ledger_http_requests_total{{{}}}",
                series("POST", "/v1/bookings", "2xx")
            )
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "ledger_http_requests_total{{{}}}",
                series("POST", "/v1/venues/{venue_id}/resources", "2xx")
            )
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "ledger_http_requests_total{{{}}}",
                series("GET", "unmatched", "4xx")
            )
        ),
        Some(1.0),
        "{text}"
    );
    // The histogram: cumulative buckets ending in +Inf, which equals the count; a sum.
    assert!(text.contains("# TYPE ledger_http_request_duration_seconds histogram"));
    let bucket = |le: &str| {
        sample(
            &text,
            &format!("ledger_http_request_duration_seconds_bucket{{{detail_ok},le=\"{le}\"}}"),
        )
    };
    assert_eq!(bucket("+Inf"), Some(3.0), "{text}");
    let (small, large) = (bucket("0.001"), bucket("10"));
    assert!(
        small.is_some() && small <= large && large <= Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("ledger_http_request_duration_seconds_count{{{detail_ok}}}")
        ),
        Some(3.0)
    );
    let sum = sample(
        &text,
        &format!("ledger_http_request_duration_seconds_sum{{{detail_ok}}}"),
    );
    assert!(sum.is_some_and(|s| s > 0.0 && s < 30.0), "{text}");
    // Never the raw path or query: no id, no email, no unmatched path.
    for leak in [
        id.to_string(),
        missing.to_string(),
        probe.to_string(),
        email.clone(),
        "no-such".into(),
        "min_position".into(),
    ] {
        assert!(!text.contains(&leak), "/metrics holds {leak:?}:\n{text}");
    }
}

#[tokio::test]
async fn the_relay_position_is_read_from_the_configured_stream() {
    // The API's own NATS client, configured with this test's stream (not `LEDGER`).
    let app = spawn_with(Spawn {
        read_side: true,
        nats: true,
        ..Spawn::default()
    })
    .await;
    assert_ne!(app.stream, "LEDGER");
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let b = app.book(&staff, venue, table, 18, 20).await;
    let at = b.body["position"].as_i64().unwrap_or(-1);
    assert!(at > 0, "{b:?}");
    let published = format!(
        "ledger_relay_published_position{{stream=\"{}\"}}",
        app.stream
    );
    let lag = format!("ledger_relay_lag_positions{{stream=\"{}\"}}", app.stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(&app).await;
        if sample(&text, &published) == Some(at as f64) {
            assert_eq!(sample(&text, &lag), Some(0.0), "{text}");
            assert_eq!(sample(&text, "ledger_log_head_position"), Some(at as f64));
            assert!(!text.contains("stream=\"LEDGER\""), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay's position in {} never reached {at}:\n{text}",
            app.stream
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The append writer's time is reported whole and in parts: its statements and its planning
/// are each part of the batch time, and every booking shows up as a command and its events.
#[tokio::test]
async fn the_append_writer_reports_where_its_time_goes() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    for hour in [8, 10, 12] {
        let b = app
            .post(
                "/v1/bookings",
                &staff,
                booking_body(venue, table, hour, hour + 2, &unique_email()),
            )
            .await;
        assert_eq!(b.status, 201, "{b:?}");
    }
    let text = metrics(&app).await;
    let value = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name} in {text}"));
    let (batches, commands, events) = (
        value("ledger_append_batches_total"),
        value("ledger_append_commands_total"),
        value("ledger_append_events_total"),
    );
    // The venue, its resource and the three bookings at least; one batch per command at most.
    assert!(commands >= 5.0 && events >= commands, "{text}");
    assert!(batches >= 1.0 && batches <= commands, "{text}");
    let batch = value("ledger_append_batch_seconds_total");
    let database = value("ledger_append_database_seconds_total");
    let planning = value("ledger_append_planning_seconds_total");
    assert!(database > 0.0 && planning > 0.0, "{text}");
    assert!(database + planning <= batch + 1e-6, "{text}");
    assert!(value("ledger_append_gathering_seconds_total") >= 0.0);
    // Commands one after another may leave nothing to plan ahead; the counters are there.
    let ahead = value("ledger_append_batches_planned_ahead_total");
    assert!((0.0..=batches).contains(&ahead), "{text}");
    let sent = value("ledger_append_batches_sent_ahead_total");
    assert!((0.0..=ahead).contains(&sent), "{text}");
    assert!(value("ledger_append_plans_dropped_total") >= 0.0, "{text}");
    assert!(
        value("ledger_append_planning_ahead_seconds_total") <= database,
        "{text}"
    );
}
