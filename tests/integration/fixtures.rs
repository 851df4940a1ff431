//! Conformance with what Stripe really sent to other projects (../shared/fixtures): every
//! payload parses, routes to the customer and subscription its manifest names, and goes
//! through the real webhook (signed with the test secret) to a final inbox outcome.

use std::path::PathBuf;

use aggregates::{Fact, SubscriptionCommand};
use serde_json::Value;
use subledger::stripe::event::HANDLED_TYPES;
use subledger::stripe::{parse_event, route, Route};

use crate::support::helpers::spawn_app;

/// One shared fixture: the file it came from, what its manifest says, and its body.
pub struct Fixture {
    pub file: String,
    event_id: String,
    event_type: String,
    subscription_status: String,
    customer_id: String,
    subscription_id: String,
    pub body: Vec<u8>,
}

/// Where the shared fixtures are: `SUBLEDGER_FIXTURES`, else `../shared/fixtures/stripe-events`.
pub fn fixtures_dir() -> PathBuf {
    std::env::var("SUBLEDGER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/stripe-events")
        })
}

/// Every fixture the manifest lists, in its order.
pub fn load() -> Vec<Fixture> {
    let dir = fixtures_dir();
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.tsv"))
        .unwrap_or_else(|e| panic!("the shared fixtures are at {}: {e}", dir.display()));
    let mut lines = manifest.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("column {name}"))
    };
    let (file, index, id, kind, status, customer, sub) = (
        col("local_file"),
        col("event_index"),
        col("event_id"),
        col("event_type"),
        col("subscription_status"),
        col("customer_id"),
        col("subscription_id"),
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let text = std::fs::read_to_string(dir.join(f[file])).unwrap();
            let mut value: Value = serde_json::from_str(&text).unwrap();
            if !f[index].is_empty() {
                value = value[f[index]].take();
            }
            Fixture {
                file: f[file].to_owned(),
                event_id: f[id].to_owned(),
                event_type: f[kind].to_owned(),
                subscription_status: f[status].to_owned(),
                customer_id: f[customer].to_owned(),
                subscription_id: f[sub].to_owned(),
                body: serde_json::to_vec(&value).unwrap(),
            }
        })
        .collect()
}

#[test]
fn every_fixture_parses_and_routes_as_its_manifest_says() {
    let fixtures = load();
    assert!(fixtures.len() >= 100, "{} fixtures", fixtures.len());
    let mut commands = 0;
    for f in &fixtures {
        let event = parse_event(&f.body).unwrap_or_else(|e| panic!("{}: {e}", f.file));
        assert_eq!(
            (event.id.as_str(), event.event_type.as_str()),
            (f.event_id.as_str(), f.event_type.as_str())
        );
        let handled = HANDLED_TYPES.contains(&f.event_type.as_str());
        match route(&event) {
            Route::Command {
                command: SubscriptionCommand::Reconcile(_),
                ..
            } => unreachable!("webhooks never route to Reconcile"),
            Route::Fetch(_) | Route::ReconcileAll => {
                unreachable!("the shared fixtures are snapshot events")
            }
            Route::Ignore { reason } => {
                assert!(
                    !handled || f.customer_id.is_empty(),
                    "{}: ignored ({reason})",
                    f.file
                );
            }
            Route::Command {
                customer_id,
                command: SubscriptionCommand::RecordStripeFacts(facts),
            } => {
                commands += 1;
                assert!(handled, "{}", f.file);
                assert_eq!(customer_id, f.customer_id, "{}", f.file);
                match &facts.fact {
                    Fact::Subscription(s) => {
                        assert_eq!(s.status.as_str(), f.subscription_status, "{}", f.file);
                        assert_eq!(s.id, f.subscription_id, "{}", f.file);
                        assert!(s.price_id.is_some(), "{}: price or plan", f.file);
                        assert!(s.current_period_end.is_some(), "{}: period", f.file);
                    }
                    Fact::Invoice {
                        subscription_id,
                        invoice,
                    } => {
                        assert_eq!(*subscription_id, f.subscription_id, "{}", f.file);
                        assert!(invoice.id.starts_with("in_"), "{}", f.file);
                    }
                    Fact::Nothing { .. } => assert!(
                        f.event_type == "invoice.upcoming" || f.subscription_id.is_empty(),
                        "{}: an invoice of a subscription must be recorded",
                        f.file
                    ),
                    Fact::Payment(p) => assert!(p.id.starts_with("pi_"), "{}", f.file),
                    Fact::OwnerOnly => assert!(
                        f.event_type.starts_with("customer.")
                            || f.event_type == "checkout.session.completed",
                        "{}",
                        f.file
                    ),
                    Fact::CustomerDeleted => {
                        assert_eq!(f.event_type, "customer.deleted", "{}", f.file)
                    }
                    Fact::Entitlements { .. } => {
                        assert!(f.event_type.starts_with("entitlements."), "{}", f.file)
                    }
                }
            }
        }
    }
    assert!(commands > 40, "{commands} fixtures became commands");
}

#[tokio::test]
async fn every_fixture_is_acknowledged_and_processed_through_the_webhook() {
    let app = spawn_app("fixtures").await;
    let fixtures = load();
    for f in &fixtures {
        let response = app.post_webhook(&f.body).await;
        assert_eq!(response.status(), 200, "{}", f.file);
    }
    app.settle().await;
    let distinct: std::collections::HashSet<_> = fixtures.iter().map(|f| &f.event_id).collect();
    assert_eq!(
        app.count("SELECT count(*) FROM inbox").await,
        distinct.len() as i64
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox WHERE state <> 'done'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox WHERE outcome = 'failed'")
            .await,
        0
    );
    // Zeroed ids make many fixtures share a customer, so whether one of them is applied or
    // judged stale depends on processing order; that every handled one was judged does not.
    let judged =
        "SELECT count(*) FROM inbox WHERE outcome IN ('applied', 'duplicate', 'stale', 'illegal')";
    assert!(app.count(judged).await >= 10);
    assert!(
        app.count("SELECT count(*) FROM inbox WHERE outcome = 'applied'")
            .await
            >= 1
    );
    app.stop().await;
}
