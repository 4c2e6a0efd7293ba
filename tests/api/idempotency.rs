//! `Idempotency-Key`: a retry gets the first answer and appends nothing; another body under the
//! same key is refused; keys belong to their caller.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::json;
use uuid::Uuid;

fn key() -> String {
    format!("key-{}", Uuid::new_v4())
}

fn assert_same(first: &Answer, again: &Answer) {
    assert_eq!(again.status, first.status, "{again:?}");
    assert_eq!(again.body, first.body, "the stored answer, verbatim");
    for header in ["etag", "x-ledger-position"] {
        assert_eq!(again.header(header), first.header(header), "{header}");
    }
}

#[tokio::test]
async fn the_same_key_and_body_replays_the_first_answer_and_appends_nothing() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let key = key();
    let body = booking_body(venue, table, 18, 20, &unique_email());
    let first = app
        .post_with(
            "/v1/bookings",
            &staff,
            body.clone(),
            &[("idempotency-key", &key)],
        )
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    let all = app.count_all_events().await;
    for _ in 0..3 {
        let again = app
            .post_with(
                "/v1/bookings",
                &staff,
                body.clone(),
                &[("idempotency-key", &key)],
            )
            .await;
        assert_same(&first, &again);
        assert_eq!(again.id(), first.id());
    }
    assert_eq!(
        app.count_all_events().await,
        all,
        "not even an audit record"
    );
    assert_eq!(app.count_events("BookingRequested").await, 1);
}

#[tokio::test]
async fn a_retried_lifecycle_command_answers_as_the_first_time() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let key = key();
    let path = format!("/v1/bookings/{booking}/confirm");
    let first = app
        .post_with(&path, &staff, json!({}), &[("idempotency-key", &key)])
        .await;
    assert_eq!(first.status, 200, "{first:?}");
    // Without the key a second confirm is refused; with it, it is the same success.
    let again = app
        .post_with(&path, &staff, json!({}), &[("idempotency-key", &key)])
        .await;
    assert_same(&first, &again);
    assert_eq!(app.count_events("BookingConfirmed").await, 1);
    app.refused(app.confirm(&staff, booking), 409, "invalid-transition")
        .await;
}

#[tokio::test]
async fn the_same_key_with_another_request_is_422_idempotency_key_reuse() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let key = key();
    let first = app
        .post_with(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &unique_email()),
            &[("idempotency-key", &key)],
        )
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    app.refused(
        app.post_with(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 10, 12, &unique_email()),
            &[("idempotency-key", &key)],
        ),
        422,
        "idempotency-key-reuse",
    )
    .await;
    // Another route under the same key is another request too.
    app.refused(
        app.post_with(
            &format!("/v1/bookings/{}/confirm", first.id()),
            &staff,
            json!({}),
            &[("idempotency-key", &key)],
        ),
        422,
        "idempotency-key-reuse",
    )
    .await;
    assert_eq!(app.count_events("BookingRequested").await, 1);
}

#[tokio::test]
async fn the_same_key_from_another_caller_is_independent() {
    let app = spawn_app().await;
    let key = key();
    let body = json!({"name": "Twin", "timezone": "Europe/Berlin"});
    let (alice, bob) = (app.token(Role::Admin), app.token(Role::Admin));
    let a = app
        .post_with(
            "/v1/venues",
            &alice,
            body.clone(),
            &[("idempotency-key", &key)],
        )
        .await;
    let b = app
        .post_with(
            "/v1/venues",
            &bob,
            body.clone(),
            &[("idempotency-key", &key)],
        )
        .await;
    assert_eq!((a.status, b.status), (201, 201), "{a:?} {b:?}");
    assert_ne!(a.id(), b.id(), "bob's request is not alice's replay");
    assert_eq!(app.count_events("VenueRegistered").await, 2);
    let again = app
        .post_with(
            "/v1/venues",
            &alice,
            body.clone(),
            &[("idempotency-key", &key)],
        )
        .await;
    assert_same(&a, &again);
    // And another caller's different body under the same key is no reuse either.
    let carol = app.token(Role::Admin);
    let c = app
        .post_with(
            "/v1/venues",
            &carol,
            json!({"name": "Other", "timezone": "Europe/Rome"}),
            &[("idempotency-key", &key)],
        )
        .await;
    assert_eq!(c.status, 201, "{c:?}");
}

#[tokio::test]
async fn a_refused_command_leaves_its_key_free_for_a_corrected_retry() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let key = key();
    let taken = app.book(&staff, venue, table, 18, 20).await;
    assert_eq!(taken.status, 201);
    let body = booking_body(venue, table, 18, 20, &unique_email());
    app.refused(
        app.post_with(
            "/v1/bookings",
            &staff,
            body.clone(),
            &[("idempotency-key", &key)],
        ),
        409,
        "slot-unavailable",
    )
    .await;
    app.post(
        &format!("/v1/bookings/{}/cancel", taken.id()),
        &staff,
        json!({}),
    )
    .await;
    let retry = app
        .post_with("/v1/bookings", &staff, body, &[("idempotency-key", &key)])
        .await;
    assert_eq!(retry.status, 201, "{retry:?}");
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_400() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let long = "k".repeat(256);
    for bad in ["", long.as_str()] {
        let a = app
            .refused(
                app.post_with(
                    "/v1/bookings",
                    &staff,
                    booking_body(venue, table, 18, 20, &unique_email()),
                    &[("idempotency-key", bad)],
                ),
                400,
                "validation",
            )
            .await;
        assert_eq!(a.field(), "Idempotency-Key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_requests_with_one_key_append_one_booking_and_answer_alike() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let key = key();
    let body = booking_body(venue, table, 18, 20, &unique_email());
    let headers = [("idempotency-key", key.as_str())];
    let attempts = (0..10).map(|_| app.post_with("/v1/bookings", &staff, body.clone(), &headers));
    let answers = futures::future::join_all(attempts).await;
    assert_eq!(answers[0].status, 201, "{answers:?}");
    for a in &answers[1..] {
        assert_same(&answers[0], a);
    }
    assert_eq!(app.count_events("BookingRequested").await, 1);
    assert_eq!(app.count_events("CommandAudited").await, 0, "{answers:?}");
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM booking_slots")
        .fetch_one(&app.pool)
        .await
        .unwrap_or(-1);
    assert_eq!(slots, 1);
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.pool)
        .await
        .unwrap_or(-1);
    assert_eq!(keys, 1);
}
