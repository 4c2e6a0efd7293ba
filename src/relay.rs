//! The relay: publishes the log to NATS JetStream, in order and without loss.
//!
//! Postgres is the source of truth; the relay is the only publisher (the request path never
//! writes to NATS). One relay is active at a time: it holds a Postgres advisory lock, others wait
//! as hot standbys. It does not keep a private cursor: the stream's own last sequence *is* the
//! cursor, because every event is published with `Nats-Expected-Last-Sequence = position - 1`, so
//! the stream sequence equals the global position. A tail the stream lost is therefore simply
//! republished, and a publish refused for a wrong last sequence means "re-read the tail".
//! `Nats-Msg-Id = event_id` lets the stream drop a duplicate inside its window.
//!
//! The lock belongs to a Postgres session, so a restart of Postgres (or a cut connection) takes it
//! away: the active relay reads the log through that very session, so the first read after losing
//! it fails, and the relay stops publishing and contends again. A relay that just lost its session
//! may still be sending the batch it had read while another takes over; that overlap is harmless,
//! since every publish is conditional on the stream's last sequence.

use crate::backoff::Backoff;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream, Context};
use ledger_events::envelope::{RecordedEvent, WireEvent};
use ledger_events::ids::Category;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where the relay publishes. Tests give each run its own stream and subject prefix.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub stream: String,
    /// Subjects are `<prefix>.<category>`.
    pub subject_prefix: String,
    /// Events read and published per round.
    pub batch: i64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            stream: "LEDGER".into(),
            subject_prefix: "ledger.events".into(),
            batch: 512,
        }
    }
}

/// Identifies the relay's advisory lock among the database's (arbitrary, fixed).
const RELAY_LOCK: i64 = 0x6c65_6467_6572_0001;
/// The longest a missed notification can delay publishing.
const POLL: Duration = Duration::from_millis(500);
/// How often a standby tries to take the lock.
const STANDBY_POLL: Duration = Duration::from_secs(1);
/// The longest the relay waits to open or close its lock session.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading the log: {0}")]
    Read(#[from] ledger_replay::ReadError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("publishing position {position}: {reason}")]
    Publish { position: i64, reason: String },
}

pub struct Relay {
    pool: PgPool,
    js: Context,
    config: RelayConfig,
}

impl Relay {
    pub fn new(pool: PgPool, nats: async_nats::Client, config: RelayConfig) -> Self {
        Relay {
            pool,
            js: jetstream::new(nats),
            config,
        }
    }

    /// The stream, created if missing: file storage, no age or size limits, no deletes or purges
    /// (the stream is a copy of an immutable log), a duplicate window for republished batches.
    pub async fn ensure_stream(&self) -> Result<stream::Stream, RelayError> {
        let config = stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![format!("{}.>", self.config.subject_prefix)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            deny_delete: true,
            deny_purge: true,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| RelayError::Stream {
                stream: self.config.stream.clone(),
                reason: e.to_string(),
            })
    }

    /// The stream's last sequence: the position of the last event it holds.
    pub async fn published_position(&self) -> Result<i64, RelayError> {
        let mut stream = self.ensure_stream().await?;
        let info = stream.info().await.map_err(|e| RelayError::Stream {
            stream: self.config.stream.clone(),
            reason: e.to_string(),
        })?;
        Ok(i64::try_from(info.state.last_sequence).unwrap_or(i64::MAX))
    }

    /// Publishes everything the stream does not hold yet; returns how many events it published.
    /// Tests call this to drain the relay instead of sleeping.
    pub async fn publish_pending(&self) -> Result<u64, RelayError> {
        self.publish_through(None).await
    }

    /// [`Relay::publish_pending`], reading the log through `leader` (the session holding the
    /// lock) when given, so that a lost session stops the round before anything is published.
    async fn publish_through(
        &self,
        mut leader: Option<&mut PgConnection>,
    ) -> Result<u64, RelayError> {
        let mut published = 0;
        let mut tail = self.published_position().await?;
        loop {
            let events = match &mut leader {
                Some(session) => {
                    ledger_replay::read_all(&mut **session, tail, self.config.batch).await?
                }
                None => ledger_replay::read_all(&self.pool, tail, self.config.batch).await?,
            };
            let Some(last) = events.last().map(|e| e.global_position) else {
                return Ok(published);
            };
            // Send the whole batch, then await the acks in order: one round trip per batch.
            let mut acks = Vec::with_capacity(events.len());
            for event in &events {
                let publish = self.message(event);
                let ack = self
                    .js
                    .send_publish(self.subject(event), publish)
                    .await
                    .map_err(|e| RelayError::Publish {
                        position: event.global_position,
                        reason: e.to_string(),
                    })?;
                acks.push((event.global_position, ack));
            }
            let mut refused = false;
            for (position, ack) in acks {
                match ack.await {
                    Ok(_) => published += 1,
                    // Someone else (a previous leader) published meanwhile, or the stream lost
                    // its tail: either way the stream's last sequence is the truth.
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                        tracing::debug!(position, "stream tail moved; re-reading it");
                        refused = true;
                        break;
                    }
                    Err(e) => {
                        return Err(RelayError::Publish {
                            position,
                            reason: e.to_string(),
                        })
                    }
                }
            }
            tail = if refused {
                self.published_position().await?
            } else {
                last
            };
        }
    }

    fn subject(&self, event: &RecordedEvent) -> String {
        let category = Category::of_stream(&event.stream_id)
            .map(Category::as_str)
            .unwrap_or("other");
        format!("{}.{category}", self.config.subject_prefix)
    }

    fn message(&self, event: &RecordedEvent) -> jetstream::context::Publish {
        let body = serde_json::to_vec(&WireEvent::from(event)).unwrap_or_default();
        let expected = u64::try_from(event.global_position - 1).unwrap_or(0);
        jetstream::context::Publish::build()
            .payload(body.into())
            .message_id(event.event_id.to_string())
            .expected_last_sequence(expected)
            .header(
                "Ledger-Position",
                event.global_position.to_string().as_str(),
            )
    }

    /// Runs until `shutdown`: waits for leadership, then publishes whenever the log moves
    /// (LISTEN `ledger_log`), with a short poll covering lost notifications. When Postgres goes
    /// away the relay lets go of leadership and contends again once it is back; it never gives up.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        let mut pause = Backoff::default();
        loop {
            match self.lead(&shutdown, &mut pause).await {
                Ok(()) => return Ok(()),
                // Once per outage at warn level, not at every attempt.
                Err(e) if pause.is_first() => {
                    tracing::warn!(error = %e, "relay lost Postgres; contending for leadership again")
                }
                Err(e) => tracing::debug!(error = %e, "Postgres still unreachable"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause.next_pause()) => {}
            }
        }
    }

    /// Contends for the lock, then publishes while it holds it. `Ok` on shutdown; `Err` when the
    /// session (and with it, maybe, the lock) is lost.
    async fn lead(
        &self,
        shutdown: &CancellationToken,
        pause: &mut Backoff,
    ) -> Result<(), RelayError> {
        // The lock lives as long as this session: a connection of its own, outside the pool, so it
        // is never handed to other work, and when it closes or the process dies, Postgres
        // releases the lock and a standby takes over.
        let options = self.pool.connect_options();
        let connect = PgConnection::connect_with(&options);
        let mut leader = tokio::time::timeout(SESSION_TIMEOUT, connect)
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        *pause = Backoff::default();
        loop {
            let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK)
                .fetch_one(&mut leader)
                .await?;
            if got {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(SESSION_TIMEOUT, leader.close()).await;
                    return Ok(());
                }
                _ = tokio::time::sleep(STANDBY_POLL) => {}
            }
        }
        tracing::info!(stream = %self.config.stream, "relay is the active publisher");
        let led = self.publish_while_leading(&mut leader, shutdown).await;
        // Ending the session releases the lock (dropped unclosed if Postgres does not answer).
        let _ = tokio::time::timeout(SESSION_TIMEOUT, leader.close()).await;
        led
    }

    async fn publish_while_leading(
        &self,
        leader: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("ledger_log").await?;
        loop {
            match self.publish_through(Some(&mut *leader)).await {
                Ok(n) if n > 0 => tracing::debug!(published = n, "relay published"),
                Ok(_) => {}
                // The log could not be read through the session that holds the lock: that
                // session, and the lock, may be gone.
                Err(e @ RelayError::Read(_)) => return Err(e),
                // NATS away: keep the lock, try again shortly.
                Err(e) => tracing::warn!(error = %e, "relay round failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                notified = listener.recv() => {
                    if notified.is_err() {
                        // Postgres is away; the next round's read tells whether we still lead.
                        tokio::time::sleep(POLL).await;
                    }
                }
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}
