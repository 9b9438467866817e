//! The one place the replication crate takes atomics and locks from: the
//! engine's `sync` module, so a loom build of the engine (`--features
//! tapkv-engine/loom` or `RUSTFLAGS="--cfg loom"`) swaps this crate's
//! primitives too. No loom model covers this crate yet (its threads work on
//! sockets, which loom cannot run).

pub(crate) use tapkv_engine::sync::{
    Arc, AtomicBool, AtomicU64, AtomicUsize, Condvar, Counted, Mutex, Ordering,
};
