//! Who did what: the commands callers tried, read back from the log.
//!
//! Accepted commands are not stored as such: every event carries its command's metadata (actor,
//! role, command, request id), so one accepted command is the group of events sharing a
//! `request_id`. Refused commands append no domain event, only a `CommandAudited` record, which
//! becomes one refused action. Payloads are never copied into actions: only who, what, on which
//! streams and with what outcome.

use crate::{read_actions, ReadError};
use chrono::{DateTime, Utc};
use ledger_events::envelope::RecordedEvent;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;

/// The event type of a refused command's record.
pub const COMMAND_AUDITED: &str = "CommandAudited";

/// How many events a follow-up read takes while finishing a command cut by the page's end.
const TAIL_CHUNK: i64 = 32;

/// One command a caller tried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Action {
    /// `accepted` or `refused`.
    pub outcome: &'static str,
    pub actor: String,
    pub role: String,
    pub command: String,
    pub request_id: String,
    pub correlation_id: String,
    /// When the command's first event (or its refusal) was recorded.
    pub recorded_at: DateTime<Utc>,
    /// The same as `recorded_at`, under the name the OpenAPI document gives it.
    pub at: DateTime<Utc>,
    /// The stream acted on: an accepted command's first stream, or what a refused one named.
    pub target: Option<String>,
    /// Every stream an accepted command appended to, in log order; empty for a refusal.
    pub streams: Vec<String>,
    /// The global positions of the command's events (for a refusal: of its `CommandAudited`).
    pub positions: Vec<i64>,
    /// The last of `positions`.
    pub position: i64,
    /// For refusals: the problem slug and HTTP status the caller got.
    pub problem_type: Option<String>,
    pub status: Option<u16>,
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn request_of(e: &RecordedEvent) -> String {
    text(&e.metadata, "request_id")
}

/// Groups events (in global order) into actions, oldest first.
pub fn group(events: &[RecordedEvent]) -> Vec<Action> {
    let mut actions: Vec<Action> = Vec::new();
    // Events of one command are contiguous in the log, but a map keeps this right even if a
    // future writer interleaves them.
    let mut accepted: HashMap<String, usize> = HashMap::new();
    for e in events {
        let m = &e.metadata;
        if e.event_type == COMMAND_AUDITED {
            let p = &e.payload;
            actions.push(Action {
                outcome: "refused",
                actor: text(m, "actor"),
                role: text(m, "role"),
                command: text(m, "command"),
                request_id: text(m, "request_id"),
                correlation_id: text(m, "correlation_id"),
                recorded_at: e.recorded_at,
                at: e.recorded_at,
                target: p.get("target").and_then(Value::as_str).map(str::to_owned),
                streams: Vec::new(),
                positions: vec![e.global_position],
                position: e.global_position,
                problem_type: p
                    .get("problem_type")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                status: p
                    .get("status")
                    .and_then(Value::as_u64)
                    .and_then(|s| u16::try_from(s).ok()),
            });
            continue;
        }
        let request_id = request_of(e);
        if let Some(&i) = accepted.get(&request_id) {
            let a = &mut actions[i];
            if !a.streams.contains(&e.stream_id) {
                a.streams.push(e.stream_id.clone());
            }
            a.positions.push(e.global_position);
            a.position = e.global_position;
            continue;
        }
        accepted.insert(request_id.clone(), actions.len());
        actions.push(Action {
            outcome: "accepted",
            actor: text(m, "actor"),
            role: text(m, "role"),
            command: text(m, "command"),
            request_id,
            correlation_id: text(m, "correlation_id"),
            recorded_at: e.recorded_at,
            at: e.recorded_at,
            target: Some(e.stream_id.clone()),
            streams: vec![e.stream_id.clone()],
            positions: vec![e.global_position],
            position: e.global_position,
            problem_type: None,
            status: None,
        });
    }
    actions
}

/// Which actions to read.
#[derive(Clone, Debug, Default)]
pub struct ActionFilter<'a> {
    pub actor: Option<&'a str>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// A page of actions from the events after `after` (at least `limit` events are read when there
/// are that many), and the position to pass as `after` for the next page (`None` at the end).
///
/// A page never ends in the middle of a command: when the `limit`-th event's command goes on,
/// its remaining events are read too, so no action is split across pages.
pub async fn page(
    db: &sqlx::PgPool,
    filter: &ActionFilter<'_>,
    after: i64,
    limit: i64,
) -> Result<(Vec<Action>, Option<i64>), ReadError> {
    let (actor, from, to) = (filter.actor, filter.from, filter.to);
    let mut events = read_actions(db, actor, from, to, after, limit).await?;
    let full = events.len() as i64 >= limit;
    if full {
        while let Some(last) = events.last() {
            if last.event_type == COMMAND_AUDITED {
                break;
            }
            let request_id = request_of(last);
            let more = read_actions(db, actor, from, to, last.global_position, TAIL_CHUNK).await?;
            let read = more.len();
            let same: Vec<RecordedEvent> = more
                .into_iter()
                .take_while(|e| e.event_type != COMMAND_AUDITED && request_of(e) == request_id)
                .collect();
            let taken = same.len();
            events.extend(same);
            if taken < read || (read as i64) < TAIL_CHUNK {
                break;
            }
        }
    }
    let next = if full {
        events.last().map(|e| e.global_position)
    } else {
        None
    };
    Ok((group(&events), next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn event(position: i64, stream: &str, event_type: &str, request: u128) -> RecordedEvent {
        RecordedEvent {
            global_position: position,
            event_id: Uuid::from_u128(position as u128),
            stream_id: stream.into(),
            stream_version: 1,
            event_type: event_type.into(),
            schema_version: 1,
            payload: json!({"target": "booking-x", "problem_type": "forbidden", "status": 403,
                            "customer": "sealed"}),
            metadata: json!({"actor": "u1", "role": "staff", "command": "AuthorizePayment",
                             "request_id": Uuid::from_u128(request),
                             "correlation_id": Uuid::from_u128(request)}),
            recorded_at: DateTime::<Utc>::default(),
        }
    }

    #[test]
    fn one_command_over_two_streams_is_one_accepted_action() {
        let actions = group(&[
            event(1, "payment-a", "PaymentAuthorized", 1),
            event(2, "booking-b", "PaymentAuthorized", 1),
            event(3, "booking-b", "BookingConfirmed", 2),
        ]);
        assert_eq!(actions.len(), 2);
        assert_eq!(actions[0].outcome, "accepted");
        assert_eq!(actions[0].streams, vec!["payment-a", "booking-b"]);
        assert_eq!(actions[0].positions, vec![1, 2]);
        assert_eq!(actions[0].position, 2);
        assert_eq!(actions[0].target.as_deref(), Some("payment-a"));
        assert_eq!(actions[1].positions, vec![3]);
    }

    #[test]
    fn a_refusal_is_its_own_action_with_its_problem() {
        let actions = group(&[event(4, "audit-20261201", COMMAND_AUDITED, 9)]);
        assert_eq!(actions.len(), 1);
        let a = &actions[0];
        assert_eq!(a.outcome, "refused");
        assert_eq!(a.problem_type.as_deref(), Some("forbidden"));
        assert_eq!(a.status, Some(403));
        assert_eq!(a.target.as_deref(), Some("booking-x"));
        assert!(a.streams.is_empty());
        let shown = serde_json::to_string(a).unwrap_or_default();
        assert!(
            !shown.contains("sealed"),
            "payloads are never copied: {shown}"
        );
    }
}
