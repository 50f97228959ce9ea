//! The supervisor actor: starts children from their specs, restarts them after failures with
//! per-child backoff, and escalates to its parent when its restart budget is exhausted.
//!
//! ```text
//!  child exits ──ChildExited{name, incarnation, reason}──▶ Supervisor
//!     stale incarnation?  -> ignored (child was replaced or removed)
//!     Normal              -> state Stopped (kept in the status, not restarted)
//!     failure             -> RestartPolicy::handle_failure(now)
//!         Restart  -> BackingOff; run_later(Backoff::handle_failure(now, jitter))
//!                     └─ timer{name, incarnation} -> start a new incarnation
//!         Escalate -> stop all children, wait for their exits (bounded by
//!                     SHUTDOWN_GRACE), stop; a nested supervisor's guard then reports
//!                     Escalated to the parent, which restarts the whole group fresh.
//! ```
//!
//! Architecture invariant: every exit report and every backoff timer carries the incarnation
//! token it was created for; anything that does not match the child's current token does
//! nothing. This is what makes `RemoveChild`/`AddChild` races and late guards harmless.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message, Running};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::{debug, error, info, warn};

use crate::child::{ChildGuard, ChildHandle, ChildSpec, ExitReason, Shutdown};
use crate::policy::{Backoff, RestartPolicy, Verdict};

/// How long a stopping supervisor waits for its children's exits before it stops anyway.
/// Waiting at all means a parent restarting this group never overlaps the old children with
/// the new ones; the bound keeps a child that ignores `Shutdown` (or has a
/// [`ChildHandle::none`]) from blocking the escalation forever.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Restart policy of one supervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupervisorConfig {
    pub name: String,
    /// Restart budget, shared by all children: more than this many restarts...
    pub max_restarts: u32,
    /// ...within this sliding window escalates to the parent.
    pub within: Duration,
    /// Per-child exponential backoff: `backoff_min * 2^consecutive`, capped at
    /// `backoff_max`, plus up to 25 % jitter.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl SupervisorConfig {
    /// Defaults: 10 restarts per 60 s, backoff 100 ms..5 s.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_restarts: 10,
            within: Duration::from_secs(60),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Errors returned to callers of the supervisor's messages; no state was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// A child with this name is running or backing off; nothing was started.
    #[error("child {0:?} already exists")]
    DuplicateChild(String),
    /// The supervisor is shutting down or escalating; nothing was started.
    #[error("supervisor {0:?} is stopping")]
    Stopping(String),
}

/// Start a new child (error if a live child of that name exists; a `Stopped` one is replaced).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), SupervisorError>")]
pub struct AddChild(pub ChildSpec);

/// Stop a child (sends `Shutdown`) and forget it; it is not restarted. `false` if unknown.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct RemoveChild(pub String);

/// The state of every child, ordered by name.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "Vec<ChildStatus>")]
pub struct SupervisorStatus;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildStatus {
    pub name: String,
    pub state: ChildState,
    /// Restarts so far (incarnations started minus one).
    pub restarts: u64,
    /// Display form of the last non-normal exit.
    pub last_failure: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChildState {
    /// An incarnation exists (started, its exit not yet reported).
    Running,
    /// Failed; a restart is scheduled after the backoff.
    BackingOff,
    /// Exited normally, or stopped with its supervisor; will not be restarted.
    Stopped,
}

/// Identifies one incarnation of one child within a supervisor; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Incarnation(u64);

/// Sent by a child's guard when it is dropped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct ChildExited {
    name: String,
    incarnation: Incarnation,
    reason: ExitReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Children were asked to stop; the supervisor stops when they have all exited.
    Stopping,
}

struct ChildEntry {
    spec: ChildSpec,
    state: ChildState,
    restarts: u64,
    last_failure: Option<String>,
    incarnation: Incarnation,
    /// `Some` while the current incarnation may still be asked to stop.
    handle: Option<ChildHandle>,
    backoff: Backoff,
}

/// A supervisor actor. See the module docs for the state machine.
pub struct Supervisor {
    config: SupervisorConfig,
    /// Specs to start on `started`, kept so a nested group can be rebuilt from scratch.
    initial_children: Vec<ChildSpec>,
    /// Ordered for deterministic status output.
    children: BTreeMap<String, ChildEntry>,
    restart_policy: RestartPolicy,
    /// `Some` for a nested supervisor: the guard its parent gave it.
    guard: Option<ChildGuard>,
    next_incarnation: u64,
    rng: StdRng,
    phase: Phase,
}

impl Supervisor {
    /// Start a root supervisor (no parent) on the current arbiter. When its budget is
    /// exhausted it logs at error level, stops its children and stops itself.
    /// Must be called from within a running actix `System`.
    pub fn start_root(config: SupervisorConfig) -> Addr<Supervisor> {
        Supervisor::new(config, Vec::new(), None).start()
    }

    /// A child spec running a nested supervisor with `children`. Escalation from the nested
    /// supervisor is a failure of this child for the parent, which restarts it per its own
    /// policy; the restarted supervisor starts fresh with the same `children` specs.
    pub fn child_spec(config: SupervisorConfig, children: Vec<ChildSpec>) -> ChildSpec {
        let name = config.name.clone();
        ChildSpec::new(name, move |guard| {
            let supervisor = Supervisor::new(config.clone(), children.clone(), Some(guard));
            ChildHandle::actor(supervisor.start())
        })
    }

    fn new(config: SupervisorConfig, children: Vec<ChildSpec>, guard: Option<ChildGuard>) -> Self {
        let restart_policy = RestartPolicy::new(config.max_restarts, config.within);
        Self {
            config,
            initial_children: children,
            children: BTreeMap::new(),
            restart_policy,
            guard,
            next_incarnation: 0,
            rng: StdRng::from_entropy(),
            phase: Phase::Running,
        }
    }

    fn insert_child(
        &mut self,
        spec: ChildSpec,
        ctx: &mut Context<Self>,
    ) -> Result<(), SupervisorError> {
        if self.phase == Phase::Stopping {
            return Err(SupervisorError::Stopping(self.config.name.clone()));
        }
        let name = spec.name().to_owned();
        if let Some(existing) = self.children.get(&name) {
            if existing.state != ChildState::Stopped {
                return Err(SupervisorError::DuplicateChild(name));
            }
        }
        let entry = ChildEntry {
            spec,
            state: ChildState::Stopped,
            restarts: 0,
            last_failure: None,
            incarnation: Incarnation(u64::MAX),
            handle: None,
            backoff: Backoff::new(self.config.backoff_min, self.config.backoff_max),
        };
        self.children.insert(name.clone(), entry);
        self.start_child(&name, ctx);
        Ok(())
    }

    /// Starts a new incarnation of an existing entry.
    fn start_child(&mut self, name: &str, ctx: &mut Context<Self>) {
        let incarnation = Incarnation(self.next_incarnation);
        self.next_incarnation += 1;
        let Some(entry) = self.children.get_mut(name) else {
            debug_assert!(false, "start_child of unknown child {name}");
            return;
        };
        debug_assert!(
            entry.handle.is_none(),
            "previous incarnation still stoppable"
        );
        entry.incarnation = incarnation;
        entry.state = ChildState::Running;
        entry.backoff.handle_start(Instant::now());

        let addr = ctx.address();
        let child_name = name.to_owned();
        let supervisor = addr.clone();
        let mut guard = ChildGuard::new(name, entry.restarts, move |reason| {
            addr.do_send(ChildExited {
                name: child_name,
                incarnation,
                reason,
            })
        });
        guard.set_supervisor(supervisor);
        // A panicking factory drops the guard while unwinding, which reports `Panicked` for
        // this incarnation through the mailbox: it is then handled like any child failure
        // instead of killing the supervisor.
        let spec = entry.spec.clone();
        let handle = match catch_unwind(AssertUnwindSafe(|| spec.start(guard))) {
            Ok(handle) => handle,
            Err(_) => {
                warn!(supervisor = %self.config.name, child = %name, "child factory panicked");
                ChildHandle::none()
            }
        };
        if let Some(entry) = self.children.get_mut(name) {
            entry.handle = Some(handle);
        }
        debug!(supervisor = %self.config.name, child = %name, ?incarnation, "child started");
    }

    fn handle_exit(&mut self, exit: ChildExited, ctx: &mut Context<Self>) {
        let ChildExited {
            name,
            incarnation,
            reason,
        } = exit;
        let Some(entry) = self.children.get_mut(&name) else {
            debug!(supervisor = %self.config.name, child = %name, "exit of removed child ignored");
            return;
        };
        if entry.incarnation != incarnation || entry.state != ChildState::Running {
            debug!(supervisor = %self.config.name, child = %name, ?incarnation, "stale exit ignored");
            return;
        }
        // The incarnation is gone: nothing left to stop.
        entry.handle = None;
        if reason.is_failure() {
            entry.last_failure = Some(reason.to_string());
        }

        if self.phase == Phase::Stopping {
            entry.state = ChildState::Stopped;
            self.stop_if_no_child_running(ctx);
            return;
        }

        if !reason.is_failure() {
            info!(supervisor = %self.config.name, child = %name, "child exited normally");
            entry.state = ChildState::Stopped;
            return;
        }

        if let ExitReason::Fatal(_) = &reason {
            entry.state = ChildState::Stopped;
            let escalation = format!(
                "supervisor {:?}: child {:?} {}; not restarted",
                self.config.name, name, reason
            );
            self.escalate(escalation, ctx);
            return;
        }
        let now = Instant::now();
        match self.restart_policy.handle_failure(now) {
            Verdict::Restart => {
                let jitter_unit: f64 = self.rng.gen();
                let delay = entry.backoff.handle_failure(now, jitter_unit);
                entry.state = ChildState::BackingOff;
                warn!(
                    supervisor = %self.config.name,
                    child = %name,
                    %reason,
                    restarts = entry.restarts,
                    delay_ms = delay.as_millis() as u64,
                    "child failed; restarting after backoff"
                );
                ctx.run_later(delay, move |act, ctx| {
                    act.handle_backoff_elapsed(&name, incarnation, ctx)
                });
            }
            Verdict::Escalate => {
                entry.state = ChildState::Stopped;
                let escalation = format!(
                    "supervisor {:?}: more than {} restarts within {:?}; last: child {:?} {}",
                    self.config.name, self.config.max_restarts, self.config.within, name, reason
                );
                self.escalate(escalation, ctx);
            }
        }
    }

    fn handle_backoff_elapsed(
        &mut self,
        name: &str,
        incarnation: Incarnation,
        ctx: &mut Context<Self>,
    ) {
        if self.phase == Phase::Stopping {
            return;
        }
        let Some(entry) = self.children.get_mut(name) else {
            return;
        };
        if entry.incarnation != incarnation || entry.state != ChildState::BackingOff {
            return;
        }
        entry.restarts += 1;
        info!(
            supervisor = %self.config.name,
            child = %name,
            restarts = entry.restarts,
            "restarting child"
        );
        self.start_child(name, ctx);
    }

    fn escalate(&mut self, reason: String, ctx: &mut Context<Self>) {
        match &mut self.guard {
            Some(guard) => {
                error!(supervisor = %self.config.name, %reason, "restart budget exhausted; escalating to parent");
                guard.escalate(reason);
            }
            None => {
                error!(supervisor = %self.config.name, %reason, "root supervisor restart budget exhausted; stopping");
            }
        }
        self.begin_stop(ctx);
    }

    /// Ask every child to stop, then stop once they have all exited (or after the grace).
    fn begin_stop(&mut self, ctx: &mut Context<Self>) {
        if self.phase == Phase::Stopping {
            return;
        }
        self.phase = Phase::Stopping;
        for entry in self.children.values_mut() {
            if entry.state == ChildState::BackingOff {
                entry.state = ChildState::Stopped;
            }
            if let Some(handle) = entry.handle.take() {
                handle.stop();
            }
        }
        ctx.run_later(SHUTDOWN_GRACE, |act, ctx| {
            let running: Vec<&str> = act
                .children
                .iter()
                .filter(|(_, entry)| entry.state == ChildState::Running)
                .map(|(name, _)| name.as_str())
                .collect();
            warn!(supervisor = %act.config.name, ?running, "children did not exit within the shutdown grace; stopping anyway");
            ctx.stop();
        });
        self.stop_if_no_child_running(ctx);
    }

    fn stop_if_no_child_running(&mut self, ctx: &mut Context<Self>) {
        debug_assert_eq!(self.phase, Phase::Stopping);
        let running = self
            .children
            .values()
            .any(|entry| entry.state == ChildState::Running);
        if !running {
            ctx.stop();
        }
    }

    /// Last resort when the actor goes away for any other reason: no child outlives its
    /// supervisor unasked. Idempotent (handles are taken).
    fn stop_all_children(&mut self) {
        for entry in self.children.values_mut() {
            if let Some(handle) = entry.handle.take() {
                handle.stop();
            }
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        info!(supervisor = %self.config.name, children = self.initial_children.len(), "supervisor started");
        for spec in self.initial_children.clone() {
            if let Err(error) = self.insert_child(spec, ctx) {
                // A programmer error in the static tree; keep the other children running.
                error!(supervisor = %self.config.name, %error, "initial child not started");
            }
        }
    }

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        self.stop_all_children();
        Running::Stop
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all_children();
    }
}

impl Handler<ChildExited> for Supervisor {
    type Result = ();

    fn handle(&mut self, exit: ChildExited, ctx: &mut Self::Context) {
        self.handle_exit(exit, ctx);
    }
}

impl Handler<AddChild> for Supervisor {
    type Result = Result<(), SupervisorError>;

    fn handle(&mut self, AddChild(spec): AddChild, ctx: &mut Self::Context) -> Self::Result {
        self.insert_child(spec, ctx)
    }
}

impl Handler<RemoveChild> for Supervisor {
    type Result = bool;

    fn handle(&mut self, RemoveChild(name): RemoveChild, _ctx: &mut Self::Context) -> bool {
        let Some(mut entry) = self.children.remove(&name) else {
            return false;
        };
        info!(supervisor = %self.config.name, child = %name, "removing child");
        // Its exit report and any pending backoff timer now carry a stale incarnation.
        if let Some(handle) = entry.handle.take() {
            handle.stop();
        }
        true
    }
}

impl Handler<SupervisorStatus> for Supervisor {
    type Result = Vec<ChildStatus>;

    fn handle(&mut self, _: SupervisorStatus, _ctx: &mut Self::Context) -> Self::Result {
        self.children
            .iter()
            .map(|(name, entry)| ChildStatus {
                name: name.clone(),
                state: entry.state.clone(),
                restarts: entry.restarts,
                last_failure: entry.last_failure.clone(),
            })
            .collect()
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        info!(supervisor = %self.config.name, "supervisor shutting down");
        if let Some(guard) = &mut self.guard {
            guard.finish();
        }
        self.begin_stop(ctx);
    }
}
