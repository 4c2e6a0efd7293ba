//! Tamper tests: a superuser edits the log behind the trigger's back; verify names where.

use crate::helpers::*;
use ledger::http::auth::Role;
use ledger_events::chain::{entry_hash, leaf_hash, HashedRow, GENESIS_HASH};
use ledger_events::checkpoint::Checkpoint;
use serde_json::{json, Value};

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

/// Runs the `ledger` binary against the test's database with the app's master key.
fn ledger(app: &TestApp, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(args)
        .env("DATABASE_URL", &app.database_url)
        .env("LEDGER_MASTER_KEY", &app.master_key)
        .env("RUST_LOG", "error")
        .output()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// An auditor's copy of a checkpoint, outside the system; removed on drop.
struct Saved(std::path::PathBuf);

impl Saved {
    fn new(checkpoint: &Value) -> Saved {
        let path = std::env::temp_dir().join(format!("checkpoint-{}.json", uuid::Uuid::new_v4()));
        std::fs::write(&path, serde_json::to_vec(checkpoint).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        Saved(path)
    }

    fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The ledger signs a checkpoint now (`ledger replay checkpoint`); the auditor keeps the JSON.
fn sign_checkpoint(app: &TestApp) -> Value {
    let out = ledger(app, &["replay", "checkpoint"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"))
}

/// `ledger replay verify --against` (plus `extra` flags): (exit code, report, stderr).
fn verify_against(app: &TestApp, saved: &Saved, extra: &[&str]) -> (Option<i32>, Value, String) {
    let file = saved.arg();
    let mut args = vec!["replay", "verify", "--against", &file];
    args.extend_from_slice(extra);
    let out = ledger(app, &args);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A careful superuser's forgery: edits the payload at `position`, then recomputes its leaf hash,
/// every later entry hash and the head, so the chain verifies again.
async fn rewrite_and_rechain(app: &TestApp, position: i64, edit: impl FnOnce(&mut Value)) {
    type Row = (
        i64,
        uuid::Uuid,
        String,
        i64,
        String,
        i32,
        Value,
        Value,
        chrono::DateTime<chrono::Utc>,
        Vec<u8>,
    );
    let mut rows: Vec<Row> = sqlx::query_as(
        "SELECT global_position, event_id, stream_id, stream_version, event_type, schema_version, \
         payload, metadata, recorded_at, leaf_hash FROM events WHERE global_position >= $1 \
         ORDER BY global_position",
    )
    .bind(position)
    .fetch_all(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let prev: Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT entry_hash FROM events WHERE global_position = $1")
            .bind(position - 1)
            .fetch_optional(&app.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let mut chain: [u8; 32] = prev
        .and_then(|(h,)| h.try_into().ok())
        .unwrap_or(GENESIS_HASH);
    let Some(first) = rows.first_mut() else {
        panic!("no event at {position}");
    };
    edit(&mut first.6);
    let (at, event_id, stream, version, kind, schema, payload, metadata, recorded_at, _) = first;
    let leaf = leaf_hash(&HashedRow {
        global_position: *at,
        event_id: *event_id,
        stream_id: stream,
        stream_version: *version,
        event_type: kind,
        schema_version: *schema,
        payload,
        metadata,
        recorded_at: *recorded_at,
    });
    first.9 = leaf.to_vec();
    as_superuser(
        app,
        &format!(
            "UPDATE events SET payload = '{}'::jsonb, leaf_hash = '\\x{}' WHERE global_position = {position}",
            first.6.to_string().replace('\'', "''"),
            hex::encode(leaf)
        ),
    )
    .await;
    for row in &rows {
        chain = entry_hash(&chain, &row.9.clone().try_into().unwrap_or([0; 32]));
        as_superuser(
            app,
            &format!(
                "UPDATE events SET entry_hash = '\\x{}' WHERE global_position = {}",
                hex::encode(chain),
                row.0
            ),
        )
        .await;
    }
    as_superuser(
        app,
        &format!(
            "UPDATE log_head SET entry_hash = '\\x{}'",
            hex::encode(chain)
        ),
    )
    .await;
}

#[tokio::test]
async fn a_rewritten_and_rechained_history_passes_verify_but_not_a_saved_checkpoint() {
    let app = spawn_app().await;
    small_log(&app).await;
    // An auditor takes a signed checkpoint and keeps it outside the system.
    sign_checkpoint(&app);
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
    let saved = Saved::new(&latest.body);
    let (code, report, stderr) = verify_against(&app, &saved, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["against"]["consistent"], true, "{report}");
    assert_eq!(report["against"]["key_source"], "published");
    // The same size: the proof from 6 to 6 is empty, and the roots are equal.
    assert_eq!(report["against"]["current_size"], 6);
    assert_eq!(report["against"]["consistency_path"], json!([]));
    assert_eq!(
        report["against"]["current_root"],
        latest.body["merkle_root"]
    );

    // A superuser rewrites event 5 and re-chains it, the tail and the head: self-consistent.
    rewrite_and_rechain(&app, 5, |payload| payload["party_size"] = json!(9)).await;

    // The chain alone cannot tell...
    assert_eq!(verify(&app).await.body["intact"], true);
    // ...the saved checkpoint can.
    let (code, report, stderr) = verify_against(&app, &saved, &[]);
    assert_eq!(code, Some(1));
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["against"]["consistent"], false, "{report}");
    assert_eq!(report["against"]["failed"], "consistency_proof", "{report}");
    assert!(
        stderr.contains("consistency proof check failed"),
        "{stderr}"
    );
}

#[tokio::test]
async fn truncating_the_tail_and_rechaining_the_head_is_caught_by_the_consistency_proof() {
    let app = spawn_app().await;
    small_log(&app).await;
    let checkpoint = sign_checkpoint(&app);
    assert_eq!(checkpoint["size"], 6);
    let saved = Saved::new(&checkpoint);

    // The log grows honestly: the proof from 6 to 9 verifies.
    app.venue().await;
    let (code, report, stderr) = verify_against(&app, &saved, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["against"]["current_size"], 9);
    assert!(report["against"]["consistency_path"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));

    // A superuser drops everything after position 4 and points the head at 4: the chain that
    // is left is intact.
    as_superuser(&app, "DELETE FROM events WHERE global_position > 4").await;
    as_superuser(
        &app,
        "UPDATE log_head SET position = 4, \
         entry_hash = (SELECT entry_hash FROM events WHERE global_position = 4)",
    )
    .await;
    let v = verify(&app).await;
    assert_eq!(
        (v.body["intact"].clone(), v.body["head"].clone()),
        (json!(true), json!(4))
    );
    let (code, report, stderr) = verify_against(&app, &saved, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["against"]["failed"], "truncated", "{report}");
    assert_eq!(report["against"]["first_broken_position"], 5, "{report}");
    assert!(stderr.contains("first broken position 5"), "{stderr}");

    // New events fill the log past the checkpoint's size again, chained from the forged head:
    // the chain verifies, the size is back, and only the proof can tell.
    app.venue().await;
    let v = verify(&app).await;
    assert_eq!(
        (v.body["intact"].clone(), v.body["head"].clone()),
        (json!(true), json!(7))
    );
    let (code, report, stderr) = verify_against(&app, &saved, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["against"]["failed"], "consistency_proof", "{report}");
    assert_eq!(report["against"]["current_size"], 7);
    assert!(stderr.contains("consistency proof"), "{stderr}");

    // An outside auditor sees the same from the API alone: the ledger signs the forged log, and
    // the proof from the saved checkpoint to that one does not verify against the saved root.
    let now: Checkpoint =
        serde_json::from_value(sign_checkpoint(&app)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(now.verify_signature(), Ok(()));
    let auditor = app.token(Role::Auditor);
    let proof = app
        .send(
            app.client
                .get(format!("{}/v1/audit/proofs/consistency", app.base))
                .query(&[("first", "6"), ("second", "7")])
                .bearer_auth(&auditor.0),
        )
        .await;
    assert_eq!(proof.status, 200, "{proof:?}");
    let path: Vec<[u8; 32]> = hashes(&proof.body["consistency_path"]);
    let root = |hex_root: &str| -> [u8; 32] {
        hex::decode(hex_root)
            .ok()
            .and_then(|b| b.try_into().ok())
            .unwrap_or_else(|| panic!("{hex_root}"))
    };
    let saved_root = root(checkpoint["merkle_root"].as_str().unwrap_or_default());
    assert!(ledger_events::chain::verify_consistency(
        6,
        7,
        &saved_root,
        &root(&now.merkle_root),
        &path
    )
    .is_err());
}

fn hashes(v: &Value) -> Vec<[u8; 32]> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|h| {
            h.as_str()
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| b.try_into().ok())
                .unwrap_or_else(|| panic!("not a hash: {h}"))
        })
        .collect()
}

#[tokio::test]
async fn a_rewrite_after_the_saved_checkpoint_is_caught_by_the_ledgers_later_one() {
    let app = spawn_app().await;
    small_log(&app).await;
    let saved = Saved::new(&sign_checkpoint(&app));
    app.venue().await;
    // The ledger signs again at 9; the auditor still holds only the checkpoint of 6.
    assert_eq!(sign_checkpoint(&app)["size"], 9);
    let (code, report, stderr) = verify_against(&app, &saved, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["against"]["latest_checkpoint_size"], 9, "{report}");

    // Event 8 is after what the auditor saved, but the ledger signed it too.
    rewrite_and_rechain(&app, 8, |payload| payload["name"] = json!("Forged")).await;
    assert_eq!(verify(&app).await.body["intact"], true);
    let (code, report, stderr) = verify_against(&app, &saved, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["against"]["failed"], "latest_checkpoint", "{report}");
    assert!(stderr.contains("positions 7..=9"), "{stderr}");
}

#[tokio::test]
async fn a_checkpoint_that_is_not_the_ledgers_own_is_refused() {
    let app = spawn_app().await;
    small_log(&app).await;
    let genuine = sign_checkpoint(&app);
    let key = genuine["public_key"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // Edited after signing.
    let mut edited = genuine.clone();
    edited["size"] = json!(5);
    let (code, report, stderr) = verify_against(&app, &Saved::new(&edited), &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["against"]["failed"], "signature", "{report}");
    assert!(stderr.contains("signature check failed"), "{stderr}");

    // Validly signed, with the log's true root, but by a key that is not the ledger's.
    let cp: Checkpoint = serde_json::from_value(genuine.clone()).unwrap_or_else(|e| panic!("{e}"));
    let root: [u8; 32] = hex::decode(&cp.merkle_root)
        .ok()
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; 32]);
    let entry: [u8; 32] = hex::decode(&cp.entry_hash)
        .ok()
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; 32]);
    let forged = ledger_events::checkpoint::sign(
        &ledger_events::checkpoint::signing_key(&[9; 32]),
        cp.size,
        &root,
        &entry,
        cp.created_at,
    );
    assert_eq!(forged.verify_signature(), Ok(()));
    let forged = Saved::new(&serde_json::to_value(&forged).unwrap_or_default());
    let (code, report, _) = verify_against(&app, &forged, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["against"]["failed"], "public_key", "{report}");
    assert_eq!(report["against"]["public_key"], key.as_str());
    // The genuine one, under the key the auditor pinned, and under another.
    let genuine = Saved::new(&genuine);
    let (code, report, _) = verify_against(&app, &genuine, &["--public-key", &key]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["against"]["key_source"], "pinned");
    let other = hex::encode(
        ledger_events::checkpoint::signing_key(&[9; 32])
            .verifying_key()
            .to_bytes(),
    );
    let (code, report, _) = verify_against(&app, &genuine, &["--public-key", &other]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["against"]["failed"], "public_key", "{report}");
    // Not a key at all: a usage error.
    let (code, _, stderr) = verify_against(&app, &genuine, &["--public-key", "abc"]);
    assert_eq!(code, Some(2), "{stderr}");
}
