//! One process server's ship stream into this master target: admission (who may ship what),
//! then a reader that opens batches in the blocking pool (2 in flight, in order) and hands
//! them to the machine's replica owner, while the applied seq the owner publishes flows back
//! as `Applied` acks. The decisions about batches are the owner's ([`super::core`]).
use std::time::Duration;

use haven_transport::{
    codec,
    frame::{self, MAX_DATA_FRAME},
    identity::PeerIdentity,
    seal::{self, DataKey, SealContext, MAX_SEALED_LEN},
};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot};

use super::owner::{Admitted, End, Mailbox, Msg, Opened};
use super::MasterService;
use crate::error::StreamError;
use crate::proto::{Applied, BatchBody, Response, ShipFrame, ShipOpen};

/// Batches being opened at once, ahead of the owner.
const OPEN_AHEAD: usize = 2;
/// How long a stream waits for the replica owner to start (it starts when the assignment
/// reaches this node, which may be just after the process server heard of it).
const OWNER_WAIT: Duration = Duration::from_secs(5);

/// Serves a ship stream until it ends. A refusal at open is answered with `Refused`.
pub async fn serve(
    svc: &MasterService,
    who: Option<PeerIdentity>,
    open: ShipOpen,
    mut send: SendStream,
    recv: RecvStream,
) -> Result<(), StreamError> {
    let admitted = admit(svc, who.as_ref(), &open).await;
    let (mailbox, key, admitted) = match admitted {
        Ok(x) => x,
        Err(reason) => {
            let _ = frame::send_msg(
                &mut send,
                &Response::Refused {
                    reason: reason.clone(),
                },
            )
            .await;
            let _ = send.finish();
            return Err(StreamError::Refused(reason));
        }
    };
    let Admitted {
        stream,
        mut applied,
        ended,
    } = admitted;
    let at = *applied.borrow_and_update();
    frame::send_msg(&mut send, &Response::ShipAccepted { applied_seq: at }).await?;
    tracing::info!(machine = %open.machine, applied = at, "ship stream accepted");

    let mut reader = tokio::spawn(read_and_open(
        open.clone(),
        key,
        recv,
        stream,
        mailbox.clone(),
    ));
    let result = forward_acks(&mut send, &mut applied, ended, &mut reader).await;
    reader.abort();
    let _ = mailbox.send(Msg::Closed { stream }).await;
    result
}

/// Sends the applied seq whenever it moves, until the owner ends the stream, the process
/// server finishes it (or the stream breaks).
async fn forward_acks(
    send: &mut SendStream,
    applied: &mut tokio::sync::watch::Receiver<u64>,
    mut ended: oneshot::Receiver<End>,
    reader: &mut tokio::task::JoinHandle<Result<(), StreamError>>,
) -> Result<(), StreamError> {
    loop {
        tokio::select! {
            read = &mut *reader => {
                return match read {
                    Ok(r) => r,
                    Err(e) => Err(StreamError::local("ship stream reader", e)),
                };
            }
            changed = applied.changed() => {
                if changed.is_err() {
                    return Err(StreamError::Local("the replica owner stopped".into()));
                }
                let seq = *applied.borrow_and_update();
                frame::send_msg(send, &Applied { applied_seq: seq }).await?;
            }
            why = &mut ended => {
                // Whatever was applied before the end is acknowledged first.
                let seq = *applied.borrow_and_update();
                let _ = frame::send_msg(send, &Applied { applied_seq: seq }).await;
                return Err(match why {
                    Ok(End::Refused(reason)) => {
                        send.reset(1u32.into()).ok();
                        StreamError::Refused(reason)
                    }
                    Ok(End::Failed(reason)) => {
                        let _ = send.finish();
                        StreamError::Local(reason)
                    }
                    Ok(End::Reset) => {
                        send.reset(2u32.into()).ok();
                        StreamError::Peer("stream reset (injected)".into())
                    }
                    // The owner stopped (restarting after a panic, or removed).
                    Err(_) => {
                        send.reset(3u32.into()).ok();
                        StreamError::Local("the replica owner stopped; the stream resumes from the durable cursor".into())
                    }
                });
            }
        }
    }
}

async fn admit(
    svc: &MasterService,
    who: Option<&PeerIdentity>,
    open: &ShipOpen,
) -> Result<(Mailbox, DataKey, Admitted), String> {
    match who {
        Some(id) if id.has_role(haven_cluster::ROLE_PROCESS) => {}
        Some(other) => return Err(format!("{} is not a process server", other.common_name())),
        None => return Err("ship streams need a cluster certificate".into()),
    }
    let link = svc.link();
    let a = link
        .assignment(&open.machine)
        .filter(|a| a.master_target == link.name)
        .ok_or_else(|| {
            format!(
                "machine {} is not assigned to master target {}",
                open.machine, link.name
            )
        })?;
    if a.epoch.0 != open.epoch {
        return Err(format!(
            "epoch mismatch: stream has {}, cluster has {}",
            open.epoch, a.epoch.0
        ));
    }
    let key = DataKey::from_slice(&a.data_key).map_err(|e| e.to_string())?;
    let mailbox = svc
        .state
        .mailbox(&open.machine, OWNER_WAIT)
        .await
        .ok_or_else(|| format!("the replica of {} is not open here yet", open.machine))?;
    let (reply, answer) = oneshot::channel();
    mailbox
        .send(Msg::Open {
            generation: open.generation.0,
            epoch: a.epoch.0,
            disks: a.disks.clone(),
            reply,
        })
        .await
        .map_err(|_| "the replica owner stopped".to_string())?;
    let admitted = answer
        .await
        .map_err(|_| "the replica owner stopped".to_string())??;
    Ok((mailbox, key, admitted))
}

/// Reads sealed frames and opens them in the blocking pool, keeping their order, and hands
/// them to the owner. A frame that fails authentication or decoding is handed over as a
/// refusal; a broken stream ends the reader.
async fn read_and_open(
    open: ShipOpen,
    key: DataKey,
    mut recv: RecvStream,
    stream: u64,
    mailbox: Mailbox,
) -> Result<(), StreamError> {
    let (tx, mut rx) = mpsc::channel::<tokio::task::JoinHandle<Result<Opened, String>>>(OPEN_AHEAD);
    let forward = {
        let mailbox = mailbox.clone();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let batch = job
                    .await
                    .unwrap_or_else(|e| Err(format!("open task failed: {e}")));
                let refused = batch.is_err();
                if mailbox.send(Msg::Batch { stream, batch }).await.is_err() || refused {
                    return;
                }
            }
        })
    };
    let ended = loop {
        let bytes = match frame::read_frame(&mut recv, MAX_DATA_FRAME).await {
            Ok(Some(b)) => b,
            Ok(None) => break Ok(()),
            Err(e) => break Err(StreamError::peer("ship stream", e)),
        };
        let (key, machine, epoch) = (key.clone(), open.machine.clone(), open.epoch);
        let job = tokio::task::spawn_blocking(move || open_frame(&key, &machine, epoch, &bytes));
        if tx.send(job).await.is_err() {
            // The forwarder stopped: a refused batch (the owner ends the stream) or the owner.
            std::future::pending::<()>().await;
        }
    };
    drop(tx);
    let _ = forward.await;
    ended
}

/// Decodes, authenticates, decrypts and decodes one frame; `Err` is the refusal's reason.
fn open_frame(key: &DataKey, machine: &str, epoch: u32, bytes: &[u8]) -> Result<Opened, String> {
    let ShipFrame::Sealed {
        first_seq,
        last_seq,
        sealed,
    } = codec::decode(bytes).map_err(|e| format!("malformed frame: {e}"))?;
    if sealed.ciphertext.len() > MAX_SEALED_LEN || first_seq > last_seq {
        return Err(format!(
            "batch {first_seq}..={last_seq} is malformed or oversized"
        ));
    }
    let sctx = SealContext {
        machine,
        epoch,
        first_seq,
        last_seq,
    };
    let plain =
        seal::open(key, &sctx, &sealed).map_err(|e| format!("{first_seq}..={last_seq}: {e}"))?;
    let body: BatchBody = codec::decode(&plain)
        .map_err(|e| format!("{first_seq}..={last_seq}: undecodable body: {e}"))?;
    Ok(Opened {
        first_seq,
        last_seq,
        body,
        raw_len: plain.len() as u64,
    })
}
