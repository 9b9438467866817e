//! `tapkv shell`: one command per line on stdin, one answer line on stdout.
//!
//! The grammar is documented in `docs/shell.md`. Answers start with `OK`,
//! `VALUE`, `NOT_FOUND` or `ERROR <kind>:`; an error never ends the shell.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tapkv_engine::{Engine, Error, PartitionId, WriteOptions};

use crate::{connect, Target};
use tapkv_replication::client::{Client, ClientError, KeptAlive};

#[derive(Args, Debug)]
pub(crate) struct ShellArgs {
    #[command(flatten)]
    target: Target,
    /// With --addr: send a NOOP heartbeat after this many seconds without a
    /// command, so the node's idle timeout (default 300 s) does not close a
    /// shell that is only waiting for input. 0 turns heartbeats off.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    heartbeat_s: u64,
}

const HELP: &str = "commands: set KEY VALUE | add KEY VALUE | replace KEY VALUE | get KEY | \
del KEY | partition KEY | evict KEY | flush | checkpoint P | checkpoints P | cursors P | \
update start|complete|revert P | stats | restart | crash | help | quit";

/// A shell over an embedded engine.
pub(crate) struct Shell {
    path: PathBuf,
    engine: Option<Engine>,
    remote: Option<KeptAlive>,
}

/// What one command line produced.
pub(crate) enum Reply {
    Line(String),
    Quit,
}

fn err(e: &Error) -> String {
    match e {
        Error::NotFound => "NOT_FOUND".into(),
        e => format!("ERROR {}: {e}", e.kind()),
    }
}

fn usage(msg: &str) -> String {
    format!("ERROR invalid_argument: {msg}")
}

impl Shell {
    pub(crate) fn open(path: PathBuf) -> Result<Shell, Error> {
        let engine = Engine::builder(&path).open()?;
        Ok(Shell {
            path,
            engine: Some(engine),
            remote: None,
        })
    }

    fn engine(&self) -> Result<&Engine, Error> {
        self.engine.as_ref().ok_or(Error::Closed)
    }

    fn partition(&self, arg: Option<&str>) -> Result<PartitionId, String> {
        let Some(arg) = arg else {
            return Err(usage("missing partition number"));
        };
        arg.parse::<PartitionId>()
            .map_err(|_| usage(&format!("{arg:?} is not a partition number")))
    }

    /// Executes one command line.
    pub(crate) fn execute(&mut self, line: &str) -> Reply {
        if let Some(remote) = self.remote.as_ref() {
            return remote.with(|c| remote_execute(c, line));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let mut words = line.splitn(2, ' ');
        let cmd = words.next().unwrap_or("");
        let rest = words.next().unwrap_or("");
        let text = match cmd {
            "" => return Reply::Line(usage("empty command; try `help`")),
            "quit" | "exit" => return Reply::Quit,
            // Exit at once, without flushing or closing: as a kill would.
            "crash" => std::process::exit(137),
            "help" => format!("OK {HELP}"),
            "set" | "add" | "replace" => self.write(cmd, rest),
            "get" => self.get(rest),
            "del" => self.del(rest),
            _ => self.admin(cmd, rest),
        };
        Reply::Line(text)
    }

    fn write(&self, cmd: &str, rest: &str) -> String {
        let Some((key, value)) = rest.split_once(' ') else {
            return usage(&format!("usage: {cmd} KEY VALUE"));
        };
        let engine = match self.engine() {
            Ok(e) => e,
            Err(e) => return err(&e),
        };
        let value = value.as_bytes().to_vec();
        let r = match cmd {
            "add" => engine.add(key.as_bytes(), value, WriteOptions::default()),
            "replace" => engine.replace(key.as_bytes(), value, WriteOptions::default()),
            _ => engine.set(key.as_bytes(), value, WriteOptions::default()),
        };
        match r {
            Ok(r) => format!(
                "OK PARTITION {} SEQNO {} CAS {}",
                r.partition, r.seqno, r.cas
            ),
            Err(e) => err(&e),
        }
    }

    fn get(&self, key: &str) -> String {
        if key.is_empty() || key.contains(' ') {
            return usage("usage: get KEY");
        }
        match self.engine().and_then(|e| e.get(key.as_bytes())) {
            Ok(item) => format!("VALUE {}", String::from_utf8_lossy(item.value())),
            Err(e) => err(&e),
        }
    }

    fn del(&self, key: &str) -> String {
        if key.is_empty() || key.contains(' ') {
            return usage("usage: del KEY");
        }
        match self
            .engine()
            .and_then(|e| e.delete(key.as_bytes(), WriteOptions::default()))
        {
            Ok(r) => format!("OK PARTITION {} SEQNO {}", r.partition, r.seqno),
            Err(e) => err(&e),
        }
    }

    fn admin(&mut self, cmd: &str, rest: &str) -> String {
        let arg = rest.split_whitespace().next();
        let key_arg = || -> Result<&str, String> {
            match arg {
                Some(k) if !rest.contains(' ') => Ok(k),
                _ => Err(usage(&format!("usage: {cmd} KEY"))),
            }
        };
        let result: Result<String, String> = (|| match cmd {
            "partition" => {
                let key = key_arg()?;
                let e = self.engine().map_err(|e| err(&e))?;
                Ok(format!("OK PARTITION {}", e.partition_of(key.as_bytes())))
            }
            "evict" => {
                let key = key_arg()?;
                self.engine()
                    .and_then(|e| e.evict(key.as_bytes()))
                    .map_err(|e| err(&e))?;
                Ok("OK EVICTED".into())
            }
            "update" => {
                let mut w = rest.split_whitespace();
                let (what, p) = (w.next(), w.next());
                let p = self.partition(p)?;
                let e = self.engine().map_err(|e| err(&e))?;
                match what {
                    Some("start") => e
                        .online_update_start(p)
                        .map(|id| format!("OK CHECKPOINT {id}")),
                    Some("complete") => e
                        .online_update_complete(p)
                        .map(|id| format!("OK CHECKPOINT {id}")),
                    Some("revert") => e.online_update_revert(p).map(|r| {
                        format!(
                            "OK CHECKPOINT {} REMOVED {} RESTORED {}",
                            r.checkpoint_id, r.removed, r.restored
                        )
                    }),
                    _ => return Err(usage("usage: update start|complete|revert P")),
                }
                .map_err(|e| err(&e))
            }
            "flush" => {
                self.engine().and_then(Engine::flush).map_err(|e| err(&e))?;
                Ok("OK".into())
            }
            "checkpoint" => {
                let p = self.partition(arg)?;
                let id = self
                    .engine()
                    .and_then(|e| e.create_checkpoint(p))
                    .map_err(|e| err(&e))?;
                Ok(format!("OK CHECKPOINT {id}"))
            }
            "checkpoints" => {
                let p = self.partition(arg)?;
                let cks = self
                    .engine()
                    .and_then(|e| e.checkpoints(p))
                    .map_err(|e| err(&e))?;
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
                Ok(format!("OK {}", parts.join("; ")))
            }
            "cursors" => {
                let p = self.partition(arg)?;
                let cs = self
                    .engine()
                    .and_then(|e| e.cursors(p))
                    .map_err(|e| err(&e))?;
                let parts: Vec<String> = cs
                    .iter()
                    .map(|c| {
                        format!(
                            "{} checkpoint={} seqno={} remaining={}",
                            c.name, c.checkpoint_id, c.seqno, c.remaining
                        )
                    })
                    .collect();
                Ok(format!("OK {}", parts.join("; ")))
            }
            "stats" => {
                let st = self.engine().and_then(Engine::stats).map_err(|e| err(&e))?;
                let flushes: u64 = st.partitions.iter().map(|p| p.flushes).sum();
                let flushed: u64 = st.partitions.iter().map(|p| p.flushed_items).sum();
                let high: u64 = st
                    .partitions
                    .iter()
                    .map(|p| p.high_seqno)
                    .max()
                    .unwrap_or(0);
                let evicted: usize = st.partitions.iter().map(|p| p.evicted_items).sum();
                let fetches: u64 = st.partitions.iter().map(|p| p.bg_fetches).sum();
                let windows: Vec<String> = st
                    .partitions
                    .iter()
                    .filter_map(|p| {
                        p.window
                            .map(|w| format!("{}:{}", p.partition, w.checkpoint_id))
                    })
                    .collect();
                let lost: usize = st.partitions.iter().map(|p| p.lost_windows.len()).sum();
                Ok(format!(
                    "OK items={} dirty={} checkpoint_mem={} flushes={} flushed_items={} \
                     max_high_seqno={} partitions={} evicted={} bg_fetches={} \
                     open_windows={} lost_windows={}",
                    st.items(),
                    st.dirty(),
                    st.checkpoint_mem_bytes,
                    flushes,
                    flushed,
                    high,
                    st.partitions.len(),
                    evicted,
                    fetches,
                    if windows.is_empty() {
                        "-".to_string()
                    } else {
                        windows.join(",")
                    },
                    lost
                ))
            }
            "restart" => {
                if let Some(engine) = self.engine.take() {
                    engine.close().map_err(|e| err(&e))?;
                }
                let engine = Engine::builder(&self.path).open().map_err(|e| err(&e))?;
                let items = engine.stats().map(|s| s.items()).unwrap_or(0);
                self.engine = Some(engine);
                Ok(format!("OK RESTARTED ITEMS {items}"))
            }
            other => Err(usage(&format!("unknown command {other:?}; try `help`"))),
        })();
        result.unwrap_or_else(|e| e)
    }

    pub(crate) fn close(mut self) -> Result<(), Error> {
        match self.engine.take() {
            Some(e) => e.close(),
            None => Ok(()),
        }
    }
}

pub(crate) fn run(args: ShellArgs) -> Result<ExitCode, Error> {
    let mut shell = match (args.target.data, args.target.addr) {
        (Some(dir), _) => Shell::open(dir)?,
        (None, Some(addr)) => {
            let client = connect(&addr)?;
            // Zero: an interval no idle connection reaches.
            let every = match args.heartbeat_s {
                0 => Duration::from_secs(u64::from(u32::MAX)),
                s => Duration::from_secs(s),
            };
            let remote = KeptAlive::new(client, every)
                .map_err(|e| Error::Io(std::io::Error::other(format!("keep-alive thread: {e}"))))?;
            Shell {
                path: PathBuf::new(),
                engine: None,
                remote: Some(remote),
            }
        }
        (None, None) => {
            return Err(Error::InvalidArgument(
                "give --data DIR or --addr ADDR".into(),
            ))
        }
    };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        match shell.execute(&line) {
            Reply::Line(text) => {
                writeln!(out, "{text}")?;
                out.flush()?;
            }
            Reply::Quit => break,
        }
    }
    shell.close()?;
    Ok(ExitCode::SUCCESS)
}

fn remote_err(e: &ClientError) -> String {
    if e.is_not_found() {
        return "NOT_FOUND".into();
    }
    match e {
        ClientError::Status { message, .. } => format!("ERROR {message}"),
        other => format!("ERROR io: {other}"),
    }
}

/// The same grammar, executed by a node over the network.
fn remote_execute(c: &mut Client, line: &str) -> Reply {
    let line = line.trim_end_matches(['\r', '\n']);
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    let arg = rest.split_whitespace().next();
    let part = |a: Option<&str>| -> Result<u16, String> {
        a.and_then(|a| a.parse().ok())
            .ok_or_else(|| usage("missing or bad partition number"))
    };
    let text: Result<String, String> = match cmd {
        "" => Err(usage("empty command; try `help`")),
        "quit" | "exit" => return Reply::Quit,
        "help" => Ok(format!("OK {HELP}")),
        "set" | "add" | "replace" => match rest.split_once(' ') {
            None => Err(usage(&format!("usage: {cmd} KEY VALUE"))),
            Some((k, v)) => match cmd {
                "add" => c.add(k.as_bytes(), v.as_bytes()),
                "replace" => c.replace(k.as_bytes(), v.as_bytes()),
                _ => c.set(k.as_bytes(), v.as_bytes(), 0, false),
            }
            .map(|r| {
                format!(
                    "OK PARTITION {} SEQNO {} CAS {}",
                    r.partition, r.seqno, r.cas
                )
            })
            .map_err(|e| remote_err(&e)),
        },
        "get" => c
            .get(rest.as_bytes())
            .map(|(v, _)| format!("VALUE {}", String::from_utf8_lossy(&v)))
            .map_err(|e| remote_err(&e)),
        "del" => c
            .delete(rest.as_bytes())
            .map(|r| format!("OK PARTITION {} SEQNO {}", r.partition, r.seqno))
            .map_err(|e| remote_err(&e)),
        "partition" => Ok(format!("OK PARTITION {}", c.partition_of(rest.as_bytes()))),
        "evict" => c
            .evict(rest.as_bytes())
            .map(|_| "OK EVICTED".into())
            .map_err(|e| remote_err(&e)),
        "flush" => c.flush().map(|_| "OK".into()).map_err(|e| remote_err(&e)),
        "checkpoint" => part(arg).and_then(|p| {
            c.checkpoint(p)
                .map(|id| format!("OK CHECKPOINT {id}"))
                .map_err(|e| remote_err(&e))
        }),
        "checkpoints" | "cursors" => part(arg).and_then(|p| {
            c.partition_info(p, cmd)
                .map(|v| format!("OK {v}"))
                .map_err(|e| remote_err(&e))
        }),
        "stats" => c
            .stats()
            .map(|v| {
                format!(
                    "OK items={} dirty={} checkpoint_mem={} role={}",
                    v["items"],
                    v["dirty"],
                    v["checkpoint_mem_bytes"],
                    v["role"].as_str().unwrap_or("")
                )
            })
            .map_err(|e| remote_err(&e)),
        "update" => {
            let mut w = rest.split_whitespace();
            let what = w.next();
            part(w.next()).and_then(|p| match what {
                Some("start") => c
                    .update_start(p)
                    .map(|id| format!("OK CHECKPOINT {id}"))
                    .map_err(|e| remote_err(&e)),
                Some("complete") => c
                    .update_complete(p)
                    .map(|id| format!("OK CHECKPOINT {id}"))
                    .map_err(|e| remote_err(&e)),
                Some("revert") => c
                    .update_revert(p)
                    .map(|(id, removed, restored)| {
                        format!("OK CHECKPOINT {id} REMOVED {removed} RESTORED {restored}")
                    })
                    .map_err(|e| remote_err(&e)),
                _ => Err(usage("usage: update start|complete|revert P")),
            })
        }
        "restart" | "crash" => Err(usage(&format!(
            "`{cmd}` works only on a local data directory (--data)"
        ))),
        other => Err(usage(&format!("unknown command {other:?}; try `help`"))),
    };
    Reply::Line(text.unwrap_or_else(|e| e))
}
