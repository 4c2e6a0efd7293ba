//! `spawn_app()`: a real ledger on 127.0.0.1:0 over its own fresh Postgres database.

use ledger::app::Application;
use ledger::config::Settings;
use ledger::http::auth::{Claims, JwtKeys, Role};
use ledger_events::pii::MasterKey;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    pub jwt: JwtKeys,
    pub webhook_secret: Vec<u8>,
    /// Read by `tests/pii.rs` (pg_dump), which shares this file.
    #[allow(dead_code)]
    pub database_url: String,
    #[allow(dead_code)]
    pub db_name: String,
    /// This test's own JetStream stream, which its relay and projection workers use.
    #[allow(dead_code)]
    pub stream: String,
    #[allow(dead_code)]
    pub relay: ledger::relay::RelayConfig,
    /// The app's master key (base64), so a test can start a second API process over the same data.
    #[allow(dead_code)]
    pub master_key: String,
    #[allow(dead_code)]
    pub jwt_secret: Vec<u8>,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Test streams live on the shared dev nats-server: remove this one. Drop cannot await, so
        // a short-lived thread with its own runtime does it.
        let (stream, url) = (
            self.stream.clone(),
            std::env::var("NATS_URL").unwrap_or_default(),
        );
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let delete = async {
                    if let Ok(client) = async_nats::connect(&url).await {
                        let _ = async_nats::jetstream::new(client)
                            .delete_stream(&stream)
                            .await;
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), delete).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// The superuser URL the test command exports; each test makes its own database from it.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!("DATABASE_URL is not set: run the tests with ./dev.sh test (it starts Postgres)")
    })
}

pub fn with_database(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && i > url.find("://").unwrap_or(0) + 2 => {
            let (base, rest) = url.split_at(i);
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{base}/{db}{query}")
        }
        _ => format!("{url}/{db}"),
    }
}

impl TestApp {
    /// A second API server over the same database and keys, as another process of the same
    /// deployment would be: its own pool, key cache and listeners. Returns its base URL.
    #[allow(dead_code)]
    pub async fn second_api(&self) -> String {
        self.second_api_with_retention(ledger::store::vault::DEFAULT_BACKUP_RETENTION_DAYS)
            .await
    }

    /// [`Self::second_api`] configured with another `LEDGER_BACKUP_RETENTION_DAYS`.
    #[allow(dead_code)]
    pub async fn second_api_with_retention(&self, backup_retention_days: u32) -> String {
        self.second_api_with(|s| s.backup_retention_days = backup_retention_days)
            .await
    }

    /// [`Self::second_api`] with its settings adjusted by `adjust`.
    #[allow(dead_code)]
    pub async fn second_api_with(&self, adjust: impl FnOnce(&mut Settings)) -> String {
        let pool = ledger::app::connect_waiting(&self.database_url, 8, DATABASE_WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let mut settings = Settings {
            database_url: self.database_url.clone(),
            nats_url: "nats://127.0.0.1:1".into(),
            nats_stream: self.stream.clone(),
            nats_subjects: "ledger.events".into(),
            listen: "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
            jwt_secret: self.jwt_secret.clone(),
            master_key: MasterKey::from_base64(&self.master_key).unwrap_or_else(|e| panic!("{e}")),
            webhook_secret: self.webhook_secret.clone(),
            backup_retention_days: ledger::store::vault::DEFAULT_BACKUP_RETENTION_DAYS,
            idempotency_retention: Default::default(),
            database_wait: DATABASE_WAIT,
        };
        adjust(&mut settings);
        let app = Application::with_parts(pool, None, &settings)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let addr = app.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(app.run(self.shutdown.clone()));
        format!("http://{addr}")
    }
}

pub async fn spawn_app() -> TestApp {
    spawn(true, &[]).await
}

/// [`spawn_app`] over a database with these settings (`ALTER DATABASE … SET name = value`, as the
/// superuser), made before anything connects to it, so every session of the app has them.
#[allow(dead_code)]
pub async fn spawn_app_with_database_settings(settings: &[(&str, &str)]) -> TestApp {
    spawn(true, settings).await
}

/// The API alone: the test runs the relay and projection workers itself (e.g. as processes).
#[allow(dead_code)]
pub async fn spawn_api_only() -> TestApp {
    spawn(false, &[]).await
}

async fn spawn(read_side: bool, database_settings: &[(&str, &str)]) -> TestApp {
    spawn_with(Spawn {
        read_side,
        database_settings: database_settings
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        ..Spawn::default()
    })
    .await
}

/// How [`spawn_with`] builds a test app.
#[derive(Default)]
pub struct Spawn {
    /// The superuser URL the test database is created from; `DATABASE_URL` when `None`.
    pub admin: Option<String>,
    /// Run the relay and projection workers in-process.
    pub read_side: bool,
    /// Give the API a NATS client (readiness checks it), on `NATS_URL`.
    pub nats: bool,
    /// A port on 127.0.0.1 the app itself connects to Postgres through (e.g. a proxy's); the
    /// test's own pool (`TestApp::pool`) always connects directly.
    pub app_port: Option<u16>,
    /// `ALTER DATABASE … SET name = value` (as the superuser) before anything connects.
    pub database_settings: Vec<(String, String)>,
    /// The idempotency records' retention and purge period; the production defaults when `None`.
    pub idempotency_retention: Option<ledger::store::purge::Retention>,
}

/// `GET path` on the app as `token`.
#[allow(dead_code)]
pub async fn get(app: &TestApp, path: &str, token: &Token) -> Answer {
    app.send(
        app.client
            .get(format!("{}{path}", app.base))
            .bearer_auth(&token.0),
    )
    .await
}

/// The apps' `LEDGER_DATABASE_WAIT_SECONDS`: the default.
pub const DATABASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// `url` with its host and port replaced by 127.0.0.1:`port`.
fn via_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let user = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{user}127.0.0.1:{port}/{path}")
}

pub async fn spawn_with(spawn: Spawn) -> TestApp {
    let admin = spawn.admin.clone().unwrap_or_else(admin_url);
    let read_side = spawn.read_side;
    let db_name = format!("ledger_test_{}", Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot reach Postgres at {admin}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {db_name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("create database: {e}"));
    for (name, value) in &spawn.database_settings {
        sqlx::query(&format!("ALTER DATABASE {db_name} SET {name} = '{value}'"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("ALTER DATABASE … SET {name}: {e}"));
    }
    let database_url = with_database(&admin, &db_name);
    let pool = ledger::app::connect(&database_url, 16)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    ledger::app::migrate(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    // The app's own pool, as `serve` makes it: a request waits `DATABASE_WAIT` for a connection.
    let app_url = match spawn.app_port {
        Some(port) => via_port(&database_url, port),
        None => database_url.clone(),
    };
    let (test_pool, pool) = (
        pool,
        ledger::app::connect_waiting(&app_url, 16, DATABASE_WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}")),
    );
    let jwt_secret: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    let webhook_secret: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
    let master_key = MasterKey::generate().to_base64();
    // The read side, on this test's own stream and subjects of the shared nats-server.
    let id = Uuid::new_v4().simple().to_string();
    let relay_config = ledger::relay::RelayConfig {
        stream: format!("LEDGER_TEST_{id}"),
        subject_prefix: format!("test{id}.events"),
        batch: 512,
    };
    let settings = Settings {
        // The URL of the app's pool, as `serve` has it: the append writer connects there too.
        database_url: app_url.clone(),
        nats_url: "nats://127.0.0.1:1".into(),
        nats_stream: relay_config.stream.clone(),
        nats_subjects: "ledger.events".into(),
        listen: "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
        jwt_secret: jwt_secret.clone(),
        master_key: MasterKey::from_base64(&master_key).unwrap_or_else(|e| panic!("{e}")),
        webhook_secret: webhook_secret.clone(),
        backup_retention_days: ledger::store::vault::DEFAULT_BACKUP_RETENTION_DAYS,
        idempotency_retention: spawn.idempotency_retention.unwrap_or_default(),
        database_wait: DATABASE_WAIT,
    };
    let nats_url = std::env::var("NATS_URL")
        .unwrap_or_else(|_| panic!("NATS_URL is not set: run the tests with ./dev.sh test"));
    let connect = || async {
        async_nats::connect(&nats_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach nats-server at NATS_URL: {e}"))
    };
    let api_nats = match spawn.nats {
        true => Some(connect().await),
        false => None,
    };
    let app = Application::with_parts(pool.clone(), api_nats, &settings)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let addr = app.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    if read_side {
        let relay = ledger::relay::Relay::new(pool.clone(), connect().await, relay_config.clone());
        relay
            .ensure_stream()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(relay.run(shutdown.clone()));
        let worker = ledger_projections::worker::Worker::new(
            pool.clone(),
            connect().await,
            &relay_config.stream,
            ledger_projections::booking_board::NAME,
        );
        tokio::spawn(worker.run(shutdown.clone()));
        let stats_worker = ledger_projections::worker::Worker::new(
            pool.clone(),
            connect().await,
            &relay_config.stream,
            ledger_projections::daily_stats::NAME,
        );
        tokio::spawn(stats_worker.run(shutdown.clone()));
    }
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        pool: test_pool,
        jwt: JwtKeys::new(&jwt_secret),
        webhook_secret,
        database_url,
        db_name,
        stream: relay_config.stream.clone(),
        relay: relay_config,
        master_key,
        jwt_secret: jwt_secret.clone(),
        shutdown,
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The problem type's slug, checking the media type on the way.
    pub fn problem(&self) -> &str {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        self.body["type"]
            .as_str()
            .and_then(|t| t.rsplit('/').next())
            .unwrap_or("")
    }

    pub fn id(&self) -> Uuid {
        self.body["id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_else(|| panic!("no id in {self:?}"))
    }
}

pub struct Token(pub String);

impl TestApp {
    pub fn token_with(
        &self,
        role: Role,
        subject: Option<Uuid>,
        venues: Option<Vec<Uuid>>,
    ) -> Token {
        let claims = Claims {
            sub: format!("{}-{}", role_name(role), Uuid::new_v4().simple()),
            role,
            exp: chrono::Utc::now().timestamp() + 600,
            iat: None,
            subject,
            venues,
        };
        Token(self.jwt.sign(&claims).unwrap_or_else(|e| panic!("{e}")))
    }

    pub fn token(&self, role: Role) -> Token {
        self.token_with(role, None, None)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("request failed: {e}"));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn post(&self, path: &str, token: &Token, body: Value) -> Answer {
        self.send(
            self.client
                .post(format!("{}{}", self.base, path))
                .bearer_auth(&token.0)
                .json(&body),
        )
        .await
    }

    pub async fn post_with(
        &self,
        path: &str,
        token: &Token,
        body: Value,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = self
            .client
            .post(format!("{}{}", self.base, path))
            .bearer_auth(&token.0)
            .json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    /// A venue (Europe/Berlin) with a table for 4 and a room for 10: (venue, table, room).
    pub async fn venue(&self) -> (Uuid, Uuid, Uuid) {
        let admin = self.token(Role::Admin);
        let v = self
            .post(
                "/v1/venues",
                &admin,
                json!({"name": "Chez Test", "timezone": "Europe/Berlin"}),
            )
            .await;
        assert_eq!(v.status, 201, "{v:?}");
        let venue = v.id();
        let t = self
            .post(
                &format!("/v1/venues/{venue}/resources"),
                &admin,
                json!({"name": "Table 1", "capacity": 4}),
            )
            .await;
        assert_eq!(t.status, 201, "{t:?}");
        let r = self
            .post(
                &format!("/v1/venues/{venue}/resources"),
                &admin,
                json!({"name": "Room", "capacity": 10}),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        (venue, t.id(), r.id())
    }

    /// Books `resource` from `start` to `end` (hours on 2030-06-01 UTC) for a fresh customer.
    pub async fn book(
        &self,
        token: &Token,
        venue: Uuid,
        resource: Uuid,
        start: u32,
        end: u32,
    ) -> Answer {
        self.post(
            "/v1/bookings",
            token,
            booking_body(venue, resource, start, end, &unique_email()),
        )
        .await
    }

    pub async fn count_events(&self, event_type: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
            .bind(event_type)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }

    /// A second append writer on this test's database, beside the app's own (as a second
    /// process would have).
    #[allow(dead_code)]
    pub fn writer(&self) -> (ledger::store::append::Appender, tokio::task::JoinHandle<()>) {
        ledger::store::append::Appender::spawn(self.pool.clone(), &self.database_url)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn count_all_events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }

    /// Events that are not `CommandAudited`: what a refused command must never add to.
    pub async fn count_domain_events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type <> 'CommandAudited'")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }
}

pub fn role_name(role: Role) -> &'static str {
    role.as_str()
}

pub fn unique_email() -> String {
    format!("guest-{}@example.org", Uuid::new_v4().simple())
}

pub fn at(hour: u32) -> String {
    format!("2030-06-01T{hour:02}:00:00Z")
}

pub fn booking_body(venue: Uuid, resource: Uuid, start: u32, end: u32, email: &str) -> Value {
    json!({
        "venue_id": venue,
        "resource_id": resource,
        "starts_at": at(start),
        "ends_at": at(end),
        "party_size": 2,
        "customer": {"name": "Grace Hopper", "email": email, "phone": "+1 555 0100"},
        "notes": "window seat"
    })
}

impl Answer {
    /// Asserts a problem answer: status, `application/problem+json` and the slug of its `type`.
    pub fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!((self.status, self.problem()), (status, slug), "{self:?}");
        assert_eq!(self.body["status"], status, "problem body status: {self:?}");
        assert!(self.body["title"].is_string(), "problem title: {self:?}");
        assert!(self.body["detail"].is_string(), "problem detail: {self:?}");
    }

    /// The `field` a validation problem names.
    pub fn field(&self) -> &str {
        self.body["field"].as_str().unwrap_or("")
    }
}

/// A request body and how to send it, for the requests `post` cannot express.
pub struct Raw<'a> {
    pub token: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub body: Vec<u8>,
    pub headers: Vec<(&'a str, String)>,
}

impl TestApp {
    /// Runs `request` and asserts it is refused with `status` and `slug` and appends no domain
    /// event (a `CommandAudited` record of the refusal is allowed).
    pub async fn refused(
        &self,
        request: impl std::future::Future<Output = Answer>,
        status: u16,
        slug: &str,
    ) -> Answer {
        let before = self.count_domain_events().await;
        let answer = request.await;
        answer.assert_problem(status, slug);
        assert_eq!(
            self.count_domain_events().await,
            before,
            "a refused command appends no domain event: {answer:?}"
        );
        answer
    }

    /// A POST with full control over token, media type, bytes and headers.
    pub async fn post_raw(&self, path: &str, raw: Raw<'_>) -> Answer {
        let mut req = self
            .client
            .post(format!("{}{}", self.base, path))
            .body(raw.body);
        if let Some(t) = raw.token {
            req = req.header("authorization", t);
        }
        if let Some(ct) = raw.content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in raw.headers {
            req = req.header(k, v);
        }
        self.send(req).await
    }

    /// The `sub` a token was minted for.
    pub fn sub_of(&self, token: &Token) -> String {
        self.jwt
            .verify(&token.0)
            .unwrap_or_else(|e| panic!("a test token does not verify: {e}"))
            .sub
    }

    /// Signs arbitrary claims with the app's secret.
    pub fn token_from(&self, claims: &Claims) -> Token {
        Token(self.jwt.sign(claims).unwrap_or_else(|e| panic!("{e}")))
    }

    pub async fn confirm(&self, token: &Token, booking: Uuid) -> Answer {
        self.post(&format!("/v1/bookings/{booking}/confirm"), token, json!({}))
            .await
    }

    /// Authorises `amount_minor` EUR as a deposit on `booking`.
    pub async fn authorise(&self, token: &Token, booking: Uuid, amount_minor: i64) -> Answer {
        self.post(
            &format!("/v1/bookings/{booking}/payments"),
            token,
            json!({"amount_minor": amount_minor, "currency": "EUR", "kind": "deposit"}),
        )
        .await
    }

    /// A fresh venue, a pending booking of its table (18:00-20:00) and a staff token.
    pub async fn booked(&self) -> (Uuid, Uuid, Uuid, Token) {
        let (venue, table, _) = self.venue().await;
        let staff = self.token(Role::Staff);
        let b = self.book(&staff, venue, table, 18, 20).await;
        assert_eq!(b.status, 201, "{b:?}");
        (venue, table, b.id(), staff)
    }

    /// `Ledger-Signature` for `body` at unix time `t`, signed with `secret`.
    pub fn signature_with(secret: &[u8], t: i64, body: &[u8]) -> String {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
            .unwrap_or_else(|e| panic!("hmac key: {e}"));
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    /// `Ledger-Signature` for `body`, signed now with the app's webhook secret.
    pub fn signature(&self, body: &[u8]) -> String {
        Self::signature_with(&self.webhook_secret, chrono::Utc::now().timestamp(), body)
    }

    /// Delivers a provider event: no bearer token, only the signature header (if any).
    pub async fn webhook(&self, body: &[u8], signature: Option<String>) -> Answer {
        self.post_raw(
            "/v1/webhooks/payments",
            Raw {
                token: None,
                content_type: Some("application/json"),
                body: body.to_vec(),
                headers: signature
                    .map(|s| vec![("ledger-signature", s)])
                    .unwrap_or_default(),
            },
        )
        .await
    }

    /// Every stored event of a type: (stream, payload, metadata), in log order.
    pub async fn events_of(&self, event_type: &str) -> Vec<(String, Value, Value)> {
        sqlx::query_as(
            "SELECT stream_id, payload, metadata FROM events WHERE event_type = $1 \
             ORDER BY global_position",
        )
        .bind(event_type)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("reading {event_type} events: {e}"))
    }
}
