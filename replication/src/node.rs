//! A tapkv node: one engine behind a TCP listener.
//!
//! Threads, not async: the engine is synchronous, connections are few (clients,
//! a handful of replicas), and a thread per connection keeps every wait a plain
//! blocking call with a timeout. Per connection:
//! - a client connection thread answers data, online-update and admin requests;
//! - a `STREAM_OPEN` turns the connection into a replication stream: its thread
//!   sends the partitions' changes (backfill from disk first when needed) and
//!   an ack-reader thread receives the replica's acknowledgements.
//!
//! A replica node also runs one link thread that connects to its primary,
//! opens a stream with each partition's (branch uuid, seqno), applies what it
//! receives and acknowledges it, and reconnects after errors. See
//! `docs/replication.md` for the rules.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use tapkv_engine::{
    ApplyOutcome, Engine, Error, EventRef, PartitionId, SnapshotBuffer, WriteOptions,
};

use crate::io::{FrameReader, FrameWriter};
use crate::message::{
    self, hello, hello_version, opcode, parse_store_extras, parse_stream_open, status, Ack,
    StreamMessage, StreamRequest, PROTOCOL_VERSION,
};
use crate::protocol::{Frame, ProtocolError, DEFAULT_MAX_BODY};
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Condvar, Counted, Mutex, Ordering};

/// Settings of a node, each with its default.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address to listen on, e.g. `127.0.0.1:11311` (port 0 picks one).
    pub listen: String,
    /// Name of this node (logs, stream names).
    pub name: String,
    /// Address of the primary, for a replica.
    pub replica_of: Option<String>,
    /// Largest accepted frame body (default 21 MiB).
    pub max_body: usize,
    /// Timeout of every socket write, and of waiting for a reply (default
    /// 10 s, at most a day).
    pub io_timeout: Duration,
    /// A client connection idle this long is closed (default 300 s, at most
    /// a day).
    pub idle_timeout: Duration,
    /// A stream sends a NOOP after this much silence (default 1 s, at most
    /// an hour); a replica that hears nothing for 10 heartbeats reconnects.
    pub heartbeat: Duration,
    /// Unacknowledged bytes allowed per stream (default 4 MiB).
    pub max_unacked_bytes: u64,
    /// A stream stuck at its unacknowledged limit this long, with no ack at
    /// all meanwhile, drops its cursors (freeing the checkpoints they pin)
    /// and backfills later (default 3 s, at most a day).
    pub slow_replica_timeout: Duration,
    /// Items read per partition per stream round (default 512).
    pub stream_batch: usize,
    /// After a round that sent less than [`LINGER_BELOW`] bytes, a stream
    /// waits this long before reading the checkpoints again, so a primary
    /// under steady writes sends fewer, larger bursts instead of waking for
    /// every few items (default 1 ms; zero turns it off; at most
    /// [`MAX_LINGER`]). Skipped while a `Replicate` write waits for
    /// acknowledgements; a stream that found nothing new sleeps on the
    /// engine's change feed instead and sends the next write at once.
    pub stream_linger: Duration,
    /// A replica acknowledges after applying this many bytes of the stream
    /// (default 512 KiB; keep it well under the primary's
    /// `max_unacked_bytes`), and at once whenever it has applied everything
    /// the connection held or reads a `NOOP` (which the primary sends while
    /// a `Replicate` write waits).
    pub ack_bytes: u64,
    /// As a primary: the replicas a `Replicate` write is measured against
    /// while fewer can acknowledge it (default 1). A write needs
    /// acknowledgements from a majority of `max(min_replicas, streams that
    /// can acknowledge it)` — those streaming its partition from memory, or
    /// that already did; not one still in its disk snapshot — so with the
    /// default it is never acknowledged with no replica holding it; 0
    /// acknowledges it at once when no replica can acknowledge it (none
    /// connected, or all still joining).
    pub min_replicas: usize,
    /// Connections served at once (clients and replication streams; each
    /// has a thread). One more is answered `TEMP_FAILURE` ("too many
    /// connections") and closed. Default 1024.
    pub max_connections: usize,
    /// Replica: roll back partitions of a directory that held a primary's
    /// data (`Engine::holds_primary_data`) when the primary's history
    /// differs, replacing that data. Default false: such a rollback is
    /// refused and reported as the link's error.
    pub replace_primary_data: bool,
    /// Bytes that partly received frames larger than 1 MiB may hold across
    /// all connections together (`io::ByteBudget`); a large frame past it
    /// is answered `TEMP_FAILURE` and its connection closed. Default
    /// 256 MiB; at least `max_body` and a header, or a frame of that size
    /// could never be taken.
    pub max_pending_body_bytes: usize,
    /// Bytes that replies larger than 1 MiB (a GET of a large value) may
    /// hold across all connections together while their clients read them
    /// (`io::ByteBudget`); a reply past it is answered `TEMP_FAILURE`
    /// instead, and the connection kept. Default 256 MiB; at least
    /// `max_body` and a header.
    pub max_pending_reply_bytes: usize,
    /// `ADMIN dump`s running at once: each reads its own point-in-time
    /// copy of the store (`Engine::disk_view`), which costs memory (tens of
    /// MB on a large node) for as long as its client takes to read it. One
    /// more is answered `TEMP_FAILURE` ("busy"). Default 4.
    pub max_dumps: usize,
    /// Test hook: called by a stream before it starts each partition from
    /// memory, at its start and when it starts one again after the flusher
    /// dropped its cursor (`None`: nothing).
    #[doc(hidden)]
    pub before_partition_start: Option<PartitionStartHook>,
    /// Test hook: asked before each connection thread's spawn; `true`
    /// fails the spawn as if the process were out of threads (`None`:
    /// never).
    #[doc(hidden)]
    pub fail_connection_spawn: Option<SpawnFailureHook>,
}

/// A function asked before each connection thread's spawn
/// ([`NodeConfig::fail_connection_spawn`]).
#[doc(hidden)]
#[derive(Clone)]
pub struct SpawnFailureHook(pub std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for SpawnFailureHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpawnFailureHook")
    }
}

/// A function a stream calls with each partition's number before starting
/// it from memory ([`NodeConfig::before_partition_start`]).
#[doc(hidden)]
#[derive(Clone)]
pub struct PartitionStartHook(pub std::sync::Arc<dyn Fn(PartitionId) + Send + Sync>);

impl std::fmt::Debug for PartitionStartHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PartitionStartHook")
    }
}

/// The largest body a connection's first frame may have: a HELLO's (its
/// 4-byte version and a name of at most 65,535 bytes).
const HELLO_MAX_BODY: usize = 4 + u16::MAX as usize;

/// Rounds smaller than this are followed by the stream's linger.
pub const LINGER_BELOW: usize = 256 * 1024;

/// The longest linger used, whatever `stream_linger` says: a `Replicate`
/// write that starts waiting during a linger, and a shutdown, wait at most
/// this long for it.
pub const MAX_LINGER: Duration = Duration::from_millis(10);

impl NodeConfig {
    /// Defaults, listening on `listen`.
    pub fn new(listen: impl Into<String>) -> NodeConfig {
        NodeConfig {
            listen: listen.into(),
            name: "tapkv".into(),
            replica_of: None,
            max_body: DEFAULT_MAX_BODY,
            io_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            heartbeat: Duration::from_secs(1),
            max_unacked_bytes: 4 << 20,
            slow_replica_timeout: Duration::from_secs(3),
            stream_batch: 512,
            stream_linger: Duration::from_millis(1),
            ack_bytes: 512 * 1024,
            min_replicas: 1,
            max_connections: 1024,
            replace_primary_data: false,
            max_pending_body_bytes: 256 << 20,
            max_pending_reply_bytes: 256 << 20,
            max_dumps: 4,
            before_partition_start: None,
            fail_connection_spawn: None,
        }
    }

    /// Refuses settings a node cannot run with (the `tapkv node` flags
    /// refuse them too): a zero `max_unacked_bytes`, for one, left a stream
    /// waiting for acknowledgements of nothing, spinning without sending.
    pub fn validate(&self) -> Result<(), String> {
        let positive: [(&str, bool); 12] = [
            ("max_body", self.max_body > 0),
            ("io_timeout", !self.io_timeout.is_zero()),
            ("idle_timeout", !self.idle_timeout.is_zero()),
            ("heartbeat", !self.heartbeat.is_zero()),
            ("max_unacked_bytes", self.max_unacked_bytes > 0),
            ("slow_replica_timeout", !self.slow_replica_timeout.is_zero()),
            ("stream_batch", self.stream_batch > 0),
            ("ack_bytes", self.ack_bytes > 0),
            ("max_connections", self.max_connections > 0),
            ("max_pending_body_bytes", self.max_pending_body_bytes > 0),
            ("max_pending_reply_bytes", self.max_pending_reply_bytes > 0),
            ("max_dumps", self.max_dumps > 0),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, ok)| !ok) {
            return Err(format!("node setting {name} must be more than zero"));
        }
        // As `tapkv node --max-body` bounds it: a replica reads stream
        // frames of up to `MAX_FRAME_BODY`, and the readers add a header's
        // length to it (`usize::MAX` overflowed there).
        if self.max_body > MAX_NODE_BODY {
            return Err(format!(
                "node setting max_body must be at most {MAX_NODE_BODY} bytes, got {}",
                self.max_body
            ));
        }
        // A budget smaller than the largest frame refused every frame
        // between the two as "busy, try again later", on an idle node too,
        // and for good (found by a review).
        let largest = self.max_body + crate::protocol::HEADER_LEN;
        for (name, flag, budget) in [
            (
                "max_pending_body_bytes",
                "--max-pending-body-bytes",
                self.max_pending_body_bytes,
            ),
            (
                "max_pending_reply_bytes",
                "--max-pending-reply-bytes",
                self.max_pending_reply_bytes,
            ),
        ] {
            if budget < largest {
                return Err(format!(
                    "node setting {name} ({flag}, {budget} bytes) is below the largest frame \
                     max_body allows ({largest} bytes with its header): frames between the two \
                     would be refused as busy forever; raise it with --max-body"
                ));
            }
        }
        // As the `tapkv node` flags bound them: a node multiplies them and
        // adds them to the clock, which a `Duration::MAX` (meant as
        // "never") overflowed, panicking the thread (a replica's link died
        // silently, found by a review).
        let bounded: [(&str, Duration, Duration); 4] = [
            ("heartbeat", self.heartbeat, MAX_HEARTBEAT),
            ("io_timeout", self.io_timeout, MAX_TIMEOUT),
            ("idle_timeout", self.idle_timeout, MAX_TIMEOUT),
            (
                "slow_replica_timeout",
                self.slow_replica_timeout,
                MAX_TIMEOUT,
            ),
        ];
        if let Some((name, d, max)) = bounded.iter().find(|(_, d, max)| d > max) {
            return Err(format!(
                "node setting {name} must be at most {max:?}, got {d:?}"
            ));
        }
        // A replica opens its stream under its name: one its primary would
        // refuse would keep the link failing.
        check_stream_name(self.name.as_bytes()).map_err(|e| format!("node name: {e}"))
    }
}

/// The largest `max_body` a node takes (1 GiB less 64 KiB, as `tapkv node
/// --max-body` bounds it): a stream frame carrying the largest value it
/// lets in stays under the `MAX_FRAME_BODY` a replica reads.
pub const MAX_NODE_BODY: usize = crate::protocol::MAX_FRAME_BODY - (64 << 10);

/// The longest `heartbeat` a node takes (an hour; `NodeConfig::validate`).
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// The longest `io_timeout`, `idle_timeout` and `slow_replica_timeout` a
/// node takes (a day; `NodeConfig::validate`): a node adds them to the
/// clock, and nobody means a longer one.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Longest stream (and node) name, in bytes.
pub const MAX_STREAM_NAME: usize = 255;

/// Refuses a stream name a node does not take: empty, longer than
/// [`MAX_STREAM_NAME`] bytes, not UTF-8, or holding a control character
/// (it appears in logs, `admin streams` and cursor names; before, a NUL in
/// it panicked the connection's thread and left the stream registered).
pub fn check_stream_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_STREAM_NAME {
        return Err(format!(
            "the name is {} bytes long; at most {MAX_STREAM_NAME} are allowed",
            name.len()
        ));
    }
    let text = std::str::from_utf8(name).map_err(|_| "the name is not UTF-8".to_string())?;
    if text.chars().any(char::is_control) {
        return Err("the name holds a control character".into());
    }
    Ok(())
}

/// State of one partition of a stream, as reported by `admin streams`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionStreamState {
    /// Sending a disk snapshot.
    Backfilling,
    /// Sending from the in-memory cursor.
    InMemory,
    /// Cursor dropped as a slow replica's (flow control); the stream ends
    /// once the replica reads again, and it resumes with a backfill.
    Dropped,
    /// The replica was told to roll back; it will reconnect.
    RolledBack,
}

/// A replication stream served by this node.
#[derive(Debug, Serialize)]
pub struct StreamInfo {
    /// Stream name (the replica's name).
    pub name: String,
    /// Peer address.
    pub peer: String,
    /// Bytes sent and not yet acknowledged.
    pub unacked_bytes: u64,
    /// Milliseconds since the last ack.
    pub last_ack_ms: u64,
    /// ACKs that acknowledged bytes or seqnos the stream never sent, or a
    /// partition it does not serve (each counted only up to what was sent;
    /// a healthy replica has none).
    pub acks_ahead: u64,
    /// Partitions started again within the stream (from disk, for what
    /// memory no longer held) after the flusher dropped their cursors
    /// under checkpoint-memory pressure.
    pub restarts: u64,
    /// Per partition: state, seqno sent, seqno acked, items behind.
    pub partitions: Vec<StreamPartitionInfo>,
}

/// One partition of a stream.
#[derive(Debug, Clone, Serialize)]
pub struct StreamPartitionInfo {
    /// Partition.
    pub partition: PartitionId,
    /// State.
    pub state: PartitionStreamState,
    /// Last seqno sent.
    pub sent_seqno: u64,
    /// Last seqno the replica acknowledged.
    pub acked_seqno: u64,
    /// Items the cursor has still to send.
    pub lag_items: usize,
    /// Checkpoint memory of those items (key, value and per-entry
    /// overhead): about the bytes still to send.
    pub lag_bytes: usize,
    /// Seqno the stream (re)started this partition from.
    pub resumed_from: u64,
}

struct StreamShared {
    name: String,
    peer: String,
    cursor: String,
    unacked: AtomicU64,
    last_ack: Mutex<Instant>,
    /// ACKs that acknowledged ahead of what was sent (see `ack_reader`).
    acks_ahead: AtomicU64,
    acked: Mutex<HashMap<PartitionId, u64>>,
    parts: Mutex<HashMap<PartitionId, (PartitionStreamState, u64)>>,
    /// Disk snapshots sent, `(after, end, progress)` per partition, until
    /// the replica acknowledges their end: it applies one in seqno order,
    /// but a snapshot holds each key's latest version only, so its progress
    /// through one (an ACK inside the range, the highest so far in
    /// `progress`) does not mean it holds every write up to there, and
    /// counts for liveness only (`ack_reader`).
    snapshots: Mutex<PendingSnapshots>,
    resumed_from: Mutex<HashMap<PartitionId, u64>>,
    /// Partitions started again after the flusher dropped their cursors
    /// under memory pressure.
    restarts: AtomicU64,
    /// A partition is being started again: nothing is sent from memory
    /// meanwhile, so the stream counts for no `Replicate` write.
    restarting: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    node_acks: Arc<AckSignal>,
}

impl StreamShared {
    /// Tells the stream's threads to stop. The notify is sent under the
    /// wait's lock, so a thread that has just checked `stop` and is about
    /// to wait cannot miss it.
    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _g = self.lock.lock();
        self.cv.notify_all();
    }
}

type Streams = Arc<Mutex<HashMap<String, Arc<StreamShared>>>>;

/// Wakes `Replicate` writers when any replica acknowledges something.
#[derive(Default)]
struct AckSignal {
    lock: Mutex<()>,
    cv: Condvar,
    /// `Replicate` writes waiting for acknowledgements (streams do not
    /// linger while any does).
    waiting: AtomicUsize,
    /// The node is stopping: waiting writes stop waiting (they would hold
    /// the stop for up to `--replicate-timeout-ms`).
    closing: AtomicBool,
}

/// `Durability::Replicate`: waits until a majority of the replicas'
/// streams acknowledged the seqno, counted over the streams that can
/// acknowledge it (those streaming the partition from memory, and any that
/// already did) and never fewer than `min_replicas`. A stream still
/// backfilling the partition, dropped, or rolled back is not counted: a
/// replica joining a large primary would otherwise make every `Replicate`
/// write time out for its whole backfill.
struct AckGate {
    streams: Streams,
    acks: Arc<AckSignal>,
    min_replicas: usize,
}

/// Acknowledgements a `Replicate` write needs: a majority of the larger of
/// `connected` and `min_replicas` (none if both are 0).
fn replicate_quorum(connected: usize, min_replicas: usize) -> usize {
    let n = connected.max(min_replicas);
    n / 2 + usize::from(n > 0)
}

impl tapkv_engine::ReplicationGate for AckGate {
    fn wait_replicated(
        &self,
        engine: &Engine,
        p: PartitionId,
        seqno: u64,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let _waiting = Counted::new(&self.acks.waiting);
        let mut g = self.acks.lock.lock();
        loop {
            let (connected, acked) = {
                let streams = self.streams.lock();
                let (mut connected, mut acked) = (0, 0);
                for s in streams.values().filter(|s| !s.stop.load(Ordering::Acquire)) {
                    let has_acked = s.acked.lock().get(&p).is_some_and(|a| *a >= seqno);
                    // A stream waiting on its flow-control limit reads no
                    // cursor and so has not yet seen that the flusher
                    // dropped its cursor under memory pressure: it will
                    // never be sent the write, so it does not count. (The
                    // cursor is looked up only for a stream that has not
                    // acknowledged the write: it takes the partition's lock.)
                    // Nor does one whose last disk snapshot of the partition
                    // is sent but not yet acknowledged to its end: the
                    // replica applies a snapshot only once it has it whole,
                    // and acknowledges nothing above its start until then
                    // (the stream is marked in memory as soon as the
                    // snapshot is queued).
                    let streaming = || {
                        !s.restarting.load(Ordering::Acquire)
                            && s.parts
                                .lock()
                                .get(&p)
                                .is_some_and(|(state, _)| *state == PartitionStreamState::InMemory)
                            && !s.snapshots.lock().contains_key(&p)
                            && engine.has_cursor(p, &s.cursor).unwrap_or(false)
                    };
                    acked += usize::from(has_acked);
                    connected += usize::from(has_acked || streaming());
                }
                (connected, acked)
            };
            if acked >= replicate_quorum(connected, self.min_replicas) {
                return Ok(());
            }
            if self.acks.closing.load(Ordering::Acquire) {
                return Err(Error::WrongState(
                    "the node is stopping before a majority of replicas acknowledged the \
                     write; the write itself is applied and not undone"
                        .into(),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: "a majority of replicas (of those streaming the partition from memory, \
                           and of --replicas) to acknowledge the write; the write itself is \
                           applied and not undone",
                    millis: timeout.as_millis() as u64,
                });
            }
            self.acks
                .cv
                .wait_for(&mut g, (deadline - now).min(Duration::from_millis(100)));
        }
    }
}

struct NodeState {
    engine: Arc<Engine>,
    config: NodeConfig,
    replica: bool,
    stop: AtomicBool,
    streams: Streams,
    acks: Arc<AckSignal>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Connections accepted and given a thread since the node started
    /// (each one's id; `stat`'s `total_connections`).
    connections: AtomicU64,
    /// A replica's last replication-link error, until a stream opens again
    /// (reported by `stat` as `link_error`).
    link_error: Mutex<Option<String>>,
    /// A replica's replication streams opened so far (reported by `stat`
    /// as `link_sessions`).
    link_sessions: AtomicU64,
    /// Replica: partitions to reset before the next stream opens (they held
    /// a window the primary could only backfill; see `replica_session`).
    resync_next: Mutex<Vec<PartitionId>>,
    /// What partly received large frames hold, all connections together.
    body_budget: Arc<crate::io::ByteBudget>,
    /// What large replies waiting for their clients hold, all connections.
    reply_budget: Arc<crate::io::ByteBudget>,
    /// Connections being served (each on its own thread).
    live_connections: AtomicUsize,
    /// Connections refused past `max_connections` since the node started
    /// (`stat`'s `rejected_connections`).
    rejected_connections: AtomicU64,
    /// `ADMIN dump`s running (`NodeConfig::max_dumps`).
    dumps: AtomicUsize,
}

/// A running node. Dropping it (or [`Node::shutdown`]) stops it gracefully:
/// streams close, the engine flushes and closes.
pub struct Node {
    state: Option<Arc<NodeState>>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

fn engine_status(e: &Error) -> u16 {
    match e {
        Error::NotFound => status::KEY_NOT_FOUND,
        Error::Exists | Error::CasMismatch { .. } => status::KEY_EXISTS,
        Error::ValueTooLarge { .. } => status::VALUE_TOO_LARGE,
        Error::KeyTooLarge { .. } | Error::InvalidArgument(_) | Error::NoSuchPartition { .. } => {
            status::INVALID_ARGUMENTS
        }
        Error::TempOutOfMemory { .. } => status::TEMP_FAILURE,
        Error::OnlineUpdateOpen { .. } | Error::NoOnlineUpdate { .. } | Error::WrongState(_) => {
            status::WRONG_STATE
        }
        Error::Timeout { .. } => status::TIMEOUT,
        _ => status::INTERNAL,
    }
}

fn error_response(req: &Frame, e: &Error) -> Frame {
    Frame::response(req, engine_status(e))
        .with_value(format!("{}: {}", e.kind(), e.detail()).into_bytes())
}

/// An error response the node itself makes: `<kind>: <message>`, as every
/// error response (see `status::kind`).
fn status_response(req: &Frame, st: u16, msg: &str) -> Frame {
    Frame::response(req, st).with_value(format!("{}: {msg}", status::kind(st)).into_bytes())
}

fn u64s(vals: &[u64]) -> Bytes {
    let mut b = BytesMut::with_capacity(vals.len() * 8);
    for v in vals {
        b.put_u64(*v);
    }
    b.freeze()
}

fn json_response(req: &Frame, v: &impl Serialize) -> Frame {
    let mut f =
        Frame::response(req, status::SUCCESS).with_value(serde_json::to_vec(v).unwrap_or_default());
    f.datatype = 1;
    f
}

impl Node {
    /// Starts a node serving `engine` (which it owns from now on).
    pub fn start(engine: Engine, config: NodeConfig) -> std::io::Result<Node> {
        config
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // The engine's role decides what it does on its own (a primary's
        // expiry pass, local writes); the node's decides what it serves.
        // A replica node over a primary's engine would expire items itself,
        // taking seqnos its primary then sends, and drop those writes.
        let engine_replica = engine
            .config()
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .replica;
        if engine_replica != config.replica_of.is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                if engine_replica {
                    "the engine was opened as a replica (EngineBuilder::replica) but the node \
                     has no replica_of"
                } else {
                    "the node is a replica (replica_of) but its engine was not opened as one \
                     (EngineBuilder::replica(true))"
                },
            ));
        }
        let listener = TcpListener::bind(&config.listen)?;
        let addr = listener.local_addr()?;
        let replica = config.replica_of.is_some();
        let body_budget = crate::io::ByteBudget::new(config.max_pending_body_bytes);
        let reply_budget = crate::io::ByteBudget::new(config.max_pending_reply_bytes);
        let state = Arc::new(NodeState {
            engine: Arc::new(engine),
            config,
            replica,
            stop: AtomicBool::new(false),
            streams: Arc::new(Mutex::new(HashMap::new())),
            acks: Arc::new(AckSignal::default()),
            threads: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            link_error: Mutex::new(None),
            link_sessions: AtomicU64::new(0),
            resync_next: Mutex::new(Vec::new()),
            body_budget,
            reply_budget,
            live_connections: AtomicUsize::new(0),
            rejected_connections: AtomicU64::new(0),
            dumps: AtomicUsize::new(0),
        });
        if !replica {
            state
                .engine
                .set_replication_gate(std::sync::Arc::new(AckGate {
                    streams: Arc::clone(&state.streams),
                    acks: Arc::clone(&state.acks),
                    min_replicas: state.config.min_replicas,
                }));
        }
        if let Some(primary) = state.config.replica_of.clone() {
            let st = Arc::clone(&state);
            let h = std::thread::Builder::new()
                .name("tapkv-replica-link".into())
                .spawn(move || replica_link(&st, &primary))?;
            state.threads.lock().push(h);
        }
        let st = Arc::clone(&state);
        let accept = std::thread::Builder::new()
            .name("tapkv-accept".into())
            .spawn(move || accept_loop(&st, listener))?;
        let role = if replica { "replica" } else { "primary" };
        tracing::info!(%addr, role, "node listening");
        Ok(Node {
            state: Some(state),
            addr,
            accept: Some(accept),
        })
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's engine.
    pub fn engine(&self) -> Option<&Engine> {
        self.state.as_deref().map(|s| &*s.engine)
    }

    /// Stops accepting, ends streams and connections, and closes the engine
    /// (flushing everything).
    pub fn shutdown(mut self) -> Result<(), Error> {
        let Some(state) = self.stop_threads() else {
            return Ok(());
        };
        let engine = Arc::try_unwrap(state)
            .map_err(|_| Error::WrongState("node state still shared at shutdown".into()))?
            .engine;
        Arc::try_unwrap(engine)
            .map_err(|_| Error::WrongState("engine still shared at shutdown".into()))?
            .close()
    }

    fn stop_threads(&mut self) -> Option<Arc<NodeState>> {
        let state = self.state.take()?;
        state.stop.store(true, Ordering::Release);
        for s in state.streams.lock().values() {
            s.stop();
        }
        {
            // `Replicate` writes waiting for acknowledgements end now.
            state.acks.closing.store(true, Ordering::Release);
            let _g = state.acks.lock.lock();
            state.acks.cv.notify_all();
        }
        // Wake the accept loop, until it has ended: one connect can fail
        // (a process out of descriptors, which the stopping connections
        // free within a poll) and leave it in `accept` for good (found by
        // a review).
        if let Some(h) = self.accept.take() {
            while !h.is_finished() {
                let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
                if !h.is_finished() {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = h.join();
        }
        let threads: Vec<_> = state.threads.lock().drain(..).collect();
        for h in threads {
            let _ = h.join();
        }
        tracing::info!(addr = %self.addr, "node stopped");
        Some(state)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.stop_threads());
    }
}

/// How long the accept thread reads a refused connection's first bytes
/// before closing it (so the close does not reset the answer away); a
/// flood of connections past the limit is refused at up to 100 a second.
const REFUSAL_READ: Duration = Duration::from_millis(10);

/// Answers a connection the node does not serve with `TEMP_FAILURE` (the
/// answer to the HELLO it opens with, opaque 0, bounded by a 1 s write
/// timeout) and closes it, without a thread.
fn refuse_connection(mut conn: TcpStream, why: &str) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let refusal = status_response(&Frame::request(opcode::HELLO, 0), status::TEMP_FAILURE, why);
    let _ = std::io::Write::write_all(&mut conn, &refusal.to_bytes());
    // Read what the peer sent (its HELLO) before closing, briefly: closing
    // with unread input resets the connection, and a reset can discard the
    // answer before the peer reads it.
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(REFUSAL_READ));
    let _ = std::io::Read::read(&mut conn, &mut [0u8; 4096]);
}

/// Whether the test hook `fail_connection_spawn` fails this spawn.
fn take_test_spawn_failure(state: &NodeState) -> bool {
    state
        .config
        .fail_connection_spawn
        .as_ref()
        .is_some_and(|hook| (hook.0)())
}

/// Counts a connection thread out when it ends.
struct Live<'a>(&'a AtomicUsize);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(state: &Arc<NodeState>, listener: TcpListener) {
    // Each warning at most once a second: a flood must not flood the log.
    let mut accept_warning = OncePerSecond::default();
    let mut refusal_warning = OncePerSecond::default();
    let mut spawn_warning = OncePerSecond::default();
    // Refusals for --max-connections since the last warning about them.
    let mut refused: u64 = 0;
    for conn in listener.incoming() {
        if state.stop.load(Ordering::Acquire) {
            break;
        }
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: the
                // connection waits in the backlog. Retrying at once would
                // spin a core on the same error; say so at most once a
                // second, and pause.
                if accept_warning.due() {
                    tracing::warn!(
                        error = %e,
                        "cannot accept a connection (the process may be out of file \
                         descriptors: see --max-connections and ulimit -n)"
                    );
                }
                std::thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        if state.live_connections.load(Ordering::Acquire) >= state.config.max_connections {
            // Counted before the answer goes out: a peer that reads it and
            // then asks for `stat` on another connection sees it counted.
            state.rejected_connections.fetch_add(1, Ordering::AcqRel);
            // Answered without a thread and closed: a flood of connections
            // cannot take every thread.
            refuse_connection(
                conn,
                &format!(
                    "too many connections: this node serves {} at once (--max-connections)",
                    state.config.max_connections
                ),
            );
            refused += 1;
            if refusal_warning.due() {
                tracing::warn!(
                    max = state.config.max_connections,
                    refused,
                    "connections refused: too many connections"
                );
                refused = 0;
            }
            continue;
        }
        let st = Arc::clone(state);
        let id = state.connections.fetch_add(1, Ordering::Relaxed);
        state.live_connections.fetch_add(1, Ordering::AcqRel);
        // The connection goes to its thread once the thread exists, so a
        // spawn that fails leaves it here to be answered (before, it was
        // dropped with the failed spawn's closure: the peer got a reset,
        // not an answer; found by a review).
        let (handover, arrival) = std::sync::mpsc::sync_channel::<TcpStream>(1);
        let spawned = if take_test_spawn_failure(state) {
            Err(std::io::Error::other("a test hook failed the spawn"))
        } else {
            std::thread::Builder::new()
                .name(format!("tapkv-conn-{id}"))
                .spawn(move || {
                    // Counted out however the thread ends, a panic included.
                    let _live = Live(&st.live_connections);
                    let Ok(conn) = arrival.recv() else {
                        return;
                    };
                    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    if let Err(e) = serve_connection(&st, conn, id) {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                })
        };
        match spawned {
            Ok(h) => {
                // The thread waits for it; it ends only after receiving.
                let _ = handover.send(conn);
                let mut threads = state.threads.lock();
                threads.retain(|t| !t.is_finished());
                threads.push(h);
            }
            Err(e) => {
                // Out of threads (a container's process limit, say): the
                // peer is told, as past --max-connections.
                state.live_connections.fetch_sub(1, Ordering::AcqRel);
                state.rejected_connections.fetch_add(1, Ordering::AcqRel);
                refuse_connection(
                    conn,
                    "busy: this node cannot start a thread to serve the connection (its \
                     process may be at its thread limit); try again later",
                );
                if spawn_warning.due() {
                    tracing::warn!(
                        error = %e,
                        "cannot spawn a connection thread: connections are refused (see the \
                         process's thread limit, and --max-connections)"
                    );
                }
            }
        }
    }
}

/// The connection's next request; `None` when it should end quietly: the
/// node stops (replies already made still go out), the peer closed, or it
/// sent nothing for `idle_polls` read timeouts. A malformed frame is
/// answered with `INVALID_ARGUMENTS` and ends the connection (the byte
/// stream cannot be resynchronised).
fn next_request(
    state: &NodeState,
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    idle_polls: usize,
    idle: &mut usize,
    before_hello: bool,
) -> Result<Option<Frame>, ProtocolError> {
    loop {
        if state.stop.load(Ordering::Acquire) {
            let _ = writer.flush();
            return Ok(None);
        }
        match reader.poll() {
            // Before the handshake, returned as the first request, which
            // is not a HELLO (answered HANDSHAKE_REQUIRED, and the
            // connection closed): a peer sending only responses does not
            // hold a slot past the handshake's deadline.
            Ok(Some(f)) if before_hello => {
                *idle = 0;
                return Ok(Some(f));
            }
            Ok(Some(f)) if f.magic != crate::protocol::MAGIC_REQUEST => {
                // A response where a request belongs: answered, skipped.
                *idle = 0;
                writer.send(&status_response(
                    &f,
                    status::INVALID_ARGUMENTS,
                    "expected a request (magic 0x80), got a response frame",
                ))?;
            }
            Ok(Some(f)) => {
                *idle = 0;
                return Ok(Some(f));
            }
            Ok(None) => {
                // A frame still arriving (slowly, but within its deadline)
                // is not idleness.
                if reader.take_progress() {
                    *idle = 0;
                } else {
                    *idle += 1;
                }
                if *idle >= idle_polls {
                    return Ok(None);
                }
            }
            Err(ProtocolError::Closed) => return Ok(None),
            // Answered (with the frame's opcode and opaque, if its header
            // arrived), then the connection is closed: the byte stream
            // cannot be resynchronised.
            Err(
                e @ (ProtocolError::BadMagic(_)
                | ProtocolError::BodyTooLarge { .. }
                | ProtocolError::BadLengths { .. }
                | ProtocolError::Busy { .. }),
            ) => {
                let mut req = Frame::request(0, 0);
                // A frame with a bad magic byte has no header to echo: its
                // bytes are not an opcode and an opaque (before, they were
                // echoed, and a client took the refusal for another
                // request's answer; found by a review).
                if let (Some((op, opaque)), false) = (
                    reader.pending_header(),
                    matches!(e, ProtocolError::BadMagic(_)),
                ) {
                    req.opcode = op;
                    req.opaque = opaque;
                }
                let st = match e {
                    ProtocolError::Busy { .. } => status::TEMP_FAILURE,
                    _ => status::INVALID_ARGUMENTS,
                };
                if writer
                    .send(&status_response(&req, st, &e.to_string()))
                    .is_ok()
                {
                    close_after_answer(state, writer.stream());
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Ends a connection whose input cannot be read on (a malformed frame, or a
/// large one refused) after its answer was written, without resetting it:
/// closing with input unread makes the kernel reset the connection, and a
/// peer still sending the rest of a large frame (as any client does before
/// it reads) then loses the answer to the reset. So the node shuts its side
/// down and reads and discards what the peer still sends, until the peer
/// closes, for at most the I/O timeout and `max_body` plus 1 MiB, or until
/// the node stops.
fn close_after_answer(state: &NodeState, stream: &TcpStream) {
    let cfg = &state.config;
    if stream.shutdown(std::net::Shutdown::Write).is_err()
        || stream
            .set_read_timeout(Some(CONNECTION_POLL.min(cfg.io_timeout)))
            .is_err()
    {
        return;
    }
    let started = Instant::now();
    let max_bytes = cfg.max_body.saturating_add(1 << 20);
    let mut buf = vec![0u8; 64 << 10];
    let mut read = 0usize;
    while read < max_bytes
        && started.elapsed() < cfg.io_timeout
        && !state.stop.load(Ordering::Acquire)
    {
        match std::io::Read::read(&mut &*stream, &mut buf) {
            Ok(0) => return,
            Ok(n) => read += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// How long a node connection's read waits before the thread looks at the
/// stop flag (and its idle count) again.
const CONNECTION_POLL: Duration = Duration::from_millis(200);

/// A writer's patience on a node's connections and a replica's link (whose
/// sockets have a short write timeout): a write that moves nothing fails
/// after `limit`, or at once when the node stops.
fn stop_aware_patience(state: &Arc<NodeState>, limit: Duration) -> crate::io::Patience {
    let st = Arc::clone(state);
    Box::new(move |stalled| stalled < limit && !st.stop.load(Ordering::Acquire))
}

/// The same for a replica's link to its primary.
const LINK_POLL: Duration = Duration::from_millis(50);

fn serve_connection(
    state: &Arc<NodeState>,
    conn: TcpStream,
    conn_id: u64,
) -> Result<(), ProtocolError> {
    let cfg = &state.config;
    conn.set_nodelay(true)?;
    // Writes wait in short slices and look at the stop between them (the
    // writer's patience, below): a peer that stopped reading does not hold
    // a stop for a whole I/O timeout.
    conn.set_write_timeout(Some(CONNECTION_POLL.min(cfg.io_timeout)))?;
    // Until the handshake, no more than a HELLO can carry: a peer that has
    // not said HELLO can neither take the node's large-frame budget nor,
    // trickling a large first frame just fast enough, hold its slot past
    // the handshake's deadline (found by a review: it could for the ~50
    // minutes a 21 MiB frame takes at 64 KiB per I/O timeout). Raised to
    // `max_body` once the HELLO is accepted.
    let mut reader = FrameReader::new(conn.try_clone()?, HELLO_MAX_BODY);
    reader.set_timeout(CONNECTION_POLL)?;
    // A partial frame must make progress (64 KiB) within the I/O timeout: a
    // peer trickling bytes cannot hold a connection slot (and its thread).
    reader.set_frame_deadline(Some(cfg.io_timeout));
    // Nor, sending just fast enough for that, hold the node's stop.
    reader.set_poll_bound(Some(CONNECTION_POLL));
    reader.set_body_budget(Arc::clone(&state.body_budget));
    // The writer takes the connection itself: two descriptors a connection,
    // not three (`docs/replication.md`, "Node settings").
    let peer_addr = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut writer = FrameWriter::new(conn);
    // A reply must be taken at 64 KiB per I/O timeout: a client reading a
    // byte every few seconds cannot hold a large reply, its thread, or the
    // node's stop.
    writer.set_progress_deadline(Some(cfg.io_timeout));
    writer.set_patience(stop_aware_patience(state, cfg.io_timeout));
    writer.set_reply_budget(Arc::clone(&state.reply_budget));
    let idle_polls = (cfg.idle_timeout.as_millis() / CONNECTION_POLL.as_millis()).max(1) as usize;
    let mut idle = 0;
    // Handshake first, within the I/O timeout (not the idle timeout): a
    // connection that never says HELLO does not keep its slot for minutes.
    let hello_polls = (cfg.io_timeout.min(cfg.idle_timeout).as_millis()
        / CONNECTION_POLL.as_millis())
    .max(1) as usize;
    let Some(first) = next_request(
        state,
        &mut reader,
        &mut writer,
        hello_polls,
        &mut idle,
        true,
    )?
    else {
        return Ok(());
    };
    // Each refusal of the handshake ends the connection the way a refused
    // frame does (`close_after_answer`): what the peer sent after it must
    // not reset the answer away.
    if first.magic != crate::protocol::MAGIC_REQUEST || first.opcode != opcode::HELLO {
        writer.send(&status_response(
            &first,
            status::HANDSHAKE_REQUIRED,
            "send HELLO first",
        ))?;
        close_after_answer(state, writer.stream());
        return Ok(());
    }
    match hello_version(&first) {
        Ok(PROTOCOL_VERSION) => {}
        Ok(v) => {
            writer.send(&status_response(
                &first,
                status::BAD_VERSION,
                &format!(
                    "protocol version {v} is not supported; this node speaks {PROTOCOL_VERSION}"
                ),
            ))?;
            close_after_answer(state, writer.stream());
            return Ok(());
        }
        Err(e) => {
            writer.send(&status_response(
                &first,
                status::INVALID_ARGUMENTS,
                &e.to_string(),
            ))?;
            close_after_answer(state, writer.stream());
            return Ok(());
        }
    }
    reader.set_max_body(cfg.max_body);
    let info = serde_json::json!({
        "name": cfg.name,
        "role": if state.replica { "replica" } else { "primary" },
        "partitions": state.engine.num_partitions(),
        "max_body": cfg.max_body,
        "heartbeat_ms": u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX),
        // A replica with a limit at least this takes every window entry
        // this node takes (`Engine::set_primary_window_limit`).
        "online_update_memory_limit": state
            .engine
            .config()
            .map_or(0, |c| c.online_update_memory_limit),
    });
    writer
        .send(&json_response(&first, &info).with_extras(PROTOCOL_VERSION.to_be_bytes().to_vec()))?;
    loop {
        let Some(frame) = next_request(
            state,
            &mut reader,
            &mut writer,
            idle_polls,
            &mut idle,
            false,
        )?
        else {
            return Ok(());
        };
        if frame.opcode == opcode::STREAM_OPEN {
            if let Err(msg) = check_stream_open(state, &frame) {
                writer.send(&status_response(&frame, status::INVALID_ARGUMENTS, &msg))?;
                continue;
            }
            return serve_stream(state, &frame, reader, writer, peer_addr, conn_id);
        }
        if frame.opcode == opcode::QUIT {
            writer.send(&Frame::response(&frame, status::SUCCESS))?;
            // Requests pipelined after it are not answered, nor may they
            // reset the answer away.
            close_after_answer(state, writer.stream());
            return Ok(());
        }
        if frame.opcode == opcode::ADMIN && &frame.key[..] == b"dump" {
            // Earlier replies do not wait behind the dump's walk of the store.
            if writer.pending() > 0 {
                writer.flush()?;
            }
            admin_dump(state, &frame, &mut writer)?;
            continue;
        }
        if writer.pending() > 0 && may_block(&frame) {
            // Earlier replies do not wait behind a durable write or a flush.
            writer.flush()?;
        }
        let resp = handle_request(state, &frame);
        // Replies to pipelined requests go out together: one write once
        // every buffered request is answered (or past 64 KiB). A large one
        // that does not fit in what large replies may hold is answered
        // busy instead; the connection stays (nothing was torn).
        if writer.push_budgeted(&resp).is_none() {
            drop(resp);
            writer.push(&status_response(
                &frame,
                status::TEMP_FAILURE,
                &format!(
                    "busy: replies waiting for their clients to read them hold the {} bytes \
                     large replies may hold together (--max-pending-reply-bytes); try again \
                     later",
                    state.reply_budget.limit()
                ),
            ));
        }
        if !reader.has_frame() || writer.pending() >= REPLY_BATCH {
            writer.flush()?;
        }
    }
}

/// Replies held back for one write at most, while pipelined requests wait.
const REPLY_BATCH: usize = 64 * 1024;

/// Whether answering `f` may wait on something slow (the disk, replicas, a
/// revert): everything but memory-durability data operations and trivia.
fn may_block(f: &Frame) -> bool {
    let quick = match f.opcode {
        opcode::GET | opcode::NOOP | opcode::VERSION | opcode::PARTITION_OF => true,
        opcode::SET | opcode::ADD | opcode::REPLACE | opcode::DELETE => {
            crate::message::durability_of(f.datatype) == tapkv_engine::Durability::Memory
        }
        _ => false,
    };
    !quick
}

fn check_partition(state: &NodeState, f: &Frame) -> Result<(), Frame> {
    // An empty key belongs to no partition: refused as the engine refuses
    // it, whatever partition the request names (before, any but 0 was told
    // the key belonged to partition 0; found by a review).
    if f.key.is_empty() {
        return Err(status_response(
            f,
            status::INVALID_ARGUMENTS,
            "the key is empty",
        ));
    }
    let p = state.engine.partition_of(&f.key);
    if f.partition() != p {
        return Err(status_response(
            f,
            status::NOT_MY_VBUCKET,
            &format!(
                "key belongs to partition {p}, request names {}",
                f.partition()
            ),
        ));
    }
    Ok(())
}

fn check_datatype(f: &Frame) -> Result<(), Frame> {
    crate::message::check_write_datatype(f.datatype)
        .map_err(|msg| status_response(f, status::INVALID_ARGUMENTS, &msg))
}

fn read_only(state: &NodeState, f: &Frame) -> Result<(), Frame> {
    if state.replica {
        return Err(status_response(
            f,
            status::NOT_MY_VBUCKET,
            "this node is a read-only replica: send writes to its primary",
        ));
    }
    Ok(())
}

fn handle_request(state: &NodeState, f: &Frame) -> Frame {
    match handle_request_inner(state, f) {
        Ok(r) | Err(r) => r,
    }
}

fn handle_request_inner(state: &NodeState, f: &Frame) -> Result<Frame, Frame> {
    let e = &state.engine;
    let fail = |err: Error| error_response(f, &err);
    match f.opcode {
        opcode::NOOP => Ok(Frame::response(f, status::SUCCESS)),
        opcode::VERSION => Ok(Frame::response(f, status::SUCCESS)
            .with_value(env!("CARGO_PKG_VERSION").as_bytes().to_vec())),
        opcode::GET => {
            check_partition(state, f)?;
            let item = e.get(&f.key).map_err(fail)?;
            Ok(Frame::response(f, status::SUCCESS)
                .with_extras(item.meta.flags.to_be_bytes().to_vec())
                .with_value(item.value_bytes())
                .with_cas(item.meta.cas))
        }
        opcode::SET | opcode::ADD | opcode::REPLACE => {
            read_only(state, f)?;
            check_partition(state, f)?;
            check_datatype(f)?;
            let (flags, expiry) = parse_store_extras(f)
                .map_err(|err| status_response(f, status::INVALID_ARGUMENTS, &err.to_string()))?;
            let opts = WriteOptions {
                cas: (f.cas != 0).then_some(f.cas),
                flags,
                expiry,
                durability: crate::message::durability_of(f.datatype),
            };
            let r = match f.opcode {
                opcode::ADD => e.add(&f.key, f.value.clone(), opts),
                opcode::REPLACE => e.replace(&f.key, f.value.clone(), opts),
                _ => e.set(&f.key, f.value.clone(), opts),
            }
            .map_err(fail)?;
            Ok(Frame::response(f, status::SUCCESS)
                .with_extras(u64s(&[r.seqno]))
                .with_cas(r.cas))
        }
        opcode::DELETE => {
            read_only(state, f)?;
            check_partition(state, f)?;
            check_datatype(f)?;
            let opts = WriteOptions {
                cas: (f.cas != 0).then_some(f.cas),
                durability: crate::message::durability_of(f.datatype),
                ..WriteOptions::default()
            };
            let r = e.delete(&f.key, opts).map_err(fail)?;
            Ok(Frame::response(f, status::SUCCESS)
                .with_extras(u64s(&[r.seqno]))
                .with_cas(r.cas))
        }
        opcode::UPDATE_START | opcode::UPDATE_COMPLETE | opcode::UPDATE_REVERT => {
            read_only(state, f)?;
            let p = f.partition();
            let extras = match f.opcode {
                opcode::UPDATE_START => u64s(&[e.online_update_start(p).map_err(fail)?]),
                opcode::UPDATE_COMPLETE => u64s(&[e.online_update_complete(p).map_err(fail)?]),
                _ => {
                    let r = e.online_update_revert(p).map_err(fail)?;
                    u64s(&[r.checkpoint_id, r.removed as u64, r.restored as u64])
                }
            };
            Ok(Frame::response(f, status::SUCCESS).with_extras(extras))
        }
        opcode::PARTITION_OF => {
            // As GET and SET: an empty key has no partition.
            if f.key.is_empty() {
                return Err(status_response(
                    f,
                    status::INVALID_ARGUMENTS,
                    "the key is empty",
                ));
            }
            let p = e.partition_of(&f.key);
            Ok(Frame::response(f, status::SUCCESS).with_extras(p.to_be_bytes().to_vec()))
        }
        opcode::EVICT => {
            check_partition(state, f)?;
            e.evict(&f.key).map_err(fail)?;
            Ok(Frame::response(f, status::SUCCESS))
        }
        opcode::FLUSH => {
            e.flush().map_err(fail)?;
            Ok(Frame::response(f, status::SUCCESS))
        }
        opcode::CHECKPOINT => {
            read_only(state, f)?;
            let id = e.create_checkpoint(f.partition()).map_err(fail)?;
            Ok(Frame::response(f, status::SUCCESS).with_extras(u64s(&[id])))
        }
        opcode::PARTITION_INFO => {
            let p = f.partition();
            match &f.key[..] {
                b"checkpoints" => {
                    let cks = e.checkpoints(p).map_err(fail)?;
                    let v: Vec<_> = cks
                        .iter()
                        .map(|c| {
                            serde_json::json!({"id": c.id, "open": c.open, "start_seqno": c.start_seqno,
                                "high_seqno": c.high_seqno, "items": c.items, "mem_bytes": c.mem_bytes,
                                "entries": c.entries})
                        })
                        .collect();
                    Ok(json_response(f, &v))
                }
                b"cursors" => {
                    let cs = e.cursors(p).map_err(fail)?;
                    let v: Vec<_> = cs
                        .iter()
                        .map(|c| {
                            serde_json::json!({"name": c.name, "checkpoint_id": c.checkpoint_id,
                                "seqno": c.seqno, "remaining": c.remaining})
                        })
                        .collect();
                    Ok(json_response(f, &v))
                }
                _ => Err(status_response(
                    f,
                    status::INVALID_ARGUMENTS,
                    "key must be checkpoints or cursors",
                )),
            }
        }
        opcode::STAT => {
            let st = e.stats().map_err(fail)?;
            let parts: Vec<_> = st.partitions.iter().collect();
            Ok(json_response(
                f,
                &serde_json::json!({
                    "role": if state.replica { "replica" } else { "primary" },
                    "items": st.items(),
                    "dirty": st.dirty(),
                    "checkpoint_mem_bytes": st.checkpoint_mem_bytes,
                    "syncs": st.syncs,
                    "recovered_from_crash": st.recovered_from_crash,
                    "snapshot_staged_items": st.snapshot_staged_items,
                    "cursors_dropped": st.cursors_dropped,
                    "items_expelled": st.items_expelled,
                    "flusher_nice": st.flusher_nice,
                    "link_error": *state.link_error.lock(),
                    "link_sessions": state.link_sessions.load(Ordering::Relaxed),
                    "pending_body_bytes": state.body_budget.used(),
                    "pending_reply_bytes": state.reply_budget.used(),
                    "curr_connections": state.live_connections.load(Ordering::Acquire),
                    "total_connections": state.connections.load(Ordering::Relaxed),
                    "rejected_connections": state.rejected_connections.load(Ordering::Acquire),
                    "replicate_waiting": state.acks.waiting.load(Ordering::Acquire),
                    "partitions": parts,
                }),
            ))
        }
        opcode::ADMIN => match &f.key[..] {
            b"inspect" => {
                let st = e.stats().map_err(fail)?;
                // The offline inspect's field names where the two share a
                // figure (`docs/admin.md`).
                let parts = st
                    .partitions
                    .iter()
                    .map(|p| {
                        Ok(serde_json::json!({
                            "partition": p.partition, "high_seqno": p.high_seqno,
                            "persisted_seqno": p.persisted_seqno, "checkpoint_id": p.open_checkpoint_id,
                            "items": p.items, "open_window": p.window, "lost_windows": p.lost_windows,
                            "failover_log": e.failover_log(p.partition)?,
                        }))
                    })
                    .collect::<tapkv_engine::Result<Vec<_>>>()
                    .map_err(fail)?;
                Ok(json_response(
                    f,
                    &serde_json::json!({
                        "name": state.config.name,
                        "role": if state.replica { "replica" } else { "primary" },
                        "data": e.path().display().to_string(),
                        "primary": state.config.replica_of,
                        "link_error": *state.link_error.lock(),
                        "link_sessions": state.link_sessions.load(Ordering::Relaxed),
                        "partitions": parts,
                    }),
                ))
            }
            b"streams" => Ok(json_response(f, &streams_info(state))),
            _ => Err(status_response(
                f,
                status::INVALID_ARGUMENTS,
                "admin key must be inspect, dump or streams",
            )),
        },
        opcode::HELLO => Err(status_response(
            f,
            status::INVALID_ARGUMENTS,
            "HELLO was already done",
        )),
        other => Err(status_response(
            f,
            status::UNKNOWN_COMMAND,
            &format!("unknown opcode 0x{other:02x}"),
        )),
    }
}

fn admin_dump(state: &NodeState, f: &Frame, w: &mut FrameWriter) -> Result<(), ProtocolError> {
    let max = state.config.max_dumps;
    let taken = state
        .dumps
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        });
    if taken.is_err() {
        return w.send(&status_response(
            f,
            status::TEMP_FAILURE,
            &format!("busy: {max} dumps are running already (--max-dumps); retry later"),
        ));
    }
    // Counted out however the dump ends.
    let _running = Live(&state.dumps);
    let result = (|| -> Result<(), Error> {
        // A point-in-time copy: the engine's compactions cannot take
        // tables from under the walk (a view opened on the live directory
        // failed part-way when one did).
        let view = state.engine.disk_view()?;
        view.for_each_item(|it| {
            // A stopping node ends the dump (before, it went on to the end).
            if state.stop.load(Ordering::Acquire) {
                return Err(Error::WrongState(
                    "the node is stopping; the dump ended early".into(),
                ));
            }
            let row = crate::client::DumpRow::of(&it);
            w.push(&json_response(f, &row).with_key(b"row".to_vec()));
            if w.pending() > 256 * 1024 {
                w.flush()
                    .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
            }
            Ok(())
        })
    })();
    match result {
        Ok(()) => w.send(&Frame::response(f, status::SUCCESS).with_key(b"end".to_vec())),
        Err(e) => w.send(&error_response(f, &e)),
    }
}

fn streams_info(state: &NodeState) -> Vec<StreamInfo> {
    let streams: Vec<Arc<StreamShared>> = state.streams.lock().values().cloned().collect();
    streams
        .iter()
        .map(|s| {
            let acked = s.acked.lock().clone();
            let resumed = s.resumed_from.lock().clone();
            let mut parts: Vec<StreamPartitionInfo> = s
                .parts
                .lock()
                .iter()
                .map(|(p, (st, sent))| {
                    let cursor = state.engine.cursor_info(*p, &s.cursor).ok().flatten();
                    StreamPartitionInfo {
                        partition: *p,
                        state: *st,
                        sent_seqno: *sent,
                        acked_seqno: acked.get(p).copied().unwrap_or(0),
                        lag_items: cursor.as_ref().map_or(0, |c| c.remaining),
                        lag_bytes: cursor.as_ref().map_or(0, |c| c.remaining_bytes),
                        resumed_from: resumed.get(p).copied().unwrap_or(0),
                    }
                })
                .collect();
            parts.sort_by_key(|p| p.partition);
            StreamInfo {
                name: s.name.clone(),
                peer: s.peer.clone(),
                unacked_bytes: s.unacked.load(Ordering::Acquire),
                last_ack_ms: s.last_ack.lock().elapsed().as_millis() as u64,
                acks_ahead: s.acks_ahead.load(Ordering::Acquire),
                restarts: s.restarts.load(Ordering::Acquire),
                partitions: parts,
            }
        })
        .collect()
}

/// Refuses a `STREAM_OPEN` this node cannot serve, before the connection
/// becomes a stream.
fn check_stream_open(state: &NodeState, open: &Frame) -> Result<(), String> {
    if state.replica {
        return Err("a replica does not serve streams".into());
    }
    check_stream_name(&open.key).map_err(|e| format!("stream name refused: {e}"))?;
    let reqs = parse_stream_open(open).map_err(|e| e.to_string())?;
    if reqs.is_empty() {
        return Err("a stream asks for no partition".into());
    }
    if let Some(bad) = reqs
        .iter()
        .find(|r| r.partition >= state.engine.num_partitions())
    {
        return Err(format!("partition {} does not exist", bad.partition));
    }
    // One position per partition: a stream asking for one many times
    // re-registered its cursor at each (skipping or repeating entries),
    // scanned the disk once per entry and sent a FAILOVER per entry
    // unflushed (a frame holds about a million).
    let mut asked = vec![false; usize::from(state.engine.num_partitions())];
    for r in &reqs {
        let seen = &mut asked[usize::from(r.partition)];
        if *seen {
            return Err(format!("partition {} is asked for twice", r.partition));
        }
        *seen = true;
    }
    Ok(())
}

fn serve_stream(
    state: &Arc<NodeState>,
    open: &Frame,
    reader: FrameReader,
    mut writer: FrameWriter,
    peer: String,
    conn_id: u64,
) -> Result<(), ProtocolError> {
    let name = String::from_utf8_lossy(&open.key).into_owned();
    let reqs = match parse_stream_open(open) {
        Ok(r) => r,
        Err(e) => {
            writer.send(&status_response(
                open,
                status::INVALID_ARGUMENTS,
                &e.to_string(),
            ))?;
            return Ok(());
        }
    };
    writer.send(&Frame::response(open, status::SUCCESS))?;
    let shared = Arc::new(StreamShared {
        // One cursor per connection: a stream that replaces an older one of
        // the same replica never shares (or removes) the older one's cursor.
        cursor: format!("repl:{name}:{conn_id}"),
        name: name.clone(),
        peer,
        unacked: AtomicU64::new(0),
        last_ack: Mutex::new(Instant::now()),
        acks_ahead: AtomicU64::new(0),
        acked: Mutex::new(HashMap::new()),
        parts: Mutex::new(HashMap::new()),
        snapshots: Mutex::new(HashMap::new()),
        resumed_from: Mutex::new(HashMap::new()),
        restarts: AtomicU64::new(0),
        restarting: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        lock: Mutex::new(()),
        cv: Condvar::new(),
        node_acks: Arc::clone(&state.acks),
    });
    if let Some(old) = state
        .streams
        .lock()
        .insert(name.clone(), Arc::clone(&shared))
    {
        // A restarted replica taking over its stream; also anyone else who
        // opens a stream under that name (the protocol has no
        // authentication), so both peers are named.
        tracing::warn!(
            stream = %name,
            old_peer = %old.peer,
            new_peer = %shared.peer,
            "a stream under this name replaces the one already open"
        );
        old.stop();
    }
    // Unregistered, and its cursors removed, however this ends (a panic
    // included): a stream stays registered only while a thread serves it.
    let registered = Registered {
        state,
        name: &name,
        shared: &shared,
        reqs: &reqs,
    };
    tracing::info!(stream = %name, partitions = reqs.len(), "replication stream opened");
    {
        // A replica applying a large disk snapshot reads nothing for a while
        // but acknowledges its progress: a write that waits on it fails only
        // once it has been silent as long as the silence rule allows.
        let s = Arc::clone(&shared);
        let st = Arc::clone(state);
        let silence_limit = state.config.heartbeat * SILENT_HEARTBEATS;
        let io_timeout = state.config.io_timeout;
        // A stream waits for its replica as the patience rule says, not
        // by a client's progress deadline: a write timeout, and then for
        // as long as the replica keeps acknowledging.
        writer.set_progress_deadline(None);
        writer.set_patience(Box::new(move |stalled| {
            !s.stop.load(Ordering::Acquire)
                && !st.stop.load(Ordering::Acquire)
                && (stalled < io_timeout || s.last_ack.lock().elapsed() < silence_limit)
        }));
    }
    let acker = {
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            // Not the peer's name: a thread name cannot hold every byte.
            .name(format!("tapkv-acks-{conn_id}"))
            .spawn(move || ack_reader(&s, reader))
    };
    // Out of threads: the guard unregisters the stream (it would count
    // towards `Replicate` majorities with nobody serving it).
    let acker = acker.map_err(ProtocolError::Io)?;
    let result = stream_loop(state, &shared, &reqs, &mut writer);
    // Stops the stream, unregisters it and removes its cursors.
    drop(registered);
    let _ = acker.join();
    tracing::info!(stream = %name, ok = result.is_ok(), "replication stream closed");
    result
}

/// A stream registered in the node's streams; dropping it stops the
/// stream, unregisters it, then removes its cursors (unregistered first:
/// once the cursors are gone, `admin streams` no longer lists it either).
struct Registered<'a> {
    state: &'a NodeState,
    name: &'a str,
    shared: &'a Arc<StreamShared>,
    reqs: &'a [StreamRequest],
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        unregister_stream(self.state, self.name, self.shared);
        for r in self.reqs {
            let _ = self
                .state
                .engine
                .remove_cursor(r.partition, &self.shared.cursor);
        }
    }
}

/// Removes `stream` from the node's streams, unless a newer stream of the
/// same replica has replaced it there.
fn unregister_stream(state: &NodeState, name: &str, stream: &Arc<StreamShared>) {
    let mut streams = state.streams.lock();
    if streams.get(name).is_some_and(|s| Arc::ptr_eq(s, stream)) {
        streams.remove(name);
    }
}

/// Reads a stream's acknowledgements. An ACK frees at most the bytes still
/// unacknowledged, and counts a seqno only for a partition the stream
/// serves and only up to what it sent there: a replica (or any peer that
/// opened a stream) acknowledging ahead cannot satisfy a `Replicate` write
/// nobody holds. Only an ACK that frees bytes or advances a seqno is
/// progress (`last_ack`, which the slow-replica and silence rules look at):
/// empty ACKs do not keep a stream that reads nothing alive. A malformed
/// ACK or any other frame ends the stream.
/// A stream's disk snapshots of partitions sent and not yet acknowledged to
/// their end: `(after, end, progress)`, see `StreamShared::snapshots`.
type PendingSnapshots = HashMap<PartitionId, (u64, u64, u64)>;

/// Notes that a disk snapshot of `p` covering `(from, end]` was sent. A
/// snapshot that follows one of the same partition still being applied (a
/// later backfill pass) keeps that one's progress: the replica's progress
/// ACKs through the first one are still progress. (Started over at `from`,
/// they were all below it and none counted: a replica applying a long
/// snapshot looked silent and was dropped as slow, and backfilled again.)
fn snapshot_sent(snapshots: &mut PendingSnapshots, p: PartitionId, from: u64, end: u64) {
    let progress = snapshots
        .get(&p)
        .map_or(from, |&(_, _, progress)| progress.min(from));
    snapshots.insert(p, (from, end, progress));
}

/// Takes an ACK's seqnos into a stream's bookkeeping: `acked` rises to
/// what each acknowledges (up to what was sent, `parts`; inside a disk
/// snapshot only to its start, `snapshots`). Returns whether anything
/// advanced (liveness) and whether the ACK named a partition or seqno the
/// stream never sent.
fn note_acked_seqnos(
    parts: &HashMap<PartitionId, (PartitionStreamState, u64)>,
    acked: &mut HashMap<PartitionId, u64>,
    snapshots: &mut PendingSnapshots,
    seqnos: impl IntoIterator<Item = (PartitionId, u64)>,
) -> (bool, bool) {
    let (mut advanced, mut ahead) = (false, false);
    for (p, seqno) in seqnos {
        let Some((_, sent)) = parts.get(&p) else {
            ahead = true;
            continue;
        };
        ahead |= seqno > *sent;
        let seqno = seqno.min(*sent);
        let e = acked.entry(p).or_default();
        if seqno <= *e {
            continue;
        }
        // Progress inside a disk snapshot: alive, but not holding every
        // write up to there (`snapshots`); past its start, it holds
        // everything before it. Only a higher seqno than before is
        // progress.
        let inside = match snapshots.get_mut(&p) {
            Some((after, end, progress)) if seqno < *end => {
                if seqno >= *after && *e < *after {
                    *e = *after;
                }
                if seqno > *progress {
                    *progress = seqno;
                    advanced = true;
                }
                true
            }
            // Its end acknowledged: done with it.
            Some(_) => {
                snapshots.remove(&p);
                false
            }
            None => false,
        };
        if !inside {
            *e = seqno;
            advanced = true;
        }
    }
    (advanced, ahead)
}

fn ack_reader(s: &StreamShared, mut reader: FrameReader) {
    while !s.stop.load(Ordering::Acquire) {
        match reader.poll() {
            Ok(Some(f)) if f.opcode == opcode::ACK => {
                let ack = match Ack::from_frame(&f) {
                    Ok(ack) => ack,
                    Err(e) => {
                        tracing::warn!(stream = %s.name, error = %e, "malformed ACK: ending the stream");
                        break;
                    }
                };
                let before = s
                    .unacked
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                        Some(u.saturating_sub(ack.bytes))
                    })
                    .unwrap_or(0);
                let freed = before.min(ack.bytes);
                let (advanced, ahead) = {
                    let parts = s.parts.lock();
                    let mut acked = s.acked.lock();
                    let mut snapshots = s.snapshots.lock();
                    let (advanced, ahead) =
                        note_acked_seqnos(&parts, &mut acked, &mut snapshots, ack.seqnos);
                    (advanced, ahead || ack.bytes > before)
                };
                // Warned once per stream: at its first such ACK.
                if ahead && s.acks_ahead.fetch_add(1, Ordering::AcqRel) == 0 {
                    tracing::warn!(
                        stream = %s.name,
                        "the replica acknowledged bytes or seqnos it was never sent (counted \
                         only up to what was sent)"
                    );
                }
                if freed > 0 || advanced {
                    *s.last_ack.lock() = Instant::now();
                }
                {
                    let _g = s.lock.lock();
                    s.cv.notify_all();
                }
                let _g = s.node_acks.lock.lock();
                s.node_acks.cv.notify_all();
            }
            Ok(Some(f)) => {
                tracing::warn!(
                    stream = %s.name,
                    opcode = f.opcode,
                    "unexpected frame from a replica on its stream: ending the stream"
                );
                break;
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
    s.stop();
}

fn send(writer: &mut FrameWriter, s: &StreamShared, m: &StreamMessage) -> usize {
    let n = writer.push_encoded(|buf| m.encode(buf));
    s.unacked.fetch_add(n as u64, Ordering::AcqRel);
    n
}

/// Backfill passes a stream makes without cursors, over all its partitions
/// that need one, before it registers them (see `stream_loop`).
const BACKFILL_PASSES: usize = 3;

/// A stream's heartbeat while it starts: the start sends its opening burst
/// and disk snapshots without a flush at each, and a partition's scan can
/// take long, so the time since the last flush is kept across the whole
/// start, not per snapshot. (Before, it was reset at each snapshot and
/// looked at only at scan ticks: a start of many partitions, each scanned
/// in less than a heartbeat, sent nothing for longer than the replica's
/// silence limit, which ended the session, and the next start repeated it.)
struct StartBeat<'a> {
    every: Duration,
    last_flush: Instant,
    stopping: &'a dyn Fn() -> bool,
}

impl StartBeat<'_> {
    /// Flushes what is pending, after a `NOOP` the replica acknowledges, if
    /// nothing was flushed for a heartbeat.
    fn beat(&mut self, writer: &mut FrameWriter, s: &StreamShared) -> Result<(), Error> {
        if self.last_flush.elapsed() >= self.every {
            send(writer, s, &StreamMessage::Noop);
            self.flush(writer)?;
        }
        Ok(())
    }

    fn flush(&mut self, writer: &mut FrameWriter) -> Result<(), Error> {
        writer.flush().map_err(io_err)?;
        self.last_flush = Instant::now();
        Ok(())
    }
}

/// Sends partition `p`'s disk snapshot `(from, end]`: a disk `SNAPSHOT`
/// marker, the disk's items and tombstones in that range straight from the
/// RocksDB iterator (in key order: the replica orders the snapshot by seqno
/// once it has all of it), and a closing memory `SNAPSHOT` marker.
fn send_disk_snapshot(
    s: &StreamShared,
    writer: &mut FrameWriter,
    beat: &mut StartBeat<'_>,
    snap: tapkv_engine::DiskSnapshot<'_>,
) -> Result<(), Error> {
    let (p, from, end) = (snap.partition(), snap.after(), snap.end());
    s.parts
        .lock()
        .insert(p, (PartitionStreamState::Backfilling, from));
    send(
        writer,
        s,
        &StreamMessage::Snapshot {
            partition: p,
            start: from + 1,
            end,
            from_disk: true,
        },
    );
    let items = snap.scan_ref(|entry| {
        // A partition's scan can take minutes: a node that stops ends it
        // (the stream then ends with STREAM_END, and the replica drops the
        // unfinished snapshot).
        if (beat.stopping)() {
            return Err(Error::Closed);
        }
        match entry {
            Some(e) => {
                // Encoded straight from the disk iterator's slices.
                let entry = (e.op, e.key, e.value, e.meta);
                let n = writer.push_encoded(|buf| StreamMessage::encode_entry(p, entry, buf));
                s.unacked.fetch_add(n as u64, Ordering::AcqRel);
                if writer.pending() > 256 * 1024 {
                    beat.flush(writer)?;
                }
            }
            // A long stretch of the partition outside the range: keep the
            // replica from taking the silence for a dead primary.
            None => beat.beat(writer, s)?,
        }
        Ok(())
    })?;
    send(
        writer,
        s,
        &StreamMessage::Snapshot {
            partition: p,
            start: end + 1,
            end,
            from_disk: false,
        },
    );
    snapshot_sent(&mut s.snapshots.lock(), p, from, end);
    s.parts
        .lock()
        .insert(p, (PartitionStreamState::Backfilling, end));
    tracing::info!(stream = %s.name, partition = p, from, end, items, "disk snapshot sent");
    Ok(())
}

/// Registers partition `p`'s stream cursor after `from` (the end of what was
/// sent so far), sending from disk first what memory no longer holds.
/// One cursor-less backfill pass over partition `p`: sends the disk
/// snapshot `(from, persisted]` if memory no longer holds what follows
/// `from`, and moves `from` to its end; whether it sent one.
fn backfill_pass(
    engine: &Engine,
    s: &StreamShared,
    writer: &mut FrameWriter,
    beat: &mut StartBeat<'_>,
    p: PartitionId,
    from: &mut u64,
) -> Result<bool, Error> {
    let Some(snap) = engine.backfill_snapshot(p, *from)? else {
        return Ok(false);
    };
    let end = snap.end();
    send_disk_snapshot(s, writer, beat, snap)?;
    *from = end;
    Ok(true)
}

fn start_partition(
    engine: &Engine,
    s: &StreamShared,
    writer: &mut FrameWriter,
    beat: &mut StartBeat<'_>,
    (p, from): (PartitionId, u64),
) -> Result<(), Error> {
    if (beat.stopping)() {
        return Err(Error::Closed);
    }
    // The snapshot's iterator was opened with the cursor registered at its
    // end, so what it reads is the disk at that seqno.
    let sent = match engine.stream_start_with_snapshot(p, &s.cursor, from)? {
        None => from,
        Some(snap) => {
            let end = snap.end();
            send_disk_snapshot(s, writer, beat, snap)?;
            end
        }
    };
    // Marked in memory only once every partition is started (the stream's
    // start loop): until then nothing of this one is sent.
    s.parts
        .lock()
        .insert(p, (PartitionStreamState::Backfilling, sent));
    Ok(())
}

fn io_err(e: ProtocolError) -> Error {
    Error::Io(std::io::Error::other(e.to_string()))
}

fn stream_loop(
    state: &NodeState,
    s: &StreamShared,
    reqs: &[StreamRequest],
    writer: &mut FrameWriter,
) -> Result<(), ProtocolError> {
    let cfg = &state.config;
    let engine = &state.engine;
    let stopping = || s.stop.load(Ordering::Acquire) || state.stop.load(Ordering::Acquire);
    let mut run = || -> Result<(), Error> {
        // Where each partition resumes; advanced by the backfill passes.
        let mut starts: Vec<(PartitionId, u64)> = Vec::new();
        for r in reqs {
            match engine.resume_position(r.partition, r.uuid, r.seqno)? {
                Some(from) => {
                    let uuid = engine
                        .failover_log(r.partition)?
                        .last()
                        .map_or(0, |e| e.uuid);
                    send(
                        writer,
                        s,
                        &StreamMessage::Failover {
                            partition: r.partition,
                            uuid,
                        },
                    );
                    s.resumed_from.lock().insert(r.partition, from);
                    {
                        let mut acked = s.acked.lock();
                        let a = acked.entry(r.partition).or_default();
                        *a = (*a).max(from);
                    }
                    starts.push((r.partition, from));
                }
                None => {
                    tracing::info!(stream = %s.name, partition = r.partition, "replica diverged: rollback");
                    send(
                        writer,
                        s,
                        &StreamMessage::Rollback {
                            partition: r.partition,
                        },
                    );
                    s.parts
                        .lock()
                        .insert(r.partition, (PartitionStreamState::RolledBack, 0));
                }
            }
        }
        // Partitions whose history memory no longer holds are backfilled
        // without cursors first, round after round, so the big part of a
        // backfill pins no checkpoints (a stream joining a large primary
        // would otherwise pin every partition's checkpoints while the
        // others are read from disk, and under writes fill the primary's
        // checkpoint memory). Only what was persisted during the last pass
        // is sent with a cursor registered.
        let mut beat = StartBeat {
            every: cfg.heartbeat,
            last_flush: Instant::now(),
            stopping: &stopping,
        };
        for _ in 0..BACKFILL_PASSES {
            let mut sent_any = false;
            for (p, from) in &mut starts {
                if stopping() {
                    return Err(Error::Closed);
                }
                beat.beat(writer, s)?;
                sent_any |= backfill_pass(engine, s, writer, &mut beat, *p, from)?;
            }
            if !sent_any {
                break;
            }
        }
        let mut active = Vec::new();
        for (p, from) in starts {
            beat.beat(writer, s)?;
            if let Some(hook) = &cfg.before_partition_start {
                (hook.0)(p);
            }
            start_partition(engine, s, writer, &mut beat, (p, from))?;
            active.push(p);
        }
        beat.flush(writer)?;
        // Only now is anything sent from memory, so only now does the stream
        // count towards `Replicate` writes on these partitions
        // (`AckGate::wait_replicated`). Before, each was marked as it
        // started, and while a later partition's start sent a disk snapshot
        // (a scan of the partition, which can take minutes) the stream
        // counted for the earlier ones without sending them anything: their
        // `Replicate` writes timed out while a replica joined (found by a
        // review).
        {
            let mut parts = s.parts.lock();
            for p in &active {
                if let Some(e) = parts.get_mut(p) {
                    e.0 = PartitionStreamState::InMemory;
                }
            }
        }
        let mut last_send = Instant::now();
        let mut dropped = false;
        let mut first = 0usize;
        let mut generation = engine.change_generation();
        // A replica acknowledges every heartbeat at once: one that has left
        // bytes unacknowledged this long is hung or gone (its host may be,
        // with the connection still open), and must neither hold a thread
        // nor count towards a `Replicate` write's majority.
        let silence_limit = cfg.heartbeat * SILENT_HEARTBEATS;
        let silent = || {
            s.unacked.load(Ordering::Acquire) > 0 && s.last_ack.lock().elapsed() >= silence_limit
        };
        while !stopping() {
            if silent() {
                tracing::warn!(stream = %s.name, ?silence_limit, "replica silent: ending its stream");
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "replica {} acknowledged nothing for {silence_limit:?}",
                        s.name
                    ),
                )));
            }
            // Flow control: wait for acks while too much is unacknowledged.
            // (At the limit exactly, a round could send nothing: wait.)
            if s.unacked.load(Ordering::Acquire) >= cfg.max_unacked_bytes {
                let since = Instant::now();
                let mut g = s.lock.lock();
                while s.unacked.load(Ordering::Acquire) > cfg.max_unacked_bytes / 2
                    && !s.stop.load(Ordering::Acquire)
                    && !silent()
                {
                    // Dropped when stuck at the limit with no ack at all for
                    // the timeout: a replica applying a large snapshot still
                    // acks its progress (and memory pressure is handled by
                    // the engine's cursor drop).
                    if !dropped
                        && since.elapsed() >= cfg.slow_replica_timeout
                        && s.last_ack.lock().elapsed() >= cfg.slow_replica_timeout
                    {
                        // A slow replica must not pin checkpoints forever.
                        drop(g);
                        for p in &active {
                            engine.remove_cursor(*p, &s.cursor)?;
                            if let Some(e) = s.parts.lock().get_mut(p) {
                                e.0 = PartitionStreamState::Dropped;
                            }
                        }
                        dropped = true;
                        tracing::warn!(stream = %s.name, "slow replica: cursors dropped");
                        g = s.lock.lock();
                        continue;
                    }
                    // Acks wake this wait; otherwise it looks again often
                    // enough to drop on time whatever the heartbeat.
                    let tick = cfg
                        .heartbeat
                        .min(cfg.slow_replica_timeout / 4)
                        .max(Duration::from_millis(1));
                    s.cv.wait_for(&mut g, tick);
                }
                drop(g);
                continue;
            }
            if dropped {
                // The replica reads again: end the stream. It reconnects and
                // resumes (with a backfill) from what it holds, which also
                // handles a window it holds that ended meanwhile.
                tracing::info!(stream = %s.name, "slow replica reads again: ending the stream for a resume");
                break;
            }
            let mut sent = 0;
            let mut lost = None;
            // Each round starts one partition further on, so a round cut
            // short by the byte limit does not always leave out the same
            // partitions.
            first = (first + 1) % active.len().max(1);
            let order = active.iter().cycle().skip(first).take(active.len());
            for p in order {
                // A round stops once the stream has its limit of bytes
                // unacknowledged; each read stops at the first item past
                // the bytes left, so a stream passes its limit by at most
                // one item.
                let budget = cfg
                    .max_unacked_bytes
                    .saturating_sub(s.unacked.load(Ordering::Acquire));
                if budget == 0 {
                    break;
                }
                let mut last = None;
                // Bytes this read queued: markers and items.
                let mut read_bytes = 0;
                let queued_before = writer.pending();
                // Entries are encoded straight from the checkpoints into the
                // connection buffer (closed checkpoints without the
                // partition's lock).
                let limits = (
                    cfg.stream_batch,
                    usize::try_from(budget).unwrap_or(usize::MAX),
                );
                let read = engine.read_cursor_within(*p, &s.cursor, limits, |ev| {
                    read_bytes += match ev {
                        EventRef::CheckpointStart { id } => writer.push_encoded(|buf| {
                            StreamMessage::CheckpointStart { partition: *p, id }.encode(buf)
                        }),
                        EventRef::CheckpointEnd { id } => writer.push_encoded(|buf| {
                            StreamMessage::CheckpointEnd { partition: *p, id }.encode(buf)
                        }),
                        EventRef::Item(item) => {
                            last = Some(item.seqno());
                            writer.push_encoded(|buf| StreamMessage::encode_item(*p, item, buf))
                        }
                    };
                });
                if let Err(e) = read {
                    // A failed read's events are discarded: the stream ends
                    // either way (the replica resumes from what it holds),
                    // and sent, the replica's ack for them would read as one
                    // for bytes never sent.
                    writer.truncate(queued_before);
                    if engine.has_cursor(*p, &s.cursor)? {
                        return Err(e);
                    }
                    // The primary's flusher dropped the cursor: checkpoint
                    // memory reached its cursor-drop threshold with this
                    // stream behind the disk.
                    lost = Some(*p);
                    break;
                }
                // Counted once per partition rather than per item: nothing
                // was sent meanwhile (the buffer is flushed below), so no
                // ack can cover these bytes yet.
                s.unacked.fetch_add(read_bytes as u64, Ordering::AcqRel);
                sent += read_bytes;
                if let Some(seqno) = last {
                    if let Some(e) = s.parts.lock().get_mut(p) {
                        e.1 = seqno;
                    }
                }
                if writer.pending() > 256 * 1024 {
                    writer.flush().map_err(io_err)?;
                }
            }
            if let Some(p) = lost {
                // Only this partition starts again, from disk, within the
                // session: from the last entry sent, which the replica
                // applies before the snapshot. Before (found by a review),
                // the stream ended and every partition started again: a
                // joining replica whose first partitions' cursors were
                // dropped while the others were scanned (every disk
                // snapshot scans its whole partition) repeated the join,
                // and under heavy writes never finished it.
                let Some(mut from) = s.parts.lock().get(&p).map(|e| e.1) else {
                    return Err(Error::WrongState(format!(
                        "stream {}: partition {p} has no position to start again from",
                        s.name
                    )));
                };
                tracing::warn!(
                    stream = %s.name,
                    partition = p,
                    from,
                    "stream cursor dropped under checkpoint-memory pressure: sending the \
                     partition again (from disk what memory no longer holds)"
                );
                // Meanwhile the stream sends nothing from memory, for any
                // partition: it counts for no `Replicate` write (as while
                // it starts; found by a review).
                s.restarting.store(true, Ordering::Release);
                if let Some(e) = s.parts.lock().get_mut(&p) {
                    e.0 = PartitionStreamState::Backfilling;
                }
                // Most of it without a cursor, as at the stream's start, so
                // the scans pin nothing (a cursor registered first could be
                // dropped again under the load that dropped this one).
                for _ in 0..BACKFILL_PASSES {
                    if !backfill_pass(engine, s, writer, &mut beat, p, &mut from)? {
                        break;
                    }
                }
                if let Some(hook) = &cfg.before_partition_start {
                    (hook.0)(p);
                }
                start_partition(engine, s, writer, &mut beat, (p, from))?;
                if let Some(e) = s.parts.lock().get_mut(&p) {
                    e.0 = PartitionStreamState::InMemory;
                }
                s.restarting.store(false, Ordering::Release);
                s.restarts.fetch_add(1, Ordering::AcqRel);
                beat.flush(writer)?;
                continue;
            }
            if sent == 0 && last_send.elapsed() >= cfg.heartbeat {
                sent += send(writer, s, &StreamMessage::Noop);
            } else if sent > 0 && state.acks.waiting.load(Ordering::Acquire) > 0 {
                // A `Replicate` write waits: the replica acknowledges a NOOP
                // at once, so its ack does not wait for a byte count.
                send(writer, s, &StreamMessage::Noop);
            }
            writer.flush().map_err(io_err)?;
            if sent > 0 {
                last_send = Instant::now();
                if sent < LINGER_BELOW
                    && !cfg.stream_linger.is_zero()
                    && state.acks.waiting.load(Ordering::Acquire) == 0
                {
                    std::thread::sleep(cfg.stream_linger.min(MAX_LINGER));
                }
            } else {
                // Nothing new since `generation` was read: sleep until the
                // engine queues something or a heartbeat is due, looking at
                // the stop flags between slices (a node's shutdown waited
                // out a whole heartbeat here, up to an hour with
                // `--heartbeat-ms`); only a change or a due heartbeat makes
                // another round.
                let due = Instant::now() + cfg.heartbeat;
                loop {
                    let now = Instant::now();
                    if now >= due || stopping() {
                        break;
                    }
                    let seen =
                        engine.wait_for_changes(generation, (due - now).min(LINK_WAIT_SLICE));
                    if seen != generation {
                        generation = seen;
                        break;
                    }
                }
                continue;
            }
            generation = engine.change_generation();
        }
        let _ = writer.send(&StreamMessage::StreamEnd.to_frame());
        Ok(())
    };
    match run() {
        // Stopped part-way (the node or this stream): end it like any other.
        Err(_) if stopping() => {
            let _ = writer.send(&StreamMessage::StreamEnd.to_frame());
            Ok(())
        }
        r => r.map_err(|e| ProtocolError::Io(std::io::Error::other(e.to_string()))),
    }
}

/// Largest stream frame body a replica reads.
const STREAM_FRAME_LIMIT: usize = crate::protocol::MAX_FRAME_BODY;

/// A stream whose replica has acknowledged nothing for this many heartbeats
/// while bytes are unacknowledged is ended; a replica gives up on a primary
/// it has not heard from for as long (counting the slower of the two
/// nodes' heartbeats: the primary's comes in its HELLO answer).
const SILENT_HEARTBEATS: u32 = 10;

/// The longest primary heartbeat a replica's silence limit follows.
const HOUR_MS: u64 = MAX_HEARTBEAT.as_millis() as u64;

/// How often a replica acknowledges its progress while it applies a disk
/// snapshot (without reading its stream meanwhile).
const PROGRESS_ACK_EVERY: Duration = Duration::from_millis(100);

/// How long a replica waits before it tries again to apply an entry its
/// checkpoint memory had no room for.
const MEMORY_RETRY: Duration = Duration::from_millis(1);

/// Entries of one partition in a row that a replica's link applies as one
/// run (`Engine::apply_replicated_run`: one acquisition of the partition's
/// lock and one wake-up of its flusher for the run). The stream sends up
/// to `stream_batch` entries of a partition in a row; a run ends earlier
/// when no whole frame is left in the read buffer, so an entry never waits
/// for the network to be applied.
pub const REPLICA_APPLY_RUN: usize = 64;

/// How long the entry at the front of a run has waited for checkpoint
/// memory: a wait that applied part of the run starts again for the entry
/// then at the front (as when each entry was applied on its own), so the
/// waits of a run's entries never add up to the in-window limit.
#[derive(Debug, Default)]
struct MemoryWait {
    /// Since when, and how many entries were left then.
    since: Option<(Instant, usize)>,
}

impl MemoryWait {
    /// A refusal at `now` with `left` entries still to apply; returns how
    /// long the front entry has waited. (The clock is read per refusal,
    /// each followed by a nap, never per applied entry: a clock read per
    /// entry was about 5% of the replica link's time.)
    fn refused(&mut self, left: usize, now: Instant) -> Duration {
        match self.since {
            Some((since, was)) if was == left => now.saturating_duration_since(since),
            _ => {
                self.since = Some((now, left));
                Duration::ZERO
            }
        }
    }
}

/// Applies a run of entries of `partition`, in stream order, emptying
/// `run`; `Ok(false)` when the partition had to be reset for a
/// resynchronisation (the session then reconnects). Waits while the
/// replica's checkpoint memory is full of unpersisted entries (see
/// [`Engine::apply_replicated`]), and then sets `waited`;
/// `Err(Error::Closed)` if the node stops meanwhile.
fn apply_run(
    engine: &Engine,
    stop: &AtomicBool,
    memory_wait: Duration,
    partition: PartitionId,
    run: &mut VecDeque<tapkv_engine::QueuedItem>,
    seqnos: &mut [u64],
    waited: &mut bool,
) -> Result<bool, Error> {
    let Some(last) = run.back().map(tapkv_engine::QueuedItem::seqno) else {
        return Ok(true);
    };
    let mut wait = MemoryWait::default();
    let outcome = loop {
        match engine.apply_replicated_run(partition, run) {
            Ok(outcome) => break outcome,
            // Checkpoint memory is full of what the flusher has still to
            // persist: wait for it without reading further, so the primary's
            // flow control holds the rest back (and drops this stream's
            // cursor if the wait is long). The flusher frees memory a batch
            // at a time; a short nap between tries costs nothing next to it.
            // Inside a window, though, a wait past `memory_wait` ends the
            // session, keeping the data (the window over this replica's
            // limit is freed only by its END or REVERT, further on in the
            // stream): the link reconnects with a backoff and reports why
            // in `link_error`. Ordinary backpressure waits on: the flusher
            // frees memory however slow the disk.
            Err(e @ Error::TempOutOfMemory { .. }) => {
                if stop.load(Ordering::Acquire) {
                    return Err(Error::Closed);
                }
                if wait.refused(run.len(), Instant::now()) > memory_wait
                    && engine.online_update_window(partition)?.is_some()
                {
                    return Err(e);
                }
                *waited = true;
                std::thread::sleep(MEMORY_RETRY);
            }
            // This node's own faults (its disk, its engine closing): the
            // session ends and the link reconnects with a backoff, keeping
            // what the partition holds. Emptying it would turn a passing
            // disk error into a full resynchronisation.
            Err(e) if e.is_own_fault() => return Err(e),
            // A key over this replica's own limit: its configuration, not
            // the partition, is at fault (a resync would meet the key
            // again), so the session ends, keeping the data, and the link
            // reports why.
            Err(e @ Error::KeyTooLarge { .. }) => {
                return Err(Error::WrongState(format!(
                    "the primary sent a key over this replica's own limit ({e}): start the \
                     replica with --max-key-size at least its primary's"
                )));
            }
            // Input this partition cannot take consistently (a seqno not
            // above its high seqno, an id out of range, a window it does
            // not hold): resynchronise it.
            Err(_) => break ApplyOutcome::Resync,
        }
    };
    if outcome == ApplyOutcome::Resync {
        tracing::warn!(
            partition,
            seqno = run.front().map(tapkv_engine::QueuedItem::seqno),
            "cannot apply consistently: resynchronising the partition"
        );
        run.clear();
        engine.reset_partition(partition)?;
        return Ok(false);
    }
    if let Some(e) = seqnos.get_mut(usize::from(partition)) {
        *e = (*e).max(last);
    }
    Ok(true)
}

/// The replica side: connect, open a stream, apply, acknowledge, repeat.
fn replica_link(state: &Arc<NodeState>, primary: &str) {
    const FIRST: Duration = Duration::from_millis(50);
    let mut backoff = FIRST;
    while !state.stop.load(Ordering::Acquire) {
        let started = Instant::now();
        if let Err(e) = replica_session(state, primary) {
            tracing::warn!(%primary, error = %e, "replication link down; reconnecting");
            *state.link_error.lock() = Some(e.to_string());
        }
        // Every session end waits before the next connect, and only a
        // session that lasted (a working stream) starts the wait over:
        // one that ends at once, however it ends, doubles it (to 1 s). A
        // session that ends normally — STREAM_END, a ROLLBACK burst, an
        // entry that resynchronises a partition — used to reconnect at
        // once, so a primary ending every session that way spun the link
        // at about 900 connects a second, each ROLLBACK or resync emptying
        // the partition again.
        if started.elapsed() >= SESSION_THAT_LASTED {
            backoff = FIRST;
        }
        let deadline = Instant::now() + backoff;
        while Instant::now() < deadline && !state.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(10));
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// A warning's last time: `due` at most once a second.
#[derive(Default)]
struct OncePerSecond(Option<Instant>);

impl OncePerSecond {
    /// Whether the warning may be given now (and, if so, notes that it is).
    fn due(&mut self) -> bool {
        let due = self.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if due {
            self.0 = Some(Instant::now());
        }
        due
    }
}

/// How long the accept loop pauses after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// A replication session that lasted this long was a working stream: the
/// link's wait before the next connect starts over at its shortest.
const SESSION_THAT_LASTED: Duration = Duration::from_secs(1);

/// A replica link reads the clock once per this many frames while frames
/// keep arriving (and at every idle poll): at about 500,000 frames a second
/// that is every ~0.1 ms, far inside the 20 ms ack age and the silence
/// limit it serves.
const CLOCK_EVERY_FRAMES: u64 = 64;

/// A slice of a wait the replica link makes: between slices it looks at
/// the node's stop flag, so a stop never waits out a whole `io_timeout`
/// against a primary that does not answer.
const LINK_WAIT_SLICE: Duration = Duration::from_millis(250);

/// Connects to `addr` (each address it resolves to in turn), for up to
/// `timeout` per address, giving up early once `stop` is set. The lookup
/// and the attempts run on a short-lived thread while this one waits in
/// slices and looks at `stop` between them: a stop never waits out a slow
/// resolver or a connect timeout, and a slow handshake (a distant primary)
/// is not cut short and retried.
fn connect(addr: &str, timeout: Duration, stop: &AtomicBool) -> std::io::Result<TcpStream> {
    let (tx, rx) = std::sync::mpsc::channel();
    let target = addr.to_owned();
    std::thread::Builder::new()
        .name("tapkv-connect".into())
        .spawn(move || {
            let attempt = || -> std::io::Result<TcpStream> {
                let mut last = None;
                for a in target.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    std::io::Error::other(format!("{target} resolves to no address"))
                }))
            };
            let _ = tx.send(attempt());
        })?;
    loop {
        if stop.load(Ordering::Acquire) {
            // The attempt ends on its own (the lookup, then within the
            // timeout per address).
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "node stopping",
            ));
        }
        match rx.recv_timeout(LINK_WAIT_SLICE) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(std::io::Error::other(
                    "the connect attempt ended without a result",
                ))
            }
        }
    }
}

/// A stream the primary got wrong: the session ends (the link reconnects
/// with its backoff and reports it in `link_error`) and the data stays.
fn protocol_violation(what: String) -> Error {
    Error::WrongState(format!("the primary broke the stream protocol: {what}"))
}

/// Refuses a handshake reply that is not the answer to `op` (a response
/// with that opcode): before, any frame whose status field was 0 passed
/// as success, a stream frame for partition 0 included.
fn expect_answer(r: &Frame, op: u8) -> Result<(), Error> {
    // A refusal (any response with an error status) is reported as such
    // by the caller, whatever its opcode: a node past `--max-connections`
    // answers before it has read the request.
    if r.is_response() && (r.opcode == op || r.status() != status::SUCCESS) {
        return Ok(());
    }
    Err(Error::WrongState(format!(
        "the primary answered opcode 0x{op:02x} with a {} of opcode 0x{:02x}",
        if r.is_response() {
            "response"
        } else {
            "request"
        },
        r.opcode
    )))
}

fn replica_session(state: &Arc<NodeState>, primary: &str) -> Result<(), Error> {
    let cfg = &state.config;
    let engine = &state.engine;
    let perr = |e: ProtocolError| Error::Io(std::io::Error::other(e.to_string()));
    let conn = connect(primary, cfg.io_timeout, &state.stop)?;
    conn.set_nodelay(true)?;
    // As a node's connections: short write slices, the stop looked at
    // between them.
    conn.set_write_timeout(Some(LINK_POLL.min(cfg.io_timeout)))?;
    let mut reader = FrameReader::new(conn.try_clone()?, cfg.max_body);
    reader.set_timeout(LINK_POLL)?;
    // A frame must make progress (64 KiB per `io_timeout`), as the node
    // asks of its clients: a primary trickling one a byte at a time would
    // otherwise hold the link, and a shutdown, for as long as it liked;
    // and a poll returns between reads of a frame still arriving, so the
    // stop flag is looked at.
    reader.set_frame_deadline(Some(cfg.io_timeout));
    reader.set_poll_bound(Some(LINK_POLL));
    let mut writer = FrameWriter::new(conn);
    writer.set_patience(stop_aware_patience(state, cfg.io_timeout));
    let polls = (cfg.io_timeout.as_millis() / LINK_POLL.as_millis()).max(1) as usize;
    writer.send(&hello(&cfg.name)).map_err(perr)?;
    let r = reader
        .next_within_unless(polls, &state.stop)
        .map_err(perr)?;
    expect_answer(&r, opcode::HELLO)?;
    if r.status() != status::SUCCESS {
        return Err(Error::WrongState(format!(
            "primary refused HELLO: {}",
            String::from_utf8_lossy(&r.value)
        )));
    }
    // Partitions are replicated by number, and a key's partition depends on
    // the count: a replica with another count would hold keys under
    // partitions its own reads never look in (or miss some partitions).
    let info: serde_json::Value = serde_json::from_slice(&r.value).unwrap_or_default();
    let theirs = info["partitions"].as_u64();
    if theirs != Some(u64::from(engine.num_partitions())) {
        let msg = format!(
            "the primary at {primary} has {} partitions and this replica {}: a replica \
             needs a data directory created with the primary's partition count; not replicating",
            theirs.map_or_else(|| "an unknown number of".into(), |n| n.to_string()),
            engine.num_partitions()
        );
        tracing::error!("{msg}");
        return Err(Error::WrongState(msg));
    }
    // The primary streams every value it holds whole, whatever its
    // `--max-body` is now (it may have stored larger values under an
    // earlier limit) and whatever this node's own limit for clients is:
    // stream frames are read up to 1 GiB (a node caps its values below
    // that). The primary is trusted with that much.
    reader.set_max_body(STREAM_FRAME_LIMIT.max(cfg.max_body));
    // Silence is judged by the slower of the two heartbeats: a primary that
    // beats every 20 s must not have its idle stream cut after this node's
    // ten 1 s beats (at most an hour, whatever a primary claims).
    let primary_heartbeat = info["heartbeat_ms"]
        .as_u64()
        .map_or(Duration::ZERO, |ms| Duration::from_millis(ms.min(HOUR_MS)));
    let silence_limit = cfg.heartbeat.max(primary_heartbeat) * SILENT_HEARTBEATS;
    // The primary's window limit decides whether its windows are held to
    // this node's own (absent from an older primary: they are).
    engine.set_primary_window_limit(
        info["online_update_memory_limit"]
            .as_u64()
            .and_then(|b| usize::try_from(b).ok())
            .unwrap_or(0),
    );
    // A window held across a reconnect resumes like anything else while the
    // primary still holds what follows in memory (the window's END or
    // REVERT comes with it). Only a partition the primary could answer with
    // a backfill (below: the window ended and its markers were freed) is
    // reset, before this session asks for it again from seqno 0.
    let resync: Vec<PartitionId> = std::mem::take(&mut *state.resync_next.lock());
    for p in resync {
        tracing::warn!(
            partition = p,
            "the window held across a reconnect ended on the primary: resynchronising"
        );
        engine.reset_partition(p)?;
    }
    let reqs: Vec<StreamRequest> = (0..engine.num_partitions())
        .map(|p| -> Result<StreamRequest, Error> {
            Ok(StreamRequest {
                partition: p,
                uuid: engine.failover_log(p)?.last().map_or(0, |e| e.uuid),
                seqno: engine.high_seqno(p)?,
            })
        })
        .collect::<Result<_, Error>>()?;
    writer
        .send(&message::stream_open(&cfg.name, &reqs))
        .map_err(perr)?;
    let r = reader
        .next_within_unless(polls, &state.stop)
        .map_err(perr)?;
    expect_answer(&r, opcode::STREAM_OPEN)?;
    if r.status() != status::SUCCESS {
        return Err(Error::WrongState(format!(
            "primary refused the stream: {}",
            String::from_utf8_lossy(&r.value)
        )));
    }
    tracing::info!(%primary, "replication stream open");
    // The last session's error stays in `link_error` until this one has
    // lasted (`SESSION_THAT_LASTED`): a link whose sessions each open and
    // then fail shows why, not a clean slate at every reconnect.
    let opened_at = Instant::now();
    let mut error_cleared = false;
    let mut clear_error = |now: Instant| {
        if !error_cleared && now.duration_since(opened_at) >= SESSION_THAT_LASTED {
            *state.link_error.lock() = None;
            error_cleared = true;
        }
    };
    state.link_sessions.fetch_add(1, Ordering::Relaxed);
    let mut ack = Ack::default();
    // Highest seqno applied per partition (0: nothing yet), for acks.
    let mut seqnos = vec![0u64; usize::from(engine.num_partitions())];
    let applied = |seqnos: &[u64]| -> Vec<(PartitionId, u64)> {
        (0..)
            .zip(seqnos.iter().copied())
            .filter(|(_, s)| *s > 0)
            .collect()
    };
    // Disk snapshots arrive in key order: held per partition (spilled to
    // disk past the engine's `snapshot_buffer_limit`) until their end marker,
    // then applied in seqno order.
    // (With each snapshot its seqno range: what arrives inside it must lie
    // there.)
    let mut snapshots: HashMap<PartitionId, (SnapshotBuffer<'_>, u64, u64)> = HashMap::new();
    let mut last_ack = Instant::now();
    let mut last_heard = Instant::now();
    // The primary answers a stream open with a FAILOVER or a ROLLBACK per
    // partition, all before anything else: every rolled-back partition is
    // reset, and the session ends at the first frame after that burst (the
    // next one asks for those partitions from seqno 0), so any number of
    // diverged partitions costs one reconnect rather than one each.
    let mut rolled_back = false;
    // Partitions the opening burst has answered (FAILOVER or ROLLBACK).
    let mut answered = vec![false; usize::from(engine.num_partitions())];
    // The time as of the last idle poll or the last `CLOCK_EVERY_FRAMES`th
    // frame: a clock read per frame was about 8% of the link's time.
    let mut now = Instant::now();
    let mut frames = 0u64;
    // Set when handling a frame waited (for checkpoint memory, or applying
    // a disk snapshot): `now` is read again before the ack check.
    let mut clock_stale = false;
    // Entries of `run_partition` received and not yet applied: only while
    // a whole frame that may extend them is buffered (see
    // `REPLICA_APPLY_RUN`), so the reads below never wait with a run held.
    let mut run: VecDeque<tapkv_engine::QueuedItem> = VecDeque::with_capacity(REPLICA_APPLY_RUN);
    let mut run_partition: PartitionId = 0;
    // Partitions this session found holding a window that a disk snapshot
    // of theirs cannot end: each is reset at the next session's start
    // (`resync_next`). Their snapshots' frames are skipped (`skipping`: the
    // one being received), and the session ends at the first frame from
    // memory, which a stream sends only once every partition has started,
    // so all such partitions cost one more session, not one each (before,
    // the session ended at the first; found by a review).
    let mut resyncing = false;
    let mut skipping: Option<PartitionId> = None;
    let apply = |p: PartitionId,
                 run: &mut VecDeque<tapkv_engine::QueuedItem>,
                 seqnos: &mut Vec<u64>,
                 stale: &mut bool| {
        apply_run(engine, &state.stop, cfg.io_timeout, p, run, seqnos, stale)
    };
    while !state.stop.load(Ordering::Acquire) {
        // Frames are decoded in place in the read buffer: an entry's key and
        // value are copied once, into its record.
        let polled = reader
            .poll_map(|f| (f.wire_len(), StreamMessage::from_frame_ref(&f)))
            .map_err(perr)?;
        let (wire_len, msg) = match polled {
            Some(m) => m,
            None => {
                // A large frame still arriving is not silence.
                now = Instant::now();
                if reader.take_progress() {
                    last_heard = now;
                }
                clear_error(now);
                if now.duration_since(last_heard) > silence_limit {
                    return Err(Error::Timeout {
                        what: "the primary's stream",
                        millis: silence_limit.as_millis() as u64,
                    });
                }
                if ack.bytes > 0 {
                    ack.seqnos = applied(&seqnos);
                    writer.send(&ack.to_frame()).map_err(perr)?;
                    ack = Ack::default();
                    last_ack = Instant::now();
                }
                continue;
            }
        };
        frames = frames.wrapping_add(1);
        if frames % CLOCK_EVERY_FRAMES == 0 {
            now = Instant::now();
        }
        last_heard = now;
        clear_error(now);
        ack.bytes += wire_len as u64;
        let msg = msg.map_err(perr)?;
        let opening = match msg {
            StreamMessage::Rollback { partition } | StreamMessage::Failover { partition, .. } => {
                if let Some(seen) = answered.get_mut(usize::from(partition)) {
                    *seen = true;
                }
                true
            }
            _ => false,
        };
        if rolled_back && !opening {
            return Ok(());
        }
        if !opening && engine.holds_primary_data() && answered.iter().all(|a| *a) {
            // The opening burst answered every partition and nothing was
            // refused: this directory's history is its primary's.
            engine.confirm_replica()?;
        }
        let mut ack_now = false;
        // Whatever is not the next entry of the run is handled after it.
        let extends_run = match &msg {
            StreamMessage::Item { partition, .. } => {
                snapshots.is_empty() && (run.is_empty() || *partition == run_partition)
            }
            _ => false,
        };
        if !extends_run && !apply(run_partition, &mut run, &mut seqnos, &mut clock_stale)? {
            return Ok(());
        }
        match (&msg, skipping) {
            (StreamMessage::Item { partition, .. }, Some(p)) if *partition == p => continue,
            (
                StreamMessage::Snapshot {
                    partition,
                    from_disk: false,
                    ..
                },
                Some(p),
            ) if *partition == p => {
                skipping = None;
                continue;
            }
            _ => {}
        }
        let from_memory = match &msg {
            StreamMessage::Item { partition, .. } => !snapshots.contains_key(partition),
            StreamMessage::CheckpointStart { .. } | StreamMessage::CheckpointEnd { .. } => true,
            _ => false,
        };
        if resyncing && from_memory {
            apply(run_partition, &mut run, &mut seqnos, &mut clock_stale)?;
            return Ok(());
        }
        match msg {
            StreamMessage::Failover { partition, uuid } => {
                let log = engine.failover_log(partition)?;
                if log.last().map(|e| e.uuid) != Some(uuid) {
                    // A new branch: the primary restarted uncleanly and kept
                    // its history up to where this replica resumes. If the
                    // replica stepped over a de-duplication hole it has not
                    // yet read past, the entry that made the hole may be
                    // what the primary lost, and the version it replaced,
                    // which the primary still holds, never comes: the
                    // partition is resynchronised instead.
                    //
                    // Reset at once, as a ROLLBACK is, and the rest of the
                    // opening burst read: the session ends at the first
                    // frame after it, and the next one asks for every reset
                    // partition from seqno 0. (Before, the session ended
                    // here and the reset waited for the next one: after an
                    // unclean primary restart, which branches every
                    // partition, a replica took a backed-off session per
                    // partition, replicating nothing meanwhile.)
                    if engine.replica_history_may_have_gaps(partition)? {
                        keep_primary_data(engine, cfg, primary, partition)?;
                        tracing::warn!(
                            partition,
                            "the primary's history branched where this replica may lack a \
                             version it holds: resynchronising the partition"
                        );
                        engine.reset_partition(partition)?;
                        rolled_back = true;
                        if reader.caught_up() {
                            return Ok(());
                        }
                        continue;
                    }
                    engine.set_failover_log(
                        partition,
                        vec![tapkv_engine::FailoverEntry { uuid, seqno: 0 }],
                    )?;
                }
            }
            StreamMessage::Snapshot {
                partition,
                from_disk: true,
                start,
                end,
            } => {
                // A primary sends one partition's disk snapshot whole, then
                // the next: one open at a time bounds what the replica
                // buffers to one `snapshot_buffer_limit`.
                if let Some(open) = snapshots.keys().next() {
                    return Err(protocol_violation(format!(
                        "a disk snapshot of partition {partition} began while partition {open}'s \
                         was open"
                    )));
                }
                // A backfill carries items only: a window this replica holds
                // open would wait for ever for its END or REVERT. Reset the
                // partition and ask for it from the start.
                if engine.online_update_window(partition)?.is_some() {
                    state.resync_next.lock().push(partition);
                    resyncing = true;
                    skipping = Some(partition);
                    continue;
                }
                snapshots.insert(partition, (engine.snapshot_buffer(partition)?, start, end));
            }
            StreamMessage::Snapshot {
                partition,
                from_disk: false,
                end,
                ..
            } => {
                if let Some((snapshot, _, _)) = snapshots.remove(&partition) {
                    clock_stale = true;
                    let staged = snapshot.staged_items();
                    let mut one = VecDeque::with_capacity(1);
                    // Applying a large snapshot takes a while without
                    // reading: acknowledge progress meanwhile, so the
                    // primary sees a live replica.
                    let mut progress_at = Instant::now();
                    if !snapshot.apply(|item| {
                        // A node that stops keeps the prefix applied so far
                        // (it is in seqno order) and resumes after it.
                        one.push_back(item.clone());
                        if state.stop.load(Ordering::Acquire)
                            || !apply(partition, &mut one, &mut seqnos, &mut clock_stale)?
                        {
                            return Ok(false);
                        }
                        if progress_at.elapsed() >= PROGRESS_ACK_EVERY {
                            let progress = Ack {
                                bytes: 0,
                                seqnos: applied(&seqnos),
                            };
                            writer.send(&progress.to_frame()).map_err(perr)?;
                            progress_at = Instant::now();
                        }
                        Ok(true)
                    })? {
                        return Ok(());
                    }
                    if staged > 0 {
                        tracing::info!(
                            partition,
                            staged,
                            "disk snapshot applied (spilled to disk past snapshot_buffer_limit)"
                        );
                    }
                    // The replica now holds the partition as of the
                    // snapshot's end, also when its last seqnos were markers
                    // (not on disk, so not in the snapshot): acknowledge
                    // that, not only the last item applied.
                    if let Some(s) = seqnos.get_mut(usize::from(partition)) {
                        *s = (*s).max(end);
                    }
                }
            }
            // A heartbeat, or the primary asking for an ack now (a
            // `Replicate` write waits).
            StreamMessage::Noop => ack_now = true,
            StreamMessage::CheckpointStart { partition, id } => {
                engine.replica_checkpoint(partition, id)?;
            }
            StreamMessage::CheckpointEnd { partition, id } => {
                engine.replica_checkpoint_end(partition, id)?;
            }
            StreamMessage::Item { partition, item } => {
                let buffer = if snapshots.is_empty() {
                    None
                } else {
                    snapshots.get_mut(&partition)
                };
                if let Some((buffer, start, end)) = buffer {
                    // A disk snapshot carries items and tombstones of its
                    // range only: a marker inside it would be applied if the
                    // snapshot stayed in memory and dropped if it spilled.
                    let seqno = item.seqno();
                    if !item.op.is_key_op() || seqno < *start || seqno > *end {
                        return Err(protocol_violation(format!(
                            "an entry at seqno {seqno} ({:?}) inside the disk snapshot \
                             {start}..={end} of partition {partition}",
                            item.op
                        )));
                    }
                    buffer.push(item)?;
                } else {
                    // Applied with the entries of its partition that follow
                    // it in the buffer (below).
                    run_partition = partition;
                    run.push_back(item);
                }
            }
            StreamMessage::Rollback { partition } => {
                keep_primary_data(engine, cfg, primary, partition)?;
                tracing::warn!(
                    partition,
                    "primary's history diverged: rolling back the partition"
                );
                engine.reset_partition(partition)?;
                rolled_back = true;
                if reader.caught_up() {
                    // Nothing else has arrived (every partition may have
                    // rolled back): no need to wait for a heartbeat.
                    return Ok(());
                }
            }
            StreamMessage::StreamEnd => return Ok(()),
        }
        // The run is applied once it is full, once no whole frame is left to
        // extend it, and before an ack (which covers only what is applied).
        if (run.len() >= REPLICA_APPLY_RUN || !reader.has_frame())
            && !apply(run_partition, &mut run, &mut seqnos, &mut clock_stale)?
        {
            return Ok(());
        }
        if std::mem::take(&mut clock_stale) {
            now = Instant::now();
            // The time this frame took to handle is not the primary's
            // silence (it may itself wait for the ACK sent below).
            last_heard = now;
        }
        if ack_now
            || ack.bytes >= cfg.ack_bytes
            || reader.caught_up()
            || now.duration_since(last_ack) >= Duration::from_millis(20)
        {
            if !apply(run_partition, &mut run, &mut seqnos, &mut clock_stale)? {
                return Ok(());
            }
            ack.seqnos = applied(&seqnos);
            writer.send(&ack.to_frame()).map_err(perr)?;
            ack = Ack::default();
            last_ack = now;
        }
    }
    Ok(())
}

/// Refuses, before a partition is reset, to replace data a primary's
/// directory holds that no session has confirmed to be its primary's
/// ([`Engine::holds_primary_data`]), unless the node was told to
/// (`replace_primary_data`, `--replace-data`). Both resets check it: a
/// ROLLBACK, and a FAILOVER onto a branch the partition may lack versions
/// of (before, that one replaced such data unasked).
fn keep_primary_data(
    engine: &Engine,
    cfg: &NodeConfig,
    primary: &str,
    partition: PartitionId,
) -> Result<(), Error> {
    if engine.holds_primary_data() && !cfg.replace_primary_data && engine.high_seqno(partition)? > 0
    {
        let msg = format!(
            "the primary at {primary} has another history for partition {partition}, and this \
             directory holds a primary's data, which replicating it would replace: not \
             replicating (check --replica-of, or start the node with --replace-data to replace it)"
        );
        tracing::error!("{msg}");
        return Err(Error::WrongState(msg));
    }
    Ok(())
}

#[cfg(test)]
mod memory_wait_tests {
    use super::MemoryWait;
    use std::time::{Duration, Instant};

    /// The in-window limit counts one entry's wait: a retry that applied
    /// part of the run starts the clock again (before, a run's waits added
    /// up, and a slow disk ended sessions that were making progress).
    #[test]
    fn a_wait_that_applied_part_of_the_run_starts_again() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = MemoryWait::default();
        assert_eq!(w.refused(64, at(0)), Duration::ZERO);
        assert_eq!(w.refused(64, at(8)), Duration::from_secs(8));
        // Ten entries applied, then refused again: a new wait.
        assert_eq!(w.refused(54, at(9)), Duration::ZERO);
        assert_eq!(w.refused(54, at(12)), Duration::from_secs(3));
        assert_eq!(w.refused(54, at(20)), Duration::from_secs(11));
    }
}

#[cfg(test)]
mod snapshot_ack_tests {
    use super::{note_acked_seqnos, snapshot_sent, PartitionStreamState, PendingSnapshots};
    use std::collections::HashMap;

    /// A later backfill pass's snapshot of a partition whose first snapshot
    /// the replica is still applying: the replica's progress ACKs through
    /// the first are still progress (found by a review: they counted for
    /// nothing once the second was sent, and the stream was dropped as
    /// slow), and neither counts as holding more than the first's start
    /// until its end is acknowledged.
    #[test]
    fn progress_through_a_snapshot_still_counts_once_the_next_one_is_sent() {
        let parts = HashMap::from([(0, (PartitionStreamState::Backfilling, 200))]);
        let mut acked = HashMap::new();
        let mut snaps = PendingSnapshots::new();
        snapshot_sent(&mut snaps, 0, 10, 100);
        assert_eq!(
            note_acked_seqnos(&parts, &mut acked, &mut snaps, [(0, 40)]),
            (true, false)
        );
        assert_eq!(acked[&0], 10, "inside the snapshot: only its start");
        // The next pass sends (100, 200] while the replica applies (10, 100].
        snapshot_sent(&mut snaps, 0, 100, 200);
        assert_eq!(
            note_acked_seqnos(&parts, &mut acked, &mut snaps, [(0, 60)]),
            (true, false),
            "progress through the first snapshot"
        );
        assert_eq!(acked[&0], 10);
        assert_eq!(
            note_acked_seqnos(&parts, &mut acked, &mut snaps, [(0, 60)]),
            (false, false),
            "the same seqno again is no progress"
        );
        // The first one's end: it holds everything up to 100.
        assert_eq!(
            note_acked_seqnos(&parts, &mut acked, &mut snaps, [(0, 100)]),
            (true, false)
        );
        assert_eq!(acked[&0], 100);
        // The second's end: done.
        assert_eq!(
            note_acked_seqnos(&parts, &mut acked, &mut snaps, [(0, 200)]),
            (true, false)
        );
        assert_eq!(acked[&0], 200);
        assert!(snaps.is_empty());
        // Ahead of what was sent, or of a partition not streamed.
        assert_eq!(
            note_acked_seqnos(&parts, &mut acked, &mut snaps, [(0, 300), (1, 5)]),
            (false, true)
        );
    }
}
