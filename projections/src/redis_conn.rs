//! The connection to Redis, standalone or a Redis Cluster, behind one type: a
//! [`LazyConnection`] made on first use, handing out [`RedisConn`]s.
//!
//! A cluster refuses a command (a script, a pipeline) whose keys live in different hash
//! slots, so nothing here sends one: every write the cache makes touches one key
//! ([`crate::redis_cache`] says which), and a batch of them is sent by
//! [`RedisConn::run`] as one pipeline to a standalone server (one round trip) or as
//! concurrent single-key commands on the multiplexed cluster connection (each routed to
//! its key's node). Commands that name no key are sent where the cluster client routes
//! them: `PUBLISH` to the channel's slot (a cluster broadcasts every message to all its
//! nodes, so a subscriber on any node hears it), `SCRIPT LOAD` to every node. `SCAN`
//! is not routed by the client; [`RedisConn::masters`] names the nodes to run it on.
//!
//! It must never send a command whose keys span slots.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// How long after a failed connection attempt callers get an error at once instead of a new
/// attempt: during an outage a request pays for at most one failed connect per interval.
const CONNECT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What to connect to: one server, or a cluster (given by one or more of its nodes; the
/// client learns the rest from them).
#[derive(Clone)]
pub enum RedisTarget {
    Single {
        client: redis::Client,
        config: ConnectionManagerConfig,
    },
    Cluster {
        client: ClusterClient,
        /// The configured nodes, for the connections the cluster client does not make
        /// (the in-process cache's subscription).
        nodes: Vec<redis::Client>,
    },
}

/// A connection to Redis: a standalone server's (reconnecting by itself) or a cluster's
/// (one multiplexed connection per node, following the slots as they move). Cheap to clone.
// Cloned for each use, as the `ConnectionManager` alone was before: boxing the large
// variant would add an allocation to every clone.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    /// A pipeline: on a cluster, every command in it must name keys of one slot (the
    /// client sends it to the first keyed command's node).
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

impl RedisConn {
    /// Runs `cmds`, each on one key and in no particular order among themselves, then
    /// `after` (which must see every one of them done: the invalidation message), and
    /// returns the answers to `cmds`. `scripts` are the sources of the scripts `cmds` call
    /// by hash (`EVALSHA`): they are loaded first (standalone) or when a node says it lacks
    /// one (cluster), so a server that restarted since is no error.
    ///
    /// Standalone: one pipeline, one round trip. Cluster: every command at once, each to
    /// its key's node, then `after`.
    pub async fn run(
        &mut self,
        scripts: &[&str],
        cmds: Vec<Cmd>,
        after: Vec<Cmd>,
    ) -> RedisResult<Vec<Value>> {
        self.run_each(scripts, cmds, after)
            .await?
            .into_iter()
            .collect()
    }

    /// [`RedisConn::run`], answering each command's own result where it is known: on a
    /// cluster one node may fail while the others do their part, and the caller must know
    /// which writes were done. `after` is sent only when every command succeeded. An
    /// error overall: what was done is not known (a standalone pipeline failed).
    pub async fn run_each(
        &mut self,
        scripts: &[&str],
        cmds: Vec<Cmd>,
        after: Vec<Cmd>,
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        match self {
            RedisConn::Single(conn) => {
                let mut pipe = redis::pipe();
                for script in scripts {
                    pipe.cmd("SCRIPT").arg("LOAD").arg(*script).ignore();
                }
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                for cmd in after {
                    pipe.add_command(cmd).ignore();
                }
                let answers: Vec<Value> = pipe.query_async(conn).await?;
                Ok(answers.into_iter().map(Ok).collect())
            }
            RedisConn::Cluster(conn) => {
                let mut answers = Self::each(conn, &cmds).await;
                let missing_script = answers.iter().any(|answer| {
                    matches!(answer, Err(error) if error.kind() == ErrorKind::NoScriptError)
                });
                if missing_script {
                    // `SCRIPT LOAD` goes to every node of the cluster.
                    for script in scripts {
                        let _: String = redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(*script)
                            .query_async(conn)
                            .await?;
                    }
                    let again: Vec<Cmd> = cmds
                        .iter()
                        .zip(&answers)
                        .filter(|(_, answer)| answer.is_err())
                        .map(|(cmd, _)| cmd.clone())
                        .collect();
                    let mut retried = Self::each(conn, &again).await.into_iter();
                    for answer in answers.iter_mut().filter(|answer| answer.is_err()) {
                        if let Some(retry) = retried.next() {
                            *answer = retry;
                        }
                    }
                }
                if answers.iter().all(|answer| answer.is_ok()) {
                    for answer in Self::each(conn, &after).await {
                        answer?;
                    }
                }
                Ok(answers)
            }
        }
    }

    /// Every command at once on the cluster connection; the answers in their order.
    async fn each(conn: &ClusterConnection, cmds: &[Cmd]) -> Vec<RedisResult<Value>> {
        futures_util::future::join_all(cmds.iter().map(|cmd| {
            let mut conn = conn.clone();
            async move { cmd.query_async::<Value>(&mut conn).await }
        }))
        .await
    }

    /// The connections a command that the cluster client does not route (`SCAN`) must
    /// be run on, one per master node; for a standalone server, itself.
    pub async fn masters(&mut self) -> RedisResult<Vec<NodeConn>> {
        let RedisConn::Cluster(conn) = self else {
            return Ok(vec![NodeConn {
                conn: self.clone(),
                address: None,
            }]);
        };
        // `CLUSTER NODES`: one line a node, `<id> <ip:port@cport[,hostname]> <flags> …`.
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
        let mut masters = Vec::new();
        for line in nodes.lines() {
            let mut fields = line.split_whitespace();
            let (Some(_id), Some(address), Some(flags)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.contains(&"fail") {
                continue;
            }
            let address = address.split(['@', ',']).next().unwrap_or_default();
            let Some((host, port)) = address.rsplit_once(':') else {
                continue;
            };
            let Ok(port) = port.parse() else { continue };
            masters.push(NodeConn {
                conn: RedisConn::Cluster(conn.clone()),
                address: Some((host.to_owned(), port)),
            });
        }
        if masters.is_empty() {
            return Err(RedisError::from((
                ErrorKind::ClusterDown,
                "CLUSTER NODES named no master",
            )));
        }
        Ok(masters)
    }
}

/// One node of a cluster (through the cluster connection), or the standalone server: for
/// the commands that are about a node rather than a key (`SCAN`).
#[derive(Clone)]
pub struct NodeConn {
    conn: RedisConn,
    /// The node's address; `None`: the standalone server.
    address: Option<(String, u16)>,
}

impl NodeConn {
    fn routing(&self) -> Option<SingleNodeRoutingInfo> {
        self.address
            .as_ref()
            .map(|(host, port)| SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            })
    }
}

impl ConnectionLike for NodeConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match (self.routing(), &mut self.conn) {
            (Some(route), RedisConn::Cluster(conn)) => {
                Box::pin(conn.route_command(cmd, RoutingInfo::SingleNode(route)))
            }
            (_, conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match (self.routing(), &mut self.conn) {
            (Some(route), RedisConn::Cluster(conn)) => {
                Box::pin(conn.route_pipeline(cmd, offset, count, route))
            }
            (_, conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// A Redis connection made on first use. Until one succeeds every use tries again (at most
/// once per [`CONNECT_RETRY_AFTER`]); once made, it reconnects by itself after Redis goes
/// away and comes back (the `ConnectionManager`, or the cluster client per node).
#[derive(Clone)]
pub struct LazyConnection {
    target: RedisTarget,
    conn: Arc<tokio::sync::OnceCell<RedisConn>>,
    failed_at: Arc<Mutex<Option<Instant>>>,
}

impl LazyConnection {
    /// A standalone server.
    pub fn new(client: redis::Client, config: ConnectionManagerConfig) -> Self {
        Self::to(RedisTarget::Single { client, config })
    }

    pub fn to(target: RedisTarget) -> Self {
        Self {
            target,
            conn: Arc::new(tokio::sync::OnceCell::new()),
            failed_at: Arc::new(Mutex::new(None)),
        }
    }

    /// Clients of the servers a subscription may be made on, to try in turn: the
    /// standalone server, or each configured node of a cluster.
    pub fn subscribers(&self) -> Vec<redis::Client> {
        match &self.target {
            RedisTarget::Single { client, .. } => vec![client.clone()],
            RedisTarget::Cluster { nodes, .. } => nodes.clone(),
        }
    }

    /// The connection, connecting first if there is none yet.
    pub async fn get(&self) -> Result<RedisConn, RedisError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        let recently_failed = self
            .failed_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some_and(|at| at.elapsed() < CONNECT_RETRY_AFTER);
        if recently_failed {
            return Err(RedisError::from((
                ErrorKind::IoError,
                "Redis is unreachable (the last connection attempt failed)",
            )));
        }
        let made = self
            .conn
            .get_or_try_init(|| async {
                match &self.target {
                    RedisTarget::Single { client, config } => {
                        ConnectionManager::new_with_config(client.clone(), config.clone())
                            .await
                            .map(RedisConn::Single)
                    }
                    RedisTarget::Cluster { client, .. } => {
                        client.get_async_connection().await.map(RedisConn::Cluster)
                    }
                }
            })
            .await;
        match made {
            Ok(conn) => Ok(conn.clone()),
            Err(error) => {
                *self
                    .failed_at
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
                Err(error)
            }
        }
    }
}
