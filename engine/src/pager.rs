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
//! order. It runs on the flusher thread that owns partition 0, after each round.

use crate::engine::Shared;
use crate::sync::Ordering;

pub(crate) fn run(shared: &Shared) {
    let quota = shared.config.memory_quota as f64;
    let used: usize = shared.partitions.iter().map(|p| p.table.mem_bytes()).sum();
    if (used as f64) <= quota * shared.config.high_water {
        return;
    }
    let target = (quota * shared.config.low_water) as usize;
    let mut to_free = used.saturating_sub(target);
    let shards = shared.partitions.first().map_or(1, |p| p.table.shards());
    let slots = shared.partitions.len() * shards;
    let (mut evicted, mut freed) = (0usize, 0usize);
    for _ in 0..slots {
        if to_free == 0 {
            break;
        }
        let slot = shared.pager_next.fetch_add(1, Ordering::Relaxed) % slots;
        let p = &shared.partitions[slot / shards];
        let clean_upto = p.progress.persisted_seqno.load(Ordering::Acquire);
        let (n, bytes) = p.table.evict_clean(slot % shards, clean_upto, to_free);
        p.progress.evictions.fetch_add(n as u64, Ordering::Relaxed);
        evicted += n;
        freed += bytes;
        to_free = to_free.saturating_sub(bytes);
    }
    tracing::debug!(
        evicted,
        freed,
        used,
        quota = shared.config.memory_quota,
        "pager ran"
    );
}
