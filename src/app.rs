//! Wiring: build the pieces from settings, serve until shut down.

use crate::config::Settings;
use crate::http::{self, AppState};
use crate::store::append::Appender;
use crate::store::vault::KeyVault;
use anyhow::Context;
use ledger_events::pii::Keyring;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A built, bound application: `port` is known before serving (tests bind `127.0.0.1:0`).
pub struct Application {
    listener: TcpListener,
    state: AppState,
    writer: tokio::task::JoinHandle<()>,
}

/// A pool for the command-line tools: they wait up to 10 s for a connection.
pub async fn connect(database_url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_waiting(
        database_url,
        max_connections,
        std::time::Duration::from_secs(10),
    )
    .await
}

/// A pool whose callers wait at most `wait` for a connection (every one busy, or Postgres
/// unreachable) and then get an error: the service answers 503 then (`LEDGER_DATABASE_WAIT_SECONDS`)
/// rather than holding its clients for longer.
pub async fn connect_waiting(
    database_url: &str,
    max_connections: u32,
    wait: std::time::Duration,
) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(wait)
        .connect(database_url)
        .await
        .context("connecting to Postgres (DATABASE_URL)")
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("./migrations")
        .run(pool)
        .await
        .context("applying migrations")
}

/// Connects to NATS, retrying until it answers or `shutdown` is cancelled: the relay has nothing
/// to do without it, and nats-server may start after us.
pub async fn connect_nats(
    url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<async_nats::Client> {
    loop {
        match async_nats::connect(url).await {
            Ok(client) => return Ok(client),
            Err(e) => tracing::warn!(error = %e, "NATS is not reachable yet (NATS_URL)"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("shut down before NATS answered"),
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

impl Application {
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let pool = connect_waiting(&settings.database_url, 32, settings.database_wait).await?;
        let nats = match async_nats::connect(&settings.nats_url).await {
            Ok(client) => Some(client),
            Err(e) => {
                // The command side does not need NATS; readiness reports it until it is back.
                tracing::warn!(error = %e, "NATS is not reachable; continuing without it");
                None
            }
        };
        Self::with_parts(pool, nats, settings).await
    }

    /// Builds from an existing pool, for tests and the benchmark.
    pub async fn with_parts(
        pool: PgPool,
        nats: Option<async_nats::Client>,
        settings: &Settings,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        let keyring = Arc::new(Keyring::derive(&settings.master_key));
        let (appender, writer) = Appender::spawn(pool.clone(), &settings.database_url)?;
        let read_position = http::queries::ReadPosition::start(pool.clone())
            .await
            .context("listening for projection progress")?;
        tokio::spawn(http::audit_verify::checkpoint_periodically(
            pool.clone(),
            keyring.signing_seed(),
            std::time::Duration::from_secs(60),
        ));
        let vault = KeyVault::new(pool.clone(), keyring)
            .with_backup_retention_days(settings.backup_retention_days);
        tokio::spawn(vault.clone().follow_erasures());
        let ops = http::ops::Ops::new(&settings.nats_stream);
        tokio::spawn(crate::store::purge::purge_periodically(
            pool.clone(),
            settings.idempotency_retention,
            ops.purge.clone(),
        ));
        let state = AppState {
            ops,
            read_position,
            vault,
            pool,
            appender,
            jwt: http::auth::JwtKeys::new(&settings.jwt_secret),
            webhook_secret: Arc::new(settings.webhook_secret.clone()),
            nats,
            venues: Default::default(),
        };
        Ok(Application {
            listener,
            state,
            writer,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` is cancelled: stops accepting, lets requests in flight finish,
    /// lets the writer commit what it holds, then closes the pool.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            listener,
            state,
            writer,
        } = self;
        let pool = state.pool.clone();
        let nats = state.nats.clone();
        let app = http::router(state);
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .context("serving HTTP")?;
        // The router (and with it every Appender handle) is gone: the writer drains and ends.
        let _ = writer.await;
        if let Some(nats) = nats {
            let _ = nats.drain().await;
        }
        pool.close().await;
        Ok(())
    }
}

/// Cancels the token on Ctrl-C or SIGTERM.
pub fn shutdown_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("shutting down");
        token.cancel();
    });
}
