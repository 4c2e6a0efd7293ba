//! Signed checkpoints: what an auditor keeps outside the system to catch even a superuser who
//! rewrites and re-chains the tail of the log.
//!
//! A checkpoint names a log size, the RFC 9162 Merkle root over the first `size` leaf hashes and
//! the chain's entry hash at `size`, signed with Ed25519 (key derived from the master key). Later,
//! anyone holding the saved checkpoint recomputes both from the rows as they are then: a changed,
//! removed or reordered event among the first `size` changes the root.

use crate::chain::canonical_json;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// What is signed, and what an auditor saves (as JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The number of events covered: positions 1..=size.
    pub size: i64,
    /// Hex of the Merkle tree hash over the leaf hashes of positions 1..=size.
    pub merkle_root: String,
    /// Hex of the entry hash at position `size` (the chain head then).
    pub entry_hash: String,
    pub created_at: DateTime<Utc>,
    /// Hex of the Ed25519 public key that signed it.
    pub public_key: String,
    /// Hex of the signature over the canonical JSON of the fields above (without `signature`).
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
    #[error("the signature does not verify")]
    BadSignature,
}

fn signed_bytes(size: i64, root: &str, entry: &str, at: DateTime<Utc>, key: &str) -> Vec<u8> {
    canonical_json(&json!({
        "size": size,
        "merkle_root": root,
        "entry_hash": entry,
        "created_at": at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        "public_key": key,
    }))
}

/// The signing key derived from the keyring's signing seed.
pub fn signing_key(seed: &[u8; 32]) -> SigningKey {
    SigningKey::from_bytes(seed)
}

pub fn sign(
    key: &SigningKey,
    size: i64,
    merkle_root: &[u8; 32],
    entry_hash: &[u8; 32],
    created_at: DateTime<Utc>,
) -> Checkpoint {
    let public_key = hex::encode(key.verifying_key().to_bytes());
    let (root, entry) = (hex::encode(merkle_root), hex::encode(entry_hash));
    let signature = key.sign(&signed_bytes(size, &root, &entry, created_at, &public_key));
    Checkpoint {
        size,
        merkle_root: root,
        entry_hash: entry,
        created_at,
        public_key,
        signature: hex::encode(signature.to_bytes()),
    }
}

impl Checkpoint {
    /// Checks the signature against the key the checkpoint names. An auditor should also check
    /// that key against the one published when they first pinned it.
    pub fn verify_signature(&self) -> Result<(), CheckpointError> {
        let key: [u8; 32] = hex::decode(&self.public_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or(CheckpointError::Malformed("public_key"))?;
        let key =
            VerifyingKey::from_bytes(&key).map_err(|_| CheckpointError::Malformed("public_key"))?;
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or(CheckpointError::Malformed("signature"))?;
        let bytes = signed_bytes(
            self.size,
            &self.merkle_root,
            &self.entry_hash,
            self.created_at,
            &self.public_key,
        );
        key.verify(&bytes, &Signature::from_bytes(&sig))
            .map_err(|_| CheckpointError::BadSignature)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_breaks_it() {
        let key = signing_key(&[7; 32]);
        let at = DateTime::parse_from_rfc3339("2026-11-23T12:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let cp = sign(&key, 42, &[1; 32], &[2; 32], at);
        assert_eq!(cp.verify_signature(), Ok(()));
        let json = serde_json::to_string(&cp).unwrap();
        let back: Checkpoint = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.verify_signature(),
            Ok(()),
            "survives being saved as JSON"
        );
        for tampered in [
            Checkpoint {
                size: 41,
                ..cp.clone()
            },
            Checkpoint {
                merkle_root: hex::encode([3; 32]),
                ..cp.clone()
            },
            Checkpoint {
                entry_hash: hex::encode([3; 32]),
                ..cp.clone()
            },
            Checkpoint {
                created_at: at + chrono::Duration::seconds(1),
                ..cp.clone()
            },
        ] {
            assert_eq!(
                tampered.verify_signature(),
                Err(CheckpointError::BadSignature)
            );
        }
        let other = sign(&signing_key(&[8; 32]), 42, &[1; 32], &[2; 32], at);
        let forged = Checkpoint {
            public_key: cp.public_key.clone(),
            ..other
        };
        assert_eq!(
            forged.verify_signature(),
            Err(CheckpointError::BadSignature)
        );
    }
}
