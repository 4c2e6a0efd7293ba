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
