//! `tapkv admin`: read-only inspection of a data directory (works offline and
//! beside a running process, which it does not disturb).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use tapkv_engine::{DiskView, Error};
use tapkv_replication::client::DumpRow;

use crate::connect;

/// Where an admin command reads: a data directory or a running node.
#[derive(clap::Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub(crate) struct Target {
    /// Data directory to read, read-only: never created or changed, and
    /// readable while a process holds it.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Address of a running node (`tapkv node`), e.g. 127.0.0.1:11311.
    #[arg(long, value_name = "ADDR", value_parser = crate::node::node_addr)]
    addr: Option<String>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum AdminCommand {
    /// Per partition: persisted high seqno, checkpoint id, item count,
    /// online-update windows (offline with --data; a running node with --addr).
    Inspect {
        #[command(flatten)]
        target: Target,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        wait: crate::Wait,
    },
    /// Every persisted item (tombstones included), in partition and key order.
    Dump {
        #[command(flatten)]
        target: Target,
        /// One JSON object per line: partition, seqno, cas, key, value_len,
        /// deleted, rev_seqno, flags, expiry. Keys are escaped as in the
        /// shell (`\\`, `\n`, `\r`, `\t`, `\xNN`), in the text lines also
        /// spaces (`\x20`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        wait: crate::Wait,
    },
    /// Replication streams of a running node: cursor position, lag, state, last ack.
    Streams {
        /// Address of the node.
        #[arg(long, value_name = "ADDR", value_parser = crate::node::node_addr)]
        addr: String,
        /// The node's JSON array (name, peer, unacked_bytes, last_ack_ms, acks_ahead,
        /// restarts, and per partition: partition, state, sent_seqno, acked_seqno,
        /// lag_items, lag_bytes, resumed_from) instead of the table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        wait: crate::Wait,
    },
}

pub(crate) fn run(cmd: AdminCommand) -> Result<ExitCode, Error> {
    match cmd {
        AdminCommand::Inspect { target, json, wait } => match (target.data, target.addr) {
            (Some(data), _) => inspect(&data, json),
            (None, Some(addr)) => {
                let v = connect(&addr, wait.timeout())?
                    .admin("inspect")
                    .map_err(|e| remote(&addr, wait, e))?;
                if json {
                    outln!("{v}")?;
                } else {
                    let text = |x: &serde_json::Value| x.as_str().unwrap_or("").to_owned();
                    let num = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
                    outln!(
                        "node {} ({}), data directory {}",
                        text(&v["name"]),
                        text(&v["role"]),
                        text(&v["data"])
                    )?;
                    if v["role"] == "replica" {
                        outln!(
                            "replica of {}: {} stream(s) opened; {}",
                            text(&v["primary"]),
                            num(&v["link_sessions"]),
                            match v["link_error"].as_str() {
                                Some(e) => format!("NOT REPLICATING: {e}"),
                                None => "link up".to_string(),
                            }
                        )?;
                    }
                    outln!(
                        "{:>9} {:>12} {:>10} {:>13} {:>8}  online update",
                        "partition",
                        "high_seqno",
                        "persisted",
                        "checkpoint_id",
                        "items"
                    )?;
                    for p in v["partitions"].as_array().into_iter().flatten() {
                        let mut notes = Vec::new();
                        let w = &p["open_window"];
                        if !w.is_null() {
                            notes.push(format!(
                                "window {} open ({} keys, {} bytes)",
                                num(&w["checkpoint_id"]),
                                num(&w["keys"]),
                                num(&w["bytes"])
                            ));
                        }
                        for w in p["lost_windows"].as_array().into_iter().flatten() {
                            notes.push(format!("window {} lost", num(&w["checkpoint_id"])));
                        }
                        outln!(
                            "{:>9} {:>12} {:>10} {:>13} {:>8}  {}",
                            num(&p["partition"]),
                            num(&p["high_seqno"]),
                            num(&p["persisted_seqno"]),
                            num(&p["checkpoint_id"]),
                            num(&p["items"]),
                            if notes.is_empty() {
                                "-".to_string()
                            } else {
                                notes.join("; ")
                            }
                        )?;
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            _ => Err(Error::InvalidArgument(
                "give --data DIR or --addr ADDR".into(),
            )),
        },
        AdminCommand::Dump { target, json, wait } => match (target.data, target.addr) {
            (Some(data), _) => dump(&data, json),
            (None, Some(addr)) => {
                let mut out = std::io::stdout().lock();
                let mut err: Option<Error> = None;
                connect(&addr, wait.timeout())?
                    .dump(|row| {
                        // The same strict row and the same line as the
                        // offline dump, so the two can be diffed.
                        let line = serde_json::from_value::<DumpRow>(row)
                            .map_err(|e| {
                                Error::Corruption(format!(
                                    "the node at {addr} sent a malformed dump row: {e}"
                                ))
                            })
                            .and_then(|row| dump_line(&row, json));
                        let written =
                            line.and_then(|line| writeln!(out, "{line}").map_err(Error::from));
                        // The first failure ends the read: a closed stdout
                        // (`| head`) no longer holds the node's dump slot to
                        // its end, and a malformed row leaves no silent gap.
                        match written {
                            Ok(()) => true,
                            Err(e) => {
                                err.get_or_insert(e);
                                false
                            }
                        }
                    })
                    .map_err(|e| remote(&addr, wait, e))?;
                if let Some(e) = err {
                    return Err(e);
                }
                Ok(ExitCode::SUCCESS)
            }
            _ => Err(Error::InvalidArgument(
                "give --data DIR or --addr ADDR".into(),
            )),
        },
        AdminCommand::Streams { addr, json, wait } => {
            let v = connect(&addr, wait.timeout())?
                .admin("streams")
                .map_err(|e| remote(&addr, wait, e))?;
            if json {
                outln!("{v}")?;
                return Ok(ExitCode::SUCCESS);
            }
            let streams = v.as_array().cloned().unwrap_or_default();
            if streams.is_empty() {
                outln!("no replication streams")?;
            }
            for s in streams {
                outln!(
                    "stream {} from {}: {} bytes unacknowledged, last ack {} ms ago",
                    s["name"].as_str().unwrap_or(""),
                    s["peer"].as_str().unwrap_or(""),
                    s["unacked_bytes"],
                    s["last_ack_ms"]
                )?;
                let restarts = s["restarts"].as_u64().unwrap_or(0);
                if restarts > 0 {
                    outln!(
                        "  {restarts} partition start(s) again: the primary's flusher dropped \
                         their cursors under checkpoint-memory pressure"
                    )?;
                }
                let ahead = s["acks_ahead"].as_u64().unwrap_or(0);
                if ahead > 0 {
                    outln!(
                        "  warning: {ahead} acknowledgements ahead of what was sent \
                         (a misbehaving replica; counted only up to what was sent)"
                    )?;
                }
                for p in s["partitions"].as_array().into_iter().flatten() {
                    // Numbers as integers: a JSON value ignores the widths.
                    let n = |k: &str| p[k].as_u64().unwrap_or(0);
                    outln!(
                        "  partition {:>3}: {:<11} sent {:>8} acked {:>8} lag {:>6} items {:>10} bytes",
                        n("partition"),
                        p["state"].as_str().unwrap_or(""),
                        n("sent_seqno"),
                        n("acked_seqno"),
                        n("lag_items"),
                        n("lag_bytes")
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A failed request to the node at `addr`: its refusal with its kind, or
/// a transport failure naming it (without a doubled "I/O error: " prefix).
fn remote(addr: &str, wait: crate::Wait, e: tapkv_replication::client::ClientError) -> Error {
    crate::remote_error(addr, wait, e, false)
}

fn inspect(data: &PathBuf, json: bool) -> Result<ExitCode, Error> {
    let view = DiskView::open(data)?;
    let parts = view.partitions()?;
    let clean = view.clean_shutdown()?;
    if json {
        let doc = serde_json::json!({
            "data": data.display().to_string(),
            "clean_shutdown": clean,
            "partitions": parts,
        });
        outln!("{doc}")?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "data directory {} (last shutdown: {})",
        data.display(),
        if clean {
            "clean"
        } else {
            "not clean / still open"
        }
    )?;
    outln!(
        "{:>9} {:>12} {:>13} {:>10} {:>10}  online update",
        "partition",
        "high_seqno",
        "checkpoint_id",
        "items",
        "tombstones"
    )?;
    for p in &parts {
        let mut notes = Vec::new();
        if let Some(w) = p.open_window {
            notes.push(format!(
                "window {} open since seqno {} (lost if no process holds the directory)",
                w.checkpoint_id, w.start_seqno
            ));
        }
        for w in &p.lost_windows {
            notes.push(format!(
                "window {} lost to a crash or close",
                w.checkpoint_id
            ));
        }
        outln!(
            "{:>9} {:>12} {:>13} {:>10} {:>10}  {}",
            p.partition,
            p.high_seqno,
            p.checkpoint_id,
            p.items,
            p.tombstones,
            if notes.is_empty() {
                "-".to_string()
            } else {
                notes.join("; ")
            }
        )?;
    }
    let items: u64 = parts.iter().map(|p| p.items).sum();
    outln!("total items: {items}")?;
    Ok(ExitCode::SUCCESS)
}

/// A key as a dump's text line shows it: escaped (`tapkv_replication::text`,
/// as the shell's answers), with spaces as `\x20` too, so a line splits on
/// spaces into its fields.
fn text_key(escaped: &str) -> String {
    escaped.replace(' ', "\\x20")
}

fn dump(data: &PathBuf, json: bool) -> Result<ExitCode, Error> {
    let view = DiskView::open(data)?;
    let mut out = std::io::stdout().lock();
    view.for_each_item(|it| {
        writeln!(out, "{}", dump_line(&DumpRow::of(&it), json)?)?;
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// One dump line: the row as JSON, or as `name=value` fields.
fn dump_line(row: &DumpRow, json: bool) -> Result<String, Error> {
    if json {
        return serde_json::to_string(row)
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())));
    }
    Ok(format!(
        "partition={} seqno={} cas={} key={} value_len={}{}",
        row.partition,
        row.seqno,
        row.cas,
        text_key(&row.key),
        row.value_len,
        if row.deleted { " deleted" } else { "" }
    ))
}
