//! Helpers shared by the in-process node tests (each test binary uses some).
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use tapkv_engine::{Engine, Error, WriteOptions, PERSISTENCE_CURSOR};
use tapkv_replication::io::{FrameReader, FrameWriter};
use tapkv_replication::message::{hello, stream_open, StreamRequest};
use tapkv_replication::node::{Node, NodeConfig};
use tapkv_replication::protocol::DEFAULT_MAX_BODY;

/// Polls `cond` every 5 ms until it holds; panics after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (at most 20 s) until replica `node` reports a link error (`stat`'s
/// `link_error`) that contains `says`; returns it.
pub fn wait_link_error(node: &Node, says: &str) -> String {
    let mut c = tapkv_replication::client::Client::connect(
        &node.local_addr().to_string(),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut seen = String::new();
    wait_until(
        &format!("a link error saying {says:?}"),
        Duration::from_secs(20),
        || {
            seen = c.stats().unwrap()["link_error"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            !seen.is_empty() && seen.contains(says)
        },
    );
    seen
}

/// Shuts `node` down, bounded: panics if that fails or takes more than a
/// minute (a thread that never stops would otherwise hang the test binary).
pub fn shutdown(node: Node) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(node.shutdown());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("shutdown: {e}"),
        Err(_) => panic!("the node did not shut down within 60 s"),
    }
}

/// Shuts `node` down in the background; how long it took, or `None` past
/// `limit` (its result is not looked at).
pub fn shutdown_within(node: Node, limit: Duration) -> Option<Duration> {
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let _ = node.shutdown();
        let _ = tx.send(());
    });
    rx.recv_timeout(limit).ok().map(|_| t0.elapsed())
}

#[path = "../../../tests/src/net.rs"]
mod net;
#[allow(unused_imports)]
pub use net::{accept_within, small_socket_buffers, wait_peer_blocked_sending};

/// Every cursor but the persistence cursors, as (partition, name).
pub fn stream_cursors(e: &Engine) -> Vec<(u16, String)> {
    (0..e.num_partitions())
        .flat_map(|part| {
            e.cursors(part)
                .unwrap()
                .into_iter()
                .filter(|c| c.name != PERSISTENCE_CURSOR)
                .map(move |c| (part, c.name))
        })
        .collect()
}

/// Sets `key`, retrying while the engine refuses it for memory; panics,
/// with `why()` in the message, if it is still refused after `patience`.
pub fn set_through_memory_pressure(
    e: &Engine,
    key: &[u8],
    value: &[u8],
    patience: Duration,
    why: impl Fn() -> String,
) {
    // Bounds a stall of this one write, not the pace of a test's writes.
    let deadline = Instant::now() + patience;
    loop {
        match e.set(key, value, WriteOptions::default()) {
            Ok(_) => return,
            Err(Error::TempOutOfMemory { .. }) => {
                assert!(
                    Instant::now() < deadline,
                    "{} still refused for memory: {}",
                    String::from_utf8_lossy(key),
                    why()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{}: {e}", String::from_utf8_lossy(key)),
        }
    }
}

/// Stream requests for every partition of `e` from seqno 0 (a new replica).
pub fn from_the_start(e: &Engine) -> Vec<StreamRequest> {
    (0..e.num_partitions())
        .map(|partition| StreamRequest {
            partition,
            uuid: 0,
            seqno: 0,
        })
        .collect()
}

/// A primary node on an ephemeral port over the data directory `dir`, with
/// a checkpoint memory limit of `limit` bytes (and values of at most a
/// quarter of it), and `Replicate` writes waiting up to 30 s (the default
/// 5 s also covers the primary's own disk, which a loaded machine under
/// memory pressure can take longer than; found by a flakiness review).
pub fn primary_with_limit(dir: &Path, limit: usize, cfg: NodeConfig) -> Node {
    let engine = Engine::builder(dir)
        .checkpoint_memory_limit(limit)
        .max_value_size(limit / 4)
        .replicate_timeout(std::time::Duration::from_secs(30))
        .open()
        .unwrap();
    Node::start(engine, cfg).unwrap()
}

/// A primary node on an ephemeral port with engine defaults.
pub fn primary(dir: &Path) -> Node {
    Node::start(
        Engine::builder(dir).open().unwrap(),
        NodeConfig::new("127.0.0.1:0"),
    )
    .unwrap()
}

/// Plays a replica by hand on `conn`, connected to a node: says HELLO and
/// asks for a stream called `name` from `reqs` (its reply is left to read).
/// Reads wait at most 50 ms each.
pub fn stream_by_hand(
    conn: std::net::TcpStream,
    name: &str,
    reqs: &[StreamRequest],
) -> (FrameReader, FrameWriter) {
    let mut reader = FrameReader::new(conn.try_clone().unwrap(), DEFAULT_MAX_BODY);
    reader.set_timeout(Duration::from_millis(50)).unwrap();
    let mut writer = FrameWriter::new(conn);
    writer.send(&hello(name)).unwrap();
    reader.next_within(200).unwrap();
    writer.send(&stream_open(name, reqs)).unwrap();
    (reader, writer)
}
