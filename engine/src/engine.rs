//! The engine: opening and warmup, the public operations, and shutdown.
//!
//! Owns the partitions, the store and the flusher threads. Operations route a
//! key to its partition and, for `Persist` writes, wait for the flusher's
//! group commit. Everything partition-local lives in `partition`, everything
//! about checkpoints in `checkpoint`, everything about RocksDB in `store`.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::checkpoint::{
    CheckpointInfo, CursorBatch, CursorInfo, EventRef, MemReservation, Registration,
};
use crate::config::{EngineBuilder, EngineConfig};
use crate::error::{Error, Result};
use crate::flusher;
use crate::hash_table::HashTable;
use crate::item::{
    Durability, Item, MutationResult, PartitionId, Record, WriteOptions, RELATIVE_EXPIRY_MAX,
};
use crate::online_update::{MarkerSource, RevertReport, WindowInfo};
use crate::partition::{
    partition_of, reserved_cursor_check, MutationKind, Partition, PartitionStart,
};
use crate::stats::{EngineStats, PartitionStats};
use crate::store::{
    check_disk_item, DirLock, DiskView, EngineMeta, Reservation, Store, FORMAT_VERSION,
    MAX_PARTITIONS,
};
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering, RwLock};

/// How writers wake the flusher without a system call per write.
///
/// A write sets the `PENDING` bit ([`mark`](Signal::mark)). While the
/// flusher is busy it naps for the flush interval between rounds and picks the
/// bit up then; only when it has gone idle (a round found nothing) does the
/// next mark wake it through the condition variable. Durable writers and
/// `flush()` always wake it at once ([`notify`](Signal::notify)).
///
/// No wake-up is lost: the writer's `fetch_or(PENDING)` and the flusher's
/// `fetch_or(IDLE)` are read-modify-writes of one word, so one of them
/// always sees the other's bit — the flusher does not sleep, or the writer
/// notifies, under the lock the flusher holds until it waits. This needs
/// only acquire/release ordering, which loom can check (`loom_models`).
#[derive(Default)]
pub(crate) struct Signal {
    state: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

/// Lock/condvar pairs durable writers wait on (see `Shared::persist_slots`).
const PERSIST_SLOTS: usize = 8;

/// One place durable writers wait.
pub(crate) struct PersistSlot {
    lock: Mutex<()>,
    cv: Condvar,
}

impl PersistSlot {
    fn new() -> Self {
        PersistSlot {
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }
}

/// Entries of the open checkpoint `read_cursor_with` copies per hold of a
/// partition's writer lock.
const OPEN_PIECE: usize = 64;

const PENDING: u64 = 1;
const URGENT: u64 = 2;
const IDLE: u64 = 4;

impl Signal {
    /// Records that there is work; wakes the flusher only if it is idle.
    pub(crate) fn mark(&self) {
        if self.state.fetch_or(PENDING, Ordering::AcqRel) & IDLE != 0 {
            self.wake();
        }
    }

    /// Records that there is work and wakes the flusher now.
    pub(crate) fn notify(&self) {
        self.state.fetch_or(PENDING | URGENT, Ordering::AcqRel);
        self.wake();
    }

    fn wake(&self) {
        let _g = self.lock.lock();
        self.cv.notify_all();
    }

    /// Flusher side: naps `busy_nap` after a round that found work (woken
    /// early only by `notify` or `stop`), or waits up to `idle_wait` for any
    /// work.
    pub(crate) fn wait(
        &self,
        found_work: bool,
        busy_nap: Duration,
        idle_wait: Duration,
        stop: &AtomicBool,
    ) {
        let mut g = self.lock.lock();
        if found_work {
            let urgent = self.state.load(Ordering::Acquire) & URGENT != 0;
            if !urgent && !stop.load(Ordering::Acquire) {
                self.cv.wait_for(&mut g, busy_nap);
            }
        } else {
            let before = self.state.fetch_or(IDLE, Ordering::AcqRel);
            if before & (PENDING | URGENT) == 0 && !stop.load(Ordering::Acquire) {
                self.cv.wait_for(&mut g, idle_wait);
            }
        }
        // The round that follows sees everything queued before this point.
        self.state
            .fetch_and(!(PENDING | URGENT | IDLE), Ordering::AcqRel);
        drop(g);
    }
}

/// A replica's engine takes its writes and windows from its primary's stream
/// (`Engine::apply_replicated`) only: one of its own would take a seqno its
/// primary then sends, and the primary's write would be dropped as held.
fn refuse_on_replica(s: &Shared, what: &str) -> Result<()> {
    if s.config.replica {
        return Err(Error::WrongState(format!(
            "{what} on a replica's engine: a replica takes its writes and windows from its \
             primary's stream"
        )));
    }
    Ok(())
}

/// Refuses `what`, a replica's own step, on a primary's engine: its numbers
/// come from a stream and are not reserved on disk first, and a reset
/// numbers a partition from 1 again, so on a primary they would hand out
/// seqnos and checkpoint ids again after a crash (or at once, for a
/// reset). (Before, a library caller could; found by a review.)
pub(crate) fn refuse_on_primary(s: &Shared, what: &str) -> Result<()> {
    if !s.config.replica {
        return Err(Error::WrongState(format!(
            "{what} on a primary's engine: only a replica's engine (`EngineBuilder::replica`) \
             takes them"
        )));
    }
    Ok(())
}

/// How often a durable writer looks again, between wake-ups, at whether a
/// WAL sync failed (its write would then never be durable).
const SYNC_RECHECK: Duration = Duration::from_millis(100);

/// The instant `timeout` from now; a timeout too long to add (say
/// `Duration::MAX`, for "no limit") is about a century. `Instant + Duration`
/// panics on overflow: before, a `persist_timeout` or `replicate_timeout`
/// of `Duration::MAX`, accepted at open, panicked every durable write after
/// the write was made (found by a review).
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(CENTURY))
        .unwrap_or(now)
}

/// A `Durability::Replicate` write's entry kept from de-duplication while the
/// write waits (`Partition::replicate_done` when dropped).
struct ReplicatePending<'a>(&'a Partition, u64);

impl Drop for ReplicatePending<'_> {
    fn drop(&mut self) {
        self.0.replicate_done(self.1);
    }
}

/// Waits for replicas on behalf of `Durability::Replicate` writes. A node
/// installs one with [`Engine::set_replication_gate`]; the engine itself knows
/// nothing of replicas.
pub trait ReplicationGate: Send + Sync {
    /// Returns once a majority of the replicas acknowledged `seqno` of
    /// partition `p` (the node counts them as the larger of its connected
    /// streams and its `min_replicas`), or `Error::Timeout` after `timeout`.
    /// `engine` is the engine the write was made in (a node asks it which
    /// streams still have their cursors).
    fn wait_replicated(
        &self,
        engine: &Engine,
        p: PartitionId,
        seqno: u64,
        timeout: Duration,
    ) -> Result<()>;
}

/// A generation counter that stream readers wait on instead of polling:
/// every change to a checkpoint bumps it; a reader that found nothing waits
/// until it moves. Writers take the lock only while someone waits.
///
/// One word holds both the generation (high 48 bits) and the number of
/// waiters (low 16 bits, so at most 65,535 streams wait at once), so the
/// writer's bump and a waiter's registration are read-modify-writes of the
/// same location: the bump sees the waiter (and notifies under the lock the
/// waiter holds until it waits), or the waiter sees the bump.
#[derive(Default)]
pub(crate) struct ChangeFeed {
    state: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

const FEED_WAITER: u64 = 1;
const FEED_WAITERS: u64 = (1 << 16) - 1;
const FEED_GENERATION: u64 = 1 << 16;

impl ChangeFeed {
    pub(crate) fn bump(&self) {
        let before = self.state.fetch_add(FEED_GENERATION, Ordering::AcqRel);
        if before & FEED_WAITERS != 0 {
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }

    fn current(&self) -> u64 {
        self.state.load(Ordering::Acquire) >> 16
    }

    fn wait(&self, since: u64, timeout: Duration) -> u64 {
        let deadline = deadline_after(timeout);
        let mut g = self.lock.lock();
        if self.state.load(Ordering::Acquire) & FEED_WAITERS == FEED_WAITERS {
            // Too many waiters to register: behave as a poll.
            drop(g);
            return self.current();
        }
        let mut generation = self.state.fetch_add(FEED_WAITER, Ordering::AcqRel) >> 16;
        while generation == since {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            self.cv.wait_for(&mut g, deadline - now);
            generation = self.current();
        }
        self.state.fetch_sub(FEED_WAITER, Ordering::AcqRel);
        drop(g);
        generation
    }
}

/// State shared by the engine handle and its flusher threads.
pub(crate) struct Shared {
    pub(crate) config: EngineConfig,
    pub(crate) store: Store,
    pub(crate) partitions: Vec<Partition>,
    pub(crate) checkpoint_mem: Arc<AtomicUsize>,
    poisoned: Mutex<Option<String>>,
    pub(crate) is_poisoned: AtomicBool,
    pub(crate) shutdown: AtomicBool,
    /// One per flusher thread: a partition's writes wake the thread that
    /// owns it (`p % flusher_threads`), so one thread's wait never clears
    /// another's wake-up.
    pub(crate) flush_signals: Vec<Signal>,
    /// Each flusher thread's niceness as the OS reports it once the thread
    /// has set it (`None` before, or where it cannot be read).
    pub(crate) flusher_nice: Mutex<Vec<Option<i32>>>,
    /// Number of callers waiting for a sync; the flusher syncs while non-zero.
    pub(crate) persist_waiters: AtomicUsize,
    /// Where durable writers wait for their sync: several lock/condvar
    /// pairs, writers spread over them, so waking a whole group after a sync
    /// is several short hand-off chains instead of one long one (a woken
    /// waiter must re-take its mutex, one after the other).
    pub(crate) persist_slots: Box<[PersistSlot]>,
    /// Picks the next waiter's slot.
    pub(crate) persist_next_slot: AtomicUsize,
    /// WAL syncs performed for durable writes (one serves many waiters).
    pub(crate) syncs: AtomicU64,
    /// Bumped on every checkpoint change, for stream readers.
    pub(crate) changes: ChangeFeed,
    /// Where `Replicate` writes wait for replicas (set by a node).
    /// A data handle, `std`'s `Arc` also in a loom build (loom's cannot
    /// hold a trait object).
    pub(crate) gate: RwLock<Option<std::sync::Arc<dyn ReplicationGate>>>,
    /// Held by the flusher for a whole round (it holds the round's batch,
    /// whose buffers are reused), and by a partition reset.
    pub(crate) flush_lock: Mutex<crate::store::FlushBatch>,
    /// Set by `crash()`: the flusher stops without draining.
    pub(crate) aborted: AtomicBool,
    /// Test and benchmark hook: while set, the flusher writes nothing.
    pub(crate) flusher_paused: AtomicBool,
    /// Test hook: the next this-many flush attempts fail.
    pub(crate) injected_flush_failures: AtomicUsize,
    /// Flush writes still to let through before the injected failures
    /// start (`inject_flush_failures_after`).
    pub(crate) injected_flush_skips: AtomicUsize,
    /// The pager's rotation: the next (partition, shard) slot it looks at.
    pub(crate) pager_next: AtomicUsize,
    /// When the expiry pass runs next (`None`: never).
    pub(crate) expiry_due: Mutex<Option<Instant>>,
    /// The (partition, shard) slot the expiry pass goes on from.
    pub(crate) expiry_next: AtomicUsize,
    /// The entry inside that slot's shard the expiry pass goes on from.
    pub(crate) expiry_offset: AtomicUsize,
    recovered_from_crash: bool,
    /// See [`Engine::holds_primary_data`].
    pub(crate) primary_data: AtomicBool,
    /// A replica's primary's `online_update_memory_limit` (0: not known;
    /// see [`Engine::set_primary_window_limit`]).
    pub(crate) primary_window_limit: AtomicUsize,
    /// Disk-snapshot entries spilled to the staging column family.
    pub(crate) snapshot_staged_items: AtomicU64,
    /// Stream cursors the flusher dropped under memory pressure.
    pub(crate) cursors_dropped: AtomicU64,
    /// Live views made (`Engine::disk_view`), naming their copies.
    views_made: AtomicU64,
    /// Entries the flusher expelled from open checkpoints.
    pub(crate) items_expelled: AtomicU64,
    /// Table entries the pager has looked at.
    pub(crate) pager_scanned: AtomicU64,
    /// The pager's last pass evicted and stopped short of its target (see
    /// `pager::run`).
    pub(crate) pager_pending: AtomicBool,
    /// Entries of the pager's current shard (`pager_next`) its last pass
    /// already looked at (see `pager::run`).
    pub(crate) pager_offset: AtomicUsize,
    /// Per partition: the staging column family may hold entries of it (a
    /// snapshot was spilled and not yet cleared).
    pub(crate) staged: Vec<AtomicBool>,
    /// Per partition: a `SnapshotBuffer` of it is open (one at a time: the
    /// staging column family keys its entries by partition and seqno only).
    pub(crate) snapshot_open: Vec<AtomicBool>,
}

impl Shared {
    /// Something was queued on partition `p`: tell its flusher thread and
    /// any waiting stream.
    pub(crate) fn changed(&self, p: PartitionId) {
        // `validate` guarantees at least one flusher thread, so one signal.
        let signals = &self.flush_signals;
        signals[usize::from(p) % signals.len()].mark();
        self.changes.bump();
    }

    /// Takes `bytes` of checkpoint memory for a write about to be queued,
    /// or refuses it with `TempOutOfMemory` (waking the flushers) if that
    /// would pass `checkpoint_memory_limit`.
    pub(crate) fn admit(&self, bytes: usize) -> Result<MemReservation<'_>> {
        let limit = self.config.checkpoint_memory_limit;
        match MemReservation::take(&self.checkpoint_mem, bytes, limit) {
            Ok(r) => Ok(r),
            Err(used) => {
                // Every partition's flusher expels what its cursors have
                // read at its next round (`flusher::relieve_memory_pressure`).
                for p in &self.partitions {
                    p.memory_refused.store(true, Ordering::Release);
                }
                self.notify_flushers();
                Err(Error::TempOutOfMemory {
                    reason: format!(
                        "checkpoint memory holds {used} of its {limit} bytes and this write \
                         needs {bytes}; retry once the flusher has persisted or released \
                         queued entries"
                    ),
                })
            }
        }
    }

    /// Wakes every flusher thread now.
    pub(crate) fn notify_flushers(&self) {
        for signal in &self.flush_signals {
            signal.notify();
        }
    }

    /// Wakes every durable writer (they re-check their seqnos).
    pub(crate) fn wake_persist_waiters(&self) {
        for slot in self.persist_slots.iter() {
            let _g = slot.lock.lock();
            slot.cv.notify_all();
        }
    }

    /// Poisons the engine; the first reason stays (a later caller, or a
    /// racing one, does not replace it).
    pub(crate) fn poison(&self, reason: String) {
        {
            let mut first = self.poisoned.lock();
            if first.is_none() {
                tracing::error!(%reason, "engine poisoned");
                *first = Some(reason);
            }
        }
        self.is_poisoned.store(true, Ordering::Release);
        self.wake_persist_waiters();
    }

    /// Poisons the engine after a failed sync (see
    /// [`Store::sync_failed`](crate::store::Store::sync_failed)): the OS
    /// may have dropped the pages it covered yet report the next sync of
    /// the file a success, so nothing written before it can be called
    /// durable again (PostgreSQL learnt this in 2018, "fsyncgate").
    ///
    /// The reason names the first failed sync the store saw (the disk's
    /// own error), else `fallback`. (Before, the
    /// flusher named its own view of it, "an earlier WAL sync failed", when
    /// it was the first to notice another write's failed sync.)
    pub(crate) fn poison_for_failed_sync(&self, fallback: &str) {
        let detail = self
            .store
            .sync_failure()
            .unwrap_or_else(|| fallback.to_owned());
        self.poison(format!(
            "a WAL sync failed ({detail}): writes it covered may not be on disk, and no later \
             sync can tell; reopen the engine to recover what is"
        ));
    }

    pub(crate) fn check_poisoned(&self) -> Result<()> {
        // A synced write that failed anywhere (a reservation, a window
        // record) poisons the engine at its next call, durable writers
        // waiting or not, and before a close could mark the directory
        // cleanly shut down.
        if !self.is_poisoned.load(Ordering::Acquire) && self.store.sync_failed() {
            self.poison_for_failed_sync("");
        }
        if self.is_poisoned.load(Ordering::Acquire) {
            let reason = self.poisoned.lock().clone().unwrap_or_default();
            return Err(Error::Poisoned(reason));
        }
        Ok(())
    }

    pub(crate) fn partition(&self, p: PartitionId) -> Result<&Partition> {
        // A `match`, not `ok_or`: that would build (and drop) the error on
        // every write.
        match self.partitions.get(usize::from(p)) {
            Some(part) => Ok(part),
            None => Err(Error::NoSuchPartition {
                partition: p,
                count: self.config.partitions,
            }),
        }
    }

    /// Waits until every partition in `targets` has synced up to its seqno,
    /// each `(partition, seqno, resets)` with the partition's reset count
    /// when the seqno was taken: a partition reset meanwhile (a replica
    /// resynchronising it) is an error, not a wait that the new history's
    /// seqnos could end as if the old ones were on disk.
    fn wait_synced(&self, targets: &[(PartitionId, u64, u64)]) -> Result<()> {
        self.wait_synced_within(targets, self.config.persist_timeout)
    }

    /// [`wait_synced`](Self::wait_synced), failing with `Timeout` after
    /// `timeout`.
    fn wait_synced_within(
        &self,
        targets: &[(PartitionId, u64, u64)],
        timeout: Duration,
    ) -> Result<()> {
        let reset = |s: &Shared| {
            targets.iter().find(|&&(p, _, resets)| {
                s.partitions[usize::from(p)]
                    .progress
                    .resets
                    .load(Ordering::Acquire)
                    != resets
            })
        };
        let done = |s: &Shared| {
            targets.iter().all(|&(p, seqno, _)| {
                s.partitions[usize::from(p)]
                    .progress
                    .synced_seqno
                    .load(Ordering::Acquire)
                    >= seqno
            })
        };
        if done(self) {
            return Ok(());
        }
        let deadline = deadline_after(timeout);
        let waiting = crate::sync::Counted::new(&self.persist_waiters);
        self.notify_flushers();
        let slot = &self.persist_slots
            [self.persist_next_slot.fetch_add(1, Ordering::Relaxed) % self.persist_slots.len()];
        let mut g = slot.lock.lock();
        let outcome = loop {
            if let Some(&(p, _, _)) = reset(self) {
                break Err(Some(Error::WrongState(format!(
                    "partition {p} was reset for resynchronisation while this waited for it to \
                     be persisted: what it held before is gone"
                ))));
            }
            if done(self) {
                break Ok(());
            }
            // Poisoned, or about to be: handled once the slot's lock is
            // released, because poisoning wakes every slot, this one
            // included (checking under it deadlocked the writer on its own
            // lock, and then the flusher and `close` behind it).
            if self.is_poisoned.load(Ordering::Acquire) || self.store.sync_failed() {
                break Err(None);
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(Some(Error::Timeout {
                    what: "data to be persisted",
                    millis: timeout.as_millis() as u64,
                }));
            }
            // A synced write elsewhere that failed (a reservation, a window
            // record) wakes nobody: looked at again within `SYNC_RECHECK`.
            slot.cv.wait_for(&mut g, (deadline - now).min(SYNC_RECHECK));
        };
        drop(g);
        drop(waiting);
        match outcome {
            Ok(()) => Ok(()),
            Err(Some(e)) => Err(e),
            Err(None) => Err(self.check_poisoned().err().unwrap_or_else(|| {
                Error::Poisoned("a WAL sync failed: nothing later is durable".into())
            })),
        }
    }
}

/// An open engine. Operations take `&self` and are safe from many threads
/// (wrap the engine in an `Arc`). Dropping it shuts down cleanly, like
/// [`close`](Engine::close) but ignoring errors.
pub struct Engine {
    shared: Option<Arc<Shared>>,
    flushers: Vec<JoinHandle<()>>,
    lock: Option<DirLock>,
    path: PathBuf,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("path", &self.path).finish()
    }
}

impl Engine {
    /// A builder for an engine on the data directory `path`.
    pub fn builder(path: impl AsRef<Path>) -> EngineBuilder {
        EngineBuilder::new(path.as_ref().to_path_buf())
    }

    pub(crate) fn open_with(mut config: EngineConfig) -> Result<Engine> {
        validate(&config)?;
        let started = Instant::now();
        let path = config.path.clone();
        let _span = tracing::info_span!("warmup", path = %path.display()).entered();
        // A new directory's partition count is the builder's: checked
        // before anything is made.
        if !path.join("rocksdb").join("CURRENT").exists() {
            check_flusher_threads(&config, false)?;
        }
        let lock = DirLock::acquire(&path)?;
        // Copies live views read, left by processes that died with them.
        crate::store::remove_stale_view_copies(&path);
        let mut store = Store::open(&path, config.max_open_files).map_err(|e| match e {
            // RocksDB's own `LOCK` held (by a process that is not tapkv:
            // tapkv's holds `tapkv.lock` first). Matched on RocksDB's words
            // for it: "lock" alone matched "block checksum mismatch", and a
            // damaged directory was reported as one in use.
            Error::Storage(msg) if msg.contains("While lock file") => {
                Error::Locked { path: path.clone() }
            }
            other => other,
        })?;
        let disk_meta = store.checked_engine_meta(&path)?;
        let fresh = disk_meta.is_none();
        if let Some(meta) = &disk_meta {
            if config.partitions_from_disk && meta.partitions != config.partitions {
                config.partitions = meta.partitions;
                validate(&config)?;
            }
        }
        check_flusher_threads(&config, disk_meta.is_some())?;
        // Everything that can refuse the directory comes before anything
        // that changes it: a refused directory is left as it was (its own
        // build can still open it; no reservation raised, no failover
        // branch added, still marked clean).
        if let Some(meta) = &disk_meta {
            if meta.partitions != config.partitions {
                return Err(Error::Incompatible {
                    path,
                    reason: format!(
                        "created with {} partitions, opened with {}",
                        meta.partitions, config.partitions
                    ),
                });
            }
            // Format 2 is upgraded in place below.
            if meta.format != 2 && meta.format != FORMAT_VERSION {
                return Err(Error::Incompatible {
                    path,
                    reason: format!(
                        "on-disk format {} but this build reads 2 to {FORMAT_VERSION}",
                        meta.format
                    ),
                });
            }
            // A replica's directory follows its primary: opened as a
            // primary, writes made to it would be rolled back when the
            // replica rejoins. (A primary's directory may seed a replica:
            // its history is the primary's, so the replica resumes from
            // it. And one opened as a replica whose history no session
            // has confirmed yet, `primary_data`, is still its primary's:
            // it may be run as a primary again.)
            if meta.replica == Some(true) && !meta.primary_data && !config.replica {
                return Err(Error::Incompatible {
                    path,
                    reason: "it is a replica's data directory: writes made to it directly would \
                             be rolled back when the replica rejoins its primary; run it with \
                             `tapkv node --replica-of ADDR`, or read it with `tapkv admin`"
                        .into(),
                });
            }
        }
        // Numbers near the top of the range could no longer increase (the
        // arithmetic below would wrap): only corruption makes them.
        let records = (0..config.partitions)
            .map(|p| store.checked_partition_records(p))
            .collect::<Result<Vec<_>>>()?;
        // Every item is read and checked.
        let highs: Vec<u64> = records.iter().map(|(s, _)| s.high_seqno).collect();
        let items = load_items(&store, &config, &highs)?;
        // Keys longer than `max_key_size` (written under a larger one):
        // the limit rises to them unless it was given, when the directory
        // is refused. Before, they were loaded and then refused by every
        // get, delete and evict (found by a review), while the expiry pass
        // still streamed their deletions to replicas that refused them.
        if let Some((len, p, key)) = &items.longest_key {
            if !config.max_key_size_from_disk {
                return Err(Error::Incompatible {
                    path,
                    reason: format!(
                        "partition {p} holds a key of {len} bytes ({}), longer than the \
                         max_key_size of {} given: open it with a max_key_size of at least \
                         {len} (tapkv node --max-key-size), or without one",
                        crate::text::quoted(&key[..key.len().min(64)]),
                        config.max_key_size
                    ),
                });
            }
            tracing::info!(
                partition = p,
                longest = len,
                default = config.max_key_size,
                "the directory holds keys longer than max_key_size: the limit rises to them"
            );
            config.max_key_size = *len;
            // The largest write grew: the memory limits must still take it.
            validate(&config)?;
        }
        // Accepted: only now may the directory change.
        match disk_meta {
            None => store.put_engine_meta(&EngineMeta {
                format: FORMAT_VERSION,
                partitions: config.partitions,
                replica: Some(config.replica),
                primary_data: false,
                branch_pending: false,
            })?,
            Some(meta) => {
                // Format 3 only added the `staging` column family: a format-2
                // directory upgrades in place (and earlier builds can no
                // longer open it). The family is added first, so an upgrade
                // cut short is finished by the next open.
                if meta.format == 2 {
                    tracing::info!(path = %path.display(), "upgrading the data directory from format 2 to 3");
                    store.ensure_staging()?;
                }
                if meta.format != FORMAT_VERSION || meta.replica != Some(config.replica) {
                    store.put_engine_meta(&EngineMeta {
                        format: FORMAT_VERSION,
                        replica: Some(config.replica),
                        // A primary's data (or a directory whose role an
                        // older build did not record), now a replica's:
                        // kept until a replication session confirms the
                        // history matches.
                        primary_data: if meta.replica == Some(config.replica) {
                            meta.primary_data
                        } else {
                            config.replica && meta.replica != Some(true)
                        },
                        ..meta
                    })?;
                }
            }
        }
        let meta = store.engine_meta()?;
        let primary_data = meta.as_ref().is_some_and(|m| m.primary_data);
        let branch_pending = meta.as_ref().is_some_and(|m| m.branch_pending);
        store.ensure_staging()?;
        let clean = fresh || store.was_clean_shutdown()?;
        // A primary's history that ended uncleanly, opened as a replica: the
        // fact outlives this run (whose clean close would hide it), so that
        // the directory's next run as a primary starts a new branch. Written
        // before the clean mark is dropped: a crash in between leaves the
        // mark missing, which says the same.
        if config.replica && primary_data && !clean {
            store.remember_branch()?;
        }
        store.set_clean_shutdown(false)?;
        let checkpoint_mem = Arc::new(AtomicUsize::new(0));
        let step = config.seqno_reservation.max(1);
        let mut partitions = Vec::with_capacity(usize::from(config.partitions));
        // Every partition's reservation and new failover branch, written
        // together and synced once after the loop, before any number is
        // handed out (a crash before the sync hands out nothing: the next
        // open reserves from the records before).
        let mut meta_writes = crate::store::MetaWrites::default();
        for ((p, table), (state, res)) in (0..config.partitions).zip(items.tables).zip(records) {
            let start = PartitionStart {
                high_seqno: if config.replica {
                    state.high_seqno
                } else {
                    state.high_seqno.max(res.seqno)
                },
                disk_high: state.high_seqno,
                checkpoint_id: if config.replica {
                    state.checkpoint_id + 1
                } else {
                    state.checkpoint_id.max(res.checkpoint_id) + 1
                },
                max_cas: state.max_cas,
            };
            // A primary reserves a block ahead. A replica takes its numbers
            // from its primary and reserves only as it applies them; it
            // never lowers the reservation: a primary's directory seeding
            // it may be a primary again, and the numbers its last run
            // handed out stay taken (nor raises it, so a clean round trip
            // through a replica run that applied nothing continues without
            // a gap).
            let reservation = if config.replica {
                Reservation {
                    seqno: start.high_seqno.max(res.seqno),
                    checkpoint_id: start.checkpoint_id.max(res.checkpoint_id),
                }
            } else {
                Reservation {
                    seqno: start.high_seqno + step,
                    checkpoint_id: start.checkpoint_id + (step / 1000).max(1),
                }
            };
            meta_writes.reservation(p, &reservation);
            let part = Partition::new(
                p,
                config.checkpoint,
                &start,
                reservation,
                step,
                Arc::clone(&checkpoint_mem),
                table,
            );
            // A window a primary's directory had open is listed on a
            // replica's open too: its entries may be on other replicas.
            let (lost, lost_now) = store.mark_window_lost(
                p,
                !config.replica || primary_data,
                config.max_failover_entries,
            )?;
            if lost_now && config.replica && primary_data {
                store.remember_branch()?;
            }
            let last_lost = lost.last().cloned();
            *part.lost_windows.lock() = lost;
            let mut log = store.failover_log(p)?;
            // A window lost to a crash *or a clean close* ends a branch too:
            // replicas may hold its entries.
            if log.is_empty() || ((!clean || lost_now || branch_pending) && !config.replica) {
                // A new branch: the history after the persisted seqno that a
                // crash lost must not be confused with what comes next.
                log.push(crate::store::FailoverEntry {
                    uuid: crate::replica::new_uuid(),
                    seqno: state.high_seqno,
                });
                // The newest entries only: a log that grew with every crash
                // would be read whole at every open and sent to every
                // stream.
                let excess = log.len().saturating_sub(config.max_failover_entries);
                log.drain(..excess);
                meta_writes.failover_log(p, &log);
            }
            *part.failover.lock() = log;
            if let Some(lost) = last_lost {
                if lost.start_seqno > state.high_seqno {
                    tracing::warn!(
                        partition = p,
                        checkpoint_id = lost.checkpoint_id,
                        "online-update window was open when the engine stopped: reverted"
                    );
                }
            }
            partitions.push(part);
        }
        // Durable before the pending branch is cleared, and before the
        // engine hands out any number.
        store.write_meta(meta_writes, true)?;
        if branch_pending && !config.replica {
            if let Some(m) = store.engine_meta()? {
                store.put_engine_meta(&EngineMeta {
                    branch_pending: false,
                    ..m
                })?;
            }
        }
        for (part, cas) in partitions.iter().zip(items.max_cas) {
            part.observe_cas(cas);
        }
        tracing::info!(
            items = items.loaded,
            clean_shutdown = clean,
            millis = started.elapsed().as_millis() as u64,
            "warmup complete"
        );
        let shared = Arc::new(Shared {
            store,
            partitions,
            checkpoint_mem,
            poisoned: Mutex::new(None),
            is_poisoned: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            flush_signals: (0..config.flusher_threads.max(1))
                .map(|_| Signal::default())
                .collect(),
            flusher_nice: Mutex::new(vec![None; config.flusher_threads.max(1)]),
            persist_waiters: AtomicUsize::new(0),
            persist_slots: (0..PERSIST_SLOTS).map(|_| PersistSlot::new()).collect(),
            persist_next_slot: AtomicUsize::new(0),
            syncs: AtomicU64::new(0),
            flusher_paused: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            flush_lock: Mutex::new(crate::store::FlushBatch::default()),
            gate: RwLock::new(None),
            changes: ChangeFeed::default(),
            injected_flush_failures: AtomicUsize::new(0),
            injected_flush_skips: AtomicUsize::new(0),
            pager_next: AtomicUsize::new(0),
            expiry_due: Mutex::new(Instant::now().checked_add(config.expiry_pager_interval)),
            expiry_next: AtomicUsize::new(0),
            expiry_offset: AtomicUsize::new(0),
            recovered_from_crash: !clean,
            primary_data: AtomicBool::new(primary_data),
            primary_window_limit: AtomicUsize::new(0),
            snapshot_staged_items: AtomicU64::new(0),
            cursors_dropped: AtomicU64::new(0),
            views_made: AtomicU64::new(0),
            items_expelled: AtomicU64::new(0),
            pager_scanned: AtomicU64::new(0),
            pager_pending: AtomicBool::new(false),
            pager_offset: AtomicUsize::new(0),
            staged: (0..config.partitions)
                .map(|_| AtomicBool::new(false))
                .collect(),
            snapshot_open: (0..config.partitions)
                .map(|_| AtomicBool::new(false))
                .collect(),
            config,
        });
        let flushers = flusher::spawn(&shared)?;
        Ok(Engine {
            shared: Some(shared),
            flushers,
            lock: Some(lock),
            path,
        })
    }

    pub(crate) fn live(&self) -> Result<&Shared> {
        let Some(s) = self.shared.as_deref() else {
            return Err(Error::Closed);
        };
        s.check_poisoned()?;
        Ok(s)
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The settings the engine runs with.
    pub fn config(&self) -> Result<&EngineConfig> {
        Ok(&self.shared.as_deref().ok_or(Error::Closed)?.config)
    }

    /// Number of partitions.
    pub fn num_partitions(&self) -> u16 {
        self.shared.as_deref().map_or(0, |s| s.config.partitions)
    }

    /// The partition `key` belongs to.
    pub fn partition_of(&self, key: &[u8]) -> PartitionId {
        partition_of(key, self.num_partitions())
    }

    fn check_key(&self, s: &Shared, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("the key is empty".into()));
        }
        if key.len() > s.config.max_key_size {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max: s.config.max_key_size,
            });
        }
        Ok(())
    }

    /// A read-only view of what this engine has persisted, as of now: a
    /// point-in-time copy of its store (tables hard-linked, memtables
    /// flushed first) under `DIR/admin-views/`, removed when the view is
    /// dropped (and, if the process died first, when an engine next opens
    /// the directory). A view may outlive its engine. Unlike [`DiskView::open`] beside a running engine,
    /// the engine's compactions cannot delete tables the view has yet to
    /// read (a node's `ADMIN dump` walks one of these).
    pub fn disk_view(&self) -> Result<DiskView> {
        let s = self.live()?;
        // Unique to this process, engine and view (an engine reopened in
        // the same process counts from 0 again; the time tells them apart).
        let n = s.views_made.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let copy = self
            .path
            .join(crate::store::VIEWS_DIR)
            .join(format!("{}-{nanos}-{n}", std::process::id()));
        DiskView::copy_of(&s.store, copy)
    }

    /// Reads `key`.
    pub fn get(&self, key: &[u8]) -> Result<Item> {
        let s = self.live()?;
        self.check_key(s, key)?;
        s.partition(self.partition_of(key))?.get(&s.store, key)
    }

    /// Evicts `key`'s value from memory (it stays on disk and is read back on
    /// access). Only clean (persisted) values can be evicted: a dirty one is
    /// `WrongState`, an absent key `NotFound`.
    pub fn evict(&self, key: &[u8]) -> Result<()> {
        let s = self.live()?;
        self.check_key(s, key)?;
        s.partition(self.partition_of(key))?.evict(key)
    }

    /// START: opens an online-update window on partition `p` and returns its
    /// checkpoint id. Mutations in the window are live and visible to every
    /// cursor but do not reach disk until [`online_update_complete`]
    /// (Self::online_update_complete); [`online_update_revert`]
    /// (Self::online_update_revert) undoes all of them.
    pub fn online_update_start(&self, p: PartitionId) -> Result<u64> {
        let s = self.live()?;
        refuse_on_replica(s, "an online update")?;
        let id = s.partition(p)?.online_update_start(
            &s.store,
            s.config.online_update_memory_limit,
            None,
        )?;
        s.changed(p);
        Ok(id)
    }

    /// COMPLETE: ends partition `p`'s window; everything in it persists.
    /// Returns the window's checkpoint id.
    pub fn online_update_complete(&self, p: PartitionId) -> Result<u64> {
        let s = self.live()?;
        refuse_on_replica(s, "an online update")?;
        let id = s
            .partition(p)?
            .online_update_complete(&s.store, MarkerSource::Local)?;
        s.changed(p);
        Ok(id)
    }

    /// Partition `p`'s open online-update window, if any (what
    /// `stats().partitions[p].window` says, without walking every
    /// partition).
    pub fn online_update_window(&self, p: PartitionId) -> Result<Option<WindowInfo>> {
        Ok(self.live()?.partition(p)?.window_info())
    }

    /// REVERT: undoes every mutation of partition `p`'s window.
    pub fn online_update_revert(&self, p: PartitionId) -> Result<RevertReport> {
        let s = self.live()?;
        refuse_on_replica(s, "an online update")?;
        let report = s
            .partition(p)?
            .online_update_revert(&s.store, MarkerSource::Local)?;
        s.changed(p);
        Ok(report)
    }

    /// Stores `value` under `key`, creating or replacing it. Key and value
    /// are copied into one engine-owned record (any byte container will do:
    /// `&[u8]`, `Vec<u8>`, `Bytes`, `&str`…).
    pub fn set(
        &self,
        key: &[u8],
        value: impl AsRef<[u8]>,
        opts: WriteOptions,
    ) -> Result<MutationResult> {
        self.mutate(MutationKind::Set, key, value.as_ref(), &opts)
    }

    /// Stores `value` under `key` only if the key does not exist.
    pub fn add(
        &self,
        key: &[u8],
        value: impl AsRef<[u8]>,
        opts: WriteOptions,
    ) -> Result<MutationResult> {
        self.mutate(MutationKind::Add, key, value.as_ref(), &opts)
    }

    /// Stores `value` under `key` only if the key exists.
    pub fn replace(
        &self,
        key: &[u8],
        value: impl AsRef<[u8]>,
        opts: WriteOptions,
    ) -> Result<MutationResult> {
        self.mutate(MutationKind::Replace, key, value.as_ref(), &opts)
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &[u8], opts: WriteOptions) -> Result<MutationResult> {
        self.mutate(MutationKind::Delete, key, &[], &opts)
    }

    fn mutate(
        &self,
        kind: MutationKind,
        key: &[u8],
        value: &[u8],
        opts: &WriteOptions,
    ) -> Result<MutationResult> {
        let s = self.live()?;
        self.check_key(s, key)?;
        if value.len() > s.config.max_value_size {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max: s.config.max_value_size,
            });
        }
        // A relative-looking expiry is a time in January 1970: stored as
        // given, the item was dead on arrival yet persisted and streamed
        // (found by a review; the wire takes memcached's relative form and
        // converts it, `absolute_expiry`).
        if kind != MutationKind::Delete && (1..=RELATIVE_EXPIRY_MAX).contains(&opts.expiry) {
            return Err(Error::InvalidArgument(format!(
                "expiry {} is a time in January 1970: WriteOptions::expiry is an absolute Unix \
                 time (0 = never); for a time to live use WriteOptions::with_ttl",
                opts.expiry
            )));
        }
        refuse_on_replica(s, "a write")?;
        let part = s.partition(self.partition_of(key))?;
        let gate = match opts.durability {
            Durability::Replicate => Some(s.gate.read().clone().ok_or_else(|| {
                Error::WrongState(
                    "Durability::Replicate needs replication: run the engine in a node".into(),
                )
            })?),
            _ => None,
        };
        // Read before the write: a reset between the two (only a replica's
        // resynchronisation makes one) fails the wait rather than passing it.
        let resets = opts
            .durability
            .needs_disk()
            .then(|| part.progress.resets.load(Ordering::Acquire));
        let res = part.mutate(&s.store, kind, key, value, opts, |bytes| s.admit(bytes))?;
        s.changed(res.partition);
        // However the waits below end.
        let _pending = gate.as_ref().map(|_| ReplicatePending(part, res.seqno));
        // A Replicate write is on this node's disk too: after a crash the
        // primary rolls its replicas back to what it persisted, so a write
        // only its replicas held would be lost everywhere. Both waits share
        // its `replicate_timeout` (before, the replicas' wait began only
        // once the disk's, bounded by `persist_timeout`, had ended).
        let replicate_deadline = gate
            .as_ref()
            .map(|_| deadline_after(s.config.replicate_timeout));
        if let Some(resets) = resets {
            let timeout = match replicate_deadline {
                Some(_) => s.config.replicate_timeout.min(s.config.persist_timeout),
                None => s.config.persist_timeout,
            };
            s.wait_synced_within(&[(res.partition, res.seqno, resets)], timeout)?;
        }
        if let (Some(gate), Some(deadline)) = (gate, replicate_deadline) {
            let left = deadline.saturating_duration_since(Instant::now());
            gate.wait_replicated(self, res.partition, res.seqno, left)?;
        }
        Ok(res)
    }

    /// Waits until everything written before the call is persisted and synced
    /// (on a partition with an open online-update window: everything before
    /// the window).
    pub fn flush(&self) -> Result<()> {
        let s = self.live()?;
        // The reset count read under the lock a reset takes too: exact.
        let targets: Vec<(PartitionId, u64, u64)> = s
            .partitions
            .iter()
            .map(|p| {
                let w = p.lock();
                let resets = p.progress.resets.load(Ordering::Acquire);
                (p.id, w.flushable_upto(), resets)
            })
            .collect();
        s.wait_synced(&targets)
    }

    /// Closes partition `p`'s open checkpoint and opens a new one; returns the
    /// new checkpoint's id.
    pub fn create_checkpoint(&self, p: PartitionId) -> Result<u64> {
        let s = self.live()?;
        let id = s.partition(p)?.create_checkpoint(&s.store)?;
        s.changed(p);
        Ok(id)
    }

    /// Checkpoints of partition `p`, oldest first.
    pub fn checkpoints(&self, p: PartitionId) -> Result<Vec<CheckpointInfo>> {
        let s = self.live()?;
        Ok(s.partition(p)?.lock().checkpoints.checkpoints())
    }

    /// Cursors of partition `p` (the persistence cursor included).
    pub fn cursors(&self, p: PartitionId) -> Result<Vec<CursorInfo>> {
        let s = self.live()?;
        Ok(s.partition(p)?.lock().checkpoints.cursors())
    }

    /// Partition `p`'s cursor called `name`, if registered (only its own
    /// remaining counts are computed).
    pub fn cursor_info(&self, p: PartitionId, name: &str) -> Result<Option<CursorInfo>> {
        let s = self.live()?;
        Ok(s.partition(p)?.lock().checkpoints.cursor_info(name))
    }

    /// Registers the cursor `name` on partition `p` to read everything after
    /// `from_seqno`. The persistence cursor's name is reserved.
    pub fn register_cursor(
        &self,
        p: PartitionId,
        name: &str,
        from_seqno: u64,
    ) -> Result<Registration> {
        reserved_cursor_check(name)?;
        let s = self.live()?;
        // What a re-registration frees is dropped after the lock.
        let (registration, freed) = s
            .partition(p)?
            .lock()
            .checkpoints
            .register_cursor_freeing(name, from_seqno)?;
        drop(freed);
        Ok(registration)
    }

    /// Reads and consumes up to `max_items` items from cursor `name`.
    pub fn read_cursor(&self, p: PartitionId, name: &str, max_items: usize) -> Result<CursorBatch> {
        reserved_cursor_check(name)?;
        let s = self.live()?;
        let part = s.partition(p)?;
        // Checkpoints the move frees are dropped after the lock is released:
        // freeing thousands of items must not hold up writers.
        let (batch, freed) = {
            let mut w = part.lock();
            let batch = w.checkpoints.peek(name, max_items, usize::MAX, None)?;
            let freed = w.checkpoints.advance(name, &batch)?;
            (batch, freed)
        };
        drop(freed);
        Ok(batch)
    }

    /// Reads and consumes up to `max_items` items from cursor `name`,
    /// calling `visit` for each event in order, and returns how many items
    /// it visited. Closed checkpoints are read without the partition's lock
    /// (a read may stop inside one; the cursor resumes there); entries of
    /// the open checkpoint are copied under the lock (reference counts
    /// only) and visited after it. `read_cursor` without copies, for
    /// readers that encode events as they go (replication streams). On an
    /// error the cursor has not moved and the events visited by this call
    /// must be discarded (a replication stream ends and reconnects).
    pub fn read_cursor_with(
        &self,
        p: PartitionId,
        name: &str,
        max_items: usize,
        visit: impl FnMut(EventRef<'_>),
    ) -> Result<usize> {
        self.read_cursor_within(p, name, (max_items, usize::MAX), visit)
    }

    /// [`read_cursor_with`](Self::read_cursor_with) that also stops once
    /// about `max_bytes` of items were visited (at the first item past it;
    /// at least one item is read if any is there).
    pub fn read_cursor_within(
        &self,
        p: PartitionId,
        name: &str,
        (max_items, max_bytes): (usize, usize),
        mut visit: impl FnMut(EventRef<'_>),
    ) -> Result<usize> {
        reserved_cursor_check(name)?;
        let (max_items, max_bytes) = (max_items.max(1), max_bytes.max(1));
        let s = self.live()?;
        let part = s.partition(p)?;
        let mut w = part.lock();
        let run = w.checkpoints.closed_run(name, None, max_items)?;
        if !run.is_empty() {
            drop(w);
            let progress = run.scan_within((max_items, max_bytes), &mut visit);
            // The cursor moves only once its events were visited. If it was
            // removed, registered again or read by another reader meanwhile
            // this fails (nothing is committed, and the events visited are
            // not this reader's: the caller must discard them).
            let freed = part.lock().checkpoints.commit_run(name, &run, progress)?;
            drop(freed);
            return Ok(progress.items);
        }
        // The open checkpoint: short pieces copied under the lock, so a
        // writer of the partition never waits behind a whole batch.
        let (mut items, mut bytes) = (0, 0);
        let mut registration = None;
        loop {
            let piece = (max_items - items).clamp(1, OPEN_PIECE);
            let batch = w.checkpoints.peek(name, piece, max_bytes - bytes, None)?;
            // Every piece reads for the registration the call began with: a
            // cursor registered again between two pieces (the lock is
            // released while they are visited) belongs to another reader,
            // whose position must not be moved by events handed to this
            // one (found by a review: they were).
            let this = batch.progress.registration();
            if *registration.get_or_insert(this) != this {
                return Err(Error::WrongState(format!(
                    "cursor {name:?} was registered again during this read; the {items} items \
                     read before belong to the old registration"
                )));
            }
            let freed = w.checkpoints.advance(name, &batch)?;
            drop(w);
            drop(freed);
            for ev in &batch.events {
                visit(ev.as_event_ref());
            }
            items += batch.items();
            bytes = bytes.saturating_add(batch.progress.bytes);
            if batch.items() < piece || items >= max_items || bytes >= max_bytes {
                return Ok(items);
            }
            w = part.lock();
        }
    }

    /// Whether partition `p` has a cursor called `name` (a stream's cursor
    /// disappears when the flusher drops it under memory pressure; see
    /// [`EngineConfig::cursor_drop_threshold`](crate::EngineConfig::cursor_drop_threshold)).
    pub fn has_cursor(&self, p: PartitionId, name: &str) -> Result<bool> {
        let s = self.live()?;
        Ok(s.partition(p)?.lock().checkpoints.has_cursor(name))
    }

    /// Drops cursor `name`; returns whether it existed.
    pub fn remove_cursor(&self, p: PartitionId, name: &str) -> Result<bool> {
        reserved_cursor_check(name)?;
        let s = self.live()?;
        // What only this cursor held is freed after the lock is released.
        let (existed, freed) = s
            .partition(p)?
            .lock()
            .checkpoints
            .remove_cursor_freeing(name);
        drop(freed);
        Ok(existed)
    }

    /// Per-partition and engine-wide figures.
    pub fn stats(&self) -> Result<EngineStats> {
        let s = self.shared.as_deref().ok_or(Error::Closed)?;
        let partitions = s
            .partitions
            .iter()
            .map(|p| {
                let (checkpoints, cursors, high, open_id, ck_mem) = {
                    let w = p.lock();
                    (
                        w.checkpoints.checkpoints(),
                        w.checkpoints.cursors(),
                        w.checkpoints.high_seqno(),
                        w.checkpoints.open_checkpoint_id(),
                        w.checkpoints.mem_bytes(),
                    )
                };
                let pr = &p.progress;
                PartitionStats {
                    partition: p.id,
                    items: p.table.len(),
                    mem_bytes: p.table.mem_bytes(),
                    checkpoint_mem_bytes: ck_mem,
                    high_seqno: high,
                    persisted_seqno: pr.persisted_seqno.load(Ordering::Acquire),
                    open_checkpoint_id: open_id,
                    checkpoints,
                    cursors,
                    flushes: pr.flushes.load(Ordering::Relaxed),
                    flushed_items: pr.flushed_items.load(Ordering::Relaxed),
                    flush_failures: pr.flush_failures.load(Ordering::Relaxed),
                    flush_micros_total: pr.flush_micros_total.load(Ordering::Relaxed),
                    last_flush_micros: pr.last_flush_micros.load(Ordering::Relaxed),
                    evicted_items: p.table.evicted(),
                    evicted_bytes: p.table.evicted_bytes(),
                    bg_fetches: pr.bg_fetches.load(Ordering::Relaxed),
                    evictions: pr.evictions.load(Ordering::Relaxed),
                    resets: pr.resets.load(Ordering::Relaxed),
                    expired: pr.expired.load(Ordering::Relaxed),
                    window: p.window_info(),
                    lost_windows: p.lost_windows.lock().clone(),
                }
            })
            .collect();
        Ok(EngineStats {
            partitions,
            checkpoint_mem_bytes: s.checkpoint_mem.load(Ordering::Relaxed),
            checkpoint_mem_limit: s.config.checkpoint_memory_limit,
            syncs: s.syncs.load(Ordering::Relaxed),
            disk_syncs: s.store.disk_syncs(),
            poisoned: s.poisoned.lock().clone(),
            recovered_from_crash: s.recovered_from_crash,
            snapshot_staged_items: s.snapshot_staged_items.load(Ordering::Relaxed),
            cursors_dropped: s.cursors_dropped.load(Ordering::Relaxed),
            items_expelled: s.items_expelled.load(Ordering::Relaxed),
            pager_scanned: s.pager_scanned.load(Ordering::Relaxed),
            flusher_nice: s.flusher_nice.lock().clone(),
        })
    }

    /// Test and operator hook: makes the next `n` flush attempts fail as if
    /// RocksDB had returned an error.
    #[doc(hidden)]
    pub fn inject_flush_failures(&self, n: usize) {
        self.inject_flush_failures_after(0, n);
    }

    /// Test hook: lets the next `ok` RocksDB writes of the flusher through,
    /// then makes `n` fail as if RocksDB had returned an error. A round
    /// writes in parts of whole partitions, so `ok > 0` can fail a round
    /// after some of its partitions are on disk.
    #[doc(hidden)]
    pub fn inject_flush_failures_after(&self, ok: usize, n: usize) {
        if let Some(s) = self.shared.as_deref() {
            s.injected_flush_skips.store(ok, Ordering::Release);
            s.injected_flush_failures.store(n, Ordering::Release);
        }
    }

    /// Test hook: durable writers and `flush` callers waiting for a sync
    /// now.
    #[doc(hidden)]
    pub fn persist_waiters(&self) -> usize {
        self.shared
            .as_deref()
            .map_or(0, |s| s.persist_waiters.load(Ordering::Acquire))
    }

    /// Test hook: makes the next `n` WAL syncs (and synced writes) fail as
    /// if RocksDB had returned an error; the engine is then poisoned (see
    /// `docs/engine.md`, "A failed sync").
    #[doc(hidden)]
    pub fn inject_sync_failures(&self, n: usize) {
        if let Some(s) = self.shared.as_deref() {
            s.store.injected_sync_failures.store(n, Ordering::Release);
        }
    }

    /// Test hook: makes the next `n` writes of an online-update window's
    /// on-disk record (at START, COMPLETE and REVERT) fail as if RocksDB had
    /// returned an error.
    #[doc(hidden)]
    pub fn inject_window_record_failures(&self, n: usize) {
        if let Some(s) = self.shared.as_deref() {
            s.store.injected_window_failures.store(n, Ordering::Release);
        }
    }

    /// The current change generation (see [`wait_for_changes`](Self::wait_for_changes)).
    pub fn change_generation(&self) -> u64 {
        self.shared.as_deref().map_or(0, |s| s.changes.current())
    }

    /// Waits until something is queued in any partition after generation
    /// `since` was read, or `timeout` passes; returns the new generation. Stream
    /// readers use it instead of polling.
    pub fn wait_for_changes(&self, since: u64, timeout: Duration) -> u64 {
        match self.shared.as_deref() {
            Some(s) => s.changes.wait(since, timeout),
            None => since,
        }
    }

    /// Tells a replica its primary's `online_update_memory_limit` (a node
    /// reads it from the primary's HELLO; 0: not known, the default). A
    /// window its primary opens is held to this replica's own limit, by the
    /// bytes the window queues here, when the primary's limit is larger or
    /// not known. With a limit at least the primary's, the replica takes
    /// every entry the primary took, up to twice its own limit: its queued
    /// bytes can exceed the primary's, by versions the stream delivered
    /// before the primary replaced them (the newer version comes later in
    /// the stream and then de-duplicates them), and a replica counting
    /// those against its own limit refused entries its primary had
    /// accepted, stalling its link until the window ended (found by a
    /// review). Twice its limit is a backstop for a stream delivering that
    /// many stale versions at once, which nothing else bounds. A window
    /// already open keeps the admission it started with.
    pub fn set_primary_window_limit(&self, bytes: usize) {
        if let Some(s) = self.shared.as_deref() {
            s.primary_window_limit.store(bytes, Ordering::Release);
        }
    }

    /// Whether this replica's directory held a primary's data and no
    /// replication session has yet confirmed that its history is its
    /// primary's ([`confirm_replica`](Self::confirm_replica)). A node then
    /// refuses to roll its partitions back unless told to: pointed at the
    /// wrong primary, a rollback would replace that data.
    pub fn holds_primary_data(&self) -> bool {
        self.shared
            .as_deref()
            .is_some_and(|s| s.primary_data.load(Ordering::Acquire))
    }

    /// Records (synced) that the directory's history is its primary's: from
    /// now on it is an ordinary replica's (see
    /// [`holds_primary_data`](Self::holds_primary_data)).
    pub fn confirm_replica(&self) -> Result<()> {
        let s = self.live()?;
        if let Some(meta) = s.store.engine_meta()? {
            if meta.primary_data {
                s.store.put_engine_meta(&EngineMeta {
                    primary_data: false,
                    // An ordinary replica's directory is never a primary's
                    // again.
                    branch_pending: false,
                    ..meta
                })?;
            }
        }
        s.primary_data.store(false, Ordering::Release);
        Ok(())
    }

    /// Installs what `Durability::Replicate` writes wait on (a node does this).
    pub fn set_replication_gate(&self, gate: std::sync::Arc<dyn ReplicationGate>) {
        if let Some(s) = self.shared.as_deref() {
            *s.gate.write() = Some(gate);
        }
    }

    /// Test and benchmark hook: pauses (or resumes) the flusher. While paused,
    /// no item is persisted (metadata such as seqno reservations and window
    /// records still is) and durable writes wait. A pause returns once no
    /// flush round is in progress: a round that had started before it has
    /// finished, so no item written after the pause reaches disk (except
    /// through [`run_flush_round`](Self::run_flush_round)). A pager or
    /// expiry pass already running when the pause is set may finish.
    #[doc(hidden)]
    pub fn set_flusher_paused(&self, paused: bool) {
        if let Some(s) = self.shared.as_deref() {
            s.flusher_paused.store(paused, Ordering::Release);
            if paused {
                // Every round holds the lock and checks the flag under it.
                drop(s.flush_lock.lock());
            }
            s.notify_flushers();
        }
    }

    /// Test hook: the next REVERT of partition `p` stops once it holds the
    /// partition (its writer lock and every shard lock) until the returned
    /// hold is released or dropped (at most a minute).
    #[doc(hidden)]
    pub fn hold_next_revert(&self, p: PartitionId) -> Result<crate::online_update::RevertHold> {
        let s = self.live()?;
        let gate = Arc::new(crate::online_update::RevertGate::default());
        *s.partition(p)?.revert_gate.lock() = Some(Arc::clone(&gate));
        Ok(crate::online_update::RevertHold::new(gate))
    }

    /// Test hook: runs an expiry pass now on the calling thread (as the
    /// flusher does every `expiry_pager_interval`); returns the expired
    /// items it deleted.
    #[doc(hidden)]
    pub fn run_expiry_pass(&self) -> Result<usize> {
        Ok(crate::pager::expire(self.live()?, true))
    }

    /// Test hook: runs one flush round over every partition on the calling
    /// thread, even while the flusher is paused; returns whether a full batch
    /// left more to write. With the flusher paused this makes flushing
    /// deterministic: after the first call no background round runs.
    #[doc(hidden)]
    pub fn run_flush_round(&self) -> Result<bool> {
        let s = self.live()?;
        let all: Vec<&Partition> = s.partitions.iter().collect();
        Ok(crate::flusher::run_round(s, &all, true)? == crate::flusher::Round::More)
    }

    /// Simulates a crash for tests: stops the flusher after its current round
    /// and releases the directory without flushing, reserving or marking a
    /// clean shutdown — as if the process had been killed.
    #[doc(hidden)]
    pub fn crash(mut self) {
        if let Some(shared) = self.shared.take() {
            shared.aborted.store(true, Ordering::Release);
            shared.shutdown.store(true, Ordering::Release);
            shared.notify_flushers();
            for t in self.flushers.drain(..) {
                let _ = t.join();
            }
        }
        self.lock.take();
    }

    /// Flushes everything, stops the flusher, marks the directory cleanly shut
    /// down and releases it.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(shared) = self.shared.take() else {
            return Ok(());
        };
        // Unpause first: a flusher that sees the shutdown must also see the
        // pause lifted, or it would stop without writing what is queued.
        shared.flusher_paused.store(false, Ordering::Release);
        shared.shutdown.store(true, Ordering::Release);
        shared.notify_flushers();
        for t in self.flushers.drain(..) {
            if t.join().is_err() {
                shared.poison("a flusher thread panicked".into());
            }
        }
        let result = (|| {
            shared.check_poisoned()?;
            // With several flusher threads, the expiry pass (on the first)
            // can queue deletions in a partition whose own thread has
            // already stopped: with every thread joined, nothing changes
            // any more, so one last drain writes whatever is left.
            flusher::drain_all(&shared)?;
            // A primary's next run goes on from exactly where this one
            // stopped. A replica's numbers are its primary's: its
            // reservation is left as it is (it may still cover numbers a
            // primary's run handed out before the directory seeded it).
            // Written together, unsynced: the WAL sync below makes them
            // durable before the clean mark (one sync, not one a partition).
            let mut exact = crate::store::MetaWrites::default();
            for p in shared.partitions.iter().filter(|_| !shared.config.replica) {
                let w = p.lock();
                exact.reservation(
                    p.id,
                    &Reservation {
                        seqno: w.checkpoints.high_seqno(),
                        checkpoint_id: w.checkpoints.open_checkpoint_id(),
                    },
                );
                // And its CAS clock: CAS values of writes that never reach
                // the disk (a window open at the close) were handed out
                // too, and the next open's clock starts above what the
                // disk records (found by a review).
                if w.cas.last() > 0 {
                    shared.store.raise_max_cas(p.id, w.cas.last())?;
                }
            }
            shared.store.write_meta(exact, false)?;
            shared.store.sync_wal()?;
            shared.store.set_clean_shutdown(true)
        })();
        drop(shared);
        self.lock.take();
        tracing::info!(path = %self.path.display(), ok = result.is_ok(), "engine closed");
        result
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "engine shutdown on drop failed");
        }
    }
}

/// The largest seqno reservation step (2^40): with replicated numbers
/// below `replica::STREAM_NUMBER_LIMIT`, a reservation stays below the
/// bound the open accepts.
pub(crate) const MAX_SEQNO_RESERVATION: u64 = 1 << 40;

/// What warmup read from the items family: a hash table per partition, the
/// highest CAS per partition (tombstones included), the live item count.
struct LoadedItems {
    tables: Vec<HashTable>,
    max_cas: Vec<u64>,
    loaded: u64,
    /// The longest key read (tombstones included): its length, partition
    /// and the key.
    longest_key: Option<(usize, PartitionId, Vec<u8>)>,
}

/// Reads and checks every persisted item ([`check_disk_item`], against each
/// partition's persisted high seqno in `highs`) into a hash
/// table per partition, changing nothing on disk. Values are loaded while
/// keys and resident values stay under the pager's low-water mark; past it
/// items come back with their values on disk only (everything on disk is
/// clean), so a directory larger than memory opens within its quota.
fn load_items(store: &Store, config: &EngineConfig, highs: &[u64]) -> Result<LoadedItems> {
    let n = usize::from(config.partitions);
    let mut out = LoadedItems {
        tables: (0..n).map(|_| HashTable::new()).collect(),
        max_cas: vec![0; n],
        loaded: 0,
        longest_key: None,
    };
    let resident_limit = (config.memory_quota as f64 * config.low_water) as usize;
    let mut resident = 0usize;
    let now = crate::item::now_secs();
    store.for_each_item(|p, key, rec| {
        check_disk_item(p, key, &rec.meta, highs)?;
        if key.len() > config.max_key_size
            && out
                .longest_key
                .as_ref()
                .is_none_or(|(n, ..)| key.len() > *n)
        {
            out.longest_key = Some((key.len(), p, key.to_vec()));
        }
        let i = usize::from(p);
        out.max_cas[i] = out.max_cas[i].max(rec.meta.cas);
        if !rec.deleted {
            // An empty value is kept: evicting it frees nothing and its
            // read would cost a disk fetch. An expired one is not loaded
            // (it reads as absent until the expiry pass deletes it), so it
            // takes no room from live values.
            let expired = rec.meta.is_expired(now);
            let record = if rec.value.is_empty() || (!expired && resident < resident_limit) {
                Record::new(&rec.meta, key, &rec.value)
            } else {
                Record::new_evicted(&rec.meta, key, rec.value.len())
            };
            resident += record.resident_bytes();
            out.tables[i].slot(key).put(record);
            out.loaded += 1;
        }
        Ok(())
    })?;
    Ok(out)
}

/// The largest `max_value_size` an engine accepts: a record's value length
/// and a stream frame's body stay well inside their 32-bit fields.
const MAX_VALUE_SIZE_CAP: usize = 1 << 30;

/// The longest `flush_interval` and `flush_retry_backoff` (60 s).
const MAX_FLUSHER_PAUSE: Duration = Duration::from_secs(60);

/// Flusher threads at most the partitions: `from_disk` when the count is
/// the directory's own (the builder gave none), which the message says.
fn check_flusher_threads(c: &EngineConfig, from_disk: bool) -> Result<()> {
    if c.flusher_threads > usize::from(c.partitions) {
        return Err(Error::InvalidArgument(format!(
            "flusher_threads must be 1..=partitions, got {} for {} partitions{}",
            c.flusher_threads,
            c.partitions,
            if from_disk && c.partitions_from_disk {
                " (the directory's count)"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// Bounds of `max_open_files`.
const MIN_OPEN_FILES: usize = 16;
const MAX_OPEN_FILES: usize = 1_000_000;

fn validate(c: &EngineConfig) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if c.seqno_reservation == 0 || c.seqno_reservation > MAX_SEQNO_RESERVATION {
        return bad(format!(
            "seqno_reservation must be 1..={MAX_SEQNO_RESERVATION}, got {}",
            c.seqno_reservation
        ));
    }
    if c.partitions == 0 || c.partitions > MAX_PARTITIONS {
        return bad(format!(
            "partitions must be 1..={MAX_PARTITIONS}, got {}",
            c.partitions
        ));
    }
    // Written as a negation, so NaN (which fails every comparison) is refused.
    let (low, high) = (c.low_water, c.high_water);
    if !(low > 0.0 && low < high && high <= 1.0) {
        return bad(format!(
            "water marks must satisfy 0 < low < high <= 1, got low {low} and high {high}"
        ));
    }
    // Against the partition count once it is known
    // (`check_flusher_threads`): a directory's own count, read after this
    // first check, when the builder was not given one (before, a reopen of
    // a 64-partition directory with 20 threads was held to the default 16).
    if c.flusher_threads == 0
        || (!c.partitions_from_disk && c.flusher_threads > usize::from(c.partitions))
    {
        return bad(format!(
            "flusher_threads must be 1..=partitions ({}), got {}",
            c.partitions, c.flusher_threads
        ));
    }
    if c.max_failover_entries == 0 {
        return bad("max_failover_entries must be at least 1, got 0".into());
    }
    if c.max_key_size == 0 || c.max_key_size > 65_535 {
        return bad(format!(
            "max_key_size must be 1..=65535, got {}",
            c.max_key_size
        ));
    }
    if c.max_value_size > MAX_VALUE_SIZE_CAP {
        return bad(format!(
            "max_value_size must be at most {MAX_VALUE_SIZE_CAP} (1 GiB), got {}",
            c.max_value_size
        ));
    }
    // The largest write must fit in the memory that admits it, or it would
    // be refused as temporary for ever.
    let item = c.max_key_size + c.max_value_size + crate::item::QUEUED_ITEM_OVERHEAD;
    if c.checkpoint_memory_limit < item {
        return bad(format!(
            "checkpoint_memory_limit (--checkpoint-memory-limit on a node) of {} bytes is \
             smaller than the largest write, {item} bytes (max_key_size {} + max_value_size {} \
             + 64 for its entry): raise it or lower max_value_size (--max-value-size)",
            c.checkpoint_memory_limit, c.max_key_size, c.max_value_size
        ));
    }
    if c.online_update_memory_limit < 2 * item {
        return bad(format!(
            "online_update_memory_limit (--online-update-memory-limit on a node) of {} bytes \
             cannot hold the largest write inside a window, {} bytes (its entry of {item} \
             bytes and the pre-window version a revert restores): raise it or lower \
             max_value_size (--max-value-size)",
            c.online_update_memory_limit,
            2 * item
        ));
    }
    if !(MIN_OPEN_FILES..=MAX_OPEN_FILES).contains(&c.max_open_files) {
        return bad(format!(
            "max_open_files must be {MIN_OPEN_FILES}..={MAX_OPEN_FILES}, got {}",
            c.max_open_files
        ));
    }
    // A checkpoint that may hold nothing is a setting mistake; it used to be
    // taken silently as one item or one byte.
    if c.checkpoint.max_items == 0 || c.checkpoint.max_bytes == 0 {
        return bad(format!(
            "checkpoint limits must be at least 1, got max_items {} and max_bytes {}",
            c.checkpoint.max_items, c.checkpoint.max_bytes
        ));
    }
    if c.flush_batch_max_items == 0 {
        return bad("flush_batch_max_items must be at least 1".into());
    }
    // The flusher's pauses: it sleeps them whole (a longer one stopped
    // persistence, the pager and the expiry pass, and a close waited it
    // out; found by a review).
    for (name, d) in [
        ("flush_interval", c.flush_interval),
        ("flush_retry_backoff", c.flush_retry_backoff),
    ] {
        if d > MAX_FLUSHER_PAUSE {
            return bad(format!(
                "{name} must be at most {MAX_FLUSHER_PAUSE:?}, got {d:?}"
            ));
        }
    }
    // A zero wait reports every durable write as timed out, though it is
    // made (`Duration::MAX` waits without a limit).
    for (name, d) in [
        ("persist_timeout", c.persist_timeout),
        ("replicate_timeout", c.replicate_timeout),
    ] {
        if d.is_zero() {
            return bad(format!("{name} must be more than zero"));
        }
    }
    if !(0..=19).contains(&c.flusher_nice) {
        return bad(format!(
            "flusher_nice must be 0..=19 (a flusher may only lower its priority), got {}",
            c.flusher_nice
        ));
    }
    if c.cursor_drop_threshold.is_nan() || c.cursor_drop_threshold <= 0.0 {
        return bad(format!(
            "cursor_drop_threshold must be above 0, got {}",
            c.cursor_drop_threshold
        ));
    }
    Ok(())
}

/// Loom models of the wake-up handshakes between writers, the flusher and
/// streams. Under loom a timed wait is untimed (see `sync.rs`), so a lost
/// wake-up shows up as a deadlock. Run with
/// `cargo test --release -p tapkv-engine --features loom --lib loom_`.
#[cfg(all(test, any(loom, feature = "loom")))]
mod loom_models {
    use super::{ChangeFeed, Signal};
    use crate::sync::{Arc, AtomicBool, Ordering};
    use std::time::Duration;

    const NAP: Duration = Duration::from_millis(2);
    const IDLE_WAIT: Duration = Duration::from_millis(100);

    /// Explores every interleaving of a flusher's `wait(found_work)` with
    /// another thread running `other(signal, stop)`. A wait nobody ends is
    /// reported by loom as a deadlock.
    fn flusher_waits_with(found_work: bool, other: fn(&Signal, &AtomicBool)) {
        loom::model(move || {
            let signal = Arc::new(Signal::default());
            let stop = Arc::new(AtomicBool::new(false));
            let peer = {
                let (signal, stop) = (Arc::clone(&signal), Arc::clone(&stop));
                loom::thread::spawn(move || other(&signal, &stop))
            };
            signal.wait(found_work, NAP, IDLE_WAIT, &stop);
            peer.join().expect("peer thread");
        });
    }

    /// A writer marks work while the flusher goes idle: whatever the
    /// interleaving, the flusher does not sleep through it. The check is
    /// loom's: a wait nobody ends is reported as a deadlock. (The final
    /// state says nothing more: a mark consumed by the wait and one left
    /// pending for the next round are both correct.)
    #[test]
    fn loom_mark_wakes_an_idle_flusher() {
        flusher_waits_with(false, |signal, _| signal.mark());
    }

    /// A durable writer's urgent notify cuts the flusher's busy nap short.
    #[test]
    fn loom_notify_cuts_a_busy_nap_short() {
        flusher_waits_with(true, |signal, _| signal.notify());
    }

    /// Shutdown wakes an idle flusher: only the stop flag and a plain
    /// wake-up, no PENDING or URGENT bit, so the flusher must honour `stop`.
    #[test]
    fn loom_stop_wakes_an_idle_flusher() {
        flusher_waits_with(false, |signal, stop| {
            stop.store(true, Ordering::Release);
            signal.wake();
        });
    }

    /// A stream waiting for changes sees a write made while it registers.
    #[test]
    fn loom_bump_wakes_a_waiting_stream() {
        loom::model(|| {
            let feed = Arc::new(ChangeFeed::default());
            let since = feed.current();
            let writer = {
                let feed = Arc::clone(&feed);
                loom::thread::spawn(move || feed.bump())
            };
            // The timeout is real time, not modelled: make it long enough
            // that no explored interleaving can reach it.
            let seen = feed.wait(since, Duration::from_secs(3600));
            writer.join().expect("writer thread");
            assert_ne!(seen, since, "the stream woke without seeing the change");
        });
    }
}
