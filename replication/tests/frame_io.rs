//! `FrameReader::caught_up`: what a replica's acknowledgement policy relies on.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use tapkv_replication::io::{FrameReader, FrameWriter};
use tapkv_replication::protocol::{frame_len, Frame, DEFAULT_MAX_BODY, HEADER_LEN};

fn pair() -> (TcpStream, FrameReader) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let server = common::accept_within(&listener, std::time::Duration::from_secs(10));
    let reader = FrameReader::new(server, DEFAULT_MAX_BODY);
    reader
        .set_timeout(Duration::from_secs(5))
        .expect("read timeout");
    (client, reader)
}

#[test]
fn frame_len_reads_the_header_body_length() {
    let f = Frame::request(0x01, 3)
        .with_key(&b"key"[..])
        .with_value(&b"value"[..]);
    let bytes = f.to_bytes();
    assert_eq!(frame_len(&bytes), Some(bytes.len()));
    assert_eq!(frame_len(&bytes[..HEADER_LEN]), Some(bytes.len()));
    assert_eq!(frame_len(&bytes[..11]), None);
}

#[test]
fn caught_up_only_once_every_received_frame_is_handed_out() {
    let (mut client, mut reader) = pair();
    assert!(!reader.caught_up(), "nothing read yet");
    let f = Frame::request(0x0a, 0).with_value(vec![7u8; 100]);
    let mut burst = Vec::new();
    for _ in 0..3 {
        burst.extend_from_slice(&f.to_bytes());
    }
    client.write_all(&burst).expect("write");
    // The first poll reads the whole (short) burst: two whole frames remain
    // buffered, so the reader is not caught up until they are handed out.
    assert!(reader.poll().expect("poll").is_some());
    assert!(!reader.caught_up());
    assert!(reader.poll().expect("poll").is_some());
    assert!(!reader.caught_up());
    assert!(reader.poll().expect("poll").is_some());
    assert!(reader.caught_up());
    // Half a frame buffered: caught up (nothing whole is waiting).
    let bytes = f.to_bytes();
    client.write_all(&bytes[..30]).expect("write");
    reader
        .set_timeout(Duration::from_millis(50))
        .expect("timeout");
    let mut polls = 0;
    while reader.poll().expect("poll").is_none() {
        polls += 1;
        assert!(polls < 100, "the half frame never arrived");
        if reader.caught_up() {
            break;
        }
    }
    assert!(reader.caught_up());
    client.write_all(&bytes[30..]).expect("write");
    reader.set_timeout(Duration::from_secs(5)).expect("timeout");
    assert!(reader.poll().expect("poll").is_some());
    assert!(reader.caught_up());
}

#[test]
fn a_writer_whose_flush_failed_sends_nothing_more() {
    // The peer holds part of a frame after a failed flush: sending again
    // (before, from the start of the old buffer) would garble the stream.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let mut server = common::accept_within(&listener, Duration::from_secs(10));
    // 32 MiB must not fit in the buffers between the two, whatever the
    // host's settings.
    common::small_socket_buffers(&client);
    common::small_socket_buffers(&server);
    client
        .set_write_timeout(Some(Duration::from_millis(50)))
        .expect("write timeout");
    let mut writer = FrameWriter::new(client);
    let big = Frame::request(0x0a, 0).with_value(vec![7u8; 1 << 20]);
    for _ in 0..32 {
        writer.push(&big);
    }
    assert!(writer.flush().is_err(), "32 MiB fit in the socket buffers");
    assert_eq!(writer.pending(), 0);
    // The peer reads again; the writer still refuses to send.
    let drain = std::thread::spawn(move || {
        server
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("read timeout");
        let mut sink = vec![0u8; 1 << 16];
        let mut received = Vec::new();
        while let Ok(n) = std::io::Read::read(&mut server, &mut sink) {
            if n == 0 {
                break;
            }
            received.extend_from_slice(&sink[..n]);
        }
        received
    });
    let small = Frame::request(0x0a, 0).with_value(&b"sent-after-the-failure"[..]);
    assert!(writer.send(&small).is_err());
    drop(writer);
    let received = drain.join().expect("drain");
    assert!(received.len() < 32 * big.to_bytes().len());
    assert!(
        !received
            .windows(b"sent-after-the-failure".len())
            .any(|w| w == b"sent-after-the-failure"),
        "a frame was sent after the failed flush"
    );
}

#[test]
fn the_frame_deadline_counts_only_time_spent_waiting_for_the_frame() {
    // A reader busy elsewhere between polls (a replica applying a large
    // snapshot, a connection thread waiting on a durable write) is not the
    // peer being slow: before, the first poll after such a pause found the
    // partial frame older than the deadline and cut the connection.
    let (mut client, mut reader) = pair();
    reader
        .set_timeout(Duration::from_millis(50))
        .expect("read timeout");
    reader.set_frame_deadline(Some(Duration::from_secs(1)));
    let bytes = Frame::request(0x01, 0)
        .with_key(&b"key"[..])
        .with_value(vec![b'v'; 1000])
        .to_bytes();
    client.write_all(&bytes[..100]).expect("write");
    assert!(reader.poll().expect("partial frame").is_none());
    // Busy elsewhere for longer than the deadline (which leaves the polls
    // around the pause most of a second of scheduling slack).
    std::thread::sleep(Duration::from_millis(1500));
    client.write_all(&bytes[100..]).expect("write");
    let mut got = None;
    for _ in 0..100 {
        got = reader.poll().expect("the rest arrives within the deadline");
        if got.is_some() {
            break;
        }
    }
    assert_eq!(got.expect("the whole frame").value.len(), 1000);
    // A peer that does stall mid-frame while the reader waits is still
    // cut off.
    client.write_all(&bytes[..100]).expect("write");
    let stalled = (0..100).find_map(|_| reader.poll().err());
    assert!(stalled.is_some(), "a stalled frame was never cut off");
}

#[test]
fn a_flush_to_a_peer_taking_a_trickle_fails_by_its_progress_deadline() {
    // The peer takes about 20 KiB/s of a 4 MiB frame. Each write still
    // moves some bytes within the 2 s write timeout, so before, a flush
    // (a node's reply, its thread, and the node's stop) went on for as
    // long as the peer kept reading; now it must move 64 KiB per second.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let server = common::accept_within(&listener, Duration::from_secs(10));
    common::small_socket_buffers(&client);
    common::small_socket_buffers(&server);
    server
        .set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reading = std::sync::Arc::clone(&stop);
    let mut peer = client;
    let trickle = std::thread::spawn(move || {
        use std::io::Read;
        peer.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 1024];
        while std::time::Instant::now() < give_up
            && !reading.load(std::sync::atomic::Ordering::Relaxed)
        {
            if matches!(peer.read(&mut buf), Ok(0)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut writer = FrameWriter::new(server);
    writer.set_progress_deadline(Some(Duration::from_secs(1)));
    let r = writer.send(&Frame::request(0x00, 0).with_value(vec![7u8; 4 << 20]));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickle.join().expect("trickle");
    let e = r.expect_err("a 4 MiB frame went through at 20 KiB/s");
    assert!(
        e.to_string()
            .contains("took less than 65536 bytes of a reply per"),
        "{e}"
    );
}
