//! Recovery points and test failover through the CLI, against real processes: a tap agent
//! whose flushes are points, `ctl recovery-points`, `ctl test-failover` served over NBD (read
//! with `qemu-io`) and written as images (`--export`, compared with `cmp` against a copy of the
//! disk taken at the point), writes to the drill that never reach the replica, replication
//! going on during the drill, a master-target restart during a drill, and cleanup.
mod common;

use std::{path::Path, process::Command, time::Duration};

use common::*;
use haven_testkit::{identical, make_disk};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SYNC: Duration = Duration::from_secs(120);

fn points(c: &Cluster, m: &str) -> Value {
    c.ctl(&["recovery-points", m])
}

/// The id of the newest point.
fn latest_point(c: &Cluster, m: &str) -> String {
    let p = points(c, m);
    p["points"]
        .as_array()
        .and_then(|a| a.last())
        .and_then(|p| p["point"].as_str())
        .unwrap_or_else(|| panic!("no point: {p}"))
        .to_string()
}

#[test]
fn a_test_failover_serves_a_point_while_replication_goes_on_and_never_touches_the_replica() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    make_disk(&disk, 32 * MIB, 31);
    c.start_tap_agent("m1", &disk, &[]);
    c.ctl(&["protect", "m1"]);
    c.wait_sync("m1", SYNC);
    let u = c.tap_uri("m1", "d0");

    phase("point A: a write and a flush; the disk as it was then is kept aside");
    qemu_io(&u, &["write -P 0xa1 0 1M", "flush"]);
    c.wait_sync("m1", SYNC);
    let at_a = c.path("at-a.img");
    std::fs::copy(&disk, &at_a).unwrap();
    let a = latest_point(&c, "m1");
    let listed = points(&c, "m1");
    let pa = listed["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["point"] == a.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        pa["kind"], "crash",
        "a flush of the tap is crash-consistent: {pa}"
    );
    assert!(
        listed["retention_ms"].as_u64() == Some(24 * 3600 * 1000),
        "{listed}"
    );

    phase("point B: the same range rewritten");
    qemu_io(
        &u,
        &["write -P 0xb2 0 1M", "write -P 0xb3 20M 64k", "flush"],
    );
    c.wait_sync("m1", SYNC);
    let b = latest_point(&c, "m1");
    assert_ne!(a, b);

    phase("test failover of A: its view over NBD holds A's data, not B's");
    let drill: Value = c.ctl(&["test-failover", "m1", "--point", &a]);
    assert_eq!(drill["point"]["point"], a.as_str(), "{drill}");
    let view_uri = drill["disks"][0]["nbd_uri"]
        .as_str()
        .expect("nbd_uri")
        .to_string();
    assert_eq!(drill["disks"][0]["disk"], "d0");
    qemu_io(&view_uri, &["read -P 0xa1 0 1M"]);
    // The whole view equals the disk as it was at A.
    let copy = c.path("view-a.img");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &view_uri])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        identical(&copy, &at_a),
        "the view of A is the disk as it was at A"
    );
    // Status shows the drill once the master target has reported it.
    haven_testkit::wait_until("status shows the drill", Duration::from_secs(30), || {
        let m = c.machine("m1")?;
        (m["test_failover"] == a.as_str()).then_some(())
    });

    phase("the drill writes to its overlay; the replica never sees it");
    qemu_io(
        &view_uri,
        &["write -P 0xee 4096 8k", "flush", "read -P 0xee 4096 8k"],
    );
    phase("replication goes on during the drill");
    qemu_io(&u, &["write -P 0xc4 10M 1M", "flush"]);
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
    qemu_io(&view_uri, &["read -P 0xa1 0 4k", "read -P 0xee 4096 8k"]);

    phase("a master-target restart: the drill is served again with what it flushed");
    c.kill("config");
    c.restart("config");
    haven_testkit::wait_until("the drill served again", Duration::from_secs(60), || {
        let m = c.machine("m1")?;
        (m["test_failover"] == a.as_str()).then_some(())
    });
    qemu_io(&view_uri, &["read -P 0xee 4096 8k", "read -P 0xa1 16k 64k"]);

    phase("--export writes the view of A as a sparse image equal to the disk at A");
    let dir = c.path("export");
    let exported: Value = c.ctl(&[
        "test-failover",
        "m1",
        "--point",
        &a,
        "--export",
        dir.to_str().unwrap(),
    ]);
    let img = exported["disks"][0]["image"].as_str().unwrap().to_string();
    assert_eq!(Path::new(&img), dir.join("d0.img"));
    assert!(
        identical(Path::new(&img), &at_a),
        "the exported image is the disk at A"
    );

    phase("cleanup says what it discarded; the replica is as replication made it");
    let cleaned: Value = c.ctl(&["test-failover-cleanup", "m1"]);
    // 8 KiB the drill wrote (and flushed, so it outlived the restart) are discarded.
    assert!(
        cleaned["overlay_bytes"].as_u64().unwrap() >= 8192,
        "{cleaned}"
    );
    assert!(!c.path("config/drills/m1").exists());
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
    // Nothing to clean is an error, not a success with nothing done.
    let again = c.ctl_output(&["test-failover-cleanup", "m1"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no test failover of m1 is active"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // A point that does not exist is refused with the reason.
    let bad = c.ctl_output(&["test-failover", "m1", "--point", "999999999"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no recovery point 999999999"));
}
