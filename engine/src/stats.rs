//! Figures reported by `Engine::stats()`.

use serde::Serialize;

use crate::checkpoint::{CheckpointInfo, CursorInfo};
use crate::item::PartitionId;
use crate::online_update::WindowInfo;
use crate::store::WindowRecord;

/// Engine-wide figures.
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// One entry per partition.
    pub partitions: Vec<PartitionStats>,
    /// Memory held by all checkpoints.
    pub checkpoint_mem_bytes: usize,
    /// Configured bound on checkpoint memory.
    pub checkpoint_mem_limit: usize,
    /// WAL syncs done for durable writes; concurrent `Persist` writers share them.
    pub syncs: u64,
    /// Synced writes and WAL syncs the store has completed, of any kind
    /// (the flusher's for durable writes, and its synced records:
    /// reservations, window records, failover logs).
    pub disk_syncs: u64,
    /// Why the engine is poisoned, if it is.
    pub poisoned: Option<String>,
    /// Whether the previous shutdown of the data directory was clean.
    pub recovered_from_crash: bool,
    /// Disk-snapshot entries a replica spilled to its staging column family
    /// because a snapshot outgrew `snapshot_buffer_limit` (since open).
    pub snapshot_staged_items: u64,
    /// Stream cursors dropped under checkpoint-memory pressure (since open;
    /// see `EngineConfig::cursor_drop_threshold`).
    pub cursors_dropped: u64,
    /// Persisted entries the flusher took out of open checkpoints under
    /// checkpoint-memory pressure, every cursor having read them (since
    /// open; see `CheckpointManager::expel_read_items`).
    pub items_expelled: u64,
    /// Hash-table entries the pager has looked at for values to evict.
    pub pager_scanned: u64,
    /// Each flusher thread's niceness as the OS reports it once the thread
    /// has applied `EngineConfig::flusher_nice`; `None` until then, or
    /// where the OS has no such figure.
    pub flusher_nice: Vec<Option<i32>>,
}

impl EngineStats {
    /// Items over all partitions.
    pub fn items(&self) -> usize {
        self.partitions.iter().map(|p| p.items).sum()
    }

    /// Entries (items, tombstones and online-update markers) the flusher
    /// has still to write, over all partitions: each persistence cursor's
    /// exact remaining count. (Not the span between the high and persisted
    /// seqnos: a replica's seqnos can have gaps, and one replica read a
    /// million "dirty" seqnos off a primary restarted after a crash, with
    /// nothing unpersisted.)
    pub fn dirty(&self) -> u64 {
        self.partitions
            .iter()
            .filter_map(|p| {
                p.cursors
                    .iter()
                    .find(|c| c.name == crate::partition::PERSISTENCE_CURSOR)
            })
            .map(|c| c.remaining as u64)
            .sum()
    }
}

/// Figures of one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStats {
    /// Partition number.
    pub partition: PartitionId,
    /// Keys in the hash table.
    pub items: usize,
    /// Key and value bytes in the hash table.
    pub mem_bytes: usize,
    /// Bytes held by the partition's checkpoints.
    pub checkpoint_mem_bytes: usize,
    /// Highest seqno handed out.
    pub high_seqno: u64,
    /// Highest seqno written to disk.
    pub persisted_seqno: u64,
    /// Id of the open checkpoint.
    pub open_checkpoint_id: u64,
    /// Checkpoints, oldest first.
    #[serde(skip)]
    pub checkpoints: Vec<CheckpointInfo>,
    /// Cursors, by name.
    #[serde(skip)]
    pub cursors: Vec<CursorInfo>,
    /// Successful flushes that wrote something for this partition.
    pub flushes: u64,
    /// Items written by those flushes.
    pub flushed_items: u64,
    /// Failed background flush rounds (retried) of the flusher thread that
    /// owns this partition: a round covers every partition of its thread,
    /// so a failure counts on each of them, written in that round or not.
    /// A failure of the last drain at close, or of
    /// [`Engine::run_flush_round`](crate::Engine::run_flush_round), is
    /// returned to its caller, not counted.
    pub flush_failures: u64,
    /// Total time spent in successful flushes, microseconds.
    pub flush_micros_total: u64,
    /// Duration of the last successful flush, microseconds.
    pub last_flush_micros: u64,
    /// Items whose value is evicted (on disk only); the rest are resident.
    pub evicted_items: usize,
    /// Value bytes of those items: on disk, not in memory (`mem_bytes`
    /// counts the resident ones).
    pub evicted_bytes: usize,
    /// Reads that fetched an evicted value back from disk.
    pub bg_fetches: u64,
    /// Values evicted so far (pager and explicit).
    pub evictions: u64,
    /// Times this replica emptied the partition to resynchronise it from
    /// its primary (since the engine opened).
    pub resets: u64,
    /// Expired items the expiry pass deleted (since the engine opened).
    pub expired: u64,
    /// The open online-update window, if any.
    pub window: Option<WindowInfo>,
    /// Online-update windows lost to a crash or close (found at open).
    pub lost_windows: Vec<WindowRecord>,
}
