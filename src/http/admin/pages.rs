//! The admin page's HTML, as maud templates: every value spliced in is escaped by the
//! template, so no text from Stripe, the inbox or a search box reaches the page as markup.
//! Only the style sheet (a constant of this file) is inserted as it is.
//!
//! These functions only draw what they are given: they must never query anything nor
//! judge a fact.

use aggregates::SubscriptionStatus;
use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::charts::{self, Series};
use super::diagram::diagram;
use crate::inbox::{Depth, HourlyCount, InboxEntry, InboxState};
use crate::inspect::{CustomerReport, SearchHit};
use crate::sync_log::{AttemptRow, Flagged};
use crate::transitions;

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}
main{padding:16px 24px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px;margin:0 0 16px}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f3;vertical-align:top}
th{color:#5b6475;font-weight:600}
code,.mono{font-family:ui-monospace,monospace;font-size:12px}
td.mono{overflow-wrap:anywhere}
.dim{color:#98a0ad}.bad{color:#b42318}.good{color:#067647}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;background:#eef0f3}
.b-applied{background:#d1fadf;color:#05603a}.b-duplicate{background:#eef0f3}
.b-stale,.b-ignored{background:#fef0c7;color:#93370d}.b-illegal,.b-failed,.b-dead{background:#fee4e2;color:#912018}
.verdict{font-size:15px;padding:8px 12px;border-radius:6px}
.v-yes{background:#ecfdf3;border:1px solid #a6f4c5}.v-no{background:#fef3f2;border:1px solid #fecdca}
tr.diff td{background:#fffaeb}
form.inline{display:inline}
figure.chart{margin:12px 0}figure.chart figcaption{font-weight:600;color:#5b6475;margin:0 0 4px}
svg{max-width:100%;height:auto}
input[type=search]{width:420px;padding:6px 8px}
button{padding:5px 12px;cursor:pointer}
";

/// A whole page: the header with the search box, then `body`.
pub fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · subledger admin" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    a href="/admin" { "subledger admin" }
                    form method="get" action="/admin" {
                        input type="search" name="q" placeholder="customer, org, user or subscription id";
                        " "
                        button { "Search" }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The login form, with why access was refused when there is something to say.
pub fn login(token_configured: bool, problem: Option<&str>) -> Markup {
    page(
        "Sign in",
        html! {
            @if !token_configured {
                p.bad { "SUBLEDGER_ADMIN_TOKEN is not set: the admin page refuses everyone until it is." }
            }
            @if let Some(problem) = problem {
                p.bad { (problem) }
            }
            form method="get" action="/admin" {
                label { "Admin token " input type="password" name="token" autofocus; }
                " "
                button { "Sign in" }
            }
        },
    )
}

/// A value, or a dimmed dash when there is none.
fn opt(value: Option<&str>) -> Markup {
    html! {
        @match value {
            Some(value) => (value),
            None => span.dim { "-" },
        }
    }
}

/// A state or outcome as a coloured label (its class names the value).
fn badge(text: &str) -> Markup {
    html! { span class={ "badge b-" (text) } { (text) } }
}

fn customer_link(customer_id: &str) -> Markup {
    html! { a href={ "/admin/customers/" (customer_id) } { (customer_id) } }
}

/// The notice after a re-drive.
pub fn redriven(event_id: &str) -> Markup {
    html! {
        section.good {
            "Re-drove " code { (event_id) } ": it is pending again and will be processed shortly."
        }
    }
}

/// The heading of a search's results.
pub fn search_heading(q: &str) -> Markup {
    html! { h1 { "Search: " code { (q) } } }
}

pub fn no_hits(q: &str) -> Markup {
    html! { section { "No customer, org, user or subscription has the id " code { (q) } "." } }
}

/// How a single hit was found (its customer is drawn below).
pub fn found_by(hit: &SearchHit) -> Markup {
    html! { p.dim { "Found by " (hit.matched_on) " id." } }
}

/// Several customers matched: a table of them, each a link.
pub fn hits(hits: &[SearchHit]) -> Markup {
    html! {
        section {
            h2 { "Customers" }
            table {
                tr { th { "customer" } th { "matched on" } th { "org" } th { "user" } th { "subscription" } th { "status" } }
                @for hit in hits {
                    tr {
                        td { (customer_link(&hit.customer_id)) }
                        td { (hit.matched_on) }
                        td { (opt(hit.org_id.as_deref())) }
                        td { (opt(hit.user_id.as_deref())) }
                        td { (opt(hit.subscription_id.as_deref())) }
                        td { (opt(hit.status.as_deref())) }
                    }
                }
            }
        }
    }
}

/// The overview's dead-letter queue and latest webhooks.
pub fn inbox_overview(dead: &[InboxEntry], recent: &[InboxEntry]) -> Markup {
    html! {
        section {
            h2 { "Dead-letter queue (" (dead.len()) ")" }
            @if dead.is_empty() {
                p.dim { "Empty: no inbox row has exhausted its attempts." }
            } @else {
                (inbox_table(dead, true))
            }
        }
        section {
            h2 { "Latest webhooks" }
            (inbox_table(recent, true))
        }
    }
}

/// The latest syncs from Stripe's API, with the customers currently flagged.
pub fn sync_log(rows: &[AttemptRow], flagged: &[Flagged]) -> Markup {
    html! {
        section {
            h2 { "Sync log (" (rows.len()) ")" }
            @for flag in flagged {
                p.bad {
                    "Flagged: " (flag.customer_id) " failed " (flag.consecutive_failures)
                    " syncs in a row (" (opt(flag.last_error.as_deref())) ")."
                }
            }
            @if rows.is_empty() {
                p.dim { "No sync from Stripe's API has been recorded here yet." }
            } @else {
                table {
                    tr { th { "started" } th { "customer" } th { "source" } th { "outcome" } th { "attempts" } th { "duration" } th { "detail" } }
                    @for row in rows {
                        tr {
                            td.mono { (row.started_at.to_rfc3339()) }
                            td.mono { (row.customer_id) }
                            td { (row.source.as_str()) }
                            td { (row.outcome.as_str()) }
                            td { (row.attempts) }
                            td { (row.duration_ms) " ms" }
                            td { (opt(row.detail.as_deref())) }
                        }
                    }
                }
            }
        }
    }
}

/// Inbox rows with their outcomes and why, and a re-drive button on dead ones.
fn inbox_table(rows: &[InboxEntry], with_customer: bool) -> Markup {
    html! {
        table {
            tr {
                th { "Stripe time" } th { "event" } th { "type" }
                @if with_customer { th { "customer" } }
                th { "state" } th { "outcome" } th { "attempts" } th { "why" } th {}
            }
            @for row in rows {
                tr {
                    td.mono { (row.stripe_created.format("%Y-%m-%d %H:%M:%S")) }
                    td.mono { (row.event_id) }
                    td { (row.event_type) }
                    @if with_customer {
                        td {
                            @match &row.customer_id {
                                Some(customer_id) => (customer_link(customer_id)),
                                None => "-",
                            }
                        }
                    }
                    td { (badge(row.state.as_str())) }
                    td { @if let Some(outcome) = row.outcome { (badge(outcome.as_str())) } }
                    td { (row.attempts) }
                    td {
                        @for (i, why) in [&row.detail, &row.last_error].into_iter().flatten().enumerate() {
                            @if i > 0 { br; }
                            (why)
                        }
                    }
                    td {
                        @if row.state == InboxState::Dead {
                            form.inline method="post" action={ "/admin/inbox/" (row.event_id) "/redrive" } {
                                button { "Re-drive" }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Everything about one customer: the verdict, the state folded from the log, the
/// transition diagram with its path, the timeline, the cache inspector and its inbox rows.
pub fn customer(report: &CustomerReport) -> Markup {
    let current = report
        .log
        .as_ref()
        .and_then(|i| i.status.parse::<SubscriptionStatus>().ok());
    let table_row = report
        .table
        .as_ref()
        .and_then(|t| serde_json::to_string(t).ok());
    html! {
        h1 { "Customer " code { (report.customer_id) } }
        p class={ "verdict " (if report.entitlement.access { "v-yes" } else { "v-no" }) } id="verdict" {
            (report.explanation)
        }

        section {
            h2 { "State (folded from the event log)" }
            @match &report.log {
                Some(info) => table {
                    tr { th { "status" } th { "subscription" } th { "plan" } th { "period end" } th { "org" } th { "user" } th { "Connect account" } th { "version" } }
                    tr {
                        td { (badge(&info.status)) }
                        td { (opt(info.subscription_id.as_deref())) }
                        td { (opt(info.plan.as_deref())) }
                        td {
                            @match info.current_period_end {
                                Some(end) => (end.to_rfc3339()),
                                None => "-",
                            }
                        }
                        td { (opt(info.org_id.as_deref())) }
                        td { (opt(info.user_id.as_deref())) }
                        td { (opt(info.account.as_deref())) }
                        td { (info.version) }
                    }
                },
                None => p.dim { "The log holds no event for this customer." },
            }
            @if !report.state.subscriptions.is_empty() {
                p { "Every subscription id the customer has had:" }
                table {
                    tr { th { "subscription" } th { "status" } th { "as of (Stripe)" } th { "by event" } }
                    @for (id, record) in &report.state.subscriptions {
                        @if let Some(snap) = &record.snapshot {
                            tr {
                                td.mono { (id) }
                                td { (badge(snap.value.status.as_str())) }
                                td.mono { (snap.observed_at.to_rfc3339()) }
                                td.mono { (snap.stripe_event_id) }
                            }
                        }
                    }
                }
            }
        }

        section {
            h2 { "Transition diagram (the table the aggregate runs; this customer's path highlighted)" }
            (diagram(&report.path(), current))
            details {
                summary { "The table as text" }
                pre.mono { (transitions::render(transitions::Format::Text)) }
            }
        }

        section {
            h2 { "Event timeline (" (report.timeline.len()) " events)" }
            table {
                tr { th { "#" } th { "recorded" } th { "event" } th { "Stripe event" } th { "Stripe time" } th { "what it changed" } }
                @for t in &report.timeline {
                    tr {
                        td { (t.sequence) }
                        td.mono { (t.recorded_at.format("%Y-%m-%d %H:%M:%S")) }
                        td { (t.event_type) }
                        td.mono { (t.stripe_event_id) br; span.dim { (t.stripe_event_type) } }
                        td.mono { (t.stripe_created.format("%Y-%m-%d %H:%M:%S")) }
                        td { (t.change) }
                    }
                }
            }
        }

        section {
            h2 { "Cache inspector: Redis vs table vs log" }
            @if let Some(error) = &report.cache_error {
                p.bad { "Redis cannot be read: " (error) }
            }
            @if report.differences.is_empty() {
                p.good id="cache-agree" { "The Redis value, the subscriptions row and the log agree." }
            } @else {
                p.bad id="cache-differ" { "They differ (highlighted):" }
                table {
                    tr { th { "field" } th { "log" } th { "table" } th { "Redis" } }
                    @for d in &report.differences {
                        tr.diff {
                            td { (d.field) }
                            td.mono { (opt(d.log.as_deref())) }
                            td.mono { (opt(d.table.as_deref())) }
                            td.mono { (opt(d.cache.as_deref())) }
                        }
                    }
                }
            }
            table {
                tr { th { "Redis key" } th { "TTL" } th { "value" } }
                @for key in &report.cache_keys {
                    tr {
                        td.mono { (key.key) }
                        td { (key.ttl_text()) }
                        td.mono { (opt(key.value.as_deref())) }
                    }
                }
                tr {
                    td.mono { "subscriptions row" }
                    td {}
                    td.mono { (opt(table_row.as_deref())) }
                }
            }
        }

        section {
            h2 { "Webhook inbox (" (report.inbox.len()) " Stripe events, with outcomes)" }
            (inbox_table(&report.inbox, false))
        }
    }
}

/// What the overview draws, fetched by the handler.
pub struct Overview {
    /// Per status: customers, and of them how many have access now.
    pub statuses: Vec<(String, i64, i64)>,
    /// The hours shown, oldest first (UTC, whole hours).
    pub hours: Vec<chrono::DateTime<chrono::Utc>>,
    /// Inbox rows received in those hours, by source and outcome.
    pub hourly: Vec<HourlyCount>,
    pub depth: Depth,
    /// Events each projection has still to apply (`None`: could not be read).
    pub lag: Vec<(&'static str, Option<i64>)>,
}

/// The overview: customers by status and access, webhook outcomes and ingestion by hour
/// (inline SVG), projection lag and the inbox's depth.
pub fn overview(o: &Overview) -> Markup {
    let statuses: Vec<String> = o.statuses.iter().map(|(s, _, _)| s.clone()).collect();
    let customers = [
        Series {
            name: "access".to_owned(),
            values: o.statuses.iter().map(|(_, _, access)| *access).collect(),
        },
        Series {
            name: "no access".to_owned(),
            values: o
                .statuses
                .iter()
                .map(|(_, all, access)| all - access)
                .collect(),
        },
    ];
    let labels: Vec<String> = o
        .hours
        .iter()
        .map(|h| h.format("%H:00").to_string())
        .collect();
    let by_hour = |keep: &dyn Fn(&HourlyCount) -> Option<String>| {
        let mut names: Vec<String> = o.hourly.iter().filter_map(keep).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| Series {
                values: o
                    .hours
                    .iter()
                    .map(|hour| {
                        o.hourly
                            .iter()
                            .filter(|c| {
                                c.hour == *hour && keep(c).as_deref() == Some(name.as_str())
                            })
                            .map(|c| c.count)
                            .sum()
                    })
                    .collect(),
                name,
            })
            .collect::<Vec<_>>()
    };
    let outcomes = by_hour(&|c| (c.source == "webhook").then(|| c.outcome.clone()));
    let ingestion = by_hour(&|c| Some(c.source.clone()));
    let total: i64 = o.statuses.iter().map(|(_, all, _)| all).sum();
    let with_access: i64 = o.statuses.iter().map(|(_, _, access)| access).sum();
    html! {
        section #overview {
            h2 { "Overview" }
            p {
                (total) " customers, " (with_access) " with access · inbox: "
                span.{ @if o.depth.pending > 0 { "bad" } @else { "good" } } { (o.depth.pending) " pending" }
                @if let Some(age) = o.depth.oldest_pending_age_secs { " (oldest " (format!("{age:.0}")) " s)" }
                ", "
                span.{ @if o.depth.dead > 0 { "bad" } @else { "good" } } { (o.depth.dead) " dead letters" }
                " · projection lag: "
                @for (i, (name, lag)) in o.lag.iter().enumerate() {
                    @if i > 0 { ", " }
                    code { (name) } " "
                    @match lag {
                        Some(lag) => span.{ @if *lag > 0 { "bad" } @else { "good" } } data-lag=(name) { (lag) " events" },
                        None => span.bad data-lag=(name) { "unknown" },
                    }
                }
            }
            (charts::bars("customers", "Customers by status and access", &statuses, &customers))
            (charts::columns("outcomes", "Webhook outcomes by hour (UTC), last 24 hours", &labels, &outcomes))
            (charts::columns("ingestion", "Events received by hour (UTC) and source, last 24 hours", &labels, &ingestion))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_attributes_are_escaped() {
        let nasty = "<a href=\"x\">&'";
        assert_eq!(
            opt(Some(nasty)).into_string(),
            "&lt;a href=&quot;x&quot;&gt;&amp;'"
        );
        assert_eq!(
            badge("<b>").into_string(),
            "<span class=\"badge b-&lt;b&gt;\">&lt;b&gt;</span>"
        );
        let page = login(true, Some("</p><script>alert(1)</script>")).into_string();
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;/p&gt;&lt;script&gt;"), "{page}");
    }
}
