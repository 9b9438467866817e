//! The one place that chooses synchronisation primitives, for the engine and
//! for `tapkv-replication` (which re-exports these; not a stable API).
//!
//! Every atomic, lock and condition variable in tapkv is imported from here,
//! never from `std::sync` or `parking_lot` directly, so that a loom build
//! (`--features loom`, or `RUSTFLAGS="--cfg loom"`) swaps the whole engine
//! onto loom's model-checked primitives. Outside loom, locks are
//! `parking_lot`'s (no poisoning, small).
//!
//! Under loom, a condition variable's timed wait is modelled as an untimed
//! one: a waiter that nobody notifies is reported as a deadlock. The models
//! (in `engine.rs`) rely on exactly that to prove no wake-up is lost.

#[cfg(not(any(loom, feature = "loom")))]
pub use parking_lot::{Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
#[cfg(not(any(loom, feature = "loom")))]
pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(any(loom, feature = "loom")))]
pub use std::sync::Arc;

#[cfg(any(loom, feature = "loom"))]
pub use model::*;

/// parking_lot-shaped wrappers over loom's primitives.
#[cfg(any(loom, feature = "loom"))]
pub mod model {
    use std::ops::{Deref, DerefMut};
    use std::sync::PoisonError;
    use std::time::Duration;

    pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub use loom::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};

    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    pub struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)))
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0
                .as_deref()
                .expect("guard present outside a condvar wait")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0
                .as_deref_mut()
                .expect("guard present outside a condvar wait")
        }
    }

    #[derive(Debug, Default)]
    pub struct RwLock<T>(loom::sync::RwLock<T>);

    impl<T> RwLock<T> {
        pub fn new(value: T) -> Self {
            RwLock(loom::sync::RwLock::new(value))
        }

        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().unwrap_or_else(PoisonError::into_inner)
        }

        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write().unwrap_or_else(PoisonError::into_inner)
        }
    }

    #[derive(Debug, Default)]
    pub struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub fn new() -> Self {
            Condvar(loom::sync::Condvar::new())
        }

        pub fn notify_all(&self) {
            self.0.notify_all();
        }

        /// Waits for a notification; the timeout is not modelled.
        pub fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, _timeout: Duration) {
            let inner = guard.0.take().expect("guard present before a condvar wait");
            guard.0 = Some(self.0.wait(inner).unwrap_or_else(PoisonError::into_inner));
        }
    }
}

/// One more on a count while it lives: a waiter or a write in flight that an
/// early return or a panic still takes off the count.
pub struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    /// Adds one to `n` until the guard is dropped.
    pub fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Counted(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
