//! Frame I/O over a `TcpStream` with timeouts: a reader that never loses a
//! partly received frame when a read times out, and a buffered writer.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::sync::{Arc, AtomicBool, AtomicUsize, Ordering};

use bytes::BytesMut;

use crate::protocol::{decode, decode_ref, Frame, FrameRef, ProtocolError, HEADER_LEN};

/// Reads frames; a read timeout returns `Ok(None)` and keeps partial data.
pub struct FrameReader {
    stream: TcpStream,
    buf: BytesMut,
    max_body: usize,
    /// The last read returned less than it asked for: the connection held
    /// nothing more at that moment.
    drained: bool,
    /// Longest time a partial frame may go without `FRAME_PROGRESS` more
    /// bytes arriving (`None`: no limit).
    frame_deadline: Option<Duration>,
    /// Since when, and from which buffered length, the partial frame in
    /// `buf` is timed.
    partial_since: Option<(Instant, usize)>,
    /// When the last `poll` returned leaving a partial frame timed (`None`
    /// otherwise): time until the next one is the reader's own (busy
    /// elsewhere), not the peer's, and does not count against the frame
    /// deadline.
    away_since: Option<Instant>,
    /// The budget large partial frames are held against (see
    /// [`ByteBudget`]), and what this reader holds of it.
    budget: Option<(Arc<ByteBudget>, usize)>,
    /// Bytes arrived since [`take_progress`](FrameReader::take_progress)
    /// last looked.
    progressed: bool,
    /// Longest a poll goes on reading a frame that keeps arriving (`None`:
    /// until it is whole); see [`set_poll_bound`](FrameReader::set_poll_bound).
    poll_bound: Option<Duration>,
}

/// Bytes that large frames may hold across every connection of a node
/// together, one budget for frames being received and one for replies
/// being sent. A frame being received larger than [`ByteBudget::LARGE`]
/// takes its length from the budget once its header has arrived, and gives
/// it back once it is whole (or its connection ends); one that does not
/// fit is refused with [`ProtocolError::Busy`]. A reply that large takes
/// its length when it is queued and gives it back once its flush ends
/// ([`FrameWriter::push_budgeted`]). So many connections each sending,
/// or slowly reading, a maximum-size frame cannot exhaust the node's
/// memory.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ByteBudget {
    /// Frames up to this size are not counted (a connection holds at most
    /// one partial frame, so they are bounded by the connection limit).
    pub const LARGE: usize = 1 << 20;

    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The most it lets frames hold together.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `n` bytes if they fit, or if nothing else holds any: a reply
    /// larger than the whole budget (a value stored under larger limits, or
    /// a primary's larger value on a replica) is sent alone rather than
    /// refused for good. (No received frame is: a node's budgets are at
    /// least its `max_body` and a header.)
    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit || u == 0)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Gives back what a reader or writer holds of its budget, if any.
    /// Nearly every frame is small and held nothing: no atomic operation
    /// for those (a per-frame one was about 4% of a replica's link thread).
    fn give_back(held: &mut Option<(Arc<ByteBudget>, usize)>) {
        if let Some((b, held)) = held {
            if *held > 0 {
                b.give(std::mem::take(held));
            }
        }
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.release();
    }
}

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// A writer's buffer to start with.
const WRITE_BUFFER: usize = 64 * 1024;

/// Largest buffer a connection keeps between frames (reader) or flushes
/// (writer); one larger, left by a large frame, is let go.
const KEEP_BUFFER: usize = ByteBudget::LARGE;

/// Progress a partial frame must make per frame deadline.
const FRAME_PROGRESS: usize = 64 * 1024;

impl FrameReader {
    /// Raises or lowers the largest body accepted from now on.
    pub fn set_max_body(&mut self, max_body: usize) {
        self.max_body = max_body;
    }

    /// Wraps `stream` (its read timeout decides how long `next` blocks).
    pub fn new(stream: TcpStream, max_body: usize) -> FrameReader {
        FrameReader {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_body,
            drained: false,
            frame_deadline: None,
            partial_since: None,
            away_since: None,
            budget: None,
            progressed: false,
            poll_bound: None,
        }
    }

    /// Whether any bytes arrived since the last call: a connection slowly
    /// receiving a large frame is not idle.
    pub fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progressed)
    }

    /// Holds large partial frames against `budget` from now on.
    pub fn set_body_budget(&mut self, budget: Arc<ByteBudget>) {
        self.release();
        self.budget = Some((budget, 0));
    }

    /// Gives back what the frame just taken from the buffer held.
    fn release(&mut self) {
        ByteBudget::give_back(&mut self.budget);
    }

    /// Takes the length of the large frame at the front of the buffer from
    /// the budget, once per frame; `Busy` if it does not fit.
    fn hold_large_frame(&mut self) -> Result<(), ProtocolError> {
        let Some((budget, held)) = &mut self.budget else {
            return Ok(());
        };
        let Some(len) = crate::protocol::frame_len(&self.buf) else {
            return Ok(());
        };
        if *held > 0 || len <= ByteBudget::LARGE || len > self.max_body.saturating_add(HEADER_LEN) {
            return Ok(());
        }
        if !budget.try_take(len) {
            return Err(ProtocolError::Busy {
                len,
                limit: budget.limit,
            });
        }
        *held = len;
        Ok(())
    }

    /// Limits how long a partial frame may go without progress: its first
    /// `FRAME_PROGRESS` bytes (the whole of a small frame), and every
    /// `FRAME_PROGRESS` bytes after them, must arrive within `limit`, or
    /// `poll` fails with a timeout. A peer trickling a frame a byte at a
    /// time cannot hold the connection (nor keep `poll` from returning),
    /// while a large frame over a slow link (at least 64 KiB per `limit`)
    /// is not cut off.
    pub fn set_frame_deadline(&mut self, limit: Option<Duration>) {
        self.frame_deadline = limit;
    }

    /// Makes a poll return (`Ok(None)`, with [`take_progress`]
    /// (FrameReader::take_progress) true) once it has read for `limit`
    /// without completing a frame, instead of reading on while the frame
    /// keeps arriving: a caller that polls in a loop looks at its stop flag
    /// between polls, and a peer sending a large frame just fast enough
    /// for the frame deadline held a node's stop for as long as the frame
    /// took (about 55 minutes for a 21 MiB frame at 64 KiB per 10 s).
    pub fn set_poll_bound(&mut self, limit: Option<Duration>) {
        self.poll_bound = limit;
    }

    /// Moves the partial frame's clock past the time since the last poll
    /// returned (the reader was busy elsewhere, not waiting for the peer).
    fn back(&mut self) {
        if let (Some(left), Some((since, mark))) = (self.away_since.take(), self.partial_since) {
            self.partial_since = Some((since + left.elapsed(), mark));
        }
    }

    /// Marks the reader away from now (a poll returning `out`), when a
    /// partial frame is being timed: otherwise `back` has nothing to move,
    /// and a reader handed a whole frame (nearly every poll of a busy
    /// stream) reads no clock. (It read one on every poll: about 5% of a
    /// replica's link thread.)
    fn away<T>(&mut self, out: T) -> T {
        self.away_since = self.partial_since.map(|_| Instant::now());
        out
    }

    /// Fails once the partial frame in the buffer has gone longer than the
    /// frame deadline without progress.
    fn check_partial(&mut self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            self.partial_since = None;
            return Ok(());
        }
        let len = self.buf.len();
        let (since, mark) = match self.partial_since {
            Some((since, mark)) if len < mark + FRAME_PROGRESS => (since, mark),
            _ => (Instant::now(), len),
        };
        self.partial_since = Some((since, mark));
        match self.frame_deadline {
            Some(limit) if since.elapsed() > limit => Err(ProtocolError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("a frame made no progress ({FRAME_PROGRESS} bytes) within {limit:?}"),
            ))),
            _ => Ok(()),
        }
    }

    /// Sets how long one `next` call may wait for data.
    pub fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(t))
    }

    /// Polls for the next frame; `Ok(None)` if none arrived within the read timeout;
    /// `Err(Closed)` when the peer closed at a frame boundary.
    pub fn poll(&mut self) -> Result<Option<Frame>, ProtocolError> {
        self.back();
        let out = self.poll_here();
        self.away(out)
    }

    fn poll_here(&mut self) -> Result<Option<Frame>, ProtocolError> {
        // Read only once a fill is needed (never for a buffered frame).
        let mut reading_since: Option<Instant> = None;
        loop {
            if let Some(f) = decode(&mut self.buf, self.max_body)? {
                self.partial_since = None;
                self.release();
                return Ok(Some(f));
            }
            if !self.read_more(&mut reading_since)? {
                return Ok(None);
            }
        }
    }

    /// Like [`poll`](Self::poll), but hands the frame to `f` borrowed from
    /// the read buffer (no allocation or reference count per frame) and
    /// returns what `f` returns.
    pub fn poll_map<R>(
        &mut self,
        f: impl FnOnce(FrameRef<'_>) -> R,
    ) -> Result<Option<R>, ProtocolError> {
        self.back();
        let out = self.poll_map_here(f);
        self.away(out)
    }

    fn poll_map_here<R>(
        &mut self,
        f: impl FnOnce(FrameRef<'_>) -> R,
    ) -> Result<Option<R>, ProtocolError> {
        // Read only once a fill is needed (never for a buffered frame).
        let mut reading_since: Option<Instant> = None;
        loop {
            if let Some((frame, len)) = decode_ref(&self.buf, self.max_body)? {
                let r = f(frame);
                bytes::Buf::advance(&mut self.buf, len);
                self.partial_since = None;
                self.release();
                return Ok(Some(r));
            }
            if !self.read_more(&mut reading_since)? {
                return Ok(None);
            }
        }
    }

    /// Whether everything received so far has been handed out: no whole
    /// frame is buffered and the last read found the connection empty (a
    /// reader that applies what it receives acknowledges then).
    pub fn caught_up(&self) -> bool {
        self.drained && !self.has_frame()
    }

    /// The opcode and opaque of the frame at the front of the buffer, if its
    /// header has arrived (whether or not the header is valid): an error
    /// answer to a malformed frame carries them, so a pipelining client can
    /// tell which request it answers.
    pub fn pending_header(&self) -> Option<(u8, u32)> {
        let h = self.buf.get(..crate::protocol::HEADER_LEN)?;
        Some((h[1], u32::from_be_bytes([h[12], h[13], h[14], h[15]])))
    }

    /// Whether a whole frame is buffered (the next `poll` returns without
    /// reading): a server answering pipelined requests sends its replies
    /// together once this turns false.
    pub fn has_frame(&self) -> bool {
        crate::protocol::frame_len(&self.buf).is_some_and(|n| self.buf.len() >= n)
    }

    /// A poll's step when no whole frame is buffered: checks the partial
    /// frame's deadline and budget, then reads more; `Ok(false)` when the
    /// poll should return without a frame (a read timeout, or the poll
    /// bound passed since the poll's first read, `reading_since`).
    fn read_more(&mut self, reading_since: &mut Option<Instant>) -> Result<bool, ProtocolError> {
        self.check_partial()?;
        self.hold_large_frame()?;
        if let (Some(limit), Some(t)) = (self.poll_bound, *reading_since) {
            if t.elapsed() >= limit {
                return Ok(false);
            }
        }
        if !self.fill()? {
            return Ok(false);
        }
        if self.poll_bound.is_some() && reading_since.is_none() {
            *reading_since = Some(Instant::now());
        }
        Ok(true)
    }

    /// Reads more bytes into the buffer; `Ok(false)` on a read timeout.
    ///
    /// The socket's bytes land straight in the buffer's spare capacity (see
    /// [`recv_into_spare`]): no zeroed chunk to fill and copy from, which
    /// cost a replica's link about a fifth of its receive path (the
    /// `receiver` benchmark, `docs/performance.md`).
    fn fill(&mut self) -> Result<bool, ProtocolError> {
        // Room the next read needs: the rest of a frame whose header is in
        // (nothing more is needed to finish it), else one read's worth.
        let rest_of_frame = crate::protocol::frame_len(&self.buf)
            .filter(|len| *len <= self.max_body.saturating_add(HEADER_LEN))
            .map_or(0, |len| len.saturating_sub(self.buf.len()));
        let want = if rest_of_frame > 0 {
            rest_of_frame
        } else {
            READ_CHUNK
        };
        // What a new buffer gets: that, and one read's worth past it, so
        // the read that finishes a frame can take what follows (and
        // `drained` tells whether anything did).
        let sized = want + READ_CHUNK;
        let spare = |b: &BytesMut| b.capacity() - b.len();
        // Room from the buffer's own allocation if it has it (moving the
        // unread bytes to its front; a full read's worth if it can), else a
        // new one of exactly `sized` more: `reserve` would grow it by
        // doubling, to up to twice a large frame, and asking for a full
        // read's worth while a large frame's last bytes arrive (before)
        // copied the whole frame into a new buffer at every read.
        let room = want.max(READ_CHUNK);
        if spare(&self.buf) < room {
            // Cheap when it works: it moves only what is unread, and only
            // when that is no more than what was read before it.
            let _ = self.buf.try_reclaim(room);
        }
        if spare(&self.buf) < want {
            self.rebuffer(sized);
        }
        if spare(&self.buf) > sized.max(KEEP_BUFFER) {
            // The allocation of a large frame handed out earlier, taken
            // back by `try_reclaim`: a connection would keep it for life (a
            // thousand connections that each sent one 20 MiB frame held
            // 20 GiB). A buffer of the size needed now instead.
            self.rebuffer(sized);
        }
        loop {
            match recv_into_spare(&self.stream, &mut self.buf, sized) {
                Ok((0, _)) if self.buf.is_empty() => return Err(ProtocolError::Closed),
                Ok((0, _)) => {
                    return Err(ProtocolError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed inside a frame",
                    )))
                }
                Ok((n, asked)) => {
                    self.drained = n < asked;
                    self.progressed = true;
                    return Ok(true);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(false)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtocolError::Io(e)),
            }
        }
    }

    /// Moves the unread bytes into a new buffer with `room` bytes to spare.
    fn rebuffer(&mut self, room: usize) {
        let mut fresh = BytesMut::with_capacity(self.buf.len() + room);
        fresh.extend_from_slice(&self.buf);
        self.buf = fresh;
    }

    /// The next frame, waiting at most `attempts` read timeouts.
    pub fn next_within(&mut self, attempts: usize) -> Result<Frame, ProtocolError> {
        self.next_within_unless(attempts, &AtomicBool::new(false))
    }

    /// [`next_within`](Self::next_within) that gives up (`Interrupted`) once
    /// `stop` is set, looked at between read timeouts.
    pub fn next_within_unless(
        &mut self,
        attempts: usize,
        stop: &AtomicBool,
    ) -> Result<Frame, ProtocolError> {
        let mut waited = 0;
        while waited < attempts.max(1) {
            if stop.load(Ordering::Acquire) {
                return Err(ProtocolError::Io(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "stopping",
                )));
            }
            if let Some(f) = self.poll()? {
                return Ok(f);
            }
            // A poll that returned with a frame still arriving (see
            // `set_poll_bound`) waited for nothing: not an attempt.
            if !self.take_progress() {
                waited += 1;
            }
        }
        Err(ProtocolError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no frame within the timeout",
        )))
    }
}

/// A flush's failure for a peer taking less than `FRAME_PROGRESS` bytes per
/// `limit` (it took `moved` bytes in `took`).
fn too_slow(limit: Duration, moved: usize, took: Duration) -> ProtocolError {
    ProtocolError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the peer took less than {FRAME_PROGRESS} bytes of a reply per {limit:?} \
             ({moved} bytes in {took:?})"
        ),
    ))
}

/// Whether a writer whose peer has not read for a write timeout should keep
/// waiting, given how long the flush has moved nothing (see
/// [`FrameWriter::set_patience`]).
pub type Patience = Box<dyn FnMut(Duration) -> bool + Send>;

/// Writes frames through a buffer; `flush` sends them.
pub struct FrameWriter {
    stream: TcpStream,
    buf: BytesMut,
    patience: Option<Patience>,
    /// A flush failed part-way: the peer may hold part of a frame, so
    /// nothing more may be sent on this connection.
    broken: bool,
    /// A flush must move `FRAME_PROGRESS` bytes per this long, or fails
    /// (`None`: only each write's own timeout applies).
    progress_deadline: Option<Duration>,
    /// The node's budget for large replies, and what the frames queued
    /// here hold of it until the next flush ends.
    budget: Option<(Arc<ByteBudget>, usize)>,
}

impl Drop for FrameWriter {
    fn drop(&mut self) {
        self.release();
    }
}

impl FrameWriter {
    /// Wraps `stream` (its write timeout bounds every flush).
    pub fn new(stream: TcpStream) -> FrameWriter {
        FrameWriter {
            stream,
            buf: BytesMut::with_capacity(WRITE_BUFFER),
            patience: None,
            broken: false,
            progress_deadline: None,
            budget: None,
        }
    }

    /// Holds queued replies larger than [`ByteBudget::LARGE`] against
    /// `budget` from now on ([`push_budgeted`](Self::push_budgeted)).
    pub fn set_reply_budget(&mut self, budget: Arc<ByteBudget>) {
        self.release();
        self.budget = Some((budget, 0));
    }

    /// Queues a frame as [`push`](Self::push) does, but one larger than
    /// [`ByteBudget::LARGE`] first takes its length from the reply budget
    /// (if one is set), until the flush that sends it ends: `None`, and
    /// nothing queued, when it does not fit (one larger than the whole
    /// budget fits when nothing else holds any). A GET's reply copies its value
    /// into this buffer, and a client that reads it slowly holds that copy
    /// for as long as the progress deadline allows: without a budget, a
    /// thousand connections that each asked for a 20 MiB value and read
    /// nothing held 20 GB.
    pub fn push_budgeted(&mut self, f: &Frame) -> Option<usize> {
        let len = f.wire_len();
        if let Some((budget, held)) = &mut self.budget {
            if len > ByteBudget::LARGE {
                if !budget.try_take(len) {
                    return None;
                }
                *held += len;
            }
        }
        Some(self.push(f))
    }

    /// Gives back what the frames queued since the last flush held.
    fn release(&mut self) {
        ByteBudget::give_back(&mut self.budget);
    }

    /// The connection written to.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Limits how slowly a flush may go: the peer must take at least 64 KiB
    /// per `limit` (measured over spans of at least `limit`), else the
    /// flush fails with a timeout. The socket's write timeout bounds only
    /// a write that moves nothing; without this, a peer reading a byte
    /// every few seconds held a large reply (and the thread sending it, and
    /// a node's stop) for as long as it liked.
    pub fn set_progress_deadline(&mut self, limit: Option<Duration>) {
        self.progress_deadline = limit;
    }

    /// When a flush has waited a whole write timeout for the peer to read,
    /// it asks `keep_waiting` (with how long the flush has moved nothing)
    /// and waits another timeout if it says yes, instead of failing. A node
    /// gives its connections a short write timeout and a patience that
    /// looks at its stop flag, so a peer that stopped reading does not hold
    /// a stop for a whole I/O timeout; a replication stream also waits for
    /// a replica that applies a large snapshot without reading, as long as
    /// the replica keeps acknowledging its progress. Without it, a flush
    /// fails at the first timeout.
    pub fn set_patience(&mut self, keep_waiting: Patience) {
        self.patience = Some(keep_waiting);
    }

    /// Queues a frame; returns its size on the wire.
    pub fn push(&mut self, f: &Frame) -> usize {
        let before = self.buf.len();
        f.encode(&mut self.buf);
        self.buf.len() - before
    }

    /// Queues whatever `encode` appends (one or more whole frames); returns
    /// its size on the wire.
    pub fn push_encoded(&mut self, encode: impl FnOnce(&mut BytesMut)) -> usize {
        let before = self.buf.len();
        encode(&mut self.buf);
        self.buf.len() - before
    }

    /// Bytes queued and not yet sent.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Drops what was queued after the first `len` bytes still queued (a
    /// caller taking back frames it queued since [`pending`](Self::pending)
    /// returned `len`; nothing is flushed in between).
    pub fn truncate(&mut self, len: usize) {
        self.buf.truncate(len);
    }

    /// Sends everything queued. Once a flush has failed, every later one
    /// fails at once without sending anything (the peer may hold a torn
    /// frame: the connection must be closed, not written to again).
    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        if self.broken {
            self.buf.clear();
            self.release();
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "an earlier write on this connection failed",
            )
            .into());
        }
        let result = self.send_buffered();
        if result.is_err() {
            self.broken = true;
        }
        self.buf.clear();
        self.release();
        if self.buf.capacity() > KEEP_BUFFER {
            // A large reply (a 20 MiB value) is not held for the
            // connection's life.
            self.buf = BytesMut::with_capacity(WRITE_BUFFER);
        }
        result
    }

    fn send_buffered(&mut self) -> Result<(), ProtocolError> {
        let mut sent = 0;
        // Since when, and from which byte, the flush's progress is timed.
        let mut mark = self.progress_deadline.map(|_| (Instant::now(), 0));
        // When a byte last moved (for the patience rule).
        let mut moved = Instant::now();
        while sent < self.buf.len() {
            match self.stream.write(&self.buf[sent..]) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                Ok(n) => {
                    sent += n;
                    moved = Instant::now();
                    // Judged over spans of at least `limit` (one write may
                    // block up to the socket's write timeout): slower than
                    // 64 KiB per `limit` fails.
                    if let (Some(limit), Some((since, from))) = (self.progress_deadline, mark) {
                        let took = since.elapsed();
                        if took > limit && sent < self.buf.len() {
                            let rate = (sent - from) as f64 / took.as_secs_f64();
                            if rate < FRAME_PROGRESS as f64 / limit.as_secs_f64() {
                                return Err(too_slow(limit, sent - from, took));
                            }
                            mark = Some((Instant::now(), sent));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    let stalled = moved.elapsed();
                    if self.patience.as_mut().is_some_and(|keep| keep(stalled)) {
                        continue;
                    }
                    // Said as what it is rather than as the socket's
                    // "resource temporarily unavailable": with a progress
                    // deadline, the peer's rate was too low for it.
                    return Err(match (self.progress_deadline, mark) {
                        (Some(limit), Some((since, from))) => {
                            too_slow(limit, sent - from, since.elapsed())
                        }
                        _ => ProtocolError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("the peer read nothing for {stalled:?}"),
                        )),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Queues and sends one frame.
    pub fn send(&mut self, f: &Frame) -> Result<(), ProtocolError> {
        self.push(f);
        self.flush()
    }
}

/// Receives at most `at_most` bytes into `buf`'s spare capacity (which the
/// caller has reserved) and extends `buf` by what arrived: `(bytes
/// received, bytes asked for)`. A read timeout set on the socket applies
/// (`WouldBlock`).
fn recv_into_spare(
    stream: &TcpStream,
    buf: &mut BytesMut,
    at_most: usize,
) -> std::io::Result<(usize, usize)> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    let asked = spare.len().min(at_most);
    // SAFETY: `recv` writes at most `asked` bytes at `spare`'s start, which
    // is `buf`'s own allocation past its length, valid for `asked` bytes
    // and borrowed mutably here; the descriptor stays open while `stream`
    // is borrowed.
    #[allow(unsafe_code)]
    let n = unsafe { libc::recv(stream.as_raw_fd(), spare.as_mut_ptr().cast(), asked, 0) };
    let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    // SAFETY: the kernel initialised the first `n <= asked` bytes of the
    // spare capacity.
    #[allow(unsafe_code)]
    unsafe {
        buf.set_len(buf.len() + n.min(asked));
    }
    Ok((n, asked))
}
