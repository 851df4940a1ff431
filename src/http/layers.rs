//! The layers requests pass through, written as tower services rather than with axum's
//! `middleware::from_fn`: for every request, a `from_fn` layer clones the route it wraps
//! (a boxed service), boxes it again for `Next` and boxes its own future, and a read went
//! through three of them. These call the route they wrap directly (which is always ready)
//! and add no allocation of their own (BENCHMARKS.md, 2026-12-02).
//!
//! - [`Observe`], around every route: the request's latency by matched route
//!   (`crate::metrics::http_request`; a request that matched none is counted under
//!   [`UNMATCHED`]), and the body deadline ([`super::serve::DeadlineBody`]): a body that
//!   has not arrived whole within `SUBLEDGER_BODY_TIMEOUT_MS` of the head is cut, and the
//!   request answered 408 with `Connection: close`. A request without a body is not
//!   wrapped.
//! - [`Guard`], around a group of routes: a check that decides from the request alone,
//!   before the handler runs, whether it may go on (`auth::reader` for `/v1`,
//!   `auth::admin` for `/ops`, `admin::guard` for the admin page); a refusal is answered
//!   at once.
//!
//! Like the metrics, observing must never change an answer other than the body
//! deadline's 408.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::serve::DeadlineBody;
use super::{ApiError, AppState};
use crate::metrics;

/// The route label of requests that matched no route, so that a scan of random paths
/// cannot create unbounded series.
const UNMATCHED: &str = "unmatched";

/// [`Observe`] for every route of a router.
#[derive(Clone, Copy)]
pub struct ObserveLayer {
    pub body_timeout: Duration,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            body_timeout: self.body_timeout,
        }
    }
}

/// Times a request by its matched route and holds its body to the body deadline.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    body_timeout: Duration,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use http_body::Body as _;
        let started = Instant::now();
        let route = request.extensions().get::<MatchedPath>().cloned();
        let method = request.method().clone();
        let (request, timed_out) = if request.body().is_end_stream() {
            (request, None)
        } else {
            let timed_out = Arc::new(AtomicBool::new(false));
            let (parts, body) = request.into_parts();
            let body = Body::new(DeadlineBody::new(
                body,
                tokio::time::Instant::now() + self.body_timeout,
                timed_out.clone(),
            ));
            (Request::from_parts(parts, body), Some(timed_out))
        };
        Observed {
            inner: self.inner.call(request),
            started,
            route,
            method,
            timed_out,
            body_timeout: self.body_timeout,
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of a request [`Observe`] watches.
    pub struct Observed<F> {
        #[pin]
        inner: F,
        started: Instant,
        route: Option<MatchedPath>,
        method: Method,
        // Set when the body deadline passed while the handler read the body.
        timed_out: Option<Arc<AtomicBool>>,
        body_timeout: Duration,
    }
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = std::task::ready!(this.inner.poll(cx));
        if this
            .timed_out
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
        {
            metrics::http_read_timeout(metrics::ReadTimeout::Body);
            response = ApiError::BodyTimeout(*this.body_timeout).into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            debug_assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        }
        metrics::http_request(
            this.method.as_str(),
            this.route.as_ref().map_or(UNMATCHED, MatchedPath::as_str),
            response.status().as_str(),
            this.started.elapsed(),
        );
        Poll::Ready(Ok(response))
    }
}

/// Decides from the request alone whether it may reach the routes behind a [`Guard`].
pub type Check = fn(&AppState, Request) -> Verdict;

/// What a [`Check`] decided.
pub enum Verdict {
    /// The request goes on to its route.
    Pass(Request),
    /// The request is answered with this instead.
    Answer(Response),
}

impl From<Result<Request, ApiError>> for Verdict {
    fn from(checked: Result<Request, ApiError>) -> Self {
        match checked {
            Ok(request) => Verdict::Pass(request),
            Err(error) => Verdict::Answer(error.into_response()),
        }
    }
}

/// [`Guard`] for the routes of a router (`route_layer`, so that a path no route matches
/// is still a 404, not a 401).
#[derive(Clone)]
pub struct GuardLayer {
    state: AppState,
    check: Check,
}

impl GuardLayer {
    pub fn new(state: AppState, check: Check) -> Self {
        Self { state, check }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            state: self.state.clone(),
            check: self.check,
        }
    }
}

/// Lets a request through to the route it wraps only if its check passes; otherwise
/// answers the check's error.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    state: AppState,
    check: Check,
}

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Guarded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match (self.check)(&self.state, request) {
            Verdict::Pass(request) => Guarded::Passed {
                inner: self.inner.call(request),
            },
            Verdict::Answer(response) => Guarded::Refused {
                response: Some(response),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of a request a [`Guard`] checked: the route's, or the refusal.
    #[project = GuardedProjection]
    pub enum Guarded<F> {
        Passed { #[pin] inner: F },
        Refused { response: Option<Response> },
    }
}

impl<F> Future for Guarded<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GuardedProjection::Passed { inner } => inner.poll(cx),
            GuardedProjection::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after it was ready")))
            }
        }
    }
}
