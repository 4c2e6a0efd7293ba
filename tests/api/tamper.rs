//! Tamper tests: a superuser edits the log behind the trigger's back; verify names where.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::json;

async fn verify(app: &TestApp) -> Answer {
    let auditor = app.token(Role::Auditor);
    app.send(
        app.client
            .get(format!("{}/v1/audit/verify", app.base))
            .bearer_auth(&auditor.0),
    )
    .await
}

/// Runs SQL as a superuser with triggers off (`session_replication_role = replica`), which is
/// exactly what an attacker with database access could do.
async fn as_superuser(app: &TestApp, sql: &str) {
    let mut conn = app.pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(sql)
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    sqlx::query("SET session_replication_role = origin")
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A small log: a venue with two resources, two bookings, one confirmed.
async fn small_log(app: &TestApp) -> (Answer, Answer) {
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let a = app.book(&staff, venue, table, 18, 20).await;
    let b = app.book(&staff, venue, room, 18, 20).await;
    app.post(
        &format!("/v1/bookings/{}/confirm", a.id()),
        &staff,
        json!({}),
    )
    .await;
    (a, b)
}

#[tokio::test]
async fn an_intact_log_verifies_and_only_auditors_and_admins_may_ask() {
    let app = spawn_app().await;
    small_log(&app).await;
    let v = verify(&app).await;
    assert_eq!(v.status, 200, "{v:?}");
    assert_eq!(v.body["intact"], true);
    assert_eq!(v.body["checked"], 6);
    assert_eq!(v.body["head"], 6);
    assert_eq!(v.body["first_broken_position"], serde_json::Value::Null);
    let staff = app.token(Role::Staff);
    let refused = app
        .send(
            app.client
                .get(format!("{}/v1/audit/verify", app.base))
                .bearer_auth(&staff.0),
        )
        .await;
    assert_eq!((refused.status, refused.problem()), (403, "forbidden"));
}

#[tokio::test]
async fn flipping_one_payload_value_is_caught_at_its_position() {
    let app = spawn_app().await;
    let (a, _) = small_log(&app).await;
    let at = a.body["position"].as_i64().unwrap_or(0);
    as_superuser(
        &app,
        &format!("UPDATE events SET payload = jsonb_set(payload, '{{party_size}}', '4') WHERE global_position = {at}"),
    )
    .await;
    let v = verify(&app).await;
    assert_eq!(v.body["intact"], false);
    assert_eq!(v.body["first_broken_position"], at);
    assert_eq!(v.body["checked"], at - 1);
}

#[tokio::test]
async fn deleting_a_row_is_caught_as_a_gap() {
    let app = spawn_app().await;
    small_log(&app).await;
    as_superuser(&app, "DELETE FROM events WHERE global_position = 2").await;
    let v = verify(&app).await;
    assert_eq!(
        (
            v.body["intact"].clone(),
            v.body["first_broken_position"].clone()
        ),
        (json!(false), json!(2))
    );
}

#[tokio::test]
async fn swapping_two_sealed_envelopes_is_caught_by_verify() {
    let app = spawn_app().await;
    let (a, b) = small_log(&app).await;
    let (pa, pb) = (
        a.body["position"].as_i64().unwrap_or(0),
        b.body["position"].as_i64().unwrap_or(0),
    );
    as_superuser(
        &app,
        &format!(
            "UPDATE events e SET payload = jsonb_set(e.payload, '{{customer}}', o.payload->'customer') \
             FROM events o WHERE (e.global_position, o.global_position) IN (({pa}, {pb}), ({pb}, {pa}))"
        ),
    )
    .await;
    let v = verify(&app).await;
    assert_eq!(
        (
            v.body["intact"].clone(),
            v.body["first_broken_position"].clone()
        ),
        (json!(false), json!(pa))
    );
    // The envelope now in booking a's event still names booking b's subject: it was sealed for
    // b's stream, so it will not open in a's (the associated data binds the stream; see the
    // `pii` unit tests).
    let (payload, stream): (serde_json::Value, String) =
        sqlx::query_as("SELECT payload, stream_id FROM events WHERE global_position = $1")
            .bind(pa)
            .fetch_one(&app.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let sealed: ledger_events::pii::Sealed =
        serde_json::from_value(payload["customer"].clone()).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(stream, b.body["stream"].as_str().unwrap_or_default());
    assert_eq!(
        sealed.sub.to_string(),
        b.body["subject_id"].as_str().unwrap_or_default()
    );
}

#[tokio::test]
async fn a_head_that_does_not_match_the_log_is_caught() {
    let app = spawn_app().await;
    small_log(&app).await;
    as_superuser(&app, "UPDATE log_head SET position = position + 1").await;
    let v = verify(&app).await;
    assert_eq!(v.body["intact"], false);
    assert_eq!(v.body["first_broken_position"], 7);
}

#[tokio::test]
async fn ledger_replay_verify_exits_0_when_intact_and_1_naming_the_break() {
    let app = spawn_app().await;
    small_log(&app).await;
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(["replay", "verify"])
            .env("DATABASE_URL", &app.database_url)
            .env("RUST_LOG", "error")
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let ok = run();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap_or_default();
    assert_eq!(report["intact"], true);
    as_superuser(&app, "UPDATE events SET metadata = jsonb_set(metadata, '{actor}', '\"mallory\"') WHERE global_position = 3").await;
    let broken = run();
    assert_eq!(broken.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&broken.stdout).unwrap_or_default();
    assert_eq!(report["first_broken_position"], 3);
    assert!(String::from_utf8_lossy(&broken.stderr).contains("position 3"));
}
