//! Engine side of replication: applying a primary's entries with their own
//! seqnos and CAS, following its windows by id, refusing to revert a window it
//! does not hold, backfill, reset, and `Replicate` without a node.

// A loom build swaps the engine's primitives; only its models run then.
#![cfg(not(any(loom, feature = "loom")))]

mod common;

use std::time::Duration;

use common::builder;
use tapkv_engine::{
    ApplyOutcome, Durability, Engine, Error, ItemMeta, QueueOp, QueuedItem, StreamStart,
    WriteOptions,
};

fn entry(op: QueueOp, key: &str, seqno: u64) -> QueuedItem {
    let value = if op == QueueOp::Mutation {
        format!("v{seqno}")
    } else {
        String::new()
    };
    entry_with(op, key, value.as_bytes(), seqno)
}

fn entry_with(op: QueueOp, key: &str, value: &[u8], seqno: u64) -> QueuedItem {
    QueuedItem::new(
        op,
        key.as_bytes(),
        value,
        ItemMeta {
            by_seqno: seqno,
            cas: 1000 + seqno,
            rev_seqno: 1,
            flags: 0,
            expiry: 0,
        },
    )
}

fn key_in(e: &Engine, p: u16, i: usize) -> String {
    (0..)
        .map(|n| format!("r{n}"))
        .filter(|k| e.partition_of(k.as_bytes()) == p)
        .nth(i)
        .unwrap()
}

#[test]
fn a_replica_applies_entries_windows_and_refuses_foreign_reverts() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).replica(true).open().unwrap();
    let (a, b) = (key_in(&e, 1, 0), key_in(&e, 1, 1));
    assert_eq!(
        e.apply_replicated(1, &entry(QueueOp::Mutation, &a, 5))
            .unwrap(),
        ApplyOutcome::Applied
    );
    assert_eq!(
        e.apply_replicated(1, &entry(QueueOp::Mutation, &a, 5))
            .unwrap(),
        ApplyOutcome::Duplicate
    );
    let got = e.get(a.as_bytes()).unwrap();
    assert_eq!(
        (got.meta.by_seqno, got.meta.cas),
        (5, 1005),
        "the primary's seqno and CAS are kept"
    );
    // The primary's window 7: START, a change, REVERT with the same id.
    let start = entry(QueueOp::OnlineUpdateStart { checkpoint_id: 7 }, "", 6);
    assert_eq!(
        e.apply_replicated(1, &start).unwrap(),
        ApplyOutcome::Applied
    );
    assert_eq!(
        e.stats().unwrap().partitions[1]
            .window
            .unwrap()
            .checkpoint_id,
        7
    );
    e.apply_replicated(1, &entry(QueueOp::Mutation, &b, 7))
        .unwrap();
    e.apply_replicated(1, &entry(QueueOp::Deletion, &a, 8))
        .unwrap();
    // A REVERT naming another window is never applied to this one.
    let foreign = entry(QueueOp::OnlineUpdateRevert { checkpoint_id: 9 }, "", 9);
    assert_eq!(
        e.apply_replicated(1, &foreign).unwrap(),
        ApplyOutcome::Resync
    );
    assert!(e.get(b.as_bytes()).is_ok(), "nothing was reverted");
    let revert = entry(QueueOp::OnlineUpdateRevert { checkpoint_id: 7 }, "", 9);
    assert_eq!(
        e.apply_replicated(1, &revert).unwrap(),
        ApplyOutcome::Applied
    );
    assert!(matches!(e.get(b.as_bytes()), Err(Error::NotFound)));
    assert_eq!(e.get(a.as_bytes()).unwrap().meta.by_seqno, 5);
    // A REVERT without any window open: resynchronise, never guess.
    let stray = entry(QueueOp::OnlineUpdateRevert { checkpoint_id: 11 }, "", 12);
    assert_eq!(e.apply_replicated(1, &stray).unwrap(), ApplyOutcome::Resync);
    // Reset drops everything of the partition, in memory and on disk.
    e.flush().unwrap();
    e.reset_partition(1).unwrap();
    assert!(matches!(e.get(a.as_bytes()), Err(Error::NotFound)));
    assert_eq!(e.high_seqno(1).unwrap(), 0);
    e.apply_replicated(1, &entry(QueueOp::Mutation, &a, 1))
        .unwrap();
    e.close().unwrap();
    let e = builder(dir.path()).replica(true).open().unwrap();
    assert_eq!(e.get(a.as_bytes()).unwrap().meta.by_seqno, 1);
    assert_eq!(
        e.high_seqno(1).unwrap(),
        1,
        "a replica restarts at its persisted seqno"
    );
}

#[test]
fn streams_backfill_when_memory_no_longer_holds_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    for i in 0..300 {
        e.set(format!("k{i}").as_bytes(), "v", WriteOptions::default())
            .unwrap();
    }
    e.delete(b"k0", WriteOptions::default()).unwrap();
    e.flush().unwrap();
    e.close().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let p = e.partition_of(b"k0");
    // Without a cursor: where a backfill would end, and nothing registered.
    let persisted = e.persisted_seqno(p).unwrap();
    assert!(persisted > 0);
    assert_eq!(e.backfill_end(p, 0).unwrap(), Some(persisted));
    assert_eq!(
        e.backfill_end(p, persisted).unwrap(),
        None,
        "memory holds it"
    );
    assert_eq!(
        e.cursors(p).unwrap().len(),
        1,
        "only the persistence cursor"
    );
    match e.stream_start(p, "s", 0).unwrap() {
        StreamStart::Backfill { snapshot_end } => {
            let mut items = Vec::new();
            let n = e
                .backfill(p, 0, snapshot_end, |it| {
                    items.push(it);
                    Ok(())
                })
                .unwrap();
            assert_eq!(n as usize, items.len());
            assert!(
                items.windows(2).all(|w| w[0].key() < w[1].key()),
                "key order"
            );
            items.sort_unstable_by_key(|i| i.seqno());
            assert!(items
                .iter()
                .any(|i| i.op == QueueOp::Deletion && &i.key() == b"k0"));
            assert_eq!(items.last().unwrap().seqno(), snapshot_end);
            // Every key of the partition, each once, at its value.
            let keys = (0..300)
                .filter(|i| e.partition_of(format!("k{i}").as_bytes()) == p)
                .count();
            assert_eq!(items.len(), keys);
            for i in items.iter().filter(|i| i.op == QueueOp::Mutation) {
                assert_eq!(i.value(), b"v");
            }
        }
        other => panic!("expected a backfill, got {other:?}"),
    }
    let high = e.high_seqno(p).unwrap();
    assert_eq!(e.stream_start(p, "t", high).unwrap(), StreamStart::InMemory);
}

#[test]
fn a_disk_snapshot_holds_only_synced_versions() {
    // A snapshot ends at the persisted seqno, whose last versions may not
    // be synced yet (the flusher syncs for durable writers only). A
    // replica that kept part of such a snapshot and then resumed from a
    // primary whose host lost the unsynced tail would never be sent the
    // older versions of keys the snapshot had newer ones of. So a snapshot
    // syncs what it would read first: one sync, and none when all is synced.
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    e.set_flusher_paused(true);
    for i in 0..300 {
        e.set(format!("k{i}").as_bytes(), "v", WriteOptions::default())
            .unwrap();
    }
    // Persisted, not synced; the checkpoints are freed.
    while e.run_flush_round().unwrap() {}
    let p = e.partition_of(b"k0");
    let syncs = e.stats().unwrap().syncs;
    let end = e.backfill_end(p, 0).unwrap();
    assert_eq!(end, Some(e.persisted_seqno(p).unwrap()));
    assert_eq!(e.stats().unwrap().syncs, syncs + 1, "the snapshot synced");
    assert_eq!(e.backfill_end(p, 0).unwrap(), end);
    assert_eq!(e.stats().unwrap().syncs, syncs + 1, "nothing left to sync");
    // A stream's start from disk too.
    for i in 0..300 {
        e.set(format!("k{i}").as_bytes(), "w", WriteOptions::default())
            .unwrap();
    }
    while e.run_flush_round().unwrap() {}
    assert!(matches!(
        e.stream_start(p, "s", 0).unwrap(),
        StreamStart::Backfill { .. }
    ));
    assert_eq!(
        e.stats().unwrap().syncs,
        syncs + 2,
        "the stream's snapshot synced"
    );
}

#[test]
fn a_write_waiting_for_replicas_is_not_deduplicated_away_from_streams() {
    // A replica's acknowledgement of seqno X means it applied everything it
    // was sent up to X. A rewrite of the key in the open checkpoint while a
    // Replicate write waits took the write's entry out of what streams
    // read, so a replica that acknowledged a later seqno of another key
    // satisfied the write without ever having been sent it. The waiting
    // write's entry stays (the rewrite goes to a new checkpoint).
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    struct Held {
        waiting: Mutex<mpsc::Sender<u64>>,
        release: Mutex<mpsc::Receiver<()>>,
    }
    impl tapkv_engine::ReplicationGate for Held {
        fn wait_replicated(
            &self,
            _: &Engine,
            _: u16,
            seqno: u64,
            _: Duration,
        ) -> tapkv_engine::Result<()> {
            self.waiting.lock().unwrap().send(seqno).unwrap();
            self.release
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(30))
                .unwrap();
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let e = Arc::new(builder(dir.path()).open().unwrap());
    let (waiting_tx, waiting) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    e.set_replication_gate(Arc::new(Held {
        waiting: Mutex::new(waiting_tx),
        release: Mutex::new(release_rx),
    }));
    let p = e.partition_of(b"k");
    let other = key_in(&e, p, 0);
    e.register_cursor(p, "replica", e.high_seqno(p).unwrap())
        .unwrap();
    let writer = {
        let e = Arc::clone(&e);
        std::thread::spawn(move || {
            e.set(b"k", "v1", WriteOptions::durable(Durability::Replicate))
                .map(|r| r.seqno)
        })
    };
    let w = waiting.recv_timeout(Duration::from_secs(30)).unwrap();
    e.set(other.as_bytes(), "x", WriteOptions::default())
        .unwrap();
    e.set(b"k", "v2", WriteOptions::default()).unwrap();
    let mut seen = Vec::new();
    loop {
        let batch = e.read_cursor(p, "replica", 100).unwrap();
        if batch.is_empty() {
            break;
        }
        for ev in batch.events {
            if let tapkv_engine::CursorEvent::Item(it) = ev {
                seen.push((String::from_utf8_lossy(it.key()).into_owned(), it.seqno()));
            }
        }
    }
    assert!(
        seen.contains(&("k".to_string(), w)),
        "the waiting write's entry was deduplicated away: {seen:?}"
    );
    release.send(()).unwrap();
    assert_eq!(writer.join().unwrap().unwrap(), w);
}

#[test]
fn a_replicas_engine_refuses_writes_and_windows_of_its_own() {
    // A replica's numbers are its primary's: a local write took a seqno
    // the primary then sent, and the replica dropped the primary's write
    // as one it held. Before, `set`, `delete` and online updates were
    // taken on a replica's engine like on any other.
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path()).replica(true).open().unwrap();
    let refused = |e: Error| matches!(e, Error::WrongState(m) if m.contains("replica"));
    assert!(refused(
        r.set(b"k", "v", WriteOptions::default()).unwrap_err()
    ));
    assert!(refused(
        r.delete(b"k", WriteOptions::default()).unwrap_err()
    ));
    assert!(refused(r.online_update_start(0).unwrap_err()));
    assert!(refused(r.online_update_complete(0).unwrap_err()));
    assert!(refused(r.online_update_revert(0).unwrap_err()));
    // What its primary sends still applies.
    let item = entry(QueueOp::Mutation, "k", 1);
    let p = r.partition_of(b"k");
    assert_eq!(r.apply_replicated(p, &item).unwrap(), ApplyOutcome::Applied);
}

#[test]
fn replicate_durability_needs_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let err = e
        .set(b"k", "v", WriteOptions::durable(Durability::Replicate))
        .unwrap_err();
    assert!(matches!(err, Error::WrongState(_)), "{err:?}");
    assert!(
        matches!(e.get(b"k"), Err(Error::NotFound)),
        "refused before applying"
    );
}

#[test]
fn out_of_range_ids_from_a_stream_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).replica(true).open().unwrap();
    for op in [
        QueueOp::OnlineUpdateStart {
            checkpoint_id: u64::MAX - 1,
        },
        QueueOp::OnlineUpdateEnd {
            checkpoint_id: u64::MAX / 2,
        },
        QueueOp::OnlineUpdateRevert {
            checkpoint_id: u64::MAX,
        },
    ] {
        assert!(
            matches!(
                e.apply_replicated(0, &entry(op, "", 3)),
                Err(Error::InvalidArgument(_))
            ),
            "{op:?}"
        );
    }
    assert!(matches!(
        e.replica_checkpoint(0, u64::MAX - 1),
        Err(Error::InvalidArgument(_))
    ));
    // A CAS at the top of the range would leave the CAS clock nowhere to go
    // (an overflow once the replica takes writes of its own).
    let mut huge = entry(QueueOp::Mutation, "k", 2).meta();
    huge.cas = u64::MAX;
    let item = QueuedItem::new(QueueOp::Mutation, b"k", b"v", huge);
    assert!(matches!(
        e.apply_replicated(0, &item),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(e.get(b"k"), Err(Error::NotFound)));
    // Nothing was applied: the partition still takes a normal window.
    let start = entry(QueueOp::OnlineUpdateStart { checkpoint_id: 9 }, "", 3);
    assert_eq!(
        e.apply_replicated(0, &start).unwrap(),
        ApplyOutcome::Applied
    );
}

#[test]
fn a_disk_snapshot_reads_the_disk_as_it_was_at_its_end() {
    // Ten keys on disk only (reopened), so a stream backfills them. After
    // the snapshot is taken the flusher rewrites one key past its end.
    // Before, a stream read the end first and opened the disk iterator
    // later: the iterator then found that key only at its new seqno,
    // outside the range, and the snapshot sent neither version, while the
    // replica acknowledged the end.
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    {
        let e = builder(dir.path()).partitions(1).open().unwrap();
        for k in &keys {
            e.set(k.as_bytes(), "old", WriteOptions::default()).unwrap();
        }
        e.close().unwrap();
    }
    let e = builder(dir.path()).partitions(1).open().unwrap();
    let read = |snap: tapkv_engine::DiskSnapshot<'_>| {
        let mut got = Vec::new();
        snap.scan_ref(|entry| {
            if let Some(en) = entry {
                got.push((en.key.to_vec(), en.meta.by_seqno, en.value.to_vec()));
            }
            Ok(())
        })
        .unwrap();
        got.sort();
        got
    };
    // Without a cursor (a backfill pass), then with one (the last part).
    let pass = e.backfill_snapshot(0, 0).unwrap().expect("a backfill");
    let last = e
        .stream_start_with_snapshot(0, "s", 0)
        .unwrap()
        .expect("a backfill");
    assert_eq!((pass.end(), last.end()), (10, 10));
    e.set(b"k3", "new", WriteOptions::default()).unwrap();
    e.flush().unwrap();
    assert_eq!(e.persisted_seqno(0).unwrap(), 11);
    for snap in [pass, last] {
        let got = read(snap);
        assert_eq!(got.len(), 10, "{got:?}");
        assert!(
            got.contains(&(b"k3".to_vec(), 4, b"old".to_vec())),
            "{got:?}"
        );
    }
    // The cursor, registered at the snapshot's end, reads the rewrite.
    let after: Vec<(Vec<u8>, u64)> = e
        .read_cursor(0, "s", 100)
        .unwrap()
        .events
        .into_iter()
        .filter_map(|ev| match ev {
            tapkv_engine::CursorEvent::Item(item) => Some((item.key().to_vec(), item.seqno())),
            _ => None,
        })
        .collect();
    assert_eq!(after, vec![(b"k3".to_vec(), 11)]);
}

#[test]
fn a_backfill_scan_ticks_through_stretches_outside_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).partitions(1).open().unwrap();
    let n = tapkv_engine::BACKFILL_TICK * 2 + 10;
    for i in 0..n {
        e.set(format!("k{i:07}").as_bytes(), "v", WriteOptions::default())
            .unwrap();
    }
    e.flush().unwrap();
    let high = e.high_seqno(0).unwrap();
    // Only the last ten seqnos are in range: two ticks, ten items.
    let (mut ticks, mut items) = (0, 0);
    let sent = e
        .backfill_scan(0, high - 10, high, |entry| {
            match entry {
                None => ticks += 1,
                Some(_) => items += 1,
            }
            Ok(())
        })
        .unwrap();
    assert_eq!((ticks, items, sent), (2, 10, 10));
    // `backfill` sees the items only.
    let mut plain = 0;
    e.backfill(0, high - 10, high, |_| {
        plain += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(plain, 10);
}

#[test]
fn a_backfill_scan_of_large_values_ticks_by_bytes_read() {
    // Twenty 1 MiB values: far fewer records than `BACKFILL_TICK`, but
    // more bytes than `BACKFILL_TICK_BYTES`. Before, the scan ticked by
    // records only, so a narrow range of a partition of large values went
    // without a tick (and a stream without a heartbeat) for as long as
    // 65,536 such values took to read.
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).partitions(1).open().unwrap();
    let big = vec![b'v'; 1 << 20];
    let n = tapkv_engine::BACKFILL_TICK_BYTES / big.len() + 4;
    for i in 0..n {
        e.set(
            format!("k{i:03}").as_bytes(),
            &big[..],
            WriteOptions::default(),
        )
        .unwrap();
    }
    e.flush().unwrap();
    let high = e.high_seqno(0).unwrap();
    let (mut ticks, mut items) = (0, 0);
    e.backfill_scan(0, high - 1, high, |entry| {
        match entry {
            None => ticks += 1,
            Some(_) => items += 1,
        }
        Ok(())
    })
    .unwrap();
    assert_eq!((ticks, items), (1, 1));
}

/// A replica's engine in `dir` with `limit` bytes of checkpoint memory,
/// one open checkpoint (it never closes at its item limit) and its flusher
/// paused: flush rounds run only when the test asks, so it is
/// deterministic.
fn memory_limited_replica(dir: &std::path::Path, limit: usize) -> Engine {
    let e = builder(dir)
        .replica(true)
        .checkpoint_max_items(100_000)
        .checkpoint_memory_limit(limit)
        .max_value_size(4 << 10)
        .open()
        .unwrap();
    e.set_flusher_paused(true);
    e
}

#[test]
fn a_replica_expels_persisted_entries_when_its_open_checkpoint_outgrows_memory() {
    // A replica closes checkpoints only when its primary does, so with a
    // checkpoint-memory limit smaller than the primary's open checkpoint,
    // persisted entries fill that memory: before expelling, the replica then
    // refused every entry but one per flush round (nothing flushable left,
    // one entry applied, refused again until it was flushed).
    let dir = tempfile::tempdir().unwrap();
    let limit = 64 * 1024;
    let e = memory_limited_replica(dir.path(), limit);
    let keys: Vec<String> = (0..)
        .map(|n| format!("x{n}"))
        .filter(|k| e.partition_of(k.as_bytes()) == 0)
        .take(2000)
        .collect();
    let big = |key: &str, seqno: u64| entry_with(QueueOp::Mutation, key, &[b'v'; 200], seqno);
    let mut refused = 0;
    for (i, k) in keys.iter().enumerate() {
        let item = big(k, i as u64 + 1);
        loop {
            match e.apply_replicated(0, &item) {
                Ok(out) => {
                    assert_eq!(out, ApplyOutcome::Applied);
                    break;
                }
                Err(Error::TempOutOfMemory { .. }) => {
                    refused += 1;
                    assert!(refused <= 2000, "entry {i} refused again and again");
                    e.run_flush_round().unwrap();
                }
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert!(e.stats().unwrap().checkpoint_mem_bytes <= limit + 1024);
    }
    // About 470 KiB of entries through a 64 KiB limit: a refusal per
    // limit's worth, not one per entry.
    assert!(refused > 0, "the memory limit was never reached");
    assert!(refused <= 40, "{refused} refusals for 2000 entries");
    let st = e.stats().unwrap();
    assert!(st.items_expelled > 1000, "{} expelled", st.items_expelled);
    // Still the one open checkpoint the primary started: expelled, not closed.
    let cks = e.checkpoints(0).unwrap();
    assert_eq!(cks.len(), 1);
    assert!(cks[0].items < 2000);
    // A stream can no longer start inside the expelled entries: it is
    // backfilled from disk up to what is persisted.
    let persisted = e.persisted_seqno(0).unwrap();
    assert!(persisted > 100);
    assert_eq!(
        e.stream_start(0, "late", 10).unwrap(),
        StreamStart::Backfill {
            snapshot_end: persisted
        }
    );
    // A key expelled and written again is one live entry, read by cursors.
    let again = big(&keys[0], 2001);
    e.apply_replicated(0, &again).unwrap();
    assert_eq!(e.get(keys[0].as_bytes()).unwrap().meta.by_seqno, 2001);
    e.set_flusher_paused(false);
    e.flush().unwrap();
    e.close().unwrap();
    let e = builder(dir.path()).replica(true).open().unwrap();
    for k in &keys {
        assert!(e.get(k.as_bytes()).is_ok(), "{k} lost");
    }
    assert_eq!(e.get(keys[0].as_bytes()).unwrap().meta.by_seqno, 2001);
}

#[test]
fn the_disk_never_stops_inside_a_reverted_window() {
    // A window of 30 writes spans several checkpoints of 10 and several
    // flush batches of 10. The flusher skips its entries after the REVERT,
    // but it must not record a persisted seqno between the window's START
    // and REVERT: a backfill ends at the persisted seqno, and a stream
    // started there would send the rest of the window as ordinary writes
    // with no REVERT on disk to undo them.
    let dir = tempfile::tempdir().unwrap();
    let rdir = tempfile::tempdir().unwrap();
    let p = Engine::builder(dir.path())
        .partitions(1)
        .checkpoint_max_items(10)
        .flush_batch_max_items(10)
        .open()
        .unwrap();
    let keys: Vec<String> = (0..30).map(|i| format!("k{i:02}")).collect();
    let mem = WriteOptions::default();
    for k in &keys {
        p.set(k.as_bytes(), "old", mem).unwrap();
    }
    p.flush().unwrap();
    p.set_flusher_paused(true);
    p.online_update_start(0).unwrap();
    let start = p.high_seqno(0).unwrap();
    for k in &keys {
        p.set(k.as_bytes(), "new", mem).unwrap();
    }
    p.online_update_revert(0).unwrap();
    let revert = p.high_seqno(0).unwrap();
    let mut rounds = 0;
    loop {
        let persisted = p.stats().unwrap().partitions[0].persisted_seqno;
        assert!(
            !(start..revert).contains(&persisted),
            "persisted seqno {persisted} inside the reverted window {start}..{revert}"
        );
        if persisted >= revert {
            break;
        }
        p.run_flush_round().unwrap();
        rounds += 1;
        assert!(rounds < 100, "no progress");
    }

    // A replica that joins now gets the pre-window state from disk, and
    // nothing of the window.
    let r = Engine::builder(rdir.path())
        .partitions(1)
        .replica(true)
        .open()
        .unwrap();
    let end = p.backfill_end(0, 0).unwrap().unwrap();
    assert!(end >= revert, "backfill ends at {end}, inside the window");
    let mut snapshot = Vec::new();
    p.backfill(0, 0, end, |item| {
        snapshot.push(item);
        Ok(())
    })
    .unwrap();
    snapshot.sort_by_key(|i| i.seqno());
    for item in &snapshot {
        r.apply_replicated(0, item).unwrap();
    }
    for k in &keys {
        assert_eq!(r.get(k.as_bytes()).unwrap().value(), b"old");
    }
    p.set_flusher_paused(false);
}

/// A replica that stops inside its primary's window does not list the
/// window as lost (it is the primary's, and the stream sends it again from
/// its START); a primary does.
#[test]
fn a_replica_stopped_inside_a_window_lists_no_lost_window() {
    for replica in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let e = builder(dir.path()).replica(replica).open().unwrap();
        let a = key_in(&e, 1, 0);
        if replica {
            e.apply_replicated(1, &entry(QueueOp::Mutation, &a, 1))
                .unwrap();
            let start = entry(QueueOp::OnlineUpdateStart { checkpoint_id: 7 }, "", 2);
            e.apply_replicated(1, &start).unwrap();
            e.apply_replicated(1, &entry(QueueOp::Mutation, &a, 3))
                .unwrap();
        } else {
            e.set(a.as_bytes(), b"v", WriteOptions::default()).unwrap();
            e.online_update_start(1).unwrap();
            e.set(a.as_bytes(), b"w", WriteOptions::default()).unwrap();
        }
        e.crash();
        let e = builder(dir.path()).replica(replica).open().unwrap();
        let lost = e.stats().unwrap().partitions[1].lost_windows.len();
        assert_eq!(lost, usize::from(!replica), "replica {replica}");
        assert!(e.stats().unwrap().partitions[1].window.is_none());
        if !replica {
            // A primary's partitions are not reset (its numbers would be
            // handed out again).
            assert!(matches!(
                e.reset_partition(1),
                Err(tapkv_engine::Error::WrongState(_))
            ));
            e.close().unwrap();
            continue;
        }
        // A reset clears the partition's lost windows, in memory and on disk.
        e.reset_partition(1).unwrap();
        assert!(e.stats().unwrap().partitions[1].lost_windows.is_empty());
        e.close().unwrap();
        let view = tapkv_engine::DiskView::open(dir.path()).unwrap();
        assert!(view.partitions().unwrap()[1].lost_windows.is_empty());
    }
}

/// `n` keys of partition `p` of `e`, named `prefix<i>`.
fn keys_of(e: &Engine, p: u16, prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..)
        .map(|i| format!("{prefix}{i}").into_bytes())
        .filter(|k| e.partition_of(k) == p)
        .take(n)
        .collect()
}

/// Metadata of a replicated entry at `seqno` (its CAS the same number).
fn meta_at(seqno: u64) -> ItemMeta {
    ItemMeta {
        by_seqno: seqno,
        cas: seqno,
        rev_seqno: 1,
        ..Default::default()
    }
}

#[test]
fn numbers_from_the_stream_stay_where_the_replicas_own_open_accepts_them() {
    // The stream's bound is a quarter of the range, the open's a half: a
    // replica adds to what it accepts (checkpoint ids one above the last, a
    // seqno reservation above its high seqno). Before, the stream took
    // numbers up to the open's bound, and a checkpoint id or seqno just
    // under it left a replica whose next open refused its directory.
    let limit = u64::MAX / 4;
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).replica(true).open().unwrap();
    let keys = keys_of(&e, 1, "r", 120);
    let item = |key: &[u8], seqno| {
        tapkv_engine::QueuedItem::new(
            tapkv_engine::QueueOp::Mutation,
            key,
            b"v",
            tapkv_engine::ItemMeta {
                by_seqno: seqno,
                cas: 1000,
                rev_seqno: 1,
                ..Default::default()
            },
        )
    };
    assert!(e.replica_checkpoint(1, limit).is_err());
    assert!(e.apply_replicated(1, &item(&keys[0], limit)).is_err());
    e.replica_checkpoint(1, limit - 1).unwrap();
    // The common builder closes a checkpoint every 50 items: the replica
    // opens ids above the primary's last one.
    for (i, k) in keys.iter().enumerate() {
        e.apply_replicated(1, &item(k, limit - 200 + i as u64))
            .unwrap();
    }
    e.flush().unwrap();
    e.crash();
    for _ in 0..2 {
        let e = builder(dir.path()).replica(true).open().unwrap();
        assert_eq!(e.high_seqno(1).unwrap(), limit - 200 + 119);
        e.crash();
    }
}

/// A replica's engine in `dir` with an online-update memory limit of
/// `window_limit` bytes and values up to `max_value` bytes.
fn window_limited_replica(dir: &std::path::Path, window_limit: usize, max_value: usize) -> Engine {
    builder(dir)
        .replica(true)
        .online_update_memory_limit(window_limit)
        .max_value_size(max_value)
        .open()
        .unwrap()
}

#[test]
fn a_window_from_the_stream_is_held_to_the_replicas_own_limit() {
    // Before, a replica applied whatever a window its primary opened
    // brought: 30 MB with 1 MiB limits in a review's probe.
    let dir = tempfile::tempdir().unwrap();
    let r = window_limited_replica(dir.path(), 256 * 1024, 64 << 10);
    let (applied, bytes) = fill_a_replicated_window(&r);
    assert!(bytes <= 256 * 1024, "{bytes}");
    assert!(applied * 10 * 1024 >= 200 * 1024, "{applied}");
}

/// A replica told its primary's limit, no larger than its own, takes a
/// window past its own limit (the stream may bring versions the primary
/// has replaced since), but not past twice it: a backstop for stale
/// versions nothing else bounds.
#[test]
fn a_window_from_a_primary_with_no_larger_limit_is_held_to_twice_the_replicas_own() {
    let dir = tempfile::tempdir().unwrap();
    let r = window_limited_replica(dir.path(), 256 * 1024, 64 << 10);
    r.set_primary_window_limit(256 * 1024);
    let (applied, bytes) = fill_a_replicated_window(&r);
    assert!(bytes > 256 * 1024 && bytes <= 512 * 1024, "{bytes}");
    assert!(applied * 10 * 1024 >= 450 * 1024, "{applied}");
}

/// Applies its primary's window START to partition 0 of replica `r`, then
/// 10 KiB entries of distinct keys until one is refused for memory (it
/// changes nothing: the window's END still applies); returns the entries
/// applied and the bytes the window held.
fn fill_a_replicated_window(r: &Engine) -> (usize, usize) {
    let p = 0;
    let keys = keys_of(r, p, "w", 100);
    let meta = meta_at;
    let start = QueuedItem::marker(QueueOp::OnlineUpdateStart { checkpoint_id: 2 }, meta(1));
    r.replica_checkpoint(p, 2).unwrap();
    assert_eq!(
        r.apply_replicated(p, &start).unwrap(),
        ApplyOutcome::Applied
    );
    let value = vec![b'v'; 10 * 1024];
    let mut applied = 0;
    let refused = loop {
        let item = QueuedItem::new(
            QueueOp::Mutation,
            &keys[applied],
            &value,
            meta(2 + applied as u64),
        );
        match r.apply_replicated(p, &item) {
            Ok(ApplyOutcome::Applied) => applied += 1,
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
        assert!(applied < 100, "100 entries of 10 KiB went into the window");
    };
    assert!(
        matches!(refused, Error::TempOutOfMemory { .. }),
        "{refused}"
    );
    let window = r.stats().unwrap().partitions[usize::from(p)]
        .window
        .unwrap();
    // The refused entry changed nothing: the window's END still applies.
    let end = QueuedItem::marker(
        QueueOp::OnlineUpdateEnd { checkpoint_id: 2 },
        meta(2 + applied as u64),
    );
    assert_eq!(r.apply_replicated(p, &end).unwrap(), ApplyOutcome::Applied);
    assert_eq!(r.stats().unwrap().items(), applied);
    (applied, window.bytes)
}

/// Applies five 10 KiB entries to partition `p` of replica `r` (seqnos
/// 1..=5, keys `keys[..5]`), then its primary's window START at seqno
/// `start_seqno` (checkpoint 2).
fn backlog_then_window(r: &Engine, p: u16, keys: &[Vec<u8>], start_seqno: u64) {
    let value = vec![b'v'; 10 * 1024];
    for (i, k) in keys[..5].iter().enumerate() {
        let item = QueuedItem::new(QueueOp::Mutation, k, &value, meta_at(1 + i as u64));
        assert_eq!(r.apply_replicated(p, &item).unwrap(), ApplyOutcome::Applied);
    }
    r.replica_checkpoint(p, 2).unwrap();
    let start = QueuedItem::marker(
        QueueOp::OnlineUpdateStart { checkpoint_id: 2 },
        meta_at(start_seqno),
    );
    assert_eq!(
        r.apply_replicated(p, &start).unwrap(),
        ApplyOutcome::Applied
    );
}

#[test]
fn a_replica_waits_for_its_pre_window_backlog_before_passing_its_memory_limit() {
    // Entries before a window's START can be persisted while the window is
    // open, so a replica at its checkpoint-memory limit refuses (the node
    // retries once its flusher caught up) rather than apply past it. Before,
    // a partition with a window open counted as having nothing flushable,
    // and the window's entries went in past the limit while the backlog
    // before them waited.
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path())
        .replica(true)
        .checkpoint_memory_limit(64 * 1024)
        .max_value_size(16 << 10)
        .open()
        .unwrap();
    r.set_flusher_paused(true);
    let p = 0;
    let keys = keys_of(&r, p, "b", 6);
    backlog_then_window(&r, p, &keys, 6);
    let big = vec![b'w'; 20 * 1024];
    let in_window = QueuedItem::new(QueueOp::Mutation, &keys[5], &big, meta_at(7));
    let refused = r.apply_replicated(p, &in_window).unwrap_err();
    assert!(
        matches!(refused, Error::TempOutOfMemory { .. }),
        "{refused}"
    );
    // Once the backlog is on disk, the entry goes in.
    r.set_flusher_paused(false);
    r.flush().unwrap();
    assert_eq!(
        r.apply_replicated(p, &in_window).unwrap(),
        ApplyOutcome::Applied
    );
}

#[test]
fn a_replica_with_a_seqno_gap_before_a_window_flushes_and_applies_it() {
    // A replica's seqnos can skip one before START: a disk snapshot that
    // ended on its primary's END or REVERT marker (acknowledged, never
    // queued). Its flusher then stops at the last seqno it holds, below
    // START - 1. Before, `flush` waited for START - 1 until it timed out,
    // and at the memory limit the replica refused the window's entries for
    // as long as the window stayed open, waiting for a flush that could
    // not come.
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path())
        .replica(true)
        .checkpoint_memory_limit(64 * 1024)
        .max_value_size(16 << 10)
        .persist_timeout(Duration::from_secs(5))
        .open()
        .unwrap();
    let p = 0;
    let keys = keys_of(&r, p, "g", 7);
    // Seqno 6 was the primary's marker; its window starts at 7.
    backlog_then_window(&r, p, &keys, 7);
    r.flush()
        .unwrap_or_else(|e| panic!("flush with a window open after a gap: {e}"));
    // Nothing flushable is left, so entries of the window go in past the
    // memory limit (held to the window's own limit instead).
    for (i, k) in keys[5..].iter().enumerate() {
        let big = vec![b'w'; 40 * 1024];
        let item = QueuedItem::new(QueueOp::Mutation, k, &big, meta_at(8 + i as u64));
        assert_eq!(
            r.apply_replicated(p, &item)
                .unwrap_or_else(|e| panic!("window entry {i}: {e}")),
            ApplyOutcome::Applied
        );
    }
}

#[test]
fn dirty_counts_entries_to_write_not_a_seqno_span() {
    // A replica that holds nothing of partition 0 yet sees its primary
    // open a window at seqno 1,000,003 (a primary restarted after a crash
    // continues past its seqno reservation). Before, `dirty` was the span
    // between the high and persisted seqnos: 1,000,003 here, with one
    // marker unwritten.
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path()).replica(true).open().unwrap();
    r.replica_checkpoint(0, 2).unwrap();
    let start = QueuedItem::marker(
        QueueOp::OnlineUpdateStart { checkpoint_id: 2 },
        meta_at(1_000_003),
    );
    assert_eq!(
        r.apply_replicated(0, &start).unwrap(),
        ApplyOutcome::Applied
    );
    r.flush().unwrap();
    assert_eq!(r.stats().unwrap().dirty(), 1, "the START marker alone");
}

#[test]
fn a_replica_admits_a_window_rewrite_net_of_the_entry_it_replaces() {
    // Its primary admits a rewrite of a key net of the entry it replaces
    // (`a_window_admits_a_rewrite_net_of_the_entry_it_replaces`), so a
    // replica with the same limit must too: five 600 KiB versions of one
    // key in a 1 MiB window. Before, the second was refused.
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path())
        .replica(true)
        .online_update_memory_limit(1 << 20)
        .max_value_size(400 << 10)
        .open()
        .unwrap();
    let p = 0;
    let keys = keys_of(&r, p, "big", 2);
    let start = QueuedItem::marker(QueueOp::OnlineUpdateStart { checkpoint_id: 2 }, meta_at(1));
    r.replica_checkpoint(p, 2).unwrap();
    assert_eq!(
        r.apply_replicated(p, &start).unwrap(),
        ApplyOutcome::Applied
    );
    for i in 0..5u8 {
        let item = QueuedItem::new(
            QueueOp::Mutation,
            &keys[0],
            &vec![i; 600 << 10],
            meta_at(2 + u64::from(i)),
        );
        assert_eq!(
            r.apply_replicated(p, &item)
                .unwrap_or_else(|e| panic!("version {i}: {e}")),
            ApplyOutcome::Applied
        );
    }
    let other = QueuedItem::new(QueueOp::Mutation, &keys[1], &vec![9; 600 << 10], meta_at(7));
    assert!(matches!(
        r.apply_replicated(p, &other),
        Err(Error::TempOutOfMemory { .. })
    ));
}

#[test]
fn a_replica_whose_ids_are_ahead_follows_its_primarys_checkpoints_in_a_window() {
    // A window's rewrites are admitted net of the entry they de-duplicate
    // in the open checkpoint, so a replica must close its checkpoints
    // where its primary does. Before, a replica whose own ids were ahead of
    // its primary's (routine after its restart or a reset) ignored every
    // checkpoint start at or below them, here the one the primary closed on
    // demand inside the window: its rewrites no longer de-duplicated and it
    // refused one its primary took, stalling its link until the window ended.
    let limit = 1 << 20;
    let open = |dir: &std::path::Path, replica: bool| {
        builder(dir)
            .replica(replica)
            .checkpoint_max_items(3)
            .online_update_memory_limit(limit)
            .max_value_size(400 << 10)
            .open()
            .unwrap()
    };
    let pdir = tempfile::tempdir().unwrap();
    let primary = open(pdir.path(), false);
    let p = 0;
    let keys = keys_of(&primary, p, "w", 2);
    let value = vec![b'v'; 300 << 10];
    let rewrites = [&keys[0], &keys[1], &keys[0], &keys[1]];
    let w = primary.online_update_start(p).unwrap();
    let next = primary.create_checkpoint(p).unwrap();
    for k in rewrites {
        primary.set(k, &value[..], WriteOptions::default()).unwrap();
    }

    let rdir = tempfile::tempdir().unwrap();
    let r = open(rdir.path(), true);
    // Its ids ahead of the primary's, as after a restart.
    r.replica_checkpoint(p, 1000).unwrap();
    r.close().unwrap();
    let r = open(rdir.path(), true);
    assert!(r.checkpoints(p).unwrap()[0].id > 1000);
    r.replica_checkpoint(p, w).unwrap();
    let start = QueuedItem::marker(QueueOp::OnlineUpdateStart { checkpoint_id: w }, meta_at(1));
    assert_eq!(
        r.apply_replicated(p, &start).unwrap(),
        ApplyOutcome::Applied
    );
    r.replica_checkpoint(p, next).unwrap();
    for (i, k) in rewrites.into_iter().enumerate() {
        let item = QueuedItem::new(QueueOp::Mutation, k, &value, meta_at(2 + i as u64));
        assert_eq!(
            r.apply_replicated(p, &item)
                .unwrap_or_else(|e| panic!("write {i}: {e}")),
            ApplyOutcome::Applied
        );
    }
    // The window still reverts whole.
    r.apply_replicated(
        p,
        &QueuedItem::marker(QueueOp::OnlineUpdateRevert { checkpoint_id: w }, meta_at(6)),
    )
    .unwrap();
    assert!(matches!(r.get(&keys[0]), Err(Error::NotFound)));
    assert!(matches!(r.get(&keys[1]), Err(Error::NotFound)));
}

#[test]
fn a_replica_takes_every_window_its_primary_took_with_the_same_limit() {
    // The undo map's charge depends on what a node had persisted when the
    // window first touched a key, and a replica persists later than its
    // primary: a key the primary had persisted (charged its key only) may
    // be unpersisted on the replica (charged its whole value). Before, the
    // replica refused such a window at the limit its primary accepted it
    // under, and its link stalled until the window ended.
    let dir = tempfile::tempdir().unwrap();
    let limit = 1 << 20;
    let r = builder(dir.path())
        .replica(true)
        .online_update_memory_limit(limit)
        .max_value_size(64 << 10)
        .checkpoint_memory_limit(64 << 20)
        .open()
        .unwrap();
    r.set_flusher_paused(true);
    let p = 0;
    let keys = keys_of(&r, p, "x", 61);
    let meta = meta_at;
    let put = |key: &[u8], value: &[u8], seqno| {
        let item = QueuedItem::new(QueueOp::Mutation, key, value, meta(seqno));
        r.apply_replicated(p, &item)
    };
    // Not yet persisted here (the primary had persisted it).
    put(&keys[0], &vec![b'k'; 600 * 1024], 1).unwrap();
    r.replica_checkpoint(p, 2).unwrap();
    let start = QueuedItem::marker(QueueOp::OnlineUpdateStart { checkpoint_id: 2 }, meta(2));
    assert_eq!(
        r.apply_replicated(p, &start).unwrap(),
        ApplyOutcome::Applied
    );
    put(&keys[0], b"x", 3).unwrap();
    // 600 KiB more queued in the window: under the 1 MiB limit.
    for (i, k) in keys[1..].iter().enumerate() {
        put(k, &vec![b'v'; 10 * 1024], 4 + i as u64).unwrap();
    }
    r.set_flusher_paused(false);
}

#[test]
fn a_flush_waiting_on_a_partition_that_is_reset_fails_instead_of_passing_on_new_seqnos() {
    // Before, the waiter went on waiting for the old seqno, which the
    // partition's new history would reach with other entries: the flush
    // would have passed as if what the reset dropped were on disk.
    let dir = tempfile::tempdir().unwrap();
    let e = std::sync::Arc::new(
        tapkv_engine::Engine::builder(dir.path())
            .replica(true)
            .persist_timeout(std::time::Duration::from_secs(60))
            .open()
            .unwrap(),
    );
    let p = e.partition_of(b"k");
    e.set_flusher_paused(true);
    e.apply_replicated(p, &entry(QueueOp::Mutation, "k", 1))
        .unwrap();
    let rx = common::waiting_for_a_sync(&e, |e| e.flush());
    e.reset_partition(p).unwrap();
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the waiter was not told of the reset");
    match r {
        Err(tapkv_engine::Error::WrongState(m)) => assert!(m.contains("was reset"), "{m}"),
        other => panic!("not the reset: {other:?}"),
    }
    e.set_flusher_paused(false);
    e.flush().unwrap();
}

/// `apply_replicated_run` applies a run as `apply_replicated` applies each
/// entry: duplicates leave the run unapplied, a window's START inside the
/// run opens the window for the entries after it (and only those are
/// reverted), and a foreign key stops the run there, applied up to it,
/// with the rest left in order.
#[test]
fn a_run_applies_in_order_and_stops_at_the_first_entry_it_cannot_apply() {
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path()).replica(true).open().unwrap();
    let p = 2;
    let k = keys_of(&r, p, "run", 6);
    let foreign = key_in(&r, 3, 0);
    let item =
        |key: &[u8], seqno: u64| QueuedItem::new(QueueOp::Mutation, key, b"v", meta_at(seqno));
    let mut run: std::collections::VecDeque<QueuedItem> = [
        item(&k[0], 1),
        item(&k[1], 2),
        item(&k[0], 2), // held already (seqno 2): dropped unapplied
        QueuedItem::marker(QueueOp::OnlineUpdateStart { checkpoint_id: 1 }, meta_at(3)),
        item(&k[2], 4),
        QueuedItem::new(QueueOp::Deletion, &k[1], b"", meta_at(5)),
        item(foreign.as_bytes(), 6),
        item(&k[3], 7),
    ]
    .into();
    let err = r.apply_replicated_run(p, &mut run).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(
        run.iter().map(QueuedItem::seqno).collect::<Vec<_>>(),
        [6, 7],
        "the refused entry and those after it stay, in order"
    );
    assert_eq!(r.high_seqno(p).unwrap(), 5);
    assert_eq!(r.get(&k[0]).unwrap().meta.by_seqno, 1);
    assert!(
        matches!(r.get(&k[1]), Err(Error::NotFound)),
        "deleted inside the window"
    );
    assert_eq!(r.get(&k[2]).unwrap().meta.by_seqno, 4);
    let window = r.stats().unwrap().partitions[usize::from(p)]
        .window
        .expect("the START inside the run opened the window");
    assert_eq!(window.checkpoint_id, 1);
    // The rest of the stream, fixed: the window's REVERT undoes exactly the
    // entries after its START.
    run.pop_front();
    run.push_back(QueuedItem::marker(
        QueueOp::OnlineUpdateRevert { checkpoint_id: 1 },
        meta_at(8),
    ));
    assert_eq!(
        r.apply_replicated_run(p, &mut run).unwrap(),
        ApplyOutcome::Applied
    );
    assert!(run.is_empty());
    assert_eq!(r.get(&k[0]).unwrap().meta.by_seqno, 1);
    assert_eq!(
        r.get(&k[1]).unwrap().meta.by_seqno,
        2,
        "its deletion reverted"
    );
    assert!(
        matches!(r.get(&k[2]), Err(Error::NotFound)),
        "created in the window: reverted"
    );
    assert!(
        matches!(r.get(&k[3]), Err(Error::NotFound)),
        "created in the window: reverted"
    );
    assert!(r.stats().unwrap().partitions[usize::from(p)]
        .window
        .is_none());
}

/// A run inside a window stops at the entry the replica's window limit
/// refuses, which stays at the front with the rest; the entries before it
/// are applied, and the window's END still applies once the rest is
/// dropped.
#[test]
fn a_run_stops_at_the_entry_its_window_limit_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let r = window_limited_replica(dir.path(), 64 * 1024, 16 << 10);
    let p = 0;
    let keys = keys_of(&r, p, "wr", 20);
    r.replica_checkpoint(p, 2).unwrap();
    let value = vec![b'v'; 10 * 1024];
    let mut run: std::collections::VecDeque<QueuedItem> = std::iter::once(QueuedItem::marker(
        QueueOp::OnlineUpdateStart { checkpoint_id: 2 },
        meta_at(1),
    ))
    .chain(
        (0..20)
            .map(|i| QueuedItem::new(QueueOp::Mutation, &keys[i], &value, meta_at(2 + i as u64))),
    )
    .collect();
    let err = r.apply_replicated_run(p, &mut run).unwrap_err();
    assert!(matches!(err, Error::TempOutOfMemory { .. }), "{err}");
    let applied = r.stats().unwrap().items() as u64;
    assert!(
        (1..20).contains(&applied),
        "some 10 KiB entries fit a 64 KiB window, not all: {applied}"
    );
    assert_eq!(
        run.len() as u64,
        20 - applied,
        "the refused entry and the rest stay"
    );
    assert_eq!(run.front().unwrap().seqno(), 2 + applied);
    assert_eq!(r.high_seqno(p).unwrap(), 1 + applied);
    // A refused entry changes nothing, not even the note of a seqno gap
    // (one past a gap here): before, it made a later failover resync.
    assert!(!r.replica_history_may_have_gaps(p).unwrap());
    let past_a_gap = QueuedItem::new(QueueOp::Mutation, &keys[19], &value, meta_at(applied + 10));
    assert!(matches!(
        r.apply_replicated(p, &past_a_gap),
        Err(Error::TempOutOfMemory { .. })
    ));
    assert!(!r.replica_history_may_have_gaps(p).unwrap());
    let end = QueuedItem::marker(
        QueueOp::OnlineUpdateEnd { checkpoint_id: 2 },
        meta_at(2 + applied),
    );
    assert_eq!(r.apply_replicated(p, &end).unwrap(), ApplyOutcome::Applied);
    assert_eq!(r.stats().unwrap().items() as u64, applied);
}

/// A run stops where `apply_replicated` would have answered `Resync` (a
/// second window's START while one is open) or refused a number out of
/// range: the entries before are applied, the one it stopped at and those
/// after it are left, in order.
#[test]
fn a_run_stops_at_a_resync_and_at_a_number_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path()).replica(true).open().unwrap();
    let p = 1;
    let k = keys_of(&r, p, "rs", 4);
    let item =
        |key: &[u8], seqno: u64| QueuedItem::new(QueueOp::Mutation, key, b"v", meta_at(seqno));
    let start = |id: u64, seqno: u64| {
        QueuedItem::marker(
            QueueOp::OnlineUpdateStart { checkpoint_id: id },
            meta_at(seqno),
        )
    };
    let mut run: std::collections::VecDeque<QueuedItem> = [
        item(&k[0], 1),
        start(1, 2),
        item(&k[1], 3),
        start(2, 4),
        item(&k[2], 5),
    ]
    .into();
    assert_eq!(
        r.apply_replicated_run(p, &mut run).unwrap(),
        ApplyOutcome::Resync
    );
    assert_eq!(
        run.iter().map(QueuedItem::seqno).collect::<Vec<_>>(),
        [4, 5]
    );
    assert_eq!(r.high_seqno(p).unwrap(), 3);

    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path()).replica(true).open().unwrap();
    let mut run: std::collections::VecDeque<QueuedItem> = [
        item(&k[0], 1),
        item(&k[1], u64::MAX / 4),
        item(&k[2], u64::MAX / 4 + 1),
    ]
    .into();
    let err = r.apply_replicated_run(p, &mut run).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(run.len(), 2);
    assert_eq!(run.front().unwrap().seqno(), u64::MAX / 4);
    assert_eq!(r.high_seqno(p).unwrap(), 1);
}

/// A run that reaches the checkpoint-memory limit while flushable entries
/// wait stops at the entry refused for it (`TempOutOfMemory`, as
/// `apply_replicated` refuses it); once the flusher has persisted what
/// waited, the same run goes on from that entry.
#[test]
fn a_run_stops_at_the_checkpoint_memory_limit_and_goes_on_after_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 64 * 1024;
    let r = memory_limited_replica(dir.path(), limit);
    let p = 0;
    let keys = keys_of(&r, p, "cm", 400);
    let mut run: std::collections::VecDeque<QueuedItem> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| QueuedItem::new(QueueOp::Mutation, k, &[b'v'; 400], meta_at(i as u64 + 1)))
        .collect();
    let err = r.apply_replicated_run(p, &mut run).unwrap_err();
    assert!(matches!(err, Error::TempOutOfMemory { .. }), "{err}");
    let applied = r.high_seqno(p).unwrap();
    assert!((1..400).contains(&applied), "{applied}");
    assert_eq!(run.len() as u64, 400 - applied);
    assert_eq!(run.front().unwrap().seqno(), applied + 1);
    assert!(r.stats().unwrap().checkpoint_mem_bytes <= limit);
    let mut rounds = 0;
    while !run.is_empty() {
        match r.apply_replicated_run(p, &mut run) {
            Ok(out) => assert_eq!(out, ApplyOutcome::Applied),
            Err(Error::TempOutOfMemory { .. }) => {
                rounds += 1;
                assert!(rounds < 400, "memory never freed");
                r.run_flush_round().unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(r.high_seqno(p).unwrap(), 400);
    assert_eq!(r.stats().unwrap().items(), 400);
}

#[test]
fn a_primarys_engine_refuses_a_replicas_steps() {
    // Before, a library caller could apply stream entries (seqnos never
    // reserved on disk: handed out again after a crash), follow a
    // primary's checkpoints, or reset a partition (numbered from 1 again)
    // on a primary.
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let k = key_in(&e, 1, 0);
    let wrong = |r: tapkv_engine::Result<()>| matches!(r, Err(tapkv_engine::Error::WrongState(_)));
    assert!(wrong(
        e.apply_replicated(1, &entry(QueueOp::Mutation, &k, 5_000_000))
            .map(|_| ())
    ));
    let mut run = std::collections::VecDeque::from([entry(QueueOp::Mutation, &k, 5_000_000)]);
    assert!(wrong(e.apply_replicated_run(1, &mut run).map(|_| ())));
    assert_eq!(run.len(), 1);
    assert!(wrong(e.replica_checkpoint(1, 10_000)));
    assert!(wrong(e.replica_checkpoint_end(1, 10_000)));
    assert!(wrong(e.reset_partition(1)));
    let log = e.failover_log(1).unwrap();
    assert!(wrong(e.set_failover_log(
        1,
        vec![tapkv_engine::FailoverEntry { uuid: 7, seqno: 0 }]
    )));
    assert_eq!(e.failover_log(1).unwrap(), log);
    assert!(matches!(
        e.get(k.as_bytes()),
        Err(tapkv_engine::Error::NotFound)
    ));
    assert_eq!(
        e.set(k.as_bytes(), "v", WriteOptions::default())
            .unwrap()
            .seqno,
        1
    );
    e.close().unwrap();
}

#[test]
fn one_snapshot_buffer_per_partition_is_open_at_a_time() {
    // Spilled entries are keyed by partition and seqno only. Before, a
    // second buffer of a partition wiped the first's spilled entries, and
    // the first then applied what was left as if whole.
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path())
        .replica(true)
        .snapshot_buffer_limit(1024)
        .open()
        .unwrap();
    let mut a = e.snapshot_buffer(1).unwrap();
    for seqno in 1..=300 {
        a.push(entry(QueueOp::Mutation, &format!("k{seqno}"), seqno))
            .unwrap();
    }
    assert!(a.staged_items() > 0, "the buffer spilled");
    assert!(matches!(
        e.snapshot_buffer(1),
        Err(tapkv_engine::Error::WrongState(_))
    ));
    // Another partition's is independent.
    drop(e.snapshot_buffer(2).unwrap());
    let mut seen = 0;
    assert!(a
        .apply(|_| {
            seen += 1;
            Ok(true)
        })
        .unwrap());
    assert_eq!(seen, 300);
    // Once it is gone, the partition takes a new one.
    drop(e.snapshot_buffer(1).unwrap());
    e.close().unwrap();
}

#[test]
fn only_the_end_of_the_checkpoint_the_stream_is_in_fills_its_gaps() {
    // Before, any id (0, a stale one) cleared the replica's note of a seqno
    // gap, and an unclean primary restart was then resumed over the hole.
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path()).replica(true).open().unwrap();
    let (a, b) = (key_in(&r, 1, 0), key_in(&r, 1, 1));
    r.replica_checkpoint(1, 5).unwrap();
    r.apply_replicated(1, &entry(QueueOp::Mutation, &a, 1))
        .unwrap();
    r.apply_replicated(1, &entry(QueueOp::Mutation, &b, 3))
        .unwrap();
    assert!(r.replica_history_may_have_gaps(1).unwrap());
    for other in [0, 4, 6] {
        r.replica_checkpoint_end(1, other).unwrap();
        assert!(r.replica_history_may_have_gaps(1).unwrap(), "END {other}");
    }
    r.replica_checkpoint_end(1, 5).unwrap();
    assert!(!r.replica_history_may_have_gaps(1).unwrap());
    r.close().unwrap();
}

/// A primary's window as a stream delivers it: a key's large version read
/// before the primary replaced it, the replacement after two more large
/// entries. The primary never queued more than two large values; a replica
/// counting what it was delivered queues three. Told its primary's limit
/// (no larger than its own), the replica takes every entry the primary
/// took; not told it, it holds the window to its own limit by what it
/// queues. Before, a replica with its primary's limit refused such an
/// entry and its link stalled until the window ended (found by a review).
#[test]
fn a_replica_told_its_primarys_window_limit_takes_every_entry_its_primary_took() {
    use tapkv_engine::CursorEvent;
    let limit = 1 << 20;
    let open = |dir: &std::path::Path, replica: bool| {
        builder(dir)
            .replica(replica)
            .online_update_memory_limit(limit)
            .max_value_size(400 << 10)
            .open()
            .unwrap()
    };
    for told in [true, false] {
        let (pdir, rdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (primary, r) = (open(pdir.path(), false), open(rdir.path(), true));
        if told {
            r.set_primary_window_limit(limit);
        }
        let p = 0;
        let k = keys_of(&primary, p, "w", 3); // J, E, F
        let big = vec![b'v'; 350 << 10];
        primary.stream_start(p, "repl:t", 0).unwrap();
        // Feeds what the stream's cursor holds to the replica; the first
        // refusal, if any.
        let feed = || -> Option<Error> {
            let mut evs = Vec::new();
            // A read stops at a checkpoint's end: read until nothing is left.
            loop {
                let before = evs.len();
                primary
                    .read_cursor_with(p, "repl:t", 1000, |ev| evs.push(ev.to_owned()))
                    .unwrap();
                if evs.len() == before {
                    break;
                }
            }
            for ev in evs {
                match ev {
                    CursorEvent::CheckpointStart { id } => r.replica_checkpoint(p, id).unwrap(),
                    CursorEvent::CheckpointEnd { id } => r.replica_checkpoint_end(p, id).unwrap(),
                    CursorEvent::Item(item) => match r.apply_replicated(p, &item) {
                        Ok(outcome) => assert_eq!(outcome, ApplyOutcome::Applied),
                        Err(e) => return Some(e),
                    },
                }
            }
            None
        };
        let w = WriteOptions::default;
        primary.online_update_start(p).unwrap();
        primary.set(&k[0], &big[..], w()).unwrap();
        assert!(feed().is_none()); // the replica holds J at 350 KiB
        primary.set(&k[0], b"x", w()).unwrap();
        primary.set(&k[1], &big[..], w()).unwrap();
        primary.set(&k[2], &big[..], w()).unwrap(); // ~700 KiB on the primary
        primary.set(&k[0], b"y", w()).unwrap(); // J's new version after E and F
        let refused = feed();
        if told {
            assert!(refused.is_none(), "{refused:?}");
            assert_eq!(r.get(&k[0]).unwrap().value(), b"y");
            assert_eq!(r.get(&k[2]).unwrap().value(), &big[..]);
        } else {
            assert!(
                matches!(refused, Some(Error::TempOutOfMemory { .. })),
                "{refused:?}"
            );
        }
    }
}

/// After a primary's crash its seqnos continue above its reservation while
/// its disk ends lower, with nothing between: a stream caught up to the
/// disk's end resumes from memory. Before (found by a review), memory
/// started at the reservation: every resume of every partition was sent a
/// disk snapshot of the empty range (a full scan of the partition) until
/// it was written again.
#[test]
fn a_stream_caught_up_before_a_primary_crash_resumes_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let p = e.partition_of(b"k");
    e.set(b"k", b"v", WriteOptions::default()).unwrap();
    e.flush().unwrap();
    let disk = e.persisted_seqno(p).unwrap();
    e.crash();
    let e = builder(dir.path()).open().unwrap();
    let high = e.high_seqno(p).unwrap();
    assert!(high > disk, "numbering continues above the reservation");
    assert_eq!(e.backfill_end(p, disk).unwrap(), None, "memory holds it");
    assert_eq!(e.stream_start(p, "s", disk).unwrap(), StreamStart::InMemory);
    // The next write is above the reservation, read from the cursor, and
    // persisted.
    let w = e.set(b"k", b"v2", WriteOptions::default()).unwrap();
    assert!(w.seqno > high);
    let batch = e.read_cursor(p, "s", 100).unwrap();
    let seqnos: Vec<u64> = batch
        .events
        .iter()
        .filter_map(|ev| match ev {
            tapkv_engine::CursorEvent::Item(i) => Some(i.seqno()),
            _ => None,
        })
        .collect();
    assert_eq!(seqnos, vec![w.seqno]);
    e.flush().unwrap();
    assert_eq!(e.persisted_seqno(p).unwrap(), w.seqno);
    e.close().unwrap();
    let e = builder(dir.path()).open().unwrap();
    assert_eq!(e.get(b"k").unwrap().value(), b"v2");
    e.close().unwrap();
}
