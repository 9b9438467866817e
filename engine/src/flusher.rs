//! The flusher: background threads that drain each partition's persistence
//! cursor into RocksDB.
//!
//! One round reads a batch from every partition the thread owns, writes them
//! (each partition's items with its new persisted state in the same
//! `WriteBatch`; several partitions share one, up to `WRITE_CHUNK_BYTES`),
//! and advances the persistence cursors of what each write held: a failed
//! write leaves its partitions' cursors where they were, so the retry writes
//! the same items again — nothing is lost or counted twice. While callers
//! wait for durability the round's last write is synced, and one sync serves
//! all of them (group commit). After
//! `flush_retry_limit` consecutive failures the engine is poisoned.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::checkpoint::{CursorProgress, EventRef};
use crate::engine::Shared;
use crate::error::{Error, Result};
use crate::partition::{in_ranges, Partition, PartitionWriter, PERSISTENCE_CURSOR};
use crate::store::{FlushBatch, PartitionDiskState};
use crate::sync::{Arc, Ordering};

/// Items scanned per hold of a partition's writer lock.
const SCAN_PIECE: usize = 256;

/// One nap while a group commit gathers writers.
const GROUP_NAP: Duration = Duration::from_micros(20);

/// How long an acknowledgement waits for synced writes elsewhere to finish
/// (see `mark_synced`).
const IN_FLIGHT_PATIENCE: Duration = Duration::from_millis(100);

/// How long an idle flusher sleeps before looking again.
const IDLE_WAIT: Duration = Duration::from_millis(100);

pub(crate) fn spawn(shared: &Arc<Shared>) -> Result<Vec<JoinHandle<()>>> {
    let n = shared.config.flusher_threads;
    let mut handles = Vec::with_capacity(n);
    for t in 0..n {
        let mine = Arc::clone(shared);
        match std::thread::Builder::new()
            .name(format!("tapkv-flusher-{t}"))
            .spawn(move || run(&mine, t, n))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                // The open fails: the threads already started must not go
                // on using the store.
                shared.aborted.store(true, Ordering::Release);
                shared.notify_flushers();
                for h in handles {
                    let _ = h.join();
                }
                return Err(Error::Io(e));
            }
        }
    }
    Ok(handles)
}

fn run(shared: &Shared, thread: usize, threads: usize) {
    tighten_timer_slack();
    let nice = take_niceness(shared.config.flusher_nice);
    if let Some(slot) = shared.flusher_nice.lock().get_mut(thread) {
        *slot = nice;
    }
    let mine: Vec<&Partition> = shared
        .partitions
        .iter()
        .filter(|p| usize::from(p.id) % threads == thread)
        .collect();
    let mut failures = 0u32;
    let expires = thread_is_pager(&mine);
    loop {
        // A poisoned engine changes nothing more: another flusher thread
        // (or a failed sync of a reservation or window record) poisoned it,
        // and this thread's rounds and expiry pass would go on using seqnos
        // and writing records after the poison (found by a review).
        if shared.aborted.load(Ordering::Acquire) || shared.check_poisoned().is_err() {
            return;
        }
        if expires {
            crate::pager::expire(shared, false);
        }
        let stopping = shared.shutdown.load(Ordering::Acquire);
        let found_work = match run_round(shared, &mine, false) {
            Ok(Round::More) => {
                failures = 0;
                if stopping {
                    // The close drains the rest on its own thread
                    // (`drain_all`), at that thread's priority, not at a
                    // flusher's lowered one.
                    return;
                }
                continue;
            }
            Ok(Round::Paused) => {
                if stopping {
                    return;
                }
                // Sleep until woken on purpose (unpause, shutdown, a durable
                // writer), not by every write's mark.
                shared.flush_signals[thread].wait(true, IDLE_WAIT, IDLE_WAIT, &shared.shutdown);
                continue;
            }
            Ok(outcome) => {
                failures = 0;
                if stopping {
                    return;
                }
                outcome == Round::Done
            }
            Err(e) => {
                // Poisoned elsewhere meanwhile: nothing more to do.
                if matches!(e, Error::Poisoned(_)) {
                    return;
                }
                failures += 1;
                for p in &mine {
                    p.progress.flush_failures.fetch_add(1, Ordering::Relaxed);
                }
                if shared.store.sync_failed() {
                    // Durable writers waiting get the error instead of an
                    // acknowledgement; a reopen recovers what the disk holds.
                    shared.poison_for_failed_sync(&e.to_string());
                    return;
                }
                tracing::warn!(error = %e, attempt = failures, "flush failed; retrying");
                if failures >= shared.config.flush_retry_limit.max(1) {
                    shared.poison(format!("{failures} consecutive flush failures, last: {e}"));
                    return;
                }
                std::thread::sleep(shared.config.flush_retry_backoff);
                continue;
            }
        };
        // A pager pass that stopped at its bound goes on after a nap, as
        // after a round that found work.
        let found_work = found_work || (expires && shared.pager_pending.load(Ordering::Relaxed));
        shared.flush_signals[thread].wait(
            found_work,
            shared.config.flush_interval,
            IDLE_WAIT,
            &shared.shutdown,
        );
    }
}

/// Raises the calling thread's niceness to at least `floor` (Linux:
/// `setpriority` on the thread's id, which is per thread there; a thread
/// already nicer keeps its niceness, so a flusher never raises its own
/// priority; a floor of 0 changes nothing, even for a thread born at a
/// negative niceness) and returns what the OS reports afterwards. A
/// refusal is logged and the thread runs as it was.
#[cfg(target_os = "linux")]
fn take_niceness(floor: i32) -> Option<i32> {
    /// The thread's niceness; `getpriority` may return -1 as a niceness,
    /// so `errno`, cleared before the call, tells a failure apart.
    fn current(tid: libc::id_t) -> std::io::Result<i32> {
        // SAFETY: `getpriority` takes plain integers and writes nothing
        // but this thread's `errno`, which `__errno_location` points to;
        // `last_os_error` reads it at once.
        #[allow(unsafe_code)]
        unsafe {
            *libc::__errno_location() = 0;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            if now == -1 && *libc::__errno_location() != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(now)
        }
    }
    // SAFETY: `gettid` takes nothing and returns the caller's thread id.
    #[allow(unsafe_code)]
    let tid = unsafe { libc::gettid() } as libc::id_t;
    let before = match current(tid) {
        Ok(n) => n,
        Err(error) => {
            // Without the current value a floor could raise a privileged
            // thread's priority: leave it.
            if floor > 0 {
                tracing::warn!(
                    nice = floor,
                    %error,
                    "could not read the flusher's niceness; its floor is not applied"
                );
            }
            return None;
        }
    };
    if floor == 0 || before >= floor {
        return Some(before);
    }
    // SAFETY: `setpriority` takes plain integers and writes nothing but
    // `errno`, read at once by `last_os_error` when the call failed.
    #[allow(unsafe_code)]
    let refused = (unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, floor) } != 0)
        .then(std::io::Error::last_os_error);
    if let Some(error) = refused {
        tracing::warn!(
            nice = floor,
            %error,
            "could not lower the flusher's priority; it runs at its inherited one"
        );
    }
    current(tid).ok()
}

#[cfg(not(target_os = "linux"))]
fn take_niceness(_floor: i32) -> Option<i32> {
    None
}

/// The timer slack a flusher thread asks for (Linux: `PR_SET_TIMERSLACK`).
pub(crate) const FLUSHER_TIMER_SLACK_NS: u64 = 1_000;

/// Makes the calling thread's short naps (a group commit's `GROUP_NAP`,
/// 20 µs) last about what they ask for. With Linux's default slack of 50 µs
/// a 20 µs sleep took 97 µs on average on the 2-core test VM (47 µs with
/// 1 µs of slack), and a group commit gathering writers naps once or more
/// per round. Only the flusher threads change; a failure leaves the
/// default.
#[cfg(target_os = "linux")]
fn tighten_timer_slack() {
    // SAFETY: `prctl(PR_SET_TIMERSLACK, ns)` reads no memory of ours and
    // only changes this thread's timer slack.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_TIMERSLACK,
            FLUSHER_TIMER_SLACK_NS as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not tighten the flusher's timer slack; its naps keep the default"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn tighten_timer_slack() {}

/// Writes everything queued in every partition, on the caller's thread
/// (the close, once the flusher threads have ended), retrying failed rounds
/// as the flusher threads do.
pub(crate) fn drain_all(shared: &Shared) -> Result<()> {
    let all: Vec<&Partition> = shared.partitions.iter().collect();
    let mut failures = 0;
    loop {
        match run_round(shared, &all, true) {
            Ok(Round::More) => failures = 0,
            Ok(_) => return Ok(()),
            Err(e @ Error::Poisoned(_)) => return Err(e),
            Err(e) => {
                failures += 1;
                if failures >= shared.config.flush_retry_limit.max(1) {
                    return Err(e);
                }
                std::thread::sleep(shared.config.flush_retry_backoff);
            }
        }
    }
}

/// Whether a persisted high seqno of `seqno` would lie inside one of the
/// windows `ranges` (START seqno, REVERT or END seqno): at or past its
/// START and short of its last marker.
fn inside_window(ranges: &[(u64, u64)], seqno: u64) -> bool {
    ranges
        .iter()
        .any(|(start, last)| (*start..*last).contains(&seqno))
}

/// Whether a round may stop with the partition's persisted seqno at
/// `seqno`: not inside a reverted window (the disk would say the history
/// reaches a seqno between the window's START and REVERT, and a stream
/// started there — a backfill ends at the persisted seqno — would send the
/// rest of the window as ordinary writes, its REVERT never on disk to undo
/// them), nor inside a completed one (a crash would leave part of the window
/// on disk).
fn may_stop_at(reverted: &[(u64, u64)], completed: &[(u64, u64)], seqno: u64) -> bool {
    !inside_window(reverted, seqno) && !inside_window(completed, seqno)
}

/// What a flush round found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Round {
    /// The flusher is paused (a test hook); nothing was looked at.
    Paused,
    /// Nothing to write.
    Idle,
    /// Wrote everything that was queued.
    Done,
    /// Wrote a full batch; more is waiting.
    More,
}

/// One flush round over `mine`; `forced` runs it even while the flusher is paused
/// (`Engine::run_flush_round`, for tests). The pause is checked under the
/// round lock, so once a caller holding that lock has seen the pause set, no
/// background round runs until it is lifted.
pub(crate) fn run_round(shared: &Shared, mine: &[&Partition], forced: bool) -> Result<Round> {
    let round = round_under_lock(shared, mine, forced);
    // The pager after the round lock is released; it reads each
    // partition's persisted seqno under the shard lock it evicts under.
    // (Not for a paused flusher's background round: a pause stops the
    // table work too, from the next round on.)
    let paused = !forced && shared.flusher_paused.load(Ordering::Acquire);
    if matches!(round, Ok(Round::Idle | Round::Done | Round::More))
        && thread_is_pager(mine)
        && !paused
    {
        crate::pager::run(shared);
    }
    round
}

fn round_under_lock(shared: &Shared, mine: &[&Partition], forced: bool) -> Result<Round> {
    let mut round = shared.flush_lock.lock();
    if !forced && shared.flusher_paused.load(Ordering::Acquire) {
        return Ok(Round::Paused);
    }
    // Under the round lock: a poison set after a flusher thread's check at
    // the top of its loop (a failed synced record write, say) stops the
    // round here. Before, such a round still wrote its entries after the
    // poison (a CI run caught it: `a_poisoned_engine_writes_nothing_more_to_disk`).
    shared.check_poisoned()?;
    let started = Instant::now();
    let wants_sync = shared.persist_waiters.load(Ordering::Acquire) > 0;
    if wants_sync {
        gather_group(shared);
    }
    let cfg = &shared.config;
    // The round lock holds the batch, so its buffers are reused.
    let batch: &mut FlushBatch = &mut round;
    batch.reset();
    let mut pending: Vec<Written<'_>> = Vec::new();
    // `pending[..published]` is written and its cursors advanced.
    let mut published = 0;
    let mut more = false;
    for p in mine {
        let before = batch.len();
        let mut max_cas = p.progress.max_cas.load(Ordering::Relaxed);
        // Closed checkpoints never change: each step takes the next run of
        // them (shared, not copied) under the partition's writer lock, then
        // reads and encodes it without the lock, so writers never wait on
        // that work. Only the open checkpoint is read under the lock, in
        // pieces of `SCAN_PIECE` items. Entries are encoded into the batch's
        // staging buffer (the store writes them in key order).
        //
        // The batch limits are soft: a round stops only where the disk is
        // consistent — at the barrier (a window's START, which begins a
        // checkpoint), at a checkpoint boundary once past the limits, or at
        // the current end of the open checkpoint. Stopping inside a
        // checkpoint could persist a seqno beyond a change that
        // de-duplication moved later in it, and acknowledge a durable write
        // whose key is on disk in neither version.
        let mut scanned: Option<CursorProgress> = None;
        let limits = (cfg.flush_batch_max_items, cfg.flush_batch_max_bytes);
        let mut encode = |item: &crate::item::QueuedItem, reverted: &[(u64, u64)]| {
            if !in_ranges(reverted, item.seqno()) {
                batch.stage(p.id, item);
            }
            // A reverted window's CAS values were handed out too: the CAS
            // clock the next open starts from stays above them (before, it
            // skipped them, and a clock that stepped back could hand them
            // out again).
            max_cas = max_cas.max(item.meta().cas);
        };
        let progress = loop {
            let w = p.lock();
            let done = scanned.as_ref().map_or(0, |s| s.items);
            let run = w.checkpoints.closed_run(
                PERSISTENCE_CURSOR,
                scanned.as_ref(),
                limits.0.saturating_sub(done),
            )?;
            let (next, at_end, may_stop) = if run.is_empty() {
                // The open checkpoint: a piece under the lock.
                let upto = done.saturating_add(SCAN_PIECE);
                let next = w.checkpoints.scan_on(
                    PERSISTENCE_CURSOR,
                    scanned.as_ref(),
                    upto,
                    usize::MAX,
                    w.persist_barrier(),
                    Some(limits),
                    |ev| {
                        if let EventRef::Item(item) = ev {
                            encode(item, &w.reverted);
                        }
                    },
                )?;
                let may_stop = may_stop_at(&w.reverted, &w.completed, next.end_seqno());
                drop(w);
                // Short of the piece: the open checkpoint's current end.
                (next, next.items < upto, may_stop)
            } else {
                let barrier = w.persist_barrier();
                let (reverted, completed) = (w.reverted.clone(), w.completed.clone());
                drop(w);
                let next = run.scan(barrier, Some(limits), |ev| {
                    if let EventRef::Item(item) = ev {
                        encode(item, &reverted);
                    }
                });
                let may_stop = may_stop_at(&reverted, &completed, next.end_seqno());
                (next, false, may_stop)
            };
            // Past the limits, only at a checkpoint boundary outside every
            // window (`may_stop_at`).
            let over = next.items >= limits.0 || next.bytes >= limits.1;
            if at_end || next.blocked || (over && next.at_checkpoint_boundary() && may_stop) {
                break next;
            }
            scanned = Some(next);
        };
        if !progress.moved {
            continue;
        }
        more |= progress.items >= cfg.flush_batch_max_items
            || progress.bytes >= cfg.flush_batch_max_bytes;
        let state = PartitionDiskState {
            high_seqno: progress.end_seqno(),
            checkpoint_id: progress.end_checkpoint_id(),
            max_cas,
        };
        shared.store.add_state_to_batch(batch, p.id, &state)?;
        pending.push((p, progress, state, batch.len() - before));
        // A partition's items and state are whole in one RocksDB batch;
        // partitions need not share one. Writing once the staged bytes
        // reach `WRITE_CHUNK_BYTES` keeps the staging buffer and the
        // RocksDB batch in the core's cache between staging, the WAL copy
        // and the memtable inserts; one batch of a whole round (megabytes)
        // made each of those passes read it from memory.
        if batch.staged_bytes() >= WRITE_CHUNK_BYTES {
            write_part(shared, batch, false)?;
            publish(&pending[published..], started)?;
            published = pending.len();
        }
    }
    if pending.is_empty() {
        if wants_sync {
            // Earlier unsynced writes may be what the waiters need.
            shared.store.sync_wal()?;
            mark_synced(shared, mine)?;
        }
        if relieve_memory_pressure(shared, mine)? {
            return Ok(Round::More);
        }
        return Ok(Round::Idle);
    }
    let items: usize = pending.iter().map(|(.., n)| n).sum();
    let _span = tracing::debug_span!("flush", partitions = pending.len(), items).entered();
    if batch.has_states() {
        // The last part synced (when asked) syncs the earlier ones too: a
        // synced RocksDB write syncs every live WAL file.
        write_part(shared, batch, wants_sync)?;
    } else if wants_sync {
        shared.store.sync_wal()?;
    }
    publish(&pending[published..], started)?;
    let micros = started.elapsed().as_micros() as u64;
    tracing::debug!(micros, synced = wants_sync, "flushed");
    if wants_sync {
        mark_synced(shared, mine)?;
    } else if shared.persist_waiters.load(Ordering::Acquire) > 0 {
        shared.store.sync_wal()?;
        mark_synced(shared, mine)?;
    }
    more |= relieve_memory_pressure(shared, mine)?;
    Ok(if more { Round::More } else { Round::Done })
}

/// A partition's part of a round: how far its scan got, its new persisted
/// state, and the items it staged.
type Written<'a> = (&'a Partition, CursorProgress, PartitionDiskState, usize);

/// Advances the persistence cursors of partitions just written (each one's
/// items and state are on disk, not yet synced) and publishes their
/// persisted seqnos, so that memory never says less than the disk for long
/// (a backfill ends at the persisted seqno) and a later part of the round
/// failing does not write them again.
fn publish(written: &[Written<'_>], started: Instant) -> Result<()> {
    let micros = started.elapsed().as_micros() as u64;
    for (p, progress, state, n) in written {
        // Freed checkpoints are dropped after the partition lock is released.
        let freed = {
            let mut w = p.lock();
            let end = progress.end_seqno();
            w.reverted.retain(|(_, last)| *last > end);
            w.completed.retain(|(_, last)| *last > end);
            w.checkpoints.advance(PERSISTENCE_CURSOR, progress)?
        };
        drop(freed);
        let pr = &p.progress;
        pr.max_cas.store(state.max_cas, Ordering::Relaxed);
        pr.persisted_seqno
            .store(state.high_seqno, Ordering::Release);
        pr.flushes.fetch_add(1, Ordering::Relaxed);
        pr.flushed_items.fetch_add(*n as u64, Ordering::Relaxed);
        pr.flush_micros_total.fetch_add(micros, Ordering::Relaxed);
        pr.last_flush_micros.store(micros, Ordering::Relaxed);
    }
    Ok(())
}

/// Staged bytes after which a round writes what it has staged so far
/// (whole partitions only) instead of gathering one batch for the round.
/// About half a core's L2 cache here: the staging buffer and RocksDB's copy
/// of it stay cached through the WAL append and the memtable inserts.
const WRITE_CHUNK_BYTES: usize = 512 << 10;

/// Writes the staged part of a round (whole partitions, each with its
/// state), unsynced unless `sync`. A failed part leaves its partitions'
/// cursors where they were (the retry writes the same items again, which
/// counts nothing twice); the earlier parts of its round are written and
/// published ([`publish`]). Each part consumes one injected failure
/// (`Engine::inject_flush_failures_after`) once the skips are used up.
fn write_part(shared: &Shared, batch: &mut FlushBatch, sync: bool) -> Result<()> {
    let take = |n: &crate::sync::AtomicUsize| {
        n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    };
    if !take(&shared.injected_flush_skips) && take(&shared.injected_flush_failures) {
        return Err(Error::Storage("injected flush failure".into()));
    }
    shared.store.write(batch, sync)
}

/// Frees checkpoint memory that persisted items would otherwise hold:
/// [`drop_lagging_stream_cursors`] (at `cursor_drop_threshold`, or after a
/// write was refused for memory), then, at half the limit or after a
/// refusal, [`expel_read_items`], and at the threshold or after a refusal
/// again [`close_open_checkpoints_streams_lag_in`]. Returns whether it
/// closed a checkpoint (another round frees it).
fn relieve_memory_pressure(shared: &Shared, mine: &[&Partition]) -> Result<bool> {
    // A refused write also expels: below half the limit the entries would
    // otherwise stay until their checkpoint closes, which a quiet partition
    // may never do, and the write would be refused for as long.
    // Every flag of this thread's partitions is taken, not just the first.
    let refused = mine.iter().fold(false, |any, p| {
        p.memory_refused.swap(false, Ordering::AcqRel) | any
    });
    // And counts as pressure on lagging streams (unless cursor dropping is
    // off): a write needing more than what is left below the threshold is
    // refused before memory reaches it, and a stream lagging behind
    // persisted checkpoints kept it refused for as long as it lagged.
    let pressed =
        at_cursor_drop_threshold(shared) || (refused && shared.config.cursor_drop_threshold < 1.0);
    if pressed {
        drop_lagging_stream_cursors(shared, mine);
    }
    // At the threshold too: one set below half the limit dropped cursors
    // there but expelled nothing until half.
    if !under_memory_pressure(shared) && !refused && !pressed {
        return Ok(false);
    }
    expel_read_items(shared, mine);
    if !pressed {
        return Ok(false);
    }
    close_open_checkpoints_streams_lag_in(shared, mine)
}

/// Takes out of each open checkpoint the persisted entries every cursor has
/// read (`CheckpointManager::expel_read_items`). A replica's only way to
/// free them: it closes checkpoints only when its primary does, so with a
/// smaller checkpoint-memory limit than its primary's open checkpoints add
/// up to, it would otherwise end up refusing every entry but one per flush
/// round. Entries inside an online-update window are never read by the
/// persistence cursor, so never expelled.
fn expel_read_items(shared: &Shared, mine: &[&Partition]) {
    for p in mine {
        let (items, bytes) = p.lock().checkpoints.expel_read_items();
        if items > 0 {
            shared
                .items_expelled
                .fetch_add(items as u64, Ordering::Relaxed);
            tracing::debug!(
                partition = p.id,
                items,
                bytes,
                "expelled persisted checkpoint entries"
            );
        }
    }
}

/// Whether checkpoint memory is at half its limit or more (the flusher then
/// expels read entries). Below half,
/// entries stay until their checkpoint closes and is freed, so a stream
/// registering at a recent seqno still finds them in memory.
fn under_memory_pressure(shared: &Shared) -> bool {
    shared.checkpoint_mem.load(Ordering::Relaxed) >= shared.config.checkpoint_memory_limit / 2
}

/// Whether checkpoint memory is at `cursor_drop_threshold` of its limit
/// (never with a threshold of 1 or more).
fn at_cursor_drop_threshold(shared: &Shared) -> bool {
    let threshold = shared.config.cursor_drop_threshold;
    let limit = shared.config.checkpoint_memory_limit as f64;
    threshold < 1.0 && shared.checkpoint_mem.load(Ordering::Relaxed) as f64 >= limit * threshold
}

/// Under `cursor_drop_threshold` pressure, drops in each partition the
/// stream cursors that alone hold closed checkpoints the persistence cursor
/// has left, once those hold at least a partition's share of half the limit
/// (`CheckpointManager::drop_cursors_behind`). A slow replica's stream would
/// otherwise hold the primary's memory until writes are refused; instead
/// the stream sends the partition again, from disk for what memory no
/// longer holds (as Couchbase's cursor dropping backfills). Other cursors
/// are never dropped.
fn drop_lagging_stream_cursors(shared: &Shared, mine: &[&Partition]) {
    let min_bytes = shared.config.checkpoint_memory_limit / (2 * shared.partitions.len().max(1));
    for p in mine {
        let (dropped, freed) = p
            .lock()
            .checkpoints
            .drop_cursors_behind(PERSISTENCE_CURSOR, min_bytes);
        if dropped.is_empty() {
            continue;
        }
        shared
            .cursors_dropped
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        tracing::warn!(
            partition = p.id,
            cursors = ?dropped,
            checkpoints = freed.len(),
            "checkpoint memory at its cursor-drop threshold: lagging stream cursors dropped"
        );
        // Freed outside the partition's lock.
        drop(freed);
        // Their readers find the cursors gone.
        shared.changed(p.id);
    }
}

/// At the cursor-drop threshold on a primary, closes each partition's open
/// checkpoint that every cursor but the droppable stream cursors has read
/// to its end. Expelling has freed what every cursor has read; what is left
/// in such a checkpoint is held only by lagging streams, which read it
/// closed and are dropped by the next round if they still lag. Persisted
/// items in open checkpoints below their size limit could otherwise hold
/// the memory refused writes wait for: 16 partitions of 32 MiB open
/// checkpoints are the whole default 512 MiB limit. A replica never closes
/// a checkpoint on its own (it follows its primary's ids), nor does a
/// partition with an online-update window.
fn close_open_checkpoints_streams_lag_in(shared: &Shared, mine: &[&Partition]) -> Result<bool> {
    if shared.config.replica {
        return Ok(false);
    }
    let mut closed = false;
    for p in mine {
        // Checked and closed under one lock: a START in between would
        // otherwise have its window's checkpoint closed.
        let read = |w: &PartitionWriter| {
            w.window.is_none() && w.checkpoints.open_checkpoint_read_by_all_but_droppable()
        };
        if let Some(id) = p.create_checkpoint_if(&shared.store, read)? {
            tracing::debug!(
                partition = p.id,
                id,
                "closed an open checkpoint only lagging streams hold, under memory pressure"
            );
            shared.changed(p.id);
            closed = true;
        }
    }
    Ok(closed)
}

/// Group commit: with two or more `Persist` writers waiting, lets the rest
/// of a burst (writers just woken by the last sync, now writing their next
/// item) queue before this round's sync, so one sync serves them all. Waits
/// in short naps while the number of waiters still rises, at most
/// `group_commit_wait`; a lone waiter never waits (its latency is the sync's).
fn gather_group(shared: &Shared) {
    let max = shared.config.group_commit_wait;
    let started = Instant::now();
    let mut seen = shared.persist_waiters.load(Ordering::Acquire);
    if seen < 2 || max.is_zero() {
        return;
    }
    while started.elapsed() < max {
        std::thread::sleep(GROUP_NAP);
        let now = shared.persist_waiters.load(Ordering::Acquire);
        if now <= seen {
            break;
        }
        seen = now;
    }
}

/// Syncs the WAL if partition `p` has persisted entries not yet synced, and
/// records every partition's persisted seqno as synced; the caller holds
/// the round lock, so no round persists more meanwhile. A disk snapshot
/// calls it before it reads: it must hold only versions that survive a
/// crash of the host, or a replica that kept part of it could resume from
/// a primary that lost them and never be sent the older versions of keys
/// the snapshot had newer ones of.
pub(crate) fn sync_persisted(shared: &Shared, p: &Partition) -> Result<()> {
    let persisted = p.progress.persisted_seqno.load(Ordering::Acquire);
    if p.progress.synced_seqno.load(Ordering::Acquire) >= persisted {
        return Ok(());
    }
    shared.store.sync_wal()?;
    let all: Vec<&Partition> = shared.partitions.iter().collect();
    mark_synced(shared, &all)?;
    // `mark_synced` acknowledges nothing while a synced write elsewhere may
    // still fail for pages this sync reported synced; the snapshot must not
    // go on as if it had (before, it did).
    if p.progress.synced_seqno.load(Ordering::Acquire) < persisted {
        return Err(Error::Timeout {
            what: "synced writes under way to finish before a disk snapshot",
            millis: IN_FLIGHT_PATIENCE.as_millis() as u64,
        });
    }
    Ok(())
}

/// The flusher thread that owns partition 0 also runs the pager.
fn thread_is_pager(mine: &[&Partition]) -> bool {
    mine.first().is_some_and(|p| p.id == 0)
}

/// Records that everything persisted so far is synced, and wakes waiters.
/// Refuses, poisoning the engine, once any sync has failed (see
/// `Shared::poison_for_failed_sync`). A synced write elsewhere (a reservation, a
/// window record) under way may yet fail for pages this sync reported
/// synced: it waits for those to finish (they are short, and none needs
/// the round lock this holds), up to `IN_FLIGHT_PATIENCE`; past it, it
/// acknowledges nothing and asks for another round at once.
fn mark_synced(shared: &Shared, mine: &[&Partition]) -> Result<()> {
    // In flight first: a synced write that finished has set its failure
    // before it stopped counting.
    let waiting_since = Instant::now();
    while shared.store.synced_writes_in_flight() > 0 {
        if waiting_since.elapsed() >= IN_FLIGHT_PATIENCE {
            shared.notify_flushers();
            return Ok(());
        }
        std::thread::sleep(GROUP_NAP);
    }
    if shared.store.sync_failed() {
        let e = Error::Storage("an earlier WAL sync failed".into());
        shared.poison_for_failed_sync(&e.to_string());
        return Err(e);
    }
    shared.syncs.fetch_add(1, Ordering::Relaxed);
    for p in mine {
        let persisted = p.progress.persisted_seqno.load(Ordering::Acquire);
        p.progress
            .synced_seqno
            .fetch_max(persisted, Ordering::AcqRel);
    }
    shared.wake_persist_waiters();
    Ok(())
}

#[cfg(all(test, not(any(loom, feature = "loom"))))]
mod tests {
    use super::*;
    use crate::{Engine, WriteOptions};

    /// A disk snapshot's sync that cannot be acknowledged (a synced write
    /// elsewhere still under way, which may yet fail for the pages it
    /// reported synced) fails the snapshot's start instead of letting it
    /// read unsynced versions. Before, it returned as if synced.
    #[test]
    fn a_snapshot_sync_that_cannot_be_acknowledged_fails_instead_of_passing() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::builder(dir.path()).partitions(1).open().unwrap();
        e.set_flusher_paused(true);
        e.set(b"k", b"v", WriteOptions::default()).unwrap();
        while e.run_flush_round().unwrap() {}
        let s = e.live().unwrap();
        let p = s.partition(0).unwrap();
        let persisted = p.progress.persisted_seqno.load(Ordering::Acquire);
        assert!(p.progress.synced_seqno.load(Ordering::Acquire) < persisted);
        let held = s.store.hold_synced_write_in_flight();
        let res = sync_persisted(s, p);
        assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
        drop(held);
        sync_persisted(s, p).unwrap();
        assert!(p.progress.synced_seqno.load(Ordering::Acquire) >= persisted);
    }

    /// The flusher, first to notice another write's failed sync, poisons
    /// the engine with that sync's own error (before: "an earlier WAL sync
    /// failed", and the disk's error was never shown).
    #[test]
    fn a_failed_sync_the_flusher_notices_first_is_named_in_the_poison() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::builder(dir.path()).partitions(1).open().unwrap();
        e.set_flusher_paused(true);
        let s = e.live().unwrap();
        e.inject_sync_failures(1);
        let r = crate::store::Reservation {
            seqno: 1 << 30,
            checkpoint_id: 1 << 20,
        };
        assert!(s.store.put_reservation(0, &r).is_err());
        assert!(!s.is_poisoned.load(Ordering::Acquire));
        assert!(mark_synced(s, &[s.partition(0).unwrap()]).is_err());
        let reason = e.stats().unwrap().poisoned.unwrap();
        assert!(reason.contains("injected WAL sync failure"), "{reason}");
    }
}
