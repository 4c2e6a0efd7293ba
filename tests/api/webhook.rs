//! The payment provider's webhook: HMAC-signed, five minutes tolerance, idempotent on
//! `provider_event_id`, recorded with the provider as the role.

use crate::helpers::*;
use serde_json::json;
use uuid::Uuid;

/// A booking with an authorised payment of `amount`: (payment, staff token).
async fn authorised(app: &TestApp, amount: i64) -> (Uuid, Token) {
    let (_, _, booking, staff) = app.booked().await;
    let p = app.authorise(&staff, booking, amount).await;
    assert_eq!(p.status, 201, "{p:?}");
    (p.id(), staff)
}

fn event(id: &str, payment: Uuid, kind: &str, amount: i64) -> Vec<u8> {
    json!({"provider_event_id": id, "payment_id": payment, "type": kind, "amount_minor": amount})
        .to_string()
        .into_bytes()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn a_signed_capture_is_recorded_with_the_provider_as_the_role() {
    let app = spawn_app().await;
    let (payment, _) = authorised(&app, 3000).await;
    let body = event("evt_capture_1", payment, "captured", 3000);
    let a = app.webhook(&body, Some(app.signature(&body))).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.id(), payment);
    assert_eq!(a.body["status"], "captured");
    assert_eq!(a.body["version"], 2);
    let events = app.events_of("PaymentCaptured").await;
    assert_eq!(events.len(), 1);
    let (stream, payload, metadata) = &events[0];
    assert_eq!(stream, &format!("payment-{payment}"));
    assert_eq!(payload["amount_minor"], 3000);
    assert_eq!(payload["provider_event_id"], "evt_capture_1");
    assert_eq!(metadata["role"], "provider");
    assert_eq!(metadata["actor"], "payment-provider");
    assert_eq!(metadata["command"], "RecordProviderEvent");
}

#[tokio::test]
async fn refunds_arrive_by_webhook_too() {
    let app = spawn_app().await;
    let (payment, staff) = authorised(&app, 3000).await;
    let c = app
        .post(
            &format!("/v1/payments/{payment}/capture"),
            &staff,
            json!({}),
        )
        .await;
    assert_eq!(c.status, 200, "{c:?}");
    let body = event("evt_refund_1", payment, "refunded", 1000);
    let a = app.webhook(&body, Some(app.signature(&body))).await;
    assert_eq!(
        (a.status, a.body["status"].as_str()),
        (200, Some("partially_refunded")),
        "{a:?}"
    );
    let too_much = event("evt_refund_2", payment, "refunded", 2001);
    app.refused(
        app.webhook(&too_much, Some(app.signature(&too_much))),
        422,
        "validation",
    )
    .await;
}

#[tokio::test]
async fn bad_missing_or_stale_signatures_are_401_and_append_nothing() {
    let app = spawn_app().await;
    let (payment, _) = authorised(&app, 3000).await;
    let body = event("evt_1", payment, "captured", 3000);
    let tampered = event("evt_1", payment, "captured", 1);
    let signatures = [
        None,
        Some(TestApp::signature_with(b"not the secret", now(), &body)),
        Some(app.signature(&tampered)),
        Some(TestApp::signature_with(
            &app.webhook_secret,
            now() - 360,
            &body,
        )),
        Some(TestApp::signature_with(
            &app.webhook_secret,
            now() + 360,
            &body,
        )),
        Some("garbage".to_string()),
        Some(format!("t={},v1=zz", now())),
        Some(format!("v1={}", "00".repeat(32))),
    ];
    let before = app.count_all_events().await;
    for signature in signatures {
        let a = app.webhook(&body, signature.clone()).await;
        a.assert_problem(401, "unauthorized");
        assert!(
            !a.body["detail"]
                .as_str()
                .unwrap_or("")
                .contains(&hex::encode(&app.webhook_secret)),
            "{signature:?}"
        );
    }
    assert_eq!(
        app.count_all_events().await,
        before,
        "nothing appended, not even an audit record"
    );
    // Within the tolerance is fine.
    let a = app
        .webhook(
            &body,
            Some(TestApp::signature_with(
                &app.webhook_secret,
                now() - 240,
                &body,
            )),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
}

#[tokio::test]
async fn a_redelivered_event_answers_the_same_and_appends_nothing() {
    let app = spawn_app().await;
    let (payment, _) = authorised(&app, 3000).await;
    let body = event("evt_again", payment, "captured", 1200);
    let first = app.webhook(&body, Some(app.signature(&body))).await;
    assert_eq!(first.status, 200, "{first:?}");
    let all = app.count_all_events().await;
    // A redelivery is signed afresh; the body is what counts.
    let again = app
        .webhook(
            &body,
            Some(TestApp::signature_with(
                &app.webhook_secret,
                now() - 60,
                &body,
            )),
        )
        .await;
    assert_eq!(again.status, first.status, "{again:?}");
    assert_eq!(again.body, first.body);
    assert_eq!(app.count_all_events().await, all);
    assert_eq!(app.count_events("PaymentCaptured").await, 1);
}

#[tokio::test]
async fn a_redelivery_after_its_idempotency_record_was_purged_applies_nothing_again() {
    let app = spawn_app().await;
    let (payment, _) = authorised(&app, 3000).await;
    let body = event("evt_late", payment, "captured", 1200);
    let first = app.webhook(&body, Some(app.signature(&body))).await;
    assert_eq!(first.status, 200, "{first:?}");
    // What the retention purge does to it, days later (providers retry for days).
    let purged = sqlx::query("DELETE FROM idempotency_keys")
        .execute(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(purged.rows_affected() >= 1);
    let all = app.count_all_events().await;
    let again = app.webhook(&body, Some(app.signature(&body))).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.id(), payment);
    assert_eq!(again.body["captured_minor"], 1200, "{again:?}");
    assert_eq!(again.body["position"], first.body["position"]);
    assert_eq!(
        again.header("x-ledger-position"),
        first.header("x-ledger-position")
    );
    assert_eq!(app.count_all_events().await, all, "nothing appended again");
    assert_eq!(app.count_events("PaymentCaptured").await, 1);
}

#[tokio::test]
async fn the_same_provider_event_id_with_another_body_is_422() {
    let app = spawn_app().await;
    let (payment, _) = authorised(&app, 3000).await;
    let body = event("evt_dup", payment, "captured", 1000);
    assert_eq!(
        app.webhook(&body, Some(app.signature(&body))).await.status,
        200
    );
    let other = event("evt_dup", payment, "captured", 500);
    app.refused(
        app.webhook(&other, Some(app.signature(&other))),
        422,
        "idempotency-key-reuse",
    )
    .await;
    assert_eq!(app.count_events("PaymentCaptured").await, 1);
}

#[tokio::test]
async fn a_failed_payment_takes_no_later_capture() {
    let app = spawn_app().await;
    let (payment, staff) = authorised(&app, 3000).await;
    let body = event("evt_fail", payment, "failed", 3000);
    let failed = app.webhook(&body, Some(app.signature(&body))).await;
    assert_eq!(
        (failed.status, failed.body["status"].as_str()),
        (200, Some("failed")),
        "{failed:?}"
    );
    let events = app.events_of("PaymentFailed").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].2["role"], "provider");
    app.refused(
        app.post(
            &format!("/v1/payments/{payment}/capture"),
            &staff,
            json!({}),
        ),
        409,
        "invalid-transition",
    )
    .await;
    let late = event("evt_late_capture", payment, "captured", 3000);
    app.refused(
        app.webhook(&late, Some(app.signature(&late))),
        409,
        "invalid-transition",
    )
    .await;
}

#[tokio::test]
async fn a_signed_but_malformed_event_is_400() {
    let app = spawn_app().await;
    let (payment, _) = authorised(&app, 3000).await;
    // Cut-short JSON: the field it names is covered by errors::a_truncated_json_body_names_the_body_as_the_field.
    let cut = b"{not json".to_vec();
    app.refused(
        app.webhook(&cut, Some(app.signature(&cut))),
        400,
        "validation",
    )
    .await;
    for (body, field) in [
        (event("evt_x", payment, "chargeback", 1), "type"),
        (
            json!({"provider_event_id": "evt_y", "payment_id": payment, "type": "captured"})
                .to_string()
                .into_bytes(),
            "amount_minor",
        ),
    ] {
        let a = app
            .refused(
                app.webhook(&body, Some(app.signature(&body))),
                400,
                "validation",
            )
            .await;
        assert_eq!(a.field(), field, "{}", String::from_utf8_lossy(&body));
    }
    let empty_id = event("", payment, "captured", 1);
    let a = app
        .refused(
            app.webhook(&empty_id, Some(app.signature(&empty_id))),
            422,
            "validation",
        )
        .await;
    assert_eq!(a.field(), "provider_event_id");
}
