//! `GET /v1/venues/{id}/availability?date=`: per resource, the busy intervals of a local day.
//!
//! Served from the booking board (see [`booking_board::availability`] for what "busy" and "that
//! day" mean: bookings holding their slot, overlapping the venue-local day, times not clipped).
//! No personal data: only times, and the booking ids for staff roles; a customer, who may read
//! availability to pick a slot, sees the intervals alone.

use super::auth::{Auth, Role};
use super::problem::ApiError;
use super::queries::{answer, min_position, parse_opt};
use super::{parse_id, AppState};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::NaiveDate;
use ledger_events::ids::VenueId;
use ledger_projections::booking_board;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize, Default)]
pub struct AvailabilityQuery {
    date: Option<String>,
    min_position: Option<String>,
}

pub async fn availability(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<AvailabilityQuery>,
) -> Result<Response, ApiError> {
    let with_booking_ids = match auth.role {
        Role::Admin | Role::Manager | Role::Staff | Role::Door => true,
        Role::Customer => false,
        Role::Auditor => {
            return Err(ApiError::forbidden(
                "the auditor role reads the audit endpoints",
            ))
        }
    };
    let id = parse_id(&id, "venue")?;
    if !auth.sees_venue(VenueId(id)) {
        return Err(ApiError::not_found("venue"));
    }
    let date: NaiveDate = parse_opt("date", &q.date, "a date YYYY-MM-DD")?
        .ok_or_else(|| ApiError::bad_request("date", "is required: a date YYYY-MM-DD"))?;
    let min = min_position(
        parse_opt("min_position", &q.min_position, "a position")?,
        &headers,
    )?;
    let position = app.read_position.reach(min).await?;
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
    Ok(answer(
        position,
        json!({
            "venue_id": a.venue.venue_id,
            "date": date,
            "timezone": a.venue.timezone,
            "resources": resources,
        }),
    ))
}
