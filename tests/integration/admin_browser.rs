//! The admin page end to end in headless Chromium (Debian's `chromium`, which the test
//! command installs): load the page with the token, search a customer, check what the
//! browser rendered, and save a screenshot under `target/` for people to look at.

use std::path::PathBuf;
use std::process::Command;

use crate::events::{sub_event, T0};
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

/// The sum of `N` over every `<title>{label} {series}: N</title>` of a chart in `dom`
/// (events seeded just before an hour's end land in two columns).
fn charted(dom: &str, chart: &str, series: &str) -> i64 {
    let start = dom
        .find(&format!("data-chart=\"{chart}\""))
        .unwrap_or_else(|| panic!("chart {chart} in {dom}"));
    let svg = &dom[start..start + dom[start..].find("</svg>").unwrap()];
    svg.split("<title>")
        .skip(1)
        .filter_map(|t| t.split("</title>").next())
        // "{label} {series}: {n}": labels (hours, statuses) hold no space, names may.
        .filter_map(|t| t.rsplit_once(": "))
        .filter(|(part, _)| part.split_once(' ').is_some_and(|(_, name)| name == series))
        .map(|(_, n)| n.parse::<i64>().unwrap())
        .sum()
}

/// The overview in a real browser: customers by status and access, the last hours'
/// webhook outcomes and ingestion as inline SVG charts, projection lag and the inbox's
/// depth, with nothing fetched from elsewhere (no script, no external URL: it works
/// offline).
#[tokio::test]
async fn the_overview_draws_its_charts_in_a_real_browser() {
    let app = spawn_admin_app("overview").await;
    seed_customer(&app, "o").await;
    let canceled = sub_event(
        "evt_oc",
        "customer.subscription.deleted",
        T0,
        "sub_oc",
        "cus_oc",
        "canceled",
        "org_oc",
    );
    assert_eq!(app.post_webhook(&canceled).await.status(), 200);
    app.settle().await;
    let url = format!("{}/admin?token={ADMIN}", app.address);
    let out = headless(url.clone(), vec!["--dump-dom".into()]).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("id=\"overview\""), "{dom}");
    assert!(dom.contains("2 customers, 1 with access"), "{dom}");
    assert_eq!(charted(&dom, "customers", "access"), 1, "{dom}");
    assert_eq!(charted(&dom, "customers", "no access"), 1, "{dom}");
    assert!(dom.contains("<title>active access: 1</title>"), "{dom}");
    assert!(
        dom.contains("<title>canceled no access: 1</title>"),
        "{dom}"
    );
    assert_eq!(charted(&dom, "outcomes", "applied"), 3, "{dom}");
    assert_eq!(charted(&dom, "outcomes", "stale"), 1, "{dom}");
    assert_eq!(charted(&dom, "outcomes", "illegal"), 1, "{dom}");
    assert_eq!(charted(&dom, "ingestion", "webhook"), 5, "{dom}");
    assert!(dom.contains("data-lag=\"platform_tables\""), "{dom}");
    assert!(dom.contains("0 dead letters"), "{dom}");
    for external in ["<script", "<link", "src=\"http", "href=\"http", "url(http"] {
        assert!(!dom.contains(external), "{external} in {dom}");
    }

    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/admin-overview.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        url,
        vec![
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1600".into(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("a screenshot of the overview");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    app.stop().await;
}
