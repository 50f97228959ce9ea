//! Replicas against their sources, byte for byte (`cmp`, and `qemu-img compare` where the
//! tests find it installed).

use std::{
    path::Path,
    process::{Command, Output},
};

use crate::Res;

/// `cmp a b`: its exit status says whether they are equal, its output where they differ.
fn cmp(a: &Path, b: &Path) -> std::io::Result<Output> {
    Command::new("cmp").arg(a).arg(b).output()
}

/// Whether two files are byte-identical (`cmp`).
pub fn identical(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .expect("run cmp")
        .success()
}

/// Fails the test unless `a` and `b` are byte-identical, by `cmp` and, when it is installed,
/// by `qemu-img compare` too.
pub fn assert_identical(a: &Path, b: &Path) {
    let out = cmp(a, b).expect("run cmp");
    assert!(
        out.status.success(),
        "cmp {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Ok(q) = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .status()
    {
        assert!(
            q.success(),
            "qemu-img compare {} {} reports a difference",
            a.display(),
            b.display()
        );
    }
}

/// `cmp` of replica against source, for a bench: the benchmark of a wrong result is
/// worthless.
pub fn verify_same(source: &Path, replica: &Path, what: &str) -> Res<()> {
    let out = cmp(source, replica).map_err(|e| format!("run cmp: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "REPLICA MISMATCH after {what}: `cmp {} {}` says: {}{}",
            source.display(),
            replica.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
