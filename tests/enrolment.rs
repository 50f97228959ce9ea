//! Enrolment and disk identity against real processes: a disk that grows (a file and a loop
//! device), shrinks or is replaced under its name; a second agent under a taken name; a
//! cloned agent data dir; forget and enrol again; tokens of the wrong kind, expired or
//! revoked. Status never says "in sync" while the replica cannot be brought to the source.
mod common;

use std::{
    os::unix::fs::FileExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use haven_testkit::{identical, make_disk, random_writes, u64_of, wait_until};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SYNC: Duration = Duration::from_secs(120);

/// An all-in-one node and an agent `m` protecting `disk` (64 MiB of mixed content), synced.
fn protected(c: &mut Cluster, m: &str, disk: &Path) {
    c.start_config(&[], vec![]);
    make_disk(disk, 64 * MIB, 11);
    c.start_agent(m, &[("d0", disk)]);
    c.ctl(&["protect", m]);
    c.wait_sync(m, SYNC);
    c.assert_replica(m, disk, &c.replica("config", m, "d0"));
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_data().unwrap();
}

fn random(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.gen()).collect()
}

/// `ctl wait-sync` with its exit code, stderr and how long it took.
fn wait_sync_outcome(c: &Cluster, m: &str, timeout: &str) -> (Option<i32>, String, Duration) {
    let t = Instant::now();
    let out = c.ctl_output(&["wait-sync", m, "--timeout", timeout]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

fn wait_state(c: &Cluster, m: &str, state: &str) -> Value {
    wait_until(&format!("{m} {state}"), Duration::from_secs(30), || {
        let v = c.machine(m)?;
        (v["state"] == state).then_some(v)
    })
}

#[test]
fn a_disk_that_grows_is_replicated_at_its_new_size_without_a_resync() {
    let mut c = Cluster::new();
    let disk = c.path("d0.img");
    protected(&mut c, "m1", &disk);
    let sent_before = u64_of(&c.machine("m1").unwrap(), "raw_bytes_sent");

    phase("grow the disk to 96 MiB while a writer keeps writing, then write in the new region");
    let mut rng = StdRng::seed_from_u64(3);
    let writer = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            // Random writes within the old 64 MiB, before, during and after the growth.
            let mut rng = StdRng::seed_from_u64(4);
            let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            let mut n = 0u64;
            for _ in 0..60 {
                let len = rng.gen_range(1..=64) * 4096usize;
                let off = rng.gen_range(0..(64 * MIB - len as u64));
                f.write_all_at(&random(&mut rng, len), off).unwrap();
                n += len as u64;
                std::thread::sleep(Duration::from_millis(20));
            }
            f.sync_data().unwrap();
            n
        })
    };
    std::thread::sleep(Duration::from_millis(400));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(96 * MIB)
        .unwrap();
    let new_data = random(&mut rng, MIB as usize);
    write_at(&disk, 80 * MIB, &new_data);
    let written = new_data.len() as u64 + writer.join().unwrap();

    phase("wait-sync succeeds and the replica has grown");
    c.wait_sync("m1", SYNC);
    let replica = c.replica("config", "m1", "d0");
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), 96 * MIB);
    let m = wait_state(&c, "m1", "replicating");
    c.assert_replica("m1", &disk, &replica);
    assert_eq!(
        m["disks"][0]["size_bytes"],
        96 * MIB,
        "the inventory follows: {m}"
    );
    let sent = u64_of(&m, "raw_bytes_sent") - sent_before;
    assert!(
        sent <= written + 4 * MIB,
        "only the changes travel: {sent} bytes sent for {written} written (no resync of 64 MiB)"
    );
    c.assert_no_resync("m1", &m);
    let events = c.ctl(&["events"]);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "disk-resize"
                && e["reason"]
                    .as_str()
                    .unwrap()
                    .contains("disk d0 grew from 67108864 to 100663296 bytes")),
        "an event says so: {events}"
    );
    assert!(c.log("agent-m1").contains("disk grew"));

    phase("the grown size survives restarts of the agent and the master target");
    c.kill("agent-m1");
    c.kill("config");
    write_at(&disk, 90 * MIB, &random(&mut rng, 4096));
    c.restart("config");
    c.restart("agent-m1");
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &replica);
    c.assert_no_resync("m1", &wait_state(&c, "m1", "replicating"));
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_loop_device_that_grows_is_replicated_at_its_new_size() {
    let mut c = Cluster::new();
    let backing = c.path("backing.img");
    make_disk(&backing, 32 * MIB, 5);
    let Some(dev) = LoopDevice::attach(&backing) else {
        return;
    };
    let dev_path = dev.path();
    c.start_config(&[], vec![]);
    c.start_agent("blk01", &[("root", dev_path.as_path())]);
    let m = c.machine("blk01").unwrap();
    assert!(
        m["disks"][0]["id"].as_str().unwrap().starts_with("loop:"),
        "a loop device is known by its backing file: {m}"
    );
    c.ctl(&["protect", "blk01"]);
    c.wait_sync("blk01", SYNC);

    phase("grow the backing file and tell the kernel (losetup -c), then write past the old end");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_len(48 * MIB)
        .unwrap();
    let st = Command::new("losetup")
        .args(["-c", &dev.dev])
        .status()
        .unwrap();
    assert!(st.success(), "losetup -c");
    let mut rng = StdRng::seed_from_u64(9);
    write_at(&dev_path, 40 * MIB, &random(&mut rng, 256 << 10));
    random_writes(&dev_path, &mut rng, 10);
    c.wait_sync("blk01", SYNC);
    let replica = c.replica("config", "blk01", "root");
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), 48 * MIB);
    wait_state(&c, "blk01", "replicating");
    c.assert_replica("blk01", &dev_path, &replica);
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_shrunk_disk_blocks_the_machine_until_the_operator_resyncs_it() {
    let mut c = Cluster::new();
    let disk = c.path("d0.img");
    protected(&mut c, "m1", &disk);
    let replica = c.replica("config", "m1", "d0");
    let before = c.path("replica-before.img");
    std::fs::copy(&replica, &before).unwrap();

    phase("shrink the disk: degraded with the reason, wait-sync fails at once");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(48 * MIB)
        .unwrap();
    let (code, err, took) = wait_sync_outcome(&c, "m1", "60s");
    assert_eq!(code, Some(4), "exit 4: cannot converge without you: {err}");
    assert!(
        err.contains("disk d0 shrank from 64 MiB to 48 MiB"),
        "the reason: {err}"
    );
    assert!(
        took < Duration::from_secs(20),
        "no minute-long wait: {took:?}"
    );
    let m = wait_state(&c, "m1", "degraded");
    assert!(m["blocked_reason"]
        .as_str()
        .unwrap()
        .contains("haven ctl resync m1 --disk d0"));
    assert!(
        m["rpo_seconds"].as_f64().is_some_and(|r| r > 0.0),
        "a stale replica is not RPO 0: {m}"
    );
    // Human output says it too.
    let out = Command::new(BIN)
        .args(["ctl", "--cluster", &c.config_addr, "--token-file"])
        .arg(c.admin_token())
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("degraded") && text.contains("shrank"),
        "{text}"
    );
    assert!(identical(&replica, &before), "nothing of it was sent");

    phase("ctl resync: the replica shrinks and converges, no full resync");
    let sent_before = u64_of(&m, "raw_bytes_sent");
    c.ctl(&["resync", "m1", "--disk", "d0"]);
    c.wait_sync("m1", SYNC);
    let m = wait_state(&c, "m1", "replicating");
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), 48 * MIB);
    c.assert_replica("m1", &disk, &replica);
    assert!(
        u64_of(&m, "raw_bytes_sent") - sent_before < 8 * MIB,
        "only what differs travels: {m}"
    );
    c.assert_no_resync("m1", &m);
    c.assert_no_unexpected_errors(&["shrank from 64 MiB to 48 MiB"]);
}

#[test]
fn another_disk_under_the_protected_name_is_blocked_and_the_replica_untouched() {
    let mut c = Cluster::new();
    let disk = c.path("d0.img");
    protected(&mut c, "m1", &disk);
    let replica = c.replica("config", "m1", "d0");
    let other = c.path("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    write_at(
        &other,
        0,
        &random(&mut StdRng::seed_from_u64(99), 64 * MIB as usize),
    );

    phase("restart the agent with another disk as d0");
    c.kill("agent-m1");
    let mut args = c.agent_args("m1", &c.path("agent-m1"));
    args.extend(["--disk".into(), format!("d0={}", other.display())]);
    c.add("agent-m1-other", args, vec![]);
    let m = wait_state(&c, "m1", "degraded");
    let why = m["blocked_reason"].as_str().unwrap().to_string();
    assert!(
        why.contains(&format!(
            "disk d0 at {} is not the disk that was protected (it was at {})",
            other.display(),
            disk.display()
        )),
        "{why}"
    );
    let (code, err, _) = wait_sync_outcome(&c, "m1", "60s");
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("not the disk that was protected"), "{err}");
    assert!(identical(&replica, &disk), "the replica is untouched");

    phase("the protected disk comes back: replication resumes by itself");
    c.kill("agent-m1-other");
    write_at(&disk, 5 * MIB, b"back again");
    c.restart("agent-m1");
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &replica);
    c.assert_no_unexpected_errors(&["is not the disk that was protected"]);
}

/// `haven agent` arguments joining `c` as `name` with data dir `dir` (no disks).
#[test]
fn a_second_agent_under_a_taken_name_is_refused_and_nothing_is_registered() {
    let mut c = Cluster::new();
    let disk = c.path("d0.img");
    protected(&mut c, "m1", &disk);
    let clone_disk = c.path("clone.img");
    make_disk(&clone_disk, 32 * MIB, 77);

    phase("an agent with another data dir and disk, --name m1");
    let mut args = c.agent_args("m1", &c.path("agent-clone"));
    args.extend(["--disk".into(), format!("d0={}", clone_disk.display())]);
    let out = Command::new(BIN).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the clone's agent exits non-zero");
    assert!(
        err.contains("machine m1 is already enrolled") && err.contains("another --name"),
        "a clear error naming the machine and how to proceed: {err}"
    );
    assert!(!c.path("agent-clone/identity/cert.der").exists());
    let machines = c.ctl(&["machines"]);
    assert_eq!(machines.as_array().unwrap().len(), 1, "{machines}");
    assert_eq!(machines[0]["disks"][0]["size_bytes"], 64 * MIB);
    assert!(c.log("config").contains("join refused"));

    phase("without --name, the error says the default was the host name");
    let mut args: Vec<String> = c
        .agent_args("x", &c.path("agent-default"))
        .into_iter()
        .take(7)
        .collect();
    args.extend(["--disk".into(), format!("d0={}", clone_disk.display())]);
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if !host.is_empty() && host != "m1" {
        // Enrol the host name once, then a "clone" of it.
        let first = Command::new(BIN)
            .args(&args)
            .arg("--scan-interval")
            .arg("1s")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(c.path("agent-host-named.log")).unwrap())
            .spawn()
            .unwrap();
        let mut first = ChildGuard(first);
        wait_until("the host-named machine", Duration::from_secs(30), || {
            c.machine(&host)
        });
        let mut again = c
            .agent_args("x", &c.path("agent-default2"))
            .into_iter()
            .take(7)
            .collect::<Vec<_>>();
        again.extend(["--disk".into(), format!("d0={}", clone_disk.display())]);
        let out = Command::new(BIN).args(&again).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("--name defaulted to this host's name")
                && err.contains("a cloned machine must be given another with --name"),
            "{err}"
        );
        let _ = first.0.kill();
    }

    phase("the original machine is untouched and in sync");
    write_at(&disk, 3 * MIB, b"still mine");
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
    c.assert_no_unexpected_errors(&[]);
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_cloned_agent_data_dir_is_never_accepted_for_data() {
    let mut c = Cluster::new();
    let disk = c.path("d0.img");
    protected(&mut c, "m1", &disk);
    let replica = c.replica("config", "m1", "d0");

    phase("clone the machine whole: its agent data dir and its disk, then diverge");
    let clone_dir = c.path("agent-clone");
    let st = Command::new("cp")
        .args(["-a"])
        .arg(c.path("agent-m1"))
        .arg(&clone_dir)
        .status()
        .unwrap();
    assert!(st.success());
    let clone_disk = c.path("clone.img");
    std::fs::copy(&disk, &clone_disk).unwrap();
    write_at(&clone_disk, 7 * MIB, &[0xc1; 65536]);
    let mut args = c.agent_args("m1", &clone_dir);
    args.extend(["--disk".into(), format!("d0={}", clone_disk.display())]);
    c.add("agent-clone", args, vec![]);
    let refused = wait_until(
        "the process server refusing the clone",
        Duration::from_secs(30),
        || {
            c.log("config")
                .lines()
                .find(|l| l.contains("is already streaming from another agent process"))
                .map(String::from)
        },
    );
    assert!(refused.contains(" ERROR "), "logged: {refused}");
    let m = wait_state(&c, "m1", "degraded");
    assert!(
        m["blocked_reason"]
            .as_str()
            .unwrap()
            .contains("two agents report as m1"),
        "{m}"
    );

    phase("the clone stops: the real machine converges, the clone's data never arrived");
    c.kill("agent-clone");
    write_at(&disk, 9 * MIB, b"the real one");
    wait_until("m1 healthy again", Duration::from_secs(30), || {
        let ok = c.try_ctl(&["wait-sync", "m1", "--timeout", "20s"]).is_ok();
        ok.then_some(())
    });
    c.assert_replica("m1", &disk, &replica);
    c.assert_no_unexpected_errors(&["is already streaming from another agent process"]);
}

#[test]
fn forget_then_enrol_the_name_again() {
    let mut c = Cluster::new();
    let disk = c.path("d0.img");
    protected(&mut c, "m1", &disk);
    let kept = c.path("config/replicas/m1@1/d0.img");

    phase("forget is refused while protected, then done");
    let out = c.ctl_output(&["forget", "m1"]);
    assert_eq!(out.status.code(), Some(5), "refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unprotect m1"));
    c.ctl(&["unprotect", "m1"]);
    let reply = c.ctl(&["forget", "m1"]);
    assert!(
        reply["message"].as_str().unwrap().contains("moved aside"),
        "{reply}"
    );
    wait_until("the replica moved aside", Duration::from_secs(30), || {
        kept.exists().then_some(())
    });
    assert!(
        identical(&kept, &disk),
        "the forgotten replica is kept whole"
    );
    assert!(c
        .try_ctl(&["machines"])
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    wait_until("the old agent refused", Duration::from_secs(30), || {
        c.log("agent-m1")
            .contains("the configuration node refused this agent")
            .then_some(())
    });

    phase("a new agent enrols the name and replicates from scratch");
    c.kill("agent-m1");
    let disk2 = c.path("d0-new.img");
    make_disk(&disk2, 32 * MIB, 12);
    let mut args = c.agent_args("m1", &c.path("agent-m1-new"));
    args.extend(["--disk".into(), format!("d0={}", disk2.display())]);
    c.add("agent-m1-new", args, vec![]);
    wait_until("m1 enrolled again", Duration::from_secs(30), || {
        c.machine("m1")
    });
    c.ctl(&["protect", "m1"]);
    c.wait_sync("m1", SYNC);
    let m = wait_state(&c, "m1", "replicating");
    assert_eq!(
        m["epoch"], 2,
        "epochs continue the forgotten machine's: {m}"
    );
    c.assert_replica("m1", &disk2, &c.replica("config", "m1", "d0"));
    assert!(identical(&kept, &disk), "the old replica stays aside");
    c.assert_no_unexpected_errors(&["the configuration node refused this agent"]);
}

#[test]
fn tokens_enrol_only_their_kind_and_expire_or_are_revoked() {
    let mut c = Cluster::new();
    c.start_config(&["configuration"], vec![]);

    phase("the agent token every protected machine holds enrols no server");
    let out = c.join_output("rogue", &c.agent_token());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is an agent token: it enrols agents (protected machines) only"),
        "{err}"
    );
    assert!(!c.path("rogue/identity/cert.der").exists());

    phase("a node token created with a TTL enrols until it expires");
    let created = c.ctl(&["token", "create", "--kind", "node", "--ttl", "3s"]);
    let f = c.path("short-node-token");
    std::fs::write(&f, created["token"].as_str().unwrap()).unwrap();
    c.add_at(
        "ps-ok",
        &Host::default(),
        c.process_node_args("ps-ok", &f),
        vec![],
    );
    wait_until("ps-ok alive", Duration::from_secs(30), || {
        c.nodes()
            .iter()
            .any(|n| n["name"] == "ps-ok" && n["alive"] == true)
            .then_some(())
    });
    wait_until("the token expired", Duration::from_secs(10), || {
        let t = c.ctl(&["token", "list"]);
        t.as_array()?
            .iter()
            .any(|t| t["id"] == created["id"] && t["expired"] == true)
            .then_some(())
    });
    let out = c.join_output("ps-late", &f);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("expired at"), "{err}");

    phase("a revoked token enrols nothing");
    let created = c.ctl(&["token", "create", "--kind", "agent"]);
    let id = created["id"].as_str().unwrap();
    c.ctl(&["token", "revoke", id]);
    let f = c.path("revoked-agent-token");
    std::fs::write(&f, created["token"].as_str().unwrap()).unwrap();
    let disk = c.path("d.img");
    make_disk(&disk, 4 * MIB, 1);
    let mut args = c.agent_args("m9", &c.path("agent-m9"));
    args[4] = f.display().to_string();
    args.extend(["--disk".into(), format!("d0={}", disk.display())]);
    let out = Command::new(BIN).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("join token {id} was revoked")),
        "{err}"
    );

    phase("nothing was registered by the refused joins");
    let names: Vec<String> = c
        .nodes()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["config", "ps-ok"]);
    assert!(c.ctl(&["machines"]).as_array().unwrap().is_empty());
    let list = c.ctl(&["token", "list"]);
    let uses: Vec<(String, u64, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["kind"].as_str().unwrap().to_string(),
                t["uses"].as_u64().unwrap(),
                t["revoked"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        uses.iter().map(|u| u.1).sum::<u64>(),
        1,
        "one enrolment in all (ps-ok): {list}"
    );
    assert!(uses.contains(&("agent".into(), 0, true)), "{list}");

    phase("the token files are owner-only, and so is the state store");
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "config/agent-token",
        "config/node-token",
        "config/admin-token",
        "config/config/state.redb",
        "config/config/ca-key.der",
    ] {
        let mode = std::fs::metadata(c.path(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} is {mode:o}");
    }
    c.assert_no_unexpected_errors(&[]);
}

/// Every data directory is owner-only, and so is every file that holds a secret: keys,
/// tokens, the state store (every machine's data key), the assignments (data keys too).
#[test]
fn every_data_dir_and_secret_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::new();
    let disk = c.path("d0.img");
    protected(&mut c, "m1", &disk);

    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            }
            out.push(p);
        }
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let mut secrets = Vec::new();
    for root in ["config", "agent-m1"] {
        let root = c.path(root);
        assert_eq!(mode(&root), 0o700, "data dir {}", root.display());
        let mut all = Vec::new();
        walk(&root, &mut all);
        for p in all {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let secret = name.ends_with("key.der")
                || name.ends_with("-token")
                || name == "state.redb"
                || name == "assignments";
            if secret {
                assert_eq!(mode(&p), 0o600, "{} is {:o}", p.display(), mode(&p));
                secrets.push(p.strip_prefix(c.path("")).unwrap().to_path_buf());
            }
        }
    }
    // The walk found what it must have (so it cannot pass by finding nothing).
    let found: Vec<String> = secrets.iter().map(|p| p.display().to_string()).collect();
    for must in [
        "config/agent-token",
        "config/node-token",
        "config/admin-token",
        "config/config/state.redb",
        "config/config/ca-key.der",
        "config/assignments",
    ] {
        assert!(found.iter().any(|f| f == must), "{must} not in {found:?}");
    }
    assert!(
        found.iter().filter(|f| f.ends_with("key.der")).count() >= 3,
        "the CA's, the node's and the agent's keys: {found:?}"
    );
}
