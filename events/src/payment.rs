//! The payment aggregate: money authorised for a booking, then captured, refunded or failed.
//!
//! Amounts are integer minor units. Invariants: `captured <= authorised`,
//! `refunded <= captured`; a failed payment takes no further money movement.

use crate::booking::{Booking, BookingStatus};

use crate::ids::{BookingId, PaymentId, VenueId};
use crate::money::{Amount, Currency};
use crate::DomainError;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentKind {
    Deposit,
    Balance,
}

impl PaymentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentKind::Deposit => "deposit",
            PaymentKind::Balance => "balance",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    pub payment_id: PaymentId,
    pub booking_id: BookingId,
    pub venue_id: VenueId,
    pub kind: PaymentKind,
    pub amount_minor: i64,
    pub currency: Currency,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub payment_id: PaymentId,
    pub amount_minor: i64,
    /// Set when the provider reported it (webhook); `None` when staff captured through the API.
    pub provider_event_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailed {
    pub payment_id: PaymentId,
    pub provider_event_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub payment_id: PaymentId,
    pub amount_minor: i64,
    pub provider_event_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum PaymentEvent {
    PaymentAuthorized(PaymentAuthorized),
    PaymentCaptured(PaymentCaptured),
    PaymentFailed(PaymentFailed),
    PaymentRefunded(PaymentRefunded),
}

crate::tagged_domain_event!(PaymentEvent {
    PaymentAuthorized,
    PaymentCaptured,
    PaymentFailed,
    PaymentRefunded,
});

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    pub id: PaymentId,
    pub booking_id: BookingId,
    pub venue_id: VenueId,
    pub kind: PaymentKind,
    pub currency: Currency,
    pub authorised_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub failed: bool,
}

impl Payment {
    /// A summary of where the money stands, for read models and answers.
    pub fn status(&self) -> &'static str {
        status_of(
            self.authorised_minor,
            self.captured_minor,
            self.refunded_minor,
            self.failed,
        )
    }
}

/// Where a payment's money stands, from its amounts (what read models keep).
pub fn status_of(authorised: i64, captured: i64, refunded: i64, failed: bool) -> &'static str {
    if failed {
        "failed"
    } else if refunded > 0 && refunded == captured {
        "refunded"
    } else if refunded > 0 {
        "partially_refunded"
    } else if captured > 0 && captured == authorised {
        "captured"
    } else if captured > 0 {
        "partially_captured"
    } else {
        "authorized"
    }
}

#[derive(Clone, Debug)]
pub enum PaymentCommand<'a> {
    Authorize {
        payment_id: PaymentId,
        booking: &'a Booking,
        kind: PaymentKind,
        amount_minor: i64,
        currency: String,
    },
    /// `amount_minor: None` captures all that is still authorised.
    Capture {
        amount_minor: Option<i64>,
        provider_event_id: Option<String>,
    },
    Refund {
        amount_minor: i64,
        provider_event_id: Option<String>,
    },
    Fail {
        provider_event_id: Option<String>,
    },
}

pub fn decide(
    state: Option<&Payment>,
    cmd: PaymentCommand<'_>,
) -> Result<Vec<PaymentEvent>, DomainError> {
    use PaymentCommand as C;
    let p = match (state, cmd) {
        (
            None,
            C::Authorize {
                payment_id,
                booking,
                kind,
                amount_minor,
                currency,
            },
        ) => {
            let amount = Amount::new(amount_minor)?;
            let currency = Currency::parse(&currency)?;
            if booking.status == BookingStatus::Cancelled {
                return Err(DomainError::transition(
                    "a cancelled booking cannot take payments",
                ));
            }
            return Ok(vec![PaymentEvent::PaymentAuthorized(PaymentAuthorized {
                payment_id,
                booking_id: booking.id,
                venue_id: booking.venue_id,
                kind,
                amount_minor: amount.minor(),
                currency,
            })]);
        }
        (Some(_), C::Authorize { .. }) => {
            return Err(DomainError::transition("the payment already exists"))
        }
        (None, _) => return Err(DomainError::NotFound("payment")),
        (Some(p), cmd) => (p, cmd),
    };
    let (p, cmd) = p;
    if p.failed {
        return Err(DomainError::transition("the payment has failed"));
    }
    match cmd {
        C::Authorize { .. } => Err(DomainError::transition("the payment already exists")),
        C::Capture {
            amount_minor,
            provider_event_id,
        } => {
            let open = p.authorised_minor - p.captured_minor;
            if open == 0 {
                return Err(DomainError::transition(
                    "everything authorised is already captured",
                ));
            }
            let amount = Amount::new(amount_minor.unwrap_or(open))?;
            if amount.minor() > open {
                return Err(DomainError::validation(
                    "amount_minor",
                    format!("at most the {open} still authorised can be captured"),
                ));
            }
            Ok(vec![PaymentEvent::PaymentCaptured(PaymentCaptured {
                payment_id: p.id,
                amount_minor: amount.minor(),
                provider_event_id,
            })])
        }
        C::Refund {
            amount_minor,
            provider_event_id,
        } => {
            let refundable = p.captured_minor - p.refunded_minor;
            if refundable == 0 {
                return Err(DomainError::transition(
                    "nothing captured is left to refund",
                ));
            }
            let amount = Amount::new(amount_minor)?;
            if amount.minor() > refundable {
                return Err(DomainError::validation(
                    "amount_minor",
                    format!(
                        "at most the {refundable} captured and not yet refunded can be refunded"
                    ),
                ));
            }
            Ok(vec![PaymentEvent::PaymentRefunded(PaymentRefunded {
                payment_id: p.id,
                amount_minor: amount.minor(),
                provider_event_id,
            })])
        }
        C::Fail { provider_event_id } => {
            if p.captured_minor > 0 {
                return Err(DomainError::transition(
                    "a payment with captured money cannot fail; refund it instead",
                ));
            }
            Ok(vec![PaymentEvent::PaymentFailed(PaymentFailed {
                payment_id: p.id,
                provider_event_id,
            })])
        }
    }
}

pub fn evolve(state: Option<Payment>, event: &PaymentEvent) -> Option<Payment> {
    use PaymentEvent as E;
    match (state, event) {
        (None, E::PaymentAuthorized(e)) => Some(Payment {
            id: e.payment_id,
            booking_id: e.booking_id,
            venue_id: e.venue_id,
            kind: e.kind,
            currency: e.currency,
            authorised_minor: e.amount_minor,
            captured_minor: 0,
            refunded_minor: 0,
            failed: false,
        }),
        (Some(mut p), e) => {
            match e {
                E::PaymentAuthorized(_) => {}
                E::PaymentCaptured(e) => p.captured_minor += e.amount_minor,
                E::PaymentFailed(_) => p.failed = true,
                E::PaymentRefunded(e) => p.refunded_minor += e.amount_minor,
            }
            Some(p)
        }
        (None, _) => None,
    }
}

pub fn fold<'a>(events: impl IntoIterator<Item = &'a PaymentEvent>) -> Option<Payment> {
    events.into_iter().fold(None, evolve)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::booking::TimeSlot;
    use crate::envelope::DomainEvent;
    use crate::ids::{ResourceId, SubjectId};
    use chrono::{Duration, Utc};

    fn booking(status: BookingStatus) -> Booking {
        let now = Utc::now();
        Booking {
            id: BookingId::mint(),
            venue_id: VenueId::mint(),
            resource_id: ResourceId::mint(),
            slot: TimeSlot {
                starts_at: now,
                ends_at: now + Duration::hours(2),
            },
            party_size: 2,
            subject_id: SubjectId::mint(),
            status,
        }
    }

    fn authorise(
        b: &Booking,
        amount: i64,
        currency: &str,
    ) -> Result<Vec<PaymentEvent>, DomainError> {
        decide(
            None,
            PaymentCommand::Authorize {
                payment_id: PaymentId::mint(),
                booking: b,
                kind: PaymentKind::Deposit,
                amount_minor: amount,
                currency: currency.into(),
            },
        )
    }

    /// Given events, when a command, then the resulting payment (or the refusal).
    fn when(
        events: &[PaymentEvent],
        cmd: PaymentCommand<'_>,
    ) -> Result<(Vec<PaymentEvent>, Payment), DomainError> {
        let new = decide(fold(events).as_ref(), cmd)?;
        let all: Vec<_> = events.iter().cloned().chain(new.clone()).collect();
        fold(&all)
            .map(|p| (all, p))
            .ok_or(DomainError::NotFound("payment"))
    }

    fn authorised(amount: i64) -> Vec<PaymentEvent> {
        authorise(&booking(BookingStatus::Confirmed), amount, "EUR").unwrap_or_default()
    }

    fn capture(amount: Option<i64>) -> PaymentCommand<'static> {
        PaymentCommand::Capture {
            amount_minor: amount,
            provider_event_id: None,
        }
    }

    fn refund(amount: i64) -> PaymentCommand<'static> {
        PaymentCommand::Refund {
            amount_minor: amount,
            provider_event_id: None,
        }
    }

    #[test]
    fn authorising_needs_a_positive_amount_and_a_real_currency() {
        let b = booking(BookingStatus::Pending);
        assert!(authorise(&b, 5000, "EUR").is_ok());
        assert!(matches!(
            authorise(&b, 0, "EUR"),
            Err(DomainError::Validation {
                field: "amount_minor",
                ..
            })
        ));
        assert!(matches!(
            authorise(&b, -1, "EUR"),
            Err(DomainError::Validation {
                field: "amount_minor",
                ..
            })
        ));
        assert!(matches!(
            authorise(&b, 100, "eur"),
            Err(DomainError::Validation {
                field: "currency",
                ..
            })
        ));
        assert!(matches!(
            authorise(&b, 100, "ABC"),
            Err(DomainError::Validation {
                field: "currency",
                ..
            })
        ));
    }

    #[test]
    fn a_cancelled_booking_takes_no_payment() {
        let b = booking(BookingStatus::Cancelled);
        assert!(matches!(
            authorise(&b, 100, "EUR"),
            Err(DomainError::InvalidTransition(_))
        ));
        assert!(
            authorise(&booking(BookingStatus::NoShow), 100, "EUR").is_ok(),
            "no-show fees are a thing"
        );
    }

    #[test]
    fn capture_defaults_to_everything_authorised() {
        let events = authorised(5000);
        let (_, p) = when(&events, capture(None)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.captured_minor, p.status()), (5000, "captured"));
    }

    #[test]
    fn capture_is_at_most_what_is_authorised_across_partial_captures() {
        let events = authorised(5000);
        let (events, p) = when(&events, capture(Some(3000))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.status(), "partially_captured");
        assert!(matches!(
            when(&events, capture(Some(2001))),
            Err(DomainError::Validation {
                field: "amount_minor",
                ..
            })
        ));
        let (events, p) = when(&events, capture(Some(2000))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.captured_minor, 5000);
        assert!(matches!(
            when(&events, capture(None)),
            Err(DomainError::InvalidTransition(_))
        ));
        assert!(matches!(
            when(&authorised(10), capture(Some(0))),
            Err(DomainError::Validation { .. })
        ));
    }

    #[test]
    fn refund_is_at_most_captured_minus_refunded() {
        let events = authorised(5000);
        assert!(
            matches!(
                when(&events, refund(1)),
                Err(DomainError::InvalidTransition(_))
            ),
            "nothing captured yet"
        );
        let (events, _) = when(&events, capture(Some(4000))).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            when(&events, refund(4001)),
            Err(DomainError::Validation {
                field: "amount_minor",
                ..
            })
        ));
        assert!(matches!(
            when(&events, refund(0)),
            Err(DomainError::Validation { .. })
        ));
        let (events, p) = when(&events, refund(1500)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.status(), "partially_refunded");
        assert!(matches!(
            when(&events, refund(2501)),
            Err(DomainError::Validation { .. })
        ));
        let (events, p) = when(&events, refund(2500)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.refunded_minor, p.status()), (4000, "refunded"));
        assert!(matches!(
            when(&events, refund(1)),
            Err(DomainError::InvalidTransition(_))
        ));
    }

    #[test]
    fn a_failed_payment_moves_no_more_money() {
        let events = authorised(5000);
        let fail = PaymentCommand::Fail {
            provider_event_id: Some("evt_1".into()),
        };
        let (events, p) = when(&events, fail).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.status(), "failed");
        assert!(matches!(
            when(&events, capture(None)),
            Err(DomainError::InvalidTransition(_))
        ));
        assert!(matches!(
            when(&events, refund(1)),
            Err(DomainError::InvalidTransition(_))
        ));
    }

    #[test]
    fn captured_money_cannot_fail() {
        let (events, _) = when(&authorised(100), capture(None)).unwrap_or_else(|e| panic!("{e}"));
        let fail = PaymentCommand::Fail {
            provider_event_id: None,
        };
        assert!(matches!(
            when(&events, fail),
            Err(DomainError::InvalidTransition(_))
        ));
    }

    #[test]
    fn commands_to_a_missing_payment_are_not_found() {
        assert_eq!(
            decide(None, capture(None)),
            Err(DomainError::NotFound("payment"))
        );
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        for e in &authorised(10) {
            assert_eq!(
                PaymentEvent::decode(e.event_type(), 1, &e.payload())
                    .ok()
                    .as_ref(),
                Some(e)
            );
            assert_eq!(e.payload()["currency"], "EUR");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod properties {
    use super::*;
    use crate::booking::TimeSlot;
    use crate::ids::{ResourceId, SubjectId};
    use chrono::{Duration, Utc};
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Move {
        Capture(Option<i64>),
        Refund(i64),
        Fail,
    }

    fn moves() -> impl Strategy<Value = Vec<Move>> {
        prop::collection::vec(
            prop_oneof![
                prop::option::of(-100i64..6000).prop_map(Move::Capture),
                (-100i64..6000).prop_map(Move::Refund),
                Just(Move::Fail),
            ],
            0..24,
        )
    }

    proptest! {
        /// Whatever is tried, in whatever order: 0 <= refunded <= captured <= authorised, and a
        /// refused command changes nothing.
        #[test]
        fn money_never_moves_beyond_what_was_authorised(authorised in 1i64..5000, tried in moves()) {
            let now = Utc::now();
            let booking = Booking {
                id: BookingId::mint(),
                venue_id: VenueId::mint(),
                resource_id: ResourceId::mint(),
                slot: TimeSlot { starts_at: now, ends_at: now + Duration::hours(1) },
                party_size: 2,
                subject_id: SubjectId::mint(),
                status: BookingStatus::Confirmed,
            };
            let mut events = decide(None, PaymentCommand::Authorize {
                payment_id: PaymentId::mint(),
                booking: &booking,
                kind: PaymentKind::Deposit,
                amount_minor: authorised,
                currency: "EUR".into(),
            }).unwrap();
            for m in tried {
                let before = fold(&events).unwrap();
                let cmd = match m {
                    Move::Capture(a) => PaymentCommand::Capture { amount_minor: a, provider_event_id: None },
                    Move::Refund(a) => PaymentCommand::Refund { amount_minor: a, provider_event_id: None },
                    Move::Fail => PaymentCommand::Fail { provider_event_id: None },
                };
                match decide(Some(&before), cmd) {
                    Ok(new) => events.extend(new),
                    Err(_) => prop_assert_eq!(fold(&events).unwrap(), before),
                }
                let p = fold(&events).unwrap();
                prop_assert!(0 <= p.refunded_minor);
                prop_assert!(p.refunded_minor <= p.captured_minor);
                prop_assert!(p.captured_minor <= p.authorised_minor);
                prop_assert!(!(p.failed && p.captured_minor > 0));
            }
        }
    }
}
