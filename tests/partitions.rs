//! Network partitions between real processes, each longer than the QUIC idle timeout (10 s),
//! then healed: replication converges and nothing is lost.
//!
//! Every process runs its QUIC over the fault-injecting socket with no random faults, only
//! partitions read from a control file of its own (`HAVEN_NET_FAULTS=seed=N,control=FILE`,
//! see `transport/src/faults.rs`). A link is cut at its client's socket, by writing the
//! server's listen address into the client's control file with `both`: the client's address
//! is an ephemeral port, the server's is known. A node uses its listening socket for its
//! outgoing connections too, so cutting a node's socket by a peer's address cuts the link
//! whichever side dials.
mod common;

use std::{
    os::unix::fs::FileExt,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::*;
use haven_testkit::{make_disk, random_writes, u64_of, wait_until};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DISK: u64 = 16 << 20;
const SYNC: Duration = Duration::from_secs(60);
/// A fault-injecting socket re-reads its control file every 100 ms.
const APPLIED: Duration = Duration::from_secs(5);

struct Net {
    c: Cluster,
    disk: PathBuf,
    rng: StdRng,
}

fn control_file(c: &Cluster, process: &str) -> PathBuf {
    c.path(&format!("{process}.partitions"))
}

/// Only partitions, from `process`'s control file; no random faults.
fn faults(c: &Cluster, process: &str, seed: u64) -> Vec<(String, String)> {
    vec![(
        "HAVEN_NET_FAULTS".to_string(),
        format!("seed={seed},control={}", control_file(c, process).display()),
    )]
}

/// The partitions a process last logged applying from its control file, as `ADDR both, ..`
/// or `none`.
fn applied_partitions(log: &str) -> Option<String> {
    const MARK: &str = "control file partitions now: ";
    let line = log.lines().rev().find(|l| l.contains(MARK))?;
    let set = &line[line.find(MARK)? + MARK.len()..];
    // The fields (`path=..`) follow the message.
    Some(set.split(" path=").next()?.to_string())
}

impl Net {
    /// Configuration node, ps1, mt1 and an agent protecting one disk, each process with its
    /// own control file; waits for the initial sync.
    fn new(seed: u64) -> Self {
        let mut c = Cluster::new();
        phase("configuration, process, master-target nodes and an agent, each with a partition control file");
        let env = faults(&c, "config", seed);
        c.start_config_with(&["configuration"], &[], env);
        let env = faults(&c, "ps1", seed + 1);
        c.start_node("ps1", &["process"], env);
        let env = faults(&c, "mt1", seed + 2);
        c.start_node("mt1", &["master-target"], env);
        let disk = c.path("disk.img");
        make_disk(&disk, DISK, seed);
        let env = faults(&c, "agent-web01", seed + 3);
        c.start_agent_with_env("web01", &[("root", disk.as_path())], env);
        c.ctl(&["protect", "web01"]);
        c.wait_sync("web01", SYNC);
        c.assert_replica("web01", &disk, &c.replica("mt1", "web01", "root"));
        for name in ["config", "ps1", "mt1", "agent-web01"] {
            assert!(
                c.log(name).contains("partitions from the control file"),
                "{name} follows its control file"
            );
        }
        Net {
            c,
            disk,
            rng: StdRng::seed_from_u64(seed + 100),
        }
    }

    /// Makes `peers` (listen addresses) the exact set cut both ways at `process`'s socket,
    /// and waits until the process logs it applied. The file is replaced atomically, so the
    /// socket never reads half an address.
    fn cut(&self, process: &str, peers: &[&str]) {
        let path = control_file(&self.c, process);
        let tmp = path.with_extension("tmp");
        let text: String = peers.iter().map(|p| format!("{p} both\n")).collect();
        std::fs::write(&tmp, format!("# written by tests/partitions.rs\n{text}")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let expected = if peers.is_empty() {
            "none".to_string()
        } else {
            let mut sorted = peers.to_vec();
            sorted.sort();
            sorted
                .iter()
                .map(|p| format!("{p} both"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        wait_until(
            &format!("{process} applies partitions [{expected}]"),
            APPLIED,
            || (applied_partitions(&self.c.log(process))? == expected).then_some(()),
        );
    }

    fn heal(&self, process: &str) {
        self.cut(process, &[]);
    }

    fn write_some(&mut self, count: usize) -> u64 {
        random_writes(&self.disk, &mut self.rng, count)
    }

    fn machine(&self) -> serde_json::Value {
        self.c.machine("web01").expect("machine web01 listed")
    }

    /// After a heal: everything written converges, without a new epoch (a full resync).
    fn converge(&mut self, sent_before: u64) {
        self.write_some(10);
        self.c.wait_sync("web01", SYNC);
        self.c
            .assert_replica("web01", &self.disk, &self.c.replica("mt1", "web01", "root"));
        // The status is built from reports that may lag by a long poll (1 s): poll for it.
        let m = wait_until(
            "status: replicating, everything captured applied",
            Duration::from_secs(10),
            || {
                let m = self.c.machine("web01")?;
                (m["state"] == "replicating"
                    && u64_of(&m, "applied_seq") == u64_of(&m, "captured_seq"))
                .then_some(m)
            },
        );
        self.c.assert_no_resync("web01", &m);
        let sent = u64_of(&m, "raw_bytes_sent").saturating_sub(sent_before);
        eprintln!("raw bytes sent since the cut: {sent} (disk {DISK}, resends included); stream restarts {}", m["stream_restarts"]);
        self.c.assert_running();
    }
}

#[test]
fn agent_cut_from_its_process_server_longer_than_the_idle_timeout() {
    let mut n = Net::new(10);
    let ps1 = n.c.addr("ps1");
    let before = n.machine();

    phase("cut agent <-> ps1 both ways; write during the cut");
    n.cut("agent-web01", &[&ps1]);
    let since = Instant::now();
    n.write_some(20);
    // The agent captures the writes but cannot hand them to the process server.
    let m = wait_until("writes captured but not cached during the cut", CUT, || {
        let m = n.c.machine("web01")?;
        (u64_of(&m, "captured_seq") > u64_of(&before, "captured_seq")
            && u64_of(&m, "cached_seq") == u64_of(&before, "cached_seq"))
        .then_some(m)
    });
    eprintln!("during the cut: {m}");
    hold(since, AFTER_IDLE);
    n.write_some(20);
    hold(since, CUT);
    let m = n.machine();
    assert_eq!(
        u64_of(&m, "cached_seq"),
        u64_of(&before, "cached_seq"),
        "nothing reached ps1 through the cut: {m}"
    );

    phase("heal; replication converges");
    n.heal("agent-web01");
    n.converge(u64_of(&before, "raw_bytes_sent"));
    n.c.assert_no_unexpected_errors(&[]);
}

#[test]
fn process_server_cut_from_its_master_target_longer_than_the_idle_timeout() {
    let mut n = Net::new(20);
    let mt1 = n.c.addr("mt1");
    let before = n.machine();

    phase("cut ps1 <-> mt1 both ways; write during the cut");
    n.cut("ps1", &[&mt1]);
    let since = Instant::now();
    n.write_some(20);
    // The process server caches the writes but cannot apply them at the master target.
    let m = wait_until("writes cached but not applied during the cut", CUT, || {
        let m = n.c.machine("web01")?;
        (u64_of(&m, "cached_seq") > u64_of(&before, "cached_seq")
            && u64_of(&m, "applied_seq") == u64_of(&before, "applied_seq"))
        .then_some(m)
    });
    eprintln!("during the cut: {m}");
    hold(since, AFTER_IDLE);
    n.write_some(20);
    hold(since, CUT);
    let m = n.machine();
    assert_eq!(
        u64_of(&m, "applied_seq"),
        u64_of(&before, "applied_seq"),
        "nothing reached mt1 through the cut: {m}"
    );

    phase("heal; replication converges");
    n.heal("ps1");
    n.converge(u64_of(&before, "raw_bytes_sent"));
    n.c.assert_no_unexpected_errors(&[]);
}

#[test]
fn process_server_cut_from_the_configuration_node_keeps_replicating() {
    let mut n = Net::new(30);
    let config = n.c.addr("config");
    let before = n.machine();

    phase("cut ps1 <-> configuration node both ways while data flows");
    n.cut("ps1", &[&config]);
    let since = Instant::now();
    n.write_some(20);
    // Past the failure timeout the configuration node stops seeing ps1.
    wait_until("the configuration node sees ps1 silent", CUT, || {
        let nodes = n.c.try_ctl(&["nodes"]).ok()?;
        nodes
            .as_array()?
            .iter()
            .any(|x| x["name"] == "ps1" && x["alive"] == false)
            .then_some(())
    });
    eprintln!(
        "ps1 silent for the configuration node after {:?}; machine: {}",
        since.elapsed(),
        n.machine()
    );

    // The data path (agent -> ps1 -> mt1) does not go through the configuration node: a
    // marker written now reaches the replica before the cut heals.
    let marker: Vec<u8> = (0..4096).map(|_| n.rng.gen()).collect();
    let offset = 4096 * 1000;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&n.disk)
        .unwrap();
    f.write_all_at(&marker, offset).unwrap();
    f.sync_data().unwrap();
    let replica = n.c.replica("mt1", "web01", "root");
    wait_until(
        "marker applied at the replica during the cut",
        CUT.saturating_sub(since.elapsed()),
        || {
            let f = std::fs::File::open(&replica).ok()?;
            let mut got = vec![0u8; 4096];
            f.read_exact_at(&mut got, offset).ok()?;
            (got == marker).then_some(())
        },
    );
    eprintln!("marker applied {:?} into the cut", since.elapsed());
    n.write_some(10);
    hold(since, AFTER_IDLE);
    n.write_some(10);
    hold(since, CUT);
    assert_eq!(
        applied_partitions(&n.c.log("ps1")),
        Some(format!("{config} both")),
        "the cut held until now"
    );

    phase("heal; ps1 reports again and replication converges");
    n.heal("ps1");
    wait_until("ps1 alive again", SYNC, || {
        let nodes = n.c.try_ctl(&["nodes"]).ok()?;
        nodes
            .as_array()?
            .iter()
            .any(|x| x["name"] == "ps1" && x["alive"] == true)
            .then_some(())
    });
    n.converge(u64_of(&before, "raw_bytes_sent"));
    n.c.assert_no_unexpected_errors(&[]);
}
