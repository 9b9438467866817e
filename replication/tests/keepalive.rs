//! Client heartbeats: a node closes a client connection that stays silent
//! past its idle timeout, and a `KeptAlive` client's NOOPs keep it open.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tapkv_engine::{Engine, WriteOptions};
use tapkv_replication::client::{Client, KeptAlive};
use tapkv_replication::message::hello;
use tapkv_replication::node::{Node, NodeConfig};

#[test]
fn an_idle_client_is_closed_unless_it_sends_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).open().unwrap();
    engine.set(b"k", b"v", WriteOptions::default()).unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    // Twenty-five heartbeats long: a kept-alive client loses its connection
    // only if its heartbeat thread stalls that long.
    cfg.idle_timeout = Duration::from_secs(5);
    let node = Node::start(engine, cfg).unwrap();
    let addr = node.local_addr().to_string();
    let timeout = Duration::from_secs(5);

    let kept = KeptAlive::new(
        Client::connect(&addr, timeout).unwrap(),
        Duration::from_millis(200),
    )
    .unwrap();
    // A plain client: HELLO, then silence. Its connection ends (EOF) once
    // the idle timeout has passed.
    let mut plain = TcpStream::connect(&addr).unwrap();
    let mut buf = BytesMut::new();
    hello("plain").encode(&mut buf);
    plain.write_all(&buf).unwrap();
    let started = Instant::now();
    assert!(
        ended_within(&mut plain, Duration::from_secs(30)),
        "the silent connection was never closed"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(4500),
        "closed before its idle timeout: {:?}",
        started.elapsed()
    );

    // The kept-alive client was just as idle, but for its heartbeats.
    assert!(kept.heartbeats() >= 1, "heartbeats: {}", kept.heartbeats());
    let got = kept.with(|c| c.get(b"k")).unwrap();
    assert_eq!(&got.0[..], b"v", "the kept-alive connection still serves");
    drop(kept);
    common::shutdown(node);
}

#[test]
fn a_connection_that_never_says_hello_does_not_hold_up_shutdown() {
    // Before, the handshake waited out the whole idle timeout (here the
    // default five minutes) without looking at the stop flag, and shutdown
    // joined that connection's thread.
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).open().unwrap();
    let cfg = NodeConfig::new("127.0.0.1:0");
    assert!(cfg.idle_timeout >= Duration::from_secs(60));
    let node = Node::start(engine, cfg).unwrap();
    let addr = node.local_addr().to_string();
    let silent = TcpStream::connect(&addr).unwrap();
    // A malformed first frame is answered before the connection closes.
    let mut bad = TcpStream::connect(&addr).unwrap();
    bad.write_all(&[0x42; 24]).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = Vec::new();
    bad.read_to_end(&mut reply).unwrap();
    assert!(reply.len() >= 24, "no answer to a malformed first frame");
    assert_eq!(reply[0], tapkv_replication::protocol::MAGIC_RESPONSE);

    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        done.send(node.shutdown().is_ok()).unwrap();
    });
    let ok = finished
        .recv_timeout(Duration::from_secs(10))
        .expect("shutdown still waits for a connection that never said HELLO");
    assert!(ok);
    drop(silent);
}

#[test]
fn connections_past_the_limit_are_refused_with_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).open().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.max_connections = 2;
    let node = Node::start(engine, cfg).unwrap();
    let addr = node.local_addr().to_string();
    let timeout = Duration::from_secs(5);
    let first = Client::connect(&addr, timeout).unwrap();
    let second = TcpStream::connect(&addr).unwrap();
    // The third is answered TEMP_FAILURE and closed, without a thread.
    let mut third = TcpStream::connect(&addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = Vec::new();
    third.read_to_end(&mut reply).unwrap();
    let f = tapkv_replication::protocol::decode(&mut BytesMut::from(&reply[..]), 1 << 20)
        .unwrap()
        .expect("a whole answer");
    assert_eq!(f.status(), tapkv_replication::message::status::TEMP_FAILURE);
    // A refusal for load, not memory (before, it was labelled `temp_oom`).
    assert!(
        String::from_utf8_lossy(&f.value).starts_with("temp_failure: too many connections"),
        "{:?}",
        f.value
    );
    // The project's client reports the refusal rather than a reset.
    match Client::connect(&addr, timeout) {
        Ok(_) => panic!("a connection past the limit was served"),
        Err(tapkv_replication::client::ClientError::Status { status, message }) => {
            assert_eq!(status, tapkv_replication::message::status::TEMP_FAILURE);
            assert!(message.contains("too many connections"), "{message}");
        }
        Err(other) => panic!("not the refusal: {other}"),
    }
    // Both refusals are counted, and neither is a served connection.
    let mut first = first;
    let st = first.stats().unwrap();
    assert_eq!(st["rejected_connections"], 2, "{st}");
    assert_eq!(st["curr_connections"], 2, "{st}");
    assert_eq!(st["total_connections"], 2, "{st}");
    // Once one goes, a new connection is served.
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        if let Ok(c) = Client::connect(&addr, timeout) {
            break c;
        }
        assert!(Instant::now() < deadline, "no connection served again");
        std::thread::sleep(Duration::from_millis(20));
    };
    again.noop().unwrap();
    drop((first, again));
    common::shutdown(node);
}

/// Reads until the node ends the connection (end of stream or reset);
/// false if it is still open after `limit`.
fn ended_within(s: &mut TcpStream, limit: Duration) -> bool {
    ended_within_checking(s, limit, || {})
}

/// [`ended_within`], calling `check` before each read.
fn ended_within_checking(s: &mut TcpStream, limit: Duration, mut check: impl FnMut()) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        check();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A first frame larger than a HELLO is refused at its header: a peer
/// that has not said HELLO cannot trickle a large frame just fast enough to
/// keep its slot past the handshake's deadline, nor take the node's budget
/// for large frames meanwhile (found by a review: it held both for as long
/// as the frame took, 64 KiB per I/O timeout).
#[test]
fn a_large_first_frame_is_refused_before_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.io_timeout = Duration::from_secs(1);
    let node = Node::start(Engine::builder(dir.path()).open().unwrap(), cfg).unwrap();
    let addr = node.local_addr().to_string();
    let mut raw = TcpStream::connect(&addr).unwrap();
    // A HELLO header announcing a 4 MiB body (extras 4).
    let mut header = [0u8; 24];
    header[0] = 0x80;
    header[1] = tapkv_replication::message::opcode::HELLO;
    header[4] = 4;
    header[8..12].copy_from_slice(&(4u32 << 20).to_be_bytes());
    raw.write_all(&header).unwrap();
    let trickle = {
        let mut raw = raw.try_clone().unwrap();
        std::thread::spawn(move || {
            // 64 KiB every 400 ms: within the frame's progress deadline.
            for _ in 0..64 {
                if raw.write_all(&[0u8; 64 << 10]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(400));
            }
        })
    };
    let mut c = Client::connect(&addr, Duration::from_secs(5)).unwrap();
    // Never any of the budget, from the header's arrival to the close.
    let check = || assert_eq!(c.stats().unwrap()["pending_body_bytes"], 0);
    assert!(
        ended_within_checking(&mut raw, Duration::from_secs(5), check),
        "a peer without a handshake kept its slot with a large frame"
    );
    drop(raw);
    trickle.join().unwrap();
    drop(c);
    common::shutdown(node);
}

/// A connection that never says HELLO is closed after the I/O timeout; a
/// frame trickled a byte at a time is cut off once it has gone longer than
/// the I/O timeout without 64 KiB of progress, however steadily the bytes
/// come; a large frame that keeps making progress is neither cut off nor
/// taken for idleness (here it takes longer than the idle timeout).
#[test]
fn silent_handshakes_and_trickled_frames_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    // Frames must make 64 KiB of progress per 5 s; clients idle for 3 s are
    // closed.
    cfg.io_timeout = Duration::from_secs(5);
    cfg.idle_timeout = Duration::from_secs(3);
    let node = Node::start(Engine::builder(dir.path()).open().unwrap(), cfg).unwrap();
    let addr = node.local_addr().to_string();

    let mut silent = TcpStream::connect(&addr).unwrap();
    assert!(
        ended_within(&mut silent, Duration::from_secs(20)),
        "a connection without HELLO kept its slot"
    );

    let mut trickle = TcpStream::connect(&addr).unwrap();
    let mut buf = BytesMut::new();
    hello("trickle").encode(&mut buf);
    trickle.write_all(&buf).unwrap();
    let mut frame = BytesMut::new();
    tapkv_replication::protocol::Frame::request(tapkv_replication::message::opcode::SET, 0)
        .with_extras(vec![0u8; 8])
        .with_key(b"k".to_vec())
        .with_value(vec![b'v'; 1000])
        .encode(&mut frame);
    let writer = {
        let mut w = trickle.try_clone().unwrap();
        std::thread::spawn(move || {
            // One byte every 20 ms: the whole frame would take 20 s.
            for b in frame.iter() {
                if w.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Read the HELLO reply, then wait for the cut.
    assert!(
        ended_within(&mut trickle, Duration::from_secs(15)),
        "a trickled frame held its connection"
    );
    let _ = trickle.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();

    // A large frame over a slow link that keeps making progress (64 KiB
    // every 700 ms, about 4.2 s for the frame: longer than the 3 s idle
    // timeout, which counts polls that read nothing even inside a frame,
    // so a loaded machine has 2.3 s of slack between chunks, and 4.3 s on
    // the 5 s frame deadline) is not cut off.
    let slow = Client::connect(&addr, Duration::from_secs(10)).unwrap();
    let big = vec![b'v'; 384 << 10];
    let mut frame = BytesMut::new();
    tapkv_replication::protocol::Frame::request(
        tapkv_replication::message::opcode::SET,
        slow.partition_of(b"big"),
    )
    .with_extras(vec![0u8; 8])
    .with_key(b"big".to_vec())
    .with_value(big.clone())
    .encode(&mut frame);
    let mut raw = TcpStream::connect(&addr).unwrap();
    let mut hello_frame = BytesMut::new();
    hello("slow").encode(&mut hello_frame);
    raw.write_all(&hello_frame).unwrap();
    for chunk in frame.chunks(64 << 10) {
        raw.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello_reply = tapkv_replication::protocol::read_frame(&mut raw, 1 << 20).unwrap();
    assert_eq!(hello_reply.status(), 0);
    let reply = tapkv_replication::protocol::read_frame(&mut raw, 1 << 20).unwrap();
    assert_eq!(reply.status(), 0, "{reply:?}");
    // (A new client: the first one sat idle past the 3 s idle timeout.)
    let mut check = Client::connect(&addr, Duration::from_secs(10)).unwrap();
    assert_eq!(check.get(b"big").unwrap().0.len(), big.len());
    common::shutdown(node);
}

/// Partly received large frames hold a node-wide budget: one that does not
/// fit is answered TEMP_FAILURE (with its opaque) and its connection
/// closed; the budget comes back once a frame is whole.
#[test]
fn partly_received_large_frames_share_a_budget() {
    use tapkv_replication::message::{opcode, status};
    use tapkv_replication::protocol::{read_frame, Frame};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.max_body = 4 << 20;
    cfg.max_pending_body_bytes = 5 << 20;
    let node = Node::start(Engine::builder(dir.path()).open().unwrap(), cfg).unwrap();
    let addr = node.local_addr().to_string();
    let mut c = Client::connect(&addr, Duration::from_secs(10)).unwrap();
    let set = |c: &Client, key: &[u8], opaque: u32| {
        let mut f = Frame::request(opcode::SET, c.partition_of(key))
            .with_extras(vec![0u8; 8])
            .with_key(key.to_vec())
            .with_value(vec![b'v'; 3 << 20]);
        f.opaque = opaque;
        f.to_bytes()
    };
    let open = |name: &str| raw_hello(&addr, name);
    let pending = |c: &mut Client| c.stats().unwrap()["pending_body_bytes"].as_u64().unwrap();
    let wait_pending = |c: &mut Client, want: &dyn Fn(u64) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !want(pending(c)) {
            assert!(Instant::now() < deadline, "pending stuck at {}", pending(c));
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // A holds 3 MiB of the 5.
    let a_frame = set(&c, b"a", 1);
    let mut a = open("a");
    a.write_all(&a_frame[..200 << 10]).unwrap();
    wait_pending(&mut c, &|p| p >= 3 << 20);
    // B's 3 MiB does not fit.
    let mut b = open("b");
    b.write_all(&set(&c, b"b", 2)[..200 << 10]).unwrap();
    let refusal = read_frame(&mut b, 1 << 20).unwrap();
    assert_eq!(
        (refusal.status(), refusal.opaque),
        (status::TEMP_FAILURE, 2),
        "{refusal:?}"
    );
    assert!(
        String::from_utf8_lossy(&refusal.value).contains("busy"),
        "{refusal:?}"
    );
    // A completes; its budget comes back; C's whole frame is stored.
    a.write_all(&a_frame[200 << 10..]).unwrap();
    assert_eq!(
        read_frame(&mut a, 1 << 20).unwrap().status(),
        status::SUCCESS
    );
    wait_pending(&mut c, &|p| p == 0);
    let mut cc = open("c");
    cc.write_all(&set(&c, b"c", 3)).unwrap();
    assert_eq!(
        read_frame(&mut cc, 1 << 20).unwrap().status(),
        status::SUCCESS
    );
    assert_eq!(c.get(b"c").unwrap().0.len(), 3 << 20);
    common::shutdown(node);
}

/// Replies over 1 MiB that wait for their clients to read them share a
/// node-wide budget (`max_pending_reply_bytes`): one that does not fit is
/// answered `TEMP_FAILURE` "busy" with its opaque, and its connection kept;
/// the budget comes back as the replies are read. Before (found by a
/// review), nothing bounded them: every GET reply copies its value, and a
/// thousand connections that each asked for a 20 MiB value and read
/// nothing held 20 GB of copies.
#[test]
fn unread_large_replies_share_a_budget() {
    use tapkv_replication::message::{opcode, status};
    use tapkv_replication::protocol::{read_frame, Frame};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.max_pending_reply_bytes = 48 << 20;
    let node = Node::start(Engine::builder(dir.path()).open().unwrap(), cfg).unwrap();
    let addr = node.local_addr().to_string();
    let mut c = Client::connect(&addr, Duration::from_secs(30)).unwrap();
    // 20 MiB: more than the socket buffers of a peer that reads nothing
    // take, so its reply waits in the node.
    let value = vec![b'v'; 20 << 20];
    c.set(b"big", &value, 0, false).unwrap();
    let get = |c: &Client, opaque: u32| {
        let mut f = Frame::request(opcode::GET, c.partition_of(b"big")).with_key(b"big".to_vec());
        f.opaque = opaque;
        f.to_bytes()
    };
    let pending = |c: &mut Client| c.stats().unwrap()["pending_reply_bytes"].as_u64().unwrap();
    let wait_pending = |c: &mut Client, want: &dyn Fn(u64) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !want(pending(c)) {
            assert!(Instant::now() < deadline, "pending stuck at {}", pending(c));
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut a = raw_hello(&addr, "a");
    a.write_all(&get(&c, 1)).unwrap();
    wait_pending(&mut c, &|p| p >= 20 << 20);
    let mut b = raw_hello(&addr, "b");
    b.write_all(&get(&c, 2)).unwrap();
    wait_pending(&mut c, &|p| p >= 40 << 20);
    // A third does not fit in the 48 MiB.
    let mut d = raw_hello(&addr, "d");
    d.write_all(&get(&c, 3)).unwrap();
    let refusal = read_frame(&mut d, 1 << 20).unwrap();
    assert_eq!(
        (refusal.status(), refusal.opaque),
        (status::TEMP_FAILURE, 3),
        "{refusal:?}"
    );
    let text = String::from_utf8_lossy(&refusal.value);
    assert!(
        text.contains("busy") && text.contains("--max-pending-reply-bytes"),
        "{text}"
    );
    assert!(pending(&mut c) <= 48 << 20);
    // The two waiting replies are whole, and their budget comes back.
    for (s, opaque) in [(&mut a, 1), (&mut b, 2)] {
        let r = read_frame(s, 32 << 20).unwrap();
        assert_eq!((r.status(), r.opaque), (status::SUCCESS, opaque));
        assert!(r.value == value[..], "reply {opaque}");
    }
    wait_pending(&mut c, &|p| p == 0);
    // The refused connection was kept: it gets the value now.
    d.write_all(&get(&c, 4)).unwrap();
    let r = read_frame(&mut d, 32 << 20).unwrap();
    assert_eq!((r.status(), r.opaque), (status::SUCCESS, 4));
    assert_eq!(r.value.len(), 20 << 20);
    common::shutdown(node);
}

/// A raw connection to the node at `addr` that has said HELLO as `name`
/// (reads and writes time out after 10 s).
fn raw_hello(addr: &str, name: &str) -> TcpStream {
    use tapkv_replication::message::status;
    use tapkv_replication::protocol::read_frame;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = BytesMut::new();
    hello(name).encode(&mut buf);
    s.write_all(&buf).unwrap();
    assert_eq!(
        read_frame(&mut s, 1 << 20).unwrap().status(),
        status::SUCCESS
    );
    s
}

/// A frame refused as it arrives (the budget for large frames is taken, or
/// its body is over `max_body`) is answered, and the answer reaches a peer
/// that sends the whole frame before it reads, as every client does. Before,
/// the node closed with the rest of the frame unread, the kernel reset the
/// connection, and the peer got a reset (or a broken pipe) instead of the
/// answer; tapkv's client, when the answer did arrive, kept using the
/// connection the node had closed.
#[test]
fn a_refused_large_frame_is_answered_to_a_peer_that_sends_it_whole() {
    use tapkv_replication::client::ClientError;
    use tapkv_replication::message::{opcode, status};
    use tapkv_replication::protocol::{read_frame, Frame};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.max_body = 8 << 20;
    // The least `validate` takes: a frame of `max_body` fits alone.
    cfg.max_pending_body_bytes = (8 << 20) + 24;
    let node = Node::start(Engine::builder(dir.path()).open().unwrap(), cfg).unwrap();
    let addr = node.local_addr().to_string();
    let mut c = Client::connect(&addr, Duration::from_secs(10)).unwrap();
    let open = |name: &str| raw_hello(&addr, name);
    // A holds 6 MiB of the budget's 8.
    let a_frame = Frame::request(opcode::SET, c.partition_of(b"a"))
        .with_extras(vec![0u8; 8])
        .with_key(b"a".to_vec())
        .with_value(vec![b'v'; 6 << 20])
        .to_bytes();
    let mut a = open("a");
    a.write_all(&a_frame[..200 << 10]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.stats().unwrap()["pending_body_bytes"].as_u64() < Some(6 << 20) {
        assert!(Instant::now() < deadline, "A's frame never held the budget");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The client's 3 MiB SET does not fit: it sends all of it, then reads.
    let mut b = Client::connect(&addr, Duration::from_secs(10)).unwrap();
    let err = b.set(b"b", &vec![b'v'; 3 << 20], 0, false).unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { status: st, message } if *st == status::TEMP_FAILURE && message.contains("busy")),
        "{err:?}"
    );
    assert!(b.is_broken(), "the node closed this connection");
    // A body over `max_body`, sent whole by a raw peer.
    let mut big = Frame::request(opcode::SET, c.partition_of(b"big"))
        .with_extras(vec![0u8; 8])
        .with_key(b"big".to_vec())
        .with_value(vec![b'v'; 9 << 20]);
    big.opaque = 7;
    let mut d = open("d");
    d.write_all(&big.to_bytes()).unwrap();
    let answer = read_frame(&mut d, 1 << 20).unwrap();
    assert_eq!(
        (answer.status(), answer.opaque),
        (status::INVALID_ARGUMENTS, 7),
        "{answer:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(
        d.read_to_end(&mut rest).unwrap(),
        0,
        "closed after the answer"
    );
    // The node still serves.
    a.write_all(&a_frame[200 << 10..]).unwrap();
    assert_eq!(
        read_frame(&mut a, 1 << 20).unwrap().status(),
        status::SUCCESS
    );
    assert_eq!(c.get(b"a").unwrap().0.len(), 6 << 20);
    common::shutdown(node);
}

/// An engine's refusal of a large write for memory (`TEMP_FAILURE`, as a
/// refused large frame is) leaves the connection open, and tapkv's client
/// keeps using it: only the node's refusal of a frame as it arrives, which
/// ends the connection, counts it broken.
#[test]
fn a_large_write_refused_for_memory_keeps_the_connection() {
    use tapkv_replication::client::ClientError;
    use tapkv_replication::message::status;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path())
        .partitions(1)
        .max_value_size(3 << 20)
        .checkpoint_memory_limit(4 << 20)
        .open()
        .unwrap();
    engine.set_flusher_paused(true);
    let node = Node::start(engine, NodeConfig::new("127.0.0.1:0")).unwrap();
    let mut c = Client::connect(&node.local_addr().to_string(), Duration::from_secs(10)).unwrap();
    c.set(b"first", &vec![b'a'; 2 << 20], 0, false).unwrap();
    let err = c
        .set(b"second", &vec![b'b'; 5 << 19], 0, false)
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { status: st, .. } if *st == status::TEMP_FAILURE),
        "{err:?}"
    );
    assert!(!c.is_broken(), "{err:?}");
    assert_eq!(c.get(b"first").unwrap().0.len(), 2 << 20);
    common::shutdown(node);
}

/// A node configured for values over the protocol's default body limit
/// serves them back: tapkv's client takes replies as large as the node's
/// `max_body` (from its HELLO). Before, the value was stored and its GET
/// failed with `BodyTooLarge`.
#[test]
fn a_value_over_the_default_body_limit_is_read_back_from_a_node_that_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path())
        .max_value_size(40 << 20)
        .open()
        .unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.max_body = 48 << 20;
    let node = Node::start(engine, cfg).unwrap();
    let mut c = Client::connect(&node.local_addr().to_string(), Duration::from_secs(30)).unwrap();
    let value = vec![7u8; 30 << 20];
    c.set(b"big", &value, 0, false).unwrap();
    let (got, _) = c.get(b"big").unwrap();
    assert_eq!(got.len(), value.len());
    assert!(got.iter().all(|&b| b == 7));
    assert!(!c.is_broken());
    common::shutdown(node);
}

/// Before its HELLO, a response frame (magic 0x81) is a first request that
/// is not a HELLO: answered HANDSHAKE_REQUIRED, and the connection closed.
/// Before, it was answered and skipped, and reset the handshake's deadline,
/// so a peer sending one every few hundred milliseconds held its slot and
/// thread for ever without a handshake.
#[test]
fn a_response_frame_before_the_handshake_ends_the_connection() {
    use tapkv_replication::message::{opcode, status};
    use tapkv_replication::protocol::{read_frame, Frame};
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        Engine::builder(dir.path()).open().unwrap(),
        NodeConfig::new("127.0.0.1:0"),
    )
    .unwrap();
    let mut s = TcpStream::connect(node.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut f = Frame::response(&Frame::request(opcode::NOOP, 0), status::SUCCESS);
    f.opaque = 9;
    s.write_all(&f.to_bytes()).unwrap();
    let answer = read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(
        (answer.status(), answer.opaque),
        (status::HANDSHAKE_REQUIRED, 9),
        "{answer:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "closed after the answer"
    );
    common::shutdown(node);
}

#[test]
fn a_replicate_write_waiting_at_shutdown_does_not_hold_the_stop() {
    // Before, a stop waited out the write's whole replicate timeout (up
    // to a day as configured) with the write's connection thread.
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path())
        .replicate_timeout(Duration::from_secs(120))
        .open()
        .unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.min_replicas = 1;
    let node = Node::start(engine, cfg).unwrap();
    let addr = node.local_addr().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer_addr = addr.clone();
    std::thread::spawn(move || {
        let mut c = Client::connect(&writer_addr, Duration::from_secs(150)).unwrap();
        let r = c.set_durable(b"k", b"v", 0, tapkv_engine::Durability::Replicate);
        let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
    });
    let mut c = Client::connect(&addr, Duration::from_secs(5)).unwrap();
    common::wait_until(
        "the write to wait for replicas",
        Duration::from_secs(10),
        || c.stats().unwrap()["replicate_waiting"] == 1,
    );
    drop(c);
    let took = common::shutdown_within(node, Duration::from_secs(30))
        .expect("the stop waited for the Replicate write");
    assert!(took < Duration::from_secs(30));
    let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let e = r.expect_err("the write was acknowledged without a replica");
    assert!(e.contains("node is stopping"), "{e}");
}

#[test]
fn a_frame_arriving_just_fast_enough_does_not_hold_a_stop() {
    // A 4 MiB SET whose bytes come at about 270 KiB/s: fast enough for the
    // frame deadline (64 KiB per 1 s I/O timeout), with room for the
    // trickler to stall about 0.75 s on a loaded machine, so the connection
    // is not cut off. Before, the connection's thread read on until the
    // frame was whole (about 15 s here; 55 minutes for a 21 MiB frame at the
    // default timeout) without looking at the stop flag, and the stop
    // waited for it.
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).open().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.io_timeout = Duration::from_secs(1);
    let node = Node::start(engine, cfg).unwrap();
    let addr = node.local_addr().to_string();
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(&hello("trickler").to_bytes()).unwrap();
    let mut answer = [0u8; 24];
    conn.read_exact(&mut answer).unwrap();
    let frame =
        tapkv_replication::protocol::Frame::request(tapkv_replication::message::opcode::SET, 0)
            .with_extras(vec![0u8; 8])
            .with_key(&b"k"[..])
            .with_value(vec![b'v'; 4 << 20])
            .to_bytes();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickling = std::sync::Arc::clone(&stop);
    let trickler = std::thread::spawn(move || {
        let give_up = Instant::now() + Duration::from_secs(40);
        for chunk in frame.chunks(8 << 10) {
            if trickling.load(std::sync::atomic::Ordering::Relaxed)
                || Instant::now() > give_up
                || conn.write_all(chunk).is_err()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    // The node holds the large frame's budget once its header is in: the
    // frame is arriving.
    let mut c = Client::connect(&addr, Duration::from_secs(5)).unwrap();
    common::wait_until("the frame to be arriving", Duration::from_secs(10), || {
        c.stats().unwrap()["pending_body_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    drop(c);
    let took = common::shutdown_within(node, Duration::from_secs(8));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickler.join().unwrap();
    assert!(took.is_some(), "the stop waited for the trickled frame");
}

/// A connection the node cannot start a thread for (the process at its
/// thread limit) is answered `TEMP_FAILURE` "busy" with opaque 0, counted
/// in `rejected_connections`, and the node serves the next one. Before
/// (found by a review), the failed spawn dropped the connection with its
/// closure: the peer got a reset instead of an answer.
#[test]
fn a_connection_whose_thread_cannot_start_is_answered() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tapkv_replication::message::status;
    use tapkv_replication::node::SpawnFailureHook;
    use tapkv_replication::protocol::read_frame;
    let dir = tempfile::tempdir().unwrap();
    let failures = std::sync::Arc::new(AtomicUsize::new(0));
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    let f = std::sync::Arc::clone(&failures);
    cfg.fail_connection_spawn = Some(SpawnFailureHook(std::sync::Arc::new(move || {
        f.fetch_update(Ordering::AcqRel, Ordering::Acquire, |k| k.checked_sub(1))
            .is_ok()
    })));
    let node = Node::start(Engine::builder(dir.path()).open().unwrap(), cfg).unwrap();
    let addr = node.local_addr().to_string();
    failures.store(1, Ordering::Release);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = BytesMut::new();
    hello("refused").encode(&mut buf);
    s.write_all(&buf).unwrap();
    let answer = read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(
        (answer.status(), answer.opaque),
        (status::TEMP_FAILURE, 0),
        "{answer:?}"
    );
    let text = String::from_utf8_lossy(&answer.value);
    assert!(text.contains("busy") && text.contains("thread"), "{text}");
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "closed after it");
    // The next connection is served, and the refusal was counted.
    let mut c = Client::connect(&addr, Duration::from_secs(10)).unwrap();
    assert_eq!(c.stats().unwrap()["rejected_connections"].as_u64(), Some(1));
    common::shutdown(node);
}

/// A reply larger than the whole reply budget (a value stored under larger
/// limits than the node's now, as a replica holds its primary's) is sent
/// when no other large reply holds the budget. Before (found by a review),
/// it was answered "busy, try again later" for good.
#[test]
fn a_reply_larger_than_the_reply_budget_is_sent_alone() {
    use tapkv_replication::message::{opcode, status};
    use tapkv_replication::protocol::{read_frame, Frame};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.max_body = 4 << 20;
    cfg.max_pending_reply_bytes = (4 << 20) + 24;
    let node = Node::start(Engine::builder(dir.path()).open().unwrap(), cfg).unwrap();
    let e = node.engine().unwrap();
    let value = vec![b'v'; 6 << 20];
    e.set(b"big", &value[..], WriteOptions::default()).unwrap();
    let mut s = raw_hello(&node.local_addr().to_string(), "big");
    let mut get = Frame::request(opcode::GET, e.partition_of(b"big")).with_key(b"big".to_vec());
    get.opaque = 9;
    s.write_all(&get.to_bytes()).unwrap();
    let r = read_frame(&mut s, 8 << 20).unwrap();
    assert_eq!((r.status(), r.opaque), (status::SUCCESS, 9));
    assert!(r.value == value[..]);
    common::shutdown(node);
}
