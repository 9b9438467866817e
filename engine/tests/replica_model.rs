//! Model-based property test of replication at the engine level: a primary
//! and a replica engine in one process, the replica fed from the primary's
//! stream cursors exactly as a node's replica link feeds it
//! (`replication/src/node.rs`: `stream_loop`, `start_partition`,
//! `send_disk_snapshot` on the primary's side; `replica_session` and
//! `apply_run` on the replica's), without sockets or threads.
//!
//! Random steps write to the primary (sets, deletes, online-update windows,
//! checkpoints, flushes, evictions, restarts and crashes), move the stream
//! part of the way, drop the link, and restart or crash the replica. After every full sync the
//! replica must read exactly what the primary reads — every key's presence,
//! value and metadata — and hold the same online-update windows.
//!
//! Both flushers are paused and flushed by explicit steps, so what is on
//! disk (and with it whether a stream resumes from memory or with a
//! backfill) depends on the steps only: a case replays the same way under a
//! fixed `PROPTEST_RNG_SEED`.

// A loom build swaps the engine's primitives; only its models run then.
#![cfg(not(any(loom, feature = "loom")))]

use std::collections::VecDeque;
use std::path::Path;

use proptest::prelude::*;
use tapkv_engine::{
    ApplyOutcome, CursorEvent, Engine, Error, FailoverEntry, PartitionId, QueuedItem, WriteOptions,
};

const PARTITIONS: PartitionId = 2;
const KEYS: usize = 8;
/// As the node's `BACKFILL_PASSES`.
const BACKFILL_PASSES: usize = 3;
/// Sessions a full sync may need before the replica has caught up: a
/// resynchronisation costs one, a window held across a backfill two.
const MAX_SESSIONS_PER_SYNC: usize = 8;

#[derive(Debug, Clone)]
enum Op {
    Set(usize, u8),
    Delete(usize),
    Start(PartitionId),
    Complete(PartitionId),
    Revert(PartitionId),
    Checkpoint(PartitionId),
    /// Primary: flush rounds until nothing flushable is left.
    Flush,
    /// Primary: one flush round (a batch of at most three items).
    FlushRound,
    Evict(usize),
    /// Stream until the replica has everything, then compare.
    Sync,
    /// One stream round of at most this many items per partition.
    SyncSome(usize),
    /// The link drops (the primary removes the stream's cursors).
    Disconnect,
    ReplicaFlush,
    /// Replica: one flush round (a batch of at most three items), so that a
    /// crash finds part of what it applied on disk.
    ReplicaFlushRound,
    ReplicaEvict(usize),
    ReplicaRestart,
    ReplicaCrash,
    /// The replica's node stops (closing its engine, or killed) after it
    /// applied this many entries of the next disk snapshot; it keeps that
    /// prefix and resumes after it (`replica_session`).
    StopInNextSnapshot(usize, bool),
    /// The primary restarts (closed, or crashed if `true`): an open window
    /// is lost and starts a new branch, and a crash loses what was not
    /// flushed, so a replica that holds more is rolled back.
    PrimaryRestart(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..KEYS;
    let p = 0..PARTITIONS;
    prop_oneof![
        8 => (k.clone(), any::<u8>()).prop_map(|(k, v)| Op::Set(k, v)),
        3 => k.clone().prop_map(Op::Delete),
        3 => p.clone().prop_map(Op::Start),
        2 => p.clone().prop_map(Op::Complete),
        2 => p.clone().prop_map(Op::Revert),
        1 => p.prop_map(Op::Checkpoint),
        3 => Just(Op::Flush),
        1 => Just(Op::FlushRound),
        1 => k.clone().prop_map(Op::Evict),
        4 => Just(Op::Sync),
        3 => (1..4usize).prop_map(Op::SyncSome),
        2 => Just(Op::Disconnect),
        1 => Just(Op::ReplicaFlush),
        1 => Just(Op::ReplicaFlushRound),
        1 => k.prop_map(Op::ReplicaEvict),
        1 => Just(Op::ReplicaRestart),
        1 => Just(Op::ReplicaCrash),
        1 => (0..4usize, any::<bool>()).prop_map(|(n, crash)| Op::StopInNextSnapshot(n, crash)),
        1 => any::<bool>().prop_map(Op::PrimaryRestart),
    ]
}

fn key(k: usize) -> Vec<u8> {
    format!("repl-key-{k}").into_bytes()
}

fn val(k: usize, v: u8) -> Vec<u8> {
    format!("value-{k}-{v}-{}", "x".repeat(usize::from(v % 24))).into_bytes()
}

fn open_primary(dir: &Path) -> Engine {
    let e = Engine::builder(dir)
        .partitions(PARTITIONS)
        .checkpoint_max_items(5)
        .flush_batch_max_items(3)
        .open()
        .unwrap();
    e.set_flusher_paused(true);
    e
}

fn open_replica(dir: &Path, small_snapshot_buffer: bool) -> Engine {
    let mut b = Engine::builder(dir)
        .partitions(PARTITIONS)
        .checkpoint_max_items(5)
        .flush_batch_max_items(3)
        .replica(true);
    if small_snapshot_buffer {
        // About one entry: a disk snapshot of two or more spills to the
        // staging column family.
        b = b.snapshot_buffer_limit(128);
    }
    let e = b.open().unwrap();
    e.set_flusher_paused(true);
    e
}

/// Flush rounds until a round leaves nothing more.
fn drain(e: &Engine) {
    for _ in 0..1000 {
        if !e.run_flush_round().unwrap() {
            return;
        }
    }
    panic!("flushing makes no progress");
}

/// Whether the session goes on or ended (the node's `replica_session`
/// returning; the next one reconnects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Down,
    /// The replica's node stopped (closed, or crashed if `crash`).
    Stop {
        crash: bool,
    },
}

/// How often the interesting paths ran (printed with `REPLICA_MODEL_TRACE`).
#[derive(Debug, Default)]
struct Counters {
    sessions: usize,
    disk_snapshots: usize,
    snapshot_items: usize,
    staged_items: u64,
    resyncs: usize,
    window_resyncs: usize,
    lost_cursors: usize,
    rollbacks: usize,
    stopped_in_snapshot: usize,
    checks: usize,
    checks_in_window: usize,
}

/// The node's `apply_run`: applies a run of entries of one partition,
/// waiting (here: flushing) while the replica's checkpoint memory is full;
/// `false` when the partition had to be reset for a resynchronisation.
fn apply_run(
    replica: &Engine,
    p: PartitionId,
    run: &mut VecDeque<QueuedItem>,
    c: &mut Counters,
) -> bool {
    let mut tries = 0;
    let outcome = loop {
        let before = run.len();
        match replica.apply_replicated_run(p, run) {
            Ok(outcome) => {
                assert!(
                    run.is_empty() == (outcome != ApplyOutcome::Resync),
                    "a run stops only at an entry to resynchronise for: {outcome:?}, {} left",
                    run.len()
                );
                break outcome;
            }
            Err(Error::TempOutOfMemory { .. }) => {
                assert!(!run.is_empty(), "a refused entry stays in the run");
                if run.len() == before {
                    tries += 1;
                }
                assert!(
                    tries < 100,
                    "replica memory never frees for {:?}",
                    run.front()
                );
                replica.run_flush_round().unwrap();
            }
            Err(e) if e.is_own_fault() => {
                panic!(
                    "replica fault applying {:?} to partition {p}: {e}",
                    run.front()
                )
            }
            Err(_) => break ApplyOutcome::Resync,
        }
    };
    run.clear();
    if outcome == ApplyOutcome::Resync {
        c.resyncs += 1;
        replica.reset_partition(p).unwrap();
        return false;
    }
    true
}

/// [`apply_run`] of one entry.
fn apply_one(replica: &Engine, p: PartitionId, item: &QueuedItem, c: &mut Counters) -> bool {
    apply_run(replica, p, &mut VecDeque::from([item.clone()]), c)
}

struct Pair {
    // Engines first: they close before their directories go.
    primary: Option<Engine>,
    replica: Option<Engine>,
    rdir: tempfile::TempDir,
    pdir: tempfile::TempDir,
    small_snapshot_buffer: bool,
    /// Items per partition a full sync reads per cursor read.
    batch: usize,
    /// The open session's cursor on the primary.
    session: Option<String>,
    connections: u64,
    /// The node's `resync_next`: partitions to reset before the next session.
    resync_next: Vec<PartitionId>,
    /// Armed by `Op::StopInNextSnapshot`.
    stop_in_snapshot: Option<(usize, bool)>,
    c: Counters,
}

impl Pair {
    fn new(small_snapshot_buffer: bool, batch: usize) -> Pair {
        let pdir = tempfile::tempdir().unwrap();
        let rdir = tempfile::tempdir().unwrap();
        Pair {
            primary: Some(open_primary(pdir.path())),
            replica: Some(open_replica(rdir.path(), small_snapshot_buffer)),
            rdir,
            pdir,
            small_snapshot_buffer,
            batch,
            session: None,
            connections: 0,
            resync_next: Vec::new(),
            stop_in_snapshot: None,
            c: Counters::default(),
        }
    }

    fn primary(&self) -> &Engine {
        self.primary.as_ref().unwrap()
    }

    fn replica(&self) -> &Engine {
        self.replica.as_ref().unwrap()
    }

    /// The stream ends: the primary removes its cursors (`serve_stream`).
    fn disconnect(&mut self) {
        if let Some(cursor) = self.session.take() {
            for p in 0..PARTITIONS {
                self.primary().remove_cursor(p, &cursor).unwrap();
            }
        }
    }

    /// The stream ends with the primary's engine (its cursors with it).
    fn restart_primary(&mut self, crash: bool) {
        self.session = None;
        let p = self.primary.take().unwrap();
        if crash {
            p.crash();
        } else {
            p.close().unwrap();
        }
        self.primary = Some(open_primary(self.pdir.path()));
    }

    fn restart_replica(&mut self, crash: bool) {
        self.disconnect();
        let r = self.replica.take().unwrap();
        if crash {
            r.crash();
        } else {
            r.close().unwrap();
        }
        // The node's `resync_next` is memory only.
        self.resync_next.clear();
        self.replica = Some(open_replica(self.rdir.path(), self.small_snapshot_buffer));
    }

    /// `send_disk_snapshot`'s entries, read whole from the primary's
    /// `DiskSnapshot` by `read_snapshot` (as the node, through the snapshot
    /// whose end and iterator are taken together), and the replica's
    /// handling of the two SNAPSHOT markers around them: a snapshot
    /// buffer, applied in seqno order at the closing marker.
    fn disk_snapshot(&mut self, p: PartitionId, entries: Vec<QueuedItem>) -> Link {
        let replica = self.replica.as_ref().unwrap();
        let holds_window = replica.stats().unwrap().partitions[usize::from(p)]
            .window
            .is_some();
        if holds_window {
            // A backfill carries items only: the window would wait for ever
            // for its END or REVERT. Reset before the next session.
            self.c.window_resyncs += 1;
            self.resync_next.push(p);
            return Link::Down;
        }
        self.c.disk_snapshots += 1;
        let mut buffer = replica.snapshot_buffer(p).unwrap();
        self.c.snapshot_items += entries.len();
        for e in entries {
            buffer.push(e).unwrap();
        }
        self.c.staged_items += buffer.staged_items();
        let stop = self.stop_in_snapshot.take();
        let (mut applied, mut stopped) = (0, false);
        let c = &mut self.c;
        let whole = buffer
            .apply(|item| {
                if stop.is_some_and(|(n, _)| applied == n) {
                    stopped = true;
                    return Ok(false);
                }
                applied += 1;
                Ok(apply_one(replica, p, item, c))
            })
            .unwrap();
        match (whole, stop) {
            (true, _) => Link::Up,
            (false, Some((_, crash))) if stopped => {
                self.c.stopped_in_snapshot += 1;
                Link::Stop { crash }
            }
            (false, _) => Link::Down,
        }
    }

    /// A new session: the replica asks for every partition from its high
    /// seqno under its branch id; the primary answers FAILOVER or ROLLBACK
    /// for each, backfills without cursors what memory no longer holds, then
    /// registers the cursors (`stream_loop` up to its main loop).
    fn connect(&mut self) -> Link {
        for p in std::mem::take(&mut self.resync_next) {
            self.replica().reset_partition(p).unwrap();
        }
        self.connections += 1;
        self.c.sessions += 1;
        let cursor = format!("repl:replica:{}", self.connections);
        self.session = Some(cursor.clone());
        let reqs: Vec<(PartitionId, u64, u64)> = (0..PARTITIONS)
            .map(|p| {
                let r = self.replica();
                let uuid = r.failover_log(p).unwrap().last().map_or(0, |e| e.uuid);
                (p, uuid, r.high_seqno(p).unwrap())
            })
            .collect();
        let mut starts = Vec::new();
        let mut rolled_back = false;
        for (p, uuid, seqno) in reqs {
            match self.primary().resume_position(p, uuid, seqno).unwrap() {
                Some(from) => {
                    let theirs = self
                        .primary()
                        .failover_log(p)
                        .unwrap()
                        .last()
                        .map_or(0, |e| e.uuid);
                    let r = self.replica();
                    if r.failover_log(p).unwrap().last().map(|e| e.uuid) != Some(theirs) {
                        // As the node's link does: a replica that stepped
                        // over a de-duplication hole not yet resolved
                        // resynchronises on a new branch.
                        if r.replica_history_may_have_gaps(p).unwrap() {
                            r.reset_partition(p).unwrap();
                            self.c.rollbacks += 1;
                            rolled_back = true;
                            continue;
                        }
                        let log = vec![FailoverEntry {
                            uuid: theirs,
                            seqno: 0,
                        }];
                        r.set_failover_log(p, log).unwrap();
                    }
                    starts.push((p, from));
                }
                None => {
                    self.c.rollbacks += 1;
                    self.replica().reset_partition(p).unwrap();
                    rolled_back = true;
                }
            }
        }
        if rolled_back {
            return Link::Down;
        }
        for _ in 0..BACKFILL_PASSES {
            let mut sent_any = false;
            for (p, from) in &mut starts {
                let snap = self
                    .primary()
                    .backfill_snapshot(*p, *from)
                    .unwrap()
                    .map(read_snapshot);
                if let Some((end, entries)) = snap {
                    let link = self.disk_snapshot(*p, entries);
                    if link != Link::Up {
                        return link;
                    }
                    *from = end;
                    sent_any = true;
                }
            }
            if !sent_any {
                break;
            }
        }
        for (p, from) in starts {
            let snap = self
                .primary()
                .stream_start_with_snapshot(p, &cursor, from)
                .unwrap()
                .map(read_snapshot);
            if let Some((_, entries)) = snap {
                let link = self.disk_snapshot(p, entries);
                if link != Link::Up {
                    return link;
                }
            }
        }
        Link::Up
    }

    /// One round of the stream: up to `max_items` items per partition, each
    /// event applied as the replica's session applies it. Returns whether
    /// anything was read.
    fn stream_round(&mut self, max_items: usize) -> (Link, bool) {
        let cursor = self.session.clone().unwrap();
        let mut moved = false;
        for p in 0..PARTITIONS {
            let mut events = Vec::new();
            let read = self
                .primary()
                .read_cursor_with(p, &cursor, max_items, |ev| events.push(ev.to_owned()));
            if let Err(e) = read {
                assert!(
                    !self.primary().has_cursor(p, &cursor).unwrap(),
                    "reading the stream cursor of partition {p}: {e}"
                );
                // Dropped under memory pressure: the stream ends.
                self.c.lost_cursors += 1;
                return (Link::Down, moved);
            }
            moved |= !events.is_empty();
            let replica = self.replica.as_ref().unwrap();
            // Items in a row are applied as one run, as the node's link
            // applies the entries of a partition that follow in its buffer.
            let mut run = VecDeque::new();
            for ev in events {
                if !matches!(ev, CursorEvent::Item(_))
                    && !apply_run(replica, p, &mut run, &mut self.c)
                {
                    return (Link::Down, true);
                }
                match ev {
                    CursorEvent::CheckpointStart { id } => {
                        replica.replica_checkpoint(p, id).unwrap();
                    }
                    CursorEvent::CheckpointEnd { id } => {
                        replica.replica_checkpoint_end(p, id).unwrap();
                    }
                    CursorEvent::Item(item) => run.push_back(item),
                }
            }
            if !apply_run(replica, p, &mut run, &mut self.c) {
                return (Link::Down, true);
            }
        }
        (Link::Up, moved)
    }

    /// The session ended: the primary drops its cursors, and a node that
    /// stopped comes back.
    fn end_session(&mut self, link: Link) {
        self.disconnect();
        if let Link::Stop { crash } = link {
            self.restart_replica(crash);
        }
    }

    /// Connects if needed and streams one round.
    fn sync_some(&mut self, max_items: usize) {
        let mut link = if self.session.is_none() {
            self.connect()
        } else {
            Link::Up
        };
        if link == Link::Up {
            link = self.stream_round(max_items).0;
        }
        if link != Link::Up {
            self.end_session(link);
        }
    }

    /// Streams (reconnecting as the replica link does) until a round reads
    /// nothing.
    fn sync(&mut self) {
        let mut downs = 0;
        loop {
            let link = if self.session.is_none() {
                self.connect()
            } else {
                match self.stream_round(self.batch) {
                    (Link::Up, false) => return,
                    (link, _) => link,
                }
            };
            if link != Link::Up {
                self.end_session(link);
                downs += 1;
                assert!(
                    downs <= MAX_SESSIONS_PER_SYNC,
                    "the replica does not catch up: {downs} sessions ended ({:?})",
                    self.c
                );
            }
        }
    }

    /// The replica reads what the primary reads, and holds its windows.
    fn check(&mut self) {
        let (primary, replica) = (self.primary(), self.replica());
        let (ps, rs) = (primary.stats().unwrap(), replica.stats().unwrap());
        let mut in_window = false;
        for p in 0..usize::from(PARTITIONS) {
            let (pp, rp) = (&ps.partitions[p], &rs.partitions[p]);
            in_window |= pp.window.is_some();
            assert_eq!(
                rp.window.map(|w| w.checkpoint_id),
                pp.window.map(|w| w.checkpoint_id),
                "partition {p}: window on the replica vs the primary"
            );
            assert!(
                rp.high_seqno <= pp.high_seqno,
                "partition {p}: replica high seqno {} above the primary's {}",
                rp.high_seqno,
                pp.high_seqno
            );
            assert_eq!(rp.items, pp.items, "partition {p}: item count");
        }
        for k in 0..KEYS {
            match (primary.get(&key(k)), replica.get(&key(k))) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(
                        String::from_utf8_lossy(b.value()),
                        String::from_utf8_lossy(a.value()),
                        "key {k}: value"
                    );
                    assert_eq!(b.meta, a.meta, "key {k}: metadata");
                }
                (Err(Error::NotFound), Err(Error::NotFound)) => {}
                (a, b) => panic!("key {k}: primary {a:?}, replica {b:?}"),
            }
        }
        self.c.checks += 1;
        if in_window {
            self.c.checks_in_window += 1;
        }
    }

    fn step(&mut self, op: &Op) {
        let mem = WriteOptions::default();
        let primary = self.primary();
        match *op {
            Op::Set(k, v) => {
                primary.set(&key(k), val(k, v), mem).unwrap();
            }
            Op::Delete(k) => match primary.delete(&key(k), mem) {
                Ok(_) | Err(Error::NotFound) => {}
                Err(e) => panic!("delete: {e}"),
            },
            Op::Start(p) => match primary.online_update_start(p) {
                Ok(_) | Err(Error::OnlineUpdateOpen { .. }) => {}
                Err(e) => panic!("start: {e}"),
            },
            Op::Complete(p) => match primary.online_update_complete(p) {
                Ok(_) | Err(Error::NoOnlineUpdate { .. }) => {}
                Err(e) => panic!("complete: {e}"),
            },
            Op::Revert(p) => match primary.online_update_revert(p) {
                Ok(_) | Err(Error::NoOnlineUpdate { .. }) => {}
                Err(e) => panic!("revert: {e}"),
            },
            Op::Checkpoint(p) => {
                primary.create_checkpoint(p).unwrap();
            }
            Op::Flush => drain(primary),
            Op::FlushRound => {
                primary.run_flush_round().unwrap();
            }
            Op::Evict(k) => match primary.evict(&key(k)) {
                Ok(()) | Err(Error::NotFound | Error::WrongState(_)) => {}
                Err(e) => panic!("evict: {e}"),
            },
            Op::Sync => {
                self.sync();
                self.check();
            }
            Op::SyncSome(n) => self.sync_some(n),
            Op::Disconnect => self.disconnect(),
            Op::ReplicaFlush => drain(self.replica()),
            Op::ReplicaFlushRound => {
                self.replica().run_flush_round().unwrap();
            }
            Op::ReplicaEvict(k) => match self.replica().evict(&key(k)) {
                Ok(()) | Err(Error::NotFound | Error::WrongState(_)) => {}
                Err(e) => panic!("replica evict: {e}"),
            },
            Op::ReplicaRestart => self.restart_replica(false),
            Op::ReplicaCrash => self.restart_replica(true),
            Op::StopInNextSnapshot(n, crash) => self.stop_in_snapshot = Some((n, crash)),
            Op::PrimaryRestart(crash) => self.restart_primary(crash),
        }
    }
}

/// Runs `ops`, then a last full sync and comparison.
fn run(ops: &[Op], small_snapshot_buffer: bool, batch: usize) -> Counters {
    let mut pair = Pair::new(small_snapshot_buffer, batch);
    for op in ops {
        pair.step(op);
    }
    pair.sync();
    pair.check();
    pair.disconnect();
    std::mem::take(&mut pair.c)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn a_replica_fed_from_the_primarys_stream_reads_what_the_primary_reads(
        ops in proptest::collection::vec(op(), 1..60),
        small_snapshot_buffer in any::<bool>(),
        batch in 1..8usize,
    ) {
        let c = run(&ops, small_snapshot_buffer, batch);
        if std::env::var_os("REPLICA_MODEL_TRACE").is_some() {
            eprintln!("{c:?}");
        }
    }
}

/// A stream cut inside a checkpoint just past a de-duplication hole (K at 1
/// rewritten at 3 after the flusher persisted 2; the replica applied A at 2
/// only), then a crash of the primary before 3 reached its disk: the
/// primary's new branch holds K at 1, which the replica never received.
/// Before, the replica resumed from 2 and kept lacking it; it now
/// resynchronises the partition. (Keys 0 and 1 share partition 0.)
#[test]
fn a_stream_cut_past_a_dedup_hole_then_a_primary_crash_converges() {
    let c = run(
        &[
            Op::Set(0, 1),
            Op::Set(1, 1),
            Op::Flush,
            Op::Set(0, 2),
            Op::SyncSome(1),
            Op::PrimaryRestart(true),
        ],
        false,
        4,
    );
    assert!(c.rollbacks >= 1, "{c:?}");
}

/// The same cut, then a reconnect before the crash: the new session's
/// cursor registers inside the checkpoint the replica was reading and
/// begins with that checkpoint's START, which the replica took for having
/// read the one before to its end. It then resumed after the crash as if
/// it held every version up to its high seqno, and kept lacking key 0's
/// first version for good. (Found by a review; keys 0, 1 and 2 share
/// partition 0.)
#[test]
fn a_reconnect_inside_a_checkpoint_keeps_the_replicas_history_gap() {
    let c = run(
        &[
            Op::Set(0, 1),
            Op::Set(1, 1),
            Op::Set(2, 1),
            Op::Flush,
            Op::Set(0, 2),
            Op::SyncSome(1),
            Op::Disconnect,
            Op::SyncSome(1),
            Op::PrimaryRestart(true),
        ],
        false,
        4,
    );
    assert!(c.rollbacks + c.resyncs >= 1, "{c:?}");
}

/// A primary's disk snapshot read whole: its end and its entries, in the
/// order the node sends them (the model then needs no borrow of the primary
/// while the replica applies them).
fn read_snapshot(snap: tapkv_engine::DiskSnapshot<'_>) -> (u64, Vec<QueuedItem>) {
    let end = snap.end();
    let mut entries = Vec::new();
    snap.scan_ref(|e| {
        entries.extend(e.map(|e| e.to_queued()));
        Ok(())
    })
    .unwrap();
    (end, entries)
}

/// The generated cases reach the paths the model is for: with a fixed
/// seed, 64 cases (as many as the property test runs) apply disk
/// snapshots, spill them, roll back, resynchronise a window, stop inside a
/// snapshot and check inside a window. A change to the generator or the
/// model that stopped reaching one would otherwise go unseen. (Two paths
/// the generator does not reach, even in 512 cases: an entry refused for
/// a resynchronisation outside a window, and a stream cursor dropped under
/// memory pressure; dedicated tests cover them, e.g.
/// `a_stream_cut_past_a_dedup_hole_then_a_primary_crash_converges` and
/// `flusher::a_refused_write_drops_a_lagging_stream_cursor_below_the_threshold`.)
#[test]
fn the_generated_cases_reach_every_path_the_model_is_for() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let cases = (
        proptest::collection::vec(op(), 1..60),
        any::<bool>(),
        1..8usize,
    );
    let mut all = Counters::default();
    for _ in 0..64 {
        let (ops, small, batch) = cases.new_tree(&mut runner).unwrap().current();
        let c = run(&ops, small, batch);
        all.sessions += c.sessions;
        all.disk_snapshots += c.disk_snapshots;
        all.snapshot_items += c.snapshot_items;
        all.staged_items += c.staged_items;
        all.resyncs += c.resyncs;
        all.window_resyncs += c.window_resyncs;
        all.lost_cursors += c.lost_cursors;
        all.rollbacks += c.rollbacks;
        all.stopped_in_snapshot += c.stopped_in_snapshot;
        all.checks += c.checks;
        all.checks_in_window += c.checks_in_window;
    }
    let reached = [
        all.disk_snapshots,
        all.staged_items as usize,
        all.window_resyncs,
        all.rollbacks,
        all.stopped_in_snapshot,
        all.checks_in_window,
    ];
    assert!(reached.iter().all(|n| *n > 0), "{all:?}");
}
