//! # ledger-projections: the read models
//!
//! Owns every read model: its tables, its fold from events, its checkpoint, its JetStream worker,
//! and the SQL of the queries the API serves from it (the crate that owns a table owns every
//! statement touching it). The command side never reads from here to decide.
//!
//! Each projection is a fold `(&mut Transaction, &RecordedEvent) -> Result<()>` applied together
//! with its checkpoint in one transaction: positions at or below the checkpoint are skipped
//! (delivery is at least once, the effect exactly once), and anything but `checkpoint + 1` is
//! refused, never silently skipped. The same fold serves the live worker ([`worker`]) and
//! rebuilds fed from Postgres (`ledger-replay`'s `rebuild`, into shadow tables: [`tables`]).
//!
//! ## Layout
//! - [`booking_board`]: venues and resources, bookings, payments: the board, a booking's detail,
//!   a customer's bookings, a venue's availability.
//! - [`daily_stats`]: per venue and local day, bookings, covers, no-shows and money.
//! - [`worker`]: a durable JetStream pull consumer per projection.

pub mod booking_board;
pub mod daily_stats;
pub mod worker;

use ledger_events::envelope::{DomainEvent, RecordedEvent};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

/// The read models `ledger replay rebuild --projection` will take, by name.
pub const PROJECTIONS: &[&str] = &[booking_board::NAME, daily_stats::NAME];

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("position {got} arrived at checkpoint {checkpoint}: a gap, refused")]
    Gap { checkpoint: i64, got: i64 },
    #[error("cannot decode event at position {position}: {reason}")]
    Decode { position: i64, reason: String },
}

/// The position a projection has applied up to (0 before its first event).
pub async fn checkpoint(db: &mut PgConnection, projection: &str) -> Result<i64, sqlx::Error> {
    let found: Option<(i64,)> =
        sqlx::query_as("SELECT position FROM projection_checkpoints WHERE projection = $1")
            .bind(projection)
            .fetch_optional(db)
            .await?;
    Ok(found.map(|(p,)| p).unwrap_or(0))
}

/// Checkpoints of every projection, for readiness and lag metrics.
pub async fn checkpoints(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT projection, position FROM projection_checkpoints ORDER BY projection")
        .fetch_all(pool)
        .await
}

/// Applies events to one projection in one transaction with its checkpoint. Returns the new
/// checkpoint. Events at or below the checkpoint are skipped; a gap is refused.
pub async fn apply_batch(
    pool: &PgPool,
    projection: &str,
    events: &[RecordedEvent],
) -> Result<i64, ProjectionError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING",
    )
    .bind(projection)
    .execute(&mut *tx)
    .await?;
    // The row lock serialises two workers of the same projection.
    let (mut at,): (i64,) = sqlx::query_as(
        "SELECT position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
    )
    .bind(projection)
    .fetch_one(&mut *tx)
    .await?;
    let before = at;
    for event in events {
        if event.global_position <= at {
            continue;
        }
        if event.global_position != at + 1 {
            return Err(ProjectionError::Gap {
                checkpoint: at,
                got: event.global_position,
            });
        }
        apply(&mut tx, projection, event).await?;
        at = event.global_position;
    }
    if at != before {
        sqlx::query(
            "UPDATE projection_checkpoints SET position = $2, updated_at = now() \
             WHERE projection = $1",
        )
        .bind(projection)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify('ledger_projection', $1)")
            .bind(format!("{projection}:{at}"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(at)
}

/// The tables a projection writes (its fold names them unqualified, so they resolve through
/// `search_path`), or `None` for an unknown projection.
pub fn tables(projection: &str) -> Option<&'static [&'static str]> {
    match projection {
        booking_board::NAME => Some(booking_board::TABLES),
        daily_stats::NAME => Some(daily_stats::TABLES),
        _ => None,
    }
}

/// Applies one event to a projection's tables, without its checkpoint: the fold itself, which
/// [`apply_batch`] runs for the live worker and a rebuild runs against its shadow tables (by
/// `SET LOCAL search_path`). The caller owns ordering and the checkpoint.
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    projection: &str,
    event: &RecordedEvent,
) -> Result<(), ProjectionError> {
    match projection {
        booking_board::NAME => booking_board::apply(tx, event).await,
        daily_stats::NAME => daily_stats::apply(tx, event).await,
        _ => Ok(()),
    }
}

/// Decodes a recorded event as its aggregate's event type (upcasting on the way).
pub(crate) fn decode<E: DomainEvent>(event: &RecordedEvent) -> Result<E, ProjectionError> {
    E::decode(&event.event_type, event.schema_version, &event.payload).map_err(|e| {
        ProjectionError::Decode {
            position: event.global_position,
            reason: e.to_string(),
        }
    })
}
