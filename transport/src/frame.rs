//! Length-prefixed frames on QUIC streams, and typed messages on top of them.
//!
//! A frame is a `u32` big-endian payload length followed by the payload. The length is checked
//! against the caller's maximum *before* anything is allocated, so a peer cannot make us
//! reserve memory it does not send.
//!
//! The readers take any [`AsyncRead`] (a [`quinn::RecvStream`] in the roles), so the decoder
//! is the same code when it is fuzzed over an in-memory reader (`fuzz/`).
use quinn::SendStream;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::codec::{self, CodecError};

/// Length of a frame's header (the `u32` payload length).
pub const FRAME_HEADER_LEN: usize = 4;
/// Largest control message accepted.
pub const MAX_CONTROL_FRAME: usize = 1 << 20;
/// Largest data frame accepted (a batch plus its envelope).
pub const MAX_DATA_FRAME: usize = 20 << 20;
/// Most bytes the codec adds around the byte buffer of a data frame (`AgentFrame::Batch`'s
/// body, `ShipFrame::Sealed`'s ciphertext): the variant and field names, the seqs, `raw_len`
/// and the nonce. The real figure is about 100 bytes; the roles' tests (`roles/tests/limits.rs`)
/// check the encodings against this bound.
pub const MAX_DATA_ENVELOPE: usize = 1024;

// A control message is a data-path message too (an `Ack` on a data stream): the data limit
// must not refuse what the control limit admits.
const _: () = assert!(MAX_CONTROL_FRAME <= MAX_DATA_FRAME);
// The length travels as a u32: a larger limit could never be announced, and `write_frame`
// refuses what does not fit.
const _: () = assert!(MAX_DATA_FRAME <= u32::MAX as usize);
// Everything a process server may cache and ship (a sealed batch in its envelope) must be
// accepted by the master target's reader, and what an agent sends (a raw batch, which the
// process server seals) by the process server's: the largest sealed batch, and the largest
// raw one, plus the codec envelope, fit a data frame.
const _: () = assert!(crate::seal::MAX_SEALED_LEN + MAX_DATA_ENVELOPE <= MAX_DATA_FRAME);
const _: () = assert!(crate::seal::MAX_RAW_LEN + MAX_DATA_ENVELOPE <= MAX_DATA_FRAME);

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("stream closed by peer")]
    Closed,
    /// A read error of a reader other than a QUIC stream.
    #[error("stream read failed: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for FrameError {
    /// A QUIC stream's [`quinn::ReadError`] comes back as itself (its `AsyncRead` impl wraps
    /// it in an `io::Error`).
    fn from(e: std::io::Error) -> Self {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<quinn::ReadError>())
        {
            Some(read) => FrameError::Read(read.clone()),
            None => FrameError::Io(e),
        }
    }
}

/// The payload length announced by a frame header, refused above `max` (before anything is
/// allocated for it).
pub fn payload_len(header: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

pub async fn write_frame(send: &mut SendStream, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(payload).await?;
    Ok(())
}

/// Reads into `buf` until it is full or the stream ends; returns how many bytes were read.
async fn fill(
    recv: &mut (impl AsyncRead + Unpin + ?Sized),
    buf: &mut [u8],
) -> Result<usize, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match recv.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame(
    recv: &mut (impl AsyncRead + Unpin + ?Sized),
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match fill(recv, &mut header).await? {
        0 => return Ok(None),
        FRAME_HEADER_LEN => {}
        _ => return Err(FrameError::Truncated),
    }
    let len = payload_len(header, max)?;
    let mut payload = vec![0u8; len];
    if fill(recv, &mut payload).await? != len {
        return Err(FrameError::Truncated);
    }
    Ok(Some(payload))
}

pub async fn send_msg<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), FrameError> {
    let bytes = codec::encode(msg)?;
    write_frame(send, &bytes).await
}

/// Reads one typed message; `Ok(None)` on a clean end of stream.
pub async fn recv_msg<T: DeserializeOwned>(
    recv: &mut (impl AsyncRead + Unpin + ?Sized),
    max: usize,
) -> Result<Option<T>, FrameError> {
    match read_frame(recv, max).await? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

/// Like [`recv_msg`], but a clean end of stream is an error.
pub async fn expect_msg<T: DeserializeOwned>(
    recv: &mut (impl AsyncRead + Unpin + ?Sized),
    max: usize,
) -> Result<T, FrameError> {
    recv_msg(recv, max).await?.ok_or(FrameError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut stream: &[u8], max: usize) -> Vec<Result<Option<Vec<u8>>, String>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut out = vec![];
        rt.block_on(async {
            loop {
                let r = read_frame(&mut stream, max).await;
                let done = !matches!(r, Ok(Some(_)));
                out.push(r.map_err(|e| e.to_string()));
                if done {
                    break;
                }
            }
        });
        out
    }

    #[test]
    fn frames_then_a_clean_end() {
        let stream = [&[0, 0, 0, 2, 7, 8][..], &[0, 0, 0, 0], &[0, 0, 0, 1, 9]].concat();
        assert_eq!(
            read_all(&stream, 16),
            vec![
                Ok(Some(vec![7, 8])),
                Ok(Some(vec![])),
                Ok(Some(vec![9])),
                Ok(None)
            ]
        );
    }

    #[test]
    fn torn_and_oversized_frames_are_errors() {
        let truncated = || Err(FrameError::Truncated.to_string());
        assert_eq!(read_all(&[0, 0], 16), vec![truncated()]);
        assert_eq!(read_all(&[0, 0, 0, 3, 1, 2], 16), vec![truncated()]);
        assert_eq!(
            read_all(&[0xff, 0xff, 0xff, 0xff, 1], 16),
            vec![Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 16
            }
            .to_string())]
        );
        // The limit itself is accepted.
        assert_eq!(read_all(&[0, 0, 0, 2, 1, 2], 2)[0], Ok(Some(vec![1, 2])));
    }

    #[test]
    fn a_quic_read_error_keeps_its_type() {
        let e: std::io::Error = quinn::ReadError::ClosedStream.into();
        assert!(matches!(
            FrameError::from(e),
            FrameError::Read(quinn::ReadError::ClosedStream)
        ));
        let e = std::io::Error::other("disk on fire");
        assert!(matches!(FrameError::from(e), FrameError::Io(_)));
    }
}
