//! Looking inside one customer, for people: what the log holds and what each event
//! changed, what the inbox made of every Stripe event (rejections and their reasons
//! included), and whether the Redis value and the `subscriptions` row agree with the log.
//! `subledger inspect` / `explain` print it; the admin page draws it.
//!
//! The log is the reference: the answer the log gives is rebuilt here by folding the
//! customer's events exactly as the aggregate does, and the projections are compared with
//! it. This module only reads; it must never judge a Stripe fact nor repair a projection
//! on its own.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use aggregates::{Move, Subscription, SubscriptionEvent, SubscriptionStatus};
use chrono::{DateTime, Utc};
use event_store::{read, StoreError};
use projections::{Catalog, Entitlement, PlatformTables, RedisCache, SubscriptionInfo};
use serde_json::Value;
use sqlx::PgPool;

use crate::inbox::{self, InboxEntry};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot read Postgres")]
    Database(#[from] sqlx::Error),
    #[error("event {customer_id}#{sequence} in the log cannot be decoded")]
    Decode {
        customer_id: String,
        sequence: i64,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read the event log")]
    Log(#[source] StoreError),
}

impl From<StoreError> for InspectError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Database(error) => InspectError::Database(error),
            StoreError::Json {
                aggregate_id,
                sequence,
                source,
            } => InspectError::Decode {
                customer_id: aggregate_id,
                sequence,
                source,
            },
            other => InspectError::Log(other),
        }
    }
}

/// One event of the customer's log and the change it made.
#[derive(Debug, Clone)]
pub struct TimelineEntry {
    pub sequence: i64,
    pub recorded_at: DateTime<Utc>,
    pub event_type: &'static str,
    pub stripe_event_id: String,
    pub stripe_event_type: String,
    pub stripe_created: DateTime<Utc>,
    /// A status move of the transition table, when the event made one.
    pub transition: Option<(Option<SubscriptionStatus>, SubscriptionStatus, Move)>,
    /// What the event changed, in words.
    pub change: String,
}

/// A Redis key as it is now.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    pub key: String,
    pub value: Option<String>,
    /// Seconds left; -1 without a TTL, -2 when the key does not exist.
    pub ttl_secs: i64,
}

impl CacheEntry {
    /// The TTL for people: `absent`, `no TTL`, or seconds left.
    pub fn ttl_text(&self) -> String {
        match self.ttl_secs {
            -2 => "absent".to_owned(),
            -1 => "no TTL".to_owned(),
            s => format!("TTL {s} s"),
        }
    }
}

/// A field on which the log, the table and the cache do not all agree (`None`: that
/// copy does not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub field: String,
    pub log: Option<String>,
    pub table: Option<String>,
    pub cache: Option<String>,
}

/// Everything known about one customer.
#[derive(Debug, Clone)]
pub struct CustomerReport {
    pub customer_id: String,
    /// The aggregate's state, folded from the log.
    pub state: Subscription,
    pub timeline: Vec<TimelineEntry>,
    pub inbox: Vec<InboxEntry>,
    /// The answer the log gives (what every projection should hold).
    pub log: Option<SubscriptionInfo>,
    /// The `subscriptions` row.
    pub table: Option<SubscriptionInfo>,
    /// The cached value (customer key decoded), `None` when absent or undecodable.
    pub cache: Option<SubscriptionInfo>,
    /// The customer key and the org/user keys, raw, with TTLs.
    pub cache_keys: Vec<CacheEntry>,
    /// Set when Redis could not be read.
    pub cache_error: Option<String>,
    pub differences: Vec<Difference>,
    pub entitlement: Entitlement,
    pub explanation: String,
}

impl CustomerReport {
    /// Nothing at all is known about this customer.
    pub fn is_unknown(&self) -> bool {
        self.timeline.is_empty() && self.inbox.is_empty() && self.table.is_none()
    }

    /// The status path the customer's subscriptions took, in log order.
    pub fn path(&self) -> Vec<(Option<SubscriptionStatus>, SubscriptionStatus)> {
        self.timeline
            .iter()
            .filter_map(|t| t.transition.map(|(from, to, _)| (from, to)))
            .collect()
    }
}

fn describe(event: &SubscriptionEvent) -> String {
    match event {
        SubscriptionEvent::OwnerLinked {
            org_id,
            user_id,
            account,
            ..
        } => {
            let mut parts = Vec::new();
            parts.extend(org_id.as_ref().map(|o| format!("org {o}")));
            parts.extend(user_id.as_ref().map(|u| format!("user {u}")));
            parts.extend(account.as_ref().map(|a| format!("Connect account {a}")));
            format!("owner linked: {}", parts.join(", "))
        }
        SubscriptionEvent::SubscriptionChanged {
            from,
            transition,
            subscription,
            ..
        } => format!(
            "{}: {} -> {} ({})",
            subscription.id,
            from.map_or("none", |s| s.as_str()),
            subscription.status,
            transition.as_str()
        ),
        SubscriptionEvent::SubscriptionReconciled {
            from,
            transition,
            subscription,
            ..
        } => format!(
            "{}: {} -> {} ({}, from Stripe's API)",
            subscription.id,
            from.map_or("none", |s| s.as_str()),
            subscription.status,
            transition.as_str()
        ),
        SubscriptionEvent::InvoiceRecorded {
            subscription_id,
            invoice,
            ..
        } => format!(
            "invoice {} of {subscription_id}: {} (attempt {})",
            invoice.id,
            invoice.status.as_deref().unwrap_or("no status"),
            invoice.attempt_count
        ),
        SubscriptionEvent::PaymentRecorded { payment, .. } => {
            format!("payment {}: {}", payment.id, payment.status)
        }
        SubscriptionEvent::CustomerDeleted { .. } => {
            "customer deleted in Stripe: its owner links end".to_owned()
        }
        SubscriptionEvent::EntitlementsRecorded { features, .. } => {
            format!("Stripe entitlements: [{}]", features.join(", "))
        }
    }
}

/// Reads everything about `customer_id`, judging access at `now`.
pub async fn inspect(
    pool: &PgPool,
    cache: &RedisCache,
    catalog: &Catalog,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<CustomerReport, InspectError> {
    let history = read::history(pool, customer_id).await?;
    let mut state = Subscription::default();
    let mut timeline = Vec::with_capacity(history.len());
    let mut last = None;
    for read::Recorded {
        event: logged,
        recorded_at,
    } in history
    {
        let event = &logged.event;
        let source = event.source();
        timeline.push(TimelineEntry {
            sequence: logged.sequence as i64,
            recorded_at,
            event_type: match event {
                SubscriptionEvent::OwnerLinked { .. } => "OwnerLinked",
                SubscriptionEvent::SubscriptionChanged { .. } => "SubscriptionChanged",
                SubscriptionEvent::InvoiceRecorded { .. } => "InvoiceRecorded",
                SubscriptionEvent::PaymentRecorded { .. } => "PaymentRecorded",
                SubscriptionEvent::SubscriptionReconciled { .. } => "SubscriptionReconciled",
                SubscriptionEvent::CustomerDeleted { .. } => "CustomerDeleted",
                SubscriptionEvent::EntitlementsRecorded { .. } => "EntitlementsRecorded",
            },
            stripe_event_id: source.stripe_event_id.clone(),
            stripe_event_type: source.stripe_event_type.clone(),
            stripe_created: source.created,
            transition: match event {
                SubscriptionEvent::SubscriptionChanged {
                    from,
                    transition,
                    subscription,
                    ..
                }
                | SubscriptionEvent::SubscriptionReconciled {
                    from,
                    transition,
                    subscription,
                    ..
                } => Some((*from, subscription.status, *transition)),
                _ => None,
            },
            change: describe(event),
        });
        state.apply_event(event);
        last = Some(logged);
    }
    // The same construction the projections use, so equal inputs give equal answers.
    let log = last.map(|logged| SubscriptionInfo::from_logged(&logged, catalog));

    let inbox = inbox::of_customer(pool, customer_id).await?;
    let table = PlatformTables::customer(pool, customer_id).await?;

    let keys = cache.keys();
    let mut key_names = vec![keys.customer(customer_id)];
    for info in [&log, &table].into_iter().flatten() {
        key_names.extend(info.org_id.as_deref().map(|o| keys.org(o)));
        key_names.extend(info.user_id.as_deref().map(|u| keys.user(u)));
    }
    key_names.dedup();
    let mut cache_keys = Vec::new();
    let mut cache_error = None;
    for key in key_names {
        if cache_keys.iter().any(|k: &CacheEntry| k.key == key) {
            continue;
        }
        match cache.inspect_key(&key, customer_id).await {
            Ok((value, ttl_secs)) => cache_keys.push(CacheEntry {
                key,
                value,
                ttl_secs,
            }),
            Err(error) => {
                cache_error = Some(crate::error_chain::error_chain(&error));
                break;
            }
        }
    }
    let cached = cache_keys
        .first()
        .and_then(|k| k.value.as_deref())
        .and_then(|raw| serde_json::from_str::<SubscriptionInfo>(raw).ok());

    let differences = differences(log.as_ref(), table.as_ref(), cached.as_ref());
    let reference = log.as_ref().or(table.as_ref());
    let entitlement = catalog.entitlement(
        None,
        None,
        &reference.cloned().into_iter().collect::<Vec<_>>(),
        now,
    );
    let explanation = explain(customer_id, reference, catalog, &entitlement, &differences);
    Ok(CustomerReport {
        customer_id: customer_id.to_owned(),
        state,
        timeline,
        inbox,
        log,
        table,
        cache: cached,
        cache_keys,
        cache_error,
        differences,
        entitlement,
        explanation,
    })
}

fn fields(info: Option<&SubscriptionInfo>) -> Option<serde_json::Map<String, Value>> {
    match serde_json::to_value(info?) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Field by field, where the three copies of the answer do not all agree.
pub fn differences(
    log: Option<&SubscriptionInfo>,
    table: Option<&SubscriptionInfo>,
    cache: Option<&SubscriptionInfo>,
) -> Vec<Difference> {
    let copies = [fields(log), fields(table), fields(cache)];
    let names: BTreeSet<&String> = copies.iter().flatten().flat_map(|m| m.keys()).collect();
    let show = |copy: &Option<serde_json::Map<String, Value>>, name: &str| {
        copy.as_ref()
            .map(|m| m.get(name).cloned().unwrap_or(Value::Null).to_string())
    };
    let mut out = Vec::new();
    if copies.iter().any(Option::is_none) && copies.iter().any(Option::is_some) {
        let presence =
            |c: &Option<_>| Some(if c.is_some() { "present" } else { "missing" }.to_owned());
        out.push(Difference {
            field: "(value)".to_owned(),
            log: presence(&copies[0]),
            table: presence(&copies[1]),
            cache: presence(&copies[2]),
        });
    }
    for name in names {
        let values: Vec<Option<String>> = copies.iter().map(|c| show(c, name)).collect();
        let present: Vec<&String> = values.iter().flatten().collect();
        if present.windows(2).any(|w| w[0] != w[1]) {
            let [log, table, cache]: [Option<String>; 3] = values.try_into().expect("three copies");
            out.push(Difference {
                field: name.clone(),
                log,
                table,
                cache,
            });
        }
    }
    out
}

/// Why the customer has or lacks access, in one sentence (plus a note when the
/// projections disagree with the log).
pub fn explain(
    customer_id: &str,
    info: Option<&SubscriptionInfo>,
    catalog: &Catalog,
    entitlement: &Entitlement,
    differences: &[Difference],
) -> String {
    let granting: Vec<&str> = catalog.access.grant.iter().map(|s| s.as_str()).collect();
    let mut sentence = match info {
        None => format!(
            "{customer_id} lacks access: subledger holds no event about this customer."
        ),
        Some(info) if info.status == SubscriptionInfo::NO_SUBSCRIPTION => format!(
            "{customer_id} lacks access: no subscription is recorded for this customer (only ownership, invoice or payment facts)."
        ),
        Some(info) => {
            let sub = info.subscription_id.as_deref().unwrap_or("?");
            let plan = entitlement
                .plan
                .as_deref()
                .map(|p| format!(", plan {p}"))
                .unwrap_or_default();
            let granted = info
                .status
                .parse::<SubscriptionStatus>()
                .is_ok_and(|s| catalog.access.grant.contains(&s));
            if entitlement.access {
                let until = entitlement
                    .access_until
                    .map_or("with no period end".to_owned(), |end| {
                        format!("until its period ends at {}", end.to_rfc3339())
                    });
                let features = if entitlement.features.is_empty() {
                    "no features".to_owned()
                } else {
                    format!("features {}", entitlement.features.join(", "))
                };
                format!(
                    "{customer_id} has access: subscription {sub} is {}, which grants access, {until} ({features}{plan}).",
                    info.status
                )
            } else if granted {
                format!(
                    "{customer_id} lacks access: subscription {sub} is {} but its period ended at {} and no renewal has been recorded{plan}.",
                    info.status,
                    info.current_period_end
                        .map_or("?".to_owned(), |end| end.to_rfc3339())
                )
            } else {
                format!(
                    "{customer_id} lacks access: subscription {sub} is {}, and only {} grant access{plan}.",
                    info.status,
                    granting.join(", ")
                )
            }
        }
    };
    if !differences.is_empty() {
        let fields: Vec<&str> = differences.iter().map(|d| d.field.as_str()).collect();
        let _ = write!(
            sentence,
            " Note: the cache or the table differ from the log on {} (the projections catch up on their own; `subledger replay` rebuilds them).",
            fields.join(", ")
        );
    }
    sentence
}

/// A customer a search found, by what, and what its `subscriptions` row holds.
pub use projections::platform::SearchHit;

/// Customers a customer, org, user or subscription id names (exact match), from the
/// table, the subscription mirror, the log and the inbox, so a customer whose events
/// were all rejected is found too. Each is read through the module that owns it.
pub async fn search(pool: &PgPool, q: &str) -> Result<Vec<SearchHit>, sqlx::Error> {
    let known = read::aggregate_exists(pool, q).await? || inbox::has_customer(pool, q).await?;
    let known: &[&str] = if known { &[q] } else { &[] };
    PlatformTables::search(pool, q, known).await
}

fn or_dash(value: Option<&str>) -> &str {
    value.unwrap_or("-")
}

/// The report as text, for `subledger inspect`.
pub fn render_text(report: &CustomerReport) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "customer {}", report.customer_id);
    let _ = writeln!(w, "\n{}", report.explanation);

    let _ = writeln!(w, "\n== current state (folded from the log) ==");
    match &report.log {
        Some(info) => {
            let _ = writeln!(
                w,
                "status {}  subscription {}  plan {}  period end {}  version {}",
                info.status,
                or_dash(info.subscription_id.as_deref()),
                or_dash(info.plan.as_deref()),
                info.current_period_end
                    .map_or("-".to_owned(), |t| t.to_rfc3339()),
                info.version
            );
            let _ = writeln!(
                w,
                "org {}  user {}  account {}",
                or_dash(info.org_id.as_deref()),
                or_dash(info.user_id.as_deref()),
                or_dash(info.account.as_deref())
            );
        }
        None => {
            let _ = writeln!(w, "(no events)");
        }
    }
    for (id, record) in &report.state.subscriptions {
        if let Some(snap) = &record.snapshot {
            let _ = writeln!(
                w,
                "  {id}: {} (as of {}, {})",
                snap.value.status,
                snap.observed_at.to_rfc3339(),
                snap.stripe_event_id
            );
        }
    }

    let _ = writeln!(w, "\n== event log ({} events) ==", report.timeline.len());
    for t in &report.timeline {
        let _ = writeln!(
            w,
            "#{:<3} {}  {:<19} {} {} (Stripe {})  {}",
            t.sequence,
            t.recorded_at.format("%Y-%m-%d %H:%M:%S"),
            t.event_type,
            t.stripe_event_id,
            t.stripe_event_type,
            t.stripe_created.format("%Y-%m-%d %H:%M:%S"),
            t.change
        );
    }

    let _ = writeln!(w, "\n== inbox ({} Stripe events) ==", report.inbox.len());
    for i in &report.inbox {
        let _ = writeln!(
            w,
            "{} {:<38} {}  {:<7} {:<9} attempts {}{}{}{}",
            i.stripe_created.format("%Y-%m-%d %H:%M:%S"),
            i.event_type,
            i.event_id,
            i.state,
            i.outcome.map_or("-", inbox::Outcome::as_str),
            i.attempts,
            i.payload_pruned_at
                .map(|at| format!("  payload pruned {}", at.format("%Y-%m-%d %H:%M:%S")))
                .unwrap_or_default(),
            i.detail
                .as_deref()
                .map(|d| format!("  why: {d}"))
                .unwrap_or_default(),
            i.last_error
                .as_deref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default()
        );
    }

    let _ = writeln!(w, "\n== cache and table ==");
    if let Some(error) = &report.cache_error {
        let _ = writeln!(w, "Redis cannot be read: {error}");
    }
    for key in &report.cache_keys {
        let _ = writeln!(
            w,
            "redis {} ({}): {}",
            key.key,
            key.ttl_text(),
            or_dash(key.value.as_deref())
        );
    }
    let _ = writeln!(
        w,
        "table subscriptions row: {}",
        report.table.as_ref().map_or("-".to_owned(), |t| {
            serde_json::to_string(t).unwrap_or_default()
        })
    );
    if report.differences.is_empty() {
        let _ = writeln!(w, "log, table and cache agree");
    } else {
        let _ = writeln!(w, "DIFFERENCES (field: log | table | cache):");
        for d in &report.differences {
            let _ = writeln!(
                w,
                "  ! {}: {} | {} | {}",
                d.field,
                or_dash(d.log.as_deref()),
                or_dash(d.table.as_deref()),
                or_dash(d.cache.as_deref())
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(status: &str, version: u64) -> SubscriptionInfo {
        serde_json::from_value(serde_json::json!({
            "customer_id": "cus_1", "subscription_id": "sub_1", "status": status,
            "price_id": null, "product_id": null, "lookup_key": null, "plan": null,
            "quantity": null, "current_period_start": null, "current_period_end": null,
            "cancel_at_period_end": false, "cancel_at": null, "canceled_at": null,
            "ended_at": null, "trial_end": null, "org_id": "org_1", "user_id": null,
            "latest_invoice": null, "version": version, "updated_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    #[test]
    fn agreeing_copies_have_no_differences() {
        let a = info("active", 3);
        assert!(differences(Some(&a), Some(&a), Some(&a)).is_empty());
    }

    #[test]
    fn a_stale_cache_is_flagged_field_by_field() {
        let log = info("canceled", 4);
        let cache = info("active", 3);
        let diffs = differences(Some(&log), Some(&log), Some(&cache));
        let fields: Vec<&str> = diffs.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(fields, ["status", "version"]);
        assert_eq!(diffs[0].cache.as_deref(), Some("\"active\""));
        assert_eq!(diffs[0].table.as_deref(), Some("\"canceled\""));
    }

    #[test]
    fn a_missing_copy_is_flagged() {
        let log = info("active", 1);
        let diffs = differences(Some(&log), Some(&log), None);
        assert_eq!(diffs[0].field, "(value)");
        assert_eq!(diffs[0].cache.as_deref(), Some("missing"));
        assert_eq!(diffs.len(), 1);
    }

    #[test]
    fn explanations_say_why() {
        let catalog = Catalog::default();
        let now = Utc::now();
        let canceled = info("canceled", 2);
        let e = catalog.entitlement(None, None, std::slice::from_ref(&canceled), now);
        let s = explain("cus_1", Some(&canceled), &catalog, &e, &[]);
        assert!(s.starts_with("cus_1 lacks access: subscription sub_1 is canceled, and only active, trialing, past_due grant access"), "{s}");
        let active = info("active", 2);
        let e = catalog.entitlement(None, None, std::slice::from_ref(&active), now);
        let s = explain("cus_1", Some(&active), &catalog, &e, &[]);
        assert!(
            s.starts_with("cus_1 has access: subscription sub_1 is active, which grants access"),
            "{s}"
        );
        let e = catalog.entitlement(None, None, &[], now);
        assert!(explain("cus_x", None, &catalog, &e, &[]).contains("holds no event"));
    }
}
