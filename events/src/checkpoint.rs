//! Signed checkpoints: what an auditor keeps outside the system to catch even a superuser who
//! rewrites and re-chains the tail of the log.
//!
//! A checkpoint names a log size, the RFC 9162 Merkle root over the first `size` leaf hashes and
//! the chain's entry hash at `size`, signed with Ed25519 (key derived from the master key). Later,
//! anyone holding the saved checkpoint recomputes both from the rows as they are then: a changed,
//! removed or reordered event among the first `size` changes the root.
//!
//! The same key signs erasure certificates ([`sign_erasure_certificate`]): one public key for an
//! auditor to pin. The two can never pass for each other: a certificate's signed bytes always hold
//! `"kind":"ledger/erasure-certificate/v1"`, a checkpoint's never hold a `kind`.

use crate::chain::canonical_json;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

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

/// The `kind` of a signed erasure certificate: what separates its signed bytes from a checkpoint's.
pub const ERASURE_CERTIFICATE_KIND: &str = "ledger/erasure-certificate/v1";

/// Signs an erasure certificate: sets `kind` and `public_key` (hex), then `signature`: hex of the
/// Ed25519 signature over the RFC 8785 canonical JSON of every other field. Ed25519 is
/// deterministic, so the same body and key give the same bytes in every process, every time.
pub fn sign_erasure_certificate(key: &SigningKey, mut body: Map<String, Value>) -> Value {
    body.remove("signature");
    body.insert("kind".into(), json!(ERASURE_CERTIFICATE_KIND));
    body.insert(
        "public_key".into(),
        json!(hex::encode(key.verifying_key().to_bytes())),
    );
    let signature = key.sign(&canonical_json(&Value::Object(body.clone())));
    body.insert("signature".into(), json!(hex::encode(signature.to_bytes())));
    Value::Object(body)
}

/// Checks a signed erasure certificate against the key it names (drop `signature`, canonicalise
/// the rest, verify). A verifier should also check `public_key` against the one it pinned, e.g.
/// from a checkpoint.
pub fn verify_erasure_certificate(certificate: &Value) -> Result<(), CheckpointError> {
    let mut body = certificate
        .as_object()
        .cloned()
        .ok_or(CheckpointError::Malformed("not an object"))?;
    if body.get("kind").and_then(Value::as_str) != Some(ERASURE_CERTIFICATE_KIND) {
        return Err(CheckpointError::Malformed("kind"));
    }
    let sig: [u8; 64] = body
        .remove("signature")
        .and_then(|s| s.as_str().and_then(|s| hex::decode(s).ok()))
        .and_then(|s| s.try_into().ok())
        .ok_or(CheckpointError::Malformed("signature"))?;
    let key: [u8; 32] = body
        .get("public_key")
        .and_then(Value::as_str)
        .and_then(|k| hex::decode(k).ok())
        .and_then(|k| k.try_into().ok())
        .ok_or(CheckpointError::Malformed("public_key"))?;
    let key =
        VerifyingKey::from_bytes(&key).map_err(|_| CheckpointError::Malformed("public_key"))?;
    key.verify(
        &canonical_json(&Value::Object(body)),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| CheckpointError::BadSignature)
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

    #[test]
    fn a_signed_erasure_certificate_verifies_and_any_change_breaks_it() {
        let key = signing_key(&[7; 32]);
        let body = json!({
            "subject_id": "0193a1c2-0000-7000-8000-000000000001",
            "erased_at": "2026-11-23T12:00:00.123456Z",
            "events_covered": 2,
            "key_fingerprint": "00112233445566778899aabbccddeeff",
            "covers": {"positions": [3, 5]},
        });
        let Value::Object(map) = body else { panic!() };
        let cert = sign_erasure_certificate(&key, map.clone());
        assert_eq!(verify_erasure_certificate(&cert), Ok(()));
        assert_eq!(cert["kind"], ERASURE_CERTIFICATE_KIND);
        assert_eq!(
            cert["public_key"],
            sign(&key, 1, &[0; 32], &[0; 32], Utc::now()).public_key,
            "the checkpoints' key"
        );
        assert_eq!(
            sign_erasure_certificate(&key, map.clone()),
            cert,
            "deterministic"
        );
        for (path, value) in [
            ("events_covered", json!(3)),
            ("erased_at", json!("2026-11-23T12:00:00.123457Z")),
            ("covers", json!({"positions": [3]})),
            ("kind", json!("something-else")),
        ] {
            let mut tampered = cert.clone();
            tampered[path] = value;
            assert!(verify_erasure_certificate(&tampered).is_err(), "{path}");
        }
        let mut extra = cert.clone();
        extra["note"] = json!("added later");
        assert_eq!(
            verify_erasure_certificate(&extra),
            Err(CheckpointError::BadSignature)
        );
        let mut other_key = sign_erasure_certificate(&signing_key(&[8; 32]), map);
        other_key["public_key"] = cert["public_key"].clone();
        assert_eq!(
            verify_erasure_certificate(&other_key),
            Err(CheckpointError::BadSignature)
        );
        assert_eq!(
            verify_erasure_certificate(&json!("x")),
            Err(CheckpointError::Malformed("not an object"))
        );
    }
}
