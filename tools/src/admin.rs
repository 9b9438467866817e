//! `tapkv admin`: read-only inspection of a data directory (works offline and
//! beside a running process, which it does not disturb).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use tapkv_engine::{DiskView, Error};

#[derive(Subcommand, Debug)]
pub(crate) enum AdminCommand {
    /// Per partition: persisted high seqno, checkpoint id, item count.
    Inspect {
        /// Data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every persisted item (tombstones included), in partition and key order.
    Dump {
        /// Data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// One JSON object per line: partition, seqno, cas, key, value_len, deleted.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(cmd: AdminCommand) -> Result<ExitCode, Error> {
    match cmd {
        AdminCommand::Inspect { data, json } => inspect(&data, json),
        AdminCommand::Dump { data, json } => dump(&data, json),
    }
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
        println!("{doc}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "data directory {} (last shutdown: {})",
        data.display(),
        if clean {
            "clean"
        } else {
            "not clean / still open"
        }
    );
    println!(
        "{:>9} {:>12} {:>13} {:>10} {:>10}  online update",
        "partition", "high_seqno", "checkpoint_id", "items", "tombstones"
    );
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
        println!(
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
        );
    }
    let items: u64 = parts.iter().map(|p| p.items).sum();
    println!("total items: {items}");
    Ok(ExitCode::SUCCESS)
}

fn dump(data: &PathBuf, json: bool) -> Result<ExitCode, Error> {
    let view = DiskView::open(data)?;
    let mut out = std::io::stdout().lock();
    view.for_each_item(|it| {
        let key = String::from_utf8_lossy(&it.key);
        let r = &it.record;
        if json {
            let line = serde_json::json!({
                "partition": it.partition,
                "seqno": r.meta.by_seqno,
                "cas": r.meta.cas,
                "key": key,
                "value_len": r.value.len(),
                "deleted": r.deleted,
                "rev_seqno": r.meta.rev_seqno,
                "flags": r.meta.flags,
                "expiry": r.meta.expiry,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(
                out,
                "partition={} seqno={} cas={} key={key} value_len={}{}",
                it.partition,
                r.meta.by_seqno,
                r.meta.cas,
                r.value.len(),
                if r.deleted { " deleted" } else { "" }
            )?;
        }
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
