//! Checkpoint manager unit tests: de-duplication, cursor registration,
//! checkpoint freeing, and exact remaining counts (property test).

// A loom build swaps the engine's primitives; only its models run then.
#![cfg(not(any(loom, feature = "loom")))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use tapkv_engine::{
    CheckpointConfig, CheckpointManager, CursorEvent, ItemMeta, QueuedItem, Registration,
};

fn mgr(max_items: usize) -> (CheckpointManager, Arc<AtomicUsize>) {
    let mem = Arc::new(AtomicUsize::new(0));
    let m = CheckpointManager::new(
        CheckpointConfig {
            max_items,
            max_bytes: usize::MAX,
        },
        1,
        0,
        Arc::clone(&mem),
    );
    (m, mem)
}

fn item(key: &str, seqno: u64) -> QueuedItem {
    QueuedItem::mutation(
        key.as_bytes(),
        format!("v{seqno}").as_bytes(),
        ItemMeta {
            by_seqno: seqno,
            cas: seqno,
            rev_seqno: 1,
            flags: 0,
            expiry: 0,
        },
    )
}

fn items_of(events: &[CursorEvent]) -> Vec<(String, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            CursorEvent::Item(i) => {
                Some((String::from_utf8_lossy(i.key()).into_owned(), i.seqno()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn exactly_one_open_checkpoint_at_the_back() {
    let (mut m, _) = mgr(3);
    assert_eq!(m.checkpoints().len(), 1);
    assert!(m.checkpoints()[0].open);
    m.register_cursor("c", 0).unwrap();
    for s in 1..=10 {
        m.queue(item(&format!("k{s}"), s));
    }
    let cks = m.checkpoints();
    assert_eq!(cks.iter().filter(|c| c.open).count(), 1);
    assert!(cks.last().unwrap().open);
    // 10 items with 3 per checkpoint: 4 checkpoints, ids consecutive.
    assert_eq!(cks.len(), 4);
    assert!(cks.windows(2).all(|w| w[1].id == w[0].id + 1));
    assert_eq!(cks.iter().map(|c| c.items).sum::<usize>(), 10);
}

#[test]
fn dedup_with_cursors_before_on_and_after_the_old_item() {
    let (mut m, _) = mgr(100);
    for name in ["before", "on", "after"] {
        m.register_cursor(name, 0).unwrap();
    }
    m.queue(item("a", 1));
    m.queue(item("b", 2));
    m.queue(item("c", 3));
    m.read("on", 1).unwrap(); // has passed a@1
    m.read("after", 10).unwrap(); // has passed everything
    assert!(m.queue(item("a", 4)), "a is de-duplicated");
    assert_eq!(m.checkpoints()[0].items, 3);
    assert_eq!(m.remaining("before").unwrap(), 3);
    assert_eq!(m.remaining("on").unwrap(), 3);
    assert_eq!(m.remaining("after").unwrap(), 1);
    let before = m.read("before", 10).unwrap();
    assert_eq!(
        items_of(&before.events),
        vec![("b".into(), 2), ("c".into(), 3), ("a".into(), 4)]
    );
    let on = m.read("on", 10).unwrap();
    assert_eq!(
        items_of(&on.events),
        vec![("b".into(), 2), ("c".into(), 3), ("a".into(), 4)]
    );
    let after = m.read("after", 10).unwrap();
    assert_eq!(items_of(&after.events), vec![("a".into(), 4)]);
    for name in ["before", "on", "after"] {
        assert_eq!(m.remaining(name).unwrap(), 0);
    }
}

#[test]
fn dedup_only_inside_the_open_checkpoint() {
    let (mut m, _) = mgr(100);
    m.register_cursor("c", 0).unwrap();
    m.queue(item("a", 1));
    m.create_checkpoint();
    assert!(!m.queue(item("a", 2)), "a closed checkpoint keeps its copy");
    let b = m.read("c", 10).unwrap();
    assert_eq!(items_of(&b.events), vec![("a".into(), 1), ("a".into(), 2)]);
}

#[test]
fn registration_at_a_boundary_and_mid_checkpoint() {
    let (mut m, _) = mgr(100);
    m.register_cursor("pin", 0).unwrap();
    for s in 1..=3 {
        m.queue(item(&format!("k{s}"), s));
    }
    let second = m.create_checkpoint();
    for s in 4..=6 {
        m.queue(item(&format!("k{s}"), s));
    }
    // At the boundary: everything after 3 is the second checkpoint.
    assert_eq!(
        m.register_cursor("boundary", 3).unwrap(),
        Registration::InMemory {
            checkpoint_id: second
        }
    );
    let b = m.read("boundary", 10).unwrap();
    assert_eq!(b.events[0], CursorEvent::CheckpointStart { id: second });
    assert_eq!(
        items_of(&b.events),
        vec![("k4".into(), 4), ("k5".into(), 5), ("k6".into(), 6)]
    );
    // Mid-checkpoint: after seqno 1, inside the first checkpoint.
    assert_eq!(
        m.register_cursor("mid", 1).unwrap(),
        Registration::InMemory {
            checkpoint_id: second - 1
        }
    );
    assert_eq!(m.remaining("mid").unwrap(), 5);
    let b = m.read("mid", 10).unwrap();
    let seqnos: Vec<u64> = items_of(&b.events).iter().map(|x| x.1).collect();
    assert_eq!(seqnos, vec![2, 3, 4, 5, 6]);
    assert!(b
        .events
        .contains(&CursorEvent::CheckpointEnd { id: second - 1 }));
    // Beyond the high seqno is refused.
    assert!(m.register_cursor("future", 7).is_err());
}

#[test]
fn reregistering_a_cursor_moves_it() {
    let (mut m, _) = mgr(100);
    m.register_cursor("c", 0).unwrap();
    for s in 1..=5 {
        m.queue(item(&format!("k{s}"), s));
    }
    m.read("c", 5).unwrap();
    assert_eq!(m.remaining("c").unwrap(), 0);
    m.register_cursor("c", 2).unwrap();
    assert_eq!(m.remaining("c").unwrap(), 3);
    assert_eq!(m.cursors().len(), 1);
}

#[test]
fn only_the_oldest_unreferenced_closed_checkpoints_are_freed() {
    let (mut m, mem) = mgr(2);
    m.register_cursor("slow", 0).unwrap();
    m.register_cursor("fast", 0).unwrap();
    for s in 1..=6 {
        m.queue(item(&format!("k{s}"), s));
    }
    // Checkpoints 1,2 closed (2 items each), 3 open.
    assert_eq!(m.checkpoints().len(), 3);
    m.read("fast", 6).unwrap();
    assert_eq!(m.checkpoints().len(), 3, "slow still needs all of them");
    m.read("slow", 2).unwrap(); // finished checkpoint 1 but is still in it
    m.read("slow", 1).unwrap(); // moved into checkpoint 2
    let ids: Vec<u64> = m.checkpoints().iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![2, 3]);
    // Removing the slow cursor frees checkpoint 2 as well.
    assert!(m.remove_cursor("slow"));
    let ids: Vec<u64> = m.checkpoints().iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![3]);
    let held: usize = m.checkpoints().iter().map(|c| c.mem_bytes).sum();
    assert_eq!(held, m.mem_bytes());
    assert_eq!(mem.load(Ordering::Relaxed), m.mem_bytes());
    drop(m);
    assert_eq!(mem.load(Ordering::Relaxed), 0);
}

#[test]
fn freed_history_needs_backfill() {
    let (mut m, _) = mgr(2);
    m.register_cursor("c", 0).unwrap();
    for s in 1..=5 {
        m.queue(item(&format!("k{s}"), s));
    }
    m.read("c", 5).unwrap();
    let oldest = m.checkpoints()[0].start_seqno;
    assert!(oldest > 1);
    assert_eq!(
        m.register_cursor("late", 0).unwrap(),
        Registration::NeedsBackfill {
            oldest_seqno: oldest
        }
    );
    assert!(!m.has_cursor("late"));
    assert!(matches!(
        m.register_cursor("late", oldest - 1).unwrap(),
        Registration::InMemory { .. }
    ));
}

#[test]
fn peek_does_not_move_and_stops_at_the_barrier() {
    let (mut m, _) = mgr(100);
    m.register_cursor("c", 0).unwrap();
    for s in 1..=5 {
        m.queue(item(&format!("k{s}"), s));
    }
    let b = m.peek("c", 100, usize::MAX, Some(3)).unwrap();
    assert!(b.progress.blocked);
    assert_eq!(b.items(), 3);
    assert_eq!(m.remaining("c").unwrap(), 5);
    drop(m.advance("c", &b).unwrap());
    assert_eq!(m.remaining("c").unwrap(), 2);
}

#[test]
fn a_scan_in_pieces_sees_what_one_scan_sees() {
    let (mut m, _) = mgr(4);
    m.register_cursor("c", 0).unwrap();
    for s in 1..=11 {
        // Every third write updates an earlier key: holes from de-duplication.
        let k = if s % 3 == 0 { s - 1 } else { s };
        m.queue(item(&format!("k{k}"), s));
    }
    let mut whole = Vec::new();
    let one = m
        .scan("c", 100, usize::MAX, None, |e| whole.push(e.to_owned()))
        .unwrap();
    let mut pieces = Vec::new();
    let mut at: Option<tapkv_engine::CursorProgress> = None;
    loop {
        // `max_items` counts the whole scan, earlier pieces included.
        let before = at
            .as_ref()
            .map(|a| (a.items, a.end_seqno(), a.end_checkpoint_id()));
        let limit = before.map_or(0, |b| b.0) + 2;
        let next = m
            .scan_on("c", at.as_ref(), limit, usize::MAX, None, None, |e| {
                pieces.push(e.to_owned())
            })
            .unwrap();
        let now = Some((next.items, next.end_seqno(), next.end_checkpoint_id()));
        at = Some(next);
        if now == before {
            break;
        }
    }
    let at = at.unwrap();
    assert_eq!(pieces, whole);
    assert_eq!((at.items, at.end_seqno()), (one.items, one.end_seqno()));
    assert_eq!(at.end_checkpoint_id(), one.end_checkpoint_id());
    drop(m.advance("c", at).unwrap());
    assert_eq!(m.remaining("c").unwrap(), 0);
    // A continuation from behind the committed position is refused.
    assert!(m
        .scan_on("c", Some(&one), 10, usize::MAX, None, None, |_| {})
        .is_ok());
    let stale = m.scan("c", 0, usize::MAX, None, |_| {}).unwrap();
    queue_more(&mut m);
    let ahead = m.scan("c", 100, usize::MAX, None, |_| {}).unwrap();
    drop(m.advance("c", ahead).unwrap());
    assert!(m
        .scan_on("c", Some(&stale), 10, usize::MAX, None, None, |_| {})
        .is_err());
}

/// A round limit stops a scan only between checkpoints: inside one,
/// de-duplication may have moved a change past any earlier stopping point.
#[test]
fn a_round_limit_stops_only_at_a_checkpoint_boundary() {
    let (mut m, _) = mgr(4);
    m.register_cursor("c", 0).unwrap();
    for s in 1..=10 {
        m.queue(item(&format!("k{s}"), s));
    }
    // Checkpoints: 1..=4, 5..=8, open 9..=10. A limit of 2 items is reached
    // inside the first checkpoint; the scan goes on to its end.
    let limit = Some((2, usize::MAX));
    let p = m
        .scan_on("c", None, 100, usize::MAX, None, limit, |_| {})
        .unwrap();
    assert_eq!((p.items, p.end_seqno()), (4, 4));
    assert!(p.at_checkpoint_boundary());
    // Without a round limit, the hard limit stops it where it is.
    let p = m.scan("c", 2, usize::MAX, None, |_| {}).unwrap();
    assert_eq!((p.items, p.end_seqno()), (2, 2));
    assert!(!p.at_checkpoint_boundary());
    // A limit never reached: everything, to the open checkpoint's end.
    let limit = Some((100, usize::MAX));
    let p = m
        .scan_on("c", None, 100, usize::MAX, None, limit, |_| {})
        .unwrap();
    assert_eq!((p.items, p.end_seqno()), (10, 10));
}

#[test]
fn an_open_checkpoint_kept_open_by_deduplication_stays_small() {
    // Three keys written again and again never reach the item limit, so the
    // checkpoint stays open; it must not keep an entry for every write.
    let (mut m, mem) = mgr(10);
    m.register_cursor("slow", 0).unwrap();
    m.register_cursor("fast", 0).unwrap();
    let mut seen = Vec::new();
    for s in 1..=100_000u64 {
        m.queue(item(&format!("k{}", s % 3), s));
        if s % 1_000 == 0 {
            // One cursor keeps up, one reads a little, then stops.
            seen.extend(items_of(&m.read("fast", 10).unwrap().events));
            if s == 50_000 {
                seen.extend(items_of(&m.read("slow", 2).unwrap().events));
            }
        }
        let open = m.checkpoints().pop().unwrap();
        assert!(open.entries < 20, "after {s} writes: {open:?}");
    }
    let cks = m.checkpoints();
    assert_eq!(cks.len(), 1, "{cks:?}");
    assert_eq!(
        (cks[0].start_seqno, cks[0].high_seqno, cks[0].items),
        (1, 100_000, 3)
    );
    assert_eq!(mem.load(Ordering::Relaxed), m.mem_bytes());
    // Every read returned each key's latest write at the time.
    assert!(seen.iter().all(|(k, s)| *k == format!("k{}", s % 3)));
    // Both cursors still read exactly the live entries after their position.
    assert_eq!(m.remaining("fast").unwrap(), 0);
    assert_eq!(m.remaining("slow").unwrap(), 3);
    let got = items_of(&m.read("slow", 10).unwrap().events);
    assert_eq!(
        got,
        vec![
            ("k2".to_string(), 99_998),
            ("k0".to_string(), 99_999),
            ("k1".to_string(), 100_000)
        ]
    );
    // De-duplication still finds the keys through the moved slots.
    m.queue(item("k1", 100_001));
    assert_eq!(m.checkpoints()[0].items, 3);
    assert_eq!(
        items_of(&m.read("slow", 10).unwrap().events),
        vec![("k1".to_string(), 100_001)]
    );
}

fn queue_more(m: &mut CheckpointManager) {
    for s in 12..=14 {
        m.queue(item(&format!("k{s}"), s));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Queue(u8),
    Close,
    Read(u8, u8),
    Register(u8, u8),
    Remove(u8),
    Expel,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..8).prop_map(Op::Queue),
        1 => Just(Op::Close),
        3 => (0u8..3, 0u8..6).prop_map(|(c, n)| Op::Read(c, n)),
        1 => (0u8..3, any::<u8>()).prop_map(|(c, f)| Op::Register(c, f)),
        1 => (0u8..3).prop_map(Op::Remove),
        1 => Just(Op::Expel),
    ]
}

/// The reference model: every entry ever queued, whether it is still live,
/// and each cursor's position.
#[derive(Default)]
struct Model {
    entries: Vec<(u64, u8, bool, u64)>, // seqno, key, live, checkpoint id
    cursors: [Option<u64>; 3],
    /// Highest seqno expelled so far.
    expelled_upto: u64,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn remaining_counts_stay_exact(ops in proptest::collection::vec(op(), 1..120), max_items in 1usize..6) {
        let (mut m, mem) = mgr(max_items);
        let mut model = Model::default();
        let mut seqno = 0u64;
        for op in ops {
            match op {
                Op::Queue(k) => {
                    seqno += 1;
                    m.queue(item(&format!("k{k}"), seqno));
                    let open = m.open_checkpoint_id();
                    for e in model.entries.iter_mut() {
                        if e.1 == k && e.3 == open && e.2 {
                            e.2 = false;
                        }
                    }
                    model.entries.push((seqno, k, true, open));
                    // Holes never make up half of a grown open checkpoint.
                    let ck = m.checkpoints().pop().unwrap();
                    prop_assert!(ck.entries < 2 * ck.items.max(max_items), "{:?}", ck);
                }
                Op::Close => { m.create_checkpoint(); }
                Op::Read(c, n) => {
                    let name = format!("c{c}");
                    if let Some(pos) = model.cursors[c as usize] {
                        let b = m.read(&name, n as usize).unwrap();
                        let got: Vec<u64> = items_of(&b.events).iter().map(|x| x.1).collect();
                        let want: Vec<u64> = model.entries.iter()
                            .filter(|e| e.2 && e.0 > pos)
                            .take(n as usize)
                            .map(|e| e.0)
                            .collect();
                        prop_assert_eq!(&got, &want);
                        if let Some(last) = got.last() {
                            model.cursors[c as usize] = Some(*last);
                        }
                    } else {
                        prop_assert!(m.read(&name, 1).is_err());
                    }
                }
                Op::Register(c, f) => {
                    let from = if seqno == 0 { 0 } else { u64::from(f) % (seqno + 1) };
                    match m.register_cursor(&format!("c{c}"), from).unwrap() {
                        Registration::InMemory { .. } => {
                            prop_assert!(from >= model.expelled_upto);
                            model.cursors[c as usize] = Some(from);
                        }
                        Registration::NeedsBackfill { oldest_seqno } => {
                            prop_assert!(from + 1 < oldest_seqno);
                            let front = m.checkpoints()[0].start_seqno;
                            prop_assert_eq!(front.max(model.expelled_upto + 1), oldest_seqno);
                        }
                    }
                }
                Op::Expel => {
                    let open = m.open_checkpoint_id();
                    let behind = m.cursors().iter().any(|c| c.checkpoint_id < open);
                    let (n, bytes) = m.expel_read_items();
                    let read_upto = model.cursors.iter().flatten().min().copied().unwrap_or(u64::MAX);
                    // Only live entries of the open checkpoint every cursor
                    // has read; all of them unless a cursor is still in an
                    // earlier checkpoint (then none).
                    let readable: Vec<usize> = model.entries.iter().enumerate()
                        .filter(|(_, e)| e.2 && e.3 == open && e.0 <= read_upto)
                        .map(|(i, _)| i)
                        .collect();
                    let want = if behind { 0 } else { readable.len() };
                    prop_assert_eq!(n, want, "expelled of {} (a cursor behind: {})", readable.len(), behind);
                    prop_assert_eq!(n == 0, bytes == 0);
                    if n > 0 {
                        for i in readable {
                            model.entries[i].2 = false;
                            model.expelled_upto = model.expelled_upto.max(model.entries[i].0);
                        }
                    }
                }
                Op::Remove(c) => {
                    let existed = m.remove_cursor(&format!("c{c}"));
                    prop_assert_eq!(existed, model.cursors[c as usize].is_some());
                    model.cursors[c as usize] = None;
                }
            }
            // Remaining counts are exact.
            for (c, pos) in model.cursors.iter().enumerate() {
                if let Some(pos) = pos {
                    let want = model.entries.iter().filter(|e| e.2 && e.0 > *pos).count();
                    prop_assert_eq!(m.remaining(&format!("c{c}")).unwrap(), want);
                }
            }
            // Exactly one open checkpoint, at the back; ids consecutive.
            let cks = m.checkpoints();
            prop_assert_eq!(cks.iter().filter(|c| c.open).count(), 1);
            prop_assert!(cks.last().unwrap().open);
            prop_assert!(cks.windows(2).all(|w| w[1].id == w[0].id + 1));
            // Held items are the live entries of the checkpoints still held.
            let oldest = cks[0].id;
            let live_held = model.entries.iter().filter(|e| e.2 && e.3 >= oldest).count();
            prop_assert_eq!(cks.iter().map(|c| c.items).sum::<usize>(), live_held);
            // The front checkpoint is open or needed by some cursor.
            let lowest = m.cursors().iter().map(|c| c.checkpoint_id).min();
            prop_assert!(cks[0].open || lowest.is_some_and(|l| l <= cks[0].id));
            // Memory accounting matches.
            prop_assert_eq!(cks.iter().map(|c| c.mem_bytes).sum::<usize>(), m.mem_bytes());
            prop_assert_eq!(mem.load(Ordering::Relaxed), m.mem_bytes());
        }
    }
}

/// Events as comparable strings.
fn describe(ev: tapkv_engine::EventRef<'_>) -> String {
    match ev.to_owned() {
        CursorEvent::CheckpointStart { id } => format!("start {id}"),
        CursorEvent::CheckpointEnd { id } => format!("end {id}"),
        CursorEvent::Item(i) => format!("{} @{}", String::from_utf8_lossy(i.key()), i.seqno()),
    }
}

proptest! {
    /// Reading closed runs without the manager (then the open checkpoint
    /// through `scan_on`) yields exactly what one `scan_on` yields, and
    /// ends at the same position.
    #[test]
    fn closed_runs_read_what_scan_on_reads(
        keys in proptest::collection::vec(0u8..12, 1..120),
        max_items in 2usize..9,
        budget in 1usize..20,
        read_first in 0usize..30,
    ) {
        let (mut m, _) = mgr(max_items);
        m.register_cursor("c", 0).unwrap();
        for (i, k) in keys.iter().enumerate() {
            m.queue(item(&format!("k{k}"), i as u64 + 1));
        }
        // Move the cursor part of the way first, maybe into a checkpoint.
        let first = m.peek("c", read_first, usize::MAX, None).unwrap();
        drop(m.advance("c", &first).unwrap());

        let mut whole = Vec::new();
        let expected = m
            .scan_on("c", None, usize::MAX, usize::MAX, None, None, |ev| whole.push(describe(ev)))
            .unwrap();

        let mut pieces = Vec::new();
        let mut after = None;
        loop {
            let run = m.closed_run("c", after.as_ref(), budget).unwrap();
            if run.is_empty() {
                break;
            }
            let p = run.scan(None, None, |ev| pieces.push(describe(ev)));
            after = Some(p);
        }
        let end = m
            .scan_on("c", after.as_ref(), usize::MAX, usize::MAX, None, None, |ev| {
                pieces.push(describe(ev))
            })
            .unwrap();
        prop_assert_eq!(&pieces, &whole);
        prop_assert_eq!(end.end_seqno(), expected.end_seqno());
        prop_assert_eq!(end.end_checkpoint_id(), expected.end_checkpoint_id());
        prop_assert_eq!(end.items, expected.items);
        drop(m.advance("c", end).unwrap());
        prop_assert_eq!(m.remaining("c").unwrap(), 0);
    }
}

#[test]
fn a_closed_run_is_unchanged_by_later_writes_and_stops_at_a_barrier() {
    let (mut m, _) = mgr(3);
    m.register_cursor("c", 0).unwrap();
    for s in 1..=7 {
        m.queue(item(&format!("k{s}"), s));
    }
    // Checkpoints 1 [1..3], 2 [4..6] closed; 3 [7] open.
    let run = m.closed_run("c", None, usize::MAX).unwrap();
    // Later writes (and de-duplication in the open checkpoint) do not
    // touch the run.
    m.queue(item("k7", 8));
    m.queue(item("k1", 9));
    let mut seen = Vec::new();
    let p = run.scan(None, None, |ev| seen.push(describe(ev)));
    assert_eq!(
        seen,
        [
            "start 1", "k1 @1", "k2 @2", "k3 @3", "end 1", "start 2", "k4 @4", "k5 @5", "k6 @6",
            "end 2"
        ]
    );
    assert_eq!((p.end_seqno(), p.end_checkpoint_id(), p.items), (6, 3, 6));
    assert!(p.at_checkpoint_boundary() && !p.blocked);

    let mut seen = Vec::new();
    let p = run.scan(Some(4), None, |ev| seen.push(describe(ev)));
    assert!(p.blocked, "stops at the barrier");
    assert_eq!(p.end_seqno(), 4);
    assert_eq!(seen.last().map(String::as_str), Some("k4 @4"));

    // A round limit stops it at the first boundary past it.
    let p = run.scan(None, Some((2, usize::MAX)), |_| {});
    assert_eq!((p.end_seqno(), p.end_checkpoint_id()), (3, 2));
    assert!(p.at_checkpoint_boundary());
}

/// A manager of 3-item checkpoints holding `k1..=k7`, and a scan of cursor
/// `c` through its closed checkpoints (to seqno 6), not yet committed.
fn scanned_but_not_committed() -> (CheckpointManager, tapkv_engine::CursorProgress) {
    let (mut m, _) = mgr(3);
    m.register_cursor("c", 0).unwrap();
    for s in 1..=7 {
        m.queue(item(&format!("k{s}"), s));
    }
    let run = m.closed_run("c", None, usize::MAX).unwrap();
    let p = run.scan(None, None, |_| {});
    assert_eq!(p.end_seqno(), 6);
    (m, p)
}

#[test]
fn a_scan_from_an_earlier_registration_is_not_committed() {
    let (mut m, p) = scanned_but_not_committed();
    // The cursor is registered again (a new reader) before the old scan
    // commits: the old scan's events are not the new reader's.
    m.register_cursor("c", 2).unwrap();
    assert!(m.advance("c", p).is_err());
    assert!(m
        .scan_on("c", Some(&p), usize::MAX, usize::MAX, None, None, |_| {})
        .is_err());
    assert_eq!(
        m.remaining("c").unwrap(),
        5,
        "the new registration reads 3..=7"
    );
}

#[test]
fn a_scan_from_a_replaced_manager_is_not_committed_to_its_replacement() {
    // A partition reset replaces its manager; a cursor registered again on
    // the replacement is a new reader. Before, registrations were numbered
    // from 1 again, so an old scan matched the new cursor and moved it.
    let (m, p) = scanned_but_not_committed();
    // (Checkpoint ids from 1 again: the registration alone must tell.)
    let mut fresh = m.replacement(1, 0);
    fresh.register_cursor("c", 0).unwrap();
    for s in 1..=7 {
        fresh.queue(item(&format!("n{s}"), s));
    }
    assert!(fresh.advance("c", p).is_err());
    assert_eq!(fresh.remaining("c").unwrap(), 7, "the new reader reads all");
}

#[test]
fn a_stream_is_not_dropped_when_another_stream_still_holds_its_checkpoint() {
    // "parked" has read all of checkpoint 1 and waits to step into 2, so
    // it is kept; "behind" alone frees nothing, since "parked" still holds
    // checkpoint 1. Before, checkpoint 1's bytes counted as freed and
    // "behind" was dropped for nothing (found by a review).
    let (mut m, _) = mgr(10);
    for c in ["lead", "parked", "behind"] {
        m.register_cursor(c, 0).unwrap();
    }
    assert!(m.set_droppable("parked") && m.set_droppable("behind"));
    m.queue(item("k1", 1));
    m.queue(item("k2", 2));
    m.read("parked", 10).unwrap();
    m.read("behind", 1).unwrap();
    m.create_checkpoint();
    m.read("lead", 10).unwrap();
    let (dropped, freed) = m.drop_cursors_behind("lead", 1);
    assert!(freed.is_empty());
    assert!(dropped.is_empty(), "dropped {dropped:?} and freed nothing");
    assert!(m.has_cursor("behind"));
    // Once "parked" has moved on, dropping "behind" frees checkpoint 1.
    m.read("parked", 10).unwrap();
    let (dropped, freed) = m.drop_cursors_behind("lead", 1);
    assert_eq!(dropped, vec!["behind".to_string()]);
    assert!(!freed.is_empty());
}

#[test]
fn only_droppable_cursors_behind_the_leader_are_dropped() {
    let (mut m, mem) = mgr(2);
    for c in [
        "lead",
        "slow-stream",
        "slow-user",
        "fast-stream",
        "mid-stream",
    ] {
        m.register_cursor(c, 0).unwrap();
    }
    for c in ["slow-stream", "fast-stream", "mid-stream"] {
        assert!(m.set_droppable(c));
    }
    assert!(!m.set_droppable("nobody"));
    for s in 1..=6 {
        m.queue(item(&format!("k{s}"), s));
    }
    // Checkpoints 1,2 closed, 3 open (items 5, 6).
    m.read("lead", 5).unwrap();
    m.read("fast-stream", 6).unwrap();
    m.read("mid-stream", 3).unwrap();
    assert_eq!(m.checkpoints().len(), 3);
    let before = m.mem_bytes();

    // The user's cursor holds checkpoint 1: dropping streams frees nothing.
    let (dropped, freed) = m.drop_cursors_behind("lead", 1);
    assert!(dropped.is_empty() && freed.is_empty());
    assert_eq!(m.mem_bytes(), before);
    assert!(m.remove_cursor("slow-user"));

    // Less than asked for would be freed: nothing is dropped.
    let (dropped, _) = m.drop_cursors_behind("lead", before);
    assert!(dropped.is_empty());
    assert!(m.has_cursor("slow-stream"));

    let checkpoint_of = |m: &CheckpointManager, name: &str| {
        m.cursors()
            .into_iter()
            .find(|c| c.name == name)
            .map(|c| c.checkpoint_id)
    };
    let lead_checkpoint = checkpoint_of(&m, "lead").unwrap();
    let mid_checkpoint = checkpoint_of(&m, "mid-stream").unwrap();
    let (mut dropped, freed) = m.drop_cursors_behind("lead", 1);
    dropped.sort();
    let mut want = vec!["slow-stream"];
    if mid_checkpoint < lead_checkpoint {
        want.insert(0, "mid-stream");
    }
    assert_eq!(dropped, want);
    assert!(!freed.is_empty());
    drop(freed);
    // The leader and the stream ahead of it stay.
    assert!(m.has_cursor("lead") && m.has_cursor("fast-stream"));
    let ids: Vec<u64> = m.checkpoints().iter().map(|c| c.id).collect();
    assert_eq!(ids.last(), Some(&3));
    assert!(m.mem_bytes() < before);
    assert_eq!(mem.load(Ordering::Relaxed), m.mem_bytes());
    // Nothing left that only streams hold.
    assert!(m.drop_cursors_behind("lead", 1).0.is_empty());
    assert!(m.drop_cursors_behind("no-such-leader", 0).0.is_empty());
}

#[test]
fn expelling_frees_only_what_every_cursor_has_read() {
    let (mut m, mem) = mgr(100);
    m.register_cursor("slow", 0).unwrap();
    m.register_cursor("fast", 0).unwrap();
    for s in 1..=6 {
        m.queue(item(&format!("k{s}"), s));
    }
    // Nothing is read yet.
    assert_eq!(m.expel_read_items(), (0, 0));
    m.read("fast", 6).unwrap();
    m.read("slow", 2).unwrap();
    let before = m.mem_bytes();
    let (n, bytes) = m.expel_read_items();
    assert_eq!(n, 2);
    assert_eq!(m.mem_bytes(), before - bytes);
    assert_eq!(mem.load(Ordering::Relaxed), m.mem_bytes());
    assert_eq!(m.checkpoints()[0].items, 4);
    // Remaining counts are unchanged; the slow cursor reads on from seqno 3.
    assert_eq!(m.remaining("slow").unwrap(), 4);
    assert_eq!(m.remaining("fast").unwrap(), 0);
    // A second call has nothing new to expel.
    assert_eq!(m.expel_read_items(), (0, 0));
    // A key expelled and written again is queued afresh, then de-duplicated
    // as usual.
    assert!(!m.queue(item("k1", 7)));
    assert!(m.queue(item("k1", 8)));
    let b = m.read("slow", 100).unwrap();
    assert_eq!(
        items_of(&b.events),
        vec![
            ("k3".into(), 3),
            ("k4".into(), 4),
            ("k5".into(), 5),
            ("k6".into(), 6),
            ("k1".into(), 8)
        ]
    );
    // Nothing before the expelled seqnos can be served from memory.
    assert_eq!(
        m.register_cursor("late", 1).unwrap(),
        Registration::NeedsBackfill { oldest_seqno: 3 }
    );
    assert!(matches!(
        m.register_cursor("late", 2).unwrap(),
        Registration::InMemory { .. }
    ));
    // A cursor still in an earlier checkpoint holds everything after it.
    m.remove_cursor("late");
    m.register_cursor("behind", 7).unwrap();
    m.create_checkpoint();
    m.queue(item("k9", 9));
    m.read("fast", 100).unwrap();
    m.read("slow", 100).unwrap();
    assert_eq!(
        m.cursors()
            .iter()
            .find(|c| c.name == "behind")
            .unwrap()
            .checkpoint_id,
        1
    );
    assert_eq!(m.expel_read_items(), (0, 0));
    m.read("behind", 100).unwrap();
    assert_eq!(m.expel_read_items().0, 1);
}

/// A cursor's remaining bytes are the checkpoint memory of the live items
/// it has still to read, across checkpoints and de-duplication.
#[test]
fn remaining_bytes_follow_reads_closes_and_dedup() {
    let (mut m, mem) = mgr(3);
    m.register_cursor("c", 0).unwrap();
    let size = |k: &str, s: u64| item(k, s).mem_size();
    let at = |m: &CheckpointManager| {
        let c = m.cursors().into_iter().find(|c| c.name == "c").unwrap();
        (c.remaining, c.remaining_bytes)
    };
    for (i, k) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        m.queue(item(k, i as u64 + 1));
    }
    // Closed at 3 items: [a b c] [d e].
    let all: usize = ["a", "b", "c", "d", "e"]
        .iter()
        .enumerate()
        .map(|(i, k)| size(k, i as u64 + 1))
        .sum();
    assert_eq!(at(&m), (5, all));
    assert_eq!(all, mem.load(std::sync::atomic::Ordering::Relaxed));
    // De-duplication replaces `e` in the open checkpoint.
    m.queue(item("e", 6));
    let all = all - size("e", 5) + size("e", 6);
    assert_eq!(at(&m), (5, all));
    // Reading two leaves the rest of the first checkpoint and the second.
    let batch = m.read("c", 2).unwrap();
    assert_eq!(items_of(&batch.events).len(), 2);
    assert_eq!(at(&m), (3, all - size("a", 1) - size("b", 2)));
    m.read("c", 10).unwrap();
    assert_eq!(at(&m), (0, 0));
}

/// Removing (or re-registering) a cursor hands back the checkpoints only it
/// held, so the engine drops them after releasing the partition's lock
/// (`Engine::remove_cursor`); before, they were freed under it, and a slow
/// replica's stream cursor could hold hundreds of thousands of entries.
#[test]
fn removing_a_cursor_hands_back_what_it_alone_held() {
    let (mut m, mem) = mgr(2);
    m.register_cursor("slow", 0).unwrap();
    m.register_cursor("fast", 0).unwrap();
    for s in 1..=6 {
        m.queue(item(&format!("k{s}"), s));
    }
    m.read("fast", 6).unwrap();
    // Re-registering the slow cursor further on frees checkpoint 1.
    let (_, freed) = m.register_cursor_freeing("slow", 3).unwrap();
    assert_eq!(freed.len(), 1);
    let (existed, freed) = m.remove_cursor_freeing("slow");
    assert!(existed);
    assert_eq!(freed.len(), 1, "checkpoint 2");
    let ids: Vec<u64> = m.checkpoints().iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![3]);
    // Accounted as freed at once; the entries go when the caller drops them.
    assert_eq!(mem.load(Ordering::Relaxed), m.mem_bytes());
    drop(freed);
    let (existed, freed) = m.remove_cursor_freeing("slow");
    assert!(!existed && freed.is_empty());
}

/// Nothing lies after the largest seqno, so memory holds it all; `from + 1`
/// overflowed there (a panic in a debug build, `false` in a release one,
/// through the public `Engine::backfill_end`).
#[test]
fn memory_holds_everything_after_the_largest_seqno() {
    let (mut m, _) = mgr(2);
    for s in 1..=6 {
        m.queue(item(&format!("k{s}"), s));
    }
    assert!(m.holds_after(u64::MAX));
    // (Closed checkpoints no cursor needs are freed: not from 0.)
    assert!(!m.holds_after(0));
}

/// One `read_cursor_within` call reads for one registration of its cursor:
/// re-registered between two pieces of the open checkpoint (here from the
/// visitor itself, while the lock is released), the call fails instead of
/// handing the new registration's events to the old reader and moving the
/// new reader's cursor past them (found by a review).
#[test]
fn a_read_stops_when_its_cursor_is_registered_again_between_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let e = tapkv_engine::Engine::builder(dir.path())
        .partitions(1)
        .open()
        .unwrap();
    for i in 0..300u64 {
        e.set(
            format!("k{i}").as_bytes(),
            "v",
            tapkv_engine::WriteOptions::default(),
        )
        .unwrap();
    }
    e.register_cursor(0, "c", 0).unwrap();
    let mut seen = Vec::new();
    let mut registered_again = false;
    let read = e.read_cursor_within(0, "c", (1_000, usize::MAX), |ev| {
        if let tapkv_engine::EventRef::Item(item) = ev {
            seen.push(item.seqno());
        }
        if !registered_again && seen.len() == 10 {
            registered_again = true;
            e.register_cursor(0, "c", 0).unwrap();
        }
    });
    assert!(read.is_err(), "{read:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // The new registration still has everything to read.
    assert_eq!(e.cursor_info(0, "c").unwrap().unwrap().remaining, 300);
}

/// Two readers of one cursor split its events: one that reads a closed
/// checkpoint while another consumes the same events (here from the
/// visitor itself, while the lock is released) fails instead of committing
/// them a second time. Before, both calls succeeded with the same items,
/// and the cursor was told again that it entered the next checkpoint
/// (found by a review).
#[test]
fn a_closed_checkpoint_read_by_another_reader_meanwhile_is_not_handed_out_twice() {
    use tapkv_engine::{CursorEvent, EventRef};
    let dir = tempfile::tempdir().unwrap();
    let e = tapkv_engine::Engine::builder(dir.path())
        .partitions(1)
        .open()
        .unwrap();
    e.register_cursor(0, "c", 0).unwrap();
    for i in 0..5u64 {
        e.set(
            format!("k{i}").as_bytes(),
            "v",
            tapkv_engine::WriteOptions::default(),
        )
        .unwrap();
    }
    let closed = e.create_checkpoint(0).unwrap() - 1;
    let (mut first, mut other) = (Vec::new(), Vec::new());
    let read = e.read_cursor_within(0, "c", (10, usize::MAX), |ev| {
        if let EventRef::Item(item) = ev {
            first.push(item.seqno());
        }
        if first.len() == 1 && other.is_empty() {
            let batch = e.read_cursor(0, "c", 10).unwrap();
            for ev in batch.events {
                if let CursorEvent::Item(item) = ev {
                    other.push(item.seqno());
                }
            }
        }
    });
    assert_eq!(other, [1, 2, 3, 4, 5]);
    assert!(
        matches!(read, Err(tapkv_engine::Error::WrongState(_))),
        "{read:?}: the same items went to both readers"
    );
    // The cursor stays where the other reader left it: in the next
    // checkpoint, told so once.
    let next = e.read_cursor(0, "c", 10).unwrap();
    assert!(
        !next
            .events
            .iter()
            .any(|ev| matches!(ev, CursorEvent::CheckpointStart { id } if *id > closed)),
        "{:?}",
        next.events
    );
    assert_eq!(e.cursor_info(0, "c").unwrap().unwrap().remaining, 0);
}
