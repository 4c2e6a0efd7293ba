//! The booking board: venues with their resources, bookings with their payments.
//!
//! Serves the board (a venue's bookings of a local day), a booking's detail, a customer's
//! bookings and the venue list. Personal data stays sealed: `customer` is the event's envelope.

use crate::{decode, ProjectionError};
use chrono::{DateTime, NaiveDate, Utc};
use ledger_events::booking::BookingEvent;
use ledger_events::envelope::RecordedEvent;
use ledger_events::payment::PaymentEvent;
use ledger_events::venue::VenueEvent;
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

pub const NAME: &str = "booking_board";

/// Every table this projection writes: what a rebuild shadows and swaps (see `ledger-replay`).
pub const TABLES: &[&str] = &["rm_venues", "rm_resources", "rm_bookings", "rm_payments"];

pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    event: &RecordedEvent,
) -> Result<(), ProjectionError> {
    let (position, version) = (event.global_position, event.stream_version);
    let category = event.stream_id.split('-').next().unwrap_or_default();
    match category {
        "venue" => match decode::<VenueEvent>(event)? {
            VenueEvent::VenueRegistered(e) => {
                sqlx::query(
                    "INSERT INTO rm_venues (venue_id, name, timezone, version, position) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(e.venue_id.0)
                .bind(&e.name)
                .bind(&e.timezone)
                .bind(version)
                .bind(position)
                .execute(&mut **tx)
                .await?;
            }
            VenueEvent::ResourceAdded(e) => {
                sqlx::query(
                    "INSERT INTO rm_resources (resource_id, venue_id, name, capacity, position) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(e.resource_id.0)
                .bind(e.venue_id.0)
                .bind(&e.name)
                .bind(i32::try_from(e.capacity).unwrap_or(i32::MAX))
                .bind(position)
                .execute(&mut **tx)
                .await?;
                sqlx::query("UPDATE rm_venues SET version = $2, position = $3 WHERE venue_id = $1")
                    .bind(e.venue_id.0)
                    .bind(version)
                    .bind(position)
                    .execute(&mut **tx)
                    .await?;
            }
        },
        "booking" => apply_booking(tx, decode::<BookingEvent>(event)?, version, position).await?,
        "payment" => apply_payment(tx, decode::<PaymentEvent>(event)?, version, position).await?,
        // Audit and subject events change nothing on the board.
        _ => {}
    }
    Ok(())
}

async fn apply_booking(
    tx: &mut Transaction<'_, Postgres>,
    event: BookingEvent,
    version: i64,
    position: i64,
) -> Result<(), ProjectionError> {
    use BookingEvent as E;
    let status = |id: Uuid, status: &'static str| {
        sqlx::query(
            "UPDATE rm_bookings SET status = $2, version = $3, position = $4 WHERE booking_id = $1",
        )
        .bind(id)
        .bind(status)
        .bind(version)
        .bind(position)
    };
    match event {
        E::BookingRequested(e) => {
            sqlx::query(
                "INSERT INTO rm_bookings (booking_id, venue_id, resource_id, starts_at, ends_at, \
                   local_date, party_size, status, subject_id, customer, version, position) \
                 SELECT $1, $2, $3, $4, $5, \
                        ($4 AT TIME ZONE coalesce((SELECT timezone FROM rm_venues \
                                                    WHERE venue_id = $2), 'UTC'))::date, \
                        $6, 'pending', $7, $8, $9, $10",
            )
            .bind(e.booking_id.0)
            .bind(e.venue_id.0)
            .bind(e.resource_id.0)
            .bind(e.starts_at)
            .bind(e.ends_at)
            .bind(i32::from(e.party_size))
            .bind(e.subject_id.0)
            .bind(serde_json::to_value(&e.customer).unwrap_or(Value::Null))
            .bind(version)
            .bind(position)
            .execute(&mut **tx)
            .await?;
        }
        E::BookingRescheduled(e) => {
            sqlx::query(
                "UPDATE rm_bookings b SET resource_id = $2, starts_at = $3, ends_at = $4, \
                   local_date = ($3 AT TIME ZONE coalesce((SELECT timezone FROM rm_venues v \
                                                             WHERE v.venue_id = b.venue_id), 'UTC'))::date, \
                   version = $5, position = $6 \
                 WHERE booking_id = $1",
            )
            .bind(e.booking_id.0)
            .bind(e.resource_id.0)
            .bind(e.starts_at)
            .bind(e.ends_at)
            .bind(version)
            .bind(position)
            .execute(&mut **tx)
            .await?;
        }
        E::BookingConfirmed(e) => {
            status(e.booking_id.0, "confirmed")
                .execute(&mut **tx)
                .await?;
        }
        E::BookingCancelled(e) => {
            status(e.booking_id.0, "cancelled")
                .execute(&mut **tx)
                .await?;
        }
        E::GuestCheckedIn(e) => {
            status(e.booking_id.0, "checked_in")
                .execute(&mut **tx)
                .await?;
        }
        E::BookingNoShow(e) => {
            status(e.booking_id.0, "no_show").execute(&mut **tx).await?;
        }
    }
    Ok(())
}

async fn apply_payment(
    tx: &mut Transaction<'_, Postgres>,
    event: PaymentEvent,
    version: i64,
    position: i64,
) -> Result<(), ProjectionError> {
    use PaymentEvent as E;
    let (payment_id, captured, refunded, failed) = match &event {
        E::PaymentAuthorized(e) => {
            sqlx::query(
                "INSERT INTO rm_payments (payment_id, booking_id, venue_id, kind, currency, \
                   authorised_minor, version, position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(e.payment_id.0)
            .bind(e.booking_id.0)
            .bind(e.venue_id.0)
            .bind(e.kind.as_str())
            .bind(e.currency.as_str())
            .bind(e.amount_minor)
            .bind(version)
            .bind(position)
            .execute(&mut **tx)
            .await?;
            return Ok(());
        }
        E::PaymentCaptured(e) => (e.payment_id.0, e.amount_minor, 0, false),
        E::PaymentRefunded(e) => (e.payment_id.0, 0, e.amount_minor, false),
        E::PaymentFailed(e) => (e.payment_id.0, 0, 0, true),
    };
    sqlx::query(
        "WITH p AS ( \
           UPDATE rm_payments SET captured_minor = captured_minor + $2, \
                  refunded_minor = refunded_minor + $3, failed = failed OR $4, \
                  version = $5, position = $6 \
            WHERE payment_id = $1 RETURNING booking_id) \
         UPDATE rm_bookings b SET paid_minor = paid_minor + $2, \
                refunded_minor = refunded_minor + $3, position = $6 \
           FROM p WHERE b.booking_id = p.booking_id",
    )
    .bind(payment_id)
    .bind(captured)
    .bind(refunded)
    .bind(failed)
    .bind(version)
    .bind(position)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Queries the API serves from this read model.

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct VenueRow {
    pub venue_id: Uuid,
    pub name: String,
    pub timezone: String,
    pub version: i64,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ResourceRow {
    pub resource_id: Uuid,
    pub venue_id: Uuid,
    pub name: String,
    pub capacity: i32,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BookingRow {
    pub booking_id: Uuid,
    pub venue_id: Uuid,
    pub resource_id: Uuid,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub party_size: i32,
    pub status: String,
    pub subject_id: Uuid,
    /// The sealed envelope, opened by the API.
    pub customer: Value,
    pub paid_minor: i64,
    pub refunded_minor: i64,
    pub version: i64,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PaymentRow {
    pub payment_id: Uuid,
    pub kind: String,
    pub currency: String,
    pub authorised_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub failed: bool,
}

/// Venues (all, or those listed) with their resources.
pub async fn venues(
    pool: &PgPool,
    only: Option<&[Uuid]>,
) -> Result<Vec<(VenueRow, Vec<ResourceRow>)>, sqlx::Error> {
    let venues: Vec<VenueRow> = sqlx::query_as(
        "SELECT venue_id, name, timezone, version FROM rm_venues \
         WHERE $1::uuid[] IS NULL OR venue_id = ANY($1) ORDER BY name, venue_id",
    )
    .bind(only)
    .fetch_all(pool)
    .await?;
    let ids: Vec<Uuid> = venues.iter().map(|v| v.venue_id).collect();
    let resources: Vec<ResourceRow> = sqlx::query_as(
        "SELECT resource_id, venue_id, name, capacity FROM rm_resources \
         WHERE venue_id = ANY($1) ORDER BY name, resource_id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(venues
        .into_iter()
        .map(|v| {
            let own = resources
                .iter()
                .filter(|r| r.venue_id == v.venue_id)
                .cloned()
                .collect();
            (v, own)
        })
        .collect())
}

/// What the board lists: filters and a keyset cursor `(starts_at, booking_id)`.
#[derive(Debug, Clone, Default)]
pub struct BoardFilter {
    pub venue_ids: Option<Vec<Uuid>>,
    pub local_date: Option<NaiveDate>,
    pub status: Option<String>,
    pub subject_id: Option<Uuid>,
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

const BOOKING_COLUMNS: &str = "booking_id, venue_id, resource_id, starts_at, ends_at, party_size, \
                               status, subject_id, customer, paid_minor, refunded_minor, version";

/// One page of bookings in `(starts_at, booking_id)` order: no duplicates or gaps across pages.
///
/// The statement names only the filters in use: an `$n IS NULL OR …` form would leave Postgres a
/// generic plan that cannot use the board index.
pub async fn bookings(pool: &PgPool, f: &BoardFilter) -> Result<Vec<BookingRow>, sqlx::Error> {
    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "SELECT {BOOKING_COLUMNS} FROM rm_bookings WHERE true"
    ));
    if let Some(venues) = &f.venue_ids {
        q.push(" AND venue_id = ANY(")
            .push_bind(venues.clone())
            .push(")");
    }
    if let Some(date) = f.local_date {
        q.push(" AND local_date = ").push_bind(date);
    }
    if let Some(status) = &f.status {
        q.push(" AND status = ").push_bind(status.clone());
    }
    if let Some(subject) = f.subject_id {
        q.push(" AND subject_id = ").push_bind(subject);
    }
    if let Some((t, id)) = f.after {
        q.push(" AND (starts_at, booking_id) > (")
            .push_bind(t)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    q.push(" ORDER BY starts_at, booking_id LIMIT ")
        .push_bind(f.limit);
    q.build_query_as().fetch_all(pool).await
}

pub async fn booking(pool: &PgPool, id: Uuid) -> Result<Option<BookingRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {BOOKING_COLUMNS} FROM rm_bookings WHERE booking_id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

pub async fn payments_of(pool: &PgPool, booking_id: Uuid) -> Result<Vec<PaymentRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT payment_id, kind, currency, authorised_minor, captured_minor, refunded_minor, \
                failed FROM rm_payments WHERE booking_id = $1 ORDER BY payment_id",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await
}

/// Bookings of a venue whose last change is after `after`, in position order: what the live
/// stream sends. A booking changed twice since `after` comes once, in its latest state.
pub async fn changed_since(
    pool: &PgPool,
    venue_id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<(i64, BookingRow)>, sqlx::Error> {
    let rows: Vec<BookingRowWithPosition> = sqlx::query_as(&format!(
        "SELECT position, {BOOKING_COLUMNS} FROM rm_bookings \
         WHERE venue_id = $1 AND position > $2 ORDER BY position LIMIT $3"
    ))
    .bind(venue_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.position, r.row)).collect())
}

#[derive(sqlx::FromRow)]
struct BookingRowWithPosition {
    position: i64,
    #[sqlx(flatten)]
    row: BookingRow,
}

/// A busy interval of a resource: a booking that holds its slot.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BusyRow {
    pub resource_id: Uuid,
    pub booking_id: Uuid,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

/// A venue's availability on one local day: the venue, its resources, and the busy intervals.
#[derive(Debug, Clone)]
pub struct Availability {
    pub venue: VenueRow,
    pub resources: Vec<ResourceRow>,
    /// In `(resource_id, starts_at, booking_id)` order.
    pub busy: Vec<BusyRow>,
}

/// The statuses whose booking holds its slot; `cancelled` and `no_show` free it.
pub const HOLDING_STATUSES: [&str; 3] = ["pending", "confirmed", "checked_in"];

/// A venue's availability on `date`, a day in the venue's own zone; `None` for an unknown venue.
///
/// Busy intervals are the bookings holding their slot (see [`HOLDING_STATUSES`]) that overlap
/// the local day `[date 00:00, date + 1 00:00)` in the venue's zone (half-open, like slots). An
/// interval is the booking's own `starts_at`/`ends_at`, **not clipped** to the day: a booking
/// that crosses midnight shows on both days with the same times, so a client sees how long the
/// resource stays taken and the same booking looks the same on every day it touches. Read in one
/// snapshot, so the resources and the intervals agree.
pub async fn availability(
    pool: &PgPool,
    venue_id: Uuid,
    date: NaiveDate,
) -> Result<Option<Availability>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let venue: Option<VenueRow> = sqlx::query_as(
        "SELECT venue_id, name, timezone, version FROM rm_venues WHERE venue_id = $1",
    )
    .bind(venue_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(venue) = venue else {
        return Ok(None);
    };
    let resources: Vec<ResourceRow> = sqlx::query_as(
        "SELECT resource_id, venue_id, name, capacity FROM rm_resources \
         WHERE venue_id = $1 ORDER BY name, resource_id",
    )
    .bind(venue_id)
    .fetch_all(&mut *tx)
    .await?;
    // A slot lasts at most 24 h (the booking decider's rule), so a booking overlapping the day
    // starts on it or on one of the two days before (two: the day before may be 23 h long at a
    // DST change); `local_date` narrows the index scan, the instants decide.
    let busy: Vec<BusyRow> = sqlx::query_as(
        "SELECT resource_id, booking_id, starts_at, ends_at FROM rm_bookings \
         WHERE venue_id = $1 \
           AND local_date BETWEEN $2::date - 2 AND $2::date \
           AND status = ANY($4) \
           AND starts_at < (($2::date + 1)::timestamp AT TIME ZONE $3) \
           AND ends_at > ($2::date::timestamp AT TIME ZONE $3) \
         ORDER BY resource_id, starts_at, booking_id",
    )
    .bind(venue_id)
    .bind(date)
    .bind(&venue.timezone)
    .bind(&HOLDING_STATUSES[..])
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Availability {
        venue,
        resources,
        busy,
    }))
}
