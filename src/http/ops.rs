//! Operations endpoints: liveness, readiness (Postgres, NATS, projection lag), Prometheus metrics,
//! the OpenAPI document.

use super::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

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
    metric(
        "ledger_append_batches_total",
        "counter",
        "Append batches written.",
        &one(m.batches.load(Relaxed) as f64),
    );
    metric(
        "ledger_append_commands_total",
        "counter",
        "Commands handed to the append pipeline.",
        &one(m.commands.load(Relaxed) as f64),
    );
    metric(
        "ledger_append_events_total",
        "counter",
        "Events handed to the append pipeline.",
        &one(m.events.load(Relaxed) as f64),
    );
    metric(
        "ledger_append_batch_seconds_total",
        "counter",
        "Time spent writing batches.",
        &one(m.batch_micros.load(Relaxed) as f64 / 1e6),
    );
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
        if let Ok(mut stream) = js.get_stream("LEDGER").await {
            if let Ok(info) = stream.info().await {
                let published = info.state.last_sequence as f64;
                metric(
                    "ledger_relay_published_position",
                    "gauge",
                    "Last global position in JetStream stream LEDGER.",
                    &one(published),
                );
                metric(
                    "ledger_relay_lag_positions",
                    "gauge",
                    "Committed events not yet in JetStream stream LEDGER.",
                    &one((head as f64 - published).max(0.0)),
                );
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}
