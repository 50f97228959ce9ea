//! Consistency groups against real processes: two tap agents in group `g`, a cross-machine
//! causal writer (counter i is written to B only after its write to A was acknowledged),
//! `ctl group mark` during the writes (B placing its points 400 ms late, by fault injection),
//! and every group point judged through `ctl group test-failover --export`: B never holds a
//! counter A's point lacks, and A is at most one write ahead.
mod common;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use haven_testkit::make_disk;

const MIB: u64 = 1 << 20;

/// The counter at offset 0 of an exported image.
fn counter(img: &str) -> u64 {
    let bytes = std::fs::read(img).unwrap_or_else(|e| panic!("{img}: {e}"));
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

#[test]
fn group_points_are_one_cut_under_a_cross_machine_causal_workload() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    for m in ["a", "b"] {
        let disk = c.path(&format!("{m}.img"));
        make_disk(&disk, 8 * MIB, 7);
        c.start_tap_agent(m, &disk, &[]);
    }
    // b is a slow member: it places each point 400 ms after a does, so a cut is one only if
    // a's hold covers the skew (without holds b's point would be ~400 ms of writes ahead).
    c.set_env(
        "agent-b",
        vec![("HAVEN_FAULT_MARK_DELAY_MS".into(), "400".into())],
    );
    c.kill("agent-b");
    c.restart("agent-b");
    c.wait_tap("b", "d0");
    let out = c.ctl(&["protect", "a", "b", "--group", "g"]);
    assert_eq!(
        out["groups"][0]["members"],
        serde_json::json!(["a", "b"]),
        "{out}"
    );
    for m in ["a", "b"] {
        c.wait_sync(m, Duration::from_secs(120));
    }

    // The causal writer: i to A, acknowledged, then i to B.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (ua, ub) = (c.tap_uri("a", "d0"), c.tap_uri("b", "d0"));
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut a = haven_nbd::Client::connect(&ua).expect("tap a");
            let mut b = haven_nbd::Client::connect(&ub).expect("tap b");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let block = [i.to_le_bytes().to_vec(), vec![0u8; 4088]].concat();
                a.write_at(&block, 0, false).expect("write a");
                b.write_at(&block, 0, false).expect("write b");
                written.store(i, Ordering::Relaxed);
            }
        })
    };
    let mut points = vec![];
    for k in 0..5 {
        let seen = written.load(Ordering::Relaxed);
        haven_testkit::wait_until("the writer goes on", Duration::from_secs(30), || {
            (written.load(Ordering::Relaxed) > seen + 20).then_some(())
        });
        let p = c.ctl(&["group", "mark", "g", "--name", &format!("cut-{k}")]);
        assert_eq!(p["members"].as_object().map(|m| m.len()), Some(2), "{p}");
        points.push(p);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    for m in ["a", "b"] {
        c.wait_sync(m, Duration::from_secs(120));
    }

    let listed = c.ctl(&["group", "recovery-points", "g"]);
    let listed = listed.as_array().unwrap();
    let mut nonzero = 0;
    for p in &points {
        let id = p["id"].as_u64().unwrap().to_string();
        assert!(
            listed
                .iter()
                .any(|l| l["id"] == p["id"] && l["pruned"].as_array().is_some_and(|v| v.is_empty())),
            "point {id} listed: {listed:?}"
        );
        let dir = c.path(&format!("export-{id}"));
        let drill = c.ctl(&[
            "group",
            "test-failover",
            "g",
            "--point",
            &id,
            "--export",
            dir.to_str().unwrap(),
        ]);
        let at = |m: &str| {
            let member = drill["members"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["machine"] == m)
                .unwrap_or_else(|| panic!("{m} in {drill}"));
            assert_eq!(member["point"]["seq"], p["members"][m], "{drill}");
            counter(member["disks"][0]["image"].as_str().unwrap())
        };
        let (ca, cb) = (at("a"), at("b"));
        // B's i was written only after A acknowledged i: a cut never has B ahead of A.
        assert!(cb <= ca, "group point {id}: b holds {cb}, a only {ca}");
        // And the holds were short: at most one write of B is behind A's.
        assert!(ca <= cb + 1, "group point {id}: a {ca}, b {cb}");
        if ca > 0 {
            nonzero += 1;
        }
    }
    assert_eq!(nonzero, points.len(), "every cut saw the writer's work");
}
