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

#[tokio::test]
async fn a_rewritten_and_rechained_history_passes_verify_but_not_a_saved_checkpoint() {
    let app = spawn_app().await;
    small_log(&app).await;
    let ledger = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(args)
            .env("DATABASE_URL", &app.database_url)
            .env(
                "LEDGER_MASTER_KEY",
                ledger_events::pii::MasterKey::generate().to_base64(),
            )
            .env("RUST_LOG", "error")
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    // An auditor takes a signed checkpoint and keeps it outside the system.
    let signed = ledger(&["replay", "checkpoint"]);
    assert_eq!(
        signed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let auditor = app.token(Role::Auditor);
    let latest = app
        .send(
            app.client
                .get(format!("{}/v1/audit/checkpoints/latest", app.base))
                .bearer_auth(&auditor.0),
        )
        .await;
    assert_eq!(latest.status, 200);
    assert_eq!(latest.body["size"], 6);
    let saved = std::env::temp_dir().join(format!("checkpoint-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&saved, serde_json::to_vec(&latest.body).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}"));
    let saved_arg = saved.to_string_lossy().to_string();
    assert_eq!(
        ledger(&["replay", "verify", "--against", &saved_arg])
            .status
            .code(),
        Some(0)
    );

    // A superuser rewrites event 5 and re-chains it and the head, so the log is self-consistent.
    type Row = (
        uuid::Uuid,
        String,
        i64,
        String,
        i32,
        serde_json::Value,
        serde_json::Value,
        chrono::DateTime<chrono::Utc>,
    );
    let (event_id, stream, version, kind, schema, mut payload, metadata, at): Row = sqlx::query_as(
        "SELECT event_id, stream_id, stream_version, event_type, schema_version, payload, metadata, recorded_at \
         FROM events WHERE global_position = 5",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    payload["party_size"] = json!(9);
    let (prev,): (Vec<u8>,) =
        sqlx::query_as("SELECT entry_hash FROM events WHERE global_position = 4")
            .fetch_one(&app.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let prev: [u8; 32] = prev.try_into().unwrap_or([0; 32]);
    let leaf5 = ledger_events::chain::leaf_hash(&ledger_events::chain::HashedRow {
        global_position: 5,
        event_id,
        stream_id: &stream,
        stream_version: version,
        event_type: &kind,
        schema_version: schema,
        payload: &payload,
        metadata: &metadata,
        recorded_at: at,
    });
    let entry5 = ledger_events::chain::entry_hash(&prev, &leaf5);
    let (leaf6,): (Vec<u8>,) =
        sqlx::query_as("SELECT leaf_hash FROM events WHERE global_position = 6")
            .fetch_one(&app.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let entry6 = ledger_events::chain::entry_hash(&entry5, &leaf6.try_into().unwrap_or([0; 32]));
    as_superuser(
        &app,
        &format!(
            "UPDATE events SET payload = '{}'::jsonb, leaf_hash = '\\x{}', entry_hash = '\\x{}' WHERE global_position = 5",
            payload, hex::encode(leaf5), hex::encode(entry5)
        ),
    )
    .await;
    as_superuser(
        &app,
        &format!(
            "UPDATE events SET entry_hash = '\\x{}' WHERE global_position = 6",
            hex::encode(entry6)
        ),
    )
    .await;
    as_superuser(
        &app,
        &format!(
            "UPDATE log_head SET entry_hash = '\\x{}'",
            hex::encode(entry6)
        ),
    )
    .await;

    // The chain alone cannot tell...
    assert_eq!(verify(&app).await.body["intact"], true);
    // ...the saved checkpoint can.
    let caught = ledger(&["replay", "verify", "--against", &saved_arg]);
    assert_eq!(caught.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&caught.stdout).unwrap_or_default();
    assert_eq!(report["consistent"], false, "{report}");
    let _ = std::fs::remove_file(&saved);
}
