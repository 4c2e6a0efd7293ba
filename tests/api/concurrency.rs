use crate::helpers::*;
use ledger::http::auth::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_eight_concurrent_requests_for_one_slot_yield_exactly_one_booking() {
    let app = spawn_app().await;
    let (venue, table, _) = app.venue().await;
    let staff = app.token(Role::Staff);
    let attempts = (0..48).map(|_| app.book(&staff, venue, table, 19, 21));
    let answers = futures::future::join_all(attempts).await;
    let created = answers.iter().filter(|a| a.status == 201).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.status == 409).collect();
    assert_eq!(created, 1, "{answers:?}");
    assert_eq!(refused.len(), 47);
    assert!(refused.iter().all(|a| a.problem() == "slot-unavailable"));
    assert_eq!(app.count_events("BookingRequested").await, 1);
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM booking_slots")
        .fetch_one(&app.pool)
        .await
        .unwrap_or(-1);
    assert_eq!(slots, 1);
    assert_eq!(
        app.count_events("CommandAudited").await,
        47,
        "every refusal is audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bookings_of_distinct_slots_all_succeed_with_gapless_positions() {
    let app = spawn_app().await;
    let (venue, table, room) = app.venue().await;
    let staff = app.token(Role::Staff);
    let attempts = (0..20u32).map(|i| {
        let resource = if i % 2 == 0 { table } else { room };
        app.book(&staff, venue, resource, i / 2, i / 2 + 1)
    });
    let answers = futures::future::join_all(attempts).await;
    assert!(answers.iter().all(|a| a.status == 201), "{answers:?}");
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT global_position FROM events ORDER BY global_position")
            .fetch_all(&app.pool)
            .await
            .unwrap_or_default();
    let expected: Vec<i64> = (1..=positions.len() as i64).collect();
    assert_eq!(positions, expected);
}
