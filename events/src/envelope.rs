//! The stored envelope of an event: what the log holds around a domain event's payload.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Who caused an event and in answer to what. Every event carries it, so auditors can answer
/// "who did what" from the log alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The token's `sub` (an opaque id, never an email), or a system actor such as `payment-provider`.
    pub actor: String,
    pub role: String,
    /// The command's name, e.g. `RequestBooking`.
    pub command: String,
    pub request_id: Uuid,
    /// Shared by everything one user action set off, across services.
    pub correlation_id: Uuid,
    /// What directly caused this event: the request, or the provider event of a webhook.
    pub causation_id: Uuid,
}

/// An event about to be appended: ids and payload are fixed; position, version, time and hashes
/// are assigned by the append pipeline under the log head lock.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub schema_version: i32,
    pub payload: Value,
}

/// What a writer expects of a stream before its events are appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check: used for streams only ever appended to (audit).
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be exactly at this version (its last event's `stream_version`).
    Exact(i64),
}

impl ExpectedVersion {
    /// Whether a stream currently at `current` (0 = no stream) satisfies the expectation.
    pub fn accepts(self, current: i64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exact(v) => current == v,
        }
    }
}

/// An event as stored in the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub global_position: i64,
    pub event_id: Uuid,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

/// Implemented by each aggregate's event enum: how it is named and encoded in the log.
///
/// `event_type` and `schema_version` are a compatibility boundary independent of Rust names;
/// `decode` is where upcasters for older schema versions go, so stored rows are never rewritten.
pub trait DomainEvent: Sized {
    fn event_type(&self) -> &'static str;
    fn schema_version(&self) -> i32 {
        1
    }
    fn payload(&self) -> Value;
    fn decode(
        event_type: &str,
        schema_version: i32,
        payload: &Value,
    ) -> Result<Self, crate::error::DecodeError>;

    fn to_new_event(&self) -> NewEvent {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: self.event_type(),
            schema_version: self.schema_version(),
            payload: self.payload(),
        }
    }
}

/// Encodes an adjacently tagged enum into (type, payload) and back, so event enums can derive
/// serde once and keep the tag out of the payload.
#[doc(hidden)]
pub fn split_tagged<T: Serialize>(event: &T) -> Value {
    match serde_json::to_value(event) {
        Ok(Value::Object(mut map)) => map.remove("payload").unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

#[doc(hidden)]
pub fn join_tagged<T: serde::de::DeserializeOwned>(
    event_type: &str,
    schema_version: i32,
    payload: &Value,
) -> Result<T, crate::error::DecodeError> {
    let tagged = serde_json::json!({ "type": event_type, "payload": payload });
    serde_json::from_value(tagged).map_err(|e| crate::error::DecodeError {
        event_type: event_type.to_owned(),
        schema_version,
        reason: e.to_string(),
    })
}

/// Implements [`DomainEvent`] for an enum declared `#[serde(tag = "type", content = "payload")]`
/// whose variant names are the stored event types.
#[macro_export]
macro_rules! tagged_domain_event {
    ($enum:ty { $($variant:ident),+ $(,)? }) => {
        impl $crate::envelope::DomainEvent for $enum {
            fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => stringify!($variant),)+
                }
            }
            fn payload(&self) -> serde_json::Value {
                $crate::envelope::split_tagged(self)
            }
            fn decode(
                event_type: &str,
                schema_version: i32,
                payload: &serde_json::Value,
            ) -> Result<Self, $crate::error::DecodeError> {
                if schema_version != 1 {
                    return Err($crate::error::DecodeError {
                        event_type: event_type.to_owned(),
                        schema_version,
                        reason: "unknown schema version".into(),
                    });
                }
                $crate::envelope::join_tagged(event_type, schema_version, payload)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_versions() {
        assert!(ExpectedVersion::Any.accepts(0));
        assert!(ExpectedVersion::Any.accepts(7));
        assert!(ExpectedVersion::NoStream.accepts(0));
        assert!(!ExpectedVersion::NoStream.accepts(1));
        assert!(ExpectedVersion::Exact(3).accepts(3));
        assert!(!ExpectedVersion::Exact(3).accepts(4));
    }
}

/// An event as published on NATS and served by `/v1/audit/log`: the stored row under the names
/// the contract gives them. Personal fields inside `data` stay sealed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireEvent {
    pub position: i64,
    pub event_id: Uuid,
    pub stream: String,
    pub version: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: i32,
    pub recorded_at: DateTime<Utc>,
    pub data: Value,
    pub metadata: Value,
}

impl From<&RecordedEvent> for WireEvent {
    fn from(e: &RecordedEvent) -> Self {
        WireEvent {
            position: e.global_position,
            event_id: e.event_id,
            stream: e.stream_id.clone(),
            version: e.stream_version,
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            recorded_at: e.recorded_at,
            data: e.payload.clone(),
            metadata: e.metadata.clone(),
        }
    }
}

impl From<WireEvent> for RecordedEvent {
    fn from(e: WireEvent) -> Self {
        RecordedEvent {
            global_position: e.position,
            event_id: e.event_id,
            stream_id: e.stream,
            stream_version: e.version,
            event_type: e.event_type,
            schema_version: e.schema_version,
            payload: e.data,
            metadata: e.metadata,
            recorded_at: e.recorded_at,
        }
    }
}
