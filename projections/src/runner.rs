//! Runs a projection as a checkpointed reader of the log.
//!
//! Each batch is read, applied and checkpointed inside one Postgres transaction that
//! holds the projection's checkpoint row locked, so two replicas never apply the same
//! projection at once, and a crash between apply and checkpoint only makes the next run
//! apply the batch again (which projections tolerate: they skip by version). Never use
//! cqrs-es's in-process queries or `replay_all` for this (see CONVENTIONS.md).

use std::future::Future;

use sqlx::{PgConnection, PgPool, Row};

use crate::log::{self, LogError, LoggedEvent, Position};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("projection storage failed")]
    Database(#[from] sqlx::Error),
    #[error("the Redis cache failed")]
    Redis(#[from] redis::RedisError),
    #[error("cannot encode a projection value")]
    Encode(#[from] serde_json::Error),
    #[error("a task reading the log stopped before it finished")]
    Stopped,
}

/// A read model built from the log.
pub trait Projection: Send + Sync {
    /// The checkpoint's name.
    fn name(&self) -> &'static str;

    /// Applies a batch, in log order. Must be idempotent: the same events may come again
    /// after a crash, and any event may come after a newer one of the same aggregate
    /// was applied. A batch is compacted ([`log::Batch::events`]): of the events read it
    /// holds each aggregate's newest and each subscription's newest snapshot, so a
    /// projection must be last-writer-wins on those keys.
    fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[LoggedEvent],
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Whether `apply` writes through the transaction it is given. A projection that
    /// does not (the Redis cache) is applied beside one that does, at the same time, by
    /// [`catch_up_pair`] and [`rebuild_pair`].
    fn uses_transaction(&self) -> bool {
        true
    }

    /// Deletes everything this projection owns, before a replay from position 0.
    fn clear(
        &self,
        tx: &mut PgConnection,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// What one `catch_up` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatchUp {
    pub applied: u64,
    pub position: Position,
    /// Another process holds this projection's checkpoint: nothing was done.
    pub busy: bool,
}

async fn ensure_checkpoint(pool: &PgPool, name: &str) -> Result<(), ProjectionError> {
    sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

/// The checkpoint of `name`, locked for this transaction; `None` when another process
/// holds it.
async fn lock_checkpoint(
    tx: &mut PgConnection,
    name: &str,
    wait: bool,
) -> Result<Option<Position>, ProjectionError> {
    let sql = if wait {
        "SELECT tx_id::text AS tx_id, global_seq FROM projection_checkpoints WHERE name = $1 FOR UPDATE"
    } else {
        "SELECT tx_id::text AS tx_id, global_seq FROM projection_checkpoints WHERE name = $1 FOR UPDATE SKIP LOCKED"
    };
    let row = sqlx::query(sql).bind(name).fetch_optional(&mut *tx).await?;
    Ok(row.as_ref().map(checkpoint_position).transpose()?)
}

/// The position a `projection_checkpoints` row (selected with `tx_id::text AS tx_id`)
/// holds.
fn checkpoint_position(row: &sqlx::postgres::PgRow) -> Result<Position, LogError> {
    let tx_id: String = row.get("tx_id");
    Ok(Position {
        tx_id: tx_id.parse().map_err(|_| LogError::TxId(tx_id))?,
        global_seq: row.get("global_seq"),
    })
}

async fn save_checkpoint(
    tx: &mut PgConnection,
    name: &str,
    at: Position,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE projection_checkpoints SET tx_id = $2::text::xid8, global_seq = $3, updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(at.tx_id.to_string())
    .bind(at.global_seq)
    .execute(tx)
    .await?;
    Ok(())
}

/// Commits `tx` if `applied` succeeded; otherwise rolls it back at once, releasing the
/// checkpoints it holds (a dropped transaction is only rolled back when its connection is
/// next used, and meanwhile would hold them), and returns the error.
async fn commit_or_roll_back<T>(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    applied: Result<T, ProjectionError>,
) -> Result<T, ProjectionError> {
    match applied {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(error) => {
            tx.rollback().await?;
            Err(error)
        }
    }
}

/// What to do when another process holds the projection's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBusy {
    /// Return at once (`CatchUp::busy`): the other process is doing the work.
    Skip,
    /// Wait for it, then go on (replays, which must finish the job themselves).
    Wait,
}

/// Applies everything the log holds past the projection's checkpoint, in batches of
/// `batch`, calling `progress` after each batch with the number applied so far.
pub async fn catch_up<P: Projection>(
    pool: &PgPool,
    projection: &P,
    batch: i64,
    when_busy: WhenBusy,
    mut progress: impl FnMut(u64) + Send,
) -> Result<CatchUp, ProjectionError> {
    ensure_checkpoint(pool, projection.name()).await?;
    let mut done = CatchUp::default();
    loop {
        let mut tx = pool.begin().await?;
        let horizon = log::read_horizon(&mut tx).await?;
        let Some(at) =
            lock_checkpoint(&mut tx, projection.name(), when_busy == WhenBusy::Wait).await?
        else {
            // End the transaction now: a dropped one is only rolled back when its
            // connection is next used.
            tx.rollback().await?;
            done.busy = true;
            return Ok(done);
        };
        done.position = at;
        let read = log::read_batch(&mut tx, at, horizon, batch).await?;
        let Some(last) = read.last else {
            tx.commit().await?;
            return Ok(done);
        };
        let applied = async {
            projection.apply(&mut tx, &read.events).await?;
            save_checkpoint(&mut tx, projection.name(), last).await
        }
        .await;
        commit_or_roll_back(tx, applied).await?;
        done.applied += read.read as u64;
        done.position = last;
        progress(done.applied);
    }
}

/// Like [`catch_up`] for two projections, reading the log once for both while they stand
/// at the same position (the usual case): each batch is read, applied to `a` then `b`,
/// and both checkpoints saved, in one transaction. When they stand apart, when either is
/// busy elsewhere, or when a joint batch fails (say Redis is down: `a` must not wait for
/// `b`), each goes on alone with [`catch_up`], which also reports the failure.
pub async fn catch_up_pair<A: Projection, B: Projection>(
    pool: &PgPool,
    a: &A,
    b: &B,
    batch: i64,
    when_busy: WhenBusy,
    mut progress: impl FnMut(&str, u64) + Send,
) -> Result<[CatchUp; 2], ProjectionError> {
    ensure_checkpoint(pool, a.name()).await?;
    ensure_checkpoint(pool, b.name()).await?;
    let mut done = [CatchUp::default(), CatchUp::default()];
    let mut next = None;
    loop {
        match together(pool, a, b, batch, when_busy, &mut next).await {
            Ok(Some(Together::Applied { read, last })) => {
                for (i, name) in [a.name(), b.name()].into_iter().enumerate() {
                    done[i].applied += read as u64;
                    done[i].position = last;
                    progress(name, done[i].applied);
                }
            }
            Ok(Some(Together::CaughtUp(at))) => {
                done[0].position = at;
                done[1].position = at;
                return Ok(done);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let first = catch_up(pool, a, batch, when_busy, |n| progress(a.name(), n)).await;
    let second = catch_up(pool, b, batch, when_busy, |n| progress(b.name(), n)).await;
    let (first, second) = (first?, second?);
    for (total, alone) in done.iter_mut().zip([first, second]) {
        total.applied += alone.applied;
        total.position = alone.position;
        total.busy = alone.busy;
    }
    Ok(done)
}

enum Together {
    Applied { read: usize, last: Position },
    CaughtUp(Position),
}

/// Applies `events` to `a`, then `b`; or to both at once when `b` does not write through
/// the transaction (it is handed an idle connection of its own, which it does not use).
async fn apply_both<A: Projection, B: Projection>(
    pool: &PgPool,
    tx: &mut PgConnection,
    a: &A,
    b: &B,
    events: &[LoggedEvent],
) -> Result<(), ProjectionError> {
    // Never wait for a connection while holding the transaction: with none idle, in turn.
    let idle = if b.uses_transaction() {
        None
    } else {
        pool.try_acquire()
    };
    let Some(mut unused) = idle else {
        a.apply(tx, events).await?;
        return b.apply(tx, events).await;
    };
    let (first, second) = tokio::join!(a.apply(tx, events), b.apply(&mut unused, events));
    first.and(second)
}

/// The next batch, being read on another connection while this one is applied.
type Prefetch = tokio::task::JoinHandle<Result<(Position, log::Batch), ProjectionError>>;

fn prefetch(pool: &PgPool, after: Position, batch: i64) -> Prefetch {
    let pool = pool.clone();
    tokio::spawn(async move {
        let mut conn = pool.acquire().await?;
        let horizon = log::read_horizon(&mut conn).await?;
        Ok((
            after,
            log::read_batch(&mut conn, after, horizon, batch).await?,
        ))
    })
}

/// One joint batch; `None` when the two cannot go together now (rolled back, nothing done).
/// After a full batch, the next one is read meanwhile (`next`), so that reading the log
/// and writing the projections overlap; it is used only if it starts where both
/// checkpoints stand when its turn comes, and only if it found something.
async fn together<A: Projection, B: Projection>(
    pool: &PgPool,
    a: &A,
    b: &B,
    batch: i64,
    when_busy: WhenBusy,
    next: &mut Option<Prefetch>,
) -> Result<Option<Together>, ProjectionError> {
    let mut tx = pool.begin().await?;
    let horizon = log::read_horizon(&mut tx).await?;
    let wait = when_busy == WhenBusy::Wait;
    let (Some(at_a), Some(at_b)) = (
        lock_checkpoint(&mut tx, a.name(), wait).await?,
        lock_checkpoint(&mut tx, b.name(), wait).await?,
    ) else {
        tx.rollback().await?;
        return Ok(None);
    };
    if at_a != at_b {
        tx.rollback().await?;
        return Ok(None);
    }
    let prefetched = match next.take() {
        Some(handle) => match handle.await {
            Ok(Ok((from, read))) if from == at_a && read.last.is_some() => Some(read),
            _ => None,
        },
        None => None,
    };
    let read = match prefetched {
        Some(read) => read,
        None => log::read_batch(&mut tx, at_a, horizon, batch).await?,
    };
    let Some(last) = read.last else {
        tx.commit().await?;
        return Ok(Some(Together::CaughtUp(at_a)));
    };
    if read.read as i64 == batch {
        *next = Some(prefetch(pool, last, batch));
    }
    let applied = async {
        apply_both(pool, &mut tx, a, b, &read.events).await?;
        save_checkpoint(&mut tx, a.name(), last).await?;
        save_checkpoint(&mut tx, b.name(), last).await
    }
    .await;
    // On failure each projection goes on alone next.
    commit_or_roll_back(tx, applied).await?;
    Ok(Some(Together::Applied {
        read: read.read,
        last,
    }))
}

/// Clears what the projection owns and rewinds its checkpoint to position 0, waiting for
/// any process that is applying it right now. Follow with [`catch_up`].
pub async fn replay<P: Projection>(pool: &PgPool, projection: &P) -> Result<(), ProjectionError> {
    ensure_checkpoint(pool, projection.name()).await?;
    let mut tx = pool.begin().await?;
    lock_checkpoint(&mut tx, projection.name(), true).await?;
    projection.clear(&mut tx).await?;
    save_checkpoint(&mut tx, projection.name(), Position::default()).await?;
    tx.commit().await?;
    Ok(())
}

/// Events decoded and applied per step of [`rebuild_pair`].
const REBUILD_CHUNK: usize = 20_000;

/// Rebuilds two projections that [`replay`] has just cleared, reading the whole log once
/// for both: a first pass finds, from keys alone, each aggregate's newest event and each
/// subscription's newest snapshot (what compacting the whole log as one batch keeps,
/// [`log::newest_below`]); then only those are read, decoded and applied, in log order,
/// in chunks, and both checkpoints are saved at the end of the log, in one transaction.
/// Each customer is written once however long its history, and memory holds keys, not
/// payloads. If either projection has moved since it was cleared (another process caught
/// it up meanwhile), it only catches up. Either way it ends with [`catch_up_pair`] for
/// what was committed meanwhile.
pub async fn rebuild_pair<A: Projection, B: Projection>(
    pool: &PgPool,
    a: &A,
    b: &B,
    batch: i64,
    mut progress: impl FnMut(&str, u64) + Send,
) -> Result<[CatchUp; 2], ProjectionError> {
    ensure_checkpoint(pool, a.name()).await?;
    ensure_checkpoint(pool, b.name()).await?;
    let mut done = [CatchUp::default(), CatchUp::default()];
    let mut tx = pool.begin().await?;
    let horizon = log::read_horizon(&mut tx).await?;
    let at_a = lock_checkpoint(&mut tx, a.name(), true).await?;
    let at_b = lock_checkpoint(&mut tx, b.name(), true).await?;
    let cleared = Some(Position::default());
    let rebuilt = async {
        if at_a != cleared || at_b != cleared {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let newest = log::newest_below(&mut tx, horizon).await?;
        tracing::info!(
            read = newest.read,
            needed = newest.global_seqs.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "rebuild: found each key's newest event"
        );
        let Some(last) = newest.last else {
            return Ok(None);
        };
        // Each chunk is read and decoded on another connection while the one before it
        // is applied.
        let read_chunk = |chunk: &[i64]| {
            let (pool, chunk) = (pool.clone(), chunk.to_vec());
            tokio::spawn(async move {
                let mut conn = pool.acquire().await?;
                Ok::<_, ProjectionError>(log::read_by_global_seq(&mut conn, &chunk).await?)
            })
        };
        let mut chunks = newest.global_seqs.chunks(REBUILD_CHUNK);
        let mut next = chunks.next().map(read_chunk);
        while let Some(reading) = next.take() {
            let events = reading.await.map_err(|_| ProjectionError::Stopped)??;
            next = chunks.next().map(read_chunk);
            apply_both(pool, &mut tx, a, b, &events).await?;
        }
        save_checkpoint(&mut tx, a.name(), last).await?;
        save_checkpoint(&mut tx, b.name(), last).await?;
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "rebuild: applied"
        );
        Ok(Some((newest.read, last)))
    }
    .await;
    if let Some((read, last)) = commit_or_roll_back(tx, rebuilt).await? {
        for (i, name) in [a.name(), b.name()].into_iter().enumerate() {
            done[i] = CatchUp {
                applied: read as u64,
                position: last,
                busy: false,
            };
            progress(name, done[i].applied);
        }
    }
    let rest = catch_up_pair(pool, a, b, batch, WhenBusy::Wait, |name, n| {
        let i = usize::from(name == b.name());
        progress(name, done[i].applied + n)
    })
    .await?;
    for (total, more) in done.iter_mut().zip(rest) {
        total.applied += more.applied;
        total.position = more.position;
    }
    Ok(done)
}

/// How many events each projection is behind the log.
pub async fn lag(pool: &PgPool, name: &str) -> Result<i64, ProjectionError> {
    let mut conn = pool.acquire().await?;
    let at = sqlx::query(
        "SELECT tx_id::text AS tx_id, global_seq FROM projection_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(checkpoint_position)
    .transpose()?
    // No checkpoint yet: the projection has read nothing.
    .unwrap_or_default();
    Ok(log::count_after(&mut conn, at).await?)
}
