//! Operations endpoints: liveness, readiness (Postgres, NATS, projection lag), Prometheus metrics,
//! the OpenAPI document; and the HTTP request metrics ([`track_requests`]), kept by route
//! template, never by raw path or query (ids and personal data may be in those).

use super::AppState;
use crate::store::purge::PurgeMetrics;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the operations endpoints need besides the pool and the append pipeline.
#[derive(Clone)]
pub struct Ops {
    /// `LEDGER_NATS_STREAM`: the JetStream stream the relay publishes to, whose tail `/metrics`
    /// compares with the log head.
    pub stream: Arc<str>,
    pub http: HttpMetrics,
    /// Filled by this process's idempotency purge (`store::purge`).
    pub purge: Arc<PurgeMetrics>,
}

impl Ops {
    pub fn new(stream: &str) -> Self {
        Ops {
            stream: stream.into(),
            http: HttpMetrics::default(),
            purge: Arc::default(),
        }
    }
}

/// Upper bounds (seconds) of the request latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// HTTP requests by method, route template and status class: a count and a latency histogram.
/// Every label has a bounded set of values: methods outside the usual ones are `OTHER`, a path no
/// route matches is `unmatched`, statuses are classes (`2xx`).
#[derive(Clone, Default)]
pub struct HttpMetrics(Arc<Mutex<BTreeMap<SeriesKey, Series>>>);

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    route: String,
    method: &'static str,
    status: &'static str,
}

#[derive(Default)]
struct Series {
    count: u64,
    seconds: f64,
    /// Requests per bucket (not cumulative); the last one is `+Inf`.
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl HttpMetrics {
    pub fn observe(&self, method: &Method, route: &str, status: StatusCode, elapsed: Duration) {
        let key = SeriesKey {
            route: route.to_owned(),
            method: method_label(method),
            status: status_class(status),
        };
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        // A poisoned lock only means another request panicked mid-update of plain counters.
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let series = all.entry(key).or_default();
        series.count += 1;
        series.seconds += seconds;
        series.buckets[bucket] += 1;
    }

    /// Renders `ledger_http_requests_total` and `ledger_http_request_duration_seconds`.
    fn render(&self, out: &mut String) {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let labels = |k: &SeriesKey| {
            format!(
                "method=\"{}\",route=\"{}\",status=\"{}\"",
                k.method,
                escape_label(&k.route),
                k.status
            )
        };
        let _ = writeln!(
            out,
            "# HELP ledger_http_requests_total HTTP requests answered, by method, route template \
             and status class.\n# TYPE ledger_http_requests_total counter"
        );
        for (k, s) in all.iter() {
            let _ = writeln!(
                out,
                "ledger_http_requests_total{{{}}} {}",
                labels(k),
                s.count
            );
        }
        let name = "ledger_http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to answer HTTP requests (to the response head), by method, route \
             template and status class.\n# TYPE {name} histogram"
        );
        for (k, s) in all.iter() {
            let l = labels(k);
            let mut cumulative = 0;
            for (i, n) in s.buckets.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "+Inf".into());
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_sum{{{l}}} {}", s.seconds);
            let _ = writeln!(out, "{name}_count{{{l}}} {}", s.count);
        }
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The request's route template (the path as routed, with `{id}` placeholders; `unmatched` when
/// no route matched), which metrics and logs name instead of the raw path, which may hold ids.
pub fn route_template(req: &Request) -> String {
    req.extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into())
}

/// Counts each request and its latency under its route template, never the raw path or query.
pub async fn track_requests(State(http): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let route = route_template(&req);
    let method = req.method().clone();
    let started = Instant::now();
    let response = next.run(req).await;
    http.observe(&method, &route, response.status(), started.elapsed());
    response
}

/// A projection further behind the log than this is not ready to serve.
pub const MAX_READY_LAG: i64 = 1000;

pub async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// How far each read model is behind the log: positions, and the age of the oldest event it has
/// not applied yet (0 when caught up).
struct Lag {
    projection: &'static str,
    checkpoint: i64,
    behind: i64,
    seconds: f64,
}

async fn lags(app: &AppState, head: i64) -> Result<Vec<Lag>, anyhow::Error> {
    let known = ledger_projections::checkpoints(&app.pool).await?;
    let mut out = Vec::new();
    for &projection in ledger_projections::PROJECTIONS {
        let checkpoint = known
            .iter()
            .find(|(name, _)| name == projection)
            .map(|(_, p)| *p)
            .unwrap_or(0);
        let behind = (head - checkpoint).max(0);
        let seconds = if behind > 0 {
            ledger_replay::recorded_at(&app.pool, checkpoint + 1)
                .await?
                .map(|t| (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0)
                .unwrap_or(0.0)
                .max(0.0)
        } else {
            0.0
        };
        out.push(Lag {
            projection,
            checkpoint,
            behind,
            seconds,
        });
    }
    Ok(out)
}

/// How long readiness waits for Postgres: an unreachable database would otherwise hold the probe
/// for the pool's whole acquire timeout, longer than probes wait.
const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn ready(State(app): State<AppState>) -> Response {
    let db = async {
        let head = ledger_replay::head_position(&app.pool).await.ok()?;
        let lags = lags(&app, head).await.ok()?;
        Some((head, lags))
    };
    let (head, lags) = match tokio::time::timeout(READY_DB_TIMEOUT, db).await {
        Ok(Some((head, lags))) => (Some(head), lags),
        Ok(None) | Err(_) => (None, Vec::new()),
    };
    let postgres = head.is_some();
    let nats = match &app.nats {
        Some(c) => c.connection_state() == async_nats::connection::State::Connected,
        None => false,
    };
    let projections_ok = postgres && lags.iter().all(|l| l.behind <= MAX_READY_LAG);
    let status = if postgres && nats && projections_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let projections: serde_json::Map<String, serde_json::Value> = lags
        .iter()
        .map(|l| {
            (
                l.projection.to_owned(),
                json!({"checkpoint": l.checkpoint, "behind": l.behind, "lag_seconds": l.seconds}),
            )
        })
        .collect();
    (
        status,
        Json(json!({
            "status": if status == StatusCode::OK { "ready" } else { "not-ready" },
            "checks": {"postgres": postgres, "nats": nats, "projections": projections_ok},
            "head": head,
            "projections": projections,
            "max_lag": MAX_READY_LAG,
        })),
    )
        .into_response()
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    let m = app.appender.metrics();
    let head = ledger_replay::head_position(&app.pool).await.unwrap_or(-1);
    let mut body = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(body, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(body, "{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed) as f64;
    let seconds = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed) as f64 / 1e6;
    let append_counters = [
        ("ledger_append_batches_total", "Append batches written.", load(&m.batches)),
        (
            "ledger_append_commands_total",
            "Commands handed to the append pipeline.",
            load(&m.commands),
        ),
        (
            "ledger_append_events_total",
            "Events handed to the append pipeline.",
            load(&m.events),
        ),
        (
            "ledger_append_batch_seconds_total",
            "Time spent writing batches.",
            seconds(&m.batch_micros),
        ),
        (
            "ledger_append_database_seconds_total",
            "Time the append writer spent in its statements (part of the batch time).",
            seconds(&m.database_micros),
        ),
        (
            "ledger_append_planning_seconds_total",
            "Time the append writer spent planning batches: beliefs, positions, the hash chain (part of the batch time).",
            seconds(&m.planning_micros),
        ),
        (
            "ledger_append_batches_planned_ahead_total",
            "Append batches sent as planned while the batch before them was in Postgres.",
            load(&m.batches_ahead),
        ),
        (
            "ledger_append_batches_sent_ahead_total",
            "Append batches sent on the writer's connection while the batch before them was still running.",
            load(&m.batches_sent_ahead),
        ),
        (
            "ledger_append_plans_dropped_total",
            "Plans made ahead and dropped because the batch before did not commit as planned.",
            load(&m.ahead_dropped),
        ),
        (
            "ledger_append_planning_ahead_seconds_total",
            "Time the append writer spent planning while a batch was in Postgres (within the database time).",
            seconds(&m.ahead_micros),
        ),
        (
            "ledger_append_gathering_seconds_total",
            "Time the append writer waited for the previous batch's submitters before a batch.",
            seconds(&m.gathering_micros),
        ),
    ];
    for (name, help, value) in append_counters {
        metric(name, "counter", help, &one(value));
    }
    metric(
        "ledger_log_head_position",
        "gauge",
        "Global position of the last committed event.",
        &one(head as f64),
    );
    if head >= 0 {
        let lags = lags(&app, head).await.unwrap_or_default();
        let label = |l: &Lag| format!("{{projection=\"{}\"}}", l.projection);
        metric(
            "ledger_projection_position",
            "gauge",
            "Global position each read model includes.",
            &lags
                .iter()
                .map(|l| (label(l), l.checkpoint as f64))
                .collect::<Vec<_>>(),
        );
        metric(
            "ledger_projection_lag_positions",
            "gauge",
            "Events each read model has yet to apply.",
            &lags
                .iter()
                .map(|l| (label(l), l.behind as f64))
                .collect::<Vec<_>>(),
        );
        metric(
            "ledger_projection_lag_seconds",
            "gauge",
            "Age of the oldest event each read model has yet to apply.",
            &lags
                .iter()
                .map(|l| (label(l), l.seconds))
                .collect::<Vec<_>>(),
        );
    }
    if let Some(nats) = &app.nats {
        let js = async_nats::jetstream::new(nats.clone());
        if let Ok(mut stream) = js.get_stream(app.ops.stream.as_ref()).await {
            if let Ok(info) = stream.info().await {
                let published = info.state.last_sequence as f64;
                let label = format!("{{stream=\"{}\"}}", escape_label(&app.ops.stream));
                metric(
                    "ledger_relay_published_position",
                    "gauge",
                    "Last global position in the JetStream stream (LEDGER_NATS_STREAM).",
                    &[(label.clone(), published)],
                );
                metric(
                    "ledger_relay_lag_positions",
                    "gauge",
                    "Committed events not yet in the JetStream stream (LEDGER_NATS_STREAM).",
                    &[(label, (head as f64 - published).max(0.0))],
                );
            }
        }
    }
    let purge = &app.ops.purge;
    metric(
        "ledger_idempotency_purged_total",
        "counter",
        "Idempotency records past their retention deleted by this process.",
        &one(purge.purged.load(Relaxed) as f64),
    );
    metric(
        "ledger_idempotency_purge_runs_total",
        "counter",
        "Runs of the idempotency purge that finished.",
        &one(purge.runs.load(Relaxed) as f64),
    );
    metric(
        "ledger_idempotency_purge_failures_total",
        "counter",
        "Runs of the idempotency purge that failed (retried at the next run).",
        &one(purge.failures.load(Relaxed) as f64),
    );
    app.ops.http.render(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}
