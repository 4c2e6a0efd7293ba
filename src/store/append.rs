//! The append pipeline: the only code that writes to `events`.
//!
//! Handlers decide, then hand an [`AppendRequest`] (events per stream with expected versions, an
//! optional slot change, an optional idempotency claim) to [`Appender::append`]. One writer task
//! per process takes whatever is queued, opens one transaction, locks the log head, and for the
//! whole batch: checks expected versions and idempotency keys, applies slot changes (each in its
//! own subtransaction, so one taken slot refuses one command, not the batch), assigns gapless
//! positions, extends the hash chain, inserts every event and idempotency record in one
//! statement, and commits once. The commit is amortised over the batch, so throughput grows with
//! load instead of being capped at one commit per append.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use ledger_events::booking::TimeSlot;
use ledger_events::chain::{entry_hash, leaf_hash, HashedRow};
use ledger_events::envelope::{ExpectedVersion, Metadata, NewEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// The most commands one transaction takes: bounds latency of a batch and the statement size.
const MAX_BATCH_COMMANDS: usize = 512;
/// The channel depth; beyond it submitters wait, which is the back-pressure we want.
const QUEUE_DEPTH: usize = 4096;

/// Events for one stream, appended only if the stream is at `expected`. A stream with no events is
/// a pure condition: "this other stream must still be at version N" (e.g. a payment needs its
/// booking not to have been cancelled meanwhile).
#[derive(Clone, Debug)]
pub struct StreamAppend {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// A change to the live-slot table, applied in the same transaction as the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotChange {
    Reserve {
        booking_id: Uuid,
        resource_id: Uuid,
        slot: TimeSlot,
    },
    Move {
        booking_id: Uuid,
        resource_id: Uuid,
        slot: TimeSlot,
    },
    Release {
        booking_id: Uuid,
    },
}

/// The response an idempotent command gave, stored so a retry gets it again verbatim.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Value,
}

/// Builds the response of an accepted command from where its events landed.
pub type Respond = Arc<dyn Fn(&Appended) -> StoredResponse + Send + Sync>;

/// "Remember this command under this key": the key and the request fingerprint are HMACs.
#[derive(Clone)]
pub struct IdempotencyClaim {
    pub key_hash: [u8; 32],
    pub request_hmac: [u8; 32],
    pub respond: Respond,
}

#[derive(Clone)]
pub struct AppendRequest {
    pub streams: Vec<StreamAppend>,
    pub metadata: Metadata,
    pub slot: Option<SlotChange>,
    pub idempotency: Option<IdempotencyClaim>,
}

/// Where an accepted command's events landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Each stream of the request and its version after the append.
    pub versions: Vec<(String, i64)>,
    pub first_position: i64,
    pub last_position: i64,
    pub recorded_at: DateTime<Utc>,
}

impl Appended {
    pub fn version_of(&self, stream_id: &str) -> Option<i64> {
        self.versions
            .iter()
            .find(|(s, _)| s == stream_id)
            .map(|(_, v)| *v)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum AppendOutcome {
    /// Appended now; carries the stored response when the command was idempotent.
    Appended(Appended, Option<StoredResponse>),
    /// The same idempotency key and request were seen before: nothing was appended.
    Replayed(StoredResponse),
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("stream {stream_id} is at version {actual}, not {expected:?}")]
    VersionConflict {
        stream_id: String,
        expected: ExpectedVersion,
        actual: i64,
    },
    #[error("the slot overlaps another live booking of the resource")]
    SlotUnavailable,
    #[error("the idempotency key was used with another request")]
    IdempotencyKeyReuse,
    #[error("malformed append: {0}")]
    Invalid(&'static str),
    #[error("the append pipeline is not running")]
    Closed,
    #[error("database failure while appending: {0}")]
    Database(#[from] Arc<sqlx::Error>),
}

type Reply = oneshot::Sender<Result<AppendOutcome, AppendError>>;

struct Job {
    request: AppendRequest,
    reply: Reply,
}

/// The handle handlers append through. Cheap to clone; the writer stops when every handle is gone.
#[derive(Clone)]
pub struct Appender {
    queue: mpsc::Sender<Job>,
    metrics: Arc<AppendMetrics>,
}

/// Counters for `/metrics`: how the batching behaves under load.
#[derive(Default, Debug)]
pub struct AppendMetrics {
    pub batches: std::sync::atomic::AtomicU64,
    pub commands: std::sync::atomic::AtomicU64,
    pub events: std::sync::atomic::AtomicU64,
    pub batch_micros: std::sync::atomic::AtomicU64,
}

impl Appender {
    /// Starts the writer task. It ends when every `Appender` clone has been dropped, after
    /// finishing what was queued.
    pub fn spawn(pool: PgPool) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let metrics = Arc::new(AppendMetrics::default());
        let handle = tokio::spawn(run_writer(pool, rx, metrics.clone()));
        (Appender { queue, metrics }, handle)
    }

    pub fn metrics(&self) -> &AppendMetrics {
        &self.metrics
    }

    pub async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        if request.streams.iter().all(|s| s.events.is_empty()) {
            return Err(AppendError::Invalid("an append needs at least one event"));
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { request, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        answer.await.map_err(|_| AppendError::Closed)?
    }
}

async fn run_writer(pool: PgPool, mut rx: mpsc::Receiver<Job>, metrics: Arc<AppendMetrics>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut batch = Vec::with_capacity(MAX_BATCH_COMMANDS);
    while rx.recv_many(&mut batch, MAX_BATCH_COMMANDS).await > 0 {
        let started = std::time::Instant::now();
        let jobs = std::mem::take(&mut batch);
        let events: usize = jobs
            .iter()
            .flat_map(|j| &j.request.streams)
            .map(|s| s.events.len())
            .sum();
        metrics.batches.fetch_add(1, Relaxed);
        metrics.commands.fetch_add(jobs.len() as u64, Relaxed);
        metrics.events.fetch_add(events as u64, Relaxed);
        write_jobs(&pool, jobs).await;
        metrics
            .batch_micros
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
    }
    tracing::debug!("append writer stopped");
}

/// Writes a batch; if the database refuses the batch as a whole, retries each command alone so
/// one poisoned command cannot fail its neighbours.
async fn write_jobs(pool: &PgPool, jobs: Vec<Job>) {
    let requests: Vec<&AppendRequest> = jobs.iter().map(|j| &j.request).collect();
    match write_batch(pool, &requests).await {
        Ok(results) => {
            for (job, result) in jobs.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(e) if jobs.len() > 1 && !is_connection_error(&e) => {
            tracing::warn!(error = %e, commands = jobs.len(), "batch refused; retrying one by one");
            for job in jobs {
                let result = match write_batch(pool, &[&job.request]).await {
                    Ok(mut r) => r.pop().unwrap_or(Err(AppendError::Closed)),
                    Err(e) => Err(AppendError::Database(Arc::new(e))),
                };
                let _ = job.reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, commands = jobs.len(), "append batch failed");
            let e = Arc::new(e);
            for job in jobs {
                let _ = job.reply.send(Err(AppendError::Database(e.clone())));
            }
        }
    }
}

fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    )
}

/// One verdict per request, in order.
type Verdicts = Vec<Result<AppendOutcome, AppendError>>;

async fn write_batch(pool: &PgPool, requests: &[&AppendRequest]) -> Result<Verdicts, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (head_position, head_hash, head_time): (i64, Vec<u8>, DateTime<Utc>) =
        sqlx::query_as("SELECT position, entry_hash, recorded_at FROM log_head FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;

    let stream_ids: Vec<String> = requests
        .iter()
        .flat_map(|r| r.streams.iter().map(|s| s.stream_id.clone()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let stored_versions: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT stream_id, max(stream_version) FROM events \
         WHERE stream_id = ANY($1) GROUP BY stream_id",
    )
    .bind(&stream_ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();

    let key_hashes: Vec<Vec<u8>> = requests
        .iter()
        .filter_map(|r| r.idempotency.as_ref().map(|c| c.key_hash.to_vec()))
        .collect();
    let mut stored_keys: HashMap<Vec<u8>, (Vec<u8>, StoredResponse)> = HashMap::new();
    if !key_hashes.is_empty() {
        let rows: Vec<(Vec<u8>, Vec<u8>, i16, Value)> = sqlx::query_as(
            "SELECT key_hash, request_hmac, status, response FROM idempotency_keys \
             WHERE key_hash = ANY($1)",
        )
        .bind(&key_hashes)
        .fetch_all(&mut *tx)
        .await?;
        for (key, hmac, status, body) in rows {
            let status = u16::try_from(status).unwrap_or(500);
            stored_keys.insert(key, (hmac, StoredResponse { status, body }));
        }
    }

    // Decide which commands go in. Slot changes can fail one command; when they do, that command
    // is dropped and the rest re-checked from scratch, since a later command's version check may
    // have counted on the dropped one's events.
    let mut slot_refused: HashSet<usize> = HashSet::new();
    let plan = loop {
        let plan = plan_batch(requests, &stored_versions, &stored_keys, &slot_refused);
        let changes: Vec<(usize, SlotChange)> = plan
            .accepted
            .iter()
            .filter_map(|&i| requests[i].slot.map(|c| (i, c)))
            .collect();
        if changes.is_empty() {
            break plan;
        }
        sqlx::query("SAVEPOINT slots").execute(&mut *tx).await?;
        let held = apply_slot_changes(&mut tx, &changes).await?;
        if held.iter().all(|h| *h) {
            sqlx::query("RELEASE SAVEPOINT slots")
                .execute(&mut *tx)
                .await?;
            break plan;
        }
        sqlx::query("ROLLBACK TO SAVEPOINT slots")
            .execute(&mut *tx)
            .await?;
        for ((i, _), ok) in changes.iter().zip(held) {
            if !ok {
                slot_refused.insert(*i);
            }
        }
    };

    if plan.accepted.is_empty() {
        tx.rollback().await?;
        return Ok(plan.into_verdicts());
    }

    let mut rows = EventRows::default();
    let mut idem = IdempotencyRows::default();
    let mut position = head_position;
    let mut chain: [u8; 32] = head_hash.try_into().unwrap_or([0; 32]);
    let recorded_at = now_micros().max(head_time);
    let mut versions = stored_versions.clone();
    let mut verdicts = plan.verdicts;
    let mut responses: HashMap<usize, StoredResponse> = HashMap::new();
    for &i in &plan.accepted {
        let request = requests[i];
        let metadata = serde_json::to_value(&request.metadata).unwrap_or(Value::Null);
        let first_position = position + 1;
        let mut after = Vec::with_capacity(request.streams.len());
        for stream in &request.streams {
            let version = versions.entry(stream.stream_id.clone()).or_insert(0);
            for event in &stream.events {
                position += 1;
                *version += 1;
                let leaf = leaf_hash(&HashedRow {
                    global_position: position,
                    event_id: event.event_id,
                    stream_id: &stream.stream_id,
                    stream_version: *version,
                    event_type: event.event_type,
                    schema_version: event.schema_version,
                    payload: &event.payload,
                    metadata: &metadata,
                    recorded_at,
                });
                chain = entry_hash(&chain, &leaf);
                rows.push(
                    position,
                    event,
                    &stream.stream_id,
                    *version,
                    &metadata,
                    recorded_at,
                    leaf,
                    chain,
                );
            }
            after.push((stream.stream_id.clone(), *version));
        }
        let appended = Appended {
            versions: after,
            first_position,
            last_position: position,
            recorded_at,
        };
        let response = request.idempotency.as_ref().map(|claim| {
            let response = (claim.respond)(&appended);
            idem.push(claim, &response, position);
            responses.insert(i, response.clone());
            response
        });
        verdicts[i] = Some(Ok(AppendOutcome::Appended(appended, response)));
    }
    for (i, first) in plan.duplicates {
        verdicts[i] = Some(match responses.get(&first) {
            Some(r) => Ok(AppendOutcome::Replayed(r.clone())),
            None => Err(AppendError::IdempotencyKeyReuse),
        });
    }

    sqlx::query(
        "WITH appended AS ( \
             INSERT INTO events (global_position, event_id, stream_id, stream_version, event_type, \
                                 schema_version, payload, metadata, recorded_at, leaf_hash, entry_hash) \
             SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], \
                                  $6::int[], $7::jsonb[], $8::jsonb[], $9::timestamptz[], \
                                  $10::bytea[], $11::bytea[])), \
         remembered AS ( \
             INSERT INTO idempotency_keys (key_hash, request_hmac, status, response, position) \
             SELECT * FROM unnest($12::bytea[], $13::bytea[], $14::smallint[], $15::jsonb[], \
                                  $16::bigint[])) \
         UPDATE log_head SET position = $17, entry_hash = $18, recorded_at = $19 \
         RETURNING pg_notify('ledger_log', $17::text)",
    )
    .bind(&rows.positions)
    .bind(&rows.event_ids)
    .bind(&rows.stream_ids)
    .bind(&rows.versions)
    .bind(&rows.types)
    .bind(&rows.schema_versions)
    .bind(&rows.payloads)
    .bind(&rows.metadata)
    .bind(&rows.recorded_at)
    .bind(&rows.leaf_hashes)
    .bind(&rows.entry_hashes)
    .bind(&idem.key_hashes)
    .bind(&idem.hmacs)
    .bind(&idem.statuses)
    .bind(&idem.responses)
    .bind(&idem.positions)
    .bind(position)
    .bind(chain.to_vec())
    .bind(recorded_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(verdicts
        .into_iter()
        .map(|v| v.unwrap_or(Err(AppendError::Closed)))
        .collect())
}

/// Timestamps are stored in microseconds (Postgres' precision), so the hashed value is the stored one.
fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    now.duration_trunc(TimeDelta::microseconds(1))
        .unwrap_or(now)
}

async fn apply_slot_changes(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    changes: &[(usize, SlotChange)],
) -> Result<Vec<bool>, sqlx::Error> {
    let mut kinds = Vec::with_capacity(changes.len());
    let mut bookings = Vec::with_capacity(changes.len());
    let mut resources: Vec<Option<Uuid>> = Vec::with_capacity(changes.len());
    let mut starts: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(changes.len());
    let mut ends: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(changes.len());
    for (_, change) in changes {
        let (kind, booking, resource, slot) = match *change {
            SlotChange::Reserve {
                booking_id,
                resource_id,
                slot,
            } => ("reserve", booking_id, Some(resource_id), Some(slot)),
            SlotChange::Move {
                booking_id,
                resource_id,
                slot,
            } => ("move", booking_id, Some(resource_id), Some(slot)),
            SlotChange::Release { booking_id } => ("release", booking_id, None, None),
        };
        kinds.push(kind);
        bookings.push(booking);
        resources.push(resource);
        starts.push(slot.map(|s| s.starts_at));
        ends.push(slot.map(|s| s.ends_at));
    }
    let (held,): (Vec<bool>,) =
        sqlx::query_as("SELECT apply_slot_changes($1::text[], $2, $3, $4, $5)")
            .bind(&kinds)
            .bind(&bookings)
            .bind(&resources)
            .bind(&starts)
            .bind(&ends)
            .fetch_one(&mut **tx)
            .await?;
    Ok(held)
}

/// Which requests of a batch go in, before positions are assigned.
struct Plan {
    /// Requests to append, in queue order.
    accepted: Vec<usize>,
    /// Requests repeating the idempotency key of an accepted request in the same batch: (i, first).
    duplicates: Vec<(usize, usize)>,
    /// Final verdicts so far (refusals and replays); `None` for the accepted and the duplicates.
    verdicts: Vec<Option<Result<AppendOutcome, AppendError>>>,
}

impl Plan {
    fn into_verdicts(self) -> Verdicts {
        self.verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Err(AppendError::IdempotencyKeyReuse)))
            .collect()
    }
}

/// The pure part of a batch: versions and idempotency, in queue order, as if the requests had
/// come one at a time.
fn plan_batch(
    requests: &[&AppendRequest],
    stored_versions: &HashMap<String, i64>,
    stored_keys: &HashMap<Vec<u8>, (Vec<u8>, StoredResponse)>,
    slot_refused: &HashSet<usize>,
) -> Plan {
    let mut versions = stored_versions.clone();
    let mut claimed: HashMap<[u8; 32], ([u8; 32], usize)> = HashMap::new();
    let mut plan = Plan {
        accepted: Vec::new(),
        duplicates: Vec::new(),
        verdicts: Vec::with_capacity(requests.len()),
    };
    'requests: for (i, request) in requests.iter().enumerate() {
        plan.verdicts.push(None);
        if slot_refused.contains(&i) {
            plan.verdicts[i] = Some(Err(AppendError::SlotUnavailable));
            continue;
        }
        if let Some(claim) = &request.idempotency {
            if let Some((hmac, response)) = stored_keys.get(claim.key_hash.as_slice()) {
                plan.verdicts[i] = Some(if hmac.as_slice() == claim.request_hmac {
                    Ok(AppendOutcome::Replayed(response.clone()))
                } else {
                    Err(AppendError::IdempotencyKeyReuse)
                });
                continue;
            }
            if let Some((hmac, first)) = claimed.get(&claim.key_hash) {
                if *hmac == claim.request_hmac {
                    plan.duplicates.push((i, *first));
                } else {
                    plan.verdicts[i] = Some(Err(AppendError::IdempotencyKeyReuse));
                }
                continue;
            }
        }
        for stream in &request.streams {
            let actual = versions.get(&stream.stream_id).copied().unwrap_or(0);
            if !stream.expected.accepts(actual) {
                plan.verdicts[i] = Some(Err(AppendError::VersionConflict {
                    stream_id: stream.stream_id.clone(),
                    expected: stream.expected,
                    actual,
                }));
                continue 'requests;
            }
        }
        for stream in &request.streams {
            *versions.entry(stream.stream_id.clone()).or_insert(0) += stream.events.len() as i64;
        }
        if let Some(claim) = &request.idempotency {
            claimed.insert(claim.key_hash, (claim.request_hmac, i));
        }
        plan.accepted.push(i);
    }
    plan
}

/// Column arrays for one multi-row insert through `unnest`.
#[derive(Default)]
struct EventRows {
    positions: Vec<i64>,
    event_ids: Vec<Uuid>,
    stream_ids: Vec<String>,
    versions: Vec<i64>,
    types: Vec<&'static str>,
    schema_versions: Vec<i32>,
    payloads: Vec<Value>,
    metadata: Vec<Value>,
    recorded_at: Vec<DateTime<Utc>>,
    leaf_hashes: Vec<Vec<u8>>,
    entry_hashes: Vec<Vec<u8>>,
}

impl EventRows {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        position: i64,
        event: &NewEvent,
        stream_id: &str,
        version: i64,
        metadata: &Value,
        recorded_at: DateTime<Utc>,
        leaf: [u8; 32],
        entry: [u8; 32],
    ) {
        self.positions.push(position);
        self.event_ids.push(event.event_id);
        self.stream_ids.push(stream_id.to_owned());
        self.versions.push(version);
        self.types.push(event.event_type);
        self.schema_versions.push(event.schema_version);
        self.payloads.push(event.payload.clone());
        self.metadata.push(metadata.clone());
        self.recorded_at.push(recorded_at);
        self.leaf_hashes.push(leaf.to_vec());
        self.entry_hashes.push(entry.to_vec());
    }
}

#[derive(Default)]
struct IdempotencyRows {
    key_hashes: Vec<Vec<u8>>,
    hmacs: Vec<Vec<u8>>,
    statuses: Vec<i16>,
    responses: Vec<Value>,
    positions: Vec<i64>,
}

impl IdempotencyRows {
    fn push(&mut self, claim: &IdempotencyClaim, response: &StoredResponse, position: i64) {
        self.key_hashes.push(claim.key_hash.to_vec());
        self.hmacs.push(claim.request_hmac.to_vec());
        self.statuses
            .push(i16::try_from(response.status).unwrap_or(500));
        self.responses.push(response.body.clone());
        self.positions.push(position);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stream: &str, expected: ExpectedVersion, events: usize) -> AppendRequest {
        AppendRequest {
            streams: vec![StreamAppend {
                stream_id: stream.into(),
                expected,
                events: (0..events)
                    .map(|_| NewEvent {
                        event_id: Uuid::now_v7(),
                        event_type: "Test",
                        schema_version: 1,
                        payload: Value::Null,
                    })
                    .collect(),
            }],
            metadata: Metadata {
                actor: "t".into(),
                role: "admin".into(),
                command: "Test".into(),
                request_id: Uuid::nil(),
                correlation_id: Uuid::nil(),
                causation_id: Uuid::nil(),
            },
            slot: None,
            idempotency: None,
        }
    }

    fn claim(key: u8, body: u8) -> IdempotencyClaim {
        IdempotencyClaim {
            key_hash: [key; 32],
            request_hmac: [body; 32],
            respond: Arc::new(|_| StoredResponse {
                status: 201,
                body: Value::Null,
            }),
        }
    }

    #[test]
    fn a_batch_checks_versions_as_if_commands_came_one_at_a_time() {
        let a = request("s", ExpectedVersion::NoStream, 2);
        let b = request("s", ExpectedVersion::Exact(2), 1);
        let c = request("s", ExpectedVersion::Exact(2), 1);
        let plan = plan_batch(
            &[&a, &b, &c],
            &HashMap::new(),
            &HashMap::new(),
            &HashSet::new(),
        );
        assert_eq!(plan.accepted, vec![0, 1]);
        assert!(matches!(
            plan.verdicts[2],
            Some(Err(AppendError::VersionConflict { actual: 3, .. }))
        ));
    }

    #[test]
    fn a_refused_slot_is_dropped_and_later_commands_are_rechecked_without_it() {
        let a = request("s", ExpectedVersion::NoStream, 1);
        let b = request("s", ExpectedVersion::NoStream, 1);
        let refused: HashSet<usize> = [0].into();
        let plan = plan_batch(&[&a, &b], &HashMap::new(), &HashMap::new(), &refused);
        assert_eq!(plan.accepted, vec![1]);
        assert!(matches!(
            plan.verdicts[0],
            Some(Err(AppendError::SlotUnavailable))
        ));
    }

    #[test]
    fn idempotency_keys_replay_within_and_across_batches() {
        let mut a = request("a", ExpectedVersion::Any, 1);
        a.idempotency = Some(claim(1, 1));
        let mut b = request("b", ExpectedVersion::Any, 1);
        b.idempotency = Some(claim(1, 1));
        let mut c = request("c", ExpectedVersion::Any, 1);
        c.idempotency = Some(claim(1, 2));
        let mut d = request("d", ExpectedVersion::Any, 1);
        d.idempotency = Some(claim(9, 9));
        let mut stored = HashMap::new();
        let earlier = StoredResponse {
            status: 200,
            body: Value::Bool(true),
        };
        stored.insert(vec![9u8; 32], (vec![9u8; 32], earlier.clone()));
        let plan = plan_batch(&[&a, &b, &c, &d], &HashMap::new(), &stored, &HashSet::new());
        assert_eq!(plan.accepted, vec![0]);
        assert_eq!(plan.duplicates, vec![(1, 0)]);
        assert!(matches!(
            plan.verdicts[2],
            Some(Err(AppendError::IdempotencyKeyReuse))
        ));
        assert_eq!(
            plan.verdicts[3].as_ref().and_then(|v| v.as_ref().ok()),
            Some(&AppendOutcome::Replayed(earlier))
        );
    }
}
