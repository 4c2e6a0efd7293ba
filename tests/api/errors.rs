//! Bad input: every refusal is `application/problem+json` with the contract's status and slug,
//! validation problems name the field, and nothing is appended to the log.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::{json, Value};
use uuid::Uuid;

fn raw_json<'a>(token: &'a str, body: &[u8]) -> Raw<'a> {
    Raw {
        token: Some(token),
        content_type: Some("application/json"),
        body: body.to_vec(),
        headers: vec![],
    }
}

#[tokio::test]
async fn malformed_json_is_a_400_validation_problem_and_appends_nothing() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let bearer = format!("Bearer {}", app.token(Role::Staff).0);
    let truncated = format!(r#"{{"venue_id": "{venue}", "resource_id": "{table}", "#);
    for body in [truncated.as_bytes(), b"not json at all", b"{} {}", b"null"] {
        let a = app
            .refused(
                app.post_raw("/v1/bookings", raw_json(&bearer, body)),
                400,
                "validation",
            )
            .await;
        assert!(!a.field().is_empty(), "a validation problem names a field");
    }
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_a_400_naming_the_field() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let mut body = booking_body(venue, table, 18, 20, &unique_email());
    body["party_size"] = json!("two");
    let a = app
        .refused(app.post("/v1/bookings", &staff, body), 400, "validation")
        .await;
    assert_eq!(a.field(), "party_size");
    assert!(a.body["detail"]
        .as_str()
        .unwrap_or("")
        .contains("party_size"));

    let mut nested = booking_body(venue, table, 18, 20, &unique_email());
    nested["customer"]["email"] = json!(42);
    let a = app
        .refused(app.post("/v1/bookings", &staff, nested), 400, "validation")
        .await;
    assert_eq!(a.field(), "customer.email");

    let a = app
        .refused(
            app.post(
                &format!("/v1/venues/{venue}/resources"),
                &app.token(Role::Admin),
                json!({"name": "Bar", "capacity": "lots"}),
            ),
            400,
            "validation",
        )
        .await;
    assert_eq!(a.field(), "capacity");
}

#[tokio::test]
async fn a_missing_field_is_a_400_naming_it() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    for (path, field) in [
        (vec!["starts_at"], "starts_at"),
        (vec!["party_size"], "party_size"),
        (vec!["customer", "email"], "customer.email"),
    ] {
        let mut body = booking_body(venue, table, 18, 20, &unique_email());
        let parent = path[..path.len() - 1]
            .iter()
            .fold(&mut body, |v, k| &mut v[*k]);
        if let Value::Object(map) = parent {
            map.remove(path[path.len() - 1]);
        }
        let a = app
            .refused(app.post("/v1/bookings", &staff, body), 400, "validation")
            .await;
        assert_eq!(a.field(), field, "{a:?}");
    }
    let a = app
        .refused(
            app.post("/v1/venues", &app.token(Role::Admin), json!({"name": "X"})),
            400,
            "validation",
        )
        .await;
    assert_eq!(a.field(), "timezone");
}

#[tokio::test]
async fn an_unknown_field_is_a_400_naming_it() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let mut body = booking_body(venue, table, 18, 20, &unique_email());
    body["discount"] = json!(50);
    let a = app
        .refused(app.post("/v1/bookings", &staff, body), 400, "validation")
        .await;
    assert!(
        a.body["detail"].as_str().unwrap_or("").contains("discount"),
        "{a:?}"
    );

    let mut nested = booking_body(venue, table, 18, 20, &unique_email());
    nested["customer"]["vip"] = json!(true);
    let a = app
        .refused(app.post("/v1/bookings", &staff, nested), 400, "validation")
        .await;
    assert!(
        a.body["detail"].as_str().unwrap_or("").contains("vip"),
        "{a:?}"
    );

    // Commands whose body is `{}` take nothing else either.
    let b = app.book(&staff, venue, table, 18, 20).await;
    app.refused(
        app.post(
            &format!("/v1/bookings/{}/confirm", b.id()),
            &staff,
            json!({"force": true}),
        ),
        400,
        "validation",
    )
    .await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let bearer = format!("Bearer {}", app.token(Role::Staff).0);
    let body = booking_body(venue, table, 18, 20, &unique_email()).to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        app.refused(
            app.post_raw(
                "/v1/bookings",
                Raw {
                    token: Some(&bearer),
                    content_type,
                    body: body.clone().into_bytes(),
                    headers: vec![],
                },
            ),
            415,
            "unsupported-media-type",
        )
        .await;
    }
    // The media type's parameters and `+json` suffixes are fine.
    for (content_type, start) in [
        ("application/json; charset=utf-8", 10),
        ("application/merge-patch+json", 12),
    ] {
        let a = app
            .post_raw(
                "/v1/bookings",
                Raw {
                    token: Some(&bearer),
                    content_type: Some(content_type),
                    body: booking_body(venue, table, start, start + 1, &unique_email())
                        .to_string()
                        .into_bytes(),
                    headers: vec![],
                },
            )
            .await;
        assert_eq!(a.status, 201, "{content_type}: {a:?}");
    }
}

#[tokio::test]
async fn a_body_over_64_kib_is_413() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let mut body = booking_body(venue, table, 18, 20, &unique_email());
    body["notes"] = json!("x".repeat(70 * 1024));
    app.refused(
        app.post("/v1/bookings", &staff, body),
        413,
        "payload-too-large",
    )
    .await;
    let big = json!({"provider_event_id": "x".repeat(70 * 1024)}).to_string();
    app.refused(
        app.webhook(big.as_bytes(), Some(app.signature(big.as_bytes()))),
        413,
        "payload-too-large",
    )
    .await;
    // Just under the limit is read (and then judged on its merits: notes are at most 2000).
    let mut under = booking_body(venue, table, 18, 20, &unique_email());
    under["notes"] = json!("x".repeat(60 * 1024));
    let a = app
        .refused(app.post("/v1/bookings", &staff, under), 422, "validation")
        .await;
    assert_eq!(a.field(), "notes");
}

#[tokio::test]
async fn unknown_and_malformed_ids_in_paths_are_404() {
    let app = spawn_app().await;
    let (_, table, _, staff) = app.booked().await;
    let admin = app.token(Role::Admin);
    let unknown = Uuid::now_v7();
    for id in [unknown.to_string(), "not-a-uuid".to_string()] {
        for action in ["confirm", "reschedule", "cancel", "check-in", "no-show"] {
            let body = if action == "reschedule" {
                json!({"starts_at": at(10), "ends_at": at(11)})
            } else {
                json!({})
            };
            app.refused(
                app.post(&format!("/v1/bookings/{id}/{action}"), &admin, body),
                404,
                "not-found",
            )
            .await;
        }
        app.refused(
            app.post(
                &format!("/v1/bookings/{id}/payments"),
                &staff,
                json!({"amount_minor": 100, "currency": "EUR", "kind": "deposit"}),
            ),
            404,
            "not-found",
        )
        .await;
        for action in ["capture", "refund"] {
            app.refused(
                app.post(
                    &format!("/v1/payments/{id}/{action}"),
                    &staff,
                    json!({"amount_minor": 1}),
                ),
                404,
                "not-found",
            )
            .await;
        }
        app.refused(
            app.post(
                &format!("/v1/venues/{id}/resources"),
                &admin,
                json!({"name": "Bar", "capacity": 2}),
            ),
            404,
            "not-found",
        )
        .await;
    }
    // An unknown venue in a booking body is as unknown as one in a path.
    let a = app
        .refused(
            app.post(
                "/v1/bookings",
                &staff,
                booking_body(unknown, table, 10, 11, &unique_email()),
            ),
            404,
            "not-found",
        )
        .await;
    assert!(a.body["detail"].as_str().unwrap_or("").contains("venue"));
    // A webhook naming an unknown payment.
    let body = json!({"provider_event_id": "evt_1", "payment_id": unknown,
                      "type": "captured", "amount_minor": 1})
    .to_string();
    app.refused(
        app.webhook(body.as_bytes(), Some(app.signature(body.as_bytes()))),
        404,
        "not-found",
    )
    .await;
}

#[tokio::test]
async fn an_unknown_route_or_method_is_a_problem() {
    let app = spawn_app().await;
    let staff = app.token(Role::Staff);
    for path in ["/v1/nope", "/v2/bookings", "/v1/bookings/x/explode"] {
        app.post(path, &staff, json!({}))
            .await
            .assert_problem(404, "not-found");
    }
    let a = app
        .send(
            app.client
                .delete(format!("{}/v1/bookings", app.base))
                .bearer_auth(&staff.0),
        )
        .await;
    assert_eq!(a.status, 405, "{a:?}");
    assert_eq!(a.header("content-type"), Some("application/problem+json"));
}

#[tokio::test]
async fn a_slot_ending_before_it_starts_or_lasting_over_a_day_is_422_naming_ends_at() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    for ends_at in [at(10), at(9), "2030-06-02T10:00:01Z".to_string()] {
        let mut body = booking_body(venue, table, 10, 11, &unique_email());
        body["starts_at"] = json!(at(10));
        body["ends_at"] = json!(ends_at);
        let a = app
            .refused(app.post("/v1/bookings", &staff, body), 422, "validation")
            .await;
        assert_eq!(a.field(), "ends_at", "{ends_at}");
        let a = app
            .refused(
                app.post(
                    &format!("/v1/bookings/{booking}/reschedule"),
                    &staff,
                    json!({"starts_at": at(10), "ends_at": ends_at}),
                ),
                422,
                "validation",
            )
            .await;
        assert_eq!(a.field(), "ends_at", "reschedule to {ends_at}");
    }
    // Exactly 24 hours is allowed; an offset other than Z is the same instant.
    let mut day = booking_body(venue, table, 0, 0, &unique_email());
    day["starts_at"] = json!("2030-06-03T00:00:00Z");
    day["ends_at"] = json!("2030-06-04T02:00:00+02:00");
    let a = app.post("/v1/bookings", &staff, day).await;
    assert_eq!(a.status, 201, "{a:?}");
}

#[tokio::test]
async fn a_party_size_outside_one_to_capacity_is_422() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    for size in [0, -1, 5, 100_000] {
        let mut body = booking_body(venue, table, 18, 20, &unique_email());
        body["party_size"] = json!(size);
        let a = app
            .refused(app.post("/v1/bookings", &staff, body), 422, "validation")
            .await;
        assert_eq!(a.field(), "party_size", "{size}");
    }
    let mut full = booking_body(venue, table, 18, 20, &unique_email());
    full["party_size"] = json!(4);
    assert_eq!(app.post("/v1/bookings", &staff, full).await.status, 201);
}

#[tokio::test]
async fn an_unknown_resource_is_422_naming_resource_id() {
    let app = spawn_app().await;
    let (venue, _, _) = app.venue().await;
    let (_, other_table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    for resource in [Uuid::now_v7(), other_table] {
        let a = app
            .refused(
                app.post(
                    "/v1/bookings",
                    &staff,
                    booking_body(venue, resource, 18, 20, &unique_email()),
                ),
                422,
                "validation",
            )
            .await;
        assert_eq!(a.field(), "resource_id");
    }
}

#[tokio::test]
async fn a_venue_with_an_unknown_timezone_or_no_name_is_422() {
    let app = spawn_app().await;
    let admin = app.token(Role::Admin);
    for (body, field) in [
        (
            json!({"name": "Moon", "timezone": "Mars/Olympus_Mons"}),
            "timezone",
        ),
        (json!({"name": "Moon", "timezone": ""}), "timezone"),
        (json!({"name": "  ", "timezone": "Europe/Berlin"}), "name"),
    ] {
        let a = app
            .refused(app.post("/v1/venues", &admin, body), 422, "validation")
            .await;
        assert_eq!(a.field(), field);
    }
}

#[tokio::test]
async fn a_resource_of_capacity_zero_or_a_duplicate_name_is_422() {
    let app = spawn_app().await;
    let (venue, _, _) = app.venue().await;
    let admin = app.token(Role::Admin);
    let path = format!("/v1/venues/{venue}/resources");
    for (body, field) in [
        (json!({"name": "Bar", "capacity": 0}), "capacity"),
        (json!({"name": "Bar", "capacity": -3}), "capacity"),
        (json!({"name": "Table 1", "capacity": 2}), "name"),
    ] {
        let a = app
            .refused(app.post(&path, &admin, body), 422, "validation")
            .await;
        assert_eq!(a.field(), field);
    }
    let ok = app
        .post(&path, &admin, json!({"name": "Bar", "capacity": 1}))
        .await;
    assert_eq!(ok.status, 201, "{ok:?}");
    assert_eq!(ok.body["venue_id"], json!(venue));
}

#[tokio::test]
async fn times_without_an_offset_are_400_naming_the_field() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    let mut body = booking_body(venue, table, 10, 11, &unique_email());
    body["starts_at"] = json!("2030-06-01T10:00:00");
    let a = app
        .refused(app.post("/v1/bookings", &staff, body), 400, "validation")
        .await;
    assert_eq!(a.field(), "starts_at");
    let a = app
        .refused(
            app.post(
                &format!("/v1/bookings/{booking}/reschedule"),
                &staff,
                json!({"starts_at": at(10), "ends_at": "2030-06-01 11:00"}),
            ),
            400,
            "validation",
        )
        .await;
    assert_eq!(a.field(), "ends_at");
}

#[tokio::test]
async fn a_malformed_email_or_phone_is_422_naming_the_field() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    for email in ["not-an-email", "a@b", "two words@example.org", ""] {
        let a = app
            .refused(
                app.post(
                    "/v1/bookings",
                    &staff,
                    booking_body(venue, table, 18, 20, email),
                ),
                422,
                "validation",
            )
            .await;
        assert_eq!(a.field(), "customer.email", "{email}");
    }
    let mut body = booking_body(venue, table, 18, 20, &unique_email());
    body["customer"]["phone"] = json!("call me maybe");
    let a = app
        .refused(app.post("/v1/bookings", &staff, body), 422, "validation")
        .await;
    assert_eq!(a.field(), "customer.phone");
    let mut body = booking_body(venue, table, 18, 20, &unique_email());
    body["customer"]["name"] = json!("   ");
    let a = app
        .refused(app.post("/v1/bookings", &staff, body), 422, "validation")
        .await;
    assert_eq!(a.field(), "customer.name");
}

#[tokio::test]

async fn a_truncated_json_body_names_where_it_broke_off() {
    let app = spawn_app().await;
    let bearer = format!("Bearer {}", app.token(Role::Admin).0);
    for (body, field) in [
        (br#"{"name": "Cut", "timezone": "#.as_slice(), "timezone"),
        (br#"{"name": "Cut""#.as_slice(), "body"),
        (br#"{"#.as_slice(), "body"),
    ] {
        let a = app
            .refused(
                app.post_raw("/v1/venues", raw_json(&bearer, body)),
                400,
                "validation",
            )
            .await;
        assert_eq!(a.field(), field, "{a:?}");
    }
}

#[tokio::test]

async fn a_json_array_is_not_a_command_body() {
    let app = spawn_app().await;
    let admin = app.token(Role::Admin);
    let a = app
        .refused(
            app.post(
                "/v1/venues",
                &admin,
                json!(["Array Venue", "Europe/Berlin"]),
            ),
            400,
            "validation",
        )
        .await;
    assert_eq!(a.field(), "body", "{a:?}");
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    app.refused(
        app.post(
            "/v1/bookings",
            &staff,
            json!([
                venue,
                table,
                at(18),
                at(20),
                2,
                ["Ann", unique_email(), null],
                null
            ]),
        ),
        400,
        "validation",
    )
    .await;
}
