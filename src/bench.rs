//! Benchmarks (`ledger bench append`): every figure next to a baseline measured in the same run
//! against the same Postgres, because these machines are shared and noisy.
//!
//! The same event rows are written four ways:
//! - (a) naive: one `INSERT` transaction per event into a plain table with an identity column,
//!   at 1, 16 and 64 concurrent writers;
//! - (b) raw bulk: `COPY` of the rows (the same stream ids as the other runs write);
//! - (c) the append pipeline (batching writer, head lock, hash chain) at 1, 16 and 64 submitters;
//! - (d) booking commands over HTTP end to end (auth, decide, seal, append, answer).

use crate::app::{connect, migrate, Application};
use crate::config::Settings;
use crate::http::auth::{Claims, JwtKeys, Role};
use crate::store::append::{AppendMetrics, AppendRequest, Appender, StreamAppend};
use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use ledger_events::envelope::{ExpectedVersion, Metadata, NewEvent};
use ledger_events::pii::MasterKey;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Which,
}

#[derive(Subcommand, Debug)]
pub enum Which {
    /// Append throughput and latency: naive inserts and COPY as baselines, the pipeline, HTTP.
    Append(AppendBench),
    /// The read side: relay publish rate vs raw JetStream, command-to-read-model lag at a fixed
    /// offered rate, query latency under load.
    ReadSide(ReadSideBench),
}

#[derive(Args, Debug)]
pub struct ReadSideBench {
    #[command(flatten)]
    pub database: crate::config::DatabaseArgs,
    /// nats-server with JetStream.
    #[arg(long = "nats-url", env = "NATS_URL")]
    pub nats_url: String,
    /// Events appended, then published by the relay and by the raw baseline.
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    /// Offered booking commands per second for the lag measurement.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Seconds of offered load.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent query clients.
    #[arg(long, default_value_t = 16)]
    pub query_clients: usize,
}

#[derive(Args, Debug)]
pub struct AppendBench {
    #[command(flatten)]
    pub database: crate::config::DatabaseArgs,
    /// Seconds each measured configuration runs.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrency levels for the naive and pipeline runs.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub writers: Vec<usize>,
    /// Rows written by the COPY baseline.
    #[arg(long, default_value_t = 100_000)]
    pub copy_rows: usize,
    /// Concurrent HTTP clients for the end-to-end run (0 skips it).
    #[arg(long, default_value_t = 32)]
    pub http_clients: usize,
    /// Rounds of COPY (b) and the pipeline at the highest concurrency, run alternately after
    /// the main runs, each ratio next to the COPY measured just before it; the median is printed.
    /// A single pair swings by a third between runs minutes apart on these shared machines.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Keep the benchmark database afterwards.
    #[arg(long)]
    pub keep: bool,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.which {
        Which::Append(a) => append(a).await.map(|_| ExitCode::SUCCESS),
        Which::ReadSide(r) => read_side(r).await.map(|_| ExitCode::SUCCESS),
    }
}

/// A measured run: how many events in how long, and per-operation latency.
struct Figure {
    events: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Figure {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn p(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds up to 60 s with 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable_histogram()))
}

fn unreachable_histogram() -> Histogram<u64> {
    // Histogram::new(3) only fails for sigfig > 5; keep clippy's no-panic rule honest.
    Histogram::new_with_max(1_000_000, 2).unwrap_or_else(|_| std::process::abort())
}

/// A booking-shaped event: the payload size and structure the product really appends.
fn sample_payload() -> Value {
    json!({
        "booking_id": Uuid::now_v7(),
        "venue_id": Uuid::now_v7(),
        "resource_id": Uuid::now_v7(),
        "starts_at": "2030-06-01T18:00:00Z",
        "ends_at": "2030-06-01T20:00:00Z",
        "party_size": 4,
        "subject_id": Uuid::now_v7(),
        "customer": {
            "v": 1, "sub": Uuid::now_v7(), "kid": Uuid::now_v7(),
            "n": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "ct": "A".repeat(172),
        }
    })
}

fn sample_metadata() -> Metadata {
    let id = Uuid::now_v7();
    Metadata {
        actor: "bench".into(),
        role: "staff".into(),
        command: "RequestBooking".into(),
        request_id: id,
        correlation_id: id,
        causation_id: id,
    }
}

async fn append(args: AppendBench) -> anyhow::Result<()> {
    let admin_url = args.database.url()?;
    let (mut admin, db, url) = scratch_database(&admin_url, "ledger_bench").await?;
    let max_writers = args.writers.iter().copied().max().unwrap_or(1);
    let pool = connect(&url, (max_writers as u32 + 4).max(8)).await?;
    migrate(&pool).await?;
    sqlx::query(
        "CREATE TABLE bench_naive (global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         event_id uuid NOT NULL UNIQUE, stream_id text NOT NULL, stream_version bigint NOT NULL, \
         event_type text NOT NULL, payload jsonb NOT NULL, metadata jsonb NOT NULL, \
         recorded_at timestamptz NOT NULL, UNIQUE (stream_id, stream_version))",
    )
    .execute(&pool)
    .await?;
    let seconds = Duration::from_secs(args.seconds);
    println!(
        "ledger bench append: {}s per run, database {db}",
        args.seconds
    );
    println!("(events/s are whole-run rates; latencies are per append, in ms)\n");

    let mut naive = Vec::new();
    for &w in &args.writers {
        let f = naive_inserts(&pool, w, seconds).await?;
        println!(
            "(a) naive INSERT, {w:>2} writers: {:>9.0} events/s   p50 {:>6.2}  p99 {:>7.2}",
            f.rate(),
            f.p(0.5),
            f.p(0.99)
        );
        naive.push((w, f));
    }
    let copy = copy_rows(&pool, args.copy_rows, max_writers, CopyInto::Naive).await?;
    println!(
        "(b) COPY {} rows:            {:>9.0} rows/s",
        args.copy_rows,
        copy.rate()
    );
    // The same rows as the pipeline writes them (positions, leaf and entry hashes) into a table
    // with the columns and the five indexes of `events`: what bulk loading the log itself costs.
    sqlx::query("CREATE TABLE bench_events_shape (LIKE events INCLUDING ALL)")
        .execute(&pool)
        .await?;
    let copy_shaped = copy_rows(&pool, args.copy_rows, max_writers, CopyInto::EventsShape).await?;
    println!(
        "(b') COPY {} rows into an events-shaped table: {:>9.0} rows/s",
        args.copy_rows,
        copy_shaped.rate()
    );

    let mut piped = Vec::new();
    for &w in &args.writers {
        let (f, writer) = pipeline(&pool, &url, w, seconds).await?;
        let base = naive
            .iter()
            .find(|(n, _)| *n == w)
            .map(|(_, f)| f.rate())
            .unwrap_or(f64::NAN);
        println!(
            "(c) pipeline, {w:>2} submitters:  {:>9.0} events/s   p50 {:>6.2}  p99 {:>7.2}   \
             = {:.2}x naive@{w}, {:.0}% of COPY, {:.0}% of COPY (b')",
            f.rate(),
            f.p(0.5),
            f.p(0.99),
            f.rate() / base,
            100.0 * f.rate() / copy.rate(),
            100.0 * f.rate() / copy_shaped.rate()
        );
        println!("    {}", writer.describe(f.elapsed));
        piped.push((w, f));
    }
    if args.rounds > 1 {
        rounds(
            &pool,
            &url,
            &args,
            max_writers,
            seconds,
            &copy,
            piped.last(),
        )
        .await?;
    }
    if args.http_clients > 0 {
        let (f, writer) = http_bookings(&url, args.http_clients, seconds).await?;
        let base = piped.last().map(|(_, f)| f.rate()).unwrap_or(f64::NAN);
        let naive_base = naive.last().map(|(_, f)| f.rate()).unwrap_or(f64::NAN);
        println!(
            "(d) HTTP bookings, {} clients: {:>8.0} bookings/s p50 {:>6.2}  p99 {:>7.2}   \
             = {:.2}x naive@{}, {:.0}% of pipeline@{}",
            args.http_clients,
            f.rate(),
            f.p(0.5),
            f.p(0.99),
            f.rate() / naive_base,
            naive.last().map(|(w, _)| *w).unwrap_or(0),
            100.0 * f.rate() / base,
            piped.last().map(|(w, _)| *w).unwrap_or(0),
        );
        println!("    {}", writer.describe(f.elapsed));
    }
    let m = &pool;
    let (batches, events): (i64, i64) =
        sqlx::query_as("SELECT count(DISTINCT recorded_at), count(*) FROM events")
            .fetch_one(m)
            .await?;
    println!(
        "\npipeline batching: {events} events in ~{batches} commits ({:.1} events per commit)",
        events as f64 / batches.max(1) as f64
    );
    pool.close().await;
    if !args.keep {
        sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
    }
    Ok(())
}

/// Rounds of (b) and (c) at `writers`, alternating, after the main runs (whose pair is round 1):
/// each ratio against the COPY measured just before it, and their median.
async fn rounds(
    pool: &PgPool,
    url: &str,
    args: &AppendBench,
    writers: usize,
    seconds: Duration,
    copy: &Figure,
    first: Option<&(usize, Figure)>,
) -> anyhow::Result<()> {
    let mut ratios = Vec::new();
    let mut round = |n: u32, copy: &Figure, piped: &Figure| {
        println!(
            "round {n:>2}: (b) {:>7.0} rows/s, (c) at {writers} {:>7.0} events/s = {:.0}% of COPY",
            copy.rate(),
            piped.rate(),
            100.0 * piped.rate() / copy.rate()
        );
        ratios.push(piped.rate() / copy.rate());
    };
    if let Some((_, f)) = first.filter(|(w, _)| *w == writers) {
        round(1, copy, f);
    }
    for n in 2..=args.rounds {
        // COPY into the empty table each round (a slightly stronger baseline than round 1's,
        // whose table held the naive rows); the pipeline goes on appending to `events`.
        sqlx::query("TRUNCATE bench_naive").execute(pool).await?;
        let c = copy_rows(pool, args.copy_rows, writers, CopyInto::Naive).await?;
        let (f, _) = pipeline(pool, url, writers, seconds).await?;
        round(n, &c, &f);
    }
    ratios.sort_by(f64::total_cmp);
    if let (Some(lo), Some(hi)) = (ratios.first(), ratios.last()) {
        println!(
            "(c) at {writers} over {} rounds: median {:.0}% of COPY (b), range {:.0}-{:.0}%",
            ratios.len(),
            100.0 * median(&ratios),
            100.0 * lo,
            100.0 * hi
        );
    }
    Ok(())
}

/// The median of sorted values (the mean of the middle two for an even count).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Runs `writers` loops for `duration`, each timing its operations.
async fn drive<F, Fut>(writers: usize, duration: Duration, op: F) -> anyhow::Result<Figure>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (op, stop, count) = (op.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let events = op(w, n).await?;
                let _ = h.record(t.elapsed().as_micros() as u64);
                count.fetch_add(events, Ordering::Relaxed);
                n += 1;
            }
            anyhow::Ok(h)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = histogram();
    for t in tasks {
        let h = t.await.context("bench task")??;
        latency.add(&h).ok();
    }
    Ok(Figure {
        events: count.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency,
    })
}

async fn naive_inserts(
    pool: &PgPool,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<Figure> {
    let pool = pool.clone();
    let payload = Arc::new(sample_payload());
    let metadata = Arc::new(serde_json::to_value(sample_metadata())?);
    let run = Uuid::now_v7();
    drive(writers, duration, move |w, n| {
        let (pool, payload, metadata) = (pool.clone(), payload.clone(), metadata.clone());
        async move {
            sqlx::query(
                "INSERT INTO bench_naive (event_id, stream_id, stream_version, event_type, payload, \
                 metadata, recorded_at) VALUES ($1, $2, 1, 'BookingRequested', $3, $4, now())",
            )
            .bind(Uuid::now_v7())
            .bind(bench_stream(run, w, n))
            .bind(&*payload)
            .bind(&*metadata)
            .execute(&pool)
            .await?;
            Ok(1)
        }
    })
    .await
}

#[derive(Clone, Copy, PartialEq)]
enum CopyInto {
    /// `bench_naive`: the naive baseline's table.
    Naive,
    /// `bench_events_shape`: the columns and indexes of `events`, rows with positions and hashes.
    EventsShape,
}

/// The size of the COPY baseline's messages (whole rows are not needed: COPY parses a stream).
const COPY_CHUNK: usize = 1 << 20;

/// The stream of a benchmark's event: writer `w`'s `n`th append in run `run`.
fn bench_stream(run: Uuid, w: usize, n: u64) -> String {
    format!("booking-{run}-{w}-{n}")
}

/// The stream of COPY's row `i` when the rows stand for `writers` writers' appends, one of each
/// writer's after the other: the same stream as that writer's append in a run.
fn stream_of_row(run: Uuid, writers: usize, i: usize) -> String {
    bench_stream(run, i % writers, (i / writers) as u64)
}

/// COPY of `rows` rows: the same rows as the other runs write, stream ids included. They are
/// `booking-{run}-{w}-{n}` as `writers` concurrent writers make them, interleaved in the order
/// they would arrive (one of each writer's, then the next): a btree on `stream_id` then takes
/// as many insertion points as in the runs it is compared with, and keys of the same length.
async fn copy_rows(
    pool: &PgPool,
    rows: usize,
    writers: usize,
    into: CopyInto,
) -> anyhow::Result<Figure> {
    let (run, writers) = (Uuid::now_v7(), writers.max(1));
    let payload = serde_json::to_string(&sample_payload())?;
    let metadata = serde_json::to_string(&sample_metadata())?;
    let escape = |s: &str| s.replace('\\', "\\\\");
    let (payload, metadata) = (escape(&payload), escape(&metadata));
    let mut data = String::with_capacity(rows * (payload.len() + metadata.len() + 280));
    let now = Utc::now().to_rfc3339();
    for i in 0..rows {
        let id = Uuid::now_v7();
        if into == CopyInto::Naive {
            data.push_str(&format!(
                "{id}\t{}\t1\tBookingRequested\t{payload}\t{metadata}\t{now}\n",
                stream_of_row(run, writers, i)
            ));
        } else {
            let leaf = hex::encode(rand::random::<[u8; 32]>());
            let entry = hex::encode(rand::random::<[u8; 32]>());
            data.push_str(&format!(
                "{}\t{id}\t{}\t1\tBookingRequested\t1\t{payload}\t{metadata}\t{now}\t\\\\x{leaf}\t\\\\x{entry}\n",
                i + 1,
                stream_of_row(run, writers, i)
            ));
        }
    }
    let statement = match into {
        CopyInto::Naive => {
            "COPY bench_naive (event_id, stream_id, stream_version, event_type, payload, metadata, \
             recorded_at) FROM STDIN"
        }
        CopyInto::EventsShape => {
            "COPY bench_events_shape (global_position, event_id, stream_id, stream_version, \
             event_type, schema_version, payload, metadata, recorded_at, leaf_hash, entry_hash) \
             FROM STDIN"
        }
    };
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut copy = conn.copy_in_raw(statement).await?;
    // Streamed in 1 MiB messages, as a COPY client does, rather than as one message of the whole
    // data (~100 MB), which made the client's buffer handling part of the figure.
    for chunk in data.as_bytes().chunks(COPY_CHUNK) {
        copy.send(chunk).await?;
    }
    copy.finish().await?;
    let elapsed = started.elapsed();
    let mut latency = histogram();
    let _ = latency.record(elapsed.as_micros() as u64);
    Ok(Figure {
        events: rows as u64,
        elapsed,
        latency,
    })
}

/// Where the writer's time went during a pipeline run, per batch.
struct WriterTime {
    batches: u64,
    events: u64,
    batch: u64,
    database: u64,
    planning: u64,
    gathering: u64,
    ahead: u64,
    sent_ahead: u64,
    ahead_micros: u64,
    sending: u64,
    /// CPU time of this process during the run (submitters, writer, driver), in µs.
    host_cpu: Option<u64>,
    /// CPU time of the writer's backend over its life (it is opened for the run), in µs.
    backend_cpu: Option<u64>,
}

impl WriterTime {
    /// The writer's counters at the end of a run, and the CPU time of this process since
    /// `host_before` and of the writer's backend (looked up through `pool`).
    async fn measured(m: &AppendMetrics, host_before: Option<u64>, pool: &PgPool) -> Self {
        WriterTime {
            host_cpu: host_before
                .zip(cpu_micros("self"))
                .map(|(a, b)| b.saturating_sub(a)),
            backend_cpu: writer_backend_cpu(pool).await,
            ..WriterTime::of(m)
        }
    }

    fn of(m: &AppendMetrics) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        WriterTime {
            batches: m.batches.load(Relaxed),
            events: m.events.load(Relaxed),
            batch: m.batch_micros.load(Relaxed),
            database: m.database_micros.load(Relaxed),
            planning: m.planning_micros.load(Relaxed),
            gathering: m.gathering_micros.load(Relaxed),
            ahead: m.batches_ahead.load(Relaxed),
            sent_ahead: m.batches_sent_ahead.load(Relaxed),
            ahead_micros: m.ahead_micros.load(Relaxed),
            sending: m.sending_micros.load(Relaxed),
            host_cpu: None,
            backend_cpu: None,
        }
    }

    /// Per batch, in µs: its statements, planning, answering (the rest of the batch), the
    /// gathering before it and the writer's idle time (queue empty).
    fn describe(&self, elapsed: Duration) -> String {
        let n = self.batches.max(1) as f64;
        let per = |micros: u64| micros as f64 / n;
        let idle = (elapsed.as_micros() as u64).saturating_sub(self.batch + self.gathering);
        format!(
            "writer: {:.1} events/batch, {:.0}% planned ahead, {:.0}% sent ahead; per batch (µs): database {:.0} \
             (sending {:.0}, planning ahead within it {:.0}), planning {:.0}, answering {:.0}, gathering {:.0}, \
             idle {:.0}",
            self.events as f64 / n,
            100.0 * self.ahead as f64 / n,
            100.0 * self.sent_ahead as f64 / n,
            per(self.database),
            per(self.sending),
            per(self.ahead_micros),
            per(self.planning),
            per(self.batch.saturating_sub(self.database + self.planning)),
            per(self.gathering),
            per(idle),
        ) + &self.cpu(elapsed)
    }

    /// CPU per event: the writer's backend (and how busy it was: the pipeline's serial part) and
    /// this process. It shows which side a change moved; on a VM it counts stolen time too, so it
    /// moves with the machine's load as throughput does.
    fn cpu(&self, elapsed: Duration) -> String {
        let events = self.events.max(1) as f64;
        let mut out = String::new();
        if let Some(b) = self.backend_cpu {
            out += &format!(
                "\n    cpu per event (µs): writer's backend {:.1} (busy {:.0}% of the run)",
                b as f64 / events,
                100.0 * b as f64 / elapsed.as_micros().max(1) as f64
            );
        }
        if let Some(h) = self.host_cpu {
            out += &format!(
                "{}this process {:.1}",
                if out.is_empty() {
                    "\n    cpu per event (µs): "
                } else {
                    ", "
                },
                h as f64 / events
            );
        }
        out
    }
}

/// User and system CPU time of a process (`self` or a pid) from `/proc`, in µs; `None` where
/// there is no `/proc` (not Linux) or the process is not there.
fn cpu_micros(pid: &str) -> Option<u64> {
    cpu_of_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime of a `/proc/<pid>/stat` line, in µs.
fn cpu_of_stat(stat: &str) -> Option<u64> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name and state.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux ABI the product runs on.
    Some(ticks * 10_000)
}

/// The writer's backend CPU time, when the database runs on this machine: its pid from
/// `pg_stat_activity`, its times from `/proc` (checked to be a Postgres process).
async fn writer_backend_cpu(pool: &PgPool) -> Option<u64> {
    let pid: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = $1 ORDER BY backend_start DESC LIMIT 1",
    )
    .bind(crate::store::WRITER_APPLICATION_NAME)
    .fetch_optional(pool)
    .await
    .ok()??;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if !cmdline.starts_with(b"postgres") {
        return None;
    }
    cpu_micros(&pid.to_string())
}

async fn pipeline(
    pool: &PgPool,
    url: &str,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<(Figure, WriterTime)> {
    let (appender, writer) = Appender::spawn(pool.clone(), url)?;
    let host_before = cpu_micros("self");
    let payload = Arc::new(sample_payload());
    let run = Uuid::now_v7();
    let submit = appender.clone();
    let figure = drive(writers, duration, move |w, n| {
        let (appender, payload) = (submit.clone(), payload.clone());
        async move {
            let request = AppendRequest {
                streams: vec![StreamAppend {
                    stream_id: bench_stream(run, w, n),
                    expected: ExpectedVersion::NoStream,
                    events: vec![NewEvent {
                        event_id: Uuid::now_v7(),
                        event_type: "BookingRequested",
                        schema_version: 1,
                        payload: (*payload).clone(),
                    }],
                }],
                metadata: sample_metadata(),
                slot: None,
                idempotency: None,
            };
            appender.append(request).await?;
            Ok(1)
        }
    })
    .await;
    let time = WriterTime::measured(appender.metrics(), host_before, pool).await;
    drop(appender);
    let _ = writer.await;
    Ok((figure?, time))
}

/// Settings for a benchmark's own app on `url` (a fresh JWT secret, which is returned too, and a
/// fresh master key), listening on a free port; as `serve`'s defaults otherwise.
fn bench_settings(url: &str, nats_url: String) -> anyhow::Result<(Settings, Vec<u8>)> {
    let jwt_secret: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    let settings = Settings {
        database_url: url.to_owned(),
        nats_url,
        nats_stream: "LEDGER".into(),
        nats_subjects: "ledger.events".into(),
        listen: "127.0.0.1:0".parse()?,
        jwt_secret: jwt_secret.clone(),
        master_key: MasterKey::generate(),
        webhook_secret: b"bench".to_vec(),
        backup_retention_days: crate::store::vault::DEFAULT_BACKUP_RETENTION_DAYS,
        idempotency_retention: Default::default(),
        database_wait: std::time::Duration::from_secs(3),
    };
    Ok((settings, jwt_secret))
}

/// An admin token for the benchmark's app, an HTTP client, and a venue registered through the API.
async fn bench_venue(
    base: &str,
    jwt_secret: &[u8],
) -> anyhow::Result<(String, reqwest::Client, String)> {
    let token = JwtKeys::new(jwt_secret).sign(&Claims {
        sub: "bench".into(),
        role: Role::Admin,
        exp: Utc::now().timestamp() + 3600,
        iat: None,
        subject: None,
        venues: None,
    })?;
    let client = reqwest::Client::new();
    let venue: Value = client
        .post(format!("{base}/v1/venues"))
        .bearer_auth(&token)
        .json(&json!({"name": "Bench", "timezone": "UTC"}))
        .send()
        .await?
        .json()
        .await?;
    let venue_id = venue["id"].as_str().unwrap_or_default().to_owned();
    Ok((token, client, venue_id))
}

async fn http_bookings(
    url: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(Figure, WriterTime)> {
    let (settings, jwt_secret) = bench_settings(url, String::new())?;
    // Its own pool, sized and waiting as `serve`'s: shutting the app down closes it.
    let pool = crate::app::connect_waiting(url, 32, settings.database_wait).await?;
    let app = Application::with_parts(pool, None, &settings).await?;
    let base = format!("http://{}", app.local_addr()?);
    let appender = app.state().appender.clone();
    let state_pool = app.state().pool.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let (token, client, venue_id) = bench_venue(&base, &jwt_secret).await?;
    // One resource per client, so clients never contend for a slot: this measures throughput,
    // not the (tested elsewhere) refusal path.
    let mut resources = Vec::new();
    for i in 0..clients {
        let r: Value = client
            .post(format!("{base}/v1/venues/{venue_id}/resources"))
            .bearer_auth(&token)
            .json(&json!({"name": format!("T{i}"), "capacity": 8}))
            .send()
            .await?
            .json()
            .await?;
        resources.push(r["id"].as_str().unwrap_or_default().to_owned());
    }
    let resources = Arc::new(resources);
    let host_before = cpu_micros("self");
    let start = Utc::now();
    let figure = drive(clients, duration, move |w, n| {
        let (client, base, token, venue_id, resources) =
            (client.clone(), base.clone(), token.clone(), venue_id.clone(), resources.clone());
        async move {
            let starts = start + chrono::Duration::minutes(30 * n as i64);
            let body = json!({
                "venue_id": venue_id,
                "resource_id": resources[w],
                "starts_at": starts.to_rfc3339(),
                "ends_at": (starts + chrono::Duration::minutes(30)).to_rfc3339(),
                "party_size": 2,
                "customer": {"name": "Bench Guest", "email": format!("guest{w}-{}@bench.test", n % 50)},
            });
            let r = client
                .post(format!("{base}/v1/bookings"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(r.status().as_u16() == 201, "booking answered {}", r.status());
            Ok(1)
        }
    })
    .await;
    let time = WriterTime::measured(appender.metrics(), host_before, &state_pool).await;
    drop(state_pool);
    drop(appender);
    shutdown.cancel();
    let _ = server.await;
    Ok((figure?, time))
}

/// A scratch database for one benchmark run: created, migrated, and its URL.
async fn scratch_database(
    admin_url: &str,
    prefix: &str,
) -> anyhow::Result<(PgConnection, String, String)> {
    let db = format!("{prefix}_{}", Utc::now().format("%Y%m%d%H%M%S"));
    let mut admin = PgConnection::connect(admin_url)
        .await
        .context("connecting to DATABASE_URL")?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await?;
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => anyhow::bail!("DATABASE_URL has no database part"),
    };
    Ok((admin, db, url))
}

async fn read_side(args: ReadSideBench) -> anyhow::Result<()> {
    use async_nats::jetstream;
    let admin_url = args.database.url()?;
    let (mut admin, db, url) = scratch_database(&admin_url, "ledger_bench_read").await?;
    let pool = connect(&url, 16).await?;
    migrate(&pool).await?;
    let nats = async_nats::connect(&args.nats_url)
        .await
        .context("connecting to NATS_URL")?;
    let js = jetstream::new(nats.clone());
    let run = Uuid::now_v7().simple().to_string();
    println!(
        "ledger bench read-side: {} events, database {db}",
        args.events
    );

    // Fill the log through the pipeline.
    let (appender, writer) = Appender::spawn(pool.clone(), &url)?;
    let mut pending = Vec::new();
    for i in 0..args.events {
        let appender = appender.clone();
        // Each event its own booking, as the read model expects.
        let payload = sample_payload();
        pending.push(tokio::spawn(async move {
            appender
                .append(AppendRequest {
                    streams: vec![StreamAppend {
                        stream_id: format!("booking-{}", Uuid::now_v7()),
                        expected: ExpectedVersion::NoStream,
                        events: vec![NewEvent {
                            event_id: Uuid::now_v7(),
                            event_type: "BookingRequested",
                            schema_version: 1,
                            payload,
                        }],
                    }],
                    metadata: sample_metadata(),
                    slot: None,
                    idempotency: None,
                })
                .await
        }));
        if pending.len() >= 256 || i + 1 == args.events {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    drop(appender);
    let _ = writer.await;

    // Baseline: raw JetStream publishes of the same messages (ids, payloads), acks awaited per
    // batch of 512 like the relay does.
    let events = ledger_replay::read_all(&pool, 0, args.events as i64).await?;
    let raw_stream = format!("BENCH_RAW_{run}");
    js.get_or_create_stream(jetstream::stream::Config {
        name: raw_stream.clone(),
        subjects: vec![format!("benchraw{run}.>")],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    for chunk in events.chunks(512) {
        let mut acks = Vec::with_capacity(chunk.len());
        for e in chunk {
            let body = serde_json::to_vec(&ledger_events::envelope::WireEvent::from(e))?;
            acks.push(
                js.send_publish(
                    format!("benchraw{run}.booking"),
                    jetstream::context::Publish::build()
                        .payload(body.into())
                        .message_id(e.event_id.to_string()),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            );
        }
        for a in acks {
            a.await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let raw = events.len() as f64 / started.elapsed().as_secs_f64();

    let relay_config = crate::relay::RelayConfig {
        stream: format!("BENCH_RELAY_{run}"),
        subject_prefix: format!("benchrelay{run}.events"),
        batch: 512,
    };
    let relay = crate::relay::Relay::new(pool.clone(), nats.clone(), relay_config.clone());
    relay.ensure_stream().await?;
    let started = Instant::now();
    let published = relay.publish_pending().await?;
    let relayed = published as f64 / started.elapsed().as_secs_f64();
    println!("relay publish:   {relayed:>9.0} events/s   raw JetStream publish: {raw:>9.0} msgs/s   = {:.2}x raw", relayed / raw);

    // Verify: every row read, its leaf hash recomputed and the chain followed, vs a raw read of
    // the same rows in the same run.
    let started = Instant::now();
    let raw_rows: i64 = {
        let mut after = 0;
        let mut n = 0;
        loop {
            let page = ledger_replay::read_all(&pool, after, 5000).await?;
            let Some(last) = page.last() else { break };
            after = last.global_position;
            n += page.len() as i64;
        }
        n
    };
    let raw_read = raw_rows as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let report = ledger_replay::verify::verify(&pool).await?;
    let verified = report.checked as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.intact,
        "the benchmark's own log does not verify: {report:?}"
    );
    println!(
        "verify:          {verified:>9.0} events/s   raw read of the same rows: {raw_read:>9.0} rows/s   = {:.2}x raw",
        verified / raw_read
    );
    // Rebuild: each projection folded from position 0 into shadow tables, compared with the live
    // tables and swapped in, vs the same raw read. No worker runs yet, so a first rebuild builds
    // the live tables; the second, measured, is the operational case: live tables at the head.
    for name in ledger_projections::PROJECTIONS {
        ledger_replay::rebuild::rebuild(&pool, name, &mut |_| {}).await?;
        let report = ledger_replay::rebuild::rebuild(&pool, name, &mut |_| {}).await?;
        anyhow::ensure!(
            report.differences.is_empty(),
            "a rebuild of an untouched read model found differences: {report:?}"
        );
        let rate = report.events_per_second();
        println!(
            "rebuild {name:<14} {rate:>9.0} events/s   raw read of the same rows: {raw_read:>9.0} rows/s   = {:.2}x raw",
            rate / raw_read
        );
    }
    if args.rate == 0 {
        // Publish rates only (e.g. to compare nats-server settings).
        for stream in [raw_stream, relay_config.stream] {
            let _ = js.delete_stream(&stream).await;
        }
        pool.close().await;
        sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        return Ok(());
    }
    // Command → read model lag at a fixed offered rate, with the whole read side running.
    let (settings, jwt_secret) = bench_settings(&url, args.nats_url.clone())?;
    let app_pool = connect(&url, 16).await?;
    let app = Application::with_parts(app_pool, Some(nats.clone()), &settings).await?;
    let base = format!("http://{}", app.local_addr()?);
    let read_position = app.state().read_position.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    tokio::spawn(
        crate::relay::Relay::new(pool.clone(), nats.clone(), relay_config.clone())
            .run(shutdown.clone()),
    );
    tokio::spawn(
        ledger_projections::worker::Worker::new(
            pool.clone(),
            nats.clone(),
            &relay_config.stream,
            ledger_projections::booking_board::NAME,
        )
        .run(shutdown.clone()),
    );
    let (token, client, venue_id) = bench_venue(&base, &jwt_secret).await?;
    let r: Value = client
        .post(format!("{base}/v1/venues/{venue_id}/resources"))
        .bearer_auth(&token)
        .json(&json!({"name": "T", "capacity": 8}))
        .send()
        .await?
        .json()
        .await?;
    let resource = r["id"].as_str().unwrap_or_default().to_owned();
    // Let the read side catch up with the pre-filled log before measuring lag.
    let head = ledger_replay::head_position(&pool).await?;
    let mut caught_up = read_position.subscribe();
    tokio::time::timeout(Duration::from_secs(120), caught_up.wait_for(|p| *p >= head))
        .await
        .context("the read side did not catch up with the pre-filled log")??;
    // Offer `rate` bookings per second; each one's lag is from its answer until the read model's
    // position (woken by the projection's commit notification) includes it.
    let total = args.rate * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Utc::now() + chrono::Duration::days(1);
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        ticker.tick().await;
        let (client, base, token, venue_id, resource) = (
            client.clone(),
            base.clone(),
            token.clone(),
            venue_id.clone(),
            resource.clone(),
        );
        let mut position_rx = read_position.subscribe();
        tasks.push(tokio::spawn(async move {
            let starts = start + chrono::Duration::minutes(n as i64);
            let body = json!({
                "venue_id": venue_id, "resource_id": resource,
                "starts_at": starts.to_rfc3339(),
                "ends_at": (starts + chrono::Duration::minutes(1)).to_rfc3339(),
                "party_size": 2,
                "customer": {"name": "Bench Guest", "email": format!("g{}@bench.test", n % 100)},
            });
            let answer: Value = client
                .post(format!("{base}/v1/bookings"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await?
                .json()
                .await?;
            let answered = Instant::now();
            let position = answer["position"].as_i64().unwrap_or(i64::MAX);
            tokio::time::timeout(
                Duration::from_secs(10),
                position_rx.wait_for(|p| *p >= position),
            )
            .await
            .context("read model never included the booking")??;
            anyhow::Ok(answered.elapsed())
        }));
    }
    let mut lag = histogram();
    for t in tasks {
        let _ = lag.record(t.await??.as_micros() as u64);
    }
    println!(
        "command → read model lag at {} commands/s offered: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms ({} commands)",
        args.rate,
        lag.value_at_quantile(0.5) as f64 / 1000.0,
        lag.value_at_quantile(0.99) as f64 / 1000.0,
        lag.max() as f64 / 1000.0,
        lag.len()
    );

    // Query latency under concurrent load: the venue's board, first page.
    let q = {
        let (client, base, token, venue_id) = (
            client.clone(),
            base.clone(),
            token.clone(),
            venue_id.clone(),
        );
        drive(args.query_clients, Duration::from_secs(5), move |_, _| {
            let (client, base, token, venue_id) = (
                client.clone(),
                base.clone(),
                token.clone(),
                venue_id.clone(),
            );
            async move {
                let r = client
                    .get(format!("{base}/v1/bookings?venue_id={venue_id}&limit=50"))
                    .bearer_auth(&token)
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "query answered {}", r.status());
                let _ = r.bytes().await?;
                Ok(1)
            }
        })
        .await?
    };
    println!(
        "board query, {} clients: {:>7.0} queries/s  p50 {:.2} ms  p99 {:.2} ms",
        args.query_clients,
        q.rate(),
        q.p(0.5),
        q.p(0.99)
    );
    shutdown.cancel();
    let _ = server.await;
    for stream in [raw_stream, relay_config.stream] {
        let _ = js.delete_stream(&stream).await;
    }
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state, then fields 4..; utime is field 14 and stime 15 (stat(5)).
        let stat = "4242 (postgres: a) b) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 1 0 99 0 0";
        assert_eq!(cpu_of_stat(stat), Some(280 * 10_000));
        assert_eq!(cpu_of_stat("4242 (cut short) S 1 2"), None);
        assert_eq!(cpu_of_stat("no parentheses at all"), None);
    }

    #[test]
    fn this_process_cpu_time_grows_with_work() {
        let Some(before) = cpu_micros("self") else {
            return; // no /proc here
        };
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_micros("self").unwrap_or(0);
        assert!(after >= before + 20_000, "{before} -> {after}");
    }

    #[test]
    fn copy_writes_the_streams_the_writers_write_in_the_order_they_arrive() {
        let run = Uuid::now_v7();
        let rows: Vec<String> = (0..6).map(|i| stream_of_row(run, 3, i)).collect();
        let expected: Vec<String> = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
            .iter()
            .map(|&(w, n)| bench_stream(run, w, n))
            .collect();
        assert_eq!(rows, expected);
        assert_eq!(stream_of_row(run, 1, 4), bench_stream(run, 0, 4));
    }

    #[test]
    fn the_median_of_rounds() {
        assert_eq!(median(&[0.3, 0.4, 0.5]), 0.4);
        assert!((median(&[0.25, 0.5]) - 0.375).abs() < 1e-12);
        assert!(median(&[]).is_nan());
    }
}
