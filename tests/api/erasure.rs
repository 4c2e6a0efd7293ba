//! GDPR: find a subject by email, export, erase by crypto-shredding; every read path then shows
//! the personal fields as null with `"erased": true`, and the log still verifies.

use crate::helpers::*;
use ledger::http::auth::Role;
use serde_json::{json, Value};
use uuid::Uuid;

async fn get(app: &TestApp, path: &str, token: &Token) -> Answer {
    app.send(
        app.client
            .get(format!("{}{path}", app.base))
            .bearer_auth(&token.0),
    )
    .await
}

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
