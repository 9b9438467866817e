//! The on-disk store: RocksDB column families, record encodings, the data
//! directory lock, and a read-only view for admin tools.
//!
//! Layout of a data directory:
//! - `tapkv.lock`: held (flock) by the process that has the engine open;
//! - `rocksdb/`: the RocksDB database with column families
//!   - `items`: `[partition u16 BE][key]` → item record (live or tombstone);
//!   - `meta`: engine metadata, per-partition persisted state, seqno and
//!     checkpoint-id reservations, the clean-shutdown mark;
//!   - `staging`: `[partition u16 BE][seqno u64 BE]` → `[key length varint]
//!     [key][item record]`, a replica's scratch space for a disk snapshot
//!     too large to hold in memory (written without the WAL, emptied when
//!     the snapshot is applied and whenever the store opens).
//!
//! Everything a flush writes for a partition goes in one `WriteBatch` with the
//! partition's state, so the disk always holds a consistent prefix of each
//! partition's history. This module knows nothing of checkpoints or cursors.

use std::fs::File;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::item::{ItemMeta, PartitionId, QueueOp, QueuedItem};
use crate::sync::{AtomicBool, AtomicUsize, Counted, Mutex, Ordering};

const CF_ITEMS: &str = "items";
const CF_META: &str = "meta";
const CF_STAGING: &str = "staging";
const ENGINE_META_KEY: &[u8] = b"engine";
const CLEAN_SHUTDOWN_KEY: &[u8] = b"clean-shutdown";
/// Version of the on-disk format written by this build.
pub const FORMAT_VERSION: u32 = 3;
/// The most partitions an engine can have (the range is 1 to this).
pub const MAX_PARTITIONS: u16 = 1024;
const RECORD_VERSION: u8 = 2;

/// Engine-wide settings fixed when a data directory is created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EngineMeta {
    /// On-disk format version.
    pub format: u32,
    /// Number of partitions: keys map to partitions by it, so it never changes.
    pub partitions: u16,
    /// Whether a replica holds the directory (`None`: written by a build
    /// that did not record it; the next open records its role). A replica's
    /// directory is refused to an engine opened as a primary: writes made
    /// to it directly would be rolled back when its replica rejoins.
    #[serde(default)]
    pub replica: Option<bool>,
    /// A primary's directory opened as a replica, and no replication
    /// session has confirmed it yet: a node refuses to roll back its
    /// partitions (which would replace a primary's data) unless told to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub primary_data: bool,
    /// The primary's history ended uncleanly (a crash, or an online-update
    /// window lost) and the directory was then opened as a replica
    /// (`primary_data`), or a partition of it was reset before a session
    /// confirmed it: the next open as a primary starts a new failover
    /// branch, as it would have right after the crash. (A replica's clean
    /// close would otherwise hide either.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub branch_pending: bool,
}

/// A partition's state as of its last successful flush.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionDiskState {
    /// Highest seqno on disk.
    pub high_seqno: u64,
    /// Checkpoint id of the last flushed item.
    pub checkpoint_id: u64,
    /// Highest CAS on disk.
    pub max_cas: u64,
}

/// Seqnos and checkpoint ids a partition may hand out before it must reserve
/// more: after a crash the partition continues above the reservation, so
/// numbers handed out but never flushed are not reused.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reservation {
    /// Seqnos up to and including this one may be handed out.
    pub seqno: u64,
    /// Checkpoint ids up to and including this one may be handed out.
    pub checkpoint_id: u64,
}

/// An online-update window, as recorded on disk while it is open (and kept
/// in the lost list if the process stopped before it ended).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WindowRecord {
    /// The window's checkpoint id (carried by its markers).
    pub checkpoint_id: u64,
    /// Seqno of its START marker.
    pub start_seqno: u64,
}

const META_STATE: &[u8] = b"state/";
const META_RESERVATION: &[u8] = b"reserve/";
const META_FAILOVER: &[u8] = b"failover/";
const META_WINDOW: &[u8] = b"window/";
const META_LOST: &[u8] = b"lost-windows/";

/// The `meta` column family key of a per-partition record.
fn meta_key(prefix: &[u8], p: PartitionId) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&p.to_be_bytes());
    k
}

/// An item record on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    /// Metadata.
    pub meta: ItemMeta,
    /// Whether this is a tombstone left by a deletion.
    pub deleted: bool,
    /// The value (empty for tombstones).
    pub value: Bytes,
}

/// One entry of a partition's failover log: from `seqno` on, the partition's
/// history belongs to branch `uuid` (a new branch starts after an unclean
/// restart of a primary).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailoverEntry {
    /// Branch id.
    pub uuid: u64,
    /// First seqno after which this branch's history begins.
    pub seqno: u64,
}

/// The RocksDB key of `key` in partition `p`.
pub(crate) fn item_key(p: PartitionId, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + key.len());
    k.extend_from_slice(&p.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The staging key of a snapshot entry with `seqno` of partition `p`.
fn staging_key(p: PartitionId, seqno: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(&p.to_be_bytes());
    k[2..].copy_from_slice(&seqno.to_be_bytes());
    k
}

/// Item record: version u8, deleted u8, flags, expiry (LEB128 varints), CAS
/// (u64 big-endian: a clock value, rarely small), rev seqno and by-seqno
/// (varints), then the value. About 16 bytes of header instead of 34 with
/// fixed widths: less for every flush, WAL write, compaction and backfill.
#[cfg(test)]
fn encode_record_into(v: &mut Vec<u8>, meta: &ItemMeta, deleted: bool, value: &[u8]) {
    v.clear();
    append_record(v, meta, deleted, value);
}

/// Appends a record's encoding to `v`.
fn append_record(v: &mut Vec<u8>, meta: &ItemMeta, deleted: bool, value: &[u8]) {
    v.push(RECORD_VERSION);
    v.push(u8::from(deleted));
    put_varint(v, u64::from(meta.flags));
    put_varint(v, u64::from(meta.expiry));
    v.extend_from_slice(&meta.cas.to_be_bytes());
    put_varint(v, meta.rev_seqno);
    put_varint(v, meta.by_seqno);
    v.extend_from_slice(value);
}

fn put_varint(v: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        v.push((x as u8) | 0x80);
        x >>= 7;
    }
    v.push(x as u8);
}

/// Reads a varint at `*pos`, advancing it; `None` if truncated, too long,
/// over 64 bits, or not in the minimal form [`put_varint`] writes (any
/// other form is damage: before, a tenth byte's extra bits were dropped,
/// and a damaged seqno could read as 0).
fn get_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut x = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        if shift == 63 && byte > 1 {
            return None;
        }
        x |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            // A last byte of 0 after others adds nothing: not minimal.
            return (byte != 0 || shift == 0).then_some(x);
        }
    }
    None
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decodes an item record; `what` names it in a corruption error. The value
/// shares `raw`'s buffer (no copy).
pub(crate) fn decode_record(raw: Bytes, what: &dyn Fn() -> String) -> Result<DiskRecord> {
    let (deleted, meta, header) = parse_record(&raw, what)?;
    Ok(DiskRecord {
        deleted,
        meta,
        value: raw.slice(header..),
    })
}

/// A record on disk, borrowed from the iterator that read it.
pub(crate) struct RecordRef<'a> {
    pub(crate) meta: ItemMeta,
    pub(crate) deleted: bool,
    pub(crate) value: &'a [u8],
}

impl RecordRef<'_> {
    /// The queued entry this record of `key` stands for (a mutation, or a
    /// deletion for a tombstone).
    pub(crate) fn to_queued(&self, key: &[u8]) -> QueuedItem {
        if self.deleted {
            QueuedItem::deletion(key, self.meta)
        } else {
            QueuedItem::mutation(key, self.value, self.meta)
        }
    }
}

/// Whether an entry with `op` is written as a tombstone; `None` for markers,
/// which write nothing.
fn tombstone(op: QueueOp) -> Option<bool> {
    match op {
        QueueOp::Mutation => Some(false),
        QueueOp::Deletion => Some(true),
        _ => None,
    }
}

fn decode_record_ref<'a>(raw: &'a [u8], what: &dyn Fn() -> String) -> Result<RecordRef<'a>> {
    let (deleted, meta, header) = parse_record(raw, what)?;
    Ok(RecordRef {
        meta,
        deleted,
        value: &raw[header..],
    })
}

/// Parses a record's header: (tombstone, metadata, header length).
fn parse_record(raw: &[u8], what: &dyn Fn() -> String) -> Result<(bool, ItemMeta, usize)> {
    let parse = |b: &[u8]| -> Option<(bool, ItemMeta, usize)> {
        if b.len() < 2 || b[0] != RECORD_VERSION || b[1] > 1 {
            return None;
        }
        let mut pos = 2;
        let flags = u32::try_from(get_varint(b, &mut pos)?).ok()?;
        let expiry = u32::try_from(get_varint(b, &mut pos)?).ok()?;
        let cas = be_u64(b.get(pos..pos + 8)?);
        pos += 8;
        let rev_seqno = get_varint(b, &mut pos)?;
        let by_seqno = get_varint(b, &mut pos)?;
        let meta = ItemMeta {
            by_seqno,
            cas,
            rev_seqno,
            flags,
            expiry,
        };
        Some((b[1] == 1, meta, pos))
    };
    parse(raw).ok_or_else(|| {
        Error::Corruption(format!(
            "item record of {} is malformed ({} bytes, version {})",
            what(),
            raw.len(),
            raw.first().copied().unwrap_or(0)
        ))
    })
}

/// Splits a RocksDB item key into partition and user key.
pub(crate) fn split_item_key(raw: &[u8]) -> Result<(PartitionId, &[u8])> {
    if raw.len() < 3 {
        return Err(Error::Corruption(format!(
            "item key of {} bytes is too short",
            raw.len()
        )));
    }
    Ok((u16::from_be_bytes([raw[0], raw[1]]), &raw[2..]))
}

/// Refuses a persisted seqno, checkpoint id, CAS or rev seqno at or above
/// `u64::MAX / 2` (replicated ones are held below `u64::MAX / 4`, see
/// `replica::STREAM_NUMBER_LIMIT`): from there it could no longer
/// increase; only corruption makes one.
pub(crate) fn check_in_range(p: PartitionId, what: &str, n: u64) -> Result<()> {
    if n >= u64::MAX / 2 {
        return Err(Error::Corruption(format!(
            "partition {p}: persisted {what} {n} is out of range"
        )));
    }
    Ok(())
}

/// The checks every persisted item passes, at warmup and in [`DiskView`]:
/// `highs` holds each partition's persisted high seqno (0 where its state
/// record is missing). A flush writes items and their partition's state in
/// one batch, so an item above its partition's high seqno means the state
/// record was lost or damaged: the seqnos after it would be handed out
/// again. An item must also sit under the partition its key hashes to (it
/// could never be read otherwise) and have a key the wire can carry.
pub(crate) fn check_disk_item(
    p: PartitionId,
    key: &[u8],
    meta: &ItemMeta,
    highs: &[u64],
) -> Result<()> {
    let Some(&high) = highs.get(usize::from(p)) else {
        return Err(Error::Corruption(format!(
            "item in partition {p} but the directory has {} partitions",
            highs.len()
        )));
    };
    let name = || format!("key {} in partition {p}", crate::text::quoted(key));
    if key.len() > usize::from(u16::MAX) {
        return Err(Error::Corruption(format!(
            "{}: key of {} bytes is over the 65,535-byte maximum",
            name(),
            key.len()
        )));
    }
    // `highs.len()` is the partition count, at most 1024.
    let home = crate::partition::partition_of(key, highs.len() as u16);
    if home != p {
        return Err(Error::Corruption(format!(
            "{} belongs to partition {home}",
            name()
        )));
    }
    // Named with its key, as every other item check (the partition alone
    // left an operator to search for it).
    for (what, n) in [
        ("seqno", meta.by_seqno),
        ("CAS", meta.cas),
        ("rev seqno", meta.rev_seqno),
    ] {
        if n >= u64::MAX / 2 {
            return Err(Error::Corruption(format!(
                "{}: persisted {what} {n} is out of range",
                name()
            )));
        }
    }
    if meta.by_seqno > high {
        return Err(Error::Corruption(format!(
            "{}: seqno {} is above the partition's persisted high seqno {high} (its state \
             record is missing or behind its items)",
            name(),
            meta.by_seqno
        )));
    }
    Ok(())
}

fn decode_json<T: for<'de> Deserialize<'de>>(raw: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(raw).map_err(|e| Error::Corruption(format!("{what}: {e}")))
}

/// Reservations and failover logs of many partitions, gathered to be
/// written in one batch ([`Store::write_meta`]): an open and a close record
/// every partition's, and one sync each (1,024 at the most partitions, on
/// every restart) made them cost a sync per partition (found by a review).
#[derive(Default)]
pub(crate) struct MetaWrites(Vec<(Vec<u8>, Vec<u8>)>);

impl MetaWrites {
    /// Partition `p`'s seqno and checkpoint-id reservation.
    pub(crate) fn reservation(&mut self, p: PartitionId, r: &Reservation) {
        self.0.push((meta_key(META_RESERVATION, p), encode_json(r)));
    }

    /// Partition `p`'s failover log.
    pub(crate) fn failover_log(&mut self, p: PartitionId, log: &[FailoverEntry]) {
        self.0.push((meta_key(META_FAILOVER, p), encode_json(&log)));
    }
}

fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// An exclusive lock on a data directory, released when dropped.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock> {
        use std::os::unix::io::AsRawFd;
        // Errors name the directory: "File exists" alone does not say that
        // the path is a file.
        let named = |e: std::io::Error| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("data directory {}: {e}", dir.display()),
            ))
        };
        if dir.exists() && !dir.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(named)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("tapkv.lock"))
            .map_err(named)?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Locked {
                    path: dir.to_path_buf(),
                });
            }
            return Err(Error::Io(err));
        }
        Ok(DirLock { _file: file })
    }
}

/// Items and state of one flush, for one or more partitions.
#[derive(Default)]
pub(crate) struct FlushBatch {
    /// Each partition's new persisted state: (meta key, record).
    states: Vec<(Vec<u8>, Vec<u8>)>,
    items: usize,
    /// Item entries staged for the batch, encoded back to back: RocksDB key
    /// (partition + key), then the record.
    staged: Vec<u8>,
    /// (start, key end, end) of each staged entry in `staged`.
    entries: Vec<(usize, usize, usize)>,
}

/// Refuses a RocksDB directory that holds data (write-ahead logs or
/// tables) but no `CURRENT`, the file naming its manifest: a damaged store
/// (a partial copy or restore, a file removed), not a new one. Opened as
/// new, RocksDB wrote a fresh manifest and `CURRENT` before it failed on
/// the old logs, and the next open then took the directory for an empty
/// store and deleted every table and log as obsolete. Nothing is written.
fn refuse_data_without_current(path: &Path) -> Result<()> {
    if path.join("CURRENT").exists() {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return Ok(());
    };
    let data: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log") || n.ends_with(".sst"))
        .collect();
    if data.is_empty() {
        return Ok(());
    }
    Err(Error::Corruption(format!(
        "{} holds RocksDB data ({} log and table files, such as {}) but no CURRENT file: \
         the store is damaged, not new, and was left as it is (CURRENT holds the name of \
         the newest MANIFEST-* file, followed by a newline)",
        path.display(),
        data.len(),
        data[0]
    )))
}

/// The RocksDB store of an engine.
pub(crate) struct Store {
    db: DB,
    path: PathBuf,
    /// Test hook: window-record writes still to fail
    /// ([`Engine::inject_window_record_failures`](crate::Engine::inject_window_record_failures)).
    pub(crate) injected_window_failures: AtomicUsize,
    /// Set for good once a synced write or a WAL sync has failed: the OS
    /// may have dropped pages that sync covered and report a later sync of
    /// the same file as a success, so nothing written before it can be
    /// called durable again (the flusher then poisons the engine rather
    /// than acknowledge a durable write).
    sync_failed: AtomicBool,
    /// Synced writes under way (see [`synced_writes_in_flight`](Self::synced_writes_in_flight)).
    synced_in_flight: AtomicUsize,
    /// Synced writes and WAL syncs RocksDB has reported done, counted as
    /// each returns ([`disk_syncs`](Self::disk_syncs)).
    disk_syncs: AtomicUsize,
    /// The first failed sync's error, for the poisoning reason.
    sync_failure: Mutex<Option<String>>,
    /// Test hook: syncs still to fail ([`Engine::inject_sync_failures`](crate::Engine::inject_sync_failures)).
    pub(crate) injected_sync_failures: AtomicUsize,
}

/// Files a read-only view (`DiskView`: admin tools, a node's dump) keeps
/// open at once.
const READ_ONLY_OPEN_FILES: i32 = 32;

fn db_options(create: bool) -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.create_missing_column_families(create);
    opts.set_max_background_jobs(2);
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts
}

impl Store {
    fn with_db(db: DB, path: PathBuf) -> Store {
        Store {
            db,
            path,
            injected_window_failures: AtomicUsize::new(0),
            sync_failed: AtomicBool::new(false),
            synced_in_flight: AtomicUsize::new(0),
            disk_syncs: AtomicUsize::new(0),
            sync_failure: Mutex::new(None),
            injected_sync_failures: AtomicUsize::new(0),
        }
    }

    /// Opens the store under `dir` for writing, creating it (with every
    /// column family) if it does not exist. An existing store is opened
    /// with the column families it has and nothing is added, so a
    /// directory the caller then refuses (another format or partition
    /// count) is left as the build that wrote it can still open it; the
    /// caller adds the staging column family once it has accepted the
    /// directory ([`ensure_staging`](Self::ensure_staging)).
    pub(crate) fn open(dir: &Path, max_open_files: usize) -> Result<Store> {
        let path = dir.join("rocksdb");
        refuse_data_without_current(&path)?;
        let names: Vec<String> = if path.join("CURRENT").exists() {
            DB::list_cf(&db_options(false), &path)?
        } else {
            [CF_ITEMS, CF_META, CF_STAGING].map(String::from).to_vec()
        };
        let cfs = names
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(n, db_options(true)));
        let mut opts = db_options(true);
        opts.set_max_open_files(i32::try_from(max_open_files).unwrap_or(i32::MAX));
        let db = DB::open_cf_descriptors(&opts, &path, cfs)?;
        Ok(Store::with_db(db, path))
    }

    /// Adds the staging column family if the store lacks it (a format-2
    /// directory: after this, earlier builds cannot open it), and empties
    /// it: a snapshot staged before a crash or close is never resumed.
    pub(crate) fn ensure_staging(&mut self) -> Result<()> {
        if self.db.cf_handle(CF_STAGING).is_none() {
            self.db.create_cf(CF_STAGING, &db_options(true))?;
        }
        self.clear_staged(None)
    }

    /// Opens an existing store read-only (works while a node holds it).
    pub(crate) fn open_read_only(dir: &Path) -> Result<Store> {
        let path = dir.join("rocksdb");
        refuse_data_without_current(&path)?;
        if !path.join("CURRENT").exists() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a tapkv data directory (no rocksdb/CURRENT)",
                dir.display()
            )));
        }
        let mut opts = db_options(false);
        // A view reads each table once, in order: a small table cache does.
        opts.set_max_open_files(READ_ONLY_OPEN_FILES);
        // The families it has of the two it reads: one missing (a foreign
        // or damaged RocksDB) is then `Corruption` naming it, on first use,
        // as the engine's open says (RocksDB refuses to open a family by
        // name that is not there, an `InvalidArgument`).
        let present = DB::list_cf(&opts, &path)?;
        let wanted = [CF_ITEMS, CF_META]
            .into_iter()
            .filter(|cf| present.iter().any(|p| p == cf));
        let db = DB::open_cf_for_read_only(&opts, &path, wanted, false)?;
        Ok(Store::with_db(db, path))
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or_else(|| {
            Error::Corruption(format!(
                "column family {name} missing in {}",
                self.path.display()
            ))
        })
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_META)?, key)?)
    }

    /// The JSON metadata record at `key`, decoded; `what` names it in errors.
    fn get_json<T: for<'de> Deserialize<'de>>(&self, key: &[u8], what: &str) -> Result<Option<T>> {
        self.get_meta(key)?
            .map(|raw| decode_json(&raw, what))
            .transpose()
    }

    /// Raises partition `p`'s recorded CAS (the floor the next open's CAS
    /// clock starts above) to `cas`, if below. Not synced: the close that
    /// calls it syncs the WAL once after every partition's.
    pub(crate) fn raise_max_cas(&self, p: PartitionId, cas: u64) -> Result<()> {
        let mut state = self.partition_state(p)?.unwrap_or_default();
        if state.max_cas >= cas {
            return Ok(());
        }
        state.max_cas = cas;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META)?,
            meta_key(META_STATE, p),
            encode_json(&state),
        );
        self.db.write(batch)?;
        Ok(())
    }

    fn put_meta_synced(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META)?, key, value);
        self.write_synced(batch)
    }

    fn delete_meta_synced(&self, key: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_META)?, key);
        self.write_synced(batch)
    }

    /// Writes `batch` and syncs the WAL; a failure marks the store's syncs
    /// failed for good (see [`sync_failed`](Self::sync_failed)).
    fn write_synced(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        let _in_flight = Counted::new(&self.synced_in_flight);
        let written = match self.injected_sync_failure() {
            Some(e) => Err(e),
            None => self.db.write_opt(batch, &wo).map_err(Error::from),
        };
        self.note_sync(written)
    }

    /// Synced writes under way: one may still fail (and set
    /// [`sync_failed`](Self::sync_failed)) for pages a sync that has just
    /// succeeded elsewhere reported synced.
    pub(crate) fn synced_writes_in_flight(&self) -> usize {
        self.synced_in_flight.load(Ordering::Acquire)
    }

    /// Counts a synced write under way until the guard is dropped (tests
    /// stand in for a slow one with it).
    #[cfg(all(test, not(any(loom, feature = "loom"))))]
    pub(crate) fn hold_synced_write_in_flight(&self) -> Counted<'_> {
        Counted::new(&self.synced_in_flight)
    }

    /// Whether a synced write or a WAL sync has failed since the store was
    /// opened.
    pub(crate) fn sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::Acquire)
    }

    /// What the first failed sync reported, once one has failed.
    pub(crate) fn sync_failure(&self) -> Option<String> {
        self.sync_failure.lock().clone()
    }

    /// Synced writes and WAL syncs done so far: each counted once RocksDB
    /// has returned from it, so a durable write acknowledged after a sync
    /// that covered it sees this rise past what it was when the write
    /// began (`flusher::a_persist_write_returns_only_after_a_sync_done_after_it_began`).
    pub(crate) fn disk_syncs(&self) -> u64 {
        self.disk_syncs.load(Ordering::Acquire) as u64
    }

    fn note_sync(&self, outcome: Result<()>) -> Result<()> {
        if outcome.is_ok() {
            self.disk_syncs.fetch_add(1, Ordering::AcqRel);
        }
        if let Err(e) = &outcome {
            self.sync_failure
                .lock()
                .get_or_insert_with(|| e.to_string());
            self.sync_failed.store(true, Ordering::Release);
        }
        outcome
    }

    fn injected_sync_failure(&self) -> Option<Error> {
        self.injected_sync_failures
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
            .then(|| Error::Storage("injected WAL sync failure".into()))
    }

    pub(crate) fn engine_meta(&self) -> Result<Option<EngineMeta>> {
        self.get_json(ENGINE_META_KEY, "engine metadata")
    }

    /// The engine record, checked: `None` only for a directory that holds
    /// no items. Without the record a full directory would be taken for a
    /// new one, given the configured partition count, and its keys looked
    /// for in the wrong partitions; a partition count outside 1..=1024 is
    /// damage too.
    pub(crate) fn checked_engine_meta(&self, dir: &Path) -> Result<Option<EngineMeta>> {
        let meta = self.engine_meta()?;
        match &meta {
            None if self.holds_items()? => Err(Error::Corruption(format!(
                "{}: the engine record is missing but the directory holds items",
                dir.display()
            ))),
            Some(m) if !(1..=MAX_PARTITIONS).contains(&m.partitions) => {
                Err(Error::Corruption(format!(
                    "{}: the engine record gives {} partitions (1 to {MAX_PARTITIONS} are possible)",
                    dir.display(),
                    m.partitions
                )))
            }
            _ => Ok(meta),
        }
    }

    /// Partition `p`'s state, reservation, failover log and window records,
    /// each parsed and
    /// its numbers checked ([`check_in_range`]), for the open and for
    /// [`DiskView`] alike: numbers near the top of the range could no
    /// longer increase (the open's arithmetic would wrap).
    pub(crate) fn checked_partition_records(
        &self,
        p: PartitionId,
    ) -> Result<(PartitionDiskState, Reservation)> {
        let state = self.partition_state(p)?;
        let res = match (self.reservation(p)?, &state) {
            (Some(res), _) => res,
            // Every open records a reservation before the partition hands
            // out a number, so a partition with a state record and none is
            // damaged: the last run may have handed out (and a replica may
            // hold) seqnos up to a reservation now lost. Read as 0 (before),
            // the next run reused them. The partition continues above the
            // largest reservation any run can make instead.
            (None, Some(state)) => {
                let res = Reservation {
                    seqno: state
                        .high_seqno
                        .saturating_add(crate::engine::MAX_SEQNO_RESERVATION),
                    checkpoint_id: state
                        .checkpoint_id
                        .saturating_add(crate::engine::MAX_SEQNO_RESERVATION / 1000),
                };
                tracing::warn!(
                    partition = p,
                    seqno = res.seqno,
                    checkpoint_id = res.checkpoint_id,
                    "the partition's seqno reservation record is missing: continuing above \
                     any number its last run could have handed out"
                );
                res
            }
            (None, None) => Reservation::default(),
        };
        let state = state.unwrap_or_default();
        for (what, n) in [
            ("high seqno", state.high_seqno),
            ("checkpoint id", state.checkpoint_id),
            ("CAS", state.max_cas),
            ("reserved seqno", res.seqno),
            ("reserved checkpoint id", res.checkpoint_id),
        ] {
            check_in_range(p, what, n)?;
        }
        for entry in self.failover_log(p)? {
            check_in_range(p, "failover seqno", entry.seqno)?;
        }
        // Parsed here so the open refuses them before it writes anything.
        self.open_window(p)?;
        self.lost_windows(p)?;
        Ok((state, res))
    }

    /// Whether the items family holds any record (tombstones included).
    fn holds_items(&self) -> Result<bool> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_ITEMS)?);
        it.seek_to_first();
        it.status()?;
        Ok(it.valid())
    }

    pub(crate) fn put_engine_meta(&self, meta: &EngineMeta) -> Result<()> {
        self.put_meta_synced(ENGINE_META_KEY, &encode_json(meta))
    }

    /// Records (synced) that the directory's next open as a primary starts
    /// a new failover branch (`EngineMeta::branch_pending`): its history
    /// lost data while it ran as a replica.
    pub(crate) fn remember_branch(&self) -> Result<()> {
        match self.engine_meta()? {
            Some(m) if !m.branch_pending => self.put_engine_meta(&EngineMeta {
                branch_pending: true,
                ..m
            }),
            _ => Ok(()),
        }
    }

    pub(crate) fn partition_state(&self, p: PartitionId) -> Result<Option<PartitionDiskState>> {
        self.get_json(&meta_key(META_STATE, p), &format!("state of partition {p}"))
    }

    pub(crate) fn reservation(&self, p: PartitionId) -> Result<Option<Reservation>> {
        self.get_json(
            &meta_key(META_RESERVATION, p),
            &format!("reservation of partition {p}"),
        )
    }

    /// Durably records a reservation before any number in it is handed out.
    pub(crate) fn put_reservation(&self, p: PartitionId, r: &Reservation) -> Result<()> {
        let mut w = MetaWrites::default();
        w.reservation(p, r);
        self.write_meta(w, true)
    }

    /// Writes the records gathered in `w` in one batch, synced when
    /// `synced` (one sync for them all).
    pub(crate) fn write_meta(&self, w: MetaWrites, synced: bool) -> Result<()> {
        if w.0.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_META)?;
        for (k, v) in &w.0 {
            batch.put_cf(cf, k, v);
        }
        if synced {
            self.write_synced(batch)
        } else {
            Ok(self.db.write(batch)?)
        }
    }

    /// The window recorded as open on partition `p`, if any.
    pub(crate) fn open_window(&self, p: PartitionId) -> Result<Option<WindowRecord>> {
        self.get_json(
            &meta_key(META_WINDOW, p),
            &format!("window of partition {p}"),
        )
    }

    /// Records (synced) that a window is open on `p`, or that none is.
    pub(crate) fn set_open_window(&self, p: PartitionId, w: Option<&WindowRecord>) -> Result<()> {
        let inject = |n: usize| n.checked_sub(1);
        if self
            .injected_window_failures
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, inject)
            .is_ok()
        {
            return Err(Error::Storage(
                "injected window-record write failure".into(),
            ));
        }
        match w {
            Some(w) => self.put_meta_synced(&meta_key(META_WINDOW, p), &encode_json(w)),
            None => self.delete_meta_synced(&meta_key(META_WINDOW, p)),
        }
    }

    /// Partition `p`'s failover log, oldest first.
    pub(crate) fn failover_log(&self, p: PartitionId) -> Result<Vec<FailoverEntry>> {
        Ok(self
            .get_json(
                &meta_key(META_FAILOVER, p),
                &format!("failover log of partition {p}"),
            )?
            .unwrap_or_default())
    }

    /// Durably records partition `p`'s failover log.
    pub(crate) fn put_failover_log(&self, p: PartitionId, log: &[FailoverEntry]) -> Result<()> {
        let mut w = MetaWrites::default();
        w.failover_log(p, log);
        self.write_meta(w, true)
    }

    /// Deletes every item, the persisted state, the window record and the
    /// lost windows of partition `p` (a history it no longer has), synced.
    pub(crate) fn reset_partition(&self, p: PartitionId) -> Result<()> {
        let mut batch = WriteBatch::default();
        let items = self.cf(CF_ITEMS)?;
        // Partitions are at most 1024, so `p + 1` is the next prefix.
        batch.delete_range_cf(items, p.to_be_bytes(), p.saturating_add(1).to_be_bytes());
        let meta = self.cf(CF_META)?;
        batch.delete_cf(meta, meta_key(META_STATE, p));
        batch.delete_cf(meta, meta_key(META_WINDOW, p));
        batch.delete_cf(meta, meta_key(META_LOST, p));
        self.write_synced(batch)
    }

    /// An iterator over the item records, reading the disk as it is now
    /// (RocksDB fixes that view when the iterator is created, whatever is
    /// written meanwhile). Creating it reads nothing: the seek, which may
    /// read from disk, comes with [`scan_items`](Self::scan_items), so a
    /// caller holding locks to fix the view holds them only this long.
    pub(crate) fn items_iter(&self) -> Result<ItemsIter<'_>> {
        Ok(self.db.raw_iterator_cf(self.cf(CF_ITEMS)?))
    }

    /// Calls `f` for every item record of partition `p` that `it` (from
    /// [`items_iter`](Self::items_iter)) reads, in key order, with key and
    /// record borrowed from the iterator.
    pub(crate) fn scan_items(
        mut it: ItemsIter<'_>,
        p: PartitionId,
        mut f: impl FnMut(&[u8], RecordRef<'_>) -> Result<()>,
    ) -> Result<()> {
        it.seek(p.to_be_bytes());
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            let (kp, key) = split_item_key(k)?;
            if kp != p {
                break;
            }
            let rec = decode_record_ref(v, &|| {
                format!("key {} in partition {p}", crate::text::quoted(key))
            })?;
            f(key, rec)?;
            it.next();
        }
        it.status()?;
        Ok(())
    }

    /// Writes snapshot entries of partition `p` into the staging column
    /// family, keyed by seqno (without the WAL: staged entries are scratch,
    /// dropped at the next open). Markers are skipped.
    pub(crate) fn stage_snapshot(&self, p: PartitionId, items: &[QueuedItem]) -> Result<()> {
        let cf = self.cf(CF_STAGING)?;
        let mut batch = WriteBatch::default();
        let mut v = Vec::new();
        for item in items {
            let Some(deleted) = tombstone(item.op) else {
                continue;
            };
            v.clear();
            put_varint(&mut v, item.key().len() as u64);
            v.extend_from_slice(item.key());
            append_record(&mut v, &item.meta(), deleted, item.value());
            batch.put_cf(cf, staging_key(p, item.seqno()), &v);
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Calls `f` with every staged entry of partition `p`, in seqno order,
    /// until it returns `false`; returns whether it ran to the end.
    pub(crate) fn for_each_staged(
        &self,
        p: PartitionId,
        mut f: impl FnMut(QueuedItem) -> Result<bool>,
    ) -> Result<bool> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_STAGING)?);
        it.seek(p.to_be_bytes());
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if k.get(..2) != Some(&p.to_be_bytes()[..]) {
                break;
            }
            if k.len() != 10 {
                return Err(Error::Corruption(format!(
                    "staging key of partition {p} has {} bytes, not 10",
                    k.len()
                )));
            }
            let what = || format!("staged snapshot entry of partition {p}");
            let mut pos = 0;
            let key_len = get_varint(v, &mut pos)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| v.len().saturating_sub(pos) >= *n)
                .ok_or_else(|| Error::Corruption(format!("{}: bad key length", what())))?;
            let key = &v[pos..pos + key_len];
            let rec = decode_record_ref(&v[pos + key_len..], &what)?;
            if !f(rec.to_queued(key))? {
                return Ok(false);
            }
            it.next();
        }
        it.status()?;
        Ok(true)
    }

    /// Empties the staging column family for partition `p`, or entirely.
    pub(crate) fn clear_staged(&self, p: Option<PartitionId>) -> Result<()> {
        let cf = self.cf(CF_STAGING)?;
        let (from, to) = match p {
            Some(p) => (staging_key(p, 0), staging_key(p, u64::MAX)),
            None => (staging_key(0, 0), staging_key(u16::MAX, u64::MAX)),
        };
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, from, to);
        // `delete_range` excludes its end.
        batch.delete_cf(cf, to);
        let mut wo = rocksdb::WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Number of staged entries (for tests).
    #[cfg(test)]
    pub(crate) fn staged_len(&self) -> Result<usize> {
        let mut n = 0;
        for entry in self
            .db
            .iterator_cf(self.cf(CF_STAGING)?, IteratorMode::Start)
        {
            entry?;
            n += 1;
        }
        Ok(n)
    }

    /// Flushes the staging column family's memtable to a table file (for
    /// tests: staged entries then outlive a close).
    #[cfg(test)]
    pub(crate) fn flush_staged(&self) -> Result<()> {
        self.db.flush_cf(self.cf(CF_STAGING)?)?;
        Ok(())
    }

    /// Windows of partition `p` lost to a crash or close, oldest first.
    pub(crate) fn lost_windows(&self, p: PartitionId) -> Result<Vec<WindowRecord>> {
        Ok(self
            .get_json(
                &meta_key(META_LOST, p),
                &format!("lost windows of partition {p}"),
            )?
            .unwrap_or_default())
    }

    /// Moves the open-window record of `p` (if any) to its lost list (which
    /// keeps the newest `keep`), in one synced batch; returns the lost list
    /// and whether a window was added to it. With `list` false (a replica,
    /// whose windows are its primary's: the stream sends the window again
    /// from its START) the record is only removed.
    pub(crate) fn mark_window_lost(
        &self,
        p: PartitionId,
        list: bool,
        keep: usize,
    ) -> Result<(Vec<WindowRecord>, bool)> {
        let mut lost = self.lost_windows(p)?;
        let mut added = false;
        if let Some(w) = self.open_window(p)? {
            let mut batch = WriteBatch::default();
            if list {
                lost.push(w);
                lost.drain(..lost.len().saturating_sub(keep));
                added = true;
                batch.put_cf(
                    self.cf(CF_META)?,
                    meta_key(META_LOST, p),
                    encode_json(&lost),
                );
            }
            batch.delete_cf(self.cf(CF_META)?, meta_key(META_WINDOW, p));
            self.write_synced(batch)?;
        }
        Ok((lost, added))
    }

    pub(crate) fn was_clean_shutdown(&self) -> Result<bool> {
        Ok(self.get_meta(CLEAN_SHUTDOWN_KEY)?.is_some())
    }

    /// Marks (or unmarks) the store as cleanly shut down, synced.
    pub(crate) fn set_clean_shutdown(&self, clean: bool) -> Result<()> {
        if clean {
            self.put_meta_synced(CLEAN_SHUTDOWN_KEY, b"1")
        } else {
            self.delete_meta_synced(CLEAN_SHUTDOWN_KEY)
        }
    }

    /// Reads one item record.
    pub(crate) fn get_item(&self, p: PartitionId, key: &[u8]) -> Result<Option<DiskRecord>> {
        let raw = self
            .db
            .get_pinned_cf(self.cf(CF_ITEMS)?, item_key(p, key))?;
        raw.map(|raw| {
            decode_record(Bytes::copy_from_slice(&raw), &|| {
                format!("key {} in partition {p}", crate::text::quoted(key))
            })
        })
        .transpose()
    }

    /// Calls `f` for every item record (tombstones included), in key order.
    pub(crate) fn for_each_item(
        &self,
        mut f: impl FnMut(PartitionId, &[u8], DiskRecord) -> Result<()>,
    ) -> Result<()> {
        for entry in self.db.iterator_cf(self.cf(CF_ITEMS)?, IteratorMode::Start) {
            let (k, v) = entry?;
            let (p, key) = split_item_key(&k)?;
            let rec = decode_record(Bytes::from(v), &|| {
                format!("key {} in partition {p}", crate::text::quoted(key))
            })?;
            f(p, key, rec)?;
        }
        Ok(())
    }

    /// Adds partition `p`'s new persisted state to `batch`.
    pub(crate) fn add_state_to_batch(
        &self,
        batch: &mut FlushBatch,
        p: PartitionId,
        state: &PartitionDiskState,
    ) -> Result<()> {
        batch
            .states
            .push((meta_key(META_STATE, p), encode_json(state)));
        Ok(())
    }

    /// Writes `batch` atomically (WAL on): the partitions' states and the
    /// staged entries in key order; `sync` makes it durable before return.
    /// Leaves the batch empty.
    pub(crate) fn write(&self, batch: &mut FlushBatch, sync: bool) -> Result<()> {
        let (items_cf, meta_cf) = (self.cf(CF_ITEMS)?, self.cf(CF_META)?);
        let FlushBatch {
            states,
            staged,
            entries,
            ..
        } = &mut *batch;
        let key = |e: &(usize, usize, usize)| &staged[e.0..e.1];
        // Two versions of one key (from two checkpoints) keep their seqno
        // order (they were staged in it, so the later one starts later in
        // `staged`), so the later one wins in the batch as in memory.
        entries.sort_unstable_by(|a, b| key(a).cmp(key(b)).then(a.0.cmp(&b.0)));
        // Sized up front: growing the batch's buffer copied it at every
        // doubling. Per entry: a tag, the column family and two lengths.
        let state_bytes: usize = states.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        let mut rocks_batch =
            WriteBatch::with_capacity_bytes(64 + state_bytes + staged.len() + 8 * entries.len());
        for (k, v) in states.iter() {
            rocks_batch.put_cf(meta_cf, k, v);
        }
        for e in entries.iter() {
            rocks_batch.put_cf(items_cf, key(e), &staged[e.1..e.2]);
        }
        batch.reset();
        if sync {
            return self.write_synced(rocks_batch);
        }
        self.db
            .write_opt(rocks_batch, &rocksdb::WriteOptions::default())?;
        Ok(())
    }

    /// Makes every write so far durable.
    pub(crate) fn sync_wal(&self) -> Result<()> {
        let synced = match self.injected_sync_failure() {
            Some(e) => Err(e),
            None => self.db.flush_wal(true).map_err(Error::from),
        };
        self.note_sync(synced)
    }
}

impl FlushBatch {
    /// Item entries staged since the last write.
    pub(crate) fn len(&self) -> usize {
        self.items
    }

    /// Bytes of item entries staged since the last write.
    pub(crate) fn staged_bytes(&self) -> usize {
        self.staged.len()
    }

    /// Whether a partition (its state, and any items) waits to be written.
    pub(crate) fn has_states(&self) -> bool {
        !self.states.is_empty()
    }

    /// Stages one queued entry of partition `p`, encoded (markers write
    /// nothing). Staged entries go into the RocksDB batch in key order when
    /// it is written: sorted keys make RocksDB's memtable inserts land next
    /// to each other instead of each searching the skip list from the top.
    /// Sorting the encoded copies, not the records, touches each record once.
    pub(crate) fn stage(&mut self, p: PartitionId, item: &QueuedItem) {
        let Some(deleted) = tombstone(item.op) else {
            return;
        };
        let start = self.staged.len();
        self.staged.extend_from_slice(&p.to_be_bytes());
        self.staged.extend_from_slice(item.key());
        let key_end = self.staged.len();
        append_record(&mut self.staged, &item.meta(), deleted, item.value());
        self.entries.push((start, key_end, self.staged.len()));
        self.items += 1;
    }

    /// Empties the batch for a new round, keeping the staging buffers'
    /// memory: re-growing them every round re-faulted fresh pages, about a
    /// fifth of the flusher's time.
    pub(crate) fn reset(&mut self) {
        self.states.clear();
        self.items = 0;
        self.staged.clear();
        self.entries.clear();
        // A round of huge values does not pin its buffer for good.
        if self.staged.capacity() > 64 << 20 {
            self.staged = Vec::new();
        }
    }
}

/// A view of the item records on disk, as of its creation.
pub(crate) type ItemsIter<'a> = rocksdb::DBRawIteratorWithThreadMode<'a, DB>;

/// A persisted partition as reported by [`DiskView::partitions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionDiskInfo {
    /// Partition number.
    pub partition: PartitionId,
    /// Highest persisted seqno.
    pub high_seqno: u64,
    /// Checkpoint id of the last persisted item.
    pub checkpoint_id: u64,
    /// Highest persisted CAS.
    pub max_cas: u64,
    /// Live items on disk.
    pub items: u64,
    /// The online-update window recorded as open (lost if no process has
    /// the directory open).
    pub open_window: Option<WindowRecord>,
    /// Windows lost to a crash or close, oldest first.
    pub lost_windows: Vec<WindowRecord>,
    /// Tombstones on disk.
    pub tombstones: u64,
}

/// A persisted item as reported by [`DiskView::for_each_item`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskItem {
    /// Partition.
    pub partition: PartitionId,
    /// Key.
    pub key: Bytes,
    /// The record.
    pub record: DiskRecord,
}

/// A read-only view of a data directory, for admin tools. Opening it does not
/// take the directory lock, so it also opens beside a running engine, but
/// it is then no stable view: the engine's compactions delete table files
/// the view has not opened yet, and its walk can fail part-way. A running
/// engine gives a stable one with [`Engine::disk_view`](crate::Engine::disk_view).
pub struct DiskView {
    store: Store,
    /// The point-in-time copy the view reads, if it is one; removed after
    /// the store (fields drop in order) is closed.
    _copy: Option<RemoveDirOnDrop>,
}

/// The subdirectory of a data directory holding the point-in-time copies
/// live views read (`Engine::disk_view`), each named `PID-NANOS-N` after
/// the process that made it; an engine's open removes those of processes
/// no longer running ([`remove_stale_view_copies`]).
pub(crate) const VIEWS_DIR: &str = "admin-views";

/// Removes the view copies under `dir/admin-views` left by processes that
/// are gone (a view removes its own copy when dropped; a process that died
/// first leaves it). Copies of running processes, this one included (a
/// view may outlive the engine that made it), are left alone.
pub(crate) fn remove_stale_view_copies(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join(VIEWS_DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let running = pid.is_some_and(|pid| {
            pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
        });
        if !running {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove an old view's copy");
            }
        }
    }
}

/// Removes a directory when dropped.
struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove a view's copy");
        }
    }
}

impl DiskView {
    /// A view of a point-in-time copy of `store` made in `copy` (a new
    /// directory on the same file system: tables are hard-linked, so the
    /// copy costs a flush of the store's memtables and little space); the
    /// copy is removed when the view is dropped. The engine's compactions
    /// cannot take tables from under it.
    pub(crate) fn copy_of(store: &Store, copy: PathBuf) -> Result<DiskView> {
        if let Some(parent) = copy.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Made here, or refused: a directory this did not make is never
        // removed by its guard.
        std::fs::create_dir(&copy)?;
        let guard = RemoveDirOnDrop(copy);
        rocksdb::checkpoint::Checkpoint::new(&store.db)?
            .create_checkpoint(guard.0.join("rocksdb"))?;
        let DiskView { store, .. } = DiskView::open(&guard.0)?;
        Ok(DiskView {
            store,
            _copy: Some(guard),
        })
    }

    /// Opens the data directory `dir` read-only. A directory of an on-disk
    /// format this build cannot read is `Incompatible` (format 2 differs
    /// from 3 only by a column family this view does not use).
    pub fn open(dir: impl AsRef<Path>) -> Result<DiskView> {
        let store = Store::open_read_only(dir.as_ref())?;
        if let Some(meta) = store.checked_engine_meta(dir.as_ref())? {
            if !(2..=FORMAT_VERSION).contains(&meta.format) {
                return Err(Error::Incompatible {
                    path: dir.as_ref().to_path_buf(),
                    reason: format!(
                        "on-disk format {} but this build reads 2 to {FORMAT_VERSION}",
                        meta.format
                    ),
                });
            }
        }
        Ok(DiskView { store, _copy: None })
    }

    /// Engine metadata, if the directory was ever initialised.
    pub fn engine_meta(&self) -> Result<Option<EngineMeta>> {
        self.store.engine_meta()
    }

    /// Whether the last process to use the directory shut down cleanly.
    pub fn clean_shutdown(&self) -> Result<bool> {
        self.store.was_clean_shutdown()
    }

    /// Per-partition persisted state and item counts. Every item passes
    /// the checks warmup makes, so a directory the engine would refuse is
    /// refused here with the same error.
    pub fn partitions(&self) -> Result<Vec<PartitionDiskInfo>> {
        let n = self.store.engine_meta()?.map_or(0, |m| m.partitions);
        let mut out: Vec<PartitionDiskInfo> = (0..n)
            .map(|p| -> Result<PartitionDiskInfo> {
                let (st, _) = self.store.checked_partition_records(p)?;
                Ok(PartitionDiskInfo {
                    partition: p,
                    high_seqno: st.high_seqno,
                    checkpoint_id: st.checkpoint_id,
                    max_cas: st.max_cas,
                    open_window: self.store.open_window(p)?,
                    lost_windows: self.store.lost_windows(p)?,
                    items: 0,
                    tombstones: 0,
                })
            })
            .collect::<Result<_>>()?;
        let highs: Vec<u64> = out.iter().map(|i| i.high_seqno).collect();
        self.store.for_each_item(|p, key, rec| {
            check_disk_item(p, key, &rec.meta, &highs)?;
            let info = &mut out[usize::from(p)];
            if rec.deleted {
                info.tombstones += 1;
            } else {
                info.items += 1;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` for every persisted item, tombstones included; an item
    /// warmup would refuse ends the walk with the same `Corruption`.
    pub fn for_each_item(&self, mut f: impl FnMut(DiskItem) -> Result<()>) -> Result<()> {
        let n = self.store.engine_meta()?.map_or(0, |m| m.partitions);
        let highs = (0..n)
            .map(|p| Ok(self.store.checked_partition_records(p)?.0.high_seqno))
            .collect::<Result<Vec<u64>>>()?;
        self.store.for_each_item(|partition, key, record| {
            check_disk_item(partition, key, &record.meta, &highs)?;
            f(DiskItem {
                partition,
                key: Bytes::copy_from_slice(key),
                record,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_truncation_is_corruption() {
        let metas = [
            ItemMeta::default(),
            ItemMeta {
                by_seqno: u64::MAX,
                cas: u64::MAX,
                rev_seqno: 1 << 40,
                flags: u32::MAX,
                expiry: 1_700_000_000,
            },
            ItemMeta {
                by_seqno: 300,
                cas: 117_661_791_953_158_144,
                rev_seqno: 2,
                flags: 0,
                expiry: 0,
            },
        ];
        for meta in metas {
            for deleted in [false, true] {
                let mut v = Vec::new();
                encode_record_into(&mut v, &meta, deleted, b"value");
                let rec = decode_record(Bytes::from(v.clone()), &|| "test".into()).unwrap();
                assert_eq!(
                    (rec.meta, rec.deleted, &rec.value[..]),
                    (meta, deleted, &b"value"[..])
                );
                // Every truncation inside the header is reported, never a panic.
                // (And a varint's overflowing or non-minimal form.)
                let header = v.len() - 5;
                for cut in 0..header {
                    let r = decode_record(Bytes::copy_from_slice(&v[..cut]), &|| "test".into());
                    assert!(matches!(r, Err(Error::Corruption(_))), "cut {cut}");
                }
            }
        }
        let mut v = Vec::new();
        encode_record_into(&mut v, &metas[2], false, b"x");
        assert!(
            v.len() < 1 + 1 + 4 + 4 + 8 + 8 + 8,
            "varints keep the header small"
        );
    }

    /// A varint in any form but the minimal one the encoder writes, or
    /// over 64 bits, is damage. Before, a tenth byte's extra bits were
    /// dropped (`[0x80 x 9, 0x02]` read as 0) and overlong forms read as
    /// their value, so a damaged seqno could load as 0.
    #[test]
    fn an_overflowing_or_overlong_varint_is_corruption() {
        let record = |seqno: &[u8]| {
            let mut v = vec![RECORD_VERSION, 0, 0, 0];
            v.extend_from_slice(&1u64.to_be_bytes());
            v.push(1);
            v.extend_from_slice(seqno);
            decode_record(Bytes::from(v), &|| "test".into())
        };
        let mut overflowing = vec![0x80; 9];
        overflowing.push(0x02);
        for bad in [&overflowing[..], &[0x80, 0x00], &[0x81, 0x80, 0x00]] {
            assert!(
                matches!(record(bad), Err(Error::Corruption(_))),
                "{bad:?} accepted"
            );
        }
        for (good, n) in [
            (&[0x00][..], 0),
            (&[0x7f][..], 127),
            (&[0x80, 0x01][..], 128),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..],
                u64::MAX,
            ),
        ] {
            assert_eq!(record(good).unwrap().meta.by_seqno, n, "{good:?}");
        }
    }

    #[test]
    fn a_staged_entry_with_an_absurd_key_length_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 256).unwrap();
        store.ensure_staging().unwrap();
        let mut v = Vec::new();
        put_varint(&mut v, u64::MAX);
        store
            .db
            .put_cf(store.cf(CF_STAGING).unwrap(), staging_key(0, 1), &v)
            .unwrap();
        let r = store.for_each_staged(0, |_| Ok(true));
        assert!(matches!(r, Err(Error::Corruption(_))), "{r:?}");
    }
}
