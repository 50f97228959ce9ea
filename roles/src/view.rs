//! What `haven ctl` shows. These structs are the `--json` output; their fields are documented
//! in docs/json.md and only ever added to.
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub nodes: Vec<NodeView>,
    pub machines: Vec<MachineView>,
    /// Consistency groups.
    #[serde(default)]
    pub groups: Vec<GroupView>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    /// `haven node --site`.
    #[serde(default = "haven_cluster::default_site")]
    pub site: String,
    pub roles: Vec<String>,
    pub addr: String,
    pub alive: bool,
    /// Milliseconds since the node last reported; None if it never has since this
    /// configuration node started.
    pub last_seen_ms_ago: Option<u64>,
    pub machines: u32,
    pub capacity: u32,
    pub drained: bool,
    /// Raw bytes per second received from agents (process servers) over the last report.
    #[serde(default)]
    pub bytes_in_per_sec: u64,
    /// Sealed bytes per second shipped to master targets (process servers).
    #[serde(default)]
    pub bytes_out_per_sec: u64,
    /// Bytes in the process server's cache, all machines.
    #[serde(default)]
    pub cache_bytes: u64,
}

/// A move, failover or drain, with its figures once the agent reported them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    /// Milliseconds since the event (configuration node's clock).
    pub age_ms: u64,
    /// move | failover (of a process server) | rebalance | drain | app-point | recovery (a
    /// machine's failover cycle)
    pub kind: String,
    pub machine: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub generation: u64,
    pub reason: String,
    /// Replication pause the agent measured, once reported.
    pub pause_ms: Option<u64>,
    /// Raw bytes the agent sent again, once reported.
    pub bytes_resent: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineView {
    pub name: String,
    pub hostname: String,
    /// `haven agent --site`.
    #[serde(default = "haven_cluster::default_site")]
    pub site: String,
    /// discovered | initial-sync | replicating | degraded
    pub state: String,
    pub initial_sync_percent: Option<f64>,
    pub degraded_reason: Option<String>,
    pub process_server: Option<String>,
    pub master_target: Option<String>,
    pub generation: u64,
    pub epoch: u32,
    pub captured_seq: u64,
    pub cached_seq: u64,
    pub applied_seq: u64,
    /// Age of the oldest write not yet applied (or of a blocked disk's last replicated
    /// state), seconds; 0 when in sync; None while no complete replica exists (not protected,
    /// initial sync, the agent not reporting in this protection).
    pub rpo_seconds: Option<f64>,
    pub raw_bytes_sent: u64,
    pub wire_bytes_sent: u64,
    pub throughput_bytes_per_sec: u64,
    pub retained_bytes: u64,
    pub disks: Vec<haven_cluster::DiskInfo>,
    pub agent_last_seen_ms_ago: Option<u64>,
    pub stream_restarts: u64,
    pub batches_refused: u64,
    /// Bytes of this machine's sealed batches in its process server's cache.
    #[serde(default)]
    pub cache_bytes: u64,
    /// Set when the replica cannot be brought to the source's state without an operator
    /// decision (a disk shrank or was replaced, two agents claim the machine); `state` is
    /// then `degraded` with this reason.
    #[serde(default)]
    pub blocked_reason: Option<String>,
    /// Disks the agent does not replicate until the operator decides.
    #[serde(default)]
    pub blocked_disks: Vec<crate::proto::DiskBlock>,
    /// `scan` or `tap`.
    #[serde(default)]
    pub capture: Option<String>,
    /// Why the points the source marks now are not crash-consistent.
    #[serde(default)]
    pub points_not_consistent: Option<String>,
    /// The newest recovery point: its id and age (seconds).
    #[serde(default)]
    pub latest_point: Option<String>,
    #[serde(default)]
    pub latest_point_age_seconds: Option<f64>,
    #[serde(default)]
    pub recovery_points: u64,
    /// History held (from the oldest point to now) vs asked (`--retention`), seconds.
    #[serde(default)]
    pub history_held_seconds: Option<f64>,
    #[serde(default)]
    pub history_asked_seconds: Option<f64>,
    /// A warning: the journal's cap shortened history below the window.
    #[serde(default)]
    pub journal_cap_reached: bool,
    /// The point a test failover serves, while one is active.
    #[serde(default)]
    pub test_failover: Option<String>,
    /// protected | failover-pending | failed-over (see `haven_cluster::Recovery`).
    #[serde(default)]
    pub recovery_state: String,
    /// The failover under way or done, while the machine is not `protected`.
    #[serde(default)]
    pub failover: Option<FailoverView>,
    /// The consistency group it is a member of.
    #[serde(default)]
    pub group: Option<String>,
}

/// An enrolment token, without its secret.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    /// agent | node
    pub kind: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    /// Past `expires_ms` (by the configuration node's clock).
    pub expired: bool,
    pub revoked: bool,
    /// Enrolments it made.
    pub uses: u64,
    pub description: String,
}

/// One recovery point (`ctl recovery-points`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointView {
    /// The id to pass to `--point`.
    pub point: String,
    pub seq: u64,
    /// When the source took it (unix ms).
    pub time_ms: u64,
    /// crash | app | named | not-consistent
    pub kind: String,
    pub name: Option<String>,
}

/// A machine's recovery points and the journal that holds them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryPointsView {
    pub machine: String,
    /// Oldest first.
    pub points: Vec<PointView>,
    /// The window asked for (`protect --retention`).
    pub retention_ms: u64,
    /// The window actually held: from the oldest point to now.
    pub held_ms: u64,
    pub journal_bytes: u64,
    pub journal_cap_bytes: u64,
    /// The cap cut history short of the window (a warning in status).
    pub cap_reached: bool,
    /// Seq the replica is applied through (the view `latest` shows).
    pub applied_seq: u64,
    /// A test failover is active.
    pub test_failover: Option<TestFailoverView>,
}

/// A disk of a test failover: where its view is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverDiskView {
    pub disk: String,
    /// `nbd+unix:///EXPORT?socket=PATH` (absent with `--export`).
    pub nbd_uri: Option<String>,
    /// The sparse image written with `--export`.
    pub image: Option<String>,
    pub size_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailoverView {
    pub machine: String,
    pub point: PointView,
    pub disks: Vec<FailoverDiskView>,
    /// From the request to the view being served (or written).
    pub elapsed_ms: u64,
    pub started_ms: u64,
}

/// A failover (`ctl failover`, `ctl status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverView {
    pub machine: String,
    /// failover-pending | failed-over | protected (after a cancel)
    pub state: String,
    /// quiescing (planned: the source's tap stops taking writes and puts a final point),
    /// draining (planned: waiting until the final point is applied), serving (the master
    /// target was told to serve the point), served (the exports are up), cancelled
    pub stage: String,
    pub planned: bool,
    /// The point asked for, as `--point` takes it.
    pub point_asked: String,
    /// The point served, once the master target serves it.
    pub point: Option<PointView>,
    /// One writable export per disk at the recovery site, once served.
    pub disks: Vec<FailoverDiskView>,
    /// Writes made through the exports since the point was served.
    pub writes: u64,
    /// What the failover waits for, or why it cannot go on.
    pub waiting_for: Option<String>,
    pub error: Option<String>,
    pub master_target: Option<String>,
    /// Since `ctl failover`.
    pub elapsed_ms: u64,
    /// From the master target's order to its exports being served (its share of the RTO).
    pub serve_ms: Option<u64>,
    /// Reprotect: the reverse passes asked for and the last one's figures.
    #[serde(default)]
    pub reverse: Option<haven_cluster::ReversePass>,
    /// Failback: its stage and figures.
    #[serde(default)]
    pub failback: Option<haven_cluster::Failback>,
}

/// What a test-failover cleanup did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupView {
    pub machine: String,
    /// Writes the drill made to its overlay (now discarded).
    pub overlay_writes: u64,
    /// Bytes of the overlay discarded.
    pub overlay_bytes: u64,
    /// The drill never wrote to the replica or its journal: every write of the test went to
    /// the overlay, and the replica's apply cursor only moved by replication.
    pub replica_untouched: bool,
    pub message: String,
}

/// A recovery point made by `ctl mark` (`ctl --json mark`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkView {
    pub machine: String,
    /// The id to pass to `--point` (the point's seq).
    pub point: String,
    pub seq: u64,
    /// `app`, `crash`, `named` or `not-consistent` (during an initial sync or a resync).
    pub kind: String,
    pub name: Option<String>,
    /// The agent's clock when the point was taken (unix ms).
    pub time_ms: u64,
    /// A freeze that failed or timed out (the point is then crash-consistent), a thaw that
    /// failed.
    pub warnings: Vec<String>,
}

/// A consistency group (`ctl group list`, `ctl status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub name: String,
    pub members: Vec<String>,
    /// The members' common recovery state (`protected`, `failed-over`, …), or `mixed: …`
    /// listing each member's while a group command has reached only some of them.
    pub state: String,
    /// 0: group points only on request (`ctl group mark`).
    pub point_every_ms: u64,
    /// Group points kept.
    pub points: u64,
    pub latest_point: Option<GroupPointView>,
    /// A cut is being placed now (its id).
    pub cut_in_progress: Option<u64>,
    /// Why the last cut was not made, while no later one was.
    pub last_error: Option<String>,
}

/// A group recovery point: each member's point, one cut (`ctl group mark`,
/// `ctl group recovery-points`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPointView {
    pub group: String,
    /// The id to pass to `--point` of the group commands.
    pub point: String,
    pub id: u64,
    pub name: Option<String>,
    /// The configuration node's clock when the cut was placed (unix ms).
    pub time_ms: u64,
    /// Each member's point (its seq, the id `recovery-points M` lists).
    pub members: std::collections::BTreeMap<String, u64>,
    /// `group recovery-points`: members whose journal no longer holds their point (pruned
    /// past retention); such a point cannot be recovered to.
    #[serde(default)]
    pub pruned: Vec<String>,
}

/// `ctl group test-failover`: each member's drill at the group point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupDrillView {
    pub group: String,
    pub point: GroupPointView,
    pub members: Vec<TestFailoverView>,
}

/// `ctl group failover` (and the other group steps): each member's failover.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupFailoverView {
    pub group: String,
    /// The group point every member failed over to; None when each member's failover was
    /// planned (every write it acknowledged is in its final point, which is one cut too).
    pub point: Option<GroupPointView>,
    pub members: Vec<FailoverView>,
    /// What the group step did beyond the members' own (e.g. moved every member to the
    /// group point because one failover turned unplanned).
    pub notes: Vec<String>,
}
