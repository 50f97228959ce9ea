//! Reprotect at the original site: the agent of a failed-over machine makes its disks equal
//! to the recovery disks its master target serves, by block-hash comparison.
//!
//! ```text
//!  agent: ReverseMark ─────────────────────────────────────────▶ master target: a mark per disk
//!         read 512 KiB of the disk, xxh3 per 4 KiB ──ReverseDiff{hashes}──▶
//!         pwrite the differing runs ◀──────────── runs whose blocks differ ── the recovery
//!                                                                           disk (view + overlay)
//! ```
//! The first pass of a failover compares every block: what the original site wrote after
//! the point is not known for sure (an agent killed with writes it had not sent, writes
//! behind its back), so nothing is trusted, and a lost record of what changed costs reads,
//! never a wrong disk. Only differing blocks travel: the blocks written at the recovery site
//! since the failover, and the blocks the original site wrote after the point (which go back
//! to the point's content).
//!
//! A later pass (the failback's final one) of the same agent process and the same exports
//! is **tracked**: it asks for the blocks written at the recovery site since the marks its
//! last whole pass took at its start (`ReverseChanged`) and compares only those
//! (`ReverseDiff` with `sparse`), so its cost follows what changed, not the disk's size. It
//! is sound because nothing else writes these disks meanwhile — the tap takes no writes
//! while the machine is failed over — and the marks are taken before the pass reads
//! anything (see `CowDisk::mark`). An agent or an export that restarted has no marks, and
//! its next pass compares every block again. The disks are fdatasynced before a pass is
//! reported done.
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
use crate::master_target::failover::CHANGED_BLOCKS_MAX;
use crate::proto::{
    RebaseOrder, Request, Response, ReverseChangedRequest, ReverseDiffRequest, ReverseDone,
    ReverseMark, ReverseMarkRequest, ReverseOrder,
};

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
    /// The marks the last whole pass of failover `.0` took at its start (memory only: a
    /// restarted agent compares every block once more).
    pub tracked: Option<(u64, Vec<ReverseMark>)>,
    /// A pass asked for while another runs: started when that one ends.
    pub next: Option<ReverseOrder>,
    /// The xxh3 of every block of the disks as the passes of failover `.0` left them, kept
    /// by this process from a whole pass on (each pass reads or writes what changes them),
    /// so the failback's rebase need not read the disks again. Taken out while a pass runs:
    /// a pass that fails leaves none.
    pub hashes: Option<(u64, Vec<Vec<u64>>)>,
}

/// Starts the pass `order` asks for, unless it runs or is done. One pass runs at a time: a
/// newer one asked for meanwhile (a failback's final pass while a periodic one runs) starts
/// when it ends, so two passes never write the disks at once, and the newer one's marks
/// are the older one's end.
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
        if st.running.is_some() {
            st.next = Some(order);
            return;
        }
        st.running = Some(key);
    }
    let a = a.clone();
    tokio::spawn(async move {
        let mut order = order;
        loop {
            let done = run_pass(&a, &order).await;
            let failed = done.error.clone();
            match &failed {
                None => tracing::info!(
                    pass = order.pass,
                    compared = done.bytes_compared,
                    received = done.bytes_received,
                    blocks = done.blocks_written,
                    tracked = done.tracked,
                    "reverse pass: the disks now equal the recovery disks"
                ),
                Some(e) => {
                    tracing::warn!(pass = order.pass, "reverse pass failed, retrying: {e}")
                }
            }
            let next = {
                let mut st = lock(&a.reverse);
                st.done = Some(done);
                let next = st
                    .next
                    .take()
                    .filter(|n| (n.order, n.pass) != (order.order, order.pass));
                st.running = match (&next, &failed) {
                    (Some(n), _) => Some((n.order, n.pass)),
                    (None, Some(_)) => st.running,
                    (None, None) => None,
                };
                next
            };
            a.report_now.notify_one();
            match (next, failed) {
                (Some(n), _) => order = n,
                (None, Some(_)) => tokio::time::sleep(RETRY).await,
                (None, None) => return,
            }
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
    let ask = Ask {
        conn: &conn,
        machine: &a.opts.machine,
        order: order.order,
    };
    // This pass's marks, taken before anything is read: the next pass compares only the
    // blocks written at the recovery site after them.
    let marks = match ask
        .call(Request::ReverseMark(ReverseMarkRequest {
            machine: a.opts.machine.clone(),
            order: order.order,
        }))
        .await?
    {
        Response::ReverseMark(r) => r.marks,
        other => return Err(format!("unexpected reply {other:?}")),
    };
    // The last whole pass of this failover, if this process made it: since then nothing
    // but the passes wrote these disks (the tap is read-only), so the blocks written at
    // the recovery site after its marks are all that can differ. Otherwise (the first
    // pass, a restarted agent or master target) every block is compared.
    let since = lock(&a.reverse)
        .tracked
        .as_ref()
        .filter(|(o, _)| *o == order.order)
        .map(|(_, m)| m.clone());
    let kept = lock(&a.reverse)
        .hashes
        .take()
        .filter(|(o, t)| *o == order.order && t.len() == a.opts.disks.len());
    let mut tables: Vec<Option<Vec<u64>>> = match kept {
        Some((_, t)) => t.into_iter().map(Some).collect(),
        None => vec![None; a.opts.disks.len()],
    };
    let mut all_tracked = true;
    for (i, (disk, path)) in a.opts.disks.iter().enumerate() {
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("open {}: {e}", path.display()))?,
        );
        // Its size by seeking to the end: a block device's metadata says 0, and a pass over
        // nothing would report the disks equal.
        let size = super::scan::disk_size(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let d = Disk {
            index: i as u16,
            name: disk,
            file,
            size,
        };
        let table = &mut tables[i];
        if table
            .as_ref()
            .is_some_and(|t| t.len() as u64 != size.div_ceil(BLOCK))
        {
            *table = None;
        }
        let tracked = match since.as_ref().and_then(|m| m.get(i)) {
            Some(&mark) => tracked_disk(&ask, &d, mark, table.as_mut(), done).await?,
            None => false,
        };
        if !tracked {
            all_tracked = false;
            *table = Some(full_disk(&ask, &d, done).await?);
        }
        let f = d.file.clone();
        tokio::task::spawn_blocking(move || f.sync_data())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("fdatasync {disk}: {e}"))?;
    }
    done.tracked = all_tracked;
    let mut st = lock(&a.reverse);
    st.tracked = Some((order.order, marks));
    st.hashes = tables
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .map(|t| (order.order, t));
    Ok(())
}

/// The master target of a reverse pass, asked about one machine's failover.
struct Ask<'a> {
    conn: &'a quinn::Connection,
    machine: &'a str,
    order: u64,
}

impl Ask<'_> {
    async fn call(&self, req: Request) -> Result<Response, String> {
        match client::call(self.conn, &req, Duration::from_secs(30)).await {
            Ok(Response::Refused { reason }) => Err(format!("the master target: {reason}")),
            Ok(r) => Ok(r),
            Err(e) => Err(format!("the master target: {e}")),
        }
    }

    /// The runs of the recovery disk that differ from the hashes sent.
    async fn diff(
        &self,
        d: &Disk<'_>,
        offset: u64,
        hashes: Vec<u64>,
        sparse: Vec<u64>,
    ) -> Result<Vec<(u64, serde_bytes::ByteBuf)>, String> {
        let req = Request::ReverseDiff(ReverseDiffRequest {
            machine: self.machine.to_string(),
            order: self.order,
            disk: d.index,
            offset,
            size: d.size,
            hashes,
            sparse,
        });
        match self.call(req).await? {
            Response::ReverseDiff(r) => Ok(r.runs),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }
}

/// One of the agent's disks in a pass.
struct Disk<'a> {
    index: u16,
    name: &'a str,
    file: Arc<std::fs::File>,
    size: u64,
}

impl Disk<'_> {
    /// Writes the runs the master target sent, each checked to lie in what was asked
    /// (`asked(offset, len)`), and keeps `table` (the disk's block hashes) up to date.
    async fn write_runs(
        &self,
        runs: Vec<(u64, serde_bytes::ByteBuf)>,
        asked: impl Fn(u64, u64) -> bool,
        mut table: Option<&mut Vec<u64>>,
        done: &mut ReverseDone,
    ) -> Result<(), String> {
        for (offset, data) in runs {
            let n = data.len() as u64;
            if offset % BLOCK != 0 || offset.saturating_add(n) > self.size || !asked(offset, n) {
                return Err(format!(
                    "the master target sent a run at {offset}+{n} of {} it was not asked for",
                    self.name
                ));
            }
            if let Some(t) = table.as_deref_mut() {
                for (j, block) in data.chunks(BLOCK as usize).enumerate() {
                    if let Some(h) = t.get_mut((offset / BLOCK) as usize + j) {
                        *h = xxh3_64(block);
                    }
                }
            }
            let f = self.file.clone();
            tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("write {} at {offset}: {e}", self.name))?;
            done.bytes_received += n;
            done.blocks_written += n.div_ceil(BLOCK);
        }
        Ok(())
    }
}

/// Every block of the disk compared by hash. Returns the disk's block hashes after it.
async fn full_disk(
    ask: &Ask<'_>,
    d: &Disk<'_>,
    done: &mut ReverseDone,
) -> Result<Vec<u64>, String> {
    let mut table = Vec::with_capacity(d.size.div_ceil(BLOCK) as usize);
    let mut at = 0u64;
    while at < d.size {
        let len = (d.size - at).min(CHUNK_BLOCKS * BLOCK);
        let f = d.file.clone();
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, at).map(|()| buf)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("read {} at {at}: {e}", d.name))?;
        let hashes: Vec<u64> = buf.chunks(BLOCK as usize).map(xxh3_64).collect();
        done.bytes_compared += len;
        done.hash_bytes += hashes.len() as u64 * 8;
        table.extend_from_slice(&hashes);
        let runs = ask.diff(d, at, hashes, vec![]).await?;
        d.write_runs(
            runs,
            |o, n| o >= at && o + n <= at + len,
            Some(&mut table),
            done,
        )
        .await?;
        at += len;
    }
    Ok(table)
}

/// Only the blocks the recovery disk wrote since `since` compared by hash. False if the
/// master target does not know them (its export was served again since the mark): then
/// the disk is to be compared whole.
async fn tracked_disk(
    ask: &Ask<'_>,
    d: &Disk<'_>,
    since: ReverseMark,
    mut table: Option<&mut Vec<u64>>,
    done: &mut ReverseDone,
) -> Result<bool, String> {
    let blocks = d.size.div_ceil(BLOCK);
    let mut first = 0u64;
    while first < blocks {
        let n = (blocks - first).min(CHANGED_BLOCKS_MAX);
        let req = Request::ReverseChanged(ReverseChangedRequest {
            machine: ask.machine.to_string(),
            order: ask.order,
            disk: d.index,
            since,
            first_block: first,
            blocks: n,
        });
        let changed = match ask.call(req).await? {
            Response::ReverseChanged(r) => r.changed,
            other => return Err(format!("unexpected reply {other:?}")),
        };
        let Some(changed) = changed else {
            return Ok(false);
        };
        let ascending = changed.windows(2).all(|w| w[0] < w[1]);
        if !ascending || changed.iter().any(|&b| b < first || b >= first + n) {
            return Err(format!(
                "the master target listed changed blocks outside {first}+{n} of {}",
                d.name
            ));
        }
        for group in changed.chunks(CHUNK_BLOCKS as usize) {
            let group = group.to_vec();
            let (f, size, list) = (d.file.clone(), d.size, group.clone());
            let hashes = tokio::task::spawn_blocking(move || {
                let mut block = vec![0u8; BLOCK as usize];
                list.iter()
                    .map(|&b| {
                        let at = b * BLOCK;
                        let n = (size - at).min(BLOCK) as usize;
                        f.read_exact_at(&mut block[..n], at)
                            .map(|()| xxh3_64(&block[..n]))
                    })
                    .collect::<std::io::Result<Vec<u64>>>()
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("read {}: {e}", d.name))?;
            done.bytes_compared += group
                .iter()
                .map(|&b| (d.size - b * BLOCK).min(BLOCK))
                .sum::<u64>();
            done.hash_bytes += hashes.len() as u64 * 8;
            let runs = ask.diff(d, 0, hashes, group.clone()).await?;
            let asked = |o: u64, len: u64| {
                (o / BLOCK..(o + len).div_ceil(BLOCK)).all(|b| group.binary_search(&b).is_ok())
            };
            d.write_runs(runs, asked, table.as_deref_mut(), done)
                .await?;
        }
        first += n;
    }
    Ok(true)
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
    // The hashes the passes of this failover kept (this process made them all, from a whole
    // pass on, and nothing else wrote the disks): no read of the disks. Else they are read.
    let kept = lock(&a.reverse)
        .hashes
        .clone()
        .filter(|(o, _)| *o == order.order)
        .map(|(_, t)| t);
    let (tables, sizes, read) = tokio::task::spawn_blocking(move || {
        let mut tables = Vec::with_capacity(paths.len());
        let mut sizes = Vec::with_capacity(paths.len());
        let mut read = false;
        for (i, path) in paths.iter().enumerate() {
            let size =
                super::scan::disk_size(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let table = kept
                .as_ref()
                .and_then(|k| k.get(i))
                .filter(|t| t.len() as u64 == size.div_ceil(BLOCK));
            let t = match table {
                // Debug builds (every test) check the kept hashes against the disk.
                Some(t) if cfg!(debug_assertions) => {
                    let (disk, _) =
                        hash_disk(path).map_err(|e| format!("hash {}: {e}", path.display()))?;
                    if &disk != t {
                        return Err(format!(
                            "the hashes the reverse passes kept differ from {}",
                            path.display()
                        ));
                    }
                    t.clone()
                }
                Some(t) => t.clone(),
                None => {
                    read = true;
                    hash_disk(path)
                        .map_err(|e| format!("hash {}: {e}", path.display()))?
                        .0
                }
            };
            tables.push(t);
            sizes.push(size);
        }
        Ok::<_, String>((tables, sizes, read))
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
        hashes = if read {
            "read from the disks"
        } else {
            "kept by the reverse passes"
        },
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
