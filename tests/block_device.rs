//! A disk that is a real block device (a loop device), where the machine allows it.
mod common;

use std::{os::unix::fs::FileExt, process::Command, time::Duration};

use common::*;
use haven_testkit::{make_disk, random_writes};
use rand::{rngs::StdRng, SeedableRng};

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_block_device_replicates_like_a_file() {
    let mut c = Cluster::new();
    let backing = c.path("backing.img");
    make_disk(&backing, 32 << 20, 5);
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            eprintln!(
                "SKIPPED: losetup is not permitted here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: losetup is not available: {e}");
            return;
        }
    };
    let dev_path = std::path::PathBuf::from(&dev);
    let _guard = Loop(dev);
    c.start_config(&[], vec![]);
    c.start_agent("blk01", &[("root", dev_path.as_path())]);
    let m = c.machine("blk01").unwrap();
    assert_eq!(
        m["disks"][0]["size_bytes"],
        32u64 << 20,
        "the block device's size is discovered"
    );
    c.ctl(&["protect", "blk01"]);
    c.wait_sync("blk01", Duration::from_secs(120));
    c.assert_replica("blk01", &dev_path, &c.replica("config", "blk01", "root"));

    phase("writes through the block device");
    random_writes(&dev_path, &mut StdRng::seed_from_u64(6), 30);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev_path)
        .unwrap();
    f.write_all_at(b"written through /dev/loop", 12345).unwrap();
    f.sync_all().unwrap();
    c.wait_sync("blk01", Duration::from_secs(120));
    c.assert_replica("blk01", &dev_path, &c.replica("config", "blk01", "root"));
    c.assert_no_unexpected_errors(&[]);
}
