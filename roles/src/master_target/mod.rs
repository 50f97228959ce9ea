//! The master target: verifies, opens and applies batches in seq order to replica images,
//! then acknowledges `applied_seq` once the images and the cursor are fsynced.
//!
//! ```text
//! process server ── Sealed{first,last} ──▶ reader ─▶ open (blocking pool, 2 in flight)
//!                                                     └▶ apply in order ─▶ (queue drained) fsync + cursor
//!                ◀── Applied{seq} ─────────────────────────────────────────┘
//! ```
//! A batch that fails authentication, decoding or validation is refused whole: nothing from
//! it reaches the disks, the stream is closed with the reason, and the refusal is counted.
pub mod replica;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use dashmap::DashMap;
use haven_transport::{
    codec,
    frame::{self, MAX_DATA_FRAME},
    identity::PeerIdentity,
    seal::{self, DataKey, SealContext, MAX_SEALED_LEN},
};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

use self::replica::Replica;
use crate::faults::{self, Fault, Side};
use crate::node::NodeContext;
use crate::proto::{Applied, BatchBody, NodeMachineReport, Response, ShipFrame, ShipOpen};

const OPEN_QUEUE: usize = 3;

pub struct MasterState {
    pub dir: PathBuf,
    pub machines: DashMap<String, Arc<MtMachine>>,
}

#[derive(Default)]
pub struct MtMachine {
    pub replica: Mutex<Option<Replica>>,
    pub applied: AtomicU64,
    pub refused: AtomicU64,
    pub bytes_applied: AtomicU64,
    /// Epoch of the open replica.
    pub epoch: AtomicU64,
    /// Why a batch was refused, and the applied seq then: reported until a later batch is
    /// applied (the stream converges again).
    pub refusal: Mutex<Option<(String, u64)>>,
}

impl MtMachine {
    /// The replica slot. A panic while it was held may have left the in-memory replica half
    /// way through a batch: it is dropped, so the next stream reopens it from disk, which
    /// rolls the images back to the durable cursor.
    fn replica(&self) -> MutexGuard<'_, Option<Replica>> {
        self.replica.lock().unwrap_or_else(|poisoned| {
            let mut slot = poisoned.into_inner();
            tracing::warn!("a failed apply left a replica unusable in memory; reopening it from its durable cursor");
            *slot = None;
            self.replica.clear_poison();
            slot
        })
    }
}

impl MasterState {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("replicas"),
            machines: DashMap::new(),
        }
    }

    /// Rolls every replica back to its durable cursor (a crash may have left a batch half
    /// applied). Runs at startup, before any stream is accepted.
    pub fn recover(&self) -> Result<(), String> {
        replica::recover_all(&self.dir).map_err(|e| e.to_string())
    }

    pub fn reports(&self) -> Vec<NodeMachineReport> {
        self.machines
            .iter()
            .map(|e| NodeMachineReport {
                machine: e.key().clone(),
                role: haven_cluster::ROLE_MASTER_TARGET.into(),
                applied_seq: e.applied.load(Ordering::Relaxed),
                raw_bytes: e.bytes_applied.load(Ordering::Relaxed),
                batches_refused: e.refused.load(Ordering::Relaxed),
                epoch: e.epoch.load(Ordering::Relaxed) as u32,
                refusal: e
                    .refusal
                    .lock()
                    .ok()
                    .and_then(|r| r.as_ref().map(|(why, _)| why.clone())),
                ..Default::default()
            })
            .collect()
    }

    /// A forgotten machine (`ctl forget`): its replica is moved aside to
    /// `replicas/<machine>@<epoch>` (a name no machine can have), or deleted. A replica of a
    /// later epoch belongs to a machine enrolled since and is left alone.
    pub fn retire(
        &self,
        machine: &str,
        epoch: haven_cluster::Epoch,
        delete: bool,
    ) -> Result<(), String> {
        self.machines.remove(machine);
        let dir = self.dir.join(machine);
        if !dir.exists() {
            return Ok(());
        }
        let state = replica::stored_epoch(&dir).map_err(|e| e.to_string())?;
        if state.is_some_and(|e| e > epoch.0) {
            return Ok(());
        }
        if delete {
            std::fs::remove_dir_all(&dir).map_err(|e| format!("delete {}: {e}", dir.display()))?;
            tracing::info!(%machine, "forgotten machine: replica deleted");
            return Ok(());
        }
        let mut aside = self.dir.join(format!("{machine}@{}", epoch.0));
        if aside.exists() {
            aside = self.dir.join(format!(
                "{machine}@{}-{}",
                epoch.0,
                crate::fsutil::unix_ms()
            ));
        }
        std::fs::rename(&dir, &aside)
            .map_err(|e| format!("move {} to {}: {e}", dir.display(), aside.display()))?;
        tracing::info!(%machine, kept = %aside.display(), "forgotten machine: replica moved aside");
        Ok(())
    }
}

pub async fn apply_stream(
    ctx: Arc<NodeContext>,
    who: Option<PeerIdentity>,
    open: ShipOpen,
    mut send: SendStream,
    recv: RecvStream,
) -> Result<(), String> {
    let admitted = admit(&ctx, who.as_ref(), &open).await;
    let (m, key) = match admitted {
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
            return Err(reason);
        }
    };
    let generation = open.generation.0;
    let applied = m.applied.load(Ordering::SeqCst);
    frame::send_msg(
        &mut send,
        &Response::ShipAccepted {
            applied_seq: applied,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(machine = %open.machine, applied, "ship stream accepted");

    let (tx, rx) = mpsc::channel(OPEN_QUEUE);
    let reader = tokio::spawn(read_and_open(open.clone(), key, recv, tx));
    let result = apply_in_order(&m, &open.machine, generation, &mut send, rx).await;
    reader.abort();
    if let Err(e) = &result {
        if e.starts_with("refused") {
            m.refused.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut r) = m.refusal.lock() {
                *r = Some((e.clone(), m.applied.load(Ordering::SeqCst)));
            }
            tracing::error!(machine = %open.machine, "batch {e}; nothing from it was applied");
            send.reset(1u32.into()).ok();
        }
    }
    result
}

async fn admit(
    ctx: &NodeContext,
    who: Option<&PeerIdentity>,
    open: &ShipOpen,
) -> Result<(Arc<MtMachine>, DataKey), String> {
    let mt = ctx
        .master
        .as_ref()
        .ok_or("this node is not a master target")?;
    match who {
        Some(id) if id.has_role(haven_cluster::ROLE_PROCESS) => {}
        Some(other) => return Err(format!("{} is not a process server", other.common_name())),
        None => return Err("ship streams need a cluster certificate".into()),
    }
    let a = ctx
        .assignment(&open.machine)
        .filter(|a| a.master_target == ctx.name)
        .ok_or_else(|| {
            format!(
                "machine {} is not assigned to master target {}",
                open.machine, ctx.name
            )
        })?;
    if a.epoch.0 != open.epoch {
        return Err(format!(
            "epoch mismatch: stream has {}, cluster has {}",
            open.epoch, a.epoch.0
        ));
    }
    let key = DataKey::from_slice(&a.data_key).map_err(|e| e.to_string())?;
    let m = mt.machines.entry(open.machine.clone()).or_default().clone();
    let (dir, machine, epoch, disks) = (
        mt.dir.clone(),
        open.machine.clone(),
        a.epoch.0,
        a.disks.clone(),
    );
    let generation = open.generation.0;
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || {
        let mut slot = m2.replica();
        let fresh = slot
            .as_ref()
            .is_none_or(|r| r.epoch() != epoch || r.is_broken());
        if fresh {
            *slot = None;
            let r = Replica::open(&dir, &machine, epoch, &disks).map_err(|e| e.to_string())?;
            m2.applied.store(r.applied_seq(), Ordering::SeqCst);
            m2.epoch.store(r.epoch() as u64, Ordering::SeqCst);
            *slot = Some(r);
        }
        // A process server of an older generation than one that delivered is fenced.
        slot.as_ref()
            .expect("opened above")
            .check_generation(generation)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok((m, key))
}

struct Opened {
    first_seq: u64,
    last_seq: u64,
    body: BatchBody,
    raw_len: u64,
}

/// Reads sealed frames and opens them in the blocking pool, keeping their order.
async fn read_and_open(
    open: ShipOpen,
    key: DataKey,
    mut recv: RecvStream,
    tx: mpsc::Sender<tokio::task::JoinHandle<Result<Opened, String>>>,
) -> Result<(), String> {
    loop {
        let frame = frame::read_frame(&mut recv, MAX_DATA_FRAME).await;
        let bytes = match frame {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(()),
            Err(e) => {
                let msg = format!("stream: {e}");
                let _ = tx.send(tokio::spawn(async move { Err(msg) })).await;
                return Err(e.to_string());
            }
        };
        let (key, machine, epoch) = (key.clone(), open.machine.clone(), open.epoch);
        let job = tokio::task::spawn_blocking(move || {
            let ShipFrame::Sealed {
                first_seq,
                last_seq,
                sealed,
            } = codec::decode(&bytes).map_err(|e| format!("refused: malformed frame: {e}"))?;
            if sealed.ciphertext.len() > MAX_SEALED_LEN || first_seq > last_seq {
                return Err(format!(
                    "refused: batch {first_seq}..={last_seq} is malformed or oversized"
                ));
            }
            let sctx = SealContext {
                machine: &machine,
                epoch,
                first_seq,
                last_seq,
            };
            let plain = seal::open(&key, &sctx, &sealed)
                .map_err(|e| format!("refused: {first_seq}..={last_seq}: {e}"))?;
            let body: BatchBody = codec::decode(&plain)
                .map_err(|e| format!("refused: {first_seq}..={last_seq}: undecodable body: {e}"))?;
            Ok(Opened {
                first_seq,
                last_seq,
                body,
                raw_len: plain.len() as u64,
            })
        });
        if tx.send(job).await.is_err() {
            return Ok(());
        }
    }
}

async fn apply_in_order(
    m: &Arc<MtMachine>,
    machine: &str,
    generation: u64,
    send: &mut SendStream,
    mut rx: mpsc::Receiver<tokio::task::JoinHandle<Result<Opened, String>>>,
) -> Result<(), String> {
    // Debug fault injection fires once per stream, on its first batch of two or more writes.
    let mut fired = false;
    let opened = |r: Result<Result<Opened, String>, tokio::task::JoinError>| {
        r.map_err(|e| e.to_string()).and_then(|r| r)
    };
    while let Some(job) = rx.recv().await {
        // Everything already opened joins this commit (group fsync). A refused batch ends the
        // stream, but only after the valid ones before it are applied and acknowledged.
        let (mut batch, mut refused) = (vec![], None);
        match opened(job.await) {
            Ok(o) => batch.push(o),
            Err(e) => return Err(e),
        }
        while batch.len() < 16 {
            let Ok(job) = rx.try_recv() else { break };
            match opened(job.await) {
                Ok(o) => batch.push(o),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let mut fault = None;
        if !fired && batch.iter().any(|o| o.body.records.len() >= 2) {
            fault = faults::next(machine, Side::Apply);
            fired = fault.is_some();
        }
        if fault == Some(Fault::ApplyReset) {
            faults::fire(machine, Fault::ApplyReset);
            send.reset(2u32.into()).ok();
            return Err("stream reset (injected)".into());
        }
        let (m2, machine) = (m.clone(), machine.to_string());
        let applied = tokio::task::spawn_blocking(move || {
            let mut slot = m2.replica();
            let r = slot.as_mut().ok_or("replica closed")?;
            let mut failed = None;
            for o in &batch {
                if let Some(f) = fault.filter(|_| o.body.records.len() >= 2) {
                    faults::fire(&machine, f);
                    r.write_half_for_fault(o.first_seq, o.last_seq, &o.body)
                        .map_err(|e| e.to_string())?;
                    if f == Fault::ApplyAbort {
                        std::process::abort();
                    }
                    panic!(
                        "{}: apply-panic half-way through a batch of {machine}",
                        faults::ENV
                    );
                }
                match r.apply(generation, o.first_seq, o.last_seq, &o.body) {
                    Ok(replica::Applied::Applied) => {
                        m2.bytes_applied.fetch_add(o.raw_len, Ordering::Relaxed);
                    }
                    Ok(replica::Applied::Duplicate) => {}
                    Err(e @ replica::ApplyError::Invalid(_)) => {
                        failed = Some(format!("refused: {e}"))
                    }
                    Err(e) => failed = Some(e.to_string()),
                }
                if failed.is_some() {
                    break;
                }
            }
            // Make what was applied before a failure durable, so the cursor stays truthful.
            let committed = r.commit().map_err(|e| e.to_string())?;
            m2.applied.fetch_max(committed, Ordering::SeqCst);
            Ok::<_, String>((committed, failed))
        })
        .await
        .map_err(|e| e.to_string())??;
        let (applied, failed) = applied;
        m.applied.fetch_max(applied, Ordering::SeqCst);
        if let Ok(mut r) = m.refusal.lock() {
            // Progress past a refusal: the stream converges again.
            if r.as_ref().is_some_and(|(_, at)| applied > *at) {
                *r = None;
            }
        }
        frame::send_msg(
            send,
            &Applied {
                applied_seq: applied,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        if let Some(e) = failed.or(refused) {
            return Err(e);
        }
    }
    Ok(())
}
