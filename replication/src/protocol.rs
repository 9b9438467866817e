//! The wire protocol: frames in the style of the memcached binary protocol.
//!
//! Every frame is a 24-byte header followed by extras, key and value:
//!
//! ```text
//!  byte 0      magic (0x80 request, 0x81 response)
//!       1      opcode
//!       2..4   key length (u16, big-endian)
//!       4      extras length (u8)
//!       5      datatype (0 raw, 1 JSON)
//!       6..8   partition (request) / status (response) (u16)
//!       8..12  total body length = extras + key + value (u32)
//!      12..16  opaque (u32, echoed in the response)
//!      16..24  CAS (u64)
//! ```
//!
//! Reading validates the header before allocating anything: an unknown magic,
//! inconsistent lengths or a body above the configured maximum is an error,
//! never an allocation of the advertised size. Typed messages for each opcode
//! live in [`crate::message`]. See `docs/protocol.md`.

use std::io::{Read, Write};

use bytes::{BufMut, Bytes, BytesMut};

/// Words of a [`ProtocolError::Busy`] answer, after which the node closes
/// the connection: a client tells it from a refusal that leaves the
/// connection open (an engine's `TEMP_FAILURE` for memory, a dump refused
/// while others run) by them.
pub const BUSY_FRAME: &str = "partly received large frames may hold together";

/// The largest frame body any tapkv peer takes (a node's `--max-body` and
/// `--max-value-size` stay below it, so every value fits with its extras):
/// a replica's stream frames, and a client's `max_body` whatever a node's
/// HELLO says (its replies may carry 64 KiB over that, a GET's flags).
pub const MAX_FRAME_BODY: usize = 1 << 30;

/// Size of the fixed header.
pub const HEADER_LEN: usize = 24;
/// Magic of a request.
pub const MAGIC_REQUEST: u8 = 0x80;
/// Magic of a response.
pub const MAGIC_RESPONSE: u8 = 0x81;
/// Default largest accepted body (extras + key + value): 21 MiB, enough for
/// the engine's largest value (20 MiB) and key.
pub const DEFAULT_MAX_BODY: usize = 21 << 20;

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The peer closed the connection at a frame boundary.
    #[error("connection closed")]
    Closed,
    /// I/O error (including timeouts).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The first byte is neither request nor response magic.
    #[error("bad magic byte 0x{0:02x}")]
    BadMagic(u8),
    /// The advertised body is larger than allowed.
    #[error("body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge {
        /// Advertised body length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// Key and extras lengths do not fit in the body.
    #[error("extras ({extras}) + key ({key}) exceed body length {body}")]
    BadLengths {
        /// Extras length.
        extras: usize,
        /// Key length.
        key: usize,
        /// Body length.
        body: usize,
    },
    /// A large frame does not fit in what the node lets partly received
    /// frames hold together (see `io::ByteBudget`); try again later. The
    /// node closes the connection after this answer (its message holds
    /// [`BUSY_FRAME`], by which a client tells it from other refusals).
    #[error(
        "busy: a frame of {len} bytes does not fit in the {limit} bytes partly received \
         large frames may hold together (--max-pending-body-bytes); try again later"
    )]
    Busy {
        /// The frame's length.
        len: usize,
        /// The node's budget.
        limit: usize,
    },
    /// The frame is well formed but its contents are not what its opcode needs.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    /// [`MAGIC_REQUEST`] or [`MAGIC_RESPONSE`].
    pub magic: u8,
    /// Operation code.
    pub opcode: u8,
    /// Data type (0 raw, 1 JSON).
    pub datatype: u8,
    /// Partition in requests, status in responses.
    pub vbucket_or_status: u16,
    /// Opaque value echoed in responses.
    pub opaque: u32,
    /// CAS.
    pub cas: u64,
    /// Extras.
    pub extras: Bytes,
    /// Key.
    pub key: Bytes,
    /// Value.
    pub value: Bytes,
}

impl Frame {
    /// A request frame.
    pub fn request(opcode: u8, partition: u16) -> Frame {
        Frame {
            magic: MAGIC_REQUEST,
            opcode,
            vbucket_or_status: partition,
            ..Frame::default()
        }
    }

    /// A response to `req` with `status`.
    pub fn response(req: &Frame, status: u16) -> Frame {
        Frame {
            magic: MAGIC_RESPONSE,
            opcode: req.opcode,
            vbucket_or_status: status,
            opaque: req.opaque,
            ..Frame::default()
        }
    }

    /// Builder: extras.
    pub fn with_extras(mut self, extras: impl Into<Bytes>) -> Frame {
        self.extras = extras.into();
        self
    }

    /// Builder: key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Frame {
        self.key = key.into();
        self
    }

    /// Builder: value.
    pub fn with_value(mut self, value: impl Into<Bytes>) -> Frame {
        self.value = value.into();
        self
    }

    /// Builder: CAS.
    pub fn with_cas(mut self, cas: u64) -> Frame {
        self.cas = cas;
        self
    }

    /// Whether this is a response.
    pub fn is_response(&self) -> bool {
        self.magic == MAGIC_RESPONSE
    }

    /// Status of a response.
    pub fn status(&self) -> u16 {
        self.vbucket_or_status
    }

    /// Partition of a request.
    pub fn partition(&self) -> u16 {
        self.vbucket_or_status
    }

    /// Length on the wire.
    pub fn wire_len(&self) -> usize {
        self.as_frame_ref().wire_len()
    }

    /// Appends the encoded frame to `out`. A length wider than its header
    /// field is clamped (the constructors in `message` never produce one).
    pub fn encode(&self, out: &mut BytesMut) {
        self.as_frame_ref().encode(out);
    }

    /// The encoded frame.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

/// A frame borrowed from a read buffer (no reference counts, no copies):
/// what [`FrameReader::poll_map`](crate::io::FrameReader::poll_map) hands
/// to its callback.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    /// [`MAGIC_REQUEST`] or [`MAGIC_RESPONSE`].
    pub magic: u8,
    /// Operation code.
    pub opcode: u8,
    /// Data type.
    pub datatype: u8,
    /// Partition in requests, status in responses.
    pub vbucket_or_status: u16,
    /// Opaque value.
    pub opaque: u32,
    /// CAS.
    pub cas: u64,
    /// Extras.
    pub extras: &'a [u8],
    /// Key.
    pub key: &'a [u8],
    /// Value.
    pub value: &'a [u8],
}

impl FrameRef<'_> {
    /// Partition of a request.
    pub fn partition(&self) -> u16 {
        self.vbucket_or_status
    }

    /// Length on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.extras.len() + self.key.len() + self.value.len()
    }
}

impl Frame {
    /// The frame, borrowed.
    pub fn as_frame_ref(&self) -> FrameRef<'_> {
        FrameRef {
            magic: self.magic,
            opcode: self.opcode,
            datatype: self.datatype,
            vbucket_or_status: self.vbucket_or_status,
            opaque: self.opaque,
            cas: self.cas,
            extras: &self.extras,
            key: &self.key,
            value: &self.value,
        }
    }
}

/// Decodes one frame at the front of `buf` without copying it: the frame
/// and its length on the wire, or `Ok(None)` if more bytes are needed.
pub fn decode_ref(
    buf: &[u8],
    max_body: usize,
) -> Result<Option<(FrameRef<'_>, usize)>, ProtocolError> {
    let Some(header) = whole_frame(buf, max_body)? else {
        return Ok(None);
    };
    let total = HEADER_LEN + header.body_len;
    let body = &buf[HEADER_LEN..total];
    let (extras, rest) = body.split_at(header.extras_len);
    let (key, value) = rest.split_at(header.key_len);
    Ok(Some((
        FrameRef {
            magic: header.magic,
            opcode: header.opcode,
            datatype: header.datatype,
            vbucket_or_status: header.vbucket_or_status,
            opaque: header.opaque,
            cas: header.cas,
            extras,
            key,
            value,
        },
        total,
    )))
}

impl FrameRef<'_> {
    /// Appends the encoded frame to `out` (see [`Frame::encode`]).
    pub fn encode(&self, out: &mut BytesMut) {
        let body = self.extras.len() + self.key.len() + self.value.len();
        out.reserve(HEADER_LEN + body);
        out.put_u8(self.magic);
        out.put_u8(self.opcode);
        out.put_u16(u16::try_from(self.key.len()).unwrap_or(u16::MAX));
        out.put_u8(u8::try_from(self.extras.len()).unwrap_or(u8::MAX));
        out.put_u8(self.datatype);
        out.put_u16(self.vbucket_or_status);
        out.put_u32(u32::try_from(body).unwrap_or(u32::MAX));
        out.put_u32(self.opaque);
        out.put_u64(self.cas);
        out.put_slice(self.extras);
        out.put_slice(self.key);
        out.put_slice(self.value);
    }
}

/// A validated header.
#[derive(Debug, Clone, Copy)]
struct Header {
    magic: u8,
    opcode: u8,
    key_len: usize,
    extras_len: usize,
    datatype: u8,
    vbucket_or_status: u16,
    body_len: usize,
    opaque: u32,
    cas: u64,
}

/// The body length a header names.
fn body_len(h: &[u8]) -> Option<usize> {
    let len = h.get(8..12)?;
    usize::try_from(u32::from_be_bytes([len[0], len[1], len[2], len[3]])).ok()
}

/// The whole length (header and body) of the frame starting `buf`, once its
/// header is there (`usize::MAX` if it cannot be represented); nothing is
/// validated.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    buf.get(..HEADER_LEN)?;
    Some(body_len(buf).map_or(usize::MAX, |b| b.saturating_add(HEADER_LEN)))
}

fn parse_header(h: &[u8; HEADER_LEN], max_body: usize) -> Result<Header, ProtocolError> {
    let magic = h[0];
    if magic != MAGIC_REQUEST && magic != MAGIC_RESPONSE {
        return Err(ProtocolError::BadMagic(magic));
    }
    let key_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let extras_len = usize::from(h[4]);
    let body_len = body_len(h).unwrap_or(usize::MAX);
    if body_len > max_body {
        return Err(ProtocolError::BodyTooLarge {
            len: body_len,
            max: max_body,
        });
    }
    if extras_len + key_len > body_len {
        return Err(ProtocolError::BadLengths {
            extras: extras_len,
            key: key_len,
            body: body_len,
        });
    }
    let mut cas = [0u8; 8];
    cas.copy_from_slice(&h[16..24]);
    Ok(Header {
        magic,
        opcode: h[1],
        key_len,
        extras_len,
        datatype: h[5],
        vbucket_or_status: u16::from_be_bytes([h[6], h[7]]),
        body_len,
        opaque: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
        cas: u64::from_be_bytes(cas),
    })
}

/// The validated header of the frame at the front of `buf`, if `buf` holds
/// all of it; `Ok(None)` if more bytes are needed.
fn whole_frame(buf: &[u8], max_body: usize) -> Result<Option<Header>, ProtocolError> {
    // A wrong first byte is refused at once, not once 24 bytes arrived: a
    // text-protocol line (`get foo\r\n`, 9 bytes) gets its answer instead
    // of waiting out a timeout.
    if let Some(&magic) = buf.first() {
        if magic != MAGIC_REQUEST && magic != MAGIC_RESPONSE {
            return Err(ProtocolError::BadMagic(magic));
        }
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    let header = parse_header(&h, max_body)?;
    Ok((buf.len() >= HEADER_LEN + header.body_len).then_some(header))
}

fn frame_from(h: Header, body: Bytes) -> Frame {
    let extras = body.slice(..h.extras_len);
    let key = body.slice(h.extras_len..h.extras_len + h.key_len);
    let value = body.slice(h.extras_len + h.key_len..);
    Frame {
        magic: h.magic,
        opcode: h.opcode,
        datatype: h.datatype,
        vbucket_or_status: h.vbucket_or_status,
        opaque: h.opaque,
        cas: h.cas,
        extras,
        key,
        value,
    }
}

/// Decodes one frame from the front of `buf` if it holds a whole one
/// (removing it); `Ok(None)` if more bytes are needed.
pub fn decode(buf: &mut BytesMut, max_body: usize) -> Result<Option<Frame>, ProtocolError> {
    let Some(header) = whole_frame(buf, max_body)? else {
        return Ok(None);
    };
    // The body shares the read buffer (no copy): the engine copies key and
    // value into a record of its own when it stores them, so a frame lives
    // only until it is handled and never pins the buffer for longer.
    let total = HEADER_LEN + header.body_len;
    let body = buf.split_to(total).freeze().slice(HEADER_LEN..);
    Ok(Some(frame_from(header, body)))
}

/// Reads one frame from a blocking reader.
pub fn read_frame(r: &mut impl Read, max_body: usize) -> Result<Frame, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => {
                return Err(ProtocolError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed inside a frame header",
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    let header = parse_header(&h, max_body)?;
    let mut body = vec![0u8; header.body_len];
    r.read_exact(&mut body)?;
    Ok(frame_from(header, Bytes::from(body)))
}

/// Writes one frame to a blocking writer.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), ProtocolError> {
    w.write_all(&frame.to_bytes())?;
    Ok(())
}
