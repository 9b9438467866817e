//! `tapkv load`: a load generator on an embedded engine.
//!
//! Key `i` is `key-<i>`; its value is `"<i>:"` repeated and cut to
//! `--value-size` bytes, so a checker can recompute it from the key. With
//! `--print-acked`, each acknowledged write prints `key-<i> <partition>
//! <seqno>` on stdout, flushed at once (crash tests read it).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use tapkv_engine::{Engine, Error, WriteOptions};

use crate::{DataArg, DurabilityArg};

#[derive(Args, Debug)]
pub(crate) struct LoadArgs {
    #[command(flatten)]
    data: DataArg,
    /// Number of writes.
    #[arg(long)]
    count: u64,
    /// Number of the first key (keys are `key-<start>` .. `key-<start+count-1>`).
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Writer threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Wait for memory (default) or for the disk on every write (`load`
    /// embeds the engine, so `replicate`, which needs a node, is refused).
    #[arg(long, value_enum, default_value_t)]
    durability: DurabilityArg,
    /// Print `key-<i> <partition> <seqno>` on stdout as each write is acknowledged.
    #[arg(long)]
    print_acked: bool,
}

/// The value the load generator writes for key number `i`.
pub(crate) fn value_for(i: u64, size: usize) -> Vec<u8> {
    let unit = format!("{i}:");
    unit.bytes().cycle().take(size).collect()
}

/// Write latencies in nanoseconds, 1 ns to one hour (longer ones count as
/// an hour), to three significant digits.
fn latency_histogram() -> Result<Histogram<u64>, Error> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| Error::InvalidArgument(format!("latency histogram: {e}")))
}

pub(crate) fn run(args: LoadArgs) -> Result<ExitCode, Error> {
    if matches!(args.durability, DurabilityArg::Replicate) {
        return Err(Error::InvalidArgument(
            "--durability replicate needs a node with replicas; `load` writes to a data \
             directory in this process (use memory or persist)"
                .into(),
        ));
    }
    let engine = Arc::new(Engine::builder(&args.data.data).open()?);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let opts = WriteOptions::durable(args.durability.into());
    let started = Instant::now();
    let progress = std::io::stderr().is_terminal().then(|| {
        let done = Arc::clone(&done);
        let total = args.count;
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            while stop_rx.recv_timeout(Duration::from_millis(200)).is_err() {
                let d = done.load(Ordering::Relaxed);
                let pct = (d * 100).checked_div(total).unwrap_or(100);
                let bar: String = (0..40)
                    .map(|i| if i * 100 / 40 < pct { '#' } else { '.' })
                    .collect();
                eprint!("\r[{bar}] {d}/{total} ({pct}%)");
            }
            eprintln!();
        });
        (stop_tx, handle)
    });
    let threads: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let engine = Arc::clone(&engine);
            let next = Arc::clone(&next);
            let done = Arc::clone(&done);
            let (count, size, print, start) =
                (args.count, args.value_size, args.print_acked, args.start);
            std::thread::spawn(move || -> Result<(Histogram<u64>, u64), Error> {
                // Fixed size (about 0.5 MiB) whatever --count is.
                let mut lat = latency_histogram()?;
                let mut oom_retries = 0u64;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        return Ok((lat, oom_retries));
                    }
                    let i = start + n;
                    let key = format!("key-{i}");
                    let value = value_for(i, size);
                    let t = Instant::now();
                    let r = loop {
                        match engine.set(key.as_bytes(), value.clone(), opts) {
                            Err(Error::TempOutOfMemory { .. }) => {
                                oom_retries += 1;
                                std::thread::yield_now();
                            }
                            other => break other?,
                        }
                    };
                    lat.saturating_record(t.elapsed().as_nanos() as u64);
                    done.fetch_add(1, Ordering::Relaxed);
                    if print {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "{key} {} {}", r.partition, r.seqno)?;
                        out.flush()?;
                    }
                }
            })
        })
        .collect();
    let mut all = latency_histogram()?;
    let mut retries = 0;
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok((lat, r))) => {
                all.add(&lat)
                    .map_err(|e| Error::InvalidArgument(format!("latency histogram: {e}")))?;
                retries += r;
            }
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => {
                first_err = first_err.or(Some(Error::Poisoned("a load thread panicked".into())))
            }
        }
    }
    let elapsed = started.elapsed();
    if let Some((stop, handle)) = progress {
        let _ = stop.send(());
        let _ = handle.join();
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let ops = all.len() as f64;
    let us = |n: u64| n as f64 / 1000.0;
    eprintln!(
        "wrote {} items of {} bytes with {} thread(s), durability {:?}, in {:.3} s: {:.0} ops/s",
        all.len(),
        args.value_size,
        args.threads.max(1),
        args.durability,
        elapsed.as_secs_f64(),
        ops / elapsed.as_secs_f64().max(1e-9)
    );
    eprintln!(
        "latency us: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}   (temp-oom retries: {retries})",
        us(all.value_at_quantile(0.50)),
        us(all.value_at_quantile(0.90)),
        us(all.value_at_quantile(0.99)),
        us(all.value_at_quantile(0.999)),
        us(all.max()),
    );
    let engine = Arc::try_unwrap(engine)
        .map_err(|_| Error::InvalidArgument("engine still shared at exit".into()))?;
    engine.close()?;
    Ok(ExitCode::SUCCESS)
}
