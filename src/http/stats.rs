//! `GET /v1/venues/{id}/stats?from=&to=`: per local day, bookings, covers, no-shows and money.
//!
//! Served from the `daily_stats` projection (see [`daily_stats`] for the definitions), and
//! `min_position` waits on that projection's checkpoint, not the booking board's. The answer has
//! one entry per day from `from` to `to` inclusive, zeros for a day without bookings. Roles:
//! admin and manager; a venue-scoped token sees its venues only (404 otherwise).

use super::auth::{Auth, Role};
use super::params::QueryParams;
use super::problem::ApiError;
use super::queries::{answer, require_role, visible_venue, QueryError};
use super::AppState;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::NaiveDate;
use ledger_projections::daily_stats;
use serde_json::{json, Value};
use uuid::Uuid;

/// The longest range one request may ask for, in days (a leap year).
pub const MAX_DAYS: i64 = 366;

pub async fn stats(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: QueryParams,
) -> Result<Response, QueryError> {
    require_role(&auth, &[Role::Admin, Role::Manager], "read stats")?;
    let id = visible_venue(&auth, &id)?;
    let from = q.required_date("from")?;
    let to = q.required_date("to")?;
    if to < from {
        return Err(ApiError::bad_request("to", "must not be before from").into());
    }
    if (to - from).num_days() + 1 > MAX_DAYS {
        return Err(ApiError::bad_request(
            "to",
            format!("the range from..=to spans at most {MAX_DAYS} days"),
        )
        .into());
    }
    let min = q.min_position(&headers)?;
    let position = app.read_position.reach_of(daily_stats::NAME, min).await?;
    let body = range(&app, id, from, to)
        .await
        .map_err(QueryError::at(position))?;
    Ok(answer(position, body))
}

async fn range(
    app: &AppState,
    id: Uuid,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Value, ApiError> {
    if !daily_stats::venue_known(&app.pool, id).await? {
        return Err(ApiError::not_found("venue"));
    }
    let days = daily_stats::days(&app.pool, id, from, to).await?;
    Ok(json!({"venue_id": id, "days": days}))
}
