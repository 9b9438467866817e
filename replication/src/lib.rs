//! tapkv-replication: the wire protocol and tap-style replication.
//!
//! - [`protocol`]: frames (24-byte memcached-style header, extras, key, value),
//!   bounded decoding.
//! - [`message`]: opcodes, status codes, typed stream messages and acks.
//! - [`node`]: a node serving clients and replication streams over TCP, and
//!   the replica side that applies a primary's stream to a local engine.
//! - [`client`]: a blocking client for data, online-update and admin commands.
//! - [`text`]: one-line escapes of arbitrary key and value bytes.
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod client;
pub mod io;
pub mod message;
pub mod node;
pub mod protocol;
mod sync;
/// One-line escapes of key and value bytes (the engine's, which its own
/// error messages use too).
pub use tapkv_engine::text;
