//! Supervision under fire, against real processes: replication streams fail in every way the
//! issue names (a panic in a handler, a local I/O error, a refused/undecodable batch, a peer
//! reset from either side, a crash half-way through applying a batch), injected by
//! `HAVEN_FAULT_STREAM` (roles/src/faults.rs). Checked: the failing stream restarts alone
//! from the master target's durable cursor, its siblings are untouched, restarts are counted
//! in status, an exhausted restart budget escalates, and no torn batch is ever visible.
mod common;

use std::{
    os::unix::{fs::FileExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    sync::atomic::AtomicBool,
    time::{Duration, Instant},
};

use common::*;
use haven_testkit::{assert_identical, make_disk, random_writes, u64_of, wait_until};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DISK: u64 = 24 << 20;
const SYNC: Duration = Duration::from_secs(120);
const FIRED: &str = "injecting a stream fault on purpose";

fn faults(plan: &str) -> Vec<(String, String)> {
    vec![("HAVEN_FAULT_STREAM".to_string(), plan.to_string())]
}

/// Log lines of `name` that contain every one of `parts`.
fn count_lines(c: &Cluster, name: &str, parts: &[&str]) -> usize {
    c.log(name)
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

fn stat(c: &Cluster, machine: &str, field: &str) -> u64 {
    u64_of(&c.machine(machine).expect("machine known"), field)
}

/// Enrolls and protects one agent per machine, each with one disk.
fn protect(c: &mut Cluster, machines: &[&str]) -> Vec<PathBuf> {
    machines
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let disk = c.path(&format!("{m}.img"));
            make_disk(&disk, DISK, 10 + i as u64);
            c.start_agent(m, &[("root", disk.as_path())]);
            c.ctl(&["protect", m]);
            disk
        })
        .collect()
}

/// Writes to every disk until `done` holds (bounded), so streams always carry data.
fn write_until(
    c: &Cluster,
    disks: &[PathBuf],
    rng: &mut StdRng,
    what: &str,
    done: impl Fn(&Cluster) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done(c) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        for d in disks {
            random_writes(d, rng, 8);
        }
        // Pacing of the load generator, not a wait for a condition: the loop condition is.
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_failing_stream_restarts_alone_from_its_durable_cursor() {
    let mut c = Cluster::new();
    c.start_config(&["configuration"], vec![]);
    // Every way a stream can fail: m1's on the process server's side, m3's on the master
    // target's (kept apart so that each fault ends an incarnation of its own); m2 shares both
    // servers and must not notice.
    let ps_plan = "m1:ship-panic,ship-io,ship-corrupt,ship-reset,ship-replay,ship-wrong-key";
    let mt_plan = "m3:apply-reset,apply-panic";
    c.start_node("ps1", &["process"], faults(ps_plan));
    c.start_node("mt1", &["master-target"], faults(mt_plan));
    let machines = ["m1", "m2", "m3"];
    let disks = protect(&mut c, &machines);
    c.wait_sync("m2", SYNC);
    let m2_restarts_before = stat(&c, "m2", "stream_restarts");

    let stop = AtomicBool::new(false);
    let cursors = machines.map(|m| c.path(&format!("mt1/replicas/{m}/state")));
    let observations = std::thread::scope(|s| {
        let checker = s.spawn(|| monitor(&cursors, &stop));
        let mut rng = StdRng::seed_from_u64(7);
        phase("write to every machine until all eight faults have fired");
        write_until(&c, &disks, &mut rng, "eight injected faults", |c| {
            count_lines(c, "ps1", &[FIRED]) + count_lines(c, "mt1", &[FIRED]) >= 8
        });
        for m in machines {
            c.wait_sync(m, SYNC);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        checker.join().expect("invariant checker")
    });
    assert!(observations > 0);
    for (m, d) in machines.iter().zip(&disks) {
        c.assert_replica(m, d, &c.replica("mt1", m, "root"));
    }

    // Each fault fired exactly once, on the machine it was planned for.
    assert_eq!(count_lines(&c, "ps1", &[FIRED, "machine=m1"]), 6);
    assert_eq!(count_lines(&c, "mt1", &[FIRED, "machine=m3"]), 2);
    assert_eq!(
        count_lines(&c, "ps1", &[FIRED]) + count_lines(&c, "mt1", &[FIRED]),
        8
    );
    // The panic and the local I/O error went to the supervisor, which restarted ship/m1 only;
    // the peer failures were reconnects of the child itself. No budget ran out.
    let sup_restarts = count_lines(&c, "ps1", &["child failed; restarting", "ship/m1"]);
    assert_eq!(sup_restarts, 2, "ship-panic and ship-io restart the child");
    for m in ["ship/m2", "ship/m3"] {
        assert_eq!(count_lines(&c, "ps1", &["child failed; restarting", m]), 0);
    }
    assert_eq!(count_lines(&c, "ps1", &["restart budget exhausted"]), 0);
    // Every fault ended its stream, and each end was followed by exactly one new stream that
    // resumed from the master target's cursor.
    let ends = |m: &str| {
        let tag = format!("machine={m}");
        let reconnects = count_lines(&c, "ps1", &["ship stream ended", &tag]);
        let restarts = count_lines(
            &c,
            "ps1",
            &["child failed; restarting", &format!("ship/{m}")],
        );
        let opened = count_lines(&c, "ps1", &["shipping to master target", &tag]);
        (reconnects + restarts, opened)
    };
    assert_eq!(ends("m1"), (6, 7), "m1: (stream ends, streams opened)");
    assert_eq!(ends("m3"), (2, 3), "m3: (stream ends, streams opened)");
    // m2's stream was never disturbed: one ship stream, accepted once, no restarts.
    assert_eq!(ends("m2"), (0, 1));
    assert_eq!(
        count_lines(&c, "mt1", &["ship stream accepted", "machine=m2"]),
        1
    );
    assert_eq!(stat(&c, "m2", "stream_restarts"), m2_restarts_before);
    // Restarts are counted in status.
    assert!(stat(&c, "m1", "stream_restarts") >= 6);
    assert!(stat(&c, "m3", "stream_restarts") >= 2);
    // The corrupted, the replayed and the wrongly keyed batch were each refused by the
    // master target's authentication, never applied (the replica is identical above).
    let refused = count_lines(&c, "mt1", &["nothing from it was applied", "machine=m1"]);
    assert_eq!(
        refused, 3,
        "corrupt, replayed and wrongly keyed batches refused"
    );
    assert_eq!(stat(&c, "m1", "batches_refused"), 3);
    assert_eq!(stat(&c, "m2", "batches_refused"), 0);
    // The panic half-way through a batch was rolled back before the replica was used again.
    assert_eq!(
        count_lines(&c, "mt1", &["rolled back a batch", "machine=m3"]),
        1
    );
    c.assert_running();
    c.assert_no_unexpected_errors(&[
        "refused",     // the corrupted batch, on both sides
        "ship-panic",  // the injected panic, as the supervisor logs it
        "apply-panic", // the injected panic on the master target
        "injected",    // injected I/O error / resets as logged by the supervisor
        "ship stream", // the master target logging the end of a stream it refused
    ]);
}

#[test]
fn an_exhausted_restart_budget_escalates_and_the_node_recovers() {
    let mut c = Cluster::new();
    c.start_config(&["configuration"], vec![]);
    // 12 crashes of two ship children: more than the process supervisor's budget (10 / 60 s).
    c.start_node(
        "ps1",
        &["process"],
        faults("m1:ship-panic*6;m2:ship-panic*6"),
    );
    c.start_node("mt1", &["master-target"], vec![]);
    let disks = protect(&mut c, &["m1", "m2", "m3"]);
    let mut rng = StdRng::seed_from_u64(8);
    phase("write until the process supervisor escalates");
    write_until(&c, &disks, &mut rng, "an escalation", |c| {
        count_lines(
            c,
            "ps1",
            &["restart budget exhausted; escalating to parent"],
        ) >= 1
    });
    phase("the node's root supervisor restarts the process subtree; everything converges");
    write_until(&c, &disks, &mut rng, "all faults fired", |c| {
        count_lines(c, "ps1", &[FIRED]) >= 12
    });
    for m in ["m1", "m2", "m3"] {
        c.wait_sync(m, SYNC);
    }
    for (m, d) in ["m1", "m2", "m3"].iter().zip(&disks) {
        c.assert_replica(m, d, &c.replica("mt1", m, "root"));
    }
    let escalations = count_lines(&c, "ps1", &["escalating to parent", "\"process\""]);
    assert!(escalations >= 1);
    assert!(count_lines(&c, "ps1", &["restarting child", "child=process"]) >= 1);
    // Escalation restarts the whole subtree: m3, which never failed, got a new stream too.
    assert!(count_lines(&c, "mt1", &["ship stream accepted", "machine=m3"]) >= 2);
    // The root's budget held: the node is still up and serving.
    assert!(c.is_running("ps1"));
    c.assert_no_unexpected_errors(&["ship-panic", "restart budget exhausted", "injected"]);
}

/// Reads `len` bytes of `path` at `offset`.
fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn a_master_target_killed_half_way_through_a_batch_shows_no_torn_state() {
    let mut c = Cluster::new();
    c.start_config(&["configuration"], vec![]);
    c.start_node("ps1", &["process"], vec![]);
    c.start_node("mt1", &["master-target"], vec![]);
    let disk = protect(&mut c, &["m1"]).remove(0);
    c.wait_sync("m1", SYNC);
    let replica = c.replica("mt1", "m1", "root");
    let cursor_path = c.path("mt1/replicas/m1/state");
    c.assert_replica("m1", &disk, &replica);
    let synced = c.path("synced.img");
    std::fs::copy(&disk, &synced).unwrap();
    let before = read_cursor(&cursor_path);

    phase("with the agent stopped, overwrite 64 scattered 4 KiB blocks of the source");
    c.kill("agent-m1");
    let mut rng = StdRng::seed_from_u64(9);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let mut offsets: Vec<u64> = (0..64)
        .map(|_| rng.gen_range(0..DISK / 4096) * 4096)
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    for off in &offsets {
        let block: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
        f.write_all_at(&block, *off).unwrap();
    }
    f.sync_all().unwrap();

    phase("the master target aborts half-way through writing the batch that carries them");
    c.kill("mt1");
    c.set_env("mt1", faults("m1:apply-abort"));
    c.restart("mt1");
    c.restart("agent-m1");
    let status = c.wait_exit("mt1", Duration::from_secs(60));
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "mt1 exited with {status}"
    );
    c.kill("agent-m1");
    c.kill("ps1");
    assert_eq!(count_lines(&c, "mt1", &[FIRED, "ApplyAbort"]), 1);

    // The crash left a torn batch in the image: some new blocks are there, some are not...
    let new_blocks = offsets
        .iter()
        .filter(|off| read_at(&replica, **off, 4096) == read_at(&disk, **off, 4096))
        .count();
    assert!(
        new_blocks > 0 && new_blocks < offsets.len(),
        "expected a torn batch on disk, {new_blocks} of {} blocks new",
        offsets.len()
    );
    // ...which the durable cursor does not claim.
    let after = read_cursor(&cursor_path);
    assert_eq!(
        (after.epoch, after.applied_seq),
        (before.epoch, before.applied_seq)
    );

    phase("the restarted master target rolls the torn batch back before serving anything");
    c.set_env("mt1", vec![]);
    c.restart("mt1");
    wait_until("mt1 alive", Duration::from_secs(30), || {
        c.nodes()
            .iter()
            .any(|n| n["name"] == "mt1" && n["alive"] == true)
            .then_some(())
    });
    assert_identical(&synced, &replica);
    assert_eq!(count_lines(&c, "mt1", &["rolled back a batch", "m1"]), 1);
    assert_eq!(read_cursor(&cursor_path).applied_seq, before.applied_seq);

    phase("replication resumes and converges");
    c.restart("ps1");
    c.restart("agent-m1");
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &replica);
    c.assert_no_unexpected_errors(&[]);
}
