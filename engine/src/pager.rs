//! The pager: keeps keys plus resident values under the memory quota by
//! evicting values of clean items.
//!
//! When the hash tables' bytes pass `high_water × memory_quota`, values of
//! items already persisted (`by_seqno <= persisted seqno` of their partition)
//! are evicted, shard by shard in rotation, until the total is under
//! `low_water × memory_quota`. Keys and metadata stay resident; a read fetches
//! an evicted value back from disk. Dirty items — not yet persisted, or inside
//! an online-update window (the persistence cursor stops before it) — are never
//! evicted. Recency is not tracked: the pager evicts clean values in table
//! order. It runs on the flusher thread that owns partition 0, after each round,
//! and so does the expiry pass ([`expire`]) when it is due.

use crate::engine::Shared;
use crate::error::Error;
use crate::item::{now_secs, WriteOptions};
use crate::partition::MutationKind;
use crate::sync::Ordering;

/// The expiry pass, every `expiry_pager_interval` on a primary: each item
/// found expired becomes a deletion through the normal write path (a new
/// seqno and a tombstone, persisted and streamed to replicas like any
/// delete; inside an online-update window it is part of the window, so a
/// REVERT brings the expired item back, still expired). Conditional on the
/// CAS seen, so a key rewritten meanwhile is left alone. Stops at the
/// checkpoint memory limit and tries again at the next pass.
pub(crate) fn expire(shared: &Shared) {
    if shared.config.replica {
        return;
    }
    {
        let mut due = shared.expiry_due.lock();
        let now = std::time::Instant::now();
        if now < *due {
            return;
        }
        *due = now + shared.config.expiry_pager_interval;
    }
    let now = now_secs();
    let mut deleted = 0u64;
    for p in &shared.partitions {
        for shard in 0..p.table.shards() {
            for (key, cas) in p.table.expired(shard, now) {
                let opts = WriteOptions {
                    cas: Some(cas),
                    ..WriteOptions::default()
                };
                let admit = |bytes| shared.admit(bytes);
                match p.mutate(&shared.store, MutationKind::Expire, &key, &[], &opts, admit) {
                    Ok(_) => {
                        deleted += 1;
                        p.progress.expired.fetch_add(1, Ordering::Relaxed);
                        shared.changed(p.id);
                    }
                    // Rewritten or deleted since it was seen.
                    Err(Error::NotFound | Error::CasMismatch { .. }) => {}
                    Err(e) => {
                        tracing::debug!(partition = p.id, error = %e, "expiry pass stopped");
                        return;
                    }
                }
            }
        }
    }
    if deleted > 0 {
        tracing::debug!(deleted, "expiry pass deleted expired items");
    }
}

/// Table entries a pager pass that could not get under its target may
/// look at per flush round, on average: after such a pass the pager sits
/// out one round per this many entries it scanned. What it counts includes
/// keys and dirty values, which it cannot free, and without the rest it
/// would scan the whole table after every flush round (every 2 ms under
/// writes) for as long as that lasts.
pub(crate) const PAGER_SCAN_PER_ROUND: usize = 16_384;

pub(crate) fn run(shared: &Shared) {
    expire(shared);
    let quota = shared.config.memory_quota as f64;
    let used: usize = shared.partitions.iter().map(|p| p.table.mem_bytes()).sum();
    if (used as f64) <= quota * shared.config.high_water {
        return;
    }
    if shared
        .pager_rest_rounds
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        return;
    }
    let target = (quota * shared.config.low_water) as usize;
    let mut to_free = used.saturating_sub(target);
    let shards = shared.partitions.first().map_or(1, |p| p.table.shards());
    let slots = shared.partitions.len() * shards;
    let (mut evicted, mut freed, mut looked_at) = (0usize, 0usize, 0usize);
    for _ in 0..slots {
        if to_free == 0 {
            break;
        }
        let slot = shared.pager_next.fetch_add(1, Ordering::Relaxed) % slots;
        let p = &shared.partitions[slot / shards];
        let clean_upto = p.progress.persisted_seqno.load(Ordering::Acquire);
        let (n, bytes, scanned) = p.table.evict_clean(slot % shards, clean_upto, to_free);
        p.progress.evictions.fetch_add(n as u64, Ordering::Relaxed);
        looked_at += scanned;
        evicted += n;
        freed += bytes;
        to_free = to_free.saturating_sub(bytes);
    }
    shared
        .pager_scanned
        .fetch_add(looked_at as u64, Ordering::Relaxed);
    if to_free > 0 {
        shared
            .pager_rest_rounds
            .store(looked_at / PAGER_SCAN_PER_ROUND, Ordering::Relaxed);
    }
    tracing::debug!(
        evicted,
        freed,
        used,
        quota = shared.config.memory_quota,
        "pager ran"
    );
}
