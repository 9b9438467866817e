//! Property tests of the frame codec: arbitrary bytes never panic or allocate
//! beyond the limit; frames round-trip; stream messages round-trip.

// Only the socket helpers (the node helpers of `common` need nothing here).
#[allow(dead_code)]
#[path = "../../tests/src/net.rs"]
mod net;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tapkv_engine::{ItemMeta, QueueOp, QueuedItem};
use tapkv_replication::message::{Ack, StreamMessage};
use tapkv_replication::protocol::{
    decode, decode_ref, read_frame, Frame, ProtocolError, HEADER_LEN,
};

const MAX: usize = 4096;

/// The global allocator of this test binary: `System`, noting the largest
/// single allocation each thread asks for, so a test can show that a
/// length field never sizes an allocation past the limit (under Linux's
/// overcommit a 4 GiB reservation that is never touched would go unseen
/// otherwise).
struct Counting;

thread_local! {
    static LARGEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Bytes allocated minus bytes freed by this thread.
    static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    /// Bytes allocated by this thread, all told.
    static TOTAL: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let _ = TOTAL.try_with(|t| t.set(t.get() + size));
    live_change(size as isize);
}

/// Bytes this thread has allocated, all told.
fn total_allocated() -> usize {
    TOTAL.with(|t| t.get())
}

fn live_change(by: isize) {
    let _ = LIVE.try_with(|l| l.set(l.get() + by));
}

/// Bytes this thread has allocated and not freed.
fn live() -> isize {
    LIVE.with(|l| l.get())
}

// SAFETY: every call is forwarded to `System` unchanged.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        std::alloc::System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        std::alloc::System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        note(new);
        live_change(-(layout.size() as isize));
        std::alloc::System.realloc(ptr, layout, new)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        live_change(-(layout.size() as isize));
        std::alloc::System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`; returns its result and the largest single allocation this
/// thread made meanwhile.
fn largest_allocation_in<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(|l| l.get()))
}

/// A node's connection reader (the largest body a node accepts), reads
/// timing out after 10 s.
fn node_reader(conn: std::net::TcpStream) -> tapkv_replication::io::FrameReader {
    let reader = tapkv_replication::io::FrameReader::new(
        conn,
        tapkv_replication::protocol::DEFAULT_MAX_BODY,
    );
    reader
        .set_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    reader
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        prop_oneof![Just(0x80u8), Just(0x81u8)],
        any::<u8>(),
        any::<u8>(),
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..32),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(
            |(magic, opcode, datatype, vb, opaque, cas, e, k, v)| Frame {
                magic,
                opcode,
                datatype,
                vbucket_or_status: vb,
                opaque,
                cas,
                extras: Bytes::from(e),
                key: Bytes::from(k),
                value: Bytes::from(v),
            },
        )
}

/// Stream messages of every kind, valid.
fn stream_message() -> impl Strategy<Value = StreamMessage> {
    (
        any::<u16>(),
        1u64..1 << 40,
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 1..24),
        proptest::collection::vec(any::<u8>(), 0..64),
        0u8..9,
    )
        .prop_map(|(partition, seqno, x, key, value, kind)| {
            let meta = ItemMeta {
                by_seqno: seqno,
                cas: x,
                rev_seqno: 1,
                ..ItemMeta::default()
            };
            let item = |op, key: &[u8], value: &[u8]| StreamMessage::Item {
                partition,
                item: QueuedItem::new(op, key, value, meta),
            };
            match kind {
                0 => item(QueueOp::Mutation, &key, &value),
                1 => item(QueueOp::Deletion, &key, &[]),
                2 => item(QueueOp::OnlineUpdateStart { checkpoint_id: x }, &[], &[]),
                3 => item(QueueOp::OnlineUpdateRevert { checkpoint_id: x }, &[], &[]),
                4 => StreamMessage::Snapshot {
                    partition,
                    start: seqno,
                    end: x,
                    from_disk: x % 2 == 0,
                },
                5 => StreamMessage::CheckpointStart { partition, id: x },
                6 => StreamMessage::CheckpointEnd { partition, id: x },
                7 => StreamMessage::Failover { partition, uuid: x },
                _ => StreamMessage::Rollback { partition },
            }
        })
}

/// Decodes `data` until an error or a need for more bytes: no panic, every
/// frame within the limit, and the borrowing decoder agreeing with the
/// owning one at every step (also on what stream message each frame is).
fn decode_all(data: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(data);
    loop {
        let borrowed = decode_ref(&buf, MAX).map(|r| {
            r.map(|(f, len)| {
                (
                    format!("{f:?}"),
                    len,
                    StreamMessage::from_frame_ref(&f).ok(),
                )
            })
        });
        let (owned, largest) = largest_allocation_in(|| decode(&mut buf, MAX));
        prop_assert!(
            largest <= HEADER_LEN + MAX,
            "decode allocated {largest} bytes"
        );
        match (owned, borrowed) {
            (Ok(Some(f)), Ok(Some((fields, len, msg)))) => {
                prop_assert!(f.wire_len() <= HEADER_LEN + MAX);
                prop_assert_eq!(len, f.wire_len());
                // Every field: what a replica's in-place path reads.
                prop_assert_eq!(fields, format!("{:?}", f.as_frame_ref()));
                prop_assert_eq!(msg, StreamMessage::from_frame(&f).ok());
                let _ = Ack::from_frame(&f);
            }
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => break,
            (o, b) => prop_assert!(
                false,
                "decoders disagree: {:?} vs {:?}",
                o.map(|f| f.is_some()),
                b.map(|r| r.is_some())
            ),
        }
    }
    let (_, largest) = largest_allocation_in(|| read_frame(&mut &data[..], MAX));
    prop_assert!(
        largest <= HEADER_LEN + MAX,
        "read_frame allocated {largest} bytes"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        decode_all(&data)?;
    }

    /// Random bytes mostly fail at the magic byte; valid frames with a few
    /// bytes changed (header fields included) reach every later check.
    #[test]
    fn mutated_frames_never_panic(
        f in frame(),
        muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut data = f.to_bytes().to_vec();
        for (at, byte) in muts {
            let i = at % data.len();
            data[i] = byte;
        }
        data.extend_from_slice(&tail);
        decode_all(&data)?;
    }

    /// Random frames almost never get past a stream message's datatype and
    /// exact extras lengths; valid stream frames with a few bytes changed
    /// reach the parsing of each kind's body.
    #[test]
    fn mutated_stream_frames_never_panic(
        m in stream_message(),
        muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut data = m.to_frame().to_bytes().to_vec();
        for (at, byte) in muts {
            // Past the magic byte: a changed magic fails at once.
            let i = 1 + at % (data.len() - 1);
            data[i] = byte;
        }
        decode_all(&data)?;
    }

    #[test]
    fn frames_round_trip(f in frame(), split in 0usize..700) {
        let bytes = f.to_bytes();
        // Fed in two pieces, the decoder waits for the whole frame.
        let cut = split.min(bytes.len());
        let mut buf = BytesMut::from(&bytes[..cut]);
        if cut < bytes.len() {
            prop_assert!(decode(&mut buf, MAX).unwrap().is_none());
            buf.extend_from_slice(&bytes[cut..]);
        }
        let (borrowed, len) = decode_ref(&buf, MAX).unwrap().unwrap();
        prop_assert_eq!(len, bytes.len());
        prop_assert_eq!(
            (borrowed.magic, borrowed.opcode, borrowed.datatype, borrowed.vbucket_or_status),
            (f.magic, f.opcode, f.datatype, f.vbucket_or_status)
        );
        prop_assert_eq!(
            (borrowed.opaque, borrowed.cas, borrowed.extras, borrowed.key, borrowed.value),
            (f.opaque, f.cas, &f.extras[..], &f.key[..], &f.value[..])
        );
        let got = decode(&mut buf, MAX).unwrap().unwrap();
        prop_assert_eq!(&got, &f);
        prop_assert!(buf.is_empty());
        prop_assert_eq!(read_frame(&mut &bytes[..], MAX).unwrap(), f);
    }

    #[test]
    fn stream_messages_round_trip(
        p in any::<u16>(), seqno in 1u64.., cas in any::<u64>(), rev in any::<u64>(),
        flags in any::<u32>(), expiry in any::<u32>(), id in any::<u64>(),
        key in proptest::collection::vec(any::<u8>(), 1..40),
        value in proptest::collection::vec(any::<u8>(), 0..100),
        kind in 0u8..5,
    ) {
        let meta = ItemMeta { by_seqno: seqno, cas, rev_seqno: rev, flags, expiry };
        let (op, key, value, meta) = match kind {
            0 => (QueueOp::Mutation, key, value, meta),
            1 => (QueueOp::Deletion, key, vec![], meta),
            2 => (QueueOp::OnlineUpdateStart { checkpoint_id: id }, vec![], vec![], ItemMeta { by_seqno: seqno, cas, ..ItemMeta::default() }),
            3 => (QueueOp::OnlineUpdateEnd { checkpoint_id: id }, vec![], vec![], ItemMeta { by_seqno: seqno, cas, ..ItemMeta::default() }),
            _ => (QueueOp::OnlineUpdateRevert { checkpoint_id: id }, vec![], vec![], ItemMeta { by_seqno: seqno, cas, ..ItemMeta::default() }),
        };
        let m = StreamMessage::Item { partition: p, item: QueuedItem::new(op, &key, &value, meta) };
        let back = StreamMessage::from_frame(&m.to_frame()).unwrap();
        // The allocation-free encoding writes exactly the frame's bytes.
        let mut direct = BytesMut::new();
        m.encode(&mut direct);
        prop_assert_eq!(&direct[..], &m.to_frame().to_bytes()[..]);
        prop_assert_eq!(back, m);
    }
}

#[test]
fn oversized_and_inconsistent_headers_are_refused_before_allocating() {
    let mut h = vec![0x80u8, 0x01, 0, 0, 0, 0, 0, 0];
    h.extend_from_slice(&u32::MAX.to_be_bytes()); // 4 GiB body
    h.extend_from_slice(&[0; 12]);
    let mut buf = BytesMut::from(&h[..]);
    let (r, largest) = largest_allocation_in(|| decode(&mut buf, MAX));
    assert!(matches!(r, Err(ProtocolError::BodyTooLarge { .. })));
    assert!(largest < 1024, "decode allocated {largest} bytes");
    let (r, largest) = largest_allocation_in(|| read_frame(&mut &h[..], MAX));
    assert!(matches!(r, Err(ProtocolError::BodyTooLarge { .. })));
    assert!(largest < 1024, "read_frame allocated {largest} bytes");
    // A node's connection reader, with the largest body a node accepts.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let conn = net::accept_within(&listener, std::time::Duration::from_secs(10));
    std::io::Write::write_all(&mut peer, &h).unwrap();
    let mut reader = node_reader(conn);
    let (r, largest) = largest_allocation_in(|| reader.poll());
    assert!(
        matches!(r, Err(ProtocolError::BodyTooLarge { .. })),
        "{r:?}"
    );
    assert!(
        largest < 1 << 20,
        "the connection reader allocated {largest} bytes"
    );
    let mut h = vec![0x80u8, 0x01, 0, 100, 8, 0, 0, 0, 0, 0, 0, 10];
    h.extend_from_slice(&[0; 12]);
    assert!(matches!(
        read_frame(&mut &h[..], MAX),
        Err(ProtocolError::BadLengths { .. })
    ));
    let h = [0x42u8; 24];
    assert!(matches!(
        read_frame(&mut &h[..], MAX),
        Err(ProtocolError::BadMagic(0x42))
    ));
}

#[test]
fn a_large_frame_arriving_in_pieces_is_buffered_once_at_its_size() {
    // The connection reader reads straight into its buffer's spare room:
    // a large frame's buffer is sized from its header, once, not grown by
    // doubling as the pieces arrive (which could hold twice the frame),
    // and whatever the sizes of the reads, the frame comes out whole.
    const VALUE: usize = 6 << 20;
    let value: Vec<u8> = (0..VALUE).map(|i| (i % 251) as u8).collect();
    let mut wire = Frame::request(0x01, 3)
        .with_key(&b"big"[..])
        .with_value(value.clone())
        .to_bytes()
        .to_vec();
    // Small frames before and after it, so it starts mid-buffer.
    let small = Frame::request(0x0a, 0)
        .with_value(vec![9u8; 100])
        .to_bytes();
    wire.splice(0..0, small.iter().copied());
    wire.extend_from_slice(&small);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sender = std::thread::spawn(move || {
        let mut peer = std::net::TcpStream::connect(addr).unwrap();
        // Uneven pieces, each flushed on its own.
        let mut at = 0;
        let mut piece = 1;
        while at < wire.len() {
            let end = (at + piece).min(wire.len());
            std::io::Write::write_all(&mut peer, &wire[at..end]).unwrap();
            at = end;
            piece = piece * 7 % 300_007 + 1;
        }
        peer
    });
    let conn = net::accept_within(&listener, std::time::Duration::from_secs(10));
    let held_before = live();
    let mut reader = node_reader(conn);
    let mut next = || {
        for _ in 0..1_000 {
            if let Some(f) = reader.poll().unwrap() {
                return f;
            }
        }
        panic!("no frame within 1,000 read timeouts");
    };
    let ((first, big, last), largest) = largest_allocation_in(|| (next(), next(), next()));
    let mut peer = sender.join().unwrap();
    assert_eq!(first.value.len(), 100);
    assert_eq!(&big.key[..], b"big");
    assert!(
        big.value[..] == value[..],
        "the large frame came out changed"
    );
    assert_eq!(last.value.len(), 100);
    let len = HEADER_LEN + 3 + VALUE;
    assert!(
        largest <= len + (128 << 10),
        "the reader allocated {largest} bytes for a frame of {len}"
    );
    // Once the large frame is gone, the connection does not keep its
    // allocation (before, the next read took it back for good: a thousand
    // connections that each sent one 20 MiB frame held 20 GiB).
    drop((first, big, last));
    std::io::Write::write_all(&mut peer, &small).unwrap();
    assert_eq!(next().value.len(), 100);
    let held = live() - held_before;
    assert!(
        held < 2 << 20,
        "the reader holds {held} bytes after a large frame"
    );
    // The same through `poll_map` (frames borrowed from the buffer, as a
    // replica's link reads them).
    let big_wire = Frame::request(0x01, 3)
        .with_key(&b"big"[..])
        .with_value(value)
        .to_bytes();
    // Written by another thread: the socket's buffers do not hold 6 MiB.
    let (big_len, small_len) = (big_wire.len(), small.len());
    let second = std::thread::spawn({
        let small = small.clone();
        move || {
            std::io::Write::write_all(&mut peer, &big_wire).unwrap();
            std::io::Write::write_all(&mut peer, &small).unwrap();
            peer
        }
    });
    let mut next_len = || {
        for _ in 0..1_000 {
            if let Some(n) = reader.poll_map(|f| f.wire_len()).unwrap() {
                return n;
            }
        }
        panic!("no frame within 1,000 read timeouts");
    };
    assert_eq!(next_len(), big_len);
    assert_eq!(next_len(), small_len);
    let mut peer = second.join().unwrap();
    std::io::Write::write_all(&mut peer, &small).unwrap();
    assert_eq!(next_len(), small_len);
    let held = live() - held_before;
    assert!(
        held < 2 << 20,
        "the reader holds {held} bytes after a large frame read in place"
    );
}

#[test]
fn a_writer_lets_go_of_a_large_reply_once_it_is_sent() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let drainer = std::thread::spawn(move || {
        let mut c = net::accept_within(&listener, std::time::Duration::from_secs(10));
        let mut sink = vec![0u8; 1 << 16];
        let mut total = 0;
        while let Ok(n) = std::io::Read::read(&mut c, &mut sink) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_write_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let held_before = live();
    let mut writer = tapkv_replication::io::FrameWriter::new(conn);
    let big = Frame::request(0x00, 0).with_value(vec![7u8; 6 << 20]);
    writer.send(&big).unwrap();
    drop(big);
    let held = live() - held_before;
    assert!(
        held < 2 << 20,
        "the writer holds {held} bytes after sending a large frame"
    );
    drop(writer);
    assert!(drainer.join().unwrap() > 6 << 20);
}

#[test]
fn the_last_bytes_of_a_large_frame_arriving_in_pieces_are_not_copied_again_and_again() {
    // Before, once less than a read's worth (64 KiB) of a large frame was
    // left, every read asked for 64 KiB of room in a buffer sized to the
    // frame, and got it by copying the whole frame into a new buffer: a
    // peer sending a 20 MiB frame's last bytes in small pieces had the
    // node copy 20 MiB per piece.
    const VALUE: usize = 6 << 20;
    const PIECE: usize = 4 << 10;
    let wire = Frame::request(0x01, 3)
        .with_key(&b"big"[..])
        .with_value(vec![3u8; VALUE])
        .to_bytes();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let tail = 16 * PIECE;
    let sender = std::thread::spawn(move || {
        let mut peer = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut peer, &wire[..wire.len() - tail]).unwrap();
        // Each piece once the reader has taken what came before it.
        for piece in wire[wire.len() - tail..].chunks(PIECE) {
            if go_rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .is_err()
            {
                return;
            }
            std::io::Write::write_all(&mut peer, piece).unwrap();
        }
    });
    let conn = net::accept_within(&listener, std::time::Duration::from_secs(10));
    let mut reader = node_reader(conn);
    reader
        .set_timeout(std::time::Duration::from_millis(20))
        .unwrap();
    let before = total_allocated();
    let mut frame = None;
    for _ in 0..2_000 {
        if let Some(f) = reader.poll().unwrap() {
            frame = Some(f);
            break;
        }
        // A poll that ends without a frame has read all that came.
        if reader.take_progress() || reader.caught_up() {
            let _ = go_tx.send(());
        }
    }
    let allocated = total_allocated() - before;
    sender.join().unwrap();
    let frame = frame.expect("the frame never came whole");
    assert_eq!(frame.value.len(), VALUE);
    assert!(
        allocated < 2 * VALUE,
        "reading a {VALUE}-byte frame allocated {allocated} bytes"
    );
}

/// A SNAPSHOT's from-disk byte is 0 or 1, and a stream frame's datatype 0
/// or JSON: anything else is malformed. Before, any from-disk byte but 1
/// read as the closing marker (the disk entries after it were then applied
/// as a run, older seqnos dropped as duplicates), and a compressed value
/// was stored raw.
#[test]
fn snapshot_flags_and_stream_datatypes_outside_the_protocol_are_malformed() {
    use tapkv_replication::message::opcode;
    let snapshot = |flag: u8| {
        let mut e = BytesMut::new();
        e.extend_from_slice(&1u64.to_be_bytes());
        e.extend_from_slice(&3u64.to_be_bytes());
        e.extend_from_slice(&[flag]);
        Frame::request(opcode::SNAPSHOT, 0).with_extras(e.freeze())
    };
    for (flag, from_disk) in [(0, false), (1, true)] {
        match StreamMessage::from_frame(&snapshot(flag)) {
            Ok(StreamMessage::Snapshot { from_disk: d, .. }) => assert_eq!(d, from_disk),
            other => panic!("{flag}: {other:?}"),
        }
    }
    for flag in [2, 0x80, 0xff] {
        assert!(
            matches!(
                StreamMessage::from_frame(&snapshot(flag)),
                Err(ProtocolError::Malformed {
                    what: "SNAPSHOT",
                    ..
                })
            ),
            "{flag}"
        );
    }
    let mut entry = StreamMessage::Noop.to_frame();
    for (datatype, ok) in [(0, true), (0x01, true), (0x02, false), (0x80, false)] {
        entry.datatype = datatype;
        assert_eq!(
            StreamMessage::from_frame(&entry).is_ok(),
            ok,
            "datatype {datatype:#x}"
        );
    }
}
