//! Scale-out benchmark of the real system: one configuration node (`--no-auto-rebalance`, so
//! only the bench moves machines), three process servers, one master target and four agents,
//! each agent on its own generated 64 MiB disk of mixed content, all driven through
//! `haven ctl --json` subprocesses while a writer thread keeps changing every disk.
//!
//! 1. **Live moves**: `HAVEN_BENCH_MOVES` moves round-robin over machines and process servers
//!    with `ctl move M --to PS`; the pause and bytes resent that the agent reports, and the
//!    wall time of the `ctl move` call, broken down with the nodes' and agents' logs.
//! 2. **Failover**: `HAVEN_BENCH_FAILOVERS` rounds: every machine moved onto one process
//!    server, SIGKILL of that server, time until `ctl machines` shows every machine elsewhere
//!    and until every machine's `applied_seq` moved on; then the server is restarted.
//! 3. Writes stop, every machine is synced, and every replica is compared with its source with
//!    `cmp`: a mismatch aborts the run with a non-zero exit.
//!
//! It builds nothing: build the binary first.
//!
//! ```text
//! export CARGO_TARGET_DIR=/work/target-bench     # or leave it unset
//! cargo build --release
//! HAVEN_BIN=$CARGO_TARGET_DIR/release/haven cargo bench --bench scaleout
//! ```
//!
//! Environment:
//! - `HAVEN_BIN`               the haven binary (default `<manifest dir>/target/release/haven`)
//! - `HAVEN_BENCH_MOVES`       live moves, default 60
//! - `HAVEN_BENCH_FAILOVERS`   SIGKILL rounds, default 3
//! - `HAVEN_BENCH_DISK`        size of each of the four disks, default `64MiB`
//! - `HAVEN_BENCH_WRITE_KBPS`  total rate of the writer thread in KB/s, default 4000
//! - `HAVEN_BENCH_MOVE_GAP_MS` a seeded random pause of 0..N ms before each move, default
//!   1000 (0: back to back, which phase-locks the agents' long polls to the moves and hides
//!   their hold, see BENCHMARKS.md)
//! - `HAVEN_BENCH_SEED`        generator seed, default 42
//! - `HAVEN_BENCH_KEEP=1`      keep the temporary directory (logs, images) afterwards
use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use haven_testkit::{
    bench::{
        disk_size_from_env, env_flag, env_num, haven_bin, in_temp_dir, path_str, print_header, MB,
        MIB,
    },
    fmt_stat, free_udp_port, generate_disk, loadavg, machine_desc, stat, str_field, u64_field,
    verify_same, Ctl, Procs, Res, Rng,
};

const MACHINES: [&str; 4] = ["m0", "m1", "m2", "m3"];
const PROCESS_SERVERS: [&str; 3] = ["ps1", "ps2", "ps3"];
const MASTER_TARGET: &str = "mt1";
const CONFIG: &str = "config";

// Targets from the issue.
const TARGET_PAUSE_P99_MS: f64 = 1000.0;
const TARGET_RESUME_SECS: f64 = 10.0;
/// The configuration node's default `--failure-timeout`.
const FAILURE_TIMEOUT_SECS: f64 = 5.0;

fn main() -> ExitCode {
    haven_testkit::bench::main("scale-out benchmark", "scaleout", run)
}

// ---------------------------------------------------------------------------------------
// Configuration

struct Config {
    bin: PathBuf,
    disk_size: u64,
    moves: usize,
    failovers: usize,
    write_bps: u64,
    move_gap_ms: u64,
    seed: u64,
    keep: bool,
}

impl Config {
    fn from_env() -> Res<Self> {
        let bin = haven_bin(env!("CARGO_MANIFEST_DIR"))?;
        let disk_size = disk_size_from_env(64 << 20, 8 << 20)?;
        Ok(Self {
            bin,
            disk_size,
            moves: env_num("HAVEN_BENCH_MOVES", 60)? as usize,
            failovers: env_num("HAVEN_BENCH_FAILOVERS", 3)? as usize,
            write_bps: env_num("HAVEN_BENCH_WRITE_KBPS", 4000)?.max(1) * 1000,
            move_gap_ms: env_num("HAVEN_BENCH_MOVE_GAP_MS", 1000)?,
            seed: env_num("HAVEN_BENCH_SEED", 42)?,
            keep: env_flag("HAVEN_BENCH_KEEP"),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic data (the generator of benches/pipeline.rs)

// ---------------------------------------------------------------------------------------
// The writer thread

/// Random 4–64 KiB writes at random offsets, one per disk per round, paced to `bps` in total;
/// stops on its flag (set on drop too, so an error path never leaves it running) and after
/// at most `MAX_SECS` whatever happens.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<Vec<AtomicU64>>,
    handle: Option<JoinHandle<Res<u64>>>,
}

impl Writer {
    const MAX_SECS: u64 = 900;

    fn start(disks: &[PathBuf], size: u64, bps: u64, seed: u64) -> Res<Self> {
        let files = disks
            .iter()
            .map(|d| {
                OpenOptions::new()
                    .write(true)
                    .open(d)
                    .map_err(|e| format!("open {}: {e}", d.display()))
            })
            .collect::<Res<Vec<File>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let written: Arc<Vec<AtomicU64>> =
            Arc::new(disks.iter().map(|_| AtomicU64::new(0)).collect());
        let (s, w) = (stop.clone(), written.clone());
        let handle = std::thread::spawn(move || -> Res<u64> {
            let mut rng = Rng::new(seed);
            let mut buf = vec![0u8; 64 << 10];
            let t0 = Instant::now();
            let mut total = 0u64;
            // Bounded: never more than MAX_SECS, whatever the flag says.
            while !s.load(Ordering::Relaxed) && t0.elapsed().as_secs() < Self::MAX_SECS {
                for (f, n) in files.iter().zip(w.iter()) {
                    let len = (4096 + rng.below((64 << 10) - 4096 + 1)) as usize;
                    let off = rng.below64(size - len as u64);
                    rng.fill(&mut buf[..len]);
                    f.write_all_at(&buf[..len], off)
                        .map_err(|e| format!("writer: {e}"))?;
                    n.fetch_add(len as u64, Ordering::Relaxed);
                    total += len as u64;
                }
                // Pace: sleep until the total matches the rate.
                let due = Duration::from_secs_f64(total as f64 / bps as f64);
                let el = t0.elapsed();
                if due > el {
                    std::thread::sleep((due - el).min(Duration::from_millis(200)));
                }
            }
            Ok(total)
        });
        Ok(Self {
            stop,
            written,
            handle: Some(handle),
        })
    }

    fn written(&self) -> Vec<u64> {
        self.written
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    fn stop(&mut self) -> Res<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| "the writer thread panicked".to_string())?,
            None => Ok(0),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Timed `ctl` calls (the processes and the other calls are haven_testkit's `Procs` and `Ctl`)

/// Like `ctl.call`, and also the unix times at which the JSON answer was complete on stdout
/// and at which the process exited (`ctl` closes its QUIC connection gracefully first).
fn call_timed(ctl: &Ctl, args: &[&str]) -> Res<(Value, f64, f64)> {
    use std::io::Read;
    let mut child = ctl
        .command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run haven ctl: {e}"))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut buf = vec![];
    let mut chunk = [0u8; 4096];
    let mut printed = None;
    loop {
        let n = out
            .read(&mut chunk)
            .map_err(|e| format!("read ctl stdout: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if printed.is_none() && serde_json::from_slice::<Value>(&buf).is_ok() {
            printed = Some(unix_now());
        }
    }
    let status = child.wait().map_err(|e| format!("wait haven ctl: {e}"))?;
    let exited = unix_now();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let v = Ctl::answer(args, status, &buf, err.as_bytes())?;
    Ok((v, printed.unwrap_or(exited), exited))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// Logs: the default `tracing_subscriber::fmt` lines start with an RFC 3339 UTC timestamp
// (`2026-11-26T16:43:52.123456Z`), which lets the bench place the configuration node's
// decision and the agent's switch on the same clock as its own `ctl` calls.

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Unix seconds of a log line's leading timestamp.
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, mo, da) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let h: f64 = t.next()?.parse().ok()?;
    let mi: f64 = t.next()?.parse().ok()?;
    let s: f64 = t.next()?.parse().ok()?;
    Some(days_from_civil(y, mo, da) as f64 * 86400.0 + h * 3600.0 + mi * 60.0 + s)
}

/// Strips ANSI colour codes (in case the subscriber decided to use them).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `key=value` of a tracing line (value up to the next space). The last occurrence: the
/// event's own fields come after its spans' (`stream{… generation=5}: … generation=7`).
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix(pat.as_str()))
        .next_back()
}

/// (machine, generation) -> unix time of the configuration node's decision (its event log
/// line: `kind=move machine=m0 ... generation=7 operator request`).
fn decisions(config_log: &Path) -> HashMap<(String, u64), f64> {
    let s = std::fs::read_to_string(config_log).unwrap_or_default();
    let mut m = HashMap::new();
    for line in s.lines().map(strip_ansi) {
        let (Some(t), Some(mach), Some(g)) = (
            log_time(&line),
            log_field(&line, "machine"),
            log_field(&line, "generation").and_then(|g| g.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if log_field(&line, "kind").is_some() {
            m.insert((mach.to_string(), g), t);
        }
    }
    m
}

/// generation -> unix time at which the agent logged "moved to process server" (the end
/// of the pause it reports).
fn switches(agent_log: &Path) -> HashMap<u64, f64> {
    let s = std::fs::read_to_string(agent_log).unwrap_or_default();
    let mut m = HashMap::new();
    for line in s.lines().map(strip_ansi) {
        if !line.contains("moved to process server") {
            continue;
        }
        if let (Some(t), Some(g)) = (
            log_time(&line),
            log_field(&line, "generation").and_then(|g| g.parse::<u64>().ok()),
        ) {
            m.insert(g, t);
        }
    }
    m
}

// ---------------------------------------------------------------------------------------
// Statistics and output

/// Nearest-rank percentile (p in 0..=1) of unsorted values.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn pcts(v: &[f64], prec: usize) -> String {
    format!(
        "p50 {:.p$} / p90 {:.p$} / p99 {:.p$} / max {:.p$}",
        percentile(v, 0.5),
        percentile(v, 0.9),
        percentile(v, 0.99),
        percentile(v, 1.0),
        p = prec
    )
}

fn opt_u64(v: &Value) -> String {
    v.as_u64()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "null".into())
}

// ---------------------------------------------------------------------------------------
// The run

struct MoveRun {
    machine: String,
    generation: u64,
    pause_ms: f64,
    bytes_resent: u64,
    /// Wall time of the `ctl move` subprocess.
    wall_ms: f64,
    /// Unix times: `ctl move` started, printed its answer, exited.
    started: f64,
    printed: f64,
    ended: f64,
}

struct FailoverRun {
    victim: String,
    /// Kill → `ctl machines` shows every machine on another process server.
    reassigned: f64,
    /// Kill → every `applied_seq` above its value at the kill.
    resumed: f64,
    /// Kill → every `applied_seq` above the `captured_seq` reported ≥ 2.5 s after the kill.
    resumed_strict: f64,
    /// Kill → the configuration node's failover event (from its log).
    detected: Option<f64>,
    /// The victim's last report as the configuration node saw it, relative to the kill
    /// (from `ctl nodes` `last_seen_ms_ago` ~1.5 s after the kill; ±0.1 s).
    last_seen: Option<f64>,
    /// Kill → the last agent logged its switch to the new process server (end of its pause).
    agents_switched: Option<f64>,
    /// Raw bytes sent (all agents, from their reports) / bytes written, between the
    /// snapshot before the kill and the end of the round.
    sent_written: (u64, u64),
    /// The failover events' pause_ms and bytes_resent (null when the agent reported nothing).
    events: Vec<(String, Value, Value)>,
    restart_alive: f64,
}

fn run() -> Res<()> {
    let cfg = Config::from_env()?;
    in_temp_dir("haven-scaleout-", cfg.keep, |dir| bench(&cfg, dir))
}

fn bench(cfg: &Config, dir: &Path) -> Res<()> {
    let bench_t0 = Instant::now();
    let start_load = print_header("haven scale-out benchmark", &machine_desc(), &cfg.bin, dir);

    // ---- disks
    let mut disks = vec![];
    let t = Instant::now();
    let mut nonzero = 0;
    for (i, m) in MACHINES.iter().enumerate() {
        let d = dir.join(format!("{m}.img"));
        let s = generate_disk(&d, cfg.disk_size, cfg.seed + i as u64)?;
        nonzero += s.nonzero_bytes;
        println!(
            "  {m}: {:.0} MiB disk: {:.0} MiB text, {:.0} MiB structured, {:.0} MiB random, {:.0} MiB zero holes; {:.1} MiB non-zero",
            cfg.disk_size as f64 / MIB,
            s.text as f64 / MIB,
            s.structured as f64 / MIB,
            s.random as f64 / MIB,
            s.zero as f64 / MIB,
            s.nonzero_bytes as f64 / MIB
        );
        disks.push(d);
    }
    println!("generated 4 disks in {:.1}s", t.elapsed().as_secs_f64());

    // ---- the cluster
    let mut procs = Procs::new(&cfg.bin, dir);
    let config_dir = dir.join(CONFIG);
    let port = free_udp_port()?;
    let addr = format!("127.0.0.1:{port}");
    let s = |x: &str| x.to_string();
    procs.start(
        CONFIG,
        &[
            s("node"),
            s("--role"),
            s("configuration"),
            s("--no-auto-rebalance"),
            s("--data-dir"),
            path_str(&config_dir)?.into(),
            s("--listen"),
            addr.clone(),
            s("--name"),
            s(CONFIG),
        ],
    )?;
    let ctl = procs.configuration_ready(&addr, &config_dir)?;
    let agent_token = config_dir.join("agent-token");
    let node_token = config_dir.join("node-token");
    let servers: Vec<(&str, &str)> = PROCESS_SERVERS
        .iter()
        .map(|p| (*p, "process"))
        .chain([(MASTER_TARGET, "master-target")])
        .collect();
    for (name, role) in &servers {
        let p = free_udp_port()?;
        procs.start(
            name,
            &[
                s("node"),
                s("--role"),
                s(role),
                s("--join"),
                addr.clone(),
                s("--token-file"),
                path_str(&node_token)?.into(),
                s("--data-dir"),
                path_str(&dir.join(name))?.into(),
                s("--listen"),
                format!("127.0.0.1:{p}"),
                s("--name"),
                s(name),
            ],
        )?;
    }
    for (name, _) in &servers {
        procs.wait_until(
            &format!("node {name} alive"),
            Duration::from_secs(30),
            || ctl.node_alive(name),
        )?;
    }
    for (m, d) in MACHINES.iter().zip(&disks) {
        procs.start(
            &format!("agent-{m}"),
            &[
                s("agent"),
                s("--join"),
                addr.clone(),
                s("--token-file"),
                path_str(&agent_token)?.into(),
                s("--data-dir"),
                path_str(&dir.join(format!("agent-{m}")))?.into(),
                s("--disk"),
                format!("root={}", d.display()),
                s("--name"),
                s(m),
                s("--scan-interval"),
                s("1s"),
            ],
        )?;
    }
    procs.wait_until("all four agents to enroll", Duration::from_secs(30), || {
        Ok(ctl.machines()?.len() == MACHINES.len())
    })?;
    let mut ctl_secs = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        ctl.call(&["status"])?;
        ctl_secs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let ctl_ms = stat(&ctl_secs);
    println!(
        "\ncluster: configuration node on {addr} (--no-auto-rebalance), {}, {MASTER_TARGET}, 4 agents (--scan-interval 1s); one `ctl status` call takes {} ms",
        PROCESS_SERVERS.join(", "),
        fmt_stat(ctl_ms, 0)
    );

    // ---- protect and initial sync
    let t = Instant::now();
    for m in MACHINES {
        let r = ctl.call(&["protect", m])?;
        println!("  {}", str_field(&r, "message"));
    }
    for m in MACHINES {
        let ws = ctl.call(&["wait-sync", m, "--timeout", "300s"])?;
        if ws["synced"] != true {
            return Err(format!("wait-sync {m} after protect: {ws}"));
        }
    }
    let initial_secs = t.elapsed().as_secs_f64();
    let replica = |m: &str| {
        dir.join(MASTER_TARGET)
            .join("replicas")
            .join(m)
            .join("root.img")
    };
    for (m, d) in MACHINES.iter().zip(&disks) {
        verify_same(d, &replica(m), &format!("the initial sync of {m}"))?;
    }
    println!(
        "initial sync of 4 machines ({:.0} MiB non-zero in all): {:.1}s to protect + wait-sync all; replicas verified with cmp",
        nonzero as f64 / MIB,
        initial_secs
    );
    let ms = ctl.machines()?;
    let mut placement: HashMap<String, String> = MACHINES
        .iter()
        .map(|m| {
            (
                m.to_string(),
                ms.get(*m)
                    .map(|v| str_field(v, "process_server").to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let sent_before: Vec<u64> = MACHINES
        .iter()
        .map(|m| {
            ms.get(*m)
                .map(|v| u64_field(v, "raw_bytes_sent"))
                .unwrap_or(0)
        })
        .collect();

    // ---- writes
    let mut writer = Writer::start(&disks, cfg.disk_size, cfg.write_bps, cfg.seed ^ 0x5717)?;
    println!(
        "\nwriter: random 4–64 KiB chunks to all 4 disks, {:.1} MB/s in total",
        cfg.write_bps as f64 / MB
    );
    std::thread::sleep(Duration::from_secs(2));

    // ---- (1) live moves
    println!("\nlive moves ({}):", cfg.moves);
    let mut moves: Vec<MoveRun> = vec![];
    let moves_t0 = Instant::now();
    let mut gap_rng = Rng::new(cfg.seed ^ 0x6a9);
    for i in 0..cfg.moves {
        procs.check_alive()?;
        if cfg.move_gap_ms > 0 {
            // Moves at arbitrary moments, not in step with the agents' poll cycle.
            std::thread::sleep(Duration::from_millis(gap_rng.below(cfg.move_gap_ms + 1)));
        }
        let m = MACHINES[i % MACHINES.len()];
        let cur = placement[m].clone();
        let ci = PROCESS_SERVERS
            .iter()
            .position(|p| *p == cur)
            .ok_or_else(|| format!("{m} is on {cur:?}, not one of the process servers"))?;
        // Round-robin: +1 in even rounds over the machines, +2 in odd ones.
        let to = PROCESS_SERVERS[(ci + 1 + (i / MACHINES.len()) % 2) % PROCESS_SERVERS.len()];
        let started = unix_now();
        let t = Instant::now();
        let (ev, printed, ended) = call_timed(&ctl, &["move", m, "--to", to])?;
        let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
        let pause_ms = ev["pause_ms"]
            .as_u64()
            .ok_or_else(|| format!("move {i}: no pause_ms in {ev}"))? as f64;
        let bytes_resent = ev["bytes_resent"]
            .as_u64()
            .ok_or_else(|| format!("move {i}: no bytes_resent in {ev}"))?;
        println!(
            "  move {:>2}: {m} {cur} -> {to} (gen {}): pause {:>4} ms, {:>8} bytes resent, `ctl move` {:>5.0} ms",
            i + 1,
            ev["generation"],
            pause_ms,
            bytes_resent,
            wall_ms
        );
        placement.insert(m.to_string(), to.to_string());
        moves.push(MoveRun {
            machine: m.to_string(),
            generation: u64_field(&ev, "generation"),
            pause_ms,
            bytes_resent,
            wall_ms,
            started,
            printed,
            ended,
        });
    }
    let moves_secs = moves_t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1500)); // let the agents report what they sent
    let ms = ctl.machines()?;
    let moves_sent: u64 = ms
        .values()
        .map(|v| u64_field(v, "raw_bytes_sent"))
        .sum::<u64>()
        .saturating_sub(sent_before.iter().sum());
    let moves_written: u64 = writer.written().iter().sum();
    for m in MACHINES {
        let now = ms
            .get(m)
            .map(|v| str_field(v, "process_server"))
            .unwrap_or("?");
        if now != placement[m] {
            return Err(format!(
                "{m} is on {now} according to `ctl machines`, the bench moved it to {}",
                placement[m]
            ));
        }
    }

    // ---- (2) failover
    let mut failovers: Vec<FailoverRun> = vec![];
    for r in 0..cfg.failovers {
        let victim = PROCESS_SERVERS[r % PROCESS_SERVERS.len()];
        println!(
            "\nfailover round {}: every machine onto {victim}, then SIGKILL it",
            r + 1
        );
        for m in MACHINES {
            if placement[m] != victim {
                let ev = ctl.call(&["move", m, "--to", victim])?;
                println!(
                    "  move {m} {} -> {victim}: pause {} ms, {} bytes resent",
                    placement[m], ev["pause_ms"], ev["bytes_resent"]
                );
                placement.insert(m.to_string(), victim.to_string());
            }
        }
        std::thread::sleep(Duration::from_secs(2)); // let writes flow through the victim
        let events_before = ctl.array("events")?.len();
        let before = ctl.machines()?;
        let sent0: u64 = before
            .values()
            .map(|v| u64_field(v, "raw_bytes_sent"))
            .sum();
        let written0: u64 = writer.written().iter().sum();
        let applied0: Vec<u64> = MACHINES
            .iter()
            .map(|m| {
                before
                    .get(*m)
                    .map(|v| u64_field(v, "applied_seq"))
                    .unwrap_or(0)
            })
            .collect();
        let kill_unix = unix_now();
        let killed = Instant::now();
        procs.kill(victim)?;
        let mut reassigned = None;
        let mut resumed = None;
        let mut resumed_strict = None;
        let mut strict_floor: Option<Vec<u64>> = None;
        let mut last_seen = None;
        while reassigned.is_none() || resumed.is_none() || resumed_strict.is_none() {
            procs.check_alive()?;
            if killed.elapsed() > Duration::from_secs(90) {
                return Err(format!(
                    "round {}: replication did not resume within 90 s of killing {victim}; machines: {:?}",
                    r + 1,
                    ctl.machines()
                ));
            }
            let call_started = killed.elapsed().as_secs_f64();
            if last_seen.is_none() && call_started >= 1.5 && reassigned.is_none() {
                // How recent the victim's last "report" is, by the configuration node.
                if let Ok(nodes) = ctl.array("nodes") {
                    if let Some(ago) = nodes
                        .iter()
                        .find(|n| n["name"] == victim)
                        .and_then(|n| n["last_seen_ms_ago"].as_u64())
                    {
                        last_seen = Some(call_started - ago as f64 / 1000.0);
                    }
                }
                continue;
            }
            let ms = match ctl.machines() {
                Ok(ms) => ms,
                Err(_) => continue,
            };
            let at = killed.elapsed().as_secs_f64();
            let applied: Vec<u64> = MACHINES
                .iter()
                .map(|m| ms.get(*m).map(|v| u64_field(v, "applied_seq")).unwrap_or(0))
                .collect();
            if reassigned.is_none()
                && MACHINES.iter().all(|m| {
                    ms.get(*m)
                        .is_some_and(|v| str_field(v, "process_server") != victim)
                })
            {
                reassigned = Some(at);
            }
            if resumed.is_none() && applied.iter().zip(&applied0).all(|(a, b)| a > b) {
                resumed = Some(at);
            }
            if strict_floor.is_none() && call_started >= 2.5 {
                // Everything the victim could have received was captured before the kill, so
                // it is covered by the captured_seq the agents report 2.5 s later (a report
                // can be ~1.1 s old: a held poll is answered with the report it arrived with).
                strict_floor = Some(
                    MACHINES
                        .iter()
                        .map(|m| {
                            ms.get(*m)
                                .map(|v| u64_field(v, "captured_seq"))
                                .unwrap_or(0)
                        })
                        .collect(),
                );
            } else if let Some(f) = &strict_floor {
                if resumed_strict.is_none() && applied.iter().zip(f).all(|(a, b)| a > b) {
                    resumed_strict = Some(at);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (reassigned, resumed, resumed_strict) = (
            reassigned.expect("set"),
            resumed.expect("set"),
            resumed_strict.expect("set"),
        );
        let ms = ctl.machines()?;
        for m in MACHINES {
            placement.insert(
                m.to_string(),
                ms.get(m)
                    .map(|v| str_field(v, "process_server").to_string())
                    .unwrap_or_default(),
            );
        }
        // The failover events of this round, once their agents reported (or 15 s passed).
        let mut events = vec![];
        let _ = procs.wait_until(
            "the failover events' figures",
            Duration::from_secs(15),
            || {
                let all = ctl.array("events")?;
                events = all
                    .into_iter()
                    .skip(events_before)
                    .filter(|e| e["kind"] == "failover")
                    .collect();
                Ok(events.len() >= MACHINES.len()
                    && events
                        .iter()
                        .all(|e| !e["pause_ms"].is_null() && !e["bytes_resent"].is_null()))
            },
        );
        let detected = decisions(&procs.log(CONFIG))
            .into_iter()
            .filter(|((m, g), _)| {
                events
                    .iter()
                    .any(|e| e["machine"] == m.as_str() && u64_field(e, "generation") == *g)
            })
            .map(|(_, t)| t - kill_unix)
            .min_by(|a, b| a.total_cmp(b));
        let agents_switched = {
            let mut latest: Option<f64> = None;
            for e in &events {
                let m = str_field(e, "machine");
                match switches(&procs.log(&format!("agent-{m}"))).get(&u64_field(e, "generation")) {
                    Some(t) => latest = Some(latest.map_or(*t, |l: f64| l.max(*t))),
                    None => {
                        latest = None;
                        break;
                    }
                }
            }
            latest
                .filter(|_| events.len() >= MACHINES.len())
                .map(|t| t - kill_unix)
        };
        let dec = decisions(&procs.log(CONFIG));
        let events: Vec<(String, Value, Value)> = events
            .iter()
            .map(|e| {
                let (m, g) = (str_field(e, "machine"), u64_field(e, "generation"));
                // The agent noticed the new assignment at (switch logged − pause).
                let noticed = match (
                    dec.get(&(m.to_string(), g)),
                    switches(&procs.log(&format!("agent-{m}"))).get(&g),
                    e["pause_ms"].as_u64(),
                ) {
                    (Some(d), Some(sw), Some(p)) => format!(
                        " (event +{:.2}s after the kill; agent noticed it +{:.0} ms later, switched +{:.0} ms later)",
                        d - kill_unix,
                        (sw - p as f64 / 1000.0 - d) * 1000.0,
                        (sw - d) * 1000.0
                    ),
                    _ => String::new(),
                };
                (
                    format!(
                        "{m} {} -> {}{noticed}",
                        str_field(e, "from"),
                        str_field(e, "to")
                    ),
                    e["pause_ms"].clone(),
                    e["bytes_resent"].clone(),
                )
            })
            .collect();
        let secs = |x: Option<f64>| x.map(|d| format!("{d:.2}s")).unwrap_or_else(|| "?".into());
        println!(
            "  killed {victim}: its last report counted {} after the kill; failover event logged after {}; agents switched (log) after {}; `ctl machines`: every machine elsewhere after {reassigned:.2}s, applied_seq moved on after {resumed:.2}s (beyond the captured_seq of 2.5 s after the kill: {resumed_strict:.2}s)",
            secs(last_seen),
            secs(detected),
            secs(agents_switched),
        );
        for (what, p, b) in &events {
            println!(
                "    failover {what}: pause_ms {}, bytes_resent {}",
                opt_u64(p),
                opt_u64(b)
            );
        }
        if events.len() < MACHINES.len() {
            println!(
                "    note: only {} failover events after 15 s (expected {})",
                events.len(),
                MACHINES.len()
            );
        }
        let ms = ctl.machines()?;
        let sent1: u64 = ms.values().map(|v| u64_field(v, "raw_bytes_sent")).sum();
        let written1: u64 = writer.written().iter().sum();
        let sent_written = (sent1.saturating_sub(sent0), written1 - written0);
        println!(
            "    raw bytes sent / written since the snapshot before the kill: {:.1} / {:.1} MB ({:.2}x)",
            sent_written.0 as f64 / MB,
            sent_written.1 as f64 / MB,
            sent_written.0 as f64 / sent_written.1.max(1) as f64
        );
        procs.restart(victim)?;
        let restart_alive = procs
            .wait_until(
                &format!("{victim} alive again"),
                Duration::from_secs(60),
                || ctl.node_alive(victim),
            )?
            .as_secs_f64();
        println!("  restarted {victim}: alive again after {restart_alive:.2}s");
        failovers.push(FailoverRun {
            victim: victim.to_string(),
            reassigned,
            resumed,
            resumed_strict,
            detected,
            last_seen,
            agents_switched,
            sent_written,
            events,
            restart_alive,
        });
    }

    // ---- (3) converge and verify
    let written = writer.stop()?;
    println!(
        "\nwrites stopped: {:.1} MB written in all",
        written as f64 / MB
    );
    let t = Instant::now();
    for m in MACHINES {
        let ws = ctl.call(&["wait-sync", m, "--timeout", "300s"])?;
        if ws["synced"] != true {
            return Err(format!("final wait-sync {m}: {ws}"));
        }
    }
    let final_sync = t.elapsed().as_secs_f64();
    for (m, d) in MACHINES.iter().zip(&disks) {
        verify_same(d, &replica(m), &format!("the moves and failovers of {m}"))?;
    }
    println!(
        "final wait-sync of all 4 machines {final_sync:.2}s; every replica verified byte-identical with cmp"
    );
    let ms = ctl.machines()?;
    let sent_after: Vec<u64> = MACHINES
        .iter()
        .map(|m| {
            ms.get(*m)
                .map(|v| u64_field(v, "raw_bytes_sent"))
                .unwrap_or(0)
        })
        .collect();
    let all_events = ctl.array("events")?;
    let end_load = loadavg();

    // ---- timeline of the moves from the logs: request → decision → agent notices →
    // agent switched (pause) → ctl returns.
    let dec = decisions(&procs.log(CONFIG));
    let sw: HashMap<String, HashMap<u64, f64>> = MACHINES
        .iter()
        .map(|m| (m.to_string(), switches(&procs.log(&format!("agent-{m}")))))
        .collect();
    let (mut to_decision, mut delivery, mut after_switch, mut teardown) =
        (vec![], vec![], vec![], vec![]);
    for mv in &moves {
        let (Some(d), Some(s)) = (
            dec.get(&(mv.machine.clone(), mv.generation)),
            sw.get(&mv.machine).and_then(|x| x.get(&mv.generation)),
        ) else {
            continue;
        };
        let noticed = s - mv.pause_ms / 1000.0;
        to_decision.push((d - mv.started) * 1000.0);
        delivery.push((noticed - d) * 1000.0);
        after_switch.push((mv.printed - s) * 1000.0);
        teardown.push((mv.ended - mv.printed) * 1000.0);
    }
    drop(writer);
    drop(procs); // stop haven before printing the table

    // ---- the table
    let pauses: Vec<f64> = moves.iter().map(|m| m.pause_ms).collect();
    let walls: Vec<f64> = moves.iter().map(|m| m.wall_ms).collect();
    let overhead: Vec<f64> = moves.iter().map(|m| m.wall_ms - m.pause_ms).collect();
    let resent: Vec<f64> = moves.iter().map(|m| m.bytes_resent as f64).collect();
    let resent_total: u64 = moves.iter().map(|m| m.bytes_resent).sum();
    let with_resend = moves.iter().filter(|m| m.bytes_resent > 0).count();
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    let p99 = percentile(&pauses, 0.99);
    println!(
        "\n=== results: 4 machines × {:.0} MiB, 3 process servers, writes {:.1} MB/s in total; {} moves (random gaps 0–{} ms) in {:.0}s, {} failover rounds; total bench time {:.0}s ===",
        cfg.disk_size as f64 / MIB,
        cfg.write_bps as f64 / MB,
        moves.len(),
        cfg.move_gap_ms,
        moves_secs,
        failovers.len(),
        bench_t0.elapsed().as_secs_f64()
    );
    println!("{:<58} {:>52} {:>22}", "metric", "haven", "target");
    let row = |m: &str, h: String, t: String| println!("{m:<58} {h:>52} {t:>22}");
    if !moves.is_empty() {
        row(
            "move pause, ms (agent: noticed → new PS acked)",
            pcts(&pauses, 0),
            format!(
                "p99 <{TARGET_PAUSE_P99_MS:.0}: {}",
                verdict(p99 < TARGET_PAUSE_P99_MS)
            ),
        );
        row(
            "bytes resent per move",
            format!(
                "p50 {:.0} / max {:.0}; {with_resend} of {} moves resent",
                percentile(&resent, 0.5),
                percentile(&resent, 1.0),
                moves.len()
            ),
            "".into(),
        );
        row(
            "bytes resent, all moves",
            format!("{resent_total} ({:.2} MB)", resent_total as f64 / MB),
            "".into(),
        );
        row("`ctl move` wall time, ms", pcts(&walls, 0), "".into());
        row(
            "`ctl move` wall minus pause, ms",
            pcts(&overhead, 0),
            "".into(),
        );
        if !delivery.is_empty() {
            row(
                "  ctl start → config decision (log), ms",
                pcts(&to_decision, 0),
                "".into(),
            );
            row(
                "  config decision → agent noticed (log − pause), ms",
                pcts(&delivery, 0),
                "".into(),
            );
            row(
                "  agent switched → `ctl move` printed (report + poll), ms",
                pcts(&after_switch, 0),
                "".into(),
            );
            row(
                "  `ctl move` printed → exited (QUIC close), ms",
                pcts(&teardown, 0),
                "".into(),
            );
            if delivery.len() < moves.len() {
                row(
                    "  (moves placed on the log timeline)",
                    format!("{} of {}", delivery.len(), moves.len()),
                    "".into(),
                );
            }
        }
        row(
            "one `ctl status` call (process start + connect), ms",
            fmt_stat(ctl_ms, 0),
            "".into(),
        );
    }
    if !failovers.is_empty() {
        let resumed = stat(&failovers.iter().map(|f| f.resumed).collect::<Vec<_>>());
        row(
            "failover: victim's last report counted after the kill, s",
            fmt_stat(
                stat(
                    &failovers
                        .iter()
                        .filter_map(|f| f.last_seen)
                        .collect::<Vec<_>>(),
                ),
                2,
            ),
            "".into(),
        );
        row(
            "failover: SIGKILL → failover event logged, s",
            fmt_stat(
                stat(
                    &failovers
                        .iter()
                        .filter_map(|f| f.detected)
                        .collect::<Vec<_>>(),
                ),
                2,
            ),
            format!("timeout {FAILURE_TIMEOUT_SECS:.0}s"),
        );
        row(
            "failover: SIGKILL → all machines reassigned, s",
            fmt_stat(
                stat(&failovers.iter().map(|f| f.reassigned).collect::<Vec<_>>()),
                2,
            ),
            "".into(),
        );
        row(
            "failover: SIGKILL → all agents switched (their logs), s",
            fmt_stat(
                stat(
                    &failovers
                        .iter()
                        .filter_map(|f| f.agents_switched)
                        .collect::<Vec<_>>(),
                ),
                2,
            ),
            "".into(),
        );
        row(
            "failover: SIGKILL → replication resumed, s",
            fmt_stat(resumed, 2),
            format!(
                "<{TARGET_RESUME_SECS:.0}: {}",
                verdict(resumed.max < TARGET_RESUME_SECS)
            ),
        );
        row(
            "  … applied beyond captured_seq at kill+2.5s, s",
            fmt_stat(
                stat(
                    &failovers
                        .iter()
                        .map(|f| f.resumed_strict)
                        .collect::<Vec<_>>(),
                ),
                2,
            ),
            "".into(),
        );
        let fo_pause: Vec<f64> = failovers
            .iter()
            .flat_map(|f| f.events.iter().filter_map(|e| e.1.as_u64()))
            .map(|x| x as f64)
            .collect();
        let fo_bytes: Vec<u64> = failovers
            .iter()
            .flat_map(|f| f.events.iter().filter_map(|e| e.2.as_u64()))
            .collect();
        let n_events: usize = failovers.iter().map(|f| f.events.len()).sum();
        row(
            "failover events: pause_ms (reported / events)",
            if fo_pause.is_empty() {
                format!("null in all {n_events}")
            } else {
                format!(
                    "{} ({} / {n_events})",
                    fmt_stat(stat(&fo_pause), 0),
                    fo_pause.len()
                )
            },
            "".into(),
        );
        row(
            "failover events: bytes_resent (reported / events)",
            if fo_bytes.is_empty() {
                format!("null in all {n_events}")
            } else {
                format!(
                    "{} in all, max {} ({} / {n_events})",
                    fo_bytes.iter().sum::<u64>(),
                    fo_bytes.iter().max().unwrap_or(&0),
                    fo_bytes.len()
                )
            },
            "".into(),
        );
        row(
            "killed server alive again after restart, s",
            fmt_stat(
                stat(
                    &failovers
                        .iter()
                        .map(|f| f.restart_alive)
                        .collect::<Vec<_>>(),
                ),
                2,
            ),
            "".into(),
        );
        for f in &failovers {
            let secs = |x: Option<f64>| x.map(|d| format!("{d:.2}s")).unwrap_or_else(|| "?".into());
            println!(
                "  round {}: {}: last report counted {}, event {}, agents switched {}, reassigned {:.2}s, resumed {:.2}s (strict {:.2}s)",
                failovers.iter().position(|x| std::ptr::eq(x, f)).unwrap_or(0) + 1,
                f.victim,
                secs(f.last_seen),
                secs(f.detected),
                secs(f.agents_switched),
                f.reassigned,
                f.resumed,
                f.resumed_strict
            );
        }
    }
    let sent: u64 = sent_after
        .iter()
        .zip(&sent_before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    row(
        "raw sent / written during the writes and moves, MB",
        format!(
            "{:.1} / {:.1} ({:.2}x)",
            moves_sent as f64 / MB,
            moves_written as f64 / MB,
            moves_sent as f64 / moves_written.max(1) as f64
        ),
        "".into(),
    );
    // What travels per byte written when nothing goes wrong (block rounding, coalescing):
    // the yardstick for what a failover sends twice.
    let moves_ratio = if moves_written > 0 {
        moves_sent as f64 / moves_written as f64
    } else {
        1.0
    };
    for (i, f) in failovers.iter().enumerate() {
        row(
            &format!("raw sent / written, failover round {}, MB", i + 1),
            format!(
                "{:.1} / {:.1} ({:.2}x); ~{:.1} MB sent twice",
                f.sent_written.0 as f64 / MB,
                f.sent_written.1 as f64 / MB,
                f.sent_written.0 as f64 / f.sent_written.1.max(1) as f64,
                (f.sent_written.0 as f64 - f.sent_written.1 as f64 * moves_ratio) / MB
            ),
            "".into(),
        );
    }
    row(
        "raw bytes sent after the initial sync / written, MB",
        format!(
            "{:.1} / {:.1} ({:.2}x)",
            sent as f64 / MB,
            written as f64 / MB,
            sent as f64 / written.max(1) as f64
        ),
        "no resync".into(),
    );

    println!(
        "events recorded by the configuration node: {} moves, {} failovers",
        all_events.iter().filter(|e| e["kind"] == "move").count(),
        all_events
            .iter()
            .filter(|e| e["kind"] == "failover")
            .count()
    );
    println!("load average at start / end: {start_load} / {end_load}");
    println!("scaleout bench OK (every replica verified byte-identical with cmp)");
    Ok(())
}
