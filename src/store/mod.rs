//! The write side's storage: the append pipeline, the key vault, purging expired idempotency
//! records, and loading aggregates from the log to decide on.

pub mod append;
pub mod purge;
pub mod vault;
mod wire;

pub use wire::APPLICATION_NAME as WRITER_APPLICATION_NAME;

pub use wire::WireConfig;

use ledger_events::envelope::DomainEvent;

/// Aggregates folded before, by stream: a load then reads only the events after the version it
/// holds (in the steady state none: one index probe, no payload), where a plain [`load`] reads and
/// decodes the whole stream every time. A venue's stream is read by every booking command at
/// that venue. Exact across processes, since streams only grow by contiguous versions; bounded
/// (past [`StreamCache::MAX`] streams it starts over: a miss costs one full read).
pub struct StreamCache<S> {
    folded: std::sync::Mutex<std::collections::HashMap<String, (Option<S>, i64)>>,
}

impl<S> Default for StreamCache<S> {
    fn default() -> Self {
        StreamCache {
            folded: Default::default(),
        }
    }
}

impl<S: Clone> StreamCache<S> {
    pub const MAX: usize = 10_000;

    /// [`load`], starting from what was folded before.
    pub async fn load<E: DomainEvent>(
        &self,
        pool: &sqlx::PgPool,
        stream_id: &str,
        evolve: fn(Option<S>, &E) -> Option<S>,
    ) -> Result<(Option<S>, i64), anyhow::Error> {
        let (mut state, mut version) = self
            .folded
            .lock()
            .ok()
            .and_then(|f| f.get(stream_id).cloned())
            .unwrap_or((None, 0));
        let newer = ledger_replay::read_stream_after(pool, stream_id, version).await?;
        for r in &newer {
            let event = E::decode(&r.event_type, r.schema_version, &r.payload)?;
            state = evolve(state, &event);
            version = r.stream_version;
        }
        if !newer.is_empty() {
            if let Ok(mut folded) = self.folded.lock() {
                if folded.len() >= Self::MAX {
                    folded.clear();
                }
                // Another load may have folded further meanwhile: keep the later one.
                let later = folded.get(stream_id).is_some_and(|(_, v)| *v > version);
                if !later {
                    folded.insert(stream_id.to_owned(), (state.clone(), version));
                }
            }
        }
        Ok((state, version))
    }
}

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
