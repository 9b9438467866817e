//! A partition's concurrent hash table: key → value and metadata.
//!
//! Sharded: each shard is a `RwLock` around a [`BucketTable`] (cache-line
//! buckets: a lookup waits for its bucket and its record, nothing else). A
//! key's hash is computed once and picks both the shard (bits 32 and up) and
//! the bucket and tag (the low 32 bits), so a lookup or an update hashes the
//! key a single time. Readers take a shard
//! read lock; writers are serialised per partition by the caller and take the
//! shard write lock only for the in-place update. A revert takes every shard's
//! write lock at once ([`HashTable::lock_all`]) so readers never see it half
//! done.
//!
//! Each slot is a 32-bit tag and a [`Record`] (one shared allocation with
//! metadata, key and value; the checkpoint holds the same record). A value
//! may be *evicted*: the slot's record is swapped for a
//! key-and-metadata copy, and the bytes are read back from disk on access. The table keeps item, byte and eviction
//! counts per shard (changed under the shard's write lock only, summed when
//! read); it never touches checkpoints or disk.

use crate::buckets::BucketTable;
use crate::item::{key_hash, ItemMeta, Record};
use crate::sync::{AtomicU64, AtomicUsize, Ordering, RwLock, RwLockWriteGuard};

const SHARDS: usize = 16;

/// What one [`HashTable::evict_clean`] call did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EvictPass {
    /// Values evicted.
    pub(crate) items: usize,
    /// Bytes they held.
    pub(crate) bytes: usize,
    /// Entries looked at.
    pub(crate) scanned: usize,
    /// Entries looked at and left.
    pub(crate) kept: usize,
    /// Whether it reached the shard's end.
    pub(crate) finished: bool,
}

pub(crate) struct HashTable {
    shards: Box<[RwLock<Shard>]>,
    /// Per shard, its counts (`counts[i]` is shard `i`'s).
    counts: Box<[Counts]>,
}

/// One shard's item, byte and eviction counts. Changed only under the
/// shard's write lock, so a change is a plain load and store (no locked
/// instruction: two of those per write were a measurable part of a set);
/// read without the lock, summed over the shards.
#[derive(Default)]
struct Counts {
    items: AtomicUsize,
    bytes: AtomicUsize,
    evicted: AtomicUsize,
    /// Value bytes of the evicted entries (on disk only).
    evicted_bytes: AtomicUsize,
}

impl Counts {
    /// Adds `by` to `count` (wrapping: a record's bytes are taken off as
    /// they were added). The caller holds the shard's write lock.
    fn add(count: &AtomicUsize, by: isize) {
        count.store(
            count.load(Ordering::Relaxed).wrapping_add_signed(by),
            Ordering::Relaxed,
        );
    }

    /// Takes `old` off and puts `new` on.
    fn account(&self, old: Option<&Record>, new: Option<&Record>) {
        // Per record: an item, its resident bytes, and, if evicted, one
        // evicted item and its value's bytes.
        let of = |r: Option<&Record>| {
            r.map_or((0, 0, 0, 0), |r| {
                let evicted = r.is_evicted();
                let evicted_bytes = if evicted { r.value_len() as isize } else { 0 };
                (
                    1,
                    r.resident_bytes() as isize,
                    isize::from(evicted),
                    evicted_bytes,
                )
            })
        };
        let ((oi, ob, oe, oeb), (ni, nb, ne, neb)) = (of(old), of(new));
        for (count, by) in [
            (&self.items, ni - oi),
            (&self.bytes, nb - ob),
            (&self.evicted, ne - oe),
            (&self.evicted_bytes, neb - oeb),
        ] {
            if by != 0 {
                Self::add(count, by);
            }
        }
    }

    /// Counts `rec`'s value as evicted (the caller evicts it).
    fn evict(&self, rec: &Record) {
        Self::add(&self.bytes, -(rec.value_len() as isize));
        Self::add(&self.evicted, 1);
        Self::add(&self.evicted_bytes, rec.value_len() as isize);
    }
}

type Shard = BucketTable;

/// Write access to shards; positioned per key with a precomputed hash.
pub(crate) struct ShardsGuard<'a> {
    table: &'a HashTable,
    held: Held<'a>,
}

/// The shard locks a [`ShardsGuard`] holds.
enum Held<'a> {
    /// One shard (index, and the hash of the key it was locked for): every
    /// single-key write. No allocation.
    One(RwLockWriteGuard<'a, Shard>, usize, u64),
    /// Every shard, in index order.
    All(Vec<RwLockWriteGuard<'a, Shard>>),
}

impl HashTable {
    pub(crate) fn new() -> Self {
        HashTable {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(BucketTable::default()))
                .collect(),
            counts: (0..SHARDS).map(|_| Counts::default()).collect(),
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        key_hash(key)
    }

    /// The shard of a hash: bits 32 and up, clear of the low 32 bits a
    /// shard's table uses for its buckets and tags (a shard taken from the
    /// tag's bits would leave every key of a shard with the same few bits,
    /// and tags would tell fewer keys apart).
    fn shard_index(hash: u64) -> usize {
        (hash >> 32) as usize % SHARDS
    }

    /// The record of `key`, if present.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Record> {
        let hash = self.hash(key);
        let shard = self.shards[Self::shard_index(hash)].read();
        shard.find(hash, key).cloned()
    }

    /// Locks `key`'s shard for writing.
    pub(crate) fn slot(&self, key: &[u8]) -> ShardsGuard<'_> {
        let hash = self.hash(key);
        let idx = Self::shard_index(hash);
        ShardsGuard {
            table: self,
            held: Held::One(self.shards[idx].write(), idx, hash),
        }
    }

    /// Locks every shard for writing (readers wait until it is dropped).
    pub(crate) fn lock_all(&self) -> ShardsGuard<'_> {
        ShardsGuard {
            table: self,
            held: Held::All(self.shards.iter().map(|s| s.write()).collect()),
        }
    }

    /// The counts of the shard of a key whose hash is `hash`.
    fn counts_of(&self, hash: u64) -> &Counts {
        &self.counts[Self::shard_index(hash)]
    }

    /// A count summed over the shards.
    fn total(&self, count: impl Fn(&Counts) -> &AtomicUsize) -> usize {
        self.counts
            .iter()
            .map(|c| count(c).load(Ordering::Relaxed))
            .fold(0, usize::wrapping_add)
    }

    pub(crate) fn len(&self) -> usize {
        self.total(|c| &c.items)
    }

    /// Key bytes plus resident value bytes.
    pub(crate) fn mem_bytes(&self) -> usize {
        self.total(|c| &c.bytes)
    }

    /// Items whose value is evicted.
    pub(crate) fn evicted(&self) -> usize {
        self.total(|c| &c.evicted)
    }

    /// Value bytes of the items whose value is evicted.
    pub(crate) fn evicted_bytes(&self) -> usize {
        self.total(|c| &c.evicted_bytes)
    }

    /// Evicts values of clean items (`by_seqno <=` the partition's
    /// `persisted` seqno) from shard `shard`, starting at its `skip`th
    /// entry, until about `target` bytes are freed or `max_scanned` entries
    /// were looked at (evicted, or left: keys with no value, dirty or
    /// already evicted ones). `persisted` is read under the shard lock: a partition
    /// reset, which holds every shard while it stores 0 there, cannot slip
    /// in between and make it name seqnos no longer on disk.
    pub(crate) fn evict_clean(
        &self,
        shard: usize,
        persisted: &AtomicU64,
        target: usize,
        skip: usize,
        max_scanned: usize,
    ) -> EvictPass {
        let idx = shard % SHARDS;
        let mut guard = self.shards[idx].write();
        let clean_upto = persisted.load(Ordering::Acquire);
        let mut pass = EvictPass {
            items: 0,
            bytes: 0,
            scanned: 0,
            kept: 0,
            finished: true,
        };
        for rec in guard.iter_mut().skip(skip) {
            if pass.bytes >= target || pass.scanned >= max_scanned {
                pass.finished = false;
                break;
            }
            pass.scanned += 1;
            // An empty value frees nothing and would cost a disk read.
            if rec.has_value_to_evict() && rec.by_seqno() <= clean_upto {
                pass.bytes += rec.value_len();
                pass.items += 1;
                *rec = rec.evicted();
            } else {
                pass.kept += 1;
            }
        }
        let counts = &self.counts[idx];
        Counts::add(&counts.bytes, -(pass.bytes as isize));
        Counts::add(&counts.evicted, pass.items as isize);
        Counts::add(&counts.evicted_bytes, pass.bytes as isize);
        pass
    }

    /// Keys of shard `shard` expired at `now` (seconds since the epoch),
    /// with their CAS, read under the shard's read lock, from its `skip`th
    /// entry on. At most `max` of them (the caller deletes at most that
    /// many, and the next pass finds the rest), after looking at
    /// `max_scanned` entries at most; returns them and the entries looked
    /// at (fewer than `max_scanned` and `max` found: the shard's end).
    pub(crate) fn expired(
        &self,
        shard: usize,
        now: u32,
        (skip, max, max_scanned): (usize, usize, usize),
    ) -> (Vec<(Vec<u8>, u64)>, usize) {
        let guard = self.shards[shard % SHARDS].read();
        let mut found = Vec::new();
        let mut scanned = 0;
        for rec in guard.iter().skip(skip) {
            if found.len() >= max || scanned >= max_scanned {
                break;
            }
            scanned += 1;
            let m = rec.meta();
            if m.is_expired(now) {
                found.push((rec.key().to_vec(), m.cas));
            }
        }
        (found, scanned)
    }

    /// Number of shards (for the pager's rotation).
    pub(crate) fn shards(&self) -> usize {
        SHARDS
    }
}

impl ShardsGuard<'_> {
    fn shard(&mut self, key: &[u8]) -> (&mut Shard, u64) {
        let hash = match self.held {
            Held::One(_, _, hash) => {
                debug_assert_eq!(hash, self.table.hash(key), "slot locked for another key");
                hash
            }
            Held::All(_) => self.table.hash(key),
        };
        self.shard_of(hash)
    }

    fn shard_of(&mut self, hash: u64) -> (&mut Shard, u64) {
        match &mut self.held {
            Held::One(guard, idx, _) => {
                debug_assert_eq!(*idx, HashTable::shard_index(hash));
                (guard, hash)
            }
            Held::All(guards) => (&mut guards[HashTable::shard_index(hash)], hash),
        }
    }

    /// The hash of `key` and its current record, if present.
    pub(crate) fn current_entry(&mut self, key: &[u8]) -> (u64, Option<&Record>) {
        let (shard, hash) = self.shard(key);
        (hash, shard.find(hash, key))
    }

    /// Stores `rec` under its key, replacing the key's current record.
    pub(crate) fn put(&mut self, rec: Record) {
        let (_, hash) = self.shard(rec.key());
        self.put_hashed(hash, rec);
    }

    /// [`put`](Self::put) with the key's hash known.
    pub(crate) fn put_hashed(&mut self, hash: u64, rec: Record) {
        let counts = self.table.counts_of(hash);
        let (shard, hash) = self.shard_of(hash);
        counts.account(None, Some(&rec));
        let old = shard.upsert(hash, rec);
        counts.account(old.as_ref(), None);
    }

    /// Removes `key` (whose hash is `hash`) completely; returns its record
    /// if it was present.
    pub(crate) fn remove_hashed(&mut self, hash: u64, key: &[u8]) -> Option<Record> {
        let counts = self.table.counts_of(hash);
        let (shard, hash) = self.shard_of(hash);
        let old = shard.remove(hash, key)?;
        counts.account(Some(&old), None);
        Some(old)
    }

    /// Loads `key`'s bucket and record into the cache without changing
    /// anything (independent touches of many keys overlap their misses).
    pub(crate) fn touch(&mut self, hash: u64, key: &[u8]) {
        let (shard, hash) = self.shard_of(hash);
        std::hint::black_box(shard.find(hash, key).map(Record::by_seqno));
    }

    /// Removes every entry of the locked shards; returns them, for the
    /// caller to drop once it has released the locks (a partition's records
    /// can be millions).
    pub(crate) fn clear(&mut self) -> Vec<Vec<Record>> {
        let table = self.table;
        let shards: Vec<(usize, &mut RwLockWriteGuard<'_, Shard>)> = match &mut self.held {
            Held::One(guard, idx, _) => vec![(*idx, guard)],
            Held::All(guards) => guards.iter_mut().enumerate().collect(),
        };
        let mut taken = Vec::with_capacity(shards.len());
        for (idx, shard) in shards {
            let recs = shard.take_all();
            for rec in &recs {
                table.counts[idx].account(Some(rec), None);
            }
            taken.push(recs);
        }
        taken
    }

    /// Puts a value read back from disk into an evicted entry, if the entry
    /// still holds the same version (all of `meta`: a seqno alone can repeat
    /// after a partition reset) and is still evicted; returns the resident
    /// record.
    pub(crate) fn fill(&mut self, key: &[u8], meta: &ItemMeta, value: &[u8]) -> Option<Record> {
        let table = self.table;
        let (shard, hash) = self.shard(key);
        let counts = table.counts_of(hash);
        let rec = shard.find_mut(hash, key)?;
        if rec.is_evicted() && rec.meta() == *meta {
            Counts::add(&counts.bytes, value.len() as isize);
            Counts::add(&counts.evicted, -1);
            Counts::add(&counts.evicted_bytes, -(rec.value_len() as isize));
            *rec = rec.with_value(value);
            return Some(rec.clone());
        }
        None
    }

    /// Evicts `key`'s value if it is clean (`by_seqno <= clean_upto`);
    /// `None` if the key is absent, or expired at `now` (seconds since the
    /// epoch): it reads as absent.
    pub(crate) fn evict(&mut self, key: &[u8], clean_upto: u64, now: u32) -> Option<Eviction> {
        let table = self.table;
        let (shard, hash) = self.shard(key);
        let counts = table.counts_of(hash);
        let rec = shard.find_mut(hash, key)?;
        if rec.meta().is_expired(now) {
            return None;
        }
        if rec.by_seqno() > clean_upto {
            return Some(Eviction::Dirty);
        }
        // An empty value frees nothing and would cost a disk read (as in
        // `evict_clean`).
        if !rec.has_value_to_evict() {
            return Some(Eviction::Already);
        }
        counts.evict(rec);
        *rec = rec.evicted();
        Some(Eviction::Now)
    }
}

/// What [`ShardsGuard::evict`] did with a key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Eviction {
    /// Evicted by this call.
    Now,
    /// Nothing to do: already on disk only, or empty.
    Already,
    /// Not persisted yet (or inside an online-update window): kept.
    Dirty,
}

#[cfg(all(test, not(any(loom, feature = "loom"))))]
mod tests {
    use super::*;

    fn meta(seqno: u64, cas: u64) -> ItemMeta {
        ItemMeta {
            by_seqno: seqno,
            cas,
            rev_seqno: 1,
            flags: 0,
            expiry: 0,
        }
    }

    /// The counts are changed with a plain load and store under each
    /// shard's write lock: writers of different keys, on threads of their
    /// own, and evictions of whole shards meanwhile, lose no change.
    #[test]
    fn counts_stay_exact_under_concurrent_writers_and_evictions() {
        let t = HashTable::new();
        let key = |th: usize, i: usize| format!("t{th}-{i}").into_bytes();
        let writing = std::sync::atomic::AtomicUsize::new(4);
        std::thread::scope(|scope| {
            for th in 0..4 {
                let (t, writing) = (&t, &writing);
                scope.spawn(move || {
                    for i in 0..5_000 {
                        let k = key(th, i);
                        t.slot(&k).put(Record::new(&meta(1, 1), &k, b"0123456789"));
                        if i % 2 == 1 {
                            let prev = key(th, i - 1);
                            let hash = t.hash(&prev);
                            assert!(t.slot(&prev).remove_hashed(hash, &prev).is_some());
                        }
                    }
                    writing.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                });
            }
            // Evicting values of clean items (every seqno is 1) for as long
            // as the writers run, then every shard once more: at the end
            // every value is evicted.
            let (t, writing) = (&t, &writing);
            scope.spawn(move || {
                let mut round = 0;
                while writing.load(std::sync::atomic::Ordering::Acquire) > 0 {
                    t.evict_clean(round % SHARDS, &AtomicU64::new(1), 1 << 20, 0, 1 << 20);
                    round += 1;
                }
                for shard in 0..SHARDS {
                    t.evict_clean(shard, &AtomicU64::new(1), 1 << 20, 0, 1 << 20);
                }
            });
        });
        let mut items = 0;
        let mut bytes = 0;
        let mut evicted = 0;
        let mut evicted_bytes = 0;
        for shard in t.shards.iter() {
            for rec in shard.read().iter() {
                items += 1;
                bytes += rec.resident_bytes();
                evicted += usize::from(rec.is_evicted());
                if rec.is_evicted() {
                    evicted_bytes += rec.value_len();
                }
            }
        }
        assert_eq!(items, 4 * 2_500);
        assert_eq!(evicted, items, "every value evicted at the end");
        assert_eq!(
            (t.len(), t.mem_bytes(), t.evicted(), t.evicted_bytes()),
            (items, bytes, evicted, evicted_bytes)
        );
    }

    #[test]
    fn fill_takes_only_the_same_version_and_counts_stay_exact() {
        let t = HashTable::new();
        t.slot(b"e").put(Record::new(&meta(6, 101), b"e", b""));
        // An empty value is not worth evicting. (Alone in the table: the
        // key hash is seeded per process, so another key may share its
        // shard.)
        let pass = t.evict_clean(
            HashTable::shard_index(t.hash(b"e")),
            &AtomicU64::new(10),
            100,
            0,
            100,
        );
        assert_eq!((pass.items, pass.kept), (0, 1));
        t.slot(b"k").put(Record::new(&meta(5, 100), b"k", b"value"));
        assert_eq!((t.len(), t.mem_bytes(), t.evicted()), (2, 7, 0));
        assert_eq!(t.slot(b"k").evict(b"k", 4, 0), Some(Eviction::Dirty));
        assert_eq!(t.slot(b"k").evict(b"k", 10, 0), Some(Eviction::Now));
        assert_eq!(t.slot(b"k").evict(b"k", 10, 0), Some(Eviction::Already));
        assert_eq!(t.slot(b"e").evict(b"e", 10, 0), Some(Eviction::Already));
        assert_eq!(t.slot(b"x").evict(b"x", 10, 0), None);
        assert_eq!((t.len(), t.mem_bytes(), t.evicted()), (2, 2, 1));
        assert_eq!(t.evicted_bytes(), 5);
        // Same seqno, other CAS: another history's version (after a
        // partition reset); not filled.
        assert!(t.slot(b"k").fill(b"k", &meta(5, 999), b"other").is_none());
        assert_eq!(t.evicted(), 1);
        let filled = t.slot(b"k").fill(b"k", &meta(5, 100), b"value").unwrap();
        assert_eq!(filled.value(), b"value");
        assert_eq!((t.len(), t.mem_bytes(), t.evicted()), (2, 7, 0));
        assert_eq!(t.evicted_bytes(), 0);
        // Removing an evicted entry un-counts it.
        assert_eq!(t.slot(b"k").evict(b"k", 10, 0), Some(Eviction::Now));
        assert_eq!(t.evicted_bytes(), 5);
        let h = t.hash(b"k");
        assert!(t.slot(b"k").remove_hashed(h, b"k").is_some());
        assert_eq!((t.len(), t.mem_bytes(), t.evicted()), (1, 1, 0));
        assert_eq!(t.evicted_bytes(), 0);
        // So does replacing one with a resident version.
        t.slot(b"k").put(Record::new(&meta(5, 100), b"k", b"value"));
        assert_eq!(t.slot(b"k").evict(b"k", 10, 0), Some(Eviction::Now));
        t.slot(b"k").put(Record::new(&meta(6, 101), b"k", b"new"));
        assert_eq!(
            (t.len(), t.mem_bytes(), t.evicted(), t.evicted_bytes()),
            (2, 5, 0, 0)
        );
    }
}
