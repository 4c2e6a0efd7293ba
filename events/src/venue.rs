//! The venue aggregate: a place with bookable resources (tables, rooms, service slots).

use crate::ids::{ResourceId, VenueId};
use crate::DomainError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VenueRegistered {
    pub venue_id: VenueId,
    pub name: String,
    /// IANA zone: "the local day" of a booking is the venue's.
    pub timezone: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceAdded {
    pub venue_id: VenueId,
    pub resource_id: ResourceId,
    pub name: String,
    pub capacity: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum VenueEvent {
    VenueRegistered(VenueRegistered),
    ResourceAdded(ResourceAdded),
}

crate::tagged_domain_event!(VenueEvent {
    VenueRegistered,
    ResourceAdded
});

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resource {
    pub id: ResourceId,
    pub name: String,
    pub capacity: u32,
}

/// A venue as the command side sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Venue {
    pub id: VenueId,
    pub name: String,
    pub timezone: chrono_tz::Tz,
    pub resources: BTreeMap<ResourceId, Resource>,
}

impl Venue {
    pub fn resource(&self, id: ResourceId) -> Option<&Resource> {
        self.resources.get(&id)
    }
}

#[derive(Clone, Debug)]
pub enum VenueCommand {
    Register {
        venue_id: VenueId,
        name: String,
        timezone: String,
    },
    AddResource {
        resource_id: ResourceId,
        name: String,
        capacity: i64,
    },
}

/// The most resources and the largest capacity one venue may declare: beyond them a value is a typo.
pub const MAX_CAPACITY: i64 = 10_000;

/// Checks a display name: what staff type must be printable and bounded.
pub fn validate_name(field: &'static str, name: &str) -> Result<String, DomainError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(DomainError::validation(field, "must not be empty"));
    }
    if trimmed.chars().count() > 200 {
        return Err(DomainError::validation(
            field,
            "must be at most 200 characters",
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(DomainError::validation(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

pub fn decide(state: Option<&Venue>, cmd: VenueCommand) -> Result<Vec<VenueEvent>, DomainError> {
    match (state, cmd) {
        (
            None,
            VenueCommand::Register {
                venue_id,
                name,
                timezone,
            },
        ) => {
            let name = validate_name("name", &name)?;
            if timezone.parse::<chrono_tz::Tz>().is_err() {
                return Err(DomainError::validation(
                    "timezone",
                    "must be an IANA time zone such as Europe/Berlin",
                ));
            }
            Ok(vec![VenueEvent::VenueRegistered(VenueRegistered {
                venue_id,
                name,
                timezone,
            })])
        }
        (Some(_), VenueCommand::Register { .. }) => {
            Err(DomainError::transition("the venue is already registered"))
        }
        (None, VenueCommand::AddResource { .. }) => Err(DomainError::NotFound("venue")),
        (
            Some(venue),
            VenueCommand::AddResource {
                resource_id,
                name,
                capacity,
            },
        ) => {
            let name = validate_name("name", &name)?;
            if !(1..=MAX_CAPACITY).contains(&capacity) {
                return Err(DomainError::validation(
                    "capacity",
                    format!("must be between 1 and {MAX_CAPACITY}"),
                ));
            }
            if venue.resources.values().any(|r| r.name == name) {
                return Err(DomainError::validation(
                    "name",
                    "the venue already has a resource with this name",
                ));
            }
            if venue.resources.contains_key(&resource_id) {
                return Err(DomainError::transition("the resource already exists"));
            }
            Ok(vec![VenueEvent::ResourceAdded(ResourceAdded {
                venue_id: venue.id,
                resource_id,
                name,
                capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            })])
        }
    }
}

pub fn evolve(state: Option<Venue>, event: &VenueEvent) -> Option<Venue> {
    match (state, event) {
        (None, VenueEvent::VenueRegistered(e)) => Some(Venue {
            id: e.venue_id,
            name: e.name.clone(),
            // The decider only records zones that parse; UTC is a safe reading of anything else.
            timezone: e.timezone.parse().unwrap_or(chrono_tz::UTC),
            resources: BTreeMap::new(),
        }),
        (Some(mut venue), VenueEvent::ResourceAdded(e)) => {
            venue.resources.insert(
                e.resource_id,
                Resource {
                    id: e.resource_id,
                    name: e.name.clone(),
                    capacity: e.capacity,
                },
            );
            Some(venue)
        }
        // Events that do not fit the state are ignored rather than invented into it.
        (state, _) => state,
    }
}

pub fn fold<'a>(events: impl IntoIterator<Item = &'a VenueEvent>) -> Option<Venue> {
    events.into_iter().fold(None, evolve)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::envelope::DomainEvent;
    use uuid::Uuid;

    fn registered() -> (VenueId, Vec<VenueEvent>) {
        let id = VenueId(Uuid::now_v7());
        let events = decide(
            None,
            VenueCommand::Register {
                venue_id: id,
                name: "  Chez Nous ".into(),
                timezone: "Europe/Paris".into(),
            },
        )
        .unwrap_or_default();
        (id, events)
    }

    #[test]
    fn registering_a_venue_records_its_trimmed_name_and_zone() {
        let (id, events) = registered();
        assert_eq!(
            events,
            vec![VenueEvent::VenueRegistered(VenueRegistered {
                venue_id: id,
                name: "Chez Nous".into(),
                timezone: "Europe/Paris".into()
            })]
        );
        assert_eq!(events[0].event_type(), "VenueRegistered");
    }

    #[test]
    fn an_unknown_time_zone_is_refused() {
        let err = decide(
            None,
            VenueCommand::Register {
                venue_id: VenueId::mint(),
                name: "x".into(),
                timezone: "Mars/Olympus".into(),
            },
        );
        assert!(matches!(
            err,
            Err(DomainError::Validation {
                field: "timezone",
                ..
            })
        ));
    }

    #[test]
    fn an_empty_or_control_name_is_refused() {
        for name in ["", "   ", "bad\u{0}name"] {
            let err = decide(
                None,
                VenueCommand::Register {
                    venue_id: VenueId::mint(),
                    name: name.into(),
                    timezone: "UTC".into(),
                },
            );
            assert!(matches!(
                err,
                Err(DomainError::Validation { field: "name", .. })
            ));
        }
    }

    #[test]
    fn registering_twice_is_an_invalid_transition() {
        let (id, events) = registered();
        let venue = fold(&events);
        let err = decide(
            venue.as_ref(),
            VenueCommand::Register {
                venue_id: id,
                name: "Again".into(),
                timezone: "UTC".into(),
            },
        );
        assert!(matches!(err, Err(DomainError::InvalidTransition(_))));
    }

    #[test]
    fn resources_need_a_capacity_of_at_least_one_and_a_unique_name() {
        let (_, events) = registered();
        let venue = fold(&events);
        let add = |name: &str, capacity| {
            decide(
                venue.as_ref(),
                VenueCommand::AddResource {
                    resource_id: ResourceId::mint(),
                    name: name.into(),
                    capacity,
                },
            )
        };
        assert!(matches!(
            add("T1", 0),
            Err(DomainError::Validation {
                field: "capacity",
                ..
            })
        ));
        assert!(matches!(
            add("T1", -3),
            Err(DomainError::Validation {
                field: "capacity",
                ..
            })
        ));
        assert!(matches!(
            add("T1", MAX_CAPACITY + 1),
            Err(DomainError::Validation {
                field: "capacity",
                ..
            })
        ));
        let added = add("T1", 4).unwrap_or_default();
        assert_eq!(added.len(), 1);
        let mut all = events.clone();
        all.extend(added);
        let venue = fold(&all);
        assert_eq!(venue.as_ref().map(|v| v.resources.len()), Some(1));
        let dup = decide(
            venue.as_ref(),
            VenueCommand::AddResource {
                resource_id: ResourceId::mint(),
                name: "T1".into(),
                capacity: 2,
            },
        );
        assert!(matches!(
            dup,
            Err(DomainError::Validation { field: "name", .. })
        ));
    }

    #[test]
    fn adding_a_resource_to_an_unknown_venue_is_not_found() {
        let err = decide(
            None,
            VenueCommand::AddResource {
                resource_id: ResourceId::mint(),
                name: "T1".into(),
                capacity: 2,
            },
        );
        assert_eq!(err, Err(DomainError::NotFound("venue")));
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let (_, events) = registered();
        for e in &events {
            let back = VenueEvent::decode(e.event_type(), 1, &e.payload());
            assert_eq!(back.ok().as_ref(), Some(e));
            assert!(e.payload().get("type").is_none());
        }
        assert!(VenueEvent::decode("VenueRegistered", 2, &serde_json::json!({})).is_err());
        assert!(VenueEvent::decode("Nope", 1, &serde_json::json!({})).is_err());
    }
}
