//! Queries: served from read models, with read-your-writes through `min_position`.
//!
//! Every answer carries `X-Ledger-Position`, the position the read model includes. With
//! `?min_position=N` (or `X-Ledger-Min-Position: N`) a query first waits, woken by the
//! projection's commit notification, until its read model includes N; after 5 s it answers
//! `projection-lagging`, which carries `X-Ledger-Position` too (how far the read model got), as
//! does any error found once the read model was reached ([`QueryError`]). Query strings are read
//! through [`QueryParams`]; who may read what is [`require_role`], [`not_auditor`] and
//! [`visible_venue`], shared by every read endpoint. Personal data is opened here, at the edge,
//! and nowhere else.

use super::auth::{Auth, Role};
use super::params::QueryParams;
use super::problem::ApiError;
use super::{parse_id, AppState};
use crate::store::vault::VaultError;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use ledger_events::booking::CustomerDetails;
use ledger_events::ids::{SubjectId, VenueId};
use ledger_events::payment::status_of;
use ledger_events::pii::{self, SealContext, Sealed};
use ledger_projections::booking_board::{self, BoardFilter, BookingRow};
use serde_json::{json, Value};
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// How long a query waits for its read model to reach `min_position`.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Each projection's checkpoint, kept current by the projections' commit notifications
/// (`ledger_projection`, payload `name:position`) and a slow poll, in case one is lost. Queries
/// wait on the checkpoint of the read model they read instead of polling the database.
#[derive(Clone)]
pub struct ReadPosition {
    /// The booking board's: what `current`, `subscribe` and `reach` speak of.
    rx: watch::Receiver<i64>,
    /// Every projection's (`ledger_projections::PROJECTIONS`), by name, for `reach_of`.
    by_name: Arc<HashMap<&'static str, watch::Receiver<i64>>>,
}

/// Moves a projection's watch forward (never back: notifications may arrive out of order).
fn advance(senders: &[(&'static str, watch::Sender<i64>)], name: &str, p: i64) {
    if let Some((_, tx)) = senders.iter().find(|(n, _)| *n == name) {
        tx.send_if_modified(|cur| {
            if p > *cur {
                *cur = p;
                true
            } else {
                false
            }
        });
    }
}

impl ReadPosition {
    /// Starts the listener task; it ends with the pool.
    pub async fn start(pool: sqlx::PgPool) -> Result<Self, sqlx::Error> {
        let initial: HashMap<String, i64> = ledger_projections::checkpoints(&pool)
            .await?
            .into_iter()
            .collect();
        let at = |name: &str| initial.get(name).copied().unwrap_or(0);
        let (board_tx, rx) = watch::channel(at(booking_board::NAME));
        let mut senders = vec![(booking_board::NAME, board_tx)];
        let mut by_name = HashMap::from([(booking_board::NAME, rx.clone())]);
        for &name in ledger_projections::PROJECTIONS {
            if name != booking_board::NAME {
                let (tx, rx) = watch::channel(at(name));
                senders.push((name, tx));
                by_name.insert(name, rx);
            }
        }
        let mut listener = PgListener::connect_with(&pool).await?;
        // A lost connection is reported (`Ok(None)`) before reconnecting, so the checkpoints
        // are read again right away: notifications sent while it was down are gone for good.
        listener.eager_reconnect(false);
        listener.listen("ledger_projection").await?;
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                let mut resync = false;
                tokio::select! {
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => {
                            pause = Duration::from_millis(100);
                            if let Some((name, p)) = n.payload().rsplit_once(':') {
                                if let Ok(p) = p.parse::<i64>() {
                                    advance(&senders, name, p);
                                }
                            }
                        }
                        // Lost; the next `try_recv` connects and listens again.
                        Ok(None) => resync = true,
                        Err(_) if pool.is_closed() => return,
                        // Postgres is away: try again a little later each time (at most 1 s).
                        Err(_) => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(1));
                            resync = true;
                        }
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => resync = true,
                }
                if resync {
                    if pool.is_closed() {
                        return;
                    }
                    if let Ok(all) = ledger_projections::checkpoints(&pool).await {
                        for (name, p) in all {
                            advance(&senders, &name, p);
                        }
                    }
                }
                if senders.iter().all(|(_, tx)| tx.is_closed()) {
                    return;
                }
            }
        });
        Ok(ReadPosition {
            rx,
            by_name: Arc::new(by_name),
        })
    }

    pub fn current(&self) -> i64 {
        *self.rx.borrow()
    }

    /// The position a projection (by name) includes; `None` for an unknown name.
    pub fn current_of(&self, projection: &str) -> Option<i64> {
        self.by_name.get(projection).map(|rx| *rx.borrow())
    }

    /// Changes of the booking board's position, for the live stream.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.rx.clone()
    }

    /// Waits until the booking board includes `min`; returns the position it includes.
    pub async fn reach(&self, min: Option<i64>) -> Result<i64, QueryError> {
        wait_for_position(&self.rx, min).await
    }

    /// Waits until the projection named `projection` includes `min`; returns the position it
    /// includes.
    pub async fn reach_of(&self, projection: &str, min: Option<i64>) -> Result<i64, QueryError> {
        let rx = self.by_name.get(projection).ok_or_else(|| {
            ApiError::Unexpected(anyhow::anyhow!("no projection named {projection}"))
        })?;
        wait_for_position(rx, min).await
    }
}

async fn wait_for_position(rx: &watch::Receiver<i64>, min: Option<i64>) -> Result<i64, QueryError> {
    let Some(min) = min else {
        return Ok(*rx.borrow());
    };
    let mut rx = rx.clone();
    let reached = tokio::time::timeout(MAX_WAIT, rx.wait_for(|p| *p >= min))
        .await
        .ok()
        .and_then(|r| r.ok().map(|p| *p));
    match reached {
        Some(p) => Ok(p),
        None => {
            let includes = *rx.borrow();
            Err(QueryError {
                problem: ApiError::ProjectionLagging {
                    retry_after: 1,
                    detail: format!("the read model includes position {includes}, not yet {min}"),
                },
                position: Some(includes),
            })
        }
    }
}

/// A query's error answer: the problem, with `X-Ledger-Position` when the handler knew the
/// position its read model included (it waited for it, or the wait ran out: `projection-lagging`
/// says how far the read model got). A client can tell "not found as of position N" from "not
/// there yet".
#[derive(Debug)]
pub struct QueryError {
    problem: ApiError,
    position: Option<i64>,
}

impl QueryError {
    /// Attaches the position the read model included to a failure found there.
    pub fn at<E: Into<ApiError>>(position: i64) -> impl FnOnce(E) -> QueryError {
        move |problem| QueryError {
            problem: problem.into(),
            position: Some(position),
        }
    }
}

impl From<ApiError> for QueryError {
    fn from(problem: ApiError) -> Self {
        QueryError {
            problem,
            position: None,
        }
    }
}

impl From<sqlx::Error> for QueryError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::from(e).into()
    }
}

/// For callers that answer with a plain [`ApiError`] (the position is then not sent).
impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        e.problem
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let mut r = self.problem.into_response();
        if let Some(position) = self.position {
            r.headers_mut()
                .insert("x-ledger-position", HeaderValue::from(position));
        }
        r
    }
}

pub(super) fn answer(position: i64, body: Value) -> Response {
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert("x-ledger-position", HeaderValue::from(position));
    r
}

/// `role` may do `what` only if it is one of `allowed`.
pub(super) fn require_role(auth: &Auth, allowed: &[Role], what: &str) -> Result<(), ApiError> {
    if allowed.contains(&auth.role) {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "the {} role may not {what}",
        auth.role.as_str()
    )))
}

/// The roles that work a venue's floor: they read the whole booking board.
pub(super) const STAFF_ROLES: &[Role] = &[Role::Admin, Role::Manager, Role::Staff, Role::Door];

/// Every role but the auditor, who reads the log itself (`/v1/audit/*`), never a read model.
pub(super) fn not_auditor(auth: &Auth) -> Result<(), ApiError> {
    if auth.role == Role::Auditor {
        return Err(ApiError::forbidden(
            "the auditor role reads the audit endpoints, not the read models",
        ));
    }
    Ok(())
}

/// A venue id from the path that the token may see; anything else is 404, like an unknown venue.
pub(super) fn visible_venue(auth: &Auth, raw: &str) -> Result<Uuid, ApiError> {
    let id = parse_id(raw, "venue")?;
    if !auth.sees_venue(VenueId(id)) {
        return Err(ApiError::not_found("venue"));
    }
    Ok(id)
}

const STATUSES: &[&str] = &["pending", "confirmed", "checked_in", "no_show", "cancelled"];

fn encode_cursor(row: &BookingRow) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}|{}",
        row.starts_at.to_rfc3339(),
        row.booking_id
    ))
}

fn decode_cursor(raw: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || ApiError::bad_request("cursor", "is not a cursor this API gave out");
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .map_err(|_| bad())?;
    let text = String::from_utf8(text).map_err(|_| bad())?;
    let (t, id) = text.split_once('|').ok_or_else(bad)?;
    let t = DateTime::parse_from_rfc3339(t).map_err(|_| bad())?;
    Ok((
        t.with_timezone(&Utc),
        Uuid::parse_str(id).map_err(|_| bad())?,
    ))
}

impl AppState {
    /// A booking item as the contract shows it, personal data opened (or `null` and
    /// `"erased": true` once the subject's key is shredded).
    pub(crate) async fn booking_item(&self, row: &BookingRow) -> Result<Value, ApiError> {
        let sealed: Option<Sealed> = serde_json::from_value(row.customer.clone()).ok();
        let stream = format!("booking-{}", row.booking_id);
        let opened = match (sealed, self.vault.key(SubjectId(row.subject_id)).await) {
            (Some(sealed), Ok(key)) => pii::open::<CustomerDetails>(
                &key.key,
                &sealed,
                &SealContext {
                    stream_id: &stream,
                    event_type: "BookingRequested",
                },
            )
            .ok()
            .map(|p| p.into_inner()),
            (_, Err(VaultError::Erased)) | (None, _) => None,
            (_, Err(e)) => return Err(ApiError::Unexpected(anyhow::Error::new(e))),
        };
        let (customer, notes) = match &opened {
            Some(c) => (
                json!({"name": c.name, "email": c.email, "phone": c.phone}),
                json!(c.notes),
            ),
            None => (Value::Null, Value::Null),
        };
        let mut item = json!({
            "id": row.booking_id,
            "venue_id": row.venue_id,
            "resource_id": row.resource_id,
            "starts_at": row.starts_at,
            "ends_at": row.ends_at,
            "party_size": row.party_size,
            "status": row.status,
            "subject_id": row.subject_id,
            "customer": customer,
            "notes": notes,
            "paid_minor": row.paid_minor,
            "refunded_minor": row.refunded_minor,
            "version": row.version,
        });
        if opened.is_none() {
            item["erased"] = json!(true);
        }
        Ok(item)
    }

    async fn page(&self, filter: BoardFilter) -> Result<Value, ApiError> {
        let rows = booking_board::bookings(&self.pool, &filter).await?;
        let next = (rows.len() as i64 == filter.limit)
            .then(|| rows.last().map(encode_cursor))
            .flatten();
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            items.push(self.booking_item(row).await?);
        }
        Ok(json!({"items": items, "next_cursor": next}))
    }
}

fn board_filter(auth: &Auth, q: &QueryParams) -> Result<BoardFilter, ApiError> {
    let venue = q.uuid("venue_id", "a venue id")?;
    let venue_ids = match (venue, &auth.venues) {
        (Some(v), _) if !auth.sees_venue(VenueId(v)) => return Err(ApiError::not_found("venue")),
        (Some(v), _) => Some(vec![v]),
        (None, Some(scoped)) => Some(scoped.iter().map(|v| v.0).collect()),
        (None, None) => None,
    };
    let local_date = q.date("date")?;
    let status = q.one_of("status", STATUSES)?.map(str::to_owned);
    let limit = q.number_in("limit", 1..=200, 50)?;
    let after = q.text("cursor")?.map(decode_cursor).transpose()?;
    Ok(BoardFilter {
        venue_ids,
        local_date,
        status,
        subject_id: None,
        after,
        limit,
    })
}

pub async fn list_bookings(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    q: QueryParams,
) -> Result<Response, QueryError> {
    require_role(&auth, STAFF_ROLES, "read the booking board")?;
    let filter = board_filter(&auth, &q)?;
    let position = app.read_position.reach(q.min_position(&headers)?).await?;
    let page = app.page(filter).await.map_err(QueryError::at(position))?;
    Ok(answer(position, page))
}

pub async fn booking_detail(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: QueryParams,
) -> Result<Response, QueryError> {
    not_auditor(&auth)?;
    let id = parse_id(&id, "booking")?;
    let position = app.read_position.reach(q.min_position(&headers)?).await?;
    let item = app
        .booking_detail(&auth, id)
        .await
        .map_err(QueryError::at(position))?;
    Ok(answer(position, item))
}

impl AppState {
    async fn booking_detail(&self, auth: &Auth, id: Uuid) -> Result<Value, ApiError> {
        let row = booking_board::booking(&self.pool, id)
            .await?
            .filter(|r| auth.sees_booking(VenueId(r.venue_id), SubjectId(r.subject_id)))
            .ok_or_else(|| ApiError::not_found("booking"))?;
        let mut item = self.booking_item(&row).await?;
        let payments: Vec<Value> = booking_board::payments_of(&self.pool, id)
            .await?
            .into_iter()
            .map(|p| {
                json!({
                    "id": p.payment_id,
                    "kind": p.kind,
                    "status": status_of(p.authorised_minor, p.captured_minor, p.refunded_minor, p.failed),
                    "authorised_minor": p.authorised_minor,
                    "captured_minor": p.captured_minor,
                    "refunded_minor": p.refunded_minor,
                    "currency": p.currency,
                })
            })
            .collect();
        item["payments"] = json!(payments);
        Ok(item)
    }
}

pub async fn customer_bookings(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(subject): Path<String>,
    q: QueryParams,
) -> Result<Response, QueryError> {
    let subject = parse_id(&subject, "subject")?;
    if auth.role == Role::Customer && auth.subject != Some(SubjectId(subject)) {
        return Err(ApiError::not_found("subject").into());
    }
    require_role(
        &auth,
        &[Role::Customer, Role::Admin, Role::Manager, Role::Staff],
        "read customers' bookings",
    )?;
    let mut filter = board_filter(&auth, &q)?;
    filter.subject_id = Some(subject);
    if auth.role == Role::Customer {
        filter.venue_ids = None;
    }
    let position = app.read_position.reach(q.min_position(&headers)?).await?;
    let page = app.page(filter).await.map_err(QueryError::at(position))?;
    Ok(answer(position, page))
}

fn venue_json(v: &booking_board::VenueRow, resources: &[booking_board::ResourceRow]) -> Value {
    json!({
        "id": v.venue_id,
        "name": v.name,
        "timezone": v.timezone,
        "version": v.version,
        "resources": resources.iter().map(|r| json!({
            "id": r.resource_id, "name": r.name, "capacity": r.capacity,
        })).collect::<Vec<_>>(),
    })
}

pub async fn list_venues(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    q: QueryParams,
) -> Result<Response, QueryError> {
    not_auditor(&auth)?;
    let position = app.read_position.reach(q.min_position(&headers)?).await?;
    let only: Option<Vec<Uuid>> = match (&auth.venues, auth.role) {
        (Some(v), r) if r != Role::Customer => Some(v.iter().map(|v| v.0).collect()),
        _ => None,
    };
    let venues = booking_board::venues(&app.pool, only.as_deref())
        .await
        .map_err(QueryError::at(position))?;
    let items: Vec<Value> = venues.iter().map(|(v, r)| venue_json(v, r)).collect();
    Ok(answer(position, json!({"items": items})))
}

pub async fn venue(
    State(app): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: QueryParams,
) -> Result<Response, QueryError> {
    not_auditor(&auth)?;
    let id = visible_venue(&auth, &id)?;
    let position = app.read_position.reach(q.min_position(&headers)?).await?;
    let venues = booking_board::venues(&app.pool, Some(&[id]))
        .await
        .map_err(QueryError::at(position))?;
    let (v, r) = venues
        .first()
        .ok_or_else(|| QueryError::at(position)(ApiError::not_found("venue")))?;
    Ok(answer(position, venue_json(v, r)))
}
