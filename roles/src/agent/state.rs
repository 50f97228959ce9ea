//! The agent's state, shared by its tasks: one owner per kind of state — the stream state
//! in [`AgentCore`] (seqs, retention, barriers, moves, connection), the disks in a
//! [`DiskSet`], the durable applied-hash journal — each behind its own lock, never held
//! across I/O; and the notifications the tasks wake each other with.
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use haven_cluster::DiskInfo;
use haven_transport::codec;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use super::core::{AgentCore, InitialSync};
use super::disks::{self, DiskRecord, DisksFile, Observed};
use super::{journal, scan, AgentOptions};
use crate::{
    enroll::Identity,
    fsutil::{read_optional, unix_ms, write_atomic},
    link::Dialer,
    proto::{AgentReport, AgentStats, DiskBlock},
};

/// What can fail in the agent's own files and disks.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{doing} {}: {source}", path.display())]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is unreadable: {source}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: codec::CodecError,
    },
    #[error("{} has format {found} (this agent reads {expected})", path.display())]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(transparent)]
    Encode(#[from] codec::CodecError),
}

impl AgentError {
    pub fn io(doing: &'static str, path: &Path, source: std::io::Error) -> Self {
        AgentError::Io {
            doing,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<AgentError> for haven_actors::TaskError {
    fn from(e: AgentError) -> Self {
        haven_actors::TaskError::Retry(e.to_string())
    }
}

/// What the configuration node last said about this machine; persisted so the data path
/// keeps going while the configuration node is down.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Control {
    pub protected: bool,
    pub epoch: u32,
    pub generation: u64,
    pub process_server: Option<(String, String)>,
    /// Format version of `<data>/agent/control` (absent, 0, in files of earlier versions).
    #[serde(default)]
    pub version: u32,
    /// The machine is failed over: the tap takes no writes, for this reason (kept across
    /// restarts, so the original disks stay untouched while the configuration node is away).
    #[serde(default)]
    pub read_only: Option<String>,
    /// The failback (its order id) the agent last rebased for: done once per failback.
    #[serde(default)]
    pub rebased: Option<u64>,
}

pub(super) const CONTROL_VERSION: u32 = 1;

/// The applied hash tables on disk: `<data>/agent/tables`.
#[derive(Serialize, Deserialize)]
pub(super) struct TablesFile {
    pub version: u32,
    pub epoch: u32,
    pub applied_seq: u64,
    pub initial_done: bool,
    pub disks: Vec<TableDisk>,
}

pub(super) const TABLES_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub(super) struct TableDisk {
    pub name: String,
    /// The disk's size as of `applied_seq` (what the replica has).
    pub size_bytes: u64,
    #[serde(with = "serde_bytes")]
    pub hashes_le: Vec<u8>,
}

/// The protected disks: what was recorded of each, and which are blocked.
#[derive(Default)]
pub(super) struct DiskSet {
    pub records: Vec<DiskRecord>,
    /// Why each disk is blocked (nothing of it is sent), while it is.
    pub blocked: Vec<Option<String>>,
    /// The agent's `--disk` set is not the one the machine was protected with: nothing is
    /// captured until the machine is protected again.
    pub mismatch: Option<(String, u64)>,
    /// `ctl resync` requests seen and not yet carried out, per disk.
    pub resync: Vec<u64>,
}

impl DiskSet {
    pub fn adopted(records: Vec<DiskRecord>) -> Self {
        let n = records.len();
        Self {
            records,
            blocked: vec![None; n],
            mismatch: None,
            resync: vec![0; n],
        }
    }
}

pub(super) struct Agent {
    pub opts: AgentOptions,
    pub hostname: String,
    /// Random per process: tells a restarted agent from a second one claiming the machine.
    pub instance: u64,
    pub identity: Identity,
    pub dialer: Dialer,
    pub disks: Mutex<DiskSet>,
    pub core: Mutex<AgentCore>,
    pub journal: Mutex<Option<journal::Journal>>,
    /// The applied sizes the last snapshot recorded: a resize snapshots at once.
    pub snapshot_sizes: Mutex<Vec<u64>>,
    pub control: watch::Sender<Control>,
    /// Serialises changes to `control`: the poll loop and a rebase both change it, and each
    /// change is read, modified, saved and published as one step so neither loses the other's.
    pub control_write: Mutex<()>,
    /// Set once this process has had a poll reply: until then the tap holds writes (briefly,
    /// see `tap::STARTUP_HOLD`), since the machine may have been failed over while the agent
    /// was down and the original disks must then take no write.
    pub heard: watch::Sender<bool>,
    /// Bumped whenever the core is reset for a new epoch.
    pub reset: watch::Sender<u64>,
    /// A batch was numbered and retained (the stream sends it).
    pub new_batch: Notify,
    /// Retained batches were applied (capture may go on).
    pub room: Notify,
    /// Capture a pass now (a barrier, a resync).
    pub scan_now: Notify,
    /// The seq floor became known (capture may number).
    pub floor_known: Notify,
    /// Cuts the control loop's long poll short: something worth reporting happened.
    pub report_now: Notify,
    pub pass_scanned: AtomicU64,
    pub scans: AtomicU64,
    pub stream_restarts: AtomicU64,
    pub report_seq: AtomicU64,
    /// The capture source's name, and why its points are not crash-consistent now.
    pub capture_name: &'static str,
    pub capture_note: Mutex<Option<String>>,
    /// The machine's `--point-every` (ms), from the configuration node.
    pub point_every_ms: AtomicU64,
    /// The capture source makes points on request (`ctl mark`; the tap).
    pub takes_marks: bool,
    /// Requested and periodic points to make, and their outcomes to report.
    pub marks: Mutex<super::marks::MarkBox>,
    /// Reprotect: the reverse pass running and the last one done (see `reverse.rs`).
    pub reverse: Mutex<super::reverse::ReverseState>,
    /// A mark was queued, or the app-consistent period changed.
    pub mark_now: Notify,
    /// Group cuts (mark request ids) whose hold the configuration node released, newest
    /// last, at most [`RELEASED_MAX`].
    pub released: watch::Sender<Vec<u64>>,
}

/// Released group cuts remembered (a hold waits for its id to appear here).
pub const RELEASED_MAX: usize = 64;

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Looks at every `--disk`; a disk that cannot be read is an error naming it.
pub(super) fn observe_all(opts: &AgentOptions) -> Result<Vec<Observed>, AgentError> {
    opts.disks
        .iter()
        .map(|(_, path)| disks::observe(path).map_err(|e| AgentError::io("read disk", path, e)))
        .collect()
}

impl Agent {
    pub fn dir(&self) -> PathBuf {
        self.opts.data_dir.join("agent")
    }

    /// The protected disks as the inventory shows them (their protected geometry).
    pub fn disk_infos(&self) -> Vec<DiskInfo> {
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
    pub fn fresh_core(&self, epoch: u32) -> Result<AgentCore, AgentError> {
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
    pub fn save_disks(&self, epoch: u32) -> Result<(), AgentError> {
        let file = DisksFile {
            version: disks::DISKS_FILE_VERSION,
            epoch,
            disks: lock(&self.disks).records.clone(),
        };
        let bytes = codec::encode(&file)?;
        let path = self.dir().join("disks");
        write_atomic(&path, &bytes).map_err(|e| AgentError::io("write", &path, e))
    }

    /// Changes the control state with `f`; a change is saved before it is published, so
    /// what the tap and the stream act on is always what a restart finds.
    pub fn update_control(&self, f: impl FnOnce(&mut Control)) -> Result<(), AgentError> {
        let _serial = lock(&self.control_write);
        let mut next = self.control.borrow().clone();
        f(&mut next);
        if *self.control.borrow() == next {
            return Ok(());
        }
        let bytes = codec::encode(&next)?;
        let path = self.dir().join("control");
        write_atomic(&path, &bytes).map_err(|e| AgentError::io("write", &path, e))?;
        self.control.send_replace(next);
        Ok(())
    }

    /// Appends what was applied since the last call to the journal and fsyncs it.
    pub fn journal_applied(&self) -> Result<(), AgentError> {
        let Some((epoch, seq, updates)) = lock(&self.core).take_journal() else {
            return Ok(());
        };
        let mut j = lock(&self.journal);
        let Some(j) = j.as_mut() else { return Ok(()) };
        let path = j.path().to_path_buf();
        j.append(epoch, seq, &updates)
            .and_then(|_| j.sync())
            .map_err(|e| AgentError::io("append to the journal", &path, e))
    }

    /// Writes a full snapshot of the applied tables, then empties the journal.
    pub fn snapshot(&self) -> Result<(), AgentError> {
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
                version: TABLES_VERSION,
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
        let bytes = codec::encode(&file)?;
        let path = self.dir().join("tables");
        write_atomic(&path, &bytes).map_err(|e| AgentError::io("snapshot", &path, e))?;
        if let Some(j) = lock(&self.journal).as_mut() {
            let path = j.path().to_path_buf();
            j.truncate()
                .map_err(|e| AgentError::io("truncate the journal", &path, e))?;
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
    pub fn blocked(&self) -> Vec<DiskBlock> {
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

    pub fn report(&self, throughput_bps: u64, wait_ms: u32) -> AgentReport {
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
            reverse_done: lock(&self.reverse).done.clone(),
            rebased: self.control.borrow().rebased,
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
                connected: core.connected,
                degraded_reason: core.degraded_reason.clone(),
                scans: self.scans.load(Ordering::Relaxed),
                stream_restarts: self.stream_restarts.load(Ordering::Relaxed),
                last_move: core.last_move.clone(),
                blocked,
                capture: self.capture_name.to_string(),
                not_consistent: lock(&self.capture_note).clone(),
            },
            sync_done: core.barrier_done(),
            wait_ms,
            report_seq: self.next_report_seq(),
            known_generation: self.control.borrow().generation,
            held: false,
            instance: self.instance,
            marks_done: lock(&self.marks).report(),
            site: Some(self.opts.site.clone()),
        }
    }
}

/// The applied tables of this protection, if they describe the `--disk` set (by name; a disk
/// may have grown since: the size is the applied one).
pub(super) fn load_tables(opts: &AgentOptions, epoch: u32) -> Option<TablesFile> {
    let bytes = read_optional(&opts.data_dir.join("agent").join("tables")).ok()??;
    let file: TablesFile = codec::decode(&bytes)
        .map_err(|e| tracing::warn!("ignoring unreadable hash tables: {e}"))
        .ok()?;
    let same_disks = file.disks.len() == opts.disks.len()
        && file.disks.iter().zip(&opts.disks).all(|(t, (name, _))| {
            t.name == *name
                && t.hashes_le.len() as u64 == t.size_bytes.div_ceil(super::core::BLOCK_BYTES) * 8
        });
    if file.version != TABLES_VERSION {
        tracing::warn!(
            found = file.version,
            expected = TABLES_VERSION,
            "hash tables of another format; starting a full sync"
        );
        return None;
    }
    if file.epoch != epoch || !same_disks {
        tracing::info!("hash tables are for another epoch or disk set; starting a full sync");
        return None;
    }
    Some(file)
}

/// The recorded disks of this protection, if any.
pub(super) fn load_disks(
    opts: &AgentOptions,
    epoch: u32,
) -> Result<Option<Vec<DiskRecord>>, AgentError> {
    let path = opts.data_dir.join("agent").join("disks");
    let Some(bytes) = read_optional(&path).map_err(|e| AgentError::io("read", &path, e))? else {
        return Ok(None);
    };
    let file: DisksFile = codec::decode(&bytes).map_err(|source| AgentError::Format {
        path: path.clone(),
        source,
    })?;
    if file.version != disks::DISKS_FILE_VERSION {
        return Err(AgentError::Version {
            path,
            found: file.version,
            expected: disks::DISKS_FILE_VERSION,
        });
    }
    Ok((file.epoch == epoch).then_some(file.disks))
}

/// What the configuration node last said, as persisted (a missing file: nothing yet).
pub(super) fn load_control(opts: &AgentOptions) -> Result<Control, AgentError> {
    let path = opts.data_dir.join("agent").join("control");
    let Some(bytes) = read_optional(&path).map_err(|e| AgentError::io("read", &path, e))? else {
        return Ok(Control::default());
    };
    let control: Control = codec::decode(&bytes).map_err(|source| AgentError::Format {
        path: path.clone(),
        source,
    })?;
    // Version 0: written before the file carried one; the same fields.
    if control.version > CONTROL_VERSION {
        return Err(AgentError::Version {
            path,
            found: control.version,
            expected: CONTROL_VERSION,
        });
    }
    Ok(control)
}
