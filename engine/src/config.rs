//! Engine settings and the builder that opens an engine.
//!
//! Every limit the engine enforces is a field here with a documented default.

use std::path::PathBuf;
use std::time::Duration;

use crate::checkpoint::CheckpointConfig;
use crate::engine::Engine;
use crate::error::Result;

/// All settings of an engine. Build one through [`Engine::builder`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Data directory.
    pub path: PathBuf,
    /// Number of partitions (default 16). Fixed when the directory is created.
    pub partitions: u16,
    /// Whether an existing directory's own partition count replaces
    /// `partitions` on open (default true, so a directory made with any
    /// count reopens with default settings). [`EngineBuilder::partitions`]
    /// turns it off: an explicit count that differs from the directory's is
    /// then refused as `Incompatible`.
    pub partitions_from_disk: bool,
    /// Per-checkpoint limits (default 2,000 items or 32 MiB; each at least 1,
    /// zero is refused at open).
    pub checkpoint: CheckpointConfig,
    /// Bound on the memory held by all checkpoints together (default 512 MiB).
    /// Past it, writes fail with `TempOutOfMemory` until the flusher frees some.
    pub checkpoint_memory_limit: usize,
    /// Items after which one partition's part of a flush ends, at the next
    /// checkpoint boundary (default 2,000; a soft limit: a round only stops
    /// where the disk is consistent, so it may run on to the end of the
    /// checkpoint it is in — at most `checkpoint.max_items` more).
    pub flush_batch_max_items: usize,
    /// Bytes after which one partition's part of a flush ends, at the next
    /// checkpoint boundary (default 4 MiB; soft, like `flush_batch_max_items`).
    pub flush_batch_max_bytes: usize,
    /// Number of flusher threads; partition `p` is flushed by thread
    /// `p % flusher_threads` (default 1).
    pub flusher_threads: usize,
    /// A floor on the flusher threads' niceness, 0 to 19 (default 0, off:
    /// they keep the niceness of the thread that opens the engine, even a
    /// negative one). A flusher whose niceness is below a floor above 0
    /// raises it to it when it starts (Linux `setpriority` on the thread;
    /// nothing elsewhere); one never raises its own priority. Meant for a
    /// replica on a machine whose cores are busy: at 10 its flusher (and the
    /// pager, which runs on flusher thread 0) gets about a tenth of a core the
    /// stream's apply also wants, so the apply, which the primary waits on,
    /// comes first, and persisting catches up whenever the apply waits
    /// (see `docs/engine.md`, "Flusher priority", for what it costs: past
    /// `checkpoint_memory_limit` the apply waits for this slower flusher,
    /// and the flusher holds locks the apply needs).
    pub flusher_nice: i32,
    /// Pause of a busy flusher between rounds, so that writes queue up into
    /// larger batches (default 2 ms). `Persist` writes and `flush()` wake it
    /// at once; this bounds how long a `Memory` write waits to reach disk.
    /// At most 60 s (a longer one is refused at open).
    pub flush_interval: Duration,
    /// Consecutive failed flush attempts tolerated before the engine is
    /// poisoned (default 5).
    pub flush_retry_limit: u32,
    /// Pause between flush attempts after a failure (default 20 ms; at most
    /// 60 s, a longer one is refused at open).
    pub flush_retry_backoff: Duration,
    /// Bytes an online-update window may hold per partition: its queued
    /// entries plus the pre-window keys and values it keeps to revert (a
    /// replica counts its primary's window's queued bytes); default
    /// 256 MiB. Past it, writes to that partition fail with
    /// `TempOutOfMemory` naming the window until it is completed or reverted.
    pub online_update_memory_limit: usize,
    /// Memory quota for keys and resident values (default 1 GiB).
    pub memory_quota: usize,
    /// Files RocksDB keeps open at once (its table cache; SST files past it
    /// are reopened as they are read); default 256, 16 to 1,000,000. With
    /// the WAL, the manifest and the directory lock, this bounds the file
    /// descriptors the engine takes, so a process serving connections can
    /// budget for them.
    pub max_open_files: usize,
    /// Fraction of the quota above which the pager evicts clean values
    /// (default 0.85).
    pub high_water: f64,
    /// Fraction of the quota the pager evicts down to (default 0.75).
    pub low_water: f64,
    /// How often the expiry pass looks for expired items and deletes them
    /// (default 60 s; `Duration::ZERO`: after every flush round). Expired
    /// items read as absent at once; the pass frees their memory and puts a
    /// tombstone on disk and on replicas. Primaries only: a replica gets
    /// its primary's deletions.
    pub expiry_pager_interval: Duration,
    /// Longest key in bytes (default 250).
    pub max_key_size: usize,
    /// Whether an open raises `max_key_size` to the longest key already in
    /// the directory (default true: a directory written under a larger
    /// limit reopens with default settings, and its keys stay readable
    /// and deletable). [`EngineBuilder::max_key_size`] turns it off: a
    /// directory holding a longer key is then refused as `Incompatible`.
    pub max_key_size_from_disk: bool,
    /// Whether this engine holds replica partitions (default false): seqnos
    /// come from a primary, so each partition restarts at its persisted seqno
    /// (to resume its stream) and no failover entries are created.
    pub replica: bool,
    /// Longest value in bytes (default 20 MiB).
    pub max_value_size: usize,
    /// How long a `Persist` write or `flush()` waits for the disk (default 30 s;
    /// `Duration::MAX` waits without a limit; zero is refused at open).
    pub persist_timeout: Duration,
    /// Group commit: when a flush round starts with two or more `Persist`
    /// writers waiting, it waits up to this long, while more keep arriving,
    /// so one sync serves the whole burst (default 200 µs; zero disables).
    /// A lone `Persist` writer never waits for it.
    pub group_commit_wait: Duration,
    /// How long a `Replicate` write waits for a majority of replicas (default 5 s;
    /// `Duration::MAX` waits without a limit; zero is refused at open).
    pub replicate_timeout: Duration,
    /// Failover-log entries a partition keeps, the newest (default 25, at
    /// least 1; as Couchbase's `max_failover_entries`): each unclean
    /// restart of a primary adds one, and a replica resuming from a branch
    /// older than all of them rolls the partition back and resyncs it. The
    /// list of online-update windows lost to crashes keeps as many.
    pub max_failover_entries: usize,
    /// Seqnos and checkpoint ids reserved on disk at a time, so numbers are
    /// never reused after a crash (default 1,000,000 seqnos, 1 to 2^40;
    /// ids use 1/1000).
    pub seqno_reservation: u64,
    /// Bytes of a disk snapshot (a backfill from a primary) a replica holds
    /// in memory per partition before it spills the snapshot to a scratch
    /// column family on disk (default 64 MiB). A disk snapshot arrives in key
    /// order and is applied in seqno order at its end, so without this bound
    /// a replica would hold a whole partition in memory while it backfills.
    pub snapshot_buffer_limit: usize,
    /// Fraction of `checkpoint_memory_limit` in use at which the flusher
    /// drops stream cursors (those of [`Engine::stream_start`]) that alone
    /// hold closed checkpoints the persistence cursor has left, once those
    /// hold at least `limit / (2 × partitions)` (default 0.9). A
    /// replica that reads slowly would otherwise hold the primary's
    /// checkpoints until writes are refused; a node's stream whose cursor
    /// was dropped sends that partition again, from disk for what memory no
    /// longer holds. 1.0 or more: never.
    pub cursor_drop_threshold: f64,
}

impl EngineConfig {
    /// Defaults for a data directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EngineConfig {
            path: path.into(),
            partitions: 16,
            partitions_from_disk: true,
            max_key_size_from_disk: true,
            checkpoint: CheckpointConfig::default(),
            checkpoint_memory_limit: 512 << 20,
            flush_batch_max_items: 2_000,
            flush_batch_max_bytes: 4 << 20,
            flusher_threads: 1,
            flusher_nice: 0,
            flush_interval: Duration::from_millis(2),
            flush_retry_limit: 5,
            flush_retry_backoff: Duration::from_millis(20),
            online_update_memory_limit: 256 << 20,
            memory_quota: 1 << 30,
            max_open_files: 256,
            high_water: 0.85,
            low_water: 0.75,
            expiry_pager_interval: Duration::from_secs(60),
            max_key_size: 250,
            replica: false,
            max_value_size: 20 << 20,
            persist_timeout: Duration::from_secs(30),
            group_commit_wait: Duration::from_micros(200),
            replicate_timeout: Duration::from_secs(5),
            max_failover_entries: 25,
            seqno_reservation: 1_000_000,
            snapshot_buffer_limit: 64 << 20,
            cursor_drop_threshold: 0.9,
        }
    }
}

/// Builder returned by [`Engine::builder`]; every setter documents its default.
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    config: EngineConfig,
}

impl EngineBuilder {
    pub(crate) fn new(path: PathBuf) -> Self {
        EngineBuilder {
            config: EngineConfig::new(path),
        }
    }

    /// Number of partitions; default 16, range 1..=1024. Without this call
    /// an existing directory opens with the count it was created with; with
    /// it, a directory created with another count is refused.
    pub fn partitions(mut self, n: u16) -> Self {
        self.config.partitions = n;
        self.config.partitions_from_disk = false;
        self
    }

    /// Items after which the open checkpoint closes; default 2,000.
    pub fn checkpoint_max_items(mut self, n: usize) -> Self {
        self.config.checkpoint.max_items = n;
        self
    }

    /// Bytes after which the open checkpoint closes; default 32 MiB.
    pub fn checkpoint_max_bytes(mut self, n: usize) -> Self {
        self.config.checkpoint.max_bytes = n;
        self
    }

    /// Bound on all checkpoint memory; default 512 MiB.
    pub fn checkpoint_memory_limit(mut self, bytes: usize) -> Self {
        self.config.checkpoint_memory_limit = bytes;
        self
    }

    /// Items per partition per flush before stopping at the next checkpoint
    /// boundary; default 2,000.
    pub fn flush_batch_max_items(mut self, n: usize) -> Self {
        self.config.flush_batch_max_items = n;
        self
    }

    /// Bytes per partition per flush before stopping at the next checkpoint
    /// boundary; default 4 MiB.
    pub fn flush_batch_max_bytes(mut self, n: usize) -> Self {
        self.config.flush_batch_max_bytes = n;
        self
    }

    /// Flusher threads; default 1.
    pub fn flusher_threads(mut self, n: usize) -> Self {
        self.config.flusher_threads = n;
        self
    }

    /// Floor on the flusher threads' niceness, 0..=19; default 0, off: they
    /// keep the opening thread's (see [`EngineConfig::flusher_nice`]).
    pub fn flusher_nice(mut self, nice: i32) -> Self {
        self.config.flusher_nice = nice;
        self
    }

    /// Busy flusher's pause between rounds; default 2 ms, at most 60 s.
    pub fn flush_interval(mut self, d: Duration) -> Self {
        self.config.flush_interval = d;
        self
    }

    /// Consecutive flush failures before poisoning; default 5.
    pub fn flush_retry_limit(mut self, n: u32) -> Self {
        self.config.flush_retry_limit = n;
        self
    }

    /// Files RocksDB keeps open at once; default 256, 16 to 1,000,000 (see
    /// [`EngineConfig::max_open_files`]).
    pub fn max_open_files(mut self, n: usize) -> Self {
        self.config.max_open_files = n;
        self
    }

    /// Pause after a failed flush before the retry; default 20 ms, at most 60 s.
    pub fn flush_retry_backoff(mut self, d: Duration) -> Self {
        self.config.flush_retry_backoff = d;
        self
    }

    /// Bytes one online-update window may hold (see
    /// [`EngineConfig::online_update_memory_limit`]); default 256 MiB.
    pub fn online_update_memory_limit(mut self, bytes: usize) -> Self {
        self.config.online_update_memory_limit = bytes;
        self
    }

    /// Memory quota for keys and resident values; default 1 GiB. The pager
    /// evicts clean values to stay under it; it is not a bound on what it
    /// cannot evict (values not yet persisted are bounded by the checkpoint
    /// and window memory limits; keys and metadata stay resident whatever
    /// their size), and the per-item overhead (about 80 bytes) is not
    /// counted against it.
    pub fn memory_quota(mut self, bytes: usize) -> Self {
        self.config.memory_quota = bytes;
        self
    }

    /// Pager high and low water marks as fractions of the quota; defaults
    /// 0.85 and 0.75. The open refuses marks outside 0 < low < high <= 1.
    pub fn water_marks(mut self, high: f64, low: f64) -> Self {
        self.config.high_water = high;
        self.config.low_water = low;
        self
    }

    /// How often expired items are deleted (see
    /// [`EngineConfig::expiry_pager_interval`]); default 60 s.
    pub fn expiry_pager_interval(mut self, every: Duration) -> Self {
        self.config.expiry_pager_interval = every;
        self
    }

    /// Replica mode (see [`EngineConfig::replica`]); default false.
    pub fn replica(mut self, replica: bool) -> Self {
        self.config.replica = replica;
        self
    }

    /// Longest key; default 250 bytes, 1 to 65,535 (a larger or zero size
    /// is refused at open with `Error::InvalidArgument`). Without this
    /// call an existing directory holding longer keys opens with its
    /// longest key's length; with it, such a directory is refused as
    /// `Incompatible` (naming the length to give).
    pub fn max_key_size(mut self, n: usize) -> Self {
        self.config.max_key_size = n;
        self.config.max_key_size_from_disk = false;
        self
    }

    /// Largest value; default 20 MiB, at most 1 GiB (a larger size is
    /// refused at open with `Error::InvalidArgument`).
    pub fn max_value_size(mut self, n: usize) -> Self {
        self.config.max_value_size = n;
        self
    }

    /// Group-commit gathering time; default 200 µs, zero disables (see
    /// [`EngineConfig::group_commit_wait`]).
    pub fn group_commit_wait(mut self, d: Duration) -> Self {
        self.config.group_commit_wait = d;
        self
    }

    /// How long durable writes wait; default 30 s.
    pub fn persist_timeout(mut self, d: Duration) -> Self {
        self.config.persist_timeout = d;
        self
    }

    /// Failover-log entries kept per partition; default 25 (see
    /// [`EngineConfig::max_failover_entries`]).
    pub fn max_failover_entries(mut self, n: usize) -> Self {
        self.config.max_failover_entries = n;
        self
    }

    /// Seqnos reserved on disk at a time; default 1,000,000, range 1..=2^40
    /// (see [`EngineConfig::seqno_reservation`]). A smaller one writes the
    /// reservation more often; a larger one skips more numbers after a crash.
    pub fn seqno_reservation(mut self, n: u64) -> Self {
        self.config.seqno_reservation = n;
        self
    }

    /// How long `Replicate` writes wait; default 5 s.
    pub fn replicate_timeout(mut self, d: Duration) -> Self {
        self.config.replicate_timeout = d;
        self
    }

    /// Memory a replica holds of one disk snapshot before spilling it to
    /// disk; default 64 MiB (see [`EngineConfig::snapshot_buffer_limit`]).
    pub fn snapshot_buffer_limit(mut self, bytes: usize) -> Self {
        self.config.snapshot_buffer_limit = bytes;
        self
    }

    /// Checkpoint-memory fraction at which lagging stream cursors are
    /// dropped; default 0.9 (see [`EngineConfig::cursor_drop_threshold`]).
    pub fn cursor_drop_threshold(mut self, fraction: f64) -> Self {
        self.config.cursor_drop_threshold = fraction;
        self
    }

    /// The settings as they stand.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Creates the data directory if needed, or reopens it (warmup).
    pub fn open(self) -> Result<Engine> {
        Engine::open_with(self.config)
    }
}
