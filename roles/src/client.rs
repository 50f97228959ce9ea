//! One request, one response over a fresh bidirectional stream: the control-plane call used
//! by every role and by `haven ctl`.
use std::{net::SocketAddr, time::Duration};

use haven_transport::{
    endpoint::{self, EndpointError},
    frame::{self, MAX_CONTROL_FRAME},
};
use quinn::{Connection, Endpoint};

use crate::proto::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("request failed: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("refused: {0}")]
    Refused(String),
    #[error("unexpected response: {0}")]
    Unexpected(String),
}

pub async fn connect(
    ep: &Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    peer: &str,
) -> Result<Connection, CallError> {
    let fut = endpoint::connect(ep, cfg, addr, peer, endpoint::PROTOCOL_VERSION);
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(CallError::Timeout(Duration::from_secs(10))),
    }
}

/// Sends `req` and returns the response; a `Refused` response becomes `CallError::Refused`.
pub async fn call(
    conn: &Connection,
    req: &Request,
    timeout: Duration,
) -> Result<Response, CallError> {
    let fut = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        frame::send_msg(&mut send, req).await?;
        let _ = send.finish();
        let resp: Response = frame::expect_msg(&mut recv, MAX_CONTROL_FRAME).await?;
        Ok::<_, CallError>(resp)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(Response::Refused { reason })) => Err(CallError::Refused(reason)),
        Ok(r) => r,
        Err(_) => Err(CallError::Timeout(timeout)),
    }
}
