//! The live board over server-sent events.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::{json, Value};
use std::time::Duration;

/// One server-sent event: its `id:` and its JSON data.
#[derive(Debug)]
struct Sse {
    id: i64,
    data: Value,
}

/// Reads events from an open SSE response until `want` of them arrived (bounded in time).
async fn read_events(resp: &mut reqwest::Response, buffer: &mut String, want: usize) -> Vec<Sse> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.len() < want {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut id = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if let (Some(id), Ok(data)) = (id, serde_json::from_str(&data)) {
                events.push(Sse { id, data });
            }
        }
        if events.len() >= want {
            break;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buffer.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!(
                "live stream ended or stalled with {} events: {other:?}",
                events.len()
            ),
        }
    }
    events
}

async fn open(
    app: &TestApp,
    token: &Token,
    query: &str,
    last_event_id: Option<i64>,
) -> reqwest::Response {
    let mut req = app
        .client
        .get(format!("{}/v1/live?{query}", app.base))
        .bearer_auth(&token.0);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    req.send().await.unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn the_live_board_sends_each_change_and_resumes_from_last_event_id() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let door = app.token(Role::Door);
    let staff = app.token(Role::Staff);
    let mut live = open(&app, &door, &format!("venue_id={venue}"), None).await;
    assert_eq!(live.status(), 200);
    assert_eq!(
        live.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut buffer = String::new();

    let b = app.book(&staff, venue, table, 18, 20).await;
    let created = read_events(&mut live, &mut buffer, 1).await;
    assert_eq!(created[0].id, b.body["position"].as_i64().unwrap_or(-1));
    assert_eq!(created[0].data["id"], b.body["id"]);
    assert_eq!(created[0].data["status"], "pending");
    assert_eq!(created[0].data["customer"]["name"], "Grace Hopper");

    let c = app
        .post(
            &format!("/v1/bookings/{}/confirm", b.id()),
            &staff,
            json!({}),
        )
        .await;
    let confirmed = read_events(&mut live, &mut buffer, 1).await;
    assert_eq!(confirmed[0].id, c.body["position"].as_i64().unwrap_or(-1));
    assert_eq!(confirmed[0].data["status"], "confirmed");
    drop(live);

    // Away while two more changes happen; resuming from the last id seen loses nothing.
    let other = app.book(&staff, venue, table, 8, 9).await;
    let checked = app
        .post(
            &format!("/v1/bookings/{}/check-in", b.id()),
            &door,
            json!({}),
        )
        .await;
    assert_eq!(checked.status, 200);
    let mut resumed = open(
        &app,
        &door,
        &format!("venue_id={venue}"),
        Some(confirmed[0].id),
    )
    .await;
    let mut buffer = String::new();
    let caught_up = read_events(&mut resumed, &mut buffer, 2).await;
    let ids: Vec<&Value> = caught_up.iter().map(|e| &e.data["id"]).collect();
    assert!(
        ids.contains(&&other.body["id"]) && ids.contains(&&b.body["id"]),
        "{caught_up:?}"
    );
    let latest = caught_up
        .iter()
        .find(|e| e.data["id"] == b.body["id"])
        .map(|e| &e.data["status"]);
    assert_eq!(latest, Some(&json!("checked_in")));
    assert!(
        caught_up.windows(2).all(|w| w[0].id < w[1].id),
        "in position order"
    );
}

#[tokio::test]
async fn the_live_board_checks_roles_scope_and_parameters() {
    let app = spawn_app().await;
    let (venue, _, _) = app.venue().await;
    let (other, _, _) = app.venue().await;
    let customer = app.token_with(Role::Customer, Some(uuid::Uuid::new_v4()), None);
    assert_eq!(
        open(&app, &customer, &format!("venue_id={venue}"), None)
            .await
            .status(),
        403
    );
    let door = app.token(Role::Door);
    assert_eq!(open(&app, &door, "", None).await.status(), 400);
    assert_eq!(open(&app, &door, "venue_id=nope", None).await.status(), 400);
    let scoped = app.token_with(Role::Staff, None, Some(vec![venue]));
    assert_eq!(
        open(&app, &scoped, &format!("venue_id={other}"), None)
            .await
            .status(),
        404
    );
    let bad_resume = app
        .send(
            app.client
                .get(format!("{}/v1/live?venue_id={venue}", app.base))
                .header("Last-Event-ID", "yesterday")
                .bearer_auth(&door.0),
        )
        .await;
    assert_eq!(
        (bad_resume.status, bad_resume.problem()),
        (400, "validation")
    );
}

#[tokio::test]
async fn readiness_and_metrics_report_projection_lag() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let b = app.book(&staff, venue, table, 18, 20).await;
    let at = b.body["position"].as_i64().unwrap_or(-1);
    // Wait through a query, then the projection has caught up with this position.
    let seen = app
        .send(
            app.client
                .get(format!(
                    "{}/v1/bookings/{}?min_position={at}",
                    app.base,
                    b.id()
                ))
                .bearer_auth(&staff.0),
        )
        .await;
    assert_eq!(seen.status, 200);
    let ready = app
        .send(app.client.get(format!("{}/health/ready", app.base)))
        .await;
    assert!(
        ready.body["projections"]["booking_board"]["checkpoint"].as_i64() >= Some(at),
        "{ready:?}"
    );
    assert_eq!(ready.body["checks"]["postgres"], true);
    assert_eq!(ready.body["checks"]["projections"], true);
    // The test app runs without a NATS client of its own, so it is not ready: say so.
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["checks"]["nats"], false);
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let text = metrics.text().await.unwrap_or_default();
    assert!(
        text.contains("ledger_projection_lag_positions{projection=\"booking_board\"}"),
        "{text}"
    );
    assert!(text.contains("ledger_log_head_position"), "{text}");
}
