//! The OpenAPI document: the committed copy is the one the server serves, it lists every
//! route the router has, and schemathesis (an independent fuzzer, from PyPI) finds no 5xx
//! and no answer that strays from it, against the live service with its tokens.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use subledger::config::Token;

use crate::events::{sub_event, T0};
use crate::support::fake_stripe::FakeStripe;
use crate::support::helpers::{spawn_with, test_settings, TOKEN};
use crate::support::procs::ADMIN_TOKEN;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

/// The document as `subledger openapi` prints it (and as it is committed).
fn rendered() -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(subledger::http::openapi_document()).unwrap()
    )
}

/// `docs/openapi.json` is what the code generates and what `GET /openapi.json` serves. To
/// regenerate it after changing an answer's shape: `cargo run -- openapi > docs/openapi.json`
/// (or run this test with `SUBLEDGER_WRITE_OPENAPI=1`).
#[tokio::test]
async fn the_committed_document_is_the_one_served() {
    if std::env::var_os("SUBLEDGER_WRITE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, rendered()).unwrap();
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap();
    assert!(
        committed == rendered(),
        "docs/openapi.json differs from what the code generates: run `cargo run -- openapi > docs/openapi.json`"
    );
    let (settings, db_name, prefix) = test_settings("openapi");
    let app = spawn_with(settings, db_name, prefix).await;
    let response = app
        .client
        .get(format!("{}/openapi.json", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let served: Value = response.json().await.unwrap();
    let committed: Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(served, committed);
    assert_eq!(served["openapi"], "3.1.0");
    app.stop().await;
}

/// Every route in the router (read from its source, so a new route cannot be forgotten)
/// is a path of the document, with the same methods, and nothing else is; every operation
/// documents its answers with examples or schemas, and the authenticated ones their auth.
#[test]
fn the_document_lists_every_route_with_its_auth_and_error_bodies() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut routes = BTreeSet::new();
    // Every route is registered under its whole path (none is nested under a prefix).
    for file in ["src/http/mod.rs", "src/http/admin/mod.rs"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let code = &text[text.find("pub fn router").unwrap()..];
        let mut at = 0;
        while let Some(found) = code[at..].find(".route(") {
            let start = at + found;
            let rest = &code[start..];
            let open = rest.find('"').unwrap();
            let close = open + 1 + rest[open + 1..].find('"').unwrap();
            let path = &rest[open + 1..close];
            // The call's own closing parenthesis (rustfmt may split it over lines).
            let mut depth = 0;
            let call_end = rest
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    c == ')' && depth == 0
                })
                .unwrap()
                .0;
            let call = &rest[..call_end];
            let path: String = path
                .split('/')
                .map(|seg| match seg.strip_prefix(':') {
                    Some(name) => format!("{{{name}}}"),
                    None => seg.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("/");
            for method in ["get", "post"] {
                if call.contains(&format!("{method}(")) {
                    routes.insert(format!("{} {path}", method.to_uppercase()));
                }
            }
            at = start + close;
        }
    }
    assert!(routes.len() > 15, "{routes:?}");
    let document = subledger::http::openapi_document();
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
            let responses = operation["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path}");
            let authenticated =
                path.starts_with("/v1") || path.starts_with("/ops") || path.starts_with("/admin");
            if authenticated {
                assert!(
                    !operation["security"].as_array().unwrap().is_empty(),
                    "{method} {path} names its auth"
                );
                assert!(
                    responses.contains_key("401"),
                    "{method} {path} documents 401"
                );
            }
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let json = &response["content"]["application/json"]["schema"];
                    let error_body = json["$ref"] == "#/components/schemas/ErrorBody"
                        || json["$ref"] == "#/components/schemas/Readiness";
                    let html = response["content"]["text/html"].is_object();
                    assert!(error_body || html, "{method} {path} {status}: {response}");
                }
            }
        }
    }
    assert_eq!(
        routes, documented,
        "the router's routes and the document's paths"
    );
    for schema in [
        "Entitlement",
        "FeatureAccess",
        "SubscriptionInfo",
        "ErrorBody",
        "CheckoutRequest",
    ] {
        assert!(
            document["components"]["schemas"][schema]["example"].is_object(),
            "{schema} has an example"
        );
    }
}

/// Where the test command installs schemathesis (`scripts/test.sh`), unless
/// `SCHEMATHESIS` names another.
fn schemathesis() -> String {
    std::env::var("SCHEMATHESIS").unwrap_or_else(|_| {
        let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/target/tools/schemathesis/bin/schemathesis");
        assert!(
            std::path::Path::new(bin).exists(),
            "schemathesis is not installed: run ./scripts/test.sh (which installs it) or set SCHEMATHESIS"
        );
        bin.to_owned()
    })
}

/// Schemathesis against the live service (Stripe faked at its HTTP boundary, as in every
/// test): each group of operations with its token; `not_a_server_error` and the
/// conformance checks of status codes, content types, headers and bodies, for examples,
/// schema-coverage and fuzzed inputs, valid and invalid. A failure prints schemathesis's
/// report with the request that reproduces it.
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_every_answer_conforms() {
    let fake = FakeStripe::start().await;
    let (mut settings, db_name, prefix) = test_settings("schemathesis");
    settings.stripe_secret_key = Some(SecretString::from("sk_test_fake".to_owned()));
    settings.stripe_api_base = fake.base_url.clone();
    // Generous: a timeout on a loaded machine would be a 5xx schemathesis reports.
    settings.stripe_timeout = Duration::from_secs(5);
    settings.stripe_backoff = Duration::from_millis(5);
    settings.reconcile_interval = None;
    settings.redirect_origins = vec!["https://app.example.com".to_owned()];
    settings.admin_tokens = vec![Token::from(ADMIN_TOKEN)];
    // The documented example of the EventBridge header is a configured secret, so the
    // examples reach past authentication.
    settings.eventbridge_secrets = vec![Token::from("eb-secret")];
    let app = spawn_with(settings, db_name, prefix).await;
    // The documented examples name org_123 and cus_123: let them exist.
    let body = sub_event(
        "evt_st1",
        "customer.subscription.created",
        T0,
        "sub_123",
        "cus_123",
        "active",
        "org_123",
    );
    assert_eq!(app.post_webhook(&body).await.status(), 200);
    app.settle().await;

    let dir = std::env::temp_dir().join(app.prefix.replace(':', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("openapi.json");
    std::fs::write(&schema, rendered()).unwrap();
    let groups: [(&str, Option<&str>); 3] = [
        ("^/v1/", Some(TOKEN)),
        ("^/(ops|admin)", Some(ADMIN_TOKEN)),
        (
            "^/(webhooks|healthz|readyz|metrics|openapi.json|checkout/success|portal/return)",
            None,
        ),
    ];
    for (paths, token) in groups {
        let mut command = Command::new(schemathesis());
        command
            .current_dir(&dir)
            .arg("run")
            .arg(&schema)
            .args(["--url", &app.address])
            .args(["--include-path-regex", paths])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
            ])
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--max-examples", "25", "--seed", "14", "--workers", "1"])
            .args(["--max-redirects", "0", "--generation-database", "none"])
            .args(["--request-timeout", "20", "--no-color", "--suppress-health-check", "all"]);
        if let Some(token) = token {
            command.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let output = crate::cli::run(command).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        // The summary (operations, test cases, checks) for whoever runs with --nocapture.
        println!("schemathesis on {paths}:\n{stdout}");
        assert!(
            output.status.success(),
            "schemathesis on {paths}:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    app.stop().await;
}

/// The TypeScript client (`clients/typescript`): its types are what openapi-typescript
/// generates from the committed document (so an answer's shape that changes without the
/// client's types fails here), and its tests, node's test runner, pass against the live
/// service with none skipped.
#[tokio::test]
async fn the_typescript_client_is_generated_from_the_document_and_passes_against_the_service() {
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/typescript");
    let generator = format!("{client}/node_modules/.bin/openapi-typescript");
    assert!(
        std::path::Path::new(&generator).exists(),
        "the client's dev dependencies are not installed: run ./scripts/test.sh (which runs npm ci in clients/typescript)"
    );
    let mut generate = Command::new(&generator);
    generate.current_dir(client).arg("../../docs/openapi.json");
    let generated = crate::cli::run(generate).await;
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let committed = std::fs::read_to_string(format!("{client}/src/schema.ts")).unwrap();
    assert!(
        String::from_utf8_lossy(&generated.stdout) == committed,
        "clients/typescript/src/schema.ts is not what openapi-typescript generates from docs/openapi.json: run `npm run generate` there"
    );

    let (settings, db_name, prefix) = test_settings("tsclient");
    let app = spawn_with(settings, db_name, prefix).await;
    let body = sub_event(
        "evt_ts1",
        "customer.subscription.created",
        T0,
        "sub_123",
        "cus_123",
        "active",
        "org_123",
    );
    assert_eq!(app.post_webhook(&body).await.status(), 200);
    app.settle().await;
    let mut test = Command::new("npm");
    test.current_dir(client)
        .args(["test", "--silent"])
        .env("SUBLEDGER_URL", &app.address)
        .env("SUBLEDGER_TOKEN", TOKEN);
    let output = crate::cli::run(test).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "npm test:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("# fail 0") && stdout.contains("# skipped 0"),
        "{stdout}"
    );
    app.stop().await;
}
