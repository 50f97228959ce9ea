//! Failover (`ctl failover`, `failover-change-point`, `failover-commit`, `failover-cancel`)
//! through the README commands, against real processes: the master target fences the forward
//! stream and serves the disks at the point as writable NBD exports; a planned failover loses
//! no acknowledged write; a cancel resumes forward replication without a resync; a process
//! server that comes back from a partition after the failover has nothing of its stream
//! applied; a committed failover is served again after a master-target restart.
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use haven_testkit::{assert_identical, make_disk, wait_until};
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_128;

const MIB: u64 = 1 << 20;
const SYNC: Duration = Duration::from_secs(120);

fn tail_of(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Machine m1 with tap capture of d0 (a generated disk of `size` bytes), protected and
/// initially synced; returns the disk's path.
fn protected_tap(c: &mut Cluster, size: u64, seed: u64) -> std::path::PathBuf {
    let disk = c.path("d0.img");
    make_disk(&disk, size, seed);
    c.start_tap_agent("m1", &disk, &[]);
    c.ctl(&["protect", "m1"]);
    c.wait_sync("m1", SYNC);
    disk
}

/// The id of m1's newest recovery point.
fn newest_point(c: &Cluster) -> String {
    let points = c.ctl(&["recovery-points", "m1"]);
    points["points"]
        .as_array()
        .and_then(|a| a.last())
        .and_then(|p| p["point"].as_str())
        .unwrap_or_else(|| panic!("a point: {points}"))
        .to_string()
}

/// A real NBD client's verdict too: `qemu-img compare` of a file and an export (qemu-utils,
/// installed by .ci/run).
fn qemu_img_compare(file: &Path, uri: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(file)
        .arg(uri)
        .output()
        .expect("run qemu-img (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img compare {} {uri}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nbd(uri: &str) -> haven_nbd::Client {
    haven_nbd::Client::connect(uri).unwrap_or_else(|e| panic!("connect to {uri}: {e}"))
}

fn read_all(uri: &str, size: u64) -> Vec<u8> {
    let mut c = nbd(uri);
    let mut out = vec![0u8; size as usize];
    for (i, chunk) in out.chunks_mut(4 * MIB as usize).enumerate() {
        c.read_at(chunk, i as u64 * 4 * MIB)
            .expect("read the export");
    }
    out
}

/// What the workload at the recovery site writes through the export in the reprotect and
/// failback tests: 512 KiB at 16 MiB and 4 KiB at 2 MiB, flushed.
fn recovery_site_writes(uri: &str) {
    let mut e = nbd(uri);
    e.write_at(&vec![0xee; 512 << 10], 16 * MIB, false).unwrap();
    e.write_at(&vec![0xef; 4096], 2 * MIB, false).unwrap();
    e.flush().unwrap();
}

/// A hash of the whole replica image: it must not change while failed over.
fn sha(path: &Path) -> u128 {
    xxh3_128(&std::fs::read(path).expect("read the replica"))
}

fn block(fill: u8) -> Vec<u8> {
    vec![fill; 64 << 10]
}

fn export_uri(f: &Value) -> String {
    f["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap_or_else(|| panic!("an NBD URI per disk: {f}"))
        .to_string()
}

#[test]
fn a_planned_failover_loses_no_write_and_a_cancel_resumes_forward_replication() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = protected_tap(&mut c, 16 * MIB, 61);
    let replica = c.replica("config", "m1", "d0");

    phase("writes through the tap, the last ones acknowledged but never flushed");
    let u = c.tap_uri("m1", "d0");
    let mut w = nbd(&u);
    w.write_at(&block(0x11), 0, false).unwrap();
    w.flush().unwrap();
    for i in 1..16u64 {
        w.write_at(&block(0x20 + i as u8), i * MIB, false).unwrap();
    }

    phase("ctl failover: planned (the source is up), the tap goes read-only first");
    let f = c.ctl(&["failover", "m1"]);
    assert_eq!(f["stage"], "served", "{f}");
    assert_eq!(f["planned"], true, "the source was up: {f}");
    assert_eq!(f["state"], "failover-pending", "{f}");
    assert_eq!(f["point"]["name"], "planned failover", "{f}");
    let err = w
        .write_at(&block(0x99), 8 * MIB, false)
        .expect_err("the original disk takes no writes once failed over");
    eprintln!("a write to the source's tap now: {err}");
    drop(w);
    let m = c.machine("m1").unwrap();
    assert_eq!(m["state"], "failover-pending", "{m}");
    assert_eq!(m["recovery_state"], "failover-pending", "{m}");
    assert!(
        m["rpo_seconds"].is_null(),
        "no forward RPO while failed over: {m}"
    );

    phase("the export at the recovery site holds every acknowledged write, flushed or not");
    let uri = export_uri(&f);
    let source = std::fs::read(&disk).unwrap();
    assert!(
        read_all(&uri, 16 * MIB) == source,
        "the failover view equals the source disk byte for byte (zero data loss)"
    );
    qemu_img_compare(&disk, &uri);

    phase("writes at the recovery site go to the export's overlay, never to the replica");
    let before = sha(&replica);
    let mut e = nbd(&uri);
    e.write_at(&block(0xee), 4 * MIB, false).unwrap();
    e.flush().unwrap();
    let mut back = block(0);
    e.read_at(&mut back, 4 * MIB).unwrap();
    assert_eq!(back, block(0xee));
    drop(e);
    assert_eq!(
        sha(&replica),
        before,
        "the replica is untouched by the export's writes"
    );

    phase(
        "failover-change-point to the first point: its view is served, the earlier writes are gone",
    );
    let points = c.ctl(&["recovery-points", "m1"]);
    let first = points["points"][0]["point"].as_str().unwrap().to_string();
    let f2 = c.ctl(&["failover-change-point", "m1", "--point", &first]);
    assert_eq!(f2["stage"], "served", "{f2}");
    assert_eq!(f2["point"]["point"], first.as_str(), "{f2}");
    let mut e = nbd(&export_uri(&f2));
    let mut back = block(0);
    e.read_at(&mut back, 4 * MIB).unwrap();
    assert_ne!(
        back,
        block(0xee),
        "the writes made at the earlier point are discarded"
    );
    drop(e);

    phase("failover-cancel: back to protected; the tap takes writes; forward replication resumes");
    let done = c.ctl(&["failover-cancel", "m1"]);
    assert_eq!(done["stage"], "cancelled", "{done}");
    assert_eq!(
        sha(&replica),
        before,
        "the replica is as replication left it"
    );
    let mut w = wait_until(
        "the tap takes writes again",
        Duration::from_secs(20),
        || {
            let mut w = nbd(&u);
            w.write_at(&block(0x77), 9 * MIB, false).ok().map(|()| w)
        },
    );
    w.flush().unwrap();
    drop(w);
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &replica);
    let m = c.machine("m1").unwrap();
    assert_eq!(m["state"], "replicating", "{m}");
    c.assert_no_resync("m1", &m);
    let events = c.ctl(&["events"]).to_string();
    for what in [
        "failover started",
        "failover point changed",
        "failover cancelled",
    ] {
        assert!(
            events.contains(what),
            "`ctl events` lists {what:?}: {events}"
        );
    }
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_configuration_node_killed_during_a_planned_failover_resumes_it_without_losing_a_write() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = protected_tap(&mut c, 16 * MIB, 63);

    phase(
        "acknowledged writes, not flushed; ctl failover returns at once (no wait for the exports)",
    );
    let u = c.tap_uri("m1", "d0");
    let mut w = nbd(&u);
    for i in 0..8u64 {
        w.write_at(&block(0x60 + i as u8), i * MIB, false).unwrap();
    }
    drop(w);
    let out = c.ctl_output(&["failover", "m1", "--timeout", "0s"]);
    eprintln!(
        "ctl failover --timeout 0s: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    phase("SIGKILL of the configuration node (all roles) mid-failover, then a restart");
    c.kill("config");
    c.restart("config");
    let f = wait_until(
        "the failover completes after the restart",
        Duration::from_secs(60),
        || {
            let f = c.try_ctl(&["failover", "m1", "--timeout", "5s"]).ok()?;
            (f["stage"] == "served").then_some(f)
        },
    );
    assert_eq!(
        f["planned"], true,
        "still planned: the source kept reporting: {f}"
    );
    assert!(
        read_all(&export_uri(&f), 16 * MIB) == std::fs::read(&disk).unwrap(),
        "after the restart the export still holds every acknowledged write"
    );
    let err = nbd(&u).write_at(&block(1), 0, false);
    assert!(err.is_err(), "the source's tap stays read-only");
    let done = c.ctl(&["failover-cancel", "m1"]);
    assert_eq!(done["stage"], "cancelled", "{done}");
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
}

/// Makes `peers` the exact set `process` cuts both ways (its control file, replaced
/// atomically), and waits until it logs applying it.
fn cut(c: &Cluster, control: &Path, process: &str, peers: &[String]) {
    let text: String = peers.iter().map(|p| format!("{p} both\n")).collect();
    let tmp = control.with_extension("tmp");
    std::fs::write(&tmp, format!("# tests/failover.rs\n{text}")).unwrap();
    std::fs::rename(&tmp, control).unwrap();
    let mut sorted: Vec<String> = peers.iter().map(|p| format!("{p} both")).collect();
    sorted.sort();
    let expected = if sorted.is_empty() {
        "none".to_string()
    } else {
        sorted.join(", ")
    };
    wait_until(
        &format!("{process} applies partitions [{expected}]"),
        Duration::from_secs(10),
        || {
            const MARK: &str = "control file partitions now: ";
            let log = c.log(process);
            let line = log.lines().rev().find(|l| l.contains(MARK))?;
            let set = &line[line.find(MARK)? + MARK.len()..];
            (set.split(" path=").next()? == expected).then_some(())
        },
    );
}

#[test]
fn an_unplanned_failover_fences_a_process_server_that_comes_back_and_survives_a_restart() {
    let mut c = Cluster::new();
    phase("the recovery site: configuration and a master target; the primary: a process server (own partition file) and the agent");
    c.start_config_with(&["configuration"], &["--site", "dr"], vec![]);
    c.start_node_with("mt1", &["master-target"], &["--site", "dr"], vec![]);
    let control = c.path("ps1.partitions");
    c.start_node_with(
        "ps1",
        &["process"],
        &["--site", "primary"],
        vec![(
            "HAVEN_NET_FAULTS".into(),
            format!("seed=7,control={}", control.display()),
        )],
    );
    let disk = c.path("d0.img");
    make_disk(&disk, 16 * MIB, 62);
    c.start_tap_agent("m1", &disk, &[]);
    c.ctl(&["protect", "m1"]);
    let m = c.machine("m1").unwrap();
    assert_eq!(m["master_target"], "mt1", "{m}");
    assert_eq!(m["process_server"], "ps1", "{m}");
    c.wait_sync("m1", SYNC);
    let replica = c.replica("mt1", "m1", "d0");

    phase("W1 flushed and applied: a recovery point");
    let u = c.tap_uri("m1", "d0");
    let mut w = nbd(&u);
    w.write_at(&block(0x31), 2 * MIB, false).unwrap();
    w.flush().unwrap();
    drop(w);
    c.wait_sync("m1", SYNC);

    phase("the process server is cut from the master target and the configuration node; W2 reaches only its cache");
    cut(&c, &control, "ps1", &[c.addr("config"), c.addr("mt1")]);
    let mut w = nbd(&u);
    w.write_at(&block(0x42), 6 * MIB, false).unwrap();
    w.flush().unwrap();
    drop(w);
    // The agent's report says what the process server holds durably.
    wait_until(
        "the process server caches W2",
        Duration::from_secs(20),
        || {
            let m = c.machine("m1")?;
            (m["cached_seq"].as_u64()? > m["applied_seq"].as_u64()?).then_some(())
        },
    );

    phase("the primary site's agent dies; ctl failover turns unplanned once it stops reporting");
    c.kill("agent-m1");
    let f = c.ctl(&["failover", "m1", "--timeout", "60s"]);
    assert_eq!(f["stage"], "served", "{f}");
    assert_eq!(f["planned"], false, "{f}");
    let events = c.ctl(&["events"]).to_string();
    eprintln!("events: {events}");
    assert!(
        events.contains("unplanned"),
        "the failover says it is unplanned: {events}"
    );
    let uri = export_uri(&f);
    let view = read_all(&uri, 16 * MIB);
    assert_eq!(
        view[2 * MIB as usize],
        0x31,
        "W1 (applied before the failover) is in the view"
    );
    assert_ne!(
        view[6 * MIB as usize],
        0x42,
        "W2 never reached the recovery site"
    );

    phase("the process server comes back to the master target (still cut from the configuration node, so it ships): fenced");
    let before = sha(&replica);
    cut(&c, &control, "ps1", &[c.addr("config")]);
    wait_until(
        "the master target refuses the returning stream",
        Duration::from_secs(60),
        || {
            c.log("ps1")
                .contains("the forward stream is fenced")
                .then_some(())
        },
    );
    assert_eq!(
        sha(&replica),
        before,
        "nothing of the fenced stream was applied"
    );
    let view = read_all(&uri, 16 * MIB);
    assert_ne!(view[6 * MIB as usize], 0x42, "the view is unchanged");

    phase("writes at the recovery site, commit, then a master-target restart serves it again");
    let mut e = nbd(&uri);
    e.write_at(&block(0x5e), 10 * MIB, false).unwrap();
    e.flush().unwrap();
    drop(e);
    let done = c.ctl(&["failover-commit", "m1"]);
    assert_eq!(done["state"], "failed-over", "{done}");
    let out = c.ctl_output(&["failover-cancel", "m1"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "a committed failover cannot be cancelled: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.kill("mt1");
    c.restart("mt1");
    let f = wait_until(
        "the failover is served again",
        Duration::from_secs(60),
        || {
            let f = c.try_ctl(&["failover", "m1"]).ok()?;
            let served = f["stage"] == "served"
                && std::os::unix::net::UnixStream::connect(export_uri(&f).split("socket=").nth(1)?)
                    .is_ok();
            served.then_some(f)
        },
    );
    assert_eq!(f["state"], "failed-over", "{f}");
    let view = read_all(&export_uri(&f), 16 * MIB);
    assert_eq!(
        view[10 * MIB as usize],
        0x5e,
        "the flushed recovery-site write survived the restart"
    );
    assert_eq!(view[2 * MIB as usize], 0x31);
    assert_eq!(sha(&replica), before, "the replica is still only read");
}

#[test]
fn reprotect_makes_the_original_disk_equal_to_the_recovery_disk_sending_only_what_differs() {
    let mut c = Cluster::new();
    // No periodic reverse pass: the passes below are the test's own.
    c.start_config_with(&[], &["--reverse-every", "1h"], vec![]);
    let disk = protected_tap(&mut c, 32 * MIB, 64);
    let u = c.tap_uri("m1", "d0");
    let mut w = nbd(&u);
    w.write_at(&block(0x31), 2 * MIB, false).unwrap();
    w.flush().unwrap();
    drop(w);
    c.wait_sync("m1", SYNC);
    let p = newest_point(&c);

    phase("the original site goes down, with 256 KiB on its disk that never reached the replica");
    c.kill("agent-m1");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&vec![0x77; 256 << 10], 8 * MIB).unwrap();
        f.sync_all().unwrap();
    }

    phase("failover to the point, commit; 516 KiB written at the recovery site");
    let f = c
        .try_ctl(&["failover", "m1", "--point", &p, "--timeout", "30s"])
        .unwrap_or_else(|e| panic!("failover: {e}\n{}", tail_of(&c.log("config"))));
    assert_eq!(f["planned"], false, "{f}");
    c.ctl(&["failover-commit", "m1"]);
    let uri = export_uri(&f);
    recovery_site_writes(&uri);
    // Once the agent is seen gone (silent past the failure timeout), reprotect is refused.
    wait_until("the agent seen gone", Duration::from_secs(30), || {
        let m = c.machine("m1")?;
        (m["agent_last_seen_ms_ago"].as_u64()? > 5_500).then_some(())
    });
    let out = c.ctl_output(&["reprotect", "m1", "--timeout", "5s"]);
    assert_eq!(out.status.code(), Some(5), "refused without the agent");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agent for m1 is not connected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    phase("the original site's agent is back: its disk stays read-only; ctl reprotect");
    c.restart("agent-m1");
    c.wait_tap("m1", "d0");
    assert!(
        nbd(&u).write_at(&block(1), 0, false).is_err(),
        "the original disk takes no writes while failed over (persisted across the restart)"
    );
    let r = wait_until("reprotect", Duration::from_secs(60), || {
        c.try_ctl(&["reprotect", "m1", "--timeout", "60s"]).ok()
    });
    assert_eq!(r["state"], "reprotected", "{r}");
    let rev = &r["reverse"];
    assert_eq!(rev["bytes_compared"], 32 * MIB, "every block compared: {r}");
    // Exactly the differing blocks: 64 the original site wrote after the point (back to the
    // point's content), 128 + 1 written at the recovery site.
    assert_eq!(rev["blocks_written"], 64 + 128 + 1, "{r}");
    assert_eq!(rev["bytes_received"], (64 + 128 + 1) * 4096, "{r}");
    assert!(
        std::fs::read(&disk).unwrap() == read_all(&uri, 32 * MIB),
        "the original disk equals the recovery disk byte for byte"
    );
    qemu_img_compare(&disk, &uri);
    let events = c.ctl(&["events"]).to_string();
    assert!(events.contains("reprotected: pass 1"), "{events}");

    phase("another pass finds nothing to send");
    let r = c.ctl(&["reprotect", "m1"]);
    assert_eq!(r["reverse"]["pass"], 2, "{r}");
    assert_eq!(r["reverse"]["blocks_written"], 0, "{r}");
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_reprotect_goes_on_after_the_agent_and_then_the_master_target_are_killed() {
    let mut c = Cluster::new();
    c.start_two_sites();
    let disk = protected_tap(&mut c, 128 * MIB, 65);

    let mut w = nbd(&c.tap_uri("m1", "d0"));
    w.write_at(&block(0x31), 0, false).unwrap();
    w.flush().unwrap();
    drop(w);
    c.wait_sync("m1", SYNC);

    phase("unplanned failover to the newest point, commit, writes at the recovery site");
    c.kill("agent-m1");
    let p = newest_point(&c);
    let f = c.ctl(&["failover", "m1", "--point", &p]);
    c.ctl(&["failover-commit", "m1"]);
    let uri = export_uri(&f);
    let mut e = nbd(&uri);
    for i in 0..32u64 {
        e.write_at(&block(0x80 + i as u8), i * 4 * MIB, false)
            .unwrap();
    }
    e.flush().unwrap();
    drop(e);

    phase("reprotect starts; the agent is SIGKILLed at once, then started again");
    c.restart("agent-m1");
    c.wait_tap("m1", "d0");
    wait_until("reprotect accepted", Duration::from_secs(30), || {
        let out = c.ctl_output(&["reprotect", "m1", "--timeout", "0s"]);
        // Accepted: it then timed out waiting (exit 1), it was not refused (exit 5).
        (out.status.code() == Some(1)).then_some(())
    });
    c.kill("agent-m1");
    c.restart("agent-m1");
    c.wait_tap("m1", "d0");

    phase("the master target is SIGKILLed and started again while the agent works");
    c.kill("mt1");
    c.restart("mt1");
    let r = c
        .try_ctl(&["reprotect", "m1", "--timeout", "120s"])
        .unwrap_or_else(|e| panic!("reprotect: {e}\n{}", tail_of(&c.log("agent-m1"))));
    assert_eq!(r["state"], "reprotected", "{r}");
    assert_eq!(
        r["reverse"]["pass"], 1,
        "the same pass, carried out once the processes were back: {r}"
    );
    let f = c.ctl(&["failover", "m1"]);
    assert!(
        std::fs::read(&disk).unwrap() == read_all(&export_uri(&f), 128 * MIB),
        "the original disk equals the recovery disk"
    );
}

/// m1 failed over to its newest point with a write of its own site lost with it (256 KiB
/// written to the disk while the agent was down), committed, written at the recovery site
/// (512 KiB + 4 KiB), and reprotected. Returns (the disk, the export's URI).
fn failed_over_and_reprotected(
    c: &mut Cluster,
    size: u64,
    seed: u64,
) -> (std::path::PathBuf, String) {
    let disk = protected_tap(c, size, seed);
    let mut w = nbd(&c.tap_uri("m1", "d0"));
    w.write_at(&block(0x31), 2 * MIB, false).unwrap();
    w.flush().unwrap();
    drop(w);
    c.wait_sync("m1", SYNC);
    let p = newest_point(c);
    c.kill("agent-m1");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&vec![0x77; 256 << 10], 8 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    let f = c.ctl(&["failover", "m1", "--point", &p, "--timeout", "30s"]);
    c.ctl(&["failover-commit", "m1"]);
    let uri = export_uri(&f);
    recovery_site_writes(&uri);
    c.restart("agent-m1");
    c.wait_tap("m1", "d0");
    let r = wait_until("reprotect", Duration::from_secs(60), || {
        c.try_ctl(&["reprotect", "m1", "--timeout", "60s"]).ok()
    });
    assert_eq!(r["state"], "reprotected", "{r}");
    (disk, uri)
}

/// After failback: the original disk is the recovery disk as it was (`expected`), the
/// replica equals it, the exports are gone, and a write through the tap reaches the replica
/// with no full resync.
fn assert_home(c: &Cluster, disk: &Path, replica: &Path, uri: &str, expected: &[u8]) {
    assert!(
        std::fs::read(disk).unwrap() == expected,
        "the original disk equals the recovery disk as the failback quiesced it"
    );
    assert_identical(disk, replica);
    // The master target ends the exports once its next poll shows the machine protected
    // (they are read-only since the quiesce, so nothing can write to them meanwhile).
    wait_until(
        "the recovery-site export is no longer served",
        Duration::from_secs(10),
        || haven_nbd::Client::connect(uri).is_err().then_some(()),
    );
    let m = c.machine("m1").unwrap();
    assert_eq!(m["recovery_state"], "protected", "{m}");
    let mut w = nbd(&c.tap_uri("m1", "d0"));
    w.write_at(&block(0x5a), 24 * MIB, false)
        .expect("the original disk takes writes again");
    w.flush().unwrap();
    drop(w);
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", disk, replica);
    let m = c.machine("m1").unwrap();
    c.assert_no_resync("m1", &m);
    // The tap's sync pass on the rebased tables found nothing to send: what travelled since
    // the agent's start (it restarted for the reprotect) is the one new write and its points.
    let sent = m["raw_bytes_sent"].as_u64().unwrap();
    assert!(
        sent < 1 << 20,
        "only the new write travelled, not the disk: {m}"
    );
    assert!(sent >= 64 << 10, "the new write travelled: {m}");
}

#[test]
fn a_failback_brings_the_machine_home_with_only_the_last_changes_and_no_resync() {
    let mut c = Cluster::new();
    // No periodic reverse pass: the final pass is to carry the write below.
    c.start_config_with(&[], &["--reverse-every", "1h"], vec![]);
    let (disk, uri) = failed_over_and_reprotected(&mut c, 32 * MIB, 66);
    let replica = c.replica("config", "m1", "d0");

    phase("refusals: failback needs a reprotected machine");
    let out = c.ctl_output(&["failback", "nosuch"]);
    assert_eq!(out.status.code(), Some(5));

    phase("64 KiB more at the recovery site after the reprotect: the final pass carries them");
    let mut e = nbd(&uri);
    e.write_at(&block(0x99), 20 * MIB, false).unwrap();
    e.flush().unwrap();
    drop(e);
    let expected = read_all(&uri, 32 * MIB);
    assert!(
        std::fs::read(&disk).unwrap() != expected,
        "the original disk lacks the last recovery-site write before the failback"
    );

    phase("ctl failback");
    let b = c
        .try_ctl(&["failback", "m1", "--timeout", "120s"])
        .unwrap_or_else(|e| panic!("failback: {e}\n{}", tail_of(&c.log("config"))));
    assert_eq!(b["stage"], "failed-back", "{b}");
    assert_eq!(b["state"], "protected", "{b}");
    assert_eq!(b["reverse"]["pass"], 2, "the final reverse pass: {b}");
    assert_eq!(
        b["reverse"]["blocks_written"], 16,
        "the final pass carried exactly the 64 KiB written since the reprotect: {b}"
    );
    // The same agent and master target made the reprotect's pass: the final one is tracked
    // and compares only the blocks the recovery site wrote since (the reprotect compared all).
    assert_eq!(b["reverse"]["tracked"], true, "{b}");
    assert_eq!(b["reverse"]["bytes_compared"], 64 << 10, "{b}");
    // The replica holds the point (the 256 KiB the original site wrote after it never
    // reached it): it differs from the recovery disk by the recovery site's writes only,
    // and only they are compared (the overlay's bitmap; no journal record after the point).
    assert_eq!(
        b["failback"]["bytes_compared"],
        (512 << 10) + 4096 + (64 << 10),
        "{b}"
    );
    assert_eq!(
        b["failback"]["bytes_written"],
        (512 << 10) + 4096 + (64 << 10),
        "the replica took exactly the recovery site's writes: {b}"
    );
    assert_home(&c, &disk, &replica, &uri, &expected);
    let events = c.ctl(&["events"]).to_string();
    for e in [
        "failback started",
        "the recovery disks are read-only",
        "and rewrote 16 blocks (64 KiB)",
        "the replica equals the recovery disks",
        "failed back",
    ] {
        assert!(events.contains(e), "event {e:?}: {events}");
    }

    phase("the recovery point the failback made shows the state the machine came home with");
    let points = c.ctl(&["recovery-points", "m1"]).to_string();
    assert!(points.contains("\"failback\""), "{points}");

    phase("ctl failback again shows how it ended; a second failover cycle starts cleanly");
    let again = c.ctl(&["failback", "m1"]);
    assert_eq!(again["stage"], "failed-back", "{again}");
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_reprotected_machine_follows_the_recovery_disk_with_tracked_passes() {
    let mut c = Cluster::new();
    c.start_config_with(&[], &["--reverse-every", "1s"], vec![]);
    let (disk, uri) = failed_over_and_reprotected(&mut c, 32 * MIB, 68);

    phase("64 KiB written at the recovery site reach the original disk with no command");
    let mut e = nbd(&uri);
    e.write_at(&block(0x6b), 28 * MIB, false).unwrap();
    e.flush().unwrap();
    drop(e);
    let expected = read_all(&uri, 32 * MIB);
    wait_until("the original disk follows", Duration::from_secs(60), || {
        (std::fs::read(&disk).unwrap() == expected).then_some(())
    });
    // Passes go on; each compares only what the recovery site wrote since the one before
    // (the same agent and exports made the reprotect's pass), not the 32 MiB disk.
    let m = wait_until("a pass after it, reported", Duration::from_secs(60), || {
        let m = c.machine("m1")?;
        let r = &m["failover"]["reverse"];
        (r["done_pass"].as_u64()? >= 3 && r["done_pass"] == r["pass"]).then_some(m)
    });
    assert_eq!(m["recovery_state"], "reprotected", "{m}");
    let r = &m["failover"]["reverse"];
    assert_eq!(r["tracked"], true, "{m}");
    assert!(r["bytes_compared"].as_u64().unwrap() <= 64 << 10, "{m}");
    assert_eq!(r["error"], Value::Null, "{m}");
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--cluster", &c.config_addr, "--token-file"])
        .arg(c.admin_token())
        .arg("status")
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        status.contains("reverse: the original disks hold every recovery-site write from before")
            && status.contains(", tracked)"),
        "{status}"
    );
    let events = c.ctl(&["events"]).to_string();
    assert!(
        !events.contains("pass 3") && !events.contains("failed (the agent retries)"),
        "periodic passes are no events: {events}"
    );

    phase("failback: the final pass finds the disks equal; home with no resync");
    let b = c.ctl(&["failback", "m1", "--timeout", "120s"]);
    assert_eq!(b["stage"], "failed-back", "{b}");
    let replica = c.replica("config", "m1", "d0");
    assert_home(&c, &disk, &replica, &uri, &expected);
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_failback_resumes_after_the_master_target_the_agent_and_the_configuration_node_are_killed() {
    let mut c = Cluster::new();
    c.start_two_sites();
    let (disk, uri) = failed_over_and_reprotected(&mut c, 128 * MIB, 67);
    let replica = c.replica("mt1", "m1", "d0");
    let mut e = nbd(&uri);
    for i in 0..32u64 {
        e.write_at(&block(0x80 + i as u8), i * 4 * MIB, false)
            .unwrap();
    }
    e.flush().unwrap();
    drop(e);
    let expected = read_all(&uri, 128 * MIB);

    phase("failback starts; the master target, the agent and the configuration node are SIGKILLed and started again");
    let out = c.ctl_output(&["failback", "m1", "--timeout", "0s"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "accepted (then timed out waiting)"
    );
    c.kill("mt1");
    c.restart("mt1");
    c.kill("agent-m1");
    c.restart("agent-m1");
    c.wait_tap("m1", "d0");
    c.kill("config");
    c.restart("config");
    wait_until("failed back", Duration::from_secs(180), || {
        let m = c.machine("m1")?;
        (m["recovery_state"] == "protected").then_some(())
    });
    assert_home(&c, &disk, &replica, &uri, &expected);
    qemu_img_compare(&disk, &replica.display().to_string());
}
