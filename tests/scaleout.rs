//! Scale-out against real processes: one configuration node, three process servers, one
//! master target and four agents under continuous writes.
mod common;

use std::{
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use haven_testkit::{make_disk, wait_until};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DISK: u64 = 16 << 20;
const MACHINES: [&str; 4] = ["m0", "m1", "m2", "m3"];
const SYNC: Duration = Duration::from_secs(120);

struct Fleet {
    c: Cluster,
    disks: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<u64>>,
    /// Bytes written to each disk so far.
    written: Arc<Vec<AtomicU64>>,
}

impl Fleet {
    fn new(process_servers: &[&str], config_extra: &[&str]) -> Self {
        let mut c = Cluster::new();
        c.start_config_with(&["configuration"], config_extra, vec![]);
        for ps in process_servers {
            c.start_node(ps, &["process"], vec![]);
        }
        c.start_node("mt1", &["master-target"], vec![]);
        let mut disks = vec![];
        for (i, m) in MACHINES.iter().enumerate() {
            let d = c.path(&format!("{m}.img"));
            make_disk(&d, DISK, 40 + i as u64);
            c.start_agent(m, &[("root", d.as_path())]);
            c.ctl(&["protect", m]);
            disks.push(d);
        }
        for m in MACHINES {
            c.wait_sync(m, SYNC);
        }
        let written = Arc::new(MACHINES.iter().map(|_| AtomicU64::new(0)).collect());
        Fleet {
            c,
            disks,
            stop: Arc::new(AtomicBool::new(false)),
            writer: None,
            written,
        }
    }

    /// Continuous writes of 4-64 KiB to every disk, one round every `every`, until
    /// `stop_writes`.
    fn start_writes(&mut self, every: Duration) {
        let (disks, stop, counters) = (self.disks.clone(), self.stop.clone(), self.written.clone());
        self.writer = Some(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(77);
            let files: Vec<_> = disks
                .iter()
                .map(|d| std::fs::OpenOptions::new().write(true).open(d).unwrap())
                .collect();
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (f, n) in files.iter().zip(counters.iter()) {
                    let len = rng.gen_range(4096..65536);
                    let off = rng.gen_range(0..DISK - len as u64);
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    f.write_all_at(&data, off).unwrap();
                    written += len as u64;
                    n.fetch_add(len as u64, Ordering::Relaxed);
                }
                std::thread::sleep(every);
            }
            written
        }));
    }

    fn written(&self) -> Vec<u64> {
        self.written
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    fn sent(&self) -> Vec<u64> {
        MACHINES
            .iter()
            .map(|m| {
                self.c.machine(m).unwrap()["raw_bytes_sent"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    fn stop_writes(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.take().map(|w| w.join().unwrap()).unwrap_or(0)
    }

    fn converge(&self) {
        for (m, d) in MACHINES.iter().zip(&self.disks) {
            self.c.wait_sync(m, SYNC);
            self.c
                .assert_replica(m, d, &self.c.replica("mt1", m, "root"));
        }
    }

    fn ps_of(&self, machine: &str) -> String {
        self.c.machine(machine).unwrap()["process_server"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn machines_on(&self, ps: &str) -> usize {
        MACHINES.iter().filter(|m| self.ps_of(m) == ps).count()
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn twenty_live_moves_under_writes_lose_nothing() {
    let mut f = Fleet::new(&["ps1", "ps2", "ps3"], &["--no-auto-rebalance"]);
    let (sent_before, written_before) = (f.sent(), f.written());
    f.start_writes(Duration::from_millis(20));
    phase("20 live moves back and forth while every disk is written");
    let mut pauses = vec![];
    let mut resent = 0u64;
    for i in 0..20 {
        let m = MACHINES[i % MACHINES.len()];
        let from = f.ps_of(m);
        let to = ["ps1", "ps2", "ps3"]
            .into_iter()
            .find(|p| *p != from && (i % 2 == 0 || *p != "ps3"))
            .unwrap();
        let out = f.c.ctl(&["move", m, "--to", to]);
        let pause = out["pause_ms"].as_u64().expect("pause reported");
        let bytes = out["bytes_resent"].as_u64().expect("bytes resent reported");
        eprintln!("move {i}: {m} {from} -> {to}: pause {pause} ms, {bytes} bytes resent");
        pauses.push(pause);
        resent += bytes;
        assert_eq!(f.ps_of(m), to);
        // Bytes resent are bounded by what can be in flight: the agent's retention buffer.
        assert!(bytes <= 256 << 20, "resent {bytes}");
    }
    let written = f.stop_writes();
    phase("stop writes; every replica converges");
    f.converge();
    pauses.sort_unstable();
    eprintln!(
        "move pause p50 {} ms, p99 {} ms; {resent} bytes resent in total; {written} bytes written",
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99)
    );
    // A live move: no move waited for the failure timeout (5 s) or anything like it. The
    // pause as a figure (p50 ~10 ms, p99 tens of ms on a quiet machine) is measured by
    // benches/scaleout.rs; here, with 20 samples, "p99" would be the single worst move. One
    // move of 1,046 ms was seen once in five full runs on a loaded machine (cause not yet
    // found; the other 19 were 5-42 ms): a figure for the bench, not a functional failure.
    assert!(
        pauses.iter().all(|&p| p < 5000),
        "every move is live, well under the 5 s failure timeout: {pauses:?}"
    );
    let (sent, written_after) = (f.sent(), f.written());
    for (i, m) in MACHINES.iter().enumerate() {
        // No full resync: what travelled is what was written (rounded to 4 KiB blocks: +30 %
        // at most for 4-64 KiB writes) plus what the moves resent. A resync would add a whole
        // disk. (Comparing with the disk size alone fails when a slow run writes more than
        // a disk's worth: that is not a resync.)
        let (s, w) = (
            sent[i] - sent_before[i],
            written_after[i] - written_before[i],
        );
        eprintln!("{m}: {s} bytes sent, {w} bytes written since the writes started");
        assert!(
            s < w * 13 / 10 + resent + (4 << 20),
            "{m}: no full resync ({s} bytes sent for {w} written, {resent} resent by moves)"
        );
    }
    let events = f.c.ctl(&["events"]);
    assert_eq!(
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "move")
            .count(),
        20
    );
    f.c.assert_no_unexpected_errors(&[]);
}

#[test]
fn sigkill_of_a_process_server_fails_over_and_the_old_one_is_fenced() {
    let mut f = Fleet::new(&["ps1", "ps2"], &["--no-auto-rebalance"]);
    // Put every machine on ps1.
    for m in MACHINES {
        if f.ps_of(m) != "ps1" {
            f.c.ctl(&["move", m, "--to", "ps1"]);
        }
    }
    let (sent_before, written_before) = (f.sent(), f.written());
    f.start_writes(Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(500));
    phase("SIGKILL ps1 under load");
    let killed = Instant::now();
    f.c.kill("ps1");
    wait_until(
        "all machines failed over to ps2",
        Duration::from_secs(30),
        || MACHINES.iter().all(|m| f.ps_of(m) == "ps2").then_some(()),
    );
    // Replication resumed: each machine's applied seq moves on the new process server.
    let before: Vec<u64> = MACHINES
        .iter()
        .map(|m| f.c.machine(m).unwrap()["applied_seq"].as_u64().unwrap())
        .collect();
    wait_until(
        "replication resumed on ps2",
        Duration::from_secs(30),
        || {
            MACHINES
                .iter()
                .zip(&before)
                .all(|(m, b)| f.c.machine(m).unwrap()["applied_seq"].as_u64().unwrap() > *b)
                .then_some(())
        },
    );
    let resume_secs = killed.elapsed().as_secs_f64();
    eprintln!("replication resumed {resume_secs:.1}s after the SIGKILL (failure timeout 5s)");
    assert!(
        resume_secs < 10.0,
        "replication resumed within 10 s of the crash: {resume_secs:.1}s"
    );
    let events = f.c.ctl(&["events"]);
    assert_eq!(
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "failover")
            .count(),
        MACHINES.len()
    );

    phase("the failed process server returns: it is fenced and drops its stale cache");
    f.c.restart("ps1");
    wait_until("ps1 alive again", Duration::from_secs(30), || {
        f.c.nodes()
            .iter()
            .any(|n| n["name"] == "ps1" && n["alive"] == true)
            .then_some(())
    });
    let written = f.stop_writes();
    f.converge();
    eprintln!("{written} bytes written during the test");
    let (sent, written_after) = (f.sent(), f.written());
    for (i, m) in MACHINES.iter().enumerate() {
        assert_eq!(f.ps_of(m), "ps2");
        // What travelled is what was written (rounded to 4 KiB blocks: +30 % at most for
        // 4-64 KiB writes) plus what was in flight; a full resync would add the ~12 MB of
        // non-zero data each disk holds.
        let (s, w) = (
            sent[i] - sent_before[i],
            written_after[i] - written_before[i],
        );
        eprintln!("{m}: {s} bytes sent, {w} bytes written since the writes started");
        assert!(
            s < w * 13 / 10 + (4 << 20),
            "{m}: no full resync ({s} bytes sent for {w} written)"
        );
    }
    wait_until("ps1 dropped every machine", Duration::from_secs(45), || {
        f.c.nodes()
            .iter()
            .any(|n| n["name"] == "ps1" && n["cache_bytes"] == 0)
            .then_some(())
    });
    f.c.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_joining_process_server_gets_machines_and_a_drained_one_empties() {
    // A short cooldown, so undrain refills within the test's patience.
    let mut f = Fleet::new(&["ps1"], &["--rebalance-cooldown", "3s"]);
    assert_eq!(f.machines_on("ps1"), 4);
    f.start_writes(Duration::from_millis(20));
    phase("ps2 joins: the rebalancer moves machines onto it");
    f.c.start_node("ps2", &["process"], vec![]);
    wait_until("rebalanced 2/2", Duration::from_secs(30), || {
        (f.machines_on("ps2") == 2 && f.machines_on("ps1") == 2).then_some(())
    });
    phase("drain ps1: it ends with no machines");
    f.c.ctl(&["drain", "ps1"]);
    wait_until("ps1 empty", Duration::from_secs(30), || {
        (f.machines_on("ps1") == 0).then_some(())
    });
    let nodes = f.c.nodes();
    let ps1 = nodes.iter().find(|n| n["name"] == "ps1").unwrap();
    assert_eq!(
        (ps1["machines"].as_u64(), ps1["drained"].as_bool()),
        (Some(0), Some(true))
    );
    // A drained node stays empty: the rebalancer does not refill it.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(f.machines_on("ps1"), 0);
    f.c.ctl(&["undrain", "ps1"]);
    wait_until(
        "ps1 refilled after undrain",
        Duration::from_secs(30),
        || (f.machines_on("ps1") == 2).then_some(()),
    );
    f.stop_writes();
    f.converge();
    f.c.assert_no_unexpected_errors(&[]);
}
