-- Read models: disposable, rebuildable from the log. Owned by the ledger-projections crate.

-- How far each projection has applied the log. Written in the same transaction as the rows the
-- events changed, so an event's effect is applied exactly once even when delivered twice.
CREATE TABLE projection_checkpoints (
    projection text        PRIMARY KEY,
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rm_venues (
    venue_id uuid   PRIMARY KEY,
    name     text   NOT NULL,
    timezone text   NOT NULL,
    version  bigint NOT NULL,
    position bigint NOT NULL
);

CREATE TABLE rm_resources (
    resource_id uuid    PRIMARY KEY,
    venue_id    uuid    NOT NULL,
    name        text    NOT NULL,
    capacity    integer NOT NULL,
    position    bigint  NOT NULL
);
CREATE INDEX rm_resources_venue ON rm_resources (venue_id);

-- Personal data stays sealed here: `customer` is the envelope from the event, opened at the edge.
CREATE TABLE rm_bookings (
    booking_id     uuid        PRIMARY KEY,
    venue_id       uuid        NOT NULL,
    resource_id    uuid        NOT NULL,
    starts_at      timestamptz NOT NULL,
    ends_at        timestamptz NOT NULL,
    -- The day of starts_at in the venue's zone: the board's "date".
    local_date     date        NOT NULL,
    party_size     integer     NOT NULL,
    status         text        NOT NULL,
    subject_id     uuid        NOT NULL,
    customer       jsonb       NOT NULL,
    paid_minor     bigint      NOT NULL DEFAULT 0,
    refunded_minor bigint      NOT NULL DEFAULT 0,
    version        bigint      NOT NULL,
    position       bigint      NOT NULL
);
CREATE INDEX rm_bookings_board ON rm_bookings (venue_id, local_date, starts_at, booking_id);
CREATE INDEX rm_bookings_subject ON rm_bookings (subject_id, starts_at, booking_id);

CREATE TABLE rm_payments (
    payment_id       uuid    PRIMARY KEY,
    booking_id       uuid    NOT NULL,
    venue_id         uuid    NOT NULL,
    kind             text    NOT NULL,
    currency         text    NOT NULL,
    authorised_minor bigint  NOT NULL,
    captured_minor   bigint  NOT NULL DEFAULT 0,
    refunded_minor   bigint  NOT NULL DEFAULT 0,
    failed           boolean NOT NULL DEFAULT false,
    version          bigint  NOT NULL,
    position         bigint  NOT NULL
);
CREATE INDEX rm_payments_booking ON rm_payments (booking_id);
