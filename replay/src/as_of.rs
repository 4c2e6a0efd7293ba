//! As-of: a stream's state at a past moment, folded from the log with the same `evolve` the
//! command side decides on, so an auditor sees exactly what the ledger "knew" then.
//!
//! The state is rendered as JSON by hand: the aggregates' states are the command side's types and
//! deliberately carry no `Serialize` (what they hold is not a wire format). Personal data is not
//! part of any aggregate state, so nothing here needs opening.

use crate::{read_stream_until, ReadError};
use chrono::{DateTime, Utc};
use ledger_events::booking::{self, Booking, BookingEvent};
use ledger_events::envelope::{DomainEvent, RecordedEvent};
use ledger_events::error::DecodeError;
use ledger_events::ids::Category;
use ledger_events::payment::{self, Payment, PaymentEvent};
use ledger_events::venue::{self, Venue, VenueEvent};
use serde_json::{json, Value};
use sqlx::PgExecutor;

#[derive(Debug, thiserror::Error)]
pub enum AsOfError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Only aggregates have a state to fold into; subject and audit streams are records.
    #[error("stream {0} is not a booking, payment or venue stream: it has no state to fold")]
    UnknownCategory(String),
}

/// An aggregate's state and where in the log it stood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folded<S> {
    pub state: S,
    /// The stream version of the last event folded.
    pub version: i64,
    /// The global position of the last event folded.
    pub position: i64,
}

/// Folds recorded events (one stream, in stream order) with `evolve`. `None` when they do not
/// make the aggregate exist (no events, or none that creates it).
pub fn fold<E: DomainEvent, S>(
    events: &[RecordedEvent],
    evolve: fn(Option<S>, &E) -> Option<S>,
) -> Result<Option<Folded<S>>, DecodeError> {
    let mut state = None;
    let (mut version, mut position) = (0, 0);
    for r in events {
        let event = E::decode(&r.event_type, r.schema_version, &r.payload)?;
        state = evolve(state, &event);
        version = r.stream_version;
        position = r.global_position;
    }
    Ok(state.map(|state| Folded {
        state,
        version,
        position,
    }))
}

/// A booking as of `at`; `None` if it did not exist yet.
pub async fn booking_as_of<'e>(
    db: impl PgExecutor<'e>,
    stream_id: &str,
    at: DateTime<Utc>,
) -> Result<Option<Folded<Booking>>, AsOfError> {
    let events = read_stream_until(db, stream_id, at).await?;
    Ok(fold::<BookingEvent, _>(&events, booking::evolve)?)
}

/// Any aggregate stream as of `at`, as JSON (see [`render`]); the kind of aggregate comes from
/// the stream's category. `None` if it did not exist yet.
pub async fn stream_as_of<'e>(
    db: impl PgExecutor<'e>,
    stream_id: &str,
    at: DateTime<Utc>,
) -> Result<Option<Value>, AsOfError> {
    // Checked before reading so an unfoldable stream is refused the same way whether or not it
    // has events.
    let category = foldable(stream_id)?;
    let events = read_stream_until(db, stream_id, at).await?;
    let state = match category {
        Category::Booking => fold::<BookingEvent, _>(&events, booking::evolve)?
            .map(|f| render(stream_id, at, &f, booking_json(&f.state))),
        Category::Payment => fold::<PaymentEvent, _>(&events, payment::evolve)?
            .map(|f| render(stream_id, at, &f, payment_json(&f.state))),
        _ => fold::<VenueEvent, _>(&events, venue::evolve)?
            .map(|f| render(stream_id, at, &f, venue_json(&f.state))),
    };
    Ok(state)
}

/// The category of a stream whose state can be folded, or why not.
pub fn foldable(stream_id: &str) -> Result<Category, AsOfError> {
    match Category::of_stream(stream_id) {
        Some(c @ (Category::Booking | Category::Payment | Category::Venue)) => Ok(c),
        _ => Err(AsOfError::UnknownCategory(stream_id.to_owned())),
    }
}

/// The state's fields, with `stream`, `as_of`, `version` and `position` beside them.
pub fn render<S>(stream_id: &str, at: DateTime<Utc>, folded: &Folded<S>, state: Value) -> Value {
    let mut out = json!({
        "stream": stream_id,
        "as_of": at,
        "version": folded.version,
        "position": folded.position,
    });
    if let (Value::Object(out), Value::Object(fields)) = (&mut out, state) {
        out.extend(fields);
    }
    out
}

pub fn booking_json(b: &Booking) -> Value {
    json!({
        "id": b.id,
        "status": b.status.as_str(),
        "venue_id": b.venue_id,
        "resource_id": b.resource_id,
        "starts_at": b.slot.starts_at,
        "ends_at": b.slot.ends_at,
        "party_size": b.party_size,
        "subject_id": b.subject_id,
    })
}

pub fn payment_json(p: &Payment) -> Value {
    json!({
        "id": p.id,
        "booking_id": p.booking_id,
        "venue_id": p.venue_id,
        "kind": p.kind.as_str(),
        "currency": p.currency.as_str(),
        "status": p.status(),
        "authorised_minor": p.authorised_minor,
        "captured_minor": p.captured_minor,
        "refunded_minor": p.refunded_minor,
        "failed": p.failed,
    })
}

pub fn venue_json(v: &Venue) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "timezone": v.timezone.name(),
        "resources": v.resources.values().map(|r| json!({
            "id": r.id, "name": r.name, "capacity": r.capacity,
        })).collect::<Vec<_>>(),
    })
}
