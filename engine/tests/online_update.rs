//! Online update: START / COMPLETE / REVERT, one test per fault named in the
//! review of the original implementation, plus wrong-state commands, limits,
//! crash and close inside a window, and value eviction.

// A loom build swaps the engine's primitives; only its models run then.
#![cfg(not(any(loom, feature = "loom")))]

mod common;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{builder, value};
use tapkv_engine::{
    CursorEvent, DiskView, Durability, Engine, Error, PartitionId, QueueOp, WriteOptions,
};

const MEM: WriteOptions = WriteOptions {
    cas: None,
    flags: 0,
    expiry: 0,
    durability: Durability::Memory,
};

/// `n` distinct keys that all live in partition `p`.
fn keys_in(e: &Engine, p: PartitionId, n: usize, tag: &str) -> Vec<Vec<u8>> {
    assert!(
        p < e.num_partitions(),
        "no partition {p}: the search would not end"
    );
    (0..)
        .map(|i| format!("{tag}-{i}").into_bytes())
        .filter(|k| e.partition_of(k) == p)
        .take(n)
        .collect()
}

fn ops(events: &[CursorEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            CursorEvent::Item(i) => Some(match i.op {
                QueueOp::Mutation => format!("set {}", String::from_utf8_lossy(i.key())),
                QueueOp::Deletion => format!("del {}", String::from_utf8_lossy(i.key())),
                QueueOp::OnlineUpdateStart { checkpoint_id } => format!("START {checkpoint_id}"),
                QueueOp::OnlineUpdateEnd { checkpoint_id } => format!("END {checkpoint_id}"),
                QueueOp::OnlineUpdateRevert { checkpoint_id } => format!("REVERT {checkpoint_id}"),
            }),
            _ => None,
        })
        .collect()
}

#[test]
fn revert_restores_every_key_and_leaves_no_ghost() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 1, 6, "k");
    let (a, b, c, d, g, h) = (&k[0], &k[1], &k[2], &k[3], &k[4], &k[5]);
    for key in [a, b, c, h] {
        e.set(key, value(1), MEM).unwrap();
    }
    e.flush().unwrap();
    e.set(h, b"dirty before the window", MEM).unwrap(); // pre-window, maybe unflushed
    let before: Vec<_> = [a, b, c, h].iter().map(|k| e.get(k).unwrap()).collect();
    let items_before = e.stats().unwrap().partitions[1].items;

    let w = e.online_update_start(1).unwrap();
    e.set(a, b"updated", MEM).unwrap();
    e.set(a, b"updated twice", MEM).unwrap();
    e.delete(b, MEM).unwrap(); // deleted in the window
    e.delete(c, MEM).unwrap(); // deleted then recreated
    e.set(c, b"recreated", MEM).unwrap();
    e.set(d, b"created", MEM).unwrap(); // created
    e.set(g, b"created", MEM).unwrap(); // created then deleted
    e.delete(g, MEM).unwrap();
    e.set(h, b"window", MEM).unwrap();
    let info = e.stats().unwrap().partitions[1].window.unwrap();
    assert_eq!(info.checkpoint_id, w);
    assert_eq!(info.keys, 6);

    let r = e.online_update_revert(1).unwrap();
    assert_eq!(r.checkpoint_id, w);
    // d is removed; g (created then deleted) needs nothing.
    assert_eq!((r.removed, r.restored), (1, 4));
    // Clean pre-window values are evicted and come back from disk on access.
    let evicted_now = e.stats().unwrap().partitions[1].evicted_items;
    assert!(evicted_now >= 3, "a, b, c were clean: {evicted_now}");
    for (key, old) in [a, b, c, h].iter().zip(&before) {
        assert_eq!(
            &e.get(key).unwrap(),
            old,
            "{:?}",
            String::from_utf8_lossy(key)
        );
    }
    assert!(matches!(e.get(d), Err(Error::NotFound)));
    assert!(matches!(e.get(g), Err(Error::NotFound)));
    let st = e.stats().unwrap();
    assert_eq!(st.partitions[1].items, items_before, "no ghost entries");
    assert!(st.partitions[1].window.is_none());
    assert!(st.partitions[1].bg_fetches >= 3);
    // The partition keeps working, and the revert reached disk as "nothing".
    e.set(d, b"after", MEM).unwrap();
    e.close().unwrap();
    let e = builder(dir.path()).open().unwrap();
    for (key, old) in [a, b, c, h].iter().zip(&before) {
        assert_eq!(e.get(key).unwrap().value(), old.value());
    }
    assert_eq!(&e.get(d).unwrap().value(), b"after");
    assert!(matches!(e.get(g), Err(Error::NotFound)));
}

/// Review fault: a key created and then deleted inside a window left a ghost
/// entry (a tombstone in the hash table) after REVERT.
#[test]
fn no_ghost_key_after_create_then_delete_inside_a_window() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 2, 3, "ghost");
    e.set(&k[0], value(1), MEM).unwrap();
    e.flush().unwrap();
    let items_before = e.stats().unwrap().partitions[2].items;
    e.online_update_start(2).unwrap();
    e.set(&k[1], b"created", MEM).unwrap();
    e.delete(&k[1], MEM).unwrap();
    // And created, deleted, created again.
    e.set(&k[2], b"one", MEM).unwrap();
    e.delete(&k[2], MEM).unwrap();
    e.set(&k[2], b"two", MEM).unwrap();
    let r = e.online_update_revert(2).unwrap();
    // Only the key present at REVERT time needed removing.
    assert_eq!((r.removed, r.restored), (1, 0));
    let st = e.stats().unwrap();
    assert_eq!(
        st.partitions[2].items, items_before,
        "a ghost entry is left"
    );
    for key in &k[1..] {
        assert!(matches!(e.get(key), Err(Error::NotFound)));
        // Absent, not a tombstone: add succeeds, replace does not.
        assert!(matches!(e.replace(key, b"x", MEM), Err(Error::NotFound)));
    }
    e.add(&k[1], b"added", MEM).unwrap();
    assert_eq!(&e.get(&k[1]).unwrap().value(), b"added");
}

/// Review fault: keys deleted inside a window stayed deleted after REVERT.
#[test]
fn keys_deleted_inside_a_window_come_back_after_revert() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 3, 3, "deleted");
    for key in &k {
        e.set(key, value(7), MEM).unwrap();
    }
    e.flush().unwrap();
    // One of them changed again before START and not yet flushed: its
    // pre-window value lives only in memory.
    e.set(&k[2], b"dirty", MEM).unwrap();
    let before: Vec<_> = k.iter().map(|key| e.get(key).unwrap()).collect();
    e.online_update_start(3).unwrap();
    for key in &k {
        e.delete(key, MEM).unwrap();
        assert!(matches!(e.get(key), Err(Error::NotFound)));
    }
    let r = e.online_update_revert(3).unwrap();
    assert_eq!((r.removed, r.restored), (0, 3));
    for (key, old) in k.iter().zip(&before) {
        assert_eq!(&e.get(key).unwrap(), old, "value, CAS and seqno come back");
    }
    // And they stay back across a restart (nothing of the window on disk).
    e.close().unwrap();
    let e = builder(dir.path()).open().unwrap();
    for (key, old) in k.iter().zip(&before) {
        assert_eq!(e.get(key).unwrap().value(), old.value());
    }
}

/// Review fault: the revert marker did not say which window it undid.
#[test]
fn the_revert_marker_carries_the_window_checkpoint_id() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let key = &keys_in(&e, 3, 1, "marker")[0];
    e.register_cursor(3, "watch", 0).unwrap();
    // Two windows, so the id is not a coincidence of the first checkpoint.
    let first = e.online_update_start(3).unwrap();
    e.set(key, b"a", MEM).unwrap();
    e.online_update_complete(3).unwrap();
    let second = e.online_update_start(3).unwrap();
    assert_ne!(first, second);
    e.set(key, b"b", MEM).unwrap();
    let report = e.online_update_revert(3).unwrap();
    assert_eq!(report.checkpoint_id, second);
    let events = e.read_cursor(3, "watch", 1000).unwrap().events;
    let reverts: Vec<u64> = events
        .iter()
        .filter_map(|ev| match ev {
            CursorEvent::Item(i) => match i.op {
                QueueOp::OnlineUpdateRevert { checkpoint_id } => Some(checkpoint_id),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(reverts, vec![second]);
}

#[test]
fn markers_carry_the_window_id_and_every_cursor_sees_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 2, 3, "m");
    e.register_cursor(2, "before", 0).unwrap();
    e.set(&k[0], value(0), MEM).unwrap();
    let w = e.online_update_start(2).unwrap();
    let start_seqno = e.stats().unwrap().partitions[2].high_seqno;
    e.register_cursor(2, "inside", start_seqno).unwrap();
    e.set(&k[1], value(1), MEM).unwrap();
    e.register_cursor(2, "at-end", 0).unwrap();
    let seen = e.read_cursor(2, "at-end", 100).unwrap();
    assert_eq!(
        ops(&seen.events),
        vec![
            format!("set {}", String::from_utf8_lossy(&k[0])),
            format!("START {w}"),
            format!("set {}", String::from_utf8_lossy(&k[1])),
        ]
    );
    e.delete(&k[0], MEM).unwrap();
    let remaining = |name: &str| {
        e.cursors(2)
            .unwrap()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap()
            .remaining
    };
    assert_eq!(remaining("before"), 4);
    assert_eq!(remaining("inside"), 2);
    assert_eq!(remaining("at-end"), 1);
    let r = e.online_update_revert(2).unwrap();
    assert_eq!(r.checkpoint_id, w);
    assert_eq!(remaining("before"), 5);
    assert_eq!(remaining("inside"), 3);
    assert_eq!(remaining("at-end"), 2);
    let k0 = String::from_utf8_lossy(&k[0]).into_owned();
    let k1 = String::from_utf8_lossy(&k[1]).into_owned();
    assert_eq!(
        ops(&e.read_cursor(2, "before", 100).unwrap().events),
        vec![
            format!("set {k0}"),
            format!("START {w}"),
            format!("set {k1}"),
            format!("del {k0}"),
            format!("REVERT {w}")
        ]
    );
    assert_eq!(
        ops(&e.read_cursor(2, "inside", 100).unwrap().events),
        vec![
            format!("set {k1}"),
            format!("del {k0}"),
            format!("REVERT {w}")
        ]
    );
    assert_eq!(
        ops(&e.read_cursor(2, "at-end", 100).unwrap().events),
        vec![format!("del {k0}"), format!("REVERT {w}")]
    );
    for c in e.cursors(2).unwrap() {
        if c.name != "persistence" {
            assert_eq!(c.remaining, 0, "{}", c.name);
        }
    }
    // COMPLETE: END carries the id as well.
    let w2 = e.online_update_start(2).unwrap();
    e.set(&k[2], value(2), MEM).unwrap();
    assert_eq!(e.online_update_complete(2).unwrap(), w2);
    assert!(w2 > w);
    assert_eq!(
        ops(&e.read_cursor(2, "before", 100).unwrap().events),
        vec![
            format!("START {w2}"),
            format!("set {}", String::from_utf8_lossy(&k[2])),
            format!("END {w2}")
        ]
    );
}

#[test]
fn operations_blocked_by_a_revert_all_resume() {
    let dir = tempfile::tempdir().unwrap();
    let e = Arc::new(builder(dir.path()).open().unwrap());
    let p = 3;
    let window_keys = keys_in(&e, p, 30_000, "w");
    e.online_update_start(p).unwrap();
    for k in &window_keys {
        e.set(k, value(7), MEM).unwrap();
    }
    let threads = 4;
    let per = 2_000;
    // The revert stops once it holds the partition; every client operation
    // below is issued while it is held, so each must wait for it.
    let hold = e.hold_next_revert(p).unwrap();
    let reverting = {
        let e = Arc::clone(&e);
        std::thread::spawn(move || e.online_update_revert(p))
    };
    assert!(
        hold.wait_held(Duration::from_secs(60)),
        "the revert never started"
    );
    let (issued_tx, issued_rx) = mpsc::channel();
    let (tx, rx) = mpsc::channel();
    for t in 0..threads {
        let e = Arc::clone(&e);
        let issued = issued_tx.clone();
        let tx = tx.clone();
        let mine = keys_in(&e, p, per, &format!("t{t}"));
        std::thread::spawn(move || {
            issued.send(()).unwrap();
            let mut ok = 0;
            for (i, k) in mine.iter().enumerate() {
                if i % 2 == 0 {
                    e.set(k, format!("{t}").into_bytes(), MEM).unwrap();
                } else {
                    let _ = e.get(&mine[i - 1]);
                }
                ok += 1;
            }
            tx.send((t, ok, mine)).unwrap();
        });
    }
    for _ in 0..threads {
        issued_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a client thread never started");
    }
    // Held, the revert lets no write of the partition through.
    assert!(
        rx.try_recv().is_err(),
        "a client thread finished its writes while the revert held the partition"
    );
    hold.release();
    let report = reverting.join().unwrap().unwrap();
    assert!(report.removed >= window_keys.len());
    let mut done = 0;
    for _ in 0..threads {
        let (t, ok, mine) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a client operation never resumed after the revert");
        assert_eq!(ok, per);
        // Every write waited for the revert and landed after it: none was
        // reverted with the window.
        for k in mine.iter().step_by(2) {
            assert_eq!(e.get(k).unwrap().value(), format!("{t}").into_bytes());
        }
        done += 1;
    }
    assert_eq!(done, threads);
    for k in window_keys.iter().take(100) {
        assert!(matches!(e.get(k), Err(Error::NotFound)));
    }
}

#[test]
fn commands_in_the_wrong_state_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    assert!(matches!(
        e.online_update_complete(0),
        Err(Error::NoOnlineUpdate { partition: 0 })
    ));
    assert!(matches!(
        e.online_update_revert(0),
        Err(Error::NoOnlineUpdate { partition: 0 })
    ));
    let w = e.online_update_start(0).unwrap();
    match e.online_update_start(0) {
        Err(Error::OnlineUpdateOpen {
            partition: 0,
            checkpoint_id,
            ..
        }) => assert_eq!(checkpoint_id, w),
        other => panic!("{other:?}"),
    }
    // Another partition is independent.
    let w1 = e.online_update_start(1).unwrap();
    assert_eq!(e.online_update_complete(1).unwrap(), w1);
    // Empty windows complete and revert cleanly.
    let r = e.online_update_revert(0).unwrap();
    assert_eq!((r.checkpoint_id, r.removed, r.restored), (w, 0, 0));
    assert!(matches!(
        e.online_update_revert(0),
        Err(Error::NoOnlineUpdate { .. })
    ));
    let w2 = e.online_update_start(0).unwrap();
    assert!(w2 > w);
    assert_eq!(e.online_update_complete(0).unwrap(), w2);
    assert!(matches!(
        e.online_update_complete(0),
        Err(Error::NoOnlineUpdate { .. })
    ));
    assert!(matches!(
        e.online_update_start(99),
        Err(Error::NoSuchPartition { .. })
    ));
    e.flush().unwrap();
}

#[test]
fn a_persist_or_replicate_write_inside_a_window_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 0, 1, "p");
    let other = keys_in(&e, 1, 1, "q");
    let w = e.online_update_start(0).unwrap();
    match e.set(&k[0], "v", WriteOptions::durable(Durability::Persist)) {
        Err(Error::OnlineUpdateOpen {
            partition: 0,
            checkpoint_id,
            ..
        }) => assert_eq!(checkpoint_id, w),
        other => panic!("{other:?}"),
    }
    // A Replicate write waits for this node's disk too: refused the same way.
    struct AllAck;
    impl tapkv_engine::ReplicationGate for AllAck {
        fn wait_replicated(
            &self,
            _: &tapkv_engine::Engine,
            _: PartitionId,
            _: u64,
            _: Duration,
        ) -> tapkv_engine::Result<()> {
            Ok(())
        }
    }
    e.set_replication_gate(Arc::new(AllAck));
    assert!(matches!(
        e.set(&k[0], "v", WriteOptions::durable(Durability::Replicate)),
        Err(Error::OnlineUpdateOpen { partition: 0, .. })
    ));
    assert!(
        matches!(e.get(&k[0]), Err(Error::NotFound)),
        "the refused writes were not applied"
    );
    e.set(&k[0], "v", MEM).unwrap();
    e.set(&other[0], "v", WriteOptions::durable(Durability::Persist))
        .unwrap();
    e.set(&other[0], "v", WriteOptions::durable(Durability::Replicate))
        .unwrap();
    e.online_update_complete(0).unwrap();
    e.set(&k[0], "v2", WriteOptions::durable(Durability::Persist))
        .unwrap();
}

#[test]
fn the_window_memory_limit_refuses_writes_until_the_window_ends() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path())
        .online_update_memory_limit(40 * 1024)
        .max_value_size(16 << 10)
        .open()
        .unwrap();
    let k = keys_in(&e, 0, 2000, "x");
    e.online_update_start(0).unwrap();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for key in &k {
        match e.set(key, vec![b'x'; 100], MEM) {
            Ok(_) => accepted.push(key.clone()),
            Err(Error::TempOutOfMemory { reason }) => {
                assert!(reason.contains("window"), "{reason}");
                refused.push(key.clone());
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(!refused.is_empty() && !accepted.is_empty());
    for key in &accepted {
        assert!(e.get(key).is_ok(), "accepted writes are kept");
    }
    // A refused write changed nothing.
    for key in &refused {
        assert!(matches!(e.get(key), Err(Error::NotFound)));
    }
    // Other partitions are not affected.
    e.set(&keys_in(&e, 1, 1, "y")[0], "v", MEM).unwrap();
    e.online_update_complete(0).unwrap();
    e.set(&k[1999], vec![b'x'; 100], MEM).unwrap();
    e.flush().unwrap();
    e.close().unwrap();
    let e = builder(dir.path()).open().unwrap();
    for key in &accepted {
        assert!(e.get(key).is_ok());
    }
    for key in refused.iter().filter(|key| **key != k[1999]) {
        assert!(matches!(e.get(key), Err(Error::NotFound)));
    }
}

#[test]
fn nothing_of_a_window_reaches_disk_and_complete_persists_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 0, 20, "d");
    for key in &k[..10] {
        e.set(key, value(1), MEM).unwrap();
    }
    let w = e.online_update_start(0).unwrap();
    let start_seqno = e.stats().unwrap().partitions[0].high_seqno;
    for key in &k {
        e.set(key, value(2), MEM).unwrap();
    }
    // A cursor registered and dropped mid-window breaks nothing.
    e.register_cursor(0, "passing", start_seqno - 1).unwrap();
    assert_eq!(e.read_cursor(0, "passing", 3).unwrap().items(), 3);
    e.flush().unwrap(); // everything before the window
    let on_disk = |dir: &std::path::Path| {
        let mut v = Vec::new();
        DiskView::open(dir)
            .unwrap()
            .for_each_item(|it| {
                v.push((it.key.to_vec(), it.record.value.to_vec()));
                Ok(())
            })
            .unwrap();
        v
    };
    let disk = on_disk(dir.path());
    assert_eq!(disk.len(), 10);
    assert!(disk.iter().all(|(_, v)| *v == value(1)));
    let view = DiskView::open(dir.path()).unwrap();
    let p0 = &view.partitions().unwrap()[0];
    assert_eq!(p0.open_window.map(|x| x.checkpoint_id), Some(w));
    drop(view);
    assert!(e.remove_cursor(0, "passing").unwrap());
    assert_eq!(e.online_update_complete(0).unwrap(), w);
    e.flush().unwrap();
    let disk = on_disk(dir.path());
    assert_eq!(disk.len(), 20);
    assert!(disk.iter().all(|(_, v)| *v == value(2)));
    assert!(DiskView::open(dir.path()).unwrap().partitions().unwrap()[0]
        .open_window
        .is_none());
}

#[test]
fn a_complete_or_start_whose_record_write_fails_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 0, 4, "r");
    e.set(&k[0], value(1), MEM).unwrap();
    let w = e.online_update_start(0).unwrap();
    e.set(&k[1], value(2), MEM).unwrap();

    // COMPLETE cannot clear the window's record: the window stays open,
    // whole, and nothing of it is persisted.
    e.inject_window_record_failures(1);
    assert!(matches!(
        e.online_update_complete(0),
        Err(Error::Storage(_))
    ));
    let window = |e: &Engine| {
        e.stats().unwrap().partitions[0]
            .window
            .map(|x| x.checkpoint_id)
    };
    assert_eq!(window(&e), Some(w));
    e.set(&k[2], value(2), MEM).unwrap();
    e.flush().unwrap();
    assert_eq!(e.stats().unwrap().partitions[0].persisted_seqno, 1);
    // Tried again, it completes, and the whole window persists.
    assert_eq!(e.online_update_complete(0).unwrap(), w);
    assert_eq!(window(&e), None);

    // START cannot write its record: no window, in memory or on disk.
    e.inject_window_record_failures(1);
    assert!(matches!(e.online_update_start(0), Err(Error::Storage(_))));
    assert_eq!(window(&e), None);
    e.set(&k[3], value(3), MEM).unwrap();
    e.close().unwrap();

    let e = builder(dir.path()).open().unwrap();
    assert_no_lost_window(&e);
    assert_eq!(e.get(&k[0]).unwrap().value(), value(1));
    assert_eq!(e.get(&k[1]).unwrap().value(), value(2));
    assert_eq!(e.get(&k[2]).unwrap().value(), value(2));
    assert_eq!(e.get(&k[3]).unwrap().value(), value(3));
}

/// Partition 0 reopened without a window it lost.
fn assert_no_lost_window(e: &Engine) {
    let lost = e.stats().unwrap().partitions[0].lost_windows.clone();
    assert!(lost.is_empty(), "{lost:?}");
}

#[test]
fn a_revert_whose_record_write_fails_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 0, 3, "rv");
    e.set(&k[0], value(1), MEM).unwrap();
    let w = e.online_update_start(0).unwrap();
    e.set(&k[0], value(2), MEM).unwrap();
    e.set(&k[1], value(2), MEM).unwrap();
    let branches = e.failover_log(0).unwrap().len();

    // REVERT cannot clear the window's record: nothing is undone, the
    // window stays open, and a retry reverts it.
    e.inject_window_record_failures(1);
    assert!(matches!(e.online_update_revert(0), Err(Error::Storage(_))));
    let st = e.stats().unwrap();
    assert_eq!(st.partitions[0].window.map(|x| x.checkpoint_id), Some(w));
    assert_eq!(e.get(&k[0]).unwrap().value(), value(2));
    assert_eq!(e.get(&k[1]).unwrap().value(), value(2));
    let report = e.online_update_revert(0).unwrap();
    assert_eq!(
        (report.checkpoint_id, report.restored, report.removed),
        (w, 1, 1)
    );
    assert_eq!(e.get(&k[0]).unwrap().value(), value(1));
    assert!(matches!(e.get(&k[1]), Err(Error::NotFound)));
    e.set(&k[2], value(3), MEM).unwrap();
    e.close().unwrap();

    // Nothing on disk says a window was lost, and no new branch began.
    let e = builder(dir.path()).open().unwrap();
    assert_no_lost_window(&e);
    assert_eq!(e.failover_log(0).unwrap().len(), branches);
    assert_eq!(e.get(&k[0]).unwrap().value(), value(1));
    assert!(matches!(e.get(&k[1]), Err(Error::NotFound)));
    assert_eq!(e.get(&k[2]).unwrap().value(), value(3));
}

#[test]
fn rewriting_one_key_inside_a_window_does_not_use_up_its_memory() {
    // The window is charged for what it holds: a write that de-duplicates
    // the key's previous entry gives that entry's bytes back. (Before, 20,000
    // rewrites of one key were charged as 20,000 entries and ran into the
    // 1 MiB limit after about 6,000.)
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path())
        .online_update_memory_limit(1 << 20)
        .max_value_size(1 << 10)
        .open()
        .unwrap();
    let k = keys_in(&e, 0, 1, "hot");
    e.online_update_start(0).unwrap();
    for i in 0..20_000u32 {
        let v = format!("{i:0100}");
        e.set(&k[0], v, MEM)
            .unwrap_or_else(|err| panic!("rewrite {i}: {err}"));
    }
    let win = e.stats().unwrap().partitions[0].window.unwrap();
    assert_eq!(win.keys, 1);
    assert!(
        win.bytes < 1024,
        "one key's window holds {} bytes",
        win.bytes
    );
    e.online_update_revert(0).unwrap();
    assert!(matches!(e.get(&k[0]), Err(Error::NotFound)));
}

#[test]
fn a_window_admits_a_rewrite_net_of_the_entry_it_replaces() {
    // A 400 KiB value rewritten in a 1 MiB window: each rewrite replaces
    // the last, so the window holds one. Before, admission counted the new
    // entry before giving back the old one's bytes, so the third write was
    // refused (the second, with 600 KiB values), and went on being refused
    // until COMPLETE or REVERT.
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path())
        .online_update_memory_limit(1 << 20)
        .max_value_size(400 << 10)
        .open()
        .unwrap();
    let k = keys_in(&e, 0, 3, "big");
    e.online_update_start(0).unwrap();
    for i in 0..5u8 {
        e.set(&k[0], vec![i; 400 << 10], MEM)
            .unwrap_or_else(|err| panic!("rewrite {i}: {err}"));
    }
    let win = e.stats().unwrap().partitions[0].window.unwrap();
    assert!(win.bytes < 500 << 10, "{} bytes", win.bytes);
    // The limit still holds for what is added: a second such key fits, a
    // third does not.
    e.set(&k[1], vec![8; 400 << 10], MEM).unwrap();
    assert!(matches!(
        e.set(&k[2], vec![9; 400 << 10], MEM),
        Err(Error::TempOutOfMemory { .. })
    ));
    assert_eq!(e.get(&k[0]).unwrap().value(), &vec![4; 400 << 10][..]);
    e.online_update_revert(0).unwrap();
    assert!(matches!(e.get(&k[0]), Err(Error::NotFound)));
}

fn crash_or_close_inside_a_window(crash: bool) {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 0, 10, "c");
    for key in &k[..5] {
        e.set(key, value(1), MEM).unwrap();
    }
    let w = e.online_update_start(0).unwrap();
    for key in &k {
        e.set(key, value(2), MEM).unwrap();
    }
    e.delete(&k[0], MEM).unwrap();
    let st = e.stats().unwrap();
    let window_high = st.partitions[0].high_seqno;
    e.flush().unwrap();
    if crash {
        e.crash();
    } else {
        e.close().unwrap();
    }
    let e = builder(dir.path()).open().unwrap();
    let st = e.stats().unwrap();
    assert_eq!(st.recovered_from_crash, crash);
    assert_eq!(
        st.partitions[0]
            .lost_windows
            .iter()
            .map(|l| l.checkpoint_id)
            .collect::<Vec<_>>(),
        vec![w]
    );
    assert!(st.partitions[0].open_checkpoint_id > w);
    for key in &k[..5] {
        assert_eq!(e.get(key).unwrap().value(), value(1));
    }
    for key in &k[5..] {
        assert!(matches!(e.get(key), Err(Error::NotFound)));
    }
    let r = e.set(&k[9], value(3), MEM).unwrap();
    assert!(
        r.seqno > window_high,
        "seqno {} reuses the lost window's",
        r.seqno
    );
    assert!(e.online_update_start(0).unwrap() > w);
    e.close().unwrap();
    let view = DiskView::open(dir.path()).unwrap();
    let p0 = &view.partitions().unwrap()[0];
    assert_eq!(p0.lost_windows.len(), 1);
    assert!(p0.open_window.is_some(), "the new window was open at close");
}

#[test]
fn a_crash_inside_a_window_is_an_implicit_revert() {
    crash_or_close_inside_a_window(true);
}

#[test]
fn a_close_inside_a_window_loses_it_and_records_it() {
    crash_or_close_inside_a_window(false);
}

#[test]
fn evicted_values_are_read_back_and_dirty_ones_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    e.set(b"clean", "on disk", MEM).unwrap();
    e.flush().unwrap();
    e.evict(b"clean").unwrap();
    // A second evict has nothing to do and is not counted again.
    e.evict(b"clean").unwrap();
    let p = usize::from(e.partition_of(b"clean"));
    let st = e.stats().unwrap();
    assert_eq!(
        (st.partitions[p].evicted_items, st.partitions[p].evictions),
        (1, 1)
    );
    assert_eq!(st.partitions[p].evicted_bytes, b"on disk".len());
    assert_eq!(&e.get(b"clean").unwrap().value(), b"on disk");
    let st = e.stats().unwrap();
    assert_eq!(st.partitions[p].evicted_items, 0);
    assert_eq!(st.partitions[p].evicted_bytes, 0);
    assert_eq!(st.partitions[p].bg_fetches, 1);
    // Dirty: inside a window.
    let wp = e.partition_of(b"clean");
    e.online_update_start(wp).unwrap();
    e.set(b"clean", "window value", MEM).unwrap();
    e.flush().unwrap();
    assert!(matches!(e.evict(b"clean"), Err(Error::WrongState(_))));
    e.online_update_revert(wp).unwrap();
    assert_eq!(&e.get(b"clean").unwrap().value(), b"on disk");
    assert!(matches!(e.evict(b"absent"), Err(Error::NotFound)));
}

#[test]
fn a_pager_that_cannot_reach_its_target_does_not_rescan_every_round() {
    // 100,000 keys with empty values: the keys alone are over the 1 MiB
    // quota's high-water mark and nothing can be evicted. Before, every
    // flush round scanned the whole table; now a pass that cannot reach its
    // target sits out a round per 16,384 entries it looked at.
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).memory_quota(1 << 20).open().unwrap();
    let n = 100_000;
    for i in 0..n {
        e.set(format!("key-{i:06}").as_bytes(), "", MEM).unwrap();
    }
    e.flush().unwrap();
    e.set_flusher_paused(true);
    let before = e.stats().unwrap().pager_scanned;
    for _ in 0..20 {
        e.run_flush_round().unwrap();
    }
    let scanned = e.stats().unwrap().pager_scanned - before;
    assert!(
        scanned <= 4 * n as u64,
        "{scanned} entries scanned in 20 rounds of a {n}-item table"
    );
    assert!(scanned >= n as u64, "the pager never looked");
    e.set_flusher_paused(false);
}

#[test]
fn a_window_counts_the_pre_window_values_it_keeps_to_revert() {
    // A key's pre-window value not yet on disk stays in the window's undo
    // map; once its checkpoint is persisted and freed, nothing else counts
    // it. Before, a window that overwrote 300 dirty 1 MiB values held about
    // 250 MiB that no counter showed, beyond the window's limit.
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::builder(dir.path())
        .partitions(1)
        .online_update_memory_limit(1 << 20)
        .max_value_size(64 << 10)
        .persist_timeout(Duration::from_secs(20))
        .open()
        .unwrap();
    e.set_flusher_paused(true);
    let big = vec![b'v'; 64 * 1024];
    for i in 0..40 {
        e.set(format!("key-{i:02}").as_bytes(), &big[..], MEM)
            .unwrap();
    }
    e.online_update_start(0).unwrap();
    let mut overwritten = 0;
    let refused = loop {
        match e.set(format!("key-{overwritten:02}").as_bytes(), "x", MEM) {
            Ok(_) => overwritten += 1,
            Err(err) => break err,
        }
        assert!(
            overwritten < 40,
            "40 pre-window values of 64 KiB fit a 1 MiB window"
        );
    };
    assert!(
        matches!(refused, Error::TempOutOfMemory { .. }),
        "{refused}"
    );
    let window = e.stats().unwrap().partitions[0].window.unwrap();
    assert!(
        window.bytes >= overwritten * big.len() && window.bytes <= 1 << 20,
        "{overwritten} pre-window values kept, window counts {} bytes",
        window.bytes
    );
    // Values already on disk are kept evicted: they cost the window only
    // their keys.
    e.online_update_revert(0).unwrap();
    e.set_flusher_paused(false);
    e.flush().unwrap();
    e.online_update_start(0).unwrap();
    for i in 0..40 {
        e.set(format!("key-{i:02}").as_bytes(), "x", MEM).unwrap();
    }
    assert!(e.stats().unwrap().partitions[0].window.unwrap().bytes < 64 * 1024);
    e.online_update_complete(0).unwrap();
}

#[test]
fn values_that_become_clean_are_evicted_at_the_next_round() {
    // A pass that could not reach its target (every value dirty inside a
    // window) used to make the pager sit out a round per 16,384 entries it
    // had scanned, whatever happened next: here 17 more rounds at 3x the
    // quota after one round had persisted everything.
    let dir = tempfile::tempdir().unwrap();
    let quota = 4 << 20;
    let e = Engine::builder(dir.path())
        .partitions(1)
        .memory_quota(quota)
        .persist_timeout(Duration::from_secs(20))
        .open()
        .unwrap();
    e.set_flusher_paused(true);
    let n = 300_000;
    e.online_update_start(0).unwrap();
    for i in 0..n {
        e.set(format!("key-{i:07}").as_bytes(), [b'v'; 32], MEM)
            .unwrap();
    }
    let table = |e: &Engine| -> usize {
        e.stats()
            .unwrap()
            .partitions
            .iter()
            .map(|p| p.mem_bytes)
            .sum()
    };
    e.run_flush_round().unwrap();
    assert!(table(&e) > 2 * quota, "the window's values stay resident");
    e.online_update_complete(0).unwrap();
    e.run_flush_round().unwrap();
    let st = e.stats().unwrap();
    assert_eq!(
        st.partitions[0].persisted_seqno,
        st.partitions[0].high_seqno
    );
    // From the next round on, each pass evicts as much as it may look at
    // (16,384 entries), round after round, until under the quota.
    let evictions = |e: &Engine| e.stats().unwrap().partitions[0].evictions;
    let before = evictions(&e);
    e.run_flush_round().unwrap();
    assert_eq!(evictions(&e) - before, 16_384);
    let mut rounds = 1;
    while table(&e) as f64 > quota as f64 * 0.85 {
        assert!(rounds <= n / 16_384 + 1, "{rounds} rounds and still over");
        e.run_flush_round().unwrap();
        rounds += 1;
    }
    e.set_flusher_paused(false);
}

/// One pager pass evicts at most the entries it may look at (16,384), and
/// the passes of the next rounds go on: before, a pass past the high-water
/// mark evicted everything down to the low-water mark at once (a tenth of
/// the default quota, about a million values), while its flusher thread's
/// next round and the durable writes waiting on it waited (found by a
/// review).
#[test]
fn one_pager_pass_evicts_a_bounded_number_of_values() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::builder(dir.path())
        .partitions(1)
        .memory_quota(8 << 20)
        .water_marks(0.85, 0.05)
        .open()
        .unwrap();
    for i in 0..60_000 {
        e.set(format!("k{i:06}").as_bytes(), [b'v'; 100], MEM)
            .unwrap();
    }
    e.flush().unwrap();
    e.set_flusher_paused(true);
    let st = e.stats().unwrap();
    assert_eq!(st.partitions[0].evictions, 0, "under the high-water mark");
    for i in 0..10_000 {
        e.set(format!("n{i:06}").as_bytes(), [b'v'; 100], MEM)
            .unwrap();
    }
    // (A round writes one batch of the new keys: the rest stay dirty.)
    e.run_flush_round().unwrap();
    let evicted = e.stats().unwrap().partitions[0].evictions;
    assert!(
        evicted > 0 && evicted <= 16_384,
        "one pass evicted {evicted}"
    );
    // The next rounds' passes go on. The keys alone are over the low-water
    // mark here, so every value goes.
    let mut rounds = 1;
    while e.stats().unwrap().partitions[0].evicted_items < 70_000 {
        assert!(rounds <= 70_000 / 16_384 + 6, "{rounds} rounds");
        e.run_flush_round().unwrap();
        rounds += 1;
    }
    e.set_flusher_paused(false);
}

#[test]
fn the_pager_keeps_memory_under_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).memory_quota(200 * 1024).open().unwrap();
    for i in 0..4000 {
        e.set(format!("key-{i}").as_bytes(), vec![b'v'; 200], MEM)
            .unwrap();
    }
    e.flush().unwrap();
    // The pager runs after flush rounds; give it rounds by writing a little more.
    let mut evicted = 0;
    for i in 0..200 {
        e.set(format!("more-{i}").as_bytes(), "x", MEM).unwrap();
        e.flush().unwrap();
        evicted = e
            .stats()
            .unwrap()
            .partitions
            .iter()
            .map(|p| p.evicted_items)
            .sum::<usize>();
        if evicted > 0 {
            break;
        }
    }
    assert!(evicted > 0, "the pager never evicted");
    let st = e.stats().unwrap();
    let used: usize = st.partitions.iter().map(|p| p.mem_bytes).sum();
    assert!(used <= 200 * 1024, "resident bytes {used} above the quota");
    for i in 0..4000 {
        assert_eq!(
            e.get(format!("key-{i}").as_bytes()).unwrap().value().len(),
            200
        );
    }
}

/// A completed window that spans several checkpoints reaches the disk whole
/// or not at all: a flush round never stops inside it, so a crash after a
/// round that began it finds every key of the window on disk.
#[test]
fn a_completed_window_reaches_the_disk_whole() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::builder(dir.path())
        .partitions(1)
        .checkpoint_max_items(10)
        .flush_batch_max_items(10)
        .open()
        .unwrap();
    e.set(b"before", b"v", MEM).unwrap();
    e.flush().unwrap();
    e.online_update_start(0).unwrap();
    for i in 0..100 {
        e.set(format!("k{i}").as_bytes(), b"v", MEM).unwrap();
    }
    assert!(
        e.checkpoints(0).unwrap().len() >= 10,
        "the window spans checkpoints"
    );
    e.set_flusher_paused(true);
    e.online_update_complete(0).unwrap();
    // One round: past its 10-item limit it may stop only after the END.
    e.run_flush_round().unwrap();
    e.crash();
    let e = Engine::builder(dir.path()).open().unwrap();
    let n = (0..100)
        .filter(|i| e.get(format!("k{i}").as_bytes()).is_ok())
        .count();
    assert_eq!(n, 100, "the window persisted partially: {n} of 100 keys");
    assert_no_lost_window(&e);
    e.close().unwrap();
}

#[test]
fn a_revert_keeps_a_clean_empty_value_resident() {
    // A clean pre-window value comes back evicted (it is read from disk on
    // access), but an empty one frees nothing that way and would cost a
    // disk read, as warmup, `evict` and the pager know. Before, a revert
    // (and the window's record of the key) evicted it anyway.
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let p = e.partition_of(b"empty");
    e.set(b"empty", b"", MEM).unwrap();
    e.flush().unwrap();
    e.online_update_start(p).unwrap();
    e.set(b"empty", b"x", MEM).unwrap();
    e.online_update_revert(p).unwrap();
    let before = e.stats().unwrap().partitions[usize::from(p)].clone();
    assert_eq!(before.evicted_items, 0);
    assert_eq!(e.get(b"empty").unwrap().value(), b"");
    let after = &e.stats().unwrap().partitions[usize::from(p)];
    assert_eq!(
        after.bg_fetches, before.bg_fetches,
        "the empty value was read back from disk"
    );
    e.close().unwrap();
}

#[test]
fn the_expiry_pass_leaves_a_partition_with_an_open_window_alone() {
    // Before, the expiry pass deleted expired items inside an open window:
    // each deletion a window entry, held (with the window's memory) until
    // COMPLETE or REVERT, and made again after a REVERT.
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = keys_in(&e, 0, 50, "exp");
    let past = WriteOptions {
        expiry: tapkv_engine::RELATIVE_EXPIRY_MAX + 1,
        ..MEM
    };
    for key in &k {
        e.set(key, "v", past).unwrap();
    }
    e.flush().unwrap();
    e.online_update_start(0).unwrap();
    e.run_expiry_pass().unwrap();
    let info = e.stats().unwrap().partitions[0].window.unwrap();
    assert_eq!(info.keys, 0, "the pass made window entries: {info:?}");
    assert!(
        matches!(e.get(&k[0]), Err(Error::NotFound)),
        "expired reads as absent"
    );
    e.online_update_complete(0).unwrap();
    assert_eq!(e.run_expiry_pass().unwrap(), k.len());
}

/// A window that writes over an expired item not yet purged created the
/// key, as clients saw it: its REVERT counts the key removed, and the key
/// reads absent again. Before (found by a review), it was counted restored.
#[test]
fn a_revert_over_an_expired_item_counts_it_removed() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let past = WriteOptions {
        expiry: tapkv_engine::RELATIVE_EXPIRY_MAX + 1,
        ..MEM
    };
    let p = e.partition_of(b"k");
    e.set(b"k", "old", past).unwrap();
    e.flush().unwrap();
    e.online_update_start(p).unwrap();
    e.add(b"k", "new", MEM).unwrap();
    let r = e.online_update_revert(p).unwrap();
    assert_eq!((r.removed, r.restored), (1, 0), "{r:?}");
    assert!(matches!(e.get(b"k"), Err(Error::NotFound)));
    // Added and deleted again in the window: absent before and after,
    // counted neither way.
    e.online_update_start(p).unwrap();
    e.add(b"k", "new", MEM).unwrap();
    e.delete(b"k", MEM).unwrap();
    let r = e.online_update_revert(p).unwrap();
    assert_eq!((r.removed, r.restored), (0, 0), "{r:?}");
    assert!(matches!(e.get(b"k"), Err(Error::NotFound)));
    e.close().unwrap();
}

/// A reverted window's CAS values were handed out to clients: the CAS the
/// disk records for the partition (where the next open's CAS clock starts)
/// covers them. Before, the flusher skipped them with the window's
/// entries, and a clock that stepped back could hand them out again
/// (found by a review).
/// An engine in `dir` with one key persisted and a window open on that
/// key's partition, which it returns.
fn window_after_a_persisted_key(dir: &std::path::Path) -> (Engine, PartitionId) {
    let e = builder(dir).open().unwrap();
    let p = e.partition_of(b"before");
    e.set(b"before", b"v", WriteOptions::default()).unwrap();
    e.flush().unwrap();
    e.online_update_start(p).unwrap();
    (e, p)
}

/// The CAS the disk of `dir` records for partition `p`.
fn disk_max_cas(dir: &std::path::Path, p: PartitionId) -> u64 {
    DiskView::open(dir).unwrap().partitions().unwrap()[usize::from(p)].max_cas
}

#[test]
fn the_disk_keeps_a_reverted_windows_cas_values_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (e, p) = window_after_a_persisted_key(dir.path());
    let keys: Vec<String> = (0..)
        .map(|i| format!("w{i}"))
        .filter(|k| e.partition_of(k.as_bytes()) == p)
        .take(50)
        .collect();
    let window_cas = keys
        .iter()
        .map(|k| {
            e.set(k.as_bytes(), b"x", WriteOptions::default())
                .unwrap()
                .cas
        })
        .max()
        .unwrap();
    e.online_update_revert(p).unwrap();
    e.close().unwrap();
    let disk = disk_max_cas(dir.path(), p);
    assert!(disk >= window_cas, "disk {disk} < window {window_cas}");
}

/// A window still open at a clean close never reaches the disk, but its
/// writes' CAS values were handed out: the close records the partition's
/// CAS clock, so the next open's clock starts above them (found by a
/// review).
#[test]
fn a_clean_close_records_the_cas_of_a_window_left_open() {
    let dir = tempfile::tempdir().unwrap();
    let (e, p) = window_after_a_persisted_key(dir.path());
    let inside = (0..)
        .map(|i| format!("inside{i}"))
        .find(|k| e.partition_of(k.as_bytes()) == p)
        .unwrap();
    let cas = e
        .set(inside.as_bytes(), b"x", WriteOptions::default())
        .unwrap()
        .cas;
    e.close().unwrap();
    let disk = disk_max_cas(dir.path(), p);
    assert!(disk >= cas, "disk {disk} < window write {cas}");
    let e = builder(dir.path()).open().unwrap();
    assert!(
        matches!(e.get(inside.as_bytes()), Err(Error::NotFound)),
        "the window was lost with the close"
    );
    assert!(e.set(b"after", b"v", WriteOptions::default()).unwrap().cas > cas);
}

/// `online_update_window(p)` says what `stats()` says of one partition's
/// window, without walking every partition (a replica asks it at every
/// disk snapshot's start).
#[test]
fn online_update_window_names_one_partitions_open_window() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    assert_eq!(e.online_update_window(1).unwrap(), None);
    let id = e.online_update_start(1).unwrap();
    let w = e.online_update_window(1).unwrap().expect("open");
    assert_eq!(w.checkpoint_id, id);
    assert_eq!(Some(w), e.stats().unwrap().partitions[1].window);
    assert_eq!(e.online_update_window(0).unwrap(), None);
    e.online_update_complete(1).unwrap();
    assert_eq!(e.online_update_window(1).unwrap(), None);
    assert!(matches!(
        e.online_update_window(99),
        Err(Error::NoSuchPartition { .. })
    ));
    e.close().unwrap();
}
