//! The catalogue: which prices make which plan, what features a plan has, and which
//! statuses grant access. Loaded from a TOML file (`SUBLEDGER_CATALOG`).
//!
//! It judges access from a `SubscriptionInfo` and a time it is given; it must never read
//! the clock itself or reach Stripe. A customer's answer comes from all its subscriptions
//! and every item of each; an org's or user's from all the customers linked to it.

use std::path::Path;

use aggregates::{SubscriptionStatus, UsageType};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::info::{SubscriptionEntry, SubscriptionInfo};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the catalogue {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the catalogue {path} is not valid")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
}

/// When a subscription grants access (the catalogue's `[access]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    /// Statuses that grant access until the subscription's end.
    pub grant: Vec<SubscriptionStatus>,
    /// Hours of access past the period end for an `active` or `trialing` subscription
    /// that is not set to end then: the renewal's webhook can be late (an outage of ours,
    /// Stripe's retry backoff) and access must not drop before it arrives. Never applies
    /// past `cancel_at` or to a subscription canceling at its period end.
    #[serde(default = "default_grace_hours")]
    pub grace_hours: u32,
    /// When set, a `past_due` subscription grants access for at most this many days after
    /// its first failed payment (counted from the unpaid invoice's creation, at most about
    /// an hour before Stripe's first attempt, so never longer than configured).
    #[serde(default)]
    pub past_due_max_days: Option<u32>,
    /// A `paused` subscription grants access when its pause reason
    /// (`status_details.paused.subscription.type`) is listed here. Empty by default:
    /// paused denies.
    #[serde(default)]
    pub paused_grant_reasons: Vec<String>,
}

/// One day: long enough to ride out a day-long outage of our endpoint or workers and
/// Stripe's retry backoff (hours apart after the first attempts) while the periodic
/// reconciler catches up, short enough that no real end is noticeably extended (a real
/// end is `cancel_at` or a status change, which the grace never extends).
fn default_grace_hours() -> u32 {
    24
}

impl AccessPolicy {
    /// Whether a subscription in `status` has access while its period lasts.
    pub fn grants(&self, status: &str) -> bool {
        status
            .parse::<SubscriptionStatus>()
            .is_ok_and(|status| self.grant.contains(&status))
    }
}

impl Default for AccessPolicy {
    /// `active`, `trialing` and `past_due` (Stripe is still retrying) grant access, with a
    /// day of grace after a renewal that is due, no cap on `past_due`, paused denies.
    fn default() -> Self {
        Self {
            grant: vec![
                SubscriptionStatus::Active,
                SubscriptionStatus::Trialing,
                SubscriptionStatus::PastDue,
            ],
            grace_hours: default_grace_hours(),
            past_due_max_days: None,
            paused_grant_reasons: vec![],
        }
    }
}

/// One plan and what makes a subscription belong to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    /// Orders plans when a customer's subscriptions name several: the highest rank is the
    /// answer's plan. Without it a plan ranks by its position: later in the file is higher.
    #[serde(default)]
    pub rank: Option<i64>,
    #[serde(default)]
    pub prices: Vec<String>,
    #[serde(default)]
    pub lookup_keys: Vec<String>,
    #[serde(default)]
    pub products: Vec<String>,
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(default)]
    pub access: AccessPolicy,
    #[serde(default)]
    pub plans: Vec<Plan>,
}

/// One subscription behind an [`Entitlement`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OwnedSubscription {
    pub customer_id: String,
    pub subscription_id: String,
    pub status: String,
    pub plan: Option<String>,
    pub seats: Option<u64>,
    pub access: bool,
    #[serde(default, with = "aggregates::time::utc_option")]
    pub access_until: Option<DateTime<Utc>>,
    pub pause_reason: Option<String>,
}

/// What an org or user may do, as the entitlements API answers it: the union over every
/// subscription of every customer linked to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "org_id": "org_123", "user_id": null, "customer_id": "cus_123", "subscription_id": "sub_123",
    "status": "active", "plan": "pro", "features": ["projects:unlimited", "api", "priority_support"],
    "access": true, "access_until": "2026-12-26T00:00:00Z", "seats": 5,
    "customers": ["cus_123", "cus_old"],
    "subscriptions": [
        {"customer_id": "cus_123", "subscription_id": "sub_123", "status": "active", "plan": "pro",
         "seats": 5, "access": true, "access_until": "2026-12-26T00:00:00Z", "pause_reason": null},
        {"customer_id": "cus_old", "subscription_id": "sub_old", "status": "canceled", "plan": "basic",
         "seats": 1, "access": false, "access_until": null, "pause_reason": null}
    ]
}))]
pub struct Entitlement {
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    /// The customer of the primary subscription.
    pub customer_id: Option<String>,
    /// The primary subscription: the highest-ranked granting one, else the newest live one.
    pub subscription_id: Option<String>,
    /// The primary subscription's status, or `"none"`.
    pub status: String,
    /// The highest-ranked plan among the granting subscriptions (with none granting, the
    /// primary subscription's plan).
    pub plan: Option<String>,
    /// The union of the granting subscriptions' plans' features and the customers'
    /// Stripe Entitlements features.
    pub features: Vec<String>,
    pub access: bool,
    /// The latest end among the granting subscriptions (`null`: no end known).
    #[serde(default, with = "aggregates::time::utc_option")]
    pub access_until: Option<DateTime<Utc>>,
    /// The seats of `plan`: the quantities of the granting licensed items naming it.
    pub seats: Option<u64>,
    /// The customers linked to the owner (not deleted, not moved elsewhere).
    pub customers: Vec<String>,
    /// Every subscription of those customers, newest first.
    pub subscriptions: Vec<OwnedSubscription>,
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|source| CatalogError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The catalogue plan a price names: by price id, else lookup key, else product. A
    /// price no plan names names no plan.
    pub fn plan_named(
        &self,
        price_id: Option<&str>,
        lookup_key: Option<&str>,
        product_id: Option<&str>,
    ) -> Option<&Plan> {
        let find = |pick: fn(&Plan) -> &Vec<String>, key: Option<&str>| {
            key.and_then(|key| {
                self.plans
                    .iter()
                    .find(|plan| pick(plan).iter().any(|k| k == key))
            })
        };
        find(|p| &p.prices, price_id)
            .or_else(|| find(|p| &p.lookup_keys, lookup_key))
            .or_else(|| find(|p| &p.products, product_id))
    }

    /// A plan's rank: its `rank`, else its position in the catalogue.
    pub fn rank(&self, plan_name: &str) -> Option<i64> {
        self.plans
            .iter()
            .position(|plan| plan.name == plan_name)
            .map(|index| self.plans[index].rank.unwrap_or(index as i64))
    }

    /// When a subscription's access ends, before the status is judged: the earlier of
    /// `cancel_at` and the period end; past the period end by the grace when an `active`
    /// or `trialing` subscription is due to renew; for `past_due` (and a paused one
    /// granted by its reason), at most `past_due_max_days` after the unpaid invoice.
    /// `None`: no end known.
    pub fn access_end(&self, entry: &SubscriptionEntry) -> Option<DateTime<Utc>> {
        let status = entry.status.parse::<SubscriptionStatus>().ok();
        let period_end = entry.current_period_end;
        let cancel_at = entry.cancel_at;
        let renews = matches!(
            status,
            Some(SubscriptionStatus::Active | SubscriptionStatus::Trialing)
        ) && !entry.cancel_at_period_end;
        let mut until = match period_end {
            Some(end) if renews => Some(end + Duration::hours(self.access.grace_hours.into())),
            other => other,
        };
        if let Some(cancel_at) = cancel_at {
            until = Some(until.map_or(cancel_at, |until| until.min(cancel_at)));
        }
        if matches!(
            status,
            Some(SubscriptionStatus::PastDue | SubscriptionStatus::Paused)
        ) {
            if status == Some(SubscriptionStatus::Paused) {
                // A paused subscription issues no invoices: its period end means nothing.
                until = cancel_at;
            }
            if let Some(days) = self.access.past_due_max_days {
                let unpaid_since = entry
                    .latest_invoice
                    .as_ref()
                    .filter(|invoice| invoice.status.as_deref() == Some("open"))
                    .and_then(|invoice| invoice.created)
                    .or(entry.current_period_start);
                if let Some(since) = unpaid_since {
                    let cap = since + Duration::days(days.into());
                    until = Some(until.map_or(cap, |until| until.min(cap)));
                }
            }
        }
        until
    }

    /// Whether a status grants access under the policy (paused: by its reason).
    pub fn status_grants(&self, status: &str, pause_reason: Option<&str>) -> bool {
        match status.parse::<SubscriptionStatus>() {
            Ok(SubscriptionStatus::Paused)
                if !self.access.grant.contains(&SubscriptionStatus::Paused) =>
            {
                pause_reason.is_some_and(|reason| {
                    self.access.paused_grant_reasons.iter().any(|r| r == reason)
                })
            }
            Ok(status) => self.access.grant.contains(&status),
            Err(_) => false,
        }
    }

    /// Judges one subscription at `now`: each item's plan (metered items and prices no
    /// plan names name none), the subscription's plan (the highest-ranked its licensed
    /// items name), seats, features, access and `access_until`.
    pub fn judge(&self, entry: &mut SubscriptionEntry, now: DateTime<Utc>) {
        let mut best: Option<(i64, String)> = None;
        for item in &mut entry.items {
            let licensed = item.usage_type != Some(UsageType::Metered);
            item.plan = licensed
                .then(|| {
                    self.plan_named(
                        item.price_id.as_deref(),
                        item.lookup_key.as_deref(),
                        item.product_id.as_deref(),
                    )
                })
                .flatten()
                .map(|plan| plan.name.clone());
            if let Some(name) = &item.plan {
                let rank = self.rank(name).unwrap_or(i64::MIN);
                if best.as_ref().is_none_or(|(r, n)| (rank, name) > (*r, n)) {
                    best = Some((rank, name.clone()));
                }
            }
        }
        let plan = best.map(|(_, name)| name);
        entry.seats = plan.as_ref().map(|plan| {
            entry
                .items
                .iter()
                .filter(|item| item.plan.as_ref() == Some(plan))
                .map(|item| item.quantity.unwrap_or(1))
                .sum()
        });
        let until = self.access_end(entry);
        entry.access = self.status_grants(&entry.status, entry.pause_reason.as_deref())
            && until.is_none_or(|until| now < until);
        entry.access_until = if entry.access { until } else { None };
        let named: Vec<&str> = entry
            .items
            .iter()
            .filter_map(|i| i.plan.as_deref())
            .collect();
        entry.features = if entry.access {
            self.features_of(&named, &[])
        } else {
            vec![]
        };
        entry.plan = plan;
    }

    /// The features of the named plans in catalogue order, then the extra ones (Stripe's
    /// lookup keys) sorted, each once.
    fn features_of(&self, plans: &[&str], extra: &[String]) -> Vec<String> {
        let mut features: Vec<String> = Vec::new();
        for plan in self
            .plans
            .iter()
            .filter(|p| plans.contains(&p.name.as_str()))
        {
            for feature in &plan.features {
                if !features.contains(feature) {
                    features.push(feature.clone());
                }
            }
        }
        let mut extra: Vec<&String> = extra.iter().collect();
        extra.sort();
        for feature in extra {
            if !features.contains(feature) {
                features.push(feature.clone());
            }
        }
        features
    }

    /// The primary subscription among judged ones: the granting one with the
    /// highest-ranked plan (then the latest `access_until`, no end counting as latest,
    /// then the newest); with none granting, the newest that is not terminal, else the
    /// newest.
    pub fn primary<'a>(
        &self,
        entries: Vec<&'a SubscriptionEntry>,
    ) -> Option<&'a SubscriptionEntry> {
        fn newest(e: &&&SubscriptionEntry) -> (Option<DateTime<Utc>>, String) {
            (e.created, e.subscription_id.clone())
        }
        let granting = entries.iter().filter(|e| e.access).max_by_key(|e| {
            (
                e.plan.as_deref().and_then(|p| self.rank(p)),
                e.access_until.is_none(),
                e.access_until,
                newest(e),
            )
        });
        granting
            .or_else(|| {
                entries
                    .iter()
                    .filter(|e| {
                        e.status
                            .parse::<SubscriptionStatus>()
                            .is_ok_and(|s| !s.is_terminal())
                    })
                    .max_by_key(newest)
            })
            .or_else(|| entries.iter().max_by_key(newest))
            .copied()
    }

    /// Judges what an org or user may do at `now` from every customer linked to it
    /// (`infos`: their answers, each resolved here). Never depends on the order of
    /// `infos`.
    pub fn entitlement(
        &self,
        org_id: Option<&str>,
        user_id: Option<&str>,
        infos: &[SubscriptionInfo],
        now: DateTime<Utc>,
    ) -> Entitlement {
        self.entitlement_until(org_id, user_id, infos, now).0
    }

    /// [`Catalog::entitlement`], and until when the same judgement holds: the answer is
    /// the same at every instant from `now` until then, for these answers and this
    /// catalogue (`None`: at every later instant). Time enters the judgement only where a
    /// subscription's access is judged against its end ([`Catalog::access_end`], which
    /// depends on the subscription alone), so it holds until the first of those ends that
    /// is still ahead.
    pub fn entitlement_until(
        &self,
        org_id: Option<&str>,
        user_id: Option<&str>,
        infos: &[SubscriptionInfo],
        now: DateTime<Utc>,
    ) -> (Entitlement, Option<DateTime<Utc>>) {
        let mut infos: Vec<SubscriptionInfo> = infos.to_vec();
        infos.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
        for info in &mut infos {
            info.resolve(self, now);
        }
        let holds_until = infos
            .iter()
            .flat_map(|info| &info.subscriptions)
            .filter_map(|entry| self.access_end(entry))
            .filter(|end| *end > now)
            .min();
        (self.judged(org_id, user_id, &infos), holds_until)
    }

    /// The entitlement of `infos`, each already resolved at the same instant.
    fn judged(
        &self,
        org_id: Option<&str>,
        user_id: Option<&str>,
        infos: &[SubscriptionInfo],
    ) -> Entitlement {
        let entries: Vec<(&str, &SubscriptionEntry)> = infos
            .iter()
            .flat_map(|info| {
                info.subscriptions
                    .iter()
                    .map(move |entry| (info.customer_id.as_str(), entry))
            })
            .collect();
        let primary = self.primary(entries.iter().map(|(_, e)| *e).collect());
        let customer_of = |entry: &SubscriptionEntry| {
            entries
                .iter()
                .find(|(_, e)| std::ptr::eq(*e, entry))
                .map(|(c, _)| c.to_string())
        };
        let granting: Vec<&SubscriptionEntry> = entries
            .iter()
            .map(|(_, e)| *e)
            .filter(|e| e.access)
            .collect();
        let access = !granting.is_empty();
        // The primary subscription is the highest-ranked granting one when any grants;
        // otherwise its plan still says what the owner is subscribed to.
        let plan = primary.and_then(|p| p.plan.clone());
        let named: Vec<&str> = granting
            .iter()
            .flat_map(|e| e.items.iter().filter_map(|i| i.plan.as_deref()))
            .collect();
        let stripe_features: Vec<String> = infos
            .iter()
            .flat_map(|info| info.stripe_features.iter().cloned())
            .collect();
        let mut subscriptions: Vec<OwnedSubscription> = entries
            .iter()
            .map(|(customer, e)| OwnedSubscription {
                customer_id: customer.to_string(),
                subscription_id: e.subscription_id.clone(),
                status: e.status.clone(),
                plan: e.plan.clone(),
                seats: e.seats,
                access: e.access,
                access_until: e.access_until,
                pause_reason: e.pause_reason.clone(),
            })
            .collect();
        subscriptions.sort_by(|a, b| {
            let created = |s: &OwnedSubscription| {
                entries
                    .iter()
                    .find(|(_, e)| e.subscription_id == s.subscription_id)
                    .and_then(|(_, e)| e.created)
            };
            (created(b), &b.subscription_id).cmp(&(created(a), &a.subscription_id))
        });
        Entitlement {
            org_id: org_id.map(str::to_owned),
            user_id: user_id.map(str::to_owned),
            customer_id: primary.and_then(customer_of).or_else(|| {
                infos
                    .iter()
                    .max_by_key(|i| i.updated_at)
                    .map(|i| i.customer_id.clone())
            }),
            subscription_id: primary.map(|p| p.subscription_id.clone()),
            status: primary.map_or(SubscriptionInfo::NO_SUBSCRIPTION.to_owned(), |p| {
                p.status.clone()
            }),
            seats: if access {
                plan.as_ref().map(|plan| {
                    granting
                        .iter()
                        .filter(|e| e.plan.as_ref() == Some(plan))
                        .filter_map(|e| e.seats)
                        .sum()
                })
            } else {
                primary.and_then(|p| p.seats)
            },
            features: self.features_of(if access { &named } else { &[] }, &stripe_features),
            access,
            access_until: if granting.iter().any(|e| e.access_until.is_none()) {
                None
            } else {
                granting.iter().filter_map(|e| e.access_until).max()
            },
            plan,
            customers: infos.iter().map(|i| i.customer_id.clone()).collect(),
            subscriptions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aggregates::{CustomerView, ItemFacts, SubscriptionFacts, SubscriptionView, UsageType};
    use chrono::TimeZone;

    const SAMPLE: &str = include_str!("../../catalog.example.toml");

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    fn item(price: &str, quantity: u64, usage: Option<UsageType>) -> ItemFacts {
        ItemFacts {
            id: Some(format!("si_{price}")),
            price_id: Some(price.into()),
            product_id: None,
            lookup_key: None,
            quantity: Some(quantity),
            usage_type: usage,
            current_period_start: None,
            current_period_end: None,
        }
    }

    fn sub(
        id: &str,
        status: &str,
        created: i64,
        end: i64,
        items: Vec<ItemFacts>,
    ) -> SubscriptionFacts {
        SubscriptionFacts {
            id: id.into(),
            status: status.parse().unwrap(),
            created: Some(at(created)),
            price_id: items.first().and_then(|i| i.price_id.clone()),
            product_id: None,
            lookup_key: None,
            quantity: items.first().and_then(|i| i.quantity),
            current_period_start: Some(at(end - 100)),
            current_period_end: Some(at(end)),
            cancel_at_period_end: false,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            trial_start: None,
            trial_end: None,
            latest_invoice_id: None,
            currency: None,
            items,
            pause_reason: None,
        }
    }

    fn customer(id: &str, subs: Vec<SubscriptionFacts>) -> SubscriptionInfo {
        let view = CustomerView {
            customer_id: id.into(),
            org_id: Some("org_1".into()),
            subscriptions: subs
                .into_iter()
                .map(|subscription| SubscriptionView {
                    subscription,
                    latest_invoice: None,
                    payment_method: None,
                })
                .collect(),
            ..CustomerView::default()
        };
        SubscriptionInfo::from_view(&view, 1, at(0), &Catalog::default())
    }

    fn one(status: &str, price: &str, end: i64) -> SubscriptionInfo {
        customer(
            "cus_1",
            vec![sub("sub_1", status, 0, end, vec![item(price, 1, None)])],
        )
    }

    fn catalog() -> Catalog {
        Catalog::parse(SAMPLE).unwrap()
    }

    #[test]
    fn the_sample_catalogue_parses() {
        let catalog = catalog();
        assert!(!catalog.plans.is_empty());
        assert_eq!(catalog.access, AccessPolicy::default());
    }

    #[test]
    fn access_follows_the_policy_and_the_period_end() {
        let catalog = catalog();
        let now = at(1_000);
        for (status, expected) in [
            ("active", true),
            ("trialing", true),
            ("past_due", true),
            ("unpaid", false),
            ("canceled", false),
            ("paused", false),
            ("incomplete", false),
            ("incomplete_expired", false),
        ] {
            let e = catalog.entitlement(
                Some("org_1"),
                None,
                &[one(status, "price_pro_monthly", 2_000)],
                now,
            );
            assert_eq!(e.access, expected, "{status}");
            assert_eq!(e.plan.as_deref(), Some("pro"), "{status}");
            assert_eq!(e.features.is_empty(), !expected);
        }
        // Past the period end and past the grace: no access. Within the grace: access.
        let grace = i64::from(catalog.access.grace_hours) * 3600;
        let expired = catalog.entitlement(
            None,
            None,
            &[one("active", "price_pro_monthly", 500)],
            at(500 + grace),
        );
        assert!(!expired.access);
        let late_renewal = catalog.entitlement(
            None,
            None,
            &[one("active", "price_pro_monthly", 500)],
            at(600),
        );
        assert!(late_renewal.access);
        assert_eq!(late_renewal.access_until, Some(at(500 + grace)));
        // past_due gets no grace.
        let past_due = catalog.entitlement(
            None,
            None,
            &[one("past_due", "price_pro_monthly", 500)],
            at(600),
        );
        assert!(!past_due.access);
    }

    /// The judgement is the same at every instant until the time `entitlement_until`
    /// names, and not at it: there the first subscription still granting loses access
    /// (here the trialing one, 200 s before the active one's end plus its grace).
    #[test]
    fn an_entitlement_holds_until_the_first_end_ahead() {
        let catalog = catalog();
        let grace = i64::from(catalog.access.grace_hours) * 3600;
        let infos = [
            customer(
                "cus_1",
                vec![sub(
                    "sub_1",
                    "active",
                    0,
                    2_000,
                    vec![item("price_pro_monthly", 1, None)],
                )],
            ),
            customer(
                "cus_2",
                vec![sub(
                    "sub_2",
                    "trialing",
                    0,
                    1_800,
                    vec![item("price_pro_monthly", 2, None)],
                )],
            ),
            customer(
                "cus_3",
                vec![sub(
                    "sub_3",
                    "canceled",
                    0,
                    500,
                    vec![item("price_pro_monthly", 1, None)],
                )],
            ),
        ];
        let now = at(1_000);
        let (answer, until) = catalog.entitlement_until(Some("org_1"), None, &infos, now);
        assert_eq!(until, Some(at(1_800 + grace)));
        for t in [1_000, 1_001, 1_800, 1_800 + grace - 1] {
            assert_eq!(
                catalog.entitlement(Some("org_1"), None, &infos, at(t)),
                answer,
                "at {t}"
            );
        }
        let after = catalog.entitlement(Some("org_1"), None, &infos, at(1_800 + grace));
        assert_ne!(after, answer);
        assert_eq!(after.seats, Some(1));
        let (_, next) = catalog.entitlement_until(Some("org_1"), None, &infos, at(1_800 + grace));
        assert_eq!(next, Some(at(2_000 + grace)));
        // Past every end, the judgement holds for ever.
        let (last, never) =
            catalog.entitlement_until(Some("org_1"), None, &infos, at(2_000 + grace));
        assert!(!last.access);
        assert_eq!(never, None);
    }

    #[test]
    fn an_unknown_price_names_no_plan() {
        let e = catalog().entitlement(
            None,
            None,
            &[one("active", "price_unknown", 2_000)],
            at(1_000),
        );
        assert_eq!(e.plan, None);
        assert!(e.features.is_empty());
        assert!(e.access);
    }

    #[test]
    fn unknown_org_has_no_access() {
        let e = Catalog::default().entitlement(Some("org_x"), None, &[], Utc::now());
        assert_eq!((e.access, e.status.as_str()), (false, "none"));
    }

    #[test]
    fn a_typo_in_the_catalogue_is_an_error() {
        assert!(Catalog::parse("[[plans]]\nname = \"x\"\nprice = [\"p\"]\n").is_err());
    }

    #[test]
    fn an_old_active_subscription_outweighs_a_newer_incomplete_one() {
        let info = customer(
            "cus_1",
            vec![
                sub(
                    "sub_old",
                    "active",
                    10,
                    2_000,
                    vec![item("price_pro_monthly", 1, None)],
                ),
                sub(
                    "sub_new",
                    "incomplete",
                    20,
                    2_000,
                    vec![item("price_basic_monthly", 1, None)],
                ),
            ],
        );
        let e = catalog().entitlement(Some("org_1"), None, std::slice::from_ref(&info), at(1_000));
        assert_eq!((e.access, e.plan.as_deref()), (true, Some("pro")));
        assert_eq!(e.subscription_id.as_deref(), Some("sub_old"));
        let mut resolved = info;
        resolved.resolve(&catalog(), at(1_000));
        assert_eq!(resolved.subscription_id.as_deref(), Some("sub_old"));
        assert_eq!(resolved.subscriptions.len(), 2);
    }

    #[test]
    fn the_highest_ranked_plan_wins_and_features_are_the_union() {
        let mut catalog = catalog();
        catalog.plans.push(Plan {
            name: "addon".into(),
            rank: Some(-1),
            prices: vec!["price_addon".into()],
            lookup_keys: vec![],
            products: vec![],
            features: vec!["export".into()],
        });
        let a = customer(
            "cus_a",
            vec![sub(
                "sub_a",
                "active",
                1,
                2_000,
                vec![item("price_basic_monthly", 1, None)],
            )],
        );
        let b = customer(
            "cus_b",
            vec![sub(
                "sub_b",
                "active",
                2,
                3_000,
                vec![
                    item("price_pro_monthly", 4, None),
                    item("price_addon", 1, None),
                ],
            )],
        );
        let forward = catalog.entitlement(Some("org_1"), None, &[a.clone(), b.clone()], at(1_000));
        let backward = catalog.entitlement(Some("org_1"), None, &[b, a], at(1_000));
        assert_eq!(forward, backward);
        assert_eq!(forward.plan.as_deref(), Some("pro"));
        assert_eq!(forward.customer_id.as_deref(), Some("cus_b"));
        assert_eq!(forward.seats, Some(4));
        for feature in ["projects:3", "projects:unlimited", "api", "export"] {
            assert!(
                forward.features.iter().any(|f| f == feature),
                "{feature}: {:?}",
                forward.features
            );
        }
        let grace = i64::from(catalog.access.grace_hours) * 3600;
        assert_eq!(forward.access_until, Some(at(3_000 + grace)));
    }

    #[test]
    fn metered_items_never_name_the_plan() {
        let info = customer(
            "cus_1",
            vec![sub(
                "sub_1",
                "active",
                1,
                2_000,
                vec![
                    item("price_pro_monthly", 1, Some(UsageType::Metered)),
                    item("price_basic_monthly", 3, Some(UsageType::Licensed)),
                ],
            )],
        );
        let e = catalog().entitlement(None, None, &[info], at(1_000));
        assert_eq!((e.plan.as_deref(), e.seats), (Some("basic"), Some(3)));
        assert_eq!(e.features, vec!["projects:3".to_owned()]);
    }

    #[test]
    fn cancel_at_before_the_period_end_ends_access_then_without_grace() {
        let mut s = sub(
            "sub_1",
            "active",
            1,
            2_000,
            vec![item("price_pro_monthly", 1, None)],
        );
        s.cancel_at = Some(at(1_500));
        let e = catalog().entitlement(None, None, &[customer("cus_1", vec![s.clone()])], at(1_000));
        assert_eq!(e.access_until, Some(at(1_500)));
        let after =
            catalog().entitlement(None, None, &[customer("cus_1", vec![s.clone()])], at(1_500));
        assert!(!after.access);
        s.cancel_at = None;
        s.cancel_at_period_end = true;
        let e = catalog().entitlement(None, None, &[customer("cus_1", vec![s])], at(1_000));
        assert_eq!(e.access_until, Some(at(2_000)));
    }

    #[test]
    fn past_due_access_may_be_capped_and_paused_granted_by_reason() {
        let mut catalog = catalog();
        catalog.access.past_due_max_days = Some(1);
        // A short period start (end - 100 s) and a day's cap: the cap ends access first.
        let s = sub(
            "sub_1",
            "past_due",
            1,
            100_000,
            vec![item("price_pro_monthly", 1, None)],
        );
        catalog.access.past_due_max_days = Some(0);
        let start = 100_000 - 100;
        let e = catalog.entitlement(
            None,
            None,
            &[customer("cus_1", vec![s.clone()])],
            at(start - 10),
        );
        assert_eq!(e.access_until, Some(at(start)));
        catalog.access.past_due_max_days = Some(1);
        let mut s = sub(
            "sub_1",
            "past_due",
            1,
            10_000_000,
            vec![item("price_pro_monthly", 1, None)],
        );
        let start = 1_000_000;
        s.current_period_start = Some(at(start));
        let e = catalog.entitlement(
            None,
            None,
            &[customer("cus_1", vec![s.clone()])],
            at(start + 10),
        );
        assert_eq!(e.access_until, Some(at(start + 86_400)));
        let e = catalog.entitlement(
            None,
            None,
            &[customer("cus_1", vec![s])],
            at(start + 86_400),
        );
        assert!(!e.access);

        let mut paused = sub(
            "sub_2",
            "paused",
            1,
            2_000,
            vec![item("price_pro_monthly", 1, None)],
        );
        paused.pause_reason = Some("first_payment_failure".into());
        let info = customer("cus_1", vec![paused]);
        assert!(
            !catalog
                .entitlement(None, None, std::slice::from_ref(&info), at(1_000))
                .access
        );
        catalog.access.paused_grant_reasons = vec!["first_payment_failure".into()];
        catalog.access.past_due_max_days = None;
        let e = catalog.entitlement(None, None, &[info], at(5_000));
        assert!(e.access);
        assert_eq!(
            e.subscriptions[0].pause_reason.as_deref(),
            Some("first_payment_failure")
        );
    }

    #[test]
    fn an_answer_stored_before_subscriptions_existed_reads_as_its_one_subscription() {
        // The JSON `SubscriptionInfo` had before this change (main at 6482bbc).
        let old = r#"{"customer_id":"cus_1","subscription_id":"sub_1","status":"active",
            "price_id":"price_pro_monthly","product_id":null,"lookup_key":null,"plan":"pro","quantity":2,
            "current_period_start":"1970-01-01T00:00:00Z","current_period_end":"1970-01-01T00:33:20Z",
            "cancel_at_period_end":false,"cancel_at":null,"canceled_at":null,"ended_at":null,"trial_end":null,
            "org_id":"org_1","user_id":null,"latest_invoice":null,"payment_method":null,"version":3,
            "updated_at":"1970-01-01T00:00:00Z"}"#;
        let info: SubscriptionInfo = serde_json::from_str(old).unwrap();
        let e = catalog().entitlement(Some("org_1"), None, &[info], at(1_000));
        assert_eq!(
            (e.access, e.plan.as_deref(), e.seats),
            (true, Some("pro"), Some(2))
        );
    }
}
