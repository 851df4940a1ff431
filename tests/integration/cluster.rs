//! Cluster mode (issue 13): the real binary with `SUBLEDGER_REDIS_CLUSTER=true` against a
//! real three-node Redis Cluster (`REDIS_CLUSTER_URLS`, started by the test command), where
//! the cache's keys land on different nodes and any command over two of them would be
//! refused. It answers what the same binary answers on a standalone Redis, reads through
//! after its keys are wiped, replays, and its replicas see each other's writes through the
//! invalidation channel, also after their subscriptions were cut. On a cluster of its own,
//! it starts while the cluster is down and rides out a node's restart.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::events::{envelope, sub_event, T0};
use crate::freshness::{all_answered_from_memory, all_live, org_status};
use crate::support::helpers::{settle, test_settings, SERVED_PROJECTIONS, TOKEN};
use crate::support::procs::{
    post_event, scratch, serve_command, subledger_command, Served, ThrowawayRedisCluster,
};
use projections::{PlatformTables, TransactionalProjection};

fn cluster_urls() -> String {
    std::env::var("REDIS_CLUSTER_URLS").unwrap_or_else(|_| {
        "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103".to_owned()
    })
}

/// A connection to each node, for what the cluster client does not do (listing keys).
async fn nodes() -> Vec<redis::aio::MultiplexedConnection> {
    let mut nodes = Vec::new();
    for url in cluster_urls().split(',') {
        nodes.push(
            redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .expect("the Redis Cluster is running (scripts/test.sh starts it)"),
        );
    }
    nodes
}

async fn cluster() -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster_urls().split(',').collect::<Vec<_>>())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

/// Every key under `prefix`, with the port of the node holding it.
async fn keys_by_node(prefix: &str) -> Vec<(usize, String)> {
    let mut all = Vec::new();
    for (i, mut node) in nodes().await.into_iter().enumerate() {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut node)
            .await
            .unwrap();
        all.extend(keys.into_iter().map(|key| (i, key)));
    }
    all.sort();
    all
}

/// Deletes every key under `prefix` behind the service's back (one key a command, as a
/// cluster wants), and tells the in-process caches so.
async fn wipe(prefix: &str) {
    let mut cluster = cluster().await;
    for (_, key) in keys_by_node(prefix).await {
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut cluster)
            .await
            .unwrap();
    }
    let _: i64 = redis::cmd("PUBLISH")
        .arg(projections::local_cache::channel(prefix))
        .arg(projections::local_cache::ALL_KEYS)
        .query_async(&mut cluster)
        .await
        .unwrap();
}

/// `subledger serve` in cluster mode.
fn cluster_command(settings: &subledger::Settings) -> std::process::Command {
    let mut command = serve_command(settings);
    command
        .env("REDIS_URL", cluster_urls())
        .env("SUBLEDGER_REDIS_CLUSTER", "true");
    command
}

async fn pool(db_name: &str) -> PgPool {
    PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap()
}

/// The customer.deleted event: docs.stripe.com/api/events/types#event_types-customer.deleted
/// (data.object is the customer; its metadata names the org and user, as checkout sets them).
fn customer_deleted(id: &str, created: i64, customer: &str, org: &str) -> Vec<u8> {
    let object = json!({"id": customer, "object": "customer",
        "metadata": {"organizationId": org, "userId": format!("user_of_{org}")}});
    serde_json::to_vec(&envelope(id, "customer.deleted", created, object)).unwrap()
}

/// The story both servers are told, in order: four customers over two orgs (and their
/// users), one moving to a third org, one deleted.
fn story() -> Vec<Vec<u8>> {
    // Basil-shaped subscription events: tests/integration/events.rs (fields from
    // stripe/openapi spec3 `subscription`).
    let created = "customer.subscription.created";
    let updated = "customer.subscription.updated";
    vec![
        sub_event(
            "evt_k1", created, T0, "sub_k1", "cus_k1", "active", "org_k1",
        ),
        sub_event(
            "evt_k2",
            created,
            T0 + 1,
            "sub_k2",
            "cus_k2",
            "trialing",
            "org_k1",
        ),
        sub_event(
            "evt_k3",
            created,
            T0 + 2,
            "sub_k3",
            "cus_k3",
            "active",
            "org_k2",
        ),
        sub_event(
            "evt_k4",
            created,
            T0 + 3,
            "sub_k4",
            "cus_k4",
            "past_due",
            "org_k2",
        ),
        sub_event(
            "evt_k5",
            updated,
            T0 + 10,
            "sub_k3",
            "cus_k3",
            "active",
            "org_k3",
        ),
        customer_deleted("evt_k6", T0 + 20, "cus_k4", "org_k2"),
        sub_event(
            "evt_k7",
            updated,
            T0 + 30,
            "sub_k2",
            "cus_k2",
            "active",
            "org_k1",
        ),
    ]
}

/// Every answer the API gives about the story's customers, orgs and users, without the
/// `version`s (they count events).
async fn everything(client: &reqwest::Client, address: &str) -> Value {
    let mut paths = Vec::new();
    for customer in ["cus_k1", "cus_k2", "cus_k3", "cus_k4"] {
        paths.push(format!("/v1/customers/{customer}/subscription"));
    }
    for org in ["org_k1", "org_k2", "org_k3"] {
        paths.push(format!("/v1/orgs/{org}/entitlements"));
        paths.push(format!("/v1/users/user_of_{org}/entitlements"));
    }
    let mut out = serde_json::Map::new();
    for path in paths {
        let response = client
            .get(format!("{address}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let mut body: Value = response.json().await.unwrap_or(Value::Null);
        strip_versions(&mut body);
        out.insert(path, json!({"status": status, "body": body}));
    }
    Value::Object(out)
}

fn strip_versions(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.remove("version");
            map.values_mut().for_each(strip_versions);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_versions),
        _ => {}
    }
}

#[tokio::test]
async fn in_cluster_mode_the_binary_answers_what_it_answers_standalone() {
    let dir = scratch("cluster");
    let (standalone_settings, standalone_db, _) = test_settings("cluster_std");
    let (settings, db_name, prefix) = test_settings("cluster_mode");
    let standalone = Served::start(
        serve_command(&standalone_settings),
        &dir.join("standalone.log"),
    )
    .await;
    let log = dir.join("cluster.log");
    let mut served = Served::start(cluster_command(&settings), &log).await;
    let client = reqwest::Client::new();
    let (standalone_pool, cluster_pool) = (pool(&standalone_db).await, pool(&db_name).await);

    // Told one event at a time, each settled, so both apply the same sequence; read
    // whole after each, so the owners' hashes are complete and the next writes (a move,
    // a deletion) must keep them right.
    let mut expected = Value::Null;
    for (step, body) in story().iter().enumerate() {
        for (address, pool) in [
            (&standalone.address, &standalone_pool),
            (&served.address, &cluster_pool),
        ] {
            assert_eq!(post_event(&client, address, body).await, Some(200));
            settle(pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;
        }
        expected = everything(&client, &standalone.address).await;
        assert_eq!(
            everything(&client, &served.address).await,
            expected,
            "after step {step}"
        );
    }
    // The story did what it says (so the comparison compares something).
    let org = |path: &str| expected[path]["body"]["customers"].clone();
    assert_eq!(
        expected["/v1/customers/cus_k4/subscription"]["body"]["deleted"],
        true
    );
    let moved = org("/v1/orgs/org_k3/entitlements").to_string();
    assert!(moved.contains("cus_k3"), "{moved}");
    let left = org("/v1/orgs/org_k2/entitlements").to_string();
    assert!(
        !left.contains("cus_k3") && !left.contains("cus_k4"),
        "{left}"
    );

    // The keys are spread over the nodes (else nothing here needed a cluster).
    let keys = keys_by_node(&prefix).await;
    let held_by: std::collections::BTreeSet<usize> = keys.iter().map(|(node, _)| *node).collect();
    assert!(held_by.len() > 1, "{keys:?}");
    assert!(keys
        .iter()
        .any(|(_, key)| key == &format!("{prefix}stripe:org:org_k3")));

    // The operators' inspector reads the keys (and their TTLs) off their nodes.
    let mut inspect = subledger_command(&settings);
    inspect
        .env("REDIS_URL", cluster_urls())
        .env("SUBLEDGER_REDIS_CLUSTER", "true")
        .args(["inspect", "cus_k3"]);
    let out = tokio::task::spawn_blocking(move || inspect.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("stripe:customer:cus_k3 (TTL "), "{text}");
    assert!(text.contains("log, table and cache agree"), "{text}");

    // Wiped: every answer is still right (read from Postgres), and written back.
    wipe(&prefix).await;
    assert!(keys_by_node(&prefix).await.is_empty());
    assert_eq!(everything(&client, &served.address).await, expected);
    let refilled: Vec<String> = keys_by_node(&prefix)
        .await
        .into_iter()
        .map(|(_, key)| key)
        .collect();
    for key in [
        "stripe:customer:cus_k1",
        "stripe:org:org_k1",
        "stripe:org:org_k3",
    ] {
        assert!(refilled.contains(&format!("{prefix}{key}")), "{key}");
    }

    // `subledger replay` clears every node's keys of the prefix (a stray one too) and
    // rebuilds them from the log.
    served.kill();
    let stray = format!("{prefix}stripe:customer:cus_stray");
    let _: () = redis::cmd("SET")
        .arg(&stray)
        .arg("{}")
        .query_async(&mut cluster().await)
        .await
        .unwrap();
    let mut replay = subledger_command(&settings);
    replay
        .env("REDIS_URL", cluster_urls())
        .env("SUBLEDGER_REDIS_CLUSTER", "true")
        .arg("replay");
    let out = tokio::task::spawn_blocking(move || replay.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rebuilt: Vec<String> = keys_by_node(&prefix)
        .await
        .into_iter()
        .map(|(_, key)| key)
        .collect();
    assert!(!rebuilt.contains(&stray), "{rebuilt:?}");
    for customer in ["cus_k1", "cus_k2", "cus_k3", "cus_k4"] {
        assert!(
            rebuilt.contains(&format!("{prefix}stripe:customer:{customer}")),
            "{customer}: {rebuilt:?}"
        );
    }
    let served = Served::start(cluster_command(&settings), &log).await;
    assert_eq!(everything(&client, &served.address).await, expected);

    drop(served);
    drop(standalone);
    wipe(&prefix).await;
    std::fs::remove_dir_all(&dir).ok();
}

/// Posts a change to `to` and waits until `reader` answers it. The replicas keep answers
/// for a minute, so only an invalidation makes `reader` answer it within the wait.
async fn change_reaches(client: &reqwest::Client, to: &str, reader: &str, step: i64, status: &str) {
    // Basil-shaped: tests/integration/events.rs.
    let body = sub_event(
        &format!("evt_r{step}"),
        "customer.subscription.updated",
        T0 + 10 * step,
        "sub_r",
        "cus_r",
        status,
        "org_r",
    );
    assert_eq!(post_event(client, to, &body).await, Some(200));
    let deadline = Instant::now() + Duration::from_secs(20);
    while org_status(client, reader, "org_r").await != status {
        assert!(
            Instant::now() < deadline,
            "step {step}: {reader} never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Read a few times, so the next change finds it held in memory.
    for _ in 0..3 {
        assert_eq!(org_status(client, reader, "org_r").await, status);
    }
}

#[tokio::test]
async fn in_cluster_mode_replicas_see_each_others_writes_through_the_invalidations() {
    let dir = scratch("cluster-replicas");
    let (settings, _db_name, prefix) = test_settings("cluster_replicas");
    let command = || {
        let mut command = cluster_command(&settings);
        command.env("SUBLEDGER_LOCAL_CACHE_MAX_AGE_MS", "60000");
        command
    };
    let first = Served::start(command(), &dir.join("serve-0.log")).await;
    let second = Served::start(command(), &dir.join("serve-1.log")).await;
    let addresses = [first.address.clone(), second.address.clone()];
    let client = reqwest::Client::new();
    all_live(&client, &addresses).await;

    let statuses = ["trialing", "active", "past_due", "active"];
    for (step, status) in statuses.iter().enumerate() {
        let (to, reader) = (&addresses[step % 2], &addresses[(step + 1) % 2]);
        change_reaches(&client, to, reader, step as i64, status).await;
    }
    all_answered_from_memory(&client, &addresses).await;

    // Every node cuts its subscribers: each replica subscribes again (on the next node
    // it was given) and the changes still reach the other.
    for mut node in nodes().await {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut node)
            .await
            .unwrap();
    }
    all_live(&client, &addresses).await;
    change_reaches(&client, &addresses[0], &addresses[1], 10, "past_due").await;
    change_reaches(&client, &addresses[1], &addresses[0], 11, "active").await;

    drop(first);
    drop(second);
    wipe(&prefix).await;
    std::fs::remove_dir_all(&dir).ok();
}

/// The customer's answer as the cluster holds it (its status), if it holds one.
async fn cached_status(urls: &str, key: &str) -> Option<String> {
    let client = redis::cluster::ClusterClient::new(urls.split(',').collect::<Vec<_>>()).ok()?;
    let mut conn = client.get_async_connection().await.ok()?;
    let raw: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .ok()?;
    let value: Value = serde_json::from_str(&raw?).ok()?;
    value["status"].as_str().map(str::to_owned)
}

async fn wait_cached(urls: &str, key: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while cached_status(urls, key).await.as_deref() != Some(status) {
        assert!(Instant::now() < deadline, "{key} never held {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn in_cluster_mode_it_starts_without_the_cluster_and_rides_out_a_node_restart() {
    const PASSWORD: &str = "cluster-pass-5a4b3c2d";
    let mut redis = ThrowawayRedisCluster::new(PASSWORD);
    let urls = redis.urls();
    let dir = scratch("cluster-outage");
    let log = dir.join("serve.log");
    let (settings, db_name, prefix) = test_settings("cluster_outage");
    let mut command = cluster_command(&settings);
    command.env("REDIS_URL", &urls);
    // The cluster is not up: it starts, takes webhooks and answers from Postgres.
    let served = Served::start(command, &log).await;
    // No kept-alive connections: the waits below outlast the server's idle timeout, and a
    // request sent on a connection it is closing gets no answer.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let pool = pool(&db_name).await;
    let event = |step: i64, status: &str| {
        // Basil-shaped: tests/integration/events.rs.
        sub_event(
            &format!("evt_o{step}"),
            "customer.subscription.updated",
            T0 + 10 * step,
            "sub_o",
            "cus_o",
            status,
            "org_o",
        )
    };
    assert_eq!(
        post_event(&client, &served.address, &event(0, "trialing")).await,
        Some(200)
    );
    settle(&pool, &[PlatformTables::NAME], Duration::from_secs(60)).await;
    assert_eq!(
        org_status(&client, &served.address, "org_o").await,
        "trialing"
    );

    // The cluster comes up: the cache projection catches up by itself.
    redis.start();
    let key = format!("{prefix}stripe:customer:cus_o");
    wait_cached(&urls, &key, "trialing").await;
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;

    // The node holding the customer's key restarts empty (scripts and keys gone): the
    // next write reaches it again.
    let node = redis.node_of(&key);
    redis.kill_node(node);
    redis.start_node(node);
    redis.wait_ok();
    assert_eq!(
        post_event(&client, &served.address, &event(1, "active")).await,
        Some(200)
    );
    wait_cached(&urls, &key, "active").await;
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(60)).await;
    assert_eq!(
        org_status(&client, &served.address, "org_o").await,
        "active"
    );

    drop(served);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(PASSWORD),
        "the log shows the cluster's password"
    );
    std::fs::remove_dir_all(&dir).ok();
}
