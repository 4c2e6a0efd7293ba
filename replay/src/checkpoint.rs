//! Signed checkpoints: making them from the log, and checking the log against a saved one.

use crate::verify::{Row, ROW_COLUMNS};
use crate::ReadError;
use chrono::{DurationRound, TimeDelta, Utc};
use ledger_events::chain::{entry_hash, merkle_root, GENESIS_HASH};
use ledger_events::checkpoint::{self, Checkpoint};
use serde::Serialize;
use sqlx::PgPool;

const PAGE: i64 = 5_000;

/// Leaf hashes of positions 1..=size recomputed from the rows as they are now (never the stored
/// hash columns, which whoever rewrote a row could have rewritten too), and the chain head at
/// `size`. `None` if the log has fewer than `size` events or a gap.
async fn recompute(
    pool: &PgPool,
    size: i64,
) -> Result<Option<(Vec<[u8; 32]>, [u8; 32])>, ReadError> {
    let mut leaves = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    let mut chain = GENESIS_HASH;
    let mut next = 1;
    while next <= size {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {ROW_COLUMNS} FROM events WHERE global_position >= $1 \
             AND global_position <= $2 ORDER BY global_position LIMIT $3"
        ))
        .bind(next)
        .bind(size)
        .bind(PAGE)
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        for r in rows {
            if r.global_position != next {
                return Ok(None);
            }
            let leaf = r.recomputed_leaf();
            chain = entry_hash(&chain, &leaf);
            leaves.push(leaf);
            next += 1;
        }
    }
    Ok(Some((leaves, chain)))
}

/// Signs a checkpoint of the whole log as it is now and records it. `None` for an empty log.
pub async fn create(pool: &PgPool, seed: &[u8; 32]) -> Result<Option<Checkpoint>, ReadError> {
    let size = crate::head_position(pool).await?;
    if size == 0 {
        return Ok(None);
    }
    let Some((leaves, head)) = recompute(pool, size).await? else {
        return Ok(None);
    };
    let now = Utc::now();
    // Postgres keeps microseconds: sign what can be stored and read back unchanged.
    let now = now
        .duration_trunc(TimeDelta::microseconds(1))
        .unwrap_or(now);
    let cp = checkpoint::sign(
        &checkpoint::signing_key(seed),
        size,
        &merkle_root(&leaves),
        &head,
        now,
    );
    sqlx::query(
        "INSERT INTO log_checkpoints (size, checkpoint) VALUES ($1, $2) ON CONFLICT (size) DO NOTHING",
    )
    .bind(size)
    .bind(serde_json::to_value(&cp).unwrap_or_default())
    .execute(pool)
    .await?;
    Ok(Some(cp))
}

/// The most recent checkpoint the ledger signed.
pub async fn latest(pool: &PgPool) -> Result<Option<Checkpoint>, ReadError> {
    let row: Option<(serde_json::Value,)> =
        sqlx::query_as("SELECT checkpoint FROM log_checkpoints ORDER BY size DESC LIMIT 1")
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|(v,)| serde_json::from_value(v).ok()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgainstReport {
    pub consistent: bool,
    pub size: i64,
    pub reason: Option<String>,
}

/// Checks the log now against a checkpoint saved earlier: its signature, then the Merkle root
/// and chain head of the first `size` events recomputed from the rows.
pub async fn verify_against(pool: &PgPool, cp: &Checkpoint) -> Result<AgainstReport, ReadError> {
    let fail = |reason: String| AgainstReport {
        consistent: false,
        size: cp.size,
        reason: Some(reason),
    };
    if let Err(e) = cp.verify_signature() {
        return Ok(fail(format!("the checkpoint itself is not valid: {e}")));
    }
    let Some((leaves, head)) = recompute(pool, cp.size).await? else {
        return Ok(fail(format!(
            "the log no longer holds {} gapless events",
            cp.size
        )));
    };
    if hex::encode(merkle_root(&leaves)) != cp.merkle_root {
        return Ok(fail(format!(
            "the first {} events no longer have the signed Merkle root: the history was rewritten",
            cp.size
        )));
    }
    if hex::encode(head) != cp.entry_hash {
        return Ok(fail("the chain head at the checkpoint differs".into()));
    }
    Ok(AgainstReport {
        consistent: true,
        size: cp.size,
        reason: None,
    })
}
