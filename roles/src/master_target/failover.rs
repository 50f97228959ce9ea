//! Failover at the master target: the replica's owner fences the forward stream, and the
//! disks at the chosen point are served as writable NBD exports at the recovery site.
//!
//! The configuration node's intent arrives in the machine's assignment
//! ([`FailoverOrder`]); [`reconcile`] makes this node match it, in an order that a SIGKILL at
//! any step leaves resumable:
//!
//! ```text
//!  order id N, nothing served  ─▶ fence (persisted: <data>/failovers/<m>/fence) ─▶ view at P
//!                                 ─▶ record (failover) ─▶ serve <data>/failovers/<m>/<disk>.sock
//!  order id N, record of N      ─▶ serve the record's point again (its overlay kept)
//!  order id M ≠ N (change point) ─▶ stop serving N, drop its overlay, then as above
//!  no order (cancelled)         ─▶ stop serving, drop the overlay, unfence, remove the dir
//! ```
//! The exports are copy-on-write over the view (as a drill's, see [`super::drill`]): the
//! replica and its journal are only read, so the view is served at once whatever the disk's
//! size or the point's age (the RTO is the time to open a view), and a cancel leaves the
//! replica exactly as replication made it. The overlay's bitmap is the record of every block
//! written at the recovery site since the failover, which the way back starts from.
use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::drill::{DrillRecord, DRILL_VERSION};
use super::owner::{Answer, Ask};
use super::recovery::{self, Drill};
use super::MasterService;
use crate::fsutil::{read_optional, unix_ms, write_atomic};
use crate::proto::{
    FailoverOrder, FailoverReport, Materialised, PointSpec, ReverseChangedReply,
    ReverseChangedRequest, ReverseDiffReply, ReverseDiffRequest, ReverseMarkReply,
    ReverseMarkRequest,
};

/// Where a machine's failover lives on the master target.
pub fn failover_dir(data_dir: &Path, machine: &str) -> PathBuf {
    data_dir.join("failovers").join(machine)
}

/// The owner's fence file (see [`super::owner::Ask::Fence`]); `replicas_dir` is
/// `<data>/replicas`.
pub fn fence_path(replicas_dir: &Path, machine: &str) -> PathBuf {
    failover_dir(replicas_dir.parent().unwrap_or(Path::new(".")), machine).join("fence")
}

/// A failover served here.
pub struct Served {
    pub order: u64,
    pub drill: Drill,
    pub serve_ms: u64,
    /// Failback: the exports are flushed and read-only.
    pub quiesced: bool,
    /// Failback: the replica equals the recovery disks.
    pub materialised: Option<Materialised>,
    /// Failback: the replica is being made equal to the recovery disks (in a task of its
    /// own: it reads every block, and other machines' failovers must not wait for it).
    pub materialising: bool,
}

/// The record of a failback's materialisation, saved once it is done (`<dir>/materialised`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MaterialisedRecord {
    order: u64,
    done: Materialised,
}

/// The record of what is served, saved before it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    order: u64,
    drill: DrillRecord,
}

fn load(dir: &Path) -> Result<Option<Record>, String> {
    let Some(bytes) = read_optional(&dir.join("failover")).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    haven_transport::codec::decode(&bytes)
        .map(Some)
        .map_err(|e| format!("failover record in {}: {e}", dir.display()))
}

fn save(dir: &Path, r: &Record) -> Result<(), String> {
    let bytes = haven_transport::codec::encode(r).map_err(|e| e.to_string())?;
    crate::fsutil::create_private_dir(dir)
        .and_then(|()| write_atomic(&dir.join("failover"), &bytes))
        .map_err(|e| format!("record the failover in {}: {e}", dir.display()))
}

/// What this node reports of `machine`'s failover.
pub fn report(state: &super::MasterState, machine: &str) -> Option<FailoverReport> {
    if let Some(s) = state.failovers().get(machine) {
        return Some(FailoverReport {
            id: s.order,
            point: Some(s.drill.view.point.clone()),
            disks: s.drill.view.disks.clone(),
            writes: s.drill.writes().0,
            serve_ms: s.serve_ms,
            error: None,
            quiesced: s.quiesced,
            materialised: s.materialised.clone(),
        });
    }
    state
        .failover_errors()
        .get(machine)
        .map(|(id, e)| FailoverReport {
            id: *id,
            error: Some(e.clone()),
            ..Default::default()
        })
}

/// Makes this node serve what `order` asks for `machine` (None: nothing). Errors are kept
/// for the report and the caller retries.
pub async fn reconcile(svc: &MasterService, machine: &str, order: Option<&FailoverOrder>) -> bool {
    let result = match order {
        Some(o) => match ensure(svc, machine, o).await {
            Ok(()) => failback(svc, machine, o).await,
            Err(e) => Err(e),
        },
        None => end(svc, machine).await.map(|()| true),
    };
    match result {
        Ok(true) => {
            svc.state.failover_errors().remove(machine);
            true
        }
        // Still under way in its own task: look again soon (an error it had stays shown).
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(%machine, "failover: {e}");
            if let Some(o) = order {
                svc.state
                    .failover_errors()
                    .insert(machine.to_string(), (o.id, e));
            }
            false
        }
    }
}

async fn ensure(svc: &MasterService, machine: &str, order: &FailoverOrder) -> Result<(), String> {
    if svc
        .state
        .failovers()
        .get(machine)
        .is_some_and(|s| s.order == order.id)
    {
        return Ok(());
    }
    let started = Instant::now();
    let dir = failover_dir(&svc.state.data_dir, machine);
    // Another point was served (failover-change-point): it goes first, with its overlay.
    let old = svc.state.failovers().remove(machine);
    if let Some(old) = old {
        let (writes, _) = old.drill.shutdown().await;
        tracing::info!(%machine, order = old.order, writes, "failover: the earlier point is no longer served; its writes are discarded");
    }
    let recorded = load(&dir)?;
    let point = match &recorded {
        Some(r) if r.order == order.id => PointSpec::Seq(r.drill.point_seq),
        Some(_) => {
            remove_overlays(&dir)?;
            order.point.clone()
        }
        None => order.point.clone(),
    };
    // The fence first: from its answer on, no batch of the forward stream is applied.
    match recovery::ask(svc, machine, Ask::Fence(true)).await? {
        Answer::Fenced(true) => {}
        other => return Err(format!("unexpected answer {other:?}")),
    }
    let picked = match recovery::ask(svc, machine, Ask::View(point)).await? {
        Answer::View(p) => p,
        other => return Err(format!("unexpected answer {other:?}")),
    };
    let record = match recorded.filter(|r| r.order == order.id) {
        Some(r) => r,
        None => {
            let r = Record {
                order: order.id,
                drill: DrillRecord {
                    version: DRILL_VERSION,
                    machine: machine.to_string(),
                    epoch: picked.epoch,
                    point_seq: picked.point.seq,
                    point: recovery::point_view(&picked.point),
                    disks: picked.disks.clone(),
                    started_ms: unix_ms(),
                },
            };
            save(&dir, &r)?;
            r
        }
    };
    // A failback under way serves them read-only from the start (a restart mid-failback).
    let read_only = order.failback.is_some();
    let drill = recovery::serve(&dir, record.drill, picked.view, started, read_only).await?;
    let serve_ms = started.elapsed().as_millis() as u64;
    tracing::info!(%machine, point = %drill.view.point.point, serve_ms, "failover: the forward stream is fenced and the disks are served at the point");
    svc.state.failovers().insert(
        machine.to_string(),
        Served {
            order: order.id,
            drill,
            serve_ms,
            quiesced: read_only,
            materialised: None,
            materialising: false,
        },
    );
    Ok(())
}

/// Failback at the master target: the exports are quiesced (every write taken made durable,
/// then none taken), and once ordered the replica is made equal to them (see
/// [`super::replica::Replica::rewrite_to`]); the result is recorded before it is reported,
/// so a restarted node reports it again instead of redoing it.
/// A failback's steps at the master target: quiesce the exports, then (ordered) materialise
/// the replica in a task of its own. Ok(false) while that task runs.
async fn failback(
    svc: &MasterService,
    machine: &str,
    order: &FailoverOrder,
) -> Result<bool, String> {
    let Some(fb) = &order.failback else {
        return Ok(true);
    };
    let (disks, quiesced, materialised, materialising) = {
        let served = svc.state.failovers();
        let s = served
            .get(machine)
            .ok_or_else(|| format!("the failover of {machine} is not served"))?;
        (
            s.drill.disks(),
            s.quiesced,
            s.materialised.clone(),
            s.materialising,
        )
    };
    if !quiesced {
        let d = disks.clone();
        tokio::task::spawn_blocking(move || d.iter().try_for_each(|c| c.quiesce()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("quiesce the recovery disks: {e}"))?;
        set_served(svc, machine, |s| s.quiesced = true);
        tracing::info!(%machine, "failback: the recovery disks are flushed and read-only");
    }
    let Some(generation) = fb.materialise else {
        return Ok(true);
    };
    if materialised.is_some_and(|m| m.generation == generation) {
        return Ok(true);
    }
    if materialising {
        return Ok(false);
    }
    set_served(svc, machine, |s| s.materialising = true);
    let (svc, machine, id) = (svc.clone(), machine.to_string(), order.id);
    tokio::spawn(async move {
        let result = materialise(&svc, &machine, id, generation, disks).await;
        set_served(&svc, &machine, |s| {
            s.materialising = false;
            if let Ok(done) = &result {
                s.materialised = Some(done.clone());
            }
        });
        if let Err(e) = result {
            tracing::warn!(%machine, "failback: {e}");
            svc.state.failover_errors().insert(machine, (id, e));
        }
    });
    Ok(false)
}

/// Makes the replica equal to the recovery disks under `generation` (or finds that it was,
/// from the record), and records it.
async fn materialise(
    svc: &MasterService,
    machine: &str,
    order: u64,
    generation: u64,
    disks: Vec<std::sync::Arc<super::drill::CowDisk>>,
) -> Result<Materialised, String> {
    let dir = failover_dir(&svc.state.data_dir, machine);
    let path = dir.join("materialised");
    let recorded = read_optional(&path)
        .map_err(|e| format!("read {}: {e}", path.display()))?
        .map(|b| haven_transport::codec::decode::<MaterialisedRecord>(&b))
        .transpose()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .filter(|r| r.order == order && r.done.generation == generation);
    let done = match recorded {
        Some(r) => r.done,
        None => {
            let done =
                match recovery::ask(svc, machine, Ask::Materialise { generation, disks }).await? {
                    Answer::Materialised(m) => m,
                    other => return Err(format!("unexpected answer {other:?}")),
                };
            let r = MaterialisedRecord {
                order,
                done: done.clone(),
            };
            let bytes = haven_transport::codec::encode(&r).map_err(|e| e.to_string())?;
            write_atomic(&path, &bytes).map_err(|e| format!("write {}: {e}", path.display()))?;
            done
        }
    };
    Ok(done)
}

fn set_served(svc: &MasterService, machine: &str, f: impl FnOnce(&mut Served)) {
    if let Some(s) = svc.state.failovers().get_mut(machine) {
        f(s);
    }
}

/// No failover is asked for: whatever was served stops, the overlay goes, the fence is
/// lifted, and the directory is removed last (a crash before leaves it to be ended again).
async fn end(svc: &MasterService, machine: &str) -> Result<(), String> {
    let dir = failover_dir(&svc.state.data_dir, machine);
    let served = svc.state.failovers().remove(machine);
    if served.is_none() && !dir.exists() {
        return Ok(());
    }
    if let Some(s) = served {
        let (writes, _) = s.drill.shutdown().await;
        tracing::info!(%machine, writes, "failover cancelled: the exports are gone and their writes discarded");
    }
    remove_overlays(&dir)?;
    match recovery::ask(svc, machine, Ask::Fence(false)).await? {
        Answer::Fenced(false) => {}
        other => return Err(format!("unexpected answer {other:?}")),
    }
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("remove {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The recovery disks of `machine`'s failover `order`, as served here.
fn served_disks(
    state: &super::MasterState,
    machine: &str,
    order: u64,
) -> Result<Vec<std::sync::Arc<super::drill::CowDisk>>, String> {
    let served = state.failovers();
    let s = served
        .get(machine)
        .ok_or_else(|| format!("{machine} is not failed over to this master target"))?;
    if s.order != order {
        return Err(format!(
            "the failover of {machine} changed since (order {} is served, not {order})",
            s.order
        ));
    }
    Ok(s.drill.disks())
}

fn served_disk(
    state: &super::MasterState,
    machine: &str,
    order: u64,
    disk: u16,
) -> Result<std::sync::Arc<super::drill::CowDisk>, String> {
    served_disks(state, machine, order)?
        .get(disk as usize)
        .cloned()
        .ok_or_else(|| format!("{machine} has no disk {disk}"))
}

/// A tracked reverse pass starts: a mark of every recovery disk's writes.
pub fn reverse_mark(
    state: &super::MasterState,
    req: ReverseMarkRequest,
) -> Result<ReverseMarkReply, String> {
    let disks = served_disks(state, &req.machine, req.order)?;
    Ok(ReverseMarkReply {
        marks: disks.iter().map(|d| d.mark()).collect(),
    })
}

/// The blocks of a recovery disk written since the agent's mark (see `agent/reverse.rs`).
pub fn reverse_changed(
    state: &super::MasterState,
    req: ReverseChangedRequest,
) -> Result<ReverseChangedReply, String> {
    if req.blocks > CHANGED_BLOCKS_MAX {
        return Err(format!(
            "ask for the changes of at most {CHANGED_BLOCKS_MAX} blocks at once"
        ));
    }
    let disk = served_disk(state, &req.machine, req.order, req.disk)?;
    Ok(ReverseChangedReply {
        changed: disk.changed_since(req.since, req.first_block, req.blocks),
    })
}

/// Largest range a `ReverseChanged` asks about, in blocks (its reply fits a control frame).
pub const CHANGED_BLOCKS_MAX: u64 = 1 << 16;

/// Reprotect: the blocks of the recovery disk in the agent's range (or its list of blocks,
/// `sparse`) whose hashes differ from the agent's (see `agent/reverse.rs`).
pub async fn reverse_diff(
    state: &super::MasterState,
    req: ReverseDiffRequest,
) -> Result<ReverseDiffReply, String> {
    let disk = served_disk(state, &req.machine, req.order, req.disk)?;
    let size = disk.size();
    if req.size != size {
        return Err(format!(
            "the original disk {} is {} bytes but the recovery disk is {size}: resize it to match first",
            req.disk, req.size
        ));
    }
    if !req.sparse.is_empty() {
        check_sparse(&req.sparse, req.hashes.len(), size.div_ceil(BLOCK))?;
        let list = req.sparse;
        let runs = tokio::task::spawn_blocking(move || {
            let mut runs: Vec<(u64, Vec<u8>)> = vec![];
            for (b, theirs) in list.iter().zip(&req.hashes) {
                let at = b * BLOCK;
                let mut block = vec![0u8; (size - at).min(BLOCK) as usize];
                disk.read_at(at, &mut block)?;
                if xxhash_rust::xxh3::xxh3_64(&block) == *theirs {
                    continue;
                }
                match runs.last_mut() {
                    Some((o, d)) if *o + d.len() as u64 == at => d.extend_from_slice(&block),
                    _ => runs.push((at, block)),
                }
            }
            Ok::<_, std::io::Error>(runs)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("read the recovery disk: {e}"))?;
        return Ok(ReverseDiffReply {
            runs: runs
                .into_iter()
                .map(|(o, d)| (o, serde_bytes::ByteBuf::from(d)))
                .collect(),
        });
    }
    let len = (req.hashes.len() as u64 * BLOCK).min(size.saturating_sub(req.offset));
    if req.offset % BLOCK != 0 || req.hashes.len() as u64 > CHUNK_BLOCKS_MAX || len == 0 {
        return Err(format!(
            "a reverse diff covers at most {CHUNK_BLOCKS_MAX} whole blocks inside the disk"
        ));
    }
    let offset = req.offset;
    let buf = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        disk.read_at(offset, &mut buf).map(|()| buf)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("read the recovery disk: {e}"))?;
    Ok(ReverseDiffReply {
        runs: diff_runs(offset, &req.hashes, &buf)
            .into_iter()
            .map(|(o, d)| (o, serde_bytes::ByteBuf::from(d)))
            .collect(),
    })
}

/// A sparse diff's blocks (`ReverseDiffRequest::sparse`) on a disk of `blocks` blocks: at
/// most [`CHUNK_BLOCKS_MAX`], ascending, inside the disk, one hash each.
fn check_sparse(sparse: &[u64], hashes: usize, blocks: u64) -> Result<(), String> {
    let ascending = sparse.windows(2).all(|w| w[0] < w[1]);
    if sparse.len() != hashes
        || sparse.len() as u64 > CHUNK_BLOCKS_MAX
        || !ascending
        || sparse.last().is_some_and(|&b| b >= blocks)
    {
        return Err(format!(
            "a sparse reverse diff names at most {CHUNK_BLOCKS_MAX} blocks of the disk, ascending, one hash each"
        ));
    }
    Ok(())
}

/// Largest reverse diff request, in blocks (its reply fits a control frame).
pub const CHUNK_BLOCKS_MAX: u64 = 128;
const BLOCK: u64 = 4096;

/// The runs of `ours` (the range at `offset`) whose 4 KiB blocks hash otherwise than
/// `theirs`, adjacent blocks coalesced. A block `theirs` lacks differs.
pub fn diff_runs(offset: u64, theirs: &[u64], ours: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut runs: Vec<(u64, Vec<u8>)> = vec![];
    for (i, block) in ours.chunks(BLOCK as usize).enumerate() {
        if theirs.get(i) == Some(&xxhash_rust::xxh3::xxh3_64(block)) {
            continue;
        }
        let at = offset + i as u64 * BLOCK;
        match runs.last_mut() {
            Some((o, d)) if *o + d.len() as u64 == at => d.extend_from_slice(block),
            _ => runs.push((at, block.to_vec())),
        }
    }
    runs
}

/// Removes a failover's record and overlays (not its fence).
fn remove_overlays(dir: &Path) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.file_name() != "fence" {
            std::fs::remove_file(e.path())
                .map_err(|err| format!("remove {}: {err}", e.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use xxhash_rust::xxh3::xxh3_64;

    #[test]
    fn a_sparse_diff_must_name_few_ascending_blocks_inside_the_disk() {
        assert_eq!(check_sparse(&[0, 5, 9], 3, 10), Ok(()));
        for (list, hashes, blocks) in [
            (vec![0, 5, 9], 2, 10),                   // a hash missing
            (vec![5, 5], 2, 10),                      // repeated
            (vec![6, 5], 2, 10),                      // descending
            (vec![0, 10], 2, 10),                     // past the end
            ((0..129).collect::<Vec<_>>(), 129, 200), // too many for a reply
        ] {
            assert!(check_sparse(&list, hashes, blocks).is_err(), "{list:?}");
        }
        assert_eq!(
            check_sparse(&(0..128).collect::<Vec<_>>(), 128, 128),
            Ok(())
        );
    }

    #[test]
    fn only_differing_blocks_travel_coalesced_into_runs() {
        let ours: Vec<u8> = (0..6 * 4096u32).map(|i| (i / 4096) as u8).collect();
        let mut theirs: Vec<u64> = ours.chunks(4096).map(xxh3_64).collect();
        assert_eq!(
            diff_runs(8192, &theirs, &ours),
            vec![],
            "equal: nothing travels"
        );
        theirs[1] ^= 1;
        theirs[2] ^= 1;
        theirs[4] ^= 1;
        assert_eq!(
            diff_runs(8192, &theirs, &ours),
            vec![
                (8192 + 4096, ours[4096..3 * 4096].to_vec()),
                (8192 + 4 * 4096, ours[4 * 4096..5 * 4096].to_vec()),
            ]
        );
        // A short last block, and hashes missing for the tail: both differ.
        let short = &ours[..4096 + 100];
        assert_eq!(
            diff_runs(0, &theirs[..1], short),
            vec![(4096, ours[4096..4196].to_vec())]
        );
    }
}
