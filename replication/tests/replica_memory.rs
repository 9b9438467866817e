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
        .max_value_size(LIMIT / 4)
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
    common::shutdown(replica);
    common::shutdown(primary);
}

/// While a replica applies a disk snapshot it reads nothing from its stream,
/// so it acknowledges progress (an ack of zero bytes with the seqnos applied
/// so far) at least every `PROGRESS_ACK_EVERY` (100 ms) of applying: the
/// primary's slow-replica timeout counts only a replica that acknowledges
/// nothing. Here the test is the primary, and the replica's apply is held
/// up by its memory limit with its flusher paused.
#[test]
fn a_replica_applying_a_long_snapshot_acknowledges_progress() {
    use tapkv_engine::{ItemMeta, QueuedItem};
    use tapkv_replication::io::{FrameReader, FrameWriter};
    use tapkv_replication::message::{opcode, status, Ack, StreamMessage};
    use tapkv_replication::protocol::{Frame, DEFAULT_MAX_BODY};

    const N: u64 = 3_000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let rdir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(rdir.path())
        .partitions(1)
        .replica(true)
        .checkpoint_memory_limit(64 << 10)
        .max_value_size(16 << 10)
        .open()
        .unwrap();
    engine.set_flusher_paused(true);
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.replica_of = Some(listener.local_addr().unwrap().to_string());
    let replica = Node::start(engine, cfg).unwrap();
    let r = replica.engine().unwrap();

    let conn = common::accept_within(&listener, Duration::from_secs(30));
    // The replica reads the whole snapshot before it applies any of it;
    // should it stop reading early, a send fails instead of blocking.
    conn.set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = FrameReader::new(conn.try_clone().unwrap(), DEFAULT_MAX_BODY);
    reader.set_timeout(Duration::from_millis(50)).unwrap();
    let mut writer = FrameWriter::new(conn);
    let hello = reader.next_within(200).unwrap();
    assert_eq!(hello.opcode, opcode::HELLO);
    writer
        .send(
            // A replica checks that its primary has as many partitions.
            &Frame::response(&hello, status::SUCCESS).with_value(br#"{"partitions":1}"#.to_vec()),
        )
        .unwrap();
    let open = reader.next_within(200).unwrap();
    writer
        .send(&Frame::response(&open, status::SUCCESS))
        .unwrap();
    writer
        .send(
            &StreamMessage::Snapshot {
                partition: 0,
                start: 1,
                end: N,
                from_disk: true,
            }
            .to_frame(),
        )
        .unwrap();
    let value = vec![b'v'; 100];
    for s in 1..=N {
        let meta = ItemMeta {
            by_seqno: s,
            cas: s,
            rev_seqno: 1,
            flags: 0,
            expiry: 0,
        };
        let item = QueuedItem::mutation(&key(s as usize), &value, meta);
        writer
            .send(&StreamMessage::Item { partition: 0, item }.to_frame())
            .unwrap();
    }
    writer
        .send(
            &StreamMessage::Snapshot {
                partition: 0,
                start: N + 1,
                end: N,
                from_disk: false,
            }
            .to_frame(),
        )
        .unwrap();

    // The apply starts, fills the replica's checkpoint memory and waits for
    // its (paused) flusher.
    wait_until(
        "the snapshot's apply to start",
        Duration::from_secs(30),
        || r.stats().unwrap().items() > 0,
    );
    // Longer than the progress period: the next entry applied is acknowledged.
    std::thread::sleep(Duration::from_millis(150));
    r.run_flush_round().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let progress = loop {
        assert!(Instant::now() < deadline, "no progress ack");
        let Some(f) = reader.poll().unwrap() else {
            continue;
        };
        if f.opcode != opcode::ACK {
            continue;
        }
        let ack = Ack::from_frame(&f).unwrap();
        if ack.bytes == 0 {
            break ack;
        }
    };
    let applied = progress.seqnos.iter().find(|(p, _)| *p == 0).unwrap().1;
    assert!(
        applied > 0 && applied < N,
        "progress ack at seqno {applied}"
    );

    // With its flusher running again the replica applies the rest.
    r.set_flusher_paused(false);
    wait_until("the snapshot applied", Duration::from_secs(30), || {
        r.high_seqno(0).unwrap() == N
    });
    drop((reader, writer));
    common::shutdown(replica);
}
