//! An all-in-one haven cluster in one process, through the library API: a node with the
//! configuration, process and master-target roles, and an agent protecting a generated disk;
//! then a change to the disk, a sync barrier, and a byte-for-byte check of the replica.
//!
//! ```text
//! cargo run --example all_in_one
//! ```
//! (`cargo test` runs it too, as a test.)
use std::{
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use haven_roles::{
    admin::{Admin, WaitEnd},
    agent::{self, AgentOptions},
    node::{self, NodeOptions},
    proto::AdminCommand,
};

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    system().block_on(run(dir.path()))
}

/// actix on a multi-threaded tokio runtime, as the `haven` binary runs it.
fn system() -> actix::SystemRunner {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

async fn run(dir: &Path) -> anyhow::Result<()> {
    let listen = free_udp_addr()?;
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
    // Both run until the process ends (they stop on SIGINT/SIGTERM when run on their own).
    actix::spawn(async move {
        if let Err(e) = node::run(node).await {
            eprintln!("node: {e:#}");
        }
    });
    let addr = listen.to_string();
    let admin = connect(&addr, &node_dir.join("admin-token")).await?;
    println!("node up at {addr}");

    let disk = dir.join("disk.img");
    make_disk(&disk, 32 << 20)?;
    let agent = AgentOptions {
        data_dir: dir.join("agent"),
        join: Some((addr.clone(), node_dir.join("agent-token"))),
        disks: vec![("root".into(), disk.clone())],
        machine: "example-vm".into(),
        machine_defaulted: false,
        scan_interval: Duration::from_secs(1),
        retention_bytes: 64 << 20,
        hooks: None,
        site: haven_cluster::default_site(),
    };
    actix::spawn(async move {
        if let Err(e) = agent::run(agent).await {
            eprintln!("agent: {e:#}");
        }
    });
    until("the agent enrolled", || async {
        Ok(admin.machine("example-vm").await?.is_some())
    })
    .await?;
    admin
        .call(AdminCommand::Protect {
            machine: "example-vm".into(),
            policy: Default::default(),
        })
        .await?;
    println!("example-vm protected; initial sync");
    sync(&admin).await?;

    // A change while replicating, then a barrier: the replica has everything written.
    let f = std::fs::OpenOptions::new().write(true).open(&disk)?;
    f.write_all_at(b"written by the all-in-one example", 5 << 20)?;
    f.sync_data()?;
    sync(&admin).await?;
    let replica: PathBuf = node_dir.join("replicas/example-vm/root.img");
    if std::fs::read(&disk)? != std::fs::read(&replica)? {
        bail!("the replica differs from the disk");
    }
    println!("replica {} is identical to the disk", replica.display());
    admin.close().await;
    Ok(())
}

async fn sync(admin: &Admin) -> anyhow::Result<()> {
    match admin
        .wait_sync("example-vm", Duration::from_secs(120), |_, _, _| {})
        .await?
    {
        WaitEnd::Synced => Ok(()),
        WaitEnd::TimedOut(why) => bail!("not in sync in time (degraded: {why:?})"),
        WaitEnd::Blocked(why) => bail!("cannot converge: {why}"),
    }
}

/// Connects once the node has bootstrapped and written its admin token.
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

async fn until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn free_udp_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// A disk with some data in it (and zeros elsewhere).
fn make_disk(path: &Path, size: u64) -> anyhow::Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for mib in (0..size >> 20).step_by(3) {
        f.write_all_at(&block, mib << 20)?;
    }
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_all_in_one_cluster_replicates_a_disk() {
        super::main().expect("the example runs");
    }
}
