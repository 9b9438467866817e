//! Multi-process replication tests on loopback: a primary and replicas run as
//! `tapkv node` processes; every wait is bounded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tapkv_tests::{dump, wait_converged, NodeProc};

const CONVERGE: Duration = Duration::from_secs(60);

fn keys_in(c: &tapkv_replication::client::Client, p: u16, n: usize, tag: &str) -> Vec<String> {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .filter(|k| c.partition_of(k.as_bytes()) == p)
        .take(n)
        .collect()
}

/// Waits until `node`'s inspect shows partition `p` at `seqno` or beyond.
fn wait_seqno(node: &NodeProc, p: u16, seqno: u64) {
    let deadline = Instant::now() + CONVERGE;
    let mut c = node.client();
    loop {
        let v = c.admin("inspect").unwrap();
        let high = v["partitions"][usize::from(p)]["high_seqno"]
            .as_u64()
            .unwrap_or(0);
        if high >= seqno {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} stuck at seqno {high} < {seqno}",
            node.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn high_seqno(node: &NodeProc, p: u16) -> u64 {
    node.client().admin("inspect").unwrap()["partitions"][usize::from(p)]["high_seqno"]
        .as_u64()
        .unwrap()
}

/// Waits until the primary serves a stream to each of `names` with every
/// partition in memory (past any backfill).
fn wait_streaming(primary: &NodeProc, names: &[&str]) {
    let deadline = Instant::now() + CONVERGE;
    let mut c = primary.client();
    loop {
        let streams = c.admin("streams").unwrap();
        let ready = names.iter().all(|n| {
            streams.as_array().is_some_and(|ss| {
                ss.iter().any(|st| {
                    st["name"] == *n
                        && st["partitions"].as_array().is_some_and(|ps| {
                            !ps.is_empty() && ps.iter().all(|p| p["state"] == "in-memory")
                        })
                })
            })
        });
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "streams never ready: {streams}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A primary with a small unacknowledged window and a short slow-replica
/// timeout, and one replica named `name`.
fn slow_pair(dir: &std::path::Path, name: &str, partitions: u16) -> (NodeProc, NodeProc) {
    let partitions = partitions.to_string();
    let primary = NodeProc::start(
        &dir.join("primary"),
        "127.0.0.1:0",
        None,
        "primary",
        &[
            "--max-unacked-bytes",
            "65536",
            "--slow-replica-ms",
            "300",
            "--partitions",
            &partitions,
        ],
    );
    let replica = NodeProc::start(
        &dir.join(name),
        "127.0.0.1:0",
        Some(&primary.addr),
        name,
        &[],
    );
    (primary, replica)
}

/// Writes 1,000-byte values under `prefix` until the primary reports every
/// partition of its (only) stream dropped; returns how many were written.
fn write_until_dropped(c: &mut tapkv_replication::client::Client, prefix: &str) -> usize {
    let value = vec![b'x'; 1000];
    let deadline = Instant::now() + CONVERGE;
    let mut i = 0;
    loop {
        for _ in 0..500 {
            c.set(
                format!("{prefix}-{}", i % 20_000).as_bytes(),
                &value,
                0,
                false,
            )
            .unwrap();
            i += 1;
        }
        let streams = c.admin("streams").unwrap();
        let dropped = streams[0]["partitions"]
            .as_array()
            .is_some_and(|ps| ps.iter().all(|p| p["state"] == "dropped"));
        if dropped {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "cursors never dropped: {streams}"
        );
    }
}

/// Asserts what `node` reads for `key`: `Some(value)`, or `None` for not found.
fn assert_reads(node: &NodeProc, key: &str, want: Option<&[u8]>) {
    match (node.client().get(key.as_bytes()), want) {
        (Ok((v, _)), Some(w)) => assert_eq!(&v[..], w, "{}: {key}", node.name),
        (Err(e), None) if e.is_not_found() => {}
        (got, want) => panic!("{}: {key}: got {got:?}, want {want:?}", node.name),
    }
}

/// A primary and `replicas` replicas. `restartable`: the test restarts the
/// primary on its address, so it listens on a port outside the ephemeral
/// range (`restartable_addr`); otherwise on an ephemeral port.
fn cluster(dir: &std::path::Path, replicas: usize, restartable: bool) -> (NodeProc, Vec<NodeProc>) {
    cluster_with(dir, replicas, restartable, &[])
}

/// [`cluster`] with extra arguments for the primary.
fn cluster_with(
    dir: &std::path::Path,
    replicas: usize,
    restartable: bool,
    primary_args: &[&str],
) -> (NodeProc, Vec<NodeProc>) {
    let addr = if restartable {
        tapkv_tests::restartable_addr()
    } else {
        "127.0.0.1:0".to_owned()
    };
    let primary = NodeProc::start(&dir.join("primary"), &addr, None, "primary", primary_args);
    let reps = (0..replicas)
        .map(|i| {
            let name = format!("replica-{i}");
            NodeProc::start(
                &dir.join(&name),
                "127.0.0.1:0",
                Some(&primary.addr),
                &name,
                &[],
            )
        })
        .collect();
    (primary, reps)
}

#[test]
fn replicas_converge_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, reps) = cluster(dir.path(), 2, false);
    // Both replicas stream from memory before the writes start, so the
    // writes are streamed while they happen, not only caught up afterwards.
    wait_streaming(&primary, &["replica-0", "replica-1"]);
    let addr = Arc::new(primary.addr.clone());
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let addr = Arc::clone(&addr);
            std::thread::spawn(move || {
                let mut c =
                    tapkv_replication::client::Client::connect(&addr, Duration::from_secs(30))
                        .unwrap();
                for i in 0..600 {
                    let k = format!("w{t}-{}", i % 150);
                    if i % 7 == 3 {
                        let _ = c.delete(k.as_bytes());
                    } else {
                        c.set(k.as_bytes(), format!("v{t}-{i}").as_bytes(), 0, false)
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    // Writes to a replica are refused, reads work.
    let mut rc = reps[0].client();
    let err = rc.set(b"x", b"y", 0, false).unwrap_err();
    assert!(err.to_string().contains("read-only replica"), "{err}");
    let rows = wait_converged(&primary, &[&reps[0], &reps[1]], CONVERGE);
    assert!(rows.len() >= 500, "{} rows", rows.len());
}

fn window_scenario(complete: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (primary, reps) = cluster(dir.path(), 2, false);
    let mut c = primary.client();
    let p = 5;
    let k = keys_in(&c, p, 30, "win");
    for key in &k[..20] {
        c.set(key.as_bytes(), b"before", 0, false).unwrap();
    }
    let before = wait_converged(&primary, &[&reps[0], &reps[1]], CONVERGE);
    let w = c.update_start(p).unwrap();
    for key in &k[..10] {
        c.set(key.as_bytes(), b"updated", 0, false).unwrap();
    }
    for key in &k[10..15] {
        c.delete(key.as_bytes()).unwrap();
    }
    for key in &k[20..] {
        c.set(key.as_bytes(), b"created", 0, false).unwrap();
    }
    c.delete(k[29].as_bytes()).unwrap(); // created then deleted
                                         // Every replica holds the window before it ends.
    let high = high_seqno(&primary, p);
    for r in &reps {
        wait_seqno(r, p, high);
        let v = r.client().admin("inspect").unwrap();
        assert_eq!(
            v["partitions"][usize::from(p)]["open_window"]["checkpoint_id"],
            w,
            "{}",
            r.name
        );
        assert_eq!(r.client().get(k[0].as_bytes()).unwrap().0, &b"updated"[..]);
    }
    if complete {
        assert_eq!(c.update_complete(p).unwrap(), w);
    } else {
        let (id, removed, restored) = c.update_revert(p).unwrap();
        // 10 created, one of them deleted again: 9 to remove.
        assert_eq!((id, removed, restored), (w, 9, 15));
    }
    let after = wait_converged(&primary, &[&reps[0], &reps[1]], CONVERGE);
    // Every replica follows the primary's branch (`admin inspect`'s
    // `failover_log`, newest entry last).
    let branch = |n: &NodeProc| {
        let v = n.client().admin("inspect").unwrap();
        let log = v["partitions"][usize::from(p)]["failover_log"].clone();
        assert!(
            log.as_array().is_some_and(|l| !l.is_empty()),
            "{}: {v}",
            n.name
        );
        log.as_array().unwrap().last().unwrap()["uuid"].clone()
    };
    for r in &reps {
        assert_eq!(branch(r), branch(&primary), "{}", r.name);
    }
    for r in [&primary, &reps[0], &reps[1]] {
        let mut rc = r.client();
        let v0 = rc.get(k[0].as_bytes()).map(|x| x.0.to_vec()).ok();
        let v12 = rc.get(k[12].as_bytes()).map(|x| x.0.to_vec()).ok();
        let v25 = rc.get(k[25].as_bytes()).map(|x| x.0.to_vec()).ok();
        if complete {
            assert_eq!(v0.as_deref(), Some(&b"updated"[..]), "{}", r.name);
            assert_eq!(v12, None, "{}", r.name);
            assert_eq!(v25.as_deref(), Some(&b"created"[..]), "{}", r.name);
        } else {
            assert_eq!(v0.as_deref(), Some(&b"before"[..]), "{}", r.name);
            assert_eq!(v12.as_deref(), Some(&b"before"[..]), "{}", r.name);
            assert_eq!(v25, None, "{}", r.name);
            let v = r.client().admin("inspect").unwrap();
            assert!(v["partitions"][usize::from(p)]["open_window"].is_null());
        }
    }
    if !complete {
        assert_eq!(
            after, before,
            "after REVERT every node's disk equals the pre-window state"
        );
    }
}

#[test]
fn a_revert_reaches_every_replica() {
    window_scenario(false);
}

#[test]
fn a_complete_reaches_every_replica() {
    window_scenario(true);
}

#[test]
fn a_killed_replica_resumes_without_a_full_resync() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, mut reps) = cluster(dir.path(), 1, false);
    let mut c = primary.client();
    for i in 0..3000 {
        c.set(format!("k{i}").as_bytes(), b"first", 0, false)
            .unwrap();
    }
    wait_converged(&primary, &[&reps[0]], CONVERGE);
    // Kill it mid-stream: once it has applied part of a second round of
    // writes that goes on while it is down.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let addr = primary.addr.clone();
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut c =
                tapkv_replication::client::Client::connect(&addr, Duration::from_secs(30)).unwrap();
            let mut i = 0u64;
            // At least 6,000 writes, and on until the replica is back.
            while i < 6000 || !done.load(std::sync::atomic::Ordering::Acquire) {
                c.set(
                    format!("k{}", i % 3000).as_bytes(),
                    format!("second-{i}").as_bytes(),
                    0,
                    false,
                )
                .unwrap();
                i += 1;
            }
        })
    };
    let p = 0;
    let before = high_seqno(&reps[0], p);
    wait_seqno(&reps[0], p, before + 50);
    reps[0].kill();
    let r = NodeProc::start(
        &dir.path().join("replica-0"),
        "127.0.0.1:0",
        Some(&primary.addr),
        "replica-0",
        &[],
    );
    reps[0] = r;
    done.store(true, std::sync::atomic::Ordering::Release);
    writer.join().unwrap();
    wait_converged(&primary, &[&reps[0]], CONVERGE);
    let streams = primary.client().admin("streams").unwrap();
    let parts = streams[0]["partitions"].as_array().unwrap();
    let resumed: Vec<u64> = parts
        .iter()
        .map(|p| p["resumed_from"].as_u64().unwrap())
        .collect();
    assert_eq!(resumed.len(), 16, "{streams}");
    assert!(
        resumed.iter().all(|s| *s > 0),
        "every partition resumed from its persisted seqno, not 0: {resumed:?}"
    );
    // No session since the restart resynchronised a partition (the one
    // above is only the last).
    assert_no_resets(&reps[0]);
}

/// Every partition of `replica` was never emptied to resynchronise it since
/// its process started.
fn assert_no_resets(replica: &NodeProc) {
    let stats = replica.client().stats().unwrap();
    let parts = stats["partitions"].as_array().unwrap();
    assert!(!parts.is_empty());
    for p in parts {
        assert_eq!(p["resets"].as_u64(), Some(0), "{stats}");
    }
}

#[test]
fn a_replica_joining_mid_window_reverts_only_that_window() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, mut reps) = cluster(dir.path(), 1, false);
    let mut c = primary.client();
    let p = 2;
    let k = keys_in(&c, p, 20, "mid");
    for key in &k[..10] {
        c.set(key.as_bytes(), b"before", 0, false).unwrap();
    }
    wait_converged(&primary, &[&reps[0]], CONVERGE);
    // replica-0 drops out before the window; replica-1 is new.
    reps[0].kill();
    let w = c.update_start(p).unwrap();
    for key in &k {
        c.set(key.as_bytes(), b"window", 0, false).unwrap();
    }
    let late = NodeProc::start(
        &dir.path().join("late"),
        "127.0.0.1:0",
        Some(&primary.addr),
        "late",
        &[],
    );
    let back = NodeProc::start(
        &dir.path().join("replica-0"),
        "127.0.0.1:0",
        Some(&primary.addr),
        "replica-0",
        &[],
    );
    let high = high_seqno(&primary, p);
    // Nothing from START on is persisted while the window is open, so a
    // backfill ends before START and both receive the window from its START
    // marker: they hold window W as their own, and its REVERT is an ordinary
    // one (no partition reset). (A replica that does not hold the window
    // from its START resynchronises instead: engine/tests/replica.rs and
    // `a_replica_holding_a_window_that_ended_while_it_was_away_converges`.)
    for r in [&late, &back] {
        wait_seqno(r, p, high);
        assert_eq!(r.client().get(k[15].as_bytes()).unwrap().0, &b"window"[..]);
        let v = r.client().admin("inspect").unwrap();
        assert_eq!(
            v["partitions"][usize::from(p)]["open_window"]["checkpoint_id"],
            w,
            "{}",
            r.name
        );
    }
    c.set(k[0].as_bytes(), b"window again", 0, false).unwrap();
    let (id, _, _) = c.update_revert(p).unwrap();
    assert_eq!(id, w);
    wait_converged(&primary, &[&late, &back], CONVERGE);
    for r in [&primary, &late, &back] {
        assert_reads(r, &k[0], Some(b"before"));
        assert_reads(r, &k[15], None);
    }
    for r in [&late, &back] {
        let resets = r.client().stats().unwrap()["partitions"][usize::from(p)]["resets"].as_u64();
        assert_eq!(resets, Some(0), "{}: reverted in place, not reset", r.name);
    }
}

#[test]
fn replicas_roll_back_after_the_primary_dies_inside_a_window() {
    primary_stops_inside_a_window(true);
}

#[test]
fn replicas_roll_back_after_the_primary_closes_cleanly_inside_a_window() {
    primary_stops_inside_a_window(false);
}

fn primary_stops_inside_a_window(kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (mut primary, reps) = cluster(dir.path(), 2, true);
    let mut c = primary.client();
    let p = 7;
    let k = keys_in(&c, p, 20, "crash");
    for key in &k[..10] {
        c.set(key.as_bytes(), b"durable", 0, true).unwrap();
    }
    c.update_start(p).unwrap();
    for key in &k {
        c.set(key.as_bytes(), b"lost", 0, false).unwrap();
    }
    let high = high_seqno(&primary, p);
    for r in &reps {
        wait_seqno(r, p, high);
        assert_eq!(r.client().get(k[15].as_bytes()).unwrap().0, &b"lost"[..]);
    }
    let addr = primary.addr.clone();
    drop(c);
    if kill {
        primary.kill();
    } else {
        primary.stop();
    }
    let primary = NodeProc::start(&dir.path().join("primary"), &addr, None, "primary", &[]);
    let rows = wait_converged(&primary, &[&reps[0], &reps[1]], CONVERGE);
    assert!(!rows.is_empty());
    for r in [&primary, &reps[0], &reps[1]] {
        assert_reads(r, &k[0], Some(b"durable"));
        assert_reads(r, &k[15], None);
    }
    // The primary keeps working and replicating after the rollback.
    primary
        .client()
        .set(k[15].as_bytes(), b"new", 0, false)
        .unwrap();
    wait_converged(&primary, &[&reps[0], &reps[1]], CONVERGE);
}

#[test]
fn a_slow_replica_has_its_cursor_dropped_and_is_backfilled_later() {
    let dir = tempfile::tempdir().unwrap();
    // Two partitions: their open checkpoints hold at most 4,000 items, so
    // 30 MB of writes tell pinned checkpoints from freed ones without
    // moving 100 MB through a loaded CI machine.
    let (primary, slow) = slow_pair(dir.path(), "slow", 2);
    let mut c = primary.client();
    c.set(b"hello", b"world", 0, false).unwrap();
    wait_converged(&primary, &[&slow], CONVERGE);
    let sessions = || {
        slow.client().stats().unwrap()["link_sessions"]
            .as_u64()
            .unwrap()
    };
    let sessions_before = sessions();
    slow.proc.stop_all_threads();
    let value = vec![b'x'; 1000];
    write_until_dropped(&mut c, "bulk");
    // With the cursor gone, checkpoints are freed once persisted: while the
    // replica stays stopped, 30 MB more writes of distinct keys (which a
    // cursor still held would pin, all of them, in closed checkpoints) leave
    // checkpoint memory at most about the open checkpoints' worth: 2
    // partitions of at most 2,000 items (the default
    // `checkpoint_max_items`) of about 1 KB, once flushed. (Not sampled
    // during the writes: how far the flusher is behind then depends on the
    // machine's load, not on the cursor. The process's RSS is no measure
    // here either: the hash table keeps every value resident.)
    let mem = |c: &mut tapkv_replication::client::Client| {
        c.stats().unwrap()["checkpoint_mem_bytes"].as_u64().unwrap()
    };
    for i in 0..30_000 {
        c.set(format!("more-{i}").as_bytes(), &value, 0, false)
            .unwrap();
    }
    c.flush().unwrap();
    let after = mem(&mut c);
    assert!(
        after < 8 << 20,
        "checkpoint memory {after} grows with a stopped replica"
    );
    let high: u64 = (0..2).map(|p| high_seqno(&primary, p)).sum();
    slow.signal(libc::SIGCONT);
    wait_converged(&primary, &[&slow], CONVERGE);
    // The replica resumed from where it stopped (not from 0), more than
    // 30,000 items back: more than the primary's checkpoints held, so they
    // came from a backfill. Every session resumes from where the replica
    // is (never 0, a full resync); the distance is judged on the session
    // that caught up, the one after the SIGCONT (a loaded machine's stall
    // can end it, and a later one resumes near the end).
    let new_sessions = sessions() - sessions_before;
    let streams = c.admin("streams").unwrap();
    let parts = streams[0]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{streams}");
    assert!(
        parts.iter().all(|p| p["resumed_from"].as_u64() > Some(0)),
        "a full resync: {streams}"
    );
    assert_no_resets(&slow);
    let resumed: u64 = parts
        .iter()
        .map(|p| p["resumed_from"].as_u64().unwrap())
        .sum();
    if new_sessions == 1 {
        assert!(
            high - resumed > 30_000,
            "resumed at {resumed} of {high}: {streams}"
        );
    } else {
        eprintln!("{new_sessions} sessions since the replica was stopped: distance not judged");
    }
}

#[test]
fn replica_reads_and_primary_dump_agree_with_the_disk_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut primary, mut reps) = cluster(dir.path(), 1, true);
    let mut c = primary.client();
    for i in 0..500 {
        c.set(format!("r{i}").as_bytes(), b"v", 0, false).unwrap();
    }
    let before = wait_converged(&primary, &[&reps[0]], CONVERGE);
    drop(c);
    reps[0].stop();
    let addr = primary.addr.clone();
    primary.stop();
    let primary = NodeProc::start(&dir.path().join("primary"), &addr, None, "primary", &[]);
    let replica = NodeProc::start(
        &dir.path().join("replica-0"),
        "127.0.0.1:0",
        Some(&addr),
        "replica-0",
        &[],
    );
    assert_eq!(dump(&replica), before);
    assert_eq!(wait_converged(&primary, &[&replica], CONVERGE), before);
}

#[test]
fn replicate_durability_waits_for_a_majority_of_replicas() {
    use tapkv_engine::Durability;
    let dir = tempfile::tempdir().unwrap();
    // Three replicas, so that a majority (two) is neither one nor all. The
    // timeout bounds the 25 writes that must succeed as well as the one
    // that must not: generous for a loaded machine, under the client's 30 s
    // reply timeout, and under the silence limit (ten heartbeats: 30 s
    // here) after which the primary ends a stopped replica's stream, and
    // the majority it counts shrinks with it.
    let (primary, reps) = cluster_with(
        dir.path(),
        3,
        false,
        &["--replicate-timeout-ms", "12000", "--heartbeat-ms", "3000"],
    );
    let all: Vec<&NodeProc> = reps.iter().collect();
    let mut c = primary.client();
    // Wait until every stream is connected (one write held by all).
    c.set(b"warmup", b"x", 0, false).unwrap();
    wait_converged(&primary, &all, CONVERGE);
    let holding = |k: &str, nodes: &[&NodeProc]| {
        nodes
            .iter()
            .filter(|r| r.client().get(k.as_bytes()).is_ok())
            .count()
    };
    for i in 0..20 {
        let k = format!("majority-{i}");
        c.set_durable(k.as_bytes(), b"v", 0, Durability::Replicate)
            .unwrap();
        // Acknowledged: at least two of the three already hold it.
        assert!(holding(&k, &all) >= 2, "{k}");
    }
    // One replica stopped (still connected): two of three still make a
    // majority, and both running replicas hold each write when it returns.
    reps[0].proc.stop_all_threads();
    for i in 0..5 {
        let k = format!("two-of-three-{i}");
        c.set_durable(k.as_bytes(), b"v", 0, Durability::Replicate)
            .unwrap();
        assert_eq!(holding(&k, &[&reps[1], &reps[2]]), 2, "{k}");
    }
    // A second one stopped: one of three is no majority. The write times
    // out with a typed error but is not undone.
    reps[1].proc.stop_all_threads();
    let err = c
        .set_durable(b"stalled", b"v", 0, Durability::Replicate)
        .unwrap_err();
    assert!(err.to_string().starts_with("timeout:"), "{err}");
    assert_eq!(c.get(b"stalled").unwrap().0, &b"v"[..]);
    for r in &reps[..2] {
        r.signal(libc::SIGCONT);
    }
    wait_converged(&primary, &all, CONVERGE);
}

#[test]
fn a_replica_holding_a_window_that_ended_while_it_was_away_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, away) = slow_pair(dir.path(), "away", 16);
    let mut c = primary.client();
    let p = 4;
    let k = keys_in(&c, p, 10, "away");
    for key in &k[..5] {
        c.set(key.as_bytes(), b"before", 0, false).unwrap();
    }
    c.update_start(p).unwrap();
    for key in &k {
        c.set(key.as_bytes(), b"window", 0, false).unwrap();
    }
    let high = high_seqno(&primary, p);
    wait_seqno(&away, p, high);
    assert!(
        !away.client().admin("inspect").unwrap()["partitions"][usize::from(p)]["open_window"]
            .is_null()
    );
    // The replica stops reading and its cursors are dropped while it holds
    // the window; only then is the window reverted (so its REVERT is never
    // sent on the old stream), and a second window on the partition is
    // started and completed, all while it is away.
    away.proc.stop_all_threads();
    write_until_dropped(&mut c, "fill");
    c.update_revert(p).unwrap();
    let k2 = keys_in(&c, p, 5, "second");
    c.update_start(p).unwrap();
    for key in &k2 {
        c.set(key.as_bytes(), b"second", 0, false).unwrap();
    }
    c.update_complete(p).unwrap();
    let value = vec![b'x'; 1000];
    for n in 0..30_000 {
        c.set(format!("fill-{}", n % 5000).as_bytes(), &value, 0, false)
            .unwrap();
    }
    away.signal(libc::SIGCONT);
    wait_converged(&primary, &[&away], CONVERGE);
    let mut ac = away.client();
    assert_eq!(ac.get(k[0].as_bytes()).unwrap().0, &b"before"[..]);
    assert!(ac.get(k[7].as_bytes()).unwrap_err().is_not_found());
    assert_eq!(ac.get(k2[0].as_bytes()).unwrap().0, &b"second"[..]);
    assert!(ac.admin("inspect").unwrap()["partitions"][usize::from(p)]["open_window"].is_null());
    // The replica could not revert a window its stream no longer ends: it
    // resynchronised the partition instead of reverting another range.
    let stats = ac.stats().unwrap();
    assert!(
        stats["partitions"][usize::from(p)]["resets"].as_u64() >= Some(1),
        "{}",
        stats["partitions"][usize::from(p)]
    );
}

#[test]
fn a_new_replica_takes_its_primarys_partition_count() {
    // Before, a new replica directory always had 16 partitions: against an
    // 8-partition primary it refused to replicate and served empty reads.
    let dir = tempfile::tempdir().unwrap();
    let primary = NodeProc::start(
        &dir.path().join("primary"),
        "127.0.0.1:0",
        None,
        "primary",
        &["--partitions", "8"],
    );
    let mut c = primary.client();
    for i in 0..200 {
        c.set(format!("p{i}").as_bytes(), b"v", 0, false).unwrap();
    }
    let replica = NodeProc::start(
        &dir.path().join("replica"),
        "127.0.0.1:0",
        Some(&primary.addr),
        "replica",
        &[],
    );
    assert_eq!(replica.client().partitions(), 8);
    wait_converged(&primary, &[&replica], CONVERGE);
}

/// `tapkv admin streams --addr` and `tapkv admin dump --addr` on a primary
/// with a replica: one table row per partition of the stream (state, sent,
/// acked, lag), the JSON forms, and the dump's rows with escaped keys.
#[test]
fn admin_streams_and_dump_over_the_network() {
    use tapkv_tests::run;
    let t = Duration::from_secs(60);
    let dir = tempfile::tempdir().unwrap();
    let (primary, reps) = cluster(dir.path(), 1, false);
    wait_streaming(&primary, &["replica-0"]);
    let mut c = primary.client();
    c.set(b"a", b"1", 0, false).unwrap();
    c.set(b"b c", b"22", 0, false).unwrap();
    c.delete(b"a").unwrap();
    wait_converged(&primary, &[&reps[0]], CONVERGE);
    let pa = usize::from(c.partition_of(b"a"));

    let (ok, out, err) = run(&["admin", "streams", "--addr", &primary.addr], "", t);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("stream replica-0 from 127.0.0.1:"),
        "{out}"
    );
    let rows: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains("partition"))
        .copied()
        .collect();
    assert_eq!(rows.len(), 16, "{out}");
    assert!(
        rows.iter()
            .all(|r| r.contains("in-memory") && r.ends_with(" bytes")),
        "{out}"
    );
    assert!(!out.contains("warning"), "{out}");
    // Widths apply: the partition number is right-aligned in 3 columns.
    assert!(rows[0].starts_with("  partition   0: in-memory"), "{out}");
    let (ok, out, err) = run(
        &["admin", "streams", "--addr", &primary.addr, "--json"],
        "",
        t,
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "replica-0", "{out}");
    // `a`'s partition sent its SET and DELETE (seqnos 1 and 2), and the
    // caught-up stream has nothing left to send.
    assert_eq!(v[0]["partitions"][pa]["sent_seqno"], 2, "{out}");
    assert_eq!(v[0]["partitions"][pa]["lag_items"], 0, "{out}");
    assert_eq!(v[0]["partitions"][pa]["lag_bytes"], 0, "{out}");
    // A real replica never acknowledges ahead of what it was sent.
    assert_eq!(v[0]["acks_ahead"], 0, "{out}");

    let (ok, out, err) = run(&["admin", "dump", "--addr", &primary.addr], "", t);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(out.contains("key=b\\x20c value_len=2"), "{out}");
    let (ok, out, err) = run(&["admin", "dump", "--addr", &primary.addr, "--json"], "", t);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    let tomb = rows.iter().find(|r| r["key"] == "a").unwrap();
    assert_eq!(tomb["deleted"], true, "{out}");
    assert_eq!(
        rows.iter().find(|r| r["key"] == "b c").unwrap()["value_len"],
        2,
        "{out}"
    );
    // The node's dump and the offline dump of its directory print the same
    // lines, so the two can be diffed (before, the node's JSON rows came
    // with their fields in another order).
    let data = primary.data.to_str().unwrap();
    for json in [false, true] {
        let json_flag: &[&str] = if json { &["--json"] } else { &[] };
        let remote = [
            &["admin", "dump", "--addr", primary.addr.as_str()][..],
            json_flag,
        ]
        .concat();
        let local = [&["admin", "dump", "--data", data][..], json_flag].concat();
        let (ok, over_network, err) = run(&remote, "", t);
        assert!(ok, "{err}");
        let (ok, offline, err) = run(&local, "", t);
        assert!(ok, "{err}");
        assert_eq!(over_network, offline, "json: {json}");
    }
}

/// A replica whose primary accepts connections and never answers stops
/// promptly on SIGTERM: its link gives up the handshake wait at the stop,
/// not after `--io-timeout-ms` (here a minute).
#[test]
fn a_replica_of_a_silent_primary_stops_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let mut replica = NodeProc::start(
        &dir.path().join("r"),
        "127.0.0.1:0",
        Some(&addr),
        "r",
        // With a partition count given, a new replica does not ask its
        // primary for one before it starts.
        &["--io-timeout-ms", "60000", "--partitions", "16"],
    );
    // The link has connected and sent its HELLO: it now waits for a reply.
    let _conn = tapkv_tests::net::accept_within(&silent, Duration::from_secs(30));
    replica.signal(libc::SIGTERM);
    // Well under the 60 s I/O timeout the link would otherwise wait out.
    let status = replica
        .proc
        .wait_status(Duration::from_secs(20))
        .expect("the replica stops within 20 s, not after its 60 s I/O timeout");
    assert!(status.success(), "{status:?}");
}

/// A replica whose link drops while a window is open, and reconnects while
/// the primary still holds the window, resumes it: no partition reset (its
/// reads of older keys keep working), and the window's REVERT reaches it.
#[test]
fn a_link_drop_inside_an_open_window_resumes_without_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    // Ten 500 ms heartbeats of silence end a stream: 5 s, long enough
    // that a loaded machine's stall does not end a session around the
    // REVERT (a replica reconnecting with a window that ended meanwhile is
    // reset, rightly, and this test would fail), short enough to wait for.
    let (primary, mut reps) = cluster_with(dir.path(), 1, false, &["--heartbeat-ms", "500"]);
    let replica = reps.remove(0);
    let mut c = primary.client();
    let p = 3;
    let k = keys_in(&c, p, 20, "blip");
    for key in &k[..10] {
        c.set(key.as_bytes(), b"before", 0, false).unwrap();
    }
    wait_converged(&primary, &[&replica], CONVERGE);
    let w = c.update_start(p).unwrap();
    for key in &k[5..15] {
        c.set(key.as_bytes(), b"window", 0, false).unwrap();
    }
    wait_seqno(&replica, p, high_seqno(&primary, p));
    let mut rc = replica.client();
    let sessions = rc.stats().unwrap()["link_sessions"].as_u64().unwrap();
    // The replica stops reading; the primary ends its silent stream.
    replica.proc.stop_all_threads();
    let deadline = Instant::now() + CONVERGE;
    while c
        .admin("streams")
        .unwrap()
        .as_array()
        .is_some_and(|s| !s.is_empty())
    {
        assert!(Instant::now() < deadline, "the silent stream never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    replica.signal(libc::SIGCONT);
    // It reconnects: a new session, streaming from memory again.
    let deadline = Instant::now() + CONVERGE;
    while rc.stats().unwrap()["link_sessions"].as_u64() <= Some(sessions) {
        assert!(Instant::now() < deadline, "the replica never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_streaming(&primary, &["replica-0"]);
    let stats = rc.stats().unwrap();
    assert_eq!(stats["partitions"][usize::from(p)]["resets"], 0, "{stats}");
    let v = rc.admin("inspect").unwrap();
    assert_eq!(
        v["partitions"][usize::from(p)]["open_window"]["checkpoint_id"],
        w,
        "{v}"
    );
    assert_reads(&replica, &k[0], Some(b"before"));
    assert_reads(&replica, &k[12], Some(b"window"));
    // The window's REVERT reaches it through the resumed stream.
    let (id, _, _) = c.update_revert(p).unwrap();
    assert_eq!(id, w);
    wait_converged(&primary, &[&replica], CONVERGE);
    assert_reads(&replica, &k[7], Some(b"before"));
    assert_reads(&replica, &k[12], None);
    let stats = rc.stats().unwrap();
    assert_eq!(stats["partitions"][usize::from(p)]["resets"], 0, "{stats}");
}
