//! A replica backfilling a partition larger than its snapshot buffer spills
//! the disk snapshot to its staging column family instead of holding it in
//! memory, applies it in seqno order, and converges with its primary.

use std::time::{Duration, Instant};

use tapkv_engine::{Engine, WriteOptions};
use tapkv_replication::node::{Node, NodeConfig};

const ITEMS: usize = 20_000;
const BUFFER: usize = 16 << 10;

fn key(i: usize) -> Vec<u8> {
    format!("snapshot-key-{i:06}").into_bytes()
}

/// Polls `cond` every 5 ms until it holds; panics after `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_backfill_larger_than_the_snapshot_buffer_is_spilled_and_converges() {
    let pdir = tempfile::tempdir().unwrap();
    let rdir = tempfile::tempdir().unwrap();
    // The primary's history is on disk only (reopened), so the replica's
    // stream starts with a disk snapshot of every partition.
    {
        let p = Engine::builder(pdir.path()).open().unwrap();
        for i in 0..ITEMS {
            let v = format!("value-{i}-{}", "x".repeat(i % 97));
            p.set(&key(i), v.as_bytes(), WriteOptions::default())
                .unwrap();
        }
        for i in (0..ITEMS).step_by(7) {
            p.delete(&key(i), WriteOptions::default()).unwrap();
        }
        for i in (0..ITEMS).step_by(5) {
            p.set(&key(i), "updated", WriteOptions::default()).unwrap();
        }
        p.close().unwrap();
    }
    let primary = Node::start(
        Engine::builder(pdir.path()).open().unwrap(),
        NodeConfig::new("127.0.0.1:0"),
    )
    .unwrap();
    let replica_engine = Engine::builder(rdir.path())
        .replica(true)
        .snapshot_buffer_limit(BUFFER)
        .open()
        .unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.replica_of = Some(primary.local_addr().to_string());
    let replica = Node::start(replica_engine, cfg).unwrap();

    let p = primary.engine().unwrap();
    let r = replica.engine().unwrap();
    let caught_up = || {
        (0..p.num_partitions())
            .all(|part| p.high_seqno(part).unwrap() == r.high_seqno(part).unwrap())
    };
    wait_until("the replica's backfill", Duration::from_secs(60), caught_up);
    let staged = r.stats().unwrap().snapshot_staged_items;
    assert!(
        staged > (ITEMS / 2) as u64,
        "only {staged} entries were spilled: the snapshots stayed in memory"
    );

    // Then the stream carries on from memory.
    for i in 0..100 {
        p.set(&key(i), "after the backfill", WriteOptions::default())
            .unwrap();
    }
    wait_until("the in-memory stream", Duration::from_secs(30), caught_up);

    assert_eq!(r.stats().unwrap().items(), p.stats().unwrap().items());
    for i in 0..ITEMS {
        match (p.get(&key(i)), r.get(&key(i))) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.value(), b.value(), "key {i}");
                assert_eq!(a.meta, b.meta, "key {i}");
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "key {i}"),
            (a, b) => panic!("key {i}: primary {a:?}, replica {b:?}"),
        }
    }
    // A replica's applied history is a prefix in seqno order: its disk holds
    // the same seqnos once flushed.
    r.flush().unwrap();
    for part in 0..p.num_partitions() {
        assert_eq!(
            r.stats().unwrap().partitions[usize::from(part)].persisted_seqno,
            p.high_seqno(part).unwrap()
        );
    }
    replica.shutdown().unwrap();
    primary.shutdown().unwrap();
}
