//! Replica throughput with each node on its own core, as if on its own
//! machine: the fair form of issue 4's goal on a small machine.
//!
//! In the in-process benchmark (`replication.rs`) the primary's writer,
//! flusher and stream thread and the replica's apply thread and flusher all
//! share the machine's cores, while the single-node figure has them to
//! itself. Here every node is a process of this binary pinned with
//! `taskset` to one core:
//!
//! 1. a single node on core 0, then on core 1: N writes into a plain
//!    engine (writer, flusher and RocksDB's threads share that core);
//! 2. a primary node on one core (the writer writes straight into its
//!    engine) and a replica node on the other; the replica is timed from
//!    the primary's first write until it holds every seqno the primary
//!    wrote. The pair swaps cores every round.
//!
//! Each node is compared with the single node on its own core: on this
//! virtual machine the two cores are not equal (the disk's interrupts are
//! all delivered to core 1, and a plain engine writes about 30% slower
//! there), so a single node on core 0 against a replica on core 1 would
//! measure the cores, not the replica.
//!
//! Goal: replica rate >= 0.8x the single-node rate. Needs at least 2 cores
//! and `taskset` (util-linux); otherwise the run says so and is skipped.
//! Timestamps cross processes as wall-clock nanoseconds (same machine).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use tapkv_replication::node::Node;

use super::replication::{high_seqnos, open_engine, set, Inputs};
use super::{print_rows, Row};

/// Items each timed run writes by default (`TAPKV_PINNED_ITEMS` overrides).
const DEFAULT_ITEMS: u64 = 500_000;

/// Items each timed run writes; children inherit the environment.
fn items() -> u64 {
    std::env::var("TAPKV_PINNED_ITEMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ITEMS)
}
/// Rounds of the comparison; the pair's cores alternate between rounds.
const ROUNDS: usize = 5;
/// Longest wait for the replica to catch up.
const DEADLINE: Duration = Duration::from_secs(120);

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

/// Per thread name (summed over threads of the same name): CPU time in ms
/// and the number of times it was scheduled in, from
/// `/proc/self/task/*/schedstat`.
pub(crate) type ThreadCpu = std::collections::BTreeMap<String, (f64, f64)>;

pub(crate) fn thread_cpu_ms() -> ThreadCpu {
    let mut out = ThreadCpu::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let (Ok(comm), Ok(sched)) = (
            std::fs::read_to_string(t.path().join("comm")),
            std::fs::read_to_string(t.path().join("schedstat")),
        ) else {
            continue;
        };
        // "cpu-time-ns runqueue-wait-ns timeslices"
        let f: Vec<f64> = sched
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if let [cpu_ns, _, slices, ..] = f[..] {
            let e = out.entry(comm.trim().to_owned()).or_insert((0.0, 0.0));
            e.0 += cpu_ns / 1e6;
            e.1 += slices;
        }
    }
    out
}

/// CPU milliseconds of all the process's threads between two readings.
fn cpu_total_ms(before: &ThreadCpu, after: &ThreadCpu) -> f64 {
    let sum = |c: &ThreadCpu| c.values().map(|(ms, _)| ms).sum::<f64>();
    sum(after) - sum(before)
}

/// Each thread's CPU and times scheduled in between two readings.
pub(crate) fn cpu_delta(before: &ThreadCpu, after: &ThreadCpu) -> String {
    after
        .iter()
        .map(|(n, (ms, sl))| {
            let (b_ms, b_sl) = before.get(n).copied().unwrap_or((0.0, 0.0));
            (n, ms - b_ms, sl - b_sl)
        })
        .filter(|(_, ms, _)| *ms >= 1.0)
        .map(|(n, ms, sl)| format!("{n}={ms:.0}ms/{sl:.0}x"))
        .collect::<Vec<_>>()
        .join(",")
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

fn commands() -> impl Iterator<Item = String> {
    std::io::stdin().lock().lines().map_while(Result::ok)
}

/// Child: a plain engine on this process's core; prints `rate A D MS CPU`:
/// items/s until every write was acknowledged, and until all were on disk,
/// the process's CPU milliseconds until all were on disk, and the threads'
/// CPU until acknowledged.
pub(crate) fn single_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open_engine(dir.path(), false);
    let input = Inputs::new(items());
    let start_cpu = thread_cpu_ms();
    let cpu = start_cpu.clone();
    let t = Instant::now();
    for i in 0..items() {
        input.set(&engine, i);
    }
    let acked = t.elapsed();
    let during = cpu_delta(&cpu, &thread_cpu_ms());
    // What the flusher still had to do once the timed writes were
    // acknowledged: until every partition's persisted seqno reaches its high
    // seqno, polled every millisecond as the replica's is (no sync on either
    // side).
    let cpu = thread_cpu_ms();
    let highs = high_seqnos(&engine);
    let mut pending: Vec<(u16, u64)> = (0..).zip(highs).collect();
    while !pending.is_empty() {
        pending.retain(|(p, s)| engine.persisted_seqno(*p).expect("persisted") < *s);
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let durable = t.elapsed();
    eprintln!(
        "  single node: persisting what was left after the timed writes took {:.0} ms: {}",
        (durable - acked).as_secs_f64() * 1e3,
        cpu_delta(&cpu, &thread_cpu_ms())
    );
    let rate = |d: Duration| items() as f64 / d.as_secs_f64();
    let total = cpu_total_ms(&start_cpu, &thread_cpu_ms());
    say(&format!(
        "rate {} {} {total} {during}",
        rate(acked),
        rate(durable)
    ));
    engine.close().expect("close");
}

/// Child: a primary node. Prints `addr A`; on `warm` writes one item and
/// prints `seqnos ...`; on `go` writes the run and prints
/// `done T0 T1 seqnos...`; ends on `stop` or end of input.
pub(crate) fn primary_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = super::node_config();
    cfg.name = "pinned-primary".into();
    let node = Node::start(open_engine(dir.path(), false), cfg).expect("start primary");
    say(&format!("addr {}", node.local_addr()));
    let engine = node.engine().expect("primary engine");
    for cmd in commands() {
        match cmd.as_str() {
            "warm" => {
                set(engine, u64::MAX / 2);
                say(&format!("seqnos {}", join(&high_seqnos(engine))));
            }
            "go" => {
                let input = Inputs::new(items());
                let cpu = thread_cpu_ms();
                let t0 = now_nanos();
                for i in 0..items() {
                    input.set(engine, i);
                }
                let t1 = now_nanos();
                eprintln!(
                    "  primary CPU during the writes: {}",
                    cpu_delta(&cpu, &thread_cpu_ms())
                );
                say(&format!("done {t0} {t1} {}", join(&high_seqnos(engine))));
            }
            _ => break,
        }
    }
    node.shutdown().expect("primary shutdown");
}

/// Child: a replica of `primary`. Prints `ready`; on `mark` notes its threads' CPU
/// and prints `marked`; on `wait S...` polls its engine every millisecond
/// until it holds those seqnos, on `durable S...` until it has persisted
/// them, and prints `caught T` (or `timeout`); ends on `stop` or end of
/// input.
pub(crate) fn replica_child(primary: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = super::node_config();
    cfg.name = "pinned-replica".into();
    cfg.replica_of = Some(primary.to_owned());
    let node = Node::start(open_engine(dir.path(), true), cfg).expect("start replica");
    let engine = node.engine().expect("replica engine");
    say("ready");
    let mut cpu = thread_cpu_ms();
    for cmd in commands() {
        if cmd == "mark" {
            cpu = thread_cpu_ms();
            say("marked");
            continue;
        }
        let (rest, durable) = if let Some(rest) = cmd.strip_prefix("wait ") {
            (rest, false)
        } else if let Some(rest) = cmd.strip_prefix("durable ") {
            (rest, true)
        } else {
            break;
        };
        let want: Vec<u64> = rest.split(' ').filter_map(|s| s.parse().ok()).collect();
        let t = Instant::now();
        // Partitions already caught up are not asked again: the poll stays
        // cheap next to the apply thread it shares the core with.
        let mut pending: Vec<(u16, u64)> = (0..).zip(want.iter().copied()).collect();
        loop {
            pending.retain(|(p, s)| {
                let have = if durable {
                    engine.persisted_seqno(*p)
                } else {
                    engine.high_seqno(*p)
                };
                have.expect("seqno") < *s
            });
            if pending.is_empty() || t.elapsed() >= DEADLINE {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if pending.is_empty() {
            let caught = now_nanos();
            if !durable && want.len() > 1 && want.iter().sum::<u64>() > 1000 {
                eprintln!(
                    "  replica CPU from the first write until caught up: {}",
                    cpu_delta(&cpu, &thread_cpu_ms())
                );
            }
            // With the process's CPU since `mark`.
            say(&format!(
                "caught {caught} {}",
                cpu_total_ms(&cpu, &thread_cpu_ms())
            ));
        } else {
            say("timeout");
        }
    }
    node.shutdown().expect("replica shutdown");
}

/// A child process of this binary pinned to `cpu`, talked to by lines.
struct Pinned {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Pinned {
    fn spawn(cpu: usize, args: &[&str]) -> Pinned {
        let exe = std::env::current_exe().expect("current exe");
        let mut child = Command::new("taskset")
            .arg("-c")
            .arg(cpu.to_string())
            .arg(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pinned child");
        let input = child.stdin.take().expect("child stdin");
        let output = BufReader::new(child.stdout.take().expect("child stdout"));
        Pinned {
            child,
            input,
            output,
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.input, "{line}").expect("write to child");
        self.input.flush().expect("write to child");
    }

    /// The next line, which must start with `tag`; the words after it.
    fn expect(&mut self, tag: &str) -> Vec<String> {
        let mut line = String::new();
        self.output.read_line(&mut line).expect("read from child");
        let mut words = line.split_whitespace().map(str::to_owned);
        let first = words.next().unwrap_or_default();
        assert_eq!(first, tag, "child said {line:?}");
        words.collect()
    }

    fn finish(mut self) {
        let _ = writeln!(self.input, "stop");
        drop(self.input);
        let t = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if t.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

fn nanos(words: &[String], i: usize) -> u128 {
    words
        .get(i)
        .and_then(|w| w.parse().ok())
        .expect("timestamp")
}

/// Items/s of one round.
#[derive(Clone, Copy)]
struct RoundRates {
    /// The cores the primary and the replica ran on.
    primary_core: usize,
    replica_core: usize,
    /// Single node on the replica's core, until every write was acknowledged.
    single: f64,
    /// Single node on the replica's core, until every write was on its disk.
    single_durable: f64,
    /// Single node on the primary's core, until every write was acknowledged.
    single_on_primary_core: f64,
    /// Primary with a replica attached, until every write was acknowledged.
    primary: f64,
    /// Replica, from the primary's first write until it held every item.
    replica: f64,
    /// Replica, from the primary's first write until it had persisted every item.
    replica_durable: f64,
    /// Items per CPU-second of the single node on the replica's core, first
    /// write to all on disk (every thread of the process counted).
    single_per_cpu: f64,
    /// Items per CPU-second of the replica, the primary's first write to all
    /// on the replica's disk.
    replica_per_cpu: f64,
}

/// What a single node did: items/s until acknowledged and until on disk,
/// and items per CPU-second until on disk.
#[derive(Clone, Copy)]
struct Single {
    acked: f64,
    durable: f64,
    per_cpu: f64,
}

/// A single node on `core`.
fn single_on(core: usize) -> Single {
    super::prefault::prefault(items(), 1);
    let mut single = Pinned::spawn(core, &["pinned-single"]);
    let said = single.expect("rate");
    let number = |i: usize| -> f64 { said[i].parse().expect("number") };
    let (acked, durable, cpu_ms) = (number(0), number(1), number(2));
    if let Some(cpu) = said.get(3) {
        println!("  single node on core {core}, CPU during the writes: {cpu}");
    }
    single.finish();
    Single {
        acked,
        durable,
        per_cpu: items() as f64 / (cpu_ms / 1e3).max(1e-9),
    }
}

/// One round: a single node on each core, then the pair with the primary
/// on `primary_core` and the replica on the other core.
fn pinned_round(primary_core: usize) -> RoundRates {
    let replica_core = 1 - primary_core;
    let singles = [single_on(0), single_on(1)];

    let mut primary = Pinned::spawn(primary_core, &["pinned-primary"]);
    let addr = primary.expect("addr")[0].clone();
    let mut replica = Pinned::spawn(replica_core, &["pinned-replica", &addr]);
    replica.expect("ready");
    // The replica connects and holds the warm-up item before the clock starts.
    primary.send("warm");
    let warm = primary.expect("seqnos").join(" ");
    replica.send(&format!("wait {warm}"));
    replica.expect("caught");
    replica.send("mark");
    replica.expect("marked");
    // Both nodes take fresh memory from here on (see `prefault`).
    super::prefault::prefault(items(), 2);
    primary.send("go");
    let done = primary.expect("done");
    let (t0, t1) = (nanos(&done, 0), nanos(&done, 1));
    replica.send(&format!("wait {}", done[2..].join(" ")));
    let caught = replica.expect("caught");
    let t2 = nanos(&caught, 0);
    replica.send(&format!("durable {}", done[2..].join(" ")));
    let durable = replica.expect("caught");
    let t3 = nanos(&durable, 0);
    let replica_cpu_ms: f64 = durable[1].parse().expect("cpu");
    replica.finish();
    primary.finish();

    let secs = |a: u128, b: u128| (b.saturating_sub(a) as f64 / 1e9).max(1e-9);
    let r = RoundRates {
        primary_core,
        replica_core,
        single: singles[replica_core].acked,
        single_durable: singles[replica_core].durable,
        single_on_primary_core: singles[primary_core].acked,
        primary: items() as f64 / secs(t0, t1),
        replica: items() as f64 / secs(t0, t2),
        replica_durable: items() as f64 / secs(t0, t3),
        single_per_cpu: singles[replica_core].per_cpu,
        replica_per_cpu: items() as f64 / (replica_cpu_ms / 1e3).max(1e-9),
    };
    println!(
        "  single node {:.0}/s on core 0, {:.0}/s on core 1; primary {:.0}/s on core {} ({:.2}x); \
         replica {:.0}/s on core {} ({:.2}x), caught up {:.1} ms after the last write",
        singles[0].acked,
        singles[1].acked,
        r.primary,
        r.primary_core,
        r.primary / r.single_on_primary_core,
        r.replica,
        r.replica_core,
        r.replica / r.single,
        secs(t1, t2) * 1e3
    );
    println!(
        "  until on disk: single node {:.0}/s on core 0, {:.0}/s on core 1; replica {:.0}/s ({:.2}x); \
         items per CPU-second: single node {:.0}, replica {:.0} ({:.2}x)",
        singles[0].durable,
        singles[1].durable,
        r.replica_durable,
        r.replica_durable / r.single_durable,
        r.single_per_cpu,
        r.replica_per_cpu,
        r.replica_per_cpu / r.single_per_cpu
    );
    r
}

/// The orchestrating run; prints its table.
pub fn bench() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let taskset = Command::new("taskset")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if cores < 2 || !taskset {
        println!("\npinned replication: skipped (needs 2 cores and taskset; have {cores} cores)");
        return;
    }
    println!(
        "\npinned replication: each node a process on its own core (taskset), {} items",
        items()
    );
    // Five rounds, the pair's cores swapped every round; each row shows
    // the round with its median ratio (every round's figures are printed).
    let rounds: Vec<RoundRates> = (0..ROUNDS).map(|i| pinned_round(i % 2)).collect();
    let median = |ratio: fn(&RoundRates) -> f64| super::median_by(&rounds, ratio);
    let applied = median(|r| r.replica / r.single);
    let durable = median(|r| r.replica_durable / r.single_durable);
    let primary = median(|r| r.primary / r.single_on_primary_core);
    let per_cpu = median(|r| r.replica_per_cpu / r.single_per_cpu);
    print_rows(
        "replication with a core per node (items/s)",
        &[
            Row {
                name: "replica apply, own core (first write -> caught up)".into(),
                tapkv: applied.replica,
                other_name: "single node, same core, same items (acked)".into(),
                other: applied.single,
                target: Some(0.8),
            },
            Row {
                name: "replica, first write -> all on its disk".into(),
                tapkv: durable.replica_durable,
                other_name: "single node, same core, first write -> all on disk".into(),
                other: durable.single_durable,
                target: Some(0.8),
            },
            Row {
                name: "replica, items per CPU-second (first write -> on disk)".into(),
                tapkv: per_cpu.replica_per_cpu,
                other_name: "single node, items per CPU-second, same span".into(),
                other: per_cpu.single_per_cpu,
                target: None,
            },
            Row {
                name: "primary node set, one core".into(),
                tapkv: primary.primary,
                other_name: "single node, same core, same items (acked)".into(),
                other: primary.single_on_primary_core,
                target: None,
            },
        ],
    );
}
