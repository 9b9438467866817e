//! Crash safety: a child process writes with `Persist` durability from several
//! threads and is killed with SIGKILL at varying moments. After each kill the
//! data directory is reopened: every acknowledged key is there with its value,
//! seqnos continue above everything acknowledged before, and no partition is
//! torn (nothing on disk lies above the partition's persisted high seqno).

use std::collections::HashMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tapkv_engine::{DiskView, Engine, WriteOptions};
use tapkv_tests::{assert_killed_and_not_torn, load_value, Proc};

const VALUE_SIZE: usize = 48;

#[test]
fn persist_writes_survive_sigkill_and_seqnos_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7a9c);
    // Highest seqno seen per partition over all rounds: acknowledged,
    // persisted (on disk after a kill, acknowledged or not) or handed to a
    // probe write.
    let mut highest: HashMap<u16, u64> = HashMap::new();
    // Every write acknowledged in any round (their keys never repeat), each
    // checked again after every later kill.
    let mut acked_all: Vec<String> = Vec::new();
    for round in 0..4u64 {
        let start = (round * 1_000_000).to_string();
        let value_size = VALUE_SIZE.to_string();
        let mut child = Proc::spawn(&[
            "load",
            "--data",
            &data,
            "--count",
            "900000",
            "--start",
            &start,
            "--threads",
            "4",
            "--durability",
            "persist",
            "--value-size",
            &value_size,
            "--print-acked",
        ]);
        let wait_for = rng.gen_range(50..1500);
        let mut acked: Vec<String> = Vec::new();
        while acked.len() < wait_for {
            match child.next_line(Duration::from_secs(60)) {
                Some(l) => acked.push(l),
                None => panic!("load exited early after {} acks", acked.len()),
            }
        }
        child.kill();
        acked.extend(child.drain(Duration::from_secs(10)));

        let view = DiskView::open(dir.path()).unwrap();
        let disk = assert_killed_and_not_torn(&view, &format!("round {round}"));
        drop(view);

        let engine = Engine::builder(dir.path()).open().unwrap();
        assert!(engine.stats().unwrap().recovered_from_crash);
        // Warmup restores at least what the disk held.
        let st = engine.stats().unwrap();
        for d in &disk {
            let ps = &st.partitions[usize::from(d.partition)];
            assert!(
                ps.high_seqno >= d.high_seqno,
                "round {round}: partition {} reopened at seqno {} below its disk's {}",
                d.partition,
                ps.high_seqno,
                d.high_seqno
            );
        }
        acked_all.extend(acked);
        for line in &acked_all {
            let mut f = line.split(' ');
            let key = f.next().unwrap();
            let p: u16 = f.next().unwrap().parse().unwrap();
            let seqno: u64 = f.next().unwrap().parse().unwrap();
            let i: u64 = key.strip_prefix("key-").unwrap().parse().unwrap();
            let item = engine
                .get(key.as_bytes())
                .unwrap_or_else(|e| panic!("round {round}: acknowledged {key} lost: {e}"));
            assert_eq!(item.value(), &load_value(i, VALUE_SIZE)[..], "{key}");
            assert_eq!(item.meta.by_seqno, seqno, "{key}");
            assert_eq!(item.partition, p);
            let h = highest.entry(p).or_default();
            *h = (*h).max(seqno);
        }
        for d in &disk {
            let h = highest.entry(d.partition).or_default();
            *h = (*h).max(d.high_seqno);
        }
        // New writes continue above every seqno seen so far.
        let mut probes = Vec::new();
        for j in 0..200 {
            let r = engine
                .set(
                    format!("probe-{round}-{j}").as_bytes(),
                    "x",
                    WriteOptions::default(),
                )
                .unwrap();
            if let Some(h) = highest.get(&r.partition) {
                assert!(r.seqno > *h, "seqno {} reused (seen up to {h})", r.seqno);
            }
            probes.push((r.partition, r.seqno));
        }
        for (p, seqno) in probes {
            let h = highest.entry(p).or_default();
            *h = (*h).max(seqno);
        }
        engine.close().unwrap();
    }
}
