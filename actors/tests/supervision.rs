//! Supervision trees on the node's real runtime shape: actix on a multi-threaded tokio runtime
//! (actors on the System's `LocalSet`, `tokio::spawn` on 2 worker threads).
//!
//! No test sleeps to "let things settle": every wait is a bounded poll of an observable
//! condition that fails with a message naming what it waited for.

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, Addr, Context, Handler, Message};
use haven_actors::{
    AddChild, ChildGuard, ChildHandle, ChildSpec, ChildState, ChildStatus, ExitReason, RemoveChild,
    Shutdown, Supervisor, SupervisorConfig, SupervisorError, SupervisorStatus, TaskContext,
    TaskError,
};

/// Upper bound of any single wait; generous for a loaded 2-core CI machine.
const WAIT_MAX: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Runs `test` inside an actix System built exactly like the node's.
fn run(test: impl Future<Output = ()>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "haven_actors=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    });
    system.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), test)
            .await
            .expect("test exceeded 60 s");
    });
}

/// Polls `check` until it holds, failing with `what` after [`WAIT_MAX`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT_MAX:?} waiting for: {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn fast_config(name: &str) -> SupervisorConfig {
    SupervisorConfig {
        backoff_min: Duration::from_millis(1),
        backoff_max: Duration::from_millis(20),
        ..SupervisorConfig::new(name)
    }
}

async fn statuses(supervisor: &Addr<Supervisor>) -> Vec<ChildStatus> {
    supervisor
        .send(SupervisorStatus)
        .await
        .expect("supervisor alive")
}

async fn status_of(supervisor: &Addr<Supervisor>, name: &str) -> Option<ChildStatus> {
    statuses(supervisor)
        .await
        .into_iter()
        .find(|status| status.name == name)
}

async fn add(supervisor: &Addr<Supervisor>, spec: ChildSpec) {
    supervisor
        .send(AddChild(spec))
        .await
        .expect("supervisor alive")
        .expect("child added");
}

// ---------------------------------------------------------------------------------------------
// A test actor child and what the test can observe about it.

#[derive(Default)]
struct Probe {
    /// Incarnations started by the factory.
    starts: AtomicU64,
    /// Incarnations currently alive (actor not yet dropped).
    alive: AtomicI64,
    /// Address of the latest incarnation.
    addr: Mutex<Option<Addr<Worker>>>,
}

impl Probe {
    fn starts(&self) -> u64 {
        self.starts.load(Ordering::SeqCst)
    }
    fn alive(&self) -> i64 {
        self.alive.load(Ordering::SeqCst)
    }
    fn addr(&self) -> Addr<Worker> {
        self.addr.lock().unwrap().clone().expect("worker started")
    }
}

struct Worker {
    guard: ChildGuard,
    probe: Arc<Probe>,
}

impl Actor for Worker {
    type Context = Context<Self>;
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.probe.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Boom;

impl Handler<Boom> for Worker {
    type Result = ();
    fn handle(&mut self, _: Boom, _: &mut Self::Context) {
        panic!("boom inside an actix handler ({})", self.guard.name());
    }
}

/// Answers the incarnation's restart count as seen through its guard.
#[derive(Message)]
#[rtype(result = "u64")]
struct Restarts;

impl Handler<Restarts> for Worker {
    type Result = u64;
    fn handle(&mut self, _: Restarts, _: &mut Self::Context) -> u64 {
        self.guard.restarts()
    }
}

impl Handler<Shutdown> for Worker {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        self.guard.finish();
        ctx.stop();
    }
}

fn worker_spec(name: &str, probe: Arc<Probe>) -> ChildSpec {
    ChildSpec::new(name, move |guard| {
        probe.starts.fetch_add(1, Ordering::SeqCst);
        probe.alive.fetch_add(1, Ordering::SeqCst);
        let addr = Worker {
            guard,
            probe: probe.clone(),
        }
        .start();
        *probe.addr.lock().unwrap() = Some(addr.clone());
        ChildHandle::actor(addr)
    })
}

/// Counts live task futures: incremented when built, decremented when dropped (completion
/// or abort).
struct LiveToken(Arc<AtomicI64>);

impl LiveToken {
    fn new(counter: &Arc<AtomicI64>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for LiveToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn panic_in_actix_handler_restarts_only_that_child() {
    run(async {
        let supervisor = Supervisor::start_root(fast_config("root"));
        let (a, b) = (Arc::new(Probe::default()), Arc::new(Probe::default()));
        add(&supervisor, worker_spec("a", a.clone())).await;
        add(&supervisor, worker_spec("b", b.clone())).await;

        let (a0, b0) = (a.addr(), b.addr());
        assert_eq!(a0.send(Restarts).await.unwrap(), 0);

        // Phase: a panics inside a handler, on the System's LocalSet of a multi-thread runtime.
        a0.do_send(Boom);
        eventually(
            "a's first incarnation is dropped (tokio caught the panic)",
            || {
                let a = a.clone();
                async move { a.starts() == 2 && a.alive() == 1 }
            },
        )
        .await;
        eventually("a is running again with restarts = 1", || {
            let supervisor = supervisor.clone();
            async move {
                status_of(&supervisor, "a").await
                    == Some(ChildStatus {
                        name: "a".into(),
                        state: ChildState::Running,
                        restarts: 1,
                        last_failure: Some(ExitReason::Panicked.to_string()),
                    })
            }
        })
        .await;
        assert!(!a0.connected(), "the panicked incarnation is gone");
        let a1 = a.addr();
        assert_eq!(
            a1.send(Restarts).await.unwrap(),
            1,
            "guard sees the restart"
        );

        // Phase: the sibling is untouched: same incarnation, never restarted.
        assert_eq!(b.starts(), 1);
        assert!(b0.connected());
        assert_eq!(b0.send(Restarts).await.unwrap(), 0);
        let b_status = status_of(&supervisor, "b").await.unwrap();
        assert_eq!(
            (b_status.state, b_status.restarts, b_status.last_failure),
            (ChildState::Running, 0, None)
        );

        // Phase: it keeps working for later panics too.
        a1.do_send(Boom);
        eventually("a restarted a second time", || {
            let supervisor = supervisor.clone();
            async move {
                status_of(&supervisor, "a")
                    .await
                    .is_some_and(|s| s.restarts == 2 && s.state == ChildState::Running)
            }
        })
        .await;
        assert_eq!(a.addr().send(Restarts).await.unwrap(), 2);
        assert_eq!(b.starts(), 1);
    });
}

#[test]
fn task_err_restarts_and_ok_stops() {
    run(async {
        let supervisor = Supervisor::start_root(fast_config("root"));
        let calls = Arc::new(AtomicU64::new(0));
        let seen_restarts = Arc::new(Mutex::new(Vec::new()));
        let spec = ChildSpec::task("replicator", {
            let (calls, seen_restarts) = (calls.clone(), seen_restarts.clone());
            move |ctx: TaskContext| {
                assert_eq!(ctx.name, "replicator");
                seen_restarts.lock().unwrap().push(ctx.restarts);
                let call = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if call < 2 {
                        Err(TaskError::Retry(format!("cursor {call} unreadable")))
                    } else {
                        Ok(())
                    }
                }
            }
        });
        add(&supervisor, spec).await;

        eventually("the task finished normally after two failures", || {
            let supervisor = supervisor.clone();
            async move {
                status_of(&supervisor, "replicator")
                    .await
                    .is_some_and(|s| s.state == ChildState::Stopped)
            }
        })
        .await;
        // Stopped is set in the same handler that would have scheduled a restart, so seeing it
        // proves no further restart is pending.
        let status = status_of(&supervisor, "replicator").await.unwrap();
        assert_eq!(status.restarts, 2);
        assert_eq!(
            status.last_failure.as_deref(),
            Some("failed: cursor 1 unreadable")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(*seen_restarts.lock().unwrap(), [0, 1, 2]);
    });
}

#[test]
fn task_ok_is_not_restarted() {
    run(async {
        let supervisor = Supervisor::start_root(fast_config("root"));
        let calls = Arc::new(AtomicU64::new(0));
        add(
            &supervisor,
            ChildSpec::task("once", {
                let calls = calls.clone();
                move |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Ok(()) }
                }
            }),
        )
        .await;
        eventually("the task stopped", || {
            let supervisor = supervisor.clone();
            async move {
                status_of(&supervisor, "once")
                    .await
                    .is_some_and(|s| s.state == ChildState::Stopped)
            }
        })
        .await;
        let status = status_of(&supervisor, "once").await.unwrap();
        assert_eq!((status.restarts, status.last_failure), (0, None));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // A stopped child's name may be reused.
        add(
            &supervisor,
            ChildSpec::task("once", {
                let calls = calls.clone();
                move |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    futures::future::pending()
                }
            }),
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let duplicate = supervisor
            .send(AddChild(ChildSpec::task("once", |_| async { Ok(()) })))
            .await
            .unwrap();
        assert_eq!(
            duplicate,
            Err(SupervisorError::DuplicateChild("once".into()))
        );
    });
}

#[test]
fn panicking_task_is_restarted() {
    run(async {
        let supervisor = Supervisor::start_root(fast_config("root"));
        let calls = Arc::new(AtomicU64::new(0));
        let live = Arc::new(AtomicI64::new(0));
        add(
            &supervisor,
            ChildSpec::task("shaky", {
                let (calls, live) = (calls.clone(), live.clone());
                move |_| {
                    let call = calls.fetch_add(1, Ordering::SeqCst);
                    let token = LiveToken::new(&live);
                    async move {
                        let _token = token;
                        // Yield once so the panic happens on a worker thread mid-run.
                        tokio::task::yield_now().await;
                        if call == 0 {
                            panic!("task bug");
                        }
                        futures::future::pending::<Result<(), TaskError>>().await
                    }
                }
            }),
        )
        .await;
        eventually("the task was restarted after its panic", || {
            let supervisor = supervisor.clone();
            async move {
                status_of(&supervisor, "shaky")
                    .await
                    .is_some_and(|s| s.restarts == 1 && s.state == ChildState::Running)
            }
        })
        .await;
        let status = status_of(&supervisor, "shaky").await.unwrap();
        assert_eq!(status.last_failure.as_deref(), Some("panicked"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            live.load(Ordering::SeqCst),
            1,
            "only the new incarnation runs"
        );
    });
}

#[test]
fn root_supervisor_stops_when_budget_is_exhausted() {
    run(async {
        let config = SupervisorConfig {
            max_restarts: 2,
            within: Duration::from_secs(60),
            ..fast_config("root")
        };
        let supervisor = Supervisor::start_root(config);
        let failures = Arc::new(AtomicU64::new(0));
        let sibling_live = Arc::new(AtomicI64::new(0));
        let sibling = Arc::new(Probe::default());
        add(
            &supervisor,
            ChildSpec::task("sibling-task", {
                let sibling_live = sibling_live.clone();
                move |_| {
                    let token = LiveToken::new(&sibling_live);
                    async move {
                        let _token = token;
                        futures::future::pending().await
                    }
                }
            }),
        )
        .await;
        add(&supervisor, worker_spec("sibling-actor", sibling.clone())).await;
        add(
            &supervisor,
            ChildSpec::task("doomed", {
                let failures = failures.clone();
                move |_| {
                    failures.fetch_add(1, Ordering::SeqCst);
                    async { Err(TaskError::Retry("disk gone".to_owned())) }
                }
            }),
        )
        .await;

        eventually("the root supervisor stopped", || {
            let supervisor = supervisor.clone();
            async move { !supervisor.connected() }
        })
        .await;
        // 1 start + 2 restarts; the third failure is one more than the budget.
        assert_eq!(failures.load(Ordering::SeqCst), 3);
        // The supervisor waits for its children's exits before stopping, so these hold
        // exactly, not eventually.
        assert_eq!(
            sibling_live.load(Ordering::SeqCst),
            0,
            "sibling task aborted"
        );
        assert_eq!(sibling.alive(), 0, "sibling actor stopped");
        assert_eq!(
            sibling.starts(),
            1,
            "siblings are not restarted on escalation"
        );
    });
}

#[test]
fn a_fatal_task_error_escalates_at_once_without_a_restart() {
    run(async {
        // A budget that would allow many restarts: a fatal error must not use it.
        let config = SupervisorConfig {
            max_restarts: 50,
            within: Duration::from_secs(60),
            ..fast_config("root")
        };
        let supervisor = Supervisor::start_root(config);
        let calls = Arc::new(AtomicU64::new(0));
        let sibling = Arc::new(Probe::default());
        add(&supervisor, worker_spec("sibling-actor", sibling.clone())).await;
        add(
            &supervisor,
            ChildSpec::task("misconfigured", {
                let calls = calls.clone();
                move |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Err(TaskError::fatal("no such data dir")) }
                }
            }),
        )
        .await;
        eventually("the root supervisor stopped", || {
            let supervisor = supervisor.clone();
            async move { !supervisor.connected() }
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "never restarted");
        assert_eq!(sibling.alive(), 0, "its siblings stopped with the group");
    });
}

#[test]
fn nested_supervisor_escalation_restarts_the_group() {
    run(async {
        let root = Supervisor::start_root(fast_config("root"));
        let flaky_calls = Arc::new(AtomicU64::new(0));
        let steady_starts = Arc::new(AtomicU64::new(0));
        let steady_live = Arc::new(AtomicI64::new(0));
        let group_config = SupervisorConfig {
            max_restarts: 1,
            within: Duration::from_secs(60),
            ..fast_config("group")
        };
        let flaky = ChildSpec::task("flaky", {
            let flaky_calls = flaky_calls.clone();
            move |_| {
                let call = flaky_calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if call < 2 {
                        return Err(TaskError::Retry(format!("flake {call}")));
                    }
                    futures::future::pending().await
                }
            }
        });
        let steady = ChildSpec::task("steady", {
            let (steady_starts, steady_live) = (steady_starts.clone(), steady_live.clone());
            move |_| {
                steady_starts.fetch_add(1, Ordering::SeqCst);
                let token = LiveToken::new(&steady_live);
                async move {
                    let _token = token;
                    futures::future::pending().await
                }
            }
        });
        add(
            &root,
            Supervisor::child_spec(group_config, vec![flaky, steady]),
        )
        .await;

        // Phase: flaky fails twice within the group's window (budget 1) -> group escalates ->
        // root restarts the group, which starts fresh with both children.
        eventually("root restarted the escalated group", || {
            let root = root.clone();
            async move {
                status_of(&root, "group")
                    .await
                    .is_some_and(|s| s.restarts == 1 && s.state == ChildState::Running)
            }
        })
        .await;
        eventually("the fresh group started both children", || {
            let (flaky_calls, steady_starts) = (flaky_calls.clone(), steady_starts.clone());
            async move {
                flaky_calls.load(Ordering::SeqCst) == 3 && steady_starts.load(Ordering::SeqCst) == 2
            }
        })
        .await;
        let group = status_of(&root, "group").await.unwrap();
        let failure = group.last_failure.expect("escalation recorded");
        assert!(
            failure.starts_with("escalated: supervisor \"group\""),
            "{failure}"
        );
        assert!(failure.contains("flake 1"), "{failure}");
        // The old group stopped its steady child before reporting, so there is never more
        // than the new one.
        assert_eq!(steady_live.load(Ordering::SeqCst), 1);
        assert!(root.connected(), "the root absorbed the failure");
    });
}

#[test]
fn remove_child_stops_it_without_restart() {
    run(async {
        let supervisor = Supervisor::start_root(fast_config("root"));
        let worker = Arc::new(Probe::default());
        // AddChild is Send: it can come from a task on a worker thread.
        let spec = worker_spec("w", worker.clone());
        let remote = supervisor.clone();
        tokio::spawn(async move { remote.send(AddChild(spec)).await })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let w0 = worker.addr();

        assert!(supervisor.send(RemoveChild("w".into())).await.unwrap());
        eventually("the removed worker stopped", || {
            let w0 = w0.clone();
            async move { !w0.connected() }
        })
        .await;
        // The worker's (Normal, now stale) exit was sent before its mailbox closed, so this
        // status request is handled after it.
        assert_eq!(statuses(&supervisor).await, []);
        assert_eq!(worker.starts(), 1);
        assert_eq!(worker.alive(), 0);
        assert!(!supervisor.send(RemoveChild("w".into())).await.unwrap());

        // A task child is aborted by RemoveChild.
        let live = Arc::new(AtomicI64::new(0));
        add(
            &supervisor,
            ChildSpec::task("t", {
                let live = live.clone();
                move |_| {
                    let token = LiveToken::new(&live);
                    async move {
                        let _token = token;
                        futures::future::pending().await
                    }
                }
            }),
        )
        .await;
        assert!(supervisor.send(RemoveChild("t".into())).await.unwrap());
        eventually("the removed task was aborted", || {
            let live = live.clone();
            async move { live.load(Ordering::SeqCst) == 0 }
        })
        .await;
        assert_eq!(statuses(&supervisor).await, []);
    });
}

#[test]
fn stale_guards_are_ignored() {
    run(async {
        let supervisor = Supervisor::start_root(fast_config("root"));
        // A child whose guard the test holds: it "exits" when the test drops the guard.
        let guards: Arc<Mutex<Vec<ChildGuard>>> = Arc::default();
        let spec = ChildSpec::new("s", {
            let guards = guards.clone();
            move |guard| {
                guards.lock().unwrap().push(guard);
                ChildHandle::none()
            }
        });
        let take_guard = |index: usize| guards.lock().unwrap().remove(index);

        add(&supervisor, spec.clone()).await;
        assert!(supervisor.send(RemoveChild("s".into())).await.unwrap());
        add(&supervisor, spec.clone()).await;
        assert_eq!(guards.lock().unwrap().len(), 2);

        // Phase: the removed incarnation's guard fails late; the new incarnation is unaffected.
        let mut stale = take_guard(0);
        stale.fail("late failure from a removed incarnation");
        drop(stale);
        let expected_running = ChildStatus {
            name: "s".into(),
            state: ChildState::Running,
            restarts: 0,
            last_failure: None,
        };
        assert_eq!(statuses(&supervisor).await, [expected_running]);

        // Phase: the current incarnation's guard dies without a verdict (= Panicked) and is
        // restarted exactly once. (Within one entry a guard can never be stale: a restart only
        // follows its predecessor's report. Staleness comes from remove/re-add, above.)
        drop(take_guard(0));
        eventually("s restarted once", || {
            let supervisor = supervisor.clone();
            async move {
                status_of(&supervisor, "s")
                    .await
                    .is_some_and(|s| s.restarts == 1 && s.state == ChildState::Running)
            }
        })
        .await;
        assert_eq!(guards.lock().unwrap().len(), 1);
        let restarted = take_guard(0);
        assert_eq!(restarted.restarts(), 1);
        guards.lock().unwrap().push(restarted);
        let status = status_of(&supervisor, "s").await.unwrap();
        assert_eq!(status.last_failure.as_deref(), Some("panicked"));
    });
}

#[test]
fn shutdown_stops_children_and_supervisor() {
    run(async {
        let root = Supervisor::start_root(fast_config("root"));
        let worker = Arc::new(Probe::default());
        let nested_worker = Arc::new(Probe::default());
        add(&root, worker_spec("w", worker.clone())).await;
        add(
            &root,
            Supervisor::child_spec(
                fast_config("group"),
                vec![worker_spec("nw", nested_worker.clone())],
            ),
        )
        .await;
        eventually("the nested worker started", || {
            let nested_worker = nested_worker.clone();
            async move { nested_worker.starts() == 1 }
        })
        .await;

        root.do_send(Shutdown);
        eventually("the root stopped", || {
            let root = root.clone();
            async move { !root.connected() }
        })
        .await;
        assert_eq!((worker.alive(), nested_worker.alive()), (0, 0));
        assert_eq!((worker.starts(), nested_worker.starts()), (1, 1));
        let late = root.send(SupervisorStatus).await;
        assert!(late.is_err(), "a stopped supervisor answers nothing");
    });
}

/// Pins the actix/tokio behaviour the guard's panic detection relies on (see the crate docs):
/// after a handler panics, the actor is dropped while the thread unwinds, `stopped` runs during
/// that unwinding, and messages queued behind the panicking one are never handled.
#[test]
fn actix_drops_panicked_actor_while_unwinding() {
    struct Fragile {
        log: Arc<Mutex<Vec<String>>>,
    }
    impl Fragile {
        fn record(&self, event: &str) {
            let unwinding = std::thread::panicking();
            self.log
                .lock()
                .unwrap()
                .push(format!("{event} unwinding={unwinding}"));
        }
    }
    impl Actor for Fragile {
        type Context = Context<Self>;
        fn stopped(&mut self, _: &mut Self::Context) {
            self.record("stopped");
        }
    }
    impl Drop for Fragile {
        fn drop(&mut self) {
            self.record("dropped");
        }
    }
    impl Handler<Boom> for Fragile {
        type Result = ();
        fn handle(&mut self, _: Boom, _: &mut Self::Context) {
            panic!("boom");
        }
    }
    impl Handler<Restarts> for Fragile {
        type Result = u64;
        fn handle(&mut self, _: Restarts, _: &mut Self::Context) -> u64 {
            self.record("late message");
            0
        }
    }

    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    run({
        let log = log.clone();
        async move {
            let fragile = Fragile { log: log.clone() }.start();
            // Both queued before the actor runs: the second sits behind the panic.
            fragile.do_send(Boom);
            fragile.do_send(Restarts);
            eventually("the panicked actor is dropped", || {
                let log = log.clone();
                async move { log.lock().unwrap().len() == 2 }
            })
            .await;
            assert!(!fragile.connected());
        }
    });
    assert_eq!(
        *log.lock().unwrap(),
        ["stopped unwinding=true", "dropped unwinding=true"]
    );
}
