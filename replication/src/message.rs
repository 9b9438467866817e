//! Opcodes, status codes and the typed replication messages.
//!
//! Client data operations keep their memcached binary opcodes and meanings;
//! tapkv's own opcodes sit in 0xd0..=0xef, unused by memcached. Replication
//! messages flow primary → replica as request frames without responses; the
//! replica answers with `ACK` frames.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tapkv_engine::{ItemMeta, QueueOp, QueuedItem};

use crate::protocol::{Frame, FrameRef, ProtocolError, MAGIC_REQUEST};

/// Protocol version exchanged in `HELLO`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Operation codes.
pub mod opcode {
    /// memcached GET.
    pub const GET: u8 = 0x00;
    /// memcached SET.
    pub const SET: u8 = 0x01;
    /// memcached ADD.
    pub const ADD: u8 = 0x02;
    /// memcached REPLACE.
    pub const REPLACE: u8 = 0x03;
    /// memcached DELETE.
    pub const DELETE: u8 = 0x04;
    /// memcached QUIT.
    pub const QUIT: u8 = 0x07;
    /// memcached NOOP (also the heartbeat).
    pub const NOOP: u8 = 0x0a;
    /// memcached VERSION.
    pub const VERSION: u8 = 0x0b;
    /// memcached STAT.
    pub const STAT: u8 = 0x10;
    /// Version handshake: extras = version u32, key = peer name.
    pub const HELLO: u8 = 0xd0;
    /// Online update START on the frame's partition.
    pub const UPDATE_START: u8 = 0xd1;
    /// Online update COMPLETE.
    pub const UPDATE_COMPLETE: u8 = 0xd2;
    /// Online update REVERT.
    pub const UPDATE_REVERT: u8 = 0xd3;
    /// Replica → primary: open a replication stream.
    pub const STREAM_OPEN: u8 = 0xd4;
    /// Stream: a mutation.
    pub const MUTATION: u8 = 0xd5;
    /// Stream: a deletion.
    pub const DELETION: u8 = 0xd6;
    /// Stream: the cursor entered a checkpoint.
    pub const CHECKPOINT_START: u8 = 0xd7;
    /// Stream: the cursor left a checkpoint.
    pub const CHECKPOINT_END: u8 = 0xd8;
    /// Stream: online-update START marker.
    pub const OU_START: u8 = 0xd9;
    /// Stream: online-update END marker.
    pub const OU_END: u8 = 0xda;
    /// Stream: online-update REVERT marker.
    pub const OU_REVERT: u8 = 0xdb;
    /// Replica → primary: acknowledgement of applied bytes and seqnos.
    pub const ACK: u8 = 0xdc;
    /// Stream: the primary ends the stream.
    pub const STREAM_END: u8 = 0xdd;
    /// Admin query: key = `inspect` | `dump` | `streams`; JSON answer
    /// (statistics are `STAT`).
    pub const ADMIN: u8 = 0xde;
    /// Stream: a snapshot (from disk or memory) of seqnos start..=end follows.
    pub const SNAPSHOT: u8 = 0xdf;
    /// Stream: the replica must roll back the partition (resynchronise).
    pub const ROLLBACK: u8 = 0xe0;
    /// Stream: the primary's current branch (uuid) of the partition.
    pub const FAILOVER: u8 = 0xe1;
    /// Client: which partition a key belongs to.
    pub const PARTITION_OF: u8 = 0xe2;
    /// Client: evict a key's value.
    pub const EVICT: u8 = 0xe3;
    /// Client: wait until everything written so far is persisted.
    pub const FLUSH: u8 = 0xe4;
    /// Client: close the partition's open checkpoint.
    pub const CHECKPOINT: u8 = 0xe5;
    /// Client: checkpoints / cursors of a partition (JSON answer), key = `checkpoints` | `cursors`.
    pub const PARTITION_INFO: u8 = 0xe6;
}

/// Response status codes.
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Key not found.
    pub const KEY_NOT_FOUND: u16 = 0x0001;
    /// Key exists (also: CAS mismatch, as in memcached).
    pub const KEY_EXISTS: u16 = 0x0002;
    /// Value too large.
    pub const VALUE_TOO_LARGE: u16 = 0x0003;
    /// Invalid arguments.
    pub const INVALID_ARGUMENTS: u16 = 0x0004;
    /// Not my partition / read-only replica.
    pub const NOT_MY_VBUCKET: u16 = 0x0007;
    /// Unknown command.
    pub const UNKNOWN_COMMAND: u16 = 0x0081;
    /// Internal error.
    pub const INTERNAL: u16 = 0x0084;
    /// Temporary failure: the engine temporarily out of memory (its
    /// message says `temp_oom`), or the node busy (`temp_failure`: too many
    /// connections, the pending-body budget full). Try again later.
    pub const TEMP_FAILURE: u16 = 0x0086;
    /// tapkv: wrong state for the command (e.g. online-update order).
    pub const WRONG_STATE: u16 = 0x00c0;
    /// tapkv: timed out.
    pub const TIMEOUT: u16 = 0x00c1;
    /// tapkv: unsupported protocol version.
    pub const BAD_VERSION: u16 = 0x00c2;
    /// tapkv: the request must start with HELLO.
    pub const HANDSHAKE_REQUIRED: u16 = 0x00c3;

    /// The `<kind>` an error response of status `st` starts with when the
    /// node, not the engine, refused the request (engine errors carry their
    /// own `Error::kind()`).
    pub fn kind(st: u16) -> &'static str {
        match st {
            KEY_NOT_FOUND => "not_found",
            KEY_EXISTS => "exists",
            VALUE_TOO_LARGE => "value_too_large",
            INVALID_ARGUMENTS => "invalid_argument",
            NOT_MY_VBUCKET => "not_my_partition",
            UNKNOWN_COMMAND => "unknown_command",
            // The node's own refusals are for load, not memory: an engine
            // `TempOutOfMemory` carries its own kind, `temp_oom`.
            TEMP_FAILURE => "temp_failure",
            WRONG_STATE => "wrong_state",
            TIMEOUT => "timeout",
            BAD_VERSION => "bad_version",
            HANDSHAKE_REQUIRED => "handshake_required",
            _ => "internal",
        }
    }
}

/// What a replica asks per partition when it opens a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRequest {
    /// Partition.
    pub partition: u16,
    /// Branch (failover uuid) the replica's data belongs to; 0 if none.
    pub uuid: u64,
    /// Last seqno the replica holds.
    pub seqno: u64,
}

/// Encodes `STREAM_OPEN`: key = stream name, value = 18 bytes per partition.
pub fn stream_open(name: &str, reqs: &[StreamRequest]) -> Frame {
    let mut v = BytesMut::with_capacity(reqs.len() * 18);
    for r in reqs {
        v.put_u16(r.partition);
        v.put_u64(r.uuid);
        v.put_u64(r.seqno);
    }
    Frame::request(opcode::STREAM_OPEN, 0)
        .with_key(Bytes::copy_from_slice(name.as_bytes()))
        .with_value(v.freeze())
}

/// Decodes the partition requests of a `STREAM_OPEN`.
pub fn parse_stream_open(f: &Frame) -> Result<Vec<StreamRequest>, ProtocolError> {
    if f.value.len() % 18 != 0 {
        return Err(ProtocolError::Malformed {
            what: "STREAM_OPEN",
            why: format!("value of {} bytes is not a multiple of 18", f.value.len()),
        });
    }
    let mut v = f.value.clone();
    let mut out = Vec::new();
    while v.has_remaining() {
        out.push(StreamRequest {
            partition: v.get_u16(),
            uuid: v.get_u64(),
            seqno: v.get_u64(),
        });
    }
    Ok(out)
}

/// A message of a replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// The primary's current branch of the partition; the replica records it.
    Failover {
        /// Partition.
        partition: u16,
        /// Branch uuid.
        uuid: u64,
    },
    /// Seqnos `start..=end` follow; `from_disk` for a backfill.
    Snapshot {
        /// Partition.
        partition: u16,
        /// First seqno.
        start: u64,
        /// Last seqno.
        end: u64,
        /// Whether it is read from disk (backfill) rather than memory.
        from_disk: bool,
    },
    /// A mutation, deletion or online-update marker, with its metadata.
    Item {
        /// Partition.
        partition: u16,
        /// The entry.
        item: QueuedItem,
    },
    /// The cursor entered checkpoint `id`.
    CheckpointStart {
        /// Partition.
        partition: u16,
        /// Checkpoint id.
        id: u64,
    },
    /// The cursor left checkpoint `id`.
    CheckpointEnd {
        /// Partition.
        partition: u16,
        /// Checkpoint id.
        id: u64,
    },
    /// The replica's history of the partition diverges from the primary's:
    /// drop it and open the stream again from seqno 0.
    Rollback {
        /// Partition.
        partition: u16,
    },
    /// Heartbeat.
    Noop,
    /// The primary ends the stream.
    StreamEnd,
}

fn need<'a>(
    f: &FrameRef<'a>,
    what: &'static str,
    extras: usize,
) -> Result<&'a [u8], ProtocolError> {
    if f.extras.len() != extras {
        return Err(ProtocolError::Malformed {
            what,
            why: format!("{} bytes of extras, expected {extras}", f.extras.len()),
        });
    }
    Ok(f.extras)
}

impl StreamMessage {
    /// Appends the message's frame to `out`; an entry is written straight
    /// from its record (no intermediate frame or copies of key and value).
    /// The bytes are those of [`to_frame`](Self::to_frame)'s encoding.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            StreamMessage::Item { partition, item } if item.op.is_key_op() => {
                Self::encode_item(*partition, item, out);
            }
            _ => self.to_frame().encode(out),
        }
    }

    /// Appends the frame of a mutation or deletion of `partition` straight
    /// from the entry's record (no intermediate frame, no copy but into
    /// `out`); the bytes of `StreamMessage::Item { partition, item }`'s
    /// frame. Markers go through [`to_frame`](Self::to_frame).
    pub fn encode_item(partition: u16, item: &QueuedItem, out: &mut BytesMut) {
        if !item.op.is_key_op() {
            StreamMessage::Item {
                partition,
                item: item.clone(),
            }
            .to_frame()
            .encode(out);
            return;
        }
        let entry = (item.op, item.key(), item.value(), item.meta());
        Self::encode_entry(partition, entry, out);
    }

    /// Appends a `MUTATION` or `DELETION` frame of a key entry given by its
    /// parts (`op` must be a key operation; a backfill encodes its disk
    /// entries this way without copying them first).
    pub fn encode_entry(
        partition: u16,
        (op, key, value, m): (QueueOp, &[u8], &[u8], tapkv_engine::ItemMeta),
        out: &mut BytesMut,
    ) {
        let mut extras = [0u8; 24];
        extras[..8].copy_from_slice(&m.by_seqno.to_be_bytes());
        extras[8..16].copy_from_slice(&m.rev_seqno.to_be_bytes());
        extras[16..20].copy_from_slice(&m.flags.to_be_bytes());
        extras[20..].copy_from_slice(&m.expiry.to_be_bytes());
        let opcode = if op == QueueOp::Mutation {
            opcode::MUTATION
        } else {
            opcode::DELETION
        };
        FrameRef {
            magic: MAGIC_REQUEST,
            opcode,
            datatype: 0,
            vbucket_or_status: partition,
            opaque: 0,
            cas: m.cas,
            extras: &extras,
            key,
            value,
        }
        .encode(out);
    }

    /// Encodes the message as a request frame.
    pub fn to_frame(&self) -> Frame {
        match self {
            StreamMessage::Failover { partition, uuid } => {
                Frame::request(opcode::FAILOVER, *partition)
                    .with_extras(uuid.to_be_bytes().to_vec())
            }
            StreamMessage::Snapshot {
                partition,
                start,
                end,
                from_disk,
            } => {
                let mut e = BytesMut::with_capacity(17);
                e.put_u64(*start);
                e.put_u64(*end);
                e.put_u8(u8::from(*from_disk));
                Frame::request(opcode::SNAPSHOT, *partition).with_extras(e.freeze())
            }
            StreamMessage::Item { partition, item } => {
                let m = &item.meta();
                let (op, extras) = match item.op {
                    QueueOp::Mutation | QueueOp::Deletion => {
                        let mut e = BytesMut::with_capacity(24);
                        e.put_u64(m.by_seqno);
                        e.put_u64(m.rev_seqno);
                        e.put_u32(m.flags);
                        e.put_u32(m.expiry);
                        let op = if item.op == QueueOp::Mutation {
                            opcode::MUTATION
                        } else {
                            opcode::DELETION
                        };
                        (op, e.freeze())
                    }
                    QueueOp::OnlineUpdateStart { checkpoint_id }
                    | QueueOp::OnlineUpdateEnd { checkpoint_id }
                    | QueueOp::OnlineUpdateRevert { checkpoint_id } => {
                        let mut e = BytesMut::with_capacity(16);
                        e.put_u64(checkpoint_id);
                        e.put_u64(m.by_seqno);
                        let op = match item.op {
                            QueueOp::OnlineUpdateStart { .. } => opcode::OU_START,
                            QueueOp::OnlineUpdateEnd { .. } => opcode::OU_END,
                            _ => opcode::OU_REVERT,
                        };
                        (op, e.freeze())
                    }
                };
                Frame::request(op, *partition)
                    .with_extras(extras)
                    .with_key(Bytes::copy_from_slice(item.key()))
                    .with_value(item.value_bytes())
                    .with_cas(m.cas)
            }
            StreamMessage::CheckpointStart { partition, id } => {
                Frame::request(opcode::CHECKPOINT_START, *partition)
                    .with_extras(id.to_be_bytes().to_vec())
            }
            StreamMessage::CheckpointEnd { partition, id } => {
                Frame::request(opcode::CHECKPOINT_END, *partition)
                    .with_extras(id.to_be_bytes().to_vec())
            }
            StreamMessage::Rollback { partition } => Frame::request(opcode::ROLLBACK, *partition),
            StreamMessage::Noop => Frame::request(opcode::NOOP, 0),
            StreamMessage::StreamEnd => Frame::request(opcode::STREAM_END, 0),
        }
    }

    /// Decodes a stream frame.
    pub fn from_frame(f: &Frame) -> Result<StreamMessage, ProtocolError> {
        Self::from_frame_ref(&f.as_frame_ref())
    }

    /// Decodes a stream frame borrowed from a read buffer; keys and values
    /// are copied into the entry's record, nothing else is kept.
    pub fn from_frame_ref(f: &FrameRef<'_>) -> Result<StreamMessage, ProtocolError> {
        let partition = f.partition();
        // A stream sends values raw: a compressed one (memcached's 0x02),
        // say, would be stored as it came and misread (as a write's is
        // refused, `check_write_datatype`).
        if f.datatype & !DATATYPE_JSON != 0 {
            return Err(ProtocolError::Malformed {
                what: "stream frame",
                why: format!("datatype 0x{:02x} (a stream carries 0 or 0x01)", f.datatype),
            });
        }
        Ok(match f.opcode {
            opcode::FAILOVER => StreamMessage::Failover {
                partition,
                uuid: need(f, "FAILOVER", 8)?.get_u64(),
            },
            opcode::SNAPSHOT => {
                let mut e = need(f, "SNAPSHOT", 17)?;
                let (start, end) = (e.get_u64(), e.get_u64());
                // Any other value used to read as the closing marker, and
                // the key-ordered disk entries after it were applied as a
                // run, older seqnos dropped as duplicates.
                let from_disk = match e.get_u8() {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(ProtocolError::Malformed {
                            what: "SNAPSHOT",
                            why: format!("from-disk byte {other} (0 or 1)"),
                        })
                    }
                };
                StreamMessage::Snapshot {
                    partition,
                    start,
                    end,
                    from_disk,
                }
            }
            opcode::MUTATION | opcode::DELETION => {
                let mut e = need(f, "MUTATION", 24)?;
                if f.key.is_empty() {
                    return Err(ProtocolError::Malformed {
                        what: "MUTATION",
                        why: "empty key".into(),
                    });
                }
                let meta = ItemMeta {
                    by_seqno: e.get_u64(),
                    rev_seqno: e.get_u64(),
                    flags: e.get_u32(),
                    expiry: e.get_u32(),
                    cas: f.cas,
                };
                let op = if f.opcode == opcode::MUTATION {
                    QueueOp::Mutation
                } else {
                    QueueOp::Deletion
                };
                StreamMessage::Item {
                    partition,
                    // Key, value and metadata are copied into one record: a
                    // replica's hash table keeps it, never this frame.
                    item: if op == QueueOp::Mutation {
                        QueuedItem::mutation(f.key, f.value, meta)
                    } else {
                        QueuedItem::deletion(f.key, meta)
                    },
                }
            }
            opcode::OU_START | opcode::OU_END | opcode::OU_REVERT => {
                let mut e = need(f, "online-update marker", 16)?;
                let checkpoint_id = e.get_u64();
                let by_seqno = e.get_u64();
                let op = match f.opcode {
                    opcode::OU_START => QueueOp::OnlineUpdateStart { checkpoint_id },
                    opcode::OU_END => QueueOp::OnlineUpdateEnd { checkpoint_id },
                    _ => QueueOp::OnlineUpdateRevert { checkpoint_id },
                };
                StreamMessage::Item {
                    partition,
                    item: QueuedItem::marker(
                        op,
                        ItemMeta {
                            by_seqno,
                            cas: f.cas,
                            ..ItemMeta::default()
                        },
                    ),
                }
            }
            opcode::CHECKPOINT_START => StreamMessage::CheckpointStart {
                partition,
                id: need(f, "CHECKPOINT_START", 8)?.get_u64(),
            },
            opcode::CHECKPOINT_END => StreamMessage::CheckpointEnd {
                partition,
                id: need(f, "CHECKPOINT_END", 8)?.get_u64(),
            },
            opcode::ROLLBACK => StreamMessage::Rollback { partition },
            opcode::NOOP => StreamMessage::Noop,
            opcode::STREAM_END => StreamMessage::StreamEnd,
            other => {
                return Err(ProtocolError::Malformed {
                    what: "stream message",
                    why: format!("unexpected opcode 0x{other:02x}"),
                })
            }
        })
    }
}

/// An acknowledgement: bytes applied since the last ack, and per partition the
/// highest seqno applied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ack {
    /// Bytes of stream frames applied since the previous ack.
    pub bytes: u64,
    /// (partition, highest applied seqno).
    pub seqnos: Vec<(u16, u64)>,
}

impl Ack {
    /// Encodes as an `ACK` request.
    pub fn to_frame(&self) -> Frame {
        let mut v = BytesMut::with_capacity(self.seqnos.len() * 10);
        for (p, s) in &self.seqnos {
            v.put_u16(*p);
            v.put_u64(*s);
        }
        Frame::request(opcode::ACK, 0)
            .with_extras(self.bytes.to_be_bytes().to_vec())
            .with_value(v.freeze())
    }

    /// Decodes an `ACK`.
    pub fn from_frame(f: &Frame) -> Result<Ack, ProtocolError> {
        let f = &f.as_frame_ref();
        let bytes = need(f, "ACK", 8)?.get_u64();
        if f.value.len() % 10 != 0 {
            return Err(ProtocolError::Malformed {
                what: "ACK",
                why: "value is not a list of (u16, u64)".into(),
            });
        }
        let mut v = f.value;
        let mut seqnos = Vec::new();
        while v.has_remaining() {
            seqnos.push((v.get_u16(), v.get_u64()));
        }
        Ok(Ack { bytes, seqnos })
    }
}

/// `HELLO` request.
pub fn hello(name: &str) -> Frame {
    Frame::request(opcode::HELLO, 0)
        .with_extras(PROTOCOL_VERSION.to_be_bytes().to_vec())
        .with_key(Bytes::copy_from_slice(name.as_bytes()))
}

/// The version a `HELLO` carries.
pub fn hello_version(f: &Frame) -> Result<u32, ProtocolError> {
    Ok(need(&f.as_frame_ref(), "HELLO", 4)?.get_u32())
}

/// memcached SET/ADD/REPLACE extras: flags, expiry.
pub fn store_extras(flags: u32, expiry: u32) -> Bytes {
    let mut e = BytesMut::with_capacity(8);
    e.put_u32(flags);
    e.put_u32(expiry);
    e.freeze()
}

/// Parses memcached SET/ADD/REPLACE extras: flags, and the expiry as the
/// engine takes it (absolute, see [`absolute_expiry`]).
pub fn parse_store_extras(f: &Frame) -> Result<(u32, u32), ProtocolError> {
    let mut e = need(&f.as_frame_ref(), "SET", 8)?;
    let (flags, expiry) = (e.get_u32(), e.get_u32());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
    Ok((flags, absolute_expiry(expiry, now)))
}

pub use tapkv_engine::{absolute_expiry, RELATIVE_EXPIRY_MAX};

/// Datatype bit of a SET/ADD/REPLACE asking for `Durability::Persist`.
pub const DATATYPE_PERSIST: u8 = 0x80;
/// Datatype bit of a SET/ADD/REPLACE asking for `Durability::Replicate`.
pub const DATATYPE_REPLICATE: u8 = 0x40;

/// memcached's JSON datatype bit: accepted on a write and not kept (values
/// are stored as bytes; replies carry datatype 0).
pub const DATATYPE_JSON: u8 = 0x01;

/// The datatype bits a write may carry; any other (memcached's snappy
/// compression 0x02 or extended attributes 0x04, say) is refused, since a
/// value stored raw and answered as such would be misread.
pub const WRITE_DATATYPE_BITS: u8 = DATATYPE_PERSIST | DATATYPE_REPLICATE | DATATYPE_JSON;

/// Refuses a write's datatype with bits a write cannot carry.
pub fn check_write_datatype(datatype: u8) -> Result<(), String> {
    match datatype & !WRITE_DATATYPE_BITS {
        0 => Ok(()),
        bad => Err(format!(
            "datatype bits 0x{bad:02x} are not supported (a write may carry 0x80 Persist, \
             0x40 Replicate and 0x01 JSON, which is not kept)"
        )),
    }
}

/// The durability a store request's datatype asks for.
pub fn durability_of(datatype: u8) -> tapkv_engine::Durability {
    if datatype & DATATYPE_REPLICATE != 0 {
        tapkv_engine::Durability::Replicate
    } else if datatype & DATATYPE_PERSIST != 0 {
        tapkv_engine::Durability::Persist
    } else {
        tapkv_engine::Durability::Memory
    }
}

/// The datatype bits for `d`.
pub fn durability_bits(d: tapkv_engine::Durability) -> u8 {
    match d {
        tapkv_engine::Durability::Persist => DATATYPE_PERSIST,
        tapkv_engine::Durability::Replicate => DATATYPE_REPLICATE,
        _ => 0,
    }
}
