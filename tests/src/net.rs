//! Socket helpers with deadlines, shared by the end-to-end tests (as
//! `tapkv_tests::net`) and the in-process node tests of `tapkv-replication`
//! (which include this file by path: that crate cannot depend on this one).

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

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
