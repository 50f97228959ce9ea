//! Valid values of the wire and state types, whose encodings seed the targets.
use haven_cluster::{DiskInfo, Epoch, Generation};
use haven_roles::proto::*;
use haven_transport::seal::Sealed;
use serde_bytes::ByteBuf;

pub fn disks() -> Vec<DiskInfo> {
    vec![
        DiskInfo {
            name: "root".into(),
            size_bytes: 16 << 30,
            path: "/dev/vda".into(),
            id: "wwid:naa.6001 fp:0a1b".into(),
        },
        DiskInfo::new("data", 1 << 30),
    ]
}

pub fn agent_report() -> AgentReport {
    AgentReport {
        machine: "web-01".into(),
        hostname: "web-01.example".into(),
        disks: disks(),
        stats: AgentStats {
            epoch: 3,
            captured_seq: 1041,
            initial_sync_percent: Some(42.5),
            degraded_reason: Some("x".into()),
            last_move: Some(MoveStats {
                generation: 7,
                pause_ms: 850,
                bytes_resent: 65536,
            }),
            blocked: vec![DiskBlock {
                disk: "data".into(),
                reason: "shrank".into(),
                since_ms: 1,
            }],
            ..Default::default()
        },
        sync_done: Some((5, 1041)),
        wait_ms: 25_000,
        report_seq: 9,
        known_generation: 7,
        held: true,
        instance: 3,
        marks_done: vec![MarkDone {
            request: 1,
            id: 2,
            seq: Some(40),
            kind: Some(PointKind::App),
            name: Some("n".into()),
            time_ms: 1,
            warnings: vec!["w".into()],
            error: None,
            hold: Some(Hold::Holding),
        }],
        site: Some("dr".into()),
        reverse_done: Some(ReverseDone {
            order: 9,
            pass: 2,
            bytes_compared: 1 << 30,
            hash_bytes: 2 << 20,
            bytes_received: 4096,
            blocks_written: 1,
            error: None,
            tracked: true,
        }),
        rebased: Some(9),
    }
}

pub fn assignment() -> Assignment {
    Assignment {
        machine: "web-01".into(),
        epoch: Epoch(3),
        generation: Generation(7),
        disks: disks(),
        process_server: "ps-1".into(),
        master_target: "mt-1".into(),
        master_target_addr: "10.0.0.2:7443".into(),
        data_key: ByteBuf::from(vec![0x11; 32]),
        enrolment: "e-4f2a".into(),
        policy: haven_cluster::ProtectPolicy {
            retention_ms: Some(86_400_000),
            journal_cap_bytes: Some(1 << 30),
            point_every_ms: None,
            app_consistent_every_ms: None,
        },
        failover: Some(FailoverOrder {
            id: 9,
            point: PointSpec::Seq(40),
            committed: false,
            failback: Some(FailbackOrder {
                materialise: Some(8),
            }),
        }),
        failbacks: 1,
    }
}

pub fn batch_body() -> BatchBody {
    BatchBody {
        records: vec![
            WriteRecord {
                seq: 1001,
                disk: 1,
                offset: 1 << 20,
                data: ByteBuf::from(b"0123456789abcdef".to_vec()),
            },
            WriteRecord {
                seq: 1002,
                disk: 0,
                offset: 0,
                data: ByteBuf::new(),
            },
        ],
        disk_sizes: vec![16 << 30, 2 << 30],
        points: vec![PointMark {
            seq: 1002,
            time_ms: 1_767_225_600_000,
            kind: PointKind::Named,
            name: Some("before-upgrade".into()),
        }],
    }
}

pub fn requests() -> Vec<Request> {
    vec![
        Request::Join(JoinRequest {
            secret: "5ec2e7".into(),
            kind: JoinKind::Node {
                name: "ps-1".into(),
                roles: vec!["process".into()],
                addr: "10.0.0.1:7443".into(),
                capacity: 10,
                site: "dr".into(),
            },
        }),
        Request::Join(JoinRequest {
            secret: "5ec2e7".into(),
            kind: JoinKind::Agent {
                machine: "web-01".into(),
                hostname: "h".into(),
                disks: disks(),
            },
        }),
        Request::Admin {
            secret: "ad317".into(),
            command: AdminCommand::TokenCreate {
                kind: "agent".into(),
                ttl_ms: Some(5),
                description: "d".into(),
            },
        },
        Request::Admin {
            secret: "ad317".into(),
            command: AdminCommand::Forget {
                machine: "m".into(),
                delete_replica: true,
            },
        },
        Request::AgentPoll(Box::new(agent_report())),
        Request::NodePoll(NodeReport {
            name: "ps-1".into(),
            machines: vec![NodeMachineReport {
                machine: "web-01".into(),
                role: "process".into(),
                ship_error: Some("e".into()),
                ..Default::default()
            }],
            version: 12,
            wait_ms: 1,
            held: true,
            retired_done: vec!["old".into()],
            site: Some("dr".into()),
        }),
        Request::OpenStream(StreamOpen {
            machine: "web-01".into(),
            epoch: 3,
            generation: Generation(7),
            disks: disks(),
            instance: 3,
        }),
        Request::OpenShip(ShipOpen {
            machine: "web-01".into(),
            epoch: 3,
            generation: Generation(7),
            disks: disks(),
        }),
        Request::Probe,
        Request::ReverseDiff(ReverseDiffRequest {
            machine: "web-01".into(),
            order: 9,
            disk: 0,
            offset: 4096,
            size: 1 << 30,
            hashes: vec![1, 2, 3],
            sparse: vec![],
        }),
        Request::ReverseDiff(ReverseDiffRequest {
            machine: "web-01".into(),
            order: 9,
            disk: 0,
            offset: 0,
            size: 1 << 30,
            hashes: vec![1, 2],
            sparse: vec![4, 9],
        }),
        Request::ReverseMark(ReverseMarkRequest {
            machine: "web-01".into(),
            order: 9,
        }),
        Request::ReverseChanged(ReverseChangedRequest {
            machine: "web-01".into(),
            order: 9,
            disk: 0,
            since: ReverseMark { boot: 7, mark: 3 },
            first_block: 0,
            blocks: 1 << 16,
        }),
    ]
}

pub fn responses() -> Vec<Response> {
    use haven_roles::view::*;
    vec![
        Response::Joined(JoinReply {
            cluster_id: "c".into(),
            chain: vec![ByteBuf::from(vec![0x30, 0x82])],
            key_pkcs8: ByteBuf::from(vec![0x30]),
            ca: ByteBuf::from(vec![0x30]),
        }),
        Response::Admin(AdminReply::Status(ClusterStatus {
            cluster_id: "c".into(),
            nodes: vec![NodeView {
                name: "n".into(),
                last_seen_ms_ago: Some(3),
                ..Default::default()
            }],
            machines: vec![MachineView {
                name: "m".into(),
                rpo_seconds: Some(1.5),
                disks: disks(),
                blocked_disks: vec![DiskBlock::default()],
                group: Some("g".into()),
                ..Default::default()
            }],
            groups: vec![GroupView {
                name: "g".into(),
                members: vec!["m".into()],
                latest_point: Some(GroupPointView {
                    members: [("m".to_string(), 4u64)].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        })),
        Response::Admin(AdminReply::SyncState {
            barrier_seq: Some(1),
            applied_seq: 2,
            done: true,
            blocked: Some("b".into()),
            degraded: None,
        }),
        Response::Admin(AdminReply::Events(vec![EventView {
            from: Some("a".into()),
            ..Default::default()
        }])),
        Response::Admin(AdminReply::Tokens(vec![TokenView::default()])),
        Response::AgentPoll(AgentPollReply {
            protected: true,
            epoch: 3,
            generation: Generation(7),
            process_server: Some(("ps-1".into(), "10.0.0.1:7443".into())),
            sync_request: Some(5),
            resync: [("data".to_string(), 2u64)].into(),
            point_every_ms: Some(10_000),
            marks: vec![MarkRequest {
                id: 1,
                app: true,
                name: Some("n".into()),
                hold_ms: 3000,
            }],
            app_consistent_every_ms: Some(60_000),
            read_only: Some("failed over".into()),
            reverse: Some(ReverseOrder {
                order: 9,
                pass: 2,
                master_target: ("mt-1".into(), "10.0.0.2:7400".into()),
            }),
            rebase: Some(RebaseOrder {
                order: 9,
                applied_seq: 1041,
            }),
            release: vec![1],
        }),
        Response::NodePoll(NodePollReply {
            assignments: vec![assignment()],
            version: 12,
            retired: vec![Retirement {
                machine: "old".into(),
                epoch: Epoch(2),
                delete_replica: true,
            }],
        }),
        Response::StreamAccepted {
            cached_seq: 1040,
            applied_seq: 1000,
        },
        Response::ShipAccepted { applied_seq: 1000 },
        Response::Refused {
            reason: "no".into(),
        },
        Response::ProbeAck { instance: 3 },
        Response::ReverseDiff(ReverseDiffReply {
            runs: vec![(8192, ByteBuf::from(vec![7u8; 16]))],
        }),
        Response::ReverseMark(ReverseMarkReply {
            marks: vec![ReverseMark { boot: 7, mark: 3 }],
        }),
        Response::ReverseChanged(ReverseChangedReply {
            changed: Some(vec![4, 9]),
        }),
        Response::ReverseChanged(ReverseChangedReply { changed: None }),
    ]
}

pub fn sealed() -> Sealed {
    Sealed {
        raw_len: 4096,
        ciphertext: (0u8..40).collect(),
        nonce: (100u8..124).collect(),
    }
}
