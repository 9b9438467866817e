//! Malformed input to a live node: every bad frame gets an error response or
//! a clean close, and the node keeps serving other connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tapkv_replication::message::{hello, opcode, status};
use tapkv_replication::protocol::{read_frame, Frame};
use tapkv_tests::NodeProc;

fn raw(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn handshake(s: &mut TcpStream) {
    s.write_all(&hello("fuzzer").to_bytes()).unwrap();
    let r = read_frame(s, 1 << 20).unwrap();
    assert_eq!(r.status(), status::SUCCESS);
}

/// Reads until the node closes the connection (bounded by the read timeout).
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// Reads until the node ends the connection: true at end of stream or a
/// reset, false if it stays open until the read timeout.
fn ended(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

#[test]
fn malformed_frames_get_errors_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), "127.0.0.1:0", None, "target", &[]);
    // A client connected before all of it, and used after.
    let mut early = node.client();
    early.set(b"early", b"before", 0, false).unwrap();

    // A request before HELLO.
    let mut s = raw(&node.addr);
    s.write_all(
        &Frame::request(opcode::GET, 0)
            .with_key(b"k".to_vec())
            .to_bytes(),
    )
    .unwrap();
    assert_eq!(
        read_frame(&mut s, 1 << 20).unwrap().status(),
        status::HANDSHAKE_REQUIRED
    );

    // An unknown protocol version.
    let mut s = raw(&node.addr);
    let mut bad = hello("old");
    bad.extras = 99u32.to_be_bytes().to_vec().into();
    s.write_all(&bad.to_bytes()).unwrap();
    assert_eq!(
        read_frame(&mut s, 1 << 20).unwrap().status(),
        status::BAD_VERSION
    );

    // Bad magic after the handshake: an error answer, then a close.
    let mut s = raw(&node.addr);
    handshake(&mut s);
    s.write_all(&[0x42; 24]).unwrap();
    let r = read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(r.status(), status::INVALID_ARGUMENTS);
    // No header to echo: the bytes are not an opcode and an opaque (before,
    // 0x42 and 0x42424242 were echoed).
    assert_eq!((r.opcode, r.opaque), (0, 0));
    assert!(closed(&mut s));

    // An empty key is invalid whatever partition the request names
    // (before, any but 0 was told the key belonged to partition 0).
    let mut s = raw(&node.addr);
    handshake(&mut s);
    for (i, f) in [
        Frame::request(opcode::GET, 1),
        Frame::request(opcode::SET, 1).with_extras(vec![0; 8]),
        Frame::request(opcode::DELETE, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = f;
        f.opaque = 100 + i as u32;
        s.write_all(&f.to_bytes()).unwrap();
        let r = read_frame(&mut s, 1 << 20).unwrap();
        assert_eq!(r.opaque, f.opaque);
        assert_eq!(r.status(), status::INVALID_ARGUMENTS, "{f:?}");
        assert!(
            r.value.starts_with(b"invalid_argument: the key is empty"),
            "{r:?}"
        );
    }

    // A header advertising a 4 GiB body: refused without waiting for it.
    let mut s = raw(&node.addr);
    handshake(&mut s);
    let mut h = vec![0x80u8, opcode::SET, 0, 1, 8, 0, 0, 0];
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    h.extend_from_slice(&[0; 12]);
    s.write_all(&h).unwrap();
    let r = read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(r.status(), status::INVALID_ARGUMENTS);
    assert!(String::from_utf8_lossy(&r.value).contains("exceeds"));
    assert!(closed(&mut s));

    // Unknown opcode and malformed extras: error answers, connection stays.
    let mut s = raw(&node.addr);
    handshake(&mut s);
    s.write_all(&Frame::request(0xee, 0).to_bytes()).unwrap();
    assert_eq!(
        read_frame(&mut s, 1 << 20).unwrap().status(),
        status::UNKNOWN_COMMAND
    );
    s.write_all(
        &Frame::request(opcode::SET, 0)
            .with_key(b"k".to_vec())
            .to_bytes(),
    )
    .unwrap();
    let st = read_frame(&mut s, 1 << 20).unwrap().status();
    assert!(
        st == status::INVALID_ARGUMENTS || st == status::NOT_MY_VBUCKET,
        "{st}"
    );
    s.write_all(
        &Frame::request(opcode::STREAM_OPEN, 0)
            .with_key(b"x".to_vec())
            .with_value(vec![1, 2, 3])
            .to_bytes(),
    )
    .unwrap();
    assert_eq!(
        read_frame(&mut s, 1 << 20).unwrap().status(),
        status::INVALID_ARGUMENTS
    );
    // A stream asking for one partition twice is refused: it re-registered
    // its cursor at each position (skipping or repeating entries) and
    // scanned the disk once per entry.
    let twice = tapkv_replication::message::StreamRequest {
        partition: 0,
        uuid: 0,
        seqno: 0,
    };
    s.write_all(&tapkv_replication::message::stream_open("dup", &[twice, twice]).to_bytes())
        .unwrap();
    let r = read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(r.status(), status::INVALID_ARGUMENTS);
    assert!(
        String::from_utf8_lossy(&r.value).contains("asked for twice"),
        "{r:?}"
    );
    s.write_all(&Frame::request(opcode::NOOP, 0).to_bytes())
        .unwrap();
    assert_eq!(
        read_frame(&mut s, 1 << 20).unwrap().status(),
        status::SUCCESS
    );

    // Datatype bits: JSON (0x01) is accepted; snappy (0x02) is refused
    // rather than stored raw and answered as plain bytes. Before, any bits
    // went through.
    let p = early.partition_of(b"typed");
    for (datatype, want) in [(0x01u8, status::SUCCESS), (0x02, status::INVALID_ARGUMENTS)] {
        let mut f = Frame::request(opcode::SET, p)
            .with_extras(vec![0u8; 8])
            .with_key(b"typed".to_vec())
            .with_value(b"{}".to_vec());
        f.datatype = datatype;
        s.write_all(&f.to_bytes()).unwrap();
        let r = read_frame(&mut s, 1 << 20).unwrap();
        assert_eq!(r.status(), want, "datatype 0x{datatype:02x}: {r:?}");
    }

    // PARTITION_OF refuses an empty key, as GET and SET do (before, it
    // answered partition 0).
    s.write_all(&Frame::request(opcode::PARTITION_OF, 0).to_bytes())
        .unwrap();
    assert_eq!(
        read_frame(&mut s, 1 << 20).unwrap().status(),
        status::INVALID_ARGUMENTS
    );

    // Random garbage from several connections at once.
    let junk: Vec<Vec<u8>> = (0..8u8)
        .map(|i| {
            (0..200u32)
                .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
                .collect()
        })
        .collect();
    let senders: Vec<_> = junk
        .into_iter()
        .map(|j| {
            let addr = node.addr.clone();
            std::thread::spawn(move || {
                let mut s = raw(&addr);
                let _ = s.write_all(&j);
                ended(&mut s)
            })
        })
        .collect();
    for (i, t) in senders.into_iter().enumerate() {
        // Each is answered and closed (or reset), never left hanging until
        // the read timeout.
        assert!(t.join().unwrap(), "junk connection {i} was left open");
    }

    // The node still serves, new connections and the one open through it.
    let mut c = node.client();
    c.set(b"still", b"alive", 0, false).unwrap();
    assert_eq!(c.get(b"still").unwrap().0, &b"alive"[..]);
    assert_eq!(early.get(b"early").unwrap().0, &b"before"[..]);
    early.set(b"early", b"after", 0, false).unwrap();
    assert_eq!(c.get(b"early").unwrap().0, &b"after"[..]);
}

/// A text-protocol line is refused at its first byte (not after waiting for
/// 24); a response frame sent as a request is answered with an error and
/// the connection goes on; an error answer to a frame whose header arrived
/// carries that frame's opcode and opaque.
#[test]
fn wrong_magic_response_frames_and_oversized_bodies_are_answered_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        "target",
        &["--max-body", "4096"],
    );

    // memcached's text protocol: 9 bytes, answered and closed at once.
    let mut s = raw(&node.addr);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"get foo\r\n").unwrap();
    let f = read_frame(&mut s, 1 << 20).expect("an answer within 5 s, not the idle timeout");
    assert_eq!(f.status(), status::INVALID_ARGUMENTS);
    assert!(String::from_utf8_lossy(&f.value).contains("magic"), "{f:?}");

    // A response frame where a request belongs.
    let mut s = raw(&node.addr);
    handshake(&mut s);
    let mut noop = Frame::request(opcode::NOOP, 0);
    noop.magic = 0x81;
    noop.opaque = 77;
    s.write_all(&noop.to_bytes()).unwrap();
    let f = read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(
        (f.status(), f.opaque),
        (status::INVALID_ARGUMENTS, 77),
        "{f:?}"
    );
    let mut noop = Frame::request(opcode::NOOP, 0);
    noop.opaque = 78;
    s.write_all(&noop.to_bytes()).unwrap();
    let f = read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(
        (f.status(), f.opaque),
        (status::SUCCESS, 78),
        "the connection goes on"
    );

    // A body over --max-body: the answer names the request's opcode and opaque.
    let mut set = Frame::request(opcode::SET, 0)
        .with_extras(vec![0u8; 8])
        .with_key(b"k".to_vec())
        .with_value(vec![b'v'; 8192]);
    set.opaque = 0x1234;
    s.write_all(&set.to_bytes()[..24]).unwrap();
    let f = read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(f.status(), status::INVALID_ARGUMENTS, "{f:?}");
    assert_eq!((f.opcode, f.opaque), (opcode::SET, 0x1234), "{f:?}");
}
