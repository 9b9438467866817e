//! tapkv-engine: a checkpointed key-value storage engine.
//!
//! Keys hash to a fixed number of partitions. Each partition has a concurrent
//! hash table, a [`CheckpointManager`] whose named cursors walk its changes in
//! seqno order, and a persistence cursor that a background flusher drains into
//! RocksDB. Reopening a data directory warms every partition back up and
//! continues its seqnos, CAS and checkpoint ids.
//!
//! ```no_run
//! use tapkv_engine::{Engine, WriteOptions, Durability};
//! let engine = Engine::builder("./data").open()?;
//! engine.set(b"greeting", "hello", WriteOptions::durable(Durability::Persist))?;
//! assert_eq!(engine.get(b"greeting")?.value(), b"hello");
//! engine.close()?;
//! # Ok::<(), tapkv_engine::Error>(())
//! ```
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod buckets;
pub mod checkpoint;
mod config;
mod engine;
mod error;
mod flusher;
mod hash_table;
mod item;
mod online_update;
mod pager;
mod partition;
mod replica;
mod snapshot;
mod stats;
mod store;
#[doc(hidden)]
pub mod sync;
pub mod text;

pub use checkpoint::{
    CheckpointConfig, CheckpointInfo, CheckpointManager, ClosedRun, CursorBatch, CursorEvent,
    CursorInfo, CursorProgress, EventRef, FreedCheckpoints, Registration,
};
pub use config::{EngineBuilder, EngineConfig};
pub use engine::{Engine, ReplicationGate};
pub use error::{Error, Result};
pub use item::{
    absolute_expiry, Durability, Item, ItemMeta, MutationResult, PartitionId, QueueOp, QueuedItem,
    WriteOptions, RELATIVE_EXPIRY_MAX,
};
#[doc(hidden)]
pub use online_update::RevertHold;
pub use online_update::{RevertReport, WindowInfo};
pub use partition::{partition_of, PERSISTENCE_CURSOR};
pub use replica::{
    ApplyOutcome, BackfillEntry, DiskSnapshot, StreamStart, BACKFILL_TICK, BACKFILL_TICK_BYTES,
};
pub use snapshot::SnapshotBuffer;
pub use stats::{EngineStats, PartitionStats};
pub use store::{
    DiskItem, DiskRecord, DiskView, EngineMeta, FailoverEntry, PartitionDiskInfo, WindowRecord,
    FORMAT_VERSION, MAX_PARTITIONS,
};
