//! Frames as the roles read them off a QUIC stream (`haven_transport::frame`), over an
//! in-memory reader that hands out the bytes in chunks of input-chosen sizes, sometimes
//! not ready, sometimes failing.
//!
//! Input: `limit | chunking seed | flags | stream bytes`. The frames read are compared with
//! a reference parse of the same bytes; in typed mode each frame is also decoded as a
//! `Request` (as the acceptor does), and the stream is read with `expect_msg`.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::executor::block_on;
use haven_roles::proto::{Request, Response};
use haven_transport::codec;
use haven_transport::frame::{self, FrameError, MAX_CONTROL_FRAME, MAX_DATA_FRAME};
use tokio::io::{AsyncRead, ReadBuf};

use crate::mutate::Rng;
use crate::samples;

struct Chunked<'a> {
    data: &'a [u8],
    rng: Rng,
    /// Fail with an I/O error once this many bytes were read.
    fail_at: Option<usize>,
    read: usize,
    pending: bool,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending && this.rng.below(4) == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if this.fail_at.is_some_and(|at| this.read >= at) {
            return Poll::Ready(Err(io::Error::other("injected read failure")));
        }
        let n = [1, 2, 3, 4, 7, 64, 4096, usize::MAX][this.rng.below(8)]
            .min(this.data.len())
            .min(buf.remaining());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        this.read += n;
        Poll::Ready(Ok(()))
    }
}

#[derive(Debug, PartialEq)]
enum Expected {
    Frame(Vec<u8>),
    End,
    Truncated,
    TooLarge { len: usize, max: usize },
}

/// What a correct reader returns next for `stream[pos..]`, and where it leaves `pos`.
fn reference(stream: &[u8], pos: &mut usize, max: usize) -> Expected {
    let rest = &stream[*pos..];
    if rest.is_empty() {
        return Expected::End;
    }
    if rest.len() < 4 {
        *pos = stream.len();
        return Expected::Truncated;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
    if len > max {
        *pos += 4;
        return Expected::TooLarge { len, max };
    }
    if rest.len() - 4 < len {
        *pos = stream.len();
        return Expected::Truncated;
    }
    *pos += 4 + len;
    Expected::Frame(rest[4..4 + len].to_vec())
}

pub fn fuzz(data: &[u8]) {
    let [limit, chunking, flags, stream @ ..] = data else {
        return;
    };
    let max = match limit % 4 {
        0 => MAX_CONTROL_FRAME,
        1 => MAX_DATA_FRAME,
        // Small limits, so that the limit's edge is reached with small inputs.
        _ => *limit as usize,
    };
    let typed = flags & 1 != 0;
    let fail_at = (flags & 2 != 0).then(|| (*chunking as usize) % (stream.len() + 1));
    let mut reader = Chunked {
        data: stream,
        rng: Rng::new(u64::from(*chunking) + 1),
        fail_at,
        read: 0,
        pending: flags & 4 != 0,
    };
    if typed && flags & 8 != 0 {
        // One typed message, the way a client reads its response.
        match block_on(frame::expect_msg::<Response>(&mut reader, max)) {
            Ok(_) | Err(FrameError::Closed) => {}
            Err(FrameError::Io(_) | FrameError::Truncated | FrameError::Codec(_)) => {}
            Err(FrameError::TooLarge { len, max: m }) => assert!(len > m && m == max),
            Err(e) => panic!("unexpected error {e:?}"),
        }
        return;
    }
    let mut pos = 0;
    for _ in 0..64 {
        let got = block_on(frame::read_frame(&mut reader, max));
        if let (Err(FrameError::Io(_)), Some(_)) = (&got, fail_at) {
            return; // the injected failure; the reference knows nothing of it
        }
        let want = reference(stream, &mut pos, max);
        match (got, &want) {
            (Ok(Some(payload)), Expected::Frame(p)) => {
                assert_eq!(&payload, p);
                assert!(payload.len() <= max);
                if typed {
                    if let Ok(req) = codec::decode::<Request>(&payload) {
                        let again = codec::encode(&req).expect("encodes");
                        codec::decode::<Request>(&again).expect("re-decodes");
                    }
                }
            }
            (Ok(None), Expected::End) => return,
            (Err(FrameError::Truncated), Expected::Truncated) => return,
            (Err(FrameError::TooLarge { len, max: m }), Expected::TooLarge { len: l, max: mm })
                if len == *l && m == *mm =>
            {
                return
            }
            (got, want) => panic!("read_frame returned {got:?}, expected {want:?}"),
        }
    }
}

fn framed(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

pub fn seeds() -> Vec<Vec<u8>> {
    let requests: Vec<Vec<u8>> = samples::requests()
        .iter()
        .map(|r| codec::encode(r).unwrap())
        .collect();
    let responses: Vec<Vec<u8>> = samples::responses()
        .iter()
        .map(|r| codec::encode(r).unwrap())
        .collect();
    let mut seeds = vec![
        [vec![0, 5, 1], framed(&requests)].concat(),
        [vec![1, 9, 5], framed(&requests[..2])].concat(),
        [vec![0, 3, 9], framed(&responses[..1])].concat(),
        [vec![0, 3, 13], framed(&responses[2..3])].concat(),
        [vec![2, 1, 0], framed(&[vec![1; 2], vec![2; 3]])].concat(),
        [vec![0, 7, 0], vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]].concat(),
        [vec![0, 7, 2], framed(&[vec![0xc1; 4]])].concat(),
        vec![1, 0, 0, 0, 0],
    ];
    // A frame announcing more than it carries.
    let mut short = framed(&[vec![7; 100]]);
    short.truncate(50);
    seeds.push([vec![0, 4, 0], short].concat());
    seeds
}
