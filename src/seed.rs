//! The demo venue the quick start serves: appended through the same pipeline as any command.

use crate::store::append::{AppendOutcome, AppendRequest, Appender, StreamAppend};
use ledger_events::envelope::{DomainEvent, ExpectedVersion, Metadata};
use ledger_events::ids::{venue_stream, ResourceId, VenueId};
use ledger_events::venue::{self, VenueCommand};
use uuid::Uuid;

/// Fixed ids, so seeding twice finds the venue instead of making a second one.
pub const DEMO_VENUE: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
const DEMO_RESOURCES: [(u128, &str, i64); 4] = [
    (0x0193_0000_0000_7000_8000_0000_0000_0011, "Table 1", 2),
    (0x0193_0000_0000_7000_8000_0000_0000_0012, "Table 2", 4),
    (0x0193_0000_0000_7000_8000_0000_0000_0013, "Table 3", 6),
    (
        0x0193_0000_0000_7000_8000_0000_0000_0014,
        "Private room",
        12,
    ),
];

/// Registers the demo venue and its resources unless it exists. Returns whether it appended.
pub async fn demo_venue(appender: &Appender) -> anyhow::Result<bool> {
    let venue_id = VenueId(DEMO_VENUE);
    let mut events = venue::decide(
        None,
        VenueCommand::Register {
            venue_id,
            name: "Demo Bistro".into(),
            timezone: "Europe/Berlin".into(),
        },
    )?;
    for (id, name, capacity) in DEMO_RESOURCES {
        let state = venue::fold(&events);
        events.extend(venue::decide(
            state.as_ref(),
            VenueCommand::AddResource {
                resource_id: ResourceId(Uuid::from_u128(id)),
                name: name.into(),
                capacity,
            },
        )?);
    }
    let request_id = Uuid::now_v7();
    let request = AppendRequest {
        streams: vec![StreamAppend {
            stream_id: venue_stream(venue_id),
            expected: ExpectedVersion::NoStream,
            events: events.iter().map(DomainEvent::to_new_event).collect(),
        }],
        metadata: Metadata {
            actor: "ledger-seed".into(),
            role: "system".into(),
            command: "SeedDemoVenue".into(),
            request_id,
            correlation_id: request_id,
            causation_id: request_id,
        },
        slot: None,
        idempotency: None,
    };
    match appender.append(request).await {
        Ok(AppendOutcome::Appended(..)) => Ok(true),
        Ok(AppendOutcome::Replayed(_)) => Ok(false),
        Err(crate::store::append::AppendError::VersionConflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
