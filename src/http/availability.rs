//! `GET /v1/venues/{id}/availability?date=`: per resource, the busy intervals of a local day.
//!
//! Served from the booking board (see [`booking_board::availability`] for what "busy" and "that
//! day" mean: bookings holding their slot, overlapping the venue-local day, times not clipped).
//! No personal data: only times, and the booking ids for staff roles; a customer, who may read
//! availability to pick a slot, sees the intervals alone.

use super::auth::Auth;
use super::params::QueryParams;
use super::problem::ApiError;
use super::queries::{answer, not_auditor, visible_venue, QueryError, STAFF_ROLES};
use super::AppState;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::NaiveDate;
use ledger_projections::booking_board;
use serde_json::{json, Value};
use uuid::Uuid;

pub async fn availability(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: QueryParams,
) -> Result<Response, QueryError> {
    not_auditor(&auth)?;
    // A customer, who may read availability to pick a slot, sees the intervals alone.
    let with_booking_ids = STAFF_ROLES.contains(&auth.role);
    let id = visible_venue(&auth, &id)?;
    let date = q.required_date("date")?;
    let position = app.read_position.reach(q.min_position(&headers)?).await?;
    let body = day(&app, id, date, with_booking_ids)
        .await
        .map_err(QueryError::at(position))?;
    Ok(answer(position, body))
}

async fn day(
    app: &AppState,
    id: Uuid,
    date: NaiveDate,
    with_booking_ids: bool,
) -> Result<Value, ApiError> {
    let a = booking_board::availability(&app.pool, id, date)
        .await?
        .ok_or_else(|| ApiError::not_found("venue"))?;
    let resources: Vec<Value> = a
        .resources
        .iter()
        .map(|r| {
            let busy: Vec<Value> = a
                .busy
                .iter()
                .filter(|b| b.resource_id == r.resource_id)
                .map(|b| {
                    let mut item = json!({"starts_at": b.starts_at, "ends_at": b.ends_at});
                    if with_booking_ids {
                        item["booking_id"] = json!(b.booking_id);
                    }
                    item
                })
                .collect();
            json!({"id": r.resource_id, "name": r.name, "capacity": r.capacity, "busy": busy})
        })
        .collect();
    Ok(json!({
        "venue_id": a.venue.venue_id,
        "date": date,
        "timezone": a.venue.timezone,
        "resources": resources,
    }))
}
