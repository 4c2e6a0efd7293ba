//! `GET /v1/audit/verify`, the signed checkpoints and the RFC 9162 proofs over the log: what an
//! auditor needs to check the log's integrity, inside the system and outside it.

use super::auth::{Auth, Role};
use super::params::QueryParams;
use super::problem::ApiError;
use super::AppState;
use axum::extract::State;
use axum::Json;
use ledger_replay::checkpoint::{ConsistencyProof, InclusionProof, ProofRequestError};
use ledger_replay::verify::VerifyReport;

/// Auditors and admins, with a token for the whole ledger: these answers cover the whole log,
/// which a venue-scoped token may not read (as on the rest of the audit API).
fn may_check(auth: &Auth, what: &str) -> Result<(), ApiError> {
    if !matches!(auth.role, Role::Auditor | Role::Admin) {
        return Err(ApiError::forbidden(format!(
            "only auditors and admins {what}"
        )));
    }
    if auth.venues.is_some() {
        return Err(ApiError::forbidden(format!(
            "a venue-scoped token may not {what}: it covers the whole log"
        )));
    }
    Ok(())
}

pub async fn verify(
    State(app): State<AppState>,
    auth: Auth,
) -> Result<Json<VerifyReport>, ApiError> {
    may_check(&auth, "verify the log")?;
    Ok(Json(ledger_replay::verify::verify(&app.pool).await?))
}

/// `GET /v1/audit/checkpoints/latest`: the last signed checkpoint, with its public key. Auditors
/// save it outside the system and later run `ledger replay verify --against FILE`, or ask for a
/// consistency proof to a later checkpoint.
pub async fn latest_checkpoint(
    State(app): State<AppState>,
    auth: Auth,
) -> Result<Json<ledger_events::checkpoint::Checkpoint>, ApiError> {
    may_check(&auth, "read checkpoints")?;
    ledger_replay::checkpoint::latest(&app.pool)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("checkpoint"))
}

/// A tree size or position: a whole number, 1 or more, given once.
fn count(params: &QueryParams, name: &'static str) -> Result<i64, ApiError> {
    let n: i64 = params.required(name, "a whole number, 1 or more")?;
    if n < 1 {
        return Err(ApiError::bad_request(name, "must be 1 or more"));
    }
    Ok(n)
}

/// A tree larger than the log is not something we can prove anything about.
async fn within_log(app: &AppState, size: i64) -> Result<(), ApiError> {
    let head = ledger_replay::head_position(&app.pool).await?;
    if size > head {
        return Err(beyond_log(size, head));
    }
    Ok(())
}

fn beyond_log(size: i64, holds: i64) -> ApiError {
    ApiError::not_found(format!("a tree of {size} events (the log holds {holds})"))
}

fn proof_error(e: ProofRequestError) -> ApiError {
    match e {
        ProofRequestError::BeyondLog { requested, holds } => beyond_log(requested, holds),
        ProofRequestError::Invalid(detail) => ApiError::Unexpected(anyhow::anyhow!(
            "a proof request passed validation but was refused: {detail}"
        )),
        ProofRequestError::Read(e) => e.into(),
    }
}

/// `GET /v1/audit/proofs/consistency?first=M&second=N`: the RFC 9162 consistency proof that the
/// log's first M events are a prefix of its first N. An auditor holding signed checkpoints of
/// sizes M and N checks it against their roots with `ledger_events::chain::verify_consistency`.
pub async fn consistency_proof(
    State(app): State<AppState>,
    auth: Auth,
    params: QueryParams,
) -> Result<Json<ConsistencyProof>, ApiError> {
    may_check(&auth, "read proofs")?;
    let first = count(&params, "first")?;
    let second = count(&params, "second")?;
    if first > second {
        return Err(ApiError::bad_request("first", "must not exceed second"));
    }
    within_log(&app, second).await?;
    ledger_replay::checkpoint::consistency(&app.pool, first, second)
        .await
        .map(Json)
        .map_err(proof_error)
}

/// `GET /v1/audit/proofs/inclusion?position=P&tree_size=N`: the event at global position P's
/// leaf hash and its RFC 9162 audit path in the tree of the first N events (leaf index P - 1).
pub async fn inclusion_proof(
    State(app): State<AppState>,
    auth: Auth,
    params: QueryParams,
) -> Result<Json<InclusionProof>, ApiError> {
    may_check(&auth, "read proofs")?;
    let position = count(&params, "position")?;
    let tree_size = count(&params, "tree_size")?;
    if position > tree_size {
        return Err(ApiError::bad_request(
            "position",
            "must not exceed tree_size",
        ));
    }
    within_log(&app, tree_size).await?;
    ledger_replay::checkpoint::inclusion(&app.pool, position, tree_size)
        .await
        .map(Json)
        .map_err(proof_error)
}

/// Signs a checkpoint whenever the log has grown since the last one; runs until the pool closes.
pub async fn checkpoint_periodically(
    pool: sqlx::PgPool,
    seed: [u8; 32],
    every: std::time::Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        if pool.is_closed() {
            return;
        }
        let head = ledger_replay::head_position(&pool).await.unwrap_or(0);
        let last = ledger_replay::checkpoint::latest(&pool)
            .await
            .ok()
            .flatten()
            .map(|c| c.size)
            .unwrap_or(0);
        if head > last {
            if let Err(e) = ledger_replay::checkpoint::create(&pool, &seed).await {
                tracing::warn!(error = %e, "could not sign a checkpoint");
            }
        }
    }
}
