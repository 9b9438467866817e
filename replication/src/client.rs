//! A blocking client for a tapkv node: data, online-update and admin commands.

use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::io::{FrameReader, FrameWriter};
use crate::message::{hello, opcode, status, store_extras};
use crate::protocol::{Frame, ProtocolError, BUSY_FRAME, DEFAULT_MAX_BODY, MAX_FRAME_BODY};
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, Ordering};

/// A failed request: the node's status and message, or a transport error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The node answered with an error status.
    #[error("{message}")]
    Status {
        /// Status code (see [`crate::message::status`]).
        status: u16,
        /// The node's message (`kind: text`).
        message: String,
    },
    /// Transport or framing error.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The node's reply did not have the shape this client reads (for
    /// example a JSON body that does not parse, or a dump row without one
    /// of its fields).
    #[error("malformed {what} reply: {detail}")]
    Malformed {
        /// Which reply.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
}

/// A reply's JSON body, parsed; `what` names the reply in the error.
fn json_body<T: serde::de::DeserializeOwned>(
    r: &Frame,
    what: &'static str,
) -> Result<T, ClientError> {
    serde_json::from_slice(&r.value).map_err(|e| ClientError::Malformed {
        what,
        detail: e.to_string(),
    })
}

impl ClientError {
    /// Whether the node said the key does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Status { status: s, .. } if *s == status::KEY_NOT_FOUND)
    }
}

/// What a write returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteReply {
    /// Partition of the key.
    pub partition: u16,
    /// Seqno assigned.
    pub seqno: u64,
    /// New CAS.
    pub cas: u64,
}

/// One persisted item as a dump reports it (a node's `ADMIN dump`, and
/// `tapkv admin dump --json`), comparable across nodes (ordered by
/// partition, then key). Every field is required.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DumpRow {
    /// Partition.
    pub partition: u64,
    /// Key, escaped as `crate::text` writes it.
    pub key: String,
    /// By-seqno.
    pub seqno: u64,
    /// CAS.
    pub cas: u64,
    /// Value length in bytes.
    pub value_len: u64,
    /// A tombstone.
    pub deleted: bool,
    /// Client flags.
    pub flags: u32,
    /// Expiry (0: none).
    pub expiry: u32,
    /// Revision seqno.
    pub rev_seqno: u64,
}

impl DumpRow {
    /// The row of a persisted item (its key escaped as `crate::text` does).
    pub fn of(item: &tapkv_engine::DiskItem) -> DumpRow {
        let r = &item.record;
        DumpRow {
            partition: u64::from(item.partition),
            key: crate::text::escape(&item.key),
            seqno: r.meta.by_seqno,
            cas: r.meta.cas,
            value_len: r.value.len() as u64,
            deleted: r.deleted,
            flags: r.meta.flags,
            expiry: r.meta.expiry,
            rev_seqno: r.meta.rev_seqno,
        }
    }
}

/// How long one read of a client's connection waits before the client
/// looks at its reply deadline again.
const CLIENT_POLL: Duration = Duration::from_millis(100);

/// How much larger than the node's request limit (`max_body`, from its
/// HELLO) a reply may be: a GET reply's flags, and room to spare. (A value
/// stored under an earlier, larger limit of the node's can still be over
/// it.)
const REPLY_HEADROOM: usize = 64 << 10;

/// A connection to a node.
pub struct Client {
    reader: FrameReader,
    writer: FrameWriter,
    partitions: u16,
    role: String,
    /// The node's largest accepted frame body (from its HELLO reply).
    max_body: usize,
    opaque: u32,
    timeout: Duration,
    last_request: Instant,
    /// A request failed on the connection itself (closed, reset, no answer
    /// in time): the connection is not to be used again.
    broken: bool,
}

fn u64_at(b: &Bytes, i: usize) -> u64 {
    b.get(i * 8..i * 8 + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

impl Client {
    /// Connects to `addr` and performs the version handshake; every reply is
    /// waited for at most `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Client, ClientError> {
        use std::net::ToSocketAddrs;
        let mut last = None;
        let mut conn = None;
        for a in addr.to_socket_addrs().map_err(ProtocolError::Io)? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    conn = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let conn = conn.ok_or_else(|| {
            ProtocolError::Io(last.unwrap_or_else(|| std::io::Error::other("no address")))
        })?;
        conn.set_nodelay(true).map_err(ProtocolError::Io)?;
        conn.set_write_timeout(Some(timeout))
            .map_err(ProtocolError::Io)?;
        let mut reader = FrameReader::new(
            conn.try_clone().map_err(ProtocolError::Io)?,
            DEFAULT_MAX_BODY,
        );
        reader.set_timeout(CLIENT_POLL).map_err(ProtocolError::Io)?;
        // A reply still arriving does not keep a poll (and so `reply`, which
        // looks at its deadline between polls) past the client's timeout:
        // a node trickling a large reply held a client for as long as it
        // kept sending.
        reader.set_poll_bound(Some(CLIENT_POLL));
        let mut c = Client {
            reader,
            writer: FrameWriter::new(conn),
            partitions: 0,
            role: String::new(),
            max_body: DEFAULT_MAX_BODY,
            opaque: 0,
            timeout,
            last_request: Instant::now(),
            broken: false,
        };
        let r = c.call(hello("tapkv-client"))?;
        let info: serde_json::Value = json_body(&r, "hello")?;
        c.partitions = info["partitions"].as_u64().unwrap_or(0) as u16;
        c.role = info["role"].as_str().unwrap_or("").to_owned();
        if let Some(m) = info["max_body"].as_u64() {
            // At most what any node takes: a node's word is not a reason
            // to accept replies of any size.
            c.max_body = usize::try_from(m).map_or(MAX_FRAME_BODY, |m| m.min(MAX_FRAME_BODY));
            // Replies as large as what the node takes, and a little more
            // (a GET reply's flags): before, the reader kept the default
            // limit, so a value a node configured above it took was stored
            // and could not be read back.
            c.reader.set_max_body(
                c.max_body
                    .saturating_add(REPLY_HEADROOM)
                    .max(DEFAULT_MAX_BODY),
            );
        }
        Ok(c)
    }

    /// Number of partitions of the node.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The largest frame body the node takes (its `--max-body`, from its
    /// HELLO).
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// `primary` or `replica`.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Changes how long each later reply is waited for (the `timeout` given
    /// to [`connect`](Self::connect); socket writes keep that one).
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends a request and waits for its response; error statuses become
    /// [`ClientError::Status`].
    pub fn call(&mut self, req: Frame) -> Result<Frame, ClientError> {
        let reply = self.send_request(req).and_then(|()| self.reply());
        match &reply {
            Err(ClientError::Protocol(_)) => self.broken = true,
            // A large frame the node refused as it arrived (its budget for
            // partly received large frames is taken): the node closes the
            // connection after this answer. (Told by its words: an engine's
            // refusal for memory, also TEMP_FAILURE, leaves it open.)
            Err(ClientError::Status { status, message })
                if *status == status::TEMP_FAILURE && message.contains(BUSY_FRAME) =>
            {
                self.broken = true
            }
            _ => {}
        }
        // Idle from the end of the request, answered or not: a heartbeat
        // right after a request that waited its whole timeout would only
        // wait as long again.
        self.last_request = Instant::now();
        reply
    }

    /// Sends `req` under the next opaque, which its replies echo. A request
    /// the node could only refuse by closing the connection (a key longer
    /// than the header's 16-bit length, a body over the node's limit) is
    /// refused here instead, unsent, and the connection stays usable.
    fn send_request(&mut self, mut req: Frame) -> Result<(), ClientError> {
        let body = req.extras.len() + req.key.len() + req.value.len();
        if req.key.len() > usize::from(u16::MAX) {
            return Err(ClientError::Status {
                status: status::INVALID_ARGUMENTS,
                message: format!(
                    "key_too_large: key of {} bytes cannot be framed (at most {}); not sent",
                    req.key.len(),
                    u16::MAX
                ),
            });
        }
        if body > self.max_body {
            return Err(ClientError::Status {
                status: status::VALUE_TOO_LARGE,
                message: format!(
                    "value_too_large: request body of {body} bytes is over the node's limit of {} bytes; not sent",
                    self.max_body
                ),
            });
        }
        // Opaque 0 is left to the node's answers about the connection itself.
        self.opaque = self.opaque.wrapping_add(1).max(1);
        req.opaque = self.opaque;
        self.last_request = Instant::now();
        self.writer.send(&req)?;
        Ok(())
    }

    /// The next reply to the request in flight, waiting at most the
    /// client's timeout. Replies are matched by opaque: those of an earlier
    /// request that timed out (it may still be answered later, say a
    /// `Replicate` write, a `FLUSH` or the rest of a dump) are skipped
    /// rather than taken as this request's answer.
    fn reply(&mut self) -> Result<Frame, ClientError> {
        // A timeout too long for the clock (`Duration::MAX`, meant as
        // "never") waits without a deadline; adding it panicked.
        let deadline = Instant::now().checked_add(self.timeout);
        loop {
            match self.reader.poll()? {
                Some(r) if r.opaque == self.opaque => {
                    if r.status() != status::SUCCESS {
                        return Err(ClientError::Status {
                            status: r.status(),
                            message: String::from_utf8_lossy(&r.value).into_owned(),
                        });
                    }
                    return Ok(r);
                }
                // The node's answer about the connection itself (too many
                // connections, a malformed frame): it closes next.
                Some(r) if r.opaque == 0 && r.status() != status::SUCCESS => {
                    self.broken = true;
                    return Err(ClientError::Status {
                        status: r.status(),
                        message: String::from_utf8_lossy(&r.value).into_owned(),
                    });
                }
                // Nothing yet, or a late reply to an earlier request.
                _ => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ProtocolError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no reply within {:?}", self.timeout),
                ))
                .into());
            }
        }
    }

    /// Sends a NOOP and waits for its answer (a heartbeat).
    pub fn noop(&mut self) -> Result<(), ClientError> {
        self.call(Frame::request(opcode::NOOP, 0)).map(|_| ())
    }

    /// Whether a request failed on the connection itself (it closed or
    /// reset, or gave no answer in time): open a new client.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Time since the last request ended (was answered or gave up).
    pub fn idle_for(&self) -> Duration {
        self.last_request.elapsed()
    }

    /// The partition `key` belongs to.
    pub fn partition_of(&self, key: &[u8]) -> u16 {
        tapkv_engine::partition_of(key, self.partitions)
    }

    /// GET: value and CAS.
    pub fn get(&mut self, key: &[u8]) -> Result<(Bytes, u64), ClientError> {
        let r =
            self.call(Frame::request(opcode::GET, self.partition_of(key)).with_key(key.to_vec()))?;
        Ok((r.value, r.cas))
    }

    fn store(
        &mut self,
        op: u8,
        key: &[u8],
        value: &[u8],
        cas: u64,
        durability: tapkv_engine::Durability,
    ) -> Result<WriteReply, ClientError> {
        let f = Frame::request(op, self.partition_of(key))
            .with_extras(store_extras(0, 0))
            .with_key(key.to_vec())
            .with_value(value.to_vec())
            .with_cas(cas);
        self.write(f, durability)
    }

    /// Sends a key write with `durability` in its datatype bits; its reply's
    /// partition, seqno and CAS.
    fn write(
        &mut self,
        mut f: Frame,
        durability: tapkv_engine::Durability,
    ) -> Result<WriteReply, ClientError> {
        let partition = f.vbucket_or_status;
        f.datatype |= crate::message::durability_bits(durability);
        let r = self.call(f)?;
        Ok(WriteReply {
            partition,
            seqno: u64_at(&r.extras, 0),
            cas: r.cas,
        })
    }

    /// SET (`cas` 0 = unconditional; `persist` waits for the disk).
    pub fn set(
        &mut self,
        key: &[u8],
        value: &[u8],
        cas: u64,
        persist: bool,
    ) -> Result<WriteReply, ClientError> {
        let d = if persist {
            tapkv_engine::Durability::Persist
        } else {
            tapkv_engine::Durability::Memory
        };
        self.store(opcode::SET, key, value, cas, d)
    }

    /// SET with any durability (`Replicate` waits for a majority of replicas).
    pub fn set_durable(
        &mut self,
        key: &[u8],
        value: &[u8],
        cas: u64,
        durability: tapkv_engine::Durability,
    ) -> Result<WriteReply, ClientError> {
        self.store(opcode::SET, key, value, cas, durability)
    }

    /// ADD.
    pub fn add(&mut self, key: &[u8], value: &[u8]) -> Result<WriteReply, ClientError> {
        self.store(opcode::ADD, key, value, 0, tapkv_engine::Durability::Memory)
    }

    /// REPLACE.
    pub fn replace(&mut self, key: &[u8], value: &[u8]) -> Result<WriteReply, ClientError> {
        self.store(
            opcode::REPLACE,
            key,
            value,
            0,
            tapkv_engine::Durability::Memory,
        )
    }

    /// DELETE (memory durability).
    pub fn delete(&mut self, key: &[u8]) -> Result<WriteReply, ClientError> {
        self.delete_durable(key, tapkv_engine::Durability::Memory)
    }

    /// DELETE with any durability (`Persist` returns once the deletion is on
    /// disk, `Replicate` once a majority of replicas hold it).
    pub fn delete_durable(
        &mut self,
        key: &[u8],
        durability: tapkv_engine::Durability,
    ) -> Result<WriteReply, ClientError> {
        let f = Frame::request(opcode::DELETE, self.partition_of(key)).with_key(key.to_vec());
        self.write(f, durability)
    }

    /// Online update START on partition `p`: the window's checkpoint id.
    pub fn update_start(&mut self, p: u16) -> Result<u64, ClientError> {
        Ok(u64_at(
            &self.call(Frame::request(opcode::UPDATE_START, p))?.extras,
            0,
        ))
    }

    /// Online update COMPLETE: the window's checkpoint id.
    pub fn update_complete(&mut self, p: u16) -> Result<u64, ClientError> {
        Ok(u64_at(
            &self
                .call(Frame::request(opcode::UPDATE_COMPLETE, p))?
                .extras,
            0,
        ))
    }

    /// Online update REVERT: (checkpoint id, removed, restored).
    pub fn update_revert(&mut self, p: u16) -> Result<(u64, u64, u64), ClientError> {
        let e = self.call(Frame::request(opcode::UPDATE_REVERT, p))?.extras;
        Ok((u64_at(&e, 0), u64_at(&e, 1), u64_at(&e, 2)))
    }

    /// Waits until everything written so far is persisted.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.call(Frame::request(opcode::FLUSH, 0)).map(|_| ())
    }

    /// Evicts a key's value.
    pub fn evict(&mut self, key: &[u8]) -> Result<(), ClientError> {
        let p = self.partition_of(key);
        self.call(Frame::request(opcode::EVICT, p).with_key(key.to_vec()))
            .map(|_| ())
    }

    /// Closes partition `p`'s open checkpoint; the new id.
    pub fn checkpoint(&mut self, p: u16) -> Result<u64, ClientError> {
        Ok(u64_at(
            &self.call(Frame::request(opcode::CHECKPOINT, p))?.extras,
            0,
        ))
    }

    /// `checkpoints` or `cursors` of partition `p`, as JSON.
    pub fn partition_info(&mut self, p: u16, what: &str) -> Result<serde_json::Value, ClientError> {
        let r = self
            .call(Frame::request(opcode::PARTITION_INFO, p).with_key(what.as_bytes().to_vec()))?;
        json_body(&r, "partition info")
    }

    /// Node statistics, as JSON.
    pub fn stats(&mut self) -> Result<serde_json::Value, ClientError> {
        let r = self.call(Frame::request(opcode::STAT, 0))?;
        json_body(&r, "stat")
    }

    /// `inspect` or `streams`, as JSON.
    pub fn admin(&mut self, what: &str) -> Result<serde_json::Value, ClientError> {
        let r = self.call(Frame::request(opcode::ADMIN, 0).with_key(what.as_bytes().to_vec()))?;
        json_body(&r, "admin")
    }

    /// Every persisted item of the node, one JSON object each, until `row`
    /// returns `false` (a reader that went away: the rest is not read, and
    /// the connection, which still holds it, counts as broken; the node's
    /// dump ends when the connection closes). A row that is not JSON ends
    /// the dump with `Malformed` (the rest of the dump is still read, so
    /// the connection stays usable).
    pub fn dump(
        &mut self,
        mut row: impl FnMut(serde_json::Value) -> bool,
    ) -> Result<(), ClientError> {
        let mut stopped = false;
        let mut rows = || -> Result<(), ClientError> {
            self.send_request(Frame::request(opcode::ADMIN, 0).with_key(b"dump".to_vec()))?;
            let mut bad = None;
            loop {
                let r = self.reply()?;
                if &r.key[..] == b"end" {
                    return bad.map_or(Ok(()), Err);
                }
                match json_body(&r, "dump row") {
                    Ok(v) if bad.is_none() => {
                        if !row(v) {
                            stopped = true;
                            return Ok(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => bad = bad.or(Some(e)),
                }
            }
        };
        let result = rows();
        if stopped || matches!(result, Err(ClientError::Protocol(_))) {
            self.broken = true;
        }
        result
    }

    /// Flushes the node, then returns its persisted items as sorted rows.
    /// A row missing any field is `Malformed`, so two dumps never compare
    /// equal only because both lost a field.
    pub fn dump_rows(&mut self) -> Result<Vec<DumpRow>, ClientError> {
        self.flush()?;
        let mut rows = Vec::new();
        let mut bad = None;
        self.dump(|r| {
            match serde_json::from_value::<DumpRow>(r) {
                Ok(row) => rows.push(row),
                Err(e) => {
                    bad.get_or_insert(ClientError::Malformed {
                        what: "dump row",
                        detail: e.to_string(),
                    });
                }
            }
            true
        })?;
        if let Some(e) = bad {
            return Err(e);
        }
        rows.sort();
        Ok(rows)
    }
}

/// A [`Client`] kept alive while idle: a background thread sends a NOOP
/// whenever `every` has passed without a request, so a node's idle timeout
/// (default 300 s) never closes a connection a person or script still holds
/// (an interactive `tapkv shell --addr`). The node answers NOOPs; it never
/// sends unsolicited frames to a client, as in the memcached protocol.
/// Dropping it stops the thread (within one interval).
pub struct KeptAlive {
    shared: Arc<KeepAliveShared>,
    thread: Option<JoinHandle<()>>,
}

struct KeepAliveShared {
    client: Mutex<Client>,
    stop: Mutex<bool>,
    wake: Condvar,
    heartbeats: AtomicU64,
}

/// How long a keep-alive waits before it looks again: until `every` has
/// passed since the last request (at least 10 ms).
fn heartbeat_wait(every: Duration, idle: Duration) -> Duration {
    every.saturating_sub(idle).max(Duration::from_millis(10))
}

impl KeptAlive {
    /// Wraps `client`, sending a heartbeat after every `every` of idleness.
    pub fn new(client: Client, every: Duration) -> Result<KeptAlive, ClientError> {
        let every = every.max(Duration::from_millis(10));
        let shared = Arc::new(KeepAliveShared {
            client: Mutex::new(client),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            heartbeats: AtomicU64::new(0),
        });
        let bg = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tapkv-keepalive".into())
            .spawn(move || loop {
                // Until `every` after the last request, not a whole `every`
                // from now: a fixed wait let up to twice the interval pass
                // without a request or a heartbeat.
                let wait = heartbeat_wait(every, bg.client.lock().idle_for());
                {
                    let mut stop = bg.stop.lock();
                    if !*stop {
                        bg.wake.wait_for(&mut stop, wait);
                    }
                    if *stop {
                        return;
                    }
                }
                let mut c = bg.client.lock();
                if c.idle_for() >= every {
                    if let Err(e) = c.noop() {
                        // The next real request reports the broken connection.
                        tracing::debug!(error = %e, "keep-alive NOOP failed; heartbeats stop");
                        return;
                    }
                    bg.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(ProtocolError::Io)?;
        Ok(KeptAlive {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `f` with the client (heartbeats wait meanwhile).
    pub fn with<R>(&self, f: impl FnOnce(&mut Client) -> R) -> R {
        f(&mut self.shared.client.lock())
    }

    /// Heartbeats sent so far.
    pub fn heartbeats(&self) -> u64 {
        self.shared.heartbeats.load(Ordering::Relaxed)
    }
}

impl Drop for KeptAlive {
    fn drop(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heartbeat goes out `every` after the last request, not up to twice
    /// that: the wait is what is left of the interval.
    #[test]
    fn a_keep_alive_waits_only_for_what_is_left_of_the_interval() {
        let every = Duration::from_millis(800);
        assert_eq!(
            heartbeat_wait(every, Duration::from_millis(700)),
            Duration::from_millis(100)
        );
        assert_eq!(heartbeat_wait(every, Duration::ZERO), every);
        assert_eq!(
            heartbeat_wait(every, Duration::from_secs(5)),
            Duration::from_millis(10)
        );
    }
}
