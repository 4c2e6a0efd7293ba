//! Data subjects (GDPR): find by email, export (Art. 15/20), erase by crypto-shredding (Art. 17).
//!
//! Erasure appends `SubjectErased` to the subject's stream; the append's own transaction shreds
//! the wrapped key, deletes the email lookup and stores the certificate (a trigger, see the
//! migrations), and every process drops its cached key on the notification. The log is untouched
//! and still verifies: it only ever held ciphertext. The certificate is signed when answered
//! (`KeyVault::certificate`) and served as canonical JSON, so every answer is the same bytes.
//!
//! The export finds the subject's bookings and their payments on the booking board (awaited up
//! to the log head), then folds and reads them from the log itself, opening every envelope sealed
//! under the subject's key and no one else's.

use super::auth::{Auth, Role};
use super::command::parse_json;
use super::problem::ApiError;
use super::queries::QueryError;
use super::{parse_id, AppState};
use crate::store::append::{AppendError, AppendOutcome, AppendRequest, StreamAppend};
use crate::store::vault::{SubjectKey, VaultError};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use ledger_events::booking::{self, BookingEvent};
use ledger_events::chain::canonical_json;
use ledger_events::envelope::{DomainEvent, ExpectedVersion, Metadata, NewEvent, RecordedEvent};
use ledger_events::ids::{
    booking_stream, payment_stream, subject_stream, BookingId, PaymentId, SubjectId,
};
use ledger_events::payment::{self, PaymentEvent};
use ledger_events::pii::{self, Keyring, SealContext, Sealed};
use ledger_projections::booking_board::{self, BoardFilter};
use ledger_replay::as_of;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::command::RequestIds;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Search {
    email: String,
}

fn admin_only(auth: &Auth) -> Result<(), ApiError> {
    if auth.role == Role::Admin && auth.venues.is_none() {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "only an organisation-wide admin may do this",
        ))
    }
}

/// `POST /v1/subjects/search {"email"}`: the email travels in a body, never a URL, and is looked
/// up through its blind index; it is not stored or logged.
pub async fn search(
    State(app): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    admin_only(&auth)?;
    let req: Search = parse_json(&body)?;
    match app.vault.find_subject(&req.email).await? {
        Some(subject) => Ok(Json(json!({"subject_id": subject}))),
        None => Err(ApiError::not_found("subject")),
    }
}

/// `GET /v1/subjects/{id}/export`: everything the ledger holds about the subject (Art. 15/20),
/// personal data opened: every booking with its customer details, notes and cancellation
/// reason, the payments of those bookings, and every event of those streams as the log holds it.
///
/// Complete up to the log head when the request came: the booking board (which finds the
/// subject's bookings and their payments) is first awaited up to it; the bookings, payments and
/// events themselves are folded and read from the log.
pub async fn export(
    State(app): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, QueryError> {
    let subject = SubjectId(parse_id(&id, "subject")?);
    let allowed = match auth.role {
        Role::Admin => auth.venues.is_none(),
        Role::Customer => auth.subject == Some(subject),
        _ => false,
    };
    if !allowed {
        return Err(if auth.role == Role::Customer {
            ApiError::not_found("subject")
        } else {
            ApiError::forbidden("only an admin or the subject may export")
        }
        .into());
    }
    if app
        .vault
        .key_row(subject)
        .await
        .map_err(ApiError::from)?
        .is_none()
    {
        return Err(ApiError::not_found("subject").into());
    }
    let head = ledger_replay::head_position(&app.pool)
        .await
        .map_err(ApiError::from)?;
    // A lagging read model answers `projection-lagging` with how far it got; any later failure
    // carries the position the export was taken at.
    let position = app.read_position.reach(Some(head)).await?;
    export_at(&app, subject, position)
        .await
        .map_err(QueryError::at(position))
}

/// The export of `subject` with the booking board at `position`.
async fn export_at(
    app: &AppState,
    subject: SubjectId,
    position: i64,
) -> Result<Response, ApiError> {
    // `None` once erased: every personal field is then null.
    let key = match app.vault.key(subject).await {
        Ok(key) => Some(key),
        Err(VaultError::Erased) => None,
        Err(e) => return Err(ApiError::Unexpected(anyhow::Error::new(e))),
    };
    let opener = Opener {
        subject,
        key: key.as_ref(),
    };
    let mut bookings = Vec::new();
    let mut events = Vec::new();
    let mut after = None;
    loop {
        let page = booking_board::bookings(
            &app.pool,
            &BoardFilter {
                subject_id: Some(subject.0),
                after,
                limit: 200,
                ..Default::default()
            },
        )
        .await?;
        let Some(last) = page.last() else { break };
        after = Some((last.starts_at, last.booking_id));
        for row in &page {
            let payments = booking_board::payments_of(&app.pool, row.booking_id).await?;
            let payment_ids = payments.iter().map(|p| PaymentId(p.payment_id));
            bookings.push(
                export_booking(
                    app,
                    &opener,
                    BookingId(row.booking_id),
                    payment_ids,
                    &mut events,
                )
                .await?,
            );
        }
        if page.len() < 200 {
            break;
        }
    }
    for e in ledger_replay::read_stream(&app.pool, &subject_stream(subject)).await? {
        events.push(opener.event(&e));
    }
    events.sort_by_key(|e| e["position"].as_i64());
    let body = json!({
        "subject_id": subject,
        "erased": key.is_none(),
        "certificate": app.vault.certificate(subject).await?,
        "bookings": bookings,
        "events": events,
        "position": position,
        "exported_at": chrono::Utc::now(),
    });
    Ok(super::queries::answer(position, body))
}

/// Opens the envelopes sealed under one subject's key; any other subject's stay closed.
struct Opener<'a> {
    subject: SubjectId,
    /// `None` once the subject is erased.
    key: Option<&'a SubjectKey>,
}

impl Opener<'_> {
    /// A sealed value found in `stream`'s event of type `event_type`, opened; `Null` when it is
    /// not the subject's or no longer opens.
    fn open(&self, sealed: &Sealed, stream_id: &str, event_type: &str) -> Value {
        match self.key {
            Some(key) if sealed.sub == self.subject.0 => pii::open::<Value>(
                &key.key,
                sealed,
                &SealContext {
                    stream_id,
                    event_type,
                },
            )
            .map(|v| v.into_inner())
            .unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// `value` with every sealed envelope in it replaced by what it holds (or `null`).
    fn open_all(&self, value: &Value, stream_id: &str, event_type: &str) -> Value {
        match value {
            Value::Object(map) => match serde_json::from_value::<Sealed>(value.clone()) {
                Ok(sealed) if map.len() == 5 => self.open(&sealed, stream_id, event_type),
                _ => Value::Object(
                    map.iter()
                        .map(|(k, v)| (k.clone(), self.open_all(v, stream_id, event_type)))
                        .collect(),
                ),
            },
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|v| self.open_all(v, stream_id, event_type))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// One event as the log holds it, its personal fields opened.
    fn event(&self, e: &RecordedEvent) -> Value {
        json!({
            "position": e.global_position,
            "event_id": e.event_id,
            "stream": e.stream_id,
            "version": e.stream_version,
            "type": e.event_type,
            "recorded_at": e.recorded_at,
            "data": self.open_all(&e.payload, &e.stream_id, &e.event_type),
        })
    }
}

fn undecodable(e: ledger_events::error::DecodeError) -> ApiError {
    ApiError::Unexpected(anyhow::Error::new(e))
}

/// One booking folded from its stream, with its personal data opened and its payments; its
/// events and its payments' go to `events`.
async fn export_booking(
    app: &AppState,
    opener: &Opener<'_>,
    id: BookingId,
    payment_ids: impl Iterator<Item = PaymentId>,
    events: &mut Vec<Value>,
) -> Result<Value, ApiError> {
    let stream = booking_stream(id);
    let recorded = ledger_replay::read_stream(&app.pool, &stream).await?;
    let (mut state, mut customer, mut cancel_reason) = (None, Value::Null, Value::Null);
    for e in &recorded {
        let event = BookingEvent::decode(&e.event_type, e.schema_version, &e.payload)
            .map_err(undecodable)?;
        match &event {
            BookingEvent::BookingRequested(r) => {
                customer = opener.open(&r.customer, &stream, &e.event_type);
            }
            BookingEvent::BookingCancelled(c) => {
                cancel_reason = c
                    .reason
                    .as_ref()
                    .map(|r| opener.open(r, &stream, &e.event_type))
                    .unwrap_or(Value::Null);
            }
            _ => {}
        }
        state = booking::evolve(state, &event);
        events.push(opener.event(e));
    }
    let (Some(booking), Some(first), Some(last)) = (state, recorded.first(), recorded.last())
    else {
        return Err(ApiError::Unexpected(anyhow::anyhow!(
            "the booking board lists {stream}, which the log does not hold"
        )));
    };
    let mut payments = Vec::new();
    let (mut paid, mut refunded) = (0, 0);
    for payment_id in payment_ids {
        let pstream = payment_stream(payment_id);
        let precorded = ledger_replay::read_stream(&app.pool, &pstream).await?;
        let mut pstate = None;
        for e in &precorded {
            let event = PaymentEvent::decode(&e.event_type, e.schema_version, &e.payload)
                .map_err(undecodable)?;
            pstate = payment::evolve(pstate, &event);
            events.push(opener.event(e));
        }
        if let (Some(p), Some(pfirst), Some(plast)) = (pstate, precorded.first(), precorded.last())
        {
            paid += p.captured_minor;
            refunded += p.refunded_minor;
            let mut item = as_of::payment_json(&p);
            item["authorised_at"] = json!(pfirst.recorded_at);
            item["updated_at"] = json!(plast.recorded_at);
            item["version"] = json!(plast.stream_version);
            payments.push(item);
        }
    }
    let (customer, notes) = match customer {
        Value::Object(mut c) => {
            let notes = c.remove("notes").unwrap_or(Value::Null);
            (Value::Object(c), notes)
        }
        _ => (Value::Null, Value::Null),
    };
    let mut item = as_of::booking_json(&booking);
    item["customer"] = customer;
    item["notes"] = notes;
    item["cancel_reason"] = cancel_reason;
    item["requested_at"] = json!(first.recorded_at);
    item["updated_at"] = json!(last.recorded_at);
    item["version"] = json!(last.stream_version);
    item["paid_minor"] = json!(paid);
    item["refunded_minor"] = json!(refunded);
    item["payments"] = json!(payments);
    if opener.key.is_none() {
        item["erased"] = json!(true);
    }
    Ok(item)
}

/// A certificate is answered as its canonical JSON (RFC 8785), exactly the bytes it signs plus
/// the signature: the same bytes on every call, from every process.
fn certificate_answer(certificate: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        canonical_json(certificate),
    )
        .into_response()
}

/// `POST /v1/subjects/{id}/erase`: shreds the key; a second call answers the same certificate.
pub async fn erase(
    State(app): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    auth: Auth,
    Path(id): Path<String>,
    _headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin_only(&auth)?;
    let subject = SubjectId(parse_id(&id, "subject")?);
    if let Some(certificate) = app.vault.certificate(subject).await? {
        return Ok(certificate_answer(&certificate));
    }
    let Some((key_id, Some(wrapped))) = app.vault.key_row(subject).await? else {
        return Err(ApiError::not_found("subject"));
    };
    let request = AppendRequest {
        streams: vec![StreamAppend {
            stream_id: subject_stream(subject),
            expected: ExpectedVersion::NoStream,
            events: vec![NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "SubjectErased",
                schema_version: 1,
                payload: json!({
                    "subject_id": subject,
                    "key_id": key_id,
                    "key_fingerprint": Keyring::key_fingerprint(&wrapped),
                    // The erasing process's promise, kept in the log: backups taken before now
                    // hold the key for this long. The certificate states it.
                    "backup_retention_days": app.vault.backup_retention_days(),
                }),
            }],
        }],
        metadata: Metadata {
            actor: auth.sub.clone(),
            role: auth.role.as_str().to_owned(),
            command: "EraseSubject".into(),
            request_id: ids.request_id,
            correlation_id: ids.correlation_id,
            causation_id: ids.request_id,
        },
        slot: None,
        idempotency: None,
    };
    match app.appender.append(request).await {
        Ok(AppendOutcome::Appended(..)) | Ok(AppendOutcome::Replayed(_)) => {}
        // Erased concurrently by another call: its certificate is the answer.
        Err(AppendError::VersionConflict { .. }) => {}
        Err(e) => return Err(ApiError::Unexpected(anyhow::Error::new(e))),
    }
    app.vault.forget(subject);
    // A checkpoint right after each erasure: auditors can pin the log as it stands once the
    // key is gone.
    let (pool, seed) = (app.pool.clone(), app.vault.keyring().signing_seed());
    tokio::spawn(async move {
        if let Err(e) = ledger_replay::checkpoint::create(&pool, &seed).await {
            tracing::warn!(error = %e, "could not sign a checkpoint after an erasure");
        }
    });
    let vault = app.vault.clone();
    tokio::spawn(async move {
        if let Err(e) = vault.vacuum().await {
            tracing::warn!(error = %e, "vacuum of the key store after an erasure failed");
        }
    });
    app.vault
        .certificate(subject)
        .await?
        .map(|c| certificate_answer(&c))
        .ok_or_else(|| ApiError::Unexpected(anyhow::anyhow!("erased without a certificate")))
}
