//! Signed checkpoints: making them from the log, proving the log's growth between them, and
//! checking the log against a saved one.
//!
//! Every proof here is built from leaf hashes recomputed from the rows as they are now (never the
//! stored hash columns, which whoever rewrote a row could have rewritten too), read in order: O(n)
//! rows for a tree of n events. The obvious next step, when logs grow large, is to store the roots
//! of complete subtrees as the log grows, so a proof needs O(log n) of them instead of every row.

use crate::verify::{Row, ROW_COLUMNS};
use crate::ReadError;
use chrono::{DurationRound, TimeDelta, Utc};
use ledger_events::chain::{
    consistency_path, entry_hash, inclusion_path, merkle_root, verify_consistency, Hash,
    GENESIS_HASH,
};
use ledger_events::checkpoint::{self, Checkpoint};
use serde::Serialize;
use sqlx::PgPool;

const PAGE: i64 = 5_000;

/// Leaf hashes of positions 1..=`up_to`, recomputed from the rows, up to the first gap: the
/// gapless prefix of the log (shorter than `up_to` if the log is shorter or has a gap).
pub async fn leaves(pool: &PgPool, up_to: i64) -> Result<Vec<Hash>, ReadError> {
    let mut leaves = Vec::with_capacity(usize::try_from(up_to.min(1 << 20)).unwrap_or(0));
    let mut next = 1;
    while next <= up_to {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {ROW_COLUMNS} FROM events WHERE global_position >= $1 \
             AND global_position <= $2 ORDER BY global_position LIMIT $3"
        ))
        .bind(next)
        .bind(up_to)
        .bind(PAGE)
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            if r.global_position != next {
                return Ok(leaves);
            }
            leaves.push(r.recomputed_leaf());
            next += 1;
        }
    }
    Ok(leaves)
}

/// The chain's entry hash after these leaves.
fn chain_head(leaves: &[Hash]) -> Hash {
    leaves
        .iter()
        .fold(GENESIS_HASH, |prev, leaf| entry_hash(&prev, leaf))
}

/// A number of leaves as a tree size.
fn as_size(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Signs a checkpoint of the whole log as it is now and records it. `None` for an empty log, or
/// one with a gap (which `verify` names).
pub async fn create(pool: &PgPool, seed: &[u8; 32]) -> Result<Option<Checkpoint>, ReadError> {
    let size = crate::head_position(pool).await?;
    if size == 0 {
        return Ok(None);
    }
    let leaves = leaves(pool, size).await?;
    if as_size(leaves.len()) != size {
        return Ok(None);
    }
    let now = Utc::now();
    // Postgres keeps microseconds: sign what can be stored and read back unchanged.
    let now = now
        .duration_trunc(TimeDelta::microseconds(1))
        .unwrap_or(now);
    let cp = checkpoint::sign(
        &checkpoint::signing_key(seed),
        size,
        &merkle_root(&leaves),
        &chain_head(&leaves),
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

/// Why a proof cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ProofRequestError {
    /// Sizes the proofs are not defined for (the HTTP layer refuses them first, naming the field).
    #[error("{0}")]
    Invalid(&'static str),
    /// The log has no tree that large: it is shorter, or has a gap before `requested`.
    #[error("the log holds {holds} gapless events, no tree of size {requested}")]
    BeyondLog { requested: i64, holds: i64 },
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// RFC 9162 consistency proof between two tree sizes of the log, hashes in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsistencyProof {
    pub first: i64,
    pub second: i64,
    pub consistency_path: Vec<String>,
}

/// RFC 9162 inclusion proof of one event in a tree size of the log, hashes in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InclusionProof {
    /// The event's global position (1-based).
    pub position: i64,
    /// RFC 9162's 0-based leaf index: `position - 1`.
    pub leaf_index: i64,
    pub tree_size: i64,
    /// The event's leaf hash, recomputed from its row.
    pub leaf_hash: String,
    pub inclusion_path: Vec<String>,
}

async fn tree(pool: &PgPool, size: i64) -> Result<Vec<Hash>, ProofRequestError> {
    let leaves = leaves(pool, size).await?;
    if as_size(leaves.len()) < size {
        return Err(ProofRequestError::BeyondLog {
            requested: size,
            holds: as_size(leaves.len()),
        });
    }
    Ok(leaves)
}

fn hex_all(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(hex::encode).collect()
}

/// The proof that the log's first `first` events are a prefix of its first `second`: what an
/// auditor holding checkpoints of those two sizes checks with [`verify_consistency`].
pub async fn consistency(
    pool: &PgPool,
    first: i64,
    second: i64,
) -> Result<ConsistencyProof, ProofRequestError> {
    if first < 1 {
        return Err(ProofRequestError::Invalid("first must be 1 or more"));
    }
    if first > second {
        return Err(ProofRequestError::Invalid("first must not exceed second"));
    }
    let leaves = tree(pool, second).await?;
    let path = usize::try_from(first)
        .ok()
        .and_then(|m| consistency_path(&leaves, m))
        .ok_or(ProofRequestError::Invalid("first must not exceed second"))?;
    Ok(ConsistencyProof {
        first,
        second,
        consistency_path: hex_all(&path),
    })
}

/// The audit path of the event at `position` in the log's first `tree_size` events.
pub async fn inclusion(
    pool: &PgPool,
    position: i64,
    tree_size: i64,
) -> Result<InclusionProof, ProofRequestError> {
    if position < 1 {
        return Err(ProofRequestError::Invalid("position must be 1 or more"));
    }
    if position > tree_size {
        return Err(ProofRequestError::Invalid(
            "position must not exceed tree_size",
        ));
    }
    let leaves = tree(pool, tree_size).await?;
    let index = usize::try_from(position - 1)
        .map_err(|_| ProofRequestError::Invalid("position must be 1 or more"))?;
    let path = inclusion_path(&leaves, index).ok_or(ProofRequestError::Invalid(
        "position must not exceed tree_size",
    ))?;
    Ok(InclusionProof {
        position,
        leaf_index: position - 1,
        tree_size,
        leaf_hash: hex::encode(leaves[index]),
        inclusion_path: hex_all(&path),
    })
}

/// The check of `verify --against` that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgainstCheck {
    /// The saved checkpoint's Ed25519 signature does not verify, or it is malformed.
    Signature,
    /// It is signed, but not by the key the ledger publishes (or the one the auditor pinned).
    PublicKey,
    /// The log no longer holds the events the checkpoint covers (or that the ledger signed later).
    Truncated,
    /// The consistency proof from the saved tree to the log now does not verify: events the
    /// checkpoint covers were changed.
    ConsistencyProof,
    /// The chain's entry hash at the checkpoint's size differs from the signed one.
    ChainHead,
    /// The ledger's own latest signed checkpoint does not follow from the saved one by a
    /// consistency proof over the rows: events after the saved size were changed since.
    LatestCheckpoint,
}

impl AgainstCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            AgainstCheck::Signature => "signature",
            AgainstCheck::PublicKey => "public key",
            AgainstCheck::Truncated => "truncated",
            AgainstCheck::ConsistencyProof => "consistency proof",
            AgainstCheck::ChainHead => "chain head",
            AgainstCheck::LatestCheckpoint => "latest checkpoint",
        }
    }
}

/// Where the key a saved checkpoint must be signed by came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// Given by the auditor (`--public-key`), who pinned it when they first trusted the ledger.
    Pinned,
    /// The key of the ledger's latest signed checkpoint, as `/v1/audit/checkpoints/latest`
    /// publishes it.
    Published,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgainstReport {
    /// Whether the log now extends the saved checkpoint.
    pub consistent: bool,
    /// The saved checkpoint's size.
    pub size: i64,
    /// Gapless events the log holds now: the second tree of the proof.
    pub current_size: i64,
    /// Hex Merkle root of those events, recomputed from the rows.
    pub current_root: Option<String>,
    /// Hex Ed25519 key the signature had to verify under.
    pub public_key: Option<String>,
    pub key_source: Option<KeySource>,
    /// The consistency proof from `size` to `current_size`, hex, as checked.
    pub consistency_path: Vec<String>,
    /// The ledger's latest signed checkpoint, when it is larger than the saved one and was also
    /// proven to extend it.
    pub latest_checkpoint_size: Option<i64>,
    pub failed: Option<AgainstCheck>,
    /// The first position known to be broken, when the checks can tell (a truncation). A
    /// rewritten event is only known to lie within the tree whose root no longer matches; the
    /// chain check (`verify`) names it unless the chain was rewritten too.
    pub first_broken_position: Option<i64>,
    /// What broke, for a human.
    pub reason: Option<String>,
}

fn fail(
    mut report: AgainstReport,
    check: AgainstCheck,
    reason: String,
    at: Option<i64>,
) -> Result<AgainstReport, ReadError> {
    report.failed = Some(check);
    report.reason = Some(reason);
    report.first_broken_position = at;
    Ok(report)
}

fn decode_hash(hex_str: &str) -> Option<Hash> {
    hex::decode(hex_str).ok()?.try_into().ok()
}

/// Checks the log now against a checkpoint saved earlier: its signature under the key the ledger
/// publishes (or `pinned_key`), then an RFC 9162 consistency proof from the saved tree to the log
/// as it is now, verified against the saved root and the root of the rows now; and if the ledger
/// has signed a larger checkpoint since, the proof from the saved tree to that one too. The rows
/// themselves (positions, versions, chain) are `verify`'s concern.
pub async fn verify_against(
    pool: &PgPool,
    saved: &Checkpoint,
    pinned_key: Option<&str>,
) -> Result<AgainstReport, ReadError> {
    let mut report = AgainstReport {
        consistent: false,
        size: saved.size,
        current_size: 0,
        current_root: None,
        public_key: None,
        key_source: None,
        consistency_path: Vec::new(),
        latest_checkpoint_size: None,
        failed: None,
        first_broken_position: None,
        reason: None,
    };
    // 1. The signature, under the key the auditor trusts.
    if let Err(e) = saved.verify_signature() {
        return fail(report, AgainstCheck::Signature, e.to_string(), None);
    }
    let ledger_latest = latest(pool).await?;
    let (expected, source) =
        match (pinned_key, &ledger_latest) {
            (Some(k), _) => (k.to_ascii_lowercase(), KeySource::Pinned),
            (None, Some(l)) => (l.public_key.to_ascii_lowercase(), KeySource::Published),
            (None, None) => return fail(
                report,
                AgainstCheck::PublicKey,
                "the ledger has no signed checkpoint, so publishes no key to check the signature \
                 against: pass the key you pinned (--public-key)"
                    .into(),
                None,
            ),
        };
    report.public_key = Some(expected.clone());
    report.key_source = Some(source);
    if saved.public_key.to_ascii_lowercase() != expected {
        return fail(
            report,
            AgainstCheck::PublicKey,
            format!(
                "the checkpoint is signed by {}, not by the {} key {expected}",
                saved.public_key,
                match source {
                    KeySource::Pinned => "pinned",
                    KeySource::Published => "ledger's published",
                }
            ),
            None,
        );
    }
    let (Some(saved_root), Some(saved_entry)) = (
        decode_hash(&saved.merkle_root),
        decode_hash(&saved.entry_hash),
    ) else {
        return fail(
            report,
            AgainstCheck::Signature,
            "malformed checkpoint: merkle_root and entry_hash must be 32 bytes of hex".into(),
            None,
        );
    };
    let Ok(m) = usize::try_from(saved.size) else {
        return fail(
            report,
            AgainstCheck::ConsistencyProof,
            format!("a checkpoint of size {} proves nothing", saved.size),
            None,
        );
    };

    // 2. The log now, from its rows.
    let head = crate::head_position(pool).await?;
    // Past the head too: rows beyond a head moved back still count (and `verify` flags the head).
    let reach = head
        .max(saved.size)
        .max(ledger_latest.as_ref().map_or(0, |l| l.size));
    let leaves = leaves(pool, reach).await?;
    let n = leaves.len();
    report.current_size = as_size(n);
    let current_root = merkle_root(&leaves);
    report.current_root = Some(hex::encode(current_root));
    if n < m {
        return fail(
            report,
            AgainstCheck::Truncated,
            format!(
                "the checkpoint covers {} events, the log holds {n} gapless ones: position {} \
                 and after are gone",
                saved.size,
                n + 1
            ),
            Some(as_size(n) + 1),
        );
    }

    // 3. The consistency proof from the saved tree to the tree now, checked against the saved
    //    root (which only the auditor's copy vouches for) and the root of the rows now.
    let Some(path) = consistency_path(&leaves, m) else {
        return fail(
            report,
            AgainstCheck::ConsistencyProof,
            format!("a checkpoint of size {} proves nothing", saved.size),
            None,
        );
    };
    report.consistency_path = hex_all(&path);
    if let Err(e) = verify_consistency(m as u64, n as u64, &saved_root, &current_root, &path) {
        return fail(
            report,
            AgainstCheck::ConsistencyProof,
            format!(
                "the consistency proof from size {m} to {n} does not verify ({e}): at least one \
                 of positions 1..={m} was changed after the checkpoint was signed"
            ),
            None,
        );
    }
    if chain_head(&leaves[..m]) != saved_entry {
        return fail(
            report,
            AgainstCheck::ChainHead,
            format!("the chain's entry hash at position {m} differs from the signed one"),
            None,
        );
    }

    // 4. The ledger's own latest signed checkpoint, if it covers more: events after the saved
    //    size were signed once too, and must still have the root the ledger signed.
    if let Some(l) =
        ledger_latest.filter(|l| l.size > saved.size && l.public_key == saved.public_key)
    {
        report.latest_checkpoint_size = Some(l.size);
        if let Err(e) = l.verify_signature() {
            return fail(
                report,
                AgainstCheck::LatestCheckpoint,
                format!(
                    "the ledger's latest checkpoint (size {}) is not validly signed: {e}",
                    l.size
                ),
                None,
            );
        }
        let Some(l_root) = decode_hash(&l.merkle_root) else {
            return fail(
                report,
                AgainstCheck::LatestCheckpoint,
                "the ledger's latest checkpoint has a malformed merkle_root".into(),
                None,
            );
        };
        let Ok(l_size) = usize::try_from(l.size) else {
            return fail(
                report,
                AgainstCheck::LatestCheckpoint,
                "the ledger's latest checkpoint has a negative size".into(),
                None,
            );
        };
        if l_size > n {
            return fail(
                report,
                AgainstCheck::Truncated,
                format!(
                    "the ledger signed {l_size} events, the log holds {n} gapless ones: position {} \
                     and after are gone",
                    n + 1
                ),
                Some(as_size(n) + 1),
            );
        }
        let path = consistency_path(&leaves[..l_size], m).unwrap_or_default();
        if let Err(e) = verify_consistency(m as u64, l_size as u64, &saved_root, &l_root, &path) {
            return fail(
                report,
                AgainstCheck::LatestCheckpoint,
                format!(
                    "the ledger's latest checkpoint (size {l_size}) does not follow from the saved \
                     one over the rows now ({e}): at least one of positions {}..={l_size} was \
                     changed after it was signed",
                    m + 1
                ),
                None,
            );
        }
    }
    report.consistent = true;
    Ok(report)
}
