//! Building and running the application: the services (Postgres, Redis, catalogue,
//! ledger, projections) and the HTTP server with its background workers.
//!
//! `Application::build` binds the listener (port 0 works, for tests) and
//! `run_until_stopped` serves until the shutdown future resolves, then stops the workers
//! cleanly. Nothing here knows a route or a Stripe field.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use projections::{
    CacheKeys, Catalog, CatchUp, LazyConnection, Member, PlatformTables, ProjectionError,
    Projections, RedisCache, RedisTarget, WhenBusy,
};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use crate::backoff::Backoff;
use crate::billing::Billing;
use crate::config::{Settings, StripeMode};
use crate::db::{self, DbError};
use crate::error_chain::error_chain;
use crate::http::serve::{serve, Limits};
use crate::http::{self, AppState};
use crate::ledger::Ledger;
use crate::notify::send::{Sender, SigningKey};
use crate::notify::Notifier;
use crate::reads::{Reads, PROJECTION_BATCH};
use crate::stripe::client::{StripeApi, StripeApiError};
use crate::sync::Syncer;
use crate::worker::{InboxWorker, Partition, WorkerWake};

/// Inbox inserts in flight at once (each stores every webhook that queued meanwhile): one.
/// Fewer inserts in flight make each store more webhooks, and every insert costs much the
/// same statement, commit and WAL flush whatever it holds: in the benchmark's ingestion
/// (32 connections, 2 cores), 4 inserts in flight stored 4.5 webhooks each and 2 stored 8,
/// for about 10 % less of the machine per delivery; one, against two, took 10 % less of
/// Postgres's CPU per delivery in each of eight alternating runs and 6.7 % less of the
/// machine (BENCHMARKS.md). What it costs: a webhook that arrives while the insert commits
/// waits for that commit and then its own, as it did whenever both of two were busy.
/// The writer runs on a thread of its own with its own connection (`InboxWriter`); with
/// that, two inserts in flight were still no faster than one (three alternating runs).
const INBOX_WRITERS: usize = 1;

/// How often the server checks the account's webhook endpoints (`/readyz` shows the last
/// result). Endpoints change by hand, rarely; each check is one list request.
const ENDPOINT_CHECK_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// Events read per transaction when a replay catches up with what was committed while it
/// rebuilt: larger, since a batch decodes and writes about one event per customer in it
/// however many it reads (`projections::log::read_batch`).
pub const REPLAY_BATCH: i64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Catalog(#[from] projections::CatalogError),
    #[error("REDIS_URL is not a valid Redis URL")]
    Redis(#[from] redis::RedisError),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("SUBLEDGER_NOTIFY_SECRET is not valid")]
    NotifySecret(#[from] crate::notify::send::SecretError),
    #[error("cannot set up the Stripe client")]
    Stripe(#[from] StripeApiError),
}

/// The long-lived parts every command uses.
#[derive(Clone)]
pub struct Services {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    pub cache: RedisCache,
    /// Every read model (the platform tables, then `cache`) and the runner that keeps them.
    pub projections: Projections,
    pub catalog: Arc<Catalog>,
    pub ledger: Ledger,
    /// The read models as the API reads them (Redis first, then Postgres).
    pub reads: Reads,
    /// Drains the inbox through `ledger`.
    pub worker: InboxWorker,
}

impl Services {
    /// Connects to Postgres (creating the database if needed), applies pending
    /// migrations and loads the catalogue. Redis is connected on first use, so a Redis
    /// outage never stops the service from starting.
    pub async fn connect(settings: Settings) -> Result<Self, StartupError> {
        let pool = db::connect(&settings).await?;
        db::migrate(&pool).await?;
        let catalog = Arc::new(match &settings.catalog_path {
            Some(path) => Catalog::load(path)?,
            None => Catalog::default(),
        });
        // Bounded connection attempts and timeouts: an unreachable Redis is an error in
        // seconds, never a hang (requests fall back to Postgres when a command fails). The
        // connection is made on first use, so subledger starts and serves while Redis is
        // down, and the cache projection retries until it is back.
        let target = if settings.redis_cluster {
            let nodes = settings
                .redis_url
                .expose_secret()
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(redis::Client::open)
                .collect::<Result<Vec<_>, _>>()?;
            let client = redis::cluster::ClusterClientBuilder::new(
                nodes.iter().map(|node| node.get_connection_info().clone()),
            )
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .retries(2)
            .max_retry_wait(1000)
            .build()?;
            RedisTarget::Cluster { client, nodes }
        } else {
            RedisTarget::Single {
                client: redis::Client::open(settings.redis_url.expose_secret())?,
                config: redis::aio::ConnectionManagerConfig::new()
                    .set_number_of_retries(2)
                    .set_factor(2)
                    .set_max_delay(1000)
                    .set_connection_timeout(Duration::from_secs(2))
                    .set_response_timeout(Duration::from_secs(5)),
            }
        };
        let redis = LazyConnection::to(target);
        let keys = CacheKeys {
            prefix: settings.redis_prefix.clone(),
        };
        let cache = RedisCache::new(redis, keys, settings.cache_ttl.as_secs(), catalog.clone())
            .with_local_cache(settings.local_cache);
        let platform = PlatformTables::new(catalog.clone());
        // The tables write through the checkpoint's transaction; the cache is applied
        // beside it and never holds the tables back when Redis is down.
        let ledger = Ledger::new(pool.clone(), settings.aggregate_cache);
        let projections = Projections::new(
            pool.clone(),
            [
                Member::transactional(platform.clone()),
                Member::eventual(cache.clone()),
            ],
        )
        .taking_recent(ledger.recent.clone());
        Ok(Self {
            worker: InboxWorker::new(
                pool.clone(),
                ledger.clone(),
                settings.max_attempts,
                settings.stripe_mode,
            )
            .with_stripe(StripeApi::from_settings(&settings)?),
            reads: Reads::new(
                pool.clone(),
                cache.clone(),
                catalog.clone(),
                projections.clone(),
            ),
            ledger,
            projections,
            settings: Arc::new(settings),
            pool,
            cache,
            catalog,
        })
    }

    /// The notifier and its sender, or `None` when no notification endpoint is set.
    pub fn notifications(
        &self,
    ) -> Result<Option<(Notifier, Sender)>, crate::notify::send::SecretError> {
        let settings = &self.settings;
        let Some(secret) = settings.notify_secret.as_ref() else {
            return Ok(None);
        };
        if settings.notify_urls.is_empty() {
            return Ok(None);
        }
        let key = SigningKey::parse(secret.expose_secret())?;
        Ok(Some((
            Notifier::new(
                self.pool.clone(),
                self.catalog.clone(),
                settings.notify_urls.clone(),
            ),
            Sender::new(
                self.pool.clone(),
                key,
                settings.notify_timeout,
                Backoff::doubling(settings.notify_backoff).capped(Duration::from_secs(3600)),
                settings.notify_max_attempts,
            ),
        )))
    }

    /// Brings every projection up to the end of the log. `progress` is called with a
    /// projection's name and the events it has applied so far.
    pub async fn catch_up_projections(
        &self,
        when_busy: WhenBusy,
        progress: impl FnMut(&str, u64) + Send,
    ) -> Result<Vec<CatchUp>, ProjectionError> {
        self.reads.catch_up(when_busy, progress).await
    }

    /// The syncer over these services, or `None` when `STRIPE_SECRET_KEY` is not set.
    pub fn syncer(&self) -> Result<Option<Syncer>, StripeApiError> {
        Syncer::new(
            &self.settings,
            self.pool.clone(),
            self.ledger.clone(),
            self.reads.clone(),
        )
    }

    /// Clears every projection and rebuilds them together from the log; `counted` hears
    /// how many events the log holds (see [`Projections::replay`]).
    pub async fn replay(
        &self,
        counted: impl FnOnce(u64) + Send,
        progress: impl FnMut(&str, u64) + Send,
    ) -> Result<Vec<CatchUp>, ProjectionError> {
        self.projections
            .replay(REPLAY_BATCH, counted, progress)
            .await
    }

    /// Keeps projections caught up until `stop`.
    pub async fn run_projections(self, committed: Arc<Notify>, stop: watch::Receiver<bool>) {
        self.projections
            .run(
                PROJECTION_BATCH,
                committed,
                self.settings.poll_interval,
                stop,
                |error| {
                    tracing::warn!(error = %error_chain(error), "projection catch-up failed; will retry")
                },
            )
            .await
    }
}

pub struct Application {
    services: Services,
    notifications: Option<(Notifier, Sender)>,
    listener: tokio::net::TcpListener,
    port: u16,
    sync: Option<Syncer>,
    limits: Limits,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let listen = settings.listen;
        let services = Services::connect(settings).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| StartupError::Listen(listen, e))?;
        let port = listener
            .local_addr()
            .map_err(|e| StartupError::Listen(listen, e))?
            .port();
        if services.settings.webhook_secrets.is_empty() {
            tracing::warn!(
                "STRIPE_WEBHOOK_SECRET is not set: webhooks will be refused with 500 until it is"
            );
        }
        match services.settings.stripe_mode {
            StripeMode::Both => tracing::warn!(
                "neither SUBLEDGER_STRIPE_MODE nor the key's prefix names a Stripe mode: live and test events are both accepted"
            ),
            mode => tracing::info!(
                mode = mode.as_str(),
                "Stripe mode: events of the other mode are stored and ignored"
            ),
        }
        if services.settings.api_tokens.is_empty() {
            tracing::warn!("SUBLEDGER_API_TOKEN is not set: /v1 refuses every request");
        }
        let sync = services.syncer()?;
        let notifications = services.notifications()?;
        if sync.is_none() {
            tracing::warn!("STRIPE_SECRET_KEY is not set: no sync, checkout, portal or reconciler");
        }
        let open_files = raise_open_file_limit();
        let limits = Limits::for_open_files(
            open_files,
            services.settings.max_connections,
            services.settings.header_timeout,
            services.settings.body_timeout,
        );
        tracing::info!(
            max_connections = limits.max_connections,
            max_waiting = limits.max_waiting,
            max_shedding = limits.max_shedding,
            header_timeout_ms = limits.header_timeout.as_millis() as u64,
            body_timeout_ms = limits.body_timeout.as_millis() as u64,
            "connection limits"
        );
        Ok(Self {
            services,
            notifications,
            listener,
            port,
            sync,
            limits,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish and stops the
    /// workers and projections.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Self {
            services,
            listener,
            sync,
            limits,
            notifications,
            ..
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let inbox_wake = Arc::new(WorkerWake::new(services.settings.workers));
        let mut tasks = Vec::new();
        let workers = services.settings.workers;
        for index in 0..workers {
            tasks.push(tokio::spawn(services.worker.clone().run_worker(
                Partition { index, of: workers },
                inbox_wake.clone(),
                services.settings.poll_interval,
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(services.clone().run_projections(
            services.ledger.committed.clone(),
            stop_rx.clone(),
        )));
        // Outbound notifications: their own task, so an endpoint that fails or hangs
        // never holds ingestion, projections or reads.
        if let Some((notifier, sender)) = notifications {
            tasks.push(tokio::spawn(crate::notify::send::run(
                notifier,
                sender,
                services.projections.applied(),
                services.settings.poll_interval,
                stop_rx.clone(),
            )));
        }
        // The in-process cache serves reads only while it hears every replica's writes.
        {
            let cache = services.cache.clone();
            let stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                cache.listen_for_invalidations(stop).await
            }));
        }
        // Processed payloads past retention, dropped in small batches beside ingestion.
        if let Some(older_than) = services.settings.inbox_retention {
            tasks.push(tokio::spawn(crate::inbox::retention::run_pruner(
                services.pool.clone(),
                older_than,
                stop_rx.clone(),
            )));
        }
        // Rows left pending by a previous run are picked up at once.
        inbox_wake.wake_all();
        // Syncs with Stripe's API (requested by webhooks, retries, the reconciler).
        if let Some(sync) = &sync {
            let sync_wake = Arc::new(Notify::new());
            tasks.push(tokio::spawn(
                sync.clone().run_worker(sync_wake.clone(), stop_rx.clone()),
            ));
            if let Some(interval) = services.settings.reconcile_interval {
                tasks.push(tokio::spawn(sync.clone().run_reconciler(
                    interval,
                    sync_wake,
                    stop_rx.clone(),
                )));
            }
        }

        // Missed-event recovery from Stripe's Events API.
        if let (Some(sync), Some(interval)) = (&sync, services.settings.recovery_interval) {
            let recovery =
                crate::recovery::Recovery::new(sync.api().clone(), services.pool.clone())
                    .waking(inbox_wake.clone());
            tasks.push(tokio::spawn(recovery.run_poller(interval, stop_rx.clone())));
        }
        let endpoint_check = crate::setup::LastCheckCell::default();
        if let Some(api) = sync.as_ref().map(|sync| sync.api().clone()) {
            tasks.push(tokio::spawn(crate::setup::run_checker(
                api,
                ENDPOINT_CHECK_INTERVAL,
                endpoint_check.clone(),
                stop_rx.clone(),
            )));
        }
        let state = AppState::new(http::Shared {
            endpoint_check,
            pool: services.pool.clone(),
            cache: services.cache.clone(),
            projections: services.projections.clone(),
            catalog: services.catalog.clone(),
            reads: services.reads.clone(),
            settings: services.settings.clone(),
            inbox_wake,
            inbox: crate::inbox::InboxWriter::handing_over(
                services.pool.clone(),
                INBOX_WRITERS,
                services.worker.parsed_events(),
            ),
            billing: sync.clone().map(|syncer| {
                Billing::new(
                    syncer,
                    services.ledger.clone(),
                    services.reads.clone(),
                    services.settings.clone(),
                )
            }),
            sync,
        });
        tracing::info!(
            address = %listener.local_addr()?,
            threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "subledger serving"
        );
        let served = serve(listener, http::router(state), limits, shutdown).await;
        stop_tx.send_replace(true);
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        tracing::info!("subledger stopped");
        served
    }
}

/// Raises the soft open-file limit to the hard one, so that the connection budget is as
/// large as the host allows (a service is often started with a soft limit of 1024, or
/// 512, well below its hard limit), and says so in the log. Returns the soft limit now in
/// force (1024 when it cannot be read).
pub fn raise_open_file_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
            return 1024;
        }
        let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
        if soft >= hard {
            tracing::info!(soft, hard, "open-file limit already at the hard limit");
            return soft;
        }
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            tracing::warn!(
                soft,
                hard,
                error = %std::io::Error::last_os_error(),
                "cannot raise the open-file limit; keeping the soft limit"
            );
            return soft;
        }
        tracing::info!(
            from = soft,
            to = hard,
            "raised the soft open-file limit to the hard limit"
        );
        hard
    }
    #[cfg(not(unix))]
    {
        1024
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
