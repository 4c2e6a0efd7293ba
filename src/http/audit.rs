//! The audit endpoints (`/v1/audit/*`): the log itself, read back through `ledger-replay`, never
//! through a read model, so an auditor sees what was recorded and nothing derived from it.
//!
//! Roles auditor and admin only. Personal fields in `data` stay sealed envelopes: an auditor
//! checks who did what and when, and opening personal data is the subject export's job.

use super::auth::{Auth, Role};
use super::params::QueryParams;
use super::problem::ApiError;
use super::{parse_id, AppState};
use axum::extract::{Path, State};
use axum::Json;
use ledger_events::ids::{booking_stream, BookingId};
use ledger_replay::actions::{self, ActionFilter};
use ledger_replay::as_of::{self, AsOfError};
use ledger_replay::history::wire;
use serde_json::{json, Value};

/// The largest page of the log one request reads.
const MAX_LIMIT: i64 = 1000;
const DEFAULT_LIMIT: i64 = 100;

/// Auditors and admins read the whole log. A venue-scoped token is refused rather than served a
/// filtered log: audit, subject and payment streams cannot all be attributed to a venue, so
/// filtering could only leak or hide, never be exact.
fn may_audit(auth: &Auth) -> Result<(), ApiError> {
    if !matches!(auth.role, Role::Auditor | Role::Admin) {
        return Err(ApiError::forbidden(format!(
            "the {} role may not read the audit endpoints",
            auth.role.as_str()
        )));
    }
    if auth.venues.is_some() {
        return Err(ApiError::forbidden(
            "the audit endpoints read the whole log: a venue-scoped token may not",
        ));
    }
    Ok(())
}

fn after_of(q: &QueryParams) -> Result<i64, ApiError> {
    const EXPECT: &str = "a global position (0 or more)";
    match q.parse::<i64>("after", EXPECT)? {
        Some(after) if after < 0 => {
            Err(ApiError::bad_request("after", format!("must be {EXPECT}")))
        }
        after => Ok(after.unwrap_or(0)),
    }
}

fn limit_of(q: &QueryParams) -> Result<i64, ApiError> {
    q.number_in("limit", 1..=MAX_LIMIT, DEFAULT_LIMIT)
}

/// `GET /v1/audit/log?after=&limit=`: events in global order. Positions are gapless and become
/// visible in commit order, so paging by `next_after` never skips an event.
pub async fn log(
    State(app): State<AppState>,
    auth: Auth,
    q: QueryParams,
) -> Result<Json<Value>, ApiError> {
    may_audit(&auth)?;
    let after = after_of(&q)?;
    let limit = limit_of(&q)?;
    let events = ledger_replay::read_all(&app.pool, after, limit).await?;
    // Read after the page, so the head is at least its last position: `null` only when the page
    // reached what was committed.
    let head = ledger_replay::head_position(&app.pool).await?;
    let next_after = events
        .last()
        .map(|e| e.global_position)
        .filter(|last| *last < head);
    Ok(Json(
        json!({"items": wire(&events), "next_after": next_after}),
    ))
}

/// `GET /v1/audit/streams/{stream}`: one stream's events, in stream order.
pub async fn stream(
    State(app): State<AppState>,
    auth: Auth,
    Path(stream): Path<String>,
) -> Result<Json<Value>, ApiError> {
    may_audit(&auth)?;
    let events = ledger_replay::read_stream(&app.pool, &stream).await?;
    if events.is_empty() {
        return Err(ApiError::not_found("stream"));
    }
    Ok(Json(json!({"stream": stream, "items": wire(&events)})))
}

/// `GET /v1/audit/bookings/{id}/as-of?at=`: the booking folded from its events recorded at or
/// before `at`, with the command side's own `evolve`.
pub async fn booking_as_of(
    State(app): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    q: QueryParams,
) -> Result<Json<Value>, ApiError> {
    may_audit(&auth)?;
    let id = BookingId(parse_id(&id, "booking")?);
    let at = q
        .time("at")?
        .ok_or_else(|| ApiError::bad_request("at", "is required (an RFC 3339 time)"))?;
    let stream = booking_stream(id);
    let folded = as_of::booking_as_of(&app.pool, &stream, at)
        .await
        .map_err(|e| match e {
            AsOfError::Read(e) => ApiError::from(e),
            e => ApiError::Unexpected(anyhow::Error::new(e)),
        })?
        .ok_or_else(|| ApiError::not_found("booking"))?;
    Ok(Json(as_of::render(
        &stream,
        at,
        &folded,
        as_of::booking_json(&folded.state),
    )))
}

/// `GET /v1/audit/actions?actor=&from=&to=&after=&limit=`: who did what, oldest first.
pub async fn list_actions(
    State(app): State<AppState>,
    auth: Auth,
    q: QueryParams,
) -> Result<Json<Value>, ApiError> {
    may_audit(&auth)?;
    let from = q.time("from")?;
    let to = q.time("to")?;
    if let (Some(from), Some(to)) = (from, to) {
        if to < from {
            return Err(ApiError::bad_request("to", "must not be before from"));
        }
    }
    let actor = q.text("actor")?.filter(|a| !a.is_empty());
    let filter = ActionFilter { actor, from, to };
    let (items, next_after) =
        actions::page(&app.pool, &filter, after_of(&q)?, limit_of(&q)?).await?;
    Ok(Json(json!({"items": items, "next_after": next_after})))
}
