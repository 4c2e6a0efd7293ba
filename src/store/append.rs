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
//!
//! In the steady state the read is skipped (the writer knows the head it last wrote and the
//! versions of the streams it wrote), and step 2 happens while the batch before is still in
//! Postgres, on the head that batch will leave (see `Queue`): under load the batch is sent behind
//! the one running, on the writer's own pipelining connection (`store::wire`), and Postgres starts
//! it as soon as the one before it commits.

use super::wire::{into_sqlx, ServerError, Wire, WireConfig};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use ledger_events::booking::TimeSlot;
use ledger_events::chain::{canonical_json_string, canonical_leaf_hash, entry_hash, CanonicalRow};
use ledger_events::envelope::{ExpectedVersion, Metadata, NewEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
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
    metadata: Arc<str>,
    /// One per event, in request order (streams, then their events).
    events: Vec<PreparedEvent>,
}

struct PreparedEvent {
    payload: Arc<str>,
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
                    payload: canonical_json_string(&event.payload).into(),
                    sealed,
                }
            })
            .collect();
        Prepared {
            metadata: canonical_json_string(&metadata).into(),
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
    /// Batches sent as planned while the batch before them was in flight.
    pub batches_ahead: AtomicU64,
    /// Planning done while a batch was in flight (inside `database_micros`, not on the path).
    pub ahead_micros: AtomicU64,
    /// Plans made ahead and dropped: the batch before did not commit as planned (a stale
    /// belief, a refused slot, an error), or a command needed a read.
    pub ahead_dropped: AtomicU64,
    /// Binding a batch's statement and writing it to the socket (inside `database_micros`).
    pub sending_micros: AtomicU64,
    /// Batches sent on the writer's connection while the batch before them was still running
    /// (among `batches_ahead`).
    pub batches_sent_ahead: AtomicU64,
}

impl AppendMetrics {
    fn add(counter: &AtomicU64, since: std::time::Instant) {
        counter.fetch_add(since.elapsed().as_micros() as u64, Relaxed);
    }
}

impl Appender {
    /// Starts the writer task. It ends when every `Appender` clone has been dropped, after
    /// finishing what was queued.
    ///
    /// The writer reads through `pool` and writes on a connection of its own to the same
    /// database (`database_url`, the URL `pool` was made from; see `store::wire`).
    pub fn spawn(
        pool: PgPool,
        database_url: &str,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let config = WireConfig::parse(database_url).map_err(anyhow::Error::msg)?;
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let metrics = Arc::new(AppendMetrics::default());
        let handle = tokio::spawn(run_writer(pool, config, rx, metrics.clone()));
        Ok((Appender { queue, metrics }, handle))
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

async fn run_writer(
    pool: PgPool,
    config: WireConfig,
    rx: mpsc::Receiver<Job>,
    metrics: Arc<AppendMetrics>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH_COMMANDS);
    // One connection for the writer's whole life: its backend keeps the prepared statement and
    // the plan of `append_batch` warm, and batches are pipelined on it (see `Queue::beside`).
    let mut conn = WriterConnection::default();
    let mut known = Knowledge::default();
    let mut queue = Queue::new(rx);
    let mut previous = 0;
    loop {
        let mut gathering = std::time::Instant::now();
        let (jobs, start) = if let Some(sent) = queue.sent.take() {
            // Sent while the batch before it ran, which committed: it is in Postgres already.
            let jobs: Vec<Job> = queue.jobs.drain(..sent.draft.planned()).collect();
            (jobs, Start::Sent(sent))
        } else if queue.jobs.is_empty() {
            // Nothing came in while the last batch was in Postgres: its answers go out now.
            queue.answer();
            if queue.rx.recv_many(&mut batch, MAX_BATCH_COMMANDS).await == 0 {
                break;
            }
            gathering = std::time::Instant::now();
            if batch.len() * 2 < previous {
                gather(&mut queue.rx, &mut batch, previous).await;
            }
            (std::mem::take(&mut batch), Start::Fresh)
        } else {
            let (mut jobs, mut ahead) = queue.take(&known, &metrics);
            // A small batch was answered at once (see `Queue::settle`): its submitters, back
            // within microseconds, join the commands that came in while it was written. Without
            // this the two would take turns as two half-size batches (measured at 16 submitters:
            // batches of 8, ~20% fewer events per second).
            let before = jobs.len();
            if previous < ANSWER_APART_MIN {
                gather(&mut queue.rx, &mut jobs, previous + before).await;
            }
            if let Some(draft) = ahead.as_mut() {
                let planning = std::time::Instant::now();
                draft.add_unread(&jobs[before..], &known.versions, None);
                AppendMetrics::add(&metrics.planning_micros, planning);
            }
            let start = match ahead.filter(|d| !d.needs_read() && d.planned() == jobs.len()) {
                Some(draft) => Start::Planned(Box::new(draft)),
                None => Start::Fresh,
            };
            (jobs, start)
        };
        AppendMetrics::add(&metrics.gathering_micros, gathering);
        previous = jobs.len();
        let started = std::time::Instant::now();
        let events: usize = jobs
            .iter()
            .flat_map(|j| &j.submitted.request.streams)
            .map(|s| s.events.len())
            .sum();
        metrics.batches.fetch_add(1, Relaxed);
        metrics.commands.fetch_add(jobs.len() as u64, Relaxed);
        metrics.events.fetch_add(events as u64, Relaxed);
        match start {
            Start::Fresh => {}
            Start::Planned(_) => {
                metrics.batches_ahead.fetch_add(1, Relaxed);
            }
            Start::Sent(_) => {
                metrics.batches_ahead.fetch_add(1, Relaxed);
                metrics.batches_sent_ahead.fetch_add(1, Relaxed);
            }
        }
        let writer = Writer {
            pool: &pool,
            config: &config,
            metrics: &metrics,
        };
        if let Some(e) = write_jobs(&writer, &mut conn, &mut known, jobs, start, &mut queue).await {
            // The database is unreachable: what queued while the writer waited for a connection
            // would wait as long again. It is answered now (503), and its clients retry.
            queue.answer();
            for job in std::mem::take(&mut queue.jobs) {
                job.answer(Err(AppendError::Database(e.clone())));
            }
            queue.draft = None;
            queue.sent = None;
            while let Ok(job) = queue.rx.try_recv() {
                job.answer(Err(AppendError::Database(e.clone())));
            }
        }
        metrics
            .batch_micros
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
    }
    queue.answer();
    tracing::debug!("append writer stopped");
}

/// The writer's side of the queue, and the batch it prepares while another is in Postgres.
///
/// A batch's planning (beliefs, positions, the hash chain) took ~75 µs of every ~800 µs cycle at
/// 64 submitters, with Postgres idle meanwhile. So while a batch's statement runs, the writer takes
/// the commands that arrive and plans each as it comes, against the head that batch leaves if it
/// commits. Once as many are planned as were answered last (the submitters coming back), that
/// batch is sent on the same connection behind the one running (`sent`): Postgres starts it the
/// moment the one before commits, with no round trip of the host in between. If the one before
/// does not commit (a belief was stale, a slot refused, an error), the batch sent behind it finds
/// the head elsewhere and is refused as stale (`append_batch` checks the position and entry hash
/// of the head a batch was planned on), and its commands are planned again, as before. So a plan
/// on a head that did not come to be cannot be written.
struct Queue {
    rx: mpsc::Receiver<Job>,
    /// Commands taken while a batch was in flight, in queue order: the next batch.
    jobs: Vec<Job>,
    /// The plan of `jobs` (of its first `planned()` commands), on the head named by its base.
    draft: Option<Draft>,
    /// The next batch, sent behind the one in flight: the first `planned()` commands of `jobs`.
    sent: Option<Sent>,
    /// A committed batch's answers, held until the next batch is on its way (see `beside`).
    answers: Option<(Vec<Job>, Verdicts)>,
    /// How many submitters were answered last: the batch to send behind the one in flight is
    /// complete when as many are planned.
    returning: usize,
    closed: bool,
}

impl Queue {
    fn new(rx: mpsc::Receiver<Job>) -> Self {
        Queue {
            rx,
            jobs: Vec::new(),
            draft: None,
            sent: None,
            answers: None,
            returning: 0,
            closed: false,
        }
    }

    /// Answers the last committed batch, if that has not happened yet.
    fn answer(&mut self) {
        if let Some((jobs, verdicts)) = self.answers.take() {
            self.returning = jobs.len();
            answer_apart(jobs, verdicts);
        }
    }

    /// Answers a committed batch: a small one at once, so that its submitters can join the next
    /// batch; a big one once the next batch is on its way (at once if it already is), since half
    /// the submitters are already queued for it (see [`answer_apart`]).
    fn settle(&mut self, jobs: Vec<Job>, verdicts: Verdicts) {
        self.answer();
        if jobs.len() < ANSWER_APART_MIN || self.sent.is_some() {
            self.returning = jobs.len();
            answer_apart(jobs, verdicts);
        } else {
            self.answers = Some((jobs, verdicts));
        }
    }

    /// The next batch, and its plan if it still holds: made on the head the writer now knows, with
    /// every command of the batch planned.
    fn take(&mut self, known: &Knowledge, metrics: &AppendMetrics) -> (Vec<Job>, Option<Draft>) {
        let jobs = std::mem::take(&mut self.jobs);
        let head = known.head.map(|(position, hash, _)| (position, hash));
        let draft = self.draft.take();
        let planned = draft.as_ref().is_some_and(|d| d.planned() > 0);
        let draft =
            draft.filter(|d| Some(d.base) == head && !d.needs_read() && d.planned() == jobs.len());
        if planned && draft.is_none() {
            metrics.ahead_dropped.fetch_add(1, Relaxed);
        }
        (jobs, draft)
    }

    /// The batch in flight did not commit, for certain (its statement was answered with a
    /// refusal or an error): the one sent behind it cannot have written anything (it extends a
    /// head that did not come to be), and its commands are planned again.
    fn drop_sent(&mut self, metrics: &AppendMetrics) {
        if self.sent.take().is_some() {
            metrics.ahead_dropped.fetch_add(1, Relaxed);
        }
    }

    /// The batch in flight failed with `e`. If the server answered, nothing was written (see
    /// `drop_sent`); if not (a cut connection, no answer in time), the batch in flight may have
    /// committed and so may the one sent behind it: its submitters are answered as unavailable,
    /// and a retry under the same idempotency key answers what committed.
    fn fail_sent(&mut self, e: &sqlx::Error, metrics: &AppendMetrics) {
        if matches!(e, sqlx::Error::Database(_)) {
            return self.drop_sent(metrics);
        }
        let Some(sent) = self.sent.take() else {
            return;
        };
        let unknown = Arc::new(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            format!("the append before this one failed with its outcome unknown: {e}"),
        )));
        let n = sent.draft.planned().min(self.jobs.len());
        for job in self.jobs.drain(..n) {
            job.answer(Err(AppendError::Database(unknown.clone())));
        }
    }

    /// Runs `call` (the statement of the batch `flight`) to its end. Once it is sent, the previous
    /// batch is answered, and the commands that arrive meanwhile are taken and planned on the head
    /// `flight` leaves; when they are complete (`returning`), they are sent behind it on `wire`.
    async fn beside(
        &mut self,
        mut call: Call,
        flight: &Draft,
        known: &HashMap<String, i64>,
        metrics: &AppendMetrics,
        wire: &Wire,
    ) -> Called {
        let sending = std::time::Instant::now();
        let first = futures::poll!(call.as_mut());
        AppendMetrics::add(&metrics.sending_micros, sending);
        if let std::task::Poll::Ready(done) = first {
            self.answer();
            return done;
        }
        self.answer();
        let base = (flight.position, flight.chain);
        if self.draft.as_ref().is_none_or(|d| d.base != base) {
            if self.draft.as_ref().is_some_and(|d| d.planned() > 0) {
                metrics.ahead_dropped.fetch_add(1, Relaxed);
            }
            self.draft = Some(Draft::new(base, now_micros().max(flight.recorded_at)));
        }
        self.plan(flight, known, metrics);
        self.send_behind(wire, metrics);
        loop {
            let room = MAX_BATCH_COMMANDS.saturating_sub(self.jobs.len());
            tokio::select! {
                biased;
                done = &mut call => return done,
                taken = self.rx.recv_many(&mut self.jobs, room), if room > 0 && !self.closed => {
                    if taken == 0 {
                        self.closed = true;
                    }
                    self.plan(flight, known, metrics);
                    self.send_behind(wire, metrics);
                }
            }
        }
    }

    /// Plans the commands taken but not planned yet, until one needs a read.
    fn plan(&mut self, flight: &Draft, known: &HashMap<String, i64>, metrics: &AppendMetrics) {
        let Some(draft) = self.draft.as_mut() else {
            return;
        };
        if draft.needs_read() || draft.planned() >= self.jobs.len() {
            return;
        }
        let planning = std::time::Instant::now();
        draft.add_unread(&self.jobs[draft.planned()..], known, Some(&flight.versions));
        AppendMetrics::add(&metrics.ahead_micros, planning);
    }

    /// Sends the planned batch behind the one in flight once it is whole: every command taken is
    /// planned, as many as were answered last (and at least `SEND_BEHIND_MIN`), none needs a
    /// read, and it appends something. What arrives after waits for the next batch.
    fn send_behind(&mut self, wire: &Wire, metrics: &AppendMetrics) {
        let whole = self.draft.as_ref().is_some_and(|d| {
            self.sent.is_none()
                && d.planned() == self.jobs.len()
                && d.planned() >= self.returning.max(SEND_BEHIND_MIN)
                && !d.needs_read()
                && !d.accepted.is_empty()
        });
        if !whole {
            return;
        }
        let Some(draft) = self.draft.take() else {
            return;
        };
        let sending = std::time::Instant::now();
        let draft = Arc::new(draft);
        let mut call = Draft::send(&draft, wire);
        // The first poll hands the statement to the connection; a call that ends at once keeps
        // its outcome for when its turn comes.
        if let std::task::Poll::Ready(done) = futures::FutureExt::poll_unpin(
            &mut call,
            &mut std::task::Context::from_waker(std::task::Waker::noop()),
        ) {
            call = Box::pin(std::future::ready(done));
        }
        AppendMetrics::add(&metrics.sending_micros, sending);
        self.sent = Some(Sent { draft, call });
    }
}

/// Natural batching oscillates under load: when a big batch is answered, its submitters come
/// back within microseconds, but the writer, already free, would take the first few of them as a
/// batch of their own and make the rest wait for that whole commit (measured: a quarter of the
/// batches held under 10 events at 64 submitters, each paying the ~0.7 ms a commit costs). So
/// when the queue holds much less than the submitters just answered (`expected`), the writer
/// yields to let them arrive, until about as many are back, arrivals stop, or `GATHER_MAX`
/// passes. A lone submitter never waits (its previous batch was 1).
async fn gather(rx: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>, expected: usize) {
    let started = std::time::Instant::now();
    let mut quiet = 0;
    while batch.len() * 4 < expected * 3
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

/// What every try at a batch needs: where to read, where to connect, what to count.
struct Writer<'w> {
    pool: &'w PgPool,
    config: &'w WireConfig,
    metrics: &'w AppendMetrics,
}

/// How a batch starts: planned from scratch, planned while the batch before was in flight, or
/// already sent behind it on the writer's connection.
enum Start {
    Fresh,
    Planned(Box<Draft>),
    Sent(Sent),
}

/// One try at a batch on the writer's connection, from `start`. After a failed statement the
/// connection may be broken and the batch may or may not have committed: the connection is
/// closed, and the next try starts on a fresh one and re-reads what it believes. With a `queue`,
/// the commands that arrive while the batch's statement runs are planned meanwhile, and may be
/// sent behind it.
async fn attempt(
    writer: &Writer<'_>,
    conn: &mut WriterConnection,
    known: &mut Knowledge,
    batch: &[&Submitted],
    start: Start,
    mut queue: Option<&mut Queue>,
) -> Result<Verdicts, Failed> {
    let metrics = writer.metrics;
    let wire = match (&start, conn.wire.as_ref()) {
        // Already on this connection: whatever became of it, the call tells.
        (Start::Sent(_), Some(wire)) => wire,
        _ => match writer_connection(writer.config, conn).await {
            Ok(wire) => wire,
            Err(e) => {
                known.forget();
                return Err(Failed::Connect(e));
            }
        },
    };
    // Everything of the batch but its statements is planning (one writer per metrics: exact).
    let (started, database_before) = (
        std::time::Instant::now(),
        metrics.database_micros.load(Relaxed),
    );
    let written = write_batch(writer, wire, known, batch, start, queue.as_deref_mut()).await;
    let database = metrics.database_micros.load(Relaxed) - database_before;
    metrics.planning_micros.fetch_add(
        (started.elapsed().as_micros() as u64).saturating_sub(database),
        Relaxed,
    );
    conn.used = Some(std::time::Instant::now());
    match written {
        Ok(verdicts) => Ok(verdicts),
        Err(e) => {
            if let Some(queue) = queue {
                queue.fail_sent(&e, metrics);
            }
            conn.discard();
            known.forget();
            Err(Failed::Write(e))
        }
    }
}

/// Writes a batch; if the database refuses the batch as a whole, retries each command alone so
/// one poisoned command cannot fail its neighbours. Returns the error when the database could not
/// be reached at all, so the writer answers what queued meanwhile instead of letting it wait for
/// another connection timeout. A committed batch is answered once the next one is on its way
/// (`Queue::beside`).
async fn write_jobs(
    writer: &Writer<'_>,
    conn: &mut WriterConnection,
    known: &mut Knowledge,
    jobs: Vec<Job>,
    start: Start,
    queue: &mut Queue,
) -> Option<Arc<sqlx::Error>> {
    let batch: Vec<&Submitted> = jobs.iter().map(|j| &*j.submitted).collect();
    let mut result = attempt(writer, conn, known, &batch, start, Some(&mut *queue)).await;
    // A server that restarted closed the writer's idle connection: the next statement is answered
    // with that error response (57P01 and the like), so it certainly was not applied. One more try
    // on a fresh connection makes a restart invisible to the commands that come after it.
    if let Err(Failed::Write(e @ sqlx::Error::Database(_))) = &result {
        if is_unavailable(e) {
            tracing::debug!(error = %e, "the writer's connection was closed; retrying on a new one");
            result = attempt(writer, conn, known, &batch, Start::Fresh, Some(&mut *queue)).await;
        }
    }
    match result {
        Ok(results) => {
            queue.settle(jobs, results);
            None
        }
        Err(Failed::Write(e)) if jobs.len() > 1 && !is_unavailable(&e) => {
            tracing::warn!(error = %e, commands = jobs.len(), "batch refused; retrying one by one");
            queue.answer();
            // Once the database is found unreachable, the rest fail at once rather than each
            // waiting for a connection.
            let mut unreachable: Option<Arc<sqlx::Error>> = None;
            for job in jobs {
                let result = match &unreachable {
                    Some(e) => Err(AppendError::Database(e.clone())),
                    None => {
                        let one = [&*job.submitted];
                        match attempt(writer, conn, known, &one, Start::Fresh, None).await {
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
            queue.answer();
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

/// Batches of fewer commands are not sent behind the one running: under HTTP load (batches of
/// ~10) that split the batches smaller, for no gain measured (ADR 0001, seventh session); the
/// many submitters it serves fill ~32.
const SEND_BEHIND_MIN: usize = 24;

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
    wire: Option<Wire>,
    used: Option<std::time::Instant>,
}

/// A connection idle this long is pinged before a batch. A statement that fails on a connection
/// the server closed meanwhile (a restart, a cut) leaves the batch's outcome unknown, a failed
/// ping does not; under load batches follow each other closer than this and nothing is added.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl WriterConnection {
    fn discard(&mut self) {
        self.wire = None;
    }
}

async fn writer_connection<'c>(
    config: &WireConfig,
    conn: &'c mut WriterConnection,
) -> Result<&'c Wire, sqlx::Error> {
    if conn.wire.as_ref().is_some_and(Wire::is_closed) {
        tracing::debug!("the writer's connection is closed; opening another");
        conn.discard();
    }
    let idle = conn.used.is_none_or(|t| t.elapsed() >= IDLE_CHECK);
    if let (true, Some(wire)) = (idle, conn.wire.as_ref()) {
        if let Err(e) = answered(wire.ping()).await {
            tracing::debug!(error = %e, "the writer's idle connection is gone; opening another");
            conn.discard();
        }
    }
    if conn.wire.is_none() {
        conn.wire = Some(answered(Wire::connect(config, APPEND_BATCH)).await?);
    }
    match conn.wire.as_ref() {
        Some(wire) => Ok(wire),
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

async fn read_snapshot(pool: &PgPool, batch: &[&Submitted]) -> Result<Snapshot, sqlx::Error> {
    let stream_ids: Vec<&str> = batch
        .iter()
        .flat_map(|s| s.request.streams.iter().map(|s| s.stream_id.as_str()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let key_hashes: Vec<&[u8]> = batch
        .iter()
        .filter_map(|s| {
            s.request
                .idempotency
                .as_ref()
                .map(|c| c.key_hash.as_slice())
        })
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
    .fetch_one(pool);
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

/// Plans and commits one batch. In the steady state that is a single round trip (`append_batch`),
/// planned while the batch before it was in flight (`ahead`); a read is added when the writer
/// lacks knowledge (first batch, a stream appended to with `Any` it has not seen) or when
/// `append_batch` finds a belief stale.
async fn write_batch(
    writer: &Writer<'_>,
    wire: &Wire,
    known: &mut Knowledge,
    batch: &[&Submitted],
    start: Start,
    mut queue: Option<&mut Queue>,
) -> Result<Verdicts, sqlx::Error> {
    let metrics = writer.metrics;
    let t0 = std::time::Instant::now();
    let mut read = Reading {
        needed: known.head.is_none(),
        snapshot: None,
        slot_refused: HashSet::new(),
        erased_refused: HashSet::new(),
    };
    let (mut planned, mut sent) = match start {
        Start::Fresh => (None, None),
        Start::Planned(draft) => (Some(*draft), None),
        Start::Sent(sent) => (None, Some(sent)),
    };
    let mut rounds = 0;
    loop {
        rounds += 1;
        let (draft, call) = match sent.take() {
            Some(Sent { draft, call }) => (draft, call),
            None => {
                let draft = match planned.take() {
                    Some(draft) => draft,
                    None => match plan_anew(writer, known, batch, &mut read).await? {
                        Some(draft) => draft,
                        None => continue,
                    },
                };
                if draft.planned() != batch.len() {
                    // Unreachable: after a read every stream has a belief, so every request is
                    // planned.
                    return Err(sqlx::Error::Protocol(
                        "a batch was not planned whole".into(),
                    ));
                }
                if draft.accepted.is_empty() {
                    return Ok(draft.into_verdicts());
                }
                let draft = Arc::new(draft);
                let call = Draft::send(&draft, wire);
                (draft, call)
            }
        };
        let planned_micros = t0.elapsed().as_micros() as u64;
        let calling = std::time::Instant::now();
        // Binding (encoding the arrays) happens inside the call and counts as the database's.
        let called = match queue.as_deref_mut() {
            Some(queue) => {
                queue
                    .beside(call, &draft, &known.versions, metrics, wire)
                    .await
            }
            None => call.await,
        }
        .or_else(refusal_as_outcome);
        AppendMetrics::add(&metrics.database_micros, calling);
        let (outcome, refused) = called?;
        let Ok(draft) = Arc::try_unwrap(draft) else {
            // Unreachable: the call that held the plan has ended.
            return Err(sqlx::Error::Protocol("a sent plan was still held".into()));
        };
        tracing::trace!(
            rounds,
            read_done = read.snapshot.is_some(),
            planned_micros,
            total_micros = t0.elapsed().as_micros() as u64,
            commands = batch.len(),
            events = draft.rows.positions.len(),
            outcome,
            "append batch"
        );
        if outcome != "appended" {
            // Nothing of this batch was written: the one sent behind it extends a head that did
            // not come to be.
            if let Some(queue) = queue.as_deref_mut() {
                queue.drop_sent(metrics);
            }
        }
        match outcome.as_str() {
            "appended" => {
                known.head = Some((draft.position, draft.chain, draft.recorded_at));
                if known.versions.len() > MAX_KNOWN_STREAMS {
                    known.versions.clear();
                }
                let (versions, verdicts) = draft.into_committed();
                known.versions.extend(versions);
                return Ok(verdicts);
            }
            "subject-erased" => {
                for index in refused {
                    // Postgres arrays are 1-based; these index event rows.
                    let k = usize::try_from(index).unwrap_or(0).saturating_sub(1);
                    if let Some(&i) = draft.event_requests.get(k) {
                        read.erased_refused.insert(i);
                    }
                }
            }
            "slots-refused" => {
                for index in refused {
                    // Postgres arrays are 1-based.
                    let k = usize::try_from(index).unwrap_or(0).saturating_sub(1);
                    if let Some(&i) = draft.slots.requests.get(k) {
                        read.slot_refused.insert(i);
                    }
                }
            }
            _ => {
                tracing::debug!("a belief about the log was stale; reading and planning again");
                known.forget();
                read.needed = true;
            }
        }
    }
}

/// What a batch's planning has learnt from the database: whether it must read, what it read, and
/// the commands refused so far.
struct Reading {
    needed: bool,
    snapshot: Option<Snapshot>,
    slot_refused: HashSet<usize>,
    erased_refused: HashSet<usize>,
}

/// Plans `batch` on what the writer knows, reading first when it must; `None` when the plan
/// found it must read, and so try again.
async fn plan_anew(
    writer: &Writer<'_>,
    known: &mut Knowledge,
    batch: &[&Submitted],
    read: &mut Reading,
) -> Result<Option<Draft>, sqlx::Error> {
    if read.needed {
        let reading = std::time::Instant::now();
        let snapshot = read_snapshot(writer.pool, batch).await?;
        AppendMetrics::add(&writer.metrics.database_micros, reading);
        known.head = Some((
            snapshot.head_position,
            snapshot.head_hash,
            snapshot.head_time,
        ));
        read.snapshot = Some(snapshot);
        read.needed = false;
    }
    let Some((head_position, head_hash, head_time)) = known.head else {
        read.needed = true;
        return Ok(None);
    };
    let no_keys = HashMap::new();
    let given = Given {
        beliefs: match &read.snapshot {
            Some(snapshot) => Beliefs::Read(&snapshot.versions),
            None => Beliefs::Known {
                known: &known.versions,
                overlay: None,
            },
        },
        stored_keys: read.snapshot.as_ref().map_or(&no_keys, |s| &s.keys),
        slot_refused: &read.slot_refused,
        erased_refused: &read.erased_refused,
    };
    let mut draft = Draft::new((head_position, head_hash), now_micros().max(head_time));
    for submitted in batch {
        draft.add(&submitted.request, &submitted.prepared, &given);
    }
    if draft.unprepared {
        // Unreachable: `Prepared::new` made one per event of each request.
        return Err(sqlx::Error::Protocol("an event was not prepared".into()));
    }
    // A refusal must rest on what the database says, not on a belief.
    if draft.needs_read() && read.snapshot.is_none() {
        read.needed = true;
        return Ok(None);
    }
    Ok(Some(draft))
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
                .try_downcast_ref::<ServerError>()
                .and_then(|server| server.detail())
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

/// What a batch's plan rests on besides the requests.
struct Given<'a> {
    beliefs: Beliefs<'a>,
    /// Idempotency keys found stored by a read.
    stored_keys: &'a HashMap<Vec<u8>, (Vec<u8>, StoredResponse)>,
    /// Requests the database refused in an earlier round of the same batch.
    slot_refused: &'a HashSet<usize>,
    erased_refused: &'a HashSet<usize>,
}

/// Where the version a stream is believed at comes from.
enum Beliefs<'a> {
    /// What the writer knows (the versions the batch in flight leaves first, then those it
    /// wrote before) and, for a stream it does not know, what the command expects: a handler
    /// that just read the stream at a version is likely still right, and one that is not is
    /// refused by the database.
    Known {
        known: &'a HashMap<String, i64>,
        overlay: Option<&'a HashMap<String, i64>>,
    },
    /// A snapshot just read: a stream not in it has no events.
    Read(&'a HashMap<String, i64>),
}

impl Beliefs<'_> {
    fn of(&self, stream: &StreamAppend) -> Option<i64> {
        match self {
            Beliefs::Known { known, overlay } => overlay
                .and_then(|o| o.get(&stream.stream_id))
                .or_else(|| known.get(&stream.stream_id))
                .copied()
                .or(match stream.expected {
                    ExpectedVersion::NoStream => Some(0),
                    ExpectedVersion::Exact(v) => Some(v),
                    ExpectedVersion::Any => None,
                }),
            Beliefs::Read(versions) => Some(versions.get(&stream.stream_id).copied().unwrap_or(0)),
        }
    }
}

/// A batch's plan, one command at a time, in queue order, as if they had come one at a time:
/// version checks, idempotency, gapless positions and the hash chain on top of `base`, and the
/// rows `append_batch` writes.
struct Draft {
    /// The head (position, entry hash) this plan extends.
    base: (i64, [u8; 32]),
    recorded_at: DateTime<Utc>,
    /// The head after the commands planned so far.
    position: i64,
    chain: [u8; 32],
    /// The version each stream the batch touches is believed at before it, and its version after
    /// the commands planned so far.
    assumed: HashMap<String, i64>,
    versions: HashMap<String, i64>,
    /// Idempotency keys of accepted requests: (request fingerprint, request).
    claimed: HashMap<[u8; 32], ([u8; 32], usize)>,
    /// Requests to append, in queue order.
    accepted: Vec<usize>,
    /// Requests repeating the idempotency key of an accepted request in the same batch: (i, first).
    duplicates: Vec<(usize, usize)>,
    /// One per request planned: its verdict, `None` for a duplicate until the batch is done.
    verdicts: Vec<Option<Result<AppendOutcome, AppendError>>>,
    responses: HashMap<usize, StoredResponse>,
    rows: EventRows,
    /// The request each event row belongs to, to map refusals by event back to commands.
    event_requests: Vec<usize>,
    idem: IdempotencyRows,
    slots: SlotRows,
    /// A stream with nothing to believe its version from (appended with `Any`, not known).
    unknown: bool,
    /// A refusal resting on a belief (a version, a key): it must be confirmed by a read.
    refused_on_belief: bool,
    /// A request whose events were not all prepared (a bug, never expected).
    unprepared: bool,
    scratch: Vec<u8>,
}

impl Draft {
    fn new(base: (i64, [u8; 32]), recorded_at: DateTime<Utc>) -> Self {
        Draft {
            base,
            recorded_at,
            position: base.0,
            chain: base.1,
            assumed: HashMap::new(),
            versions: HashMap::new(),
            claimed: HashMap::new(),
            accepted: Vec::new(),
            duplicates: Vec::new(),
            verdicts: Vec::new(),
            responses: HashMap::new(),
            rows: EventRows::default(),
            event_requests: Vec::new(),
            idem: IdempotencyRows::default(),
            slots: SlotRows::default(),
            unknown: false,
            refused_on_belief: false,
            unprepared: false,
            scratch: Vec::with_capacity(2048),
        }
    }

    /// How many requests are planned.
    fn planned(&self) -> usize {
        self.verdicts.len()
    }

    /// Whether the plan cannot go out as it is: the next request, or a refusal, needs a read.
    fn needs_read(&self) -> bool {
        self.unknown || self.refused_on_belief || self.unprepared
    }

    /// Plans the next request. When it needs a belief the plan cannot have (see `needs_read`), the
    /// request is left unplanned and the plan takes no more.
    fn add(&mut self, request: &AppendRequest, prepared: &Prepared, given: &Given<'_>) {
        if self.unknown || self.unprepared {
            return;
        }
        let i = self.verdicts.len();
        for stream in &request.streams {
            if self.assumed.contains_key(&stream.stream_id) {
                continue;
            }
            match given.beliefs.of(stream) {
                Some(v) => {
                    self.assumed.insert(stream.stream_id.clone(), v);
                    self.versions.insert(stream.stream_id.clone(), v);
                }
                None => {
                    self.unknown = true;
                    return;
                }
            }
        }
        if prepared.events.len()
            != request
                .streams
                .iter()
                .map(|s| s.events.len())
                .sum::<usize>()
        {
            self.unprepared = true;
            return;
        }
        self.verdicts.push(None);
        if self.settle_without_rows(i, request, given) {
            return;
        }
        let first_position = self.position + 1;
        let mut after = Vec::with_capacity(request.streams.len());
        let mut canonical = prepared.events.iter();
        for stream in &request.streams {
            let version = self.versions.entry(stream.stream_id.clone()).or_insert(0);
            for (event, values) in stream.events.iter().zip(canonical.by_ref()) {
                self.position += 1;
                *version += 1;
                let row = CanonicalRow {
                    global_position: self.position,
                    event_id: event.event_id,
                    stream_id: &stream.stream_id,
                    stream_version: *version,
                    event_type: event.event_type,
                    schema_version: event.schema_version,
                    payload: values.payload.as_bytes(),
                    metadata: prepared.metadata.as_bytes(),
                    recorded_at: self.recorded_at,
                };
                let leaf = canonical_leaf_hash(&row, &mut self.scratch);
                self.chain = entry_hash(&self.chain, &leaf);
                self.event_requests.push(i);
                self.rows.push(
                    row,
                    event.event_type,
                    values,
                    &prepared.metadata,
                    leaf,
                    self.chain,
                );
            }
            after.push((stream.stream_id.clone(), *version));
        }
        if let Some(change) = request.slot {
            self.slots.push(i, change);
        }
        let appended = Appended {
            versions: after,
            first_position,
            last_position: self.position,
            recorded_at: self.recorded_at,
        };
        let response = request.idempotency.as_ref().map(|claim| {
            let response = (claim.respond)(&appended);
            self.idem.push(claim, &response, self.position);
            self.responses.insert(i, response.clone());
            self.claimed.insert(claim.key_hash, (claim.request_hmac, i));
            response
        });
        self.verdicts[i] = Some(Ok(AppendOutcome::Appended(appended, response)));
        self.accepted.push(i);
    }

    /// Plans `jobs` without a read: on what the writer knows (`overlay`, the versions the batch in
    /// flight leaves, first), no stored keys, no refusals yet; until one needs a read.
    fn add_unread(
        &mut self,
        jobs: &[Job],
        known: &HashMap<String, i64>,
        overlay: Option<&HashMap<String, i64>>,
    ) {
        let none = HashSet::new();
        let given = Given {
            beliefs: Beliefs::Known { known, overlay },
            stored_keys: &HashMap::new(),
            slot_refused: &none,
            erased_refused: &none,
        };
        for job in jobs {
            self.add(&job.submitted.request, &job.submitted.prepared, &given);
            if self.needs_read() {
                break;
            }
        }
    }

    /// Settles request `i` if it appends nothing: refused, replayed, or a duplicate of an earlier
    /// request of the batch (answered with that one's response). Whether it did.
    fn settle_without_rows(
        &mut self,
        i: usize,
        request: &AppendRequest,
        given: &Given<'_>,
    ) -> bool {
        if given.slot_refused.contains(&i) {
            self.verdicts[i] = Some(Err(AppendError::SlotUnavailable));
            return true;
        }
        if given.erased_refused.contains(&i) {
            self.verdicts[i] = Some(Err(AppendError::SubjectErased));
            return true;
        }
        if let Some(claim) = &request.idempotency {
            if let Some((hmac, response)) = given.stored_keys.get(claim.key_hash.as_slice()) {
                if hmac.as_slice() == claim.request_hmac {
                    self.verdicts[i] = Some(Ok(AppendOutcome::Replayed(response.clone())));
                    return true;
                }
                self.refused_on_belief = true;
                self.verdicts[i] = Some(Err(AppendError::IdempotencyKeyReuse));
                return true;
            }
            if let Some((hmac, first)) = self.claimed.get(&claim.key_hash) {
                if *hmac == claim.request_hmac {
                    self.duplicates.push((i, *first));
                    return true;
                }
                self.refused_on_belief = true;
                self.verdicts[i] = Some(Err(AppendError::IdempotencyKeyReuse));
                return true;
            }
        }
        for stream in &request.streams {
            let actual = self.versions.get(&stream.stream_id).copied().unwrap_or(0);
            if !stream.expected.accepts(actual) {
                self.refused_on_belief = true;
                self.verdicts[i] = Some(Err(AppendError::VersionConflict {
                    stream_id: stream.stream_id.clone(),
                    expected: stream.expected,
                    actual,
                }));
                return true;
            }
        }
        false
    }

    /// The verdicts of a batch that wrote nothing, or of one that committed.
    fn into_verdicts(self) -> Verdicts {
        self.into_committed().1
    }

    /// The versions the batch leaves and every request's verdict (duplicates get the response of
    /// the request whose key they repeat).
    fn into_committed(self) -> (HashMap<String, i64>, Verdicts) {
        let Draft {
            versions,
            mut verdicts,
            duplicates,
            responses,
            ..
        } = self;
        for (i, first) in duplicates {
            verdicts[i] = Some(match responses.get(&first) {
                Some(r) => Ok(AppendOutcome::Replayed(r.clone())),
                None => Err(AppendError::IdempotencyKeyReuse),
            });
        }
        let verdicts = verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Err(AppendError::Closed)))
            .collect();
        (versions, verdicts)
    }

    /// Sends the `append_batch` call that writes `draft` on `wire`, once the returned future is
    /// first polled; it answers the call's outcome. The future holds what it needs, so a batch can
    /// be sent while the one before it is still running (see `Queue::beside`).
    fn send(draft: &Arc<Draft>, wire: &Wire) -> Call {
        let (draft, client, statement) = (draft.clone(), wire.client.clone(), wire.append.clone());
        Box::pin(async move {
            use tokio_postgres::types::ToSql;
            let d = &*draft;
            // Streams that get events are checked by their unique version; the others are
            // looked up.
            let (check_streams, check_versions): (Vec<&str>, Vec<i64>) = d
                .assumed
                .iter()
                .filter(|(s, v)| d.versions.get(*s) == Some(*v))
                .map(|(s, v)| (s.as_str(), *v))
                .unzip();
            let (rows, slots, idem) = (&d.rows, &d.slots, &d.idem);
            let payloads: Vec<&str> = rows.payloads.iter().map(|p| &**p).collect();
            let metadata: Vec<&str> = rows.metadata.iter().map(|m| &**m).collect();
            let (base_hash, chain) = (d.base.1.as_slice(), d.chain.as_slice());
            let params: [&(dyn ToSql + Sync); 30] = [
                &d.base.0,
                &base_hash,
                &check_streams,
                &check_versions,
                &d.position,
                &chain,
                &d.recorded_at,
                &slots.kinds,
                &slots.bookings,
                &slots.resources,
                &slots.starts,
                &slots.ends,
                &rows.positions,
                &rows.event_ids,
                &rows.stream_ids,
                &rows.versions,
                &rows.types,
                &rows.schema_versions,
                &payloads,
                &metadata,
                &rows.recorded_at,
                &rows.leaf_hashes,
                &rows.entry_hashes,
                &idem.key_hashes,
                &idem.hmacs,
                &idem.statuses,
                &idem.responses,
                &idem.positions,
                &rows.sealed_rows,
                &rows.sealed_subjects,
            ];
            let row = answered(async {
                client
                    .query_one(&statement, &params)
                    .await
                    .map_err(into_sqlx)
            })
            .await?;
            let outcome: String = row.try_get(0).map_err(into_sqlx)?;
            let refused: Option<Vec<i32>> = row.try_get(1).map_err(into_sqlx)?;
            Ok((outcome, refused.unwrap_or_default()))
        })
    }
}

/// The call that writes a batch (see the migrations), its arguments in the order `Draft::send`
/// binds them: the plan's head, its rows; it answers the outcome.
const APPEND_BATCH: &str = "SELECT outcome, refused FROM append_batch($1, $2, $3, \
     $4, $5, $6, $7, $8::text[], $9, $10, $11, $12, $13, $14, $15, $16, $17::text[], $18, \
     $19::text[]::jsonb[], $20::text[]::jsonb[], $21, $22, $23, $24, $25, $26, $27, $28, $29, $30)";

/// The outcome of an `append_batch` call, and the call itself, sent when first polled.
type Called = Result<(String, Vec<i32>), sqlx::Error>;
type Call = std::pin::Pin<Box<dyn std::future::Future<Output = Called> + Send>>;

/// A batch sent behind the one in flight, on the same connection: Postgres starts it the moment
/// that one ends. Its commands are the first `draft.planned()` of `Queue::jobs`.
struct Sent {
    draft: Arc<Draft>,
    call: Call,
}

/// Plans a whole batch on an empty log (the tests' view of `Draft`).
#[cfg(test)]
fn plan_batch(
    requests: &[&AppendRequest],
    stored_keys: &HashMap<Vec<u8>, (Vec<u8>, StoredResponse)>,
    slot_refused: &HashSet<usize>,
) -> Draft {
    let versions = HashMap::new();
    let given = Given {
        beliefs: Beliefs::Read(&versions),
        stored_keys,
        slot_refused,
        erased_refused: &HashSet::new(),
    };
    let mut draft = Draft::new((0, [0; 32]), Utc::now());
    for request in requests {
        draft.add(request, &Prepared::new(request), &given);
    }
    draft
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
    /// Canonical JSON text; Postgres parses it into `jsonb`.
    payloads: Vec<Arc<str>>,
    metadata: Vec<Arc<str>>,
    recorded_at: Vec<DateTime<Utc>>,
    leaf_hashes: Vec<Vec<u8>>,
    entry_hashes: Vec<Vec<u8>>,
    /// Every sealed envelope in the batch: its event row (1-based, as Postgres arrays count) and
    /// the subject whose key sealed it, for the erased-subject guard of `append_batch`.
    sealed_rows: Vec<i32>,
    sealed_subjects: Vec<Uuid>,
}

impl EventRows {
    fn push(
        &mut self,
        row: CanonicalRow<'_>,
        event_type: &'static str,
        values: &PreparedEvent,
        metadata: &Arc<str>,
        leaf: [u8; 32],
        entry: [u8; 32],
    ) {
        self.positions.push(row.global_position);
        self.event_ids.push(row.event_id);
        self.stream_ids.push(row.stream_id.to_owned());
        self.versions.push(row.stream_version);
        self.types.push(event_type);
        self.schema_versions.push(row.schema_version);
        self.payloads.push(values.payload.clone());
        self.metadata.push(metadata.clone());
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
        let plan = plan_batch(&[&a, &b, &c], &HashMap::new(), &HashSet::new());
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
        let plan = plan_batch(&[&a, &b], &HashMap::new(), &refused);
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
        let plan = plan_batch(&[&a, &b, &c, &d], &stored, &HashSet::new());
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

    /// A plan made while a batch is in flight goes on from the head that batch leaves: its
    /// positions and hash chain continue that batch's, and a stream the batch wrote is believed at
    /// the version it left, which the writer did not know before.
    #[test]
    fn a_plan_made_ahead_goes_on_from_the_head_the_batch_in_flight_leaves() {
        let flight_request = request("s", ExpectedVersion::NoStream, 2);
        let flight = plan_batch(&[&flight_request], &HashMap::new(), &HashSet::new());
        assert_eq!((flight.position, flight.accepted.clone()), (2, vec![0]));
        let next = request("s", ExpectedVersion::Any, 1);
        let known = HashMap::new();
        let none = HashSet::new();
        let ahead = |overlay| {
            let given = Given {
                beliefs: Beliefs::Known {
                    known: &known,
                    overlay,
                },
                stored_keys: &HashMap::new(),
                slot_refused: &none,
                erased_refused: &none,
            };
            let mut draft = Draft::new((flight.position, flight.chain), flight.recorded_at);
            draft.add(&next, &Prepared::new(&next), &given);
            draft
        };
        let draft = ahead(Some(&flight.versions));
        assert!(!draft.needs_read());
        assert_eq!(draft.base, (2, flight.chain));
        assert_eq!(draft.rows.positions, vec![3]);
        assert_eq!(draft.rows.versions, vec![3]);
        assert_ne!(draft.chain, flight.chain);
        // Without the batch in flight to go on, `Any` on an unknown stream needs a read.
        let blind = ahead(None);
        assert!(blind.needs_read());
        assert_eq!(blind.planned(), 0);
    }

    /// A plan made ahead on a head the log did not reach (the batch before did not commit as
    /// planned) is dropped, and its commands are planned again.
    #[test]
    fn a_plan_made_on_a_head_that_was_not_reached_is_dropped() {
        let (_tx, rx) = mpsc::channel(1);
        let mut queue = Queue::new(rx);
        let r = request("s", ExpectedVersion::NoStream, 1);
        let (reply, _answer) = oneshot::channel();
        let submitted = Arc::new(Submitted {
            prepared: Prepared::new(&r),
            request: r,
        });
        let plan = |base| {
            let mut draft = Draft::new(base, Utc::now());
            let none = HashSet::new();
            let given = Given {
                beliefs: Beliefs::Read(&HashMap::new()),
                stored_keys: &HashMap::new(),
                slot_refused: &none,
                erased_refused: &none,
            };
            draft.add(&submitted.request, &submitted.prepared, &given);
            draft
        };
        let metrics = AppendMetrics::default();
        let mut known = Knowledge {
            head: Some((7, [7; 32], Utc::now())),
            ..Knowledge::default()
        };
        queue.jobs.push(Job {
            submitted: submitted.clone(),
            reply,
        });
        queue.draft = Some(plan((6, [6; 32])));
        let (jobs, draft) = queue.take(&known, &metrics);
        assert_eq!(jobs.len(), 1);
        assert!(draft.is_none(), "made on head 6, the log is at 7");
        assert_eq!(metrics.ahead_dropped.load(Relaxed), 1);
        queue.jobs = jobs;
        queue.draft = Some(plan((7, [7; 32])));
        let (_, draft) = queue.take(&known, &metrics);
        assert!(draft.is_some_and(|d| d.planned() == 1));
        // The same position with another hash is another head.
        known.head = Some((7, [8; 32], Utc::now()));
        queue.jobs.push(Job {
            submitted: submitted.clone(),
            reply: oneshot::channel().0,
        });
        queue.draft = Some(plan((7, [7; 32])));
        assert!(queue.take(&known, &metrics).1.is_none());
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
