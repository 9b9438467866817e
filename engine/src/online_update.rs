//! Online update: a window on a partition in which mutations are live in
//! memory and visible to every cursor, but never reach disk until COMPLETE;
//! REVERT undoes every one of them.
//!
//! - START closes the open checkpoint and opens one that begins with an
//!   `OnlineUpdateStart` marker carrying the new checkpoint id. The persistence
//!   cursor may not pass the seqno before the marker (the *barrier*), so
//!   everything queued before START persists and nothing after it does.
//! - While the window is open, the first mutation of each key records the
//!   key's pre-window state (or its absence) in the window's undo map.
//! - COMPLETE queues an `OnlineUpdateEnd` marker, closes the checkpoint and
//!   lifts the barrier: the whole window persists.
//! - REVERT, holding the partition writer lock and every hash-table shard
//!   lock (so reads and writes on the partition wait and then resume), puts
//!   each key of the undo map back — removing keys the window created, restoring
//!   value and metadata of the others, with the value evicted when the
//!   pre-window version is on disk — then queues an `OnlineUpdateRevert`
//!   marker with the window's checkpoint id and closes the checkpoint. The
//!   window's entries stay in the checkpoints so every other cursor sees START,
//!   the entries and REVERT in order; the persistence cursor skips them. Cost is
//!   proportional to the distinct keys of the window.
//! - An open window is recorded on disk (synced) at START and cleared at its
//!   end; one still recorded at open time was lost to a crash or close.

use std::time::{Duration, Instant};

use hashbrown::HashTable;

use crate::error::{Error, Result};
use crate::item::{ItemMeta, PartitionId, QueueOp, QueuedItem, Record};
use crate::partition::{Partition, PartitionWriter};
use crate::store::{Store, WindowRecord};
use crate::sync::{Arc, Condvar, Mutex, Ordering};

/// Keys a REVERT looks up together before applying them.
const REVERT_GROUP: usize = 16;

/// What a window remembers of a key it touches first: its pre-window record
/// (`None`: absent).
pub(crate) type Undo = Option<Record>;

/// An undo-map entry: the key's hash-table hash, a record holding the key
/// (the pre-window one, or the window's first), and the pre-window state.
struct UndoEntry {
    hash: u64,
    key: Record,
    before: Option<Record>,
}

/// An open online-update window.
pub(crate) struct Window {
    pub(crate) checkpoint_id: u64,
    pub(crate) start_seqno: u64,
    /// The partition's high seqno when START was queued: what the flusher
    /// can persist while the window is open. `start_seqno - 1` on a
    /// primary; lower on a replica whose seqnos have a gap before START (a
    /// disk snapshot that ended on a marker it never queued).
    pub(crate) before_start: u64,
    /// Pre-window state of every key mutated in the window, found by the
    /// key's hash-table hash (no key is hashed twice).
    undo: HashTable<UndoEntry>,
    /// Bytes queued in the window so far, plus what its undo map keeps.
    pub(crate) bytes: usize,
    /// Bytes queued in the window so far, alone.
    queued: usize,
    limit: usize,
    started: Instant,
}

impl Window {
    /// Refuses a write that would take the window past its memory limit.
    pub(crate) fn admit(&self, partition: PartitionId, incoming: usize) -> Result<()> {
        if self.bytes + incoming > self.limit {
            return Err(Error::TempOutOfMemory {
                reason: format!(
                    "online-update window {} on partition {partition} holds {} of its {} bytes \
                     and this write needs {incoming}; complete or revert the window",
                    self.checkpoint_id, self.bytes, self.limit
                ),
            });
        }
        Ok(())
    }

    /// A replica's admission of its primary's window entry: against the
    /// queued bytes alone (what the undo map keeps depends on what each node
    /// had persisted when the window first touched a key, which a replica
    /// does later than its primary; it is counted in `bytes` and bounded,
    /// until persisted, by the checkpoint memory limit). The queued bytes
    /// are not the primary's: the stream may have delivered a key's version
    /// the primary replaced since, whose replacement comes later in the
    /// stream. So a replica whose primary's limit is no larger than its own
    /// opens its windows with twice its own limit here
    /// (`replica::STALE_VERSIONS_HEADROOM`, see
    /// `Engine::set_primary_window_limit`): the primary's admission bounds
    /// them, less those stale versions.
    pub(crate) fn admit_replicated(&self, partition: PartitionId, incoming: usize) -> Result<()> {
        if self.queued + incoming > self.limit {
            return Err(Error::TempOutOfMemory {
                reason: format!(
                    "the primary's online-update window {} on partition {partition} queues more \
                     than this replica's limit of {} bytes (--online-update-memory-limit)",
                    self.checkpoint_id, self.limit
                ),
            });
        }
        Ok(())
    }

    /// Whether the window has not touched `key` (hash-table hash `hash`) yet.
    pub(crate) fn first_touch(&self, hash: u64, key: &[u8]) -> bool {
        self.undo
            .find(hash, |e| e.hash == hash && e.key.key() == key)
            .is_none()
    }

    /// What the undo map's entry for `undo` (see [`Window::remember`])
    /// keeps in memory: the pre-window record's key and resident value, or
    /// a created key's key-only copy. A pre-window value not yet persisted
    /// stays resident in the undo map, and once the flusher has freed its
    /// checkpoint nothing else counts it, so the window does.
    pub(crate) fn undo_charge(undo: Option<&Undo>, key_len: usize) -> usize {
        match undo {
            None => 0,
            Some(Some(before)) => before.resident_bytes(),
            Some(None) => key_len,
        }
    }

    /// Records a key's pre-window state (`Some` on its first touch, see
    /// [`Partition::touch`]; `new` is the record the write made) and charges
    /// the window `size` bytes (the queued entry) plus what the undo map
    /// keeps ([`Window::undo_charge`]).
    pub(crate) fn remember(&mut self, hash: u64, undo: Option<Undo>, new: &Record, size: usize) {
        self.bytes += size + Self::undo_charge(undo.as_ref(), new.key().len());
        self.queued += size;
        if let Some(before) = undo {
            // A key the window creates is remembered by a key-only copy: its
            // first value would otherwise stay alive until the window ends.
            let key = before.clone().unwrap_or_else(|| new.evicted());
            self.undo
                .insert_unique(hash, UndoEntry { hash, key, before }, |e| e.hash);
        }
    }

    /// Gives back the bytes of a window entry that a later write of the
    /// same key de-duplicated (the open checkpoint, where de-duplication
    /// happens, lies inside the window).
    pub(crate) fn refund(&mut self, freed: usize) {
        self.bytes = self.bytes.saturating_sub(freed);
        self.queued = self.queued.saturating_sub(freed);
    }

    pub(crate) fn keys(&self) -> usize {
        self.undo.len()
    }
}

/// An open window, as reported by `stats()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WindowInfo {
    /// The window's checkpoint id.
    pub checkpoint_id: u64,
    /// Seqno of its START marker.
    pub start_seqno: u64,
    /// Distinct keys mutated in it.
    pub keys: usize,
    /// Bytes it has queued, plus the pre-window keys and values it keeps
    /// to revert (counted against `online_update_memory_limit`).
    pub bytes: usize,
}

/// What a REVERT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevertReport {
    /// The reverted window's checkpoint id.
    pub checkpoint_id: u64,
    /// Keys the window had created and that existed at REVERT, now removed
    /// (a key created and deleted again inside the window needs nothing; a
    /// key whose pre-window version had expired counts here if the window
    /// left it in place, as it reads absent again).
    pub removed: usize,
    /// Keys the window had updated or deleted, now back to their pre-window state.
    pub restored: usize,
    /// Time the revert took, from the call to its return: the wait for the
    /// partition's writer lock, two synced writes (the seqno reservation if
    /// it needs extending, the window's record cleared) and the undo itself
    /// (only the undo holds the partition's readers).
    pub duration: Duration,
}

fn marker(op: QueueOp, seqno: u64, cas: u64) -> QueuedItem {
    QueuedItem::marker(
        op,
        ItemMeta {
            by_seqno: seqno,
            cas,
            ..ItemMeta::default()
        },
    )
}

/// Where a marker's seqno and CAS come from: this node (a primary) or the
/// replication stream (a replica applying its primary's marker).
#[derive(Debug, Clone, Copy)]
pub(crate) enum MarkerSource {
    Local,
    Given { seqno: u64, cas: u64 },
}

impl Partition {
    pub(crate) fn queue_marker(
        &self,
        w: &mut PartitionWriter,
        store: &Store,
        op: QueueOp,
        src: MarkerSource,
    ) -> Result<u64> {
        let high = w.checkpoints.high_seqno();
        let (seqno, cas) = match src {
            MarkerSource::Local => {
                self.ensure_reserved(w, store, high + 1)?;
                (high + 1, w.cas.next())
            }
            MarkerSource::Given { seqno, cas } if seqno > high => (seqno, cas),
            MarkerSource::Given { seqno, .. } => {
                return Err(Error::InvalidArgument(format!(
                    "marker seqno {seqno} is not above partition {}'s high seqno {high}",
                    self.id
                )))
            }
        };
        w.checkpoints.queue(marker(op, seqno, cas));
        Ok(seqno)
    }

    fn window_or_err<'a>(&self, w: &'a PartitionWriter) -> Result<&'a Window> {
        w.window
            .as_ref()
            .ok_or(Error::NoOnlineUpdate { partition: self.id })
    }

    /// START: opens a window; returns its checkpoint id. A replica passes the
    /// primary's checkpoint id and marker.
    pub(crate) fn online_update_start(
        &self,
        store: &Store,
        limit: usize,
        given: Option<(u64, MarkerSource)>,
    ) -> Result<u64> {
        let mut w = self.lock();
        if let Some(win) = &w.window {
            return Err(Error::OnlineUpdateOpen {
                partition: self.id,
                checkpoint_id: win.checkpoint_id,
                what: "a second START is not allowed",
            });
        }
        let high = w.checkpoints.high_seqno();
        self.ensure_reserved(&mut w, store, high + 1)?;
        let (wanted_id, src) = given.unwrap_or((0, MarkerSource::Local));
        let start_seqno = match src {
            MarkerSource::Local => high + 1,
            MarkerSource::Given { seqno, .. } => seqno,
        };
        if start_seqno <= high {
            return Err(Error::InvalidArgument(format!(
                "START seqno {start_seqno} is not above partition {}'s high seqno {high}",
                self.id
            )));
        }
        // A replica already in the primary's window checkpoint (entered through
        // the stream's checkpoint-start, under the primary's id or, its own
        // ids being ahead, one of its own) stays in it.
        let open_id = w.checkpoints.open_checkpoint_id();
        let local_id = if wanted_id != 0
            && (open_id == wanted_id || w.primary_checkpoint == wanted_id)
            && w.checkpoints.open_checkpoint_is_empty()
        {
            open_id
        } else {
            w.checkpoints.create_checkpoint_with_id(wanted_id)
        };
        // The window is named by the primary's id, even if this replica's
        // local checkpoint numbering had to differ.
        let checkpoint_id = if wanted_id != 0 { wanted_id } else { local_id };
        // Reserved before the record is written, so queueing the marker
        // cannot fail after it (a record without a window in memory would
        // be reported lost at the next open).
        if matches!(src, MarkerSource::Local) {
            self.ensure_reserved(&mut w, store, high + 1)?;
        }
        store.set_open_window(
            self.id,
            Some(&WindowRecord {
                checkpoint_id,
                start_seqno,
            }),
        )?;
        self.queue_marker(
            &mut w,
            store,
            QueueOp::OnlineUpdateStart { checkpoint_id },
            src,
        )?;
        w.window = Some(Window {
            checkpoint_id,
            start_seqno,
            before_start: high,
            undo: HashTable::new(),
            bytes: 0,
            queued: 0,
            limit,
            started: Instant::now(),
        });
        tracing::info!(
            partition = self.id,
            checkpoint_id,
            start_seqno,
            "online update started"
        );
        Ok(checkpoint_id)
    }

    /// COMPLETE: the window persists; returns its checkpoint id.
    pub(crate) fn online_update_complete(&self, store: &Store, src: MarkerSource) -> Result<u64> {
        let mut w = self.lock();
        let checkpoint_id = self.window_or_err(&w)?.checkpoint_id;
        // Reserve and check first, then clear the window's record on disk,
        // and only then end the window in memory: if the record cannot be
        // cleared the window stays open, whole. (Ending it first let the
        // flusher persist the window while the disk still said it was open,
        // so the next open reported it lost and started a new branch.)
        let high = w.checkpoints.high_seqno();
        match src {
            MarkerSource::Local => self.ensure_reserved(&mut w, store, high + 1)?,
            MarkerSource::Given { seqno, .. } if seqno <= high => {
                return Err(Error::InvalidArgument(format!(
                    "COMPLETE seqno {seqno} is not above partition {}'s high seqno {high}",
                    self.id
                )));
            }
            MarkerSource::Given { .. } => {}
        }
        store.set_open_window(self.id, None)?;
        let end_seqno = self.queue_marker(
            &mut w,
            store,
            QueueOp::OnlineUpdateEnd { checkpoint_id },
            src,
        )?;
        w.checkpoints.create_checkpoint();
        let win = w.window.take();
        if let Some(win) = &win {
            w.completed.push((win.start_seqno, end_seqno));
        }
        tracing::info!(
            partition = self.id,
            checkpoint_id,
            keys = win.as_ref().map_or(0, Window::keys),
            "online update completed"
        );
        Ok(checkpoint_id)
    }

    /// REVERT: undoes every mutation of the window.
    pub(crate) fn online_update_revert(
        &self,
        store: &Store,
        src: MarkerSource,
    ) -> Result<RevertReport> {
        let started = Instant::now();
        let mut w = self.lock();
        let checkpoint_id = self.window_or_err(&w)?.checkpoint_id;
        // Reserve and check first, then clear the window's record on disk
        // (as COMPLETE does): if it cannot be cleared the window stays open,
        // whole, and a retry can revert it; past it nothing can fail. (A
        // crash between the two leaves the disk without the window's
        // entries, which is the reverted state.)
        let high = w.checkpoints.high_seqno();
        self.ensure_reserved(&mut w, store, high + 1)?;
        if let MarkerSource::Given { seqno, .. } = src {
            if seqno <= high {
                return Err(Error::InvalidArgument(format!(
                    "REVERT seqno {seqno} is not above partition {}'s high seqno {high}",
                    self.id
                )));
            }
        }
        store.set_open_window(self.id, None)?;
        let Some(win) = w.window.take() else {
            return Err(Error::NoOnlineUpdate { partition: self.id });
        };
        let clean_upto = self.progress.persisted_seqno.load(Ordering::Acquire);
        let (mut removed, mut restored) = (0, 0);
        let now = crate::item::now_secs();
        {
            let mut shards = self.table.lock_all();
            // Taken in its own statement: the gate's mutex is not held
            // while the REVERT waits at the hold.
            let gate = self.revert_gate.lock().take();
            if let Some(gate) = gate {
                gate.hold();
            }
            // The undo map holds each key's hash: no key is hashed again.
            // Keys go in groups: every key of a group is first looked up
            // without changes, so their cache misses overlap instead of
            // queueing one behind the other, then the group is applied. This
            // keeps the per-key cost from growing with the partition's size.
            let mut group: Vec<UndoEntry> = Vec::with_capacity(REVERT_GROUP);
            let mut undo = win.undo.into_iter().peekable();
            while undo.peek().is_some() {
                group.extend(undo.by_ref().take(REVERT_GROUP));
                for e in &group {
                    shards.touch(e.hash, e.key.key());
                }
                for e in group.drain(..) {
                    match e.before {
                        None => {
                            // Created then deleted inside the window: nothing
                            // to remove, and not counted.
                            if shards.remove_hashed(e.hash, e.key.key()).is_some() {
                                removed += 1;
                            }
                        }
                        Some(before) => {
                            // A version that had expired reads as absent:
                            // to a client the window created the key, and
                            // the revert removes it (before, counted as
                            // restored; found by a review).
                            if !before.meta().is_expired(now) {
                                restored += 1;
                            } else if shards.remove_hashed(e.hash, e.key.key()).is_some() {
                                // Removed only if the window left it there
                                // (not if it deleted it again).
                                removed += 1;
                            }
                            shards.put_hashed(e.hash, before.without_clean_value(clean_upto));
                        }
                    }
                }
            }
            let revert_seqno = self.queue_marker(
                &mut w,
                store,
                QueueOp::OnlineUpdateRevert { checkpoint_id },
                src,
            )?;
            w.reverted.push((win.start_seqno, revert_seqno));
            w.checkpoints.create_checkpoint();
        }
        drop(w);
        let report = RevertReport {
            checkpoint_id,
            removed,
            restored,
            duration: started.elapsed(),
        };
        tracing::info!(
            partition = self.id,
            checkpoint_id,
            removed,
            restored,
            micros = report.duration.as_micros() as u64,
            window_age_ms = win.started.elapsed().as_millis() as u64,
            "online update reverted"
        );
        Ok(report)
    }

    /// The open window, for stats.
    pub(crate) fn window_info(&self) -> Option<WindowInfo> {
        self.lock().window.as_ref().map(|w| WindowInfo {
            checkpoint_id: w.checkpoint_id,
            start_seqno: w.start_seqno,
            keys: w.keys(),
            bytes: w.bytes,
        })
    }
}

/// Test hook ([`Engine::hold_next_revert`](crate::Engine::hold_next_revert)):
/// the next REVERT of a partition stops once it holds the partition's
/// writer lock and every shard lock, until the hold is released (or
/// dropped), so a test can issue operations that must wait for it.
#[doc(hidden)]
pub struct RevertHold {
    gate: Arc<RevertGate>,
}

/// How long a held REVERT waits for its release at most, so a test that
/// forgets it cannot hang.
const REVERT_HOLD_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(crate) struct RevertGate {
    /// (the revert has reached the hold, the hold is released)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl RevertGate {
    /// Called by the held REVERT: says it is there, waits for the release.
    fn hold(&self) {
        let deadline = crate::engine::deadline_after(REVERT_HOLD_LIMIT);
        let mut st = self.state.lock();
        st.0 = true;
        self.cv.notify_all();
        while !st.1 && Instant::now() < deadline {
            self.cv.wait_for(&mut st, Duration::from_millis(100));
        }
    }
}

impl RevertHold {
    pub(crate) fn new(gate: Arc<RevertGate>) -> RevertHold {
        RevertHold { gate }
    }

    /// Waits until the REVERT has reached the hold; false after `limit`.
    pub fn wait_held(&self, limit: Duration) -> bool {
        let deadline = crate::engine::deadline_after(limit);
        let mut st = self.gate.state.lock();
        while !st.0 {
            if Instant::now() >= deadline {
                return false;
            }
            self.gate.cv.wait_for(&mut st, Duration::from_millis(100));
        }
        true
    }

    /// Lets the REVERT go on.
    pub fn release(self) {}
}

impl Drop for RevertHold {
    fn drop(&mut self) {
        self.gate.state.lock().1 = true;
        self.gate.cv.notify_all();
    }
}
