//! The errors a replication stream ends with, typed by what its driver does next.
//!
//! A stream's driver never decides by an error's text: it matches the variant.
//!
//! | variant | who failed | what the driver does |
//! |---|---|---|
//! | [`StreamError::Peer`] | the peer or the network (reset, timeout, unreachable) | reconnects by itself, with a jittered backoff |
//! | [`StreamError::Refused`] | the peer refused the stream or a batch, with its reason | reconnects with a backoff (the peer may accept later: an assignment catching up) and counts it |
//! | [`StreamError::Superseded`] | nobody: a newer stream or assignment took over | reconnects at once, or stops |
//! | [`StreamError::Cache`], [`StreamError::Replica`], [`StreamError::Local`] | this node (its cache, its replica, a bug) | returns to its supervisor, which restarts it against the restart budget |
use haven_storage::cache::CacheError;

use crate::master_target::replica::ApplyError;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Peer(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("superseded: {0}")]
    Superseded(String),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Replica(#[from] ApplyError),
    #[error("{0}")]
    Local(String),
}

impl StreamError {
    /// A failure of the peer or the network, with what was being done.
    pub fn peer(doing: &str, e: impl std::fmt::Display) -> Self {
        StreamError::Peer(format!("{doing}: {e}"))
    }

    /// A failure of this node, with what was being done.
    pub fn local(doing: &str, e: impl std::fmt::Display) -> Self {
        StreamError::Local(format!("{doing}: {e}"))
    }

    /// Whether this node failed (the supervisor's business), rather than the peer.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            StreamError::Cache(_) | StreamError::Replica(_) | StreamError::Local(_)
        )
    }
}

impl From<crate::client::CallError> for StreamError {
    fn from(e: crate::client::CallError) -> Self {
        match e {
            crate::client::CallError::Refused(reason) => StreamError::Refused(reason),
            other => StreamError::Peer(other.to_string()),
        }
    }
}

impl From<haven_transport::frame::FrameError> for StreamError {
    /// A frame that could not be read or written: the stream (the peer or the network).
    fn from(e: haven_transport::frame::FrameError) -> Self {
        StreamError::Peer(e.to_string())
    }
}
