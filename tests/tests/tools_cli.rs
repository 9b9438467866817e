//! The `tapkv` binary: kv, shell, load and admin commands on a data directory.

use std::time::Duration;

use tapkv_tests::run;

const T: Duration = Duration::from_secs(60);

/// Asserts that the data directory `d` was closed cleanly and holds
/// `items` live items (from `tapkv admin inspect --json`).
fn assert_clean_with_items(d: &str, items: u64) {
    let (ok, out, err) = run(&["admin", "inspect", "--data", d, "--json"], "", T);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["clean_shutdown"], true, "{out}");
    let held: u64 = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["items"].as_u64().unwrap())
        .sum();
    assert_eq!(held, items, "{out}");
}

#[test]
fn kv_set_get_del_and_missing_key_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, out, _) = run(
        &["kv", "set", "--data", d, "greeting", "hello world"],
        "",
        T,
    );
    assert!(ok);
    assert!(out.starts_with("OK "), "{out}");
    let (ok, out, _) = run(&["kv", "get", "--data", d, "greeting"], "", T);
    assert!(ok);
    assert_eq!(out, "hello world\n");
    let (ok, _, _) = run(
        &[
            "kv",
            "del",
            "--data",
            d,
            "greeting",
            "--durability",
            "persist",
        ],
        "",
        T,
    );
    assert!(ok);
    let (ok, out, err) = run(&["kv", "get", "--data", d, "greeting"], "", T);
    assert!(!ok, "missing key must exit non-zero");
    assert!(out.is_empty());
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn shell_answers_one_line_per_command_and_survives_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let long_key = "k".repeat(300);
    let script = format!(
        "set a 1\nset b two words\nget b\nget nope\nadd a 2\nset {long_key} v\nbogus\n\
         del a\nget a\nflush\ncheckpoints 0\ncursors 0\nstats\nrestart\nget b\ncheckpoints 99\n"
    );
    let (ok, out, err) = run(&["shell", "--data", d], &script, T);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 16, "{out}");
    assert!(lines[0].starts_with("OK PARTITION"));
    assert!(lines[1].starts_with("OK PARTITION"));
    assert_eq!(lines[2], "VALUE two words");
    assert_eq!(lines[3], "NOT_FOUND");
    assert!(lines[4].starts_with("ERROR exists:"), "{}", lines[4]);
    assert!(lines[5].starts_with("ERROR key_too_large:"), "{}", lines[5]);
    assert!(
        lines[6].starts_with("ERROR invalid_argument:"),
        "{}",
        lines[6]
    );
    assert!(lines[7].starts_with("OK PARTITION"));
    assert_eq!(lines[8], "NOT_FOUND");
    assert_eq!(lines[9], "OK");
    assert!(lines[10].starts_with("OK id="), "{}", lines[10]);
    assert!(lines[11].contains("persistence"), "{}", lines[11]);
    assert!(
        lines[12].contains("items=1") && lines[12].contains("dirty=0"),
        "{}",
        lines[12]
    );
    assert_eq!(lines[13], "OK RESTARTED ITEMS 1");
    assert_eq!(lines[14], "VALUE two words");
    assert!(
        lines[15].starts_with("ERROR no_such_partition:"),
        "{}",
        lines[15]
    );
}

/// `load` refuses a value size over the engine's limit before it opens (or
/// makes) the directory, as `kv set` does (before, it made a store first).
/// A KEY or VALUE starting with `-` goes after `--`.
#[test]
fn load_refuses_an_oversized_value_before_making_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("new");
    let d = data.to_str().unwrap();
    let (code, err) = tapkv_tests::run_status(
        &[
            "load",
            "--data",
            d,
            "--count",
            "1",
            "--value-size",
            "30000000",
        ],
        T,
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("value_too_large"), "{err}");
    assert!(!data.exists(), "the refused load made the directory");
    let (ok, _, err) = run(&["kv", "set", "--data", d, "--", "-k", "-5"], "", T);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["kv", "get", "--data", d, "--", "-k"], "", T);
    assert!(ok, "{err}");
    assert_eq!(out, "-5\n");
}

#[test]
fn load_then_admin_inspect_and_dump() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, out, err) = run(
        &[
            "load",
            "--data",
            d,
            "--count",
            "2000",
            "--threads",
            "2",
            "--value-size",
            "32",
        ],
        "",
        T,
    );
    assert!(ok, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("ops/s") && err.contains("p99"), "{err}");
    // Persist writes wait for a sync: the percentiles say so (the figures
    // are read back from the summary, so a histogram that dropped or
    // clamped them would show here).
    let (ok, _, err) = run(
        &[
            "load",
            "--data",
            d,
            "--count",
            "50",
            "--start",
            "100000",
            "--value-size",
            "32",
            "--durability",
            "persist",
        ],
        "",
        T,
    );
    assert!(ok, "{err}");
    let figure = |name: &str| -> f64 {
        let at = err
            .find(&format!(" {name} "))
            .unwrap_or_else(|| panic!("{err}"))
            + name.len()
            + 2;
        err[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(figure("p50") > 1.0, "a synced write in under 1 us: {err}");
    assert!(figure("max") >= figure("p50"), "{err}");
    let (ok, out, _) = run(&["admin", "inspect", "--data", d, "--json"], "", T);
    assert!(ok);
    let doc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(doc["clean_shutdown"], true);
    let parts = doc["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 16);
    let items: u64 = parts.iter().map(|p| p["items"].as_u64().unwrap()).sum();
    assert_eq!(items, 2050);
    assert!(parts.iter().all(|p| p["high_seqno"].as_u64().unwrap() > 0));
    let (ok, out, _) = run(&["admin", "dump", "--data", d, "--json"], "", T);
    assert!(ok);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2050);
    for r in &rows {
        for field in ["partition", "seqno", "cas", "key", "value_len"] {
            assert!(!r[field].is_null(), "missing {field} in {r}");
        }
        assert_eq!(r["value_len"], 32);
    }
    let (ok, out, _) = run(&["admin", "inspect", "--data", d], "", T);
    assert!(ok);
    assert!(out.contains("total items: 2050"), "{out}");
}

#[test]
fn a_directory_held_by_another_process_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // An idle shell holds the directory; its answer shows it is open.
    let (mut holder, mut stdin) = tapkv_tests::Proc::spawn_piped(&["shell", "--data", d]);
    {
        use std::io::Write;
        writeln!(stdin, "get x").unwrap();
        stdin.flush().unwrap();
    }
    assert_eq!(holder.next_line(T).as_deref(), Some("NOT_FOUND"));
    let (ok, _, err) = run(&["kv", "get", "--data", d, "x"], "", T);
    assert!(!ok);
    assert!(
        err.contains("in use by another process or engine") && err.contains(d),
        "{err}"
    );
    holder.kill();
}

#[test]
fn shell_online_update_commands_and_crash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // Find the partition of `a` first.
    let (ok, out, _) = run(&["shell", "--data", d], "partition a\n", T);
    assert!(ok);
    let p: u16 = out
        .trim()
        .strip_prefix("OK PARTITION ")
        .unwrap()
        .parse()
        .unwrap();
    let script = format!(
        "set a before\nflush\nupdate start {p}\nupdate start {p}\nset a during\nget a\n\
         update revert {p}\nget a\nupdate revert {p}\nevict a\nget a\nupdate start {p}\n\
         set a window\nupdate complete {p}\nget a\nflush\nupdate start {p}\nset a lost\ncrash\nget a\n"
    );
    let (ok, out, _) = run(&["shell", "--data", d], &script, T);
    assert!(!ok, "crash exits non-zero");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 18, "{out}");
    let w: u64 = lines[2]
        .strip_prefix("OK CHECKPOINT ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(lines[3].starts_with("ERROR window_open:"), "{}", lines[3]);
    assert_eq!(lines[5], "VALUE during");
    assert_eq!(lines[6], format!("OK CHECKPOINT {w} REMOVED 0 RESTORED 1"));
    assert_eq!(lines[7], "VALUE before");
    assert!(lines[8].starts_with("ERROR no_window:"), "{}", lines[8]);
    assert_eq!(lines[9], "OK EVICTED");
    assert_eq!(lines[10], "VALUE before");
    let w2: u64 = lines[11]
        .strip_prefix("OK CHECKPOINT ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(w2 > w);
    assert_eq!(lines[13], format!("OK CHECKPOINT {w2}"));
    assert_eq!(lines[14], "VALUE window");
    assert_eq!(lines[15], "OK");
    let w3: u64 = lines[16]
        .strip_prefix("OK CHECKPOINT ")
        .unwrap()
        .parse()
        .unwrap();
    // After the crash: the open window was reverted implicitly and recorded.
    let (ok, out, _) = run(&["shell", "--data", d], "get a\nstats\n", T);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "VALUE window");
    assert!(lines[1].contains("lost_windows=1"), "{}", lines[1]);
    let (ok, out, _) = run(&["admin", "inspect", "--data", d], "", T);
    assert!(ok);
    assert!(out.contains(&format!("window {w3} lost")), "{out}");
}

#[test]
fn demo_refuses_a_directory_it_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) = run(&["demo", "--data", d, "--items", "10"], "", T);
    assert!(!ok, "the demo must refuse a foreign non-empty directory");
    assert!(err.contains("not made by `tapkv demo`"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    assert!(!dir.path().join("engine").exists());
}

/// Node stores named as the demo's subdirectories, in an unmarked
/// directory, are not the demo's to clear. Before, a directory holding
/// nothing but `primary` and `replica-1` counted as the demo's (a rule
/// from before the marker), and both were wiped.
#[test]
fn demo_refuses_an_unmarked_directory_holding_only_subdirectories_named_as_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("primary");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(store.join("node-name"), "primary").unwrap();
    std::fs::create_dir(dir.path().join("replica-1")).unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) = run(&["demo", "--data", d, "--items", "10"], "", T);
    assert!(!ok, "the demo must refuse an unmarked non-empty directory");
    assert!(err.contains("not made by `tapkv demo`"), "{err}");
    assert_eq!(
        std::fs::read_to_string(store.join("node-name")).unwrap(),
        "primary"
    );
    assert!(!dir.path().join("engine").exists());
}

/// `kv del --addr --durability persist` asks the node for a durable
/// deletion: inside an online-update window, where nothing may be made
/// durable, the node refuses it (a deletion sent as Memory would succeed).
#[test]
fn kv_del_over_the_network_carries_its_durability() {
    let dir = tempfile::tempdir().unwrap();
    let node = tapkv_tests::NodeProc::start(dir.path(), "127.0.0.1:0", None, "del-node", &[]);
    let a = node.addr.as_str();
    let (ok, out, err) = run(&["kv", "set", "--addr", a, "doomed", "v"], "", T);
    assert!(ok, "{out}{err}");
    let mut c = node.client();
    let p = c.partition_of(b"doomed");
    c.update_start(p).unwrap();
    let del = |durability: &str| {
        run(
            &[
                "kv",
                "del",
                "--addr",
                a,
                "doomed",
                "--durability",
                durability,
            ],
            "",
            T,
        )
    };
    let (ok, _, err) = del("persist");
    assert!(!ok, "a Persist deletion inside a window must be refused");
    assert!(err.contains("window"), "{err}");
    let (ok, out, _) = run(&["kv", "get", "--addr", a, "doomed"], "", T);
    assert!(ok && out == "v\n", "{out}");
    let (ok, out, err) = del("memory");
    assert!(ok, "{out}{err}");
    c.update_complete(p).unwrap();
    let (ok, _, _) = run(&["kv", "get", "--addr", a, "doomed"], "", T);
    assert!(!ok);
}

/// Lines that are not UTF-8 and values holding line breaks: each command
/// still gets one answer line, values are escaped (docs/shell.md), and the
/// shell goes on.
#[test]
fn shell_takes_any_bytes_and_answers_each_command_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut script = Vec::new();
    script.extend_from_slice(b"set k caf\xc3\xa9 \xff line\\nbreak\\\\\n");
    script.extend_from_slice(b"get k\n");
    script.extend_from_slice(b"\xfe\xfe\n");
    script.extend_from_slice(b"set k2 a\\qb\n");
    script.extend_from_slice(b"set k2 a\rb\r\n");
    script.extend_from_slice(b"get k2\n");
    script.extend_from_slice(b"get k\n");
    let (ok, out, err) = run(&["shell", "--data", d], &script, T);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert!(lines[0].starts_with("OK PARTITION"), "{}", lines[0]);
    assert_eq!(lines[1], "VALUE caf\u{e9} \\xff line\\nbreak\\\\");
    assert!(
        lines[2].starts_with("ERROR invalid_argument:"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with("ERROR invalid_argument: VALUE: bad escape"),
        "{}",
        lines[3]
    );
    assert!(lines[4].starts_with("OK PARTITION"), "{}", lines[4]);
    assert_eq!(lines[5], "VALUE a\\rb");
    assert_eq!(lines[6], lines[1]);
    // The stored bytes are the unescaped ones.
    let (ok, out, _) = run(&["kv", "get", "--data", d, "k"], "", T);
    assert!(ok);
    assert_eq!(
        out.as_bytes(),
        "caf\u{e9} \u{fffd} line\nbreak\\\n".as_bytes()
    );
}

/// `shell --addr` parses and answers as `shell --data` does, and a value
/// over the node's frame limit is refused without ending the session.
#[test]
fn shell_over_the_network_answers_like_the_local_shell() {
    let dir = tempfile::tempdir().unwrap();
    let node = tapkv_tests::NodeProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        "shell-node",
        &["--max-body", "4096"],
    );
    let big = "x".repeat(5000);
    let script = format!(
        "set big {big}\nset a 1\nget a\nget a b\nget\npartition\nset t tab\\there\nget t\n\
         checkpoints 0\ncursors 0\nstats\nflush now\nbogus\nrestart\n"
    );
    let (ok, out, err) = run(&["shell", "--addr", &node.addr], &script, T);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 14, "{out}");
    assert!(
        lines[0].starts_with("ERROR value_too_large:"),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with("OK PARTITION"), "{}", lines[1]);
    assert_eq!(lines[2], "VALUE 1");
    for i in [3, 4, 5, 11, 12, 13] {
        assert!(
            lines[i].starts_with("ERROR invalid_argument:"),
            "{i}: {}",
            lines[i]
        );
    }
    assert!(lines[6].starts_with("OK PARTITION"), "{}", lines[6]);
    assert_eq!(lines[7], "VALUE tab\\there");
    assert!(lines[8].starts_with("OK id="), "{}", lines[8]);
    assert!(lines[9].starts_with("OK "), "{}", lines[9]);
    assert!(
        lines[10].starts_with("OK items=2 dirty=")
            && lines[10].contains(" partitions=16 ")
            && lines[10].contains(" open_windows=- lost_windows=0")
            && lines[10].ends_with(" role=primary"),
        "{}",
        lines[10]
    );
    // The same script on a local data directory: the same answers, but
    // for the figures and what only a node has.
    let local = tempfile::tempdir().unwrap();
    let (ok, lout, err) = run(
        &["shell", "--data", local.path().to_str().unwrap()],
        &script,
        T,
    );
    assert!(ok, "{err}");
    let llines: Vec<&str> = lout.lines().collect();
    assert_eq!(llines.len(), 14, "{lout}");
    let shape = |l: &str| l.split([' ', '=']).next().unwrap_or("").to_owned();
    for (i, (r, l)) in lines.iter().zip(&llines).enumerate() {
        if i == 0 || i == 13 {
            continue; // frame limit and `restart` are the node's and the directory's
        }
        assert_eq!(shape(r), shape(l), "line {i}: {r} / {l}");
    }
    assert_eq!(llines[2], "VALUE 1");
    assert_eq!(llines[7], "VALUE tab\\there");
}

/// Online updates and evictions through `shell --addr` answer as in a local
/// shell, and `admin inspect --addr` shows an open window's size.
#[test]
fn shell_over_the_network_runs_online_updates_and_evictions_like_the_local_shell() {
    let dir = tempfile::tempdir().unwrap();
    let node = tapkv_tests::NodeProc::start(dir.path(), "127.0.0.1:0", None, "update-node", &[]);
    let (ok, out, err) = run(&["shell", "--addr", &node.addr], "partition u\n", T);
    assert!(ok, "{err}");
    let p: u16 = out
        .trim()
        .strip_prefix("OK PARTITION ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let script = format!(
        "set u old\nflush\nevict u\nstats\nget u\nupdate start {p}\nset u new\n\
         update revert {p}\nget u\nupdate start {p}\nset u newer\nupdate complete {p}\n\
         get u\nupdate complete {p}\ncheckpoint {p}\n"
    );
    let answers = |args: &[&str]| -> Vec<String> {
        let (ok, out, err) = run(args, &script, T);
        assert!(ok, "{err}");
        out.lines().map(str::to_owned).collect()
    };
    let local = tempfile::tempdir().unwrap();
    let remote = answers(&["shell", "--addr", &node.addr]);
    let local = answers(&["shell", "--data", local.path().to_str().unwrap()]);
    for lines in [&remote, &local] {
        assert_eq!(lines.len(), 15, "{lines:?}");
        assert!(lines[0].starts_with("OK PARTITION"), "{}", lines[0]);
        assert_eq!(lines[1], "OK");
        assert_eq!(lines[2], "OK EVICTED");
        assert!(
            lines[3].contains(" evicted=1 evicted_bytes=3 "),
            "{}",
            lines[3]
        );
        assert_eq!(lines[4], "VALUE old");
        assert!(lines[5].starts_with("OK CHECKPOINT "), "{}", lines[5]);
        let id = &lines[5]["OK CHECKPOINT ".len()..];
        assert_eq!(lines[7], format!("OK CHECKPOINT {id} REMOVED 0 RESTORED 1"));
        assert_eq!(lines[8], "VALUE old");
        assert!(lines[9].starts_with("OK CHECKPOINT "), "{}", lines[9]);
        assert_eq!(lines[11], lines[9]);
        assert_eq!(lines[12], "VALUE newer");
        assert!(lines[13].starts_with("ERROR no_window:"), "{}", lines[13]);
        assert!(lines[14].starts_with("OK CHECKPOINT "), "{}", lines[14]);
    }
    // A window left open on the node: the table gives its keys and bytes.
    let (ok, out, err) = run(
        &["shell", "--addr", &node.addr],
        format!("update start {p}\nset u in-window\n"),
        T,
    );
    assert!(ok, "{err}");
    let id = out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("OK CHECKPOINT "))
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    let (ok, out, err) = run(&["admin", "inspect", "--addr", &node.addr], "", T);
    assert!(ok, "{err}");
    let row = out
        .lines()
        .find(|l| l.contains(&format!("window {id} open")))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains(&format!("window {id} open (1 keys, ")),
        "{row}"
    );
}

/// SIGINT ends a local shell as end of input does: the engine is closed
/// cleanly (all answered writes flushed), exit status 130.
#[test]
fn shell_closes_the_engine_cleanly_on_sigint() {
    shell_closes_the_engine_cleanly_on(libc::SIGINT);
}

/// So does SIGHUP (its terminal or ssh session gone), exit status 129.
/// Before, it killed the shell as a crash would: writes answered OK were
/// lost and the directory was left unclean (found by a review).
#[test]
fn shell_closes_the_engine_cleanly_on_sighup() {
    shell_closes_the_engine_cleanly_on(libc::SIGHUP);
}

fn shell_closes_the_engine_cleanly_on(signal: i32) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (mut shell, mut stdin) = tapkv_tests::Proc::spawn_piped(&["shell", "--data", d]);
    let mut script = String::new();
    for i in 0..2000 {
        script.push_str(&format!("set key-{i} value-{i}\n"));
    }
    stdin.write_all(script.as_bytes()).unwrap();
    stdin.flush().unwrap();
    for _ in 0..2000 {
        let line = shell.next_line(T).expect("an answer");
        assert!(line.starts_with("OK PARTITION"), "{line}");
    }
    shell.signal(signal);
    let status = shell.wait_status(T).expect("exit status");
    assert_eq!(status.code(), Some(128 + signal), "{status:?}");
    drop(stdin);
    assert_clean_with_items(d, 2000);
}

/// A signal that arrives while a local shell is closing after `quit` waits
/// for that close: the process never exits in the middle of the final
/// flush (everything answered OK is on disk, the directory is clean).
#[test]
fn a_signal_during_the_close_after_quit_waits_for_it() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (mut shell, mut stdin) = tapkv_tests::Proc::spawn_piped(&["shell", "--data", d]);
    // About 160 MB of values, so the close has a flush backlog to write.
    let value = "x".repeat(8 << 10);
    let n = 20_000;
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            writeln!(stdin, "set key-{i} {value}").unwrap();
        }
        writeln!(stdin, "quit").unwrap();
        stdin.flush().unwrap();
        stdin
    });
    for _ in 0..n {
        let line = shell.next_line(T).expect("an answer");
        assert!(line.starts_with("OK PARTITION"), "{line}");
    }
    shell.signal(libc::SIGTERM);
    // A hang guard: the close writes whatever backlog the flusher has left
    // of 160 MB, on whatever disk the machine has.
    let status = shell
        .wait_status(Duration::from_secs(300))
        .expect("exit status");
    assert!(matches!(status.code(), Some(0 | 143)), "{status:?}");
    drop(writer.join().unwrap());
    assert_clean_with_items(d, n);
}

/// A signal closes a shell whose standard output is not being read (a
/// stalled pager or pipe): before, the shell held its lock while writing an
/// answer, so the signal's close waited for ever, and a second signal then
/// exited without closing the engine (found by a review).
#[test]
fn a_signal_closes_a_shell_whose_output_is_not_being_read() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut child = Command::new(tapkv_tests::tapkv_bin())
        .args(["shell", "--data", d])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // A 1 MiB answer, far more than a pipe holds: once its first bytes are
    // read and no more, the shell is inside a write it cannot finish.
    let value = "x".repeat(1 << 20);
    writeln!(stdin, "set k {value}\nget k").unwrap();
    stdin.flush().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(7).any(|w| w == b"VALUE x") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(());
        stdout
    });
    rx.recv_timeout(T).expect("the start of the get's answer");
    // SAFETY: kill(2) on our own child's pid.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = child.kill();
    let _ = child.wait();
    drop((stdin, reader.join().unwrap()));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(143),
        "the shell did not close on SIGTERM"
    );
    assert_clean_with_items(d, 1);
}

/// A directory made with `--partitions 8` opens with every command's
/// defaults afterwards; a different explicit count is refused.
#[test]
fn a_directory_keeps_its_partition_count_across_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut node = tapkv_tests::NodeProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        "eight",
        &["--partitions", "8"],
    );
    assert_eq!(node.client().partitions(), 8);
    node.stop();
    let (ok, out, err) = run(&["kv", "set", "--data", d, "k", "v"], "", T);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = run(&["kv", "get", "--data", d, "k"], "", T);
    assert!(ok && out == "v\n", "{out}");
    let mut node = tapkv_tests::NodeProc::start(dir.path(), "127.0.0.1:0", None, "again", &[]);
    assert_eq!(node.client().partitions(), 8);
    node.stop();
    let (ok, _, err) = run(
        &[
            "node",
            "--data",
            d,
            "--listen",
            "127.0.0.1:0",
            "--partitions",
            "16",
        ],
        "",
        T,
    );
    assert!(!ok);
    assert!(err.contains("created with 8 partitions"), "{err}");
}

#[test]
fn a_node_without_a_name_keeps_the_one_it_made() {
    // The default name is made once per data directory (before, it was
    // `node-<pid>`: `node-1` for every replica run as a container's first
    // process, and those replaced each other's streams).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut names = Vec::new();
    for _ in 0..2 {
        let mut node = tapkv_tests::Proc::spawn(&["node", "--data", d, "--listen", "127.0.0.1:0"]);
        let line = node.next_line(T).expect("startup line");
        let name = line
            .strip_prefix("tapkv node ")
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected startup line {line:?}"))
            .to_owned();
        assert!(name.starts_with("node-") && name.len() == 21, "{name}");
        node.signal(libc::SIGTERM);
        assert!(node.wait_success(T), "the node did not stop cleanly");
        names.push(name);
    }
    assert_eq!(names[0], names[1]);
    let other = tempfile::tempdir().unwrap();
    let mut node = tapkv_tests::Proc::spawn(&[
        "node",
        "--data",
        other.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let line = node.next_line(T).expect("startup line");
    assert!(!line.contains(&names[0]), "{line}");
    node.signal(libc::SIGTERM);
    assert!(node.wait_success(T));
}

#[test]
fn node_timing_options_out_of_range_are_refused() {
    // 0 made a replica reconnect for ever; a huge value overflowed a
    // deadline (a panic) once the node ran.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (opt, bad) in [
        ("--heartbeat-ms", "0"),
        ("--heartbeat-ms", "18446744073709551615"),
        ("--replicate-timeout-ms", "18446744073709551615"),
        ("--io-timeout-ms", "0"),
        ("--idle-timeout-s", "18446744073709551615"),
    ] {
        let (ok, _, err) = run(
            &["node", "--data", d, "--listen", "127.0.0.1:0", opt, bad],
            "",
            T,
        );
        assert!(!ok, "{opt} {bad} accepted");
        assert!(err.contains(opt), "{opt} {bad}: {err}");
    }
}

/// `--flusher-nice` reaches the engine (the node's `STAT` shows what the
/// OS reports for its flusher thread), and a value a flusher could only
/// reach by raising its priority, or past 19, is refused.
#[test]
fn a_nodes_flusher_niceness_is_an_option_its_stats_show() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("bad");
    let d = d.to_str().unwrap();
    for bad in ["-1", "20"] {
        let (ok, _, err) = run(
            &[
                "node",
                "--data",
                d,
                "--listen",
                "127.0.0.1:0",
                "--flusher-nice",
                bad,
            ],
            "",
            T,
        );
        assert!(!ok, "--flusher-nice {bad} accepted");
        assert!(err.contains("--flusher-nice"), "{bad}: {err}");
    }
    // Elsewhere the engine reports no niceness (`null`).
    if !cfg!(target_os = "linux") {
        return;
    }
    let node = tapkv_tests::NodeProc::start(
        &dir.path().join("good"),
        "127.0.0.1:0",
        None,
        "nice",
        &["--flusher-nice", "19"],
    );
    let mut c = node.client();
    // The flusher reports once it has started: wait for it, bounded.
    let deadline = std::time::Instant::now() + T;
    let nice = loop {
        let st = c.stats().unwrap();
        let nice = st["flusher_nice"].clone();
        if nice
            .as_array()
            .is_some_and(|a| a.iter().all(|v| !v.is_null()))
            || std::time::Instant::now() >= deadline
        {
            break nice;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // 19 is the top of the range: whatever this test runs at, the floor
    // lowers the flusher to it.
    assert_eq!(nice, serde_json::json!([19]));
}

#[test]
fn admin_inspect_says_when_a_replica_does_not_replicate() {
    // A replica whose directory has another partition count than its
    // primary's refuses to replicate; `admin inspect --addr` says so (before,
    // only the replica's log did).
    let dir = tempfile::tempdir().unwrap();
    let primary = tapkv_tests::NodeProc::start(
        &dir.path().join("primary"),
        "127.0.0.1:0",
        None,
        "primary",
        &["--partitions", "8"],
    );
    let replica = tapkv_tests::NodeProc::start(
        &dir.path().join("replica"),
        "127.0.0.1:0",
        Some(&primary.addr),
        "replica",
        &["--partitions", "4"],
    );
    let deadline = std::time::Instant::now() + T;
    loop {
        let (ok, out, err) = run(&["admin", "inspect", "--addr", &replica.addr], "", T);
        assert!(ok, "{err}");
        if out.contains("NOT REPLICATING") {
            assert!(out.contains("8 partitions"), "{out}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_data_shell_ending_with_a_window_open_says_it_was_reverted() {
    // Before, `quit` with a window open exited 0 and the window's writes
    // were silently reverted; `flush` inside it answered a plain OK.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let p = tapkv_engine::partition_of(b"a", 16);
    let script = format!("set a base\nupdate start {p}\nset a new\nflush\nquit\n");
    let (ok, out, err) = run(&["shell", "--data", d], script, T);
    assert!(!ok, "exit 0 after losing a window: {out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[3].starts_with(&format!("OK NOT_FLUSHED_WINDOWS {p}:")),
        "{out}"
    );
    assert!(err.contains("was still open"), "{err}");
    let (ok, out, _) = run(&["kv", "get", "--data", d, "a"], "", T);
    assert!(ok);
    assert_eq!(out.trim_end(), "base");
    // Completed, nothing is lost and the shell exits 0.
    let script = format!("update start {p}\nset a kept\nupdate complete {p}\nflush\nquit\n");
    let (ok, out, err) = run(&["shell", "--data", d], script, T);
    assert!(ok, "{out}{err}");
    assert_eq!(out.lines().nth(3), Some("OK"), "{out}");
}

#[test]
fn admin_dump_escapes_keys_one_record_a_line() {
    // Before, a key with a newline split its record over two lines, and
    // bytes that are not UTF-8 were replaced (two keys could dump alike).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let script = "set sp\\x20ace v\nset nl\\nkey v\nset \\xffbin v\nset \\xfebin v\n";
    let (ok, _, err) = run(&["shell", "--data", d], script, T);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["admin", "dump", "--data", d], "", T);
    assert!(ok, "{err}");
    let keys: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("key=")))
        .collect();
    assert_eq!(out.lines().count(), 4, "{out}");
    for want in ["sp\\x20ace", "nl\\nkey", "\\xffbin", "\\xfebin"] {
        assert!(keys.contains(&want), "{want} not in {keys:?}");
    }
    let (ok, out, _) = run(&["admin", "dump", "--data", d, "--json"], "", T);
    assert!(ok);
    let json_keys: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["key"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(json_keys.contains(&"sp ace".to_string()), "{json_keys:?}");
    assert!(json_keys.contains(&"\\xffbin".to_string()), "{json_keys:?}");
}

#[test]
fn kv_takes_a_key_as_admin_dump_prints_it_with_escaped() {
    // `admin dump` prints keys escaped; before, `kv` took keys literally
    // only, so a key with a space or a byte that is not UTF-8 copied from a
    // dump was "not found", and the message showed it in Rust's debug form.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let script = "set sp\\x20ace v1\nset \\xffbin v2\n";
    let (ok, _, err) = run(&["shell", "--data", d], script, T);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["admin", "dump", "--data", d], "", T);
    assert!(ok, "{err}");
    for (dumped, value) in [("sp\\x20ace", "v1\n"), ("\\xffbin", "v2\n")] {
        assert!(out.contains(&format!("key={dumped} ")), "{out}");
        let (ok, got, err) = run(&["kv", "get", "--data", d, "--escaped", dumped], "", T);
        assert!(ok, "{dumped}: {err}");
        assert_eq!(got, value);
    }
    // Literal without the flag: a missing key, named escaped.
    let (ok, _, err) = run(&["kv", "get", "--data", d, "sp\\x20ace"], "", T);
    assert!(!ok);
    assert!(err.contains("key \"sp\\\\x20ace\" not found"), "{err}");
    // A bad escape is named.
    let (ok, _, err) = run(&["kv", "get", "--data", d, "--escaped", "bad\\q"], "", T);
    assert!(!ok);
    assert!(err.contains("bad escape"), "{err}");
    // A node address without a port is a usage error naming the problem.
    let (ok, _, err) = run(&["kv", "get", "--addr", "localhost", "k"], "", T);
    assert!(!ok);
    assert!(err.contains("expected HOST:PORT"), "{err}");
}

#[test]
fn kv_get_on_a_path_that_holds_no_store_creates_nothing() {
    // Before, a mistyped --data made an empty store and answered "not
    // found" (exit 1, as for a missing key).
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo");
    let t = typo.to_str().unwrap();
    let out = tapkv_tests::run_status(&["kv", "get", "--data", t, "k"], T);
    assert_eq!(out.0, Some(3), "{}", out.1);
    assert!(out.1.contains("not a tapkv data directory"), "{}", out.1);
    assert!(!typo.exists());
    let out = tapkv_tests::run_status(&["kv", "del", "--data", t, "k"], T);
    assert_eq!(out.0, Some(3), "{}", out.1);
    // A missing key in a real store is still 1.
    let d = dir.path().join("real");
    let d = d.to_str().unwrap();
    let (ok, _, _) = run(&["kv", "set", "--data", d, "a", "1"], "", T);
    assert!(ok);
    assert_eq!(
        tapkv_tests::run_status(&["kv", "get", "--data", d, "nope"], T).0,
        Some(1)
    );
}

#[test]
fn a_node_that_does_not_answer_is_waited_for_timeout_s() {
    // A listener that accepts and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    for args in [
        vec!["kv", "get", "--addr", &addr, "k", "--timeout-s", "1"],
        vec!["admin", "streams", "--addr", &addr, "--timeout-s", "1"],
    ] {
        let (code, err) = tapkv_tests::run_status(&args, T);
        assert_eq!(code, Some(3), "{args:?}: {err}");
        assert!(err.contains("did not answer"), "{args:?}: {err}");
        // The wait is the one asked for, not the default 30 s.
        assert!(err.contains("within 1s"), "{args:?}: {err}");
    }
}

#[test]
fn a_shell_over_the_network_reconnects_after_the_node_restarts() {
    // Before, once the connection was gone every later command answered
    // "Broken pipe" until the shell was restarted.
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _node) = ShellOverRestart::start(dir.path(), &[]);
    let first = s.ask("get a");
    assert!(first.contains("the next command reconnects"), "{first}");
    assert_eq!(s.ask("get a"), "VALUE 1");
}

/// A `shell --addr` that wrote `a` = 1 to a node, the node restarted since
/// at the same address (with `args` both times): the shell's connection is
/// gone, which its next command finds (it reconnects only then).
struct ShellOverRestart {
    shell: tapkv_tests::Proc,
    stdin: std::process::ChildStdin,
}

impl ShellOverRestart {
    fn start(dir: &std::path::Path, args: &[&str]) -> (Self, tapkv_tests::NodeProc) {
        let addr = tapkv_tests::restartable_addr();
        let data = dir.join("node");
        let mut node = tapkv_tests::NodeProc::start(&data, &addr, None, "n", args);
        // No heartbeat: one failing during a slow restart would reconnect
        // silently, and these tests are about the command that finds the
        // connection gone.
        let (shell, stdin) =
            tapkv_tests::Proc::spawn_piped(&["shell", "--addr", &addr, "--heartbeat-s", "0"]);
        let mut s = ShellOverRestart { shell, stdin };
        assert!(s.ask("set a 1").starts_with("OK PARTITION"));
        node.stop();
        let node = tapkv_tests::NodeProc::start(&data, &addr, None, "n", args);
        (s, node)
    }

    fn ask(&mut self, line: &str) -> String {
        use std::io::Write;
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        self.stdin.flush().unwrap();
        self.shell.next_line(T).expect("an answer")
    }
}

/// `kv set --data` with a key the engine refuses (empty, or past 250 bytes)
/// fails without making a store; before, it left an empty one, which
/// later commands took for data (found by a review).
#[test]
fn kv_set_of_a_refused_key_leaves_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let long = "k".repeat(251);
    for (key, kind) in [("", "invalid_argument"), (long.as_str(), "key_too_large")] {
        let d = dir.path().join("new");
        let d = d.to_str().unwrap();
        let (code, err) = tapkv_tests::run_status(&["kv", "set", "--data", d, key, "v"], T);
        assert_eq!(code, Some(3), "{err}");
        assert!(err.contains(kind), "{err}");
        let made = std::fs::read_dir(d).map_or(0, |entries| entries.count());
        assert_eq!(made, 0, "a store was made for a refused key");
    }
}

/// `kv set --addr` of a value over the node's largest frame says so; it
/// used to call the frame limit the maximum value size (found by a
/// review). A value under the frame limit but over the node's value limit
/// gets the node's own answer.
#[test]
fn kv_set_of_a_value_over_a_nodes_frame_limit_names_that_limit() {
    let dir = tempfile::tempdir().unwrap();
    let node = tapkv_tests::NodeProc::start(
        &dir.path().join("node"),
        "127.0.0.1:0",
        None,
        "n",
        &["--max-body", "4096", "--max-value-size", "1000"],
    );
    let f = dir.path().join("v");
    let file = f.to_str().unwrap();
    std::fs::write(&f, vec![b'x'; 5000]).unwrap();
    let set = ["kv", "set", "--addr", &node.addr, "k", "--value-file", file];
    let (code, err) = tapkv_tests::run_status(&set, T);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("--max-body") && err.contains("4096"), "{err}");
    std::fs::write(&f, vec![b'x'; 2000]).unwrap();
    let (code, err) = tapkv_tests::run_status(&set, T);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("value_too_large") && err.contains("1000"),
        "{err}"
    );
}

/// A key a node stored under a larger `--max-key-size` than the default is
/// read and deleted by `kv get` / `kv del --data` once the node has
/// stopped; before, both refused it as too large while `admin dump`
/// listed it (found by a review).
#[test]
fn kv_reads_and_deletes_offline_a_key_a_node_stored_under_a_larger_limit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node =
        tapkv_tests::NodeProc::start(&data, "127.0.0.1:0", None, "n", &["--max-key-size", "300"]);
    let key = "k".repeat(300);
    node.client().set(key.as_bytes(), b"v", 0, false).unwrap();
    node.stop();
    let d = data.to_str().unwrap();
    let (ok, out, err) = run(&["kv", "get", "--data", d, &key], "", T);
    assert!(ok, "{err}");
    assert_eq!(out, "v\n");
    // And rewritten: the directory's engine takes keys as long as its
    // longest (before, `kv set` refused it against the default 250 before
    // opening the directory; found by a review).
    let (ok, _, err) = run(&["kv", "set", "--data", d, &key, "w"], "", T);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["kv", "get", "--data", d, &key], "", T);
    assert!(ok, "{err}");
    assert_eq!(out, "w\n");
    let (ok, _, err) = run(&["kv", "del", "--data", d, &key], "", T);
    assert!(ok, "{err}");
    let (code, _) = tapkv_tests::run_status(&["kv", "get", "--data", d, &key], T);
    assert_eq!(code, Some(1));
}

/// A `shell --addr` whose reconnect a busy node refuses answers that
/// refusal's own kind, `temp_failure`, and reconnects once the node has
/// room. Before, the answer was `ERROR io: temp_failure: ...` (found by a
/// review): a script retrying on `temp_failure` never saw it.
#[test]
fn a_shell_whose_reconnect_is_refused_as_busy_answers_temp_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, node) = ShellOverRestart::start(dir.path(), &["--max-connections", "1"]);
    // The node's one connection is taken before the shell's comes back.
    let held = node.client();
    let mut ask = |line: &str| s.ask(line);
    let first = ask("get a");
    assert!(first.contains("the next command reconnects"), "{first}");
    let busy = ask("get a");
    assert!(busy.starts_with("ERROR temp_failure: "), "{busy}");
    drop(held);
    // The node frees the slot when it sees the client gone: the next
    // command may still find it taken.
    let mut answer = ask("get a");
    for _ in 0..50 {
        if answer == "VALUE 1" {
            break;
        }
        assert!(answer.starts_with("ERROR temp_failure: "), "{answer}");
        std::thread::sleep(Duration::from_millis(100));
        answer = ask("get a");
    }
    assert_eq!(answer, "VALUE 1");
    drop(node);
}

/// The demo again over its own data (`--keep`), and with many items: its
/// reading cursor starts where memory still holds the partition's
/// changes. Before, both failed at step 3 with "no cursor named
/// demo-reader" (its registration from seqno 0 needed a backfill and
/// registered nothing; found by a review).
#[test]
fn the_demo_runs_again_with_keep_and_with_many_items() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let d = d.to_str().unwrap();
    demo(&["--data", d, "--items", "2"]);
    demo(&["--data", d, "--items", "2", "--keep"]);
    let many = dir.path().join("many");
    demo(&["--data", many.to_str().unwrap(), "--items", "100000"]);
}

/// Runs `tapkv demo ARGS`, which must succeed; its standard output. The
/// limit is a hang guard, not a timing claim: the demo's own waits (three
/// convergences of up to 30 s each, a restart of up to 10 s) add up to
/// more than `T`.
fn demo(args: &[&str]) -> String {
    let args: Vec<&str> = std::iter::once("demo")
        .chain(args.iter().copied())
        .collect();
    let (ok, out, err) = run(&args, "", Duration::from_secs(180));
    assert!(ok, "{out}\n{err}");
    out
}

/// `make demo`'s command runs to the end: the embedded engine's steps and
/// the three-node cluster, whose final checks it prints.
#[test]
fn the_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let d = d.to_str().unwrap();
    let out = demo(&["--data", d, "--items", "300"]);
    assert!(
        out.contains("every node holds its pre-window state, and the same data on disk: true"),
        "{out}"
    );
    assert!(out.contains("on each node: identical"), "{out}");
    // The values were compared too, not only the rows.
    assert!(!out.contains(" and 0 values on each node"), "{out}");
    assert!(!out.contains("summing to 0 "), "{out}");
    assert!(
        out.contains("every item back, numbering continued: yes"),
        "{out}"
    );
    assert!(!out.contains("CHECK FAILED"), "{out}");
    assert_eq!(
        out.matches("already reads order:0042 = state=shipped")
            .count(),
        2,
        "{out}"
    );
    assert!(out.contains("demo finished"), "{out}");
    // Its data is left for a look, and the engine directory opens cleanly.
    let engine_dir = dir.path().join("demo").join("engine");
    let (ok, out, err) = run(
        &[
            "admin",
            "inspect",
            "--data",
            engine_dir.to_str().unwrap(),
            "--json",
        ],
        "",
        T,
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["clean_shutdown"], true, "{out}");
}

/// SIGINT stops a node as SIGTERM does: streams closed, everything flushed,
/// exit status 0 and a directory marked clean.
#[test]
fn a_node_stops_cleanly_on_sigint() {
    // And on SIGHUP, which used to kill it as a crash would.
    for signal in [libc::SIGINT, libc::SIGHUP] {
        let dir = tempfile::tempdir().unwrap();
        let mut node = tapkv_tests::NodeProc::start(dir.path(), "127.0.0.1:0", None, "n", &[]);
        let mut c = node.client();
        for i in 0..1000 {
            c.set(format!("k{i}").as_bytes(), b"v", 0, false).unwrap();
        }
        drop(c);
        node.signal(signal);
        let status = node.proc.wait_status(T).expect("exit status");
        assert!(status.success(), "signal {signal}: {status:?}");
        let d = dir.path().to_str().unwrap();
        assert_clean_with_items(d, 1000);
    }
}

/// A node started with SIGHUP ignored (`nohup`) leaves it ignored, and
/// keeps serving after one; a node started normally handles it (to stop
/// cleanly). Found by a review: a `nohup` node stopped at logout. Checked
/// on the process's signal masks, which say it without waiting.
#[test]
fn a_node_started_with_sighup_ignored_keeps_it_ignored() {
    // Bit 0 of `mask` in the node's /proc status: SIGHUP's.
    let hup_bit = |node: &tapkv_tests::NodeProc, mask: &str| -> bool {
        let pid = node.proc.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(mask))
            .unwrap_or_else(|| panic!("{status}"));
        u64::from_str_radix(line.trim(), 16).unwrap() & 1 != 0
    };
    let dir = tempfile::tempdir().unwrap();
    let node = tapkv_tests::NodeProc::start_ignoring_sighup(&dir.path().join("a"), "n");
    assert!(hup_bit(&node, "SigIgn:") && !hup_bit(&node, "SigCgt:"));
    node.signal(libc::SIGHUP);
    let mut c = node.client();
    c.set(b"k", b"v", 0, false).unwrap();
    assert_eq!(&c.get(b"k").unwrap().0[..], b"v");
    let other = tapkv_tests::NodeProc::start(&dir.path().join("b"), "127.0.0.1:0", None, "m", &[]);
    assert!(hup_bit(&other, "SigCgt:") && !hup_bit(&other, "SigIgn:"));
}

/// `tapkv node --max-key-size / --max-value-size` set the engine's limits;
/// past them a write is a typed error and the connection goes on.
#[test]
fn a_nodes_key_and_value_limits_are_options() {
    let dir = tempfile::tempdir().unwrap();
    let node = tapkv_tests::NodeProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        "limits",
        &["--max-key-size", "10", "--max-value-size", "100"],
    );
    let mut c = node.client();
    c.set(b"0123456789", &[b'v'; 100], 0, false).unwrap();
    let err = c.set(b"0123456789a", b"v", 0, false).unwrap_err();
    assert!(err.to_string().starts_with("key_too_large"), "{err}");
    let err = c.set(b"k", &[b'v'; 101], 0, false).unwrap_err();
    assert!(err.to_string().starts_with("value_too_large"), "{err}");
    let err = c.set(b"", b"v", 0, false).unwrap_err();
    assert!(err.to_string().starts_with("invalid_argument"), "{err}");
    assert_eq!(c.get(b"0123456789").unwrap().0.len(), 100);
}

#[test]
fn a_node_whose_max_body_is_below_its_largest_set_warns_at_start() {
    // Such a node refuses its largest SETs as frames (closing their
    // connections) instead of answering VALUE_TOO_LARGE: it says so.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let args = ["--max-body", "4096", "--max-value-size", "100000"];
    let mut node =
        tapkv_tests::NodeProc::start_logging_to(&dir.path().join("d"), "mb", &args, &log);
    node.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("--max-body is below the largest SET") && text.contains("100258"),
        "{text}"
    );
    // Not with the defaults.
    let log = dir.path().join("default.log");
    let mut node = tapkv_tests::NodeProc::start_logging_to(&dir.path().join("e"), "ok", &[], &log);
    node.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("--max-body"), "{text}");
}

#[test]
fn load_refuses_a_key_range_past_u64_max_and_a_zero_count() {
    // Before, `--start` near u64::MAX wrapped around and overwrote key-0...
    // without a word (a debug build panicked).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let d = data.to_str().unwrap();
    let (code, err) = tapkv_tests::run_status(
        &[
            "load",
            "--data",
            d,
            "--count",
            "5",
            "--start",
            "18446744073709551613",
        ],
        T,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--start") && err.contains("--count"), "{err}");
    assert!(!data.exists(), "refused after opening the directory");
    let (code, err) = tapkv_tests::run_status(&["load", "--data", d, "--count", "0"], T);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--count"), "{err}");
    // The last key number itself is fine.
    let (ok, out, err) = run(
        &[
            "load",
            "--data",
            d,
            "--count",
            "3",
            "--start",
            "18446744073709551613",
            "--print-acked",
        ],
        "",
        T,
    );
    assert!(ok, "{err}");
    let keys: Vec<&str> = out.lines().filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(keys.len(), 3, "{out}");
    assert!(keys.contains(&"key-18446744073709551615"), "{out}");
    assert!(!keys.contains(&"key-0"), "{out}");
}

#[test]
fn load_threads_are_bounded_and_no_more_than_the_writes() {
    // Before, --threads 100000 panicked on a failed spawn, and --threads
    // 5000 for one write started 5000 threads (1.8 GB).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for bad in ["0", "1025", "100000"] {
        let (code, err) =
            tapkv_tests::run_status(&["load", "--data", d, "--count", "1", "--threads", bad], T);
        assert_eq!(code, Some(2), "--threads {bad}: {err}");
        assert!(err.contains("--threads"), "--threads {bad}: {err}");
    }
    let (ok, _, err) = run(
        &["load", "--data", d, "--count", "2", "--threads", "1024"],
        "",
        T,
    );
    assert!(ok, "{err}");
    // Two writes, two threads; the durability as the command line spells it.
    assert!(err.contains("with 2 thread(s)"), "{err}");
    assert!(err.contains("durability memory,"), "{err}");
    let (ok, _, err) = run(
        &[
            "load",
            "--data",
            d,
            "--count",
            "1",
            "--durability",
            "persist",
        ],
        "",
        T,
    );
    assert!(ok, "{err}");
    assert!(err.contains("durability persist,"), "{err}");
}

#[test]
fn a_node_refuses_an_unusable_replica_of_before_making_its_directory() {
    // Before, the node created its directory and retried for ever.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("replica");
    let d = data.to_str().unwrap();
    for bad in [
        "nonsense",
        "127.0.0.1",
        "",
        ":80",
        "host:port",
        "host:70000",
        "fe80::1:11311",
        "127.0.0.1:0",
    ] {
        let (code, err) = tapkv_tests::run_status(
            &[
                "node",
                "--data",
                d,
                "--listen",
                "127.0.0.1:0",
                "--replica-of",
                bad,
            ],
            T,
        );
        assert_eq!(code, Some(2), "{bad:?}: {err}");
        assert!(err.contains("--replica-of"), "{bad:?}: {err}");
        assert!(!data.exists(), "{bad:?}: the directory was created");
    }
    // A malformed `--listen` is the same kind of mistake: a usage error
    // too (it was found only when the node bound it, exit 3).
    for bad in ["11311", "nonsense", ":11311", "host:port", "fe80::1:11311"] {
        let (code, err) = tapkv_tests::run_status(&["node", "--data", d, "--listen", bad], T);
        assert_eq!(code, Some(2), "{bad:?}: {err}");
        assert!(err.contains("--listen"), "{bad:?}: {err}");
        assert!(!data.exists(), "{bad:?}: the directory was created");
    }
}

#[test]
fn a_replica_whose_primary_does_not_resolve_yet_starts_and_retries() {
    // A host that does not resolve yet (a primary still starting, its
    // name not yet published) is retried, not fatal: the replica serves
    // reads meanwhile and stops cleanly.
    let dir = tempfile::tempdir().unwrap();
    let mut node = tapkv_tests::NodeProc::start(
        &dir.path().join("r"),
        "127.0.0.1:0",
        Some("primary.invalid:11311"),
        "r",
        &["--partitions", "4"],
    );
    let mut c = node.client();
    assert_eq!(c.partitions(), 4);
    assert!(c.get(b"k").is_err());
    node.stop();
}

#[test]
fn kv_replicate_on_a_data_directory_is_a_usage_error_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fresh");
    let d = data.to_str().unwrap();
    for args in [
        vec![
            "kv",
            "set",
            "--data",
            d,
            "k",
            "v",
            "--durability",
            "replicate",
        ],
        vec!["kv", "del", "--data", d, "k", "--durability", "replicate"],
    ] {
        let (code, err) = tapkv_tests::run_status(&args, T);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--durability replicate needs a node") && err.contains("--addr"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("Durability::"), "{err}");
        assert!(!data.exists(), "{args:?}: the directory was created");
    }
}

#[test]
fn a_write_that_times_out_names_the_node_and_may_have_been_applied() {
    // A primary with no replica holds a Replicate write for 20 s: the
    // client gives up after its 1 s, the write itself is applied.
    let dir = tempfile::tempdir().unwrap();
    let node = tapkv_tests::NodeProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        "slow-ack",
        &["--replicate-timeout-ms", "20000"],
    );
    let a = node.addr.as_str();
    let (code, out, err) = tapkv_tests::run_with_status(
        &[
            "kv",
            "set",
            "--addr",
            a,
            "rk",
            "v",
            "--durability",
            "replicate",
            "--timeout-s",
            "1",
        ],
        "",
        T,
    );
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(err.contains(a), "{err}");
    assert!(err.contains("--timeout-s"), "{err}");
    assert!(err.contains("within 1s"), "{err}");
    assert!(err.contains("the write may have been applied"), "{err}");
    assert!(!err.contains("I/O error"), "{err}");
    let (ok, out, err) = run(&["kv", "get", "--addr", a, "rk"], "", T);
    assert!(ok && out == "v\n", "{out}{err}");
}

#[test]
fn a_busy_node_is_reported_busy_not_out_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let node = tapkv_tests::NodeProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        "one-conn",
        &["--max-connections", "1"],
    );
    // The one connection it serves.
    let _held = node.client();
    let (code, err) = tapkv_tests::run_status(&["kv", "get", "--addr", &node.addr, "k"], T);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.starts_with("error: temp_failure: ")
            && err.contains("busy")
            && err.contains("too many connections"),
        "{err}"
    );
    assert!(
        !err.contains("temp_oom") && !err.contains("I/O error"),
        "{err}"
    );
    // The same for an admin command (before: `error: io: ...`).
    let (code, err) = tapkv_tests::run_status(&["admin", "inspect", "--addr", &node.addr], T);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.starts_with("error: temp_failure: "), "{err}");
}

#[test]
fn kv_set_over_the_network_reads_its_value_before_it_connects() {
    use std::io::Write;
    // Before, `kv set --addr ... --value-file -` connected first and held
    // one of the node's connections while standard input trickled in.
    let dir = tempfile::tempdir().unwrap();
    // Two connections: the test holds one, to watch the other.
    let node = tapkv_tests::NodeProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        "two-conn",
        &["--max-connections", "2"],
    );
    let mut watch = node.client();
    // Until the node has freed the other slot (a closed connection is
    // noticed by its thread, not at once).
    let mut other_slot_free = || {
        let deadline = std::time::Instant::now() + T;
        while watch.stats().unwrap()["curr_connections"] != 1 {
            assert!(std::time::Instant::now() < deadline, "a slot stayed taken");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (mut set, mut stdin) = tapkv_tests::Proc::spawn_piped(&[
        "kv",
        "set",
        "--addr",
        &node.addr,
        "slow",
        "--value-file",
        "-",
    ]);
    stdin.write_all(b"first half, ").unwrap();
    stdin.flush().unwrap();
    // The node's other connection is free while the value is being read.
    let (code, err) = tapkv_tests::run_status(&["kv", "get", "--addr", &node.addr, "slow"], T);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not found"), "{err}");
    other_slot_free();
    stdin.write_all(b"second half").unwrap();
    drop(stdin);
    assert!(set.wait_success(T));
    other_slot_free();
    let (ok, out, err) = run(&["kv", "get", "--addr", &node.addr, "slow"], "", T);
    assert!(ok && out == "first half, second half\n", "{out}{err}");
}

#[test]
fn node_values_that_cannot_work_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let d = data.to_str().unwrap();
    for (opt, bad) in [
        ("--name", ""),
        ("--name", "  "),
        ("--online-update-memory-limit", "0"),
        ("--memory-quota", "0"),
        ("--snapshot-buffer-limit", "0"),
        ("--cursor-drop-threshold", "-1"),
        ("--cursor-drop-threshold", "0"),
        ("--cursor-drop-threshold", "NaN"),
        ("--cursor-drop-threshold", "inf"),
    ] {
        let (code, err) = tapkv_tests::run_status(
            &["node", "--data", d, "--listen", "127.0.0.1:0", opt, bad],
            T,
        );
        assert_eq!(code, Some(2), "{opt} {bad:?}: {err}");
        assert!(err.contains(opt), "{opt} {bad:?}: {err}");
        assert!(!data.exists(), "{opt} {bad:?}: the directory was created");
    }
}

#[test]
fn demo_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let f = file.to_str().unwrap();
    let (code, err) = tapkv_tests::run_status(&["demo", "--data", f, "--items", "2"], T);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains(f), "{err}");
}

#[test]
fn shell_update_usage_names_its_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, out, err) = run(
        &["shell", "--data", d],
        "update start 0 1\nupdate start\n",
        T,
    );
    assert!(ok, "{err}");
    for line in out.lines() {
        assert!(
            line.starts_with("ERROR invalid_argument: usage: update start|complete|revert P"),
            "{line}"
        );
    }
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn an_invalid_tapkv_log_is_reported() {
    let mut cmd = std::process::Command::new(tapkv_tests::tapkv_bin());
    cmd.env("TAPKV_LOG", "[[bad").arg("--version");
    let (code, _, err) = tapkv_tests::run_command(cmd, "", T);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("TAPKV_LOG") && err.contains("[[bad"), "{err}");
}

#[test]
fn kv_set_takes_a_value_file_or_stdin_and_get_raw_writes_it_exactly() {
    // Before, a value could only be an argument: none over about 128 KiB
    // (the command line's limit), no bytes that are not text, and `get`
    // always added a newline.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kv");
    let d = d.to_str().unwrap();
    let big: String = (0..200_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let file = dir.path().join("value");
    std::fs::write(&file, &big).unwrap();
    let node =
        tapkv_tests::NodeProc::start(&dir.path().join("node"), "127.0.0.1:0", None, "kvf", &[]);
    for target in [["--data", d], ["--addr", node.addr.as_str()]] {
        let set = [
            &["kv", "set"][..],
            &target[..],
            &["big", "--value-file", file.to_str().unwrap()],
        ]
        .concat();
        let (ok, _, err) = run(&set, "", T);
        assert!(ok, "{err}");
        let get = [&["kv", "get"][..], &target[..], &["big", "--raw"]].concat();
        let (ok, out, err) = run(&get, "", T);
        assert!(ok, "{err}");
        assert!(out == big, "{} bytes back for {}", out.len(), big.len());
        // From standard input, a trailing newline kept.
        let set = [
            &["kv", "set"][..],
            &target[..],
            &["line", "--value-file", "-"],
        ]
        .concat();
        let (ok, _, err) = run(&set, "one line\n", T);
        assert!(ok, "{err}");
        let get = [&["kv", "get"][..], &target[..], &["line", "--raw"]].concat();
        assert_eq!(run(&get, "", T).1, "one line\n");
        let get = [&["kv", "get"][..], &target[..], &["line"]].concat();
        assert_eq!(run(&get, "", T).1, "one line\n\n");
    }
    // An unreadable file is named.
    let (code, err) = tapkv_tests::run_status(
        &[
            "kv",
            "set",
            "--data",
            d,
            "k",
            "--value-file",
            "/nonexistent/v",
        ],
        T,
    );
    assert_eq!(code, Some(3));
    assert!(err.contains("/nonexistent/v (--value-file)"), "{err}");
}

#[test]
fn kv_prints_the_same_error_line_on_a_directory_and_against_a_node() {
    // Before, `kv` printed an engine error without its kind on a
    // directory (`error: key length 300 ...`) and with it against a node
    // (`error: key_too_large: key length 300 ...`).
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let local = local.to_str().unwrap();
    let node =
        tapkv_tests::NodeProc::start(&dir.path().join("node"), "127.0.0.1:0", None, "n", &[]);
    let long = "k".repeat(300);
    let (ok, _, _) = run(&["kv", "set", "--data", local, "a", "1"], "", T);
    assert!(ok);
    // (Not `kv get` of the long key: on a directory it is looked for, as a
    // node with a larger --max-key-size may have stored it, below.)
    for args in [vec!["kv", "set", &long, "v"], vec!["kv", "del", "missing"]] {
        let with = |target: &[&str]| {
            let mut a = args[..2].to_vec();
            a.extend_from_slice(target);
            a.extend_from_slice(&args[2..]);
            let (ok, _, err) = run(&a, "", T);
            assert!(!ok, "{a:?} succeeded");
            err
        };
        let on_dir = with(&["--data", local]);
        let on_node = with(&["--addr", &node.addr]);
        assert_eq!(on_dir, on_node, "{args:?}");
        assert!(on_dir.starts_with("error: "), "{on_dir}");
    }
    let (_, _, err) = run(&["kv", "get", "--data", local, "missing"], "", T);
    assert_eq!(
        err.trim_end(),
        "error: not_found: key \"missing\" not found"
    );
    let (_, _, err) = run(&["kv", "get", "--addr", &node.addr, &long], "", T);
    assert_eq!(
        err.trim_end(),
        "error: key_too_large: key length 300 is over the maximum of 250 bytes"
    );
    let (code, _, err) =
        tapkv_tests::run_with_status(&["kv", "get", "--data", local, &long], "", T);
    assert_eq!(code, Some(1), "{err}");
}

#[test]
fn a_node_under_a_low_open_file_limit_refuses_connections_instead_of_poisoning() {
    // 1,024 descriptors (systemd's default soft limit) with the default
    // --max-connections 1024. Before, about 335 idle clients took every
    // descriptor: RocksDB could not open its next file, the engine
    // poisoned itself, reads failed too, and acknowledged writes were lost.
    // Now the node serves what its descriptors allow ((1,024 - 256 open
    // files - 4 dumps x 40 - 64) / 3 = 181 connections) and refuses the
    // rest with TEMP_FAILURE.
    let dir = tempfile::tempdir().unwrap();
    let mut node = tapkv_tests::NodeProc::start_with_open_files(dir.path(), "fd", 1024, &[]);
    let mut writer = node.client();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..400 {
        match tapkv_replication::client::Client::connect(&node.addr, Duration::from_secs(30)) {
            Ok(c) => held.push(c),
            Err(e) => {
                assert!(e.to_string().contains("too many connections"), "{e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "all 400 connections were served");
    assert!(held.len() >= 100, "only {} connections served", held.len());
    // With every connection it serves open, the engine still writes
    // (flushes open files) and reads.
    let value = vec![b'v'; 64 << 10];
    for i in 0..400 {
        writer
            .set(format!("fd-{i}").as_bytes(), &value, 0, false)
            .unwrap();
    }
    writer.flush().unwrap();
    writer
        .set_durable(b"durable", b"yes", 0, tapkv_engine::Durability::Persist)
        .unwrap();
    assert_eq!(writer.get(b"fd-0").unwrap().0.len(), value.len());
    drop(held);
    drop(writer);
    node.stop();
    assert_clean_with_items(dir.path().to_str().unwrap(), 401);
}

#[test]
fn a_node_given_its_own_address_as_its_primary_refuses_to_start() {
    // Before, it ran and retried a refused stream every second for ever.
    // Checked before the directory is made: a directory made with the
    // default partition count would then refuse its real primary's.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("replica");
    let d = data.to_str().unwrap();
    let addr = tapkv_tests::restartable_addr();
    let (code, _, err) = tapkv_tests::run_with_status(
        &[
            "node",
            "--data",
            d,
            "--listen",
            &addr,
            "--replica-of",
            &addr,
        ],
        "",
        T,
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("this node's own address"), "{err}");
    assert!(!data.exists(), "the data directory was made");
}

#[test]
fn a_node_listening_everywhere_refuses_a_non_loopback_address_of_its_own() {
    // Before, only loopback addresses were taken for a wildcard listener's
    // own: `--listen 0.0.0.0:P --replica-of <LAN address>:P` started a
    // replica of itself, retrying a refused link for ever.
    // A non-loopback address of this machine: the source of a route out
    // (a UDP connect sends no packet). Without one there is nothing to test.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    if probe.connect("192.0.2.1:9").is_err() {
        return;
    }
    let ip = probe.local_addr().unwrap().ip();
    if ip.is_loopback() || ip.is_unspecified() {
        return;
    }
    // A port outside the ephemeral range (no connection is given it while
    // the node is being started), free on every address.
    let port = loop {
        let addr = tapkv_tests::restartable_addr();
        let port: u16 = addr.rsplit_once(':').unwrap().1.parse().unwrap();
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            break port;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("replica");
    let (code, _, err) = tapkv_tests::run_with_status(
        &[
            "node",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--replica-of",
            &format!("{ip}:{port}"),
        ],
        "",
        T,
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("this node's own address"), "{err}");
    assert!(!data.exists());
}

#[test]
fn a_command_pointed_at_something_else_than_a_node_says_so() {
    // Before: "cannot talk to node at ...: bad magic byte 0x48".
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let mut c = tapkv_tests::net::accept_within(&listener, Duration::from_secs(30));
        let _ = c.read(&mut [0u8; 256]);
        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let (code, _, err) = tapkv_tests::run_with_status(&["kv", "get", "--addr", &addr, "x"], "", T);
    server.join().unwrap();
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("is not a tapkv node"), "{err}");
}

#[test]
fn a_shell_whose_output_is_closed_closes_its_engine_and_fails() {
    // Before, a closed stdout skipped the engine's close (the directory
    // was left as a crash leaves it) and exited 0, though the commands
    // after it never ran.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, err) =
        tapkv_tests::run_with_closed_stdout(&["shell", "--data", d], "set a 1\nset b 2\n", T);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("error: io: writing standard output") && err.contains("stopped"),
        "{err}"
    );
    // The first command ran (its answer was what could not be written);
    // the second did not.
    assert_clean_with_items(d, 1);
}

#[test]
fn a_shell_restart_that_reverts_a_window_says_so_and_exits_4() {
    // Before, `restart` answered a plain OK and the shell exited 0 though
    // the window's writes were gone, where `quit` warns and exits 4.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, out, err) = tapkv_tests::run_with_status(
        &["shell", "--data", d],
        "set k0 base\nupdate start 15\nset k0 during\nrestart\nget k0\n",
        T,
    );
    assert_eq!(code, Some(4), "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    let id = lines[1].strip_prefix("OK CHECKPOINT ").unwrap();
    assert_eq!(
        lines[3],
        format!("OK RESTARTED ITEMS 1 REVERTED_WINDOWS 15:{id}")
    );
    assert_eq!(lines[4], "VALUE base");
    assert!(
        err.contains(&format!(
            "warning: online-update window {id} on partition 15"
        )),
        "{err}"
    );
    // A restart with no window open is a plain OK, and the shell exits 0.
    let (code, out, _) = tapkv_tests::run_with_status(&["shell", "--data", d], "restart\n", T);
    assert_eq!((code, out.trim()), (Some(0), "OK RESTARTED ITEMS 1"));
}

#[test]
fn load_refuses_an_oversized_value_before_building_it_and_reports_a_closed_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // Before, each thread built the value first: this size aborted the
    // process (a failed allocation) instead of being refused.
    let (code, _, err) = tapkv_tests::run_with_status(
        &[
            "load",
            "--data",
            d,
            "--count",
            "1",
            "--value-size",
            "99999999999999",
        ],
        "",
        T,
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("error: value_too_large:"), "{err}");
    // --print-acked into a closed pipe: the run stops, says so, fails, and
    // still closes the directory (before: it stopped early and exited 0).
    let (code, err) = tapkv_tests::run_with_closed_stdout(
        &["load", "--data", d, "--count", "1000", "--print-acked"],
        "",
        T,
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("writing acknowledged keys to standard output")
            && err.contains("stopped after 1 of 1000 writes"),
        "{err}"
    );
    assert_clean_with_items(d, 1);
}

#[test]
fn kv_set_reads_no_more_of_a_value_file_than_a_value_can_hold() {
    // Before, `--value-file /dev/zero` was read until memory ran out (here,
    // until the 4 GB address-space limit failed the read).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(r#"ulimit -v 4000000 && exec "$0" kv set --data "$1" zero --value-file /dev/zero"#)
        .arg(tapkv_tests::tapkv_bin())
        .arg(d);
    let (code, _, err) = tapkv_tests::run_command(cmd, "", T);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("error: invalid_argument:") && err.contains("longer than the maximum"),
        "{err}"
    );
    // A regular file over the limit is refused by its size, unread.
    let big = dir.path().join("big");
    std::fs::write(&big, vec![0u8; (20 << 20) + 1]).unwrap();
    let (code, _, err) = tapkv_tests::run_with_status(
        &[
            "kv",
            "set",
            "--data",
            d,
            "big",
            "--value-file",
            big.to_str().unwrap(),
        ],
        "",
        T,
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("error: value_too_large: value length 20971521"),
        "{err}"
    );
    // The value is read before the directory is opened: an unreadable one
    // leaves no new store behind.
    let fresh = dir.path().join("fresh");
    let (code, _, err) = tapkv_tests::run_with_status(
        &[
            "kv",
            "set",
            "--data",
            fresh.to_str().unwrap(),
            "k",
            "--value-file",
            "/nonexistent/value",
        ],
        "",
        T,
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(!fresh.exists(), "a store was made for a value never read");
}

#[test]
fn kv_takes_a_key_and_value_that_are_not_utf8_as_given() {
    // Before, clap refused them ("invalid UTF-8 was detected"), though the
    // help says KEY is taken literally.
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut cmd = std::process::Command::new(tapkv_tests::tapkv_bin());
    cmd.args(["kv", "set", "--data", d])
        .arg(std::ffi::OsStr::from_bytes(b"\xff\xfe"))
        .arg(std::ffi::OsStr::from_bytes(b"val\xff"));
    let (code, out, err) = tapkv_tests::run_command(cmd, "", T);
    assert_eq!(code, Some(0), "{out}{err}");
    let (ok, out, err) = run(&["shell", "--data", d], "get \\xff\\xfe\n", T);
    assert!(ok, "{err}");
    assert_eq!(out, "VALUE val\\xff\n");
    // A missing store says why, in each case.
    let file = dir.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let (ok, _, err) = run(&["kv", "get", "--data", file.to_str().unwrap(), "k"], "", T);
    assert!(!ok && err.contains("(it is not a directory)"), "{err}");
    let missing = dir.path().join("missing");
    let (ok, _, err) = run(
        &["kv", "get", "--data", missing.to_str().unwrap(), "k"],
        "",
        T,
    );
    assert!(!ok && err.contains("(it does not exist)"), "{err}");
}

#[test]
fn a_new_store_is_not_made_among_other_files() {
    // `--data ~` for `--data ~/db` used to put rocksdb/ and tapkv.lock
    // among the user's files.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    for args in [
        vec!["kv", "set", "--data", d, "k", "v"],
        vec!["load", "--data", d, "--count", "1"],
        vec!["shell", "--data", d],
        vec!["node", "--data", d, "--listen", "127.0.0.1:0"],
    ] {
        let (code, _, err) = tapkv_tests::run_with_status(&args, "", T);
        assert_eq!(code, Some(3), "{args:?}: {err}");
        assert!(
            err.contains("holds other files (notes.txt)"),
            "{args:?}: {err}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["notes.txt"], "something was written");
    // A directory holding a store (with other files beside it) opens.
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let (ok, _, err) = run(&["kv", "set", "--data", s, "k", "v"], "", T);
    assert!(ok, "{err}");
    std::fs::write(store.join("README"), "beside").unwrap();
    let (ok, out, err) = run(&["kv", "get", "--data", s, "k"], "", T);
    assert!(ok && out == "v\n", "{err}");
    let (ok, _, err) = run(&["kv", "set", "--data", s, "k2", "v2"], "", T);
    assert!(ok, "{err}");
}

/// A standard error that cannot be written (`2>/dev/full`, or a closed
/// pipe) leaves the documented exit status: a missing key is still 1 and
/// a failure still 3. `eprintln!` panicked there (exit 101), and in the
/// shell's signal thread it skipped the clean close (found by a review).
#[test]
fn a_full_stderr_keeps_the_documented_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d");
    let d = d.to_str().unwrap();
    let (ok, out, err) = run(&["kv", "set", "--data", d, "k", "v"], "", T);
    assert!(ok, "{out}{err}");
    let status = |args: &[&str]| -> Option<i32> {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let mut child = std::process::Command::new(tapkv_tests::tapkv_bin())
            .args(args)
            .env_remove("TAPKV_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(full)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                panic!("tapkv {args:?} did not end within {T:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    assert_eq!(status(&["kv", "get", "--data", d, "missing"]), Some(1));
    let nowhere = dir.path().join("no-such-dir");
    assert_eq!(
        status(&["admin", "inspect", "--data", nowhere.to_str().unwrap()]),
        Some(3)
    );
}

/// `tapkv node` refuses a pending-frame budget below its `--max-body`
/// (exit 3, naming both, before the data directory is touched): every
/// frame between the two sizes was answered "busy, try again later", on an
/// idle node, for good (found by a review).
#[test]
fn a_node_refuses_a_pending_frame_budget_below_its_max_body() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let d = data.to_str().unwrap();
    for flag in ["--max-pending-body-bytes", "--max-pending-reply-bytes"] {
        let args = [
            "node",
            "--data",
            d,
            "--listen",
            "127.0.0.1:0",
            "--max-body",
            "8388608",
            flag,
            "4194304",
        ];
        let (code, err) = tapkv_tests::run_status(&args, T);
        assert_eq!(code, Some(3), "{flag}: {err}");
        assert!(
            err.contains(flag) && err.contains("--max-body") && err.contains("busy"),
            "{flag}: {err}"
        );
        assert!(!data.exists(), "{flag}: the directory was created");
    }
}
