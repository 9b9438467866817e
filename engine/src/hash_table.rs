//! A partition's concurrent hash table: key → value and metadata.
//!
//! Sharded: each shard is a `RwLock` around a `hashbrown::HashTable`. A key's
//! hash is computed once and picks both the shard (high bits) and the bucket,
//! so a lookup or an update hashes the key a single time. Readers take a shard
//! read lock; writers are serialised per partition by the caller and take the
//! shard write lock only for the in-place update.
//!
//! The table keeps item and byte counts; it never touches checkpoints or disk.

use bytes::Bytes;
use hashbrown::hash_table::Entry as TableEntry;
use hashbrown::HashTable as RawTable;

use crate::item::ItemMeta;
use crate::sync::{AtomicUsize, Ordering, RwLock, RwLockWriteGuard};

const SHARDS: usize = 16;

type Hasher64 = foldhash::fast::FixedState;

/// A value held by the hash table.
#[derive(Debug, Clone)]
pub(crate) struct StoredValue {
    pub(crate) value: Bytes,
    pub(crate) meta: ItemMeta,
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) key: Bytes,
    pub(crate) value: StoredValue,
}

impl Entry {
    fn size(&self) -> usize {
        self.key.len() + self.value.value.len()
    }
}

pub(crate) struct HashTable {
    shards: Box<[RwLock<RawTable<Entry>>]>,
    hasher: Hasher64,
    items: AtomicUsize,
    bytes: AtomicUsize,
}

/// A shard locked for writing, positioned on one key (found or not).
pub(crate) struct KeySlot<'a> {
    table: &'a HashTable,
    guard: RwLockWriteGuard<'a, RawTable<Entry>>,
    hash: u64,
}

impl HashTable {
    pub(crate) fn new() -> Self {
        HashTable {
            shards: (0..SHARDS).map(|_| RwLock::new(RawTable::new())).collect(),
            hasher: Hasher64::with_seed(0x7461_706b_76),
            items: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &RwLock<RawTable<Entry>> {
        &self.shards[(hash >> 60) as usize % SHARDS]
    }

    /// The stored key and value of `key`, if present.
    pub(crate) fn get(&self, key: &[u8]) -> Option<(Bytes, StoredValue)> {
        let hash = self.hash(key);
        let shard = self.shard(hash).read();
        shard
            .find(hash, |e| e.key[..] == *key)
            .map(|e| (e.key.clone(), e.value.clone()))
    }

    /// Locks `key`'s shard for writing.
    pub(crate) fn slot(&self, key: &[u8]) -> KeySlot<'_> {
        let hash = self.hash(key);
        KeySlot {
            table: self,
            guard: self.shard(hash).write(),
            hash,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.load(Ordering::Relaxed)
    }

    pub(crate) fn mem_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl KeySlot<'_> {
    /// The current value of `key`.
    pub(crate) fn current(&self, key: &[u8]) -> Option<&StoredValue> {
        self.guard
            .find(self.hash, |e| e.key[..] == *key)
            .map(|e| &e.value)
    }

    /// Sets `key` to `value`, inserting it if absent.
    pub(crate) fn put(&mut self, key: &Bytes, value: StoredValue) {
        let hasher = &self.table.hasher;
        let entry = self.guard.entry(
            self.hash,
            |e| e.key[..] == key[..],
            |e| {
                use std::hash::BuildHasher;
                hasher.hash_one(&e.key[..])
            },
        );
        let (items, bytes) = (&self.table.items, &self.table.bytes);
        match entry {
            TableEntry::Occupied(mut o) => {
                let old = o.get().size();
                o.get_mut().value = value;
                let new = o.get().size();
                bytes.fetch_add(new, Ordering::Relaxed);
                bytes.fetch_sub(old, Ordering::Relaxed);
            }
            TableEntry::Vacant(v) => {
                let e = Entry {
                    key: key.clone(),
                    value,
                };
                bytes.fetch_add(e.size(), Ordering::Relaxed);
                items.fetch_add(1, Ordering::Relaxed);
                v.insert(e);
            }
        }
    }

    /// Removes `key` completely; returns its value if it was present.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<StoredValue> {
        match self.guard.find_entry(self.hash, |e| e.key[..] == *key) {
            Ok(o) => {
                let (e, _) = o.remove();
                self.table.bytes.fetch_sub(e.size(), Ordering::Relaxed);
                self.table.items.fetch_sub(1, Ordering::Relaxed);
                Some(e.value)
            }
            Err(_) => None,
        }
    }
}
