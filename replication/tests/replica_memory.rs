//! A replica whose flusher cannot keep up stops applying at its checkpoint
//! memory limit (and so stops reading its stream) instead of growing without
//! bound, and catches up once its flusher runs again.

use std::time::{Duration, Instant};

mod common;
use common::{primary, wait_until};

use tapkv_engine::{Engine, WriteOptions};
use tapkv_replication::node::{Node, NodeConfig};

const LIMIT: usize = 256 << 10;
const ITEMS: usize = 5_000;
/// What one item is charged in checkpoint memory (key, value and the fixed
/// bookkeeping cost of 64 bytes), with room to spare.
const ITEM_CHARGE: usize = 512;

fn key(i: usize) -> Vec<u8> {
    format!("memory-key-{i:06}").into_bytes()
}

#[test]
fn a_replica_stops_at_its_checkpoint_memory_limit_and_catches_up_later() {
    let pdir = tempfile::tempdir().unwrap();
    let rdir = tempfile::tempdir().unwrap();
    let primary = primary(pdir.path());
    let replica_engine = Engine::builder(rdir.path())
        .replica(true)
        .checkpoint_memory_limit(LIMIT)
        .open()
        .unwrap();
    // The replica's disk "stops": nothing it applies can be freed.
    replica_engine.set_flusher_paused(true);
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.replica_of = Some(primary.local_addr().to_string());
    let replica = Node::start(replica_engine, cfg).unwrap();

    let p = primary.engine().unwrap();
    let value = vec![b'v'; 100];
    for i in 0..ITEMS {
        p.set(&key(i), &value, WriteOptions::default()).unwrap();
    }
    let r = replica.engine().unwrap();
    let bounded = || {
        let m = r.stats().unwrap().checkpoint_mem_bytes;
        assert!(
            m <= LIMIT + ITEM_CHARGE,
            "replica checkpoint memory {m} went past its limit {LIMIT}"
        );
        m
    };
    // It fills up to its limit and no further: checked on every poll while
    // it fills, and for a while after.
    wait_until(
        "the replica to fill its memory",
        Duration::from_secs(30),
        || bounded() + ITEM_CHARGE >= LIMIT,
    );
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        bounded();
        std::thread::sleep(Duration::from_millis(5));
    }
    let held = r.stats().unwrap().items();
    assert!(
        held < ITEMS,
        "the replica applied all {ITEMS} items with its flusher paused"
    );

    // Its disk comes back: it persists, frees memory and applies the rest.
    r.set_flusher_paused(false);
    wait_until("the replica to catch up", Duration::from_secs(60), || {
        r.stats().unwrap().items() == ITEMS
    });
    for i in 0..ITEMS {
        assert_eq!(r.get(&key(i)).unwrap().value(), &value[..], "key {i}");
    }
    replica.shutdown().unwrap();
    primary.shutdown().unwrap();
}
