//! `verify`: checks that the log is what the append pipeline wrote.
//!
//! Reads every event in global order and checks, stopping at the first break:
//! positions are gapless from 1; each stream's versions are contiguous from 1; each row's
//! `leaf_hash` is SHA-256(0x00 ‖ canonical bytes of the row as stored); each `entry_hash` chains
//! the previous one with the leaf; and `log_head` names the last position and entry hash.
//! An edited payload, a deleted or inserted row, or a moved ciphertext breaks one of these. A
//! superuser who rewrites and re-chains the whole tail is caught only against a checkpoint an
//! auditor kept outside the system: `checkpoint::verify_against` proves by an RFC 9162 consistency
//! proof that the log now extends it.

use crate::ReadError;
use chrono::{DateTime, Utc};
use ledger_events::chain::{entry_hash, leaf_hash, HashedRow, GENESIS_HASH};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::HashMap;
use uuid::Uuid;

/// Rows read per round trip.
const PAGE: i64 = 5_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub intact: bool,
    /// Events checked before the first break (all of them when intact).
    pub checked: i64,
    pub first_broken_position: Option<i64>,
    /// What broke there, for a human.
    pub reason: Option<String>,
    /// The log head's position as stored.
    pub head: i64,
}

/// A stored event with its hash columns: what verify and checkpoints recompute from.
#[derive(sqlx::FromRow)]
pub(crate) struct Row {
    pub(crate) global_position: i64,
    event_id: Uuid,
    stream_id: String,
    stream_version: i64,
    event_type: String,
    schema_version: i32,
    payload: serde_json::Value,
    metadata: serde_json::Value,
    recorded_at: DateTime<Utc>,
    leaf_hash: Vec<u8>,
    entry_hash: Vec<u8>,
}

/// The columns `Row` reads, in order.
pub(crate) const ROW_COLUMNS: &str = "global_position, event_id, stream_id, stream_version, \
     event_type, schema_version, payload, metadata, recorded_at, leaf_hash, entry_hash";

impl Row {
    /// The leaf hash recomputed from the row as stored (never the stored hash column).
    pub(crate) fn recomputed_leaf(&self) -> [u8; 32] {
        leaf_hash(&HashedRow {
            global_position: self.global_position,
            event_id: self.event_id,
            stream_id: &self.stream_id,
            stream_version: self.stream_version,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            payload: &self.payload,
            metadata: &self.metadata,
            recorded_at: self.recorded_at,
        })
    }
}

pub async fn verify(pool: &PgPool) -> Result<VerifyReport, ReadError> {
    let (head, head_hash): (i64, Vec<u8>) =
        sqlx::query_as("SELECT position, entry_hash FROM log_head")
            .fetch_one(pool)
            .await?;
    let mut versions: HashMap<String, i64> = HashMap::new();
    let mut chain = GENESIS_HASH;
    let mut expected = 1i64;
    let mut checked = 0i64;
    let broken = |at: i64, checked: i64, reason: String| VerifyReport {
        intact: false,
        checked,
        first_broken_position: Some(at),
        reason: Some(reason),
        head,
    };
    loop {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {ROW_COLUMNS} FROM events WHERE global_position >= $1 \
             ORDER BY global_position LIMIT $2"
        ))
        .bind(expected)
        .bind(PAGE)
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            if r.global_position != expected {
                return Ok(broken(
                    expected,
                    checked,
                    format!(
                        "position {expected} is missing (next is {})",
                        r.global_position
                    ),
                ));
            }
            let version = versions.entry(r.stream_id.clone()).or_insert(0);
            if r.stream_version != *version + 1 {
                return Ok(broken(
                    expected,
                    checked,
                    format!(
                        "{} jumps from version {} to {}",
                        r.stream_id, version, r.stream_version
                    ),
                ));
            }
            *version = r.stream_version;
            let leaf = r.recomputed_leaf();
            if leaf.as_slice() != r.leaf_hash.as_slice() {
                return Ok(broken(
                    expected,
                    checked,
                    "the row does not match its leaf hash (altered)".into(),
                ));
            }
            chain = entry_hash(&chain, &leaf);
            if chain.as_slice() != r.entry_hash.as_slice() {
                return Ok(broken(
                    expected,
                    checked,
                    "the entry hash does not chain from the previous one".into(),
                ));
            }
            checked += 1;
            expected += 1;
        }
    }
    if head != expected - 1 || (head > 0 && head_hash.as_slice() != chain.as_slice()) {
        return Ok(broken(
            expected,
            checked,
            format!(
                "the log head names position {head}, the log ends at {}",
                expected - 1
            ),
        ));
    }
    Ok(VerifyReport {
        intact: true,
        checked,
        first_broken_position: None,
        reason: None,
        head,
    })
}
