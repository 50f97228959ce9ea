//! Children whose body is a future ([`ChildSpec::task`]).
//!
//! The future runs on the runtime's worker threads (`tokio::spawn`), in parallel with the
//! actors on the System's `LocalSet`. A tiny actor on the supervisor's arbiter, the
//! `TaskRunner`, owns the `ChildGuard` and awaits the `JoinHandle`, translating its outcome:
//!
//! ```text
//!  factory ──tokio::spawn(make(ctx))──▶ worker thread: future
//!     │                                      │ Ok / Err / panic
//!     └─▶ TaskRunner (guard, JoinHandle) ◀───┘
//!            Ok(())               -> finish     (Normal: no restart)
//!            Err(TaskError::Retry) -> fail       (restart per policy)
//!            Err(TaskError::Fatal) -> fail_fatal (no restart: the supervisor escalates)
//!            panic                -> Panicked   (restart)
//!            Shutdown-> abort, wait for the task to end, finish
//! ```
//!
//! The runner stops only once the task has really ended (or was aborted and observed
//! cancelled), so the exit report never precedes the end of the task it describes.

use std::future::Future;

use actix::fut::wrap_future;
use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler};
use tokio::task::{AbortHandle, JoinError, JoinHandle};
use tracing::warn;

use crate::child::{ChildGuard, ChildHandle, ChildSpec, Shutdown};

/// How a task child failed: whether a restart may mend it.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Restart it, per the supervisor's backoff and restart budget (a failed disk write, a
    /// bug that a fresh start from durable state avoids).
    #[error("{0}")]
    Retry(String),
    /// No restart can mend it (a configuration that cannot work, a data dir that is gone):
    /// the supervisor escalates at once.
    #[error("{0}")]
    Fatal(String),
}

impl TaskError {
    pub fn retry(e: impl std::fmt::Display) -> Self {
        TaskError::Retry(e.to_string())
    }

    pub fn fatal(e: impl std::fmt::Display) -> Self {
        TaskError::Fatal(e.to_string())
    }
}

/// Passed to a task child's constructor on every (re)start.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The child's name within its supervisor.
    pub name: String,
    /// How many times the child has been restarted (0 on the first start): a task usually
    /// ignores it and rebuilds its state from durable cursors, but may log it.
    pub restarts: u64,
    /// The supervisor running this task, so a task can add or remove sibling children.
    pub supervisor: Option<actix::Addr<crate::Supervisor>>,
}

impl ChildSpec {
    /// A child whose body is a future, spawned with `tokio::spawn`.
    ///
    /// `Ok(())` is a normal exit (no restart), `Err(TaskError::Retry)` a failure (restart),
    /// `Err(TaskError::Fatal)` one that escalates at once, a panic is `Panicked` (restart);
    /// `Shutdown` aborts the task. `make` is called again on every restart, so the future must
    /// rebuild its state (from durable cursors), not resume it.
    pub fn task<F, Fut>(name: impl Into<String>, make: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        ChildSpec::new(name, move |guard: ChildGuard| {
            let context = TaskContext {
                name: guard.name().to_owned(),
                restarts: guard.restarts(),
                supervisor: guard.supervisor().cloned(),
            };
            let join = tokio::spawn(make(context));
            let runner = TaskRunner {
                guard,
                abort: join.abort_handle(),
                join: Some(join),
                shutting_down: false,
            };
            ChildHandle::actor(runner.start())
        })
    }
}

/// Owns the guard of a task child and waits for the task.
struct TaskRunner {
    guard: ChildGuard,
    abort: AbortHandle,
    /// Taken in `started`; `None` afterwards.
    join: Option<JoinHandle<Result<(), TaskError>>>,
    shutting_down: bool,
}

impl TaskRunner {
    fn handle_task_end(
        &mut self,
        result: Result<Result<(), TaskError>, JoinError>,
        ctx: &mut Context<Self>,
    ) {
        if self.shutting_down {
            // Whatever the task did while being aborted, we asked it to stop.
            self.guard.finish();
        } else {
            match result {
                Ok(Ok(())) => self.guard.finish(),
                Ok(Err(TaskError::Retry(reason))) => self.guard.fail(reason),
                Ok(Err(TaskError::Fatal(reason))) => self.guard.fail_fatal(reason),
                Err(error) if error.is_panic() => {
                    let payload = error.into_panic();
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".to_owned());
                    warn!(child = %self.guard.name(), panic = %message, "task child panicked");
                    self.guard.mark_panicked();
                }
                // Cancelled without our Shutdown: the runtime is going down, or someone else
                // aborted it. Not a clean exit, so a live supervisor restarts it.
                Err(error) => self.guard.fail(error.to_string()),
            }
        }
        ctx.stop();
    }
}

impl Actor for TaskRunner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(join) = self.join.take() else {
            debug_assert!(false, "TaskRunner started twice");
            return;
        };
        ctx.spawn(
            wrap_future::<_, Self>(join).map(|result, act, ctx| act.handle_task_end(result, ctx)),
        );
    }
}

impl Handler<Shutdown> for TaskRunner {
    type Result = ();

    fn handle(&mut self, _: Shutdown, _ctx: &mut Self::Context) {
        // Do not stop yet: wait for the JoinHandle to observe the cancellation, so the task is
        // really gone when the exit is reported.
        self.shutting_down = true;
        self.guard.finish();
        self.abort.abort();
    }
}

impl Drop for TaskRunner {
    fn drop(&mut self) {
        // Whatever ends the runner (including a System shutdown), never leave an orphaned task
        // running unsupervised. A no-op once the task has finished.
        self.abort.abort();
    }
}
