//! Supervision trees on top of actix.
//!
//! actix's own `Supervisor` only restarts an actor whose context stopped, and never notices a
//! panic: a panicking handler leaves a dead actor and nobody restarts it. Here every child
//! holds a [`ChildGuard`]; when the child goes away for *any* reason (clean stop, reported
//! failure, panic) the guard is dropped and reports the exit to its [`Supervisor`], which
//! restarts it per policy (bounded, jittered backoff; a restart budget that escalates to the
//! parent supervisor when exhausted).
//!
//! ```text
//!               root Supervisor (start_root)
//!               ├── child actor ............ ChildSpec::new(name, |guard| ChildHandle::actor(..))
//!               ├── task child ............. ChildSpec::task(name, |ctx| async { .. })
//!               └── nested Supervisor ...... Supervisor::child_spec(config, specs)
//!                   ├── child
//!                   └── child
//!
//!  child dies ──(guard dropped)──▶ ChildExited ──▶ supervisor
//!      failure: backoff, restart ─┐   budget exceeded: stop children, stop,
//!                                 │   parent sees Escalated and restarts the group
//!      normal: Stopped ◀──────────┘
//! ```
//!
//! Module map:
//! - [`policy`]: the pure decisions (restart budget, backoff); no actix, time passed in.
//! - `child`: [`ChildGuard`], [`ChildHandle`], [`ChildSpec`], [`ExitReason`], [`Shutdown`].
//! - `task`: [`ChildSpec::task`], children whose body is a future on the worker threads.
//! - `supervisor`: the [`Supervisor`] actor and its messages.
//!
//! # Runtime
//!
//! The node runs actix on a multi-threaded tokio runtime
//! (`actix_rt::System::with_tokio_rt(|| Builder::new_multi_thread()...)`): actors live on the
//! System's `LocalSet`, `tokio::spawn` goes to the worker threads. Under that runtime
//! a panic in an actix handler is caught by tokio, which drops the actor's task
//! *while unwinding*: the actor and its guard are dropped, and the guard reports `Panicked`.
//! The tests in `tests/supervision.rs` check this on exactly that runtime.
//!
//! # What runs while unwinding
//!
//! When tokio drops a panicked actor's task, actix's `ContextFut::drop` polls the context one
//! last time to stop it: the actor's `stopping` and `stopped` run **while the thread is
//! unwinding**, so a panic there aborts the process; keep them panic-free. Messages still
//! queued are not handled (a stopping context does not read its mailbox), unless `stopping`
//! returns `Running::Continue`, which supervised actors should therefore not do after a
//! panic. `tests/supervision.rs` (`actix_drops_panicked_actor_while_unwinding`) pins this
//! actix behaviour, since the guard's panic detection depends on it.

pub mod policy;

mod child;
mod supervisor;
mod task;

pub use child::{ChildGuard, ChildHandle, ChildSpec, ExitReason, Factory, Shutdown};
pub use policy::{Backoff, RestartPolicy, Verdict};
pub use supervisor::{
    AddChild, ChildState, ChildStatus, RemoveChild, Supervisor, SupervisorConfig, SupervisorError,
    SupervisorStatus, SHUTDOWN_GRACE,
};
pub use task::{TaskContext, TaskError};

/// Runs until SIGINT or SIGTERM, or until `root` gives up (its restart budget ran out, or a
/// child failed fatally): then it returns an error, so the process exits non-zero and a
/// service manager restarts it, rather than staying up with nothing running inside.
pub async fn serve_until_signal(root: &actix::Addr<Supervisor>) -> Result<(), RootGaveUp> {
    let gave_up = async {
        while root.connected() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = wait_for_signal() => Ok(()),
        _ = gave_up => Err(RootGaveUp),
    }
}

/// The root supervisor stopped on its own.
#[derive(Debug, thiserror::Error)]
#[error("the root supervisor gave up (restart budget exhausted or a fatal failure; see the errors above); exiting so that a service manager restarts the process")]
pub struct RootGaveUp;

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
