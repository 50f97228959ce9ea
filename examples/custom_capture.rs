//! A custom capture source: instead of finding changes later by scanning, the workload's
//! writes go through the source, which makes each durable and emits it into the agent's
//! replication stream in the order they complete (the way the NBD tap captures). Runs an
//! all-in-one node and an agent with this source in one process, and checks the replica.
//!
//! ```text
//! cargo run --example custom_capture
//! ```
//! (`cargo test` runs it too, as a test.)
use std::{
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::bail;
use futures::future::BoxFuture;
use haven_actors::TaskError;
use haven_roles::{
    admin::{Admin, WaitEnd},
    agent::{
        self,
        capture::{CaptureSink, CaptureSource, EmitError, Write},
        AgentOptions,
    },
    node::{self, NodeOptions},
    proto::AdminCommand,
};

/// A log-structured workload: it appends records to the disk, each written and synced, then
/// handed to the replication stream.
struct AppendLog {
    disk: PathBuf,
    records: u64,
}

const RECORD: usize = 4096;

impl CaptureSource for AppendLog {
    fn name(&self) -> &'static str {
        "append-log"
    }

    fn run(self: Arc<Self>, sink: CaptureSink) -> BoxFuture<'static, Result<(), TaskError>> {
        Box::pin(async move {
            let generation = sink.ready().await;
            // The disk starts empty, so there is nothing to copy first.
            sink.caught_up();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.disk)
                .map_err(TaskError::fatal)?;
            for n in 0..self.records {
                let offset = n * RECORD as u64;
                let data = record(n);
                f.write_all_at(&data, offset).map_err(TaskError::retry)?;
                f.sync_data().map_err(TaskError::retry)?;
                let write = Write {
                    disk: 0,
                    offset,
                    data,
                    updates: vec![],
                };
                match sink.emit(vec![write], generation).await {
                    Ok(()) => {}
                    Err(EmitError::Reset) => return Err(TaskError::retry("protection reset")),
                    Err(e) => return Err(TaskError::retry(e)),
                }
            }
            // Every write is in the stream as soon as it completes: a barrier is captured at
            // once.
            loop {
                if let Some(id) = sink.barrier() {
                    sink.barrier_captured(id);
                }
                sink.wait(Duration::from_millis(100)).await;
            }
        })
    }
}

fn record(n: u64) -> Vec<u8> {
    let mut r = format!("record {n:08}\n").into_bytes();
    r.resize(RECORD, b'.');
    r
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
    .block_on(run(dir.path()))
}

async fn run(dir: &Path) -> anyhow::Result<()> {
    let listen = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let node_dir = dir.join("node");
    let node = NodeOptions {
        data_dir: node_dir.clone(),
        roles: haven_cluster::ALL_ROLES
            .iter()
            .map(|r| r.to_string())
            .collect(),
        listen,
        advertise: None,
        name: "example-node".into(),
        join: None,
        capacity: 10,
        cache_limit_bytes: 256 << 20,
        failure_timeout: Duration::from_secs(5),
        reverse_every: Duration::from_secs(10),
        rebalance: Default::default(),
        site: haven_cluster::default_site(),
    };
    actix::spawn(async move {
        if let Err(e) = node::run(node).await {
            eprintln!("node: {e:#}");
        }
    });
    let addr = listen.to_string();
    let admin = connect(&addr, &node_dir.join("admin-token")).await?;

    let disk = dir.join("log.img");
    std::fs::File::create(&disk)?.set_len(8 << 20)?;
    let source = Arc::new(AppendLog {
        disk: disk.clone(),
        records: 1000,
    });
    let opts = AgentOptions {
        data_dir: dir.join("agent"),
        join: Some((addr.clone(), node_dir.join("agent-token"))),
        disks: vec![("log".into(), disk.clone())],
        machine: "log-vm".into(),
        machine_defaulted: false,
        scan_interval: Duration::from_secs(1),
        retention_bytes: 64 << 20,
        hooks: None,
        site: haven_cluster::default_site(),
    };
    actix::spawn(async move {
        if let Err(e) = agent::run_with(opts, source).await {
            eprintln!("agent: {e:#}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin.machine("log-vm").await?.is_none() {
        if Instant::now() > deadline {
            bail!("the agent did not enrol");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admin
        .call(AdminCommand::Protect {
            machine: "log-vm".into(),
            policy: Default::default(),
        })
        .await?;
    match admin
        .wait_sync("log-vm", Duration::from_secs(120), |_, _, _| {})
        .await?
    {
        WaitEnd::Synced => {}
        other => bail!("not in sync: {}", matches!(other, WaitEnd::Blocked(_))),
    }
    // The source may still be appending when the barrier comes: wait for the last record.
    let replica = node_dir.join("replicas/log-vm/log.img");
    let last = 999 * RECORD as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut buf = vec![0; RECORD];
        std::fs::File::open(&replica)?.read_exact_at(&mut buf, last)?;
        if buf == record(999) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the last record never reached the replica");
        }
        admin
            .wait_sync("log-vm", Duration::from_secs(60), |_, _, _| {})
            .await?;
    }
    if std::fs::read(&disk)? != std::fs::read(&replica)? {
        bail!("the replica differs from the disk");
    }
    let m = admin.machine("log-vm").await?.expect("listed");
    println!(
        "1000 records captured by {:?}, {} seqs applied; the replica is identical",
        "append-log", m.applied_seq
    );
    admin.close().await;
    Ok(())
}

async fn connect(addr: &str, token: &Path) -> anyhow::Result<Admin> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if token.exists() {
            match Admin::connect(addr, token).await {
                Ok(a) => return Ok(a),
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => {}
            }
        } else if Instant::now() > deadline {
            bail!("the node did not write {} in 30 s", token.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_custom_capture_source_replicates_its_writes_in_order() {
        super::main().expect("the example runs");
    }
}
