//! The agent's replication-stream core: sequence numbers, the retention buffer, the hash
//! table of what the master target has applied, sync barriers, the measurement of a move to
//! another process server, and what to do when a stream ends. Plain Rust, no I/O, time and
//! randomness passed in.
//!
//! Invariants:
//! - every captured write gets the next seq; batches are immutable once numbered, so a
//!   resend of `first..=last` always carries the same bytes (the process server's nonce
//!   derivation relies on this);
//! - a batch stays retained until an ack says it is applied;
//! - `applied_tables` is exactly the disk state as of `applied_seq`: only applied batches'
//!   block hashes are folded into it, so after a crash a rescan against it re-captures
//!   everything that might not have reached the replica.
use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use haven_actors::Backoff;

use crate::proto::MoveStats;

/// Reconnect backoff after the process server or the network ended a stream.
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Block granularity of change detection.
pub const BLOCK_BYTES: u64 = 4096;

/// A table entry whose content is not known (the partial tail block of a disk that was
/// resized): it matches no real block, so the next scan sends the block.
pub const UNKNOWN_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

/// A block hash update carried by a batch: (disk index, block index, new hash).
pub type HashUpdate = (u16, u32, u64);

#[derive(Debug)]
pub struct RetainedBatch {
    pub first_seq: u64,
    pub last_seq: u64,
    /// The encoded `AgentFrame::Batch` carrying this batch, ready to send as is.
    pub body: Vec<u8>,
    /// Payload bytes of the writes in it.
    pub raw_bytes: u64,
    pub captured_ms: u64,
    pub updates: Vec<HashUpdate>,
    /// Every disk's size as of this batch (the body carries the same).
    pub sizes: Vec<u64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct InitialSync {
    pub total_bytes: u64,
    pub scanned_bytes: u64,
    pub captured_bytes: u64,
    pub applied_bytes: u64,
    /// Last seq of the first full pass, once the pass is complete.
    pub pass_last_seq: Option<u64>,
}

impl InitialSync {
    pub fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            return 0.0;
        }
        let scanned = self.scanned_bytes as f64 / self.total_bytes as f64;
        let applied = if self.captured_bytes == 0 {
            1.0
        } else {
            self.applied_bytes as f64 / self.captured_bytes as f64
        };
        (scanned * applied * 100.0).min(99.9)
    }
}

/// How a stream to the process server ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The assignment moved the machine to another process server.
    Moved,
    /// The process server or the network failed, or refused the stream (with why).
    Peer(String),
    /// A failure of this agent (a bug, its own I/O): the supervisor's business.
    Local(String),
}

/// What the stream driver does after a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Open a stream to the (new) process server at once.
    ReconnectNow,
    /// Reconnect after this long (jittered backoff, bounded).
    ReconnectAfter(Duration),
    /// Stop; the supervisor restarts the stream.
    Fail,
}

/// What an ack changed that the shell must act on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AckOutcome {
    /// A sync barrier is now applied: tell the configuration node at once.
    pub barrier_applied: bool,
    /// A move completed with these figures.
    pub moved: Option<MoveStats>,
}

/// A move in progress, as the agent measures it.
#[derive(Clone, Debug)]
struct PendingMove {
    noticed: Instant,
    generation: u64,
    bytes_resent: u64,
    /// The move is complete once the new process server has cached through this seq.
    until_cached: u64,
}

pub struct AgentCore {
    pub epoch: u32,
    /// Next seq to assign; 0 while unknown (after a restart, until a stream reports the floor).
    next_seq: u64,
    pub cached_seq: u64,
    pub applied_seq: u64,
    retained: VecDeque<Arc<RetainedBatch>>,
    retained_bytes: u64,
    pub retention_limit_bytes: u64,
    pub applied_tables: Vec<Vec<u64>>,
    /// The disks' sizes as of `applied_seq` (what the replica has, and what the applied
    /// tables describe).
    pub applied_sizes: Vec<u64>,
    /// The disks' sizes as captured: what the next batch carries.
    sizes: Vec<u64>,
    /// Applied tables changed since the last snapshot.
    pub applied_dirty: bool,
    /// Hash updates folded into the applied tables since the journal last took them.
    journal_pending: Vec<HashUpdate>,
    journal_seq: u64,
    pub initial: Option<InitialSync>,
    pub raw_bytes_sent: u64,
    pub raw_bytes_captured: u64,
    pub raw_bytes_applied: u64,
    /// The sync barrier the configuration node asked for, not yet captured.
    barrier_wanted: Option<u64>,
    /// The last barrier captured: (id, the seq that covers everything written before it).
    barrier_done: Option<(u64, u64)>,
    /// When a move was noticed whose first stream has not opened yet (kept across failed
    /// attempts, so they count in the pause).
    move_noticed: Option<Instant>,
    pending_move: Option<PendingMove>,
    pub last_move: Option<MoveStats>,
    /// A stream to the process server is open.
    pub connected: bool,
    /// Why the last stream ended, until a new one opens.
    pub degraded_reason: Option<String>,
    backoff: Backoff,
}

impl AgentCore {
    pub fn new(
        epoch: u32,
        applied_seq: u64,
        applied_tables: Vec<Vec<u64>>,
        applied_sizes: Vec<u64>,
        retention_limit_bytes: u64,
        initial: Option<InitialSync>,
    ) -> Self {
        debug_assert_eq!(applied_tables.len(), applied_sizes.len());
        Self {
            epoch,
            next_seq: 0,
            cached_seq: 0,
            applied_seq,
            retained: VecDeque::new(),
            retained_bytes: 0,
            retention_limit_bytes,
            applied_tables,
            sizes: applied_sizes.clone(),
            applied_sizes,
            applied_dirty: false,
            journal_pending: Vec::new(),
            journal_seq: applied_seq,
            initial,
            raw_bytes_sent: 0,
            raw_bytes_captured: 0,
            raw_bytes_applied: 0,
            barrier_wanted: None,
            barrier_done: None,
            move_noticed: None,
            pending_move: None,
            last_move: None,
            connected: false,
            degraded_reason: None,
            backoff: Backoff::new(RECONNECT_MIN, RECONNECT_MAX),
        }
    }

    /// A new protection epoch: `fresh` replaces this core, keeping what outlives a stream
    /// (the move figures, the connection state).
    pub fn renew(&mut self, fresh: AgentCore) {
        let last_move = self.last_move.take();
        let degraded_reason = self.degraded_reason.take();
        let move_noticed = self.move_noticed.take();
        let connected = self.connected;
        *self = AgentCore {
            last_move,
            connected,
            degraded_reason,
            move_noticed,
            ..fresh
        };
    }

    // ---- sync barriers ----------------------------------------------------------------

    /// The configuration node asks for barrier `id`, or for none. Returns whether a capture
    /// pass should start now.
    pub fn handle_sync_request(&mut self, id: Option<u64>) -> bool {
        match id {
            Some(id) => {
                let done = self.barrier_done.is_some_and(|(d, _)| d == id);
                if done || self.barrier_wanted == Some(id) {
                    return false;
                }
                self.barrier_wanted = Some(id);
                true
            }
            None => {
                self.barrier_done = None;
                false
            }
        }
    }

    /// The barrier a pass starting now will complete.
    pub fn barrier_for_pass(&self) -> Option<u64> {
        self.barrier_wanted
    }

    /// A complete pass that started while barrier `id` was wanted: everything written before
    /// the request is captured, through [`captured_seq`](Self::captured_seq).
    pub fn handle_barrier_captured(&mut self, id: u64) {
        self.barrier_done = Some((id, self.captured_seq()));
        if self.barrier_wanted == Some(id) {
            self.barrier_wanted = None;
        }
    }

    /// The last barrier captured, for the report: (id, seq).
    pub fn barrier_done(&self) -> Option<(u64, u64)> {
        self.barrier_done
    }

    // ---- streams ----------------------------------------------------------------------

    /// The assignment moved the machine to another process server.
    pub fn handle_moved(&mut self, now: Instant) {
        self.move_noticed.get_or_insert(now);
    }

    /// A stream opened to the process server of `generation` (see
    /// [`handle_stream_open`](Self::handle_stream_open)); a move noticed before is measured
    /// from here until the new server has cached what had to travel again.
    pub fn handle_stream_opened(
        &mut self,
        now: Instant,
        cached: u64,
        applied: u64,
        generation: u64,
    ) -> (u64, AckOutcome) {
        let old_cached = self.cached_seq;
        let after = self.handle_stream_open(cached, applied);
        self.connected = true;
        self.degraded_reason = None;
        self.backoff.handle_start(now);
        if let Some(noticed) = self.move_noticed.take() {
            // What the old process server already held but must travel again.
            let resend = self.batches_after(after, usize::MAX);
            self.pending_move = Some(PendingMove {
                noticed,
                generation,
                bytes_resent: resend
                    .iter()
                    .filter(|b| b.last_seq <= old_cached)
                    .map(|b| b.raw_bytes)
                    .sum(),
                until_cached: resend.first().map(|b| b.last_seq).unwrap_or(0),
            });
        }
        let outcome = AckOutcome {
            barrier_applied: false,
            moved: self.finish_move(now, cached),
        };
        (after, outcome)
    }

    /// An ack on the open stream.
    pub fn handle_stream_ack(&mut self, now: Instant, cached: u64, applied: u64) -> AckOutcome {
        let before = self.applied_seq;
        self.handle_ack(cached, applied);
        AckOutcome {
            barrier_applied: self
                .barrier_done
                .is_some_and(|(_, seq)| before < seq && seq <= applied),
            moved: self.finish_move(now, cached),
        }
    }

    /// The move is over once the new process server has cached what had to travel again.
    fn finish_move(&mut self, now: Instant, cached_here: u64) -> Option<MoveStats> {
        let p = self
            .pending_move
            .take_if(|p| cached_here >= p.until_cached)?;
        let stats = MoveStats {
            generation: p.generation,
            pause_ms: now.duration_since(p.noticed).as_millis() as u64,
            bytes_resent: p.bytes_resent,
        };
        self.last_move = Some(stats.clone());
        Some(stats)
    }

    /// A stream ended: reconnect at once, after a backoff, or give up to the supervisor.
    /// `jitter_unit` in [0, 1).
    pub fn handle_stream_end(&mut self, now: Instant, end: StreamEnd, jitter_unit: f64) -> Next {
        self.connected = false;
        match end {
            StreamEnd::Moved => {
                self.handle_moved(now);
                Next::ReconnectNow
            }
            StreamEnd::Peer(reason) => {
                self.degraded_reason = Some(reason);
                Next::ReconnectAfter(self.backoff.handle_failure(now, jitter_unit))
            }
            StreamEnd::Local(reason) => {
                self.degraded_reason = Some(reason);
                Next::Fail
            }
        }
    }

    /// Whether seqs can be assigned (the floor is known).
    pub fn seq_ready(&self) -> bool {
        self.next_seq != 0
    }

    pub fn captured_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1).max(self.applied_seq)
    }

    pub fn retained_bytes(&self) -> u64 {
        self.retained_bytes
    }

    /// Room for another batch of `bytes`? A batch larger than the whole limit is admitted
    /// when nothing is retained, so progress is always possible.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.retained.is_empty() || self.retained_bytes + bytes <= self.retention_limit_bytes
    }

    pub fn oldest_unapplied_ms(&self) -> u64 {
        self.retained.front().map(|b| b.captured_ms).unwrap_or(0)
    }

    /// A stream to a process server opened; it holds everything through `cached` and the
    /// master target applied through `applied`. Returns the seq after which to send.
    pub fn handle_stream_open(&mut self, cached: u64, applied: u64) -> u64 {
        let floor = cached.max(applied);
        if self.next_seq == 0 {
            self.next_seq = floor.max(self.applied_seq) + 1;
        }
        debug_assert!(self.next_seq > floor || self.retained.is_empty() || cached == 0);
        self.handle_ack(cached, applied);
        // Retained batches the server has not cached must travel again.
        floor.max(self.applied_seq)
    }

    /// An ack from the process server: drop what is applied, fold its hashes into the
    /// applied tables.
    pub fn handle_ack(&mut self, cached: u64, applied: u64) {
        self.cached_seq = self.cached_seq.max(cached);
        while let Some(b) = self.retained.front() {
            if b.last_seq > applied {
                break;
            }
            let b = self.retained.pop_front().expect("front exists");
            self.retained_bytes -= b.body.capacity() as u64;
            self.raw_bytes_applied += b.raw_bytes;
            if let Some(init) = self.initial.as_mut() {
                init.applied_bytes += b.raw_bytes;
            }
            fold_sizes(&mut self.applied_tables, &mut self.applied_sizes, &b.sizes);
            for &(disk, block, hash) in &b.updates {
                if let Some(slot) = self
                    .applied_tables
                    .get_mut(disk as usize)
                    .and_then(|t| t.get_mut(block as usize))
                {
                    *slot = hash;
                }
            }
            self.journal_pending.extend_from_slice(&b.updates);
            self.applied_dirty = true;
        }
        if applied > self.applied_seq {
            self.applied_seq = applied;
            self.applied_dirty = true;
        }
        if let Some(init) = &self.initial {
            if init
                .pass_last_seq
                .is_some_and(|last| self.applied_seq >= last)
            {
                self.initial = None;
            }
        }
    }

    /// What the journal must record since it last asked: (epoch, applied seq, updates), or
    /// None if nothing was applied since.
    pub fn take_journal(&mut self) -> Option<(u32, u64, Vec<HashUpdate>)> {
        if self.journal_pending.is_empty() && self.journal_seq == self.applied_seq {
            return None;
        }
        self.journal_seq = self.applied_seq;
        Some((
            self.epoch,
            self.applied_seq,
            std::mem::take(&mut self.journal_pending),
        ))
    }

    /// Folds replayed journal updates into the applied tables (at start-up).
    pub fn replay(&mut self, applied_seq: u64, updates: &[HashUpdate]) {
        for &(disk, block, hash) in updates {
            if let Some(slot) = self
                .applied_tables
                .get_mut(disk as usize)
                .and_then(|t| t.get_mut(block as usize))
            {
                *slot = hash;
            }
        }
        self.applied_seq = self.applied_seq.max(applied_seq);
        self.journal_seq = self.applied_seq;
    }

    /// The disks' sizes as captured (what the next batch carries).
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// A disk's captured size changes (it grew, or a resync adopts a smaller size): the next
    /// batch carries it, and the master target resizes the replica before its records.
    pub fn resize(&mut self, disk: usize, size_bytes: u64) {
        if let Some(s) = self.sizes.get_mut(disk) {
            *s = size_bytes;
        }
    }

    /// Numbers and retains a batch of `records` writes. Returns (first_seq, last_seq).
    /// `body_for` encodes the body given the first seq and the disks' sizes.
    pub fn emit(
        &mut self,
        records: u64,
        raw_bytes: u64,
        updates: Vec<HashUpdate>,
        now_ms: u64,
        body_for: impl FnOnce(u64, &[u64]) -> Vec<u8>,
    ) -> (u64, u64) {
        assert!(self.seq_ready(), "emit before the seq floor is known");
        assert!(records > 0, "empty batch");
        let first = self.next_seq;
        let last = first + records - 1;
        self.next_seq = last + 1;
        let body = body_for(first, &self.sizes);
        // Capacity, not length: what the buffer really holds in memory.
        self.retained_bytes += body.capacity() as u64;
        self.raw_bytes_captured += raw_bytes;
        if let Some(init) = self.initial.as_mut() {
            init.captured_bytes += raw_bytes;
        }
        self.retained.push_back(Arc::new(RetainedBatch {
            first_seq: first,
            last_seq: last,
            body,
            raw_bytes,
            captured_ms: now_ms,
            updates,
            sizes: self.sizes.clone(),
        }));
        (first, last)
    }

    /// Retained batches with `last_seq > after`, in order.
    pub fn batches_after(&self, after: u64, max: usize) -> Vec<Arc<RetainedBatch>> {
        self.retained
            .iter()
            .filter(|b| b.last_seq > after)
            .take(max)
            .cloned()
            .collect()
    }

    /// The capture state implied by what is applied plus what is retained: used to rebuild
    /// the scanner's table after it restarts.
    pub fn captured_tables(&self) -> Vec<Vec<u64>> {
        let mut t = self.applied_tables.clone();
        let mut sizes = self.applied_sizes.clone();
        for b in &self.retained {
            fold_sizes(&mut t, &mut sizes, &b.sizes);
            for &(disk, block, hash) in &b.updates {
                if let Some(slot) = t
                    .get_mut(disk as usize)
                    .and_then(|t| t.get_mut(block as usize))
                {
                    *slot = hash;
                }
            }
        }
        // Then a resize no batch carries yet.
        fold_sizes(&mut t, &mut sizes, &self.sizes);
        t
    }

    /// A full scan pass finished: the first one completes the initial sync's capture.
    pub fn handle_pass_done(&mut self) {
        let last = self.captured_seq();
        if let Some(init) = self.initial.as_mut() {
            init.scanned_bytes = init.total_bytes;
            if init.pass_last_seq.is_none() {
                init.pass_last_seq = Some(last);
            }
        }
        let applied = self.applied_seq;
        self.handle_ack(self.cached_seq, applied);
    }
}

/// Brings tables described by `sizes` to `to` (a batch's sizes): a grown disk's new blocks
/// are zeros (the replica grows sparse), a resized disk's partial tail block is unknown.
fn fold_sizes(tables: &mut [Vec<u64>], sizes: &mut [u64], to: &[u64]) {
    if to.len() != sizes.len() {
        return; // a batch without sizes (or of another disk set): nothing changes
    }
    for (i, &new) in to.iter().enumerate() {
        if sizes[i] != new {
            resize_table(&mut tables[i], sizes[i], new);
            sizes[i] = new;
        }
    }
}

/// Resizes a disk's hash table from `old` to `new` bytes.
pub fn resize_table(table: &mut Vec<u64>, old: u64, new: u64) {
    let blocks = new.div_ceil(BLOCK_BYTES) as usize;
    let full_zero = crate::agent::scan::zero_hash(BLOCK_BYTES as usize);
    // The block that held the old end changes length (or content beyond the old end).
    let old_tail = (old % BLOCK_BYTES != 0).then_some((old / BLOCK_BYTES) as usize);
    table.resize(blocks, full_zero);
    if let Some(t) = old_tail.filter(|&t| t < blocks) {
        table[t] = UNKNOWN_HASH;
    }
    if new % BLOCK_BYTES != 0 && blocks > 0 {
        let last = blocks - 1;
        table[last] = if new < old || old_tail == Some(last) {
            UNKNOWN_HASH
        } else {
            crate::agent::scan::zero_hash((new % BLOCK_BYTES) as usize)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> AgentCore {
        AgentCore::new(1, 0, vec![vec![0; 8]], vec![8 * BLOCK_BYTES], 1 << 20, None)
    }

    #[test]
    fn a_barrier_is_captured_by_a_pass_and_reported_when_applied() {
        let mut c = core();
        c.handle_stream_open(0, 0);
        assert!(c.handle_sync_request(Some(7)), "a pass starts now");
        assert!(
            !c.handle_sync_request(Some(7)),
            "asked again: already under way"
        );
        assert_eq!(c.barrier_for_pass(), Some(7));
        emit(&mut c, 2, vec![]);
        c.handle_barrier_captured(7);
        assert_eq!(c.barrier_done(), Some((7, 2)));
        assert_eq!(c.barrier_for_pass(), None);
        assert!(!c.handle_sync_request(Some(7)), "done: no new pass");
        let t = Instant::now();
        assert!(!c.handle_stream_ack(t, 2, 1).barrier_applied);
        assert!(c.handle_stream_ack(t, 2, 2).barrier_applied);
        assert!(!c.handle_stream_ack(t, 2, 2).barrier_applied, "said once");
        // The configuration node stops asking: the done barrier is forgotten.
        assert!(!c.handle_sync_request(None));
        assert_eq!(c.barrier_done(), None);
    }

    #[test]
    fn a_move_is_measured_from_notice_until_the_new_server_cached_the_resend() {
        let t0 = Instant::now();
        let mut c = core();
        c.handle_stream_opened(t0, 0, 0, 1);
        emit(&mut c, 1, vec![]); // seq 1, 10 raw bytes
        emit(&mut c, 1, vec![]); // seq 2
        c.handle_stream_ack(t0, 2, 0); // the old server cached both, applied none
        assert_eq!(
            c.handle_stream_end(t0, StreamEnd::Moved, 0.0),
            Next::ReconnectNow
        );
        // A first attempt at the new server fails: it still counts in the pause.
        let t1 = t0 + Duration::from_millis(3);
        c.handle_stream_end(t1, StreamEnd::Peer("refused".into()), 0.0);
        let t2 = t0 + Duration::from_millis(5);
        let (after, outcome) = c.handle_stream_opened(t2, 0, 0, 2);
        assert_eq!((after, outcome.moved), (0, None));
        let t3 = t0 + Duration::from_millis(9);
        let outcome = c.handle_stream_ack(t3, 1, 0);
        assert_eq!(
            outcome.moved,
            Some(MoveStats {
                generation: 2,
                pause_ms: 9,
                bytes_resent: 20
            })
        );
        assert_eq!(c.last_move, outcome.moved);
    }

    #[test]
    fn peer_failures_back_off_and_local_ones_go_to_the_supervisor() {
        let t0 = Instant::now();
        let mut c = core();
        let first = c.handle_stream_end(t0, StreamEnd::Peer("unreachable".into()), 0.0);
        let second = c.handle_stream_end(t0, StreamEnd::Peer("unreachable".into()), 0.0);
        assert_eq!(
            (first, second),
            (
                Next::ReconnectAfter(RECONNECT_MIN),
                Next::ReconnectAfter(2 * RECONNECT_MIN)
            )
        );
        assert_eq!(c.degraded_reason.as_deref(), Some("unreachable"));
        // A stream that opens clears the degraded reason; one that stays up longer than the
        // longest backoff is healthy again, and its failure reconnects quickly.
        c.handle_stream_opened(t0, 0, 0, 1);
        assert_eq!((c.connected, c.degraded_reason.as_deref()), (true, None));
        let later = t0 + RECONNECT_MAX + Duration::from_secs(1);
        assert_eq!(
            c.handle_stream_end(later, StreamEnd::Peer("reset".into()), 0.0),
            Next::ReconnectAfter(RECONNECT_MIN)
        );
        assert_eq!(
            c.handle_stream_end(t0, StreamEnd::Local("bug".into()), 0.0),
            Next::Fail
        );
    }

    fn emit(c: &mut AgentCore, n: u64, updates: Vec<HashUpdate>) -> (u64, u64) {
        c.emit(n, n * 10, updates, 1000, |first, _| vec![first as u8; 100])
    }

    #[test]
    fn fresh_stream_sets_floor_and_numbers_contiguously() {
        let mut c = core();
        assert!(!c.seq_ready());
        assert_eq!(c.handle_stream_open(41, 40), 41);
        assert_eq!(emit(&mut c, 3, vec![]), (42, 44));
        assert_eq!(emit(&mut c, 1, vec![]), (45, 45));
        assert_eq!(c.captured_seq(), 45);
    }

    #[test]
    fn acked_batches_fold_into_applied_table_only_when_applied() {
        let mut c = core();
        c.handle_stream_open(0, 0);
        emit(&mut c, 2, vec![(0, 1, 111)]);
        emit(&mut c, 1, vec![(0, 2, 222)]);
        c.handle_ack(3, 0); // cached, not applied: nothing folds
        assert_eq!(c.applied_tables[0][1], 0);
        assert_eq!(c.captured_tables()[0][1..3], [111, 222]);
        c.handle_ack(3, 2);
        assert_eq!(c.applied_tables[0][1..3], [111, 0]);
        assert_eq!(c.batches_after(0, 10).len(), 1);
        assert!(c.applied_dirty);
        assert_eq!(c.oldest_unapplied_ms(), 1000);
        assert_eq!(c.take_journal(), Some((1, 2, vec![(0, 1, 111)])));
        assert_eq!(c.take_journal(), None);
        c.handle_ack(3, 3);
        assert_eq!(c.applied_tables[0][1..3], [111, 222]);
        assert_eq!(c.take_journal(), Some((1, 3, vec![(0, 2, 222)])));
        assert_eq!((c.retained_bytes(), c.oldest_unapplied_ms()), (0, 0));
    }

    #[test]
    fn reconnect_resends_only_what_the_server_lacks() {
        let mut c = core();
        c.handle_stream_open(0, 0);
        for _ in 0..4 {
            emit(&mut c, 1, vec![]);
        }
        // A restarted process server cached through 2, applied through 1.
        let after = c.handle_stream_open(2, 1);
        assert_eq!(after, 2);
        let resend: Vec<u64> = c
            .batches_after(after, 10)
            .iter()
            .map(|b| b.first_seq)
            .collect();
        assert_eq!(resend, vec![3, 4]);
        // Numbering continues; the floor is not re-applied to a live agent.
        assert_eq!(emit(&mut c, 1, vec![]), (5, 5));
    }

    #[test]
    fn retention_limit_applies_back_pressure() {
        let mut c = AgentCore::new(1, 0, vec![], vec![], 250, None);
        c.handle_stream_open(0, 0);
        assert!(c.has_room(1000), "an empty buffer admits any batch");
        emit(&mut c, 1, vec![]);
        emit(&mut c, 1, vec![]);
        assert!(!c.has_room(100));
        c.handle_ack(2, 1);
        assert!(c.has_room(100));
    }

    #[test]
    fn initial_sync_completes_when_the_first_pass_is_applied() {
        let init = InitialSync {
            total_bytes: 1000,
            ..Default::default()
        };
        let mut c = AgentCore::new(1, 0, vec![], vec![], 1 << 20, Some(init));
        c.handle_stream_open(0, 0);
        emit(&mut c, 2, vec![]);
        c.initial.as_mut().unwrap().scanned_bytes = 500;
        assert!(c.initial.as_ref().unwrap().percent() < 50.0);
        c.handle_pass_done();
        assert!(c.initial.is_some());
        emit(&mut c, 1, vec![]); // a write after the pass does not hold the initial sync open
        c.handle_ack(3, 2);
        assert!(c.initial.is_none());
    }

    #[test]
    fn restarted_agent_resumes_above_its_applied_cursor() {
        let mut c = AgentCore::new(1, 70, vec![], vec![], 1 << 20, None);
        // A new, empty process server knows nothing: the agent's own cursor is the floor.
        c.handle_stream_open(0, 0);
        assert_eq!(emit(&mut c, 1, vec![]), (71, 71));
    }

    #[test]
    fn a_resize_travels_with_the_next_batch_and_folds_into_the_tables_when_applied() {
        let zero = crate::agent::scan::zero_hash(BLOCK_BYTES as usize);
        let mut c = AgentCore::new(1, 0, vec![vec![5; 2]], vec![2 * BLOCK_BYTES], 1 << 20, None);
        c.handle_stream_open(0, 0);
        c.resize(0, 4 * BLOCK_BYTES);
        let mut carried = vec![];
        c.emit(1, 0, vec![], 1000, |_, sizes| {
            carried = sizes.to_vec();
            vec![0; 10]
        });
        assert_eq!(
            carried,
            vec![4 * BLOCK_BYTES],
            "the batch carries the new size"
        );
        // Captured: grown, the new blocks zero; applied: not yet.
        assert_eq!(c.captured_tables(), vec![vec![5, 5, zero, zero]]);
        assert_eq!(c.applied_tables, vec![vec![5, 5]]);
        assert_eq!(c.applied_sizes, vec![2 * BLOCK_BYTES]);
        c.handle_ack(1, 1);
        assert_eq!(c.applied_tables, vec![vec![5, 5, zero, zero]]);
        assert_eq!(c.applied_sizes, vec![4 * BLOCK_BYTES]);
        // A resize not yet carried by any batch shows in the capture view at once.
        c.resize(0, BLOCK_BYTES);
        assert_eq!(c.captured_tables(), vec![vec![5]]);
        assert_eq!(c.applied_tables, vec![vec![5, 5, zero, zero]]);
    }

    #[test]
    fn resizing_a_table_marks_partial_tail_blocks_unknown() {
        let zero = crate::agent::scan::zero_hash(BLOCK_BYTES as usize);
        let tail = crate::agent::scan::zero_hash(100);
        // 2 blocks + 100 bytes grows to 4 blocks: the old partial block must be resent.
        let mut t = vec![1, 2, 3];
        resize_table(&mut t, 2 * BLOCK_BYTES + 100, 4 * BLOCK_BYTES);
        assert_eq!(t, vec![1, 2, UNKNOWN_HASH, zero]);
        // Aligned growth to a partial tail: the new tail block is zeros of its length.
        let mut t = vec![1, 2];
        resize_table(&mut t, 2 * BLOCK_BYTES, 3 * BLOCK_BYTES + 100);
        assert_eq!(t, vec![1, 2, zero, tail]);
        // Shrinking into a block: it is now partial, unknown.
        let mut t = vec![1, 2, 3, 4];
        resize_table(&mut t, 4 * BLOCK_BYTES, 2 * BLOCK_BYTES + 7);
        assert_eq!(t, vec![1, 2, UNKNOWN_HASH]);
        let mut t = vec![1, 2, 3, 4];
        resize_table(&mut t, 4 * BLOCK_BYTES, 2 * BLOCK_BYTES);
        assert_eq!(t, vec![1, 2]);
    }
}
