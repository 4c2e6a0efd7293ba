//! End-to-end tests through HTTP against real Postgres: one binary, one database per test.

mod bookings;
mod concurrency;
mod helpers;
mod log;
