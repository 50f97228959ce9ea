//! The master target's decisions for one machine: which ship streams are admitted, how
//! their batches are grouped into commits, what each stream is told. Plain Rust, no I/O.
//!
//! ```text
//! stream driver                 replica owner (replica/<machine>)          ApplyCore
//!  OpenShip ───────Open────────▶ handle_open(generation, epoch) ────────▶ Admit | Refuse
//!  batch  ─────────Batch───────▶ handle_batch(stream, first, last) ─────▶ Apply | Skip | EndStream
//!                                 (apply to the images, report back)
//!                                 handle_applied(stream, outcome)
//!  (mailbox drained) ──────────▶ handle_group_end() ───────────────────▶ Commit
//!                                 handle_committed(seq, generation) ────▶ Ack(seq), EndStream…
//! ```
//!
//! Invariants: a stream of a generation older than one that has delivered is refused at open
//! and its batches are never applied (fencing); a batch that was refused ends its stream, but
//! only after the valid batches before it are committed and acknowledged; an acknowledgement
//! never claims more than is durable. This is where recovery-point retention will decide
//! which before-images to keep.
use std::collections::BTreeMap;

/// A ship stream admitted for the machine (several may be open at once during a move).
pub type StreamId = u64;

/// What the replica did with a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// At or below what is applied already (a resend): nothing written.
    Duplicate,
    /// The batch is invalid (a record beyond a disk, of another disk): refused, counted.
    Refused(String),
    /// The batch does not follow what is applied (a gap) or is fenced: the stream ends and
    /// reconnects from the cursor; nothing was wrong with the data.
    Rejected(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// (Re)open the replica for `epoch`: the stream is of a newer protection.
    OpenReplica { epoch: u32 },
    /// Tell the stream it is admitted and where the replica stands.
    Admit { stream: StreamId, applied: u64 },
    /// Refuse a stream at open; nothing changes.
    RefuseOpen { reason: String },
    /// Write the batch to the replica images (then report with `handle_applied`).
    Apply { stream: StreamId },
    /// Drop the batch: its stream has ended.
    Drop { stream: StreamId },
    /// Make what was applied durable (then report with `handle_committed`).
    Commit,
    /// Tell every stream what is applied now.
    Ack { applied: u64 },
    /// End a stream with a reason. `refused`: it sent a bad batch (counted and logged as
    /// an error); else it was fenced or out of order (it reconnects from the cursor).
    EndStream {
        stream: StreamId,
        reason: String,
        refused: bool,
    },
}

#[derive(Debug)]
struct Stream {
    generation: u64,
    /// Ending, with why and whether it sent a bad batch: later batches are dropped; ended
    /// once the group is committed.
    ending: Option<(String, bool)>,
}

#[derive(Debug, Default)]
pub struct ApplyCore {
    /// The open replica's epoch, if open.
    epoch: Option<u32>,
    /// Durably applied through this seq.
    applied: u64,
    /// Highest generation that has delivered (durable or not): older ones are fenced.
    generation: u64,
    streams: BTreeMap<StreamId, Stream>,
    next_stream: StreamId,
    /// Batches applied since the last commit.
    uncommitted: usize,
}

impl ApplyCore {
    pub fn new() -> Self {
        Self {
            next_stream: 1,
            ..Default::default()
        }
    }

    /// The replica was opened: its durable cursor.
    pub fn handle_opened(&mut self, epoch: u32, applied: u64, generation: u64) {
        self.epoch = Some(epoch);
        self.applied = applied;
        self.generation = generation;
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn epoch(&self) -> Option<u32> {
        self.epoch
    }

    /// A ship stream asks to be admitted. Returns what to do; after `OpenReplica` the driver
    /// opens the replica, calls [`handle_opened`](Self::handle_opened), and asks again.
    pub fn handle_open(&mut self, generation: u64, epoch: u32) -> Vec<Effect> {
        match self.epoch {
            None => return vec![Effect::OpenReplica { epoch }],
            Some(have) if have < epoch => {
                // A newer protection: the streams of the old one end with it.
                let mut effects: Vec<Effect> = std::mem::take(&mut self.streams)
                    .into_keys()
                    .map(|stream| Effect::EndStream {
                        stream,
                        reason: format!("protection epoch {epoch} replaces {have}"),
                        refused: false,
                    })
                    .collect();
                self.epoch = None;
                effects.push(Effect::OpenReplica { epoch });
                return effects;
            }
            Some(have) if have > epoch => {
                return vec![Effect::RefuseOpen {
                    reason: format!("stale epoch {epoch}: replica is at epoch {have}"),
                }]
            }
            Some(_) => {}
        }
        if generation < self.generation {
            return vec![Effect::RefuseOpen {
                reason: format!(
                    "stale generation {generation}: generation {} has delivered (fenced)",
                    self.generation
                ),
            }];
        }
        let stream = self.next_stream;
        self.next_stream += 1;
        self.streams.insert(
            stream,
            Stream {
                generation,
                ending: None,
            },
        );
        vec![Effect::Admit {
            stream,
            applied: self.applied,
        }]
    }

    /// A batch of `stream` arrived (opened and decoded, or `bad` because it failed
    /// authentication or decoding).
    pub fn handle_batch(&mut self, stream: StreamId, bad: Option<String>) -> Vec<Effect> {
        let fenced_at = self.generation;
        let Some(s) = self.streams.get_mut(&stream) else {
            return vec![Effect::Drop { stream }];
        };
        if s.ending.is_some() {
            return vec![Effect::Drop { stream }];
        }
        if let Some(reason) = bad {
            s.ending = Some((reason, true));
            return vec![Effect::Drop { stream }];
        }
        if s.generation < fenced_at {
            s.ending = Some((
                format!(
                    "stale generation {}: generation {fenced_at} has delivered (fenced)",
                    s.generation
                ),
                false,
            ));
            return vec![Effect::Drop { stream }];
        }
        vec![Effect::Apply { stream }]
    }

    /// The generation a stream was admitted with.
    pub fn stream_generation(&self, stream: StreamId) -> Option<u64> {
        self.streams.get(&stream).map(|s| s.generation)
    }

    /// What the replica did with a batch of `stream`.
    pub fn handle_applied(&mut self, stream: StreamId, outcome: Outcome) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        match outcome {
            Outcome::Applied => {
                // This generation has delivered: every older one is fenced from now on.
                self.generation = self.generation.max(s.generation);
                self.uncommitted += 1;
            }
            Outcome::Duplicate => {}
            Outcome::Refused(reason) => s.ending = Some((reason, true)),
            Outcome::Rejected(reason) => s.ending = Some((reason, false)),
        }
    }

    /// The mailbox is drained (or the group is full): commit if anything was applied, and
    /// end the streams that were refused.
    pub fn handle_group_end(&mut self) -> Vec<Effect> {
        if self.uncommitted > 0 || self.streams.values().any(|s| s.ending.is_some()) {
            vec![Effect::Commit]
        } else {
            vec![]
        }
    }

    /// The replica made everything applied durable through `applied`.
    pub fn handle_committed(&mut self, applied: u64) -> Vec<Effect> {
        debug_assert!(
            applied >= self.applied,
            "the durable cursor never goes back"
        );
        self.uncommitted = 0;
        let mut effects = vec![];
        if applied > self.applied || self.streams.values().any(|s| s.ending.is_some()) {
            self.applied = self.applied.max(applied);
            effects.push(Effect::Ack {
                applied: self.applied,
            });
        }
        // Ending streams end only now, after what came before their last batch is acked.
        let ending: Vec<(StreamId, (String, bool))> = self
            .streams
            .iter()
            .filter_map(|(id, s)| s.ending.clone().map(|e| (*id, e)))
            .collect();
        for (stream, (reason, refused)) in ending {
            self.streams.remove(&stream);
            effects.push(Effect::EndStream {
                stream,
                reason,
                refused,
            });
        }
        effects
    }

    /// A write or commit failed and the replica rolled back to its durable cursor (or must
    /// be reopened): what was applied since the last commit is gone.
    pub fn handle_rolled_back(&mut self) {
        self.uncommitted = 0;
    }

    /// The stream's connection ended.
    pub fn handle_stream_closed(&mut self, stream: StreamId) {
        self.streams.remove(&stream);
    }

    /// Streams still open.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(effects: Vec<Effect>) -> StreamId {
        match effects.as_slice() {
            [Effect::Admit { stream, .. }] => *stream,
            other => panic!("expected an admission, got {other:?}"),
        }
    }

    fn core_at(epoch: u32, applied: u64, generation: u64) -> ApplyCore {
        let mut c = ApplyCore::new();
        c.handle_opened(epoch, applied, generation);
        c
    }

    #[test]
    fn the_first_stream_opens_the_replica_then_is_admitted_at_its_cursor() {
        let mut c = ApplyCore::new();
        assert_eq!(c.handle_open(3, 1), vec![Effect::OpenReplica { epoch: 1 }]);
        c.handle_opened(1, 40, 2);
        assert_eq!(
            c.handle_open(3, 1),
            vec![Effect::Admit {
                stream: 1,
                applied: 40
            }]
        );
    }

    #[test]
    fn an_older_generation_is_fenced_once_a_newer_one_delivered() {
        let mut c = core_at(1, 10, 0);
        let old = admitted(c.handle_open(2, 1));
        let new = admitted(c.handle_open(3, 1));
        // Both are accepted until the newer one delivers (the old one may be draining).
        assert_eq!(
            c.handle_batch(old, None),
            vec![Effect::Apply { stream: old }]
        );
        c.handle_applied(old, Outcome::Applied);
        assert_eq!(
            c.handle_batch(new, None),
            vec![Effect::Apply { stream: new }]
        );
        c.handle_applied(new, Outcome::Applied);
        // Generation 3 delivered: the old stream's next batch is refused and never applied.
        assert_eq!(
            c.handle_batch(old, None),
            vec![Effect::Drop { stream: old }]
        );
        assert_eq!(c.handle_group_end(), vec![Effect::Commit]);
        assert_eq!(
            c.handle_committed(12),
            vec![
                Effect::Ack { applied: 12 },
                Effect::EndStream {
                    stream: old,
                    reason: "stale generation 2: generation 3 has delivered (fenced)".into(),
                    refused: false
                }
            ]
        );
        // And a new stream of the old generation is refused at open.
        assert_eq!(
            c.handle_open(2, 1),
            vec![Effect::RefuseOpen {
                reason: "stale generation 2: generation 3 has delivered (fenced)".into()
            }]
        );
    }

    #[test]
    fn a_refused_batch_ends_its_stream_after_the_valid_batches_before_it_are_acked() {
        let mut c = core_at(1, 0, 0);
        let s = admitted(c.handle_open(1, 1));
        assert_eq!(c.handle_batch(s, None), vec![Effect::Apply { stream: s }]);
        c.handle_applied(s, Outcome::Applied);
        assert_eq!(
            c.handle_batch(s, Some("malformed frame".into())),
            vec![Effect::Drop { stream: s }]
        );
        // Anything after the bad batch is dropped, never applied.
        assert_eq!(c.handle_batch(s, None), vec![Effect::Drop { stream: s }]);
        assert_eq!(c.handle_group_end(), vec![Effect::Commit]);
        assert_eq!(
            c.handle_committed(5),
            vec![
                Effect::Ack { applied: 5 },
                Effect::EndStream {
                    stream: s,
                    reason: "malformed frame".into(),
                    refused: true
                }
            ]
        );
        assert_eq!(c.streams(), 0);
    }

    #[test]
    fn a_gap_reported_by_the_replica_ends_the_stream_without_counting_a_refusal() {
        let mut c = core_at(1, 7, 0);
        let s = admitted(c.handle_open(1, 1));
        assert_eq!(c.handle_batch(s, None), vec![Effect::Apply { stream: s }]);
        c.handle_applied(s, Outcome::Rejected("seq gap".into()));
        assert_eq!(c.handle_group_end(), vec![Effect::Commit]);
        assert_eq!(
            c.handle_committed(7),
            vec![
                Effect::Ack { applied: 7 },
                Effect::EndStream {
                    stream: s,
                    reason: "seq gap".into(),
                    refused: false
                }
            ]
        );
    }

    #[test]
    fn duplicates_commit_nothing_and_ack_nothing_new() {
        let mut c = core_at(1, 9, 0);
        let s = admitted(c.handle_open(1, 1));
        assert_eq!(c.handle_batch(s, None), vec![Effect::Apply { stream: s }]);
        c.handle_applied(s, Outcome::Duplicate);
        assert_eq!(c.handle_group_end(), vec![]);
        assert_eq!(c.handle_committed(9), vec![]);
    }

    #[test]
    fn a_newer_epoch_ends_the_old_streams_and_reopens_the_replica() {
        let mut c = core_at(1, 50, 4);
        let s = admitted(c.handle_open(4, 1));
        assert_eq!(
            c.handle_open(5, 2),
            vec![
                Effect::EndStream {
                    stream: s,
                    reason: "protection epoch 2 replaces 1".into(),
                    refused: false
                },
                Effect::OpenReplica { epoch: 2 }
            ]
        );
        c.handle_opened(2, 0, 0);
        assert_eq!(
            c.handle_open(5, 2),
            vec![Effect::Admit {
                stream: 2,
                applied: 0
            }]
        );
        // A stream of the old epoch is refused.
        assert_eq!(
            c.handle_open(9, 1),
            vec![Effect::RefuseOpen {
                reason: "stale epoch 1: replica is at epoch 2".into()
            }]
        );
    }

    #[test]
    fn batches_of_a_closed_stream_are_dropped() {
        let mut c = core_at(1, 0, 0);
        let s = admitted(c.handle_open(1, 1));
        c.handle_stream_closed(s);
        assert_eq!(c.handle_batch(s, None), vec![Effect::Drop { stream: s }]);
        assert_eq!(c.handle_group_end(), vec![]);
    }

    #[test]
    fn an_invalid_batch_is_a_counted_refusal() {
        let mut c = core_at(1, 0, 0);
        let s = admitted(c.handle_open(1, 1));
        c.handle_batch(s, None);
        c.handle_applied(s, Outcome::Refused("write beyond disk".into()));
        assert_eq!(
            c.handle_committed(0),
            vec![
                Effect::Ack { applied: 0 },
                Effect::EndStream {
                    stream: s,
                    reason: "write beyond disk".into(),
                    refused: true
                }
            ]
        );
    }
}
