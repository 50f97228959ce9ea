//! The agent's `stream` child: sends retained batches to the assigned process server and
//! folds its acks into the core. The decisions are the core's: where to resume after a
//! reconnect, how a move is measured, and whether a stream's end is a reconnect at once
//! (a move), after a backoff (the process server or the network; handled here, without the
//! supervisor) or a local failure (the supervisor's business).
use std::{sync::Arc, time::Instant};

use haven_actors::TaskError;
use haven_transport::frame::{self, MAX_CONTROL_FRAME};
use quinn::Connection;

use super::core::{AckOutcome, Next, StreamEnd};
use super::state::{lock, Agent};
use crate::{
    error::StreamError,
    proto::{Ack, Request, Response, StreamOpen},
};

pub(super) async fn stream_loop(a: Arc<Agent>) -> Result<(), TaskError> {
    loop {
        let end = match stream_once(&a).await {
            Ok(()) => return Ok(()),
            Err(Ended::Moved) => StreamEnd::Moved,
            Err(Ended::Stream(e)) if e.is_local() => StreamEnd::Local(e.to_string()),
            Err(Ended::Stream(e)) => StreamEnd::Peer(e.to_string()),
        };
        let next = lock(&a.core).handle_stream_end(Instant::now(), end.clone(), rand::random());
        match next {
            Next::ReconnectNow => {}
            Next::ReconnectAfter(delay) => {
                a.stream_restarts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let StreamEnd::Peer(e) = &end {
                    tracing::warn!(
                        delay_ms = delay.as_millis() as u64,
                        "stream to the process server ended: {e}; reconnecting"
                    );
                }
                // A new assignment (a move) ends the wait at once.
                let mut control = a.control.subscribe();
                control.borrow_and_update();
                let _ = tokio::time::timeout(delay, control.changed()).await;
            }
            Next::Fail => {
                let StreamEnd::Local(e) = end else {
                    unreachable!("only local failures fail")
                };
                return Err(TaskError::Retry(e));
            }
        }
    }
}

/// How one stream ended.
enum Ended {
    /// The assignment changed process server: reconnect at once.
    Moved,
    Stream(StreamError),
}

impl<E: Into<StreamError>> From<E> for Ended {
    fn from(e: E) -> Self {
        Ended::Stream(e.into())
    }
}

async fn stream_once(a: &Arc<Agent>) -> Result<(), Ended> {
    let mut control = a.control.subscribe();
    let ctl = loop {
        let c = control.borrow_and_update().clone();
        if c.protected && c.process_server.is_some() {
            break c;
        }
        lock(&a.core).degraded_reason = None;
        control
            .changed()
            .await
            .map_err(|_| StreamError::Local("the agent's control state is gone".into()))?;
    };
    let (ps_name, ps_addr) = ctl.process_server.clone().expect("checked");
    let conn = a
        .dialer
        .connect(&ps_addr, &format!("agent {}", a.opts.machine))
        .await
        .map_err(|e| {
            StreamError::Peer(format!(
                "process server {ps_name} at {ps_addr} unreachable: {e}"
            ))
        })?;
    // The process server may ask whether this process is still there (a second agent
    // claims the machine).
    let prober = tokio::spawn(answer_probes(conn.clone(), a.instance));
    let span = tracing::info_span!("stream", role = "agent", machine = %a.opts.machine, generation = ctl.generation);
    let result = tracing::Instrument::instrument(stream_on(a, &conn, &ctl, &ps_name), span).await;
    prober.abort();
    conn.close(0u32.into(), b"stream restart");
    result
}

async fn stream_on(
    a: &Arc<Agent>,
    conn: &Connection,
    ctl: &super::state::Control,
    ps_name: &str,
) -> Result<(), Ended> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| StreamError::peer("open a stream", e))?;
    let epoch = lock(&a.core).epoch;
    let open = StreamOpen {
        machine: a.opts.machine.clone(),
        epoch,
        generation: haven_cluster::Generation(ctl.generation),
        disks: a.disk_infos(),
        instance: a.instance,
    };
    frame::send_msg(&mut send, &Request::OpenStream(open)).await?;
    let (cached, applied) =
        match frame::expect_msg::<Response>(&mut recv, MAX_CONTROL_FRAME).await? {
            Response::StreamAccepted {
                cached_seq,
                applied_seq,
            } => (cached_seq, applied_seq),
            Response::Refused { reason } => {
                return Err(StreamError::Refused(format!(
                    "process server {ps_name} refused the stream: {reason}"
                ))
                .into())
            }
            other => return Err(StreamError::Peer(format!("unexpected reply: {other:?}")).into()),
        };
    let (mut after, outcome) =
        lock(&a.core).handle_stream_opened(Instant::now(), cached, applied, ctl.generation);
    a.floor_known.notify_waiters();
    a.room.notify_one();
    act_on(a, &outcome, ps_name);
    tracing::info!(ps = %ps_name, cached, applied, "streaming to process server");
    let mut acks = {
        let a = a.clone();
        let ps_name = ps_name.to_string();
        tokio::spawn(async move {
            loop {
                let ack: Ack = frame::expect_msg(&mut recv, MAX_CONTROL_FRAME)
                    .await
                    .map_err(|e| StreamError::peer("ack stream", e))?;
                let outcome = lock(&a.core).handle_stream_ack(
                    Instant::now(),
                    ack.cached_seq,
                    ack.applied_seq,
                );
                a.room.notify_one();
                act_on(&a, &outcome, &ps_name);
            }
            #[allow(unreachable_code)]
            Ok::<(), StreamError>(())
        })
    };
    let mut control = a.control.subscribe();
    control.borrow_and_update();
    let mut reset = a.reset.subscribe();
    reset.borrow_and_update();
    let result = async {
        loop {
            let batches = lock(&a.core).batches_after(after, 8);
            if batches.is_empty() {
                tokio::select! {
                    _ = a.new_batch.notified() => {}
                    r = &mut acks => return Err(match r {
                        Ok(Err(e)) => e.into(),
                        _ => StreamError::Peer("ack reader ended".into()).into(),
                    }),
                    r = control.changed() => {
                        r.map_err(|_| StreamError::Local("the agent's control state is gone".into()))?;
                        let now = control.borrow().clone();
                        if now.process_server != ctl.process_server && now.protected {
                            return Err(Ended::Moved);
                        }
                        if now != *ctl {
                            return Err(StreamError::Superseded("assignment changed; reconnecting".into()).into());
                        }
                    }
                    _ = reset.changed() => {
                        return Err(StreamError::Superseded("protection reset; reconnecting".into()).into())
                    }
                }
                continue;
            }
            for b in batches {
                frame::write_frame(&mut send, &b.body).await?;
                lock(&a.core).raw_bytes_sent += b.raw_bytes;
                after = b.last_seq;
            }
        }
    }
    .await;
    acks.abort();
    result
}

/// What an ack changed that others must hear of.
fn act_on(a: &Agent, outcome: &AckOutcome, ps_name: &str) {
    if let Some(stats) = &outcome.moved {
        tracing::info!(
            generation = stats.generation,
            pause_ms = stats.pause_ms,
            bytes_resent = stats.bytes_resent,
            "moved to process server {ps_name}"
        );
        a.report_now.notify_one();
    }
    // A pending sync barrier just got applied: tell the configuration node now.
    if outcome.barrier_applied {
        a.report_now.notify_one();
    }
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
