//! haven's NBD server: how the agent's tap and the master target's recovery-point views are
//! served to the workload and to recovery tools (qemu, libnbd, the kernel's nbd client, fio).
//!
//! # Why our own server
//!
//! Every write through the tap must be captured into the replication stream *before* it is
//! acknowledged, and a view is a copy-on-write overlay over a recovery point; both are haven
//! code deciding when a request completes. An external server (qemu-nbd, nbdkit) would need
//! a plugin boundary and a second process per disk between the workload and that decision.
//! Here a backend is a Rust trait object ([`Backend`]) called in-process, and the whole
//! protocol surface a client can reach is small enough to test and fuzz in full.
//!
//! # Sans-I/O core
//!
//! [`proto`] is the protocol with no sockets: the fixed-newstyle handshake is a state machine
//! ([`proto::Handshake`]) that is *fed* bytes, queues the bytes to send, and says what comes
//! next (more input, transmission on an export, or close, and why); requests are parsed from
//! 28-byte arrays ([`proto::parse_request`]) and judged against the export
//! ([`proto::decide`]: execute, reject with an errno after draining a payload, or close).
//! Unit tests assert exact bytes and decisions, and the fuzz target `nbd_proto` drives the
//! same code with arbitrary input. [`server`] only moves bytes and calls backends.
//!
//! # Bounds
//!
//! - Option data: at most [`proto::MAX_OPTION_DATA`] bytes are buffered; up to
//!   [`proto::MAX_OPTION_SKIP`] is skipped unbuffered and answered `NBD_REP_ERR_TOO_BIG`; more,
//!   or more than [`proto::MAX_OPTIONS`] options, closes. Unknown options are answered
//!   `NBD_REP_ERR_UNSUP`, never with a hang-up.
//! - The handshake has a deadline ([`ServerConfig::handshake_timeout`]).
//! - Reads and writes up to [`proto::MAX_PAYLOAD`] (64 MiB); longer ones are refused with
//!   EINVAL (a write's payload is drained up to [`proto::MAX_DRAIN`], beyond that the connection
//!   closes).
//! - Per connection, at most [`ServerConfig::max_in_flight`] requests and
//!   [`ServerConfig::max_in_flight_bytes`] payload bytes are in flight (received and not yet
//!   answered); the reader waits for permits before it reads a payload, so memory per
//!   connection is bounded whatever the client sends. Connections per listener are bounded by
//!   [`ServerConfig::max_connections`].
//! - Requests on a connection are served concurrently (one task each), replies go out through
//!   one writer task with a buffered writer that flushes when its queue is empty.
//!
//! Replies are simple replies only (structured replies, extended headers, block status and
//! TLS are answered `NBD_REP_ERR_UNSUP`), which every client supports.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use haven_nbd::{Exports, FileBackend, Server};
//! let exports = Arc::new(Exports::new());
//! exports.insert("disk0", Arc::new(FileBackend::open("/var/lib/disk0.img", false)?));
//! let server = Server::new(exports);
//! let handle = server.serve_unix("/run/haven/nbd.sock").await?;
//! // qemu-io -f raw 'nbd+unix:///disk0?socket=/run/haven/nbd.sock' -c 'read 0 4k'
//! handle.shutdown().await;
//! # Ok(()) }
//! ```
pub mod backend;
pub mod client;
pub mod proto;
pub mod server;

pub use backend::{nbd_error, Backend, FileBackend};
pub use client::Client;
pub use server::{export_info, ConnError, Exports, ListenAddr, Server, ServerConfig, ServerHandle};
