//! # ledger-projections: the read models
//!
//! Will own every read model: its tables, its fold from events, its checkpoint, its JetStream
//! worker, and the SQL of the queries the API serves from it. The command side must never read
//! from here to decide (it folds the log instead).
//!
//! The read side is being built in its own issue; until then this crate only names the
//! projections so the workspace graph (`events ← projections ← replay ← ledger`) is in place.

/// The read models the query API will serve, by the name `ledger replay rebuild --projection` takes.
pub const PROJECTIONS: &[&str] = &[
    "booking_board",
    "booking_detail",
    "customer_bookings",
    "availability",
    "daily_stats",
];
