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
