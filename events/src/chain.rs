//! Canonical encoding and the hash chain that make the event log tamper-evident.
//!
//! Each stored event gets `leaf_hash = SHA-256(0x00 ‖ canonical bytes of the row)` and
//! `entry_hash = SHA-256(prev_entry_hash ‖ leaf_hash)`, the first event chaining from
//! [`GENESIS_HASH`]. Editing, inserting, deleting or reordering any row changes every later entry
//! hash. [`merkle_root`] folds the same leaf hashes into an RFC 9162 tree head for checkpoints;
//! [`inclusion_path`] and [`consistency_path`] prove a leaf is in a tree and a tree is a prefix of
//! a later one, and [`verify_inclusion`] and [`verify_consistency`] check such proofs knowing only
//! the roots (RFC 9162 §2.1.3 and §2.1.4), which is what an outside auditor holding two signed
//! checkpoints needs.
//!
//! The canonical bytes are RFC 8785 (JCS) JSON of the row *as stored*: Postgres `jsonb` drops
//! whitespace, reorders keys and may renormalise numbers, so hashing the bytes we sent would not
//! verify against the bytes we read back. Hashing the canonical form of the parsed value does.

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The previous entry hash of the first event.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// RFC 9162 domain separation: a leaf hash can never equal an interior node hash.
const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// RFC 8785 (JCS) canonical JSON: object keys sorted by UTF-16 code units, no whitespace, strings escaped as JCS requires
/// (only \" \\ \b \f \n \r \t and \u00XX lowercase for other control chars; everything else literal UTF-8),
/// numbers: integers as plain decimal; non-integer numbers use the ECMAScript shortest round-trip form.
///
/// One deliberate deviation: JCS treats every number as an IEEE-754 double, so an integer beyond
/// ±2^53 would be rounded. Such integers are written exactly instead, because rounding would let
/// two different amounts hash the same. Within ±2^53 (every integer our payloads carry) the output
/// is identical to JCS. Floats follow JCS exactly, including `-0` → `0` and the exponent rules.
/// Keep floats out of hashed payloads all the same: serde_json (without its `float_roundtrip`
/// feature) may parse a decimal one ulp off, so a float written and read back can hash differently.
///
/// Nesting is handled by recursion; values parsed by `serde_json` are at most 128 levels deep.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(&mut out, value);
    out
}

/// The columns of a stored event row that the leaf hash covers.
#[derive(Clone, Copy, Debug)]
pub struct HashedRow<'a> {
    pub global_position: i64,
    pub event_id: Uuid,
    pub stream_id: &'a str,
    pub stream_version: i64,
    pub event_type: &'a str,
    pub schema_version: i32,
    pub payload: &'a Value,
    pub metadata: &'a Value,
    pub recorded_at: DateTime<Utc>,
}

/// Canonical bytes of the row as a JSON object with the [`HashedRow`] field names as keys.
///
/// `recorded_at` is RFC 3339 UTC with exactly 6 fractional digits and `Z`; anything below a
/// microsecond is truncated because Postgres `timestamptz` does not store it, and a row must hash
/// the same before insert and after read-back. `event_id` is the lowercase hyphenated uuid.
pub fn row_bytes(row: &HashedRow<'_>) -> Vec<u8> {
    let (payload, metadata) = (canonical_json(row.payload), canonical_json(row.metadata));
    let mut out = Vec::new();
    canonical_row_bytes(
        &CanonicalRow {
            global_position: row.global_position,
            event_id: row.event_id,
            stream_id: row.stream_id,
            stream_version: row.stream_version,
            event_type: row.event_type,
            schema_version: row.schema_version,
            payload: &payload,
            metadata: &metadata,
            recorded_at: row.recorded_at,
        },
        &mut out,
    );
    out
}

/// [`canonical_json`] as a string (the canonical form is UTF-8 by construction).
pub fn canonical_json_string(value: &Value) -> String {
    String::from_utf8(canonical_json(value)).unwrap_or_else(|e| {
        // Unreachable: every byte written comes from a `str` or is ASCII. Stay correct anyway.
        String::from_utf8_lossy(e.as_bytes()).into_owned()
    })
}

/// A row whose payload and metadata are already in canonical form ([`canonical_json`]), so the
/// append writer only assembles and hashes: the costly walk over the values is done once, by
/// the task that submitted them, off the writer's path.
#[derive(Clone, Copy, Debug)]
pub struct CanonicalRow<'a> {
    pub global_position: i64,
    pub event_id: Uuid,
    pub stream_id: &'a str,
    pub stream_version: i64,
    pub event_type: &'a str,
    pub schema_version: i32,
    /// `canonical_json(payload)`.
    pub payload: &'a [u8],
    /// `canonical_json(metadata)`.
    pub metadata: &'a [u8],
    pub recorded_at: DateTime<Utc>,
}

/// The canonical bytes of the row ([`row_bytes`]), written into `out` (cleared first, so one
/// buffer serves a whole batch): the JCS form of the object with the [`HashedRow`] field names as
/// keys, written out member by member. They are in JCS order already: all keys are ASCII, where
/// UTF-16 order is byte order (tested against the generic object writer).
pub fn canonical_row_bytes(row: &CanonicalRow<'_>, out: &mut Vec<u8>) {
    use std::io::Write as _;
    out.clear();
    out.extend_from_slice(b"{\"event_id\":\"");
    let mut id = Uuid::encode_buffer();
    out.extend_from_slice(row.event_id.hyphenated().encode_lower(&mut id).as_bytes());
    out.extend_from_slice(b"\",\"event_type\":");
    write_string(out, row.event_type);
    let _ = write!(
        out,
        ",\"global_position\":{},\"metadata\":",
        row.global_position
    );
    out.extend_from_slice(row.metadata);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(row.payload);
    out.extend_from_slice(b",\"recorded_at\":");
    write_string(
        out,
        &row.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
    );
    let _ = write!(
        out,
        ",\"schema_version\":{},\"stream_id\":",
        row.schema_version
    );
    write_string(out, row.stream_id);
    let _ = write!(out, ",\"stream_version\":{}}}", row.stream_version);
}

/// [`leaf_hash`] of a [`CanonicalRow`]; `buf` is scratch space reused across rows.
pub fn canonical_leaf_hash(row: &CanonicalRow<'_>, buf: &mut Vec<u8>) -> [u8; 32] {
    canonical_row_bytes(row, buf);
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(&buf[..]);
    hasher.finalize().into()
}

pub fn leaf_hash(row: &HashedRow<'_>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(row_bytes(row));
    hasher.finalize().into()
}

pub fn entry_hash(prev_entry_hash: &[u8; 32], leaf_hash: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev_entry_hash);
    hasher.update(leaf_hash);
    hasher.finalize().into()
}

/// A SHA-256 digest: a leaf hash or an interior node of the Merkle tree.
pub type Hash = [u8; 32];

/// RFC 9162 Merkle tree hash over leaf hashes (MTH with 0x01 interior prefix), for signed checkpoints.
///
/// The leaves are already `SHA-256(0x00 ‖ data)`, so a one-leaf tree's root is that leaf. The
/// empty tree's root is `SHA-256("")`.
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    match leaves {
        [] => Sha256::digest([]).into(),
        [leaf] => *leaf,
        _ => {
            let (left, right) = leaves.split_at(split(leaves.len()));
            node_hash(&merkle_root(left), &merkle_root(right))
        }
    }
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// RFC 9162 §2.1.1: the largest power of two strictly below `n` (for `n >= 2`). Splitting there
/// keeps the left subtree perfect, which is what makes roots of prefixes provably consistent.
fn split(n: usize) -> usize {
    n.next_power_of_two() / 2
}

/// Why a proof does not verify. Only `Ok` proves anything; every error means "not proven".
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// RFC 9162 defines consistency proofs for `0 < first`: every tree is an extension of the
    /// empty one, so a proof from size 0 would prove nothing.
    #[error("a proof from the empty tree (size 0) proves nothing")]
    EmptyFirstTree,
    #[error("the first tree (size {first}) is larger than the second (size {second})")]
    FirstLargerThanSecond { first: u64, second: u64 },
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("the proof has the wrong number of hashes for these tree sizes")]
    WrongLength,
    #[error("two trees of the same size with different roots")]
    SameSizeDifferentRoots,
    #[error("the proof does not lead to the first root")]
    FirstRootMismatch,
    #[error("the proof does not lead to the second root")]
    SecondRootMismatch,
    #[error("the proof does not lead to the root")]
    RootMismatch,
}

/// The inclusion proof (audit path) of leaf `index` in the tree over `leaves`: RFC 9162 §2.1.3.1
/// `PATH(index, D[n])`, siblings ordered from the leaf up. `None` if `index` is not below `n`.
///
/// Computes each sibling subtree's root from the leaves: O(n) hashes.
pub fn inclusion_path(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut path = Vec::new();
    path_into(leaves, index, &mut path);
    Some(path)
}

fn path_into(leaves: &[Hash], m: usize, out: &mut Vec<Hash>) {
    // PATH(0, {d(0)}) = {}
    if leaves.len() <= 1 {
        return;
    }
    let k = split(leaves.len());
    let (left, right) = leaves.split_at(k);
    if m < k {
        // PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n])
        path_into(left, m, out);
        out.push(merkle_root(right));
    } else {
        // PATH(m, D[n]) = PATH(m - k, D[k:n]) : MTH(D[0:k])
        path_into(right, m - k, out);
        out.push(merkle_root(left));
    }
}

/// The consistency proof from the tree over the first `first` leaves to the tree over all of
/// `leaves`: RFC 9162 §2.1.4.1 `PROOF(first, D[n]) = SUBPROOF(first, D[n], true)`. Empty when
/// `first == n` (the trees are the same); `None` when `first` is 0 or larger than `n`.
///
/// Computes each subtree root it needs from the leaves: O(n) hashes.
pub fn consistency_path(leaves: &[Hash], first: usize) -> Option<Vec<Hash>> {
    if first == 0 || first > leaves.len() {
        return None;
    }
    let mut path = Vec::new();
    subproof(first, leaves, true, &mut path);
    Some(path)
}

/// `b` says whether the subtree `leaves` is the original first tree's whole left edge, whose
/// root the verifier already holds.
fn subproof(m: usize, leaves: &[Hash], b: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        // SUBPROOF(m, D[m], true) = {}; SUBPROOF(m, D[m], false) = {MTH(D[m])}
        if !b {
            out.push(merkle_root(leaves));
        }
        return;
    }
    // m < n, and m >= 1 on every call, so n >= 2 here.
    let k = split(n);
    let (left, right) = leaves.split_at(k);
    if m <= k {
        // SUBPROOF(m, D[n], b) = SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
        subproof(m, left, b, out);
        out.push(merkle_root(right));
    } else {
        // SUBPROOF(m, D[n], b) = SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
        subproof(m - k, right, false, out);
        out.push(merkle_root(left));
    }
}

/// Checks that `leaf` is the leaf at `index` (0-based) of the tree of `size` leaves whose root is
/// `root`, given its audit path: the algorithm of RFC 9162 §2.1.3.2, step by step.
///
/// The proof binds the leaf to the root, not the size: take `size` and `root` from the same
/// signed checkpoint.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    path: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    // 1. leaf_index >= tree_size fails.
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    // 2. fn = leaf_index, sn = tree_size - 1. 3. r = hash.
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    // 4. For each p in the inclusion path:
    for p in path {
        // a. sn == 0: the path is longer than the tree is deep.
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        // b. p is a left sibling if fn is a right child or the last node of its level.
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        // c. Up one level.
        fn_ >>= 1;
        sn >>= 1;
    }
    // 5. sn == 0 and r == root.
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `first` leaves with root `first_root` is a prefix of the tree of
/// `second` leaves with root `second_root`, given the consistency proof: the algorithm of RFC 9162
/// §2.1.4.2, step by step, for `0 < first < second`.
///
/// Outside that range: `first == 0` is refused (RFC 9162 defines no such proof, and it would prove
/// nothing); `first == second` holds exactly when the proof is empty (`SUBPROOF(m, D[m], true) =
/// {}`) and the roots are equal; `first > second` is refused.
///
/// The proof binds the roots, not the sizes: a proof can verify under other sizes whose trees have
/// the same shape (`(4, 5)` and `(4, 6)` with the same roots, say). Take each size and root from
/// the same signed checkpoint.
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    path: &[Hash],
) -> Result<(), ProofError> {
    if first == 0 {
        return Err(ProofError::EmptyFirstTree);
    }
    if first > second {
        return Err(ProofError::FirstLargerThanSecond { first, second });
    }
    if first == second {
        if !path.is_empty() {
            return Err(ProofError::WrongLength);
        }
        if first_root != second_root {
            return Err(ProofError::SameSizeDifferentRoots);
        }
        return Ok(());
    }
    // 1. An empty path fails.
    if path.is_empty() {
        return Err(ProofError::WrongLength);
    }
    // 2. If first is an exact power of 2, prepend first_hash: the first tree is then a perfect
    //    subtree of the second, and its root the proof's starting point.
    let prepended: Vec<Hash>;
    let path = if first.is_power_of_two() {
        prepended = std::iter::once(*first_root)
            .chain(path.iter().copied())
            .collect();
        &prepended[..]
    } else {
        path
    };
    // 3. fn = first - 1, sn = second - 1.
    let (mut fn_, mut sn) = (first - 1, second - 1);
    // 4. If LSB(fn) is set, right-shift both until it is not.
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    // 5. fr = sr = the first value of the path.
    let (mut fr, mut sr) = (path[0], path[0]);
    // 6. For each subsequent value c:
    for c in &path[1..] {
        // a. sn == 0: the path is longer than the second tree is deep.
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        // b. c is a left sibling of both the first and the second tree's node...
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            // ...or a right sibling that only the second tree has.
            sr = node_hash(&sr, c);
        }
        // c. Up one level.
        fn_ >>= 1;
        sn >>= 1;
    }
    // 7. fr == first_hash, sr == second_hash and sn == 0.
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if fr != *first_root {
        return Err(ProofError::FirstRootMismatch);
    }
    if sr != *second_root {
        return Err(ProofError::SecondRootMismatch);
    }
    Ok(())
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            write_object(out, map.iter().map(|(k, v)| (Cow::Borrowed(k.as_str()), v)));
        }
    }
}

fn write_object<'v>(out: &mut Vec<u8>, members: impl Iterator<Item = (Cow<'v, str>, &'v Value)>) {
    let mut members: Vec<_> = members.collect();
    // JCS orders by UTF-16 code units, not by code points or UTF-8 bytes: they differ once a key
    // holds characters above U+FFFF next to ones in U+E000..U+FFFF.
    members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
    out.push(b'{');
    for (i, (key, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, key);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    // Every byte that needs escaping is ASCII, and ASCII bytes never occur inside a multi-byte
    // UTF-8 sequence, so a byte-wise scan copies all other characters through intact. Runs that
    // need no escaping are copied whole.
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        run = i + 1;
        if escaped.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0x0f)]);
        } else {
            out.extend_from_slice(escaped);
        }
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

fn write_number(out: &mut Vec<u8>, n: &Number) {
    if let Some(i) = n.as_i64() {
        out.extend_from_slice(i.to_string().as_bytes());
    } else if let Some(u) = n.as_u64() {
        out.extend_from_slice(u.to_string().as_bytes());
    } else if let Some(f) = n.as_f64() {
        out.extend_from_slice(es_number_to_string(f).as_bytes());
    } else {
        // Unreachable without serde_json's `arbitrary_precision`; its own text is the best
        // deterministic fallback.
        out.extend_from_slice(n.to_string().as_bytes());
    }
}

/// ECMAScript `Number.prototype.toString` (ECMA-262 §6.1.6.1.20) for a finite double, which
/// RFC 8785 §3.2.2.3 adopts for JSON numbers.
fn es_number_to_string(x: f64) -> String {
    if x == 0.0 {
        // Covers -0 too: ECMAScript prints both zeros as "0".
        return "0".to_owned();
    }
    if !x.is_finite() {
        // serde_json::Number cannot hold NaN or infinities; JSON.stringify would print null.
        return "null".to_owned();
    }
    let Some((digits, exponent)) = shortest_digits(x.abs()) else {
        return format!("{x:e}");
    };
    // ECMAScript's value = 0.d1d2..dk × 10^n, one more than the scientific exponent.
    let k = digits.len() as i32;
    let n = exponent + 1;

    let mut s = String::with_capacity(digits.len() + 8);
    if x < 0.0 {
        s.push('-');
    }
    if k <= n && n <= 21 {
        s.push_str(&digits);
        s.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        let (int, frac) = digits.split_at(n as usize);
        s.push_str(int);
        s.push('.');
        s.push_str(frac);
    } else if -6 < n && n <= 0 {
        s.push_str("0.");
        s.extend(std::iter::repeat_n('0', (-n) as usize));
        s.push_str(&digits);
    } else {
        let (first, rest) = digits.split_at(1);
        s.push_str(first);
        if !rest.is_empty() {
            s.push('.');
            s.push_str(rest);
        }
        let e = n - 1;
        s.push('e');
        s.push(if e < 0 { '-' } else { '+' });
        s.push_str(&e.abs().to_string());
    }
    s
}

/// The shortest decimal digits that round-trip to `x` (> 0) and the scientific exponent of the
/// first digit, chosen as ECMAScript requires.
fn shortest_digits(x: f64) -> Option<(String, i32)> {
    // Rust's `{:e}` gives the shortest round-tripping digits, closest to `x` among those.
    let (digits, exponent) = split_scientific(&format!("{x:e}"))?;
    if digits.bytes().last()? % 2 == 0 {
        return Some((digits, exponent));
    }
    // When `x` lies exactly halfway between two shortest candidates, Rust picks the upper one,
    // but ECMAScript picks the one with an even last digit (RFC 8785 Appendix B, "round to
    // even"). That happens only if x's exact expansion is those digits followed by a single 5.
    // 800 digits always print a double exactly (its expansion has at most 767).
    let (exact, exact_exponent) = split_scientific(&format!("{x:.800e}"))?;
    let exact = exact.trim_end_matches('0');
    let (lower, tail) = exact.split_at(exact.len().checked_sub(1)?);
    if tail != "5" || lower.len() != digits.len() {
        return Some((digits, exponent));
    }
    let candidate = if lower.bytes().last()? % 2 == 0 {
        lower.to_owned()
    } else {
        increment_digits(lower)?
    };
    let (first, rest) = candidate.split_at(1);
    let round_trips = format!("{first}.{rest}e{exact_exponent}").parse::<f64>() == Ok(x);
    Some(if round_trips {
        (candidate, exact_exponent)
    } else {
        (digits, exponent)
    })
}

/// Splits Rust's `{:e}` output ("d.ddde-N") into its digits without the point and the exponent.
fn split_scientific(sci: &str) -> Option<(String, i32)> {
    let (mantissa, exponent) = sci.split_once('e')?;
    let digits = mantissa.chars().filter(|c| *c != '.').collect();
    Some((digits, exponent.parse().ok()?))
}

/// Adds one unit in the last place; `None` when it would carry into a new leading digit (the
/// result would then have a different length, so it is not a same-length candidate).
fn increment_digits(digits: &str) -> Option<String> {
    let mut bytes = digits.as_bytes().to_vec();
    for b in bytes.iter_mut().rev() {
        if *b == b'9' {
            *b = b'0';
        } else {
            *b += 1;
            return String::from_utf8(bytes).ok();
        }
    }
    None
}

#[cfg(test)]
// A failed unwrap is a failed test; the lint guards production code paths.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;
    use serde_json::json;

    fn jcs(value: &Value) -> String {
        String::from_utf8(canonical_json(value)).unwrap()
    }

    fn float(x: f64) -> Value {
        Value::Number(Number::from_f64(x).unwrap())
    }

    #[test]
    fn rfc8785_sorting_example() {
        // RFC 8785 §3.2.3: the emoji (surrogates D83D DE00) sorts before U+FB33 by UTF-16, though
        // after it by code point.
        let input = r#"{
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\ud83d\ude00": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let value: Value = serde_json::from_str(input).unwrap();
        let expected = concat!(
            "{\"\\r\":\"Carriage Return\",",
            "\"1\":\"One\",",
            "\"\u{80}\":\"Control\",",
            "\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",",
            "\"\u{20ac}\":\"Euro Sign\",",
            "\"\u{1f600}\":\"Emoji: Grinning Face\",",
            "\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
        assert_eq!(jcs(&value), expected);
    }

    #[test]
    // The RFC's input literal is kept verbatim, excess digits included.
    #[allow(clippy::excessive_precision)]
    fn rfc8785_example_object() {
        // RFC 8785 §3.2.2. Numbers are built from Rust literals (correctly rounded by the
        // compiler) rather than parsed, so the test does not depend on serde_json's float parser.
        let input = r#"{
            "numbers": [0, 0, 0, 0, 0],
            "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
            "literals": [null, true, false]
        }"#;
        let mut value: Value = serde_json::from_str(input).unwrap();
        value["numbers"] = Value::Array(
            [
                333333333.33333329,
                1E30,
                4.50,
                2e-3,
                0.000000000000000000000000001,
            ]
            .into_iter()
            .map(float)
            .collect(),
        );
        let expected = r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
        assert_eq!(jcs(&value), expected);
    }

    #[test]
    fn rfc8785_appendix_b_numbers() {
        let cases: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for &(bits, expected) in cases {
            let x = f64::from_bits(bits);
            assert_eq!(jcs(&float(x)), expected, "{bits:016x}");
            assert_eq!(es_number_to_string(x), expected, "{bits:016x}");
        }
        // serde_json cannot represent the non-finite samples, so JCS's required error for them
        // cannot arise here.
        assert!(Number::from_f64(f64::NAN).is_none());
        assert!(Number::from_f64(f64::INFINITY).is_none());
    }

    #[test]
    fn number_formatting_boundaries() {
        let cases: &[(f64, &str)] = &[
            (1.0, "1"),
            (-1.5, "-1.5"),
            (100.0, "100"),
            (0.1, "0.1"),
            (1e20, "100000000000000000000"),
            (1e21, "1e+21"),
            (1.5e21, "1.5e+21"),
            (1e-6, "0.000001"),
            (1.5e-6, "0.0000015"),
            (1e-7, "1e-7"),
            (1.25e-7, "1.25e-7"),
            (123456.789, "123456.789"),
        ];
        for &(x, expected) in cases {
            assert_eq!(es_number_to_string(x), expected, "{x:e}");
        }
        // Integers, as our payloads carry them, are plain decimal, and an f64 spelled "1.0"
        // canonicalises like the integer 1.
        let v: Value = serde_json::from_str("[0, -0, 1.0, 42, -7, 9007199254740991, 1e2]").unwrap();
        assert_eq!(jcs(&v), "[0,0,1,42,-7,9007199254740991,100]");
        // Beyond ±2^53 integers stay exact (documented deviation from JCS).
        assert_eq!(jcs(&json!(u64::MAX)), "18446744073709551615");
        assert_eq!(jcs(&json!(i64::MIN)), "-9223372036854775808");
    }

    #[test]
    fn string_escaping() {
        let s: String = (0u8..0x20).map(char::from).collect::<String>() + "\"\\/\u{7f}\u{2028}é€😀";
        let expected = concat!(
            r#""\u0000\u0001\u0002\u0003\u0004\u0005\u0006\u0007"#,
            r#"\b\t\n\u000b\f\r\u000e\u000f"#,
            r#"\u0010\u0011\u0012\u0013\u0014\u0015\u0016\u0017"#,
            r#"\u0018\u0019\u001a\u001b\u001c\u001d\u001e\u001f"#,
            "\\\"\\\\/\u{7f}\u{2028}é€😀\"",
        );
        assert_eq!(jcs(&Value::String(s)), expected);
    }

    #[test]
    fn nested_structures_have_no_whitespace_and_sorted_keys() {
        let v: Value = serde_json::from_str(
            r#"{ "b": [ 1, { "z": null, "a": [] } ], "a": { }, "aa": "x", "A": true }"#,
        )
        .unwrap();
        assert_eq!(
            jcs(&v),
            r#"{"A":true,"a":{},"aa":"x","b":[1,{"a":[],"z":null}]}"#
        );
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn canonical_form_parses_back_to_the_same_value(v in arb_json()) {
            let bytes = canonical_json(&v);
            let parsed: Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(&parsed, &v);
            prop_assert_eq!(canonical_json(&parsed), bytes);
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let reparsed: Value = serde_json::from_str(&pretty).unwrap();
            prop_assert_eq!(canonical_json(&reparsed), canonical_json(&v));
        }

        #[test]
        fn a_canonical_row_hashes_as_the_row_of_its_values(
            payload in arb_json(),
            metadata in arb_json(),
            stream_id in any::<String>(),
            event_type in any::<String>(),
            position in any::<i64>(),
            version in any::<i64>(),
            schema in any::<i32>(),
            micros in 0i64..4_102_444_800_000_000,
        ) {
            let recorded_at = DateTime::from_timestamp_micros(micros).unwrap();
            let event_id = Uuid::from_u128(micros as u128 * 7919);
            let row = HashedRow {
                global_position: position,
                event_id,
                stream_id: &stream_id,
                stream_version: version,
                event_type: &event_type,
                schema_version: schema,
                payload: &payload,
                metadata: &metadata,
                recorded_at,
            };
            let (p, m) = (canonical_json(&payload), canonical_json(&metadata));
            let canonical = CanonicalRow {
                global_position: position,
                event_id,
                stream_id: &stream_id,
                stream_version: version,
                event_type: &event_type,
                schema_version: schema,
                payload: &p,
                metadata: &m,
                recorded_at,
            };
            let mut buf = vec![1, 2, 3];
            canonical_row_bytes(&canonical, &mut buf);
            // The definition: the row as a JSON object with the field names as keys, in JCS form.
            let object = json!({
                "global_position": position,
                "event_id": event_id.hyphenated().to_string(),
                "stream_id": stream_id,
                "stream_version": version,
                "event_type": event_type,
                "schema_version": schema,
                "payload": payload,
                "metadata": metadata,
                "recorded_at": recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            });
            let expected = canonical_json(&object);
            prop_assert_eq!(String::from_utf8_lossy(&buf), String::from_utf8_lossy(&expected));
            prop_assert_eq!(row_bytes(&row), expected);
            prop_assert_eq!(canonical_leaf_hash(&canonical, &mut buf), leaf_hash(&row));
            prop_assert_eq!(canonical_json_string(&payload).into_bytes(), p);
        }

        #[test]
        fn finite_floats_round_trip(bits in any::<u64>()) {
            let x = f64::from_bits(bits);
            prop_assume!(x.is_finite());
            let text = es_number_to_string(x);
            let back: f64 = text.parse().unwrap();
            prop_assert!(back == x, "{} -> {}", x, text);
            // Tie-breaking may swap the last digit but never lengthens the shortest form.
            let rust = split_scientific(&format!("{:e}", x.abs())).unwrap().0;
            let ours = shortest_digits(x.abs()).unwrap().0;
            prop_assert_eq!(ours.len(), rust.len());
        }
    }

    fn recorded_at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 11, 35, 36).unwrap() + Duration::microseconds(123_456)
    }

    struct Owned {
        event_id: Uuid,
        payload: Value,
        metadata: Value,
    }

    fn owned() -> Owned {
        Owned {
            event_id: Uuid::parse_str("0190A0A0-1111-7222-8333-444455556666").unwrap(),
            payload: json!({"booking_id": "b-1", "party_size": 4, "amount_minor": 12500, "note": "é"}),
            metadata: json!({"correlation_id": "c-1", "actor": {"kind": "guest"}}),
        }
    }

    fn row(o: &Owned) -> HashedRow<'_> {
        HashedRow {
            global_position: 42,
            event_id: o.event_id,
            stream_id: "booking-0190a0a0-1111-7222-8333-444455556666",
            stream_version: 3,
            event_type: "BookingConfirmed",
            schema_version: 1,
            payload: &o.payload,
            metadata: &o.metadata,
            recorded_at: recorded_at(),
        }
    }

    #[test]
    fn row_bytes_layout() {
        let o = owned();
        let text = String::from_utf8(row_bytes(&row(&o))).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"event_id":"0190a0a0-1111-7222-8333-444455556666","#,
                r#""event_type":"BookingConfirmed","global_position":42,"#,
                r#""metadata":{"actor":{"kind":"guest"},"correlation_id":"c-1"},"#,
                r#""payload":{"amount_minor":12500,"booking_id":"b-1","note":"é","party_size":4},"#,
                r#""recorded_at":"2026-11-23T11:35:36.123456Z","schema_version":1,"#,
                r#""stream_id":"booking-0190a0a0-1111-7222-8333-444455556666","stream_version":3}"#,
            )
        );
        let mut expected = Sha256::new();
        expected.update([0u8]);
        expected.update(text.as_bytes());
        assert_eq!(leaf_hash(&row(&o)), <[u8; 32]>::from(expected.finalize()));
    }

    #[test]
    fn recorded_at_always_has_six_fraction_digits() {
        let o = owned();
        let whole = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let text = |t: DateTime<Utc>| {
            let r = HashedRow {
                recorded_at: t,
                ..row(&o)
            };
            String::from_utf8(row_bytes(&r)).unwrap()
        };
        assert!(text(whole).contains(r#""recorded_at":"2026-01-02T03:04:05.000000Z""#));
        // Sub-microsecond digits are not stored by Postgres, so they must not affect the hash.
        let with_nanos = whole + Duration::nanoseconds(1_999);
        assert!(text(with_nanos).contains(r#""recorded_at":"2026-01-02T03:04:05.000001Z""#));
    }

    #[test]
    fn leaf_hash_changes_when_any_field_changes() {
        let o = owned();
        let base = leaf_hash(&row(&o));
        let other_payload =
            json!({"booking_id": "b-1", "party_size": 5, "amount_minor": 12500, "note": "é"});
        let other_payload_str =
            json!({"booking_id": "b-2", "party_size": 4, "amount_minor": 12500, "note": "é"});
        let other_metadata = json!({"correlation_id": "c-2", "actor": {"kind": "guest"}});
        let variants = [
            HashedRow {
                global_position: 43,
                ..row(&o)
            },
            HashedRow {
                event_id: Uuid::nil(),
                ..row(&o)
            },
            HashedRow {
                stream_id: "booking-x",
                ..row(&o)
            },
            HashedRow {
                stream_version: 4,
                ..row(&o)
            },
            HashedRow {
                event_type: "BookingCancelled",
                ..row(&o)
            },
            HashedRow {
                schema_version: 2,
                ..row(&o)
            },
            HashedRow {
                payload: &other_payload,
                ..row(&o)
            },
            HashedRow {
                payload: &other_payload_str,
                ..row(&o)
            },
            HashedRow {
                metadata: &other_metadata,
                ..row(&o)
            },
            HashedRow {
                recorded_at: recorded_at() + Duration::microseconds(1),
                ..row(&o)
            },
        ];
        let mut seen = vec![base];
        for (i, variant) in variants.iter().enumerate() {
            let h = leaf_hash(variant);
            assert!(!seen.contains(&h), "variant {i} collides");
            seen.push(h);
        }
    }

    #[test]
    fn same_row_parsed_back_from_its_own_json_hashes_the_same() {
        let o = owned();
        let original = row(&o);
        let bytes = row_bytes(&original);
        let parsed: Value = serde_json::from_slice(&bytes).unwrap();

        let event_id = Uuid::parse_str(parsed["event_id"].as_str().unwrap()).unwrap();
        let recorded_at = DateTime::parse_from_rfc3339(parsed["recorded_at"].as_str().unwrap())
            .unwrap()
            .with_timezone(&Utc);
        let back = HashedRow {
            global_position: parsed["global_position"].as_i64().unwrap(),
            event_id,
            stream_id: parsed["stream_id"].as_str().unwrap(),
            stream_version: parsed["stream_version"].as_i64().unwrap(),
            event_type: parsed["event_type"].as_str().unwrap(),
            schema_version: i32::try_from(parsed["schema_version"].as_i64().unwrap()).unwrap(),
            payload: &parsed["payload"],
            metadata: &parsed["metadata"],
            recorded_at,
        };
        assert_eq!(row_bytes(&back), bytes);
        assert_eq!(leaf_hash(&back), leaf_hash(&original));

        // As jsonb hands it back: keys reordered, whitespace changed.
        let payload: Value = serde_json::from_str(
            r#"{ "note" : "\u00e9", "party_size": 4, "amount_minor":12500, "booking_id":"b-1" }"#,
        )
        .unwrap();
        let reordered = HashedRow {
            payload: &payload,
            ..original
        };
        assert_eq!(leaf_hash(&reordered), leaf_hash(&original));
    }

    #[test]
    fn entry_hashes_chain() {
        let leaves: Vec<[u8; 32]> = (0u8..4).map(|i| Sha256::digest([i]).into()).collect();
        let chain = |leaves: &[[u8; 32]]| {
            let mut prev = GENESIS_HASH;
            leaves
                .iter()
                .map(|leaf| {
                    prev = entry_hash(&prev, leaf);
                    prev
                })
                .collect::<Vec<_>>()
        };
        let entries = chain(&leaves);

        let mut first = Sha256::new();
        first.update([0u8; 32]);
        first.update(leaves[0]);
        assert_eq!(entries[0], <[u8; 32]>::from(first.finalize()));
        assert_eq!(entries[1], entry_hash(&entries[0], &leaves[1]));

        // Changing one leaf changes its entry and every later one, but none before it.
        let mut edited = leaves.clone();
        edited[1][0] ^= 1;
        let edited_entries = chain(&edited);
        assert_eq!(edited_entries[0], entries[0]);
        for i in 1..4 {
            assert_ne!(edited_entries[i], entries[i]);
        }
        // Swapping two events is detected too.
        let mut swapped = leaves.clone();
        swapped.swap(1, 2);
        assert_ne!(chain(&swapped)[3], entries[3]);
        // Order of the two inputs matters.
        assert_ne!(
            entry_hash(&leaves[0], &leaves[1]),
            entry_hash(&leaves[1], &leaves[0])
        );
    }

    /// Certificate Transparency's reference tree (merkle_tree_test.cc), leaves hashed as
    /// SHA-256(0x00 ‖ data).
    const CT_INPUTS: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];
    const CT_ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    #[test]
    fn merkle_root_matches_rfc6962_reference_vectors() {
        assert_eq!(
            hex::encode(merkle_root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let leaves: Vec<[u8; 32]> = CT_INPUTS
            .iter()
            .map(|data| {
                let mut h = Sha256::new();
                h.update([LEAF_PREFIX]);
                h.update(data);
                h.finalize().into()
            })
            .collect();
        for n in 1..=8 {
            assert_eq!(
                hex::encode(merkle_root(&leaves[..n])),
                CT_ROOTS[n - 1],
                "n = {n}"
            );
        }
    }

    fn ct_leaves() -> Vec<Hash> {
        CT_INPUTS
            .iter()
            .map(|data| {
                let mut h = Sha256::new();
                h.update([LEAF_PREFIX]);
                h.update(data);
                h.finalize().into()
            })
            .collect()
    }

    fn h(hex_str: &str) -> Hash {
        hex::decode(hex_str).unwrap().try_into().unwrap()
    }

    fn ct_root(n: usize) -> Hash {
        h(CT_ROOTS[n - 1])
    }

    // Known answers for the reference tree above, from transparency-dev/merkle
    // `proof/verify_test.go` (`inclusionProofs`, `consistencyProofs`; its leaves and roots are
    // the `CT_INPUTS` and `CT_ROOTS` above), at commit 02194e9afb6c1d95b5381350007963aa70fff472
    // of https://github.com/transparency-dev/merkle. Its leaf numbers are 1-based; ours are
    // 0-based indexes.
    const INCLUSION_VECTORS: &[(usize, usize, &[&str])] = &[
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            3,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            2,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];

    const CONSISTENCY_VECTORS: &[(usize, usize, &[&str])] = &[
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    /// Every way the reference suite corrupts a valid proof, plus ours: each must fail.
    fn corrupted(path: &[Hash]) -> Vec<(String, Vec<Hash>)> {
        let mut out = vec![
            ("trailing zero hash".to_owned(), [path, &[[0; 32]]].concat()),
            (
                "preceding zero hash".to_owned(),
                [&[[0; 32]], path].concat(),
            ),
        ];
        if let Some(first) = path.first() {
            out.push(("preceding path[0]".into(), [&[*first], path].concat()));
            out.push(("truncated".into(), path[..path.len() - 1].to_vec()));
            out.push(("empty".into(), Vec::new()));
        }
        if path.len() > 1 {
            let mut swapped = path.to_vec();
            swapped.swap(0, 1);
            out.push(("swapped path[0] and path[1]".into(), swapped));
        }
        for i in 0..path.len() {
            for bit in [0u8, 4, 7] {
                let mut flipped = path.to_vec();
                flipped[i][0] ^= 1 << bit;
                out.push((format!("path[{i}] bit {bit} flipped"), flipped));
            }
        }
        out
    }

    #[test]
    fn inclusion_paths_match_the_reference_vectors_and_corruptions_fail() {
        let leaves = ct_leaves();
        for &(leaf, size, expected) in INCLUSION_VECTORS {
            let (index, tree) = (leaf - 1, &leaves[..size]);
            let path = inclusion_path(tree, index).unwrap();
            let want: Vec<Hash> = expected.iter().map(|x| h(x)).collect();
            assert_eq!(path, want, "PATH({index}, D[{size}])");
            let (i, n, root) = (index as u64, size as u64, ct_root(size));
            assert_eq!(verify_inclusion(i, n, &leaves[index], &path, &root), Ok(()));
            for (what, bad) in corrupted(&path) {
                assert!(
                    verify_inclusion(i, n, &leaves[index], &bad, &root).is_err(),
                    "({index}, {size}): {what}"
                );
            }
            let other_leaf = leaves[(index + 1) % 8];
            for (what, ok) in [
                (
                    "index - 1",
                    i.checked_sub(1)
                        .map(|j| verify_inclusion(j, n, &leaves[index], &path, &root)),
                ),
                (
                    "index + 1",
                    Some(verify_inclusion(i + 1, n, &leaves[index], &path, &root)),
                ),
                (
                    "index ^ 2",
                    Some(verify_inclusion(i ^ 2, n, &leaves[index], &path, &root)),
                ),
                (
                    "size * 2",
                    Some(verify_inclusion(i, n * 2, &leaves[index], &path, &root)),
                ),
                (
                    "size / 2",
                    Some(verify_inclusion(i, n / 2, &leaves[index], &path, &root)),
                ),
                (
                    "other leaf",
                    Some(verify_inclusion(i, n, &other_leaf, &path, &root)),
                ),
                (
                    "empty-tree root",
                    Some(verify_inclusion(
                        i,
                        n,
                        &leaves[index],
                        &path,
                        &merkle_root(&[]),
                    )),
                ),
                (
                    "other root",
                    Some(verify_inclusion(
                        i,
                        n,
                        &leaves[index],
                        &path,
                        &ct_root(size % 8 + 1),
                    )),
                ),
            ] {
                if let Some(result) = ok {
                    assert!(result.is_err(), "({index}, {size}): {what}");
                }
            }
        }
        assert_eq!(inclusion_path(&leaves, 8), None);
        assert_eq!(inclusion_path(&[], 0), None);
        assert_eq!(
            verify_inclusion(0, 0, &leaves[0], &[], &leaves[0]),
            Err(ProofError::IndexOutOfRange { index: 0, size: 0 })
        );
    }

    #[test]
    fn consistency_paths_match_the_reference_vectors_and_corruptions_fail() {
        let leaves = ct_leaves();
        for &(first, second, expected) in CONSISTENCY_VECTORS {
            let path = consistency_path(&leaves[..second], first).unwrap();
            let want: Vec<Hash> = expected.iter().map(|x| h(x)).collect();
            assert_eq!(path, want, "PROOF({first}, D[{second}])");
            let (m, n) = (first as u64, second as u64);
            let (r1, r2) = (ct_root(first), ct_root(second));
            assert_eq!(verify_consistency(m, n, &r1, &r2, &path), Ok(()));
            if m == n {
                continue;
            }
            for (what, bad) in corrupted(&path) {
                assert!(
                    verify_consistency(m, n, &r1, &r2, &bad).is_err(),
                    "({first}, {second}): {what}"
                );
            }
            let zero = [0u8; 32];
            for (what, result) in [
                ("first - 1", verify_consistency(m - 1, n, &r1, &r2, &path)),
                ("first + 1", verify_consistency(m + 1, n, &r1, &r2, &path)),
                ("first ^ 2", verify_consistency(m ^ 2, n, &r1, &r2, &path)),
                ("second * 2", verify_consistency(m, n * 2, &r1, &r2, &path)),
                ("second / 2", verify_consistency(m, n / 2, &r1, &r2, &path)),
                (
                    "wrong first root",
                    verify_consistency(m, n, &zero, &r2, &path),
                ),
                (
                    "wrong second root",
                    verify_consistency(m, n, &r1, &zero, &path),
                ),
                ("swapped roots", verify_consistency(m, n, &r2, &r1, &path)),
            ] {
                assert!(result.is_err(), "({first}, {second}): {what}");
            }
        }
    }

    #[test]
    fn consistency_edge_cases_follow_rfc_9162() {
        let leaves = ct_leaves();
        let (r4, r8) = (ct_root(4), ct_root(8));
        // m == n: the empty proof, and only between equal roots.
        assert_eq!(consistency_path(&leaves, 8), Some(vec![]));
        assert_eq!(verify_consistency(8, 8, &r8, &r8, &[]), Ok(()));
        assert_eq!(
            verify_consistency(8, 8, &r4, &r8, &[]),
            Err(ProofError::SameSizeDifferentRoots)
        );
        assert_eq!(
            verify_consistency(8, 8, &r8, &r8, &[r8]),
            Err(ProofError::WrongLength)
        );
        // m == 0 proves nothing and is refused, even between "matching" roots; the reference
        // Go library accepts (0, n) with an empty proof, RFC 9162 defines proofs for 0 < m only.
        assert_eq!(consistency_path(&leaves, 0), None);
        let empty = merkle_root(&[]);
        assert_eq!(
            verify_consistency(0, 0, &empty, &empty, &[]),
            Err(ProofError::EmptyFirstTree)
        );
        assert_eq!(
            verify_consistency(0, 8, &empty, &r8, &[]),
            Err(ProofError::EmptyFirstTree)
        );
        // m > n: time travel.
        assert_eq!(consistency_path(&leaves[..4], 5), None);
        assert_eq!(
            verify_consistency(5, 4, &ct_root(5), &r4, &[]),
            Err(ProofError::FirstLargerThanSecond {
                first: 5,
                second: 4
            })
        );
        // m a power of two: the first root is not sent (the verifier prepends it), so the
        // proof from 4 to 8 is the single right half.
        let path = consistency_path(&leaves, 4).unwrap();
        assert_eq!(path, vec![merkle_root(&leaves[4..])]);
        assert_eq!(verify_consistency(4, 8, &r4, &r8, &path), Ok(()));
        // m < n with an empty path fails (step 1).
        assert_eq!(
            verify_consistency(4, 8, &r4, &r8, &[]),
            Err(ProofError::WrongLength)
        );
        // The proof binds roots, not sizes: (4, 5)'s proof verifies as (4, 6) against the same
        // roots, because the two trees have the same shape from the verifier's point of view.
        // Sizes must come signed together with their roots (a checkpoint).
        let path = consistency_path(&leaves[..5], 4).unwrap();
        assert_eq!(
            verify_consistency(4, 6, &r4, &ct_root(5), &path),
            Ok(()),
            "documents a property of RFC 9162 proofs, not a bug"
        );
        assert!(verify_consistency(4, 6, &r4, &ct_root(6), &path).is_err());
    }

    /// Leaves that look random: SHA-256 of a seed and the index.
    fn leaves_from(seed: u64, n: usize) -> Vec<Hash> {
        (0..n as u64)
            .map(|i| {
                let mut hasher = Sha256::new();
                hasher.update(seed.to_le_bytes());
                hasher.update(i.to_le_bytes());
                hasher.finalize().into()
            })
            .collect()
    }

    #[test]
    fn a_proof_verifies_for_its_own_sizes_and_roots_and_no_others() {
        // Every pair of sizes up to 17 (crossing 16, a power of two): with the true roots of
        // whatever sizes it is checked under, a proof verifies exactly when it is the proof the
        // generator makes for those sizes.
        const N: usize = 17;
        let leaves = leaves_from(1, N);
        let roots: Vec<Hash> = (0..=N).map(|n| merkle_root(&leaves[..n])).collect();
        let pairs: Vec<(usize, usize)> =
            (1..=N).flat_map(|n| (1..=n).map(move |m| (m, n))).collect();
        let proofs: std::collections::HashMap<(usize, usize), Vec<Hash>> = pairs
            .iter()
            .map(|&(m, n)| ((m, n), consistency_path(&leaves[..n], m).unwrap()))
            .collect();
        for (&(m, n), path) in &proofs {
            for &(m2, n2) in &pairs {
                let verified =
                    verify_consistency(m2 as u64, n2 as u64, &roots[m2], &roots[n2], path).is_ok();
                assert_eq!(
                    verified,
                    proofs[&(m2, n2)] == *path,
                    "PROOF({m}, {n}) checked as ({m2}, {n2})"
                );
            }
        }
        let paths: std::collections::HashMap<(usize, usize), Vec<Hash>> = (1..=N)
            .flat_map(|n| (0..n).map(move |i| (i, n)))
            .map(|(i, n)| ((i, n), inclusion_path(&leaves[..n], i).unwrap()))
            .collect();
        for (&(i, n), path) in &paths {
            for (&(i2, n2), expected) in &paths {
                let verified =
                    verify_inclusion(i2 as u64, n2 as u64, &leaves[i2], path, &roots[n2]).is_ok();
                assert_eq!(
                    verified,
                    expected == path,
                    "PATH({i}, {n}) checked as ({i2}, {n2})"
                );
            }
        }
    }

    fn flip(mut h: Hash, bit: usize) -> Hash {
        h[bit / 8 % 32] ^= 1 << (bit % 8);
        h
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn every_prefix_proves_consistent_and_any_change_fails(
            seed in any::<u64>(),
            n in 1usize..=130,
            bit in 0usize..256,
        ) {
            let leaves = leaves_from(seed, n + 1);
            let roots: Vec<Hash> = (0..=n + 1).map(|k| merkle_root(&leaves[..k])).collect();
            let (nn, r2) = (n as u64, roots[n]);
            for m in 1..=n {
                let (mm, r1) = (m as u64, roots[m]);
                let path = consistency_path(&leaves[..n], m).unwrap();
                prop_assert_eq!(verify_consistency(mm, nn, &r1, &r2, &path), Ok(()));
                if m == n {
                    prop_assert!(path.is_empty());
                    prop_assert!(verify_consistency(mm, nn, &flip(r1, bit), &r2, &path).is_err());
                    continue;
                }
                for i in 0..path.len() {
                    let mut bad = path.clone();
                    bad[i] = flip(bad[i], bit);
                    prop_assert!(verify_consistency(mm, nn, &r1, &r2, &bad).is_err(), "m={} hash {}", m, i);
                }
                prop_assert!(verify_consistency(mm, nn, &flip(r1, bit), &r2, &path).is_err());
                prop_assert!(verify_consistency(mm, nn, &r1, &flip(r2, bit), &path).is_err());
                // Other sizes, each with its own true root: only its own proof would do.
                for (m2, n2) in [(m - 1, n), (m + 1, n), (m, n - 1), (m, n + 1)] {
                    if m2 == 0 || m2 > n2 || (m2, n2) == (m, n) {
                        continue;
                    }
                    let result = verify_consistency(m2 as u64, n2 as u64, &roots[m2], &roots[n2], &path);
                    prop_assert!(result.is_err(), "PROOF({}, {}) passed as ({}, {})", m, n, m2, n2);
                }
            }
            for i in 0..n {
                let path = inclusion_path(&leaves[..n], i).unwrap();
                let ii = i as u64;
                prop_assert_eq!(verify_inclusion(ii, nn, &leaves[i], &path, &r2), Ok(()));
                for j in 0..path.len() {
                    let mut bad = path.clone();
                    bad[j] = flip(bad[j], bit);
                    prop_assert!(verify_inclusion(ii, nn, &leaves[i], &bad, &r2).is_err());
                }
                prop_assert!(verify_inclusion(ii, nn, &flip(leaves[i], bit), &path, &r2).is_err());
                prop_assert!(verify_inclusion(ii, nn, &leaves[i], &path, &flip(r2, bit)).is_err());
                if i + 1 < n {
                    prop_assert!(verify_inclusion(ii + 1, nn, &leaves[i + 1], &path, &r2).is_err());
                }
            }
        }
    }
}
