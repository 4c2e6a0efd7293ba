//! The append pipeline when it is not alone: two writers (as two API processes would run) on
//! one log, beliefs that turn out stale, and a batch the database refuses. Driven through
//! `Appender` directly, because these are the writer's paths, not a handler's.
use crate::helpers::*;
use ledger::store::append::{
    AppendError, AppendOutcome, AppendRequest, IdempotencyClaim, StoredResponse, StreamAppend,
};
use ledger_events::envelope::{ExpectedVersion, Metadata, NewEvent};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

fn request(stream: &str, expected: ExpectedVersion, events: usize) -> AppendRequest {
    let id = Uuid::now_v7();
    AppendRequest {
        streams: vec![StreamAppend {
            stream_id: stream.to_owned(),
            expected,
            events: (0..events)
                .map(|i| NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: "VenueRenamed",
                    schema_version: 1,
                    payload: json!({"name": format!("n{i}"), "note": "tab\tand \"quotes\""}),
                })
                .collect(),
        }],
        metadata: Metadata {
            actor: "writer-test".into(),
            role: "admin".into(),
            command: "Rename".into(),
            request_id: id,
            correlation_id: id,
            causation_id: id,
        },
        slot: None,
        idempotency: None,
    }
}

fn claim(key: u8) -> IdempotencyClaim {
    IdempotencyClaim {
        key_hash: [key; 32],
        request_hmac: [key; 32],
        respond: Arc::new(|a| StoredResponse {
            status: 201,
            body: json!({"position": a.last_position}),
        }),
    }
}

async fn assert_log_verifies(app: &TestApp) {
    let report = ledger_replay::verify::verify(&app.pool)
        .await
        .expect("verify");
    assert!(report.intact, "{report:?}");
}

/// `landed` (position, stream) as the submitters of the run were told holds every event of the
/// run's `venue-{run}-…` streams, each where the log has it.
async fn assert_each_was_told_its_own_position(
    app: &TestApp,
    run: Uuid,
    mut landed: Vec<(i64, String)>,
) {
    landed.sort();
    let stored: Vec<(i64, String)> = sqlx::query_as(
        "SELECT global_position, stream_id FROM events WHERE stream_id LIKE $1 \
         ORDER BY global_position",
    )
    .bind(format!("venue-{run}-%"))
    .fetch_all(&app.pool)
    .await
    .expect("read the appended events");
    assert_eq!(
        landed, stored,
        "each submitter was told its own event's position"
    );
}

async fn stream_versions(app: &TestApp, stream: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT stream_version FROM events WHERE stream_id = $1 ORDER BY global_position",
    )
    .bind(stream)
    .fetch_all(&app.pool)
    .await
    .expect("read the stream's versions")
}

/// Two writers append to the same streams at once, each also under idempotency keys the other
/// uses: every accepted append lands once where it was told, each key is appended once and
/// replayed by the other, and the log stays gapless, in version order per stream, and verifies.
#[tokio::test]
async fn two_writers_on_one_log_keep_it_gapless_versioned_and_verifiable() {
    let app = spawn_app().await;
    let (a, writer_a) = app.writer();
    let (b, writer_b) = app.writer();
    let run = Uuid::now_v7();
    let streams: Vec<String> = (0..4).map(|i| format!("venue-{run}-{i}")).collect();
    let mut tasks = Vec::new();
    for t in 0..16u8 {
        let appender = if t % 2 == 0 { a.clone() } else { b.clone() };
        let streams = streams.clone();
        tasks.push(tokio::spawn(async move {
            let mut landed = Vec::new();
            for n in 0..12u8 {
                let stream = &streams[usize::from(t + n) % streams.len()];
                let mut req = request(stream, ExpectedVersion::Any, 1 + usize::from(n % 2));
                // Keys 0..8 are each sent by one task of each writer, at the same step.
                if n == 3 {
                    req.idempotency = Some(claim(t / 2));
                }
                let outcome = appender.append(req).await.unwrap_or_else(|e| panic!("{e}"));
                landed.push((n == 3, outcome));
            }
            landed
        }));
    }
    let mut appended_positions = Vec::new();
    let (mut keyed_appended, mut keyed_replayed) = (0, 0);
    for task in tasks {
        for (keyed, outcome) in task.await.expect("task") {
            match outcome {
                AppendOutcome::Appended(at, stored) => {
                    appended_positions.extend(at.first_position..=at.last_position);
                    if keyed {
                        keyed_appended += 1;
                        assert_eq!(
                            stored.expect("a keyed append stores its response").body["position"],
                            at.last_position
                        );
                    }
                }
                AppendOutcome::Replayed(stored) => {
                    assert!(keyed, "only keyed appends replay");
                    keyed_replayed += 1;
                    assert_eq!(stored.status, 201);
                }
            }
        }
    }
    assert_eq!((keyed_appended, keyed_replayed), (8, 8));
    appended_positions.sort_unstable();
    let head = crate::faults::head(&app).await;
    let before = head - appended_positions.len() as i64;
    let expected: Vec<i64> = (before + 1..=head).collect();
    assert_eq!(appended_positions, expected, "every position once, no gap");
    let mut total = 0;
    for stream in &streams {
        let versions = stream_versions(&app, stream).await;
        assert_eq!(versions, (1..=versions.len() as i64).collect::<Vec<_>>());
        total += versions.len();
    }
    assert_eq!(total, appended_positions.len());
    assert_log_verifies(&app).await;
    drop((a, b));
    let _ = tokio::join!(writer_a, writer_b);
}

/// Many submitters at once, in rounds, so that batches grow past the size the writer hands to a
/// task of its own to answer: every submitter is told where its own event landed, each position
/// once and in its stream, and the log verifies.
#[tokio::test]
async fn many_submitters_at_once_are_each_told_where_their_own_event_landed() {
    let app = spawn_app().await;
    let (appender, writer) = app.writer();
    let run = Uuid::now_v7();
    let mut tasks = Vec::new();
    for t in 0..96 {
        let appender = appender.clone();
        tasks.push(tokio::spawn(async move {
            let mut landed = Vec::new();
            for n in 0..4 {
                let stream = format!("venue-{run}-{t}-{n}");
                let outcome = appender
                    .append(request(&stream, ExpectedVersion::NoStream, 1))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let AppendOutcome::Appended(at, None) = outcome else {
                    panic!("appended without a key: {outcome:?}");
                };
                assert_eq!(at.first_position, at.last_position);
                assert_eq!(at.versions, vec![(stream.clone(), 1)]);
                landed.push((at.last_position, stream));
            }
            landed
        }));
    }
    let mut landed = Vec::new();
    for task in tasks {
        landed.extend(task.await.expect("task"));
    }
    assert_each_was_told_its_own_position(&app, run, landed).await;
    let metrics = appender.metrics();
    let (batches, commands) = (
        metrics.batches.load(std::sync::atomic::Ordering::Relaxed),
        metrics.commands.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert_eq!(commands, 384);
    assert!(batches < commands / 4, "batched: {batches} batches");
    assert_log_verifies(&app).await;
    drop(appender);
    let _ = writer.await;
}

/// One writer with many submitters plans each batch while the one before is in Postgres, on the
/// head that one will leave; a second writer with a few moves the head from under it now and then,
/// so some plans made ahead are dropped and made again. Every command still lands once, where its
/// submitter was told, and the log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_planned_and_sent_ahead_on_a_head_that_moved_are_planned_again() {
    let app = spawn_app().await;
    let (a, writer_a) = app.writer();
    let (b, writer_b) = app.writer();
    let run = Uuid::now_v7();
    // Both writers know the head and hold a connection before the race starts.
    for w in [&a, &b] {
        w.append(request(
            &format!("warm-{run}-{}", Uuid::now_v7()),
            ExpectedVersion::NoStream,
            1,
        ))
        .await
        .expect("warm up");
    }
    let a_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..64 {
        // Writer b's few submitters append for as long as writer a's are at it.
        let (appender, other) = match t % 16 {
            0 => (b.clone(), true),
            _ => (a.clone(), false),
        };
        let a_done = a_done.clone();
        tasks.push(tokio::spawn(async move {
            // Half of writer a's come in while its first batch is in Postgres: from then on the
            // two halves take turns, each batch planned while the other's is written.
            if t % 2 == 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let stream = format!("venue-{run}-{t}");
            let mut landed = Vec::new();
            let mut n = 0;
            while if other {
                a_done.load(std::sync::atomic::Ordering::SeqCst) < 60
            } else {
                n < 16
            } {
                let expected = match n {
                    0 => ExpectedVersion::NoStream,
                    n => ExpectedVersion::Exact(n),
                };
                let outcome = appender
                    .append(request(&stream, expected, 1))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let AppendOutcome::Appended(at, None) = outcome else {
                    panic!("appended without a key: {outcome:?}");
                };
                n += 1;
                assert_eq!(at.versions, vec![(stream.clone(), n)]);
                landed.push((at.last_position, stream.clone()));
            }
            if !other {
                a_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            (stream, n, landed)
        }));
    }
    let mut landed = Vec::new();
    for task in tasks {
        let (stream, n, mine) = task.await.expect("task");
        assert_eq!(
            stream_versions(&app, &stream).await,
            (1..=n).collect::<Vec<_>>()
        );
        landed.extend(mine);
    }
    assert_each_was_told_its_own_position(&app, run, landed).await;
    use std::sync::atomic::Ordering::Relaxed;
    let (ahead, sent, dropped) = (
        a.metrics().batches_ahead.load(Relaxed),
        a.metrics().batches_sent_ahead.load(Relaxed),
        a.metrics().ahead_dropped.load(Relaxed),
    );
    assert!(ahead > 0, "batches went out as planned ahead");
    assert!(sent > 0, "batches were sent behind the one running");
    assert!(
        dropped > 0,
        "plans made ahead were dropped when the head moved"
    );
    assert_log_verifies(&app).await;
    drop((a, b));
    let _ = tokio::join!(writer_a, writer_b);
}

/// A writer that does not know a stream takes the handler's word for its version; when another
/// process has moved the stream on, the unique version refuses the insert, and the writer reads
/// and answers a version conflict with the actual version, having written nothing.
#[tokio::test]
async fn a_version_believed_on_the_handlers_word_is_checked_by_the_database() {
    let app = spawn_app().await;
    let (a, writer_a) = app.writer();
    let (b, writer_b) = app.writer();
    let run = Uuid::now_v7();
    let (x, y) = (format!("venue-{run}-x"), format!("venue-{run}-y"));
    a.append(request(&x, ExpectedVersion::NoStream, 2))
        .await
        .expect("append");
    // B learns the head (one read) but nothing of x.
    b.append(request(&y, ExpectedVersion::NoStream, 1))
        .await
        .expect("append");
    let head_before = crate::faults::head(&app).await;
    let refused = b.append(request(&x, ExpectedVersion::Exact(1), 1)).await;
    match refused {
        Err(AppendError::VersionConflict {
            stream_id, actual, ..
        }) => assert_eq!((stream_id.as_str(), actual), (x.as_str(), 2)),
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let head_after = crate::faults::head(&app).await;
    assert_eq!(head_after, head_before, "nothing appended");
    assert_eq!(stream_versions(&app, &x).await, vec![1, 2]);
    // And the writer goes on with what it read.
    let ok = b.append(request(&x, ExpectedVersion::Exact(2), 1)).await;
    assert!(matches!(ok, Ok(AppendOutcome::Appended(..))), "{ok:?}");
    drop((a, b));
    let _ = tokio::join!(writer_a, writer_b);
}

/// An event id that is already in the log is not a stale belief: re-reading cannot clear it.
/// The command is refused with an error (once, not retried for ever), and the commands batched
/// with it are appended.
#[tokio::test]
async fn a_clashing_event_id_fails_its_command_alone_and_is_not_retried_for_ever() {
    let app = spawn_app().await;
    let (appender, writer) = app.writer();
    let run = Uuid::now_v7();
    let first = request(&format!("venue-{run}-first"), ExpectedVersion::NoStream, 1);
    let reused = first.streams[0].events[0].event_id;
    appender.append(first).await.expect("append");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let appender = appender.clone();
        let mut req = request(&format!("venue-{run}-{i}"), ExpectedVersion::NoStream, 1);
        if i == 3 {
            req.streams[0].events[0].event_id = reused;
        }
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(20), appender.append(req))
                .await
                .expect("the append is answered")
        }));
    }
    let mut outcomes = HashMap::new();
    for (i, task) in tasks.into_iter().enumerate() {
        outcomes.insert(i, task.await.expect("task"));
    }
    for (i, outcome) in &outcomes {
        if *i == 3 {
            assert!(
                matches!(outcome, Err(AppendError::Database(_))),
                "{outcome:?}"
            );
        } else {
            assert!(
                matches!(outcome, Ok(AppendOutcome::Appended(..))),
                "{outcome:?}"
            );
        }
    }
    let clashes: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = $1")
        .bind(reused)
        .fetch_one(&app.pool)
        .await
        .expect("query");
    assert_eq!(clashes, 1);
    assert_log_verifies(&app).await;
    drop(appender);
    let _ = writer.await;
}
