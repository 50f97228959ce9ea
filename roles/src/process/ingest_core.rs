//! The decisions of an agent's stream into the process server, without I/O: which batches
//! are taken ([`IngestCore`]), when the agent is held back ([`holds_back`]), and how a cache
//! writer that cannot write (a full disk) behaves ([`Writer`]). Time is passed in.
use std::time::{Duration, Instant};

/// Seq rules of one agent stream.
///
/// - a batch at or below what is cached is a resend: skipped (the agent resends what it still
///   retains after a reconnect);
/// - a gap is legal: after moves, the seqs in between were cached by another process server
///   (the master target orders and deduplicates);
/// - an overlap is not: batches are immutable units, so a partial overlap is a broken sender.
#[derive(Debug)]
pub struct IngestCore {
    next_expected: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Seal and cache it.
    Take,
    /// A resend of what is cached: drop it.
    Skip,
    /// The stream is broken: end it with this reason.
    Refuse(String),
}

impl IngestCore {
    /// A stream opened where the cache holds everything through `cached` and the master
    /// target applied through `applied`.
    pub fn new(cached: u64, applied: u64) -> Self {
        Self {
            next_expected: cached.max(applied) + 1,
        }
    }

    pub fn handle_batch(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        body_len: usize,
        max_len: usize,
    ) -> Verdict {
        if first_seq > last_seq || body_len > max_len {
            return Verdict::Refuse(format!(
                "invalid batch {first_seq}..={last_seq} of {body_len} bytes"
            ));
        }
        if last_seq < self.next_expected {
            return Verdict::Skip;
        }
        if first_seq < self.next_expected {
            return Verdict::Refuse(format!(
                "batch {first_seq}..={last_seq} overlaps what is cached (through {})",
                self.next_expected - 1
            ));
        }
        self.next_expected = last_seq + 1;
        Verdict::Take
    }
}

/// Back-pressure: the stream is read no further while the caches' unapplied bytes (plus
/// what is being sealed) reach the limit; QUIC flow control then slows the agent.
pub fn holds_back(pending_bytes: u64, limit_bytes: u64) -> bool {
    pending_bytes >= limit_bytes
}

/// Backoff between attempts to write to a cache whose last write failed.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(2);
/// A writer whose cache writes keep failing says so again this often.
pub const STILL_FAILING_EVERY: Duration = Duration::from_secs(60);

/// What a failed attempt was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// An I/O error that can pass (a full disk, `disk_full`, above all): hold back, retry.
    Transient { disk_full: bool },
    /// Corruption or a bug: the stream ends.
    Fatal,
}

/// What the writer says about its trouble (the driver logs it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Say {
    /// The first failure of a run, as an error (`loud`) or at debug level (another writer
    /// said so recently).
    Failing { loud: bool, disk_full: bool },
    /// Still failing, once a minute.
    StillFailing { attempts: u64, failing_s: u64 },
    /// Writable again after `attempts` failures.
    Recovered {
        loud: bool,
        attempts: u64,
        waited_ms: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try again after this long, or at once when cache files are deleted.
    RetryAfter(Duration),
    /// End the stream.
    End,
}

#[derive(Debug)]
struct Trouble {
    since: Instant,
    attempts: u64,
    loud: bool,
    last_said: Instant,
}

/// A cache writer's state across failed attempts at writing one group.
#[derive(Debug)]
pub struct Writer {
    trouble: Option<Trouble>,
    backoff: Duration,
}

impl Default for Writer {
    fn default() -> Self {
        Self {
            trouble: None,
            backoff: RETRY_MIN,
        }
    }
}

impl Writer {
    /// An attempt failed. `loud_allowed`: no other writer of this process server logged a
    /// failure as an error within the last minute.
    pub fn handle_failure(
        &mut self,
        now: Instant,
        failure: Failure,
        loud_allowed: bool,
    ) -> (Option<Say>, Next) {
        let Failure::Transient { disk_full } = failure else {
            return (None, Next::End);
        };
        let say = match &mut self.trouble {
            None => {
                self.trouble = Some(Trouble {
                    since: now,
                    attempts: 1,
                    loud: loud_allowed,
                    last_said: now,
                });
                Some(Say::Failing {
                    loud: loud_allowed,
                    disk_full,
                })
            }
            Some(t) => {
                t.attempts += 1;
                if now.duration_since(t.last_said) >= STILL_FAILING_EVERY {
                    t.last_said = now;
                    Some(Say::StillFailing {
                        attempts: t.attempts,
                        failing_s: now.duration_since(t.since).as_secs(),
                    })
                } else {
                    None
                }
            }
        };
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        (say, Next::RetryAfter(delay))
    }

    /// Whether earlier attempts at this group failed.
    pub fn in_trouble(&self) -> bool {
        self.trouble.is_some()
    }

    /// An attempt succeeded: the trouble (if any) is over.
    pub fn handle_success(&mut self, now: Instant) -> Option<Say> {
        self.backoff = RETRY_MIN;
        self.trouble.take().map(|t| Say::Recovered {
            loud: t.loud,
            attempts: t.attempts,
            waited_ms: now.duration_since(t.since).as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn resends_are_skipped_gaps_are_legal_overlaps_refused() {
        // Cached through 10 (applied through 7).
        let mut c = IngestCore::new(10, 7);
        assert_eq!(c.handle_batch(5, 9, 100, MAX), Verdict::Skip);
        assert_eq!(c.handle_batch(9, 10, 100, MAX), Verdict::Skip);
        assert_eq!(c.handle_batch(11, 12, 100, MAX), Verdict::Take);
        // A gap (seqs 13..19 cached by another process server): taken.
        assert_eq!(c.handle_batch(20, 20, 100, MAX), Verdict::Take);
        assert_eq!(
            c.handle_batch(18, 22, 100, MAX),
            Verdict::Refuse("batch 18..=22 overlaps what is cached (through 20)".into())
        );
        assert_eq!(c.handle_batch(21, 21, 100, MAX), Verdict::Take);
    }

    #[test]
    fn the_floor_is_the_higher_of_cached_and_applied() {
        // A fresh cache on a new process server: the master target's cursor is the floor.
        let mut c = IngestCore::new(0, 40);
        assert_eq!(c.handle_batch(35, 40, 1, MAX), Verdict::Skip);
        assert_eq!(c.handle_batch(41, 41, 1, MAX), Verdict::Take);
    }

    #[test]
    fn malformed_batches_are_refused() {
        let mut c = IngestCore::new(0, 0);
        assert_eq!(
            c.handle_batch(5, 4, 1, MAX),
            Verdict::Refuse("invalid batch 5..=4 of 1 bytes".into())
        );
        assert_eq!(
            c.handle_batch(1, 1, MAX + 1, MAX),
            Verdict::Refuse(format!("invalid batch 1..=1 of {} bytes", MAX + 1))
        );
    }

    #[test]
    fn back_pressure_at_the_limit() {
        assert!(!holds_back(99, 100));
        assert!(holds_back(100, 100));
    }

    #[test]
    fn a_full_disk_is_said_once_retried_with_a_bounded_backoff_and_its_end_said() {
        let t0 = Instant::now();
        let mut w = Writer::default();
        let full = Failure::Transient { disk_full: true };
        assert_eq!(
            w.handle_failure(t0, full, true),
            (
                Some(Say::Failing {
                    loud: true,
                    disk_full: true
                }),
                Next::RetryAfter(RETRY_MIN)
            )
        );
        let mut delays = vec![];
        for i in 1..8u32 {
            let (say, next) = w.handle_failure(t0 + Duration::from_secs(i as u64), full, true);
            assert_eq!(say, None, "said once, not per attempt");
            delays.push(next);
        }
        assert_eq!(
            delays,
            [200, 400, 800, 1600, 2000, 2000, 2000]
                .map(|ms| Next::RetryAfter(Duration::from_millis(ms)))
        );
        // A minute on, it says it is still failing.
        assert_eq!(
            w.handle_failure(t0 + STILL_FAILING_EVERY, full, true).0,
            Some(Say::StillFailing {
                attempts: 9,
                failing_s: 60
            })
        );
        assert_eq!(
            w.handle_success(t0 + Duration::from_secs(61)),
            Some(Say::Recovered {
                loud: true,
                attempts: 9,
                waited_ms: 61_000
            })
        );
        assert_eq!(w.handle_success(t0 + Duration::from_secs(62)), None);
        // The backoff starts over.
        assert_eq!(
            w.handle_failure(t0, full, false),
            (
                Some(Say::Failing {
                    loud: false,
                    disk_full: true
                }),
                Next::RetryAfter(RETRY_MIN)
            )
        );
    }

    #[test]
    fn corruption_ends_the_stream() {
        let mut w = Writer::default();
        assert_eq!(
            w.handle_failure(Instant::now(), Failure::Fatal, true),
            (None, Next::End)
        );
    }
}
