//! A partition's concurrent hash table: key → value and metadata.
//!
//! Sharded: each shard is a `RwLock` around a `hashbrown::HashTable`. A key's
//! hash is computed once and picks both the shard (high bits) and the bucket,
//! so a lookup or an update hashes the key a single time. Readers take a shard
//! read lock; writers are serialised per partition by the caller and take the
//! shard write lock only for the in-place update. A revert takes every shard's
//! write lock at once ([`HashTable::lock_all`]) so readers never see it half
//! done.
//!
//! A value may be *evicted* (`value: None`): key and metadata stay, the bytes
//! are read back from disk on access. The table keeps item, byte and eviction
//! counts; it never touches checkpoints or disk.

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
    /// The value, or `None` when evicted (it is then on disk, at `meta.by_seqno`).
    pub(crate) value: Option<Bytes>,
    pub(crate) meta: ItemMeta,
}

#[derive(Debug)]
pub(crate) struct Entry {
    /// The key's hash, kept so growing a shard never re-reads the key.
    hash: u64,
    pub(crate) key: Bytes,
    pub(crate) value: StoredValue,
}

/// `key` as the table holds it: its hash and the table's own key buffer.
/// Lookups with a `KeyRef` neither hash again nor, when the buffer is the
/// table's, compare bytes (pointer equality settles it).
#[derive(Debug, Clone)]
pub(crate) struct KeyRef {
    pub(crate) hash: u64,
    pub(crate) key: Bytes,
}

/// Whether `e` holds `key`: the same buffer, or the same bytes.
fn same_key(e: &Entry, key: &[u8]) -> bool {
    (e.key.as_ptr() == key.as_ptr() && e.key.len() == key.len()) || e.key[..] == *key
}

fn size(key: &[u8], v: &StoredValue) -> usize {
    key.len() + v.value.as_ref().map_or(0, Bytes::len)
}

pub(crate) struct HashTable {
    shards: Box<[RwLock<RawTable<Entry>>]>,
    hasher: Hasher64,
    items: AtomicUsize,
    bytes: AtomicUsize,
    evicted: AtomicUsize,
}

type Shard = RawTable<Entry>;

/// Write access to shards; positioned per key with a precomputed hash.
pub(crate) struct ShardsGuard<'a> {
    table: &'a HashTable,
    guards: Vec<RwLockWriteGuard<'a, Shard>>,
    /// Index of the shard in `guards[0]` and the hash of the key it was
    /// locked for, when only one shard is held.
    single: Option<(usize, u64)>,
}

impl HashTable {
    pub(crate) fn new() -> Self {
        HashTable {
            shards: (0..SHARDS).map(|_| RwLock::new(RawTable::new())).collect(),
            hasher: Hasher64::with_seed(0x0074_6170_6b76),
            items: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            evicted: AtomicUsize::new(0),
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    fn shard_index(hash: u64) -> usize {
        (hash >> 60) as usize % SHARDS
    }

    /// The stored key and value of `key`, if present.
    pub(crate) fn get(&self, key: &[u8]) -> Option<(Bytes, StoredValue)> {
        let hash = self.hash(key);
        let shard = self.shards[Self::shard_index(hash)].read();
        shard
            .find(hash, |e| same_key(e, key))
            .map(|e| (e.key.clone(), e.value.clone()))
    }

    /// Locks `key`'s shard for writing.
    pub(crate) fn slot(&self, key: &[u8]) -> ShardsGuard<'_> {
        let hash = self.hash(key);
        let idx = Self::shard_index(hash);
        ShardsGuard {
            table: self,
            guards: vec![self.shards[idx].write()],
            single: Some((idx, hash)),
        }
    }

    /// Locks every shard for writing (readers wait until it is dropped).
    pub(crate) fn lock_all(&self) -> ShardsGuard<'_> {
        ShardsGuard {
            table: self,
            guards: self.shards.iter().map(|s| s.write()).collect(),
            single: None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.load(Ordering::Relaxed)
    }

    /// Key bytes plus resident value bytes.
    pub(crate) fn mem_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Items whose value is evicted.
    pub(crate) fn evicted(&self) -> usize {
        self.evicted.load(Ordering::Relaxed)
    }

    fn account(&self, old: Option<(&[u8], &StoredValue)>, new: Option<(&[u8], &StoredValue)>) {
        if let Some((k, v)) = old {
            self.bytes.fetch_sub(size(k, v), Ordering::Relaxed);
            self.items.fetch_sub(1, Ordering::Relaxed);
            if v.value.is_none() {
                self.evicted.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some((k, v)) = new {
            self.bytes.fetch_add(size(k, v), Ordering::Relaxed);
            self.items.fetch_add(1, Ordering::Relaxed);
            if v.value.is_none() {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Evicts values of clean items (`by_seqno <= clean_upto`) from shard
    /// `shard` until about `target` bytes are freed; returns (items, bytes).
    pub(crate) fn evict_clean(
        &self,
        shard: usize,
        clean_upto: u64,
        target: usize,
    ) -> (usize, usize) {
        let mut guard = self.shards[shard % SHARDS].write();
        let (mut n, mut freed) = (0, 0);
        for e in guard.iter_mut() {
            if freed >= target {
                break;
            }
            if e.value.meta.by_seqno <= clean_upto {
                if let Some(v) = e.value.value.take() {
                    freed += v.len();
                    n += 1;
                }
            }
        }
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        self.evicted.fetch_add(n, Ordering::Relaxed);
        (n, freed)
    }

    /// Number of shards (for the pager's rotation).
    pub(crate) fn shards(&self) -> usize {
        SHARDS
    }
}

impl ShardsGuard<'_> {
    fn shard(&mut self, key: &[u8]) -> (&mut Shard, u64) {
        let hash = match self.single {
            Some((_, hash)) => {
                debug_assert_eq!(hash, self.table.hash(key), "slot locked for another key");
                hash
            }
            None => self.table.hash(key),
        };
        self.shard_of(hash)
    }

    fn shard_of(&mut self, hash: u64) -> (&mut Shard, u64) {
        let pos = match self.single {
            Some((idx, _)) => {
                debug_assert_eq!(idx, HashTable::shard_index(hash));
                0
            }
            None => HashTable::shard_index(hash),
        };
        (&mut self.guards[pos], hash)
    }

    /// The hash of `key` and its current entry: the table's key buffer and
    /// value, if present.
    pub(crate) fn current_entry(&mut self, key: &[u8]) -> (u64, Option<(&Bytes, &StoredValue)>) {
        let (shard, hash) = self.shard(key);
        let found = shard
            .find(hash, |e| same_key(e, key))
            .map(|e| (&e.key, &e.value));
        (hash, found)
    }

    /// Sets `key` to `value`, inserting it if absent.
    pub(crate) fn put(&mut self, key: &Bytes, value: StoredValue) {
        let (_, hash) = self.shard(key);
        self.put_ref(
            &KeyRef {
                hash,
                key: key.clone(),
            },
            value,
        );
    }

    /// [`put`](Self::put) with the hash known.
    pub(crate) fn put_ref(&mut self, key: &KeyRef, value: StoredValue) {
        let table = self.table;
        let (shard, hash) = self.shard_of(key.hash);
        let entry = shard.entry(hash, |e| same_key(e, &key.key), |e| e.hash);
        match entry {
            TableEntry::Occupied(mut o) => {
                table.account(Some((&key.key, &o.get().value)), Some((&key.key, &value)));
                o.get_mut().value = value;
            }
            TableEntry::Vacant(v) => {
                table.account(None, Some((&key.key, &value)));
                v.insert(Entry {
                    hash,
                    key: key.key.clone(),
                    value,
                });
            }
        }
    }

    /// Removes `key` completely; returns its value if it was present.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<StoredValue> {
        let (_, hash) = self.shard(key);
        self.remove_hashed(hash, key)
    }

    /// [`remove`](Self::remove) with the hash known.
    pub(crate) fn remove_hashed(&mut self, hash: u64, key: &[u8]) -> Option<StoredValue> {
        let table = self.table;
        let (shard, hash) = self.shard_of(hash);
        match shard.find_entry(hash, |e| same_key(e, key)) {
            Ok(o) => {
                let (e, _) = o.remove();
                table.account(Some((&e.key, &e.value)), None);
                Some(e.value)
            }
            Err(_) => None,
        }
    }

    /// Loads `key`'s bucket and entry into the cache without changing
    /// anything (independent touches of many keys overlap their misses).
    pub(crate) fn touch(&mut self, hash: u64, key: &[u8]) {
        let (shard, hash) = self.shard_of(hash);
        std::hint::black_box(
            shard
                .find(hash, |e| same_key(e, key))
                .map(|e| e.value.meta.by_seqno),
        );
    }

    /// Removes every entry of the locked shards.
    pub(crate) fn clear(&mut self) {
        let table = self.table;
        for shard in &mut self.guards {
            for e in shard.drain() {
                table.account(Some((&e.key, &e.value)), None);
            }
        }
    }

    /// Puts a value read back from disk into an evicted entry, if the entry
    /// still holds the same version (`by_seqno`) and is still evicted.
    pub(crate) fn fill(&mut self, key: &[u8], by_seqno: u64, value: Bytes) {
        let table = self.table;
        let (shard, hash) = self.shard(key);
        if let Some(e) = shard.find_mut(hash, |e| same_key(e, key)) {
            if e.value.value.is_none() && e.value.meta.by_seqno == by_seqno {
                table.bytes.fetch_add(value.len(), Ordering::Relaxed);
                table.evicted.fetch_sub(1, Ordering::Relaxed);
                e.value.value = Some(value);
            }
        }
    }

    /// Evicts `key`'s value if it is clean (`by_seqno <= clean_upto`).
    /// Returns `Some(true)` if evicted now or already, `Some(false)` if dirty,
    /// `None` if absent.
    pub(crate) fn evict(&mut self, key: &[u8], clean_upto: u64) -> Option<bool> {
        let table = self.table;
        let (shard, hash) = self.shard(key);
        let e = shard.find_mut(hash, |e| same_key(e, key))?;
        if e.value.meta.by_seqno > clean_upto {
            return Some(false);
        }
        if let Some(v) = e.value.value.take() {
            table.bytes.fetch_sub(v.len(), Ordering::Relaxed);
            table.evicted.fetch_add(1, Ordering::Relaxed);
        }
        Some(true)
    }
}
