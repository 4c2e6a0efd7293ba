//! The booking board: venues with their resources, bookings with their payments.
//!
//! Serves the board (a venue's bookings of a local day), a booking's detail, a customer's
//! bookings and the venue list. Personal data stays sealed: `customer` is the event's envelope.
//!
//! A row's `position` is the log position of the last event that changed it (the live board
//! reads a venue's bookings by it); `version` is that of the last event of the row's own stream
//! (a payment's money changes a booking's `position` and sums, not its `version`).

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
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::BTreeSet;
use uuid::Uuid;

pub const NAME: &str = "booking_board";

/// Every table this projection writes: what a rebuild shadows and swaps (see `ledger-replay`).
pub const TABLES: &[&str] = &["rm_venues", "rm_resources", "rm_bookings", "rm_payments"];

// ---------------------------------------------------------------------------------------------
// The fold, set-based: load the rows a batch refers to, fold the batch in memory, write back.

struct Venue {
    name: String,
    timezone: String,
    version: i64,
    position: i64,
}

struct Resource {
    venue_id: Uuid,
    name: String,
    capacity: i32,
    position: i64,
}

struct Booking {
    venue_id: Uuid,
    resource_id: Uuid,
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    day: Day,
    party_size: i32,
    status: String,
    subject_id: Uuid,
    /// The sealed envelope as JSON text, for a booking the batch creates (a stored one keeps its
    /// own).
    customer: Option<String>,
    paid_minor: i64,
    refunded_minor: i64,
    version: i64,
    position: i64,
}

struct Payment {
    booking_id: Uuid,
    venue_id: Uuid,
    kind: String,
    currency: String,
    authorised_minor: i64,
    captured_minor: i64,
    refunded_minor: i64,
    failed: bool,
    version: i64,
    position: i64,
}

/// What a batch refers to: keys it creates, and keys it needs the stored rows of.
#[derive(Default)]
struct Refs {
    venues: BTreeSet<Uuid>,
    new_venues: BTreeSet<Uuid>,
    bookings: BTreeSet<Uuid>,
    new_bookings: BTreeSet<Uuid>,
    payments: BTreeSet<Uuid>,
    new_payments: BTreeSet<Uuid>,
}

fn refs(events: &[Decoded]) -> Refs {
    let mut r = Refs::default();
    for d in events {
        match &d.change {
            Change::Venue(VenueEvent::VenueRegistered(e)) => {
                r.new_venues.insert(e.venue_id.0);
            }
            Change::Venue(VenueEvent::ResourceAdded(e)) => {
                r.venues.insert(e.venue_id.0);
            }
            Change::Booking(BookingEvent::BookingRequested(e)) => {
                r.new_bookings.insert(e.booking_id.0);
                r.venues.insert(e.venue_id.0);
            }
            Change::Booking(e) => {
                r.bookings.insert(booking_of(e));
            }
            Change::Payment(PaymentEvent::PaymentAuthorized(e)) => {
                r.new_payments.insert(e.payment_id.0);
                // Its money moves the booking's sums.
                r.bookings.insert(e.booking_id.0);
            }
            Change::Payment(e) => {
                r.payments.insert(payment_of(e));
            }
        }
    }
    r
}

/// `wanted` but for `created`: the keys whose stored rows to load.
fn to_load(wanted: &BTreeSet<Uuid>, created: &BTreeSet<Uuid>) -> Vec<Uuid> {
    wanted.difference(created).copied().collect()
}

/// Applies a batch of consecutive events (see [`crate::apply`]).
pub(crate) async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    events: &[Decoded],
) -> Result<(), ProjectionError> {
    let mut r = refs(events);

    // Load what the batch refers to: payments, then their bookings, then the bookings' venues.
    let mut payments = Rows::new("rm_payments");
    let ids = to_load(&r.payments, &r.new_payments);
    if !ids.is_empty() {
        type Row = (
            Uuid,
            Uuid,
            Uuid,
            String,
            String,
            i64,
            i64,
            i64,
            bool,
            i64,
            i64,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT payment_id, booking_id, venue_id, kind, currency, authorised_minor, \
                    captured_minor, refunded_minor, failed, version, position \
               FROM rm_payments WHERE payment_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for (id, booking_id, venue_id, kind, currency, auth, cap, refd, failed, version, pos) in
            rows
        {
            r.bookings.insert(booking_id);
            payments.stored(
                id,
                Payment {
                    booking_id,
                    venue_id,
                    kind,
                    currency,
                    authorised_minor: auth,
                    captured_minor: cap,
                    refunded_minor: refd,
                    failed,
                    version,
                    position: pos,
                },
            );
        }
    }
    let mut bookings = Rows::new("rm_bookings");
    let ids = to_load(&r.bookings, &r.new_bookings);
    if !ids.is_empty() {
        #[derive(sqlx::FromRow)]
        struct Row {
            booking_id: Uuid,
            venue_id: Uuid,
            resource_id: Uuid,
            starts_at: DateTime<Utc>,
            ends_at: DateTime<Utc>,
            local_date: NaiveDate,
            party_size: i32,
            status: String,
            subject_id: Uuid,
            paid_minor: i64,
            refunded_minor: i64,
            version: i64,
            position: i64,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT booking_id, venue_id, resource_id, starts_at, ends_at, local_date, \
                    party_size, status, subject_id, paid_minor, refunded_minor, version, position \
               FROM rm_bookings WHERE booking_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for b in rows {
            // A reschedule takes the zone of the booking's venue.
            r.venues.insert(b.venue_id);
            bookings.stored(
                b.booking_id,
                Booking {
                    venue_id: b.venue_id,
                    resource_id: b.resource_id,
                    starts_at: b.starts_at,
                    ends_at: b.ends_at,
                    day: Day::Stored(b.local_date),
                    party_size: b.party_size,
                    status: b.status,
                    subject_id: b.subject_id,
                    customer: None,
                    paid_minor: b.paid_minor,
                    refunded_minor: b.refunded_minor,
                    version: b.version,
                    position: b.position,
                },
            );
        }
    }
    let mut venues = Rows::new("rm_venues");
    let ids = to_load(&r.venues, &r.new_venues);
    if !ids.is_empty() {
        let rows: Vec<(Uuid, String, String, i64, i64)> = sqlx::query_as(
            "SELECT venue_id, name, timezone, version, position FROM rm_venues \
              WHERE venue_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for (id, name, timezone, version, position) in rows {
            venues.stored(
                id,
                Venue {
                    name,
                    timezone,
                    version,
                    position,
                },
            );
        }
    }
    let mut resources = Rows::new("rm_resources");
    for d in events {
        fold(d, &mut venues, &mut resources, &mut bookings, &mut payments)?;
    }

    write_venues(tx, &venues).await?;
    write_resources(tx, &resources).await?;
    write_bookings(tx, &bookings).await?;
    write_payments(tx, &payments).await?;
    Ok(())
}

/// One event, in memory: what [`apply_one`]'s statements do to the rows.
fn fold(
    d: &Decoded,
    venues: &mut Rows<Venue>,
    resources: &mut Rows<Resource>,
    bookings: &mut Rows<Booking>,
    payments: &mut Rows<Payment>,
) -> Result<(), ProjectionError> {
    let (position, version) = (d.position, d.version);
    let zone = |venues: &Rows<Venue>, venue: &Uuid| venues.get(venue).map(|v| v.timezone.clone());
    match &d.change {
        Change::Venue(VenueEvent::VenueRegistered(e)) => venues.create(
            e.venue_id.0,
            Venue {
                name: e.name.clone(),
                timezone: e.timezone.clone(),
                version,
                position,
            },
            position,
        )?,
        Change::Venue(VenueEvent::ResourceAdded(e)) => {
            resources.create(
                e.resource_id.0,
                Resource {
                    venue_id: e.venue_id.0,
                    name: e.name.clone(),
                    capacity: i32::try_from(e.capacity).unwrap_or(i32::MAX),
                    position,
                },
                position,
            )?;
            if let Some(v) = venues.get_mut(&e.venue_id.0) {
                v.version = version;
                v.position = position;
            }
        }
        Change::Booking(BookingEvent::BookingRequested(e)) => {
            let day = Day::At(e.starts_at, zone(venues, &e.venue_id.0));
            bookings.create(
                e.booking_id.0,
                Booking {
                    venue_id: e.venue_id.0,
                    resource_id: e.resource_id.0,
                    starts_at: e.starts_at,
                    ends_at: e.ends_at,
                    day,
                    party_size: i32::from(e.party_size),
                    status: "pending".into(),
                    subject_id: e.subject_id.0,
                    customer: Some(
                        serde_json::to_string(&e.customer).unwrap_or_else(|_| "null".into()),
                    ),
                    paid_minor: 0,
                    refunded_minor: 0,
                    version,
                    position,
                },
                position,
            )?;
        }
        Change::Booking(BookingEvent::BookingRescheduled(e)) => {
            let venue = bookings.get(&e.booking_id.0).map(|b| b.venue_id);
            if let Some(venue) = venue {
                let day = Day::At(e.starts_at, zone(venues, &venue));
                if let Some(b) = bookings.get_mut(&e.booking_id.0) {
                    b.resource_id = e.resource_id.0;
                    b.starts_at = e.starts_at;
                    b.ends_at = e.ends_at;
                    b.day = day;
                    b.version = version;
                    b.position = position;
                }
            }
        }
        Change::Booking(e) => {
            let status = match e {
                BookingEvent::BookingConfirmed(_) => "confirmed",
                BookingEvent::BookingCancelled(_) => "cancelled",
                BookingEvent::GuestCheckedIn(_) => "checked_in",
                BookingEvent::BookingNoShow(_) => "no_show",
                BookingEvent::BookingRequested(_) | BookingEvent::BookingRescheduled(_) => {
                    return Ok(())
                }
            };
            if let Some(b) = bookings.get_mut(&booking_of(e)) {
                b.status = status.into();
                b.version = version;
                b.position = position;
            }
        }
        Change::Payment(PaymentEvent::PaymentAuthorized(e)) => payments.create(
            e.payment_id.0,
            Payment {
                booking_id: e.booking_id.0,
                venue_id: e.venue_id.0,
                kind: e.kind.as_str().into(),
                currency: e.currency.as_str().into(),
                authorised_minor: e.amount_minor,
                captured_minor: 0,
                refunded_minor: 0,
                failed: false,
                version,
                position,
            },
            position,
        )?,
        Change::Payment(e) => {
            let (captured, refunded, failed) = match e {
                PaymentEvent::PaymentCaptured(e) => (e.amount_minor, 0, false),
                PaymentEvent::PaymentRefunded(e) => (0, e.amount_minor, false),
                PaymentEvent::PaymentFailed(_) => (0, 0, true),
                PaymentEvent::PaymentAuthorized(_) => return Ok(()),
            };
            let Some(p) = payments.get_mut(&payment_of(e)) else {
                return Ok(());
            };
            p.captured_minor = add(p.captured_minor, captured, position, "rm_payments")?;
            p.refunded_minor = add(p.refunded_minor, refunded, position, "rm_payments")?;
            p.failed |= failed;
            p.version = version;
            p.position = position;
            let booking = p.booking_id;
            if let Some(b) = bookings.get_mut(&booking) {
                b.paid_minor = add(b.paid_minor, captured, position, "rm_bookings")?;
                b.refunded_minor = add(b.refunded_minor, refunded, position, "rm_bookings")?;
                b.position = position;
            }
        }
    }
    Ok(())
}

async fn write_venues(
    tx: &mut Transaction<'_, Postgres>,
    venues: &Rows<Venue>,
) -> Result<(), sqlx::Error> {
    let (mut ids, mut names, mut zones, mut versions, mut positions) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (id, v) in venues.created() {
        ids.push(id);
        names.push(v.name.as_str());
        zones.push(v.timezone.as_str());
        versions.push(v.version);
        positions.push(v.position);
    }
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO rm_venues (venue_id, name, timezone, version, position) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::int8[])",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&zones)
        .bind(&versions)
        .bind(&positions)
        .execute(&mut **tx)
        .await?;
    }
    let (mut ids, mut versions, mut positions) = (vec![], vec![], vec![]);
    for (id, v) in venues.updated() {
        ids.push(id);
        versions.push(v.version);
        positions.push(v.position);
    }
    if !ids.is_empty() {
        sqlx::query(
            "UPDATE rm_venues v SET version = u.version, position = u.position \
               FROM unnest($1::uuid[], $2::int8[], $3::int8[]) AS u(venue_id, version, position) \
              WHERE v.venue_id = u.venue_id",
        )
        .bind(&ids)
        .bind(&versions)
        .bind(&positions)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn write_resources(
    tx: &mut Transaction<'_, Postgres>,
    resources: &Rows<Resource>,
) -> Result<(), sqlx::Error> {
    let (mut ids, mut venues, mut names, mut capacities, mut positions) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (id, r) in resources.created() {
        ids.push(id);
        venues.push(r.venue_id);
        names.push(r.name.as_str());
        capacities.push(r.capacity);
        positions.push(r.position);
    }
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO rm_resources (resource_id, venue_id, name, capacity, position) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::int8[])",
        )
        .bind(&ids)
        .bind(&venues)
        .bind(&names)
        .bind(&capacities)
        .bind(&positions)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn write_bookings(
    tx: &mut Transaction<'_, Postgres>,
    bookings: &Rows<Booking>,
) -> Result<(), sqlx::Error> {
    let created: Vec<(Uuid, &Booking)> = bookings.created().collect();
    if created.len() >= COPY_FROM {
        let days = local_dates(tx, created.iter().map(|(_, b)| &b.day)).await?;
        let mut rows = BinaryRows::new(14);
        for ((id, b), day) in created.iter().zip(days) {
            rows.row()
                .uuid(*id)
                .uuid(b.venue_id)
                .uuid(b.resource_id)
                .timestamptz(b.starts_at)
                .timestamptz(b.ends_at)
                .date(day)
                .int4(b.party_size)
                .text(&b.status)
                .uuid(b.subject_id)
                .jsonb(b.customer.as_deref().unwrap_or("null"))
                .int8(b.paid_minor)
                .int8(b.refunded_minor)
                .int8(b.version)
                .int8(b.position);
        }
        rows.copy(
            tx,
            "rm_bookings (booking_id, venue_id, resource_id, starts_at, ends_at, local_date, \
               party_size, status, subject_id, customer, paid_minor, refunded_minor, version, \
               position)",
        )
        .await?;
    } else if !created.is_empty() {
        let mut c = BookingColumns::default();
        for (id, b) in &created {
            c.push(*id, b);
        }
        sqlx::query(&format!(
            "INSERT INTO rm_bookings (booking_id, venue_id, resource_id, starts_at, ends_at, \
               local_date, party_size, status, subject_id, customer, paid_minor, refunded_minor, \
               version, position) \
             SELECT u.booking_id, u.venue_id, u.resource_id, u.starts_at, u.ends_at, {DAY_SQL}, \
                    u.party_size, u.status, u.subject_id, u.customer::jsonb, u.paid_minor, \
                    u.refunded_minor, u.version, u.position \
               FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[], \
                           $5::timestamptz[], $6::date[], $7::timestamptz[], $8::text[], \
                           $9::int4[], $10::text[], $11::uuid[], $12::text[], $13::int8[], \
                           $14::int8[], $15::int8[], $16::int8[]) \
                 AS u(booking_id, venue_id, resource_id, starts_at, ends_at, day_date, \
                      day_start, day_zone, party_size, status, subject_id, customer, \
                      paid_minor, refunded_minor, version, position)"
        ))
        .bind(&c.ids)
        .bind(&c.venues)
        .bind(&c.resources)
        .bind(&c.starts)
        .bind(&c.ends)
        .bind(&c.day_dates)
        .bind(&c.day_starts)
        .bind(&c.day_zones)
        .bind(&c.parties)
        .bind(&c.statuses)
        .bind(&c.subjects)
        .bind(&c.customers)
        .bind(&c.paid)
        .bind(&c.refunded)
        .bind(&c.versions)
        .bind(&c.positions)
        .execute(&mut **tx)
        .await?;
    }

    // Stored rows: one UPDATE from arrays. Venue, party, subject and customer never change once
    // requested.
    let mut c = BookingColumns::default();
    for (id, b) in bookings.updated() {
        c.push(id, b);
    }
    if c.ids.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "UPDATE rm_bookings b SET resource_id = u.resource_id, starts_at = u.starts_at, \
                ends_at = u.ends_at, local_date = {DAY_SQL}, status = u.status, \
                paid_minor = u.paid_minor, refunded_minor = u.refunded_minor, \
                version = u.version, position = u.position \
           FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[], \
                       $5::date[], $6::timestamptz[], $7::text[], $8::text[], $9::int8[], \
                       $10::int8[], $11::int8[], $12::int8[]) \
             AS u(booking_id, resource_id, starts_at, ends_at, day_date, day_start, day_zone, \
                  status, paid_minor, refunded_minor, version, position) \
          WHERE b.booking_id = u.booking_id"
    ))
    .bind(&c.ids)
    .bind(&c.resources)
    .bind(&c.starts)
    .bind(&c.ends)
    .bind(&c.day_dates)
    .bind(&c.day_starts)
    .bind(&c.day_zones)
    .bind(&c.statuses)
    .bind(&c.paid)
    .bind(&c.refunded)
    .bind(&c.versions)
    .bind(&c.positions)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Bookings as arrays, for `unnest`.
#[derive(Default)]
struct BookingColumns<'a> {
    ids: Vec<Uuid>,
    venues: Vec<Uuid>,
    resources: Vec<Uuid>,
    starts: Vec<DateTime<Utc>>,
    ends: Vec<DateTime<Utc>>,
    day_dates: Vec<Option<NaiveDate>>,
    day_starts: Vec<Option<DateTime<Utc>>>,
    day_zones: Vec<Option<String>>,
    parties: Vec<i32>,
    statuses: Vec<&'a str>,
    subjects: Vec<Uuid>,
    customers: Vec<&'a str>,
    paid: Vec<i64>,
    refunded: Vec<i64>,
    versions: Vec<i64>,
    positions: Vec<i64>,
}

impl<'a> BookingColumns<'a> {
    fn push(&mut self, id: Uuid, b: &'a Booking) {
        let (date, start, zone) = b.day.columns();
        self.ids.push(id);
        self.venues.push(b.venue_id);
        self.resources.push(b.resource_id);
        self.starts.push(b.starts_at);
        self.ends.push(b.ends_at);
        self.day_dates.push(date);
        self.day_starts.push(start);
        self.day_zones.push(zone);
        self.parties.push(b.party_size);
        self.statuses.push(&b.status);
        self.subjects.push(b.subject_id);
        self.customers.push(b.customer.as_deref().unwrap_or("null"));
        self.paid.push(b.paid_minor);
        self.refunded.push(b.refunded_minor);
        self.versions.push(b.version);
        self.positions.push(b.position);
    }
}

async fn write_payments(
    tx: &mut Transaction<'_, Postgres>,
    payments: &Rows<Payment>,
) -> Result<(), sqlx::Error> {
    let (mut ids, mut bookings, mut venues, mut kinds, mut currencies, mut authorised) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut captured, mut refunded, mut failed, mut versions, mut positions) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (id, p) in payments.created() {
        ids.push(id);
        bookings.push(p.booking_id);
        venues.push(p.venue_id);
        kinds.push(p.kind.as_str());
        currencies.push(p.currency.as_str());
        authorised.push(p.authorised_minor);
        captured.push(p.captured_minor);
        refunded.push(p.refunded_minor);
        failed.push(p.failed);
        versions.push(p.version);
        positions.push(p.position);
    }
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO rm_payments (payment_id, booking_id, venue_id, kind, currency, \
               authorised_minor, captured_minor, refunded_minor, failed, version, position) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], \
                                  $6::int8[], $7::int8[], $8::int8[], $9::bool[], $10::int8[], \
                                  $11::int8[])",
        )
        .bind(&ids)
        .bind(&bookings)
        .bind(&venues)
        .bind(&kinds)
        .bind(&currencies)
        .bind(&authorised)
        .bind(&captured)
        .bind(&refunded)
        .bind(&failed)
        .bind(&versions)
        .bind(&positions)
        .execute(&mut **tx)
        .await?;
    }
    let (mut ids, mut captured, mut refunded, mut failed, mut versions, mut positions) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (id, p) in payments.updated() {
        ids.push(id);
        captured.push(p.captured_minor);
        refunded.push(p.refunded_minor);
        failed.push(p.failed);
        versions.push(p.version);
        positions.push(p.position);
    }
    if !ids.is_empty() {
        sqlx::query(
            "UPDATE rm_payments p SET captured_minor = u.captured_minor, \
                    refunded_minor = u.refunded_minor, failed = u.failed, version = u.version, \
                    position = u.position \
               FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::bool[], $5::int8[], \
                           $6::int8[]) \
                 AS u(payment_id, captured_minor, refunded_minor, failed, version, position) \
              WHERE p.payment_id = u.payment_id",
        )
        .bind(&ids)
        .bind(&captured)
        .bind(&refunded)
        .bind(&failed)
        .bind(&versions)
        .bind(&positions)
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
