//! `tapkv kv get|set|del`: one key operation on a data directory or, with
//! `--addr`, on a running node.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tapkv_engine::{Engine, Error, WriteOptions};

use tapkv_replication::client::ClientError;

use crate::{connect, DurabilityArg, Target};
use tapkv_replication::protocol::DEFAULT_MAX_BODY;

#[derive(Args, Debug)]
pub(crate) struct KvArgs {
    #[command(subcommand)]
    op: KvOp,
    #[command(flatten)]
    wait: crate::Wait,
    /// KEY is written with the shell's escapes (`\\`, `\n`, `\r`, `\t`,
    /// `\xNN`), as `admin dump` and the shell print keys: a key with
    /// spaces, control characters or bytes that are not UTF-8 copied from
    /// a dump. Without it KEY is taken literally.
    #[arg(long, global = true)]
    escaped: bool,
}

#[derive(Subcommand, Debug)]
enum KvOp {
    /// Print the value of KEY, then a newline (none with --raw); exits 1
    /// with a message on stderr if absent.
    Get {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: std::ffi::OsString,
        /// Write the value's bytes exactly, without the newline after them
        /// (for binary values: `kv get --raw K > FILE`).
        #[arg(long)]
        raw: bool,
    },
    /// Store VALUE (or the bytes of --value-file) under KEY.
    Set {
        #[command(flatten)]
        target: Target,
        /// The key (1 to 250 bytes by default; a node's --max-key-size).
        key: std::ffi::OsString,
        /// The value, as given (any bytes; at most 20 MiB by default; the
        /// command line itself allows about 128 KiB: use --value-file for
        /// more, or for bytes with a NUL).
        #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
        value: Option<std::ffi::OsString>,
        /// Read the value's bytes from FILE (`-`: standard input), exactly;
        /// reading stops one byte past the largest value (20 MiB with
        /// --data; with --addr the node's --max-body, and the node decides),
        /// which is refused. Read before the data directory is opened, or
        /// before the node is connected to (up to 21 MiB; a longer value
        /// is read on once the node's limit is known).
        #[arg(long, value_name = "FILE")]
        value_file: Option<std::path::PathBuf>,
        /// Wait for memory (default), the disk, or (with --addr) a
        /// majority of the node's replicas.
        #[arg(long, value_enum, default_value_t)]
        durability: DurabilityArg,
    },
    /// Delete KEY; exits 1 if absent.
    Del {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: std::ffi::OsString,
        /// Wait for memory (default), the disk, or (with --addr) a
        /// majority of the node's replicas.
        #[arg(long, value_enum, default_value_t)]
        durability: DurabilityArg,
    },
}

/// The refusal of `--durability replicate` on a data directory (worded as
/// `load`'s).
const REPLICATE_NEEDS_A_NODE: &str = "--durability replicate needs a node with replicas; \
     `kv --data` writes to a data directory in this process (use --addr ADDR, or memory or persist)";

pub(crate) fn run(args: KvArgs) -> Result<ExitCode, Error> {
    // Refused before the directory is opened (or created).
    if let KvOp::Set {
        target,
        durability: DurabilityArg::Replicate,
        ..
    }
    | KvOp::Del {
        target,
        durability: DurabilityArg::Replicate,
        ..
    } = &args.op
    {
        if target.data.is_some() {
            return Ok(crate::usage_error(REPLICATE_NEEDS_A_NODE));
        }
    }
    let key = match &args.op {
        KvOp::Get { key, .. } | KvOp::Set { key, .. } | KvOp::Del { key, .. } => {
            key_bytes(key, args.escaped)?
        }
    };
    if let Some(code) = remote(&args.op, &key, args.wait)? {
        return Ok(code);
    }
    match args.op {
        KvOp::Get { target, raw, .. } => {
            let engine = reader(existing(local(&target)?)?).open()?;
            match engine.get(&key) {
                Ok(item) => {
                    print_value(item.value(), raw)?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(Error::NotFound) => not_found(&key),
                Err(e) => Err(e),
            }
        }
        KvOp::Set {
            target,
            value,
            value_file,
            durability,
            ..
        } => {
            let dir = local(&target)?;
            crate::check_data_dir(dir)?;
            // Read before the directory is opened (and locked, or made):
            // `kv get --raw ... | kv set --value-file -` on one directory
            // waits for the get to finish, and a bad --value-file leaves
            // nothing behind. The engine this opens takes values up to its
            // builder's `max_value_size`.
            let builder = Engine::builder(dir);
            let max = builder.config().max_value_size;
            // A key the engine refuses is refused before a store is made
            // for it (before, `kv set --data NEW ''` left an empty store).
            // An existing store decides itself: it takes keys as long as
            // the longest it holds.
            let max_key = builder.config().max_key_size;
            if key.is_empty() {
                return Err(Error::InvalidArgument("empty key".into()));
            }
            if key.len() > max_key && !dir.join("rocksdb").join("CURRENT").exists() {
                return Err(Error::KeyTooLarge {
                    len: key.len(),
                    max: max_key,
                });
            }
            let value = value_bytes(value.as_deref(), value_file.as_deref(), max)?;
            let engine = builder.open()?;
            let r = engine.set(&key, value, WriteOptions::durable(durability.into()))?;
            // Closed (flushed) before OK is printed: OK means it is on disk.
            engine.close()?;
            outln!("{}", set_ok(r.partition, r.seqno, r.cas))?;
            Ok(ExitCode::SUCCESS)
        }
        KvOp::Del {
            target, durability, ..
        } => {
            let engine = reader(existing(local(&target)?)?).open()?;
            match engine.delete(&key, WriteOptions::durable(durability.into())) {
                Ok(r) => {
                    engine.close()?;
                    outln!("OK partition={} seqno={}", r.partition, r.seqno)?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(Error::NotFound) => not_found(&key),
                Err(e) => Err(e),
            }
        }
    }
}

/// KEY's bytes: the argument as is, or with `--escaped` its escapes read.
/// (Any bytes: an argument need not be UTF-8.)
fn key_bytes(key: &std::ffi::OsStr, escaped: bool) -> Result<Vec<u8>, Error> {
    use std::os::unix::ffi::OsStrExt;
    if !escaped {
        return Ok(key.as_bytes().to_vec());
    }
    tapkv_engine::text::unescape(key.as_bytes())
        .map_err(|e| Error::InvalidArgument(format!("KEY with --escaped: {e}")))
}

/// The answer to a missing key: a message on stderr naming it (escaped as
/// `--escaped` reads it back), exit 1.
fn not_found(key: &[u8]) -> Result<ExitCode, Error> {
    errln!(
        "error: not_found: key \"{}\" not found",
        tapkv_engine::text::escape(key)
    );
    Ok(ExitCode::FAILURE)
}

/// Writes a value to standard output, with a newline after it unless `raw`.
fn print_value(value: &[u8], raw: bool) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(value)?;
    if !raw {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// The value of `kv set`: the argument's text, or the bytes of `file`
/// (`-`: standard input), read whole; an unreadable file is named.
fn value_bytes(
    value: Option<&std::ffi::OsStr>,
    file: Option<&std::path::Path>,
    max: usize,
) -> Result<Vec<u8>, Error> {
    Value::open(value, file)?.finish(max)
}

/// A `kv set` value being read, at most one byte past the limit it is read
/// up to: `--value-file /dev/zero` (or an endless `-`) used to be read until
/// memory ran out.
struct Value {
    bytes: Vec<u8>,
    /// A regular file's size: one over the limit is refused unread.
    size: Option<usize>,
    /// Where the rest comes from, and its name for errors; `None` once read
    /// to its end.
    rest: Option<(Box<dyn std::io::Read>, String)>,
}

impl Value {
    /// No value (a `get` or a `del`).
    const EMPTY: Value = Value {
        bytes: Vec::new(),
        size: None,
        rest: None,
    };

    /// The value as given, or its file opened.
    fn open(
        value: Option<&std::ffi::OsStr>,
        file: Option<&std::path::Path>,
    ) -> Result<Value, Error> {
        let mut size = None;
        let rest: (Box<dyn std::io::Read>, String) = match (value, file) {
            (Some(v), _) => {
                return Ok(Value {
                    bytes: std::os::unix::ffi::OsStrExt::as_bytes(v).to_vec(),
                    size: None,
                    rest: None,
                })
            }
            (None, Some(f)) if f == std::path::Path::new("-") => {
                (Box::new(std::io::stdin()), "standard input".to_owned())
            }
            (None, Some(f)) => {
                let what = format!("{} (--value-file)", f.display());
                let file = std::fs::File::open(f).map_err(|e| {
                    Error::Io(std::io::Error::new(
                        e.kind(),
                        format!("cannot read the value from {what}: {e}"),
                    ))
                })?;
                if let Ok(m) = file.metadata() {
                    if m.is_file() {
                        size = Some(usize::try_from(m.len()).unwrap_or(usize::MAX));
                    }
                }
                (Box::new(file), what)
            }
            (None, None) => {
                return Err(Error::InvalidArgument(
                    "give VALUE or --value-file FILE".into(),
                ))
            }
        };
        Ok(Value {
            bytes: Vec::new(),
            size,
            rest: Some(rest),
        })
    }

    /// Reads on until the value is whole or longer than `max`; true if it
    /// is whole.
    fn read_upto(&mut self, max: usize) -> Result<bool, Error> {
        use std::io::Read;
        let Some((src, what)) = &mut self.rest else {
            return Ok(true);
        };
        if self.bytes.len() > max || self.size.is_some_and(|len| len > max) {
            return Ok(false);
        }
        let want = u64::try_from(max + 1 - self.bytes.len()).unwrap_or(u64::MAX);
        let n = src.take(want).read_to_end(&mut self.bytes).map_err(|e| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("cannot read the value from {what}: {e}"),
            ))
        })?;
        if u64::try_from(n).unwrap_or(u64::MAX) < want {
            self.rest = None;
            return Ok(true);
        }
        Ok(false)
    }

    /// The whole value, if it holds at most `max` bytes.
    fn finish(mut self, max: usize) -> Result<Vec<u8>, Error> {
        if let Some(len) = self.size.filter(|&len| len > max) {
            return Err(Error::ValueTooLarge { len, max });
        }
        // Whole means at most `max` bytes were read; a value given as an
        // argument is whole at once, and its length checked where it is
        // written, as before.
        if self.read_upto(max)? {
            return Ok(self.bytes);
        }
        let what = self
            .rest
            .as_ref()
            .map_or("VALUE", |(_, what)| what.as_str());
        Err(Error::InvalidArgument(format!(
            "the value in {what} is longer than the maximum value size of {max} bytes \
             (reading stopped there)"
        )))
    }
}

/// The engine of `kv get` and `kv del` on a directory: any key up to the
/// largest an engine takes (65,535 bytes), since a node may have stored
/// keys under a larger `--max-key-size` than the default 250 (before, such
/// a key was listed by `admin dump` and refused by `kv get`). `kv set`
/// keeps the default.
fn reader(dir: &std::path::Path) -> tapkv_engine::EngineBuilder {
    Engine::builder(dir).max_key_size(65_535)
}

/// The answer to a successful `kv set`, local or remote.
fn set_ok(partition: u16, seqno: u64, cas: u64) -> String {
    format!("OK partition={partition} seqno={seqno} cas={cas}")
}

fn local(t: &Target) -> Result<&std::path::Path, Error> {
    t.data
        .as_deref()
        .ok_or_else(|| Error::InvalidArgument("give --data DIR or --addr ADDR".into()))
}

/// `dir`, if it holds a store: a read or a delete does not create one (a
/// mistyped path would otherwise answer "not found" from a new, empty
/// directory).
fn existing(dir: &std::path::Path) -> Result<&std::path::Path, Error> {
    // A store's directory, even one the engine then refuses as damaged (its
    // error says so; "nothing has been written there" would not).
    let db = dir.join("rocksdb");
    if db.join("CURRENT").exists() || std::fs::read_dir(&db).is_ok_and(|mut d| d.next().is_some()) {
        return Ok(dir);
    }
    // Said as it is: a missing path, a file, or a directory with no store.
    let why = match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "it does not exist",
        Ok(m) if !m.is_dir() => "it is not a directory",
        _ => "nothing has been written there",
    };
    Err(Error::InvalidArgument(format!(
        "{} is not a tapkv data directory ({why})",
        dir.display()
    )))
}

/// Runs the operation against a node when `--addr` is given.
fn remote(op: &KvOp, key: &[u8], wait: crate::Wait) -> Result<Option<ExitCode>, Error> {
    let target = match op {
        KvOp::Get { target, .. } | KvOp::Set { target, .. } | KvOp::Del { target, .. } => target,
    };
    let Some(addr) = &target.addr else {
        return Ok(None);
    };
    // A set's value is read before connecting, up to the default request
    // limit: a slow `--value-file -` would otherwise hold one of the node's
    // connections, and could outlast its idle timeout. A longer value is
    // read on once the node's own limit is known.
    let value = match op {
        KvOp::Set {
            value, value_file, ..
        } => {
            let mut v = Value::open(value.as_deref(), value_file.as_deref())?;
            v.read_upto(DEFAULT_MAX_BODY)?;
            v
        }
        KvOp::Get { .. } | KvOp::Del { .. } => Value::EMPTY,
    };
    let mut c = connect(addr, wait.timeout())?;
    let write = !matches!(op, KvOp::Get { .. });
    let fail = |e: ClientError| -> Result<Option<ExitCode>, Error> {
        if e.is_not_found() {
            not_found(key).map(Some)
        } else {
            // As every other failure: 3 (`tapkv --help`), not a missing key.
            errln!(
                "{}",
                crate::error_line(&crate::remote_error(addr, wait, e, write))
            );
            Ok(Some(ExitCode::from(crate::EXIT_ERROR)))
        }
    };
    match op {
        KvOp::Get { raw, .. } => match c.get(key) {
            Ok((v, _)) => {
                print_value(&v, *raw)?;
                Ok(Some(ExitCode::SUCCESS))
            }
            Err(e) => fail(e),
        },
        KvOp::Set { durability, .. } => {
            // No frame the node takes carries more than its --max-body
            // (from its HELLO); the node refuses a value past its own limit.
            // Past the frame limit, say so: it is not the node's maximum
            // value size (before, it was reported as one).
            let frame = c.max_body();
            let cannot = |len: String| {
                Error::InvalidArgument(format!(
                    "the value{len} is longer than the node's largest frame, {frame} bytes (its \
                     --max-body): it cannot be sent (the node's maximum value size is lower \
                     still)"
                ))
            };
            let v = value.finish(frame).map_err(|e| match e {
                Error::ValueTooLarge { len, .. } => cannot(format!(" of {len} bytes")),
                Error::InvalidArgument(_) => cannot(String::new()),
                other => other,
            })?;
            match c.set_durable(key, &v, 0, (*durability).into()) {
                Ok(r) => {
                    outln!("{}", set_ok(r.partition, r.seqno, r.cas))?;
                    Ok(Some(ExitCode::SUCCESS))
                }
                Err(e) => fail(e),
            }
        }
        KvOp::Del { durability, .. } => match c.delete_durable(key, (*durability).into()) {
            Ok(r) => {
                outln!("OK partition={} seqno={}", r.partition, r.seqno)?;
                Ok(Some(ExitCode::SUCCESS))
            }
            Err(e) => fail(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(n: usize) -> Value {
        Value {
            bytes: Vec::new(),
            size: None,
            rest: Some((Box::new(std::io::Cursor::new(vec![7u8; n])), "t".into())),
        }
    }

    #[test]
    fn a_value_read_in_two_stages_is_whole_or_refused() {
        // The first stage stops one byte past its limit; the second reads on.
        let mut v = reading(100);
        assert!(!v.read_upto(10).unwrap());
        assert_eq!(v.bytes.len(), 11);
        assert_eq!(v.finish(200).unwrap(), vec![7u8; 100]);
        let mut v = reading(100);
        assert!(!v.read_upto(10).unwrap());
        let e = v.finish(50).unwrap_err();
        assert!(
            e.to_string()
                .contains("longer than the maximum value size of 50"),
            "{e}"
        );
        // Exactly at the limit is whole.
        let mut v = reading(10);
        assert!(v.read_upto(10).unwrap());
        assert_eq!(v.finish(10).unwrap().len(), 10);
        // A regular file's size refuses it unread.
        let mut v = reading(100);
        v.size = Some(100);
        assert!(!v.read_upto(50).unwrap());
        assert!(v.bytes.is_empty());
        assert!(matches!(
            v.finish(50),
            Err(Error::ValueTooLarge { len: 100, max: 50 })
        ));
    }
}
