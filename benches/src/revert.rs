//! Online-update REVERT cost, side by side with RocksDB transaction rollback.
//!
//! `tapkv-benches revert` prints two tables:
//!
//! 1. REVERT of a window of W distinct keys (half updates of existing keys,
//!    half creates of new keys) in one partition holding 1x and 10x W items,
//!    persisted before START. Only the `online_update_revert` call is timed;
//!    `RevertReport::duration` is printed next to it. Goals: per-key cost on
//!    the 10x dataset within 1.5x of the 1x dataset; 1M keys under 1 s.
//! 2. "Apply N updates, then roll them all back": a tapkv window (START,
//!    N sets, REVERT) against a RocksDB `OptimisticTransactionDB` transaction
//!    (N puts, rollback), on a dataset of N existing items.
//!
//! Every repetition runs on a freshly loaded engine, so each one reverts a
//! window over fully resident, persisted items.

use std::path::Path;
use std::time::{Duration, Instant};

use rocksdb::{OptimisticTransactionDB, Options};
use tapkv_engine::{Engine, Error, PartitionId, RevertReport, WriteOptions};

use super::{key, median, print_rows, rate, value, Row, VALUE_SIZE};

/// Windows (distinct keys) of part 1.
const WINDOWS: [u64; 4] = [1_000, 10_000, 100_000, 1_000_000];
/// Dataset sizes of part 1, as multiples of the window.
const MULTIPLES: [u64; 2] = [1, 10];
/// Largest dataset part 1 loads; bigger cells are skipped (time budget).
const MAX_DATASET: u64 = 10_000_000;
/// Updates of part 2.
const ROLLBACK_SIZES: [u64; 2] = [10_000, 100_000];

fn open_engine(path: &Path) -> Engine {
    Engine::builder(path)
        .partitions(1)
        .checkpoint_memory_limit(8 << 30)
        .online_update_memory_limit(8 << 30)
        .memory_quota(16 << 30)
        .open()
        .expect("open tapkv")
}

/// Sets keys `0..n` and waits until they are persisted.
fn load(engine: &Engine, n: u64) {
    for i in 0..n {
        engine
            .set(&key(i), value(i), WriteOptions::default())
            .expect("load set");
    }
    engine.flush().expect("flush dataset");
}

/// A value for key `i` that differs from the loaded one.
fn new_value(i: u64) -> Vec<u8> {
    let mut v = value(i);
    v[8..].fill(b'w');
    v
}

fn ns_per(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n.max(1) as f64
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1e6 {
        format!("{:.3} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.0} us")
    }
}

fn reps_for(window: u64) -> usize {
    match window {
        0..=10_000 => 5,
        10_001..=100_000 => 3,
        _ => 1,
    }
}

struct Cell {
    window: u64,
    items: u64,
    reps: usize,
    wall: Duration,
    reported: Duration,
    removed: usize,
    restored: usize,
}

/// One repetition of part 1: fresh engine, `items` persisted, a window of
/// `window` keys, timed REVERT.
fn revert_once(dir: &Path, window: u64, items: u64) -> (Duration, RevertReport) {
    let engine = open_engine(dir);
    load(&engine, items);
    let p: PartitionId = engine.partition_of(&key(0));
    let updates = window / 2;
    let creates = window - updates;
    let step = (items / updates.max(1)).max(1);
    engine.online_update_start(p).expect("online update start");
    for j in 0..updates {
        let k = j * step;
        engine
            .set(&key(k), new_value(k), WriteOptions::default())
            .expect("window update");
    }
    for j in 0..creates {
        let k = items + j;
        engine
            .set(&key(k), new_value(k), WriteOptions::default())
            .expect("window create");
    }
    let t = Instant::now();
    let report = engine
        .online_update_revert(p)
        .expect("online update revert");
    let wall = t.elapsed();
    // Spot checks, outside the timing: updates are undone, creates are gone.
    let got = engine.get(&key(0)).expect("get reverted key");
    assert_eq!(got.value(), &value(0)[..], "update not reverted");
    assert!(
        matches!(engine.get(&key(items)), Err(Error::NotFound)),
        "created key still present after revert"
    );
    assert_eq!(
        (report.restored as u64, report.removed as u64),
        (updates, creates),
        "revert report does not match the window"
    );
    engine.close().expect("close");
    (wall, report)
}

/// `TAPKV_REVERT_CELLS=100000x10,1000x1` limits part 1 to those cells
/// (window x multiple), for profilers; `TAPKV_REVERT_MAX_DATASET=N` sets
/// the largest dataset loaded (default 10,000,000; about 4.5 GiB).
fn wanted(window: u64, mult: u64) -> bool {
    std::env::var("TAPKV_REVERT_CELLS").map_or(true, |v| {
        v.split(',').any(|c| c.trim() == format!("{window}x{mult}"))
    })
}

fn revert_cells() -> Vec<Cell> {
    let mut cells = Vec::new();
    let max_dataset = std::env::var("TAPKV_REVERT_MAX_DATASET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_DATASET);
    for &window in &WINDOWS {
        for &mult in &MULTIPLES {
            let items = window * mult;
            if !wanted(window, mult) {
                continue;
            }
            if items > max_dataset {
                println!(
                    "  skipped: window {window} on {items} items ({mult}x): a {items}-item \
                     dataset is out of this benchmark's ~3 min budget on a 2-core machine"
                );
                continue;
            }
            let reps = reps_for(window);
            let tmp = tempfile::tempdir().expect("tempdir");
            let mut walls = Vec::with_capacity(reps);
            let mut reports = Vec::with_capacity(reps);
            for r in 0..reps {
                let (wall, report) = revert_once(&tmp.path().join(format!("r{r}")), window, items);
                walls.push(wall);
                reports.push(report);
            }
            // The report of the median repetition.
            let mut idx: Vec<usize> = (0..reps).collect();
            idx.sort_by_key(|&i| walls[i]);
            let mid = idx[reps / 2];
            cells.push(Cell {
                window,
                items,
                reps,
                wall: median(&walls),
                reported: reports[mid].duration,
                removed: reports[mid].removed,
                restored: reports[mid].restored,
            });
            let c = cells.last().expect("cell just pushed");
            println!(
                "  window {:>9} on {:>9} items: revert {} ({:.0} ns/key)",
                c.window,
                c.items,
                fmt_dur(c.wall),
                ns_per(c.wall, c.window)
            );
        }
    }
    cells
}

fn print_cells(cells: &[Cell], fixed: Duration) {
    println!("\nonline-update REVERT: one partition, window = half updates + half creates, dataset persisted before START");
    println!(
        "| {:>10} | {:>10} | {:>4} | {:>11} | {:>15} | {:>9} | {:>15} | {:>8} | {:>8} |",
        "window",
        "items",
        "reps",
        "revert wall",
        "report.duration",
        "ns/key",
        "report ns/key",
        "removed",
        "restored"
    );
    println!(
        "|{:-<12}|{:-<12}|{:-<6}|{:-<13}|{:-<17}|{:-<11}|{:-<17}|{:-<10}|{:-<10}|",
        "", "", "", "", "", "", "", "", ""
    );
    for c in cells {
        println!(
            "| {:>10} | {:>10} | {:>4} | {:>11} | {:>15} | {:>9.0} | {:>15.0} | {:>8} | {:>8} |",
            c.window,
            c.items,
            c.reps,
            fmt_dur(c.wall),
            fmt_dur(c.reported),
            ns_per(c.wall, c.window),
            ns_per(c.reported, c.window),
            c.removed,
            c.restored
        );
    }

    println!(
        "\nREVERT per-key cost less the fixed cost ({}), 10x dataset against 1x dataset (goal: within 1.5x)",
        fmt_dur(fixed)
    );
    println!(
        "| {:>10} | {:>12} | {:>13} | {:>7} | {:>8} |",
        "window", "ns/key 1x", "ns/key 10x", "ratio", "goal"
    );
    println!(
        "|{:-<12}|{:-<14}|{:-<15}|{:-<9}|{:-<10}|",
        "", "", "", "", ""
    );
    for &window in &WINDOWS {
        let find = |mult: u64| {
            cells
                .iter()
                .find(|c| c.window == window && c.items == window * mult)
        };
        let (Some(x1), Some(x10)) = (find(1), find(10)) else {
            println!(
                "| {:>10} | {:>12} | {:>13} | {:>7} | {:>8} |",
                window,
                find(1).map_or("-".into(), |c| format!(
                    "{:.0}",
                    ns_per(c.wall.saturating_sub(fixed), window)
                )),
                "skipped",
                "-",
                "-"
            );
            continue;
        };
        // Per key, less the fixed cost every REVERT pays (its synced
        // record write), which would otherwise dominate the small windows.
        let per_key = |c: &Cell| ns_per(c.wall.saturating_sub(fixed), window);
        let (a, b) = (per_key(x1), per_key(x10));
        let ratio = b / a.max(1e-9);
        println!(
            "| {:>10} | {:>12.0} | {:>13.0} | {:>6.2}x | {:>8} |",
            window,
            a,
            b,
            ratio,
            if ratio <= 1.5 { "ok" } else { "NO" }
        );
    }
    if let Some(c) = cells
        .iter()
        .find(|c| c.window == 1_000_000 && c.items == 1_000_000)
    {
        println!(
            "REVERT of 1M keys: {} (goal: under 1 s: {})",
            fmt_dur(c.wall),
            if c.wall < Duration::from_secs(1) {
                "ok"
            } else {
                "NO"
            }
        );
    }
}

/// tapkv: START, `n` updates of existing keys, REVERT; timed as a whole.
fn tapkv_apply_revert(dir: &Path, n: u64) -> Duration {
    let engine = open_engine(dir);
    load(&engine, n);
    let p = engine.partition_of(&key(0));
    let t = Instant::now();
    engine.online_update_start(p).expect("online update start");
    for k in 0..n {
        engine
            .set(&key(k), new_value(k), WriteOptions::default())
            .expect("window update");
    }
    let report = engine
        .online_update_revert(p)
        .expect("online update revert");
    let d = t.elapsed();
    assert_eq!(report.restored as u64, n, "revert report does not match");
    engine.close().expect("close");
    d
}

/// RocksDB: one optimistic transaction, `n` puts of existing keys, rollback;
/// timed as a whole.
fn rocks_apply_rollback(dir: &Path, n: u64) -> Duration {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_max_background_jobs(2);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let db: OptimisticTransactionDB =
        OptimisticTransactionDB::open(&o, dir).expect("open rocksdb optimistic txn db");
    for k in 0..n {
        db.put(key(k), value(k)).expect("load put");
    }
    let t = Instant::now();
    let txn = db.transaction();
    for k in 0..n {
        txn.put(key(k), new_value(k)).expect("txn put");
    }
    txn.rollback().expect("txn rollback");
    drop(txn);
    let d = t.elapsed();
    let got = db.get(key(0)).expect("get").expect("key 0 present");
    assert_eq!(got, value(0), "rollback left a new value");
    d
}

fn rollback_rows() -> Vec<(u64, usize, Duration, Duration)> {
    let mut out = Vec::new();
    for &n in &ROLLBACK_SIZES {
        let reps = reps_for(n);
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut t = Vec::with_capacity(reps);
        let mut r = Vec::with_capacity(reps);
        for i in 0..reps {
            t.push(tapkv_apply_revert(&tmp.path().join(format!("t{i}")), n));
            r.push(rocks_apply_rollback(&tmp.path().join(format!("r{i}")), n));
        }
        let (t, r) = (median(&t), median(&r));
        println!(
            "  N = {n}: tapkv start+sets+revert {}, RocksDB txn puts+rollback {}",
            fmt_dur(t),
            fmt_dur(r)
        );
        out.push((n, reps, t, r));
    }
    out
}

/// Runs both parts and prints their tables.
pub fn bench() {
    let started = Instant::now();
    println!(
        "revert benchmark: one partition, keys 16-24 bytes, values {VALUE_SIZE} bytes, \
         median of the repetitions"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let empty: Vec<Duration> = (0..5)
        .map(|r| revert_once(&tmp.path().join(format!("e{r}")), 0, 1_000).0)
        .collect();
    let fixed = median(&empty);
    drop(tmp);
    println!(
        "  fixed cost: REVERT of an empty window (1000 items): {}",
        fmt_dur(fixed)
    );
    let cells = revert_cells();
    let rollbacks = rollback_rows();
    print_cells(&cells, fixed);
    println!(
        "fixed cost per REVERT (empty window, median of 5; included in every row above): {}",
        fmt_dur(fixed)
    );
    let rows: Vec<Row> = rollbacks
        .iter()
        .map(|&(n, reps, t, r)| Row {
            name: format!("start, {n} updates, revert (x{reps})"),
            tapkv: rate(n, t),
            other_name: format!("OptimisticTxn {n} puts, rollback"),
            other: rate(n, r),
            target: None,
        })
        .collect();
    print_rows(
        "apply N updates, then roll them all back (dataset: N existing items; ops/s = N / whole time)",
        &rows,
    );
    for &(n, _, t, r) in &rollbacks {
        println!(
            "  N = {n}: tapkv {} ({:.0} ns/update), RocksDB {} ({:.0} ns/update)",
            fmt_dur(t),
            ns_per(t, n),
            fmt_dur(r),
            ns_per(r, n)
        );
    }
    println!("revert benchmark took {}", fmt_dur(started.elapsed()));
}
