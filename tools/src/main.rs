//! `tapkv`: the command-line tool — a key-value client and shell on a data
//! directory, a load generator, admin inspection, and the guided demo.
#![deny(unsafe_code)]

mod admin;
mod demo;
mod kv;
mod load;
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
/// process on that data directory (created if missing). A directory can be
/// open in one process at a time; `admin` commands read it without the lock.
#[derive(Parser, Debug)]
#[command(name = "tapkv", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read, write or delete one key.
    Kv(kv::KvArgs),
    /// Generate write load (keys `key-<i>`) and report throughput and latency.
    Load(load::LoadArgs),
    /// Line-oriented command shell on stdin/stdout (see docs/shell.md).
    Shell(shell::ShellArgs),
    /// Inspect a data directory offline.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// A guided tour: writes, checkpoints, cursors, flusher, restart.
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
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Self {
        match d {
            DurabilityArg::Memory => Durability::Memory,
            DurabilityArg::Persist => Durability::Persist,
        }
    }
}

/// The `--data` option shared by commands that open an engine.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct DataArg {
    /// Data directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(crate) data: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TAPKV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Kv(a) => kv::run(a),
        Command::Load(a) => load::run(a),
        Command::Shell(a) => shell::run(a),
        Command::Admin(a) => admin::run(a),
        Command::Demo(a) => demo::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
