//! `tapkv node`: run one engine behind a TCP listener, as a primary or as a
//! replica of another node, until SIGTERM, SIGINT or SIGHUP.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tapkv_engine::{Engine, Error};
use tapkv_replication::node::{Node, NodeConfig};

/// Upper bounds of the timing options, the node's own (beyond them a
/// deadline could overflow; nobody means a longer one).
const DAY_MS: u64 = tapkv_replication::node::MAX_TIMEOUT.as_millis() as u64;
const HOUR_MS: u64 = tapkv_replication::node::MAX_HEARTBEAT.as_millis() as u64;

#[derive(Args, Debug)]
pub(crate) struct NodeArgs {
    /// Data directory (created if missing; a new store is not started in a
    /// directory holding other files).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Address to listen on, HOST:PORT (port 0 picks a free port; the
    /// startup line says which).
    #[arg(long, default_value = "127.0.0.1:11311", value_parser = listen_addr)]
    listen: String,
    /// Run as a replica of the primary at this address (HOST:PORT). A host
    /// that does not resolve yet (a primary still starting) is retried,
    /// with a warning each time, until it does.
    #[arg(long, value_name = "ADDR", value_parser = node_addr)]
    replica_of: Option<String>,
    /// Name of this node, used as its replication stream's name (give each
    /// replica of a primary its own). Default: `node-<random id>`, made on
    /// first start and kept in DIR/node-name. 1 to 255 bytes of UTF-8, not
    /// blank, no control characters.
    #[arg(long, value_parser = node_name)]
    name: Option<String>,
    /// Number of partitions when creating the data directory (default 16,
    /// 1 to 1024). An existing directory keeps its own count; giving a
    /// different one is refused. A new replica without it takes its
    /// primary's count; a replica given another count than its primary's
    /// does not replicate.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(tapkv_engine::MAX_PARTITIONS)))]
    partitions: Option<u16>,
    /// Unacknowledged bytes allowed per replication stream.
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    max_unacked_bytes: u64,
    /// Milliseconds a stream may sit at its unacknowledged limit with no
    /// acknowledgement of progress (bytes applied or a seqno advanced)
    /// before its cursors are dropped (the replica is backfilled later).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=DAY_MS))]
    slow_replica_ms: u64,
    /// As a primary: the replicas a `Replicate` write is measured against
    /// while fewer can acknowledge it. A write needs a majority of this many
    /// or of the replicas streaming its partition from memory, whichever is
    /// larger (one still joining does not count yet); with the default 1 it
    /// is never acknowledged while no replica holds it. 0: acknowledged at
    /// once when no replica can acknowledge it (none connected, or all
    /// still joining).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Milliseconds a `Replicate` write waits for a majority of replicas (at most a day).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=DAY_MS))]
    replicate_timeout_ms: u64,
    /// Timeout of every socket write and of waiting for a reply, in ms (at
    /// most a day). Also: a connection must say HELLO within it (or within
    /// --idle-timeout-s, if that is shorter), a partly
    /// received frame must make 64 KiB of progress per timeout, and a
    /// replica waits this long for memory inside an online-update window.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=DAY_MS))]
    io_timeout_ms: u64,
    /// Close client connections idle this many seconds (at most a day).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=DAY_MS / 1000))]
    idle_timeout_s: u64,
    /// Stream heartbeat interval in ms (a replica reconnects after 10 silent
    /// ones; at most an hour).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=HOUR_MS))]
    heartbeat_ms: u64,
    /// After a stream round that sent less than 256 KiB, wait this many
    /// microseconds before the next, so steady writes go out in fewer,
    /// larger bursts (skipped while a Replicate write waits; 0: off; at
    /// most 10000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    stream_linger_us: u64,
    /// As a replica: acknowledge after applying this many stream bytes (and
    /// whenever everything received is applied). Keep it well under the
    /// primary's --max-unacked-bytes.
    #[arg(long, default_value_t = 512 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    ack_bytes: u64,
    /// Memory quota for keys and resident values, in bytes (engine default
    /// 1 GiB; at least 1 MiB).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1 << 20..))]
    memory_quota: Option<u64>,
    /// Bound on all checkpoint memory, in bytes (engine default 512 MiB; at
    /// least 64 KiB, and at least the sum of --max-key-size,
    /// --max-value-size and 64, checked at start: about 20 MiB with the
    /// default sizes).
    #[arg(long, value_parser = clap::value_parser!(u64).range(65_536..))]
    checkpoint_memory_limit: Option<u64>,
    /// Bytes one online-update window may hold, per partition: its queued
    /// entries plus the pre-window values it keeps to revert; a replica
    /// counts the queued bytes of its primary's window, against this limit
    /// if the primary's is larger, else against twice it (engine default 256 MiB;
    /// at least 64 KiB, and at least twice the sum of --max-key-size,
    /// --max-value-size and 64, checked at start: about 40 MiB with the
    /// default sizes; give replicas at least their primary's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(65_536..))]
    online_update_memory_limit: Option<u64>,
    /// As a replica: bytes of one partition's disk snapshot (backfill) held
    /// in memory before it is spilled to disk (engine default 64 MiB; at
    /// least 64 KiB).
    #[arg(long, value_parser = clap::value_parser!(u64).range(65_536..))]
    snapshot_buffer_limit: Option<u64>,
    /// Fraction of the checkpoint memory limit at which stream cursors
    /// behind the disk are dropped (the stream sends those partitions again,
    /// from disk for what memory no longer holds);
    /// must be > 0; engine default 0.9; 1 or more: never.
    #[arg(long, value_parser = positive_fraction, allow_negative_numbers = true)]
    cursor_drop_threshold: Option<f64>,
    /// Floor on the niceness of the engine's flusher threads, 0 to 19
    /// (default 0: off, the node's own). For a replica on busy cores, 10 lets
    /// applying the primary's stream come first and persisting catch up
    /// when the apply waits; past the checkpoint memory limit the apply then
    /// waits for the slower flusher (see docs/engine.md, Flusher priority).
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..=19), allow_negative_numbers = true)]
    flusher_nice: Option<i32>,
    /// `tapkv admin dump`s served at once: each reads the data directory
    /// through its own read-only view, which holds memory until its client
    /// has read it all; one more is answered TEMP_FAILURE (busy). 1 to 1024.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_dumps: u64,
    /// Files the engine's RocksDB keeps open at once (its table cache), 16
    /// to 1000000. With --max-connections it sizes the open-file limit the
    /// node needs (see --max-connections).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    max_open_files: u64,
    /// Connections served at once (clients and replication streams, a
    /// thread each); one more is answered TEMP_FAILURE and closed. Each
    /// takes up to 3 file descriptors: the node raises its soft open-file
    /// limit to what --max-connections, --max-open-files and --max-dumps
    /// need (up to the hard limit), and serves fewer, with a warning, if
    /// the hard limit is lower.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Longest key accepted, in bytes (engine default 250, memcached's; at
    /// most 65535, the frame's key-length field). Without it, a directory
    /// holding longer keys (written under a larger limit) takes its longest
    /// key's length; with a smaller one, the node refuses to start.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=65_535))]
    max_key_size: Option<u64>,
    /// Largest value accepted, in bytes (engine default 20 MiB; at most
    /// 1 GiB less 128 KiB, so a stream frame carrying it stays under the
    /// 1 GiB a replica reads). Raise --max-body with it (and, past 256 MiB,
    /// --max-pending-body-bytes and --max-pending-reply-bytes): a larger
    /// frame is refused whole.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=(1 << 30) - (128 << 10)))]
    max_value_size: Option<u64>,
    /// As a replica over a directory that held a primary's data: accept
    /// that partitions whose history differs from the primary's are rolled
    /// back, or resynchronised after the primary branched (an unclean
    /// restart), replacing that data (without it, such a reset is refused
    /// and the node does not replicate; `tapkv admin inspect --addr` on the
    /// replica then says NOT REPLICATING and why).
    #[arg(long)]
    replace_data: bool,
    /// Bytes that partly received frames larger than 1 MiB may hold across
    /// all connections together; a large frame past it is answered
    /// TEMP_FAILURE and its connection closed (at least 1 MiB, and at least
    /// --max-body plus 24: raise it with --max-body).
    #[arg(long, default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range(1 << 20..))]
    max_pending_body_bytes: u64,
    /// Bytes that replies larger than 1 MiB (a GET of a large value) may
    /// hold across all connections together while their clients read
    /// them; a reply past it is answered TEMP_FAILURE "busy" instead and
    /// the connection kept (at least 1 MiB, and at least --max-body plus
    /// 24: raise it with --max-body).
    #[arg(long, default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range(1 << 20..))]
    max_pending_reply_bytes: u64,
    /// Largest accepted frame body in bytes (a request's extras, key and
    /// value; at least 4096, at most 1 GiB less 64 KiB: a replica reads
    /// stream frames of up to 1 GiB).
    #[arg(long, default_value_t = tapkv_replication::protocol::DEFAULT_MAX_BODY as u64,
          value_parser = clap::value_parser!(u64).range(4096..=(1 << 30) - (64 << 10)))]
    max_body: u64,
}

/// Whether `data` already holds a store (then its own partition count is
/// kept).
fn has_store(data: &std::path::Path) -> bool {
    data.join("rocksdb").join("CURRENT").exists()
}

/// The partition count of the node at `primary` (from its HELLO).
fn primary_partitions(primary: &str, timeout: Duration) -> Result<u16, Error> {
    Ok(crate::connect(primary, timeout)?.partitions())
}

/// `--name`: text of 1 to 255 bytes, not blank, without control characters
/// (it names the replication stream and the node in its startup line).
fn node_name(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("the name is empty or blank".into());
    }
    tapkv_replication::node::check_stream_name(s.as_bytes())?;
    Ok(s.to_string())
}

/// `--cursor-drop-threshold`: a finite number above 0.
fn positive_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && f > 0.0 => Ok(f),
        Ok(_) => Err("must be a finite number > 0".into()),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// `--replica-of`: `HOST:PORT` with a port number (a usage error
/// otherwise, before the data directory is touched: a node given a
/// malformed one used to create its directory and then retry for ever).
/// Whether the host resolves is not checked here: one that does not yet is
/// retried.
/// A node's address as `--replica-of`, `--addr` take it: HOST:PORT, refused
/// at parse time (a usage error naming the problem) rather than when a
/// connection is tried.
pub(crate) fn node_addr(s: &str) -> Result<String, String> {
    host_port(s, false)
}

/// `--listen`: HOST:PORT as [`node_addr`] takes it, port 0 allowed (a
/// usage error otherwise, as a malformed `--replica-of` is; a port in use
/// is found when the node binds it).
fn listen_addr(s: &str) -> Result<String, String> {
    host_port(s, true)
}

fn host_port(s: &str, port_zero: bool) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT".to_string())?;
    if host.trim().is_empty() {
        return Err("expected HOST:PORT (the host is empty)".into());
    }
    // An IPv6 address is written in brackets (`[::1]:11311`): without
    // them, `fe80::1:11311` could never resolve and would be retried for
    // ever.
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("expected HOST:PORT (an IPv6 host goes in brackets: [ADDR]:PORT)".into());
    }
    match port.parse::<u16>() {
        Ok(0) if !port_zero => Err("expected HOST:PORT (port 0 cannot be connected to)".into()),
        Ok(_) => Ok(s.to_string()),
        Err(e) => Err(format!("expected HOST:PORT (port {port:?}: {e})")),
    }
}

/// File in the data directory holding the node's default name.
const NAME_FILE: &str = "node-name";

/// This node's name when `--name` is not given: `node-<16 hex digits>`,
/// made once and kept in the data directory, so it stays the same across
/// restarts (a replica's stream resumes under it) and differs between data
/// directories. (It used to be `node-<pid>`, which is `node-1` in every
/// container: such replicas replaced each other's streams in turn.)
fn default_name(data: &std::path::Path) -> Result<String, Error> {
    use std::hash::BuildHasher;
    let path = data.join(NAME_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id()));
    let name = format!("node-{id:016x}");
    let tmp = data.join(format!("{NAME_FILE}.tmp"));
    std::fs::write(&tmp, format!("{name}\n"))?;
    std::fs::rename(&tmp, &path)?;
    Ok(name)
}

/// Descriptors a node keeps besides its connections, RocksDB's table cache
/// (`--max-open-files`) and its dumps: the WAL, the manifest and other
/// RocksDB files, the directory lock, the listener, a replica's link,
/// standard streams.
const OTHER_DESCRIPTORS: u64 = 64;

/// Descriptors a running `ADMIN dump` may take: its read-only view's table
/// files (`DiskView`: at most 32) and the rest of the database it opens.
const DESCRIPTORS_PER_DUMP: u64 = 40;

/// Descriptors one connection may take: its socket and the reader's clone,
/// and one more for a replication stream's acknowledgement reader.
const DESCRIPTORS_PER_CONNECTION: u64 = 3;

/// Whether `primary` (HOST:PORT) names `own`, the address this node listens
/// on. An unspecified `own` (`0.0.0.0`, `[::]`) listens on every address of
/// this host, loopback or not: one is this host's if a socket can be bound
/// to it. (Before, only loopback ones were taken for its own, so
/// `--listen 0.0.0.0:P --replica-of <this host's LAN address>:P` started a
/// replica of itself; found by a review.)
fn is_own_address(primary: &str, own: std::net::SocketAddr) -> bool {
    use std::net::ToSocketAddrs;
    let this_hosts =
        |ip: std::net::IpAddr| ip.is_loopback() || std::net::TcpListener::bind((ip, 0)).is_ok();
    primary.to_socket_addrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            a == own || (own.ip().is_unspecified() && a.port() == own.port() && this_hosts(a.ip()))
        })
    })
}

/// The connections this process can serve at once without running out of
/// file descriptors, at most `wanted` (`--max-connections`): the soft
/// `RLIMIT_NOFILE` is raised towards the hard one as far as `wanted` needs,
/// and if that is still short, fewer connections are served, with a
/// warning. Out of descriptors, RocksDB cannot open its next file and the
/// engine poisons itself; before, about 335 idle clients did that under a
/// 1,024-descriptor limit (the default under systemd) with
/// `--max-connections` at its default of 1,024.
fn connections_within_open_files(
    wanted: u64,
    max_open_files: u64,
    max_dumps: u64,
) -> Result<u64, Error> {
    use rlimit::Resource;
    let engine = max_open_files
        .saturating_add(OTHER_DESCRIPTORS)
        .saturating_add(max_dumps.saturating_mul(DESCRIPTORS_PER_DUMP));
    let need = wanted
        .saturating_mul(DESCRIPTORS_PER_CONNECTION)
        .saturating_add(engine);
    let (soft, hard) = Resource::NOFILE.get()?;
    let soft = if soft < need && hard > soft {
        let raised = need.min(hard);
        // The kernel may cap it below the hard limit (`fs.nr_open`): then as
        // far as that allows.
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        let tries = [raised, raised.min(nr_open)];
        match tries
            .iter()
            .find(|&&n| n > soft && Resource::NOFILE.set(n, hard).is_ok())
        {
            Some(&n) => n,
            None => {
                tracing::warn!(
                    soft,
                    hard,
                    wanted = raised,
                    "cannot raise the open-file limit"
                );
                soft
            }
        }
    } else {
        soft
    };
    if soft >= need {
        return Ok(wanted);
    }
    let fit = soft.saturating_sub(engine) / DESCRIPTORS_PER_CONNECTION;
    if fit == 0 {
        return Err(Error::InvalidArgument(format!(
            "the open-file limit of {soft} descriptors (hard limit {hard}) leaves none for \
             connections: the engine keeps up to {engine} (--max-open-files {max_open_files}, \
             {DESCRIPTORS_PER_DUMP} for each of --max-dumps {max_dumps}, and \
             {OTHER_DESCRIPTORS} more), a connection takes up to \
             {DESCRIPTORS_PER_CONNECTION}; raise it (ulimit -n) or lower --max-open-files"
        )));
    }
    tracing::warn!(
        open_file_limit = soft,
        hard_limit = hard,
        max_connections = wanted,
        serving = fit,
        "the open-file limit serves fewer connections than --max-connections: serving {fit} \
         at once (raise ulimit -n to {need} to serve {wanted})"
    );
    Ok(fit)
}

pub(crate) fn run(args: NodeArgs) -> Result<ExitCode, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    // The first signal starts a graceful shutdown; a second one, while
    // it runs, exits at once with 128 + the signal's number (not 1, which
    // `tapkv` means as "key not found"); the directory is then not marked
    // cleanly shut down. SIGHUP (a terminal closed, a supervisor's reload)
    // stops it as SIGTERM does (it used to kill it as a crash would), unless
    // ignored at start (`nohup`), and a second one does not force the exit
    // (`crate::stop_signals`).
    let (signals, forcing) = crate::stop_signals();
    for sig in signals {
        if forcing.contains(&sig) {
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&stop))?;
        }
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    // The address is checked before the data directory is touched, and
    // the error names it.
    let own = std::net::TcpListener::bind(&args.listen)
        .and_then(|l| l.local_addr())
        .map_err(|e| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("cannot listen on {:?} (--listen): {e}", args.listen),
            ))
        })?;
    // Before the data directory is touched too: a replica of itself would
    // retry a refused stream for ever.
    if let Some(primary) = &args.replica_of {
        if is_own_address(primary, own) {
            return Err(Error::InvalidArgument(format!(
                "--replica-of {primary} is this node's own address ({own}): give its primary's"
            )));
        }
    }
    crate::check_data_dir(&args.data)?;
    let connections =
        connections_within_open_files(args.max_connections, args.max_open_files, args.max_dumps)?;
    let mut cfg = NodeConfig::new(args.listen.clone());
    cfg.name = args.name.clone().unwrap_or_else(|| cfg.name.clone());
    cfg.replica_of = args.replica_of.clone();
    cfg.max_unacked_bytes = args.max_unacked_bytes;
    cfg.slow_replica_timeout = Duration::from_millis(args.slow_replica_ms);
    cfg.max_body = usize::try_from(args.max_body).unwrap_or(usize::MAX);
    cfg.io_timeout = Duration::from_millis(args.io_timeout_ms);
    cfg.idle_timeout = Duration::from_secs(args.idle_timeout_s);
    cfg.heartbeat = Duration::from_millis(args.heartbeat_ms);
    cfg.stream_linger = Duration::from_micros(args.stream_linger_us);
    cfg.ack_bytes = args.ack_bytes.max(1);
    cfg.min_replicas = args.replicas;
    cfg.replace_primary_data = args.replace_data;
    cfg.max_pending_body_bytes = usize::try_from(args.max_pending_body_bytes).unwrap_or(usize::MAX);
    cfg.max_pending_reply_bytes =
        usize::try_from(args.max_pending_reply_bytes).unwrap_or(usize::MAX);
    cfg.max_connections = usize::try_from(connections).unwrap_or(usize::MAX);
    cfg.max_dumps = usize::try_from(args.max_dumps).unwrap_or(usize::MAX);
    // Settings that do not fit together (a pending-frame budget below
    // --max-body) are refused before the data directory is touched.
    cfg.validate().map_err(Error::InvalidArgument)?;
    let replica = args.replica_of.is_some();
    let mut builder = Engine::builder(&args.data)
        .max_open_files(usize::try_from(args.max_open_files).unwrap_or(usize::MAX))
        .replica(replica)
        .replicate_timeout(Duration::from_millis(args.replicate_timeout_ms));
    match (args.partitions, &args.replica_of) {
        (Some(n), _) => builder = builder.partitions(n),
        // A new replica takes its primary's partition count (partitions are
        // replicated by number, so any other count could not replicate).
        (None, Some(primary)) if !has_store(&args.data) => {
            match primary_partitions(primary, Duration::from_millis(args.io_timeout_ms)) {
                Ok(n) if n > 0 => builder = builder.partitions(n),
                Ok(_) => tracing::warn!(
                    %primary,
                    "the primary reported no partitions: creating the directory with the default"
                ),
                Err(e) => tracing::warn!(
                    %primary,
                    error = %e,
                    "cannot ask the primary for its partition count: creating the directory \
                     with the default; if the primary has another count this replica will \
                     refuse to replicate"
                ),
            }
        }
        _ => {}
    }
    if let Some(q) = args.memory_quota {
        builder = builder.memory_quota(usize::try_from(q).unwrap_or(usize::MAX));
    }
    if let Some(l) = args.checkpoint_memory_limit {
        builder = builder.checkpoint_memory_limit(usize::try_from(l).unwrap_or(usize::MAX));
    }
    if let Some(l) = args.online_update_memory_limit {
        builder = builder.online_update_memory_limit(usize::try_from(l).unwrap_or(usize::MAX));
    }
    if let Some(l) = args.snapshot_buffer_limit {
        builder = builder.snapshot_buffer_limit(usize::try_from(l).unwrap_or(usize::MAX));
    }
    if let Some(t) = args.cursor_drop_threshold {
        builder = builder.cursor_drop_threshold(t);
    }
    if let Some(n) = args.flusher_nice {
        builder = builder.flusher_nice(n);
    }
    if let Some(n) = args.max_key_size {
        builder = builder.max_key_size(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(n) = args.max_value_size {
        builder = builder.max_value_size(usize::try_from(n).unwrap_or(usize::MAX));
    }
    let engine = builder.open()?;
    {
        // A SET of the largest key and value the engine takes, with its
        // extras: a smaller --max-body refuses such a request as a frame
        // (and closes the connection) instead of answering VALUE_TOO_LARGE.
        let c = engine.config()?;
        let largest = (c.max_value_size as u64)
            .saturating_add(c.max_key_size as u64)
            .saturating_add(8);
        if args.max_body < largest {
            tracing::warn!(
                max_body = args.max_body,
                largest_set = largest,
                "--max-body is below the largest SET the engine accepts (--max-value-size + \
                 --max-key-size + 8 bytes of extras): such requests are refused as frames \
                 and their connections closed"
            );
        }
    }
    // The name is the directory's (made on first start) unless given.
    cfg.name = match &args.name {
        Some(n) => n.clone(),
        None => default_name(&args.data)?,
    };
    let name = cfg.name.clone();
    let node = Node::start(engine, cfg)?;
    outln!(
        "tapkv node {name} listening on {} as {}, data directory {}",
        node.local_addr(),
        match &args.replica_of {
            Some(p) => format!("replica of {p}"),
            None => "primary".to_string(),
        },
        args.data.display()
    )?;
    use std::io::Write;
    std::io::stdout().flush()?;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("signal received: shutting down");
    node.shutdown()?;
    outln!("tapkv node {name} stopped cleanly")?;
    Ok(ExitCode::SUCCESS)
}
