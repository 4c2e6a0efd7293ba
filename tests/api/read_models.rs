//! The availability query (booking board) and the `daily_stats` projection with its query, end to
//! end: command → log → relay → JetStream → projection workers → query. The stats are checked
//! against a hand-computed expectation and, for parity, against a plain fold of the `events` table
//! and against a fresh `daily_stats` projection rebuilt from Postgres in a second database.

use crate::helpers::*;
use chrono::{DateTime, NaiveDate, Utc};
use ledger::http::auth::Role;
use ledger_events::booking::BookingEvent;
use ledger_events::envelope::{DomainEvent, RecordedEvent};
use ledger_events::payment::PaymentEvent;
use ledger_events::venue::VenueEvent;
use ledger_projections::daily_stats::{self, DayStats};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

fn position(a: &Answer) -> i64 {
    a.body["position"]
        .as_i64()
        .unwrap_or_else(|| panic!("no position in {a:?}"))
}

fn instant(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .with_timezone(&Utc)
}

fn day(s: &str) -> NaiveDate {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A venue in `timezone` with a table for 4 and a room for 10: (venue, table, room).
async fn venue_in(app: &TestApp, timezone: &str) -> (Uuid, Uuid, Uuid) {
    let admin = app.token(Role::Admin);
    let v = app
        .post(
            "/v1/venues",
            &admin,
            json!({"name": format!("Venue in {timezone}"), "timezone": timezone}),
        )
        .await;
    assert_eq!(v.status, 201, "{v:?}");
    let venue = v.id();
    let mut ids = Vec::new();
    for (name, capacity) in [("Table 1", 4), ("Room", 10)] {
        let r = app
            .post(
                &format!("/v1/venues/{venue}/resources"),
                &admin,
                json!({"name": name, "capacity": capacity}),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        ids.push(r.id());
    }
    (venue, ids[0], ids[1])
}

/// Books `resource` from `starts_at` to `ends_at` (RFC 3339) for `party` guests.
async fn book_at(
    app: &TestApp,
    token: &Token,
    venue: Uuid,
    resource: Uuid,
    (starts_at, ends_at): (&str, &str),
    party: u32,
) -> Answer {
    app.post(
        "/v1/bookings",
        token,
        json!({
            "venue_id": venue,
            "resource_id": resource,
            "starts_at": starts_at,
            "ends_at": ends_at,
            "party_size": party,
            "customer": {"name": "Ada Lovelace", "email": unique_email(), "phone": "+44 20 7946 0000"},
        }),
    )
    .await
}

fn ok(a: Answer) -> Answer {
    assert!(a.status == 200 || a.status == 201, "{a:?}");
    a
}

async fn act(app: &TestApp, token: &Token, booking: Uuid, action: &str) -> Answer {
    ok(app
        .post(
            &format!("/v1/bookings/{booking}/{action}"),
            token,
            json!({}),
        )
        .await)
}

async fn reschedule(
    app: &TestApp,
    token: &Token,
    booking: Uuid,
    (starts_at, ends_at): (&str, &str),
    resource: Option<Uuid>,
) -> Answer {
    let mut body = json!({"starts_at": starts_at, "ends_at": ends_at});
    if let Some(r) = resource {
        body["resource_id"] = json!(r);
    }
    app.post(&format!("/v1/bookings/{booking}/reschedule"), token, body)
        .await
}

async fn money(app: &TestApp, token: &Token, payment: Uuid, action: &str, amount: i64) -> Answer {
    ok(app
        .post(
            &format!("/v1/payments/{payment}/{action}"),
            token,
            json!({"amount_minor": amount}),
        )
        .await)
}

/// The log's head position: everything appended so far.
async fn head(app: &TestApp) -> i64 {
    ledger_replay::head_position(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn availability(app: &TestApp, token: &Token, venue: Uuid, date: &str, at: i64) -> Answer {
    get(
        app,
        &format!("/v1/venues/{venue}/availability?date={date}&min_position={at}"),
        token,
    )
    .await
}

/// The busy intervals of one resource in an availability answer: (starts_at, ends_at, booking_id).
fn busy(a: &Answer, resource: Uuid) -> Vec<(DateTime<Utc>, DateTime<Utc>, Option<Uuid>)> {
    assert_eq!(a.status, 200, "{a:?}");
    let resources = a.body["resources"].as_array().cloned().unwrap_or_default();
    let r = resources
        .iter()
        .find(|r| r["id"] == json!(resource))
        .unwrap_or_else(|| panic!("resource {resource} not in {a:?}"));
    r["busy"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                instant(b["starts_at"].as_str().unwrap_or_default()),
                instant(b["ends_at"].as_str().unwrap_or_default()),
                b["booking_id"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok()),
            )
        })
        .collect()
}

fn interval(s: &str, e: &str, id: Uuid) -> (DateTime<Utc>, DateTime<Utc>, Option<Uuid>) {
    (instant(s), instant(e), Some(id))
}

// ---------------------------------------------------------------------------------------------
// Availability

#[tokio::test]
async fn availability_follows_bookings_cancellations_no_shows_check_ins_and_reschedules() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await; // Europe/Berlin: UTC+2 in June
    let staff = app.token(Role::Staff);
    let door = app.token(Role::Door);
    let a = ok(book_at(
        &app,
        &staff,
        venue,
        table,
        ("2030-06-01T10:00:00Z", "2030-06-01T12:00:00Z"),
        2,
    )
    .await);
    let b = ok(book_at(
        &app,
        &staff,
        venue,
        table,
        ("2030-06-01T14:00:00Z", "2030-06-01T16:00:00Z"),
        2,
    )
    .await);
    let c = ok(book_at(
        &app,
        &staff,
        venue,
        room,
        ("2030-06-01T18:00:00Z", "2030-06-01T20:00:00Z"),
        4,
    )
    .await);
    let (a, b, c) = (a.id(), b.id(), c.id());

    let now = availability(&app, &staff, venue, "2030-06-01", head(&app).await).await;
    assert_eq!(now.body["venue_id"], json!(venue));
    assert_eq!(now.body["date"], "2030-06-01");
    assert_eq!(now.body["timezone"], "Europe/Berlin");
    assert!(
        now.header("x-ledger-position")
            .and_then(|p| p.parse::<i64>().ok())
            .unwrap_or(0)
            >= head(&app).await
    );
    let resources = now.body["resources"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<(&str, i64)> = resources
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default(),
                r["capacity"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(names, [("Room", 10), ("Table 1", 4)]);
    assert_eq!(
        busy(&now, table),
        [
            interval("2030-06-01T10:00:00Z", "2030-06-01T12:00:00Z", a),
            interval("2030-06-01T14:00:00Z", "2030-06-01T16:00:00Z", b),
        ]
    );
    assert_eq!(
        busy(&now, room),
        [interval("2030-06-01T18:00:00Z", "2030-06-01T20:00:00Z", c)]
    );

    // A cancellation frees the slot.
    act(&app, &staff, a, "cancel").await;
    let now = availability(&app, &staff, venue, "2030-06-01", head(&app).await).await;
    assert_eq!(
        busy(&now, table),
        [interval("2030-06-01T14:00:00Z", "2030-06-01T16:00:00Z", b)]
    );

    // Confirmed still holds it; a no-show frees it.
    act(&app, &staff, b, "confirm").await;
    let now = availability(&app, &staff, venue, "2030-06-01", head(&app).await).await;
    assert_eq!(
        busy(&now, table).len(),
        1,
        "a confirmed booking holds its slot"
    );
    act(&app, &door, b, "no-show").await;
    let now = availability(&app, &staff, venue, "2030-06-01", head(&app).await).await;
    assert_eq!(busy(&now, table), []);

    // A reschedule to another day and resource moves the interval.
    ok(reschedule(
        &app,
        &staff,
        c,
        ("2030-06-02T10:00:00Z", "2030-06-02T11:30:00Z"),
        Some(table),
    )
    .await);
    let at = head(&app).await;
    let first = availability(&app, &staff, venue, "2030-06-01", at).await;
    assert_eq!((busy(&first, table), busy(&first, room)), (vec![], vec![]));
    let second = availability(&app, &staff, venue, "2030-06-02", at).await;
    assert_eq!(
        busy(&second, table),
        [interval("2030-06-02T10:00:00Z", "2030-06-02T11:30:00Z", c)]
    );
    assert_eq!(busy(&second, room), []);

    // Checked in still holds the slot.
    act(&app, &staff, c, "confirm").await;
    act(&app, &door, c, "check-in").await;
    let second = availability(&app, &staff, venue, "2030-06-02", head(&app).await).await;
    assert_eq!(
        busy(&second, table).len(),
        1,
        "a checked-in guest holds the table"
    );
}

#[tokio::test]
async fn availability_is_by_the_venues_local_day_and_a_booking_across_midnight_shows_on_both_days()
{
    let app = spawn_app().await;
    // New York is UTC-4 in June: local days run from 04:00Z to 04:00Z.
    let (venue, table, room) = venue_in(&app, "America/New_York").await;
    let staff = app.token(Role::Staff);
    // 2030-06-02 02:00Z is 2030-06-01 22:00 local: the first of June, not the second.
    let late = ok(book_at(
        &app,
        &staff,
        venue,
        table,
        ("2030-06-02T02:00:00Z", "2030-06-02T03:00:00Z"),
        2,
    )
    .await)
    .id();
    // 23:30 to 01:00 local: across midnight.
    let across = ok(book_at(
        &app,
        &staff,
        venue,
        room,
        ("2030-06-02T03:30:00Z", "2030-06-02T05:00:00Z"),
        2,
    )
    .await)
    .id();
    // 00:00 to 01:00 local on the second, exactly: starts where the first of June ends.
    let midnight = ok(book_at(
        &app,
        &staff,
        venue,
        table,
        ("2030-06-02T04:00:00Z", "2030-06-02T05:00:00Z"),
        2,
    )
    .await)
    .id();
    let at = head(&app).await;

    let first = availability(&app, &staff, venue, "2030-06-01", at).await;
    assert_eq!(first.body["timezone"], "America/New_York");
    assert_eq!(
        busy(&first, table),
        [interval(
            "2030-06-02T02:00:00Z",
            "2030-06-02T03:00:00Z",
            late
        )],
        "half-open days: a booking starting at local midnight is not on the day before"
    );
    assert_eq!(
        busy(&first, room),
        [interval(
            "2030-06-02T03:30:00Z",
            "2030-06-02T05:00:00Z",
            across
        )]
    );

    let second = availability(&app, &staff, venue, "2030-06-02", at).await;
    assert_eq!(
        busy(&second, table),
        [interval(
            "2030-06-02T04:00:00Z",
            "2030-06-02T05:00:00Z",
            midnight
        )]
    );
    assert_eq!(
        busy(&second, room),
        [interval(
            "2030-06-02T03:30:00Z",
            "2030-06-02T05:00:00Z",
            across
        )],
        "across midnight: on both days, with its own times (not clipped)"
    );

    // The UTC day would have said otherwise: nothing of this venue is on the local 31st of May
    // or the 3rd of June.
    for date in ["2030-05-31", "2030-06-03"] {
        let other = availability(&app, &staff, venue, date, at).await;
        assert_eq!((busy(&other, table), busy(&other, room)), (vec![], vec![]));
    }
}

#[tokio::test]
async fn availability_roles_scopes_personal_data_and_parameters() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let (other, _, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let email = unique_email();
    let b = ok(app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &email),
        )
        .await);
    let pos = position(&b);
    let subject: Uuid = serde_json::from_value(b.body["subject_id"].clone()).unwrap_or_default();

    // Staff roles see which booking holds a slot.
    for role in [Role::Admin, Role::Manager, Role::Staff, Role::Door] {
        let a = availability(&app, &app.token(role), venue, "2030-06-01", pos).await;
        assert_eq!(
            busy(&a, table),
            [interval(&at(18), &at(20), b.id())],
            "{role:?}"
        );
    }
    let scoped = app.token_with(Role::Manager, None, Some(vec![venue]));
    assert_eq!(
        availability(&app, &scoped, venue, "2030-06-01", pos)
            .await
            .status,
        200
    );

    // A customer (any customer) sees when, not who: no booking id, no personal data.
    for customer in [
        app.token_with(Role::Customer, Some(subject), None),
        app.token_with(Role::Customer, Some(Uuid::new_v4()), None),
    ] {
        let a = availability(&app, &customer, venue, "2030-06-01", pos).await;
        let intervals = busy(&a, table);
        assert_eq!(intervals.len(), 1, "{a:?}");
        assert_eq!(intervals[0].2, None, "no booking id for customers: {a:?}");
        let text = a.body.to_string();
        for secret in [
            email.as_str(),
            "Grace Hopper",
            "555 0100",
            "window seat",
            &subject.to_string(),
            &b.id().to_string(),
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
    // Not even staff get personal data here.
    let a = availability(&app, &staff, venue, "2030-06-01", pos).await;
    let text = a.body.to_string();
    for secret in [email.as_str(), "Grace Hopper", &subject.to_string()] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }

    // Auditors read the audit endpoints only; other venues do not exist for scoped staff.
    availability(&app, &app.token(Role::Auditor), venue, "2030-06-01", pos)
        .await
        .assert_problem(403, "forbidden");
    let door_elsewhere = app.token_with(Role::Door, None, Some(vec![other]));
    availability(&app, &door_elsewhere, venue, "2030-06-01", pos)
        .await
        .assert_problem(404, "not-found");
    availability(&app, &staff, Uuid::new_v4(), "2030-06-01", pos)
        .await
        .assert_problem(404, "not-found");
    let anonymous = app
        .send(app.client.get(format!(
            "{}/v1/venues/{venue}/availability?date=2030-06-01",
            app.base
        )))
        .await;
    assert_eq!(anonymous.status, 401);

    for (query, field) in [
        ("date=01-06-2030", "date"),
        ("date=2030-02-30", "date"),
        ("", "date"),
        ("date=2030-06-01&min_position=soon", "min_position"),
    ] {
        let a = get(
            &app,
            &format!("/v1/venues/{venue}/availability?{query}"),
            &staff,
        )
        .await;
        a.assert_problem(400, "validation");
        assert_eq!(a.field(), field, "{query}");
    }
    let lagging = availability(&app, &staff, venue, "2030-06-01", 999_999).await;
    lagging.assert_problem(503, "projection-lagging");
}

// ---------------------------------------------------------------------------------------------
// Daily stats

async fn stats(app: &TestApp, token: &Token, venue: Uuid, from: &str, to: &str, at: i64) -> Answer {
    get(
        app,
        &format!("/v1/venues/{venue}/stats?from={from}&to={to}&min_position={at}"),
        token,
    )
    .await
}

fn stats_days(a: &Answer) -> Vec<DayStats> {
    assert_eq!(a.status, 200, "{a:?}");
    serde_json::from_value::<Vec<Value>>(a.body["days"].clone())
        .unwrap_or_else(|e| panic!("days: {e}: {a:?}"))
        .iter()
        .map(|d| DayStats {
            local_date: day(d["date"].as_str().unwrap_or_default()),
            bookings: d["bookings"].as_i64().unwrap_or(-1),
            covers: d["covers"].as_i64().unwrap_or(-1),
            no_shows: d["no_shows"].as_i64().unwrap_or(-1),
            captured_minor: d["captured_minor"].as_i64().unwrap_or(-1),
            refunded_minor: d["refunded_minor"].as_i64().unwrap_or(-1),
        })
        .collect()
}

fn figures(date: &str, [b, c, n, cap, re]: [i64; 5]) -> DayStats {
    DayStats {
        local_date: day(date),
        bookings: b,
        covers: c,
        no_shows: n,
        captured_minor: cap,
        refunded_minor: re,
    }
}

#[tokio::test]
async fn stats_after_a_realistic_day_match_a_hand_computed_expectation() {
    let app = spawn_app().await;
    let (venue, table, room) = venue_in(&app, "America/New_York").await;
    let staff = app.token(Role::Staff);
    let door = app.token(Role::Door);
    let manager = app.token(Role::Manager);

    // b1: local 06-01 12:00, 2 guests; confirmed, seated; 50.00 captured, 15.00 refunded.
    let b1 = ok(book_at(
        &app,
        &staff,
        venue,
        table,
        ("2030-06-01T16:00:00Z", "2030-06-01T18:00:00Z"),
        2,
    )
    .await)
    .id();
    act(&app, &staff, b1, "confirm").await;
    act(&app, &door, b1, "check-in").await;
    let p1 = ok(app.authorise(&staff, b1, 5000).await).id();
    money(&app, &staff, p1, "capture", 5000).await;
    money(&app, &staff, p1, "refund", 1500).await;
    // b2: local 06-01 16:00, 8 guests; cancelled: counted as a booking, not as covers.
    let b2 = ok(book_at(
        &app,
        &staff,
        venue,
        room,
        ("2030-06-01T20:00:00Z", "2030-06-01T22:00:00Z"),
        8,
    )
    .await)
    .id();
    act(&app, &staff, b2, "cancel").await;
    // b3: 06-02 01:00Z is local 06-01 21:00, 3 guests; a no-show with a 20.00 fee captured.
    let b3 = ok(book_at(
        &app,
        &staff,
        venue,
        table,
        ("2030-06-02T01:00:00Z", "2030-06-02T02:30:00Z"),
        3,
    )
    .await)
    .id();
    act(&app, &staff, b3, "confirm").await;
    let p3 = ok(app.authorise(&staff, b3, 2000).await).id();
    money(&app, &staff, p3, "capture", 2000).await;
    act(&app, &door, b3, "no-show").await;
    // b4: local 06-01 10:00, 6 guests, 10.00 captured, then moved to 06-03 (money moves with
    // it), then 5.00 refunded (on 06-03, its day now).
    let b4 = ok(book_at(
        &app,
        &staff,
        venue,
        room,
        ("2030-06-01T14:00:00Z", "2030-06-01T15:00:00Z"),
        6,
    )
    .await)
    .id();
    let p4 = ok(app.authorise(&staff, b4, 3000).await).id();
    money(&app, &staff, p4, "capture", 1000).await;
    ok(reschedule(
        &app,
        &staff,
        b4,
        ("2030-06-03T14:00:00Z", "2030-06-03T15:00:00Z"),
        None,
    )
    .await);
    money(&app, &staff, p4, "refund", 500).await;
    // b5: local 06-02 12:00, 4 guests, pending.
    ok(book_at(
        &app,
        &staff,
        venue,
        table,
        ("2030-06-02T16:00:00Z", "2030-06-02T18:00:00Z"),
        4,
    )
    .await);
    // b6: 06-02 03:30Z is local 06-01 23:30 (across midnight: counted on its start day), 5
    // guests; first booked on 06-04, then moved back.
    let b6 = ok(book_at(
        &app,
        &staff,
        venue,
        room,
        ("2030-06-04T16:00:00Z", "2030-06-04T17:00:00Z"),
        5,
    )
    .await)
    .id();
    ok(reschedule(
        &app,
        &staff,
        b6,
        ("2030-06-02T03:30:00Z", "2030-06-02T05:00:00Z"),
        None,
    )
    .await);
    // A cancelled booking elsewhere in the range, moved before it was cancelled.
    let b7 = ok(book_at(
        &app,
        &staff,
        venue,
        table,
        ("2030-06-04T16:00:00Z", "2030-06-04T17:00:00Z"),
        1,
    )
    .await)
    .id();
    ok(reschedule(
        &app,
        &staff,
        b7,
        ("2030-06-05T16:00:00Z", "2030-06-05T17:00:00Z"),
        None,
    )
    .await);
    act(&app, &staff, b7, "cancel").await;

    let at = head(&app).await;
    let a = stats(&app, &manager, venue, "2030-05-31", "2030-06-05", at).await;
    assert_eq!(a.body["venue_id"], json!(venue));
    assert!(
        a.header("x-ledger-position")
            .and_then(|p| p.parse::<i64>().ok())
            .unwrap_or(0)
            >= at
    );
    //                      bookings covers no_shows captured refunded
    let expected = vec![
        figures("2030-05-31", [0, 0, 0, 0, 0]),
        // b1 (2), b2 (cancelled), b3 (3, no-show), b6 (5)
        figures("2030-06-01", [4, 10, 1, 7000, 1500]),
        // b5 (4)
        figures("2030-06-02", [1, 4, 0, 0, 0]),
        // b4 (6), with its money
        figures("2030-06-03", [1, 6, 0, 1000, 500]),
        // b6 and b7 moved away
        figures("2030-06-04", [0, 0, 0, 0, 0]),
        // b7, cancelled
        figures("2030-06-05", [1, 0, 0, 0, 0]),
    ];
    assert_eq!(stats_days(&a), expected);

    // Nothing leaks the guests.
    let text = a.body.to_string();
    assert!(!text.contains("Ada Lovelace") && !text.contains("example.org"));

    // A narrower range answers those days only, every one of them.
    let one = stats(&app, &manager, venue, "2030-06-02", "2030-06-02", at).await;
    assert_eq!(stats_days(&one), [figures("2030-06-02", [1, 4, 0, 0, 0])]);

    assert_stats_parity(&app).await;
}

#[tokio::test]
async fn stats_roles_scopes_and_ranges() {
    let app = spawn_app().await;
    let (venue, _, _) = app.venue().await;
    let (other, _, _) = app.venue().await;
    let at = head(&app).await;
    let ok_range = |a: &Answer| assert_eq!(a.status, 200, "{a:?}");
    for role in [Role::Admin, Role::Manager] {
        ok_range(
            &stats(
                &app,
                &app.token(role),
                venue,
                "2030-06-01",
                "2030-06-07",
                at,
            )
            .await,
        );
    }
    for role in [Role::Staff, Role::Door, Role::Auditor] {
        stats(
            &app,
            &app.token(role),
            venue,
            "2030-06-01",
            "2030-06-07",
            at,
        )
        .await
        .assert_problem(403, "forbidden");
    }
    let customer = app.token_with(Role::Customer, Some(Uuid::new_v4()), None);
    stats(&app, &customer, venue, "2030-06-01", "2030-06-07", at)
        .await
        .assert_problem(403, "forbidden");
    let scoped = app.token_with(Role::Manager, None, Some(vec![other]));
    stats(&app, &scoped, venue, "2030-06-01", "2030-06-07", at)
        .await
        .assert_problem(404, "not-found");
    ok_range(&stats(&app, &scoped, other, "2030-06-01", "2030-06-07", at).await);
    let admin = app.token(Role::Admin);
    stats(&app, &admin, Uuid::new_v4(), "2030-06-01", "2030-06-07", at)
        .await
        .assert_problem(404, "not-found");

    // Every day of the range, zeros included; at most 366 days (a leap year is fine).
    let year = stats(&app, &admin, venue, "2028-01-01", "2028-12-31", at).await;
    let days = stats_days(&year);
    assert_eq!(days.len(), 366);
    assert_eq!(days[0], figures("2028-01-01", [0, 0, 0, 0, 0]));
    assert_eq!(days[365].local_date, day("2028-12-31"));
    let same = stats(&app, &admin, venue, "2030-06-01", "2030-06-01", at).await;
    assert_eq!(stats_days(&same).len(), 1);

    for (query, field) in [
        ("from=2030-06-02&to=2030-06-01", "to"),
        ("from=2028-01-01&to=2029-01-01", "to"),
        ("from=2030-01-01&to=2031-12-31", "to"),
        ("to=2030-06-01", "from"),
        ("from=2030-06-01", "to"),
        ("from=2030-13-01&to=2030-06-01", "from"),
        ("from=2030-06-01&to=tomorrow", "to"),
        (
            "from=2030-06-01&to=2030-06-02&min_position=soon",
            "min_position",
        ),
    ] {
        let a = get(&app, &format!("/v1/venues/{venue}/stats?{query}"), &admin).await;
        a.assert_problem(400, "validation");
        assert_eq!(a.field(), field, "{query}");
    }
}

/// Each read model answers `min_position` from its own checkpoint: a position only the board
/// has reached does not satisfy a stats query, and the other way round. Fake notifications move
/// one watch without the other (a watch never goes back, and the real checkpoints stay low).
#[tokio::test]
async fn min_position_waits_on_each_read_models_own_checkpoint() {
    let app = spawn_app().await;
    let (venue, _, _) = app.venue().await;
    let admin = app.token(Role::Admin);
    let at = head(&app).await;
    // Both read models get there on their own.
    assert_eq!(
        stats(&app, &admin, venue, "2030-06-01", "2030-06-01", at)
            .await
            .status,
        200
    );
    assert_eq!(
        availability(&app, &admin, venue, "2030-06-01", at)
            .await
            .status,
        200
    );
    let checkpoints = ledger_projections::checkpoints(&app.pool)
        .await
        .unwrap_or_default();
    let names: Vec<&str> = checkpoints.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["booking_board", "daily_stats"], "{checkpoints:?}");

    let notify = |payload: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query("SELECT pg_notify('ledger_projection', $1)")
                .bind(payload)
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    notify("booking_board:500000").await;
    let board = availability(&app, &admin, venue, "2030-06-01", 400_000).await;
    assert_eq!(board.status, 200, "{board:?}");
    assert_eq!(board.header("x-ledger-position"), Some("500000"));
    stats(&app, &admin, venue, "2030-06-01", "2030-06-01", 400_000)
        .await
        .assert_problem(503, "projection-lagging");

    notify("daily_stats:600000").await;
    let s = stats(&app, &admin, venue, "2030-06-01", "2030-06-01", 550_000).await;
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(s.header("x-ledger-position"), Some("600000"));
    availability(&app, &admin, venue, "2030-06-01", 550_000)
        .await
        .assert_problem(503, "projection-lagging");
}

/// Many bookings and changes over two venues in two zones, chosen by a seeded generator (slot
/// conflicts and refused transitions included), then the parity check.
#[tokio::test]
async fn stats_equal_a_plain_fold_of_the_log_and_a_fresh_rebuild_after_a_random_workload() {
    let app = spawn_app().await;
    let venues = [
        venue_in(&app, "Europe/Berlin").await,
        venue_in(&app, "America/New_York").await,
    ];
    let staff = app.token(Role::Staff);
    let door = app.token(Role::Door);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut bookings: Vec<(Uuid, Uuid, Uuid, Uuid)> = Vec::new(); // (booking, venue, table, room)
    let mut payments: Vec<Uuid> = Vec::new();
    let slot = |rng: &mut rand::rngs::StdRng| {
        let start = instant("2030-06-01T00:00:00Z")
            + chrono::Duration::minutes(30 * rng.gen_range(0..(4 * 48)));
        let end = start + chrono::Duration::minutes(30 * rng.gen_range(1..6));
        (start.to_rfc3339(), end.to_rfc3339())
    };
    for _ in 0..100 {
        match rng.gen_range(0..10) {
            0..=3 => {
                let (venue, table, room) = venues[rng.gen_range(0..2)];
                let resource = if rng.gen_bool(0.5) { table } else { room };
                let (s, e) = slot(&mut rng);
                let a = book_at(&app, &staff, venue, resource, (&s, &e), rng.gen_range(1..5)).await;
                if a.status == 201 {
                    bookings.push((a.id(), venue, table, room));
                }
            }
            _ if bookings.is_empty() => {}
            4 => {
                let (b, _, table, room) = bookings[rng.gen_range(0..bookings.len())];
                let (s, e) = slot(&mut rng);
                let resource = [None, Some(table), Some(room)][rng.gen_range(0..3)];
                reschedule(&app, &staff, b, (&s, &e), resource).await;
            }
            5 => {
                let (b, ..) = bookings[rng.gen_range(0..bookings.len())];
                app.post(&format!("/v1/bookings/{b}/cancel"), &staff, json!({}))
                    .await;
            }
            6 => {
                let (b, ..) = bookings[rng.gen_range(0..bookings.len())];
                app.post(&format!("/v1/bookings/{b}/confirm"), &staff, json!({}))
                    .await;
                if let Some(action) = [None, Some("no-show"), Some("check-in")][rng.gen_range(0..3)]
                {
                    app.post(&format!("/v1/bookings/{b}/{action}"), &door, json!({}))
                        .await;
                }
            }
            7 => {
                let (b, ..) = bookings[rng.gen_range(0..bookings.len())];
                let p = app.authorise(&staff, b, rng.gen_range(1..100) * 100).await;
                if p.status == 201 {
                    payments.push(p.id());
                }
            }
            _ if payments.is_empty() => {}
            _ => {
                let p = payments[rng.gen_range(0..payments.len())];
                let action = if rng.gen_bool(0.6) {
                    "capture"
                } else {
                    "refund"
                };
                app.post(
                    &format!("/v1/payments/{p}/{action}"),
                    &staff,
                    json!({"amount_minor": rng.gen_range(1..40) * 100}),
                )
                .await;
            }
        }
    }
    assert!(
        bookings.len() >= 10,
        "the workload booked {}",
        bookings.len()
    );
    let mut counts = Vec::new();
    for t in [
        "PaymentCaptured",
        "PaymentRefunded",
        "BookingRescheduled",
        "BookingCancelled",
        "BookingNoShow",
    ] {
        counts.push((t, app.count_events(t).await));
    }
    assert!(
        counts.iter().all(|(_, n)| *n > 0),
        "the workload covers every change the stats count: {counts:?}"
    );
    assert_stats_parity(&app).await;
}

// ---------------------------------------------------------------------------------------------
// Parity: the live read model against the log.

#[derive(Debug, Clone)]
struct FoldedBooking {
    venue: Uuid,
    day: NaiveDate,
    party: i64,
    status: &'static str,
    captured: i64,
    refunded: i64,
}

fn decode<E: DomainEvent>(e: &RecordedEvent) -> E {
    E::decode(&e.event_type, e.schema_version, &e.payload)
        .unwrap_or_else(|err| panic!("position {}: {err}", e.global_position))
}

/// The daily stats, folded from the log with nothing but Rust: venue zones from chrono-tz, each
/// booking's current state, then sums per (venue, local day). Only days with a booking.
fn fold_stats(events: &[RecordedEvent]) -> BTreeMap<(Uuid, NaiveDate), DayStats> {
    let mut zones: HashMap<Uuid, chrono_tz::Tz> = HashMap::new();
    let mut bookings: HashMap<Uuid, FoldedBooking> = HashMap::new();
    let mut payments: HashMap<Uuid, Uuid> = HashMap::new();
    let local_day = |zones: &HashMap<Uuid, chrono_tz::Tz>, venue: Uuid, t: DateTime<Utc>| {
        t.with_timezone(&zones.get(&venue).copied().unwrap_or(chrono_tz::UTC))
            .date_naive()
    };
    for e in events {
        match e.stream_id.split('-').next().unwrap_or_default() {
            "venue" => {
                if let VenueEvent::VenueRegistered(v) = decode::<VenueEvent>(e) {
                    let tz = v
                        .timezone
                        .parse()
                        .unwrap_or_else(|err| panic!("{}: {err}", v.timezone));
                    zones.insert(v.venue_id.0, tz);
                }
            }
            "booking" => {
                let status = |bookings: &mut HashMap<Uuid, FoldedBooking>, id: Uuid, s| {
                    if let Some(b) = bookings.get_mut(&id) {
                        b.status = s;
                    }
                };
                match decode::<BookingEvent>(e) {
                    BookingEvent::BookingRequested(r) => {
                        bookings.insert(
                            r.booking_id.0,
                            FoldedBooking {
                                venue: r.venue_id.0,
                                day: local_day(&zones, r.venue_id.0, r.starts_at),
                                party: i64::from(r.party_size),
                                status: "pending",
                                captured: 0,
                                refunded: 0,
                            },
                        );
                    }
                    BookingEvent::BookingRescheduled(r) => {
                        if let Some(b) = bookings.get_mut(&r.booking_id.0) {
                            b.day = local_day(&zones, b.venue, r.starts_at);
                        }
                    }
                    BookingEvent::BookingConfirmed(c) => {
                        status(&mut bookings, c.booking_id.0, "confirmed")
                    }
                    BookingEvent::BookingCancelled(c) => {
                        status(&mut bookings, c.booking_id.0, "cancelled")
                    }
                    BookingEvent::GuestCheckedIn(c) => {
                        status(&mut bookings, c.booking_id.0, "checked_in")
                    }
                    BookingEvent::BookingNoShow(c) => {
                        status(&mut bookings, c.booking_id.0, "no_show")
                    }
                }
            }
            "payment" => {
                let (payment, captured, refunded) = match decode::<PaymentEvent>(e) {
                    PaymentEvent::PaymentAuthorized(a) => {
                        payments.insert(a.payment_id.0, a.booking_id.0);
                        continue;
                    }
                    PaymentEvent::PaymentCaptured(c) => (c.payment_id.0, c.amount_minor, 0),
                    PaymentEvent::PaymentRefunded(r) => (r.payment_id.0, 0, r.amount_minor),
                    PaymentEvent::PaymentFailed(_) => continue,
                };
                if let Some(b) = payments.get(&payment).and_then(|b| bookings.get_mut(b)) {
                    b.captured += captured;
                    b.refunded += refunded;
                }
            }
            _ => {}
        }
    }
    let mut days: BTreeMap<(Uuid, NaiveDate), DayStats> = BTreeMap::new();
    for b in bookings.values() {
        let d = days.entry((b.venue, b.day)).or_insert_with(|| DayStats {
            local_date: b.day,
            bookings: 0,
            covers: 0,
            no_shows: 0,
            captured_minor: 0,
            refunded_minor: 0,
        });
        d.bookings += 1;
        if b.status != "cancelled" {
            d.covers += b.party;
        }
        if b.status == "no_show" {
            d.no_shows += 1;
        }
        d.captured_minor += b.captured;
        d.refunded_minor += b.refunded;
    }
    days
}

pub(crate) async fn all_events(pool: &sqlx::PgPool) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    loop {
        let after = events
            .last()
            .map(|e: &RecordedEvent| e.global_position)
            .unwrap_or(0);
        let batch = ledger_replay::read_all(pool, after, 1000)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if batch.is_empty() {
            return events;
        }
        events.extend(batch);
    }
}

/// Rebuilds `daily_stats` alone from the log of `app` into a fresh database (no booking board
/// there) with `apply_batch`, the same fold the worker runs, and returns its rows.
async fn rebuilt_elsewhere(events: &[RecordedEvent]) -> BTreeMap<(Uuid, NaiveDate), DayStats> {
    let (pool, admin, name) = scratch_database().await;
    for chunk in events.chunks(37) {
        ledger_projections::apply_batch(&pool, daily_stats::NAME, chunk)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let rows = daily_stats::all_days(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let board: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_bookings")
        .fetch_one(&pool)
        .await
        .unwrap_or(-1);
    assert_eq!(board, 0, "the rebuild ran without the booking board");
    drop_database(pool, admin, &name).await;
    rows.into_iter()
        .map(|(v, d)| ((v, d.local_date), d))
        .collect()
}

/// The live `daily_stats` read model, read through HTTP, equals (1) a plain fold of the `events`
/// table and (2) a fresh projection rebuilt from Postgres into a second database.
pub(crate) async fn assert_stats_parity(app: &TestApp) {
    let at = head(app).await;
    let events = all_events(&app.pool).await;
    assert_eq!(events.last().map(|e| e.global_position), Some(at));
    let folded = fold_stats(&events);
    assert!(!folded.is_empty(), "the workload made bookings");

    // The live read model through the API: every venue, every day from its first to its last
    // (ranges of at most 366 days), zero days included.
    let admin = app.token(Role::Admin);
    let mut live: BTreeMap<(Uuid, NaiveDate), DayStats> = BTreeMap::new();
    let mut per_venue: BTreeMap<Uuid, (NaiveDate, NaiveDate)> = BTreeMap::new();
    for (venue, d) in folded.keys() {
        let e = per_venue.entry(*venue).or_insert((*d, *d));
        e.0 = e.0.min(*d);
        e.1 = e.1.max(*d);
    }
    for (venue, (from, to)) in &per_venue {
        let from = *from - chrono::Days::new(1);
        let to = *to + chrono::Days::new(1);
        assert!(
            (to - from).num_days() < 366,
            "the workload spans a few days"
        );
        let a = stats(app, &admin, *venue, &from.to_string(), &to.to_string(), at).await;
        let days = stats_days(&a);
        assert_eq!(days.len() as i64, (to - from).num_days() + 1);
        for d in days {
            if d.bookings != 0 {
                live.insert((*venue, d.local_date), d);
            } else {
                assert_eq!(d, figures(&d.local_date.to_string(), [0; 5]), "{venue}");
            }
        }
    }
    assert_eq!(live, folded, "live read model vs a plain fold of the log");

    // The table itself holds exactly those days (no stray rows, e.g. of other venues).
    let rows: BTreeMap<(Uuid, NaiveDate), DayStats> = daily_stats::all_days(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|(v, d)| ((v, d.local_date), d))
        .collect();
    assert_eq!(rows, folded, "rm_daily_stats vs a plain fold of the log");

    assert_eq!(
        rebuilt_elsewhere(&events).await,
        folded,
        "a fresh daily_stats projection rebuilt from Postgres vs a plain fold of the log"
    );
}

// ---------------------------------------------------------------------------------------------
// The set-based fold against the per-event fold it replaced, on generated logs.

/// A log written straight from the event types (no API, so anything a log may hold, in any
/// order): venues in zones far from UTC, one registered only after bookings refer to it and one
/// never; resources; bookings around local midnights over a few days, rescheduled across days,
/// confirmed, cancelled (with and without a sealed reason), checked in, marked no-show, in any
/// order and sometimes for bookings that do not exist; payments authorised, captured, refunded
/// and failed, sometimes for unknown payments or bookings; erasures and audit records.
pub(crate) struct LogGenerator {
    rng: rand::rngs::StdRng,
    events: Vec<RecordedEvent>,
    versions: HashMap<String, i64>,
    /// (venue, zone, registered).
    venues: Vec<(Uuid, &'static str, bool)>,
    resources: Vec<(Uuid, Uuid)>,
    bookings: Vec<Uuid>,
    payments: Vec<Uuid>,
    subjects: Vec<Uuid>,
}

impl LogGenerator {
    fn new(seed: u64) -> Self {
        let zones = [
            "Europe/Berlin",
            "America/New_York",
            "Pacific/Kiritimati",
            "Pacific/Pago_Pago",
            "Asia/Kolkata",
        ];
        LogGenerator {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            events: Vec::new(),
            versions: HashMap::new(),
            venues: zones.iter().map(|z| (Uuid::new_v4(), *z, false)).collect(),
            resources: Vec::new(),
            bookings: Vec::new(),
            payments: Vec::new(),
            subjects: (0..6).map(|_| Uuid::new_v4()).collect(),
        }
    }

    fn push(&mut self, stream: String, event_type: &str, payload: Value) {
        let version = self.versions.entry(stream.clone()).or_insert(0);
        *version += 1;
        let version = *version;
        self.events.push(RecordedEvent {
            global_position: self.events.len() as i64 + 1,
            event_id: Uuid::new_v4(),
            stream_id: stream,
            stream_version: version,
            event_type: event_type.to_owned(),
            schema_version: 1,
            payload,
            metadata: json!({"actor": "generator"}),
            recorded_at: Utc::now(),
        });
    }

    fn domain<E: DomainEvent>(&mut self, category: &str, id: Uuid, e: E) {
        let (t, p) = (e.event_type(), e.payload());
        self.push(format!("{category}-{id}"), t, p);
    }

    fn sealed(&mut self, subject: Uuid) -> ledger_events::pii::Sealed {
        ledger_events::pii::Sealed {
            v: 1,
            sub: subject,
            kid: Uuid::new_v4(),
            n: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
            ct: format!("{:x}", self.rng.gen::<u128>()),
        }
    }

    /// A booking id: mostly one that exists, now and then one that does not.
    fn some_booking(&mut self) -> Uuid {
        if self.bookings.is_empty() || self.rng.gen_bool(0.05) {
            Uuid::new_v4()
        } else {
            self.bookings[self.rng.gen_range(0..self.bookings.len())]
        }
    }

    fn some_payment(&mut self) -> Uuid {
        if self.payments.is_empty() || self.rng.gen_bool(0.05) {
            Uuid::new_v4()
        } else {
            self.payments[self.rng.gen_range(0..self.payments.len())]
        }
    }

    /// An instant within four days, on a half hour, often near some zone's midnight.
    fn instant(&mut self) -> DateTime<Utc> {
        instant("2030-06-01T00:00:00Z") + chrono::Duration::minutes(30 * self.rng.gen_range(0..192))
    }

    fn step(&mut self) {
        use ledger_events::booking as b;
        use ledger_events::ids::*;
        use ledger_events::payment as p;
        use ledger_events::venue as v;
        let unregistered: Vec<usize> = (0..self.venues.len())
            .filter(|i| !self.venues[*i].2)
            .collect();
        match self.rng.gen_range(0..100) {
            // Venues get registered over time, but the last one never.
            0..=3 if unregistered.len() > 1 => {
                let i = unregistered[0];
                self.venues[i].2 = true;
                let (id, zone, _) = self.venues[i];
                let e = VenueEvent::VenueRegistered(v::VenueRegistered {
                    venue_id: VenueId(id),
                    name: format!("Venue in {zone}"),
                    timezone: zone.into(),
                });
                self.domain("venue", id, e);
            }
            4..=8 => {
                let (venue, ..) = self.venues[self.rng.gen_range(0..self.venues.len())];
                let resource = Uuid::new_v4();
                self.resources.push((venue, resource));
                let e = VenueEvent::ResourceAdded(v::ResourceAdded {
                    venue_id: VenueId(venue),
                    resource_id: ResourceId(resource),
                    name: "Table".into(),
                    capacity: self.rng.gen_range(1..20),
                });
                self.domain("venue", venue, e);
            }
            9..=35 => {
                let (venue, resource) = if self.resources.is_empty() || self.rng.gen_bool(0.1) {
                    (
                        self.venues[self.rng.gen_range(0..self.venues.len())].0,
                        Uuid::new_v4(),
                    )
                } else {
                    self.resources[self.rng.gen_range(0..self.resources.len())]
                };
                let id = Uuid::new_v4();
                self.bookings.push(id);
                let subject = self.subjects[self.rng.gen_range(0..self.subjects.len())];
                let starts_at = self.instant();
                let customer = self.sealed(subject);
                let e = BookingEvent::BookingRequested(b::BookingRequested {
                    booking_id: BookingId(id),
                    venue_id: VenueId(venue),
                    resource_id: ResourceId(resource),
                    starts_at,
                    ends_at: starts_at + chrono::Duration::minutes(90),
                    party_size: self.rng.gen_range(1..13),
                    subject_id: SubjectId(subject),
                    customer,
                });
                self.domain("booking", id, e);
            }
            36..=43 => {
                let id = self.some_booking();
                let starts_at = self.instant();
                let e = BookingEvent::BookingRescheduled(b::BookingRescheduled {
                    booking_id: BookingId(id),
                    resource_id: ResourceId(Uuid::new_v4()),
                    starts_at,
                    ends_at: starts_at + chrono::Duration::minutes(60),
                    previous_resource_id: ResourceId(Uuid::new_v4()),
                    previous_starts_at: starts_at,
                    previous_ends_at: starts_at,
                });
                self.domain("booking", id, e);
            }
            44..=63 => {
                let id = self.some_booking();
                let booking_id = BookingId(id);
                let e = match self.rng.gen_range(0..5) {
                    0 | 1 => BookingEvent::BookingConfirmed(b::BookingConfirmed { booking_id }),
                    2 => {
                        let reason = if self.rng.gen_bool(0.5) {
                            let subject = self.subjects[0];
                            Some(self.sealed(subject))
                        } else {
                            None
                        };
                        BookingEvent::BookingCancelled(b::BookingCancelled { booking_id, reason })
                    }
                    3 => BookingEvent::GuestCheckedIn(b::GuestCheckedIn { booking_id }),
                    _ => BookingEvent::BookingNoShow(b::BookingNoShow { booking_id }),
                };
                self.domain("booking", id, e);
            }
            64..=73 => {
                let booking = self.some_booking();
                let id = Uuid::new_v4();
                self.payments.push(id);
                let e = PaymentEvent::PaymentAuthorized(p::PaymentAuthorized {
                    payment_id: PaymentId(id),
                    booking_id: BookingId(booking),
                    venue_id: VenueId(self.venues[0].0),
                    kind: if self.rng.gen_bool(0.5) {
                        p::PaymentKind::Deposit
                    } else {
                        p::PaymentKind::Balance
                    },
                    amount_minor: self.rng.gen_range(1..500) * 100,
                    currency: ledger_events::money::Currency::parse("EUR")
                        .unwrap_or_else(|e| panic!("{e:?}")),
                });
                self.domain("payment", id, e);
            }
            74..=89 => {
                let id = self.some_payment();
                let payment_id = PaymentId(id);
                let amount_minor = self.rng.gen_range(1..200) * 100;
                let e = match self.rng.gen_range(0..5) {
                    0..=2 => PaymentEvent::PaymentCaptured(p::PaymentCaptured {
                        payment_id,
                        amount_minor,
                        provider_event_id: None,
                    }),
                    3 => PaymentEvent::PaymentRefunded(p::PaymentRefunded {
                        payment_id,
                        amount_minor,
                        provider_event_id: Some("evt_1".into()),
                    }),
                    _ => PaymentEvent::PaymentFailed(p::PaymentFailed {
                        payment_id,
                        provider_event_id: None,
                    }),
                };
                self.domain("payment", id, e);
            }
            90..=94 => {
                let subject = self.subjects[self.rng.gen_range(0..self.subjects.len())];
                let payload = json!({"subject_id": subject, "key_id": Uuid::new_v4(),
                                     "key_fingerprint": "00"});
                self.push(format!("subject-{subject}"), "SubjectErased", payload);
            }
            _ => {
                let payload = json!({"command": "CancelBooking", "status": 409});
                self.push("audit-20300601".into(), "CommandAudited", payload);
            }
        }
    }

    pub(crate) fn log(seed: u64, len: usize) -> Vec<RecordedEvent> {
        let mut g = LogGenerator::new(seed);
        while g.events.len() < len {
            g.step();
        }
        g.events
    }
}

/// A scratch database, migrated: its pool, and what drops it.
pub(crate) async fn scratch_database() -> (sqlx::PgPool, PgConnection, String) {
    let admin = admin_url();
    let name = format!("ledger_folds_{}", Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = ledger::app::connect(&with_database(&admin, &name), 4)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    ledger::app::migrate(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    (pool, conn, name)
}

pub(crate) async fn drop_database(pool: sqlx::PgPool, mut admin: PgConnection, name: &str) {
    pool.close().await;
    let _ = sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
}

/// A schema holding empty copies of a projection's tables.
pub(crate) async fn fresh_schema(pool: &sqlx::PgPool, schema: &str, projection: &str) {
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for table in ledger_projections::tables(projection).unwrap_or_default() {
        sqlx::query(&format!(
            "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Applies `events` in one transaction, into `schema`: one by one with the per-event fold, or as
/// a batch with the set-based one.
pub(crate) async fn fold_into(
    pool: &sqlx::PgPool,
    schema: &str,
    projection: &str,
    events: &[RecordedEvent],
    one_by_one: bool,
) -> Result<(), ledger_projections::ProjectionError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('search_path', $1, true)")
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    if one_by_one {
        for e in events {
            ledger_projections::apply_one(&mut tx, projection, e).await?;
        }
    } else {
        ledger_projections::apply(&mut tx, projection, events).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Every row of the projection's tables in `schema`, as text, table by table.
pub(crate) async fn rows_of(
    pool: &sqlx::PgPool,
    schema: &str,
    projection: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for table in ledger_projections::tables(projection).unwrap_or_default() {
        let rows: String = sqlx::query_scalar(&format!(
            "SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') FROM {schema}.{table} t"
        ))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        out.push((table.to_string(), rows));
    }
    out
}

/// Property: for generated logs cut into batches of random sizes (one event, a few, many, the
/// rest), every table of each projection holds the same rows after each batch whether the batch
/// went through the set-based fold or, event by event, through the per-event fold.
#[tokio::test]
async fn the_set_based_fold_equals_the_per_event_fold_on_generated_logs() {
    let (pool, admin, name) = scratch_database().await;
    let mut seen_types: BTreeMap<String, usize> = BTreeMap::new();
    // The most bookings one batch requested: small batches insert with one statement, large ones
    // (64 new rows and more) by COPY; both must be covered.
    let mut most_requested = 0;
    for seed in 0..6u64 {
        let events = LogGenerator::log(seed, 400);
        for e in &events {
            *seen_types.entry(e.event_type.clone()).or_default() += 1;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xba7c4);
        for projection in ledger_projections::PROJECTIONS {
            fresh_schema(&pool, "per_event", projection).await;
            fresh_schema(&pool, "set_based", projection).await;
            let mut at = 0;
            let mut batches = 0;
            while at < events.len() {
                let len = match rng.gen_range(0..4) {
                    0 => 1,
                    1 => rng.gen_range(2..10),
                    2 => rng.gen_range(10..150),
                    _ => events.len(),
                };
                let batch = &events[at..(at + len).min(events.len())];
                at += batch.len();
                batches += 1;
                most_requested = most_requested.max(
                    batch
                        .iter()
                        .filter(|e| e.event_type == "BookingRequested")
                        .count(),
                );
                fold_into(&pool, "per_event", projection, batch, true)
                    .await
                    .unwrap_or_else(|e| panic!("per-event fold, seed {seed}: {e}"));
                fold_into(&pool, "set_based", projection, batch, false)
                    .await
                    .unwrap_or_else(|e| panic!("set-based fold, seed {seed}: {e}"));
                let expected = rows_of(&pool, "per_event", projection).await;
                let got = rows_of(&pool, "set_based", projection).await;
                for ((table, want), (_, have)) in expected.iter().zip(&got) {
                    assert!(
                        want == have,
                        "seed {seed}, {projection}, {table} after position {at} \
                         (batch {batches} of {} events):\nper-event:\n{want}\nset-based:\n{have}",
                        batch.len()
                    );
                }
            }
            // The generated logs fill the tables they fold into.
            let filled = rows_of(&pool, "set_based", projection).await;
            assert!(
                filled.iter().all(|(_, rows)| !rows.is_empty()),
                "seed {seed}, {projection}: {filled:?}"
            );
        }
    }
    for t in [
        "VenueRegistered",
        "ResourceAdded",
        "BookingRequested",
        "BookingRescheduled",
        "BookingConfirmed",
        "BookingCancelled",
        "GuestCheckedIn",
        "BookingNoShow",
        "PaymentAuthorized",
        "PaymentCaptured",
        "PaymentRefunded",
        "PaymentFailed",
        "SubjectErased",
        "CommandAudited",
    ] {
        assert!(
            seen_types.get(t).copied().unwrap_or(0) >= 10,
            "the generated logs cover {t}: {seen_types:?}"
        );
    }
    assert!(
        most_requested >= 80,
        "a batch large enough to COPY: {most_requested}"
    );
    drop_database(pool, admin, &name).await;
}

/// What the per-event fold refuses (a row created twice, in one batch or across two), the
/// set-based one refuses too, and a refused batch leaves nothing behind.
#[tokio::test]
async fn the_set_based_fold_refuses_a_row_created_twice() {
    let (pool, admin, name) = scratch_database().await;
    let events = LogGenerator::log(7, 60);
    let requested = events
        .iter()
        .find(|e| e.event_type == "BookingRequested")
        .cloned()
        .unwrap_or_else(|| panic!("the log requests a booking"));
    let registered = events
        .iter()
        .find(|e| e.event_type == "VenueRegistered")
        .cloned()
        .unwrap_or_else(|| panic!("the log registers a venue"));
    for projection in ledger_projections::PROJECTIONS {
        for twice in [&requested, &registered] {
            for one_by_one in [true, false] {
                let schema = "twice";
                fresh_schema(&pool, schema, projection).await;
                // In one batch.
                let batch = [twice.clone(), twice.clone()];
                let r = fold_into(&pool, schema, projection, &batch, one_by_one).await;
                assert!(r.is_err(), "{projection} {}: {r:?}", twice.event_type);
                assert!(
                    rows_of(&pool, schema, projection)
                        .await
                        .iter()
                        .all(|(_, rows)| rows.is_empty()),
                    "a refused batch leaves nothing"
                );
                // Across two.
                fold_into(&pool, schema, projection, &batch[..1], one_by_one)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let r = fold_into(&pool, schema, projection, &batch[1..], one_by_one).await;
                assert!(r.is_err(), "{projection} {}: {r:?}", twice.event_type);
            }
        }
    }
    drop_database(pool, admin, &name).await;
}

/// The worker's transaction: events at or below the checkpoint are skipped (a redelivery changes
/// nothing), a gap is refused with nothing of its batch applied, and each commit that moves the
/// checkpoint notifies `name:position` (what `min_position` and the live board wait on).
#[tokio::test]
async fn apply_batch_skips_what_it_applied_refuses_gaps_and_notifies_each_commit() {
    let (pool, admin, name) = scratch_database().await;
    let events = LogGenerator::log(11, 120);
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    listener
        .listen("ledger_projection")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let board = ledger_projections::booking_board::NAME;
    let checkpoint = |pool: sqlx::PgPool| async move {
        let mut conn = pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
        ledger_projections::checkpoint(&mut conn, board)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let apply = |range: std::ops::Range<usize>| {
        let (pool, events) = (pool.clone(), events[range].to_vec());
        async move { ledger_projections::apply_batch(&pool, board, &events).await }
    };
    assert_eq!(apply(0..50).await.unwrap_or_else(|e| panic!("{e}")), 50);
    let n = listener.recv().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n.payload(), format!("{board}:50"));
    let after_first = rows_of(&pool, "public", board).await;

    // A redelivery of what was applied changes nothing and notifies nothing.
    assert_eq!(apply(10..50).await.unwrap_or_else(|e| panic!("{e}")), 50);
    assert_eq!(rows_of(&pool, "public", board).await, after_first);
    // Overlapping: the known part is skipped, the rest applied.
    assert_eq!(apply(40..80).await.unwrap_or_else(|e| panic!("{e}")), 80);
    let n = listener.recv().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        n.payload(),
        format!("{board}:80"),
        "no notification for the redelivery"
    );

    // A gap at the start or in the middle: refused, and nothing of the batch is applied.
    let before = rows_of(&pool, "public", board).await;
    match apply(81..100).await {
        Err(ledger_projections::ProjectionError::Gap { checkpoint, got }) => {
            assert_eq!((checkpoint, got), (80, 82))
        }
        other => panic!("{other:?}"),
    }
    let mut holed = events[80..90].to_vec();
    holed.remove(4);
    match ledger_projections::apply_batch(&pool, board, &holed).await {
        Err(ledger_projections::ProjectionError::Gap { checkpoint, got }) => {
            assert_eq!((checkpoint, got), (84, 86))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(checkpoint(pool.clone()).await, 80);
    assert_eq!(rows_of(&pool, "public", board).await, before);

    // The rest goes on from the checkpoint, and equals the per-event fold of the whole log.
    assert_eq!(apply(80..120).await.unwrap_or_else(|e| panic!("{e}")), 120);
    let n = listener.recv().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n.payload(), format!("{board}:120"));
    fresh_schema(&pool, "per_event", board).await;
    fold_into(&pool, "per_event", board, &events, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        rows_of(&pool, "public", board).await,
        rows_of(&pool, "per_event", board).await
    );
    drop(listener);
    drop_database(pool, admin, &name).await;
}
