//! Side-by-side benchmarks: tapkv against RocksDB used directly, in one run.
//!
//! `cargo run --release -p tapkv-benches -- engine [--ops N] [--reps R]` prints a table of
//! ops/s and ratios; `docs/performance.md` records the figures and targets.
//! Each figure is measured in the same process, on the same machine, with the
//! same keys (16–24 bytes) and values (100 bytes).

mod network;
mod pinned;
mod prefault;
mod replication;
mod revert;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{Options, WriteBatch, WriteOptions as RocksWriteOptions, DB};
use tapkv_engine::{Durability, Engine, WriteOptions};

/// mimalloc: much cheaper than glibc malloc for the many small buffers
/// (keys, values, checkpoint entries) an engine allocates; see docs/architecture.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VALUE_SIZE: usize = 100;

fn key(i: u64) -> Vec<u8> {
    // 16..=24 bytes: "bench:" + zero-padded number of 10..18 digits.
    let digits = 10 + (i % 9) as usize;
    format!("bench:{i:0digits$}").into_bytes()
}

fn value(i: u64) -> Vec<u8> {
    let mut v = vec![b'v'; VALUE_SIZE];
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

/// A shuffled order so gets do not walk keys in insertion order.
fn shuffled(n: u64) -> Vec<u64> {
    let mut order: Vec<u64> = (0..n).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

fn rocks(dir: &std::path::Path) -> DB {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_max_background_jobs(2);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    DB::open(&o, dir).expect("open rocksdb")
}

/// A node configuration listening on an ephemeral loopback port, with the
/// stream settings optionally overridden for experiments:
/// `TAPKV_STREAM_LINGER_US` (`NodeConfig::stream_linger`) and
/// `TAPKV_ACK_BYTES` (`NodeConfig::ack_bytes`).
pub(crate) fn node_config() -> tapkv_replication::node::NodeConfig {
    let mut cfg = tapkv_replication::node::NodeConfig::new("127.0.0.1:0");
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(us) = env("TAPKV_STREAM_LINGER_US") {
        cfg.stream_linger = Duration::from_micros(us);
    }
    if let Some(b) = env("TAPKV_ACK_BYTES") {
        cfg.ack_bytes = b.max(1);
    }
    cfg
}

/// The element of `items` whose `key` is the median (the upper one of an
/// even count); `items` must not be empty.
pub(crate) fn median_by<T: Clone>(items: &[T], key: impl Fn(&T) -> f64) -> T {
    let mut sorted = items.to_vec();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[sorted.len() / 2].clone()
}

/// The median duration of a non-empty set of repetitions.
pub(crate) fn median(v: &[Duration]) -> Duration {
    median_by(v, Duration::as_secs_f64)
}

fn rate(ops: u64, d: Duration) -> f64 {
    ops as f64 / d.as_secs_f64().max(1e-9)
}

struct Row {
    name: String,
    tapkv: f64,
    other_name: String,
    other: f64,
    target: Option<f64>,
}

fn print_rows(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "| {:<44} | {:>12} | {:<34} | {:>12} | {:>7} | {:>8} |",
        "benchmark", "tapkv ops/s", "compared with", "ops/s", "ratio", "target"
    );
    println!(
        "|{:-<46}|{:-<14}|{:-<36}|{:-<14}|{:-<9}|{:-<10}|",
        "", "", "", "", "", ""
    );
    for r in rows {
        let ratio = r.tapkv / r.other.max(1e-9);
        let target = r.target.map_or("-".to_string(), |t| {
            format!("{}{t}x", if ratio >= t { "ok " } else { "NO " })
        });
        println!(
            "| {:<44} | {:>12.0} | {:<34} | {:>12.0} | {:>6.2}x | {:>8} |",
            r.name, r.tapkv, r.other_name, r.other, ratio, target
        );
    }
}

fn persist_run(engine: &Arc<Engine>, threads: u64, per: u64, base: u64) -> f64 {
    let t = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|th| {
            let e = Arc::clone(engine);
            std::thread::spawn(move || {
                for i in 0..per {
                    let k = base + th * per + i;
                    e.set(
                        &key(k),
                        value(k),
                        WriteOptions::durable(Durability::Persist),
                    )
                    .expect("persist write");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("persist thread");
    }
    rate(threads * per, t.elapsed())
}

fn rocks_sync_run(db: &Arc<DB>, threads: u64, per: u64, base: u64) -> f64 {
    let t = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|th| {
            let db = Arc::clone(db);
            std::thread::spawn(move || {
                let mut wo = RocksWriteOptions::default();
                wo.set_sync(true);
                for i in 0..per {
                    let k = base + th * per + i;
                    db.put_opt(key(k), value(k), &wo).expect("rocksdb sync put");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("rocksdb thread");
    }
    rate(threads * per, t.elapsed())
}

/// Keys and values of the memory-path comparisons, made once.
struct Inputs {
    keys: Vec<Vec<u8>>,
    vals: Vec<Vec<u8>>,
}

/// Figures of one repetition of the memory-path comparisons (ops/s).
#[derive(Clone, Copy, Default)]
struct Round {
    tapkv_set: f64,
    /// The same sets, timed until the flusher has persisted them all (the
    /// set row's clock stops at the last acknowledgement, with the last
    /// round still in memory; RocksDB's puts are in its WAL by then).
    tapkv_set_persisted: f64,
    tapkv_get: f64,
    rocks_put_wal: f64,
    /// Gets on the put's database after its memtable is flushed: default
    /// table options (a 32 MiB block cache, no Bloom filter).
    rocks_get_default: f64,
    /// Gets on a database tuned for reading the whole set from memory: a
    /// block cache larger than the data, 10-bit Bloom filters, compacted.
    rocks_get_tuned: f64,
    rocks_put_nowal: f64,
    drain: f64,
    raw_batch: f64,
}

/// RocksDB tuned for reads of a working set that fits in memory, as a
/// user serving reads from it would set it up: a 512 MiB block cache (the
/// 1M-item set is about 120 MB) and 10-bit Bloom filters.
fn rocks_for_reads(dir: &std::path::Path) -> DB {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_max_background_jobs(2);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let mut t = rocksdb::BlockBasedOptions::default();
    t.set_block_cache(&rocksdb::Cache::new_lru_cache(512 << 20));
    t.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&t);
    DB::open(&o, dir).expect("open rocksdb")
}

/// tapkv's side of one repetition: set, get, flusher drain.
fn tapkv_round(dir: &std::path::Path, input: &Inputs, order: &[u64], r: &mut Round) {
    let ops = input.keys.len() as u64;
    let (key, value) = (
        |i: u64| &input.keys[i as usize][..],
        |i: u64| &input.vals[i as usize][..],
    );
    // tapkv set (Memory durability), flusher running as usual.
    let engine = Engine::builder(dir.join("tapkv"))
        .open()
        .expect("open tapkv");
    prefault::prefault(ops, 1);
    let t = Instant::now();
    for i in 0..ops {
        engine
            .set(key(i), value(i), WriteOptions::default())
            .expect("set");
    }
    r.tapkv_set = rate(ops, t.elapsed());
    engine.flush().expect("flush");
    r.tapkv_set_persisted = rate(ops, t.elapsed());
    let t = Instant::now();
    for &i in order {
        let item = engine.get(key(i)).expect("get");
        std::hint::black_box(item);
    }
    r.tapkv_get = rate(ops, t.elapsed());
    engine.close().expect("close");

    r.drain = tapkv_drain(dir, input, &mut String::new());
}

/// The flusher drain: queue every input item with the flusher stalled, then
/// time until every partition's persisted seqno reaches its high seqno (the
/// rounds unsynced, as nobody waits), plus one sync, as the raw side.
fn tapkv_drain(dir: &std::path::Path, input: &Inputs, cpu: &mut String) -> f64 {
    let ops = input.keys.len() as u64;
    let engine = Engine::builder(dir.join("tapkv-drain"))
        .checkpoint_memory_limit(4 << 30)
        .open()
        .expect("open tapkv");
    engine.set_flusher_paused(true);
    for (k, v) in input.keys.iter().zip(&input.vals) {
        engine.set(k, &v[..], WriteOptions::default()).expect("set");
    }
    let highs: Vec<(u16, u64)> = (0..engine.num_partitions())
        .map(|p| (p, engine.high_seqno(p).expect("high seqno")))
        .collect();
    prefault::prefault(ops, 1);
    let cpu_before = pinned::thread_cpu_ms();
    let t = Instant::now();
    engine.set_flusher_paused(false);
    // Polled every millisecond (at most 0.25% of a 1M-item drain's time):
    // polling every 200 µs took 1,500 wake-ups and 30-60 ms of CPU a run
    // from the two threads doing the work on this 2-core machine.
    for &(p, high) in &highs {
        while engine.persisted_seqno(p).expect("persisted seqno") < high {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    engine.flush().expect("sync");
    let r = rate(ops, t.elapsed());
    *cpu = pinned::cpu_delta(&cpu_before, &pinned::thread_cpu_ms());
    engine.close().expect("close");
    r
}

/// RocksDB's side of one repetition: put (WAL on and off), get (default
/// and read-tuned), WriteBatches of the drain's items.
fn rocks_round(dir: &std::path::Path, input: &Inputs, order: &[u64], r: &mut Round) {
    let ops = input.keys.len() as u64;
    let (key, value) = (
        |i: u64| &input.keys[i as usize][..],
        |i: u64| &input.vals[i as usize][..],
    );
    let db = rocks(&dir.join("rocks-wal"));
    // Options made once, as tapkv's loops allocate nothing per call
    // (`put` and `get_pinned` make and free a C++ options object each).
    let (wal, ro) = (
        RocksWriteOptions::default(),
        rocksdb::ReadOptions::default(),
    );
    prefault::prefault(ops, 1);
    let t = Instant::now();
    for i in 0..ops {
        db.put_opt(key(i), value(i), &wal).expect("put");
    }
    r.rocks_put_wal = rate(ops, t.elapsed());
    // Its memtable on disk first, as tapkv's gets follow its flush.
    db.flush().expect("flush");
    let t = Instant::now();
    for &i in order {
        std::hint::black_box(db.get_pinned_opt(key(i), &ro).expect("get"));
    }
    r.rocks_get_default = rate(ops, t.elapsed());
    drop(db);

    let db = rocks(&dir.join("rocks-nowal"));
    let mut wo = RocksWriteOptions::default();
    wo.disable_wal(true);
    prefault::prefault(ops, 1);
    let t = Instant::now();
    for i in 0..ops {
        db.put_opt(key(i), value(i), &wo).expect("put");
    }
    r.rocks_put_nowal = rate(ops, t.elapsed());
    drop(db);

    // Read-tuned: loaded (untimed), flushed, compacted into one sorted run
    // and read once before timing, so the block cache holds the set.
    let db = rocks_for_reads(&dir.join("rocks-reads"));
    for i in 0..ops {
        db.put_opt(key(i), value(i), &wo).expect("put");
    }
    db.flush().expect("flush");
    db.compact_range::<&[u8], &[u8]>(None, None);
    for i in 0..ops {
        std::hint::black_box(db.get_pinned_opt(key(i), &ro).expect("get"));
    }
    let t = Instant::now();
    for &i in order {
        std::hint::black_box(db.get_pinned_opt(key(i), &ro).expect("get"));
    }
    r.rocks_get_tuned = rate(ops, t.elapsed());
    drop(db);

    r.raw_batch = rocks_batches(dir, input, &mut String::new());
}

/// WriteBatches of 512 KiB of keys and values (about 4,300 items), as the
/// flusher cuts its writes (its `WRITE_CHUNK_BYTES`, which counts its
/// records' headers too), each sorted by key first as the flusher sorts
/// its rounds (RocksDB's memtable inserts sorted keys faster), the sort
/// inside the clock as the flusher's is, and sized up front as the
/// flusher's are; one sync at the end. (Until the twenty-third session,
/// 10,000-item batches grown by doubling: not tuned as the flusher is.)
fn rocks_batches(dir: &std::path::Path, input: &Inputs, cpu: &mut String) -> f64 {
    const BATCH_BYTES: usize = 512 << 10;
    let ops = input.keys.len() as u64;
    let (key, value) = (
        |i: u64| &input.keys[i as usize][..],
        |i: u64| &input.vals[i as usize][..],
    );
    let db = rocks(&dir.join("rocks-batch"));
    prefault::prefault(ops, 1);
    let cpu_before = pinned::thread_cpu_ms();
    let t = Instant::now();
    let mut i = 0;
    let mut idx: Vec<u64> = Vec::with_capacity(8_192);
    while i < ops {
        idx.clear();
        let mut bytes = 0;
        while i < ops && bytes < BATCH_BYTES {
            bytes += key(i).len() + value(i).len();
            idx.push(i);
            i += 1;
        }
        idx.sort_unstable_by(|&a, &b| key(a).cmp(key(b)));
        let mut b = WriteBatch::with_capacity_bytes(64 + bytes + 8 * idx.len());
        for &k in &idx {
            b.put(key(k), value(k));
        }
        db.write(b).expect("write batch");
    }
    db.flush_wal(true).expect("sync");
    let r = rate(ops, t.elapsed());
    *cpu = pinned::cpu_delta(&cpu_before, &pinned::thread_cpu_ms());
    drop(db);
    r
}

/// One repetition of the memory-path comparisons, in a fresh directory;
/// odd repetitions run RocksDB's side first, so neither side always runs
/// on the fresher machine. Keys and values are generated before the
/// clocks start (`Inputs`), so each side's figure is its own work, not
/// the harness's formatting.
fn memory_round(dir: &std::path::Path, input: &Inputs, order: &[u64], rep: usize) -> Round {
    let mut r = Round::default();
    if rep % 2 == 0 {
        tapkv_round(dir, input, order, &mut r);
        rocks_round(dir, input, order, &mut r);
    } else {
        rocks_round(dir, input, order, &mut r);
        tapkv_round(dir, input, order, &mut r);
    }
    r
}

fn engine_bench(ops: u64, reps: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let order = shuffled(ops);
    println!(
        "engine benchmark: {ops} ops, keys 16-24 bytes, values {VALUE_SIZE} bytes; \
         memory-path figures: the median of {reps} runs, inputs made before timing"
    );
    let input = Inputs {
        keys: (0..ops).map(key).collect(),
        vals: (0..ops).map(value).collect(),
    };
    let mut runs: Vec<Round> = Vec::new();
    for rep in 0..reps {
        let dir = tmp.path().join(format!("rep{rep}"));
        let r = memory_round(&dir, &input, &order, rep);
        println!(
            "  run {}: set {:.0}/s vs put(WAL) {:.0}/s = {:.2}x; get {:.2}x (default RocksDB {:.2}x); \
             drain {:.0}/s vs batch {:.0}/s = {:.2}x",
            rep + 1,
            r.tapkv_set,
            r.rocks_put_wal,
            r.tapkv_set / r.rocks_put_wal,
            r.tapkv_get / r.rocks_get_tuned,
            r.tapkv_get / r.rocks_get_default,
            r.drain,
            r.raw_batch,
            r.drain / r.raw_batch
        );
        runs.push(r);
        let _ = std::fs::remove_dir_all(&dir);
    }
    // Each comparison is reported from the run whose ratio is the median
    // one, so both figures of a row come from the same run.
    let pick = |a: fn(&Round) -> f64, b: fn(&Round) -> f64| -> (f64, f64) {
        let mut idx: Vec<usize> = (0..runs.len()).collect();
        idx.sort_by(|&x, &y| (a(&runs[x]) / b(&runs[x])).total_cmp(&(a(&runs[y]) / b(&runs[y]))));
        let r = &runs[idx[idx.len() / 2]];
        (a(r), b(r))
    };
    let (set_vs_wal, rocks_put_wal) = pick(|r| r.tapkv_set, |r| r.rocks_put_wal);
    let (set_persisted, rocks_put_wal_p) = pick(|r| r.tapkv_set_persisted, |r| r.rocks_put_wal);
    let (set_vs_nowal, rocks_put_nowal) = pick(|r| r.tapkv_set, |r| r.rocks_put_nowal);
    let (tapkv_get, rocks_get) = pick(|r| r.tapkv_get, |r| r.rocks_get_tuned);
    let (tapkv_get_d, rocks_get_d) = pick(|r| r.tapkv_get, |r| r.rocks_get_default);
    let (drain, raw_batch) = pick(|r| r.drain, |r| r.raw_batch);

    // Persist durability: 1 thread and 32 threads, against RocksDB sync
    // puts; `reps` rounds, alternating which side goes first, reported
    // from the round whose 32-to-1-thread ratio is the median one (a
    // single sample's verdict flipped from run to run).
    let engine = Arc::new(
        Engine::builder(tmp.path().join("tapkv-persist"))
            .open()
            .expect("open tapkv"),
    );
    let db = Arc::new(rocks(&tmp.path().join("rocks-sync")));
    let per1 = (ops / 500).max(200);
    let mut persist_rounds: Vec<[f64; 4]> = Vec::new();
    for rep in 0..reps as u64 {
        let base = rep * 20_000_000;
        let tapkv_side = || {
            let p1 = persist_run(&engine, 1, per1, base);
            (p1, persist_run(&engine, 32, per1 / 4, base + 10_000_000))
        };
        let rocks_side = || {
            let r1 = rocks_sync_run(&db, 1, per1, base);
            (r1, rocks_sync_run(&db, 32, per1 / 4, base + 10_000_000))
        };
        let ((p1, p32), (r1, r32)) = if rep % 2 == 0 {
            let t = tapkv_side();
            (t, rocks_side())
        } else {
            let r = rocks_side();
            (tapkv_side(), r)
        };
        println!(
            "  persist run {}: tapkv 1 thread {p1:.0}/s, 32 threads {p32:.0}/s ({:.2}x); \
             RocksDB sync put 1 thread {r1:.0}/s, 32 threads {r32:.0}/s",
            rep + 1,
            p32 / p1
        );
        persist_rounds.push([p1, p32, r1, r32]);
    }
    drop(engine);
    let [p1, p32, r1, r32] = median_by(&persist_rounds, |r| r[1] / r[0]);

    print_rows(
        "engine (issue 2): single thread unless stated",
        &[
            Row {
                name: "set, Memory durability".into(),
                tapkv: set_vs_wal,
                other_name: "RocksDB put, WAL on, no sync".into(),
                other: rocks_put_wal,
                target: Some(5.0),
            },
            Row {
                name: "set, Memory, until all persisted".into(),
                tapkv: set_persisted,
                other_name: "RocksDB put, WAL on, no sync".into(),
                other: rocks_put_wal_p,
                target: None,
            },
            Row {
                name: "set, Memory durability".into(),
                tapkv: set_vs_nowal,
                other_name: "RocksDB put, WAL off".into(),
                other: rocks_put_nowal,
                target: None,
            },
            Row {
                name: "get, resident items (random order)".into(),
                tapkv: tapkv_get,
                other_name: "RocksDB get, 512 MiB cache + Bloom, compacted".into(),
                other: rocks_get,
                target: Some(5.0),
            },
            Row {
                name: "get, resident items (random order)".into(),
                tapkv: tapkv_get_d,
                other_name: "RocksDB get, default table options".into(),
                other: rocks_get_d,
                target: None,
            },
            Row {
                name: "flusher drain (to disk, one sync)".into(),
                tapkv: drain,
                other_name: "RocksDB WriteBatch 512 KiB sorted, one sync".into(),
                other: raw_batch,
                target: Some(0.8),
            },
            Row {
                name: "set, Persist, 1 thread".into(),
                tapkv: p1,
                other_name: "RocksDB put sync, 1 thread".into(),
                other: r1,
                target: None,
            },
            Row {
                name: "set, Persist, 32 threads".into(),
                tapkv: p32,
                other_name: "RocksDB put sync, 32 threads".into(),
                other: r32,
                target: None,
            },
            Row {
                name: "set, Persist, 32 threads".into(),
                tapkv: p32,
                other_name: "tapkv Persist, 1 thread".into(),
                other: p1,
                target: Some(10.0),
            },
            Row {
                name: "set, Persist, 32 threads".into(),
                tapkv: p32,
                other_name: "RocksDB put sync, 1 thread".into(),
                other: r1,
                target: None,
            },
        ],
    );
}

fn persist_only(ops: u64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut b = Engine::builder(tmp.path().join("tapkv-persist"));
    // For A/B runs of the group commit: its gathering wait, in µs.
    if let Some(us) = std::env::var("TAPKV_GROUP_COMMIT_WAIT_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        b = b.group_commit_wait(Duration::from_micros(us));
    }
    let engine = Arc::new(b.open().expect("open tapkv"));
    let per1 = (ops / 500).max(200);
    for round in 0..3 {
        let base = round * 20_000_000;
        let syncs = || engine.stats().map_or(0, |s| s.syncs);
        let s0 = syncs();
        let p1 = persist_run(&engine, 1, per1, base);
        let s1 = syncs();
        let p32 = persist_run(&engine, 32, per1 / 4, base + 10_000_000);
        let s2 = syncs();
        println!(
            "persist: 1 thread {p1:.0}/s ({:.1} writes/sync), 32 threads {p32:.0}/s \
             ({:.1} writes/sync), ratio {:.2}x",
            per1 as f64 / (s1 - s0).max(1) as f64,
            (per1 / 4 * 32) as f64 / (s2 - s1).max(1) as f64,
            p32 / p1
        );
    }
}

/// Only the drain comparison, `reps` times alternating which side goes
/// first (for A/B runs of flusher changes).
fn drain_only(ops: u64, reps: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = Inputs {
        keys: (0..ops).map(key).collect(),
        vals: (0..ops).map(value).collect(),
    };
    let mut ratios = Vec::new();
    for rep in 0..reps {
        let dir = tmp.path().join(format!("rep{rep}"));
        let (mut dc, mut bc) = (String::new(), String::new());
        let (d, b) = if rep % 2 == 0 {
            let d = tapkv_drain(&dir, &input, &mut dc);
            (d, rocks_batches(&dir, &input, &mut bc))
        } else {
            let b = rocks_batches(&dir, &input, &mut bc);
            (tapkv_drain(&dir, &input, &mut dc), b)
        };
        println!(
            "  run {}: drain {d:.0}/s vs batch {b:.0}/s = {:.2}x\n    CPU drain {dc}\n    CPU batch {bc}",
            rep + 1,
            d / b
        );
        ratios.push(d / b);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("median drain ratio {:.2}x", median_by(&ratios, |r| *r));
}

fn set_only(ops: u64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let engine = Engine::builder(tmp.path().join("tapkv"))
        .checkpoint_memory_limit(4 << 30)
        .open()
        .expect("open tapkv");
    if std::env::var_os("PAUSE").is_some() {
        engine.set_flusher_paused(true);
    }
    let pre = std::env::var_os("PRE").is_some();
    let keys: Vec<Vec<u8>> = if pre {
        (0..ops).map(key).collect()
    } else {
        Vec::new()
    };
    let vals: Vec<Vec<u8>> = if pre {
        (0..ops).map(value).collect()
    } else {
        Vec::new()
    };
    // `PERF_CTL=FIFO`: enable a `perf record --control fifo:FIFO -D -1`
    // only around the timed loop.
    let perf_ctl = |cmd: &str| {
        if let Some(path) = std::env::var_os("PERF_CTL") {
            if let Err(e) = std::fs::write(&path, cmd) {
                eprintln!("PERF_CTL {path:?}: {e}");
            }
        }
    };
    // `GET=1`: time (and profile) shuffled gets of the items instead.
    let gets = std::env::var_os("GET").is_some();
    if !gets {
        perf_ctl("enable\n");
    }
    let t = Instant::now();
    if pre {
        for i in 0..ops as usize {
            engine
                .set(&keys[i], &vals[i], WriteOptions::default())
                .expect("set");
        }
    } else {
        for i in 0..ops {
            engine
                .set(&key(i), value(i), WriteOptions::default())
                .expect("set");
        }
    }
    let elapsed = t.elapsed();
    perf_ctl("disable\n");
    println!("tapkv set: {:.0} ops/s", rate(ops, elapsed));
    if gets {
        engine.set_flusher_paused(false);
        engine.flush().expect("flush");
        let order = shuffled(ops);
        let keys: Vec<Vec<u8>> = if pre {
            keys
        } else {
            (0..ops).map(key).collect()
        };
        perf_ctl("enable\n");
        let t = Instant::now();
        for &i in &order {
            std::hint::black_box(engine.get(&keys[i as usize]).expect("get"));
        }
        let elapsed = t.elapsed();
        perf_ctl("disable\n");
        println!("tapkv get: {:.0} ops/s", rate(ops, elapsed));
    }
    engine.close().expect("close");
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TAPKV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map_or("all", String::as_str);
    let ops = args
        .iter()
        .position(|a| a == "--ops")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000u64);
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    match what {
        "engine" => engine_bench(ops, reps),
        "revert" => revert::bench(),
        "replication" => replication::bench(),
        // Only the backfill comparison, for profilers.
        "backfill" => replication::backfill_only(),
        // The replica throughput and catch-up runs alone.
        "replica" => replication::replica_only(),
        "sender" => replication::sender_only(ops.min(500_000)),
        // A replica's receive path (read and decode) alone.
        "receiver" => replication::receiver_only(ops.min(2_000_000), reps),
        // A replica's decode and apply against a single node's set, on the
        // engine alone.
        "apply" => replication::apply_only(ops.min(2_000_000), reps),
        // A replica joining by disk snapshots, held in memory vs spilled.
        "snapshot" => replication::snapshot_join(),
        // Replication with each node a process pinned to its own core.
        "pinned" => pinned::bench(),
        // The pinned run's child processes.
        "pinned-single" => pinned::single_child(),
        // Touches and frees memory before a timed phase (`prefault`).
        "prefault-child" => prefault::child(args.get(1).map_or("0", String::as_str)),
        "pinned-primary" => pinned::primary_child(),
        "pinned-replica" => pinned::replica_child(args.get(1).map_or("", String::as_str)),
        // A tapkv node against Debian's memcached over loopback.
        "network" => network::bench(),
        "network-node" => network::node_child(),
        // Only the Persist group-commit comparison, three times.
        "persist" => persist_only(ops),
        // Only tapkv's Memory-durability set loop, for profilers.
        "set" => set_only(ops),
        // Only the flusher drain against raw sorted WriteBatches.
        "drain" => drain_only(ops, reps),
        "all" => {
            engine_bench(ops, reps);
            revert::bench();
            replication::bench();
            replication::snapshot_join();
            pinned::bench();
            network::bench();
        }
        "--help" | "-h" | "help" => {
            println!("usage: tapkv-benches [engine|revert|replication|pinned|network|all|set|drain|persist|backfill|replica|sender|receiver|apply|snapshot] [--ops N] [--reps R]   (default all; --ops sizes the engine bench, set, sender (at most 500000) receiver and apply (at most 2000000), default 1000000; --reps repeats the engine bench's memory-path runs, default 3, medians reported)");
        }
        other => {
            eprintln!("unknown benchmark {other:?}; try `help`");
            std::process::exit(2);
        }
    }
}
