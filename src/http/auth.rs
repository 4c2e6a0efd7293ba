//! Bearer tokens (HS256 JWT) and what each role may do.

use super::problem::ApiError;
use super::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ledger_events::ids::{SubjectId, VenueId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Manager,
    Staff,
    Door,
    Auditor,
    Customer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Manager => "manager",
            Role::Staff => "staff",
            Role::Door => "door",
            Role::Auditor => "auditor",
            Role::Customer => "customer",
        }
    }
}

/// What a command needs; the role table of the contract lives in [`Auth::may`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    ManageVenues,
    CreateBooking,
    /// Confirm and reschedule.
    ChangeBooking,
    CancelBooking,
    /// Check-in and no-show.
    Door,
    Payments,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub exp: i64,
    #[serde(default)]
    pub iat: Option<i64>,
    /// A customer's data-subject id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Uuid>,
    /// For staff tokens: the only venues the holder sees and acts on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub venues: Option<Vec<Uuid>>,
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Auth {
    pub sub: String,
    pub role: Role,
    pub subject: Option<SubjectId>,
    pub venues: Option<Vec<VenueId>>,
}

impl Auth {
    pub fn may(&self, right: Right) -> bool {
        use Right as R;
        use Role::*;
        match self.role {
            Admin => true,
            Manager => true,
            Staff => matches!(
                right,
                R::CreateBooking | R::ChangeBooking | R::CancelBooking | R::Payments
            ),
            Door => matches!(right, R::Door),
            Auditor => false,
            Customer => matches!(right, R::CreateBooking | R::CancelBooking),
        }
    }

    pub fn require(&self, right: Right) -> Result<(), ApiError> {
        if self.may(right) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "the {} role may not do this",
                self.role.as_str()
            )))
        }
    }

    /// Whether a staff token's venue list (if any) includes the venue. Customers are scoped by
    /// subject instead, see [`Auth::sees_booking`].
    pub fn sees_venue(&self, venue: VenueId) -> bool {
        match &self.venues {
            Some(list) if self.role != Role::Customer => list.contains(&venue),
            _ => true,
        }
    }

    /// Whether this caller may see a booking at all; anything else answers 404, so another
    /// venue's or customer's bookings are not even confirmed to exist.
    pub fn sees_booking(&self, venue: VenueId, subject: SubjectId) -> bool {
        match self.role {
            Role::Customer => self.subject == Some(subject),
            _ => self.sees_venue(venue),
        }
    }
}

/// Signing and checking keys, built once from `LEDGER_JWT_SECRET`.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> Self {
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| ApiError::Unauthorized(format!("invalid bearer token: {e}")))?;
        Ok(data.claims)
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::Unauthorized("an Authorization: Bearer token is required".into())
            })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
            })?;
        let claims = state.jwt.verify(token)?;
        if claims.sub.trim().is_empty() {
            return Err(ApiError::Unauthorized("the token's sub is empty".into()));
        }
        if claims.role == Role::Customer && claims.subject.is_none() {
            return Err(ApiError::Unauthorized(
                "a customer token must carry a subject".into(),
            ));
        }
        Ok(Auth {
            sub: claims.sub,
            role: claims.role,
            subject: claims.subject.map(SubjectId),
            venues: claims.venues.map(|v| v.into_iter().map(VenueId).collect()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(role: Role) -> Auth {
        Auth {
            sub: "u".into(),
            role,
            subject: None,
            venues: None,
        }
    }

    #[test]
    fn the_role_table_of_the_contract() {
        use Right::*;
        let all = [
            ManageVenues,
            CreateBooking,
            ChangeBooking,
            CancelBooking,
            Door,
            Payments,
        ];
        let allowed = |role| {
            all.iter()
                .filter(|r| auth(role).may(**r))
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(allowed(Role::Admin), all.to_vec());
        assert_eq!(allowed(Role::Manager), all.to_vec());
        assert_eq!(
            allowed(Role::Staff),
            vec![CreateBooking, ChangeBooking, CancelBooking, Payments]
        );
        assert_eq!(allowed(Role::Door), vec![Door]);
        assert_eq!(allowed(Role::Auditor), vec![]);
        assert_eq!(allowed(Role::Customer), vec![CreateBooking, CancelBooking]);
    }

    #[test]
    fn venue_scoped_staff_see_only_their_venues() {
        let (a, b) = (VenueId::mint(), VenueId::mint());
        let mut staff = auth(Role::Staff);
        staff.venues = Some(vec![a]);
        assert!(staff.sees_venue(a));
        assert!(!staff.sees_venue(b));
        assert!(auth(Role::Staff).sees_venue(b));
    }

    #[test]
    fn customers_see_only_their_own_bookings() {
        let me = SubjectId::mint();
        let mut customer = auth(Role::Customer);
        customer.subject = Some(me);
        let venue = VenueId::mint();
        assert!(customer.sees_booking(venue, me));
        assert!(!customer.sees_booking(venue, SubjectId::mint()));
    }

    #[test]
    fn tokens_round_trip_and_tampering_is_refused() {
        let keys = JwtKeys::new(&[7u8; 32]);
        let claims = Claims {
            sub: "abc".into(),
            role: Role::Door,
            exp: chrono::Utc::now().timestamp() + 60,
            iat: None,
            subject: None,
            venues: Some(vec![Uuid::nil()]),
        };
        let token = keys.sign(&claims).unwrap_or_default();
        assert_eq!(keys.verify(&token).map(|c| c.role).ok(), Some(Role::Door));
        let other = JwtKeys::new(&[8u8; 32]);
        assert!(other.verify(&token).is_err());
        let expired = Claims {
            exp: chrono::Utc::now().timestamp() - 3600,
            ..claims
        };
        let token = keys.sign(&expired).unwrap_or_default();
        assert!(keys.verify(&token).is_err());
    }
}
