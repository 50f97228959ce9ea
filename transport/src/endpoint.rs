//! QUIC endpoints with mutual TLS, and the per-connection hello that checks protocol versions.
//!
//! ```text
//! client                                   server
//!   | -- QUIC + TLS 1.3 (ALPN "haven") ------> |  server proves itself with a CA-signed cert;
//!   |                                          |  clients with a cert are verified against the CA
//!   | -- bidi stream: Hello{version, ..} ----> |
//!   | <------------- HelloReply::Ok | Refused  |  a mismatch is refused on both sides, loudly
//! ```
//! A joiner that has no certificate yet connects with [`pinned_client_config`], which accepts
//! only a server whose chain contains the CA with the token's fingerprint.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use quinn::{
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
    Connection, Endpoint, TransportConfig, VarInt,
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use serde::{Deserialize, Serialize};

use crate::{
    faults::{self, FaultConfig, FaultHandle},
    frame::{self, FrameError, MAX_CONTROL_FRAME},
    identity::{fingerprint, Credentials, PeerIdentity, SERVER_NAME},
};

pub const ALPN: &[u8] = b"haven";
/// Bumped on any incompatible wire change; peers must match exactly.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("peer refused the connection: {0}")]
    Refused(String),
    #[error("handshake: {0}")]
    Frame(#[from] FrameError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Flow-control windows sized for a WAN (see LIMITS.md: the default 1.25 MB stream window
/// caps a stream at one window per round trip): 16 MiB carries 160 MB/s at 100 ms RTT. They
/// also bound memory: a sender buffers up to a window of unacknowledged data.
fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.receive_window(VarInt::from_u32(32 << 20));
    t.send_window(16 << 20);
    t.max_idle_timeout(Some(VarInt::from_u32(10_000).into()));
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_concurrent_bidi_streams(VarInt::from_u32(1024));
    t.max_concurrent_uni_streams(VarInt::from_u32(16));
    Arc::new(t)
}

fn roots(ca_der: &[u8]) -> Result<Arc<RootCertStore>, EndpointError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    Ok(Arc::new(roots))
}

/// Server side: presents `creds`, verifies client certificates against the CA when present.
/// Clients without a certificate (joiners, the admin CLI) are admitted to the handshake; what
/// they may do is decided per request by the secret they present.
pub fn server_config(
    creds: &Credentials,
    ca_der: &[u8],
) -> Result<quinn::ServerConfig, EndpointError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.rustls_chain(), creds.rustls_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// Client side for a cluster member: verifies the server against the CA and presents `creds`.
pub fn client_config(
    creds: &Credentials,
    ca_der: &[u8],
) -> Result<quinn::ClientConfig, EndpointError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_der)?)
        .with_client_auth_cert(creds.rustls_chain(), creds.rustls_key())?;
    finish_client(tls)
}

/// Client side for a joiner or the admin CLI: no client certificate; the server must chain to
/// the CA whose SHA-256 fingerprint is `ca_fingerprint`.
pub fn pinned_client_config(ca_fingerprint: &str) -> Result<quinn::ClientConfig, EndpointError> {
    let verifier = Arc::new(PinnedCa {
        fingerprint: ca_fingerprint.to_string(),
        provider: provider(),
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    finish_client(tls)
}

fn finish_client(mut tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, EndpointError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// Accepts a server only if its chain carries the pinned CA, then verifies the chain against
/// that CA like any other root.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "server's CA does not match the token's fingerprint (wrong cluster or an impostor)".into(),
                )
            })?;
        let roots = roots(ca).map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, EndpointError> {
    let bind_err = |source| EndpointError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
    Ok(socket)
}

/// A server endpoint (also usable as a client) bound to `addr`. With `HAVEN_NET_FAULTS` set,
/// its packets go through a fault-injecting socket ([`faults`]).
pub fn server_endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
) -> Result<Endpoint, EndpointError> {
    if let Some(config) = faults_from_env()? {
        let (endpoint, _handle) = server_endpoint_with_faults(addr, server, config)?;
        warn_faults(&endpoint, &config);
        return Ok(endpoint);
    }
    let socket = udp_socket(addr)?;
    Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| EndpointError::Bind { addr, source })
}

/// A client-only endpoint on an ephemeral port. With `HAVEN_NET_FAULTS` set, its packets go
/// through a fault-injecting socket ([`faults`]).
pub fn client_endpoint() -> Result<Endpoint, EndpointError> {
    if let Some(config) = faults_from_env()? {
        let (endpoint, _handle) = client_endpoint_with_faults(config)?;
        warn_faults(&endpoint, &config);
        return Ok(endpoint);
    }
    let addr: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
    let socket = udp_socket(addr)?;
    Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| EndpointError::Bind { addr, source })
}

/// [`server_endpoint`] with injected network faults, controlled through the handle.
pub fn server_endpoint_with_faults(
    addr: SocketAddr,
    server: quinn::ServerConfig,
    config: FaultConfig,
) -> Result<(Endpoint, FaultHandle), EndpointError> {
    let socket = udp_socket(addr)?;
    faults::endpoint(socket, Some(server), config)
        .map_err(|source| EndpointError::Bind { addr, source })
}

/// [`client_endpoint`] with injected network faults, controlled through the handle.
pub fn client_endpoint_with_faults(
    config: FaultConfig,
) -> Result<(Endpoint, FaultHandle), EndpointError> {
    let addr: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
    let socket = udp_socket(addr)?;
    faults::endpoint(socket, None, config).map_err(|source| EndpointError::Bind { addr, source })
}

fn faults_from_env() -> Result<Option<FaultConfig>, EndpointError> {
    FaultConfig::from_env().map_err(|e| {
        let value = std::env::var_os(faults::ENV_VAR).unwrap_or_default();
        EndpointError::Quic(format!("{}={value:?} is invalid: {e}", faults::ENV_VAR))
    })
}

fn warn_faults(endpoint: &Endpoint, config: &FaultConfig) {
    let local = endpoint
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| e.to_string());
    tracing::warn!(
        %local,
        "{}={config}: injecting network faults on this endpoint (debug flag; replay with the same seed)",
        faults::ENV_VAR
    );
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: String,
    pub version: u32,
    /// Free-form description of the caller ("agent web01", "ctl"), for logs.
    pub peer: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Ok { version: u32 },
    Refused { reason: String, version: u32 },
}

/// Connects and performs the hello. `version` is [`PROTOCOL_VERSION`] except in tests.
pub async fn connect(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    peer: &str,
    version: u32,
) -> Result<Connection, EndpointError> {
    let connecting = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(|e| EndpointError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let conn = connecting.await.map_err(|e| EndpointError::Connect {
        addr,
        reason: e.to_string(),
    })?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        protocol: "haven".into(),
        version,
        peer: peer.into(),
    };
    frame::send_msg(&mut send, &hello).await?;
    let _ = send.finish();
    match frame::expect_msg::<HelloReply>(&mut recv, MAX_CONTROL_FRAME).await? {
        HelloReply::Ok { .. } => Ok(conn),
        HelloReply::Refused {
            reason,
            version: theirs,
        } if theirs != version => {
            tracing::error!(%addr, ours = version, theirs, "peer refused: {reason}");
            Err(EndpointError::VersionMismatch {
                ours: version,
                theirs,
            })
        }
        HelloReply::Refused { reason, .. } => Err(EndpointError::Refused(reason)),
    }
}

/// Server half of the hello. Returns the peer's certificate identity, if it presented one.
pub async fn accept_hello(
    conn: &Connection,
) -> Result<(Hello, Option<PeerIdentity>), EndpointError> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let hello: Hello = frame::expect_msg(&mut recv, MAX_CONTROL_FRAME).await?;
    if hello.protocol != "haven" || hello.version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version mismatch: this node speaks {} v{PROTOCOL_VERSION}, peer {:?} sent {} v{}",
            "haven", hello.peer, hello.protocol, hello.version
        );
        let reply = HelloReply::Refused {
            reason: reason.clone(),
            version: PROTOCOL_VERSION,
        };
        frame::send_msg(&mut send, &reply).await?;
        let _ = send.finish();
        // Give the reply a moment to leave before the connection is closed.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        conn.close(VarInt::from_u32(1), b"protocol version mismatch");
        return Err(EndpointError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: hello.version,
        });
    }
    frame::send_msg(
        &mut send,
        &HelloReply::Ok {
            version: PROTOCOL_VERSION,
        },
    )
    .await?;
    let _ = send.finish();
    Ok((hello, peer_identity(conn)))
}

/// The identity in the peer's (already CA-verified) certificate, if it sent one.
pub fn peer_identity(conn: &Connection) -> Option<PeerIdentity> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    PeerIdentity::from_cert(certs.first()?).ok()
}
