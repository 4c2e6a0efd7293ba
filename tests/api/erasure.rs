//! GDPR: find a subject by email, export, erase by crypto-shredding; every read path then shows
//! the personal fields as null with `"erased": true`, and the log still verifies.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test]
async fn erasure_shreds_personal_data_everywhere_and_the_log_still_verifies() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let admin = app.token(Role::Admin);
    let email = unique_email();
    let b = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &email),
        )
        .await;
    assert_eq!(b.status, 201);
    let cancel = app
        .post(
            &format!("/v1/bookings/{}/cancel", b.id()),
            &staff,
            json!({"reason": "guest is unwell"}),
        )
        .await;
    assert_eq!(cancel.status, 200);
    let subject = b.body["subject_id"].as_str().unwrap_or_default().to_owned();

    // Search by email (in a body) and export, by the admin and by the customer themself.
    let found = app
        .post(
            "/v1/subjects/search",
            &admin,
            json!({"email": email.to_uppercase()}),
        )
        .await;
    assert_eq!(
        (found.status, found.body["subject_id"].as_str()),
        (200, Some(subject.as_str()))
    );
    let at = cancel.body["position"].as_i64().unwrap_or(0);
    let _ = get(
        &app,
        &format!("/v1/bookings/{}?min_position={at}", b.id()),
        &staff,
    )
    .await;
    let export = get(&app, &format!("/v1/subjects/{subject}/export"), &admin).await;
    assert_eq!(export.status, 200, "{export:?}");
    assert_eq!(export.body["erased"], false);
    assert_eq!(export.body["bookings"][0]["customer"]["email"], email);
    let me = app.token_with(Role::Customer, Uuid::parse_str(&subject).ok(), None);
    assert_eq!(
        get(&app, &format!("/v1/subjects/{subject}/export"), &me)
            .await
            .status,
        200
    );
    let someone = app.token_with(Role::Customer, Some(Uuid::new_v4()), None);
    assert_eq!(
        get(&app, &format!("/v1/subjects/{subject}/export"), &someone)
            .await
            .status,
        404
    );

    // Erase: a certificate; a second call answers the same one.
    assert_eq!(
        app.post(&format!("/v1/subjects/{subject}/erase"), &staff, json!({}))
            .await
            .status,
        403
    );
    let cert = app
        .post(&format!("/v1/subjects/{subject}/erase"), &admin, json!({}))
        .await;
    assert_eq!(cert.status, 200, "{cert:?}");
    assert_eq!(cert.body["subject_id"].as_str(), Some(subject.as_str()));
    assert_eq!(
        cert.body["events_covered"], 2,
        "the request and the cancel reason"
    );
    assert!(cert.body["key_fingerprint"]
        .as_str()
        .is_some_and(|f| f.len() == 32));
    assert!(cert.body["erased_at"].is_string());
    let again = app
        .post(&format!("/v1/subjects/{subject}/erase"), &admin, json!({}))
        .await;
    assert_eq!(again.body, cert.body);

    // Every read path: personal fields null, erased true; amounts, times, statuses stay.
    let erased_at = cert.body["position"].as_i64().unwrap_or(0);
    let detail = get(
        &app,
        &format!("/v1/bookings/{}?min_position={erased_at}", b.id()),
        &staff,
    )
    .await;
    assert_eq!(detail.body["customer"], Value::Null);
    assert_eq!(detail.body["notes"], Value::Null);
    assert_eq!(detail.body["erased"], true);
    assert_eq!(detail.body["status"], "cancelled");
    assert_eq!(detail.body["party_size"], 2);
    let board = get(&app, &format!("/v1/bookings?venue_id={venue}"), &staff).await;
    assert_eq!(board.body["items"][0]["erased"], true);
    let export = get(&app, &format!("/v1/subjects/{subject}/export"), &admin).await;
    assert_eq!(export.body["erased"], true);
    assert_eq!(export.body["bookings"][0]["customer"], Value::Null);
    assert_eq!(export.body["certificate"], cert.body);

    // The log is intact; the email no longer leads anywhere; the key row stays as a fence.
    let auditor = app.token(Role::Auditor);
    let verify = get(&app, "/v1/audit/verify", &auditor).await;
    assert_eq!(verify.body["intact"], true, "{verify:?}");
    let gone = app
        .post("/v1/subjects/search", &admin, json!({"email": email}))
        .await;
    assert_eq!((gone.status, gone.problem()), (404, "not-found"));
    let (wrapped, lookups): (Option<Vec<u8>>, i64) = sqlx::query_as(
        "SELECT wrapped_key, (SELECT count(*) FROM keystore.subject_lookup WHERE subject_id = k.subject_id) \
         FROM keystore.subject_keys k WHERE subject_id = $1::uuid",
    )
    .bind(&subject)
    .fetch_one(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((wrapped, lookups), (None, 0));

    // A returning customer gets a new subject, and their new booking is readable.
    let back = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &email),
        )
        .await;
    assert_eq!(back.status, 201, "{back:?}");
    assert_ne!(back.body["subject_id"].as_str(), Some(subject.as_str()));
    let at = back.body["position"].as_i64().unwrap_or(0);
    let fresh = get(
        &app,
        &format!("/v1/bookings/{}?min_position={at}", back.id()),
        &staff,
    )
    .await;
    assert_eq!(fresh.body["customer"]["email"], email);
    // The erased subject can no longer book through a customer token.
    let erased_customer = app.token_with(Role::Customer, Uuid::parse_str(&subject).ok(), None);
    let refused = app
        .post(
            "/v1/bookings",
            &erased_customer,
            booking_body(venue, table, 8, 9, &unique_email()),
        )
        .await;
    assert_eq!((refused.status, refused.problem()), (403, "forbidden"));
}

#[tokio::test]
async fn erasing_or_searching_the_unknown_is_404_and_bodies_are_checked() {
    let app = spawn_app().await;
    let admin = app.token(Role::Admin);
    let unknown = Uuid::new_v4();
    assert_eq!(
        app.post(&format!("/v1/subjects/{unknown}/erase"), &admin, json!({}))
            .await
            .status,
        404
    );
    assert_eq!(
        app.post(
            "/v1/subjects/search",
            &admin,
            json!({"email": unique_email()})
        )
        .await
        .status,
        404
    );
    let bad = app
        .post("/v1/subjects/search", &admin, json!({"mail": "x"}))
        .await;
    assert_eq!((bad.status, bad.problem()), (400, "validation"));
    assert_eq!(
        get(&app, &format!("/v1/subjects/{unknown}/export"), &admin)
            .await
            .status,
        404
    );
    let auditor = app.token(Role::Auditor);
    assert_eq!(
        app.post("/v1/subjects/search", &auditor, json!({"email": "a@b.co"}))
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn an_erasure_through_one_api_process_stops_the_other_showing_the_data_within_a_second() {
    let app = spawn_app().await;
    let other = app.second_api().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let admin = app.token(Role::Admin);
    let email = unique_email();
    let b = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &email),
        )
        .await;
    let at = b.body["position"].as_i64().unwrap_or(0);
    let read_other = || {
        app.send(
            app.client
                .get(format!("{other}/v1/bookings/{}?min_position={at}", b.id()))
                .bearer_auth(&staff.0),
        )
    };
    // The other process has opened (and cached) the subject's key.
    assert_eq!(read_other().await.body["customer"]["email"], email);
    let subject = b.body["subject_id"].as_str().unwrap_or_default().to_owned();
    let cert = app
        .post(&format!("/v1/subjects/{subject}/erase"), &admin, json!({}))
        .await;
    assert_eq!(cert.status, 200);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let seen = read_other().await;
        if seen.body["erased"] == true && seen.body["customer"] == Value::Null {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other process still shows the data: {seen:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bookings_racing_an_erasure_never_mint_a_new_key_for_the_erased_subject() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let admin = app.token(Role::Admin);
    let email = unique_email();
    let first = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 0, 1, &email),
        )
        .await;
    let subject = first.body["subject_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Bookings with the same email keep coming while the subject is erased.
    let racing = (1..13u32).map(|h| {
        let resource = if h % 2 == 0 { table } else { room };
        app.post(
            "/v1/bookings",
            &staff,
            booking_body(venue, resource, h, h + 1, &email),
        )
    });
    let erase_path = format!("/v1/subjects/{subject}/erase");
    let erase = app.post(&erase_path, &admin, json!({}));
    let (answers, cert) = tokio::join!(futures::future::join_all(racing), erase);
    assert_eq!(cert.status, 200);
    assert!(
        answers.iter().all(|a| a.status == 201 || a.status == 403),
        "{answers:?}"
    );
    // The erased subject's key row is a fence with no key, and stays one.
    let (wrapped,): (Option<Vec<u8>>,) =
        sqlx::query_as("SELECT wrapped_key FROM keystore.subject_keys WHERE subject_id = $1::uuid")
            .bind(&subject)
            .fetch_one(&app.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(wrapped, None);
    // Every booking committed after the erasure was decided again for a new subject: nothing was
    // sealed under the shredded key.
    let erased_at = cert.body["position"].as_i64().unwrap_or(i64::MAX);
    for a in answers.iter().filter(|a| a.status == 201) {
        if a.body["position"].as_i64().unwrap_or(0) > erased_at {
            assert_ne!(
                a.body["subject_id"].as_str(),
                Some(subject.as_str()),
                "{a:?}"
            );
        }
    }
    let sealed_after: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE global_position > $1 AND payload->'customer'->>'sub' = $2",
    )
    .bind(erased_at)
    .bind(&subject)
    .fetch_one(&app.pool)
    .await
    .unwrap_or(-1);
    assert_eq!(sealed_after, 0);
}

/// Erases through `base` and returns the answer's status and exact bytes.
async fn erase_bytes(app: &TestApp, base: &str, subject: &str, token: &Token) -> (u16, Vec<u8>) {
    let r = app
        .client
        .post(format!("{base}/v1/subjects/{subject}/erase"))
        .bearer_auth(&token.0)
        .json(&json!({}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("erase: {e}"));
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap_or_default().to_vec())
}

fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

#[tokio::test]
async fn the_erasure_certificate_is_signed_with_the_published_key_and_the_same_bytes_everywhere() {
    use ledger_events::checkpoint::{signing_key, verify_erasure_certificate};
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let admin = app.token(Role::Admin);
    let b = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &unique_email()),
        )
        .await;
    assert_eq!(b.status, 201, "{b:?}");
    let cancel = app
        .post(
            &format!("/v1/bookings/{}/cancel", b.id()),
            &staff,
            json!({"reason": "moved away"}),
        )
        .await;
    assert_eq!(cancel.status, 200, "{cancel:?}");
    let subject = b.body["subject_id"].as_str().unwrap_or_default().to_owned();

    let (status, bytes) = erase_bytes(&app, &app.base, &subject, &admin).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let cert: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert_eq!(
        bytes,
        ledger_events::chain::canonical_json(&cert),
        "answered as canonical JSON"
    );

    // Signed by the checkpoints' key, which the deployment publishes with every checkpoint.
    assert_eq!(verify_erasure_certificate(&cert), Ok(()), "{cert}");
    let master = ledger_events::pii::MasterKey::from_base64(&app.master_key)
        .unwrap_or_else(|e| panic!("{e}"));
    let expected_key = hex::encode(
        signing_key(&ledger_events::pii::Keyring::derive(&master).signing_seed())
            .verifying_key()
            .to_bytes(),
    );
    assert_eq!(cert["public_key"], expected_key);
    let auditor = app.token(Role::Auditor);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let published = loop {
        let cp = get(&app, "/v1/audit/checkpoints/latest", &auditor).await;
        if cp.status == 200 {
            break cp.body["public_key"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint: {cp:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(cert["public_key"], published, "the published key");

    // The contract's fields, and what it covers and does not.
    assert_eq!(cert["subject_id"].as_str(), Some(subject.as_str()));
    assert_eq!(cert["events_covered"], 2);
    assert!(cert["key_fingerprint"]
        .as_str()
        .is_some_and(|f| f.len() == 32));
    let erased_at = time(&cert["erased_at"]);
    assert!(
        cert["erased_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "UTC: {cert}"
    );
    let sealed: Vec<(i64, String)> = sqlx::query_as(
        "SELECT global_position, event_type FROM events WHERE stream_id = $1 \
         AND event_type IN ('BookingRequested', 'BookingCancelled') ORDER BY global_position",
    )
    .bind(format!("booking-{}", b.id()))
    .fetch_all(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let covered: Vec<(i64, String)> = cert["covers"]["sealed_events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["position"].as_i64().unwrap_or(0),
                        e["type"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(covered, sealed, "{cert}");
    assert_eq!(
        cert["covers"]["streams"],
        json!([format!("booking-{}", b.id())])
    );
    for list in [
        &cert["covers"]["personal_fields"],
        &cert["covers"]["sealed_copies"],
        &cert["covers"]["destroyed"],
        &cert["does_not_cover"],
    ] {
        assert!(list.as_array().is_some_and(|l| !l.is_empty()), "{cert}");
    }
    assert_eq!(cert["backup_retention_days"], 30, "the default retention");
    assert_eq!(
        time(&cert["backups_expire_at"]),
        erased_at + chrono::Duration::days(30)
    );

    // Any change to a signed field breaks the signature.
    for (field, value) in [
        ("events_covered", json!(1)),
        ("backups_expire_at", json!("2099-01-01T00:00:00.000000Z")),
        ("does_not_cover", json!([])),
        ("subject_id", json!(Uuid::new_v4())),
    ] {
        let mut tampered = cert.clone();
        tampered[field] = value;
        assert!(
            verify_erasure_certificate(&tampered).is_err(),
            "a changed {field} still verifies"
        );
    }

    // Again: the same bytes; from another process (configured with another retention, as after
    // a restart with new settings): the same bytes; in the export: the same certificate.
    assert_eq!(
        erase_bytes(&app, &app.base, &subject, &admin).await,
        (200, bytes.clone())
    );
    let other = app.second_api_with_retention(90).await;
    assert_eq!(
        erase_bytes(&app, &other, &subject, &admin).await,
        (200, bytes.clone())
    );
    let export = get(&app, &format!("/v1/subjects/{subject}/export"), &admin).await;
    assert_eq!(export.body["certificate"], cert);
}

#[tokio::test]
async fn the_certificate_states_the_retention_the_erasing_process_was_configured_with() {
    let app = spawn_app().await;
    let other = app.second_api_with_retention(7).await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let admin = app.token(Role::Admin);
    let b = app
        .post(
            "/v1/bookings",
            &staff,
            booking_body(venue, table, 18, 20, &unique_email()),
        )
        .await;
    let subject = b.body["subject_id"].as_str().unwrap_or_default().to_owned();
    let (status, bytes) = erase_bytes(&app, &other, &subject, &admin).await;
    assert_eq!(status, 200);
    let cert: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert_eq!(cert["backup_retention_days"], 7);
    assert_eq!(
        time(&cert["backups_expire_at"]),
        time(&cert["erased_at"]) + chrono::Duration::days(7)
    );
    assert_eq!(cert["events_covered"], 1);
    // The event holds the promise too.
    let erased = app.events_of("SubjectErased").await;
    assert_eq!(erased.len(), 1);
    assert_eq!(erased[0].1["backup_retention_days"], 7);
    // The first process answers the same bytes.
    assert_eq!(
        erase_bytes(&app, &app.base, &subject, &admin).await,
        (200, bytes)
    );
}

#[tokio::test]
async fn an_export_opens_every_personal_field_with_payments_and_the_log_for_admin_and_customer() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let admin = app.token(Role::Admin);
    let subject = Uuid::now_v7();
    let me = app.token_with(Role::Customer, Some(subject), None);
    let email = unique_email();
    let first = app
        .post(
            "/v1/bookings",
            &me,
            json!({
                "venue_id": venue, "resource_id": table,
                "starts_at": at(18), "ends_at": at(20), "party_size": 2,
                "customer": {"name": "Ada Export", "email": email, "phone": "+44 20 7946 0000"},
                "notes": "step-free access",
            }),
        )
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.body["subject_id"], json!(subject));
    let second = app
        .post(
            "/v1/bookings",
            &staff,
            json!({
                "venue_id": venue, "resource_id": room,
                "starts_at": at(12), "ends_at": at(13), "party_size": 5,
                "customer": {"name": "Ada Export", "email": email},
            }),
        )
        .await;
    assert_eq!(second.body["subject_id"], json!(subject), "{second:?}");
    let cancel = app
        .post(
            &format!("/v1/bookings/{}/cancel", second.id()),
            &me,
            json!({"reason": "flight cancelled"}),
        )
        .await;
    assert_eq!(cancel.status, 200, "{cancel:?}");
    let pay = app
        .post(
            &format!("/v1/bookings/{}/payments", first.id()),
            &staff,
            json!({"amount_minor": 5000, "currency": "EUR", "kind": "deposit"}),
        )
        .await;
    assert_eq!(pay.status, 201, "{pay:?}");
    let capture = app
        .post(
            &format!("/v1/payments/{}/capture", pay.id()),
            &staff,
            json!({"amount_minor": 3000}),
        )
        .await;
    assert_eq!(capture.status, 200, "{capture:?}");
    let refund = app
        .post(
            &format!("/v1/payments/{}/refund", pay.id()),
            &staff,
            json!({"amount_minor": 1000}),
        )
        .await;
    assert_eq!(refund.status, 200, "{refund:?}");

    // The export waits for the read side itself: no min_position needed.
    let export = get(&app, &format!("/v1/subjects/{subject}/export"), &admin).await;
    assert_eq!(export.status, 200, "{export:?}");
    let body = &export.body;
    assert_eq!(body["erased"], false);
    assert_eq!(body["certificate"], Value::Null);
    assert!(
        body["position"].as_i64() >= refund.body["position"].as_i64(),
        "{body}"
    );
    let bookings = body["bookings"].as_array().cloned().unwrap_or_default();
    assert_eq!(bookings.len(), 2, "{body}");
    let by_id = |id: Uuid| {
        bookings
            .iter()
            .find(|b| b["id"] == json!(id))
            .cloned()
            .unwrap_or_else(|| panic!("no booking {id} in {body}"))
    };
    let kept = by_id(first.id());
    assert_eq!(
        kept["customer"],
        json!({"name": "Ada Export", "email": email, "phone": "+44 20 7946 0000"})
    );
    assert_eq!(kept["notes"], "step-free access");
    assert_eq!(kept["cancel_reason"], Value::Null);
    assert_eq!(kept["status"], "pending");
    assert_eq!(kept["party_size"], 2);
    assert!(kept["requested_at"].is_string());
    assert_eq!(
        (kept["paid_minor"].as_i64(), kept["refunded_minor"].as_i64()),
        (Some(3000), Some(1000))
    );
    let payment = &kept["payments"][0];
    assert_eq!(payment["id"], json!(pay.id()));
    assert_eq!(payment["status"], "partially_refunded");
    assert_eq!(
        (
            payment["authorised_minor"].as_i64(),
            payment["captured_minor"].as_i64(),
            payment["refunded_minor"].as_i64()
        ),
        (Some(5000), Some(3000), Some(1000))
    );
    assert_eq!(
        (payment["currency"].as_str(), payment["kind"].as_str()),
        (Some("EUR"), Some("deposit"))
    );
    assert!(time(&payment["updated_at"]) >= time(&payment["authorised_at"]));
    let gone = by_id(second.id());
    assert_eq!(gone["status"], "cancelled");
    assert_eq!(gone["cancel_reason"], "flight cancelled");
    assert_eq!(gone["customer"]["phone"], Value::Null);
    assert_eq!(gone["notes"], Value::Null);
    assert_eq!(gone["payments"], json!([]));

    // What the log holds: every event of those streams, in log order, personal fields opened.
    let events = body["events"].as_array().cloned().unwrap_or_default();
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    for t in [
        "BookingRequested",
        "BookingCancelled",
        "PaymentAuthorized",
        "PaymentCaptured",
        "PaymentRefunded",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    assert_eq!(events.len(), 6, "{types:?}");
    let positions: Vec<i64> = events
        .iter()
        .filter_map(|e| e["position"].as_i64())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    let requested = events
        .iter()
        .find(|e| {
            e["type"] == "BookingRequested"
                && e["stream"] == json!(format!("booking-{}", first.id()))
        })
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(requested["data"]["customer"]["email"], email);
    assert_eq!(requested["data"]["customer"]["notes"], "step-free access");
    let cancelled = events
        .iter()
        .find(|e| e["type"] == "BookingCancelled")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(cancelled["data"]["reason"], "flight cancelled");
    assert!(
        !export.body.to_string().contains("\"ct\""),
        "no sealed envelope is left closed"
    );

    // The customer themself sees the same; anyone else does not.
    let own = get(&app, &format!("/v1/subjects/{subject}/export"), &me).await;
    assert_eq!(own.status, 200, "{own:?}");
    assert_eq!(own.body["bookings"], body["bookings"]);
    assert_eq!(own.body["events"], body["events"]);
    let stranger = app.token_with(Role::Customer, Some(Uuid::now_v7()), None);
    get(&app, &format!("/v1/subjects/{subject}/export"), &stranger)
        .await
        .assert_problem(404, "not-found");
    for role in [Role::Staff, Role::Manager, Role::Door, Role::Auditor] {
        get(
            &app,
            &format!("/v1/subjects/{subject}/export"),
            &app.token(role),
        )
        .await
        .assert_problem(403, "forbidden");
    }
    let venue_admin = app.token_with(Role::Admin, None, Some(vec![venue]));
    get(
        &app,
        &format!("/v1/subjects/{subject}/export"),
        &venue_admin,
    )
    .await
    .assert_problem(403, "forbidden");

    // Erased: the same shape, every personal field null; money, times and statuses stay.
    let (status, _) = erase_bytes(&app, &app.base, &subject.to_string(), &admin).await;
    assert_eq!(status, 200);
    for token in [&admin, &me] {
        let after = get(&app, &format!("/v1/subjects/{subject}/export"), token).await;
        assert_eq!(after.status, 200, "{after:?}");
        let a = &after.body;
        assert_eq!(a["erased"], true);
        assert_eq!(
            ledger_events::checkpoint::verify_erasure_certificate(&a["certificate"]),
            Ok(())
        );
        let bookings = a["bookings"].as_array().cloned().unwrap_or_default();
        assert_eq!(bookings.len(), 2);
        for b in &bookings {
            assert_eq!(b["erased"], true, "{b}");
            for field in ["customer", "notes", "cancel_reason"] {
                assert_eq!(b[field], Value::Null, "{field}: {b}");
            }
        }
        let kept = bookings
            .iter()
            .find(|b| b["id"] == json!(first.id()))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            kept["payments"],
            body["bookings"]
                .as_array()
                .and_then(|bs| bs.iter().find(|b| b["id"] == json!(first.id())))
                .map(|b| b["payments"].clone())
                .unwrap_or_default()
        );
        assert_eq!(kept["starts_at"], by_id(first.id())["starts_at"]);
        let events = a["events"].as_array().cloned().unwrap_or_default();
        assert_eq!(events.len(), 7, "and SubjectErased");
        for e in &events {
            match e["type"].as_str() {
                Some("BookingRequested") => assert_eq!(e["data"]["customer"], Value::Null),
                Some("BookingCancelled") => assert_eq!(e["data"]["reason"], Value::Null),
                _ => {}
            }
        }
        let text = a.to_string();
        for plain in [
            email.as_str(),
            "Ada Export",
            "step-free",
            "flight cancelled",
        ] {
            assert!(!text.contains(plain), "{plain} in the erased export");
        }
    }
}

#[tokio::test]
async fn a_bad_backup_retention_stops_the_server_with_exit_2_naming_the_variable() {
    for bad in ["0", "3651", "a month"] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
            .arg("serve")
            .env("DATABASE_URL", "postgres://127.0.0.1:1/none")
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env("LEDGER_JWT_SECRET", "x".repeat(40))
            .env(
                "LEDGER_MASTER_KEY",
                ledger_events::pii::MasterKey::generate().to_base64(),
            )
            .env("LEDGER_WEBHOOK_SECRET", "whsec")
            .env("LEDGER_BACKUP_RETENTION_DAYS", bad)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running ledger serve: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains("LEDGER_BACKUP_RETENTION_DAYS"),
            "{bad}: {stderr}"
        );
    }
}
