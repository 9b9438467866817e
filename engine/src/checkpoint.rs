//! Per-partition checkpoint manager: the ordered queue of changes that cursors
//! (the persistence cursor, replication streams) walk.
//!
//! Owns: the list of checkpoints (exactly one open, at the back), de-duplication
//! of keys inside the open checkpoint, named cursors, freeing of closed
//! checkpoints that no cursor needs, and the memory the queue holds.
//!
//! Cursors are positioned by **seqno** (the last seqno they have passed), never by
//! offsets: de-duplication leaves a hole where the old entry was, and a cursor
//! simply skips holes, so no count has to be corrected when items move. Remaining
//! counts are computed from positions, so they cannot drift.
//!
//! This module never touches the hash table or the disk, and never blocks.

use std::collections::{BTreeMap, VecDeque};

use hashbrown::HashTable;

use crate::error::{Error, Result};
use crate::item::{key_hash, QueuedItem};
use crate::sync::{Arc, AtomicUsize, Ordering};

/// A checkpoint shared between its manager and readers of closed runs: a
/// data handle (like a record), not a synchronisation point, so it is
/// `std`'s `Arc` even in loom builds.
type SharedCheckpoint = std::sync::Arc<Checkpoint>;

/// Events [`CheckpointManager::peek`] reserves room for up front.
const PEEK_RESERVE: usize = 1024;

/// How many entries ahead of the one it visits a checkpoint scan asks the
/// CPU to load (see [`Record::prefetch`](crate::item::Record)): about a
/// memory latency's worth of visits.
const PREFETCH_AHEAD: usize = 8;

fn no_cursor(name: &str) -> Error {
    Error::InvalidArgument(format!("no cursor named {name:?}"))
}

/// Checkpoint memory a write took on the engine-wide counter before it is
/// queued, so that writers on different partitions cannot all pass the
/// limit on the same reading of it. Dropped unqueued (the write failed),
/// it gives the bytes back; queued, the entry holds them.
#[must_use]
#[derive(Debug)]
pub(crate) struct MemReservation<'a> {
    shared: &'a AtomicUsize,
    bytes: usize,
}

impl<'a> MemReservation<'a> {
    /// Takes `bytes` on `shared` if that keeps it within `limit`; otherwise
    /// the counter's reading, unchanged.
    pub(crate) fn take(
        shared: &'a AtomicUsize,
        bytes: usize,
        limit: usize,
    ) -> std::result::Result<Self, usize> {
        // Nothing taken is never refused, even with the counter past the
        // limit (markers and a replica's applies are charged without one):
        // a rewrite that adds nothing net of the entry it replaces goes in.
        if bytes == 0 {
            return Ok(MemReservation { shared, bytes });
        }
        // Compare-and-swap: a refused amount is never visible to others.
        shared
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|n| *n <= limit)
            })
            .map(|_| MemReservation { shared, bytes })
    }

    /// Hands the bytes over to the entry that now holds them.
    fn keep(mut self) -> usize {
        std::mem::take(&mut self.bytes)
    }
}

impl Drop for MemReservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.shared.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Limits of one checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointConfig {
    /// The open checkpoint closes once it holds this many items.
    pub max_items: usize,
    /// The open checkpoint closes once its items take this many bytes.
    pub max_bytes: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            max_items: 2_000,
            max_bytes: 32 << 20,
        }
    }
}

/// What a cursor reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorEvent {
    /// The cursor entered the checkpoint with this id.
    CheckpointStart {
        /// Checkpoint id.
        id: u64,
    },
    /// A queued mutation, deletion or marker.
    Item(QueuedItem),
    /// The cursor finished the (closed) checkpoint with this id.
    CheckpointEnd {
        /// Checkpoint id.
        id: u64,
    },
}

/// Outcome of registering a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The cursor is registered and will read everything after the requested
    /// seqno from memory, starting in this checkpoint.
    InMemory {
        /// Checkpoint the cursor starts in.
        checkpoint_id: u64,
    },
    /// Items after the requested seqno are no longer in memory: the caller must
    /// backfill from disk first. Nothing was registered.
    NeedsBackfill {
        /// The lowest seqno memory can still serve from: register again with a
        /// seqno of at least `oldest_seqno - 1`.
        oldest_seqno: u64,
    },
}

/// A checkpoint, as reported by [`CheckpointManager::checkpoints`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Id, increasing per partition.
    pub id: u64,
    /// Whether it is the open checkpoint (the one taking new items).
    pub open: bool,
    /// Lowest seqno that can belong to it.
    pub start_seqno: u64,
    /// Highest seqno it holds (or `start_seqno - 1` when empty).
    pub high_seqno: u64,
    /// Live (not de-duplicated) items.
    pub items: usize,
    /// Bytes charged for its items.
    pub mem_bytes: usize,
    /// Entries it holds: its live items plus the holes de-duplication and
    /// expelling leave. The open checkpoint drops its holes once they are
    /// half its entries (and it holds at least twice its item limit, capped
    /// at 4,096), so a few keys written again and again keep it small.
    pub entries: usize,
}

/// A cursor, as reported by [`CheckpointManager::cursors`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorInfo {
    /// Cursor name.
    pub name: String,
    /// Checkpoint the cursor is in.
    pub checkpoint_id: u64,
    /// Last seqno the cursor has passed.
    pub seqno: u64,
    /// Exact number of items still to read.
    pub remaining: usize,
    /// Checkpoint memory the items still to read hold (key, value and the
    /// per-entry overhead, as checkpoint memory counts them).
    pub remaining_bytes: usize,
}

/// An entry seen by [`CheckpointManager::scan`], borrowed from the checkpoint.
#[derive(Debug, Clone, Copy)]
pub enum EventRef<'a> {
    /// The cursor entered the checkpoint with this id.
    CheckpointStart {
        /// Checkpoint id.
        id: u64,
    },
    /// A queued mutation, deletion or marker.
    Item(&'a QueuedItem),
    /// The cursor finished the (closed) checkpoint with this id.
    CheckpointEnd {
        /// Checkpoint id.
        id: u64,
    },
}

impl CursorEvent {
    /// The event, borrowed.
    pub fn as_event_ref(&self) -> EventRef<'_> {
        match self {
            CursorEvent::CheckpointStart { id } => EventRef::CheckpointStart { id: *id },
            CursorEvent::Item(i) => EventRef::Item(i),
            CursorEvent::CheckpointEnd { id } => EventRef::CheckpointEnd { id: *id },
        }
    }
}

impl EventRef<'_> {
    /// An owned copy of the event.
    pub fn to_owned(self) -> CursorEvent {
        match self {
            EventRef::CheckpointStart { id } => CursorEvent::CheckpointStart { id },
            EventRef::Item(i) => CursorEvent::Item(i.clone()),
            EventRef::CheckpointEnd { id } => CursorEvent::CheckpointEnd { id },
        }
    }
}

/// How far a [`scan`](CheckpointManager::scan) got; commit it with
/// [`advance`](CheckpointManager::advance) once the reader has dealt with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorProgress {
    /// Number of items seen.
    pub items: usize,
    /// Bytes of the items seen.
    pub bytes: usize,
    /// Whether the scan stopped at the caller's `upto_seqno` barrier.
    pub blocked: bool,
    /// Whether anything (item or checkpoint boundary) was seen.
    pub moved: bool,
    position: CursorPosition,
}

impl CursorProgress {
    /// The last seqno the cursor will have passed once committed.
    pub fn end_seqno(&self) -> u64 {
        self.position.seqno
    }

    /// The checkpoint the cursor will be in once committed.
    pub fn end_checkpoint_id(&self) -> u64 {
        self.position.checkpoint_id
    }

    /// Whether the scan stopped between two checkpoints (it finished one
    /// and has read nothing of the next).
    pub fn at_checkpoint_boundary(&self) -> bool {
        self.position.start_pending
    }

    /// Which registration of the cursor the scan read for.
    pub(crate) fn registration(&self) -> u64 {
        self.position.registration
    }
}

/// A batch read by [`CheckpointManager::peek`] (owned events).
#[derive(Debug, Clone)]
pub struct CursorBatch {
    /// Events in seqno order.
    pub events: Vec<CursorEvent>,
    /// Where the batch ends.
    pub progress: CursorProgress,
}

impl CursorBatch {
    /// Whether the batch carries nothing and leaves the cursor where it was.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Number of `Item` events.
    pub fn items(&self) -> usize {
        self.progress.items
    }
}

impl AsRef<CursorProgress> for CursorBatch {
    fn as_ref(&self) -> &CursorProgress {
        &self.progress
    }
}

impl AsRef<CursorProgress> for CursorProgress {
    fn as_ref(&self) -> &CursorProgress {
        self
    }
}

/// Checkpoints freed by a cursor move; dropping this releases their items.
/// Returned so callers can drop them outside their own locks.
#[must_use = "dropping frees the checkpoints; keep it to free them later"]
#[derive(Debug, Default)]
pub struct FreedCheckpoints(Vec<SharedCheckpoint>);

impl FreedCheckpoints {
    /// Number of checkpoints freed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing was freed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CursorPosition {
    checkpoint_id: u64,
    seqno: u64,
    /// The reader has not yet been told it entered `checkpoint_id`.
    start_pending: bool,
    /// Which registration of the cursor this position belongs to: a scan
    /// made before the cursor was registered again cannot be committed to
    /// the new registration (its events went to the old reader).
    registration: u64,
    /// May be dropped under memory pressure ([`CheckpointManager::drop_cursors_behind`]).
    droppable: bool,
}

#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct Checkpoint {
    id: u64,
    open: bool,
    start_seqno: u64,
    /// Seqno of every slot ever queued here, increasing; holes keep theirs.
    seqnos: Vec<u64>,
    /// The entries; `None` is a hole left by de-duplication or removal.
    slots: Vec<Option<QueuedItem>>,
    live: usize,
    mem: usize,
    /// Slot of each key's live entry, kept only while the checkpoint is open;
    /// hashed by key, compared through the slot (no key copy).
    keys: HashTable<usize>,
    /// Slots before this one have been looked at by
    /// [`CheckpointManager::expel_read_items`].
    expel_from: usize,
}

impl Checkpoint {
    /// An open checkpoint, empty: it is sized at its first entry
    /// ([`reserve`](Self::reserve)), not here, so an idle partition's open
    /// checkpoint holds nothing. (Sized here, each took about 117 KiB at
    /// the default limit, 117 MiB for 1,024 idle partitions, which no
    /// limit counted; found by a review.)
    fn new(id: u64, start_seqno: u64) -> Self {
        Checkpoint {
            id,
            open: true,
            start_seqno,
            seqnos: Vec::new(),
            slots: Vec::new(),
            live: 0,
            mem: 0,
            keys: HashTable::new(),
            expel_from: 0,
        }
    }

    /// Sizes an empty open checkpoint for `capacity` entries up front, so
    /// filling it never re-allocates or re-hashes (a re-hash would read
    /// every key).
    fn reserve(&mut self, capacity: usize) {
        self.seqnos.reserve(capacity);
        self.slots.reserve(capacity);
        let slots = &self.slots;
        self.keys.reserve(capacity, |i| {
            slots[*i].as_ref().map_or(0, |s| key_hash(s.key()))
        });
    }

    /// Closes the checkpoint: drops the key index and the unused part of a
    /// checkpoint closed early (on demand), which may live long.
    fn close(&mut self) {
        self.open = false;
        self.keys = HashTable::new();
        if self.slots.len() < self.slots.capacity() / 2 {
            self.slots.shrink_to_fit();
            self.seqnos.shrink_to_fit();
        }
    }

    /// Drops the holes of the open checkpoint, all but its last slot (whose
    /// seqno is the checkpoint's high seqno). A checkpoint kept open by
    /// de-duplication (a few keys written again and again never reach the
    /// item limit) or by expelling would otherwise keep a slot for every
    /// write it ever took. Cursors are positioned by seqno, so none moves;
    /// the key index and the expel mark are moved to the new slots.
    fn compact(&mut self) {
        debug_assert!(self.open, "only the open checkpoint is compacted");
        let last = self.slots.len().saturating_sub(1);
        let mut to = vec![usize::MAX; self.slots.len()];
        let mut kept = 0;
        let mut expel_from = 0;
        for (from, dest) in to.iter_mut().enumerate() {
            if self.slots[from].is_none() && from != last {
                continue;
            }
            *dest = kept;
            self.slots.swap(kept, from);
            self.seqnos[kept] = self.seqnos[from];
            kept += 1;
            if from < self.expel_from {
                expel_from = kept;
            }
        }
        self.slots.truncate(kept);
        self.seqnos.truncate(kept);
        self.expel_from = expel_from;
        for slot in self.keys.iter_mut() {
            *slot = to[*slot];
        }
    }

    fn high_seqno(&self) -> u64 {
        self.seqnos
            .last()
            .copied()
            .unwrap_or(self.start_seqno.saturating_sub(1))
    }

    /// Index of the first slot with a seqno above `seqno`.
    fn first_after(&self, seqno: u64) -> usize {
        self.seqnos.partition_point(|s| *s <= seqno)
    }

    /// Checkpoint memory of the live entries after `seqno`.
    fn bytes_after(&self, seqno: u64) -> usize {
        if seqno < self.start_seqno {
            return self.mem;
        }
        self.slots[self.first_after(seqno)..]
            .iter()
            .flatten()
            .map(QueuedItem::mem_size)
            .sum()
    }

    fn live_after(&self, seqno: u64) -> usize {
        if seqno < self.start_seqno {
            return self.live;
        }
        self.slots[self.first_after(seqno)..]
            .iter()
            .filter(|s| s.is_some())
            .count()
    }

    fn info(&self) -> CheckpointInfo {
        CheckpointInfo {
            id: self.id,
            open: self.open,
            start_seqno: self.start_seqno,
            high_seqno: self.high_seqno(),
            items: self.live,
            mem_bytes: self.mem,
            entries: self.slots.len(),
        }
    }
}

/// A scan in progress: the position and what it has seen.
#[derive(Debug, Clone, Copy)]
struct ScanState {
    pos: CursorPosition,
    items: usize,
    bytes: usize,
    blocked: bool,
    moved: bool,
}

impl ScanState {
    /// A scan from `pos`, adding to the counts of `after` if it continues one.
    fn continuing(pos: CursorPosition, after: Option<&CursorProgress>) -> Self {
        let (items, bytes, moved) = after.map_or((0, 0, false), |a| (a.items, a.bytes, a.moved));
        ScanState {
            pos,
            items,
            bytes,
            blocked: false,
            moved,
        }
    }

    /// Reads `ck` (the checkpoint `pos` is in) from `pos` on. Returns whether
    /// it read to the end of `ck`, rather than stopping at `max_items` /
    /// `max_bytes` or at an entry above `limit` (then `blocked`).
    fn read(
        &mut self,
        ck: &Checkpoint,
        max_items: usize,
        max_bytes: usize,
        limit: u64,
        visit: &mut impl FnMut(EventRef<'_>),
    ) -> bool {
        if self.pos.start_pending {
            visit(EventRef::CheckpointStart { id: ck.id });
            self.pos.start_pending = false;
            self.moved = true;
        }
        for j in ck.first_after(self.pos.seqno)..ck.slots.len() {
            if self.items >= max_items || (self.items > 0 && self.bytes >= max_bytes) {
                return false;
            }
            // Records a scan has not touched lately (a lagging flusher or
            // stream, a backfill's switch-over) are spread over memory one
            // partition's stride apart: loading the one `PREFETCH_AHEAD`
            // entries on while this one is visited hides most of the wait.
            if let Some(Some(ahead)) = ck.slots.get(j + PREFETCH_AHEAD) {
                ahead.record().prefetch();
            }
            if ck.seqnos[j] > limit {
                self.blocked = true;
                return false;
            }
            if let Some(item) = &ck.slots[j] {
                self.items += 1;
                self.bytes += item.mem_size();
                visit(EventRef::Item(item));
            }
            self.pos.seqno = ck.seqnos[j];
            self.moved = true;
        }
        true
    }

    /// Leaves the finished checkpoint `done` for the one with id `next`;
    /// returns whether the scan stops here, at this boundary, because the
    /// whole scan reached `round_limit`.
    fn next_checkpoint(
        &mut self,
        done: u64,
        next: u64,
        round_limit: Option<(usize, usize)>,
        visit: &mut impl FnMut(EventRef<'_>),
    ) -> bool {
        visit(EventRef::CheckpointEnd { id: done });
        self.pos.checkpoint_id = next;
        self.pos.start_pending = true;
        self.moved = true;
        round_limit.is_some_and(|(i, b)| self.items >= i || self.bytes >= b)
    }

    fn progress(&self) -> CursorProgress {
        CursorProgress {
            items: self.items,
            bytes: self.bytes,
            blocked: self.blocked,
            moved: self.moved,
            position: self.pos,
        }
    }
}

/// Closed checkpoints a cursor reads next, shared with their manager (see
/// [`CheckpointManager::closed_run`]). Scanning it needs no lock; commit the
/// result with [`CheckpointManager::advance`] as for any scan.
#[derive(Debug, Clone)]
pub struct ClosedRun {
    start: ScanState,
    checkpoints: Vec<SharedCheckpoint>,
    /// Id of the checkpoint after the run's last one.
    next_id: u64,
}

impl ClosedRun {
    /// Whether the run holds no checkpoint (the cursor is in the open one).
    pub fn is_empty(&self) -> bool {
        self.checkpoints.is_empty()
    }

    /// Reads the run like [`CheckpointManager::scan_on`]: every entry after
    /// the start position up to `upto_seqno` (then `blocked`), ending at
    /// checkpoint boundaries; `round_limit` stops it at the first boundary
    /// past that many items or bytes of the whole scan.
    pub fn scan(
        &self,
        upto_seqno: Option<u64>,
        round_limit: Option<(usize, usize)>,
        mut visit: impl FnMut(EventRef<'_>),
    ) -> CursorProgress {
        let mut st = self.start;
        let limit = upto_seqno.unwrap_or(u64::MAX);
        for (i, ck) in self.checkpoints.iter().enumerate() {
            if !st.read(ck, usize::MAX, usize::MAX, limit, &mut visit) {
                break;
            }
            let next = self.checkpoints.get(i + 1).map_or(self.next_id, |c| c.id);
            if st.next_checkpoint(ck.id, next, round_limit, &mut visit) {
                break;
            }
        }
        st.progress()
    }

    /// Reads the run up to `max_items` items or about `max_bytes` (at least
    /// one item), stopping anywhere, inside a checkpoint too: for readers
    /// whose stopping point need not be consistent on disk (replication
    /// streams; a cursor resumes at any seqno).
    pub fn scan_within(
        &self,
        (max_items, max_bytes): (usize, usize),
        mut visit: impl FnMut(EventRef<'_>),
    ) -> CursorProgress {
        let mut st = self.start;
        for (i, ck) in self.checkpoints.iter().enumerate() {
            if !st.read(ck, max_items, max_bytes, u64::MAX, &mut visit) {
                break;
            }
            let next = self.checkpoints.get(i + 1).map_or(self.next_id, |c| c.id);
            if st.next_checkpoint(ck.id, next, Some((max_items, max_bytes)), &mut visit) {
                break;
            }
        }
        st.progress()
    }
}

/// The checkpoint manager of one partition. Not synchronised: the partition
/// holds it under a lock.
#[derive(Debug)]
pub struct CheckpointManager {
    /// Shared so a reader can scan closed checkpoints (which never change)
    /// without the partition's lock; see [`ClosedRun`].
    checkpoints: VecDeque<SharedCheckpoint>,
    cursors: BTreeMap<String, CursorPosition>,
    /// Cursor registrations so far (numbers each one).
    registrations: u64,
    config: CheckpointConfig,
    high_seqno: u64,
    /// Highest seqno whose entry [`expel_read_items`](Self::expel_read_items)
    /// has taken out of memory (0: none); a cursor cannot start before it.
    expelled_upto: u64,
    mem: usize,
    shared_mem: Arc<AtomicUsize>,
}

impl CheckpointManager {
    /// A manager whose open checkpoint has id `checkpoint_id` and whose history
    /// so far ends at `high_seqno`. `shared_mem` accumulates the memory of every
    /// manager of the engine.
    pub fn new(
        config: CheckpointConfig,
        checkpoint_id: u64,
        high_seqno: u64,
        shared_mem: Arc<AtomicUsize>,
    ) -> Self {
        Self::starting_at(
            config,
            checkpoint_id,
            high_seqno + 1,
            high_seqno,
            shared_mem,
        )
    }

    /// A manager as [`new`](Self::new) makes, whose open checkpoint covers
    /// seqnos from `first_seqno` (at most `high_seqno + 1`) though its
    /// history ends at `high_seqno`: none lie between. A primary reopened
    /// after a crash continues above its seqno reservation while its disk
    /// ends lower; a cursor at any seqno from the disk's end up then reads
    /// from memory (before, a replica caught up to the disk's end was sent
    /// a disk snapshot of the empty range, a full scan of its partition, at
    /// every resume until the partition was written again; found by a
    /// review).
    pub(crate) fn starting_at(
        config: CheckpointConfig,
        checkpoint_id: u64,
        first_seqno: u64,
        high_seqno: u64,
        shared_mem: Arc<AtomicUsize>,
    ) -> Self {
        let mut checkpoints = VecDeque::new();
        checkpoints.push_back(SharedCheckpoint::new(Checkpoint::new(
            checkpoint_id,
            first_seqno.min(high_seqno + 1),
        )));
        CheckpointManager {
            checkpoints,
            cursors: BTreeMap::new(),
            config: CheckpointConfig {
                max_items: config.max_items.max(1),
                max_bytes: config.max_bytes.max(1),
            },
            high_seqno,
            expelled_upto: 0,
            mem: 0,
            shared_mem,
            registrations: 0,
        }
    }

    /// An empty manager to take this one's place (a partition reset): the
    /// same limits and shared memory count, its open checkpoint `checkpoint_id`
    /// after history ending at `high_seqno`, and cursor registrations
    /// numbered on from this one's, so that a scan begun on this manager is
    /// never taken for one of a cursor registered again on the new one.
    pub fn replacement(&self, checkpoint_id: u64, high_seqno: u64) -> Self {
        let mut next = CheckpointManager::new(
            self.config,
            checkpoint_id,
            high_seqno,
            Arc::clone(&self.shared_mem),
        );
        next.registrations = self.registrations;
        next
    }

    /// Entries an open checkpoint is sized for: its item limit, capped so a
    /// huge limit does not reserve memory nobody uses.
    fn capacity(config: &CheckpointConfig) -> usize {
        config.max_items.min(4096)
    }

    fn open(&self) -> &Checkpoint {
        self.checkpoints
            .back()
            .expect("a checkpoint manager always has an open checkpoint")
    }

    fn open_mut(&mut self) -> &mut Checkpoint {
        // The open checkpoint is never handed out (only closed ones are), so
        // this does not copy.
        SharedCheckpoint::make_mut(
            self.checkpoints
                .back_mut()
                .expect("a checkpoint manager always has an open checkpoint"),
        )
    }

    /// Whether the open checkpoint holds no live entry.
    pub fn open_checkpoint_is_empty(&self) -> bool {
        self.open().live == 0
    }

    /// Id of the open checkpoint.
    pub fn open_checkpoint_id(&self) -> u64 {
        self.open().id
    }

    /// Highest seqno ever queued (or the starting point).
    pub fn high_seqno(&self) -> u64 {
        self.high_seqno
    }

    /// Bytes held by all checkpoints of this partition.
    pub fn mem_bytes(&self) -> usize {
        self.mem
    }

    /// Number of checkpoints held (open one included).
    pub fn num_checkpoints(&self) -> usize {
        self.checkpoints.len()
    }

    fn charge(&mut self, add: usize, sub: usize) {
        self.charge_reserved(add, sub, 0);
    }

    /// Adds `add` and takes `sub` bytes from this manager's memory; the
    /// engine-wide counter already holds `reserved` of `add`.
    fn charge_reserved(&mut self, add: usize, sub: usize, reserved: usize) {
        self.mem = self.mem + add - sub;
        let sub = sub + reserved;
        if add > sub {
            self.shared_mem.fetch_add(add - sub, Ordering::Relaxed);
        } else if sub > add {
            self.shared_mem.fetch_sub(sub - add, Ordering::Relaxed);
        }
    }

    /// Appends an item to the open checkpoint. Its seqno must be above every
    /// seqno queued so far. A key already in the open checkpoint is
    /// de-duplicated: the older entry becomes a hole. Closes the open checkpoint
    /// first when it is full. Returns whether an older entry was replaced.
    ///
    /// # Panics
    ///
    /// If the item's seqno is not above every seqno queued so far: the
    /// manager's order is the by-seqno order cursors rely on, so a caller's
    /// numbering mistake stops here rather than reaching a cursor. (The
    /// engine hands out the seqnos it queues, so no engine call reaches it.)
    pub fn queue(&mut self, item: QueuedItem) -> bool {
        let hash = item.op.is_key_op().then(|| key_hash(item.key()));
        self.queue_hashed(item, hash, None) > 0
    }

    /// [`queue`](Self::queue) with the key's hash already known
    /// (`key_hash(item.key())` for a key operation, `None` for a marker):
    /// a write hashed its key for the hash table already. `reserved` is the
    /// write's admission on the engine-wide counter, which the entry now
    /// holds. Returns the bytes of the older entry it de-duplicated (0 if
    /// none).
    pub(crate) fn queue_hashed(
        &mut self,
        item: QueuedItem,
        hash: Option<u64>,
        reserved: Option<MemReservation<'_>>,
    ) -> usize {
        debug_assert_eq!(hash, item.op.is_key_op().then(|| key_hash(item.key())));
        let seqno = item.seqno();
        assert!(
            seqno > self.high_seqno,
            "seqno {seqno} queued after {}",
            self.high_seqno
        );
        {
            let open = self.open();
            if open.live >= self.config.max_items || open.mem >= self.config.max_bytes {
                self.create_checkpoint();
            }
        }
        self.high_seqno = seqno;
        let size = item.mem_size();
        let capacity = Self::capacity(&self.config);
        let open = self.open_mut();
        if open.slots.capacity() == 0 {
            open.reserve(capacity);
        }
        let slot = open.slots.len();
        let mut freed = 0;
        let mut old_slot = None;
        if let Some(hash) = hash {
            let Checkpoint { keys, slots, .. } = &mut *open;
            let same_key = |i: &usize| slots[*i].as_ref().is_some_and(|s| s.key() == item.key());
            match keys.find_mut(hash, same_key) {
                Some(idx) => old_slot = Some(std::mem::replace(idx, slot)),
                None => {
                    keys.insert_unique(hash, slot, |i| {
                        slots[*i].as_ref().map_or(0, |s| key_hash(s.key()))
                    });
                }
            }
        }
        open.seqnos.push(seqno);
        open.slots.push(Some(item));
        if let Some(old_item) = old_slot.and_then(|old| open.slots[old].take()) {
            freed = old_item.mem_size();
            open.live -= 1;
        }
        open.live += 1;
        open.mem = open.mem + size - freed;
        // Holes are at least half the slots: dropping them costs about what
        // the writes that made them did.
        if open.slots.len() >= 2 * open.live.max(capacity) {
            open.compact();
        }
        self.charge_reserved(size, freed, reserved.map_or(0, MemReservation::keep));
        freed
    }

    /// The bytes [`queue_hashed`](Self::queue_hashed) would give back for
    /// an entry of `key` (hash `hash`) queued now: its live entry in the
    /// open checkpoint, unless the open checkpoint is full and would be
    /// closed first. A write's admission counts what it adds net of this.
    pub(crate) fn dedup_refund(&self, hash: u64, key: &[u8]) -> usize {
        let open = self.open();
        if open.live >= self.config.max_items || open.mem >= self.config.max_bytes {
            return 0;
        }
        self.open_entry(hash, key).map_or(0, QueuedItem::mem_size)
    }

    /// The seqno of `key`'s live entry in the open checkpoint (hash `hash`),
    /// the one a write of it queued now would de-duplicate.
    pub(crate) fn open_entry_seqno(&self, hash: u64, key: &[u8]) -> Option<u64> {
        self.open_entry(hash, key).map(QueuedItem::seqno)
    }

    /// `key`'s live entry in the open checkpoint (hash `hash`), if any.
    fn open_entry(&self, hash: u64, key: &[u8]) -> Option<&QueuedItem> {
        let open = self.open();
        open.keys
            .find(hash, |i| {
                open.slots[*i].as_ref().is_some_and(|s| s.key() == key)
            })
            .and_then(|i| open.slots[*i].as_ref())
    }

    /// Closes the open checkpoint and opens a new one; returns the new id.
    pub fn create_checkpoint(&mut self) -> u64 {
        self.create_checkpoint_with_id(0)
    }

    /// Closes the open checkpoint and opens one with id `id`, or the next id
    /// if `id` is not above the open one (replicas follow the primary's ids).
    pub fn create_checkpoint_with_id(&mut self, id: u64) -> u64 {
        let start = self.high_seqno.saturating_add(1);
        let open = self.open_mut();
        open.close();
        let id = id.max(open.id.saturating_add(1));
        self.checkpoints
            .push_back(SharedCheckpoint::new(Checkpoint::new(id, start)));
        tracing::debug!(
            checkpoint_id = id,
            start_seqno = start,
            "checkpoint created"
        );
        drop(self.remove_unreferenced());
        id
    }

    /// Whether memory still holds every item after `from_seqno`, so a cursor
    /// registered there would not need a backfill.
    pub fn holds_after(&self, from_seqno: u64) -> bool {
        from_seqno.saturating_add(1) >= self.oldest_seqno()
    }

    /// The lowest seqno memory can serve a new cursor from: the first seqno
    /// of the oldest checkpoint held, or the one after the last expelled
    /// entry, whichever is higher.
    fn oldest_seqno(&self) -> u64 {
        let front = self.checkpoints.front().map_or(0, |c| c.start_seqno);
        front.max(self.expelled_upto.saturating_add(1))
    }

    /// Registers (or re-registers) the cursor `name` to read every item after
    /// `from_seqno`.
    pub fn register_cursor(&mut self, name: &str, from_seqno: u64) -> Result<Registration> {
        let (registration, freed) = self.register_cursor_freeing(name, from_seqno)?;
        drop(freed);
        Ok(registration)
    }

    /// [`register_cursor`](Self::register_cursor), handing back the
    /// checkpoints a re-registration frees, for the caller to drop once it
    /// has released the partition's lock.
    pub fn register_cursor_freeing(
        &mut self,
        name: &str,
        from_seqno: u64,
    ) -> Result<(Registration, FreedCheckpoints)> {
        if from_seqno > self.high_seqno {
            return Err(Error::InvalidArgument(format!(
                "cursor {name}: seqno {from_seqno} is above the partition's high seqno {}",
                self.high_seqno
            )));
        }
        if !self.holds_after(from_seqno) {
            return Ok((
                Registration::NeedsBackfill {
                    oldest_seqno: self.oldest_seqno(),
                },
                FreedCheckpoints::default(),
            ));
        }
        let idx = self
            .checkpoints
            .partition_point(|c| c.start_seqno <= from_seqno + 1)
            .saturating_sub(1);
        let checkpoint_id = self.checkpoints[idx].id;
        self.registrations += 1;
        self.cursors.insert(
            name.to_owned(),
            CursorPosition {
                checkpoint_id,
                seqno: from_seqno,
                start_pending: true,
                registration: self.registrations,
                droppable: false,
            },
        );
        Ok((
            Registration::InMemory { checkpoint_id },
            self.remove_unreferenced(),
        ))
    }

    /// Drops the cursor `name`; returns whether it existed.
    pub fn remove_cursor(&mut self, name: &str) -> bool {
        let (existed, freed) = self.remove_cursor_freeing(name);
        drop(freed);
        existed
    }

    /// [`remove_cursor`](Self::remove_cursor), handing back the checkpoints
    /// only that cursor held, for the caller to drop once it has released
    /// the partition's lock: a slow replica's stream cursor can hold
    /// hundreds of thousands of entries, and freeing them took that long
    /// with every writer of the partition waiting.
    pub fn remove_cursor_freeing(&mut self, name: &str) -> (bool, FreedCheckpoints) {
        if self.cursors.remove(name).is_none() {
            return (false, FreedCheckpoints::default());
        }
        (true, self.remove_unreferenced())
    }

    /// Lets the cursor `name` be dropped under memory pressure (a stream's
    /// cursor: its reader can backfill from disk instead). Returns whether
    /// the cursor exists.
    pub fn set_droppable(&mut self, name: &str) -> bool {
        self.cursors
            .get_mut(name)
            .map(|c| c.droppable = true)
            .is_some()
    }

    /// Drops the droppable cursors that alone hold closed checkpoints the
    /// cursor `leader` (the persistence cursor) has left, when those
    /// checkpoints hold at least `min_bytes`: what they hold is on disk, and
    /// only they keep it in memory. A droppable cursor that has passed every
    /// seqno `leader` has is never dropped (it is only waiting to step into
    /// the next checkpoint), and nothing is dropped when it would free less
    /// than `min_bytes` (the memory is held by something else: a
    /// non-droppable cursor, the open checkpoint, unpersisted items).
    /// Returns the dropped cursors' names and the freed checkpoints, for the
    /// caller to drop after releasing its lock.
    pub fn drop_cursors_behind(
        &mut self,
        leader: &str,
        min_bytes: usize,
    ) -> (Vec<String>, FreedCheckpoints) {
        let nothing = (Vec::new(), FreedCheckpoints::default());
        let Some(lead_seqno) = self.cursors.get(leader).map(|c| c.seqno) else {
            return nothing;
        };
        // Checkpoints below `bound` are needed by droppable cursors only
        // (the leader is not droppable, so `bound` is at most its checkpoint).
        let bound = self
            .cursors
            .values()
            .filter(|c| !c.droppable)
            .map(|c| c.checkpoint_id)
            .min()
            .unwrap_or(u64::MAX);
        let dropped =
            |c: &CursorPosition| c.droppable && c.checkpoint_id < bound && c.seqno < lead_seqno;
        // What the drop frees: the closed checkpoints below every cursor it
        // keeps. (Before, a droppable cursor kept for having passed the
        // leader's seqno still held its checkpoint, whose bytes counted as
        // freed: a stream was dropped for nothing; found by a review.)
        let kept_bound = self
            .cursors
            .values()
            .filter(|c| !dropped(c))
            .map(|c| c.checkpoint_id)
            .min()
            .unwrap_or(u64::MAX);
        let freed: usize = self
            .checkpoints
            .iter()
            .take_while(|c| !c.open && c.id < kept_bound)
            .map(|c| c.mem)
            .sum();
        if freed == 0 || freed < min_bytes {
            return nothing;
        }
        let names: Vec<String> = self
            .cursors
            .iter()
            .filter(|(_, c)| dropped(c))
            .map(|(n, _)| n.clone())
            .collect();
        if names.is_empty() {
            return nothing;
        }
        for n in &names {
            self.cursors.remove(n);
        }
        (names, self.remove_unreferenced())
    }

    /// Whether the open checkpoint holds items and every cursor, droppable
    /// ones aside, has read all of it.
    pub fn open_checkpoint_read_by_all_but_droppable(&self) -> bool {
        let open = self.open();
        open.live > 0
            && self
                .cursors
                .values()
                .filter(|pos| !pos.droppable)
                .all(|pos| pos.checkpoint_id == open.id && pos.seqno >= self.high_seqno)
    }

    /// Whether a cursor called `name` exists.
    pub fn has_cursor(&self, name: &str) -> bool {
        self.cursors.contains_key(name)
    }

    fn index_of(&self, checkpoint_id: u64) -> usize {
        // Ids increase from front to back (consecutive on a primary).
        self.checkpoints
            .partition_point(|c| c.id < checkpoint_id)
            .min(self.checkpoints.len() - 1)
    }

    fn cursor(&self, name: &str) -> Result<CursorPosition> {
        self.cursors
            .get(name)
            .copied()
            .ok_or_else(|| no_cursor(name))
    }

    /// Visits up to `max_items` items (and at most about `max_bytes`) after
    /// the cursor's position, with the checkpoint boundaries crossed, without
    /// moving the cursor or copying items; items with a seqno above
    /// `upto_seqno` are not visited. Commit with [`advance`](Self::advance).
    pub fn scan(
        &self,
        name: &str,
        max_items: usize,
        max_bytes: usize,
        upto_seqno: Option<u64>,
        visit: impl FnMut(EventRef<'_>),
    ) -> Result<CursorProgress> {
        self.scan_on(name, None, max_items, max_bytes, upto_seqno, None, visit)
    }

    /// Like [`scan`](Self::scan), but continuing where an earlier scan of the
    /// same cursor (not yet committed) stopped, if `after` is given; the
    /// returned progress covers both, so one [`advance`](Self::advance)
    /// commits the lot. Lets a reader scan a long batch in short pieces and
    /// release its lock between them.
    ///
    /// `round_limit` (items, bytes), if given, also stops the scan at the
    /// first checkpoint boundary reached once the whole scan holds that many
    /// items or bytes. A reader that must stop at a *consistent* point — the
    /// flusher, whose stopping point becomes the partition's persisted high
    /// seqno — stops only there (see [`CursorProgress::at_checkpoint_boundary`])
    /// or at the current end of the open checkpoint: inside a checkpoint,
    /// de-duplication may have moved a key's change from before the stopping
    /// point to after it.
    #[allow(clippy::too_many_arguments)]
    pub fn scan_on(
        &self,
        name: &str,
        after: Option<&CursorProgress>,
        max_items: usize,
        max_bytes: usize,
        upto_seqno: Option<u64>,
        round_limit: Option<(usize, usize)>,
        mut visit: impl FnMut(EventRef<'_>),
    ) -> Result<CursorProgress> {
        let pos = self.resume_position(name, after)?;
        let mut st = ScanState::continuing(pos, after);
        let limit = upto_seqno.unwrap_or(u64::MAX);
        let mut idx = self.index_of(st.pos.checkpoint_id);
        loop {
            let ck = &self.checkpoints[idx];
            if !st.read(ck, max_items, max_bytes, limit, &mut visit)
                || ck.open
                || idx + 1 >= self.checkpoints.len()
            {
                break;
            }
            idx += 1;
            if st.next_checkpoint(ck.id, self.checkpoints[idx].id, round_limit, &mut visit) {
                break;
            }
        }
        Ok(st.progress())
    }

    /// The closed checkpoints the cursor `name` reads next — continuing
    /// `after` if given, as [`scan_on`](Self::scan_on) — taking whole
    /// checkpoints until they hold at least `max_items` live items. They are
    /// shared, not copied: closed checkpoints never change, so the run can be
    /// scanned after the caller has released the manager's lock. Empty when
    /// the cursor is in the open checkpoint.
    pub fn closed_run(
        &self,
        name: &str,
        after: Option<&CursorProgress>,
        max_items: usize,
    ) -> Result<ClosedRun> {
        let pos = self.resume_position(name, after)?;
        let mut run = ClosedRun {
            start: ScanState::continuing(pos, after),
            checkpoints: Vec::new(),
            next_id: 0,
        };
        let mut items = 0;
        for (i, ck) in self
            .checkpoints
            .iter()
            .enumerate()
            .skip(self.index_of(pos.checkpoint_id))
        {
            let Some(next) = self.checkpoints.get(i + 1) else {
                break;
            };
            if ck.open || items >= max_items.max(1) {
                break;
            }
            // Whole checkpoints' counts: cheap, and the budget is soft.
            items += ck.live;
            run.checkpoints.push(SharedCheckpoint::clone(ck));
            run.next_id = next.id;
        }
        Ok(run)
    }

    /// Where a scan of cursor `name` resumes: after the uncommitted scan
    /// `after` if given (it must not be behind the cursor), else at the
    /// cursor's committed position.
    fn resume_position(
        &self,
        name: &str,
        after: Option<&CursorProgress>,
    ) -> Result<CursorPosition> {
        let committed = self.cursor(name)?;
        match after {
            Some(a) if a.position.registration != committed.registration => Err(Error::WrongState(
                format!("cursor {name:?} was registered again since this scan began"),
            )),
            Some(a) => {
                if a.position.seqno < committed.seqno
                    || a.position.checkpoint_id < committed.checkpoint_id
                {
                    return Err(Error::InvalidArgument(format!(
                        "cursor {name:?}: cannot continue a scan from seqno {}, behind the \
                         cursor's seqno {}",
                        a.position.seqno, committed.seqno
                    )));
                }
                Ok(a.position)
            }
            None => Ok(committed),
        }
    }

    /// Like [`scan`](Self::scan), returning owned events.
    pub fn peek(
        &self,
        name: &str,
        max_items: usize,
        max_bytes: usize,
        upto_seqno: Option<u64>,
    ) -> Result<CursorBatch> {
        let mut events = Vec::with_capacity(max_items.min(PEEK_RESERVE));
        let progress = self.scan(name, max_items, max_bytes, upto_seqno, |e| {
            events.push(e.to_owned());
        })?;
        Ok(CursorBatch { events, progress })
    }

    /// Moves the cursor to the end of a batch read earlier with
    /// [`scan`](Self::scan) or [`peek`](Self::peek); returns the checkpoints
    /// that no cursor needs any more, for the caller to drop.
    pub fn advance(
        &mut self,
        name: &str,
        progress: impl AsRef<CursorProgress>,
    ) -> Result<FreedCheckpoints> {
        let to = progress.as_ref().position;
        let current = self.cursors.get_mut(name).ok_or_else(|| no_cursor(name))?;
        if to.registration != current.registration {
            return Err(Error::WrongState(format!(
                "cursor {name:?} was registered again since this scan began; the scan's \
                 events belong to the old registration and are not committed"
            )));
        }
        if to.seqno < current.seqno || to.checkpoint_id < current.checkpoint_id {
            return Err(Error::InvalidArgument(format!(
                "cursor {name:?} cannot move back from seqno {} to {}",
                current.seqno, to.seqno
            )));
        }
        // In place: no key allocated on every batch.
        *current = to;
        Ok(self.remove_unreferenced())
    }

    /// [`advance`](Self::advance) for a scan of `run`, a run taken for the
    /// cursor's own position (`closed_run` with no `after`), only if the
    /// cursor is still there: the run was read without the manager's lock,
    /// and another reader of the same cursor may have read and consumed the
    /// same events meanwhile. Committing this scan too would hand them out
    /// twice (found by a review: it was accepted whenever it ended at or
    /// past the other reader's position).
    pub fn commit_run(
        &mut self,
        name: &str,
        run: &ClosedRun,
        progress: impl AsRef<CursorProgress>,
    ) -> Result<FreedCheckpoints> {
        let (now, began) = (self.cursor(name)?, run.start.pos);
        let at = |p: CursorPosition| (p.registration, p.checkpoint_id, p.seqno, p.start_pending);
        if now.registration == began.registration && at(now) != at(began) {
            return Err(Error::WrongState(format!(
                "cursor {name:?} was read by another reader during this read; the scan's \
                 events were handed out there and are not committed"
            )));
        }
        self.advance(name, progress)
    }

    /// [`peek`](Self::peek) and [`advance`](Self::advance) in one step.
    pub fn read(&mut self, name: &str, max_items: usize) -> Result<CursorBatch> {
        let batch = self.peek(name, max_items, usize::MAX, None)?;
        drop(self.advance(name, &batch)?);
        Ok(batch)
    }

    /// Exact number of items the cursor has still to read.
    pub fn remaining(&self, name: &str) -> Result<usize> {
        let pos = self.cursor(name)?;
        Ok(self.remaining_from(&pos))
    }

    /// Checkpoint memory of what a cursor at `pos` has still to read (only
    /// its own checkpoint is walked; later ones count whole).
    fn remaining_bytes_from(&self, pos: &CursorPosition) -> usize {
        let idx = self.index_of(pos.checkpoint_id);
        self.checkpoints
            .iter()
            .skip(idx)
            .map(|ck| ck.bytes_after(pos.seqno))
            .sum()
    }

    fn remaining_from(&self, pos: &CursorPosition) -> usize {
        let idx = self.index_of(pos.checkpoint_id);
        self.checkpoints
            .iter()
            .skip(idx)
            .map(|ck| ck.live_after(pos.seqno))
            .sum()
    }

    /// Takes out of the open checkpoint the entries that every cursor has
    /// read (as Couchbase's checkpoint expelling does): the open checkpoint
    /// cannot be freed whole while it takes writes, and on a replica, which
    /// closes checkpoints only when its primary does, persisted entries in
    /// open checkpoints could otherwise hold the whole checkpoint memory
    /// limit. An expelled entry becomes a hole, as a de-duplicated one does,
    /// so positions, remaining counts and later de-duplication are
    /// unaffected; a cursor can no longer be registered before it
    /// ([`Registration::NeedsBackfill`]). Nothing is expelled while a cursor
    /// is still in an earlier checkpoint. Returns the items and bytes
    /// expelled. The items are dropped before it returns, under the caller's
    /// lock: at most one open checkpoint's worth, and mostly only reference
    /// counts (a record is usually still held by the hash table).
    pub fn expel_read_items(&mut self) -> (usize, usize) {
        let open_id = self.open().id;
        let read_upto = self
            .cursors
            .values()
            .map(|c| {
                if c.checkpoint_id < open_id {
                    0
                } else {
                    c.seqno
                }
            })
            .min()
            .unwrap_or(self.high_seqno);
        let open = self.open();
        let end = open.first_after(read_upto);
        if end <= open.expel_from {
            return (0, 0);
        }
        let Checkpoint {
            keys,
            slots,
            seqnos,
            expel_from,
            live,
            mem,
            ..
        } = self.open_mut();
        let (mut items, mut bytes, mut last) = (0, 0, 0);
        for (i, slot) in slots.iter_mut().enumerate().take(end).skip(*expel_from) {
            let Some(item) = slot.take() else {
                continue;
            };
            last = seqnos[i];
            if item.op.is_key_op() {
                let hash = key_hash(item.key());
                if let Ok(entry) = keys.find_entry(hash, |s| *s == i) {
                    entry.remove();
                }
            }
            items += 1;
            bytes += item.mem_size();
        }
        *expel_from = end;
        *live -= items;
        *mem -= bytes;
        self.expelled_upto = self.expelled_upto.max(last);
        self.charge(0, bytes);
        (items, bytes)
    }

    /// Detaches the oldest closed checkpoints that every cursor has left.
    pub fn remove_unreferenced(&mut self) -> FreedCheckpoints {
        let lowest_needed = self
            .cursors
            .values()
            .map(|c| c.checkpoint_id)
            .min()
            .unwrap_or(u64::MAX);
        let mut freed = FreedCheckpoints::default();
        while let Some(front) = self.checkpoints.front() {
            if front.open || front.id >= lowest_needed {
                break;
            }
            let (mem, id) = (front.mem, front.id);
            if let Some(ck) = self.checkpoints.pop_front() {
                freed.0.push(ck);
            }
            self.charge(0, mem);
            tracing::debug!(checkpoint_id = id, "checkpoint freed");
        }
        freed
    }

    /// Every checkpoint, oldest first.
    pub fn checkpoints(&self) -> Vec<CheckpointInfo> {
        self.checkpoints.iter().map(|c| c.info()).collect()
    }

    /// Every cursor, by name.
    pub fn cursors(&self) -> Vec<CursorInfo> {
        self.cursors
            .iter()
            .map(|(name, pos)| self.info_of(name, pos))
            .collect()
    }

    /// The cursor called `name`, if registered.
    pub fn cursor_info(&self, name: &str) -> Option<CursorInfo> {
        self.cursors.get(name).map(|pos| self.info_of(name, pos))
    }

    fn info_of(&self, name: &str, pos: &CursorPosition) -> CursorInfo {
        CursorInfo {
            name: name.to_owned(),
            checkpoint_id: pos.checkpoint_id,
            seqno: pos.seqno,
            remaining: self.remaining_from(pos),
            remaining_bytes: self.remaining_bytes_from(pos),
        }
    }
}

impl Drop for CheckpointManager {
    fn drop(&mut self) {
        self.shared_mem.fetch_sub(self.mem, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(any(loom, feature = "loom"))))]
mod tests {
    use super::*;
    use crate::item::ItemMeta;

    fn item(key: &str, seqno: u64) -> QueuedItem {
        let meta = ItemMeta {
            by_seqno: seqno,
            cas: seqno,
            rev_seqno: 1,
            flags: 0,
            expiry: 0,
        };
        QueuedItem::mutation(key.as_bytes(), b"v", meta)
    }

    /// An open checkpoint takes its memory at its first entry, not when it
    /// opens: a partition nobody writes to holds none. Before (found by a
    /// review), each took about 117 KiB at open, 117 MiB for 1,024 idle
    /// partitions, counted by no limit.
    #[test]
    fn an_open_checkpoint_is_sized_at_its_first_entry() {
        let config = CheckpointConfig {
            max_items: 2_000,
            max_bytes: usize::MAX,
        };
        let mut m = CheckpointManager::new(config, 1, 0, Arc::new(AtomicUsize::new(0)));
        let sized = |m: &CheckpointManager| {
            let o = m.open();
            (o.slots.capacity(), o.seqnos.capacity(), o.keys.capacity())
        };
        assert_eq!(sized(&m), (0, 0, 0), "opened");
        m.queue(item("a", 1));
        let (slots, seqnos, keys) = sized(&m);
        assert!(slots >= 2_000 && seqnos >= 2_000 && keys >= 2_000);
        // Filled to its limit without growing.
        for i in 2..=2_000 {
            m.queue(item(&format!("k{i}"), i));
        }
        assert_eq!(sized(&m), (slots, seqnos, keys));
        m.create_checkpoint();
        assert_eq!(sized(&m), (0, 0, 0), "the next one, still empty");
    }
}
