-- The daily_stats read model: per venue and local day, bookings, covers, no-shows and money.
-- Owned by ledger-projections (projections/src/daily_stats.rs). Disposable and rebuildable from
-- the log on its own: it keeps the little lookup state it needs in its own tables and never reads
-- another projection's (the booking board may be rebuilt, or lag, independently).

-- A venue's IANA zone: what turns a booking's start into its local day.
CREATE TABLE rm_stats_venues (
    venue_id uuid PRIMARY KEY,
    timezone text NOT NULL
);

-- Each booking's current contribution to its day. No personal data: ids, a day, counts, money.
CREATE TABLE rm_stats_bookings (
    booking_id     uuid    PRIMARY KEY,
    venue_id       uuid    NOT NULL,
    -- The day of starts_at in the venue's zone (moves with a reschedule).
    local_date     date    NOT NULL,
    party_size     integer NOT NULL,
    status         text    NOT NULL,
    captured_minor bigint  NOT NULL DEFAULT 0,
    refunded_minor bigint  NOT NULL DEFAULT 0
);

-- Which booking a payment belongs to: its money counts on that booking's day.
CREATE TABLE rm_stats_payments (
    payment_id uuid PRIMARY KEY,
    booking_id uuid NOT NULL
);

-- The sum of the contributions of the bookings on each day. A row whose day has no booking left
-- (all moved away) is deleted, so every row has bookings >= 1.
CREATE TABLE rm_daily_stats (
    venue_id       uuid    NOT NULL,
    local_date     date    NOT NULL,
    bookings       integer NOT NULL,
    covers         integer NOT NULL,
    no_shows       integer NOT NULL,
    captured_minor bigint  NOT NULL,
    refunded_minor bigint  NOT NULL,
    PRIMARY KEY (venue_id, local_date)
);
