//! Given/when/then for every (from, to) pair of the transition table, and the ordering
//! rules (stale, same second, duplicates, ownership, invoices), deleted customers, the
//! Stripe Entitlements register, and views of every subscription (and their old shape).

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::test::TestFramework;

use crate::*;

type Framework = TestFramework<Subscription>;

const CUSTOMER: &str = "cus_test";
const SUB: &str = "sub_test";

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

fn source(id: &str, secs: i64) -> FactSource {
    FactSource {
        stripe_event_id: id.to_owned(),
        stripe_event_type: "customer.subscription.updated".to_owned(),
        created: at(secs),
    }
}

fn snapshot(status: SubscriptionStatus) -> SubscriptionFacts {
    SubscriptionFacts {
        id: SUB.to_owned(),
        status,
        created: Some(at(0)),
        price_id: Some("price_pro".to_owned()),
        product_id: Some("prod_pro".to_owned()),
        lookup_key: None,
        quantity: Some(1),
        current_period_start: Some(at(0)),
        current_period_end: Some(at(30 * 86_400)),
        cancel_at_period_end: false,
        cancel_at: None,
        canceled_at: None,
        ended_at: None,
        trial_start: None,
        trial_end: None,
        latest_invoice_id: None,
        currency: Some("usd".to_owned()),
        items: vec![],
        pause_reason: None,
    }
}

fn record(event_id: &str, secs: i64, owner: OwnerFacts, fact: Fact) -> SubscriptionCommand {
    SubscriptionCommand::RecordStripeFacts(StripeFacts {
        customer_id: CUSTOMER.to_owned(),
        source: source(event_id, secs),
        owner,
        fact,
    })
}

fn snap_cmd(event_id: &str, secs: i64, facts: SubscriptionFacts) -> SubscriptionCommand {
    record(
        event_id,
        secs,
        OwnerFacts::default(),
        Fact::Subscription(facts),
    )
}

/// The events that put the subscription in `status` at second `secs`, built by `decide`
/// itself from an empty state (the `given` of a scenario).
fn given_status(status: SubscriptionStatus, secs: i64) -> Vec<SubscriptionEvent> {
    decide(
        &Subscription::default(),
        &snap_cmd("evt_given", secs, snapshot(status)),
    )
    .unwrap()
    .events
}

fn fold(events: &[SubscriptionEvent]) -> Subscription {
    let mut state = Subscription::default();
    for event in events {
        cqrs_es::Aggregate::apply(&mut state, event.clone());
    }
    state
}

#[test]
fn every_pair_of_the_table_as_given_when_then() {
    let froms = std::iter::once(None).chain(SubscriptionStatus::ALL.into_iter().map(Some));
    let mut checked = 0;
    for from in froms {
        for to in SubscriptionStatus::ALL {
            let given = from
                .map(|status| given_status(status, 0))
                .unwrap_or_default();
            let mut next = snapshot(to);
            // A refresh must change something to be more than a duplicate.
            next.current_period_end = Some(at(60 * 86_400));
            let when = snap_cmd("evt_when", 100, next.clone());
            let mv = transition(from, to);
            let executor = Framework::with(()).given(given.clone());
            if mv.is_legal() {
                let mut state = fold(&given);
                state.customer_id = Some(CUSTOMER.to_owned());
                let expected_view = {
                    let mut after = state.clone();
                    after
                        .subscriptions
                        .entry(SUB.to_owned())
                        .or_default()
                        .snapshot = Some(Observed {
                        value: next.clone(),
                        observed_at: at(100),
                        stripe_event_id: "evt_when".to_owned(),
                    });
                    after.view()
                };
                executor.when(when).then_expect_events(vec![
                    SubscriptionEvent::SubscriptionChanged {
                        source: source("evt_when", 100),
                        from,
                        transition: mv,
                        subscription: next,
                        view: expected_view,
                    },
                ]);
            } else {
                executor
                    .when(when)
                    .then_expect_error(SubscriptionError::Rejected(Rejection::IllegalTransition {
                        subscription_id: SUB.to_owned(),
                        from,
                        to,
                    }));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 9 * 8);
}

#[test]
fn an_older_fact_delivered_late_is_stale() {
    use SubscriptionStatus::*;
    Framework::with(())
        .given(given_status(Active, 50))
        .when(snap_cmd("evt_old", 10, snapshot(PastDue)))
        .then_expect_error(SubscriptionError::Rejected(Rejection::Stale {
            subscription_id: SUB.to_owned(),
            created: at(10),
            applied: at(50),
        }));
}

#[test]
fn same_second_incomplete_cannot_undo_activation() {
    use SubscriptionStatus::*;
    // Stripe stamped created(incomplete) and updated(active) with one second; delivered
    // in reverse, the incomplete snapshot must not win.
    let result = Framework::with(())
        .given(given_status(Active, 5))
        .when(snap_cmd("evt_created", 5, snapshot(Incomplete)))
        .inspect_result();
    assert_eq!(
        result,
        Err(SubscriptionError::Rejected(Rejection::IllegalTransition {
            subscription_id: SUB.to_owned(),
            from: Some(Active),
            to: Incomplete
        }))
    );
    // In order, the same second moves forward.
    let events = Framework::with(())
        .given(given_status(Incomplete, 5))
        .when(snap_cmd("evt_updated", 5, snapshot(Active)))
        .inspect_result()
        .unwrap();
    assert_eq!(
        events[0].view().subscription.as_ref().unwrap().status,
        Active
    );
}

#[test]
fn same_second_order_is_decided_by_rank_not_arrival() {
    use SubscriptionStatus::*;
    // active and past_due are legal both ways; on one second past_due (higher rank) wins.
    let rejected = Framework::with(())
        .given(given_status(PastDue, 7))
        .when(snap_cmd("evt_a", 7, snapshot(Active)))
        .inspect_result();
    assert_eq!(
        rejected,
        Err(SubscriptionError::Rejected(Rejection::SameSecond {
            subscription_id: SUB.to_owned(),
            from: PastDue,
            to: Active
        }))
    );
    let accepted = Framework::with(())
        .given(given_status(Active, 7))
        .when(snap_cmd("evt_b", 7, snapshot(PastDue)))
        .inspect_result()
        .unwrap();
    assert_eq!(accepted.len(), 1);
}

#[test]
fn a_duplicate_snapshot_records_nothing() {
    use SubscriptionStatus::*;
    let given = given_status(Active, 3);
    let decision = decide(&fold(&given), &snap_cmd("evt_again", 3, snapshot(Active))).unwrap();
    assert_eq!(
        decision,
        Decision {
            events: vec![],
            outcome: Outcome::Duplicate
        }
    );
}

#[test]
fn a_newer_identical_snapshot_still_advances_the_clock() {
    use SubscriptionStatus::*;
    // Without advancing, a past_due fact from second 5 would later win over the
    // identical active fact from second 9.
    let mut events = given_status(Active, 1);
    let state = fold(&events);
    let decision = decide(&state, &snap_cmd("evt_same", 9, snapshot(Active))).unwrap();
    assert_eq!(decision.outcome, Outcome::Applied);
    events.extend(decision.events);
    let late = decide(&fold(&events), &snap_cmd("evt_late", 5, snapshot(PastDue))).unwrap();
    assert!(matches!(
        late.outcome,
        Outcome::Rejected(Rejection::Stale { .. })
    ));
}

#[test]
fn resubscribing_makes_the_new_subscription_current() {
    use SubscriptionStatus::*;
    let mut events = given_status(Canceled, 10);
    let mut fresh = snapshot(Active);
    fresh.id = "sub_new".to_owned();
    fresh.created = Some(at(20));
    let decision = decide(&fold(&events), &snap_cmd("evt_new", 20, fresh)).unwrap();
    events.extend(decision.events);
    let view = fold(&events).view();
    assert_eq!(view.subscription.unwrap().id, "sub_new");
    // The old one's late cancellation refresh does not displace it.
    let mut old = snapshot(Canceled);
    old.ended_at = Some(at(11));
    let decision = decide(&fold(&events), &snap_cmd("evt_old", 11, old)).unwrap();
    events.extend(decision.events);
    assert_eq!(fold(&events).view().subscription.unwrap().id, "sub_new");
}

#[test]
fn ownership_converges_whatever_the_order() {
    let owner = |org: &str| OwnerFacts {
        org_id: Some(org.to_owned()),
        user_id: Some("user_1".to_owned()),
        account: None,
    };
    let first = record("evt_1", 1, owner("org_a"), Fact::OwnerOnly);
    let second = record("evt_2", 2, owner("org_b"), Fact::OwnerOnly);
    for order in [[&first, &second], [&second, &first]] {
        let mut events = Vec::new();
        for command in order {
            events.extend(decide(&fold(&events), command).unwrap().events);
        }
        let view = fold(&events).view();
        assert_eq!(view.org_id.as_deref(), Some("org_b"));
        assert_eq!(view.user_id.as_deref(), Some("user_1"));
    }
    let empty = decide(
        &Subscription::default(),
        &record("evt_3", 3, OwnerFacts::default(), Fact::OwnerOnly),
    );
    assert!(matches!(
        empty.unwrap().outcome,
        Outcome::NothingToRecord(_)
    ));
}

#[test]
fn a_stale_snapshot_still_records_its_ownership() {
    use SubscriptionStatus::*;
    let given = given_status(Active, 50);
    let command = record(
        "evt_old",
        10,
        OwnerFacts {
            org_id: Some("org_x".to_owned()),
            user_id: None,
            account: None,
        },
        Fact::Subscription(snapshot(Trialing)),
    );
    let decision = decide(&fold(&given), &command).unwrap();
    assert!(matches!(
        decision.outcome,
        Outcome::Rejected(Rejection::Stale { .. })
    ));
    assert_eq!(decision.events.len(), 1);
    assert_eq!(decision.events[0].view().org_id.as_deref(), Some("org_x"));
    assert_eq!(
        decision.events[0]
            .view()
            .subscription
            .as_ref()
            .unwrap()
            .status,
        Active
    );
}

fn invoice(id: &str, created: i64, status: &str, attempts: u32) -> Fact {
    Fact::Invoice {
        subscription_id: SUB.to_owned(),
        invoice: InvoiceFacts {
            id: id.to_owned(),
            status: Some(status.to_owned()),
            attempt_count: attempts,
            next_payment_attempt: None,
            created: Some(at(created)),
            amount_due: Some(1000),
            currency: Some("usd".to_owned()),
        },
    }
}

#[test]
fn invoices_converge_to_the_newest_and_most_settled() {
    use SubscriptionStatus::*;
    let commands = [
        record(
            "evt_i1",
            10,
            OwnerFacts::default(),
            invoice("in_1", 10, "open", 1),
        ),
        record(
            "evt_i2",
            20,
            OwnerFacts::default(),
            invoice("in_1", 10, "paid", 2),
        ),
        record(
            "evt_i3",
            40,
            OwnerFacts::default(),
            invoice("in_2", 40, "open", 1),
        ),
    ];
    let expected = {
        let mut events = given_status(Active, 1);
        for command in &commands {
            events.extend(decide(&fold(&events), command).unwrap().events);
        }
        fold(&events).view()
    };
    assert_eq!(expected.latest_invoice.as_ref().unwrap().id, "in_2");
    for order in [[2, 1, 0], [1, 2, 0], [0, 2, 1]] {
        // The invoice may even arrive before the subscription it belongs to.
        let mut events = Vec::new();
        for i in order {
            events.extend(decide(&fold(&events), &commands[i]).unwrap().events);
        }
        events.extend(
            decide(&fold(&events), &snap_cmd("evt_given", 1, snapshot(Active)))
                .unwrap()
                .events,
        );
        assert_eq!(fold(&events).view(), expected);
    }
    let stale = decide(
        &fold(&given_status(Active, 1)),
        &record(
            "evt_dup",
            10,
            OwnerFacts::default(),
            invoice("in_1", 10, "open", 1),
        ),
    )
    .unwrap();
    assert_eq!(stale.outcome, Outcome::Applied);
}

#[test]
fn a_command_for_another_customer_is_refused() {
    use SubscriptionStatus::*;
    let mut state = fold(&given_status(Active, 1));
    state.customer_id = Some("cus_other".to_owned());
    assert!(matches!(
        decide(&state, &snap_cmd("evt_x", 2, snapshot(Active))),
        Err(SubscriptionError::WrongCustomer { .. })
    ));
}

// --- Reconcile: what Stripe's API answered, ordered by the time the request was sent ---

fn api_snapshot(
    secs: i64,
    subscriptions: Vec<(SubscriptionFacts, Option<PaymentMethodFacts>)>,
) -> SubscriptionCommand {
    SubscriptionCommand::Reconcile(ApiSnapshot {
        customer_id: CUSTOMER.to_owned(),
        sync_id: format!("sync_{secs}"),
        api_call: "api.subscriptions.list".to_owned(),
        fetched_at: at(secs),
        owner: OwnerFacts::default(),
        subscriptions,
        entitlements: None,
    })
}

fn api_source(secs: i64) -> FactSource {
    FactSource {
        stripe_event_id: format!("sync_{secs}"),
        stripe_event_type: "api.subscriptions.list".to_owned(),
        created: at(secs),
    }
}

fn visa() -> PaymentMethodFacts {
    PaymentMethodFacts {
        id: "pm_1".to_owned(),
        brand: Some("visa".to_owned()),
        last4: Some("4242".to_owned()),
    }
}

/// The events `decide` makes for `command` after `given`.
fn decided(given: &[SubscriptionEvent], command: &SubscriptionCommand) -> Decision {
    let mut state = fold(given);
    state.customer_id = Some(CUSTOMER.to_owned());
    decide(&state, command).unwrap()
}

#[test]
fn reconcile_records_a_subscription_whose_webhooks_never_came() {
    use SubscriptionStatus::*;
    let command = api_snapshot(100, vec![(snapshot(Active), Some(visa()))]);
    let decision = decided(&[], &command);
    let [SubscriptionEvent::SubscriptionReconciled {
        from: None,
        transition: Move::First,
        view,
        ..
    }] = decision.events.as_slice()
    else {
        panic!("expected one SubscriptionReconciled, got {decision:?}");
    };
    assert_eq!(view.subscription.as_ref().map(|s| s.status), Some(Active));
    assert_eq!(view.payment_method, Some(visa()));
    assert_eq!(view.as_of, Some(at(100)));
    Framework::with(())
        .given_no_previous_events()
        .when(command)
        .then_expect_events(decision.events);
}

#[test]
fn reconcile_records_what_differs_and_nothing_else() {
    use SubscriptionStatus::*;
    let given = given_status(Active, 10);
    // Same as held: nothing to record.
    Framework::with(())
        .given(given.clone())
        .when(api_snapshot(100, vec![(snapshot(Active), None)]))
        .then_expect_events(vec![]);
    assert_eq!(
        decided(&given, &api_snapshot(100, vec![(snapshot(Active), None)])).outcome,
        Outcome::Duplicate
    );
    // Differs: recorded, as a step of the table.
    let events = decided(&given, &api_snapshot(100, vec![(snapshot(PastDue), None)])).events;
    Framework::with(())
        .given(given)
        .when(api_snapshot(100, vec![(snapshot(PastDue), None)]))
        .then_expect_events(events.clone());
    assert!(matches!(
        events.as_slice(),
        [SubscriptionEvent::SubscriptionReconciled {
            from: Some(Active),
            transition: Move::Step,
            source,
            ..
        }] if *source == api_source(100)
    ));
}

#[test]
fn a_late_older_webhook_cannot_undo_a_reconcile() {
    use SubscriptionStatus::*;
    // Webhooks said active at 10; the API said canceled when asked at 100; a past_due
    // webhook from 50 arrives only now. It happened before the API answered: stale.
    let mut given = given_status(Active, 10);
    let mut state = fold(&given);
    state.customer_id = Some(CUSTOMER.to_owned());
    given.extend(
        decide(&state, &api_snapshot(100, vec![(snapshot(Canceled), None)]))
            .unwrap()
            .events,
    );
    Framework::with(())
        .given(given.clone())
        .when(snap_cmd("evt_late", 50, snapshot(PastDue)))
        .then_expect_error(SubscriptionError::Rejected(Rejection::Stale {
            subscription_id: SUB.to_owned(),
            created: at(50),
            applied: at(100),
        }));
    // A webhook from after the request is judged by the table as usual (canceled is
    // terminal, so even a newer active is refused).
    Framework::with(())
        .given(given)
        .when(snap_cmd("evt_newer", 150, snapshot(Active)))
        .then_expect_error(SubscriptionError::Rejected(Rejection::IllegalTransition {
            subscription_id: SUB.to_owned(),
            from: Some(Canceled),
            to: Active,
        }));
}

#[test]
fn a_webhook_newer_than_the_request_is_kept() {
    use SubscriptionStatus::*;
    // The API answer may predate a change whose webhook already came: keep the webhook.
    Framework::with(())
        .given(given_status(PastDue, 200))
        .when(api_snapshot(100, vec![(snapshot(Active), None)]))
        .then_expect_events(vec![]);
}

#[test]
fn reconcile_takes_the_api_answer_even_where_the_table_says_illegal() {
    use SubscriptionStatus::*;
    // We held canceled (wrongly); Stripe's API says active: the API is the truth.
    let given = given_status(Canceled, 10);
    let events = decided(&given, &api_snapshot(100, vec![(snapshot(Active), None)])).events;
    assert!(matches!(
        events.as_slice(),
        [SubscriptionEvent::SubscriptionReconciled {
            from: Some(Canceled),
            transition: Move::Illegal,
            ..
        }]
    ));
    Framework::with(())
        .given(given)
        .when(api_snapshot(100, vec![(snapshot(Active), None)]))
        .then_expect_events(events);
}

#[test]
fn reconcile_in_the_same_second_as_a_webhook_is_ordered_like_two_webhooks() {
    use SubscriptionStatus::*;
    // Same second, illegal move: the answer may predate the webhook; refused, and the
    // caller asks again later.
    Framework::with(())
        .given(given_status(Active, 100))
        .when(api_snapshot(100, vec![(snapshot(Incomplete), None)]))
        .then_expect_error(SubscriptionError::Rejected(Rejection::IllegalTransition {
            subscription_id: SUB.to_owned(),
            from: Some(Active),
            to: Incomplete,
        }));
    // Same second, canceled outranks active: taken.
    let given = given_status(Active, 100);
    let command = api_snapshot(100, vec![(snapshot(Canceled), None)]);
    let events = decided(&given, &command).events;
    assert_eq!(events.len(), 1);
    Framework::with(())
        .given(given)
        .when(command)
        .then_expect_events(events);
}

#[test]
fn a_changed_payment_method_alone_is_recorded() {
    use SubscriptionStatus::*;
    let given = given_status(Active, 10);
    let command = api_snapshot(100, vec![(snapshot(Active), Some(visa()))]);
    let decision = decided(&given, &command);
    assert_eq!(decision.outcome, Outcome::Applied);
    assert_eq!(decision.events[0].view().payment_method, Some(visa()));
    // Asked again: the same answer records nothing.
    let mut after = given.clone();
    after.extend(decision.events);
    Framework::with(())
        .given(after)
        .when(api_snapshot(200, vec![(snapshot(Active), Some(visa()))]))
        .then_expect_events(vec![]);
}

#[test]
fn reconcile_for_another_customer_is_refused() {
    let SubscriptionCommand::Reconcile(mut snapshot) = api_snapshot(100, vec![]) else {
        unreachable!()
    };
    snapshot.customer_id = "cus_other".to_owned();
    Framework::with(())
        .given(given_status(SubscriptionStatus::Active, 10))
        .when(SubscriptionCommand::Reconcile(snapshot))
        .then_expect_error(SubscriptionError::WrongCustomer {
            expected: CUSTOMER.to_owned(),
            got: "cus_other".to_owned(),
        });
}

#[test]
fn a_deleted_customer_is_recorded_once_and_its_view_says_so() {
    let given = given_status(SubscriptionStatus::Active, 0);
    let delete = record("evt_del", 10, OwnerFacts::default(), Fact::CustomerDeleted);
    let first = decided(&given, &delete);
    assert_eq!(first.outcome, Outcome::Applied);
    assert!(matches!(
        first.events.as_slice(),
        [SubscriptionEvent::CustomerDeleted { view, .. }] if view.deleted
    ));
    let mut all = given.clone();
    all.extend(first.events);
    let again = decided(
        &all,
        &record("evt_del2", 20, OwnerFacts::default(), Fact::CustomerDeleted),
    );
    assert_eq!((again.outcome, again.events.len()), (Outcome::Duplicate, 0));
}

#[test]
fn the_entitlements_summary_is_a_register_the_newest_wins_whatever_the_order() {
    let summary = |id: &str, secs: i64, keys: &[&str]| {
        record(
            id,
            secs,
            OwnerFacts::default(),
            Fact::Entitlements {
                features: keys.iter().map(|k| k.to_string()).collect(),
            },
        )
    };
    let newer = summary("evt_new", 20, &["sso", "audit_log"]);
    let older = summary("evt_old", 10, &["sso"]);
    let run = |commands: &[&SubscriptionCommand]| {
        let mut state = Subscription::default();
        let mut outcomes = Vec::new();
        for command in commands {
            let decision = decide(&state, command).unwrap();
            outcomes.push(decision.outcome.label());
            for event in decision.events {
                cqrs_es::Aggregate::apply(&mut state, event);
            }
        }
        (state.view().stripe_features, outcomes)
    };
    let (a, outcomes) = run(&[&older, &newer]);
    let (b, late) = run(&[&newer, &older, &newer]);
    assert_eq!(a, Some(vec!["audit_log".to_owned(), "sso".to_owned()]));
    assert_eq!(a, b);
    assert_eq!(outcomes, ["applied", "applied"]);
    assert_eq!(late, ["applied", "stale", "duplicate"]);
}

#[test]
fn the_view_lists_every_subscription_newest_first() {
    let mut old = snapshot(SubscriptionStatus::Active);
    old.id = "sub_old".to_owned();
    let mut new = snapshot(SubscriptionStatus::Incomplete);
    new.id = "sub_new".to_owned();
    new.created = Some(at(100));
    let mut state = Subscription::default();
    for command in [snap_cmd("evt_1", 0, old), snap_cmd("evt_2", 100, new)] {
        for event in decide(&state, &command).unwrap().events {
            cqrs_es::Aggregate::apply(&mut state, event);
        }
    }
    let view = state.view();
    let ids: Vec<&str> = view
        .subscriptions
        .iter()
        .map(|s| s.subscription.id.as_str())
        .collect();
    assert_eq!(ids, ["sub_new", "sub_old"]);
    assert_eq!(view.all_subscriptions().len(), 2);
}

#[test]
fn a_view_and_facts_stored_before_items_and_subscriptions_read_as_their_one_subscription() {
    // The JSON main (6482bbc) stored: no `subscriptions`, no `items`, no `deleted`.
    let old = r#"{"as_of": "2025-11-01T00:00:00Z", "org_id": "org_1", "user_id": null,
        "customer_id": "cus_1", "latest_invoice": null, "subscription": {"id": "sub_1",
        "status": "active", "created": "2025-10-01T00:00:00Z", "currency": "usd", "ended_at": null,
        "price_id": "price_pro", "quantity": 3, "cancel_at": null, "trial_end": null,
        "lookup_key": "pro_monthly", "product_id": "prod_pro", "canceled_at": null, "trial_start": null,
        "latest_invoice_id": null, "current_period_end": "2025-12-01T00:00:00Z",
        "cancel_at_period_end": false, "current_period_start": "2025-11-01T00:00:00Z"}}"#;
    let view: CustomerView = serde_json::from_str(old).unwrap();
    assert!(!view.deleted);
    let subs = view.all_subscriptions();
    assert_eq!(subs.len(), 1);
    let items = subs[0].subscription.all_items();
    assert_eq!(items.len(), 1);
    assert_eq!(
        (
            items[0].price_id.as_deref(),
            items[0].quantity,
            items[0].is_licensed()
        ),
        (Some("price_pro"), Some(3), true)
    );
    // And it is written back unchanged: the new fields are skipped when empty.
    let again: serde_json::Value = serde_json::to_value(&view).unwrap();
    assert!(again.get("subscriptions").is_none() && again.get("deleted").is_none());
}

/// The Connect account is a register like the owner: the newest event naming one wins
/// whatever the delivery order, an event naming none leaves it, and the view shows it.
#[test]
fn the_connect_account_is_the_newest_named_whatever_the_order() {
    let named = |account: Option<&str>| OwnerFacts {
        account: account.map(str::to_owned),
        ..OwnerFacts::default()
    };
    let first = record("evt_1", 1, named(Some("acct_a")), Fact::OwnerOnly);
    let second = record("evt_2", 2, named(Some("acct_b")), Fact::OwnerOnly);
    let silent = record("evt_3", 3, named(None), Fact::OwnerOnly);
    for order in [
        [&first, &second, &silent],
        [&second, &first, &silent],
        [&silent, &second, &first],
    ] {
        let mut events = Vec::new();
        for command in order {
            events.extend(decide(&fold(&events), command).unwrap().events);
        }
        assert_eq!(fold(&events).view().account.as_deref(), Some("acct_b"));
    }
    // An API answer naming the account already held records nothing.
    let given = decide(&Subscription::default(), &first).unwrap().events;
    let snapshot = ApiSnapshot {
        customer_id: CUSTOMER.to_owned(),
        sync_id: "sync_1".to_owned(),
        api_call: "api.subscriptions.list".to_owned(),
        fetched_at: at(5),
        owner: named(Some("acct_a")),
        subscriptions: vec![],
        entitlements: None,
    };
    let decision = decide(&fold(&given), &SubscriptionCommand::Reconcile(snapshot)).unwrap();
    assert!(decision.events.is_empty());
}

/// An `OwnerLinked` event stored before Connect was read has no `account`: it replays.
#[test]
fn an_owner_linked_event_without_an_account_replays() {
    let stored = serde_json::json!({"OwnerLinked": {
        "source": {"stripe_event_id": "evt_1", "stripe_event_type": "customer.created",
            "created": "2023-11-14T22:13:20Z"},
        "org_id": "org_1", "user_id": null,
        "view": {"customer_id": CUSTOMER, "org_id": "org_1", "user_id": null,
            "subscription": null, "latest_invoice": null, "as_of": null}}});
    let event: SubscriptionEvent = serde_json::from_value(stored).unwrap();
    let state = fold(&[event]);
    assert_eq!(state.view().org_id.as_deref(), Some("org_1"));
    assert_eq!(state.view().account, None);
}
