//! A stream that falls behind the primary's disk while checkpoint memory
//! fills has its cursor dropped by the primary's flusher: writes go on
//! within the memory limit, and the stream sends the partition from disk
//! again within the session.

use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{
    from_the_start, primary_with_limit, set_through_memory_pressure, stream_by_hand,
    stream_cursors, wait_until,
};
use tapkv_replication::io::{FrameReader, FrameWriter};
use tapkv_replication::message::{Ack, StreamMessage};
use tapkv_replication::node::{Node, NodeConfig};

const LIMIT: usize = 1 << 20;

fn key(i: usize) -> Vec<u8> {
    format!("drop-key-{i:06}").into_bytes()
}

/// Opens a stream named `name` on `primary` from seqno 0 over a raw
/// connection that reads only when the test says so; returns once the
/// primary has registered its cursors.
fn open_stream(primary: &Node, name: &str) -> (FrameReader, FrameWriter) {
    let p = primary.engine().unwrap();
    let conn = TcpStream::connect(primary.local_addr()).unwrap();
    // A stalled reader holds the stream back only once the socket buffers
    // are full: keep them small whatever the host's settings.
    common::small_socket_buffers(&conn);
    let (reader, writer) = stream_by_hand(conn, name, &from_the_start(p));
    wait_until("the stream's cursors", Duration::from_secs(30), || {
        stream_cursors(p).len() == usize::from(p.num_partitions())
    });
    (reader, writer)
}

#[test]
fn a_stream_behind_the_disk_is_dropped_under_memory_pressure_and_sent_from_disk_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    // Neither flow control nor a write timeout may end the stalled stream
    // during the test: only the engine's cursor drop can free its memory.
    cfg.max_unacked_bytes = 1 << 40;
    cfg.slow_replica_timeout = Duration::from_secs(600);
    cfg.io_timeout = Duration::from_secs(120);
    // Nor the silence rule (ten heartbeats without an ACK; this "replica"
    // never acknowledges), on a machine slow enough to take that long.
    cfg.heartbeat = Duration::from_secs(60);
    let primary = primary_with_limit(dir.path(), LIMIT, cfg);
    let p = primary.engine().unwrap();

    // A "replica" that opens a stream from the start (held in memory) and
    // then reads nothing.
    let (mut reader, writer) = open_stream(&primary, "stalled");

    // Sixteen times the checkpoint memory limit in writes: far more than
    // the connection's buffers take, so the stream falls behind.
    let value = vec![b'v'; 400];
    let patience = Duration::from_secs(30);
    for i in 0..40_000 {
        set_through_memory_pressure(p, &key(i), &value, patience, || {
            format!("{} stream cursors left", stream_cursors(p).len())
        });
        let used = p.stats().unwrap().checkpoint_mem_bytes;
        assert!(
            used <= LIMIT + 1024,
            "checkpoint memory {used} past its limit"
        );
    }
    let st = p.stats().unwrap();
    assert!(st.cursors_dropped > 0, "no cursor was dropped");
    assert!(stream_cursors(p).len() < usize::from(p.num_partitions()));

    // Reading again, the "replica" is sent the dropped partitions from disk
    // (their entries were persisted and freed), in the same stream, and
    // every partition has its cursor again. Before (found by a review), the
    // stream ended, and every partition started again in the next one.
    let partitions = usize::from(p.num_partitions());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut from_disk = std::collections::BTreeSet::new();
    while from_disk.is_empty() || stream_cursors(p).len() < partitions {
        assert!(
            Instant::now() < deadline,
            "disk snapshots of {from_disk:?}, {} stream cursors",
            stream_cursors(p).len()
        );
        if let Some(f) = reader.poll().unwrap() {
            match StreamMessage::from_frame(&f) {
                Ok(StreamMessage::Snapshot {
                    partition,
                    from_disk: true,
                    ..
                }) => {
                    from_disk.insert(partition);
                }
                Ok(StreamMessage::StreamEnd) => panic!("the stream ended"),
                _ => {}
            }
        }
    }
    drop((reader, writer));
    wait_until(
        "the stream's cursors to go",
        Duration::from_secs(30),
        || stream_cursors(p).is_empty(),
    );
    common::shutdown(primary);
}

/// A replica stuck at the unacknowledged limit keeps its cursors while it
/// still acknowledges progress (as it does while applying a large disk
/// snapshot), and loses them once it falls silent for the slow-replica
/// timeout.
#[test]
fn a_stream_at_its_limit_keeps_its_cursors_while_acks_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.max_unacked_bytes = 64 << 10;
    // A timeout no scheduling stall on a loaded machine comes near: the
    // test's acks, 20 ms apart, must never look like silence.
    cfg.slow_replica_timeout = Duration::from_secs(3);
    // Heartbeats a minute apart: the silence rule (ten silent heartbeats
    // end a stream) cannot be what removes the cursors below.
    cfg.heartbeat = Duration::from_secs(60);
    cfg.io_timeout = Duration::from_secs(120);
    let engine = tapkv_engine::Engine::builder(dir.path())
        .cursor_drop_threshold(10.0)
        .open()
        .unwrap();
    let primary = Node::start(engine, cfg).unwrap();
    let p = primary.engine().unwrap();

    let (reader, mut writer) = open_stream(&primary, "acking");
    // Acks that each report progress (a byte applied; an ACK that frees
    // nothing and advances no seqno is not progress), from before the
    // stream reaches its limit until 5 s (well past one timeout) after the
    // writes that take it there: the cursors stay.
    let until: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let acking = {
        let until = Arc::clone(&until);
        std::thread::spawn(move || {
            let progress = Ack {
                bytes: 1,
                seqnos: vec![],
            };
            while until.lock().unwrap().is_none_or(|t| Instant::now() < t) {
                writer.send(&progress.to_frame()).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            writer
        })
    };
    // Far more than the 64 KiB the stream may have unacknowledged.
    for i in 0..5_000 {
        p.set(&key(i), [b'a'; 100], tapkv_engine::WriteOptions::default())
            .unwrap();
    }
    *until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(5));
    let writer = acking.join().unwrap();
    assert_eq!(
        stream_cursors(p).len(),
        usize::from(p.num_partitions()),
        "cursors dropped while the replica acknowledged progress"
    );
    // Silence: dropped after the timeout.
    wait_until(
        "the silent stream's cursors to go",
        Duration::from_secs(30),
        || stream_cursors(p).is_empty(),
    );
    drop((reader, writer));
    common::shutdown(primary);
}

/// A stream waiting on its unacknowledged limit reads no cursor, so it
/// does not see at once that the flusher dropped its cursors under memory
/// pressure. It will never be sent a write made after that (it backfills
/// once it reads again), so it does not count towards a `Replicate`
/// write's majority. Before, it counted, and the write (here: nothing
/// else to wait for, `--replicas 0`) timed out.
#[test]
fn a_stream_whose_cursor_was_dropped_does_not_count_for_replicate_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.min_replicas = 0;
    cfg.max_unacked_bytes = 64 << 10;
    // Neither the slow-replica drop nor the silence rule may end it.
    cfg.slow_replica_timeout = Duration::from_secs(600);
    cfg.heartbeat = Duration::from_secs(60);
    cfg.io_timeout = Duration::from_secs(120);
    let primary = primary_with_limit(dir.path(), LIMIT, cfg);
    let p = primary.engine().unwrap();
    let (reader, writer) = open_stream(&primary, "stalled");
    let part = p.partition_of(&key(0));
    let value = vec![b'v'; 400];
    let mut i = 0;
    while stream_cursors(p).iter().any(|(q, _)| *q == part) {
        assert!(i < 200_000, "the stalled stream's cursor was never dropped");
        set_through_memory_pressure(p, &key(i), &value, Duration::from_secs(30), || {
            format!("{} stream cursors left", stream_cursors(p).len())
        });
        i += 1;
    }
    // Within the engine's Replicate timeout (5 s), not an `Error::Timeout`
    // (retried while refused for memory: the flusher may still be behind).
    let replicate = tapkv_engine::WriteOptions::durable(tapkv_engine::Durability::Replicate);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match p.set(&key(0), b"replicated", replicate) {
            Err(tapkv_engine::Error::TempOutOfMemory { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            r => {
                r.unwrap();
                break;
            }
        }
    }
    drop((reader, writer));
    common::shutdown(primary);
}
