//! The agent: enrolls a machine, captures its disks' changes, numbers them, streams them to
//! its process server and retains them until the master target has applied them.
//!
//! ```text
//! Supervisor "agent/<machine>"
//!  ├─ control   polls the configuration node: protection, epoch, process server, sync barriers;
//!  │            checkpoints the applied hash table
//!  ├─ capture   scan passes: changed blocks → numbered batches in the retention buffer
//!  └─ stream    sends retained batches to the process server, folds acks into the core
//! ```
//! All three share [`core::AgentCore`] behind a mutex; none holds it across I/O. Before every
//! pass the capture checks each disk's identity and size (see [`disks`]).
pub mod core;
pub mod disks;
pub mod journal;
pub mod scan;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use haven_actors::{AddChild, ChildSpec, Supervisor, SupervisorConfig};
use haven_cluster::DiskInfo;
use haven_transport::{
    codec, endpoint,
    frame::{self, MAX_CONTROL_FRAME},
};
use quinn::Connection;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};

use self::core::{AgentCore, InitialSync};
use self::disks::{DiskRecord, DisksFile, Observed, Verdict};
use crate::{
    client::{self, CallError},
    enroll::{self, resolve, Identity},
    fsutil::{read_optional, unix_ms, write_atomic},
    proto::{
        Ack, AgentPollReply, AgentReport, AgentStats, BatchBody, DiskBlock, JoinKind, Request,
        Response, StreamOpen, WriteRecord,
    },
};

/// Raw bytes per batch.
const BATCH_BYTES: u64 = 4 << 20;
/// How often applied hash updates are journaled (and fsynced): after a crash, at most about
/// this much applied data is captured again.
const JOURNAL_EVERY: Duration = Duration::from_millis(200);
/// A full snapshot of the tables replaces the journal this often, or when it grows large.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(30);
const JOURNAL_BYTES_MAX: u64 = 16 << 20;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub data_dir: PathBuf,
    pub join: Option<(String, PathBuf)>,
    pub disks: Vec<(String, PathBuf)>,
    pub machine: String,
    /// `--name` was not given: the machine name is the host name (a clone has the same).
    pub machine_defaulted: bool,
    pub scan_interval: Duration,
    pub retention_bytes: u64,
}

/// What the configuration node last said about this machine; persisted so the data path
/// keeps going while the configuration node is down.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Control {
    protected: bool,
    epoch: u32,
    generation: u64,
    process_server: Option<(String, String)>,
}

/// The applied hash tables on disk: `<data>/agent/tables`.
#[derive(Serialize, Deserialize)]
struct TablesFile {
    version: u32,
    epoch: u32,
    applied_seq: u64,
    initial_done: bool,
    disks: Vec<TableDisk>,
}

#[derive(Serialize, Deserialize)]
struct TableDisk {
    name: String,
    /// The disk's size as of `applied_seq` (what the replica has).
    size_bytes: u64,
    #[serde(with = "serde_bytes")]
    hashes_le: Vec<u8>,
}

/// Borrowed twin of `proto::AgentFrame`, to send a retained body without copying it.
#[derive(Serialize)]
enum AgentFrameRef<'a> {
    Batch {
        first_seq: u64,
        last_seq: u64,
        #[serde(with = "serde_bytes")]
        body: &'a [u8],
    },
}

/// The protected disks: what was recorded of each, and which are blocked.
#[derive(Default)]
struct DiskSet {
    records: Vec<DiskRecord>,
    /// Why each disk is blocked (nothing of it is sent), while it is.
    blocked: Vec<Option<String>>,
    /// The agent's `--disk` set is not the one the machine was protected with: nothing is
    /// captured until the machine is protected again.
    mismatch: Option<(String, u64)>,
    /// `ctl resync` requests seen and not yet carried out, per disk.
    resync: Vec<u64>,
}

impl DiskSet {
    fn adopted(records: Vec<DiskRecord>) -> Self {
        let n = records.len();
        Self {
            records,
            blocked: vec![None; n],
            mismatch: None,
            resync: vec![0; n],
        }
    }
}

struct Agent {
    opts: AgentOptions,
    hostname: String,
    /// Random per process: tells a restarted agent from a second one claiming the machine.
    instance: u64,
    identity: Identity,
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    disks: Mutex<DiskSet>,
    core: Mutex<AgentCore>,
    journal: Mutex<Option<journal::Journal>>,
    /// The applied sizes the last snapshot recorded: a resize snapshots at once.
    snapshot_sizes: Mutex<Vec<u64>>,
    control: watch::Sender<Control>,
    /// Bumped whenever the core is reset for a new epoch.
    reset: watch::Sender<u64>,
    new_batch: Notify,
    room: Notify,
    scan_now: Notify,
    floor_known: Notify,
    /// Cuts the control loop's long poll short: something worth reporting happened.
    report_now: Notify,
    pass_scanned: AtomicU64,
    sync_wanted: Mutex<Option<u64>>,
    sync_done: Mutex<Option<(u64, u64)>>,
    connected: AtomicBool,
    degraded: Mutex<Option<String>>,
    scans: AtomicU64,
    stream_restarts: AtomicU64,
    last_move: Mutex<Option<crate::proto::MoveStats>>,
    /// When the agent noticed a move whose first stream has not opened yet (kept across
    /// stream restarts, so a failed first attempt still counts in the pause).
    move_noticed: Mutex<Option<Instant>>,
    report_seq: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Looks at every `--disk`; a disk that cannot be read is an error naming it.
fn observe_all(opts: &AgentOptions) -> Result<Vec<Observed>, String> {
    opts.disks
        .iter()
        .map(|(name, path)| {
            disks::observe(path).map_err(|e| format!("disk {name}={}: {e}", path.display()))
        })
        .collect()
}

impl Agent {
    fn dir(&self) -> PathBuf {
        self.opts.data_dir.join("agent")
    }

    /// The protected disks as the inventory shows them (their protected geometry).
    fn disk_infos(&self) -> Vec<DiskInfo> {
        lock(&self.disks)
            .records
            .iter()
            .map(|r| DiskInfo {
                name: r.name.clone(),
                size_bytes: r.size_bytes,
                path: r.path.clone(),
                id: r.id_text(),
            })
            .collect()
    }

    /// A new protection: the disks are adopted as they are now, and replicated in full.
    fn fresh_core(&self, epoch: u32) -> Result<AgentCore, String> {
        let observed = observe_all(&self.opts)?;
        let sizes: Vec<u64> = observed.iter().map(|o| o.size_bytes).collect();
        let tables: Vec<Vec<u64>> = sizes.iter().map(|&s| scan::zero_table(s)).collect();
        let records = self
            .opts
            .disks
            .iter()
            .zip(&observed)
            .zip(&tables)
            .map(|(((name, _), obs), t)| disks::adopt(name, obs, t, 0))
            .collect();
        *lock(&self.disks) = DiskSet::adopted(records);
        self.save_disks(epoch)?;
        Ok(AgentCore::new(
            epoch,
            0,
            tables,
            sizes.clone(),
            self.opts.retention_bytes,
            Some(InitialSync {
                total_bytes: sizes.iter().sum(),
                ..Default::default()
            }),
        ))
    }

    /// Writes `<data>/agent/disks`.
    fn save_disks(&self, epoch: u32) -> Result<(), String> {
        let file = DisksFile {
            version: disks::DISKS_FILE_VERSION,
            epoch,
            disks: lock(&self.disks).records.clone(),
        };
        let bytes = codec::encode(&file).map_err(|e| e.to_string())?;
        let path = self.dir().join("disks");
        write_atomic(&path, &bytes).map_err(|e| format!("write {}: {e}", path.display()))
    }

    /// Appends what was applied since the last call to the journal and fsyncs it.
    fn journal_applied(&self) -> Result<(), String> {
        let Some((epoch, seq, updates)) = lock(&self.core).take_journal() else {
            return Ok(());
        };
        let mut j = lock(&self.journal);
        let Some(j) = j.as_mut() else { return Ok(()) };
        j.append(epoch, seq, &updates)
            .and_then(|_| j.sync())
            .map_err(|e| format!("journal {}: {e}", j.path().display()))
    }

    /// Writes a full snapshot of the applied tables, then empties the journal.
    fn snapshot(&self) -> Result<(), String> {
        let names: Vec<String> = lock(&self.disks)
            .records
            .iter()
            .map(|r| r.name.clone())
            .collect();
        let file = {
            let mut core = lock(&self.core);
            if !core.applied_dirty {
                return Ok(());
            }
            core.applied_dirty = false;
            *lock(&self.snapshot_sizes) = core.applied_sizes.clone();
            TablesFile {
                version: 1,
                epoch: core.epoch,
                applied_seq: core.applied_seq,
                initial_done: core.initial.is_none(),
                disks: names
                    .into_iter()
                    .zip(core.applied_tables.iter().zip(&core.applied_sizes))
                    .map(|(name, (t, &size_bytes))| TableDisk {
                        name,
                        size_bytes,
                        hashes_le: t.iter().flat_map(|h| h.to_le_bytes()).collect(),
                    })
                    .collect(),
            }
        };
        let bytes = codec::encode(&file).map_err(|e| e.to_string())?;
        let path = self.dir().join("tables");
        write_atomic(&path, &bytes).map_err(|e| format!("snapshot {}: {e}", path.display()))?;
        if let Some(j) = lock(&self.journal).as_mut() {
            j.truncate()
                .map_err(|e| format!("journal {}: {e}", j.path().display()))?;
        }
        Ok(())
    }

    /// Strictly increasing, and based on the clock (µs) so a restarted agent's reports are
    /// newer than its previous run's.
    fn next_report_seq(&self) -> u64 {
        let now_us = unix_ms() * 1000;
        let next = |c: u64| c.max(now_us) + 1;
        let prev = self
            .report_seq
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(next(c)))
            .unwrap_or_else(|c| c);
        next(prev)
    }

    /// The disks nothing is sent of, with why and since when.
    fn blocked(&self) -> Vec<DiskBlock> {
        let set = lock(&self.disks);
        let mut out: Vec<DiskBlock> = set
            .records
            .iter()
            .zip(&set.blocked)
            .filter_map(|(r, b)| {
                b.as_ref().map(|reason| DiskBlock {
                    disk: r.name.clone(),
                    reason: reason.clone(),
                    since_ms: r.blocked_since_ms.unwrap_or(0),
                })
            })
            .collect();
        if let Some((reason, since_ms)) = &set.mismatch {
            out.push(DiskBlock {
                disk: "*".into(),
                reason: reason.clone(),
                since_ms: *since_ms,
            });
        }
        out
    }

    fn report(&self, throughput_bps: u64, wait_ms: u32) -> AgentReport {
        let blocked = self.blocked();
        let disks = self.disk_infos();
        let core = lock(&self.core);
        let initial = core.initial.clone().map(|mut i| {
            if i.pass_last_seq.is_none() {
                i.scanned_bytes = self.pass_scanned.load(Ordering::Relaxed);
            }
            i.percent()
        });
        // A blocked disk's changes are unreplicated since it was blocked.
        let oldest_unapplied_ms = blocked
            .iter()
            .map(|b| b.since_ms)
            .chain(Some(core.oldest_unapplied_ms()).filter(|&ms| ms != 0))
            .min()
            .unwrap_or(0);
        AgentReport {
            machine: self.opts.machine.clone(),
            hostname: self.hostname.clone(),
            disks,
            stats: AgentStats {
                epoch: core.epoch,
                captured_seq: core.captured_seq(),
                cached_seq: core.cached_seq,
                applied_seq: core.applied_seq,
                oldest_unapplied_ms,
                raw_bytes_sent: core.raw_bytes_sent,
                raw_bytes_captured: core.raw_bytes_captured,
                throughput_bps,
                initial_sync_percent: initial,
                retained_bytes: core.retained_bytes(),
                connected: self.connected.load(Ordering::Relaxed),
                degraded_reason: lock(&self.degraded).clone(),
                scans: self.scans.load(Ordering::Relaxed),
                stream_restarts: self.stream_restarts.load(Ordering::Relaxed),
                last_move: lock(&self.last_move).clone(),
                blocked,
            },
            sync_done: *lock(&self.sync_done),
            wait_ms,
            report_seq: self.next_report_seq(),
            known_generation: self.control.borrow().generation,
            held: false,
            instance: self.instance,
        }
    }
}

/// The applied tables of this protection, if they describe the `--disk` set (by name; a disk
/// may have grown since: the size is the applied one).
fn load_tables(opts: &AgentOptions, epoch: u32) -> Option<TablesFile> {
    let bytes = read_optional(&opts.data_dir.join("agent").join("tables")).ok()??;
    let file: TablesFile = codec::decode(&bytes)
        .map_err(|e| tracing::warn!("ignoring unreadable hash tables: {e}"))
        .ok()?;
    let same_disks = file.disks.len() == opts.disks.len()
        && file.disks.iter().zip(&opts.disks).all(|(t, (name, _))| {
            t.name == *name
                && t.hashes_le.len() as u64 == t.size_bytes.div_ceil(core::BLOCK_BYTES) * 8
        });
    if file.version != 1 || file.epoch != epoch || !same_disks {
        tracing::info!("hash tables are for another epoch or disk set; starting a full sync");
        return None;
    }
    Some(file)
}

/// The recorded disks of this protection, if any.
fn load_disks(opts: &AgentOptions, epoch: u32) -> Result<Option<Vec<DiskRecord>>, String> {
    let path = opts.data_dir.join("agent").join("disks");
    let Some(bytes) = read_optional(&path).map_err(|e| format!("read {}: {e}", path.display()))?
    else {
        return Ok(None);
    };
    let file: DisksFile =
        codec::decode(&bytes).map_err(|e| format!("{} is unreadable: {e}", path.display()))?;
    if file.version != disks::DISKS_FILE_VERSION {
        return Err(format!(
            "{} has format {} (this agent reads {})",
            path.display(),
            file.version,
            disks::DISKS_FILE_VERSION
        ));
    }
    Ok((file.epoch == epoch).then_some(file.disks))
}

/// Runs the agent until SIGINT/SIGTERM (inside an actix System with a multi-threaded runtime).
pub async fn run(opts: AgentOptions) -> Result<(), String> {
    if opts.disks.is_empty() {
        return Err("an agent needs at least one --disk NAME=PATH".into());
    }
    let observed = observe_all(&opts)?;
    crate::fsutil::create_private_dir(&opts.data_dir.join("agent"))
        .map_err(|e| format!("create {}: {e}", opts.data_dir.display()))?;
    let hostname = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let identity = match Identity::load(&opts.data_dir)? {
        Some(id) => id,
        None => {
            let (addr, token_file) = opts
                .join
                .as_ref()
                .ok_or("no identity in the data dir yet: pass --join ADDR --token-file FILE")?;
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
            let id = enroll::join(addr, &token, kind).await.map_err(|e| {
                if opts.machine_defaulted {
                    format!(
                        "{e}\n(--name defaulted to this host's name, {}: a cloned machine must be given another with --name)",
                        opts.machine
                    )
                } else {
                    e
                }
            })?;
            id.save(&opts.data_dir)?;
            tracing::info!(machine = %opts.machine, cluster = %id.cluster_id, "enrolled; protect it with `haven ctl protect {}`", opts.machine);
            id
        }
    };
    let control: Control = read_optional(&opts.data_dir.join("agent").join("control"))
        .ok()
        .flatten()
        .and_then(|b| codec::decode(&b).ok())
        .unwrap_or_default();
    let endpoint = endpoint::client_endpoint().map_err(|e| e.to_string())?;
    let client_cfg = identity.client_config()?;
    let agent = Arc::new(Agent {
        hostname,
        instance: rand::random::<u64>() | 1,
        identity,
        endpoint,
        client_cfg,
        disks: Mutex::new(DiskSet::default()),
        core: Mutex::new(AgentCore::new(0, 0, vec![], vec![], 0, None)),
        journal: Mutex::new(None),
        snapshot_sizes: Mutex::new(vec![]),
        control: watch::Sender::new(control.clone()),
        reset: watch::Sender::new(0),
        new_batch: Notify::new(),
        room: Notify::new(),
        scan_now: Notify::new(),
        floor_known: Notify::new(),
        report_now: Notify::new(),
        pass_scanned: AtomicU64::new(0),
        sync_wanted: Mutex::new(None),
        sync_done: Mutex::new(None),
        connected: AtomicBool::new(false),
        degraded: Mutex::new(None),
        scans: AtomicU64::new(0),
        stream_restarts: AtomicU64::new(0),
        last_move: Mutex::new(None),
        move_noticed: Mutex::new(None),
        report_seq: AtomicU64::new(0),
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
            .map_err(|e| format!("open journal: {e}"))?;
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

    let root = Supervisor::start_root(SupervisorConfig {
        max_restarts: 100,
        ..SupervisorConfig::new(format!("agent/{}", opts.machine))
    });
    let a = agent.clone();
    let control_child = ChildSpec::task("control", move |_| control_loop(a.clone()));
    let a = agent.clone();
    let capture_child = ChildSpec::task("capture", move |_| capture_loop(a.clone()));
    let a = agent.clone();
    let journal_child = ChildSpec::task("journal", move |_| journal_loop(a.clone()));
    let a = agent.clone();
    let stream_child = ChildSpec::task("stream", move |tc| {
        a.stream_restarts.store(tc.restarts, Ordering::Relaxed);
        stream_loop(a.clone())
    });
    for spec in [control_child, journal_child, capture_child, stream_child] {
        root.send(AddChild(spec))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let outcome = crate::node::serve_until_signal(&root).await;
    agent.journal_applied()?;
    lock(&agent.core).applied_dirty = true;
    agent.snapshot()?;
    tracing::info!("agent stopped; hash tables saved");
    outcome
}

/// Makes applied hash updates durable: journal every 200 ms, snapshot now and then.
async fn journal_loop(a: Arc<Agent>) -> Result<(), String> {
    let mut last_snapshot = Instant::now();
    let mut reset = a.reset.subscribe();
    loop {
        let epoch_changed = tokio::select! {
            _ = tokio::time::sleep(JOURNAL_EVERY) => false,
            r = reset.changed() => { r.map_err(|_| "reset closed".to_string())?; true }
        };
        let a2 = a.clone();
        let big = tokio::task::spawn_blocking(move || {
            a2.journal_applied()?;
            Ok::<_, String>(
                lock(&a2.journal).as_ref().map(|j| j.bytes()).unwrap_or(0) > JOURNAL_BYTES_MAX,
            )
        })
        .await
        .map_err(|e| e.to_string())??;
        // A resize that got applied is snapshotted at once (the journal records hashes only).
        let resized = lock(&a.core).applied_sizes != *lock(&a.snapshot_sizes);
        if epoch_changed || big || resized || last_snapshot.elapsed() >= SNAPSHOT_EVERY {
            let a2 = a.clone();
            tokio::task::spawn_blocking(move || a2.snapshot())
                .await
                .map_err(|e| e.to_string())??;
            last_snapshot = Instant::now();
        }
    }
}

/// How long the configuration node may hold an idle poll: a sync barrier wakes it at once.
const LONG_POLL_MS: u32 = 1000;

async fn control_loop(a: Arc<Agent>) -> Result<(), String> {
    let addr = a.identity.config_socket_addr()?;
    let mut conn: Option<Connection> = None;
    let mut last_rate = (Instant::now(), lock(&a.core).raw_bytes_applied);
    let mut throughput = 0u64;
    let mut reachable = true;
    let mut refused: Option<String> = None;
    loop {
        let now = Instant::now();
        let applied_bytes = lock(&a.core).raw_bytes_applied;
        let dt = now.duration_since(last_rate.0).as_secs_f64();
        if dt >= 1.0 {
            throughput = ((applied_bytes - last_rate.1) as f64 / dt) as u64;
            last_rate = (now, applied_bytes);
        }
        let report = a.report(throughput, LONG_POLL_MS);
        if conn.as_ref().is_some_and(|c| c.close_reason().is_some()) {
            conn = None;
        }
        let poll = async {
            if conn.is_none() {
                conn = Some(
                    client::connect(
                        &a.endpoint,
                        a.client_cfg.clone(),
                        addr,
                        &format!("agent {}", a.opts.machine),
                    )
                    .await?,
                );
            }
            let timeout = Duration::from_secs(5) + Duration::from_millis(LONG_POLL_MS as u64);
            client::call(
                conn.as_ref().expect("set"),
                &Request::AgentPoll(Box::new(report)),
                timeout,
            )
            .await
        };
        let result = tokio::select! {
            r = poll => Some(r),
            _ = a.report_now.notified() => None,
        };
        let pause = match result {
            None => Duration::ZERO, // report right away
            Some(Ok(Response::AgentPoll(reply))) => {
                if !reachable {
                    tracing::info!("configuration node reachable again");
                    reachable = true;
                }
                if refused.take().is_some() {
                    tracing::info!("the configuration node accepts this agent again");
                    *lock(&a.degraded) = None;
                }
                handle_poll_reply(&a, reply)?;
                Duration::from_millis(100)
            }
            Some(Err(CallError::Refused(reason))) => {
                // Not a network problem: this agent may not speak for the machine (forgotten,
                // enrolled again elsewhere). Said once; asked again slowly.
                if refused.as_deref() != Some(reason.as_str()) {
                    tracing::error!("the configuration node refused this agent: {reason}");
                    *lock(&a.degraded) =
                        Some(format!("refused by the configuration node: {reason}"));
                    refused = Some(reason);
                }
                Duration::from_secs(5)
            }
            Some(Ok(other)) => {
                tracing::warn!("unexpected poll reply: {other:?}");
                crate::node::POLL_INTERVAL
            }
            Some(Err(e)) => {
                conn = None;
                if reachable {
                    tracing::warn!("configuration node unreachable ({e}); replication continues");
                    reachable = false;
                }
                crate::node::POLL_INTERVAL
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = a.report_now.notified() => {}
        }
    }
}

fn handle_poll_reply(a: &Agent, reply: AgentPollReply) -> Result<(), String> {
    let new = Control {
        protected: reply.protected,
        epoch: reply.epoch,
        generation: reply.generation.0,
        process_server: reply.process_server,
    };
    if new.protected && new.epoch != lock(&a.core).epoch {
        tracing::info!(
            epoch = new.epoch,
            "new protection epoch: starting a full sync"
        );
        let fresh = a.fresh_core(new.epoch)?;
        *lock(&a.core) = fresh;
        lock(&a.core).applied_dirty = true;
        *lock(&a.sync_done) = None;
        a.reset.send_modify(|g| *g += 1);
    }
    {
        let mut set = lock(&a.disks);
        let mut wanted = false;
        for (disk, &n) in &reply.resync {
            let Some(i) = set.records.iter().position(|r| &r.name == disk) else {
                continue;
            };
            if n > set.records[i].resync_done && n > set.resync[i] {
                tracing::info!(%disk, request = n, "resync requested by the operator");
                set.resync[i] = n;
                wanted = true;
            }
        }
        if wanted {
            a.scan_now.notify_one();
        }
    }
    match reply.sync_request {
        Some(id) => {
            let done = lock(&a.sync_done).is_some_and(|(d, _)| d == id);
            let mut wanted = lock(&a.sync_wanted);
            if !done && *wanted != Some(id) {
                *wanted = Some(id);
                a.scan_now.notify_one();
            }
        }
        None => *lock(&a.sync_done) = None,
    }
    if *a.control.borrow() != new {
        let bytes = codec::encode(&new).map_err(|e| e.to_string())?;
        let path = a.dir().join("control");
        write_atomic(&path, &bytes).map_err(|e| format!("write {}: {e}", path.display()))?;
        a.control.send_replace(new);
    }
    Ok(())
}

/// Waits until the machine is protected and seqs can be assigned.
async fn wait_ready(a: &Agent) {
    let mut control = a.control.subscribe();
    loop {
        let protected = control.borrow_and_update().protected;
        if protected && lock(&a.core).seq_ready() {
            return;
        }
        tokio::select! {
            _ = control.changed() => {}
            _ = a.floor_known.notified() => {}
        }
    }
}

async fn capture_loop(a: Arc<Agent>) -> Result<(), String> {
    let mut reset = a.reset.subscribe();
    loop {
        wait_ready(&a).await;
        if lock(&a.disks).mismatch.is_some() {
            // Nothing may be captured into a replica of other disks; a new protection ends it.
            // A sync barrier is answered (with nothing captured), so the operator hears why.
            if let Some(id) = lock(&a.sync_wanted).take() {
                *lock(&a.sync_done) = Some((id, lock(&a.core).captured_seq()));
                a.report_now.notify_one();
            }
            tokio::select! {
                _ = reset.changed() => {}
                _ = a.scan_now.notified() => {}
            }
            continue;
        }
        let generation = *reset.borrow_and_update();
        let sync_id = *lock(&a.sync_wanted);
        let tables = lock(&a.core).captured_tables();
        let completed = scan_pass(&a, tables, generation).await?;
        a.scans.fetch_add(1, Ordering::Relaxed);
        if completed {
            let captured = {
                let mut core = lock(&a.core);
                core.handle_pass_done();
                core.captured_seq()
            };
            if let Some(id) = sync_id {
                *lock(&a.sync_done) = Some((id, captured));
                let mut wanted = lock(&a.sync_wanted);
                if *wanted == Some(id) {
                    *wanted = None;
                }
                a.report_now.notify_one();
            }
        }
        if *a.reset.borrow() != generation {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(a.opts.scan_interval) => {}
            _ = a.scan_now.notified() => {}
            _ = reset.changed() => {}
        }
    }
}

/// One pass over every disk. Returns false if it was abandoned for a reset.
async fn scan_pass(a: &Arc<Agent>, tables: Vec<Vec<u64>>, generation: u64) -> Result<bool, String> {
    a.pass_scanned.store(0, Ordering::Relaxed);
    let mut base = 0u64;
    for (i, table) in tables.into_iter().enumerate() {
        let Some((mut table, size)) = check_disk(a, i, table, generation).await? else {
            continue; // blocked: nothing of it is sent
        };
        let (tx, mut rx) = mpsc::channel::<scan::Extent>(2);
        let path = a.opts.disks[i].1.clone();
        let a2 = a.clone();
        let scanner = tokio::task::spawn_blocking(move || {
            let r = scan::scan_disk(
                &path,
                i as u16,
                &mut table,
                size,
                |off| a2.pass_scanned.store(base + off, Ordering::Relaxed),
                |e| tx.blocking_send(e).is_ok(),
            );
            r.map_err(|e| format!("scan {}: {e}", path.display()))
        });
        let mut batch: Vec<scan::Extent> = vec![];
        let mut raw = 0u64;
        while let Some(e) = rx.recv().await {
            if *a.reset.borrow() != generation {
                drop(rx);
                let _ = scanner.await;
                return Ok(false);
            }
            raw += e.data.len() as u64;
            batch.push(e);
            if raw >= BATCH_BYTES {
                emit(a, std::mem::take(&mut batch), generation).await?;
                raw = 0;
            }
        }
        if !batch.is_empty() {
            emit(a, batch, generation).await?;
        }
        scanner
            .await
            .map_err(|e| format!("scanner failed: {e}"))??;
        base += size;
    }
    Ok(true)
}

/// Before a disk is scanned: is it still the protected disk, at its size? Returns the table
/// and size to scan it at, or None if it is blocked. A disk that grew is grown in the stream
/// (a marker batch carrying the new size) before anything of the new region is sent.
async fn check_disk(
    a: &Arc<Agent>,
    i: usize,
    table: Vec<u64>,
    generation: u64,
) -> Result<Option<(Vec<u64>, u64)>, String> {
    let (rec, resync_wanted) = {
        let set = lock(&a.disks);
        (set.records[i].clone(), set.resync[i])
    };
    let captured = lock(&a.core).sizes()[i];
    let path = a.opts.disks[i].1.clone();
    let looked = {
        let rec = rec.clone();
        tokio::task::spawn_blocking(move || {
            let obs = disks::observe(&path)?;
            let verdict = disks::judge(&rec, &obs, captured, || {
                disks::check_content(&path, &table, obs.size_bytes)
            });
            Ok::<_, std::io::Error>((obs, verdict, table))
        })
        .await
        .map_err(|e| format!("disk check failed: {e}"))?
    };
    let machine = &a.opts.machine;
    let (obs, verdict, mut table) = match looked {
        Ok(x) => x,
        Err(e) => {
            let reason = format!("cannot read disk {} at {}: {e}", rec.name, rec.path);
            block_disk(a, i, reason)?;
            return Ok(None);
        }
    };
    let epoch = lock(&a.core).epoch;
    // The operator decided: take the disk as it is now.
    if resync_wanted > rec.resync_done {
        let adopted = disks::adopt(&rec.name, &obs, &table, resync_wanted);
        tracing::info!(disk = %rec.name, path = %obs.path, size = obs.size_bytes, "resync: the disk is adopted as it is now; every block that differs from the replica is sent");
        {
            let mut set = lock(&a.disks);
            set.records[i] = adopted;
            set.blocked[i] = None;
        }
        if obs.size_bytes != captured {
            resize(a, i, &mut table, captured, obs.size_bytes, generation).await?;
        }
        a.save_disks(epoch)?;
        a.report_now.notify_one();
        return Ok(Some((table, obs.size_bytes)));
    }
    if let Some(reason) = verdict.blocked_reason(&rec.name, machine) {
        block_disk(a, i, reason)?;
        return Ok(None);
    }
    let was_blocked = lock(&a.disks).blocked[i].take().is_some();
    if was_blocked {
        tracing::info!(disk = %rec.name, path = %obs.path, "the protected disk is back: replicating it again");
        lock(&a.disks).records[i].blocked_since_ms = None;
        a.report_now.notify_one();
    }
    let mut size = captured;
    let mut changed = was_blocked;
    if verdict != Verdict::Same {
        let mut set = lock(&a.disks);
        let r = &mut set.records[i];
        if r.path != obs.path || r.file_id != obs.file_id || r.device_id != obs.device_id {
            tracing::info!(disk = %rec.name, path = %obs.path, was = %r.path, "the protected disk is at another path or inode now: following it");
            r.path.clone_from(&obs.path);
            r.file_id = obs.file_id;
            r.device_id.clone_from(&obs.device_id);
        }
        changed = true;
    }
    if let Verdict::Grown { from, to } = verdict {
        tracing::info!(
            disk = %rec.name,
            from = %disks::size_text(from),
            to = %disks::size_text(to),
            "disk grew: the replica grows in the stream; only the new region and changed blocks travel"
        );
        lock(&a.disks).records[i].size_bytes = to;
        resize(a, i, &mut table, from, to, generation).await?;
        size = to;
    }
    if changed {
        a.save_disks(epoch)?;
        a.report_now.notify_one();
    }
    Ok(Some((table, size)))
}

/// Changes a disk's captured size and sends a marker batch that carries it.
async fn resize(
    a: &Agent,
    i: usize,
    table: &mut Vec<u64>,
    from: u64,
    to: u64,
    generation: u64,
) -> Result<(), String> {
    core::resize_table(table, from, to);
    lock(&a.core).resize(i, to);
    let marker = scan::Extent {
        disk: i as u16,
        offset: 0,
        data: vec![],
        updates: vec![],
    };
    emit(a, vec![marker], generation).await
}

/// Nothing of disk `i` is sent until it is the protected disk again or the operator decides.
fn block_disk(a: &Agent, i: usize, reason: String) -> Result<(), String> {
    let epoch = lock(&a.core).epoch;
    {
        let mut set = lock(&a.disks);
        if set.blocked[i].as_deref() == Some(reason.as_str()) {
            return Ok(()); // said already
        }
        set.blocked[i] = Some(reason.clone());
        set.records[i].blocked_since_ms.get_or_insert_with(unix_ms);
    }
    tracing::error!(disk = %a.opts.disks[i].0, "{reason}");
    a.save_disks(epoch)?;
    a.report_now.notify_one();
    Ok(())
}

/// Encodes `AgentFrame::Batch { first_seq, last_seq, body: encode(batch) }` into one buffer
/// sized up front, without first encoding the body on its own: a batch exists once in memory,
/// not twice. The frame header is the codec's own encoding of the frame with an empty body,
/// whose trailing `bin8` length is widened to `bin32` and filled in afterwards (pinned by the
/// `batch_frame_decodes_like_the_codec_encoding` test).
fn batch_frame(
    first_seq: u64,
    last_seq: u64,
    batch: &BatchBody,
    raw_bytes: usize,
) -> Result<Vec<u8>, codec::CodecError> {
    let mut head = codec::encode(&AgentFrameRef::Batch {
        first_seq,
        last_seq,
        body: &[],
    })?;
    debug_assert!(
        head.ends_with(&[0xc4, 0x00]),
        "an empty bin8 ends the frame"
    );
    head.truncate(head.len() - 2);
    // msgpack adds a few dozen bytes per record to the raw data.
    let mut buf = Vec::with_capacity(head.len() + 5 + raw_bytes + 64 + batch.records.len() * 64);
    buf.extend_from_slice(&head);
    buf.push(0xc6); // bin32
    let len_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    codec::encode_into(&mut buf, batch)?;
    let body_len =
        u32::try_from(buf.len() - len_at - 4).map_err(|_| codec::CodecError::TooLarge)?;
    buf[len_at..len_at + 4].copy_from_slice(&body_len.to_be_bytes());
    Ok(buf)
}

/// Numbers and retains one batch, waiting for room in the retention buffer.
async fn emit(a: &Agent, extents: Vec<scan::Extent>, generation: u64) -> Result<(), String> {
    let raw: u64 = extents.iter().map(|e| e.data.len() as u64).sum();
    loop {
        if *a.reset.borrow() != generation {
            return Ok(());
        }
        if lock(&a.core).has_room(raw) {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), a.room.notified()).await;
    }
    let updates = extents
        .iter()
        .flat_map(|e| e.updates.iter().copied())
        .collect();
    let n = extents.len() as u64;
    let mut encoded: Result<(), String> = Ok(());
    lock(&a.core).emit(n, raw, updates, unix_ms(), |first, sizes| {
        let records: Vec<WriteRecord> = extents
            .into_iter()
            .enumerate()
            .map(|(i, e)| WriteRecord {
                seq: first + i as u64,
                disk: e.disk,
                offset: e.offset,
                data: serde_bytes::ByteBuf::from(e.data),
            })
            .collect();
        // Encoded once, as the frame that goes on the wire; resends reuse it.
        let body = BatchBody {
            records,
            disk_sizes: sizes.to_vec(),
        };
        let frame = batch_frame(first, first + n - 1, &body, raw as usize);
        frame.unwrap_or_else(|e| {
            encoded = Err(e.to_string());
            vec![]
        })
    });
    encoded?;
    a.new_batch.notify_one();
    Ok(())
}

/// How a stream ended.
enum StreamEnd {
    /// The assignment changed (a move): reconnect at once, no backoff.
    Moved,
    Failed(String),
}

impl From<String> for StreamEnd {
    fn from(e: String) -> Self {
        StreamEnd::Failed(e)
    }
}

/// A move in progress, as the agent measures it.
struct PendingMove {
    noticed: Instant,
    generation: u64,
    bytes_resent: u64,
    /// The move is complete once the new process server has cached through this seq.
    until_cached: u64,
}

async fn stream_loop(a: Arc<Agent>) -> Result<(), String> {
    loop {
        let result = stream_once(&a).await;
        a.connected.store(false, Ordering::Relaxed);
        match result {
            Err(StreamEnd::Moved) => {
                lock(&a.move_noticed).get_or_insert_with(Instant::now);
                continue;
            }
            Err(StreamEnd::Failed(e)) => {
                *lock(&a.degraded) = Some(e.clone());
                return Err(e);
            }
            Ok(()) => return Ok(()),
        }
    }
}

async fn stream_once(a: &Arc<Agent>) -> Result<(), StreamEnd> {
    let mut control = a.control.subscribe();
    let ctl = loop {
        let c = control.borrow_and_update().clone();
        if c.protected && c.process_server.is_some() {
            break c;
        }
        *lock(&a.degraded) = None;
        control
            .changed()
            .await
            .map_err(|_| "control closed".to_string())?;
    };
    let (ps_name, ps_addr) = ctl.process_server.clone().expect("checked");
    let addr = resolve(&ps_addr)?;
    let conn = client::connect(
        &a.endpoint,
        a.client_cfg.clone(),
        addr,
        &format!("agent {}", a.opts.machine),
    )
    .await
    .map_err(|e| format!("process server {ps_name} at {ps_addr} unreachable: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // The process server may ask whether this process is still there (a second agent
    // claims the machine).
    let prober = tokio::spawn(answer_probes(conn.clone(), a.instance));
    let epoch = lock(&a.core).epoch;
    let open = StreamOpen {
        machine: a.opts.machine.clone(),
        epoch,
        generation: haven_cluster::Generation(ctl.generation),
        disks: a.disk_infos(),
        instance: a.instance,
    };
    frame::send_msg(&mut send, &Request::OpenStream(open))
        .await
        .map_err(|e| e.to_string())?;
    let (cached, applied) = match frame::expect_msg::<Response>(&mut recv, MAX_CONTROL_FRAME)
        .await
        .map_err(|e| e.to_string())?
    {
        Response::StreamAccepted {
            cached_seq,
            applied_seq,
        } => (cached_seq, applied_seq),
        Response::Refused { reason } => {
            return Err(format!("process server {ps_name} refused the stream: {reason}").into())
        }
        other => return Err(format!("unexpected reply: {other:?}").into()),
    };
    let moved_at = lock(&a.move_noticed).take();
    let (mut after, pending_move) = {
        let mut core = lock(&a.core);
        let old_cached = core.cached_seq;
        let after = core.handle_stream_open(cached, applied);
        // What the old process server already held but must travel again.
        let resend = core.batches_after(after, usize::MAX);
        let pending = moved_at.map(|noticed| PendingMove {
            noticed,
            generation: ctl.generation,
            bytes_resent: resend
                .iter()
                .filter(|b| b.last_seq <= old_cached)
                .map(|b| b.raw_bytes)
                .sum(),
            until_cached: resend.first().map(|b| b.last_seq).unwrap_or(0),
        });
        (after, pending)
    };
    a.floor_known.notify_waiters();
    a.room.notify_one();
    a.connected.store(true, Ordering::Relaxed);
    *lock(&a.degraded) = None;
    tracing::info!(ps = %ps_name, cached, applied, "streaming to process server");
    let mut acks = {
        let a = a.clone();
        let mut pending_move = pending_move;
        tokio::spawn(async move {
            // The move is over once *this* process server has cached what had to travel again.
            let finish_move = |pending: &mut Option<PendingMove>, cached_here: u64| {
                if let Some(p) = pending.take_if(|p| cached_here >= p.until_cached) {
                    let stats = crate::proto::MoveStats {
                        generation: p.generation,
                        pause_ms: p.noticed.elapsed().as_millis() as u64,
                        bytes_resent: p.bytes_resent,
                    };
                    tracing::info!(
                        generation = stats.generation,
                        pause_ms = stats.pause_ms,
                        bytes_resent = stats.bytes_resent,
                        "moved to process server {ps_name}"
                    );
                    *lock(&a.last_move) = Some(stats);
                    a.report_now.notify_one();
                }
            };
            finish_move(&mut pending_move, cached);
            loop {
                let ack: Ack = frame::expect_msg(&mut recv, MAX_CONTROL_FRAME)
                    .await
                    .map_err(|e| format!("ack stream: {e}"))?;
                let before = {
                    let mut core = lock(&a.core);
                    let before = core.applied_seq;
                    core.handle_ack(ack.cached_seq, ack.applied_seq);
                    before
                };
                a.room.notify_one();
                finish_move(&mut pending_move, ack.cached_seq);
                // A pending sync barrier just got applied: tell the configuration node now.
                if lock(&a.sync_done).is_some_and(|(_, seq)| before < seq && seq <= ack.applied_seq)
                {
                    a.report_now.notify_one();
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        })
    };
    let mut reset = a.reset.subscribe();
    reset.borrow_and_update();
    let result = async {
        loop {
            let batches = lock(&a.core).batches_after(after, 8);
            if batches.is_empty() {
                tokio::select! {
                    _ = a.new_batch.notified() => {}
                    r = &mut acks => return Err(StreamEnd::Failed(match r { Ok(Err(e)) => e, _ => "ack reader ended".into() })),
                    r = control.changed() => {
                        r.map_err(|_| "control closed".to_string())?;
                        let now = control.borrow().clone();
                        if now.process_server != ctl.process_server && now.protected {
                            return Err(StreamEnd::Moved);
                        }
                        if now != ctl { return Err(StreamEnd::Failed("assignment changed; reconnecting".into())); }
                    }
                    _ = reset.changed() => return Err(StreamEnd::Failed("protection reset; reconnecting".into())),
                }
                continue;
            }
            for b in batches {
                frame::write_frame(&mut send, &b.body).await.map_err(|e| e.to_string())?;
                lock(&a.core).raw_bytes_sent += b.raw_bytes;
                after = b.last_seq;
            }
        }
    }
    .await;
    acks.abort();
    prober.abort();
    conn.close(0u32.into(), b"stream restart");
    result
}

/// Answers a process server's probes on the stream's connection with this process's id.
async fn answer_probes(conn: Connection, instance: u64) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let Ok(Request::Probe) = frame::expect_msg::<Request>(&mut recv, MAX_CONTROL_FRAME).await
        else {
            continue;
        };
        let _ = frame::send_msg(&mut send, &Response::ProbeAck { instance }).await;
        let _ = send.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::AgentFrame;

    #[test]
    fn batch_frame_decodes_like_the_codec_encoding() {
        for (first, n, size) in [
            (1u64, 1u64, 0usize),
            (70_000, 3, 100),
            (u64::MAX - 10, 2, 70_000),
        ] {
            let records = (0..n)
                .map(|i| WriteRecord {
                    seq: first + i,
                    disk: i as u16,
                    offset: i * 4096,
                    data: serde_bytes::ByteBuf::from(vec![i as u8; size]),
                })
                .collect();
            let batch = BatchBody {
                records,
                disk_sizes: vec![1 << 20, 7],
            };
            let frame = batch_frame(first, first + n - 1, &batch, size * n as usize).unwrap();
            let body = codec::encode(&batch).unwrap();
            let AgentFrame::Batch {
                first_seq,
                last_seq,
                body: got,
            } = codec::decode(&frame).unwrap();
            assert_eq!((first_seq, last_seq), (first, first + n - 1));
            assert_eq!(got.into_vec(), body);
            // Sized up front: no doubling reallocation left half the buffer empty.
            assert!(
                frame.capacity() - frame.len() <= 64 + 64 * n as usize,
                "{} of {}",
                frame.len(),
                frame.capacity()
            );
        }
    }
}
