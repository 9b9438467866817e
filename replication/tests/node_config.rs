//! A node refuses settings it cannot run with, naming the setting.

mod common;

use std::time::Duration;

use tapkv_engine::Engine;
use tapkv_replication::node::{Node, NodeConfig};

/// A setting's name and how to make it zero.
type ZeroSetting = (&'static str, fn(&mut NodeConfig));

#[test]
fn a_node_refuses_a_zero_setting_and_names_it() {
    // Before, a zero `max_unacked_bytes` started a node whose streams
    // waited for acknowledgements of nothing and spun without sending.
    let cases: [ZeroSetting; 4] = [
        ("max_unacked_bytes", |c| c.max_unacked_bytes = 0),
        ("heartbeat", |c| c.heartbeat = Duration::ZERO),
        ("ack_bytes", |c| c.ack_bytes = 0),
        ("stream_batch", |c| c.stream_batch = 0),
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
}
