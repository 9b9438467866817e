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
