//! Recovery commands at the master target, forwarded by the configuration node: a machine's
//! recovery points, and test failovers (drills, see [`super::drill`]).
//!
//! The replica owner (`replica/<machine>`) answers what only it knows (the journal's points,
//! a view pinned at a point); this module serves and records the drill, so the owner keeps
//! applying while a drill runs.
use std::{sync::Arc, time::Duration};

use haven_nbd::{Backend, Exports, Server, ServerHandle};

use super::drill::{self, CowDisk, DiskView, DrillRecord, DRILL_VERSION};
use super::owner::{Answer, Ask, Catalogue, Picked};
use super::replica::RecoveryPoint;
use super::MasterService;
use crate::fsutil::unix_ms;
use crate::proto::{PointSpec, RecoveryReply, RecoveryRequest, Response};
use crate::view::{CleanupView, FailoverDiskView, PointView, RecoveryPointsView, TestFailoverView};

/// A drill being served.
pub struct Drill {
    pub view: TestFailoverView,
    record: DrillRecord,
    disks: Vec<Arc<CowDisk>>,
    servers: Vec<ServerHandle>,
}

fn refused(reason: impl Into<String>) -> Response {
    Response::Refused {
        reason: reason.into(),
    }
}

pub async fn handle(svc: &MasterService, request: RecoveryRequest) -> Response {
    match request {
        RecoveryRequest::Points { machine } => match catalogue(svc, &machine).await {
            Ok(c) => Response::Recovery(RecoveryReply::Points(points_view(svc, &machine, c))),
            Err(e) => refused(e),
        },
        RecoveryRequest::TestFailover {
            machine,
            point,
            export_dir,
        } => match test_failover(svc, &machine, point, export_dir).await {
            Ok(v) => Response::Recovery(RecoveryReply::TestFailover(v)),
            Err(e) => refused(e),
        },
        RecoveryRequest::TestFailoverCleanup { machine } => match cleanup(svc, &machine).await {
            Ok(v) => Response::Recovery(RecoveryReply::Cleaned(v)),
            Err(e) => refused(e),
        },
    }
}

pub async fn ask(svc: &MasterService, machine: &str, ask: Ask) -> Result<Answer, String> {
    let disks = svc
        .link()
        .assignment(machine)
        .map(|a| a.disks)
        .ok_or_else(|| format!("{machine} is not assigned to this master target"))?;
    let mailbox = svc
        .state
        .mailbox(machine, Duration::from_secs(2))
        .await
        .ok_or_else(|| format!("no replica of {machine} is open on this master target"))?;
    super::owner::ask(&mailbox, ask, disks).await
}

async fn catalogue(svc: &MasterService, machine: &str) -> Result<Catalogue, String> {
    match ask(svc, machine, Ask::Catalogue).await? {
        Answer::Catalogue(c) => Ok(c),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

pub fn point_view(p: &RecoveryPoint) -> PointView {
    PointView {
        point: p.seq.to_string(),
        seq: p.seq,
        time_ms: p.time_ms,
        kind: p.kind.as_str().to_string(),
        name: p.name.clone(),
    }
}

fn points_view(svc: &MasterService, machine: &str, c: Catalogue) -> RecoveryPointsView {
    let now = unix_ms();
    let oldest = c.points.first().map(|p| p.time_ms);
    RecoveryPointsView {
        machine: machine.to_string(),
        points: c.points.iter().map(point_view).collect(),
        retention_ms: c.retention_ms,
        held_ms: oldest.map(|t| now.saturating_sub(t)).unwrap_or(0),
        journal_bytes: c.journal_bytes,
        journal_cap_bytes: c.journal_cap_bytes,
        cap_reached: c.cap_reached,
        applied_seq: c.applied_seq,
        test_failover: svc.state.drill_view(machine),
    }
}

/// Resolves `--point` against the points held, oldest first.
pub fn resolve(points: &[RecoveryPoint], spec: &PointSpec) -> Result<usize, String> {
    let app = |p: &RecoveryPoint| p.kind == crate::proto::PointKind::App;
    let found = match spec {
        PointSpec::Latest => points.len().checked_sub(1),
        PointSpec::LatestApp => points.iter().rposition(app),
        PointSpec::Seq(seq) => points.iter().position(|p| p.seq == *seq),
        PointSpec::AtOrBefore { time_ms } => points.iter().rposition(|p| p.time_ms <= *time_ms),
    };
    found.ok_or_else(|| match spec {
        _ if points.is_empty() => "there is no recovery point yet (the initial sync has not applied one, or the journal is empty)".to_string(),
        PointSpec::Latest => unreachable!("points is not empty"),
        PointSpec::LatestApp => "there is no app-consistent point in the window".into(),
        PointSpec::Seq(seq) => format!(
            "no recovery point {seq} (it may have been pruned; `ctl recovery-points` lists the points held)"
        ),
        PointSpec::AtOrBefore { .. } => format!(
            "no recovery point at or before that time (the oldest held is at {} ms)",
            points[0].time_ms
        ),
    })
}

async fn test_failover(
    svc: &MasterService,
    machine: &str,
    spec: PointSpec,
    export_dir: Option<String>,
) -> Result<TestFailoverView, String> {
    let started = std::time::Instant::now();
    if export_dir.is_none() {
        if let Some(v) = svc.state.drill_view(machine) {
            return Err(format!(
                "a test failover of {machine} is active (point {}); end it first with `ctl test-failover-cleanup {machine}`",
                v.point.point
            ));
        }
    }
    let picked = match ask(svc, machine, Ask::View(spec)).await? {
        Answer::View(p) => p,
        other => return Err(format!("unexpected answer {other:?}")),
    };
    let point = point_view(&picked.point);
    if let Some(dir) = export_dir {
        return export(machine, picked, point, &dir, started).await;
    }
    let record = DrillRecord {
        version: DRILL_VERSION,
        machine: machine.to_string(),
        epoch: picked.epoch,
        point_seq: picked.point.seq,
        point: point.clone(),
        disks: picked.disks.clone(),
        started_ms: unix_ms(),
    };
    let dir = drill::drill_dir(&svc.state.data_dir, machine);
    drill::save_record(&dir, &record)
        .map_err(|e| format!("record the test failover in {}: {e}", dir.display()))?;
    let drill = serve(&dir, record, picked.view, started, false).await?;
    let view = drill.view.clone();
    svc.state.insert_drill(machine, drill);
    tracing::info!(%machine, point = %view.point.point, elapsed_ms = view.elapsed_ms, "test failover: the view is served; replication goes on");
    Ok(view)
}

/// Serves a recorded drill (or failover) from `dir`: one copy-on-write export per disk, each
/// on its own unix socket there.
pub async fn serve(
    dir: &std::path::Path,
    record: DrillRecord,
    view: Arc<dyn DiskView>,
    started: std::time::Instant,
    read_only: bool,
) -> Result<Drill, String> {
    let mut disks = Vec::new();
    let mut servers = Vec::new();
    let mut views = Vec::new();
    for (i, name) in record.disks.iter().enumerate() {
        let cow = CowDisk::open(view.clone(), i as u16, dir, name)
            .map(Arc::new)
            .map_err(|e| format!("open the overlay of {name}: {e}"))?;
        if read_only {
            cow.quiesce()
                .map_err(|e| format!("make {name} read-only: {e}"))?;
        }
        let exports = Arc::new(Exports::new());
        exports.insert(name.clone(), cow.clone() as Arc<dyn Backend>);
        let sock = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let h = Server::new(exports)
            .serve_unix(&sock)
            .await
            .map_err(|e| format!("serve {}: {e}", sock.display()))?;
        views.push(FailoverDiskView {
            disk: name.clone(),
            nbd_uri: Some(format!("nbd+unix:///{name}?socket={}", sock.display())),
            image: None,
            size_bytes: cow.size(),
        });
        disks.push(cow);
        servers.push(h);
    }
    Ok(Drill {
        view: TestFailoverView {
            machine: record.machine.clone(),
            point: record.point.clone(),
            disks: views,
            elapsed_ms: started.elapsed().as_millis() as u64,
            started_ms: record.started_ms,
        },
        record,
        disks,
        servers,
    })
}

async fn export(
    machine: &str,
    picked: Picked,
    point: PointView,
    dir: &str,
    started: std::time::Instant,
) -> Result<TestFailoverView, String> {
    let dir = std::path::PathBuf::from(dir);
    let names = picked.disks.clone();
    let view = picked.view.clone();
    let out = dir.clone();
    let disks = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let path = out.join(format!("{name}.img"));
                drill::export_image(view.as_ref(), i as u16, &path)
                    .map_err(|e| format!("write {}: {e}", path.display()))?;
                Ok(FailoverDiskView {
                    disk: name.clone(),
                    nbd_uri: None,
                    image: Some(path.display().to_string()),
                    size_bytes: view.size(i as u16).map_err(|e| e.to_string())?,
                })
            })
            .collect::<Result<Vec<_>, String>>()
    })
    .await
    .map_err(|e| format!("export task: {e}"))??;
    tracing::info!(%machine, point = %point.point, dir = %dir.display(), "test failover: the view is written as images");
    Ok(TestFailoverView {
        machine: machine.to_string(),
        point,
        disks,
        elapsed_ms: started.elapsed().as_millis() as u64,
        started_ms: unix_ms(),
    })
}

async fn cleanup(svc: &MasterService, machine: &str) -> Result<CleanupView, String> {
    let dir = drill::drill_dir(&svc.state.data_dir, machine);
    let drill = svc.state.take_drill(machine);
    let recorded = drill::load_record(&dir).ok().flatten();
    if drill.is_none() && recorded.is_none() && !dir.exists() {
        return Err(format!("no test failover of {machine} is active"));
    }
    let (mut writes, mut bytes) = (0, 0);
    if let Some(d) = drill {
        (writes, bytes) = d.shutdown().await;
    }
    // Last: a crash before this leaves a drill that is served again, or cleaned again.
    std::fs::remove_dir_all(&dir)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| format!("remove {}: {e}", dir.display()))?;
    tracing::info!(%machine, overlay_writes = writes, overlay_bytes = bytes, "test failover cleaned up");
    Ok(CleanupView {
        machine: machine.to_string(),
        overlay_writes: writes,
        overlay_bytes: bytes,
        replica_untouched: true,
        message: format!(
            "{machine}: test failover ended; its {writes} writes ({} KiB) were in the overlay, now discarded; the replica and its journal were only read",
            bytes >> 10
        ),
    })
}

/// After a master-target restart: a recorded drill is served again (its overlay keeps what
/// was flushed), or — if its point is gone — cleaned, never left half there.
pub async fn resume(svc: MasterService, machine: String) {
    let dir = drill::drill_dir(&svc.state.data_dir, &machine);
    let record = match drill::load_record(&dir) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(%machine, "unreadable test-failover record: {e}; run `ctl test-failover-cleanup {machine}`");
            return;
        }
    };
    if svc.state.drill_view(&machine).is_some() {
        return;
    }
    let started = std::time::Instant::now();
    let picked = match ask(&svc, &machine, Ask::View(PointSpec::Seq(record.point_seq))).await {
        Ok(Answer::View(p)) if p.epoch == record.epoch => p,
        other => {
            let why = match other {
                Err(e) => e,
                Ok(_) => "the replica's epoch changed".into(),
            };
            tracing::warn!(%machine, point = record.point_seq, "the test failover cannot be served again ({why}): cleaning it up");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    };
    match serve(&dir, record, picked.view, started, false).await {
        Ok(d) => {
            tracing::info!(%machine, point = %d.view.point.point, "test failover served again after a restart");
            svc.state.insert_drill(&machine, d);
        }
        Err(e) => tracing::error!(%machine, "the test failover cannot be served again: {e}"),
    }
}

impl Drill {
    pub fn record(&self) -> &DrillRecord {
        &self.record
    }

    /// The export of disk `i`.
    pub fn disk(&self, i: u16) -> Option<Arc<CowDisk>> {
        self.disks.get(i as usize).cloned()
    }

    /// Every export, in disk order.
    pub fn disks(&self) -> Vec<Arc<CowDisk>> {
        self.disks.clone()
    }

    /// Writes made through the exports (since they were served) and the overlay's bytes.
    pub fn writes(&self) -> (u64, u64) {
        self.disks
            .iter()
            .fold((0, 0), |(w, b), c| (w + c.writes(), b + c.overlay_bytes()))
    }

    /// Stops the exports (their connections end) and closes the overlays: returns
    /// [`Drill::writes`].
    pub async fn shutdown(self) -> (u64, u64) {
        let writes = self.writes();
        for s in self.servers {
            s.shutdown().await;
        }
        writes
    }
}
