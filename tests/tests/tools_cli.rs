//! The `tapkv` binary: kv, shell, load and admin commands on a data directory.

use std::time::Duration;

use tapkv_tests::run;

const T: Duration = Duration::from_secs(60);

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
    let (ok, out, _) = run(&["admin", "inspect", "--data", d, "--json"], "", T);
    assert!(ok);
    let doc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(doc["clean_shutdown"], true);
    let parts = doc["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 16);
    let items: u64 = parts.iter().map(|p| p["items"].as_u64().unwrap()).sum();
    assert_eq!(items, 2000);
    assert!(parts.iter().all(|p| p["high_seqno"].as_u64().unwrap() > 0));
    let (ok, out, _) = run(&["admin", "dump", "--data", d, "--json"], "", T);
    assert!(ok);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2000);
    for r in &rows {
        for field in ["partition", "seqno", "cas", "key", "value_len"] {
            assert!(!r[field].is_null(), "missing {field} in {r}");
        }
        assert_eq!(r["value_len"], 32);
    }
    let (ok, out, _) = run(&["admin", "inspect", "--data", d], "", T);
    assert!(ok);
    assert!(out.contains("total items: 2000"), "{out}");
}

#[test]
fn a_directory_held_by_another_process_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // A long load holds the directory; its first acknowledged write shows it is open.
    let mut holder =
        tapkv_tests::Proc::spawn(&["load", "--data", d, "--count", "100000000", "--print-acked"]);
    assert!(
        holder.next_line(T).is_some(),
        "holder never opened the directory"
    );
    let (ok, _, err) = run(&["kv", "get", "--data", d, "x"], "", T);
    assert!(!ok);
    assert!(
        err.contains("in use by another tapkv process") && err.contains(d),
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
