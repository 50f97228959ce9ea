//! A server on a unix socket in a tempdir over `FileBackend`s, external tools, and a raw
//! protocol client.
#![allow(dead_code)]
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use haven_nbd::proto::{self, Request};
use haven_nbd::{Backend, Exports, FileBackend, Server, ServerConfig, ServerHandle};

pub const NAME: &str = "disk";

/// A tool the test needs. Missing: a failure with the package to install, unless
/// `HAVEN_ALLOW_MISSING_TOOLS` is set, then `None` (the test skips, saying why).
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(found) = std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
    {
        return Some(found);
    }
    if std::env::var_os("HAVEN_ALLOW_MISSING_TOOLS").is_some() {
        eprintln!("SKIPPED: `{name}` is not installed (apt-get install {package}); HAVEN_ALLOW_MISSING_TOOLS is set");
        return None;
    }
    panic!(
        "`{name}` is not installed: apt-get install {package} (.ci/run does), \
         or set HAVEN_ALLOW_MISSING_TOOLS=1 to skip this test"
    );
}

/// `python3` with the libnbd bindings (`python3-libnbd`), like `tool`.
pub fn python_nbd() -> Option<PathBuf> {
    // The distribution's python: python3-libnbd installs the module for it, not for any
    // other python3 earlier in PATH.
    let python = PathBuf::from("/usr/bin/python3");
    let ok = Command::new(&python)
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(python);
    }
    if std::env::var_os("HAVEN_ALLOW_MISSING_TOOLS").is_some() {
        eprintln!("SKIPPED: python3 module `nbd` missing (apt-get install python3-libnbd); HAVEN_ALLOW_MISSING_TOOLS is set");
        return None;
    }
    panic!("python3 cannot `import nbd`: apt-get install python3-libnbd (.ci/run does), or set HAVEN_ALLOW_MISSING_TOOLS=1");
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub exports: Arc<Exports>,
    pub handle: Option<ServerHandle>,
    pub rt: tokio::runtime::Runtime,
}

impl Fixture {
    /// A server with export `disk`: a zeroed file of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> Self {
        Self::with_config(size, read_only, ServerConfig::default())
    }

    pub fn with_config(size: u64, read_only: bool, config: ServerConfig) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let socket = dir.path().join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let exports = Arc::new(Exports::new());
        exports.insert(
            NAME,
            Arc::new(FileBackend::open(&image, read_only).unwrap()),
        );
        let server = Server::with_config(exports.clone(), config);
        let handle = rt.block_on(server.serve_unix(&socket)).unwrap();
        Fixture {
            dir,
            socket,
            image,
            exports,
            handle: Some(handle),
            rt,
        }
    }

    pub fn add(&self, name: &str, backend: Arc<dyn Backend>) {
        self.exports.insert(name, backend);
    }

    pub fn uri(&self) -> String {
        self.uri_of(NAME)
    }

    pub fn uri_of(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    pub fn shutdown(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs a command; panics with its output unless it succeeded.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A raw NBD client on the fixture's socket, for what well-behaved clients never send.
pub struct Raw {
    pub s: UnixStream,
    pub size: u64,
    pub flags: u16,
}

impl Raw {
    /// Connects and reads the greeting.
    pub fn connect(socket: &Path) -> UnixStream {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(greeting, proto::greeting());
        s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        s
    }

    pub fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
        let mut v = proto::IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        s.write_all(&v).unwrap();
    }

    /// One option reply: (option, type, data).
    pub fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &proto::OPT_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        (option, kind, data)
    }

    pub fn go_data(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// Connects and enters transmission on `name` with NBD_OPT_GO.
    pub fn go(socket: &Path, name: &str) -> Raw {
        let mut s = Self::connect(socket);
        Self::send_option(&mut s, proto::OPT_GO, &Self::go_data(name));
        let (mut size, mut flags) = (0, 0);
        loop {
            let (option, kind, data) = Self::read_option_reply(&mut s);
            assert_eq!(option, proto::OPT_GO);
            match kind {
                proto::REP_INFO if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                proto::REP_INFO => {}
                proto::REP_ACK => break,
                other => panic!("GO failed: {other:#x} {}", String::from_utf8_lossy(&data)),
            }
        }
        Raw { s, size, flags }
    }

    pub fn send(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let req = Request {
            flags,
            kind,
            handle,
            offset,
            length,
        };
        self.s.write_all(&proto::encode_request(&req)).unwrap();
    }

    /// Reads a simple reply: (error, handle).
    pub fn reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).unwrap();
        assert_eq!(&r[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    pub fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> (u32, u64) {
        self.send(proto::CMD_WRITE, 0, handle, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
        self.reply()
    }

    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(proto::CMD_READ, 0, handle, offset, len);
        let (error, h) = self.reply();
        assert_eq!(h, handle);
        if error != 0 {
            return Err(error);
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        Ok(data)
    }

    /// True once the server closed the connection (EOF on read).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    pub fn disconnect(mut self) {
        self.send(proto::CMD_DISC, 0, 0, 0, 0);
        assert!(self.closed());
    }
}
