//! History: a stream's audit trail, as the contract's wire events (JSON) or as CSV for
//! spreadsheets. Personal fields stay sealed in JSON; CSV carries no payload at all, only who did
//! what when, so it can be handed around without thinking about personal data.

use ledger_events::envelope::{RecordedEvent, WireEvent};
use serde_json::Value;

/// The CSV header, in column order.
pub const CSV_HEADER: &str =
    "position,event_id,stream,version,type,recorded_at,actor,role,command,request_id";

pub fn wire(events: &[RecordedEvent]) -> Vec<WireEvent> {
    events.iter().map(WireEvent::from).collect()
}

/// The events as CSV (RFC 4180, `\n` line ends), header first.
pub fn csv(events: &[RecordedEvent]) -> String {
    let mut out = String::with_capacity(64 * (events.len() + 1));
    out.push_str(CSV_HEADER);
    out.push('\n');
    for e in events {
        let meta = |key: &str| match e.metadata.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        let fields = [
            e.global_position.to_string(),
            e.event_id.to_string(),
            e.stream_id.clone(),
            e.stream_version.to_string(),
            e.event_type.clone(),
            e.recorded_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            meta("actor"),
            meta("role"),
            meta("command"),
            meta("request_id"),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// Quotes a field only when it needs it: actors are opaque ids chosen by whoever mints tokens, so
/// a comma, quote or line break in one must not shift or split a row.
fn csv_field(raw: &str) -> String {
    if raw.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", raw.replace('"', "\"\""))
    } else {
        raw.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;
    use uuid::Uuid;

    fn event(actor: &str) -> RecordedEvent {
        RecordedEvent {
            global_position: 7,
            event_id: Uuid::nil(),
            stream_id: "booking-00000000-0000-0000-0000-000000000000".into(),
            stream_version: 2,
            event_type: "BookingConfirmed".into(),
            schema_version: 1,
            payload: json!({"secret": "never in csv"}),
            metadata: json!({"actor": actor, "role": "staff", "command": "ConfirmBooking",
                             "request_id": Uuid::nil()}),
            recorded_at: Utc.timestamp_opt(0, 0).single().unwrap_or_default(),
        }
    }

    use chrono::Utc;

    #[test]
    fn one_line_per_event_without_payload() {
        let out = csv(&[event("u1"), event("u2")]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(
            lines[1],
            "7,00000000-0000-0000-0000-000000000000,booking-00000000-0000-0000-0000-000000000000,\
             2,BookingConfirmed,1970-01-01T00:00:00.000000Z,u1,staff,ConfirmBooking,\
             00000000-0000-0000-0000-000000000000"
        );
        assert!(!out.contains("never in csv"));
    }

    #[test]
    fn awkward_actors_are_quoted() {
        let out = csv(&[event("a,\"b\"")]);
        assert!(out.contains(",\"a,\"\"b\"\"\",staff,"), "{out}");
    }
}
