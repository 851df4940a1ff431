//! The `subledger` command line: parse, build, run. Everything else is in the library.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use clap::{Parser, Subcommand};
use subledger::progress::Progress;
use subledger::{startup, telemetry, Application, Services, Settings};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` says
/// what to do (mimalloc reads it, and turns them off itself when it is 0).
///
/// mimalloc asks for huge pages on its memory, and returns freed spans of it to the
/// kernel a second later. The next allocation there faults in a whole 2 MiB page again,
/// zeroed, of which it uses a few KiB: under ingestion 5 to 8 % of the server's CPU
/// samples were that zeroing, and with huge pages off 0.5 %. Three pairs of `--only
/// ingest` runs: 95 to 114 µs of the server per delivery against 107 to 123, and a peak
/// RSS of 66 to 69 MiB against 90 to 114 (BENCHMARKS.md). Called before the runtime
/// starts its threads; the flag covers every later page fault of the process, in memory
/// mimalloc already holds too. A kernel without the option refuses it, and nothing
/// changes.
#[cfg(target_os = "linux")]
fn no_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE reads no memory of ours; it sets a flag on the process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[derive(Parser)]
#[command(
    name = "subledger",
    version,
    about = "Stripe subscriptions as an event-sourced ledger"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations, then serve webhooks and the API on SUBLEDGER_LISTEN.
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Rebuild every projection (Redis cache, platform tables) from the event log.
    Replay,
    /// Feed Stripe events from a file (JSON lines, a JSON array, or a `stripe events list`
    /// page) through the same path as webhooks, without signatures.
    Import { file: PathBuf },
    /// Sync customers from Stripe's API now (source `operator`): one, or every customer
    /// in the log. Needs STRIPE_SECRET_KEY.
    Reconcile {
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        customer: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Page through every Stripe subscription (or one customer's, or a connected
    /// account's) and record what differs. Safe to re-run. Needs STRIPE_SECRET_KEY.
    Backfill {
        #[arg(long)]
        customer: Option<String>,
        /// Page this connected account (`acct_…`, sent as `Stripe-Account`) instead of the
        /// platform's own; its customers are recorded as living in it.
        #[arg(long)]
        account: Option<String>,
    },
    /// Show everything about one customer: state, every event in the log with the move it
    /// made, the inbox's outcomes (rejections and why), and the Redis value and TTL beside
    /// the table row, with differences flagged.
    Inspect { customer_id: String },
    /// Say in a sentence why a customer has or lacks access.
    Explain { customer_id: String },
    /// The dead-letter queue: inbox rows whose processing failed SUBLEDGER_MAX_ATTEMPTS times.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Stripe's webhook endpoints for subledger: `setup --url` creates one sending exactly
    /// the handled event types at the pinned API version (printing its signing secret
    /// once); `check` lists what is missing or wrong on each and exits non-zero on a
    /// problem. Needs STRIPE_SECRET_KEY.
    Stripe {
        #[command(subcommand)]
        action: StripeAction,
    },
    /// Stripe's Events API: `recover --since 2h` stores every handled event of the window
    /// that the inbox lacks (delivered or not), then processes the inbox. Needs
    /// STRIPE_SECRET_KEY; Stripe keeps 30 days.
    Events {
        #[command(subcommand)]
        action: EventsAction,
    },
    /// Outbound `entitlements.updated` notifications: the outbox, its dead letters,
    /// re-drive and replay (a running service sends what is put back within
    /// SUBLEDGER_POLL_MS).
    Notify {
        #[command(subcommand)]
        action: NotifyAction,
    },
    /// Drop the raw payload of processed inbox rows processed more than
    /// SUBLEDGER_INBOX_RETENTION_HOURS (or --older-than-hours) ago, in small batches, as
    /// `serve` does every 10 minutes. The rows, dead letters and the event log stay.
    Prune {
        #[arg(long)]
        older_than_hours: Option<u64>,
    },
    /// Print the OpenAPI 3.1 document of the HTTP API (what `GET /openapi.json` serves).
    Openapi,
    /// Print the transition table the aggregate runs.
    Transitions {
        #[arg(long, value_enum, default_value = "text")]
        format: subledger::transitions::Format,
    },
}

#[derive(Subcommand)]
enum EventsAction {
    Recover {
        /// How far back: a number with s, m, h or d (`90m`, `2h`, `3d`).
        #[arg(long, value_parser = parse_duration)]
        since: std::time::Duration,
    },
}

/// `90m`, `2h`, `3d`, `45s`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a number followed by s, m, h or d"))?;
    let secs = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3_600,
        "d" => number * 86_400,
        _ => return Err(format!("{text:?} does not end in s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Subcommand)]
enum StripeAction {
    /// Create the webhook endpoint at URL (e.g. https://billing.example.com/webhooks/stripe)
    /// unless one points there already, in which case check it.
    Setup {
        #[arg(long)]
        url: String,
    },
    /// Check every webhook endpoint (or the one at --url).
    Check {
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters, oldest first (tab-separated, or JSON lines with --json).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the inbox with a fresh attempt budget, then process the
    /// inbox and update the projections (a running service would do the same within
    /// SUBLEDGER_POLL_MS).
    Retry {
        /// The Stripe event id of one dead letter.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum NotifyAction {
    /// List the outbox, oldest first (tab-separated, or JSON lines with --json).
    List {
        /// Only the dead letters.
        #[arg(long)]
        dead: bool,
        #[arg(long)]
        json: bool,
    },
    /// Put dead notifications back with a fresh attempt budget.
    Retry {
        /// The outbox id of one dead notification.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every dead notification.
        #[arg(long)]
        all: bool,
    },
    /// Send again every notification written at or after a log position (a global_seq),
    /// with the same webhook-id and body.
    Replay {
        #[arg(long)]
        from: i64,
    },
}

/// Task polls between two looks at the sockets and timers (tokio's `event_interval`,
/// 61 unless set). A webhook is answered once its inbox insert commits, and while the HTTP
/// tasks and the inbox workers keep the run queues full, the insert's answer from Postgres
/// waited for the next look: sampled in `pg_stat_activity`, the inserting connection
/// spent a third of the benchmark's ingestion waiting for the server's next insert. At 7,
/// ingestion did more in 5 of 7 alternating pairs, at a lower CPU per delivery in 5; at 2,
/// the CPU per delivery rose again (BENCHMARKS.md, 2026-12-02).
const EVENT_INTERVAL: u32 = 7;

fn main() -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    no_transparent_huge_pages();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    let threads = subledger::config::runtime_threads().context("reading configuration")?;
    if let Some(threads) = threads {
        runtime.worker_threads(threads.get());
    }
    runtime.event_interval(EVENT_INTERVAL);
    runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    telemetry::init();
    let cli = Cli::parse();
    if let Command::Transitions { format } = cli.command {
        print!("{}", subledger::transitions::render(format));
        return Ok(());
    }
    if let Command::Openapi = cli.command {
        println!(
            "{}",
            serde_json::to_string_pretty(subledger::http::openapi_document())?
        );
        return Ok(());
    }
    let settings = Settings::from_env().context("reading configuration")?;
    let explain_only = matches!(cli.command, Command::Explain { .. });
    match cli.command {
        Command::Serve => {
            let app = Application::build(settings)
                .await
                .context("starting subledger")?;
            app.run_until_stopped(startup::shutdown_signal())
                .await
                .context("serving")?;
        }
        Command::Migrate => {
            let pool = subledger::db::connect(&settings)
                .await
                .context("connecting to Postgres")?;
            subledger::db::migrate(&pool).await.context("migrating")?;
            eprintln!("migrations applied");
        }
        Command::Replay => {
            let every = settings.progress_every;
            let services = Services::connect(settings).await.context("connecting")?;
            // The bar follows the projection furthest behind; each reports log events. It
            // is shown once the rebuild's first pass has counted the log (no count of its
            // own: that is another read of the whole log).
            let names: Vec<&str> = services.projections.names().collect();
            let mut applied = vec![0u64; names.len()];
            let shown: Mutex<Option<Progress>> = Mutex::new(None);
            let started = std::time::Instant::now();
            let show =
                |total: Option<u64>| Progress::since("replay", "events", total, every, started);
            let done = services
                .replay(
                    |total| {
                        let mut shown = shown.lock().unwrap_or_else(|e| e.into_inner());
                        match &mut *shown {
                            Some(progress) => progress.set_total(total),
                            None => *shown = Some(show(Some(total))),
                        }
                    },
                    |name, n| {
                        if let Some(i) = names.iter().position(|&known| known == name) {
                            applied[i] = n;
                        }
                        let mut shown = shown.lock().unwrap_or_else(|e| e.into_inner());
                        let progress = shown.get_or_insert_with(|| show(None));
                        progress.set_detail(name);
                        progress.set_position(applied.iter().copied().min().unwrap_or(n));
                    },
                )
                .await
                .context("replaying the log")?;
            // Every projection now stands at the end of the log counted then, also when a
            // running service applied part of it meanwhile.
            let progress = shown.into_inner().unwrap_or_else(|e| e.into_inner());
            let total = progress
                .as_ref()
                .and_then(Progress::total)
                .unwrap_or_else(|| done.iter().map(|d| d.applied).max().unwrap_or(0));
            let mut progress = progress.unwrap_or_else(|| show(Some(total)));
            progress.set_detail("");
            progress.set_total(total);
            progress.set_position(total);
            progress.finish();
            // "replayed 10 events into platform_tables and 10 into redis_cache"
            let each: Vec<String> = done
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let events = if i == 0 { " events" } else { "" };
                    format!("{}{events} into {}", d.applied, d.name)
                })
                .collect();
            eprintln!("replayed {}", each.join(" and "));
        }
        Command::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let every = settings.progress_every;
            let services = Services::connect(settings).await.context("connecting")?;
            let mut progress: Option<Progress> = None;
            let report = subledger::import::import(&services.pool, &text, |total, report| {
                let progress = progress
                    .get_or_insert_with(|| Progress::new("import", "events", Some(total), every));
                progress.set_detail(format!(
                    "{} new, {} ignored, {} duplicates",
                    report.stored, report.ignored, report.duplicates
                ));
                progress.set_position(report.stored + report.ignored + report.duplicates);
            })
            .await
            .context("importing")?;
            if let Some(progress) = progress {
                progress.finish();
            }
            let processed = process_inbox(&services).await?;
            eprintln!(
                "imported {} new events ({} ignored, {} duplicates); processed {processed}",
                report.stored, report.ignored, report.duplicates
            );
        }
        Command::Reconcile { customer, all: _ } => {
            let services = Services::connect(settings).await.context("connecting")?;
            let syncer = services
                .syncer()
                .context("setting up the Stripe client")?
                .context("STRIPE_SECRET_KEY is not set")?;
            let customers: Vec<String> = match customer {
                Some(customer) => vec![customer],
                None => event_store::read::aggregate_ids(&services.pool)
                    .await
                    .context("listing customers")?,
            };
            let (mut failed, total) = (0, customers.len());
            let mut progress = Progress::new(
                "reconcile",
                "customers",
                Some(total as u64),
                services.settings.progress_every,
            );
            for (i, customer) in customers.iter().enumerate() {
                match syncer
                    .sync_customer(customer, subledger::sync_log::SyncSource::Operator)
                    .await
                {
                    Ok(report) => progress.println(&format!(
                        "[{}/{total}] {customer}: {} ({} events, {} attempts)",
                        i + 1,
                        report.outcome.as_str(),
                        report.events,
                        report.attempts
                    )),
                    Err(error) => {
                        failed += 1;
                        progress.println(&format!(
                            "[{}/{total}] {customer}: failed: {error:#}",
                            i + 1
                        ));
                    }
                }
                progress.set_detail(format!("{failed} failed"));
                progress.set_position(i as u64 + 1);
            }
            progress.finish();
            // No runner runs here: bring the projections up to what the syncs recorded.
            services
                .catch_up_projections(projections::WhenBusy::Wait, |_, _| {})
                .await
                .context("updating projections")?;
            if failed > 0 {
                anyhow::bail!("{failed} of {total} syncs failed (recorded; retried by `serve`)");
            }
        }
        Command::Backfill { customer, account } => {
            let services = Services::connect(settings).await.context("connecting")?;
            let syncer = services
                .syncer()
                .context("setting up the Stripe client")?
                .context("STRIPE_SECRET_KEY is not set")?;
            // Stripe's list gives no total: a count with its rate, no time left.
            let mut progress = Progress::new(
                "backfill",
                "subscriptions",
                None,
                services.settings.progress_every,
            );
            let report = syncer
                .backfill(customer.as_deref(), account.as_deref(), |r| {
                    progress.set_detail(format!(
                        "{} pages, {} customers, {} events recorded",
                        r.pages, r.customers, r.events
                    ));
                    progress.set_position(r.subscriptions);
                })
                .await
                .context("backfilling")?;
            progress.finish();
            eprintln!(
                "backfilled {} subscriptions of {} customers over {} pages: {} events recorded, {} unreadable",
                report.subscriptions, report.customers, report.pages, report.events, report.unreadable
            );
        }
        Command::Inspect { customer_id } | Command::Explain { customer_id } => {
            let services = Services::connect(settings).await.context("connecting")?;
            let report = subledger::inspect::inspect(
                &services.pool,
                &services.cache,
                &services.catalog,
                &customer_id,
                chrono::Utc::now(),
            )
            .await
            .context("reading the customer")?;
            if explain_only {
                println!("{}", report.explanation);
            } else {
                print!("{}", subledger::inspect::render_text(&report));
            }
        }
        Command::Dlq { action } => dlq(settings, action).await?,
        Command::Stripe { action } => stripe(settings, action).await?,
        Command::Events {
            action: EventsAction::Recover { since },
        } => {
            let services = Services::connect(settings).await.context("connecting")?;
            let api = subledger::stripe::client::StripeApi::from_settings(&services.settings)
                .context("setting up the Stripe client")?
                .context("STRIPE_SECRET_KEY is not set")?;
            let from = chrono::Utc::now()
                - chrono::Duration::from_std(since).context("--since is too long")?;
            let (report, _) = subledger::recovery::Recovery::new(api, services.pool.clone())
                .recover_since(from, false)
                .await
                .context("recovering events")?;
            eprintln!(
                "{} events listed since {from}: {} recovered into the inbox, {} skipped",
                report.listed, report.recovered, report.skipped
            );
            let processed = process_inbox(&services).await?;
            eprintln!("{processed} inbox rows processed");
        }
        Command::Notify { action } => notify(settings, action).await?,
        Command::Prune { older_than_hours } => {
            let older_than = match older_than_hours {
                Some(hours) => std::time::Duration::from_secs(hours * 3600),
                None => settings.inbox_retention.context(
                    "SUBLEDGER_INBOX_RETENTION_HOURS is 0 (keep payloads); pass --older-than-hours",
                )?,
            };
            let services = Services::connect(settings).await.context("connecting")?;
            let pruned = subledger::inbox::retention::prune(&services.pool, older_than)
                .await
                .context("pruning the inbox")?;
            eprintln!("{pruned} inbox payloads dropped");
        }
        Command::Transitions { .. } | Command::Openapi => {
            unreachable!("handled before reading settings")
        }
    }
    Ok(())
}

/// Processes every due inbox row, then brings the projections up to the end of the log
/// (what a running service's workers would do), returning the rows processed.
async fn process_inbox(services: &Services) -> anyhow::Result<u64> {
    let every = services.settings.progress_every;
    let pending = subledger::inbox::depth(&services.pool)
        .await
        .context("reading the inbox")?
        .pending;
    let mut progress = Progress::new("process", "inbox rows", Some(pending as u64), every);
    let processed = services
        .worker
        .drain_with(|n| progress.set_position(n))
        .await
        .context("processing the inbox")?;
    // A running service's workers may have taken some of the rows counted: none is left.
    progress.set_total(processed);
    progress.finish();
    let mut progress = Progress::new("projections", "events", None, every);
    services
        .catch_up_projections(projections::WhenBusy::Wait, |name, n| {
            progress.set_detail(name);
            progress.set_position(n);
        })
        .await
        .context("updating projections")?;
    progress.set_detail("");
    progress.finish();
    Ok(processed)
}

async fn stripe(settings: Settings, action: StripeAction) -> anyhow::Result<()> {
    use subledger::setup::{check_endpoints, setup, Setup};
    let api = subledger::stripe::client::StripeApi::from_settings(&settings)
        .context("setting up the Stripe client")?
        .context("STRIPE_SECRET_KEY is not set")?;
    let report = match action {
        StripeAction::Setup { url } => match setup(&api, &url).await.context("setting up")? {
            Setup::Created { id, secret } => {
                eprintln!("created webhook endpoint {id} at {url}");
                match secret {
                    // Stripe shows the signing secret only now: on stdout, alone.
                    Some(secret) => println!("STRIPE_WEBHOOK_SECRET={secret}"),
                    None => eprintln!("Stripe returned no signing secret; see the Dashboard"),
                }
                return Ok(());
            }
            Setup::Exists(report) => {
                eprintln!("an endpoint already points at {url}; checking it");
                report
            }
        },
        StripeAction::Check { url } => check_endpoints(&api, url.as_deref())
            .await
            .context("listing webhook endpoints")?,
    };
    for endpoint in &report.endpoints {
        println!(
            "{}\t{}\t{}\t{}\t{}",
            endpoint.id,
            endpoint.url,
            endpoint.status,
            endpoint.api_version.as_deref().unwrap_or("(unpinned)"),
            if endpoint.problems.is_empty() {
                "ok"
            } else {
                "PROBLEM"
            }
        );
        for missing in &endpoint.missing {
            println!("  missing\t{missing}");
        }
        for extra in &endpoint.extra {
            println!("  extra\t{extra}");
        }
    }
    let problems = report.all_problems();
    for problem in &problems {
        eprintln!("problem: {problem}");
    }
    if !problems.is_empty() {
        anyhow::bail!("{} problem(s) with the webhook endpoints", problems.len());
    }
    Ok(())
}

async fn notify(settings: Settings, action: NotifyAction) -> anyhow::Result<()> {
    use subledger::notify;
    let services = Services::connect(settings).await.context("connecting")?;
    match action {
        NotifyAction::List { dead, json } => {
            let rows = notify::list(&services.pool, dead)
                .await
                .context("reading the outbox")?;
            let mut out = std::io::stdout().lock();
            for row in &rows {
                if json {
                    writeln!(out, "{}", serde_json::to_string(row)?)?;
                } else {
                    writeln!(
                        out,
                        "{}\t{}\t{}:{}\t{}\t{}\t{} attempts\t{}\t{}",
                        row.id,
                        row.msg_id,
                        row.owner_kind,
                        row.owner_id,
                        row.log_position,
                        row.state,
                        row.attempts,
                        row.endpoint,
                        row.last_error.as_deref().unwrap_or("-"),
                    )?;
                }
            }
            eprintln!("{} notifications", rows.len());
        }
        NotifyAction::Retry { id, all } => {
            let requeued = notify::retry(&services.pool, if all { None } else { id })
                .await
                .context("re-queueing dead notifications")?;
            if let (Some(id), false) = (id, all) {
                anyhow::ensure!(!requeued.is_empty(), "{id} is not a dead notification");
            }
            eprintln!("re-queued {} dead notifications", requeued.len());
        }
        NotifyAction::Replay { from } => {
            let count = notify::replay(&services.pool, from)
                .await
                .context("re-queueing notifications")?;
            eprintln!("re-queued {count} notifications from log position {from}");
        }
    }
    Ok(())
}

async fn dlq(settings: Settings, action: DlqAction) -> anyhow::Result<()> {
    use subledger::inbox::{self, DeadLetter, InboxState, Redrive};
    let services = Services::connect(settings).await.context("connecting")?;
    match action {
        DlqAction::List { json } => {
            let letters = inbox::dead_letters(&services.pool, None)
                .await
                .context("reading the dead letters")?;
            let count = letters.len();
            let mut out = std::io::stdout().lock();
            for letter in letters.into_iter().map(DeadLetter::from) {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&letter)?)?;
                } else {
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{} attempts\t{}\t{}",
                        letter.event_id,
                        letter.event_type,
                        letter.customer_id.as_deref().unwrap_or("-"),
                        letter.attempts,
                        letter.received_at.to_rfc3339(),
                        letter.last_error.as_deref().unwrap_or("-"),
                    )?;
                }
            }
            eprintln!("{count} dead letters");
        }
        DlqAction::Retry { id, all } => {
            let which = match (id, all) {
                (Some(id), false) => Redrive::One(id),
                _ => Redrive::All,
            };
            let requeued = inbox::redrive(&services.pool, &which)
                .await
                .context("re-queueing dead letters")?;
            if let Redrive::One(id) = &which {
                anyhow::ensure!(!requeued.is_empty(), "{id} is not a dead letter");
            }
            process_inbox(&services).await?;
            let mut failed = 0;
            for event_id in &requeued {
                // A running service's worker may have claimed the row before this
                // process did (its drain skips locked rows): wait for that attempt.
                let row = inbox::settled_state_of(&services.pool, event_id)
                    .await
                    .context("reading the inbox")?;
                let (state, outcome) = (row.map(|r| r.0), row.and_then(|r| r.1));
                if state != Some(InboxState::Done) {
                    failed += 1;
                }
                println!(
                    "{event_id}\t{}\t{}",
                    state.map_or("", InboxState::as_str),
                    outcome.map_or("-", inbox::Outcome::as_str)
                );
            }
            eprintln!(
                "re-queued {} dead letters; {} processed, {failed} failed again (retried with backoff)",
                requeued.len(),
                requeued.len() - failed
            );
        }
    }
    Ok(())
}
