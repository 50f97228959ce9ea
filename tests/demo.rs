//! The README's first command: `haven demo` on a small disk must run end to end and print
//! each verification it makes (replica equal to the source, the test-failover view of a point
//! equal to the disk as it was then, cleanup, the failover, cancel, reprotect and failback steps) and exit 0.
use std::process::Command;

#[test]
fn the_demo_replicates_lists_points_drills_one_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["demo", "--disk-size", "16MiB", "--write-for", "2s", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "through the tap",
        "is byte-identical to the source",
        "recovery points of demo-vm",
        "verified: the view is byte-identical to the disk as it was at that point",
        "test-failover-cleanup: demo-vm: test failover ended",
        "verified: the recovery-site export is byte-identical to the source disk",
        "the replica is unchanged",
        "forward replication resumed",
        "reprotect pass 1: compared",
        "verified: the original disk is byte-identical to the recovery disk",
        "failed back: protected from its own site again",
        "verified: the original disk, the recovery disk and the replica are byte-identical",
        "no full resync",
        "demo OK",
    ] {
        assert!(
            stdout.contains(line),
            "the demo did not print {line:?}:\n{stdout}"
        );
    }
    // The drill is gone: no overlay left behind.
    assert!(!dir.path().join("node/drills/demo-vm").exists());
}
