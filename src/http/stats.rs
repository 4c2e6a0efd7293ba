//! `GET /v1/venues/{id}/stats?from=&to=`: per local day, bookings, covers, no-shows and money.
//!
//! Served from the `daily_stats` projection (see [`daily_stats`] for the definitions), and
//! `min_position` waits on that projection's checkpoint, not the booking board's. The answer has
//! one entry per day from `from` to `to` inclusive, zeros for a day without bookings. Roles:
//! admin and manager; a venue-scoped token sees its venues only (404 otherwise).

use super::auth::{Auth, Role};
use super::problem::ApiError;
use super::queries::{answer, min_position, parse_opt};
use super::{parse_id, AppState};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::NaiveDate;
use ledger_events::ids::VenueId;
use ledger_projections::daily_stats;
use serde::Deserialize;
use serde_json::json;

/// The longest range one request may ask for, in days (a leap year).
pub const MAX_DAYS: i64 = 366;

#[derive(Deserialize, Default)]
pub struct StatsQuery {
    from: Option<String>,
    to: Option<String>,
    min_position: Option<String>,
}

fn required_date(name: &'static str, raw: &Option<String>) -> Result<NaiveDate, ApiError> {
    parse_opt(name, raw, "a date YYYY-MM-DD")?
        .ok_or_else(|| ApiError::bad_request(name, "is required: a date YYYY-MM-DD"))
}

pub async fn stats(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<StatsQuery>,
) -> Result<Response, ApiError> {
    if !matches!(auth.role, Role::Admin | Role::Manager) {
        return Err(ApiError::forbidden(format!(
            "the {} role may not read stats",
            auth.role.as_str()
        )));
    }
    let id = parse_id(&id, "venue")?;
    if !auth.sees_venue(VenueId(id)) {
        return Err(ApiError::not_found("venue"));
    }
    let from = required_date("from", &q.from)?;
    let to = required_date("to", &q.to)?;
    if to < from {
        return Err(ApiError::bad_request("to", "must not be before from"));
    }
    if (to - from).num_days() + 1 > MAX_DAYS {
        return Err(ApiError::bad_request(
            "to",
            format!("the range from..=to spans at most {MAX_DAYS} days"),
        ));
    }
    let min = min_position(
        parse_opt("min_position", &q.min_position, "a position")?,
        &headers,
    )?;
    let position = app.read_position.reach_of(daily_stats::NAME, min).await?;
    if !daily_stats::venue_known(&app.pool, id).await? {
        return Err(ApiError::not_found("venue"));
    }
    let days = daily_stats::days(&app.pool, id, from, to).await?;
    Ok(answer(position, json!({"venue_id": id, "days": days})))
}
