//! Queries through the whole read side: append → relay → JetStream → projection → query.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::json;

fn position(a: &Answer) -> i64 {
    a.body["position"]
        .as_i64()
        .unwrap_or_else(|| panic!("no position in {a:?}"))
}

#[tokio::test]
async fn a_query_with_min_position_sees_the_booking_just_made_with_personal_data_opened() {
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
    assert_eq!(b.status, 201);
    let at = position(&b);
    let detail = app
        .send(
            app.client
                .get(format!(
                    "{}/v1/bookings/{}?min_position={at}",
                    app.base,
                    b.id()
                ))
                .bearer_auth(&staff.0),
        )
        .await;
    assert_eq!(detail.status, 200, "{detail:?}");
    let included: i64 = detail
        .header("x-ledger-position")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(included >= at);
    assert_eq!(detail.body["status"], "pending");
    assert_eq!(detail.body["customer"]["email"], email);
    assert_eq!(detail.body["customer"]["name"], "Grace Hopper");
    assert_eq!(detail.body["notes"], "window seat");
    assert_eq!(detail.body["version"], 1);
    assert_eq!(detail.body["payments"], json!([]));

    // The board of the venue's local day (Europe/Berlin: 18:00Z is 20:00 local, same day).
    let board = app
        .send(
            app.client
                .get(format!(
                    "{}/v1/bookings?venue_id={venue}&date=2030-06-01",
                    app.base
                ))
                .header("X-Ledger-Min-Position", at.to_string())
                .bearer_auth(&staff.0),
        )
        .await;
    assert_eq!(board.status, 200, "{board:?}");
    assert_eq!(board.body["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(board.body["next_cursor"], serde_json::Value::Null);
}

#[tokio::test]
async fn payments_and_lifecycle_show_up_in_the_detail() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let b = app.book(&staff, venue, table, 18, 20).await;
    let id = b.id();
    app.post(&format!("/v1/bookings/{id}/confirm"), &staff, json!({}))
        .await;
    let p = app
        .post(
            &format!("/v1/bookings/{id}/payments"),
            &staff,
            json!({"amount_minor": 5000, "currency": "EUR", "kind": "deposit"}),
        )
        .await;
    assert_eq!(p.status, 201, "{p:?}");
    let c = app
        .post(
            &format!("/v1/payments/{}/capture", p.id()),
            &staff,
            json!({"amount_minor": 3000}),
        )
        .await;
    let r = app
        .post(
            &format!("/v1/payments/{}/refund", p.id()),
            &staff,
            json!({"amount_minor": 1000}),
        )
        .await;
    assert_eq!((c.status, r.status), (200, 200));
    let detail = app
        .send(
            app.client
                .get(format!(
                    "{}/v1/bookings/{id}?min_position={}",
                    app.base,
                    position(&r)
                ))
                .bearer_auth(&staff.0),
        )
        .await;
    assert_eq!(detail.body["status"], "confirmed");
    assert_eq!(detail.body["paid_minor"], 3000);
    assert_eq!(detail.body["refunded_minor"], 1000);
    assert_eq!(detail.body["payments"][0]["status"], "partially_refunded");
    assert_eq!(detail.body["payments"][0]["authorised_minor"], 5000);
}

#[tokio::test]
async fn the_board_pages_without_duplicates_or_gaps() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let mut last = 0;
    for h in 0..7 {
        last = position(&app.book(&staff, venue, table, h, h + 1).await);
        last = last.max(position(&app.book(&staff, venue, room, h, h + 1).await));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!(
            "{}/v1/bookings?venue_id={venue}&limit=3&min_position={last}",
            app.base
        );
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page = app.send(app.client.get(url).bearer_auth(&staff.0)).await;
        assert_eq!(page.status, 200, "{page:?}");
        for item in page.body["items"].as_array().cloned().unwrap_or_default() {
            seen.push(item["id"].as_str().unwrap_or_default().to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (14, 14));
}

#[tokio::test]
async fn roles_and_scopes_apply_to_queries() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let (other, other_table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let b = app.book(&staff, venue, table, 18, 20).await;
    let o = app.book(&staff, other, other_table, 18, 20).await;
    let at = position(&o).max(position(&b));
    let get = |path: String, t: &Token| {
        app.send(
            app.client
                .get(format!("{}{path}", app.base))
                .bearer_auth(&t.0),
        )
    };

    let scoped = app.token_with(Role::Door, None, Some(vec![venue]));
    assert_eq!(
        get(
            format!("/v1/bookings/{}?min_position={at}", b.id()),
            &scoped
        )
        .await
        .status,
        200
    );
    let hidden = get(
        format!("/v1/bookings/{}?min_position={at}", o.id()),
        &scoped,
    )
    .await;
    assert_eq!((hidden.status, hidden.problem()), (404, "not-found"));
    let board = get(format!("/v1/bookings?min_position={at}"), &scoped).await;
    assert_eq!(
        board.body["items"].as_array().map(Vec::len),
        Some(1),
        "only their venue"
    );
    let venues = get(format!("/v1/venues?min_position={at}"), &scoped).await;
    assert_eq!(venues.body["items"].as_array().map(Vec::len), Some(1));

    let auditor = app.token(Role::Auditor);
    assert_eq!(
        get(format!("/v1/bookings?min_position={at}"), &auditor)
            .await
            .status,
        403
    );

    let subject: uuid::Uuid =
        serde_json::from_value(b.body["subject_id"].clone()).unwrap_or_default();
    let me = app.token_with(Role::Customer, Some(subject), None);
    let mine = get(
        format!("/v1/customers/{subject}/bookings?min_position={at}"),
        &me,
    )
    .await;
    assert_eq!(mine.status, 200, "{mine:?}");
    assert_eq!(mine.body["items"].as_array().map(Vec::len), Some(1));
    let someone = app.token_with(Role::Customer, Some(uuid::Uuid::new_v4()), None);
    assert_eq!(
        get(format!("/v1/customers/{subject}/bookings"), &someone)
            .await
            .status,
        404
    );
    assert_eq!(
        get(format!("/v1/bookings/{}", b.id()), &someone)
            .await
            .status,
        404
    );
    assert_eq!(
        get(format!("/v1/bookings?min_position={at}"), &me)
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn a_position_the_read_model_cannot_reach_is_projection_lagging_with_retry_after() {
    let app = spawn_app().await;
    let staff = app.token(Role::Staff);
    let a = app
        .send(
            app.client
                .get(format!("{}/v1/bookings?min_position=999999", app.base))
                .bearer_auth(&staff.0),
        )
        .await;
    assert_eq!((a.status, a.problem()), (503, "projection-lagging"));
    assert_eq!(a.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn bad_query_parameters_are_400_naming_the_parameter() {
    let app = spawn_app().await;
    let staff = app.token(Role::Staff);
    for (query, field) in [
        ("venue_id=nope", "venue_id"),
        ("date=01-06-2030", "date"),
        ("status=lost", "status"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("cursor=%%%", "cursor"),
        ("min_position=soon", "min_position"),
    ] {
        let a = app
            .send(
                app.client
                    .get(format!("{}/v1/bookings?{query}", app.base))
                    .bearer_auth(&staff.0),
            )
            .await;
        assert_eq!(
            (a.status, a.problem()),
            (400, "validation"),
            "{query}: {a:?}"
        );
        assert_eq!(a.body["field"], field, "{query}");
    }
}
