//! The audit endpoints (`/v1/audit/*`) and `ledger replay history|as-of`: the log read back as
//! recorded, for auditors and admins only.

use crate::helpers::*;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use ledger::http::auth::Role;
use serde_json::{json, Value};
use uuid::Uuid;

async fn get(app: &TestApp, path: &str, token: Option<&Token>, query: &[(&str, &str)]) -> Answer {
    let mut req = app.client.get(format!("{}{}", app.base, path)).query(query);
    if let Some(t) = token {
        req = req.bearer_auth(&t.0);
    }
    app.send(req).await
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A booking that was requested, confirmed and cancelled, and its stream's events as audited.
async fn confirmed_then_cancelled(app: &TestApp) -> (Uuid, Token, Vec<Value>) {
    let (_, _, booking, staff) = app.booked().await;
    let c = app.confirm(&staff, booking).await;
    assert_eq!(c.status, 200, "{c:?}");
    let x = app
        .post(&format!("/v1/bookings/{booking}/cancel"), &staff, json!({}))
        .await;
    assert_eq!(x.status, 200, "{x:?}");
    let auditor = app.token(Role::Auditor);
    let s = get(
        app,
        &format!("/v1/audit/streams/booking-{booking}"),
        Some(&auditor),
        &[],
    )
    .await;
    assert_eq!(s.status, 200, "{s:?}");
    let items = s.body["items"].as_array().cloned().unwrap_or_default();
    (booking, staff, items)
}

#[tokio::test]
async fn the_audit_log_pages_through_every_event_in_order_without_gaps() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let email = unique_email();
    let b = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &email),
        )
        .await;
    assert_eq!(b.status, 201, "{b:?}");
    assert_eq!(app.book(&staff, venue, room, 18, 20).await.status, 201);
    assert_eq!(app.confirm(&staff, b.id()).await.status, 200);
    let total = app.count_all_events().await;
    assert!(total >= 6, "{total}");

    let auditor = app.token(Role::Auditor);
    let mut positions = Vec::new();
    let mut after = "0".to_string();
    let mut pages = 0;
    loop {
        let page = get(
            &app,
            "/v1/audit/log",
            Some(&auditor),
            &[("after", &after), ("limit", "2")],
        )
        .await;
        assert_eq!(page.status, 200, "{page:?}");
        let items = page.body["items"].as_array().cloned().unwrap_or_default();
        assert!(items.len() <= 2, "{page:?}");
        for item in &items {
            positions.push(item["position"].as_i64().unwrap_or(-1));
            for field in [
                "event_id",
                "stream",
                "version",
                "type",
                "recorded_at",
                "data",
            ] {
                assert!(!item[field].is_null(), "{field} missing in {item}");
            }
            for field in [
                "actor",
                "role",
                "request_id",
                "causation_id",
                "correlation_id",
            ] {
                assert!(item["metadata"][field].is_string(), "{field}: {item}");
            }
            if item["type"] == "BookingRequested" {
                let data = item["data"].to_string();
                assert!(!data.contains(&email), "personal data in the clear: {data}");
                assert!(!data.contains("Grace Hopper"), "{data}");
                assert!(item["data"]["customer"]["ct"].is_string(), "{item}");
            }
        }
        pages += 1;
        match page.body["next_after"].as_i64() {
            Some(next) => after = next.to_string(),
            None => break,
        }
        assert!(pages < 100, "paging does not end");
    }
    let expected: Vec<i64> = (1..=total).collect();
    assert_eq!(positions, expected, "every position once, in order");

    // At the head: nothing more, and `next_after` says so.
    let tail = get(
        &app,
        "/v1/audit/log",
        Some(&auditor),
        &[("after", &total.to_string())],
    )
    .await;
    assert_eq!(tail.status, 200, "{tail:?}");
    assert_eq!(tail.body, json!({"items": [], "next_after": null}));
}

#[tokio::test]
async fn only_auditors_and_admins_read_the_audit_endpoints() {
    let app = spawn_app().await;
    let (_, _, booking, _) = app.booked().await;
    let paths = [
        "/v1/audit/log".to_string(),
        format!("/v1/audit/streams/booking-{booking}"),
        "/v1/audit/actions".to_string(),
    ];
    let at = rfc3339(Utc::now() + Duration::seconds(1));
    let as_of = format!("/v1/audit/bookings/{booking}/as-of");
    for role in [Role::Auditor, Role::Admin] {
        let token = app.token(role);
        for path in &paths {
            let a = get(&app, path, Some(&token), &[]).await;
            assert_eq!(a.status, 200, "{role:?} {path}: {a:?}");
        }
        let a = get(&app, &as_of, Some(&token), &[("at", &at)]).await;
        assert_eq!(a.status, 200, "{role:?}: {a:?}");
    }
    let customer = app.token_with(Role::Customer, Some(Uuid::now_v7()), None);
    let others = [
        app.token(Role::Staff),
        app.token(Role::Manager),
        app.token(Role::Door),
        customer,
        // The audit endpoints read the whole log, which a venue-scoped token must not.
        app.token_with(Role::Auditor, None, Some(vec![Uuid::now_v7()])),
    ];
    for token in &others {
        for path in &paths {
            get(&app, path, Some(token), &[])
                .await
                .assert_problem(403, "forbidden");
        }
        get(&app, &as_of, Some(token), &[("at", &at)])
            .await
            .assert_problem(403, "forbidden");
    }
    for path in &paths {
        get(&app, path, None, &[])
            .await
            .assert_problem(401, "unauthorized");
    }
}

#[tokio::test]
async fn a_booking_as_of_a_time_is_folded_from_its_events_up_to_then() {
    let app = spawn_app().await;
    let (booking, _, events) = confirmed_then_cancelled(&app).await;
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        ["BookingRequested", "BookingConfirmed", "BookingCancelled"]
    );
    let (requested, confirmed, cancelled) = (
        time(&events[0]["recorded_at"]),
        time(&events[1]["recorded_at"]),
        time(&events[2]["recorded_at"]),
    );
    assert!(requested <= confirmed && confirmed < cancelled);
    let auditor = app.token(Role::Auditor);
    let path = format!("/v1/audit/bookings/{booking}/as-of");
    let as_of = |t: DateTime<Utc>| {
        let (app, auditor, path) = (&app, &auditor, &path);
        async move { get(app, path, Some(auditor), &[("at", &rfc3339(t))]).await }
    };

    as_of(requested - Duration::microseconds(1))
        .await
        .assert_problem(404, "not-found");

    let pending = as_of(requested).await;
    assert_eq!(pending.status, 200, "{pending:?}");
    assert_eq!(pending.body["status"], "pending");
    assert_eq!(pending.body["version"], 1);

    // Anywhere between the confirmation and the cancellation: confirmed.
    let half = (cancelled - confirmed).num_microseconds().unwrap_or(0) / 2;
    let between = confirmed + Duration::microseconds(half);
    let a = as_of(between).await;
    assert_eq!(a.status, 200, "{a:?}");
    let request = &events[0]["data"];
    let expected = json!({
        "id": booking,
        "stream": format!("booking-{booking}"),
        "as_of": a.body["as_of"],
        "version": 2,
        "position": events[1]["position"],
        "status": "confirmed",
        "venue_id": request["venue_id"],
        "resource_id": request["resource_id"],
        "starts_at": a.body["starts_at"],
        "ends_at": a.body["ends_at"],
        "party_size": 2,
        "subject_id": request["subject_id"],
    });
    assert_eq!(a.body, expected);
    assert_eq!(time(&a.body["as_of"]), between);
    assert_eq!(time(&a.body["starts_at"]), time(&request["starts_at"]));
    assert!(a.body.get("customer").is_none(), "no personal data: {a:?}");

    let now = as_of(Utc::now()).await;
    assert_eq!(now.body["status"], "cancelled", "{now:?}");
    assert_eq!(now.body["version"], 3);

    // An offset other than Z is the same instant.
    let berlin = (between + Duration::hours(2))
        .format("%Y-%m-%dT%H:%M:%S%.6f+02:00")
        .to_string();
    let a = get(&app, &path, Some(&auditor), &[("at", &berlin)]).await;
    assert_eq!(a.body["status"], "confirmed", "{a:?}");

    // A booking that never existed, and an id that cannot name one.
    let at = rfc3339(Utc::now());
    for id in [Uuid::now_v7().to_string(), "not-a-uuid".into()] {
        get(
            &app,
            &format!("/v1/audit/bookings/{id}/as-of"),
            Some(&auditor),
            &[("at", &at)],
        )
        .await
        .assert_problem(404, "not-found");
    }
}

#[tokio::test]
async fn actions_show_who_did_what_accepted_and_refused() {
    let app = spawn_app().await;
    let (venue, table, booking, staff) = app.booked().await;
    let door = app.token(Role::Door);
    let refused = app
        .refused(app.book(&door, venue, table, 10, 12), 403, "forbidden")
        .await;
    let auditor = app.token(Role::Auditor);

    let staff_sub = app.sub_of(&staff);
    let mine = get(
        &app,
        "/v1/audit/actions",
        Some(&auditor),
        &[("actor", &staff_sub)],
    )
    .await;
    assert_eq!(mine.status, 200, "{mine:?}");
    let items = mine.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{mine:?}");
    let a = &items[0];
    assert_eq!(a["outcome"], "accepted");
    assert_eq!(a["actor"], staff_sub.as_str());
    assert_eq!(a["role"], "staff");
    assert_eq!(a["command"], "RequestBooking");
    let stream = format!("booking-{booking}");
    assert!(
        a["streams"]
            .as_array()
            .is_some_and(|s| s.contains(&json!(stream))),
        "{a}"
    );
    assert!(a["problem_type"].is_null(), "{a}");
    let positions = a["positions"].as_array().cloned().unwrap_or_default();
    assert!(!positions.is_empty(), "{a}");
    let (request_id, correlation_id): (String, String) = sqlx::query_as(
        "SELECT metadata->>'request_id', metadata->>'correlation_id' FROM events \
         WHERE stream_id = $1 AND stream_version = 1",
    )
    .bind(&stream)
    .fetch_one(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a["request_id"], request_id.as_str());
    assert_eq!(a["correlation_id"], correlation_id.as_str());
    assert!(a["recorded_at"].is_string(), "{a}");

    let door_sub = app.sub_of(&door);
    let theirs = get(
        &app,
        "/v1/audit/actions",
        Some(&auditor),
        &[("actor", &door_sub)],
    )
    .await;
    let items = theirs.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{theirs:?}");
    let r = &items[0];
    assert_eq!(r["outcome"], "refused");
    assert_eq!(r["actor"], door_sub.as_str());
    assert_eq!(r["role"], "door");
    assert_eq!(r["command"], "RequestBooking");
    assert_eq!(r["problem_type"], "forbidden");
    assert_eq!(r["status"], 403);
    assert_eq!(r["request_id"].as_str(), refused.header("x-request-id"));

    // Everyone: the admin's venue set-up, the staff's booking, the door's refusal, oldest first.
    let all = get(&app, "/v1/audit/actions", Some(&auditor), &[]).await;
    let items = all.body["items"].as_array().cloned().unwrap_or_default();
    let commands: Vec<(&str, &str)> = items
        .iter()
        .filter_map(|i| Some((i["command"].as_str()?, i["outcome"].as_str()?)))
        .collect();
    assert_eq!(
        commands,
        [
            ("RegisterVenue", "accepted"),
            ("AddResource", "accepted"),
            ("AddResource", "accepted"),
            ("RequestBooking", "accepted"),
            ("RequestBooking", "refused"),
        ],
        "{all:?}"
    );

    // A time window: nothing happened tomorrow; everything happened since an hour ago.
    let tomorrow = rfc3339(Utc::now() + Duration::days(1));
    let later = get(
        &app,
        "/v1/audit/actions",
        Some(&auditor),
        &[("from", &tomorrow)],
    )
    .await;
    assert_eq!(later.body["items"], json!([]), "{later:?}");
    let hour_ago = rfc3339(Utc::now() - Duration::hours(1));
    let recent = get(
        &app,
        "/v1/audit/actions",
        Some(&auditor),
        &[("from", &hour_ago), ("to", &tomorrow), ("actor", &door_sub)],
    )
    .await;
    assert_eq!(recent.body["items"].as_array().map(Vec::len), Some(1));

    // Paged one event at a time, every action still comes whole and once.
    let mut paged = Vec::new();
    let mut after = "0".to_string();
    for _ in 0..20 {
        let page = get(
            &app,
            "/v1/audit/actions",
            Some(&auditor),
            &[("after", &after), ("limit", "1")],
        )
        .await;
        assert_eq!(page.status, 200, "{page:?}");
        paged.extend(page.body["items"].as_array().cloned().unwrap_or_default());
        match page.body["next_after"].as_i64() {
            Some(n) => after = n.to_string(),
            None => break,
        }
    }
    assert_eq!(paged, items);
}

/// A request that must be refused: path, query and the field the problem names.
type BadRequest<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

#[tokio::test]
async fn unknown_streams_and_bad_parameters_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let (_, _, booking, _) = app.booked().await;
    let auditor = app.token(Role::Auditor);
    for stream in [format!("booking-{}", Uuid::now_v7()), "nonsense".into()] {
        get(
            &app,
            &format!("/v1/audit/streams/{stream}"),
            Some(&auditor),
            &[],
        )
        .await
        .assert_problem(404, "not-found");
    }
    let as_of = format!("/v1/audit/bookings/{booking}/as-of");
    let cases: Vec<BadRequest> = vec![
        (as_of.as_str(), vec![], "at"),
        (as_of.as_str(), vec![("at", "yesterday")], "at"),
        (as_of.as_str(), vec![("at", "2030-06-01")], "at"),
        (as_of.as_str(), vec![("at", "2030-06-01T18:00:00")], "at"),
        ("/v1/audit/log", vec![("limit", "0")], "limit"),
        ("/v1/audit/log", vec![("limit", "1001")], "limit"),
        ("/v1/audit/log", vec![("limit", "ten")], "limit"),
        ("/v1/audit/log", vec![("after", "-1")], "after"),
        ("/v1/audit/log", vec![("after", "first")], "after"),
        ("/v1/audit/actions", vec![("from", "monday")], "from"),
        (
            "/v1/audit/actions",
            vec![("to", "2030-13-01T00:00:00Z")],
            "to",
        ),
        (
            "/v1/audit/actions",
            vec![
                ("from", "2030-06-02T00:00:00Z"),
                ("to", "2030-06-01T00:00:00Z"),
            ],
            "to",
        ),
        ("/v1/audit/actions", vec![("limit", "5000")], "limit"),
        ("/v1/audit/actions", vec![("after", "x")], "after"),
    ];
    for (path, query, field) in cases {
        let a = get(&app, path, Some(&auditor), &query).await;
        a.assert_problem(400, "validation");
        assert_eq!(a.field(), field, "{path} {query:?}: {a:?}");
    }
    // The largest page is allowed.
    let a = get(&app, "/v1/audit/log", Some(&auditor), &[("limit", "1000")]).await;
    assert_eq!(a.status, 200, "{a:?}");
}

/// Runs the `ledger` binary against the test's database; (status, stdout, stderr).
async fn ledger(app: &TestApp, args: &[&str]) -> (Option<i32>, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let url = app.database_url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(&args)
            .env("DATABASE_URL", url)
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("running ledger: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_prints_a_streams_history_and_its_state_as_of_a_time() {
    let app = spawn_app().await;
    let (booking, _, events) = confirmed_then_cancelled(&app).await;
    let stream = format!("booking-{booking}");

    let (code, out, err) = ledger(&app, &["replay", "history", "--stream", &stream]).await;
    assert_eq!(code, Some(0), "{err}");
    let history: Vec<Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(history.len(), events.len());
    assert_eq!(
        history, events,
        "the CLI shows what the audit endpoint shows"
    );

    let (code, out, err) = ledger(
        &app,
        &["replay", "history", "--stream", &stream, "--format", "csv"],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), events.len() + 1, "{out}");
    assert_eq!(
        lines[0],
        "position,event_id,stream,version,type,recorded_at,actor,role,command,request_id"
    );
    assert!(lines[2].contains(",BookingConfirmed,"), "{out}");
    assert!(lines[2].contains(",ConfirmBooking,"), "{out}");
    assert!(!out.contains("\"ct\""), "no payload in csv: {out}");

    let confirmed = time(&events[1]["recorded_at"]);
    let (code, out, err) = ledger(
        &app,
        &[
            "replay",
            "as-of",
            "--stream",
            &stream,
            "--at",
            &rfc3339(confirmed),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let state: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(state["status"], "confirmed", "{state}");
    assert_eq!(state["version"], 2);
    assert_eq!(state["id"], json!(booking));

    // Before the booking existed; a stream with no state to fold; a stream with no events.
    let before = rfc3339(time(&events[0]["recorded_at"]) - Duration::seconds(1));
    let (code, _, err) = ledger(
        &app,
        &["replay", "as-of", "--stream", &stream, "--at", &before],
    )
    .await;
    assert_eq!(code, Some(1), "{err}");
    let (code, _, err) = ledger(
        &app,
        &[
            "replay",
            "as-of",
            "--stream",
            "audit-20300601",
            "--at",
            &before,
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("audit-20300601"), "{err}");
    let unknown = format!("booking-{}", Uuid::now_v7());
    let (code, _, err) = ledger(&app, &["replay", "history", "--stream", &unknown]).await;
    assert_eq!(code, Some(1), "{err}");

    // A venue stream folds with the venue's evolve: as of now it has its two resources.
    let venue = events[0]["data"]["venue_id"].as_str().unwrap_or_default();
    let now = rfc3339(Utc::now());
    let (code, out, err) = ledger(
        &app,
        &[
            "replay",
            "as-of",
            "--stream",
            &format!("venue-{venue}"),
            "--at",
            &now,
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let state: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        state["resources"].as_array().map(Vec::len),
        Some(2),
        "{state}"
    );
}

#[tokio::test]
async fn a_command_of_several_events_is_one_action_even_across_a_page_end() {
    use ledger::store::append::{AppendRequest, StreamAppend};
    use ledger_events::envelope::{ExpectedVersion, Metadata, NewEvent};
    let app = spawn_app().await;
    // Nothing the API serves appends several events for one command yet; the log allows it, so
    // the audit must read it right: append one such command directly.
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let event = |venue: Uuid| NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "VenueRegistered",
        schema_version: 1,
        payload: json!({"venue_id": venue, "name": "Imported", "timezone": "UTC"}),
    };
    let request_id = Uuid::now_v7();
    let (appender, writer) = app.writer();
    appender
        .append(AppendRequest {
            streams: vec![
                StreamAppend {
                    stream_id: format!("venue-{a}"),
                    expected: ExpectedVersion::NoStream,
                    events: vec![event(a)],
                },
                StreamAppend {
                    stream_id: format!("venue-{b}"),
                    expected: ExpectedVersion::NoStream,
                    events: vec![event(b)],
                },
            ],
            metadata: Metadata {
                actor: "importer".into(),
                role: "admin".into(),
                command: "ImportVenues".into(),
                request_id,
                correlation_id: request_id,
                causation_id: request_id,
            },
            slot: None,
            idempotency: None,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(appender);
    let _ = writer.await;

    let auditor = app.token(Role::Auditor);
    let page = get(
        &app,
        "/v1/audit/actions",
        Some(&auditor),
        &[("actor", "importer"), ("limit", "1")],
    )
    .await;
    assert_eq!(page.status, 200, "{page:?}");
    let items = page.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{page:?}");
    assert_eq!(items[0]["command"], "ImportVenues");
    assert_eq!(
        items[0]["streams"],
        json!([format!("venue-{a}"), format!("venue-{b}")])
    );
    let positions = items[0]["positions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(positions.len(), 2, "{page:?}");
    assert_eq!(page.body["next_after"], positions[1]);
    let after = positions[1].to_string();
    let rest = get(
        &app,
        "/v1/audit/actions",
        Some(&auditor),
        &[("actor", "importer"), ("after", &after)],
    )
    .await;
    assert_eq!(rest.body, json!({"items": [], "next_after": null}));
}

/// Hex hashes from a proof answer.
fn hashes(v: &Value) -> Vec<[u8; 32]> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|h| hash(h.as_str().unwrap_or_default()))
        .collect()
}

fn hash(hex_str: &str) -> [u8; 32] {
    hex::decode(hex_str)
        .ok()
        .and_then(|b| b.try_into().ok())
        .unwrap_or_else(|| panic!("not a hash: {hex_str}"))
}

/// The ledger signs a checkpoint of the log as it is now (what it does every minute and after
/// each erasure), and the auditor fetches it from the API.
async fn signed_checkpoint(
    app: &TestApp,
    auditor: &Token,
) -> ledger_events::checkpoint::Checkpoint {
    let master = ledger_events::pii::MasterKey::from_base64(&app.master_key)
        .unwrap_or_else(|e| panic!("{e}"));
    let seed = ledger_events::pii::Keyring::derive(&master).signing_seed();
    ledger_replay::checkpoint::create(&app.pool, &seed)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let latest = get(app, "/v1/audit/checkpoints/latest", Some(auditor), &[]).await;
    assert_eq!(latest.status, 200, "{latest:?}");
    serde_json::from_value(latest.body).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn an_auditor_checks_the_logs_growth_offline_from_two_signed_checkpoints_and_a_proof() {
    use ledger_events::chain::{leaf_hash, verify_consistency, verify_inclusion, HashedRow};
    let app = spawn_app().await;
    let auditor = app.token(Role::Auditor);
    let (_, _, booking, staff) = app.booked().await;
    let old = signed_checkpoint(&app, &auditor).await;

    // The log grows.
    assert_eq!(app.confirm(&staff, booking).await.status, 200);
    app.venue().await;
    let new = signed_checkpoint(&app, &auditor).await;
    assert!(new.size > old.size, "{} then {}", old.size, new.size);

    // What the auditor holds: two checkpoints, signed by the key they pinned.
    assert_eq!(old.verify_signature(), Ok(()));
    assert_eq!(new.verify_signature(), Ok(()));
    assert_eq!(old.public_key, new.public_key);
    let (m, n) = (old.size.to_string(), new.size.to_string());
    let proof = get(
        &app,
        "/v1/audit/proofs/consistency",
        Some(&auditor),
        &[("first", &m), ("second", &n)],
    )
    .await;
    assert_eq!(proof.status, 200, "{proof:?}");
    assert_eq!(
        (proof.body["first"].as_i64(), proof.body["second"].as_i64()),
        (Some(old.size), Some(new.size))
    );
    let path = hashes(&proof.body["consistency_path"]);
    let (m, n) = (old.size as u64, new.size as u64);
    let (old_root, new_root) = (hash(&old.merkle_root), hash(&new.merkle_root));
    // Offline, with the events crate alone: the old log is a prefix of the new one.
    assert_eq!(
        verify_consistency(m, n, &old_root, &new_root, &path),
        Ok(())
    );
    // And the proof is worth something: any change to it, or a root from elsewhere, fails.
    for i in 0..path.len() {
        let mut bad = path.clone();
        bad[i][31] ^= 1;
        assert!(verify_consistency(m, n, &old_root, &new_root, &bad).is_err());
    }
    assert!(verify_consistency(m, n, &new_root, &old_root, &path).is_err());

    // One event the new checkpoint added, read from the audit log: the auditor recomputes its
    // leaf hash from what the API showed and checks it is in the signed tree.
    let after = old.size.to_string();
    let page = get(
        &app,
        "/v1/audit/log",
        Some(&auditor),
        &[("after", &after), ("limit", "1")],
    )
    .await;
    let event = &page.body["items"][0];
    let position = event["position"].as_i64().unwrap_or(0);
    assert_eq!(position, old.size + 1);
    let recorded_at = time(&event["recorded_at"]);
    let leaf = leaf_hash(&HashedRow {
        global_position: position,
        event_id: event["event_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_default(),
        stream_id: event["stream"].as_str().unwrap_or_default(),
        stream_version: event["version"].as_i64().unwrap_or(0),
        event_type: event["type"].as_str().unwrap_or_default(),
        schema_version: event["schema_version"]
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .unwrap_or(0),
        payload: &event["data"],
        metadata: &event["metadata"],
        recorded_at,
    });
    let inclusion = get(
        &app,
        "/v1/audit/proofs/inclusion",
        Some(&auditor),
        &[
            ("position", &position.to_string()),
            ("tree_size", &new.size.to_string()),
        ],
    )
    .await;
    assert_eq!(inclusion.status, 200, "{inclusion:?}");
    assert_eq!(inclusion.body["leaf_index"], position - 1);
    assert_eq!(inclusion.body["leaf_hash"], hex::encode(leaf));
    let audit_path = hashes(&inclusion.body["inclusion_path"]);
    let index = (position - 1) as u64;
    assert_eq!(
        verify_inclusion(index, n, &leaf, &audit_path, &new_root),
        Ok(())
    );
    // It is not in the old tree, and another event's hash does not pass for it.
    assert!(verify_inclusion(index, n, &leaf, &audit_path, &old_root).is_err());
    let mut other = leaf;
    other[0] ^= 1;
    assert!(verify_inclusion(index, n, &other, &audit_path, &new_root).is_err());
}

#[tokio::test]
async fn proof_parameters_are_checked_and_named() {
    let app = spawn_app().await;
    app.venue().await; // 3 events
    let auditor = app.token(Role::Auditor);
    let consistency = |q: &'static [(&'static str, &'static str)]| {
        let (app, auditor) = (&app, &auditor);
        async move { get(app, "/v1/audit/proofs/consistency", Some(auditor), q).await }
    };
    let inclusion = |q: &'static [(&'static str, &'static str)]| {
        let (app, auditor) = (&app, &auditor);
        async move { get(app, "/v1/audit/proofs/inclusion", Some(auditor), q).await }
    };
    // Equal sizes: the empty proof. Up to the head: fine.
    let same = consistency(&[("first", "3"), ("second", "3")]).await;
    assert_eq!(same.status, 200, "{same:?}");
    assert_eq!(same.body["consistency_path"], json!([]));
    let ok = consistency(&[("first", "1"), ("second", "3")]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        ok.body["consistency_path"].as_array().map(Vec::len),
        Some(2)
    );
    let ok = inclusion(&[("position", "3"), ("tree_size", "3")]).await;
    assert_eq!(ok.status, 200, "{ok:?}");

    for (query, field) in [
        (&[("second", "3")][..], "first"),
        (&[("first", "1")][..], "second"),
        (&[("first", "abc"), ("second", "3")][..], "first"),
        (&[("first", "1"), ("second", "3.0")][..], "second"),
        (&[("first", "0"), ("second", "3")][..], "first"),
        (&[("first", "-1"), ("second", "3")][..], "first"),
        (&[("first", "3"), ("second", "2")][..], "first"),
        (
            &[("first", "1"), ("first", "2"), ("second", "3")][..],
            "first",
        ),
        (
            &[("first", "1"), ("second", "99999999999999999999")][..],
            "second",
        ),
    ] {
        let a = get(&app, "/v1/audit/proofs/consistency", Some(&auditor), query).await;
        a.assert_problem(400, "validation");
        assert_eq!(a.field(), field, "{query:?}: {a:?}");
    }
    for (query, field) in [
        (&[("tree_size", "3")][..], "position"),
        (&[("position", "1")][..], "tree_size"),
        (&[("position", "0"), ("tree_size", "3")][..], "position"),
        (&[("position", "x"), ("tree_size", "3")][..], "position"),
        (&[("position", "2"), ("tree_size", "1")][..], "position"),
        (&[("position", "1"), ("tree_size", "")][..], "tree_size"),
    ] {
        let a = get(&app, "/v1/audit/proofs/inclusion", Some(&auditor), query).await;
        a.assert_problem(400, "validation");
        assert_eq!(a.field(), field, "{query:?}: {a:?}");
    }
    // A tree the log does not have (yet).
    consistency(&[("first", "1"), ("second", "4")])
        .await
        .assert_problem(404, "not-found");
    inclusion(&[("position", "1"), ("tree_size", "4")])
        .await
        .assert_problem(404, "not-found");
    inclusion(&[("position", "4"), ("tree_size", "4")])
        .await
        .assert_problem(404, "not-found");

    // The audit API's role rules: auditors and admins with a whole-ledger token.
    let admin = app.token(Role::Admin);
    let venue_auditor = app.token_with(Role::Auditor, None, Some(vec![Uuid::now_v7()]));
    let paths: [(&str, &[(&str, &str)]); 4] = [
        (
            "/v1/audit/proofs/consistency",
            &[("first", "1"), ("second", "2")],
        ),
        (
            "/v1/audit/proofs/inclusion",
            &[("position", "1"), ("tree_size", "2")],
        ),
        ("/v1/audit/verify", &[]),
        ("/v1/audit/checkpoints/latest", &[]),
    ];
    for (path, query) in paths {
        if path != "/v1/audit/checkpoints/latest" {
            let a = get(&app, path, Some(&admin), query).await;
            assert_eq!(a.status, 200, "{path}: {a:?}");
        }
        for token in [
            &app.token(Role::Staff),
            &app.token(Role::Manager),
            &venue_auditor,
        ] {
            get(&app, path, Some(token), query)
                .await
                .assert_problem(403, "forbidden");
        }
        get(&app, path, None, query)
            .await
            .assert_problem(401, "unauthorized");
    }
}
