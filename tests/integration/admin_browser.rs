//! The admin page end to end in headless Chromium (Debian's `chromium`, which the test
//! command installs): load the page with the token, search a customer, check what the
//! browser rendered, and save a screenshot under `target/` for people to look at.

use std::path::PathBuf;
use std::process::Command;

use crate::ops::{seed_customer, spawn_admin_app, ADMIN};

fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|paths| {
                    std::env::split_paths(&paths)
                        .map(|dir| dir.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .find(|path| path.is_file())
        .expect("chromium is installed (./scripts/test.sh installs Debian's package)")
}

/// Runs headless Chromium with a fresh profile on `url` with `extra` arguments.
async fn headless(url: String, extra: Vec<String>) -> std::process::Output {
    let binary = chromium();
    tokio::task::spawn_blocking(move || {
        let profile = std::env::temp_dir().join(format!(
            "subledger-chromium-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let output = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium runs");
        let _ = std::fs::remove_dir_all(&profile);
        output
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn an_operator_searches_a_customer_in_a_real_browser() {
    let app = spawn_admin_app("browser").await;
    seed_customer(&app, "b").await;
    // What an operator types: the token once, then a search by org id (a GET form).
    let url = format!("{}/admin?token={ADMIN}&q=org_b", app.address);

    let out = headless(url.clone(), vec!["--dump-dom".into()]).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("Customer <code>cus_b</code>"),
        "the search found the customer; stderr: {}\n{dom}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dom.contains("cus_b has access: subscription sub_b is active"));
    assert!(dom.contains("sub_b: trialing -&gt; active (step)"));
    assert!(dom.contains("illegal transition for sub_b: active -&gt; incomplete"));
    assert!(
        dom.contains("data-from=\"trialing\" data-to=\"active\" class=\"path\""),
        "{dom}"
    );
    assert!(dom.contains("The Redis value, the subscriptions row and the log agree."));
    assert!(
        !dom.contains(ADMIN),
        "the token is gone from the page and the URL"
    );

    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/admin-search.png");
    let _ = std::fs::remove_file(&shot);
    let out = headless(
        url,
        vec![
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2400".into(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).unwrap_or_else(|_| {
        panic!(
            "a screenshot at {}: {}",
            shot.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 20_000, "the screenshot has content");
    app.stop().await;
}
