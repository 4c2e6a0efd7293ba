//! # ledger-projections: the read models
//!
//! Owns every read model: its tables, its fold from events, its checkpoint, its JetStream worker,
//! and the SQL of the queries the API serves from it (the crate that owns a table owns every
//! statement touching it). The command side never reads from here to decide.
//!
//! Each projection is a fold `(&mut Transaction, &[RecordedEvent]) -> Result<()>` ([`apply`])
//! applied together with its checkpoint in one transaction: positions at or below the checkpoint
//! are skipped (delivery is at least once, the effect exactly once), and anything but
//! `checkpoint + 1` is refused, never silently skipped. The same fold serves the live worker
//! ([`worker`], through [`apply_batch`]) and rebuilds fed from Postgres (`ledger-replay`'s
//! `rebuild`, into shadow tables: [`tables`]).
//!
//! The fold is set-based: it decodes the whole batch, loads the rows the batch refers to (by
//! key, a statement per table), folds the batch in memory, and writes each table back with a
//! statement or two whatever the batch's size: `INSERT`/`UPDATE … FROM unnest(arrays)`, or, for
//! many new rows of the big tables (64 and more, as in a rebuild's pages), a binary `COPY`.
//! Local days are computed by Postgres, in the write or in one statement before a `COPY`. Its
//! specification is the per-event fold ([`apply_one`]: one event, a few statements, the fold as
//! it was first written); the two are tested equal on generated logs
//! (`tests/api/read_models.rs`), and nothing but those tests runs the per-event one.
//!
//! ## Layout
//! - [`booking_board`]: venues and resources, bookings, payments: the board, a booking's detail,
//!   a customer's bookings, a venue's availability.
//! - [`daily_stats`]: per venue and local day, bookings, covers, no-shows and money.
//! - [`worker`]: a durable JetStream pull consumer per projection.

pub mod booking_board;
mod copy;
pub mod daily_stats;
pub mod worker;

use chrono::{DateTime, NaiveDate, Utc};
use ledger_events::booking::BookingEvent;
use ledger_events::envelope::{DomainEvent, RecordedEvent};
use ledger_events::payment::PaymentEvent;
use ledger_events::venue::VenueEvent;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::collections::BTreeMap;
use uuid::Uuid;

/// The read models `ledger replay rebuild --projection` will take, by name.
pub const PROJECTIONS: &[&str] = &[booking_board::NAME, daily_stats::NAME];

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("position {got} arrived at checkpoint {checkpoint}: a gap, refused")]
    Gap { checkpoint: i64, got: i64 },
    #[error("cannot decode event at position {position}: {reason}")]
    Decode { position: i64, reason: String },
    /// What the per-event fold's statement would have failed on: a row created twice, or a sum
    /// out of its column's range.
    #[error("event at position {position} refused by {table}: {reason}")]
    Refused {
        position: i64,
        table: &'static str,
        reason: &'static str,
    },
}

/// The position a projection has applied up to (0 before its first event).
pub async fn checkpoint(db: &mut PgConnection, projection: &str) -> Result<i64, sqlx::Error> {
    let found: Option<(i64,)> =
        sqlx::query_as("SELECT position FROM projection_checkpoints WHERE projection = $1")
            .bind(projection)
            .fetch_optional(db)
            .await?;
    Ok(found.map(|(p,)| p).unwrap_or(0))
}

/// Checkpoints of every projection, for readiness and lag metrics.
pub async fn checkpoints(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT projection, position FROM projection_checkpoints ORDER BY projection")
        .fetch_all(pool)
        .await
}

/// Applies events to one projection in one transaction with its checkpoint. Returns the new
/// checkpoint. Events at or below the checkpoint are skipped; a gap is refused (nothing of the
/// batch is applied then). Commits notify `ledger_projection` with `name:position`.
pub async fn apply_batch(
    pool: &PgPool,
    projection: &str,
    events: &[RecordedEvent],
) -> Result<i64, ProjectionError> {
    let mut tx = pool.begin().await?;
    // The row lock serialises two workers of the same projection. The row is made by the first
    // batch ever (two first batches both insert; the lock then orders them).
    const LOCK: &str =
        "SELECT position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE";
    let locked: Option<i64> = sqlx::query_scalar(LOCK)
        .bind(projection)
        .fetch_optional(&mut *tx)
        .await?;
    let before = match locked {
        Some(at) => at,
        None => {
            sqlx::query(
                "INSERT INTO projection_checkpoints (projection) VALUES ($1) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(projection)
            .execute(&mut *tx)
            .await?;
            sqlx::query_scalar(LOCK)
                .bind(projection)
                .fetch_one(&mut *tx)
                .await?
        }
    };
    let (fresh, at) = unapplied(before, events)?;
    if !fresh.is_empty() {
        apply_decoded(&mut tx, projection, &Batch::decode(fresh)?).await?;
        // Delivered on commit.
        sqlx::query(
            "WITH moved AS (UPDATE projection_checkpoints SET position = $2, updated_at = now() \
                             WHERE projection = $1 RETURNING projection) \
             SELECT pg_notify('ledger_projection', $3) FROM moved",
        )
        .bind(projection)
        .bind(at)
        .bind(format!("{projection}:{at}"))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(at)
}

/// The events of `events` that follow `checkpoint`, and the position they reach: those at or
/// below the position reached so far are skipped (redeliveries), and the rest must follow it one
/// by one; anything else is a gap, refused.
fn unapplied(
    checkpoint: i64,
    events: &[RecordedEvent],
) -> Result<(Vec<&RecordedEvent>, i64), ProjectionError> {
    let mut at = checkpoint;
    let mut fresh = Vec::new();
    for event in events {
        if event.global_position <= at {
            continue;
        }
        if event.global_position != at + 1 {
            return Err(ProjectionError::Gap {
                checkpoint: at,
                got: event.global_position,
            });
        }
        fresh.push(event);
        at = event.global_position;
    }
    Ok((fresh, at))
}

/// The tables a projection writes (its fold names them unqualified, so they resolve through
/// `search_path`), or `None` for an unknown projection.
pub fn tables(projection: &str) -> Option<&'static [&'static str]> {
    match projection {
        booking_board::NAME => Some(booking_board::TABLES),
        daily_stats::NAME => Some(daily_stats::TABLES),
        _ => None,
    }
}

/// Applies consecutive events to a projection's tables, without its checkpoint: the fold itself,
/// which [`apply_batch`] runs for the live worker and a rebuild runs against its shadow tables
/// (by `SET LOCAL search_path`). The caller owns ordering and the checkpoint.
///
/// Set-based: a handful of statements per table whatever the number of events (see the crate
/// doc); the result is the one [`apply_one`] gives event by event.
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    projection: &str,
    events: &[RecordedEvent],
) -> Result<(), ProjectionError> {
    apply_decoded(tx, projection, &Batch::decode(events)?).await
}

/// [`apply`] of events already decoded.
pub async fn apply_decoded(
    tx: &mut Transaction<'_, Postgres>,
    projection: &str,
    batch: &Batch,
) -> Result<(), ProjectionError> {
    if batch.0.is_empty() {
        return Ok(());
    }
    match projection {
        booking_board::NAME => booking_board::apply(tx, &batch.0).await,
        daily_stats::NAME => daily_stats::apply(tx, &batch.0).await,
        _ => Ok(()),
    }
}

/// Applies one event to a projection's tables with a few statements: the per-event fold, kept as
/// the specification [`apply`] is tested against (`tests/api/read_models.rs`). Production code
/// runs [`apply`].
pub async fn apply_one(
    tx: &mut Transaction<'_, Postgres>,
    projection: &str,
    event: &RecordedEvent,
) -> Result<(), ProjectionError> {
    match projection {
        booking_board::NAME => booking_board::apply_one(tx, event).await,
        daily_stats::NAME => daily_stats::apply_one(tx, event).await,
        _ => Ok(()),
    }
}

/// Decodes a recorded event as its aggregate's event type (upcasting on the way).
pub(crate) fn decode<E: DomainEvent>(event: &RecordedEvent) -> Result<E, ProjectionError> {
    E::decode(&event.event_type, event.schema_version, &event.payload).map_err(|e| {
        ProjectionError::Decode {
            position: event.global_position,
            reason: e.to_string(),
        }
    })
}

/// An event of an aggregate the read models follow, decoded, with where it sits in the log.
pub(crate) struct Decoded {
    pub position: i64,
    /// The event's version in its stream.
    pub version: i64,
    pub change: Change,
}

pub(crate) enum Change {
    Venue(VenueEvent),
    Booking(BookingEvent),
    Payment(PaymentEvent),
}

/// The booking an event of its stream is about.
pub(crate) fn booking_of(e: &BookingEvent) -> Uuid {
    match e {
        BookingEvent::BookingRequested(e) => e.booking_id.0,
        BookingEvent::BookingConfirmed(e) => e.booking_id.0,
        BookingEvent::BookingRescheduled(e) => e.booking_id.0,
        BookingEvent::BookingCancelled(e) => e.booking_id.0,
        BookingEvent::GuestCheckedIn(e) => e.booking_id.0,
        BookingEvent::BookingNoShow(e) => e.booking_id.0,
    }
}

/// The payment an event of its stream is about.
pub(crate) fn payment_of(e: &PaymentEvent) -> Uuid {
    match e {
        PaymentEvent::PaymentAuthorized(e) => e.payment_id.0,
        PaymentEvent::PaymentCaptured(e) => e.payment_id.0,
        PaymentEvent::PaymentFailed(e) => e.payment_id.0,
        PaymentEvent::PaymentRefunded(e) => e.payment_id.0,
    }
}

/// Events decoded for the folds ([`apply_decoded`]), the same for every projection. Decoding is
/// CPU work without I/O: a reader can decode the next batch while the previous one is written.
pub struct Batch(Vec<Decoded>);

impl Batch {
    /// Decodes the events of the categories the read models follow (by stream name, as the
    /// per-event fold does); audit and subject events change no read model and are left out.
    pub fn decode<'a>(
        events: impl IntoIterator<Item = &'a RecordedEvent>,
    ) -> Result<Self, ProjectionError> {
        decode_all(events).map(Batch)
    }
}

fn decode_all<'a>(
    events: impl IntoIterator<Item = &'a RecordedEvent>,
) -> Result<Vec<Decoded>, ProjectionError> {
    let mut decoded = Vec::new();
    for event in events {
        let change = match event.stream_id.split('-').next().unwrap_or_default() {
            "venue" => Change::Venue(decode(event)?),
            "booking" => Change::Booking(decode(event)?),
            "payment" => Change::Payment(decode(event)?),
            _ => continue,
        };
        decoded.push(Decoded {
            position: event.global_position,
            version: event.stream_version,
            change,
        });
    }
    Ok(decoded)
}

/// One table's rows as a batch folds them, by key: the rows the table held for the keys the batch
/// refers to (loaded before the fold), then each as the events leave it.
///
/// A key the batch creates is not loaded: if the table already held it, the per-event fold would
/// have failed on its `INSERT`, and so does the batch's (the whole batch is refused either way).
/// So a key absent from the map is one the batch creates, and an event before its creation finds
/// nothing, as it would have.
pub(crate) struct Rows<T> {
    /// Ordered by key: statements write in key order, so two writers take row locks alike.
    rows: BTreeMap<Uuid, Slot<T>>,
    table: &'static str,
}

struct Slot<T> {
    /// The table held the key when the batch began (so it is updated, not inserted).
    stored: bool,
    row: Option<T>,
    changed: bool,
}

impl<T> Rows<T> {
    pub fn new(table: &'static str) -> Self {
        Rows {
            rows: BTreeMap::new(),
            table,
        }
    }

    /// A row as the table holds it.
    pub fn stored(&mut self, id: Uuid, row: T) {
        self.rows.insert(
            id,
            Slot {
                stored: true,
                row: Some(row),
                changed: false,
            },
        );
    }

    pub fn get(&self, id: &Uuid) -> Option<&T> {
        self.rows.get(id).and_then(|s| s.row.as_ref())
    }

    /// The row, to change: it is written back.
    pub fn get_mut(&mut self, id: &Uuid) -> Option<&mut T> {
        let slot = self.rows.get_mut(id)?;
        let row = slot.row.as_mut()?;
        slot.changed = true;
        Some(row)
    }

    /// A new row; refused when the key already has one (the `INSERT` would have failed).
    pub fn create(&mut self, id: Uuid, row: T, position: i64) -> Result<(), ProjectionError> {
        let slot = self.rows.entry(id).or_insert(Slot {
            stored: false,
            row: None,
            changed: false,
        });
        if slot.row.is_some() {
            return Err(ProjectionError::Refused {
                position,
                table: self.table,
                reason: "the row already exists",
            });
        }
        slot.row = Some(row);
        slot.changed = true;
        Ok(())
    }

    /// Rows the table did not hold: what to insert.
    pub fn created(&self) -> impl Iterator<Item = (Uuid, &T)> {
        self.rows
            .iter()
            .filter(|(_, s)| !s.stored)
            .filter_map(|(id, s)| s.row.as_ref().map(|r| (*id, r)))
    }

    /// Rows the table held and the batch changed: what to update.
    pub fn updated(&self) -> impl Iterator<Item = (Uuid, &T)> {
        self.rows
            .iter()
            .filter(|(_, s)| s.stored && s.changed)
            .filter_map(|(id, s)| s.row.as_ref().map(|r| (*id, r)))
    }
}

/// A booking's local day: as stored, or the day of its start in a zone (the venue's when the
/// event that set it was applied; UTC for a venue the projection had not seen), which Postgres
/// computes with its zone rules, as the per-event fold does:
/// `(starts_at AT TIME ZONE coalesce(zone, 'UTC'))::date`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Day {
    Stored(NaiveDate),
    At(DateTime<Utc>, Option<String>),
}

impl Day {
    /// `(day_date, day_start, day_zone)`: the columns [`DAY_SQL`] reads.
    pub(crate) fn columns(&self) -> (Option<NaiveDate>, Option<DateTime<Utc>>, Option<String>) {
        match self {
            Day::Stored(d) => (Some(*d), None, None),
            Day::At(t, zone) => (None, Some(*t), zone.clone()),
        }
    }
}

/// A [`Day`] in SQL, from the columns `day_date`, `day_start`, `day_zone` of `u`.
pub(crate) const DAY_SQL: &str =
    "coalesce(u.day_date, (u.day_start AT TIME ZONE coalesce(u.day_zone, 'UTC'))::date)";

/// New rows of a big table go by binary `COPY` from this many on (its day query and extra round
/// trips pay off); fewer, as in a worker's batches, by one `INSERT … unnest`.
pub(crate) const COPY_FROM: usize = 64;

/// The local days, in order: a stored day as it is, the others computed by Postgres in one
/// statement.
pub(crate) async fn local_dates<'a>(
    tx: &mut Transaction<'_, Postgres>,
    days: impl Iterator<Item = &'a Day>,
) -> Result<Vec<NaiveDate>, sqlx::Error> {
    let mut out: Vec<Option<NaiveDate>> = Vec::new();
    let (mut starts, mut zones) = (Vec::new(), Vec::new());
    for day in days {
        match day {
            Day::Stored(d) => out.push(Some(*d)),
            Day::At(start, zone) => {
                out.push(None);
                starts.push(*start);
                zones.push(zone.as_deref());
            }
        }
    }
    if !starts.is_empty() {
        let computed: Vec<NaiveDate> = sqlx::query_scalar(
            "SELECT (u.t AT TIME ZONE coalesce(u.z, 'UTC'))::date \
               FROM unnest($1::timestamptz[], $2::text[]) WITH ORDINALITY AS u(t, z, n) \
              ORDER BY u.n",
        )
        .bind(&starts)
        .bind(&zones)
        .fetch_all(&mut **tx)
        .await?;
        let mut computed = computed.into_iter();
        for slot in out.iter_mut().filter(|d| d.is_none()) {
            *slot = computed.next();
        }
    }
    // One day per instant came back, so none is missing.
    out.into_iter()
        .map(|d| d.ok_or(sqlx::Error::RowNotFound))
        .collect()
}

/// `a + b` as the column's `bigint` arithmetic would have it: out of range is refused.
pub(crate) fn add(
    a: i64,
    b: i64,
    position: i64,
    table: &'static str,
) -> Result<i64, ProjectionError> {
    a.checked_add(b).ok_or(ProjectionError::Refused {
        position,
        table,
        reason: "bigint out of range",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_created_twice_is_refused_and_stored_rows_are_updated_not_inserted() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut rows: Rows<i32> = Rows::new("t");
        rows.stored(a, 1);
        assert!(matches!(
            rows.create(a, 2, 7),
            Err(ProjectionError::Refused { position: 7, .. })
        ));
        rows.create(b, 3, 8).unwrap_or_else(|e| panic!("{e}"));
        assert!(rows.create(b, 4, 9).is_err());
        assert_eq!(rows.updated().count(), 0, "unchanged");
        if let Some(v) = rows.get_mut(&a) {
            *v = 5;
        }
        assert!(rows.get_mut(&Uuid::new_v4()).is_none());
        assert_eq!(rows.updated().collect::<Vec<_>>(), [(a, &5)]);
        assert_eq!(rows.created().collect::<Vec<_>>(), [(b, &3)]);
    }

    #[test]
    fn redeliveries_are_skipped_and_a_gap_is_refused() {
        let event = |p: i64| RecordedEvent {
            global_position: p,
            event_id: Uuid::new_v4(),
            stream_id: format!("audit-{p}"),
            stream_version: 1,
            event_type: "CommandAudited".into(),
            schema_version: 1,
            payload: serde_json::Value::Null,
            metadata: serde_json::Value::Null,
            recorded_at: Utc::now(),
        };
        let events: Vec<_> = [3, 4, 5, 5, 6].into_iter().map(event).collect();
        let (fresh, at) = unapplied(4, &events).unwrap_or_else(|e| panic!("{e}"));
        let positions: Vec<i64> = fresh.iter().map(|e| e.global_position).collect();
        assert_eq!((positions, at), (vec![5, 6], 6));
        let holed: Vec<_> = [5, 7].into_iter().map(event).collect();
        assert!(matches!(
            unapplied(4, &holed),
            Err(ProjectionError::Gap {
                checkpoint: 5,
                got: 7
            })
        ));
    }
}
