//! `GET /v1/audit/verify`: the integrity of the whole log, for auditors.

use super::auth::{Auth, Role};
use super::problem::ApiError;
use super::AppState;
use axum::extract::State;
use axum::Json;
use ledger_replay::verify::VerifyReport;

pub async fn verify(
    State(app): State<AppState>,
    auth: Auth,
) -> Result<Json<VerifyReport>, ApiError> {
    if !matches!(auth.role, Role::Auditor | Role::Admin) {
        return Err(ApiError::forbidden(
            "only auditors and admins verify the log",
        ));
    }
    Ok(Json(ledger_replay::verify::verify(&app.pool).await?))
}

/// `GET /v1/audit/checkpoints/latest`: the last signed checkpoint, with its public key. Auditors
/// save it outside the system and later run `ledger replay verify --against FILE`.
pub async fn latest_checkpoint(
    State(app): State<AppState>,
    auth: Auth,
) -> Result<Json<ledger_events::checkpoint::Checkpoint>, ApiError> {
    if !matches!(auth.role, Role::Auditor | Role::Admin) || auth.venues.is_some() {
        return Err(ApiError::forbidden(
            "only auditors and admins read checkpoints",
        ));
    }
    ledger_replay::checkpoint::latest(&app.pool)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("checkpoint"))
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
