//! Refused commands by authenticated callers are recorded as `CommandAudited` events: who tried
//! what on what and why it was refused, never the values they sent.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::{json, Value};
use uuid::Uuid;

/// A booking body whose personal fields are unique markers: (body, name, email, notes).
fn marked_body(venue: Uuid, resource: Uuid, start: u32, end: u32) -> (Value, [String; 4]) {
    let mark = Uuid::new_v4().simple().to_string();
    let name = format!("Audit Name {mark}");
    let email = format!("audit-{mark}@example.org");
    let notes = format!("audit notes {mark}");
    let phone = "+49 30 1234 5678".to_string();
    let body = json!({
        "venue_id": venue, "resource_id": resource,
        "starts_at": at(start), "ends_at": at(end), "party_size": 2,
        "customer": {"name": name, "email": email, "phone": phone},
        "notes": notes,
    });
    (body, [name, email, notes, mark])
}

/// Sends a refused request and checks the one audit record it leaves.
async fn assert_audited(
    app: &TestApp,
    token: &Token,
    request: impl std::future::Future<Output = Answer>,
    expect: (u16, &str, &str, Option<String>),
    secrets: &[String],
) {
    let (status, slug, command, target) = expect;
    let audited_before = app.count_events("CommandAudited").await;
    let a = app.refused(request, status, slug).await;
    let audits = app.events_of("CommandAudited").await;
    assert_eq!(
        audits.len() as i64,
        audited_before + 1,
        "exactly one audit record per refusal: {a:?}"
    );
    let (stream, payload, metadata) = &audits[audits.len() - 1];
    assert!(stream.starts_with("audit-"), "{stream}");
    assert_eq!(payload["actor"], app.sub_of(token));
    assert_eq!(metadata["actor"], app.sub_of(token));
    let role = app
        .jwt
        .verify(&token.0)
        .map(|c| c.role.as_str())
        .unwrap_or_default();
    assert_eq!(payload["role"], role);
    assert_eq!(payload["command"], command);
    assert_eq!(payload["target"], json!(target));
    assert_eq!(payload["outcome"], "refused");
    assert_eq!(payload["problem_type"], slug);
    assert_eq!(payload["status"], status);
    assert_eq!(
        payload["request_id"].as_str(),
        a.header("x-request-id"),
        "the audit names the request id the caller got"
    );
    let stored = format!("{payload} {metadata}");
    for secret in secrets {
        assert!(
            !stored.contains(secret.as_str()),
            "the audit record holds a field value ({secret}): {stored}"
        );
    }
}

#[tokio::test]
async fn refusals_for_rights_validation_conflicts_and_unknown_ids_are_audited_without_values() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    let door = app.token(Role::Door);

    let (body, secrets) = marked_body(venue, table, 10, 12);
    assert_audited(
        &app,
        &door,
        app.post("/v1/bookings", &door, body),
        (403, "forbidden", "RequestBooking", None),
        &secrets,
    )
    .await;

    let (mut body, secrets) = marked_body(venue, table, 10, 12);
    body["party_size"] = json!(0);
    assert_audited(
        &app,
        &staff,
        app.post("/v1/bookings", &staff, body),
        (422, "validation", "RequestBooking", None),
        &secrets,
    )
    .await;

    let (body, secrets) = marked_body(venue, table, 19, 21);
    assert_audited(
        &app,
        &staff,
        app.post("/v1/bookings", &staff, body),
        (409, "slot-unavailable", "RequestBooking", None),
        &secrets,
    )
    .await;

    let (mut body, secrets) = marked_body(venue, table, 10, 12);
    body["party_size"] = json!(secrets[3]);
    assert_audited(
        &app,
        &staff,
        app.post("/v1/bookings", &staff, body),
        (400, "validation", "RequestBooking", None),
        &secrets,
    )
    .await;

    let unknown = Uuid::now_v7();
    let reason = format!("reason {}", Uuid::new_v4());
    assert_audited(
        &app,
        &staff,
        app.post(
            &format!("/v1/bookings/{unknown}/cancel"),
            &staff,
            json!({"reason": reason}),
        ),
        (
            404,
            "not-found",
            "CancelBooking",
            Some(format!("booking-{unknown}")),
        ),
        &[reason],
    )
    .await;

    app.confirm(&staff, booking).await;
    assert_audited(
        &app,
        &staff,
        app.confirm(&staff, booking),
        (
            409,
            "invalid-transition",
            "ConfirmBooking",
            Some(format!("booking-{booking}")),
        ),
        &[],
    )
    .await;

    assert_audited(
        &app,
        &staff,
        app.post_with(
            &format!("/v1/bookings/{booking}/cancel"),
            &staff,
            json!({}),
            &[("if-match", "\"1\"")],
        ),
        (
            412,
            "version-conflict",
            "CancelBooking",
            Some(format!("booking-{booking}")),
        ),
        &[],
    )
    .await;

    let customer = app.token_with(Role::Customer, Some(Uuid::now_v7()), None);
    assert_audited(
        &app,
        &customer,
        app.authorise(&customer, booking, 100),
        (
            403,
            "forbidden",
            "AuthorizePayment",
            Some(format!("booking-{booking}")),
        ),
        &[],
    )
    .await;
}

#[tokio::test]
async fn a_refused_webhook_is_audited_as_the_provider() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 100).await.id();
    let body = json!({"provider_event_id": "evt_big", "payment_id": payment,
                      "type": "captured", "amount_minor": 101})
    .to_string();
    app.refused(
        app.webhook(body.as_bytes(), Some(app.signature(body.as_bytes()))),
        422,
        "validation",
    )
    .await;
    let audits = app.events_of("CommandAudited").await;
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0].1["role"], "provider");
    assert_eq!(audits[0].1["command"], "RecordProviderEvent");
    assert_eq!(audits[0].1["target"], format!("payment-{payment}"));
}

#[tokio::test]
async fn an_unauthenticated_request_and_an_accepted_command_leave_no_audit_record() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    let all = app.count_all_events().await;
    let a = app
        .post_raw(
            &format!("/v1/bookings/{booking}/confirm"),
            Raw {
                token: Some("Bearer nope"),
                content_type: Some("application/json"),
                body: b"{}".to_vec(),
                headers: vec![],
            },
        )
        .await;
    a.assert_problem(401, "unauthorized");
    assert_eq!(app.count_all_events().await, all);
    assert_eq!(app.book(&staff, venue, table, 10, 11).await.status, 201);
    assert_eq!(app.count_events("CommandAudited").await, 0);
}
