//! `rebuild`: a projection folded again from position 0, blue/green (ADR 0006).
//!
//! 1. [`Rebuild::start`] takes a per-projection advisory lock (one rebuild of a projection at a
//!    time) and creates the shadow tables: a schema `<projection>_next` holding a copy of each of
//!    the projection's tables (`CREATE TABLE … (LIKE live INCLUDING ALL)`, index names as live),
//!    whose secondary (non-unique) indexes are dropped until the bulk of the log is in.
//! 2. [`Rebuild::fold`] reads the log with [`crate::read_all`] in pages (keyset by position) and
//!    applies each page with the projection's own fold ([`ledger_projections::apply`], the one
//!    the live worker runs: set-based, a few statements per page) in a transaction whose
//!    `SET LOCAL search_path` is the shadow schema, so its unqualified table names land there.
//!    The next page is read and decoded on other tasks while one is written. Then the secondary
//!    indexes are built and the tables analysed. Meanwhile the live tables keep serving and the
//!    live worker keeps applying.
//! 3. [`Rebuild::swap`], in one transaction: locks the projection's checkpoint row (the live
//!    worker waits on it), brings shadow and live to the same position and compares them (row
//!    counts, and rows by primary key, column by column), folds the shadow up to the log head,
//!    replaces the live tables with the shadow ones and sets the checkpoint to the head. The
//!    shadow wins: it is the fold of the log.

use crate::{head_position, read_all, ReadError};
use ledger_events::envelope::RecordedEvent;
use ledger_projections::{Batch, ProjectionError, PROJECTIONS};
use serde::Serialize;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};
use std::time::Instant;

/// Events read (and applied in one transaction) per page: the fold's statements per page are
/// few, so a page is as large as memory comfortably allows (a few MB of events).
pub const PAGE: i64 = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("unknown projection {0:?}; known: {known}", known = PROJECTIONS.join(", "))]
    UnknownProjection(String),
    #[error("a rebuild of {0} is already running")]
    Busy(&'static str),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    #[error("the log has a gap: position {got} after {after}")]
    Gap { after: i64, got: i64 },
    /// The task reading the next page panicked or was cancelled.
    #[error("the log reader stopped: {0}")]
    Reader(#[from] tokio::task::JoinError),
}

/// How far the shadow fold is, for a progress bar: `position` of `head` (which moves on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub position: i64,
    pub head: i64,
}

/// One table whose live rows differed from the fold of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableDiff {
    pub table: String,
    pub live_rows: i64,
    pub shadow_rows: i64,
    /// Keys whose row differs, or that only one side has.
    pub differing_rows: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    pub projection: &'static str,
    /// Events applied to the shadow tables (the whole log up to `checkpoint`).
    pub events_folded: i64,
    /// The log head the swapped-in tables are at: the projection's new checkpoint.
    pub checkpoint: i64,
    /// The position at which live and shadow were compared.
    pub compared_at: i64,
    /// Where the live projection stood when the swap locked it.
    pub live_checkpoint: i64,
    pub seconds: f64,
    /// Only the tables that differed; empty when the live read model was the fold of the log.
    pub differences: Vec<TableDiff>,
}

impl RebuildReport {
    pub fn events_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.events_folded as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Rows that differed, over every table.
    pub fn differing_rows(&self) -> i64 {
        self.differences.iter().map(|d| d.differing_rows).sum()
    }

    /// One line for a human: events, seconds, rate, differences.
    pub fn summary(&self) -> String {
        let tables: Vec<String> = self
            .differences
            .iter()
            .map(|d| {
                format!(
                    "{}: {} rows differ, {} live vs {} rebuilt",
                    d.table, d.differing_rows, d.live_rows, d.shadow_rows
                )
            })
            .collect();
        let detail = if tables.is_empty() {
            String::new()
        } else {
            format!(" ({})", tables.join("; "))
        };
        format!(
            "{}: {} events folded in {:.2} s ({:.0} events/s), swapped in at position {}, \
             differences found: {}{detail}",
            self.projection,
            self.events_folded,
            self.seconds,
            self.events_per_second(),
            self.checkpoint,
            self.differing_rows(),
        )
    }
}

/// The projection's name as listed in [`PROJECTIONS`].
pub fn projection_named(name: &str) -> Result<&'static str, RebuildError> {
    PROJECTIONS
        .iter()
        .copied()
        .find(|p| *p == name)
        .ok_or_else(|| RebuildError::UnknownProjection(name.to_owned()))
}

/// Rebuilds one projection: [`Rebuild::start`], [`Rebuild::fold`], [`Rebuild::swap`].
pub async fn rebuild(
    pool: &PgPool,
    projection: &str,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<RebuildReport, RebuildError> {
    let mut rebuild = Rebuild::start(pool, projection).await?;
    rebuild.fold(progress).await?;
    rebuild.swap().await
}

/// A rebuild in progress: its shadow tables exist and hold the fold up to [`Rebuild::position`].
pub struct Rebuild {
    pool: PgPool,
    projection: &'static str,
    tables: &'static [&'static str],
    /// The schema the live tables are in (the connection's `current_schema()`).
    live: String,
    /// `<projection>_next`, holding the shadow tables under the live tables' names.
    shadow: String,
    /// The session's own `search_path`, restored after each shadow fold in the swap.
    search_path: String,
    /// `CREATE INDEX` statements of the shadow's secondary indexes, dropped while the bulk of the
    /// log is folded (building an index once is cheaper than growing it row by row) and built
    /// again before the shadow is compared or swapped. Unique indexes stay: they are part of
    /// what the fold may run into.
    deferred_indexes: Vec<String>,
    /// Whether the shadow tables have statistics.
    analyzed: bool,
    /// The first page of the log, read while the shadow tables are made.
    first_page: Option<tokio::task::JoinHandle<Result<Option<Page>, RebuildError>>>,
    position: i64,
    folded: i64,
    started: Instant,
    /// Holds the advisory lock for the rebuild's lifetime (released when it closes).
    lock: PgConnection,
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Rebuild {
    /// Takes the projection's rebuild lock and creates empty shadow tables (dropping those a
    /// failed rebuild may have left).
    pub async fn start(pool: &PgPool, projection: &str) -> Result<Self, RebuildError> {
        let projection = projection_named(projection)?;
        let tables = ledger_projections::tables(projection)
            .ok_or_else(|| RebuildError::UnknownProjection(projection.to_owned()))?;
        let started = Instant::now();
        // A connection of its own, taken out of the pool for good (it closes with the rebuild):
        // a session lock must not outlive the rebuild on a pooled connection.
        let mut lock = pool.acquire().await?.detach();
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(format!("ledger_rebuild:{projection}"))
                .fetch_one(&mut lock)
                .await?;
        if !locked {
            return Err(RebuildError::Busy(projection));
        }
        let (live, search_path): (String, String) =
            sqlx::query_as("SELECT current_schema()::text, current_setting('search_path')")
                .fetch_one(pool)
                .await?;
        let shadow = format!("{projection}_next");
        let first_page = read_ahead(pool, 0);
        let mut tx = pool.begin().await?;
        // No "does not exist, skipping" notice in the operator's log.
        sqlx::query("SET LOCAL client_min_messages = warning")
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", ident(&shadow)))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA {}", ident(&shadow)))
            .execute(&mut *tx)
            .await?;
        for table in tables {
            sqlx::query(&format!(
                "CREATE TABLE {s}.{t} (LIKE {l}.{t} INCLUDING ALL)",
                s = ident(&shadow),
                l = ident(&live),
                t = ident(table)
            ))
            .execute(&mut *tx)
            .await?;
            name_indexes_as_live(&mut tx, &live, &shadow, table).await?;
        }
        let secondary: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) \
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
              WHERE c.relnamespace = to_regnamespace($1) \
                AND NOT i.indisunique AND NOT i.indisprimary \
              ORDER BY c.relname",
        )
        .bind(ident(&shadow))
        .fetch_all(&mut *tx)
        .await?;
        let mut deferred_indexes = Vec::with_capacity(secondary.len());
        for (name, definition) in secondary {
            sqlx::query(&format!("DROP INDEX {}.{}", ident(&shadow), ident(&name)))
                .execute(&mut *tx)
                .await?;
            deferred_indexes.push(definition);
        }
        tx.commit().await?;
        Ok(Rebuild {
            pool: pool.clone(),
            projection,
            tables,
            live,
            shadow,
            search_path,
            deferred_indexes,
            analyzed: false,
            first_page: Some(first_page),
            position: 0,
            folded: 0,
            started,
            lock,
        })
    }

    /// The position the shadow tables are folded up to.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// The schema holding the shadow tables.
    pub fn shadow_schema(&self) -> &str {
        &self.shadow
    }

    /// Folds the log into the shadow tables up to the head, a page per transaction, while the
    /// live tables keep serving. Reports progress after each page. The next page is read while
    /// one is written.
    pub async fn fold(
        &mut self,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<(), RebuildError> {
        let mut next = match self.first_page.take() {
            Some(first) if self.position == 0 => first,
            _ => read_ahead(&self.pool, self.position),
        };
        loop {
            let head = head_position(&self.pool).await?;
            progress(Progress {
                position: self.position,
                head: head.max(self.position),
            });
            let Some(page) = next.await?? else {
                break;
            };
            next = read_ahead(&self.pool, page.last);
            let mut tx = self.pool.begin().await?;
            // The shadow schema alone (see `fold_events`). The shadow is the rebuild's alone until
            // the swap, which commits synchronously: a page lost in a crash is lost with the
            // rebuild that would have used it, so its commit need not wait for the disk.
            sqlx::query(
                "SELECT set_config('search_path', $1, true), \
                        set_config('synchronous_commit', 'off', true)",
            )
            .bind(ident(&self.shadow))
            .execute(&mut *tx)
            .await?;
            ledger_projections::apply_decoded(&mut tx, self.projection, &page.batch).await?;
            tx.commit().await?;
            self.position = page.last;
            self.folded += page.events;
        }
        self.complete().await
    }

    /// Builds the deferred indexes and gives the planner statistics of the fresh tables, before
    /// they are compared and serve queries. Does nothing the second time.
    async fn complete(&mut self) -> Result<(), RebuildError> {
        if self.deferred_indexes.is_empty() && self.analyzed {
            return Ok(());
        }
        // Side by side, each on a connection of its own, as `pg_restore --jobs` does: builds of
        // indexes of one table share its lock.
        let builds: Vec<String> = std::mem::take(&mut self.deferred_indexes);
        run_all(&self.pool, builds).await?;
        // Every column but the jsonb ones: nothing filters or joins on a sealed envelope, and
        // they are the costliest to sample. (A column list leaves the table's change counter
        // alone, so autovacuum still analyses the whole table later.)
        let mut analyses = Vec::new();
        for table in self.tables {
            let columns: Vec<String> = sqlx::query_scalar(
                "SELECT attname::text FROM pg_attribute \
                  WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped \
                    AND atttypid <> 'jsonb'::regtype ORDER BY attnum",
            )
            .bind(format!("{}.{}", ident(&self.shadow), ident(table)))
            .fetch_all(&self.pool)
            .await?;
            let columns: Vec<String> = columns.iter().map(|c| ident(c)).collect();
            analyses.push(format!(
                "ANALYZE {}.{} ({})",
                ident(&self.shadow),
                ident(table),
                columns.join(", ")
            ));
        }
        run_all(&self.pool, analyses).await?;
        self.analyzed = true;
        Ok(())
    }

    /// Compares live and shadow and swaps the shadow in, in one transaction (see the module).
    pub async fn swap(mut self) -> Result<RebuildReport, RebuildError> {
        self.complete().await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING",
        )
        .bind(self.projection)
        .execute(&mut *tx)
        .await?;
        // The live worker takes this row lock before it touches its tables: it waits from here
        // until the swap commits, then finds the checkpoint at the head and goes on from there.
        let (live_at,): (i64,) = sqlx::query_as(
            "SELECT position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
        )
        .bind(self.projection)
        .fetch_one(&mut *tx)
        .await?;
        let head = head_position(&mut *tx).await?;

        // Compare both at the same position: the shadow catches up with the live tables, or the
        // live tables with the shadow (what the worker would have done; we hold its lock).
        let compared_at = live_at.max(self.position);
        self.fold_shadow_until(&mut tx, compared_at).await?;
        if live_at < compared_at {
            let mut savepoint = Connection::begin(&mut *tx).await?;
            match fold_range(
                &mut savepoint,
                self.projection,
                None,
                &self.search_path,
                live_at,
                compared_at,
            )
            .await
            {
                Ok(_) => savepoint.commit().await?,
                // A live read model too damaged to take the next events: it is compared as it is
                // (and replaced all the same).
                Err(e) => {
                    tracing::warn!(projection = self.projection, error = %e,
                        "the live read model could not be brought to the compared position");
                    savepoint.rollback().await?;
                }
            }
        }
        let mut differences = Vec::new();
        // The compare hash-joins whole rows: room for them in memory, not in batches on disk.
        sqlx::query("SET LOCAL work_mem = '64MB'")
            .execute(&mut *tx)
            .await?;
        for table in self.tables {
            if let Some(d) = compare(&mut tx, &self.live, &self.shadow, table).await? {
                differences.push(d);
            }
        }
        self.fold_shadow_until(&mut tx, head).await?;

        // The swap. Locks in the tables' order (the order readers take them), then the live
        // tables go and the shadow ones move into their place, names and indexes as they were.
        let live_names: Vec<String> = self
            .tables
            .iter()
            .map(|t| format!("{}.{}", ident(&self.live), ident(t)))
            .collect();
        sqlx::query(&format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            live_names.join(", ")
        ))
        .execute(&mut *tx)
        .await?;
        for (table, live) in self.tables.iter().zip(&live_names) {
            let old = format!("{table}_old");
            sqlx::query(&format!("ALTER TABLE {live} RENAME TO {}", ident(&old)))
                .execute(&mut *tx)
                .await?;
            // Dropped before the shadow moves in: its indexes carry the names the shadow's take.
            sqlx::query(&format!("DROP TABLE {}.{}", ident(&self.live), ident(&old)))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "ALTER TABLE {}.{} SET SCHEMA {}",
                ident(&self.shadow),
                ident(table),
                ident(&self.live)
            ))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(&format!("DROP SCHEMA {}", ident(&self.shadow)))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE projection_checkpoints SET position = $2, updated_at = now() \
             WHERE projection = $1",
        )
        .bind(self.projection)
        .bind(head)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify('ledger_projection', $1)")
            .bind(format!("{}:{head}", self.projection))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let seconds = self.started.elapsed().as_secs_f64();
        let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut self.lock)
            .await;
        let _ = self.lock.close().await;
        Ok(RebuildReport {
            projection: self.projection,
            events_folded: self.folded,
            checkpoint: head,
            compared_at,
            live_checkpoint: live_at,
            seconds,
            differences,
        })
    }

    async fn fold_shadow_until(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        upto: i64,
    ) -> Result<(), RebuildError> {
        if self.position >= upto {
            return Ok(());
        }
        let n = fold_range(
            tx,
            self.projection,
            Some(&self.shadow),
            &self.search_path,
            self.position,
            upto,
        )
        .await?;
        self.folded += n;
        self.position = upto;
        Ok(())
    }
}

/// Runs the statements concurrently, each in its own transaction on a connection of the pool.
async fn run_all(pool: &PgPool, statements: Vec<String>) -> Result<(), RebuildError> {
    let tasks: Vec<_> = statements
        .into_iter()
        .map(|statement| {
            let pool = pool.clone();
            tokio::spawn(async move { sqlx::query(&statement).execute(&pool).await })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// A page of the log, read and decoded ahead of the fold.
struct Page {
    /// The position of its last event.
    last: i64,
    events: i64,
    batch: Batch,
}

/// Reads the page of the log after `after` and decodes it, on tasks of their own, so the fold
/// writes one page while the next is read and decoded; `None` past the head.
fn read_ahead(
    pool: &PgPool,
    after: i64,
) -> tokio::task::JoinHandle<Result<Option<Page>, RebuildError>> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let events = read_all(&pool, after, PAGE).await?;
        if events.is_empty() {
            return Ok(None);
        }
        let last = follows(after, &events)?;
        let n = events.len() as i64;
        let batch = tokio::task::spawn_blocking(move || Batch::decode(&events)).await??;
        Ok(Some(Page {
            last,
            events: n,
            batch,
        }))
    })
}

/// The position `events` reach when they follow `at` one by one; a gap is refused.
fn follows(mut at: i64, events: &[RecordedEvent]) -> Result<i64, RebuildError> {
    for event in events {
        if event.global_position != at + 1 {
            return Err(RebuildError::Gap {
                after: at,
                got: event.global_position,
            });
        }
        at = event.global_position;
    }
    Ok(at)
}

/// Applies `events` (which must follow `at` without a gap) with the projection's fold, its
/// unqualified table names resolved in `schema` (or the session's own path for `None`). Returns
/// the position reached. The `search_path` is the session's own again on return.
async fn fold_events(
    tx: &mut Transaction<'_, Postgres>,
    projection: &'static str,
    schema: Option<&str>,
    search_path: &str,
    at: i64,
    events: &[RecordedEvent],
) -> Result<i64, RebuildError> {
    if let Some(schema) = schema {
        // Only the shadow schema (pg_catalog is always searched): a table the projection did not
        // declare fails loudly instead of reaching a live table.
        sqlx::query("SELECT set_config('search_path', $1, true)")
            .bind(ident(schema))
            .execute(&mut **tx)
            .await?;
    }
    let at = follows(at, events)?;
    ledger_projections::apply(tx, projection, events).await?;
    if schema.is_some() {
        sqlx::query("SELECT set_config('search_path', $1, true)")
            .bind(search_path)
            .execute(&mut **tx)
            .await?;
    }
    Ok(at)
}

/// Folds the events `(after, upto]` inside `tx`, a page at a time. Returns how many.
async fn fold_range(
    tx: &mut Transaction<'_, Postgres>,
    projection: &'static str,
    schema: Option<&str>,
    search_path: &str,
    after: i64,
    upto: i64,
) -> Result<i64, RebuildError> {
    let mut at = after;
    let mut n = 0;
    while at < upto {
        // Read with the session's own path (the log is not in the shadow schema).
        let page = read_all(&mut **tx, at, PAGE.min(upto - at)).await?;
        if page.is_empty() {
            break;
        }
        n += page.len() as i64;
        at = fold_events(tx, projection, schema, search_path, at, &page).await?;
    }
    Ok(n)
}

/// Renames the shadow table's indexes (and so its constraints) to the live table's names, pairing
/// them by definition, so the swapped-in table looks exactly like the one the migrations made.
async fn name_indexes_as_live(
    tx: &mut Transaction<'_, Postgres>,
    live: &str,
    shadow: &str,
    table: &str,
) -> Result<(), sqlx::Error> {
    const INDEXES: &str = "SELECT c.relname::text, i.indisunique, i.indisprimary, \
                  regexp_replace(pg_get_indexdef(i.indexrelid), '^.*? USING ', '') \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
            WHERE i.indrelid = to_regclass($1) ORDER BY c.relname";
    type Index = (String, bool, bool, String);
    let of = |schema: &str| format!("{}.{}", ident(schema), ident(table));
    let live_indexes: Vec<Index> = sqlx::query_as(INDEXES)
        .bind(of(live))
        .fetch_all(&mut **tx)
        .await?;
    let mut shadow_indexes: Vec<Index> = sqlx::query_as(INDEXES)
        .bind(of(shadow))
        .fetch_all(&mut **tx)
        .await?;
    for (name, unique, primary, def) in live_indexes {
        let Some(i) = shadow_indexes
            .iter()
            .position(|(_, u, p, d)| (*u, *p, d) == (unique, primary, &def))
        else {
            continue;
        };
        let (shadow_name, ..) = shadow_indexes.remove(i);
        if shadow_name != name {
            sqlx::query(&format!(
                "ALTER INDEX {}.{} RENAME TO {}",
                ident(shadow),
                ident(&shadow_name),
                ident(&name)
            ))
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// Row counts of the live and shadow copies of `table` and how many rows differ: by primary key,
/// a row either side lacks or whose columns are not all equal (or, without a key, the multiset
/// difference). `None` when the two are the same rows.
async fn compare(
    tx: &mut Transaction<'_, Postgres>,
    live: &str,
    shadow: &str,
    table: &str,
) -> Result<Option<TableDiff>, sqlx::Error> {
    let l = format!("{}.{}", ident(live), ident(table));
    let s = format!("{}.{}", ident(shadow), ident(table));
    let key: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i \
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
          WHERE i.indrelid = to_regclass($1) AND i.indisprimary \
          ORDER BY array_position(i.indkey::int2[], a.attnum)",
    )
    .bind(&l)
    .fetch_all(&mut **tx)
    .await?;
    // One pass over both: a hash join on the key, rows compared column by column (record
    // equality), no text rendering or sort of the rows.
    let (live_rows, shadow_rows, differing_rows): (i64, i64, i64) = if let Some(first) = key.first()
    {
        let cols = |alias: &str| {
            key.iter()
                .map(|k| format!("{alias}.{}", ident(k)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        sqlx::query_as(&format!(
            "SELECT count(l.{k}), count(s.{k}), count(*) FILTER (WHERE l IS DISTINCT FROM s) \
               FROM {l} AS l FULL JOIN {s} AS s ON (ROW({lk}) = ROW({sk}))",
            k = ident(first),
            lk = cols("l"),
            sk = cols("s")
        ))
        .fetch_one(&mut **tx)
        .await?
    } else {
        sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM {l}), (SELECT count(*) FROM {s}), \
                    (SELECT count(*) FROM ((SELECT * FROM {l} EXCEPT ALL SELECT * FROM {s}) \
                       UNION ALL (SELECT * FROM {s} EXCEPT ALL SELECT * FROM {l})) AS d)"
        ))
        .fetch_one(&mut **tx)
        .await?
    };
    if differing_rows == 0 && live_rows == shadow_rows {
        return Ok(None);
    }
    Ok(Some(TableDiff {
        table: table.to_owned(),
        live_rows,
        shadow_rows,
        differing_rows,
    }))
}
