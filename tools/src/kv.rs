//! `tapkv kv get|set|del`: one key operation on a data directory.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tapkv_engine::{Engine, Error, WriteOptions};

use crate::{connect, DurabilityArg, Target};

#[derive(Args, Debug)]
pub(crate) struct KvArgs {
    #[command(subcommand)]
    op: KvOp,
    #[command(flatten)]
    wait: crate::Wait,
}

#[derive(Subcommand, Debug)]
enum KvOp {
    /// Print the value of KEY; exits 1 with a message on stderr if absent.
    Get {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: String,
    },
    /// Store VALUE under KEY.
    Set {
        #[command(flatten)]
        target: Target,
        /// The key (1 to 250 bytes).
        key: String,
        /// The value.
        value: String,
        /// Wait for memory (default), the disk, or (with --addr) a
        /// majority of the node's replicas.
        #[arg(long, value_enum, default_value_t)]
        durability: DurabilityArg,
    },
    /// Delete KEY; exits 1 if absent.
    Del {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: String,
        /// Wait for memory (default), the disk, or (with --addr) a
        /// majority of the node's replicas.
        #[arg(long, value_enum, default_value_t)]
        durability: DurabilityArg,
    },
}

/// The refusal of `--durability replicate` on a data directory (worded as
/// `load`'s).
const REPLICATE_NEEDS_A_NODE: &str = "--durability replicate needs a node with replicas; \
     `kv --data` writes to a data directory in this process (use --addr ADDR, or memory or persist)";

pub(crate) fn run(args: KvArgs) -> Result<ExitCode, Error> {
    // Refused before the directory is opened (or created).
    if let KvOp::Set {
        target,
        durability: DurabilityArg::Replicate,
        ..
    }
    | KvOp::Del {
        target,
        durability: DurabilityArg::Replicate,
        ..
    } = &args.op
    {
        if target.data.is_some() {
            return Ok(crate::usage_error(REPLICATE_NEEDS_A_NODE));
        }
    }
    if let Some(code) = remote(&args.op, args.wait)? {
        return Ok(code);
    }
    match args.op {
        KvOp::Get { target, key } => {
            let engine = Engine::builder(existing(local(&target)?)?).open()?;
            match engine.get(key.as_bytes()) {
                Ok(item) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(item.value())?;
                    out.write_all(b"\n")?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(Error::NotFound) => {
                    eprintln!("error: key {key:?} not found");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e),
            }
        }
        KvOp::Set {
            target,
            key,
            value,
            durability,
        } => {
            let engine = Engine::builder(local(&target)?).open()?;
            let r = engine.set(
                key.as_bytes(),
                value.into_bytes(),
                WriteOptions::durable(durability.into()),
            )?;
            // Closed (flushed) before OK is printed: OK means it is on disk.
            engine.close()?;
            outln!("{}", set_ok(r.partition, r.seqno, r.cas))?;
            Ok(ExitCode::SUCCESS)
        }
        KvOp::Del {
            target,
            key,
            durability,
        } => {
            let engine = Engine::builder(existing(local(&target)?)?).open()?;
            match engine.delete(key.as_bytes(), WriteOptions::durable(durability.into())) {
                Ok(r) => {
                    engine.close()?;
                    outln!("OK partition={} seqno={}", r.partition, r.seqno)?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(Error::NotFound) => {
                    eprintln!("error: key {key:?} not found");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// The answer to a successful `kv set`, local or remote.
fn set_ok(partition: u16, seqno: u64, cas: u64) -> String {
    format!("OK partition={partition} seqno={seqno} cas={cas}")
}

fn local(t: &Target) -> Result<&std::path::Path, Error> {
    t.data
        .as_deref()
        .ok_or_else(|| Error::InvalidArgument("give --data DIR or --addr ADDR".into()))
}

/// `dir`, if it holds a store: a read or a delete does not create one (a
/// mistyped path would otherwise answer "not found" from a new, empty
/// directory).
fn existing(dir: &std::path::Path) -> Result<&std::path::Path, Error> {
    if dir.join("rocksdb").join("CURRENT").exists() {
        Ok(dir)
    } else {
        Err(Error::InvalidArgument(format!(
            "{} is not a tapkv data directory (nothing has been written there)",
            dir.display()
        )))
    }
}

/// Runs the operation against a node when `--addr` is given.
fn remote(op: &KvOp, wait: crate::Wait) -> Result<Option<ExitCode>, Error> {
    let (target, key) = match op {
        KvOp::Get { target, key }
        | KvOp::Set { target, key, .. }
        | KvOp::Del { target, key, .. } => (target, key),
    };
    let Some(addr) = &target.addr else {
        return Ok(None);
    };
    let mut c = connect(addr, wait.timeout())?;
    let write = !matches!(op, KvOp::Get { .. });
    let fail = |e: tapkv_replication::client::ClientError| -> Result<Option<ExitCode>, Error> {
        if e.is_not_found() {
            eprintln!("error: key {key:?} not found");
            Ok(Some(ExitCode::FAILURE))
        } else {
            // As every other failure: 3 (`tapkv --help`), not a missing key.
            eprintln!("error: {}", crate::request_failed(addr, wait, &e, write));
            Ok(Some(ExitCode::from(crate::EXIT_ERROR)))
        }
    };
    match op {
        KvOp::Get { .. } => match c.get(key.as_bytes()) {
            Ok((v, _)) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&v)?;
                out.write_all(b"\n")?;
                Ok(Some(ExitCode::SUCCESS))
            }
            Err(e) => fail(e),
        },
        KvOp::Set {
            value, durability, ..
        } => match c.set_durable(key.as_bytes(), value.as_bytes(), 0, (*durability).into()) {
            Ok(r) => {
                outln!("{}", set_ok(r.partition, r.seqno, r.cas))?;
                Ok(Some(ExitCode::SUCCESS))
            }
            Err(e) => fail(e),
        },
        KvOp::Del { durability, .. } => {
            match c.delete_durable(key.as_bytes(), (*durability).into()) {
                Ok(r) => {
                    outln!("OK partition={} seqno={}", r.partition, r.seqno)?;
                    Ok(Some(ExitCode::SUCCESS))
                }
                Err(e) => fail(e),
            }
        }
    }
}
