//! Partitions at the network level: the nodes run in separate network namespaces joined by
//! veth pairs, and a partition is a link taken down (`ip link set DEV down`) for longer than
//! the QUIC idle timeout (10 s), then brought back up. Unlike `tests/partitions.rs` nothing
//! in haven knows about the cut: packets vanish in the kernel.
//!
//! Needs root and `ip netns` (iproute2). Where that is not permitted the test prints why it
//! skipped and passes.
//!
//! The topology, a triangle of veth pairs with private addresses 10.213.X.0/24 picked per
//! run (X free on this machine), and names that contain the test's pid:
//!
//! ```text
//!   recovery site (the test's own namespace): configuration node, master target mt1
//!        |  WAN  .1 / .2                         \  MGMT .1 / .2
//!   namespace "primary": process server ps1 --- LAN .1 / .2 ------  namespace "machine": agent
//! ```
//!
//! Every node listens on, and advertises, its WAN address (`--listen`; `--advertise`
//! defaults to it), so the process server and the master target talk over the WAN. The agent
//! reaches the configuration node over MGMT and the process server over LAN through /32
//! routes in its namespace; each namespace answers ARP for any of its own addresses. `ctl`
//! runs in the test's namespace and dials the configuration node's WAN address locally.
//!
//! Only the primary site's ends of the WAN and the LAN are ever taken down: downing an interface
//! deletes the routes through it and bringing it up restores only its own subnet's route, so
//! the machine namespace's ends, which carry the /32 routes, stay up (they lose their
//! carrier, their routes stay).
mod common;

use std::{
    io::Write,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use common::*;
use haven_testkit::{make_disk, random_writes, u64_of, wait_until};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::Value;

const DISK: u64 = 16 << 20;
const SYNC: Duration = Duration::from_secs(60);
/// Nodes and agents report every 0.5 s; a write is captured within the 1 s scan interval.
const REPORTED: Duration = Duration::from_secs(10);

/// Runs `ip ARGS` (`args` split at whitespace: names and addresses here have none); the
/// error is `ip`'s own message.
fn ip(args: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {args}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_ok(args: &str) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// The effective uid, from /proc/self/status.
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// A veth pair: `a` on one side, `b` on the other, with `net.1` on `a` and `net.2` on `b`.
struct Link {
    a: String,
    b: String,
    /// `10.213.X`
    net: String,
}

impl Link {
    fn addr(&self, host: u8) -> String {
        format!("{}.{host}", self.net)
    }
}

/// Two namespaces and three veth pairs, deleted on drop (a panic included).
struct Topology {
    primary: String,
    machine: String,
    wan: Link,
    mgmt: Link,
    lan: Link,
    netns: Vec<String>,
    root_links: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; a namespace's own ends go with it.
        for l in &self.root_links {
            if let Err(e) = ip(&format!("link del {l}")) {
                eprintln!("cleanup: {e}");
            }
        }
        for ns in &self.netns {
            if let Err(e) = ip(&format!("netns del {ns}")) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Three consecutive free /24s in 10.213.0.0/16: no address or route of this machine in them.
fn free_subnets() -> Result<[String; 3], String> {
    let used = ip("-4 -o addr show")? + &ip("-4 route show table all")?;
    let start = std::process::id() % 84;
    for k in 0..84 {
        let x = (start + k) % 84 * 3;
        let nets = [0, 1, 2].map(|i| format!("10.213.{}", x + i));
        if nets.iter().all(|n| !used.contains(&format!("{n}."))) {
            return Ok(nets);
        }
    }
    Err("no three free /24s in 10.213.0.0/16".into())
}

impl Topology {
    fn create() -> Result<Topology, String> {
        static RUN: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        );
        let [wan, mgmt, lan] = free_subnets()?;
        // Interface names have at most 15 characters: "hv" + pid (≤ 7 digits) + run + 2.
        let link = |tag: &str, net: String| Link {
            a: format!("hv{id}{tag}0"),
            b: format!("hv{id}{tag}1"),
            net,
        };
        let mut t = Topology {
            primary: format!("haven-{id}-primary"),
            machine: format!("haven-{id}-machine"),
            wan: link("w", wan),
            mgmt: link("m", mgmt),
            lan: link("l", lan),
            netns: vec![],
            root_links: vec![],
        };
        let (primary, machine) = (t.primary.clone(), t.machine.clone());
        for ns in [&primary, &machine] {
            ip(&format!("netns add {ns}"))?;
            t.netns.push(ns.clone());
            ip(&format!("-n {ns} link set lo up"))?;
        }
        // `ip netns exec` needs to mount in a new mount namespace: check it works here.
        ip(&format!("netns exec {primary} true"))?;
        // WAN: recovery site (here) <-> primary; MGMT: here <-> machine; LAN: primary <-> machine.
        for (l, far) in [(&t.wan, &primary), (&t.mgmt, &machine)] {
            ip(&format!(
                "link add {} type veth peer name {} netns {far}",
                l.a, l.b
            ))?;
            t.root_links.push(l.a.clone());
            ip(&format!("addr add {}/24 dev {}", l.addr(1), l.a))?;
            ip(&format!("link set {} up", l.a))?;
            ip(&format!("-n {far} addr add {}/24 dev {}", l.addr(2), l.b))?;
            ip(&format!("-n {far} link set {} up", l.b))?;
        }
        let l = &t.lan;
        ip(&format!(
            "-n {primary} link add {} type veth peer name {} netns {machine}",
            l.a, l.b
        ))?;
        ip(&format!(
            "-n {primary} addr add {}/24 dev {}",
            l.addr(1),
            l.a
        ))?;
        ip(&format!("-n {primary} link set {} up", l.a))?;
        ip(&format!(
            "-n {machine} addr add {}/24 dev {}",
            l.addr(2),
            l.b
        ))?;
        ip(&format!("-n {machine} link set {} up", l.b))?;
        // The agent reaches the configuration node over MGMT, the process server over LAN.
        let (config, ps) = (t.wan.addr(1), t.wan.addr(2));
        ip(&format!(
            "-n {machine} route add {config}/32 dev {}",
            t.mgmt.b
        ))?;
        ip(&format!("-n {machine} route add {ps}/32 dev {}", t.lan.b))?;
        Ok(t)
    }

    fn recovery_site(&self) -> Host {
        Host {
            netns: None,
            ip: self.wan.addr(1),
        }
    }

    fn primary_site(&self) -> Host {
        Host {
            netns: Some(self.primary.clone()),
            ip: self.wan.addr(2),
        }
    }

    fn machine_host(&self) -> Host {
        Host {
            netns: Some(self.machine.clone()),
            // An agent does not listen.
            ip: self.lan.addr(2),
        }
    }

    /// Sets the primary site's end of the WAN (`wan`) or of the LAN down or up.
    fn set_primary_end(&self, wan: bool, up: bool) {
        let dev = if wan { &self.wan.b } else { &self.lan.a };
        let state = if up { "up" } else { "down" };
        ip_ok(&format!("-n {} link set {dev} {state}", self.primary));
        // The far end sees the carrier go (or come back).
        let far = if wan {
            ip_ok(&format!("-o link show {}", self.wan.a))
        } else {
            ip_ok(&format!("-n {} -o link show {}", self.machine, self.lan.b))
        };
        assert_eq!(
            !far.contains("NO-CARRIER"),
            up,
            "far end of the link after `link set {dev} {state}`: {far}"
        );
    }
}

/// Root and a working `ip netns`, or why not.
fn topology_or_skip() -> Option<Topology> {
    let reason = match euid() {
        Some(0) => match Topology::create() {
            Ok(t) => return Some(t),
            Err(e) => e,
        },
        Some(uid) => format!("needs root to create network namespaces (euid {uid})"),
        None => "cannot read the effective uid from /proc/self/status".into(),
    };
    // Straight to stderr, not `eprintln!`: the test harness hides what a passing test prints.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED netns test: network-namespace partitions not run here: {reason}"
    );
    None
}

// Drop order: the processes (in `c`) die before their namespaces go.
struct Net {
    c: Cluster,
    topo: Topology,
    disk: PathBuf,
    rng: StdRng,
}

impl Net {
    fn write_some(&mut self, count: usize) -> u64 {
        random_writes(&self.disk, &mut self.rng, count)
    }

    fn machine(&self) -> Value {
        self.c.machine("web01").expect("machine web01 listed")
    }

    /// Waits until the machine's status satisfies `f`.
    fn wait_machine(&self, what: &str, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
        wait_until(what, timeout, || {
            let m = self.c.machine("web01")?;
            f(&m).then_some(m)
        })
    }

    fn node_alive(&self, name: &str) -> Option<bool> {
        self.c
            .nodes()
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["alive"] == true)
    }

    /// Everything written converges without a new epoch (a full resync). Returns the status,
    /// everything captured cached and applied.
    fn converge(&mut self) -> Value {
        self.write_some(10);
        self.c.wait_sync("web01", SYNC);
        self.c
            .assert_replica("web01", &self.disk, &self.c.replica("mt1", "web01", "root"));
        // The status is built from reports that may lag by a long poll (1 s): poll for it.
        let m = self.wait_machine(
            "status: replicating, everything captured cached and applied",
            REPORTED,
            |m| {
                m["state"] == "replicating"
                    && u64_of(m, "cached_seq") == u64_of(m, "captured_seq")
                    && u64_of(m, "applied_seq") == u64_of(m, "captured_seq")
            },
        );
        self.c.assert_no_resync("web01", &m);
        self.c.assert_running();
        m
    }
}

#[test]
fn sites_partitioned_by_taking_veth_links_down_longer_than_the_idle_timeout() {
    let Some(topo) = topology_or_skip() else {
        return;
    };
    let started = Instant::now();
    let mut c = Cluster::new();
    phase(&format!(
        "recovery site (here, {}): configuration node + mt1; namespace {} ({}): ps1; namespace {}: agent",
        topo.wan.addr(1),
        topo.primary,
        topo.wan.addr(2),
        topo.machine
    ));
    c.start_config_at(&topo.recovery_site(), &["configuration"], &[], vec![]);
    c.start_node_at(
        "mt1",
        &topo.recovery_site(),
        &["master-target"],
        &[],
        vec![],
    );
    c.start_node_at("ps1", &topo.primary_site(), &["process"], &[], vec![]);
    let disk = c.path("disk.img");
    make_disk(&disk, DISK, 40);
    c.start_agent_at(
        "web01",
        &topo.machine_host(),
        &[("root", disk.as_path())],
        vec![],
    );
    // The processes really are in their namespaces, and advertise their WAN addresses.
    for (proc, ns) in [("ps1", &topo.primary), ("agent-web01", &topo.machine)] {
        let pid = c.pid(proc).to_string();
        assert_eq!(
            ip_ok(&format!("netns identify {pid}")).trim(),
            ns.as_str(),
            "{proc} runs in namespace {ns}"
        );
    }
    for (node, addr) in [("ps1", topo.wan.addr(2)), ("mt1", topo.wan.addr(1))] {
        let n = c.nodes();
        let n = n.iter().find(|n| n["name"] == node).expect("node listed");
        assert!(
            n["addr"].as_str().unwrap().starts_with(&format!("{addr}:")),
            "{node} advertises its WAN address {addr}: {n}"
        );
    }
    c.ctl(&["protect", "web01"]);
    c.wait_sync("web01", SYNC);
    c.assert_replica("web01", &disk, &c.replica("mt1", "web01", "root"));
    let mut n = Net {
        c,
        topo,
        disk,
        rng: StdRng::seed_from_u64(140),
    };
    let before = n.converge();
    eprintln!("initial sync done after {:?}", started.elapsed());

    phase(
        "WAN down at the primary site: ps1 cut from mt1 and the configuration node; write during the cut",
    );
    n.topo.set_primary_end(true, false);
    let since = Instant::now();
    n.write_some(20);
    // The agent still reports over MGMT: ps1 caches (the agent's acknowledgements show it),
    // nothing reaches mt1, and the configuration node stops hearing from ps1.
    let m1 = n.wait_machine(
        "writes captured and cached but not applied; ps1 not reporting",
        CUT,
        |m| {
            u64_of(m, "captured_seq") > u64_of(&before, "captured_seq")
                && u64_of(m, "cached_seq") > u64_of(&before, "cached_seq")
                && u64_of(m, "applied_seq") == u64_of(&before, "applied_seq")
                && m["degraded_reason"] == "process server ps1 is not reporting"
        },
    );
    assert_eq!(n.node_alive("ps1"), Some(false), "ps1 silent");
    assert_eq!(n.node_alive("mt1"), Some(true), "mt1 still reports");
    eprintln!("{:?} into the cut: {m1}", since.elapsed());
    hold(since, AFTER_IDLE);
    // After the idle timeout: ps1 still takes and caches what the agent sends.
    n.write_some(20);
    let m2 = n.wait_machine(
        "writes after the idle timeout captured and cached",
        REPORTED,
        |m| {
            u64_of(m, "captured_seq") > u64_of(&m1, "captured_seq")
                && u64_of(m, "cached_seq") > u64_of(&m1, "cached_seq")
        },
    );
    hold(since, CUT);
    let m = n.machine();
    assert_eq!(
        u64_of(&m, "applied_seq"),
        u64_of(&before, "applied_seq"),
        "nothing reached mt1 through the cut: {m}"
    );
    eprintln!("{:?} into the cut: {m2}", since.elapsed());

    phase("WAN up; ps1 reports again and replication converges");
    n.topo.set_primary_end(true, true);
    wait_until("ps1 alive again", SYNC, || {
        (n.node_alive("ps1")? && n.node_alive("mt1")?).then_some(())
    });
    let before = n.converge();
    eprintln!("WAN healed and converged after {:?}", started.elapsed());

    phase("LAN down at the primary site: the agent cut from ps1; write during the cut");
    n.topo.set_primary_end(false, false);
    let since = Instant::now();
    n.write_some(20);
    // The agent captures the writes but cannot hand them to ps1; it still reports over MGMT.
    let m1 = n.wait_machine("writes captured but not cached", CUT, |m| {
        u64_of(m, "captured_seq") > u64_of(&before, "captured_seq")
            && u64_of(m, "cached_seq") == u64_of(&before, "cached_seq")
    });
    eprintln!("{:?} into the cut: {m1}", since.elapsed());
    hold(since, AFTER_IDLE);
    n.write_some(20);
    // Past the idle timeout the agent's stream is gone, and it says so over MGMT.
    let m2 = n.wait_machine(
        "writes after the idle timeout captured; the agent reports its stream lost",
        REPORTED,
        |m| {
            u64_of(m, "captured_seq") > u64_of(&m1, "captured_seq")
                && m["state"] == "degraded"
                && m["degraded_reason"] != "agent is not reporting"
        },
    );
    eprintln!("{:?} into the cut: {m2}", since.elapsed());
    hold(since, CUT);
    let m = n.machine();
    assert_eq!(
        u64_of(&m, "cached_seq"),
        u64_of(&before, "cached_seq"),
        "nothing reached ps1 through the cut: {m}"
    );
    assert_eq!(
        u64_of(&m, "applied_seq"),
        u64_of(&before, "applied_seq"),
        "nothing applied during the cut: {m}"
    );
    assert_eq!(n.node_alive("ps1"), Some(true), "ps1 reports over the WAN");
    eprintln!("{:?} into the cut: {m}", since.elapsed());

    phase("LAN up; replication converges");
    n.topo.set_primary_end(false, true);
    let m = n.converge();
    eprintln!(
        "LAN healed and converged after {:?}; stream restarts {}",
        started.elapsed(),
        m["stream_restarts"]
    );
    n.c.assert_no_unexpected_errors(&[]);
}
