//! Pipelined requests: a client may send many requests before reading; the
//! node answers every one, in order, including errors in the middle.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use tapkv_engine::{partition_of, Engine};
use tapkv_replication::io::FrameReader;
use tapkv_replication::message::{hello, opcode, status, store_extras};
use tapkv_replication::node::{Node, NodeConfig};
use tapkv_replication::protocol::{Frame, DEFAULT_MAX_BODY};

#[test]
fn pipelined_requests_are_all_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).open().unwrap();
    let parts = engine.num_partitions();
    let node = Node::start(engine, NodeConfig::new("127.0.0.1:0")).unwrap();
    let mut conn = TcpStream::connect(node.local_addr()).unwrap();
    let mut reader = FrameReader::new(conn.try_clone().unwrap(), DEFAULT_MAX_BODY);
    reader.set_timeout(Duration::from_secs(10)).unwrap();

    // HELLO, then 300 SETs, a GET of a missing key, and 300 GETs, all in
    // one write; the replies are read only afterwards.
    let mut wire = hello("pipeline").to_bytes().to_vec();
    let mut expect: Vec<(u32, u16)> = vec![(0, status::SUCCESS)];
    let key = |i: u32| format!("pipe-{i}").into_bytes();
    let mut opaque = 1;
    let mut push = |f: Frame, want: u16, wire: &mut Vec<u8>| {
        let mut f = f;
        f.opaque = opaque;
        expect.push((opaque, want));
        opaque += 1;
        wire.extend_from_slice(&f.to_bytes());
    };
    for i in 0..300 {
        let k = key(i);
        let f = Frame::request(opcode::SET, partition_of(&k, parts))
            .with_extras(store_extras(0, 0))
            .with_key(k)
            .with_value(vec![b'v'; 100]);
        push(f, status::SUCCESS, &mut wire);
    }
    let missing = b"pipe-missing".to_vec();
    let f = Frame::request(opcode::GET, partition_of(&missing, parts)).with_key(missing);
    push(f, status::KEY_NOT_FOUND, &mut wire);
    for i in 0..300 {
        let k = key(i);
        let f = Frame::request(opcode::GET, partition_of(&k, parts)).with_key(k);
        push(f, status::SUCCESS, &mut wire);
    }
    conn.write_all(&wire).unwrap();

    for (opaque, want) in expect {
        let r = reader.poll().unwrap().expect("a reply within the timeout");
        assert_eq!(r.opaque, opaque, "replies come in request order");
        assert_eq!(r.status(), want, "reply {opaque}");
        if want == status::SUCCESS && opaque > 302 {
            assert_eq!(r.value.len(), 100);
        }
    }
    common::shutdown(node);
}

#[test]
fn replies_do_not_wait_behind_a_durable_write() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path()).open().unwrap();
    let parts = engine.num_partitions();
    engine
        .set(b"there", b"v", tapkv_engine::WriteOptions::default())
        .unwrap();
    let node = Node::start(engine, NodeConfig::new("127.0.0.1:0")).unwrap();
    // With the flusher paused, a Persist write blocks until it resumes.
    node.engine().unwrap().set_flusher_paused(true);
    let mut conn = TcpStream::connect(node.local_addr()).unwrap();
    let mut reader = FrameReader::new(conn.try_clone().unwrap(), DEFAULT_MAX_BODY);
    reader.set_timeout(Duration::from_secs(10)).unwrap();

    let mut wire = hello("pipeline").to_bytes().to_vec();
    let mut get =
        Frame::request(opcode::GET, partition_of(b"there", parts)).with_key(&b"there"[..]);
    get.opaque = 1;
    wire.extend_from_slice(&get.to_bytes());
    let mut durable = Frame::request(opcode::SET, partition_of(b"durable", parts))
        .with_extras(store_extras(0, 0))
        .with_key(&b"durable"[..])
        .with_value(&b"d"[..]);
    durable.datatype |=
        tapkv_replication::message::durability_bits(tapkv_engine::Durability::Persist);
    durable.opaque = 2;
    wire.extend_from_slice(&durable.to_bytes());
    conn.write_all(&wire).unwrap();

    // HELLO's and GET's replies arrive while the Persist write still waits.
    let hello_reply = reader.poll().unwrap().expect("HELLO reply");
    assert_eq!(hello_reply.status(), status::SUCCESS);
    let get_reply = reader
        .poll()
        .unwrap()
        .expect("the GET's reply, sent before the durable write blocks");
    assert_eq!((get_reply.opaque, get_reply.status()), (1, status::SUCCESS));
    assert_eq!(&get_reply.value[..], b"v");

    node.engine().unwrap().set_flusher_paused(false);
    let set_reply = reader.poll().unwrap().expect("the Persist write's reply");
    assert_eq!((set_reply.opaque, set_reply.status()), (2, status::SUCCESS));
    common::shutdown(node);
}
