//! Neutralises this virtual machine's expensive fresh memory before a timed
//! phase (see `docs/performance.md`, "fresh memory").
//!
//! The machine reports memory the guest has left free for about two seconds
//! to its host (virtio-balloon free page reporting), and the first touch of
//! such a page waits for the host: up to six times the cost of a page freed
//! a moment ago. Which kind a process draws is luck, so the same binary ran
//! at 0.9M or 2.2M sets/s, and the side of a comparison that needs more
//! fresh memory (tapkv's, which keeps every item in memory) paid most of it.
//!
//! Before each timed write phase of the engine benchmark (set, RocksDB put
//! with and without WAL, the flusher drain and RocksDB's batches) and of
//! the pinned one (each single node, and the primary-replica pair before
//! the primary's first write), a child process touches and frees enough
//! memory for the phase (about 1 KiB an item for each process that holds
//! the items, at least 1 GiB; `TAPKV_PREFAULT_MB` sets it, 0 turns it off):
//! the kernel hands pages freed that recently, not yet reported, to the
//! next allocations, as a machine without a balloon always would. The other
//! benchmarks' phases are not prefaulted (on either side).

use std::process::Command;

/// At least this many MiB are touched.
const MIN_MB: u64 = 1024;
/// Bytes touched per item per process that holds the items: a 500,000-item
/// node peaks at about 340 MB (items, checkpoints, RocksDB's memtable, the
/// inputs).
const BYTES_PER_ITEM: u64 = 1024;

/// MiB to touch for `items` held by `processes` processes.
fn megabytes(items: u64, processes: u64) -> u64 {
    match std::env::var("TAPKV_PREFAULT_MB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(mb) => mb,
        None => ((items * processes * BYTES_PER_ITEM) >> 20).max(MIN_MB),
    }
}

/// Child (`tapkv-benches prefault-child MIB`): touches the memory and
/// exits, returning it to the kernel.
pub(crate) fn child(mb: &str) {
    let mb: usize = mb.parse().unwrap_or(0);
    let mut v = vec![0u8; mb << 20];
    // One write a page: `vec!` of zeros is mapped lazily, untouched.
    for b in v.iter_mut().step_by(4096) {
        *b = 1;
    }
    std::hint::black_box(&v);
}

/// Runs the child for `items` held by `processes` processes and waits for
/// it; a failure is reported, not fatal (the phase is then timed as
/// before).
pub(crate) fn prefault(items: u64, processes: u64) {
    let mb = megabytes(items, processes);
    if mb == 0 {
        return;
    }
    let ran = std::env::current_exe().and_then(|exe| {
        Command::new(exe)
            .args(["prefault-child", &mb.to_string()])
            .status()
    });
    match ran {
        Ok(s) if s.success() => {}
        other => eprintln!("  prefault: the child did not run ({other:?}); timing without it"),
    }
}
