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
//! **Probing.** A key's home bucket is its tag masked by the bucket count;
//! a lookup reads buckets from there, one after the other, and stops at the
//! first bucket that has a slot never used since the table was last built
//! (a `used` bit clear). An insert first looks the key up, then takes the
//! first free slot on that path. So every bucket between a key's home and
//! the bucket holding it has every slot used, and a lookup never stops
//! short of its key.
//!
//! **Removal.** A removed slot stays *used* (a tombstone) if its bucket is
//! full of used slots, since some key's probe path may pass through it;
//! in a bucket that already has a never-used slot no path passes through
//! (a lookup would have stopped there), so the slot becomes never-used again.
//!
//! **Growth.** When used slots (live and tombstones) would pass
//! [`MAX_LOAD_PERCENT`] of all slots, the table is rebuilt from its tags
//! alone (no record is read): at twice the size when live records fill more
//! than half of it, at the same size otherwise (clearing tombstones).

use crate::item::Record;

/// Slots per bucket: three 16-byte records and their tags fill a cache line.
const SLOTS: usize = 3;
/// A bucket whose every slot has been used.
const FULL: u32 = (1 << SLOTS) - 1;
/// Used slots (live and tombstones) kept at or under this share of all slots.
const MAX_LOAD_PERCENT: usize = 80;
/// The smallest table allocated.
const MIN_BUCKETS: usize = 8;

/// One cache line: the tags, which slots were used, and the records.
#[repr(C, align(64))]
#[derive(Default)]
struct Bucket {
    tags: [u32; SLOTS],
    /// Bit `i`: slot `i` has held a record since the table was built (a
    /// tombstone when `recs[i]` is `None`).
    used: u32,
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
    /// Used slots: live records and tombstones.
    used: usize,
}

impl std::fmt::Debug for BucketTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketTable")
            .field("buckets", &self.buckets.len())
            .field("live", &self.live)
            .field("used", &self.used)
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
        if self.buckets.is_empty() {
            return None;
        }
        let tag = tag_of(hash);
        let mask = self.mask();
        let mut b = tag as usize & mask;
        loop {
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
            if bucket.used != FULL {
                return None;
            }
            b = (b + 1) & mask;
        }
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
    /// replaced, if its key was present. One walk of the probe path finds
    /// the key or, failing that, the first free slot on it.
    pub(crate) fn upsert(&mut self, hash: u64, rec: Record) -> Option<Record> {
        if (self.used + 1) * 100 > self.buckets.len() * SLOTS * MAX_LOAD_PERCENT {
            self.rebuild();
        }
        let tag = tag_of(hash);
        let mask = self.mask();
        let mut b = tag as usize & mask;
        let mut free = None;
        loop {
            let bucket = &mut self.buckets[b];
            for i in 0..SLOTS {
                match &bucket.recs[i] {
                    Some(r) if bucket.tags[i] == tag && r.key() == rec.key() => {
                        return bucket.recs[i].replace(rec);
                    }
                    Some(_) => {}
                    None => {
                        free.get_or_insert((b, i));
                    }
                }
            }
            if bucket.used != FULL {
                break;
            }
            b = (b + 1) & mask;
        }
        // The last bucket read has a never-used slot, so `free` is set;
        // were it not, building the table again makes room all the same.
        let Some((b, i)) = free else {
            self.rebuild();
            self.place(tag, rec);
            self.live += 1;
            return None;
        };
        let bucket = &mut self.buckets[b];
        if bucket.used & (1 << i) == 0 {
            bucket.used |= 1 << i;
            self.used += 1;
        }
        bucket.tags[i] = tag;
        bucket.recs[i] = Some(rec);
        self.live += 1;
        None
    }

    /// Puts a record into the first never-used slot on its tag's probe
    /// path (while rebuilding: there are no tombstones, nor the same key).
    fn place(&mut self, tag: u32, rec: Record) {
        let mask = self.mask();
        let mut b = tag as usize & mask;
        loop {
            let bucket = &mut self.buckets[b];
            if bucket.used != FULL {
                let i = bucket.used.trailing_ones() as usize;
                bucket.used |= 1 << i;
                bucket.tags[i] = tag;
                bucket.recs[i] = Some(rec);
                self.used += 1;
                return;
            }
            b = (b + 1) & mask;
        }
    }

    /// Builds the table again from its tags: twice as large when live
    /// records fill more than half of its slots, the same size otherwise.
    fn rebuild(&mut self) {
        let slots = self.buckets.len() * SLOTS;
        let buckets = if self.buckets.is_empty() {
            MIN_BUCKETS
        } else if (self.live + 1) * 2 > slots {
            self.buckets.len() * 2
        } else {
            self.buckets.len()
        };
        let old = std::mem::replace(
            &mut self.buckets,
            (0..buckets).map(|_| Bucket::default()).collect(),
        );
        self.used = 0;
        for mut bucket in old.into_vec() {
            for i in 0..SLOTS {
                if let Some(rec) = bucket.recs[i].take() {
                    self.place(bucket.tags[i], rec);
                }
            }
        }
    }

    /// Removes `key` (whose hash is `hash`); returns its record.
    pub(crate) fn remove(&mut self, hash: u64, key: &[u8]) -> Option<Record> {
        let (b, i) = self.position(hash, key)?;
        let bucket = &mut self.buckets[b];
        let rec = bucket.recs[i].take();
        // No probe path passes through a bucket with a never-used slot.
        if bucket.used != FULL {
            bucket.used &= !(1 << i);
            self.used -= 1;
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
            bucket.used = 0;
        }
        self.live = 0;
        self.used = 0;
        out
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

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<u16>().prop_map(|k| Op::Put(k % 600)),
            4 => any::<u16>().prop_map(|k| Op::Remove(k % 600)),
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
            assert!(t.used * 100 <= t.buckets.len() * SLOTS * MAX_LOAD_PERCENT);
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
        // Removals and re-inserts of the same keys reuse slots instead of
        // doubling the table every round.
        assert!(t.buckets.len() <= 16_384, "{} buckets", t.buckets.len());
    }
}
