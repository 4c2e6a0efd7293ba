//! # ledger-events: the ledger's vocabulary
//!
//! Owns what the ledger *says*: the event types and their stored envelope, the aggregates as pure
//! `decide`/`evolve` functions, personal data as sealed envelopes ([`pii`]), and the canonical
//! encoding and hash chain ([`chain`]) that make the log tamper-evident.
//!
//! It must not do I/O: no database, no network, no clock reads inside deciders (the caller passes
//! `now`). Everything here is deterministic given its inputs, so it is tested without a server.
//!
//! ## Layout
//! - [`ids`], [`money`]: newtypes parsed at the edge; once built, always valid.
//! - [`envelope`]: [`envelope::NewEvent`], [`envelope::RecordedEvent`], [`envelope::Metadata`].
//! - [`venue`], [`booking`], [`payment`]: one aggregate each: commands, events, state, decide, evolve.
//! - [`pii`]: `Pii<T>`, the key hierarchy, the sealed envelope (XChaCha20-Poly1305), blind index.
//! - [`chain`]: RFC 8785 canonical JSON, leaf and entry hashes.
//! - [`checkpoint`]: signed checkpoints (Merkle root + chain head, Ed25519) auditors keep outside.

pub mod booking;
pub mod chain;
pub mod checkpoint;
pub mod envelope;
pub mod error;
pub mod ids;
pub mod money;
pub mod payment;
pub mod pii;
pub mod venue;

pub use error::DomainError;
