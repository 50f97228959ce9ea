//! The agent's `control` child: long-polls the configuration node with the agent's report,
//! and acts on the reply — protection, epoch, process server, sync barriers, resyncs. While
//! the configuration node is unreachable the last control state stays in force (it is
//! persisted), so replication goes on.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use haven_actors::TaskError;

use super::state::{lock, Agent, AgentError, CONTROL_VERSION};
use crate::fsutil::unix_ms;
use crate::{
    client::CallError,
    poll::{LongPoll, LONG_POLL_MS, POLL_INTERVAL},
    proto::{AgentPollReply, MarkDone, Request, Response},
};

/// The long poll's hold while data is unapplied (see `control_loop`).
const BUSY_POLL_MS: u32 = 250;

/// `ctl mark` requests and the app-consistent period, for the capture source.
fn handle_marks(a: &Agent, reply: &AgentPollReply) {
    let now = Instant::now();
    let mut wake = false;
    let mut refused = vec![];
    {
        let mut m = lock(&a.marks);
        let every = reply
            .app_consistent_every_ms
            .filter(|_| a.takes_marks && reply.protected)
            .map(|ms| Duration::from_millis(ms.max(100)));
        if every.is_some() && a.opts.hooks.is_none() && m.until_due(now).is_none() {
            tracing::warn!(
                "the machine's policy asks for app-consistent points but this agent has no \
                 --freeze-cmd: they are crash-consistent"
            );
        }
        if m.until_due(now).map(|_| ()) != every.map(|_| ()) {
            wake = true;
        }
        m.set_app_every(every, now);
        for r in &reply.marks {
            if !a.takes_marks {
                if m.take(r.id) {
                    refused.push((
                        r.clone(),
                        format!(
                            "ctl mark needs --capture tap; this agent captures by {}",
                            a.capture_name
                        ),
                    ));
                }
                continue;
            }
            match m.offer(r.clone()) {
                Ok(true) => {
                    tracing::info!(id = r.id, app = r.app, name = ?r.name, "recovery point requested");
                    wake = true;
                }
                Ok(false) => {}
                Err(r) => refused.push((
                    r,
                    format!(
                        "{} marks already wait at the agent",
                        super::marks::QUEUE_MAX
                    ),
                )),
            }
        }
    }
    for (r, reason) in refused {
        tracing::warn!(id = r.id, "recovery point not made: {reason}");
        lock(&a.marks).finish(
            MarkDone {
                request: r.id,
                name: r.name,
                time_ms: unix_ms(),
                error: Some(reason),
                ..Default::default()
            },
            unix_ms() * 1000,
        );
        a.report_now.notify_one();
    }
    if wake {
        a.mark_now.notify_one();
    }
}

pub(super) async fn control_loop(a: Arc<Agent>) -> Result<(), TaskError> {
    let addr = a.identity.config_socket_addr().map_err(TaskError::fatal)?;
    let mut poll = LongPoll::new(a.dialer.clone(), addr, format!("agent {}", a.opts.machine));
    let mut last_rate = (Instant::now(), lock(&a.core).raw_bytes_applied);
    let mut throughput = 0u64;
    let mut refused: Option<String> = None;
    loop {
        let now = Instant::now();
        let applied_bytes = lock(&a.core).raw_bytes_applied;
        let dt = now.duration_since(last_rate.0).as_secs_f64();
        if dt >= 1.0 {
            throughput = ((applied_bytes - last_rate.1) as f64 / dt) as u64;
            last_rate = (now, applied_bytes);
        }
        // `rpo_seconds` is computed from the last report: while writes wait to be applied,
        // report about three times a second so it is never more than ~0.35 s stale; idle,
        // once a second (the long poll).
        let hold = if lock(&a.core).oldest_unapplied_ms() != 0 {
            BUSY_POLL_MS
        } else {
            LONG_POLL_MS
        };
        let report = a.report(throughput, hold);
        let marks_sent = report.marks_done.iter().map(|d| d.id).max();
        let request = Request::AgentPoll(Box::new(report));
        let result = tokio::select! {
            r = poll.call(&request) => Some(r),
            _ = a.report_now.notified() => None,
        };
        let pause = match result {
            None => Duration::ZERO, // report right away
            Some(Ok(Response::AgentPoll(reply))) => {
                if refused.take().is_some() {
                    tracing::info!("the configuration node accepts this agent again");
                    lock(&a.core).degraded_reason = None;
                }
                // The configuration node has the outcomes this report carried.
                if let Some(id) = marks_sent {
                    lock(&a.marks).reported(id);
                }
                handle_poll_reply(&a, reply)?;
                a.heard.send_replace(true);
                Duration::from_millis(100)
            }
            Some(Ok(other)) => {
                tracing::warn!("unexpected poll reply: {other:?}");
                POLL_INTERVAL
            }
            Some(Err(CallError::Refused(reason))) => {
                // Not a network problem: this agent may not speak for the machine (forgotten,
                // enrolled again elsewhere). Said once; asked again slowly.
                if refused.as_deref() != Some(reason.as_str()) {
                    tracing::error!("the configuration node refused this agent: {reason}");
                    lock(&a.core).degraded_reason =
                        Some(format!("refused by the configuration node: {reason}"));
                    refused = Some(reason);
                }
                Duration::from_secs(5)
            }
            // Unreachable (said once by the poll client): replication goes on.
            Some(Err(_)) => POLL_INTERVAL,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = a.report_now.notified() => {}
        }
    }
}

fn handle_poll_reply(a: &Arc<Agent>, reply: AgentPollReply) -> Result<(), AgentError> {
    if let Some(ms) = reply.point_every_ms {
        a.point_every_ms
            .store(ms.max(100), std::sync::atomic::Ordering::Relaxed);
    }
    // Read-only (a failover) takes effect before the marks of this reply are offered: a
    // planned failover's final point then follows every write the tap accepted.
    a.update_control(|c| {
        let read_only = read_only_of(&reply, c.rebased);
        if c.read_only != read_only {
            match &read_only {
                Some(why) => tracing::warn!("the tap takes no writes: {why}"),
                None => tracing::info!("the tap takes writes again"),
            }
        }
        c.read_only = read_only;
    })?;
    handle_marks(a, &reply);
    a.released.send_if_modified(|ids| {
        let new: Vec<u64> = reply
            .release
            .iter()
            .filter(|id| !ids.contains(id))
            .copied()
            .collect();
        ids.extend(&new);
        let over = ids.len().saturating_sub(super::state::RELEASED_MAX);
        ids.drain(..over);
        !new.is_empty()
    });
    if let Some(order) = reply.reverse.clone() {
        super::reverse::offer(a, order);
    }
    if let Some(order) = reply.rebase.clone() {
        super::reverse::offer_rebase(a, order);
    }
    if reply.protected && reply.epoch != lock(&a.core).epoch {
        tracing::info!(
            epoch = reply.epoch,
            "new protection epoch: starting a full sync"
        );
        let fresh = a.fresh_core(reply.epoch)?;
        {
            let mut core = lock(&a.core);
            core.renew(fresh);
            core.applied_dirty = true;
            // Under the core lock: see `CaptureSink::number`.
            a.reset.send_modify(|g| *g += 1);
        }
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
    if lock(&a.core).handle_sync_request(reply.sync_request) {
        a.scan_now.notify_one();
    }
    a.update_control(|c| {
        c.protected = reply.protected;
        c.epoch = reply.epoch;
        c.generation = reply.generation.0;
        c.process_server = reply.process_server.clone();
        c.version = CONTROL_VERSION;
        c.read_only = read_only_of(&reply, c.rebased);
    })
}

/// Whether the tap takes writes, as `reply` says, given the failback this agent has rebased
/// for (decided under the control lock, so a rebase finishing meanwhile is seen). A reply
/// that crossed this agent's "rebased" report still says read-only and still orders the
/// rebase: the rebase is done and the disks are the machine's own again.
fn read_only_of(reply: &AgentPollReply, rebased: Option<u64>) -> Option<String> {
    match (&reply.rebase, rebased) {
        (Some(o), Some(done)) if o.order == done => None,
        _ => reply.read_only.clone(),
    }
}
