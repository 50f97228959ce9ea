//! Golden bytes of every wire message (`roles/src/proto.rs`, and the transport's `Hello` and
//! `Sealed` that travel with them).
//!
//! For every message type and every enum variant, a representative value with every field
//! set is encoded with `haven_transport::codec::encode`, compared with pinned bytes, and
//! decoded back (the decoded value encodes to the same bytes and prints the same). A change
//! of the codec's configuration, a renamed or reordered variant or field, or a changed field
//! type shows up here as a byte difference.
//!
//! Messages are append-only (see the codec's module docs): a field is added at the end of a
//! struct with `#[serde(default)]`, a variant at the end of an enum. The `older_shapes_*`
//! tests pin messages as peers of earlier versions send them (without the fields marked
//! `#[serde(default)]`): they must keep decoding, with those fields defaulted.
//!
//! Adding a field changes the golden bytes of its type. Then: move the old hex string to the
//! older shapes (it must still decode), and pin the new one. Never edit a pinned string for any
//! other reason. `HAVEN_GOLDEN_PRINT=1 cargo test -p haven-roles --test golden -- --nocapture`
//! prints the current bytes of every value instead of failing on the first difference.
use std::collections::BTreeMap;
use std::fmt::Debug;

use haven_cluster::{DiskInfo, Epoch, Generation};
use haven_roles::proto::*;
use haven_roles::view::{ClusterStatus, EventView, MachineView, NodeView, TokenView};
use haven_transport::codec::{decode, encode};
use haven_transport::endpoint::{Hello, HelloReply};
use haven_transport::seal::Sealed;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_bytes::ByteBuf;

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(&s).unwrap_or_else(|e| panic!("bad hex literal {s:?}: {e}"))
}

fn printing() -> bool {
    std::env::var_os("HAVEN_GOLDEN_PRINT").is_some()
}

/// Encodes `value`, compares with `golden`, decodes the golden bytes and checks the result
/// encodes to the same bytes and prints the same as `value`.
#[track_caller]
fn check<T: Serialize + DeserializeOwned + Debug>(name: &str, value: &T, golden: &str) {
    let bytes = encode(value).unwrap();
    if printing() {
        println!("{name}:\n{}\n", wrap(&hex::encode(&bytes)));
        return;
    }
    assert_eq!(
        hex::encode(&bytes),
        hex::encode(unhex(golden)),
        "{name}: the encoding changed (see the module docs before re-pinning)"
    );
    let back: T = decode(&bytes).unwrap_or_else(|e| panic!("{name}: does not decode: {e}"));
    assert_eq!(
        encode(&back).unwrap(),
        bytes,
        "{name}: decode then encode is not the identity"
    );
    assert_eq!(
        format!("{back:?}"),
        format!("{value:?}"),
        "{name}: round trip"
    );
}

/// Decodes pinned bytes of an older shape into the current type.
#[track_caller]
fn old<T: DeserializeOwned>(name: &str, golden: &str) -> T {
    decode(&unhex(golden))
        .unwrap_or_else(|e| panic!("{name}: an older shape no longer decodes: {e}"))
}

fn wrap(hex: &str) -> String {
    hex.as_bytes()
        .chunks(96)
        .map(|c| format!("        {}", std::str::from_utf8(c).unwrap()))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// Representative values: every field set to a value that is not its default.

fn disk() -> DiskInfo {
    DiskInfo {
        name: "root".into(),
        size_bytes: 16 << 30,
        path: "/dev/vda".into(),
        id: "wwid:naa.6001 fp:0a1b2c".into(),
    }
}

fn disks() -> Vec<DiskInfo> {
    vec![disk(), DiskInfo::new("data", 1 << 30)]
}

fn stats() -> AgentStats {
    AgentStats {
        epoch: 3,
        captured_seq: 1041,
        cached_seq: 1040,
        applied_seq: 1000,
        oldest_unapplied_ms: 1_700_000_000_123,
        raw_bytes_sent: 1 << 33,
        raw_bytes_captured: (1 << 33) + 4096,
        throughput_bps: 125_000_000,
        initial_sync_percent: Some(42.5),
        retained_bytes: 4 << 20,
        connected: true,
        degraded_reason: Some("process server unreachable".into()),
        scans: 17,
        stream_restarts: 2,
        last_move: Some(MoveStats {
            generation: 7,
            pause_ms: 850,
            bytes_resent: 65536,
        }),
        blocked: vec![DiskBlock {
            disk: "data".into(),
            reason: "shrank".into(),
            since_ms: 1_700_000_000_000,
        }],
        capture: "tap".into(),
        not_consistent: Some("the initial sync is running".into()),
    }
}

fn agent_report() -> AgentReport {
    AgentReport {
        machine: "web-01".into(),
        hostname: "web-01.example".into(),
        disks: disks(),
        stats: stats(),
        sync_done: Some((5, 1041)),
        wait_ms: 25_000,
        report_seq: 1_700_000_000_123_456,
        known_generation: 7,
        held: true,
        instance: 0x1234_5678_9abc_def1,
        marks_done: vec![MarkDone {
            request: 0x0a00_0001,
            id: 1_700_000_000_123_999,
            seq: Some(1041),
            kind: Some(PointKind::Crash),
            name: Some("before-upgrade".into()),
            time_ms: 1_700_000_000_123,
            warnings: vec!["freeze failed (exit status: 1)".into()],
            error: Some("the protection was reset".into()),
            hold: Some(Hold::Released),
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
            tracked: false,
        }),
        rebased: Some(9),
    }
}

fn node_machine_report() -> NodeMachineReport {
    NodeMachineReport {
        machine: "web-01".into(),
        role: "process".into(),
        cached_seq: 1040,
        applied_seq: 1000,
        wire_bytes: 1 << 32,
        raw_bytes: 1 << 33,
        cache_bytes: 1 << 28,
        batches_refused: 1,
        restarts: 4,
        epoch: 3,
        ship_error: Some("master target reset the stream".into()),
        refusal: Some("stale generation".into()),
        points: Some(PointsReport {
            count: 42,
            oldest_ms: Some(1_700_000_000_000),
            latest_ms: Some(1_700_000_360_000),
            latest: Some("1207".into()),
            retention_ms: 86_400_000,
            journal_bytes: 1 << 20,
            journal_cap_bytes: 1 << 30,
            cap_reached: false,
            test_failover: None,
        }),
        failover: None,
    }
}

fn node_report() -> NodeReport {
    NodeReport {
        name: "ps-1".into(),
        machines: vec![node_machine_report()],
        version: 12,
        wait_ms: 25_000,
        held: true,
        retired_done: vec!["old-01".into()],
        site: Some("dr".into()),
    }
}

fn assignment() -> Assignment {
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
            app_consistent_every_ms: Some(900_000),
        },
        failover: None,
        failbacks: 2,
    }
}

fn stream_open() -> StreamOpen {
    StreamOpen {
        machine: "web-01".into(),
        epoch: 3,
        generation: Generation(7),
        disks: disks(),
        instance: 0x1234_5678_9abc_def1,
    }
}

fn ship_open() -> ShipOpen {
    ShipOpen {
        machine: "web-01".into(),
        epoch: 3,
        generation: Generation(7),
        disks: disks(),
    }
}

fn sealed() -> Sealed {
    Sealed {
        raw_len: 4_194_304,
        ciphertext: (0u8..40).collect(),
        nonce: (100u8..124).collect(),
    }
}

fn batch_body() -> BatchBody {
    BatchBody {
        records: vec![
            WriteRecord {
                seq: 1001,
                disk: 1,
                offset: 1 << 20,
                data: ByteBuf::from(b"0123456789abcdef".to_vec()),
            },
            // A marker: a seq that writes nothing.
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

fn node_view() -> NodeView {
    NodeView {
        name: "ps-1".into(),
        roles: vec!["process".into(), "master-target".into()],
        addr: "10.0.0.1:7443".into(),
        alive: true,
        last_seen_ms_ago: Some(350),
        machines: 2,
        capacity: 10,
        drained: true,
        bytes_in_per_sec: 1 << 20,
        bytes_out_per_sec: 1 << 19,
        cache_bytes: 1 << 28,
        site: "dr".into(),
    }
}

fn machine_view() -> MachineView {
    MachineView {
        name: "web-01".into(),
        hostname: "web-01.example".into(),
        state: "degraded".into(),
        initial_sync_percent: Some(42.5),
        degraded_reason: Some("disk data shrank".into()),
        process_server: Some("ps-1".into()),
        master_target: Some("mt-1".into()),
        generation: 7,
        epoch: 3,
        captured_seq: 1041,
        cached_seq: 1040,
        applied_seq: 1000,
        rpo_seconds: Some(1.25),
        raw_bytes_sent: 1 << 33,
        wire_bytes_sent: 1 << 32,
        throughput_bytes_per_sec: 125_000_000,
        retained_bytes: 4 << 20,
        disks: disks(),
        agent_last_seen_ms_ago: Some(900),
        stream_restarts: 2,
        batches_refused: 1,
        cache_bytes: 1 << 28,
        blocked_reason: Some("disk data shrank".into()),
        blocked_disks: vec![DiskBlock {
            disk: "data".into(),
            reason: "shrank".into(),
            since_ms: 1_700_000_000_000,
        }],
        capture: Some("tap".into()),
        points_not_consistent: None,
        latest_point: Some("1207".into()),
        latest_point_age_seconds: Some(2.5),
        recovery_points: 42,
        history_held_seconds: Some(360.0),
        history_asked_seconds: Some(86400.0),
        journal_cap_reached: false,
        test_failover: None,
        site: "dr".into(),
        recovery_state: "protected".into(),
        failover: None,
        group: Some("shop".into()),
    }
}

fn event_view() -> EventView {
    EventView {
        age_ms: 60_000,
        kind: "move".into(),
        machine: "web-01".into(),
        from: Some("ps-1".into()),
        to: Some("ps-2".into()),
        generation: 8,
        reason: "operator".into(),
        pause_ms: Some(850),
        bytes_resent: Some(65536),
    }
}

fn token_view() -> TokenView {
    TokenView {
        id: "0123456789ab".into(),
        kind: "agent".into(),
        created_ms: 1_700_000_000_000,
        expires_ms: Some(1_700_086_400_000),
        expired: true,
        revoked: true,
        uses: 3,
        description: "rack 4".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Every variant of every message.

#[test]
fn request() {
    check(
        "Request::Join(Node)",
        &Request::Join(JoinRequest {
            secret: "5ec2e7".into(),
            kind: JoinKind::Node {
                name: "ps-1".into(),
                roles: vec!["process".into(), "master-target".into()],
                addr: "10.0.0.1:7443".into(),
                capacity: 10,
                site: "dr".into(),
            },
        }),
        "81a44a6f696e82a6736563726574a6356563326537a46b696e6481a44e6f646585a46e616d65a470\
        732d31a5726f6c657392a770726f63657373ad6d61737465722d746172676574a461646472ad3130\
        2e302e302e313a37343433a863617061636974790aa473697465a26472",
    );
    check(
        "Request::Join(Agent)",
        &Request::Join(JoinRequest {
            secret: "5ec2e7".into(),
            kind: JoinKind::Agent {
                machine: "web-01".into(),
                hostname: "web-01.example".into(),
                disks: disks(),
            },
        }),
        "81a44a6f696e82a6736563726574a6356563326537a46b696e6481a54167656e7483a76d61636869\
        6e65a67765622d3031a8686f73746e616d65ae7765622d30312e6578616d706c65a56469736b7392\
        84a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470617468a82f6465\
        762f766461a26964b7777769643a6e61612e363030312066703a30613162326384a46e616d65a464\
        617461aa73697a655f6279746573ce40000000a470617468a0a26964a0",
    );
    check(
        "Request::Admin",
        &Request::Admin {
            secret: "ad317".into(),
            command: AdminCommand::Status,
        },
        "81a541646d696e82a6736563726574a56164333137a7636f6d6d616e64a6537461747573",
    );
    check(
        "Request::AgentPoll",
        &Request::AgentPoll(Box::new(agent_report())),
        "81a94167656e74506f6c6c8ea76d616368696e65a67765622d3031a8686f73746e616d65ae776562\
        2d30312e6578616d706c65a56469736b739284a46e616d65a4726f6f74aa73697a655f6279746573\
        cf0000000400000000a470617468a82f6465762f766461a26964b7777769643a6e61612e36303031\
        2066703a30613162326384a46e616d65a464617461aa73697a655f6279746573ce40000000a47061\
        7468a0a26964a0a57374617473de0012a565706f636803ac63617074757265645f736571cd0411aa\
        6361636865645f736571cd0410ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170\
        706c6965645f6d73cf0000018bcfe5687bae7261775f62797465735f73656e74cf00000002000000\
        00b27261775f62797465735f6361707475726564cf0000000200001000ae7468726f756768707574\
        5f627073ce07735940b4696e697469616c5f73796e635f70657263656e74cb4045400000000000ae\
        72657461696e65645f6279746573ce00400000a9636f6e6e6563746564c3af64656772616465645f\
        726561736f6eba70726f636573732073657276657220756e726561636861626c65a57363616e7311\
        af73747265616d5f726573746172747302a96c6173745f6d6f766583aa67656e65726174696f6e07\
        a870617573655f6d73cd0352ac62797465735f726573656e74ce00010000a7626c6f636b65649183\
        a46469736ba464617461a6726561736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe5\
        6800a763617074757265a3746170ae6e6f745f636f6e73697374656e74bb74686520696e69746961\
        6c2073796e632069732072756e6e696e67a973796e635f646f6e659205cd0411a7776169745f6d73\
        cd61a8aa7265706f72745f736571cf00060a2418202240b06b6e6f776e5f67656e65726174696f6e\
        07a468656c64c3a8696e7374616e6365cf123456789abcdef1aa6d61726b735f646f6e659189a772\
        657175657374ce0a000001a26964cf00060a241820245fa3736571cd0411a46b696e64a543726173\
        68a46e616d65ae6265666f72652d75706772616465a774696d655f6d73cf0000018bcfe5687ba877\
        61726e696e677391be667265657a65206661696c6564202865786974207374617475733a203129a5\
        6572726f72b87468652070726f74656374696f6e20776173207265736574a4686f6c64a852656c65\
        61736564a473697465a26472ac726576657273655f646f6e6587a56f7264657209a47061737302ae\
        62797465735f636f6d7061726564ce40000000aa686173685f6279746573ce00200000ae62797465\
        735f7265636569766564cd1000ae626c6f636b735f7772697474656e01a56572726f72c0a7726562\
        6173656409",
    );
    check(
        "Request::NodePoll",
        &Request::NodePoll(node_report()),
        "81a84e6f6465506f6c6c87a46e616d65a470732d31a86d616368696e6573918ea76d616368696e65\
        a67765622d3031a4726f6c65a770726f63657373aa6361636865645f736571cd0410ab6170706c69\
        65645f736571cd03e8aa776972655f6279746573cf0000000100000000a97261775f6279746573cf\
        0000000200000000ab63616368655f6279746573ce10000000af626174636865735f726566757365\
        6401a8726573746172747304a565706f636803aa736869705f6572726f72be6d6173746572207461\
        72676574207265736574207468652073747265616da77265667573616cb07374616c652067656e65\
        726174696f6ea6706f696e747389a5636f756e742aa96f6c646573745f6d73cf0000018bcfe56800\
        a96c61746573745f6d73cf0000018bcfeae640a66c6174657374a431323037ac726574656e74696f\
        6e5f6d73ce05265c00ad6a6f75726e616c5f6279746573ce00100000b16a6f75726e616c5f636170\
        5f6279746573ce40000000ab6361705f72656163686564c2ad746573745f6661696c6f766572c0a8\
        6661696c6f766572c0a776657273696f6e0ca7776169745f6d73cd61a8a468656c64c3ac72657469\
        7265645f646f6e6591a66f6c642d3031a473697465a26472",
    );
    check(
        "Request::OpenStream",
        &Request::OpenStream(stream_open()),
        "81aa4f70656e53747265616d85a76d616368696e65a67765622d3031a565706f636803aa67656e65\
        726174696f6e07a56469736b739284a46e616d65a4726f6f74aa73697a655f6279746573cf000000\
        0400000000a470617468a82f6465762f766461a26964b7777769643a6e61612e363030312066703a\
        30613162326384a46e616d65a464617461aa73697a655f6279746573ce40000000a470617468a0a2\
        6964a0a8696e7374616e6365cf123456789abcdef1",
    );
    check(
        "Request::OpenShip",
        &Request::OpenShip(ship_open()),
        "81a84f70656e5368697084a76d616368696e65a67765622d3031a565706f636803aa67656e657261\
        74696f6e07a56469736b739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400\
        000000a470617468a82f6465762f766461a26964b7777769643a6e61612e363030312066703a3061\
        3162326384a46e616d65a464617461aa73697a655f6279746573ce40000000a470617468a0a26964\
        a0",
    );
    check("Request::Probe", &Request::Probe, "a550726f6265");
    check(
        "Request::ReverseDiff",
        &Request::ReverseDiff(ReverseDiffRequest {
            machine: "web-01".into(),
            order: 0x0102_0304_0506_0708,
            disk: 1,
            offset: 8192,
            size: 1 << 30,
            hashes: vec![0xdead_beef, 7],
            sparse: vec![],
        }),
        "81ab526576657273654469666686a76d616368696e65a67765622d3031a56f72646572cf01020304\
        05060708a46469736b01a66f6666736574cd2000a473697a65ce40000000a668617368657392cede\
        adbeef07",
    );
}

#[test]
fn reverse_tracked() {
    check(
        "Request::ReverseDiff (sparse)",
        &Request::ReverseDiff(ReverseDiffRequest {
            machine: "web-01".into(),
            order: 9,
            disk: 0,
            offset: 0,
            size: 1 << 30,
            hashes: vec![0xdead_beef, 7],
            sparse: vec![3, 0x1_0000],
        }),
        "81ab526576657273654469666687a76d616368696e65a67765622d3031a56f7264657209a46469736b00a66f666673657400a473697a65ce40000000a668617368657392cedeadbeef07a67370617273659203ce00010000",
    );
    check(
        "Request::ReverseMark",
        &Request::ReverseMark(ReverseMarkRequest {
            machine: "web-01".into(),
            order: 9,
        }),
        "81ab526576657273654d61726b82a76d616368696e65a67765622d3031a56f7264657209",
    );
    let mark = ReverseMark {
        boot: 0x1234_5678_9abc_def1,
        mark: 7,
    };
    check(
        "Request::ReverseChanged",
        &Request::ReverseChanged(ReverseChangedRequest {
            machine: "web-01".into(),
            order: 9,
            disk: 1,
            since: mark,
            first_block: 65536,
            blocks: 65536,
        }),
        "81ae526576657273654368616e67656486a76d616368696e65a67765622d3031a56f7264657209a46469736b01a573696e636582a4626f6f74cf123456789abcdef1a46d61726b07ab66697273745f626c6f636bce00010000a6626c6f636b73ce00010000",
    );
    check(
        "Response::ReverseMark",
        &Response::ReverseMark(ReverseMarkReply { marks: vec![mark] }),
        "81ab526576657273654d61726b81a56d61726b739182a4626f6f74cf123456789abcdef1a46d61726b07",
    );
    check(
        "Response::ReverseChanged",
        &Response::ReverseChanged(ReverseChangedReply {
            changed: Some(vec![65536, 65600]),
        }),
        "81ae526576657273654368616e67656481a76368616e67656492ce00010000ce00010040",
    );
    check(
        "Response::ReverseChanged (untracked)",
        &Response::ReverseChanged(ReverseChangedReply { changed: None }),
        "81ae526576657273654368616e67656481a76368616e676564c0",
    );
}

#[test]
fn response() {
    check(
        "Response::Joined",
        &Response::Joined(JoinReply {
            cluster_id: "c-7f3e".into(),
            chain: vec![
                ByteBuf::from(vec![0x30, 0x82, 0x01, 0x0a]),
                ByteBuf::from(vec![0x30, 0x82, 0x01, 0x0b]),
            ],
            key_pkcs8: ByteBuf::from(vec![0x30, 0x81, 0x87]),
            ca: ByteBuf::from(vec![0x30, 0x82, 0x01, 0x0b]),
        }),
        "81a64a6f696e656484aa636c75737465725f6964a6632d37663365a5636861696e92c4043082010a\
        c4043082010ba96b65795f706b637338c403308187a26361c4043082010b",
    );
    check(
        "Response::Admin",
        &Response::Admin(AdminReply::Done {
            message: "protected web-01".into(),
        }),
        "81a541646d696e81a4446f6e6581a76d657373616765b070726f746563746564207765622d3031",
    );
    check(
        "Response::AgentPoll",
        &Response::AgentPoll(AgentPollReply {
            protected: true,
            epoch: 3,
            generation: Generation(7),
            process_server: Some(("ps-1".into(), "10.0.0.1:7443".into())),
            sync_request: Some(5),
            resync: BTreeMap::from([("data".to_string(), 2u64)]),
            point_every_ms: Some(10_000),
            marks: vec![MarkRequest {
                id: 0x0a00_0001,
                app: true,
                name: Some("before-upgrade".into()),
                hold_ms: 3000,
            }],
            app_consistent_every_ms: Some(900_000),
            read_only: None,
            reverse: Some(ReverseOrder {
                order: 9,
                pass: 1,
                master_target: ("mt-1".into(), "10.0.0.2:7400".into()),
            }),
            rebase: Some(RebaseOrder {
                order: 9,
                applied_seq: 1041,
            }),
            release: vec![0x0a00_0001],
        }),
        "81a94167656e74506f6c6c8da970726f746563746564c3a565706f636803aa67656e65726174696f\
        6e07ae70726f636573735f73657276657292a470732d31ad31302e302e302e313a37343433ac7379\
        6e635f7265717565737405a6726573796e6381a46461746102ae706f696e745f65766572795f6d73\
        cd2710a56d61726b739184a26964ce0a000001a3617070c3a46e616d65ae6265666f72652d757067\
        72616465a7686f6c645f6d73cd0bb8b76170705f636f6e73697374656e745f65766572795f6d73ce\
        000dbba0a9726561645f6f6e6c79c0a77265766572736583a56f7264657209a47061737301ad6d61\
        737465725f74617267657492a46d742d31ad31302e302e302e323a37343030a672656261736582a5\
        6f7264657209ab6170706c6965645f736571cd0411a772656c6561736591ce0a000001",
    );
    check(
        "Response::NodePoll",
        &Response::NodePoll(NodePollReply {
            assignments: vec![assignment()],
            version: 12,
            retired: vec![Retirement {
                machine: "old-01".into(),
                epoch: Epoch(2),
                delete_replica: true,
            }],
        }),
        "81a84e6f6465506f6c6c83ab61737369676e6d656e7473918ca76d616368696e65a67765622d3031\
        a565706f636803aa67656e65726174696f6e07a56469736b739284a46e616d65a4726f6f74aa7369\
        7a655f6279746573cf0000000400000000a470617468a82f6465762f766461a26964b7777769643a\
        6e61612e363030312066703a30613162326384a46e616d65a464617461aa73697a655f6279746573\
        ce40000000a470617468a0a26964a0ae70726f636573735f736572766572a470732d31ad6d617374\
        65725f746172676574a46d742d31b26d61737465725f7461726765745f61646472ad31302e302e30\
        2e323a37343433a8646174615f6b6579c42011111111111111111111111111111111111111111111\
        11111111111111111111a9656e726f6c6d656e74a6652d34663261a6706f6c69637984ac72657465\
        6e74696f6e5f6d73ce05265c00b16a6f75726e616c5f6361705f6279746573ce40000000ae706f69\
        6e745f65766572795f6d73c0b76170705f636f6e73697374656e745f65766572795f6d73ce000dbb\
        a0a86661696c6f766572c0a96661696c6261636b7302a776657273696f6e0ca77265746972656491\
        83a76d616368696e65a66f6c642d3031a565706f636802ae64656c6574655f7265706c696361c3",
    );
    check(
        "Response::StreamAccepted",
        &Response::StreamAccepted {
            cached_seq: 1040,
            applied_seq: 1000,
        },
        "81ae53747265616d416363657074656482aa6361636865645f736571cd0410ab6170706c6965645f\
        736571cd03e8",
    );
    check(
        "Response::ShipAccepted",
        &Response::ShipAccepted { applied_seq: 1000 },
        "81ac53686970416363657074656481ab6170706c6965645f736571cd03e8",
    );
    check(
        "Response::Refused",
        &Response::Refused {
            reason: "stale generation".into(),
        },
        "81a75265667573656481a6726561736f6eb07374616c652067656e65726174696f6e",
    );
    check(
        "Response::ProbeAck",
        &Response::ProbeAck {
            instance: 0x1234_5678_9abc_def1,
        },
        "81a850726f626541636b81a8696e7374616e6365cf123456789abcdef1",
    );
    check(
        "Response::ReverseDiff",
        &Response::ReverseDiff(ReverseDiffReply {
            runs: vec![(4096, ByteBuf::from(vec![0xab; 8]))],
        }),
        "81ab526576657273654469666681a472756e739192cd1000c408abababababababab",
    );
}

#[test]
fn admin_command() {
    let m = || "web-01".to_string();
    let cases = [
        (
            "AdminCommand::Status",
            AdminCommand::Status,
            "a6537461747573",
        ),
        ("AdminCommand::Nodes", AdminCommand::Nodes, "a54e6f646573"),
        (
            "AdminCommand::Machines",
            AdminCommand::Machines,
            "a84d616368696e6573",
        ),
        (
            "AdminCommand::Protect",
            AdminCommand::Protect {
                machine: m(),
                policy: haven_cluster::ProtectPolicy {
                    retention_ms: Some(3_600_000),
                    journal_cap_bytes: None,
                    point_every_ms: Some(5_000),
                    app_consistent_every_ms: Some(60_000),
                },
            },
            "81a750726f7465637482a76d616368696e65a67765622d3031a6706f6c69637984ac726574656e74\
            696f6e5f6d73ce0036ee80b16a6f75726e616c5f6361705f6279746573c0ae706f696e745f657665\
            72795f6d73cd1388b76170705f636f6e73697374656e745f65766572795f6d73cdea60",
        ),
        (
            "AdminCommand::Unprotect",
            AdminCommand::Unprotect { machine: m() },
            "81a9556e70726f7465637481a76d616368696e65a67765622d3031",
        ),
        (
            "AdminCommand::RequestSync",
            AdminCommand::RequestSync { machine: m() },
            "81ab5265717565737453796e6381a76d616368696e65a67765622d3031",
        ),
        (
            "AdminCommand::SyncState",
            AdminCommand::SyncState {
                machine: m(),
                id: 5,
            },
            "81a953796e63537461746582a76d616368696e65a67765622d3031a2696405",
        ),
        (
            "AdminCommand::Move",
            AdminCommand::Move {
                machine: m(),
                to: "ps-2".into(),
            },
            "81a44d6f766582a76d616368696e65a67765622d3031a2746fa470732d32",
        ),
        (
            "AdminCommand::Rebalance",
            AdminCommand::Rebalance,
            "a9526562616c616e6365",
        ),
        (
            "AdminCommand::Drain",
            AdminCommand::Drain {
                node: "ps-1".into(),
            },
            "81a5447261696e81a46e6f6465a470732d31",
        ),
        (
            "AdminCommand::Undrain",
            AdminCommand::Undrain {
                node: "ps-1".into(),
            },
            "81a7556e647261696e81a46e6f6465a470732d31",
        ),
        (
            "AdminCommand::Events",
            AdminCommand::Events,
            "a64576656e7473",
        ),
        (
            "AdminCommand::TokenCreate",
            AdminCommand::TokenCreate {
                kind: "agent".into(),
                ttl_ms: Some(86_400_000),
                description: "rack 4".into(),
            },
            "81ab546f6b656e43726561746583a46b696e64a56167656e74a674746c5f6d73ce05265c00ab6465\
            736372697074696f6ea67261636b2034",
        ),
        (
            "AdminCommand::TokenList",
            AdminCommand::TokenList,
            "a9546f6b656e4c697374",
        ),
        (
            "AdminCommand::TokenRevoke",
            AdminCommand::TokenRevoke {
                id: "0123456789ab".into(),
            },
            "81ab546f6b656e5265766f6b6581a26964ac303132333435363738396162",
        ),
        (
            "AdminCommand::Forget",
            AdminCommand::Forget {
                machine: m(),
                delete_replica: true,
            },
            "81a6466f7267657482a76d616368696e65a67765622d3031ae64656c6574655f7265706c696361c3",
        ),
        (
            "AdminCommand::Resync",
            AdminCommand::Resync {
                machine: m(),
                disk: "data".into(),
            },
            "81a6526573796e6382a76d616368696e65a67765622d3031a46469736ba464617461",
        ),
        (
            "AdminCommand::Mark",
            AdminCommand::Mark {
                machine: m(),
                app: true,
                name: Some("before-upgrade".into()),
            },
            "81a44d61726b83a76d616368696e65a67765622d3031a3617070c3a46e616d65ae6265666f72652d\
            75706772616465",
        ),
        (
            "AdminCommand::MarkState",
            AdminCommand::MarkState {
                machine: m(),
                id: 0x0a00_0001,
            },
            "81a94d61726b537461746582a76d616368696e65a67765622d3031a26964ce0a000001",
        ),
        (
            "AdminCommand::Failover",
            AdminCommand::Failover {
                machine: m(),
                point: PointSpec::AtOrBefore {
                    time_ms: 1_700_000_000_000,
                },
            },
            "81a84661696c6f76657282a76d616368696e65a67765622d3031a5706f696e7481aa41744f724265\
            666f726581a774696d655f6d73cf0000018bcfe56800",
        ),
        (
            "AdminCommand::FailoverState",
            AdminCommand::FailoverState { machine: m() },
            "81ad4661696c6f766572537461746581a76d616368696e65a67765622d3031",
        ),
        (
            "AdminCommand::FailoverChangePoint",
            AdminCommand::FailoverChangePoint {
                machine: m(),
                point: PointSpec::Seq(1207),
            },
            "81b34661696c6f7665724368616e6765506f696e7482a76d616368696e65a67765622d3031a5706f\
            696e7481a3536571cd04b7",
        ),
        (
            "AdminCommand::FailoverCommit",
            AdminCommand::FailoverCommit { machine: m() },
            "81ae4661696c6f766572436f6d6d697481a76d616368696e65a67765622d3031",
        ),
        (
            "AdminCommand::FailoverCancel",
            AdminCommand::FailoverCancel { machine: m() },
            "81ae4661696c6f76657243616e63656c81a76d616368696e65a67765622d3031",
        ),
        (
            "AdminCommand::Reprotect",
            AdminCommand::Reprotect { machine: m() },
            "81a9526570726f7465637481a76d616368696e65a67765622d3031",
        ),
        (
            "AdminCommand::Failback",
            AdminCommand::Failback { machine: m() },
            "81a84661696c6261636b81a76d616368696e65a67765622d3031",
        ),
    ];
    for (name, value, golden) in cases {
        check(name, &value, golden);
    }
}

#[test]
fn admin_reply() {
    let cases = [
        (
            "AdminReply::Status",
            AdminReply::Status(ClusterStatus {
                cluster_id: "c-7f3e".into(),
                nodes: vec![node_view()],
                machines: vec![machine_view()],
                groups: vec![],
            }),
            "81a653746174757384aa636c75737465725f6964a6632d37663365a56e6f646573918ca46e616d65\
            a470732d31a473697465a26472a5726f6c657392a770726f63657373ad6d61737465722d74617267\
            6574a461646472ad31302e302e302e313a37343433a5616c697665c3b06c6173745f7365656e5f6d\
            735f61676fcd015ea86d616368696e657302a863617061636974790aa7647261696e6564c3b06279\
            7465735f696e5f7065725f736563ce00100000b162797465735f6f75745f7065725f736563ce0008\
            0000ab63616368655f6279746573ce10000000a86d616368696e657391de0025a46e616d65a67765\
            622d3031a8686f73746e616d65ae7765622d30312e6578616d706c65a473697465a26472a5737461\
            7465a86465677261646564b4696e697469616c5f73796e635f70657263656e74cb40454000000000\
            00af64656772616465645f726561736f6eb06469736b206461746120736872616e6bae70726f6365\
            73735f736572766572a470732d31ad6d61737465725f746172676574a46d742d31aa67656e657261\
            74696f6e07a565706f636803ac63617074757265645f736571cd0411aa6361636865645f736571cd\
            0410ab6170706c6965645f736571cd03e8ab72706f5f7365636f6e6473cb3ff4000000000000ae72\
            61775f62797465735f73656e74cf0000000200000000af776972655f62797465735f73656e74cf00\
            00000100000000b87468726f7567687075745f62797465735f7065725f736563ce07735940ae7265\
            7461696e65645f6279746573ce00400000a56469736b739284a46e616d65a4726f6f74aa73697a65\
            5f6279746573cf0000000400000000a470617468a82f6465762f766461a26964b7777769643a6e61\
            612e363030312066703a30613162326384a46e616d65a464617461aa73697a655f6279746573ce40\
            000000a470617468a0a26964a0b66167656e745f6c6173745f7365656e5f6d735f61676fcd0384af\
            73747265616d5f726573746172747302af626174636865735f7265667573656401ab63616368655f\
            6279746573ce10000000ae626c6f636b65645f726561736f6eb06469736b20646174612073687261\
            6e6bad626c6f636b65645f6469736b739183a46469736ba464617461a6726561736f6ea673687261\
            6e6ba873696e63655f6d73cf0000018bcfe56800a763617074757265a3746170b5706f696e74735f\
            6e6f745f636f6e73697374656e74c0ac6c61746573745f706f696e74a431323037b86c6174657374\
            5f706f696e745f6167655f7365636f6e6473cb4004000000000000af7265636f766572795f706f69\
            6e74732ab4686973746f72795f68656c645f7365636f6e6473cb4076800000000000b5686973746f\
            72795f61736b65645f7365636f6e6473cb40f5180000000000b36a6f75726e616c5f6361705f7265\
            6163686564c2ad746573745f6661696c6f766572c0ae7265636f766572795f7374617465a970726f\
            746563746564a86661696c6f766572c0a567726f7570a473686f70a667726f75707390",
        ),
        (
            "AdminReply::Nodes",
            AdminReply::Nodes(vec![node_view()]),
            "81a54e6f646573918ca46e616d65a470732d31a473697465a26472a5726f6c657392a770726f6365\
            7373ad6d61737465722d746172676574a461646472ad31302e302e302e313a37343433a5616c6976\
            65c3b06c6173745f7365656e5f6d735f61676fcd015ea86d616368696e657302a863617061636974\
            790aa7647261696e6564c3b062797465735f696e5f7065725f736563ce00100000b162797465735f\
            6f75745f7065725f736563ce00080000ab63616368655f6279746573ce10000000",
        ),
        (
            "AdminReply::Machines",
            AdminReply::Machines(vec![machine_view()]),
            "81a84d616368696e657391de0025a46e616d65a67765622d3031a8686f73746e616d65ae7765622d\
            30312e6578616d706c65a473697465a26472a57374617465a86465677261646564b4696e69746961\
            6c5f73796e635f70657263656e74cb4045400000000000af64656772616465645f726561736f6eb0\
            6469736b206461746120736872616e6bae70726f636573735f736572766572a470732d31ad6d6173\
            7465725f746172676574a46d742d31aa67656e65726174696f6e07a565706f636803ac6361707475\
            7265645f736571cd0411aa6361636865645f736571cd0410ab6170706c6965645f736571cd03e8ab\
            72706f5f7365636f6e6473cb3ff4000000000000ae7261775f62797465735f73656e74cf00000002\
            00000000af776972655f62797465735f73656e74cf0000000100000000b87468726f756768707574\
            5f62797465735f7065725f736563ce07735940ae72657461696e65645f6279746573ce00400000a5\
            6469736b739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a47061\
            7468a82f6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384a4\
            6e616d65a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0b66167656e\
            745f6c6173745f7365656e5f6d735f61676fcd0384af73747265616d5f726573746172747302af62\
            6174636865735f7265667573656401ab63616368655f6279746573ce10000000ae626c6f636b6564\
            5f726561736f6eb06469736b206461746120736872616e6bad626c6f636b65645f6469736b739183\
            a46469736ba464617461a6726561736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe5\
            6800a763617074757265a3746170b5706f696e74735f6e6f745f636f6e73697374656e74c0ac6c61\
            746573745f706f696e74a431323037b86c61746573745f706f696e745f6167655f7365636f6e6473\
            cb4004000000000000af7265636f766572795f706f696e74732ab4686973746f72795f68656c645f\
            7365636f6e6473cb4076800000000000b5686973746f72795f61736b65645f7365636f6e6473cb40\
            f5180000000000b36a6f75726e616c5f6361705f72656163686564c2ad746573745f6661696c6f76\
            6572c0ae7265636f766572795f7374617465a970726f746563746564a86661696c6f766572c0a567\
            726f7570a473686f70",
        ),
        (
            "AdminReply::Done",
            AdminReply::Done {
                message: "done".into(),
            },
            "81a4446f6e6581a76d657373616765a4646f6e65",
        ),
        (
            "AdminReply::SyncRequested",
            AdminReply::SyncRequested { id: 5 },
            "81ad53796e6352657175657374656481a2696405",
        ),
        (
            "AdminReply::SyncState",
            AdminReply::SyncState {
                barrier_seq: Some(1041),
                applied_seq: 1000,
                done: true,
                blocked: Some("disk data shrank".into()),
                degraded: Some("process server unreachable".into()),
            },
            "81a953796e63537461746585ab626172726965725f736571cd0411ab6170706c6965645f736571cd\
            03e8a4646f6e65c3a7626c6f636b6564b06469736b206461746120736872616e6ba8646567726164\
            6564ba70726f636573732073657276657220756e726561636861626c65",
        ),
        (
            "AdminReply::Moved",
            AdminReply::Moved {
                machine: "web-01".into(),
                from: "ps-1".into(),
                to: "ps-2".into(),
                generation: 8,
            },
            "81a54d6f76656484a76d616368696e65a67765622d3031a466726f6da470732d31a2746fa470732d\
            32aa67656e65726174696f6e08",
        ),
        (
            "AdminReply::Rebalanced",
            AdminReply::Rebalanced {
                moves: vec![event_view()],
            },
            "81aa526562616c616e63656481a56d6f7665739189a66167655f6d73cdea60a46b696e64a46d6f76\
            65a76d616368696e65a67765622d3031a466726f6da470732d31a2746fa470732d32aa67656e6572\
            6174696f6e08a6726561736f6ea86f70657261746f72a870617573655f6d73cd0352ac6279746573\
            5f726573656e74ce00010000",
        ),
        (
            "AdminReply::Events",
            AdminReply::Events(vec![event_view()]),
            "81a64576656e74739189a66167655f6d73cdea60a46b696e64a46d6f7665a76d616368696e65a677\
            65622d3031a466726f6da470732d31a2746fa470732d32aa67656e65726174696f6e08a672656173\
            6f6ea86f70657261746f72a870617573655f6d73cd0352ac62797465735f726573656e74ce000100\
            00",
        ),
        (
            "AdminReply::TokenCreated",
            AdminReply::TokenCreated {
                id: "0123456789ab".into(),
                kind: "agent".into(),
                secret: "5ec2e7".into(),
                expires_ms: Some(1_700_086_400_000),
            },
            "81ac546f6b656e4372656174656484a26964ac303132333435363738396162a46b696e64a5616765\
            6e74a6736563726574a6356563326537aa657870697265735f6d73cf0000018bd50bc400",
        ),
        (
            "AdminReply::Tokens",
            AdminReply::Tokens(vec![token_view()]),
            "81a6546f6b656e739188a26964ac303132333435363738396162a46b696e64a56167656e74aa6372\
            65617465645f6d73cf0000018bcfe56800aa657870697265735f6d73cf0000018bd50bc400a76578\
            7069726564c3a77265766f6b6564c3a47573657303ab6465736372697074696f6ea67261636b2034",
        ),
        (
            "AdminReply::MarkRequested",
            AdminReply::MarkRequested { id: 0x0a00_0001 },
            "81ad4d61726b52657175657374656481a26964ce0a000001",
        ),
        (
            "AdminReply::MarkState",
            AdminReply::MarkState {
                done: Some(haven_roles::view::MarkView {
                    machine: "web-01".into(),
                    point: "1041".into(),
                    seq: 1041,
                    kind: "app".into(),
                    name: Some("before-upgrade".into()),
                    time_ms: 1_700_000_000_123,
                    warnings: vec!["thaw failed (exit status: 2)".into()],
                }),
            },
            "81a94d61726b537461746581a4646f6e6587a76d616368696e65a67765622d3031a5706f696e74a4\
            31303431a3736571cd0411a46b696e64a3617070a46e616d65ae6265666f72652d75706772616465\
            a774696d655f6d73cf0000018bcfe5687ba87761726e696e677391bc74686177206661696c656420\
            2865786974207374617475733a203229",
        ),
    ];
    for (name, value, golden) in cases {
        check(name, &value, golden);
    }
}

/// The payload structs on their own (they are also inside the requests and responses above).
#[test]
fn payload_structs() {
    check(
        "AgentReport",
        &agent_report(),
        "8ea76d616368696e65a67765622d3031a8686f73746e616d65ae7765622d30312e6578616d706c65\
        a56469736b739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470\
        617468a82f6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384\
        a46e616d65a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0a5737461\
        7473de0012a565706f636803ac63617074757265645f736571cd0411aa6361636865645f736571cd\
        0410ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170706c6965645f6d73cf0000\
        018bcfe5687bae7261775f62797465735f73656e74cf0000000200000000b27261775f6279746573\
        5f6361707475726564cf0000000200001000ae7468726f7567687075745f627073ce07735940b469\
        6e697469616c5f73796e635f70657263656e74cb4045400000000000ae72657461696e65645f6279\
        746573ce00400000a9636f6e6e6563746564c3af64656772616465645f726561736f6eba70726f63\
        6573732073657276657220756e726561636861626c65a57363616e7311af73747265616d5f726573\
        746172747302a96c6173745f6d6f766583aa67656e65726174696f6e07a870617573655f6d73cd03\
        52ac62797465735f726573656e74ce00010000a7626c6f636b65649183a46469736ba464617461a6\
        726561736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe56800a763617074757265a3\
        746170ae6e6f745f636f6e73697374656e74bb74686520696e697469616c2073796e632069732072\
        756e6e696e67a973796e635f646f6e659205cd0411a7776169745f6d73cd61a8aa7265706f72745f\
        736571cf00060a2418202240b06b6e6f776e5f67656e65726174696f6e07a468656c64c3a8696e73\
        74616e6365cf123456789abcdef1aa6d61726b735f646f6e659189a772657175657374ce0a000001\
        a26964cf00060a241820245fa3736571cd0411a46b696e64a54372617368a46e616d65ae6265666f\
        72652d75706772616465a774696d655f6d73cf0000018bcfe5687ba87761726e696e677391be6672\
        65657a65206661696c6564202865786974207374617475733a203129a56572726f72b87468652070\
        726f74656374696f6e20776173207265736574a4686f6c64a852656c6561736564a473697465a264\
        72ac726576657273655f646f6e6587a56f7264657209a47061737302ae62797465735f636f6d7061\
        726564ce40000000aa686173685f6279746573ce00200000ae62797465735f7265636569766564cd\
        1000ae626c6f636b735f7772697474656e01a56572726f72c0a77265626173656409",
    );
    check(
        "AgentStats",
        &stats(),
        "de0012a565706f636803ac63617074757265645f736571cd0411aa6361636865645f736571cd0410\
        ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170706c6965645f6d73cf0000018b\
        cfe5687bae7261775f62797465735f73656e74cf0000000200000000b27261775f62797465735f63\
        61707475726564cf0000000200001000ae7468726f7567687075745f627073ce07735940b4696e69\
        7469616c5f73796e635f70657263656e74cb4045400000000000ae72657461696e65645f62797465\
        73ce00400000a9636f6e6e6563746564c3af64656772616465645f726561736f6eba70726f636573\
        732073657276657220756e726561636861626c65a57363616e7311af73747265616d5f7265737461\
        72747302a96c6173745f6d6f766583aa67656e65726174696f6e07a870617573655f6d73cd0352ac\
        62797465735f726573656e74ce00010000a7626c6f636b65649183a46469736ba464617461a67265\
        61736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe56800a763617074757265a37461\
        70ae6e6f745f636f6e73697374656e74bb74686520696e697469616c2073796e632069732072756e\
        6e696e67",
    );
    check(
        "NodeReport",
        &node_report(),
        "87a46e616d65a470732d31a86d616368696e6573918ea76d616368696e65a67765622d3031a4726f\
        6c65a770726f63657373aa6361636865645f736571cd0410ab6170706c6965645f736571cd03e8aa\
        776972655f6279746573cf0000000100000000a97261775f6279746573cf0000000200000000ab63\
        616368655f6279746573ce10000000af626174636865735f7265667573656401a872657374617274\
        7304a565706f636803aa736869705f6572726f72be6d617374657220746172676574207265736574\
        207468652073747265616da77265667573616cb07374616c652067656e65726174696f6ea6706f69\
        6e747389a5636f756e742aa96f6c646573745f6d73cf0000018bcfe56800a96c61746573745f6d73\
        cf0000018bcfeae640a66c6174657374a431323037ac726574656e74696f6e5f6d73ce05265c00ad\
        6a6f75726e616c5f6279746573ce00100000b16a6f75726e616c5f6361705f6279746573ce400000\
        00ab6361705f72656163686564c2ad746573745f6661696c6f766572c0a86661696c6f766572c0a7\
        76657273696f6e0ca7776169745f6d73cd61a8a468656c64c3ac726574697265645f646f6e6591a6\
        6f6c642d3031a473697465a26472",
    );
    check(
        "NodeMachineReport",
        &node_machine_report(),
        "8ea76d616368696e65a67765622d3031a4726f6c65a770726f63657373aa6361636865645f736571\
        cd0410ab6170706c6965645f736571cd03e8aa776972655f6279746573cf0000000100000000a972\
        61775f6279746573cf0000000200000000ab63616368655f6279746573ce10000000af6261746368\
        65735f7265667573656401a8726573746172747304a565706f636803aa736869705f6572726f72be\
        6d617374657220746172676574207265736574207468652073747265616da77265667573616cb073\
        74616c652067656e65726174696f6ea6706f696e747389a5636f756e742aa96f6c646573745f6d73\
        cf0000018bcfe56800a96c61746573745f6d73cf0000018bcfeae640a66c6174657374a431323037\
        ac726574656e74696f6e5f6d73ce05265c00ad6a6f75726e616c5f6279746573ce00100000b16a6f\
        75726e616c5f6361705f6279746573ce40000000ab6361705f72656163686564c2ad746573745f66\
        61696c6f766572c0a86661696c6f766572c0",
    );
    check(
        "Assignment",
        &assignment(),
        "8ca76d616368696e65a67765622d3031a565706f636803aa67656e65726174696f6e07a56469736b\
        739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470617468a82f\
        6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384a46e616d65\
        a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0ae70726f636573735f\
        736572766572a470732d31ad6d61737465725f746172676574a46d742d31b26d61737465725f7461\
        726765745f61646472ad31302e302e302e323a37343433a8646174615f6b6579c420111111111111\
        1111111111111111111111111111111111111111111111111111a9656e726f6c6d656e74a6652d34\
        663261a6706f6c69637984ac726574656e74696f6e5f6d73ce05265c00b16a6f75726e616c5f6361\
        705f6279746573ce40000000ae706f696e745f65766572795f6d73c0b76170705f636f6e73697374\
        656e745f65766572795f6d73ce000dbba0a86661696c6f766572c0a96661696c6261636b7302",
    );
    check(
        "StreamOpen",
        &stream_open(),
        "85a76d616368696e65a67765622d3031a565706f636803aa67656e65726174696f6e07a56469736b\
        739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470617468a82f\
        6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384a46e616d65\
        a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0a8696e7374616e6365\
        cf123456789abcdef1",
    );
    check(
        "ShipOpen",
        &ship_open(),
        "84a76d616368696e65a67765622d3031a565706f636803aa67656e65726174696f6e07a56469736b\
        739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470617468a82f\
        6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384a46e616d65\
        a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0",
    );
    check(
        "DiskInfo",
        &disk(),
        "84a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470617468a82f6465\
        762f766461a26964b7777769643a6e61612e363030312066703a306131623263",
    );
    check(
        "FailoverOrder",
        &failover_order(),
        "84a2696409a5706f696e74a64c6174657374a9636f6d6d6974746564c3a86661696c6261636b81ab\
 6d6174657269616c69736508",
    );
    check(
        "FailoverReport",
        &failover_report(),
        "88a2696409a5706f696e7485a5706f696e74a431323037a3736571cd04b7a774696d655f6d73cf00\
 00018bcfeae640a46b696e64a56372617368a46e616d65a86661696c6261636ba56469736b739184\
 a46469736ba4726f6f74a76e62645f757269d9206e62643a2f2f31302e302e302e323a3130383039\
 2f7765622d30312d726f6f74a5696d616765d9272f7661722f6c69622f686176656e2f6661696c6f\
 7665722f7765622d30312f726f6f742e696d67aa73697a655f6279746573cf0000000400000000a6\
 777269746573cc82a873657276655f6d730ca56572726f72bb6578706f727420726f6f743a206164\
 647265737320696e20757365a87175696573636564c3ac6d6174657269616c6973656484aa67656e\
 65726174696f6e08ab6170706c6965645f736571cd04baae62797465735f636f6d7061726564cf00\
 00000400000000ad62797465735f7772697474656ece00100000",
    );
    check(
        "FailoverView",
        &failover_view(),
        "8fa76d616368696e65a67765622d3031a57374617465ac6661696c696e672d6261636ba573746167\
 65ad6d6174657269616c6973696e67a7706c616e6e6564c3ab706f696e745f61736b6564a66c6174\
 657374a5706f696e7485a5706f696e74a431323037a3736571cd04b7a774696d655f6d73cf000001\
 8bcfeae640a46b696e64a56372617368a46e616d65a86661696c6261636ba56469736b739184a464\
 69736ba4726f6f74a76e62645f757269d9206e62643a2f2f31302e302e302e323a31303830392f77\
 65622d30312d726f6f74a5696d616765d9272f7661722f6c69622f686176656e2f6661696c6f7665\
 722f7765622d30312f726f6f742e696d67aa73697a655f6279746573cf0000000400000000a67772\
 69746573cc82ab77616974696e675f666f72b26d617374657220746172676574206d742d31a56572\
 726f72c0ad6d61737465725f746172676574a46d742d31aa656c61707365645f6d73cd0fa0a87365\
 7276655f6d730ca77265766572736589a47061737302a9646f6e655f7061737302ae62797465735f\
 636f6d7061726564cf0000000400000000aa686173685f6279746573ce02000000ae62797465735f\
 7265636569766564ce00100000ae626c6f636b735f7772697474656ecd0100aa737461727465645f\
 6d73cf0000018bcfe9fbe0a56572726f72c0a7747261636b6564c3a86661696c6261636b87a57374\
 616765ad4d6174657269616c6973696e67aa67656e65726174696f6e08aa737461727465645f6d73\
 cf0000018bcfeabf30aa66696e616c5f7061737302b06d6174657269616c697365645f736571c0ae\
 62797465735f636f6d706172656400ad62797465735f7772697474656e00",
    );
    // Before `reverse.tracked` (2026-12-04): decodes as an untracked pass.
    let before: haven_roles::view::FailoverView = old(
        "FailoverView without reverse.tracked",
        "8fa76d616368696e65a67765622d3031a57374617465ac6661696c696e672d6261636ba573746167\
 65ad6d6174657269616c6973696e67a7706c616e6e6564c3ab706f696e745f61736b6564a66c6174\
 657374a5706f696e7485a5706f696e74a431323037a3736571cd04b7a774696d655f6d73cf000001\
 8bcfeae640a46b696e64a56372617368a46e616d65a86661696c6261636ba56469736b739184a464\
 69736ba4726f6f74a76e62645f757269d9206e62643a2f2f31302e302e302e323a31303830392f77\
 65622d30312d726f6f74a5696d616765d9272f7661722f6c69622f686176656e2f6661696c6f7665\
 722f7765622d30312f726f6f742e696d67aa73697a655f6279746573cf0000000400000000a67772\
 69746573cc82ab77616974696e675f666f72b26d617374657220746172676574206d742d31a56572\
 726f72c0ad6d61737465725f746172676574a46d742d31aa656c61707365645f6d73cd0fa0a87365\
 7276655f6d730ca77265766572736588a47061737302a9646f6e655f7061737302ae62797465735f\
 636f6d7061726564cf0000000400000000aa686173685f6279746573ce02000000ae62797465735f\
 7265636569766564ce00100000ae626c6f636b735f7772697474656ecd0100aa737461727465645f\
 6d73cf0000018bcfe9fbe0a56572726f72c0a86661696c6261636b87a57374616765ad4d61746572\
 69616c6973696e67aa67656e65726174696f6e08aa737461727465645f6d73cf0000018bcfeabf30\
 aa66696e616c5f7061737302b06d6174657269616c697365645f736571c0ae62797465735f636f6d\
 706172656400ad62797465735f7772697474656e00",
    );
    assert!(!before.reverse.expect("reverse").tracked);
}

/// A failback's order to a master target: the point, committed, and the generation the
/// replica is materialised under.
fn failover_order() -> FailoverOrder {
    FailoverOrder {
        id: 9,
        point: PointSpec::Latest,
        committed: true,
        failback: Some(FailbackOrder {
            materialise: Some(8),
        }),
    }
}

fn point_view() -> haven_roles::view::PointView {
    haven_roles::view::PointView {
        point: "1207".into(),
        seq: 1207,
        time_ms: 1_700_000_360_000,
        kind: "crash".into(),
        name: Some("failback".into()),
    }
}

fn failover_disk() -> haven_roles::view::FailoverDiskView {
    haven_roles::view::FailoverDiskView {
        disk: "root".into(),
        nbd_uri: Some("nbd://10.0.0.2:10809/web-01-root".into()),
        image: Some("/var/lib/haven/failover/web-01/root.img".into()),
        size_bytes: 16 << 30,
    }
}

fn failover_report() -> FailoverReport {
    FailoverReport {
        id: 9,
        point: Some(point_view()),
        disks: vec![failover_disk()],
        writes: 130,
        serve_ms: 12,
        error: Some("export root: address in use".into()),
        quiesced: true,
        materialised: Some(Materialised {
            generation: 8,
            applied_seq: 1210,
            bytes_compared: 16 << 30,
            bytes_written: 1 << 20,
        }),
    }
}

fn failover_view() -> haven_roles::view::FailoverView {
    haven_roles::view::FailoverView {
        machine: "web-01".into(),
        state: "failing-back".into(),
        stage: "materialising".into(),
        planned: true,
        point_asked: "latest".into(),
        point: Some(point_view()),
        disks: vec![failover_disk()],
        writes: 130,
        waiting_for: Some("master target mt-1".into()),
        error: None,
        master_target: Some("mt-1".into()),
        elapsed_ms: 4_000,
        serve_ms: Some(12),
        reverse: Some(haven_cluster::ReversePass {
            pass: 2,
            done_pass: 2,
            bytes_compared: 16 << 30,
            hash_bytes: 32 << 20,
            bytes_received: 1 << 20,
            blocks_written: 256,
            started_ms: 1_700_000_300_000,
            error: None,
            tracked: true,
        }),
        failback: Some(haven_cluster::Failback {
            stage: haven_cluster::FailbackStage::Materialising,
            generation: 8,
            started_ms: 1_700_000_350_000,
            final_pass: 2,
            materialised_seq: None,
            bytes_compared: 0,
            bytes_written: 0,
        }),
    }
}

/// The data streams' frames.
#[test]
fn data_path() {
    check(
        "AgentFrame::Batch",
        &AgentFrame::Batch {
            first_seq: 1001,
            last_seq: 1002,
            body: ByteBuf::from(encode(&batch_body()).unwrap()),
        },
        "81a5426174636883a966697273745f736571cd03e9a86c6173745f736571cd03eaa4626f6479c4b2\
        83a77265636f7264739284a3736571cd03e9a46469736b01a66f6666736574ce00100000a4646174\
        61c4103031323334353637383961626364656684a3736571cd03eaa46469736b00a66f6666736574\
        00a464617461c400aa6469736b5f73697a657392cf0000000400000000ce80000000a6706f696e74\
        739184a3736571cd03eaa774696d655f6d73cf0000019b76daa800a46b696e64a54e616d6564a46e\
        616d65ae6265666f72652d75706772616465",
    );
    check(
        "Ack",
        &Ack {
            cached_seq: 1040,
            applied_seq: 1000,
        },
        "82aa6361636865645f736571cd0410ab6170706c6965645f736571cd03e8",
    );
    check(
        "ShipFrame::Sealed",
        &ShipFrame::Sealed {
            first_seq: 1001,
            last_seq: 1002,
            sealed: sealed(),
        },
        "81a65365616c656483a966697273745f736571cd03e9a86c6173745f736571cd03eaa67365616c65\
        6483a77261775f6c656ece00400000aa63697068657274657874c428000102030405060708090a0b\
        0c0d0e0f101112131415161718191a1b1c1d1e1f2021222324252627a56e6f6e6365c41864656667\
        68696a6b6c6d6e6f707172737475767778797a7b",
    );
    check(
        "Applied",
        &Applied { applied_seq: 1002 },
        "81ab6170706c6965645f736571cd03ea",
    );
    check("PointKind::Crash", &PointKind::Crash, "a54372617368");
    check("PointKind::App", &PointKind::App, "a3417070");
    check("PointKind::Named", &PointKind::Named, "a54e616d6564");
    check(
        "PointKind::NotConsistent",
        &PointKind::NotConsistent,
        "ad4e6f74436f6e73697374656e74",
    );
    check(
        "BatchBody",
        &batch_body(),
        "83a77265636f7264739284a3736571cd03e9a46469736b01a66f6666736574ce00100000a4646174\
        61c4103031323334353637383961626364656684a3736571cd03eaa46469736b00a66f6666736574\
        00a464617461c400aa6469736b5f73697a657392cf0000000400000000ce80000000a6706f696e74\
        739184a3736571cd03eaa774696d655f6d73cf0000019b76daa800a46b696e64a54e616d6564a46e\
        616d65ae6265666f72652d75706772616465",
    );
    check(
        "WriteRecord",
        &batch_body().records[0],
        "84a3736571cd03e9a46469736b01a66f6666736574ce00100000a464617461c41030313233343536\
        373839616263646566",
    );
    check(
        "Sealed",
        &sealed(),
        "83a77261775f6c656ece00400000aa63697068657274657874c428000102030405060708090a0b0c\
        0d0e0f101112131415161718191a1b1c1d1e1f2021222324252627a56e6f6e6365c4186465666768\
        696a6b6c6d6e6f707172737475767778797a7b",
    );
}

/// The transport's connection hello, the first message of every connection.
#[test]
fn hello() {
    check(
        "Hello",
        &Hello {
            protocol: "haven".into(),
            version: 3,
            peer: "agent web-01".into(),
        },
        "83a870726f746f636f6ca5686176656ea776657273696f6e03a470656572ac6167656e7420776562\
        2d3031",
    );
    check(
        "HelloReply::Ok",
        &HelloReply::Ok { version: 3 },
        "81a24f6b81a776657273696f6e03",
    );
    check(
        "HelloReply::Refused",
        &HelloReply::Refused {
            reason: "protocol version 2 is not supported".into(),
            version: 3,
        },
        "81a75265667573656482a6726561736f6ed92370726f746f636f6c2076657273696f6e2032206973\
        206e6f7420737570706f72746564a776657273696f6e03",
    );
}

// ---------------------------------------------------------------------------------------
// Older shapes: messages as peers of earlier versions sent them, without the fields that were
// added later with `#[serde(default)]`. Each shape is written down as a struct of its own
// (whose encoding is checked against the pinned bytes, so the bytes say what they are), and
// the pinned bytes must decode into today's type with the added fields defaulted.

mod v0 {
    use super::*;

    #[derive(Serialize, Deserialize)]
    pub struct DiskInfo {
        pub name: String,
        pub size_bytes: u64,
    }

    #[derive(Serialize, Deserialize)]
    pub struct AgentStats {
        pub epoch: u32,
        pub captured_seq: u64,
        pub cached_seq: u64,
        pub applied_seq: u64,
        pub oldest_unapplied_ms: u64,
        pub raw_bytes_sent: u64,
        pub raw_bytes_captured: u64,
        pub throughput_bps: u64,
        pub initial_sync_percent: Option<f64>,
        pub retained_bytes: u64,
        pub connected: bool,
        pub degraded_reason: Option<String>,
        pub scans: u64,
        pub stream_restarts: u64,
    }

    #[derive(Serialize, Deserialize)]
    pub struct AgentReport {
        pub machine: String,
        pub hostname: String,
        pub disks: Vec<DiskInfo>,
        pub stats: AgentStats,
        pub sync_done: Option<(u64, u64)>,
    }

    #[derive(Serialize, Deserialize)]
    pub enum Request {
        AgentPoll(Box<AgentReport>),
        NodePoll(NodeReport),
        OpenStream(StreamOpen),
    }

    #[derive(Serialize, Deserialize)]
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
    }

    #[derive(Serialize, Deserialize)]
    pub struct NodeReport {
        pub name: String,
        pub machines: Vec<NodeMachineReport>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct StreamOpen {
        pub machine: String,
        pub epoch: u32,
        pub generation: u64,
        pub disks: Vec<DiskInfo>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Assignment {
        pub machine: String,
        pub epoch: u32,
        pub generation: u64,
        pub disks: Vec<DiskInfo>,
        pub process_server: String,
        pub master_target: String,
        pub master_target_addr: String,
        pub data_key: ByteBuf,
    }

    #[derive(Serialize, Deserialize)]
    pub struct NodePollReply {
        pub assignments: Vec<Assignment>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct AgentPollReply {
        pub protected: bool,
        pub epoch: u32,
        pub generation: u64,
        pub process_server: Option<(String, String)>,
        pub sync_request: Option<u64>,
    }

    #[derive(Serialize, Deserialize)]
    pub enum Response {
        AgentPoll(AgentPollReply),
        NodePoll(NodePollReply),
        Admin(AdminReply),
    }

    #[derive(Serialize, Deserialize)]
    pub enum AdminReply {
        SyncState {
            barrier_seq: Option<u64>,
            applied_seq: u64,
            done: bool,
        },
    }

    #[derive(Serialize, Deserialize)]
    pub struct BatchBody {
        pub records: Vec<WriteRecord>,
    }

    pub fn disks() -> Vec<DiskInfo> {
        vec![DiskInfo {
            name: "root".into(),
            size_bytes: 16 << 30,
        }]
    }

    pub fn stream_open() -> StreamOpen {
        StreamOpen {
            machine: "web-01".into(),
            epoch: 3,
            generation: 7,
            disks: disks(),
        }
    }

    pub fn assignment() -> Assignment {
        Assignment {
            machine: "web-01".into(),
            epoch: 3,
            generation: 7,
            disks: disks(),
            process_server: "ps-1".into(),
            master_target: "mt-1".into(),
            master_target_addr: "10.0.0.2:7443".into(),
            data_key: ByteBuf::from(vec![0x11; 32]),
        }
    }

    pub fn agent_report() -> AgentReport {
        AgentReport {
            machine: "web-01".into(),
            hostname: "web-01.example".into(),
            disks: disks(),
            stats: AgentStats {
                epoch: 3,
                captured_seq: 1041,
                cached_seq: 1040,
                applied_seq: 1000,
                oldest_unapplied_ms: 1_700_000_000_123,
                raw_bytes_sent: 1 << 33,
                raw_bytes_captured: (1 << 33) + 4096,
                throughput_bps: 125_000_000,
                initial_sync_percent: Some(42.5),
                retained_bytes: 4 << 20,
                connected: true,
                degraded_reason: None,
                scans: 17,
                stream_restarts: 2,
            },
            sync_done: Some((5, 1041)),
        }
    }

    pub fn node_report() -> NodeReport {
        NodeReport {
            name: "ps-1".into(),
            machines: vec![NodeMachineReport {
                machine: "web-01".into(),
                role: "process".into(),
                cached_seq: 1040,
                applied_seq: 1000,
                wire_bytes: 1 << 32,
                raw_bytes: 1 << 33,
                cache_bytes: 1 << 28,
                batches_refused: 1,
                restarts: 4,
            }],
        }
    }
}

/// Checks that `shape` (an older shape) encodes to `golden`, and returns the golden bytes
/// decoded into today's type.
#[track_caller]
fn older<S: Serialize, T: DeserializeOwned>(name: &str, shape: &S, golden: &str) -> T {
    let bytes = encode(shape).unwrap();
    if printing() {
        println!("{name} (older shape):\n{}\n", wrap(&hex::encode(&bytes)));
    } else {
        assert_eq!(
            hex::encode(&bytes),
            hex::encode(unhex(golden)),
            "{name}: the older shape's pinned bytes are not what its struct encodes to"
        );
    }
    old(name, &hex::encode(&bytes))
}

#[test]
fn older_shapes_of_the_agent_poll() {
    let report: AgentReport = older(
        "AgentReport v0",
        &v0::agent_report(),
        "85a76d616368696e65a67765622d3031a8686f73746e616d65ae7765622d30312e6578616d706c65\
        a56469736b739182a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a573\
        746174738ea565706f636803ac63617074757265645f736571cd0411aa6361636865645f736571cd\
        0410ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170706c6965645f6d73cf0000\
        018bcfe5687bae7261775f62797465735f73656e74cf0000000200000000b27261775f6279746573\
        5f6361707475726564cf0000000200001000ae7468726f7567687075745f627073ce07735940b469\
        6e697469616c5f73796e635f70657263656e74cb4045400000000000ae72657461696e65645f6279\
        746573ce00400000a9636f6e6e6563746564c3af64656772616465645f726561736f6ec0a5736361\
        6e7311af73747265616d5f726573746172747302a973796e635f646f6e659205cd0411",
    );
    assert_eq!(report.machine, "web-01");
    assert_eq!(report.disks, vec![DiskInfo::new("root", 16 << 30)]);
    assert_eq!(report.sync_done, Some((5, 1041)));
    assert_eq!(
        (report.wait_ms, report.report_seq, report.known_generation),
        (0, 0, 0)
    );
    assert!(!report.held);
    assert_eq!(report.instance, 0);
    assert_eq!(report.stats.applied_seq, 1000);
    assert_eq!(report.stats.initial_sync_percent, Some(42.5));
    assert_eq!(report.stats.last_move, None);
    assert!(report.stats.blocked.is_empty());

    let req: Request = older(
        "Request::AgentPoll v0",
        &v0::Request::AgentPoll(Box::new(v0::agent_report())),
        "81a94167656e74506f6c6c85a76d616368696e65a67765622d3031a8686f73746e616d65ae776562\
        2d30312e6578616d706c65a56469736b739182a46e616d65a4726f6f74aa73697a655f6279746573\
        cf0000000400000000a573746174738ea565706f636803ac63617074757265645f736571cd0411aa\
        6361636865645f736571cd0410ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170\
        706c6965645f6d73cf0000018bcfe5687bae7261775f62797465735f73656e74cf00000002000000\
        00b27261775f62797465735f6361707475726564cf0000000200001000ae7468726f756768707574\
        5f627073ce07735940b4696e697469616c5f73796e635f70657263656e74cb4045400000000000ae\
        72657461696e65645f6279746573ce00400000a9636f6e6e6563746564c3af64656772616465645f\
        726561736f6ec0a57363616e7311af73747265616d5f726573746172747302a973796e635f646f6e\
        659205cd0411",
    );
    assert!(matches!(req, Request::AgentPoll(r) if r.instance == 0 && r.stats.scans == 17));

    let reply: Response = older(
        "Response::AgentPoll v0",
        &v0::Response::AgentPoll(v0::AgentPollReply {
            protected: true,
            epoch: 3,
            generation: 7,
            process_server: Some(("ps-1".into(), "10.0.0.1:7443".into())),
            sync_request: Some(5),
        }),
        "81a94167656e74506f6c6c85a970726f746563746564c3a565706f636803aa67656e65726174696f\
        6e07ae70726f636573735f73657276657292a470732d31ad31302e302e302e313a37343433ac7379\
        6e635f7265717565737405",
    );
    let Response::AgentPoll(reply) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(reply.generation, Generation(7));
    assert!(reply.resync.is_empty());
}

/// Shapes of the version before app-consistent points and `ctl mark`: no `marks_done` in
/// the report, no `marks` nor `app_consistent_every_ms` in the reply, no
/// `app_consistent_every_ms` in a policy.
#[test]
fn older_shapes_before_marks() {
    let req: Request = old(
        "Request::AgentPoll before marks",
        "81a94167656e74506f6c6c8aa76d616368696e65a67765622d3031a8686f73746e616d65ae776562\
        2d30312e6578616d706c65a56469736b739284a46e616d65a4726f6f74aa73697a655f6279746573\
        cf0000000400000000a470617468a82f6465762f766461a26964b7777769643a6e61612e36303031\
        2066703a30613162326384a46e616d65a464617461aa73697a655f6279746573ce40000000a47061\
        7468a0a26964a0a57374617473de0012a565706f636803ac63617074757265645f736571cd0411aa\
        6361636865645f736571cd0410ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170\
        706c6965645f6d73cf0000018bcfe5687bae7261775f62797465735f73656e74cf00000002000000\
        00b27261775f62797465735f6361707475726564cf0000000200001000ae7468726f756768707574\
        5f627073ce07735940b4696e697469616c5f73796e635f70657263656e74cb4045400000000000ae\
        72657461696e65645f6279746573ce00400000a9636f6e6e6563746564c3af64656772616465645f\
        726561736f6eba70726f636573732073657276657220756e726561636861626c65a57363616e7311\
        af73747265616d5f726573746172747302a96c6173745f6d6f766583aa67656e65726174696f6e07\
        a870617573655f6d73cd0352ac62797465735f726573656e74ce00010000a7626c6f636b65649183\
        a46469736ba464617461a6726561736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe5\
        6800a763617074757265a3746170ae6e6f745f636f6e73697374656e74bb74686520696e69746961\
        6c2073796e632069732072756e6e696e67a973796e635f646f6e659205cd0411a7776169745f6d73\
        cd61a8aa7265706f72745f736571cf00060a2418202240b06b6e6f776e5f67656e65726174696f6e\
        07a468656c64c3a8696e7374616e6365cf123456789abcdef1",
    );
    let Request::AgentPoll(r) = req else {
        panic!("{req:?}")
    };
    assert!(r.marks_done.is_empty());
    assert_eq!(r.instance, 0x1234_5678_9abc_def1);
    let reply: Response = old(
        "Response::AgentPoll before marks",
        "81a94167656e74506f6c6c87a970726f746563746564c3a565706f636803aa67656e65726174696f\
        6e07ae70726f636573735f73657276657292a470732d31ad31302e302e302e313a37343433ac7379\
        6e635f7265717565737405a6726573796e6381a46461746102ae706f696e745f65766572795f6d73\
        cd2710",
    );
    let Response::AgentPoll(reply) = reply else {
        panic!("{reply:?}")
    };
    assert!(reply.marks.is_empty());
    assert_eq!(reply.app_consistent_every_ms, None);
    assert_eq!(reply.point_every_ms, Some(10_000));
    let cmd: AdminCommand = old(
        "AdminCommand::Protect before marks",
        "81a750726f7465637482a76d616368696e65a67765622d3031a6706f6c69637983ac726574656e74\
        696f6e5f6d73ce0036ee80b16a6f75726e616c5f6361705f6279746573c0ae706f696e745f657665\
        72795f6d73cd1388",
    );
    let AdminCommand::Protect { policy, .. } = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(policy.point_every_ms, Some(5_000));
    assert_eq!(policy.app_consistent_every_ms, None);
}

#[test]
fn older_shapes_of_the_node_poll() {
    let req: Request = older(
        "Request::NodePoll v0",
        &v0::Request::NodePoll(v0::node_report()),
        "81a84e6f6465506f6c6c82a46e616d65a470732d31a86d616368696e65739189a76d616368696e65\
        a67765622d3031a4726f6c65a770726f63657373aa6361636865645f736571cd0410ab6170706c69\
        65645f736571cd03e8aa776972655f6279746573cf0000000100000000a97261775f6279746573cf\
        0000000200000000ab63616368655f6279746573ce10000000af626174636865735f726566757365\
        6401a8726573746172747304",
    );
    let Request::NodePoll(report) = req else {
        panic!("{req:?}")
    };
    assert_eq!((report.version, report.wait_ms, report.held), (0, 0, false));
    assert!(report.retired_done.is_empty());
    let m = &report.machines[0];
    assert_eq!((m.cached_seq, m.restarts, m.epoch), (1040, 4, 0));
    assert_eq!(
        (m.ship_error.as_deref(), m.refusal.as_deref()),
        (None, None)
    );

    let reply: Response = older(
        "Response::NodePoll v0",
        &v0::Response::NodePoll(v0::NodePollReply {
            assignments: vec![v0::assignment()],
        }),
        "81a84e6f6465506f6c6c81ab61737369676e6d656e74739188a76d616368696e65a67765622d3031\
        a565706f636803aa67656e65726174696f6e07a56469736b739182a46e616d65a4726f6f74aa7369\
        7a655f6279746573cf0000000400000000ae70726f636573735f736572766572a470732d31ad6d61\
        737465725f746172676574a46d742d31b26d61737465725f7461726765745f61646472ad31302e30\
        2e302e323a37343433a8646174615f6b6579c4201111111111111111111111111111111111111111\
        111111111111111111111111",
    );
    let Response::NodePoll(reply) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(reply.version, 0);
    assert!(reply.retired.is_empty());
    assert_eq!(
        reply.assignments,
        vec![Assignment {
            disks: vec![DiskInfo::new("root", 16 << 30)],
            enrolment: String::new(),
            policy: Default::default(),
            failbacks: 0,
            ..assignment()
        }]
    );
}

#[test]
fn older_shapes_of_the_data_path() {
    let req: Request = older(
        "Request::OpenStream v0",
        &v0::Request::OpenStream(v0::stream_open()),
        "81aa4f70656e53747265616d84a76d616368696e65a67765622d3031a565706f636803aa67656e65\
        726174696f6e07a56469736b739182a46e616d65a4726f6f74aa73697a655f6279746573cf000000\
        0400000000",
    );
    let Request::OpenStream(open) = req else {
        panic!("{req:?}")
    };
    assert_eq!(open.instance, 0);
    assert_eq!(open.generation, Generation(7));
    assert_eq!(open.disks, vec![DiskInfo::new("root", 16 << 30)]);

    // A batch of an agent that did not send disk sizes.
    let body: BatchBody = older(
        "BatchBody v0",
        &v0::BatchBody {
            records: batch_body().records,
        },
        "81a77265636f7264739284a3736571cd03e9a46469736b01a66f6666736574ce00100000a4646174\
        61c4103031323334353637383961626364656684a3736571cd03eaa46469736b00a66f6666736574\
        00a464617461c400",
    );
    assert_eq!(
        body,
        BatchBody {
            disk_sizes: vec![],
            points: vec![],
            ..batch_body()
        }
    );
}

#[test]
fn older_shapes_of_admin_replies() {
    let reply: Response = older(
        "Response::Admin(SyncState) v0",
        &v0::Response::Admin(v0::AdminReply::SyncState {
            barrier_seq: Some(1041),
            applied_seq: 1000,
            done: false,
        }),
        "81a541646d696e81a953796e63537461746583ab626172726965725f736571cd0411ab6170706c69\
        65645f736571cd03e8a4646f6e65c2",
    );
    assert!(matches!(
        reply,
        Response::Admin(AdminReply::SyncState {
            barrier_seq: Some(1041),
            applied_seq: 1000,
            done: false,
            blocked: None,
            degraded: None,
        })
    ));
}

/// Unknown fields (a newer peer's additions) are ignored, and an unknown variant (a newer
/// peer's request) is an error, not a panic.
#[test]
fn newer_shapes_degrade_gracefully() {
    #[derive(Serialize)]
    struct AckV9 {
        cached_seq: u64,
        applied_seq: u64,
        added_in_v9: Vec<String>,
    }
    let ack: Ack = decode(
        &encode(&AckV9 {
            cached_seq: 5,
            applied_seq: 4,
            added_in_v9: vec!["x".into()],
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        ack,
        Ack {
            cached_seq: 5,
            applied_seq: 4
        }
    );
    #[derive(Serialize)]
    enum RequestV9 {
        Teleport { to: String },
    }
    let err = decode::<Request>(&encode(&RequestV9::Teleport { to: "x".into() }).unwrap());
    assert!(err.is_err());
}

/// Messages of nodes and agents from before sites: their site is the default one.
#[test]
fn older_shapes_before_sites() {
    let req: Request = old(
        "Request::Join(Node) before sites",
        "81a44a6f696e82a6736563726574a6356563326537a46b696e6481a44e6f646584a46e616d65a470\
        732d31a5726f6c657392a770726f63657373ad6d61737465722d746172676574a461646472ad3130\
        2e302e302e313a37343433a863617061636974790a",
    );
    let Request::Join(JoinRequest {
        kind: JoinKind::Node { site, .. },
        ..
    }) = req
    else {
        panic!("{req:?}")
    };
    assert_eq!(site, "primary");
    let req: Request = old(
        "Request::AgentPoll before sites",
        "81a94167656e74506f6c6c8ba76d616368696e65a67765622d3031a8686f73746e616d65ae776562\
        2d30312e6578616d706c65a56469736b739284a46e616d65a4726f6f74aa73697a655f6279746573\
        cf0000000400000000a470617468a82f6465762f766461a26964b7777769643a6e61612e36303031\
        2066703a30613162326384a46e616d65a464617461aa73697a655f6279746573ce40000000a47061\
        7468a0a26964a0a57374617473de0012a565706f636803ac63617074757265645f736571cd0411aa\
        6361636865645f736571cd0410ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170\
        706c6965645f6d73cf0000018bcfe5687bae7261775f62797465735f73656e74cf00000002000000\
        00b27261775f62797465735f6361707475726564cf0000000200001000ae7468726f756768707574\
        5f627073ce07735940b4696e697469616c5f73796e635f70657263656e74cb4045400000000000ae\
        72657461696e65645f6279746573ce00400000a9636f6e6e6563746564c3af64656772616465645f\
        726561736f6eba70726f636573732073657276657220756e726561636861626c65a57363616e7311\
        af73747265616d5f726573746172747302a96c6173745f6d6f766583aa67656e65726174696f6e07\
        a870617573655f6d73cd0352ac62797465735f726573656e74ce00010000a7626c6f636b65649183\
        a46469736ba464617461a6726561736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe5\
        6800a763617074757265a3746170ae6e6f745f636f6e73697374656e74bb74686520696e69746961\
        6c2073796e632069732072756e6e696e67a973796e635f646f6e659205cd0411a7776169745f6d73\
        cd61a8aa7265706f72745f736571cf00060a2418202240b06b6e6f776e5f67656e65726174696f6e\
        07a468656c64c3a8696e7374616e6365cf123456789abcdef1aa6d61726b735f646f6e659188a772\
        657175657374ce0a000001a26964cf00060a241820245fa3736571cd0411a46b696e64a543726173\
        68a46e616d65ae6265666f72652d75706772616465a774696d655f6d73cf0000018bcfe5687ba877\
        61726e696e677391be667265657a65206661696c6564202865786974207374617475733a203129a5\
        6572726f72b87468652070726f74656374696f6e20776173207265736574",
    );
    let Request::AgentPoll(r) = req else {
        panic!("{req:?}")
    };
    assert_eq!(r.site, None);
    let req: Request = old(
        "Request::NodePoll before sites",
        "81a84e6f6465506f6c6c86a46e616d65a470732d31a86d616368696e6573918da76d616368696e65\
        a67765622d3031a4726f6c65a770726f63657373aa6361636865645f736571cd0410ab6170706c69\
        65645f736571cd03e8aa776972655f6279746573cf0000000100000000a97261775f6279746573cf\
        0000000200000000ab63616368655f6279746573ce10000000af626174636865735f726566757365\
        6401a8726573746172747304a565706f636803aa736869705f6572726f72be6d6173746572207461\
        72676574207265736574207468652073747265616da77265667573616cb07374616c652067656e65\
        726174696f6ea6706f696e747389a5636f756e742aa96f6c646573745f6d73cf0000018bcfe56800\
        a96c61746573745f6d73cf0000018bcfeae640a66c6174657374a431323037ac726574656e74696f\
        6e5f6d73ce05265c00ad6a6f75726e616c5f6279746573ce00100000b16a6f75726e616c5f636170\
        5f6279746573ce40000000ab6361705f72656163686564c2ad746573745f6661696c6f766572c0a7\
        76657273696f6e0ca7776169745f6d73cd61a8a468656c64c3ac726574697265645f646f6e6591a6\
        6f6c642d3031",
    );
    let Request::NodePoll(r) = req else {
        panic!("{req:?}")
    };
    assert_eq!(r.site, None);
}

/// Before failover: assignments without `failover`, agent poll replies without `read_only`,
/// node reports without `failover`, machine views without `recovery_state` and `failover`.
#[test]
fn older_shapes_before_failover() {
    let a: Assignment = old(
        "Assignment before failover",
        "8aa76d616368696e65a67765622d3031a565706f636803aa67656e65726174696f6e07a56469736b\
        739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470617468a82f\
        6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384a46e616d65\
        a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0ae70726f636573735f\
        736572766572a470732d31ad6d61737465725f746172676574a46d742d31b26d61737465725f7461\
        726765745f61646472ad31302e302e302e323a37343433a8646174615f6b6579c420111111111111\
        1111111111111111111111111111111111111111111111111111a9656e726f6c6d656e74a6652d34\
        663261a6706f6c69637984ac726574656e74696f6e5f6d73ce05265c00b16a6f75726e616c5f6361\
        705f6279746573ce40000000ae706f696e745f65766572795f6d73c0b76170705f636f6e73697374\
        656e745f65766572795f6d73ce000dbba0",
    );
    assert_eq!(a.failover, None);
    let r: NodeMachineReport = old(
        "NodeMachineReport before failover",
        "8da76d616368696e65a67765622d3031a4726f6c65a770726f63657373aa6361636865645f736571\
        cd0410ab6170706c6965645f736571cd03e8aa776972655f6279746573cf0000000100000000a972\
        61775f6279746573cf0000000200000000ab63616368655f6279746573ce10000000af6261746368\
        65735f7265667573656401a8726573746172747304a565706f636803aa736869705f6572726f72be\
        6d617374657220746172676574207265736574207468652073747265616da77265667573616cb073\
        74616c652067656e65726174696f6ea6706f696e747389a5636f756e742aa96f6c646573745f6d73\
        cf0000018bcfe56800a96c61746573745f6d73cf0000018bcfeae640a66c6174657374a431323037\
        ac726574656e74696f6e5f6d73ce05265c00ad6a6f75726e616c5f6279746573ce00100000b16a6f\
        75726e616c5f6361705f6279746573ce40000000ab6361705f72656163686564c2ad746573745f66\
        61696c6f766572c0",
    );
    assert_eq!(r.failover, None);
    let Response::AgentPoll(p) = old(
        "Response::AgentPoll before failover",
        "81a94167656e74506f6c6c89a970726f746563746564c3a565706f636803aa67656e65726174696f\
        6e07ae70726f636573735f73657276657292a470732d31ad31302e302e302e313a37343433ac7379\
        6e635f7265717565737405a6726573796e6381a46461746102ae706f696e745f65766572795f6d73\
        cd2710a56d61726b739183a26964ce0a000001a3617070c3a46e616d65ae6265666f72652d757067\
        72616465b76170705f636f6e73697374656e745f65766572795f6d73ce000dbba0",
    ) else {
        panic!("an agent poll reply")
    };
    assert_eq!(p.read_only, None);
    let AdminReply::Machines(m) = old(
        "AdminReply::Machines before failover",
        "81a84d616368696e657391de0022a46e616d65a67765622d3031a8686f73746e616d65ae7765622d\
        30312e6578616d706c65a473697465a26472a57374617465a86465677261646564b4696e69746961\
        6c5f73796e635f70657263656e74cb4045400000000000af64656772616465645f726561736f6eb0\
        6469736b206461746120736872616e6bae70726f636573735f736572766572a470732d31ad6d6173\
        7465725f746172676574a46d742d31aa67656e65726174696f6e07a565706f636803ac6361707475\
        7265645f736571cd0411aa6361636865645f736571cd0410ab6170706c6965645f736571cd03e8ab\
        72706f5f7365636f6e6473cb3ff4000000000000ae7261775f62797465735f73656e74cf00000002\
        00000000af776972655f62797465735f73656e74cf0000000100000000b87468726f756768707574\
        5f62797465735f7065725f736563ce07735940ae72657461696e65645f6279746573ce00400000a5\
        6469736b739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a47061\
        7468a82f6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384a4\
        6e616d65a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0b66167656e\
        745f6c6173745f7365656e5f6d735f61676fcd0384af73747265616d5f726573746172747302af62\
        6174636865735f7265667573656401ab63616368655f6279746573ce10000000ae626c6f636b6564\
        5f726561736f6eb06469736b206461746120736872616e6bad626c6f636b65645f6469736b739183\
        a46469736ba464617461a6726561736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe5\
        6800a763617074757265a3746170b5706f696e74735f6e6f745f636f6e73697374656e74c0ac6c61\
        746573745f706f696e74a431323037b86c61746573745f706f696e745f6167655f7365636f6e6473\
        cb4004000000000000af7265636f766572795f706f696e74732ab4686973746f72795f68656c645f\
        7365636f6e6473cb4076800000000000b5686973746f72795f61736b65645f7365636f6e6473cb40\
        f5180000000000b36a6f75726e616c5f6361705f72656163686564c2ad746573745f6661696c6f76\
        6572c0",
    ) else {
        panic!("a machine list")
    };
    assert!(m
        .iter()
        .all(|m| m.recovery_state.is_empty() && m.failover.is_none()));
}

/// Before reprotect: agent reports without `reverse_done`, poll replies without `reverse`.
#[test]
fn older_shapes_before_reprotect() {
    let r: AgentReport = old(
        "AgentReport before reprotect",
        "8ca76d616368696e65a67765622d3031a8686f73746e616d65ae7765622d30312e6578616d706c65\
        a56469736b739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470\
        617468a82f6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384\
        a46e616d65a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0a5737461\
        7473de0012a565706f636803ac63617074757265645f736571cd0411aa6361636865645f736571cd\
        0410ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170706c6965645f6d73cf0000\
        018bcfe5687bae7261775f62797465735f73656e74cf0000000200000000b27261775f6279746573\
        5f6361707475726564cf0000000200001000ae7468726f7567687075745f627073ce07735940b469\
        6e697469616c5f73796e635f70657263656e74cb4045400000000000ae72657461696e65645f6279\
        746573ce00400000a9636f6e6e6563746564c3af64656772616465645f726561736f6eba70726f63\
        6573732073657276657220756e726561636861626c65a57363616e7311af73747265616d5f726573\
        746172747302a96c6173745f6d6f766583aa67656e65726174696f6e07a870617573655f6d73cd03\
        52ac62797465735f726573656e74ce00010000a7626c6f636b65649183a46469736ba464617461a6\
        726561736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe56800a763617074757265a3\
        746170ae6e6f745f636f6e73697374656e74bb74686520696e697469616c2073796e632069732072\
        756e6e696e67a973796e635f646f6e659205cd0411a7776169745f6d73cd61a8aa7265706f72745f\
        736571cf00060a2418202240b06b6e6f776e5f67656e65726174696f6e07a468656c64c3a8696e73\
        74616e6365cf123456789abcdef1aa6d61726b735f646f6e659188a772657175657374ce0a000001\
        a26964cf00060a241820245fa3736571cd0411a46b696e64a54372617368a46e616d65ae6265666f\
        72652d75706772616465a774696d655f6d73cf0000018bcfe5687ba87761726e696e677391be6672\
        65657a65206661696c6564202865786974207374617475733a203129a56572726f72b87468652070\
        726f74656374696f6e20776173207265736574a473697465a26472",
    );
    assert_eq!(r.reverse_done, None);
    let Response::AgentPoll(p) = old(
        "Response::AgentPoll before reprotect",
        "81a94167656e74506f6c6c8aa970726f746563746564c3a565706f636803aa67656e65726174696f\
        6e07ae70726f636573735f73657276657292a470732d31ad31302e302e302e313a37343433ac7379\
        6e635f7265717565737405a6726573796e6381a46461746102ae706f696e745f65766572795f6d73\
        cd2710a56d61726b739183a26964ce0a000001a3617070c3a46e616d65ae6265666f72652d757067\
        72616465b76170705f636f6e73697374656e745f65766572795f6d73ce000dbba0a9726561645f6f\
        6e6c79c0",
    ) else {
        panic!("an agent poll reply")
    };
    assert_eq!(p.reverse, None);
    assert!(p.read_only.is_none());
}

/// Before failback: agent reports without `rebased`, assignments without `failbacks`, poll
/// replies without `rebase`.
#[test]
fn older_shapes_before_failback() {
    let r: AgentReport = old(
        "AgentReport before failback",
        "8da76d616368696e65a67765622d3031a8686f73746e616d65ae7765622d30312e6578616d706c65\
        a56469736b739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470\
        617468a82f6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384\
        a46e616d65a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0a5737461\
        7473de0012a565706f636803ac63617074757265645f736571cd0411aa6361636865645f736571cd\
        0410ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170706c6965645f6d73cf0000\
        018bcfe5687bae7261775f62797465735f73656e74cf0000000200000000b27261775f6279746573\
        5f6361707475726564cf0000000200001000ae7468726f7567687075745f627073ce07735940b469\
        6e697469616c5f73796e635f70657263656e74cb4045400000000000ae72657461696e65645f6279\
        746573ce00400000a9636f6e6e6563746564c3af64656772616465645f726561736f6eba70726f63\
        6573732073657276657220756e726561636861626c65a57363616e7311af73747265616d5f726573\
        746172747302a96c6173745f6d6f766583aa67656e65726174696f6e07a870617573655f6d73cd03\
        52ac62797465735f726573656e74ce00010000a7626c6f636b65649183a46469736ba464617461a6\
        726561736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe56800a763617074757265a3\
        746170ae6e6f745f636f6e73697374656e74bb74686520696e697469616c2073796e632069732072\
        756e6e696e67a973796e635f646f6e659205cd0411a7776169745f6d73cd61a8aa7265706f72745f\
        736571cf00060a2418202240b06b6e6f776e5f67656e65726174696f6e07a468656c64c3a8696e73\
        74616e6365cf123456789abcdef1aa6d61726b735f646f6e659188a772657175657374ce0a000001\
        a26964cf00060a241820245fa3736571cd0411a46b696e64a54372617368a46e616d65ae6265666f\
        72652d75706772616465a774696d655f6d73cf0000018bcfe5687ba87761726e696e677391be6672\
        65657a65206661696c6564202865786974207374617475733a203129a56572726f72b87468652070\
        726f74656374696f6e20776173207265736574a473697465a26472ac726576657273655f646f6e65\
        87a56f7264657209a47061737302ae62797465735f636f6d7061726564ce40000000aa686173685f\
        6279746573ce00200000ae62797465735f7265636569766564cd1000ae626c6f636b735f77726974\
        74656e01a56572726f72c0",
    );
    assert_eq!(r.rebased, None);
    assert!(r.reverse_done.is_some());
    let Request::AgentPoll(r) = old(
        "Request::AgentPoll before failback",
        "81a94167656e74506f6c6c8da76d616368696e65a67765622d3031a8686f73746e616d65ae776562\
        2d30312e6578616d706c65a56469736b739284a46e616d65a4726f6f74aa73697a655f6279746573\
        cf0000000400000000a470617468a82f6465762f766461a26964b7777769643a6e61612e36303031\
        2066703a30613162326384a46e616d65a464617461aa73697a655f6279746573ce40000000a47061\
        7468a0a26964a0a57374617473de0012a565706f636803ac63617074757265645f736571cd0411aa\
        6361636865645f736571cd0410ab6170706c6965645f736571cd03e8b36f6c646573745f756e6170\
        706c6965645f6d73cf0000018bcfe5687bae7261775f62797465735f73656e74cf00000002000000\
        00b27261775f62797465735f6361707475726564cf0000000200001000ae7468726f756768707574\
        5f627073ce07735940b4696e697469616c5f73796e635f70657263656e74cb4045400000000000ae\
        72657461696e65645f6279746573ce00400000a9636f6e6e6563746564c3af64656772616465645f\
        726561736f6eba70726f636573732073657276657220756e726561636861626c65a57363616e7311\
        af73747265616d5f726573746172747302a96c6173745f6d6f766583aa67656e65726174696f6e07\
        a870617573655f6d73cd0352ac62797465735f726573656e74ce00010000a7626c6f636b65649183\
        a46469736ba464617461a6726561736f6ea6736872616e6ba873696e63655f6d73cf0000018bcfe5\
        6800a763617074757265a3746170ae6e6f745f636f6e73697374656e74bb74686520696e69746961\
        6c2073796e632069732072756e6e696e67a973796e635f646f6e659205cd0411a7776169745f6d73\
        cd61a8aa7265706f72745f736571cf00060a2418202240b06b6e6f776e5f67656e65726174696f6e\
        07a468656c64c3a8696e7374616e6365cf123456789abcdef1aa6d61726b735f646f6e659188a772\
        657175657374ce0a000001a26964cf00060a241820245fa3736571cd0411a46b696e64a543726173\
        68a46e616d65ae6265666f72652d75706772616465a774696d655f6d73cf0000018bcfe5687ba877\
        61726e696e677391be667265657a65206661696c6564202865786974207374617475733a203129a5\
        6572726f72b87468652070726f74656374696f6e20776173207265736574a473697465a26472ac72\
        6576657273655f646f6e6587a56f7264657209a47061737302ae62797465735f636f6d7061726564\
        ce40000000aa686173685f6279746573ce00200000ae62797465735f7265636569766564cd1000ae\
        626c6f636b735f7772697474656e01a56572726f72c0",
    ) else {
        panic!("an agent poll")
    };
    assert_eq!(r.rebased, None);
    let a: Assignment = old(
        "Assignment before failback",
        "8ba76d616368696e65a67765622d3031a565706f636803aa67656e65726174696f6e07a56469736b\
        739284a46e616d65a4726f6f74aa73697a655f6279746573cf0000000400000000a470617468a82f\
        6465762f766461a26964b7777769643a6e61612e363030312066703a30613162326384a46e616d65\
        a464617461aa73697a655f6279746573ce40000000a470617468a0a26964a0ae70726f636573735f\
        736572766572a470732d31ad6d61737465725f746172676574a46d742d31b26d61737465725f7461\
        726765745f61646472ad31302e302e302e323a37343433a8646174615f6b6579c420111111111111\
        1111111111111111111111111111111111111111111111111111a9656e726f6c6d656e74a6652d34\
        663261a6706f6c69637984ac726574656e74696f6e5f6d73ce05265c00b16a6f75726e616c5f6361\
        705f6279746573ce40000000ae706f696e745f65766572795f6d73c0b76170705f636f6e73697374\
        656e745f65766572795f6d73ce000dbba0a86661696c6f766572c0",
    );
    assert_eq!(a.failbacks, 0);
    assert_eq!(a.machine, "web-01");
    let Response::NodePoll(n) = old(
        "Response::NodePoll before failback",
        "81a84e6f6465506f6c6c83ab61737369676e6d656e7473918ba76d616368696e65a67765622d3031\
        a565706f636803aa67656e65726174696f6e07a56469736b739284a46e616d65a4726f6f74aa7369\
        7a655f6279746573cf0000000400000000a470617468a82f6465762f766461a26964b7777769643a\
        6e61612e363030312066703a30613162326384a46e616d65a464617461aa73697a655f6279746573\
        ce40000000a470617468a0a26964a0ae70726f636573735f736572766572a470732d31ad6d617374\
        65725f746172676574a46d742d31b26d61737465725f7461726765745f61646472ad31302e302e30\
        2e323a37343433a8646174615f6b6579c42011111111111111111111111111111111111111111111\
        11111111111111111111a9656e726f6c6d656e74a6652d34663261a6706f6c69637984ac72657465\
        6e74696f6e5f6d73ce05265c00b16a6f75726e616c5f6361705f6279746573ce40000000ae706f69\
        6e745f65766572795f6d73c0b76170705f636f6e73697374656e745f65766572795f6d73ce000dbb\
        a0a86661696c6f766572c0a776657273696f6e0ca7726574697265649183a76d616368696e65a66f\
        6c642d3031a565706f636802ae64656c6574655f7265706c696361c3",
    ) else {
        panic!("a node poll reply")
    };
    assert!(n.assignments.iter().all(|a| a.failbacks == 0));
    let Response::AgentPoll(p) = old(
        "Response::AgentPoll before failback",
        "81a94167656e74506f6c6c8ba970726f746563746564c3a565706f636803aa67656e65726174696f\
        6e07ae70726f636573735f73657276657292a470732d31ad31302e302e302e313a37343433ac7379\
        6e635f7265717565737405a6726573796e6381a46461746102ae706f696e745f65766572795f6d73\
        cd2710a56d61726b739183a26964ce0a000001a3617070c3a46e616d65ae6265666f72652d757067\
        72616465b76170705f636f6e73697374656e745f65766572795f6d73ce000dbba0a9726561645f6f\
        6e6c79c0a77265766572736583a56f7264657209a47061737301ad6d61737465725f746172676574\
        92a46d742d31ad31302e302e302e323a37343030",
    ) else {
        panic!("an agent poll reply")
    };
    assert_eq!(p.rebase, None);
    assert!(p.reverse.is_some());
}
