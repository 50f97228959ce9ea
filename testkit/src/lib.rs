//! What the real-process tests (`tests/`) and the benches (`benches/`) share: deterministic
//! disk content, the `haven` processes they start and the `haven ctl --json` calls they drive
//! them with, bounded waits, replica comparisons, and the benches' frame and statistics.
//!
//! | module | what | used by |
//! |---|---|---|
//! | [`rng`] | the benches' xorshift generator | benches |
//! | [`data`] | disk images and data: the tests' `make_disk` / `random_writes`, the benches' `mixed_disk_data` / `generate_disk` | both |
//! | [`procs`] | [`Procs`]: start, kill, restart processes, logs, stop on drop, waits that fail when a process died, a configuration node coming up | both |
//! | [`ctl`] | [`Ctl`]: `haven ctl --json` | both |
//! | [`wait`] | bounded polls | both |
//! | [`compare`] | `cmp` (and `qemu-img compare`) of replicas and sources | both |
//! | [`json`] | fields of `ctl --json` objects | both |
//! | [`host`] | free ports, commands, the machine and its load | both |
//! | [`bench`] | the end-to-end benches' `main`, configuration, temp dir, report header | benches |
//! | [`stats`] | median, min, max | benches |
//!
//! The `haven` binary is a parameter everywhere: only the `haven` package's own integration
//! tests know it (`env!("CARGO_BIN_EXE_haven")`), and the benches measure a release build.

pub mod bench;
pub mod compare;
pub mod ctl;
pub mod data;
pub mod host;
pub mod json;
pub mod procs;
pub mod rng;
pub mod stats;
pub mod wait;

pub use compare::{assert_identical, identical, verify_same};
pub use ctl::Ctl;
pub use data::{generate_disk, make_disk, mixed_disk_data, random_writes, DiskStats};
pub use host::{free_port, free_udp_port, loadavg, machine_desc, run_cmd};
pub use json::{str_field, u64_field, u64_of};
pub use procs::{tail, Procs, Stop};
pub use rng::Rng;
pub use stats::{fmt_stat, stat, Stat};
pub use wait::{poll, wait_until};

/// Errors of the benches' harness: what went wrong, in words.
pub type Res<T> = Result<T, String>;

/// The block size of the agent's capture (4 KiB).
pub const BLOCK: u64 = 4096;
