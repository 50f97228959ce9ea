//! Refusals at the boundary: wrong tokens, a server with the wrong CA, a protocol version
//! mismatch, and a corrupted sealed batch. Each is refused with a clear error, and nothing
//! from it is registered or applied.
mod common;

use std::{process::Command, time::Duration};

use common::*;
use haven_testkit::{make_disk, random_writes, wait_until};
use haven_transport::{endpoint, identity::Token};

#[test]
fn bad_tokens_are_refused_and_nothing_is_registered() {
    let mut c = Cluster::new();
    c.start_config(&["configuration"], vec![]);
    let good = Token::parse(&std::fs::read_to_string(c.node_token()).unwrap()).unwrap();

    phase("a node token with the wrong secret");
    let wrong_secret = Token {
        secret: "ab".repeat(24),
        ..good.clone()
    };
    let f = c.path("wrong-secret");
    std::fs::write(&f, wrong_secret.encode()).unwrap();
    let out = c.join_output("intruder1", &f);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "joiner must exit non-zero");
    assert!(
        err.contains("invalid join token"),
        "clear error for the joiner: {err}"
    );
    assert!(
        c.log("config").contains("join refused"),
        "the server logs the refusal"
    );

    phase("a token pinning another cluster's CA fingerprint");
    let wrong_ca = Token {
        ca_fingerprint: "0".repeat(64),
        ..good.clone()
    };
    let f = c.path("wrong-ca");
    std::fs::write(&f, wrong_ca.encode()).unwrap();
    let out = c.join_output("intruder2", &f);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("fingerprint"),
        "the joiner names the fingerprint mismatch: {err}"
    );

    phase("an admin token where an enrolment token is expected, and garbage");
    let out = c.join_output("intruder3", &c.admin_token());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("joining needs an agent token"));
    let f = c.path("garbage");
    std::fs::write(&f, "not a token").unwrap();
    let out = c.join_output("intruder4", &f);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token file"));

    phase("a ctl call with the agent token instead of the admin token");
    let out = Command::new(BIN)
        .args(["ctl", "--cluster", &c.config_addr, "--token-file"])
        .arg(c.agent_token())
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());

    phase("nothing was registered");
    let nodes = c.ctl(&["nodes"]);
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["config"]);
    for n in ["intruder1", "intruder2", "intruder3", "intruder4"] {
        assert!(
            !c.path(n).join("identity/cert.der").exists(),
            "{n} got no certificate"
        );
    }
}

#[test]
fn protocol_version_mismatch_is_refused_on_both_sides() {
    let mut c = Cluster::new();
    c.start_config(&["configuration"], vec![]);
    let token = Token::parse(&std::fs::read_to_string(c.admin_token()).unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(async {
        let ep = endpoint::client_endpoint().unwrap();
        let cfg = endpoint::pinned_client_config(&token.ca_fingerprint).unwrap();
        let addr = c.config_addr.parse().unwrap();
        endpoint::connect(
            &ep,
            cfg,
            addr,
            "test-client",
            endpoint::PROTOCOL_VERSION + 98,
        )
        .await
        .expect_err("must be refused")
    });
    match err {
        endpoint::EndpointError::VersionMismatch { ours, theirs } => {
            assert_eq!(
                (ours, theirs),
                (endpoint::PROTOCOL_VERSION + 98, endpoint::PROTOCOL_VERSION)
            );
        }
        other => panic!("expected a version mismatch, got {other}"),
    }
    wait_until("server logs the mismatch", Duration::from_secs(10), || {
        c.log("config")
            .contains("protocol version mismatch")
            .then_some(())
    });
}

#[test]
fn corrupted_sealed_batch_is_refused_and_never_applied() {
    let mut c = Cluster::new();
    // The all-in-one node corrupts one batch it ships (debug fault injection).
    c.start_config(
        &[],
        vec![("HAVEN_FAULT_STREAM".into(), "db01:ship-corrupt".into())],
    );
    let disk = c.path("disk.img");
    make_disk(&disk, 32 << 20, 9);
    c.start_agent("db01", &[("root", disk.as_path())]);
    c.ctl(&["protect", "db01"]);
    c.wait_sync("db01", Duration::from_secs(120));
    c.assert_replica("db01", &disk, &c.replica("config", "db01", "root"));
    // Node reports reach the configuration node within a poll (about a second).
    wait_until(
        "the refusal is counted in status",
        Duration::from_secs(10),
        || {
            let m = c.machine("db01")?;
            (m["batches_refused"].as_u64()? >= 1).then_some(())
        },
    );
    let log = c.log("config");
    assert!(
        log.contains("injecting a stream fault on purpose machine=db01 fault=ShipCorrupt"),
        "the fault was injected"
    );
    assert!(
        log.contains("failed authentication"),
        "refused for a failed tag: {}",
        log.lines()
            .filter(|l| l.contains("refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    c.assert_no_unexpected_errors(&["nothing from it was applied"]);
}

/// Garbage, oversized and unauthorised frames at the control and data boundaries: each is
/// refused with a logged reason and its stream closed; replication is not disturbed.
#[test]
fn malformed_and_unauthorised_frames_are_refused_without_disturbing_anything() {
    use haven_roles::proto::{Request, Response, ShipOpen, StreamOpen};
    use haven_transport::frame;

    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("disk.img");
    make_disk(&disk, 16 << 20, 21);
    c.start_agent("db01", &[("root", disk.as_path())]);
    c.ctl(&["protect", "db01"]);
    c.wait_sync("db01", Duration::from_secs(120));

    let token = Token::parse(&std::fs::read_to_string(c.admin_token()).unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answers: Vec<String> = rt.block_on(async {
        let ep = endpoint::client_endpoint().unwrap();
        let cfg = endpoint::pinned_client_config(&token.ca_fingerprint).unwrap();
        let conn = endpoint::connect(
            &ep,
            cfg,
            c.config_addr.parse().unwrap(),
            "fuzzer",
            endpoint::PROTOCOL_VERSION,
        )
        .await
        .unwrap();
        let mut answers = vec![];
        // Raw bytes on a stream: an absurd length prefix, then a frame of garbage.
        for raw in [
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            vec![0, 0, 0, 4, 0xc1, 0xc1, 0xc1, 0xc1],
        ] {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&raw).await.unwrap();
            let _ = send.finish();
            let r = frame::read_frame(&mut recv, frame::MAX_CONTROL_FRAME).await;
            answers.push(format!("{r:?}"));
        }
        // Well-formed data-path requests without a certificate.
        let disks = vec![haven_cluster::DiskInfo::new("root", 16 << 20)];
        let reqs = [
            Request::OpenStream(StreamOpen {
                machine: "db01".into(),
                epoch: 1,
                generation: haven_cluster::Generation(1),
                disks: disks.clone(),
                instance: 7,
            }),
            Request::OpenShip(ShipOpen {
                machine: "db01".into(),
                epoch: 1,
                generation: haven_cluster::Generation(99),
                disks,
            }),
        ];
        for req in reqs {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            frame::send_msg(&mut send, &req).await.unwrap();
            let resp: Result<Response, _> =
                frame::expect_msg(&mut recv, frame::MAX_CONTROL_FRAME).await;
            answers.push(match resp {
                Ok(Response::Refused { reason }) => reason,
                other => panic!("expected a refusal, got {other:?}"),
            });
        }
        conn.close(0u32.into(), b"done");
        answers
    });
    eprintln!("{answers:#?}");
    // No reply to garbage: the stream is dropped without an answer.
    assert!(!answers[0].starts_with("Ok(Some"), "{}", answers[0]);
    assert!(!answers[1].starts_with("Ok(Some"), "{}", answers[1]);
    assert!(
        answers[2].contains("need a cluster certificate"),
        "{}",
        answers[2]
    );
    assert!(
        answers[3].contains("need a cluster certificate"),
        "{}",
        answers[3]
    );
    let log = c.log("config");
    assert!(log.contains("exceeds the limit"), "oversized frame logged");
    assert!(log.contains("malformed message"), "garbage frame logged");

    phase("replication is undisturbed");
    random_writes(&disk, &mut rand::SeedableRng::seed_from_u64(22), 20);
    c.wait_sync("db01", Duration::from_secs(120));
    c.assert_replica("db01", &disk, &c.replica("config", "db01", "root"));
    c.assert_running();
    c.assert_no_unexpected_errors(&[]);
}
