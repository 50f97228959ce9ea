//! What a role's streams need from the node they run in, and nothing more: the node's name,
//! a dialer to its peers, and the assignments the node holds.
//!
//! A leaf module: `node.rs` (the composition root) builds one [`NodeLink`] and hands it to
//! the roles; no role imports `node.rs`.
use std::{net::SocketAddr, sync::Arc};

use quinn::Connection;
use tokio::sync::watch;

use crate::{
    client::{self, CallError},
    enroll::resolve,
    proto::Assignment,
};

/// Connects to peers of the cluster (mutual TLS with this node's or agent's certificate).
#[derive(Clone)]
pub struct Dialer {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl Dialer {
    pub fn new(endpoint: quinn::Endpoint, config: quinn::ClientConfig) -> Self {
        Self { endpoint, config }
    }

    /// Connects to `addr` (a `host:port`), naming the peer `peer` in errors and logs.
    pub async fn connect(&self, addr: &str, peer: &str) -> Result<Connection, CallError> {
        let sock: SocketAddr = resolve(addr).map_err(|e| CallError::Unexpected(e.to_string()))?;
        self.connect_addr(sock, peer).await
    }

    pub async fn connect_addr(
        &self,
        addr: SocketAddr,
        peer: &str,
    ) -> Result<Connection, CallError> {
        client::connect(&self.endpoint, self.config.clone(), addr, peer).await
    }
}

/// The node as its roles see it.
pub struct NodeLink {
    pub name: String,
    pub dialer: Dialer,
    assignments: watch::Receiver<Vec<Assignment>>,
}

impl NodeLink {
    pub fn new(
        name: String,
        dialer: Dialer,
        assignments: watch::Receiver<Vec<Assignment>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            dialer,
            assignments,
        })
    }

    /// The current assignment of `machine` on this node, if any.
    pub fn assignment(&self, machine: &str) -> Option<Assignment> {
        self.assignments
            .borrow()
            .iter()
            .find(|a| a.machine == machine)
            .cloned()
    }

    /// Every assignment this node holds, and their changes.
    pub fn assignments(&self) -> watch::Receiver<Vec<Assignment>> {
        self.assignments.clone()
    }
}
