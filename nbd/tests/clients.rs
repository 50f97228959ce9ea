//! Real clients against the server on a unix socket over `FileBackend`: qemu-io, qemu-img,
//! fio's nbd engine, nbdinfo and libnbd's python bindings. A missing tool fails the test
//! (CI installs them in .ci/run) unless HAVEN_ALLOW_MISSING_TOOLS is set.
use std::process::Command;
use std::sync::Arc;

mod common;
use common::{python_nbd, run, stdout, tool, Fixture, NAME};

const MIB: u64 = 1 << 20;

fn qemu_io(fx: &Fixture, cmds: &[&str]) -> String {
    let qemu_io = tool("qemu-io", "qemu-utils").expect("checked by the caller");
    let mut cmd = Command::new(qemu_io);
    cmd.args(["-f", "raw", &fx.uri()]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = stdout(&run(&mut cmd));
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );
    out
}

#[test]
fn qemu_io_write_read_flush_fua() {
    if tool("qemu-io", "qemu-utils").is_none() {
        return;
    }
    let fx = Fixture::new(8 * MIB, false);
    qemu_io(
        &fx,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "flush",
            "write -f -P 0x5a 1M 64k",
            "read -P 0x5a 1M 64k",
            "write -P 0x11 4095 3",
            "read -P 0x11 4095 3",
            "aio_write -P 0x22 2M 4k",
            "aio_write -P 0x23 3M 4k",
            "aio_flush",
            "read -P 0 7M 1M",
        ],
    );
    let disk = std::fs::read(&fx.image).unwrap();
    assert!(disk[..4095].iter().all(|&b| b == 0xab));
    assert!(disk[4095..4098].iter().all(|&b| b == 0x11));
    assert!(disk[MIB as usize..][..65536].iter().all(|&b| b == 0x5a));
    assert!(disk[2 * MIB as usize..][..4096].iter().all(|&b| b == 0x22));
    assert!(disk[3 * MIB as usize..][..4096].iter().all(|&b| b == 0x23));
}

#[test]
fn qemu_io_discard_and_write_zeroes() {
    if tool("qemu-io", "qemu-utils").is_none() {
        return;
    }
    let fx = Fixture::new(4 * MIB, false);
    qemu_io(
        &fx,
        &[
            "write -P 0xcc 0 4M",
            "discard 0 1M",
            "write -z 1M 1M",
            "write -z -u 2M 64k",
            "write -z -f 3M 4k",
            "read -P 0xcc 2162688 64k",
            "read -P 0 1M 1M",
            "read -P 0 2M 64k",
            "read -P 0 3M 4k",
        ],
    );
    let disk = std::fs::read(&fx.image).unwrap();
    let mib = MIB as usize;
    assert!(disk[mib..2 * mib].iter().all(|&b| b == 0));
    assert!(disk[2 * mib..2 * mib + 65536].iter().all(|&b| b == 0));
    assert!(disk[2 * mib + 65536..3 * mib].iter().all(|&b| b == 0xcc));
    assert!(disk[3 * mib..3 * mib + 4096].iter().all(|&b| b == 0));
    assert!(disk[3 * mib + 4096..].iter().all(|&b| b == 0xcc));
}

/// Deterministic pseudo-random bytes (xorshift).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[test]
fn qemu_img_convert_and_compare() {
    let Some(qemu_img) = tool("qemu-img", "qemu-utils") else {
        return;
    };
    let fx = Fixture::new(16 * MIB, false);
    let src = fx.dir.path().join("src.img");
    let mut data = pseudo_random(16 * MIB as usize, 0x9e37_79b9);
    // Some zero runs, so qemu-img sends write-zeroes too.
    data[4 * MIB as usize..6 * MIB as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    let uri = fx.uri();
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    assert!(
        std::fs::read(&fx.image).unwrap() == data,
        "backing file differs from the source"
    );
    let back = fx.dir.path().join("back.img");
    run(Command::new(&qemu_img)
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "what qemu-img read differs"
    );
    let info = stdout(&run(Command::new(&qemu_img)
        .args(["info", "-f", "raw"])
        .arg(&uri)));
    assert!(info.contains("16 MiB"), "{info}");
}

#[test]
fn fio_random_writes_verified_four_jobs() {
    let Some(fio) = tool("fio", "fio") else {
        return;
    };
    let Some(qemu_img) = tool("qemu-img", "qemu-utils") else {
        return;
    };
    let fx = Fixture::new(64 * MIB, false);
    // In the tempdir, without verify state files (fio writes them to its cwd otherwise).
    let out = run(Command::new(fio).current_dir(fx.dir.path()).args([
        "--name=nbd-verify",
        "--ioengine=nbd",
        &format!("--uri={}", fx.uri()),
        "--rw=randwrite",
        "--bssplit=4k/50:64k/50",
        "--iodepth=16",
        "--numjobs=4",
        "--size=16M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--randrepeat=1",
        "--group_reporting",
        "--output-format=terse",
    ]));
    let terse = stdout(&out);
    // terse v3: field 5 is the error code.
    for line in terse.lines().filter(|l| l.starts_with('3')) {
        assert_eq!(line.split(';').nth(4), Some("0"), "{terse}");
    }
    // What a client reads through the server is the backing file, byte for byte.
    let back = fx.dir.path().join("back.img");
    run(Command::new(&qemu_img)
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(fx.uri())
        .arg(&back));
    let back = std::fs::read(&back).unwrap();
    let disk = std::fs::read(&fx.image).unwrap();
    assert!(back == disk, "export and backing file differ");
    assert!(disk.iter().any(|&b| b != 0), "fio wrote nothing");
}

fn nbdinfo(uri: &str) -> String {
    let nbdinfo = tool("nbdinfo", "libnbd-bin").expect("checked by the caller");
    stdout(&run(Command::new(nbdinfo).arg(uri)))
}

fn has(info: &str, line: &str) -> bool {
    info.lines().any(|l| l.trim() == line)
}

/// A backend that says a flush covers only its own connection.
struct NoMultiConn(haven_nbd::FileBackend);

impl haven_nbd::Backend for NoMultiConn {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn multi_conn(&self) -> bool {
        false
    }
    fn read(&self, o: u64, l: u32) -> futures::future::BoxFuture<'_, std::io::Result<Vec<u8>>> {
        self.0.read(o, l)
    }
    fn write(
        &self,
        o: u64,
        d: Vec<u8>,
        f: bool,
    ) -> futures::future::BoxFuture<'_, std::io::Result<()>> {
        self.0.write(o, d, f)
    }
    fn flush(&self) -> futures::future::BoxFuture<'_, std::io::Result<()>> {
        self.0.flush()
    }
    fn trim(&self, o: u64, l: u32) -> futures::future::BoxFuture<'_, std::io::Result<()>> {
        self.0.trim(o, l)
    }
    fn write_zeroes(
        &self,
        o: u64,
        l: u32,
        f: bool,
    ) -> futures::future::BoxFuture<'_, std::io::Result<()>> {
        self.0.write_zeroes(o, l, f)
    }
}

#[test]
fn nbdinfo_reports_flags_and_lists_exports() {
    if tool("nbdinfo", "libnbd-bin").is_none() {
        return;
    }
    let fx = Fixture::new(8 * MIB, false);
    let ro_image = fx.dir.path().join("ro.img");
    std::fs::File::create(&ro_image)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    fx.add(
        "ro",
        Arc::new(haven_nbd::FileBackend::open(&ro_image, true).unwrap()),
    );
    fx.add(
        "single",
        Arc::new(NoMultiConn(
            haven_nbd::FileBackend::open(&fx.image, false).unwrap(),
        )),
    );

    let rw = nbdinfo(&fx.uri());
    for line in [
        "export-size: 8388608 (8M)",
        "is_read_only: false",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
        "can_cache: false",
        "can_fast_zero: false",
        "can_df: false",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 67108864",
    ] {
        assert!(has(&rw, line), "missing {line:?} in:\n{rw}");
    }
    let ro = nbdinfo(&fx.uri_of("ro"));
    for line in [
        "is_read_only: true",
        "can_flush: true",
        "can_trim: false",
        "can_zero: false",
        "can_fua: false",
    ] {
        assert!(has(&ro, line), "missing {line:?} in:\n{ro}");
    }
    let single = nbdinfo(&fx.uri_of("single"));
    assert!(has(&single, "can_multi_conn: false"), "{single}");

    let nbdinfo_bin = tool("nbdinfo", "libnbd-bin").unwrap();
    let list = stdout(&run(Command::new(&nbdinfo_bin).arg("--list").arg(fx.uri())));
    for name in [NAME, "ro", "single"] {
        assert!(
            has(&list, &format!("export=\"{name}\":")),
            "{name} not in:\n{list}"
        );
    }
    // An unknown export: nbdinfo fails (the server answered NBD_REP_ERR_UNKNOWN).
    let out = Command::new(&nbdinfo_bin)
        .arg(fx.uri_of("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("export: nope"),
        "{out:?}"
    );
}

const PY_EDGES: &str = r#"
import errno, sys, nbd
uri, ro_uri = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
big = bytes(i % 253 for i in range(64 << 20))
h.pwrite(big, 0)
assert h.pread(64 << 20, 0) == big
h.flush()
h.zero(1 << 20, 0)
assert h.pread(1 << 20, 0) == bytes(1 << 20)
h.set_strict_mode(0)   # let the server judge the range
try:
    h.pread(4096, h.get_size() - 2048)
    sys.exit("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
h.shutdown()

r = nbd.NBD()
r.connect_uri(ro_uri)
assert r.is_read_only()
r.set_strict_mode(0)   # send the write anyway: the server must refuse it
try:
    r.pwrite(b"x" * 4096, 0)
    sys.exit("write on a read-only export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
assert r.pread(4096, 0) == bytes(4096)
r.shutdown()
print("ok")
"#;

#[test]
fn libnbd_python_64_mib_requests_and_read_only_eperm() {
    let Some(python) = python_nbd() else {
        return;
    };
    let fx = Fixture::new(72 * MIB, false);
    let ro_image = fx.dir.path().join("ro.img");
    std::fs::File::create(&ro_image)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    fx.add(
        "ro",
        Arc::new(haven_nbd::FileBackend::open(&ro_image, true).unwrap()),
    );
    let out = run(Command::new(python).args(["-c", PY_EDGES, &fx.uri(), &fx.uri_of("ro")]));
    assert_eq!(stdout(&out).trim(), "ok");
    assert!(std::fs::read(&ro_image).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn many_qemu_io_clients_at_once() {
    let Some(qemu_io) = tool("qemu-io", "qemu-utils") else {
        return;
    };
    let fx = Fixture::new(16 * MIB, false);
    let children: Vec<_> = (0..16u64)
        .map(|i| {
            let pattern = format!("0x{:02x}", i + 0x41);
            Command::new(&qemu_io)
                .args(["-f", "raw", &fx.uri()])
                .args(["-c", &format!("write -P {pattern} {}M 1M", i)])
                .args(["-c", &format!("read -P {pattern} {}M 1M", i)])
                .args(["-c", "flush"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("failed") && !text.contains("verification"),
            "{text}"
        );
    }
    let disk = std::fs::read(&fx.image).unwrap();
    for (i, chunk) in disk.chunks(MIB as usize).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 + 0x41), "MiB {i}");
    }
}

#[test]
fn qemu_io_over_tcp() {
    let Some(qemu_io) = tool("qemu-io", "qemu-utils") else {
        return;
    };
    let fx = Fixture::new(4 * MIB, false);
    let server = haven_nbd::Server::new(fx.exports.clone());
    let handle = fx
        .rt
        .block_on(server.serve_tcp("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let addr = handle.tcp_addr().unwrap();
    let uri = format!("nbd://{addr}/{NAME}");
    let out = stdout(&run(Command::new(qemu_io).args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x77 1M 1M",
        "-c",
        "read -P 0x77 1M 1M",
        "-c",
        "flush",
    ])));
    assert!(
        !out.contains("failed") && !out.contains("verification"),
        "{out}"
    );
    fx.rt.block_on(handle.shutdown());
    let disk = std::fs::read(&fx.image).unwrap();
    assert!(disk[MIB as usize..2 * MIB as usize]
        .iter()
        .all(|&b| b == 0x77));
}
