//! The client matches replies to requests by opaque: a reply that arrives
//! after its request timed out is never taken for a later request's answer.

mod common;

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

    // Long enough for a loaded machine to answer every request below,
    // except the paused FLUSH, which the client gives up on after 1 s.
    let mut c = Client::connect(&addr, Duration::from_secs(30)).unwrap();
    // A FLUSH cannot finish while the flusher is paused: the client gives up
    // on it, and the node answers it later, once the flusher runs again.
    engine.set_flusher_paused(true);
    c.set(b"other", b"x", 0, false).unwrap();
    c.set_reply_timeout(Duration::from_secs(1));
    assert!(
        c.flush().is_err(),
        "the flush waits past the client's timeout"
    );
    c.set_reply_timeout(Duration::from_secs(30));
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
    common::shutdown(node);
}

#[test]
fn a_set_expiry_follows_memcached_relative_or_absolute() {
    use tapkv_replication::message::{absolute_expiry, opcode, store_extras, RELATIVE_EXPIRY_MAX};
    use tapkv_replication::protocol::Frame;
    assert_eq!(absolute_expiry(0, 1_000), 0);
    assert_eq!(absolute_expiry(60, 1_000), 1_060);
    assert_eq!(
        absolute_expiry(RELATIVE_EXPIRY_MAX, 1_000),
        1_000 + RELATIVE_EXPIRY_MAX
    );
    assert_eq!(
        absolute_expiry(RELATIVE_EXPIRY_MAX + 1, 1_000),
        RELATIVE_EXPIRY_MAX + 1
    );

    let dir = tempfile::tempdir().unwrap();
    let node = common::primary(dir.path());
    let mut c = Client::connect(&node.local_addr().to_string(), Duration::from_secs(5)).unwrap();
    let set = |c: &mut Client, key: &[u8], expiry: u32| {
        let f = Frame::request(opcode::SET, c.partition_of(key))
            .with_extras(store_extras(0, expiry))
            .with_key(key.to_vec())
            .with_value(&b"v"[..]);
        c.call(f).unwrap();
    };
    // An hour from now (relative): readable. Before, 3600 was taken as an
    // absolute time in 1970, so the item had expired when it was written.
    set(&mut c, b"relative", 3600);
    assert_eq!(&c.get(b"relative").unwrap().0[..], b"v");
    // An absolute time in the past: expired at once.
    set(&mut c, b"past", RELATIVE_EXPIRY_MAX + 1);
    assert!(c.get(b"past").unwrap_err().is_not_found());
    let item = node.engine().unwrap().get(b"relative").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32;
    assert!((now + 3500..=now + 3600).contains(&item.meta.expiry));
    drop(c);
    common::shutdown(node);
}

/// A dump row carries every field (flags, expiry and rev seqno included),
/// and a reply whose JSON body does not parse is a `Malformed` error, not
/// an empty value that would compare equal to another empty one.
#[test]
fn dump_rows_are_complete_and_malformed_replies_are_errors() {
    use std::io::Write;
    use tapkv_replication::client::ClientError;
    use tapkv_replication::protocol::{read_frame, Frame};

    let dir = tempfile::tempdir().unwrap();
    let node = common::primary(dir.path());
    let mut c = Client::connect(&node.local_addr().to_string(), Duration::from_secs(5)).unwrap();
    {
        use tapkv_replication::message::{opcode, store_extras};
        let f = Frame::request(opcode::SET, c.partition_of(b"flagged"))
            .with_extras(store_extras(7, 0))
            .with_key(b"flagged".to_vec())
            .with_value(&b"value"[..]);
        c.call(f).unwrap();
    }
    let rows = c.dump_rows().unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(
        (r.key.as_str(), r.flags, r.value_len, r.deleted, r.rev_seqno),
        ("flagged", 7, 5, false, 1)
    );
    assert!(r.seqno > 0 && r.cas > 0);
    common::shutdown(node);

    // A server that answers HELLO properly, then a STAT with a body that
    // is not JSON.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let mut conn = common::accept_within(&listener, std::time::Duration::from_secs(10));
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let answer = |conn: &mut std::net::TcpStream, value: &'static [u8]| {
            let req = read_frame(conn, 1 << 20).unwrap();
            let mut out = bytes::BytesMut::new();
            Frame::response(&req, 0).with_value(value).encode(&mut out);
            conn.write_all(&out).unwrap();
        };
        answer(&mut conn, br#"{"partitions":16,"role":"primary"}"#);
        answer(&mut conn, b"not json");
        // Hold the connection until the client has read the replies.
        let _ = read_frame(&mut conn, 1 << 20);
    });
    let mut c = Client::connect(&addr, Duration::from_secs(5)).unwrap();
    let err = c.stats().unwrap_err();
    assert!(
        matches!(err, ClientError::Malformed { what: "stat", .. }),
        "{err:?}"
    );
    drop(c);
    server.join().unwrap();
}

#[test]
fn a_reply_trickled_past_the_clients_timeout_fails_in_time() {
    // A server that answers HELLO, then sends a 4 MiB GET reply at about
    // 160 KiB/s. Before, the client's read went on until the frame was
    // whole (about 25 s) whatever its 1 s timeout.
    use std::io::Write;
    use tapkv_replication::protocol::{read_frame, Frame};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = std::sync::Arc::clone(&stop);
    let server = std::thread::spawn(move || {
        let mut conn = common::accept_within(&listener, std::time::Duration::from_secs(10));
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let req = read_frame(&mut conn, 1 << 20).unwrap();
        let mut out = bytes::BytesMut::new();
        Frame::response(&req, 0)
            .with_value(&br#"{"partitions":16,"role":"primary"}"#[..])
            .encode(&mut out);
        conn.write_all(&out).unwrap();
        let req = read_frame(&mut conn, 1 << 20).unwrap();
        let mut out = bytes::BytesMut::new();
        Frame::response(&req, 0)
            .with_value(vec![b'v'; 4 << 20])
            .encode(&mut out);
        let give_up = std::time::Instant::now() + Duration::from_secs(40);
        for chunk in out.chunks(8 << 10) {
            if stopping.load(std::sync::atomic::Ordering::Relaxed)
                || std::time::Instant::now() > give_up
                || conn.write_all(chunk).is_err()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    // The handshake gets a loaded machine's margin; the trickled reply the
    // 1 s reply timeout.
    let mut c = Client::connect(&addr, Duration::from_secs(10)).unwrap();
    c.set_reply_timeout(Duration::from_secs(1));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(c.get(b"k").map(|_| ()).map_err(|e| e.to_string()));
    });
    let r = rx.recv_timeout(Duration::from_secs(10));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
    let r = r.expect("the client waited past its timeout for a trickled reply");
    let e = r.expect_err("a 4 MiB reply at 160 KiB/s came within 1 s");
    assert!(e.contains("no reply within"), "{e}");
}
