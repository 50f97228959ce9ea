//! Replication against real processes on loopback: separate configuration, process-server
//! and master-target nodes and an agent protecting two disks.
mod common;

use std::{os::unix::fs::FileExt, time::Duration};

use common::*;
use haven_testkit::{make_disk, random_writes, u64_of, wait_until};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DISK0: u64 = 48 << 20;
const DISK1: u64 = 24 << 20;
const SYNC: Duration = Duration::from_secs(120);

struct Setup {
    c: Cluster,
    disks: Vec<(&'static str, std::path::PathBuf)>,
    rng: StdRng,
}

impl Setup {
    fn new(seed: u64) -> Self {
        let mut c = Cluster::new();
        phase("start configuration, process and master-target nodes as separate processes");
        c.start_config(&["configuration"], vec![]);
        c.start_node("ps1", &["process"], vec![]);
        c.start_node("mt1", &["master-target"], vec![]);
        let disks = vec![("root", c.path("root.img")), ("data", c.path("data.img"))];
        make_disk(&disks[0].1, DISK0, seed);
        make_disk(&disks[1].1, DISK1, seed + 1);
        phase("enroll and protect an agent with two disks");
        let spec: Vec<(&str, &std::path::Path)> =
            disks.iter().map(|(n, p)| (*n, p.as_path())).collect();
        c.start_agent("web01", &spec);
        assert_eq!(c.machine("web01").unwrap()["state"], "discovered");
        c.ctl(&["protect", "web01"]);
        Setup {
            c,
            disks,
            rng: StdRng::seed_from_u64(seed + 100),
        }
    }

    fn verify(&self) {
        for (name, path) in &self.disks {
            self.c
                .assert_replica("web01", path, &self.c.replica("mt1", "web01", name));
        }
    }

    fn write_some(&mut self, count: usize) {
        for (_, p) in &self.disks {
            random_writes(p, &mut self.rng, count);
        }
    }
}

#[test]
fn initial_sync_then_random_writes_converge() {
    let mut s = Setup::new(1);
    phase("initial sync");
    s.c.wait_sync("web01", SYNC);
    s.verify();
    // The barrier may complete on the master target's report a moment before the agent's
    // next report says the initial sync is over.
    let m = wait_until("state replicating", Duration::from_secs(10), || {
        let m = s.c.machine("web01")?;
        (m["state"] == "replicating").then_some(m)
    });
    assert_eq!(m["rpo_seconds"].as_f64(), Some(0.0));
    let raw = u64_of(&m, "raw_bytes_sent");
    assert!(
        raw > 0 && raw <= DISK0 + DISK1,
        "initial sync sends at most the disks' size, sent {raw}"
    );
    assert!(
        u64_of(&m, "wire_bytes_sent") < raw,
        "zstd makes the wire smaller than raw: {m}"
    );
    assert_eq!(u64_of(&m, "applied_seq"), u64_of(&m, "captured_seq"));

    phase("random writes of mixed sizes while replicating, three rounds");
    for _ in 0..3 {
        s.write_some(40);
        std::thread::sleep(Duration::from_millis(300));
    }
    s.c.wait_sync("web01", SYNC);
    s.verify();
    s.c.assert_running();
    s.c.assert_no_unexpected_errors(&[]);
}

/// SIGKILL each of the four processes in turn while data flows; after each, replication
/// resumes without a full resync and the replicas converge byte for byte.
#[test]
fn sigkill_of_each_process_loses_nothing_and_does_not_resync() {
    let mut s = Setup::new(2);
    s.c.wait_sync("web01", SYNC);
    s.verify();
    let total = DISK0 + DISK1;

    for victim in ["agent-web01", "ps1", "mt1", "config"] {
        phase(&format!("SIGKILL {victim} while writes flow"));
        let before = s.c.machine("web01").unwrap();
        let sent_before = u64_of(&before, "raw_bytes_sent");
        let applied_before = u64_of(&before, "applied_seq");
        s.write_some(10);
        std::thread::sleep(Duration::from_millis(400)); // let some of it be in flight
        s.c.kill(victim);
        s.write_some(10);

        if victim == "config" {
            phase("configuration node down: replication keeps flowing");
            // A marker written now must reach the replica while the configuration node is down.
            let marker: Vec<u8> = (0..4096).map(|_| s.rng.gen()).collect();
            let offset = 4096 * 1000;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&s.disks[0].1)
                .unwrap()
                .write_all_at(&marker, offset)
                .unwrap();
            let replica = s.c.replica("mt1", "web01", "root");
            wait_until(
                "marker applied while the configuration node is down",
                Duration::from_secs(30),
                || {
                    let f = std::fs::File::open(&replica).ok()?;
                    let mut got = vec![0u8; 4096];
                    f.read_exact_at(&mut got, offset).ok()?;
                    (got == marker).then_some(())
                },
            );
        } else {
            std::thread::sleep(Duration::from_millis(500));
        }
        s.c.restart(victim);
        s.write_some(10);
        phase(&format!("{victim} restarted: wait for sync"));
        wait_until(
            "configuration node answering",
            Duration::from_secs(30),
            || s.c.try_ctl(&["status"]).ok(),
        );
        s.c.wait_sync("web01", SYNC);
        s.verify();
        let after = s.c.machine("web01").unwrap();
        let applied_after = u64_of(&after, "applied_seq");
        assert!(
            applied_after > applied_before,
            "applied_seq moved forward: {applied_before} -> {applied_after}"
        );
        // A restarted agent's counter starts from zero; the others keep counting.
        let sent = if victim == "agent-web01" {
            u64_of(&after, "raw_bytes_sent")
        } else {
            u64_of(&after, "raw_bytes_sent") - sent_before
        };
        eprintln!("{victim}: {sent} raw bytes sent since the kill (disks total {total})");
        assert!(
            sent < total / 3,
            "{victim} restart caused a full resync: {sent} bytes sent of {total}"
        );
        s.c.assert_running();
    }
    s.c.assert_no_unexpected_errors(&[]);
}

/// With the master target down, a process server with a small cache fills it, stops reading,
/// and the agent's retention buffer takes the rest: nothing is dropped, and everything
/// converges when the master target returns.
#[test]
fn a_full_cache_slows_the_agent_and_loses_nothing() {
    const LIMIT: u64 = 8 << 20;
    let mut c = Cluster::new();
    c.start_config(&["configuration"], vec![]);
    c.start_node_with("ps1", &["process"], &["--cache-size", "8MiB"], vec![]);
    c.start_node("mt1", &["master-target"], vec![]);
    let disk = c.path("disk.img");
    make_disk(&disk, 64 << 20, 11);
    c.start_agent("web01", &[("root", disk.as_path())]);
    c.ctl(&["protect", "web01"]);
    c.wait_sync("web01", SYNC);
    c.assert_replica("web01", &disk, &c.replica("mt1", "web01", "root"));

    phase("master target down: 40 MiB of writes against an 8 MiB cache");
    c.kill("mt1");
    let mut rng = StdRng::seed_from_u64(12);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for i in 0..40u64 {
        let data: Vec<u8> = (0..1 << 20).map(|_| rng.gen()).collect();
        f.write_all_at(&data, i * (1 << 20) + 4096).unwrap();
    }
    f.sync_all().unwrap();
    // Capture runs until the cache is full and the agent holds the rest.
    let m = wait_until(
        "back-pressure reaches the agent",
        Duration::from_secs(60),
        || {
            let m = c.machine("web01")?;
            (u64_of(&m, "retained_bytes") > 0
                && u64_of(&m, "captured_seq") > u64_of(&m, "cached_seq"))
            .then_some(m)
        },
    );
    std::thread::sleep(Duration::from_secs(2)); // give an unbounded cache the chance to overrun
    let m2 = c.machine("web01").unwrap();
    let cache = u64_of(&m2, "cache_bytes");
    eprintln!(
        "cache {cache} bytes, agent retains {} bytes",
        u64_of(&m2, "retained_bytes")
    );
    assert!(
        cache <= LIMIT + (6 << 20),
        "the cache stays near its 8 MiB limit, holds {cache}"
    );
    assert!(
        u64_of(&m2, "cached_seq") < u64_of(&m2, "captured_seq"),
        "the agent holds what the cache cannot: {m}"
    );

    phase("master target back: everything converges");
    c.restart("mt1");
    c.wait_sync("web01", SYNC);
    c.assert_replica("web01", &disk, &c.replica("mt1", "web01", "root"));
    c.assert_no_unexpected_errors(&[]);
}

/// Unprotect, change the disk, protect again: a new epoch, a full resync, an exact replica.
#[test]
fn reprotect_starts_a_new_epoch_and_converges() {
    let mut s = Setup::new(3);
    s.c.wait_sync("web01", SYNC);
    s.verify();
    phase("unprotect, write, protect again");
    s.c.ctl(&["unprotect", "web01"]);
    s.write_some(20);
    // Zeros where there was data: the new epoch's replica must not keep stale bytes.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.disks[0].1)
        .unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 0).unwrap();
    f.sync_all().unwrap();
    s.c.ctl(&["protect", "web01"]);
    s.c.wait_sync("web01", SYNC);
    s.verify();
    let m = wait_until("state replicating", Duration::from_secs(10), || {
        let m = s.c.machine("web01")?;
        (m["state"] == "replicating").then_some(m)
    });
    assert_eq!(m["epoch"], 2);
    s.c.assert_no_unexpected_errors(&[]);
}
