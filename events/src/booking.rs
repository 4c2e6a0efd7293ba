//! The booking aggregate: one reservation of one resource for one half-open time slot.
//!
//! Lifecycle: `pending → confirmed → checked_in | no_show`, and `pending | confirmed → cancelled`.
//! Whether a slot is free is *not* decided here: it spans bookings, so the write side proves it
//! with an exclusion constraint in the same transaction as the events. [`TimeSlot::overlaps`] is
//! the rule that constraint implements.

use crate::ids::{BookingId, ResourceId, SubjectId, VenueId};
use crate::pii::Sealed;
use crate::venue::Venue;
use crate::DomainError;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// The personal data of a booking, sealed as one envelope in `BookingRequested.customer`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerDetails {
    pub name: String,
    pub email: String,
    pub phone: Option<String>,
    pub notes: Option<String>,
}

/// The longest a booking may last.
pub const MAX_DURATION_HOURS: i64 = 24;

/// A half-open interval `[starts_at, ends_at)` of at most 24 hours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeSlot {
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

impl TimeSlot {
    pub fn new(starts_at: DateTime<Utc>, ends_at: DateTime<Utc>) -> Result<Self, DomainError> {
        if ends_at <= starts_at {
            return Err(DomainError::validation(
                "ends_at",
                "must be after starts_at",
            ));
        }
        if ends_at - starts_at > Duration::hours(MAX_DURATION_HOURS) {
            return Err(DomainError::validation(
                "ends_at",
                format!("a booking lasts at most {MAX_DURATION_HOURS} hours"),
            ));
        }
        Ok(TimeSlot { starts_at, ends_at })
    }

    /// Half-open: a booking ending at 20:00 does not overlap one starting at 20:00.
    pub fn overlaps(&self, other: &TimeSlot) -> bool {
        self.starts_at < other.ends_at && other.starts_at < self.ends_at
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BookingStatus {
    Pending,
    Confirmed,
    CheckedIn,
    NoShow,
    Cancelled,
}

impl BookingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BookingStatus::Pending => "pending",
            BookingStatus::Confirmed => "confirmed",
            BookingStatus::CheckedIn => "checked_in",
            BookingStatus::NoShow => "no_show",
            BookingStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the booking still occupies its resource: a seated guest does, a cancelled booking
    /// or a no-show frees the slot for someone else.
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            BookingStatus::Pending | BookingStatus::Confirmed | BookingStatus::CheckedIn
        )
    }

    /// Only bookings that have not happened yet can move.
    pub fn can_move(self) -> bool {
        matches!(self, BookingStatus::Pending | BookingStatus::Confirmed)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingRequested {
    pub booking_id: BookingId,
    pub venue_id: VenueId,
    pub resource_id: ResourceId,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub party_size: u16,
    pub subject_id: SubjectId,
    /// Name, email, phone and notes, sealed under the subject's key.
    pub customer: Sealed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingConfirmed {
    pub booking_id: BookingId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingRescheduled {
    pub booking_id: BookingId,
    pub resource_id: ResourceId,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// Where it was, so a reader of this one event knows which slot was freed.
    pub previous_resource_id: ResourceId,
    pub previous_starts_at: DateTime<Utc>,
    pub previous_ends_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingCancelled {
    pub booking_id: BookingId,
    /// Free text about a person ("guest is ill") is personal data: sealed like the customer.
    pub reason: Option<Sealed>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCheckedIn {
    pub booking_id: BookingId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingNoShow {
    pub booking_id: BookingId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum BookingEvent {
    BookingRequested(BookingRequested),
    BookingConfirmed(BookingConfirmed),
    BookingRescheduled(BookingRescheduled),
    BookingCancelled(BookingCancelled),
    GuestCheckedIn(GuestCheckedIn),
    BookingNoShow(BookingNoShow),
}

crate::tagged_domain_event!(BookingEvent {
    BookingRequested,
    BookingConfirmed,
    BookingRescheduled,
    BookingCancelled,
    GuestCheckedIn,
    BookingNoShow,
});

/// A booking as the command side sees it: no personal data is needed to decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Booking {
    pub id: BookingId,
    pub venue_id: VenueId,
    pub resource_id: ResourceId,
    pub slot: TimeSlot,
    pub party_size: u16,
    pub subject_id: SubjectId,
    pub status: BookingStatus,
}

#[derive(Clone, Debug)]
pub enum BookingCommand<'a> {
    Request {
        booking_id: BookingId,
        venue: &'a Venue,
        resource_id: ResourceId,
        slot: TimeSlot,
        party_size: i64,
        subject_id: SubjectId,
        customer: Sealed,
    },
    Confirm,
    Reschedule {
        venue: &'a Venue,
        resource_id: Option<ResourceId>,
        slot: TimeSlot,
    },
    Cancel {
        reason: Option<Sealed>,
    },
    CheckIn,
    MarkNoShow,
}

/// The rules a request checks against the venue: the resource exists and the party fits it.
/// Public so the edge can refuse before minting anything for the request.
pub fn check_party(
    venue: &Venue,
    resource_id: ResourceId,
    party_size: i64,
) -> Result<u16, DomainError> {
    let resource = venue
        .resource(resource_id)
        .ok_or_else(|| DomainError::validation("resource_id", "no such resource at this venue"))?;
    if party_size < 1 || party_size > i64::from(resource.capacity) {
        return Err(DomainError::validation(
            "party_size",
            format!(
                "must be between 1 and the resource's capacity ({})",
                resource.capacity
            ),
        ));
    }
    u16::try_from(party_size).map_err(|_| DomainError::validation("party_size", "too large"))
}

pub fn decide(
    state: Option<&Booking>,
    cmd: BookingCommand<'_>,
) -> Result<Vec<BookingEvent>, DomainError> {
    use BookingCommand as C;
    use BookingStatus as S;
    let booking = match (state, cmd) {
        (
            None,
            C::Request {
                booking_id,
                venue,
                resource_id,
                slot,
                party_size,
                subject_id,
                customer,
            },
        ) => {
            let party_size = check_party(venue, resource_id, party_size)?;
            return Ok(vec![BookingEvent::BookingRequested(BookingRequested {
                booking_id,
                venue_id: venue.id,
                resource_id,
                starts_at: slot.starts_at,
                ends_at: slot.ends_at,
                party_size,
                subject_id,
                customer,
            })]);
        }
        (Some(_), C::Request { .. }) => {
            return Err(DomainError::transition("the booking already exists"))
        }
        (None, _) => return Err(DomainError::NotFound("booking")),
        (Some(b), cmd) => (b, cmd),
    };
    let (b, cmd) = booking;
    let refuse = |what: &str| {
        Err(DomainError::transition(format!(
            "a {} booking cannot be {what}",
            b.status.as_str()
        )))
    };
    match cmd {
        C::Request { .. } => Err(DomainError::transition("the booking already exists")),
        C::Confirm => match b.status {
            S::Pending => Ok(vec![BookingEvent::BookingConfirmed(BookingConfirmed {
                booking_id: b.id,
            })]),
            _ => refuse("confirmed"),
        },
        C::Reschedule {
            venue,
            resource_id,
            slot,
        } => {
            if !b.status.can_move() {
                return refuse("rescheduled");
            }
            if venue.id != b.venue_id {
                return Err(DomainError::validation(
                    "resource_id",
                    "no such resource at this venue",
                ));
            }
            let resource_id = resource_id.unwrap_or(b.resource_id);
            check_party(venue, resource_id, i64::from(b.party_size))?;
            if resource_id == b.resource_id && slot == b.slot {
                return Err(DomainError::validation(
                    "starts_at",
                    "the booking is already at this time and resource",
                ));
            }
            Ok(vec![BookingEvent::BookingRescheduled(BookingRescheduled {
                booking_id: b.id,
                resource_id,
                starts_at: slot.starts_at,
                ends_at: slot.ends_at,
                previous_resource_id: b.resource_id,
                previous_starts_at: b.slot.starts_at,
                previous_ends_at: b.slot.ends_at,
            })])
        }
        C::Cancel { reason } => match b.status {
            S::Pending | S::Confirmed => {
                Ok(vec![BookingEvent::BookingCancelled(BookingCancelled {
                    booking_id: b.id,
                    reason,
                })])
            }
            _ => refuse("cancelled"),
        },
        C::CheckIn => match b.status {
            S::Confirmed => Ok(vec![BookingEvent::GuestCheckedIn(GuestCheckedIn {
                booking_id: b.id,
            })]),
            _ => refuse("checked in"),
        },
        C::MarkNoShow => match b.status {
            S::Confirmed => Ok(vec![BookingEvent::BookingNoShow(BookingNoShow {
                booking_id: b.id,
            })]),
            _ => refuse("marked as a no-show"),
        },
    }
}

pub fn evolve(state: Option<Booking>, event: &BookingEvent) -> Option<Booking> {
    use BookingEvent as E;
    match (state, event) {
        (None, E::BookingRequested(e)) => Some(Booking {
            id: e.booking_id,
            venue_id: e.venue_id,
            resource_id: e.resource_id,
            slot: TimeSlot {
                starts_at: e.starts_at,
                ends_at: e.ends_at,
            },
            party_size: e.party_size,
            subject_id: e.subject_id,
            status: BookingStatus::Pending,
        }),
        (Some(mut b), e) => {
            match e {
                E::BookingRequested(_) => {}
                E::BookingConfirmed(_) => b.status = BookingStatus::Confirmed,
                E::BookingRescheduled(e) => {
                    b.resource_id = e.resource_id;
                    b.slot = TimeSlot {
                        starts_at: e.starts_at,
                        ends_at: e.ends_at,
                    };
                }
                E::BookingCancelled(_) => b.status = BookingStatus::Cancelled,
                E::GuestCheckedIn(_) => b.status = BookingStatus::CheckedIn,
                E::BookingNoShow(_) => b.status = BookingStatus::NoShow,
            }
            Some(b)
        }
        (None, _) => None,
    }
}

pub fn fold<'a>(events: impl IntoIterator<Item = &'a BookingEvent>) -> Option<Booking> {
    events.into_iter().fold(None, evolve)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::envelope::DomainEvent;
    use crate::ids::ResourceId;
    use crate::venue::{self, VenueCommand};
    use chrono::TimeZone;
    use uuid::Uuid;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, h, m, 0)
            .single()
            .unwrap_or_default()
    }

    fn slot(h1: u32, h2: u32) -> TimeSlot {
        TimeSlot::new(at(h1, 0), at(h2, 0)).unwrap_or(TimeSlot {
            starts_at: at(0, 0),
            ends_at: at(0, 1),
        })
    }

    fn sealed() -> Sealed {
        Sealed {
            v: 1,
            sub: Uuid::nil(),
            kid: Uuid::nil(),
            n: String::new(),
            ct: String::new(),
        }
    }

    /// A venue with a table for 4 and a room for 10.
    fn venue() -> (Venue, ResourceId, ResourceId) {
        let vid = crate::ids::VenueId::mint();
        let (t, r) = (ResourceId::mint(), ResourceId::mint());
        let mut events = venue::decide(
            None,
            VenueCommand::Register {
                venue_id: vid,
                name: "V".into(),
                timezone: "UTC".into(),
            },
        )
        .unwrap_or_default();
        let v = venue::fold(&events);
        events.extend(
            venue::decide(
                v.as_ref(),
                VenueCommand::AddResource {
                    resource_id: t,
                    name: "T".into(),
                    capacity: 4,
                },
            )
            .unwrap_or_default(),
        );
        let v = venue::fold(&events);
        events.extend(
            venue::decide(
                v.as_ref(),
                VenueCommand::AddResource {
                    resource_id: r,
                    name: "R".into(),
                    capacity: 10,
                },
            )
            .unwrap_or_default(),
        );
        let v = venue::fold(&events);
        match v {
            Some(v) => (v, t, r),
            None => panic!("venue fixture did not fold"),
        }
    }

    fn request(
        venue: &Venue,
        resource_id: ResourceId,
        party_size: i64,
    ) -> Result<Vec<BookingEvent>, DomainError> {
        decide(
            None,
            BookingCommand::Request {
                booking_id: BookingId::mint(),
                venue,
                resource_id,
                slot: slot(18, 20),
                party_size,
                subject_id: SubjectId::mint(),
                customer: sealed(),
            },
        )
    }

    /// Given these events, the booking's state.
    fn given(events: &[BookingEvent]) -> Option<Booking> {
        fold(events)
    }

    fn pending() -> (Venue, ResourceId, ResourceId, Vec<BookingEvent>) {
        let (v, t, r) = venue();
        let events = request(&v, t, 2).unwrap_or_default();
        (v, t, r, events)
    }

    fn then_status(
        events: &[BookingEvent],
        cmd: BookingCommand<'_>,
    ) -> Result<BookingStatus, DomainError> {
        let state = given(events);
        let new = decide(state.as_ref(), cmd)?;
        let mut all = events.to_vec();
        all.extend(new);
        given(&all)
            .map(|b| b.status)
            .ok_or(DomainError::NotFound("booking"))
    }

    #[test]
    fn a_request_within_capacity_is_pending() {
        let (_, _, _, events) = pending();
        assert_eq!(events.len(), 1);
        assert_eq!(
            given(&events).map(|b| b.status),
            Some(BookingStatus::Pending)
        );
        assert_eq!(events[0].event_type(), "BookingRequested");
    }

    #[test]
    fn party_size_must_be_between_one_and_capacity() {
        let (v, t, r) = venue();
        assert!(request(&v, t, 4).is_ok());
        for bad in [0, -1, 5] {
            assert!(matches!(
                request(&v, t, bad),
                Err(DomainError::Validation {
                    field: "party_size",
                    ..
                })
            ));
        }
        assert!(request(&v, r, 10).is_ok());
        assert!(matches!(
            request(&v, ResourceId::mint(), 2),
            Err(DomainError::Validation {
                field: "resource_id",
                ..
            })
        ));
    }

    #[test]
    fn a_slot_must_end_after_it_starts_and_last_at_most_a_day() {
        assert!(TimeSlot::new(at(10, 0), at(10, 0)).is_err());
        assert!(TimeSlot::new(at(11, 0), at(10, 0)).is_err());
        assert!(TimeSlot::new(at(0, 0), at(0, 0) + Duration::hours(24)).is_ok());
        let too_long = TimeSlot::new(
            at(0, 0),
            at(0, 0) + Duration::hours(24) + Duration::seconds(1),
        );
        assert!(matches!(
            too_long,
            Err(DomainError::Validation {
                field: "ends_at",
                ..
            })
        ));
    }

    #[test]
    fn slots_overlap_half_open() {
        assert!(slot(18, 20).overlaps(&slot(19, 21)));
        assert!(slot(18, 20).overlaps(&slot(17, 19)));
        assert!(slot(18, 20).overlaps(&slot(18, 20)));
        assert!(slot(18, 22).overlaps(&slot(19, 20)));
        assert!(
            !slot(18, 20).overlaps(&slot(20, 22)),
            "touching end-to-start is free"
        );
        assert!(!slot(20, 22).overlaps(&slot(18, 20)));
    }

    #[test]
    fn pending_confirms_then_checks_in() {
        let (_, _, _, mut events) = pending();
        assert_eq!(
            then_status(&events, BookingCommand::Confirm),
            Ok(BookingStatus::Confirmed)
        );
        events.extend(decide(given(&events).as_ref(), BookingCommand::Confirm).unwrap_or_default());
        assert_eq!(
            then_status(&events, BookingCommand::CheckIn),
            Ok(BookingStatus::CheckedIn)
        );
        assert_eq!(
            then_status(&events, BookingCommand::MarkNoShow),
            Ok(BookingStatus::NoShow)
        );
        assert_eq!(
            then_status(&events, BookingCommand::Cancel { reason: None }),
            Ok(BookingStatus::Cancelled)
        );
        assert!(matches!(
            then_status(&events, BookingCommand::Confirm),
            Err(DomainError::InvalidTransition(_))
        ));
    }

    #[test]
    fn a_pending_booking_cannot_check_in_or_no_show() {
        let (_, _, _, events) = pending();
        assert!(matches!(
            then_status(&events, BookingCommand::CheckIn),
            Err(DomainError::InvalidTransition(_))
        ));
        assert!(matches!(
            then_status(&events, BookingCommand::MarkNoShow),
            Err(DomainError::InvalidTransition(_))
        ));
        assert_eq!(
            then_status(
                &events,
                BookingCommand::Cancel {
                    reason: Some(sealed())
                }
            ),
            Ok(BookingStatus::Cancelled)
        );
    }

    #[test]
    fn final_states_refuse_everything() {
        let (v, _, _, events) = pending();
        let confirmed: Vec<_> = events
            .iter()
            .cloned()
            .chain(decide(given(&events).as_ref(), BookingCommand::Confirm).unwrap_or_default())
            .collect();
        for finisher in [
            BookingCommand::Cancel { reason: None },
            BookingCommand::CheckIn,
            BookingCommand::MarkNoShow,
        ] {
            let mut done = confirmed.clone();
            done.extend(decide(given(&done).as_ref(), finisher).unwrap_or_default());
            assert_eq!(done.len(), 3);
            for cmd in [
                BookingCommand::Confirm,
                BookingCommand::Cancel { reason: None },
                BookingCommand::CheckIn,
                BookingCommand::MarkNoShow,
                BookingCommand::Reschedule {
                    venue: &v,
                    resource_id: None,
                    slot: slot(8, 9),
                },
            ] {
                assert!(
                    matches!(
                        decide(given(&done).as_ref(), cmd),
                        Err(DomainError::InvalidTransition(_))
                    ),
                    "final state must refuse"
                );
            }
        }
    }

    #[test]
    fn reschedule_moves_the_slot_and_keeps_the_status() {
        let (v, t, r, events) = pending();
        let new = decide(
            given(&events).as_ref(),
            BookingCommand::Reschedule {
                venue: &v,
                resource_id: Some(r),
                slot: slot(12, 13),
            },
        )
        .unwrap_or_default();
        let mut all = events.clone();
        all.extend(new.clone());
        let b = given(&all);
        assert_eq!(
            b.as_ref().map(|b| (b.resource_id, b.slot, b.status)),
            Some((r, slot(12, 13), BookingStatus::Pending))
        );
        match new.first() {
            Some(BookingEvent::BookingRescheduled(e)) => {
                assert_eq!(e.previous_resource_id, t);
                assert_eq!(e.previous_starts_at, at(18, 0));
            }
            other => panic!("expected a reschedule, got {other:?}"),
        }
    }

    #[test]
    fn reschedule_checks_capacity_of_the_new_resource_and_refuses_a_no_op() {
        let (v, _, r, events) = pending();
        let big: Vec<_> = decide(
            None,
            BookingCommand::Request {
                booking_id: BookingId::mint(),
                venue: &v,
                resource_id: r,
                slot: slot(18, 20),
                party_size: 8,
                subject_id: SubjectId::mint(),
                customer: sealed(),
            },
        )
        .unwrap_or_default();
        let small_table = v.resources.keys().copied().find(|k| *k != r).unwrap_or(r);
        let err = decide(
            given(&big).as_ref(),
            BookingCommand::Reschedule {
                venue: &v,
                resource_id: Some(small_table),
                slot: slot(18, 20),
            },
        );
        assert!(matches!(
            err,
            Err(DomainError::Validation {
                field: "party_size",
                ..
            })
        ));
        let noop = decide(
            given(&events).as_ref(),
            BookingCommand::Reschedule {
                venue: &v,
                resource_id: None,
                slot: slot(18, 20),
            },
        );
        assert!(matches!(noop, Err(DomainError::Validation { .. })));
    }

    #[test]
    fn commands_to_a_missing_booking_are_not_found() {
        assert_eq!(
            decide(None, BookingCommand::Confirm),
            Err(DomainError::NotFound("booking"))
        );
    }

    #[test]
    fn a_second_request_on_the_same_stream_is_refused() {
        let (v, t, _, events) = pending();
        let again = decide(
            given(&events).as_ref(),
            BookingCommand::Request {
                booking_id: BookingId::mint(),
                venue: &v,
                resource_id: t,
                slot: slot(18, 20),
                party_size: 2,
                subject_id: SubjectId::mint(),
                customer: sealed(),
            },
        );
        assert!(matches!(again, Err(DomainError::InvalidTransition(_))));
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let (_, _, _, events) = pending();
        for e in &events {
            assert_eq!(
                BookingEvent::decode(e.event_type(), 1, &e.payload())
                    .ok()
                    .as_ref(),
                Some(e)
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod properties {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn slot(start: i64, len: i64) -> TimeSlot {
        let base = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).single().unwrap();
        TimeSlot {
            starts_at: base + Duration::minutes(start),
            ends_at: base + Duration::minutes(start + len),
        }
    }

    proptest! {
        /// `overlaps` is the half-open rule: some minute belongs to both slots.
        #[test]
        fn overlap_means_a_shared_minute(a in 0i64..600, la in 1i64..240, b in 0i64..600, lb in 1i64..240) {
            let (x, y) = (slot(a, la), slot(b, lb));
            let shared = (a..a + la).any(|m| (b..b + lb).contains(&m));
            prop_assert_eq!(x.overlaps(&y), shared);
            prop_assert_eq!(x.overlaps(&y), y.overlaps(&x));
        }

        /// No sequence of lifecycle commands leaves a final state (checked in, no-show, cancelled).
        #[test]
        fn final_states_are_final(tried in prop::collection::vec(0u8..4, 0..12)) {
            let venue_id = VenueId::mint();
            let mut state = Some(Booking {
                id: BookingId::mint(),
                venue_id,
                resource_id: ResourceId::mint(),
                slot: slot(0, 60),
                party_size: 2,
                subject_id: SubjectId::mint(),
                status: BookingStatus::Pending,
            });
            for t in tried {
                let before = state.clone().unwrap().status;
                let cmd = match t {
                    0 => BookingCommand::Confirm,
                    1 => BookingCommand::Cancel { reason: None },
                    2 => BookingCommand::CheckIn,
                    _ => BookingCommand::MarkNoShow,
                };
                if let Ok(events) = decide(state.as_ref(), cmd) {
                    prop_assert!(!matches!(before, BookingStatus::Cancelled | BookingStatus::NoShow | BookingStatus::CheckedIn));
                    state = events.iter().fold(state, evolve);
                }
                let after = state.as_ref().unwrap().status;
                if matches!(before, BookingStatus::Cancelled | BookingStatus::NoShow | BookingStatus::CheckedIn) {
                    prop_assert_eq!(after, before);
                }
            }
        }
    }
}
