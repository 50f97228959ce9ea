//! Sites: `haven node --site` and `haven agent --site`. A machine's process server is placed
//! at its site and its master target at another site when there is one; `ctl nodes` and
//! `ctl machines` show the sites, and the replica is where placement said.
mod common;

use std::time::Duration;

use common::*;
use haven_testkit::make_disk;

#[test]
fn the_master_target_goes_to_the_other_site_and_the_process_server_stays_home() {
    let mut c = Cluster::new();
    // The recovery site runs the configuration role and a master target.
    c.start_config_with(
        &["configuration", "master-target"],
        &["--site", "dr"],
        vec![],
    );
    // The primary site: a process server and a master target with more headroom.
    c.start_node_with("ps1", &["process"], &["--site", "primary"], vec![]);
    c.start_node_with(
        "mt-home",
        &["master-target"],
        &["--capacity", "1000"],
        vec![],
    );
    let nodes = c.nodes();
    let site = |n: &str| {
        nodes
            .iter()
            .find(|v| v["name"] == n)
            .map(|v| v["site"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(site("config").as_deref(), Some("dr"));
    assert_eq!(site("ps1").as_deref(), Some("primary"));
    assert_eq!(
        site("mt-home").as_deref(),
        Some("primary"),
        "the default site"
    );

    let disk = c.path("d0.img");
    make_disk(&disk, 8 << 20, 51);
    c.start_agent("m1", &[("d0", &disk)]);
    let m = c.machine("m1").unwrap();
    assert_eq!(m["site"], "primary", "{m}");
    c.ctl(&["protect", "m1"]);
    let m = c.machine("m1").unwrap();
    assert_eq!(m["process_server"], "ps1", "{m}");
    assert_eq!(
        m["master_target"], "config",
        "the replica lives at the other site: {m}"
    );
    c.wait_sync("m1", Duration::from_secs(120));
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
}
