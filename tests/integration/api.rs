//! The read API: auth, 404s, entitlements, cache fallback, replay.

use serde_json::Value;

use crate::events::{sub_event, T0};
use crate::support::helpers::spawn_app;

#[tokio::test]
async fn v1_needs_the_bearer_token() {
    let app = spawn_app("auth").await;
    for token in [None, Some("wrong"), Some("")] {
        let mut request = app
            .client
            .get(format!("{}/v1/orgs/org_1/entitlements", app.address));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{token:?}");
    }
    let health = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn unknown_customers_are_404_and_unknown_orgs_have_no_access() {
    let app = spawn_app("unknown").await;
    assert_eq!(
        app.get("/v1/customers/cus_never/subscription")
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get("/v1/customers/bad%20id/subscription")
            .await
            .status(),
        400
    );
    assert_eq!(app.get("/v1/nothing-here").await.status(), 404);
    for path in [
        "/v1/orgs/org_never/entitlements",
        "/v1/users/user_never/entitlements",
    ] {
        let e = app.get_json(path).await;
        assert_eq!(
            (e["access"].as_bool(), e["status"].as_str()),
            (Some(false), Some("none")),
            "{path}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn entitlements_follow_the_subscription_and_the_catalogue() {
    let app = spawn_app("ent").await;
    let steps = [
        (
            "evt_1",
            "customer.subscription.created",
            0,
            "trialing",
            true,
        ),
        ("evt_2", "customer.subscription.updated", 10, "active", true),
        (
            "evt_3",
            "customer.subscription.updated",
            20,
            "past_due",
            true,
        ),
        (
            "evt_4",
            "customer.subscription.updated",
            30,
            "unpaid",
            false,
        ),
        (
            "evt_5",
            "customer.subscription.deleted",
            40,
            "canceled",
            false,
        ),
    ];
    for (id, kind, dt, status, access) in steps {
        let body = sub_event(id, kind, T0 + dt, "sub_e", "cus_e", status, "org_e");
        assert_eq!(app.post_webhook(&body).await.status(), 200);
        app.settle().await;
        let e = app.get_json("/v1/orgs/org_e/entitlements").await;
        assert_eq!(e["status"], status);
        assert_eq!(e["access"], access, "{status}");
        assert_eq!(e["plan"], "pro");
        assert_eq!(e["customer_id"], "cus_e");
        assert_eq!(e["features"].as_array().unwrap().is_empty(), !access);
        assert_eq!(e["access_until"].is_null(), !access);
        let by_user = app.get_json("/v1/users/user_of_org_e/entitlements").await;
        assert_eq!(by_user["status"], status);
    }
    // Resubscribing makes the new subscription current.
    let body = sub_event(
        "evt_6",
        "customer.subscription.created",
        T0 + 50,
        "sub_f",
        "cus_e",
        "active",
        "org_e",
    );
    app.post_webhook(&body).await;
    app.settle().await;
    let info = app.get_json("/v1/customers/cus_e/subscription").await;
    assert_eq!(
        (info["subscription_id"].as_str(), info["status"].as_str()),
        (Some("sub_f"), Some("active"))
    );
    app.stop().await;
}

#[tokio::test]
async fn with_the_cache_wiped_reads_are_still_right_and_refill_it() {
    let app = spawn_app("wipe").await;
    let body = sub_event(
        "evt_w",
        "customer.subscription.created",
        T0,
        "sub_w",
        "cus_w",
        "active",
        "org_w",
    );
    app.post_webhook(&body).await;
    app.settle().await;
    let before = app.get_json("/v1/customers/cus_w/subscription").await;
    let ent_before = app.get_json("/v1/orgs/org_w/entitlements").await;
    assert!(app.redis_get("stripe:customer:cus_w").await.is_some());
    app.wipe_cache().await;
    assert!(app.redis_keys().await.is_empty());
    assert_eq!(
        app.get_json("/v1/customers/cus_w/subscription").await,
        before
    );
    assert_eq!(
        app.get_json("/v1/orgs/org_w/entitlements").await,
        ent_before
    );
    // Read-through wrote the answer back, with its TTL.
    let cached: Value =
        serde_json::from_str(&app.redis_get("stripe:customer:cus_w").await.unwrap()).unwrap();
    assert_eq!(cached, before);
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}stripe:customer:cus_w", app.prefix))
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    assert!((86_000..=86_400).contains(&ttl), "ttl {ttl}");
    app.stop().await;
}

#[tokio::test]
async fn the_cache_never_goes_back_to_an_older_version() {
    let app = spawn_app("ver").await;
    for (id, dt, status) in [("evt_v1", 0, "trialing"), ("evt_v2", 10, "active")] {
        app.post_webhook(&sub_event(
            id,
            "customer.subscription.updated",
            T0 + dt,
            "sub_v",
            "cus_v",
            status,
            "org_v",
        ))
        .await;
        app.settle().await;
    }
    let current = app.get_json("/v1/customers/cus_v/subscription").await;
    let mut older: projections::SubscriptionInfo = serde_json::from_value(current.clone()).unwrap();
    older.version -= 1;
    older.status = "trialing".into();
    assert!(
        !app.services.cache.put(&older).await.unwrap(),
        "an older version is refused"
    );
    assert_eq!(
        app.get_json("/v1/customers/cus_v/subscription").await,
        current
    );
    app.stop().await;
}

/// The feature check answers from the same read as the entitlement: granted exactly when
/// the entitlement lists the feature, with its plan and end of access; an unknown org or
/// feature is a plain "no"; a malformed feature is a 400; an org-scoped token may ask
/// about its own org only.
#[tokio::test]
async fn the_feature_check_answers_one_feature_of_the_entitlement() {
    let app = spawn_app("feature").await;
    let body = sub_event(
        "evt_f1",
        "customer.subscription.created",
        T0,
        "sub_f",
        "cus_f",
        "active",
        "org_f",
    );
    assert_eq!(app.post_webhook(&body).await.status(), 200);
    app.settle().await;
    for owner in ["/v1/orgs/org_f", "/v1/users/user_of_org_f"] {
        let entitlement = app.get_json(&format!("{owner}/entitlements")).await;
        assert_eq!(entitlement["access"], true);
        for feature in ["api", "projects:unlimited", "sso", "projects:3"] {
            let check = app
                .get_json(&format!("{owner}/entitlements/{feature}"))
                .await;
            let listed = entitlement["features"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == feature);
            assert_eq!(
                check,
                serde_json::json!({
                    "feature": feature,
                    "access": listed,
                    "plan": "pro",
                    "access_until": if listed { entitlement["access_until"].clone() } else { Value::Null },
                }),
                "{owner} {feature}"
            );
        }
    }
    assert_eq!(
        app.get_json("/v1/orgs/org_never/entitlements/api").await,
        serde_json::json!({"feature": "api", "access": false, "plan": null, "access_until": null})
    );
    for bad in [
        "/v1/orgs/org_f/entitlements/a%20b",
        "/v1/orgs/org_f/entitlements/%C3%A9",
        "/v1/users/bad%20id/entitlements/api",
    ] {
        let response = app.get(bad).await;
        assert_eq!(response.status(), 400, "{bad}");
    }

    // Cancelled: the plan stays named, the feature is no longer granted.
    let body = sub_event(
        "evt_f2",
        "customer.subscription.deleted",
        T0 + 10,
        "sub_f",
        "cus_f",
        "canceled",
        "org_f",
    );
    assert_eq!(app.post_webhook(&body).await.status(), 200);
    app.settle().await;
    let check = app.get_json("/v1/orgs/org_f/entitlements/api").await;
    assert_eq!(
        (check["access"].as_bool(), check["plan"].as_str()),
        (Some(false), Some("pro"))
    );
    assert!(check["access_until"].is_null());
    app.stop().await;
}
