//! The network path: a tapkv node against Debian's memcached, the server a
//! user would otherwise put on the wire for this protocol.
//!
//! Both servers run as their own processes on 127.0.0.1 and are driven by
//! the same client code over the memcached binary protocol (SET with flags
//! and expiry extras, GET); the only difference on the wire is the HELLO a
//! tapkv connection starts with, and the partition id tapkv expects in the
//! vbucket field (memcached ignores it). Four connections, each on its own
//! client thread, write distinct keys and then read them back, once with
//! one request in flight per connection (request/response: latency-bound)
//! and once with 16 (pipelined: server-bound). The clients share the
//! machine's two cores with the server, the same for both.
//!
//! The tapkv node is this binary re-run as `network-node` (a node with
//! default settings on a temporary directory, Memory durability); memcached
//! runs as `memcached -l 127.0.0.1 -p PORT -U 0 -m 2048 -u nobody` (4
//! threads, its default). `make bench` installs memcached when it is missing;
//! without it this benchmark says so and is skipped.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tapkv_replication::io::FrameReader;
use tapkv_replication::message::{hello, opcode, status, store_extras};
use tapkv_replication::protocol::{Frame, DEFAULT_MAX_BODY};

use super::{key, print_rows, rate, value, Row};

/// Client connections (one thread each).
const CONNS: u64 = 4;
/// Operations of each phase, over all connections.
const OPS: u64 = 200_000;
/// Longest wait for a server to start, and for one reply.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Which server a client talks to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    /// A tapkv node with this many partitions.
    Tapkv(u16),
    Memcached,
}

/// A client connection.
struct Conn {
    reader: FrameReader,
    stream: TcpStream,
    server: Server,
}

/// One phase's requests of one connection, encoded before the clock starts
/// (so the clients spend their CPU on the wire, not on building frames).
struct Requests {
    bytes: Vec<u8>,
    /// Where each request starts; one more entry for the end.
    starts: Vec<usize>,
    /// Value length each GET must return (0 for SETs).
    value_lens: Vec<usize>,
}

impl Conn {
    fn open(addr: &str, server: Server) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
        let reader = FrameReader::new(s.try_clone().expect("clone"), DEFAULT_MAX_BODY);
        reader.set_timeout(TIMEOUT).expect("read timeout");
        let mut c = Conn {
            reader,
            stream: s,
            server,
        };
        if let Server::Tapkv(_) = server {
            c.stream
                .write_all(&hello("bench").to_bytes())
                .expect("hello");
            let r = c
                .reader
                .poll()
                .expect("read a reply")
                .expect("a reply within the timeout");
            assert_eq!(r.status(), status::SUCCESS, "HELLO refused");
        }
        c
    }

    fn vbucket(&self, k: &[u8]) -> u16 {
        match self.server {
            Server::Tapkv(partitions) => tapkv_engine::partition_of(k, partitions),
            Server::Memcached => 0,
        }
    }

    /// The requests for `keys`: SETs if `set`, else GETs.
    fn encode(&self, keys: std::ops::Range<u64>, set: bool) -> Requests {
        let mut buf = bytes::BytesMut::new();
        let mut starts = vec![0];
        let mut value_lens = Vec::new();
        for k in keys {
            let kb = key(k);
            let f = if set {
                value_lens.push(0);
                Frame::request(opcode::SET, self.vbucket(&kb))
                    .with_extras(store_extras(0, 0))
                    .with_key(kb)
                    .with_value(value(k))
            } else {
                value_lens.push(value(k).len());
                Frame::request(opcode::GET, self.vbucket(&kb)).with_key(kb)
            };
            f.encode(&mut buf);
            starts.push(buf.len());
        }
        Requests {
            bytes: buf.to_vec(),
            starts,
            value_lens,
        }
    }

    /// Sends `reqs` `depth` at a time, reading each group's replies before
    /// the next; checks every reply's status (and a GET's value length).
    fn run(&mut self, reqs: &Requests, depth: usize) {
        let n = reqs.value_lens.len();
        let mut i = 0;
        while i < n {
            let end = (i + depth).min(n);
            self.stream
                .write_all(&reqs.bytes[reqs.starts[i]..reqs.starts[end]])
                .expect("send");
            for want in &reqs.value_lens[i..end] {
                let (st, len) = self
                    .reader
                    .poll_map(|f| (f.vbucket_or_status, f.value.len()))
                    .expect("read a reply")
                    .expect("a reply within the timeout");
                assert_eq!(st, status::SUCCESS, "a request failed");
                assert_eq!(len, *want, "a GET's value length");
            }
            i = end;
        }
    }
}

/// Runs one phase on `CONNS` connections; ops/s.
fn phase(conns: &mut [Conn], base: u64, set: bool, depth: usize) -> f64 {
    let per = OPS / CONNS;
    let reqs: Vec<Requests> = (0u64..)
        .zip(conns.iter())
        .map(|(c, conn)| {
            let start = base + c * per;
            conn.encode(start..start + per, set)
        })
        .collect();
    let t = Instant::now();
    std::thread::scope(|s| {
        for (conn, reqs) in conns.iter_mut().zip(&reqs) {
            s.spawn(move || conn.run(reqs, depth));
        }
    });
    rate(per * CONNS, t.elapsed())
}

/// (set, get) ops/s at depth 1 and at depth 16, on `addr`.
fn measure(addr: &str, server: Server) -> [f64; 4] {
    let mut conns: Vec<Conn> = (0..CONNS).map(|_| Conn::open(addr, server)).collect();
    let set1 = phase(&mut conns, 0, true, 1);
    let get1 = phase(&mut conns, 0, false, 1);
    let set16 = phase(&mut conns, 10_000_000, true, 16);
    let get16 = phase(&mut conns, 10_000_000, false, 16);
    [set1, get1, set16, get16]
}

/// SET and GET ops/s with 1 in flight, then with 16.
type Rates = [f64; 4];

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until `addr` accepts connections.
fn wait_listening(addr: &str) {
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(t.elapsed() < TIMEOUT, "{addr} did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a server child, at the latest after a few seconds.
fn stop(mut child: Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Child: a tapkv node on a temporary directory; prints `addr A P` (its
/// address and partition count) and serves until its stdin closes.
pub(crate) fn node_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = tapkv_engine::Engine::builder(dir.path().join("node"))
        .open()
        .expect("open engine");
    let partitions = engine.num_partitions();
    let node =
        tapkv_replication::node::Node::start(engine, super::node_config()).expect("start node");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "addr {} {partitions}", node.local_addr()).expect("stdout");
        out.flush().expect("stdout");
    }
    // Serve until the parent closes stdin (or goes away).
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        line.clear();
    }
    node.shutdown().expect("node shutdown");
}

/// One measurement of a fresh tapkv node (a child process).
fn run_tapkv() -> [f64; 4] {
    let exe = std::env::current_exe().expect("current exe");
    let mut node = Command::new(exe)
        .arg("network-node")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the tapkv node");
    let mut line = String::new();
    BufReader::new(node.stdout.take().expect("node stdout"))
        .read_line(&mut line)
        .expect("node address");
    let words: Vec<&str> = line.split_whitespace().collect();
    let (addr, partitions) = match words[..] {
        ["addr", a, p] => (a.to_owned(), p.parse().expect("partitions")),
        _ => panic!("the node said {line:?}"),
    };
    let rates = measure(&addr, Server::Tapkv(partitions));
    drop(node.stdin.take());
    stop(node);
    rates
}

/// One measurement of a fresh memcached.
fn run_memcached() -> [f64; 4] {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mc = Command::new("memcached")
        .args([
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-m",
            "2048",
        ])
        // Needed when run as root; ignored otherwise.
        .args(["-u", "nobody"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn memcached");
    wait_listening(&addr);
    let rates = measure(&addr, Server::Memcached);
    stop(mc);
    rates
}

/// The benchmark; prints its table.
pub fn bench() {
    let has_memcached = Command::new("memcached")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_memcached {
        println!("\nnetwork: skipped (memcached not installed; `make bench` installs it)");
        return;
    }
    println!(
        "\nnetwork: {CONNS} connections, {OPS} SETs then {OPS} GETs per depth; \
         keys 16-24 bytes, values 100 bytes"
    );

    // Three rounds, each with a fresh server of each kind, which of the two
    // runs first alternating; each row is reported from the round whose
    // tapkv ÷ memcached ratio is its median, so both figures of a row come
    // from the same round.
    let rounds: Vec<(Rates, Rates)> = (0..3)
        .map(|r| {
            if r % 2 == 0 {
                let t = run_tapkv();
                (t, run_memcached())
            } else {
                let m = run_memcached();
                (run_tapkv(), m)
            }
        })
        .collect();
    for (r, (t, m)) in rounds.iter().enumerate() {
        println!(
            "  round {}: tapkv {:.0}/{:.0}/{:.0}/{:.0}, memcached {:.0}/{:.0}/{:.0}/{:.0} \
             (SET/GET 1 in flight, SET/GET 16)",
            r + 1,
            t[0],
            t[1],
            t[2],
            t[3],
            m[0],
            m[1],
            m[2],
            m[3]
        );
    }
    let pick = |i: usize| -> (f64, f64) {
        let mut idx: Vec<usize> = (0..rounds.len()).collect();
        idx.sort_by(|&a, &b| {
            let ratio = |r: &(Rates, Rates)| r.0[i] / r.1[i];
            ratio(&rounds[a]).total_cmp(&ratio(&rounds[b]))
        });
        let r = &rounds[idx[idx.len() / 2]];
        (r.0[i], r.1[i])
    };
    let (tapkv, memcached): (Vec<f64>, Vec<f64>) = (0..4).map(pick).unzip();

    let names = [
        "SET, 1 in flight per connection",
        "GET, 1 in flight per connection",
        "SET, 16 in flight per connection",
        "GET, 16 in flight per connection",
    ];
    let rows: Vec<Row> = names
        .iter()
        .zip(tapkv.iter().zip(&memcached))
        .map(|(name, (t, m))| Row {
            name: (*name).into(),
            tapkv: *t,
            other_name: "memcached 1.6 (Debian), same client".into(),
            other: *m,
            target: None,
        })
        .collect();
    print_rows("network path, loopback (ops/s)", &rows);
}
