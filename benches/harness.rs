//! subledger's benchmark harness: ingestion (driven by `wrk`), entitlement reads (measured
//! with `wrk`, beside the server's own `/healthz` rate and tail, then again from a server on one
//! thread; with how many reads the server itself took over 1 ms to answer and how often the
//! kernel preempted its threads, which together say whether a tail is the read's or the
//! wait for a core), cross-replica freshness, storage per event before and after
//! retention, replay, memory and a
//! peer, measured in one run on this machine, each beside its hardware ceiling.
//!
//! Run with `./bench/run.sh` (which sets up the services and the peer). It starts the
//! release `subledger serve` as a child process against a fresh `subledger_bench`
//! database and Redis prefix, drives it over loopback only, prints every figure and
//! appends a row to BENCHMARKS.md. It reports numbers; it asserts nothing.
//!
//! `--only ingest` runs the ingestion phase alone (its pgbench ceiling, the figures, the
//! CPU per delivery of the server, of Postgres, of Redis and of the machine, and how busy
//! the machine's cores were) and stops: for
//! measuring a change to the ingest path without the reads, soak, replay and peer.

#[path = "../tests/integration/support/stripe_sim.rs"]
mod stripe_sim;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use projections::{EventualProjection, PlatformTables, RedisCache, TransactionalProjection};
use sqlx::PgPool;
use stripe_sim::{shuffle_with_duplicates, sign, simulate, simulate_into, SimEvent};

const SECRET: &str = "whsec_bench";
const TOKEN: &str = "bench-token";
const PG_BASE: &str = "postgres://postgres@127.0.0.1:5432";
const DB: &str = "subledger_bench";
const PEER_DB: &str = "subledger_bench_peer";
/// The in-process cache's bound for the servers the harness starts: room for the read
/// phase's 3 000 orgs (about 5 MiB), and less than those orgs and their 3 000 users,
/// which the soak's reader reads from its start, so that memory is sampled with the cache
/// full and evicting (at the default 64 MiB the soak ended with it half full, and RSS
/// grew with it).
const LOCAL_CACHE_BYTES: u64 = 8 << 20;

struct Options {
    customers: usize,
    read_secs: u64,
    replay_events: i64,
    soak_secs: u64,
    peer: bool,
    write: bool,
    /// `--only ingest`: the ingestion phase alone (its ceiling, its figures), then stop.
    only_ingest: bool,
}

/// Where the options are listed (bench/run.sh's header, which `--help` prints), rather
/// than a second list here.
const USAGE: &str = "the options: ./bench/run.sh --help";

impl Options {
    /// The options `./bench/run.sh` passes on, or why they are not ones this harness
    /// knows: a misspelt option would otherwise run the full benchmark.
    fn parse(args: &[String]) -> Result<Self, String> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut options = Self {
            customers: if quick { 300 } else { 3000 },
            read_secs: if quick { 3 } else { 10 },
            replay_events: if quick { 100_000 } else { 1_000_000 },
            soak_secs: if quick { 20 } else { 600 },
            peer: true,
            write: true,
            only_ingest: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut number = || -> Result<u64, String> {
                args.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{arg} needs a whole number"))
            };
            match arg.as_str() {
                "--quick" => {}
                "--customers" => options.customers = number()? as usize,
                "--read-secs" => options.read_secs = number()?,
                "--replay-events" => options.replay_events = number()? as i64,
                "--soak-secs" => options.soak_secs = number()?,
                "--no-peer" => options.peer = false,
                "--no-write" => options.write = false,
                "--only" => match args.next().map(String::as_str) {
                    Some("ingest") => options.only_ingest = true,
                    other => {
                        return Err(format!(
                            "--only takes ingest, not {}",
                            other.unwrap_or("nothing")
                        ))
                    }
                },
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(options)
    }
}

/// Peak and current resident memory of a process, sampled in the background.
struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// The number a `/proc/…/status` file gives for `field` (`VmRSS`, …): the first word after
/// `field:`.
fn status_number(status: &std::path::Path, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn rss_kib(pid: u32) -> u64 {
    status_number(
        std::path::Path::new(&format!("/proc/{pid}/status")),
        "VmRSS",
    )
    .unwrap_or(0)
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak_kib = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, halt) = (peak_kib.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { peak_kib, stop }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// CPU time (user + system) a process has used, in clock ticks (`/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// CPU ticks of the Postgres backends serving the bench's database (their process title
/// names it), so that other databases on the same server do not count. Postgres's own
/// background processes (WAL writer, checkpointer) are left out, and a backend that exits
/// during a phase takes its ticks with it: this is a lower bound.
fn postgres_ticks() -> u64 {
    let title = format!(" {DB} ");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("postgres: ") && c.contains(&title))
        })
        .map(cpu_ticks)
        .sum()
}

/// The whole machine's CPU ticks by kind, from `/proc/stat`'s first line: user nice
/// system idle iowait irq softirq steal …
fn machine_ticks() -> Vec<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            Some(
                stat.lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// Busy CPU ticks of the whole machine: all but idle and iowait.
fn machine_busy_ticks() -> u64 {
    let cpu = machine_ticks();
    cpu.iter().take(8).sum::<u64>() - cpu.get(3).unwrap_or(&0) - cpu.get(4).unwrap_or(&0)
}

/// What the machine's host took from it since a point: `/proc/stat`'s steal, the time its
/// virtual cores were ready to run and the hypervisor ran something else. Every thread of
/// the phase (server, load generator, Postgres, Redis) waits through it, so a phase's
/// latency tail is read beside it.
struct Stolen {
    ticks: u64,
    at: Instant,
}

impl Stolen {
    fn start() -> Self {
        Self {
            ticks: Self::ticks(),
            at: Instant::now(),
        }
    }

    /// The share of the machine's cores stolen since [`Stolen::start`].
    fn share(&self) -> f64 {
        share_of_cores(Self::ticks().saturating_sub(self.ticks), self.at)
    }

    /// The machine's steal ticks so far.
    fn ticks() -> u64 {
        machine_ticks().get(7).copied().unwrap_or(0)
    }
}

/// What `ticks` of CPU since `since` are of all the machine's cores over that time.
fn share_of_cores(ticks: u64, since: Instant) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    ticks as f64 / (since.elapsed().as_secs_f64() * TICKS_PER_SEC * cores as f64)
}

/// Clock ticks a second, the unit of `/proc`'s CPU times (`getconf CLK_TCK`: 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU used during a phase, by the server, by Postgres and by the whole machine.
struct CpuSample {
    server: u64,
    postgres: u64,
    machine: u64,
    at: Instant,
}

impl CpuSample {
    fn take(server_pid: u32) -> Self {
        Self {
            server: cpu_ticks(server_pid),
            postgres: postgres_ticks(),
            machine: machine_busy_ticks(),
            at: Instant::now(),
        }
    }

    /// The share of the machine's cores that were busy since `self`: below 100 %, the
    /// phase was waiting (on a commit's flush, say) rather than short of CPU.
    fn machine_busy_since(&self) -> f64 {
        share_of_cores(machine_busy_ticks().saturating_sub(self.machine), self.at)
    }

    /// Microseconds of CPU per item since `self`: server / Postgres / machine.
    fn per_item_since(&self, server_pid: u32, items: usize) -> String {
        let now = Self::take(server_pid);
        let micros = |ticks: u64| ticks as f64 * 1e6 / TICKS_PER_SEC / items.max(1) as f64;
        format!(
            "{:.0} / {:.0} / {:.0} µs",
            micros(now.server.saturating_sub(self.server)),
            micros(now.postgres.saturating_sub(self.postgres)),
            micros(now.machine.saturating_sub(self.machine)),
        )
    }
}

fn percentile(sorted_micros: &[u64], p: f64) -> f64 {
    if sorted_micros.is_empty() {
        return 0.0;
    }
    let i = ((sorted_micros.len() as f64 - 1.0) * p).round() as usize;
    sorted_micros[i] as f64 / 1000.0
}

async fn recreate_database(name: &str) -> PgPool {
    let admin = PgPool::connect(&format!("{PG_BASE}/postgres"))
        .await
        .expect("Postgres runs");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    PgPool::connect(&format!("{PG_BASE}/{name}")).await.unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `subledger serve` on `port`; `threads` sets `SUBLEDGER_THREADS` (unset: one per core).
fn start_server(port: u16, prefix: &str, threads: Option<usize>) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_subledger"));
    if let Some(threads) = threads {
        command.env("SUBLEDGER_THREADS", threads.to_string());
    }
    command
        .arg("serve")
        .env("DATABASE_URL", format!("{PG_BASE}/{DB}"))
        .env("SUBLEDGER_REDIS_PREFIX", prefix)
        .env("SUBLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("STRIPE_WEBHOOK_SECRET", SECRET)
        .env("SUBLEDGER_API_TOKEN", TOKEN)
        .env(
            "SUBLEDGER_CATALOG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/catalog.example.toml"),
        )
        .env("SUBLEDGER_LOCAL_CACHE_BYTES", LOCAL_CACHE_BYTES.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("the release binary starts")
}

async fn wait_until_up(client: &reqwest::Client, base: &str) {
    for _ in 0..600 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} never answered");
}

/// The answers that were not 2xx, by what they were: a status code, or the transport
/// error that stood for an answer (`error: …`). Counted so that a figure says why an event
/// was not stored, not only how many.
#[derive(Default, Clone)]
struct Failures(std::collections::BTreeMap<String, u64>);

impl Failures {
    fn add(&mut self, kind: String) {
        *self.0.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Failures) {
        for (kind, count) in other.0 {
            *self.0.entry(kind).or_default() += count;
        }
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

impl std::fmt::Display for Failures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.total())?;
        if !self.0.is_empty() {
            let kinds: Vec<String> = self.0.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
            write!(f, ": {}", kinds.join(", "))?;
        }
        Ok(())
    }
}

/// What a failed request was: its status, or which kind of transport error.
fn failure_kind(response: &Result<reqwest::Response, reqwest::Error>) -> String {
    match response {
        Ok(r) => r.status().as_u16().to_string(),
        Err(e) if e.is_connect() => "error: connect".to_owned(),
        Err(e) if e.is_timeout() => "error: timeout".to_owned(),
        Err(e) if e.is_request() => {
            // The innermost cause names it (`connection closed before message completed`…).
            let mut cause: &dyn std::error::Error = e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            format!("error: {cause}")
        }
        Err(e) => format!("error: {e}"),
    }
}

/// Sends every body with `concurrency` keep-alive connections; returns the latencies (µs)
/// of 2xx answers and what the others were.
async fn send_all(
    client: &reqwest::Client,
    url: &str,
    bodies: Vec<Vec<u8>>,
    concurrency: usize,
) -> (Vec<u64>, Failures) {
    let queue = Arc::new(Mutex::new(VecDeque::from(bodies)));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (queue, client, url) = (queue.clone(), client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = Failures::default();
            loop {
                let Some(body) = queue.lock().unwrap().pop_front() else {
                    break;
                };
                let header = sign(SECRET, chrono::Utc::now().timestamp(), &body);
                let started = Instant::now();
                let response = client
                    .post(&url)
                    .header("stripe-signature", header)
                    .body(body)
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies.push(started.elapsed().as_micros() as u64);
                    }
                    other => failures.add(failure_kind(&other)),
                }
            }
            (latencies, failures)
        }));
    }
    let mut all = Vec::new();
    let mut failures = Failures::default();
    for task in tasks {
        let (latencies, failed) = task.await.unwrap();
        all.extend(latencies);
        failures.merge(failed);
    }
    all.sort_unstable();
    (all, failures)
}

/// GETs URLs for `secs` seconds over `connections` keep-alive connections (with the API
/// token): in turn from each of `lists` (one that is empty is passed over), round-robin
/// within each. A list may grow meanwhile (the soak's reader adds each org as it comes to
/// exist); each is walked on its own, so one that grows faster than it is read never
/// keeps the others from being read. Returns the latencies (µs) of 2xx answers, sorted,
/// and the count of others.
async fn hammer(
    client: &reqwest::Client,
    lists: Vec<Arc<Mutex<Vec<String>>>>,
    secs: u64,
    connections: usize,
) -> (Vec<u64>, u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    // Lists only grow: with one non-empty now, every turn below finds a URL.
    assert!(lists.iter().any(|list| !list.lock().unwrap().is_empty()));
    let next = Arc::new(AtomicU64::new(0));
    let lists = Arc::new(lists);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, lists, next) = (client.clone(), lists.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let url = loop {
                    let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let urls = lists[n % lists.len()].lock().unwrap();
                    if !urls.is_empty() {
                        break urls[n / lists.len() % urls.len()].clone();
                    }
                };
                let started = Instant::now();
                match client.get(&url).bearer_auth(TOKEN).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies.push(started.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.unwrap();
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    (all, errors)
}

/// Reads `paths` of `base` over 50 connections, a second at a time, until a second of
/// them misses the in-process cache no more (at most `WARM_ROUNDS` seconds), so that the
/// measured reads start with every path held. Right after ingestion an org takes two
/// misses: the first finds its hash without `~complete` (the projection made it), so it
/// keeps nothing in memory, reads Postgres and fills the hash; the second reads the
/// complete hash into memory. On the slower machine one second covered about
/// 2 200 of the 6 000, and the measured reads then met the other 3 800 (p99 14 to 18 ms
/// there, against 4.3 ms once they were past). Returns the seconds it took.
async fn warm(client: &reqwest::Client, base: &str, paths: &[String]) -> u64 {
    const WARM_ROUNDS: u64 = 10;
    let urls: Vec<String> = paths.iter().map(|path| format!("{base}{path}")).collect();
    let misses = |page: &str| local_cache_reads(page, "miss");
    let mut before = misses(&metrics_page(client, base).await);
    for round in 1..=WARM_ROUNDS {
        let (served, _) = hammer(client, vec![Arc::new(Mutex::new(urls.clone()))], 1, 50).await;
        let after = misses(&metrics_page(client, base).await);
        // Each round starts at the first path: it has read them all only if it served as
        // many reads.
        if after == before && served.len() >= urls.len() {
            return round;
        }
        before = after;
    }
    WARM_ROUNDS
}

/// The server's `/metrics` page.
async fn metrics_page(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The in-process cache's reads of one result (`hit`, `miss`, `bypass`) so far.
fn local_cache_reads(page: &str, result: &str) -> f64 {
    series(
        page,
        &format!(r#"subledger_local_cache_reads_total{{result="{result}"}}"#),
    )
}

/// The reads of orgs' entitlements (200) the server took longer than 1 ms over, from its
/// route to its answer (`subledger_http_request_duration_seconds`, whose first bucket is
/// 1 ms), and all of them, so far: what of a read's latency is the read itself, and what is
/// its wait for a turn on a core.
fn reads_over_1ms(page: &str) -> (f64, f64) {
    let labels = r#"method="GET",route="/v1/orgs/:org_id/entitlements",status="200""#;
    let within = series(
        page,
        &format!(r#"subledger_http_request_duration_seconds_bucket{{{labels},le="0.001"}}"#),
    );
    let all = series(
        page,
        &format!("subledger_http_request_duration_seconds_count{{{labels}}}"),
    );
    (all - within, all)
}

/// How many times so far the kernel took a core from one of the process's threads while it
/// could still run (`nonvoluntary_ctxt_switches`, summed over its threads).
fn preemptions(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| status_number(&task.path().join("status"), "nonvoluntary_ctxt_switches"))
        .sum()
}

/// What the server did during a read phase, between two `/metrics` pages and two counts of
/// [`preemptions`]: the reads it took over 1 ms to answer, of all, and how often per
/// second its threads were preempted.
fn read_turns(before: &str, after: &str, preempted: u64, ran: Duration) -> String {
    let (slow_before, all_before) = reads_over_1ms(before);
    let (slow_after, all_after) = reads_over_1ms(after);
    format!(
        "{:.0} of {:.0}; preempted {:.0} times/s",
        slow_after - slow_before,
        all_after - all_before,
        preempted as f64 / ran.as_secs_f64().max(f64::EPSILON)
    )
}

/// The value of one series (name and labels, as written) on a `/metrics` page; 0 if absent.
fn series(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// What one `wrk` run measured.
struct WrkRun {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Non-2xx answers and socket errors.
    errors: u64,
    /// How long it sent requests (`N requests in T`).
    ran: Duration,
    /// The share of the machine's cores its host took meanwhile ([`Stolen`]).
    stolen: f64,
}

/// Sends each of `bodies` once, in order, to `/webhooks/stripe` of `base`, signed now, over
/// `connections` keep-alive connections, with `wrk` on one thread (`bench/ingest.lua`),
/// for the reason `wrk_reads` gives: the ingestion phase's generator in this process
/// (reqwest) took 14 % of the machine in one profile (`perf record -a`, 4 900 deliveries
/// a second), wrk 5 % (6 900 a second), and the ceiling's generator (pgbench) is a C
/// program too. wrk stops once the last delivery is answered, or 3 s after the last one
/// went out if one never is (a broken connection: counted among wrk's socket errors); its
/// run lasts from its first request to then.
fn wrk_ingest(base: &str, bodies: &[Vec<u8>], connections: usize) -> WrkRun {
    use std::io::Write as _;
    let list =
        std::env::temp_dir().join(format!("subledger_bench_deliveries_{}", std::process::id()));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&list).unwrap());
    let now = chrono::Utc::now().timestamp();
    for body in bodies {
        assert!(!body.contains(&b'\n'), "a delivery's JSON is one line");
        file.write_all(sign(SECRET, now, body).as_bytes()).unwrap();
        file.write_all(b"\t").unwrap();
        file.write_all(body).unwrap();
        file.write_all(b"\n").unwrap();
    }
    file.into_inner().unwrap().sync_all().unwrap();
    let marks = std::env::temp_dir().join(format!("subledger_bench_marks_{}", std::process::id()));
    let (started, done) = (
        marks.with_extension("started"),
        marks.with_extension("done"),
    );
    let _ = (std::fs::remove_file(&started), std::fs::remove_file(&done));
    let mut wrk = Command::new("wrk")
        .args(["-t1", "-c", &connections.to_string()])
        .args(["-d600s", "--timeout", "60s", "--latency", "-s"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/ingest.lua"))
        .arg(base)
        .arg("--")
        .arg(&list)
        .arg(&marks)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wrk starts");
    // The script interrupts wrk once every delivery is answered. Once, wrk still ran
    // its whole -d (600 s, and a rate of 85 a second), most likely because the SIGINT,
    // sent to the process, reached its sending thread, which then stopped, while its main
    // thread slept on. So if wrk has not ended 300 ms after the last answer, it is
    // interrupted from here, again every 300 ms, and the time it sent is taken from the
    // script's marks instead.
    let (mut started_at, mut done_at, mut interrupted) = (None, None, None::<Instant>);
    while wrk.try_wait().expect("wrk runs").is_none() {
        let now = Instant::now();
        if started_at.is_none() && started.exists() {
            started_at = Some(now);
        }
        if done_at.is_none() && done.exists() {
            done_at = Some(now);
        }
        let wait = Duration::from_millis(300);
        let late = done_at.is_some_and(|done| now - done > wait);
        if late && interrupted.is_none_or(|at| now - at > wait) {
            let _ = Command::new("kill")
                .args(["-INT", &wrk.id().to_string()])
                .status();
            interrupted = Some(now);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = output_text(&wrk.wait_with_output().expect("wrk's output"));
    let _ = std::fs::remove_file(&list);
    let _ = (std::fs::remove_file(&started), std::fs::remove_file(&done));
    let mut run = parse_wrk(&out).unwrap_or_else(|| panic!("wrk said: {out}"));
    if let (Some(_), Some(started), Some(done)) = (interrupted, started_at, done_at) {
        println!(
            "(wrk went on after the last answer and was interrupted from here: the time is \
             the script's, the latencies include the fillers it sent meanwhile)"
        );
        run.ran = done - started;
    }
    run
}

/// GETs `paths` of `base` round-robin for `secs` seconds over `connections` keep-alive
/// connections (with the API token), with `wrk` on one thread (`bench/reads.lua`). The
/// reads are measured with wrk rather than from this process: a load generator shares the
/// machine's two cores with the server, and reqwest's took about 40 % of them, so the
/// server's own rate and tail were the generator's.
fn wrk_reads(base: &str, paths: &[String], secs: u64, connections: usize) -> WrkRun {
    let list = std::env::temp_dir().join(format!("subledger_bench_paths_{}", std::process::id()));
    std::fs::write(&list, paths.join("\n")).unwrap();
    let stolen = Stolen::start();
    let out = run_capture(
        Command::new("wrk")
            .args(["-t1", "-c", &connections.to_string(), "-d"])
            .arg(format!("{secs}s"))
            .args(["--latency", "-s"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/reads.lua"))
            .arg(base)
            .arg("--")
            .arg(&list)
            .arg(TOKEN),
    );
    let _ = std::fs::remove_file(&list);
    let mut run = parse_wrk(&out).unwrap_or_else(|| panic!("wrk said: {out}"));
    run.stolen = stolen.share();
    run
}

/// Reads `wrk --latency`'s report: `Requests/sec:`, the 50 % and 99 % lines of its
/// latency distribution, `Non-2xx or 3xx responses:` and `Socket errors:`.
fn parse_wrk(out: &str) -> Option<WrkRun> {
    let duration_ms = |text: &str| -> Option<f64> {
        let split = text.find(|c: char| c.is_ascii_alphabetic())?;
        let value: f64 = text[..split].parse().ok()?;
        Some(match &text[split..] {
            "us" => value / 1000.0,
            "ms" => value,
            "s" => value * 1000.0,
            "m" => value * 60_000.0,
            _ => return None,
        })
    };
    let mut run = WrkRun {
        rate: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        errors: 0,
        ran: Duration::ZERO,
        stolen: 0.0,
    };
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => run.rate = rate.parse().ok()?,
            [_, "requests", "in", ran, ..] => {
                run.ran = Duration::from_secs_f64(duration_ms(ran.trim_end_matches(','))? / 1000.0)
            }
            ["50%", latency] => run.p50_ms = duration_ms(latency)?,
            ["99%", latency] => run.p99_ms = duration_ms(latency)?,
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                run.errors += count.parse::<u64>().ok()?
            }
            ["Socket", "errors:", rest @ ..] => {
                run.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    (run.rate.is_finite() && run.p50_ms.is_finite() && run.p99_ms.is_finite()).then_some(run)
}

/// A basil-shaped `customer.subscription.updated` for the freshness probe: the shape of
/// tests/integration/events.rs (fields from stripe/openapi spec3 `subscription`).
fn probe_event(step: usize, status: &str) -> Vec<u8> {
    let far = chrono::Utc::now().timestamp() + 30 * 86_400;
    serde_json::to_vec(&serde_json::json!({
        "id": format!("evt_probe{step}"), "object": "event", "api_version": "2025-03-31.basil",
        "created": 1_780_000_000 + 10 * step as i64, "livemode": false, "pending_webhooks": 1,
        "type": "customer.subscription.updated",
        "data": {"object": {
            "id": "sub_probe", "object": "subscription", "customer": "cus_probe", "status": status,
            "created": 1_780_000_000, "cancel_at_period_end": false, "cancel_at": null,
            "canceled_at": null, "ended_at": null, "trial_start": null, "trial_end": null,
            "latest_invoice": null, "metadata": {"organizationId": "org_probe"},
            "items": {"object": "list", "data": [{
                "id": "si_probe", "object": "subscription_item", "quantity": 1,
                "price": {"id": "price_pro_monthly", "object": "price", "product": "prod_pro", "lookup_key": "pro_monthly"},
                "current_period_start": far - 30 * 86_400, "current_period_end": far
            }]}
        }}
    }))
    .unwrap()
}

/// The replay's steps as its log tells them (JSON lines from `projections::runner`), each
/// as the time from `spawned` at which it ended: the note of what the eventual projections
/// hold, the key scan (`rebuild: found each key's newest event`: events read below the horizon,
/// events needed), the apply of those (`rebuild: applied`) and the catch-up after it
/// (events applied), then the process's exit (`exited`).
fn replay_steps(log: &str, spawned: chrono::DateTime<chrono::Utc>, exited: Duration) -> String {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let line = |message: &str| {
        lines
            .iter()
            .find(|line| line["fields"]["message"] == message)
    };
    let at = |line: &serde_json::Value| {
        let ended: chrono::DateTime<chrono::Utc> = line["timestamp"].as_str()?.parse().ok()?;
        Some((ended - spawned).num_milliseconds() as f64 / 1000.0)
    };
    let count = |line: &serde_json::Value, name: &str| line["fields"][name].as_u64();
    let step = |message: &str, label: &str, counts: &[(&str, &str)]| {
        let Some(line) = line(message) else {
            return format!("{label} not in its log");
        };
        let mut text = match at(line) {
            Some(seconds) => format!("{label} at {seconds:.1} s"),
            None => format!("{label} at ?"),
        };
        let counted: Vec<String> = counts
            .iter()
            .filter_map(|(field, what)| count(line, field).map(|n| format!("{n} {what}")))
            .collect();
        if !counted.is_empty() {
            let _ = write!(text, " ({})", counted.join(", "));
        }
        text
    };
    [
        step(
            "rebuild: noted what the eventual projections hold",
            "cache noted",
            &[],
        ),
        step(
            "rebuild: found each key's newest event",
            "keys scanned",
            &[("read", "events read"), ("needed", "needed")],
        ),
        step("rebuild: applied", "applied", &[]),
        step(
            "replay: caught up after the rebuild",
            "caught up",
            &[("applied", "events")],
        ),
        format!("exited at {:.1} s", exited.as_secs_f64()),
    ]
    .join(", ")
}

/// Sizes of the stored data, in bytes: (log, inbox, platform tables).
async fn storage(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT pg_total_relation_size('events'), pg_total_relation_size('inbox'), \
            pg_total_relation_size('subscriptions') + pg_total_relation_size('merchant_subscriptions') \
            + pg_total_relation_size('projection_checkpoints')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until the inbox is drained and every projection has read the whole log.
async fn wait_caught_up(pool: &PgPool) {
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE state = 'pending'")
            .fetch_one(pool)
            .await
            .unwrap();
        let lag_a = projections::runner::lag(pool, PlatformTables::NAME)
            .await
            .unwrap_or(1);
        let lag_b = projections::runner::lag(pool, RedisCache::NAME)
            .await
            .unwrap_or(1);
        if pending == 0 && lag_a == 0 && lag_b == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn run_capture(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    output_text(&out)
}

/// What a command printed: its standard output, then its standard error.
fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Durable single-row inserts of a ~1.5 KB JSON row at 32 clients: the ingestion ceiling.
async fn pgbench_ceiling() -> f64 {
    let pool = recreate_database("subledger_bench_ceiling").await;
    sqlx::query("CREATE TABLE ceiling (id bigserial PRIMARY KEY, body jsonb NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let script = std::env::temp_dir().join("subledger_ceiling.sql");
    std::fs::write(
        &script,
        "\\set n random(1, 1000000000)\nINSERT INTO ceiling (body) VALUES (jsonb_build_object('id', :n, 'type', 'customer.subscription.updated', 'pad', repeat('x', 1450)));\n",
    )
    .unwrap();
    // Over the connection the service makes: on loopback, without TLS (`db::connect_options`).
    let out = run_capture(
        Command::new("pgbench")
            .env("PGSSLMODE", "disable")
            .args([
                "-n",
                "-c",
                "32",
                "-j",
                "2",
                "-T",
                "10",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-f",
            ])
            .arg(&script)
            .arg("subledger_bench_ceiling"),
    );
    out.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("pgbench said: {out}"))
}

/// `redis-benchmark -t get -c 50 -d 600`: the read ceiling.
fn redis_ceiling() -> f64 {
    let out = run_capture(
        Command::new("redis-benchmark")
            .args(["-t", "get", "-c", "50", "-d", "600", "-n", "300000", "-q"]),
    );
    out.split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == "requests")
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_else(|| panic!("redis-benchmark said: {out}"))
}

#[derive(Default)]
struct Figures {
    rows: Vec<(String, String)>,
}

impl Figures {
    fn add(&mut self, name: &str, value: String) {
        println!("{name:<44} {value}");
        self.rows.push((name.to_owned(), value));
    }
}

/// Posts the `step`th change to the first replica, waits until its projection has
/// written it to Redis, and returns how long after that write (µs) both `others` answer
/// it. Each then reads it a few more times, so it is held in memory before the next one.
async fn freshness_lag(
    client: &reqwest::Client,
    redis: &mut redis::aio::MultiplexedConnection,
    base: &str,
    others: &[(Child, String)],
    prefix: &str,
    step: usize,
) -> (u64, u64) {
    let status = if step.is_multiple_of(2) {
        "active"
    } else {
        "past_due"
    };
    let body = probe_event(step, status);
    let header = sign(SECRET, chrono::Utc::now().timestamp(), &body);
    let _ = client
        .post(format!("{base}/webhooks/stripe"))
        .header("stripe-signature", header)
        .body(body)
        .send()
        .await;
    let mut read = redis::cmd("GET");
    read.arg(format!("{prefix}stripe:customer:cus_probe"));
    until_holds(redis, &read, status, None).await;
    let written = Instant::now();
    // The org's answer is its hash's field for the customer, which the writer's second
    // phase writes after the customer key: how long after.
    let mut read = redis::cmd("HGET");
    read.arg(format!("{prefix}stripe:org:org_probe"))
        .arg("cus_probe");
    let owner_written = if until_holds(redis, &read, status, Some(Duration::from_secs(5))).await {
        written.elapsed().as_micros() as u64
    } else {
        u64::MAX
    };
    for (_, other) in others {
        loop {
            let answer: serde_json::Value = client
                .get(format!("{other}/v1/orgs/org_probe/entitlements"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap_or_default();
            if answer["status"] == status {
                break;
            }
        }
    }
    let lag = (written.elapsed().as_micros() as u64, owner_written);
    for _ in 0..3 {
        for (_, other) in others {
            let _ = client
                .get(format!("{other}/v1/orgs/org_probe/entitlements"))
                .bearer_auth(TOKEN)
                .send()
                .await;
        }
    }
    lag
}

/// Reads an answer from Redis with `read` every 200 µs until it holds `status`, for at
/// most `within` (without one, until it does); whether it did.
async fn until_holds(
    redis: &mut redis::aio::MultiplexedConnection,
    read: &redis::Cmd,
    status: &str,
    within: Option<Duration>,
) -> bool {
    let (started, wanted) = (Instant::now(), format!("\"status\":\"{status}\""));
    loop {
        let raw: Option<String> = read.query_async(redis).await.unwrap();
        if raw.is_some_and(|raw| raw.contains(&wanted)) {
            return true;
        }
        if within.is_some_and(|within| started.elapsed() > within) {
            return false;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// A connection to the standalone Redis the server under test uses.
async fn bench_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Seconds of CPU the bench's Redis has used since it started (`INFO cpu`: its
/// `used_cpu_sys` plus `used_cpu_user`).
async fn redis_cpu_secs() -> f64 {
    let mut redis = bench_redis().await;
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut redis)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| *name == "used_cpu_sys" || *name == "used_cpu_user")
        .filter_map(|(_, secs)| secs.trim().parse::<f64>().ok())
        .sum()
}

/// Deletes the run's keys from the standalone Redis (they would otherwise stay until
/// their TTL, a day, in a Redis the benchmark shares).
async fn delete_keys(prefix: &str) {
    let mut redis = bench_redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` (the test command) builds and runs bench targets without
    // `--bench`: keep it compiling, but only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("the benchmark runs with ./bench/run.sh (cargo bench --bench harness)");
        return;
    }
    // `cargo bench` adds `--bench` after the options.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let options = Options::parse(&args).unwrap_or_else(|why| {
        eprintln!("{why}\n{USAGE}");
        std::process::exit(2)
    });
    let mut figures = Figures::default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();

    // The workload: realistic lifecycles, shuffled, with about 3 % duplicates.
    let sim = simulate(20261125, options.customers, 1_760_000_000);
    let events = shuffle_with_duplicates(&sim.events, 7, 0.03);
    let bodies: Vec<Vec<u8>> = events.iter().map(SimEvent::to_bytes).collect();
    let orgs: Vec<String> = sim.truth.iter().map(|t| t.org_id.clone()).collect();
    let users: Vec<String> = sim.truth.iter().map(|t| t.user_id.clone()).collect();
    println!(
        "workload: {} customers, {} deliveries ({} distinct events)",
        options.customers,
        bodies.len(),
        sim.events.len()
    );

    // 1. Ingestion.
    let ceiling = pgbench_ceiling().await;
    let pool = recreate_database(DB).await;
    let prefix = format!("bench:{}:", chrono::Utc::now().timestamp());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = start_server(port, &prefix, None);
    wait_until_up(&client, &base).await;
    let rss = RssSampler::start(server.id());
    let redis_cpu = redis_cpu_secs().await;
    let cpu = CpuSample::take(server.id());
    let stolen = Stolen::start();
    let sent = wrk_ingest(&base, &bodies, 32);
    let acked_in = sent.ran;
    let answered = Instant::now();
    wait_caught_up(&pool).await;
    let end_to_end = acked_in + answered.elapsed();
    let ingest_cpu = cpu.per_item_since(server.id(), bodies.len());
    let ingest_busy = cpu.machine_busy_since();
    let ingest_stolen = stolen.share();
    let ingest_redis = (redis_cpu_secs().await - redis_cpu) * 1e6 / bodies.len() as f64;
    let ingest_rss = rss.finish();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    let ack_rate = bodies.len() as f64 / acked_in.as_secs_f64();
    let e2e_rate = bodies.len() as f64 / end_to_end.as_secs_f64();
    figures.add(
        "ingest: acknowledged/s (32 connections, wrk)",
        format!("{ack_rate:.0} ({} non-2xx)", sent.errors),
    );
    figures.add(
        "ingest: ack latency p50 / p99",
        format!("{:.2} ms / {:.2} ms", sent.p50_ms, sent.p99_ms),
    );
    figures.add(
        "ingest: end-to-end events/s (projections caught up)",
        format!("{e2e_rate:.0}"),
    );
    figures.add(
        "ingest ceiling: pgbench 1.5 KB inserts/s (32 clients)",
        format!("{ceiling:.0}"),
    );
    figures.add(
        "ingest: end-to-end / ceiling (goal >= 0.5)",
        format!("{:.2}", e2e_rate / ceiling),
    );
    figures.add(
        "ingest: inbox rows / distinct events sent",
        format!("{stored} / {}", sim.events.len()),
    );
    figures.add(
        "ingest: CPU per delivery, server / its Postgres backends / machine",
        ingest_cpu,
    );
    figures.add(
        "ingest: Redis CPU per delivery (INFO cpu)",
        format!("{ingest_redis:.0} µs"),
    );
    figures.add(
        "ingest: machine busy (share of its cores, acks and catch-up); taken by its host",
        format!(
            "{:.0} %; {:.0} %",
            ingest_busy * 100.0,
            ingest_stolen * 100.0
        ),
    );
    figures.add("ingest: peak RSS", format!("{ingest_rss:.1} MiB"));
    // The ceiling again, right after: a machine's speed can drift within minutes (one
    // session saw pgbench at 10 000 and at 20 000 inserts/s on one machine), and the
    // ratio above moves with it. Shown beside the ratio, not used in it.
    let ceiling_after = pgbench_ceiling().await;
    figures.add(
        "ingest ceiling: pgbench again right after (not in the ratio)",
        format!("{ceiling_after:.0}"),
    );
    if options.only_ingest {
        let _ = server.kill();
        let _ = server.wait();
        delete_keys(&prefix).await;
        if options.write {
            write_benchmarks_md(
                &figures,
                &std::env::args().skip(1).collect::<Vec<_>>().join(" "),
            );
        }
        return;
    }

    // 2. Entitlement reads, beside the server's own ceiling: `/healthz` (no auth, no IO)
    // at the same concurrency. The reads are warmed just before they run, until a second
    // of them misses no more (`warm`), so that they start with a full cache whose entries
    // are not all as old as each other (warmed before `/healthz`'s run, every entry was
    // older than its age bound at once and expired in the first moments of the reads).
    let org_paths: Vec<String> = orgs
        .iter()
        .map(|org| format!("/v1/orgs/{org}/entitlements"))
        .collect();
    let health = wrk_reads(&base, &["/healthz".to_owned()], options.read_secs, 50);
    let warmed = warm(&client, &base, &org_paths).await;
    let before = metrics_page(&client, &base).await;
    let rss = RssSampler::start(server.id());
    let preempted = preemptions(server.id());
    let reads = wrk_reads(&base, &org_paths, options.read_secs, 50);
    let preempted = preemptions(server.id()).saturating_sub(preempted);
    let read_rss = rss.finish();
    let after = metrics_page(&client, &base).await;
    let local_reads =
        |result: &str| local_cache_reads(&after, result) - local_cache_reads(&before, result);
    let redis_max = redis_ceiling();
    figures.add(
        "reads: entitlements req/s (50 connections, wrk)",
        format!("{:.0} ({} errors)", reads.rate, reads.errors),
    );
    figures.add(
        "reads: p50 / p99 (goal p99 <= 2 ms); cores taken by the machine's host meanwhile",
        format!(
            "{:.2} ms / {:.2} ms; {:.0} %",
            reads.p50_ms,
            reads.p99_ms,
            reads.stolen * 100.0
        ),
    );
    figures.add(
        "reads ceiling: redis-benchmark GET -c 50 -d 600",
        format!("{redis_max:.0}"),
    );
    figures.add(
        "reads: req/s / ceiling (goal >= 0.25)",
        format!("{:.2}", reads.rate / redis_max),
    );
    figures.add(
        "reads ceiling: the server's own /healthz req/s, p50 / p99 (50 connections, wrk); taken by the host",
        format!(
            "{:.0} ({} errors), {:.2} ms / {:.2} ms; {:.0} %",
            health.rate,
            health.errors,
            health.p50_ms,
            health.p99_ms,
            health.stolen * 100.0
        ),
    );
    figures.add(
        "reads: req/s / /healthz (goal >= 0.6, p99 <= 2 ms)",
        format!("{:.2}", reads.rate / health.rate),
    );
    figures.add(
        "reads: in-process cache during the phase, hits / misses / bypasses",
        format!(
            "{:.0} / {:.0} / {:.0} (warmed for {warmed} s)",
            local_reads("hit"),
            local_reads("miss"),
            local_reads("bypass")
        ),
    );
    figures.add(
        "reads: answered in over 1 ms by the server itself (route to answer), of all; its threads preempted",
        read_turns(&before, &after, preempted, reads.ran),
    );
    figures.add("reads: peak RSS", format!("{read_rss:.1} MiB"));

    // 3. The same reads from a second server on the same database and Redis, on one
    // thread (`SUBLEDGER_THREADS=1`), so that it and wrk each have a core instead of
    // three threads sharing two, as a sidecar beside a busy app would be sized
    // (docs/operations.md, "Threads on shared cores"). The first server stays up, idle.
    let sized_port = free_port();
    let sized_base = format!("http://127.0.0.1:{sized_port}");
    let mut sized = start_server(sized_port, &prefix, Some(1));
    wait_until_up(&client, &sized_base).await;
    let sized_health = wrk_reads(&sized_base, &["/healthz".to_owned()], options.read_secs, 50);
    warm(&client, &sized_base, &org_paths).await;
    let sized_before = metrics_page(&client, &sized_base).await;
    let sized_preempted = preemptions(sized.id());
    let sized_reads = wrk_reads(&sized_base, &org_paths, options.read_secs, 50);
    let sized_preempted = preemptions(sized.id()).saturating_sub(sized_preempted);
    let sized_after = metrics_page(&client, &sized_base).await;
    let _ = sized.kill();
    let _ = sized.wait();
    figures.add(
        "reads, server on 1 thread: entitlements req/s, p50 / p99, taken by the host; /healthz the same",
        format!(
            "{:.0} ({} errors), {:.2} ms / {:.2} ms, {:.0} %; {:.0} ({} errors), {:.2} ms / {:.2} ms, {:.0} %",
            sized_reads.rate,
            sized_reads.errors,
            sized_reads.p50_ms,
            sized_reads.p99_ms,
            sized_reads.stolen * 100.0,
            sized_health.rate,
            sized_health.errors,
            sized_health.p50_ms,
            sized_health.p99_ms,
            sized_health.stolen * 100.0
        ),
    );
    figures.add(
        "reads, server on 1 thread: req/s / /healthz (goal >= 0.6, p99 <= 2 ms)",
        format!("{:.2}", sized_reads.rate / sized_health.rate),
    );
    figures.add(
        "reads, server on 1 thread: answered in over 1 ms by the server itself, of all; its thread preempted",
        read_turns(
            &sized_before,
            &sized_after,
            sized_preempted,
            sized_reads.ran,
        ),
    );

    // 4. Soak at half the measured ingest rate (memory steady, not growing).
    let soak_rate = (e2e_rate / 2.0).max(1.0);
    // Each event's body, with its customer (then its org). A simulated event's JSON value
    // is several times the size of its bytes, and a 10-minute soak's simulation holds about
    // three million events: each is kept only as its bytes, serialized as soon as its
    // customer's life is simulated (holding the values pushed the harness past the
    // machine's 24 GiB, and the kernel killed it).
    let (soak_events, soak_truth) = simulate_into(
        99,
        (soak_rate as usize * options.soak_secs as usize) / 12 + 10,
        1_770_000_000,
        |event| (event.to_bytes(), event.customer_id),
    );
    let org_of: HashMap<String, String> = soak_truth
        .into_iter()
        .map(|t| (t.customer_id, t.org_id))
        .collect();
    let mut soak_bodies: VecDeque<(Vec<u8>, Option<String>)> = soak_events
        .into_iter()
        .map(|(body, customer)| (body, org_of.get(&customer).cloned()))
        .collect();
    drop(org_of);
    // Entitlement reads all through the soak, one connection, in turn from two lists: the
    // read phase's orgs and users, and each of the soak's orgs once an event of its
    // customer was sent. The read phase's owners are quiet during the soak (a write to an
    // owner's hash drops its cached answer), and together they hold more than the
    // in-process cache's bound (`LOCAL_CACHE_BYTES`), so the cache is full and must evict
    // while memory is sampled. (With one list, the soak's orgs were appended faster than
    // the reader went through them for the soak's first minutes, so it read only new orgs,
    // never cached, and the cache stayed empty: a `/metrics` sampler, 240ee6c and 101e9db.)
    let quiet_owners: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(
        orgs.iter()
            .map(|org| format!("{base}/v1/orgs/{org}/entitlements"))
            .chain(
                users
                    .iter()
                    .map(|user| format!("{base}/v1/users/{user}/entitlements")),
            )
            .collect(),
    ));
    let soak_orgs: Arc<Mutex<Vec<String>>> = Arc::default();
    let soak_reads = tokio::spawn({
        let lists = vec![quiet_owners, soak_orgs.clone()];
        let (client, secs) = (client.clone(), options.soak_secs);
        async move { hammer(&client, lists, secs, 1).await }
    });
    let mut seen_orgs: HashSet<String> = orgs.iter().cloned().collect();
    let mut samples = Vec::new();
    let soak_start = Instant::now();
    let mut sent = 0u64;
    while soak_start.elapsed() < Duration::from_secs(options.soak_secs) {
        let due = (soak_start.elapsed().as_secs_f64() * soak_rate) as u64;
        let mut batch = Vec::new();
        for (body, org) in (sent..due).filter_map(|_| soak_bodies.pop_front()) {
            batch.push(body);
            if let Some(org) = org.filter(|org| seen_orgs.insert(org.clone())) {
                soak_orgs
                    .lock()
                    .unwrap()
                    .push(format!("{base}/v1/orgs/{org}/entitlements"));
            }
        }
        sent = due;
        if !batch.is_empty() {
            send_all(&client, &format!("{base}/webhooks/stripe"), batch, 8).await;
        }
        if samples.len() as u64 <= soak_start.elapsed().as_secs() / 5 {
            samples.push(rss_kib(server.id()) as f64 / 1024.0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (soak_read_latencies, soak_read_errors) = soak_reads.await.unwrap();
    wait_caught_up(&pool).await;
    let scrape = metrics_page(&client, &base).await;
    let gauge = |name: &str| series(&scrape, name);
    figures.add(
        "soak: reads during the soak (1 connection)",
        format!(
            "{} ({soak_read_errors} errors); in-process cache at the end: {:.0} entries, {:.1} MiB of {} MiB",
            soak_read_latencies.len(),
            gauge(r#"subledger_local_cache{measure="entries"}"#),
            gauge(r#"subledger_local_cache{measure="bytes"}"#) / 1048576.0,
            LOCAL_CACHE_BYTES >> 20
        ),
    );
    let tenth = (samples.len() / 10).max(1);
    let first: f64 = samples[..tenth].iter().sum::<f64>() / tenth as f64;
    let last: f64 = samples[samples.len() - tenth..].iter().sum::<f64>() / tenth as f64;
    figures.add(
        &format!(
            "soak: {} s at {soak_rate:.0} events/s, RSS first→last 10 %",
            options.soak_secs
        ),
        format!(
            "{first:.1} → {last:.1} MiB (max {:.1})",
            samples.iter().cloned().fold(0.0, f64::max)
        ),
    );
    // One sample a minute (or a tenth of the soak, if shorter), to show where growth stops.
    let every = (samples.len() / 10).clamp(1, 12);
    figures.add(
        "soak: RSS through the soak (MiB)",
        samples
            .iter()
            .step_by(every)
            .map(|mib| format!("{mib:.0}"))
            .collect::<Vec<_>>()
            .join(" → "),
    );

    // Storage per event after the soak, then after retention has dropped every processed
    // payload (`subledger prune --older-than-hours 0`) and the inbox was compacted.
    let events_logged: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let per_event = |(log, inbox, tables): (i64, i64, i64)| {
        let n = events_logged.max(1) as f64;
        format!(
            "log {:.0} / inbox {:.0} / tables {:.0} B per event ({events_logged} events; {:.0} MB per million)",
            log as f64 / n,
            inbox as f64 / n,
            tables as f64 / n,
            (log + inbox + tables) as f64 / n
        )
    };
    figures.add("storage after the soak", per_event(storage(&pool).await));
    let pruning = Instant::now();
    let printed = run_capture(
        Command::new(env!("CARGO_BIN_EXE_subledger"))
            .args(["prune", "--older-than-hours", "0"])
            .env("DATABASE_URL", format!("{PG_BASE}/{DB}"))
            .env("RUST_LOG", "warn"),
    );
    let prune_time = pruning.elapsed();
    // Its count, not the warnings it may log before it (slow statements).
    let pruned = printed
        .lines()
        .find(|line| line.ends_with("inbox payloads dropped"))
        .unwrap_or("prune printed no count")
        .to_owned();
    figures.add(
        "retention: `subledger prune --older-than-hours 0` took",
        format!("{:.1} s", prune_time.as_secs_f64()),
    );
    sqlx::query("VACUUM FULL inbox")
        .execute(&pool)
        .await
        .unwrap();
    figures.add(
        &format!("storage after retention ({pruned})"),
        per_event(storage(&pool).await),
    );

    // Cross-replica freshness: two more replicas on the same database and Redis; a change
    // posted to the first is timed from its write in Redis until both others answer it.
    let mut others = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        others.push((
            start_server(port, &prefix, None),
            format!("http://127.0.0.1:{port}"),
        ));
    }
    for (_, other) in &others {
        wait_until_up(&client, other).await;
    }
    // Let their invalidation listeners subscribe (they bypass their caches until then).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut redis = bench_redis().await;
    // 20 changes with the invalidation channel up, then 10 more from the moment every
    // replica's channel is killed (`CLIENT KILL TYPE pubsub`): they bypass their caches
    // until subscribed again, then start over empty.
    let mut lags = Vec::new();
    for step in 0..20 {
        lags.push(freshness_lag(&client, &mut redis, &base, &others, &prefix, step).await);
    }
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut killed_lags = Vec::new();
    for step in 20..30 {
        killed_lags.push(freshness_lag(&client, &mut redis, &base, &others, &prefix, step).await);
    }
    // Each change over 50 ms: its step, its lag, and how much of that the org's hash
    // took to follow the customer key in Redis (the writer's second phase; the rest is
    // the replicas').
    let slow: Vec<String> = lags
        .iter()
        .chain(&killed_lags)
        .enumerate()
        .filter(|(_, (lag, _))| *lag > 50_000)
        .map(|(step, (lag, owner))| {
            let owner = match owner {
                &u64::MAX => "not within 5 s".to_owned(),
                micros => format!("{:.1} ms", *micros as f64 / 1000.0),
            };
            format!(
                "step {step}: {:.1} ms, org's hash {owner}",
                *lag as f64 / 1000.0
            )
        })
        .collect();
    figures.add(
        "freshness: changes over 50 ms (step: lag, of which the org's hash after the customer key)",
        if slow.is_empty() {
            "none".to_owned()
        } else {
            slow.join("; ")
        },
    );
    let mut lags: Vec<u64> = lags.into_iter().map(|(lag, _)| lag).collect();
    let mut killed_lags: Vec<u64> = killed_lags.into_iter().map(|(lag, _)| lag).collect();
    lags.sort_unstable();
    killed_lags.sort_unstable();
    figures.add(
        "freshness: write in Redis → read on 2 other replicas, p50 / max (goal <= 250 ms)",
        format!(
            "{:.1} ms / {:.1} ms (20 changes)",
            percentile(&lags, 0.5),
            percentile(&lags, 1.0)
        ),
    );
    figures.add(
        "freshness: the same from the invalidation channel's kill on",
        format!(
            "{:.1} ms / {:.1} ms (10 changes, {killed} connections killed)",
            percentile(&killed_lags, 0.5),
            percentile(&killed_lags, 1.0)
        ),
    );
    for (mut other, _) in others {
        let _ = other.kill();
        let _ = other.wait();
    }
    let _ = server.kill();
    let _ = server.wait();

    // 5. Replay: grow the log to the target size by copying customers, then rebuild.
    // Each copy is a customer of its own with subscriptions, an org and a user of its own
    // (every id value `sub_…`, `org_…`, `user_…` suffixed like the customer's), as a longer
    // soak would make them: a Stripe subscription belongs to one customer. Until
    // 2026-12-04 the copies kept their original's subscription, org and user ids, so each
    // subscription was claimed by every copy of its customer and the rebuild needed the
    // newest snapshot of one subscription where it now needs one of each.
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let copies = (options.replay_events + have - 1) / have.max(1) - 1;
    if copies > 0 {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
                snapshot_of) \
             SELECT aggregate_type, aggregate_id || '_c' || k, sequence, event_type, event_version, \
                    regexp_replace( \
                        replace(payload::text, '\"customer_id\":\"' || aggregate_id || '\"', \
                                '\"customer_id\":\"' || aggregate_id || '_c' || k || '\"'), \
                        ':\"((sub|org|user)_[^\"]+)\"', ':\"\\1_c' || k || '\"', 'g')::json, metadata, \
                    snapshot_of || '_c' || k \
             FROM events, generate_series(1, $1::int) AS k ORDER BY k, global_seq",
        )
        .bind(copies as i32)
        .execute(&pool)
        .await
        .unwrap();
    }
    // A long-lived log has planner statistics (autovacuum keeps them); a freshly
    // bulk-loaded one has not until autovacuum next runs, so give it what it would have.
    sqlx::query("ANALYZE events").execute(&pool).await.unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut replay = Command::new(env!("CARGO_BIN_EXE_subledger"));
    replay
        .arg("replay")
        .env("DATABASE_URL", format!("{PG_BASE}/{DB}"))
        .env("SUBLEDGER_REDIS_PREFIX", &prefix)
        .env(
            "SUBLEDGER_CATALOG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/catalog.example.toml"),
        )
        // Its steps' timings, as JSON lines (`replay_steps`).
        .env("RUST_LOG", "warn,projections::runner=info")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // This machine's Postgres runs with `autovacuum = off` (conf.d/90-ci.conf): the soak's
    // updates leave the platform tables' old row versions behind for the replay's upserts
    // to step over, as a production Postgres would not.
    let dead: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relname::text, n_dead_tup FROM pg_stat_user_tables \
         WHERE relname IN ('subscriptions', 'merchant_subscriptions') ORDER BY relname",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let dead_rows = dead
        .iter()
        .map(|(table, n)| format!("{table} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (started, spawned) = (Instant::now(), chrono::Utc::now());
    let child = replay.spawn().unwrap();
    let rss = RssSampler::start(child.id());
    let output = child.wait_with_output().unwrap();
    let replay_time = started.elapsed();
    let replay_rss = rss.finish();
    figures.add(
        "replay: events/s (goal >= 100000)",
        format!(
            "{:.0} ({total} events in {:.1} s, {})",
            total as f64 / replay_time.as_secs_f64(),
            replay_time.as_secs_f64(),
            output.status
        ),
    );
    figures.add(
        "replay: its steps, each ended at (from its start; its own log)",
        replay_steps(
            &String::from_utf8_lossy(&output.stderr),
            spawned,
            replay_time,
        ),
    );
    figures.add(
        "replay: dead rows in the tables it writes, before it (autovacuum off here)",
        dead_rows,
    );
    figures.add("replay: peak RSS", format!("{replay_rss:.1} MiB"));
    delete_keys(&prefix).await;

    // 6. The peer, same signed events, same concurrency.
    if options.peer {
        let peer_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peer");
        recreate_database(PEER_DB).await;
        let peer_port = free_port();
        let mut peer = Command::new("node")
            .arg("server.cjs")
            .arg(peer_port.to_string())
            .arg(format!("{PG_BASE}/{PEER_DB}"))
            .arg(SECRET)
            .current_dir(peer_dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("node runs the peer (./bench/run.sh installs it)");
        let peer_base = format!("http://127.0.0.1:{peer_port}");
        for _ in 0..600 {
            if client.get(&peer_base).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rss = RssSampler::start(peer.id());
        let started = Instant::now();
        let (ok, failed) = send_all(
            &client,
            &format!("{peer_base}/webhooks"),
            bodies.clone(),
            32,
        )
        .await;
        let elapsed = started.elapsed();
        let peer_rss = rss.finish();
        let peer_rate = bodies.len() as f64 / elapsed.as_secs_f64();
        figures.add(
            "peer: stripe-sync-engine events/s (32 connections)",
            format!("{peer_rate:.0} ({} ok, {failed} refused)", ok.len()),
        );
        figures.add(
            "peer: ack latency p50 / p99",
            format!(
                "{:.2} ms / {:.2} ms",
                percentile(&ok, 0.5),
                percentile(&ok, 0.99)
            ),
        );
        figures.add(
            "subledger end-to-end / peer",
            format!("{:.2}", e2e_rate / peer_rate),
        );
        figures.add("peer: peak RSS", format!("{peer_rss:.1} MiB"));
        let _ = peer.kill();
        let _ = peer.wait();
    }

    if options.write {
        write_benchmarks_md(
            &figures,
            &std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        );
    }
}

fn write_benchmarks_md(figures: &Figures, args: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let mut text = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nEach run of `./bench/run.sh` appends a section; older rows are kept.\n"
            .to_owned()
    });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    // Which code was measured: the commit, and whether the tree had changes beside it.
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = if git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        ""
    } else {
        " with uncommitted changes"
    };
    let _ = writeln!(
        text,
        "\n## {} — `./bench/run.sh {args}` (commit {commit}{dirty})\n\nMachine: {cores} cores ({cpu}), {mem} GiB; PostgreSQL and Redis on the same machine; load generator in the same machine.\n\n| figure | value |\n| --- | --- |",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    );
    for (name, value) in &figures.rows {
        let _ = writeln!(text, "| {name} | {value} |");
    }
    std::fs::write(path, text).unwrap();
    println!("appended to BENCHMARKS.md");
}
