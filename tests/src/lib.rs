//! Helpers shared by tapkv's end-to-end tests: locating the `tapkv` binary,
//! running it as a child process that is always reaped, and reading its
//! output with deadlines (no test may hang).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Path of the `tapkv` binary: `$TAPKV_BIN`, or `tapkv` next to the test's
/// `deps/` directory (where `cargo build --release --bins` puts it).
pub fn tapkv_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TAPKV_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("tapkv");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --release --bins` first (make test does)",
        bin.display()
    );
    bin
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    lines: Option<Receiver<String>>,
}

impl Proc {
    /// Starts `tapkv ARGS` with stdout piped into a line channel.
    pub fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(tapkv_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tapkv");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        Proc {
            child: Some(child),
            lines: Some(rx),
        }
    }

    /// The next stdout line, or `None` at end of output; panics after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let rx = self.lines.as_ref()?;
        match rx.recv_timeout(timeout) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("no output from tapkv within {timeout:?}"),
        }
    }

    /// Kills the process with SIGKILL and waits for it (bounded).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every remaining stdout line up to end of output (after a kill or exit).
    pub fn drain(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while let Some(l) = self.next_line(deadline.saturating_duration_since(Instant::now())) {
            out.push(l);
        }
        out
    }

    /// Waits for a normal exit (bounded) and returns whether it succeeded.
    pub fn wait_success(&mut self, timeout: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "tapkv did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `tapkv ARGS` to completion (bounded) and returns (success, stdout, stderr).
pub fn run(args: &[&str], stdin: &str, timeout: Duration) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(tapkv_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tapkv");
    let mut input = child.stdin.take().expect("piped stdin");
    let data = stdin.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(data.as_bytes());
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("tapkv {args:?} did not finish within {timeout:?}"))
        .expect("wait for tapkv");
    let _ = writer.join();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value `tapkv load` writes for key number `i` (see tools/src/load.rs).
pub fn load_value(i: u64, size: usize) -> Vec<u8> {
    let unit = format!("{i}:");
    unit.bytes().cycle().take(size).collect()
}
