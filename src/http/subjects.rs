//! Data subjects (GDPR): find by email, export (Art. 15/20), erase by crypto-shredding (Art. 17).
//!
//! Erasure appends `SubjectErased` to the subject's stream; the append's own transaction shreds
//! the wrapped key, deletes the email lookup and stores the certificate (a trigger, see the
//! migrations), and every process drops its cached key on the notification. The log is untouched
//! and still verifies: it only ever held ciphertext.

use super::auth::{Auth, Role};
use super::command::parse_json;
use super::problem::ApiError;
use super::{parse_id, AppState};
use crate::store::append::{AppendError, AppendOutcome, AppendRequest, StreamAppend};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Extension;
use axum::Json;
use ledger_events::envelope::{ExpectedVersion, Metadata, NewEvent};
use ledger_events::ids::{subject_stream, SubjectId};
use ledger_events::pii::Keyring;
use ledger_projections::booking_board::{self, BoardFilter};
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

/// `GET /v1/subjects/{id}/export`: everything the ledger holds about the subject, readable.
pub async fn export(
    State(app): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
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
        });
    }
    let Some((_, wrapped)) = app.vault.key_row(subject).await? else {
        return Err(ApiError::not_found("subject"));
    };
    let mut bookings = Vec::new();
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
            bookings.push(app.booking_item(row).await?);
        }
        if page.len() < 200 {
            break;
        }
    }
    Ok(Json(json!({
        "subject_id": subject,
        "erased": wrapped.is_none(),
        "certificate": app.vault.certificate(subject).await?,
        "bookings": bookings,
        "exported_at": chrono::Utc::now(),
    })))
}

/// `POST /v1/subjects/{id}/erase`: shreds the key; a second call answers the same certificate.
pub async fn erase(
    State(app): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    auth: Auth,
    Path(id): Path<String>,
    _headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin_only(&auth)?;
    let subject = SubjectId(parse_id(&id, "subject")?);
    if let Some(certificate) = app.vault.certificate(subject).await? {
        return Ok(Json(certificate));
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
        .map(Json)
        .ok_or_else(|| ApiError::Unexpected(anyhow::anyhow!("erased without a certificate")))
}
