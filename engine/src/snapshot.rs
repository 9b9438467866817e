//! A replica's buffer for a disk snapshot (a backfill from its primary).
//!
//! A primary streams a disk snapshot straight from its RocksDB iterator, so
//! the entries arrive in key order; a replica must apply them in seqno order,
//! so that it never persists a seqno while a lower one of the snapshot is
//! missing (a replica resumes its stream from its persisted seqno). The
//! buffer holds the
//! snapshot's entries until its end; past
//! [`EngineConfig::snapshot_buffer_limit`](crate::EngineConfig::snapshot_buffer_limit)
//! bytes it spills them to the store's `staging` column family, keyed by
//! seqno, and applies them from there. Memory stays bounded whatever the
//! partition's size.

use crate::engine::{Engine, Shared};
use crate::error::{Error, Result};
use crate::item::{PartitionId, QueuedItem};
use crate::sync::Ordering;

/// One partition's disk snapshot as it arrives; see the module docs.
/// Dropping it without [`SnapshotBuffer::apply`] discards what it holds.
pub struct SnapshotBuffer<'e> {
    engine: &'e Engine,
    partition: PartitionId,
    items: Vec<QueuedItem>,
    bytes: usize,
    /// `snapshot_buffer_limit`, read once.
    limit: usize,
    staged: u64,
}

impl Engine {
    /// A new, empty buffer for a disk snapshot of partition `p` (anything
    /// staged earlier for `p` is discarded). One per partition at a time:
    /// while one is open, another is refused with `WrongState` (their
    /// spilled entries would share the staging column family's keys, and
    /// each would clear or apply the other's; before, a second one wiped
    /// the first's spilled entries and the first still applied as whole;
    /// found by a review).
    pub fn snapshot_buffer(&self, p: PartitionId) -> Result<SnapshotBuffer<'_>> {
        let s = self.live()?;
        s.partition(p)?;
        let open = &s.snapshot_open[usize::from(p)];
        if open.swap(true, Ordering::AcqRel) {
            return Err(Error::WrongState(format!(
                "a snapshot buffer of partition {p} is open already"
            )));
        }
        if let Err(e) = clear_staged(s, p) {
            open.store(false, Ordering::Release);
            return Err(e);
        }
        Ok(SnapshotBuffer {
            engine: self,
            partition: p,
            items: Vec::new(),
            bytes: 0,
            limit: s.config.snapshot_buffer_limit,
            staged: 0,
        })
    }
}

/// Clears what partition `p` may have in the staging column family (a
/// range delete only if it was used since it was last cleared).
fn clear_staged(s: &Shared, p: PartitionId) -> Result<()> {
    let flag = &s.staged[usize::from(p)];
    if flag.load(Ordering::Acquire) {
        s.store.clear_staged(Some(p))?;
        flag.store(false, Ordering::Release);
    }
    Ok(())
}

impl SnapshotBuffer<'_> {
    /// The partition the snapshot is of.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// Bytes held in memory (keys, values and per-entry bookkeeping).
    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    /// Entries spilled to disk so far.
    pub fn staged_items(&self) -> u64 {
        self.staged
    }

    /// Adds an entry; spills everything held to disk once the memory limit
    /// is passed.
    pub fn push(&mut self, item: QueuedItem) -> Result<()> {
        self.bytes += item.mem_size();
        self.items.push(item);
        if self.bytes > self.limit {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<()> {
        if self.items.is_empty() {
            return Ok(());
        }
        let s = self.engine.live()?;
        s.staged[usize::from(self.partition)].store(true, Ordering::Release);
        s.store.stage_snapshot(self.partition, &self.items)?;
        let n = self.items.len() as u64;
        self.staged += n;
        s.snapshot_staged_items.fetch_add(n, Ordering::Relaxed);
        tracing::debug!(
            partition = self.partition,
            items = n,
            bytes = self.bytes,
            "disk snapshot spilled to the staging column family"
        );
        // Drop the records; keep the vector's capacity for the next part.
        self.items.clear();
        self.bytes = 0;
        Ok(())
    }

    /// Calls `f` with every entry in seqno order until it returns `false`,
    /// then discards the snapshot. Returns whether `f` saw every entry.
    pub fn apply(mut self, mut f: impl FnMut(&QueuedItem) -> Result<bool>) -> Result<bool> {
        if self.staged == 0 {
            self.items.sort_unstable_by_key(QueuedItem::seqno);
            for item in &self.items {
                if !f(item)? {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        self.spill()?;
        let s = self.engine.live()?;
        s.store.for_each_staged(self.partition, |item| f(&item))
    }
}

impl Drop for SnapshotBuffer<'_> {
    fn drop(&mut self) {
        let Ok(s) = self.engine.live() else {
            return;
        };
        if self.staged > 0 {
            if let Err(e) = clear_staged(s, self.partition) {
                // Harmless: the next buffer of this partition, or the next
                // open, clears it.
                tracing::warn!(partition = self.partition, error = %e, "could not clear a staged snapshot");
            }
        }
        s.snapshot_open[usize::from(self.partition)].store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::{ItemMeta, QueueOp};

    fn entry(seqno: u64, deleted: bool) -> QueuedItem {
        let key = format!("key-{:05}", (seqno * 7919) % 10_007);
        let meta = ItemMeta {
            by_seqno: seqno,
            cas: 1_000 + seqno,
            rev_seqno: seqno % 3,
            flags: 7,
            expiry: 0,
        };
        if deleted {
            QueuedItem::deletion(key.as_bytes(), meta)
        } else {
            QueuedItem::mutation(key.as_bytes(), format!("value-{seqno}").as_bytes(), meta)
        }
    }

    /// Seqnos 1..=n in a scrambled (key-like) order.
    fn scrambled(n: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (1..=n).collect();
        v.sort_by_key(|s| (s * 7919) % 10_007);
        v
    }

    fn collect(buf: SnapshotBuffer<'_>) -> Vec<QueuedItem> {
        let mut out = Vec::new();
        assert!(buf
            .apply(|i| {
                out.push(i.clone());
                Ok(true)
            })
            .unwrap());
        out
    }

    fn check_in_order(out: &[QueuedItem], n: u64) {
        assert_eq!(out.len() as u64, n);
        for (i, item) in out.iter().enumerate() {
            let want = entry(i as u64 + 1, (i as u64 + 1) % 5 == 0);
            assert_eq!(item.seqno(), want.seqno());
            assert_eq!(item.key(), want.key());
            assert_eq!(item.value(), want.value());
            assert_eq!(item.meta(), want.meta());
            assert_eq!(item.op, want.op);
        }
    }

    #[test]
    fn a_format_2_directory_gains_the_staging_family_and_becomes_format_3() {
        use crate::store::{EngineMeta, FORMAT_VERSION};
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::builder(dir.path()).open().unwrap();
        e.set(b"kept", "v", crate::WriteOptions::default()).unwrap();
        let store = &e.live().unwrap().store;
        store
            .put_engine_meta(&EngineMeta {
                format: 2,
                partitions: 16,
                replica: None,
                primary_data: false,
                branch_pending: false,
            })
            .unwrap();
        e.close().unwrap();
        let e = Engine::builder(dir.path()).open().unwrap();
        assert_eq!(e.get(b"kept").unwrap().value(), b"v");
        let meta = e.live().unwrap().store.engine_meta().unwrap().unwrap();
        assert_eq!(meta.format, FORMAT_VERSION);
        assert_eq!(FORMAT_VERSION, 3);
        e.close().unwrap();
        // Format 1 is still refused.
        {
            let e = Engine::builder(dir.path()).open().unwrap();
            e.live()
                .unwrap()
                .store
                .put_engine_meta(&EngineMeta {
                    format: 1,
                    partitions: 16,
                    replica: None,
                    primary_data: false,
                    branch_pending: false,
                })
                .unwrap();
            e.close().unwrap();
        }
        assert!(matches!(
            Engine::builder(dir.path()).open(),
            Err(crate::Error::Incompatible { .. })
        ));
    }

    #[test]
    fn a_small_snapshot_stays_in_memory_and_comes_out_in_seqno_order() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::builder(dir.path()).open().unwrap();
        let mut buf = e.snapshot_buffer(3).unwrap();
        for s in scrambled(500) {
            buf.push(entry(s, s % 5 == 0)).unwrap();
        }
        assert_eq!(buf.staged_items(), 0);
        assert!(buf.buffered_bytes() > 0);
        check_in_order(&collect(buf), 500);
        assert_eq!(e.stats().unwrap().snapshot_staged_items, 0);
    }

    #[test]
    fn a_large_snapshot_spills_to_disk_and_memory_stays_under_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 8 << 10;
        let e = Engine::builder(dir.path())
            .snapshot_buffer_limit(limit)
            .open()
            .unwrap();
        let mut buf = e.snapshot_buffer(3).unwrap();
        let mut largest = 0;
        for s in scrambled(5_000) {
            buf.push(entry(s, s % 5 == 0)).unwrap();
            assert!(
                buf.buffered_bytes() <= limit,
                "{} held",
                buf.buffered_bytes()
            );
            largest = largest.max(buf.buffered_bytes());
        }
        assert!(largest > limit / 2);
        assert!(buf.staged_items() > 4_000, "{}", buf.staged_items());
        let out = collect(buf);
        check_in_order(&out, 5_000);
        assert!(out
            .iter()
            .all(|i| i.op != QueueOp::Mutation || !i.value().is_empty()));
        let s = e.live().unwrap();
        assert_eq!(s.store.staged_len().unwrap(), 0, "applied snapshot cleared");
        assert_eq!(e.stats().unwrap().snapshot_staged_items, 5_000);
    }

    #[test]
    fn an_abandoned_snapshot_is_cleared_and_never_mixes_with_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::builder(dir.path())
            .snapshot_buffer_limit(1024)
            .open()
            .unwrap();
        let mut first = e.snapshot_buffer(1).unwrap();
        for s in 1..=300 {
            first.push(entry(s, false)).unwrap();
        }
        assert!(first.staged_items() > 0);
        // A stream that breaks mid-snapshot drops its buffer.
        drop(first);
        assert_eq!(e.live().unwrap().store.staged_len().unwrap(), 0);

        // Stopped early: the caller sees `false`, and the rest is cleared.
        let mut second = e.snapshot_buffer(1).unwrap();
        for s in scrambled(400) {
            second.push(entry(s, s % 5 == 0)).unwrap();
        }
        let mut seen = 0;
        assert!(!second
            .apply(|_| {
                seen += 1;
                Ok(seen < 10)
            })
            .unwrap());
        assert_eq!(seen, 10);
        assert_eq!(e.live().unwrap().store.staged_len().unwrap(), 0);

        // A snapshot staged when the process died is gone after reopening.
        let mut third = e.snapshot_buffer(2).unwrap();
        for s in 1..=300 {
            third.push(entry(s, false)).unwrap();
        }
        std::mem::forget(third);
        let store = &e.live().unwrap().store;
        assert!(store.staged_len().unwrap() > 0);
        store.flush_staged().unwrap();
        e.close().unwrap();
        let e = Engine::builder(dir.path()).open().unwrap();
        assert_eq!(e.live().unwrap().store.staged_len().unwrap(), 0);
    }
}
