//! The convergence property: random Stripe lifecycles (the simulator, both payload
//! shapes), delivered shuffled and duplicated, end every customer in the same state as
//! in-order delivery, and that state is what Stripe's newest facts say.
//!
//! Checked twice: in process over many seeds (parse → route → decide → apply, the exact
//! functions the service runs), and through the real webhook, Postgres and Redis; and
//! again with several customers per org and per user (each with several subscriptions
//! over its life): every org's and user's answer is the same union whatever the order.

use std::collections::BTreeMap;

use aggregates::{decide, CustomerView, Subscription, SubscriptionCommand};
use cqrs_es::Aggregate;
use futures_like::join_all_limited;
use projections::{Catalog, Entitlement, SubscriptionInfo};
use proptest::prelude::*;
use serde_json::Value;
use subledger::stripe::{parse_event, route, Route};

use crate::support::helpers::{spawn_app, TestApp, SECRET};
use crate::support::stripe_sim::{
    shuffle_with_duplicates, sign, simulate, CustomerTruth, SimEvent, Simulation,
};

const START: i64 = 1_760_000_000;

/// Runs events through the domain exactly as the inbox workers do, one aggregate per
/// customer, and returns each customer's final view.
pub fn fold(events: &[SimEvent]) -> BTreeMap<String, CustomerView> {
    let mut states: BTreeMap<String, Subscription> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for event in events {
        // The inbox drops a redelivered event id before it reaches the aggregate.
        if !seen.insert(event.id.clone()) {
            continue;
        }
        let parsed = parse_event(&event.to_bytes()).expect("simulated events parse");
        let Route::Command {
            customer_id,
            command,
        } = route(&parsed)
        else {
            continue;
        };
        let state = states.entry(customer_id).or_default();
        let decision =
            decide(state, &command).expect("the aggregate takes its own customer's facts");
        for e in decision.events {
            state.apply(e);
        }
    }
    states
        .into_iter()
        .map(|(id, state)| (id, state.view()))
        .collect()
}

fn assert_matches_truth(views: &BTreeMap<String, CustomerView>, truth: &[CustomerTruth]) {
    for t in truth {
        let view = &views[&t.customer_id];
        let sub = view
            .subscription
            .as_ref()
            .expect("every simulated customer subscribed");
        let what = format!("{} (basil: {})", t.customer_id, t.basil_shape);
        assert_eq!(sub.id, t.subscription_id, "{what}");
        assert_eq!(sub.status.as_str(), t.status, "{what}");
        assert_eq!(sub.price_id.as_deref(), Some(t.price_id.as_str()), "{what}");
        assert_eq!(
            sub.current_period_end.map(|d| d.timestamp()),
            Some(t.current_period_end),
            "{what}"
        );
        assert_eq!(sub.cancel_at_period_end, t.cancel_at_period_end, "{what}");
        assert_eq!(view.org_id.as_deref(), Some(t.org_id.as_str()), "{what}");
        assert_eq!(view.user_id.as_deref(), Some(t.user_id.as_str()), "{what}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn shuffled_duplicated_delivery_converges_to_in_order_delivery(
        seed in any::<u64>(),
        shuffle_seed in any::<u64>(),
        customers in 1usize..12,
        dup_rate in 0.0f64..0.5,
    ) {
        let sim = simulate(seed, customers, START);
        let in_order = fold(&sim.events);
        assert_matches_truth(&in_order, &sim.truth);
        let shuffled = fold(&shuffle_with_duplicates(&sim.events, shuffle_seed, dup_rate));
        prop_assert_eq!(shuffled, in_order);
    }
}

#[test]
fn every_command_of_a_lifecycle_is_judged_without_error() {
    // Commands route to their own customer's aggregate only; decide never errs on them.
    let sim = simulate(7, 30, START);
    for event in &sim.events {
        let parsed = parse_event(&event.to_bytes()).unwrap();
        if let Route::Command {
            customer_id,
            command: SubscriptionCommand::RecordStripeFacts(facts),
        } = route(&parsed)
        {
            assert_eq!(customer_id, event.customer_id);
            assert_eq!(facts.customer_id, event.customer_id);
        }
    }
}

/// Sends every event, signed, 8 at a time, and waits until everything is processed.
async fn deliver(app: &TestApp, events: &[SimEvent]) {
    let bodies: Vec<Vec<u8>> = events.iter().map(SimEvent::to_bytes).collect();
    let statuses = join_all_limited(
        8,
        bodies.iter().map(|body| {
            let header = sign(SECRET, chrono::Utc::now().timestamp(), body);
            async move {
                app.post_webhook_with(body, Some(&header))
                    .await
                    .status()
                    .as_u16()
            }
        }),
    )
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    app.settle().await;
}

/// The API's answer for every customer, without the version (which counts events
/// applied, and so depends on the delivery order).
async fn answers(app: &TestApp, customers: &[String]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for customer in customers {
        let mut info = app
            .get_json(&format!("/v1/customers/{customer}/subscription"))
            .await;
        info.as_object_mut().unwrap().remove("version");
        out.insert(customer.clone(), info);
    }
    out
}

#[tokio::test]
async fn through_the_webhook_shuffled_delivery_ends_where_in_order_delivery_does() {
    let sim = simulate(2026, 16, START);
    let customers: Vec<String> = sim.truth.iter().map(|t| t.customer_id.clone()).collect();
    let (in_order_app, shuffled_app) = tokio::join!(spawn_app("order"), spawn_app("shuffle"));
    deliver(&in_order_app, &sim.events).await;
    deliver(
        &shuffled_app,
        &shuffle_with_duplicates(&sim.events, 99, 0.2),
    )
    .await;

    let expected = answers(&in_order_app, &customers).await;
    assert_eq!(answers(&shuffled_app, &customers).await, expected);
    // And the service answers what the domain computes in process.
    let catalog =
        Catalog::load(concat!(env!("CARGO_MANIFEST_DIR"), "/catalog.example.toml").as_ref())
            .unwrap();
    for (customer, view) in fold(&sim.events) {
        let mut info = SubscriptionInfo::from_view(&view, 0, view.as_of.unwrap(), &catalog);
        // The API judges access at the time of the read.
        info.resolve(&catalog, chrono::Utc::now());
        let mut info = serde_json::to_value(info).unwrap();
        info.as_object_mut().unwrap().remove("version");
        assert_eq!(info, expected[&customer], "{customer}");
    }
    // No event failed; every rejection was a judged one.
    for app in [&in_order_app, &shuffled_app] {
        assert_eq!(
            app.count("SELECT count(*) FROM inbox WHERE state <> 'done' OR outcome = 'failed'")
                .await,
            0
        );
    }
    in_order_app.stop().await;
    shuffled_app.stop().await;
}

/// A tiny bounded `join_all`, to keep the dependency tree lean.
pub mod futures_like {
    use std::future::Future;

    pub async fn join_all_limited<F, T>(limit: usize, futures: impl Iterator<Item = F>) -> Vec<T>
    where
        F: Future<Output = T>,
    {
        let semaphore = tokio::sync::Semaphore::new(limit);
        let futures: Vec<_> = futures
            .map(|future| {
                let semaphore = &semaphore;
                async move {
                    let _permit = semaphore.acquire().await.unwrap();
                    future.await
                }
            })
            .collect();
        let mut out = Vec::with_capacity(futures.len());
        let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
        // Poll them together: a JoinSet needs 'static futures, these borrow the app.
        let mut results: Vec<Option<T>> = (0..pinned.len()).map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (i, future) in pinned.iter_mut().enumerate() {
                if results[i].is_none() {
                    match future.as_mut().poll(cx) {
                        std::task::Poll::Ready(value) => results[i] = Some(value),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        out.extend(results.into_iter().map(Option::unwrap));
        out
    }
}

/// Several customers per org and per user: each simulated customer's org and user ids are
/// rewritten to one of `orgs` shared orgs and `users` shared users (the same customer
/// keeps one of each for its whole life), so every org's answer is a union over several
/// customers, each with several subscriptions over its life.
fn share_owners(
    sim: &Simulation,
    orgs: usize,
    users: usize,
) -> (Vec<SimEvent>, Vec<CustomerTruth>) {
    let mut truth = sim.truth.clone();
    let mut rename = Vec::new();
    for (i, t) in truth.iter_mut().enumerate() {
        let (org, user) = (
            format!("org_shared_{}", i % orgs),
            format!("user_shared_{}", i % users),
        );
        rename.push((format!("\"{}\"", t.org_id), format!("\"{org}\"")));
        rename.push((format!("\"{}\"", t.user_id), format!("\"{user}\"")));
        t.org_id = org;
        t.user_id = user;
    }
    let events = sim
        .events
        .iter()
        .map(|event| {
            let mut text = event.body.to_string();
            for (from, to) in &rename {
                text = text.replace(from, to);
            }
            SimEvent {
                body: serde_json::from_str(&text).unwrap(),
                ..event.clone()
            }
        })
        .collect();
    (events, truth)
}

/// Every owner's answer judged at `now` from the folded views, as the service judges it
/// (the answers of the customers linked to it, the union by the catalogue).
fn owner_answers(
    views: &BTreeMap<String, CustomerView>,
    catalog: &Catalog,
    now: chrono::DateTime<chrono::Utc>,
) -> BTreeMap<String, Entitlement> {
    let infos: Vec<SubscriptionInfo> = views
        .values()
        .map(|view| SubscriptionInfo::from_view(view, 0, view.as_of.unwrap(), catalog))
        .collect();
    let mut owners = BTreeMap::new();
    for info in &infos {
        let (org, user) = info.linked_owners();
        if let Some(org) = org {
            let linked: Vec<SubscriptionInfo> = infos
                .iter()
                .filter(|i| i.linked_owners().0 == Some(org))
                .cloned()
                .collect();
            owners.insert(
                org.to_owned(),
                catalog.entitlement(Some(org), None, &linked, now),
            );
        }
        if let Some(user) = user {
            let linked: Vec<SubscriptionInfo> = infos
                .iter()
                .filter(|i| i.linked_owners().1 == Some(user))
                .cloned()
                .collect();
            owners.insert(
                user.to_owned(),
                catalog.entitlement(None, Some(user), &linked, now),
            );
        }
    }
    owners
}

fn example_catalog() -> Catalog {
    Catalog::load(concat!(env!("CARGO_MANIFEST_DIR"), "/catalog.example.toml").as_ref()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Orgs and users with several customers, each with several subscriptions: shuffled
    /// and duplicated delivery gives every org and user the answer in-order delivery
    /// gives, and an org with any customer whose current subscription grants has access.
    #[test]
    fn shuffled_delivery_gives_every_org_and_user_the_in_order_union(
        seed in any::<u64>(),
        shuffle_seed in any::<u64>(),
        customers in 2usize..12,
        orgs in 1usize..4,
        users in 1usize..3,
        dup_rate in 0.0f64..0.5,
        now_offset in 0i64..400,
    ) {
        let sim = simulate(seed, customers, START);
        let (events, truth) = share_owners(&sim, orgs, users);
        let catalog = example_catalog();
        let now = chrono::DateTime::from_timestamp(START + now_offset * 86_400, 0).unwrap();
        let in_order = owner_answers(&fold(&events), &catalog, now);
        let shuffled = owner_answers(&fold(&shuffle_with_duplicates(&events, shuffle_seed, dup_rate)), &catalog, now);
        prop_assert_eq!(&shuffled, &in_order);
        for t in &truth {
            let grants = catalog.status_grants(&t.status, None)
                && now.timestamp() < t.current_period_end;
            if grants {
                prop_assert!(in_order[&t.org_id].access, "{} grants, so {} has access", t.customer_id, t.org_id);
                prop_assert!(in_order[&t.user_id].access);
            }
        }
    }
}

#[tokio::test]
async fn through_the_webhook_every_org_and_user_answers_the_in_order_union() {
    // Lives that started a month ago: some are live now, some ended.
    let start = chrono::Utc::now().timestamp() - 40 * 86_400;
    let sim = simulate(4242, 12, start);
    let (events, truth) = share_owners(&sim, 3, 2);
    let (in_order_app, shuffled_app) = tokio::join!(spawn_app("orgorder"), spawn_app("orgshuffle"));
    deliver(&in_order_app, &events).await;
    deliver(&shuffled_app, &shuffle_with_duplicates(&events, 7, 0.3)).await;
    let mut owners: Vec<String> = truth.iter().map(|t| format!("orgs/{}", t.org_id)).collect();
    owners.extend(truth.iter().map(|t| format!("users/{}", t.user_id)));
    owners.sort();
    owners.dedup();
    let expected = owner_answers(&fold(&events), &example_catalog(), chrono::Utc::now());
    for owner in &owners {
        let path = format!("/v1/{owner}/entitlements");
        let a = in_order_app.get_json(&path).await;
        let b = shuffled_app.get_json(&path).await;
        assert_eq!(a, b, "{owner}");
        // A second read (from the filled hash) answers the same.
        assert_eq!(shuffled_app.get_json(&path).await, b, "{owner}");
        let id = owner.split('/').nth(1).unwrap();
        assert_eq!(a["access"], expected[id].access, "{owner}: {a}");
        assert_eq!(a["plan"].as_str(), expected[id].plan.as_deref(), "{owner}");
        assert_eq!(
            a["customers"].as_array().unwrap().len(),
            expected[id].customers.len(),
            "{owner}"
        );
    }
    in_order_app.stop().await;
    shuffled_app.stop().await;
}
