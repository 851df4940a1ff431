//! The catalogue: which prices make which plan, what features a plan has, and which
//! statuses grant access. Loaded from a TOML file (`SUBLEDGER_CATALOG`).
//!
//! It judges access from a `SubscriptionInfo` and a time it is given; it must never read
//! the clock itself or reach Stripe.

use std::path::Path;

use aggregates::SubscriptionStatus;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::info::SubscriptionInfo;

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

/// Which statuses grant access until the period end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    pub grant: Vec<SubscriptionStatus>,
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
    /// `active`, `trialing` and `past_due` (Stripe is still retrying) grant access.
    fn default() -> Self {
        Self {
            grant: vec![
                SubscriptionStatus::Active,
                SubscriptionStatus::Trialing,
                SubscriptionStatus::PastDue,
            ],
        }
    }
}

/// One plan and what makes a subscription belong to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
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

/// What an org or user may do, as the entitlements API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "org_id": "org_123", "user_id": "user_9", "customer_id": "cus_123", "status": "active",
    "plan": "pro", "features": ["api", "priority_support"], "access": true,
    "access_until": "2026-12-25T00:00:00Z"
}))]
pub struct Entitlement {
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    pub customer_id: Option<String>,
    pub status: String,
    pub plan: Option<String>,
    pub features: Vec<String>,
    pub access: bool,
    pub access_until: Option<DateTime<Utc>>,
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

    /// The plan for a subscription: a catalogue plan naming its price, lookup key or
    /// product (in that order of precedence); otherwise a plan named after the lookup key
    /// or price id, with no features.
    pub fn plan_for(
        &self,
        price_id: Option<&str>,
        lookup_key: Option<&str>,
        product_id: Option<&str>,
    ) -> Option<Plan> {
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
            .cloned()
            .or_else(|| {
                lookup_key.or(price_id).map(|name| Plan {
                    name: name.to_owned(),
                    prices: vec![],
                    lookup_keys: vec![],
                    products: vec![],
                    features: vec![],
                })
            })
    }

    /// Judges access at `now`. `info` is `None` for an org or user we have never seen.
    pub fn entitlement(
        &self,
        org_id: Option<&str>,
        user_id: Option<&str>,
        info: Option<&SubscriptionInfo>,
        now: DateTime<Utc>,
    ) -> Entitlement {
        let Some(info) = info else {
            return Entitlement {
                org_id: org_id.map(str::to_owned),
                user_id: user_id.map(str::to_owned),
                customer_id: None,
                status: SubscriptionInfo::NO_SUBSCRIPTION.to_owned(),
                plan: None,
                features: vec![],
                access: false,
                access_until: None,
            };
        };
        let plan = self.plan_for(
            info.price_id.as_deref(),
            info.lookup_key.as_deref(),
            info.product_id.as_deref(),
        );
        let granted = self.access.grants(&info.status);
        let within_period = info.current_period_end.is_none_or(|end| now < end);
        let access = granted && within_period;
        Entitlement {
            org_id: info.org_id.clone().or_else(|| org_id.map(str::to_owned)),
            user_id: info.user_id.clone().or_else(|| user_id.map(str::to_owned)),
            customer_id: Some(info.customer_id.clone()),
            status: info.status.clone(),
            plan: plan.as_ref().map(|p| p.name.clone()),
            features: if access {
                plan.map(|p| p.features).unwrap_or_default()
            } else {
                vec![]
            },
            access,
            access_until: if access {
                info.current_period_end
            } else {
                None
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const SAMPLE: &str = include_str!("../../catalog.example.toml");

    fn info(status: &str, price: &str, end: i64) -> SubscriptionInfo {
        SubscriptionInfo {
            customer_id: "cus_1".into(),
            subscription_id: Some("sub_1".into()),
            status: status.into(),
            price_id: Some(price.into()),
            product_id: None,
            lookup_key: None,
            plan: None,
            quantity: Some(1),
            current_period_start: None,
            current_period_end: Some(Utc.timestamp_opt(end, 0).unwrap()),
            cancel_at_period_end: false,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            trial_end: None,
            org_id: Some("org_1".into()),
            user_id: None,
            latest_invoice: None,
            payment_method: None,
            version: 1,
            updated_at: Utc.timestamp_opt(0, 0).unwrap(),
        }
    }

    #[test]
    fn the_sample_catalogue_parses() {
        let catalog = Catalog::parse(SAMPLE).unwrap();
        assert!(!catalog.plans.is_empty());
        assert_eq!(catalog.access, AccessPolicy::default());
    }

    #[test]
    fn access_follows_the_policy_and_the_period_end() {
        let catalog = Catalog::parse(SAMPLE).unwrap();
        let now = Utc.timestamp_opt(1_000, 0).unwrap();
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
                Some(&info(status, "price_pro_monthly", 2_000)),
                now,
            );
            assert_eq!(e.access, expected, "{status}");
            assert_eq!(e.plan.as_deref(), Some("pro"));
            assert_eq!(e.features.is_empty(), !expected);
        }
        let expired = catalog.entitlement(
            None,
            None,
            Some(&info("active", "price_pro_monthly", 500)),
            now,
        );
        assert!(!expired.access);
    }

    #[test]
    fn an_unknown_price_is_its_own_plan_without_features() {
        let catalog = Catalog::parse(SAMPLE).unwrap();
        let now = Utc.timestamp_opt(1_000, 0).unwrap();
        let e = catalog.entitlement(
            None,
            None,
            Some(&info("active", "price_unknown", 2_000)),
            now,
        );
        assert_eq!(e.plan.as_deref(), Some("price_unknown"));
        assert!(e.features.is_empty());
        assert!(e.access);
    }

    #[test]
    fn unknown_org_has_no_access() {
        let e = Catalog::default().entitlement(Some("org_x"), None, None, Utc::now());
        assert_eq!((e.access, e.status.as_str()), (false, "none"));
    }

    #[test]
    fn a_typo_in_the_catalogue_is_an_error() {
        assert!(Catalog::parse("[[plans]]\nname = \"x\"\nprice = [\"p\"]\n").is_err());
    }
}
