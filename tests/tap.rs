//! Tap capture through real NBD clients: `qemu-io` and `fio --ioengine=nbd` write through the
//! agent's export while it replicates; the replica must equal the disk after `wait-sync`,
//! including writes made during the initial sync, after a SIGKILL of the agent, and through a
//! full retention buffer.
mod common;

use std::{process::Command, time::Duration};

use common::*;
use haven_testkit::make_disk;

const MIB: u64 = 1 << 20;
const SYNC: Duration = Duration::from_secs(120);

#[test]
fn qemu_io_writes_through_the_tap_during_and_after_the_initial_sync_reach_the_replica() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    make_disk(&disk, 64 * MIB, 21);
    c.start_tap_agent("m1", &disk, &[]);
    let u = c.tap_uri("m1", "d0");

    phase("writes before protection reach the disk; the sync pass sends them");
    qemu_io(&u, &["write -P 0x5a 0 64k", "flush"]);
    c.ctl(&["protect", "m1"]);

    phase("writes during the initial sync: never overwritten by older data the pass read");
    for i in 0..32u64 {
        // Spread over the disk, so the pass meets some before and some after they land.
        let off = (i * 2 * MIB + 4096 * (i % 7)).to_string();
        qemu_io(&u, &[&format!("write -P {} {off} 12k", 0x10 + i), "flush"]);
    }
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));

    phase("unaligned writes, write-zeroes and trim after the sync");
    qemu_io(
        &u,
        &[
            "write -P 0xc3 1000 3000",
            "write -z 3M 1M",
            "discard 8M 64k",
            "write -P 0x77 63M 1M",
            "read -P 0x77 63M 1M",
            "flush",
        ],
    );
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn fio_random_writes_of_mixed_sizes_with_several_jobs_replicate_exactly() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    make_disk(&disk, 64 * MIB, 22);
    c.start_tap_agent("m1", &disk, &[]);
    c.ctl(&["protect", "m1"]);
    c.wait_sync("m1", SYNC);

    phase("fio: 4 jobs of random writes (4k..64k), verified by crc32c");
    let out = Command::new("fio")
        .args([
            "--name=tap",
            "--ioengine=nbd",
            &format!("--uri={}", c.tap_uri("m1", "d0")),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=8",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--fsync=64",
            "--group_reporting",
        ])
        .output()
        .expect("fio must be installed (apt-get install fio)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fio failed: {text}");
    assert!(text.contains("err= 0"), "{text}");
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_killed_tap_agent_loses_no_acknowledged_write() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    make_disk(&disk, 32 * MIB, 23);
    c.start_tap_agent("m1", &disk, &[]);
    c.ctl(&["protect", "m1"]);
    c.wait_sync("m1", SYNC);

    phase("acknowledged writes, then SIGKILL of the agent before they can be applied");
    for i in 0..8u64 {
        qemu_io(
            &c.tap_uri("m1", "d0"),
            &[&format!("write -P {} {} 256k", 0x40 + i, i * 3 * MIB)],
        );
    }
    c.kill("agent-m1");
    phase("the restarted agent resends what may not have been applied");
    c.restart("agent-m1");
    c.wait_tap("m1", "d0");
    qemu_io(&c.tap_uri("m1", "d0"), &["write -P 0x99 31M 64k", "flush"]);
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
}

#[test]
fn with_the_configuration_node_down_a_restarted_tap_holds_only_its_first_writes_briefly() {
    let mut c = Cluster::new();
    // The configuration node alone, so killing it leaves the data path's nodes running.
    c.start_config_with(&["configuration"], &[], vec![]);
    c.start_node("n1", &["process", "master-target"], vec![]);
    let disk = c.path("d0.img");
    make_disk(&disk, 16 * MIB, 25);
    c.start_tap_agent("m1", &disk, &[]);
    c.ctl(&["protect", "m1"]);
    c.wait_sync("m1", SYNC);

    phase("the configuration node goes down; the agent restarts without it");
    c.kill("config");
    c.kill("agent-m1");
    c.restart("agent-m1");
    c.wait_tap("m1", "d0");
    let u = c.tap_uri("m1", "d0");
    let mut w = haven_nbd::Client::connect(&u).unwrap();
    let t = std::time::Instant::now();
    w.write_at(&[0x11; 4096], 0, false)
        .expect("the persisted state says writable: the write is taken");
    let first = t.elapsed();
    let t = std::time::Instant::now();
    for i in 1..50u64 {
        w.write_at(&[0x11; 4096], i * 4096, false).unwrap();
    }
    w.flush().unwrap();
    let rest = t.elapsed();
    eprintln!("first write after the restart {first:?} (held for the configuration node); 49 more and a flush {rest:?}");
    assert!(
        first <= Duration::from_secs(12),
        "the startup hold is bounded (10 s): {first:?}"
    );
    assert!(
        rest < Duration::from_secs(5),
        "only the first writes wait: after the hold, writes go through at once ({rest:?} for 49)"
    );
}

#[test]
fn a_full_retention_buffer_holds_writers_briefly_then_resyncs_dirty_regions() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    make_disk(&disk, 64 * MIB, 24);
    // A buffer of 2 MiB overflows at once under 32 MiB of writes.
    c.start_tap_agent("m1", &disk, &["--retention-size", "2MiB"]);
    c.ctl(&["protect", "m1"]);
    c.wait_sync("m1", SYNC);

    // A second writer of small writes runs through the whole overflow and resync and records
    // how long each write waited: the tap may hold a writer briefly (HOLD_MAX, 500 ms), never
    // for the length of the outage or of the resync (which held it 1.3 s when the resync took
    // the order lock for the whole backlog).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let latencies = {
        let (u, stop) = (c.tap_uri("m1", "d0"), stop.clone());
        std::thread::spawn(move || {
            let mut nbd = haven_nbd::Client::connect(&u).unwrap();
            let mut worst = vec![];
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::time::Instant::now();
                nbd.write_at(&[0x5a; 4096], 60 * MIB + (i % 1024) * 4096, false)
                    .unwrap();
                worst.push(t.elapsed());
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            nbd.flush().unwrap();
            worst
        })
    };

    phase("the node is down: nothing is applied, so 32 MiB of writes overflow a 2 MiB buffer");
    c.kill("config");
    let started = std::time::Instant::now();
    qemu_io(
        &c.tap_uri("m1", "d0"),
        &["write -P 0x61 0 16M", "write -P 0x62 40M 16M", "flush"],
    );
    let took = started.elapsed();
    // The writer is held at most briefly per write, never until the node is back.
    assert!(took < Duration::from_secs(30), "the writer waited {took:?}");
    assert!(
        c.log("agent-m1").contains("retention buffer full"),
        "the overflow is logged"
    );
    phase("the node is back: the dirty regions are resent while the small writer goes on");
    c.restart("config");
    c.wait_sync("m1", SYNC);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut lat = latencies.join().unwrap();
    lat.sort_unstable();
    let (p99, max) = (lat[lat.len() * 99 / 100], *lat.last().unwrap());
    eprintln!(
        "small writes during the overflow and resync: {} writes, p99 {p99:?}, max {max:?}",
        lat.len()
    );
    assert!(
        max < Duration::from_millis(1000),
        "a write waited {max:?} (HOLD_MAX is 500 ms)"
    );
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
}
