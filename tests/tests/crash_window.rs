//! Crash safety of online-update windows: a `tapkv shell --data DIR` child
//! runs a seeded-random schedule of writes outside windows, flushes, START,
//! writes inside windows (overwrites, deletes, new keys, some 1.2 MB values,
//! checkpoints closed inside the window, flushes while it is open),
//! COMPLETE and REVERT, and is killed with SIGKILL after a seeded-random
//! number of answers, sometimes with commands still in flight. After each
//! kill the directory is reopened and checked against a model of what
//! docs/online-update.md and docs/shell.md promise:
//!
//! - the disk of each partition is its history cut at one point: every
//!   write outside a window and every completed window up to the cut, none
//!   after it; the cut is at or after the last acknowledged `flush`
//!   (`flush` answers once everything before it is synced; on a partition
//!   with a window open, everything before the window);
//! - a window that was not completed (open at the kill or reverted) leaves
//!   nothing on disk: each key it touched has its pre-window value, or is
//!   absent if it was absent before;
//! - a completed window is on disk whole or not at all ("written whole or
//!   not at all"), and whole once a later `flush` was acknowledged (a
//!   COMPLETE alone is a Memory write: the docs do not promise it survives a
//!   crash). A COMPLETE sent but not answered before the kill may or may not
//!   have happened: its window is whole or absent;
//! - a window whose START was answered and that was still open at the kill
//!   is recorded on disk and reported lost at the next open; one whose
//!   COMPLETE or REVERT was answered is not;
//! - seqnos and checkpoint ids never go back: every answer's seqno is above
//!   every seqno acknowledged before (in this process or an earlier one),
//!   every item read back has the seqno its write was acknowledged with, and
//!   no partition is torn (nothing on disk above its persisted high seqno).
//!
//! Reads (`get`) in the running shell are checked against the model too
//! (REVERT restores the pre-window values, evicted ones included).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write as _;
use std::sync::mpsc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tapkv_engine::{partition_of, DiskView, Engine, Error, WriteOptions};
use tapkv_tests::{assert_killed_and_not_torn, Proc};

const SEED: u64 = 0x5eed_c0de;
const ROUNDS: u64 = 8;
const POOL: usize = 160;
const BIG_VALUE: usize = 1_200_000;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A key's state: the index of the version it holds, `None` when absent.
type State = BTreeMap<String, Option<usize>>;

/// A value the model knows: written in this round, or read back at the
/// round's start (its seqno known then).
struct Version {
    value: String,
    /// The seqno it was acknowledged with (unknown if never answered).
    seqno: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Open,
    Completed,
    Reverted,
}

struct Window {
    partition: u16,
    id: Option<u64>,
    /// Each touched key's state at its first mutation in the window.
    pre: State,
    /// The window's mutations in order.
    ops: Vec<(String, Option<usize>)>,
    /// Versions written inside the window.
    written: Vec<usize>,
    outcome: Outcome,
    start_acked: bool,
    end_acked: bool,
    acked_ops: usize,
}

/// One step of a partition's committed history: a mutation outside any
/// window, or a whole completed window.
struct Unit {
    ops: Vec<(String, Option<usize>)>,
    window: Option<usize>,
}

/// What an answer must be, and what it tells the model.
enum Expect {
    Write {
        version: usize,
        partition: u16,
        window: Option<usize>,
    },
    Delete {
        partition: u16,
        window: Option<usize>,
    },
    NotFound,
    Get(Option<String>),
    Evict,
    Start {
        window: usize,
    },
    Complete {
        window: usize,
    },
    Revert {
        window: usize,
        touched: usize,
        min_restored: usize,
        max_removed: usize,
    },
    Flush {
        open: Vec<usize>,
        durable: Vec<usize>,
    },
    Checkpoint {
        partition: u16,
    },
}

/// Facts that outlive a process: the directory's contents as last read
/// back, and the highest numbers handed out.
struct Tracker {
    parts: u16,
    pool: Vec<String>,
    by_part: Vec<Vec<String>>,
    /// Every key ever written, with its value and seqno at the last reopen.
    base: BTreeMap<String, Option<(String, u64)>>,
    max_seqno: Vec<u64>,
    max_ckpt: Vec<u64>,
}

/// The model of one process's life.
struct Round {
    round: u64,
    parts: u16,
    versions: Vec<Version>,
    base: State,
    current: State,
    units: Vec<Vec<Unit>>,
    /// Per partition: how many units an acknowledged flush covered.
    durable: Vec<usize>,
    windows: Vec<Window>,
    /// Open windows by partition (as sent, answered or not).
    open: BTreeMap<u16, usize>,
    next_value: u64,
    next_fresh: u64,
    big_left: u32,
    /// Whether the last answer was a COMPLETE's.
    just_completed: bool,
}

fn state(s: &State, key: &str) -> Option<usize> {
    s.get(key).copied().flatten()
}

impl Round {
    fn new(round: u64, t: &Tracker) -> Round {
        let mut versions = Vec::new();
        let mut base = State::new();
        for (k, v) in &t.base {
            let idx = v.as_ref().map(|(value, seqno)| {
                versions.push(Version {
                    value: value.clone(),
                    seqno: Some(*seqno),
                });
                versions.len() - 1
            });
            base.insert(k.clone(), idx);
        }
        let n = usize::from(t.parts);
        Round {
            round,
            parts: t.parts,
            versions,
            current: base.clone(),
            base,
            units: (0..n).map(|_| Vec::new()).collect(),
            durable: vec![0; n],
            windows: Vec::new(),
            open: BTreeMap::new(),
            next_value: 0,
            next_fresh: 0,
            big_left: 5,
            just_completed: false,
        }
    }

    fn part(&self, key: &str) -> u16 {
        partition_of(key.as_bytes(), self.parts)
    }

    fn describe(&self, v: Option<usize>) -> String {
        match v {
            None => "absent".into(),
            Some(i) => {
                let ver = &self.versions[i];
                let tag = ver.value.split('-').next().unwrap_or("");
                format!("{tag} (len {}, seqno {:?})", ver.value.len(), ver.seqno)
            }
        }
    }

    fn new_value(&mut self, rng: &mut StdRng, in_window: bool) -> String {
        self.next_value += 1;
        let len = if in_window && self.big_left > 0 && rng.gen_bool(0.06) {
            self.big_left -= 1;
            BIG_VALUE
        } else if rng.gen_bool(0.85) {
            rng.gen_range(0..48)
        } else {
            rng.gen_range(48..3000)
        };
        let fill = char::from(b'a' + (self.next_value % 26) as u8);
        format!(
            "r{}v{}-{}",
            self.round,
            self.next_value,
            fill.to_string().repeat(len)
        )
    }

    /// Applies a mutation the shell will execute (in order).
    fn mutate(&mut self, key: &str, new: Option<usize>) -> Option<usize> {
        let p = self.part(key);
        let before = state(&self.current, key);
        let window = self.open.get(&p).copied();
        match window {
            Some(w) => {
                let win = &mut self.windows[w];
                win.pre.entry(key.to_owned()).or_insert(before);
                win.ops.push((key.to_owned(), new));
                win.written.extend(new);
            }
            None => self.units[usize::from(p)].push(Unit {
                ops: vec![(key.to_owned(), new)],
                window: None,
            }),
        }
        self.current.insert(key.to_owned(), new);
        window
    }

    fn pick_key(&mut self, rng: &mut StdRng, t: &Tracker) -> String {
        if !self.open.is_empty() && rng.gen_bool(0.7) {
            let ps: Vec<u16> = self.open.keys().copied().collect();
            let p = ps[rng.gen_range(0..ps.len())];
            let keys = &t.by_part[usize::from(p)];
            if keys.is_empty() || rng.gen_bool(0.12) {
                // A key no process has seen, created inside the window.
                loop {
                    self.next_fresh += 1;
                    let k = format!("new-{}-{}", self.round, self.next_fresh);
                    if self.part(&k) == p {
                        return k;
                    }
                }
            }
            keys[rng.gen_range(0..keys.len())].clone()
        } else {
            t.pool[rng.gen_range(0..t.pool.len())].clone()
        }
    }

    /// The next one or two commands of the schedule, applied to the model
    /// as the shell will execute them.
    fn generate(&mut self, rng: &mut StdRng, t: &Tracker) -> Vec<(String, Expect)> {
        loop {
            let r = rng.gen_range(0..100);
            if r < 65 {
                let key = self.pick_key(rng, t);
                let p = self.part(&key);
                let cur = state(&self.current, &key);
                if cur.is_some() && rng.gen_bool(0.25) {
                    let window = self.mutate(&key, None);
                    return vec![(
                        format!("del {key}"),
                        Expect::Delete {
                            partition: p,
                            window,
                        },
                    )];
                }
                if cur.is_none() && rng.gen_bool(0.15) {
                    return vec![(format!("del {key}"), Expect::NotFound)];
                }
                let op = if cur.is_none() && rng.gen_bool(0.5) {
                    "add"
                } else {
                    "set"
                };
                let value = self.new_value(rng, self.open.contains_key(&p));
                let line = format!("{op} {key} {value}");
                self.versions.push(Version { value, seqno: None });
                let version = self.versions.len() - 1;
                let window = self.mutate(&key, Some(version));
                return vec![(
                    line,
                    Expect::Write {
                        version,
                        partition: p,
                        window,
                    },
                )];
            }
            if r < 75 {
                let key = self.pick_key(rng, t);
                let cur = state(&self.current, &key);
                // Answers stay short (a kill that cuts one before its newline
                // leaves a partial line, which the reader still parses).
                if cur.is_some_and(|v| self.versions[v].value.len() > 512) {
                    continue;
                }
                let want = cur.map(|v| self.versions[v].value.clone());
                return vec![(format!("get {key}"), Expect::Get(want))];
            }
            if r < 83 {
                return vec![self.flush()];
            }
            if r < 86 {
                let key = self.pick_key(rng, t);
                if state(&self.current, &key).is_none() {
                    continue;
                }
                return vec![(format!("evict {key}"), Expect::Evict)];
            }
            if r < 89 {
                let p = match self.open.keys().next() {
                    Some(&p) if rng.gen_bool(0.7) => p,
                    _ => rng.gen_range(0..self.parts),
                };
                return vec![(
                    format!("checkpoint {p}"),
                    Expect::Checkpoint { partition: p },
                )];
            }
            // Window control.
            if self.open.is_empty() || (self.open.len() < 2 && rng.gen_bool(0.2)) {
                let p = rng.gen_range(0..self.parts);
                if self.open.contains_key(&p) || t.by_part[usize::from(p)].is_empty() {
                    continue;
                }
                self.windows.push(Window {
                    partition: p,
                    id: None,
                    pre: State::new(),
                    ops: Vec::new(),
                    written: Vec::new(),
                    outcome: Outcome::Open,
                    start_acked: false,
                    end_acked: false,
                    acked_ops: 0,
                });
                let window = self.windows.len() - 1;
                self.open.insert(p, window);
                return vec![(format!("update start {p}"), Expect::Start { window })];
            }
            let ps: Vec<u16> = self.open.keys().copied().collect();
            let p = ps[rng.gen_range(0..ps.len())];
            let w = self.open.remove(&p).expect("open window");
            if rng.gen_bool(0.75) {
                self.windows[w].outcome = Outcome::Completed;
                let ops = self.windows[w].ops.clone();
                self.units[usize::from(p)].push(Unit {
                    ops,
                    window: Some(w),
                });
                let mut out = vec![(
                    format!("update complete {p}"),
                    Expect::Complete { window: w },
                )];
                if rng.gen_bool(0.5) {
                    out.push(self.flush());
                }
                return out;
            }
            self.windows[w].outcome = Outcome::Reverted;
            let pre = self.windows[w].pre.clone();
            let touched = pre.len();
            let min_restored = pre.values().filter(|v| v.is_some()).count();
            let max_removed = pre
                .iter()
                .filter(|(k, v)| v.is_none() && state(&self.current, k).is_some())
                .count();
            for (k, v) in pre {
                self.current.insert(k, v);
            }
            return vec![(
                format!("update revert {p}"),
                Expect::Revert {
                    window: w,
                    touched,
                    min_restored,
                    max_removed,
                },
            )];
        }
    }

    /// Generates commands until `pending` holds at least `n`; returns the
    /// new ones' lines.
    fn batch(
        &mut self,
        rng: &mut StdRng,
        t: &Tracker,
        pending: &mut VecDeque<(String, Expect)>,
        n: usize,
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        let want = pending.len() + n;
        while pending.len() < want {
            for (line, e) in self.generate(rng, t) {
                bytes.extend_from_slice(line.as_bytes());
                bytes.push(b'\n');
                pending.push_back((line, e));
            }
        }
        bytes
    }

    fn flush(&self) -> (String, Expect) {
        (
            "flush".into(),
            Expect::Flush {
                open: self.open.values().copied().collect(),
                durable: self.units.iter().map(Vec::len).collect(),
            },
        )
    }

    /// Checks an answer and records what it acknowledges.
    fn ack(&mut self, t: &mut Tracker, cmd: &str, e: &Expect, line: &str) {
        let round = self.round;
        let ctx = || {
            let c: String = cmd.chars().take(80).collect();
            format!("round {round}: command {c:?} answered {line:?}")
        };
        let words: Vec<&str> = line.split(' ').collect();
        self.just_completed = matches!(e, Expect::Complete { .. });
        let num = |i: usize| -> u64 {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("{}: no number at word {i}", ctx()))
        };
        let seqno_ack = |t: &mut Tracker, partition: u16, n: usize| -> u64 {
            assert!(
                words.len() == n && words[..2] == ["OK", "PARTITION"] && words[3] == "SEQNO",
                "{}",
                ctx()
            );
            assert_eq!(num(2), u64::from(partition), "{}", ctx());
            let s = num(4);
            let max = &mut t.max_seqno[usize::from(partition)];
            assert!(
                s > *max,
                "{}: seqno went back (acknowledged up to {max})",
                ctx()
            );
            *max = s;
            s
        };
        match e {
            Expect::Write {
                version,
                partition,
                window,
            } => {
                let s = seqno_ack(t, *partition, 7);
                self.versions[*version].seqno = Some(s);
                if let Some(w) = window {
                    self.windows[*w].acked_ops += 1;
                }
            }
            Expect::Delete { partition, window } => {
                seqno_ack(t, *partition, 5);
                if let Some(w) = window {
                    self.windows[*w].acked_ops += 1;
                }
            }
            Expect::NotFound => assert_eq!(line, "NOT_FOUND", "{}", ctx()),
            Expect::Get(None) => assert_eq!(line, "NOT_FOUND", "{}", ctx()),
            Expect::Get(Some(v)) => {
                assert!(
                    line.strip_prefix("VALUE ") == Some(v.as_str()),
                    "{}: a read in the running shell disagrees with the model",
                    ctx()
                )
            }
            Expect::Evict => assert!(
                line == "OK EVICTED" || line.starts_with("ERROR wrong_state: "),
                "{}",
                ctx()
            ),
            Expect::Start { window } => {
                assert!(
                    words.len() == 3 && words[..2] == ["OK", "CHECKPOINT"],
                    "{}",
                    ctx()
                );
                let id = num(2);
                let win = &mut self.windows[*window];
                let max = &mut t.max_ckpt[usize::from(win.partition)];
                assert!(id > *max, "{}: checkpoint id went back (seen {max})", ctx());
                *max = id;
                win.id = Some(id);
                win.start_acked = true;
            }
            Expect::Complete { window } => {
                let win = &mut self.windows[*window];
                assert_eq!(
                    line,
                    format!("OK CHECKPOINT {}", win.id.unwrap()),
                    "{}",
                    ctx()
                );
                win.end_acked = true;
            }
            Expect::Revert {
                window,
                touched,
                min_restored,
                max_removed,
            } => {
                let win = &mut self.windows[*window];
                assert!(
                    words.len() == 7
                        && words[..2] == ["OK", "CHECKPOINT"]
                        && words[3] == "REMOVED"
                        && words[5] == "RESTORED",
                    "{}",
                    ctx()
                );
                assert_eq!(Some(num(2)), win.id, "{}", ctx());
                let (removed, restored) = (num(4) as usize, num(6) as usize);
                assert!(
                    removed <= *max_removed
                        && restored >= *min_restored
                        && removed + restored <= *touched,
                    "{}: {touched} keys touched, {min_restored} present before, \
                     at most {max_removed} to remove",
                    ctx()
                );
                win.end_acked = true;
            }
            Expect::Flush { open, durable } => {
                let want = if open.is_empty() {
                    "OK".to_owned()
                } else {
                    let list: Vec<String> = open
                        .iter()
                        .map(|&w| {
                            let win = &self.windows[w];
                            format!("{}:{}", win.partition, win.id.unwrap())
                        })
                        .collect();
                    format!("OK NOT_FLUSHED_WINDOWS {}", list.join(","))
                };
                assert_eq!(line, want, "{}", ctx());
                for (d, &n) in self.durable.iter_mut().zip(durable) {
                    *d = (*d).max(n);
                }
            }
            Expect::Checkpoint { partition } => {
                assert!(
                    words.len() == 3 && words[..2] == ["OK", "CHECKPOINT"],
                    "{}",
                    ctx()
                );
                let id = num(2);
                let max = &mut t.max_ckpt[usize::from(*partition)];
                assert!(id > *max, "{}: checkpoint id went back (seen {max})", ctx());
                *max = id;
            }
        }
    }

    /// Whether the last answer left a window open (START answered, its end
    /// not) with at least one answered write in it.
    fn inside_acked_window(&self) -> bool {
        self.windows
            .iter()
            .any(|w| w.start_acked && !w.end_acked && w.acked_ops > 0)
    }

    /// How `key` changed in this round, for failure messages.
    fn history(&self, key: &str) -> String {
        let p = usize::from(self.part(key));
        let mut out = vec![format!("start: {}", self.describe(state(&self.base, key)))];
        for (c, u) in self.units[p].iter().enumerate() {
            for (k, v) in &u.ops {
                if k == key {
                    let how = match u.window {
                        None => "outside windows".to_owned(),
                        Some(w) => format!("in completed window {:?}", self.windows[w].id),
                    };
                    out.push(format!("unit {c} {how}: {}", self.describe(*v)));
                }
            }
        }
        for w in &self.windows {
            if w.outcome != Outcome::Completed && w.pre.contains_key(key) {
                out.push(format!(
                    "{:?} window {:?} (START answered: {}, end answered: {}) wrote {}",
                    w.outcome,
                    w.id,
                    w.start_acked,
                    w.end_acked,
                    w.ops
                        .iter()
                        .filter(|(k, _)| k == key)
                        .map(|(_, v)| self.describe(*v))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        out.join("; ")
    }
}

type Observed = BTreeMap<String, Option<(String, u64)>>;

fn matches(r: &Round, want: Option<usize>, got: &Option<(String, u64)>) -> bool {
    match (want, got) {
        (None, None) => true,
        (Some(i), Some((value, seqno))) => {
            let v = &r.versions[i];
            v.value == *value && v.seqno.is_none_or(|s| s == *seqno)
        }
        _ => false,
    }
}

fn describe_observed(got: &Option<(String, u64)>) -> String {
    match got {
        None => "absent".into(),
        Some((v, s)) => format!(
            "{} (len {}, seqno {s})",
            v.split('-').next().unwrap_or(""),
            v.len()
        ),
    }
}

/// Checks the reopened directory's keys against the model.
/// Returns whether the disk holds less than everything committed.
fn check_partition(r: &Round, p: u16, observed: &Observed) -> bool {
    let pi = usize::from(p);
    let keys: Vec<&String> = observed.keys().filter(|k| r.part(k) == p).collect();
    // Uncompleted windows leave nothing on disk (values are unique).
    for w in r.windows.iter().filter(|w| w.partition == p) {
        if w.outcome == Outcome::Completed {
            continue;
        }
        for &v in &w.written {
            let key = w
                .ops
                .iter()
                .find(|(_, x)| *x == Some(v))
                .map(|(k, _)| k)
                .unwrap();
            if let Some((value, _)) = &observed[key] {
                assert!(
                    *value != r.versions[v].value,
                    "round {}: {key} holds a value of window {:?} after SIGKILL, which was \
                     {:?} (START answered: {}, end answered: {}); pre-window state {}; \
                     history: {}",
                    r.round,
                    w.id,
                    w.outcome,
                    w.start_acked,
                    w.end_acked,
                    r.describe(w.pre[key]),
                    r.history(key)
                );
            }
        }
    }
    // The partition's states at every allowed cut.
    let units = &r.units[pi];
    let floor = r.durable[pi];
    let mut s: State = keys
        .iter()
        .map(|k| ((*k).clone(), state(&r.base, k)))
        .collect();
    let mut cuts: Vec<(usize, State)> = Vec::new();
    for c in 0..=units.len() {
        if c >= floor {
            cuts.push((c, s.clone()));
        }
        if let Some(u) = units.get(c) {
            for (k, v) in &u.ops {
                s.insert(k.clone(), *v);
            }
        }
    }
    // Each key on its own: one of its values at an allowed cut.
    for k in &keys {
        let got = &observed[*k];
        assert!(
            cuts.iter().any(|(_, st)| matches(r, st[*k], got)),
            "round {}: partition {p} key {k} is {} after SIGKILL; allowed: [{}] (units {floor}..={} \
             of this round; an acknowledged flush covered the first {floor}); history: {}",
            r.round,
            describe_observed(got),
            cuts.iter()
                .map(|(c, st)| format!("cut {c}: {}", r.describe(st[*k])))
                .collect::<Vec<_>>()
                .join(", "),
            units.len(),
            r.history(k)
        );
    }
    // All keys together: one cut (a completed window whole or not at all).
    let best = cuts
        .iter()
        .map(|(c, st)| {
            let bad: Vec<&String> = keys
                .iter()
                .copied()
                .filter(|k| !matches(r, st[*k], &observed[*k]))
                .collect();
            (c, bad)
        })
        .min_by_key(|(_, bad)| bad.len())
        .unwrap();
    assert!(
        best.1.is_empty(),
        "round {}: partition {p} is not its history cut at one point (torn window?); nearest cut \
         {} differs in {}",
        r.round,
        best.0,
        best.1
            .iter()
            .map(|k| format!(
                "{k}: disk {} vs {}; history: {}",
                describe_observed(&observed[*k]),
                r.describe(cuts.iter().find(|(c, _)| c == best.0).unwrap().1[*k]),
                r.history(k)
            ))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    *best.0 < units.len()
}

#[test]
fn windows_survive_sigkill_as_the_docs_promise() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let parts = {
        let e = Engine::builder(dir.path()).open().unwrap();
        let n = e.num_partitions();
        e.close().unwrap();
        n
    };
    let pool: Vec<String> = (0..POOL).map(|i| format!("key-{i:03}")).collect();
    let mut by_part = vec![Vec::new(); usize::from(parts)];
    for k in &pool {
        by_part[usize::from(partition_of(k.as_bytes(), parts))].push(k.clone());
    }
    let mut t = Tracker {
        parts,
        pool,
        by_part,
        base: BTreeMap::new(),
        max_seqno: vec![0; usize::from(parts)],
        max_ckpt: vec![0; usize::from(parts)],
    };
    let (mut kills_in_window, mut kills_after_complete) = (0, 0);
    let (mut in_flight_total, mut windows_total, mut behind) = (0, 0, 0);
    for round in 0..ROUNDS {
        // Each round has its own seed: what it generates also depends on
        // what the previous kill left on disk.
        let mut rng = StdRng::seed_from_u64(SEED + round);
        let mut r = Round::new(round, &t);
        let kill_at: usize = rng.gen_range(40..600);
        // Where to kill from the kill_at-th answer on: at once (mode 0),
        // inside a window with an answered write (1), or just after a
        // COMPLETE's answer (2), while the flusher may be writing the window.
        let mode = round % 3;
        let (mut child, mut stdin) = Proc::spawn_piped(&["shell", "--data", &data]);
        // A thread writes the commands, so that only reading answers (with a
        // deadline) can wait on the shell, even when a big value fills the pipe.
        let (to_shell, batches) = mpsc::channel::<Vec<u8>>();
        let writer = std::thread::spawn(move || {
            for b in batches {
                if stdin.write_all(&b).is_err() {
                    break;
                }
            }
        });
        let mut pending: VecDeque<(String, Expect)> = VecDeque::new();
        let mut acked = 0usize;
        'run: loop {
            let batch = rng.gen_range(1..=6);
            to_shell
                .send(r.batch(&mut rng, &t, &mut pending, batch))
                .unwrap();
            while !pending.is_empty() {
                let line = child
                    .next_line(ANSWER_TIMEOUT)
                    .unwrap_or_else(|| panic!("round {round}: the shell exited early"));
                let (cmd, e) = pending.pop_front().unwrap();
                r.ack(&mut t, &cmd, &e, &line);
                acked += 1;
                if acked >= kill_at
                    && (mode == 0
                        || (mode == 1 && r.inside_acked_window())
                        || (mode == 2 && r.just_completed)
                        || acked >= kill_at + 2000)
                {
                    break 'run;
                }
            }
        }
        if r.inside_acked_window() {
            kills_in_window += 1;
        }
        if r.just_completed {
            kills_after_complete += 1;
        }
        // Sometimes more commands are in flight when the kill comes.
        if rng.gen_bool(0.5) {
            let n = rng.gen_range(1..=4);
            let _ = to_shell.send(r.batch(&mut rng, &t, &mut pending, n));
        }
        child.kill();
        // The pipe is closed: the writer ends.
        drop(to_shell);
        writer.join().unwrap();
        // Answers written before the kill count as acknowledged.
        for line in child.drain(Duration::from_secs(10)) {
            let (cmd, e) = pending
                .pop_front()
                .unwrap_or_else(|| panic!("round {round}: answer {line:?} to no command"));
            r.ack(&mut t, &cmd, &e, &line);
        }
        in_flight_total += pending.len();
        windows_total += r.windows.len();

        // The disk as the kill left it.
        let view = DiskView::open(dir.path()).unwrap();
        let disk = assert_killed_and_not_torn(&view, &format!("round {round}"));
        for w in &r.windows {
            let recorded = disk[usize::from(w.partition)]
                .open_window
                .as_ref()
                .map(|x| x.checkpoint_id);
            if w.start_acked && w.outcome == Outcome::Open {
                assert_eq!(
                    recorded, w.id,
                    "round {round}: window open at the kill is not recorded on disk"
                );
            }
            if w.end_acked {
                assert_ne!(
                    recorded, w.id,
                    "round {round}: window {:?} still recorded after its answered {:?}",
                    w.id, w.outcome
                );
            }
        }
        drop(view);

        // Reopen: an implicit revert of the open windows.
        let engine = Engine::builder(dir.path()).open().unwrap();
        let st = engine.stats().unwrap();
        assert!(st.recovered_from_crash);
        for (p, ps) in st.partitions.iter().enumerate() {
            assert!(
                ps.window.is_none(),
                "round {round}: window open after a reopen"
            );
            assert!(
                ps.high_seqno >= t.max_seqno[p],
                "round {round}: partition {p} high seqno {} below acknowledged {}",
                ps.high_seqno,
                t.max_seqno[p]
            );
            assert!(
                ps.open_checkpoint_id > t.max_ckpt[p],
                "round {round}: partition {p} checkpoint id {} not above {}",
                ps.open_checkpoint_id,
                t.max_ckpt[p]
            );
            t.max_ckpt[p] = ps.open_checkpoint_id;
        }
        for w in &r.windows {
            let lost = st.partitions[usize::from(w.partition)]
                .lost_windows
                .iter()
                .any(|x| Some(x.checkpoint_id) == w.id);
            if w.start_acked && w.outcome == Outcome::Open {
                assert!(
                    lost,
                    "round {round}: window {:?} open at the kill not reported lost",
                    w.id
                );
            }
            if w.end_acked {
                assert!(
                    !lost,
                    "round {round}: window {:?} reported lost after its answered {:?}",
                    w.id, w.outcome
                );
            }
        }
        let keys: BTreeSet<String> = r
            .base
            .keys()
            .chain(r.current.keys())
            .chain(r.windows.iter().flat_map(|w| w.pre.keys()))
            .cloned()
            .collect();
        let mut observed = Observed::new();
        for k in keys {
            let got = match engine.get(k.as_bytes()) {
                Ok(item) => Some((
                    String::from_utf8(item.value().to_vec()).unwrap(),
                    item.meta.by_seqno,
                )),
                Err(Error::NotFound) => None,
                Err(e) => panic!("round {round}: get {k}: {e}"),
            };
            observed.insert(k, got);
        }
        for p in 0..parts {
            if check_partition(&r, p, &observed) {
                behind += 1;
            }
        }
        // New writes continue above every seqno acknowledged so far.
        for j in 0..64 {
            let res = engine
                .set(
                    format!("probe-{round}-{j}").as_bytes(),
                    "x",
                    WriteOptions::default(),
                )
                .unwrap();
            let max = &mut t.max_seqno[usize::from(res.partition)];
            assert!(
                res.seqno > *max,
                "round {round}: seqno {} reused (up to {max})",
                res.seqno
            );
            *max = res.seqno;
        }
        engine.close().unwrap();
        t.base = observed;
    }
    eprintln!(
        "{ROUNDS} rounds, {windows_total} windows, {kills_in_window} kills inside a window, \
         {kills_after_complete} just after a COMPLETE, {in_flight_total} commands unanswered \
         at kills, {behind} partitions found behind their last write"
    );
    assert!(
        kills_in_window >= 2 && kills_after_complete >= 2,
        "the schedule must kill inside windows and just after COMPLETEs"
    );
}
