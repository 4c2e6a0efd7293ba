//! A booking's lifecycle: pending → confirmed → checked_in | no_show, pending | confirmed →
//! cancelled; every other transition is `invalid-transition` and appends nothing.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::json;
use uuid::Uuid;

async fn act(app: &TestApp, token: &Token, booking: Uuid, action: &str) -> Answer {
    app.post(
        &format!("/v1/bookings/{booking}/{action}"),
        token,
        json!({}),
    )
    .await
}

fn assert_now(a: &Answer, status: &str, version: i64) {
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["status"], status, "{a:?}");
    assert_eq!(a.body["version"], version, "{a:?}");
    assert_eq!(a.header("etag"), Some(format!("\"{version}\"").as_str()));
    assert_eq!(
        a.header("x-ledger-position"),
        Some(a.body["position"].to_string().as_str())
    );
}

#[tokio::test]
async fn a_booking_goes_from_pending_to_confirmed_to_checked_in() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let door = app.token(Role::Door);
    let confirmed = app.confirm(&staff, booking).await;
    assert_now(&confirmed, "confirmed", 2);
    assert_eq!(confirmed.id(), booking);
    assert_eq!(confirmed.body["stream"], format!("booking-{booking}"));
    let seated = act(&app, &door, booking, "check-in").await;
    assert_now(&seated, "checked_in", 3);
    assert!(
        seated.body["position"].as_i64() > confirmed.body["position"].as_i64(),
        "positions grow"
    );
    let types: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(format!("booking-{booking}"))
    .fetch_all(&app.pool)
    .await
    .unwrap_or_default();
    assert_eq!(
        types,
        ["BookingRequested", "BookingConfirmed", "GuestCheckedIn"]
    );
}

#[tokio::test]
async fn a_checked_in_guest_keeps_the_slot() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    app.confirm(&staff, booking).await;
    assert_eq!(
        act(&app, &app.token(Role::Door), booking, "check-in")
            .await
            .status,
        200
    );
    app.refused(
        app.book(&staff, venue, table, 19, 20),
        409,
        "slot-unavailable",
    )
    .await;
}

#[tokio::test]
async fn a_no_show_frees_the_slot_for_a_new_booking() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    assert_eq!(app.confirm(&staff, booking).await.status, 200);
    app.refused(
        app.book(&staff, venue, table, 18, 20),
        409,
        "slot-unavailable",
    )
    .await;
    let gone = act(&app, &app.token(Role::Door), booking, "no-show").await;
    assert_now(&gone, "no_show", 3);
    let next = app.book(&staff, venue, table, 18, 20).await;
    assert_eq!(next.status, 201, "the no-show freed the slot: {next:?}");
}

#[tokio::test]
async fn confirming_twice_is_an_invalid_transition() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    assert_eq!(app.confirm(&staff, booking).await.status, 200);
    app.refused(app.confirm(&staff, booking), 409, "invalid-transition")
        .await;
}

#[tokio::test]
async fn a_pending_booking_can_be_neither_checked_in_nor_marked_a_no_show() {
    let app = spawn_app().await;
    let (_, _, booking, _) = app.booked().await;
    let door = app.token(Role::Door);
    for action in ["check-in", "no-show"] {
        app.refused(act(&app, &door, booking, action), 409, "invalid-transition")
            .await;
    }
}

#[tokio::test]
async fn a_checked_in_booking_cannot_be_cancelled_rescheduled_or_marked_a_no_show() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let door = app.token(Role::Door);
    app.confirm(&staff, booking).await;
    assert_eq!(act(&app, &door, booking, "check-in").await.status, 200);
    app.refused(
        act(&app, &staff, booking, "cancel"),
        409,
        "invalid-transition",
    )
    .await;
    app.refused(
        app.post(
            &format!("/v1/bookings/{booking}/reschedule"),
            &staff,
            json!({"starts_at": at(10), "ends_at": at(11)}),
        ),
        409,
        "invalid-transition",
    )
    .await;
    for action in ["check-in", "no-show"] {
        app.refused(act(&app, &door, booking, action), 409, "invalid-transition")
            .await;
    }
}

#[tokio::test]
async fn a_cancelled_booking_cannot_be_rescheduled_confirmed_or_cancelled_again() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let cancelled = act(&app, &staff, booking, "cancel").await;
    assert_now(&cancelled, "cancelled", 2);
    app.refused(
        app.post(
            &format!("/v1/bookings/{booking}/reschedule"),
            &staff,
            json!({"starts_at": at(10), "ends_at": at(11)}),
        ),
        409,
        "invalid-transition",
    )
    .await;
    for action in ["confirm", "cancel"] {
        app.refused(
            act(&app, &staff, booking, action),
            409,
            "invalid-transition",
        )
        .await;
    }
}

#[tokio::test]
async fn a_confirmed_booking_can_be_cancelled_and_that_frees_the_slot() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    app.confirm(&staff, booking).await;
    let cancelled = app
        .post(
            &format!("/v1/bookings/{booking}/cancel"),
            &staff,
            json!({"reason": "kitchen closed"}),
        )
        .await;
    assert_now(&cancelled, "cancelled", 3);
    assert_eq!(app.book(&staff, venue, table, 18, 20).await.status, 201);
}

#[tokio::test]
async fn rescheduling_to_another_resource_moves_the_slot_and_keeps_the_status() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let booking = app.book(&staff, venue, table, 18, 20).await.id();
    app.confirm(&staff, booking).await;
    let moved = app
        .post(
            &format!("/v1/bookings/{booking}/reschedule"),
            &staff,
            json!({"starts_at": at(19), "ends_at": at(21), "resource_id": room}),
        )
        .await;
    assert_now(&moved, "confirmed", 3);
    let events = app.events_of("BookingRescheduled").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1["resource_id"], json!(room));
    assert_eq!(events[0].1["previous_resource_id"], json!(table));
    // The table is free again; the garden is taken at the new time.
    assert_eq!(app.book(&staff, venue, table, 18, 20).await.status, 201);
    app.refused(
        app.book(&staff, venue, room, 20, 22),
        409,
        "slot-unavailable",
    )
    .await;
}

#[tokio::test]
async fn rescheduling_to_a_resource_too_small_for_the_party_is_422() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let mut body = booking_body(venue, room, 18, 20, &unique_email());
    body["party_size"] = json!(6);
    let big = app.post("/v1/bookings", &staff, body).await;
    assert_eq!(big.status, 201, "{big:?}");
    let a = app
        .refused(
            app.post(
                &format!("/v1/bookings/{}/reschedule", big.id()),
                &staff,
                json!({"starts_at": at(18), "ends_at": at(20), "resource_id": table}),
            ),
            422,
            "validation",
        )
        .await;
    assert_eq!(a.field(), "party_size");
    // Nothing moved: the table is still free, the room still taken.
    assert_eq!(app.book(&staff, venue, table, 18, 20).await.status, 201);
    app.refused(
        app.book(&staff, venue, room, 18, 20),
        409,
        "slot-unavailable",
    )
    .await;
}

#[tokio::test]
async fn rescheduling_to_an_unknown_resource_or_the_same_slot_is_422() {
    let app = spawn_app().await;
    let (_, other_table, _) = app.venue().await;
    let (_, _, booking, staff) = app.booked().await;
    for resource in [Uuid::now_v7(), other_table] {
        let a = app
            .refused(
                app.post(
                    &format!("/v1/bookings/{booking}/reschedule"),
                    &staff,
                    json!({"starts_at": at(10), "ends_at": at(11), "resource_id": resource}),
                ),
                422,
                "validation",
            )
            .await;
        assert_eq!(a.field(), "resource_id");
    }
    app.refused(
        app.post(
            &format!("/v1/bookings/{booking}/reschedule"),
            &staff,
            json!({"starts_at": at(18), "ends_at": at(20)}),
        ),
        422,
        "validation",
    )
    .await;
}

#[tokio::test]
async fn rescheduling_within_the_own_slot_is_allowed() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    // 18-20 → 19-21 overlaps only the booking itself.
    let moved = app
        .post(
            &format!("/v1/bookings/{booking}/reschedule"),
            &staff,
            json!({"starts_at": at(19), "ends_at": at(21)}),
        )
        .await;
    assert_now(&moved, "pending", 2);
}

#[tokio::test]
async fn a_cancel_reason_with_control_characters_is_422() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let a = app
        .refused(
            app.post(
                &format!("/v1/bookings/{booking}/cancel"),
                &staff,
                json!({"reason": "bell\u{7}"}),
            ),
            422,
            "validation",
        )
        .await;
    assert_eq!(a.field(), "reason");
}
