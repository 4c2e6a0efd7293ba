//! Who may do what: bearer tokens, the role table, venue scoping and customers' own bookings.

use crate::helpers::*;
use ledger::http::auth::{Claims, JwtKeys, Role};
use serde_json::{json, Value};
use uuid::Uuid;

fn claims(role: Role, exp_in_secs: i64) -> Claims {
    Claims {
        sub: format!("user-{}", Uuid::new_v4().simple()),
        role,
        exp: chrono::Utc::now().timestamp() + exp_in_secs,
        iat: None,
        subject: None,
        venues: None,
    }
}

/// Every command endpoint with a body it would accept, for `booking` and `payment`.
fn every_command(venue: Uuid, table: Uuid, booking: Uuid, payment: Uuid) -> Vec<(String, Value)> {
    vec![
        (
            "/v1/venues".into(),
            json!({"name": "New", "timezone": "Europe/Paris"}),
        ),
        (
            format!("/v1/venues/{venue}/resources"),
            json!({"name": "Terrace", "capacity": 6}),
        ),
        (
            "/v1/bookings".into(),
            booking_body(venue, table, 8, 9, &unique_email()),
        ),
        (format!("/v1/bookings/{booking}/confirm"), json!({})),
        (
            format!("/v1/bookings/{booking}/reschedule"),
            json!({"starts_at": at(6), "ends_at": at(7)}),
        ),
        (format!("/v1/bookings/{booking}/cancel"), json!({})),
        (format!("/v1/bookings/{booking}/check-in"), json!({})),
        (format!("/v1/bookings/{booking}/no-show"), json!({})),
        (
            format!("/v1/bookings/{booking}/payments"),
            json!({"amount_minor": 100, "currency": "EUR", "kind": "deposit"}),
        ),
        (format!("/v1/payments/{payment}/capture"), json!({})),
        (
            format!("/v1/payments/{payment}/refund"),
            json!({"amount_minor": 1}),
        ),
    ]
}

#[tokio::test]
async fn requests_without_a_valid_token_are_401_and_append_nothing_at_all() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 1000).await.id();
    let expired = app.token_from(&claims(Role::Admin, -3600));
    let foreign = Token(
        JwtKeys::new(&[9u8; 48])
            .sign(&claims(Role::Admin, 600))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let customer_without_subject = app.token_from(&claims(Role::Customer, 600));
    let mut no_sub = claims(Role::Admin, 600);
    no_sub.sub = " ".into();
    let blank_sub = app.token_from(&no_sub);
    let authorizations = [
        None,
        Some("Bearer garbage".to_string()),
        Some("Bearer ".to_string()),
        Some(format!("Basic {}", app.token(Role::Admin).0)),
        Some(format!("Bearer {}", expired.0)),
        Some(format!("Bearer {}", foreign.0)),
        Some(format!("Bearer {}", customer_without_subject.0)),
        Some(format!("Bearer {}", blank_sub.0)),
    ];
    let all_before = app.count_all_events().await;
    for (path, body) in every_command(venue, table, booking, payment) {
        for authorization in &authorizations {
            let a = app
                .post_raw(
                    &path,
                    Raw {
                        token: authorization.as_deref(),
                        content_type: Some("application/json"),
                        body: body.to_string().into_bytes(),
                        headers: vec![],
                    },
                )
                .await;
            a.assert_problem(401, "unauthorized");
        }
    }
    assert_eq!(
        app.count_all_events().await,
        all_before,
        "a 401 appends nothing, not even an audit record"
    );
}

#[tokio::test]
async fn an_auditor_may_not_run_any_command() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 1000).await.id();
    let auditor = app.token(Role::Auditor);
    for (path, body) in every_command(venue, table, booking, payment) {
        app.refused(app.post(&path, &auditor, body), 403, "forbidden")
            .await;
    }
}

#[tokio::test]
async fn staff_run_bookings_and_payments_but_not_venues_check_ins_or_no_shows() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    assert_eq!(app.confirm(&staff, booking).await.status, 200);
    for action in ["check-in", "no-show"] {
        app.refused(
            app.post(
                &format!("/v1/bookings/{booking}/{action}"),
                &staff,
                json!({}),
            ),
            403,
            "forbidden",
        )
        .await;
    }
    app.refused(
        app.post(
            "/v1/venues",
            &staff,
            json!({"name": "Mine", "timezone": "Europe/Berlin"}),
        ),
        403,
        "forbidden",
    )
    .await;
    app.refused(
        app.post(
            &format!("/v1/venues/{venue}/resources"),
            &staff,
            json!({"name": "Mine", "capacity": 2}),
        ),
        403,
        "forbidden",
    )
    .await;
    // What staff may do.
    let moved = app
        .post(
            &format!("/v1/bookings/{booking}/reschedule"),
            &staff,
            json!({"starts_at": at(12), "ends_at": at(14)}),
        )
        .await;
    assert_eq!(moved.status, 200, "{moved:?}");
    let payment = app.authorise(&staff, booking, 500).await;
    assert_eq!(payment.status, 201, "{payment:?}");
    let other = app.book(&staff, venue, table, 18, 20).await;
    assert_eq!(
        app.post(
            &format!("/v1/bookings/{}/cancel", other.id()),
            &staff,
            json!({})
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn the_door_checks_in_and_marks_no_shows_but_does_nothing_else() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 1000).await.id();
    assert_eq!(app.confirm(&staff, booking).await.status, 200);
    let door = app.token(Role::Door);
    for (path, body) in every_command(venue, table, booking, payment) {
        if path.ends_with("check-in") || path.ends_with("no-show") {
            continue;
        }
        app.refused(app.post(&path, &door, body), 403, "forbidden")
            .await;
    }
    let seated = app
        .post(
            &format!("/v1/bookings/{booking}/check-in"),
            &door,
            json!({}),
        )
        .await;
    assert_eq!(
        (seated.status, seated.body["status"].as_str()),
        (200, Some("checked_in")),
        "{seated:?}"
    );
    let late = app.book(&staff, venue, table, 20, 22).await.id();
    assert_eq!(app.confirm(&staff, late).await.status, 200);
    let gone = app
        .post(&format!("/v1/bookings/{late}/no-show"), &door, json!({}))
        .await;
    assert_eq!(
        (gone.status, gone.body["status"].as_str()),
        (200, Some("no_show")),
        "{gone:?}"
    );
}

#[tokio::test]
async fn a_manager_registers_venues_and_resources_and_runs_every_booking_command() {
    let app = spawn_app().await;
    let manager = app.token(Role::Manager);
    let venue = app
        .post(
            "/v1/venues",
            &manager,
            json!({"name": "Manager's", "timezone": "America/New_York"}),
        )
        .await;
    assert_eq!(venue.status, 201, "{venue:?}");
    assert_eq!(venue.body["stream"], format!("venue-{}", venue.id()));
    let table = app
        .post(
            &format!("/v1/venues/{}/resources", venue.id()),
            &manager,
            json!({"name": "T", "capacity": 2}),
        )
        .await;
    assert_eq!(table.status, 201, "{table:?}");
    assert_eq!(table.body["version"], 2);
    let b = app.book(&manager, venue.id(), table.id(), 18, 20).await;
    assert_eq!(b.status, 201, "{b:?}");
    assert_eq!(app.confirm(&manager, b.id()).await.status, 200);
    let seated = app
        .post(
            &format!("/v1/bookings/{}/check-in", b.id()),
            &manager,
            json!({}),
        )
        .await;
    assert_eq!(seated.status, 200, "{seated:?}");
    let p = app.authorise(&manager, b.id(), 100).await;
    assert_eq!(p.status, 201, "{p:?}");
    let c = app
        .post(
            &format!("/v1/payments/{}/capture", p.id()),
            &manager,
            json!({}),
        )
        .await;
    assert_eq!(c.status, 200, "{c:?}");
}

#[tokio::test]
async fn a_venue_scoped_token_sees_and_acts_on_its_venues_only() {
    let app = spawn_app().await;
    let (mine, my_table, _) = app.venue().await;
    let (theirs, their_table, _) = app.venue().await;
    let admin = app.token(Role::Admin);
    let their_booking = app.book(&admin, theirs, their_table, 18, 20).await.id();
    let their_payment = app.authorise(&admin, their_booking, 1000).await.id();
    let scoped = app.token_with(Role::Staff, None, Some(vec![mine]));

    app.refused(
        app.book(&scoped, theirs, their_table, 10, 12),
        404,
        "not-found",
    )
    .await;
    for (path, body) in every_command(theirs, their_table, their_booking, their_payment) {
        if path.starts_with("/v1/venues")
            || path == "/v1/bookings"
            || path.ends_with("check-in")
            || path.ends_with("no-show")
        {
            continue;
        }
        app.refused(app.post(&path, &scoped, body), 404, "not-found")
            .await;
    }
    // A scoped manager cannot reach another venue's resources, nor mint new venues.
    let scoped_manager = app.token_with(Role::Manager, None, Some(vec![mine]));
    app.refused(
        app.post(
            &format!("/v1/venues/{theirs}/resources"),
            &scoped_manager,
            json!({"name": "Sneaky", "capacity": 2}),
        ),
        404,
        "not-found",
    )
    .await;
    app.refused(
        app.post(
            "/v1/venues",
            &scoped_manager,
            json!({"name": "Another", "timezone": "Europe/Berlin"}),
        ),
        403,
        "forbidden",
    )
    .await;
    let scoped_door = app.token_with(Role::Door, None, Some(vec![mine]));
    assert_eq!(app.confirm(&admin, their_booking).await.status, 200);
    app.refused(
        app.post(
            &format!("/v1/bookings/{their_booking}/check-in"),
            &scoped_door,
            json!({}),
        ),
        404,
        "not-found",
    )
    .await;

    // In its own venue the scoped token works as usual.
    let own = app.book(&scoped, mine, my_table, 18, 20).await;
    assert_eq!(own.status, 201, "{own:?}");
    assert_eq!(app.confirm(&scoped, own.id()).await.status, 200);
    assert_eq!(app.authorise(&scoped, own.id(), 100).await.status, 201);
}

#[tokio::test]
async fn a_customer_books_for_their_own_subject_and_may_cancel_it() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let subject = Uuid::now_v7();
    let customer = app.token_with(Role::Customer, Some(subject), None);
    let b = app.book(&customer, venue, table, 18, 20).await;
    assert_eq!(b.status, 201, "{b:?}");
    assert_eq!(b.body["subject_id"], json!(subject));
    assert_eq!(b.body["status"], "pending");
    // A second email of the same customer is bound to the same subject.
    let again = app.book(&customer, venue, table, 20, 22).await;
    assert_eq!(again.body["subject_id"], json!(subject), "{again:?}");
    let cancelled = app
        .post(
            &format!("/v1/bookings/{}/cancel", b.id()),
            &customer,
            json!({"reason": "plans changed"}),
        )
        .await;
    assert_eq!(
        (cancelled.status, cancelled.body["status"].as_str()),
        (200, Some("cancelled")),
        "{cancelled:?}"
    );
    let metadata = app.events_of("BookingCancelled").await;
    assert_eq!(metadata.len(), 1);
    assert_eq!(metadata[0].2["role"], "customer");
    assert_eq!(metadata[0].2["actor"], app.sub_of(&customer));
}

#[tokio::test]
async fn a_customer_gets_404_for_someone_elses_booking_and_403_for_staff_commands() {
    let app = spawn_app().await;
    let (venue, table, others, staff) = app.booked().await;
    let customer = app.token_with(Role::Customer, Some(Uuid::now_v7()), None);
    let own = app.book(&customer, venue, table, 10, 12).await.id();
    app.refused(
        app.post(
            &format!("/v1/bookings/{others}/cancel"),
            &customer,
            json!({}),
        ),
        404,
        "not-found",
    )
    .await;
    for (path, body) in [
        (format!("/v1/bookings/{own}/confirm"), json!({})),
        (
            format!("/v1/bookings/{own}/reschedule"),
            json!({"starts_at": at(13), "ends_at": at(14)}),
        ),
        (format!("/v1/bookings/{own}/check-in"), json!({})),
        (format!("/v1/bookings/{own}/no-show"), json!({})),
        (
            format!("/v1/bookings/{own}/payments"),
            json!({"amount_minor": 100, "currency": "EUR", "kind": "deposit"}),
        ),
        (format!("/v1/bookings/{others}/confirm"), json!({})),
        (
            "/v1/venues".into(),
            json!({"name": "X", "timezone": "Europe/Berlin"}),
        ),
    ] {
        app.refused(app.post(&path, &customer, body), 403, "forbidden")
            .await;
    }
    // Staff's payment on the customer's booking: the customer cannot move its money.
    let payment = app.authorise(&staff, own, 1000).await.id();
    app.refused(
        app.post(
            &format!("/v1/payments/{payment}/capture"),
            &customer,
            json!({}),
        ),
        403,
        "forbidden",
    )
    .await;
}

#[tokio::test]
async fn a_customer_may_not_book_with_an_email_bound_to_another_subject() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let email = unique_email();
    let first = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &email),
        )
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    let stranger = app.token_with(Role::Customer, Some(Uuid::now_v7()), None);
    app.refused(
        app.post(
            "/v1/bookings",
            &stranger,
            booking_body(venue, table, 10, 12, &email.to_uppercase()),
        ),
        403,
        "forbidden",
    )
    .await;
    // Nor with an email another customer bound first.
    let alice = app.token_with(Role::Customer, Some(Uuid::now_v7()), None);
    let alices = unique_email();
    let a = app
        .post(
            "/v1/bookings",
            &alice,
            booking_body(venue, table, 12, 13, &alices),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    app.refused(
        app.post(
            "/v1/bookings",
            &stranger,
            booking_body(venue, table, 14, 15, &alices),
        ),
        403,
        "forbidden",
    )
    .await;
}
