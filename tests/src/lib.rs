//! Helpers shared by tapkv's end-to-end tests: locating the `tapkv` binary,
//! running it as a child process that is always reaped, and reading its
//! output with deadlines (no test may hang).

pub mod net;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Path of the `tapkv` binary: `$TAPKV_BIN`, or `tapkv` next to the test's
/// `deps/` directory (where `cargo build --release --bins` puts it).
/// Panics if it is missing or older than a file it was built from (the
/// list cargo writes beside it, `tapkv.d`; without one, every `.rs` file
/// of the crates it is built from): this crate does not depend on the
/// binary's, so a plain `cargo test` would otherwise run an old binary
/// without a word.
pub fn tapkv_bin() -> PathBuf {
    static CHECKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let bin = match std::env::var_os("TAPKV_BIN") {
                Some(p) => PathBuf::from(p),
                None => {
                    let exe = std::env::current_exe().expect("test executable path");
                    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
                    dir.join("tapkv")
                }
            };
            let built = std::fs::metadata(&bin)
                .and_then(|m| m.modified())
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}: run `cargo build --release --bins` first (make test does)",
                        bin.display()
                    )
                });
            let newer = match std::fs::read_to_string(bin.with_extension("d")) {
                Ok(deps) => newer_dependency(&deps, built),
                Err(_) => {
                    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                    ["engine", "replication", "tools"]
                        .iter()
                        .find_map(|krate| newer_source(&root.join(krate).join("src"), built))
                }
            };
            if let Some(newer) = newer {
                panic!(
                    "{} is older than {}: rebuild it with `cargo build --release --bins` \
                     (make test does)",
                    bin.display(),
                    newer.display()
                );
            }
            bin
        })
        .clone()
}

/// A file of a cargo dep-info list (`target: dep dep ...`, spaces in a path
/// escaped as `\ `) modified after `than`, if any: exactly the inputs the
/// binary was built from (sources, manifests, included files), where a scan
/// of the source directories also finds files no crate compiles into it.
fn newer_dependency(deps: &str, than: std::time::SystemTime) -> Option<PathBuf> {
    let line = deps.lines().next()?;
    let (_, list) = line.split_once(": ")?;
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                current.push(' ');
                chars.next();
            }
            ' ' => {
                if !current.is_empty() {
                    paths.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        paths.push(PathBuf::from(current));
    }
    paths.into_iter().find(|p| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m > than)
    })
}

/// A `.rs` file under `dir` modified after `than`, if any.
fn newer_source(dir: &std::path::Path, than: std::time::SystemTime) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(p) = newer_source(&path, than) {
                return Some(p);
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > than)
        {
            return Some(path);
        }
    }
    None
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    /// The child, until killed or reaped.
    pub child: Option<Child>,
    lines: Option<Receiver<String>>,
}

impl Proc {
    /// Starts `tapkv ARGS` with stdout piped into a line channel.
    pub fn spawn(args: &[&str]) -> Proc {
        Proc::spawn_with(args, Stdio::null(), None, Stdio::inherit(), false, false).0
    }

    /// As [`Proc::spawn`], with the child's standard error (its log) going
    /// to the file `log`.
    pub fn spawn_logging_to(args: &[&str], log: &std::path::Path) -> Proc {
        let file = std::fs::File::create(log).expect("create the log file");
        Proc::spawn_with(args, Stdio::null(), None, Stdio::from(file), true, false).0
    }

    /// As [`Proc::spawn`], with a pipe to the child's stdin.
    pub fn spawn_piped(args: &[&str]) -> (Proc, ChildStdin) {
        let (p, stdin) =
            Proc::spawn_with(args, Stdio::piped(), None, Stdio::inherit(), false, false);
        (p, stdin.expect("piped stdin"))
    }

    /// As [`Proc::spawn`], with the child's open-file limit (soft and hard)
    /// set to `nofile`.
    pub fn spawn_with_open_files(args: &[&str], nofile: u64) -> Proc {
        Proc::spawn_with(
            args,
            Stdio::null(),
            Some(nofile),
            Stdio::inherit(),
            false,
            false,
        )
        .0
    }

    /// [`Proc::spawn`] with SIGHUP ignored, as `nohup` starts a command.
    pub fn spawn_ignoring_sighup(args: &[&str]) -> Proc {
        Proc::spawn_with(args, Stdio::null(), None, Stdio::inherit(), false, true).0
    }

    /// `warn_log`: the child logs at `warn` whatever `TAPKV_LOG` says (its
    /// log is read); otherwise at `warn` unless `TAPKV_LOG` is set.
    fn spawn_with(
        args: &[&str],
        stdin: Stdio,
        nofile: Option<u64>,
        stderr: Stdio,
        warn_log: bool,
        ignore_hup: bool,
    ) -> (Proc, Option<ChildStdin>) {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(tapkv_bin());
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: prctl and getppid are async-signal-safe; the closure reads
        // only `parent`, a copy it owns.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                // Killed with the test thread that started it: a test binary
                // that aborts, or is killed, leaves no node running (a
                // stopped one would stay stopped) holding the log pipe that
                // CI waits on.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the test process has already exited"));
                }
                Ok(())
            });
        }
        if ignore_hup {
            // SAFETY: signal is async-signal-safe; nothing is captured.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(|| {
                    if libc::signal(libc::SIGHUP, libc::SIG_IGN) == libc::SIG_ERR {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
            }
        }
        if let Some(n) = nofile {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and only reads `lim`,
            // a copy owned by the closure.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        // A name that does not resolve (a test's `primary.invalid`) is told
        // in a second, not after the resolver's retries against a machine's
        // slow or unreachable DNS server.
        cmd.env("RES_OPTIONS", "timeout:1 attempts:1");
        if warn_log || std::env::var_os("TAPKV_LOG").is_none() {
            cmd.env("TAPKV_LOG", "warn");
        }
        let mut child = cmd
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn tapkv");
        let input = child.stdin.take();
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
        (
            Proc {
                child: Some(child),
                lines: Some(rx),
            },
            input,
        )
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) while the child runs.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = self.child.as_ref() {
            // SAFETY: kill(2) on our own child's pid.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGSTOP, then waits (bounded) until every thread of the process is
    /// stopped: `kill` returns before a thread running on another core has
    /// taken the signal.
    pub fn stop_all_threads(&self) {
        self.signal(libc::SIGSTOP);
        let Some(pid) = self.child.as_ref().map(|c| c.id()) else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.flatten().all(|t| {
                        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                            // The state follows the parenthesised command.
                            st.rsplit_once(") ").is_some_and(|(_, rest)| {
                                rest.starts_with('T') || rest.starts_with('t')
                            })
                        })
                    })
                })
                .unwrap_or(true);
            if stopped {
                return;
            }
            assert!(Instant::now() < deadline, "process {pid} did not stop");
            std::thread::sleep(Duration::from_millis(5));
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
        self.wait_status(timeout).is_some_and(|s| s.success())
    }

    /// Waits (bounded: panics after `timeout`) for the process to end and
    /// returns its status (`None` if it was already reaped).
    pub fn wait_status(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
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
pub fn run(args: &[&str], stdin: impl AsRef<[u8]>, timeout: Duration) -> (bool, String, String) {
    let (code, out, err) = run_with_status(args, stdin, timeout);
    (code == Some(0), out, err)
}

/// Runs `tapkv ARGS` with empty stdin; returns its exit code (`None` if a
/// signal ended it) and its stderr. Bounded by `timeout` as [`run`] is.
pub fn run_status(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let (code, _, err) = run_with_status(args, "", timeout);
    (code, err)
}

/// [`run`], returning the exit code (`None` if a signal ended it).
pub fn run_with_status(
    args: &[&str],
    stdin: impl AsRef<[u8]>,
    timeout: Duration,
) -> (Option<i32>, String, String) {
    run_command(tapkv_command(args), stdin, timeout)
}

/// `tapkv ARGS` with each command's own default log level: a `TAPKV_LOG`
/// in the test's environment (set to debug a test, say) would change the
/// stderr that tests compare.
fn tapkv_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(tapkv_bin());
    cmd.env_remove("TAPKV_LOG").args(args);
    cmd
}

/// Runs `cmd` (the caller sets its arguments and environment) as
/// [`run_with_status`] runs `tapkv`: stdin given, output captured, killed
/// and a panic after `timeout`.
pub fn run_command(
    cmd: Command,
    stdin: impl AsRef<[u8]>,
    timeout: Duration,
) -> (Option<i32>, String, String) {
    run_command_into(cmd, stdin, Stdio::piped(), timeout)
}

/// Runs `tapkv ARGS` as [`run_with_status`] does, with its standard output
/// a pipe nobody reads (its read end closed first): every write to it
/// fails (`EPIPE`). Returns the exit code and stderr.
pub fn run_with_closed_stdout(
    args: &[&str],
    stdin: impl AsRef<[u8]>,
    timeout: Duration,
) -> (Option<i32>, String) {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2(2) writes two new descriptors into `fds`. Close-on-exec:
    // a child another test spawns meanwhile must not inherit the read end
    // (it would keep the pipe readable).
    #[allow(unsafe_code)]
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just made by pipe(2) and are owned
    // by nothing else.
    #[allow(unsafe_code)]
    let (read_end, write_end) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(read_end);
    let cmd = tapkv_command(args);
    let (code, _, err) = run_command_into(cmd, stdin, Stdio::from(write_end), timeout);
    (code, err)
}

/// [`run_command`] with the child's standard output given.
fn run_command_into(
    mut cmd: Command,
    stdin: impl AsRef<[u8]>,
    stdout: Stdio,
    timeout: Duration,
) -> (Option<i32>, String, String) {
    use std::io::Write;
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tapkv");
    let mut input = child.stdin.take().expect("piped stdin");
    let data = stdin.as_ref().to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(timeout)
        .unwrap_or_else(|_| {
            // Not reaped yet (the waiter still holds it), so the pid is
            // still this child's: kill it rather than leave it running.
            // SAFETY: kill(2) on our own child's pid.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            panic!("{shown} did not finish within {timeout:?}")
        })
        .expect("wait for tapkv");
    let _ = writer.join();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value `tapkv load` writes for key number `i` (see tools/src/load.rs).
pub fn load_value(i: u64, size: usize) -> Vec<u8> {
    let unit = format!("{i}:");
    unit.bytes().cycle().take(size).collect()
}

/// A `tapkv node` child process.
pub struct NodeProc {
    /// The process (killed on drop).
    pub proc: Proc,
    /// Address it listens on.
    pub addr: String,
    /// Its data directory.
    pub data: PathBuf,
    /// Its name.
    pub name: String,
}

/// `tapkv node` arguments of a primary named `name` on data directory `d`,
/// listening on an ephemeral loopback port, then `extra`.
fn primary_args<'a>(d: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "node",
        "--data",
        d,
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    args
}

impl NodeProc {
    /// Starts `tapkv node` on `data`, listening on `listen` (e.g.
    /// `127.0.0.1:0`), optionally as a replica of `primary`, with extra args.
    pub fn start(
        data: &std::path::Path,
        listen: &str,
        primary: Option<&str>,
        name: &str,
        extra: &[&str],
    ) -> NodeProc {
        let d = data.to_str().expect("utf-8 path").to_owned();
        let mut args = vec!["node", "--data", &d, "--listen", listen, "--name", name];
        if let Some(p) = primary {
            args.push("--replica-of");
            args.push(p);
        }
        args.extend_from_slice(extra);
        NodeProc::started(Proc::spawn(&args), data, name)
    }

    /// [`NodeProc::start`] of a primary whose log (standard error) goes to
    /// the file `log`.
    pub fn start_logging_to(
        data: &std::path::Path,
        name: &str,
        extra: &[&str],
        log: &std::path::Path,
    ) -> NodeProc {
        let d = data.to_str().expect("utf-8 path").to_owned();
        let args = primary_args(&d, name, extra);
        NodeProc::started(Proc::spawn_logging_to(&args, log), data, name)
    }

    /// [`NodeProc::start`] of a primary whose open-file limit (soft and
    /// hard) is `nofile`.
    pub fn start_with_open_files(
        data: &std::path::Path,
        name: &str,
        nofile: u64,
        extra: &[&str],
    ) -> NodeProc {
        let d = data.to_str().expect("utf-8 path").to_owned();
        let args = primary_args(&d, name, extra);
        NodeProc::started(Proc::spawn_with_open_files(&args, nofile), data, name)
    }

    /// [`NodeProc::start`] of a primary started with SIGHUP ignored, as
    /// `nohup` starts it.
    pub fn start_ignoring_sighup(data: &std::path::Path, name: &str) -> NodeProc {
        let d = data.to_str().expect("utf-8 path").to_owned();
        let args = primary_args(&d, name, &[]);
        NodeProc::started(Proc::spawn_ignoring_sighup(&args), data, name)
    }

    /// A node process once it has printed its startup line.
    fn started(mut proc: Proc, data: &std::path::Path, name: &str) -> NodeProc {
        let line = proc
            .next_line(Duration::from_secs(60))
            .expect("node exited before its startup line");
        let addr = line
            .split(" listening on ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected startup line {line:?}"))
            .to_owned();
        NodeProc {
            proc,
            addr,
            data: data.to_path_buf(),
            name: name.to_owned(),
        }
    }

    /// A client connected to this node.
    pub fn client(&self) -> tapkv_replication::client::Client {
        tapkv_replication::client::Client::connect(&self.addr, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.addr))
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Sends a signal (e.g. `libc::SIGSTOP`).
    pub fn signal(&self, sig: i32) {
        self.proc.signal(sig);
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        assert!(
            self.proc.wait_success(Duration::from_secs(60)),
            "node {} did not stop cleanly",
            self.name
        );
    }
}

pub use tapkv_replication::client::DumpRow;

/// Flushes the node and returns its persisted items, sorted.
pub fn dump(node: &NodeProc) -> Vec<DumpRow> {
    node.client().dump_rows().expect("dump")
}

/// Waits (bounded by `timeout`) until every replica's dump equals the
/// primary's and every live key reads the same value on all of them; returns
/// the primary's dump. Panics with the differences on timeout.
pub fn wait_converged(
    primary: &NodeProc,
    replicas: &[&NodeProc],
    timeout: Duration,
) -> Vec<DumpRow> {
    let deadline = Instant::now() + timeout;
    loop {
        let want = dump(primary);
        let mut diff = None;
        for r in replicas {
            let got = dump(r);
            if got != want {
                let extra: Vec<_> = got.iter().filter(|x| !want.contains(x)).take(5).collect();
                let missing: Vec<_> = want.iter().filter(|x| !got.contains(x)).take(5).collect();
                diff = Some(format!(
                    "{} differs from primary ({} vs {} rows): extra {extra:?} missing {missing:?}",
                    r.name,
                    got.len(),
                    want.len()
                ));
                break;
            }
        }
        if diff.is_none() {
            let mut pc = primary.client();
            let mut rcs: Vec<_> = replicas.iter().map(|r| r.client()).collect();
            for row in want.iter().filter(|r| !r.deleted) {
                // Dumps escape keys (`tapkv_replication::text`).
                let key = tapkv_replication::text::unescape(row.key.as_bytes())
                    .unwrap_or_else(|e| panic!("dumped key {:?}: {e}", row.key));
                // Absent, or the value: any other error is a failure, not
                // "absent" (all nodes failing one read alike converged).
                let value =
                    |c: &mut tapkv_replication::client::Client, name: &str| match c.get(&key) {
                        Ok((v, _)) => Some(v),
                        Err(e) if e.is_not_found() => None,
                        Err(e) => panic!("{name}: reading {:?}: {e}", row.key),
                    };
                let v = value(&mut pc, &primary.name);
                for (rc, r) in rcs.iter_mut().zip(replicas) {
                    let rv = value(rc, &r.name);
                    if rv != v {
                        diff = Some(format!("{}: value of {} differs", r.name, row.key));
                    }
                }
            }
        }
        match diff {
            None => return want,
            Some(d) if Instant::now() >= deadline => {
                panic!("no convergence within {timeout:?}: {d}")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A loopback address for a node that a test stops and starts again on the
/// same port: a free port outside the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), so no outgoing connection
/// can be handed that port while the node is down. (A port 0 listener gets
/// an ephemeral port, which another connection may take in between.) Ports
/// come from 10000 up to the range's start, or, when the range starts lower
/// than 11000, from above its end.
pub fn restartable_addr() -> String {
    use rand::Rng;
    let range: Vec<u16> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let (low, high) = match range[..] {
        [low, high] => (low, high),
        _ => (32_768, 60_999),
    };
    let ports = if low >= 11_000 {
        10_000..low
    } else if high <= 64_000 {
        high + 1..65_535
    } else if low > 2_048 {
        1_024..low
    } else {
        panic!("the ephemeral port range {low}-{high} leaves no room for a fixed test port");
    };
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(ports.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return format!("127.0.0.1:{port}");
        }
    }
    panic!("no free port in {ports:?}");
}

/// Checks a directory a killed process left: it was not shut down cleanly,
/// and no partition is torn (nothing on disk above the partition's
/// persisted high seqno). Returns the partitions' disk records. `what`
/// prefixes the messages (the round, say).
pub fn assert_killed_and_not_torn(
    view: &tapkv_engine::DiskView,
    what: &str,
) -> Vec<tapkv_engine::PartitionDiskInfo> {
    assert!(
        !view.clean_shutdown().unwrap(),
        "{what}: a killed process cannot have shut down cleanly"
    );
    let parts = view.partitions().unwrap();
    view.for_each_item(|it| {
        let high = parts[usize::from(it.partition)].high_seqno;
        assert!(
            it.record.meta.by_seqno <= high,
            "{what}: partition {} is torn: item seqno {} above persisted {high}",
            it.partition,
            it.record.meta.by_seqno
        );
        Ok(())
    })
    .unwrap();
    parts
}
