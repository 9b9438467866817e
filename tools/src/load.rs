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
    /// Number of writes (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Number of the first key (keys are `key-<start>` .. `key-<start+count-1>`;
    /// the last must not pass 18446744073709551615).
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Value size in bytes (at most the largest value, 20 MiB; a larger
    /// one is refused before anything is written).
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Writer threads (1 to 1024; no more than --count are started).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_THREADS))]
    threads: u64,
    /// Wait for memory (default) or for the disk on every write (`load`
    /// embeds the engine, so `replicate`, which needs a node, is refused).
    /// A write refused for memory (`temp_oom`: the flusher is behind) is
    /// retried until it is taken; the summary counts those retries.
    #[arg(long, value_enum, default_value_t)]
    durability: DurabilityArg,
    /// Print `key-<i> <partition> <seqno>` on stdout as each write is
    /// acknowledged (if stdout fails, a closed pipe say, the run stops with
    /// an error, closing the directory cleanly).
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

/// Most writer threads `load` starts (each holds a latency histogram of
/// about 0.26 MiB and a stack).
const MAX_THREADS: u64 = 1024;

/// The next write's number from the shared counter `work`, or `None` once
/// all `count` are taken (or a failed thread set it to `count`). The counter
/// never passes `count`: a `fetch_add` per look went past it, and with a
/// `--count` of `u64::MAX` wrapped to 0 after a failure, so threads that
/// should have stopped wrote the first keys again.
fn take_work(work: &AtomicU64, count: u64) -> Option<u64> {
    work.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        (n < count).then_some(n + 1)
    })
    .ok()
}

/// Why `load` with a given `--start` and `--count` cannot run: the last
/// key number, `start + count - 1`, must fit in a u64 (it used to wrap and
/// overwrite `key-0`...).
fn check_range(start: u64, count: u64) -> Result<(), String> {
    match count.checked_sub(1) {
        None => Err("--count must be at least 1".into()),
        Some(last) if start.checked_add(last).is_none() => Err(format!(
            "--start {start} with --count {count} runs past the last key number \
             {}: give at most --count {}",
            u64::MAX,
            u64::MAX - start + 1
        )),
        Some(_) => Ok(()),
    }
}

pub(crate) fn run(args: LoadArgs) -> Result<ExitCode, Error> {
    if matches!(args.durability, DurabilityArg::Replicate) {
        return Ok(crate::usage_error(
            "--durability replicate needs a node with replicas; `load` writes to a data \
             directory in this process (use memory or persist)",
        ));
    }
    if let Err(msg) = check_range(args.start, args.count) {
        return Ok(crate::usage_error(&msg));
    }
    let thread_count = args.threads.clamp(1, args.count.max(1));
    crate::check_data_dir(&args.data.data)?;
    // Refused before any value is built, and before the directory is
    // opened (or made), as `kv set` refuses: each thread holds one value (a
    // size past memory aborted the process; 512 MiB took 1 GB before the
    // first write refused it).
    let builder = Engine::builder(&args.data.data);
    let max = builder.config().max_value_size;
    if args.value_size > max {
        return Err(Error::ValueTooLarge {
            len: args.value_size,
            max,
        });
    }
    let engine = builder.open()?;
    let engine = Arc::new(engine);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let opts = WriteOptions::durable(args.durability.into());
    let started = Instant::now();
    // No bar (rather than an error) if its thread cannot start.
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| {
            let done = Arc::clone(&done);
            let total = args.count;
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let handle = std::thread::Builder::new()
                .name("tapkv-load-progress".into())
                .spawn(move || {
                    while stop_rx.recv_timeout(Duration::from_millis(200)).is_err() {
                        let d = done.load(Ordering::Relaxed);
                        let pct = d.saturating_mul(100).checked_div(total).unwrap_or(100);
                        let bar: String = (0..40)
                            .map(|i| if i * 100 / 40 < pct { '#' } else { '.' })
                            .collect();
                        let _ = write!(std::io::stderr().lock(), "\r[{bar}] {d}/{total} ({pct}%)");
                    }
                    errln!();
                });
            handle.ok().map(|h| (stop_tx, h))
        })
        .flatten();
    let mut threads = Vec::new();
    let mut spawn_err = None;
    for n in 0..thread_count {
        let engine = Arc::clone(&engine);
        let work = Arc::clone(&next);
        let done = Arc::clone(&done);
        let (count, size, print, start) =
            (args.count, args.value_size, args.print_acked, args.start);
        let spawned = std::thread::Builder::new()
            .name(format!("tapkv-load-{n}"))
            .spawn(move || -> Result<(Histogram<u64>, u64), Error> {
                // Fixed size (about 0.26 MiB) whatever --count is.
                let mut lat = latency_histogram()?;
                let mut oom_retries = 0u64;
                loop {
                    let Some(n) = take_work(&work, count) else {
                        return Ok((lat, oom_retries));
                    };
                    // A thread that fails stops the others at their next
                    // write (the run is reported failed either way).
                    let stop_all = || work.store(count, Ordering::Relaxed);
                    // No overflow: start + count - 1 fits (check_range).
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
                            Err(e) => {
                                stop_all();
                                return Err(e);
                            }
                            Ok(r) => break r,
                        }
                    };
                    lat.saturating_record(t.elapsed().as_nanos() as u64);
                    done.fetch_add(1, Ordering::Relaxed);
                    if print {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "{key} {} {}", r.partition, r.seqno)
                            .and_then(|()| out.flush())
                            .map_err(|e| {
                                // Not `BrokenPipe`, which `main` takes for
                                // a reader that has seen enough: the writes
                                // asked for were not all made.
                                stop_all();
                                Error::Io(std::io::Error::other(format!(
                                    "writing acknowledged keys to standard output \
                                     (--print-acked): {e}"
                                )))
                            })?;
                    }
                }
            });
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                // The started threads find no work left and end.
                next.store(args.count, Ordering::Relaxed);
                spawn_err = Some(Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot start {thread_count} load threads: {e}"),
                )));
                break;
            }
        }
    }
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
    if let Some(e) = spawn_err.or(first_err) {
        // Closed cleanly all the same: what was acknowledged is kept.
        let done = done.load(Ordering::Relaxed);
        if let Ok(engine) = Arc::try_unwrap(engine) {
            engine.close()?;
        }
        return Err(match e {
            Error::Io(io) => Error::Io(std::io::Error::new(
                io.kind(),
                format!("{io}; stopped after {done} of {} writes", args.count),
            )),
            other => other,
        });
    }
    let ops = all.len() as f64;
    let us = |n: u64| n as f64 / 1000.0;
    errln!(
        "wrote {} items of {} bytes with {} thread(s), durability {}, in {:.3} s: {:.0} ops/s",
        all.len(),
        args.value_size,
        thread_count,
        args.durability.name(),
        elapsed.as_secs_f64(),
        ops / elapsed.as_secs_f64().max(1e-9)
    );
    errln!(
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

#[cfg(test)]
mod work_tests {
    use super::take_work;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn the_work_counter_stops_at_the_count_and_never_wraps() {
        let work = AtomicU64::new(0);
        assert_eq!(take_work(&work, 2), Some(0));
        assert_eq!(take_work(&work, 2), Some(1));
        assert_eq!(take_work(&work, 2), None);
        assert_eq!(take_work(&work, 2), None);
        // A failed thread stops the others by setting the counter to the
        // count; with the largest count every later look must still stop.
        let work = AtomicU64::new(u64::MAX);
        for _ in 0..3 {
            assert_eq!(take_work(&work, u64::MAX), None);
        }
    }
}
