//! The long-poll client to the configuration node, shared by a node's poller and an agent's
//! control loop: one connection kept and re-made as needed, one request/response per poll
//! with a timeout that allows for the server holding it, and reachability said once per
//! change ("unreachable (…); replication continues" / "reachable again").
use std::{net::SocketAddr, time::Duration};

use quinn::Connection;

use crate::{
    client::{self, CallError},
    link::Dialer,
    proto::{Request, Response},
};

/// A poll's pace when the configuration node answers at once or cannot be reached.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long the configuration node may hold a poll with nothing new (long poll): changes
/// reach nodes and agents at once, and idle polls cost one round trip a second.
pub const LONG_POLL_MS: u32 = 1000;
/// Beyond the hold, how long a poll may take before it counts as lost.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct LongPoll {
    dialer: Dialer,
    addr: SocketAddr,
    /// Names this client in logs and connection errors (`agent web01`, `ps1`).
    label: String,
    conn: Option<Connection>,
    reachable: bool,
}

impl LongPoll {
    pub fn new(dialer: Dialer, addr: SocketAddr, label: impl Into<String>) -> Self {
        Self {
            dialer,
            addr,
            label: label.into(),
            conn: None,
            reachable: true,
        }
    }

    /// One poll. A refusal is the configuration node's answer (returned, the connection
    /// kept); any other failure drops the connection, and is logged once until it recovers.
    pub async fn call(&mut self, req: &Request) -> Result<Response, CallError> {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.close_reason().is_some())
        {
            self.conn = None;
        }
        let result = self.call_once(req).await;
        match &result {
            Ok(_) | Err(CallError::Refused(_)) => {
                if !self.reachable {
                    tracing::info!("configuration node reachable again");
                    self.reachable = true;
                }
            }
            Err(e) => {
                self.conn = None;
                if self.reachable {
                    tracing::warn!("configuration node unreachable ({e}); replication continues");
                    self.reachable = false;
                }
            }
        }
        result
    }

    async fn call_once(&mut self, req: &Request) -> Result<Response, CallError> {
        if self.conn.is_none() {
            self.conn = Some(self.dialer.connect_addr(self.addr, &self.label).await?);
        }
        let conn = self.conn.as_ref().expect("connected above");
        let timeout = CALL_TIMEOUT + Duration::from_millis(LONG_POLL_MS as u64);
        client::call(conn, req, timeout).await
    }
}
