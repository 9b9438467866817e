//! `tapkv kv get|set|del`: one key operation on a data directory.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tapkv_engine::{Engine, Error, WriteOptions};

use crate::{DataArg, DurabilityArg};

#[derive(Args, Debug)]
pub(crate) struct KvArgs {
    #[command(subcommand)]
    op: KvOp,
}

#[derive(Subcommand, Debug)]
enum KvOp {
    /// Print the value of KEY; exits 1 with a message on stderr if absent.
    Get {
        #[command(flatten)]
        data: DataArg,
        /// The key.
        key: String,
    },
    /// Store VALUE under KEY.
    Set {
        #[command(flatten)]
        data: DataArg,
        /// The key (at most 250 bytes by default).
        key: String,
        /// The value.
        value: String,
        /// Wait for memory (default) or for the disk.
        #[arg(long, value_enum, default_value_t)]
        durability: DurabilityArg,
    },
    /// Delete KEY; exits 1 if absent.
    Del {
        #[command(flatten)]
        data: DataArg,
        /// The key.
        key: String,
        /// Wait for memory (default) or for the disk.
        #[arg(long, value_enum, default_value_t)]
        durability: DurabilityArg,
    },
}

pub(crate) fn run(args: KvArgs) -> Result<ExitCode, Error> {
    match args.op {
        KvOp::Get { data, key } => {
            let engine = Engine::builder(&data.data).open()?;
            match engine.get(key.as_bytes()) {
                Ok(item) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&item.value)?;
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
            data,
            key,
            value,
            durability,
        } => {
            let engine = Engine::builder(&data.data).open()?;
            let r = engine.set(
                key.as_bytes(),
                value.into_bytes(),
                WriteOptions::durable(durability.into()),
            )?;
            println!(
                "OK partition={} seqno={} cas={}",
                r.partition, r.seqno, r.cas
            );
            engine.close()?;
            Ok(ExitCode::SUCCESS)
        }
        KvOp::Del {
            data,
            key,
            durability,
        } => {
            let engine = Engine::builder(&data.data).open()?;
            match engine.delete(key.as_bytes(), WriteOptions::durable(durability.into())) {
                Ok(r) => {
                    println!("OK partition={} seqno={}", r.partition, r.seqno);
                    engine.close()?;
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
