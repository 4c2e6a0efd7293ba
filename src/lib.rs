//! # ledger: the service and the write side
//!
//! An event-sourced booking ledger: commands arrive over HTTP, are decided against state folded
//! from the log, and append immutable events to Postgres through one batching writer.
//!
//! ## Layout
//! - [`config`]: environment and flags, validated at start (exit 2 naming the variable).
//! - [`http`]: the axum API: auth, commands, errors as problem+json, operations endpoints.
//! - [`store`]: the append pipeline (the only writer of `events`), the key vault, loading state.
//! - [`rebuild`]: `ledger replay rebuild`, a progress bar over `ledger_replay::rebuild`.
//! - [`relay`]: publishes the log to NATS JetStream, in order, from the stream's own tail.
//! - [`app`]: wiring and graceful shutdown. [`seed`]: the demo venue. [`bench`]: benchmarks.
//!
//! It owns no read model: queries are the `ledger-projections` crate's, reading back the log is
//! `ledger-replay`'s, and the vocabulary is `ledger-events`'s.

pub mod app;
pub mod backoff;
pub mod bench;
pub mod config;
pub mod http;
pub mod rebuild;
pub mod relay;
pub mod seed;
pub mod store;
pub mod telemetry;
