//! The process server: receives batches from agents, seals them (zstd + XChaCha20-Poly1305),
//! appends them to a durable per-machine cache *before* acknowledging, ships them to the
//! master target and resends until they are applied.
//!
//! ```text
//! agent stream ─▶ ingest ─▶ seal (blocking pool, 2 in flight) ─▶ cache.append ─▶ group fsync ─▶ Ack{cached}
//!                                                                      │
//!                       master target ◀─ ship (supervised child per machine) reads the cache
//!                                       └─▶ Applied{seq} ─▶ trim cache, Ack{applied} to the agent
//! ```
//! Both ends rebuild from durable cursors: the cache on disk and the master target's
//! `applied_seq`, which it reports when a ship stream opens.
pub mod ingest;
pub mod ingest_core;
pub mod ship;
pub mod ship_core;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use actix::Addr;
use dashmap::DashMap;
use haven_actors::{AddChild, ChildSpec, RemoveChild, Supervisor, SupervisorConfig, TaskError};
use haven_storage::cache::{CacheError, CacheOptions, MachineCache};
use tokio::sync::{watch, Notify};

use crate::error::StreamError;
use crate::link::NodeLink;
use crate::proto::{Assignment, NodeMachineReport};

/// The process-server role as the node's router and poller see it.
#[derive(Clone)]
pub struct ProcessService {
    pub state: Arc<ProcessState>,
    link: Arc<NodeLink>,
}

impl ProcessService {
    pub fn new(data_dir: &Path, cache_limit_bytes: u64, link: Arc<NodeLink>) -> Self {
        Self {
            state: Arc::new(ProcessState::new(data_dir, cache_limit_bytes)),
            link,
        }
    }

    pub fn link(&self) -> &NodeLink {
        &self.link
    }

    /// The `process` supervisor and its manager (which keeps one `ship/<machine>` child per
    /// machine assigned here).
    pub fn child_spec(&self) -> ChildSpec {
        let svc = self.clone();
        let manager = ChildSpec::task("manager", move |tc| {
            let svc = svc.clone();
            async move {
                let sup = tc
                    .supervisor
                    .ok_or_else(|| TaskError::fatal("the process manager needs a supervisor"))?;
                manage(svc, sup).await
            }
        });
        Supervisor::child_spec(SupervisorConfig::new("process"), vec![manager])
    }
}

/// Keeps one `ship/<machine>` child per machine assigned to this process server.
async fn manage(svc: ProcessService, sup: Addr<Supervisor>) -> Result<(), TaskError> {
    let ps = svc.state.clone();
    let mut rx = svc.link.assignments();
    // Each ship child ships one protection: its epoch, and the failbacks since (a cache of
    // before a failback is dropped, see `ProcessState::machine`).
    let mut running: std::collections::HashMap<String, (haven_cluster::Epoch, u64)> =
        Default::default();
    loop {
        let mine: Vec<Assignment> = rx
            .borrow_and_update()
            .iter()
            .filter(|a| a.process_server == svc.link.name)
            .cloned()
            .collect();
        for a in &mine {
            let ps2 = ps.clone();
            let a2 = a.clone();
            let m = tokio::task::spawn_blocking(move || ps2.machine(&a2))
                .await
                .map_err(TaskError::retry)?
                .map_err(TaskError::retry)?;
            if running.get(&a.machine) == Some(&(a.epoch, a.failbacks)) {
                continue;
            }
            let name = format!("ship/{}", a.machine);
            // A ship child may still be draining (or be of an old epoch): replace it.
            let _ = sup.send(RemoveChild(name.clone())).await;
            running.remove(&a.machine);
            let svc2 = svc.clone();
            let spec = ChildSpec::task(name, move |tc| {
                // Supervisor restarts; the child counts its own reconnects to the same total.
                if tc.restarts > 0 {
                    m.ship_restarts.fetch_add(1, Ordering::Relaxed);
                }
                let span = tracing::info_span!(
                    "ship",
                    node = %svc2.link.name,
                    role = haven_cluster::ROLE_PROCESS,
                    machine = %m.name,
                    generation = m.assignment.borrow().generation.0
                );
                tracing::Instrument::instrument(ship::ship(svc2.clone(), m.clone()), span)
            });
            sup.send(AddChild(spec))
                .await
                .map_err(TaskError::retry)?
                .map_err(TaskError::retry)?;
            running.insert(a.machine.clone(), (a.epoch, a.failbacks));
        }
        // A machine moved away drains: its ship child ships what is cached, then drops it.
        let gone: Vec<String> = running
            .keys()
            .filter(|k| !mine.iter().any(|a| &a.machine == *k))
            .cloned()
            .collect();
        for machine in gone {
            running.remove(&machine);
            match ps.machines.get(&machine).map(|m| m.clone()) {
                Some(m) => {
                    tracing::info!(%machine, "no longer assigned here; draining its cache to the master target");
                    m.draining.store(true, Ordering::SeqCst);
                    m.assignment.send_modify(|_| {}); // wake the ship child
                }
                None => {
                    let _ = sup.send(RemoveChild(format!("ship/{machine}"))).await;
                }
            }
        }
        rx.changed()
            .await
            .map_err(|_| TaskError::fatal("the node's assignments are gone"))?;
    }
}

pub struct ProcessState {
    pub dir: PathBuf,
    /// Upper bound of all machines' cache bytes; ingest stops reading when it is reached.
    pub cache_limit_bytes: u64,
    pub machines: DashMap<String, Arc<PsMachine>>,
    /// Serialises creating a machine's entry: its cache directory may be opened only once.
    create: Mutex<()>,
    /// Signalled whenever any cache shrinks, so blocked ingests re-check the limit.
    pub space: Notify,
    /// Signalled whenever cache files are deleted, so writers held back by a failed write
    /// (a full disk) retry at once.
    pub freed: Notify,
    /// When a cache write failure was last logged as an error: at most one a minute.
    write_error_logged: Mutex<Option<std::time::Instant>>,
}

impl ProcessState {
    pub fn new(data_dir: &Path, cache_limit_bytes: u64) -> Self {
        Self {
            dir: data_dir.join("cache"),
            cache_limit_bytes,
            machines: DashMap::new(),
            create: Mutex::new(()),
            space: Notify::new(),
            freed: Notify::new(),
            write_error_logged: Mutex::new(None),
        }
    }

    /// Whether a cache write failure should be logged as an error now (none was in the
    /// last minute); otherwise it is logged at debug level.
    pub fn report_write_error(&self) -> bool {
        const EVERY: std::time::Duration = std::time::Duration::from_secs(60);
        let Ok(mut last) = self.write_error_logged.lock() else {
            return true;
        };
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Unapplied bytes in all caches plus bytes being sealed on their way in: what the limit
    /// bounds. (Files on disk exceed it by at most the partly applied segments.)
    pub fn pending_bytes(&self) -> u64 {
        self.machines
            .iter()
            .map(|m| {
                m.pending_bytes.load(Ordering::Relaxed) + m.inflight_bytes.load(Ordering::Relaxed)
            })
            .sum()
    }

    /// Segments small enough that trimming whole segments keeps the disk near the limit, or
    /// near the disk's size when that is smaller: a segment is freed only once all of it is
    /// applied, so segments sized for a limit far above the disk would fill the disk even
    /// while the master target keeps up.
    fn cache_options(&self) -> CacheOptions {
        let disk = haven_storage::cache::filesystem_bytes(&self.dir).unwrap_or(u64::MAX);
        CacheOptions {
            segment_bytes: (self.cache_limit_bytes.min(disk) / 4).clamp(1 << 20, 64 << 20),
        }
    }

    pub fn reports(&self) -> Vec<NodeMachineReport> {
        self.machines
            .iter()
            .filter(|m| {
                !m.draining.load(Ordering::Relaxed) || m.cache_bytes.load(Ordering::Relaxed) > 0
            })
            .map(|m| NodeMachineReport {
                points: None,
                machine: m.name.clone(),
                role: haven_cluster::ROLE_PROCESS.into(),
                cached_seq: *m.durable.borrow(),
                applied_seq: *m.applied.borrow(),
                wire_bytes: m.wire_bytes.load(Ordering::Relaxed),
                raw_bytes: m.raw_bytes.load(Ordering::Relaxed),
                cache_bytes: m.cache_bytes.load(Ordering::Relaxed),
                batches_refused: 0,
                restarts: m.ship_restarts.load(Ordering::Relaxed),
                epoch: m.assignment.borrow().epoch.0,
                ship_error: m.ship_error.lock().ok().and_then(|e| e.clone()),
                refusal: None,
                failover: None,
            })
            .collect()
    }

    /// A forgotten machine: its cache goes (it is not assigned here any more, so nothing
    /// ships from it). The entry stays, as the owner of the cache directory.
    pub fn retire(&self, machine: &str) -> Result<(), StreamError> {
        let Some(m) = self.machines.get(machine).map(|m| m.clone()) else {
            let dir = self.dir.join(machine);
            return match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StreamError::local("remove a forgotten machine's cache", e))
                }
                _ => Ok(()),
            };
        };
        m.reset_cache()?;
        // Its positions mean nothing for a machine enrolled under the name later.
        m.applied.send_replace(0);
        m.raw_bytes.store(0, Ordering::Relaxed);
        m.wire_bytes.store(0, Ordering::Relaxed);
        tracing::info!(%machine, "forgotten machine: its cache is dropped");
        Ok(())
    }

    /// Opens (or reuses) the machine's cache. An epoch change means a new protection: the
    /// old cache belongs to a stream that no longer exists and is cleared. Entries are never
    /// removed from the map: the cache's directory lock belongs to its one `PsMachine`.
    pub fn machine(&self, a: &Assignment) -> Result<Arc<PsMachine>, StreamError> {
        let _create = lock(&self.create)?;
        if let Some(m) = self.machines.get(&a.machine).map(|m| m.clone()) {
            let held = (m.assignment.borrow().epoch, m.assignment.borrow().failbacks);
            if held != (a.epoch, a.failbacks) {
                if held.0 == a.epoch {
                    tracing::info!(machine = %a.machine, failbacks = a.failbacks, "the machine failed back: its cache from before holds rolled-back writes; clearing it");
                } else {
                    tracing::info!(machine = %a.machine, epoch = a.epoch.0, "new protection epoch: clearing the old cache");
                }
                m.reset_cache()?;
                // Seqs start over in a new epoch: the old applied position means nothing.
                m.applied.send_replace(0);
                // Counters describe the current protection, as the agent's do.
                m.raw_bytes.store(0, Ordering::Relaxed);
                m.wire_bytes.store(0, Ordering::Relaxed);
                let epoch_file = self.dir.join(&a.machine).join("epoch");
                crate::fsutil::write_atomic(&epoch_file, cache_identity(a).as_bytes())
                    .map_err(|e| StreamError::local("write the cache's epoch", e))?;
            }
            {
                // Under the cache lock, so a drain that is finishing either clears the cache
                // before we take the machine back, or sees it taken back and clears nothing.
                let _cache = lock(&m.cache)?;
                m.draining.store(false, Ordering::SeqCst);
            }
            if *m.assignment.borrow() != *a {
                m.assignment.send_replace(a.clone());
            }
            return Ok(m);
        }
        let dir = self.dir.join(&a.machine);
        let epoch_file = dir.join("epoch");
        let (mut cache, report) = MachineCache::open(&dir.join("log"), self.cache_options())?;
        let stored = crate::fsutil::read_optional(&epoch_file)
            .map_err(|e| StreamError::local("read the cache's epoch", e))?;
        let epoch_bytes = cache_identity(a);
        if stored.as_deref() != Some(epoch_bytes.as_bytes()) {
            if report.records > 0 {
                tracing::info!(machine = %a.machine, epoch = a.epoch.0, "new protection epoch: clearing the old cache");
            }
            cache.clear()?;
            crate::fsutil::write_atomic(&epoch_file, epoch_bytes.as_bytes())
                .map_err(|e| StreamError::local("write the cache's epoch", e))?;
        } else if report.truncated_bytes > 0 {
            tracing::warn!(machine = %a.machine, bytes = report.truncated_bytes, "cut a torn tail from the cache after a crash");
        }
        let durable = cache.durable_last_seq().unwrap_or(0);
        let m = Arc::new(PsMachine {
            name: a.machine.clone(),
            assignment: watch::Sender::new(a.clone()),
            cache_bytes: AtomicU64::new(cache.bytes()),
            inflight_bytes: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(cache.bytes_after(0)),
            cache: Arc::new(Mutex::new(cache)),
            durable: watch::Sender::new(durable),
            applied: watch::Sender::new(0),
            applied_known: watch::Sender::new(false),
            ingest_owner: AtomicU64::new(0),
            raw_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            ship_restarts: AtomicU64::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            live: Mutex::new(None),
            ship_error: Mutex::new(None),
        });
        self.machines.insert(a.machine.clone(), m.clone());
        Ok(m)
    }
}

/// What a machine's cache on disk belongs to (`<cache>/<machine>/epoch`): the protection's
/// epoch, and the failbacks since when there were any (the file's format before failbacks).
fn cache_identity(a: &Assignment) -> String {
    match a.failbacks {
        0 => a.epoch.0.to_string(),
        n => format!("{}.{n}", a.epoch.0),
    }
}

/// One protected machine on this process server.
pub struct PsMachine {
    pub name: String,
    pub assignment: watch::Sender<Assignment>,
    pub cache: Arc<Mutex<MachineCache>>,
    pub cache_bytes: AtomicU64,
    /// Bytes in the cache not yet applied by the master target.
    pub pending_bytes: AtomicU64,
    /// Raw bytes accepted from the agent but not yet appended (being sealed).
    pub inflight_bytes: AtomicU64,
    /// Highest seq durable in the cache.
    pub durable: watch::Sender<u64>,
    /// Highest seq the master target reported applied.
    pub applied: watch::Sender<u64>,
    /// Whether `applied` came from the master target since this process started.
    pub applied_known: watch::Sender<bool>,
    /// Id of the agent stream allowed to append; a newer stream takes over.
    pub ingest_owner: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
    pub ship_restarts: AtomicU64,
    /// No longer assigned here: ship what is cached, then drop the machine.
    pub draining: std::sync::atomic::AtomicBool,
    /// The agent process whose stream was admitted last, and its connection: a stream of
    /// another process is admitted only once this one is gone.
    pub live: Mutex<Option<LiveAgent>>,
    /// Why the last ship stream ended, until the master target accepts a new one.
    pub ship_error: Mutex<Option<String>>,
}

/// The agent process streaming a machine into this process server.
#[derive(Clone)]
pub struct LiveAgent {
    pub instance: u64,
    pub conn: quinn::Connection,
}

impl PsMachine {
    /// Runs `f` on the cache in the blocking pool (cache calls do file I/O and fsync).
    pub async fn with_cache<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut MachineCache) -> Result<T, CacheError> + Send + 'static,
    ) -> Result<T, StreamError> {
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = lock(&cache)?;
            f(&mut c).map_err(StreamError::from)
        })
        .await
        .map_err(|e| StreamError::local("cache task", e))?
    }

    /// Empties the cache and forgets its cursors: nothing cached here any more, and the
    /// applied position must be learnt again from the master target before a stream may
    /// open (so an agent never skips data it believes we hold).
    pub fn reset_cache(&self) -> Result<(), StreamError> {
        self.reset_cache_if(|| true).map(|_| ())
    }

    /// [`reset_cache`](Self::reset_cache) if the machine is still draining; false if it was
    /// taken back meanwhile.
    pub fn reset_cache_if_draining(&self) -> Result<bool, StreamError> {
        self.reset_cache_if(|| self.draining.load(Ordering::SeqCst))
    }

    fn reset_cache_if(&self, still: impl FnOnce() -> bool) -> Result<bool, StreamError> {
        let mut c = lock(&self.cache)?;
        if !still() {
            return Ok(false);
        }
        c.clear()?;
        self.durable.send_replace(0);
        self.applied_known.send_replace(false);
        self.cache_bytes.store(0, Ordering::Relaxed);
        self.pending_bytes.store(0, Ordering::Relaxed);
        Ok(true)
    }

    pub fn set_ship_error(&self, e: Option<String>) {
        if let Ok(mut slot) = self.ship_error.lock() {
            *slot = e;
        }
    }

    pub fn record_applied(&self, seq: u64) {
        self.applied.send_if_modified(|a| {
            let grew = seq > *a;
            if grew {
                *a = seq;
            }
            grew
        });
        self.applied_known.send_replace(true);
    }
}

/// A lock that a panic elsewhere left poisoned is a failure of this node.
fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, StreamError> {
    m.lock()
        .map_err(|_| StreamError::Local("a process-server lock was poisoned by a panic".into()))
}
