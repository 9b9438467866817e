//! Bad input gets a typed error and the engine keeps serving.

// A loom build swaps the engine's primitives; only its models run then.
#![cfg(not(any(loom, feature = "loom")))]

mod common;

use common::builder;
use tapkv_engine::{Engine, Error, WriteOptions};

#[test]
fn each_bad_request_is_a_typed_error_and_the_engine_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).max_value_size(1024).open().unwrap();
    let ok = WriteOptions::default();
    assert!(matches!(
        e.set(&[b'k'; 251], "v", ok),
        Err(Error::KeyTooLarge { len: 251, max: 250 })
    ));
    assert!(matches!(
        e.set(b"", "v", ok),
        Err(Error::InvalidArgument(m)) if m.contains("empty")
    ));
    assert!(matches!(e.get(b""), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        e.get(&[b'k'; 251]),
        Err(Error::KeyTooLarge { .. })
    ));
    assert!(matches!(
        e.set(b"k", vec![0u8; 1025], ok),
        Err(Error::ValueTooLarge {
            len: 1025,
            max: 1024
        })
    ));
    let r = e.set(b"k", "v1", ok).unwrap();
    assert!(matches!(e.add(b"k", "v2", ok), Err(Error::Exists)));
    assert!(matches!(
        e.replace(b"missing", "v", ok),
        Err(Error::NotFound)
    ));
    assert!(matches!(e.delete(b"missing", ok), Err(Error::NotFound)));
    assert!(matches!(
        e.set(b"k", "v3", ok.with_cas(r.cas + 1)),
        Err(Error::CasMismatch { expected, current }) if expected == r.cas + 1 && current == r.cas
    ));
    assert!(matches!(
        e.set(b"missing", "v", ok.with_cas(5)),
        Err(Error::NotFound)
    ));
    assert!(matches!(
        e.delete(b"k", ok.with_cas(r.cas + 1)),
        Err(Error::CasMismatch { .. })
    ));
    assert!(matches!(
        e.checkpoints(99),
        Err(Error::NoSuchPartition {
            partition: 99,
            count: 4
        })
    ));
    assert!(matches!(
        e.register_cursor(0, tapkv_engine::PERSISTENCE_CURSOR, 0),
        Err(Error::InvalidArgument(_))
    ));
    // None of that changed anything, and the engine still serves.
    assert_eq!(&e.get(b"k").unwrap().value(), b"v1");
    let r2 = e.set(b"k", "v4", ok.with_cas(r.cas)).unwrap();
    assert!(r2.cas > r.cas && r2.seqno > r.seqno);
    e.replace(b"k", "v5", ok).unwrap();
    e.add(b"fresh", "v", ok).unwrap();
    e.delete(b"fresh", ok.with_cas(e.get(b"fresh").unwrap().meta.cas))
        .unwrap();
    assert_eq!(&e.get(b"k").unwrap().value(), b"v5");
    assert!(matches!(e.get(b"fresh"), Err(Error::NotFound)));
}

#[test]
fn a_held_directory_gives_a_clear_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let _first = builder(dir.path()).open().unwrap();
    let err = builder(dir.path()).open().unwrap_err();
    match &err {
        Error::Locked { path } => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(err.to_string().contains(&dir.path().display().to_string()));
}

#[test]
fn reopening_with_another_partition_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    builder(dir.path()).open().unwrap().close().unwrap();
    let err = Engine::builder(dir.path())
        .partitions(8)
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::Incompatible { .. }), "{err:?}");
    // The directory is still usable with its own settings.
    builder(dir.path()).open().unwrap().close().unwrap();
}

#[test]
fn a_directory_reopens_with_its_own_partition_count_unless_one_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::builder(dir.path()).partitions(4).open().unwrap();
    e.set(b"k", "v", WriteOptions::default()).unwrap();
    e.close().unwrap();
    // Default settings: the directory's own count, not the default 16.
    let e = Engine::builder(dir.path()).open().unwrap();
    assert_eq!(e.num_partitions(), 4);
    assert_eq!(&e.get(b"k").unwrap().value(), b"v");
    e.close().unwrap();
    // A flusher thread count only a larger default would allow is refused.
    let err = Engine::builder(dir.path())
        .flusher_threads(8)
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(Engine::builder(dir.path()).partitions(4).open().is_ok());
}

#[test]
fn expired_items_read_as_absent() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    e.set(
        b"old",
        "v",
        WriteOptions {
            expiry: tapkv_engine::RELATIVE_EXPIRY_MAX + 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(e.get(b"old"), Err(Error::NotFound)));
    // So does `evict` of it, persisted or not (before: `Ok`, or
    // `WrongState` for a key "not yet persisted", while `get` said absent).
    assert!(matches!(e.evict(b"old"), Err(Error::NotFound)));
    e.flush().unwrap();
    assert!(matches!(e.evict(b"old"), Err(Error::NotFound)));
    e.add(b"old", "new", WriteOptions::default()).unwrap();
    assert_eq!(&e.get(b"old").unwrap().value(), b"new");
}

#[test]
fn the_expiry_pass_deletes_expired_items_on_a_primary_only() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    e.set_flusher_paused(true);
    let with_expiry = |expiry| WriteOptions {
        expiry,
        ..Default::default()
    };
    for i in 0..300 {
        let expiry = match i % 3 {
            0 => tapkv_engine::RELATIVE_EXPIRY_MAX + 1, // long past
            1 => u32::MAX,                              // far future
            _ => 0,                                     // never
        };
        e.set(format!("k{i}").as_bytes(), "v", with_expiry(expiry))
            .unwrap();
    }
    // Rewritten with a new expiry after it expired: kept.
    e.set(b"k0", "again", WriteOptions::default()).unwrap();
    assert_eq!(e.stats().unwrap().items(), 301 - 1);
    // The pass queues a deletion for each expired item; a flush round
    // persists them.
    assert_eq!(e.run_expiry_pass().unwrap(), 99);
    assert_eq!(e.run_expiry_pass().unwrap(), 0, "deleted twice");
    e.run_flush_round().unwrap();
    let st = e.stats().unwrap();
    assert_eq!(st.items(), 201, "expired items still held");
    assert_eq!(st.partitions.iter().map(|p| p.expired).sum::<u64>(), 99);
    assert_eq!(e.get(b"k0").unwrap().value(), b"again");
    assert!(matches!(e.get(b"k3"), Err(Error::NotFound)));
    e.set_flusher_paused(false);
    e.close().unwrap();
    // The tombstones are on disk: a reopen loads none of them.
    let e = builder(dir.path()).open().unwrap();
    assert_eq!(e.stats().unwrap().items(), 201);
    drop(e);

    // In the background, every `expiry_pager_interval`.
    let bdir = tempfile::tempdir().unwrap();
    let e = builder(bdir.path())
        .expiry_pager_interval(std::time::Duration::from_millis(1))
        .open()
        .unwrap();
    for i in 0..50 {
        e.set(
            format!("b{i}").as_bytes(),
            "v",
            with_expiry(tapkv_engine::RELATIVE_EXPIRY_MAX + 1),
        )
        .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while e.stats().unwrap().items() > 0 {
        assert!(std::time::Instant::now() < deadline, "never expired");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        e.stats()
            .unwrap()
            .partitions
            .iter()
            .map(|p| p.expired)
            .sum::<u64>(),
        50
    );
    drop(e);

    // A replica leaves expiry to its primary (whose deletions it applies).
    let rdir = tempfile::tempdir().unwrap();
    let r = builder(rdir.path())
        .replica(true)
        .expiry_pager_interval(std::time::Duration::ZERO)
        .open()
        .unwrap();
    let item = tapkv_engine::QueuedItem::new(
        tapkv_engine::QueueOp::Mutation,
        b"r",
        b"v",
        tapkv_engine::ItemMeta {
            by_seqno: 1,
            cas: 1,
            rev_seqno: 1,
            flags: 0,
            expiry: 1,
        },
    );
    let p = r.partition_of(b"r");
    r.apply_replicated(p, &item).unwrap();
    assert_eq!(r.run_expiry_pass().unwrap(), 0);
    assert_eq!(r.stats().unwrap().items(), 1);
}

#[test]
fn a_refused_directory_is_left_as_the_build_that_wrote_it_can_open_it() {
    // What a format-1 or format-2 build leaves: only the `items` and
    // `meta` column families. This build refuses format 1, and format 2
    // opened with another partition count, without adding its `staging`
    // family (before, the refused open added it, and the writing build
    // could no longer open its own directory).
    for (format, partitions) in [(1, None), (2, Some(8))] {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("rocksdb");
        {
            let mut o = rocksdb::Options::default();
            o.create_if_missing(true);
            o.create_missing_column_families(true);
            let db = rocksdb::DB::open_cf(&o, &db_path, ["items", "meta"]).unwrap();
            let meta = format!(r#"{{"format":{format},"partitions":16}}"#);
            db.put_cf(db.cf_handle("meta").unwrap(), b"engine", meta)
                .unwrap();
        }
        let mut b = Engine::builder(dir.path());
        if let Some(n) = partitions {
            b = b.partitions(n);
        }
        assert!(
            matches!(b.open(), Err(Error::Incompatible { .. })),
            "format {format}"
        );
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &db_path).unwrap();
        assert!(
            !cfs.iter().any(|c| c == "staging"),
            "format {format}: {cfs:?}"
        );
        rocksdb::DB::open_cf(&rocksdb::Options::default(), &db_path, ["items", "meta"])
            .unwrap_or_else(|e| panic!("format {format}: {e}"));
        // `tapkv admin` names the format, not a damaged record.
        let view = tapkv_engine::DiskView::open(dir.path());
        if format == 1 {
            assert!(matches!(view, Err(Error::Incompatible { .. })));
        } else {
            assert_eq!(view.unwrap().partitions().unwrap().len(), 16);
        }
    }
}

#[test]
fn persisted_numbers_out_of_range_are_corruption() {
    // A state record that parses but whose high seqno could no longer
    // increase: before, the release build's arithmetic wrapped and seqnos
    // were handed out again.
    let dir = tempfile::tempdir().unwrap();
    builder(dir.path()).open().unwrap().close().unwrap();
    {
        let db_path = dir.path().join("rocksdb");
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &db_path).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &db_path, cfs).unwrap();
        let mut key = b"state/".to_vec();
        key.extend_from_slice(&0u16.to_be_bytes());
        db.put_cf(
            db.cf_handle("meta").unwrap(),
            key,
            br#"{"high_seqno":18446744073709551615,"checkpoint_id":1,"max_cas":0}"#,
        )
        .unwrap();
    }
    let r = builder(dir.path()).open();
    assert!(matches!(r, Err(Error::Corruption(_))), "{:?}", r.err());
    // Refused before the open changed anything: still a clean shutdown.
    let view = tapkv_engine::DiskView::open(dir.path()).unwrap();
    assert!(view.clean_shutdown().unwrap());
    // `tapkv admin inspect` names the same damage (before, it printed the
    // table as if nothing were wrong).
    assert!(
        matches!(view.partitions(), Err(Error::Corruption(ref m)) if m.contains("high seqno")),
        "{:?}",
        view.partitions().map(|_| ())
    );
}

#[test]
fn the_expiry_pass_works_in_batches_and_goes_on_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    e.set_flusher_paused(true);
    let expired = WriteOptions {
        expiry: tapkv_engine::RELATIVE_EXPIRY_MAX + 1,
        ..Default::default()
    };
    for i in 0..25_000 {
        e.set(format!("x{i}").as_bytes(), "v", expired).unwrap();
    }
    // Each pass stops after 10,000 deletions (the flusher goes on between
    // passes); the next picks up from there.
    assert_eq!(e.run_expiry_pass().unwrap(), 10_000);
    assert_eq!(e.run_expiry_pass().unwrap(), 10_000);
    assert_eq!(e.run_expiry_pass().unwrap(), 5_000);
    assert_eq!(e.run_expiry_pass().unwrap(), 0);
    assert_eq!(e.stats().unwrap().items(), 0);
    e.set_flusher_paused(false);
}

/// An expiry pass looks at 65,536 entries at most and the next goes on
/// from there: it runs on a flusher thread, whose next round (and the
/// durable writes on it) waits for it. Before, a pass that found few
/// expired items read the whole table (found by a review). Here 50 expired
/// keys among 100,000 live ones, spread over the table by their hashes:
/// the first pass reaches only part of them (all 50 in its 65% of the
/// table has a chance below 1e-9), the next one the rest.
#[test]
fn an_expiry_pass_looks_at_a_bounded_part_of_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).partitions(1).open().unwrap();
    e.set_flusher_paused(true);
    for i in 0..100_000 {
        e.set(format!("live-{i}").as_bytes(), "v", WriteOptions::default())
            .unwrap();
    }
    let expired = WriteOptions {
        expiry: tapkv_engine::RELATIVE_EXPIRY_MAX + 1,
        ..Default::default()
    };
    for i in 0..50 {
        e.set(format!("x{i}").as_bytes(), "v", expired).unwrap();
    }
    let first = e.run_expiry_pass().unwrap();
    let second = e.run_expiry_pass().unwrap();
    assert!(first < 50, "the first pass read the whole table");
    assert_eq!(first + second, 50);
    assert_eq!(e.run_expiry_pass().unwrap(), 0);
    assert_eq!(e.stats().unwrap().items(), 100_000);
    e.set_flusher_paused(false);
}

#[test]
fn a_replicas_directory_is_refused_to_a_primary() {
    // Before, `tapkv kv set --data <a replica's directory>` answered OK and
    // the write was rolled back when the replica rejoined its primary.
    let open_close = |dir: &std::path::Path, replica: bool| {
        builder(dir)
            .replica(replica)
            .open()
            .unwrap()
            .close()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    open_close(dir.path(), true);
    match builder(dir.path()).open() {
        Err(Error::Incompatible { reason, .. }) => {
            assert!(reason.contains("replica's data directory"), "{reason}")
        }
        other => panic!("opened as a primary: {:?}", other.err()),
    }
    open_close(dir.path(), true);
    // A primary's directory may seed a replica (its history is the
    // primary's). Until a replication session confirms that history it
    // still holds a primary's data, and may be run as a primary again;
    // once confirmed it is a replica's.
    let seed = tempfile::tempdir().unwrap();
    open_close(seed.path(), false);
    let e = builder(seed.path()).replica(true).open().unwrap();
    assert!(e.holds_primary_data());
    e.close().unwrap();
    open_close(seed.path(), false);
    let e = builder(seed.path()).replica(true).open().unwrap();
    assert!(e.holds_primary_data());
    e.confirm_replica().unwrap();
    assert!(!e.holds_primary_data());
    e.close().unwrap();
    assert!(matches!(
        builder(seed.path()).open(),
        Err(Error::Incompatible { .. })
    ));
    // A fresh replica's directory holds no primary's data.
    let fresh = tempfile::tempdir().unwrap();
    let e = builder(fresh.path()).replica(true).open().unwrap();
    assert!(!e.holds_primary_data());
    e.close().unwrap();
}

/// Opens the RocksDB database of a closed data directory, to damage it.
fn raw_db(dir: &std::path::Path) -> rocksdb::DB {
    let db_path = dir.join("rocksdb");
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &db_path).unwrap();
    rocksdb::DB::open_cf(&rocksdb::Options::default(), &db_path, cfs).unwrap()
}

type RawRecord = (Box<[u8]>, Box<[u8]>);

/// Every raw record of the `meta` family, to show a refused open changed
/// nothing.
fn meta_records(dir: &std::path::Path) -> Vec<RawRecord> {
    let db = raw_db(dir);
    db.iterator_cf(db.cf_handle("meta").unwrap(), rocksdb::IteratorMode::Start)
        .map(Result::unwrap)
        .collect()
}

/// A directory holding 200 keys in its 4 partitions, closed cleanly.
fn full_directory() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    for i in 0..200 {
        e.set(&common::key(i), common::value(i), WriteOptions::default())
            .unwrap();
    }
    e.close().unwrap();
    dir
}

/// Asserts the engine and `DiskView` both refuse `dir` as corruption whose
/// message contains `says`, and that the refused open left every meta
/// record (clean-shutdown mark, reservations, failover logs) as it was.
fn assert_refused_unchanged(dir: &std::path::Path, says: &str) {
    let before = meta_records(dir);
    for _ in 0..3 {
        match Engine::builder(dir).open() {
            Err(Error::Corruption(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("expected corruption, got {:?}", other.map(|_| ())),
        }
    }
    assert!(
        before == meta_records(dir),
        "a refused open changed the directory"
    );
    let view = tapkv_engine::DiskView::open(dir).and_then(|v| v.partitions());
    match view {
        Err(Error::Corruption(m)) => assert!(m.contains(says), "{m}"),
        other => panic!("DiskView: expected corruption, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_missing_engine_record_beside_items_is_corruption_not_a_new_directory() {
    // Before, the open took the directory for a new one: it wrote a fresh
    // record with its own partition count (16 here, not the directory's
    // 4), and 3 keys in 4 could no longer be found.
    let dir = full_directory();
    {
        let db = raw_db(dir.path());
        db.delete_cf(db.cf_handle("meta").unwrap(), b"engine")
            .unwrap();
    }
    assert_refused_unchanged(dir.path(), "the engine record is missing");
}

#[test]
fn items_above_their_partitions_persisted_state_are_corruption() {
    // A state record lost, or one behind its items: before, the partition
    // started from the state (or the reservation) and handed out seqnos
    // the items on disk already had.
    for damage in ["missing", "behind"] {
        let dir = full_directory();
        {
            let db = raw_db(dir.path());
            let mut key = b"state/".to_vec();
            key.extend_from_slice(&0u16.to_be_bytes());
            let meta = db.cf_handle("meta").unwrap();
            if damage == "missing" {
                db.delete_cf(meta, key).unwrap();
            } else {
                db.put_cf(
                    meta,
                    key,
                    br#"{"high_seqno":1,"checkpoint_id":1,"max_cas":0}"#,
                )
                .unwrap();
            }
        }
        assert_refused_unchanged(dir.path(), "above the partition's persisted high seqno");
    }
}

#[test]
fn an_item_under_another_partition_is_corruption() {
    // Before, it loaded into a partition no lookup of its key goes to:
    // counted, streamed to replicas, never readable.
    let dir = full_directory();
    {
        let db = raw_db(dir.path());
        let items = db.cf_handle("items").unwrap();
        let (k, v) = db
            .iterator_cf(items, rocksdb::IteratorMode::Start)
            .next()
            .unwrap()
            .unwrap();
        let mut moved = k.to_vec();
        moved[..2].copy_from_slice(&(u16::from_be_bytes([k[0], k[1]]) + 1).to_be_bytes());
        db.delete_cf(items, &k).unwrap();
        db.put_cf(items, moved, v).unwrap();
    }
    assert_refused_unchanged(dir.path(), "belongs to partition");
}

#[test]
fn a_replicated_rev_seqno_out_of_range_is_refused() {
    // The next local write of the key would have wrapped its revision.
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path()).replica(true).open().unwrap();
    let meta = |rev_seqno| tapkv_engine::ItemMeta {
        by_seqno: 1,
        cas: 1,
        rev_seqno,
        ..Default::default()
    };
    let item =
        |rev| tapkv_engine::QueuedItem::new(tapkv_engine::QueueOp::Mutation, b"k", b"v", meta(rev));
    let p = r.partition_of(b"k");
    assert!(matches!(
        r.apply_replicated(p, &item(u64::MAX)),
        Err(Error::InvalidArgument(_))
    ));
    // A key under another partition than its own, which the replica's
    // next open would refuse as corruption (before, it was kept).
    let other = (p + 1) % r.num_partitions();
    assert!(matches!(
        r.apply_replicated(other, &item(7)),
        Err(Error::InvalidArgument(_))
    ));
    r.apply_replicated(p, &item(7)).unwrap();
    assert_eq!(r.get(b"k").unwrap().meta.rev_seqno, 7);
    // Failover log entries are held to the bound the open checks.
    let entry = |seqno| tapkv_engine::FailoverEntry { uuid: 1, seqno };
    assert!(matches!(
        r.set_failover_log(p, vec![entry(0), entry(u64::MAX - 1)]),
        Err(Error::InvalidArgument(_))
    ));
    // Never empty, and bounded as the open bounds it (before, both taken).
    assert!(matches!(
        r.set_failover_log(p, vec![]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        r.set_failover_log(p, vec![entry(0); 26]),
        Err(Error::InvalidArgument(_))
    ));
    r.set_failover_log(p, vec![entry(0)]).unwrap();
    r.close().unwrap();
    builder(dir.path()).replica(true).open().unwrap();
}

#[test]
fn water_marks_outside_zero_low_high_one_are_refused() {
    // Before, swapped marks left memory just under high water, a low mark
    // over 1 stopped eviction, and a NaN evicted every clean value each round.
    let dir = tempfile::tempdir().unwrap();
    for (high, low) in [
        (0.5, 0.9),
        (0.9, 0.9),
        (1.5, 1.2),
        (f64::NAN, 0.5),
        (0.9, 0.0),
    ] {
        let r = builder(dir.path()).water_marks(high, low).open();
        assert!(
            matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains("water marks")),
            "high {high} low {low}: {:?}",
            r.map(|_| ())
        );
    }
    builder(dir.path())
        .water_marks(1.0, 0.5)
        .open()
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn a_damaged_format_2_directory_is_refused_without_being_upgraded() {
    // Before, the upgrade to format 3 (a new column family, a rewritten
    // engine record) ran before the items (and then the window records)
    // were checked, so a directory refused as damaged could no longer be
    // opened by its own build.
    for (record, damage, says) in [
        (
            &b"state/"[..],
            None,
            "above the partition's persisted high seqno",
        ),
        (&b"lost-windows/"[..], Some(&b"[{"[..]), "lost"),
    ] {
        let dir = full_directory();
        let db_path = dir.path().join("rocksdb");
        {
            let mut db = raw_db(dir.path());
            db.drop_cf("staging").unwrap();
            let meta = db.cf_handle("meta").unwrap();
            db.put_cf(meta, b"engine", br#"{"format":2,"partitions":4}"#)
                .unwrap();
            let mut key = record.to_vec();
            key.extend_from_slice(&0u16.to_be_bytes());
            match damage {
                None => db.delete_cf(meta, key).unwrap(),
                Some(bytes) => db.put_cf(meta, key, bytes).unwrap(),
            }
        }
        assert_refused_unchanged(dir.path(), says);
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &db_path).unwrap();
        assert!(!cfs.iter().any(|c| c == "staging"), "{cfs:?}");
    }
}

#[test]
fn keys_in_error_messages_are_escaped_as_the_shell_writes_them() {
    // Before, a key's bytes that are not UTF-8 were lost in the message
    // (printed as U+FFFD), so it could not be read back.
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    e.set_flusher_paused(true);
    let key = b"a\nb\xff";
    e.set(key, "v", WriteOptions::default()).unwrap();
    match e.evict(key) {
        Err(Error::WrongState(m)) => assert!(m.contains(r#"key "a\nb\xff" is dirty"#), "{m}"),
        other => panic!("{other:?}"),
    }
    e.set_flusher_paused(false);
}

#[test]
fn key_and_value_size_limits_past_their_caps_are_refused_at_open() {
    // Before, the builder silently lowered them to the cap.
    let dir = tempfile::tempdir().unwrap();
    for (what, b) in [
        ("max_key_size", builder(dir.path()).max_key_size(65_536)),
        ("max_key_size", builder(dir.path()).max_key_size(0)),
        (
            "max_value_size",
            builder(dir.path()).max_value_size((1 << 30) + 1),
        ),
    ] {
        match b.open() {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
    }
    // At the caps the engine opens and holds a key of the largest size.
    let e = builder(dir.path())
        .max_key_size(65_535)
        .max_value_size(1 << 30)
        .checkpoint_memory_limit(2 << 30)
        .online_update_memory_limit(3 << 30)
        .open()
        .unwrap();
    e.set(&vec![b'k'; 65_535], "v", WriteOptions::default())
        .unwrap();
    assert!(matches!(
        e.set(&vec![b'k'; 65_536], "v", WriteOptions::default()),
        Err(Error::KeyTooLarge { .. })
    ));
    e.close().unwrap();
}

#[test]
fn zero_checkpoint_limits_and_seqno_reservations_out_of_range_are_refused_at_open() {
    // Before, zero checkpoint limits were taken silently as one item or one
    // byte, and a zero reservation as one seqno.
    let dir = tempfile::tempdir().unwrap();
    for (what, b) in [
        (
            "checkpoint limits",
            builder(dir.path()).checkpoint_max_items(0),
        ),
        (
            "checkpoint limits",
            builder(dir.path()).checkpoint_max_bytes(0),
        ),
        (
            "seqno_reservation",
            builder(dir.path()).seqno_reservation(0),
        ),
        (
            "seqno_reservation",
            builder(dir.path()).seqno_reservation((1 << 40) + 1),
        ),
    ] {
        match b.open() {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
    }
    // The smallest legal ones open, and a small reservation still hands out
    // numbers above everything written before a crash.
    let e = builder(dir.path())
        .checkpoint_max_items(1)
        .checkpoint_max_bytes(1)
        .seqno_reservation(1)
        .open()
        .unwrap();
    let mut last = 0;
    for i in 0..10u32 {
        last = e
            .set(b"k", i.to_string(), WriteOptions::default())
            .unwrap()
            .seqno;
    }
    e.crash();
    let e = builder(dir.path()).seqno_reservation(1).open().unwrap();
    assert!(e.set(b"k", "v", WriteOptions::default()).unwrap().seqno > last);
    e.close().unwrap();
}

#[test]
fn memory_limits_that_cannot_hold_the_largest_write_are_refused_at_open() {
    // Before, a node with --checkpoint-memory-limit 65536 and the default
    // 20 MiB values answered every value over about 64 KiB with a
    // temporary out-of-memory error, for ever.
    let dir = tempfile::tempdir().unwrap();
    for (what, b) in [
        (
            "checkpoint_memory_limit",
            builder(dir.path()).checkpoint_memory_limit(64 << 10),
        ),
        (
            "online_update_memory_limit",
            builder(dir.path()).online_update_memory_limit(1 << 20),
        ),
        // A window must hold the write and the version a revert restores.
        (
            "online_update_memory_limit",
            builder(dir.path())
                .max_value_size(600 << 10)
                .online_update_memory_limit(1 << 20),
        ),
    ] {
        match b.open() {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains(what) && m.contains("max_value_size"), "{m}")
            }
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
    }
    // With values that fit, the same limits open.
    builder(dir.path())
        .max_value_size(16 << 10)
        .checkpoint_memory_limit(64 << 10)
        .online_update_memory_limit(1 << 20)
        .open()
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn a_damaged_table_file_is_reported_as_corruption_not_as_a_held_directory() {
    // Before, an open's RocksDB error was called `Locked` ("in use by
    // another tapkv process") whenever it contained "lock": RocksDB's
    // "block checksum mismatch" does.
    let dir = tempfile::tempdir().unwrap();
    {
        let e = builder(dir.path()).open().unwrap();
        for i in 0..2_000 {
            e.set(
                format!("key-{i}").as_bytes(),
                vec![b'v'; 100],
                WriteOptions::default(),
            )
            .unwrap();
        }
        e.close().unwrap();
    }
    // A reopen replays the WAL into a table file.
    builder(dir.path()).open().unwrap().close().unwrap();
    let tables: Vec<_> = std::fs::read_dir(dir.path().join("rocksdb"))
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sst"))
        .collect();
    assert!(!tables.is_empty(), "no table file to damage");
    for t in &tables {
        let mut bytes = std::fs::read(t).unwrap();
        for b in &mut bytes[20..120] {
            *b ^= 0xa5;
        }
        std::fs::write(t, bytes).unwrap();
    }
    match builder(dir.path()).open() {
        Err(Error::Corruption(msg)) => assert!(msg.contains("checksum"), "{msg}"),
        Err(other) => panic!("not reported as corruption: {other:?}"),
        Ok(_) => panic!("a damaged table file opened"),
    }
}

#[test]
fn a_foreign_rocksdb_directory_is_corruption_to_the_engine_and_its_disk_view_alike() {
    // A RocksDB that is not tapkv's (only the default column family), and
    // one that lost a family: the engine refuses both as `Corruption`, and
    // `tapkv admin` (`DiskView`) must name the same damage. Before, the
    // view asked RocksDB for the families by name and reported RocksDB's
    // "column family not found" as a storage error.
    for keep in [&[][..], &["meta"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("rocksdb");
        {
            let mut opts = rocksdb::Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let db = rocksdb::DB::open_cf(&opts, &db_path, keep).unwrap();
            db.put(b"someone else's", b"data").unwrap();
        }
        let r = builder(dir.path()).open();
        assert!(
            matches!(r, Err(Error::Corruption(_))),
            "{keep:?}: {:?}",
            r.err()
        );
        let view = tapkv_engine::DiskView::open(dir.path()).and_then(|v| v.partitions());
        match view {
            Err(Error::Corruption(m)) => assert!(m.contains("missing"), "{keep:?}: {m}"),
            other => panic!("{keep:?}: {:?}", other.map(|_| ())),
        }
    }
}

/// A store that lost only its `rocksdb/CURRENT` (a partial copy or restore,
/// a file removed) is damaged, not new: the engine and `DiskView` refuse it
/// as corruption, and leave it as it is. Before, the first open wrote a
/// fresh manifest and `CURRENT` and then failed; the second took the
/// directory for an empty store and deleted every table and log.
#[test]
fn a_store_missing_its_current_file_is_corruption_and_left_untouched() {
    let dir = full_directory();
    let db = dir.path().join("rocksdb");
    let files = || {
        let mut v: Vec<String> = std::fs::read_dir(&db)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            // RocksDB's own info logs.
            .filter(|n| !n.starts_with("LOG"))
            .collect();
        v.sort();
        v
    };
    let current = std::fs::read(db.join("CURRENT")).unwrap();
    std::fs::remove_file(db.join("CURRENT")).unwrap();
    let before = files();
    assert!(
        before
            .iter()
            .any(|n| n.ends_with(".log") || n.ends_with(".sst")),
        "{before:?}"
    );
    for _ in 0..2 {
        match Engine::builder(dir.path()).open() {
            Err(Error::Corruption(m)) => assert!(m.contains("no CURRENT"), "{m}"),
            other => panic!("expected corruption, got {:?}", other.map(|_| ())),
        }
    }
    assert!(matches!(
        tapkv_engine::DiskView::open(dir.path()),
        Err(Error::Corruption(_))
    ));
    assert_eq!(before, files(), "a refused open changed rocksdb/");
    // Restored by hand, as the message says, it opens with every item.
    std::fs::write(db.join("CURRENT"), current).unwrap();
    let e = Engine::builder(dir.path()).open().unwrap();
    assert_eq!(e.stats().unwrap().items(), 200);
    e.close().unwrap();
}

/// `Engine::disk_view` reads a point-in-time copy of the running engine's
/// store: later writes are not in it, tables the live store lets go of (a
/// compaction deletes its inputs) stay readable to it, and the copy is
/// removed with the view, or at the next open if the process died first.
/// (A `DiskView::open` beside a running engine reads the live files, and a
/// compaction could delete a table before its walk reached it.)
#[test]
fn a_live_disk_view_reads_a_point_in_time_copy_that_goes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    for i in 0..200 {
        e.set(&common::key(i), common::value(i), WriteOptions::default())
            .unwrap();
    }
    e.flush().unwrap();
    let view = e.disk_view().unwrap();
    let views = dir.path().join("admin-views");
    assert_eq!(std::fs::read_dir(&views).unwrap().count(), 1);
    for i in 0..100 {
        e.delete(&common::key(i), WriteOptions::default()).unwrap();
    }
    e.flush().unwrap();
    let count = |v: &tapkv_engine::DiskView| {
        let mut live = 0;
        v.for_each_item(|it| {
            if !it.record.deleted {
                live += 1;
            }
            Ok(())
        })
        .unwrap();
        live
    };
    // The live store's files gone (as a compaction's inputs go): the copy
    // holds its own links.
    e.close().unwrap();
    for f in std::fs::read_dir(dir.path().join("rocksdb")).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|x| x == "sst" || x == "log") {
            std::fs::remove_file(f).unwrap();
        }
    }
    assert_eq!(count(&view), 200);
    drop(view);
    assert_eq!(
        std::fs::read_dir(&views).unwrap().count(),
        0,
        "the copy is removed"
    );
    // A copy left by a process that died is removed by the next open; a
    // view of an earlier engine of this process, still held, is not.
    let dir = full_directory();
    let e = Engine::builder(dir.path()).open().unwrap();
    let held = e.disk_view().unwrap();
    e.close().unwrap();
    let stale = dir.path().join("admin-views").join("4194305-1-0");
    std::fs::create_dir_all(stale.join("rocksdb")).unwrap();
    let e = Engine::builder(dir.path()).open().unwrap();
    assert!(!stale.exists());
    let view = e.disk_view().unwrap();
    assert_eq!(count(&view), 200);
    assert_eq!(count(&held), 200);
    drop(view);
    drop(held);
    assert_eq!(
        std::fs::read_dir(dir.path().join("admin-views"))
            .unwrap()
            .count(),
        0
    );
    e.close().unwrap();
}

/// A persisted CAS out of range is corruption named with its key, as every
/// other item check is (before, only the partition was named).
#[test]
fn an_out_of_range_item_number_is_named_with_its_key() {
    let dir = full_directory();
    let key = {
        let db = raw_db(dir.path());
        let cf = db.cf_handle("items").unwrap();
        let (k, mut v) = db
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .next()
            .unwrap()
            .unwrap();
        // Version, deleted, flags 0 and expiry 0 (one byte each), then the CAS.
        v[4..12].copy_from_slice(&u64::MAX.to_be_bytes());
        db.put_cf(cf, &k, &v).unwrap();
        k
    };
    match Engine::builder(dir.path()).open() {
        Err(Error::Corruption(m)) => {
            assert!(m.contains("CAS") && m.contains("key \""), "{m}");
            // The raw key ends with the item's key.
            let tail = String::from_utf8_lossy(&key[key.len() - 4..]).into_owned();
            assert!(m.contains(&tail), "{m}");
        }
        other => panic!("expected corruption, got {:?}", other.map(|_| ())),
    }
}

/// A directory's own partition count bounds the flusher threads when the
/// builder gives none (before, the default 16 did, and a 64-partition
/// directory could not be reopened with 20 threads); a new directory's
/// count is the builder's, checked before anything is made.
#[test]
fn flusher_threads_are_held_to_the_directorys_partition_count() {
    let dir = tempfile::tempdir().unwrap();
    Engine::builder(dir.path())
        .partitions(64)
        .open()
        .unwrap()
        .close()
        .unwrap();
    let e = Engine::builder(dir.path())
        .flusher_threads(20)
        .open()
        .unwrap();
    assert_eq!(e.num_partitions(), 64);
    e.close().unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let err = Engine::builder(fresh.path().join("new"))
        .flusher_threads(20)
        .open()
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("16 partitions")),
        "{err:?}"
    );
    assert!(
        !fresh.path().join("new").exists(),
        "a refused open made the directory"
    );
}

#[test]
fn a_missing_seqno_reservation_continues_above_any_number_handed_out() {
    // Every open records a reservation before the partition hands out a
    // number; a missing one was read as 0, and a partition whose last run
    // handed out seqnos past its persisted state (streamed to replicas,
    // then a crash) handed them out again. It now continues above the
    // largest reservation any run can make (2^40 seqnos).
    let dir = full_directory();
    let e = builder(dir.path()).open().unwrap();
    let p = e.partition_of(&common::key(0));
    let high = e.high_seqno(p).unwrap();
    let checkpoint = e.stats().unwrap().partitions[usize::from(p)].open_checkpoint_id;
    e.close().unwrap();
    {
        let db = raw_db(dir.path());
        let mut key = b"reserve/".to_vec();
        key.extend_from_slice(&p.to_be_bytes());
        let meta = db.cf_handle("meta").unwrap();
        assert!(
            db.get_cf(meta, &key).unwrap().is_some(),
            "the open recorded one"
        );
        db.delete_cf(meta, key).unwrap();
    }
    let e = builder(dir.path()).open().unwrap();
    let r = e
        .set(&common::key(0), common::value(1), WriteOptions::default())
        .unwrap();
    assert!(r.seqno > high + (1 << 40), "seqno {} after {high}", r.seqno);
    let opened = e.stats().unwrap().partitions[usize::from(p)].open_checkpoint_id;
    assert!(
        opened > checkpoint + (1 << 40) / 1000,
        "checkpoint {opened}"
    );
    // Everything else came back.
    assert_eq!(e.stats().unwrap().items(), 200);
    // And the open recorded a reservation again: the next open continues
    // from it as usual.
    e.close().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let again = e
        .set(&common::key(0), common::value(2), WriteOptions::default())
        .unwrap();
    assert!(
        again.seqno > r.seqno && again.seqno < r.seqno + (1 << 40),
        "{} after {}",
        again.seqno,
        r.seqno
    );
}

#[test]
fn unbounded_timeouts_mean_no_limit_not_a_panic() {
    // Before, `Instant::now() + Duration::MAX` panicked in every durable
    // write (after the write was made), `flush` and `wait_for_changes`.
    use std::time::Duration;
    use tapkv_engine::{Durability, PartitionId};
    struct AllAck;
    impl tapkv_engine::ReplicationGate for AllAck {
        fn wait_replicated(
            &self,
            _: &Engine,
            _: PartitionId,
            _: u64,
            _: Duration,
        ) -> tapkv_engine::Result<()> {
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path())
        .persist_timeout(Duration::MAX)
        .replicate_timeout(Duration::MAX)
        .open()
        .unwrap();
    e.set_replication_gate(std::sync::Arc::new(AllAck));
    // On a thread of its own: the waits have no limit, the test has one.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = e
            .set(b"p", "v", WriteOptions::durable(Durability::Persist))
            .unwrap();
        assert!(e.stats().unwrap().partitions[usize::from(r.partition)].persisted_seqno >= r.seqno);
        e.set(b"r", "v", WriteOptions::durable(Durability::Replicate))
            .unwrap();
        e.set(b"m", "v", WriteOptions::default()).unwrap();
        e.flush().unwrap();
        assert!(e.wait_for_changes(0, Duration::MAX) > 0);
        e.close().unwrap();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the durable writes with unbounded timeouts to return (a panic is shown above)");
}

#[test]
fn flusher_pauses_past_a_minute_and_zero_timeouts_are_refused_at_open() {
    // Before, a flush_retry_backoff of Duration::MAX stopped persistence
    // after one failed flush and hung the close; a zero persist_timeout
    // reported every durable write as timed out though it was made.
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let refused = |b: tapkv_engine::EngineBuilder, what: &str| match b.open() {
        Err(Error::InvalidArgument(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("{what}: {:?}", other.map(|_| ())),
    };
    refused(
        builder(dir.path()).flush_retry_backoff(Duration::MAX),
        "flush_retry_backoff",
    );
    refused(
        builder(dir.path()).flush_interval(Duration::from_secs(3600)),
        "flush_interval",
    );
    refused(
        builder(dir.path()).persist_timeout(Duration::ZERO),
        "persist_timeout",
    );
    refused(
        builder(dir.path()).replicate_timeout(Duration::ZERO),
        "replicate_timeout",
    );
    builder(dir.path())
        .flush_retry_backoff(Duration::from_secs(60))
        .flush_interval(Duration::from_secs(60))
        .open()
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn a_replicated_key_over_the_replicas_own_limit_is_refused() {
    // Before, it was stored, and the replica's own get, evict and delete
    // then refused its key. (A value over the replica's own write limit is
    // applied, and read back.)
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path())
        .replica(true)
        .max_key_size(8)
        .max_value_size(16)
        .open()
        .unwrap();
    let meta = |by_seqno| tapkv_engine::ItemMeta {
        by_seqno,
        cas: by_seqno,
        rev_seqno: 1,
        ..Default::default()
    };
    let in_p0 = |len: usize| {
        (0..)
            .map(|i| format!("{i:0>len$}").into_bytes())
            .find(|k| r.partition_of(k) == 0)
            .unwrap()
    };
    let long_key = in_p0(100);
    let item = |key: &[u8], value: &[u8], seqno| {
        tapkv_engine::QueuedItem::new(tapkv_engine::QueueOp::Mutation, key, value, meta(seqno))
    };
    assert!(matches!(
        r.apply_replicated(0, &item(&long_key, b"v", 1)),
        Err(Error::KeyTooLarge { len: 100, max: 8 })
    ));
    assert_eq!(r.high_seqno(0).unwrap(), 0, "nothing applied");
    let key = in_p0(4);
    r.apply_replicated(0, &item(&key, &[7; 4096], 1)).unwrap();
    assert_eq!(r.get(&key).unwrap().value(), &[7; 4096][..]);
    r.close().unwrap();
}

/// A directory holding keys longer than `max_key_size` (written under a
/// larger one, tombstones included) opens without the setting at its
/// longest key's length, so those keys stay readable and deletable; opened
/// with a smaller explicit one, it is refused as `Incompatible`, naming the
/// length to give, and left as it was. Before (found by a review), it was
/// loaded and every get, delete and evict of such a key was refused.
#[test]
fn a_directory_with_keys_over_max_key_size_raises_it_or_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (long, gone) = (vec![b'k'; 500], vec![b'g'; 600]);
    let e = builder(dir.path()).max_key_size(1000).open().unwrap();
    e.set(&long, b"v", WriteOptions::default()).unwrap();
    e.set(&gone, b"v", WriteOptions::default()).unwrap();
    e.delete(&gone, WriteOptions::default()).unwrap();
    e.close().unwrap();
    // Without the setting: the longest key on disk, a tombstone's, is the limit.
    let e = builder(dir.path()).open().unwrap();
    assert_eq!(e.config().unwrap().max_key_size, 600);
    assert_eq!(e.get(&long).unwrap().value(), b"v");
    assert!(matches!(
        e.set(&vec![b'x'; 601], b"v", WriteOptions::default()),
        Err(Error::KeyTooLarge { len: 601, max: 600 })
    ));
    e.close().unwrap();
    // With a smaller one: refused, naming the length.
    let r = builder(dir.path()).max_key_size(250).open();
    match r {
        Err(Error::Incompatible { reason, .. }) => {
            assert!(
                reason.contains("600 bytes") && reason.contains("max_key_size"),
                "{reason}"
            );
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Left as it was: the key is there, and deletes.
    let e = builder(dir.path()).max_key_size(600).open().unwrap();
    e.delete(&long, WriteOptions::default()).unwrap();
    assert!(matches!(e.get(&long), Err(Error::NotFound)));
    e.close().unwrap();
}

/// An expiry that looks relative (1 to 30 days in seconds, a time in
/// January 1970 as the absolute time `WriteOptions::expiry` is) is refused
/// with `InvalidArgument` naming `with_ttl`, which gives a time to live;
/// and `with_cas(0)` is no check, as on the wire. Before (found by a
/// review), `expiry: 3600` was stored as given, read as absent at once,
/// and was persisted and streamed anyway; `with_cas(0)` was a check no
/// write could pass.
#[test]
fn a_relative_looking_expiry_is_refused_and_cas_zero_is_no_check() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).open().unwrap();
    let hour = WriteOptions {
        expiry: 3600,
        ..Default::default()
    };
    for r in [
        e.set(b"k", b"v", hour),
        e.add(b"k", b"v", hour),
        e.replace(b"k", b"v", hour),
    ] {
        match r {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("with_ttl"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(e.get(b"k"), Err(Error::NotFound)));
    e.set(b"k", b"v", WriteOptions::default().with_ttl(3600))
        .unwrap();
    let got = e.get(b"k").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32;
    assert!((now + 3590..=now + 3610).contains(&got.meta.expiry));
    // A delete ignores the expiry.
    e.delete(b"k", hour).unwrap();
    // CAS 0: no check, for a new key and an existing one.
    e.set(b"fresh", b"v", WriteOptions::default().with_cas(0))
        .unwrap();
    e.set(b"fresh", b"w", WriteOptions::default().with_cas(0))
        .unwrap();
    assert_eq!(e.get(b"fresh").unwrap().value(), b"w");
    e.close().unwrap();
}
