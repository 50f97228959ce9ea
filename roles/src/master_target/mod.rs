//! The master target: verifies, opens and applies batches in seq order to replica images,
//! then acknowledges `applied_seq` once the images and the cursor are fsynced.
//!
//! ```text
//! Supervisor "master-target"
//!  ├─ manager           one replica/<machine> child per machine assigned here
//!  └─ replica/<machine> the replica's one owner (owner.rs): ApplyCore + Replica, fed by a
//!                       bounded mailbox from the ship streams
//!
//! process server ── Sealed{first,last} ──▶ ship stream driver (apply.rs): open in the blocking
//!                                           pool, 2 in flight ─▶ replica/<m> mailbox
//!                ◀── Applied{seq} ──────── (watch of the applied seq) ◀─┘
//! ```
//! A batch that fails authentication, decoding or validation is refused whole: nothing from
//! it reaches the disks, the stream is closed with the reason, and the refusal is counted.
pub mod apply;
pub mod core;
pub mod drill;
pub mod failover;
pub mod owner;
pub mod recovery;
pub mod replica;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use actix::Addr;
use dashmap::DashMap;
use haven_actors::{AddChild, ChildSpec, RemoveChild, Supervisor, SupervisorConfig, TaskError};
use tokio::sync::watch;

use self::owner::{Mailbox, Owner, ReplicaStats};
use crate::link::NodeLink;
use crate::proto::NodeMachineReport;

/// The master-target role of a node: its replicas and the mailboxes of their owners.
pub struct MasterState {
    pub dir: PathBuf,
    /// The node's data dir (drills live in `drills/`).
    pub data_dir: PathBuf,
    /// Test failovers being served, by machine.
    drills: std::sync::Mutex<std::collections::HashMap<String, recovery::Drill>>,
    /// Failovers being served, by machine, and why one could not be (order id, reason).
    failovers: std::sync::Mutex<std::collections::HashMap<String, failover::Served>>,
    failover_errors: std::sync::Mutex<std::collections::HashMap<String, (u64, String)>>,

    /// The live owner of each machine's replica.
    owners: DashMap<String, OwnerEntry>,
    /// The last figures of every replica owner that ever ran here (kept across its restarts,
    /// so the node keeps reporting a machine while its owner restarts).
    stats: DashMap<String, watch::Sender<ReplicaStats>>,
}

struct OwnerEntry {
    mailbox: Mailbox,
}

impl MasterState {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("replicas"),
            data_dir: data_dir.to_path_buf(),
            drills: Default::default(),
            failovers: Default::default(),
            failover_errors: Default::default(),

            owners: DashMap::new(),
            stats: DashMap::new(),
        }
    }

    /// Rolls every replica back to its durable cursor (a crash may have left a batch half
    /// applied). Runs at startup, before any stream is accepted.
    pub fn recover(&self) -> Result<(), replica::ApplyError> {
        replica::recover_all(&self.dir)
    }

    pub fn reports(&self) -> Vec<NodeMachineReport> {
        self.stats
            .iter()
            .map(|e| {
                let s = e.value().borrow();
                NodeMachineReport {
                    machine: e.key().clone(),
                    role: haven_cluster::ROLE_MASTER_TARGET.into(),
                    applied_seq: s.applied_seq,
                    raw_bytes: s.bytes_applied,
                    batches_refused: s.batches_refused,
                    epoch: s.epoch,
                    refusal: s.refusal.clone(),
                    failover: failover::report(self, e.key()),
                    points: {
                        let drill = self.drill_view(e.key()).map(|d| d.point.point);
                        match s.points.clone() {
                            Some(p) => Some(crate::proto::PointsReport {
                                test_failover: drill,
                                ..p
                            }),
                            None => drill.map(|d| crate::proto::PointsReport {
                                test_failover: Some(d),
                                ..Default::default()
                            }),
                        }
                    },
                    ..Default::default()
                }
            })
            .collect()
    }

    /// The mailbox of the machine's replica owner; waits up to `wait` for the manager to
    /// start it (a stream may arrive just before the assignment does).
    async fn mailbox(&self, machine: &str, wait: Duration) -> Option<Mailbox> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(e) = self.owners.get(machine).filter(|e| !e.mailbox.is_closed()) {
                return Some(e.mailbox.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn drills(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, recovery::Drill>> {
        self.drills.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failovers(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, failover::Served>> {
        self.failovers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failover_errors(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (u64, String)>> {
        self.failover_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The test failover of `machine` being served, if any.
    pub fn drill_view(&self, machine: &str) -> Option<crate::view::TestFailoverView> {
        self.drills().get(machine).map(|d| d.view.clone())
    }

    fn insert_drill(&self, machine: &str, d: recovery::Drill) {
        self.drills().insert(machine.to_string(), d);
    }

    fn take_drill(&self, machine: &str) -> Option<recovery::Drill> {
        self.drills().remove(machine)
    }

    fn stats_for(&self, machine: &str) -> watch::Sender<ReplicaStats> {
        self.stats
            .entry(machine.to_string())
            .or_insert_with(|| watch::Sender::new(ReplicaStats::default()))
            .clone()
    }

    /// A forgotten machine (`ctl forget`): its replica is moved aside to
    /// `replicas/<machine>@<epoch>` (a name no machine can have), or deleted. A replica of a
    /// later epoch belongs to a machine enrolled since and is left alone.
    pub fn retire(
        &self,
        machine: &str,
        epoch: haven_cluster::Epoch,
        delete: bool,
    ) -> Result<(), std::io::Error> {
        self.owners.remove(machine);
        self.stats.remove(machine);
        let dir = self.dir.join(machine);
        if !dir.exists() {
            return Ok(());
        }
        let state = replica::stored_epoch(&dir).map_err(std::io::Error::other)?;
        if state.is_some_and(|e| e > epoch.0) {
            return Ok(());
        }
        if delete {
            std::fs::remove_dir_all(&dir)?;
            tracing::info!(%machine, "forgotten machine: replica deleted");
            return Ok(());
        }
        let mut aside = self.dir.join(format!("{machine}@{}", epoch.0));
        if aside.exists() {
            aside = self.dir.join(format!(
                "{machine}@{}-{}",
                epoch.0,
                crate::fsutil::unix_ms()
            ));
        }
        std::fs::rename(&dir, &aside)?;
        tracing::info!(%machine, kept = %aside.display(), "forgotten machine: replica moved aside");
        Ok(())
    }
}

/// The master-target role as the node's router and poller see it.
#[derive(Clone)]
pub struct MasterService {
    pub state: Arc<MasterState>,
    link: Arc<NodeLink>,
}

impl MasterService {
    pub fn new(data_dir: &Path, link: Arc<NodeLink>) -> Self {
        Self {
            state: Arc::new(MasterState::new(data_dir)),
            link,
        }
    }

    /// Reprotect: a failed-over machine's agent asks about its recovery disks: the blocks
    /// that differ from its own ([`failover::reverse_diff`]), a mark of their writes, or the
    /// blocks written since one ([`failover::reverse_mark`], [`failover::reverse_changed`]).
    pub async fn reverse(
        &self,
        enrolment: &str,
        req: crate::proto::Request,
    ) -> crate::proto::Response {
        use crate::proto::{Request, Response};
        let machine = req.reverse_machine().unwrap_or_default();
        // The agent of the machine's current enrolment only (a forgotten and re-enrolled
        // name is another machine).
        if self
            .link
            .assignment(machine)
            .is_none_or(|a| a.enrolment != enrolment)
        {
            return Response::Refused {
                reason: format!("{machine} is not assigned here under this agent's enrolment"),
            };
        }
        let result = match req {
            Request::ReverseDiff(r) => failover::reverse_diff(&self.state, r)
                .await
                .map(Response::ReverseDiff),
            Request::ReverseMark(r) => {
                failover::reverse_mark(&self.state, r).map(Response::ReverseMark)
            }
            Request::ReverseChanged(r) => {
                failover::reverse_changed(&self.state, r).map(Response::ReverseChanged)
            }
            _ => Err("not a reverse-path request".to_string()),
        };
        result.unwrap_or_else(|reason| Response::Refused { reason })
    }

    /// A recovery command the configuration node forwarded (see [`recovery`]).
    pub async fn recovery(&self, request: crate::proto::RecoveryRequest) -> crate::proto::Response {
        recovery::handle(self, request).await
    }

    pub fn link(&self) -> &NodeLink {
        &self.link
    }

    /// The `master-target` supervisor and its manager.
    pub fn child_spec(&self) -> ChildSpec {
        let svc = self.clone();
        let manager = ChildSpec::task("manager", move |tc| {
            let svc = svc.clone();
            async move {
                let sup = tc
                    .supervisor
                    .ok_or_else(|| TaskError::fatal("the replica manager needs a supervisor"))?;
                manage(svc, sup).await
            }
        });
        Supervisor::child_spec(SupervisorConfig::new("master-target"), vec![manager])
    }
}

/// Keeps one `replica/<machine>` child per machine assigned to this master target.
async fn manage(svc: MasterService, sup: Addr<Supervisor>) -> Result<(), TaskError> {
    let mut rx = svc.link.assignments();
    let mut running: std::collections::BTreeSet<String> = Default::default();
    loop {
        let mine: std::collections::BTreeSet<String> = rx
            .borrow_and_update()
            .iter()
            .filter(|a| a.master_target == svc.link.name)
            .map(|a| a.machine.clone())
            .collect();
        for machine in mine.difference(&running).cloned().collect::<Vec<_>>() {
            let state = svc.state.clone();
            let link = svc.link.clone();
            let m = machine.clone();
            let node = svc.link.name.clone();
            let spec = ChildSpec::task(format!("replica/{machine}"), move |_| {
                let (tx, rx) = owner::mailbox();
                state.owners.insert(m.clone(), OwnerEntry { mailbox: tx });
                let (link, pm) = (link.clone(), m.clone());
                let policy: owner::PolicySource =
                    Arc::new(move || link.assignment(&pm).map(|a| a.policy));
                let owner = Owner::new(m.clone(), state.dir.clone(), state.stats_for(&m), policy);
                let span = tracing::info_span!("replica", node = %node, role = haven_cluster::ROLE_MASTER_TARGET, machine = %m);
                tracing::Instrument::instrument(owner.run(rx), span)
            });
            sup.send(AddChild(spec))
                .await
                .map_err(TaskError::retry)?
                .map_err(TaskError::retry)?;
            // A drill recorded before a restart is served again once the owner is up.
            tokio::spawn(recovery::resume(svc.clone(), machine.clone()));
            running.insert(machine);
        }
        for machine in running.difference(&mine).cloned().collect::<Vec<_>>() {
            let _ = sup.send(RemoveChild(format!("replica/{machine}"))).await;
            svc.state.owners.remove(&machine);
            running.remove(&machine);
        }
        // Failovers: fence and serve what is asked, end what is no longer (see failover.rs).
        let orders: Vec<(String, Option<crate::proto::FailoverOrder>)> = rx
            .borrow()
            .iter()
            .filter(|a| a.master_target == svc.link.name)
            .map(|a| (a.machine.clone(), a.failover.clone()))
            .collect();
        let mut retry = false;
        for (machine, order) in &orders {
            retry |= !failover::reconcile(&svc, machine, order.as_ref()).await;
        }
        tokio::select! {
            r = rx.changed() => r.map_err(|_| TaskError::fatal("the node's assignments are gone"))?,
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
        }
    }
}
