//! A projection worker: one durable JetStream pull consumer per projection.
//!
//! The checkpoint in Postgres is the truth, not the consumer's ack floor: on every (re)start the
//! consumer is recreated to deliver from `checkpoint + 1`. Each fetched batch is applied with its
//! checkpoint in one transaction, then acknowledged; a crash between commit and ack only means a
//! redelivery, which the checkpoint skips. A gap is refused and consumption restarts.

use crate::ProjectionError;
use async_nats::jetstream::{self, consumer, Context};
use futures::StreamExt;
use ledger_events::envelope::{RecordedEvent, WireEvent};
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("JetStream: {0}")]
    Nats(String),
    /// The relay creates the stream with its first round; until then there is nothing to read.
    #[error("JetStream stream {0} does not exist yet")]
    NoStream(String),
    #[error("malformed message at stream sequence {sequence}: {reason}")]
    Malformed { sequence: u64, reason: String },
}

/// Pauses between restarts after failures in a row: doubling from the first to the last.
const MIN_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(1);

fn nats<E: std::fmt::Display>(e: E) -> WorkerError {
    WorkerError::Nats(e.to_string())
}

pub struct Worker {
    pool: PgPool,
    js: Context,
    stream: String,
    projection: &'static str,
    batch: usize,
}

impl Worker {
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
        stream: &str,
        projection: &'static str,
    ) -> Self {
        Worker {
            pool,
            js: jetstream::new(nats),
            stream: stream.to_owned(),
            projection,
            batch: 500,
        }
    }

    /// Runs until `shutdown`, restarting consumption from the checkpoint after any failure (a
    /// Postgres restart, NATS away), pausing a little longer each time it fails in a row.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let mut pause = MIN_PAUSE;
        loop {
            match self.consume(&shutdown, &mut pause).await {
                Ok(()) => return Ok(()),
                Err(e @ WorkerError::NoStream(_)) => {
                    tracing::debug!(projection = self.projection, error = %e, "waiting for the relay")
                }
                Err(e) => {
                    tracing::warn!(projection = self.projection, error = %e, "projection worker restarting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// `pause` goes back to its minimum once a batch is applied.
    async fn consume(
        &self,
        shutdown: &CancellationToken,
        pause: &mut Duration,
    ) -> Result<(), WorkerError> {
        let mut conn = self.pool.acquire().await?;
        let at = crate::checkpoint(&mut conn, self.projection).await?;
        drop(conn);
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    WorkerError::NoStream(self.stream.clone())
                }
                _ => nats(e),
            })?;
        let durable = format!("projection_{}", self.projection);
        // Deleting a consumer that does not exist fails; that is fine.
        let _ = stream.delete_consumer(&durable).await;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(durable),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: u64::try_from(at + 1).unwrap_or(1),
                },
                ack_policy: consumer::AckPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        // A continuous pull: messages flow as they are published, and whatever has arrived is
        // applied as one batch (no waiting to fill a batch, so lag stays at one round trip).
        let mut messages = consumer
            .messages()
            .await
            .map_err(nats)?
            .ready_chunks(self.batch);
        loop {
            let chunk = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                chunk = messages.next() => chunk,
            };
            let Some(chunk) = chunk else {
                return Err(WorkerError::Nats(
                    "the consumer's message stream ended".into(),
                ));
            };
            let mut batch = Vec::with_capacity(chunk.len());
            for m in chunk {
                batch.push(m.map_err(nats)?);
            }
            let Some(last) = batch.last() else { continue };
            let mut events = Vec::with_capacity(batch.len());
            for m in &batch {
                let wire: WireEvent =
                    serde_json::from_slice(&m.payload).map_err(|e| WorkerError::Malformed {
                        sequence: m.info().map(|i| i.stream_sequence).unwrap_or(0),
                        reason: e.to_string(),
                    })?;
                events.push(RecordedEvent::from(wire));
            }
            // A failure here (Postgres away) may or may not have committed: the restart from the
            // checkpoint tells, and skips what was applied.
            let at = crate::apply_batch(&self.pool, self.projection, &events).await?;
            *pause = MIN_PAUSE;
            // AckPolicy::All: acknowledging the last message acknowledges the batch.
            last.ack().await.map_err(nats)?;
            tracing::trace!(
                projection = self.projection,
                checkpoint = at,
                "projection applied"
            );
        }
    }
}
