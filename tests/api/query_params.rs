//! Query strings on every endpoint family that reads one: a repeated parameter, a value of the
//! wrong type and a value outside an enumeration are each `400 validation` problem+json naming
//! the parameter (never the framework's plain-text rejection); errors found once the read model
//! was reached, and `projection-lagging`, carry `X-Ledger-Position`.

use crate::helpers::*;
use ledger::http::auth::Role;
use uuid::Uuid;

/// A venue with a booking of its table: (venue, booking, the booking's position, a staff token).
async fn booked(app: &TestApp) -> (Uuid, Uuid, i64, Token) {
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let b = app.book(&staff, venue, table, 18, 20).await;
    assert_eq!(b.status, 201, "{b:?}");
    let position = b.body["position"].as_i64().unwrap_or(-1);
    (venue, b.id(), position, staff)
}

/// Asserts `path` is refused `400 validation` naming `field`.
async fn refused(app: &TestApp, token: &Token, path: &str, field: &str) {
    let a = get(app, path, token).await;
    a.assert_problem(400, "validation");
    assert_eq!(a.field(), field, "{path}: {a:?}");
}

#[tokio::test]
async fn read_model_queries_refuse_repeated_mistyped_and_unknown_values_naming_the_parameter() {
    let app = spawn_app().await;
    let (venue, booking, at, staff) = booked(&app).await;
    let subject = Uuid::new_v4();
    let admin = app.token(Role::Admin);
    for (path, field) in [
        // The booking board.
        (
            "/v1/bookings?status=pending&status=confirmed".to_owned(),
            "status",
        ),
        ("/v1/bookings?limit=ten".to_owned(), "limit"),
        ("/v1/bookings?status=lost".to_owned(), "status"),
        (
            format!("/v1/bookings?venue_id={venue}&venue_id={venue}"),
            "venue_id",
        ),
        (
            "/v1/bookings?min_position=1&min_position=1".to_owned(),
            "min_position",
        ),
        // A booking's detail.
        (
            format!("/v1/bookings/{booking}?min_position=1&min_position=2"),
            "min_position",
        ),
        (
            format!("/v1/bookings/{booking}?min_position=soon"),
            "min_position",
        ),
        (
            format!("/v1/bookings/{booking}?min_position=-1"),
            "min_position",
        ),
        // A customer's bookings.
        (
            format!("/v1/customers/{subject}/bookings?limit=1&limit=2"),
            "limit",
        ),
        (
            format!("/v1/customers/{subject}/bookings?date=tomorrow"),
            "date",
        ),
        (
            format!("/v1/customers/{subject}/bookings?status=Pending"),
            "status",
        ),
        // Venues.
        (
            "/v1/venues?min_position=0&min_position=0".to_owned(),
            "min_position",
        ),
        (format!("/v1/venues/{venue}?min_position=x"), "min_position"),
        // Availability.
        (
            format!("/v1/venues/{venue}/availability?date=2030-06-01&date=2030-06-02"),
            "date",
        ),
        (
            format!("/v1/venues/{venue}/availability?date=1.6.2030"),
            "date",
        ),
        // Stats.
        (
            format!("/v1/venues/{venue}/stats?from=2030-06-01&from=2030-06-01&to=2030-06-02"),
            "from",
        ),
        (
            format!("/v1/venues/{venue}/stats?from=2030-06-01&to=june"),
            "to",
        ),
    ] {
        let token = if path.contains("/stats") {
            &admin
        } else {
            &staff
        };
        refused(&app, token, &path, field).await;
    }
    // The header form of min_position, malformed or given twice.
    for values in [vec!["soon"], vec!["1", "2"]] {
        let mut req = app
            .client
            .get(format!("{}/v1/bookings/{booking}", app.base))
            .bearer_auth(&staff.0);
        for v in values {
            req = req.header("x-ledger-min-position", v);
        }
        let a = app.send(req).await;
        a.assert_problem(400, "validation");
        assert_eq!(a.field(), "X-Ledger-Min-Position");
    }
    // Parameters an endpoint does not read are ignored, given twice or not; one it reads, given
    // once, works.
    let ok = get(
        &app,
        &format!("/v1/bookings?venue_id={venue}&utm=a&utm=b&status=pending&min_position={at}"),
        &staff,
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.body["items"][0]["id"], booking.to_string());
}

#[tokio::test]
async fn the_live_board_refuses_repeated_and_mistyped_parameters() {
    let app = spawn_app().await;
    let (venue, _, _, staff) = app.booked().await;
    refused(
        &app,
        &staff,
        &format!("/v1/live?venue_id={venue}&venue_id={venue}"),
        "venue_id",
    )
    .await;
    refused(&app, &staff, "/v1/live?venue_id=main-hall", "venue_id").await;
    refused(&app, &staff, "/v1/live", "venue_id").await;
    refused(
        &app,
        &staff,
        &format!("/v1/live?venue_id={venue}&last_event_id=1&last_event_id=2"),
        "last_event_id",
    )
    .await;
}

#[tokio::test]
async fn audit_endpoints_refuse_repeated_and_mistyped_parameters() {
    let app = spawn_app().await;
    let (_, _, booking, _) = app.booked().await;
    let auditor = app.token(Role::Auditor);
    for (path, field) in [
        ("/v1/audit/log?limit=1&limit=2".to_owned(), "limit"),
        ("/v1/audit/log?after=first".to_owned(), "after"),
        ("/v1/audit/log?limit=1001".to_owned(), "limit"),
        ("/v1/audit/actions?actor=a&actor=b".to_owned(), "actor"),
        ("/v1/audit/actions?from=yesterday".to_owned(), "from"),
        (
            "/v1/audit/actions?to=2030-01-01T00:00:00Z&to=2030-01-02T00:00:00Z".to_owned(),
            "to",
        ),
        (
            format!("/v1/audit/bookings/{booking}/as-of?at=2030-01-01T00:00:00Z&at=2030-01-01T00:00:00Z"),
            "at",
        ),
        (format!("/v1/audit/bookings/{booking}/as-of?at=2030-01-01"), "at"),
        ("/v1/audit/proofs/consistency?first=1&first=1&second=2".to_owned(), "first"),
        ("/v1/audit/proofs/inclusion?position=one&tree_size=2".to_owned(), "position"),
    ] {
        refused(&app, &auditor, &path, field).await;
    }
    // Rights come before parameters: a role that may not read the log learns nothing else.
    let staff = app.token(Role::Staff);
    get(&app, "/v1/audit/log?limit=1&limit=2", &staff)
        .await
        .assert_problem(403, "forbidden");
}

#[tokio::test]
async fn subject_endpoints_ignore_query_strings_they_do_not_read() {
    let app = spawn_app().await;
    let (_, booking, at, _) = booked(&app).await;
    let admin = app.token(Role::Admin);
    let detail = get(
        &app,
        &format!("/v1/bookings/{booking}?min_position={at}"),
        &admin,
    )
    .await;
    let subject = detail.body["subject_id"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no subject: {detail:?}"));
    // The export reads no parameter: repeated ones change nothing and are not a framework error.
    let export = get(
        &app,
        &format!("/v1/subjects/{subject}/export?x=1&x=2"),
        &admin,
    )
    .await;
    assert_eq!(export.status, 200, "{export:?}");
    assert_eq!(export.body["subject_id"], subject.as_str());
}

#[tokio::test]
async fn errors_found_at_the_read_model_carry_the_position_it_includes() {
    let app = spawn_app().await;
    let (venue, booking, at, staff) = booked(&app).await;
    let admin = app.token(Role::Admin);
    let seen = get(
        &app,
        &format!("/v1/bookings/{booking}?min_position={at}"),
        &staff,
    )
    .await;
    assert_eq!(seen.status, 200, "{seen:?}");
    let seen_at: i64 = seen
        .header("x-ledger-position")
        .and_then(|p| p.parse().ok())
        .unwrap_or(-1);
    assert!(seen_at >= at, "{seen:?}");

    // Lagging: the answer says how far the read model got.
    for (path, token) in [
        ("/v1/bookings?min_position=999999".to_owned(), &staff),
        (
            format!("/v1/bookings/{booking}?min_position=999999"),
            &staff,
        ),
        (
            format!("/v1/venues/{venue}/stats?from=2030-06-01&to=2030-06-01&min_position=999999"),
            &admin,
        ),
    ] {
        let a = get(&app, &path, token).await;
        a.assert_problem(503, "projection-lagging");
        assert_eq!(a.header("retry-after"), Some("1"), "{path}");
        let includes: i64 = a
            .header("x-ledger-position")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{path}: no X-Ledger-Position: {a:?}"));
        assert!((0..999_999).contains(&includes), "{path}: {includes}");
        assert!(
            a.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&includes.to_string())),
            "{a:?}"
        );
    }

    // Not found in a read model that includes position N: "not there as of N".
    let missing = get(
        &app,
        &format!("/v1/bookings/{}?min_position=1", Uuid::new_v4()),
        &staff,
    )
    .await;
    missing.assert_problem(404, "not-found");
    assert!(missing.header("x-ledger-position").is_some(), "{missing:?}");
    let unknown_venue = get(
        &app,
        &format!("/v1/venues/{}/availability?date=2030-06-01", Uuid::new_v4()),
        &staff,
    )
    .await;
    unknown_venue.assert_problem(404, "not-found");
    assert!(unknown_venue.header("x-ledger-position").is_some());

    // A refusal before the read model was consulted has no position to tell.
    let bad = get(&app, "/v1/bookings?limit=0", &staff).await;
    bad.assert_problem(400, "validation");
    assert_eq!(bad.header("x-ledger-position"), None);
}

/// An export waits for the booking board to reach the log head; when it cannot (no projection
/// worker runs here), the answer is `projection-lagging` saying, in `X-Ledger-Position`, how far
/// the board got — as the query endpoints do.
#[tokio::test]
async fn an_export_the_board_cannot_catch_up_with_says_how_far_it_got() {
    let app = spawn_with(Spawn::default()).await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let b = app.book(&staff, venue, table, 18, 20).await;
    assert_eq!(b.status, 201, "{b:?}");
    let subject = b.body["subject_id"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no subject: {b:?}"));
    let export = get(
        &app,
        &format!("/v1/subjects/{subject}/export"),
        &app.token(Role::Admin),
    )
    .await;
    export.assert_problem(503, "projection-lagging");
    assert_eq!(export.header("retry-after"), Some("1"), "{export:?}");
    let includes: i64 = export
        .header("x-ledger-position")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no X-Ledger-Position: {export:?}"));
    let head = b.body["position"].as_i64().unwrap_or(-1);
    assert!((0..head).contains(&includes), "{includes} of {head}");
}
