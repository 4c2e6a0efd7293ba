//! `GET /v1/live?venue_id=`: server-sent events, one per booking change at the venue.
//!
//! Each event carries the booking's updated item (as `GET /v1/bookings/{id}` shows it) and `id:`
//! the global position of its last change. `Last-Event-ID` (or `?last_event_id=`) resumes: every
//! booking changed after that position is sent again in its current state, so a reconnecting
//! client misses nothing (changes made while it was away arrive coalesced into the latest state).
//! The stream reads the read model when the projection's position moves; it never holds up the
//! projection worker, however slow the client.

use super::auth::Auth;
use super::params::QueryParams;
use super::problem::ApiError;
use super::queries::{require_role, STAFF_ROLES};
use super::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ledger_events::ids::VenueId;
use ledger_projections::booking_board;
use std::collections::VecDeque;
use std::convert::Infallible;
use uuid::Uuid;

/// Rows read per round: bounds memory per client.
const PAGE: i64 = 200;

struct Tail {
    app: AppState,
    venue: Uuid,
    after: i64,
    queue: VecDeque<Event>,
    changes: tokio::sync::watch::Receiver<i64>,
}

pub async fn live(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    q: QueryParams,
) -> Result<Response, ApiError> {
    require_role(&auth, STAFF_ROLES, "follow the live board")?;
    let venue: Uuid = q.required("venue_id", "a venue id")?;
    if !auth.sees_venue(VenueId(venue)) {
        return Err(ApiError::not_found("venue"));
    }
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(q.text("last_event_id")?.map(str::to_owned));
    let after = match resume {
        None => app.read_position.current(),
        Some(raw) => raw
            .trim()
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request("Last-Event-ID", "must be a position"))?,
    };
    let tail = Tail {
        changes: app.read_position.subscribe(),
        app,
        venue,
        after,
        queue: VecDeque::new(),
    };
    let stream = futures::stream::unfold(tail, |mut t| async move {
        loop {
            if let Some(event) = t.queue.pop_front() {
                return Some((Ok::<_, Infallible>(event), t));
            }
            // Mark the current position seen before reading, so a change committed while we
            // read wakes us again rather than being missed.
            t.changes.borrow_and_update();
            let rows = match booking_board::changed_since(&t.app.pool, t.venue, t.after, PAGE).await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "live stream read failed; closing it");
                    return None;
                }
            };
            if rows.is_empty() {
                if t.changes.changed().await.is_err() {
                    return None;
                }
                continue;
            }
            for (position, row) in rows {
                t.after = position;
                match t.app.booking_item(&row).await {
                    Ok(item) => {
                        let event = Event::default()
                            .id(position.to_string())
                            .event("booking")
                            .json_data(item)
                            .unwrap_or_else(|_| Event::default().comment("unencodable item"));
                        t.queue.push_back(event);
                    }
                    Err(_) => return None,
                }
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
