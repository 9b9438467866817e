//! Socket helpers with deadlines, shared by the end-to-end tests (as
//! `tapkv_tests::net`) and the in-process node tests of `tapkv-replication`
//! (which include this file by path: that crate cannot depend on this one).

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Limits `conn`'s kernel receive and send buffers to 64 KiB each, so a
/// test that relies on a peer that stops reading to hold a sender back does
/// not depend on the host's (possibly much larger) socket-buffer settings.
pub fn small_socket_buffers(conn: &TcpStream) {
    use std::os::unix::io::AsRawFd;
    let small: libc::c_int = 64 << 10;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: a valid socket and a c_int option of its size.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::setsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
}

/// Accepts one connection on `listener`; panics after `limit` rather than
/// waiting forever for a peer that never connects.
pub fn accept_within(listener: &TcpListener, limit: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                return conn;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {limit:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Bytes the kernel holds unsent on the other end of `conn` (the
/// connection as seen from its peer on this host, an IPv4 loopback
/// connection), from `/proc/net/tcp`; `None` if it is not listed.
pub fn peer_send_queue(conn: &TcpStream) -> Option<u64> {
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        std::net::SocketAddr::V6(_) => String::new(),
    };
    // The peer's socket: local is our peer address, remote is ours.
    let (theirs, ours) = (hex(conn.peer_addr().ok()?), hex(conn.local_addr().ok()?));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) == Some(&theirs.as_str()) && f.get(2) == Some(&ours.as_str()) {
            let tx = f.get(4)?.split(':').next()?;
            u64::from_str_radix(tx, 16).ok()
        } else {
            None
        }
    })
}

/// Waits (up to `limit`, then panics) until the peer of `conn` is blocked
/// sending to it: its unsent bytes are at least `at_least` and have not
/// changed over ten looks 20 ms apart (a sender that can still write adds
/// to them; one blocked on a full buffer does not).
pub fn wait_peer_blocked_sending(conn: &TcpStream, at_least: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    let (mut last, mut same) = (None, 0);
    loop {
        let now = peer_send_queue(conn);
        if now.is_some_and(|q| q >= at_least) && now == last {
            same += 1;
            if same >= 10 {
                return;
            }
        } else {
            same = 0;
        }
        last = now;
        assert!(
            Instant::now() < deadline,
            "the peer never blocked sending (unsent: {now:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
