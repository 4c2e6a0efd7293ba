//! What every command endpoint shares: reading and parsing the body, `Idempotency-Key`,
//! `If-Match`, retrying a lost optimistic race, appending, answering, and recording refusals as
//! `CommandAudited` events.

use super::auth::Auth;
use super::problem::ApiError;
use super::AppState;
use crate::store::append::{
    AppendError, AppendOutcome, AppendRequest, Appended, IdempotencyClaim, SlotChange,
    StoredResponse, StreamAppend,
};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ledger_events::envelope::{DomainEvent, ExpectedVersion, Metadata};
use ledger_events::ids::audit_stream;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use std::future::Future;
use std::sync::Arc;
use uuid::Uuid;

/// JSON bodies larger than this are refused (contract: 64 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Optimistic races lost without `If-Match` are decided again on fresh state. Every lost round
/// means another command on the stream won, so contention drains; the bound only guards against
/// a bug looping forever.
const MAX_ATTEMPTS: usize = 100;

/// Request-scoped ids, set by the request-id middleware.
#[derive(Clone, Copy, Debug)]
pub struct RequestIds {
    pub request_id: Uuid,
    pub correlation_id: Uuid,
}

/// A command as received, before it is decided.
pub struct Incoming {
    pub auth: Auth,
    /// The role recorded in event metadata when it is not the token's (the payment provider).
    pub role_label: Option<&'static str>,
    pub ids: RequestIds,
    pub headers: HeaderMap,
    /// `METHOD path`, part of the idempotency fingerprint.
    pub route: String,
}

/// What a handler decided: the events to append and how to answer.
pub struct Decision {
    pub streams: Vec<StreamAppend>,
    pub slot: Option<SlotChange>,
    /// The id the answer names (booking, payment, venue, resource).
    pub id: Uuid,
    /// The stream whose version the answer and `ETag` carry.
    pub stream: String,
    pub status: StatusCode,
    /// Fields added to `{id, stream, version, position}`.
    pub extra: Map<String, Value>,
}

impl Decision {
    /// The common case: events for one stream at an expected version.
    pub fn single<E: DomainEvent>(
        stream: String,
        expected: ExpectedVersion,
        events: &[E],
        id: Uuid,
        status: StatusCode,
    ) -> Self {
        Decision {
            streams: vec![StreamAppend {
                stream_id: stream.clone(),
                expected,
                events: events.iter().map(DomainEvent::to_new_event).collect(),
            }],
            slot: None,
            id,
            stream,
            status,
            extra: Map::new(),
        }
    }

    pub fn with_slot(mut self, slot: SlotChange) -> Self {
        self.slot = Some(slot);
        self
    }

    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }
}

/// The parsed command context a handler's decide step gets on each attempt.
pub struct Attempt {
    pub auth: Auth,
    pub body: Bytes,
    /// `If-Match`, parsed: the version the caller last saw.
    pub if_match: Option<i64>,
}

impl Attempt {
    /// The body as JSON of type `T`: 400 naming the field on malformed input.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_json(&self.body)
    }

    /// Refuses early when `If-Match` names another version than the stream is at.
    pub fn check_version(&self, current: i64) -> Result<ExpectedVersion, ApiError> {
        match self.if_match {
            Some(v) if v != current => Err(ApiError::VersionConflict(format!(
                "If-Match names version {v}, the stream is at version {current}"
            ))),
            _ => Ok(ExpectedVersion::Exact(current)),
        }
    }
}

/// Parses JSON with the path of the offending field in the error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    // serde would bind a JSON array to a struct's fields by position; commands are objects.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request("body", "must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // serde reports a missing field at its parent; name the field itself.
        let named = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let field = match (path.as_str(), named) {
            ("." | "?", Some(name)) => name.to_owned(),
            (parent, Some(name)) => format!("{parent}.{name}"),
            // `?` is serde_path_to_error's "somewhere unknown", e.g. a body cut short.
            ("." | "?", None) => "body".to_owned(),
            (path, None) => path.to_owned(),
        };
        ApiError::bad_request(field, message)
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request("body", e.to_string()))?;
    Ok(value)
}

fn content_type_is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false)
}

fn parse_if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(raw) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    raw.to_str()
        .ok()
        .map(|s| s.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|v| *v >= 0)
        .map(Some)
        .ok_or_else(|| ApiError::bad_request("If-Match", "must be a stream version such as \"3\""))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .map_err(|_| ApiError::bad_request("Idempotency-Key", "must be printable ASCII"))?;
    if key.is_empty() || key.len() > 255 {
        return Err(ApiError::bad_request(
            "Idempotency-Key",
            "must be 1 to 255 characters",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// The answer to an accepted command.
pub struct Accepted(pub StoredResponse);

impl IntoResponse for Accepted {
    fn into_response(self) -> Response {
        let StoredResponse { status, body } = self.0;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        let version = body.get("version").and_then(Value::as_i64);
        let position = body.get("position").and_then(Value::as_i64);
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(v) = version.and_then(|v| HeaderValue::from_str(&format!("\"{v}\"")).ok()) {
            headers.insert(header::ETAG, v);
        }
        if let Some(p) = position.and_then(|p| HeaderValue::from_str(&p.to_string()).ok()) {
            headers.insert("x-ledger-position", p);
        }
        response
    }
}

impl AppState {
    /// Runs one command end to end. `decide` may be called more than once: when the log moved
    /// between loading state and appending (and the caller sent no `If-Match`), it is run again
    /// on fresh state.
    pub async fn run_command<F, Fut>(
        &self,
        name: &'static str,
        target: Option<String>,
        incoming: Incoming,
        body: Body,
        decide: F,
    ) -> Response
    where
        F: Fn(Attempt) -> Fut,
        Fut: Future<Output = Result<Decision, ApiError>>,
    {
        let result = self.execute(name, &incoming, body, decide).await;
        match result {
            Ok(accepted) => accepted.into_response(),
            Err(error) => {
                if error.is_refusal() {
                    self.audit_refusal(name, target, &incoming, &error).await;
                }
                error.into_response()
            }
        }
    }

    async fn execute<F, Fut>(
        &self,
        name: &'static str,
        incoming: &Incoming,
        body: Body,
        decide: F,
    ) -> Result<Accepted, ApiError>
    where
        F: Fn(Attempt) -> Fut,
        Fut: Future<Output = Result<Decision, ApiError>>,
    {
        let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
            .await
            .map_err(|_| ApiError::PayloadTooLarge(MAX_BODY_BYTES))?;
        if !body.iter().all(u8::is_ascii_whitespace) && !content_type_is_json(&incoming.headers) {
            return Err(ApiError::UnsupportedMediaType(
                "commands take Content-Type: application/json".into(),
            ));
        }
        let if_match = parse_if_match(&incoming.headers)?;
        let claim = match idempotency_key(&incoming.headers)? {
            None => None,
            Some(key) => {
                let keyring = self.vault.keyring();
                let key_hash = keyring.request_fingerprint(&[
                    b"idempotency-key",
                    incoming.auth.sub.as_bytes(),
                    key.as_bytes(),
                ]);
                let request_hmac = keyring.request_fingerprint(&[
                    b"request",
                    incoming.route.as_bytes(),
                    if_match
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                        .as_bytes(),
                    &body,
                ]);
                if let Some(stored) = self.stored_response(&key_hash, &request_hmac).await? {
                    return Ok(Accepted(stored));
                }
                Some((key_hash, request_hmac))
            }
        };
        self.append_decided(name, incoming, &body, if_match, claim, &decide)
            .await
    }

    /// The fast path of idempotency, outside the writer: a retry of a finished command.
    pub(crate) async fn stored_response(
        &self,
        key_hash: &[u8; 32],
        request_hmac: &[u8; 32],
    ) -> Result<Option<StoredResponse>, ApiError> {
        let row: Option<(Vec<u8>, i16, Value)> = sqlx::query_as(
            "SELECT request_hmac, status, response FROM idempotency_keys WHERE key_hash = $1",
        )
        .bind(key_hash.as_slice())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some((hmac, status, body)) if hmac.as_slice() == request_hmac => {
                Ok(Some(StoredResponse {
                    status: u16::try_from(status).unwrap_or(200),
                    body,
                }))
            }
            Some(_) => Err(ApiError::IdempotencyKeyReuse),
        }
    }

    /// Appends a decision authored by the caller, retrying lost races (no `If-Match`) on fresh
    /// state. Shared by the JWT commands and the webhook.
    pub async fn append_decided<F, Fut>(
        &self,
        name: &'static str,
        incoming: &Incoming,
        body: &Bytes,
        if_match: Option<i64>,
        claim: Option<([u8; 32], [u8; 32])>,
        decide: &F,
    ) -> Result<Accepted, ApiError>
    where
        F: Fn(Attempt) -> Fut,
        Fut: Future<Output = Result<Decision, ApiError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let decision = match decide(Attempt {
                auth: incoming.auth.clone(),
                body: body.clone(),
                if_match,
            })
            .await
            {
                Ok(d) => d,
                Err(refusal) => {
                    // A retry may decide after its first attempt committed (e.g. "already
                    // confirmed"): under the same key, that first answer is the answer.
                    if let Some((key_hash, request_hmac)) = &claim {
                        if let Some(stored) = self.stored_response(key_hash, request_hmac).await? {
                            return Ok(Accepted(stored));
                        }
                    }
                    return Err(refusal);
                }
            };
            let (id, stream, status, extra) = (
                decision.id,
                decision.stream.clone(),
                decision.status,
                decision.extra.clone(),
            );
            let respond = Arc::new(move |a: &Appended| StoredResponse {
                status: status.as_u16(),
                body: response_body(id, &stream, a, &extra),
            });
            let request = AppendRequest {
                streams: decision.streams,
                metadata: self.metadata(name, incoming),
                slot: decision.slot,
                idempotency: claim.map(|(key_hash, request_hmac)| IdempotencyClaim {
                    key_hash,
                    request_hmac,
                    respond: respond.clone(),
                }),
            };
            match self.appender.append(request).await {
                Ok(AppendOutcome::Appended(a, stored)) => {
                    return Ok(Accepted(stored.unwrap_or_else(|| respond(&a))));
                }
                Ok(AppendOutcome::Replayed(stored)) => return Ok(Accepted(stored)),
                Err(AppendError::VersionConflict {
                    stream_id, actual, ..
                }) => {
                    if if_match.is_some() {
                        return Err(ApiError::VersionConflict(format!(
                            "{stream_id} is now at version {actual}; reload and retry"
                        )));
                    }
                    if attempt >= MAX_ATTEMPTS {
                        return Err(ApiError::Unexpected(anyhow::anyhow!(
                            "gave up after {attempt} lost optimistic races on {stream_id}"
                        )));
                    }
                    tracing::debug!(attempt, "optimistic race lost; deciding again");
                    // A little jitter keeps a crowd of retries from landing in lockstep.
                    let pause = rand::random::<u64>() % (1 + 2 * attempt as u64);
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                // An erasure committed while this command was decided: decide again (a new
                // subject for a returning customer; a customer acting as the erased subject is
                // refused by the vault).
                Err(AppendError::SubjectErased) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(attempt, "the subject was erased meanwhile; deciding again");
                }
                Err(AppendError::SlotUnavailable) => {
                    return Err(ApiError::SlotUnavailable(
                        "the resource is already booked for part of that time".into(),
                    ))
                }
                Err(AppendError::IdempotencyKeyReuse) => return Err(ApiError::IdempotencyKeyReuse),
                Err(e) => return Err(ApiError::Unexpected(anyhow::Error::new(e))),
            }
        }
    }

    fn metadata(&self, name: &'static str, incoming: &Incoming) -> Metadata {
        Metadata {
            actor: incoming.auth.sub.clone(),
            role: incoming
                .role_label
                .unwrap_or(incoming.auth.role.as_str())
                .to_owned(),
            command: name.to_owned(),
            request_id: incoming.ids.request_id,
            correlation_id: incoming.ids.correlation_id,
            causation_id: incoming.ids.request_id,
        }
    }

    /// Records a refused command: who tried what, on what, and why it was refused. Never the
    /// body's values, which may hold personal data.
    pub(crate) async fn audit_refusal(
        &self,
        name: &'static str,
        target: Option<String>,
        incoming: &Incoming,
        error: &ApiError,
    ) {
        let payload = json!({
            "actor": incoming.auth.sub,
            "role": incoming.role_label.unwrap_or(incoming.auth.role.as_str()),
            "command": name,
            "target": target,
            "outcome": "refused",
            "problem_type": error.slug(),
            "status": error.status().as_u16(),
            "request_id": incoming.ids.request_id,
        });
        let request = AppendRequest {
            streams: vec![StreamAppend {
                stream_id: audit_stream(chrono::Utc::now().date_naive()),
                expected: ExpectedVersion::Any,
                events: vec![ledger_events::envelope::NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: "CommandAudited",
                    schema_version: 1,
                    payload,
                }],
            }],
            metadata: self.metadata(name, incoming),
            slot: None,
            idempotency: None,
        };
        if let Err(e) = self.appender.append(request).await {
            tracing::error!(error = %e, command = name, "could not record a refused command");
        }
    }
}

fn response_body(id: Uuid, stream: &str, a: &Appended, extra: &Map<String, Value>) -> Value {
    answer_body(
        id,
        stream,
        a.version_of(stream).unwrap_or(0),
        a.last_position,
        extra,
    )
}

/// A command's answer: `{id, stream, version, position}` and the handler's fields.
pub fn answer_body(
    id: Uuid,
    stream: &str,
    version: i64,
    position: i64,
    extra: &Map<String, Value>,
) -> Value {
    let mut body = Map::new();
    body.insert("id".into(), json!(id));
    body.insert("stream".into(), json!(stream));
    body.insert("version".into(), json!(version));
    body.insert("position".into(), json!(position));
    for (k, v) in extra {
        body.insert(k.clone(), v.clone());
    }
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        inner: Inner,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u8,
    }

    fn field_of(body: &str) -> String {
        match parse_json::<Body>(body.as_bytes()) {
            Err(ApiError::Validation { field, status, .. }) => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                field
            }
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn parse_errors_name_the_field() {
        assert_eq!(field_of(r#"{"name": 3, "inner": {"n": 1}}"#), "name");
        assert_eq!(field_of(r#"{"name": "x", "inner": {"n": 300}}"#), "inner.n");
        assert_eq!(field_of(r#"{"name": "x"}"#), "inner");
        assert_eq!(field_of(r#"{"name": "x", "inner": {}}"#), "inner.n");
        assert_eq!(
            field_of(r#"{"name": "x", "inner": {"n": 1}, "extra": 1}"#),
            "extra"
        );
        assert_eq!(
            field_of(r#"{"name": "x", "inner": {"n": 1}} trailing"#),
            "body"
        );
        assert_eq!(field_of("not json"), "body");
    }

    #[test]
    fn if_match_accepts_quoted_and_weak_versions() {
        let mut h = HeaderMap::new();
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"3\""));
        assert_eq!(parse_if_match(&h).ok().flatten(), Some(3));
        h.insert(header::IF_MATCH, HeaderValue::from_static("W/\"4\""));
        assert_eq!(parse_if_match(&h).ok().flatten(), Some(4));
        h.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert!(parse_if_match(&h).is_err());
    }
}
