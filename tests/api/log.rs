use crate::helpers::*;
use chrono::{DateTime, Utc};
use ledger::http::auth::Role;
use ledger_events::chain::{entry_hash, leaf_hash, HashedRow, GENESIS_HASH};
use serde_json::Value;
use uuid::Uuid;

type Row = (
    i64,
    Uuid,
    String,
    i64,
    String,
    i32,
    Value,
    Value,
    DateTime<Utc>,
    Vec<u8>,
    Vec<u8>,
);

#[tokio::test]
async fn the_log_is_gapless_and_hash_chained_and_every_event_names_its_cause() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let b = app.book(&staff, venue, table, 18, 20).await;
    assert_eq!(b.status, 201);
    let confirm = app
        .post(
            &format!("/v1/bookings/{}/confirm", b.id()),
            &staff,
            serde_json::json!({}),
        )
        .await;
    assert_eq!(confirm.status, 200, "{confirm:?}");
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT global_position, event_id, stream_id, stream_version, event_type, schema_version, \
         payload, metadata, recorded_at, leaf_hash, entry_hash FROM events ORDER BY global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap_or_default();
    assert_eq!(rows.len(), 5);
    let mut prev = GENESIS_HASH;
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.0, i as i64 + 1, "positions are gapless");
        let leaf = leaf_hash(&HashedRow {
            global_position: r.0,
            event_id: r.1,
            stream_id: &r.2,
            stream_version: r.3,
            event_type: &r.4,
            schema_version: r.5,
            payload: &r.6,
            metadata: &r.7,
            recorded_at: r.8,
        });
        assert_eq!(
            leaf.as_slice(),
            r.9.as_slice(),
            "leaf hash of position {}",
            r.0
        );
        prev = entry_hash(&prev, &leaf);
        assert_eq!(
            prev.as_slice(),
            r.10.as_slice(),
            "entry hash of position {}",
            r.0
        );
        for key in [
            "actor",
            "role",
            "command",
            "request_id",
            "correlation_id",
            "causation_id",
        ] {
            assert!(!r.7[key].is_null(), "metadata.{key} of position {}", r.0);
        }
    }
    let head: (i64, Vec<u8>) = sqlx::query_as("SELECT position, entry_hash FROM log_head")
        .fetch_one(&app.pool)
        .await
        .unwrap_or_default();
    assert_eq!(head, (5, prev.to_vec()));
    assert_eq!(rows[4].4, "BookingConfirmed");
    assert_eq!(rows[4].7["command"], "ConfirmBooking");
    assert_eq!(rows[4].3, 2, "second event of the booking stream");
}

#[tokio::test]
async fn the_log_refuses_update_delete_and_truncate() {
    let app = spawn_app().await;
    app.venue().await;
    for sql in [
        "UPDATE events SET event_type = 'Forged' WHERE global_position = 1",
        "DELETE FROM events WHERE global_position = 1",
        "TRUNCATE events",
    ] {
        let err = sqlx::query(sql).execute(&app.pool).await;
        let message = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("append-only"), "{sql}: {message}");
    }
    assert_eq!(app.count_all_events().await, 3);
}

/// The writer sends a batch behind the one still running, planned on the head that one leaves.
/// If that one is refused, the head stays where it was, and another process may even move it to
/// the position the plan assumed with other events: `append_batch` then refuses the plan as
/// stale by the head's entry hash, having written nothing.
#[tokio::test]
async fn a_batch_planned_on_the_heads_position_but_not_its_hash_is_refused_as_stale() {
    let app = spawn_app().await;
    app.venue().await;
    let (position, hash): (i64, Vec<u8>) =
        sqlx::query_as("SELECT position, entry_hash FROM log_head")
            .fetch_one(&app.pool)
            .await
            .expect("head");
    let mut other = hash.clone();
    other[0] ^= 1;
    let call = "SELECT outcome FROM append_batch($1, $2, '{}', '{}', $1 + 1, $3, now(), '{}', \
                '{}', '{}', '{}', '{}', ARRAY[$1 + 1], ARRAY[$4::uuid], ARRAY['forged-' || $4], \
                ARRAY[1::bigint], ARRAY['Forged'], ARRAY[1], ARRAY['{}'::jsonb], \
                ARRAY['{}'::jsonb], ARRAY[now()], ARRAY[$3], ARRAY[$3], '{}', '{}', '{}', '{}', \
                '{}', '{}', '{}')";
    for (base, expected) in [(&other, "stale"), (&hash, "appended")] {
        let before = app.count_all_events().await;
        let (outcome,): (String,) = sqlx::query_as(call)
            .bind(position)
            .bind(base)
            .bind(vec![7u8; 32])
            .bind(Uuid::now_v7())
            .fetch_one(&app.pool)
            .await
            .expect("append_batch");
        assert_eq!(
            outcome, expected,
            "extending the head with hash {base:02x?}"
        );
        let written = app.count_all_events().await - before;
        assert_eq!(written, i64::from(expected == "appended"));
    }
}
