//! Length-prefixed frames on QUIC streams, and typed messages on top of them.
//!
//! A frame is a `u32` big-endian payload length followed by the payload. The length is checked
//! against the caller's maximum *before* anything is allocated, so a peer cannot make us
//! reserve memory it does not send.
use quinn::{RecvStream, SendStream};
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{self, CodecError};

/// Largest control message accepted.
pub const MAX_CONTROL_FRAME: usize = 1 << 20;
/// Largest data frame accepted (a batch plus its envelope).
pub const MAX_DATA_FRAME: usize = 20 << 20;

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

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    match recv.read_exact(&mut payload).await {
        Ok(()) => Ok(Some(payload)),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

pub async fn send_msg<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), FrameError> {
    let bytes = codec::encode(msg)?;
    write_frame(send, &bytes).await
}

/// Reads one typed message; `Ok(None)` on a clean end of stream.
pub async fn recv_msg<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<Option<T>, FrameError> {
    match read_frame(recv, max).await? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

/// Like [`recv_msg`], but a clean end of stream is an error.
pub async fn expect_msg<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<T, FrameError> {
    recv_msg(recv, max).await?.ok_or(FrameError::Closed)
}
