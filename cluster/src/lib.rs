//! Cluster state: the records the configuration node keeps, their durable store, and
//! placement. Knows nothing of disks' contents or of the network.
pub mod placement;
pub mod state;
pub mod store;

pub use state::*;
