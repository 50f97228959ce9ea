//! Seeded network faults on every link while replicating, with invariant checks.
//!
//! Every server process runs its QUIC over the fault-injecting socket (`HAVEN_NET_FAULTS`), so
//! every link (agent↔process server, process server↔master target, nodes↔configuration) sees
//! faults. The default seed is fixed, so the default test run is repeatable; the seed is
//! printed; `HAVEN_CHAOS_SEED=<n>` replays one, `HAVEN_CHAOS_SEED=random` explores.
mod common;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use rand::{rngs::StdRng, SeedableRng};

fn seed() -> u64 {
    match std::env::var("HAVEN_CHAOS_SEED").as_deref() {
        Ok("random") => rand::random(),
        Ok(s) => s.parse().expect("HAVEN_CHAOS_SEED is a number or `random`"),
        Err(_) => 1,
    }
}

/// Polls status and checks, until stopped: `applied_seq` of a machine never goes backwards
/// within an epoch. Returns the number of observations.
fn monitor(c: &Cluster, stop: &AtomicBool, machines: &[&str]) -> usize {
    let mut last: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut seen = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(ms) = c.try_ctl(&["machines"]) {
            for m in ms.as_array().into_iter().flatten() {
                let name = m["name"].as_str().unwrap_or_default().to_string();
                if !machines.contains(&name.as_str()) {
                    continue;
                }
                let (epoch, applied) = (m["epoch"].as_u64().unwrap_or(0), m["applied_seq"].as_u64().unwrap_or(0));
                if let Some((e, a)) = last.get(&name) {
                    assert!(epoch > *e || applied >= *a, "invariant: applied_seq of {name} went back from {a} to {applied} in epoch {epoch}");
                }
                last.insert(name, (epoch, applied));
                seen += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    seen
}

#[test]
fn packet_loss_duplication_reordering_and_corruption_on_every_link() {
    let seed = seed();
    eprintln!("chaos seed {seed} (replay: HAVEN_CHAOS_SEED={seed})");
    let faults = |n: u64| vec![("HAVEN_NET_FAULTS".to_string(), format!("seed={},drop=0.02,dup=0.02,delay=0.05,delay_max=20ms,corrupt=0.005", seed.wrapping_add(n)))];
    let mut c = Cluster::new();
    c.start_config_with(&["configuration"], &[], faults(1));
    c.start_node("ps1", &["process"], faults(2));
    c.start_node("mt1", &["master-target"], faults(3));
    let disk = c.path("disk.img");
    make_disk(&disk, 32 << 20, seed);
    c.start_agent("web01", &[("root", disk.as_path())]);
    c.ctl(&["protect", "web01"]);

    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let checker = s.spawn(|| monitor(&c, &stop, &["web01"]));
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..5 {
            random_writes(&disk, &mut rng, 20);
            std::thread::sleep(Duration::from_millis(300));
        }
        c.wait_sync("web01", Duration::from_secs(180));
        stop.store(true, Ordering::Relaxed);
        let seen = checker.join().expect("invariant checker");
        assert!(seen > 0, "the invariant checker observed nothing");
    });
    assert_identical(&disk, &c.replica("mt1", "web01", "root"));
    for name in ["config", "ps1", "mt1"] {
        assert!(c.log(name).contains("HAVEN_NET_FAULTS"), "{name} ran with injected faults");
    }
    c.assert_no_unexpected_errors(&[]);
}
