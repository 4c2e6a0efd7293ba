//! Domain rejections: a command refused by the rules. Never a storage failure.

/// Why a decider refused a command. Each maps to one problem type of the HTTP contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The command's values break a rule (`validation`, 422); `field` names the offending field.
    #[error("{field}: {detail}")]
    Validation { field: &'static str, detail: String },
    /// The aggregate's state does not allow the command (`invalid-transition`, 409).
    #[error("{0}")]
    InvalidTransition(String),
    /// The command targets something that does not exist (`not-found`, 404).
    #[error("{0} not found")]
    NotFound(&'static str),
}

impl DomainError {
    pub fn validation(field: &'static str, detail: impl Into<String>) -> Self {
        DomainError::Validation {
            field,
            detail: detail.into(),
        }
    }

    pub fn transition(detail: impl Into<String>) -> Self {
        DomainError::InvalidTransition(detail.into())
    }
}

/// A stored event that cannot be read back as a domain event (unknown type or malformed payload).
#[derive(Debug, thiserror::Error)]
#[error("cannot decode event {event_type} v{schema_version}: {reason}")]
pub struct DecodeError {
    pub event_type: String,
    pub schema_version: i32,
    pub reason: String,
}
