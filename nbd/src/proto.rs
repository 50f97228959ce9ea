//! The NBD protocol without I/O: constants, the fixed-newstyle handshake as a state machine
//! that is fed bytes and queues the bytes to send, the 28-byte request parser, the decision
//! of what a request asks for (checked against the export), and the simple-reply encoder.
//!
//! Nothing here touches a socket, allocates beyond its documented bounds, or panics on input;
//! `server.rs` drives it and the fuzz target `nbd_proto` feeds it arbitrary bytes.
//! Spec: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the magic in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic in front of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a (compact) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
/// The command flags a request may carry here. DF and REQ_ONE only mean something with
/// structured replies (never negotiated), so they are accepted and ignored; NO_HOLE is only
/// meaningful on WRITE_ZEROES and ignored elsewhere. FAST_ZERO, PAYLOAD_LEN (neither
/// negotiated) and unknown bits are refused with EINVAL.
pub const CMD_FLAGS_ACCEPTED: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE;

// Errors (the values are Linux errno values, fixed by the spec).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The largest option data buffered (the spec's bound on a string is 4096 bytes; a GO with
/// a 4096-byte name and a few info requests still fits).
pub const MAX_OPTION_DATA: u32 = 4096 + 64;
/// Option data above [`MAX_OPTION_DATA`] and up to this is skipped (not buffered) and answered
/// `NBD_REP_ERR_TOO_BIG`; more closes the connection.
pub const MAX_OPTION_SKIP: u32 = 64 * 1024;
/// Options per connection before the server hangs up (a client looping on options).
pub const MAX_OPTIONS: u32 = 256;
/// The largest read or write payload served: 64 MiB.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// A refused write's payload up to this is read and discarded so the connection survives;
/// a larger one closes the connection (reading 4 GiB of garbage helps nobody).
pub const MAX_DRAIN: u32 = 128 << 20;
/// Block sizes advertised in `NBD_INFO_BLOCK_SIZE`: any alignment works, 4 KiB is
/// preferred, payloads up to [`MAX_PAYLOAD`] (qemu clamps this to its own 32 MiB).
pub const BLOCK_MIN: u32 = 1;
pub const BLOCK_PREFERRED: u32 = 4096;
pub const BLOCK_MAX: u32 = MAX_PAYLOAD;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const REPLY_LEN: usize = 16;

/// The greeting the server sends first: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// What the handshake needs to know about an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (see [`transmission_flags`]).
    pub flags: u16,
}

/// The transmission flags of an export.
pub fn transmission_flags(read_only: bool, multi_conn: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH;
    if read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    if multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// The exports the handshake may hand out.
pub trait ExportCatalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// The names `NBD_OPT_LIST` answers with.
    fn names(&self) -> Vec<String>;
}

/// Why the handshake ends without transmission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    #[error("client sent NBD_OPT_ABORT")]
    Abort,
    #[error("client flags {0:#x} have unknown bits")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} with {len} bytes of data is too large")]
    OptionTooLarge { option: u32, len: u32 },
    #[error("NBD_OPT_EXPORT_NAME for an unknown export {0:?}")]
    UnknownExport(String),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

/// Where the handshake stands after a [`Handshake::feed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeStatus {
    /// Send the output, then feed more input.
    NeedInput,
    /// Send the output; transmission on `export` begins with the next input byte.
    Transmission { export: String, info: ExportInfo },
    /// Send the output, then close the connection.
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptHeader,
    OptData { option: u32, len: u32 },
    Skip { option: u32, remaining: u32 },
    Done,
}

/// The server side of the fixed-newstyle handshake, fed bytes with no I/O.
///
/// `new` queues the greeting. Each [`feed`](Self::feed) consumes only the bytes the handshake
/// needs (what follows is the start of transmission, which stays with the caller), answers
/// every complete option into the output, and says what to do next. At most
/// `16 + MAX_OPTION_DATA` input bytes are buffered.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    buf: Vec<u8>,
    out: Vec<u8>,
    no_zeroes: bool,
    options: u32,
    finished: Option<HandshakeStatus>,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    pub fn new() -> Self {
        Handshake {
            state: State::ClientFlags,
            buf: Vec::new(),
            out: greeting().to_vec(),
            no_zeroes: false,
            options: 0,
            finished: None,
        }
    }

    /// The bytes to send, in order; take them before waiting for input.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The bytes to send so far, without taking them.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Feeds input; returns how many bytes were consumed and the status. Once the status is
    /// `Transmission` or `Close`, further feeds consume nothing and repeat it.
    pub fn feed(&mut self, input: &[u8], catalog: &dyn ExportCatalog) -> (usize, HandshakeStatus) {
        let mut used = 0;
        loop {
            if let Some(done) = &self.finished {
                return (used, done.clone());
            }
            let rest = &input[used..];
            match self.state {
                State::Done => unreachable_status(),
                State::Skip { option, remaining } => {
                    let n = (remaining as usize).min(rest.len());
                    used += n;
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.state = State::Skip { option, remaining };
                        return (used, HandshakeStatus::NeedInput);
                    }
                    self.reply(option, REP_ERR_TOO_BIG, b"option data too large");
                    self.state = State::OptHeader;
                }
                state => {
                    let need = match state {
                        State::ClientFlags => 4,
                        State::OptHeader => 16,
                        State::OptData { len, .. } => len as usize,
                        State::Skip { .. } | State::Done => 0,
                    };
                    let n = (need - self.buf.len()).min(rest.len());
                    self.buf.extend_from_slice(&rest[..n]);
                    used += n;
                    if self.buf.len() < need {
                        return (used, HandshakeStatus::NeedInput);
                    }
                    let item = std::mem::take(&mut self.buf);
                    self.step(state, &item, catalog);
                    // Reuse the allocation for the next item.
                    self.buf = item;
                    self.buf.clear();
                }
            }
        }
    }

    fn finish(&mut self, status: HandshakeStatus) {
        self.state = State::Done;
        self.finished = Some(status);
    }

    fn step(&mut self, state: State, item: &[u8], catalog: &dyn ExportCatalog) {
        match state {
            State::ClientFlags => {
                let flags = be32(item, 0);
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return self.finish(HandshakeStatus::Close(CloseReason::UnknownClientFlags(
                        flags,
                    )));
                }
                // A client without FIXED_NEWSTYLE only sends NBD_OPT_EXPORT_NAME, which is
                // answered the same way; nothing else changes for it.
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.state = State::OptHeader;
            }
            State::OptHeader => {
                let magic = be64(item, 0);
                let option = be32(item, 8);
                let len = be32(item, 12);
                if magic != IHAVEOPT {
                    return self.finish(HandshakeStatus::Close(CloseReason::BadOptionMagic(magic)));
                }
                self.options += 1;
                if self.options > MAX_OPTIONS {
                    return self.finish(HandshakeStatus::Close(CloseReason::TooManyOptions));
                }
                self.state = if len <= MAX_OPTION_DATA {
                    State::OptData { option, len }
                } else if len <= MAX_OPTION_SKIP && option != OPT_EXPORT_NAME {
                    State::Skip {
                        option,
                        remaining: len,
                    }
                } else {
                    // EXPORT_NAME cannot be answered with an error: the spec says hang up.
                    return self.finish(HandshakeStatus::Close(CloseReason::OptionTooLarge {
                        option,
                        len,
                    }));
                };
            }
            State::OptData { option, .. } => {
                self.state = State::OptHeader;
                self.option(option, item, catalog);
            }
            State::Skip { .. } | State::Done => {}
        }
    }

    fn option(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) {
        match option {
            OPT_EXPORT_NAME => {
                let Ok(name) = std::str::from_utf8(data) else {
                    let name = String::from_utf8_lossy(data).into_owned();
                    return self.finish(HandshakeStatus::Close(CloseReason::UnknownExport(name)));
                };
                let Some(info) = catalog.lookup(name) else {
                    return self.finish(HandshakeStatus::Close(CloseReason::UnknownExport(
                        name.to_owned(),
                    )));
                };
                self.out.extend_from_slice(&info.size.to_be_bytes());
                self.out.extend_from_slice(&info.flags.to_be_bytes());
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0u8; 124]);
                }
                self.finish(HandshakeStatus::Transmission {
                    export: name.to_owned(),
                    info,
                });
            }
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[]);
                self.finish(HandshakeStatus::Close(CloseReason::Abort));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return self.reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                }
                for name in catalog.names() {
                    let name = name.as_bytes();
                    // A name longer than the spec's string bound is not listed.
                    if name.len() > 4096 {
                        continue;
                    }
                    let mut body = Vec::with_capacity(4 + name.len());
                    body.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    body.extend_from_slice(name);
                    self.reply(option, REP_SERVER, &body);
                }
                self.reply(option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, catalog),
            _ => self.reply(option, REP_ERR_UNSUP, b"option not supported"),
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) {
        let Some(request) = parse_info_request(data) else {
            return self.reply(option, REP_ERR_INVALID, b"malformed info request");
        };
        let Ok(name) = std::str::from_utf8(request.name) else {
            return self.reply(option, REP_ERR_INVALID, b"export name is not UTF-8");
        };
        let Some(info) = catalog.lookup(name) else {
            return self.reply(option, REP_ERR_UNKNOWN, b"unknown export");
        };
        let mut export = [0u8; 12];
        export[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        export[2..10].copy_from_slice(&info.size.to_be_bytes());
        export[10..].copy_from_slice(&info.flags.to_be_bytes());
        self.reply(option, REP_INFO, &export);
        if request.wants(INFO_NAME) {
            let mut body = Vec::with_capacity(2 + name.len());
            body.extend_from_slice(&INFO_NAME.to_be_bytes());
            body.extend_from_slice(name.as_bytes());
            self.reply(option, REP_INFO, &body);
        }
        // Sent whether or not it was asked for (the spec allows it): clients learn that any
        // alignment works and how large a request may be.
        let mut block = [0u8; 14];
        block[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        block[2..6].copy_from_slice(&BLOCK_MIN.to_be_bytes());
        block[6..10].copy_from_slice(&BLOCK_PREFERRED.to_be_bytes());
        block[10..].copy_from_slice(&BLOCK_MAX.to_be_bytes());
        self.reply(option, REP_INFO, &block);
        self.reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            self.finish(HandshakeStatus::Transmission {
                export: name.to_owned(),
                info,
            });
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        encode_option_reply(&mut self.out, option, kind, data);
    }
}

fn unreachable_status() -> ! {
    // `finished` is always set when the state is `Done`.
    unreachable!("handshake state Done without a final status")
}

/// Appends one option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    /// The information types asked for (big-endian u16s).
    pub requests: &'a [u8],
}

impl InfoRequest<'_> {
    fn wants(&self, kind: u16) -> bool {
        self.requests
            .chunks_exact(2)
            .any(|c| u16::from_be_bytes([c[0], c[1]]) == kind)
    }
}

/// Parses `u32 name length, name, u16 count, count × u16`; `None` unless the lengths add up.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let requests = &rest[2..];
    (requests.len() == count * 2).then_some(InfoRequest { name, requests })
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// A request header whose magic is not `NBD_REQUEST_MAGIC`: the stream is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

/// Parses a 28-byte request header.
pub fn parse_request(buf: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
    let magic = be32(buf, 0);
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        kind: u16::from_be_bytes([buf[6], buf[7]]),
        handle: be64(buf, 8),
        offset: be64(buf, 16),
        length: be32(buf, 24),
    })
}

/// Encodes a request header (for clients and tests).
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&req.flags.to_be_bytes());
    b[6..8].copy_from_slice(&req.kind.to_be_bytes());
    b[8..16].copy_from_slice(&req.handle.to_be_bytes());
    b[16..24].copy_from_slice(&req.offset.to_be_bytes());
    b[24..].copy_from_slice(&req.length.to_be_bytes());
    b
}

/// Encodes a simple reply header (a successful read's data follows it).
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A request that passed every check: the backend is called with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
}

/// Why a request ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestClose {
    #[error("write payload of {0} bytes is larger than the {MAX_DRAIN} bytes drained")]
    PayloadTooLarge(u32),
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Execute(Command),
    /// Read and discard `drain` payload bytes, then reply with `error`.
    Reject {
        error: u32,
        drain: u32,
    },
    /// Close the connection.
    Close(RequestClose),
}

/// Checks a request against the export: command, flags, length bound, range, read-only.
pub fn decide(req: &Request, export: &ExportInfo) -> Decision {
    let payload = if req.kind == CMD_WRITE { req.length } else { 0 };
    if payload > MAX_DRAIN {
        return Decision::Close(RequestClose::PayloadTooLarge(payload));
    }
    let reject = |error| Decision::Reject {
        error,
        drain: payload,
    };
    if req.flags & !CMD_FLAGS_ACCEPTED != 0 {
        return reject(EINVAL);
    }
    let read_only = export.flags & FLAG_READ_ONLY != 0;
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= export.size);
    let (offset, len, fua) = (req.offset, req.length, req.flags & CMD_FLAG_FUA != 0);
    let command = match req.kind {
        CMD_READ | CMD_WRITE if len > MAX_PAYLOAD => return reject(EINVAL),
        CMD_READ if !in_range => return reject(EINVAL),
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if read_only => return reject(EPERM),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range => return reject(ENOSPC),
        CMD_TRIM if !in_range => return reject(EINVAL),
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes { offset, len, fua },
        CMD_FLUSH => Command::Flush,
        CMD_DISC => Command::Disconnect,
        _ => return reject(EINVAL),
    };
    Decision::Execute(command)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Two;
    impl ExportCatalog for Two {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            match name {
                "disk" => Some(ExportInfo {
                    size: 1 << 20,
                    flags: transmission_flags(false, true),
                }),
                "ro" => Some(ExportInfo {
                    size: 4096,
                    flags: transmission_flags(true, false),
                }),
                _ => None,
            }
        }
        fn names(&self) -> Vec<String> {
            vec!["disk".into(), "ro".into()]
        }
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    fn rep(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_option_reply(&mut v, option, kind, data);
        v
    }

    /// A handshake past the client flags (FIXED_NEWSTYLE | NO_ZEROES), output taken.
    fn started() -> Handshake {
        let mut h = Handshake::new();
        assert_eq!(h.take_output(), greeting());
        assert_eq!(
            h.feed(&3u32.to_be_bytes(), &Two),
            (4, HandshakeStatus::NeedInput)
        );
        assert!(h.output().is_empty());
        h
    }

    #[test]
    fn greeting_bytes() {
        assert_eq!(
            greeting(),
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0, 3
            ]
        );
    }

    #[test]
    fn go_replies_export_and_block_size_then_transmission() {
        let mut h = started();
        let input = opt(OPT_GO, &go_data("disk", &[INFO_BLOCK_SIZE]));
        let (used, status) = h.feed(&input, &Two);
        assert_eq!(used, input.len());
        let info = Two.lookup("disk").unwrap();
        assert_eq!(
            status,
            HandshakeStatus::Transmission {
                export: "disk".into(),
                info
            }
        );
        let mut want = rep(
            OPT_GO,
            REP_INFO,
            &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d],
        );
        want.extend(rep(
            OPT_GO,
            REP_INFO,
            &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x04, 0, 0, 0],
        ));
        want.extend(rep(OPT_GO, REP_ACK, &[]));
        assert_eq!(h.take_output(), want);
        // Input after GO is transmission: not consumed.
        assert_eq!(h.feed(&[1, 2, 3], &Two).0, 0);
    }

    #[test]
    fn flags_of_exports() {
        assert_eq!(transmission_flags(false, true), 0x16d);
        assert_eq!(transmission_flags(true, false), 0x07);
    }

    #[test]
    fn info_with_name_then_go_byte_by_byte() {
        let mut h = started();
        let mut input = opt(OPT_INFO, &go_data("ro", &[INFO_NAME]));
        input.extend(opt(OPT_GO, &go_data("ro", &[])));
        input.extend([0xee; 5]); // the first transmission bytes
        let mut used = 0;
        let mut status = HandshakeStatus::NeedInput;
        for i in 0..input.len() {
            let (n, s) = h.feed(&input[i..i + 1], &Two);
            used += n;
            status = s;
            if status != HandshakeStatus::NeedInput {
                break;
            }
        }
        assert_eq!(used, input.len() - 5);
        assert!(
            matches!(status, HandshakeStatus::Transmission { ref export, .. } if export == "ro")
        );
        let export = [0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x07];
        let block = [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x04, 0, 0, 0];
        let mut want = rep(OPT_INFO, REP_INFO, &export[..]);
        want.extend(rep(OPT_INFO, REP_INFO, &[0, 1, b'r', b'o']));
        want.extend(rep(OPT_INFO, REP_INFO, &block));
        want.extend(rep(OPT_INFO, REP_ACK, &[]));
        want.extend(rep(OPT_GO, REP_INFO, &export[..]));
        want.extend(rep(OPT_GO, REP_INFO, &block));
        want.extend(rep(OPT_GO, REP_ACK, &[]));
        assert_eq!(h.take_output(), want);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let mut h = started();
        let input = opt(OPT_EXPORT_NAME, b"disk");
        let (used, status) = h.feed(&input, &Two);
        assert_eq!(used, input.len());
        assert!(matches!(status, HandshakeStatus::Transmission { .. }));
        assert_eq!(h.take_output(), [0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d]);

        let mut h = Handshake::new();
        h.take_output();
        let mut input = 1u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE only
        input.extend(opt(OPT_EXPORT_NAME, b"ro"));
        let (_, status) = h.feed(&input, &Two);
        assert!(matches!(status, HandshakeStatus::Transmission { .. }));
        let out = h.take_output();
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&out[..10], &[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x07]);
        assert!(out[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn export_name_unknown_closes() {
        let mut h = started();
        let (_, status) = h.feed(&opt(OPT_EXPORT_NAME, b"nope"), &Two);
        assert_eq!(
            status,
            HandshakeStatus::Close(CloseReason::UnknownExport("nope".into()))
        );
        assert!(h.take_output().is_empty());
    }

    #[test]
    fn list_names_every_export() {
        let mut h = started();
        let (_, status) = h.feed(&opt(OPT_LIST, &[]), &Two);
        assert_eq!(status, HandshakeStatus::NeedInput);
        let mut want = rep(OPT_LIST, REP_SERVER, &[0, 0, 0, 4, b'd', b'i', b's', b'k']);
        want.extend(rep(OPT_LIST, REP_SERVER, &[0, 0, 0, 2, b'r', b'o']));
        want.extend(rep(OPT_LIST, REP_ACK, &[]));
        assert_eq!(h.take_output(), want);
        h.feed(&opt(OPT_LIST, &[0]), &Two);
        assert_eq!(
            h.take_output(),
            rep(OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
        );
    }

    #[test]
    fn abort_acks_and_closes() {
        let mut h = started();
        let (_, status) = h.feed(&opt(OPT_ABORT, &[]), &Two);
        assert_eq!(status, HandshakeStatus::Close(CloseReason::Abort));
        assert_eq!(h.take_output(), rep(OPT_ABORT, REP_ACK, &[]));
    }

    #[test]
    fn unknown_options_are_unsupported_not_fatal() {
        let mut h = started();
        for option in [
            OPT_STRUCTURED_REPLY,
            OPT_EXTENDED_HEADERS,
            OPT_STARTTLS,
            OPT_SET_META_CONTEXT,
            OPT_LIST_META_CONTEXT,
            4,
            12,
            0,
            0xdead_beef,
        ] {
            let (_, status) = h.feed(&opt(option, b"xyz"), &Two);
            assert_eq!(status, HandshakeStatus::NeedInput);
            assert_eq!(
                h.take_output(),
                rep(option, REP_ERR_UNSUP, b"option not supported")
            );
        }
        // Still usable afterwards.
        let (_, status) = h.feed(&opt(OPT_GO, &go_data("disk", &[])), &Two);
        assert!(matches!(status, HandshakeStatus::Transmission { .. }));
    }

    #[test]
    fn go_errors_unknown_and_malformed() {
        let mut h = started();
        h.feed(&opt(OPT_GO, &go_data("nope", &[])), &Two);
        assert_eq!(
            h.take_output(),
            rep(OPT_GO, REP_ERR_UNKNOWN, b"unknown export")
        );
        h.feed(&opt(OPT_INFO, &go_data("nope", &[])), &Two);
        assert_eq!(
            h.take_output(),
            rep(OPT_INFO, REP_ERR_UNKNOWN, b"unknown export")
        );
        let invalid = rep(OPT_GO, REP_ERR_INVALID, b"malformed info request");
        for data in [
            &[][..],
            &[0, 0, 0, 9, b'd', b'i', b's', b'k', 0, 0], // name longer than data
            &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0],    // no count
            &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 1], // count 1, no request
            &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0, 0], // trailing byte
            &[0xff, 0xff, 0xff, 0xff, 0, 0],
        ] {
            let (_, status) = h.feed(&opt(OPT_GO, data), &Two);
            assert_eq!(status, HandshakeStatus::NeedInput);
            assert_eq!(h.take_output(), invalid, "{data:?}");
        }
        h.feed(&opt(OPT_GO, &[0, 0, 0, 1, 0xff, 0, 0]), &Two);
        assert_eq!(
            h.take_output(),
            rep(OPT_GO, REP_ERR_INVALID, b"export name is not UTF-8")
        );
    }

    #[test]
    fn oversize_options_are_skipped_or_close() {
        let mut h = started();
        let len = MAX_OPTION_DATA + 1;
        let mut input = opt(OPT_GO, &[]);
        input[12..16].copy_from_slice(&len.to_be_bytes());
        input.extend(vec![7u8; len as usize]);
        // Fed in two parts: nothing is buffered, the reply comes after the whole skip.
        let (n, status) = h.feed(&input[..100], &Two);
        assert_eq!((n, status), (100, HandshakeStatus::NeedInput));
        assert!(h.buf.capacity() <= 16 + MAX_OPTION_DATA as usize);
        let (n, status) = h.feed(&input[100..], &Two);
        assert_eq!((n, status), (input.len() - 100, HandshakeStatus::NeedInput));
        assert_eq!(
            h.take_output(),
            rep(OPT_GO, REP_ERR_TOO_BIG, b"option data too large")
        );

        let mut header = opt(OPT_INFO, &[]);
        header[12..16].copy_from_slice(&(MAX_OPTION_SKIP + 1).to_be_bytes());
        let (_, status) = h.feed(&header, &Two);
        assert_eq!(
            status,
            HandshakeStatus::Close(CloseReason::OptionTooLarge {
                option: OPT_INFO,
                len: MAX_OPTION_SKIP + 1
            })
        );

        let mut h = started();
        let mut header = opt(OPT_EXPORT_NAME, &[]);
        header[12..16].copy_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
        let (_, status) = h.feed(&header, &Two);
        assert!(matches!(
            status,
            HandshakeStatus::Close(CloseReason::OptionTooLarge { .. })
        ));
    }

    #[test]
    fn bad_client_flags_bad_magic_too_many_options() {
        let mut h = Handshake::new();
        let (_, status) = h.feed(&4u32.to_be_bytes(), &Two);
        assert_eq!(
            status,
            HandshakeStatus::Close(CloseReason::UnknownClientFlags(4))
        );

        let mut h = started();
        let mut input = opt(OPT_LIST, &[]);
        input[0] ^= 1;
        let (_, status) = h.feed(&input, &Two);
        assert!(matches!(
            status,
            HandshakeStatus::Close(CloseReason::BadOptionMagic(_))
        ));

        let mut h = started();
        let one = opt(99, &[]);
        for _ in 0..MAX_OPTIONS {
            assert_eq!(h.feed(&one, &Two).1, HandshakeStatus::NeedInput);
        }
        assert_eq!(
            h.feed(&one, &Two).1,
            HandshakeStatus::Close(CloseReason::TooManyOptions)
        );
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 0x0102_0304_0506_0708,
            offset,
            length,
        }
    }

    #[test]
    fn request_round_trip_and_bytes() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 0x1000, 512);
        let bytes = encode_request(&r);
        assert_eq!(
            bytes,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
        assert_eq!(parse_request(&bytes), Ok(r));
        let mut bad = bytes;
        bad[3] = 0x14;
        assert_eq!(parse_request(&bad), Err(BadMagic(0x2560_9514)));
        assert_eq!(
            encode_simple_reply(EIO, 0x0102_0304_0506_0708),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn decide_every_command() {
        let rw = Two.lookup("disk").unwrap();
        let size = rw.size;
        use Command::*;
        let ok = |r: Request| decide(&r, &rw);
        let exec = Decision::Execute;
        assert_eq!(
            ok(req(CMD_READ, 0, 0, 4096)),
            exec(Read {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            ok(req(CMD_READ, CMD_FLAG_FUA | CMD_FLAG_DF, 8, 1)),
            exec(Read { offset: 8, len: 1 })
        );
        assert_eq!(
            ok(req(CMD_WRITE, CMD_FLAG_FUA, size - 512, 512)),
            exec(Write {
                offset: size - 512,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            ok(req(CMD_WRITE, 0, 0, 0)),
            exec(Write {
                offset: 0,
                len: 0,
                fua: false
            })
        );
        assert_eq!(ok(req(CMD_FLUSH, 0, 0, 0)), exec(Flush));
        assert_eq!(
            ok(req(CMD_TRIM, 0, 4096, 8192)),
            exec(Trim {
                offset: 4096,
                len: 8192
            })
        );
        assert_eq!(
            ok(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, size as u32)),
            exec(WriteZeroes {
                offset: 0,
                len: size as u32,
                fua: false
            })
        );
        assert_eq!(ok(req(CMD_DISC, 0, 0, 0)), exec(Disconnect));
    }

    #[test]
    fn decide_rejections() {
        let rw = Two.lookup("disk").unwrap();
        let ro = Two.lookup("ro").unwrap();
        let size = rw.size;
        let rej = |error, drain| Decision::Reject { error, drain };
        // Out of range: EINVAL for reads and trims, ENOSPC for writes.
        assert_eq!(decide(&req(CMD_READ, 0, size, 1), &rw), rej(EINVAL, 0));
        assert_eq!(decide(&req(CMD_READ, 0, u64::MAX, 2), &rw), rej(EINVAL, 0));
        assert_eq!(decide(&req(CMD_TRIM, 0, size - 1, 2), &rw), rej(EINVAL, 0));
        assert_eq!(decide(&req(CMD_WRITE, 0, size - 1, 2), &rw), rej(ENOSPC, 2));
        assert_eq!(
            decide(&req(CMD_WRITE_ZEROES, 0, size, 1), &rw),
            rej(ENOSPC, 0)
        );
        // Read-only: EPERM for every write, payload drained; reads and flushes work.
        assert_eq!(decide(&req(CMD_WRITE, 0, 0, 512), &ro), rej(EPERM, 512));
        assert_eq!(decide(&req(CMD_TRIM, 0, 0, 512), &ro), rej(EPERM, 0));
        assert_eq!(
            decide(&req(CMD_WRITE_ZEROES, 0, 0, 512), &ro),
            rej(EPERM, 0)
        );
        assert!(matches!(
            decide(&req(CMD_READ, 0, 0, 512), &ro),
            Decision::Execute(_)
        ));
        assert!(matches!(
            decide(&req(CMD_FLUSH, 0, 0, 0), &ro),
            Decision::Execute(_)
        ));
        // Oversize: 64 MiB is served; more is EINVAL (a write's payload drained up to a
        // bound; beyond it the connection closes).
        let big = Request {
            offset: 0,
            ..req(CMD_READ, 0, 0, MAX_PAYLOAD)
        };
        let huge = ExportInfo {
            size: 1 << 40,
            flags: rw.flags,
        };
        assert!(matches!(decide(&big, &huge), Decision::Execute(_)));
        assert_eq!(
            decide(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &huge),
            rej(EINVAL, 0)
        );
        assert_eq!(
            decide(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &huge),
            rej(EINVAL, MAX_PAYLOAD + 1)
        );
        assert_eq!(
            decide(&req(CMD_WRITE, 0, 0, MAX_DRAIN + 1), &huge),
            Decision::Close(RequestClose::PayloadTooLarge(MAX_DRAIN + 1))
        );
        // Trims and zeroes carry no payload: no 64 MiB bound.
        assert!(matches!(
            decide(&req(CMD_TRIM, 0, 0, u32::MAX), &huge),
            Decision::Execute(_)
        ));
        // Flags not negotiated, unknown commands.
        assert_eq!(
            decide(&req(CMD_WRITE, CMD_FLAG_FAST_ZERO, 0, 8), &rw),
            rej(EINVAL, 8)
        );
        assert_eq!(decide(&req(CMD_READ, 1 << 15, 0, 8), &rw), rej(EINVAL, 0));
        assert_eq!(
            decide(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 8), &rw),
            rej(EINVAL, 0)
        );
        for kind in [CMD_CACHE, CMD_BLOCK_STATUS, 8, 99, u16::MAX] {
            assert_eq!(decide(&req(kind, 0, 0, 8), &rw), rej(EINVAL, 0));
        }
    }
}
