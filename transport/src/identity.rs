//! Cluster identity: the CA, node and agent certificates, and join/admin tokens.
//!
//! The configuration node that bootstraps a cluster creates a CA. Every node and agent that
//! joins receives a certificate signed by it, whose common name is its identity:
//! `node/<name>/<role,role>` or `agent/<machine>/<enrolment>`. The enrolment id is issued
//! once per enrolment of a machine name, so a certificate of an earlier enrolment (a machine
//! that was forgotten and enrolled again) no longer speaks for the machine. Tokens carry the
//! CA's SHA-256 fingerprint so a joiner verifies the server *before* it sends the token's
//! secret (kubeadm-style discovery), and the secret proves the joiner to the server. A token
//! has a kind: `agent` tokens enrol agents only, `node` tokens server nodes only, `admin`
//! tokens authorise `haven ctl`; the server checks the kind it recorded for the secret, not
//! the kind the text claims.
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// The TLS server name every haven node certificate carries.
pub const SERVER_NAME: &str = "haven.local";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("malformed token: {0}")]
    BadToken(String),
    #[error("malformed certificate: {0}")]
    BadCert(String),
}

/// What a peer's certificate says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    Node {
        name: String,
        roles: Vec<String>,
    },
    /// `enrolment` is empty for certificates issued before enrolment ids existed.
    Agent {
        machine: String,
        enrolment: String,
    },
}

impl PeerIdentity {
    pub fn common_name(&self) -> String {
        match self {
            PeerIdentity::Node { name, roles } => format!("node/{name}/{}", roles.join(",")),
            PeerIdentity::Agent { machine, enrolment } if enrolment.is_empty() => {
                format!("agent/{machine}")
            }
            PeerIdentity::Agent { machine, enrolment } => format!("agent/{machine}/{enrolment}"),
        }
    }

    pub fn parse(cn: &str) -> Result<Self, IdentityError> {
        let mut parts = cn.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("node"), Some(name), Some(roles)) if !name.is_empty() => Ok(PeerIdentity::Node {
                name: name.to_string(),
                roles: roles
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(String::from)
                    .collect(),
            }),
            (Some("agent"), Some(machine), enrolment)
                if !machine.is_empty() && enrolment.is_none_or(|e| !e.contains('/')) =>
            {
                Ok(PeerIdentity::Agent {
                    machine: machine.to_string(),
                    enrolment: enrolment.unwrap_or_default().to_string(),
                })
            }
            _ => Err(IdentityError::BadCert(format!(
                "unrecognised identity {cn:?}"
            ))),
        }
    }

    pub fn has_role(&self, role: &str) -> bool {
        matches!(self, PeerIdentity::Node { roles, .. } if roles.iter().any(|r| r == role))
    }

    /// Reads the identity from a DER certificate's subject common name.
    pub fn from_cert(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::BadCert(e.to_string()))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| IdentityError::BadCert("no common name".into()))?;
        Self::parse(cn)
    }
}

/// A certificate chain and its private key, as stored in a data dir (DER).
#[derive(Clone)]
pub struct Credentials {
    /// Leaf first, then the CA.
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn rustls_chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect()
    }
    pub fn rustls_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }
}

/// The cluster's certificate authority. Only the configuration node holds its key.
pub struct CertificateAuthority {
    pub cert_der: Vec<u8>,
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl CertificateAuthority {
    pub fn generate(cluster_id: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("haven cluster CA {cluster_id}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            key,
            cert,
        })
    }

    /// Reloads a CA saved with [`CertificateAuthority::key_pkcs8`] and `cert_der`.
    pub fn load(cert_der: &[u8], key_pkcs8: &[u8]) -> Result<Self, IdentityError> {
        let key = KeyPair::try_from(key_pkcs8)?;
        let params = CertificateParams::from_ca_cert_der(&CertificateDer::from(cert_der.to_vec()))?;
        // Re-signing yields an issuer object with the same subject and key; certificates it
        // signs verify against the original `cert_der`, which is what peers trust.
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert_der.to_vec(),
            key,
            cert,
        })
    }

    pub fn key_pkcs8(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Issues a certificate (and a fresh key) for `identity`.
    pub fn issue(&self, identity: &PeerIdentity) -> Result<Credentials, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.common_name());
        params.distinguished_name = dn;
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Credentials {
            chain: vec![cert.der().to_vec(), self.cert_der.clone()],
            key_pkcs8: key.serialize_der(),
        })
    }
}

pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// What a token grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Enrols agents (protected machines) only.
    Agent,
    /// Enrols server nodes (process servers, master targets) only.
    Node,
    /// Authorises `haven ctl`.
    Admin,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Agent => "agent",
            TokenKind::Node => "node",
            TokenKind::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(TokenKind::Agent),
            "node" => Some(TokenKind::Node),
            "admin" => Some(TokenKind::Admin),
            _ => None,
        }
    }

    /// Whether this kind enrols something (agent or node), as opposed to authorising ctl.
    pub fn enrols(self) -> bool {
        matches!(self, TokenKind::Agent | TokenKind::Node)
    }
}

impl std::fmt::Display for TokenKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `haven-<kind>.<cluster id>.<CA fingerprint hex>.<secret hex>`
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    pub cluster_id: String,
    pub ca_fingerprint: String,
    pub secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("kind", &self.kind)
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl Token {
    pub fn new(kind: TokenKind, cluster_id: &str, ca_fingerprint: &str) -> Self {
        let secret: [u8; 24] = rand::random();
        Self {
            kind,
            cluster_id: cluster_id.into(),
            ca_fingerprint: ca_fingerprint.into(),
            secret: hex::encode(secret),
        }
    }

    pub fn encode(&self) -> String {
        let kind = self.kind.as_str();
        format!(
            "haven-{kind}.{}.{}.{}",
            self.cluster_id, self.ca_fingerprint, self.secret
        )
    }

    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let text = text.trim();
        let parts: Vec<&str> = text.split('.').collect();
        let [kind, cluster_id, fp, secret] = parts[..] else {
            return Err(IdentityError::BadToken(
                "expected 4 dot-separated parts".into(),
            ));
        };
        let kind =
            match kind.strip_prefix("haven-").and_then(TokenKind::parse) {
                Some(k) => k,
                None if kind == "haven-join" => return Err(IdentityError::BadToken(
                    "haven-join tokens are no longer accepted: agents enrol with the agent-token \
                     and server nodes with a node token (`haven ctl token create --kind node`)"
                        .into(),
                )),
                None => {
                    return Err(IdentityError::BadToken(format!(
                        "unknown token kind {kind:?}"
                    )))
                }
            };
        let hexy = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hexy(fp, 64) {
            return Err(IdentityError::BadToken(
                "CA fingerprint must be 64 hex digits".into(),
            ));
        }
        if !hexy(secret, 48) || cluster_id.is_empty() {
            return Err(IdentityError::BadToken(
                "secret must be 48 hex digits".into(),
            ));
        }
        Ok(Self {
            kind,
            cluster_id: cluster_id.into(),
            ca_fingerprint: fp.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }

    /// Constant-time comparison of the secret.
    pub fn secret_matches(&self, presented: &str) -> bool {
        let (a, b) = (self.secret.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The id under which a token's secret is recorded and listed: the first 12 hex digits of
/// its SHA-256. The secret itself is never stored by the configuration node.
pub fn token_id(secret: &str) -> String {
    fingerprint(secret.as_bytes())[..12].to_string()
}

/// The SHA-256 of a token's secret, as recorded.
pub fn secret_digest(secret: &str) -> String {
    fingerprint(secret.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_certificate() {
        let ca = CertificateAuthority::generate("c1").unwrap();
        let id = PeerIdentity::Node {
            name: "ps1".into(),
            roles: vec!["process".into()],
        };
        let creds = ca.issue(&id).unwrap();
        assert_eq!(PeerIdentity::from_cert(&creds.chain[0]).unwrap(), id);
        let agent = PeerIdentity::Agent {
            machine: "web01".into(),
            enrolment: "0a1b2c3d".into(),
        };
        assert_eq!(
            PeerIdentity::from_cert(&ca.issue(&agent).unwrap().chain[0]).unwrap(),
            agent
        );
    }

    #[test]
    fn reloaded_ca_issues_verifiable_certs() {
        let ca = CertificateAuthority::generate("c1").unwrap();
        let again = CertificateAuthority::load(&ca.cert_der, &ca.key_pkcs8()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let creds = again
            .issue(&PeerIdentity::Agent {
                machine: "m".into(),
                enrolment: String::new(),
            })
            .unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&creds.chain[0]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&ca.cert_der).unwrap();
        leaf.verify_signature(Some(root.public_key()))
            .expect("signed by the original CA");
    }

    #[test]
    fn legacy_agent_names_parse_without_an_enrolment() {
        assert_eq!(
            PeerIdentity::parse("agent/web01").unwrap(),
            PeerIdentity::Agent {
                machine: "web01".into(),
                enrolment: String::new()
            }
        );
        assert!(PeerIdentity::parse("agent/web01/a/b").is_err());
        assert!(PeerIdentity::parse("agent//x").is_err());
    }

    #[test]
    fn token_round_trip_and_rejections() {
        for kind in [TokenKind::Agent, TokenKind::Node, TokenKind::Admin] {
            let t = Token::new(kind, "abc", &"0f".repeat(32));
            assert_eq!(Token::parse(&t.encode()).unwrap(), t);
        }
        let t = Token::new(TokenKind::Agent, "abc", &"0f".repeat(32));
        assert!(t.encode().starts_with("haven-agent.abc."));
        assert_eq!(token_id(&t.secret).len(), 12);
        let legacy = format!("haven-join.abc.{}.{}", "0f".repeat(32), t.secret);
        let err = Token::parse(&legacy).unwrap_err().to_string();
        assert!(err.contains("no longer accepted"), "{err}");
        assert!(t.secret_matches(&t.secret.clone()));
        assert!(!t.secret_matches("00"));
        for bad in [
            "",
            "haven-agent.a.b",
            "haven-root.a.00.00",
            "haven-node.c.zz.00",
        ] {
            assert!(Token::parse(bad).is_err(), "{bad}");
        }
    }
}
