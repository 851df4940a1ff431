//! Live and test mode never mix (issue 11 item 6): an event of the other mode is stored,
//! answered 2xx, recorded as ignored with its reason, counted, and changes nothing.

use serde_json::Value;
use subledger::config::StripeMode;

use crate::events::{envelope, subscription, T0};
use crate::support::helpers::{metrics_page, sample, spawn_with, test_settings, TestApp};

/// The series `subledger_webhooks_wrong_mode_total{mode="..."}` as `/metrics` serves it.
async fn wrong_mode_count(app: &TestApp, mode: &str) -> f64 {
    let text = metrics_page(&app.client, &app.address).await;
    let series = format!("subledger_webhooks_wrong_mode_total{{mode=\"{mode}\"}} ");
    sample(&text, &series).unwrap_or_else(|| panic!("{series} in /metrics"))
}

/// A subscription event in `livemode` (the envelope's `livemode` field:
/// https://docs.stripe.com/api/events/object#event_object-livemode).
fn event_in_mode(id: &str, customer: &str, livemode: bool) -> Vec<u8> {
    let far = chrono::Utc::now().timestamp() + 30 * 86_400;
    let mut event = envelope(
        id,
        "customer.subscription.created",
        T0,
        subscription(&format!("sub_{id}"), customer, "active", far, "org_mode"),
    );
    event["livemode"] = Value::Bool(livemode);
    serde_json::to_vec(&event).unwrap()
}

async fn app_in(mode: StripeMode, tag: &str) -> TestApp {
    let (mut settings, db, prefix) = test_settings(tag);
    settings.stripe_mode = mode;
    spawn_with(settings, db, prefix).await
}

#[tokio::test]
async fn an_event_of_the_other_mode_is_stored_ignored_counted_and_changes_nothing() {
    for (mode, wrong, right) in [
        (StripeMode::Test, true, false),
        (StripeMode::Live, false, true),
    ] {
        let app = app_in(mode, &format!("mode_{}", mode.as_str())).await;
        let wrong_label = if wrong { "live" } else { "test" };
        let before = wrong_mode_count(&app, wrong_label).await;

        let response = app
            .post_webhook(&event_in_mode("evt_wrong", "cus_wrong", wrong))
            .await;
        assert_eq!(response.status(), 200, "{mode:?}");
        app.settle().await;
        let (state, outcome, detail) = app.inbox_row("evt_wrong").await.expect("stored");
        assert_eq!(
            (state.as_str(), outcome.as_deref()),
            ("done", Some("ignored"))
        );
        let detail = detail.unwrap();
        assert!(
            detail.contains(&format!("{wrong_label} mode event"))
                && detail.contains(&format!("{} mode deployment", mode.as_str())),
            "{detail}"
        );
        assert_eq!(
            app.count("SELECT count(*) FROM events").await,
            0,
            "{mode:?}"
        );
        assert_eq!(
            app.get("/v1/customers/cus_wrong/subscription")
                .await
                .status(),
            404
        );
        let org = app.get_json("/v1/orgs/org_mode/entitlements").await;
        assert_eq!(org["access"], false, "{org}");
        assert!(wrong_mode_count(&app, wrong_label).await >= before + 1.0);

        // The deployment's own mode is recorded as ever.
        let response = app
            .post_webhook(&event_in_mode("evt_right", "cus_right", right))
            .await;
        assert_eq!(response.status(), 200);
        app.settle().await;
        let (_, outcome, _) = app.inbox_row("evt_right").await.unwrap();
        assert_eq!(outcome.as_deref(), Some("applied"));
        let org = app.get_json("/v1/orgs/org_mode/entitlements").await;
        assert_eq!(org["access"], true, "{org}");
        app.stop().await;
    }
}

#[tokio::test]
async fn with_no_mode_known_both_modes_are_accepted() {
    let app = app_in(StripeMode::Both, "mode_both").await;
    for (id, customer, livemode) in [("evt_l", "cus_l", true), ("evt_t", "cus_t", false)] {
        let response = app
            .post_webhook(&event_in_mode(id, customer, livemode))
            .await;
        assert_eq!(response.status(), 200);
    }
    app.settle().await;
    for id in ["evt_l", "evt_t"] {
        let (_, outcome, _) = app.inbox_row(id).await.unwrap();
        assert_eq!(outcome.as_deref(), Some("applied"), "{id}");
    }
    app.stop().await;
}
