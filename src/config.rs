//! Configuration from the environment (documented by `ledger --help` through clap's `env`).
//!
//! A missing or malformed value stops the program at start with a message naming the variable
//! and exit status 2. Secrets are held in `secrecy` types and never printed.

use crate::store::purge::Retention;
use clap::Args;
use ledger_events::pii::MasterKey;
use secrecy::{ExposeSecret, SecretString};
use std::net::SocketAddr;

/// A configuration error: names the variable, never its value.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

fn missing(variable: &'static str) -> ConfigError {
    ConfigError {
        variable,
        problem: "is required but not set".into(),
    }
}

#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// Postgres connection URL.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretString>,
}

impl DatabaseArgs {
    pub fn url(&self) -> Result<String, ConfigError> {
        let url = self
            .database_url
            .as_ref()
            .map(|s| s.expose_secret().trim().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("DATABASE_URL"))?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError {
                variable: "DATABASE_URL",
                problem: "must be a postgres:// URL".into(),
            });
        }
        Ok(url)
    }
}

#[derive(Args, Debug, Clone)]
pub struct JwtArgs {
    /// HS256 secret for bearer tokens (at least 32 bytes).
    #[arg(long = "jwt-secret", env = "LEDGER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<SecretString>,
}

impl JwtArgs {
    pub fn secret(&self) -> Result<Vec<u8>, ConfigError> {
        let s = self
            .jwt_secret
            .as_ref()
            .map(|s| s.expose_secret().as_bytes().to_vec())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("LEDGER_JWT_SECRET"))?;
        if s.len() < 32 {
            return Err(ConfigError {
                variable: "LEDGER_JWT_SECRET",
                problem: "must be at least 32 bytes".into(),
            });
        }
        Ok(s)
    }
}

#[derive(Args, Debug, Clone)]
pub struct KeyArgs {
    /// Base64 of 32 random bytes: the key-encryption key for personal data.
    #[arg(long = "master-key", env = "LEDGER_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<SecretString>,
}

impl KeyArgs {
    pub fn master_key(&self) -> Result<MasterKey, ConfigError> {
        let s = self
            .master_key
            .as_ref()
            .map(|s| s.expose_secret().to_owned())
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| missing("LEDGER_MASTER_KEY"))?;
        MasterKey::from_base64(&s).map_err(|_| ConfigError {
            variable: "LEDGER_MASTER_KEY",
            problem: "must be base64 of exactly 32 random bytes (e.g. `openssl rand -base64 32`)"
                .into(),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// nats-server with JetStream.
    #[arg(long = "nats-url", env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,
    /// HTTP listen address.
    #[arg(long, env = "LEDGER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// JetStream stream the relay publishes to and the projection workers read.
    #[arg(
        long = "nats-stream",
        env = "LEDGER_NATS_STREAM",
        default_value = "LEDGER"
    )]
    pub nats_stream: String,
    /// Subject prefix of that stream: events go to `<prefix>.<category>`.
    #[arg(
        long = "nats-subjects",
        env = "LEDGER_NATS_SUBJECTS",
        default_value = "ledger.events"
    )]
    pub nats_subjects: String,
    #[command(flatten)]
    pub jwt: JwtArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// HMAC secret of the payment provider's webhooks.
    #[arg(
        long = "webhook-secret",
        env = "LEDGER_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<SecretString>,
    /// Days database backups are kept: erasure certificates state when the last backup holding
    /// an erased subject's key expires (1 to 3650).
    #[arg(
        long = "backup-retention-days",
        env = "LEDGER_BACKUP_RETENTION_DAYS",
        default_value = "30"
    )]
    pub backup_retention_days: String,
    /// Hours an `Idempotency-Key` answer is kept before it is purged (24 to 8760; the contract
    /// promises 24 at least).
    #[arg(
        long = "idempotency-retention-hours",
        env = "LEDGER_IDEMPOTENCY_RETENTION_HOURS",
        default_value = "48"
    )]
    pub idempotency_retention_hours: String,
    /// Seconds a request waits for a database connection (every connection busy, or Postgres
    /// unreachable) before it is answered 503 `service-unavailable` (1 to 60).
    #[arg(
        long = "database-wait-seconds",
        env = "LEDGER_DATABASE_WAIT_SECONDS",
        default_value = "3"
    )]
    pub database_wait_seconds: String,
}

/// The longest backup retention an erasure certificate may state: ten years.
pub const MAX_BACKUP_RETENTION_DAYS: u32 = 3650;

/// `LEDGER_BACKUP_RETENTION_DAYS`: whole days, 1 to [`MAX_BACKUP_RETENTION_DAYS`].
pub fn backup_retention_days(raw: &str) -> Result<u32, ConfigError> {
    raw.trim()
        .parse::<u32>()
        .ok()
        .filter(|d| (1..=MAX_BACKUP_RETENTION_DAYS).contains(d))
        .ok_or_else(|| ConfigError {
            variable: "LEDGER_BACKUP_RETENTION_DAYS",
            problem: format!(
                "must be a whole number of days from 1 to {MAX_BACKUP_RETENTION_DAYS} \
                 (how long database backups are kept)"
            ),
        })
}

/// `LEDGER_IDEMPOTENCY_RETENTION_HOURS`: whole hours, from the contract's 24 to a year.
pub fn idempotency_retention_hours(raw: &str) -> Result<u32, ConfigError> {
    use crate::store::purge::{MAX_RETENTION_HOURS, MIN_RETENTION_HOURS};
    raw.trim()
        .parse::<u32>()
        .ok()
        .filter(|h| (MIN_RETENTION_HOURS..=MAX_RETENTION_HOURS).contains(h))
        .ok_or_else(|| ConfigError {
            variable: "LEDGER_IDEMPOTENCY_RETENTION_HOURS",
            problem: format!(
                "must be a whole number of hours from {MIN_RETENTION_HOURS} to \
                 {MAX_RETENTION_HOURS} (Idempotency-Key answers are kept 24 hours at least)"
            ),
        })
}

/// `LEDGER_DATABASE_WAIT_SECONDS`: whole seconds, 1 to 60.
pub fn database_wait(raw: &str) -> Result<std::time::Duration, ConfigError> {
    raw.trim()
        .parse::<u64>()
        .ok()
        .filter(|s| (1..=60).contains(s))
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| ConfigError {
            variable: "LEDGER_DATABASE_WAIT_SECONDS",
            problem: "must be a whole number of seconds from 1 to 60 (how long a request waits \
                      for a database connection before it is answered 503)"
                .into(),
        })
}

/// Everything `serve` needs, validated.
pub struct Settings {
    pub database_url: String,
    pub nats_url: String,
    pub nats_stream: String,
    pub nats_subjects: String,
    pub listen: SocketAddr,
    pub jwt_secret: Vec<u8>,
    pub master_key: MasterKey,
    pub webhook_secret: Vec<u8>,
    /// How long database backups are kept, in days: erasure certificates state it.
    pub backup_retention_days: u32,
    /// How long idempotency records are kept, and how often each API process purges them.
    pub idempotency_retention: Retention,
    /// How long a request waits for a database connection before it is answered 503.
    pub database_wait: std::time::Duration,
}

impl ServeConfig {
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let nats_url = self
            .nats_url
            .clone()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| missing("NATS_URL"))?;
        let listen = self.listen.parse().map_err(|_| ConfigError {
            variable: "LEDGER_LISTEN",
            problem: "must be an address such as 127.0.0.1:8080".into(),
        })?;
        let webhook_secret = self
            .webhook_secret
            .as_ref()
            .map(|s| s.expose_secret().as_bytes().to_vec())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("LEDGER_WEBHOOK_SECRET"))?;
        let token_like = |v: &str| {
            !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        if !token_like(&self.nats_stream) || self.nats_stream.contains('.') {
            return Err(ConfigError {
                variable: "LEDGER_NATS_STREAM",
                problem: "must be a JetStream stream name (letters, digits, - and _)".into(),
            });
        }
        if !token_like(&self.nats_subjects) {
            return Err(ConfigError {
                variable: "LEDGER_NATS_SUBJECTS",
                problem: "must be a NATS subject prefix such as ledger.events".into(),
            });
        }
        Ok(Settings {
            database_url: self.database.url()?,
            nats_url,
            nats_stream: self.nats_stream.clone(),
            nats_subjects: self.nats_subjects.clone(),
            listen,
            jwt_secret: self.jwt.secret()?,
            master_key: self.keys.master_key()?,
            webhook_secret,
            backup_retention_days: backup_retention_days(&self.backup_retention_days)?,
            idempotency_retention: Retention {
                hours: idempotency_retention_hours(&self.idempotency_retention_hours)?,
                ..Retention::default()
            },
            database_wait: database_wait(&self.database_wait_seconds)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_retention_is_whole_days_from_one_to_ten_years() {
        assert_eq!(backup_retention_days("30").ok(), Some(30));
        assert_eq!(backup_retention_days(" 1 ").ok(), Some(1));
        assert_eq!(backup_retention_days("3650").ok(), Some(3650));
        for bad in ["0", "3651", "-1", "", "30d", "1.5", "ten"] {
            assert_eq!(
                backup_retention_days(bad).err().map(|e| e.variable),
                Some("LEDGER_BACKUP_RETENTION_DAYS"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_database_wait_is_whole_seconds_from_one_to_sixty() {
        use std::time::Duration;
        assert_eq!(database_wait("3").ok(), Some(Duration::from_secs(3)));
        assert_eq!(database_wait(" 60 ").ok(), Some(Duration::from_secs(60)));
        for bad in ["0", "61", "-1", "", "3s", "1.5", "soon"] {
            assert_eq!(
                database_wait(bad).err().map(|e| e.variable),
                Some("LEDGER_DATABASE_WAIT_SECONDS"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn idempotency_retention_is_whole_hours_from_a_day_to_a_year() {
        assert_eq!(idempotency_retention_hours("48").ok(), Some(48));
        assert_eq!(idempotency_retention_hours(" 24 ").ok(), Some(24));
        assert_eq!(idempotency_retention_hours("8760").ok(), Some(8760));
        for bad in ["23", "0", "8761", "-48", "", "48h", "1.5", "two days"] {
            assert_eq!(
                idempotency_retention_hours(bad).err().map(|e| e.variable),
                Some("LEDGER_IDEMPOTENCY_RETENTION_HOURS"),
                "{bad:?}"
            );
        }
    }
}
