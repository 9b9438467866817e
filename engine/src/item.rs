//! Items as callers see them, and items as checkpoints queue them.
//!
//! This module only defines data; it owns no locks and does no I/O.

use bytes::Bytes;

/// Partition (vbucket) number.
pub type PartitionId = u16;

/// Metadata every stored or queued item carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ItemMeta {
    /// Position in the partition's history: strictly increasing, never reused.
    pub by_seqno: u64,
    /// Compare-and-swap token: monotonic per partition (hybrid logical clock).
    pub cas: u64,
    /// Revision of the key: 1 on creation, +1 on every later mutation.
    pub rev_seqno: u64,
    /// Opaque client flags.
    pub flags: u32,
    /// Absolute expiry time in seconds since the Unix epoch; 0 = never.
    pub expiry: u32,
}

impl ItemMeta {
    /// Whether the item has expired at `now_secs` (seconds since the epoch).
    pub fn is_expired(&self, now_secs: u32) -> bool {
        self.expiry != 0 && self.expiry <= now_secs
    }
}

/// An item returned by a read: metadata and one shared, immutable buffer
/// holding key and value (zero-copy: the engine's own record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The partition holding the key.
    pub partition: PartitionId,
    /// Metadata.
    pub meta: ItemMeta,
    record: Record,
}

impl Item {
    pub(crate) fn new(partition: PartitionId, record: Record) -> Self {
        Item {
            partition,
            meta: record.meta(),
            record,
        }
    }

    /// The key.
    pub fn key(&self) -> &[u8] {
        self.record.key()
    }

    /// The value.
    pub fn value(&self) -> &[u8] {
        self.record.value()
    }

    /// The value as `Bytes` sharing the engine's buffer (no copy; one small
    /// allocation for the handle).
    pub fn value_bytes(&self) -> Bytes {
        self.record.value_bytes()
    }
}

/// How durable a write must be before the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Return once the write is in memory (it reaches disk shortly after,
    /// through the flusher). The default and the fastest.
    #[default]
    Memory,
    /// Return once the write is on disk and synced. Concurrent `Persist`
    /// writers share one sync (group commit).
    Persist,
    /// Return once the write is on this node's disk and synced, as with
    /// `Persist`, *and* a majority of the replicas acknowledged it (a node
    /// counts the larger of its connected streams and its `min_replicas`,
    /// default 1; needs a node: see `Engine::set_replication_gate`). The
    /// primary's own copy matters: a primary that restarts after a crash
    /// rolls its replicas back to what it has on disk. On timeout the call
    /// fails with `Error::Timeout`; the write itself stays applied.
    Replicate,
}

impl Durability {
    /// Whether the write must be on this node's disk before it returns
    /// (`Persist` and `Replicate`).
    pub fn needs_disk(self) -> bool {
        matches!(self, Durability::Persist | Durability::Replicate)
    }
}

/// Options of a mutating call.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// If set, the write only happens when the item's current CAS equals this.
    pub cas: Option<u64>,
    /// Client flags stored with the value (ignored by `delete`).
    pub flags: u32,
    /// Absolute expiry in seconds since the epoch, 0 = never (ignored by
    /// `delete`). A value up to [`RELATIVE_EXPIRY_MAX`] (a time in January
    /// 1970, what memcached reads as relative) is refused as
    /// `InvalidArgument`: for a time to live, use
    /// [`with_ttl`](Self::with_ttl).
    pub expiry: u32,
    /// Durability level.
    pub durability: Durability,
}

impl WriteOptions {
    /// Default options with the given durability.
    pub fn durable(durability: Durability) -> Self {
        WriteOptions {
            durability,
            ..Default::default()
        }
    }

    /// These options with an expected CAS; 0 is no check, as on the wire
    /// (no item has CAS 0: before, `with_cas(0)` was a check no write could
    /// pass).
    pub fn with_cas(mut self, cas: u64) -> Self {
        self.cas = (cas != 0).then_some(cas);
        self
    }

    /// These options with an expiry `secs` seconds from now (0: never),
    /// whatever its length.
    pub fn with_ttl(mut self, secs: u32) -> Self {
        self.expiry = match secs {
            0 => 0,
            s => now_secs().saturating_add(s),
        };
        self
    }
}

/// Longest expiry memcached reads as relative to now (30 days, in seconds);
/// a larger one is an absolute Unix time.
pub const RELATIVE_EXPIRY_MAX: u32 = 30 * 24 * 3600;

/// A memcached expiry as the engine's absolute time: 0 never expires, up to
/// [`RELATIVE_EXPIRY_MAX`] seconds is relative to `now`, more is already
/// absolute.
pub fn absolute_expiry(expiry: u32, now: u32) -> u32 {
    match expiry {
        0 => 0,
        e if e <= RELATIVE_EXPIRY_MAX => now.saturating_add(e),
        e => e,
    }
}

/// What a successful mutation produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MutationResult {
    /// Partition the key belongs to.
    pub partition: PartitionId,
    /// Seqno assigned to the mutation.
    pub seqno: u64,
    /// The item's new CAS.
    pub cas: u64,
}

/// The kind of an entry in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOp {
    /// A key was set (created or updated).
    Mutation,
    /// A key was deleted.
    Deletion,
    /// An online-update window opened; carries the window's checkpoint id.
    OnlineUpdateStart {
        /// Id of the checkpoint the window began with.
        checkpoint_id: u64,
    },
    /// An online-update window completed; carries the window's checkpoint id.
    OnlineUpdateEnd {
        /// Id of the checkpoint the window began with.
        checkpoint_id: u64,
    },
    /// An online-update window was reverted; carries the window's checkpoint id.
    OnlineUpdateRevert {
        /// Id of the checkpoint the window began with.
        checkpoint_id: u64,
    },
}

impl QueueOp {
    /// Whether this entry is a data change of a key (as opposed to a marker).
    pub fn is_key_op(&self) -> bool {
        matches!(self, QueueOp::Mutation | QueueOp::Deletion)
    }
}

/// An entry of a checkpoint: a mutation, a deletion or a marker. Cheap to
/// clone: the key, value and metadata live in one shared record (the same
/// one the hash table holds for a mutation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedItem {
    /// What the entry is.
    pub op: QueueOp,
    record: Record,
}

/// Fixed bookkeeping cost charged per queued item, on top of key and value.
pub(crate) const QUEUED_ITEM_OVERHEAD: usize = 64;

impl QueuedItem {
    /// An entry of kind `op` (key and value are copied into one record).
    pub fn new(op: QueueOp, key: &[u8], value: &[u8], meta: ItemMeta) -> Self {
        QueuedItem {
            op,
            record: Record::new(&meta, key, value),
        }
    }

    /// A mutation of `key` to `value`.
    pub fn mutation(key: &[u8], value: &[u8], meta: ItemMeta) -> Self {
        QueuedItem {
            op: QueueOp::Mutation,
            record: Record::new(&meta, key, value),
        }
    }

    /// A deletion of `key`.
    pub fn deletion(key: &[u8], meta: ItemMeta) -> Self {
        QueuedItem {
            op: QueueOp::Deletion,
            record: Record::new(&meta, key, &[]),
        }
    }

    /// A marker (`op` is not a key operation): no key, no value.
    pub fn marker(op: QueueOp, meta: ItemMeta) -> Self {
        QueuedItem {
            op,
            record: Record::new(&meta, &[], &[]),
        }
    }

    /// An entry around an existing record.
    pub(crate) fn from_record(op: QueueOp, record: Record) -> Self {
        QueuedItem { op, record }
    }

    /// The record (key, value, metadata).
    pub(crate) fn record(&self) -> &Record {
        &self.record
    }

    /// The key (empty for markers).
    pub fn key(&self) -> &[u8] {
        self.record.key()
    }

    /// The value (empty for deletions and markers).
    pub fn value(&self) -> &[u8] {
        self.record.value()
    }

    /// The value as `Bytes` sharing the record (no copy).
    pub fn value_bytes(&self) -> Bytes {
        self.record.value_bytes()
    }

    /// Metadata; `meta().by_seqno` orders entries.
    pub fn meta(&self) -> ItemMeta {
        self.record.meta()
    }

    /// The seqno of this entry.
    pub fn seqno(&self) -> u64 {
        self.record.by_seqno()
    }

    /// Bytes this entry is charged against checkpoint memory.
    pub fn mem_size(&self) -> usize {
        self.record.key().len() + self.record.value().len() + QUEUED_ITEM_OVERHEAD
    }
}

// Record header layout (little endian): by_seqno u64, cas u64, rev_seqno u64,
// flags u32, expiry u32, key length u32, value length u32 (the logical
// length, also when the value is evicted), state u8.
const H_SEQNO: usize = 0;
const H_CAS: usize = 8;
const H_REV: usize = 16;
const H_FLAGS: usize = 24;
const H_EXPIRY: usize = 28;
const H_KEY_LEN: usize = 32;
const H_VALUE_LEN: usize = 36;
const H_STATE: usize = 40;
const HEADER: usize = 41;
const STATE_EVICTED: u8 = 1;

/// One version of a key: metadata, key and (unless evicted) value in a single
/// immutable, reference-counted allocation. The hash table and the
/// checkpoints share it, so a write allocates once. (`std::sync::Arc` like
/// `Bytes`' own counts: a data handle, not a synchronisation primitive, so
/// it is not routed through `sync`.)
#[derive(Clone)]
pub(crate) struct Record(std::sync::Arc<[u8]>);

impl Record {
    /// Asks the CPU to start loading the record's first cache lines (at
    /// most three: the header, the key and a short value) without
    /// waiting for them. A hint only: a no-op off x86-64, and prefetching
    /// never faults.
    #[inline]
    pub(crate) fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p = self.0.as_ptr().cast::<i8>();
            let len = self.0.len();
            let mut off = 0;
            while off < len.min(192) {
                // SAFETY: a prefetch reads nothing the program sees and
                // never faults; SSE, which it needs, is part of x86-64. The
                // address is inside the record's allocation (`off < len`).
                #[allow(unsafe_code)]
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off))
                };
                off += 64;
            }
        }
    }

    /// A resident record.
    pub(crate) fn new(meta: &ItemMeta, key: &[u8], value: &[u8]) -> Self {
        Self::build(meta, key, Some(value), value.len())
    }

    fn build(meta: &ItemMeta, key: &[u8], value: Option<&[u8]>, value_len: usize) -> Self {
        let mut h = [0u8; HEADER];
        h[H_SEQNO..H_SEQNO + 8].copy_from_slice(&meta.by_seqno.to_le_bytes());
        h[H_CAS..H_CAS + 8].copy_from_slice(&meta.cas.to_le_bytes());
        h[H_REV..H_REV + 8].copy_from_slice(&meta.rev_seqno.to_le_bytes());
        h[H_FLAGS..H_FLAGS + 4].copy_from_slice(&meta.flags.to_le_bytes());
        h[H_EXPIRY..H_EXPIRY + 4].copy_from_slice(&meta.expiry.to_le_bytes());
        // Keys are at most 65,535 bytes and values at most the configured
        // maximum (below 4 GiB, checked by the builder).
        h[H_KEY_LEN..H_KEY_LEN + 4].copy_from_slice(&(key.len() as u32).to_le_bytes());
        h[H_VALUE_LEN..H_VALUE_LEN + 4].copy_from_slice(&(value_len as u32).to_le_bytes());
        h[H_STATE] = if value.is_some() { 0 } else { STATE_EVICTED };
        let value = value.unwrap_or(&[]);
        let (k, len) = (HEADER + key.len(), HEADER + key.len() + value.len());
        // One allocation of the exact size, written once: header, key and
        // value copied into uninitialised memory. (A zeroed buffer, as
        // before, cost a `memset` of the record on every write: about a
        // tenth of a replica's decode, the `receiver` benchmark.)
        let mut arc = std::sync::Arc::<[u8]>::new_uninit_slice(len);
        let Some(buf) = std::sync::Arc::get_mut(&mut arc) else {
            unreachable!("a new Arc is unique")
        };
        let dst = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `dst` points at the `len` bytes this new, unique `Arc`
        // owns; the three copies write `HEADER`, `key.len()` and
        // `value.len()` bytes at offsets 0, `HEADER` and `k`, which are
        // disjoint, in bounds (`len` is their sum) and from sources that
        // cannot overlap a fresh allocation. Every byte is then
        // initialised, so `assume_init` is sound.
        #[allow(unsafe_code)]
        let arc = unsafe {
            std::ptr::copy_nonoverlapping(h.as_ptr(), dst, HEADER);
            std::ptr::copy_nonoverlapping(key.as_ptr(), dst.add(HEADER), key.len());
            std::ptr::copy_nonoverlapping(value.as_ptr(), dst.add(k), value.len());
            arc.assume_init()
        };
        Record(arc)
    }

    /// A record of `key` whose value (of `value_len` bytes) is on disk only.
    pub(crate) fn new_evicted(meta: &ItemMeta, key: &[u8], value_len: usize) -> Self {
        Self::build(meta, key, None, value_len)
    }

    /// Whether evicting this record frees anything: a resident value that
    /// is not empty (evicting an empty one frees nothing, and reading it
    /// back would cost a disk fetch).
    pub(crate) fn has_value_to_evict(&self) -> bool {
        !self.is_evicted() && self.value_len() > 0
    }

    /// This record as an online-update window keeps it and a revert puts it
    /// back: without its value if that is on disk (at or below
    /// `clean_upto`) and worth evicting, else as it is.
    pub(crate) fn without_clean_value(&self, clean_upto: u64) -> Self {
        if self.by_seqno() <= clean_upto && self.has_value_to_evict() {
            self.evicted()
        } else {
            self.clone()
        }
    }

    /// A copy with the same metadata and key and no resident value.
    pub(crate) fn evicted(&self) -> Self {
        if self.is_evicted() {
            return self.clone();
        }
        Self::new_evicted(&self.meta(), self.key(), self.value_len())
    }

    /// A copy of this (evicted) record holding `value` again.
    pub(crate) fn with_value(&self, value: &[u8]) -> Self {
        Self::new(&self.meta(), self.key(), value)
    }

    fn u64_at(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }

    fn u32_at(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_le_bytes(b)
    }

    pub(crate) fn by_seqno(&self) -> u64 {
        self.u64_at(H_SEQNO)
    }

    pub(crate) fn meta(&self) -> ItemMeta {
        ItemMeta {
            by_seqno: self.u64_at(H_SEQNO),
            cas: self.u64_at(H_CAS),
            rev_seqno: self.u64_at(H_REV),
            flags: self.u32_at(H_FLAGS),
            expiry: self.u32_at(H_EXPIRY),
        }
    }

    fn key_len(&self) -> usize {
        self.u32_at(H_KEY_LEN) as usize
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.0[HEADER..HEADER + self.key_len()]
    }

    /// The value; empty when evicted.
    pub(crate) fn value(&self) -> &[u8] {
        &self.0[HEADER + self.key_len()..]
    }

    /// The value's length, also when evicted.
    pub(crate) fn value_len(&self) -> usize {
        self.u32_at(H_VALUE_LEN) as usize
    }

    pub(crate) fn is_evicted(&self) -> bool {
        self.0[H_STATE] & STATE_EVICTED != 0
    }

    /// Key bytes plus resident value bytes.
    pub(crate) fn resident_bytes(&self) -> usize {
        self.0.len() - HEADER
    }

    /// Whether `other` is this very allocation.
    pub(crate) fn same(&self, other: &Record) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }

    /// The value as `Bytes` sharing this record.
    pub(crate) fn value_bytes(&self) -> Bytes {
        Bytes::from_owner(ValueOf(self.clone()))
    }
}

/// The value range of a record, as a `Bytes` owner.
struct ValueOf(Record);

impl AsRef<[u8]> for ValueOf {
    fn as_ref(&self) -> &[u8] {
        self.0.value()
    }
}

impl PartialEq for Record {
    fn eq(&self, other: &Self) -> bool {
        self.same(other) || self.0[..] == other.0[..]
    }
}

impl Eq for Record {}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("value_len", &self.value_len())
            .field("evicted", &self.is_evicted())
            .field("meta", &self.meta())
            .finish()
    }
}

/// The one hash of a key in the engine: the hash table's and the open
/// checkpoint's de-duplication index's, so a write hashes its key once.
const KEY_HASHER: foldhash::fast::FixedState =
    foldhash::fast::FixedState::with_seed(0x0074_6170_6b76);

/// The hash of `key` (held in memory only, never persisted: it may change
/// between versions).
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    KEY_HASHER.hash_one(key)
}

/// Seconds since the Unix epoch, saturating into `u32`.
pub(crate) fn now_secs() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_holds_meta_key_and_value_and_evicts_to_a_key_only_copy() {
        let meta = ItemMeta {
            by_seqno: u64::MAX - 1,
            cas: 0x0123_4567_89ab_cdef,
            rev_seqno: 7,
            flags: u32::MAX,
            expiry: 1_700_000_000,
        };
        let value = vec![b'x'; 5000];
        let r = Record::new(&meta, b"some-key", &value);
        assert_eq!(
            (r.meta(), r.key(), r.value(), r.value_len()),
            (meta, &b"some-key"[..], &value[..], 5000)
        );
        assert!(!r.is_evicted());
        assert_eq!(r.resident_bytes(), 8 + 5000);
        let bytes = r.value_bytes();
        assert_eq!(
            bytes.as_ptr(),
            r.value().as_ptr(),
            "value_bytes does not copy"
        );

        let e = r.evicted();
        assert!(e.is_evicted() && !e.same(&r));
        assert_eq!(
            (e.meta(), e.key(), e.value(), e.value_len()),
            (meta, &b"some-key"[..], &[][..], 5000)
        );
        assert_eq!(e.resident_bytes(), 8);
        assert!(e.evicted().same(&e), "evicting an evicted record is free");
        let back = e.with_value(&value);
        assert_eq!(back, r);
        assert!(!back.same(&r));

        let q = QueuedItem::deletion(b"k", meta);
        assert_eq!(
            (q.op, q.key(), q.value(), q.seqno()),
            (QueueOp::Deletion, &b"k"[..], &[][..], meta.by_seqno)
        );
    }
}
