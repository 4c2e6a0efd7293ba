//! End-to-end tests through HTTP against real Postgres: one binary, one database per test.

mod audit;
mod audit_api;
mod auth;
mod bookings;
mod concurrency;
mod conditional;
mod erasure;
mod errors;
mod faults;
mod helpers;
mod idempotency;
mod lifecycle;
mod live;
mod log;
mod metrics;
mod payments;
mod pg_restart;
mod purge;
mod queries;
mod query_params;
mod races;
mod read_models;
mod rebuild;
mod relay;
mod tamper;
mod webhook;
