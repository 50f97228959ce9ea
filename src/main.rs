//! `haven`: one binary for every role, the agent, the operator CLI and the demo.
mod ctl;
mod demo;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use haven_roles::{
    agent::AgentOptions,
    node::NodeOptions,
    proto::{AdminCommand, AdminReply, PointSpec, RecoveryReply, RecoveryRequest},
};

#[derive(Parser)]
#[command(
    name = "haven",
    version,
    about = "Disaster-recovery replication: live, point-in-time-recoverable copies of machines' disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server node (configuration, process, master-target; all three by default).
    Node {
        /// The site this node runs at: a machine's process server is placed at the machine's
        /// site, its master target at another site when there is one.
        #[arg(long, default_value = haven_cluster::DEFAULT_SITE)]
        site: String,
        /// Role to run; repeat for several. Default: all three.
        #[arg(long = "role", value_parser = ["configuration", "process", "master-target", "all"])]
        roles: Vec<String>,
        #[arg(long)]
        data_dir: PathBuf,
        /// UDP address for QUIC.
        #[arg(long, default_value = "0.0.0.0:7400")]
        listen: SocketAddr,
        /// Address other nodes and agents use to reach this one (default: the listen address).
        #[arg(long)]
        advertise: Option<String>,
        /// Configuration node to join (nodes without the configuration role).
        #[arg(long, requires = "token_file")]
        join: Option<String>,
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Node name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Machines this node takes before placement prefers others.
        #[arg(long, default_value_t = 100)]
        capacity: u32,
        /// Upper bound of the process server's on-disk cache; agents are slowed down beyond it.
        #[arg(long, default_value = "4GiB", value_parser = parse_size)]
        cache_size: u64,
        /// Configuration role: a process server silent this long is failed over.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        failure_timeout: Duration,
        /// Configuration role: while a machine is reprotected, its original site takes the
        /// recovery site's latest changes this often (a reverse pass).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        reverse_every: Duration,
        /// Configuration role: rebalance when process servers' headroom differs by this many machines.
        #[arg(long, default_value_t = 2)]
        rebalance_threshold: u32,
        /// Configuration role: most automatic rebalancing moves per minute.
        #[arg(long, default_value_t = 10)]
        max_moves_per_minute: u32,
        /// Configuration role: rebalance only on `haven ctl rebalance`.
        #[arg(long)]
        no_auto_rebalance: bool,
        /// Configuration role: a machine that moved is not rebalanced again (nor a rebalancing
        /// move reversed) within this time.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        rebalance_cooldown: Duration,
    },
    /// Run the agent on a protected machine.
    Agent {
        /// The site this machine runs at (its master target goes to another site).
        #[arg(long, default_value = haven_cluster::DEFAULT_SITE)]
        site: String,
        #[arg(long)]
        join: String,
        #[arg(long)]
        token_file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        /// A disk to protect, NAME=PATH (a file or a block device); repeat for several.
        #[arg(long = "disk", required = true, value_parser = parse_disk)]
        disks: Vec<(String, PathBuf)>,
        /// Machine name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// How writes are captured: `scan` (any file or block device, periodic passes) or
        /// `tap` (the workload writes through an NBD export per disk,
        /// `<data-dir>/nbd/NAME.sock`; every flush is a crash-consistent recovery point).
        #[arg(long, default_value = "scan", value_parser = ["scan", "tap"])]
        capture: String,
        /// Tap capture: also serve every disk's NBD export on this TCP address.
        #[arg(long)]
        nbd_listen: Option<std::net::SocketAddr>,

        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        scan_interval: Duration,
        /// Bytes of captured-but-unapplied data kept in memory; capture pauses beyond it.
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        retention_size: u64,
        /// Tap capture: run before an app-consistent point (`sh -c CMD`), e.g. `fsfreeze -f
        /// /srv` or a database's backup mode. A failure or timeout gives a crash-consistent
        /// point and an event instead.
        #[arg(long, requires = "thaw_cmd")]
        freeze_cmd: Option<String>,
        /// Run after every freeze, also a failed or timed-out one (`sh -c CMD`).
        #[arg(long, requires = "freeze_cmd")]
        thaw_cmd: Option<String>,
        /// The freeze (and the thaw) is killed after this long.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        freeze_timeout: Duration,
    },
    /// The operator's command line.
    Ctl {
        #[arg(long, default_value = "127.0.0.1:7400")]
        cluster: String,
        #[arg(long)]
        token_file: PathBuf,
        /// Machine-readable output (fields documented in docs/json.md).
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// A self-contained all-in-one cluster with an agent on a generated disk.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Nodes and machines.
    Status,
    Nodes,
    Machines,
    /// Start replicating discovered machines (or change their recovery-point policy);
    /// `--group G` makes them members of consistency group G.
    Protect {
        #[arg(required = true, num_args = 1..)]
        machines: Vec<String>,
        /// Make the machines members of this consistency group (created if new).
        #[arg(long)]
        group: Option<String>,
        /// Recovery-point history to keep (default 24h).
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Option<Duration>,
        /// Cap on the recovery-point journal (default 10% of the disks' size, at least
        /// 64MiB); reaching it shortens history, with a warning.
        #[arg(long, value_parser = parse_size)]
        journal_size: Option<u64>,
        /// A point this often when there were writes but no flush (default 10s).
        #[arg(long, value_parser = humantime::parse_duration)]
        point_every: Option<Duration>,
        /// An app-consistent point this often (the agent's --freeze-cmd, a flush, a barrier,
        /// --thaw-cmd; tap capture). Default off; 0s turns it off again.
        #[arg(long, value_parser = humantime::parse_duration)]
        app_consistent_every: Option<Duration>,
    },
    Unprotect {
        machine: String,
    },
    /// Live-move a machine to another process server; reports the pause and bytes resent.
    Move {
        machine: String,
        #[arg(long)]
        to: String,
    },
    /// One rebalancing pass now.
    Rebalance,
    /// Move every machine off a process server and place none on it.
    Drain {
        node: String,
    },
    Undrain {
        node: String,
    },
    /// Moves, failovers and drains, with their figures.
    Events,
    /// Capture everything written so far and wait until it is applied (exit 3 on timeout,
    /// 4 at once when the machine cannot converge without you).
    WaitSync {
        machine: String,
        #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Enrolment tokens: agent tokens enrol agents, node tokens server nodes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Remove an unprotected machine so its name can be enrolled again; its replica is moved
    /// aside (kept) unless --delete-replica.
    Forget {
        machine: String,
        #[arg(long)]
        delete_replica: bool,
    },
    /// Adopt a disk as it is now (after it shrank or was replaced) and send every block that
    /// differs from the replica.
    Resync {
        machine: String,
        #[arg(long)]
        disk: String,
    },
    /// A recovery point now (tap capture): crash-consistent, `--app` app-consistent (the
    /// agent's freeze and thaw commands), `--name` names it. Waits until the agent has
    /// inserted it and prints its id, seq and kind.
    Mark {
        machine: String,
        #[arg(long)]
        app: bool,
        #[arg(long)]
        name: Option<String>,
        /// How long to wait for the agent.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Every recovery point in the retention window, oldest first, and the window held.
    RecoveryPoints {
        machine: String,
    },
    /// A DR drill: serve the disks as they were at a point as writable copy-on-write NBD
    /// exports at the master target (writes go to a scratch overlay); replication goes on.
    TestFailover {
        machine: String,
        /// A point id from `recovery-points`, `latest`, `latest-app`, or an RFC 3339 time
        /// (the newest point at or before it).
        #[arg(long, default_value = "latest", value_parser = parse_point)]
        point: PointSpec,
        /// Instead of serving, write each disk's view as a sparse image DIR/<disk>.img (on
        /// the master target's host).
        #[arg(long)]
        export: Option<PathBuf>,
    },
    /// End a drill: its exports go, its overlay is discarded.
    TestFailoverCleanup {
        machine: String,
    },
    /// Fail the machine over to the recovery site: the forward stream is fenced and the
    /// master target serves the disks at the point as writable NBD exports. Planned when the
    /// source is up (tap capture, `--point latest`): its tap stops taking writes and its
    /// final point is applied first. Waits until the exports are served and prints them.
    Failover {
        machine: String,
        /// A point id from `recovery-points`, `latest`, `latest-app`, or an RFC 3339 time.
        #[arg(long, default_value = "latest", value_parser = parse_point)]
        point: PointSpec,
        /// How long to wait for the exports.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Before commit: serve another point instead (writes made at the earlier one are
    /// discarded).
    FailoverChangePoint {
        machine: String,
        #[arg(long, value_parser = parse_point)]
        point: PointSpec,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Fix the failover's point: the machine is failed over.
    FailoverCommit {
        machine: String,
    },
    /// Before commit: back to protected; the replica was only read, replication resumes.
    FailoverCancel {
        machine: String,
    },
    /// After commit, with the original site's agent back: make its disks equal to the
    /// recovery disks, comparing every block's hash and sending only the blocks that differ.
    /// Waits until the agent has done it and prints the bytes compared and sent.
    Reprotect {
        machine: String,
        #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Once reprotected: bring the machine home. The recovery disks are flushed and made
    /// read-only, the last differences travel to the original disks, the replica is made
    /// equal to them and the agent takes its disks as the replica; then the machine is
    /// protected from its own site again, with no full resync. Waits until it is.
    Failback {
        machine: String,
        #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Consistency groups: machines whose recovery points are one cut, and which fail over,
    /// reprotect and fail back together.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create group G, or add members to it (a machine is in one group at most).
    Create {
        group: String,
        members: Vec<String>,
        /// A group point this often (default 60s; 0s: only `group mark`).
        #[arg(long, value_parser = humantime::parse_duration)]
        point_every: Option<Duration>,
    },
    /// Delete the group and its points; the members stay protected on their own.
    Delete {
        group: String,
    },
    /// Every group: members, common state, points.
    List,
    /// A group point now: every member holds its write completions while the cut is
    /// placed (at most 3 s). Prints the point's id and each member's point.
    Mark {
        group: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Every group point kept, oldest first (members whose journal pruned their point are
    /// shown; such a point cannot be recovered to).
    RecoveryPoints {
        group: String,
    },
    /// A drill of every member at one group point.
    TestFailover {
        group: String,
        /// A group point id, `latest`, or an RFC 3339 time.
        #[arg(long, default_value = "latest", value_parser = parse_point)]
        point: PointSpec,
        /// Write each member's disks as sparse images DIR/<member>/<disk>.img.
        #[arg(long)]
        export: Option<PathBuf>,
    },
    TestFailoverCleanup {
        group: String,
    },
    /// Fail every member over to one cut: planned (no write lost) with `latest` when every
    /// member's agent is up, else the group point.
    Failover {
        group: String,
        #[arg(long, default_value = "latest", value_parser = parse_point)]
        point: PointSpec,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    FailoverCommit {
        group: String,
    },
    FailoverCancel {
        group: String,
    },
    Reprotect {
        group: String,
        #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    Failback {
        group: String,
        #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// `--point`: `latest`, `latest-app`, a point id, or an RFC 3339 time.
fn parse_point(s: &str) -> Result<PointSpec, String> {
    match s {
        "latest" => return Ok(PointSpec::Latest),
        "latest-app" => return Ok(PointSpec::LatestApp),
        _ => {}
    }
    if let Ok(seq) = s.parse::<u64>() {
        return Ok(PointSpec::Seq(seq));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        format!("{s:?} is not a point id, `latest`, `latest-app` or an RFC 3339 time: {e}")
    })?;
    let time_ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?
        .as_millis() as u64;
    Ok(PointSpec::AtOrBefore { time_ms })
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; prints it (shown only this once).
    Create {
        #[arg(long, value_parser = ["agent", "node"])]
        kind: String,
        /// It enrols nothing after this long (default: never expires).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Every token, without secrets.
    List,
    /// It enrols nothing from now on (what it enrolled stays).
    Revoke { id: String },
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_disk(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or("expected NAME=PATH")?;
    if name.is_empty() || path.is_empty() {
        return Err("expected NAME=PATH".into());
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "haven".into())
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    // Plain text when logging to a file, so logs grep cleanly (tests look for " ERROR ").
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// actix with a multi-threaded tokio runtime: actors on the main thread's LocalSet, data-path
/// tasks (`tokio::spawn`) on two workers, sealing and disk I/O in the blocking pool.
fn system() -> actix::SystemRunner {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Batches are 4-8 MiB buffers with short lives. glibc's default raises its mmap threshold
/// after the first such buffer is freed and from then on serves them from per-thread arenas
/// that never shrink: RSS grew to several times the retention buffer. A fixed threshold keeps
/// big buffers in mmap (returned to the kernel on free); fewer arenas bound the rest.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Node {
            roles,
            data_dir,
            listen,
            advertise,
            join,
            token_file,
            name,
            capacity,
            cache_size,
            failure_timeout,
            reverse_every,
            rebalance_threshold,
            max_moves_per_minute,
            no_auto_rebalance,
            rebalance_cooldown,
            site,
        } => {
            init_logging("info,quinn=warn");
            let roles = if roles.is_empty() || roles.iter().any(|r| r == "all") {
                haven_cluster::ALL_ROLES
                    .iter()
                    .map(|r| r.to_string())
                    .collect()
            } else {
                let mut r = roles;
                r.dedup();
                r
            };
            let opts = NodeOptions {
                data_dir,
                roles,
                listen,
                advertise,
                name: name.unwrap_or_else(hostname),
                join: join.zip(token_file),
                capacity,
                cache_limit_bytes: cache_size,
                failure_timeout,
                reverse_every,
                rebalance: haven_roles::configuration::core::scaleout::RebalancePolicy {
                    auto: !no_auto_rebalance,
                    skew_threshold: rebalance_threshold.max(2),
                    max_moves_per_minute,
                    cooldown: rebalance_cooldown,
                },
                site: site.clone(),
            };
            finish(system().block_on(haven_roles::node::run(opts)))
        }
        Command::Agent {
            join,
            token_file,
            data_dir,
            disks,
            name,
            capture,
            nbd_listen,
            scan_interval,
            retention_size,
            freeze_cmd,
            thaw_cmd,
            freeze_timeout,
            site,
        } => {
            init_logging("info,quinn=warn");
            let hooks =
                freeze_cmd
                    .zip(thaw_cmd)
                    .map(|(freeze, thaw)| haven_roles::agent::freeze::Hooks {
                        freeze,
                        thaw,
                        timeout: freeze_timeout,
                    });
            if hooks.is_some() && capture != "tap" {
                eprintln!("error: --freeze-cmd needs --capture tap (app-consistent points are barriers in the tap's stream)");
                std::process::exit(2);
            }
            let opts = AgentOptions {
                data_dir,
                join: Some((join, token_file)),
                disks,
                machine_defaulted: name.is_none(),
                machine: name.unwrap_or_else(hostname),
                scan_interval,
                retention_bytes: retention_size,
                hooks,
                site: site.clone(),
            };
            if capture == "tap" {
                let tap = std::sync::Arc::new(haven_roles::agent::tap::TapCapture::new(nbd_listen));
                finish(system().block_on(haven_roles::agent::run_with(opts, tap)))
            } else {
                if nbd_listen.is_some() {
                    eprintln!("error: --nbd-listen needs --capture tap");
                    std::process::exit(2);
                }
                finish(system().block_on(haven_roles::agent::run(opts)))
            }
        }
        Command::Ctl {
            cluster,
            token_file,
            json,
            command,
        } => {
            init_logging("warn");
            system().block_on(run_ctl(cluster, token_file, json, command))
        }
        Command::Demo(args) => {
            init_logging("warn");
            finish(
                system()
                    .block_on(demo::run(args))
                    .map_err(anyhow::Error::msg),
            )
        }
    }
}

/// The binary's edge: an error is printed with its context chain, and exits 1.
fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_ctl(
    cluster: String,
    token_file: PathBuf,
    json: bool,
    command: CtlCommand,
) -> ExitCode {
    let admin = match ctl::Admin::connect(&cluster, &token_file).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let code = ctl_command(&admin, json, command).await;
    admin.close().await;
    code
}

async fn ctl_command(admin: &ctl::Admin, json: bool, command: CtlCommand) -> ExitCode {
    let print_json = |v: &dyn erased::Json| println!("{}", v.to_json());
    let cmd = match command {
        CtlCommand::WaitSync { machine, timeout } => {
            return ctl_wait_sync(admin, json, machine, timeout).await
        }
        CtlCommand::Move { machine, to } => return ctl_move(admin, json, machine, to).await,
        CtlCommand::Mark {
            machine,
            app,
            name,
            timeout,
        } => return ctl_mark(admin, json, machine, app, name, timeout).await,
        CtlCommand::Token {
            command:
                TokenCommand::Create {
                    kind,
                    ttl,
                    description,
                },
        } => return ctl_token_create(admin, json, kind, ttl, description).await,
        CtlCommand::Token {
            command: TokenCommand::List,
        } => AdminCommand::TokenList,
        CtlCommand::Token {
            command: TokenCommand::Revoke { id },
        } => AdminCommand::TokenRevoke { id },
        CtlCommand::Forget {
            machine,
            delete_replica,
        } => AdminCommand::Forget {
            machine,
            delete_replica,
        },
        CtlCommand::Resync { machine, disk } => AdminCommand::Resync { machine, disk },
        CtlCommand::RecoveryPoints { machine } => {
            AdminCommand::Recovery(RecoveryRequest::Points { machine })
        }
        CtlCommand::TestFailover {
            machine,
            point,
            export,
        } => {
            let export_dir = match absolute_export(export) {
                Ok(d) => d,
                Err(code) => return code,
            };
            AdminCommand::Recovery(RecoveryRequest::TestFailover {
                machine,
                point,
                export_dir,
            })
        }
        CtlCommand::TestFailoverCleanup { machine } => {
            AdminCommand::Recovery(RecoveryRequest::TestFailoverCleanup { machine })
        }
        CtlCommand::Failover {
            machine,
            point,
            timeout,
        } => {
            let cmd = AdminCommand::Failover {
                machine: machine.clone(),
                point,
            };
            return ctl_failover(admin, json, machine, Until::Served(cmd), timeout).await;
        }
        CtlCommand::FailoverChangePoint {
            machine,
            point,
            timeout,
        } => {
            let cmd = AdminCommand::FailoverChangePoint {
                machine: machine.clone(),
                point,
            };
            return ctl_failover(admin, json, machine, Until::Served(cmd), timeout).await;
        }
        CtlCommand::FailoverCommit { machine } => AdminCommand::FailoverCommit { machine },
        CtlCommand::Reprotect { machine, timeout } => {
            return ctl_failover(admin, json, machine, Until::Reprotected, timeout).await
        }
        CtlCommand::Failback { machine, timeout } => {
            return ctl_failover(admin, json, machine, Until::FailedBack, timeout).await
        }
        CtlCommand::FailoverCancel { machine } => AdminCommand::FailoverCancel { machine },
        CtlCommand::Rebalance => AdminCommand::Rebalance,
        CtlCommand::Drain { node } => AdminCommand::Drain { node },
        CtlCommand::Undrain { node } => AdminCommand::Undrain { node },
        CtlCommand::Events => AdminCommand::Events,
        CtlCommand::Status => AdminCommand::Status,
        CtlCommand::Nodes => AdminCommand::Nodes,
        CtlCommand::Machines => AdminCommand::Machines,
        CtlCommand::Protect {
            machines,
            group,
            retention,
            journal_size,
            point_every,
            app_consistent_every,
        } => {
            let policy = haven_cluster::ProtectPolicy {
                retention_ms: retention.map(|d| d.as_millis() as u64),
                journal_cap_bytes: journal_size,
                point_every_ms: point_every.map(|d| d.as_millis() as u64),
                app_consistent_every_ms: app_consistent_every.map(|d| d.as_millis() as u64),
            };
            return ctl_protect(admin, json, machines, group, policy).await;
        }
        CtlCommand::Group { command } => return ctl_group(admin, json, command).await,
        CtlCommand::Unprotect { machine } => AdminCommand::Unprotect { machine },
    };
    match admin.call(cmd).await {
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
        Ok(reply) => {
            match reply {
                AdminReply::Status(s) if json => print_json(&s),
                AdminReply::Status(s) => {
                    println!("cluster {}", s.cluster_id);
                    ctl::print_nodes(&s.nodes);
                    println!();
                    ctl::print_machines(&s.machines);
                    if !s.groups.is_empty() {
                        println!();
                        ctl::print_groups(&s.groups);
                    }
                }
                AdminReply::Nodes(n) if json => print_json(&n),
                AdminReply::Nodes(n) => ctl::print_nodes(&n),
                AdminReply::Machines(m) if json => print_json(&m),
                AdminReply::Machines(m) => ctl::print_machines(&m),
                AdminReply::Done { message } if json => {
                    println!("{}", serde_json::json!({"ok": true, "message": message}))
                }
                AdminReply::Done { message } => println!("{message}"),
                AdminReply::Events(e) if json => print_json(&e),
                AdminReply::Events(e) => ctl::print_events(&e),
                AdminReply::Rebalanced { moves } if json => print_json(&moves),
                AdminReply::Rebalanced { moves } if moves.is_empty() => {
                    println!("balanced: no moves needed")
                }
                AdminReply::Rebalanced { moves } => ctl::print_events(&moves),
                AdminReply::Tokens(t) if json => print_json(&t),
                AdminReply::Tokens(t) => ctl::print_tokens(&t),
                AdminReply::Recovery(RecoveryReply::Points(p)) if json => print_json(&p),
                AdminReply::Recovery(RecoveryReply::Points(p)) => ctl::print_points(&p, None),
                AdminReply::Recovery(RecoveryReply::TestFailover(t)) if json => print_json(&t),
                AdminReply::Recovery(RecoveryReply::TestFailover(t)) => ctl::print_drill(&t),
                AdminReply::Recovery(RecoveryReply::Cleaned(c)) if json => print_json(&c),
                AdminReply::Recovery(RecoveryReply::Cleaned(c)) => println!("{}", c.message),
                AdminReply::Failover(f) if json => print_json(&f),
                AdminReply::Failover(f) => ctl::print_failover(&f),
                other => println!("{other:?}"),
            }
            ExitCode::SUCCESS
        }
    }
}

/// What a failover command waits for.
enum Until {
    /// `ctl failover` and `failover-change-point` (the command): the point is served.
    Served(AdminCommand),
    /// `ctl reprotect`: the agent's reverse pass is done.
    Reprotected,
    /// `ctl failback`: protected from the original site again.
    FailedBack,
}

/// A failover command: the request, then its progress, what it waits for (or why it fails)
/// shown as it changes.
async fn ctl_failover(
    admin: &ctl::Admin,
    json: bool,
    machine: String,
    until: Until,
    timeout: Duration,
) -> ExitCode {
    let mut said = None;
    let progress = |v: &haven_roles::view::FailoverView| {
        let now = v
            .reverse
            .as_ref()
            .and_then(|r| r.error.clone())
            .or(v.error.clone())
            .or(v.waiting_for.clone());
        if now != said {
            if let Some(w) = &now {
                let at = if v.state == "failover-pending" || v.state == "failing-back" {
                    &v.stage
                } else {
                    &v.state
                };
                eprintln!("{machine}: {at}: {w}");
            }
            said = now;
        }
    };
    let r = match until {
        Until::Served(cmd) => admin.failover(&machine, cmd, timeout, progress).await,
        Until::Reprotected => admin.reprotect(&machine, timeout, progress).await,
        Until::FailedBack => admin.failback(&machine, timeout, progress).await,
    };
    match r {
        Ok(view) if json => println!(
            "{}",
            serde_json::to_string_pretty(&view).unwrap_or_default()
        ),
        Ok(view) => ctl::print_failover(&view),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    }
    ExitCode::SUCCESS
}

/// `ctl wait-sync`: the barrier, with progress and the reason the machine is degraded while
/// waiting; at once with the reason when it cannot converge without the operator.
async fn ctl_wait_sync(
    admin: &ctl::Admin,
    json: bool,
    machine: String,
    timeout: Duration,
) -> ExitCode {
    let started = std::time::Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut said: Option<String> = None;
    let r = admin
        .wait_sync(&machine, timeout, |barrier, applied, degraded| {
            if json {
                return;
            }
            if tty {
                eprint!(
                    "\rwaiting: barrier {} applied {applied}   ",
                    barrier
                        .map(|b| b.to_string())
                        .unwrap_or_else(|| "(scanning)".into())
                );
            }
            // A degraded machine says why while we wait (once per reason).
            if degraded.map(String::from) != said {
                if let Some(d) = degraded {
                    eprintln!("{}{machine} is degraded: {d}", if tty { "\n" } else { "" });
                }
                said = degraded.map(String::from);
            }
        })
        .await;
    let secs = started.elapsed().as_secs_f64();
    // As every failing ctl command: nothing on stdout, the error on stderr, an exit code.
    let fail = |code: u8, msg: String| {
        eprintln!("\nerror: {msg}");
        ExitCode::from(code)
    };
    match r {
        Ok(ctl::WaitEnd::Synced) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"machine": machine, "synced": true, "seconds": secs})
                );
            } else {
                if tty {
                    eprintln!();
                }
                println!("{machine}: in sync ({secs:.1}s)");
            }
            ExitCode::SUCCESS
        }
        Ok(ctl::WaitEnd::Blocked(reason)) => fail(
            ctl::EXIT_BLOCKED,
            format!("{machine} cannot be brought in sync without you: {reason}"),
        ),
        Ok(ctl::WaitEnd::TimedOut(degraded)) => {
            let why = degraded
                .as_ref()
                .map(|d| format!(" (it is degraded: {d})"))
                .unwrap_or_default();
            fail(
                ctl::EXIT_TIMEOUT,
                format!(
                    "{machine} did not sync within {}{why}",
                    humantime::format_duration(timeout)
                ),
            )
        }
        Err(e) => fail(e.exit_code(), e.to_string()),
    }
}

/// `ctl mark`: request the point, then wait (bounded) until the agent reports it inserted.
/// `ctl protect M… [--group G]`: each machine, then the group.
async fn ctl_protect(
    admin: &ctl::Admin,
    json: bool,
    machines: Vec<String>,
    group: Option<String>,
    policy: haven_cluster::ProtectPolicy,
) -> ExitCode {
    let mut said = vec![];
    for machine in &machines {
        let cmd = AdminCommand::Protect {
            machine: machine.clone(),
            policy: policy.clone(),
        };
        match admin.call(cmd).await {
            Ok(AdminReply::Done { message }) => said.push(message),
            Ok(other) => said.push(format!("{other:?}")),
            Err(e) => return ctl_fail(e),
        }
    }
    let mut groups = vec![];
    if let Some(group) = group {
        let cmd = AdminCommand::GroupAdd {
            group,
            members: machines,
            point_every_ms: None,
        };
        match admin.call(cmd).await {
            Ok(AdminReply::Groups(g)) => groups = g,
            Ok(other) => said.push(format!("{other:?}")),
            Err(e) => return ctl_fail(e),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "message": said.join("; "), "messages": said, "groups": groups})
        );
    } else {
        said.iter().for_each(|m| println!("{m}"));
        ctl::print_groups(&groups);
    }
    ExitCode::SUCCESS
}

/// `--export DIR` as an absolute path: the master target writes there, from its own cwd.
fn absolute_export(dir: Option<PathBuf>) -> Result<Option<String>, ExitCode> {
    match dir.map(|d| std::path::absolute(&d)).transpose() {
        Ok(d) => Ok(d.map(|d| d.display().to_string())),
        Err(e) => {
            eprintln!("error: --export: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn ctl_fail(e: ctl::CtlError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(e.exit_code())
}

/// `ctl group …`.
async fn ctl_group(admin: &ctl::Admin, json: bool, command: GroupCommand) -> ExitCode {
    fn show<T: serde::Serialize>(json: bool, v: &T, text: impl FnOnce(&T)) -> ExitCode {
        if json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            text(v);
        }
        ExitCode::SUCCESS
    }
    let groups = |r: Result<AdminReply, ctl::CtlError>| match r {
        Ok(AdminReply::Groups(g)) => show(json, &g, |g| ctl::print_groups(g)),
        Ok(AdminReply::Done { message }) => show(json, &message, |m| println!("{m}")),
        Ok(other) => show(json, &format!("{other:?}"), |m| println!("{m}")),
        Err(e) => ctl_fail(e),
    };
    match command {
        GroupCommand::Create {
            group,
            members,
            point_every,
        } => groups(
            admin
                .call(AdminCommand::GroupAdd {
                    group,
                    members,
                    point_every_ms: point_every.map(|d| d.as_millis() as u64),
                })
                .await,
        ),
        GroupCommand::Delete { group } => {
            groups(admin.call(AdminCommand::GroupDelete { group }).await)
        }
        GroupCommand::List => groups(admin.call(AdminCommand::Groups).await),
        GroupCommand::Mark {
            group,
            name,
            timeout,
        } => match admin.group_mark(&group, name, timeout).await {
            Ok(Some(p)) => show(json, &p, ctl::print_group_point),
            Ok(None) => {
                eprintln!(
                    "error: group {group}'s cut was not placed within {}",
                    humantime::format_duration(timeout)
                );
                ExitCode::from(ctl::EXIT_TIMEOUT)
            }
            Err(e) => ctl_fail(e),
        },
        GroupCommand::RecoveryPoints { group } => match admin.group_points(&group).await {
            Ok(p) => show(json, &p, |p| ctl::print_group_points(&group, p)),
            Err(e) => ctl_fail(e),
        },
        GroupCommand::TestFailover {
            group,
            point,
            export,
        } => {
            let export = match absolute_export(export) {
                Ok(d) => d,
                Err(code) => return code,
            };
            match admin
                .group_test_failover(&group, &point, export.as_deref())
                .await
            {
                Ok(v) => show(json, &v, |v| {
                    println!(
                        "group {}: test failover of group point {}",
                        v.group, v.point.id
                    );
                    v.members.iter().for_each(ctl::print_drill);
                }),
                Err(e) => ctl_fail(e),
            }
        }
        GroupCommand::TestFailoverCleanup { group } => {
            match admin.group_test_failover_cleanup(&group).await {
                Ok(said) => show(json, &said, |s| s.iter().for_each(|m| println!("{m}"))),
                Err(e) => ctl_fail(e),
            }
        }
        GroupCommand::Failover {
            group,
            point,
            timeout,
        } => group_failover_shown(json, admin.group_failover(&group, &point, timeout).await),
        GroupCommand::FailoverCommit { group } => group_failover_shown(
            json,
            admin
                .group_each(&group, |machine| AdminCommand::FailoverCommit { machine })
                .await,
        ),
        GroupCommand::FailoverCancel { group } => group_failover_shown(
            json,
            admin
                .group_each(&group, |machine| AdminCommand::FailoverCancel { machine })
                .await,
        ),
        GroupCommand::Reprotect { group, timeout } => {
            group_failover_shown(json, admin.group_reverse(&group, false, timeout).await)
        }
        GroupCommand::Failback { group, timeout } => {
            group_failover_shown(json, admin.group_reverse(&group, true, timeout).await)
        }
    }
}

fn group_failover_shown(
    json: bool,
    r: Result<haven_roles::view::GroupFailoverView, ctl::CtlError>,
) -> ExitCode {
    match r {
        Ok(v) if json => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(v) => {
            match &v.point {
                Some(p) => println!("group {}: at group point {}", v.group, p.id),
                None => println!("group {}:", v.group),
            }
            v.notes.iter().for_each(|n| println!("  {n}"));
            v.members.iter().for_each(ctl::print_failover);
            ExitCode::SUCCESS
        }
        Err(e) => ctl_fail(e),
    }
}

async fn ctl_mark(
    admin: &ctl::Admin,
    json: bool,
    machine: String,
    app: bool,
    name: Option<String>,
    timeout: Duration,
) -> ExitCode {
    match admin.mark(&machine, app, name, timeout).await {
        Ok(Some(p)) => {
            for w in &p.warnings {
                eprintln!("warning: {w}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&p).unwrap_or_default());
            } else {
                let name = ctl::name_text(p.name.as_deref());
                println!(
                    "{machine}: {} point{name} at seq {} (point id {})",
                    p.kind, p.seq, p.point
                );
            }
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!(
                "error: the agent of {machine} did not report the point within {}",
                humantime::format_duration(timeout)
            );
            ExitCode::from(ctl::EXIT_TIMEOUT)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `ctl token create`: prints the token (only the token, so it can be redirected to a file).
async fn ctl_token_create(
    admin: &ctl::Admin,
    json: bool,
    kind: String,
    ttl: Option<Duration>,
    description: String,
) -> ExitCode {
    let reply = admin
        .call(AdminCommand::TokenCreate {
            kind,
            ttl_ms: ttl.map(|t| t.as_millis() as u64),
            description,
        })
        .await;
    match reply {
        Ok(AdminReply::TokenCreated {
            id,
            kind,
            secret,
            expires_ms,
        }) => {
            let Some(k) = haven_transport::identity::TokenKind::parse(&kind) else {
                eprintln!("error: the configuration node created a token of unknown kind {kind:?}");
                return ExitCode::FAILURE;
            };
            let token = admin.token_text(k, &secret);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": id, "kind": kind, "token": token, "expires_ms": expires_ms})
                );
            } else {
                println!("{token}");
                eprintln!(
                    "token {id} ({kind}) created; it is shown only now: keep it in a file readable by its user only"
                );
            }
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("error: unexpected reply {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `ctl move`: request the move, then wait until the agent reports what it cost.
async fn ctl_move(admin: &ctl::Admin, json: bool, machine: String, to: String) -> ExitCode {
    let reply = admin
        .call(AdminCommand::Move {
            machine: machine.clone(),
            to: to.clone(),
        })
        .await;
    let (from, generation) = match reply {
        Ok(AdminReply::Moved {
            from, generation, ..
        }) => (from, generation),
        Ok(other) => {
            eprintln!("error: unexpected reply {other:?}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let events = match admin.call(AdminCommand::Events).await {
            Ok(AdminReply::Events(e)) => e,
            Ok(_) | Err(_) => vec![],
        };
        if let Some(e) = events
            .iter()
            .rev()
            .find(|e| e.machine == machine && e.generation == generation && e.pause_ms.is_some())
        {
            if json {
                println!("{}", serde_json::to_string_pretty(e).unwrap_or_default());
            } else {
                println!(
                    "{machine} moved {from} -> {to} (generation {generation}): replication paused {} ms, {} resent",
                    e.pause_ms.unwrap_or(0),
                    ctl::human_bytes(e.bytes_resent.unwrap_or(0))
                );
            }
            return ExitCode::SUCCESS;
        }
        if std::time::Instant::now() > deadline {
            eprintln!("error: {machine} was reassigned to {to} (generation {generation}) but its agent has not reported the move within 60s");
            return ExitCode::from(ctl::EXIT_TIMEOUT);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        }
    }
}
