//! A replica's link to its primary: refused when the two data directories
//! were created with different partition counts, and the refusal reported.

mod common;

use std::time::Duration;

use common::wait_until;
use tapkv_engine::{Engine, WriteOptions};
use tapkv_replication::client::Client;
use tapkv_replication::node::{Node, NodeConfig};

#[test]
fn a_replica_with_another_partition_count_refuses_to_replicate() {
    let pdir = tempfile::tempdir().unwrap();
    let rdir = tempfile::tempdir().unwrap();
    let primary = Node::start(
        Engine::builder(pdir.path()).partitions(8).open().unwrap(),
        NodeConfig::new("127.0.0.1:0"),
    )
    .unwrap();
    let p = primary.engine().unwrap();
    for i in 0..200 {
        p.set(format!("k{i}").as_bytes(), b"v", WriteOptions::default())
            .unwrap();
    }
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.replica_of = Some(primary.local_addr().to_string());
    let replica = Node::start(
        Engine::builder(rdir.path())
            .replica(true)
            .partitions(4)
            .open()
            .unwrap(),
        cfg,
    )
    .unwrap();

    // The replica says why it does not replicate.
    let mut c = Client::connect(&replica.local_addr().to_string(), Duration::from_secs(5)).unwrap();
    let mut error = String::new();
    wait_until(
        "the replica to report its link error",
        Duration::from_secs(10),
        || {
            error = c.stats().unwrap()["link_error"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            !error.is_empty()
        },
    );
    assert!(
        error.contains("8 partitions") && error.contains("this replica 4"),
        "{error}"
    );
    // It applied nothing (under its own partition numbers, keys would sit
    // where its reads never look), and the primary has no stream for it.
    let r = replica.engine().unwrap();
    assert_eq!(r.stats().unwrap().items(), 0);
    assert_eq!(common::stream_cursors(p), Vec::<(u16, String)>::new());
    replica.shutdown().unwrap();
    primary.shutdown().unwrap();
}
