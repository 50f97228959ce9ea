//! The NBD server's protocol core (`haven_nbd::proto`), which reads whatever a client on the
//! tap's or a view's socket sends: the handshake state machine and the request parser with
//! its decision.
//!
//! Input: `mode | chunking seed | bytes`. Handshake mode feeds the bytes in chunks of
//! input-chosen sizes and checks the result equals feeding them at once (status, output,
//! bytes consumed), that a feed consumes no more than it is given, and that a final status
//! sticks. Request mode parses the bytes as 28-byte headers: what parses re-encodes to the
//! same bytes, and every decision keeps its promises (served requests are in range and
//! within the payload bound, nothing is written on a read-only export, only writes drain or
//! close).
use haven_nbd::proto::*;

use crate::mutate::Rng;

struct Catalog;

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "disk" => Some(ExportInfo {
                size: 1 << 30,
                flags: transmission_flags(false, true),
            }),
            "ro" => Some(ExportInfo {
                size: 4096,
                flags: transmission_flags(true, false),
            }),
            "" => Some(ExportInfo {
                size: 0,
                flags: transmission_flags(false, false),
            }),
            _ => None,
        }
    }
    fn names(&self) -> Vec<String> {
        vec!["disk".into(), "ro".into(), String::new()]
    }
}

fn handshake(seed: u8, data: &[u8]) {
    let mut whole = Handshake::new();
    let (used_whole, status_whole) = whole.feed(data, &Catalog);
    assert!(used_whole <= data.len());
    let out_whole = whole.take_output();

    let mut chunked = Handshake::new();
    let mut rng = Rng::new(u64::from(seed) + 1);
    let mut used = 0;
    let mut out = chunked.take_output(); // the greeting
    let mut status = HandshakeStatus::NeedInput;
    while used < data.len() {
        let n = [1, 2, 3, 7, 16, 20, 4096, usize::MAX][rng.below(8)].min(data.len() - used);
        let (u, s) = chunked.feed(&data[used..used + n], &Catalog);
        assert!(u <= n, "consumed {u} of {n}");
        used += u;
        out.extend(chunked.take_output());
        status = s;
        if status != HandshakeStatus::NeedInput {
            break;
        }
        assert_eq!(
            u, n,
            "a handshake that needs input consumed less than it got"
        );
    }
    assert_eq!(used, used_whole);
    assert_eq!(status, status_whole);
    assert_eq!(out, out_whole);
    if status != HandshakeStatus::NeedInput {
        // Final: nothing more is consumed, the status repeats, no more output.
        assert_eq!(chunked.feed(b"more", &Catalog), (0, status));
        assert!(chunked.output().is_empty());
    }
    if let HandshakeStatus::Transmission { export, info } = &status_whole {
        assert_eq!(Catalog.lookup(export).as_ref(), Some(info));
    }
}

fn requests(data: &[u8]) {
    let exports = [
        Catalog.lookup("disk").unwrap(),
        Catalog.lookup("ro").unwrap(),
        Catalog.lookup("").unwrap(),
    ];
    for chunk in data.chunks_exact(REQUEST_LEN) {
        let bytes: &[u8; REQUEST_LEN] = chunk.try_into().unwrap();
        let Ok(req) = parse_request(bytes) else {
            assert_ne!(bytes[..4], REQUEST_MAGIC.to_be_bytes());
            continue;
        };
        assert_eq!(&encode_request(&req), bytes);
        for info in &exports {
            check_decision(&req, info, decide(&req, info));
        }
    }
}

fn check_decision(req: &Request, info: &ExportInfo, decision: Decision) {
    let read_only = info.flags & FLAG_READ_ONLY != 0;
    let in_range = |offset: u64, len: u32| {
        offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= info.size)
    };
    match decision {
        Decision::Execute(cmd) => {
            assert_eq!(req.flags & !CMD_FLAGS_ACCEPTED, 0);
            match cmd {
                Command::Read { offset, len } => {
                    assert!(len <= MAX_PAYLOAD && in_range(offset, len));
                }
                Command::Write { offset, len, .. } => {
                    assert!(!read_only && len <= MAX_PAYLOAD && in_range(offset, len));
                }
                Command::Trim { offset, len } | Command::WriteZeroes { offset, len, .. } => {
                    assert!(!read_only && in_range(offset, len));
                }
                Command::Flush | Command::Disconnect => {}
            }
        }
        Decision::Reject { error, drain } => {
            assert!([EPERM, EINVAL, ENOSPC].contains(&error));
            let payload = if req.kind == CMD_WRITE { req.length } else { 0 };
            assert_eq!(drain, payload);
            assert!(drain <= MAX_DRAIN);
        }
        Decision::Close(RequestClose::PayloadTooLarge(len)) => {
            assert!(req.kind == CMD_WRITE && len == req.length && len > MAX_DRAIN);
        }
    }
}

pub fn fuzz(data: &[u8]) {
    let [mode, seed, rest @ ..] = data else {
        return;
    };
    if mode & 1 == 0 {
        handshake(*seed, rest);
    } else {
        requests(rest);
    }
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

pub fn seeds() -> Vec<Vec<u8>> {
    let flags = 3u32.to_be_bytes().to_vec();
    let transcripts = [
        [opt(OPT_GO, &go("disk", &[INFO_BLOCK_SIZE]))].concat(),
        [
            opt(OPT_LIST, &[]),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_INFO, &go("ro", &[INFO_NAME, INFO_DESCRIPTION])),
            opt(OPT_GO, &go("nope", &[])),
            opt(OPT_EXPORT_NAME, b"disk"),
        ]
        .concat(),
        opt(OPT_ABORT, &[]),
        opt(OPT_EXPORT_NAME, b""),
        [opt(OPT_INFO, &vec![0; 5000]), opt(OPT_GO, &go("", &[]))].concat(),
    ];
    let mut seeds: Vec<Vec<u8>> = transcripts
        .iter()
        .map(|t| [&[0u8, 7][..], &flags, t].concat())
        .collect();
    let mut reqs = vec![1u8, 0];
    for (kind, flags, offset, length) in [
        (CMD_READ, 0, 0, 4096),
        (CMD_WRITE, CMD_FLAG_FUA, 4096, 512),
        (CMD_WRITE, 0, 0, MAX_PAYLOAD + 1),
        (CMD_WRITE, 0, 0, u32::MAX),
        (CMD_FLUSH, 0, 0, 0),
        (CMD_TRIM, 0, 1 << 29, 1 << 20),
        (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, u64::MAX, 1),
        (CMD_DISC, 0, 0, 0),
        (CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1),
    ] {
        reqs.extend(encode_request(&Request {
            flags,
            kind,
            handle: 7,
            offset,
            length,
        }));
    }
    seeds.push(reqs);
    seeds
}
