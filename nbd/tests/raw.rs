//! The server on a real unix socket, driven by a raw client: the requests and options that
//! well-behaved clients never send, concurrency and its bound, runtime export changes.
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use haven_nbd::proto::*;
use haven_nbd::{Backend, FileBackend, ServerConfig};

mod common;
use common::{Fixture, Raw, NAME};

const MIB: u64 = 1 << 20;

#[test]
fn options_over_a_socket() {
    let fx = Fixture::new(MIB, false);
    let mut s = Raw::connect(&fx.socket);
    Raw::send_option(&mut s, OPT_LIST, &[]);
    let (_, kind, data) = Raw::read_option_reply(&mut s);
    assert_eq!(
        (kind, &data[..]),
        (REP_SERVER, &[0, 0, 0, 4, b'd', b'i', b's', b'k'][..])
    );
    assert_eq!(Raw::read_option_reply(&mut s).1, REP_ACK);
    Raw::send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(Raw::read_option_reply(&mut s).1, REP_ERR_UNSUP);
    Raw::send_option(&mut s, 0x7777, b"whatever");
    assert_eq!(
        Raw::read_option_reply(&mut s),
        (0x7777, REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    Raw::send_option(&mut s, OPT_GO, &Raw::go_data("nope"));
    assert_eq!(Raw::read_option_reply(&mut s).1, REP_ERR_UNKNOWN);
    Raw::send_option(&mut s, OPT_INFO, &Raw::go_data(NAME));
    let (_, kind, data) = Raw::read_option_reply(&mut s);
    assert_eq!(
        (kind, &data[..10]),
        (REP_INFO, &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0][..])
    );
    let (_, kind, data) = Raw::read_option_reply(&mut s);
    assert_eq!((kind, &data[..2]), (REP_INFO, &[0, 3][..]));
    assert_eq!(Raw::read_option_reply(&mut s).1, REP_ACK);
    // Option data beyond the bound: skipped and refused, the session goes on.
    Raw::send_option(&mut s, OPT_GO, &vec![0u8; 10_000]);
    assert_eq!(Raw::read_option_reply(&mut s).1, REP_ERR_TOO_BIG);
    Raw::send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(Raw::read_option_reply(&mut s).1, REP_ACK);
    let mut r = Raw {
        s,
        size: 0,
        flags: 0,
    };
    assert!(r.closed());
}

#[test]
fn export_name_and_transmission() {
    let fx = Fixture::new(MIB, false);
    let mut s = Raw::connect(&fx.socket);
    Raw::send_option(&mut s, OPT_EXPORT_NAME, NAME.as_bytes());
    let mut reply = [0u8; 10];
    std::io::Read::read_exact(&mut s, &mut reply).unwrap();
    assert_eq!(reply, [0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d]);
    let mut r = Raw {
        s,
        size: MIB,
        flags: 0x16d,
    };
    assert_eq!(r.write(7, 512, &[9u8; 1000]), (0, 7));
    assert_eq!(r.read(8, 512, 1000).unwrap(), vec![9u8; 1000]);
    r.disconnect();
    // An unknown export name cannot be answered: the connection closes.
    let mut s = Raw::connect(&fx.socket);
    Raw::send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert!(Raw {
        s,
        size: 0,
        flags: 0
    }
    .closed());
}

#[test]
fn every_command_and_error() {
    let fx = Fixture::new(MIB, false);
    let mut r = Raw::go(&fx.socket, NAME);
    assert_eq!(r.size, MIB);
    assert_eq!(r.flags, 0x16d);
    assert_eq!(r.write(1, 0, &[0xcd; 8192]), (0, 1));
    r.send(CMD_WRITE, CMD_FLAG_FUA, 2, 8192, 4096);
    r.s.write_all(&[0xce; 4096]).unwrap();
    assert_eq!(r.reply(), (0, 2));
    r.send(CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(r.reply(), (0, 3));
    r.send(CMD_TRIM, 0, 4, 0, 4096);
    assert_eq!(r.reply(), (0, 4));
    r.send(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 8192, 100);
    assert_eq!(r.reply(), (0, 5));
    let back = r.read(6, 0, 12288).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0), "trimmed");
    assert!(back[4096..8192].iter().all(|&b| b == 0xcd));
    assert!(back[8192..8292].iter().all(|&b| b == 0), "zeroed");
    assert!(back[8292..].iter().all(|&b| b == 0xce));
    assert_eq!(r.read(7, 0, 0).unwrap(), Vec::<u8>::new());
    // Out of range: EINVAL for reads and trims, ENOSPC for writes (payload drained).
    assert_eq!(r.read(8, MIB - 1, 2), Err(EINVAL));
    assert_eq!(r.write(9, MIB - 1, &[1, 2]), (ENOSPC, 9));
    r.send(CMD_TRIM, 0, 10, MIB, 1);
    assert_eq!(r.reply(), (EINVAL, 10));
    r.send(CMD_WRITE_ZEROES, 0, 11, u64::MAX, 1);
    assert_eq!(r.reply(), (ENOSPC, 11));
    // Unknown commands and flags not negotiated.
    r.send(CMD_BLOCK_STATUS, 0, 12, 0, 4096);
    assert_eq!(r.reply(), (EINVAL, 12));
    r.send(99, 0, 13, 0, 0);
    assert_eq!(r.reply(), (EINVAL, 13));
    assert_eq!(r.write(14, 0, &[]), (0, 14));
    r.send(CMD_WRITE, CMD_FLAG_FAST_ZERO, 15, 0, 3);
    r.s.write_all(&[1, 2, 3]).unwrap();
    assert_eq!(r.reply(), (EINVAL, 15));
    // The stream is still in step after all of that.
    assert_eq!(r.read(16, 8192, 1).unwrap(), vec![0]);
    r.disconnect();
}

#[test]
fn requests_of_64_mib_and_beyond() {
    let fx = Fixture::new(80 * MIB, false);
    let mut r = Raw::go(&fx.socket, NAME);
    let big: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
    assert_eq!(r.write(1, 4096, &big), (0, 1));
    assert!(r.read(2, 4096, MAX_PAYLOAD).unwrap() == big);
    // One byte more: EINVAL; a write's payload is drained and the connection goes on.
    assert_eq!(r.read(3, 0, MAX_PAYLOAD + 1), Err(EINVAL));
    let more = vec![7u8; MAX_PAYLOAD as usize + 1];
    assert_eq!(r.write(4, 0, &more), (EINVAL, 4));
    assert_eq!(r.read(5, 4096, 4).unwrap(), big[..4]);
    // Beyond what is worth draining: the connection is closed.
    r.send(CMD_WRITE, 0, 6, 0, MAX_DRAIN + 1);
    assert!(r.closed());
    let on_disk = std::fs::read(&fx.image).unwrap();
    assert!(on_disk[4096..4096 + big.len()] == big[..]);
}

#[test]
fn bad_magic_closes_only_that_connection() {
    let fx = Fixture::new(MIB, false);
    let mut other = Raw::go(&fx.socket, NAME);
    let mut r = Raw::go(&fx.socket, NAME);
    r.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    r.s.write_all(&[0u8; 24]).unwrap();
    assert!(r.closed());
    assert_eq!(other.read(1, 0, 16).unwrap(), vec![0; 16]);
    other.disconnect();
}

#[test]
fn read_only_export_refuses_writes() {
    let fx = Fixture::new(MIB, true);
    let mut r = Raw::go(&fx.socket, NAME);
    assert_eq!(
        r.flags,
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
    );
    assert_eq!(r.write(1, 0, &[1; 4096]), (EPERM, 1));
    r.send(CMD_TRIM, 0, 2, 0, 4096);
    assert_eq!(r.reply(), (EPERM, 2));
    r.send(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
    assert_eq!(r.reply(), (EPERM, 3));
    r.send(CMD_FLUSH, 0, 4, 0, 0);
    assert_eq!(r.reply(), (0, 4));
    assert_eq!(r.read(5, 0, 4096).unwrap(), vec![0; 4096]);
    r.disconnect();
    assert!(std::fs::read(&fx.image).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn pipelined_requests_all_answered() {
    let fx = Fixture::new(4 * MIB, false);
    let mut r = Raw::go(&fx.socket, NAME);
    let n = 512u64;
    let mut w = r.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            let req = Request {
                flags: 0,
                kind: CMD_WRITE,
                handle: i,
                offset: i * 4096,
                length: 4096,
            };
            w.write_all(&encode_request(&req)).unwrap();
            w.write_all(&[(i % 256) as u8; 4096]).unwrap();
        }
    });
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (error, handle) = r.reply();
        assert_eq!(error, 0);
        assert!(
            !std::mem::replace(&mut seen[handle as usize], true),
            "handle {handle} twice"
        );
    }
    sender.join().unwrap();
    let disk = std::fs::read(&fx.image).unwrap();
    for i in 0..n as usize {
        assert!(disk[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == (i % 256) as u8));
    }
    r.disconnect();
}

#[test]
fn many_connections_at_once() {
    let fx = Fixture::new(32 * MIB, false);
    let threads: Vec<_> = (0..32u64)
        .map(|c| {
            let socket = fx.socket.clone();
            std::thread::spawn(move || {
                let mut r = Raw::go(&socket, NAME);
                for i in 0..16u64 {
                    let off = c * MIB + i * 65536;
                    assert_eq!(r.write(i, off, &[c as u8 + 1; 65536]), (0, i));
                }
                r.send(CMD_FLUSH, 0, 99, 0, 0);
                assert_eq!(r.reply(), (0, 99));
                assert_eq!(
                    r.read(100, c * MIB, MIB as u32).unwrap(),
                    vec![c as u8 + 1; MIB as usize]
                );
                r.disconnect();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A backend whose reads wait at a gate, counting how many wait at once.
struct Gate {
    inner: FileBackend,
    entered: Mutex<mpsc::Sender<usize>>,
    now: AtomicUsize,
    gate: tokio::sync::Semaphore,
}

impl Backend for Gate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, std::io::Result<Vec<u8>>> {
        Box::pin(async move {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = self.entered.lock().unwrap().send(now);
            self.gate.acquire().await.unwrap().forget();
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.write_zeroes(offset, len, fua)
    }
}

#[test]
fn requests_run_concurrently_up_to_the_bound() {
    let config = ServerConfig {
        max_in_flight: 4,
        ..ServerConfig::default()
    };
    let fx = Fixture::with_config(MIB, false, config);
    let (tx, rx) = mpsc::channel();
    let gate = Arc::new(Gate {
        inner: FileBackend::open(&fx.image, false).unwrap(),
        entered: Mutex::new(tx),
        now: AtomicUsize::new(0),
        gate: tokio::sync::Semaphore::new(0),
    });
    fx.add("gate", gate.clone());
    let mut r = Raw::go(&fx.socket, "gate");
    for i in 0..16 {
        r.send(CMD_READ, 0, i, i * 4096, 4096);
    }
    // Four reads reach the backend together (concurrency), and no fifth (the bound).
    let mut most = 0;
    for _ in 0..4 {
        most = most.max(
            rx.recv_timeout(Duration::from_secs(10))
                .expect("4 concurrent reads"),
        );
    }
    assert_eq!(most, 4);
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "a 5th read got in"
    );
    gate.gate.add_permits(16);
    for _ in 0..16 {
        assert_eq!(r.reply().0, 0);
        let mut data = [0u8; 4096];
        std::io::Read::read_exact(&mut r.s, &mut data).unwrap();
    }
    r.disconnect();
}

#[test]
fn exports_change_at_runtime_and_shutdown_removes_the_socket() {
    let mut fx = Fixture::new(MIB, false);
    let second = fx.dir.path().join("second.img");
    std::fs::File::create(&second)
        .unwrap()
        .set_len(3 * 4096)
        .unwrap();
    fx.add(
        "second",
        Arc::new(FileBackend::open(&second, false).unwrap()),
    );
    let r = Raw::go(&fx.socket, "second");
    assert_eq!(r.size, 3 * 4096);
    assert!(fx.exports.remove("second").is_some());
    let mut s = Raw::connect(&fx.socket);
    Raw::send_option(&mut s, OPT_GO, &Raw::go_data("second"));
    assert_eq!(Raw::read_option_reply(&mut s).1, REP_ERR_UNKNOWN);
    // The connection that chose it before keeps it.
    let mut r = r;
    assert_eq!(r.read(1, 0, 4096).unwrap(), vec![0; 4096]);
    r.disconnect();
    drop(s);
    assert!(fx.socket.exists());
    fx.shutdown();
    assert!(!fx.socket.exists());
    // A stale socket file (nobody listening) is replaced.
    let _stale = std::os::unix::net::UnixListener::bind(&fx.socket).unwrap();
    drop(_stale);
    let server = haven_nbd::Server::new(fx.exports.clone());
    let h = fx.rt.block_on(server.serve_unix(&fx.socket)).unwrap();
    Raw::go(&fx.socket, NAME).disconnect();
    fx.rt.block_on(h.shutdown());
    assert!(!fx.socket.exists());
}

/// haven's own blocking client against the server: writes (with and without FUA) land in the
/// file, reads return them, a request larger than one chunk is split, an unknown export is a
/// clear error.
#[test]
fn the_blocking_client_writes_reads_and_flushes() {
    let fx = Fixture::new(80 << 20, false);
    let uri = fx.uri();
    let mut c = haven_nbd::Client::connect(&uri).unwrap();
    assert_eq!(c.size(), 80 << 20);
    assert!(!c.read_only());
    let big: Vec<u8> = (0..(40u32 << 20)).map(|i| (i % 251) as u8).collect();
    c.write_at(&big, 4096, false).unwrap();
    c.write_at(b"fua", 1, true).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; big.len()];
    c.read_at(&mut back, 4096).unwrap();
    assert!(back == big, "read back what was written");
    let file = std::fs::read(&fx.image).unwrap();
    assert_eq!(&file[1..4], b"fua");
    assert!(file[4096..4096 + big.len()] == big[..]);
    c.disconnect().unwrap();
    let err = haven_nbd::Client::connect(&fx.uri_of("nope"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("\"nope\" refused"), "{err}");
}
