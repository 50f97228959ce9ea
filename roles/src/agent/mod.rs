//! The agent: enrolls a machine, captures its disks' changes, numbers them, streams them to
//! its process server and retains them until the master target has applied them.
//!
//! ```text
//! Supervisor "agent/<machine>"
//!  ├─ control   task (control.rs): long-polls the configuration node (protection, epoch,
//!  │            process server, sync barriers, resyncs, `ctl mark` requests → marks.rs)
//!  ├─ journal   task: makes the applied hash tables durable (journal, snapshots)
//!  ├─ capture   task (capture.rs): a CaptureSource — scan passes — writing into the core
//!  └─ stream    task (stream.rs): sends retained batches to the process server, folds acks
//!               into the core; reconnects by itself after the peer or the network failed
//! ```
//! The stream state is one [`core::AgentCore`] behind a lock that no task holds across I/O
//! (see `state.rs`). Before every pass the scan capture checks each disk's identity and
//! size (see [`disks`]).
pub mod capture;
pub mod core;
pub mod disks;
pub mod freeze;
pub mod journal;
pub mod marks;
pub mod reverse;
pub mod scan;
pub mod tap;

mod control;
mod state;
mod stream;

use std::{
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use haven_actors::{AddChild, ChildSpec, Supervisor, SupervisorConfig, TaskError};
use haven_cluster::DiskInfo;
use haven_transport::endpoint;
use tokio::sync::{watch, Notify};

use self::capture::{CaptureSink, CaptureSource, ScanCapture};
use self::core::{AgentCore, InitialSync};
use self::disks::DiskRecord;
use self::state::{
    load_control, load_disks, load_tables, lock, observe_all, Agent, AgentError, DiskSet,
};
use crate::{
    enroll::{self, Identity},
    fsutil::unix_ms,
    link::Dialer,
    proto::JoinKind,
};

/// How often applied hash updates are journaled (and fsynced): after a crash, at most about
/// this much applied data is captured again.
const JOURNAL_EVERY: Duration = Duration::from_millis(200);
/// A full snapshot of the tables replaces the journal this often, or when it grows large.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(30);
const JOURNAL_BYTES_MAX: u64 = 16 << 20;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub data_dir: PathBuf,
    /// The site the machine runs at (`--site`).
    pub site: String,
    pub join: Option<(String, PathBuf)>,
    pub disks: Vec<(String, PathBuf)>,
    pub machine: String,
    /// `--name` was not given: the machine name is the host name (a clone has the same).
    pub machine_defaulted: bool,
    pub scan_interval: Duration,
    pub retention_bytes: u64,
    /// `--freeze-cmd`, `--thaw-cmd`, `--freeze-timeout`: app-consistent points (tap capture).
    pub hooks: Option<freeze::Hooks>,
}

/// Runs the agent with scan capture until SIGINT/SIGTERM (inside an actix System with a
/// multi-threaded runtime).
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    let scan = Arc::new(ScanCapture {
        interval: opts.scan_interval,
    });
    run_with(opts, scan).await
}

/// Runs the agent with the given capture source.
pub async fn run_with(opts: AgentOptions, source: Arc<dyn CaptureSource>) -> anyhow::Result<()> {
    if opts.disks.is_empty() {
        anyhow::bail!("an agent needs at least one --disk NAME=PATH");
    }
    let observed = observe_all(&opts)?;
    crate::fsutil::create_private_dir(&opts.data_dir.join("agent"))
        .with_context(|| format!("create {}", opts.data_dir.display()))?;
    let hostname = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let identity = match Identity::load(&opts.data_dir)? {
        Some(id) => id,
        None => {
            let (addr, token_file) = opts
                .join
                .as_ref()
                .context("no identity in the data dir yet: pass --join ADDR --token-file FILE")?;
            let token = enroll::read_join_token(token_file)?;
            let kind = JoinKind::Agent {
                machine: opts.machine.clone(),
                hostname: hostname.clone(),
                disks: opts
                    .disks
                    .iter()
                    .zip(&observed)
                    .map(|((name, _), o)| DiskInfo {
                        name: name.clone(),
                        size_bytes: o.size_bytes,
                        path: o.path.clone(),
                        id: disks::adopt(name, o, &[], 0).id_text(),
                    })
                    .collect(),
            };
            let id = match enroll::join(addr, &token, kind).await {
                Ok(id) => id,
                Err(e) if opts.machine_defaulted => anyhow::bail!(
                    "{e}\n(--name defaulted to this host's name, {}: a cloned machine must be given another with --name)",
                    opts.machine
                ),
                Err(e) => return Err(e.into()),
            };
            id.save(&opts.data_dir)?;
            tracing::info!(machine = %opts.machine, cluster = %id.cluster_id, "enrolled; protect it with `haven ctl protect {}`", opts.machine);
            id
        }
    };
    let control = load_control(&opts)?;
    let endpoint = endpoint::client_endpoint()?;
    let dialer = Dialer::new(endpoint, identity.client_config()?);
    let agent = Arc::new(Agent {
        hostname,
        instance: rand::random::<u64>() | 1,
        identity,
        dialer,
        disks: Mutex::new(DiskSet::default()),
        core: Mutex::new(AgentCore::new(0, 0, vec![], vec![], 0, None)),
        journal: Mutex::new(None),
        snapshot_sizes: Mutex::new(vec![]),
        control: watch::Sender::new(control.clone()),
        control_write: Mutex::new(()),
        heard: watch::Sender::new(false),
        reset: watch::Sender::new(0),
        new_batch: Notify::new(),
        room: Notify::new(),
        scan_now: Notify::new(),
        floor_known: Notify::new(),
        report_now: Notify::new(),
        pass_scanned: AtomicU64::new(0),
        scans: AtomicU64::new(0),
        stream_restarts: AtomicU64::new(0),
        report_seq: AtomicU64::new(0),
        capture_name: source.name(),
        capture_note: Mutex::new(None),
        point_every_ms: AtomicU64::new(haven_cluster::ProtectPolicy::POINT_EVERY_MS),
        takes_marks: source.takes_marks(),
        marks: Mutex::new(marks::MarkBox::default()),
        mark_now: Notify::new(),
        released: watch::Sender::new(vec![]),
        reverse: Mutex::new(Default::default()),
        opts: opts.clone(),
    });
    let recorded = load_disks(&opts, control.epoch)?;
    let names: Vec<&str> = opts.disks.iter().map(|(n, _)| n.as_str()).collect();
    let core = match (recorded, load_tables(&opts, control.epoch)) {
        // The disk set changed under a protection: nothing can be sent until it is
        // protected again (the replica's disks are the recorded ones).
        (Some(records), _)
            if control.epoch > 0
                && records
                    .iter()
                    .map(|r| r.name.as_str())
                    .ne(names.iter().copied()) =>
        {
            let protected: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
            let reason = format!(
                "the agent protects disks {} but {} was protected with disks {}: nothing is replicated; \
                 restart the agent with the protected disks, or unprotect and protect {} to change them",
                names.join(", "),
                opts.machine,
                protected.join(", "),
                opts.machine
            );
            tracing::error!("{reason}");
            let mut set = DiskSet::adopted(records);
            set.mismatch = Some((reason, unix_ms()));
            *lock(&agent.disks) = set;
            AgentCore::new(control.epoch, 0, vec![], vec![], opts.retention_bytes, None)
        }
        (recorded, Some(f)) => {
            tracing::info!(
                epoch = f.epoch,
                applied_seq = f.applied_seq,
                "resuming from the checkpointed hash tables (no full resync)"
            );
            let tables: Vec<Vec<u64>> = f
                .disks
                .iter()
                .map(|d| {
                    d.hashes_le
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect()
                })
                .collect();
            let sizes: Vec<u64> = f.disks.iter().map(|d| d.size_bytes).collect();
            // Without a record (an agent of an earlier version), the disks are adopted at
            // the size the replica has: a growth since shows as growth.
            let records = recorded.unwrap_or_else(|| {
                names
                    .iter()
                    .zip(&observed)
                    .zip(tables.iter().zip(&sizes))
                    .map(|((name, o), (t, &size))| DiskRecord {
                        size_bytes: size,
                        ..disks::adopt(name, o, t, 0)
                    })
                    .collect()
            });
            *lock(&agent.disks) = DiskSet::adopted(records);
            *lock(&agent.snapshot_sizes) = sizes.clone();
            let initial = (!f.initial_done).then(|| InitialSync {
                total_bytes: sizes.iter().sum(),
                ..Default::default()
            });
            AgentCore::new(
                f.epoch,
                f.applied_seq,
                tables,
                sizes,
                opts.retention_bytes,
                initial,
            )
        }
        (_, None) => agent.fresh_core(control.epoch)?,
    };
    let (journal, replay) =
        journal::Journal::open(&agent.dir().join("journal"), core.epoch, core.applied_seq)
            .with_context(|| "open the applied-hash journal")?;
    let mut core = core;
    if replay.records > 0 {
        tracing::info!(
            records = replay.records,
            applied_seq = replay.applied_seq,
            "replayed the applied-hash journal"
        );
        core.replay(replay.applied_seq, &replay.updates);
        core.applied_dirty = true;
    }
    let epoch = core.epoch;
    *lock(&agent.core) = core;
    *lock(&agent.journal) = Some(journal);
    agent.save_disks(epoch)?;

    let root = Supervisor::start_root(SupervisorConfig::new(format!("agent/{}", opts.machine)));
    let a = agent.clone();
    let control_child = ChildSpec::task("control", move |_| control::control_loop(a.clone()));
    let sink = CaptureSink {
        agent: agent.clone(),
    };
    tracing::info!(capture = source.name(), "capturing");
    let capture_child = ChildSpec::task("capture", move |_| source.clone().run(sink.clone()));
    let a = agent.clone();
    let journal_child = ChildSpec::task("journal", move |_| journal_loop(a.clone()));
    let a = agent.clone();
    let stream_child = ChildSpec::task("stream", move |_| stream::stream_loop(a.clone()));
    for spec in [control_child, journal_child, capture_child, stream_child] {
        root.send(AddChild(spec))
            .await
            .context("start the agent's supervision tree")?
            .context("start the agent's supervision tree")?;
    }
    let outcome = haven_actors::serve_until_signal(&root).await;
    agent.journal_applied()?;
    lock(&agent.core).applied_dirty = true;
    agent.snapshot()?;
    tracing::info!("agent stopped; hash tables saved");
    Ok(outcome?)
}

/// Makes applied hash updates durable: journal every 200 ms, snapshot now and then.
async fn journal_loop(a: Arc<Agent>) -> Result<(), TaskError> {
    let mut last_snapshot = Instant::now();
    let mut reset = a.reset.subscribe();
    loop {
        let epoch_changed = tokio::select! {
            _ = tokio::time::sleep(JOURNAL_EVERY) => false,
            r = reset.changed() => { r.map_err(|_| TaskError::fatal("the agent's state is gone"))?; true }
        };
        let a2 = a.clone();
        let big = tokio::task::spawn_blocking(move || {
            a2.journal_applied()?;
            Ok::<_, AgentError>(
                lock(&a2.journal).as_ref().map(|j| j.bytes()).unwrap_or(0) > JOURNAL_BYTES_MAX,
            )
        })
        .await
        .map_err(TaskError::retry)??;
        // A resize that got applied is snapshotted at once (the journal records hashes only).
        let resized = lock(&a.core).applied_sizes != *lock(&a.snapshot_sizes);
        if epoch_changed || big || resized || last_snapshot.elapsed() >= SNAPSHOT_EVERY {
            let a2 = a.clone();
            tokio::task::spawn_blocking(move || a2.snapshot())
                .await
                .map_err(TaskError::retry)??;
            last_snapshot = Instant::now();
        }
    }
}
