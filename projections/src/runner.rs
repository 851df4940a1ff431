//! One runner over every projection, each a checkpointed reader of the log.
//!
//! Projections come in two kinds, told apart as primait/event_sourcing.rs tells its
//! `TransactionalEventHandler` from its `EventHandler`:
//! - a [`TransactionalProjection`] writes through the transaction that holds its
//!   checkpoint (the platform tables), so what it wrote and where it stands commit
//!   together;
//! - an [`EventualProjection`] writes elsewhere (the Redis cache) and gets no connection
//!   at all: it is applied beside the transaction, at the same time, and its checkpoint is
//!   saved in that transaction only once it succeeded, so a crash in between only applies
//!   a batch again.
//!
//! Each batch is read, applied and checkpointed inside one Postgres transaction that holds
//! the checkpoint rows (`projection_checkpoints`) of the projections it applies locked, so
//! two replicas never apply one projection at once ([`WhenBusy`] says whether to skip or
//! wait). Projections whose checkpoints stand together read each batch once; one that
//! fails (Redis down) drops out and goes on alone, never holding the others back. Every
//! projection must tolerate a batch twice and an older event after a newer one (they skip
//! by version). Never use cqrs-es's in-process queries or `replay_all` for this (see
//! CONVENTIONS.md).
//!
//! The runner also tells requests when their writes are readable: each pass publishes
//! where the projections stand, and [`Projections::wait_until_applied`] waits on that
//! (bounded by a deadline) instead of polling.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_store::recent::RecentEvents;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::{watch, Notify};

use crate::batch::Events;
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

/// A read model kept in Postgres, written through the transaction that holds its
/// checkpoint.
///
/// `apply` gets a batch in log order. It must be idempotent: the same events may come
/// again after a crash, and any event may come after a newer one of the same aggregate was
/// applied. A batch is compacted ([`log::Batch::events`]): of the events read it holds
/// each aggregate's newest and each subscription's newest snapshot, so a projection must
/// be last-writer-wins on those keys. A projection that writes customers' answers takes
/// them from [`Events::answers`], built once for every projection applied with it.
pub trait TransactionalProjection: Send + Sync + 'static {
    /// The projection's one name: its checkpoint row, its `projection` label in the
    /// metrics, what `/readyz` reports. Stored: a new name starts from position 0.
    const NAME: &'static str;

    /// Applies a batch through `tx` (see the trait's documentation).
    fn apply(
        &self,
        tx: &mut PgConnection,
        events: &Events<'_>,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Applies a chunk of a rebuild ([`Projections::replay`]) over what the projection
    /// holds (a rebuild does not clear it first, so that readers find the old rows until
    /// it commits): it must leave what `apply` would leave in an empty projection, so it
    /// also replaces what it holds of the same version when that differs (the answer in
    /// the shape and with the catalogue of now). By default, `apply`.
    fn apply_rebuilding(
        &self,
        tx: &mut PgConnection,
        events: &Events<'_>,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        self.apply(tx, events)
    }

    /// Ends a rebuild: deletes what the projection holds of aggregates other than
    /// `rebuilt` (those the rebuild applied) that the log holds no event of, so that it
    /// holds what a rebuild into an empty projection would.
    fn retain(
        &self,
        tx: &mut PgConnection,
        rebuilt: &HashSet<String>,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// A read model kept outside Postgres (Redis): it gets no connection, and is applied
/// beside the transaction that holds its checkpoint. The same rules as for a
/// [`TransactionalProjection`] hold for `apply`.
pub trait EventualProjection: Send + Sync + 'static {
    /// The projection's one name (see [`TransactionalProjection::NAME`]).
    const NAME: &'static str;

    /// Applies a batch (see [`TransactionalProjection`]).
    fn apply(
        &self,
        events: &Events<'_>,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Applies a chunk of a rebuild ([`Projections::replay`]), after `begin_rebuild`: it
    /// may take a way that is cheaper where it knows what it finds (what it deleted or
    /// noted there), and must leave what `apply` into an empty projection would, whatever
    /// another writer did meanwhile. By default, `apply`.
    fn apply_rebuilding(
        &self,
        events: &Events<'_>,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        self.apply(events)
    }

    /// Before a rebuild from position 0: either deletes everything this projection owns,
    /// or notes what it holds, for `end_rebuild` to delete what the rebuild did not write
    /// again.
    fn begin_rebuild(&self) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// After a rebuild: with `rebuilt` (it applied every chunk, or another process caught
    /// the projection up meanwhile), deletes what `begin_rebuild` noted and the rebuild
    /// did not write again; without (the rebuild failed for it), forgets the note, and
    /// what the log no longer gives stays until it expires or the next replay. By
    /// default, nothing.
    fn end_rebuild(
        &self,
        rebuilt: bool,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        let _ = rebuilt;
        async { Ok(()) }
    }
}

type Boxed<'a> = Pin<Box<dyn Future<Output = Result<(), ProjectionError>> + Send + 'a>>;

/// A [`TransactionalProjection`] with its type erased, so that one runner holds any.
trait InTransaction: Send + Sync {
    fn apply<'a>(&'a self, tx: &'a mut PgConnection, events: &'a Events<'a>) -> Boxed<'a>;
    fn apply_rebuilding<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a Events<'a>,
    ) -> Boxed<'a>;
    fn retain<'a>(&'a self, tx: &'a mut PgConnection, rebuilt: &'a HashSet<String>) -> Boxed<'a>;
}

impl<P: TransactionalProjection> InTransaction for P {
    fn apply<'a>(&'a self, tx: &'a mut PgConnection, events: &'a Events<'a>) -> Boxed<'a> {
        Box::pin(TransactionalProjection::apply(self, tx, events))
    }
    fn apply_rebuilding<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a Events<'a>,
    ) -> Boxed<'a> {
        Box::pin(TransactionalProjection::apply_rebuilding(self, tx, events))
    }
    fn retain<'a>(&'a self, tx: &'a mut PgConnection, rebuilt: &'a HashSet<String>) -> Boxed<'a> {
        Box::pin(TransactionalProjection::retain(self, tx, rebuilt))
    }
}

/// An [`EventualProjection`] with its type erased.
trait Beside: Send + Sync {
    fn apply<'a>(&'a self, events: &'a Events<'a>) -> Boxed<'a>;
    fn apply_rebuilding<'a>(&'a self, events: &'a Events<'a>) -> Boxed<'a>;
    fn begin_rebuild(&self) -> Boxed<'_>;
    fn end_rebuild(&self, rebuilt: bool) -> Boxed<'_>;
}

impl<P: EventualProjection> Beside for P {
    fn apply<'a>(&'a self, events: &'a Events<'a>) -> Boxed<'a> {
        Box::pin(EventualProjection::apply(self, events))
    }
    fn apply_rebuilding<'a>(&'a self, events: &'a Events<'a>) -> Boxed<'a> {
        Box::pin(EventualProjection::apply_rebuilding(self, events))
    }
    fn begin_rebuild(&self) -> Boxed<'_> {
        Box::pin(EventualProjection::begin_rebuild(self))
    }
    fn end_rebuild(&self, rebuilt: bool) -> Boxed<'_> {
        Box::pin(EventualProjection::end_rebuild(self, rebuilt))
    }
}

/// One projection the runner keeps, of either kind.
pub struct Member {
    name: &'static str,
    kind: Kind,
}

enum Kind {
    Transactional(Box<dyn InTransaction>),
    Eventual(Box<dyn Beside>),
}

impl Member {
    pub fn transactional<P: TransactionalProjection>(projection: P) -> Self {
        Self {
            name: P::NAME,
            kind: Kind::Transactional(Box::new(projection)),
        }
    }

    pub fn eventual<P: EventualProjection>(projection: P) -> Self {
        Self {
            name: P::NAME,
            kind: Kind::Eventual(Box::new(projection)),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// What one catch-up (or replay) did for one projection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatchUp {
    pub name: &'static str,
    pub applied: u64,
    pub position: Position,
    /// Another process holds this projection's checkpoint: it was left to that process.
    pub busy: bool,
}

/// What to do when another process holds a projection's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBusy {
    /// Leave it (`CatchUp::busy`): the other process is doing the work.
    Skip,
    /// Wait for it, then go on (replays, and commands that must finish the job).
    Wait,
}

/// Events decoded and applied per step of a rebuild. Small enough that a step's buffers
/// (the rows read, the upserts' arrays, the Redis pipeline) are a few MB, reused from
/// step to step: at 20 000 each step mapped fresh memory for them and the kernel zeroed
/// it (15 % of the machine's CPU in a replay of 1.1 M events, which took 19.1 s and peaked
/// at 870 MB; 15.0 s and 170 MB at 2 000).
const REBUILD_CHUNK: usize = 2_000;

/// How long the runner lets events gather after a pass that found some (see
/// [`Projections::run`]).
const LINGER: Duration = Duration::from_millis(25);

/// The first pause between passes while a request waits (see [`Projections::run`]).
const FIRST_RETRY: Duration = Duration::from_millis(5);

/// The projections of a service and the runner that keeps them. Cheap to clone (shared).
#[derive(Clone)]
pub struct Projections {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    members: Vec<Member>,
    /// Whether each member's last batch failed; such a member goes on alone.
    failing: Vec<AtomicBool>,
    /// Where each member stands as this process last saved it. Every pass publishes, even
    /// one that found nothing or another process holding the work, so that waiters look
    /// again (at the checkpoints in Postgres too).
    applied: watch::Sender<Vec<Position>>,
    /// Requests waiting in [`Projections::wait_until_applied`].
    waiting: AtomicUsize,
    /// Notified by a waiter that wants a pass now.
    wanted: Notify,
    /// Events this process committed, taken rather than decoded (`log::read_batch`).
    recent: RecentEvents,
}

impl Projections {
    /// A runner over `members`, applied in this order (transactional ones in turn through
    /// the transaction, eventual ones beside it).
    ///
    /// # Panics
    /// When two members have the same name (a programming error: they would share a
    /// checkpoint).
    pub fn new(pool: PgPool, members: impl IntoIterator<Item = Member>) -> Self {
        let members: Vec<Member> = members.into_iter().collect();
        for (i, member) in members.iter().enumerate() {
            assert!(
                members[..i].iter().all(|m| m.name != member.name),
                "two projections are named {}",
                member.name
            );
        }
        let (applied, _) = watch::channel(vec![Position::default(); members.len()]);
        Self {
            inner: Arc::new(Inner {
                pool,
                failing: members.iter().map(|_| AtomicBool::new(false)).collect(),
                members,
                applied,
                waiting: AtomicUsize::new(0),
                wanted: Notify::new(),
                recent: RecentEvents::default(),
            }),
        }
    }

    /// Takes the events this process commits from `recent` (where its ledger puts them)
    /// when its passes read them, rather than decoding their payloads. Before the runner
    /// is cloned or run.
    ///
    /// # Panics
    /// When the runner was already cloned.
    pub fn taking_recent(mut self, recent: RecentEvents) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("taking_recent is called before the runner is shared")
            .recent = recent;
        self
    }

    /// Every projection's name, in the runner's order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.inner.members.iter().map(Member::name)
    }

    /// How many events a projection is behind the log.
    pub async fn lag(&self, name: &str) -> Result<i64, ProjectionError> {
        lag(&self.inner.pool, name).await
    }

    fn name(&self, i: usize) -> &'static str {
        self.inner.members[i].name
    }

    fn names_of(&self, group: &[usize]) -> Vec<&'static str> {
        group.iter().map(|&i| self.name(i)).collect()
    }

    fn reports(&self) -> Vec<CatchUp> {
        self.names()
            .map(|name| CatchUp {
                name,
                ..CatchUp::default()
            })
            .collect()
    }

    /// Applies everything the log holds past each projection's checkpoint, in batches of
    /// `batch`, calling `progress` after each batch with a projection's name and the
    /// events it has applied so far. Returns what was done for each, in the runner's
    /// order. The projections go together while their checkpoints stand together; those
    /// that stand apart, are busy elsewhere or failed go on alone (a failed one after the
    /// others). Returns the first failure once every projection had its turn.
    pub async fn catch_up(
        &self,
        batch: i64,
        when_busy: WhenBusy,
        mut progress: impl FnMut(&str, u64) + Send,
    ) -> Result<Vec<CatchUp>, ProjectionError> {
        let mut done = self.reports();
        let caught_up = self
            .catch_up_into(&mut done, batch, when_busy, &mut progress)
            .await;
        // Whatever the pass found, waiters look again.
        self.inner.applied.send_modify(|_| {});
        caught_up.map(|()| done)
    }

    async fn catch_up_into(
        &self,
        done: &mut [CatchUp],
        batch: i64,
        when_busy: WhenBusy,
        progress: &mut (dyn FnMut(&str, u64) + Send),
    ) -> Result<(), ProjectionError> {
        let all: Vec<usize> = (0..self.inner.members.len()).collect();
        ensure_checkpoints(&self.inner.pool, &self.names_of(&all)).await?;
        let (healthy, failing): (Vec<usize>, Vec<usize>) =
            all.into_iter().partition(|&i| !self.is_failing(i));
        let mut groups = VecDeque::from([healthy]);
        groups.extend(failing.into_iter().map(|i| vec![i]));
        let mut first_error = None;
        while let Some(group) = groups.pop_front() {
            if group.is_empty() {
                continue;
            }
            match self
                .catch_up_group(group.clone(), batch, when_busy, done, progress)
                .await
            {
                Ok(rest) => groups.extend(rest),
                // A joint batch failed: each goes on alone, which also reports the failure.
                Err(error) if group.len() > 1 => {
                    tracing::debug!(%error, "a joint projection batch failed; each goes on alone");
                    groups.extend(group.into_iter().map(|i| vec![i]));
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Catches `group` up together for as long as its checkpoints stand together. Returns
    /// the groups still to go: those that stood apart (grouped by where they stand), then
    /// the group without members that dropped out, and each of those alone.
    async fn catch_up_group(
        &self,
        mut group: Vec<usize>,
        batch: i64,
        when_busy: WhenBusy,
        done: &mut [CatchUp],
        progress: &mut (dyn FnMut(&str, u64) + Send),
    ) -> Result<Vec<Vec<usize>>, ProjectionError> {
        let mut next = None;
        let ended = loop {
            match self.step(&group, batch, when_busy, &mut next).await {
                Ok(Step::Applied {
                    read,
                    last,
                    dropped,
                }) => {
                    group.retain(|i| !dropped.contains(i));
                    for &i in &group {
                        done[i].applied += read as u64;
                        done[i].position = last;
                        progress(self.name(i), done[i].applied);
                    }
                    if !dropped.is_empty() {
                        let alone = dropped.into_iter().map(|i| vec![i]);
                        break Ok(std::iter::once(group).chain(alone).collect());
                    }
                }
                Ok(Step::CaughtUp(at)) => {
                    for &i in &group {
                        done[i].position = at;
                    }
                    break Ok(Vec::new());
                }
                Ok(Step::Apart { busy, standing }) => {
                    for i in busy {
                        done[i].busy = true;
                    }
                    break Ok(standing);
                }
                Err(error) => break Err(error),
            }
        };
        if let Some(reading) = next {
            reading.abort();
        }
        ended
    }

    /// One batch for `group`, in one transaction. After a full batch the next one is read
    /// meanwhile (`next`), so that reading the log and writing the projections overlap;
    /// it is used only if it starts where the group stands when its turn comes, and only
    /// if it found something.
    async fn step(
        &self,
        group: &[usize],
        batch: i64,
        when_busy: WhenBusy,
        next: &mut Option<Prefetch>,
    ) -> Result<Step, ProjectionError> {
        let pool = &self.inner.pool;
        let mut tx = pool.begin().await?;
        let horizon = log::read_horizon(&mut tx).await?;
        let held =
            lock_checkpoints(&mut tx, &self.names_of(group), when_busy == WhenBusy::Wait).await?;
        let standing: Vec<(usize, Position)> = group
            .iter()
            .filter_map(|&i| {
                held.iter()
                    .find(|(name, _)| name == self.name(i))
                    .map(|(_, at)| (i, *at))
            })
            .collect();
        let at = match standing.as_slice() {
            [(_, at), rest @ ..]
                if standing.len() == group.len() && rest.iter().all(|(_, p)| p == at) =>
            {
                *at
            }
            _ => {
                tx.rollback().await?;
                let busy = group
                    .iter()
                    .copied()
                    .filter(|i| standing.iter().all(|(s, _)| s != i))
                    .collect();
                return Ok(Step::Apart {
                    busy,
                    standing: by_position(standing),
                });
            }
        };
        let prefetched = match next.take() {
            Some(reading) => match reading.await {
                Ok(Ok((from, read))) if from == at && read.last.is_some() => Some(read),
                _ => None,
            },
            None => None,
        };
        let read = match prefetched {
            Some(read) => read,
            None => log::read_batch(&mut tx, at, horizon, batch, &self.inner.recent).await?,
        };
        let Some(last) = read.last else {
            tx.commit().await?;
            return Ok(Step::CaughtUp(at));
        };
        if read.read as i64 == batch {
            *next = Some(prefetch(pool, last, batch, &self.inner.recent));
        }
        let mut failed = match self.apply(&mut tx, group, &read.events, false).await {
            Ok(failed) => failed,
            Err(error) => {
                tx.rollback().await?;
                return Err(error);
            }
        };
        let kept: Vec<usize> = group
            .iter()
            .copied()
            .filter(|i| failed.iter().all(|(f, _)| f != i))
            .collect();
        if kept.is_empty() {
            tx.rollback().await?;
            return Err(failed.swap_remove(0).1);
        }
        let saved = save_checkpoints(&mut tx, &self.names_of(&kept), last).await;
        commit_or_roll_back(tx, saved).await?;
        self.applied_at(&kept, last);
        Ok(Step::Applied {
            read: read.read,
            last,
            dropped: failed.into_iter().map(|(i, _)| i).collect(),
        })
    }

    /// Applies `events` to every member of `group`: the transactional ones in turn through
    /// `tx`, the eventual ones at the same time beside them. `Err` when a transactional
    /// one failed (the transaction must be rolled back); otherwise the eventual ones that
    /// failed, each marked failing (it drops out and goes on alone).
    async fn apply(
        &self,
        tx: &mut PgConnection,
        group: &[usize],
        events: &[LoggedEvent],
        rebuilding: bool,
    ) -> Result<Vec<(usize, ProjectionError)>, ProjectionError> {
        let members = &self.inner.members;
        // One batch for all of them: the answers the first builds, the others reuse.
        let events = &Events::new(events);
        let in_transaction = async {
            for &i in group {
                if let Kind::Transactional(projection) = &members[i].kind {
                    if rebuilding {
                        projection.apply_rebuilding(tx, events).await?;
                    } else {
                        projection.apply(tx, events).await?;
                    }
                }
            }
            Ok::<_, ProjectionError>(())
        };
        let beside =
            futures_util::future::join_all(group.iter().filter_map(|&i| match &members[i].kind {
                Kind::Eventual(projection) => Some(async move {
                    let applied = if rebuilding {
                        projection.apply_rebuilding(events).await
                    } else {
                        projection.apply(events).await
                    };
                    (i, applied)
                }),
                Kind::Transactional(_) => None,
            }));
        let (in_transaction, beside) = tokio::join!(in_transaction, beside);
        in_transaction?;
        let failed: Vec<(usize, ProjectionError)> = beside
            .into_iter()
            .filter_map(|(i, applied)| applied.err().map(|error| (i, error)))
            .collect();
        for (i, error) in &failed {
            self.mark_failing(*i, error);
        }
        Ok(failed)
    }

    /// Marks member `i` failing (an eventual one dropped out: it goes on alone), and says
    /// so once.
    fn mark_failing(&self, i: usize, error: &ProjectionError) {
        if !self.inner.failing[i].swap(true, Ordering::Relaxed) {
            tracing::info!(projection = self.name(i), %error, "projection failed; it goes on alone");
        }
    }

    fn is_failing(&self, i: usize) -> bool {
        self.inner.failing[i].load(Ordering::Relaxed)
    }

    /// Records (and publishes) that `members` applied the log up to `at`: whichever was
    /// failing has recovered.
    fn applied_at(&self, members: &[usize], at: Position) {
        for &i in members {
            if self.inner.failing[i].swap(false, Ordering::Relaxed) {
                tracing::info!(projection = self.name(i), "projection recovered");
            }
        }
        self.publish(members, at);
    }

    /// Publishes that `members` stand at `at`.
    fn publish(&self, members: &[usize], at: Position) {
        self.inner.applied.send_modify(|applied| {
            for &i in members {
                applied[i] = at;
            }
        });
    }

    /// Makes the eventual projections ready for a rebuild
    /// ([`Projections::begin_rebuild`]), then rebuilds every projection together from the
    /// whole log compacted, each over what it holds (see [`Projections::rebuild`]), then
    /// catches up with what was committed meanwhile, in batches of `batch`. `counted` is told, once the rebuild's first pass has read
    /// the whole log, how many events it holds; `progress` is called as for
    /// [`Projections::catch_up`].
    pub async fn replay(
        &self,
        batch: i64,
        counted: impl FnOnce(u64) + Send,
        mut progress: impl FnMut(&str, u64) + Send,
    ) -> Result<Vec<CatchUp>, ProjectionError> {
        // The rebuild's first pass reads only the log, so it runs beside the eventual
        // projections' preparation (Redis's `SCAN` of a large cache takes about as long).
        let scanning = {
            let pool = self.inner.pool.clone();
            tokio::spawn(async move {
                let mut tx = pool.begin().await?;
                let horizon = log::read_horizon(&mut tx).await?;
                let started = Instant::now();
                let newest = log::newest_below(&mut tx, horizon).await?;
                tracing::info!(
                    read = newest.read,
                    needed = newest.global_seqs.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "rebuild: found each key's newest event"
                );
                tx.rollback().await?;
                Ok::<_, ProjectionError>(newest)
            })
        };
        let beginning = Instant::now();
        if let Err(error) = self.begin_rebuild().await {
            scanning.abort();
            self.forget_rebuild().await;
            return Err(error);
        }
        tracing::info!(
            took_ms = beginning.elapsed().as_millis() as u64,
            "rebuild: noted what the eventual projections hold"
        );
        let newest = match scanning.await.map_err(|_| ProjectionError::Stopped) {
            Ok(Ok(newest)) => newest,
            Ok(Err(error)) | Err(error) => {
                self.forget_rebuild().await;
                return Err(error);
            }
        };
        counted(newest.read as u64);
        let mut done = self.reports();
        let rebuilt = self.rebuild(newest, &mut done, &mut progress).await;
        // What a failed rebuild did not end is forgotten.
        self.forget_rebuild().await;
        rebuilt?;
        let catching_up = Instant::now();
        let rest = self
            .catch_up(batch, WhenBusy::Wait, |name, n| {
                let before = done
                    .iter()
                    .find(|d| d.name == name)
                    .map_or(0, |d| d.applied);
                progress(name, before + n)
            })
            .await?;
        tracing::info!(
            applied = rest.iter().map(|more| more.applied).max().unwrap_or(0),
            took_ms = catching_up.elapsed().as_millis() as u64,
            "replay: caught up after the rebuild"
        );
        for (total, more) in done.iter_mut().zip(rest) {
            total.applied += more.applied;
            total.position = more.position;
        }
        Ok(done)
    }

    /// Makes every eventual projection ready for a rebuild (`begin_rebuild`: `RedisCache`
    /// notes the keys it holds, to delete after the rebuild those it did not write again)
    /// and rewinds their checkpoints to position 0, waiting for any process that is
    /// applying the projections right now. The transactional ones are left as they are:
    /// the rebuild writes over them in one transaction ([`Projections::rebuild`]), so that
    /// until it commits readers find them as they were.
    async fn begin_rebuild(&self) -> Result<(), ProjectionError> {
        let names: Vec<&str> = self.names().collect();
        ensure_checkpoints(&self.inner.pool, &names).await?;
        let eventual: Vec<usize> = (0..names.len())
            .filter(|&i| !self.is_transactional(i))
            .collect();
        let mut tx = self.inner.pool.begin().await?;
        let begun = async {
            lock_checkpoints(&mut tx, &names, true).await?;
            for &i in &eventual {
                if let Kind::Eventual(projection) = &self.inner.members[i].kind {
                    projection.begin_rebuild().await?;
                }
            }
            save_checkpoints(&mut tx, &self.names_of(&eventual), Position::default()).await
        }
        .await;
        commit_or_roll_back(tx, begun).await?;
        self.publish(&eventual, Position::default());
        Ok(())
    }

    /// Tells every eventual projection to forget what `begin_rebuild` noted and the
    /// rebuild did not end (`end_rebuild` without `rebuilt`).
    async fn forget_rebuild(&self) {
        for member in &self.inner.members {
            if let Kind::Eventual(projection) = &member.kind {
                if let Err(error) = projection.end_rebuild(false).await {
                    tracing::warn!(projection = member.name, %error, "a rebuild's note was not forgotten");
                }
            }
        }
    }

    fn is_transactional(&self, i: usize) -> bool {
        matches!(self.inner.members[i].kind, Kind::Transactional(_))
    }

    /// Rebuilds every transactional projection, and every eventual one that
    /// [`Projections::begin_rebuild`] has just made ready, reading the whole log once for
    /// all; each eventual one then ends its rebuild (`end_rebuild`: `RedisCache` deletes
    /// the keys it held that the rebuild did not write again). The
    /// transactional ones are rebuilt over what they hold, in the rebuild's transaction
    /// (`apply_rebuilding`, then `retain` of what the log still names), so a read of the
    /// tables never finds them empty meanwhile: it finds the old rows, then the rebuilt
    /// ones; and a row the rebuild finds as it would write it is not written again. A
    /// first pass (`newest`, made beside `begin_rebuild`) found, from
    /// keys alone, each aggregate's newest event and each subscription's newest snapshot
    /// below a horizon (what compacting the whole log as one batch keeps,
    /// [`log::newest_below`]); now only those are read, decoded and applied, grouped by
    /// customer and in log order within each, in chunks (each read on another connection
    /// while the one before is applied), and the checkpoints are saved at the last of
    /// them, in one transaction (the catch-up after reads on from there). Each customer is
    /// written once however long its history, and memory holds keys, not payloads. A
    /// projection another process caught up since it was made ready is left to the catch-up
    /// that follows; an eventual one that fails drops out (and is caught up from position
    /// 0 after).
    async fn rebuild(
        &self,
        newest: log::Newest,
        done: &mut [CatchUp],
        progress: &mut (dyn FnMut(&str, u64) + Send),
    ) -> Result<(), ProjectionError> {
        let pool = &self.inner.pool;
        let names: Vec<&str> = self.names().collect();
        let mut tx = pool.begin().await?;
        let rebuilt = async {
            let held = lock_checkpoints(&mut tx, &names, true).await?;
            let mut group: Vec<usize> = (0..names.len())
                .filter(|&i| {
                    self.is_transactional(i)
                        || held
                            .iter()
                            .any(|(name, at)| name == names[i] && *at == Position::default())
                })
                .collect();
            // One another process caught up since it was made ready wrote the log over
            // what it held, but not over what the log no longer gives: what it noted goes
            // (a key it wrote again is only read again, from the tables, on its next read).
            for (i, member) in self.inner.members.iter().enumerate() {
                if let Kind::Eventual(projection) = &member.kind {
                    if !group.contains(&i) {
                        if let Err(error) = projection.end_rebuild(true).await {
                            tracing::warn!(projection = member.name, %error, "what a rebuild noted was not deleted");
                        }
                    }
                }
            }
            if group.is_empty() {
                return Ok(None);
            }
            // The aggregates the chunks hold: what the transactional ones keep at the end.
            let mut rebuilt: HashSet<String> = HashSet::new();
            let started = Instant::now();
            // An empty log rebuilds empty read models, at position 0.
            let last = newest.last.unwrap_or_default();
            let read_chunk = |chunk: &[i64]| {
                let (pool, chunk) = (pool.clone(), chunk.to_vec());
                tokio::spawn(async move {
                    let mut conn = pool.acquire().await?;
                    Ok::<_, ProjectionError>(log::read_by_global_seq(&mut conn, &chunk).await?)
                })
            };
            let mut chunks = newest.global_seqs.chunks(REBUILD_CHUNK);
            let mut next = chunks.next().map(read_chunk);
            let (needed, mut applied) = (newest.global_seqs.len() as u128, 0u128);
            while let Some(reading) = next.take() {
                let events = reading.await.map_err(|_| ProjectionError::Stopped)??;
                next = chunks.next().map(read_chunk);
                for event in &events {
                    if !rebuilt.contains(&event.aggregate_id) {
                        rebuilt.insert(event.aggregate_id.clone());
                    }
                }
                for (i, error) in self.apply(&mut tx, &group, &events, true).await? {
                    group.retain(|&g| g != i);
                    if group.is_empty() {
                        return Err(error);
                    }
                }
                // Progress in log events, like the catch-up's: the share of the log the
                // chunks applied so far stand for (the compacted log has fewer events).
                applied += events.len() as u128;
                let covered = (newest.read as u128 * applied / needed.max(1)) as u64;
                for &i in &group {
                    progress(names[i], covered);
                }
            }
            for i in group.clone() {
                match &self.inner.members[i].kind {
                    Kind::Transactional(projection) => {
                        projection.retain(&mut tx, &rebuilt).await?;
                    }
                    Kind::Eventual(projection) => {
                        if let Err(error) = projection.end_rebuild(true).await {
                            // As a chunk that failed: it drops out, and is caught up
                            // from position 0 after.
                            self.mark_failing(i, &error);
                            group.retain(|&g| g != i);
                            if group.is_empty() {
                                return Err(error);
                            }
                        }
                    }
                }
            }
            save_checkpoints(&mut tx, &self.names_of(&group), last).await?;
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "rebuild: applied"
            );
            Ok(Some((newest.read, last, group)))
        }
        .await;
        if let Some((read, last, group)) = commit_or_roll_back(tx, rebuilt).await? {
            self.applied_at(&group, last);
            for i in group {
                done[i].applied = read as u64;
                done[i].position = last;
                progress(done[i].name, done[i].applied);
            }
        }
        Ok(())
    }

    /// Keeps every projection caught up until `stop`, in batches of `batch`: a pass at
    /// once when `committed` is notified (this process wrote events) or a waiter asks,
    /// else every `poll` (events other replicas write wake nobody here). While a request
    /// waits in [`Projections::wait_until_applied`], passes come sooner (from a few
    /// milliseconds, doubling up to `poll`): its events may not be readable yet because a
    /// transaction older than theirs is still running, and that one's end wakes nobody.
    /// After a pass that applied events, fewer than a batch, and while nobody waits, the
    /// next pass comes [`LINGER`] later (events keep coming: fewer, larger passes).
    /// `failed` hears of every pass that failed.
    pub async fn run(
        &self,
        batch: i64,
        committed: Arc<Notify>,
        poll: Duration,
        mut stop: watch::Receiver<bool>,
        mut failed: impl FnMut(&ProjectionError) + Send,
    ) {
        let mut soon = FIRST_RETRY;
        loop {
            if *stop.borrow() {
                return;
            }
            let applied = match self.catch_up(batch, WhenBusy::Skip, |_, _| {}).await {
                Ok(done) => done.iter().map(|d| d.applied).max().unwrap_or(0),
                Err(error) => {
                    failed(&error);
                    0
                }
            };
            // Under load (the pass found events, fewer than a batch), let the next ones
            // gather for a moment, as the inbox workers do: a pass costs a few round trips
            // whatever it carries, and a customer changed twice meanwhile is written once.
            // Not while a request waits for its events.
            if applied > 0
                && (applied as i64) < batch
                && self.inner.waiting.load(Ordering::Relaxed) == 0
            {
                tokio::select! {
                    _ = self.inner.wanted.notified() => {}
                    _ = tokio::time::sleep(LINGER) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let pause = if self.inner.waiting.load(Ordering::Relaxed) > 0 {
                let pause = soon;
                soon = (soon * 2).min(poll);
                pause
            } else {
                soon = FIRST_RETRY;
                poll
            };
            tokio::select! {
                _ = committed.notified() => {}
                _ = self.inner.wanted.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Where this process's runner last published the projections stand (one position per
    /// member, in order); changes after each of its passes. For a follower that must act
    /// after the read models moved (the notifier), without polling.
    pub fn applied(&self) -> watch::Receiver<Vec<Position>> {
        self.inner.applied.subscribe()
    }

    /// Waits until the projections have applied the event that brought `aggregate_id` to
    /// `version`, at most `within`; returns whether they did. It is woken by this
    /// process's runner after each of its passes (and asks it for one at once), then
    /// looks at where the runner published the projections stand and, failing that, at
    /// their checkpoint rows in Postgres: another replica may have done the work. An
    /// eventual projection failing here (Redis down) is not waited for: reads then fall
    /// back to the tables. Nothing sleeps at a fixed interval here.
    pub async fn wait_until_applied(
        &self,
        aggregate_id: &str,
        version: u64,
        within: Duration,
    ) -> Result<bool, ProjectionError> {
        let _waiting = Waiting::new(&self.inner.waiting);
        let mut applied = self.inner.applied.subscribe();
        let waited = tokio::time::timeout(within, async {
            let mut conn = self.inner.pool.acquire().await?;
            let target = log::position_of_version(&mut conn, aggregate_id, version).await?;
            drop(conn);
            let Some(target) = target else {
                return Ok(());
            };
            self.inner.wanted.notify_one();
            loop {
                let awaited: Vec<usize> = (0..self.inner.members.len())
                    .filter(|&i| {
                        matches!(self.inner.members[i].kind, Kind::Transactional(_))
                            || !self.is_failing(i)
                    })
                    .collect();
                let here = {
                    let at = applied.borrow_and_update();
                    awaited.iter().all(|&i| at[i] >= target)
                };
                if here || self.checkpoints_reached(&awaited, target).await? {
                    return Ok(());
                }
                if applied.changed().await.is_err() {
                    // Cannot happen while `self` lives (it holds the sender).
                    return Err(ProjectionError::Stopped);
                }
            }
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(true),
            Ok(Err(error)) => Err(error),
            Err(_) => Ok(false),
        }
    }

    /// Whether the checkpoints of `members` in Postgres all stand at `target` or after.
    async fn checkpoints_reached(
        &self,
        members: &[usize],
        target: Position,
    ) -> Result<bool, ProjectionError> {
        let names = self.names_of(members);
        let rows = sqlx::query(
            "SELECT tx_id::text AS tx_id, global_seq FROM projection_checkpoints WHERE name = ANY($1)",
        )
        .bind(&names)
        .fetch_all(&self.inner.pool)
        .await?;
        let mut reached = rows.len() == names.len();
        for row in &rows {
            reached &= checkpoint_position(row)? >= target;
        }
        Ok(reached)
    }
}

/// Counts a waiter while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Step {
    /// A batch was applied; `dropped` failed (eventual ones) and go on alone.
    Applied {
        read: usize,
        last: Position,
        dropped: Vec<usize>,
    },
    /// Nothing more to read: the group stands at the end of what the log lets it read.
    CaughtUp(Position),
    /// The group cannot go together now (nothing was done): `busy` are held by another
    /// process, `standing` are the others, grouped by where they stand.
    Apart {
        busy: Vec<usize>,
        standing: Vec<Vec<usize>>,
    },
}

/// Groups members by the position they stand at.
fn by_position(mut standing: Vec<(usize, Position)>) -> Vec<Vec<usize>> {
    standing.sort_by_key(|&(i, at)| (at, i));
    let mut groups: Vec<(Position, Vec<usize>)> = Vec::new();
    for (i, at) in standing {
        match groups.last_mut() {
            Some((held, group)) if *held == at => group.push(i),
            _ => groups.push((at, vec![i])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

/// The next batch, being read on another connection while this one is applied.
type Prefetch = tokio::task::JoinHandle<Result<(Position, log::Batch), ProjectionError>>;

fn prefetch(pool: &PgPool, after: Position, batch: i64, recent: &RecentEvents) -> Prefetch {
    let (pool, recent) = (pool.clone(), recent.clone());
    tokio::spawn(async move {
        // In a transaction of its own, so that the read walks the log in order (see
        // `read_horizon`); it writes nothing.
        let mut tx = pool.begin().await?;
        let horizon = log::read_horizon(&mut tx).await?;
        let read = log::read_batch(&mut tx, after, horizon, batch, &recent).await?;
        tx.commit().await?;
        Ok((after, read))
    })
}

async fn ensure_checkpoints(pool: &PgPool, names: &[&str]) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(names)
    .execute(pool)
    .await?;
    Ok(())
}

/// Locks the checkpoints of `names` for this transaction, in name order (so that
/// processes that lock several never deadlock), and returns where each stands. When
/// `wait` is false, those another process holds are left out.
async fn lock_checkpoints(
    tx: &mut PgConnection,
    names: &[&str],
    wait: bool,
) -> Result<Vec<(String, Position)>, ProjectionError> {
    let sql = if wait {
        "SELECT name, tx_id::text AS tx_id, global_seq FROM projection_checkpoints \
         WHERE name = ANY($1) ORDER BY name FOR UPDATE"
    } else {
        "SELECT name, tx_id::text AS tx_id, global_seq FROM projection_checkpoints \
         WHERE name = ANY($1) ORDER BY name FOR UPDATE SKIP LOCKED"
    };
    let rows = sqlx::query(sql).bind(names).fetch_all(&mut *tx).await?;
    rows.iter()
        .map(|row| Ok((row.get("name"), checkpoint_position(row)?)))
        .collect()
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

async fn save_checkpoints(
    tx: &mut PgConnection,
    names: &[&str],
    at: Position,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE projection_checkpoints SET tx_id = $2::text::xid8, global_seq = $3, updated_at = now() \
         WHERE name = ANY($1)",
    )
    .bind(names)
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

/// Where a projection's checkpoint stands (before the first event when it has none), as
/// `conn` sees it: for a follower that must never read past it (the notifier).
pub async fn checkpoint(conn: &mut PgConnection, name: &str) -> Result<Position, ProjectionError> {
    Ok(sqlx::query(
        "SELECT tx_id::text AS tx_id, global_seq FROM projection_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(checkpoint_position)
    .transpose()?
    .unwrap_or_default())
}

/// How many events a projection is behind the log (all of it when it has no checkpoint yet).
pub async fn lag(pool: &PgPool, name: &str) -> Result<i64, ProjectionError> {
    let mut conn = pool.acquire().await?;
    let at = checkpoint(&mut conn, name).await?;
    Ok(log::count_after(&mut conn, at).await?)
}
