//! The four roles of haven, composed from `transport`, `cluster`, `storage` and `actors`.
//!
//! Each role has a protocol core without I/O (`*/core.rs`) and a thin shell of actors and
//! tasks around it. See ARCHITECTURE.md for the map.
pub mod admin;
pub mod agent;
pub mod client;
pub mod configuration;
pub mod enroll;
pub mod error;
pub mod faults;
pub mod fsutil;
pub mod link;
pub mod master_target;
pub mod node;
pub mod poll;
pub mod process;
pub mod proto;
pub mod slot;
pub mod view;
