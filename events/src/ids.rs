//! Identifiers. Streams are named `<category>-<uuid>`; the category is also the NATS subject suffix.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered (v7) id: ids the product mints sort by creation.
            pub fn mint() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

id_type!(
    /// A venue: its stream holds the venue and its resources.
    VenueId
);
id_type!(
    /// A bookable resource (table, room, service slot) of a venue.
    ResourceId
);
id_type!(
    /// A booking aggregate.
    BookingId
);
id_type!(
    /// A payment aggregate; always belongs to one booking.
    PaymentId
);
id_type!(
    /// A data subject: the pseudonymous person behind personal data; the unit of erasure.
    SubjectId
);

/// The categories of streams, which are also the NATS subject suffixes (`ledger.events.<category>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    Venue,
    Booking,
    Payment,
    Subject,
    Audit,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Venue => "venue",
            Category::Booking => "booking",
            Category::Payment => "payment",
            Category::Subject => "subject",
            Category::Audit => "audit",
        }
    }

    /// The category of a stream id, by its prefix.
    pub fn of_stream(stream_id: &str) -> Option<Category> {
        let (prefix, _) = stream_id.split_once('-')?;
        Some(match prefix {
            "venue" => Category::Venue,
            "booking" => Category::Booking,
            "payment" => Category::Payment,
            "subject" => Category::Subject,
            "audit" => Category::Audit,
            _ => return None,
        })
    }
}

pub fn venue_stream(id: VenueId) -> String {
    format!("venue-{}", id.0)
}

pub fn booking_stream(id: BookingId) -> String {
    format!("booking-{}", id.0)
}

pub fn payment_stream(id: PaymentId) -> String {
    format!("payment-{}", id.0)
}

pub fn subject_stream(id: SubjectId) -> String {
    format!("subject-{}", id.0)
}

/// Refused commands are recorded per UTC day, so no single stream grows without bound.
pub fn audit_stream(day: chrono::NaiveDate) -> String {
    format!("audit-{}", day.format("%Y%m%d"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_named_by_category() {
        let id = BookingId(Uuid::nil());
        let stream = booking_stream(id);
        assert_eq!(stream, "booking-00000000-0000-0000-0000-000000000000");
        assert_eq!(Category::of_stream(&stream), Some(Category::Booking));
        assert_eq!(Category::of_stream("nonsense"), None);
        let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 23).unwrap_or_default();
        assert_eq!(
            Category::of_stream(&audit_stream(day)),
            Some(Category::Audit)
        );
    }
}
