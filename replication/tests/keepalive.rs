//! Client heartbeats: a node closes a client connection that stays silent
//! past its idle timeout, and a `KeptAlive` client's NOOPs keep it open.

use std::time::Duration;

use tapkv_engine::{Engine, WriteOptions};
use tapkv_replication::client::{Client, KeptAlive};
use tapkv_replication::node::{Node, NodeConfig};

#[test]
fn an_idle_client_is_closed_unless_it_sends_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).open().unwrap();
    engine.set(b"k", b"v", WriteOptions::default()).unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.idle_timeout = Duration::from_millis(400);
    let node = Node::start(engine, cfg).unwrap();
    let addr = node.local_addr().to_string();
    let timeout = Duration::from_secs(5);

    let mut plain = Client::connect(&addr, timeout).unwrap();
    let kept = KeptAlive::new(
        Client::connect(&addr, timeout).unwrap(),
        Duration::from_millis(100),
    )
    .unwrap();
    // Both stay silent (apart from heartbeats) for well over the timeout.
    std::thread::sleep(Duration::from_millis(1500));

    assert!(kept.heartbeats() >= 5, "heartbeats: {}", kept.heartbeats());
    let got = kept.with(|c| c.get(b"k")).unwrap();
    assert_eq!(&got.0[..], b"v", "the kept-alive connection still serves");
    assert!(
        plain.get(b"k").is_err(),
        "the silent connection was closed by the node's idle timeout"
    );
    drop(kept);
    node.shutdown().unwrap();
}
