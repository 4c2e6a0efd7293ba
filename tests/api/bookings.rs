use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::json;

#[tokio::test]
async fn a_booking_is_created_pending_with_a_subject_and_headers() {
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
    assert_eq!(b.body["status"], "pending");
    assert_eq!(b.body["version"], 1);
    assert_eq!(b.header("etag"), Some("\"1\""));
    assert_eq!(
        b.header("x-ledger-position"),
        Some(b.body["position"].to_string().as_str())
    );
    assert_eq!(b.body["stream"], format!("booking-{}", b.id()));
    // The same email, differently cased, is the same data subject.
    let again = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 20, 22, &email.to_uppercase()),
        )
        .await;
    assert_eq!(again.status, 201, "{again:?}");
    assert_eq!(again.body["subject_id"], b.body["subject_id"]);
}

#[tokio::test]
async fn overlapping_is_refused_touching_is_fine_and_cancel_frees_the_slot() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let first = app.book(&staff, venue, table, 18, 20).await;
    assert_eq!(first.status, 201);
    let overlap = app.book(&staff, venue, table, 19, 21).await;
    assert_eq!(
        (overlap.status, overlap.problem()),
        (409, "slot-unavailable")
    );
    assert_eq!(
        app.book(&staff, venue, table, 20, 22).await.status,
        201,
        "half-open: touching is free"
    );
    assert_eq!(
        app.book(&staff, venue, room, 18, 20).await.status,
        201,
        "another resource is free"
    );
    let cancel = app
        .post(
            &format!("/v1/bookings/{}/cancel", first.id()),
            &staff,
            json!({"reason": "ill"}),
        )
        .await;
    assert_eq!(
        (cancel.status, cancel.body["status"].as_str()),
        (200, Some("cancelled")),
        "{cancel:?}"
    );
    assert_eq!(
        app.book(&staff, venue, table, 18, 20).await.status,
        201,
        "cancel freed the slot"
    );
}

#[tokio::test]
async fn reschedule_into_a_taken_slot_is_refused_and_moves_nothing() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let a = app.book(&staff, venue, table, 18, 20).await;
    let b = app.book(&staff, venue, table, 20, 22).await;
    let before = app.count_domain_events().await;
    let clash = app
        .post(
            &format!("/v1/bookings/{}/reschedule", b.id()),
            &staff,
            json!({"starts_at": at(19), "ends_at": at(21)}),
        )
        .await;
    assert_eq!((clash.status, clash.problem()), (409, "slot-unavailable"));
    assert_eq!(app.count_domain_events().await, before, "no partial append");
    let moved = app
        .post(
            &format!("/v1/bookings/{}/reschedule", a.id()),
            &staff,
            json!({"starts_at": at(10), "ends_at": at(12)}),
        )
        .await;
    assert_eq!(moved.status, 200, "{moved:?}");
    assert_eq!(moved.body["version"], 2);
    // The old slot is free again, the new one is taken.
    assert_eq!(app.book(&staff, venue, table, 18, 20).await.status, 201);
    assert_eq!(app.book(&staff, venue, table, 11, 12).await.status, 409);
}

/// A process keeps the venues it folded, and reads only what was appended since: a resource
/// added through another API process is there for this one's next booking, and a capacity it
/// has not seen is not assumed.
#[tokio::test]
async fn a_venue_changed_through_another_process_is_decided_on_as_it_is_now() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let admin = app.token(Role::Admin);
    // This process folds the venue (and keeps it).
    let first = app.book(&staff, venue, table, 18, 20).await;
    assert_eq!(first.status, 201, "{first:?}");
    // Another process adds a resource.
    let elsewhere = app.second_api().await;
    let added = app
        .send(
            app.client
                .post(format!("{elsewhere}/v1/venues/{venue}/resources"))
                .bearer_auth(&admin.0)
                .json(&json!({"name": "Booth", "capacity": 2})),
        )
        .await;
    assert_eq!(added.status, 201, "{added:?}");
    let booth: uuid::Uuid = added.body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no id: {added:?}"));
    // This process books it, within its capacity and not beyond.
    let fits = app
        .post(
            "/v1/bookings",
            &staff,
            json!({"venue_id": venue, "resource_id": booth,
                   "starts_at": "2030-06-01T18:00:00Z", "ends_at": "2030-06-01T19:00:00Z",
                   "party_size": 2,
                   "customer": {"name": "Grace", "email": unique_email()}}),
        )
        .await;
    assert_eq!(fits.status, 201, "{fits:?}");
    let too_many = app
        .post(
            "/v1/bookings",
            &staff,
            json!({"venue_id": venue, "resource_id": booth,
                   "starts_at": "2030-06-02T18:00:00Z", "ends_at": "2030-06-02T19:00:00Z",
                   "party_size": 3,
                   "customer": {"name": "Grace", "email": unique_email()}}),
        )
        .await;
    assert_eq!(too_many.status, 422, "{too_many:?}");
}
