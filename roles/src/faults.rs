//! Debug fault injection into replication streams, for the supervision and crash tests.
//!
//! `HAVEN_FAULT_STREAM="<machine>:<fault>[*<n>][,<fault>[*<n>]…][;<machine>:…]"` makes the
//! named machine's streams on this node fail, one fault per stream incarnation, in order, so
//! that each failure is mid-stream: a process server's fault fires once the incarnation has
//! shipped one batch, a master target's on the incarnation's first batch of two or more
//! writes:
//!
//! | fault          | side           | what happens                                                 |
//! |----------------|----------------|--------------------------------------------------------------|
//! | `ship-panic`   | process server | the ship handler panics                                      |
//! | `ship-io`      | process server | a local cache read fails with an I/O error                    |
//! | `ship-corrupt` | process server | one bit of a sealed batch flips (the master target refuses it) |
//! | `ship-reset`   | process server | the ship stream is reset under the master target             |
//! | `ship-replay`  | process server | the stream's first sealed batch is sent again, labelled as a later seq range |
//! | `ship-wrong-key` | process server | a batch sealed under another key is sent in place of one  |
//! | `apply-reset`  | master target  | the master target resets the stream (a peer reset)           |
//! | `apply-panic`  | master target  | a panic half-way through writing a batch to the replica       |
//! | `apply-abort`  | master target  | the process aborts half-way through writing a batch           |
//!
//! The string is parsed once; a malformed one is a startup error (see [`check`]). Every fault
//! that fires is logged with a warning naming it, so a test can count them.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, OnceLock},
};

pub const ENV: &str = "HAVEN_FAULT_STREAM";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    ShipPanic,
    ShipIo,
    ShipCorrupt,
    ShipReset,
    ShipReplay,
    ShipWrongKey,
    ApplyReset,
    ApplyPanic,
    ApplyAbort,
}

impl Fault {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ship-panic" => Self::ShipPanic,
            "ship-io" => Self::ShipIo,
            "ship-corrupt" => Self::ShipCorrupt,
            "ship-reset" => Self::ShipReset,
            "ship-replay" => Self::ShipReplay,
            "ship-wrong-key" => Self::ShipWrongKey,
            "apply-reset" => Self::ApplyReset,
            "apply-panic" => Self::ApplyPanic,
            "apply-abort" => Self::ApplyAbort,
            _ => return None,
        })
    }

    pub fn side(self) -> Side {
        match self {
            Self::ShipPanic
            | Self::ShipIo
            | Self::ShipCorrupt
            | Self::ShipReset
            | Self::ShipReplay
            | Self::ShipWrongKey => Side::Ship,
            Self::ApplyReset | Self::ApplyPanic | Self::ApplyAbort => Side::Apply,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Ship,
    Apply,
}

/// At most this many faults per machine: the plan is test input, still bounded.
const MAX_PLANNED: usize = 10_000;

type Plan = HashMap<(String, Side), VecDeque<Fault>>;

/// Parses a plan string; errors name the offending part.
fn parse(spec: &str) -> Result<Plan, String> {
    let mut plan = Plan::new();
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (machine, faults) = part
            .split_once(':')
            .ok_or_else(|| format!("{ENV}: {part:?} is not <machine>:<fault>,…"))?;
        for f in faults.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let (name, count) = match f.split_once('*') {
                Some((n, c)) => (
                    n,
                    c.parse::<usize>()
                        .map_err(|_| format!("{ENV}: bad count in {f:?}"))?,
                ),
                None => (f, 1),
            };
            let fault = Fault::parse(name).ok_or_else(|| {
                format!("{ENV}: unknown fault {name:?} (ship-panic, ship-io, ship-corrupt, ship-reset, ship-replay, ship-wrong-key, apply-reset, apply-panic, apply-abort)")
            })?;
            let q = plan
                .entry((machine.trim().to_string(), fault.side()))
                .or_default();
            if q.len() + count > MAX_PLANNED {
                return Err(format!(
                    "{ENV}: more than {MAX_PLANNED} faults for {machine}"
                ));
            }
            q.extend((0..count).map(|_| fault));
        }
    }
    Ok(plan)
}

fn plan() -> &'static Mutex<Plan> {
    static PLAN: OnceLock<Mutex<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let parsed = std::env::var(ENV)
            .ok()
            .map(|s| parse(&s).unwrap_or_default())
            .unwrap_or_default();
        Mutex::new(parsed)
    })
}

/// Validates the environment at startup, so a typo is an error rather than a silent no-op.
pub fn check() -> Result<(), String> {
    if let Ok(s) = std::env::var(ENV) {
        parse(&s)?;
        tracing::warn!("{ENV}={s:?}: injecting stream faults on purpose (debug)");
    }
    Ok(())
}

/// Whether any fault is planned on this node (so callers can skip bookkeeping otherwise).
pub fn active() -> bool {
    !plan().lock().unwrap_or_else(|p| p.into_inner()).is_empty()
}

/// The next planned fault for one incarnation of `machine`'s stream on `side`, if any.
pub fn next(machine: &str, side: Side) -> Option<Fault> {
    let mut plan = plan().lock().unwrap_or_else(|p| p.into_inner());
    if plan.is_empty() {
        return None; // the normal case: asked once per batch, costs one uncontended lock
    }
    plan.get_mut(&(machine.to_string(), side))?.pop_front()
}

/// Logs that a fault fires now (tests count these lines).
pub fn fire(machine: &str, fault: Fault) {
    tracing::warn!(%machine, ?fault, "{ENV}: injecting a stream fault on purpose");
}

/// `HAVEN_FAULT_MARK_DELAY_MS=<ms>`: the agent waits this long before it places a requested
/// point (a slow member of a group cut, for the groups test; the hold must cover the skew).
/// Debug builds only.
pub const MARK_DELAY_ENV: &str = "HAVEN_FAULT_MARK_DELAY_MS";

/// The delay [`MARK_DELAY_ENV`] asks for (read once; none in release builds).
pub fn mark_delay() -> Option<std::time::Duration> {
    static DELAY: OnceLock<Option<u64>> = OnceLock::new();
    if !cfg!(debug_assertions) {
        return None;
    }
    DELAY
        .get_or_init(|| std::env::var(MARK_DELAY_ENV).ok()?.parse().ok())
        .map(std::time::Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_machines_faults_and_counts_in_order() {
        let p = parse("m1:ship-panic*2,apply-reset, ship-io;m2:apply-abort").unwrap();
        assert_eq!(
            p[&("m1".to_string(), Side::Ship)],
            [Fault::ShipPanic, Fault::ShipPanic, Fault::ShipIo]
        );
        assert_eq!(p[&("m1".to_string(), Side::Apply)], [Fault::ApplyReset]);
        assert_eq!(p[&("m2".to_string(), Side::Apply)], [Fault::ApplyAbort]);
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn refuses_malformed_plans() {
        for bad in ["m1", "m1:explode", "m1:ship-io*x", "m1:ship-io*20000"] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse("").unwrap().is_empty());
    }
}
