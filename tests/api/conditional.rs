//! `If-Match: "<version>"`: a command is appended only if the stream is still at that version.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn a_stale_if_match_is_412_and_appends_nothing() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let confirmed = app.confirm(&staff, booking).await;
    assert_eq!(confirmed.header("etag"), Some("\"2\""));
    let a = app
        .refused(
            app.post_with(
                &format!("/v1/bookings/{booking}/cancel"),
                &staff,
                json!({}),
                &[("if-match", "\"1\"")],
            ),
            412,
            "version-conflict",
        )
        .await;
    assert!(
        a.body["detail"].as_str().unwrap_or("").contains('2'),
        "the detail names the current version: {a:?}"
    );
    assert_eq!(app.count_events("BookingCancelled").await, 0);
    // A version from the future is as stale as one from the past.
    app.refused(
        app.post_with(
            &format!("/v1/bookings/{booking}/cancel"),
            &staff,
            json!({}),
            &[("if-match", "\"7\"")],
        ),
        412,
        "version-conflict",
    )
    .await;
}

#[tokio::test]
async fn the_current_version_in_if_match_is_accepted() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let confirmed = app
        .post_with(
            &format!("/v1/bookings/{booking}/confirm"),
            &staff,
            json!({}),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(confirmed.status, 200, "{confirmed:?}");
    let etag = confirmed
        .header("etag")
        .unwrap_or_else(|| panic!("no ETag: {confirmed:?}"))
        .to_owned();
    assert_eq!(etag, "\"2\"");
    // The ETag of one answer is the If-Match of the next command, weak or not.
    let cancelled = app
        .post_with(
            &format!("/v1/bookings/{booking}/cancel"),
            &staff,
            json!({}),
            &[("if-match", &format!("W/{etag}"))],
        )
        .await;
    assert_eq!(
        (cancelled.status, cancelled.body["version"].as_i64()),
        (200, Some(3)),
        "{cancelled:?}"
    );
}

#[tokio::test]
async fn a_malformed_if_match_is_400_naming_the_header() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    for bad in ["abc", "\"-1\"", "\"1.5\"", "\"\""] {
        let a = app
            .refused(
                app.post_with(
                    &format!("/v1/bookings/{booking}/confirm"),
                    &staff,
                    json!({}),
                    &[("if-match", bad)],
                ),
                400,
                "validation",
            )
            .await;
        assert_eq!(a.field(), "If-Match", "{bad}");
    }
}

#[tokio::test]
async fn if_match_guards_payments_too() {
    let app = spawn_app().await;
    let (_, _, booking, staff) = app.booked().await;
    let payment = app.authorise(&staff, booking, 3000).await;
    assert_eq!(payment.header("etag"), Some("\"1\""));
    let capture = format!("/v1/payments/{}/capture", payment.id());
    let first = app
        .post_with(
            &capture,
            &staff,
            json!({"amount_minor": 1000}),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(first.status, 200, "{first:?}");
    app.refused(
        app.post_with(
            &capture,
            &staff,
            json!({"amount_minor": 1000}),
            &[("if-match", "\"1\"")],
        ),
        412,
        "version-conflict",
    )
    .await;
    assert_eq!(app.count_events("PaymentCaptured").await, 1);
    // Authorising names the booking's version: a booking that moved on refuses a stale one.
    app.confirm(&staff, booking).await;
    app.refused(
        app.post_with(
            &format!("/v1/bookings/{booking}/payments"),
            &staff,
            json!({"amount_minor": 100, "currency": "EUR", "kind": "balance"}),
            &[("if-match", "\"1\"")],
        ),
        412,
        "version-conflict",
    )
    .await;
}
