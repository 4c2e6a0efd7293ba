//! The append writer's own connection to Postgres, on `tokio-postgres` rather than sqlx: it
//! *pipelines*. A statement can be sent while the one before it still runs, and the server starts
//! it the moment that one commits, with nothing of the host in between (ADR 0001, seventh
//! session). sqlx answers one statement at a time per connection. Everything else of the process
//! reads and writes through the sqlx pool; what leaves this module is sqlx's error type, so the
//! rest of the pipeline and the HTTP layer tell failures apart as they always did.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, Config, NoTls, Statement};

/// Where the writer connects: the pool's database, parsed for `tokio-postgres`.
#[derive(Clone)]
pub struct WireConfig(Arc<Config>);

impl WireConfig {
    /// Parses a `postgres://` URL (the one the pool was made from).
    pub fn parse(database_url: &str) -> Result<Self, String> {
        let mut config: Config = database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| format!("the append writer's database URL: {e}"))?;
        config.application_name(APPLICATION_NAME);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_WAIT);
        }
        Ok(WireConfig(Arc::new(config)))
    }
}

/// The writer connection's `application_name`, by which `pg_stat_activity` shows it (the
/// benchmark finds the writer's backend by it).
pub const APPLICATION_NAME: &str = "ledger append writer";

/// How long the writer waits to connect, like the pool waits for a connection by default.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// An open connection: the client, the writer's prepared statement (the `append_batch` call),
/// and the task that drives the socket (it ends when the connection does).
pub(super) struct Wire {
    pub client: Arc<Client>,
    pub append: Statement,
    driver: tokio::task::JoinHandle<()>,
}

impl Wire {
    pub async fn connect(config: &WireConfig, statement: &str) -> Result<Wire, sqlx::Error> {
        let (client, connection) = config.0.connect(NoTls).await.map_err(into_sqlx)?;
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                // The server's own words (a restart, a cut): no values of any statement.
                tracing::debug!(error = %e, "the append writer's connection ended");
            }
        });
        let append = match client.prepare(statement).await {
            Ok(s) => s,
            Err(e) => {
                driver.abort();
                return Err(into_sqlx(e));
            }
        };
        Ok(Wire {
            client: Arc::new(client),
            append,
            driver,
        })
    }

    /// Whether the connection is known to be gone (its socket closed or errored).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed() || self.driver.is_finished()
    }

    /// One empty round trip.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.client
            .simple_query("")
            .await
            .map(drop)
            .map_err(into_sqlx)
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        // Closes the socket now, rather than when the last pipelined call lets go of the client.
        self.driver.abort();
    }
}

/// A `tokio-postgres` error as sqlx's: the server's answer (an `ErrorResponse`) stays a database
/// error with its SQLSTATE, constraint and detail; anything else is an I/O error, for which the
/// statement's outcome is unknown (as with sqlx).
pub(super) fn into_sqlx(e: tokio_postgres::Error) -> sqlx::Error {
    if let Some(db) = e.as_db_error() {
        return sqlx::Error::Database(Box::new(ServerError {
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            constraint: db.constraint().map(str::to_owned),
            detail: db.detail().map(str::to_owned),
        }));
    }
    let kind = if e.is_closed() {
        std::io::ErrorKind::ConnectionAborted
    } else {
        std::io::ErrorKind::Other
    };
    sqlx::Error::Io(std::io::Error::new(kind, e.to_string()))
}

/// The server's error response to one of the writer's statements.
#[derive(Debug)]
pub(super) struct ServerError {
    code: String,
    message: String,
    constraint: Option<String>,
    detail: Option<String>,
}

impl ServerError {
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)
    }
}

impl std::error::Error for ServerError {}

impl sqlx::error::DatabaseError for ServerError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.code))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn constraint(&self) -> Option<&str> {
        self.constraint.as_deref()
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use sqlx::error::ErrorKind;
        match self.code.as_str() {
            "23505" => ErrorKind::UniqueViolation,
            "23503" => ErrorKind::ForeignKeyViolation,
            "23502" => ErrorKind::NotNullViolation,
            "23514" => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}
