//! Storing events in the inbox: one at a time, many in one statement, and the webhook's
//! group commit.
//!
//! Recording is the only thing the webhook does before answering 2xx. An event holding a
//! value Postgres refuses for its content ([`Refused`]: a NUL character, an id longer than
//! any Stripe id, a time Postgres cannot hold) is the sender's problem: it is answered on
//! its own (400) and never fails the events stored beside it. Any other failure to store is
//! a 5xx, so Stripe retries. This module must never answer for an event it has not stored.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use event_store::arguments::{fixed_array, optional_strings, presized, strings, text};
use event_store::hand_over::HandOver;
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::sync::{mpsc, oneshot};

use super::{InboxState, Outcome, Source};
use crate::db_error::{self, Failure, Refusal, Refused};
use crate::stripe::event::EARLIEST_UNIX_SECS;
use crate::stripe::{route, Route, StripeEvent};

/// Whether the event was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Received {
    /// Stored now, for the workers to process.
    Stored,
    /// Stored now and already finished: nothing in it for the aggregate (for example an
    /// event type we don't handle).
    Ignored,
    /// We already had this event id; nothing was done.
    Duplicate,
}

impl Received {
    /// In the order the metrics' help text lists them.
    pub const ALL: [Self; 3] = [Self::Stored, Self::Duplicate, Self::Ignored];

    pub const fn as_str(self) -> &'static str {
        match self {
            Received::Stored => "stored",
            Received::Ignored => "ignored",
            Received::Duplicate => "duplicate",
        }
    }
}

/// One event to store: the parsed event and the raw body it came in.
pub struct NewEvent<'a> {
    pub event: &'a StripeEvent,
    pub raw: &'a [u8],
    pub source: Source,
}

/// What the inbox answers for one event: whether it was new, or why it cannot be stored.
pub type Recorded = Result<Received, Refused>;

/// Stores an event. Idempotent on Stripe's event id.
pub async fn record(
    pool: &PgPool,
    event: &StripeEvent,
    raw: &[u8],
    source: Source,
) -> Result<Recorded, sqlx::Error> {
    let mut received = record_many(pool, &[NewEvent { event, raw, source }]).await?;
    Ok(received.pop().expect("one answer per event"))
}

/// Stores several events in one statement and one commit, answering for each in order.
/// Idempotent on Stripe's event id: an id already stored, or met earlier in `events`,
/// is a `Duplicate`. An event [`check`] refuses is answered with its refusal and left out
/// of the statement; of the others, either every one is stored or none is (the error).
pub async fn record_many<'c>(
    db: impl sqlx::PgExecutor<'c>,
    events: &[NewEvent<'_>],
) -> Result<Vec<Recorded>, sqlx::Error> {
    let routes: Vec<Route> = events.iter().map(|new| route(new.event)).collect();
    record_routed(db, events, &routes).await
}

/// [`record_many`], each event with its route (`route` of it), already known.
async fn record_routed<'c>(
    db: impl sqlx::PgExecutor<'c>,
    events: &[NewEvent<'_>],
    routes: &[Route],
) -> Result<Vec<Recorded>, sqlx::Error> {
    let mut columns = Columns::default();
    // The answer each event gets if it is inserted; `None` for a repeat within `events`.
    let mut planned: Vec<Result<Option<Received>, Refused>> = Vec::with_capacity(events.len());
    let mut seen = HashSet::with_capacity(events.len());
    for (NewEvent { event, raw, source }, routed) in events.iter().zip(routes) {
        if let Err(refused) = check(event, raw) {
            planned.push(Err(refused));
            continue;
        }
        if !seen.insert(event.id.as_str()) {
            planned.push(Ok(None));
            continue;
        }
        let (customer_id, state, outcome, detail) = match routed {
            Route::Command { customer_id, .. } => {
                (Some(customer_id.clone()), InboxState::Pending, None, None)
            }
            // A thin event's customer is known only once its object is fetched.
            Route::Fetch(_) | Route::ReconcileAll => (None, InboxState::Pending, None, None),
            Route::Ignore { reason } => (
                event.customer_id(),
                InboxState::Done,
                Some(Outcome::Ignored),
                Some(reason),
            ),
        };
        planned.push(Ok(Some(match state {
            InboxState::Done => Received::Ignored,
            _ => Received::Stored,
        })));
        columns.event_id.push(event.id.clone());
        columns.event_type.push(event.event_type.clone());
        columns.api_version.push(event.api_version.clone());
        columns.livemode.push(event.livemode);
        columns.stripe_created.push(event.created);
        columns.customer_id.push(customer_id);
        columns
            .payload
            .push(String::from_utf8_lossy(raw).into_owned());
        columns.source.push(*source);
        columns.state.push(state);
        columns.outcome.push(outcome);
        // The reason is ours, but it may name a value from the payload: keep it storable.
        columns
            .detail
            .push(detail.map(|d| db_error::storable_text(d).into_owned()));
    }
    if columns.event_id.is_empty() {
        return Ok(planned
            .into_iter()
            .map(|planned| planned.map(|_| Received::Duplicate))
            .collect());
    }
    // Rows go in in event-id order, so that concurrent inserts (a redelivery racing its
    // first delivery in another batch) take their key locks in the same order and never
    // deadlock each other.
    columns.sort();
    let inserted: Vec<String> = sqlx::query_scalar_with(
        "INSERT INTO inbox (event_id, event_type, api_version, livemode, stripe_created, customer_id, payload, \
            source, state, outcome, detail, processed_at) \
         SELECT u.*, CASE WHEN u.state = $12 THEN now() END \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::timestamptz[], $6::text[], \
            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[]) \
            AS u(event_id, event_type, api_version, livemode, stripe_created, customer_id, payload, \
            source, state, outcome, detail) \
         ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        presized(12, columns.encoded_size()),
    )
    .bind(&columns.event_id)
    .bind(&columns.event_type)
    .bind(&columns.api_version)
    .bind(&columns.livemode)
    .bind(&columns.stripe_created)
    .bind(&columns.customer_id)
    .bind(&columns.payload)
    .bind(&columns.source)
    .bind(&columns.state)
    .bind(&columns.outcome)
    .bind(&columns.detail)
    .bind(InboxState::Done)
    .fetch_all(db)
    .await?;
    let inserted: HashSet<&str> = inserted.iter().map(String::as_str).collect();
    Ok(events
        .iter()
        .zip(planned)
        .map(|(new, planned)| {
            planned.map(|planned| match planned {
                Some(received) if inserted.contains(new.event.id.as_str()) => received,
                _ => Received::Duplicate,
            })
        })
        .collect())
}

/// The longest id the inbox takes: Stripe's object ids never exceed 255 characters ("You
/// can safely assume object IDs we generate will never exceed 255 characters",
/// <https://stripe.com/docs/upgrades>, "What changes does Stripe consider to be
/// backwards-compatible"). It also keeps every key far below the 2704-byte limit of a
/// btree index row, which a huge id would break (SQLSTATE 54000).
pub const MAX_ID_BYTES: usize = 255;

/// Refuses, before anything is sent to Postgres, an event holding a value its inbox row
/// could not store: a NUL character in a text column (SQLSTATE 22021), an event or
/// customer id longer than any Stripe id (an index row over its limit, 54000), or a
/// `created` before what `timestamptz` holds (22008). What this misses, Postgres refuses,
/// and the group commit still answers that event alone.
pub fn check(event: &StripeEvent, raw: &[u8]) -> Result<(), Refused> {
    let nul = |field: &str| {
        Refused::new(
            Refusal::InvalidText,
            format!("its {field} contains a NUL character"),
        )
    };
    let customer = event.customer_id();
    for (field, value) in [
        ("id", Some(event.id.as_str())),
        ("type", Some(event.event_type.as_str())),
        ("api_version", event.api_version.as_deref()),
        ("customer", customer.as_deref()),
    ] {
        if value.is_some_and(|v| v.contains('\0')) {
            return Err(nul(field));
        }
    }
    // A JSON body that parsed cannot hold a raw NUL byte (the parser refuses control
    // characters); an escaped one (`\u0000`) is six ASCII characters. Checked anyway, as
    // the payload column is text.
    if raw.contains(&0) {
        return Err(nul("body"));
    }
    for (field, value) in [
        ("id", Some(event.id.as_str())),
        ("customer", customer.as_deref()),
    ] {
        if let Some(len) = value.map(str::len).filter(|len| *len > MAX_ID_BYTES) {
            return Err(Refused::new(
                Refusal::TooLarge,
                format!("its {field} is {len} bytes long; a Stripe id has at most {MAX_ID_BYTES} characters"),
            ));
        }
    }
    if event.created.timestamp() < EARLIEST_UNIX_SECS {
        return Err(Refused::new(
            Refusal::InvalidDatetime,
            "its created time is earlier than Postgres can hold",
        ));
    }
    Ok(())
}

/// The inbox columns of a multi-row insert.
#[derive(Default)]
struct Columns {
    event_id: Vec<String>,
    event_type: Vec<String>,
    api_version: Vec<Option<String>>,
    livemode: Vec<bool>,
    stripe_created: Vec<DateTime<Utc>>,
    customer_id: Vec<Option<String>>,
    payload: Vec<String>,
    source: Vec<Source>,
    state: Vec<InboxState>,
    outcome: Vec<Option<Outcome>>,
    detail: Vec<Option<String>>,
}

impl Columns {
    /// About the bytes these columns take as the insert's arguments (the enums' names are
    /// short words: 24 bytes each is more than any takes).
    fn encoded_size(&self) -> usize {
        let rows = self.event_id.len();
        strings(&self.event_id)
            + strings(&self.event_type)
            + optional_strings(&self.api_version)
            + fixed_array(rows, 1)
            + fixed_array(rows, 8)
            + optional_strings(&self.customer_id)
            + strings(&self.payload)
            + 3 * fixed_array(rows, 24)
            + optional_strings(&self.detail)
            + text(InboxState::Done.as_str())
    }

    /// Into event-id order: the order concurrent inserts lock keys in.
    fn sort(&mut self) {
        let mut order: Vec<usize> = (0..self.event_id.len()).collect();
        order.sort_by(|&a, &b| self.event_id[a].cmp(&self.event_id[b]));
        fn permute<T>(v: &mut Vec<T>, order: &[usize]) {
            let mut taken: Vec<Option<T>> = std::mem::take(v).into_iter().map(Some).collect();
            *v = order
                .iter()
                .map(|&i| taken[i].take().expect("a permutation takes each once"))
                .collect();
        }
        permute(&mut self.event_id, &order);
        permute(&mut self.event_type, &order);
        permute(&mut self.api_version, &order);
        permute(&mut self.livemode, &order);
        permute(&mut self.stripe_created, &order);
        permute(&mut self.customer_id, &order);
        permute(&mut self.payload, &order);
        permute(&mut self.source, &order);
        permute(&mut self.state, &order);
        permute(&mut self.outcome, &order);
        permute(&mut self.detail, &order);
    }
}

/// Why the inbox could not store an event.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InboxError {
    /// A value in the event that Postgres refuses for its content: permanent, the
    /// sender's problem (answered 400, never retried).
    #[error("the event cannot be stored: {0}")]
    Refused(Refused),
    /// The insert failed for a reason that may pass (answered 503, so Stripe retries);
    /// every event of its batch gets this error.
    #[error("the inbox could not store the event")]
    Store(#[source] Arc<sqlx::Error>),
    /// The writer has stopped (the service is shutting down).
    #[error("the inbox writer has stopped")]
    Closed,
}

impl InboxError {
    fn from_sqlx(error: sqlx::Error) -> Self {
        match db_error::classify(&error) {
            Failure::Refused(refusal) => Self::Refused(Refused::by_postgres(refusal, &error)),
            Failure::Transient => Self::Store(Arc::new(error)),
        }
    }
}

/// Most events stored by one insert.
const WRITE_BATCH: usize = 256;

/// How many times an insert that lost a race (a serialization failure or a deadlock) is
/// run again at once before its events are answered 503.
const RACE_RETRIES: usize = 2;

/// A connection one of the writer's inserts keeps from batch to batch. A connection taken
/// from the pool for each insert and given back cost two more round trips to Postgres per
/// insert (sqlx checks a connection when it is taken and again when it is given back).
/// One whose insert failed other than by Postgres refusing a value (Postgres ended the
/// connection, 57P01, or its socket closed: a restart, a proxy that cut it) is dropped,
/// and the insert runs again at once on a connection the pool checks, as the pool's own
/// check would have found it dead before the insert.
#[derive(Default)]
struct HeldConnection {
    conn: Option<PoolConnection<Postgres>>,
}

impl HeldConnection {
    /// [`record_many`] (of `events` routed as `routes`) on the held connection (taken from
    /// `pool` if none is held), run again when it lost a race with another transaction, or
    /// once on a fresh connection when the held one failed. An insert that failed with its connection may have
    /// committed: its events are then answered as duplicates the second time, which they
    /// are (stored; the workers read their payloads).
    async fn record(
        &mut self,
        pool: &PgPool,
        events: &[NewEvent<'_>],
        routes: &[Route],
    ) -> Result<Vec<Recorded>, sqlx::Error> {
        let (mut races, mut reconnected) = (0, false);
        loop {
            let held = self.conn.is_some();
            let conn = match &mut self.conn {
                Some(conn) => conn,
                empty => empty.insert(pool.acquire().await?),
            };
            match record_routed(&mut **conn, events, routes).await {
                Err(error) if db_error::lost_a_race(&error) => {
                    if races == RACE_RETRIES {
                        return Err(error);
                    }
                    races += 1;
                }
                Err(error) if db_error::refusal(&error).is_none() => {
                    self.conn = None;
                    if !held || reconnected {
                        return Err(error);
                    }
                    reconnected = true;
                }
                other => return other,
            }
        }
    }
}

/// A slot of the writer, lent to one insert: given back when dropped, with its connection
/// once the insert has finished, or empty if its task panicked mid-insert (the
/// connection's state is then unknown), so that the writer never loses a slot.
struct Lease {
    slot: Option<HeldConnection>,
    free: mpsc::UnboundedSender<HeldConnection>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let slot = match self.slot.take() {
            Some(slot) if !std::thread::panicking() => slot,
            _ => HeldConnection::default(),
        };
        let _ = self.free.send(slot);
    }
}

/// Stores a batch and answers for each event. When Postgres refuses the statement as a
/// whole for a value's content, the batch is stored again one event at a time, so only
/// the event holding that value is refused and its neighbours are stored and answered as
/// if it had never been there. Any other failure answers every event of the batch with it.
async fn store_batch(
    pool: &PgPool,
    held: &mut HeldConnection,
    events: &[NewEvent<'_>],
    routes: &[Route],
) -> Vec<Result<Received, InboxError>> {
    let error = match held.record(pool, events, routes).await {
        Ok(recorded) => {
            return recorded
                .into_iter()
                .map(|one| one.map_err(InboxError::Refused))
                .collect()
        }
        Err(error) => error,
    };
    if events.len() == 1 || db_error::refusal(&error).is_none() {
        let error = InboxError::from_sqlx(error);
        return vec![Err(error); events.len()];
    }
    let mut answers = Vec::with_capacity(events.len());
    for (event, routed) in events.iter().zip(routes) {
        let one = held
            .record(
                pool,
                std::slice::from_ref(event),
                std::slice::from_ref(routed),
            )
            .await;
        answers.push(match one {
            Ok(mut one) => one
                .pop()
                .expect("one answer per event")
                .map_err(InboxError::Refused),
            Err(error) => Err(InboxError::from_sqlx(error)),
        });
    }
    answers
}

/// Events this process's webhooks stored for processing, already parsed and routed,
/// handed to this process's inbox workers so that an event is parsed and routed once, at
/// receipt, rather than again from its stored payload when a worker claims its row
/// ([`ParsedEvents::take`]). The stored payload stays the one source: a worker that finds
/// nothing here (the event came through another replica, `import` or the recovery poller,
/// or was pushed out) parses and routes the payload as before, and what it would get is
/// what is here, since the payload is exactly the bytes this event was parsed from and
/// `route` is a function of the event alone. Bounded: the oldest entries go first
/// (an entry costs a few KiB, and it is only useful while its row waits to be claimed;
/// `event_store::hand_over`).
#[derive(Clone)]
pub struct ParsedEvents(HandOver<String, (Arc<StripeEvent>, Route)>);

impl Default for ParsedEvents {
    fn default() -> Self {
        Self(HandOver::new(Self::CAPACITY))
    }
}

impl ParsedEvents {
    /// Most events held at once.
    pub const CAPACITY: usize = 2048;

    /// Holds a stored event, with its route (`route` of it: what the receipt made of it
    /// to store it), for the worker that will claim its row.
    pub fn put(&self, event: Arc<StripeEvent>, routed: Route) {
        self.0.put([(event.id.clone(), (event, routed))]);
    }

    /// The parsed event for `event_id` and its route, if this process stored it and it is
    /// still held.
    pub fn take(&self, event_id: &str) -> Option<(Arc<StripeEvent>, Route)> {
        self.0.take(event_id)
    }
}

/// Group commit for webhooks: requests hand their event to [`InboxWriter::store`], which
/// waits until the event is committed. Events that arrive while earlier inserts are
/// committing are stored together by the next insert, so under load many webhooks share
/// one statement and one WAL flush; alone, an event is stored at once. Nothing is
/// answered before its commit, and one refused event never fails its neighbours.
#[derive(Clone)]
pub struct InboxWriter {
    queue: mpsc::Sender<Queued>,
}

struct Queued {
    event: Arc<StripeEvent>,
    raw: bytes::Bytes,
    source: Source,
    reply: oneshot::Sender<Result<Received, InboxError>>,
}

impl InboxWriter {
    /// Starts the writer with at most `concurrent` inserts in flight. It stops once every
    /// clone of the returned writer is dropped and the queued events are stored.
    pub fn start(pool: PgPool, concurrent: usize) -> Self {
        Self::handing_over(pool, concurrent, ParsedEvents::default())
    }

    /// As [`InboxWriter::start`], putting each event it stored for processing into
    /// `parsed` once its insert committed (before it is answered), for the workers.
    pub fn handing_over(pool: PgPool, concurrent: usize, parsed: ParsedEvents) -> Self {
        let concurrent = concurrent.max(1);
        let (queue, incoming) = mpsc::channel::<Queued>(WRITE_BATCH * concurrent);
        // The writer runs on a thread of its own, with a runtime and connections of its
        // own (`concurrent` of them, beside `pool`'s), so that its next insert does not
        // queue behind the requests, workers and projections that share the server's
        // runtime: every webhook waits for the insert that stores it. In the ingestion
        // benchmark (2 cores, 32 connections) that acknowledged 2 to 16 % more webhooks a
        // second in each of nine alternating runs; the insert's connection still waited
        // for the next insert about a third of the time (BENCHMARKS.md, 2026-12-03).
        let options = pool.connect_options().as_ref().clone();
        let acquire_timeout = pool.options().get_acquire_timeout();
        std::thread::Builder::new()
            .name("inbox-writer".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the inbox writer's runtime starts");
                runtime.block_on(async move {
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(concurrent as u32)
                        .acquire_timeout(acquire_timeout)
                        .connect_lazy_with(options);
                    write(pool, concurrent, parsed, incoming).await
                })
            })
            .expect("the inbox writer's thread starts");
        Self { queue }
    }

    /// Stores a webhook's event; returns once it is committed (or could not be).
    pub async fn store(
        &self,
        event: Arc<StripeEvent>,
        raw: bytes::Bytes,
    ) -> Result<Received, InboxError> {
        self.store_from(event, raw, Source::Webhook).await
    }

    /// As [`InboxWriter::store`], for an event that came another way than Stripe's webhook.
    pub async fn store_from(
        &self,
        event: Arc<StripeEvent>,
        raw: bytes::Bytes,
        source: Source,
    ) -> Result<Received, InboxError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued {
                event,
                raw,
                source,
                reply,
            })
            .await
            .map_err(|_| InboxError::Closed)?;
        answer.await.map_err(|_| InboxError::Closed)?
    }
}

/// The writer's loop: each insert stores every event queued while the one before it ran,
/// with at most `concurrent` in flight, each on a connection it keeps. Returns once every
/// sender is dropped and the queued events are stored and answered.
async fn write(
    pool: PgPool,
    concurrent: usize,
    parsed: ParsedEvents,
    mut incoming: mpsc::Receiver<Queued>,
) {
    let (free, mut slots) = mpsc::unbounded_channel::<HeldConnection>();
    for _ in 0..concurrent {
        let _ = free.send(HeldConnection::default());
    }
    while let Some(first) = incoming.recv().await {
        // Wait for a free slot first: what queues meanwhile joins this batch.
        let Some(slot) = slots.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < WRITE_BATCH {
            match incoming.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (pool, parsed) = (pool.clone(), parsed.clone());
        let mut lease = Lease {
            slot: Some(slot),
            free: free.clone(),
        };
        tokio::spawn(async move {
            let mut routes: Vec<Route> = batch.iter().map(|q| route(&q.event)).collect();
            let events: Vec<NewEvent> = batch
                .iter()
                .map(|q| NewEvent {
                    event: &q.event,
                    raw: &q.raw,
                    source: q.source,
                })
                .collect();
            let held = lease.slot.as_mut().expect("a lease holds its slot");
            let answers = store_batch(&pool, held, &events, &routes).await;
            drop(events);
            for ((queued, answer), routed) in batch.iter().zip(&answers).zip(routes.drain(..)) {
                if matches!(answer, Ok(Received::Stored)) {
                    parsed.put(queued.event.clone(), routed);
                }
            }
            for (queued, answer) in batch.into_iter().zip(answers) {
                let _ = queued.reply.send(answer);
            }
            drop(lease);
        });
    }
    // The inserts still in flight run on this thread's runtime, which ends with this
    // function: wait until each has given its slot back (it has answered its events).
    for _ in 0..concurrent {
        if slots.recv().await.is_none() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::parse_event;

    fn event(envelope: serde_json::Value) -> (StripeEvent, Vec<u8>) {
        let raw = envelope.to_string().into_bytes();
        (parse_event(&raw).unwrap(), raw)
    }

    /// A stored event is handed over once, and the hand-over holds at most its capacity,
    /// dropping the oldest first (a worker that finds nothing parses the payload).
    #[test]
    fn parsed_events_are_taken_once_and_the_oldest_go_first() {
        let parsed = ParsedEvents::default();
        let one = |n: usize| {
            let (event, _) = event(
                serde_json::json!({"id": format!("evt_{n}"), "object": "event",
                "type": "customer.subscription.updated", "created": 1_700_000_000,
                "data": {"object": {"id": "sub_1", "customer": "cus_1"}}}),
            );
            Arc::new(event)
        };
        let put = |event: Arc<StripeEvent>| {
            let routed = route(&event);
            parsed.put(event, routed)
        };
        put(one(0));
        assert_eq!(parsed.take("evt_0"), Some((one(0), route(&one(0)))));
        assert_eq!(parsed.take("evt_0"), None);
        for n in 0..ParsedEvents::CAPACITY + 10 {
            put(one(n));
        }
        assert_eq!(parsed.take("evt_9"), None, "pushed out");
        assert!(parsed.take("evt_10").is_some());
        assert!(parsed
            .take(&format!("evt_{}", ParsedEvents::CAPACITY + 9))
            .is_some());
    }

    #[test]
    fn rows_postgres_would_refuse_are_refused_before_the_insert() {
        let base = serde_json::json!({"id": "evt_1", "object": "event", "type": "customer.subscription.updated",
            "api_version": "2025-03-31.basil", "created": 1_700_000_000,
            "data": {"object": {"id": "sub_1", "customer": "cus_1"}}});
        let (fine, raw) = event(base.clone());
        assert_eq!(check(&fine, &raw), Ok(()));
        for (pointer, value, refusal) in [
            ("/id", serde_json::json!("evt\u{0}1"), Refusal::InvalidText),
            (
                "/type",
                serde_json::json!("customer.\u{0}"),
                Refusal::InvalidText,
            ),
            (
                "/api_version",
                serde_json::json!("2025\u{0}"),
                Refusal::InvalidText,
            ),
            (
                "/data/object/customer",
                serde_json::json!("cus\u{0}"),
                Refusal::InvalidText,
            ),
            ("/id", serde_json::json!("e".repeat(256)), Refusal::TooLarge),
            (
                "/data/object/customer",
                serde_json::json!("c".repeat(3000)),
                Refusal::TooLarge,
            ),
        ] {
            let mut envelope = base.clone();
            *envelope.pointer_mut(pointer).unwrap() = value;
            let (event, raw) = event(envelope);
            let refused = check(&event, &raw).unwrap_err();
            assert_eq!(refused.refusal, refusal, "{pointer}: {refused}");
        }
    }
}
