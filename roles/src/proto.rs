//! Wire messages between roles. Every control exchange is one bidirectional QUIC stream: one
//! [`Request`], one [`Response`]. The two data streams (agent → process server, process
//! server → master target) start the same way and then carry frames in both directions:
//!
//! ```text
//! agent                      process server                    master target
//!   |-- OpenStream ---------->|                                    |
//!   |<-- StreamAccepted ------|  (cached_seq, applied_seq)          |
//!   |-- AgentFrame::Batch --->|  seal, cache, fsync                 |
//!   |<-- Ack{cached,applied} -|-- OpenShip ----------------------->|
//!   |                         |<-- ShipAccepted{applied_seq} ------|
//!   |                         |-- ShipFrame::Sealed ------------->|  open, apply, fsync
//!   |<-- Ack{.., applied} ----|<-- Applied{applied_seq} ----------|
//! ```
//! Enums are append-only: add variants and fields at the end, never reuse a name.
use haven_cluster::{DiskInfo, Epoch, Generation};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    Join(JoinRequest),
    Admin {
        secret: String,
        command: AdminCommand,
    },
    AgentPoll(Box<AgentReport>),
    NodePoll(NodeReport),
    OpenStream(StreamOpen),
    OpenShip(ShipOpen),
    /// A process server asks the agent at the other end of a live stream whether it is still
    /// there (a second agent claims the same machine); answered with `ProbeAck`.
    Probe,
    /// The configuration node asks a master target about a machine's recovery points and
    /// drills (forwarding an operator's command); only a configuration node may ask.
    Recovery(RecoveryRequest),
    /// Reprotect: the agent of a failed-over machine, back at the original site, asks its
    /// master target for the blocks of the recovery disk that differ from its own disk;
    /// answered with `ReverseDiff`. Only the machine's own agent may ask.
    ReverseDiff(ReverseDiffRequest),
    /// Reprotect, tracked: the agent marks where in the recovery disks' writes its pass
    /// starts (answered with `ReverseMark`), so that the next pass compares only the blocks
    /// written after the mark. Only the machine's own agent may ask.
    ReverseMark(ReverseMarkRequest),
    /// Reprotect, tracked: the blocks of a recovery disk written since a mark (answered
    /// with `ReverseChanged`). Only the machine's own agent may ask.
    ReverseChanged(ReverseChangedRequest),
}

impl Request {
    /// The machine a reverse-path request is about (asked by its own agent only).
    pub fn reverse_machine(&self) -> Option<&str> {
        match self {
            Request::ReverseDiff(r) => Some(&r.machine),
            Request::ReverseMark(r) => Some(&r.machine),
            Request::ReverseChanged(r) => Some(&r.machine),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseMarkRequest {
    pub machine: String,
    /// The failover ([`FailoverOrder::id`]) the recovery disks belong to.
    pub order: u64,
}

/// A place in one recovery disk's writes: `ReverseChanged` lists the blocks written after
/// it. `boot` names the export it was taken of (an export served again, by a restarted
/// master target, has another and knows nothing of the writes before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseMark {
    pub boot: u64,
    pub mark: u32,
}

/// One mark per disk, in disk order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseMarkReply {
    pub marks: Vec<ReverseMark>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseChangedRequest {
    pub machine: String,
    pub order: u64,
    pub disk: u16,
    pub since: ReverseMark,
    /// The range of blocks asked about: `blocks` (at most `CHANGED_BLOCKS_MAX` of the
    /// master target) from `first_block`.
    pub first_block: u64,
    pub blocks: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseChangedReply {
    /// The blocks of the range written since the mark, ascending; None if the export does
    /// not know (`since` is of another export): then every block must be compared.
    pub changed: Option<Vec<u64>>,
}

/// A range of the agent's disk, as block hashes (see [`Request::ReverseDiff`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseDiffRequest {
    pub machine: String,
    /// The failover ([`FailoverOrder::id`]) the recovery disk belongs to.
    pub order: u64,
    pub disk: u16,
    /// Where the range starts (a multiple of 4 KiB).
    pub offset: u64,
    /// The agent disk's size (it must be the recovery disk's).
    pub size: u64,
    /// xxh3-64 of each 4 KiB block from `offset` (the disk's last block may be short).
    pub hashes: Vec<u64>,
    /// If not empty, the blocks `hashes` are of (ascending, one hash each), not the
    /// contiguous range at `offset`: a tracked pass compares only the blocks written since
    /// its mark.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sparse: Vec<u64>,
}

/// The blocks of the range that differ, coalesced into runs (offset, data).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseDiffReply {
    pub runs: Vec<(u64, serde_bytes::ByteBuf)>,
}

/// Reprotect: the agent makes its disks equal to the recovery disks of failover `order`,
/// by block-hash comparison with the master target (`pass` counts the passes asked for).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseOrder {
    pub order: u64,
    pub pass: u64,
    /// (node name, QUIC address) of the master target serving the recovery disks.
    pub master_target: (String, String),
}

/// A reverse pass the agent finished (or gave up on, `error`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseDone {
    pub order: u64,
    pub pass: u64,
    /// Bytes of the disks compared (by hash).
    pub bytes_compared: u64,
    /// Bytes of block hashes sent to the master target.
    pub hash_bytes: u64,
    /// Bytes of differing blocks received and written.
    pub bytes_received: u64,
    pub blocks_written: u64,
    pub error: Option<String>,
    /// Only the blocks written at the recovery site since the last pass were compared
    /// (a tracked pass), not every block.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tracked: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Joined(JoinReply),
    Admin(AdminReply),
    AgentPoll(AgentPollReply),
    NodePoll(NodePollReply),
    StreamAccepted {
        cached_seq: u64,
        applied_seq: u64,
    },
    ShipAccepted {
        applied_seq: u64,
    },
    /// The request was refused; nothing was changed. `reason` is for the operator.
    Refused {
        reason: String,
    },
    /// The agent process answering a `Probe`: its instance id (see `StreamOpen::instance`).
    ProbeAck {
        instance: u64,
    },
    Recovery(RecoveryReply),
    ReverseDiff(ReverseDiffReply),
    ReverseMark(ReverseMarkReply),
    ReverseChanged(ReverseChangedReply),
}

pub use haven_cluster::PointSpec;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RecoveryRequest {
    Points {
        machine: String,
    },
    TestFailover {
        machine: String,
        point: PointSpec,
        /// Write each disk's view as a sparse image `DIR/<disk>.img` (on the master target's
        /// host) instead of serving it.
        export_dir: Option<String>,
    },
    TestFailoverCleanup {
        machine: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RecoveryReply {
    Points(crate::view::RecoveryPointsView),
    TestFailover(crate::view::TestFailoverView),
    Cleaned(crate::view::CleanupView),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub secret: String,
    pub kind: JoinKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JoinKind {
    Node {
        name: String,
        roles: Vec<String>,
        addr: String,
        capacity: u32,
        /// `haven node --site` (absent from older nodes: the default site).
        #[serde(default = "haven_cluster::default_site")]
        site: String,
    },
    Agent {
        machine: String,
        hostname: String,
        disks: Vec<DiskInfo>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinReply {
    pub cluster_id: String,
    /// Leaf first, then the CA (DER).
    pub chain: Vec<serde_bytes::ByteBuf>,
    pub key_pkcs8: serde_bytes::ByteBuf,
    pub ca: serde_bytes::ByteBuf,
}

/// What an agent tells the configuration node every poll.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentReport {
    pub machine: String,
    pub hostname: String,
    pub disks: Vec<DiskInfo>,
    pub stats: AgentStats,
    /// A sync barrier the agent completed: (request id, seq it must be applied through).
    pub sync_done: Option<(u64, u64)>,
    /// Long poll: if there is nothing new for the agent, the server may hold the reply this
    /// long, answering early when a sync barrier is requested.
    #[serde(default)]
    pub wait_ms: u32,
    /// Increases with every report an agent makes (and across its restarts): a held poll
    /// answered late must not overwrite a newer report.
    #[serde(default)]
    pub report_seq: u64,
    /// The assignment generation the agent acts on: a poll is held only when the answer
    /// would not change it.
    #[serde(default)]
    pub known_generation: u64,
    /// Set by the server on a long poll it answers again after holding it: the report is
    /// old, so it neither refreshes liveness nor replaces newer figures.
    #[serde(default)]
    pub held: bool,
    /// Random per agent process: two instances reporting at once are two agents claiming
    /// one machine (a clone).
    #[serde(default)]
    pub instance: u64,
    /// Recovery points the agent made on request (`ctl mark`) or on its app-consistent period
    /// and has not yet seen the configuration node take (oldest first, bounded).
    #[serde(default)]
    pub marks_done: Vec<MarkDone>,
    /// `haven agent --site`; None from older agents.
    #[serde(default)]
    pub site: Option<String>,
    /// The last reverse pass (reprotect) the agent finished.
    #[serde(default)]
    pub reverse_done: Option<ReverseDone>,
    /// The failback ([`RebaseOrder::order`]) the agent last rebased for.
    #[serde(default)]
    pub rebased: Option<u64>,
}

/// `ctl mark`: a recovery point now, through the agent's poll.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkRequest {
    /// Issued by the configuration node; the agent makes each id's point once.
    pub id: u64,
    /// App-consistent: freeze, flush, barrier, thaw.
    pub app: bool,
    pub name: Option<String>,
    /// A consistency group's cut (`ctl group mark`): once the point is inserted the agent
    /// holds every write completion until the configuration node releases it
    /// ([`AgentPollReply::release`]) or this many ms pass, and reports both. 0: no hold.
    #[serde(default)]
    pub hold_ms: u32,
}

/// Where a group cut's hold of write completions stands at the agent (see
/// [`MarkRequest::hold_ms`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hold {
    /// The point is in the stream and no write completes until the release.
    Holding,
    /// Released by the configuration node: every member had placed its point meanwhile.
    Released,
    /// Released by the agent on its own after `hold_ms`: the cut is not known to be
    /// consistent.
    TimedOut,
}

/// A point the agent made (or could not make) on request or on its app-consistent period.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkDone {
    /// The [`MarkRequest::id`], or 0 for a periodic app-consistent point.
    pub request: u64,
    /// Increases with every outcome an agent reports (and across its restarts): the
    /// configuration node takes each once.
    pub id: u64,
    /// The point's seq in the stream; None when no point was inserted (`error` says why).
    pub seq: Option<u64>,
    pub kind: Option<PointKind>,
    pub name: Option<String>,
    /// The agent's clock when the point was taken (unix ms).
    pub time_ms: u64,
    /// What went wrong without preventing the point: a freeze that failed or timed out (the
    /// point is then crash-consistent), a thaw that failed.
    pub warnings: Vec<String>,
    /// Why no point was inserted.
    pub error: Option<String>,
    /// A group cut's hold: `Holding` with the point, then how it ended.
    #[serde(default)]
    pub hold: Option<Hold>,
}

/// A protected disk the agent does not replicate until the operator decides: it shrank, or
/// the disk at its path is not the one that was protected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskBlock {
    pub disk: String,
    pub reason: String,
    /// Unix ms since which its changes have not been replicated.
    pub since_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStats {
    pub epoch: u32,
    pub captured_seq: u64,
    pub cached_seq: u64,
    pub applied_seq: u64,
    /// Unix ms of the oldest write captured but not yet applied; 0 when in sync.
    pub oldest_unapplied_ms: u64,
    pub raw_bytes_sent: u64,
    pub raw_bytes_captured: u64,
    pub throughput_bps: u64,
    /// Initial sync progress in percent, None once the first full pass is applied.
    pub initial_sync_percent: Option<f64>,
    pub retained_bytes: u64,
    pub connected: bool,
    pub degraded_reason: Option<String>,
    pub scans: u64,
    pub stream_restarts: u64,
    /// Figures of the agent's last move to another process server.
    #[serde(default)]
    pub last_move: Option<MoveStats>,
    /// Disks whose changes are not replicated until the operator decides.
    #[serde(default)]
    pub blocked: Vec<DiskBlock>,
    /// `scan` or `tap`.
    #[serde(default)]
    pub capture: String,
    /// Why the points the source marks now are not crash-consistent (tap: the sync pass, an
    /// overflow of the retention buffer).
    #[serde(default)]
    pub not_consistent: Option<String>,
}

/// What a move cost, as the agent saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MoveStats {
    /// The assignment generation the agent moved to.
    pub generation: u64,
    /// From noticing the new assignment to the new process server's first acknowledgement.
    pub pause_ms: u64,
    /// Raw bytes sent again because the old process server may not have shipped them.
    pub bytes_resent: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentPollReply {
    pub protected: bool,
    pub epoch: u32,
    pub generation: Generation,
    /// (node name, QUIC address) of the assigned process server.
    pub process_server: Option<(String, String)>,
    /// Capture everything written so far and report it under this id.
    pub sync_request: Option<u64>,
    /// `ctl resync` requests by disk name (see `MachineRecord::resync`).
    #[serde(default)]
    pub resync: std::collections::BTreeMap<String, u64>,
    /// A recovery point this often when there were writes but no flush (tap capture).
    #[serde(default)]
    pub point_every_ms: Option<u64>,
    /// `ctl mark` requests the agent has not reported done yet (bounded).
    #[serde(default)]
    pub marks: Vec<MarkRequest>,
    /// An app-consistent point this often (tap capture; None: off).
    #[serde(default)]
    pub app_consistent_every_ms: Option<u64>,
    /// The machine is failed over (or failing over): the source's tap takes no writes, for
    /// this reason, until it is protected from its own site again.
    #[serde(default)]
    pub read_only: Option<String>,
    /// Reprotect: make the disks equal to the recovery disks (a pass not done yet).
    #[serde(default)]
    pub reverse: Option<ReverseOrder>,
    /// Failback: the replica equals the disks now; take their hashes as the applied tables.
    #[serde(default)]
    pub rebase: Option<RebaseOrder>,
    /// Group cuts ([`MarkRequest::id`]s) whose hold of write completions is released.
    #[serde(default)]
    pub release: Vec<u64>,
}

/// Failback's last step at the original site (see `agent/reverse.rs`): the disks equal the
/// replica at `applied_seq`, so the agent's applied tables become the disks' hashes, what it
/// retained is dropped (it was rolled back), and forward replication continues after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebaseOrder {
    /// The failover ([`FailoverOrder::id`]) whose failback this is: done once per id.
    pub order: u64,
    pub applied_seq: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeReport {
    pub name: String,
    pub machines: Vec<NodeMachineReport>,
    /// Long poll: the assignments version the node holds; if unchanged, the server may hold
    /// the reply up to `wait_ms`, answering early when assignments change.
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub wait_ms: u32,
    /// See `AgentReport::held`.
    #[serde(default)]
    pub held: bool,
    /// Forgotten machines (see `NodePollReply::retired`) this node has acted on.
    #[serde(default)]
    pub retired_done: Vec<String>,
    /// `haven node --site` as the node runs now (a restart may change it); None from older
    /// nodes.
    #[serde(default)]
    pub site: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeMachineReport {
    pub machine: String,
    pub role: String,
    pub cached_seq: u64,
    pub applied_seq: u64,
    pub wire_bytes: u64,
    pub raw_bytes: u64,
    pub cache_bytes: u64,
    pub batches_refused: u64,
    pub restarts: u64,
    /// The stream epoch these figures belong to; figures of another epoch are ignored.
    #[serde(default)]
    pub epoch: u32,
    /// Process server: why the last ship stream to the master target ended, until a new one
    /// is accepted.
    #[serde(default)]
    pub ship_error: Option<String>,
    /// Master target: why it refused a batch, until a later batch is applied.
    #[serde(default)]
    pub refusal: Option<String>,
    /// Master target: the recovery points it holds for the machine.
    #[serde(default)]
    pub points: Option<PointsReport>,
    /// Master target: the failover it serves (or failed to serve) for the machine.
    #[serde(default)]
    pub failover: Option<FailoverReport>,
}

/// What a master target holds of a machine's history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsReport {
    pub count: u64,
    pub oldest_ms: Option<u64>,
    pub latest_ms: Option<u64>,
    pub latest: Option<String>,
    pub retention_ms: u64,
    pub journal_bytes: u64,
    pub journal_cap_bytes: u64,
    /// The cap shortened history below the window.
    pub cap_reached: bool,
    /// A test failover is being served (its point).
    pub test_failover: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodePollReply {
    pub assignments: Vec<Assignment>,
    /// Changes whenever any assignment changes.
    #[serde(default)]
    pub version: u64,
    /// Machines forgotten with `ctl forget` whose replica or cache this node holds.
    #[serde(default)]
    pub retired: Vec<Retirement>,
}

/// What a node does with a forgotten machine: a master target moves its replica aside to
/// `replicas/<machine>@<epoch>` (or deletes it), a process server drops its cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retirement {
    pub machine: String,
    pub epoch: Epoch,
    pub delete_replica: bool,
}

/// A machine's placement, as sent to the nodes that serve it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub machine: String,
    pub epoch: Epoch,
    pub generation: Generation,
    pub disks: Vec<DiskInfo>,
    pub process_server: String,
    pub master_target: String,
    pub master_target_addr: String,
    pub data_key: serde_bytes::ByteBuf,
    /// The enrolment whose agent may stream for the machine (its certificate names it).
    #[serde(default)]
    pub enrolment: String,
    /// How the master target keeps the machine's recovery points.
    #[serde(default)]
    pub policy: haven_cluster::ProtectPolicy,
    /// The master target fences the forward stream and serves the disks at this point
    /// (`ctl failover`); None: replicate forward (a failover it served is cancelled).
    #[serde(default)]
    pub failover: Option<FailoverOrder>,
    /// [`haven_cluster::MachineRecord::failbacks`]: a process server drops a cache it holds
    /// from before the last failback (its writes were rolled back).
    #[serde(default)]
    pub failbacks: u64,
}

/// What a master target does for a failover (see `master_target/failover.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverOrder {
    /// [`haven_cluster::Failover::id`]: a new id replaces what was served.
    pub id: u64,
    pub point: PointSpec,
    /// `ctl failover-commit` fixed the choice.
    pub committed: bool,
    /// `ctl failback`: quiesce the exports, and then (once the original disks took the last
    /// differences) make the replica equal to the recovery disks.
    #[serde(default)]
    pub failback: Option<FailbackOrder>,
}

/// What a master target does for a failback (see `master_target/failover.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackOrder {
    /// Materialise the recovery disks into the replica, applying under this generation.
    /// None: only quiesce (flush, then read-only) while the final reverse pass runs.
    pub materialise: Option<u64>,
}

/// A failback's materialisation at the master target, done.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Materialised {
    pub generation: u64,
    /// The replica's applied seq: it equals the recovery disks there.
    pub applied_seq: u64,
    pub bytes_compared: u64,
    pub bytes_written: u64,
}

/// A master target's failover of a machine, as it serves it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The [`FailoverOrder::id`] this is about.
    pub id: u64,
    /// Served at this point (None: not served, see `error`).
    pub point: Option<crate::view::PointView>,
    pub disks: Vec<crate::view::FailoverDiskView>,
    pub writes: u64,
    pub serve_ms: u64,
    pub error: Option<String>,
    /// Failback: the exports are flushed and read-only.
    #[serde(default)]
    pub quiesced: bool,
    /// Failback: the replica equals the recovery disks.
    #[serde(default)]
    pub materialised: Option<Materialised>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamOpen {
    pub machine: String,
    pub epoch: u32,
    pub generation: Generation,
    pub disks: Vec<DiskInfo>,
    /// Random per agent process. A stream of the same instance takes over from its earlier
    /// one (a reconnect); another instance is admitted only if the live one does not answer a
    /// `Probe` (it died), so two agents never both stream one machine.
    #[serde(default)]
    pub instance: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AgentFrame {
    /// `body` is an encoded [`BatchBody`]; the process server seals it without looking inside.
    Batch {
        first_seq: u64,
        last_seq: u64,
        body: serde_bytes::ByteBuf,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub cached_seq: u64,
    pub applied_seq: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShipOpen {
    pub machine: String,
    pub epoch: u32,
    pub generation: Generation,
    pub disks: Vec<DiskInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ShipFrame {
    Sealed {
        first_seq: u64,
        last_seq: u64,
        sealed: haven_transport::seal::Sealed,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub applied_seq: u64,
}

/// A record with empty `data` writes nothing: it is a marker that carries a seq (a batch
/// that only changes `disk_sizes` is one marker).
///
/// The plaintext of a batch: writes in seq order. `disk` indexes the machine's disk list.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchBody {
    pub records: Vec<WriteRecord>,
    /// The size of every disk (by index) as of this batch: the master target grows or
    /// shrinks a replica image to it before applying the records, so a disk's geometry
    /// travels in seq order with its data. Empty: unchanged (batches of older agents).
    #[serde(default)]
    pub disk_sizes: Vec<u64>,
    /// Recovery points this batch carries (oldest first). Each owns a seq of the batch whose
    /// record is a marker (empty `data`): the point is the state after every record up to
    /// and including that seq. Empty for batches of older agents.
    #[serde(default)]
    pub points: Vec<PointMark>,
}

/// A recovery point as the source marks it in the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMark {
    pub seq: u64,
    /// The source's clock when the point was taken (unix ms).
    pub time_ms: u64,
    pub kind: PointKind,
    /// The operator's name for the point (`ctl mark --name`), if any.
    pub name: Option<String>,
}

/// How consistent a recovery point is. Append-only, like every wire enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PointKind {
    /// A flush barrier of a tap, or a marker in a tap stream: a state the disks really had.
    Crash,
    /// Taken between the freeze and the thaw command: the application's state is consistent.
    App,
    /// Marked by the operator (`ctl mark --name`), crash-consistent.
    Named,
    /// During an initial sync, a dirty-region resync or a scan pass: not a state the disks
    /// ever had as a whole.
    NotConsistent,
}

impl PointKind {
    /// The name `ctl recovery-points` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
            PointKind::Named => "named",
            PointKind::NotConsistent => "not-consistent",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WriteRecord {
    pub seq: u64,
    pub disk: u16,
    pub offset: u64,
    pub data: serde_bytes::ByteBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AdminCommand {
    Status,
    Nodes,
    Machines,
    Protect {
        machine: String,
        /// Fields given replace the machine's policy (also for a protected machine).
        #[serde(default)]
        policy: haven_cluster::ProtectPolicy,
    },
    Unprotect {
        machine: String,
    },
    /// Ask the agent for a barrier; answered with `SyncRequested{id}`.
    RequestSync {
        machine: String,
    },
    /// Poll a barrier: answered with `SyncState`.
    SyncState {
        machine: String,
        id: u64,
    },
    /// Live move to another process server: answered with `Moved`.
    Move {
        machine: String,
        to: String,
    },
    /// One rebalancing pass now: answered with `Rebalanced`.
    Rebalance,
    Drain {
        node: String,
    },
    Undrain {
        node: String,
    },
    Events,
    /// An enrolment token: answered with `TokenCreated`.
    TokenCreate {
        /// `agent` or `node`.
        kind: String,
        /// None: it does not expire.
        ttl_ms: Option<u64>,
        description: String,
    },
    TokenList,
    TokenRevoke {
        id: String,
    },
    /// Removes an unprotected machine so its name can be enrolled again.
    Forget {
        machine: String,
        delete_replica: bool,
    },
    /// The agent adopts the disk as it is now (size, identity) and sends every block that
    /// differs from the replica.
    Resync {
        machine: String,
        disk: String,
    },
    /// Forwarded to the machine's master target (see [`RecoveryRequest`]).
    Recovery(RecoveryRequest),
    /// A recovery point now (`ctl mark`): answered with `MarkRequested{id}`.
    Mark {
        machine: String,
        app: bool,
        name: Option<String>,
    },
    /// Poll a mark: answered with `MarkState`.
    MarkState {
        machine: String,
        id: u64,
    },
    /// `ctl failover M [--point P]`: answered with `Failover` (poll with `FailoverState`).
    Failover {
        machine: String,
        point: PointSpec,
    },
    FailoverState {
        machine: String,
    },
    FailoverChangePoint {
        machine: String,
        point: PointSpec,
    },
    FailoverCommit {
        machine: String,
    },
    FailoverCancel {
        machine: String,
    },
    /// `ctl reprotect M`: answered with `Failover` (poll with `FailoverState`).
    Reprotect {
        machine: String,
    },
    /// `ctl failback M`: answered with `Failover` (poll with `FailoverState`).
    Failback {
        machine: String,
    },
    /// `ctl group create G M…` (and `ctl protect M… --group G`): creates the group or adds
    /// members to it; answered with `Groups`.
    GroupAdd {
        group: String,
        members: Vec<String>,
        /// None: the group's period stays (a new group gets the default).
        point_every_ms: Option<u64>,
    },
    /// The members stay protected, each on its own.
    GroupDelete {
        group: String,
    },
    Groups,
    /// A group point now (`ctl group mark`): answered with `GroupMarkRequested{id}`.
    GroupMark {
        group: String,
        name: Option<String>,
    },
    /// Poll a group point: answered with `GroupMarkState`.
    GroupMarkState {
        group: String,
        id: u64,
    },
    /// Every group point kept, oldest first: answered with `GroupPoints`.
    GroupPoints {
        group: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AdminReply {
    Status(crate::view::ClusterStatus),
    Nodes(Vec<crate::view::NodeView>),
    Machines(Vec<crate::view::MachineView>),
    Done {
        message: String,
    },
    SyncRequested {
        id: u64,
    },
    SyncState {
        barrier_seq: Option<u64>,
        applied_seq: u64,
        done: bool,
        /// The replica cannot be brought to the source without an operator decision: the
        /// barrier will not complete, so waiting is pointless.
        #[serde(default)]
        blocked: Option<String>,
        /// Why the machine is degraded right now (it may recover on its own).
        #[serde(default)]
        degraded: Option<String>,
    },
    Moved {
        machine: String,
        from: String,
        to: String,
        generation: u64,
    },
    Rebalanced {
        moves: Vec<crate::view::EventView>,
    },
    Events(Vec<crate::view::EventView>),
    /// The secret is shown only here; `ctl` composes the token text with the cluster id and
    /// CA fingerprint of its admin token.
    TokenCreated {
        id: String,
        kind: String,
        secret: String,
        expires_ms: Option<u64>,
    },
    Tokens(Vec<crate::view::TokenView>),
    /// The configuration node forwards this request to the master target at `addr` (`node`)
    /// and answers with its reply. Never sent to `ctl`.
    Forward {
        node: String,
        addr: String,
        request: RecoveryRequest,
    },
    Recovery(RecoveryReply),
    MarkRequested {
        id: u64,
    },
    /// `done`: the agent inserted the point (None: not yet).
    MarkState {
        done: Option<crate::view::MarkView>,
    },
    Failover(Box<crate::view::FailoverView>),
    Groups(Vec<crate::view::GroupView>),
    GroupMarkRequested {
        id: u64,
    },
    /// `done`: every member placed its point and held until all had (None: not yet).
    GroupMarkState {
        done: Option<crate::view::GroupPointView>,
    },
    GroupPoints(Vec<crate::view::GroupPointView>),
}
