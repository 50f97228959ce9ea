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
    endpoint::{self, EndpointError},
    identity::{Credentials, IdentityError, Token, TokenKind},
};

use crate::{
    client::{self, CallError},
    fsutil::{read_optional, write_atomic},
    proto::{JoinKind, JoinRequest, Request, Response},
};

/// Why credentials could not be loaded, saved or obtained.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{doing} {}: {source}", path.display())]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {}: {source}", path.display())]
    BadToken {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("token file {} holds an {found} token; {needs}", path.display())]
    WrongKind {
        path: PathBuf,
        found: TokenKind,
        needs: String,
    },
    #[error("bad address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot reach the configuration node at {addr}: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: CallError,
    },
    #[error("join refused by {addr}: {reason}")]
    Refused { addr: String, reason: String },
    #[error("join failed: {0}")]
    Failed(String),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
}

fn io(doing: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EnrollError {
    let path = path.to_path_buf();
    move |source| EnrollError::Io {
        doing,
        path,
        source,
    }
}

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

    pub fn load(data_dir: &Path) -> Result<Option<Self>, EnrollError> {
        let dir = Self::dir(data_dir);
        let read = |name: &str| read_optional(&dir.join(name)).map_err(io("read", &dir.join(name)));
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

    pub fn save(&self, data_dir: &Path) -> Result<(), EnrollError> {
        let dir = Self::dir(data_dir);
        let w = |name: &str, bytes: &[u8]| {
            write_atomic(&dir.join(name), bytes).map_err(io("write", &dir.join(name)))
        };
        crate::fsutil::write_private(&dir.join("key.der"), &self.creds.key_pkcs8)
            .map_err(io("write", &dir.join("key.der")))?;
        w("cert.der", &self.creds.chain[0])?;
        w("ca.der", &self.ca)?;
        w("cluster", self.cluster_id.as_bytes())?;
        w("config-addr", self.config_addr.as_bytes())
    }

    pub fn config_socket_addr(&self) -> Result<SocketAddr, EnrollError> {
        resolve(&self.config_addr)
    }

    pub fn client_config(&self) -> Result<quinn::ClientConfig, EnrollError> {
        Ok(endpoint::client_config(&self.creds, &self.ca)?)
    }
}

pub fn resolve(addr: &str) -> Result<SocketAddr, EnrollError> {
    use std::net::ToSocketAddrs;
    let bad = |reason: String| EnrollError::Address {
        addr: addr.to_string(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("it resolves to nothing".into()))
}

fn parse_token_file(path: &Path) -> Result<Token, EnrollError> {
    let text = std::fs::read_to_string(path).map_err(io("cannot read token file", path))?;
    Token::parse(&text).map_err(|source| EnrollError::BadToken {
        path: path.to_path_buf(),
        source,
    })
}

pub fn read_token(path: &Path, want: TokenKind) -> Result<Token, EnrollError> {
    let token = parse_token_file(path)?;
    if token.kind != want {
        return Err(EnrollError::WrongKind {
            path: path.to_path_buf(),
            found: token.kind,
            needs: format!("this needs an {want} token"),
        });
    }
    Ok(token)
}

/// An enrolment token (agent or node). Which of the two a join may use is the configuration
/// node's decision: it checks the kind it recorded for the secret, whatever the text says.
pub fn read_join_token(path: &Path) -> Result<Token, EnrollError> {
    let token = parse_token_file(path)?;
    if !token.kind.enrols() {
        return Err(EnrollError::WrongKind {
            path: path.to_path_buf(),
            found: token.kind,
            needs: "joining needs an agent token (agents) or a node token (server nodes)".into(),
        });
    }
    Ok(token)
}

/// Joins the cluster at `addr` and returns the new identity (not yet saved).
pub async fn join(addr: &str, token: &Token, kind: JoinKind) -> Result<Identity, EnrollError> {
    let sock = resolve(addr)?;
    let ep = endpoint::client_endpoint()?;
    let cfg = endpoint::pinned_client_config(&token.ca_fingerprint)?;
    let conn = client::connect(&ep, cfg, sock, "joiner")
        .await
        .map_err(|source| EnrollError::Unreachable {
            addr: addr.to_string(),
            source,
        })?;
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
                return Err(EnrollError::Failed(
                    "the join reply carried no certificate".into(),
                ));
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
        Ok(other) => Err(EnrollError::Failed(format!(
            "unexpected join reply: {other:?}"
        ))),
        Err(CallError::Refused(reason)) => Err(EnrollError::Refused {
            addr: addr.to_string(),
            reason,
        }),
        Err(e) => Err(EnrollError::Failed(e.to_string())),
    }
}
