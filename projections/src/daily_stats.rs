//! Daily statistics: per venue and local day, bookings, covers, no-shows and money.
//!
//! Definitions (each day's figures are those of the bookings whose start falls on that day in
//! the venue's zone, in their current state, so a reschedule to another day moves everything the
//! booking counts for, money included):
//! - `bookings`: bookings of that day, whatever their status (a cancelled one still counts: it
//!   was requested);
//! - `covers`: the sum of the party sizes of that day's bookings that are not cancelled (no-shows
//!   included: they held a table);
//! - `no_shows`: that day's bookings marked no-show;
//! - `captured_minor`, `refunded_minor`: captured and refunded minor units of the payments of that
//!   day's bookings (gross captures; refunds are not subtracted from them). Amounts are summed
//!   as they are: a venue is expected to take one currency.
//!
//! The projection is rebuilt on its own, so it never reads another projection's tables: it keeps
//! the lookup state it needs (venue zones, each booking's day, party size, status and money, each
//! payment's booking) in its own `rm_stats_*` tables, and `rm_daily_stats` holds the per-day sums.
//! Every change to a booking is "take its contribution off its day, change it, add it back", so
//! the sums never drift from the bookings they sum. No personal data is kept.

use crate::{decode, ProjectionError};
use chrono::NaiveDate;
use ledger_events::booking::BookingEvent;
use ledger_events::envelope::RecordedEvent;
use ledger_events::payment::PaymentEvent;
use ledger_events::venue::VenueEvent;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

pub const NAME: &str = "daily_stats";

/// Every table this projection writes: what a rebuild shadows and swaps (see `ledger-replay`).
pub const TABLES: &[&str] = &[
    "rm_stats_venues",
    "rm_stats_bookings",
    "rm_stats_payments",
    "rm_daily_stats",
];

pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    event: &RecordedEvent,
) -> Result<(), ProjectionError> {
    let category = event.stream_id.split('-').next().unwrap_or_default();
    match category {
        "venue" => {
            if let VenueEvent::VenueRegistered(e) = decode::<VenueEvent>(event)? {
                sqlx::query("INSERT INTO rm_stats_venues (venue_id, timezone) VALUES ($1, $2)")
                    .bind(e.venue_id.0)
                    .bind(&e.timezone)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        "booking" => apply_booking(tx, decode::<BookingEvent>(event)?).await?,
        "payment" => apply_payment(tx, decode::<PaymentEvent>(event)?).await?,
        // Resources, audit records and erasure change no figure.
        _ => {}
    }
    Ok(())
}

/// Adds (`sign` 1) or takes off (`sign` -1) a booking's contribution to its day's row, deleting
/// a row no booking contributes to any more.
async fn shift(
    tx: &mut Transaction<'_, Postgres>,
    booking_id: Uuid,
    sign: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO rm_daily_stats AS d (venue_id, local_date, bookings, covers, no_shows, \
           captured_minor, refunded_minor) \
         SELECT venue_id, local_date, $2, \
                $2 * CASE WHEN status = 'cancelled' THEN 0 ELSE party_size END, \
                $2 * CASE WHEN status = 'no_show' THEN 1 ELSE 0 END, \
                $2 * captured_minor, $2 * refunded_minor \
           FROM rm_stats_bookings WHERE booking_id = $1 \
         ON CONFLICT (venue_id, local_date) DO UPDATE SET \
           bookings = d.bookings + EXCLUDED.bookings, \
           covers = d.covers + EXCLUDED.covers, \
           no_shows = d.no_shows + EXCLUDED.no_shows, \
           captured_minor = d.captured_minor + EXCLUDED.captured_minor, \
           refunded_minor = d.refunded_minor + EXCLUDED.refunded_minor",
    )
    .bind(booking_id)
    .bind(sign)
    .execute(&mut **tx)
    .await?;
    if sign < 0 {
        sqlx::query(
            "DELETE FROM rm_daily_stats d USING rm_stats_bookings b \
              WHERE b.booking_id = $1 AND d.venue_id = b.venue_id \
                AND d.local_date = b.local_date AND d.bookings = 0",
        )
        .bind(booking_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn set_status(
    tx: &mut Transaction<'_, Postgres>,
    booking_id: Uuid,
    status: &'static str,
) -> Result<(), sqlx::Error> {
    shift(tx, booking_id, -1).await?;
    sqlx::query("UPDATE rm_stats_bookings SET status = $2 WHERE booking_id = $1")
        .bind(booking_id)
        .bind(status)
        .execute(&mut **tx)
        .await?;
    shift(tx, booking_id, 1).await
}

async fn apply_booking(
    tx: &mut Transaction<'_, Postgres>,
    event: BookingEvent,
) -> Result<(), ProjectionError> {
    use BookingEvent as E;
    match event {
        E::BookingRequested(e) => {
            // The booking's day: its start in the venue's zone (UTC for a venue this projection
            // has not seen, as the booking board does).
            sqlx::query(
                "INSERT INTO rm_stats_bookings (booking_id, venue_id, local_date, party_size, \
                   status) \
                 VALUES ($1, $3, ($2 AT TIME ZONE coalesce((SELECT timezone FROM rm_stats_venues \
                                                             WHERE venue_id = $3), 'UTC'))::date, \
                         $4, 'pending')",
            )
            .bind(e.booking_id.0)
            .bind(e.starts_at)
            .bind(e.venue_id.0)
            .bind(i32::from(e.party_size))
            .execute(&mut **tx)
            .await?;
            shift(tx, e.booking_id.0, 1).await?;
        }
        E::BookingRescheduled(e) => {
            shift(tx, e.booking_id.0, -1).await?;
            sqlx::query(
                "UPDATE rm_stats_bookings b \
                    SET local_date = ($2 AT TIME ZONE coalesce((SELECT timezone FROM rm_stats_venues v \
                                                                 WHERE v.venue_id = b.venue_id), \
                                                                'UTC'))::date \
                  WHERE booking_id = $1",
            )
            .bind(e.booking_id.0)
            .bind(e.starts_at)
            .execute(&mut **tx)
            .await?;
            shift(tx, e.booking_id.0, 1).await?;
        }
        E::BookingCancelled(e) => set_status(tx, e.booking_id.0, "cancelled").await?,
        E::BookingNoShow(e) => set_status(tx, e.booking_id.0, "no_show").await?,
        E::BookingConfirmed(e) => set_status(tx, e.booking_id.0, "confirmed").await?,
        E::GuestCheckedIn(e) => set_status(tx, e.booking_id.0, "checked_in").await?,
    }
    Ok(())
}

async fn apply_payment(
    tx: &mut Transaction<'_, Postgres>,
    event: PaymentEvent,
) -> Result<(), ProjectionError> {
    use PaymentEvent as E;
    let (payment_id, captured, refunded) = match event {
        E::PaymentAuthorized(e) => {
            sqlx::query("INSERT INTO rm_stats_payments (payment_id, booking_id) VALUES ($1, $2)")
                .bind(e.payment_id.0)
                .bind(e.booking_id.0)
                .execute(&mut **tx)
                .await?;
            return Ok(());
        }
        E::PaymentCaptured(e) => (e.payment_id.0, e.amount_minor, 0),
        E::PaymentRefunded(e) => (e.payment_id.0, 0, e.amount_minor),
        E::PaymentFailed(_) => return Ok(()),
    };
    let booking: Option<Uuid> =
        sqlx::query_scalar("SELECT booking_id FROM rm_stats_payments WHERE payment_id = $1")
            .bind(payment_id)
            .fetch_optional(&mut **tx)
            .await?;
    let Some(booking) = booking else {
        return Ok(());
    };
    shift(tx, booking, -1).await?;
    sqlx::query(
        "UPDATE rm_stats_bookings SET captured_minor = captured_minor + $2, \
                refunded_minor = refunded_minor + $3 WHERE booking_id = $1",
    )
    .bind(booking)
    .bind(captured)
    .bind(refunded)
    .execute(&mut **tx)
    .await?;
    shift(tx, booking, 1).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Queries the API serves from this read model.

/// One day's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DayStats {
    #[serde(rename = "date")]
    pub local_date: NaiveDate,
    pub bookings: i64,
    pub covers: i64,
    pub no_shows: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
}

/// Whether this projection has seen the venue registered.
pub async fn venue_known(pool: &PgPool, venue_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM rm_stats_venues WHERE venue_id = $1)")
        .bind(venue_id)
        .fetch_one(pool)
        .await
}

/// Every day from `from` to `to` (inclusive, in order), zeros for a day without bookings: the
/// answer has one entry per day of the range, so a gap never has to be told from "no data".
pub async fn days(
    pool: &PgPool,
    venue_id: Uuid,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<DayStats>, sqlx::Error> {
    sqlx::query_as(
        "SELECT g::date AS local_date, \
                coalesce(d.bookings, 0)::bigint AS bookings, \
                coalesce(d.covers, 0)::bigint AS covers, \
                coalesce(d.no_shows, 0)::bigint AS no_shows, \
                coalesce(d.captured_minor, 0) AS captured_minor, \
                coalesce(d.refunded_minor, 0) AS refunded_minor \
           FROM generate_series($2::date::timestamp, $3::date::timestamp, interval '1 day') AS g \
           LEFT JOIN rm_daily_stats d ON d.venue_id = $1 AND d.local_date = g::date \
          ORDER BY g",
    )
    .bind(venue_id)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
}

/// Every stored day row of every venue, for checks that compare the read model with the log.
pub async fn all_days(pool: &PgPool) -> Result<Vec<(Uuid, DayStats)>, sqlx::Error> {
    let rows: Vec<VenueDay> = sqlx::query_as(
        "SELECT venue_id, local_date, bookings::bigint AS bookings, covers::bigint AS covers, \
                no_shows::bigint AS no_shows, captured_minor, refunded_minor \
           FROM rm_daily_stats ORDER BY venue_id, local_date",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.venue_id, r.day)).collect())
}

#[derive(sqlx::FromRow)]
struct VenueDay {
    venue_id: Uuid,
    #[sqlx(flatten)]
    day: DayStats,
}
