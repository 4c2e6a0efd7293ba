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
//!
//! A batch applies the same rule set-wise: each booking it changes is taken off the day it was
//! on when the batch began and added to the day it is on at the end, and the per-day sums of
//! those signed contributions are added to `rm_daily_stats` in one statement.

use crate::copy::BinaryRows;
use crate::{
    add, booking_of, decode, local_dates, payment_of, Change, Day, Decoded, ProjectionError, Rows,
    COPY_FROM, DAY_SQL,
};
use chrono::{DateTime, NaiveDate, Utc};
use ledger_events::booking::BookingEvent;
use ledger_events::envelope::RecordedEvent;
use ledger_events::payment::PaymentEvent;
use ledger_events::venue::VenueEvent;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use uuid::Uuid;

pub const NAME: &str = "daily_stats";

/// Every table this projection writes: what a rebuild shadows and swaps (see `ledger-replay`).
pub const TABLES: &[&str] = &[
    "rm_stats_venues",
    "rm_stats_bookings",
    "rm_stats_payments",
    "rm_daily_stats",
];

// ---------------------------------------------------------------------------------------------
// The fold, set-based: load the rows a batch refers to, fold the batch in memory, write back.

/// A booking's state here, and so its contribution to its day.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Booking {
    venue_id: Uuid,
    day: Day,
    party_size: i32,
    status: String,
    captured_minor: i64,
    refunded_minor: i64,
}

/// A booking as the table held it when the batch began (what to take off its day), and now.
struct Tracked {
    was: Option<Booking>,
    now: Booking,
}

/// Applies a batch of consecutive events (see [`crate::apply`]).
pub(crate) async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    events: &[Decoded],
) -> Result<(), ProjectionError> {
    // What the batch refers to, and what it creates.
    let (mut venue_refs, mut new_venues) = (BTreeSet::new(), BTreeSet::new());
    let (mut booking_refs, mut new_bookings) = (BTreeSet::new(), BTreeSet::new());
    let (mut payment_refs, mut new_payments) = (BTreeSet::new(), BTreeSet::new());
    for d in events {
        match &d.change {
            Change::Venue(VenueEvent::VenueRegistered(e)) => {
                new_venues.insert(e.venue_id.0);
            }
            Change::Venue(VenueEvent::ResourceAdded(_)) => {}
            Change::Booking(BookingEvent::BookingRequested(e)) => {
                new_bookings.insert(e.booking_id.0);
                venue_refs.insert(e.venue_id.0);
            }
            Change::Booking(e) => {
                booking_refs.insert(booking_of(e));
            }
            Change::Payment(PaymentEvent::PaymentAuthorized(e)) => {
                new_payments.insert(e.payment_id.0);
                booking_refs.insert(e.booking_id.0);
            }
            Change::Payment(
                e @ (PaymentEvent::PaymentCaptured(_) | PaymentEvent::PaymentRefunded(_)),
            ) => {
                payment_refs.insert(payment_of(e));
            }
            Change::Payment(PaymentEvent::PaymentFailed(_)) => {}
        }
    }

    // Load them: payments, then their bookings, then the bookings' venues.
    let mut payments: Rows<Uuid> = Rows::new("rm_stats_payments");
    let ids: Vec<Uuid> = payment_refs.difference(&new_payments).copied().collect();
    if !ids.is_empty() {
        let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT payment_id, booking_id FROM rm_stats_payments WHERE payment_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for (payment, booking) in rows {
            booking_refs.insert(booking);
            payments.stored(payment, booking);
        }
    }
    let mut bookings: Rows<Tracked> = Rows::new("rm_stats_bookings");
    let ids: Vec<Uuid> = booking_refs.difference(&new_bookings).copied().collect();
    if !ids.is_empty() {
        type Row = (Uuid, Uuid, NaiveDate, i32, String, i64, i64);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT booking_id, venue_id, local_date, party_size, status, captured_minor, \
                    refunded_minor FROM rm_stats_bookings WHERE booking_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for (id, venue_id, day, party_size, status, captured, refunded) in rows {
            venue_refs.insert(venue_id);
            let b = Booking {
                venue_id,
                day: Day::Stored(day),
                party_size,
                status,
                captured_minor: captured,
                refunded_minor: refunded,
            };
            bookings.stored(
                id,
                Tracked {
                    was: Some(b.clone()),
                    now: b,
                },
            );
        }
    }
    let mut venues: Rows<String> = Rows::new("rm_stats_venues");
    let ids: Vec<Uuid> = venue_refs.difference(&new_venues).copied().collect();
    if !ids.is_empty() {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT venue_id, timezone FROM rm_stats_venues WHERE venue_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for (id, zone) in rows {
            venues.stored(id, zone);
        }
    }

    for d in events {
        fold(d, &mut venues, &mut bookings, &mut payments)?;
    }

    let last = events.last().map(|d| d.position).unwrap_or_default();
    write(tx, &venues, &bookings, &payments, last).await
}

/// One event, in memory: what [`apply_one`]'s statements do to the rows.
fn fold(
    d: &Decoded,
    venues: &mut Rows<String>,
    bookings: &mut Rows<Tracked>,
    payments: &mut Rows<Uuid>,
) -> Result<(), ProjectionError> {
    let position = d.position;
    match &d.change {
        Change::Venue(VenueEvent::VenueRegistered(e)) => {
            venues.create(e.venue_id.0, e.timezone.clone(), position)?
        }
        Change::Venue(VenueEvent::ResourceAdded(_)) => {}
        Change::Booking(BookingEvent::BookingRequested(e)) => {
            let zone = venues.get(&e.venue_id.0).cloned();
            bookings.create(
                e.booking_id.0,
                Tracked {
                    was: None,
                    now: Booking {
                        venue_id: e.venue_id.0,
                        day: Day::At(e.starts_at, zone),
                        party_size: i32::from(e.party_size),
                        status: "pending".into(),
                        captured_minor: 0,
                        refunded_minor: 0,
                    },
                },
                position,
            )?;
        }
        Change::Booking(BookingEvent::BookingRescheduled(e)) => {
            let venue = bookings.get(&e.booking_id.0).map(|b| b.now.venue_id);
            if let Some(venue) = venue {
                let zone = venues.get(&venue).cloned();
                if let Some(b) = bookings.get_mut(&e.booking_id.0) {
                    b.now.day = Day::At(e.starts_at, zone);
                }
            }
        }
        Change::Booking(e) => {
            let status = match e {
                BookingEvent::BookingCancelled(_) => "cancelled",
                BookingEvent::BookingNoShow(_) => "no_show",
                BookingEvent::BookingConfirmed(_) => "confirmed",
                BookingEvent::GuestCheckedIn(_) => "checked_in",
                BookingEvent::BookingRequested(_) | BookingEvent::BookingRescheduled(_) => {
                    return Ok(())
                }
            };
            if let Some(b) = bookings.get_mut(&booking_of(e)) {
                b.now.status = status.into();
            }
        }
        Change::Payment(PaymentEvent::PaymentAuthorized(e)) => {
            payments.create(e.payment_id.0, e.booking_id.0, position)?
        }
        Change::Payment(e) => {
            let (captured, refunded) = match e {
                PaymentEvent::PaymentCaptured(e) => (e.amount_minor, 0),
                PaymentEvent::PaymentRefunded(e) => (0, e.amount_minor),
                PaymentEvent::PaymentFailed(_) | PaymentEvent::PaymentAuthorized(_) => {
                    return Ok(())
                }
            };
            let Some(booking) = payments.get(&payment_of(e)).copied() else {
                return Ok(());
            };
            if let Some(b) = bookings.get_mut(&booking) {
                let t = "rm_stats_bookings";
                b.now.captured_minor = add(b.now.captured_minor, captured, position, t)?;
                b.now.refunded_minor = add(b.now.refunded_minor, refunded, position, t)?;
            }
        }
    }
    Ok(())
}

/// The days of `ids`, in their order, from what a statement returned for each.
fn in_order(ids: &[Uuid], days: &HashMap<Uuid, NaiveDate>) -> Result<Vec<NaiveDate>, sqlx::Error> {
    ids.iter()
        .map(|id| days.get(id).copied().ok_or(sqlx::Error::RowNotFound))
        .collect()
}

/// Bookings as arrays, for `unnest`; their day as [`DAY_SQL`] reads it.
#[derive(Default)]
struct Columns<'a> {
    ids: Vec<Uuid>,
    venues: Vec<Uuid>,
    day_dates: Vec<Option<NaiveDate>>,
    day_starts: Vec<Option<DateTime<Utc>>>,
    day_zones: Vec<Option<String>>,
    parties: Vec<i32>,
    statuses: Vec<&'a str>,
    captured: Vec<i64>,
    refunded: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn of(bookings: impl Iterator<Item = (Uuid, &'a Booking)>) -> Self {
        let mut c = Columns::default();
        for (id, b) in bookings {
            let (date, start, zone) = b.day.columns();
            c.ids.push(id);
            c.venues.push(b.venue_id);
            c.day_dates.push(date);
            c.day_starts.push(start);
            c.day_zones.push(zone);
            c.parties.push(b.party_size);
            c.statuses.push(&b.status);
            c.captured.push(b.captured_minor);
            c.refunded.push(b.refunded_minor);
        }
        c
    }
}

impl Booking {
    /// What the booking adds to its day's row: bookings, covers, no-shows, captured, refunded.
    fn contribution(&self) -> [i64; 5] {
        [
            1,
            if self.status == "cancelled" {
                0
            } else {
                i64::from(self.party_size)
            },
            i64::from(self.status == "no_show"),
            self.captured_minor,
            self.refunded_minor,
        ]
    }
}

async fn write(
    tx: &mut Transaction<'_, Postgres>,
    venues: &Rows<String>,
    bookings: &Rows<Tracked>,
    payments: &Rows<Uuid>,
    // The batch's last position, to name in a refusal.
    position: i64,
) -> Result<(), ProjectionError> {
    let (ids, zones): (Vec<Uuid>, Vec<&str>) =
        venues.created().map(|(id, z)| (id, z.as_str())).unzip();
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO rm_stats_venues (venue_id, timezone) \
             SELECT * FROM unnest($1::uuid[], $2::text[])",
        )
        .bind(&ids)
        .bind(&zones)
        .execute(&mut **tx)
        .await?;
    }
    let (ids, of): (Vec<Uuid>, Vec<Uuid>) = payments.created().map(|(id, b)| (id, *b)).unzip();
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO rm_stats_payments (payment_id, booking_id) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[])",
        )
        .bind(&ids)
        .bind(&of)
        .execute(&mut **tx)
        .await?;
    }

    let created: Vec<(Uuid, &Booking)> = bookings.created().map(|(id, t)| (id, &t.now)).collect();
    // Stored bookings the batch changed, as they were and as they are.
    let updated: Vec<(Uuid, &Booking, &Booking)> = bookings
        .updated()
        .filter_map(|(id, t)| match &t.was {
            Some(was) if *was != t.now => Some((id, was, &t.now)),
            _ => None,
        })
        .collect();
    if created.is_empty() && updated.is_empty() {
        return Ok(());
    }

    // Write the bookings, learning the days Postgres computed for them.
    let created_days: Vec<NaiveDate> = if created.len() >= COPY_FROM {
        let days = local_dates(tx, created.iter().map(|(_, b)| &b.day)).await?;
        let mut rows = BinaryRows::new(7);
        for ((id, b), day) in created.iter().zip(&days) {
            rows.row()
                .uuid(*id)
                .uuid(b.venue_id)
                .date(*day)
                .int4(b.party_size)
                .text(&b.status)
                .int8(b.captured_minor)
                .int8(b.refunded_minor);
        }
        rows.copy(
            tx,
            "rm_stats_bookings (booking_id, venue_id, local_date, party_size, status, \
               captured_minor, refunded_minor)",
        )
        .await?;
        days
    } else if !created.is_empty() {
        let c = Columns::of(created.iter().map(|(id, b)| (*id, *b)));
        let days: HashMap<Uuid, NaiveDate> = sqlx::query_as(&format!(
            "INSERT INTO rm_stats_bookings (booking_id, venue_id, local_date, party_size, status, \
               captured_minor, refunded_minor) \
             SELECT u.booking_id, u.venue_id, {DAY_SQL}, u.party_size, u.status, \
                    u.captured_minor, u.refunded_minor \
               FROM unnest($1::uuid[], $2::uuid[], $3::date[], $4::timestamptz[], $5::text[], \
                           $6::int4[], $7::text[], $8::int8[], $9::int8[]) \
                 AS u(booking_id, venue_id, day_date, day_start, day_zone, party_size, status, \
                      captured_minor, refunded_minor) \
             RETURNING booking_id, local_date"
        ))
        .bind(&c.ids)
        .bind(&c.venues)
        .bind(&c.day_dates)
        .bind(&c.day_starts)
        .bind(&c.day_zones)
        .bind(&c.parties)
        .bind(&c.statuses)
        .bind(&c.captured)
        .bind(&c.refunded)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
        in_order(&c.ids, &days)?
    } else {
        Vec::new()
    };
    let updated_days: Vec<NaiveDate> = if updated.is_empty() {
        Vec::new()
    } else {
        let c = Columns::of(updated.iter().map(|(id, _, b)| (*id, *b)));
        let days: HashMap<Uuid, NaiveDate> = sqlx::query_as(&format!(
            "UPDATE rm_stats_bookings b SET local_date = {DAY_SQL}, status = u.status, \
                    captured_minor = u.captured_minor, refunded_minor = u.refunded_minor \
               FROM unnest($1::uuid[], $2::date[], $3::timestamptz[], $4::text[], $5::text[], \
                           $6::int8[], $7::int8[]) \
                 AS u(booking_id, day_date, day_start, day_zone, status, captured_minor, \
                      refunded_minor) \
              WHERE b.booking_id = u.booking_id \
             RETURNING b.booking_id, b.local_date"
        ))
        .bind(&c.ids)
        .bind(&c.day_dates)
        .bind(&c.day_starts)
        .bind(&c.day_zones)
        .bind(&c.statuses)
        .bind(&c.captured)
        .bind(&c.refunded)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
        in_order(&c.ids, &days)?
    };

    // Each changed booking: off the day it was on, onto the day it is on, summed per day.
    let mut sums: BTreeMap<(Uuid, NaiveDate), [i64; 5]> = BTreeMap::new();
    let mut add_to = |venue: Uuid, day: NaiveDate, c: [i64; 5], sign: i64| {
        let sum = sums.entry((venue, day)).or_default();
        for (s, c) in sum.iter_mut().zip(c) {
            *s = c.checked_mul(sign).and_then(|c| s.checked_add(c)).ok_or(
                ProjectionError::Refused {
                    position,
                    table: "rm_daily_stats",
                    reason: "bigint out of range",
                },
            )?;
        }
        Ok::<(), ProjectionError>(())
    };
    for ((_, b), day) in created.iter().zip(&created_days) {
        add_to(b.venue_id, *day, b.contribution(), 1)?;
    }
    for ((_, was, now), day) in updated.iter().zip(&updated_days) {
        if let Day::Stored(was_day) = was.day {
            add_to(was.venue_id, was_day, was.contribution(), -1)?;
        }
        add_to(now.venue_id, *day, now.contribution(), 1)?;
    }

    // A day whose sums are all zero is left as it is (the per-event fold takes off and adds back
    // the same); the others are added to the days' rows.
    let mut columns: (Vec<Uuid>, Vec<NaiveDate>, [Vec<i64>; 5]) = Default::default();
    for ((venue, day), sum) in sums.into_iter().filter(|(_, s)| s.iter().any(|v| *v != 0)) {
        columns.0.push(venue);
        columns.1.push(day);
        for (column, v) in columns.2.iter_mut().zip(sum) {
            column.push(v);
        }
    }
    if columns.0.is_empty() {
        return Ok(());
    }
    let [bookings, covers, no_shows, captured, refunded] = &columns.2;
    let emptied: Vec<(Uuid, NaiveDate)> = sqlx::query_as(
        "INSERT INTO rm_daily_stats AS d (venue_id, local_date, bookings, covers, no_shows, \
           captured_minor, refunded_minor) \
         SELECT * FROM unnest($1::uuid[], $2::date[], $3::int8[], $4::int8[], $5::int8[], \
                              $6::int8[], $7::int8[]) \
         ON CONFLICT (venue_id, local_date) DO UPDATE SET \
           bookings = d.bookings + EXCLUDED.bookings, \
           covers = d.covers + EXCLUDED.covers, \
           no_shows = d.no_shows + EXCLUDED.no_shows, \
           captured_minor = d.captured_minor + EXCLUDED.captured_minor, \
           refunded_minor = d.refunded_minor + EXCLUDED.refunded_minor \
         RETURNING venue_id, local_date, bookings",
    )
    .bind(&columns.0)
    .bind(&columns.1)
    .bind(bookings)
    .bind(covers)
    .bind(no_shows)
    .bind(captured)
    .bind(refunded)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .filter(|(_, _, bookings): &(Uuid, NaiveDate, i32)| *bookings == 0)
    .map(|(v, d, _)| (v, d))
    .collect();
    // A day no booking contributes to any more has no row.
    if !emptied.is_empty() {
        let (venues, days): (Vec<Uuid>, Vec<NaiveDate>) = emptied.into_iter().unzip();
        sqlx::query(
            "DELETE FROM rm_daily_stats d USING unnest($1::uuid[], $2::date[]) AS e(venue_id, day) \
              WHERE d.venue_id = e.venue_id AND d.local_date = e.day AND d.bookings = 0",
        )
        .bind(&venues)
        .bind(&days)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The per-event fold: the specification the set-based one above is tested against.

pub(crate) async fn apply_one(
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
