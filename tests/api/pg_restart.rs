//! Postgres going away under load, and coming back, with nothing restarting the ledger.
//!
//! Two tests restart (`pg_ctl restart -m fast`) or crash (`pg_ctl stop -m immediate`, then start)
//! a Postgres cluster of their own (the shared dev cluster must not go down under other tests)
//! while clients send commands with Idempotency-Keys and retry failures with the same key. Two
//! more cut the ledger's connections at the worst moments through a TCP proxy: in the middle of
//! an append's commit, and while a subject is erased by another API process.

use crate::faults::{assert_settled, parts, sigkill, Parts};
use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The longest any answer may take while Postgres is away, as a guard against hanging: the
/// pool's wait for a connection (`LEDGER_DATABASE_WAIT_SECONDS`, 3 s in tests) for the step
/// that finds the database gone, several times over for a loaded machine. `probe_while_down`
/// holds a command and a query to a tighter bound.
const ANSWER_BOUND: Duration = Duration::from_secs(25);

/// How soon a command or a query is answered 503 while Postgres is down: the 3 s wait for a
/// connection and slack for a loaded machine (it was the pool's fixed 10 s before the wait was
/// made a setting).
const DOWN_ANSWER_BOUND: Duration = Duration::from_secs(8);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

// ---------------------------------------------------------------------------------------------
// A Postgres cluster of the test's own

/// `initdb` into a temporary directory, on a free port of 127.0.0.1. Postgres refuses to run as
/// root, so as root (as the tests run in CI) every Postgres tool runs as the `postgres` OS user,
/// who owns the directory (like `dev.sh`).
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Cluster {
    async fn start_new() -> Cluster {
        let bin = PathBuf::from(std::env::var("LEDGER_PG_BIN").unwrap_or_else(|_| {
            panic!("LEDGER_PG_BIN is not set: run the tests with ./dev.sh test (it exports it)")
        }));
        let dir = std::env::temp_dir().join(format!("ledger-pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let cluster = Cluster {
            bin,
            dir,
            port: free_port(),
            as_postgres: running_as_root(),
        };
        if cluster.as_postgres {
            let chown = std::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(&cluster.dir)
                .status();
            assert!(
                matches!(chown, Ok(s) if s.success()),
                "chown postgres {}: {chown:?}",
                cluster.dir.display()
            );
        }
        let data = cluster.data();
        cluster
            .run(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
            )
            .await;
        let conf = format!(
            "\n# test cluster (tests/api/pg_restart.rs)\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             max_connections = 100\n\
             shared_buffers = 32MB\n\
             # The crash here is the server's (-m immediate), not the machine's: WAL in the page\n\
             # cache survives it, and recovery replays it.\n\
             fsync = off\n\
             timezone = 'UTC'\n\
             log_timezone = 'UTC'\n",
            cluster.port,
            cluster.dir.display()
        );
        let conf_path = Path::new(&data).join("postgresql.conf");
        let mut current = std::fs::read_to_string(&conf_path)
            .unwrap_or_else(|e| panic!("{}: {e}", conf_path.display()));
        current.push_str(&conf);
        std::fs::write(&conf_path, current)
            .unwrap_or_else(|e| panic!("{}: {e}", conf_path.display()));
        cluster.start().await;
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn log(&self) -> String {
        self.dir.join("postgres.log").display().to_string()
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, tool: &str, args: &[&str]) -> std::process::Command {
        let tool = self.bin.join(tool);
        let mut c = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(tool);
            c
        } else {
            std::process::Command::new(tool)
        };
        c.args(args)
            .current_dir("/")
            .stdin(std::process::Stdio::null());
        c
    }

    /// Runs a Postgres tool to completion; returns how long it took.
    async fn run(&self, tool: &str, args: &[&str]) -> Duration {
        let started = Instant::now();
        let out = tokio::process::Command::from(self.command(tool, args))
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}\n{}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        started.elapsed()
    }

    async fn start(&self) -> Duration {
        let (data, log) = (self.data(), self.log());
        self.run(
            "pg_ctl",
            &["start", "-D", &data, "-l", &log, "-w", "-t", "60", "-s"],
        )
        .await
    }

    /// `pg_ctl restart -m fast`: every session is terminated (57P01), the server stops cleanly
    /// and starts again.
    async fn restart_fast(&self) -> Duration {
        let (data, log) = (self.data(), self.log());
        self.run(
            "pg_ctl",
            &[
                "restart", "-D", &data, "-m", "fast", "-l", &log, "-w", "-t", "60", "-s",
            ],
        )
        .await
    }

    /// `pg_ctl stop -m immediate`: the server quits without a shutdown checkpoint, as in a
    /// crash; the next start recovers from the WAL.
    async fn stop_immediate(&self) -> Duration {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "stop",
                "-D",
                &data,
                "-m",
                "immediate",
                "-w",
                "-t",
                "60",
                "-s",
            ],
        )
        .await
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!("--- postgres.log ---\n{}", lines[from..].join("\n"))
    }

    /// The ledger processes' logs (their warnings and errors), for a failing test.
    fn part_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("ledger-") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let from = lines.len().saturating_sub(15);
                    out.push_str(&format!("--- {name} ---\n{}\n", lines[from..].join("\n")));
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}\n{}", self.log_tail(), self.part_logs());
        }
        let data = self.data();
        let _ = self
            .command(
                "pg_ctl",
                &[
                    "stop",
                    "-D",
                    &data,
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    "-s",
                ],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Clients that retry with the same Idempotency-Key

/// A failed attempt: what the client saw.
#[derive(Debug, Clone)]
struct Failure {
    status: Option<u16>,
    content_type: Option<String>,
    slug: Option<String>,
    retry_after: Option<String>,
    /// Transport error, if the request got no answer at all.
    error: Option<String>,
    took: Duration,
}

impl Failure {
    /// A clean "try again later": 503 problem+json with a stable type and `Retry-After`,
    /// answered within the bound.
    fn is_clean(&self, slugs: &[&str]) -> bool {
        self.error.is_none()
            && self.status == Some(503)
            && self.content_type.as_deref() == Some("application/problem+json")
            && self.slug.as_deref().is_some_and(|s| slugs.contains(&s))
            && self.retry_after.is_some()
            && self.took <= ANSWER_BOUND
    }
}

/// A command as sent, with the answer it finally got.
#[derive(Debug, Clone)]
struct Sent {
    kind: &'static str,
    path: String,
    body: Value,
    key: String,
    token: String,
    status: u16,
    answer: Value,
    failures: Vec<Failure>,
}

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Every 2xx answer of every client, when it came: to measure how long commands stalled.
    successes: Arc<Mutex<Vec<Instant>>>,
    accepted: Arc<AtomicUsize>,
}

impl Client {
    /// Sends until the answer is not a 5xx (or the deadline passes); the same key every time.
    async fn send(&self, kind: &'static str, path: String, body: Value) -> Sent {
        let key = Uuid::new_v4().to_string();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut failures = Vec::new();
        loop {
            let started = Instant::now();
            let r = self
                .http
                .post(format!("{}{path}", self.base))
                .bearer_auth(&self.token)
                .header("idempotency-key", &key)
                .json(&body)
                .timeout(ANSWER_BOUND + Duration::from_secs(5))
                .send()
                .await;
            let pause = match r {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let header = |n: &str| {
                        r.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let (content_type, retry_after) =
                        (header("content-type"), header("retry-after"));
                    let answer: Value = r.json().await.unwrap_or(Value::Null);
                    if status < 500 {
                        if (200..300).contains(&status) {
                            self.record_success();
                        }
                        return Sent {
                            kind,
                            path,
                            body,
                            key,
                            token: self.token.clone(),
                            status,
                            answer,
                            failures,
                        };
                    }
                    let pause = retry_after
                        .as_deref()
                        .and_then(|s| s.parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(Duration::from_secs(1)))
                        .unwrap_or(Duration::from_millis(200));
                    failures.push(Failure {
                        status: Some(status),
                        content_type,
                        slug: slug_of(&answer),
                        retry_after,
                        error: None,
                        took: started.elapsed(),
                    });
                    pause
                }
                Err(e) => {
                    failures.push(Failure {
                        status: None,
                        content_type: None,
                        slug: None,
                        retry_after: None,
                        error: Some(e.to_string()),
                        took: started.elapsed(),
                    });
                    Duration::from_millis(200)
                }
            };
            assert!(
                Instant::now() < deadline,
                "{kind} {path} got no final answer in 90 s: {failures:?}"
            );
            tokio::time::sleep(pause).await;
        }
    }

    /// GET until 200; returns the failures seen before.
    async fn query(&self, path: &str) -> (Value, Vec<Failure>) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut failures = Vec::new();
        loop {
            let started = Instant::now();
            let r = self
                .http
                .get(format!("{}{path}", self.base))
                .bearer_auth(&self.token)
                .timeout(ANSWER_BOUND + Duration::from_secs(5))
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 200 => {
                    return (r.json().await.unwrap_or(Value::Null), failures);
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let header = |n: &str| {
                        r.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let (content_type, retry_after) =
                        (header("content-type"), header("retry-after"));
                    let answer: Value = r.json().await.unwrap_or(Value::Null);
                    failures.push(Failure {
                        status: Some(status),
                        content_type,
                        slug: slug_of(&answer),
                        retry_after,
                        error: None,
                        took: started.elapsed(),
                    });
                }
                Err(e) => failures.push(Failure {
                    status: None,
                    content_type: None,
                    slug: None,
                    retry_after: None,
                    error: Some(e.to_string()),
                    took: started.elapsed(),
                }),
            }
            assert!(
                Instant::now() < deadline,
                "GET {path} got no 200 in 90 s: {failures:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn record_success(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.successes.lock() {
            s.push(Instant::now());
        }
    }
}

fn slug_of(problem: &Value) -> Option<String> {
    problem["type"]
        .as_str()
        .and_then(|t| t.rsplit('/').next())
        .map(str::to_owned)
}

/// One client's stream of commands until `stop`: a booking in a slot of its own, then a
/// confirmation and a deposit, a cancellation, or a confirmation; now and then a read of the
/// booking at its position. Every command must end 2xx: a slot of its own means a retried
/// booking that did commit must answer its first outcome, not a conflict with itself.
async fn client_flow(
    client: Client,
    c: u32,
    (venue, table, room): (Uuid, Uuid, Uuid),
    stop: Arc<AtomicBool>,
) -> (Vec<Sent>, Vec<Failure>) {
    let mut sent = Vec::new();
    let mut query_failures = Vec::new();
    let first_day = chrono::NaiveDate::from_ymd_opt(2030, 8, 1).unwrap_or_default();
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let day = first_day + chrono::Days::new(u64::from(n / 24));
        let resource = if n % 2 == 0 { table } else { room };
        let hour = 8 + (n % 24) / 2;
        let starts = format!("{day}T{hour:02}:{:02}:00Z", c * 10);
        let ends = format!("{day}T{hour:02}:{:02}:00Z", c * 10 + 9);
        let book = client
            .send(
                "book",
                "/v1/bookings".into(),
                json!({"venue_id": venue, "resource_id": resource, "starts_at": starts,
                       "ends_at": ends, "party_size": 2,
                       "customer": {"name": "Restart Guest",
                                    "email": format!("pg{c}-{n}-{}@example.org", Uuid::new_v4().simple())}}),
            )
            .await;
        let id = book.answer["id"].as_str().unwrap_or_default().to_owned();
        let position = book.answer["position"].as_i64().unwrap_or(0);
        let booked = book.status == 201;
        sent.push(book);
        if !booked {
            n += 1;
            continue;
        }
        match n % 3 {
            0 => {
                sent.push(
                    client
                        .send("confirm", format!("/v1/bookings/{id}/confirm"), json!({}))
                        .await,
                );
                sent.push(
                    client
                        .send(
                            "authorise",
                            format!("/v1/bookings/{id}/payments"),
                            json!({"amount_minor": 1500, "currency": "EUR", "kind": "deposit"}),
                        )
                        .await,
                );
            }
            1 => sent.push(
                client
                    .send(
                        "cancel",
                        format!("/v1/bookings/{id}/cancel"),
                        json!({"reason": "plans changed"}),
                    )
                    .await,
            ),
            _ => sent.push(
                client
                    .send("confirm", format!("/v1/bookings/{id}/confirm"), json!({}))
                    .await,
            ),
        }
        if n % 4 == 0 {
            let (detail, failures) = client
                .query(&format!("/v1/bookings/{id}?min_position={position}"))
                .await;
            assert_eq!(detail["id"], json!(id), "{detail}");
            query_failures.extend(failures);
        }
        n += 1;
    }
    (sent, query_failures)
}

// ---------------------------------------------------------------------------------------------
// Waiting, bounded

async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ready_status(app: &TestApp) -> Option<(u16, Value)> {
    let r = app
        .client
        .get(format!("{}/health/ready", app.base))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

/// Sessions holding the relay's advisory lock (`RELAY_LOCK` in `src/relay.rs`, as Postgres
/// splits a bigint key: high half in `classid`, low half in `objid`).
async fn relay_lock_holders(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND classid = x'6c656467'::bigint AND objid = x'65720001'::bigint AND objsubid = 1 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap_or(-1)
}

/// The longest stretch without a 2xx answer to any client, from `from` on.
fn longest_stall(successes: &Mutex<Vec<Instant>>, from: Instant) -> Duration {
    let mut times: Vec<Instant> = successes
        .lock()
        .map(|s| s.iter().copied().filter(|t| *t >= from).collect())
        .unwrap_or_default();
    times.sort();
    let mut longest = Duration::ZERO;
    let mut last = from;
    for t in times {
        longest = longest.max(t - last);
        last = t;
    }
    longest
}

// ---------------------------------------------------------------------------------------------
// The restart scenario

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// `pg_ctl restart -m fast`, twice.
    FastRestart,
    /// `pg_ctl stop -m immediate`; probes while it is down; `pg_ctl start`.
    Crash,
}

struct Running {
    relays: Vec<Child>,
    projector: Child,
}

async fn restart_under_load(fault: Fault) {
    let cluster = Cluster::start_new().await;
    let app = spawn_with(Spawn {
        admin: Some(cluster.admin_url()),
        nats: true,
        ..Spawn::default()
    })
    .await;
    let mut parts: Parts = parts(&app, std::env::var("NATS_URL").unwrap_or_default());
    parts.logs = Some(cluster.dir.clone());
    // Two relays: one leads, one stands by; after the restart exactly one must lead again.
    let mut running = Running {
        relays: vec![parts.spawn("relay"), parts.spawn("relay")],
        projector: parts.spawn("projector"),
    };
    let resources = app.venue().await;
    wait_for("ready before the test", Duration::from_secs(60), || async {
        matches!(ready_status(&app).await, Some((200, _)))
    })
    .await;

    let successes = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4u32)
        .map(|c| {
            let client = Client {
                http: app.client.clone(),
                base: app.base.clone(),
                token: app.token(Role::Staff).0,
                successes: successes.clone(),
                accepted: accepted.clone(),
            };
            tokio::spawn(client_flow(client, c, resources, stop.clone()))
        })
        .collect();
    let flowing = |at_least: usize| {
        let accepted = accepted.clone();
        async move {
            wait_for("commands flowing", Duration::from_secs(60), || {
                let n = accepted.load(Ordering::Relaxed);
                async move { n >= at_least }
            })
            .await
        }
    };
    flowing(30).await;

    let fault_began = Instant::now();
    match fault {
        Fault::FastRestart => {
            for round in 1..=2 {
                let took = cluster.restart_fast().await;
                eprintln!("pg_restart: restart -m fast #{round} took {took:?}");
                let n = accepted.load(Ordering::Relaxed);
                let resumed = flowing(n + 10).await;
                eprintln!(
                    "pg_restart: after restart #{round}, 10 more commands were accepted within {resumed:?}"
                );
            }
        }
        Fault::Crash => {
            let took = cluster.stop_immediate().await;
            eprintln!("pg_restart: stop -m immediate took {took:?}");
            probe_while_down(&app, resources).await;
            let took = cluster.start().await;
            eprintln!("pg_restart: start (crash recovery) took {took:?}");
        }
    }

    // Recovery, without restarting anything of the ledger.
    let (relayed, projected) = read_side_recovery(&app, &parts).await;
    eprintln!(
        "pg_restart ({fault:?}): the log as it stood when Postgres was back was in NATS after \
         {relayed:?} and in every read model after {projected:?}"
    );
    let ready = wait_for(
        "ready again after the restart",
        Duration::from_secs(60),
        || async { matches!(ready_status(&app).await, Some((200, _))) },
    )
    .await;
    let probe = Client {
        http: app.client.clone(),
        base: app.base.clone(),
        token: app.token(Role::Staff).0,
        successes: successes.clone(),
        accepted: accepted.clone(),
    };
    let (venue, table, _) = resources;
    let started = Instant::now();
    let booked = probe
        .send(
            "book",
            "/v1/bookings".into(),
            json!({"venue_id": venue, "resource_id": table,
                   "starts_at": "2031-01-01T19:00:00Z", "ends_at": "2031-01-01T21:00:00Z",
                   "party_size": 2, "customer": {"name": "After", "email": unique_email()}}),
        )
        .await;
    assert_eq!(booked.status, 201, "{booked:?}");
    let command_took = started.elapsed();
    let (id, position) = (
        booked.answer["id"].as_str().unwrap_or_default().to_owned(),
        booked.answer["position"].as_i64().unwrap_or(0),
    );
    let (detail, _) = probe
        .query(&format!("/v1/bookings/{id}?min_position={position}"))
        .await;
    assert_eq!(detail["id"], json!(id));
    let query_took = started.elapsed();
    eprintln!(
        "pg_restart ({fault:?}): ready again {ready:?} after Postgres was back; then a command took \
         {command_took:?} and a query at its position {query_took:?} in all; longest stall of \
         the clients' commands since the fault began: {:?}",
        longest_stall(&successes, fault_began)
    );

    let n = accepted.load(Ordering::Relaxed);
    flowing(n + 20).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    let mut query_failures = Vec::new();
    for c in clients {
        let (s, f) = c.await.unwrap_or_else(|e| panic!("a client failed: {e}"));
        sent.extend(s);
        query_failures.extend(f);
    }
    sent.push(booked);

    assert_outcomes(&app, &sent, &query_failures).await;

    // The ledger's own processes survived: none was restarted, none exited.
    for child in running.relays.iter_mut().chain([&mut running.projector]) {
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "a ledger process exited: {:?}",
            child.try_wait()
        );
    }
    // Exactly one relay leads again: the lock died with its session, and was taken again.
    wait_for(
        "one relay holding the lock",
        Duration::from_secs(30),
        || async { relay_lock_holders(&app).await == 1 },
    )
    .await;

    assert_settled(&app, &parts).await;
    assert_eq!(relay_lock_holders(&app).await, 1, "exactly one relay leads");
    verify_passes(&app).await;
    for child in running.relays.iter_mut() {
        sigkill(child).await;
    }
    sigkill(&mut running.projector).await;
    app.pool.close().await;
    drop(app);
    drop(cluster);
}

/// How long, from now, until the relay has published and every read model applied the log as it
/// stands now.
async fn read_side_recovery(app: &TestApp, parts: &Parts) -> (Duration, Duration) {
    let started = Instant::now();
    let head = loop {
        let head = crate::faults::head(app).await;
        if head >= 0 {
            break head;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the log head is still unreadable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let js = async_nats::jetstream::new(
        async_nats::connect(&parts.nats_url)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    wait_for("the relay to catch up", Duration::from_secs(30), || async {
        match js.get_stream(&parts.stream).await {
            Ok(mut s) => s
                .info()
                .await
                .is_ok_and(|i| i.state.last_sequence as i64 >= head),
            Err(_) => false,
        }
    })
    .await;
    let relayed = started.elapsed();
    wait_for(
        "the read models to catch up",
        Duration::from_secs(30),
        || async {
            let cp = crate::faults::checkpoints(app).await;
            ledger_projections::PROJECTIONS
                .iter()
                .all(|p| cp.get(*p).copied().unwrap_or(0) >= head)
        },
    )
    .await;
    (relayed, started.elapsed())
}

/// While Postgres is down: commands and queries answer a clean 503 within the bound, readiness
/// reports the database down at once, liveness stays up.
async fn probe_while_down(app: &TestApp, (venue, table, _): (Uuid, Uuid, Uuid)) {
    let staff = app.token(Role::Staff);
    let started = Instant::now();
    let command = app.post_with(
        "/v1/bookings",
        &staff,
        booking_body(venue, table, 6, 7, &unique_email()),
        &[("idempotency-key", "while-down")],
    );
    let query = async {
        app.send(
            app.client
                .get(format!("{}/v1/venues/{venue}", app.base))
                .bearer_auth(&staff.0),
        )
        .await
    };
    let ready = async {
        let t = Instant::now();
        let r = app
            .send(app.client.get(format!("{}/health/ready", app.base)))
            .await;
        (r, t.elapsed())
    };
    let live = app.send(app.client.get(format!("{}/health/live", app.base)));
    let (command, query, (ready, ready_took), live) = tokio::time::timeout(ANSWER_BOUND, async {
        tokio::join!(command, query, ready, live)
    })
    .await
    .unwrap_or_else(|_| panic!("requests hung while Postgres was down (> {ANSWER_BOUND:?})"));
    eprintln!(
        "pg_restart: while down, a command and a query were answered within {:?}; readiness in {ready_took:?}",
        started.elapsed()
    );
    for a in [&command, &query] {
        a.assert_problem(503, "service-unavailable");
        assert!(a.header("retry-after").is_some(), "Retry-After: {a:?}");
    }
    assert!(
        started.elapsed() < DOWN_ANSWER_BOUND,
        "a command and a query took {:?} to be answered while Postgres was down",
        started.elapsed()
    );
    assert_eq!(ready.status, 503, "{ready:?}");
    assert_eq!(ready.body["checks"]["postgres"], false, "{ready:?}");
    assert!(
        ready_took < Duration::from_secs(5),
        "readiness took {ready_took:?}"
    );
    assert_eq!(live.status, 200, "{live:?}");
}

/// Every command answered 2xx is in the log once, where its answer says; every key gives its
/// first answer again; the clients only ever saw clean 503s before their final answers.
async fn assert_outcomes(app: &TestApp, sent: &[Sent], query_failures: &[Failure]) {
    let retried = sent.iter().filter(|s| !s.failures.is_empty()).count();
    let failures: Vec<&Failure> = sent.iter().flat_map(|s| &s.failures).collect();
    eprintln!(
        "pg_restart: {} commands, {retried} of them retried after {} failed attempts; {} failed queries",
        sent.len(),
        failures.len(),
        query_failures.len()
    );
    for f in &failures {
        assert!(
            f.is_clean(&["service-unavailable"]),
            "a command failed uncleanly: {f:?}"
        );
    }
    for f in query_failures {
        assert!(
            f.is_clean(&["service-unavailable", "projection-lagging"]),
            "a query failed uncleanly: {f:?}"
        );
    }
    for s in sent {
        assert!(
            (200..300).contains(&s.status),
            "every command ends accepted (its slot is its own): {s:?}"
        );
    }

    // Once each, where the answers say.
    let mut by_kind: BTreeMap<&str, i64> = BTreeMap::new();
    for s in sent {
        *by_kind.entry(s.kind).or_default() += 1;
        let stream = s.answer["stream"].as_str().unwrap_or_default();
        let (version, position) = (
            s.answer["version"].as_i64().unwrap_or(-1),
            s.answer["position"].as_i64().unwrap_or(-1),
        );
        let at: Option<(String, i64)> = sqlx::query_as(
            "SELECT stream_id, stream_version FROM events WHERE global_position = $1",
        )
        .bind(position)
        .fetch_optional(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            at,
            Some((stream.to_owned(), version)),
            "the answer of {} {} names its event: {s:?}",
            s.kind,
            s.path
        );
    }
    let types = [
        ("book", "BookingRequested"),
        ("confirm", "BookingConfirmed"),
        ("cancel", "BookingCancelled"),
        ("authorise", "PaymentAuthorized"),
    ];
    for (kind, event_type) in types {
        assert_eq!(
            app.count_events(event_type).await,
            by_kind.get(kind).copied().unwrap_or(0),
            "{event_type}: one per accepted {kind}, none from a retry"
        );
    }
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.pool)
        .await
        .unwrap_or(-1);
    assert_eq!(
        keys,
        sent.len() as i64,
        "one idempotency record per command"
    );

    // Every key answers its first outcome again, appending nothing.
    let before = app.count_all_events().await;
    let mut replays: HashMap<&str, Value> = HashMap::new();
    for s in sent {
        let again = app
            .send(
                app.client
                    .post(format!("{}{}", app.base, s.path))
                    .bearer_auth(&s.token)
                    .header("idempotency-key", &s.key)
                    .json(&s.body),
            )
            .await;
        assert_eq!(
            (again.status, &again.body),
            (s.status, &s.answer),
            "{} {} with its key again",
            s.kind,
            s.path
        );
        replays.insert(&s.key, again.body);
    }
    assert_eq!(replays.len(), sent.len(), "keys are unique");
    assert_eq!(
        app.count_all_events().await,
        before,
        "replays append nothing"
    );
}

async fn verify_passes(app: &TestApp) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["replay", "verify"])
        .env("DATABASE_URL", &app.database_url)
        .env("RUST_LOG", "error")
        .output()
        .await
        .unwrap_or_else(|e| panic!("ledger replay verify: {e}"));
    assert!(
        out.status.success(),
        "ledger replay verify: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_under_load_loses_nothing_and_the_ledger_recovers_by_itself() {
    restart_under_load(Fault::FastRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_crash_answers_clean_503s_while_down_and_the_ledger_recovers_by_itself() {
    restart_under_load(Fault::Crash).await;
}

// ---------------------------------------------------------------------------------------------
// Connections cut through a proxy

/// A TCP proxy in front of Postgres. `cut` drops every connection through it (both sides see
/// them close); `partition` also makes it accept and close new ones at once, until `heal`.
struct Proxy {
    port: u16,
    state: Arc<Mutex<CancellationToken>>,
    frozen: Arc<Mutex<CancellationToken>>,
    partitioned: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let proxy = Proxy {
            port,
            state: Arc::new(Mutex::new(CancellationToken::new())),
            frozen: Arc::new(Mutex::new(CancellationToken::new())),
            partitioned: Arc::new(AtomicBool::new(false)),
            stop: CancellationToken::new(),
        };
        let (state, frozen, partitioned, stop) = (
            proxy.state.clone(),
            proxy.frozen.clone(),
            proxy.partitioned.clone(),
            proxy.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                if partitioned.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let cut = state.lock().map(|t| t.clone()).unwrap_or_default();
                let freeze = frozen.lock().map(|t| t.clone()).unwrap_or_default();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = freeze.cancelled() => {
                            // Silence: nothing is forwarded any more, yet both sockets stay open,
                            // as when a network drops packets without a reset.
                            stop.cancelled().await;
                        }
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        proxy
    }

    fn cut(&self) {
        if let Ok(mut t) = self.state.lock() {
            t.cancel();
            *t = CancellationToken::new();
        }
    }

    /// The connections open now go silent (no reset); new ones are forwarded.
    fn freeze(&self) {
        if let Ok(mut t) = self.frozen.lock() {
            t.cancel();
            *t = CancellationToken::new();
        }
    }

    fn partition(&self) {
        self.partitioned.store(true, Ordering::SeqCst);
        self.cut();
    }

    fn heal(&self) {
        self.partitioned.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

fn upstream_port() -> u16 {
    let url = admin_url();
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(&url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    host_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(5432)
}

/// The backend of this test's database sleeping in the commit-time trigger, if any.
async fn sleeping_backend(app: &TestApp) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event = 'PgSleep'",
    )
    .fetch_optional(&app.pool)
    .await
    .ok()
    .flatten()
}

/// Waits for the slowed commit to finish, then checks that the one booking whose answer was
/// lost was committed all the same; returns its stream.
async fn the_lost_answer_committed(app: &TestApp) -> String {
    wait_for("the commit to finish", Duration::from_secs(20), || async {
        sleeping_backend(app).await.is_none()
    })
    .await;
    let mut committed: Vec<(String,)> =
        sqlx::query_as("SELECT stream_id FROM events WHERE event_type = 'BookingRequested'")
            .fetch_all(&app.pool)
            .await
            .unwrap_or_default();
    assert_eq!(
        committed.len(),
        1,
        "the booking committed though its answer was lost"
    );
    committed.swap_remove(0).0
}

/// `POST /v1/bookings` of `body` under the Idempotency-Key `key`, owning what it needs so that
/// it can run on a task of its own while the test acts on the database.
fn keyed_booking(
    app: &TestApp,
    token: &Token,
    body: Value,
    key: &'static str,
) -> impl std::future::Future<Output = Answer> + Send + 'static {
    let (app_base, client, token) = (app.base.clone(), app.client.clone(), token.0.clone());
    async move {
        let r = client
            .post(format!("{app_base}/v1/bookings"))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }
}

/// From now on every commit that records an idempotency key sleeps 2 s first, so a test can act
/// while a commit is under way (see [`sleeping_backend`]).
async fn slow_commits(app: &TestApp) {
    sqlx::raw_sql(
        "CREATE FUNCTION test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER test_slow_commit AFTER INSERT ON idempotency_keys \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_slow_commit();",
    )
    .execute(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

async fn bookings_of(app: &TestApp, booking: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'BookingRequested' AND stream_id = $1",
    )
    .bind(format!("booking-{booking}"))
    .fetch_one(&app.pool)
    .await
    .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_whose_commit_outcome_is_lost_answers_503_and_its_retry_answers_what_committed() {
    let proxy = Proxy::start(upstream_port()).await;
    let app = spawn_with(Spawn {
        app_port: Some(proxy.port),
        ..Spawn::default()
    })
    .await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    slow_commits(&app).await;

    // 1. The connection is cut while the commit is under way: the server commits, the ledger
    //    never hears. The answer is a clean 503; the retry with the key answers what committed.
    let body = booking_body(venue, table, 18, 20, &unique_email());
    let send = |body: Value, key: &'static str| keyed_booking(&app, &staff, body, key);
    let first = tokio::spawn(send(body.clone(), "cut-mid-commit"));
    wait_for("the commit under way", Duration::from_secs(20), || async {
        sleeping_backend(&app).await.is_some()
    })
    .await;
    proxy.cut();
    let answered = tokio::time::timeout(ANSWER_BOUND, first)
        .await
        .unwrap_or_else(|_| panic!("the command hung after its connection was cut"))
        .unwrap_or_else(|e| panic!("{e}"));
    answered.assert_problem(503, "service-unavailable");
    assert!(answered.header("retry-after").is_some(), "{answered:?}");
    // The server finishes the commit it was in.
    let committed = the_lost_answer_committed(&app).await;
    let retry = send(body.clone(), "cut-mid-commit").await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(
        retry.body["stream"].as_str(),
        Some(committed.as_str()),
        "the retry answers the booking that committed: {retry:?}"
    );
    let again = send(body, "cut-mid-commit").await;
    assert_eq!((again.status, &again.body), (201, &retry.body));
    let id = retry.body["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(bookings_of(&app, &id).await, 1);

    // 2. The session is terminated while the commit is under way: nothing committed, and the
    //    server said so (57P01), so the ledger retries on a new connection by itself.
    let body = booking_body(venue, room, 18, 20, &unique_email());
    let second = tokio::spawn(send(body.clone(), "killed-mid-commit"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        if let Some(pid) = sleeping_backend(&app).await {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the second commit never got under way"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (killed,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(killed);
    let answered = tokio::time::timeout(ANSWER_BOUND, second)
        .await
        .unwrap_or_else(|_| panic!("the command hung after its session was terminated"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        answered.status, 201,
        "retried on a new connection: {answered:?}"
    );
    let id = answered.body["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(bookings_of(&app, &id).await, 1);
    let again = send(body, "killed-mid-commit").await;
    assert_eq!((again.status, &again.body), (201, &answered.body));
    assert_eq!(app.count_events("BookingRequested").await, 2);
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_cut_off_from_postgres_while_a_subject_is_erased_elsewhere_drops_its_cached_key() {
    let proxy = Proxy::start(upstream_port()).await;
    let app = spawn_with(Spawn {
        read_side: true,
        app_port: Some(proxy.port),
        ..Spawn::default()
    })
    .await;
    // Another API process of the same deployment, with its own, direct, connections.
    let elsewhere = app.second_api().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let booked = app.book(&staff, venue, table, 18, 20).await;
    assert_eq!(booked.status, 201, "{booked:?}");
    let (id, subject) = (booked.id(), booked.body["subject_id"].clone());
    let position = booked.header("x-ledger-position").unwrap_or("0").to_owned();
    // Read through this API: the subject's key is now in its cache.
    let path = format!("/v1/bookings/{id}?min_position={position}");
    let seen = app
        .send(
            app.client
                .get(format!("{}{path}", app.base))
                .bearer_auth(&staff.0),
        )
        .await;
    assert_eq!(seen.status, 200, "{seen:?}");
    assert_eq!(seen.body["customer"]["name"], "Grace Hopper", "{seen:?}");

    // This API loses Postgres; meanwhile the subject is erased through the other one.
    proxy.partition();
    let admin = app.token(Role::Admin);
    let erased = app
        .send(
            app.client
                .post(format!(
                    "{elsewhere}/v1/subjects/{}/erase",
                    subject.as_str().unwrap_or_default()
                ))
                .bearer_auth(&admin.0)
                .json(&json!({})),
        )
        .await;
    assert_eq!(erased.status, 200, "{erased:?}");
    // While cut off, this API answers clean 503s.
    let cut_off = app
        .send(
            app.client
                .get(format!("{}/v1/bookings/{id}", app.base))
                .bearer_auth(&staff.0),
        )
        .await;
    cut_off.assert_problem(503, "service-unavailable");
    proxy.heal();

    // Back: the notification of the erasure was missed, yet the key is not used.
    let head = crate::faults::head(&app).await;
    let reader = Client {
        http: app.client.clone(),
        base: app.base.clone(),
        token: staff.0.clone(),
        successes: Arc::default(),
        accepted: Arc::default(),
    };
    let (after, failures) = reader
        .query(&format!("/v1/bookings/{id}?min_position={head}"))
        .await;
    for f in &failures {
        assert!(
            f.is_clean(&["service-unavailable", "projection-lagging"]),
            "{f:?}"
        );
    }
    assert_eq!(after["customer"], Value::Null, "{after}");
    assert_eq!(after["erased"], true, "{after}");
    // And the API works again.
    let again = app.book(&staff, venue, table, 20, 22).await;
    assert_eq!(again.status, 201, "{again:?}");
    drop(proxy);
}

/// The network goes silent (no reset) while the writer waits for its commit: the server
/// commits, the answer never arrives. The writer gives up after its statement wait (10 s) and
/// answers a clean 503 instead of holding every append of the process until TCP gives up (~15
/// minutes); the retry under the same key answers the booking that committed, and the writer
/// goes on on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_whose_answer_is_silently_dropped_answers_503_and_its_retry_what_committed() {
    let proxy = Proxy::start(upstream_port()).await;
    let app = spawn_with(Spawn {
        app_port: Some(proxy.port),
        ..Spawn::default()
    })
    .await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    slow_commits(&app).await;
    let body = booking_body(venue, table, 18, 20, &unique_email());
    let key = [("idempotency-key", "silent-mid-commit")];
    let started = Instant::now();
    let first = tokio::spawn(keyed_booking(
        &app,
        &staff,
        body.clone(),
        "silent-mid-commit",
    ));
    wait_for("the commit under way", Duration::from_secs(20), || async {
        sleeping_backend(&app).await.is_some()
    })
    .await;
    proxy.freeze();
    let answered = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .unwrap_or_else(|_| panic!("the command hung after the network went silent"))
        .unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();
    eprintln!("pg_restart: a command whose answer was dropped was answered in {took:?}");
    answered.assert_problem(503, "service-unavailable");
    assert!(answered.header("retry-after").is_some(), "{answered:?}");
    assert!(took < Duration::from_secs(20), "answered after {took:?}");
    let committed = the_lost_answer_committed(&app).await;
    let retry = app.post_with("/v1/bookings", &staff, body, &key).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(
        retry.body["stream"].as_str(),
        Some(committed.as_str()),
        "the retry answers the booking that committed: {retry:?}"
    );
    // The writer goes on, on a new connection.
    let next = app.book(&staff, venue, room, 18, 20).await;
    assert_eq!(next.status, 201, "{next:?}");
    verify_passes(&app).await;
}
