//! A fake of Stripe's API for the tests: an axum server on port 0 implementing the calls
//! subledger makes (customers, subscriptions list/retrieve, checkout sessions, billing
//! portal sessions) with Stripe's JSON shapes (basil: the period on the items) and error
//! format. It records every request's idempotency key, answers a repeated key with the
//! first answer (as Stripe does), can fail or delay the next requests to a path, and
//! builds the webhook events Stripe would send for what it changes, for the test to sign
//! and deliver whenever it wants.
//!
//! Test-only. Stripe is faked here, at its HTTP boundary, and nowhere else.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// What to do to the next request on a path.
#[derive(Debug, Clone)]
pub enum Injection {
    /// Answer with this status and Stripe's error body.
    Status(u16),
    /// Answer normally after this long.
    Delay(Duration),
}

#[derive(Default)]
struct Inner {
    seq: u64,
    customers: BTreeMap<String, Value>,
    subscriptions: BTreeMap<String, Value>,
    sessions: BTreeMap<String, Value>,
    portal_sessions: Vec<Value>,
    /// Every snapshot event made, oldest first, with whether its delivery succeeded (all
    /// `false`: the fake delivers nothing itself).
    events: Vec<Value>,
    /// Webhook endpoints, in creation order.
    endpoints: Vec<Value>,
    /// Customer → the lookup keys of its active entitlements.
    entitlements: BTreeMap<String, Vec<String>>,
    /// Idempotency key → the answer first given for it.
    idempotent: HashMap<String, (u16, Value)>,
    /// Every (method, path, idempotency key) seen, in order.
    requests: Vec<(String, String, Option<String>)>,
    /// The `Stripe-Account` header of each request, in the same order.
    accounts: Vec<Option<String>>,
    /// Path prefix → what to do to its next requests.
    injections: Vec<(String, VecDeque<Injection>)>,
    /// Path prefix → fail every request with this status until cleared.
    failing: Vec<(String, u16)>,
    /// Seconds Stripe's clock (the `Date` header of every answer) is ahead of ours.
    clock_offset: i64,
    /// Customer → the connected account it lives in (Connect). Such a customer, and its
    /// subscriptions, sessions and entitlements, are found only by a request made for that
    /// account (`Stripe-Account`), and the platform's own customers only without one, as
    /// Stripe scopes every object to its account
    /// (https://docs.stripe.com/connect/authentication#stripe-account-header).
    account_of: BTreeMap<String, String>,
}

/// The `Stripe-Account` header of a request.
fn account_header(headers: &HeaderMap) -> Option<String> {
    headers
        .get("stripe-account")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Whether a request made for `account` (`None`: the platform) sees `customer`'s objects.
fn in_scope(inner: &Inner, customer: Option<&str>, account: Option<&str>) -> bool {
    customer
        .and_then(|c| inner.account_of.get(c))
        .map(String::as_str)
        == account
}

#[derive(Clone)]
pub struct FakeStripe {
    pub base_url: String,
    inner: Arc<Mutex<Inner>>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl FakeStripe {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/v1/customers", post(create_customer))
            .route("/v1/subscriptions", get(list_subscriptions))
            .route("/v1/subscriptions/:id", get(retrieve_subscription))
            .route("/v1/checkout/sessions", post(create_session))
            .route("/v1/checkout/sessions/:id", get(retrieve_session))
            .route("/v1/billing_portal/sessions", post(create_portal_session))
            .route("/v1/events", get(list_events))
            .route(
                "/v1/webhook_endpoints",
                get(list_endpoints).post(create_endpoint),
            )
            .route(
                "/v1/entitlements/active_entitlements",
                get(list_active_entitlements),
            )
            .layer(axum::middleware::map_response_with_state(
                inner.clone(),
                stripe_date,
            ))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base_url, inner }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Stripe's clock runs `seconds` ahead of ours (behind, if negative): the `Date` header
    /// of every answer says so.
    pub fn set_clock_offset(&self, seconds: i64) {
        self.lock().clock_offset = seconds;
    }

    /// The next requests to `path_prefix` get these treatments, in order.
    pub fn inject(&self, path_prefix: &str, injections: Vec<Injection>) {
        self.lock()
            .injections
            .push((path_prefix.to_owned(), injections.into()));
    }

    /// The customer (and so its subscriptions) lives in the connected `account`: only a
    /// request made for that account finds it.
    pub fn connect(&self, customer_id: &str, account: &str) {
        self.lock()
            .account_of
            .insert(customer_id.to_owned(), account.to_owned());
    }

    /// Sets a customer's active Stripe Entitlements (their features' lookup keys).
    pub fn set_entitlements(&self, customer_id: &str, lookup_keys: &[&str]) {
        self.lock().entitlements.insert(
            customer_id.to_owned(),
            lookup_keys.iter().map(|k| k.to_string()).collect(),
        );
    }

    /// Every request to `path_prefix` fails with `status` (until `heal`).
    pub fn fail_always(&self, path_prefix: &str, status: u16) {
        self.lock().failing.push((path_prefix.to_owned(), status));
    }

    pub fn heal(&self) {
        let mut inner = self.lock();
        inner.failing.clear();
        inner.injections.clear();
    }

    /// (method, path, idempotency key) of every request so far.
    pub fn requests(&self) -> Vec<(String, String, Option<String>)> {
        self.lock().requests.clone()
    }

    /// (method, path, `Stripe-Account`) of every request so far.
    pub fn requests_with_account(&self) -> Vec<(String, String, Option<String>)> {
        let inner = self.lock();
        inner
            .requests
            .iter()
            .zip(&inner.accounts)
            .map(|((method, path, _), account)| (method.clone(), path.clone(), account.clone()))
            .collect()
    }

    /// Stripe changes a subscription's status (as a dunning step or an operator would).
    /// Returns the snapshot event and the thin event Stripe sends for that one change (not
    /// delivered), for a `context` account if given.
    pub fn change_status(
        &self,
        subscription_id: &str,
        status: &str,
        context: Option<&str>,
    ) -> (Value, Value) {
        let mut inner = self.lock();
        let sub = inner
            .subscriptions
            .get_mut(subscription_id)
            .expect("a subscription");
        let previous = sub["status"].clone();
        sub["status"] = json!(status);
        let sub = sub.clone();
        let mut snapshot = event(
            &mut inner,
            "customer.subscription.updated",
            webhook_shape(&sub),
            Some(json!({"status": previous})),
        );
        if let Some(account) = context {
            snapshot["account"] = json!(account);
        }
        let thin = thin_event(
            &mut inner,
            "v1.customer.subscription.updated",
            Some(("subscription", subscription_id)),
            context,
        );
        (snapshot, thin)
    }

    /// A thin event (not delivered) naming `related` (type, id), or nothing.
    pub fn thin_event(
        &self,
        kind: &str,
        related: Option<(&str, &str)>,
        context: Option<&str>,
    ) -> Value {
        thin_event(&mut self.lock(), kind, related, context)
    }

    /// Adds a webhook endpoint as if made in the Dashboard.
    pub fn add_endpoint(&self, url: &str, events: &[&str], api_version: Option<&str>) {
        let mut inner = self.lock();
        inner.seq += 1;
        let endpoint = json!({"id": format!("we_fake{:06}", inner.seq), "object": "webhook_endpoint",
            "url": url, "enabled_events": events, "api_version": api_version, "status": "enabled",
            "livemode": false, "created": now(), "description": null, "metadata": {}});
        inner.endpoints.push(endpoint);
    }

    pub fn endpoints(&self) -> Vec<Value> {
        self.lock().endpoints.clone()
    }

    pub fn count(&self, what: &str) -> usize {
        let inner = self.lock();
        match what {
            "customers" => inner.customers.len(),
            "subscriptions" => inner.subscriptions.len(),
            "sessions" => inner.sessions.len(),
            "portal_sessions" => inner.portal_sessions.len(),
            _ => panic!("unknown collection {what}"),
        }
    }

    /// Adds a customer and a subscription directly (as if made in Stripe's dashboard, no
    /// webhook delivered), created `age` seconds ago. Returns the subscription.
    pub fn add_subscription(
        &self,
        customer_id: &str,
        org_id: &str,
        status: &str,
        price: &str,
        age: i64,
    ) -> Value {
        let mut inner = self.lock();
        inner
            .customers
            .entry(customer_id.to_owned())
            .or_insert_with(|| {
                json!({"id": customer_id, "object": "customer", "created": now() - age,
                "metadata": {"organizationId": org_id}})
            });
        inner.seq += 1;
        let id = format!("sub_fake{:06}", inner.seq);
        let sub = subscription(
            &id,
            customer_id,
            org_id,
            "user_1",
            status,
            price,
            now() - age,
        );
        inner.subscriptions.insert(id, sub.clone());
        sub
    }

    /// The customer completes a checkout session: its subscription exists now. Returns the
    /// webhook events Stripe sends for it (not delivered).
    pub fn complete_checkout(&self, session_id: &str) -> Vec<Value> {
        let mut inner = self.lock();
        let session = inner.sessions.get(session_id).expect("a session").clone();
        let customer = session["customer"].as_str().unwrap().to_owned();
        let org = session["metadata"]["organizationId"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let user = session["metadata"]["userId"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let price = session["price"].as_str().unwrap_or("price_pro").to_owned();
        inner.seq += 1;
        let id = format!("sub_fake{:06}", inner.seq);
        let sub = subscription(&id, &customer, &org, &user, "active", &price, now());
        inner.subscriptions.insert(id.clone(), sub.clone());
        let mut done = session.clone();
        done["status"] = json!("complete");
        done["subscription"] = json!(id);
        inner.sessions.insert(session_id.to_owned(), done.clone());
        let events = vec![
            event(&mut inner, "checkout.session.completed", done, None),
            event(
                &mut inner,
                "customer.subscription.created",
                webhook_shape(&sub),
                None,
            ),
        ];
        events
    }

    /// The customer cancels in the billing portal (at once). Returns the webhook.
    pub fn cancel_in_portal(&self, subscription_id: &str) -> Value {
        let mut inner = self.lock();
        let sub = inner
            .subscriptions
            .get_mut(subscription_id)
            .expect("a subscription");
        let previous = sub["status"].clone();
        sub["status"] = json!("canceled");
        sub["canceled_at"] = json!(now());
        sub["ended_at"] = json!(now());
        let sub = sub.clone();
        event(
            &mut inner,
            "customer.subscription.deleted",
            webhook_shape(&sub),
            Some(json!({"status": previous})),
        )
    }

    pub fn subscription(&self, id: &str) -> Value {
        self.lock().subscriptions[id].clone()
    }
}

/// A subscription as the API shows it (with the default payment method expanded).
fn subscription(
    id: &str,
    customer: &str,
    org: &str,
    user: &str,
    status: &str,
    price: &str,
    created: i64,
) -> Value {
    json!({
        "id": id, "object": "subscription", "customer": customer, "status": status,
        "created": created, "start_date": created, "currency": "usd",
        "cancel_at_period_end": false, "cancel_at": null, "canceled_at": null, "ended_at": null,
        "trial_start": null, "trial_end": null, "latest_invoice": format!("in_{id}"),
        "metadata": {"organizationId": org, "userId": user},
        "default_payment_method": {"id": format!("pm_{id}"), "object": "payment_method", "type": "card",
            "card": {"brand": "visa", "last4": "4242"}},
        "items": {"object": "list", "data": [{"id": format!("si_{id}"), "object": "subscription_item",
            "price": {"id": price, "object": "price", "product": "prod_pro", "lookup_key": null, "currency": "usd"},
            "quantity": 1, "current_period_start": created, "current_period_end": created + 30 * 86_400}],
            "has_more": false}
    })
}

/// Webhooks carry `default_payment_method` as an id.
fn webhook_shape(sub: &Value) -> Value {
    let mut sub = sub.clone();
    if let Some(id) = sub["default_payment_method"]["id"]
        .as_str()
        .map(str::to_owned)
    {
        sub["default_payment_method"] = json!(id);
    }
    sub
}

fn event(inner: &mut Inner, kind: &str, object: Value, previous: Option<Value>) -> Value {
    inner.seq += 1;
    let mut data = json!({"object": object});
    if let Some(previous) = previous {
        data["previous_attributes"] = previous;
    }
    let event = json!({"id": format!("evt_fake{:06}", inner.seq), "object": "event", "type": kind,
        "created": now(), "api_version": "2025-03-31.basil", "livemode": false, "pending_webhooks": 1,
        "data": data});
    inner.events.push(event.clone());
    event
}

/// Every answer carries Stripe's clock in its `Date` header, as an HTTP date (RFC 9110
/// section 6.6.1; Stripe's API sends one on every response, e.g.
/// `Date: Tue, 01 Dec 2026 10:00:00 GMT`).
async fn stripe_date(State(state): State<Arc<Mutex<Inner>>>, mut response: Response) -> Response {
    let offset = state.lock().unwrap().clock_offset;
    let at = chrono::Utc::now() + chrono::Duration::seconds(offset);
    let value = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    response.headers_mut().insert(
        "date",
        value.parse().expect("an HTTP date is a header value"),
    );
    response
}

/// A thin event as Stripe delivers it: `object: "v2.core.event"`, `created` as RFC 3339,
/// `related_object {id, type, url}`, `context` (the connected account, or null),
/// `livemode`, `reason`. Shape: https://docs.stripe.com/api/v2/core/events/object and
/// stripe-node `src/resources/V2/Core/Events.ts` (`EventBase`,
/// `V2.Core.Events.RelatedObject`); the `v1.` type names:
/// https://docs.stripe.com/changelog/endive/2026-09-30/thin-events-for-api-v1-resources-generally-available
fn thin_event(
    inner: &mut Inner,
    kind: &str,
    related: Option<(&str, &str)>,
    context: Option<&str>,
) -> Value {
    inner.seq += 1;
    let related = related.map(|(object_type, id)| {
        let collection = match object_type {
            "subscription" => "subscriptions",
            "customer" => "customers",
            other => other,
        };
        json!({"id": id, "type": object_type, "url": format!("/v1/{collection}/{id}")})
    });
    json!({"id": format!("evt_thin{:06}", inner.seq), "object": "v2.core.event", "type": kind,
        "created": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "livemode": false, "context": context, "related_object": related,
        "reason": {"type": "request", "request": {"id": format!("req_fake{:06}", inner.seq), "idempotency_key": null}}})
}

fn stripe_error(status: u16, kind: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        Json(json!({"error": {"type": kind, "message": message}})),
    )
        .into_response()
}

/// Records the request and applies injections. `Err` is the answer to give instead.
async fn intercept(
    state: &Arc<Mutex<Inner>>,
    method: &str,
    path: &str,
    headers: &HeaderMap,
) -> Result<Option<String>, Response> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let action = {
        let mut inner = state.lock().unwrap();
        inner
            .requests
            .push((method.to_owned(), path.to_owned(), key.clone()));
        inner.accounts.push(
            headers
                .get("stripe-account")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        );
        let failing = inner
            .failing
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map(|(_, status)| Injection::Status(*status));
        failing.or_else(|| {
            inner
                .injections
                .iter_mut()
                .find(|(prefix, queue)| path.starts_with(prefix.as_str()) && !queue.is_empty())
                .and_then(|(_, queue)| queue.pop_front())
        })
    };
    match action {
        Some(Injection::Status(429)) => Err(stripe_error(
            429,
            "rate_limit_error",
            "Too many requests hit the API too quickly.",
        )),
        Some(Injection::Status(status)) => Err(stripe_error(
            status,
            "api_error",
            "Something went wrong on Stripe's end.",
        )),
        Some(Injection::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            Ok(key)
        }
        None => Ok(key),
    }
}

/// Answers a POST: the stored answer for a repeated idempotency key, else `make`'s.
fn idempotent(
    state: &Arc<Mutex<Inner>>,
    key: Option<String>,
    make: impl FnOnce(&mut Inner) -> (u16, Value),
) -> Response {
    let mut inner = state.lock().unwrap();
    let (status, body) = match key.as_ref().and_then(|k| inner.idempotent.get(k)) {
        Some(stored) => stored.clone(),
        None => {
            let answer = make(&mut inner);
            if let Some(key) = key {
                inner.idempotent.insert(key, answer.clone());
            }
            answer
        }
    };
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

/// Stripe's form encoding (`a[b][0][c]=v`), flattened to bracketed keys.
fn form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

async fn create_customer(
    State(state): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let key = match intercept(&state, "POST", "/v1/customers", &headers).await {
        Ok(key) => key,
        Err(response) => return response,
    };
    let params = form(&body);
    idempotent(&state, key, |inner| {
        inner.seq += 1;
        let id = format!("cus_fake{:06}", inner.seq);
        let customer = json!({"id": id, "object": "customer", "created": now(),
            "email": params.get("email"),
            "metadata": {"organizationId": params.get("metadata[organizationId]"),
                "userId": params.get("metadata[userId]")}});
        inner.customers.insert(id, customer.clone());
        (200, customer)
    })
}

/// `GET /v1/entitlements/active_entitlements?customer=…`: a list of
/// `entitlements.active_entitlement` objects (async-stripe `EntitlementsActiveEntitlement`:
/// `id`, `feature`, `livemode`, `lookup_key`), one page.
async fn list_active_entitlements(
    State(state): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(response) = intercept(
        &state,
        "GET",
        "/v1/entitlements/active_entitlements",
        &headers,
    )
    .await
    {
        return response;
    }
    let params = form(query.as_deref().unwrap_or(""));
    let account = account_header(&headers);
    let inner = state.lock().unwrap();
    let keys = params
        .get("customer")
        .filter(|customer| in_scope(&inner, Some(customer.as_str()), account.as_deref()))
        .and_then(|customer| inner.entitlements.get(customer))
        .cloned()
        .unwrap_or_default();
    let data: Vec<Value> = keys
        .iter()
        .map(|key| {
            json!({"id": format!("ent_{key}"), "object": "entitlements.active_entitlement",
                "feature": format!("feat_{key}"), "livemode": false, "lookup_key": key})
        })
        .collect();
    Json(
        json!({"object": "list", "url": "/v1/entitlements/active_entitlements",
        "has_more": false, "data": data}),
    )
    .into_response()
}

async fn list_subscriptions(
    State(state): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(response) = intercept(&state, "GET", "/v1/subscriptions", &headers).await {
        return response;
    }
    let params = form(query.as_deref().unwrap_or(""));
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(10)
        .min(100);
    let account = account_header(&headers);
    let inner = state.lock().unwrap();
    // Newest first, as Stripe lists them; only the requested account's.
    let mut all: Vec<&Value> = inner
        .subscriptions
        .values()
        .filter(|sub| {
            params
                .get("customer")
                .is_none_or(|c| sub["customer"].as_str() == Some(c))
        })
        .filter(|sub| in_scope(&inner, sub["customer"].as_str(), account.as_deref()))
        .collect();
    all.sort_by(|a, b| {
        (b["created"].as_i64(), b["id"].as_str()).cmp(&(a["created"].as_i64(), a["id"].as_str()))
    });
    let start = match params.get("starting_after") {
        Some(after) => all
            .iter()
            .position(|sub| sub["id"].as_str() == Some(after))
            .map_or(all.len(), |i| i + 1),
        None => 0,
    };
    let expand = params
        .iter()
        .any(|(k, v)| k.starts_with("expand") && v == "data.default_payment_method");
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|sub| {
            if expand {
                (*sub).clone()
            } else {
                webhook_shape(sub)
            }
        })
        .collect();
    let has_more = start + page.len() < all.len();
    Json(json!({"object": "list", "url": "/v1/subscriptions", "has_more": has_more, "data": page}))
        .into_response()
}

async fn retrieve_subscription(
    State(state): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(response) =
        intercept(&state, "GET", &format!("/v1/subscriptions/{id}"), &headers).await
    {
        return response;
    }
    let expand = form(query.as_deref().unwrap_or(""))
        .iter()
        .any(|(k, v)| k.starts_with("expand") && v == "default_payment_method");
    let account = account_header(&headers);
    let inner = state.lock().unwrap();
    match inner
        .subscriptions
        .get(&id)
        .filter(|sub| in_scope(&inner, sub["customer"].as_str(), account.as_deref()))
    {
        Some(sub) if expand => Json(sub.clone()).into_response(),
        Some(sub) => Json(webhook_shape(sub)).into_response(),
        None => stripe_error(
            404,
            "invalid_request_error",
            &format!("No such subscription: '{id}'"),
        ),
    }
}

async fn create_session(
    State(state): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let key = match intercept(&state, "POST", "/v1/checkout/sessions", &headers).await {
        Ok(key) => key,
        Err(response) => return response,
    };
    let params = form(&body);
    let account = account_header(&headers);
    idempotent(&state, key, |inner| {
        let Some(customer) = params
            .get("customer")
            .filter(|c| inner.customers.contains_key(*c))
            .filter(|c| in_scope(inner, Some(c.as_str()), account.as_deref()))
        else {
            return (
                400,
                json!({"error": {"type": "invalid_request_error", "message": "No such customer"}}),
            );
        };
        inner.seq += 1;
        let id = format!("cs_test_fake{:06}", inner.seq);
        let session = json!({"id": id, "object": "checkout.session", "mode": params.get("mode"),
            "status": "open", "created": now(), "customer": customer,
            "client_reference_id": params.get("client_reference_id"),
            "url": format!("https://checkout.stripe.test/c/pay/{id}"),
            "success_url": params.get("success_url"), "cancel_url": params.get("cancel_url"),
            "price": params.get("line_items[0][price]"),
            "metadata": {"organizationId": params.get("metadata[organizationId]"),
                "userId": params.get("metadata[userId]")},
            "subscription_data_metadata": {
                "organizationId": params.get("subscription_data[metadata][organizationId]"),
                "userId": params.get("subscription_data[metadata][userId]")}});
        inner.sessions.insert(id, session.clone());
        (200, session)
    })
}

async fn retrieve_session(
    State(state): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(response) = intercept(&state, "GET", "/v1/checkout/sessions/", &headers).await {
        return response;
    }
    let account = account_header(&headers);
    let inner = state.lock().unwrap();
    match inner
        .sessions
        .get(&id)
        .filter(|session| in_scope(&inner, session["customer"].as_str(), account.as_deref()))
    {
        Some(session) => Json(session.clone()).into_response(),
        None => stripe_error(
            404,
            "invalid_request_error",
            &format!("No such checkout.session: '{id}'"),
        ),
    }
}

async fn create_portal_session(
    State(state): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let key = match intercept(&state, "POST", "/v1/billing_portal/sessions", &headers).await {
        Ok(key) => key,
        Err(response) => return response,
    };
    let params = form(&body);
    let account = account_header(&headers);
    idempotent(&state, key, |inner| {
        // A customer of another account is not found (one the fake never made is taken,
        // as before Connect was faked).
        let customer = params.get("customer").map(String::as_str);
        if !in_scope(inner, customer, account.as_deref()) {
            return (
                404,
                json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
                    "message": format!("No such customer: '{}'", customer.unwrap_or(""))}}),
            );
        }
        inner.seq += 1;
        let session = json!({"id": format!("bps_fake{:06}", inner.seq), "object": "billing_portal.session",
            "customer": params.get("customer"), "return_url": params.get("return_url"),
            "url": format!("https://billing.stripe.test/p/session/{}", inner.seq), "created": now()});
        inner.portal_sessions.push(session.clone());
        (200, session)
    })
}

/// `GET /v1/webhook_endpoints`: one page of every endpoint (shape:
/// https://docs.stripe.com/api/webhook_endpoints/list).
async fn list_endpoints(State(state): State<Arc<Mutex<Inner>>>, headers: HeaderMap) -> Response {
    if let Err(response) = intercept(&state, "GET", "/v1/webhook_endpoints", &headers).await {
        return response;
    }
    let data = state.lock().unwrap().endpoints.clone();
    Json(json!({"object": "list", "url": "/v1/webhook_endpoints", "has_more": false, "data": data}))
        .into_response()
}

/// `POST /v1/webhook_endpoints`: the answer carries the signing `secret`, which Stripe
/// returns only on creation (https://docs.stripe.com/api/webhook_endpoints/create).
async fn create_endpoint(
    State(state): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let key = match intercept(&state, "POST", "/v1/webhook_endpoints", &headers).await {
        Ok(key) => key,
        Err(response) => return response,
    };
    let params = form(&body);
    idempotent(&state, key, |inner| {
        let mut events: Vec<(usize, String)> = params
            .iter()
            .filter_map(|(k, v)| {
                let index = k.strip_prefix("enabled_events[")?.strip_suffix(']')?;
                Some((index.parse().ok()?, v.clone()))
            })
            .collect();
        events.sort();
        let events: Vec<String> = events.into_iter().map(|(_, v)| v).collect();
        inner.seq += 1;
        let endpoint = json!({"id": format!("we_fake{:06}", inner.seq), "object": "webhook_endpoint",
            "url": params.get("url"), "enabled_events": events, "api_version": params.get("api_version"),
            "status": "enabled", "livemode": false, "created": now(), "description": params.get("description"),
            "metadata": {}});
        inner.endpoints.push(endpoint.clone());
        let mut created = endpoint;
        created["secret"] = json!(format!("whsec_fake{:06}", inner.seq));
        (200, created)
    })
}

/// `GET /v1/events`: newest first, filtered by `types[]`, `created[gte]` and
/// `delivery_success` (every event here is undelivered), paged by `starting_after`
/// (https://docs.stripe.com/api/events/list).
async fn list_events(
    State(state): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(response) = intercept(&state, "GET", "/v1/events", &headers).await {
        return response;
    }
    let query = query.unwrap_or_default();
    let params: Vec<(String, String)> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let types: Vec<&String> = params
        .iter()
        .filter(|(k, _)| k.starts_with("types["))
        .map(|(_, v)| v)
        .collect();
    let gte: i64 = get("created[gte]")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let limit: usize = get("limit").and_then(|v| v.parse().ok()).unwrap_or(10);
    let inner = state.lock().unwrap();
    let mut all: Vec<&Value> = inner
        .events
        .iter()
        .rev()
        .filter(|e| e["created"].as_i64().unwrap_or(0) >= gte)
        .filter(|e| {
            types.is_empty() || types.iter().any(|t| e["type"].as_str() == Some(t.as_str()))
        })
        .collect();
    if let Some(after) = get("starting_after") {
        let start = all
            .iter()
            .position(|e| e["id"].as_str() == Some(after.as_str()))
            .map_or(all.len(), |i| i + 1);
        all.drain(..start);
    }
    let page: Vec<Value> = all.iter().take(limit).map(|e| (*e).clone()).collect();
    let has_more = all.len() > page.len();
    Json(json!({"object": "list", "url": "/v1/events", "has_more": has_more, "data": page}))
        .into_response()
}
