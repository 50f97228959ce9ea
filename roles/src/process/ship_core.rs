//! The decisions of shipping a log of sealed batches to a peer that acknowledges what it has
//! applied. Plain Rust, no I/O; time and randomness are passed in, and the backoff is a
//! timer with a token, so a stale timer does nothing.
//!
//! The core does not care which way it ships: today a process server ships a machine's cache
//! to its master target; after a failover the same core ships the recovery site's log back to
//! the original site. It knows only a log (`durable` through some seq), a cursor, a peer's
//! `applied`, and a route (where to, under which epoch and generation).
//!
//! ```text
//!  handle_start ─▶ Connect ─▶ (driver opens a stream) ─▶ handle_accepted(applied)
//!      ─▶ Trim{applied}, Read{after: applied} ─▶ handle_read(ranges) ─▶ Send… Read{after}
//!      ─▶ (empty) Wait ◀── handle_durable / handle_ack / handle_route / handle_timer
//!  stream ends ─▶ handle_stream_end(kind) ─▶ Fail (local) | Connect (route changed)
//!                                          | Sleep{token, delay} ─▶ handle_timer(token) ─▶ Connect
//!  draining: the same, until applied ≥ durable (Done) or the drain deadline (Done)
//! ```
use std::time::{Duration, Instant};

use haven_actors::Backoff;

/// Reconnect backoff after the peer or the network ended a stream.
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Longest a log whose machine moved away keeps shipping before it is dropped.
pub const DRAIN_MAX: Duration = Duration::from_secs(30);

/// Where the log ships, and under which identity: a change means "reconnect now".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub peer_addr: String,
    pub epoch: u32,
    pub generation: u64,
}

/// How a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The peer or the network (down, reset, refusal): reconnect with a backoff.
    Peer,
    /// This node (its log, a bug): the supervisor's business.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Open a stream to the route's peer; report `handle_accepted` or `handle_stream_end`.
    Connect,
    /// End the open stream and open another at once (the route changed).
    Reconnect,
    /// The peer applied through `applied`: drop that much of the log.
    Trim { applied: u64 },
    /// Read the log after `after`; report with `handle_read`.
    Read { after: u64 },
    /// Send the records just read, in order.
    Send,
    /// Nothing to do until an input arrives.
    Wait,
    /// Reconnect after `delay`, if the timer `token` is still current then.
    Sleep { token: u64, delay: Duration },
    /// The drain is over (everything applied, or its deadline passed): drop the log.
    Done { drained: bool },
    /// A local failure: stop and let the supervisor restart the shipper.
    Fail,
}

#[derive(Debug)]
pub struct ShipCore {
    route: Route,
    /// The route of the open stream, if any.
    streaming: Option<Route>,
    cursor: u64,
    applied: u64,
    durable: u64,
    /// Records read and not yet sent (the driver holds them).
    reading: bool,
    backoff: Backoff,
    timer: u64,
    drain_since: Option<Instant>,
    /// Streams that ended (peer failures and route changes): the restarts status shows.
    pub restarts: u64,
}

impl ShipCore {
    pub fn new(route: Route, durable: u64) -> Self {
        Self {
            route,
            streaming: None,
            cursor: 0,
            applied: 0,
            durable,
            reading: false,
            backoff: Backoff::new(RECONNECT_MIN, RECONNECT_MAX),
            timer: 0,
            drain_since: None,
            restarts: 0,
        }
    }

    pub fn route(&self) -> &Route {
        &self.route
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn draining(&self) -> bool {
        self.drain_since.is_some()
    }

    pub fn handle_start(&mut self, now: Instant) -> Vec<Effect> {
        self.backoff.handle_start(now);
        vec![Effect::Connect]
    }

    /// The peer accepted a stream on the current route; it has applied through `applied`.
    /// Everything after it is sent again (resend after any failure, in any direction).
    pub fn handle_accepted(&mut self, applied: u64) -> Vec<Effect> {
        self.streaming = Some(self.route.clone());
        self.applied = self.applied.max(applied);
        self.cursor = applied;
        self.reading = true;
        vec![
            Effect::Trim { applied },
            Effect::Read { after: self.cursor },
        ]
    }

    /// The peer acknowledged `applied`.
    pub fn handle_ack(&mut self, applied: u64) -> Vec<Effect> {
        if applied <= self.applied {
            return vec![];
        }
        self.applied = applied;
        let mut effects = vec![Effect::Trim { applied }];
        if self.drained() {
            effects.push(Effect::Done { drained: true });
        } else if self.streaming.is_some() && !self.reading {
            effects.extend(self.read());
        }
        effects
    }

    /// The log is durable through `seq` (new data to ship).
    pub fn handle_durable(&mut self, seq: u64) -> Vec<Effect> {
        self.durable = seq;
        if self.streaming.is_some() && !self.reading {
            self.read()
        } else {
            vec![]
        }
    }

    /// The driver read records after the cursor: their `last_seq`s, in order (empty: none).
    pub fn handle_read(&mut self, last_seqs: &[u64]) -> Vec<Effect> {
        self.reading = false;
        if self.streaming.is_none() {
            return vec![];
        }
        match last_seqs.last() {
            Some(&last) => {
                debug_assert!(last > self.cursor, "reads move forward");
                self.cursor = last;
                self.reading = true;
                vec![Effect::Send, Effect::Read { after: self.cursor }]
            }
            None if self.drained() => vec![Effect::Done { drained: true }],
            None => vec![Effect::Wait],
        }
    }

    /// The machine's assignment gives another route (a move of the peer, a new epoch or
    /// generation). While draining the old route stays: what is left ships under it.
    pub fn handle_route(&mut self, route: Route) -> Vec<Effect> {
        if self.draining() || route == self.route {
            return vec![];
        }
        self.route = route;
        match &self.streaming {
            Some(r) if *r != self.route => vec![Effect::Reconnect],
            _ => vec![],
        }
    }

    /// The open stream (or an attempt at one) ended. `jitter_unit` in [0, 1).
    pub fn handle_stream_end(
        &mut self,
        now: Instant,
        ended: Ended,
        jitter_unit: f64,
    ) -> Vec<Effect> {
        let was = self.streaming.take();
        self.reading = false;
        if ended == Ended::Local {
            return vec![Effect::Fail];
        }
        self.restarts += 1;
        if self.drained() {
            return vec![Effect::Done { drained: true }];
        }
        if self.draining() {
            // A drain is one best effort: what does not get through, the agent still
            // retains and sends to the new process server; a newer generation fences us.
            return vec![Effect::Done { drained: false }];
        }
        if was.is_some_and(|r| r != self.route) {
            // The assignment changed: reconnect now, no backoff.
            return vec![Effect::Connect];
        }
        let delay = self.backoff.handle_failure(now, jitter_unit);
        self.timer += 1;
        vec![Effect::Sleep {
            token: self.timer,
            delay,
        }]
    }

    /// A backoff timer fired.
    pub fn handle_timer(&mut self, now: Instant, token: u64) -> Vec<Effect> {
        if token != self.timer || self.streaming.is_some() {
            return vec![]; // stale
        }
        self.timer += 1;
        self.backoff.handle_start(now);
        vec![Effect::Connect]
    }

    /// The machine is no longer assigned here: ship what is logged, then drop it.
    pub fn handle_drain(&mut self, now: Instant) -> Vec<Effect> {
        if self.drain_since.is_some() {
            return vec![];
        }
        self.drain_since = Some(now);
        if self.drained() {
            vec![Effect::Done { drained: true }]
        } else {
            vec![]
        }
    }

    /// Time passes while draining: past the deadline, give up (the agent still retains what
    /// did not get through, and a newer generation fences this one anyway).
    pub fn handle_tick(&mut self, now: Instant) -> Vec<Effect> {
        match self.drain_since {
            Some(since) if now.duration_since(since) >= DRAIN_MAX => {
                vec![Effect::Done { drained: false }]
            }
            _ => vec![],
        }
    }

    fn drained(&self) -> bool {
        self.draining() && self.applied >= self.durable
    }

    fn read(&mut self) -> Vec<Effect> {
        self.reading = true;
        vec![Effect::Read { after: self.cursor }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(generation: u64) -> Route {
        Route {
            peer_addr: "mt1:7400".into(),
            epoch: 1,
            generation,
        }
    }

    fn streaming(durable: u64, applied: u64) -> ShipCore {
        let mut c = ShipCore::new(route(1), durable);
        c.handle_start(Instant::now());
        c.handle_accepted(applied);
        c
    }

    #[test]
    fn a_stream_resends_everything_after_the_peers_applied_seq() {
        let mut c = ShipCore::new(route(1), 50);
        assert_eq!(c.handle_start(Instant::now()), vec![Effect::Connect]);
        assert_eq!(
            c.handle_accepted(30),
            vec![Effect::Trim { applied: 30 }, Effect::Read { after: 30 }]
        );
        assert_eq!(
            c.handle_read(&[35, 50]),
            vec![Effect::Send, Effect::Read { after: 50 }]
        );
        assert_eq!(c.handle_read(&[]), vec![Effect::Wait]);
        // New data makes it read again; an ack trims.
        assert_eq!(c.handle_durable(60), vec![Effect::Read { after: 50 }]);
        assert_eq!(
            c.handle_read(&[60]),
            vec![Effect::Send, Effect::Read { after: 60 }]
        );
        assert_eq!(c.handle_ack(55), vec![Effect::Trim { applied: 55 }]);
        assert_eq!(c.handle_ack(40), vec![], "an older ack changes nothing");
    }

    #[test]
    fn a_peer_failure_backs_off_with_a_timer_token_and_resumes_from_the_peer() {
        let t0 = Instant::now();
        let mut c = streaming(50, 30);
        let sleep = c.handle_stream_end(t0, Ended::Peer, 0.0);
        let Effect::Sleep { token, delay } = sleep[0].clone() else {
            panic!("{sleep:?}")
        };
        assert_eq!(delay, RECONNECT_MIN);
        assert_eq!(c.restarts, 1);
        // A stale timer does nothing; the current one reconnects.
        assert_eq!(c.handle_timer(t0, token - 1), vec![]);
        assert_eq!(c.handle_timer(t0, token), vec![Effect::Connect]);
        assert_eq!(c.handle_timer(t0, token), vec![], "fired once");
        // It failed again at once: the delay grows.
        let again = c.handle_stream_end(t0, Ended::Peer, 0.0);
        assert!(matches!(again[..], [Effect::Sleep { delay, .. }] if delay == 2 * RECONNECT_MIN));
        // The resend starts from what the peer says, not from the old cursor.
        let Effect::Sleep { token, .. } = again[0].clone() else {
            unreachable!()
        };
        c.handle_timer(t0, token);
        assert_eq!(
            c.handle_accepted(42),
            vec![Effect::Trim { applied: 42 }, Effect::Read { after: 42 }]
        );
    }

    #[test]
    fn a_local_failure_goes_to_the_supervisor() {
        let mut c = streaming(10, 0);
        assert_eq!(
            c.handle_stream_end(Instant::now(), Ended::Local, 0.5),
            vec![Effect::Fail]
        );
    }

    #[test]
    fn a_route_change_reconnects_at_once_without_backoff() {
        let mut c = streaming(10, 0);
        assert_eq!(c.handle_route(route(1)), vec![], "the same route");
        assert_eq!(c.handle_route(route(2)), vec![Effect::Reconnect]);
        assert_eq!(
            c.handle_stream_end(Instant::now(), Ended::Peer, 0.0),
            vec![Effect::Connect]
        );
        assert_eq!(c.route().generation, 2);
    }

    #[test]
    fn a_drain_ships_what_is_logged_then_ends() {
        let t0 = Instant::now();
        let mut c = streaming(20, 10);
        assert_eq!(c.handle_drain(t0), vec![]);
        // The route stays while draining.
        assert_eq!(c.handle_route(route(7)), vec![]);
        assert_eq!(c.handle_ack(15), vec![Effect::Trim { applied: 15 }]);
        assert_eq!(
            c.handle_ack(20),
            vec![Effect::Trim { applied: 20 }, Effect::Done { drained: true }]
        );
    }

    #[test]
    fn a_drain_whose_stream_fails_gives_up_at_once() {
        let t0 = Instant::now();
        let mut c = streaming(20, 10);
        c.handle_drain(t0);
        assert_eq!(
            c.handle_stream_end(t0, Ended::Peer, 0.0),
            vec![Effect::Done { drained: false }]
        );
    }

    #[test]
    fn a_drain_with_nothing_left_ends_at_once_and_one_that_hangs_times_out() {
        let t0 = Instant::now();
        let mut c = streaming(10, 10);
        assert_eq!(c.handle_drain(t0), vec![Effect::Done { drained: true }]);
        let mut c = streaming(10, 3);
        c.handle_drain(t0);
        assert_eq!(c.handle_tick(t0 + DRAIN_MAX / 2), vec![]);
        assert_eq!(
            c.handle_tick(t0 + DRAIN_MAX),
            vec![Effect::Done { drained: false }]
        );
    }
}
