//! The engine's error type: one variant per thing a caller can act on.
//!
//! Every public operation returns [`Result`]. Variants name what went wrong and,
//! where it helps, what to do about it. Nothing here is ever a panic in disguise.

use std::path::PathBuf;

/// Result alias used by every engine API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything an engine call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key does not exist (or has expired).
    #[error("key not found")]
    NotFound,
    /// `add` on a key that already exists.
    #[error("key already exists")]
    Exists,
    /// The caller's expected CAS does not match the item's current CAS.
    #[error("CAS mismatch: expected {expected}, current {current}")]
    CasMismatch {
        /// CAS the caller supplied.
        expected: u64,
        /// CAS the item has now (0 if the key is absent).
        current: u64,
    },
    /// The key is longer than the configured maximum (an empty key is
    /// `InvalidArgument`).
    #[error("key length {len} is over the maximum of {max} bytes")]
    KeyTooLarge {
        /// Length of the rejected key.
        len: usize,
        /// Configured maximum (`EngineBuilder::max_key_size`).
        max: usize,
    },
    /// The value is longer than the configured maximum.
    #[error("value length {len} exceeds the maximum of {max} bytes")]
    ValueTooLarge {
        /// Length of the rejected value.
        len: usize,
        /// Configured maximum (`EngineBuilder::max_value_size`).
        max: usize,
    },
    /// Memory is exhausted for now; retry after the flusher catches up (or the
    /// named online-update window is completed or reverted).
    #[error("temporarily out of memory: {reason}")]
    TempOutOfMemory {
        /// What is full and what frees it.
        reason: String,
    },
    /// The partition number is outside `0..num_partitions`.
    #[error("partition {partition} does not exist (engine has {count})")]
    NoSuchPartition {
        /// Requested partition.
        partition: u16,
        /// Number of partitions the engine has.
        count: u16,
    },
    /// An argument was rejected; the message says which and why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The partition has an online-update window open, which rules the
    /// request out (a second START, or a `Persist` write that cannot be made
    /// durable before the window ends): complete or revert the window first.
    #[error("partition {partition} has online-update window {checkpoint_id} open: {what}")]
    OnlineUpdateOpen {
        /// Partition.
        partition: u16,
        /// The open window's checkpoint id.
        checkpoint_id: u64,
        /// What cannot be done.
        what: &'static str,
    },
    /// COMPLETE or REVERT on a partition with no open online-update window.
    #[error("partition {partition} has no online-update window open")]
    NoOnlineUpdate {
        /// Partition.
        partition: u16,
    },
    /// The operation is not allowed in the partition's current state
    /// (for example an online-update command out of order).
    #[error("wrong state: {0}")]
    WrongState(String),
    /// A durable write did not become durable within the configured time.
    #[error("timed out after {millis} ms waiting for {what}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// How long the wait lasted.
        millis: u64,
    },
    /// The engine was closed; open it again.
    #[error("engine is closed")]
    Closed,
    /// A background failure (such as repeated flush errors) stopped the engine
    /// to protect the data on disk. Nothing acknowledged as persisted is lost:
    /// restart the process and reopen the data directory.
    #[error("engine is poisoned by an earlier background failure: {0}")]
    Poisoned(String),
    /// Another process (or another engine in this process) holds the data
    /// directory: tapkv's own lock, or RocksDB's, which a program other than
    /// tapkv may hold.
    #[error("data directory {path} is in use by another process or engine")]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
    /// The data directory was written with different, incompatible settings.
    #[error("data directory {path} is incompatible: {reason}")]
    Incompatible {
        /// The data directory.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// On-disk data could not be decoded; names what was corrupt.
    #[error("corruption: {0}")]
    Corruption(String),
    /// An I/O error from the file system.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// An error reported by RocksDB.
    #[error("storage error: {0}")]
    Storage(String),
}

impl Error {
    /// Whether the error is the engine's own fault (its storage, its I/O,
    /// its being closed, poisoned or corrupt, a wait that timed out) rather
    /// than something wrong with the request: a replica that meets one
    /// while applying its primary's entry keeps what the partition holds
    /// and tries again later, where bad input makes it resynchronise.
    pub fn is_own_fault(&self) -> bool {
        matches!(
            self,
            Error::Storage(_)
                | Error::Io(_)
                | Error::Closed
                | Error::Poisoned(_)
                | Error::Corruption(_)
                | Error::Timeout { .. }
        )
    }

    /// The message without a leading restatement of [`kind`](Self::kind)
    /// (`wrong state: ...` for `wrong_state`), for `<kind>: <detail>` lines.
    pub fn detail(&self) -> String {
        match self {
            // Their messages say the kind in other words.
            Error::Io(e) => return e.to_string(),
            Error::Storage(msg) => return msg.clone(),
            _ => {}
        }
        let text = self.to_string();
        let said = format!("{}: ", self.kind().replace('_', " "));
        match text.strip_prefix(&said) {
            Some(rest) => rest.to_string(),
            None => text,
        }
    }

    /// A short machine-readable name of the variant, for tools and protocols.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound => "not_found",
            Error::Exists => "exists",
            Error::CasMismatch { .. } => "cas_mismatch",
            Error::KeyTooLarge { .. } => "key_too_large",
            Error::ValueTooLarge { .. } => "value_too_large",
            Error::TempOutOfMemory { .. } => "temp_oom",
            Error::NoSuchPartition { .. } => "no_such_partition",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::WrongState(_) => "wrong_state",
            Error::OnlineUpdateOpen { .. } => "window_open",
            Error::NoOnlineUpdate { .. } => "no_window",
            Error::Timeout { .. } => "timeout",
            Error::Closed => "closed",
            Error::Poisoned(_) => "poisoned",
            Error::Locked { .. } => "locked",
            Error::Incompatible { .. } => "incompatible",
            Error::Corruption(_) => "corruption",
            Error::Io(_) => "io",
            Error::Storage(_) => "storage",
        }
    }
}

impl From<rocksdb::Error> for Error {
    /// RocksDB's `Corruption` (a checksum mismatch, a torn table file) is
    /// [`Error::Corruption`], so a damaged directory is reported as damaged;
    /// everything else is [`Error::Storage`].
    fn from(e: rocksdb::Error) -> Self {
        match e.kind() {
            rocksdb::ErrorKind::Corruption => {
                let msg = e.into_string();
                let detail = msg.strip_prefix("Corruption: ").unwrap_or(&msg);
                Error::Corruption(format!("RocksDB: {detail}"))
            }
            _ => Error::Storage(e.into_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detail_never_restates_its_kind() {
        // Before, `io` and `storage` errors kept their "I/O error: " and
        // "storage error: " prefixes, so a tool's `<kind>: <detail>` line
        // read `ERROR io: I/O error: cannot reach node ...`.
        let io = Error::Io(std::io::Error::other("cannot reach node"));
        assert_eq!(
            format!("{}: {}", io.kind(), io.detail()),
            "io: cannot reach node"
        );
        let storage = Error::Storage("disk full".into());
        assert_eq!(storage.detail(), "disk full");
        let wrong = Error::WrongState("no window open".into());
        assert_eq!(wrong.detail(), "no window open");
    }
}
