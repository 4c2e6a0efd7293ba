//! The key vault: data subjects, their wrapped data keys, and the email blind index.
//!
//! Keys are minted on first use and only ever stored wrapped by the key-encryption key derived from
//! `LEDGER_MASTER_KEY`. Unwrapped keys live in a per-process cache, used only while this process
//! hears erasures (see [`KeyVault::follow_erasures`]).

use crate::backoff::Backoff;
use ledger_events::checkpoint;
use ledger_events::ids::SubjectId;
use ledger_events::pii::{DataKey, Keyring};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The subject was erased: its key is gone for good and no new one may be minted.
    #[error("the data subject has been erased")]
    Erased,
    /// The email belongs to another subject than the one the caller acts for.
    #[error("the email belongs to another data subject")]
    OtherSubject,
    #[error("a wrapped key does not open: wrong master key?")]
    Unwrap,
    /// A stored erasure certificate is not a JSON object (it is only ever written as one).
    #[error("a stored erasure certificate is malformed")]
    MalformedCertificate,
    #[error("key vault database failure: {0}")]
    Database(#[from] sqlx::Error),
}

/// A subject's usable key.
#[derive(Clone, Debug)]
pub struct SubjectKey {
    pub key_id: Uuid,
    pub key: DataKey,
}

#[derive(Clone)]
pub struct KeyVault {
    pool: PgPool,
    keyring: Arc<Keyring>,
    /// Unwrapping costs an AEAD open and a query; bookings of a regular come often.
    cache: Arc<RwLock<HashMap<SubjectId, SubjectKey>>>,
    /// How long database backups are kept (`LEDGER_BACKUP_RETENTION_DAYS`): an erasure records
    /// it in its event, and its certificate says when the last backup holding the key expires.
    backup_retention_days: u32,
    /// Whether this process hears erasures right now (its LISTEN is up): the cache is used only
    /// then, since an erasure committed while it is deaf would leave a shredded key cached.
    hearing: Arc<AtomicBool>,
    /// Bumped (under the cache's write lock) by every drop from the cache: a key read from the
    /// database before an erasure is not cached after it.
    drops: Arc<AtomicU64>,
}

/// The retention an erasure certificate states when none is configured.
pub const DEFAULT_BACKUP_RETENTION_DAYS: u32 = 30;

impl KeyVault {
    pub fn new(pool: PgPool, keyring: Arc<Keyring>) -> Self {
        KeyVault {
            pool,
            keyring,
            cache: Arc::default(),
            backup_retention_days: DEFAULT_BACKUP_RETENTION_DAYS,
            hearing: Arc::default(),
            drops: Arc::default(),
        }
    }

    /// The configured backup retention, which erasure certificates state.
    pub fn with_backup_retention_days(mut self, days: u32) -> Self {
        self.backup_retention_days = days;
        self
    }

    pub fn backup_retention_days(&self) -> u32 {
        self.backup_retention_days
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The subject an email belongs to, minting one (with its key) on first sight.
    ///
    /// `acting_for` is the subject of a customer's token: a new email is bound to it, and an email
    /// already bound elsewhere is refused.
    pub async fn subject_for_email(
        &self,
        email: &str,
        acting_for: Option<SubjectId>,
    ) -> Result<SubjectId, VaultError> {
        let blind = self.keyring.blind_index(email).to_vec();
        // Twice at most: a subject found just as it is erased has its lookup gone on the retry.
        for _ in 0..2 {
            if let Some(found) = self.lookup(&blind).await? {
                if matches!(acting_for, Some(s) if s != found) {
                    return Err(VaultError::OtherSubject);
                }
                match self.key(found).await {
                    Ok(_) => return Ok(found),
                    Err(VaultError::Erased) if acting_for.is_none() => continue,
                    Err(e) => return Err(e),
                }
            }
            let candidate = acting_for.unwrap_or_else(SubjectId::mint);
            let mut tx = self.pool.begin().await?;
            let key = DataKey::generate();
            let key_id = Uuid::now_v7();
            let wrapped = self.keyring.wrap_data_key(candidate.0, key_id, &key);
            sqlx::query(
                "INSERT INTO keystore.subject_keys (subject_id, key_id, wrapped_key) \
                 VALUES ($1, $2, $3) ON CONFLICT (subject_id) DO NOTHING",
            )
            .bind(candidate.0)
            .bind(key_id)
            .bind(&wrapped)
            .execute(&mut *tx)
            .await?;
            // An erased subject's row is a fence: never bind an email to it (the INSERT above
            // was a no-op for it). Locked, so an erasure cannot slip in before the commit.
            let (erased,): (bool,) = sqlx::query_as(
                "SELECT wrapped_key IS NULL FROM keystore.subject_keys \
                 WHERE subject_id = $1 FOR SHARE",
            )
            .bind(candidate.0)
            .fetch_one(&mut *tx)
            .await?;
            if erased {
                tx.rollback().await?;
                return Err(VaultError::Erased);
            }
            let bound: Option<(Uuid,)> = sqlx::query_as(
                "INSERT INTO keystore.subject_lookup (blind_index, subject_id) VALUES ($1, $2) \
                 ON CONFLICT (blind_index) DO NOTHING RETURNING subject_id",
            )
            .bind(&blind)
            .bind(candidate.0)
            .fetch_optional(&mut *tx)
            .await?;
            if bound.is_some() {
                tx.commit().await?;
                return Ok(candidate);
            }
            // Someone bound this email concurrently: theirs wins, ours (and its key) is dropped.
            tx.rollback().await?;
        }
        let winner = self.lookup(&blind).await?.ok_or(VaultError::Erased)?;
        match acting_for {
            Some(s) if s != winner => Err(VaultError::OtherSubject),
            _ => Ok(winner),
        }
    }

    async fn lookup(&self, blind: &[u8]) -> Result<Option<SubjectId>, VaultError> {
        let found: Option<(Uuid,)> =
            sqlx::query_as("SELECT subject_id FROM keystore.subject_lookup WHERE blind_index = $1")
                .bind(blind)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.map(|(s,)| SubjectId(s)))
    }

    /// Drops a cached key: after an erasure, no process may keep opening the subject's data.
    pub fn forget(&self, subject: SubjectId) {
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(&subject);
            self.drops.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Drops every cached key.
    fn forget_all(&self) {
        if let Ok(mut cache) = self.cache.write() {
            cache.clear();
            self.drops.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Follows erasures committed by any process (NOTIFY `ledger_erasure` from the shredding
    /// trigger) and drops their keys from this process's cache; returns when the pool is closed.
    ///
    /// Notifications sent while the LISTEN connection is down are lost for good (a Postgres
    /// restart, a cut connection), so the cache is trusted only while it is up: when the
    /// connection drops, the cache is emptied and bypassed; once a new LISTEN is in place it is
    /// emptied again (a key read while deaf may be shredded by now) and used again.
    pub async fn follow_erasures(self) {
        let mut pause = Backoff::default();
        loop {
            if self.pool.is_closed() {
                return;
            }
            let mut listener = match self.listen().await {
                Ok(listener) => listener,
                Err(e) => {
                    if pause.is_first() {
                        tracing::warn!(error = %e, "cannot listen for erasures; keys are not cached meanwhile");
                    }
                    tokio::time::sleep(pause.next_pause()).await;
                    continue;
                }
            };
            pause = Backoff::default();
            self.forget_all();
            self.hearing.store(true, Ordering::Release);
            // Until the connection is lost (`Ok(None)`) or fails: deaf until a new LISTEN.
            while let Ok(Some(n)) = listener.try_recv().await {
                match Uuid::parse_str(n.payload()) {
                    Ok(id) => self.forget(SubjectId(id)),
                    // Not an id: which key it meant is unknown, so none is kept.
                    Err(_) => self.forget_all(),
                }
            }
            self.hearing.store(false, Ordering::Release);
            self.forget_all();
            if self.pool.is_closed() {
                return;
            }
            tracing::warn!(
                "lost the erasure listener's connection; keys are not cached until it is back"
            );
        }
    }

    async fn listen(&self) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        // A lost connection is reported at once (`Ok(None)`), not after reconnecting: the cache
        // must stop being trusted before anything else happens.
        listener.eager_reconnect(false);
        listener.listen("ledger_erasure").await?;
        Ok(listener)
    }

    /// The subject an email belongs to, if any (no minting).
    pub async fn find_subject(&self, email: &str) -> Result<Option<SubjectId>, VaultError> {
        self.lookup(&self.keyring.blind_index(email)).await
    }

    /// The subject's key row: key id and wrapped key (`None` once erased); `None` if unknown.
    pub async fn key_row(
        &self,
        subject: SubjectId,
    ) -> Result<Option<(Uuid, Option<Vec<u8>>)>, VaultError> {
        Ok(sqlx::query_as(
            "SELECT key_id, wrapped_key FROM keystore.subject_keys WHERE subject_id = $1",
        )
        .bind(subject.0)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The erasure certificate of a subject, if erased, signed (see
    /// [`ledger_events::checkpoint::sign_erasure_certificate`]).
    ///
    /// What is stored was written by the shredding trigger inside the erasure's transaction, its
    /// coverage (the sealed events, before the erasure's position) completed by the first reader
    /// outside the append, and depends on nothing but the log; the signature is made here, with the checkpoints' Ed25519
    /// key. Ed25519 is deterministic, so every call in every process of the deployment answers
    /// the same bytes.
    pub async fn certificate(
        &self,
        subject: SubjectId,
    ) -> Result<Option<serde_json::Value>, VaultError> {
        // Completes the certificate's coverage if this is its first reading (migration 0014:
        // the erasure's append no longer scans the log under the head lock).
        let stored: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT keystore.erasure_certificate($1)")
                .bind(subject.0)
                .fetch_one(&self.pool)
                .await?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let serde_json::Value::Object(body) = stored else {
            return Err(VaultError::MalformedCertificate);
        };
        let key = checkpoint::signing_key(&self.keyring.signing_seed());
        Ok(Some(checkpoint::sign_erasure_certificate(&key, body)))
    }

    /// Reclaims the space of shredded keys so their bytes do not linger in dead tuples.
    pub async fn vacuum(&self) -> Result<(), VaultError> {
        sqlx::query("VACUUM keystore.subject_keys, keystore.subject_lookup")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The subject's data key; [`VaultError::Erased`] once shredded.
    pub async fn key(&self, subject: SubjectId) -> Result<SubjectKey, VaultError> {
        let hearing = self.hearing.load(Ordering::Acquire);
        if hearing {
            if let Some(k) = self
                .cache
                .read()
                .ok()
                .and_then(|c| c.get(&subject).cloned())
            {
                return Ok(k);
            }
        }
        let drops = self.drops.load(Ordering::Acquire);
        let row: Option<(Uuid, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT key_id, wrapped_key FROM keystore.subject_keys WHERE subject_id = $1",
        )
        .bind(subject.0)
        .fetch_optional(&self.pool)
        .await?;
        let Some((key_id, Some(wrapped))) = row else {
            return Err(VaultError::Erased);
        };
        let key = self
            .keyring
            .unwrap_data_key(subject.0, key_id, &wrapped)
            .map_err(|_| VaultError::Unwrap)?;
        let found = SubjectKey { key_id, key };
        if let Ok(mut cache) = self.cache.write() {
            // Cached only if nothing was dropped since the row was read (an erasure may have
            // come in between) and erasures are heard.
            if self.drops.load(Ordering::Acquire) == drops && self.hearing.load(Ordering::Acquire) {
                cache.insert(subject, found.clone());
            }
        }
        Ok(found)
    }
}
