//! The feature check: "may this org or user use this feature now?", answered from the
//! [`Entitlement`] one read produced, so it is exactly as fresh and as fast as the
//! entitlement read and can never disagree with it.
//!
//! It must never read anything nor judge access itself: the catalogue already judged the
//! entitlement, and a feature is granted exactly when the entitlement lists it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::Entitlement;

/// The answer of `GET /v1/orgs|users/{id}/entitlements/{feature}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "feature": "api", "access": true, "plan": "pro", "access_until": "2026-12-25T00:00:00Z"
}))]
pub struct FeatureAccess {
    /// The feature asked about, as asked.
    pub feature: String,
    /// Whether the org or user may use it now.
    pub access: bool,
    /// The plan the org or user is on (also when it lacks the feature); `None` without a
    /// subscription.
    pub plan: Option<String>,
    /// Until when access lasts unless Stripe says otherwise; `None` without access.
    #[serde(default, with = "aggregates::time::utc_option")]
    pub access_until: Option<DateTime<Utc>>,
}

impl Entitlement {
    /// Whether this entitlement grants `feature`, with the plan and the end of access.
    pub fn feature(&self, feature: &str) -> FeatureAccess {
        let access = self.access && self.features.iter().any(|f| f == feature);
        FeatureAccess {
            feature: feature.to_owned(),
            access,
            plan: self.plan.clone(),
            access_until: if access { self.access_until } else { None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entitlement(access: bool, features: &[&str]) -> Entitlement {
        Entitlement {
            org_id: Some("org_1".into()),
            user_id: None,
            customer_id: Some("cus_1".into()),
            status: if access { "active" } else { "canceled" }.into(),
            plan: Some("pro".into()),
            features: features.iter().map(|f| f.to_string()).collect(),
            access,
            access_until: access.then(|| DateTime::from_timestamp(2_000_000_000, 0).unwrap()),
            subscription_id: Some("sub_1".into()),
            seats: Some(1),
            customers: vec!["cus_1".into()],
            subscriptions: vec![],
        }
    }

    #[test]
    fn a_feature_is_granted_exactly_when_the_entitlement_lists_it() {
        let e = entitlement(true, &["api", "projects:3"]);
        let api = e.feature("api");
        assert!(api.access);
        assert_eq!(api.plan.as_deref(), Some("pro"));
        assert_eq!(api.access_until, e.access_until);
        let other = e.feature("sso");
        assert!(!other.access);
        assert_eq!(
            (other.plan.as_deref(), other.access_until),
            (Some("pro"), None)
        );
        let lapsed = entitlement(false, &[]).feature("api");
        assert!(!lapsed.access && lapsed.access_until.is_none());
    }
}
