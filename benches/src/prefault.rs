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
//! Before each timed write phase, on both sides of every comparison, a
//! child process touches and frees `TAPKV_PREFAULT_MB` MiB (default 1024;
//! 0 turns it off): the kernel hands pages freed that recently, not yet
//! reported, to the next allocations, as a machine without a balloon
//! always would.

use std::process::Command;

/// MiB touched when `TAPKV_PREFAULT_MB` is not set.
const DEFAULT_MB: usize = 1024;

fn megabytes() -> usize {
    std::env::var("TAPKV_PREFAULT_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MB)
}

/// Child (`tapkv-benches prefault-child`): touches the memory and exits,
/// returning it to the kernel.
pub(crate) fn child() {
    let mut v = vec![0u8; megabytes() << 20];
    // One write a page: `vec!` of zeros is mapped lazily, untouched.
    for b in v.iter_mut().step_by(4096) {
        *b = 1;
    }
    std::hint::black_box(&v);
}

/// Runs the child and waits for it; a failure is reported, not fatal (the
/// phase is then timed as before).
pub(crate) fn prefault() {
    if megabytes() == 0 {
        return;
    }
    let ran =
        std::env::current_exe().and_then(|exe| Command::new(exe).arg("prefault-child").status());
    match ran {
        Ok(s) if s.success() => {}
        other => eprintln!("  prefault: the child did not run ({other:?}); timing without it"),
    }
}
