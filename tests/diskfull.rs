//! The process server's cache disk runs out of space (ENOSPC) long before `--cache-size` is
//! reached: the agent is held back, nothing is lost, and the process server takes data again
//! once the master target applies what it cached and the cache is trimmed.
//!
//! The process server's data directory is a small tmpfs mounted by the test (we run as root;
//! without the right to mount, the test says why and skips). The whole data directory, not
//! only the cache, is on it, as on a real machine whose disk fills up.
mod common;

use std::{
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use haven_testkit::{make_disk, u64_of, wait_until};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Size of the process server's disk.
const TMPFS: u64 = 12 << 20;
/// Far above the disk, so the filesystem fills first.
const CACHE_SIZE: &str = "1GiB";
const DISK: u64 = 64 << 20;
/// Content before protection: its initial sync fits on the disk even if the master target
/// lags, so the disk fills only in the scenario, never during setup.
const CONTENT: u64 = 8 << 20;
/// Incompressible bytes written while the master target is down: more than the disk holds.
const WRITE: u64 = 40 << 20;
/// The agent's largest batch (`BATCH_BYTES` in roles/src/agent/mod.rs), sealed: when a batch
/// does not fit, at most this much of the disk is left free.
const BATCH: u64 = (4 << 20) + (64 << 10);
const SYNC: Duration = Duration::from_secs(60);
/// What the process server logs (once) when its cache disk is full.
const FULL: &str = "cache disk full";
/// What it logs when a write to the cache succeeds again.
const WRITABLE: &str = "cache writable again";
/// How long the test watches a process server that holds an agent back.
const HOLD: Duration = Duration::from_secs(3);

/// A tmpfs mounted for the test; lazily unmounted on drop, panics included.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    /// (used, size) in bytes.
    fn usage(&self) -> (u64, u64) {
        let path = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs {}", self.0.display());
        let frsize = st.f_frsize as u64;
        let size = st.f_blocks as u64 * frsize;
        (size - st.f_bfree as u64 * frsize, size)
    }
}

impl Tmpfs {
    /// Grows (or shrinks) the filesystem in place: space returns.
    fn resize(&self, bytes: u64) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "remount {} with size={bytes}",
            self.0.display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the process server may still have files open.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// User + system CPU time of a process, in milliseconds.
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1000 / hz
}

fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

/// `key=N` in a log line.
fn field(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"));
    line[at + key.len() + 1..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|e| panic!("{key}= in {line}: {e}"))
}

#[test]
fn a_full_cache_disk_holds_the_agent_back_and_loses_nothing() {
    let started = Instant::now();
    let mut c = Cluster::new();
    // Declared after the cluster, so dropped (unmounted) before it.
    let mnt = match Tmpfs::mount(&c.path("ps1"), TMPFS) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED a_full_cache_disk_holds_the_agent_back_and_loses_nothing: {why}");
            return;
        }
    };
    phase("process server on a 12 MiB tmpfs with --cache-size 1GiB; initial sync of 8 MiB");
    c.start_config(&["configuration"], vec![]);
    c.start_node_with("ps1", &["process"], &["--cache-size", CACHE_SIZE], vec![]);
    c.start_node("mt1", &["master-target"], vec![]);
    let disk = c.path("disk.img");
    make_disk(&disk, CONTENT, 21);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    c.start_agent("web01", &[("root", disk.as_path())]);
    c.ctl(&["protect", "web01"]);
    c.wait_sync("web01", SYNC);
    c.assert_replica("web01", &disk, &c.replica("mt1", "web01", "root"));
    assert_eq!(count(&c.log("ps1"), FULL), 0, "the setup fits on the disk");

    phase("master target down: 40 MiB of incompressible writes against a 12 MiB disk");
    let streams_before = count(&c.log("ps1"), "agent stream accepted");
    c.kill("mt1");
    let mut rng = StdRng::seed_from_u64(22);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for i in 0..WRITE >> 20 {
        let data: Vec<u8> = (0..1 << 20).map(|_| rng.gen()).collect();
        f.write_all_at(&data, i * (1 << 20) + 4096).unwrap();
    }
    f.sync_all().unwrap();
    let full_at = wait_until(
        "the process server reports its disk full",
        Duration::from_secs(60),
        || c.log("ps1").contains(FULL).then(Instant::now),
    );
    // Nothing is applied while the master target is down, so the agent retains everything
    // written since; the cache holds what fits on the disk. (Reports reach the configuration
    // node a little later than the log line.)
    let m = wait_until(
        "the agent retains all 40 MiB and the cache fills the disk",
        Duration::from_secs(60),
        || {
            let m = c.machine("web01")?;
            (u64_of(&m, "retained_bytes") >= WRITE && u64_of(&m, "cache_bytes") + BATCH >= TMPFS)
                .then_some(m)
        },
    );
    let (used, size) = mnt.usage();
    let (captured, cached) = (u64_of(&m, "captured_seq"), u64_of(&m, "cached_seq"));
    eprintln!(
        "disk {used} of {size} bytes used; cache {} bytes; agent retains {} bytes; \
         captured seq {captured}, cached seq {cached}",
        u64_of(&m, "cache_bytes"),
        u64_of(&m, "retained_bytes")
    );
    assert!(
        used + BATCH >= size,
        "the disk is full but for less than a batch: {used} of {size}"
    );
    assert!(
        captured > cached,
        "back-pressure: the agent holds what the cache cannot ({m})"
    );
    assert!(
        u64_of(&m, "cache_bytes") <= TMPFS,
        "the cache cannot exceed its disk: {m}"
    );
    c.assert_running();
    let log = c.log("ps1");
    assert_eq!(
        count(&log, "agent stream accepted"),
        streams_before,
        "the agent's stream is held, not dropped and reopened:\n{log}"
    );
    let full_lines: Vec<&str> = log.lines().filter(|l| l.contains(FULL)).collect();
    assert!(
        full_lines.len() == 1
            && full_lines[0].contains(" ERROR ")
            && full_lines[0].contains("No space left on device"),
        "the disk-full condition is logged once, as an error naming ENOSPC: {full_lines:#?}"
    );
    assert!(
        !log.contains("panicked"),
        "the process server did not panic:\n{log}"
    );

    phase("process server SIGKILLed and restarted on its full disk");
    c.kill("ps1");
    c.restart("ps1");
    wait_until(
        "the agent streams to the restarted process server",
        Duration::from_secs(30),
        || (count(&c.log("ps1"), "agent stream accepted") > streams_before).then_some(()),
    );
    wait_until(
        "the restarted process server reports its disk full",
        Duration::from_secs(30),
        || (count(&c.log("ps1"), FULL) == 2).then_some(()),
    );
    // A window to measure the held-back state: a writer retrying without backoff (or a
    // crash loop) would burn a core here.
    let (cpu0, t0) = (cpu_ms(c.pid("ps1")), Instant::now());
    std::thread::sleep(HOLD);
    let (cpu, wall) = (cpu_ms(c.pid("ps1")) - cpu0, t0.elapsed().as_millis() as u64);
    eprintln!("held back: the process server used {cpu} ms of CPU in {wall} ms");
    assert!(
        cpu * 2 < wall,
        "no busy retrying: {cpu} ms of CPU in {wall} ms"
    );
    let log = c.log("ps1");
    assert_eq!(count(&log, FULL), 2, "logged once per process");
    assert_eq!(count(&log, WRITABLE), 0, "still full");
    let m = c.machine("web01").unwrap();
    assert!(
        u64_of(&m, "cached_seq") >= cached && u64_of(&m, "cached_seq") < captured,
        "still held back, nothing cached lost: {m}"
    );

    phase("master target back: the cache drains, space frees, data flows again");
    let full_for = full_at.elapsed();
    c.restart("mt1");
    c.wait_sync("web01", SYNC);
    c.assert_replica("web01", &disk, &c.replica("mt1", "web01", "root"));
    wait_until(
        "the process server has cached everything the agent held",
        Duration::from_secs(10),
        || (u64_of(&c.machine("web01")?, "cached_seq") >= captured).then_some(()),
    );
    let log = c.log("ps1");
    let writable: Vec<&str> = log.lines().filter(|l| l.contains(WRITABLE)).collect();
    eprintln!("{}", writable.join("\n"));
    assert!(
        !writable.is_empty(),
        "the process server says when it takes data again"
    );
    // Retries back off (and wake when space frees) instead of spinning.
    for line in &writable {
        let (attempts, waited_ms) = (field(line, "attempts"), field(line, "waited_ms"));
        assert!(
            attempts <= 10 + waited_ms / 100,
            "{attempts} attempts in {waited_ms} ms: {line}"
        );
    }
    assert!(
        field(writable[0], "waited_ms") >= HOLD.as_millis() as u64,
        "the restarted process server held the agent back through the window: {}",
        writable[0]
    );
    let (used, size) = mnt.usage();
    eprintln!(
        "after the drain: disk {used} of {size} bytes used; it was full for {full_for:?} \
         until the master target came back"
    );
    assert!(used * 2 < size, "the cache was trimmed: {used} of {size}");
    c.assert_running();
    c.assert_no_unexpected_errors(&[FULL]);
    eprintln!("took {:?}", started.elapsed());
}

/// The master target's replica disk fills during an initial sync: a write that does not fit
/// is rolled back from the undo log (the replica stays at its durable cursor), the process
/// server holds the data and retries, nothing is lost, and replication resumes by itself once
/// space returns.
#[test]
fn a_full_replica_disk_loses_nothing_and_resumes_when_space_returns() {
    let mut c = Cluster::new();
    let fs = match Tmpfs::mount(&c.path("mt1"), 16 << 20) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!(
                "SKIPPED a_full_replica_disk_loses_nothing_and_resumes_when_space_returns: {why}"
            );
            return;
        }
    };
    c.start_config(&["configuration"], vec![]);
    c.start_node("ps1", &["process"], vec![]);
    c.start_node("mt1", &["master-target"], vec![]);
    // About 36 MiB of non-zero content: more than the master target's 16 MiB disk.
    let disk = c.path("m1.img");
    make_disk(&disk, 48 << 20, 5);
    c.start_agent("m1", &[("root", disk.as_path())]);
    c.ctl(&["protect", "m1"]);

    phase("the replica fills the master target's disk");
    wait_until("the master target hits ENOSPC", SYNC, || {
        c.log("mt1")
            .contains("No space left on device")
            .then_some(())
    });
    // Held, not lost: everything captured reaches the process server's cache, the replica
    // cannot take all of it, and every process stays up. (Batches that fit, e.g. into space a
    // rolled-back batch freed, may still be applied meanwhile.)
    let m = wait_until("everything captured is cached", SYNC, || {
        let m = c.machine("m1")?;
        (u64_of(&m, "cached_seq") == u64_of(&m, "captured_seq") && u64_of(&m, "captured_seq") > 0)
            .then_some(m)
    });
    let durable = read_cursor(&c.path("mt1/replicas/m1/state")).applied_seq;
    assert!(
        durable < u64_of(&m, "captured_seq"),
        "durable cursor {durable}: {m}"
    );
    c.assert_running();

    phase("space returns: replication resumes by itself");
    fs.resize(128 << 20);
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("mt1", "m1", "root"));
    c.assert_running();
    c.assert_no_unexpected_errors(&["No space left on device"]);
}
