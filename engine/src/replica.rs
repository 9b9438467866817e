//! What a node needs from the engine to replicate: failover logs, opening a
//! stream cursor (with backfill from disk when memory no longer holds the
//! requested history), applying a primary's entries with their own seqnos and
//! CAS, following its checkpoint ids and online-update windows, and
//! resetting a partition whose history diverged.
//!
//! The engine stays synchronous and knows nothing of sockets; the protocol
//! and the stream loops live in the `tapkv-replication` crate.

use crate::checkpoint::Registration;
use crate::engine::{refuse_on_primary, Engine};
use crate::error::{Error, Result};
use crate::item::{ItemMeta, PartitionId, QueueOp, QueuedItem};
use crate::online_update::MarkerSource;
use crate::partition::{reserved_cursor_check, Partition, PartitionWriter, PERSISTENCE_CURSOR};
use crate::store::FailoverEntry;
use crate::sync::Ordering;

/// What applying a replicated entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Applied.
    Applied,
    /// At or below the partition's high seqno: already held, ignored.
    Duplicate,
    /// The entry cannot be applied consistently (for example a REVERT of a
    /// window this replica did not hold from its start): the partition must be
    /// reset and resynchronised from the primary.
    Resync,
}

/// How a stream for a partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    /// The cursor is registered; everything after the requested seqno comes
    /// from memory.
    InMemory,
    /// Memory no longer holds the requested history: send the disk's items
    /// with seqnos in `(from, snapshot_end]` first ([`Engine::backfill`]); the
    /// cursor is registered at `snapshot_end` and continues from there.
    Backfill {
        /// Last seqno of the disk snapshot.
        snapshot_end: u64,
    },
}

/// One partition's items and tombstones on disk with seqnos in
/// `(after, end]`, read through a RocksDB iterator opened while the disk
/// held exactly `end` ([`Engine::backfill_snapshot`],
/// [`Engine::stream_start_with_snapshot`]): a key the flusher rewrites
/// after `end` is still read at its version at or below `end`. (Reading
/// `end` first and opening the iterator later could find such a key only
/// at its newer version, outside the range, and send neither.)
pub struct DiskSnapshot<'a> {
    it: crate::store::ItemsIter<'a>,
    partition: PartitionId,
    after: u64,
    end: u64,
}

impl std::fmt::Debug for DiskSnapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSnapshot")
            .field("partition", &self.partition)
            .field("after", &self.after)
            .field("end", &self.end)
            .finish()
    }
}

impl<'a> DiskSnapshot<'a> {
    /// A snapshot of partition `p`'s entries in `(after, end]`, reading the
    /// disk as it is now.
    fn open(store: &'a crate::store::Store, p: PartitionId, after: u64, end: u64) -> Result<Self> {
        Ok(DiskSnapshot {
            it: store.items_iter()?,
            partition: p,
            after,
            end,
        })
    }

    /// The partition.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// The seqno the snapshot starts after.
    pub fn after(&self) -> u64 {
        self.after
    }

    /// The snapshot's last seqno: the disk's high seqno for the partition
    /// when it was taken.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Reads the snapshot: `f(Some(entry))` for each item and tombstone in
    /// range, in **key order**, borrowed from the iterator; `f(None)` after
    /// every [`BACKFILL_TICK`] records or [`BACKFILL_TICK_BYTES`] key and
    /// value bytes scanned, whichever comes first (the whole partition is
    /// read and filtered by seqno, so a narrow range of a large partition
    /// can go a long time without a match, and a stream uses the ticks to
    /// keep its connection alive). Returns how many entries it handed out.
    pub fn scan_ref(
        self,
        mut f: impl FnMut(Option<BackfillEntry<'_>>) -> Result<()>,
    ) -> Result<u64> {
        let (after, upto) = (self.after, self.end);
        let (mut n, mut scanned, mut bytes) = (0, 0usize, 0usize);
        crate::store::Store::scan_items(self.it, self.partition, |key, rec| {
            scanned += 1;
            bytes += key.len() + rec.value.len();
            if scanned >= BACKFILL_TICK || bytes >= BACKFILL_TICK_BYTES {
                (scanned, bytes) = (0, 0);
                f(None)?;
            }
            let seqno = rec.meta.by_seqno;
            if seqno > after && seqno <= upto {
                n += 1;
                f(Some(BackfillEntry {
                    op: if rec.deleted {
                        QueueOp::Deletion
                    } else {
                        QueueOp::Mutation
                    },
                    key,
                    value: if rec.deleted { &[] } else { rec.value },
                    meta: rec.meta,
                }))?;
            }
            Ok(())
        })?;
        Ok(n)
    }
}

/// Records [`Engine::backfill_scan`] reads between two ticks.
pub const BACKFILL_TICK: usize = 65_536;

/// Key and value bytes [`Engine::backfill_scan`] reads between two ticks,
/// whatever the number of records: 65,536 records of megabyte values are
/// far too many bytes (tens of seconds of reading) for a heartbeat.
pub const BACKFILL_TICK_BYTES: usize = 16 << 20;

/// One item or tombstone of a backfill, borrowed from the disk iterator
/// ([`Engine::backfill_scan_ref`]).
#[derive(Debug, Clone, Copy)]
pub struct BackfillEntry<'a> {
    /// `Mutation` for an item, `Deletion` for a tombstone.
    pub op: QueueOp,
    /// The key.
    pub key: &'a [u8],
    /// The value (empty for a tombstone).
    pub value: &'a [u8],
    /// Its metadata.
    pub meta: ItemMeta,
}

impl BackfillEntry<'_> {
    /// An owned copy, as a queued entry.
    pub fn to_queued(&self) -> QueuedItem {
        if self.op == QueueOp::Deletion {
            QueuedItem::deletion(self.key, self.meta)
        } else {
            QueuedItem::mutation(self.key, self.value, self.meta)
        }
    }
}

/// A fresh, random branch id.
pub(crate) fn new_uuid() -> u64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id())) | 1
}

/// How far past its own `online_update_memory_limit` a replica takes a
/// window whose primary's limit is no larger than its own (see
/// [`Engine::set_primary_window_limit`]): the primary's admission bounds the
/// window, but the replica may also hold versions the stream delivered
/// before the primary replaced them, until their replacements, later in the
/// stream, de-duplicate them. Those are not bounded by the primary (nor,
/// once only window entries wait, by the checkpoint memory limit), so past
/// twice its own limit a replica refuses, as when its primary's limit is
/// larger: a backstop, reached only by a stream delivering that many stale
/// versions at once.
pub(crate) const STALE_VERSIONS_HEADROOM: usize = 2;

/// Replicated seqnos, CAS values, revisions and checkpoint ids must be
/// below this, a quarter of the range: what a replica derives from them
/// (a seqno reservation up to `engine::MAX_SEQNO_RESERVATION` above its high seqno,
/// checkpoint ids and revisions one above the last) then stays below the
/// half that the open accepts (`store::check_in_range`). With the open's
/// own bound, a primary that sent a number just under it left a replica
/// whose next open refused its directory.
pub(crate) const STREAM_NUMBER_LIMIT: u64 = u64::MAX / 4;

/// Refuses a number from the stream at or above [`STREAM_NUMBER_LIMIT`].
fn check_stream_number(what: &str, n: u64) -> Result<()> {
    if n >= STREAM_NUMBER_LIMIT {
        return Err(Error::InvalidArgument(format!(
            "{what} {n} from the stream is out of range (it must be below {STREAM_NUMBER_LIMIT})"
        )));
    }
    Ok(())
}

impl Partition {
    /// Notes a seqno gap: `seqno` applied above `high + 1`.
    fn note_seqno_gap(&self, high: u64, seqno: u64) {
        if seqno > high.saturating_add(1) {
            self.history_gap.store(true, Ordering::Release);
        }
    }

    /// The checks every replicated entry passes before it is applied: its
    /// numbers are in range.
    fn check_replicated_numbers(item: &QueuedItem) -> Result<()> {
        let meta = item.meta();
        check_stream_number("seqno", meta.by_seqno)?;
        // A CAS is milliseconds << 16 plus a counter (about 2^57 today): one
        // near the top would leave the CAS clock no room to increase.
        check_stream_number("CAS", meta.cas)?;
        // As warmup refuses one from disk: the next local write would wrap.
        check_stream_number("rev seqno", meta.rev_seqno)?;
        if let QueueOp::OnlineUpdateStart { checkpoint_id }
        | QueueOp::OnlineUpdateEnd { checkpoint_id }
        | QueueOp::OnlineUpdateRevert { checkpoint_id } = item.op
        {
            // As for CHECKPOINT_START: ids near the top of the range would
            // stop increasing (saturating) and break checkpoint ordering.
            check_stream_number("window checkpoint id", checkpoint_id)?;
        }
        Ok(())
    }

    /// Applies a mutation or deletion under the partition's lock `w`
    /// (never `Resync`). A refused entry comes back with its error,
    /// unapplied.
    fn apply_key_op(
        &self,
        w: &mut PartitionWriter,
        item: QueuedItem,
    ) -> std::result::Result<ApplyOutcome, (Error, QueuedItem)> {
        let meta = item.meta();
        let high = w.checkpoints.high_seqno();
        if meta.by_seqno <= high {
            return Ok(ApplyOutcome::Duplicate);
        }
        let key = item.key();
        let mut slot = self.table.slot(key);
        let (hash, _, undo) = self.touch(w.window.as_ref(), &mut slot, key);
        // A window the primary opened is held to this replica's own
        // `online_update_memory_limit` (its queued bytes, see
        // `Window::admit_replicated`): past it the entry is refused
        // (before, the replica took whatever a window brought).
        // Nothing is changed yet; the node ends its session and
        // keeps the data.
        if let Some(win) = w.window.as_ref() {
            // Refused at first sight: net of the entry it
            // de-duplicates, as its primary admitted it.
            if let Err(e) = win.admit_replicated(self.id, item.mem_size()) {
                let refused = match w.checkpoints.dedup_refund(hash, key) {
                    0 => Err(e),
                    r => win.admit_replicated(self.id, item.mem_size().saturating_sub(r)),
                };
                if let Err(e) = refused {
                    drop(slot);
                    return Err((e, item));
                }
            }
        }
        // Noted once the entry is admitted: a refused one changes nothing.
        self.note_seqno_gap(high, meta.by_seqno);
        if item.op == QueueOp::Deletion {
            slot.remove_hashed(hash, key);
        } else {
            slot.put_hashed(hash, item.record().clone());
        }
        drop(slot);
        if let Some(win) = w.window.as_mut() {
            win.remember(hash, undo, item.record(), item.mem_size());
        }
        w.cas.observe(meta.cas);
        // The entry itself moves into the checkpoint (no reference count
        // taken and dropped per entry).
        let freed = w.checkpoints.queue_hashed(item, Some(hash), None);
        if let Some(win) = w.window.as_mut() {
            win.refund(freed);
        }
        Ok(ApplyOutcome::Applied)
    }

    fn apply(
        &self,
        engine_limit: usize,
        store: &crate::store::Store,
        item: QueuedItem,
    ) -> Result<ApplyOutcome> {
        Self::check_replicated_numbers(&item)?;
        let meta = item.meta();
        let given = MarkerSource::Given {
            seqno: meta.by_seqno,
            cas: meta.cas,
        };
        // Anything at or below the high seqno — entry or marker — is held
        // already (a stream restarted from an older acknowledged seqno). An
        // entry checks under the lock it applies with.
        if !item.op.is_key_op() {
            let high = self.lock().checkpoints.high_seqno();
            if meta.by_seqno <= high {
                return Ok(ApplyOutcome::Duplicate);
            }
            self.note_seqno_gap(high, meta.by_seqno);
        }
        match item.op {
            QueueOp::Mutation | QueueOp::Deletion => self
                .apply_key_op(&mut self.lock(), item)
                .map_err(|(e, _)| e),
            QueueOp::OnlineUpdateStart { checkpoint_id } => {
                if self.window_info().is_some() {
                    return Ok(ApplyOutcome::Resync);
                }
                self.online_update_start(store, engine_limit, Some((checkpoint_id, given)))?;
                Ok(ApplyOutcome::Applied)
            }
            QueueOp::OnlineUpdateEnd { checkpoint_id } => match self.window_info() {
                Some(w) if w.checkpoint_id == checkpoint_id => {
                    self.online_update_complete(store, given)?;
                    Ok(ApplyOutcome::Applied)
                }
                Some(_) => Ok(ApplyOutcome::Resync),
                None => {
                    // Joined after START: the window's entries were applied as
                    // ordinary ones; its end changes nothing here.
                    let mut w = self.lock();
                    self.queue_marker(&mut w, store, item.op, given)?;
                    Ok(ApplyOutcome::Applied)
                }
            },
            QueueOp::OnlineUpdateRevert { checkpoint_id } => match self.window_info() {
                Some(w) if w.checkpoint_id == checkpoint_id => {
                    self.online_update_revert(store, given)?;
                    Ok(ApplyOutcome::Applied)
                }
                // Never revert a range this replica does not hold from START.
                _ => Ok(ApplyOutcome::Resync),
            },
        }
    }
}

impl crate::engine::Shared {
    /// Refuses a replicated key this replica's own next open would refuse
    /// (see `store::check_disk_item`), or one of another partition.
    fn check_replicated_key(&self, p: PartitionId, item: &QueuedItem) -> Result<()> {
        let key = item.key();
        let home = crate::partition::partition_of(key, self.config.partitions);
        if key.is_empty() || key.len() > usize::from(u16::MAX) || home != p {
            return Err(Error::InvalidArgument(format!(
                "replicated key {} of {} bytes cannot be applied to partition {p} (its \
                 partition is {home}; keys are 1 to 65,535 bytes)",
                crate::text::quoted(&key[..key.len().min(64)]),
                key.len()
            )));
        }
        // This replica's own key limit: past it its own reads would refuse
        // what it stored (before, it was stored; found by a review). A
        // replica is opened with a key limit at least its primary's. (Its
        // value limit is for writes made to it: a value its primary took
        // is applied whatever its size, and read back like any other; the
        // checkpoint and window memory limits still hold it.)
        if key.len() > self.config.max_key_size {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max: self.config.max_key_size,
            });
        }
        Ok(())
    }

    /// Whether queuing `item` would take checkpoint memory past its limit.
    fn near_checkpoint_memory_limit(&self, item: &QueuedItem) -> bool {
        let used = self.checkpoint_mem.load(Ordering::Relaxed);
        used + item.key().len() + item.value().len() > self.config.checkpoint_memory_limit
    }

    /// [`Engine::apply_replicated`] without the wake-up.
    fn apply_replicated_one(&self, p: PartitionId, item: QueuedItem) -> Result<ApplyOutcome> {
        if item.op.is_key_op() {
            self.check_replicated_key(p, &item)?;
            if self.near_checkpoint_memory_limit(&item)
                && self.partitions.iter().any(Partition::has_flushable)
            {
                self.notify_flushers();
                let used = self.checkpoint_mem.load(Ordering::Relaxed);
                let limit = self.config.checkpoint_memory_limit;
                return Err(Error::TempOutOfMemory {
                    reason: format!(
                        "checkpoint memory {used} bytes is at its limit of {limit} bytes; the \
                         replica applies more once its flusher has persisted queued items"
                    ),
                });
            }
        }
        // The limit a window opened by this entry admits the stream's
        // entries to (see `Engine::set_primary_window_limit`).
        let own = self.config.online_update_memory_limit;
        let primary = self.primary_window_limit.load(Ordering::Acquire);
        let window_limit = if primary != 0 && primary <= own {
            own.saturating_mul(STALE_VERSIONS_HEADROOM)
        } else {
            own
        };
        self.partition(p)?.apply(window_limit, &self.store, item)
    }
}

impl Engine {
    /// Where a replica asking to resume partition `p` from `seqno` on the
    /// branch `uuid` resumes in this (the primary's) history: `Some(seqno)`
    /// (0 for a replica that holds nothing), or `None` when that position is
    /// not in this history — the branch is unknown, or the replica holds
    /// more of it than this node kept (it must roll back).
    pub fn resume_position(&self, p: PartitionId, uuid: u64, seqno: u64) -> Result<Option<u64>> {
        if seqno == 0 {
            return Ok(Some(0));
        }
        let log = self.failover_log(p)?;
        let high = self.high_seqno(p)?;
        let Some(i) = log.iter().position(|e| e.uuid == uuid) else {
            return Ok(None);
        };
        let valid_upto = log.get(i + 1).map_or(high, |next| next.seqno);
        Ok((seqno <= valid_upto).then_some(seqno))
    }

    /// Partition `p`'s failover log, oldest first (never empty).
    pub fn failover_log(&self, p: PartitionId) -> Result<Vec<FailoverEntry>> {
        let s = self.live()?;
        Ok(s.partition(p)?.failover.lock().clone())
    }

    /// Replaces partition `p`'s failover log (a replica records its primary's
    /// branch), durably.
    pub fn set_failover_log(&self, p: PartitionId, log: Vec<FailoverEntry>) -> Result<()> {
        let s = self.live()?;
        // A primary's log is its own history: replaced, it would let a
        // replica of another branch resume as if it matched (found by a
        // review, as the other replica steps refused on a primary).
        refuse_on_primary(s, "replacing the failover log")?;
        // Never empty (`failover_log`), and bounded as the open bounds it.
        if log.is_empty() || log.len() > s.config.max_failover_entries {
            return Err(Error::InvalidArgument(format!(
                "a failover log holds 1 to {} entries (max_failover_entries), got {}",
                s.config.max_failover_entries,
                log.len()
            )));
        }
        // The open checks the persisted log.
        for e in &log {
            check_stream_number("failover log seqno", e.seqno)?;
        }
        let part = s.partition(p)?;
        let mut f = part.failover.lock();
        s.store.put_failover_log(p, &log)?;
        *f = log;
        Ok(())
    }

    /// Highest seqno of partition `p` (in memory).
    pub fn high_seqno(&self, p: PartitionId) -> Result<u64> {
        let s = self.live()?;
        Ok(s.partition(p)?.lock().checkpoints.high_seqno())
    }

    /// Highest seqno of partition `p` written to disk.
    pub fn persisted_seqno(&self, p: PartitionId) -> Result<u64> {
        let s = self.live()?;
        Ok(s.partition(p)?
            .progress
            .persisted_seqno
            .load(Ordering::Acquire))
    }

    /// Registers the stream cursor `name` on partition `p` to read everything
    /// after `from`, from memory if it still holds that history, else after a
    /// backfill from disk up to the persisted seqno.
    ///
    /// The disk snapshot of that backfill is dropped here: a caller that
    /// then reads `(from, snapshot_end]` with [`backfill`](Self::backfill)
    /// reads the disk as it is by then, where a key the flusher rewrote
    /// after `snapshot_end` is found only at its newer version (outside the
    /// range) and sent at neither. Streams use
    /// [`stream_start_with_snapshot`](Self::stream_start_with_snapshot),
    /// which hands out the snapshot to read; this one suits callers that
    /// only need to know where memory starts.
    pub fn stream_start(&self, p: PartitionId, name: &str, from: u64) -> Result<StreamStart> {
        Ok(match self.stream_start_with_snapshot(p, name, from)? {
            None => StreamStart::InMemory,
            Some(snap) => StreamStart::Backfill {
                snapshot_end: snap.end(),
            },
        })
    }

    /// [`stream_start`](Self::stream_start), handing out the disk snapshot
    /// to send first when memory no longer holds the history: `None` when
    /// everything after `from` comes from memory, else the snapshot
    /// `(from, end]`, the cursor registered at `end`. The cursor is
    /// registered and the snapshot's iterator opened under the flusher's
    /// round lock, so the disk holds exactly `end` when it is read.
    pub fn stream_start_with_snapshot(
        &self,
        p: PartitionId,
        name: &str,
        from: u64,
    ) -> Result<Option<DiskSnapshot<'_>>> {
        reserved_cursor_check(name)?;
        let s = self.live()?;
        let part = s.partition(p)?;
        {
            // Most streams start in memory: that needs the partition's lock
            // only, not a wait behind a flush round.
            let mut w = part.lock();
            let from = from.min(w.checkpoints.high_seqno());
            if let Registration::InMemory { .. } = w.checkpoints.register_cursor(name, from)? {
                w.checkpoints.set_droppable(name);
                return Ok(None);
            }
        }
        // No flush round runs meanwhile: the persistence cursor's seqno is
        // the disk's high seqno until the lock is released. What the
        // snapshot reads is synced first (`flusher::sync_persisted`).
        let _round = s.flush_lock.lock();
        crate::flusher::sync_persisted(s, part)?;
        let mut w = part.lock();
        let from = from.min(w.checkpoints.high_seqno());
        let start = match w.checkpoints.register_cursor(name, from)? {
            Registration::InMemory { .. } => Ok(None),
            Registration::NeedsBackfill { .. } => {
                // The persistence cursor pins the checkpoint holding the next
                // unpersisted seqno, so memory holds everything after it.
                let persisted = w
                    .checkpoints
                    .cursors()
                    .into_iter()
                    .find(|c| c.name == PERSISTENCE_CURSOR)
                    .map_or(0, |c| c.seqno);
                match w.checkpoints.register_cursor(name, persisted)? {
                    Registration::InMemory { .. } => {
                        DiskSnapshot::open(&s.store, p, from, persisted).map(Some)
                    }
                    Registration::NeedsBackfill { .. } => Err(Error::WrongState(format!(
                        "partition {p}: memory does not hold seqno {persisted} + 1"
                    ))),
                }
            }
        }?;
        // A stream can backfill later: under memory pressure the flusher may
        // drop its cursor rather than refuse writes.
        w.checkpoints.set_droppable(name);
        Ok(start)
    }

    /// Where a backfill of partition `p` from `from` could end without a
    /// cursor: `Some(persisted seqno)` when memory no longer holds the items
    /// after `from` and the disk holds more than `from`, `None` otherwise.
    /// Registers nothing, so nothing is pinned while a caller sends
    /// `(from, end]` from disk; [`Engine::stream_start`] afterwards covers
    /// what was persisted meanwhile. A stream joining a large partition
    /// backfills most of it this way, and its cursor pins checkpoints only
    /// for the short rest.
    pub fn backfill_end(&self, p: PartitionId, from: u64) -> Result<Option<u64>> {
        Ok(self.backfill_snapshot(p, from)?.map(|snap| snap.end()))
    }

    /// [`backfill_end`](Self::backfill_end) with the snapshot `(from, end]`
    /// to send, its iterator opened under the flusher's round lock so that
    /// the disk holds exactly `end` when it is read (see [`DiskSnapshot`]).
    pub fn backfill_snapshot(&self, p: PartitionId, from: u64) -> Result<Option<DiskSnapshot<'_>>> {
        let s = self.live()?;
        let part = s.partition(p)?;
        // No flush round runs meanwhile: the persisted seqno is the disk's
        // high seqno until the lock is released.
        let _round = s.flush_lock.lock();
        let persisted = part.progress.persisted_seqno.load(Ordering::Acquire);
        if part.lock().checkpoints.holds_after(from) || persisted <= from {
            return Ok(None);
        }
        // Memory only ever loses history, so the answer stands without the
        // partition's lock; what the snapshot reads is synced first.
        crate::flusher::sync_persisted(s, part)?;
        DiskSnapshot::open(&s.store, p, from, persisted).map(Some)
    }

    /// Calls `f` for every item and tombstone of partition `p` on disk with a
    /// seqno in `(after, upto]`, in **key order** (the backfill of a stream:
    /// it streams from the iterator and holds nothing; the receiver orders a
    /// snapshot by seqno before applying it). Returns how many were visited.
    pub fn backfill(
        &self,
        p: PartitionId,
        after: u64,
        upto: u64,
        mut f: impl FnMut(QueuedItem) -> Result<()>,
    ) -> Result<u64> {
        self.backfill_scan(p, after, upto, |entry| match entry {
            Some(item) => f(item),
            None => Ok(()),
        })
    }

    /// [`Engine::backfill`], with `f(None)` also called after every
    /// [`BACKFILL_TICK`] records or [`BACKFILL_TICK_BYTES`] key and value
    /// bytes scanned, whichever comes first: the whole partition is read and
    /// filtered by seqno, so a narrow range of a large partition can go a
    /// long time without a match, and a stream uses the ticks to keep its
    /// connection alive.
    pub fn backfill_scan(
        &self,
        p: PartitionId,
        after: u64,
        upto: u64,
        mut f: impl FnMut(Option<QueuedItem>) -> Result<()>,
    ) -> Result<u64> {
        self.backfill_scan_ref(p, after, upto, |entry| {
            f(entry.as_ref().map(BackfillEntry::to_queued))
        })
    }

    /// [`Engine::backfill_scan`] handing out each entry borrowed from the
    /// disk iterator, valid only during the call: a stream encodes it
    /// straight into its connection buffer, with no allocation per item.
    ///
    /// It reads the disk as it is when called, whatever `upto` is: a
    /// stream takes a [`DiskSnapshot`] instead, whose end and iterator
    /// agree.
    pub fn backfill_scan_ref(
        &self,
        p: PartitionId,
        after: u64,
        upto: u64,
        f: impl FnMut(Option<BackfillEntry<'_>>) -> Result<()>,
    ) -> Result<u64> {
        let s = self.live()?;
        s.partition(p)?;
        DiskSnapshot::open(&s.store, p, after, upto)?.scan_ref(f)
    }

    /// Applies one entry of a primary's stream to partition `p`, keeping its
    /// seqno and CAS.
    ///
    /// Backpressure: a key operation that finds the engine's checkpoint
    /// memory at its limit while anything outside an online-update window
    /// still waits to be persisted is refused with `Error::TempOutOfMemory`
    /// (nothing applied; the flusher is woken). The caller retries it and
    /// stops reading its stream meanwhile, so a replica whose disk is slower
    /// than its primary holds the primary back through flow control instead
    /// of growing without bound. Once nothing flushable is left the entry is
    /// applied whatever the memory: what remains is persisted items in open
    /// checkpoints (a replica closes checkpoints only when its primary
    /// does) and window items (freed when the window ends), and waiting for
    /// those could wait for ever.
    pub fn apply_replicated(&self, p: PartitionId, item: &QueuedItem) -> Result<ApplyOutcome> {
        let s = self.live()?;
        refuse_on_primary(s, "applying a stream's entry")?;
        let out = s.apply_replicated_one(p, item.clone())?;
        s.changed(p);
        Ok(out)
    }

    /// Applies the entries at the front of `queue`, all of partition `p`
    /// and in stream order, as [`apply_replicated`](Self::apply_replicated)
    /// applies each, but mutations and deletions in a row under one
    /// acquisition of the partition's lock, and with one wake-up of its
    /// flusher and streams for the run. Each entry applied, or found already
    /// held, leaves the queue; the first that cannot be applied stops the
    /// run and stays at the front, and its error (or
    /// [`ApplyOutcome::Resync`]) is returned. `Ok(ApplyOutcome::Applied)`
    /// once the queue is empty.
    ///
    /// Readers and the flusher wait for the partition's lock while a run
    /// holds it: the caller bounds the queue's length (a replica's link
    /// passes at most `REPLICA_APPLY_RUN` entries).
    pub fn apply_replicated_run(
        &self,
        p: PartitionId,
        queue: &mut std::collections::VecDeque<QueuedItem>,
    ) -> Result<ApplyOutcome> {
        let s = self.live()?;
        refuse_on_primary(s, "applying a stream's entries")?;
        let part = s.partition(p)?;
        let mut changed = false;
        let out = 'run: loop {
            let Some(front) = queue.front() else {
                break Ok(ApplyOutcome::Applied);
            };
            if !front.op.is_key_op() || s.near_checkpoint_memory_limit(front) {
                // A marker, or memory near its limit (whose check looks at
                // every partition's lock): on its own.
                match s.apply_replicated_one(p, front.clone()) {
                    Ok(ApplyOutcome::Resync) => break Ok(ApplyOutcome::Resync),
                    Ok(_) => {
                        queue.pop_front();
                        changed = true;
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
            let mut w = part.lock();
            while let Some(front) = queue.front() {
                if !front.op.is_key_op() || s.near_checkpoint_memory_limit(front) {
                    continue 'run;
                }
                if let Err(e) = s
                    .check_replicated_key(p, front)
                    .and_then(|()| Partition::check_replicated_numbers(front))
                {
                    break 'run Err(e);
                }
                let Some(item) = queue.pop_front() else {
                    break;
                };
                match part.apply_key_op(&mut w, item) {
                    Ok(_) => changed = true,
                    Err((e, item)) => {
                        queue.push_front(item);
                        break 'run Err(e);
                    }
                }
            }
        };
        if changed {
            s.changed(p);
        }
        out
    }

    /// Follows the primary into checkpoint `id` (a replica builds its
    /// checkpoints with the primary's ids).
    ///
    /// Where its own ids are ahead of the primary's (after its restart or a
    /// reset, until the primary's pass them), the replica still closes its
    /// open checkpoint at each new checkpoint of the primary's, under an id
    /// of its own: a window's rewrites are admitted net of the entry they
    /// de-duplicate in the open checkpoint, so a replica that closed its
    /// checkpoints elsewhere could refuse a window its primary took with
    /// the same limit. (Before, such a start was ignored.)
    pub fn replica_checkpoint(&self, p: PartitionId, id: u64) -> Result<()> {
        check_stream_number("checkpoint id", id)?;
        let s = self.live()?;
        refuse_on_primary(s, "following a primary's checkpoint")?;
        let part = s.partition(p)?;
        let mut w = part.lock();
        // (Entering a checkpoint says nothing of the history before: a
        // stream that registers inside a checkpoint — every reconnect —
        // begins with that checkpoint's START. Gaps are forgotten at a
        // checkpoint's END: `replica_checkpoint_end`.)
        if id > w.primary_checkpoint {
            w.primary_checkpoint = id;
            if id > w.checkpoints.open_checkpoint_id() || !w.checkpoints.open_checkpoint_is_empty()
            {
                w.checkpoints.create_checkpoint_with_id(id);
            }
        }
        Ok(())
    }

    /// The stream read the primary's checkpoint `id` of partition `p` to its
    /// end: every entry that made a de-duplication hole there came with it,
    /// so the gaps this replica applied are filled
    /// ([`replica_history_may_have_gaps`](Self::replica_history_may_have_gaps)
    /// is false until the next gap). Before, a checkpoint's START cleared
    /// them, and a stream registered inside a checkpoint (every reconnect)
    /// begins with one: a reconnect then a crash of the primary left the
    /// replica without a version for good.
    pub fn replica_checkpoint_end(&self, p: PartitionId, id: u64) -> Result<()> {
        check_stream_number("checkpoint id", id)?;
        let s = self.live()?;
        refuse_on_primary(s, "following a primary's checkpoint")?;
        let part = s.partition(p)?;
        // Under the partition's lock, as every entry's gap is noted. Only
        // the END of the checkpoint the stream is in fills its gaps: another
        // id (0, a stale one) leaves them (before, any id cleared them, and
        // an unclean primary restart was then resumed over a hole; found
        // by a review).
        let w = part.lock();
        if id == w.primary_checkpoint {
            part.history_gap.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Whether this replica's state of partition `p` at its high seqno may
    /// lack a version its primary held at that seqno: it applied a seqno
    /// gap (a de-duplication hole the stream stepped over; the entry that
    /// made it lies later in the same checkpoint) since the stream last
    /// read a checkpoint to its end, or it restarted since. As long as the primary
    /// keeps its history that later entry comes; a primary that restarted
    /// uncleanly (a new branch in its failover log) may have lost it, and
    /// such a replica must resynchronise the partition rather than resume.
    pub fn replica_history_may_have_gaps(&self, p: PartitionId) -> Result<bool> {
        let s = self.live()?;
        let part = s.partition(p)?;
        Ok(part.history_gap.load(Ordering::Acquire) && part.lock().checkpoints.high_seqno() > 0)
    }

    /// Drops everything partition `p` holds, in memory and on disk (a replica
    /// whose history diverged from its primary's, before resynchronising).
    pub fn reset_partition(&self, p: PartitionId) -> Result<()> {
        let s = self.live()?;
        refuse_on_primary(s, "a partition reset")?;
        let part = s.partition(p)?;
        let _no_flush = s.flush_lock.lock();
        let mut w = part.lock();
        let mut shards = part.table.lock_all();
        // A primary's data a session has not confirmed: the reset drops
        // history a replica of the directory's primary runs may hold, so its
        // next such run must start a branch, as after a crash (before, a
        // clean close hid the reset, and such a replica resumed over the
        // emptied partition). Recorded first: a crash between the two writes
        // leaves a branch pending over data still whole, which only costs
        // that replica a rollback.
        if s.primary_data.load(Ordering::Acquire) {
            s.store.remember_branch()?;
        }
        // Disk first: if it fails, memory still matches it (new entries
        // starting again at seqno 1 must never be flushed over old ones).
        s.store.reset_partition(p)?;
        // What the partition held is freed after the locks (before, every
        // record and queued entry was dropped while reads of the partition
        // and every flush round waited; found by a review).
        let records = shards.clear();
        let next_id = w.checkpoints.open_checkpoint_id() + 1;
        let mut fresh = w.checkpoints.replacement(next_id, 0);
        fresh.register_cursor(PERSISTENCE_CURSOR, 0)?;
        let queued = std::mem::replace(&mut w.checkpoints, fresh);
        w.window = None;
        w.reverted.clear();
        w.completed.clear();
        w.primary_checkpoint = 0;
        part.lost_windows.lock().clear();
        part.history_gap.store(false, Ordering::Release);
        part.progress.persisted_seqno.store(0, Ordering::Release);
        part.progress.synced_seqno.store(0, Ordering::Release);
        part.progress.resets.fetch_add(1, Ordering::Release);
        drop((shards, w, _no_flush));
        drop((records, queued));
        // Durable writers and `flush` callers waiting on this partition's
        // old seqnos end now, with an error (`Shared::wait_synced`).
        s.wake_persist_waiters();
        tracing::warn!(partition = p, "partition reset for resynchronisation");
        Ok(())
    }
}
