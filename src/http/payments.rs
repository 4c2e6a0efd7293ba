//! Payment commands: authorise (for a booking), capture, refund; and the provider's webhook.

use super::auth::{Auth, Right, Role};
use super::command::{Attempt, Decision, Incoming, RequestIds};
use super::problem::ApiError;
use super::{parse_id, AppState};
use crate::store::append::StreamAppend;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use hmac::{Hmac, Mac};
use ledger_events::envelope::ExpectedVersion;
use ledger_events::ids::{booking_stream, payment_stream, PaymentId};
use ledger_events::payment::{self, Payment, PaymentCommand, PaymentKind};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Authorize {
    amount_minor: i64,
    currency: String,
    kind: PaymentKind,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Capture {
    #[serde(default)]
    amount_minor: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Refund {
    amount_minor: i64,
}

/// The payment's fields in a command's answer.
fn payment_answer(p: &Payment) -> serde_json::Map<String, serde_json::Value> {
    let mut fields = serde_json::Map::new();
    fields.insert("status".into(), json!(p.status()));
    fields.insert("authorised_minor".into(), json!(p.authorised_minor));
    fields.insert("captured_minor".into(), json!(p.captured_minor));
    fields.insert("refunded_minor".into(), json!(p.refunded_minor));
    fields.insert("currency".into(), json!(p.currency));
    fields
}

fn with_payment(mut decision: Decision, after: Option<Payment>) -> Decision {
    if let Some(p) = after {
        decision.extra.extend(payment_answer(&p));
    }
    decision
}

pub async fn authorize(
    State(app): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let incoming = Incoming {
        auth,
        role_label: None,
        ids,
        headers,
        route: format!("POST /v1/bookings/{id}/payments"),
    };
    let target = Some(format!("booking-{id}"));
    let state = app.clone();
    app.run_command("AuthorizePayment", target, incoming, body, |cmd| {
        let app = state.clone();
        let id = id.clone();
        async move {
            cmd.auth.require(Right::Payments)?;
            let (booking, booking_version) = app.visible_booking(&cmd.auth, &id).await?;
            let booking_expected = cmd.check_version(booking_version)?;
            let req: Authorize = cmd.json()?;
            let payment_id = PaymentId::mint();
            let events = payment::decide(
                None,
                PaymentCommand::Authorize {
                    payment_id,
                    booking: &booking,
                    kind: req.kind,
                    amount_minor: req.amount_minor,
                    currency: req.currency,
                },
            )?;
            let after = payment::fold(&events);
            let mut decision = Decision::single(
                payment_stream(payment_id),
                ExpectedVersion::NoStream,
                &events,
                payment_id.0,
                StatusCode::CREATED,
            )
            .with("booking_id", json!(booking.id))
            .with("kind", json!(req.kind));
            // The booking must still be as we saw it (not cancelled meanwhile): a condition on
            // its stream, appended atomically with the payment.
            decision.streams.push(StreamAppend {
                stream_id: booking_stream(booking.id),
                expected: booking_expected,
                events: vec![],
            });
            Ok(with_payment(decision, after))
        }
    })
    .await
}

impl AppState {
    async fn visible_payment(&self, auth: &Auth, id: &str) -> Result<(Payment, i64), ApiError> {
        let id = PaymentId(parse_id(id, "payment")?);
        let (payment, version) = self.load_payment(id).await?;
        let payment = payment.ok_or_else(|| ApiError::not_found("payment"))?;
        // Customers never act on payments; staff only on their venues'.
        if auth.role == Role::Customer || !auth.sees_venue(payment.venue_id) {
            return Err(ApiError::not_found("payment"));
        }
        Ok((payment, version))
    }
}

async fn money_movement(
    app: &AppState,
    cmd: Attempt,
    id: &str,
    refund: bool,
) -> Result<Decision, ApiError> {
    cmd.auth.require(Right::Payments)?;
    let (payment, version) = app.visible_payment(&cmd.auth, id).await?;
    let expected = cmd.check_version(version)?;
    let command = if refund {
        let req: Refund = cmd.json()?;
        PaymentCommand::Refund {
            amount_minor: req.amount_minor,
            provider_event_id: None,
        }
    } else {
        let req: Capture = cmd.json()?;
        PaymentCommand::Capture {
            amount_minor: req.amount_minor,
            provider_event_id: None,
        }
    };
    let events = payment::decide(Some(&payment), command)?;
    let after = events.iter().fold(Some(payment.clone()), payment::evolve);
    Ok(with_payment(
        Decision::single(
            payment_stream(payment.id),
            expected,
            &events,
            payment.id.0,
            StatusCode::OK,
        ),
        after,
    ))
}

async fn run_money(
    app: AppState,
    refund: bool,
    ids: RequestIds,
    auth: Auth,
    id: String,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (name, path) = if refund {
        ("RefundPayment", "refund")
    } else {
        ("CapturePayment", "capture")
    };
    let incoming = Incoming {
        auth,
        role_label: None,
        ids,
        headers,
        route: format!("POST /v1/payments/{id}/{path}"),
    };
    let target = Some(format!("payment-{id}"));
    let state = app.clone();
    app.run_command(name, target, incoming, body, |cmd| {
        let app = state.clone();
        let id = id.clone();
        async move { money_movement(&app, cmd, &id, refund).await }
    })
    .await
}

pub async fn capture(
    State(app): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_money(app, false, ids, auth, id, headers, body).await
}

pub async fn refund(
    State(app): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_money(app, true, ids, auth, id, headers, body).await
}

// ---------------------------------------------------------------------------------------------
// The payment provider's webhook.

/// How far a webhook's timestamp may be from now: replays of old deliveries are refused.
const WEBHOOK_TOLERANCE_SECS: i64 = 300;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderEvent {
    provider_event_id: String,
    payment_id: String,
    #[serde(rename = "type")]
    kind: ProviderEventKind,
    amount_minor: i64,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum ProviderEventKind {
    Captured,
    Failed,
    Refunded,
}

/// Checks `Ledger-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`.
pub fn verify_signature(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::Unauthorized(format!("webhook signature refused: {why}"));
    let header = header.ok_or_else(|| bad("Ledger-Signature header missing"))?;
    let mut t = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => candidates.push(v.to_owned()),
            _ => {}
        }
    }
    let t = t.ok_or_else(|| bad("no timestamp"))?;
    if (now - t).abs() > WEBHOOK_TOLERANCE_SECS {
        return Err(bad("timestamp outside the 5 minute tolerance"));
    }
    for candidate in candidates {
        let Ok(sig) = hex::decode(candidate) else {
            continue;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
            continue;
        };
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        // verify_slice compares in constant time.
        if mac.verify_slice(&sig).is_ok() {
            return Ok(());
        }
    }
    Err(bad("no matching v1 signature"))
}

pub async fn webhook(
    State(app): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match axum::body::to_bytes(body, super::command::MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => return ApiError::PayloadTooLarge(super::command::MAX_BODY_BYTES).into_response(),
    };
    let signature = headers
        .get("ledger-signature")
        .and_then(|v| v.to_str().ok());
    if let Err(e) = verify_signature(
        &app.webhook_secret,
        signature,
        &body,
        chrono::Utc::now().timestamp(),
    ) {
        return e.into_response();
    }
    let incoming = Incoming {
        auth: Auth {
            sub: "payment-provider".into(),
            role: Role::Admin,
            subject: None,
            venues: None,
        },
        // Readers of the log see that the provider, not a person, caused these events.
        role_label: Some("provider"),
        ids,
        headers,
        route: "POST /v1/webhooks/payments".into(),
    };
    let state = app.clone();
    let target = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("payment_id")
                .and_then(|p| p.as_str())
                .map(|p| format!("payment-{p}"))
        });
    app.run_webhook(incoming, target, body, move |cmd| {
        let app = state.clone();
        async move {
            let event: ProviderEvent = cmd.json()?;
            if event.provider_event_id.is_empty()
                || event.provider_event_id.len() > 255
                || event.provider_event_id.chars().any(char::is_control)
            {
                return Err(ApiError::unprocessable(
                    "provider_event_id",
                    "must be 1 to 255 printable characters",
                ));
            }
            let id = PaymentId(parse_id(&event.payment_id, "payment")?);
            let (payment, version) = app.load_payment(id).await?;
            let payment = payment.ok_or_else(|| ApiError::not_found("payment"))?;
            let provider_event_id = Some(event.provider_event_id);
            let command = match event.kind {
                ProviderEventKind::Captured => PaymentCommand::Capture {
                    amount_minor: Some(event.amount_minor),
                    provider_event_id,
                },
                ProviderEventKind::Refunded => PaymentCommand::Refund {
                    amount_minor: event.amount_minor,
                    provider_event_id,
                },
                ProviderEventKind::Failed => PaymentCommand::Fail { provider_event_id },
            };
            let events = payment::decide(Some(&payment), command)?;
            let after = events.iter().fold(Some(payment.clone()), payment::evolve);
            Ok(with_payment(
                Decision::single(
                    payment_stream(id),
                    ExpectedVersion::Exact(version),
                    &events,
                    id.0,
                    StatusCode::OK,
                ),
                after,
            ))
        }
    })
    .await
}

impl AppState {
    /// A redelivery that outlived its idempotency record (purged after
    /// `LEDGER_IDEMPOTENCY_RETENTION_HOURS`; providers retry for days): the payment's own stream
    /// still names the provider event it applied, so nothing is applied twice. The answer is the
    /// payment as it stands now, with the position of the event that recorded the delivery.
    async fn delivered_before(
        &self,
        stream: &str,
        provider_event_id: &str,
    ) -> Result<Option<crate::store::append::StoredResponse>, ApiError> {
        let recorded: Option<(i64,)> = sqlx::query_as(
            "SELECT global_position FROM events \
              WHERE stream_id = $1 AND payload->>'provider_event_id' = $2 \
              ORDER BY stream_version LIMIT 1",
        )
        .bind(stream)
        .bind(provider_event_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| ApiError::Unexpected(e.into()))?;
        let Some((position,)) = recorded else {
            return Ok(None);
        };
        let Some(id) = stream
            .strip_prefix("payment-")
            .and_then(|id| uuid::Uuid::parse_str(id).ok())
        else {
            return Ok(None);
        };
        let (payment, version) = self.load_payment(PaymentId(id)).await?;
        let Some(payment) = payment else {
            return Ok(None);
        };
        Ok(Some(crate::store::append::StoredResponse {
            status: StatusCode::OK.as_u16(),
            body: super::command::answer_body(
                id,
                stream,
                version,
                position,
                &payment_answer(&payment),
            ),
        }))
    }

    /// Webhooks are idempotent on the provider's event id: a redelivery answers what the first
    /// delivery answered; the same id with another body is `idempotency-key-reuse`.
    async fn run_webhook<F, Fut>(
        &self,
        incoming: Incoming,
        target: Option<String>,
        body: axum::body::Bytes,
        decide: F,
    ) -> Response
    where
        F: Fn(Attempt) -> Fut,
        Fut: std::future::Future<Output = Result<Decision, ApiError>>,
    {
        let provider_event_id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("provider_event_id")
                    .and_then(|p| p.as_str())
                    .map(str::to_owned)
            });
        let claim = provider_event_id.as_ref().map(|id| {
            let keyring = self.vault.keyring();
            (
                keyring.request_fingerprint(&[b"webhook", id.as_bytes()]),
                keyring.request_fingerprint(&[b"webhook-body", &body]),
            )
        });
        let result = async {
            if let Some((key, hmac)) = &claim {
                if let Some(stored) = self.stored_response(key, hmac).await? {
                    return Ok(super::command::Accepted(stored));
                }
            }
            if let (Some(stream), Some(id)) = (&target, &provider_event_id) {
                if let Some(stored) = self.delivered_before(stream, id).await? {
                    return Ok(super::command::Accepted(stored));
                }
            }
            self.append_decided(
                "RecordProviderEvent",
                &incoming,
                &body,
                None,
                claim,
                &decide,
            )
            .await
        }
        .await;
        match result {
            Ok(accepted) => accepted.into_response(),
            Err(e) => {
                if e.is_refusal() {
                    self.audit_refusal("RecordProviderEvent", target, &incoming, &e)
                        .await;
                }
                e.into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| panic!("hmac"));
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn webhook_signatures_are_checked_with_a_five_minute_tolerance() {
        let secret = b"whsec";
        let body = br#"{"a":1}"#;
        let now = 1_800_000_000;
        assert!(verify_signature(secret, Some(&sign(secret, now, body)), body, now).is_ok());
        assert!(verify_signature(secret, Some(&sign(secret, now - 299, body)), body, now).is_ok());
        assert!(verify_signature(secret, Some(&sign(secret, now - 301, body)), body, now).is_err());
        assert!(verify_signature(secret, Some(&sign(secret, now + 301, body)), body, now).is_err());
        assert!(verify_signature(b"other", Some(&sign(secret, now, body)), body, now).is_err());
        assert!(
            verify_signature(secret, Some(&sign(secret, now, body)), br#"{"a":2}"#, now).is_err()
        );
        assert!(verify_signature(secret, None, body, now).is_err());
        assert!(verify_signature(secret, Some("garbage"), body, now).is_err());
        let rotated = format!("{},v1=00ff", sign(secret, now, body));
        assert!(verify_signature(secret, Some(&rotated), body, now).is_ok());
    }
}
