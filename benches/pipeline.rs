//! End-to-end benchmark of the real system: `haven node` (all-in-one) + `haven agent` on a
//! generated mixed-content disk, driven through `haven ctl --json`, with same-run baselines
//! (`cp` + `sync`, `rsync -B 4096`, a single-threaded read+xxh3 scan floor) and the targets
//! from LIMITS.md / the issue.
//!
//! It builds nothing: build the binary first.
//!
//! ```text
//! export CARGO_TARGET_DIR=/work/target-bench     # or leave it unset
//! cargo build --release
//! HAVEN_BIN=$CARGO_TARGET_DIR/release/haven cargo bench --bench pipeline
//! ```
//!
//! Environment:
//! - `HAVEN_BIN`            the haven binary (default `<manifest dir>/target/release/haven`)
//! - `HAVEN_BENCH_DISK`     disk size, e.g. `1GiB` (default), `256MiB`
//! - `HAVEN_BENCH_SYNCS`    initial syncs (first protect, then unprotect + protect), default 3
//! - `HAVEN_BENCH_ROUNDS`   1 % change rounds, default 5
//! - `HAVEN_BENCH_SEED`     generator seed, default 42
//! - `HAVEN_BENCH_KEEP=1`   keep the temporary directory (logs, images) afterwards
//! - `HAVEN_BENCH_RETENTION` the agent's `--retention-size` (default 64MiB; for experiments)
//! - `HAVEN_BENCH_TRACE=1`  print every status poll during the initial syncs
//!
//! Every haven figure is only reported after `cmp` proved the replica byte-identical to the
//! source; a mismatch aborts the run with a non-zero exit.
use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Read,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use haven_testkit::{
    bench::{
        disk_size_from_env, env_flag, env_num, haven_bin, in_temp_dir, parse_size, path_str,
        print_header, MB, MIB,
    },
    fmt_stat, free_udp_port, generate_disk,
    host::mem_gib,
    loadavg, machine_desc, run_cmd, stat, str_field, u64_field, verify_same, Procs, Res, Rng,
    BLOCK,
};

const MACHINE: &str = "bench";
/// The agent's `--retention-size` unless `HAVEN_BENCH_RETENTION` says otherwise.
const RETENTION_DEFAULT: &str = "64MiB";

// Targets from the issue (see LIMITS.md for the hardware figures behind them).
const TARGET_INITIAL_MBPS: f64 = 100.0;
const TARGET_CHANGE_SECS: f64 = 1.0;
const TARGET_RSS_BEYOND_RETENTION_MIB: f64 = 64.0;

fn main() -> ExitCode {
    haven_testkit::bench::main("end-to-end pipeline benchmark", "pipeline", run)
}

// ---------------------------------------------------------------------------------------
// Configuration

struct Config {
    bin: PathBuf,
    disk_size: u64,
    syncs: usize,
    rounds: usize,
    seed: u64,
    keep: bool,
    retention: String,
    retention_bytes: u64,
    trace: bool,
}

impl Config {
    fn from_env() -> Res<Self> {
        let bin = haven_bin(env!("CARGO_MANIFEST_DIR"))?;
        let disk_size = disk_size_from_env(1 << 30, 16 << 20)?;
        let retention =
            std::env::var("HAVEN_BENCH_RETENTION").unwrap_or_else(|_| RETENTION_DEFAULT.into());
        Ok(Self {
            bin,
            disk_size,
            syncs: env_num("HAVEN_BENCH_SYNCS", 3)?.max(1) as usize,
            rounds: env_num("HAVEN_BENCH_ROUNDS", 5)?.max(1) as usize,
            seed: env_num("HAVEN_BENCH_SEED", 42)?,
            keep: env_flag("HAVEN_BENCH_KEEP"),
            retention_bytes: parse_size(&retention)?,
            retention,
            trace: env_flag("HAVEN_BENCH_TRACE"),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic data

/// Overwrites 1 % of the disk's 4 KiB blocks (distinct, random offsets) with random data,
/// then fsyncs. Returns the bytes written.
fn change_one_percent(path: &Path, size: u64, seed: u64) -> Res<u64> {
    let mut rng = Rng::new(seed);
    let blocks = size / BLOCK;
    let n = (blocks / 100).max(1);
    let mut taken = vec![false; blocks as usize];
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut buf = [0u8; BLOCK as usize];
    let mut done = 0;
    while done < n {
        let b = rng.below64(blocks);
        if std::mem::replace(&mut taken[b as usize], true) {
            continue;
        }
        rng.fill(&mut buf);
        f.write_all_at(&buf, b * BLOCK).map_err(|e| e.to_string())?;
        done += 1;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(n * BLOCK)
}

/// The scan floor: read the whole image and xxh3 every 4 KiB block, single-threaded (what a
/// scan-mode capture pass has to do at minimum, before finding anything).
fn read_and_hash(path: &Path) -> Res<Duration> {
    let t = Instant::now();
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4 << 20];
    let mut acc = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        for b in buf[..n].chunks(BLOCK as usize) {
            acc ^= xxhash_rust::xxh3::xxh3_64(b);
        }
    }
    std::hint::black_box(acc);
    Ok(t.elapsed())
}

fn read_full(f: &mut File, buf: &mut [u8]) -> Res<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).map_err(|e| e.to_string())? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// Timing (the processes and `ctl` calls are haven_testkit's `Procs` and `Ctl`)

fn timed<T>(f: impl FnOnce() -> Res<T>) -> Res<(Duration, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed(), v))
}

// ---------------------------------------------------------------------------------------
// /proc sampling

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process or thread, in clock ticks, from a `stat` file.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let rest: Vec<&str> = s[close + 2..].split_whitespace().collect();
    // fields after ")" start at field 3 (state); utime is field 14, stime 15.
    let ut: u64 = rest.get(11)?.parse().ok()?;
    let st: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, ut + st))
}

fn clk_tck() -> f64 {
    run_cmd("getconf", &["CLK_TCK"])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Per-thread CPU ticks of a process: tid -> (comm, ticks).
fn thread_ticks(pid: u32) -> HashMap<u32, (String, u64)> {
    let mut m = HashMap::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            if let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() {
                if let Some(v) = stat_ticks(&format!("/proc/{pid}/task/{tid}/stat")) {
                    m.insert(tid, v);
                }
            }
        }
    }
    m
}

/// CPU used by a process during a phase, total and by thread.
struct CpuSnap {
    at: Instant,
    total: u64,
    threads: HashMap<u32, (String, u64)>,
}

fn cpu_snap(pid: u32) -> CpuSnap {
    CpuSnap {
        at: Instant::now(),
        total: stat_ticks(&format!("/proc/{pid}/stat"))
            .map(|x| x.1)
            .unwrap_or(0),
        threads: thread_ticks(pid),
    }
}

struct CpuUse {
    wall: f64,
    cpu: f64,
    /// Busiest threads: (comm, tid, cpu seconds).
    top: Vec<(String, u32, f64)>,
}

fn cpu_since(pid: u32, before: &CpuSnap, tck: f64) -> CpuUse {
    let now = cpu_snap(pid);
    let mut top: Vec<(String, u32, f64)> = now
        .threads
        .iter()
        .map(|(tid, (comm, t))| {
            let b = before.threads.get(tid).map(|x| x.1).unwrap_or(0);
            (comm.clone(), *tid, (t - b.min(*t)) as f64 / tck)
        })
        .filter(|x| x.2 > 0.0)
        .collect();
    top.sort_by(|a, b| b.2.total_cmp(&a.2));
    top.truncate(6);
    CpuUse {
        wall: now.at.duration_since(before.at).as_secs_f64(),
        cpu: (now.total.saturating_sub(before.total)) as f64 / tck,
        top,
    }
}

/// Samples the agent's VmRSS every 20 ms; keeps the maximum per phase.
struct RssSampler {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    max: Arc<Vec<AtomicU64>>,
    handle: Option<JoinHandle<()>>,
}

const PHASES: usize = 4;
const PH_IDLE: usize = 0;
const PH_INITIAL: usize = 1;
const PH_CHANGES: usize = 2;
const PH_OTHER: usize = 3;

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(PH_IDLE));
        let max: Arc<Vec<AtomicU64>> = Arc::new((0..PHASES).map(|_| AtomicU64::new(0)).collect());
        let (s, p, m) = (stop.clone(), phase.clone(), max.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = proc_status_kib(pid, "VmRSS:") {
                    m[p.load(Ordering::Relaxed)].fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            phase,
            max,
            handle: Some(handle),
        }
    }
    fn set_phase(&self, p: usize) {
        self.phase.store(p, Ordering::Relaxed);
    }
    fn max_mib(&self, p: usize) -> f64 {
        self.max[p].load(Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and output

fn print_cpu(name: &str, u: &CpuUse) {
    let threads: Vec<String> = u
        .top
        .iter()
        .map(|(c, tid, s)| format!("{c}/{tid} {:.2}s ({:.0}%)", s, 100.0 * s / u.wall.max(1e-9)))
        .collect();
    println!(
        "      {name:<6} {:.2} CPU-s in {:.2}s = {:.2} cores; busiest threads: {}",
        u.cpu,
        u.wall,
        u.cpu / u.wall.max(1e-9),
        threads.join(", ")
    );
}

// ---------------------------------------------------------------------------------------
// The run

struct InitialRun {
    secs_total: f64,
    secs_replicating: f64,
    raw: u64,
    wire: u64,
    /// First poll that showed data moving (seconds after protect).
    first_data: f64,
    /// Raw MB/s between the polls that first showed 10 % and 90 % of the data sent: the
    /// data phase without the start-up and completion latencies (from the agent's reports,
    /// which arrive every ~0.5 s, so a rough figure).
    steady_mbps: f64,
}

struct ChangeRun {
    wall: f64,
    ctl_secs: f64,
    raw: u64,
    wire: u64,
}

fn run() -> Res<()> {
    let cfg = Config::from_env()?;
    let tck = clk_tck();
    in_temp_dir("haven-bench-", cfg.keep, |dir| bench(&cfg, dir, tck))
}

fn bench(cfg: &Config, dir: &Path, tck: f64) -> Res<()> {
    let machine = format!("{}, {:.0} GiB RAM", machine_desc(), mem_gib());
    print_header("haven pipeline benchmark", &machine, &cfg.bin, dir);

    let disk = dir.join("disk.img");
    let (gen_t, ds) = timed(|| generate_disk(&disk, cfg.disk_size, cfg.seed))?;
    println!(
        "\ngenerated a {:.0} MiB disk in {:.1}s: {:.0} MiB text, {:.0} MiB structured, {:.0} MiB random, {:.0} MiB zero holes; {:.1} MiB in non-zero 4 KiB blocks",
        cfg.disk_size as f64 / MIB,
        gen_t.as_secs_f64(),
        ds.text as f64 / MIB,
        ds.structured as f64 / MIB,
        ds.random as f64 / MIB,
        ds.zero as f64 / MIB,
        ds.nonzero_bytes as f64 / MIB
    );

    // ---- Baselines, with no haven process running (the agent's periodic scans would
    // otherwise compete with them for the two cores).
    println!("\nbaselines (haven not running):");
    let copy = dir.join("copy.img");
    let mut cp_mbps = vec![];
    let mut cp_disk_mbps = vec![];
    for i in 0..cfg.syncs {
        let _ = std::fs::remove_file(&copy);
        let (t, _) = timed(|| {
            run_cmd("cp", &[path_str(&disk)?, path_str(&copy)?])?;
            run_cmd("sync", &[path_str(&copy)?])
        })?;
        let s = t.as_secs_f64();
        cp_mbps.push(ds.nonzero_bytes as f64 / MB / s);
        cp_disk_mbps.push(cfg.disk_size as f64 / MB / s);
        println!(
            "  cp + sync #{}: {:.2}s = {:.0} MB/s of non-zero data ({:.0} MB/s of disk)",
            i + 1,
            s,
            cp_mbps[i],
            cp_disk_mbps[i]
        );
    }
    verify_same(&disk, &copy, "cp")?;

    let mut scan_floor = vec![];
    for _ in 0..3 {
        scan_floor.push(read_and_hash(&disk)?.as_secs_f64());
    }
    println!(
        "  read + xxh3 per 4 KiB block, whole image, one thread: {}s",
        fmt_stat(stat(&scan_floor), 3)
    );

    let rsync = ensure_rsync();
    let mut rsync_secs = vec![];
    let mut rsync_sent = vec![];
    let change_bytes;
    match &rsync {
        Ok(()) => {
            // `copy` is the pre-change image; each round changes `disk` and rsyncs it onto `copy`.
            let mut last = 0;
            for i in 0..cfg.rounds {
                last = change_one_percent(&disk, cfg.disk_size, cfg.seed ^ (0x1000 + i as u64))?;
                let (t, out) = timed(|| {
                    let out = run_cmd(
                        "rsync",
                        &[
                            "--inplace",
                            "--no-whole-file",
                            // Always run the delta algorithm: the default quick check (size and
                            // mtime in whole seconds) silently skips a file changed within the
                            // same second as the last copy.
                            "--ignore-times",
                            "-B",
                            "4096",
                            "--stats",
                            path_str(&disk)?,
                            path_str(&copy)?,
                        ],
                    )?;
                    run_cmd("sync", &[path_str(&copy)?])?;
                    Ok(out)
                })?;
                verify_same(&disk, &copy, "rsync")?;
                let sent = out
                    .lines()
                    .find(|l| l.starts_with("Total bytes sent:"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().replace(',', "").parse::<u64>().unwrap_or(0))
                    .unwrap_or(0);
                rsync_secs.push(t.as_secs_f64());
                rsync_sent.push(sent as f64);
                println!(
                    "  rsync -B 4096 of a 1 % change #{}: {:.2}s, {:.1} MB sent",
                    i + 1,
                    t.as_secs_f64(),
                    sent as f64 / MB
                );
            }
            change_bytes = last;
        }
        Err(e) => {
            println!("  rsync baseline SKIPPED: {e}");
            change_bytes = (cfg.disk_size / BLOCK / 100).max(1) * BLOCK;
        }
    }
    std::fs::remove_file(&copy).map_err(|e| e.to_string())?;
    // The rsync rounds changed the disk: recount what an initial scan has to send.
    let nonzero = count_nonzero_blocks(&disk)?;

    // ---- haven
    let mut procs = Procs::new(&cfg.bin, dir).poll_every(Duration::from_millis(100));
    let node_dir = dir.join("node");
    let agent_dir = dir.join("agent");
    let port = free_udp_port()?;
    let addr = format!("127.0.0.1:{port}");
    procs.start(
        "node",
        &[
            "node",
            "--data-dir",
            path_str(&node_dir)?,
            "--listen",
            &addr,
            "--name",
            "bench-node",
        ],
    )?;
    let ctl = procs.configuration_ready(&addr, &node_dir)?;
    let agent_token = node_dir.join("agent-token");

    let disk_arg = format!("root={}", disk.display());
    procs.start(
        "agent",
        &[
            "agent",
            "--join",
            &addr,
            "--token-file",
            path_str(&agent_token)?,
            "--data-dir",
            path_str(&agent_dir)?,
            "--disk",
            &disk_arg,
            "--name",
            MACHINE,
            "--scan-interval",
            "1s",
            "--retention-size",
            &cfg.retention,
        ],
    )?;
    let agent_pid = procs.pid("agent").ok_or("agent pid")?;
    let node_pid = procs.pid("node").ok_or("node pid")?;
    let rss = RssSampler::start(agent_pid);
    procs.wait_until("the agent to enroll", Duration::from_secs(30), || {
        Ok(ctl.machine(MACHINE)?.is_some())
    })?;

    // The cost of one ctl call (process start, QUIC + TLS handshake, one request).
    let mut ctl_secs = vec![];
    for _ in 0..5 {
        ctl_secs.push(timed(|| ctl.call(&["status"]))?.0.as_secs_f64());
    }
    let ctl_overhead = stat(&ctl_secs);
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss = proc_status_kib(agent_pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    println!("\nhaven: node pid {node_pid} on {addr}, agent pid {agent_pid}; one `ctl status` call takes {}s; idle agent RSS {idle_rss:.1} MiB", fmt_stat(ctl_overhead, 3));

    // ---- (a) initial sync
    let replica = node_dir.join("replicas").join(MACHINE).join("root.img");
    let mut initial: Vec<InitialRun> = vec![];
    let mut initial_cpu = vec![];
    rss.set_phase(PH_INITIAL);
    for i in 0..cfg.syncs {
        if i > 0 {
            // A new protection epoch: a full resync from scratch.
            rss.set_phase(PH_OTHER);
            ctl.call(&["unprotect", MACHINE])?;
            procs.wait_until(
                "the machine to be unprotected",
                Duration::from_secs(30),
                || {
                    Ok(ctl
                        .machine(MACHINE)?
                        .is_some_and(|m| m["state"] == "discovered"))
                },
            )?;
            std::thread::sleep(Duration::from_secs(2));
            rss.set_phase(PH_INITIAL);
        }
        let (agent_cpu0, node_cpu0) = (cpu_snap(agent_pid), cpu_snap(node_pid));
        let t0 = Instant::now();
        ctl.call(&["protect", MACHINE])?;
        let mut replicating_at = None;
        let mut last = Value::Null;
        let mut progress: Vec<(f64, u64, u64)> = vec![]; // (t, raw sent, wire sent)
        while replicating_at.is_none() {
            procs.check_alive()?;
            if t0.elapsed() > Duration::from_secs(900) {
                return Err(format!(
                    "initial sync did not finish in 15 minutes; last status {last}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
            let m = ctl.machine(MACHINE)?.ok_or("machine vanished")?;
            if cfg.trace {
                println!(
                    "    t={:6.2}s {:<13} {:>5.1}% captured {:>4} cached {:>4} applied {:>4} retained {:>6.1} MiB raw sent {:>6.1} MiB wire {:>6.1} MiB",
                    t0.elapsed().as_secs_f64(),
                    str_field(&m, "state"),
                    m["initial_sync_percent"].as_f64().unwrap_or(100.0),
                    u64_field(&m, "captured_seq"),
                    u64_field(&m, "cached_seq"),
                    u64_field(&m, "applied_seq"),
                    u64_field(&m, "retained_bytes") as f64 / MIB,
                    u64_field(&m, "raw_bytes_sent") as f64 / MIB,
                    u64_field(&m, "wire_bytes_sent") as f64 / MIB,
                );
            }
            // Done once the first pass is applied: state replicating and everything non-zero
            // sent (so a stale report from the previous epoch cannot end the wait).
            if m["state"] == "replicating" && u64_field(&m, "raw_bytes_sent") >= nonzero {
                replicating_at = Some(t0.elapsed());
            }
            progress.push((
                t0.elapsed().as_secs_f64(),
                u64_field(&m, "raw_bytes_sent"),
                u64_field(&m, "wire_bytes_sent"),
            ));
            last = m;
        }
        let ws = ctl.call(&["wait-sync", MACHINE, "--timeout", "300s"])?;
        let total = t0.elapsed();
        let (acpu, ncpu) = (
            cpu_since(agent_pid, &agent_cpu0, tck),
            cpu_since(node_pid, &node_cpu0, tck),
        );
        if ws["synced"] != true {
            return Err(format!("wait-sync after the initial sync: {ws}"));
        }
        verify_same(&disk, &replica, &format!("initial sync #{}", i + 1))?;
        std::thread::sleep(Duration::from_millis(1100)); // let the node report its wire bytes
        let m = ctl.machine(MACHINE)?.ok_or("machine vanished")?;
        let first_data = progress
            .iter()
            .find(|p| p.1 > 0 || p.2 > 0)
            .map(|p| p.0)
            .unwrap_or(f64::NAN);
        let at = |frac: f64| {
            progress
                .iter()
                .find(|p| p.1 as f64 >= frac * nonzero as f64)
                .copied()
        };
        let steady_mbps = match (at(0.1), at(0.9)) {
            (Some(a), Some(b)) if b.0 > a.0 && b.1 > a.1 => (b.1 - a.1) as f64 / MB / (b.0 - a.0),
            _ => f64::NAN,
        };
        let run = InitialRun {
            secs_total: total.as_secs_f64(),
            secs_replicating: replicating_at.expect("set").as_secs_f64(),
            raw: u64_field(&m, "raw_bytes_sent"),
            wire: u64_field(&m, "wire_bytes_sent"),
            first_data,
            steady_mbps,
        };
        println!(
            "  initial sync #{} (epoch {}): replicating after {:.2}s, wait-sync done after {:.2}s; {:.1} MiB raw ({:.0} MB/s), {:.1} MiB on the wire (ratio {:.2}); replica verified with cmp",
            i + 1,
            m["epoch"],
            run.secs_replicating,
            run.secs_total,
            run.raw as f64 / MIB,
            run.raw as f64 / MB / run.secs_total,
            run.wire as f64 / MIB,
            run.raw as f64 / run.wire.max(1) as f64
        );
        println!(
            "    first data seen {:.2}s after protect; data phase (10→90 % sent) at ~{:.0} MB/s raw",
            run.first_data, run.steady_mbps
        );
        if run.raw != nonzero {
            println!(
                "    note: raw bytes sent {} != non-zero bytes on the disk {}",
                run.raw, nonzero
            );
        }
        print_cpu("agent", &acpu);
        print_cpu("node", &ncpu);
        initial_cpu.push((acpu, ncpu));
        initial.push(run);
    }

    // ---- empty barriers: what a sync barrier costs with nothing to send
    rss.set_phase(PH_OTHER);
    let mut empty = vec![];
    for _ in 0..3 {
        let (t, ws) = timed(|| ctl.call(&["wait-sync", MACHINE, "--timeout", "60s"]))?;
        if ws["synced"] != true {
            return Err(format!("empty wait-sync: {ws}"));
        }
        empty.push((t.as_secs_f64(), ws["seconds"].as_f64().unwrap_or(f64::NAN)));
    }
    let empty_wall = stat(&empty.iter().map(|x| x.0).collect::<Vec<_>>());
    let empty_ctl = stat(&empty.iter().map(|x| x.1).collect::<Vec<_>>());
    println!(
        "\n  wait-sync with nothing changed: {}s wall ({}s inside ctl)",
        fmt_stat(empty_wall, 2),
        fmt_stat(empty_ctl, 2)
    );
    // What the periodic scans (--scan-interval 1s) cost when nothing changes.
    let idle0 = (cpu_snap(agent_pid), cpu_snap(node_pid));
    std::thread::sleep(Duration::from_secs(5));
    let idle_cpu = (
        cpu_since(agent_pid, &idle0.0, tck),
        cpu_since(node_pid, &idle0.1, tck),
    );
    println!(
        "  idle for 5 s (periodic 1 s scans, nothing changed): agent {:.2} cores, node {:.2} cores",
        idle_cpu.0.cpu / idle_cpu.0.wall,
        idle_cpu.1.cpu / idle_cpu.1.wall
    );

    // ---- (b) 1 % change rounds
    rss.set_phase(PH_CHANGES);
    let mut changes: Vec<ChangeRun> = vec![];
    let mut change_cpu = vec![];
    for i in 0..cfg.rounds {
        let before = ctl.machine(MACHINE)?.ok_or("machine vanished")?;
        let (agent_cpu0, node_cpu0) = (cpu_snap(agent_pid), cpu_snap(node_pid));
        let (wt, written) =
            timed(|| change_one_percent(&disk, cfg.disk_size, cfg.seed ^ (0x2000 + i as u64)))?;
        let t0 = Instant::now();
        let ws = ctl.call(&["wait-sync", MACHINE, "--timeout", "300s"])?;
        let wall = t0.elapsed().as_secs_f64();
        let (acpu, ncpu) = (
            cpu_since(agent_pid, &agent_cpu0, tck),
            cpu_since(node_pid, &node_cpu0, tck),
        );
        if ws["synced"] != true {
            return Err(format!("wait-sync after change round {}: {ws}", i + 1));
        }
        verify_same(&disk, &replica, &format!("change round {}", i + 1))?;
        std::thread::sleep(Duration::from_millis(1100));
        let after = ctl.machine(MACHINE)?.ok_or("machine vanished")?;
        let run = ChangeRun {
            wall,
            ctl_secs: ws["seconds"].as_f64().unwrap_or(f64::NAN),
            raw: u64_field(&after, "raw_bytes_sent")
                .saturating_sub(u64_field(&before, "raw_bytes_sent")),
            wire: u64_field(&after, "wire_bytes_sent")
                .saturating_sub(u64_field(&before, "wire_bytes_sent")),
        };
        println!(
            "  1 % change #{}: wrote {:.1} MiB in {:.2}s (fsynced); wait-sync {:.2}s wall ({:.2}s inside ctl); {:.1} MiB raw, {:.1} MiB wire; state {}; replica verified with cmp",
            i + 1,
            written as f64 / MIB,
            wt.as_secs_f64(),
            run.wall,
            run.ctl_secs,
            run.raw as f64 / MIB,
            run.wire as f64 / MIB,
            str_field(&after, "state"),
        );
        print_cpu("agent", &acpu);
        print_cpu("node", &ncpu);
        change_cpu.push((acpu, ncpu));
        changes.push(run);
    }
    let hwm = proc_status_kib(agent_pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let node_hwm = proc_status_kib(node_pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let (rss_initial, rss_changes) = (rss.max_mib(PH_INITIAL), rss.max_mib(PH_CHANGES));
    drop(rss);
    let end_load = loadavg();
    drop(procs); // stop haven before printing, so nothing is left behind even if printing fails

    // ---- the table
    let init_mbps = stat(
        &initial
            .iter()
            .map(|r| r.raw as f64 / MB / r.secs_total)
            .collect::<Vec<_>>(),
    );
    let init_mbps_repl = stat(
        &initial
            .iter()
            .map(|r| r.raw as f64 / MB / r.secs_replicating)
            .collect::<Vec<_>>(),
    );
    let init_secs = stat(&initial.iter().map(|r| r.secs_total).collect::<Vec<_>>());
    let init_wire = stat(
        &initial
            .iter()
            .map(|r| r.wire as f64 / MB)
            .collect::<Vec<_>>(),
    );
    let init_ratio = stat(
        &initial
            .iter()
            .map(|r| r.raw as f64 / r.wire.max(1) as f64)
            .collect::<Vec<_>>(),
    );
    let cp = stat(&cp_mbps);
    let ch_wall = stat(&changes.iter().map(|r| r.wall).collect::<Vec<_>>());
    let ch_ctl = stat(&changes.iter().map(|r| r.ctl_secs).collect::<Vec<_>>());
    let ch_raw = stat(
        &changes
            .iter()
            .map(|r| r.raw as f64 / MB)
            .collect::<Vec<_>>(),
    );
    let ch_wire = stat(
        &changes
            .iter()
            .map(|r| r.wire as f64 / MB)
            .collect::<Vec<_>>(),
    );
    let rs = stat(&rsync_secs);
    let rs_sent = stat(&rsync_sent);
    let peak = rss_initial.max(rss_changes);
    let beyond = peak - cfg.retention_bytes as f64 / MIB;
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };

    println!("\n=== results: {:.0} MiB disk, {:.1} MiB non-zero, {} initial syncs, {} change rounds of {:.1} MiB; median [min–max] ===", cfg.disk_size as f64 / MIB, nonzero as f64 / MIB, cfg.syncs, cfg.rounds, change_bytes as f64 / MIB);
    println!(
        "{:<46} {:>34} {:>32} {:>7} {:>28}",
        "metric", "haven", "baseline (same run)", "ratio", "target (LIMITS/issue)"
    );
    let row = |m: &str, h: String, b: String, r: String, t: String| {
        println!("{m:<46} {h:>34} {b:>32} {r:>7} {t:>28}")
    };
    row(
        "initial sync, raw MB/s (protect→wait-sync)",
        fmt_stat(init_mbps, 0),
        format!("cp+sync {}", fmt_stat(cp, 0)),
        format!("{:.2}x", init_mbps.median / cp.median),
        format!(
            "≥{TARGET_INITIAL_MBPS:.0}: {} ({:.2}x)",
            verdict(init_mbps.median >= TARGET_INITIAL_MBPS),
            init_mbps.median / TARGET_INITIAL_MBPS
        ),
    );
    row(
        "initial sync, raw MB/s (protect→replicating)",
        fmt_stat(init_mbps_repl, 0),
        "".into(),
        format!("{:.2}x", init_mbps_repl.median / cp.median),
        "".into(),
    );
    row(
        "initial sync, seconds",
        fmt_stat(init_secs, 2),
        "".into(),
        "".into(),
        "".into(),
    );
    row(
        "initial sync, first data seen after protect, s",
        fmt_stat(
            stat(&initial.iter().map(|r| r.first_data).collect::<Vec<_>>()),
            2,
        ),
        "".into(),
        "".into(),
        "".into(),
    );
    let steady = stat(&initial.iter().map(|r| r.steady_mbps).collect::<Vec<_>>());
    row(
        "initial sync, data phase raw MB/s (10→90 %)",
        fmt_stat(steady, 0),
        "".into(),
        format!("{:.2}x", steady.median / cp.median),
        format!("pipeline bound ~200 ({:.2}x)", steady.median / 200.0),
    );
    row(
        "initial sync, wire MB (raw/wire ratio)",
        format!("{} ({})", fmt_stat(init_wire, 0), fmt_stat(init_ratio, 2)),
        "".into(),
        "".into(),
        "zstd-1 ratio ~1.81".into(),
    );
    row(
        "1 % change, capture→applied s (wait-sync wall)",
        fmt_stat(ch_wall, 2),
        if rs.n > 0 {
            format!("rsync -B4096 {}", fmt_stat(rs, 2))
        } else {
            "rsync: n/a".into()
        },
        if rs.n > 0 {
            format!("{:.2}x", ch_wall.median / rs.median)
        } else {
            "".into()
        },
        format!(
            "<{TARGET_CHANGE_SECS:.0}: {} ({:.2}x)",
            verdict(ch_wall.median < TARGET_CHANGE_SECS),
            ch_wall.median / TARGET_CHANGE_SECS
        ),
    );
    row(
        "1 % change, seconds inside ctl (excl. connect)",
        fmt_stat(ch_ctl, 2),
        "".into(),
        "".into(),
        "".into(),
    );
    row(
        "1 % change, raw / wire MB",
        format!("{} / {}", fmt_stat(ch_raw, 1), fmt_stat(ch_wire, 1)),
        if rs.n > 0 {
            format!(
                "rsync sent {} MB",
                fmt_stat(
                    stat(&rsync_sent.iter().map(|x| x / MB).collect::<Vec<_>>()),
                    1
                )
            )
        } else {
            "".into()
        },
        if rs.n > 0 {
            format!("{:.2}x", ch_wire.median / (rs_sent.median / MB))
        } else {
            "".into()
        },
        "rsync ~11.8 MB".into(),
    );
    row(
        "empty wait-sync (nothing changed), s",
        fmt_stat(empty_wall, 2),
        format!("scan floor {}", fmt_stat(stat(&scan_floor), 2)),
        "".into(),
        "".into(),
    );
    row(
        "one `ctl status` call, s",
        fmt_stat(ctl_overhead, 3),
        "".into(),
        "".into(),
        "".into(),
    );
    row(
        "idle CPU, cores (agent / node), 1 s scans",
        format!(
            "{:.2} / {:.2}",
            idle_cpu.0.cpu / idle_cpu.0.wall,
            idle_cpu.1.cpu / idle_cpu.1.wall
        ),
        "".into(),
        "".into(),
        "".into(),
    );
    row(
        "agent peak RSS, MiB (initial sync / changes)",
        format!("{rss_initial:.1} / {rss_changes:.1}"),
        format!("retention {}", cfg.retention),
        "".into(),
        format!(
            "<{:.0}: {} ({:.1} beyond)",
            cfg.retention_bytes as f64 / MIB + TARGET_RSS_BEYOND_RETENTION_MIB,
            verdict(beyond < TARGET_RSS_BEYOND_RETENTION_MIB),
            beyond
        ),
    );
    row(
        "agent VmHWM / idle RSS, MiB",
        format!("{hwm:.1} / {idle_rss:.1}"),
        "".into(),
        "".into(),
        "".into(),
    );
    row(
        "node (all-in-one) VmHWM, MiB",
        format!("{node_hwm:.1}"),
        "".into(),
        "".into(),
        "".into(),
    );
    let avg_cores = |v: &[(CpuUse, CpuUse)], agent: bool| {
        stat(
            &v.iter()
                .map(|(a, n)| {
                    if agent {
                        a.cpu / a.wall
                    } else {
                        n.cpu / n.wall
                    }
                })
                .collect::<Vec<_>>(),
        )
    };
    row(
        "CPU cores used in initial sync (agent / node)",
        format!(
            "{} / {}",
            fmt_stat(avg_cores(&initial_cpu, true), 2),
            fmt_stat(avg_cores(&initial_cpu, false), 2)
        ),
        "".into(),
        "".into(),
        "2 vCPU in total".into(),
    );
    row(
        "CPU-s per 1 % change round (agent / node)",
        format!(
            "{} / {}",
            fmt_stat(
                stat(&change_cpu.iter().map(|x| x.0.cpu).collect::<Vec<_>>()),
                2
            ),
            fmt_stat(
                stat(&change_cpu.iter().map(|x| x.1.cpu).collect::<Vec<_>>()),
                2
            )
        ),
        "".into(),
        "".into(),
        "".into(),
    );
    println!("load average at end: {end_load}");
    if let Err(e) = rsync {
        println!("note: the rsync baseline could not run: {e}");
    }
    println!("pipeline bench OK (every replica verified byte-identical with cmp)");
    Ok(())
}

fn count_nonzero_blocks(path: &Path) -> Res<u64> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0;
    loop {
        let k = read_full(&mut f, &mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        for b in buf[..k].chunks(BLOCK as usize) {
            if b.iter().any(|&x| x != 0) {
                n += b.len() as u64;
            }
        }
    }
}

/// rsync for the change baseline: installed, or installed now with apt-get.
fn ensure_rsync() -> Res<()> {
    let have = || {
        Command::new("rsync")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have() {
        return Ok(());
    }
    eprintln!("rsync is not installed; trying `apt-get install -y rsync`");
    let out = Command::new("apt-get")
        .args(["install", "-y", "rsync"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output();
    if have() {
        return Ok(());
    }
    Err(match out {
        Ok(o) => format!(
            "rsync is not installed and `apt-get install -y rsync` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("rsync is not installed and apt-get could not run: {e}"),
    })
}
