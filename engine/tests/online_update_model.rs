//! Model-based property test of online updates: random sequences of writes,
//! START / COMPLETE / REVERT, eviction, flush, clean restart and crash-restart
//! across three partitions, checked after every step against a plain map.
//!
//! Invariants: after REVERT a partition equals its state at START (values
//! and every item's metadata: CAS, flags, expiry, revision, seqno); after a
//! clean restart the engine equals the model with its open windows
//! reverted; after a crash it equals the state at the last flush, less what
//! was inside windows then: the flusher is paused, and the test's `Flush`
//! runs its rounds, so what is durable is known exactly. (Before the
//! twenty-third session every crash followed a flush, and checked no more
//! than a clean restart.)

// A loom build swaps the engine's primitives; only its models run then.
#![cfg(not(any(loom, feature = "loom")))]

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use tapkv_engine::{Engine, Error, ItemMeta, PartitionId, WriteOptions};

const PARTITIONS: PartitionId = 3;
const KEYS: usize = 12;

#[derive(Debug, Clone)]
enum Op {
    Set(usize, u8),
    Add(usize, u8),
    Delete(usize),
    CasSet(usize, u8, bool),
    Start(PartitionId),
    Complete(PartitionId),
    Revert(PartitionId),
    Evict(usize),
    Flush,
    Restart,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..KEYS;
    let p = 0..PARTITIONS;
    prop_oneof![
        6 => (k.clone(), any::<u8>()).prop_map(|(k, v)| Op::Set(k, v)),
        2 => (k.clone(), any::<u8>()).prop_map(|(k, v)| Op::Add(k, v)),
        3 => k.clone().prop_map(Op::Delete),
        2 => (k.clone(), any::<u8>(), any::<bool>()).prop_map(|(k, v, ok)| Op::CasSet(k, v, ok)),
        2 => p.clone().prop_map(Op::Start),
        1 => p.clone().prop_map(Op::Complete),
        1 => p.prop_map(Op::Revert),
        1 => k.prop_map(Op::Evict),
        1 => Just(Op::Flush),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
    ]
}

/// A key's value and the metadata the engine gave the write.
type Version = (Vec<u8>, ItemMeta);

struct Model {
    values: BTreeMap<usize, Version>,
    windows: BTreeMap<PartitionId, BTreeMap<usize, Version>>,
    /// What is on disk: the values at the last flush, each partition with
    /// an open window then as it was at that window's START.
    durable: BTreeMap<usize, Version>,
}

impl Model {
    /// A flush: everything outside open windows reaches disk (a window's
    /// START is the flusher's barrier in its partition).
    fn flushed(&mut self, part: &impl Fn(usize) -> PartitionId) {
        let mut durable: BTreeMap<usize, Version> = self
            .values
            .iter()
            .filter(|(k, _)| !self.windows.contains_key(&part(**k)))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for snapshot in self.windows.values() {
            durable.extend(snapshot.iter().map(|(k, v)| (*k, v.clone())));
        }
        self.durable = durable;
    }

    fn revert(&mut self, p: PartitionId, part: &impl Fn(usize) -> PartitionId) {
        if let Some(snapshot) = self.windows.remove(&p) {
            self.values.retain(|k, _| part(*k) != p);
            self.values.extend(snapshot);
        }
    }
}

fn key(k: usize) -> Vec<u8> {
    format!("model-key-{k}").into_bytes()
}

fn val(k: usize, v: u8) -> Vec<u8> {
    format!("value-{k}-{v}").into_bytes()
}

/// A write's options: flags and (a far) expiry that differ from write to
/// write, so a REVERT that restored the value alone would be seen.
fn opts(v: u8) -> WriteOptions {
    WriteOptions {
        flags: u32::from(v) * 7,
        expiry: if v % 3 == 0 {
            0
        } else {
            4_000_000_000 + u32::from(v)
        },
        ..WriteOptions::default()
    }
}

/// What the engine holds for `k` just after a write of `val(k, v)` with
/// `opts(v)`: checked to be that value, flags and expiry, with a seqno above
/// every seqno its partition handed out before (`last`, never reused, not
/// even after a crash) and a CAS above the partition's last in this run.
fn written(e: &Engine, k: usize, v: u8, last: &mut Last) -> Version {
    let item = e.get(&key(k)).unwrap();
    let m = item.meta;
    assert_eq!(item.value(), &val(k, v)[..], "key {k}");
    assert_eq!(
        (m.flags, m.expiry),
        (opts(v).flags, opts(v).expiry),
        "key {k}"
    );
    let (seqno, cas) = last.entry(e.partition_of(&key(k))).or_default();
    assert!(
        m.by_seqno > *seqno,
        "key {k}: seqno {} after {seqno}",
        m.by_seqno
    );
    assert!(m.cas > *cas, "key {k}: CAS {} after {cas}", m.cas);
    (*seqno, *cas) = (m.by_seqno, m.cas);
    (item.value().to_vec(), m)
}

/// Per partition, the last write's seqno and CAS.
type Last = BTreeMap<PartitionId, (u64, u64)>;

/// Opens the engine with its flusher paused: only [`flush`] persists.
fn open(dir: &std::path::Path) -> Engine {
    let e = Engine::builder(dir)
        .partitions(PARTITIONS)
        .checkpoint_max_items(4)
        .open()
        .unwrap();
    e.set_flusher_paused(true);
    e
}

/// Runs flush rounds until nothing outside a window is left to write.
fn flush(e: &Engine) {
    for _ in 0..1_000 {
        if !e.run_flush_round().unwrap() {
            return;
        }
    }
    panic!("flush rounds never ran out of work");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn online_updates_match_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Some(open(dir.path()));
        let part = |k: usize| tapkv_engine::partition_of(&key(k), PARTITIONS);
        let mut m = Model {
            values: BTreeMap::new(),
            windows: BTreeMap::new(),
            durable: BTreeMap::new(),
        };
        let mut last = Last::new();
        let mem = WriteOptions::default();
        for op in ops {
            let eng = e.as_ref().unwrap();
            match op {
                Op::Set(k, v) => {
                    eng.set(&key(k), val(k, v), opts(v)).unwrap();
                    m.values.insert(k, written(eng, k, v, &mut last));
                }
                Op::Add(k, v) => {
                    let r = eng.add(&key(k), val(k, v), opts(v));
                    match m.values.entry(k) {
                        std::collections::btree_map::Entry::Occupied(_) => {
                            prop_assert!(matches!(r, Err(Error::Exists)), "{:?}", r);
                        }
                        std::collections::btree_map::Entry::Vacant(slot) => {
                            r.unwrap();
                            slot.insert(written(eng, k, v, &mut last));
                        }
                    }
                }
                Op::Delete(k) => {
                    let r = eng.delete(&key(k), mem);
                    if m.values.remove(&k).is_some() {
                        r.unwrap();
                    } else {
                        prop_assert!(matches!(r, Err(Error::NotFound)), "{:?}", r);
                    }
                }
                Op::CasSet(k, v, right) => {
                    let cas = eng.get(&key(k)).map(|i| i.meta.cas).unwrap_or(1);
                    let cas = if right { cas } else { cas + 1 };
                    let r = eng.set(&key(k), val(k, v), opts(v).with_cas(cas));
                    match (m.values.contains_key(&k), right) {
                        (true, true) => {
                            r.unwrap();
                            m.values.insert(k, written(eng, k, v, &mut last));
                        }
                        (true, false) => prop_assert!(matches!(r, Err(Error::CasMismatch { .. })), "{:?}", r),
                        (false, _) => prop_assert!(matches!(r, Err(Error::NotFound)), "{:?}", r),
                    }
                }
                Op::Start(p) => {
                    let r = eng.online_update_start(p);
                    if m.windows.contains_key(&p) {
                        prop_assert!(matches!(r, Err(Error::OnlineUpdateOpen { .. })), "{:?}", r);
                    } else {
                        r.unwrap();
                        let snap = m.values.iter().filter(|(k, _)| part(**k) == p)
                            .map(|(k, v)| (*k, v.clone())).collect();
                        m.windows.insert(p, snap);
                    }
                }
                Op::Complete(p) => {
                    let r = eng.online_update_complete(p);
                    if m.windows.remove(&p).is_some() {
                        r.unwrap();
                    } else {
                        prop_assert!(matches!(r, Err(Error::NoOnlineUpdate { .. })), "{:?}", r);
                    }
                }
                Op::Revert(p) => {
                    let r = eng.online_update_revert(p);
                    if m.windows.contains_key(&p) {
                        r.unwrap();
                        m.revert(p, &part);
                    } else {
                        prop_assert!(matches!(r, Err(Error::NoOnlineUpdate { .. })), "{:?}", r);
                    }
                }
                Op::Evict(k) => {
                    let r = eng.evict(&key(k));
                    if m.values.contains_key(&k) {
                        prop_assert!(matches!(r, Ok(()) | Err(Error::WrongState(_))), "{:?}", r);
                    } else {
                        prop_assert!(matches!(r, Err(Error::NotFound)), "{:?}", r);
                    }
                }
                Op::Flush => {
                    flush(eng);
                    m.flushed(&part);
                }
                Op::Restart => {
                    // A clean close writes everything outside windows and
                    // reverts the open ones.
                    e.take().unwrap().close().unwrap();
                    for p in 0..PARTITIONS {
                        m.revert(p, &part);
                    }
                    m.windows.clear();
                    m.durable = m.values.clone();
                    e = Some(open(dir.path()));
                }
                Op::Crash => {
                    // What was not flushed is lost, windows included.
                    e.take().unwrap().crash();
                    m.windows.clear();
                    m.values = m.durable.clone();
                    e = Some(open(dir.path()));
                    // The CAS values of lost writes may come again (the
                    // engine guarantees only what is above the disk's,
                    // docs/engine.md; before, this test relied on the
                    // coarse clock having moved on: found by a flakiness
                    // review). Seqnos never do.
                    let eng = e.as_ref().unwrap();
                    for (p, (_, cas)) in last.iter_mut() {
                        *cas = m
                            .durable
                            .iter()
                            .filter(|(k, _)| eng.partition_of(&key(**k)) == *p)
                            .map(|(_, (_, meta))| meta.cas)
                            .max()
                            .unwrap_or(0);
                    }
                }
            }
            let eng = e.as_ref().unwrap();
            for k in 0..KEYS {
                match (eng.get(&key(k)), m.values.get(&k)) {
                    (Ok(item), Some((v, meta))) => {
                        prop_assert_eq!(item.value(), &v[..], "key {}", k);
                        prop_assert_eq!(item.meta, *meta, "key {}", k);
                    }
                    (Err(Error::NotFound), None) => {}
                    (got, want) => prop_assert!(false, "key {k}: engine {got:?}, model {want:?}"),
                }
            }
            let items: usize = eng.stats().unwrap().partitions.iter().map(|p| p.items).sum();
            prop_assert_eq!(items, m.values.len(), "no ghost entries");
        }
    }
}
