//! Which events of the log a projection applies, read in a gap-free global order.
//!
//! The rows come from `event_store::read` (the only code that reads the `events` table),
//! which reads only what every older transaction has finished writing and hands rows out
//! undecoded. This module chooses which of them a batch or a rebuild keeps (each
//! aggregate's newest event and each subscription's newest snapshot: every projection is
//! last-writer-wins on those keys) and decodes only those. It only reads; it must never
//! write the log.

use std::collections::HashMap;

use aggregates::SubscriptionEvent;
use event_store::recent::RecentEvents;
use event_store::{read, StoreError};
use futures_util::TryStreamExt;
use serde::Deserialize;
use sqlx::PgConnection;

pub use event_store::{LoggedEvent, Position};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read the event log")]
    Database(#[from] sqlx::Error),
    #[error("event {aggregate_id}#{sequence} in the log cannot be decoded")]
    Decode {
        aggregate_id: String,
        sequence: i64,
        #[source]
        source: serde_json::Error,
    },
    #[error("the log returned a malformed transaction id {0:?}")]
    TxId(String),
    #[error("cannot read the event log")]
    Store(#[source] StoreError),
}

impl From<StoreError> for LogError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Database(error) => LogError::Database(error),
            StoreError::TxId(text) => LogError::TxId(text),
            StoreError::Json {
                aggregate_id,
                sequence,
                source,
            } => LogError::Decode {
                aggregate_id,
                sequence,
                source,
            },
            // Reading never conflicts, nor goes through postgres-es, nor checks for gaps;
            // should the store say so anyway, it is a failure to read the log.
            other @ (StoreError::Conflict
            | StoreError::Repository(_)
            | StoreError::Gap(..)
            | StoreError::Behind(..)) => LogError::Store(other),
        }
    }
}

/// The newest transaction id every reader may read up to now: all transactions below it
/// have finished. Take it before the reading transaction writes anything.
pub async fn read_horizon(conn: &mut PgConnection) -> Result<u64, LogError> {
    Ok(read::read_horizon(conn).await?)
}

/// Up to `limit` events after `after` whose transaction is below `horizon`, every one
/// decoded.
pub async fn read_after(
    conn: &mut PgConnection,
    after: Position,
    horizon: u64,
    limit: i64,
) -> Result<Vec<LoggedEvent>, LogError> {
    read::read_after(conn, after, horizon, limit)
        .map_err(LogError::from)
        .and_then(|row| async move { Ok(row.decode()?) })
        .try_collect()
        .await
}

/// What one read of the log gave a projection.
#[derive(Debug, Default)]
pub struct Batch {
    /// Of the events read, in log order, those no other event read supersedes: each
    /// aggregate's newest, and each subscription's newest snapshot. Every projection is
    /// last-writer-wins on those keys, so applying these is applying everything read.
    pub events: Vec<LoggedEvent>,
    /// How many events were read.
    pub read: usize,
    /// The position of the last event read (the next checkpoint).
    pub last: Option<Position>,
}

/// Reads like [`read_after`], but decodes only the events the batch still needs (see
/// [`Batch::events`]); the others are skipped after reading their subscription id at most.
/// A replay reads every event of the log, yet decodes about one per customer per batch.
/// An event this process committed is taken from `recent` as it was decided rather than
/// decoded (see [`RecentEvents`]); every event read is taken out of it.
pub async fn read_batch(
    conn: &mut PgConnection,
    after: Position,
    horizon: u64,
    limit: i64,
    recent: &RecentEvents,
) -> Result<Batch, LogError> {
    // Rows are streamed: each is kept only while it is the newest of its aggregate or
    // subscription seen so far, so memory holds about one payload per key, not the batch.
    let mut rows = read::read_after(conn, after, horizon, limit);
    let mut kept: Vec<Option<Kept>> = Vec::new();
    // How many of the two maps below point at each kept row; at 0 its payload is freed.
    let mut holders: Vec<u8> = Vec::new();
    // The newest event of each aggregate, and the newest snapshot of each subscription
    // (see `supersedes`).
    // Each holds (sequence, position, index in `kept`).
    let mut newest_aggregate: HashMap<String, (i64, Position, usize)> = HashMap::new();
    let mut newest_subscription: HashMap<String, (i64, Position, usize)> = HashMap::new();
    let (mut read, mut last) = (0, None);
    while let Some(row) = rows.try_next().await? {
        read += 1;
        let position = row.position()?;
        last = Some(position);
        let aggregate_id = row.aggregate_id();
        let sequence = row.sequence();
        let event_type = row.event_type();
        let payload = row.payload();
        let handed = recent.take(aggregate_id, sequence);
        let newer = |held: Option<&(i64, Position, usize)>| {
            held.is_none_or(|&(s, p, _)| supersedes((sequence, position), (s, p)))
        };
        let for_aggregate = newer(newest_aggregate.get(aggregate_id));
        let subscription = if SNAPSHOT_TYPES.contains(&event_type) {
            let id = match handed.as_ref().and_then(|event| event.snapshot_of()) {
                Some(id) => id.to_owned(),
                None => decode::<SnapshotOf>(payload, aggregate_id, sequence)?.subscription_id(),
            };
            Some(id).filter(|id| newer(newest_subscription.get(id)))
        } else {
            None
        };
        if !for_aggregate && subscription.is_none() {
            continue;
        }
        let index = kept.len();
        let held = match handed {
            Some(event) => Held::Decided(Box::new(event)),
            None => Held::Payload(payload.to_owned()),
        };
        kept.push(Some(Kept {
            aggregate_id: aggregate_id.to_owned(),
            sequence,
            position,
            held,
        }));
        holders.push(0);
        let mut hold = |previous: Option<(i64, Position, usize)>| {
            holders[index] += 1;
            if let Some((_, _, previous)) = previous {
                holders[previous] -= 1;
                if holders[previous] == 0 {
                    kept[previous] = None;
                }
            }
        };
        if for_aggregate {
            hold(newest_aggregate.insert(aggregate_id.to_owned(), (sequence, position, index)));
        }
        if let Some(id) = subscription {
            hold(newest_subscription.insert(id, (sequence, position, index)));
        }
    }
    let events = kept
        .into_iter()
        .flatten()
        .map(|kept| {
            let event = match kept.held {
                Held::Decided(event) => *event,
                Held::Payload(payload) => decode(&payload, &kept.aggregate_id, kept.sequence)?,
            };
            Ok(LoggedEvent {
                aggregate_id: kept.aggregate_id,
                sequence: kept.sequence as u64,
                position: kept.position,
                event,
            })
        })
        .collect::<Result<_, LogError>>()?;
    Ok(Batch { events, read, last })
}

/// Which events of the whole log (below `horizon`) a rebuild needs: each aggregate's
/// newest and each subscription's newest snapshot, chosen as [`read_batch`] chooses them.
/// Only keys are held, never payloads, so memory grows with customers, not events.
#[derive(Debug, Default)]
pub struct Newest {
    /// The `global_seq` of every event needed, grouped by aggregate: each aggregate's at
    /// the place of its newest event in the log, in log order within it. So a chunk of
    /// them holds all of a customer's (but at a chunk's edge), and the projections,
    /// which write a customer's answer once per chunk from its newest event there, write
    /// it once rather than once for each of its subscriptions' snapshots. Every
    /// projection is last-writer-wins on its keys, guarded by version, so the order
    /// between aggregates does not matter; within one it is the log's.
    pub global_seqs: Vec<i64>,
    /// How many events the log holds below the horizon.
    pub read: usize,
    /// The position of the last of them (where the rebuilt projections stand).
    pub last: Option<Position>,
}

pub async fn newest_below(conn: &mut PgConnection, horizon: u64) -> Result<Newest, LogError> {
    // Read in no particular order (a plain scan, no sort of the whole log): the keys'
    // winners are chosen by sequence, ties by log position, and put in log order after.
    // A snapshot comes with its subscription id, or its payload to read the id from.
    let mut rows = read::scan_keys(conn, horizon, &SNAPSHOT_TYPES);
    // (sequence, position) of each key's newest.
    let mut newest_aggregate: HashMap<String, (i64, Position)> = HashMap::new();
    // And each subscription's newest snapshot, with its aggregate.
    let mut newest_subscription: HashMap<String, (i64, Position, String)> = HashMap::new();
    let mut newest = Newest::default();
    while let Some(row) = rows.try_next().await? {
        newest.read += 1;
        let aggregate_id = row.aggregate_id();
        let sequence = row.sequence();
        let candidate = (sequence, row.position()?);
        if newest.last.is_none_or(|last| candidate.1 > last) {
            newest.last = Some(candidate.1);
        }
        match newest_aggregate.get_mut(aggregate_id) {
            Some(held) if supersedes(candidate, *held) => *held = candidate,
            Some(_) => {}
            None => {
                newest_aggregate.insert(aggregate_id.to_owned(), candidate);
            }
        }
        let decoded;
        let subscription_id = match (row.subscription_id(), row.payload()) {
            (Some(id), _) => Some(id),
            (None, Some(payload)) => {
                decoded = decode::<SnapshotOf>(payload, aggregate_id, sequence)?;
                Some(decoded.subscription_id_ref())
            }
            (None, None) => None,
        };
        if let Some(id) = subscription_id {
            match newest_subscription.get_mut(id) {
                Some(held) if supersedes(candidate, (held.0, held.1)) => {
                    *held = (candidate.0, candidate.1, aggregate_id.to_owned());
                }
                Some(_) => {}
                None => {
                    newest_subscription.insert(
                        id.to_owned(),
                        (candidate.0, candidate.1, aggregate_id.to_owned()),
                    );
                }
            }
        }
    }
    // (where its aggregate's group stands: its newest event, the event's own position)
    let group = |aggregate_id: &str| newest_aggregate[aggregate_id].1;
    let mut needed: Vec<(Position, Position)> = newest_aggregate
        .values()
        .map(|&(_, position)| (position, position))
        .chain(
            newest_subscription
                .values()
                .map(|(_, position, aggregate_id)| (group(aggregate_id), *position)),
        )
        .collect();
    needed.sort_unstable();
    needed.dedup();
    newest.global_seqs = needed.into_iter().map(|(_, p)| p.global_seq).collect();
    Ok(newest)
}

/// The events with these `global_seq`s, decoded, in log order.
pub async fn read_by_global_seq(
    conn: &mut PgConnection,
    global_seqs: &[i64],
) -> Result<Vec<LoggedEvent>, LogError> {
    // Sorted here rather than by the server (which would spill the payloads to disk).
    let rows = read::read_by_global_seq(conn, global_seqs).await?;
    let mut events = rows
        .iter()
        .map(|row| row.decode())
        .collect::<Result<Vec<_>, _>>()?;
    events.sort_unstable_by_key(|e| e.position);
    Ok(events)
}

/// A row [`read_batch`] keeps until a newer one of its keys replaces it.
struct Kept {
    aggregate_id: String,
    sequence: i64,
    position: Position,
    held: Held,
}

/// A kept row's event: as this process decided it, or its payload, to decode.
enum Held {
    Decided(Box<SubscriptionEvent>),
    Payload(String),
}

/// Whether `candidate` replaces `held` as the event a projection applies for one key (an
/// aggregate, a subscription), each as (aggregate sequence, position): the higher sequence
/// (a later transaction may hold an older sequence of the same aggregate), and on a tie the
/// earlier in the log. The projections choose the same way within what they are given.
fn supersedes(candidate: (i64, Position), held: (i64, Position)) -> bool {
    candidate.0 > held.0 || (candidate.0 == held.0 && candidate.1 < held.1)
}

/// Decodes a stored payload, naming the event if it cannot.
fn decode<T: serde::de::DeserializeOwned>(
    payload: &str,
    aggregate_id: &str,
    sequence: i64,
) -> Result<T, LogError> {
    Ok(event_store::decode_payload(
        payload,
        aggregate_id,
        sequence,
    )?)
}

/// The event types that carry a subscription snapshot (`subscription`).
const SNAPSHOT_TYPES: [&str; 2] = ["SubscriptionChanged", "SubscriptionReconciled"];

/// Just the subscription id of a snapshot event; serde skips everything else unparsed.
#[derive(Deserialize)]
enum SnapshotOf {
    SubscriptionChanged { subscription: IdOnly },
    SubscriptionReconciled { subscription: IdOnly },
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

impl SnapshotOf {
    fn subscription_id_ref(&self) -> &str {
        match self {
            Self::SubscriptionChanged { subscription }
            | Self::SubscriptionReconciled { subscription } => &subscription.id,
        }
    }

    fn subscription_id(self) -> String {
        match self {
            Self::SubscriptionChanged { subscription }
            | Self::SubscriptionReconciled { subscription } => subscription.id,
        }
    }
}

/// Where the event that brought `aggregate_id` to `version` stands in the log (what a
/// request waits for projections to reach); `None` when the log holds no such event.
pub async fn position_of_version(
    conn: &mut PgConnection,
    aggregate_id: &str,
    version: u64,
) -> Result<Option<Position>, LogError> {
    Ok(read::position_of_version(conn, aggregate_id, version).await?)
}

/// How many events the log holds after `after` (for progress and lag).
pub async fn count_after(conn: &mut PgConnection, after: Position) -> Result<i64, LogError> {
    Ok(read::count_after(conn, after).await?)
}

/// Keeps, for each aggregate, only its newest event of `events`: every event carries the
/// whole view, so older ones in the same batch are superseded.
pub fn newest_per_aggregate(events: &[LoggedEvent]) -> Vec<&LoggedEvent> {
    let mut newest: std::collections::HashMap<&str, &LoggedEvent> =
        std::collections::HashMap::new();
    for event in events {
        let slot = newest.entry(event.aggregate_id.as_str()).or_insert(event);
        if event.sequence > slot.sequence {
            *slot = event;
        }
    }
    let mut out: Vec<_> = newest.into_values().collect();
    out.sort_by_key(|e| e.position);
    out
}
