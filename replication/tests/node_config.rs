//! A node refuses settings it cannot run with, naming the setting.

mod common;

use std::time::Duration;

use tapkv_engine::Engine;
use tapkv_replication::node::{Node, NodeConfig};

/// A setting's name and how to put it out of its range.
type ZeroSetting = (&'static str, fn(&mut NodeConfig));

#[test]
fn a_node_refuses_a_setting_out_of_range_and_names_it() {
    // Before, a zero `max_unacked_bytes` started a node whose streams
    // waited for acknowledgements of nothing and spun without sending.
    // And durations too long to add to the clock: a replica whose
    // heartbeat was `Duration::MAX` started, and its link thread panicked
    // (it never replicated, and said nothing).
    // And settings that do not fit together or overflow (found by a
    // review): a pending-frame budget below `max_body` answered every frame
    // between the two "busy, try again later", on an idle node, for good;
    // a `max_body` of `usize::MAX` overflowed the readers' arithmetic.
    let cases: [ZeroSetting; 12] = [
        ("max_unacked_bytes", |c| c.max_unacked_bytes = 0),
        ("heartbeat", |c| c.heartbeat = Duration::ZERO),
        ("ack_bytes", |c| c.ack_bytes = 0),
        ("stream_batch", |c| c.stream_batch = 0),
        ("heartbeat", |c| c.heartbeat = Duration::MAX),
        ("io_timeout", |c| c.io_timeout = Duration::MAX),
        ("idle_timeout", |c| {
            c.idle_timeout = Duration::from_secs(86_401)
        }),
        ("slow_replica_timeout", |c| {
            c.slow_replica_timeout = Duration::MAX
        }),
        ("max_pending_body_bytes", |c| {
            c.max_body = 4 << 20;
            c.max_pending_body_bytes = 2 << 20;
        }),
        ("max_pending_reply_bytes", |c| {
            c.max_body = 4 << 20;
            c.max_pending_reply_bytes = 4 << 20;
        }),
        ("max_pending_reply_bytes", |c| c.max_pending_reply_bytes = 0),
        ("max_body", |c| c.max_body = usize::MAX),
    ];
    for (name, zero) in cases {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::builder(dir.path()).partitions(1).open().unwrap();
        let mut cfg = NodeConfig::new("127.0.0.1:0");
        zero(&mut cfg);
        let err = Node::start(engine, cfg).err().expect(name);
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{name}");
        assert!(err.to_string().contains(name), "{name}: {err}");
        // The engine was closed with the refusal: the directory opens again.
        Engine::builder(dir.path()).partitions(1).open().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).partitions(1).open().unwrap();
    let node = Node::start(engine, NodeConfig::new("127.0.0.1:0")).unwrap();
    common::shutdown(node);
    // The budgets' least: a frame of `max_body` and its header fits alone.
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).partitions(1).open().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.max_body = 4 << 20;
    cfg.max_pending_body_bytes = (4 << 20) + 24;
    cfg.max_pending_reply_bytes = (4 << 20) + 24;
    common::shutdown(Node::start(engine, cfg).unwrap());
}

/// A client timeout too long for the clock (`Duration::MAX`, meant as
/// "never") is taken, and calls answer: before, adding it to the clock
/// panicked the HELLO's wait (found by a review).
#[test]
fn a_client_with_an_endless_timeout_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).partitions(1).open().unwrap();
    let node = Node::start(engine, NodeConfig::new("127.0.0.1:0")).unwrap();
    let addr = node.local_addr().to_string();
    let mut c = tapkv_replication::client::Client::connect(&addr, Duration::MAX).unwrap();
    c.set(b"k", b"v", 0, false).unwrap();
    c.set_reply_timeout(Duration::MAX);
    assert_eq!(&c.get(b"k").unwrap().0[..], b"v");
    drop(c);
    common::shutdown(node);
}

#[test]
fn a_node_name_its_primary_would_refuse_is_refused_at_start() {
    for bad in ["a\0b", "tab\there", &"n".repeat(256)] {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::builder(dir.path()).partitions(1).open().unwrap();
        let mut cfg = NodeConfig::new("127.0.0.1:0");
        cfg.name = bad.to_string();
        let err = Node::start(engine, cfg).err().expect("a bad name started");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("node name"), "{err}");
    }
}

#[test]
fn a_stream_name_with_a_nul_is_refused_and_leaves_nothing_registered() {
    // Before, the name went into the stream's thread name: a NUL in it
    // panicked the connection's thread after the stream was registered,
    // and the dead stream stayed listed (and counted) for ever.
    use tapkv_replication::message::{status, StreamRequest};
    let dir = tempfile::tempdir().unwrap();
    let node = common::primary(dir.path());
    let addr = node.local_addr().to_string();
    let reqs = [StreamRequest {
        partition: 0,
        uuid: 0,
        seqno: 0,
    }];
    for bad in ["x\0y", &"s".repeat(256)] {
        let conn = std::net::TcpStream::connect(&addr).unwrap();
        let (mut reader, _writer) = common::stream_by_hand(conn, bad, &reqs);
        let answer = reader.next_within(200).unwrap();
        assert_eq!(answer.status(), status::INVALID_ARGUMENTS);
        let text = String::from_utf8_lossy(&answer.value);
        assert!(text.contains("stream name refused"), "{text}");
    }
    let mut c = tapkv_replication::client::Client::connect(&addr, Duration::from_secs(5)).unwrap();
    let streams = c.admin("streams").unwrap();
    assert_eq!(streams.as_array().map(Vec::len), Some(0), "{streams}");
    c.noop().unwrap();
    common::shutdown(node);
}

#[test]
fn a_node_and_its_engine_must_agree_on_the_role() {
    // A replica node over a primary's engine would run the primary's
    // expiry pass and take local writes, colliding with the seqnos its
    // primary sends; a primary node over a replica's engine could take no
    // write at all. Both are refused at start.
    let dir = tempfile::tempdir().unwrap();
    let engine = tapkv_engine::Engine::builder(dir.path()).open().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.replica_of = Some("127.0.0.1:9".into());
    let e = Node::start(engine, cfg)
        .err()
        .expect("a replica node over a primary's engine");
    assert!(e.to_string().contains("replica(true)"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let engine = tapkv_engine::Engine::builder(dir.path())
        .replica(true)
        .open()
        .unwrap();
    let e = Node::start(engine, NodeConfig::new("127.0.0.1:0"))
        .err()
        .expect("a primary node over a replica's engine");
    assert!(e.to_string().contains("no replica_of"), "{e}");
}

/// A node's HELLO answer gives its `online_update_memory_limit`: a replica
/// with a limit at least its primary's then takes every window entry the
/// primary took (`Engine::set_primary_window_limit`; engine test
/// `replica::a_replica_told_its_primarys_window_limit_takes_every_entry_its_primary_took`).
#[test]
fn a_nodes_hello_gives_its_window_limit() {
    use tapkv_replication::message::hello;
    use tapkv_replication::protocol::read_frame;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path())
        .partitions(1)
        .online_update_memory_limit(300 << 20)
        .open()
        .unwrap();
    let node = Node::start(engine, NodeConfig::new("127.0.0.1:0")).unwrap();
    let mut conn = std::net::TcpStream::connect(node.local_addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(&mut conn, &hello("probe").to_bytes()).unwrap();
    let answer = read_frame(&mut conn, 1 << 20).unwrap();
    let info: serde_json::Value = serde_json::from_slice(&answer.value).unwrap();
    assert_eq!(
        info["online_update_memory_limit"].as_u64(),
        Some(300 << 20),
        "{info}"
    );
    drop(conn);
    common::shutdown(node);
}
