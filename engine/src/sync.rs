//! The one place that chooses synchronisation primitives.
//!
//! Every atomic, lock and condition variable in the engine is imported from here,
//! never from `std::sync` or `parking_lot` directly, so that building with
//! `RUSTFLAGS="--cfg loom"` swaps the whole engine onto loom's model-checked
//! primitives. Outside loom, locks are `parking_lot`'s (no poisoning, small).

#[cfg(not(loom))]
pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::RwLockWriteGuard;
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
#[cfg(not(loom))]
pub(crate) use parking_lot::RwLockWriteGuard;
