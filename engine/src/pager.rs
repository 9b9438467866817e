//! The pager: evicts values of clean items to keep keys plus resident
//! values under the memory quota (what it cannot evict is not held to it:
//! dirty values are bounded by the checkpoint and window limits, keys and
//! metadata not at all).
//!
//! When the hash tables' bytes pass `high_water × memory_quota`, values of
//! items already persisted (`by_seqno <= persisted seqno` of their partition)
//! are evicted, shard by shard in rotation, until the total is under
//! `low_water × memory_quota`. Keys and metadata stay resident; a read fetches
//! an evicted value back from disk. Dirty items — not yet persisted, or inside
//! an online-update window (the persistence cursor stops before it) — are never
//! evicted. Recency is not tracked: the pager evicts clean values in table
//! order. It runs on the flusher thread that owns partition 0, after each round.
//! The same thread runs the expiry pass ([`expire`]) between rounds.

use crate::engine::Shared;
use crate::error::Error;
use crate::item::{now_secs, WriteOptions};
use crate::partition::MutationKind;
use crate::sync::Ordering;

/// Deletions one expiry pass makes at most (it goes on at the next flush
/// round where it stopped).
pub(crate) const EXPIRY_BATCH: usize = 10_000;

/// Table entries one expiry pass looks at at most (it goes on at the next
/// flush round from the entry where it stopped): the pass runs on a
/// flusher thread, whose next round, and the durable writes waiting on it,
/// wait for it. Before, a pass that found few expired items read every
/// entry of the table (found by a review: 10 million items, about a second
/// without a flush every `expiry_pager_interval`).
pub(crate) const EXPIRY_SCAN_PER_PASS: usize = 65_536;

/// The expiry pass, every `expiry_pager_interval` on a primary (`forced`:
/// now): each item found expired becomes a deletion through the normal
/// write path (a new seqno and a tombstone, persisted and streamed to
/// replicas like any delete). Conditional on the CAS seen, so a key
/// rewritten meanwhile is left alone. A partition with an open
/// online-update window is left alone (its expired items read as absent
/// meanwhile; the pass after the window deletes them).
///
/// It runs on the flusher thread that owns partition 0, between flush
/// rounds (never under the round lock; that thread's next round, and a
/// durable write waiting for it, waits for at most one pass), visits
/// the shards in order, a cycle from the first to the last (then the next
/// cycle waits for the interval), and stops after [`EXPIRY_BATCH`] deletions or
/// [`EXPIRY_SCAN_PER_PASS`] entries looked at, going on at the next round
/// from where it stopped, so each round adds at most a batch of tombstones
/// to checkpoint memory and waits for a bounded scan. A shard whose deletion is
/// refused for memory (the engine-wide limit is reached), or whose
/// partition opened a window since the pass looked, is left for the next
/// pass. Not while the engine
/// closes (the last round would not persist its tombstones).
/// Returns the deletions it made.
pub(crate) fn expire(shared: &Shared, forced: bool) -> usize {
    if shared.config.replica
        || shared.shutdown.load(Ordering::Acquire)
        || shared.is_poisoned.load(Ordering::Acquire)
    {
        return 0;
    }
    if !forced && shared.flusher_paused.load(Ordering::Acquire) {
        return 0;
    }
    let started = std::time::Instant::now();
    if !forced && shared.expiry_due.lock().is_none_or(|due| started < due) {
        return 0;
    }
    let now = now_secs();
    let shards = shared.partitions.first().map_or(1, |p| p.table.shards());
    let slots = shared.partitions.len() * shards;
    // A cycle visits the slots in order, from the first; a pass that stops
    // early leaves where the cycle goes on (a slot, and the entry inside
    // it), and the cycle ends at the last slot's end: only then does the
    // next wait for the interval. (A rotation that could start anywhere had
    // no end: over a table larger than a pass's budget, a pass ran before
    // every flush round; found by a review.)
    let first = shared.expiry_next.load(Ordering::Relaxed) % slots.max(1);
    let offset = shared.expiry_offset.load(Ordering::Relaxed);
    let (mut deleted, mut scanned) = (0usize, 0usize);
    let mut stopped_at = None;
    'slots: for slot in first..slots {
        let skip = if slot == first { offset } else { 0 };
        if deleted >= EXPIRY_BATCH || scanned >= EXPIRY_SCAN_PER_PASS {
            stopped_at = Some((slot, skip));
            break;
        }
        let p = &shared.partitions[slot / shards];
        // Not inside an online-update window: its deletions would be the
        // window's entries, filling its memory limit (nothing frees them
        // before COMPLETE or REVERT) and made twice if it is reverted.
        // Expired items read as absent meanwhile; the pass after the window
        // deletes them. (A cheap early skip: a START after this check is
        // caught by `mutate`, which refuses an expiry inside a window.)
        if p.window_info().is_some() {
            continue;
        }
        // One more than the batch has room for, so a shard with more than
        // that is seen to stop the pass (and is found again by the next).
        let room = EXPIRY_BATCH - deleted + 1;
        let budget = EXPIRY_SCAN_PER_PASS - scanned;
        let (found, looked_at) = p.table.expired(slot % shards, now, (skip, room, budget));
        scanned += looked_at;
        let shard_end = found.len() < room && looked_at < budget;
        let mut deleted_here = 0;
        for (key, cas) in found {
            if deleted >= EXPIRY_BATCH {
                // The rest of this shard is found again by the next pass
                // (the deleted entries are gone from before it).
                stopped_at = Some((slot, skip));
                break 'slots;
            }
            let opts = WriteOptions {
                cas: Some(cas),
                ..WriteOptions::default()
            };
            let admit = |bytes| shared.admit(bytes);
            match p.mutate(&shared.store, MutationKind::Expire, &key, &[], &opts, admit) {
                Ok(_) => {
                    deleted += 1;
                    deleted_here += 1;
                    p.progress.expired.fetch_add(1, Ordering::Relaxed);
                    shared.changed(p.id);
                }
                // Rewritten or deleted since it was seen.
                Err(Error::NotFound | Error::CasMismatch { .. }) => {}
                // The engine-wide limit, or a window opened since the
                // check above (the next shard's check sees either): the
                // rest of this shard waits.
                Err(Error::TempOutOfMemory { .. } | Error::OnlineUpdateOpen { .. }) => break,
                Err(e) => {
                    tracing::debug!(partition = p.id, error = %e, "expiry pass stopped");
                    stopped_at = Some((slot, skip));
                    break 'slots;
                }
            }
        }
        if !shard_end {
            // Out of its scan budget inside the shard: the next pass goes
            // on after what this one looked at (less what it deleted, which
            // no longer comes before).
            stopped_at = Some((slot, (skip + looked_at).saturating_sub(deleted_here)));
            break;
        }
    }
    let (next, next_offset) = stopped_at.unwrap_or((0, 0));
    shared.expiry_next.store(next, Ordering::Relaxed);
    shared.expiry_offset.store(next_offset, Ordering::Relaxed);
    // Stopped early: go on at the next round; else wait for the interval
    // (never, if it does not fit in an `Instant`).
    *shared.expiry_due.lock() = match stopped_at {
        Some(_) => Some(started),
        None => started.checked_add(shared.config.expiry_pager_interval),
    };
    if deleted > 0 {
        tracing::debug!(deleted, "expiry pass deleted expired items");
    }
    deleted
}

/// Table entries a pager pass may look at (evicting them, or leaving keys
/// without a value, dirty values, values evicted already) before it stops
/// for the flush round; the next pass goes on from the entry where it
/// stopped. Without a bound, a table the pager cannot bring under its
/// target (keys alone over the quota, or everything dirty) would be
/// scanned whole after every flush round (every 2 ms under writes),
/// holding shard locks; and a pass past the high-water mark evicted a
/// tenth of the quota at once (a million 100-byte values by default)
/// while the flusher thread's next round, and the durable writes waiting
/// on it, waited (found by a review: evicted entries did not count).
pub(crate) const PAGER_SCAN_PER_ROUND: usize = 16_384;

/// One pager pass, after a flush round and outside its lock (a pass never
/// holds up another flusher thread's round or the freeing of checkpoint
/// memory, and delays its own thread's next round by one bounded pass;
/// before, it ran under the round lock): when the hash tables hold more
/// than `high_water × memory_quota`, evicts clean values, shard by shard
/// in rotation from where the last pass stopped (`pager_next`, and
/// `pager_offset` inside that shard), until the total is under
/// `low_water × memory_quota` or [`PAGER_SCAN_PER_ROUND`] entries were
/// looked at. So a pass is bounded, and there is no pause in which values
/// that became clean wait: each round goes on with the entries the last
/// one did not reach. A pass that evicted and stopped short of its target
/// sets `pager_pending`, so its flusher thread naps as after a round that
/// found work (`flush_interval`), not as an idle one.
pub(crate) fn run(shared: &Shared) {
    let pending = pass(shared);
    shared.pager_pending.store(pending, Ordering::Relaxed);
}

/// One pass; whether it evicted and left its target unreached.
fn pass(shared: &Shared) -> bool {
    let quota = shared.config.memory_quota as f64;
    let used: usize = shared.partitions.iter().map(|p| p.table.mem_bytes()).sum();
    let target = (quota * shared.config.low_water) as usize;
    // Past the high-water mark, or going on with a pass that stopped at its
    // bound on the way down to the low-water mark.
    let going_on = shared.pager_pending.load(Ordering::Relaxed);
    if (used as f64) <= quota * shared.config.high_water && !(going_on && used > target) {
        return false;
    }
    let mut to_free = used.saturating_sub(target);
    let shards = shared.partitions.first().map_or(1, |p| p.table.shards());
    let slots = (shared.partitions.len() * shards).max(1);
    let (mut evicted, mut freed, mut looked_at, mut kept) = (0usize, 0usize, 0usize, 0usize);
    // Every slot once at most (the first one may be visited again from its
    // start, after a pass that stopped inside it).
    for _ in 0..=slots {
        if to_free == 0 || looked_at >= PAGER_SCAN_PER_ROUND {
            break;
        }
        let slot = shared.pager_next.load(Ordering::Relaxed) % slots;
        let skip = shared.pager_offset.load(Ordering::Relaxed);
        let p = &shared.partitions[slot / shards];
        let pass = p.table.evict_clean(
            slot % shards,
            &p.progress.persisted_seqno,
            to_free,
            skip,
            PAGER_SCAN_PER_ROUND - looked_at,
        );
        p.progress
            .evictions
            .fetch_add(pass.items as u64, Ordering::Relaxed);
        looked_at += pass.scanned;
        kept += pass.kept;
        evicted += pass.items;
        freed += pass.bytes;
        to_free = to_free.saturating_sub(pass.bytes);
        if pass.finished {
            shared
                .pager_next
                .store((slot + 1) % slots, Ordering::Relaxed);
            shared.pager_offset.store(0, Ordering::Relaxed);
        } else {
            shared
                .pager_offset
                .store(skip + pass.scanned, Ordering::Relaxed);
        }
    }
    shared
        .pager_scanned
        .fetch_add(looked_at as u64, Ordering::Relaxed);
    tracing::debug!(
        evicted,
        freed,
        kept,
        used,
        quota = shared.config.memory_quota,
        "pager ran"
    );
    evicted > 0 && to_free > 0
}

#[cfg(all(test, not(any(loom, feature = "loom"))))]
mod tests {
    use super::*;
    use crate::Engine;

    /// Over a table larger than a pass looks at, the passes of one cycle go
    /// through it once, and then the next waits for the interval. Before,
    /// the passes went round the table for ever, one before every flush
    /// round (found by a review).
    #[test]
    fn the_expiry_passes_of_a_cycle_end_and_the_next_waits_for_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::builder(dir.path()).partitions(1).open().unwrap();
        e.set_flusher_paused(true);
        for i in 0..100_000 {
            e.set(format!("k{i}").as_bytes(), b"v", WriteOptions::default())
                .unwrap();
        }
        let s = e.live().unwrap();
        let waits = || {
            s.expiry_due
                .lock()
                .is_some_and(|due| due > std::time::Instant::now())
        };
        expire(s, true);
        assert!(!waits(), "one pass cannot look at 100,000 entries");
        expire(s, true);
        assert!(waits(), "the second pass ended the cycle");
        e.set_flusher_paused(false);
    }

    /// The expiry pass checks for a window before it reads a shard's
    /// expired keys, and deletes them one at a time after: a START in
    /// between used to make the rest of the shard's deletions window
    /// entries (counted as expired again after a REVERT). The deletion
    /// itself now refuses, under the partition's lock.
    #[test]
    fn an_expiry_deletion_is_refused_inside_a_window_opened_after_the_pass_looked() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::builder(dir.path()).partitions(1).open().unwrap();
        let past = WriteOptions {
            expiry: crate::item::RELATIVE_EXPIRY_MAX + 1,
            ..WriteOptions::default()
        };
        e.set(b"gone", b"v", past).unwrap();
        e.flush().unwrap();
        let s = e.live().unwrap();
        let p = s.partition(0).unwrap();
        // What the pass read before the START.
        let cas = (0..p.table.shards())
            .flat_map(|shard| p.table.expired(shard, now_secs(), (0, 10, usize::MAX)).0)
            .map(|(_, cas)| cas)
            .next()
            .unwrap();
        e.online_update_start(0).unwrap();
        let opts = WriteOptions {
            cas: Some(cas),
            ..WriteOptions::default()
        };
        let admit = |bytes| s.admit(bytes);
        let res = p.mutate(&s.store, MutationKind::Expire, b"gone", &[], &opts, admit);
        assert!(
            matches!(res, Err(Error::OnlineUpdateOpen { .. })),
            "{:?}",
            res.map(|_| ())
        );
        let info = e.stats().unwrap().partitions[0].window.unwrap();
        assert_eq!(info.keys, 0, "the deletion became a window entry: {info:?}");
        e.online_update_revert(0).unwrap();
        assert_eq!(e.run_expiry_pass().unwrap(), 1);
        assert_eq!(e.stats().unwrap().partitions[0].expired, 1);
    }
}
