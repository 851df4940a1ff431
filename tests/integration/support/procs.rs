//! Real processes for fault tests: `subledger serve` (its JSON logs captured to a file, so
//! tests can read what it said and check it never said a secret), a throwaway Redis and a
//! throwaway Postgres cluster on free ports that a test can stop and start again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::Value;
use subledger::Settings;

use crate::support::helpers::{SECRET, TOKEN};
use crate::support::stripe_sim::sign;

/// Secrets the processes are given, which must never show in a log line or a body.
pub const ADMIN_TOKEN: &str = "admin-tok-9f8e7d6c5b4a";
pub const ORG_TOKENS: &str = "orgtok-aaaa1111=org_a,orgtok-bbbb2222=org_b";
pub const DB_PASSWORD: &str = "pg-pass-0e1d2c3b";
pub const STRIPE_KEY: &str = "sk_test_51NeverLogMe0a9b8c7d";

/// A free TCP port on 127.0.0.1 (free when asked; good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch directory named after `tag`, emptied.
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "subledger-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `subledger serve` with every secret set, on port 0, logging JSON at info.
pub fn serve_command(settings: &Settings) -> Command {
    let mut command = subledger_command(settings);
    command.arg("serve");
    command
}

/// The `subledger` binary configured like `settings`, with every secret set.
pub fn subledger_command(settings: &Settings) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_subledger"));
    command
        .env("DATABASE_URL", settings.database_url.expose_secret())
        .env("REDIS_URL", settings.redis_url.expose_secret())
        .env("SUBLEDGER_REDIS_PREFIX", &settings.redis_prefix)
        .env("SUBLEDGER_CATALOG", settings.catalog_path.as_ref().unwrap())
        .env("SUBLEDGER_API_TOKEN", TOKEN)
        .env("SUBLEDGER_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SUBLEDGER_ORG_TOKENS", ORG_TOKENS)
        .env("STRIPE_WEBHOOK_SECRET", SECRET)
        .env("STRIPE_API_BASE", &settings.stripe_api_base)
        .env("SUBLEDGER_LISTEN", "127.0.0.1:0")
        .env("SUBLEDGER_POLL_MS", "50")
        .env("SUBLEDGER_MAX_ATTEMPTS", settings.max_attempts.to_string())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info,sqlx=warn")
        .stdin(Stdio::null());
    command
}

/// A running `subledger serve`.
pub struct Served {
    child: Child,
    pub address: String,
}

impl Served {
    /// Starts the command, appending its stderr (the log) to `log`, and waits until it
    /// says where it listens.
    pub async fn start(mut command: Command, log: &Path) -> Served {
        let before = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0) as usize;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        let mut served = Served {
            child,
            address: String::new(),
        };
        for _ in 0..1200 {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let address = text.get(before..).unwrap_or("").lines().find_map(|line| {
                let line: Value = serde_json::from_str(line).ok()?;
                (line["fields"]["message"] == "subledger serving")
                    .then(|| line["fields"]["address"].as_str().map(str::to_owned))?
            });
            if let Some(address) = address {
                served.address = format!("http://{address}");
                return served;
            }
            if let Some(status) = served.child.try_wait().unwrap() {
                panic!("serve exited with {status}: {}", &text[before..]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "serve did not start: {}",
            std::fs::read_to_string(log).unwrap()
        );
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no clean-up of any kind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Posts a signed event; the status, or `None` when no answer came (refused, reset).
pub async fn post_event(client: &reqwest::Client, address: &str, body: &[u8]) -> Option<u16> {
    let header = sign(SECRET, chrono::Utc::now().timestamp(), body);
    client
        .post(format!("{address}/webhooks/stripe"))
        .header("stripe-signature", header)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Posts every body, `limit` at a time, each to `addresses[i % n]`; returns the indexes
/// of the bodies that were acknowledged (2xx).
pub async fn post_all(addresses: &[String], bodies: &[Vec<u8>], limit: usize) -> Vec<usize> {
    let client = reqwest::Client::new();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(limit));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, body) in bodies.iter().enumerate() {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let (client, body) = (client.clone(), body.clone());
        let address = addresses[i % addresses.len()].clone();
        tasks.spawn(async move {
            let _permit = permit;
            (i, post_event(&client, &address, &body).await)
        });
    }
    let mut acked = Vec::new();
    while let Some(result) = tasks.join_next().await {
        if let (i, Some(200)) = result.unwrap() {
            acked.push(i);
        }
    }
    acked.sort();
    acked
}

/// The API's answer for each customer, without `version` (it counts events applied, which
/// depends on delivery order).
pub async fn answers(address: &str, customers: &[String]) -> BTreeMap<String, Value> {
    let client = reqwest::Client::new();
    let mut out = BTreeMap::new();
    for customer in customers {
        let response = client
            .get(format!("{address}/v1/customers/{customer}/subscription"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{customer}");
        let mut info: Value = response.json().await.unwrap();
        info.as_object_mut().unwrap().remove("version");
        out.insert(customer.clone(), info);
    }
    out
}

/// Sends a request and decodes its JSON answer.
pub async fn send_json(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// Every secret a process was given.
pub fn secrets() -> Vec<&'static str> {
    let mut all = vec![SECRET, TOKEN, ADMIN_TOKEN, DB_PASSWORD, STRIPE_KEY];
    all.extend(
        ORG_TOKENS
            .split(',')
            .map(|pair| pair.split('=').next().unwrap()),
    );
    all
}

/// Fails when any secret appears in `text`.
pub fn assert_no_secret(what: &str, text: &str) {
    for secret in secrets() {
        assert!(
            !text.contains(secret),
            "{what} contains a secret ({} chars in)",
            text.find(secret).unwrap()
        );
    }
}

/// Runs a command as the `postgres` user (initdb and postgres refuse root).
fn as_postgres(program: &str, args: &[&str]) -> std::process::Output {
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--", program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn pg_bin(name: &str) -> String {
    let versions = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            let mut v: Vec<_> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    versions
        .last()
        .map(|v| v.join("bin").join(name).display().to_string())
        .unwrap_or_else(|| name.to_owned())
}

/// A Postgres cluster of its own (initdb, trust auth) on a free port.
pub struct ThrowawayPostgres {
    dir: PathBuf,
    pub port: u16,
}

impl ThrowawayPostgres {
    pub fn create() -> Self {
        let dir = scratch("pg");
        let data = dir.join("data");
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        as_postgres(
            &pg_bin("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        let pg = Self {
            dir,
            port: free_port(),
        };
        pg.start();
        pg
    }

    /// A URL for `database` on this cluster, with a password it ignores (trust auth), so
    /// tests can check the password never leaks.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{DB_PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    pub fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        as_postgres(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-o",
                &options,
                "-l",
                self.dir.join("log").to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops it at once (as a crash would: no checkpoint, connections cut).
    pub fn stop(&self) {
        as_postgres(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &pg_bin("pg_ctl")])
            .args([
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis server of its own on a free port, with a password.
pub struct ThrowawayRedis {
    child: Option<Child>,
    pub port: u16,
    password: &'static str,
}

impl ThrowawayRedis {
    pub fn start(password: &'static str) -> Self {
        let mut redis = Self {
            child: None,
            port: free_port(),
            password,
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://:{}@127.0.0.1:{}", self.password, self.port)
    }

    /// (Re)starts it empty on the same port and waits until it answers.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                self.password,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..600 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on {}", self.port);
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of its own: three masters on free loopback ports (each with its
/// cluster bus port, +10000, free too), with a password, its nodes' files in a scratch
/// directory. Made stopped: [`ThrowawayRedisCluster::start`] starts the nodes and forms
/// the cluster (the first time) or lets them find each other again (their nodes.conf).
pub struct ThrowawayRedisCluster {
    dir: PathBuf,
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    password: &'static str,
    formed: bool,
}

impl ThrowawayRedisCluster {
    pub fn new(password: &'static str) -> Self {
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let port = free_port();
            let bus_free =
                port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok();
            if bus_free && !ports.contains(&port) {
                ports.push(port);
            }
        }
        Self {
            dir: scratch("redis-cluster"),
            children: ports.iter().map(|_| None).collect(),
            ports,
            password,
            formed: false,
        }
    }

    /// The nodes as `REDIS_URL` names them in cluster mode.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("redis://:{}@127.0.0.1:{port}", self.password))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-a", self.password, "--no-auth-warning"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts node `i` (empty; it keeps its nodes.conf) and waits until it answers.
    pub fn start_node(&mut self, i: usize) {
        let port = self.ports[i];
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "5000"])
            .args(["--save", "", "--appendonly", "no"])
            .args([
                "--requirepass",
                self.password,
                "--masterauth",
                self.password,
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
        for _ in 0..600 {
            if self.cli(port, &["ping"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on {port}");
    }

    /// SIGKILL of node `i`.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts every node that is not running, forms the cluster the first time, and
    /// waits until every node sees it whole.
    pub fn start(&mut self) {
        for i in 0..self.ports.len() {
            if self.children[i].is_none() {
                self.start_node(i);
            }
        }
        if !self.formed {
            let nodes: Vec<String> = self
                .ports
                .iter()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect();
            let out = Command::new("redis-cli")
                .args([
                    "-a",
                    self.password,
                    "--no-auth-warning",
                    "--cluster",
                    "create",
                ])
                .args(&nodes)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            self.formed = true;
        }
        self.wait_ok();
    }

    /// Waits until every node says `cluster_state:ok` and knows every node.
    pub fn wait_ok(&self) {
        for _ in 0..600 {
            let whole = self.ports.iter().all(|port| {
                let info = self.cli(*port, &["cluster", "info"]);
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{}", self.ports.len()))
            });
            if whole {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the throwaway cluster never came up whole");
    }

    /// Which node holds `key` (the index of its port).
    pub fn node_of(&self, key: &str) -> usize {
        let slot: u16 = self
            .cli(self.ports[0], &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        let slots = self.cli(self.ports[0], &["cluster", "nodes"]);
        for line in slots.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port: u16 = fields[1]
                .split(['@', ','])
                .next()
                .and_then(|address| address.rsplit_once(':'))
                .and_then(|(_, port)| port.parse().ok())
                .unwrap();
            let holds = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((from, to)) => {
                    (from.parse::<u16>().unwrap()..=to.parse().unwrap()).contains(&slot)
                }
                None => range.parse::<u16>().ok() == Some(slot),
            });
            if holds {
                return self.ports.iter().position(|p| *p == port).unwrap();
            }
        }
        panic!("no node holds slot {slot}");
    }
}

impl Drop for ThrowawayRedisCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill_node(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
