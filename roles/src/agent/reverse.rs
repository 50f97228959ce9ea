//! Reprotect at the original site: the agent of a failed-over machine makes its disks equal
//! to the recovery disks its master target serves, by a full block-hash comparison.
//!
//! ```text
//!  agent: read 512 KiB of the disk, xxh3 per 4 KiB ──ReverseDiff{hashes}──▶ master target:
//!         pwrite the differing runs ◀──────────── runs whose blocks differ ── the recovery
//!                                                                           disk (view + overlay)
//! ```
//! Every block is compared (nothing is trusted, so a lost or untrusted record of what
//! changed costs reads, never a wrong disk) and only differing blocks travel: the blocks
//! written at the recovery site since the failover, and the blocks the original site wrote
//! after the point (which go back to the point's content). The disks are fdatasynced before
//! the pass is reported done. The tap takes no writes meanwhile (the machine is failed over),
//! so nothing else writes the disks.
//!
//! Failback ends here with a **rebase** ([`offer_rebase`]): once the master target has made
//! the replica equal to the recovery disks (which the final pass made these disks equal to),
//! the agent's applied tables become its disks' hashes at the replica's seq, and what it
//! retained from before the failover (rolled back) is dropped. The capture restarts on
//! them: its sync pass finds nothing to send, so forward protection resumes without a full
//! resync.
use std::{fs::OpenOptions, os::unix::fs::FileExt, sync::Arc, time::Duration};

use xxhash_rust::xxh3::xxh3_64;

use super::core::AgentCore;
use super::state::{lock, Agent};
use crate::client;
use crate::proto::{RebaseOrder, Request, Response, ReverseDiffRequest, ReverseDone, ReverseOrder};

/// Blocks compared per request: the reply (at most this many blocks) fits a control frame.
const CHUNK_BLOCKS: u64 = crate::master_target::failover::CHUNK_BLOCKS_MAX;
const BLOCK: u64 = 4096;
/// A pass that fails is tried again after this long.
const RETRY: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct ReverseState {
    /// The (order, pass) being worked on.
    pub running: Option<(u64, u64)>,
    /// The last pass finished (or failed), reported until a newer one.
    pub done: Option<ReverseDone>,
    /// The failback being rebased for (its order id).
    pub rebasing: Option<u64>,
}

/// Starts the pass `order` asks for, unless it runs or is done.
pub(super) fn offer(a: &Arc<Agent>, order: ReverseOrder) {
    {
        let mut st = lock(&a.reverse);
        let key = (order.order, order.pass);
        let finished = st
            .done
            .as_ref()
            .is_some_and(|d| (d.order, d.pass) == key && d.error.is_none());
        if st.running == Some(key) || finished {
            return;
        }
        st.running = Some(key);
    }
    let a = a.clone();
    tokio::spawn(async move {
        loop {
            let done = run_pass(&a, &order).await;
            let failed = done.error.clone();
            match &failed {
                None => tracing::info!(
                    pass = order.pass,
                    compared = done.bytes_compared,
                    received = done.bytes_received,
                    blocks = done.blocks_written,
                    "reprotect: the disks now equal the recovery disks"
                ),
                Some(e) => {
                    tracing::warn!(pass = order.pass, "reprotect pass failed, retrying: {e}")
                }
            }
            {
                let mut st = lock(&a.reverse);
                st.done = Some(done);
                if failed.is_none() {
                    st.running = None;
                }
            }
            a.report_now.notify_one();
            if failed.is_none() {
                return;
            }
            tokio::time::sleep(RETRY).await;
        }
    });
}

async fn run_pass(a: &Arc<Agent>, order: &ReverseOrder) -> ReverseDone {
    let mut done = ReverseDone {
        order: order.order,
        pass: order.pass,
        ..Default::default()
    };
    if let Err(e) = pass(a, order, &mut done).await {
        done.error = Some(e);
    }
    done
}

async fn pass(a: &Arc<Agent>, order: &ReverseOrder, done: &mut ReverseDone) -> Result<(), String> {
    let (name, addr) = &order.master_target;
    let conn = a
        .dialer
        .connect(addr, name)
        .await
        .map_err(|e| format!("connect to the master target {name} at {addr}: {e}"))?;
    for (i, (disk, path)) in a.opts.disks.iter().enumerate() {
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("open {}: {e}", path.display()))?,
        );
        let size = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        let mut at = 0u64;
        while at < size {
            let len = (size - at).min(CHUNK_BLOCKS * BLOCK);
            let f = file.clone();
            let buf = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, at).map(|()| buf)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("read {disk} at {at}: {e}"))?;
            let hashes: Vec<u64> = buf.chunks(BLOCK as usize).map(xxh3_64).collect();
            done.bytes_compared += len;
            done.hash_bytes += hashes.len() as u64 * 8;
            let req = Request::ReverseDiff(ReverseDiffRequest {
                machine: a.opts.machine.clone(),
                order: order.order,
                disk: i as u16,
                offset: at,
                size,
                hashes,
            });
            let runs = match client::call(&conn, &req, Duration::from_secs(30)).await {
                Ok(Response::ReverseDiff(r)) => r.runs,
                Ok(other) => return Err(format!("unexpected reply {other:?}")),
                Err(e) => return Err(format!("the master target: {e}")),
            };
            for (offset, data) in runs {
                let end = offset.saturating_add(data.len() as u64);
                if offset < at || end > at + len || offset % BLOCK != 0 {
                    return Err(format!(
                        "the master target sent a run at {offset}+{} outside the range {at}+{len}",
                        data.len()
                    ));
                }
                let f = file.clone();
                let n = data.len() as u64;
                tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("write {disk} at {offset}: {e}"))?;
                done.bytes_received += n;
                done.blocks_written += n.div_ceil(BLOCK);
            }
            at += len;
        }
        let f = file.clone();
        tokio::task::spawn_blocking(move || f.sync_data())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("fdatasync {disk}: {e}"))?;
    }
    Ok(())
}

/// Starts the failback's rebase `order` asks for, unless it runs or is done (persisted in
/// the control file, so a restarted agent does not rebase twice).
pub(super) fn offer_rebase(a: &Arc<Agent>, order: RebaseOrder) {
    if a.control.borrow().rebased == Some(order.order) {
        return;
    }
    {
        let mut st = lock(&a.reverse);
        if st.rebasing == Some(order.order) {
            return;
        }
        st.rebasing = Some(order.order);
    }
    let a = a.clone();
    tokio::spawn(async move {
        loop {
            match rebase(&a, &order).await {
                Ok(()) => break,
                Err(e) => tracing::warn!("failback: rebasing on the replica failed, retrying: {e}"),
            }
            tokio::time::sleep(RETRY).await;
        }
        lock(&a.reverse).rebasing = None;
        a.report_now.notify_one();
    });
}

/// The disks equal the replica at `order.applied_seq`: their hashes become the applied
/// tables, durably (a snapshot), before the rebase is recorded done; then the capture and
/// the stream restart on the new core.
async fn rebase(a: &Arc<Agent>, order: &RebaseOrder) -> Result<(), String> {
    let paths: Vec<_> = a.opts.disks.iter().map(|(_, p)| p.clone()).collect();
    let (tables, sizes) = tokio::task::spawn_blocking(move || {
        let mut tables = Vec::with_capacity(paths.len());
        let mut sizes = Vec::with_capacity(paths.len());
        for path in &paths {
            let (t, size) = hash_disk(path).map_err(|e| format!("hash {}: {e}", path.display()))?;
            tables.push(t);
            sizes.push(size);
        }
        Ok::<_, String>((tables, sizes))
    })
    .await
    .map_err(|e| e.to_string())??;
    {
        let mut core = lock(&a.core);
        let mut fresh = AgentCore::new(
            core.epoch,
            order.applied_seq,
            tables,
            sizes,
            a.opts.retention_bytes,
            None,
        );
        // The same epoch goes on: its byte counters too (`ctl status` RAW SENT).
        fresh.raw_bytes_sent = core.raw_bytes_sent;
        fresh.raw_bytes_captured = core.raw_bytes_captured;
        fresh.raw_bytes_applied = core.raw_bytes_applied;
        core.renew(fresh);
        core.applied_dirty = true;
        // The capture and the stream start over on the new core: bumped under the core lock,
        // so nothing captured for the old core is numbered by the new one (see
        // `CaptureSink::number`).
        a.reset.send_modify(|g| *g += 1);
    }
    let a2 = a.clone();
    tokio::task::spawn_blocking(move || a2.snapshot())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // Rebased, the disks are the machine's own again: the tap takes writes at once (the
    // configuration node's next step, on this report, is protected — it waits for nothing
    // else), so an operator who sees "failed back" finds the disks writable.
    a.update_control(|c| {
        c.rebased = Some(order.order);
        c.read_only = None;
    })
    .map_err(|e| e.to_string())?;
    tracing::info!("the tap takes writes again");
    tracing::info!(
        applied_seq = order.applied_seq,
        "failback: the disks are the replica's; forward protection resumes without a full resync"
    );
    Ok(())
}

/// xxh3 of every 4 KiB block of the disk at `path` (the last one as long as it is), and
/// its size.
fn hash_disk(path: &std::path::Path) -> std::io::Result<(Vec<u64>, u64)> {
    let file = std::fs::File::open(path)?;
    let size = super::scan::disk_size(path)?;
    let mut table = Vec::with_capacity(size.div_ceil(BLOCK) as usize);
    let mut buf = vec![0u8; (CHUNK_BLOCKS * BLOCK) as usize];
    let mut at = 0u64;
    while at < size {
        let len = (size - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..len], at)?;
        table.extend(buf[..len].chunks(BLOCK as usize).map(xxh3_64));
        at += len as u64;
    }
    Ok((table, size))
}
