//! The HTTP API: routing, shared state, request ids, and operations endpoints.
//!
//! Handlers live one module per noun (`venues`, `bookings`, `payments`); what every command
//! shares (body, idempotency, `If-Match`, audit of refusals) is in [`command`].

pub mod audit;
pub mod audit_verify;
pub mod auth;
pub mod availability;
pub mod bookings;
pub mod command;
pub mod live;
pub mod ops;
pub mod params;
pub mod payments;
pub mod problem;
pub mod queries;
pub mod stats;
pub mod subjects;
pub mod venues;

use crate::store::append::Appender;
use crate::store::vault::KeyVault;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use command::RequestIds;
use ledger_events::booking::{self, Booking, BookingEvent};
use ledger_events::ids::{
    booking_stream, payment_stream, venue_stream, BookingId, PaymentId, VenueId,
};
use ledger_events::payment::{self, Payment, PaymentEvent};
use ledger_events::venue::{self, Venue, VenueEvent};
use problem::ApiError;
use sqlx::PgPool;
use std::sync::Arc;
use uuid::Uuid;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// The only way to write to the log.
    pub appender: Appender,
    /// Subjects and their keys: sealing personal data needs them.
    pub vault: KeyVault,
    pub jwt: auth::JwtKeys,
    /// Verifies the payment provider's webhook signatures.
    pub webhook_secret: Arc<Vec<u8>>,
    /// For readiness: NATS is the transport of the read side.
    pub nats: Option<async_nats::Client>,
    /// How far the read model has applied the log: what `min_position` waits on.
    pub read_position: queries::ReadPosition,
    /// What `/metrics` reports besides the pipeline: the configured stream, HTTP requests, the
    /// idempotency purge.
    pub ops: ops::Ops,
    /// Venues folded before: every booking command decides on its venue.
    pub venues: Arc<crate::store::StreamCache<Venue>>,
}

/// Parses a path id; a malformed one cannot name anything, so it is a 404 like an unknown one.
pub fn parse_id(raw: &str, what: &'static str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(what))
}

impl AppState {
    pub async fn load_venue(&self, id: VenueId) -> Result<(Option<Venue>, i64), ApiError> {
        self.venues
            .load::<VenueEvent>(&self.pool, &venue_stream(id), venue::evolve)
            .await
            .map_err(ApiError::Unexpected)
    }

    pub async fn load_booking(&self, id: BookingId) -> Result<(Option<Booking>, i64), ApiError> {
        crate::store::load::<BookingEvent, Booking>(
            &self.pool,
            &booking_stream(id),
            booking::evolve,
        )
        .await
        .map_err(ApiError::Unexpected)
    }

    pub async fn load_payment(&self, id: PaymentId) -> Result<(Option<Payment>, i64), ApiError> {
        crate::store::load::<PaymentEvent, Payment>(
            &self.pool,
            &payment_stream(id),
            payment::evolve,
        )
        .await
        .map_err(ApiError::Unexpected)
    }
}

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/venues", post(venues::register).get(queries::list_venues))
        .route("/venues/{venue_id}", get(queries::venue))
        .route(
            "/venues/{venue_id}/availability",
            get(availability::availability),
        )
        .route("/venues/{venue_id}/stats", get(stats::stats))
        .route("/venues/{venue_id}/resources", post(venues::add_resource))
        .route(
            "/bookings",
            post(bookings::request).get(queries::list_bookings),
        )
        .route("/bookings/{id}", get(queries::booking_detail))
        .route(
            "/customers/{subject_id}/bookings",
            get(queries::customer_bookings),
        )
        .route("/live", get(live::live))
        .route("/subjects/search", post(subjects::search))
        .route("/subjects/{subject_id}/export", get(subjects::export))
        .route("/subjects/{subject_id}/erase", post(subjects::erase))
        .route("/audit/log", get(audit::log))
        .route("/audit/streams/{stream}", get(audit::stream))
        .route("/audit/bookings/{id}/as-of", get(audit::booking_as_of))
        .route("/audit/actions", get(audit::list_actions))
        .route("/audit/verify", get(audit_verify::verify))
        .route(
            "/audit/checkpoints/latest",
            get(audit_verify::latest_checkpoint),
        )
        .route(
            "/audit/proofs/consistency",
            get(audit_verify::consistency_proof),
        )
        .route(
            "/audit/proofs/inclusion",
            get(audit_verify::inclusion_proof),
        )
        .route("/bookings/{id}/confirm", post(bookings::confirm))
        .route("/bookings/{id}/reschedule", post(bookings::reschedule))
        .route("/bookings/{id}/cancel", post(bookings::cancel))
        .route("/bookings/{id}/check-in", post(bookings::check_in))
        .route("/bookings/{id}/no-show", post(bookings::no_show))
        .route("/bookings/{id}/payments", post(payments::authorize))
        .route("/payments/{id}/capture", post(payments::capture))
        .route("/payments/{id}/refund", post(payments::refund))
        .route("/webhooks/payments", post(payments::webhook));
    Router::new()
        .nest("/v1", v1)
        .route("/health/live", get(ops::live))
        .route("/health/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            let mut r = ApiError::not_found("method").into_response();
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r
        })
        .layer(middleware::from_fn(request_ids))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::Unexpected(anyhow::anyhow!("a handler panicked")).into_response()
        }))
        // Outermost, so a panic answered 500 is counted too.
        .layer(middleware::from_fn_with_state(
            state.ops.http.clone(),
            ops::track_requests,
        ))
        .with_state(state)
}

fn header_uuid(req: &Request, name: &str) -> Option<Uuid> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
}

/// Gives each request an id (or keeps a valid `X-Request-Id`), a correlation id (or keeps a valid
/// `X-Correlation-Id`), and a span named by the route template, never the raw path or query.
async fn request_ids(mut req: Request, next: Next) -> Response {
    let request_id = header_uuid(&req, "x-request-id").unwrap_or_else(Uuid::now_v7);
    let correlation_id = header_uuid(&req, "x-correlation-id").unwrap_or(request_id);
    req.extensions_mut().insert(RequestIds {
        request_id,
        correlation_id,
    });
    let route = ops::route_template(&req);
    let method = req.method().clone();
    let span = tracing::info_span!("http", %method, route, %request_id);
    let started = std::time::Instant::now();
    let mut response = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "request done"
        )
    });
    if let Ok(v) = HeaderValue::from_str(&request_id.to_string()) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}
