//! # ledger-replay: reading the log back
//!
//! Owns every read of the `events` table: by stream (the command side loads state with it), by
//! global position (relay, audit), up to a time (as-of), by actor and time (who did what), and
//! rebuild. It never writes to the log: appending is the write side's alone.
//!
//! Layout: [`history`] renders a stream's trail (JSON, CSV), [`as_of`] folds a stream up to a time
//! with the aggregate's own `evolve`, [`actions`] groups events into the commands callers tried,
//! [`rebuild`] folds a projection again into shadow tables and swaps them in (blue/green).
//!
//! Readers may page with `WHERE global_position > $cursor ORDER BY global_position` and never skip
//! an event: the append pipeline makes positions gapless and visible in commit order.

pub mod actions;
pub mod as_of;
pub mod checkpoint;
pub mod history;
pub mod rebuild;
pub mod verify;

use chrono::{DateTime, Utc};
use ledger_events::envelope::RecordedEvent;
use sqlx::PgExecutor;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the log failed: {0}")]
    Database(#[from] sqlx::Error),
}

#[derive(sqlx::FromRow)]
struct Row {
    global_position: i64,
    event_id: Uuid,
    stream_id: String,
    stream_version: i64,
    event_type: String,
    schema_version: i32,
    payload: serde_json::Value,
    metadata: serde_json::Value,
    recorded_at: DateTime<Utc>,
}

impl From<Row> for RecordedEvent {
    fn from(r: Row) -> Self {
        RecordedEvent {
            global_position: r.global_position,
            event_id: r.event_id,
            stream_id: r.stream_id,
            stream_version: r.stream_version,
            event_type: r.event_type,
            schema_version: r.schema_version,
            payload: r.payload,
            metadata: r.metadata,
            recorded_at: r.recorded_at,
        }
    }
}

const COLUMNS: &str = "global_position, event_id, stream_id, stream_version, event_type, \
                       schema_version, payload, metadata, recorded_at";

/// All events of one stream, in stream order. An unknown stream is an empty list.
pub async fn read_stream<'e>(
    db: impl PgExecutor<'e>,
    stream_id: &str,
) -> Result<Vec<RecordedEvent>, ReadError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM events WHERE stream_id = $1 ORDER BY stream_version"
    ))
    .bind(stream_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// The events of one stream after version `after`, in stream order.
pub async fn read_stream_after<'e>(
    db: impl PgExecutor<'e>,
    stream_id: &str,
    after: i64,
) -> Result<Vec<RecordedEvent>, ReadError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM events WHERE stream_id = $1 AND stream_version > $2 \
         ORDER BY stream_version"
    ))
    .bind(stream_id)
    .bind(after)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Up to `limit` events after global position `after`, in global order.
pub async fn read_all<'e>(
    db: impl PgExecutor<'e>,
    after: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, ReadError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM events WHERE global_position > $1 \
         ORDER BY global_position LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// The position of the last committed event (0 for an empty log).
pub async fn head_position<'e>(db: impl PgExecutor<'e>) -> Result<i64, ReadError> {
    let (position,): (i64,) = sqlx::query_as("SELECT position FROM log_head")
        .fetch_one(db)
        .await?;
    Ok(position)
}

/// When the event at `position` was recorded, if it exists: how old the oldest event a reader
/// has not yet taken is, for lag in seconds.
pub async fn recorded_at<'e>(
    db: impl PgExecutor<'e>,
    position: i64,
) -> Result<Option<DateTime<Utc>>, ReadError> {
    let found: Option<(DateTime<Utc>,)> =
        sqlx::query_as("SELECT recorded_at FROM events WHERE global_position = $1")
            .bind(position)
            .fetch_optional(db)
            .await?;
    Ok(found.map(|(t,)| t))
}

/// One stream's events recorded at or before `at`, in stream order: what the ledger knew of the
/// stream then. `recorded_at` never goes backwards along the log (the append pipeline clamps it),
/// so this is always a prefix of the stream.
pub async fn read_stream_until<'e>(
    db: impl PgExecutor<'e>,
    stream_id: &str,
    at: DateTime<Utc>,
) -> Result<Vec<RecordedEvent>, ReadError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM events WHERE stream_id = $1 AND recorded_at <= $2 \
         ORDER BY stream_version"
    ))
    .bind(stream_id)
    .bind(at)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Up to `limit` events after global position `after`, in global order, whose metadata names
/// `actor` (if given) and recorded within `[from, to]` (each bound if given): who did what.
///
/// The SQL is built for the filters actually given rather than with `$n IS NULL OR ...`, so each
/// shape gets a plan that uses its index (`events_actor_position`, `events_recorded_at`).
pub async fn read_actions<'e>(
    db: impl PgExecutor<'e>,
    actor: Option<&str>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    after: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, ReadError> {
    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "SELECT {COLUMNS} FROM events WHERE global_position > "
    ));
    q.push_bind(after);
    if let Some(actor) = actor {
        q.push(" AND metadata->>'actor' = ")
            .push_bind(actor.to_owned());
    }
    if let Some(from) = from {
        q.push(" AND recorded_at >= ").push_bind(from);
    }
    if let Some(to) = to {
        q.push(" AND recorded_at <= ").push_bind(to);
    }
    q.push(" ORDER BY global_position LIMIT ").push_bind(limit);
    let rows: Vec<Row> = q.build_query_as().fetch_all(db).await?;
    Ok(rows.into_iter().map(Into::into).collect())
}
