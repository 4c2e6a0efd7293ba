//! Purging idempotency records past their retention.
//!
//! The contract keeps an `Idempotency-Key` answer "24 hours at least". Records are kept
//! [`Retention::hours`] (`LEDGER_IDEMPOTENCY_RETENTION_HOURS`, default 48, at least 24) after they
//! were written (`idempotency_keys.created_at`, set by the append's transaction) and then deleted
//! by [`purge_periodically`], which every API process runs: every [`Retention::every`] (10
//! minutes), jittered so processes started together spread out.
//!
//! Several processes may purge at once, safely and without waiting on each other: each statement
//! deletes at most [`BATCH`] rows, oldest first, chosen `FOR UPDATE SKIP LOCKED`, so concurrent
//! purgers take disjoint rows, each row is deleted (and counted) once, and no statement holds row
//! locks for longer than one small delete. The append pipeline never locks these rows; an insert
//! of a key whose old record is being deleted at that moment waits for that one delete.
//!
//! A retry that arrives after its record was purged is a new command, decided on the state at that
//! time (README, "Idempotency-Key").

use sqlx::PgPool;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// The contract's promise: an answer is replayed for 24 hours at least.
pub const MIN_RETENTION_HOURS: u32 = 24;
pub const DEFAULT_RETENTION_HOURS: u32 = 48;
/// A year: beyond that the table only grows.
pub const MAX_RETENTION_HOURS: u32 = 8760;
/// How often each API process purges, before jitter.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(600);
/// Rows one statement deletes at most: small enough that no statement holds locks for long.
pub const BATCH: i64 = 1000;
/// A pause between batches of one run, so a large backlog does not crowd out the append path.
const BETWEEN_BATCHES: Duration = Duration::from_millis(10);

/// How long idempotency records are kept, and how often they are purged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Records older than this many hours are deleted.
    pub hours: u32,
    /// The period of the purge (each wait is 0.75 to 1.25 of it, the first anywhere within it);
    /// tests shorten it.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            hours: DEFAULT_RETENTION_HOURS,
            every: DEFAULT_EVERY,
        }
    }
}

/// What the purge did, for `/metrics`.
#[derive(Debug, Default)]
pub struct PurgeMetrics {
    /// Records deleted by this process.
    pub purged: AtomicU64,
    /// Runs that finished (whether or not they found anything).
    pub runs: AtomicU64,
    /// Runs that failed (Postgres away, ...); the next run tries again.
    pub failures: AtomicU64,
}

/// Deletes every record older than `hours`, in batches of at most [`BATCH`], adding what it
/// deletes to `metrics.purged` as it goes. Returns how many it deleted.
pub async fn purge_expired(
    pool: &PgPool,
    hours: u32,
    metrics: &PurgeMetrics,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        // The cutoff is Postgres's clock, the one `created_at` was written with.
        let deleted = sqlx::query(
            "WITH doomed AS ( \
                 SELECT key_hash FROM idempotency_keys \
                  WHERE created_at < now() - make_interval(hours => $1) \
                  ORDER BY created_at \
                  LIMIT $2 \
                    FOR UPDATE SKIP LOCKED) \
             DELETE FROM idempotency_keys k USING doomed WHERE k.key_hash = doomed.key_hash",
        )
        .bind(i32::try_from(hours).unwrap_or(i32::MAX))
        .bind(BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        metrics.purged.fetch_add(deleted, Relaxed);
        // A short batch: nothing old is left that another purger is not deleting right now.
        if deleted < BATCH as u64 || pool.is_closed() {
            return Ok(total);
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
}

/// `every` scaled by a random factor in `range` (per mille).
fn jittered(every: Duration, range: std::ops::Range<u32>) -> Duration {
    let per_mille = range.start + rand::random::<u32>() % (range.end - range.start).max(1);
    every * per_mille / 1000
}

/// Purges expired records every `retention.every` (jittered) until the pool is closed.
pub async fn purge_periodically(pool: PgPool, retention: Retention, metrics: Arc<PurgeMetrics>) {
    // The first run anywhere within one period: processes restarted together spread out, and a
    // process restarted more often than the period still purges.
    let mut wait = jittered(retention.every, 0..1000);
    loop {
        tokio::time::sleep(wait).await;
        wait = jittered(retention.every, 750..1250);
        if pool.is_closed() {
            return;
        }
        match purge_expired(&pool, retention.hours, &metrics).await {
            Ok(purged) => {
                metrics.runs.fetch_add(1, Relaxed);
                if purged > 0 {
                    tracing::info!(
                        purged,
                        retention_hours = retention.hours,
                        "expired idempotency records purged"
                    );
                } else {
                    tracing::debug!(
                        retention_hours = retention.hours,
                        "no expired idempotency records"
                    );
                }
            }
            Err(e) if pool.is_closed() => {
                tracing::debug!(error = %e, "idempotency purge stopped: shutting down");
                return;
            }
            Err(e) => {
                metrics.failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "idempotency purge failed; the next run tries again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_jittered_within_their_range() {
        let every = Duration::from_secs(600);
        for _ in 0..1000 {
            let first = jittered(every, 0..1000);
            assert!(first < every, "{first:?}");
            let next = jittered(every, 750..1250);
            assert!(
                next >= Duration::from_secs(450) && next < Duration::from_secs(750),
                "{next:?}"
            );
        }
    }
}
