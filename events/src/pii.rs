//! Personal data, sealed.
//!
//! Personal data never rests in plaintext: events, read models and NATS messages carry a [`Sealed`]
//! envelope, and only code holding the subject's [`DataKey`] can open it. Erasure ("right to be
//! forgotten") is crypto-shredding: deleting a subject's wrapped data key makes every copy of their
//! data unreadable, including copies in the append-only log and in backups.
//!
//! ## Key hierarchy
//! `LEDGER_MASTER_KEY` ([`MasterKey`]) → HKDF-SHA256 → [`Keyring`], four independent keys:
//! - the key-encryption key (KEK) that wraps each subject's random [`DataKey`];
//! - the blind-index key, so a subject can be found by email without storing the email;
//! - the idempotency key, so request fingerprints reveal nothing about request bodies;
//! - the signing seed, for signing checkpoints of the hash chain.
//!
//! ## Envelope
//! XChaCha20-Poly1305 with a random 192-bit nonce (large enough that random nonces never collide in
//! practice, so no nonce counter has to be stored). The plaintext is the JSON of the value, padded
//! to a multiple of [`PAD_BLOCK`] bytes so ciphertext lengths reveal only a coarse size class. The
//! associated data binds the format version, stream, event type, subject and key id: a ciphertext
//! copied into another event, stream or subject does not open.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Current format version of [`Sealed`].
pub const SEALED_VERSION: u8 = 1;

/// Padded plaintexts are a multiple of this many bytes.
pub const PAD_BLOCK: usize = 64;

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

/// Version of the wrapped-data-key format, bound into its associated data so a future format can
/// never be confused with this one.
const WRAP_VERSION: u8 = 1;

/// Fixed salt: separates these derivations from any other use of the same master key.
const HKDF_SALT: &[u8] = b"ledger-events/hkdf/v1";
const INFO_KEK: &[u8] = b"ledger-events/kek/v1";
const INFO_BLIND_INDEX: &[u8] = b"ledger-events/blind-index/v1";
const INFO_IDEMPOTENCY: &[u8] = b"ledger-events/idempotency/v1";
const INFO_SIGNING: &[u8] = b"ledger-events/signing-seed/v1";

/// Labels open the associated data so a wrapped key and a sealed value can never be mistaken for
/// one another even if their remaining fields happened to encode identically.
const AAD_LABEL_SEALED: &[u8] = b"ledger-events/sealed";
const AAD_LABEL_WRAP: &[u8] = b"ledger-events/wrapped-data-key";

/// Padding `=` is optional because operators paste keys from tools that strip it.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type HmacSha256 = Hmac<Sha256>;

/// Why personal data could not be sealed or opened. Messages never carry key bytes or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum PiiError {
    #[error("malformed master key: {0}")]
    MasterKey(&'static str),
    #[error("sealed value does not open (wrong key, context or tampered)")]
    Open,
    #[error("malformed sealed value")]
    Malformed,
    #[error("could not encode personal data")]
    Encode,
}

/// Plaintext personal data in memory.
///
/// Deliberately neither `Serialize` nor `Display`: the only way out of the process is [`seal`], and
/// a stray `{:?}` in a log line prints `Pii(<redacted>)`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pii<T>(T);

impl<T> Pii<T> {
    pub fn new(v: T) -> Self {
        Self(v)
    }

    /// Every read of the plaintext goes through here, so reviews can grep for it.
    pub fn expose(&self) -> &T {
        &self.0
    }

    pub fn into_inner(self) -> T {
        self.0
    }

    /// Transforms the plaintext without it leaving the wrapper.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Pii<U> {
        Pii(f(self.0))
    }
}

impl<T> fmt::Debug for Pii<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pii(<redacted>)")
    }
}

/// The root secret (`LEDGER_MASTER_KEY`), from which every other key is derived.
pub struct MasterKey([u8; KEY_LEN]);

impl MasterKey {
    /// Parses standard base64 (padding optional, surrounding whitespace ignored) of exactly 32 bytes.
    pub fn from_base64(s: &str) -> Result<Self, PiiError> {
        let bytes = LENIENT_BASE64
            .decode(s.trim())
            .map_err(|_| PiiError::MasterKey("not valid standard base64"))?;
        let key: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| PiiError::MasterKey("must decode to exactly 32 bytes"))?;
        Ok(Self(key))
    }

    pub fn generate() -> Self {
        Self(random_bytes())
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A subject's data key: encrypts all of their personal data, stored only wrapped by the KEK.
#[derive(Clone)]
pub struct DataKey([u8; KEY_LEN]);

impl DataKey {
    pub fn generate() -> Self {
        Self(random_bytes())
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// The keys derived from the master key. Independent by construction (distinct HKDF info labels),
/// so compromising one purpose's key tells nothing about another's.
#[derive(Clone)]
pub struct Keyring {
    kek: [u8; KEY_LEN],
    blind_index: [u8; KEY_LEN],
    idempotency: [u8; KEY_LEN],
    signing_seed: [u8; KEY_LEN],
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keyring(<redacted>)")
    }
}

impl Keyring {
    pub fn derive(master: &MasterKey) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), &master.0);
        let expand = |info: &[u8]| {
            let mut okm = [0u8; KEY_LEN];
            // HKDF-SHA256 can emit up to 255 * 32 bytes; 32 is always within range.
            hk.expand(info, &mut okm)
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            okm
        };
        Self {
            kek: expand(INFO_KEK),
            blind_index: expand(INFO_BLIND_INDEX),
            idempotency: expand(INFO_IDEMPOTENCY),
            signing_seed: expand(INFO_SIGNING),
        }
    }

    /// HMAC-SHA256 blind index of an email, normalised (trim, lowercase) so the same address maps to the same subject.
    pub fn blind_index(&self, email: &str) -> [u8; 32] {
        let normalised = email.trim().to_lowercase();
        let mut mac = hmac_sha256(&self.blind_index);
        mac.update(normalised.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA256 fingerprint of an idempotent request; parts are length-prefixed before hashing so ("ab","c") != ("a","bc").
    pub fn request_fingerprint(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = hmac_sha256(&self.idempotency);
        let mut framed = Vec::new();
        for part in parts {
            put_field(&mut framed, part);
        }
        mac.update(&framed);
        mac.finalize().into_bytes().into()
    }

    /// Wraps a data key under the KEK: `nonce (24) || ciphertext (32) || tag (16)`. The associated
    /// data binds `subject_id` and `key_id`, so a wrapped key swapped onto another subject's row
    /// does not unwrap.
    pub fn wrap_data_key(&self, subject_id: Uuid, key_id: Uuid, key: &DataKey) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let aad = wrap_aad(subject_id, key_id);
        let ciphertext = cipher(&self.kek)
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &key.0,
                    aad: &aad,
                },
            )
            // The AEAD only refuses inputs near 2^38 bytes; a 32-byte key never is.
            .expect("XChaCha20-Poly1305 encrypts a 32-byte key");
        let mut wrapped = Vec::with_capacity(WRAPPED_LEN);
        wrapped.extend_from_slice(&nonce);
        wrapped.extend_from_slice(&ciphertext);
        wrapped
    }

    pub fn unwrap_data_key(
        &self,
        subject_id: Uuid,
        key_id: Uuid,
        wrapped: &[u8],
    ) -> Result<DataKey, PiiError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(PiiError::Malformed);
        }
        let (nonce, ciphertext) = wrapped.split_at(NONCE_LEN);
        let aad = wrap_aad(subject_id, key_id);
        let plaintext = cipher(&self.kek)
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| PiiError::Open)?;
        let key: [u8; KEY_LEN] = plaintext.try_into().map_err(|_| PiiError::Malformed)?;
        Ok(DataKey(key))
    }

    pub fn signing_seed(&self) -> [u8; 32] {
        self.signing_seed
    }

    /// Short public fingerprint of a wrapped key (hex of first 16 bytes of SHA-256 of the wrapped bytes), for erasure certificates.
    ///
    /// Hashing the *wrapped* bytes lets a certificate name the destroyed key without the
    /// certificate itself being able to decrypt anything.
    pub fn key_fingerprint(wrapped: &[u8]) -> String {
        let digest = Sha256::digest(wrapped);
        hex::encode(&digest[..16])
    }
}

/// The stored form of a sealed value: this is what rests in events, read models and NATS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Format version, currently [`SEALED_VERSION`].
    pub v: u8,
    /// The data subject whose key seals this value.
    pub sub: Uuid,
    /// Which of the subject's data keys sealed it.
    pub kid: Uuid,
    /// Base64 (standard, padded) of the 24-byte nonce.
    pub n: String,
    /// Base64 (standard, padded) of the ciphertext and its 16-byte tag.
    pub ct: String,
}

/// Where a sealed value lives: bound into the AEAD associated data together with v, sub and kid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealContext<'a> {
    pub stream_id: &'a str,
    pub event_type: &'a str,
}

/// Encrypts `value` under the subject's data key for the place given by `ctx`.
pub fn seal<T: Serialize>(
    key: &DataKey,
    subject_id: Uuid,
    key_id: Uuid,
    ctx: &SealContext<'_>,
    value: &Pii<T>,
) -> Result<Sealed, PiiError> {
    let json = serde_json::to_vec(value.expose()).map_err(|_| PiiError::Encode)?;
    let padded = pad(json);
    let nonce: [u8; NONCE_LEN] = random_bytes();
    let aad = seal_aad(SEALED_VERSION, ctx, subject_id, key_id);
    let ciphertext = cipher(&key.0)
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &padded,
                aad: &aad,
            },
        )
        .map_err(|_| PiiError::Encode)?;
    Ok(Sealed {
        v: SEALED_VERSION,
        sub: subject_id,
        kid: key_id,
        n: STANDARD.encode(nonce),
        ct: STANDARD.encode(ciphertext),
    })
}

/// Decrypts a sealed value found at `ctx`. Fails with [`PiiError::Open`] for a wrong key, a value
/// moved from another stream, event type or subject, or any tampering.
pub fn open<T: DeserializeOwned>(
    key: &DataKey,
    sealed: &Sealed,
    ctx: &SealContext<'_>,
) -> Result<Pii<T>, PiiError> {
    if sealed.v != SEALED_VERSION {
        return Err(PiiError::Malformed);
    }
    let nonce: [u8; NONCE_LEN] = STANDARD
        .decode(&sealed.n)
        .map_err(|_| PiiError::Malformed)?
        .try_into()
        .map_err(|_| PiiError::Malformed)?;
    let ciphertext = STANDARD
        .decode(&sealed.ct)
        .map_err(|_| PiiError::Malformed)?;
    // Every ciphertext we produce holds at least one whole padding block; anything else was not
    // made by `seal`, and rejecting it early skips a pointless decryption.
    let body_len = ciphertext
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(PiiError::Malformed)?;
    if body_len == 0 || body_len % PAD_BLOCK != 0 {
        return Err(PiiError::Malformed);
    }
    let aad = seal_aad(sealed.v, ctx, sealed.sub, sealed.kid);
    let padded = cipher(&key.0)
        .decrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| PiiError::Open)?;
    let json = unpad(padded)?;
    // The serde error is dropped on purpose: its message can quote the plaintext.
    let value = serde_json::from_slice(&json).map_err(|_| PiiError::Malformed)?;
    Ok(Pii(value))
}

fn cipher(key: &[u8; KEY_LEN]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(&Key::from(*key))
}

fn hmac_sha256(key: &[u8; KEY_LEN]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

/// Appends `bytes` with a big-endian u64 length prefix: a prefix-free framing, so no two
/// different field sequences encode to the same bytes.
fn put_field(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    buf.extend_from_slice(bytes);
}

fn seal_aad(v: u8, ctx: &SealContext<'_>, subject_id: Uuid, key_id: Uuid) -> Vec<u8> {
    let mut aad = Vec::with_capacity(
        AAD_LABEL_SEALED.len() + ctx.stream_id.len() + ctx.event_type.len() + 64,
    );
    put_field(&mut aad, AAD_LABEL_SEALED);
    aad.push(v);
    put_field(&mut aad, ctx.stream_id.as_bytes());
    put_field(&mut aad, ctx.event_type.as_bytes());
    aad.extend_from_slice(subject_id.as_bytes());
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

fn wrap_aad(subject_id: Uuid, key_id: Uuid) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_LABEL_WRAP.len() + 41);
    put_field(&mut aad, AAD_LABEL_WRAP);
    aad.push(WRAP_VERSION);
    aad.extend_from_slice(subject_id.as_bytes());
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

/// ISO/IEC 7816-4 padding: a 0x80 marker then zeros up to the next block boundary. The marker is
/// always present (a full block is added when the text already ends on a boundary), so stripping
/// is unambiguous whatever the plaintext ends with.
fn pad(mut text: Vec<u8>) -> Vec<u8> {
    text.push(0x80);
    let padded_len = text.len().div_ceil(PAD_BLOCK) * PAD_BLOCK;
    text.resize(padded_len, 0);
    text
}

fn unpad(mut padded: Vec<u8>) -> Result<Vec<u8>, PiiError> {
    match padded.iter().rposition(|&b| b != 0) {
        Some(marker) if padded[marker] == 0x80 && padded.len() - marker <= PAD_BLOCK => {
            padded.truncate(marker);
            Ok(padded)
        }
        _ => Err(PiiError::Malformed),
    }
}

#[cfg(test)]
// A failed unwrap is a failed test; the lint guards production code paths.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STREAM: &str = "booking-0190a0a0-0000-7000-8000-000000000001";
    const EVENT: &str = "BookingRequested";

    fn ctx() -> SealContext<'static> {
        SealContext {
            stream_id: STREAM,
            event_type: EVENT,
        }
    }

    fn sealed_name(key: &DataKey, sub: Uuid, kid: Uuid) -> Sealed {
        seal(key, sub, kid, &ctx(), &Pii::new("Ada Lovelace".to_string())).unwrap()
    }

    fn open_str(key: &DataKey, sealed: &Sealed, ctx: &SealContext<'_>) -> Result<String, PiiError> {
        open::<String>(key, sealed, ctx).map(Pii::into_inner)
    }

    fn ct_len(sealed: &Sealed) -> usize {
        STANDARD.decode(&sealed.ct).unwrap().len()
    }

    proptest! {
        #[test]
        fn seal_then_open_is_identity(s in any::<String>()) {
            let key = DataKey::generate();
            let (sub, kid) = (Uuid::new_v4(), Uuid::new_v4());
            let sealed = seal(&key, sub, kid, &ctx(), &Pii::new(s.clone())).unwrap();
            prop_assert_eq!(open_str(&key, &sealed, &ctx()).unwrap(), s);
            let body = ct_len(&sealed) - TAG_LEN;
            prop_assert!(body > 0 && body % PAD_BLOCK == 0, "body length {}", body);
        }

        #[test]
        fn padding_roundtrips_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let padded = pad(bytes.clone());
            prop_assert_eq!(padded.len() % PAD_BLOCK, 0);
            prop_assert!(padded.len() > bytes.len());
            prop_assert_eq!(unpad(padded).unwrap(), bytes);
        }
    }

    #[test]
    fn seal_roundtrips_structured_values() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Guest {
            name: String,
            email: String,
            phone: Option<String>,
        }
        let key = DataKey::generate();
        let guest = Guest {
            name: "Zoë O'Brien".into(),
            email: "zoe@example.com".into(),
            phone: None,
        };
        let sealed = seal(
            &key,
            Uuid::new_v4(),
            Uuid::new_v4(),
            &ctx(),
            &Pii::new(&guest),
        )
        .unwrap();
        let opened: Pii<Guest> = open(&key, &sealed, &ctx()).unwrap();
        assert_eq!(opened.expose(), &guest);
    }

    #[test]
    fn padded_length_is_a_multiple_of_the_block() {
        let key = DataKey::generate();
        for len in [0, 1, 61, 62, 63, 64, 65, 127, 128, 500] {
            let s = "x".repeat(len);
            let sealed = seal(&key, Uuid::nil(), Uuid::nil(), &ctx(), &Pii::new(s)).unwrap();
            let body = ct_len(&sealed) - TAG_LEN;
            assert_eq!(body % PAD_BLOCK, 0, "len {len}");
            // JSON adds two quotes and padding at least the marker byte.
            assert!(body >= len + 3, "len {len}");
        }
        // Similar lengths share a size class, which is the point of padding.
        let a = sealed_name(&key, Uuid::nil(), Uuid::nil());
        let b = seal(&key, Uuid::nil(), Uuid::nil(), &ctx(), &Pii::new("Al")).unwrap();
        assert_eq!(ct_len(&a), ct_len(&b));
    }

    #[test]
    fn sealing_twice_uses_fresh_nonces() {
        let key = DataKey::generate();
        let a = sealed_name(&key, Uuid::nil(), Uuid::nil());
        let b = sealed_name(&key, Uuid::nil(), Uuid::nil());
        assert_ne!(a.n, b.n);
        assert_ne!(a.ct, b.ct);
    }

    #[test]
    fn does_not_open_in_another_context_subject_or_key() {
        let key = DataKey::generate();
        let (sub, kid) = (Uuid::new_v4(), Uuid::new_v4());
        let sealed = sealed_name(&key, sub, kid);
        assert_eq!(open_str(&key, &sealed, &ctx()).unwrap(), "Ada Lovelace");

        let other_stream = SealContext {
            stream_id: "booking-0190a0a0-0000-7000-8000-000000000002",
            event_type: EVENT,
        };
        let other_type = SealContext {
            stream_id: STREAM,
            event_type: "BookingConfirmed",
        };
        assert!(matches!(
            open_str(&key, &sealed, &other_stream),
            Err(PiiError::Open)
        ));
        assert!(matches!(
            open_str(&key, &sealed, &other_type),
            Err(PiiError::Open)
        ));

        let moved_subject = Sealed {
            sub: Uuid::new_v4(),
            ..sealed.clone()
        };
        assert!(matches!(
            open_str(&key, &moved_subject, &ctx()),
            Err(PiiError::Open)
        ));
        let other_kid = Sealed {
            kid: Uuid::new_v4(),
            ..sealed.clone()
        };
        assert!(matches!(
            open_str(&key, &other_kid, &ctx()),
            Err(PiiError::Open)
        ));

        let other_key = DataKey::generate();
        assert!(matches!(
            open_str(&other_key, &sealed, &ctx()),
            Err(PiiError::Open)
        ));
    }

    #[test]
    fn context_fields_cannot_be_shifted_into_one_another() {
        let key = DataKey::generate();
        let sealed = seal(
            &key,
            Uuid::nil(),
            Uuid::nil(),
            &SealContext {
                stream_id: "ab",
                event_type: "c",
            },
            &Pii::new(1),
        )
        .unwrap();
        let shifted = SealContext {
            stream_id: "a",
            event_type: "bc",
        };
        assert!(matches!(
            open::<i32>(&key, &sealed, &shifted),
            Err(PiiError::Open)
        ));
    }

    #[test]
    fn tampering_any_ciphertext_or_nonce_byte_fails() {
        let key = DataKey::generate();
        let sealed = sealed_name(&key, Uuid::nil(), Uuid::nil());
        let ct = STANDARD.decode(&sealed.ct).unwrap();
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x01;
            let tampered = Sealed {
                ct: STANDARD.encode(&bad),
                ..sealed.clone()
            };
            assert!(
                matches!(open_str(&key, &tampered, &ctx()), Err(PiiError::Open)),
                "byte {i}"
            );
        }
        let mut nonce = STANDARD.decode(&sealed.n).unwrap();
        nonce[0] ^= 0x01;
        let tampered = Sealed {
            n: STANDARD.encode(&nonce),
            ..sealed
        };
        assert!(matches!(
            open_str(&key, &tampered, &ctx()),
            Err(PiiError::Open)
        ));
    }

    #[test]
    fn malformed_envelopes_are_rejected() {
        let key = DataKey::generate();
        let sealed = sealed_name(&key, Uuid::nil(), Uuid::nil());
        let cases = [
            Sealed {
                v: 2,
                ..sealed.clone()
            },
            Sealed {
                n: "not base64!".into(),
                ..sealed.clone()
            },
            Sealed {
                n: STANDARD.encode([0u8; 12]),
                ..sealed.clone()
            },
            Sealed {
                ct: STANDARD.encode([0u8; 15]),
                ..sealed.clone()
            },
            Sealed {
                ct: STANDARD.encode([0u8; 16 + 63]),
                ..sealed.clone()
            },
        ];
        for case in cases {
            assert!(
                matches!(open_str(&key, &case, &ctx()), Err(PiiError::Malformed)),
                "{case:?}"
            );
        }
    }

    #[test]
    fn sealed_serialises_with_short_field_names() {
        let key = DataKey::generate();
        let sealed = sealed_name(&key, Uuid::nil(), Uuid::nil());
        let json = serde_json::to_value(&sealed).unwrap();
        let obj = json.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["ct", "kid", "n", "sub", "v"]);
        assert_eq!(json["v"], 1);
        let back: Sealed = serde_json::from_value(json).unwrap();
        assert_eq!(back, sealed);
        assert!(!serde_json::to_string(&sealed).unwrap().contains("Ada"));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let master = MasterKey::generate();
        let keyring = Keyring::derive(&master);
        let data_key = DataKey::generate();
        let pii = Pii::new("ada@example.com".to_string());

        assert_eq!(format!("{pii:?}"), "Pii(<redacted>)");
        assert_eq!(format!("{master:?}"), "MasterKey(<redacted>)");
        assert_eq!(format!("{data_key:?}"), "DataKey(<redacted>)");
        assert_eq!(format!("{keyring:?}"), "Keyring(<redacted>)");
        assert_eq!(
            format!("{:#?}", Some(&pii)),
            "Some(\n    Pii(<redacted>),\n)"
        );

        let err = open::<String>(
            &DataKey::generate(),
            &seal(&data_key, Uuid::nil(), Uuid::nil(), &ctx(), &pii).unwrap(),
            &ctx(),
        )
        .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("ada"));
    }

    #[test]
    fn blind_index_is_normalised_and_keyed() {
        let keyring = Keyring::derive(&MasterKey::generate());
        let a = keyring.blind_index("ada@example.com");
        assert_eq!(a, keyring.blind_index("  Ada@Example.COM\n"));
        assert_eq!(a, keyring.blind_index("\tADA@EXAMPLE.COM "));
        assert_ne!(a, keyring.blind_index("ada@example.org"));

        let other = Keyring::derive(&MasterKey::generate());
        assert_ne!(a, other.blind_index("ada@example.com"));
    }

    #[test]
    fn derived_keys_are_deterministic_and_independent() {
        let master = MasterKey::generate();
        let a = Keyring::derive(&master);
        let b = Keyring::derive(&MasterKey::from_base64(&master.to_base64()).unwrap());
        assert_eq!(a.signing_seed(), b.signing_seed());
        assert_eq!(a.blind_index("x@y.z"), b.blind_index("x@y.z"));
        let keys = [a.kek, a.blind_index, a.idempotency, a.signing_seed];
        for (i, x) in keys.iter().enumerate() {
            assert_ne!(x, &master.0);
            for y in &keys[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }

    #[test]
    fn request_fingerprint_frames_parts() {
        let keyring = Keyring::derive(&MasterKey::generate());
        let ab_c = keyring.request_fingerprint(&[b"ab", b"c"]);
        assert_eq!(ab_c, keyring.request_fingerprint(&[b"ab", b"c"]));
        assert_ne!(ab_c, keyring.request_fingerprint(&[b"a", b"bc"]));
        assert_ne!(ab_c, keyring.request_fingerprint(&[b"abc"]));
        assert_ne!(ab_c, keyring.request_fingerprint(&[b"ab", b"c", b""]));
        assert_ne!(
            keyring.request_fingerprint(&[]),
            keyring.request_fingerprint(&[b""])
        );
        let other = Keyring::derive(&MasterKey::generate());
        assert_ne!(ab_c, other.request_fingerprint(&[b"ab", b"c"]));
    }

    #[test]
    fn wrap_unwrap_roundtrip_and_binding() {
        let keyring = Keyring::derive(&MasterKey::generate());
        let (sub, kid) = (Uuid::new_v4(), Uuid::new_v4());
        let key = DataKey::generate();
        let wrapped = keyring.wrap_data_key(sub, kid, &key);
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        assert!(!wrapped.windows(KEY_LEN).any(|w| w == key.0));

        let unwrapped = keyring.unwrap_data_key(sub, kid, &wrapped).unwrap();
        assert_eq!(unwrapped.0, key.0);

        assert!(matches!(
            keyring.unwrap_data_key(Uuid::new_v4(), kid, &wrapped),
            Err(PiiError::Open)
        ));
        assert!(matches!(
            keyring.unwrap_data_key(sub, Uuid::new_v4(), &wrapped),
            Err(PiiError::Open)
        ));
        let other = Keyring::derive(&MasterKey::generate());
        assert!(matches!(
            other.unwrap_data_key(sub, kid, &wrapped),
            Err(PiiError::Open)
        ));
        let mut tampered = wrapped.clone();
        tampered[NONCE_LEN] ^= 0x80;
        assert!(matches!(
            keyring.unwrap_data_key(sub, kid, &tampered),
            Err(PiiError::Open)
        ));
        assert!(matches!(
            keyring.unwrap_data_key(sub, kid, &wrapped[..WRAPPED_LEN - 1]),
            Err(PiiError::Malformed)
        ));
    }

    #[test]
    fn key_fingerprint_is_short_hex_of_the_wrapped_bytes() {
        let keyring = Keyring::derive(&MasterKey::generate());
        let wrapped = keyring.wrap_data_key(Uuid::nil(), Uuid::nil(), &DataKey::generate());
        let fp = Keyring::key_fingerprint(&wrapped);
        assert_eq!(fp.len(), 32);
        assert_eq!(fp, hex::encode(&Sha256::digest(&wrapped)[..16]));
        // SHA-256("") = e3b0c442...; the fingerprint is its first half.
        assert_eq!(
            Keyring::key_fingerprint(b""),
            "e3b0c44298fc1c149afbf4c8996fb924"
        );
    }

    #[test]
    fn master_key_parsing() {
        let bytes: Vec<u8> = (0u8..32).collect();
        let padded = STANDARD.encode(&bytes);
        assert!(padded.ends_with('='));
        let unpadded = padded.trim_end_matches('=');

        for text in [
            padded.clone(),
            unpadded.to_string(),
            format!("  {padded}\n"),
            format!("\t{unpadded} "),
        ] {
            let key = MasterKey::from_base64(&text).unwrap();
            assert_eq!(key.0.as_slice(), bytes.as_slice());
            assert_eq!(key.to_base64(), padded);
        }

        let generated = MasterKey::generate();
        let reparsed = MasterKey::from_base64(&generated.to_base64()).unwrap();
        assert_eq!(generated.0, reparsed.0);

        for bad_len in [0usize, 16, 31, 33, 64] {
            let text = STANDARD.encode(vec![7u8; bad_len]);
            let err = MasterKey::from_base64(&text).err().unwrap();
            assert!(matches!(err, PiiError::MasterKey(_)), "len {bad_len}");
        }
        for bad in [
            "not base64 at all!",
            "AAAA*AAA",
            "-_-_",
            &padded.replace('A', "_"),
        ] {
            assert!(
                matches!(MasterKey::from_base64(bad), Err(PiiError::MasterKey(_))),
                "{bad}"
            );
        }
        let err = MasterKey::from_base64("%%%").err().unwrap().to_string();
        assert!(err.starts_with("malformed master key"));
    }
}
