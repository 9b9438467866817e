//! `tapkv`: the command-line tool — a key-value client and shell on a data
//! directory, a load generator, admin inspection, and the guided demo.
#![deny(unsafe_code)]

/// `println!` that returns the write's error instead of panicking, so a
/// closed stdout (`tapkv admin inspect | head -1`) ends the command quietly
/// (see `main`) rather than with a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `eprintln!` that never panics: a diagnostic to a standard error that is
/// closed or full (`2>/dev/full`, `2>&1 | head`) is dropped, and the exit
/// status stays the documented one (`eprintln!` panicked: exit 101, and in
/// the shell's signal thread, no clean close).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod admin;
mod demo;
mod demo_cluster;
mod kv;
mod load;
mod node;
mod shell;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tapkv_engine::Durability;

/// mimalloc: much cheaper than glibc malloc for the many small buffers
/// (keys, values, checkpoint entries) an engine allocates; see docs/architecture.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// tapkv: a checkpointed key-value storage engine with online-update revert.
///
/// Every command that takes `--data DIR` opens the engine embedded in this
/// process on that data directory (created if missing by the commands that
/// write, which refuse to start a store in a directory holding other
/// files; `kv get`, `kv del` and `admin` refuse a directory that holds no
/// data). A directory can be
/// open in one process at a time; `admin` commands read it without the lock.
///
/// Exit status: 0 success, 1 a key not found (`kv get`/`kv del`), 2 a usage
/// error, 3 any other error (the message is on stderr), 4 a `shell --data`
/// that closed with online-update windows open (they are reverted), 129,
/// 130 or 143 a `shell` stopped by SIGHUP, SIGINT or SIGTERM (once it has
/// closed cleanly),
/// or a `node` or `shell` given a second signal while it closes (a `node`
/// stopped by one signal exits 0 once it has closed cleanly), 137 the
/// shell's `crash`. A closed standard output (`| head`) ends a command
/// with 0, except `shell` and `load --print-acked` (3).
/// Commands that talk to a node (`--addr`) wait up to `--timeout-s` (30 s)
/// for each answer.
#[derive(Parser, Debug)]
#[command(name = "tapkv", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read, write or delete one key.
    Kv(kv::KvArgs),
    /// Generate write load (keys `key-<i>`) and report throughput and latency.
    ///
    /// The summary goes to stderr at the end, with a progress bar while it
    /// runs if stderr is a terminal. An interrupted run (Ctrl-C) prints no
    /// summary and does not close the engine: its `memory` writes not yet
    /// flushed are lost, as in a crash (the crash tests rely on that).
    Load(load::LoadArgs),
    /// Line-oriented command shell on stdin/stdout (see docs/shell.md).
    Shell(shell::ShellArgs),
    /// Run a node: an engine behind a TCP listener, primary or replica.
    Node(node::NodeArgs),
    /// Inspect a data directory offline, or a running node (--addr).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// A guided tour: writes, checkpoints, cursors, flusher, restart, then a
    /// primary and two replicas with an online update reverted on all three.
    Demo(demo::DemoArgs),
}

/// Durability level on the command line.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub(crate) enum DurabilityArg {
    /// Return once the write is in memory.
    #[default]
    Memory,
    /// Return once the write is synced to disk.
    Persist,
    /// Return once a majority of the node's replicas hold it (needs a node,
    /// where a command can reach one). A timeout is an error, but the
    /// write stays applied.
    Replicate,
}

impl DurabilityArg {
    /// The name the command line uses (`memory`, `persist`, `replicate`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            DurabilityArg::Memory => "memory",
            DurabilityArg::Persist => "persist",
            DurabilityArg::Replicate => "replicate",
        }
    }
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Self {
        match d {
            DurabilityArg::Memory => Durability::Memory,
            DurabilityArg::Persist => Durability::Persist,
            DurabilityArg::Replicate => Durability::Replicate,
        }
    }
}

/// Where a command works: an embedded engine on a data directory, or a
/// running node.
#[derive(clap::Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub(crate) struct Target {
    /// Data directory: the engine runs in this process. `kv set` and
    /// `shell` create it if missing (not among other files); `kv get` and
    /// `kv del` refuse one that holds no data.
    #[arg(long, value_name = "DIR")]
    pub(crate) data: Option<PathBuf>,
    /// Address of a running node (`tapkv node`), e.g. 127.0.0.1:11311.
    #[arg(long, value_name = "ADDR", value_parser = node::node_addr)]
    pub(crate) addr: Option<String>,
}

/// How long the command-line client waits for a node.
#[derive(clap::Args, Debug, Clone, Copy)]
pub(crate) struct Wait {
    /// Seconds to wait for the node (--addr) to accept the connection and
    /// for each answer (1 to 86400).
    #[arg(long = "timeout-s", value_name = "SECONDS", default_value_t = 30, global = true,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) timeout_s: u64,
}

impl Wait {
    pub(crate) fn timeout(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_s)
    }
}

/// The `--data` option of commands that always embed the engine.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct DataArg {
    /// Data directory (created if missing; a new store is not started in a
    /// directory holding other files).
    #[arg(long, value_name = "DIR")]
    pub(crate) data: PathBuf,
}

/// Refuses to make a new store in a directory that holds other files and
/// nothing of tapkv's: `--data ~` for `--data ~/db` would have put
/// `rocksdb/` and `tapkv.lock` among the user's files. A missing or empty
/// directory (a mount point's `lost+found` aside), or one that holds a
/// store, is fine; the engine reports a path that is not a directory.
pub(crate) fn check_data_dir(dir: &std::path::Path) -> Result<(), tapkv_engine::Error> {
    const TAPKV: [&str; 3] = ["rocksdb", "tapkv.lock", "node-name"];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut others = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if TAPKV.contains(&name.as_ref()) {
            return Ok(());
        }
        if name != "lost+found" {
            others.push(name.into_owned());
        }
    }
    if others.is_empty() {
        return Ok(());
    }
    others.sort();
    let shown: Vec<&str> = others.iter().take(3).map(String::as_str).collect();
    Err(tapkv_engine::Error::InvalidArgument(format!(
        "{} holds other files ({}{}) and no tapkv data: give a new or empty directory for a \
         new store",
        dir.display(),
        shown.join(", "),
        if others.len() > 3 { ", ..." } else { "" }
    )))
}

/// Connects to a node, waiting up to `timeout` for it and for each answer,
/// with a readable error.
pub(crate) fn connect(
    addr: &str,
    timeout: std::time::Duration,
) -> Result<tapkv_replication::client::Client, tapkv_engine::Error> {
    use tapkv_replication::client::ClientError;
    use tapkv_replication::message::status;
    use tapkv_replication::protocol::ProtocolError;
    tapkv_replication::client::Client::connect(addr, timeout).map_err(|e| {
        let (kind, msg) = match e {
            // Reached, but it refused the session (too many connections,
            // a limit): say so rather than "cannot reach". TEMP_FAILURE
            // means busy, not out of memory (the kind its message carries).
            // The node's kind, as its other refusals show (`temp_failure`).
            ClientError::Status { status, message } => {
                let (kind, detail) = split_status(status, &message);
                return node_refusal(
                    kind,
                    if status == status::TEMP_FAILURE {
                        format!(
                            "the node at {addr} is busy and refused the connection \
                             (try again later): {detail}"
                        )
                    } else {
                        format!("the node at {addr} refused the connection: {detail}")
                    },
                );
            }
            ClientError::Protocol(ProtocolError::Io(io))
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                (
                    io.kind(),
                    format!("the node at {addr} did not answer: {io} (--timeout-s)"),
                )
            }
            ClientError::Protocol(ProtocolError::Io(io)) => (
                // Not BrokenPipe, which `main` takes for a closed stdout.
                match io.kind() {
                    std::io::ErrorKind::BrokenPipe => std::io::ErrorKind::Other,
                    k => k,
                },
                format!("cannot reach node at {addr}: {io}"),
            ),
            // Its first answer is no frame at all: something else listens.
            ClientError::Protocol(e @ ProtocolError::BadMagic(_)) => (
                std::io::ErrorKind::Other,
                format!(
                    "{addr} is not a tapkv node (its answer to the handshake is not a \
                     tapkv frame: {e})"
                ),
            ),
            other => (
                std::io::ErrorKind::Other,
                format!("cannot talk to node at {addr}: {other}"),
            ),
        };
        tapkv_engine::Error::Io(std::io::Error::new(kind, msg))
    })
}

/// A node's own refusal of a request (an error status), with the kind it
/// named: carried in an [`Error::Io`](tapkv_engine::Error::Io) so that
/// every command keeps one error type, and printed by [`error_line`] as
/// `error: <kind>: <detail>`, the node's kind rather than `io`.
#[derive(Debug)]
struct NodeRefusal {
    kind: String,
    detail: String,
}

impl std::fmt::Display for NodeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for NodeRefusal {}

/// The error for a node's refusal of kind `kind`.
pub(crate) fn node_refusal(kind: &str, detail: String) -> tapkv_engine::Error {
    tapkv_engine::Error::Io(std::io::Error::other(NodeRefusal {
        kind: kind.to_owned(),
        detail,
    }))
}

/// An error status's kind and detail: its message is `<kind>: <detail>`
/// (`docs/protocol.md`); one without a kind gets the status's own.
pub(crate) fn split_status(status: u16, message: &str) -> (&str, &str) {
    match message.split_once(": ") {
        Some((kind, detail))
            if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') =>
        {
            (kind, detail)
        }
        _ => (tapkv_replication::message::status::kind(status), message),
    }
}

/// A request to the node at `addr` that failed, as the error a command
/// returns: a node's refusal keeps its kind, a transport failure is `io`
/// with the text [`request_failed`] gives.
pub(crate) fn remote_error(
    addr: &str,
    wait: Wait,
    e: tapkv_replication::client::ClientError,
    write: bool,
) -> tapkv_engine::Error {
    match e {
        tapkv_replication::client::ClientError::Status { status, message } => {
            let (kind, detail) = split_status(status, &message);
            node_refusal(kind, detail.to_owned())
        }
        e => tapkv_engine::Error::Io(std::io::Error::other(request_failed(addr, wait, &e, write))),
    }
}

/// A request to the node at `addr` that failed: the text to print, which
/// names the node; a transport failure (no answer within `--timeout-s`, a
/// lost connection) during a write says that the write may have been
/// applied, since the node may have done it before the answer was lost.
pub(crate) fn request_failed(
    addr: &str,
    wait: Wait,
    e: &tapkv_replication::client::ClientError,
    write: bool,
) -> String {
    use tapkv_replication::client::ClientError;
    use tapkv_replication::protocol::ProtocolError;
    let maybe = if write {
        "; the write may have been applied"
    } else {
        ""
    };
    match e {
        ClientError::Protocol(ProtocolError::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            format!(
                "the node at {addr} did not answer within {}s (--timeout-s){maybe}",
                wait.timeout_s
            )
        }
        ClientError::Protocol(ProtocolError::Io(io)) => {
            format!("lost the connection to the node at {addr}: {io}{maybe}")
        }
        ClientError::Protocol(p) => {
            format!("lost the connection to the node at {addr}: {p}{maybe}")
        }
        other => other.to_string(),
    }
}

/// Exit status of a usage error found after parsing (as clap's own).
pub(crate) const EXIT_USAGE: u8 = 2;

/// Prints a usage error found after parsing (arguments that are each valid
/// but do not go together) and returns its exit status.
pub(crate) fn usage_error(msg: &str) -> ExitCode {
    errln!("error: {msg}");
    ExitCode::from(EXIT_USAGE)
}

/// The log filter: `TAPKV_LOG` if set and valid (an invalid one is
/// reported on stderr, not silently ignored), else `info` for a node and
/// `warn` for other commands.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let default = || {
        // A node logs its lifecycle by default; one-shot commands stay quiet.
        let node = std::env::args_os().nth(1).is_some_and(|a| a == "node");
        tracing_subscriber::EnvFilter::new(if node { "info" } else { "warn" })
    };
    match std::env::var_os("TAPKV_LOG") {
        None => default(),
        Some(v) => match tracing_subscriber::EnvFilter::try_from_env("TAPKV_LOG") {
            Ok(f) => f,
            Err(e) => {
                errln!("warning: ignoring TAPKV_LOG={v:?} ({e}); using the default log level");
                default()
            }
        },
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Kv(a) => kv::run(a),
        Command::Load(a) => load::run(a),
        Command::Shell(a) => shell::run(a),
        Command::Node(a) => node::run(a),
        Command::Admin(a) => admin::run(a),
        Command::Demo(a) => demo::run(a),
    };
    match result {
        Ok(code) => code,
        // A closed stdout (`tapkv admin dump | head`) is not an error.
        Err(tapkv_engine::Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("{}", error_line(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The line a failed command prints on stderr: `error: <kind>: <detail>`,
/// the kind as the shell's `ERROR` answers and a node's error statuses
/// name it, whether the command ran on a data directory or against a node
/// (`docs/shell.md`).
pub(crate) fn error_line(e: &tapkv_engine::Error) -> String {
    format!("error: {}", kind_and_detail(e))
}

/// `<kind>: <detail>` of an error: a node's refusal ([`node_refusal`])
/// with the node's kind, not `io` (the shell's `ERROR` answers use it too).
pub(crate) fn kind_and_detail(e: &tapkv_engine::Error) -> String {
    if let tapkv_engine::Error::Io(io) = e {
        if let Some(r) = io.get_ref().and_then(|r| r.downcast_ref::<NodeRefusal>()) {
            return r.to_string();
        }
    }
    format!("{}: {}", e.kind(), e.detail())
}

/// The signals that end a `shell` or a `node` cleanly: SIGTERM and SIGINT,
/// and SIGHUP (a terminal or ssh session gone) unless the process was
/// started with it ignored (`nohup`), which keeps a node serving after a
/// logout as before. Only the first two force an exit when repeated during
/// the close (`forcing`): a hung-up terminal delivers SIGHUP twice (the
/// shell's forwarding, then the kernel's), and the second must not cut the
/// close short (found by a review).
pub(crate) fn stop_signals() -> (Vec<i32>, [i32; 2]) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let forcing = [SIGTERM, SIGINT];
    let mut all = forcing.to_vec();
    if !signal_ignored_at_start(SIGHUP) {
        all.push(SIGHUP);
    }
    (all, forcing)
}

/// Whether `sig` was ignored when the process started (`nohup`, say): the
/// `SigIgn` mask of `/proc/self/status` (Linux; elsewhere, false).
fn signal_ignored_at_start(sig: i32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| sig > 0 && mask & (1 << (sig - 1)) != 0)
}

/// Exit status of a command that failed (not a missing key, which is 1,
/// nor a usage error, which is 2).
pub(crate) const EXIT_ERROR: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use tapkv_replication::client::ClientError;
    use tapkv_replication::message::status;

    #[test]
    fn a_nodes_refusal_is_printed_with_its_own_kind() {
        // Before, `admin ... --addr` printed every refusal as `io`.
        let wait = Wait { timeout_s: 5 };
        let line = |status, message: &str| {
            error_line(&remote_error(
                "n:1",
                wait,
                ClientError::Status {
                    status,
                    message: message.to_owned(),
                },
                false,
            ))
        };
        assert_eq!(
            line(
                status::TEMP_FAILURE,
                "temp_failure: busy: 4 dumps are running already"
            ),
            "error: temp_failure: busy: 4 dumps are running already"
        );
        assert_eq!(
            line(status::WRONG_STATE, "window_open: partition 3"),
            "error: window_open: partition 3"
        );
        // A message without a kind takes the status's.
        assert_eq!(
            line(status::INTERNAL, "Something: went wrong"),
            "error: internal: Something: went wrong"
        );
        // A transport failure is `io`, naming the node.
        let lost = error_line(&remote_error(
            "n:1",
            wait,
            ClientError::Protocol(tapkv_replication::protocol::ProtocolError::Io(
                std::io::Error::from(std::io::ErrorKind::ConnectionReset),
            )),
            true,
        ));
        assert!(
            lost.starts_with("error: io: lost the connection to the node at n:1")
                && lost.ends_with("the write may have been applied"),
            "{lost}"
        );
    }
}
