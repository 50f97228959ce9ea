//! A disk that is a real block device (a loop device), where the machine allows it.
mod common;

use std::{os::unix::fs::FileExt, time::Duration};

use common::*;
use haven_testkit::{make_disk, random_writes};
use rand::{rngs::StdRng, SeedableRng};

#[test]
fn a_block_device_replicates_like_a_file() {
    let mut c = Cluster::new();
    let backing = c.path("backing.img");
    make_disk(&backing, 32 << 20, 5);
    let Some(dev) = LoopDevice::attach(&backing) else {
        return;
    };
    let dev_path = dev.path();
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
