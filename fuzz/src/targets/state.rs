//! The state files that are decoded with the codec: the master target's replica cursor
//! (`replicas/<machine>/state`), the agent's tables, disks and control files
//! (`agent/{tables,disks,control}`), the node's assignments (`assignments`), and the
//! configuration node's records (values of its redb tables).
//!
//! The first byte says which. The replica cursor, the agent's tables and its control file
//! have private types in `haven-roles`; they are decoded here into copies of those types with
//! the same fields and field types (the decoder that runs is the same rmp-serde and
//! serde-derive code for that shape). Keep the copies in step with the originals.
use haven_cluster::{ClusterMeta, MachineRecord, NodeRecord, RetiredRecord, TokenRecord};
use haven_roles::agent::disks::{DiskRecord, DisksFile};
use haven_roles::proto::Assignment;
use haven_transport::codec;
use serde::{Deserialize, Serialize};

use super::wire::round_trip;
use crate::samples;

/// The master target's private `ReplicaState` (roles/src/master_target/replica.rs).
#[derive(Debug, Serialize, Deserialize)]
struct ReplicaState {
    version: u32,
    epoch: u32,
    applied_seq: u64,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    sizes: Option<Vec<u64>>,
    #[serde(default)]
    names: Option<Vec<String>>,
}

/// The agent's private `TablesFile` (roles/src/agent/).
#[derive(Debug, Serialize, Deserialize)]
struct TablesFile {
    version: u32,
    epoch: u32,
    applied_seq: u64,
    initial_done: bool,
    disks: Vec<TableDisk>,
}

/// The agent's private `TableDisk` (roles/src/agent/).
#[derive(Debug, Serialize, Deserialize)]
struct TableDisk {
    name: String,
    size_bytes: u64,
    #[serde(with = "serde_bytes")]
    hashes_le: Vec<u8>,
}

/// The agent's private `Control` (roles/src/agent/).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Control {
    protected: bool,
    epoch: u32,
    generation: u64,
    process_server: Option<(String, String)>,
}

/// `ClusterMeta` has no `Debug` (it holds the admin secret).
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    cluster_id: String,
    admin_secret: String,
}

pub fn fuzz(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => drop(round_trip::<ReplicaState>(rest)),
        1 => drop(round_trip::<TablesFile>(rest)),
        2 => drop(round_trip::<Control>(rest)),
        3 => drop(round_trip::<DisksFile>(rest)),
        4 => drop(round_trip::<Vec<Assignment>>(rest)),
        5 => drop(round_trip::<NodeRecord>(rest)),
        6 => drop(round_trip::<MachineRecord>(rest)),
        7 => drop(round_trip::<TokenRecord>(rest)),
        8 => drop(round_trip::<RetiredRecord>(rest)),
        _ => {
            if codec::decode::<ClusterMeta>(rest).is_ok() {
                round_trip::<Meta>(rest).expect("the same shape decodes");
            }
        }
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let tagged = |tag: u8, bytes: Vec<u8>| [vec![tag], bytes].concat();
    let e = |v: &dyn erased::Encode| v.encode();
    vec![
        tagged(
            0,
            e(&ReplicaState {
                version: 1,
                epoch: 3,
                applied_seq: 1000,
                generation: 7,
                sizes: Some(vec![16 << 30, 1 << 30]),
                names: Some(vec!["root".into(), "data".into()]),
            }),
        ),
        tagged(
            1,
            e(&TablesFile {
                version: 1,
                epoch: 3,
                applied_seq: 1000,
                initial_done: true,
                disks: vec![TableDisk {
                    name: "root".into(),
                    size_bytes: 8192,
                    hashes_le: vec![0xab; 16],
                }],
            }),
        ),
        tagged(
            2,
            e(&Control {
                protected: true,
                epoch: 3,
                generation: 7,
                process_server: Some(("ps-1".into(), "10.0.0.1:7443".into())),
            }),
        ),
        tagged(
            3,
            e(&DisksFile {
                version: 1,
                epoch: 3,
                disks: vec![DiskRecord {
                    name: "root".into(),
                    path: "/dev/vda".into(),
                    size_bytes: 16 << 30,
                    device_id: Some("wwid:x".into()),
                    file_id: Some((1, 2)),
                    fingerprint: "0a1b".into(),
                    resync_done: 2,
                    blocked_since_ms: Some(5),
                }],
            }),
        ),
        tagged(4, e(&vec![samples::assignment()])),
        tagged(
            5,
            e(&NodeRecord {
                name: "ps-1".into(),
                roles: vec!["process".into()],
                addr: "10.0.0.1:7443".into(),
                capacity: 10,
                drained: true,
                site: haven_cluster::default_site(),
            }),
        ),
        tagged(
            6,
            e(&MachineRecord {
                name: "web-01".into(),
                hostname: "h".into(),
                disks: samples::disks(),
                protected: true,
                epoch: haven_cluster::Epoch(3),
                generation: haven_cluster::Generation(7),
                process_server: Some("ps-1".into()),
                master_target: Some("mt-1".into()),
                data_key: vec![0x11; 32],
                enrolment: "e".into(),
                resync: [("data".to_string(), 2u64)].into(),
                policy: haven_cluster::ProtectPolicy {
                    retention_ms: Some(3_600_000),
                    journal_cap_bytes: None,
                    point_every_ms: Some(5_000),
                    app_consistent_every_ms: None,
                },
                site: haven_cluster::default_site(),
                recovery: Default::default(),
                failbacks: 1,
            }),
        ),
        tagged(
            7,
            e(&TokenRecord {
                id: "0123456789ab".into(),
                kind: "agent".into(),
                secret_sha256: "ff".into(),
                created_ms: 1,
                expires_ms: Some(2),
                revoked: true,
                uses: 3,
                description: "d".into(),
            }),
        ),
        tagged(
            8,
            e(&RetiredRecord {
                machine: "old".into(),
                epoch: haven_cluster::Epoch(2),
                delete_replica: true,
                pending_nodes: vec!["mt-1".into()],
                retired_ms: 5,
            }),
        ),
        tagged(
            9,
            e(&Meta {
                cluster_id: "c".into(),
                admin_secret: "s".into(),
            }),
        ),
    ]
}

mod erased {
    /// Lets the seeds list values of different types.
    pub trait Encode {
        fn encode(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Vec<u8> {
            haven_transport::codec::encode(self).unwrap()
        }
    }
}
