//! The records of cluster state. Intent (what should be) lives here; observed state (what
//! nodes report) is kept in memory by the configuration role and never persisted.
use serde::{Deserialize, Serialize};

/// Fencing number of an assignment: bumped on every change of a machine's placement. A
/// message stamped with an older generation is refused.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

/// A replication stream's epoch: bumped on (re)protect, which starts a full resync.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u32);

pub const ROLE_CONFIGURATION: &str = "configuration";
pub const ROLE_PROCESS: &str = "process";
pub const ROLE_MASTER_TARGET: &str = "master-target";
pub const ALL_ROLES: [&str; 3] = [ROLE_CONFIGURATION, ROLE_PROCESS, ROLE_MASTER_TARGET];

/// A protected disk as the inventory knows it. `size_bytes` is the disk's protected geometry:
/// the size the replica has (or is being brought to) in the stream; a disk that grew is grown
/// in the replica by the stream itself, in seq order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub name: String,
    pub size_bytes: u64,
    /// Where the agent reads it (`--disk NAME=PATH`).
    #[serde(default)]
    pub path: String,
    /// How the agent recognises it: a stable device id (`wwid:…`, `serial:…`, `dm:…`,
    /// `loop:<backing file>`) for a block device, else `file:<dev>:<inode>` plus a content
    /// fingerprint of sampled blocks (`fp:<hex>`).
    #[serde(default)]
    pub id: String,
}

impl DiskInfo {
    pub fn new(name: impl Into<String>, size_bytes: u64) -> Self {
        Self {
            name: name.into(),
            size_bytes,
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub roles: Vec<String>,
    /// Where other nodes and agents reach it (QUIC).
    pub addr: String,
    /// Machines it accepts before it counts as full (placement headroom).
    pub capacity: u32,
    #[serde(default)]
    pub drained: bool,
    /// The site it runs at (`haven node --site`, default [`DEFAULT_SITE`]).
    #[serde(default = "default_site")]
    pub site: String,
}

/// The site of nodes and machines that name none: one site, as before sites existed.
pub const DEFAULT_SITE: &str = "primary";

pub fn default_site() -> String {
    DEFAULT_SITE.to_string()
}

impl NodeRecord {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub name: String,
    pub hostname: String,
    pub disks: Vec<DiskInfo>,
    pub protected: bool,
    pub epoch: Epoch,
    pub generation: Generation,
    pub process_server: Option<String>,
    pub master_target: Option<String>,
    /// The machine's payload key (32 bytes), issued at protect time. Never sent to agents.
    #[serde(with = "serde_bytes")]
    pub data_key: Vec<u8>,
    /// Issued at enrolment and named in the agent's certificate: only that agent speaks for
    /// the machine (a forgotten and re-enrolled name gets a new one). Empty for machines
    /// enrolled before enrolment ids existed.
    #[serde(default)]
    pub enrolment: String,
    /// `ctl resync M --disk D` requests, by disk name: the agent adopts the disk as it is now
    /// once it has seen a number higher than the one it handled last.
    #[serde(default)]
    pub resync: std::collections::BTreeMap<String, u64>,
    /// Recovery-point policy (`ctl protect --retention --journal-size --point-every
    /// --app-consistent-every`).
    #[serde(default)]
    pub policy: ProtectPolicy,
    /// The site the machine runs at (`haven agent --site`, default [`DEFAULT_SITE`]).
    #[serde(default = "default_site")]
    pub site: String,
    /// Where the machine stands in the failover cycle (DESIGN.md §5).
    #[serde(default)]
    pub recovery: Recovery,
    /// Failbacks completed or under way: a process server's cache from before the last one
    /// holds writes that the failback rolled back, so it is dropped (see
    /// `Assignment::failbacks`).
    #[serde(default)]
    pub failbacks: u64,
}

/// Which recovery point (`--point`): an id from `recovery-points` (the point's seq),
/// `latest`, `latest-app`, or the newest point at or before a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointSpec {
    Latest,
    LatestApp,
    Seq(u64),
    AtOrBefore { time_ms: u64 },
}

/// A machine's place in the failover cycle, persisted on the configuration node. Every
/// transition is also an event (`ctl events`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recovery {
    /// Replicating forward (or not protected at all).
    #[default]
    Protected,
    /// `ctl failover`: the forward stream is fenced (or being quiesced first) and the master
    /// target serves the disks at the point; `failover-change-point` and `failover-cancel`
    /// are still safe.
    FailoverPending(Box<Failover>),
    /// `ctl failover-commit`: the recovery site runs the machine at the chosen point.
    FailedOver(Box<Failover>),
    /// `ctl reprotect`: the original site's agent makes its disks equal to the recovery
    /// disks, block by block where the hashes differ.
    Reprotecting(Box<Failover>),
    /// The last reverse pass made the original disks equal to the recovery disks.
    Reprotected(Box<Failover>),
    /// `ctl failback`: the recovery disks are quiesced, the last differences travel back,
    /// the replica is made equal to them and the agent rebased; then protected again.
    FailingBack(Box<Failover>),
}

impl Recovery {
    pub fn name(&self) -> &'static str {
        match self {
            Recovery::Protected => "protected",
            Recovery::FailoverPending(_) => "failover-pending",
            Recovery::FailedOver(_) => "failed-over",
            Recovery::Reprotecting(_) => "reprotecting",
            Recovery::Reprotected(_) => "reprotected",
            Recovery::FailingBack(_) => "failing-back",
        }
    }

    pub fn failover(&self) -> Option<&Failover> {
        match self {
            Recovery::Protected => None,
            Recovery::FailoverPending(f)
            | Recovery::FailedOver(f)
            | Recovery::Reprotecting(f)
            | Recovery::Reprotected(f)
            | Recovery::FailingBack(f) => Some(f),
        }
    }

    /// Committed: the recovery site runs the machine (failed over, or on the way back).
    pub fn committed(&self) -> bool {
        matches!(
            self,
            Recovery::FailedOver(_)
                | Recovery::Reprotecting(_)
                | Recovery::Reprotected(_)
                | Recovery::FailingBack(_)
        )
    }
}

/// One failover of a machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// Unique per choice of point: `failover-change-point` issues a new one, and the master
    /// target serves the order with this id (a new id replaces what it served).
    pub id: u64,
    /// The point asked for (resolved by the master target).
    pub point: PointSpec,
    /// Planned: the source was up, so its tap stopped taking writes and put a final point,
    /// and the failover waits until that point is applied (zero data loss).
    pub planned: bool,
    /// Planned: the id of the final-point request sent to the agent.
    pub final_mark: Option<u64>,
    /// Planned: the seq of the final point, once the agent made it.
    pub final_seq: Option<u64>,
    pub started_ms: u64,
    /// The master target has been told to fence and serve (unplanned at once; planned once
    /// the final point is applied); the process server is out of the assignment from then.
    pub ordered: bool,
    /// Reprotect: the reverse passes asked for and the last one done.
    #[serde(default)]
    pub reverse: Option<ReversePass>,
    /// Failback: where it stands.
    #[serde(default)]
    pub failback: Option<Failback>,
}

/// A failback (see [`Recovery::FailingBack`]), step by step; each step is ordered by the
/// configuration node and reported done by the process that does it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failback {
    pub stage: FailbackStage,
    /// The forward stream's generation from the failback on: the master target applies the
    /// materialisation under it, so nothing of an older generation is applied after.
    pub generation: u64,
    pub started_ms: u64,
    /// The reverse pass that carries the last differences (after the quiesce).
    pub final_pass: u64,
    /// The replica's applied seq once it equals the recovery disks (the agent rebases on it).
    pub materialised_seq: Option<u64>,
    /// Bytes of the replica compared with the recovery disks, and rewritten.
    pub bytes_compared: u64,
    pub bytes_written: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FailbackStage {
    /// The master target flushes the recovery disks' exports and makes them read-only.
    Quiescing,
    /// The original site's agent makes its disks equal to the quiesced recovery disks.
    FinalPass,
    /// The master target makes the replica equal to the recovery disks (journaled, under
    /// the new generation).
    Materialising,
    /// The agent takes its disks' hashes as the replica's and drops what it retained.
    Rebasing,
}

impl FailbackStage {
    pub fn name(self) -> &'static str {
        match self {
            FailbackStage::Quiescing => "quiescing",
            FailbackStage::FinalPass => "final-pass",
            FailbackStage::Materialising => "materialising",
            FailbackStage::Rebasing => "rebasing",
        }
    }
}

/// The reverse passes of a reprotect (see [`Recovery::Reprotecting`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReversePass {
    /// The pass the agent is asked for.
    pub pass: u64,
    /// The last pass the agent finished, and its figures.
    pub done_pass: u64,
    pub bytes_compared: u64,
    pub hash_bytes: u64,
    pub bytes_received: u64,
    pub blocks_written: u64,
    pub started_ms: u64,
    /// Why the last attempt failed (the agent retries).
    pub error: Option<String>,
    /// The last pass compared only the blocks written at the recovery site since the pass
    /// before (tracked), not every block.
    #[serde(default)]
    pub tracked: bool,
}

/// How recovery points are kept for a machine. `None`: the default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectPolicy {
    /// History to keep (default [`ProtectPolicy::RETENTION_MS`]).
    #[serde(default)]
    pub retention_ms: Option<u64>,
    /// Cap on the journal's bytes (default: 10 % of the disks' size, at least 64 MiB).
    #[serde(default)]
    pub journal_cap_bytes: Option<u64>,
    /// A point this often when there were writes but no flush (default 10 s).
    #[serde(default)]
    pub point_every_ms: Option<u64>,
    /// An app-consistent point (the agent's freeze, flush, barrier, thaw) this often, with
    /// tap capture. `None` or `Some(0)`: off (the default).
    #[serde(default)]
    pub app_consistent_every_ms: Option<u64>,
}

impl ProtectPolicy {
    pub const RETENTION_MS: u64 = 24 * 3600 * 1000;
    pub const POINT_EVERY_MS: u64 = 10_000;
    pub const CAP_MIN_BYTES: u64 = 64 << 20;

    pub fn retention_ms(&self) -> u64 {
        self.retention_ms.unwrap_or(Self::RETENTION_MS)
    }

    pub fn point_every_ms(&self) -> u64 {
        self.point_every_ms.unwrap_or(Self::POINT_EVERY_MS)
    }

    /// The app-consistent period, if on.
    pub fn app_consistent_every_ms(&self) -> Option<u64> {
        self.app_consistent_every_ms.filter(|&ms| ms > 0)
    }

    /// The journal cap for disks of `total_bytes` in all.
    pub fn journal_cap_bytes(&self, total_bytes: u64) -> u64 {
        self.journal_cap_bytes
            .unwrap_or_else(|| (total_bytes / 10).max(Self::CAP_MIN_BYTES))
    }

    /// Fields given in `other` replace ours.
    pub fn merged(&self, other: &ProtectPolicy) -> ProtectPolicy {
        ProtectPolicy {
            retention_ms: other.retention_ms.or(self.retention_ms),
            journal_cap_bytes: other.journal_cap_bytes.or(self.journal_cap_bytes),
            point_every_ms: other.point_every_ms.or(self.point_every_ms),
            app_consistent_every_ms: other
                .app_consistent_every_ms
                .or(self.app_consistent_every_ms),
        }
    }
}

/// Cluster identity and the admin secret, created once at bootstrap. (Enrolment tokens are
/// [`TokenRecord`]s; a `join_secret` written by earlier versions is ignored.)
#[derive(Clone, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub cluster_id: String,
    pub admin_secret: String,
}

/// An enrolment token. Only the SHA-256 of its secret is kept: the token text is shown once,
/// when it is created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// First 12 hex digits of the secret's SHA-256 (`haven_transport::identity::token_id`).
    pub id: String,
    /// `agent` or `node`.
    pub kind: String,
    pub secret_sha256: String,
    pub created_ms: u64,
    /// Unix ms after which it is refused; None: it does not expire.
    pub expires_ms: Option<u64>,
    pub revoked: bool,
    /// Enrolments it made.
    pub uses: u64,
    pub description: String,
}

/// A machine removed with `ctl forget`: the nodes that held its replica or cache act on it
/// (move the replica aside or delete it, drop the cache), and a new enrolment of the name
/// continues its epochs, so an old replica is never mistaken for the new machine's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredRecord {
    pub machine: String,
    /// The forgotten machine's last epoch.
    pub epoch: Epoch,
    pub delete_replica: bool,
    /// Nodes that still have to act on it.
    pub pending_nodes: Vec<String>,
    pub retired_ms: u64,
}

/// A consistency group (`ctl group create G M…`, `ctl protect M… --group G`): machines whose
/// recovery points are taken as one cut, so they recover together.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    /// A machine is a member of at most one group.
    pub members: Vec<String>,
    /// A group point this often (0: only on request, `ctl group mark`).
    pub point_every_ms: u64,
    /// The group's points, oldest first, at most [`GROUP_POINTS_MAX`] (the oldest go first;
    /// a member's journal may have pruned a point before, which `group recovery-points`
    /// shows).
    pub points: Vec<GroupPoint>,
    /// The id the next point gets (ids increase and are never reused).
    pub next_point: u64,
}

/// Group points kept per group: at the default period a little under three days.
pub const GROUP_POINTS_MAX: usize = 4096;
/// The default period of a group's points (`ctl group create --point-every`).
pub const GROUP_POINT_EVERY_MS: u64 = 60_000;

/// One cut across every member: at each member's `seqs` entry, no member holds a write that
/// causally follows a write another member's point lacks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPoint {
    pub id: u64,
    pub name: Option<String>,
    /// The configuration node's clock when the cut was placed (unix ms).
    pub time_ms: u64,
    /// Each member's point: a seq in its stream (a named point of its journal).
    pub seqs: std::collections::BTreeMap<String, u64>,
}
