//! The table one hash-table shard holds: open addressing over cache-line
//! buckets, so a lookup costs one cache miss for its bucket and one for the
//! record it finds.
//!
//! A general-purpose table (hashbrown, which this replaced) keeps its
//! one-byte tags and its entries in two arrays, so a lookup of a key in a
//! table larger than the cache waits three times in a row: for the tag
//! group, for the entry the tag points at (the record's address), and for
//! the record (to compare the key). Here each 64-byte bucket holds three
//! slots side by side: a 32-bit tag per slot (the low half of the key's
//! hash) and the slot's [`Record`]. The tag settles nearly every mismatch
//! without touching a record, and the bucket holds the record's address.
//!
//! **Probing, with overflow counts** (as Folly's F14 tables do). A key's
//! home bucket is its tag masked by the bucket count. An insert takes the
//! first free slot from its home on, and adds one to the *overflow count*
//! of every full bucket it passes; a removal takes those ones back. So a
//! bucket's count is the number of keys stored past it whose probe path
//! crosses it, and a lookup stops at the first bucket whose count is 0:
//! no key it looks for can lie beyond. Unlike tombstones, which only a
//! rebuild clears, the counts go back down as keys go, so a table that
//! churns keys keeps short probes. No record is ever moved but by growth.
//!
//! **Growth.** When live records would pass [`MAX_LOAD_PERCENT`] of all
//! slots, the table doubles, rebuilt from its tags alone (no record is
//! read). At that load a lookup of an absent key reads about 2.4 buckets on
//! average (a simulation of 16,384 buckets), fewer below it; a present key
//! is found in its home bucket about 95% of the time.
//!
//! Every probe loop is bounded by the bucket count: a table whose counts
//! had gone wrong would end a lookup there rather than spin under its
//! shard's lock.

use crate::item::Record;

/// Slots per bucket: three 16-byte records and their tags fill a cache line.
const SLOTS: usize = 3;
/// Live records kept at or under this share of all slots.
const MAX_LOAD_PERCENT: usize = 75;
/// The smallest table allocated.
const MIN_BUCKETS: usize = 8;

/// One cache line: the tags, the overflow count and the records.
#[repr(C, align(64))]
#[derive(Default)]
struct Bucket {
    tags: [u32; SLOTS],
    /// Keys stored past this bucket whose probe path crosses it.
    overflow: u32,
    recs: [Option<Record>; SLOTS],
}

const _: () = assert!(std::mem::size_of::<Bucket>() == 64);

/// The tag of a hash: its low 32 bits (the shard is picked by bits 32 and
/// up, so these stay spread within a shard).
fn tag_of(hash: u64) -> u32 {
    hash as u32
}

/// An open-addressing table of records keyed by their key (see the module
/// documentation).
#[derive(Default)]
pub(crate) struct BucketTable {
    buckets: Box<[Bucket]>,
    /// Live records.
    live: usize,
}

impl std::fmt::Debug for BucketTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketTable")
            .field("buckets", &self.buckets.len())
            .field("live", &self.live)
            .finish()
    }
}

impl BucketTable {
    /// Live records.
    #[cfg(all(test, not(any(loom, feature = "loom"))))]
    fn len(&self) -> usize {
        self.live
    }

    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    /// Where `key` (whose hash is `hash`) is: bucket and slot.
    fn position(&self, hash: u64, key: &[u8]) -> Option<(usize, usize)> {
        let tag = tag_of(hash);
        let mask = self.mask();
        let mut b = tag as usize & mask;
        for _ in 0..self.buckets.len() {
            let bucket = &self.buckets[b];
            for i in 0..SLOTS {
                if bucket.tags[i] == tag {
                    if let Some(rec) = &bucket.recs[i] {
                        if rec.key() == key {
                            return Some((b, i));
                        }
                    }
                }
            }
            if bucket.overflow == 0 {
                return None;
            }
            b = (b + 1) & mask;
        }
        None
    }

    /// The record of `key`, whose hash is `hash`.
    pub(crate) fn find(&self, hash: u64, key: &[u8]) -> Option<&Record> {
        let (b, i) = self.position(hash, key)?;
        self.buckets[b].recs[i].as_ref()
    }

    /// The record of `key`, for replacing in place.
    pub(crate) fn find_mut(&mut self, hash: u64, key: &[u8]) -> Option<&mut Record> {
        let (b, i) = self.position(hash, key)?;
        self.buckets[b].recs[i].as_mut()
    }

    /// Stores `rec` (whose key hashes to `hash`), returning the record it
    /// replaced, if its key was present.
    pub(crate) fn upsert(&mut self, hash: u64, rec: Record) -> Option<Record> {
        if let Some((b, i)) = self.position(hash, rec.key()) {
            return self.buckets[b].recs[i].replace(rec);
        }
        if (self.live + 1) * 100 > self.buckets.len() * SLOTS * MAX_LOAD_PERCENT {
            self.grow();
        }
        let mut rec = rec;
        // No free slot on the whole table cannot happen under the load
        // limit; if it did, a table twice the size has room.
        while let Err(back) = self.place(tag_of(hash), rec) {
            rec = back;
            self.grow();
        }
        self.live += 1;
        None
    }

    /// Puts a record whose key is absent into the first free slot from its
    /// tag's home bucket on, counting the full buckets it passes; gives it
    /// back if no bucket has a free slot.
    fn place(&mut self, tag: u32, rec: Record) -> Result<(), Record> {
        let mask = self.mask();
        let home = tag as usize & mask;
        let mut b = home;
        for _ in 0..self.buckets.len() {
            let bucket = &mut self.buckets[b];
            if let Some(i) = bucket.recs.iter().position(Option::is_none) {
                bucket.tags[i] = tag;
                bucket.recs[i] = Some(rec);
                // The full buckets passed: home up to here.
                let mut x = home;
                while x != b {
                    self.buckets[x].overflow += 1;
                    x = (x + 1) & mask;
                }
                return Ok(());
            }
            b = (b + 1) & mask;
        }
        Err(rec)
    }

    /// Builds the table again at twice its size (or the smallest size),
    /// from its tags alone.
    fn grow(&mut self) {
        let buckets = (self.buckets.len() * 2).max(MIN_BUCKETS);
        let old = std::mem::replace(
            &mut self.buckets,
            (0..buckets).map(|_| Bucket::default()).collect(),
        );
        for mut bucket in old.into_vec() {
            for i in 0..SLOTS {
                if let Some(rec) = bucket.recs[i].take() {
                    // A table of twice as many slots as records has room.
                    if self.place(bucket.tags[i], rec).is_err() {
                        unreachable!("a doubled table has a free slot for every record");
                    }
                }
            }
        }
    }

    /// Removes `key` (whose hash is `hash`); returns its record.
    pub(crate) fn remove(&mut self, hash: u64, key: &[u8]) -> Option<Record> {
        let (b, i) = self.position(hash, key)?;
        let rec = self.buckets[b].recs[i].take();
        // Takes back the counts its insert added: home up to its bucket.
        let mask = self.mask();
        let mut x = tag_of(hash) as usize & mask;
        while x != b {
            let bucket = &mut self.buckets[x];
            bucket.overflow = bucket.overflow.saturating_sub(1);
            x = (x + 1) & mask;
        }
        self.live -= 1;
        rec
    }

    /// Every record, in bucket order (stable while no record is inserted).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Record> {
        self.buckets.iter().flat_map(|b| b.recs.iter().flatten())
    }

    /// Every record, mutable, in the order of [`iter`](Self::iter).
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Record> {
        self.buckets
            .iter_mut()
            .flat_map(|b| b.recs.iter_mut().flatten())
    }

    /// Removes and returns every record; the table keeps its size.
    pub(crate) fn take_all(&mut self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.live);
        for bucket in self.buckets.iter_mut() {
            out.extend(bucket.recs.iter_mut().filter_map(Option::take));
            bucket.overflow = 0;
        }
        self.live = 0;
        out
    }

    /// Checks every count against the records stored (tests only): each
    /// bucket's overflow is the number of records stored past it whose
    /// home is at or before it, and `live` the number of records.
    #[cfg(all(test, not(any(loom, feature = "loom"))))]
    fn check_counts(&self) {
        let n = self.buckets.len();
        let mask = self.mask();
        let mut expected = vec![0u32; n];
        let mut live = 0;
        for (b, bucket) in self.buckets.iter().enumerate() {
            for i in 0..SLOTS {
                if bucket.recs[i].is_some() {
                    live += 1;
                    let mut x = bucket.tags[i] as usize & mask;
                    while x != b {
                        expected[x] += 1;
                        x = (x + 1) & mask;
                    }
                }
            }
        }
        assert_eq!(live, self.live, "live count");
        let counts: Vec<u32> = self.buckets.iter().map(|b| b.overflow).collect();
        assert_eq!(counts, expected, "overflow counts");
    }
}

#[cfg(all(test, not(any(loom, feature = "loom"))))]
mod tests {
    use super::*;
    use crate::item::{key_hash, ItemMeta};
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn rec(key: &[u8], seqno: u64) -> Record {
        let meta = ItemMeta {
            by_seqno: seqno,
            ..ItemMeta::default()
        };
        Record::new(&meta, key, b"v")
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u16),
        Remove(u16),
        TakeAll,
    }

    /// Puts and removals of 600 keys, so about half the removals find
    /// their key and the table churns; a rare clear.
    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            60 => any::<u16>().prop_map(|k| Op::Put(k % 600)),
            40 => any::<u16>().prop_map(|k| Op::Remove(k % 600)),
            1 => Just(Op::TakeAll),
        ]
    }

    /// A hash whose low bits collide a lot (only 16 home values), so probe
    /// paths run long and cross each other.
    fn weak_hash(key: &[u8]) -> u64 {
        key_hash(key) & 0xFFFF_FFFF_0000_000F
    }

    fn check_against_model(ops: &[Op], hash: fn(&[u8]) -> u64) {
        let mut t = BucketTable::default();
        let mut model: HashMap<Vec<u8>, u64> = HashMap::new();
        for (n, op) in ops.iter().enumerate() {
            let seqno = n as u64 + 1;
            match op {
                Op::Put(k) => {
                    let key = format!("key-{k}").into_bytes();
                    let old = t.upsert(hash(&key), rec(&key, seqno));
                    assert_eq!(
                        old.map(|r| r.by_seqno()),
                        model.insert(key, seqno),
                        "upsert's replaced record"
                    );
                }
                Op::Remove(k) => {
                    let key = format!("key-{k}").into_bytes();
                    assert_eq!(
                        t.remove(hash(&key), &key).map(|r| r.by_seqno()),
                        model.remove(&key),
                        "removed record"
                    );
                }
                Op::TakeAll => {
                    let mut taken: Vec<u64> = t.take_all().iter().map(|r| r.by_seqno()).collect();
                    let mut expected: Vec<u64> = model.drain().map(|(_, s)| s).collect();
                    taken.sort_unstable();
                    expected.sort_unstable();
                    assert_eq!(taken, expected);
                }
            }
            assert_eq!(t.len(), model.len());
            assert!(t.live * 100 <= t.buckets.len() * SLOTS * MAX_LOAD_PERCENT);
            t.check_counts();
        }
        for k in 0..600u16 {
            let key = format!("key-{k}").into_bytes();
            assert_eq!(
                t.find(hash(&key), &key).map(|r| r.by_seqno()),
                model.get(&key).copied(),
                "find {k}"
            );
        }
        let mut all: Vec<u64> = t.iter().map(|r| r.by_seqno()).collect();
        let mut expected: Vec<u64> = model.values().copied().collect();
        all.sort_unstable();
        expected.sort_unstable();
        assert_eq!(all, expected, "iter");
        assert_eq!(t.iter_mut().count(), model.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any mix of inserts, replacements, removals and clears gives what a
        /// `HashMap` gives, with the engine's hash and with one whose
        /// buckets collide.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec(op(), 1..3000)) {
            check_against_model(&ops, key_hash);
            check_against_model(&ops, weak_hash);
        }
    }

    #[test]
    fn grows_and_finds_every_key_after_many_removals() {
        let mut t = BucketTable::default();
        for round in 0..4u64 {
            for k in 0..20_000u64 {
                let key = format!("k{k}").into_bytes();
                t.upsert(key_hash(&key), rec(&key, round * 100_000 + k));
            }
            for k in (0..20_000u64).filter(|k| k % 3 != 0) {
                let key = format!("k{k}").into_bytes();
                assert!(t.remove(key_hash(&key), &key).is_some());
            }
            for k in 0..20_000u64 {
                let key = format!("k{k}").into_bytes();
                assert_eq!(t.find(key_hash(&key), &key).is_some(), k % 3 == 0);
            }
        }
        assert_eq!(t.len(), 6_667);
        t.check_counts();
        // Removals and re-inserts of the same keys reuse slots instead of
        // doubling the table every round.
        assert!(t.buckets.len() <= 16_384, "{} buckets", t.buckets.len());
    }

    /// A table that churns keys keeps no trace of the ones gone: once every
    /// key is removed, no bucket counts a key past it, so a lookup of any
    /// absent key reads its home bucket only. (Tombstones, which an earlier
    /// version of this table left, only went at a rebuild: under churn a
    /// lookup of an absent key read about four buckets.)
    #[test]
    fn removals_take_back_what_their_inserts_counted() {
        let mut t = BucketTable::default();
        let key = |k: u64| format!("churn-{k}").into_bytes();
        // A FIFO of 5,000 live keys through 200,000 distinct ones.
        for k in 0..200_000u64 {
            t.upsert(key_hash(&key(k)), rec(&key(k), k));
            if k >= 5_000 {
                assert!(t
                    .remove(key_hash(&key(k - 5_000)), &key(k - 5_000))
                    .is_some());
            }
        }
        t.check_counts();
        for k in 195_000..200_000u64 {
            assert!(t.remove(key_hash(&key(k)), &key(k)).is_some());
        }
        t.check_counts();
        assert!(t.buckets.iter().all(|b| b.overflow == 0));
        assert_eq!(t.iter().count(), 0);
        // The table grew for its peak live count only, not for churn.
        assert!(t.buckets.len() <= 4_096, "{} buckets", t.buckets.len());
    }
}
