//! The write side's storage: the append pipeline, the key vault, purging expired idempotency
//! records, and loading aggregates from the log to decide on.

pub mod append;
pub mod purge;
pub mod vault;

use ledger_events::envelope::DomainEvent;

/// Folds one stream into an aggregate's state; also returns the stream's version (0 = none), which
/// the append then expects.
pub async fn load<E, S>(
    pool: &sqlx::PgPool,
    stream_id: &str,
    evolve: fn(Option<S>, &E) -> Option<S>,
) -> Result<(Option<S>, i64), anyhow::Error>
where
    E: DomainEvent,
{
    let recorded = ledger_replay::read_stream(pool, stream_id).await?;
    let mut state = None;
    let mut version = 0;
    for r in &recorded {
        let event = E::decode(&r.event_type, r.schema_version, &r.payload)?;
        state = evolve(state, &event);
        version = r.stream_version;
    }
    Ok((state, version))
}
