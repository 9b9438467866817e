//! Helpers shared by the engine's integration tests.

// A loom build swaps the engine's primitives; only its models run then.
#![cfg(not(any(loom, feature = "loom")))]
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use tapkv_engine::{Engine, EngineBuilder};

/// A builder with small, test-friendly limits.
pub fn builder(dir: &Path) -> EngineBuilder {
    Engine::builder(dir)
        .partitions(4)
        .checkpoint_max_items(50)
        .persist_timeout(Duration::from_secs(20))
}

pub fn key(i: usize) -> Vec<u8> {
    format!("key-{i:06}").into_bytes()
}

pub fn value(i: usize) -> Vec<u8> {
    format!("value-{i}-{}", "x".repeat(i % 37)).into_bytes()
}

/// Runs `wait` (a durable write or a `flush`) on its own thread with a
/// handle on `e`, returns once it waits for a sync (bounded: 10 s), and
/// hands back where its result arrives. The thread lets go of `e` before
/// answering, so the caller may close it then.
pub fn waiting_for_a_sync<T: Send + 'static>(
    e: &std::sync::Arc<Engine>,
    wait: impl FnOnce(&Engine) -> T + Send + 'static,
) -> std::sync::mpsc::Receiver<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::sync::Arc::clone(e);
    std::thread::spawn(move || {
        let r = wait(&handle);
        drop(handle);
        let _ = tx.send(r);
    });
    let t = std::time::Instant::now();
    while e.persist_waiters() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "nothing waits for a sync"
        );
        std::thread::yield_now();
    }
    rx
}
