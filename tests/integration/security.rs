//! Auth and bad input against the real binary: who may read what (a matrix over every kind
//! of token and route; no cross-tenant read), malformed and oversized requests (a 4xx,
//! never a 5xx or a panic), and no secret in any body or log line.

use std::io::{Read, Write};
use std::time::Duration;

use crate::events::{sub_event, T0};
use crate::support::helpers::{
    metrics_page, settle, test_settings, SECRET, SERVED_PROJECTIONS, TOKEN,
};
use crate::support::procs::{
    assert_no_secret, free_port, post_event, scratch, send_json, serve_command, Served,
    ADMIN_TOKEN, STRIPE_KEY,
};
use crate::support::stripe_sim::sign;

const ORG_A: &str = "orgtok-aaaa1111";
const ORG_B: &str = "orgtok-bbbb2222";

async fn status_and_body(request: reqwest::RequestBuilder) -> Option<(u16, String)> {
    let response = request.timeout(Duration::from_secs(20)).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

/// Sends raw bytes and returns the status line the server answered with (empty when it
/// closed the connection without one).
fn raw_request(address: &str, bytes: &[u8]) -> String {
    let host = address.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn tokens_read_only_what_they_may_and_bad_input_never_gives_a_5xx() {
    let (settings, db_name, _) = test_settings("security");
    let dir = scratch("security");
    let log = dir.join("serve.log");
    // With a Stripe key and an API nothing answers at, so every sync a webhook asks for
    // fails and is logged: the key must not be in those lines either.
    let mut command = serve_command(&settings);
    command.env("STRIPE_SECRET_KEY", STRIPE_KEY).env(
        "STRIPE_API_BASE",
        format!("http://127.0.0.1:{}", free_port()),
    );
    let serve = Served::start(command, &log).await;
    let base = serve.address.clone();
    let client = reqwest::Client::new();
    for (event, customer, org) in [("evt_sa", "cus_sa", "org_a"), ("evt_sb", "cus_sb", "org_b")] {
        let body = sub_event(
            event,
            "customer.subscription.created",
            T0,
            &format!("sub_{customer}"),
            customer,
            "active",
            org,
        );
        assert_eq!(post_event(&client, &base, &body).await, Some(200));
    }
    // Both answers are in the read models before the matrix runs.
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db_name}"))
        .await
        .unwrap();
    settle(&pool, &SERVED_PROJECTIONS, Duration::from_secs(30)).await;
    pool.close().await;

    let routes = [
        "/v1/orgs/org_a/entitlements",
        "/v1/orgs/org_b/entitlements",
        "/v1/orgs/org%5Fb/entitlements",
        "/v1/orgs/..%2Forg_b/entitlements",
        "/v1/orgs/ORG_A/entitlements",
        "/v1/customers/cus_sb/subscription",
        "/v1/users/user_of_org_b/entitlements",
        "/ops/dead-letters",
    ];
    // Expected status per token, route by route (400: an org id that is not id-shaped).
    let matrix: [(&str, Option<&str>, [u16; 8]); 6] = [
        ("api", Some(TOKEN), [200, 200, 200, 400, 200, 200, 200, 401]),
        (
            "org_a",
            Some(ORG_A),
            [200, 403, 403, 403, 403, 403, 403, 401],
        ),
        (
            "org_b",
            Some(ORG_B),
            [403, 200, 200, 403, 403, 403, 403, 401],
        ),
        (
            "admin",
            Some(ADMIN_TOKEN),
            [401, 401, 401, 401, 401, 401, 401, 200],
        ),
        ("none", None, [401; 8]),
        ("wrong", Some("orgtok-aaaa1112"), [401; 8]),
    ];
    for (who, token, expected) in matrix {
        for (route, expected) in routes.iter().zip(expected) {
            let mut request = client.get(format!("{base}{route}"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let (status, body) = status_and_body(request).await.unwrap();
            assert_eq!(status, expected, "{who} GET {route}: {body}");
            assert_no_secret("a response body", &body);
            // An org-scoped token never sees another org's customer.
            match who {
                "org_a" => assert!(
                    !body.contains("cus_sb") && !body.contains("org_b"),
                    "{route}: {body}"
                ),
                "org_b" => assert!(
                    !body.contains("cus_sa") && !body.contains("org_a"),
                    "{route}: {body}"
                ),
                _ => {}
            }
        }
    }
    let own = send_json(
        client
            .get(format!("{base}/v1/orgs/org_a/entitlements"))
            .bearer_auth(ORG_A),
    )
    .await;
    assert_eq!(
        (own["customer_id"].as_str(), own["access"].as_bool()),
        (Some("cus_sa"), Some(true))
    );
    // A sync on demand calls Stripe's API, which is not there: it fails, and neither its
    // answer nor its log lines carry the key.
    let (status, body) = status_and_body(
        client
            .post(format!("{base}/v1/customers/cus_sa/sync"))
            .bearer_auth(TOKEN),
    )
    .await
    .unwrap();
    eprintln!("sync with Stripe unreachable: {status} {body}");
    assert!(status >= 500, "{status} {body}");
    assert_no_secret("the failed sync's body", &body);

    // Bad input: each is refused with the status named, none with a 5xx. A fresh connection
    // for each: a server may close one after refusing an oversized request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let long_id = "c".repeat(300);
    let signed = |body: &[u8]| sign(SECRET, chrono::Utc::now().timestamp(), body);
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, reqwest::RequestBuilder, &[u16])> = vec![
        ("unknown route", client.get(format!("{base}/nope")), &[404]),
        (
            "unknown /v1 route",
            client.get(format!("{base}/v1/nope")).bearer_auth(TOKEN),
            &[404],
        ),
        (
            "NUL in an id",
            client
                .get(format!("{base}/v1/customers/cus%00x/subscription"))
                .bearer_auth(TOKEN),
            &[400],
        ),
        (
            "overlong id",
            client
                .get(format!("{base}/v1/customers/{long_id}/subscription"))
                .bearer_auth(TOKEN),
            &[400],
        ),
        (
            "SQL in an id",
            client
                .get(format!(
                    "{base}/v1/customers/cus'%20OR%201=1--/subscription"
                ))
                .bearer_auth(TOKEN),
            &[400],
        ),
        (
            "invalid UTF-8 in an id",
            client
                .get(format!("{base}/v1/orgs/%F0%28%8C%28/entitlements"))
                .bearer_auth(TOKEN),
            &[400],
        ),
        (
            "GET the webhook",
            client.get(format!("{base}/webhooks/stripe")),
            &[405],
        ),
        (
            "POST /healthz",
            client.post(format!("{base}/healthz")),
            &[405],
        ),
        (
            "DELETE an entitlement",
            client
                .delete(format!("{base}/v1/orgs/org_a/entitlements"))
                .bearer_auth(TOKEN),
            &[405],
        ),
        (
            "oversized body",
            client
                .post(format!("{base}/webhooks/stripe"))
                .header("stripe-signature", "t=1,v1=00")
                .body(vec![b'x'; 2 * 1024 * 1024]),
            &[413],
        ),
        (
            "no signature",
            client.post(format!("{base}/webhooks/stripe")).body("{}"),
            &[400],
        ),
        (
            "signed, not JSON",
            client
                .post(format!("{base}/webhooks/stripe"))
                .header("stripe-signature", signed(b"not json"))
                .body("not json"),
            &[400],
        ),
        (
            "signed, not an event",
            client
                .post(format!("{base}/webhooks/stripe"))
                .header("stripe-signature", signed(b"{}"))
                .body("{}"),
            &[400],
        ),
        (
            "signed, nested 100k deep",
            client
                .post(format!("{base}/webhooks/stripe"))
                .header("stripe-signature", signed(nested.as_bytes()))
                .body(nested.clone()),
            &[400],
        ),
        (
            "bearer of 100 KiB",
            client
                .get(format!("{base}/v1/orgs/org_a/entitlements"))
                .bearer_auth("x".repeat(100 * 1024)),
            &[401],
        ),
        (
            "header of 1 MiB",
            client
                .get(format!("{base}/healthz"))
                .header("x-big", "x".repeat(1024 * 1024)),
            &[431, 400],
        ),
    ];
    let mut many = client.get(format!("{base}/healthz"));
    for i in 0..200 {
        many = many.header(format!("x-h{i}"), "1");
    }
    let cases = cases
        .into_iter()
        .chain([("200 headers", many, &[431u16, 400][..])]);
    for (what, request, allowed) in cases {
        match status_and_body(request).await {
            Some((status, body)) => {
                eprintln!("{what}: {status}");
                assert!(allowed.contains(&status), "{what}: {status} {body}");
                assert_no_secret(what, &body);
            }
            // Refusing an oversized request may mean closing the connection mid-send.
            None => assert!(
                what.contains("header") || what.contains("body"),
                "{what}: no answer"
            ),
        }
    }
    for (what, bytes) in [
        ("garbage", b"GARBAGE\r\n\r\n".to_vec()),
        (
            "invalid bytes in the path",
            b"GET /v1/customers/\xff\xfe/subscription HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        ),
        (
            "a bad content-length",
            b"POST /webhooks/stripe HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n".to_vec(),
        ),
    ] {
        let line = raw_request(&base, &bytes);
        eprintln!("{what}: {line:?}");
        assert!(line.is_empty() || line.contains(" 400 "), "{what}: {line}");
    }
    // And it is still up and well.
    let (status, _) = status_and_body(client.get(format!("{base}/healthz")))
        .await
        .unwrap();
    assert_eq!(status, 200);

    drop(serve);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        logs.contains(r#""message":"sync""#) && logs.contains(r#""outcome":"failed""#),
        "the failed sync was logged: {logs}"
    );
    assert_no_secret("the log", &logs);
    assert!(
        !logs.contains("orgtok-aaaa1112"),
        "a presented token was logged"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Token rotation (issue 15): each token setting takes several values, all accepted, so a
/// leaked or old token is replaced without a moment where callers holding either one are
/// refused; once it is removed (and the process restarted), it is refused, and an admin
/// session traded for it ends. Which position let a request in is counted, so an operator
/// can see the old one fall out of use before removing it.
#[tokio::test]
async fn tokens_rotate_without_a_window_where_either_is_refused() {
    const API_OLD: &str = "api-old-1111aaaa";
    const API_NEW: &str = "api-new-2222bbbb";
    const ADMIN_OLD: &str = "adm-old-3333cccc";
    const ADMIN_NEW: &str = "adm-new-4444dddd";
    const ORG_OLD: &str = "org-old-5555eeee";
    const ORG_NEW: &str = "org-new-6666ffff";
    let (settings, _, _) = test_settings("rotation");
    let dir = scratch("rotation");
    let log = dir.join("serve.log");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let status = |request: reqwest::RequestBuilder| async move {
        request.send().await.unwrap().status().as_u16()
    };

    // During the rotation: old and new, side by side.
    let mut command = serve_command(&settings);
    command
        .env("SUBLEDGER_API_TOKEN", format!("{API_OLD}, {API_NEW}"))
        .env("SUBLEDGER_ADMIN_TOKEN", format!("{ADMIN_OLD},{ADMIN_NEW}"))
        .env(
            "SUBLEDGER_ORG_TOKENS",
            format!("{ORG_OLD}=org_a,{ORG_NEW}=org_a"),
        );
    let serve = Served::start(command, &log).await;
    let base = serve.address.clone();
    let entitlements = format!("{base}/v1/orgs/org_a/entitlements");
    let other_org = format!("{base}/v1/orgs/org_b/entitlements");
    let dead_letters = format!("{base}/ops/dead-letters");
    for token in [API_OLD, API_NEW] {
        assert_eq!(
            status(client.get(&entitlements).bearer_auth(token)).await,
            200,
            "{token}"
        );
        assert_eq!(
            status(client.get(&other_org).bearer_auth(token)).await,
            200,
            "{token}"
        );
        assert_eq!(
            status(client.get(&dead_letters).bearer_auth(token)).await,
            401,
            "{token}"
        );
    }
    for token in [ORG_OLD, ORG_NEW] {
        assert_eq!(
            status(client.get(&entitlements).bearer_auth(token)).await,
            200,
            "{token}"
        );
        assert_eq!(
            status(client.get(&other_org).bearer_auth(token)).await,
            403,
            "{token}"
        );
        // The feature check on its own org's entitlements, and no other org's.
        for (url, expected) in [(&entitlements, 200), (&other_org, 403)] {
            assert_eq!(
                status(client.get(format!("{url}/api")).bearer_auth(token)).await,
                expected,
                "{token} {url}/api"
            );
        }
    }
    for token in [ADMIN_OLD, ADMIN_NEW] {
        assert_eq!(
            status(client.get(&dead_letters).bearer_auth(token)).await,
            200,
            "{token}"
        );
        assert_eq!(
            status(client.get(&entitlements).bearer_auth(token)).await,
            401,
            "{token}"
        );
    }
    // An admin session traded for the old token.
    let traded = client
        .get(format!("{base}/admin?token={ADMIN_OLD}"))
        .send()
        .await
        .unwrap();
    assert_eq!(traded.status(), 303);
    let cookie = traded.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let admin_page = |cookie: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            client
                .get(format!("{base}/admin"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(admin_page(cookie.clone()).await, 200);
    // Each position's use is counted.
    let metrics = metrics_page(&client, &base).await;
    for (kind, position) in [
        ("api", 0),
        ("api", 1),
        ("admin", 0),
        ("admin", 1),
        ("org", 0),
        ("org", 1),
    ] {
        let series =
            format!("subledger_token_uses_total{{kind=\"{kind}\",position=\"{position}\"}} ");
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
    drop(serve);

    // After it: the old ones are gone.
    let mut command = serve_command(&settings);
    command
        .env("SUBLEDGER_API_TOKEN", API_NEW)
        .env("SUBLEDGER_ADMIN_TOKEN", ADMIN_NEW)
        .env("SUBLEDGER_ORG_TOKENS", format!("{ORG_NEW}=org_a"));
    let serve = Served::start(command, &log).await;
    let base = serve.address.clone();
    let entitlements = format!("{base}/v1/orgs/org_a/entitlements");
    let dead_letters = format!("{base}/ops/dead-letters");
    for (token, expected) in [
        (API_OLD, 401),
        (API_NEW, 200),
        (ORG_OLD, 401),
        (ORG_NEW, 200),
    ] {
        assert_eq!(
            status(client.get(&entitlements).bearer_auth(token)).await,
            expected,
            "{token}"
        );
    }
    for (token, expected) in [(ADMIN_OLD, 401), (ADMIN_NEW, 200)] {
        assert_eq!(
            status(client.get(&dead_letters).bearer_auth(token)).await,
            expected,
            "{token}"
        );
    }
    let admin_page = client
        .get(format!("{base}/admin"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(
        admin_page, 401,
        "the session traded for the removed token has ended"
    );
    drop(serve);

    let logs = std::fs::read_to_string(&log).unwrap();
    for token in [API_OLD, API_NEW, ADMIN_OLD, ADMIN_NEW, ORG_OLD, ORG_NEW] {
        assert!(!logs.contains(token), "a token is in the log");
    }
    std::fs::remove_dir_all(&dir).ok();
}
