//! One partition (vbucket): its hash table, its checkpoint manager, its seqno
//! and CAS clocks, and its persistence progress.
//!
//! Owns the write path of a key: validation against the current value, seqno
//! and CAS assignment, the hash-table update and the checkpoint entry happen
//! under the partition's writer lock, so the checkpoint order is the order of
//! effects. Readers only take a hash-table shard lock. This module does no
//! disk I/O except synchronous number reservations.

use bytes::Bytes;

use crate::checkpoint::{CheckpointConfig, CheckpointManager};
use crate::error::{Error, Result};
use crate::hash_table::{HashTable, StoredValue};
use crate::item::{
    now_secs, Item, ItemMeta, MutationResult, PartitionId, QueueOp, QueuedItem, WriteOptions,
};
use crate::store::{Reservation, Store};
use crate::sync::{Arc, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering};

/// Name of the cursor the flusher drains; reserved.
pub const PERSISTENCE_CURSOR: &str = "persistence";

/// Hybrid logical clock for CAS: milliseconds since the epoch in the high 48
/// bits, a counter in the low 16; never goes backwards.
#[derive(Debug)]
struct CasClock {
    last: u64,
}

impl CasClock {
    fn next(&mut self) -> u64 {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let candidate = ms << 16;
        self.last = if candidate > self.last {
            candidate
        } else {
            self.last + 1
        };
        self.last
    }
}

/// The kinds of key mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MutationKind {
    Set,
    Add,
    Replace,
    Delete,
}

/// State changed only under the partition's writer lock.
pub(crate) struct PartitionWriter {
    pub(crate) checkpoints: CheckpointManager,
    cas: CasClock,
    reservation: Reservation,
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
}

/// Where a partition starts after warmup.
pub(crate) struct PartitionStart {
    pub(crate) high_seqno: u64,
    pub(crate) checkpoint_id: u64,
    pub(crate) max_cas: u64,
}

pub(crate) struct Partition {
    pub(crate) id: PartitionId,
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
    ) -> Self {
        let mut checkpoints =
            CheckpointManager::new(config, start.checkpoint_id, start.high_seqno, shared_mem);
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
            table: HashTable::new(),
            writer: Mutex::new(PartitionWriter {
                checkpoints,
                cas: CasClock {
                    last: start.max_cas,
                },
                reservation,
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

    /// Reads a key; expired items read as absent.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Item> {
        match self.table.get(key) {
            Some((key, v)) if !is_expired(&v.meta) => Ok(Item {
                partition: self.id,
                key,
                value: v.value,
                meta: v.meta,
            }),
            _ => Err(Error::NotFound),
        }
    }

    /// Makes sure the seqno `seqno` and one more checkpoint id than the open
    /// one are covered by the durable reservation.
    fn ensure_reserved(&self, w: &mut PartitionWriter, store: &Store, seqno: u64) -> Result<()> {
        let next_ckpt = w.checkpoints.open_checkpoint_id() + 1;
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
    /// table and queues the change, all under the writer lock.
    pub(crate) fn mutate(
        &self,
        store: &Store,
        kind: MutationKind,
        key: Bytes,
        value: Bytes,
        opts: &WriteOptions,
        admit: impl FnOnce() -> Result<()>,
    ) -> Result<MutationResult> {
        let mut w = self.writer.lock();
        let seqno = w.checkpoints.high_seqno() + 1;
        self.ensure_reserved(&mut w, store, seqno)?;
        let mut slot = self.table.slot(&key);
        let current = slot
            .current(&key)
            .filter(|v| !is_expired(&v.meta))
            .map(|v| v.meta);
        match (kind, current) {
            (MutationKind::Add, Some(_)) => return Err(Error::Exists),
            (MutationKind::Replace | MutationKind::Delete, None) => return Err(Error::NotFound),
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
        admit()?;
        let deleting = kind == MutationKind::Delete;
        let meta = ItemMeta {
            by_seqno: seqno,
            cas: w.cas.next(),
            rev_seqno: current.map_or(1, |m| m.rev_seqno + 1),
            flags: if deleting { 0 } else { opts.flags },
            expiry: if deleting { 0 } else { opts.expiry },
        };
        let op = if deleting {
            QueueOp::Deletion
        } else {
            QueueOp::Mutation
        };
        if deleting {
            slot.remove(&key);
        } else {
            slot.put(
                &key,
                StoredValue {
                    value: value.clone(),
                    meta,
                },
            );
        }
        drop(slot);
        w.checkpoints.queue(QueuedItem {
            op,
            key,
            value: if op == QueueOp::Deletion {
                Bytes::new()
            } else {
                value
            },
            meta,
        });
        Ok(MutationResult {
            partition: self.id,
            seqno,
            cas: meta.cas,
        })
    }

    /// Closes the open checkpoint on demand; returns the new open id.
    pub(crate) fn create_checkpoint(&self, store: &Store) -> Result<u64> {
        let mut w = self.writer.lock();
        let high = w.checkpoints.high_seqno();
        self.ensure_reserved(&mut w, store, high)?;
        Ok(w.checkpoints.create_checkpoint())
    }
}

fn is_expired(meta: &ItemMeta) -> bool {
    meta.expiry != 0 && meta.is_expired(now_secs())
}

/// The partition a key belongs to: CRC-32 of the key modulo the partition
/// count (stable across versions and platforms, as data placement depends on it).
pub fn partition_of(key: &[u8], partitions: u16) -> PartitionId {
    (crc32fast::hash(key) % u32::from(partitions.max(1))) as PartitionId
}
