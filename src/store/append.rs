//! The append pipeline: the only code that writes to `events`.
//!
//! Handlers decide, then hand an [`AppendRequest`] (events per stream with expected versions, an
//! optional slot change, an optional idempotency claim) to [`Appender::append`]. One writer task
//! per process takes whatever is queued and commits it as one batch in two round trips:
//!
//! 1. one read (one snapshot): the log head, the current versions of the batch's streams, and any
//!    stored idempotency keys;
//! 2. planning in memory, as if the commands had come one at a time: version checks, idempotency,
//!    gapless positions, the hash chain;
//! 3. one call to `append_batch` (see the migrations), which takes the log head row lock,
//!    confirms the head has not moved since step 1, applies slot changes, inserts every event and
//!    idempotency record, moves the head, and commits with the statement.
//!
//! If another process appended in between, or a slot change was refused, nothing was written and
//! the batch is planned again without the refused commands. The commit is amortised over the
//! batch, so throughput grows with load instead of being capped at one commit per append; holding
//! the head lock to commit keeps positions gapless and visible in commit order.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use ledger_events::booking::TimeSlot;
use ledger_events::chain::{canonical_json_string, canonical_leaf_hash, entry_hash, CanonicalRow};
use ledger_events::envelope::{ExpectedVersion, Metadata, NewEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// The most commands one transaction takes: bounds latency of a batch and the statement size.
const MAX_BATCH_COMMANDS: usize = 512;
/// The channel depth; beyond it submitters wait, which is the back-pressure we want.
const QUEUE_DEPTH: usize = 4096;
/// How long the writer may wait for the submitters of its previous batch to come back (see
/// `gather`). A small fraction of one commit, which it saves.
const GATHER_MAX: std::time::Duration = std::time::Duration::from_micros(300);

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
    /// The command sealed personal data under a key shredded meanwhile: decide again.
    #[error("the data subject was erased while the command was decided")]
    SubjectErased,
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

/// A queued request. The submitting task keeps a second reference to what it submitted, and the
/// writer lets go of its own before answering: the request is then freed by the submitting task,
/// in parallel, rather than by the writer between two batches (measured: ~5 µs a request, most
/// of the time the writer spent answering a batch).
struct Job {
    submitted: Arc<Submitted>,
    reply: Reply,
}

struct Submitted {
    request: AppendRequest,
    prepared: Prepared,
}

impl Job {
    fn answer(self, result: Result<AppendOutcome, AppendError>) {
        let Job { submitted, reply } = self;
        drop(submitted);
        let _ = reply.send(result);
    }
}

/// A request's values in the form the writer stores and hashes: canonical JSON text of its
/// metadata and of each event's payload, and the subject of every sealed envelope in each
/// payload. Made by the submitting task before it queues the request, so the walks over the
/// values run in parallel across submitters instead of one after another on the writer's path.
struct Prepared {
    metadata: String,
    /// One per event, in request order (streams, then their events).
    events: Vec<PreparedEvent>,
}

struct PreparedEvent {
    payload: String,
    sealed: Vec<Uuid>,
}

impl Prepared {
    fn new(request: &AppendRequest) -> Self {
        let metadata = serde_json::to_value(&request.metadata).unwrap_or(Value::Null);
        let events = request
            .streams
            .iter()
            .flat_map(|s| &s.events)
            .map(|event| {
                let mut sealed = Vec::new();
                sealed_subjects(&event.payload, &mut sealed);
                PreparedEvent {
                    payload: canonical_json_string(&event.payload),
                    sealed,
                }
            })
            .collect();
        Prepared {
            metadata: canonical_json_string(&metadata),
            events,
        }
    }
}

/// The handle handlers append through. Cheap to clone; the writer stops when every handle is gone.
#[derive(Clone)]
pub struct Appender {
    queue: mpsc::Sender<Job>,
    metrics: Arc<AppendMetrics>,
}

/// Counters for `/metrics` and the benchmark: how the batching behaves under load, and where
/// the writer's time goes. A batch's time (`batch_micros`, from taking it to answering it) is
/// its statements (`database_micros`), its planning (`planning_micros`: beliefs, positions,
/// the hash chain, binding) and answering; `gathering_micros` is the time spent waiting for the
/// previous batch's submitters before it (see `gather`).
#[derive(Default, Debug)]
pub struct AppendMetrics {
    pub batches: AtomicU64,
    pub commands: AtomicU64,
    pub events: AtomicU64,
    pub batch_micros: AtomicU64,
    pub database_micros: AtomicU64,
    pub planning_micros: AtomicU64,
    pub gathering_micros: AtomicU64,
}

impl AppendMetrics {
    fn add(counter: &AtomicU64, since: std::time::Instant) {
        counter.fetch_add(since.elapsed().as_micros() as u64, Relaxed);
    }
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
        let prepared = Prepared::new(&request);
        let submitted = Arc::new(Submitted { request, prepared });
        self.queue
            .send(Job {
                submitted: submitted.clone(),
                reply,
            })
            .await
            .map_err(|_| AppendError::Closed)?;
        let answer = answer.await.map_err(|_| AppendError::Closed)?;
        drop(submitted);
        answer
    }
}

async fn run_writer(pool: PgPool, mut rx: mpsc::Receiver<Job>, metrics: Arc<AppendMetrics>) {
    let mut batch = Vec::with_capacity(MAX_BATCH_COMMANDS);
    // One connection for the writer's whole life: its backend keeps the prepared statements and
    // the plan of `append_batch` warm. A pool would rotate through cold backends.
    let mut conn = WriterConnection::default();
    let mut known = Knowledge::default();
    let mut previous = 0;
    while rx.recv_many(&mut batch, MAX_BATCH_COMMANDS).await > 0 {
        let gathering = std::time::Instant::now();
        gather(&mut rx, &mut batch, previous).await;
        AppendMetrics::add(&metrics.gathering_micros, gathering);
        previous = batch.len();
        let started = std::time::Instant::now();
        let jobs = std::mem::take(&mut batch);
        let events: usize = jobs
            .iter()
            .flat_map(|j| &j.submitted.request.streams)
            .map(|s| s.events.len())
            .sum();
        metrics.batches.fetch_add(1, Relaxed);
        metrics.commands.fetch_add(jobs.len() as u64, Relaxed);
        metrics.events.fetch_add(events as u64, Relaxed);
        if let Some(e) = write_jobs(&pool, &mut conn, &mut known, &metrics, jobs).await {
            // The database is unreachable: what queued while the writer waited for a connection
            // would wait as long again. It is answered now (503), and its clients retry.
            while let Ok(job) = rx.try_recv() {
                job.answer(Err(AppendError::Database(e.clone())));
            }
        }
        metrics
            .batch_micros
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
    }
    tracing::debug!("append writer stopped");
}

/// Natural batching oscillates under load: when a big batch is answered, its submitters come
/// back within microseconds, but the writer, already free, would take the first few of them as a
/// batch of their own and make the rest wait for that whole commit (measured: a quarter of the
/// batches held under 10 events at 64 submitters, each paying the ~0.7 ms a commit costs). So
/// when the queue holds much less than the previous batch, the writer yields to let them arrive,
/// until about as many are back, arrivals stop, or `GATHER_MAX` passes. A lone submitter never
/// waits (its previous batch was 1).
async fn gather(rx: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>, previous: usize) {
    if batch.len() * 2 >= previous {
        return;
    }
    let started = std::time::Instant::now();
    let mut quiet = 0;
    while batch.len() * 4 < previous * 3
        && batch.len() < MAX_BATCH_COMMANDS
        && quiet < 3
        && started.elapsed() < GATHER_MAX
    {
        tokio::task::yield_now().await;
        let before = batch.len();
        while batch.len() < MAX_BATCH_COMMANDS {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        quiet = if batch.len() == before { quiet + 1 } else { 0 };
    }
}

/// Why a batch was not written.
enum Failed {
    /// No connection could be had: nothing was sent.
    Connect(sqlx::Error),
    /// A statement failed: unless the error is the server's own answer, the batch may or may
    /// not have committed.
    Write(sqlx::Error),
}

/// One try at a batch on the writer's connection. After a failed statement the connection may be
/// broken and the batch may or may not have committed: the connection is closed, and the next try
/// starts on a fresh one and re-reads what it believes.
async fn attempt(
    pool: &PgPool,
    conn: &mut WriterConnection,
    known: &mut Knowledge,
    metrics: &AppendMetrics,
    requests: &[&AppendRequest],
    prepared: &[&Prepared],
) -> Result<Verdicts, Failed> {
    let c = match writer_connection(pool, conn).await {
        Ok(c) => c,
        Err(e) => {
            known.forget();
            return Err(Failed::Connect(e));
        }
    };
    // Everything of the batch but its statements is planning (one writer per metrics: exact).
    let (started, database_before) = (
        std::time::Instant::now(),
        metrics.database_micros.load(Relaxed),
    );
    let written = write_batch(c, known, metrics, requests, prepared).await;
    let database = metrics.database_micros.load(Relaxed) - database_before;
    metrics.planning_micros.fetch_add(
        (started.elapsed().as_micros() as u64).saturating_sub(database),
        Relaxed,
    );
    conn.used = Some(std::time::Instant::now());
    match written {
        Ok(verdicts) => Ok(verdicts),
        Err(e) => {
            conn.discard();
            known.forget();
            Err(Failed::Write(e))
        }
    }
}

/// Writes a batch; if the database refuses the batch as a whole, retries each command alone so
/// one poisoned command cannot fail its neighbours. Returns the error when the database could not
/// be reached at all, so the writer answers what queued meanwhile instead of letting it wait for
/// another connection timeout.
async fn write_jobs(
    pool: &PgPool,
    conn: &mut WriterConnection,
    known: &mut Knowledge,
    metrics: &AppendMetrics,
    jobs: Vec<Job>,
) -> Option<Arc<sqlx::Error>> {
    let requests: Vec<&AppendRequest> = jobs.iter().map(|j| &j.submitted.request).collect();
    let prepared: Vec<&Prepared> = jobs.iter().map(|j| &j.submitted.prepared).collect();
    let mut result = attempt(pool, conn, known, metrics, &requests, &prepared).await;
    // A server that restarted closed the writer's idle connection: the next statement is answered
    // with that error response (57P01 and the like), so it certainly was not applied. One more try
    // on a fresh connection makes a restart invisible to the commands that come after it.
    if let Err(Failed::Write(e @ sqlx::Error::Database(_))) = &result {
        if is_unavailable(e) {
            tracing::debug!(error = %e, "the writer's connection was closed; retrying on a new one");
            result = attempt(pool, conn, known, metrics, &requests, &prepared).await;
        }
    }
    match result {
        Ok(results) => {
            answer_apart(jobs, results);
            None
        }
        Err(Failed::Write(e)) if jobs.len() > 1 && !is_unavailable(&e) => {
            tracing::warn!(error = %e, commands = jobs.len(), "batch refused; retrying one by one");
            // Once the database is found unreachable, the rest fail at once rather than each
            // waiting for a connection.
            let mut unreachable: Option<Arc<sqlx::Error>> = None;
            for job in jobs {
                let result = match &unreachable {
                    Some(e) => Err(AppendError::Database(e.clone())),
                    None => {
                        let Submitted { request, prepared } = &*job.submitted;
                        match attempt(pool, conn, known, metrics, &[request], &[prepared]).await {
                            Ok(mut r) => r.pop().unwrap_or(Err(AppendError::Closed)),
                            Err(Failed::Connect(e) | Failed::Write(e)) => {
                                let e = Arc::new(e);
                                if is_unavailable(&e) {
                                    unreachable = Some(e.clone());
                                }
                                Err(AppendError::Database(e))
                            }
                        }
                    }
                };
                job.answer(result);
            }
            unreachable
        }
        Err(failed) => {
            let (e, connect) = match failed {
                Failed::Connect(e) => (e, true),
                Failed::Write(e) => (e, false),
            };
            if is_unavailable(&e) {
                tracing::warn!(error = %e, commands = jobs.len(), "append batch failed: database unavailable");
            } else {
                tracing::error!(error = %e, commands = jobs.len(), "append batch failed");
            }
            let e = Arc::new(e);
            for job in jobs {
                job.answer(Err(AppendError::Database(e.clone())));
            }
            connect.then_some(e)
        }
    }
}

/// Batches of at least this many commands are answered by a task of their own (see
/// [`answer_apart`]). Smaller ones are answered by the writer: at 16 submitters (batches of ~15)
/// and under HTTP load (~10) handing them over measured no better, and split the batches smaller.
const ANSWER_APART_MIN: usize = 24;

/// Answers the submitters of a batch that committed; a big batch from a task of its own, so that
/// the writer goes on to the next batch at once.
///
/// Answering wakes one task per submitter. Done by the writer, it took ~12 µs for ~55 submitters
/// in two batches out of three and ~500 µs in the third (every answer of such a batch slow, not
/// one of them: on these 2-core machines the writer's runtime thread and the threads it wakes take
/// turns on the cores), and the writer could take no batch meanwhile. Handed to a task, the
/// answers overlap the next batch's statement: the submitters still queued form that batch, the
/// ones being answered the one after, and the two halves alternate. Five full runs interleaved
/// with the writer answering: 64 submitters median 41.1k → 44.7k events/s (ADR 0001, fifth
/// session).
fn answer_apart(jobs: Vec<Job>, results: Verdicts) {
    if jobs.len() < ANSWER_APART_MIN {
        for (job, result) in jobs.into_iter().zip(results) {
            job.answer(result);
        }
        return;
    }
    tokio::spawn(async move {
        for (job, result) in jobs.into_iter().zip(results) {
            job.answer(result);
        }
    });
}

/// The writer's connection, and when it last ran a batch.
#[derive(Default)]
struct WriterConnection {
    conn: Option<PoolConnection<Postgres>>,
    used: Option<std::time::Instant>,
}

/// A connection idle this long is pinged before a batch. A statement that fails on a connection
/// the server closed meanwhile (a restart, a cut) leaves the batch's outcome unknown, a failed
/// ping does not; under load batches follow each other closer than this and nothing is added.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl WriterConnection {
    fn discard(&mut self) {
        if let Some(mut broken) = self.conn.take() {
            broken.close_on_drop();
        }
    }
}

async fn writer_connection<'c>(
    pool: &PgPool,
    conn: &'c mut WriterConnection,
) -> Result<&'c mut PgConnection, sqlx::Error> {
    use sqlx::Connection;
    let idle = conn.used.is_none_or(|t| t.elapsed() >= IDLE_CHECK);
    if let (true, Some(c)) = (idle, conn.conn.as_mut()) {
        if let Err(e) = answered(c.ping()).await {
            tracing::debug!(error = %e, "the writer's idle connection is gone; opening another");
            conn.discard();
        }
    }
    if conn.conn.is_none() {
        conn.conn = Some(pool.acquire().await?);
    }
    match conn.conn.as_mut() {
        Some(c) => Ok(&mut **c),
        None => Err(sqlx::Error::PoolClosed),
    }
}

/// How long the writer waits for Postgres to answer one of its statements. They take
/// milliseconds; one unanswered this long went into a network that drops packets without a reset,
/// where the socket would wait for TCP's own retransmission timeout (~15 minutes) and every append
/// of the process with it. The batch's outcome is then unknown: it is answered 503 like a cut
/// connection, and a retry under the same `Idempotency-Key` answers what committed.
const STATEMENT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `statement`, or a timed-out I/O error (unavailable: 503) after [`STATEMENT_WAIT`].
async fn answered<T>(
    statement: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(STATEMENT_WAIT, statement)
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "Postgres did not answer the append writer in time",
            )))
        })
}

/// Whether an error means the database is unreachable or going away (a restart, a failover, a
/// cut connection, no connection to be had) rather than refusing this statement: such failures
/// answer `503` and are worth retrying. SQLSTATE classes 08 (connection exception) and 57P
/// (the server shutting down or not accepting connections yet), and 53300 (too many
/// connections).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
        _ => false,
    }
}

/// One verdict per request, in order.
type Verdicts = Vec<Result<AppendOutcome, AppendError>>;

/// What the writer reads before planning a batch, in one statement (one snapshot).
struct Snapshot {
    head_position: i64,
    head_hash: [u8; 32],
    head_time: DateTime<Utc>,
    versions: HashMap<String, i64>,
    keys: HashMap<Vec<u8>, (Vec<u8>, StoredResponse)>,
}

type SnapshotRow = (
    i64,
    Vec<u8>,
    DateTime<Utc>,
    Vec<String>,
    Vec<i64>,
    Vec<Vec<u8>>,
    Vec<Vec<u8>>,
    Vec<i16>,
    Vec<Value>,
);

async fn read_snapshot(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
) -> Result<Snapshot, sqlx::Error> {
    let stream_ids: Vec<&str> = requests
        .iter()
        .flat_map(|r| r.streams.iter().map(|s| s.stream_id.as_str()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let key_hashes: Vec<&[u8]> = requests
        .iter()
        .filter_map(|r| r.idempotency.as_ref().map(|c| c.key_hash.as_slice()))
        .collect();
    let row = sqlx::query_as::<_, SnapshotRow>(
        "WITH v AS (SELECT stream_id, max(stream_version) AS version FROM events \
                     WHERE stream_id = ANY($1) GROUP BY stream_id), \
              k AS (SELECT key_hash, request_hmac, status, response FROM idempotency_keys \
                     WHERE key_hash = ANY($2)) \
         SELECT h.position, h.entry_hash, h.recorded_at, \
                ARRAY(SELECT stream_id FROM v ORDER BY stream_id), \
                ARRAY(SELECT version FROM v ORDER BY stream_id), \
                ARRAY(SELECT key_hash FROM k ORDER BY key_hash), \
                ARRAY(SELECT request_hmac FROM k ORDER BY key_hash), \
                ARRAY(SELECT status FROM k ORDER BY key_hash), \
                ARRAY(SELECT response FROM k ORDER BY key_hash) \
           FROM log_head h",
    )
    .bind(&stream_ids)
    .bind(&key_hashes)
    .fetch_one(&mut *conn);
    let row: SnapshotRow = answered(row).await?;
    let (position, hash, time, streams, versions, keys, hmacs, statuses, responses) = row;
    let mut stored_keys = HashMap::new();
    for (((key, hmac), status), body) in keys.into_iter().zip(hmacs).zip(statuses).zip(responses) {
        let status = u16::try_from(status).unwrap_or(500);
        stored_keys.insert(key, (hmac, StoredResponse { status, body }));
    }
    Ok(Snapshot {
        head_position: position,
        head_hash: hash.try_into().unwrap_or([0; 32]),
        head_time: time,
        versions: streams.into_iter().zip(versions).collect(),
        keys: stored_keys,
    })
}

/// What the writer believes about the log between batches: the head it last wrote and the
/// versions of streams it recently wrote. Exact while this process is the only writer; when it is
/// not, `append_batch` notices and the writer re-reads.
#[derive(Default)]
struct Knowledge {
    head: Option<(i64, [u8; 32], DateTime<Utc>)>,
    versions: HashMap<String, i64>,
}

/// Bounds the version cache; past it the cache starts over (a miss costs one read, not a bug).
const MAX_KNOWN_STREAMS: usize = 200_000;

impl Knowledge {
    fn forget(&mut self) {
        self.head = None;
        self.versions.clear();
    }
}

/// Plans and commits one batch. In the steady state that is a single round trip (`append_batch`);
/// a read is added when the writer lacks knowledge (first batch, a stream appended to with
/// `Any` it has not seen) or when `append_batch` finds a belief stale.
async fn write_batch(
    conn: &mut PgConnection,
    known: &mut Knowledge,
    metrics: &AppendMetrics,
    requests: &[&AppendRequest],
    prepared: &[&Prepared],
) -> Result<Verdicts, sqlx::Error> {
    let t0 = std::time::Instant::now();
    // Beliefs for this batch: the version of each stream it touches, and the stored keys.
    let mut assumed: HashMap<String, i64> = HashMap::new();
    let mut need_read = known.head.is_none();
    for stream in requests.iter().flat_map(|r| &r.streams) {
        if assumed.contains_key(&stream.stream_id) {
            continue;
        }
        let belief = match (known.versions.get(&stream.stream_id), stream.expected) {
            (Some(v), _) => Some(*v),
            (None, ExpectedVersion::NoStream) => Some(0),
            // The handler just read the stream at this version: likely still true.
            (None, ExpectedVersion::Exact(v)) => Some(v),
            (None, ExpectedVersion::Any) => None,
        };
        match belief {
            Some(v) => {
                assumed.insert(stream.stream_id.clone(), v);
            }
            None => need_read = true,
        }
    }
    let mut stored_keys: HashMap<Vec<u8>, (Vec<u8>, StoredResponse)> = HashMap::new();
    let mut read_done = false;
    let mut slot_refused: HashSet<usize> = HashSet::new();
    let mut erased_refused: HashSet<usize> = HashSet::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        if need_read {
            let reading = std::time::Instant::now();
            let snapshot = read_snapshot(conn, requests).await?;
            AppendMetrics::add(&metrics.database_micros, reading);
            known.head = Some((
                snapshot.head_position,
                snapshot.head_hash,
                snapshot.head_time,
            ));
            assumed = requests
                .iter()
                .flat_map(|r| &r.streams)
                .map(|s| {
                    let v = snapshot.versions.get(&s.stream_id).copied().unwrap_or(0);
                    (s.stream_id.clone(), v)
                })
                .collect();
            stored_keys = snapshot.keys;
            need_read = false;
            read_done = true;
        }
        let Some((head_position, head_hash, head_time)) = known.head else {
            need_read = true;
            continue;
        };
        let plan = plan_batch(
            requests,
            &assumed,
            &stored_keys,
            &slot_refused,
            &erased_refused,
        );
        // A refusal must rest on what the database says, not on a belief.
        let refuses = plan.verdicts.iter().flatten().any(|v| {
            matches!(
                v,
                Err(AppendError::VersionConflict { .. }) | Err(AppendError::IdempotencyKeyReuse)
            )
        });
        if refuses && !read_done {
            need_read = true;
            continue;
        }
        if plan.accepted.is_empty() {
            return Ok(plan.into_verdicts());
        }
        let mut rows = EventRows::default();
        // Which request each event row belongs to, to map refusals by event back to commands.
        let mut event_requests: Vec<usize> = Vec::new();
        let mut idem = IdempotencyRows::default();
        let mut slots = SlotRows::default();
        let mut position = head_position;
        let mut chain = head_hash;
        let recorded_at = now_micros().max(head_time);
        let mut versions = assumed.clone();
        let mut verdicts = plan.verdicts;
        let mut responses: HashMap<usize, StoredResponse> = HashMap::new();
        let mut scratch = Vec::with_capacity(2048);
        for &i in &plan.accepted {
            let (request, prepared) = (requests[i], prepared[i]);
            let first_position = position + 1;
            let mut after = Vec::with_capacity(request.streams.len());
            let mut canonical = prepared.events.iter();
            for stream in &request.streams {
                let version = versions.entry(stream.stream_id.clone()).or_insert(0);
                for event in &stream.events {
                    let Some(values) = canonical.next() else {
                        // Unreachable: `Prepared::new` made one per event of this request.
                        return Err(sqlx::Error::Protocol("an event was not prepared".into()));
                    };
                    position += 1;
                    *version += 1;
                    let row = CanonicalRow {
                        global_position: position,
                        event_id: event.event_id,
                        stream_id: &stream.stream_id,
                        stream_version: *version,
                        event_type: event.event_type,
                        schema_version: event.schema_version,
                        payload: values.payload.as_bytes(),
                        metadata: prepared.metadata.as_bytes(),
                        recorded_at,
                    };
                    let leaf = canonical_leaf_hash(&row, &mut scratch);
                    chain = entry_hash(&chain, &leaf);
                    event_requests.push(i);
                    rows.push(
                        row,
                        event.event_type,
                        values,
                        &prepared.metadata,
                        leaf,
                        chain,
                    );
                }
                after.push((stream.stream_id.clone(), *version));
            }
            if let Some(change) = request.slot {
                slots.push(i, change);
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
        for &(i, first) in &plan.duplicates {
            verdicts[i] = Some(match responses.get(&first) {
                Some(r) => Ok(AppendOutcome::Replayed(r.clone())),
                None => Err(AppendError::IdempotencyKeyReuse),
            });
        }
        // Streams that get events are checked by their unique version; the others are looked up.
        let (check_streams, check_versions): (Vec<&str>, Vec<i64>) = assumed
            .iter()
            .filter(|(s, v)| versions.get(*s) == Some(*v))
            .map(|(s, v)| (s.as_str(), *v))
            .unzip();
        let planned_micros = t0.elapsed().as_micros() as u64;
        let calling = std::time::Instant::now();
        // Binding (encoding the arrays) happens inside the call and counts as the database's.
        let called = sqlx::query_as::<_, (String, Vec<i32>)>(
            "SELECT outcome, refused FROM append_batch($1, $2, $3, $4, $5, $6, $7::text[], $8, \
             $9, $10, $11, $12, $13, $14, $15, $16::text[], $17, $18::text[]::jsonb[], \
             $19::text[]::jsonb[], $20, $21, $22, $23, \
             $24, $25, $26, $27, $28, $29)",
        )
        .bind(head_position)
        .bind(&check_streams)
        .bind(&check_versions)
        .bind(position)
        .bind(chain.as_slice())
        .bind(recorded_at)
        .bind(&slots.kinds)
        .bind(&slots.bookings)
        .bind(&slots.resources)
        .bind(&slots.starts)
        .bind(&slots.ends)
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
        .bind(&rows.sealed_rows)
        .bind(&rows.sealed_subjects)
        .fetch_one(&mut *conn);
        let called = answered(called).await.or_else(refusal_as_outcome);
        AppendMetrics::add(&metrics.database_micros, calling);
        let (outcome, refused) = called?;
        tracing::trace!(
            rounds,
            read_done,
            planned_micros,
            total_micros = t0.elapsed().as_micros() as u64,
            commands = requests.len(),
            events = rows.positions.len(),
            outcome,
            "append batch"
        );
        match outcome.as_str() {
            "appended" => {
                known.head = Some((position, chain, recorded_at));
                if known.versions.len() > MAX_KNOWN_STREAMS {
                    known.versions.clear();
                }
                known.versions.extend(versions);
                return Ok(verdicts
                    .into_iter()
                    .map(|v| v.unwrap_or(Err(AppendError::Closed)))
                    .collect());
            }
            "subject-erased" => {
                for index in refused {
                    // Postgres arrays are 1-based; these index event rows.
                    let k = usize::try_from(index).unwrap_or(0).saturating_sub(1);
                    if let Some(&i) = event_requests.get(k) {
                        erased_refused.insert(i);
                    }
                }
            }
            "slots-refused" => {
                for index in refused {
                    // Postgres arrays are 1-based.
                    let k = usize::try_from(index).unwrap_or(0).saturating_sub(1);
                    if let Some(&i) = slots.requests.get(k) {
                        slot_refused.insert(i);
                    }
                }
            }
            _ => {
                tracing::debug!("a belief about the log was stale; reading and planning again");
                known.forget();
                need_read = true;
            }
        }
    }
}

/// `append_batch` refuses a batch by failing its statement, which undoes all of it (ADR 0001):
/// refused slot changes raise `LG001` with their 1-based indexes in DETAIL, and a belief found
/// stale by a unique constraint (a stream version, an idempotency key stored meanwhile) is that
/// constraint's violation. Both become outcomes; any other error stays one (a clash on
/// `event_id` is a bug in the caller, not a stale belief, and retrying would not clear it).
fn refusal_as_outcome(e: sqlx::Error) -> Result<(String, Vec<i32>), sqlx::Error> {
    let sqlx::Error::Database(db) = &e else {
        return Err(e);
    };
    match (db.code().as_deref(), db.constraint()) {
        (Some("LG001"), _) => {
            let refused: Vec<i32> = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.detail())
                .unwrap_or_default()
                .split(',')
                .filter_map(|i| i.trim().parse().ok())
                .collect();
            // Without the indexes the batch would be planned again as it was, and refused again.
            if refused.is_empty() {
                return Err(e);
            }
            Ok(("slots-refused".to_owned(), refused))
        }
        (
            Some("23505"),
            Some("events_stream_id_stream_version_key" | "events_pkey" | "idempotency_keys_pkey"),
        ) => Ok(("stale".to_owned(), Vec::new())),
        _ => Err(e),
    }
}

/// Slot changes of a batch as column arrays, with the request each belongs to.
#[derive(Default)]
struct SlotRows {
    requests: Vec<usize>,
    kinds: Vec<&'static str>,
    bookings: Vec<Uuid>,
    resources: Vec<Option<Uuid>>,
    starts: Vec<Option<DateTime<Utc>>>,
    ends: Vec<Option<DateTime<Utc>>>,
}

impl SlotRows {
    fn push(&mut self, request: usize, change: SlotChange) {
        let (kind, booking, resource, slot) = match change {
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
        self.requests.push(request);
        self.kinds.push(kind);
        self.bookings.push(booking);
        self.resources.push(resource);
        self.starts.push(slot.map(|s| s.starts_at));
        self.ends.push(slot.map(|s| s.ends_at));
    }
}

/// Timestamps are stored in microseconds (Postgres' precision), so the hashed value is the stored one.
fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    now.duration_trunc(TimeDelta::microseconds(1))
        .unwrap_or(now)
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
    erased_refused: &HashSet<usize>,
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
        if erased_refused.contains(&i) {
            plan.verdicts[i] = Some(Err(AppendError::SubjectErased));
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
struct EventRows<'a> {
    positions: Vec<i64>,
    event_ids: Vec<Uuid>,
    stream_ids: Vec<String>,
    versions: Vec<i64>,
    types: Vec<&'static str>,
    schema_versions: Vec<i32>,
    /// Canonical JSON text; Postgres parses it into `jsonb`.
    payloads: Vec<&'a str>,
    metadata: Vec<&'a str>,
    recorded_at: Vec<DateTime<Utc>>,
    leaf_hashes: Vec<Vec<u8>>,
    entry_hashes: Vec<Vec<u8>>,
    /// Every sealed envelope in the batch: its event row (1-based, as Postgres arrays count) and
    /// the subject whose key sealed it, for the erased-subject guard of `append_batch`.
    sealed_rows: Vec<i32>,
    sealed_subjects: Vec<Uuid>,
}

impl<'a> EventRows<'a> {
    fn push(
        &mut self,
        row: CanonicalRow<'_>,
        event_type: &'static str,
        values: &'a PreparedEvent,
        metadata: &'a str,
        leaf: [u8; 32],
        entry: [u8; 32],
    ) {
        self.positions.push(row.global_position);
        self.event_ids.push(row.event_id);
        self.stream_ids.push(row.stream_id.to_owned());
        self.versions.push(row.stream_version);
        self.types.push(event_type);
        self.schema_versions.push(row.schema_version);
        self.payloads.push(&values.payload);
        self.metadata.push(metadata);
        self.recorded_at.push(row.recorded_at);
        self.leaf_hashes.push(leaf.to_vec());
        self.entry_hashes.push(entry.to_vec());
        let index = self.positions.len() as i32;
        self.sealed_subjects.extend_from_slice(&values.sealed);
        self.sealed_rows
            .resize(self.sealed_rows.len() + values.sealed.len(), index);
    }
}

/// The subjects of every sealed envelope (`{v, sub, kid, n, ct}`, see `ledger_events::pii::Sealed`)
/// anywhere in a payload, so that no event type that carries personal data can slip past the
/// erased-subject guard by holding it under a field the guard does not know.
fn sealed_subjects(value: &Value, out: &mut Vec<Uuid>) {
    match value {
        Value::Object(map) => {
            if map.contains_key("ct") && map.contains_key("kid") && map.contains_key("n") {
                if let Some(sub) = map
                    .get("sub")
                    .and_then(Value::as_str)
                    .and_then(|s| Uuid::parse_str(s).ok())
                {
                    out.push(sub);
                    return;
                }
            }
            map.values().for_each(|v| sealed_subjects(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| sealed_subjects(v, out)),
        _ => {}
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
        let plan = plan_batch(
            &[&a, &b],
            &HashMap::new(),
            &HashMap::new(),
            &refused,
            &HashSet::new(),
        );
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
        let plan = plan_batch(
            &[&a, &b, &c, &d],
            &HashMap::new(),
            &stored,
            &HashSet::new(),
            &HashSet::new(),
        );
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

    /// A batch big enough to be answered apart gives each submitter its own verdict, as one
    /// answered by the writer does.
    #[tokio::test]
    async fn a_batch_answered_apart_gives_each_submitter_its_own_verdict() {
        for size in [
            1,
            ANSWER_APART_MIN - 1,
            ANSWER_APART_MIN,
            3 * ANSWER_APART_MIN,
        ] {
            let mut jobs = Vec::new();
            let mut answers = Vec::new();
            let mut results = Vec::new();
            for i in 0..size {
                let request = request(&format!("s-{i}"), ExpectedVersion::NoStream, 1);
                let prepared = Prepared::new(&request);
                let (reply, answer) = oneshot::channel();
                jobs.push(Job {
                    submitted: Arc::new(Submitted { request, prepared }),
                    reply,
                });
                answers.push(answer);
                results.push(Ok(AppendOutcome::Replayed(StoredResponse {
                    status: 200,
                    body: Value::from(i),
                })));
            }
            answer_apart(jobs, results);
            for (i, answer) in answers.into_iter().enumerate() {
                let outcome = answer.await.expect("answered");
                assert_eq!(
                    outcome.ok(),
                    Some(AppendOutcome::Replayed(StoredResponse {
                        status: 200,
                        body: Value::from(i),
                    })),
                    "submitter {i} of {size}"
                );
            }
        }
    }

    #[test]
    fn every_sealed_envelope_is_found_wherever_it_sits() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let envelope = |sub: Uuid| serde_json::json!({"v": 1, "sub": sub, "kid": Uuid::now_v7(), "n": "x", "ct": "y"});
        let payload = serde_json::json!({
            "booking_id": Uuid::now_v7(),
            "sub": "not an envelope",
            "customer": envelope(a),
            "nested": {"list": [1, envelope(b), {"ct": "no subject"}]},
        });
        let mut found = Vec::new();
        sealed_subjects(&payload, &mut found);
        found.sort();
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(found, expected);
    }
}
