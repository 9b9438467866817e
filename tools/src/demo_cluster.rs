//! The replication part of `tapkv demo`: a primary and two replicas on
//! loopback, an online update reverted on all three, a replica restarted and
//! caught up, and a check that all three hold identical data.

use std::path::Path;
use std::time::{Duration, Instant};

use tapkv_engine::{Engine, Error};
use tapkv_replication::client::Client;
use tapkv_replication::node::{Node, NodeConfig};

fn start(dir: &Path, name: &str, primary: Option<&str>) -> Result<Node, Error> {
    let engine = Engine::builder(dir.join(name))
        .replica(primary.is_some())
        .open()?;
    let mut cfg = NodeConfig::new("127.0.0.1:0");
    cfg.name = name.to_owned();
    cfg.replica_of = primary.map(str::to_owned);
    Ok(Node::start(engine, cfg)?)
}

fn client(node: &Node) -> Result<Client, Error> {
    crate::connect(
        &node.local_addr().to_string(),
        std::time::Duration::from_secs(30),
    )
}

fn remote(e: tapkv_replication::client::ClientError) -> Error {
    Error::Io(std::io::Error::other(e.to_string()))
}

use tapkv_replication::client::DumpRow as Row;

fn dump(node: &Node) -> Result<Vec<Row>, Error> {
    client(node)?.dump_rows().map_err(remote)
}

/// Waits until both replicas' dumps equal the primary's (at most 30 s).
fn converge(primary: &Node, replicas: [&Node; 2]) -> Result<(Vec<Row>, Duration), Error> {
    let started = Instant::now();
    loop {
        let want = dump(primary)?;
        if replicas
            .iter()
            .map(|r| dump(r))
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .all(|d| *d == want)
        {
            return Ok((want, started.elapsed()));
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(Error::Timeout {
                what: "replicas to converge",
                millis: 30_000,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn run(
    dir: &Path,
    step: &dyn Fn(u32, &str) -> std::io::Result<()>,
    checks: &mut crate::demo::Checks,
) -> Result<(), Error> {
    step(9, "a primary and two replicas on loopback")?;
    let primary = start(dir, "primary", None)?;
    let paddr = primary.local_addr().to_string();
    let mut r1 = start(dir, "replica-1", Some(&paddr))?;
    let r2 = start(dir, "replica-2", Some(&paddr))?;
    outln!(
        "   primary on {paddr}; replica-1 on {}; replica-2 on {}",
        r1.local_addr(),
        r2.local_addr()
    )?;
    let mut c = client(&primary)?;
    for i in 0..2000 {
        c.set(
            format!("order:{i:04}").as_bytes(),
            format!("state=new;n={i}").as_bytes(),
            0,
            false,
        )
        .map_err(remote)?;
    }
    let (rows, took) = converge(&primary, [&r1, &r2])?;
    outln!(
        "   2000 writes to the primary; all three nodes hold the same {} items after {:.0} ms",
        rows.len(),
        took.as_secs_f64() * 1e3
    )?;
    match client(&r1)?.set(b"order:0000", b"x", 0, false) {
        Err(err) => outln!("   a write sent to a replica is refused: {err}")?,
        Ok(_) => {
            checks.check(false, "a replica accepted a client's write");
            outln!("   a write sent to a replica was accepted: CHECK FAILED")?;
        }
    }

    step(
        10,
        "an online update, streamed live, then reverted on all three",
    )?;
    let key = b"order:0042";
    let p = c.partition_of(key);
    // Keys of the same partition: one to create, one to delete in the window.
    let created = (0..)
        .map(|i| format!("order:new-{i}"))
        .find(|k| c.partition_of(k.as_bytes()) == p)
        .unwrap_or_default();
    let deleted = (0..2000)
        .map(|i| format!("order:{i:04}"))
        .find(|k| c.partition_of(k.as_bytes()) == p && k.as_bytes() != key)
        .unwrap_or_default();
    let w = c.update_start(p).map_err(remote)?;
    c.set(key, b"state=shipped", 0, false).map_err(remote)?;
    c.set(created.as_bytes(), b"state=new", 0, false)
        .map_err(remote)?;
    c.delete(deleted.as_bytes()).map_err(remote)?;
    // Streamed live: each replica reads the window's write before the
    // REVERT (or 10 s pass). Checked, since a replica that never got the
    // window would pass the revert's check below.
    for (name, node) in [("replica-1", &r1), ("replica-2", &r2)] {
        let mut rc = client(node)?;
        let started = Instant::now();
        let seen = loop {
            let v = rc.get(key).map_err(remote)?;
            if &v.0[..] == b"state=shipped" || started.elapsed() > Duration::from_secs(10) {
                break v;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let live = checks.check(
            &seen.0[..] == b"state=shipped",
            format!("{name} did not get the window's write before the REVERT"),
        );
        outln!(
            "   window {w} open on partition {p}; {name} already reads order:0042 = {}{}",
            String::from_utf8_lossy(&seen.0),
            if live { "" } else { ": CHECK FAILED" }
        )?;
    }
    let (id, removed, restored) = c.update_revert(p).map_err(remote)?;
    outln!("   in the window: updated order:0042, created {created}, deleted {deleted}")?;
    outln!("   REVERT of window {id}: {removed} key removed, {restored} keys restored")?;
    // The primary's REVERT returns once it is done there; its marker then
    // reaches each replica through the stream. Each node is read until the
    // window's changes are undone there (or 30 s pass), then judged. (The
    // disks never held the window's writes, so comparing dumps alone says
    // nothing of the revert; before, the replicas were read at once and a
    // loaded machine could report a revert still on its way as failed.)
    let (after, _) = converge(&primary, [&r1, &r2])?;
    let mut reverted = after == rows;
    for (name, node) in [
        ("primary", &primary),
        ("replica-1", &r1),
        ("replica-2", &r2),
    ] {
        let mut nc = client(node)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let (v, gone, back) = loop {
            let v = nc.get(key).map_err(remote)?;
            let gone = nc.get(created.as_bytes()).is_err();
            let back = nc.get(deleted.as_bytes()).is_ok();
            let undone = gone && back && &v.0[..] != b"state=shipped";
            if undone || Instant::now() >= deadline {
                break (v, gone, back);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        reverted &= gone && back && &v.0[..] != b"state=shipped";
        outln!(
            "   {name:<9}: order:0042 = {}, {created} {}, {deleted} {}",
            String::from_utf8_lossy(&v.0),
            if gone { "gone" } else { "STILL THERE" },
            if back { "back" } else { "MISSING" }
        )?;
    }
    outln!("   every node holds its pre-window state, and the same data on disk: {reverted}")?;

    if !reverted {
        // The exit status tells, not only the output (a script running
        // `make demo` saw success after a visibly failed revert).
        return Err(Error::WrongState(
            "the REVERT did not bring every node back to its pre-window state".into(),
        ));
    }

    step(11, "replica-1 restarts and catches up")?;
    r1.shutdown()?;
    for i in 0..500 {
        c.set(format!("order:{i:04}").as_bytes(), b"state=paid", 0, false)
            .map_err(remote)?;
    }
    r1 = start(dir, "replica-1", Some(&paddr))?;
    let (rows, took) = converge(&primary, [&r1, &r2])?;
    outln!(
        "   500 writes while it was down; caught up {:.0} ms after restart ({} items)",
        took.as_secs_f64() * 1e3,
        rows.len()
    )?;
    let streams = client(&primary)?.admin("streams").map_err(remote)?;
    let resumed: u64 = streams
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "replica-1")
        .flat_map(|s| s["partitions"].as_array().into_iter().flatten())
        .map(|p| p["resumed_from"].as_u64().unwrap_or(0))
        .sum();
    outln!(
        "   stream \"replica-1\": resumed from seqnos summing to {resumed} (0 would be a full resync)"
    )?;
    if resumed == 0 {
        return Err(Error::WrongState(
            "replica-1 resynchronised in full after a clean restart instead of resuming".into(),
        ));
    }

    step(12, "check: all three nodes hold identical data")?;
    let d = [dump(&primary)?, dump(&r1)?, dump(&r2)?];
    // The rows (keys, seqnos, CAS, sizes, flags), then every live value.
    let mut same = d[0] == d[1] && d[1] == d[2];
    let mut clients = [client(&primary)?, client(&r1)?, client(&r2)?];
    let mut values = 0;
    for row in d[0].iter().filter(|r| !r.deleted) {
        if !same {
            break;
        }
        let key = tapkv_replication::text::unescape(row.key.as_bytes())
            .map_err(|e| Error::Corruption(format!("dumped key {:?}: {e}", row.key)))?;
        let mut got = Vec::with_capacity(3);
        for c in &mut clients {
            got.push(c.get(&key).map_err(remote)?.0);
        }
        same = got[0] == got[1] && got[1] == got[2];
        values += 1;
    }
    outln!(
        "   {} items (keys, seqnos, CAS, sizes) and {values} values on each node: {}",
        d[0].len(),
        if same { "identical" } else { "DIFFERENT" }
    )?;
    r1.shutdown()?;
    r2.shutdown()?;
    primary.shutdown()?;
    if !same {
        return Err(Error::WrongState(
            "replicas diverged from the primary".into(),
        ));
    }
    Ok(())
}
