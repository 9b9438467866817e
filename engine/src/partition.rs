//! One partition (vbucket): its hash table, its checkpoint manager, its seqno
//! and CAS clocks, and its persistence progress.
//!
//! Owns the write path of a key: validation against the current value, seqno
//! and CAS assignment, the hash-table update and the checkpoint entry happen
//! under the partition's writer lock, so the checkpoint order is the order of
//! effects. Readers only take a hash-table shard lock; a read of an evicted
//! value fetches it from the store. Online-update windows (START / COMPLETE /
//! REVERT) live in `online_update.rs`; this module records each key's
//! pre-window state when a window is open.

use crate::checkpoint::{CheckpointConfig, CheckpointManager, MemReservation};
use crate::error::{Error, Result};
use crate::hash_table::{Eviction, HashTable, ShardsGuard};
use crate::item::{
    now_secs, Item, ItemMeta, MutationResult, PartitionId, QueueOp, QueuedItem, Record,
    WriteOptions,
};
use crate::online_update::{Undo, Window};
use crate::store::{Reservation, Store};
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering};

/// Name of the cursor the flusher drains; reserved.
pub const PERSISTENCE_CURSOR: &str = "persistence";

/// Refuses `name` if it is the flusher's cursor, which callers of the public
/// cursor API may not register, read, move or remove.
pub(crate) fn reserved_cursor_check(name: &str) -> Result<()> {
    if name == PERSISTENCE_CURSOR {
        return Err(Error::InvalidArgument(format!(
            "cursor name {PERSISTENCE_CURSOR:?} is reserved for the flusher"
        )));
    }
    Ok(())
}

/// Hybrid logical clock for CAS: milliseconds since the epoch in the high 48
/// bits, a counter in the low 16; never goes backwards.
#[derive(Debug)]
pub(crate) struct CasClock {
    last: u64,
}

impl CasClock {
    /// The last CAS handed out (or observed).
    pub(crate) fn last(&self) -> u64 {
        self.last
    }

    /// Raises the floor to `cas` (entries applied from a primary).
    pub(crate) fn observe(&mut self, cas: u64) {
        self.last = self.last.max(cas);
    }

    pub(crate) fn next(&mut self) -> u64 {
        let candidate = coarse_unix_ms() << 16;
        self.last = if candidate > self.last {
            candidate
        } else {
            // Cannot overflow: replicated CAS values are checked to be below
            // `u64::MAX / 4`, and local ones are milliseconds << 16.
            self.last.saturating_add(1)
        };
        self.last
    }
}

/// Milliseconds since the Unix epoch from the kernel's coarse real-time
/// clock: a CAS needs the time to about a kernel tick (1–10 ms with
/// `CONFIG_HZ`), and reading the coarse clock costs about a tenth of
/// reading the precise one (measured 3.6 ns against 33 ns here), which
/// every write pays once.
fn coarse_unix_ms() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        if rc == 0 {
            let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
            let ms = u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000;
            return secs.saturating_mul(1000).saturating_add(ms);
        }
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The kinds of key mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MutationKind {
    Set,
    Add,
    Replace,
    Delete,
    /// A deletion of an item that has expired (the expiry pass): refused
    /// with `NotFound` unless the current version has expired.
    Expire,
}

/// State changed only under the partition's writer lock.
pub(crate) struct PartitionWriter {
    pub(crate) checkpoints: CheckpointManager,
    pub(crate) cas: CasClock,
    reservation: Reservation,
    /// The open online-update window, if any.
    pub(crate) window: Option<Window>,
    /// Seqno ranges of reverted windows the persistence cursor has not yet
    /// passed: their entries are skipped, never written.
    pub(crate) reverted: Vec<(u64, u64)>,
    /// Seqno ranges (START, END) of completed windows the persistence cursor
    /// has not yet passed: a flush round never stops inside one, so a window
    /// reaches the disk whole or not at all.
    pub(crate) completed: Vec<(u64, u64)>,
    /// On a replica: the newest of its primary's checkpoint ids the stream
    /// has started (0: none since the open or the last reset). The
    /// replica's own ids may be ahead of its primary's, but its checkpoint
    /// boundaries follow the primary's (`Engine::replica_checkpoint`).
    pub(crate) primary_checkpoint: u64,
    /// Seqnos of `Durability::Replicate` writes still waiting for their
    /// replicas. Their entries are not de-duplicated: a replica's
    /// acknowledgement of a later seqno counts for them only if the stream
    /// sent them (see `Partition::mutate`).
    pub(crate) replicate_pending: Vec<u64>,
}

impl PartitionWriter {
    /// The highest seqno the persistence cursor may pass now.
    pub(crate) fn persist_barrier(&self) -> Option<u64> {
        self.window.as_ref().map(|w| w.start_seqno - 1)
    }

    /// The highest seqno the flusher can persist now: everything queued, or
    /// with a window open what was queued before its START (not the
    /// barrier: a replica's seqnos can have a gap before START, and a
    /// target in that gap is never reached).
    pub(crate) fn flushable_upto(&self) -> u64 {
        let high = self.checkpoints.high_seqno();
        self.window
            .as_ref()
            .map_or(high, |w| w.before_start.min(high))
    }
}

/// Persistence progress and flush figures, readable without locks.
#[derive(Default)]
pub(crate) struct FlushProgress {
    /// Highest seqno written to RocksDB (maybe not yet synced).
    pub(crate) persisted_seqno: AtomicU64,
    /// Highest seqno known to be synced to stable storage.
    pub(crate) synced_seqno: AtomicU64,
    pub(crate) max_cas: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) flushed_items: AtomicU64,
    pub(crate) flush_failures: AtomicU64,
    pub(crate) flush_micros_total: AtomicU64,
    pub(crate) last_flush_micros: AtomicU64,
    /// Reads that had to fetch an evicted value from disk.
    pub(crate) bg_fetches: AtomicU64,
    /// Values evicted (by the pager or on request).
    pub(crate) evictions: AtomicU64,
    /// Times a replica emptied the partition to resynchronise it.
    pub(crate) resets: AtomicU64,
    /// Expired items the expiry pass deleted.
    pub(crate) expired: AtomicU64,
}

/// Where a partition starts after warmup.
pub(crate) struct PartitionStart {
    /// The highest seqno handed out before (a primary's reservation after
    /// a crash); the next is above it.
    pub(crate) high_seqno: u64,
    /// The highest seqno on disk (at most `high_seqno`): nothing lies
    /// between the two.
    pub(crate) disk_high: u64,
    pub(crate) checkpoint_id: u64,
    pub(crate) max_cas: u64,
}

pub(crate) struct Partition {
    pub(crate) id: PartitionId,
    /// Windows lost to a crash or close before this open, oldest first.
    /// Windows lost to a crash or close (as on disk; a reset clears both).
    pub(crate) lost_windows: Mutex<Vec<crate::store::WindowRecord>>,
    /// A write was refused for checkpoint memory since this partition's
    /// flusher last looked: it then expels persisted entries every cursor
    /// has read whatever the memory (below half the limit it otherwise
    /// keeps them), so clean entries never keep a write out for good. Per
    /// partition, so each flusher thread sees a refusal for its own
    /// partitions, and only a flusher clears it.
    pub(crate) memory_refused: AtomicBool,
    /// Test hook: where the next REVERT stops (`Engine::hold_next_revert`).
    pub(crate) revert_gate: Mutex<Option<Arc<crate::online_update::RevertGate>>>,
    /// Failover log (branches of this partition's history).
    pub(crate) failover: Mutex<Vec<crate::store::FailoverEntry>>,
    /// On a replica: a gap in the seqnos it applied since the stream last
    /// read a checkpoint to its end (or, after its own restart, not known
    /// not to be one). A stream steps over de-duplication holes, each made by a
    /// later entry of the same checkpoint: until the stream has read to the
    /// end of that checkpoint, the replica's state at its high seqno may
    /// lack a version its primary had there (`Engine::replica_history_may_have_gaps`).
    pub(crate) history_gap: AtomicBool,
    pub(crate) table: HashTable,
    writer: Mutex<PartitionWriter>,
    pub(crate) progress: FlushProgress,
    reservation_step: u64,
}

impl Partition {
    pub(crate) fn new(
        id: PartitionId,
        config: CheckpointConfig,
        start: &PartitionStart,
        reservation: Reservation,
        reservation_step: u64,
        shared_mem: Arc<AtomicUsize>,
        table: HashTable,
    ) -> Self {
        let disk_high = start.disk_high.min(start.high_seqno);
        let mut checkpoints = CheckpointManager::starting_at(
            config,
            start.checkpoint_id,
            disk_high + 1,
            start.high_seqno,
            shared_mem,
        );
        // Persisted up to the high seqno: nothing after the disk's end
        // was handed out below it (`flush` waits for it on every
        // partition).
        checkpoints
            .register_cursor(PERSISTENCE_CURSOR, start.high_seqno)
            .expect("registering at the high seqno always succeeds");
        let progress = FlushProgress::default();
        progress
            .persisted_seqno
            .store(start.high_seqno, Ordering::Relaxed);
        progress
            .synced_seqno
            .store(start.high_seqno, Ordering::Relaxed);
        progress.max_cas.store(start.max_cas, Ordering::Relaxed);
        Partition {
            id,
            lost_windows: Mutex::new(Vec::new()),
            revert_gate: Mutex::new(None),
            memory_refused: AtomicBool::new(false),
            failover: Mutex::new(Vec::new()),
            // Not known after a restart: set where there is history.
            history_gap: AtomicBool::new(start.high_seqno > 0),
            table,
            writer: Mutex::new(PartitionWriter {
                checkpoints,
                cas: CasClock {
                    last: start.max_cas,
                },
                reservation,
                window: None,
                reverted: Vec::new(),
                completed: Vec::new(),
                primary_checkpoint: 0,
                replicate_pending: Vec::new(),
            }),
            progress,
            reservation_step: reservation_step.max(1),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, PartitionWriter> {
        self.writer.lock()
    }

    /// Raises the CAS clock floor (warmup).
    pub(crate) fn observe_cas(&self, cas: u64) {
        let mut w = self.writer.lock();
        if cas > w.cas.last {
            w.cas.last = cas;
        }
    }

    /// Reads a key; expired items read as absent; an evicted value is read
    /// back from the store and kept resident again.
    pub(crate) fn get(&self, store: &Store, key: &[u8]) -> Result<Item> {
        // An evicted entry may change while its value is read from disk (a
        // newer write, evicted in turn, or a reset): then look again, for as
        // long as the table names another version each time (others make
        // progress). The same evicted version missing from disk twice is
        // corruption; before, four misses in a row were, even when each
        // was a different version lost to such a race.
        let mut missed: Option<ItemMeta> = None;
        loop {
            let Some(rec) = self.table.get(key) else {
                return Err(Error::NotFound);
            };
            let meta = rec.meta();
            if is_expired(&meta) {
                return Err(Error::NotFound);
            }
            if !rec.is_evicted() {
                return Ok(Item::new(self.id, rec));
            }
            match store.get_item(self.id, key)? {
                // The same version: all of the metadata, since a seqno alone
                // can repeat after a partition reset.
                Some(r) if !r.deleted && r.meta == meta => {
                    self.progress.bg_fetches.fetch_add(1, Ordering::Relaxed);
                    let filled = self
                        .table
                        .slot(key)
                        .fill(key, &meta, &r.value)
                        .unwrap_or_else(|| rec.with_value(&r.value));
                    return Ok(Item::new(self.id, filled));
                }
                _ if missed == Some(meta) => {
                    return Err(Error::Corruption(format!(
                        "evicted key {} of partition {}: the disk does not hold the version \
                         the hash table names",
                        crate::text::quoted(key),
                        self.id
                    )))
                }
                _ => missed = Some(meta),
            }
        }
    }

    /// Evicts `key`'s value if it is persisted; `WrongState` if it is dirty.
    pub(crate) fn evict(&self, key: &[u8]) -> Result<()> {
        let mut slot = self.table.slot(key);
        // Read under the shard lock: a partition reset (which holds every
        // shard) cannot slip in between and make `clean_upto` name seqnos
        // that are no longer on disk.
        let clean_upto = self.progress.persisted_seqno.load(Ordering::Acquire);
        // An expired key reads as absent: `NotFound`, as `get` says.
        match slot.evict(key, clean_upto, now_secs()) {
            None => Err(Error::NotFound),
            Some(Eviction::Dirty) => Err(Error::WrongState(format!(
                "key {} is dirty (not yet persisted, or inside an online-update window); \
                 only clean values can be evicted",
                crate::text::quoted(key)
            ))),
            Some(Eviction::Now) => {
                self.progress.evictions.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Some(Eviction::Already) => Ok(()),
        }
    }

    /// Makes sure the seqno `seqno` and one more checkpoint id than the open
    /// one are covered by the durable reservation.
    pub(crate) fn ensure_reserved(
        &self,
        w: &mut PartitionWriter,
        store: &Store,
        seqno: u64,
    ) -> Result<()> {
        // COMPLETE and REVERT may open two checkpoints (a size-limit close
        // inside `queue`, then their own): cover both.
        let next_ckpt = w.checkpoints.open_checkpoint_id().saturating_add(2);
        if seqno <= w.reservation.seqno && next_ckpt <= w.reservation.checkpoint_id {
            return Ok(());
        }
        let r = Reservation {
            seqno: seqno.max(w.reservation.seqno) + self.reservation_step,
            checkpoint_id: next_ckpt.max(w.reservation.checkpoint_id)
                + (self.reservation_step / 1000).max(1),
        };
        store.put_reservation(self.id, &r)?;
        w.reservation = r;
        Ok(())
    }

    /// Applies a key mutation: checks, assigns seqno and CAS, updates the hash
    /// table and queues the change, all under the writer lock. The key,
    /// value and metadata go into one record shared by table and checkpoint.
    pub(crate) fn mutate<'a>(
        &self,
        store: &Store,
        kind: MutationKind,
        key: &[u8],
        value: &[u8],
        opts: &WriteOptions,
        admit: impl Fn(usize) -> Result<MemReservation<'a>>,
    ) -> Result<MutationResult> {
        let mut w = self.writer.lock();
        if let Some(win) = &w.window {
            // Checked here, under the lock the deletion would run under:
            // the expiry pass's own check of the window, before it reads a
            // shard's expired keys, can be overtaken by a START.
            if kind == MutationKind::Expire {
                return Err(Error::OnlineUpdateOpen {
                    partition: self.id,
                    checkpoint_id: win.checkpoint_id,
                    what: "the expiry pass leaves a partition with an open window alone",
                });
            }
            if opts.durability.needs_disk() {
                return Err(Error::OnlineUpdateOpen {
                    partition: self.id,
                    checkpoint_id: win.checkpoint_id,
                    what: "a Persist or Replicate write cannot be made durable before the window \
                           completes",
                });
            }
        }
        let seqno = w.checkpoints.high_seqno() + 1;
        self.ensure_reserved(&mut w, store, seqno)?;
        let mut slot = self.table.slot(key);
        let (hash, current, undo) = self.touch(w.window.as_ref(), &mut slot, key);
        let expiring = kind == MutationKind::Expire;
        let current = current.filter(|m| is_expired(m) == expiring);
        match (kind, current) {
            (MutationKind::Add, Some(_)) => return Err(Error::Exists),
            (MutationKind::Replace | MutationKind::Delete | MutationKind::Expire, None) => {
                return Err(Error::NotFound)
            }
            _ => {}
        }
        if let Some(expected) = opts.cas {
            match current {
                None => return Err(Error::NotFound),
                Some(meta) if meta.cas != expected => {
                    return Err(Error::CasMismatch {
                        expected,
                        current: meta.cas,
                    })
                }
                Some(_) => {}
            }
        }
        // A rewrite of a key whose open-checkpoint entry a Replicate write
        // is waiting on goes to a new checkpoint instead of replacing that
        // entry: replicas acknowledge seqnos, and one that acknowledged a
        // later seqno must have been sent the waiting write. (Rare: only
        // looked up while such a write waits.)
        if !w.replicate_pending.is_empty()
            && w.checkpoints
                .open_entry_seqno(hash, key)
                .is_some_and(|old| w.replicate_pending.contains(&old))
        {
            w.checkpoints.create_checkpoint();
        }
        let deleting = matches!(kind, MutationKind::Delete | MutationKind::Expire);
        let value = if deleting { &[][..] } else { value };
        let incoming = key.len() + value.len() + crate::item::QUEUED_ITEM_OVERHEAD;
        // Refused at first sight, a write is admitted net of the entry it
        // de-duplicates: rewriting a key of the open checkpoint adds only
        // the difference. (Before, a window refused a second write of a
        // value over half its limit, and went on refusing it until COMPLETE
        // or REVERT: nothing in a window frees. Looked up only on a refusal,
        // so the common write pays nothing for it.)
        let refund = || w.checkpoints.dedup_refund(hash, key);
        let reservation = match admit(incoming) {
            Ok(r) => r,
            Err(e) => match refund() {
                0 => return Err(e),
                r => admit(incoming.saturating_sub(r))?,
            },
        };
        if let Some(win) = &w.window {
            let charge = incoming + Window::undo_charge(undo.as_ref(), key.len());
            if let Err(e) = win.admit(self.id, charge) {
                match refund() {
                    0 => return Err(e),
                    r => win.admit(self.id, charge.saturating_sub(r))?,
                }
            }
        }
        let meta = ItemMeta {
            by_seqno: seqno,
            cas: w.cas.next(),
            // Persisted and replicated revisions are below `u64::MAX / 2`.
            rev_seqno: current.map_or(1, |m| m.rev_seqno.saturating_add(1)),
            flags: if deleting { 0 } else { opts.flags },
            expiry: if deleting { 0 } else { opts.expiry },
        };
        let rec = Record::new(&meta, key, value);
        let op = if deleting {
            slot.remove_hashed(hash, key);
            QueueOp::Deletion
        } else {
            slot.put_hashed(hash, rec.clone());
            QueueOp::Mutation
        };
        drop(slot);
        if let Some(win) = w.window.as_mut() {
            win.remember(hash, undo, &rec, incoming);
        }
        let freed = w.checkpoints.queue_hashed(
            QueuedItem::from_record(op, rec),
            Some(hash),
            Some(reservation),
        );
        if let Some(win) = w.window.as_mut() {
            win.refund(freed);
        }
        if opts.durability == crate::item::Durability::Replicate {
            w.replicate_pending.push(seqno);
        }
        Ok(MutationResult {
            partition: self.id,
            seqno,
            cas: meta.cas,
        })
    }

    /// The Replicate write of `seqno` no longer waits (acknowledged, timed
    /// out or failed): its entry may be de-duplicated again.
    pub(crate) fn replicate_done(&self, seqno: u64) {
        self.writer.lock().replicate_pending.retain(|s| *s != seqno);
    }

    /// Looks `key` up in its locked slot before a write: its hash, the
    /// current metadata (expired or not), and, when `window` is open and has
    /// not touched `key` yet, the key's pre-window state for the undo map.
    pub(crate) fn touch(
        &self,
        window: Option<&Window>,
        slot: &mut ShardsGuard<'_>,
        key: &[u8],
    ) -> (u64, Option<ItemMeta>, Option<Undo>) {
        let (hash, cur) = slot.current_entry(key);
        let meta = cur.map(Record::meta);
        let undo = window.filter(|win| win.first_touch(hash, key)).map(|_| {
            let clean_upto = self.progress.persisted_seqno.load(Ordering::Acquire);
            pre_image(cur, clean_upto)
        });
        (hash, meta, undo)
    }

    /// Whether entries outside an online-update window wait to be persisted:
    /// with a window open, those before its START (the persistence barrier).
    pub(crate) fn has_flushable(&self) -> bool {
        let w = self.lock();
        w.flushable_upto() > self.progress.persisted_seqno.load(Ordering::Acquire)
    }

    /// Closes the open checkpoint on demand; returns the new open id.
    pub(crate) fn create_checkpoint(&self, store: &Store) -> Result<u64> {
        self.create_checkpoint_if(store, |_| true)
            .map(|id| id.unwrap_or_default())
    }

    /// Closes the open checkpoint if `close` says so, decided under the same
    /// lock; returns the new open id if it closed one.
    pub(crate) fn create_checkpoint_if(
        &self,
        store: &Store,
        close: impl FnOnce(&PartitionWriter) -> bool,
    ) -> Result<Option<u64>> {
        let mut w = self.writer.lock();
        if !close(&w) {
            return Ok(None);
        }
        let high = w.checkpoints.high_seqno();
        self.ensure_reserved(&mut w, store, high)?;
        Ok(Some(w.checkpoints.create_checkpoint()))
    }
}

/// What a window records of a key it touches first: nothing if absent; if its
/// version is already on disk, only key and metadata (the value is read back
/// from disk after a revert, so holding it would only cost memory); else the
/// record itself.
pub(crate) fn pre_image(cur: Option<&Record>, clean_upto: u64) -> Option<Record> {
    cur.map(|r| r.without_clean_value(clean_upto))
}

/// Whether `seqno` lies in one of the inclusive `ranges`.
pub(crate) fn in_ranges(ranges: &[(u64, u64)], seqno: u64) -> bool {
    ranges.iter().any(|(a, b)| (*a..=*b).contains(&seqno))
}

pub(crate) fn is_expired(meta: &ItemMeta) -> bool {
    meta.expiry != 0 && meta.is_expired(now_secs())
}

/// The partition a key belongs to: CRC-32 of the key modulo the partition
/// count (stable across versions and platforms, as data placement depends on it).
pub fn partition_of(key: &[u8], partitions: u16) -> PartitionId {
    (crc32fast::hash(key) % u32::from(partitions.max(1))) as PartitionId
}

#[cfg(test)]
mod tests {
    use super::*;

    fn precise_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// The coarse clock reads milliseconds since the epoch, within a tick
    /// of the precise clock, and CAS values carry them in their high bits.
    #[test]
    fn cas_values_carry_the_wall_clock_and_never_go_back() {
        let before = precise_ms();
        let coarse = coarse_unix_ms();
        let after = precise_ms();
        // The coarse clock is the last tick's time: never ahead, behind by
        // about a tick (10 ms on a 100 Hz kernel; 500 ms of margin for a
        // virtual machine whose timekeeping CPU the host held up, found by
        // a flakiness review).
        assert!(
            coarse <= after + 1 && coarse + 500 >= before,
            "coarse clock {coarse} ms against precise {before}..{after}"
        );
        let mut clock = CasClock { last: 0 };
        let mut last = 0;
        for _ in 0..100_000 {
            let cas = clock.next();
            assert!(cas > last, "CAS {cas} after {last}");
            last = cas;
        }
        // 100,000 CAS values within a millisecond or so run the counter
        // into the milliseconds by at most two.
        let ms = last >> 16;
        assert!(
            ms + 500 >= before && ms <= precise_ms() + 3,
            "CAS time {ms} ms"
        );
        // A floor from a primary ahead of this clock is kept.
        clock.observe(u64::MAX / 4);
        assert_eq!(clock.next(), u64::MAX / 4 + 1);
    }
}
