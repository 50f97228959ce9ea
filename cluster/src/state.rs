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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub name: String,
    pub size_bytes: u64,
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
}

/// Cluster identity and secrets, created once at bootstrap.
#[derive(Clone, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub cluster_id: String,
    pub join_secret: String,
    pub admin_secret: String,
}
