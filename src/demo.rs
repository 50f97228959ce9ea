//! `haven demo`: an all-in-one node and an agent whose disk is served through the tap (an NBD
//! export; every flush is a recovery point), in a temporary directory: initial sync with
//! progress, random writes through NBD while replicating, a sync barrier, a byte-for-byte
//! check of replica against source, the recovery points, a test failover of a point from a
//! few seconds back verified against the disk as it was then, its cleanup, a planned failover
//! and its cancel, a committed failover with a write at the recovery site, reprotect, and a
//! failback verified byte for byte (original disk, recovery disk, replica) with forward
//! protection resumed without a full resync; then the status table and the commands to do the
//! same by hand.
use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, Rng, SeedableRng};

use haven_roles::proto::{AdminCommand, AdminReply, PointSpec, RecoveryReply, RecoveryRequest};

use crate::ctl::{self, Admin};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Size of the generated disk.
    #[arg(long, default_value = "256MiB", value_parser = crate::parse_size)]
    disk_size: u64,
    /// How long to write random changes while replicating.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    write_for: Duration,
    /// Keep everything in this directory instead of a temporary one (kept afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seed for the generated content and writes.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            // SIGTERM first so the agent checkpoints; then make sure.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
        for (_, c) in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(exe: &Path, args: &[&str], log: &Path) -> Result<Child, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start {}: {e}", exe.display()))
}

fn free_udp_port() -> Result<u16, String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(s.local_addr().map_err(|e| e.to_string())?.port())
}

/// A disk with realistic mixed content: text, structured binary, incompressible data and
/// zero regions, in 1 MiB extents.
pub fn generate_disk(path: &Path, size: u64, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    f.set_len(size).map_err(|e| e.to_string())?;
    const WORDS: &[&str] = &[
        "the",
        "replica",
        "disk",
        "block",
        "kernel",
        "config",
        "error",
        "user",
        "data",
        "time",
        "process",
        "server",
        "recovery",
        "point",
        "write",
        "/usr/lib",
        "0x7f3a",
        "GET /index.html",
        "INFO",
        "WARN",
    ];
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        let chunk = &mut buf[..n];
        match rng.gen_range(0..10) {
            0..=2 => {
                let mut i = 0;
                while i < n {
                    let w = WORDS[rng.gen_range(0..WORDS.len())].as_bytes();
                    let take = w.len().min(n - i);
                    chunk[i..i + take].copy_from_slice(&w[..take]);
                    i += take;
                    if i < n {
                        chunk[i] = if rng.gen_ratio(1, 12) { b'\n' } else { b' ' };
                        i += 1;
                    }
                }
            }
            3..=5 => {
                for rec in chunk.chunks_mut(64) {
                    let id: u32 = rng.gen_range(0..5000);
                    for (j, b) in rec.iter_mut().enumerate() {
                        *b = match j {
                            0..=3 => id.to_le_bytes()[j],
                            4..=7 => rng.gen_range(0..4),
                            _ => (j as u8).wrapping_mul(3),
                        };
                    }
                }
            }
            6..=7 => rng.fill(chunk),
            _ => {
                off += n as u64;
                continue; // a hole: stays zero
            }
        }
        std::os::unix::fs::FileExt::write_all_at(&f, chunk, off).map_err(|e| e.to_string())?;
        off += n as u64;
    }
    f.sync_all().map_err(|e| e.to_string())
}

/// Random writes of mixed sizes (4 KiB to 256 KiB) through NBD for `duration`, a flush
/// after every few (each flush is a crash-consistent recovery point at the tap), ending with
/// a flush. Returns bytes written.
pub fn random_writes(
    nbd: &mut haven_nbd::Client,
    duration: Duration,
    rng: &mut StdRng,
) -> Result<u64, String> {
    let size = nbd.size();
    let start = Instant::now();
    let mut written = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    while start.elapsed() < duration {
        let len = 4096usize << rng.gen_range(0..7);
        let off = rng.gen_range(0..(size - len as u64) / 512) * 512;
        rng.fill(&mut buf[..len]);
        nbd.write_at(&buf[..len], off, false)
            .map_err(|e| format!("write through the tap: {e}"))?;
        written += len as u64;
        n += 1;
        if n % 8 == 0 {
            nbd.flush()
                .map_err(|e| format!("flush through the tap: {e}"))?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    nbd.flush()
        .map_err(|e| format!("flush through the tap: {e}"))?;
    Ok(written)
}

/// Byte-compares two files; returns the first differing offset.
pub fn first_difference(a: &Path, b: &Path) -> Result<Option<u64>, String> {
    let mut fa = std::fs::File::open(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let mut fb = std::fs::File::open(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            let i = ba[..na.min(nb)]
                .iter()
                .zip(&bb[..na.min(nb)])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            return Ok(Some(off + i as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        off += na as u64;
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize, String> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).map_err(|e| e.to_string())? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

pub async fn run(args: DemoArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let _tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            d.clone()
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("haven-demo-")
                .tempdir()
                .map_err(|e| e.to_string())?;
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };
    let (node_dir, agent_dir, disk) = (dir.join("node"), dir.join("agent"), dir.join("disk.img"));
    println!("haven demo in {}", dir.display());
    let t = Instant::now();
    generate_disk(&disk, args.disk_size, args.seed)?;
    println!(
        "1. generated a {} disk with mixed content and zero regions ({:.1}s)",
        ctl::human_bytes(args.disk_size),
        t.elapsed().as_secs_f64()
    );

    let port = free_udp_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut procs = Procs(vec![]);
    let node_log = dir.join("node.log");
    let node_args = [
        "node",
        "--data-dir",
        node_dir.to_str().unwrap_or_default(),
        "--listen",
        &addr,
        "--name",
        "demo-node",
    ];
    procs
        .0
        .push(("node".into(), spawn(&exe, &node_args, &node_log)?));
    let admin_token = node_dir.join("admin-token");
    let agent_token = node_dir.join("agent-token");
    let admin = connect_with_retry(&addr, &admin_token, &mut procs).await?;
    println!("2. started an all-in-one node (configuration + process + master-target) on {addr}; log: {}", node_log.display());

    let agent_log = dir.join("agent.log");
    let disk_arg = format!("root={}", disk.display());
    let agent_args = [
        "agent",
        "--join",
        &addr,
        "--token-file",
        agent_token.to_str().unwrap_or_default(),
        "--data-dir",
        agent_dir.to_str().unwrap_or_default(),
        "--disk",
        &disk_arg,
        "--name",
        "demo-vm",
        "--capture",
        "tap",
    ];
    procs
        .0
        .push(("agent".into(), spawn(&exe, &agent_args, &agent_log)?));
    wait_for(
        &admin,
        "agent enrollment",
        Duration::from_secs(30),
        &mut procs,
        |m| m.is_some(),
    )
    .await?;
    println!(
        "3. agent enrolled machine demo-vm; log: {}",
        agent_log.display()
    );

    match admin
        .call(haven_roles::proto::AdminCommand::Protect {
            machine: "demo-vm".into(),
            policy: Default::default(),
        })
        .await
    {
        Ok(r) => println!("4. protect: {}", done_message(&r)),
        Err(e) => return Err(format!("protect failed: {e}")),
    }
    let t = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(1);
    loop {
        check_alive(&mut procs)?;
        let m = admin.machine("demo-vm").await?.ok_or("machine vanished")?;
        if last_print.elapsed() >= Duration::from_millis(500) {
            let pct = m.initial_sync_percent.unwrap_or(100.0);
            println!(
                "   initial sync {:5.1}%  applied seq {:>6}  {} sent",
                pct,
                m.applied_seq,
                ctl::human_bytes(m.raw_bytes_sent)
            );
            last_print = Instant::now();
        }
        if m.state == "replicating" && m.applied_seq > 0 {
            let secs = t.elapsed().as_secs_f64();
            println!(
                "   initial sync done in {secs:.1}s: {} raw, {} on the wire after zstd",
                ctl::human_bytes(m.raw_bytes_sent),
                ctl::human_bytes(m.wire_bytes_sent)
            );
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err("initial sync did not finish in 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The workload writes through the tap: the agent's NBD export of the disk. Half the
    // writes, then the disk as it is at that moment is kept aside (the writer has flushed, so
    // the newest recovery point at or before now is exactly this state), then the rest.
    let sock = agent_dir.join("nbd").join("root.sock");
    let uri = format!("nbd+unix:///root?socket={}", sock.display());
    let (half, seed) = (args.write_for / 2, args.seed);
    let at_point = dir.join("disk-at-point.img");
    let (uri2, disk2, at_point2) = (uri.clone(), disk.clone(), at_point.clone());
    let (written, point_ms) = tokio::task::spawn_blocking(move || {
        let mut nbd = haven_nbd::Client::connect(&uri2).map_err(|e| e.to_string())?;
        let mut rng = StdRng::seed_from_u64(seed + 1);
        let mut written = random_writes(&mut nbd, half, &mut rng)?;
        std::fs::copy(&disk2, &at_point2).map_err(|e| e.to_string())?;
        let point_ms = unix_ms();
        std::thread::sleep(Duration::from_millis(1100));
        written += random_writes(&mut nbd, half, &mut rng)?;
        nbd.disconnect().map_err(|e| e.to_string())?;
        Ok::<_, String>((written, point_ms))
    })
    .await
    .map_err(|e| e.to_string())??;
    println!(
        "5. wrote {} of random changes (4 KiB-256 KiB) for {}s through the tap ({uri}), a flush every 8 writes: each flush is a crash-consistent recovery point",
        ctl::human_bytes(written),
        args.write_for.as_secs()
    );
    let t = Instant::now();
    wait_sync(&admin, 300, "").await?;
    println!(
        "6. wait-sync: everything written is applied at the master target ({:.2}s)",
        t.elapsed().as_secs_f64()
    );
    let replica = node_dir.join("replicas").join("demo-vm").join("root.img");
    match first_difference(&disk, &replica)? {
        None => println!(
            "7. verified: replica {} is byte-identical to the source",
            replica.display()
        ),
        Some(off) => return Err(format!("replica differs from the source at byte {off}")),
    }

    let points = match recovery(
        &admin,
        RecoveryRequest::Points {
            machine: "demo-vm".into(),
        },
    )
    .await?
    {
        RecoveryReply::Points(p) => p,
        other => return Err(format!("recovery-points: unexpected reply {other:?}")),
    };
    println!("8. recovery points of demo-vm (the newest of them):");
    ctl::print_points(&points, Some(4));

    let drill = match recovery(
        &admin,
        RecoveryRequest::TestFailover {
            machine: "demo-vm".into(),
            point: PointSpec::AtOrBefore { time_ms: point_ms },
            export_dir: None,
        },
    )
    .await?
    {
        RecoveryReply::TestFailover(t) => t,
        other => return Err(format!("test-failover: unexpected reply {other:?}")),
    };
    let back = (unix_ms().saturating_sub(drill.point.time_ms)) as f64 / 1000.0;
    println!(
        "9. test failover of point {} ({back:.1}s back, mid-way through the writes), served in {} ms while replication goes on:",
        drill.point.point, drill.elapsed_ms
    );
    ctl::print_drill(&drill);
    let view_uri = drill
        .disks
        .first()
        .and_then(|d| d.nbd_uri.clone())
        .ok_or("the test failover served no disk")?;
    let view_copy = dir.join("view.img");
    let (u, vc) = (view_uri.clone(), view_copy.clone());
    tokio::task::spawn_blocking(move || copy_from_nbd(&u, &vc))
        .await
        .map_err(|e| e.to_string())??;
    match first_difference(&at_point, &view_copy)? {
        None => {
            println!("   verified: the view is byte-identical to the disk as it was at that point")
        }
        Some(off) => {
            return Err(format!(
                "the view of point {} differs from the disk at that point at byte {off}",
                drill.point.point
            ))
        }
    }
    match first_difference(&at_point, &replica)? {
        Some(_) => println!("   (the replica itself stays at the latest state: failover to `latest` copies nothing)"),
        None => return Err("the writes after the point did not change the disk".into()),
    }
    match recovery(
        &admin,
        RecoveryRequest::TestFailoverCleanup {
            machine: "demo-vm".into(),
        },
    )
    .await?
    {
        RecoveryReply::Cleaned(c) => println!("10. test-failover-cleanup: {}", c.message),
        other => return Err(format!("test-failover-cleanup: unexpected reply {other:?}")),
    }
    for f in [&at_point, &view_copy] {
        let _ = std::fs::remove_file(f);
    }
    // The status table below shows what the master target last reported: wait for it to
    // report the drill gone, so the table does not show a drill that was just cleaned.
    wait_for(
        &admin,
        "status without the drill",
        Duration::from_secs(30),
        &mut procs,
        |m| m.is_some_and(|m| m.test_failover.is_none()),
    )
    .await?;
    failover_and_cancel(&admin, &mut procs, &dir, &disk, &replica, &uri).await?;
    let export = failover_and_reprotect(&admin, &dir, &disk).await?;
    failback(&admin, &mut procs, &dir, &disk, &replica, &uri, &export).await?;
    println!();
    let status = admin.status().await?;
    ctl::print_nodes(&status.nodes);
    println!();
    ctl::print_machines(&status.machines);
    admin.close().await;
    drop(procs);
    println!(
        "\nTo do this by hand:\n  haven node --data-dir /var/lib/haven --listen 0.0.0.0:7400\n  haven agent --join HOST:7400 --token-file /var/lib/haven/agent-token --data-dir /var/lib/haven-agent --disk root=/dev/vda --name web01\n  haven ctl --cluster HOST:7400 --token-file /var/lib/haven/admin-token protect web01\n  haven ctl --cluster HOST:7400 --token-file /var/lib/haven/admin-token status\n  haven ctl --cluster HOST:7400 --token-file /var/lib/haven/admin-token wait-sync web01\n  cmp /dev/vda /var/lib/haven/replicas/web01/root.img\n  haven ctl --cluster HOST:7400 --token-file /var/lib/haven/admin-token recovery-points web01\n  haven ctl --cluster HOST:7400 --token-file /var/lib/haven/admin-token test-failover web01 --point latest\n  haven ctl --cluster HOST:7400 --token-file /var/lib/haven/admin-token test-failover-cleanup web01\n  haven ctl --cluster HOST:7400 --token-file /var/lib/haven/admin-token failover web01   (then failover-commit or failover-cancel)\n  haven ctl --cluster HOST:7400 --token-file /var/lib/haven/admin-token reprotect web01   (after failover-commit, once the original site's agent is back)\n  haven ctl --cluster HOST:7400 --token-file /var/lib/haven/admin-token failback web01\n(the README's \"Disaster day\" walks through failover, reprotect and failback with two sites)\n(with `haven agent ... --capture tap`, the workload's disk is the NBD export the agent prints, and every flush is a recovery point)\n\ndemo OK"
    );
    Ok(())
}

/// Steps 11-12: a planned failover (the tap turns read-only, its final point is applied,
/// the recovery-site export equals the source byte for byte), a write at the recovery site
/// that leaves the replica alone, and a cancel after which forward replication resumes.
async fn failover_and_cancel(
    admin: &Admin,
    procs: &mut Procs,
    dir: &Path,
    disk: &Path,
    replica: &Path,
    tap_uri: &str,
) -> Result<(), String> {
    let f = admin
        .failover(
            "demo-vm",
            AdminCommand::Failover {
                machine: "demo-vm".into(),
                point: PointSpec::Latest,
            },
            Duration::from_secs(60),
            |_| {},
        )
        .await?;
    println!("11. failover (planned: the source is up, so its tap stopped taking writes and its final point was applied first):");
    ctl::print_failover(&f);
    let export = f
        .disks
        .first()
        .and_then(|d| d.nbd_uri.clone())
        .ok_or("the failover served no disk")?;
    let copy = dir.join("failover.img");
    let (u, c) = (export.clone(), copy.clone());
    tokio::task::spawn_blocking(move || copy_from_nbd(&u, &c))
        .await
        .map_err(|e| e.to_string())??;
    match first_difference(disk, &copy)? {
        None => println!("   verified: the recovery-site export is byte-identical to the source disk (no write lost)"),
        Some(off) => return Err(format!("the failover export differs from the source at byte {off}")),
    }
    let _ = std::fs::remove_file(&copy);
    nbd_write(&export, vec![(0, vec![0xd5; 4096])]).await?;
    match first_difference(disk, replica)? {
        None => println!("   a write at the recovery site went to the export's overlay: the replica is unchanged"),
        Some(off) => return Err(format!("the replica changed at byte {off} during the failover")),
    }
    match admin
        .call(AdminCommand::FailoverCancel {
            machine: "demo-vm".into(),
        })
        .await?
    {
        AdminReply::Failover(v) => ctl::print_failover(&v),
        other => return Err(format!("failover-cancel: unexpected reply {other:?}")),
    }
    // Forward again once the agent's next poll lifts read-only: a write through the tap
    // reaches the replica.
    let t = Instant::now();
    loop {
        if nbd_write(tap_uri, vec![(4096, vec![0x6b; 4096])])
            .await
            .is_ok()
        {
            break;
        }
        check_alive(procs)?;
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the tap did not take writes again within 30 s of the cancel".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_sync(admin, 120, "after the cancel").await?;
    match first_difference(disk, replica)? {
        None => println!("12. after the cancel the tap takes writes again and a new write reached the replica: forward replication resumed, no resync"),
        Some(off) => return Err(format!("after the cancel the replica differs at byte {off}")),
    }
    Ok(())
}

/// Steps 13-14: a failover committed, a write at the recovery site, then reprotect: the
/// original disk becomes equal to the recovery disk, only the differing blocks travelling.
/// Returns the recovery-site export's URI.
async fn failover_and_reprotect(admin: &Admin, dir: &Path, disk: &Path) -> Result<String, String> {
    let f = admin
        .failover(
            "demo-vm",
            AdminCommand::Failover {
                machine: "demo-vm".into(),
                point: PointSpec::Latest,
            },
            Duration::from_secs(60),
            |_| {},
        )
        .await?;
    admin
        .call(AdminCommand::FailoverCommit {
            machine: "demo-vm".into(),
        })
        .await?;
    let export = f
        .disks
        .first()
        .and_then(|d| d.nbd_uri.clone())
        .ok_or("the failover served no disk")?;
    let writes = (0..4u64)
        .map(|i| (i << 20, vec![0xa0 + i as u8; 65536]))
        .collect();
    nbd_write(&export, writes).await?;
    println!(
        "13. failed over again and committed; the workload at the recovery site wrote 256 KiB"
    );
    let r = admin
        .reprotect("demo-vm", Duration::from_secs(120), |_| {})
        .await?;
    println!("14. reprotect: the original site's agent compared its disk with the recovery disk block by block:");
    ctl::print_failover(&r);
    let copy = dir.join("recovery.img");
    let (u, c) = (export.clone(), copy.clone());
    tokio::task::spawn_blocking(move || copy_from_nbd(&u, &c))
        .await
        .map_err(|e| e.to_string())??;
    let same = first_difference(disk, &copy)?;
    let _ = std::fs::remove_file(&copy);
    match same {
        None => println!("   verified: the original disk is byte-identical to the recovery disk"),
        Some(off) => {
            return Err(format!(
                "after reprotect the original disk differs from the recovery disk at byte {off}"
            ))
        }
    }
    Ok(export)
}

/// Step 15: one more write at the recovery site, then failback: the exports are quiesced,
/// the last differences travel home, the replica is made equal to the recovery disk, the
/// original disk takes writes again and forward protection resumes without a full resync.
async fn failback(
    admin: &Admin,
    procs: &mut Procs,
    dir: &Path,
    disk: &Path,
    replica: &Path,
    tap_uri: &str,
    export: &str,
) -> Result<(), String> {
    nbd_write(export, vec![(5 << 20, vec![0xb7; 65536])]).await?;
    // The recovery disk as the failback will find it (nothing writes to it after this).
    let recovered = dir.join("recovered.img");
    let (u, c) = (export.to_string(), recovered.clone());
    tokio::task::spawn_blocking(move || copy_from_nbd(&u, &c))
        .await
        .map_err(|e| e.to_string())??;
    let b = admin
        .failback("demo-vm", Duration::from_secs(120), |_| {})
        .await?;
    println!("15. failback (64 KiB more written at the recovery site first):");
    ctl::print_failover(&b);
    let home = first_difference(disk, &recovered)?;
    let _ = std::fs::remove_file(&recovered);
    if let Some(off) = home {
        return Err(format!(
            "after failback the original disk differs from the recovery disk at byte {off}"
        ));
    }
    if let Some(off) = first_difference(disk, replica)? {
        return Err(format!(
            "after failback the replica differs from the original disk at byte {off}"
        ));
    }
    let sent_before = machine_bytes_sent(admin).await?;
    nbd_write(tap_uri, vec![(6 << 20, vec![0x3c; 4096])]).await?;
    wait_sync(admin, 120, "after the failback").await?;
    check_alive(procs)?;
    if let Some(off) = first_difference(disk, replica)? {
        return Err(format!(
            "a write after the failback did not reach the replica (byte {off})"
        ));
    }
    let sent = machine_bytes_sent(admin).await?.saturating_sub(sent_before);
    if sent >= 1 << 20 {
        return Err(format!(
            "{sent} bytes travelled for one 4 KiB write after the failback: a resync"
        ));
    }
    println!("   verified: the original disk, the recovery disk and the replica are byte-identical; the tap takes writes again and a new write reached the replica ({} KiB sent, no full resync)", sent.div_ceil(1024));
    Ok(())
}

/// What the machine's agent has sent since it started (`raw_bytes_sent`).
async fn machine_bytes_sent(admin: &Admin) -> Result<u64, String> {
    let status = admin.status().await?;
    status
        .machines
        .iter()
        .find(|m| m.name == "demo-vm")
        .map(|m| m.raw_bytes_sent)
        .ok_or_else(|| "demo-vm is not in the status".into())
}

/// `ctl wait-sync demo-vm` within `secs`; `when` says which one failed.
async fn wait_sync(admin: &Admin, secs: u64, when: &str) -> Result<(), String> {
    let what = if when.is_empty() {
        "wait-sync".to_string()
    } else {
        format!("wait-sync {when}")
    };
    match admin
        .wait_sync("demo-vm", Duration::from_secs(secs), |_, _, _| {})
        .await?
    {
        ctl::WaitEnd::Synced => Ok(()),
        ctl::WaitEnd::TimedOut(why) => Err(format!("{what} timed out (degraded: {why:?})")),
        ctl::WaitEnd::Blocked(why) => Err(format!("{what}: {why}")),
    }
}

async fn recovery(admin: &Admin, request: RecoveryRequest) -> Result<RecoveryReply, String> {
    match admin.call(AdminCommand::Recovery(request)).await {
        Ok(AdminReply::Recovery(r)) => Ok(r),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `(offset, data)` through the NBD export at `uri`, then flushes (in the blocking
/// pool: the client is blocking).
async fn nbd_write(uri: &str, writes: Vec<(u64, Vec<u8>)>) -> Result<(), String> {
    let uri = uri.to_string();
    tokio::task::spawn_blocking(move || {
        let mut c = haven_nbd::Client::connect(&uri).map_err(|e| format!("{uri}: {e}"))?;
        for (offset, data) in &writes {
            c.write_at(data, *offset, false)
                .map_err(|e| format!("write at {offset}: {e}"))?;
        }
        c.flush().map_err(|e| format!("flush: {e}"))?;
        c.disconnect().map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Reads a whole NBD export into a file.
fn copy_from_nbd(uri: &str, to: &Path) -> Result<(), String> {
    use std::io::Write;
    let mut c = haven_nbd::Client::connect(uri).map_err(|e| format!("{uri}: {e}"))?;
    let mut out = std::fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < c.size() {
        let n = (c.size() - off).min(buf.len() as u64) as usize;
        c.read_at(&mut buf[..n], off)
            .map_err(|e| format!("read the view: {e}"))?;
        out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        off += n as u64;
    }
    c.disconnect().map_err(|e| e.to_string())
}

fn done_message(r: &haven_roles::proto::AdminReply) -> String {
    match r {
        haven_roles::proto::AdminReply::Done { message } => message.clone(),
        other => format!("{other:?}"),
    }
}

fn check_alive(procs: &mut Procs) -> Result<(), String> {
    for (name, c) in &mut procs.0 {
        if let Ok(Some(status)) = c.try_wait() {
            return Err(format!("the {name} process exited ({status}); see its log"));
        }
    }
    Ok(())
}

async fn connect_with_retry(addr: &str, token: &Path, procs: &mut Procs) -> Result<Admin, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        check_alive(procs)?;
        if token.exists() {
            match Admin::connect(addr, token).await {
                Ok(a) => return Ok(a),
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => {}
            }
        } else if Instant::now() > deadline {
            return Err(format!("node did not write {} in 30s", token.display()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for(
    admin: &Admin,
    what: &str,
    timeout: Duration,
    procs: &mut Procs,
    mut ok: impl FnMut(Option<&haven_roles::view::MachineView>) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        check_alive(procs)?;
        let m = admin.machine("demo-vm").await?;
        if ok(m.as_ref()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
