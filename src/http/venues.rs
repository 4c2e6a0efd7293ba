//! Venue commands: register a venue, add a resource.

use super::auth::{Auth, Right};
use super::command::{Decision, Incoming};
use super::{parse_id, AppState};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use ledger_events::envelope::ExpectedVersion;
use ledger_events::ids::{venue_stream, ResourceId, VenueId};
use ledger_events::venue::{self, VenueCommand};
use serde::Deserialize;

use super::command::RequestIds;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterVenue {
    name: String,
    timezone: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddResource {
    name: String,
    capacity: i64,
}

pub async fn register(
    State(app): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    auth: Auth,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let incoming = Incoming {
        auth,
        role_label: None,
        ids,
        headers,
        route: "POST /v1/venues".into(),
    };
    app.run_command("RegisterVenue", None, incoming, body, |cmd| async move {
        cmd.auth.require(Right::ManageVenues)?;
        if cmd.auth.venues.is_some() {
            return Err(super::problem::ApiError::forbidden(
                "a venue-scoped token cannot register new venues",
            ));
        }
        let req: RegisterVenue = cmd.json()?;
        let venue_id = VenueId::mint();
        let events = venue::decide(
            None,
            VenueCommand::Register {
                venue_id,
                name: req.name,
                timezone: req.timezone,
            },
        )?;
        Ok(Decision::single(
            venue_stream(venue_id),
            ExpectedVersion::NoStream,
            &events,
            venue_id.0,
            StatusCode::CREATED,
        ))
    })
    .await
}

pub async fn add_resource(
    State(app): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    auth: Auth,
    Path(venue_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let incoming = Incoming {
        auth,
        role_label: None,
        ids,
        headers,
        route: format!("POST /v1/venues/{venue_id}/resources"),
    };
    let target = Some(format!("venue-{venue_id}"));
    let app2 = app.clone();
    app.run_command("AddResource", target, incoming, body, |cmd| {
        let app = app2.clone();
        let venue_id = venue_id.clone();
        async move {
            cmd.auth.require(Right::ManageVenues)?;
            let venue_id = VenueId(parse_id(&venue_id, "venue")?);
            if !cmd.auth.sees_venue(venue_id) {
                return Err(super::problem::ApiError::not_found("venue"));
            }
            let req: AddResource = cmd.json()?;
            let (state, version) = app.load_venue(venue_id).await?;
            let expected = cmd.check_version(version)?;
            let resource_id = ResourceId::mint();
            let events = venue::decide(
                state.as_ref(),
                VenueCommand::AddResource {
                    resource_id,
                    name: req.name,
                    capacity: req.capacity,
                },
            )?;
            Ok(Decision::single(
                venue_stream(venue_id),
                expected,
                &events,
                resource_id.0,
                StatusCode::CREATED,
            )
            .with("venue_id", serde_json::json!(venue_id)))
        }
    })
    .await
}
