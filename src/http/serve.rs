//! Serving connections: the accept loop, with the limits that keep slow or numerous clients
//! from starving the webhook (issue 15).
//!
//! - **Header read timeout** ([`Limits::header_timeout`]): hyper closes a connection that
//!   has not sent a whole request head in time. hyper also runs it while a kept-alive
//!   connection waits for its next request, so it bounds idle connections too.
//! - **Body read timeout** ([`Limits::body_timeout`]): a request body must have arrived
//!   whole within it of the head ([`DeadlineBody`], which `layers::Observe` puts
//!   around every request body); a body trickled byte by byte is cut
//!   and answered 408, and the connection closed. (tower-http's body timeout resets at
//!   each chunk, which a trickle defeats.)
//! - **A bound on connections** ([`Limits::max_connections`]), below the open-file limit
//!   so that Postgres, Redis and the log always have descriptors. A connection beyond the
//!   bound waits its turn (first come, first served) for at most the longest a slow client
//!   can hold a place (the two timeouts), so a well-behaved client is served as soon as a
//!   slow one is cut; when even the waiting places ([`Limits::max_waiting`]) are taken, or
//!   the wait runs out, it is answered `503` with `Retry-After` (Stripe retries). (Closing
//!   the slowest reader to make room was tried and dropped: slow clients that renew at
//!   once then only churn, closing each other, and crowd the waiting places more.)
//!
//! Shutdown stops accepting, lets every request in flight finish and closes idle
//! connections (hyper's graceful shutdown). This module must never hold a connection
//! without a deadline, and never accept one it has no descriptor budget for.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics::{self, ConnectionState};

/// File descriptors kept out of the connection budget: Postgres's pool, Redis, the log,
/// the Stripe client's connections, and what the runtime itself opens.
pub const FD_RESERVE: u64 = 128;

/// How long a shed connection is given to read its `503` before it is closed.
const SHED_LINGER: Duration = Duration::from_millis(500);

/// How long the accept loop waits after an error other than a client's (running out of
/// descriptors, most likely) before it accepts again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The longest shutdown waits for connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The answer a connection gets when there is no room for it.
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    content-type: application/json\r\n\
    retry-after: 1\r\n\
    connection: close\r\n\
    content-length: 99\r\n\r\n\
    {\"error\":{\"code\":\"overloaded\",\"message\":\"too many connections; retry after the Retry-After delay\"}}";

/// The limits the server runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A request head must arrive whole within this (also: how long a kept-alive
    /// connection may wait idle for its next request).
    pub header_timeout: Duration,
    /// A request body must arrive whole within this of its head.
    pub body_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections accepted beyond `max_connections`, waiting their turn (and then shed,
    /// if it does not come).
    pub max_waiting: usize,
    /// Connections being answered 503 at once, beyond the waiting ones. Past these, a
    /// connection is closed without an answer: there is no descriptor budget left for one.
    pub max_shedding: usize,
}

impl Limits {
    /// The limits for `open_files` descriptors: [`FD_RESERVE`] kept aside, four fifths of
    /// the rest served at once, and of the last fifth three quarters waiting and a quarter
    /// for answering 503. `max_connections` overrides the served share (the other two are
    /// then sized as if it were four fifths).
    pub fn for_open_files(
        open_files: u64,
        max_connections: Option<usize>,
        header_timeout: Duration,
        body_timeout: Duration,
    ) -> Self {
        let budget = open_files.saturating_sub(FD_RESERVE).max(10) as usize;
        let max_connections = max_connections.unwrap_or(budget * 4 / 5).max(1);
        let rest = (max_connections / 4).max(2);
        let max_shedding = (rest / 4).max(1);
        Self {
            header_timeout,
            body_timeout,
            max_connections,
            max_waiting: rest - max_shedding,
            max_shedding,
        }
    }

    /// The longest a slow client can hold a connection's place: a newcomer waits at most
    /// this for one to free.
    fn queue_wait(&self) -> Duration {
        self.header_timeout + self.body_timeout + Duration::from_secs(1)
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves, then lets the
/// requests in flight finish (at most [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let serving = Arc::new(Semaphore::new(limits.max_connections));
    let waiting = Arc::new(Semaphore::new(limits.max_waiting));
    let shedding = Arc::new(Semaphore::new(limits.max_shedding));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of descriptors, most likely: the reserve is what keeps the rest
                    // of the service working meanwhile.
                    tracing::warn!(%error, "cannot accept a connection; retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            router: router.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
        };
        if let Ok(place) = serving.clone().try_acquire_owned() {
            tokio::spawn(connection.serve(stream, place));
        } else if let Ok(wait) = waiting.clone().try_acquire_owned() {
            let serving = serving.clone();
            let queue_wait = limits.queue_wait();
            tokio::spawn(async move {
                metrics::http_connections(ConnectionState::Waiting, 1);
                // Fair: places go to the waiting connections in their order of arrival.
                let place = tokio::time::timeout(queue_wait, serving.acquire_owned()).await;
                metrics::http_connections(ConnectionState::Waiting, -1);
                match place {
                    Ok(Ok(place)) => {
                        drop(wait);
                        connection.serve(stream, place).await
                    }
                    _ => shed(stream, wait).await,
                }
            });
        } else if let Ok(budget) = shedding.clone().try_acquire_owned() {
            tokio::spawn(shed(stream, budget));
        } else {
            // Not even a 503 can be afforded: closed at once.
            metrics::http_connection_shed();
            drop(stream);
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
    Ok(())
}

/// Errors of one client's connection attempt, not of the listener.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// What serving one connection needs.
struct Connection {
    router: Router,
    builder: Arc<hyper::server::conn::http1::Builder>,
    watcher: Watcher,
}

impl Connection {
    /// Serves HTTP/1 requests on `stream` until it closes, holding `place` meanwhile.
    async fn serve(self, stream: TcpStream, place: OwnedSemaphorePermit) {
        let Self {
            router,
            builder,
            watcher,
        } = self;
        metrics::http_connections(ConnectionState::Open, 1);
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut router = router.clone();
            tower_service::Service::call(&mut router, request.map(Body::new))
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        if let Err(error) = watcher.watch(connection).await {
            if error.is_timeout() {
                metrics::http_read_timeout(metrics::ReadTimeout::Header);
            }
            tracing::debug!(%error, "connection ended with an error");
        }
        metrics::http_connections(ConnectionState::Open, -1);
        drop(place);
    }
}

/// Answers `503` with `Retry-After` and closes, holding `budget` (a descriptor's worth)
/// meanwhile. The client is given [`SHED_LINGER`] to read the answer while what it sent
/// is read and dropped, so that closing does not reset the connection before the answer
/// arrives.
async fn shed(mut stream: TcpStream, budget: OwnedSemaphorePermit) {
    metrics::http_connection_shed();
    let _ = tokio::time::timeout(SHED_LINGER, async {
        stream.write_all(SHED_RESPONSE).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut sink) {
                Ok(0) => return Ok::<_, std::io::Error>(()),
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
    })
    .await;
    drop(budget);
}

/// A request body that fails once its deadline passes (`layers::Observe` wraps every
/// request body in one).
pub(super) struct DeadlineBody {
    inner: Body,
    deadline: Instant,
    /// Made on the first poll that has to wait.
    sleep: Option<std::pin::Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl DeadlineBody {
    /// `inner`, cut at `deadline`; `timed_out` is set when it is.
    pub(super) fn new(inner: Body, deadline: Instant, timed_out: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            deadline,
            sleep: None,
            timed_out,
        }
    }
}

/// The request body did not arrive within `SUBLEDGER_BODY_TIMEOUT_MS`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut;

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyTimedOut.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_descriptors_in_reserve() {
        let (h, b) = (Duration::from_secs(5), Duration::from_secs(10));
        let limits = Limits::for_open_files(512, None, h, b);
        let shares = |l: Limits| (l.max_connections, l.max_waiting, l.max_shedding);
        assert_eq!(shares(limits), (307, 57, 19));
        let used = limits.max_connections + limits.max_waiting + limits.max_shedding;
        assert!(used as u64 + FD_RESERVE <= 512);
        assert_eq!(
            shares(Limits::for_open_files(256, None, h, b)),
            (102, 19, 6)
        );
        // The benchmark's 32 ingest and 50 read connections fit under any usual limit.
        assert!(Limits::for_open_files(1024, None, h, b).max_connections >= 50);
        assert_eq!(
            shares(Limits::for_open_files(512, Some(40), h, b)),
            (40, 8, 2)
        );
        assert!(Limits::for_open_files(0, None, h, b).max_connections >= 1);
        assert_eq!(limits.queue_wait(), Duration::from_secs(16));
        assert_eq!(
            SHED_RESPONSE.len()
                - SHED_RESPONSE
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .unwrap()
                - 4,
            99,
            "content-length matches the body"
        );
    }
}
