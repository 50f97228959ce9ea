//! What a supervised child is made of: a [`ChildSpec`] (how to start it, re-runnable), the
//! [`ChildGuard`] it holds while alive, and the [`ChildHandle`] the supervisor keeps to stop it.
//!
//! ```text
//!  Supervisor ──factory(guard)──▶ child actor (owns ChildGuard)
//!      ▲                              │ panics / stops / is dropped
//!      └──── ChildExited{token} ◀─────┘ (ChildGuard::drop)
//! ```
//!
//! The exit is reported from `Drop`, not from `finish()`/`fail()`, so that "reported" always
//! means "the old incarnation no longer exists": a restart can never overlap with a still
//! running predecessor that merely announced its failure.

use std::fmt;
use std::sync::Arc;

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, Message};

/// Why a child incarnation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Intentional, clean exit ([`ChildGuard::finish`]): the child is not restarted.
    Normal,
    /// The child reported a failure ([`ChildGuard::fail`]): restarted per policy.
    Failed(String),
    /// The guard was dropped without a verdict, or during unwinding: restarted per policy.
    Panicked,
    /// A nested supervisor exhausted its restart budget: its parent treats this as a failure.
    Escalated(String),
    /// The child failed in a way a restart cannot mend (bad configuration, a lost data dir):
    /// the supervisor does not restart it but escalates at once.
    Fatal(String),
}

impl ExitReason {
    /// Whether this exit counts as a failure (restart per policy) rather than a clean stop.
    pub fn is_failure(&self) -> bool {
        !matches!(self, ExitReason::Normal)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Normal => f.write_str("normal exit"),
            ExitReason::Failed(reason) => write!(f, "failed: {reason}"),
            ExitReason::Panicked => f.write_str("panicked"),
            ExitReason::Escalated(reason) => write!(f, "escalated: {reason}"),
            ExitReason::Fatal(reason) => write!(f, "failed fatally: {reason}"),
        }
    }
}

type ExitSink = Box<dyn FnOnce(ExitReason) + Send + 'static>;

/// Held by every child; dropping it reports the child's exit to its supervisor.
///
/// If the child never called [`finish`](Self::finish) or [`fail`](Self::fail) before being
/// dropped, the exit counts as [`ExitReason::Panicked`]: this is how a panic inside an actix
/// handler is detected. tokio catches the panic of the actor's task and drops the task's future
/// (and with it the actor and this guard) *inside* its panic guard, i.e. while unwinding, so
/// `Drop` sees `std::thread::panicking()` and reports `Panicked` even if the handler had
/// already called `finish()`. The last of `finish`/`fail` called wins otherwise.
///
/// The guard reports exactly once and never panics in `Drop` (a panic while unwinding would
/// abort the process).
pub struct ChildGuard {
    name: String,
    restarts: u64,
    /// The supervisor that owns this child, so a child can manage its siblings.
    supervisor: Option<actix::Addr<crate::Supervisor>>,
    outcome: Option<ExitReason>,
    report: Option<ExitSink>,
}

impl ChildGuard {
    /// `report` is called exactly once, from `Drop`, with the exit reason.
    pub(crate) fn new(
        name: impl Into<String>,
        restarts: u64,
        report: impl FnOnce(ExitReason) + Send + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            restarts,
            supervisor: None,
            outcome: None,
            report: Some(Box::new(report)),
        }
    }

    /// Clean, intentional exit: the supervisor will not restart this child.
    pub fn finish(&mut self) {
        self.outcome = Some(ExitReason::Normal);
    }

    /// Failure: the supervisor restarts the child per its policy once the guard is dropped.
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.outcome = Some(ExitReason::Failed(reason.into()));
    }

    /// A failure no restart can mend: the supervisor escalates at once.
    pub fn fail_fatal(&mut self, reason: impl Into<String>) {
        self.outcome = Some(ExitReason::Fatal(reason.into()));
    }

    /// A nested supervisor gave up; only supervisors escalate.
    pub(crate) fn escalate(&mut self, reason: impl Into<String>) {
        self.outcome = Some(ExitReason::Escalated(reason.into()));
    }

    /// Explicitly record a panic observed elsewhere (e.g. in a spawned task's `JoinError`).
    pub(crate) fn mark_panicked(&mut self) {
        self.outcome = Some(ExitReason::Panicked);
    }

    /// The child's name within its supervisor.
    pub(crate) fn set_supervisor(&mut self, addr: actix::Addr<crate::Supervisor>) {
        self.supervisor = Some(addr);
    }

    /// The supervisor that owns this child (None only for guards made outside a supervisor).
    pub fn supervisor(&self) -> Option<&actix::Addr<crate::Supervisor>> {
        self.supervisor.as_ref()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many times this child had been restarted when this incarnation started
    /// (0 for the first incarnation).
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The verdict recorded so far (`None`: the drop will report `Panicked`).
    pub fn outcome(&self) -> Option<&ExitReason> {
        self.outcome.as_ref()
    }
}

impl fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildGuard")
            .field("name", &self.name)
            .field("restarts", &self.restarts)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            ExitReason::Panicked
        } else {
            self.outcome.take().unwrap_or(ExitReason::Panicked)
        };
        if let Some(report) = self.report.take() {
            report(reason);
        }
    }
}

/// Ask a child to stop: it should call [`ChildGuard::finish`] and `ctx.stop()`.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

type StopFn = Box<dyn FnOnce() + Send + 'static>;

/// How the supervisor asks one child incarnation to stop (on `RemoveChild`, on its own
/// shutdown or escalation). Dropping a handle does nothing: stopping is always explicit.
pub struct ChildHandle {
    stop: Option<StopFn>,
}

impl ChildHandle {
    /// Stop by sending [`Shutdown`] to the actor. Uses `do_send` so that a full mailbox cannot
    /// prevent a shutdown; this adds at most one message per incarnation.
    pub fn actor<A>(addr: Addr<A>) -> Self
    where
        A: Actor + Handler<Shutdown>,
        A::Context: ToEnvelope<A, Shutdown>,
    {
        Self::from_fn(move || addr.do_send(Shutdown))
    }

    /// A child that cannot be asked to stop (it ends on its own, or holds its guard somewhere
    /// the supervisor cannot reach). Removing it only makes its later exit report stale.
    pub fn none() -> Self {
        Self { stop: None }
    }

    /// Stop with an arbitrary action (e.g. cancel a token, close a channel). Called at most once.
    pub fn from_fn(stop: impl FnOnce() + Send + 'static) -> Self {
        Self {
            stop: Some(Box::new(stop)),
        }
    }

    pub(crate) fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

impl fmt::Debug for ChildHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildHandle")
            .field("stoppable", &self.stop.is_some())
            .finish()
    }
}

/// Starts one incarnation of a child. Called on the supervisor's arbiter, once per
/// (re)start, with the guard the new incarnation must hold.
///
/// `Send + Sync` because a [`ChildSpec`] travels inside `AddChild` messages, and actix only
/// sends `Send` messages.
pub type Factory = Box<dyn Fn(ChildGuard) -> ChildHandle + Send + Sync + 'static>;

/// A named, re-runnable recipe for a child. Cheap to clone (the factory is shared), because a
/// nested supervisor must be able to rebuild its whole group from the same specs after an
/// escalation.
#[derive(Clone)]
pub struct ChildSpec {
    name: String,
    factory: Arc<dyn Fn(ChildGuard) -> ChildHandle + Send + Sync + 'static>,
}

impl ChildSpec {
    pub fn new(
        name: impl Into<String>,
        factory: impl Fn(ChildGuard) -> ChildHandle + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            factory: Arc::new(factory),
        }
    }

    pub fn from_factory(name: impl Into<String>, factory: Factory) -> Self {
        Self {
            name: name.into(),
            factory: Arc::from(factory),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn start(&self, guard: ChildGuard) -> ChildHandle {
        (self.factory)(guard)
    }
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::Mutex;

    fn new_guard() -> (ChildGuard, Arc<Mutex<Vec<ExitReason>>>) {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let sink = reports.clone();
        let guard = ChildGuard::new("child", 3, move |reason| {
            sink.lock().unwrap().push(reason);
        });
        (guard, reports)
    }

    #[test]
    fn dropped_without_verdict_reports_panicked() {
        let (guard, reports) = new_guard();
        assert_eq!(guard.name(), "child");
        assert_eq!(guard.restarts(), 3);
        drop(guard);
        assert_eq!(*reports.lock().unwrap(), [ExitReason::Panicked]);
    }

    #[test]
    fn last_verdict_wins_and_reports_once() {
        let (mut guard, reports) = new_guard();
        guard.fail("disk full");
        guard.finish();
        drop(guard);
        assert_eq!(*reports.lock().unwrap(), [ExitReason::Normal]);

        let (mut guard, reports) = new_guard();
        guard.finish();
        guard.fail("disk full");
        drop(guard);
        assert_eq!(
            *reports.lock().unwrap(),
            [ExitReason::Failed("disk full".into())]
        );
    }

    #[test]
    fn dropped_while_unwinding_reports_panicked_even_after_finish() {
        let (mut guard, reports) = new_guard();
        guard.finish();
        let result = catch_unwind(AssertUnwindSafe(move || {
            let _held = guard;
            panic!("handler bug");
        }));
        assert!(result.is_err());
        assert_eq!(*reports.lock().unwrap(), [ExitReason::Panicked]);
    }

    #[test]
    fn handle_stops_at_most_once_and_none_is_inert() {
        let stops = Arc::new(Mutex::new(0));
        let counter = stops.clone();
        ChildHandle::from_fn(move || *counter.lock().unwrap() += 1).stop();
        ChildHandle::none().stop();
        drop(ChildHandle::from_fn({
            let counter = stops.clone();
            move || *counter.lock().unwrap() += 1
        }));
        assert_eq!(*stops.lock().unwrap(), 1, "dropping a handle must not stop");
    }
}
