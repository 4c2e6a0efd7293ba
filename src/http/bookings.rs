//! Booking commands: request, confirm, reschedule, cancel, check in, no-show.

use super::auth::{Auth, Right};
use super::command::{Attempt, Decision, Incoming, RequestIds};
use super::problem::ApiError;
use super::{parse_id, AppState};
use crate::store::append::SlotChange;
use crate::store::vault::VaultError;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use chrono::{DateTime, FixedOffset, Utc};
use ledger_events::booking::{self, Booking, BookingCommand, CustomerDetails, TimeSlot};
use ledger_events::envelope::ExpectedVersion;
use ledger_events::ids::{booking_stream, BookingId, ResourceId, SubjectId, VenueId};
use ledger_events::pii::{self, Pii, SealContext, Sealed};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomerIn {
    name: String,
    email: String,
    #[serde(default)]
    phone: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBooking {
    venue_id: uuid::Uuid,
    resource_id: uuid::Uuid,
    starts_at: DateTime<FixedOffset>,
    ends_at: DateTime<FixedOffset>,
    party_size: i64,
    customer: CustomerIn,
    #[serde(default)]
    notes: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reschedule {
    starts_at: DateTime<FixedOffset>,
    ends_at: DateTime<FixedOffset>,
    #[serde(default)]
    resource_id: Option<uuid::Uuid>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cancel {
    #[serde(default)]
    reason: Option<String>,
}

/// Commands whose body is `{}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn slot(
    starts_at: DateTime<FixedOffset>,
    ends_at: DateTime<FixedOffset>,
) -> Result<TimeSlot, ApiError> {
    Ok(TimeSlot::new(
        starts_at.with_timezone(&Utc),
        ends_at.with_timezone(&Utc),
    )?)
}

/// Bounded, printable text: what staff and guests type must fit and render.
fn text(
    field: &'static str,
    value: &str,
    max: usize,
    allow_newlines: bool,
) -> Result<String, ApiError> {
    let value = value.trim();
    if value.chars().count() > max {
        return Err(ApiError::unprocessable(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !(allow_newlines && (c == '\n' || c == '\t')))
    {
        return Err(ApiError::unprocessable(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value.to_owned())
}

fn validate_customer(c: CustomerIn, notes: Option<String>) -> Result<CustomerDetails, ApiError> {
    let name = text("customer.name", &c.name, 200, false)?;
    if name.is_empty() {
        return Err(ApiError::unprocessable(
            "customer.name",
            "must not be empty",
        ));
    }
    let email = text("customer.email", &c.email, 254, false)?;
    let valid_email = match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
                && !email.chars().any(char::is_whitespace)
        }
        None => false,
    };
    if !valid_email {
        return Err(ApiError::unprocessable(
            "customer.email",
            "must be an email address",
        ));
    }
    let phone = match c.phone {
        None => None,
        Some(p) => {
            let p = text("customer.phone", &p, 32, false)?;
            let digits = p.chars().filter(char::is_ascii_digit).count();
            if digits < 3
                || !p
                    .chars()
                    .all(|ch| ch.is_ascii_digit() || " +-().".contains(ch))
            {
                return Err(ApiError::unprocessable(
                    "customer.phone",
                    "must be a phone number (digits, spaces, + - ( ) .)",
                ));
            }
            Some(p)
        }
    };
    let notes = match notes {
        None => None,
        Some(n) => Some(text("notes", &n, 2000, true)?).filter(|n| !n.is_empty()),
    };
    Ok(CustomerDetails {
        name,
        email,
        phone,
        notes,
    })
}

impl From<VaultError> for ApiError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Erased => ApiError::forbidden(
                "this data subject has been erased; a new booking needs a new subject",
            ),
            VaultError::OtherSubject => ApiError::forbidden(
                "a customer may only book for themself; this email belongs to someone else",
            ),
            other => ApiError::Unexpected(anyhow::Error::new(other)),
        }
    }
}

impl AppState {
    /// Seals personal data under the subject's key, bound to where it will rest.
    pub async fn seal<T: serde::Serialize>(
        &self,
        subject: SubjectId,
        stream_id: &str,
        event_type: &str,
        value: T,
    ) -> Result<Sealed, ApiError> {
        let key = self.vault.key(subject).await?;
        pii::seal(
            &key.key,
            subject.0,
            key.key_id,
            &SealContext {
                stream_id,
                event_type,
            },
            &Pii::new(value),
        )
        .map_err(|e| ApiError::Unexpected(anyhow::Error::new(e)))
    }

    /// The booking if this caller may see it; 404 otherwise, so existence is not leaked.
    pub async fn visible_booking(&self, auth: &Auth, id: &str) -> Result<(Booking, i64), ApiError> {
        let id = BookingId(parse_id(id, "booking")?);
        match self.load_booking(id).await? {
            (Some(b), version) if auth.sees_booking(b.venue_id, b.subject_id) => Ok((b, version)),
            _ => Err(ApiError::not_found("booking")),
        }
    }
}

fn incoming(auth: Auth, ids: RequestIds, headers: HeaderMap, route: String) -> Incoming {
    Incoming {
        auth,
        role_label: None,
        ids,
        headers,
        route,
    }
}

pub async fn request(
    State(app): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    auth: Auth,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let incoming = incoming(auth, ids, headers, "POST /v1/bookings".into());
    let state = app.clone();
    app.run_command("RequestBooking", None, incoming, body, |cmd| {
        let app = state.clone();
        async move {
            cmd.auth.require(Right::CreateBooking)?;
            let req: RequestBooking = cmd.json()?;
            let venue_id = VenueId(req.venue_id);
            if !cmd.auth.sees_venue(venue_id) {
                return Err(ApiError::not_found("venue"));
            }
            let (venue, _) = app.load_venue(venue_id).await?;
            let venue = venue.ok_or_else(|| ApiError::not_found("venue"))?;
            let slot = slot(req.starts_at, req.ends_at)?;
            let details = validate_customer(req.customer, req.notes)?;
            // Refuse what the decider would refuse before minting a subject and key for it.
            booking::check_party(&venue, ResourceId(req.resource_id), req.party_size)?;
            let subject = app
                .vault
                .subject_for_email(&details.email, cmd.auth.subject)
                .await?;
            let booking_id = BookingId::mint();
            let stream = booking_stream(booking_id);
            let customer = app
                .seal(subject, &stream, "BookingRequested", details)
                .await?;
            let resource_id = ResourceId(req.resource_id);
            let events = booking::decide(
                None,
                BookingCommand::Request {
                    booking_id,
                    venue: &venue,
                    resource_id,
                    slot,
                    party_size: req.party_size,
                    subject_id: subject,
                    customer,
                },
            )?;
            Ok(Decision::single(
                stream,
                ExpectedVersion::NoStream,
                &events,
                booking_id.0,
                StatusCode::CREATED,
            )
            .with_slot(SlotChange::Reserve {
                booking_id: booking_id.0,
                resource_id: resource_id.0,
                slot,
            })
            .with("subject_id", json!(subject))
            .with("status", json!("pending")))
        }
    })
    .await
}

/// The lifecycle commands on an existing booking differ only in right, body and decision.
#[derive(Clone, Copy)]
enum Lifecycle {
    Confirm,
    Reschedule,
    Cancel,
    CheckIn,
    NoShow,
}

impl Lifecycle {
    fn name(self) -> &'static str {
        match self {
            Lifecycle::Confirm => "ConfirmBooking",
            Lifecycle::Reschedule => "RescheduleBooking",
            Lifecycle::Cancel => "CancelBooking",
            Lifecycle::CheckIn => "CheckInGuest",
            Lifecycle::NoShow => "MarkNoShow",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Lifecycle::Confirm => "confirm",
            Lifecycle::Reschedule => "reschedule",
            Lifecycle::Cancel => "cancel",
            Lifecycle::CheckIn => "check-in",
            Lifecycle::NoShow => "no-show",
        }
    }

    fn right(self) -> Right {
        match self {
            Lifecycle::Confirm | Lifecycle::Reschedule => Right::ChangeBooking,
            Lifecycle::Cancel => Right::CancelBooking,
            Lifecycle::CheckIn | Lifecycle::NoShow => Right::Door,
        }
    }
}

async fn lifecycle(
    app: &AppState,
    what: Lifecycle,
    cmd: Attempt,
    id: &str,
) -> Result<Decision, ApiError> {
    cmd.auth.require(what.right())?;
    let (booking, version) = app.visible_booking(&cmd.auth, id).await?;
    let expected = cmd.check_version(version)?;
    let stream = booking_stream(booking.id);
    let (command, slot_change, venue);
    match what {
        Lifecycle::Reschedule => {
            let req: Reschedule = cmd.json()?;
            let new_slot = slot(req.starts_at, req.ends_at)?;
            venue = app
                .load_venue(booking.venue_id)
                .await?
                .0
                .ok_or_else(|| ApiError::not_found("venue"))?;
            let resource_id = req.resource_id.map(ResourceId);
            slot_change = Some(SlotChange::Move {
                booking_id: booking.id.0,
                resource_id: resource_id.unwrap_or(booking.resource_id).0,
                slot: new_slot,
            });
            command = BookingCommand::Reschedule {
                venue: &venue,
                resource_id,
                slot: new_slot,
            };
        }
        Lifecycle::Cancel => {
            let req: Cancel = cmd.json()?;
            let reason = match req
                .reason
                .map(|r| text("reason", &r, 2000, true))
                .transpose()?
            {
                Some(r) if !r.is_empty() => {
                    match app
                        .seal(booking.subject_id, &stream, "BookingCancelled", r)
                        .await
                    {
                        Ok(sealed) => Some(sealed),
                        // Free text about an erased person is not kept; the cancel still stands.
                        Err(ApiError::Forbidden(_)) => None,
                        Err(e) => return Err(e),
                    }
                }
                _ => None,
            };
            slot_change = Some(SlotChange::Release {
                booking_id: booking.id.0,
            });
            command = BookingCommand::Cancel { reason };
        }
        other => {
            let _: Empty = cmd.json()?;
            slot_change = match other {
                Lifecycle::NoShow => Some(SlotChange::Release {
                    booking_id: booking.id.0,
                }),
                _ => None,
            };
            command = match other {
                Lifecycle::Confirm => BookingCommand::Confirm,
                Lifecycle::CheckIn => BookingCommand::CheckIn,
                _ => BookingCommand::MarkNoShow,
            };
        }
    }
    let events = booking::decide(Some(&booking), command)?;
    let next = events.iter().fold(Some(booking.clone()), booking::evolve);
    let status = next.map(|b| b.status.as_str()).unwrap_or("unknown");
    let mut decision = Decision::single(stream, expected, &events, booking.id.0, StatusCode::OK)
        .with("status", json!(status));
    decision.slot = slot_change;
    Ok(decision)
}

async fn run_lifecycle(
    app: AppState,
    what: Lifecycle,
    ids: RequestIds,
    auth: Auth,
    id: String,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let incoming = incoming(
        auth,
        ids,
        headers,
        format!("POST /v1/bookings/{id}/{}", what.path()),
    );
    let target = Some(format!("booking-{id}"));
    let state = app.clone();
    app.run_command(what.name(), target, incoming, body, |cmd| {
        let app = state.clone();
        let id = id.clone();
        async move { lifecycle(&app, what, cmd, &id).await }
    })
    .await
}

macro_rules! lifecycle_handler {
    ($name:ident, $what:expr) => {
        pub async fn $name(
            State(app): State<AppState>,
            Extension(ids): Extension<RequestIds>,
            auth: Auth,
            Path(id): Path<String>,
            headers: HeaderMap,
            body: Body,
        ) -> Response {
            run_lifecycle(app, $what, ids, auth, id, headers, body).await
        }
    };
}

lifecycle_handler!(confirm, Lifecycle::Confirm);
lifecycle_handler!(reschedule, Lifecycle::Reschedule);
lifecycle_handler!(cancel, Lifecycle::Cancel);
lifecycle_handler!(check_in, Lifecycle::CheckIn);
lifecycle_handler!(no_show, Lifecycle::NoShow);

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(name: &str, email: &str, phone: Option<&str>) -> CustomerIn {
        CustomerIn {
            name: name.into(),
            email: email.into(),
            phone: phone.map(Into::into),
        }
    }

    fn field(r: Result<CustomerDetails, ApiError>) -> String {
        match r {
            Err(ApiError::Validation { field, .. }) => field,
            other => panic!("expected a validation error, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn customer_details_are_trimmed_and_checked() {
        let ok = validate_customer(
            customer(" Ada ", "ada@example.org", Some("+44 20 7946 0000")),
            Some(" window ".into()),
        );
        assert!(matches!(ok, Ok(ref c) if c.name == "Ada" && c.notes.as_deref() == Some("window")));
        assert_eq!(
            field(validate_customer(customer("", "a@b.co", None), None)),
            "customer.name"
        );
        for bad in ["nobody", "a@b", "@b.co", "a b@c.co", "a@.co", "a@b.co."] {
            assert_eq!(
                field(validate_customer(customer("A", bad, None), None)),
                "customer.email",
                "{bad}"
            );
        }
        assert_eq!(
            field(validate_customer(
                customer("A", "a@b.co", Some("call me")),
                None
            )),
            "customer.phone"
        );
        assert_eq!(
            field(validate_customer(customer("A\u{7}", "a@b.co", None), None)),
            "customer.name"
        );
        assert_eq!(
            field(validate_customer(
                customer("A", "a@b.co", None),
                Some("x".repeat(2001))
            )),
            "notes"
        );
    }
}
