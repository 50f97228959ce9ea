//! The wire: QUIC endpoints, identities and certificates, framing, the message codec and
//! payload sealing. Knows nothing of roles.
pub mod codec;
pub mod endpoint;
pub mod faults;
pub mod frame;
pub mod identity;
pub mod seal;
