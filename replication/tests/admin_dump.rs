//! `ADMIN dump`s running at once are bounded (`NodeConfig::max_dumps`):
//! each reads a point-in-time copy of the store (`Engine::disk_view`),
//! which costs the node memory and links to tables for as long as its
//! client takes to read it.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tapkv_engine::{Engine, WriteOptions};
use tapkv_replication::client::Client;
use tapkv_replication::message::{hello, opcode};
use tapkv_replication::node::{Node, NodeConfig};
use tapkv_replication::protocol::{read_frame, Frame};

/// Items on the node: their dump is far larger than socket buffers.
const ITEMS: usize = 200_000;

/// An engine in `dir` holding `ITEMS` persisted items.
fn engine_with_items(dir: &std::path::Path) -> Engine {
    let engine = Engine::builder(dir).open().unwrap();
    let value = [b'v'; 100];
    for i in 0..ITEMS {
        engine
            .set(
                format!("key-{i}").as_bytes(),
                &value[..],
                WriteOptions::default(),
            )
            .unwrap();
    }
    engine.flush().unwrap();
    engine
}

/// A node over `engine_with_items` whose I/O timeout (a minute) no dump
/// in these tests reaches; its address.
fn patient_node_with_items(dir: &std::path::Path) -> (Node, String) {
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.io_timeout = Duration::from_secs(60);
    let node = Node::start(engine_with_items(dir), cfg).unwrap();
    let addr = node.local_addr().to_string();
    (node, addr)
}

/// A connection that asked for a dump, after its HELLO answer and the
/// dump's first row.
fn dump_requested(addr: &str, name: &str) -> std::net::TcpStream {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    common::small_socket_buffers(&conn);
    let mut out = BytesMut::new();
    hello(name).encode(&mut out);
    Frame::request(opcode::ADMIN, 0)
        .with_key(b"dump".to_vec())
        .encode(&mut out);
    conn.write_all(&out).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let hello_answer = read_frame(&mut conn, 1 << 20).unwrap();
    assert_eq!(hello_answer.status(), 0);
    let first = read_frame(&mut conn, 1 << 20).unwrap();
    assert_eq!(&first.key[..], b"row", "{first:?}");
    conn
}

/// The rows of a whole dump by `c`, asked again while the node answers
/// "busy" (a slot still held), for at most a minute.
fn dump_once_a_slot_is_free(c: &mut Client) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut rows = 0;
        match c.dump(|_| {
            rows += 1;
            true
        }) {
            Ok(()) => return rows,
            Err(e) => assert!(e.to_string().contains("busy"), "{e}"),
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dumps_past_the_limit_are_answered_busy_and_the_slot_comes_back() {
    // Before, any number of dumps ran at once: 48 clients that did not
    // read theirs added about 580 MB to a node of 112,000 items.
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with_items(dir.path());
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.max_dumps = 1;
    // The stalled dump must not be cut as too slow (the progress deadline
    // is the I/O timeout, 10 s by default) before the second asks: that
    // frees the slot (found by a flakiness review).
    cfg.io_timeout = Duration::from_secs(60);
    let node = Node::start(engine, cfg).unwrap();
    let addr = node.local_addr().to_string();

    // A client that asks for a dump (about 30 MB of rows, more than any
    // socket buffers hold) and reads none of it: the node's dump blocks on
    // its full socket and holds the slot once its first row has arrived.
    let stalled = dump_requested(&addr, "stalled");

    let mut c = Client::connect(&addr, Duration::from_secs(30)).unwrap();
    let busy = c.dump(|_| true).unwrap_err().to_string();
    assert!(
        busy.contains("busy") && busy.contains("--max-dumps"),
        "{busy}"
    );
    // The connection goes on.
    assert!(c.get(b"key-1").is_ok());

    // Once the stalled client goes away, its dump ends and the slot is free.
    drop(stalled);
    assert_eq!(dump_once_a_slot_is_free(&mut c), ITEMS);
    common::shutdown(node);
}

#[test]
fn a_stopping_node_ends_a_dump_its_client_reads_slowly() {
    // A client that reads its dump slowly, but fast enough for the node's
    // write deadlines: its whole dump (about 30 MB) would take about 40 s.
    // Before, the dump went on to its end however the node was asked to
    // stop, and the stop waited for it.
    let dir = tempfile::tempdir().unwrap();
    let (node, addr) = patient_node_with_items(dir.path());
    let mut slow = dump_requested(&addr, "slow");
    let (tx, rx) = std::sync::mpsc::channel();
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reading_slowly = std::sync::Arc::clone(&stopped);
    let reader = std::thread::spawn(move || {
        // About 5,000 rows a second until the node has stopped, then as
        // fast as they come, until the dump ends one way or another.
        let give_up = Instant::now() + Duration::from_secs(120);
        let mut rows = 1usize;
        let end = loop {
            if Instant::now() > give_up {
                break "gave up".to_string();
            }
            match read_frame(&mut slow, 1 << 20) {
                Ok(f) if &f.key[..] == b"row" => rows += 1,
                Ok(f) => break format!("status {} {:?}", f.status(), f.value),
                Err(e) => break format!("closed: {e}"),
            }
            if rows % 500 == 0 && !reading_slowly.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        let _ = tx.send((rows, end));
    });
    let took = common::shutdown_within(node, Duration::from_secs(8));
    stopped.store(true, std::sync::atomic::Ordering::Relaxed);
    let (rows, end) = rx.recv_timeout(Duration::from_secs(150)).unwrap();
    reader.join().unwrap();
    assert!(
        took.is_some(),
        "the stop waited for the dump ({rows} rows read)"
    );
    assert!(rows < ITEMS, "the dump went on to its end: {end}");
    // An error row naming the stop, or (the stop found the dump waiting on
    // a full socket) the connection closed.
    assert!(
        end.contains("the node is stopping") || end.starts_with("closed"),
        "{end}"
    );
}

#[test]
fn a_client_that_stopped_reading_does_not_hold_a_node_stop() {
    // A dump blocked on a client that reads nothing waited, before, up to
    // the whole I/O timeout (a minute here; 10 s by default) for the
    // client before it looked at the stop, and the stop waited for it.
    let dir = tempfile::tempdir().unwrap();
    let (node, addr) = patient_node_with_items(dir.path());
    let stalled = dump_requested(&addr, "stalled");
    common::wait_peer_blocked_sending(&stalled, 64 << 10, Duration::from_secs(30));
    let took = common::shutdown_within(node, Duration::from_secs(5));
    assert!(took.is_some(), "the stop waited for the stalled client");
    drop(stalled);
}

/// A reader that stops (a closed stdout: `admin dump --addr ... | head`)
/// ends its client's read at once: the rest is left unread, the connection
/// counts as broken, and once it closes the node's dump ends and its slot
/// comes back. Before, the client could not stop, and read the whole dump.
#[test]
fn a_dump_its_reader_stops_ends_early_and_frees_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (node, addr) = patient_node_with_items(dir.path());
    let mut c = Client::connect(&addr, Duration::from_secs(30)).unwrap();
    let mut seen = 0;
    c.dump(|_| {
        seen += 1;
        seen < 10
    })
    .unwrap();
    assert_eq!(seen, 10);
    assert!(c.is_broken(), "unread rows are left on the connection");
    drop(c);
    let mut other = Client::connect(&addr, Duration::from_secs(30)).unwrap();
    assert_eq!(dump_once_a_slot_is_free(&mut other), ITEMS);
    common::shutdown(node);
}
