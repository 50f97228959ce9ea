//! Credentials on disk, and joining a cluster with a token.
//!
//! ```text
//! joiner                                   configuration node
//!   | -- QUIC, server must chain to the CA pinned by the token's fingerprint -->
//!   | -- Join{secret, node|agent} ---------------------------------------->  | check secret
//!   | <------------------------------------- Joined{cert chain, key, CA} --  | record joiner
//! ```
//! After that every connection is mutual TLS with the issued certificate.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use haven_transport::{
    endpoint,
    identity::{Credentials, Token, TokenKind},
};

use crate::{
    client::{self, CallError},
    fsutil::{read_optional, write_atomic},
    proto::{JoinKind, JoinRequest, Request, Response},
};

/// What a node or agent needs to talk to its cluster, as saved under `<data>/identity/`.
#[derive(Clone, Debug)]
pub struct Identity {
    pub creds: Credentials,
    pub ca: Vec<u8>,
    pub cluster_id: String,
    /// The configuration node's QUIC address.
    pub config_addr: String,
}

impl Identity {
    fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("identity")
    }

    pub fn load(data_dir: &Path) -> Result<Option<Self>, String> {
        let dir = Self::dir(data_dir);
        let read = |name: &str| {
            read_optional(&dir.join(name))
                .map_err(|e| format!("read {}: {e}", dir.join(name).display()))
        };
        let (Some(cert), Some(key), Some(ca), Some(cluster), Some(addr)) = (
            read("cert.der")?,
            read("key.der")?,
            read("ca.der")?,
            read("cluster")?,
            read("config-addr")?,
        ) else {
            return Ok(None);
        };
        Ok(Some(Self {
            creds: Credentials {
                chain: vec![cert, ca.clone()],
                key_pkcs8: key,
            },
            ca,
            cluster_id: String::from_utf8_lossy(&cluster).trim().to_string(),
            config_addr: String::from_utf8_lossy(&addr).trim().to_string(),
        }))
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), String> {
        let dir = Self::dir(data_dir);
        let w = |name: &str, bytes: &[u8]| {
            write_atomic(&dir.join(name), bytes)
                .map_err(|e| format!("write {}: {e}", dir.join(name).display()))
        };
        crate::fsutil::write_private(&dir.join("key.der"), &self.creds.key_pkcs8)
            .map_err(|e| format!("write {}: {e}", dir.join("key.der").display()))?;
        w("cert.der", &self.creds.chain[0])?;
        w("ca.der", &self.ca)?;
        w("cluster", self.cluster_id.as_bytes())?;
        w("config-addr", self.config_addr.as_bytes())
    }

    pub fn config_socket_addr(&self) -> Result<SocketAddr, String> {
        resolve(&self.config_addr)
    }

    pub fn client_config(&self) -> Result<quinn::ClientConfig, String> {
        endpoint::client_config(&self.creds, &self.ca).map_err(|e| e.to_string())
    }
}

pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("address {addr:?} resolves to nothing"))
}

fn parse_token_file(path: &Path) -> Result<Token, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    Token::parse(&text).map_err(|e| format!("token file {}: {e}", path.display()))
}

pub fn read_token(path: &Path, want: TokenKind) -> Result<Token, String> {
    let token = parse_token_file(path)?;
    if token.kind != want {
        return Err(format!(
            "token file {} holds an {} token; this needs an {want} token",
            path.display(),
            token.kind,
        ));
    }
    Ok(token)
}

/// An enrolment token (agent or node). Which of the two a join may use is the configuration
/// node's decision: it checks the kind it recorded for the secret, whatever the text says.
pub fn read_join_token(path: &Path) -> Result<Token, String> {
    let token = parse_token_file(path)?;
    if !token.kind.enrols() {
        return Err(format!(
            "token file {} holds an {} token; joining needs an agent token (agents) or a node token (server nodes)",
            path.display(),
            token.kind,
        ));
    }
    Ok(token)
}

/// Joins the cluster at `addr` and returns the new identity (not yet saved).
pub async fn join(addr: &str, token: &Token, kind: JoinKind) -> Result<Identity, String> {
    let sock = resolve(addr)?;
    let ep = endpoint::client_endpoint().map_err(|e| e.to_string())?;
    let cfg = endpoint::pinned_client_config(&token.ca_fingerprint).map_err(|e| e.to_string())?;
    let conn = client::connect(&ep, cfg, sock, "joiner")
        .await
        .map_err(|e| format!("cannot reach the configuration node at {addr}: {e}"))?;
    let req = Request::Join(JoinRequest {
        secret: token.secret.clone(),
        kind,
    });
    let resp = client::call(&conn, &req, Duration::from_secs(30)).await;
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    match resp {
        Ok(Response::Joined(r)) => {
            let chain: Vec<Vec<u8>> = r.chain.into_iter().map(|b| b.into_vec()).collect();
            if chain.is_empty() {
                return Err("join reply carried no certificate".into());
            }
            Ok(Identity {
                creds: Credentials {
                    chain,
                    key_pkcs8: r.key_pkcs8.into_vec(),
                },
                ca: r.ca.into_vec(),
                cluster_id: r.cluster_id,
                config_addr: addr.to_string(),
            })
        }
        Ok(other) => Err(format!("unexpected join reply: {other:?}")),
        Err(CallError::Refused(reason)) => Err(format!("join refused by {addr}: {reason}")),
        Err(e) => Err(format!("join failed: {e}")),
    }
}
