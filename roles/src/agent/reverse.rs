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
use std::{fs::OpenOptions, os::unix::fs::FileExt, sync::Arc, time::Duration};

use xxhash_rust::xxh3::xxh3_64;

use super::state::{lock, Agent};
use crate::client;
use crate::proto::{Request, Response, ReverseDiffRequest, ReverseDone, ReverseOrder};

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
