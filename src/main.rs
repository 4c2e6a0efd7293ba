//! The `ledger` command line: a thin shell over the library.

use clap::{Parser, Subcommand, ValueEnum};
use ledger::config::{ConfigError, DatabaseArgs, JwtArgs, ServeConfig};
use ledger::http::auth::{Claims, JwtKeys, Role};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "ledger",
    version,
    about = "An event-sourced booking ledger on Postgres and NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (and, as they land, the relay and projection workers).
    Serve {
        #[command(flatten)]
        config: ServeConfig,
        /// Run only one part, so each can be scaled out on its own (default: all).
        #[arg(long, value_enum)]
        only: Option<Part>,
    },
    /// Apply the migrations in `migrations/`.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Print a signed bearer token.
    Token {
        #[command(flatten)]
        jwt: JwtArgs,
        /// The caller's opaque id (never an email).
        #[arg(long)]
        sub: String,
        #[arg(long, value_enum)]
        role: Role,
        /// A customer's data-subject id.
        #[arg(long)]
        subject: Option<Uuid>,
        /// Restrict a staff token to these venues (repeatable).
        #[arg(long = "venue")]
        venues: Vec<Uuid>,
        /// Lifetime, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Register the demo venue and its resources (idempotent).
    Seed {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Benchmarks against the local Postgres.
    Bench(ledger::bench::BenchArgs),
    /// Read the log back: a stream's history, its state as of a time. Needs only DATABASE_URL.
    Replay {
        #[command(subcommand)]
        which: ReplayCommand,
    },
}

#[derive(Subcommand)]
enum ReplayCommand {
    /// Rebuilds projections from the log into shadow tables while the API keeps serving, compares
    /// them with the live ones (differences are reported; the rebuild wins) and swaps them in
    /// atomically. A progress bar on a terminal; one summary line per projection on stdout.
    Rebuild {
        #[command(flatten)]
        database: DatabaseArgs,
        /// A projection to rebuild (repeatable; default: all).
        #[arg(long = "projection", value_name = "NAME",
              value_parser = clap::builder::PossibleValuesParser::new(ledger_projections::PROJECTIONS))]
        projections: Vec<String>,
    },
    /// A stream's audit trail, oldest first. Personal fields stay sealed; CSV has no payloads.
    /// Exit 1 if the stream has no events.
    History {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The stream, e.g. booking-<uuid>.
        #[arg(long)]
        stream: String,
        #[arg(long, value_enum, default_value_t = HistoryFormat::Json)]
        format: HistoryFormat,
    },
    /// A booking, payment or venue stream's state as of TIME, folded from the log (JSON).
    /// Exit 1 if it did not exist yet at TIME, 2 for a stream of another kind.
    AsOf {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The stream, e.g. booking-<uuid>.
        #[arg(long)]
        stream: String,
        /// RFC 3339 with an offset, e.g. 2026-12-01T18:00:00Z; events recorded at or before it count.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: chrono::DateTime<chrono::Utc>,
    },
    /// Checks the integrity of the whole log: gapless positions, contiguous stream versions,
    /// every leaf and entry hash recomputed, the head. Prints a JSON report; exit 0 when intact,
    /// 1 naming the first broken position otherwise.
    Verify {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Also check the log against a checkpoint saved earlier (JSON from
        /// `GET /v1/audit/checkpoints/latest` or `ledger replay checkpoint`): its signature, then
        /// an RFC 9162 consistency proof from its tree to the log now, against its root. Catches a
        /// rewritten, re-chained or truncated history. The report gains `against`; exit 1 naming
        /// the failed check when the log does not extend the checkpoint.
        #[arg(long, value_name = "FILE")]
        against: Option<std::path::PathBuf>,
        /// The Ed25519 public key (hex) the saved checkpoint must be signed by, as pinned when you
        /// first trusted the ledger. Default: the key of the ledger's latest signed checkpoint.
        #[arg(long = "public-key", value_name = "HEX", requires = "against", value_parser = parse_public_key)]
        public_key: Option<String>,
    },
    /// Signs a checkpoint of the log now and prints it (JSON) for safekeeping outside the system.
    Checkpoint {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        keys: ledger::config::KeyArgs,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HistoryFormat {
    /// A JSON array of events as `/v1/audit/log` serves them.
    Json,
    /// position,event_id,stream,version,type,recorded_at,actor,role,command,request_id
    Csv,
}

fn parse_public_key(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    match hex::decode(raw) {
        Ok(bytes) if bytes.len() == 32 => Ok(raw.to_ascii_lowercase()),
        _ => Err("not an Ed25519 public key: 64 hex digits".into()),
    }
}

fn parse_time(raw: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("not an RFC 3339 time with an offset: {e}"))
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// The HTTP API with its append pipeline.
    Api,
    /// The relay from the log to NATS JetStream (one active, others stand by).
    Relay,
    /// The projection workers that build the read models from JetStream.
    Projector,
}

fn config_error(e: ConfigError) -> ExitCode {
    eprintln!("ledger: configuration error: {e}");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    ledger::telemetry::init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ledger: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config, only } => {
            let settings = match config.validate() {
                Ok(s) => s,
                Err(e) => return Ok(config_error(e)),
            };
            let shutdown = CancellationToken::new();
            ledger::app::shutdown_on_signals(shutdown.clone());
            let relay = if only.is_none() || only == Some(Part::Relay) {
                let pool =
                    ledger::app::connect_waiting(&settings.database_url, 4, settings.database_wait)
                        .await?;
                let nats = ledger::app::connect_nats(&settings.nats_url, &shutdown).await?;
                let config = ledger::relay::RelayConfig {
                    stream: settings.nats_stream.clone(),
                    subject_prefix: settings.nats_subjects.clone(),
                    ..Default::default()
                };
                let relay = ledger::relay::Relay::new(pool, nats, config);
                Some(tokio::spawn(relay.run(shutdown.clone())))
            } else {
                None
            };
            // One worker per read model, each on its own durable consumer and checkpoint.
            let mut projectors = Vec::new();
            if only.is_none() || only == Some(Part::Projector) {
                let pool =
                    ledger::app::connect_waiting(&settings.database_url, 4, settings.database_wait)
                        .await?;
                let nats = ledger::app::connect_nats(&settings.nats_url, &shutdown).await?;
                for &name in ledger_projections::PROJECTIONS {
                    let worker = ledger_projections::worker::Worker::new(
                        pool.clone(),
                        nats.clone(),
                        &settings.nats_stream,
                        name,
                    );
                    projectors.push(tokio::spawn(worker.run(shutdown.clone())));
                }
            }
            if only.is_none() || only == Some(Part::Api) {
                let app = ledger::app::Application::build(&settings).await?;
                tracing::info!(addr = %app.local_addr()?, "serving");
                app.run(shutdown.clone()).await?;
                shutdown.cancel();
            }
            if only == Some(Part::Relay) || only == Some(Part::Projector) {
                shutdown.cancelled().await;
            }
            if let Some(relay) = relay {
                relay.await??;
            }
            for projector in projectors {
                projector.await??;
            }
        }
        Command::Migrate { database } => {
            let url = match database.url() {
                Ok(u) => u,
                Err(e) => return Ok(config_error(e)),
            };
            let pool = ledger::app::connect(&url, 2).await?;
            ledger::app::migrate(&pool).await?;
            println!("migrations applied");
        }
        Command::Token {
            jwt,
            sub,
            role,
            subject,
            venues,
            ttl,
        } => {
            let secret = match jwt.secret() {
                Ok(s) => s,
                Err(e) => return Ok(config_error(e)),
            };
            if sub.trim().is_empty() || sub.contains('@') {
                eprintln!("ledger: --sub must be an opaque id, not empty and not an email");
                return Ok(ExitCode::from(2));
            }
            if role == Role::Customer && subject.is_none() {
                eprintln!("ledger: a customer token needs --subject");
                return Ok(ExitCode::from(2));
            }
            let now = chrono::Utc::now().timestamp();
            let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
            let claims = Claims {
                sub,
                role,
                exp: now.saturating_add(ttl),
                iat: Some(now),
                subject,
                venues: if venues.is_empty() {
                    None
                } else {
                    Some(venues)
                },
            };
            println!("{}", JwtKeys::new(&secret).sign(&claims)?);
        }
        Command::Seed { database } => {
            let url = match database.url() {
                Ok(u) => u,
                Err(e) => return Ok(config_error(e)),
            };
            let pool = ledger::app::connect(&url, 2).await?;
            let (appender, writer) = ledger::store::append::Appender::spawn(pool.clone(), &url)?;
            let added = ledger::seed::demo_venue(&appender).await?;
            drop(appender);
            let _ = writer.await;
            println!(
                "demo venue {} {}",
                ledger::seed::DEMO_VENUE,
                if added {
                    "registered"
                } else {
                    "already present"
                }
            );
        }
        Command::Bench(args) => return ledger::bench::run(args).await,
        Command::Replay { which } => return replay(which).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(which: ReplayCommand) -> anyhow::Result<ExitCode> {
    use ledger_replay::{as_of, history};
    match which {
        ReplayCommand::Rebuild {
            database,
            projections,
        } => {
            let url = match database.url() {
                Ok(u) => u,
                Err(e) => return Ok(config_error(e)),
            };
            let pool = ledger::app::connect(&url, 4).await?;
            ledger::rebuild::run(&pool, &projections).await?;
        }
        ReplayCommand::Checkpoint { database, keys } => {
            let (url, master) = match (database.url(), keys.master_key()) {
                (Ok(u), Ok(k)) => (u, k),
                (Err(e), _) | (_, Err(e)) => return Ok(config_error(e)),
            };
            let pool = ledger::app::connect(&url, 2).await?;
            let seed = ledger_events::pii::Keyring::derive(&master).signing_seed();
            match ledger_replay::checkpoint::create(&pool, &seed).await? {
                Some(cp) => emit(&(serde_json::to_string_pretty(&cp)? + "\n"))?,
                None => {
                    eprintln!("ledger: the log is empty; nothing to sign");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        ReplayCommand::Verify {
            database,
            against,
            public_key,
        } => {
            let url = match database.url() {
                Ok(u) => u,
                Err(e) => return Ok(config_error(e)),
            };
            let pool = ledger::app::connect(&url, 2).await?;
            let against = match against {
                Some(file) => {
                    let text = std::fs::read_to_string(&file)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                    let cp: ledger_events::checkpoint::Checkpoint = serde_json::from_str(&text)
                        .map_err(|e| {
                            anyhow::anyhow!("{} is not a checkpoint: {e}", file.display())
                        })?;
                    let report = ledger_replay::checkpoint::verify_against(
                        &pool,
                        &cp,
                        public_key.as_deref(),
                    )
                    .await?;
                    Some(report)
                }
                None => None,
            };
            // The rows themselves, whatever the checkpoint said: one report on stdout.
            let report = ledger_replay::verify::verify(&pool).await?;
            /// `verify`'s report, with the checkpoint's when there is one.
            #[derive(serde::Serialize)]
            struct Report<'a> {
                #[serde(flatten)]
                log: &'a ledger_replay::verify::VerifyReport,
                #[serde(skip_serializing_if = "Option::is_none")]
                against: Option<&'a ledger_replay::checkpoint::AgainstReport>,
            }
            let out = Report {
                log: &report,
                against: against.as_ref(),
            };
            emit(&(serde_json::to_string_pretty(&out)? + "\n"))?;
            let mut failed = false;
            if let Some(a) = against.filter(|a| !a.consistent) {
                let at = a
                    .first_broken_position
                    .map(|p| format!(" (first broken position {p})"))
                    .unwrap_or_default();
                eprintln!(
                    "ledger: the log does not extend the checkpoint of size {}: {} check failed{at}: {}",
                    a.size,
                    a.failed.map_or("unknown", |c| c.as_str()),
                    a.reason.as_deref().unwrap_or("unknown")
                );
                failed = true;
            }
            if !report.intact {
                eprintln!(
                    "ledger: the log is broken at position {}: {}",
                    report.first_broken_position.unwrap_or(0),
                    report.reason.as_deref().unwrap_or("unknown")
                );
                failed = true;
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        ReplayCommand::History {
            database,
            stream,
            format,
        } => {
            let url = match database.url() {
                Ok(u) => u,
                Err(e) => return Ok(config_error(e)),
            };
            let pool = ledger::app::connect(&url, 2).await?;
            let events = ledger_replay::read_stream(&pool, &stream).await?;
            if events.is_empty() {
                eprintln!("ledger: stream {stream} has no events");
                return Ok(ExitCode::FAILURE);
            }
            let text = match format {
                HistoryFormat::Json => {
                    serde_json::to_string_pretty(&history::wire(&events))? + "\n"
                }
                HistoryFormat::Csv => history::csv(&events),
            };
            emit(&text)?;
        }
        ReplayCommand::AsOf {
            database,
            stream,
            at,
        } => {
            // Before connecting: a stream with no state to fold is a usage error, like a bad flag.
            if let Err(e) = as_of::foldable(&stream) {
                eprintln!("ledger: {e}");
                return Ok(ExitCode::from(2));
            }
            let url = match database.url() {
                Ok(u) => u,
                Err(e) => return Ok(config_error(e)),
            };
            let pool = ledger::app::connect(&url, 2).await?;
            match as_of::stream_as_of(&pool, &stream, at).await? {
                Some(state) => emit(&(serde_json::to_string_pretty(&state)? + "\n"))?,
                None => {
                    eprintln!(
                        "ledger: stream {stream} did not exist at {}",
                        at.to_rfc3339()
                    );
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error worth a panic or a message.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
