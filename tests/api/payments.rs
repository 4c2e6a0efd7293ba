//! Payments: authorise for a booking, capture at most what is authorised, refund at most what is
//! captured and not yet refunded.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::{json, Value};
use uuid::Uuid;

async fn capture(app: &TestApp, token: &Token, payment: Uuid, body: Value) -> Answer {
    app.post(&format!("/v1/payments/{payment}/capture"), token, body)
        .await
}

async fn refund(app: &TestApp, token: &Token, payment: Uuid, amount: i64) -> Answer {
    app.post(
        &format!("/v1/payments/{payment}/refund"),
        token,
        json!({"amount_minor": amount}),
    )
    .await
}

fn assert_money(a: &Answer, status: &str, captured: i64, refunded: i64) {
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["status"], status, "{a:?}");
    assert_eq!(a.body["captured_minor"], captured, "{a:?}");
    assert_eq!(a.body["refunded_minor"], refunded, "{a:?}");
}

#[tokio::test]
async fn authorising_a_payment_answers_201_with_its_id_and_status_authorized() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let p = app
        .post(
            &format!("/v1/bookings/{booking}/payments"),
            &staff,
            json!({"amount_minor": 2500, "currency": "EUR", "kind": "deposit"}),
        )
        .await;
    assert_eq!(p.status, 201, "{p:?}");
    let id = p.id();
    assert_ne!(id, booking, "the answer names the payment, not the booking");
    assert_eq!(p.body["status"], "authorized");
    assert_eq!(p.body["stream"], format!("payment-{id}"));
    assert_eq!(p.body["version"], 1);
    assert_eq!(p.body["authorised_minor"], 2500);
    assert_eq!(p.body["currency"], "EUR");
    assert_eq!(p.body["kind"], "deposit");
    assert_eq!(p.body["booking_id"], json!(booking));
    assert_eq!(p.header("etag"), Some("\"1\""));
    let events = app.events_of("PaymentAuthorized").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, format!("payment-{id}"));
    assert_eq!(events[0].1["amount_minor"], 2500);
    assert_eq!(events[0].1["booking_id"], json!(booking));
    // A balance as well: a booking takes more than one payment.
    let balance = app
        .post(
            &format!("/v1/bookings/{booking}/payments"),
            &staff,
            json!({"amount_minor": 1, "currency": "JPY", "kind": "balance"}),
        )
        .await;
    assert_eq!(balance.status, 201, "{balance:?}");
}

#[tokio::test]
async fn an_invalid_currency_or_a_non_positive_amount_is_422() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    for (amount, currency, field) in [
        (100, "EURO", "currency"),
        (100, "eur", "currency"),
        (100, "ABC", "currency"),
        (100, "", "currency"),
        (0, "EUR", "amount_minor"),
        (-500, "EUR", "amount_minor"),
    ] {
        let a = app
            .refused(
                app.post(
                    &format!("/v1/bookings/{booking}/payments"),
                    &staff,
                    json!({"amount_minor": amount, "currency": currency, "kind": "deposit"}),
                ),
                422,
                "validation",
            )
            .await;
        assert_eq!(a.field(), field, "{amount} {currency}");
    }
}

#[tokio::test]
async fn an_unknown_kind_or_a_fractional_amount_is_400() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    for (body, field) in [
        (
            json!({"amount_minor": 100, "currency": "EUR", "kind": "tip"}),
            "kind",
        ),
        (
            json!({"amount_minor": 10.5, "currency": "EUR", "kind": "deposit"}),
            "amount_minor",
        ),
        (json!({"amount_minor": 100, "currency": "EUR"}), "kind"),
    ] {
        let a = app
            .refused(
                app.post(&format!("/v1/bookings/{booking}/payments"), &staff, body),
                400,
                "validation",
            )
            .await;
        assert_eq!(a.field(), field);
    }
}

#[tokio::test]
async fn capture_defaults_to_everything_authorised() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 4200).await.id();
    let all = capture(&app, &staff, payment, json!({})).await;
    assert_money(&all, "captured", 4200, 0);
    assert_eq!(all.body["version"], 2);
    let events = app.events_of("PaymentCaptured").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1["amount_minor"], 4200);
    assert_eq!(events[0].1["provider_event_id"], Value::Null);
    app.refused(
        capture(&app, &staff, payment, json!({})),
        409,
        "invalid-transition",
    )
    .await;
}

#[tokio::test]
async fn a_capture_with_an_empty_body_and_no_media_type_captures_everything() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 900).await.id();
    let bearer = format!("Bearer {}", staff.0);
    let all = app
        .post_raw(
            &format!("/v1/payments/{payment}/capture"),
            Raw {
                token: Some(&bearer),
                content_type: None,
                body: vec![],
                headers: vec![],
            },
        )
        .await;
    assert_money(&all, "captured", 900, 0);
}

#[tokio::test]
async fn a_partial_capture_then_an_over_capture_is_422() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 5000).await.id();
    let part = capture(&app, &staff, payment, json!({"amount_minor": 2000})).await;
    assert_money(&part, "partially_captured", 2000, 0);
    for (amount, field) in [(3001, "amount_minor"), (0, "amount_minor")] {
        let a = app
            .refused(
                capture(&app, &staff, payment, json!({"amount_minor": amount})),
                422,
                "validation",
            )
            .await;
        assert_eq!(a.field(), field);
    }
    let rest = capture(&app, &staff, payment, json!({})).await;
    assert_money(&rest, "captured", 5000, 0);
    assert_eq!(app.count_events("PaymentCaptured").await, 2);
}

#[tokio::test]
async fn refunds_are_at_most_captured_minus_refunded() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 5000).await.id();
    capture(&app, &staff, payment, json!({"amount_minor": 3000})).await;
    assert_money(
        &refund(&app, &staff, payment, 2000).await,
        "partially_refunded",
        3000,
        2000,
    );
    let a = app
        .refused(refund(&app, &staff, payment, 1001), 422, "validation")
        .await;
    assert_eq!(a.field(), "amount_minor");
    app.refused(refund(&app, &staff, payment, 0), 422, "validation")
        .await;
    assert_money(
        &refund(&app, &staff, payment, 1000).await,
        "refunded",
        3000,
        3000,
    );
    app.refused(refund(&app, &staff, payment, 1), 409, "invalid-transition")
        .await;
    // Capturing the rest makes it refundable again.
    capture(&app, &staff, payment, json!({})).await;
    assert_eq!(refund(&app, &staff, payment, 2000).await.status, 200);
}

#[tokio::test]
async fn refunding_before_any_capture_is_409() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 5000).await.id();
    app.refused(
        refund(&app, &staff, payment, 100),
        409,
        "invalid-transition",
    )
    .await;
    let a = app
        .refused(
            app.post(&format!("/v1/payments/{payment}/refund"), &staff, json!({})),
            400,
            "validation",
        )
        .await;
    assert_eq!(a.field(), "amount_minor", "a refund names its amount");
}

#[tokio::test]
async fn authorising_on_a_cancelled_booking_is_409() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    app.post(&format!("/v1/bookings/{booking}/cancel"), &staff, json!({}))
        .await;
    app.refused(
        app.authorise(&staff, booking, 1000),
        409,
        "invalid-transition",
    )
    .await;
    assert_eq!(app.count_events("PaymentAuthorized").await, 0);
}

#[tokio::test]
async fn the_door_and_customers_may_not_authorise_or_move_money() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let subject = Uuid::now_v7();
    let customer = app.token_with(Role::Customer, Some(subject), None);
    let door = app.token(Role::Door);
    let staff = app.token(Role::Staff);
    let own = app.book(&customer, venue, table, 18, 20).await.id();
    let payment = app.authorise(&staff, own, 1000).await.id();
    capture(&app, &staff, payment, json!({"amount_minor": 500})).await;
    for token in [&door, &customer] {
        app.refused(app.authorise(token, own, 1000), 403, "forbidden")
            .await;
        app.refused(capture(&app, token, payment, json!({})), 403, "forbidden")
            .await;
        app.refused(refund(&app, token, payment, 100), 403, "forbidden")
            .await;
    }
}
