//! The client matches replies to requests by opaque: a reply that arrives
//! after its request timed out is never taken for a later request's answer.

use std::time::Duration;

use tapkv_engine::{Engine, WriteOptions};
use tapkv_replication::client::Client;
use tapkv_replication::node::{Node, NodeConfig};

#[test]
fn a_late_reply_is_not_taken_for_the_next_requests_answer() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).open().unwrap();
    engine.set(b"k", b"v1", WriteOptions::default()).unwrap();
    let node = Node::start(engine, NodeConfig::new("127.0.0.1:0")).unwrap();
    let addr = node.local_addr().to_string();
    let engine = node.engine().unwrap();

    // Long enough for a loaded machine to answer every request below once
    // the flusher runs; the paused FLUSH takes this long to give up on.
    let mut c = Client::connect(&addr, Duration::from_secs(2)).unwrap();
    // A FLUSH cannot finish while the flusher is paused: the client gives up
    // on it, and the node answers it later, once the flusher runs again.
    engine.set_flusher_paused(true);
    c.set(b"other", b"x", 0, false).unwrap();
    assert!(
        c.flush().is_err(),
        "the flush waits past the client's timeout"
    );
    engine.set_flusher_paused(false);
    // The node's FLUSH is now satisfied (its sync done); only its reply is
    // left to arrive ahead of the GET's.
    engine.flush().unwrap();

    // The node answers the FLUSH (an empty success) before this GET; the
    // client must skip it and return the GET's own reply.
    let (value, cas) = c.get(b"k").unwrap();
    assert_eq!(&value[..], b"v1");
    assert_ne!(cas, 0);
    // And the connection stays in step afterwards.
    assert_eq!(&c.get(b"other").unwrap().0[..], b"x");
    assert!(c.get(b"missing").unwrap_err().is_not_found());
    node.shutdown().unwrap();
}
