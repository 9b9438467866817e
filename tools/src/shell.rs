//! `tapkv shell`: one command per line on stdin, one answer line on stdout.
//!
//! The grammar is documented in `docs/shell.md`. Answers start with `OK`,
//! `VALUE`, `NOT_FOUND` or `ERROR <kind>:`; an error never ends the shell.
//! One parser serves both targets: an engine embedded in this process
//! (`--data`) and a running node (`--addr`), whose answers are formatted by
//! the same functions, so a script sees the same lines from either.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use tapkv_engine::{Engine, Error, PartitionId, WriteOptions};

use crate::{connect, Target};
use tapkv_replication::client::{Client, ClientError, KeptAlive};

#[derive(Args, Debug)]
pub(crate) struct ShellArgs {
    #[command(flatten)]
    target: Target,
    /// With --addr (ignored with --data): send a NOOP heartbeat after this
    /// many seconds without a command, so the node's idle timeout
    /// (--idle-timeout-s, default 300 s) does not close a shell that is only
    /// waiting for input; keep it under that. 0 turns heartbeats off; at
    /// most 86,400.
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=86_400))]
    heartbeat_s: u64,
    #[command(flatten)]
    wait: crate::Wait,
}

const HELP: &str = "commands: set KEY VALUE | add KEY VALUE | replace KEY VALUE | get KEY | \
del KEY | partition KEY | evict KEY | flush | checkpoint P | checkpoints P | cursors P | \
update start|complete|revert P | stats | restart | crash | help | quit \
(escapes in KEY and VALUE: \\\\ \\n \\r \\t \\xNN)";

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Write {
        op: WriteOp,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Get(Vec<u8>),
    Del(Vec<u8>),
    Partition(Vec<u8>),
    Evict(Vec<u8>),
    Update(UpdateOp, PartitionId),
    Flush,
    Checkpoint(PartitionId),
    Checkpoints(PartitionId),
    Cursors(PartitionId),
    Stats,
    Restart,
    Crash,
    Help,
    Quit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteOp {
    Set,
    Add,
    Replace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpdateOp {
    Start,
    Complete,
    Revert,
}

pub(crate) use tapkv_replication::text::{escape, unescape};

fn usage(msg: &str) -> String {
    format!("ERROR invalid_argument: {msg}")
}

/// A command's partition argument; the error follows `usage` with what is
/// wrong: missing, not a number, or past any partition an engine has.
fn parse_partition(usage: &str, arg: &str) -> Result<PartitionId, String> {
    if arg.is_empty() {
        return Err(format!("{usage} (the partition number is missing)"));
    }
    // Digits only: `parse` would take a sign (`+1`).
    if !arg.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{usage} ({arg:?} is not a partition number)"));
    }
    match arg.parse::<u64>() {
        Ok(n) => PartitionId::try_from(n).map_err(|_| {
            format!("{usage} (partition {n} is out of range: an engine has at most 1024)")
        }),
        Err(_) => Err(format!("{usage} ({arg:?} is not a partition number)")),
    }
}

/// Parses one command line (without its line ending).
fn parse(line: &[u8]) -> Result<Command, String> {
    let (cmd, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let cmd = std::str::from_utf8(cmd).unwrap_or("\u{fffd}");
    let rest_text = || std::str::from_utf8(rest).unwrap_or("");
    // KEY: exactly one word, unescaped, not empty.
    let key = || -> Result<Vec<u8>, String> {
        if rest.is_empty() || rest.contains(&b' ') {
            return Err(usage(&format!("usage: {cmd} KEY")));
        }
        unescape(rest).map_err(|e| usage(&format!("KEY: {e}")))
    };
    let partition =
        |arg: &str| parse_partition(&format!("usage: {cmd} P"), arg).map_err(|e| usage(&e));
    let none = |c: Command| -> Result<Command, String> {
        if rest.is_empty() {
            Ok(c)
        } else {
            Err(usage(&format!("`{cmd}` takes no arguments")))
        }
    };
    match cmd {
        "" => Err(usage("empty command; try `help`")),
        "quit" | "exit" => none(Command::Quit),
        "help" => none(Command::Help),
        "crash" => none(Command::Crash),
        "flush" => none(Command::Flush),
        "stats" => none(Command::Stats),
        "restart" => none(Command::Restart),
        "set" | "add" | "replace" => {
            let Some(i) = rest.iter().position(|&b| b == b' ') else {
                return Err(usage(&format!("usage: {cmd} KEY VALUE")));
            };
            let key = unescape(&rest[..i]).map_err(|e| usage(&format!("KEY: {e}")))?;
            if key.is_empty() {
                return Err(usage(&format!("usage: {cmd} KEY VALUE")));
            }
            let value = unescape(&rest[i + 1..]).map_err(|e| usage(&format!("VALUE: {e}")))?;
            let op = match cmd {
                "add" => WriteOp::Add,
                "replace" => WriteOp::Replace,
                _ => WriteOp::Set,
            };
            Ok(Command::Write { op, key, value })
        }
        "get" => Ok(Command::Get(key()?)),
        "del" => Ok(Command::Del(key()?)),
        "partition" => Ok(Command::Partition(key()?)),
        "evict" => Ok(Command::Evict(key()?)),
        "checkpoint" => Ok(Command::Checkpoint(partition(rest_text())?)),
        "checkpoints" => Ok(Command::Checkpoints(partition(rest_text())?)),
        "cursors" => Ok(Command::Cursors(partition(rest_text())?)),
        "update" => {
            let bad = || usage("usage: update start|complete|revert P");
            let (what, p) = rest_text().split_once(' ').ok_or_else(bad)?;
            let op = match what {
                "start" => UpdateOp::Start,
                "complete" => UpdateOp::Complete,
                "revert" => UpdateOp::Revert,
                _ => return Err(bad()),
            };
            let p = parse_partition("usage: update start|complete|revert P", p)
                .map_err(|e| usage(&e))?;
            Ok(Command::Update(op, p))
        }
        other => Err(usage(&format!("unknown command {other:?}; try `help`"))),
    }
}

/// One checkpoint, as both targets report it.
#[derive(Debug, Deserialize)]
struct CheckpointView {
    id: u64,
    open: bool,
    start_seqno: u64,
    high_seqno: u64,
    items: u64,
    mem_bytes: u64,
}

/// One cursor, as both targets report it.
#[derive(Debug, Deserialize)]
struct CursorView {
    name: String,
    checkpoint_id: u64,
    seqno: u64,
    remaining: u64,
}

/// The figures `stats` prints, from an engine or from a node's `STAT` JSON.
#[derive(Debug, Deserialize)]
struct StatsView {
    items: u64,
    dirty: u64,
    checkpoint_mem_bytes: u64,
    partitions: Vec<PartitionView>,
    /// A node's role (absent for an embedded engine).
    #[serde(default)]
    role: Option<String>,
    /// A replica's last link error, while it does not replicate.
    #[serde(default)]
    link_error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PartitionView {
    partition: PartitionId,
    flushes: u64,
    flushed_items: u64,
    high_seqno: u64,
    evicted_items: u64,
    /// Absent from a node older than the field.
    #[serde(default)]
    evicted_bytes: u64,
    bg_fetches: u64,
    window: Option<WindowView>,
    lost_windows: Vec<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct WindowView {
    checkpoint_id: u64,
}

fn format_write(partition: PartitionId, seqno: u64, cas: u64) -> String {
    format!("OK PARTITION {partition} SEQNO {seqno} CAS {cas}")
}

fn format_del(partition: PartitionId, seqno: u64) -> String {
    format!("OK PARTITION {partition} SEQNO {seqno}")
}

fn format_revert(id: u64, removed: u64, restored: u64) -> String {
    format!("OK CHECKPOINT {id} REMOVED {removed} RESTORED {restored}")
}

fn format_checkpoints(cks: &[CheckpointView]) -> String {
    let parts: Vec<String> = cks
        .iter()
        .map(|c| {
            format!(
                "id={} state={} start={} high={} items={} mem={}",
                c.id,
                if c.open { "open" } else { "closed" },
                c.start_seqno,
                c.high_seqno,
                c.items,
                c.mem_bytes
            )
        })
        .collect();
    format!("OK {}", parts.join("; "))
}

fn format_cursors(cs: &[CursorView]) -> String {
    let parts: Vec<String> = cs
        .iter()
        .map(|c| {
            format!(
                "{} checkpoint={} seqno={} remaining={}",
                // A replica's stream name is its `--name`: any text but
                // control characters, which the answer's one line escapes;
                // spaces and `;` too, as `\x20` and `\x3b`, so the answer
                // splits into its entries and fields (a name `a; b=1`
                // made fake entries: found by a review).
                tapkv_engine::text::escape(c.name.as_bytes())
                    .replace(' ', "\\x20")
                    .replace(';', "\\x3b"),
                c.checkpoint_id,
                c.seqno,
                c.remaining
            )
        })
        .collect();
    format!("OK {}", parts.join("; "))
}

fn format_stats(st: &StatsView) -> String {
    let sum = |f: fn(&PartitionView) -> u64| -> u64 { st.partitions.iter().map(f).sum() };
    let high = st
        .partitions
        .iter()
        .map(|p| p.high_seqno)
        .max()
        .unwrap_or(0);
    let windows: Vec<String> = st
        .partitions
        .iter()
        .filter_map(|p| {
            p.window
                .as_ref()
                .map(|w| format!("{}:{}", p.partition, w.checkpoint_id))
        })
        .collect();
    let lost: usize = st.partitions.iter().map(|p| p.lost_windows.len()).sum();
    let mut line = format!(
        "OK items={} dirty={} checkpoint_mem={} flushes={} flushed_items={} \
         max_high_seqno={high} partitions={} evicted={} evicted_bytes={} bg_fetches={} \
         open_windows={} lost_windows={lost}",
        st.items,
        st.dirty,
        st.checkpoint_mem_bytes,
        sum(|p| p.flushes),
        sum(|p| p.flushed_items),
        st.partitions.len(),
        sum(|p| p.evicted_items),
        sum(|p| p.evicted_bytes),
        sum(|p| p.bg_fetches),
        if windows.is_empty() {
            "-".to_string()
        } else {
            windows.join(",")
        },
    );
    if let Some(role) = &st.role {
        line.push_str(&format!(" role={role}"));
    }
    if let Some(err) = &st.link_error {
        // Last on the line: the message has spaces.
        line.push_str(&format!(" link_error={}", escape(err.as_bytes())));
    }
    line
}

/// What a shell runs its commands on.
enum Backend {
    /// An engine in this process (`None` only between `restart`'s close
    /// and reopen, or after a failed reopen).
    Local {
        path: PathBuf,
        engine: Option<Engine>,
    },
    /// A running node.
    Remote(Remote),
}

/// A shell's connection to a node. A command whose connection fails
/// (the node restarted, closed an idle connection, or did not answer in
/// time) drops it, and the next command connects again.
struct Remote {
    addr: String,
    heartbeat: Duration,
    timeout: Duration,
    conn: Option<KeptAlive>,
}

impl Remote {
    fn connect(addr: String, heartbeat: Duration, timeout: Duration) -> Result<Remote, Error> {
        let mut r = Remote {
            addr,
            heartbeat,
            timeout,
            conn: None,
        };
        r.conn = Some(r.open()?);
        Ok(r)
    }

    fn open(&self) -> Result<KeptAlive, Error> {
        let client = connect(&self.addr, self.timeout)?;
        KeptAlive::new(client, self.heartbeat)
            .map_err(|e| Error::Io(std::io::Error::other(format!("keep-alive thread: {e}"))))
    }

    fn run(&mut self, cmd: Command) -> String {
        // A heartbeat that failed left the connection broken: start afresh.
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.with(|c| c.is_broken()))
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            match self.open() {
                Ok(c) => self.conn = Some(c),
                Err(e) => return format!("{} (the next command tries again)", err(&e)),
            }
        }
        let Some(conn) = &self.conn else {
            return err(&Error::Closed);
        };
        let (answer, broken) = conn.with(|c| (remote(c, cmd).unwrap_or_else(|e| e), c.is_broken()));
        if broken {
            self.conn = None;
            return format!("{answer} (connection dropped: the next command reconnects)");
        }
        answer
    }
}

/// A shell over an embedded engine or a node.
pub(crate) struct Shell {
    backend: Backend,
    /// A `restart` reverted open online-update windows: the shell exits
    /// `SHELL_WINDOWS_LOST`, as a close with windows open does.
    windows_lost: bool,
}

/// What one command line produced.
#[derive(Debug)]
pub(crate) enum Reply {
    Line(String),
    Quit,
}

/// The longest command line the shell reads (128 MiB): a line with no end
/// in sight (a stray binary stream) is skipped instead of held whole.
const MAX_LINE: usize = 128 << 20;

/// What [`read_line_within`] read.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// End of input.
    End,
    /// A line (with its newline, unless input ended without one).
    Whole,
    /// A line longer than the limit, read to its end and dropped.
    TooLong,
}

/// Reads one line into `line`, holding at most `max` bytes of it: a longer
/// one is read on to its newline without being kept.
fn read_line_within(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    if std::io::Read::take(&mut *input, limit).read_until(b'\n', line)? == 0 {
        return Ok(Line::End);
    }
    if line.len() <= max || line.ends_with(b"\n") {
        return Ok(Line::Whole);
    }
    line.clear();
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                break;
            }
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    }
    Ok(Line::TooLong)
}

fn err(e: &Error) -> String {
    match e {
        Error::NotFound => "NOT_FOUND".into(),
        // A node's refusal of a reconnect keeps its own kind
        // (`temp_failure` for a busy node), not `io`.
        e => format!("ERROR {}", crate::kind_and_detail(e)),
    }
}

fn remote_err(e: &ClientError) -> String {
    if e.is_not_found() {
        return "NOT_FOUND".into();
    }
    match e {
        // The node's message is `<kind>: <text>` (docs/protocol.md).
        ClientError::Status { message, .. } => format!("ERROR {message}"),
        other => format!("ERROR io: {other}"),
    }
}

/// Decodes a node's JSON answer into the view the formatter takes.
fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("ERROR io: unexpected answer from the node: {e}"))
}

impl Shell {
    pub(crate) fn open(path: PathBuf) -> Result<Shell, Error> {
        crate::check_data_dir(&path)?;
        let engine = Engine::builder(&path).open()?;
        Ok(Shell {
            backend: Backend::Local {
                path,
                engine: Some(engine),
            },
            windows_lost: false,
        })
    }

    /// Executes one command line (its line ending, if any, is ignored).
    pub(crate) fn execute(&mut self, line: &[u8]) -> Reply {
        // A `\r` goes with a `\n` only (docs/shell.md): the last line of
        // an input that ends without a newline keeps a final `\r`.
        let line = match line.strip_suffix(b"\n") {
            Some(l) => l.strip_suffix(b"\r").unwrap_or(l),
            None => line,
        };
        let cmd = match parse(line) {
            Ok(c) => c,
            Err(e) => return Reply::Line(e),
        };
        let text = match cmd {
            Command::Quit => return Reply::Quit,
            Command::Help => format!("OK {HELP}"),
            cmd => match &mut self.backend {
                Backend::Local { path, engine } => {
                    // Exit at once, without flushing or closing: as a kill would.
                    if cmd == Command::Crash {
                        std::process::exit(137);
                    }
                    // A restart closes the engine, which reverts open
                    // windows: said on stderr and in the answer, and the
                    // shell's exit status tells, as at a final close.
                    let reverted = match (cmd == Command::Restart, engine.as_ref()) {
                        (true, Some(e)) => engine_windows(e).unwrap_or_default(),
                        _ => Vec::new(),
                    };
                    warn_reverted(&reverted);
                    // Lost even if the reopen (or the close) then fails.
                    self.windows_lost |= !reverted.is_empty();
                    match local(path, engine, cmd) {
                        Ok(text) if !reverted.is_empty() => {
                            format!("{text} REVERTED_WINDOWS {}", format_windows(&reverted))
                        }
                        Ok(text) => text,
                        Err(e) => e,
                    }
                }
                Backend::Remote(r) => r.run(cmd),
            },
        };
        Reply::Line(text)
    }

    /// Closes an embedded engine cleanly (everything is flushed).
    pub(crate) fn close(self) -> Result<(), Error> {
        match self.backend {
            Backend::Local {
                engine: Some(e), ..
            } => e.close(),
            _ => Ok(()),
        }
    }

    /// Online-update windows open on the embedded engine, as (partition,
    /// checkpoint id): closing it reverts them (none over `--addr`, where
    /// the node keeps them).
    fn open_windows(&self) -> Vec<(PartitionId, u64)> {
        match &self.backend {
            Backend::Local {
                engine: Some(e), ..
            } => engine_windows(e).unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

/// The online-update windows open on `e`, as (partition, checkpoint id).
fn engine_windows(e: &Engine) -> Result<Vec<(PartitionId, u64)>, Error> {
    Ok(e.stats()?
        .partitions
        .iter()
        .filter_map(|p| p.window.map(|w| (p.partition, w.checkpoint_id)))
        .collect())
}

/// Runs `cmd` on the embedded engine.
fn local(path: &PathBuf, slot: &mut Option<Engine>, cmd: Command) -> Result<String, String> {
    if cmd == Command::Restart {
        if let Some(engine) = slot.take() {
            engine.close().map_err(|e| err(&e))?;
        }
        let engine = Engine::builder(path).open().map_err(|e| err(&e))?;
        let items = engine.stats().map(|s| s.items()).unwrap_or(0);
        *slot = Some(engine);
        return Ok(format!("OK RESTARTED ITEMS {items}"));
    }
    let e = slot.as_ref().ok_or_else(|| err(&Error::Closed))?;
    let fail = |x: Error| err(&x);
    Ok(match cmd {
        Command::Write { op, key, value } => {
            let r = match op {
                WriteOp::Add => e.add(&key, value, WriteOptions::default()),
                WriteOp::Replace => e.replace(&key, value, WriteOptions::default()),
                WriteOp::Set => e.set(&key, value, WriteOptions::default()),
            }
            .map_err(fail)?;
            format_write(r.partition, r.seqno, r.cas)
        }
        Command::Get(key) => format!("VALUE {}", escape(e.get(&key).map_err(fail)?.value())),
        Command::Del(key) => {
            let r = e.delete(&key, WriteOptions::default()).map_err(fail)?;
            format_del(r.partition, r.seqno)
        }
        Command::Partition(key) => format!("OK PARTITION {}", e.partition_of(&key)),
        Command::Evict(key) => {
            e.evict(&key).map_err(fail)?;
            "OK EVICTED".into()
        }
        Command::Update(UpdateOp::Start, p) => {
            format!("OK CHECKPOINT {}", e.online_update_start(p).map_err(fail)?)
        }
        Command::Update(UpdateOp::Complete, p) => {
            format!(
                "OK CHECKPOINT {}",
                e.online_update_complete(p).map_err(fail)?
            )
        }
        Command::Update(UpdateOp::Revert, p) => {
            let r = e.online_update_revert(p).map_err(fail)?;
            format_revert(r.checkpoint_id, r.removed as u64, r.restored as u64)
        }
        Command::Flush => {
            e.flush().map_err(fail)?;
            format_flush(&engine_windows(e).map_err(fail)?)
        }
        Command::Checkpoint(p) => {
            format!("OK CHECKPOINT {}", e.create_checkpoint(p).map_err(fail)?)
        }
        Command::Checkpoints(p) => {
            let cks: Vec<CheckpointView> = e
                .checkpoints(p)
                .map_err(fail)?
                .iter()
                .map(|c| CheckpointView {
                    id: c.id,
                    open: c.open,
                    start_seqno: c.start_seqno,
                    high_seqno: c.high_seqno,
                    items: c.items as u64,
                    mem_bytes: c.mem_bytes as u64,
                })
                .collect();
            format_checkpoints(&cks)
        }
        Command::Cursors(p) => {
            let cs: Vec<CursorView> = e
                .cursors(p)
                .map_err(fail)?
                .into_iter()
                .map(|c| CursorView {
                    name: c.name,
                    checkpoint_id: c.checkpoint_id,
                    seqno: c.seqno,
                    remaining: c.remaining as u64,
                })
                .collect();
            format_cursors(&cs)
        }
        Command::Stats => {
            let st = e.stats().map_err(fail)?;
            format_stats(&StatsView {
                items: st.items() as u64,
                dirty: st.dirty(),
                checkpoint_mem_bytes: st.checkpoint_mem_bytes as u64,
                partitions: st
                    .partitions
                    .iter()
                    .map(|p| PartitionView {
                        partition: p.partition,
                        flushes: p.flushes,
                        flushed_items: p.flushed_items,
                        high_seqno: p.high_seqno,
                        evicted_items: p.evicted_items as u64,
                        evicted_bytes: p.evicted_bytes as u64,
                        bg_fetches: p.bg_fetches,
                        window: p.window.map(|w| WindowView {
                            checkpoint_id: w.checkpoint_id,
                        }),
                        lost_windows: p
                            .lost_windows
                            .iter()
                            .map(|_| serde::de::IgnoredAny)
                            .collect(),
                    })
                    .collect(),
                role: None,
                link_error: None,
            })
        }
        Command::Restart | Command::Crash | Command::Help | Command::Quit => {
            unreachable!("handled before")
        }
    })
}

/// Runs `cmd` on a node over the network.
fn remote(c: &mut Client, cmd: Command) -> Result<String, String> {
    let fail = |x: ClientError| remote_err(&x);
    Ok(match cmd {
        Command::Write { op, key, value } => {
            let r = match op {
                WriteOp::Add => c.add(&key, &value),
                WriteOp::Replace => c.replace(&key, &value),
                WriteOp::Set => c.set(&key, &value, 0, false),
            }
            .map_err(fail)?;
            format_write(r.partition, r.seqno, r.cas)
        }
        Command::Get(key) => format!("VALUE {}", escape(&c.get(&key).map_err(fail)?.0)),
        Command::Del(key) => {
            let r = c.delete(&key).map_err(fail)?;
            format_del(r.partition, r.seqno)
        }
        Command::Partition(key) => format!("OK PARTITION {}", c.partition_of(&key)),
        Command::Evict(key) => {
            c.evict(&key).map_err(fail)?;
            "OK EVICTED".into()
        }
        Command::Update(UpdateOp::Start, p) => {
            format!("OK CHECKPOINT {}", c.update_start(p).map_err(fail)?)
        }
        Command::Update(UpdateOp::Complete, p) => {
            format!("OK CHECKPOINT {}", c.update_complete(p).map_err(fail)?)
        }
        Command::Update(UpdateOp::Revert, p) => {
            let (id, removed, restored) = c.update_revert(p).map_err(fail)?;
            format_revert(id, removed, restored)
        }
        Command::Flush => {
            c.flush().map_err(fail)?;
            let st = from_json::<StatsView>(c.stats().map_err(fail)?)?;
            let open: Vec<(PartitionId, u64)> = st
                .partitions
                .iter()
                .filter_map(|p| p.window.as_ref().map(|w| (p.partition, w.checkpoint_id)))
                .collect();
            format_flush(&open)
        }
        Command::Checkpoint(p) => format!("OK CHECKPOINT {}", c.checkpoint(p).map_err(fail)?),
        Command::Checkpoints(p) => format_checkpoints(&from_json::<Vec<CheckpointView>>(
            c.partition_info(p, "checkpoints").map_err(fail)?,
        )?),
        Command::Cursors(p) => format_cursors(&from_json::<Vec<CursorView>>(
            c.partition_info(p, "cursors").map_err(fail)?,
        )?),
        Command::Stats => format_stats(&from_json::<StatsView>(c.stats().map_err(fail)?)?),
        Command::Restart | Command::Crash => {
            return Err(usage(
                "`restart` and `crash` work only on a local data directory (--data)",
            ))
        }
        Command::Help | Command::Quit => unreachable!("handled before"),
    })
}

pub(crate) fn run(args: ShellArgs) -> Result<ExitCode, Error> {
    let shell = match (args.target.data, args.target.addr) {
        (Some(dir), _) => Shell::open(dir)?,
        (None, Some(addr)) => {
            // Zero: an interval no idle connection reaches.
            let every = match args.heartbeat_s {
                0 => Duration::from_secs(u64::from(u32::MAX)),
                s => Duration::from_secs(s),
            };
            Shell {
                backend: Backend::Remote(Remote::connect(addr, every, args.wait.timeout())?),
                windows_lost: false,
            }
        }
        (None, None) => {
            return Err(Error::InvalidArgument(
                "give --data DIR or --addr ADDR".into(),
            ))
        }
    };
    // SIGINT / SIGTERM / SIGHUP (the terminal or ssh session gone): a
    // thread waits for the command in progress, closes the engine cleanly
    // (everything answered OK is flushed), and exits 128 + the signal's
    // number. A second SIGINT or SIGTERM exits at once, with 128 + its
    // number. (SIGHUP used to kill the shell as a crash would: answered
    // writes lost. Not when ignored at start, and a second one does not
    // force the exit: `crate::stop_signals`.)
    let shell = Arc::new(Mutex::new(Some(shell)));
    let closing = Arc::new(AtomicBool::new(false));
    let (stop_signals, forcing) = crate::stop_signals();
    for sig in forcing {
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&closing))?;
    }
    let mut signals = signal_hook::iterator::Signals::new(stop_signals)?;
    let on_signal = Arc::clone(&shell);
    std::thread::Builder::new()
        .name("tapkv-shell-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                closing.store(true, Ordering::Release);
                let taken = on_signal.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(sh) = &taken {
                    warn_reverted(&sh.open_windows());
                }
                let code = match taken.map_or(Ok(()), Shell::close) {
                    Ok(()) => 128 + sig,
                    // 3, as any failed command: 1 means a missing key.
                    Err(e) => {
                        errln!("{} (closing after signal {sig})", crate::error_line(&e));
                        i32::from(crate::EXIT_ERROR)
                    }
                };
                std::process::exit(code);
            }
        })?;
    // A failed read of standard input or write of standard output (a
    // closed pipe, a full disk) ends the loop; the engine is still closed
    // cleanly below, and the error reported after that (before, it skipped
    // the close, leaving the directory as a crash would, and a closed
    // stdout exited 0).
    let io_failure = serve_lines(&shell).err();
    // The close runs under the lock: a signal arriving meanwhile waits for
    // it in the signal thread (which then finds nothing left to close)
    // instead of exiting the process in the middle of the final flush.
    let mut guard = shell.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(shell) = guard.take() {
        // A window still open is reverted by the close (a directory cannot
        // keep a window across processes): say so, and fail.
        // Said before the close: a signal arriving during it exits the
        // process once the close is done, possibly before this thread
        // could say it.
        let open = shell.open_windows();
        if !open.is_empty() {
            warn_reverted(&open);
        }
        let lost = !open.is_empty() || shell.windows_lost;
        shell.close()?;
        drop(guard);
        if let Some(e) = io_failure {
            return Err(e);
        }
        if lost {
            return Ok(ExitCode::from(SHELL_WINDOWS_LOST));
        }
    } else {
        drop(guard);
        // The signal thread is closing the engine and will exit the process.
        loop {
            std::thread::park();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads command lines from standard input and answers each on standard
/// output until input ends, `quit`, or a signal took the shell; an error
/// reading or writing names the stream.
fn serve_lines(shell: &Mutex<Option<Shell>>) -> Result<(), Error> {
    let stdin_failed = |e: std::io::Error| {
        Error::Io(std::io::Error::other(format!(
            "reading standard input: {e}; the shell stopped there"
        )))
    };
    // Not `BrokenPipe`, which `main` takes for a reader that has seen
    // enough: commands after this one were not run, so it is an error.
    let stdout_failed = |e: std::io::Error| {
        Error::Io(std::io::Error::other(format!(
            "writing standard output: {e}; the shell stopped before reading the rest of its input"
        )))
    };
    let mut input = std::io::stdin().lock();
    let mut out = std::io::stdout().lock();
    let answer = |out: &mut std::io::StdoutLock<'_>, text: &str| {
        writeln!(out, "{text}")
            .and_then(|()| out.flush())
            .map_err(stdout_failed)
    };
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line_within(&mut input, &mut line, MAX_LINE).map_err(stdin_failed)? {
            Line::End => return Ok(()),
            Line::Whole => {}
            Line::TooLong => {
                answer(
                    &mut out,
                    &format!(
                        "ERROR invalid_argument: a line of more than {MAX_LINE} bytes (a 20 MiB \
                         value written in \\xNN escapes takes 80 MiB); skipped to its end"
                    ),
                )?;
                continue;
            }
        }
        // The lock is held to run the command, not to write its answer: a
        // reader of standard output that stops reading would otherwise keep
        // a signal from ever closing the shell (and a second signal then
        // exited without the close; found by a review).
        let reply = {
            let mut guard = shell.lock().unwrap_or_else(|p| p.into_inner());
            let Some(sh) = guard.as_mut() else {
                // Closing after a signal: the signal thread exits the process.
                return Ok(());
            };
            sh.execute(&line)
        };
        match reply {
            Reply::Line(text) => answer(&mut out, &text)?,
            Reply::Quit => return Ok(()),
        }
    }
}

/// Says on stderr that closing the engine reverts each of these open
/// windows (partition, checkpoint id).
fn warn_reverted(open: &[(PartitionId, u64)]) {
    for (p, id) in open {
        errln!(
            "warning: online-update window {id} on partition {p} was still open: closing the \
             engine reverts it (`update complete {p}` keeps a window's writes)"
        );
    }
}

/// Exit status of a `--data` shell that closed its engine with
/// online-update windows open (their writes are reverted).
const SHELL_WINDOWS_LOST: u8 = 4;

/// The answer to `flush`: `OK`, naming the open windows whose writes it
/// left in memory (nothing of a window is persisted before COMPLETE).
fn format_flush(open: &[(PartitionId, u64)]) -> String {
    if open.is_empty() {
        return "OK".into();
    }
    format!("OK NOT_FLUSHED_WINDOWS {}", format_windows(open))
}

/// Windows as `<partition>:<checkpoint id>,...`.
fn format_windows(windows: &[(PartitionId, u64)]) -> String {
    let w: Vec<String> = windows.iter().map(|(p, id)| format!("{p}:{id}")).collect();
    w.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn escaping_round_trips_and_stays_on_one_line(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            let e = escape(&v);
            let breaks = ['\n', '\r', '\u{2028}', '\u{2029}', '\u{85}', '\u{b}', '\u{c}'];
            prop_assert!(!e.contains(breaks), "{:?}", e);
            prop_assert_eq!(unescape(e.as_bytes()).unwrap(), v);
        }

        #[test]
        fn text_without_backslashes_or_controls_is_written_as_is(s in "[^\\\\\\p{Cc}\u{2028}\u{2029}]{0,40}") {
            prop_assert_eq!(escape(s.as_bytes()), s);
        }
    }

    #[test]
    fn cursor_names_cannot_split_the_cursors_answer() {
        let view = |name: &str| CursorView {
            name: name.into(),
            checkpoint_id: 1,
            seqno: 2,
            remaining: 3,
        };
        let line = format_cursors(&[view("a; fake checkpoint=9"), view("b")]);
        let entries: Vec<&str> = line["OK ".len()..].split("; ").collect();
        assert_eq!(entries.len(), 2, "{line}");
        let name = entries[0].split(' ').next().unwrap();
        assert_eq!(unescape(name.as_bytes()).unwrap(), b"a; fake checkpoint=9");
    }

    #[test]
    fn parses_the_grammar() {
        assert_eq!(
            parse(b"set k\\x20y two words\\n"),
            Ok(Command::Write {
                op: WriteOp::Set,
                key: b"k y".to_vec(),
                value: b"two words\n".to_vec()
            })
        );
        assert_eq!(parse(b"get k"), Ok(Command::Get(b"k".to_vec())));
        assert_eq!(
            parse(b"update revert 3"),
            Ok(Command::Update(UpdateOp::Revert, 3))
        );
        assert_eq!(parse(b"checkpoints 7"), Ok(Command::Checkpoints(7)));
        for bad in [
            &b"get"[..],
            b"get a b",
            b"set k",
            b"set  v",
            b"partition",
            b"update start",
            b"update stop 1",
            b"checkpoints x",
            b"flush now",
            b"set k bad\\q",
            b"set k \\x4",
            b"\xff",
            b"",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.starts_with("ERROR invalid_argument: "), "{bad:?}: {e}");
        }
    }
}

#[cfg(test)]
mod line_tests {
    use super::*;

    #[test]
    fn a_carriage_return_is_dropped_only_with_a_newline() {
        // Before, a last line `set k v\r` with no newline lost its `\r`.
        let dir = tempfile::tempdir().unwrap();
        let mut sh = Shell::open(dir.path().to_path_buf()).unwrap();
        let mut answer = |line: &[u8]| match sh.execute(line) {
            Reply::Line(l) => l,
            other => panic!("{other:?}"),
        };
        assert!(answer(b"set a x\r\n").starts_with("OK"));
        assert_eq!(answer(b"get a\n"), "VALUE x");
        assert!(answer(b"set b y\r").starts_with("OK"));
        assert_eq!(answer(b"get b"), "VALUE y\\r");
    }

    #[test]
    fn a_line_over_the_limit_is_skipped_to_its_end_not_held() {
        // Before, the shell read a line whole whatever its length: a stray
        // stream with no newline grew its memory until end of input.
        let mut input = std::io::Cursor::new(b"ab\nlonglongline\ncd".to_vec());
        let mut line = Vec::new();
        let mut read = |line: &mut Vec<u8>| {
            line.clear();
            read_line_within(&mut input, line, 4).unwrap()
        };
        assert_eq!((read(&mut line), &line[..]), (Line::Whole, &b"ab\n"[..]));
        assert_eq!(read(&mut line), Line::TooLong);
        assert!(line.is_empty(), "nothing of it kept");
        assert_eq!((read(&mut line), &line[..]), (Line::Whole, &b"cd"[..]));
        assert_eq!(read(&mut line), Line::End);
        // At the limit exactly, with or without its newline, a line is whole.
        let mut input = std::io::Cursor::new(b"abcd\nabcd".to_vec());
        line.clear();
        assert_eq!(
            read_line_within(&mut input, &mut line, 4).unwrap(),
            Line::Whole
        );
        line.clear();
        assert_eq!(
            read_line_within(&mut input, &mut line, 4).unwrap(),
            Line::Whole
        );
        assert_eq!(line, b"abcd");
    }
}

#[cfg(test)]
mod partition_arg_tests {
    use super::*;

    #[test]
    fn a_partition_argument_says_what_is_wrong_with_it() {
        // Before, a missing one read `("" is not a partition number)` and
        // 70000 was "not a partition number".
        let err = |line: &str| parse(line.as_bytes()).err().unwrap_or_default();
        assert!(err("checkpoint").ends_with("(the partition number is missing)"));
        assert!(err("cursors ").ends_with("(the partition number is missing)"));
        assert!(err("update start 70000").contains("partition 70000 is out of range"));
        assert!(err("checkpoints x").contains("\"x\" is not a partition number"));
        assert!(matches!(parse(b"cursors 3"), Ok(Command::Cursors(3))));
        // A sign is not a digit (it was taken: `checkpoints +1`).
        assert!(err("checkpoints +1").contains("\"+1\" is not a partition number"));
    }

    #[test]
    fn an_escape_error_names_the_word_it_is_in() {
        let err = |line: &str| parse(line.as_bytes()).err().unwrap_or_default();
        assert!(
            err("set a\\q 1").contains("KEY: bad escape"),
            "{}",
            err("set a\\q 1")
        );
        assert!(
            err("set a 1\\x4").contains("VALUE: "),
            "{}",
            err("set a 1\\x4")
        );
        assert!(
            err("get \\q").contains("KEY: bad escape"),
            "{}",
            err("get \\q")
        );
    }
}
