//! Durable on-disk formats that know nothing of networking: the process server's segmented
//! cache of sealed batches, and the master target's apply undo log.
//!
//! [`cache::MachineCache`] is one protected machine's cache: an append-only sequence of
//! checksummed records (opaque payloads tagged with a seq range) spread over segment files,
//! made durable by group commit, trimmed a whole segment at a time once the master target has
//! applied them, and recovered on open (a torn tail is cut; corruption elsewhere refuses to
//! start). The on-disk format is documented in the [`cache`] module.
pub mod cache;
pub mod journal;
pub mod undo;

pub use cache::{CacheError, CacheOptions, MachineCache, Record, RecoveryReport};
