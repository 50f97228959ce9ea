//! File systems and a database through the tap, with real tools and nothing mocked: the
//! agent's NBD export is mounted as a file by `nbdfuse`, a loop device is put over that file,
//! and `mkfs.ext4`, the kernel's ext4 and SQLite (Python's `sqlite3`, `synchronous=FULL`) write
//! through it. Every block the file system writes goes loop → FUSE → NBD → the tap, and every
//! flush the file system issues (a journal commit, an fsync) is an NBD FLUSH, so a recovery
//! point.
//!
//! - `ext4_…`: files of known content written and synced, then the file system frozen
//!   (`fsfreeze`, so it is clean on disk): after `wait-sync` the replica equals the disk
//!   (`cmp`), `fsck.ext4 -n -f` of the replica finds nothing, and the files read out of the
//!   replica with `debugfs` equal what was written. Then, with the file system mounted and
//!   live, a crash-consistent point is exported by `ctl test-failover --export` and checked the
//!   same way after the recovery a mount would do (journal replay).
//! - `sqlite_…`: a writer commits numbered transactions and records when each began and when
//!   its COMMIT returned; meanwhile 20 random crash-consistent points are drilled (by
//!   `--export`, and some through the NBD view): each must pass fsck, `PRAGMA integrity_check`,
//!   and hold every transaction committed before the point's time and none begun after it.
//! - `sqlite_through_a_whole_disaster_…`: the whole failover cycle with two sites and that
//!   workload: every primary-site process SIGKILLed, `ctl failover --point latest`, the
//!   recovery-site export mounted, fsck-clean and holding every transaction committed before
//!   the point, the workload going on there, `ctl reprotect` sending exactly the blocks that
//!   differ, `ctl failback`, the three disks byte-identical, SQLite at home holding both sites'
//!   transactions, and forward protection resumed with no full resync.
//!
//! A crash-consistent image of a mounted ext4 is the disk as a power cut would leave it: its
//! journal may hold committed transactions not yet written in place, and its orphan list may
//! name unlinked open files. A mount recovers both, so the checks first run the same recovery
//! on the (copied) image, `e2fsck -E journal_only -p`, which replays the journal and releases
//! orphans but repairs nothing else; then `fsck.ext4 -n -f` must exit 0.
//!
//! Teardown always unmounts, detaches the loop device and unmounts nbdfuse (drop guards, in
//! that order), even when an assertion fails. Where `/dev/fuse` or loop devices are not
//! available the tests say why and skip.
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::*;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SYNC: Duration = Duration::from_secs(120);
const PYTHON: &str = "/usr/bin/python3";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `prog args`; panics if it cannot start.
fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog} could not run (is it installed?): {e}"))
}

/// Runs `prog args` and panics with its output unless it exits 0; returns the output text.
fn must(prog: &str, args: &[&str]) -> String {
    let o = run(prog, args);
    let text = output_text(&o);
    assert!(o.status.success(), "{prog} {args:?} failed: {text}");
    text
}

fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Why FUSE or loop devices cannot be used here, if they cannot.
fn unavailable() -> Option<String> {
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return Some(format!("/dev/fuse cannot be opened: {e}"));
    }
    let out = Command::new("losetup").arg("-f").output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "no free loop device: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("losetup is not available: {e}")),
    }
}

/// Unmounts `dir` (FUSE with `fusermount3 -u` where installed; root may also `umount` it),
/// retrying while it is busy, lazily as a last resort.
fn unmount(dir: &Path, fuse: bool) {
    for _ in 0..50 {
        let mut cmd = if fuse && have("fusermount3") {
            let mut c = Command::new("fusermount3");
            c.arg("-u");
            c
        } else {
            Command::new("umount")
        };
        let ok = cmd
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("unmounting {} lazily", dir.display());
    let _ = Command::new("umount").arg("-l").arg(dir).status();
}

/// `nbdfuse DIR URI`: the NBD export as the file `DIR/nbd`, unmounted on drop.
struct NbdFuse {
    dir: PathBuf,
    child: Child,
}

impl NbdFuse {
    fn mount(dir: &Path, uri: &str, log: &Path) -> NbdFuse {
        fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let _ = fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .expect("nbdfuse must be installed (apt-get install nbdfuse)");
        let mut g = NbdFuse {
            dir: dir.to_path_buf(),
            child,
        };
        haven_testkit::wait_until("nbdfuse ready", Duration::from_secs(30), || {
            if let Some(st) = g.child.try_wait().unwrap() {
                panic!(
                    "nbdfuse exited ({st}): {}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
            (pidfile.exists() && g.file().exists()).then_some(())
        });
        g
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        unmount(&self.dir, true);
        // nbdfuse exits once unmounted.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mounted file system, unmounted on drop.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn new(dev: &str, dir: &Path) -> Mount {
        fs::create_dir_all(dir).unwrap();
        must("mount", &["-t", "ext4", dev, s(dir)]);
        Mount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unmount(&self.dir, false);
    }
}

/// `fsfreeze -f`: the file system is clean on disk and not written until thawed (on drop).
struct Frozen {
    dir: PathBuf,
}

impl Frozen {
    fn new(dir: &Path) -> Frozen {
        must("fsfreeze", &["-f", s(dir)]);
        Frozen {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.dir).status();
    }
}

/// A child process killed on drop (unless it has exited).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sparse_disk(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// A tap agent for `m` with disk d0 = `disk`, protected (with `protect_args`) and initially
/// synced.
fn protected_tap_agent(c: &mut Cluster, m: &str, disk: &Path, protect_args: &[&str]) -> String {
    c.start_tap_agent(m, disk, &[]);
    let mut args = vec!["protect", m];
    args.extend_from_slice(protect_args);
    c.ctl(&args);
    c.wait_sync(m, SYNC);
    c.tap_uri(m, "d0")
}

/// ext4 without lazy initialisation, so nothing writes in the background once it is mounted.
fn mkfs(dev: &str) {
    must(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            dev,
        ],
    );
}

/// `fsck.ext4 -n -f` must exit 0.
fn fsck_clean(img: &Path) {
    let o = run("fsck.ext4", &["-n", "-f", s(img)]);
    assert!(
        o.status.success(),
        "fsck.ext4 -n -f {} exited {}: {}",
        img.display(),
        o.status,
        output_text(&o)
    );
}

/// The recovery a mount does on a crash image (a copy: it is changed): replay the journal and
/// release orphans, nothing else. Exit 0 or 1 (the file system was changed) only.
fn recover(img: &Path) {
    let o = run("e2fsck", &["-E", "journal_only", "-p", s(img)]);
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "e2fsck -E journal_only -p {} exited {}: {}",
        img.display(),
        o.status,
        output_text(&o)
    );
}

/// A crash image made usable and checked: recovered like a mount would, then fsck-clean.
fn recover_and_check(img: &Path) {
    recover(img);
    fsck_clean(img);
}

/// The file at `path` in the ext4 image `img`, read with `debugfs` (no mount); None if absent.
fn debugfs_read(img: &Path, path: &str, scratch: &Path) -> Option<Vec<u8>> {
    let _ = fs::remove_file(scratch);
    let req = format!("dump {path} {}", scratch.display());
    let o = run("debugfs", &["-R", &req, s(img)]);
    assert!(o.status.success(), "debugfs {req}: {}", output_text(&o));
    if output_text(&o).contains("File not found") {
        return None;
    }
    let data = fs::read(scratch)
        .unwrap_or_else(|e| panic!("debugfs {req} wrote nothing ({e}): {}", output_text(&o)));
    let _ = fs::remove_file(scratch);
    Some(data)
}

fn points(c: &Cluster, m: &str) -> Vec<Value> {
    c.ctl(&["recovery-points", m])["points"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn point_id(p: &Value) -> String {
    p["point"]
        .as_str()
        .unwrap_or_else(|| panic!("a point id: {p}"))
        .to_string()
}

fn point_time(p: &Value) -> u64 {
    p["time_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("time_ms: {p}"))
}

/// `ctl test-failover M --point P --export DIR`: the image of d0.
fn export_point(c: &Cluster, m: &str, point: &str, dir: &Path) -> PathBuf {
    let v = c.ctl(&["test-failover", m, "--point", point, "--export", s(dir)]);
    assert_eq!(v["point"]["point"], point, "{v}");
    PathBuf::from(v["disks"][0]["image"].as_str().expect("an image path"))
}

/// `ctl test-failover M --point P`, its NBD view of d0 copied to `img` by `qemu-img convert`,
/// then `ctl test-failover-cleanup M`.
fn copy_point_over_nbd(c: &Cluster, m: &str, point: &str, img: &Path) {
    let v = c.ctl(&["test-failover", m, "--point", point]);
    assert_eq!(v["point"]["point"], point, "{v}");
    let uri = v["disks"][0]["nbd_uri"]
        .as_str()
        .expect("nbd_uri")
        .to_string();
    let o = run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, s(img)],
    );
    // Clean the drill before judging the copy.
    let cleaned = c.ctl(&["test-failover-cleanup", m]);
    assert!(o.status.success(), "qemu-img convert: {}", output_text(&o));
    assert_eq!(
        cleaned["overlay_bytes"], 0,
        "nothing wrote to the view: {cleaned}"
    );
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

#[test]
fn ext4_made_written_and_synced_through_the_tap_replicates_exactly_and_checks_clean() {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    sparse_disk(&disk, 128 * MIB);
    let uri = protected_tap_agent(&mut c, "m1", &disk, &[]);
    let replica = c.replica("config", "m1", "d0");

    phase("nbdfuse → loop → mkfs.ext4 → mount");
    // Declared in this order so that they drop (unmount, detach, unmount) in the reverse one.
    let fuse = NbdFuse::mount(&c.path("fuse"), &uri, &c.path("nbdfuse.log"));
    let Some(lo) = LoopDevice::attach(&fuse.file()) else {
        return;
    };
    mkfs(&lo.dev);
    let mnt = Mount::new(&lo.dev, &c.path("mnt"));

    phase("files of known content, written and synced");
    let mut rng = StdRng::seed_from_u64(81);
    fs::create_dir_all(mnt.dir.join("a/b")).unwrap();
    let sizes: [(&str, usize); 7] = [
        ("empty", 0),
        ("one", 1),
        ("page-minus-one", 4095),
        ("page", 4096),
        ("a/b/deep", 100_003),
        ("big", 5 * MIB as usize + 13),
        ("a/medium", 777_777),
    ];
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (name, len) in sizes {
        let data = random_bytes(&mut rng, len);
        fs::write(mnt.dir.join(name), &data).unwrap();
        files.insert(name.to_string(), data);
    }
    must("sync", &[]);

    let check_files = |img: &Path, files: &BTreeMap<String, Vec<u8>>, absent: &[&str]| {
        let scratch = c.path("dumped");
        for (name, data) in files {
            let got = debugfs_read(img, &format!("/{name}"), &scratch)
                .unwrap_or_else(|| panic!("/{name} is missing in {}", img.display()));
            assert!(
                got == *data,
                "/{name} in {} differs from what was written ({} bytes, {} expected)",
                img.display(),
                got.len(),
                data.len()
            );
        }
        for name in absent {
            assert!(
                debugfs_read(img, &format!("/{name}"), &scratch).is_none(),
                "/{name} was removed, yet it is in {}",
                img.display()
            );
        }
    };

    {
        phase(
            "frozen (clean on disk): the replica equals the disk, is fsck-clean, holds the files",
        );
        let _frozen = Frozen::new(&mnt.dir);
        let t = Instant::now();
        c.wait_sync("m1", SYNC);
        eprintln!("wait-sync took {:?}", t.elapsed());
        c.assert_replica("m1", &disk, &replica);
        fsck_clean(&replica);
        check_files(&replica, &files, &[]);
    }

    phase("mounted and live: files rewritten, removed and added, synced; then a point exported");
    let mut rng = StdRng::seed_from_u64(82);
    for (name, len) in [("big", 3 * MIB as usize + 1), ("new", 65_536 + 7)] {
        let data = random_bytes(&mut rng, len);
        fs::write(mnt.dir.join(name), &data).unwrap();
        files.insert(name.to_string(), data);
    }
    fs::remove_file(mnt.dir.join("one")).unwrap();
    files.remove("one");
    must("sync", &[]);
    let synced_ms = now_ms();
    c.wait_sync("m1", SYNC);
    // The sync's last flush is a point; anything after it (a journal commit) holds it too.
    let pts = points(&c, "m1");
    let p = pts
        .iter()
        .rev()
        .find(|p| p["kind"] == "crash")
        .unwrap_or_else(|| panic!("a crash-consistent point: {pts:?}"))
        .clone();
    assert!(
        point_time(&p) <= now_ms(),
        "a point is not in the future: {p}"
    );
    eprintln!(
        "exporting point {} ({} ms after the sync returned)",
        point_id(&p),
        point_time(&p) as i64 - synced_ms as i64
    );
    let img = export_point(&c, "m1", &point_id(&p), &c.path("export"));
    recover_and_check(&img);
    check_files(&img, &files, &["one"]);
    fs::remove_dir_all(c.path("export")).unwrap();

    phase("unmounted: the replica equals the disk and is fsck-clean as it is");
    drop(mnt);
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &replica);
    fsck_clean(&replica);
    check_files(&replica, &files, &["one"]);
    drop(lo);
    drop(fuse);
    c.assert_no_unexpected_errors(&[]);
}

/// Commits numbered transactions until the file STOP exists. Each inserts row i (random data
/// and its SHA-256), rewrites an older row, and sets meta.last = i; the log (outside the file
/// system) gets `B i ms` before BEGIN and `C i ms` after COMMIT returned, and `R ms` once the
/// schema is committed (wall-clock ms, floored, like haven's `time_ms`). On a database that
/// exists it goes on after meta.last (the workload continuing at the recovery site).
const WRITER: &str = r#"
import hashlib, os, random, sqlite3, sys, time
db, log, stop, seed, mode, sync = sys.argv[1:7]
ms = lambda: time.time_ns() // 1_000_000
out = open(log, "a", buffering=1)
con = sqlite3.connect(db, isolation_level=None)
assert con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode.lower()
con.execute(f"PRAGMA synchronous={sync}")
con.execute("BEGIN")
con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, data BLOB NOT NULL, h TEXT NOT NULL)")
con.execute("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
con.execute("INSERT OR IGNORE INTO meta VALUES('last', 0)")
i = con.execute("SELECT v FROM meta WHERE k = 'last'").fetchone()[0]
con.execute("COMMIT")
out.write(f"R {ms()}\n"); out.flush()
rng = random.Random(int(seed))
while not os.path.exists(stop):
    i += 1
    data = rng.randbytes(rng.randint(10, 12000))
    out.write(f"B {i} {ms()}\n"); out.flush()
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES(?, ?, ?)", (i, data, hashlib.sha256(data).hexdigest()))
    if i > 1:
        j = rng.randint(1, i - 1)
        d2 = rng.randbytes(rng.randint(10, 6000))
        con.execute("UPDATE t SET data = ?, h = ? WHERE id = ?", (d2, hashlib.sha256(d2).hexdigest(), j))
    con.execute("UPDATE meta SET v = ? WHERE k = 'last'", (i,))
    con.execute("COMMIT")
    out.write(f"C {i} {ms()}\n"); out.flush()
con.close()
"#;

/// Opens a database (recovering the hot journal or the WAL next to it, as SQLite does) and
/// prints JSON: integrity_check, the row ids, meta.last, and the ids whose data does not match
/// its hash.
const CHECKER: &str = r#"
import hashlib, json, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
ic = [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
ids, bad = [], []
for (i, data, h) in con.execute("SELECT id, data, h FROM t ORDER BY id"):
    ids.append(i)
    if hashlib.sha256(data).hexdigest() != h:
        bad.append(i)
last = con.execute("SELECT v FROM meta WHERE k = 'last'").fetchone()[0]
print(json.dumps({"integrity": ic, "ids": ids, "last": last, "bad": bad}))
"#;

/// A database and how it commits. Both are durable when COMMIT returns: WAL with
/// synchronous=FULL syncs the WAL at every commit; DELETE mode commits by unlinking the journal,
/// which only synchronous=EXTRA syncs (with FULL, a commit that returned may still be rolled
/// back by a crash: SQLite documents it, and an earlier version of this test caught it).
struct Db {
    name: &'static str,
    journal_mode: &'static str,
    synchronous: &'static str,
}

const DBS: [Db; 2] = [
    Db {
        name: "wal.db",
        journal_mode: "WAL",
        synchronous: "FULL",
    },
    Db {
        name: "delete.db",
        journal_mode: "DELETE",
        synchronous: "EXTRA",
    },
];

/// The writer's log: when it was ready, and per transaction when it began and committed.
#[derive(Default)]
struct TxLog {
    ready_ms: Option<u64>,
    begun: BTreeMap<u64, u64>,
    committed: BTreeMap<u64, u64>,
}

fn read_tx_log(path: &Path) -> TxLog {
    let mut log = TxLog::default();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        match (f[0], num(1), num(2)) {
            ("R", Some(t), _) => log.ready_ms = Some(t),
            ("B", Some(i), Some(t)) => {
                log.begun.insert(i, t);
            }
            ("C", Some(i), Some(t)) => {
                log.committed.insert(i, t);
            }
            _ => {} // a line being written
        }
    }
    log
}

/// Checks database `db` in the (recovered) ext4 image `img` of a point taken at `t_ms`:
/// integrity, whole transactions, every one committed before the point and none begun after
/// it. Returns the number of transactions it holds and whether a hot journal or WAL was found.
fn check_db_at(
    img: &Path,
    db: &Db,
    t_ms: u64,
    log: &TxLog,
    work: &Path,
    checker: &Path,
) -> (u64, bool) {
    fs::create_dir_all(work).unwrap();
    let scratch = work.join("scratch");
    let file = work.join(db.name);
    let data = debugfs_read(img, &format!("/{}", db.name), &scratch)
        .unwrap_or_else(|| panic!("no /{} in {}", db.name, img.display()));
    fs::write(&file, data).unwrap();
    // A hot journal or a WAL is part of the database: SQLite recovers it on open.
    let mut side = false;
    for suffix in ["-journal", "-wal"] {
        let name = format!("{}{suffix}", db.name);
        let _ = fs::remove_file(work.join(&name));
        let _ = fs::remove_file(work.join(format!("{}-shm", db.name)));
        if let Some(d) = debugfs_read(img, &format!("/{name}"), &scratch) {
            side |= !d.is_empty();
            fs::write(work.join(&name), d).unwrap();
        }
    }
    (check_db(&file, db, t_ms, log, checker, side), side)
}

/// Checks the database file `file` (with its hot journal or WAL next to it) of a point taken
/// at `t_ms`: integrity, whole transactions, every one committed before the point and none
/// begun after it. Returns the number of transactions it holds.
fn check_db(file: &Path, db: &Db, t_ms: u64, log: &TxLog, checker: &Path, side: bool) -> u64 {
    let out = must(PYTHON, &[s(checker), s(file)]);
    let v: Value = serde_json::from_str(
        out.lines()
            .last()
            .unwrap_or_else(|| panic!("checker said nothing")),
    )
    .unwrap_or_else(|e| panic!("checker output {out}: {e}"));
    let what = format!(
        "{} ({} mode) at the point at {t_ms}",
        db.name, db.journal_mode
    );
    assert_eq!(
        v["integrity"],
        serde_json::json!(["ok"]),
        "PRAGMA integrity_check of {what}: {v}"
    );
    let ids: Vec<u64> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect();
    let n = ids.len() as u64;
    assert!(
        ids.iter().copied().eq(1..=n),
        "{what}: transactions are whole and in order: ids {:?}…",
        &ids[..ids.len().min(20)]
    );
    assert_eq!(v["last"], n, "{what}: meta.last agrees with the rows: {v}");
    assert_eq!(
        v["bad"],
        serde_json::json!([]),
        "{what}: every row's data matches its hash"
    );
    // Every transaction whose COMMIT returned before the point is in it (ms floored on both
    // sides: committed_ms < t_ms means it returned before the point was taken).
    let needed = log
        .committed
        .iter()
        .filter(|(_, &c)| c < t_ms)
        .map(|(&i, _)| i)
        .max()
        .unwrap_or(0);
    assert!(
        n >= needed,
        "{what}: {n} transactions, but transaction {needed} committed at {} (before the \
         point): a committed transaction is lost (hot journal or WAL: {side})",
        log.committed[&needed]
    );
    // And none that was begun only after the point.
    if n > 0 {
        let begun = log.begun.get(&n).unwrap_or_else(|| {
            panic!("{what}: transaction {n} is in the point but was never begun")
        });
        assert!(
            *begun <= t_ms,
            "{what}: transaction {n} began at {begun}, after the point, yet it is in it"
        );
    }
    n
}

/// The transaction log of `db`'s writer tagged `tag`.
fn writer_log(c: &Cluster, db: &Db, tag: &str) -> PathBuf {
    c.path(&format!("{}{tag}.log", db.name))
}

/// One writer per database of [`DBS`] in `dir`, each logging to `<db><tag>.log` in the test's
/// directory; stopped by [`Writers::stop`], killed on drop.
struct Writers {
    procs: Vec<Killed>,
    logs: Vec<PathBuf>,
    errs: Vec<PathBuf>,
    stop: PathBuf,
    /// When the last of them was ready (its schema committed).
    ready_ms: u64,
}

impl Writers {
    fn start(c: &Cluster, dir: &Path, tag: &str, writer_py: &Path, seed: usize) -> Writers {
        let stop = c.path(&format!("stop-writers{tag}"));
        let mut w = Writers {
            procs: vec![],
            logs: DBS.iter().map(|db| writer_log(c, db, tag)).collect(),
            errs: DBS
                .iter()
                .map(|db| c.path(&format!("{}{tag}.err", db.name)))
                .collect(),
            stop,
            ready_ms: 0,
        };
        for (i, db) in DBS.iter().enumerate() {
            let child = Command::new(PYTHON)
                .args([
                    s(writer_py),
                    s(&dir.join(db.name)),
                    s(&w.logs[i]),
                    s(&w.stop),
                    &(seed + i).to_string(),
                    db.journal_mode,
                    db.synchronous,
                ])
                .stderr(File::create(&w.errs[i]).unwrap())
                .spawn()
                .expect("/usr/bin/python3 (with its sqlite3 module) must be installed");
            w.procs.push(Killed(child));
        }
        for i in 0..DBS.len() {
            let r = haven_testkit::wait_until("a writer ready", Duration::from_secs(30), || {
                w.check_running(i);
                read_tx_log(&w.logs[i]).ready_ms
            });
            w.ready_ms = w.ready_ms.max(r);
        }
        w
    }

    fn check_running(&mut self, i: usize) {
        if let Ok(Some(st)) = self.procs[i].0.try_wait() {
            panic!(
                "the writer of {} exited ({st}): {}",
                DBS[i].name,
                fs::read_to_string(&self.errs[i]).unwrap_or_default()
            );
        }
    }

    /// Waits until every writer has committed `n` transactions (more than it had).
    fn wait_commits(&mut self, n: usize) {
        for i in 0..DBS.len() {
            haven_testkit::wait_until("transactions committed", Duration::from_secs(60), || {
                self.check_running(i);
                (read_tx_log(&self.logs[i]).committed.len() >= n).then_some(())
            });
        }
    }

    /// Asks the writers to stop and waits until each has exited cleanly.
    fn stop(mut self) {
        File::create(&self.stop).unwrap();
        for (i, w) in self.procs.iter_mut().enumerate() {
            let st = haven_testkit::wait_until("a writer to stop", Duration::from_secs(30), || {
                w.0.try_wait().unwrap()
            });
            assert!(
                st.success(),
                "the writer of {} failed: {}",
                DBS[i].name,
                fs::read_to_string(&self.errs[i]).unwrap_or_default()
            );
        }
    }
}

#[test]
fn sqlite_on_ext4_on_the_tap_every_drilled_point_holds_every_committed_transaction() {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    sparse_disk(&disk, 128 * MIB);
    // The writers overwrite the file system's journal and the WAL over and over (several MB/s
    // of before-images): a cap far above what the test writes, so that every point listed stays
    // there until it is drilled (the default cap of a 128 MiB disk, 64 MiB, holds seconds).
    let uri = protected_tap_agent(&mut c, "m1", &disk, &["--journal-size", "2GiB"]);
    let replica = c.replica("config", "m1", "d0");

    phase("nbdfuse → loop → mkfs.ext4 → mount");
    let fuse = NbdFuse::mount(&c.path("fuse"), &uri, &c.path("nbdfuse.log"));
    let Some(lo) = LoopDevice::attach(&fuse.file()) else {
        return;
    };
    mkfs(&lo.dev);
    let mnt = Mount::new(&lo.dev, &c.path("mnt"));

    phase("two writers commit numbered transactions: WAL + FULL, DELETE + EXTRA");
    let (writer_py, checker_py) = (c.path("writer.py"), c.path("checker.py"));
    fs::write(&writer_py, WRITER).unwrap();
    fs::write(&checker_py, CHECKER).unwrap();
    let w = Writers::start(&c, &mnt.dir, "", &writer_py, 83);
    let ready_ms = w.ready_ms;
    let log_of = |db: &Db| writer_log(&c, db, "");

    phase("20 random crash-consistent points drilled while they write");
    let mut rng = StdRng::seed_from_u64(84);
    let mut used = BTreeSet::new();
    let work = c.path("drill");
    for n in 0..20 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..1000)));
        // Points reach the list once applied at the master target.
        let eligible = haven_testkit::wait_until(
            "a crash-consistent point after the writers were ready",
            Duration::from_secs(60),
            || {
                let pts: Vec<Value> = points(&c, "m1")
                    .into_iter()
                    .filter(|p| {
                        p["kind"] == "crash"
                            && point_time(p) > ready_ms
                            && !used.contains(&point_id(p))
                    })
                    .collect();
                (!pts.is_empty()).then_some(pts)
            },
        );
        let p = eligible.choose(&mut rng).unwrap();
        let (id, t_ms) = (point_id(p), point_time(p));
        used.insert(id.clone());
        let drill_started = Instant::now();
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).unwrap();
        let over_nbd = n % 4 == 3;
        let img = if over_nbd {
            let img = work.join("view.img");
            copy_point_over_nbd(&c, "m1", &id, &img);
            img
        } else {
            export_point(&c, "m1", &id, &work.join("export"))
        };
        recover_and_check(&img);
        let mut held = Vec::new();
        for db in &DBS {
            let log = read_tx_log(&log_of(db));
            let (n, side) = check_db_at(&img, db, t_ms, &log, &work.join("db"), &checker_py);
            let before = log.committed.values().filter(|&&ct| ct < t_ms).count();
            held.push(format!(
                "{}: {n} ({before} committed before{})",
                db.name,
                if side { ", recovered" } else { "" }
            ));
        }
        eprintln!(
            "drill {n:2}: point {id} via {}, {} ms old: {}; {:?}",
            if over_nbd { "NBD view" } else { "--export" },
            now_ms().saturating_sub(t_ms),
            held.join(", "),
            drill_started.elapsed()
        );
        fs::remove_dir_all(&work).unwrap();
    }

    phase("the writers stop; unmounted, the replica equals the disk and holds every transaction");
    w.stop();
    drop(mnt);
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &replica);
    fsck_clean(&replica);
    for db in &DBS {
        let log = read_tx_log(&log_of(db));
        let last = log.committed.keys().max().copied().unwrap_or(0);
        let (held, _) = check_db_at(&replica, db, now_ms(), &log, &c.path("final"), &checker_py);
        assert_eq!(
            held, last,
            "the replica holds every transaction of {}",
            db.name
        );
        eprintln!("{}: {last} transactions committed in all", db.name);
    }
    eprintln!("the test took {:?}", started.elapsed());
    drop(lo);
    drop(fuse);
    c.assert_no_unexpected_errors(&[]);
}

/// The disk behind `uri`, read over NBD.
fn read_export(uri: &str, size: u64) -> Vec<u8> {
    let mut c = haven_nbd::Client::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    let mut out = vec![0u8; size as usize];
    for (i, chunk) in out.chunks_mut(4 * MIB as usize).enumerate() {
        c.read_at(chunk, i as u64 * 4 * MIB)
            .expect("read the export");
    }
    out
}

/// How many 4 KiB blocks differ between `a` and `b`.
fn blocks_differing(a: &[u8], b: &[u8]) -> u64 {
    assert_eq!(a.len(), b.len());
    a.chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count() as u64
}

/// Copies `db`'s files (and its WAL or hot journal) out of the mounted file system at `mnt`
/// into `work` and checks them as a point taken at `t_ms`; returns the transactions held.
fn check_mounted_db(
    mnt: &Path,
    db: &Db,
    t_ms: u64,
    log: &TxLog,
    work: &Path,
    checker: &Path,
) -> u64 {
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).unwrap();
    let mut side = false;
    for suffix in ["", "-journal", "-wal"] {
        let name = format!("{}{suffix}", db.name);
        if let Ok(d) = fs::read(mnt.join(&name)) {
            side |= !suffix.is_empty() && !d.is_empty();
            fs::write(work.join(&name), d).unwrap();
        }
    }
    check_db(&work.join(db.name), db, t_ms, log, checker, side)
}

/// The whole disaster cycle of issue 9 with a real workload: SQLite on ext4 on the primary's
/// tap under continuous transactions; every primary-site process SIGKILLed (the workload,
/// the agent, the process server); `ctl failover --point latest` at the recovery site, whose
/// export is mounted, fsck-clean, and holds every transaction committed before the point; the
/// workload goes on there; the primary site comes back; `ctl reprotect` sends exactly the
/// blocks that differ; `ctl failback`; the original disk equals the recovery disk and the
/// replica, SQLite at the primary holds the transactions of both sites, and forward
/// protection resumes with no full resync.
#[test]
fn sqlite_through_a_whole_disaster_failover_reprotect_and_failback() {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    const SIZE: u64 = 128 * MIB;
    let mut c = Cluster::new();
    // The recommended layout: the control plane and the replica at the recovery site.
    c.start_two_sites();
    let disk = c.path("d0.img");
    sparse_disk(&disk, SIZE);
    let uri = protected_tap_agent(&mut c, "m1", &disk, &["--journal-size", "2GiB"]);
    let replica = c.replica("mt1", "m1", "d0");
    let (writer_py, checker_py) = (c.path("writer.py"), c.path("checker.py"));
    fs::write(&writer_py, WRITER).unwrap();
    fs::write(&checker_py, CHECKER).unwrap();

    phase("primary: nbdfuse → loop → mkfs.ext4 → mount; SQLite writers commit continuously");
    let fuse = NbdFuse::mount(&c.path("fuse"), &uri, &c.path("nbdfuse.log"));
    let Some(lo) = LoopDevice::attach(&fuse.file()) else {
        return;
    };
    mkfs(&lo.dev);
    let mnt = Mount::new(&lo.dev, &c.path("mnt"));
    let mut w = Writers::start(&c, &mnt.dir, "", &writer_py, 91);
    w.wait_commits(30);

    phase("disaster: every primary-site process is SIGKILLed: the process server, then the workload and the agent");
    // The process server goes first, so the primary commits transactions that never reach
    // the recovery site: after the point, they are lost there, and reprotect rolls them back.
    c.kill("ps1");
    w.wait_commits(60);
    drop(w);
    c.kill("agent-m1");
    // What is left of the primary's stack goes away (its writes after this fail: nothing is
    // serving the tap).
    drop(mnt);
    drop(lo);
    drop(fuse);

    phase("ctl failover m1 --point latest: unplanned, at the recovery site alone");
    let f = c.ctl(&["failover", "m1", "--point", "latest", "--timeout", "120s"]);
    assert_eq!(f["planned"], false, "{f}");
    let t_ms = f["point"]["time_ms"].as_u64().expect("the point's time");
    c.ctl(&["failover-commit", "m1"]);
    let export = f["disks"][0]["nbd_uri"].as_str().unwrap().to_string();

    phase("the export mounted (journal replayed), fsck -n clean, every transaction before the point held");
    let dr_fuse = NbdFuse::mount(&c.path("dr-fuse"), &export, &c.path("dr-nbdfuse.log"));
    let Some(dr_lo) = LoopDevice::attach(&dr_fuse.file()) else {
        return;
    };
    drop(Mount::new(&dr_lo.dev, &c.path("dr-mnt")));
    let o = run("fsck.ext4", &["-n", "-f", &dr_lo.dev]);
    assert!(
        o.status.success(),
        "fsck.ext4 -n -f of the export: {}",
        output_text(&o)
    );
    let dr_mnt = Mount::new(&dr_lo.dev, &c.path("dr-mnt"));
    for db in &DBS {
        let log = read_tx_log(&writer_log(&c, db, ""));
        let n = check_mounted_db(
            &dr_mnt.dir,
            db,
            t_ms,
            &log,
            &c.path("dr-check"),
            &checker_py,
        );
        let committed = log.committed.len() as u64;
        eprintln!(
            "{}: {n} transactions at the point ({committed} committed at the primary)",
            db.name
        );
        assert!(
            n < committed,
            "{}: the primary committed transactions after the point (they never left it)",
            db.name
        );
    }

    phase("the workload goes on at the recovery site");
    let mut w = Writers::start(&c, &dr_mnt.dir, ".dr", &writer_py, 95);
    w.wait_commits(20);
    w.stop();
    drop(dr_mnt);
    drop(dr_lo);
    drop(dr_fuse);

    phase("the primary site comes back; ctl reprotect sends exactly the blocks that differ");
    c.restart("ps1");
    c.restart("agent-m1");
    c.wait_tap("m1", "d0");
    let recovered = read_export(&export, SIZE);
    let differing = blocks_differing(&fs::read(&disk).unwrap(), &recovered);
    assert!(differing > 0, "both sites wrote after the point");
    let r = haven_testkit::wait_until("reprotect", Duration::from_secs(120), || {
        c.try_ctl(&["reprotect", "m1", "--timeout", "120s"]).ok()
    });
    assert_eq!(r["state"], "reprotected", "{r}");
    let rev = &r["reverse"];
    assert_eq!(
        rev["blocks_written"], differing,
        "the blocks written at either site since the point, and nothing else: {r}"
    );
    assert_eq!(rev["bytes_received"], differing * 4096, "{r}");
    assert!(
        differing * 4096 < SIZE / 4,
        "not a full copy: {differing} blocks"
    );
    eprintln!(
        "reprotect: {differing} blocks ({} KiB) of {} MiB travelled",
        differing * 4,
        SIZE >> 20
    );

    phase("ctl failback: the original disk equals the recovery disk and the replica");
    let b = c.ctl(&["failback", "m1", "--timeout", "180s"]);
    assert_eq!(
        (b["state"].as_str(), b["stage"].as_str()),
        (Some("protected"), Some("failed-back")),
        "{b}"
    );
    assert!(
        fs::read(&disk).unwrap() == recovered,
        "cmp: the original disk is the recovery disk"
    );
    assert!(
        fs::read(&replica).unwrap() == recovered,
        "cmp: the replica is the recovery disk"
    );

    phase("SQLite at the primary holds the transactions of both sites; a new write replicates");
    let fuse = NbdFuse::mount(&c.path("fuse"), &uri, &c.path("nbdfuse2.log"));
    let Some(lo) = LoopDevice::attach(&fuse.file()) else {
        return;
    };
    let mnt = Mount::new(&lo.dev, &c.path("mnt"));
    for db in &DBS {
        let log = read_tx_log(&writer_log(&c, db, ".dr"));
        let last = log.committed.keys().max().copied().unwrap_or(0);
        let n = check_mounted_db(
            &mnt.dir,
            db,
            now_ms(),
            &log,
            &c.path("home-check"),
            &checker_py,
        );
        assert_eq!(
            n, last,
            "{}: every transaction of both sites, at home",
            db.name
        );
    }
    let w = Writers::start(&c, &mnt.dir, ".home", &writer_py, 99);
    w.stop();
    drop(mnt);
    drop(lo);
    drop(fuse);
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &replica);
    fsck_clean(&replica);
    let m = c.machine("m1").unwrap();
    c.assert_no_resync("m1", &m);
    c.assert_no_unexpected_errors(&[]);
}
