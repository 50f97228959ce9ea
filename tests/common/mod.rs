//! A harness for tests against real `haven` processes on loopback, on haven-testkit's
//! `Procs` and `Ctl` (this file knows the binary; the testkit cannot).
//!
//! Every process logs to `<dir>/<name>.log`; on drop all processes are killed. Waits are
//! bounded polls that fail with what they waited for. `assert_no_unexpected_errors` fails a
//! test on any ERROR log line it did not expect.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use haven_testkit::{assert_identical, free_port, identical, tail, wait_until, Ctl, Procs, Stop};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_haven");

/// The QUIC idle timeout (`transport_config` in transport/src/endpoint.rs).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A partition test's cut lasts at least this long: past the idle timeout, so connections die.
pub const CUT: Duration = Duration::from_secs(12);
/// When a second round of writes lands in a cut: after the connections timed out.
pub const AFTER_IDLE: Duration = Duration::from_millis(IDLE_TIMEOUT.as_millis() as u64 + 500);

/// Sleeps until `at` after `since` (a scenario's timeline, not a wait for a condition).
pub fn hold(since: Instant, at: Duration) {
    std::thread::sleep(at.saturating_sub(since.elapsed()));
}

pub fn phase(msg: &str) {
    eprintln!("\n=== {msg}");
}

/// Where a process runs: a network namespace (entered with `ip netns exec`) and, for a node,
/// the IP it listens on, which is also the address it advertises. The default is the test's
/// own namespace on 127.0.0.1.
#[derive(Clone, Debug)]
pub struct Host {
    pub netns: Option<String>,
    pub ip: String,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            netns: None,
            ip: "127.0.0.1".into(),
        }
    }
}

pub struct Cluster {
    pub dir: PathBuf,
    pub config_addr: String,
    procs: Procs,
    /// Removed on drop unless `HAVEN_TEST_KEEP=1` (then the logs and images stay).
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.procs.stop_all();
        if std::thread::panicking() {
            for name in self.names() {
                let tail = tail(&self.procs.log(&name), 40);
                eprintln!("--- last lines of {name}.log ---");
                if !tail.is_empty() {
                    eprintln!("{tail}");
                }
            }
        }
    }
}

impl Cluster {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("haven-test-")
            .tempdir()
            .unwrap();
        let (dir, tmp) = if std::env::var_os("HAVEN_TEST_KEEP").is_some_and(|v| v == "1") {
            let dir = tmp.keep();
            eprintln!("HAVEN_TEST_KEEP=1: keeping {}", dir.display());
            (dir, None)
        } else {
            (tmp.path().to_path_buf(), Some(tmp))
        };
        Self {
            procs: Procs::new(BIN, &dir)
                .stop_with(Stop::Kill)
                .env_for_all("RUST_LOG", "info,quinn=warn"),
            dir,
            config_addr: String::new(),
            _tmp: tmp,
        }
    }

    /// Every process's name, in order.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.procs.names().map(String::from).collect();
        names.sort();
        names
    }

    /// `haven ctl` with the admin token, against the configuration node.
    pub fn client(&self) -> Ctl {
        Ctl::new(BIN, &self.config_addr, self.admin_token())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn admin_token(&self) -> PathBuf {
        self.path("config/admin-token")
    }

    /// Enrols agents only.
    pub fn agent_token(&self) -> PathBuf {
        self.path("config/agent-token")
    }

    /// Enrols server nodes only.
    pub fn node_token(&self) -> PathBuf {
        self.path("config/node-token")
    }

    pub fn add(&mut self, name: &str, args: Vec<String>, env: Vec<(String, String)>) {
        self.add_at(name, &Host::default(), args, env)
    }

    /// [`Cluster::add`] in `host`'s network namespace (`host.ip` is not used here).
    pub fn add_at(
        &mut self,
        name: &str,
        host: &Host,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) {
        self.procs
            .start_with(name, host.netns.clone(), &args, env)
            .unwrap_or_else(|e| panic!("spawn haven: {e}"));
    }

    /// The configuration node (optionally with more roles). Waits for its tokens and its answer.
    pub fn start_config(&mut self, roles: &[&str], env: Vec<(String, String)>) {
        self.start_config_with(roles, &[], env)
    }

    pub fn start_config_with(
        &mut self,
        roles: &[&str],
        extra: &[&str],
        env: Vec<(String, String)>,
    ) {
        self.start_config_at(&Host::default(), roles, extra, env)
    }

    /// The configuration node on `host`. `ctl` runs in the test's own namespace, so `host.ip`
    /// must be reachable from there.
    pub fn start_config_at(
        &mut self,
        host: &Host,
        roles: &[&str],
        extra: &[&str],
        env: Vec<(String, String)>,
    ) {
        let port = free_port();
        self.config_addr = format!("{}:{port}", host.ip);
        let mut args = vec![
            "node".to_string(),
            "--data-dir".into(),
            self.path("config").display().to_string(),
            "--listen".into(),
            self.config_addr.clone(),
            "--name".into(),
            "config".into(),
        ];
        for r in roles {
            args.extend(["--role".to_string(), r.to_string()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        self.add_at("config", host, args, env);
        let (addr, data) = (self.config_addr.clone(), self.path("config"));
        self.procs
            .configuration_ready(&addr, &data)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The recommended two-site layout (README "Disaster day"): the configuration node and
    /// master target `mt1` at site `dr`, process server `ps1` at `primary` (the agents' default).
    pub fn start_two_sites(&mut self) {
        self.start_config_with(&["configuration"], &["--site", "dr"], vec![]);
        self.start_node_with("mt1", &["master-target"], &["--site", "dr"], vec![]);
        self.start_node_with("ps1", &["process"], &["--site", "primary"], vec![]);
    }

    pub fn start_node(&mut self, name: &str, roles: &[&str], env: Vec<(String, String)>) {
        self.start_node_with(name, roles, &[], env)
    }

    /// A node joining the cluster, with extra command-line arguments. Waits until it reports.
    pub fn start_node_with(
        &mut self,
        name: &str,
        roles: &[&str],
        extra: &[&str],
        env: Vec<(String, String)>,
    ) {
        self.start_node_at(name, &Host::default(), roles, extra, env)
    }

    /// [`Cluster::start_node_with`] on `host`: it listens on, and advertises, `host.ip`.
    pub fn start_node_at(
        &mut self,
        name: &str,
        host: &Host,
        roles: &[&str],
        extra: &[&str],
        env: Vec<(String, String)>,
    ) {
        let port = free_port();
        let mut args = vec![
            "node".to_string(),
            "--data-dir".into(),
            self.path(name).display().to_string(),
            "--listen".into(),
            format!("{}:{port}", host.ip),
            "--name".into(),
            name.into(),
            "--join".into(),
            self.config_addr.clone(),
            "--token-file".into(),
            self.node_token().display().to_string(),
        ];
        for r in roles {
            args.extend(["--role".to_string(), r.to_string()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        self.add_at(name, host, args, env);
        let n = name.to_string();
        wait_until(
            &format!("node {name} alive"),
            Duration::from_secs(30),
            || self.client().node_alive(&n).ok()?.then_some(()),
        );
    }

    /// The arguments of a process server `name` joining with `token` (data in `<dir>/<name>`).
    pub fn process_node_args(&self, name: &str, token: &Path) -> Vec<String> {
        vec![
            "node".into(),
            "--role".into(),
            "process".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--name".into(),
            name.into(),
            "--join".into(),
            self.config_addr.clone(),
            "--token-file".into(),
            token.display().to_string(),
            "--data-dir".into(),
            self.path(name).display().to_string(),
        ]
    }

    /// [`Cluster::process_node_args`] run to completion: a join that is refused exits at once.
    pub fn join_output(&self, name: &str, token: &Path) -> Output {
        Command::new(BIN)
            .args(self.process_node_args(name, token))
            .output()
            .unwrap()
    }

    pub fn nodes(&self) -> Vec<Value> {
        self.client().array("nodes").unwrap_or_default()
    }

    /// The arguments of an agent for `machine` with data in `data_dir`, but for its disks.
    pub fn agent_args(&self, machine: &str, data_dir: &Path) -> Vec<String> {
        vec![
            "agent".to_string(),
            "--join".into(),
            self.config_addr.clone(),
            "--token-file".into(),
            self.agent_token().display().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--name".into(),
            machine.into(),
            "--scan-interval".into(),
            "1s".into(),
        ]
    }

    /// An agent with extra arguments (`--capture tap`, …).
    pub fn start_agent_args(&mut self, machine: &str, disks: &[(&str, &Path)], extra: &[&str]) {
        let mut args = self.agent_args(machine, &self.path(&format!("agent-{machine}")));
        for (n, p) in disks {
            args.extend(["--disk".to_string(), format!("{n}={}", p.display())]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.add_at(&format!("agent-{machine}"), &Host::default(), args, vec![]);
        let m = machine.to_string();
        wait_until(
            &format!("machine {machine} enrolled"),
            Duration::from_secs(30),
            || self.machine(&m),
        );
    }

    /// The socket agent `machine`'s tap serves `disk` on (`haven agent --capture tap`).
    pub fn tap_socket(&self, machine: &str, disk: &str) -> PathBuf {
        self.path(&format!("agent-{machine}/nbd/{disk}.sock"))
    }

    /// The NBD URI of agent `machine`'s tap export `disk`.
    pub fn tap_uri(&self, machine: &str, disk: &str) -> String {
        format!(
            "nbd+unix:///{disk}?socket={}",
            self.tap_socket(machine, disk).display()
        )
    }

    /// Waits until agent `machine`'s tap serves `disk`: a connect, not a look (a killed agent
    /// leaves its socket file behind).
    pub fn wait_tap(&self, machine: &str, disk: &str) {
        let s = self.tap_socket(machine, disk);
        wait_until("the tap's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&s).ok().map(|_| ())
        });
    }

    /// Agent `machine` with tap capture of its one disk `d0` = `disk` (and `extra`
    /// arguments), once its tap serves it.
    pub fn start_tap_agent(&mut self, machine: &str, disk: &Path, extra: &[&str]) {
        let mut args = vec!["--capture", "tap"];
        args.extend_from_slice(extra);
        self.start_agent_args(machine, &[("d0", disk)], &args);
        self.wait_tap(machine, "d0");
    }

    pub fn start_agent(&mut self, machine: &str, disks: &[(&str, &Path)]) {
        self.start_agent_with_env(machine, disks, vec![])
    }

    /// [`Cluster::start_agent`] with environment variables for the agent process.
    pub fn start_agent_with_env(
        &mut self,
        machine: &str,
        disks: &[(&str, &Path)],
        env: Vec<(String, String)>,
    ) {
        self.start_agent_at(machine, &Host::default(), disks, env)
    }

    /// [`Cluster::start_agent_with_env`] in `host`'s network namespace.
    pub fn start_agent_at(
        &mut self,
        machine: &str,
        host: &Host,
        disks: &[(&str, &Path)],
        env: Vec<(String, String)>,
    ) {
        let mut args = self.agent_args(machine, &self.path(&format!("agent-{machine}")));
        for (n, p) in disks {
            args.extend(["--disk".to_string(), format!("{n}={}", p.display())]);
        }
        self.add_at(&format!("agent-{machine}"), host, args, env);
        let m = machine.to_string();
        wait_until(
            &format!("machine {machine} enrolled"),
            Duration::from_secs(30),
            || self.machine(&m),
        );
    }

    /// SIGKILL.
    pub fn kill(&mut self, name: &str) {
        self.procs.kill(name).unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn restart(&mut self, name: &str) {
        self.procs
            .restart(name)
            .unwrap_or_else(|e| panic!("spawn haven: {e}"));
    }

    /// Replaces the environment a process gets at its next (re)start.
    pub fn set_env(&mut self, name: &str, env: Vec<(String, String)>) {
        self.procs.get_mut(name).expect("known process").env = env;
    }

    /// Waits for a process to exit on its own; returns how it exited.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> std::process::ExitStatus {
        let p = self.procs.get_mut(name).expect("known process");
        let child = p.child.as_mut().expect("running");
        let status = wait_until(&format!("{name} to exit"), timeout, || {
            child.try_wait().expect("try_wait")
        });
        p.child = None;
        status
    }

    /// Whether a process is running (it has not exited).
    pub fn is_running(&mut self, name: &str) -> bool {
        let p = self.procs.get_mut(name).expect("known process");
        p.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The `--listen` address of node `name` (`config` for the configuration node).
    pub fn addr(&self, name: &str) -> String {
        let args = &self
            .procs
            .get(name)
            .unwrap_or_else(|| panic!("unknown process {name}"))
            .args;
        let at = args
            .iter()
            .position(|a| a == "--listen")
            .unwrap_or_else(|| panic!("{name} has no --listen (an agent?)"));
        args[at + 1].clone()
    }

    pub fn pid(&self, name: &str) -> u32 {
        self.procs.pid(name).expect("running")
    }

    pub fn assert_running(&mut self) {
        for name in self.names() {
            if let Some(s) = self.procs.exited(&name) {
                panic!("process {name} exited unexpectedly: {s}");
            }
        }
    }

    pub fn ctl_output(&self, args: &[&str]) -> Output {
        self.client().output(args).expect("run haven ctl")
    }

    pub fn try_ctl(&self, args: &[&str]) -> Result<Value, String> {
        self.client().call(args)
    }

    pub fn ctl(&self, args: &[&str]) -> Value {
        self.try_ctl(args)
            .unwrap_or_else(|e| panic!("haven ctl {args:?} failed: {e}"))
    }

    pub fn machine(&self, name: &str) -> Option<Value> {
        self.client().machine(name).ok().flatten()
    }

    pub fn wait_sync(&self, machine: &str, timeout: Duration) {
        let t = format!("{}s", timeout.as_secs());
        let out = self.ctl_output(&["wait-sync", machine, "--timeout", &t]);
        assert!(
            out.status.success(),
            "wait-sync {machine} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Checks a replica against its source, and what status claims about it: a machine
    /// shown `replicating` with RPO 0 must have a replica equal to its source (the status
    /// invariant: haven never reports in sync what is not). Then the test's own expectation:
    /// identical.
    pub fn assert_replica(&self, machine: &str, source: &Path, replica: &Path) {
        let m = self.machine(machine).expect("the machine is listed");
        let claims_in_sync = m["state"] == "replicating" && m["rpo_seconds"].as_f64() == Some(0.0);
        if claims_in_sync && !identical(source, replica) {
            panic!(
                "invariant broken: status shows {machine} replicating with RPO 0, yet {} differs from {}: {m}",
                replica.display(),
                source.display()
            );
        }
        assert_identical(source, replica);
    }

    pub fn replica(&self, mt: &str, machine: &str, disk: &str) -> PathBuf {
        self.path(&format!("{mt}/replicas/{machine}/{disk}.img"))
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.procs.log(name)).unwrap_or_default()
    }

    /// Fails on any ERROR line in any log that matches none of `expected`.
    /// No full resync happened: `m` (the machine's status) is still in protection epoch 1 and
    /// the agent logged only its initial full sync.
    pub fn assert_no_resync(&self, machine: &str, m: &Value) {
        assert_eq!(m["epoch"], 1, "same protection epoch: {m}");
        let full_syncs = self
            .log(&format!("agent-{machine}"))
            .matches("starting a full sync")
            .count();
        assert_eq!(full_syncs, 1, "only the initial full sync, none since");
    }

    pub fn assert_no_unexpected_errors(&self, expected: &[&str]) {
        for name in self.names() {
            for line in self.log(&name).lines() {
                if line.contains(" ERROR ") && !expected.iter().any(|e| line.contains(e)) {
                    panic!("unexpected ERROR in {name}.log: {line}");
                }
            }
        }
    }
}

/// A loop device over a file, detached on drop (panics included).
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub dev: String,
}

impl LoopDevice {
    /// `losetup -f --show backing`; None, after saying why the test is SKIPPED, where the
    /// machine does not allow it.
    pub fn attach(backing: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(LoopDevice {
                dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: losetup is not permitted here: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: losetup is not available: {e}");
                None
            }
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.dev)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The master target's durable apply cursor, as it writes it (`replicas/<m>/state`).
#[derive(serde::Deserialize)]
pub struct ReplicaCursor {
    pub epoch: u32,
    pub applied_seq: u64,
}

/// Until stopped, reads each replica's durable cursor straight from the master target's data
/// dir and fails if `applied_seq` ever goes backwards within an epoch (a status view can show
/// 0 while reports are missing after a restart; the cursor on disk is the fact). Returns the
/// number of observations.
pub fn monitor(cursors: &[PathBuf], stop: &AtomicBool) -> usize {
    let mut last: BTreeMap<&PathBuf, (u32, u64)> = BTreeMap::new();
    let mut seen = 0;
    while !stop.load(Ordering::Relaxed) {
        for path in cursors {
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            let c: ReplicaCursor =
                haven_transport::codec::decode(&bytes).expect("replica cursor decodes");
            if let Some((e, a)) = last.get(path) {
                assert!(
                    c.epoch > *e || (c.epoch == *e && c.applied_seq >= *a),
                    "invariant: applied_seq in {} went from {a} (epoch {e}) to {} (epoch {})",
                    path.display(),
                    c.applied_seq,
                    c.epoch
                );
            }
            last.insert(path, (c.epoch, c.applied_seq));
            seen += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    seen
}

/// Reads a replica's durable cursor (`<mt>/replicas/<machine>/state`).
pub fn read_cursor(path: &Path) -> ReplicaCursor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    haven_transport::codec::decode(&bytes).expect("replica cursor decodes")
}

/// Runs `qemu-io` (qemu-utils) with commands against an NBD URI; panics with its output on
/// failure or a failed pattern check.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = cmd
        .output()
        .expect("qemu-io (qemu-utils) must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io {cmds:?}: {text}");
    assert!(
        !text.contains("Pattern verification failed"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}
