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

/// An item returned by a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The partition holding the key.
    pub partition: PartitionId,
    /// The key.
    pub key: Bytes,
    /// The value (zero-copy: shares the buffer the engine holds).
    pub value: Bytes,
    /// Metadata.
    pub meta: ItemMeta,
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
    /// Return once a majority of the connected replicas acknowledged the
    /// write (needs a node: see `Engine::set_replication_gate`). On timeout the
    /// call fails with `Error::Timeout`; the write itself stays applied.
    Replicate,
}

/// Options of a mutating call.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// If set, the write only happens when the item's current CAS equals this.
    pub cas: Option<u64>,
    /// Client flags stored with the value (ignored by `delete`).
    pub flags: u32,
    /// Absolute expiry in seconds since the epoch, 0 = never (ignored by `delete`).
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

    /// These options with an expected CAS.
    pub fn with_cas(mut self, cas: u64) -> Self {
        self.cas = Some(cas);
        self
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

/// An entry of a checkpoint: a mutation, a deletion or a marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedItem {
    /// What the entry is.
    pub op: QueueOp,
    /// The key (empty for markers).
    pub key: Bytes,
    /// The value (empty for deletions and markers).
    pub value: Bytes,
    /// Metadata; `meta.by_seqno` orders entries.
    pub meta: ItemMeta,
}

/// Fixed bookkeeping cost charged per queued item, on top of key and value.
pub(crate) const QUEUED_ITEM_OVERHEAD: usize = 96;

impl QueuedItem {
    /// The seqno of this entry.
    pub fn seqno(&self) -> u64 {
        self.meta.by_seqno
    }

    /// Bytes this entry is charged against checkpoint memory.
    pub fn mem_size(&self) -> usize {
        self.key.len() + self.value.len() + QUEUED_ITEM_OVERHEAD
    }
}

/// Seconds since the Unix epoch, saturating into `u32`.
pub(crate) fn now_secs() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}
