//! A small blocking NBD client: fixed-newstyle handshake with `NBD_OPT_GO`, then one request
//! at a time (READ, WRITE with or without FUA, FLUSH, DISC) over a unix socket or TCP.
//!
//! It exists so haven's own tools can write and read through NBD without an external program:
//! the demo's writer writes through the agent's tap with it, and tests read test-failover views
//! and drive traceable writers with it. It is deliberately simple (no pipelining, simple
//! replies only); the clients that matter for performance are qemu, the kernel and fio.
//!
//! ```no_run
//! # fn demo() -> std::io::Result<()> {
//! let mut c = haven_nbd::Client::connect("nbd+unix:///d0?socket=/var/lib/haven-agent/nbd/d0.sock")?;
//! c.write_at(b"hello", 0, false)?;
//! c.flush()?;
//! let mut buf = [0u8; 5];
//! c.read_at(&mut buf, 0)?;
//! # Ok(()) }
//! ```
use std::{
    io::{self, Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    time::Duration,
};

use crate::proto::*;

/// Bytes of one request (and of a payload) at most: the server's limit.
const MAX_CHUNK: usize = 32 << 20;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Where an NBD URI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `nbd+unix:///EXPORT?socket=PATH`
    Unix { socket: String, export: String },
    /// `nbd://HOST:PORT/EXPORT`
    Tcp { addr: String, export: String },
}

/// Parses the two URI forms haven prints (`nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT/NAME`).
pub fn parse_uri(uri: &str) -> io::Result<Target> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: {why}"));
    if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
        let (export, query) = rest.split_once('?').ok_or_else(|| bad("no ?socket="))?;
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(|| bad("no socket= parameter"))?;
        Ok(Target::Unix {
            socket: socket.to_string(),
            export: export.to_string(),
        })
    } else if let Some(rest) = uri.strip_prefix("nbd://") {
        let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
        if addr.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Target::Tcp {
            addr: addr.to_string(),
            export: export.to_string(),
        })
    } else {
        Err(bad("not an nbd:// or nbd+unix:// URI"))
    }
}

/// One connection to one export.
pub struct Client {
    io: Box<dyn Stream>,
    size: u64,
    flags: u16,
    handle: u64,
}

impl Client {
    /// Connects to an NBD URI and negotiates the export it names.
    pub fn connect(uri: &str) -> io::Result<Client> {
        match parse_uri(uri)? {
            Target::Unix { socket, export } => {
                let s = UnixStream::connect(&socket)
                    .map_err(|e| io::Error::new(e.kind(), format!("connect {socket}: {e}")))?;
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                Client::handshake(Box::new(s), &export)
            }
            Target::Tcp { addr, export } => {
                let s = TcpStream::connect(&addr)
                    .map_err(|e| io::Error::new(e.kind(), format!("connect {addr}: {e}")))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                Client::handshake(Box::new(s), &export)
            }
        }
    }

    fn handshake(mut io: Box<dyn Stream>, export: &str) -> io::Result<Client> {
        let mut hello = [0u8; 18];
        io.read_exact(&mut hello)?;
        if u64_at(&hello, 0) != NBDMAGIC || u64_at(&hello, 8) != IHAVEOPT {
            return Err(protocol("not an NBD fixed-newstyle server"));
        }
        let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("server is not fixed-newstyle"));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        io.write_all(&client_flags.to_be_bytes())?;
        // NBD_OPT_GO: name length, name, no information requests.
        let mut data = Vec::with_capacity(6 + export.len());
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::with_capacity(16 + data.len());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        io.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            let mut head = [0u8; 20];
            io.read_exact(&mut head)?;
            if u64_at(&head, 0) != OPT_REPLY_MAGIC {
                return Err(protocol("bad option reply magic"));
            }
            let kind = u32_at(&head, 12);
            let len = u32_at(&head, 16) as usize;
            if len > 64 << 10 {
                return Err(protocol("option reply too long"));
            }
            let mut body = vec![0u8; len];
            io.read_exact(&mut body)?;
            match kind {
                REP_ACK => break,
                REP_INFO if body.len() >= 12 && u16::from_be_bytes([body[0], body[1]]) == 0 => {
                    size = Some(u64_at(&body, 2));
                    flags = u16::from_be_bytes([body[10], body[11]]);
                }
                REP_INFO => {}
                k if k & REP_ERR != 0 => {
                    let msg = String::from_utf8_lossy(&body);
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("export {export:?} refused (reply {k:#x}): {msg}"),
                    ));
                }
                k => return Err(protocol(&format!("unexpected option reply {k:#x}"))),
            }
        }
        let size = size.ok_or_else(|| protocol("NBD_OPT_GO acknowledged without the size"))?;
        Ok(Client {
            io,
            size,
            flags,
            handle: 0,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server said the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.handle += 1;
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[4..6].copy_from_slice(&flags.to_be_bytes());
        req[6..8].copy_from_slice(&cmd.to_be_bytes());
        req[8..16].copy_from_slice(&self.handle.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&len.to_be_bytes());
        self.io.write_all(&req)?;
        if !payload.is_empty() {
            self.io.write_all(payload)?;
        }
        self.io.flush()
    }

    fn reply(&mut self, what: &str) -> io::Result<()> {
        let mut rep = [0u8; 16];
        self.io.read_exact(&mut rep)?;
        if u32_at(&rep, 0) != SIMPLE_REPLY_MAGIC {
            return Err(protocol("bad reply magic"));
        }
        if u64_at(&rep, 8) != self.handle {
            return Err(protocol("reply for another request"));
        }
        match u32_at(&rep, 4) {
            0 => Ok(()),
            errno => Err(io::Error::other(format!("{what}: NBD error {errno}"))),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_CHUNK);
            self.request(CMD_READ, 0, offset + done as u64, n as u32, &[])?;
            self.reply("read")?;
            self.io.read_exact(&mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` the server makes it durable before answering.
    pub fn write_at(&mut self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        for (i, chunk) in data.chunks(MAX_CHUNK).enumerate() {
            let off = offset + (i * MAX_CHUNK) as u64;
            self.request(CMD_WRITE, flags, off, chunk.len() as u32, chunk)?;
            self.reply("write")?;
        }
        Ok(())
    }

    /// NBD_CMD_FLUSH: every write answered before it is durable (at haven's tap: and a
    /// crash-consistent recovery point is in the replication stream) when this returns.
    pub fn flush(&mut self) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply("flush")
    }

    /// Sends NBD_CMD_DISC (the server answers nothing) and closes.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[])
    }
}

fn protocol(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NBD protocol: {why}"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_uri_forms_and_refuses_others() {
        assert_eq!(
            parse_uri("nbd+unix:///d0?socket=/tmp/a.sock").unwrap(),
            Target::Unix {
                socket: "/tmp/a.sock".into(),
                export: "d0".into()
            }
        );
        assert_eq!(
            parse_uri("nbd://127.0.0.1:10809/root").unwrap(),
            Target::Tcp {
                addr: "127.0.0.1:10809".into(),
                export: "root".into()
            }
        );
        assert!(parse_uri("nbd+unix:///d0").is_err());
        assert!(parse_uri("http://x/y").is_err());
        assert!(parse_uri("nbd:///x").is_err());
    }
}
