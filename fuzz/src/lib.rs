//! Fuzz targets for every decoder that reads network or disk input (docs/fuzzing.md).
//!
//! Each target is a function of arbitrary bytes that feeds them to one decoder and checks
//! what the decoder promises: it returns an error on bad input and never panics, what it
//! accepts survives a round trip, and it allocates no more than its input and its validated
//! limits justify (checked by a tracking global allocator, see [`alloc`]). The same functions
//! run in two harnesses:
//!
//! - `cargo test` (tests/smoke.rs): every target on its seeds, the committed corpus
//!   (`fuzz/corpus/<target>.bin`), the inputs of past findings (`fuzz/regressions/<target>/`)
//!   and a bounded number of deterministic mutations of them ([`mutate`]);
//! - libFuzzer, coverage guided (`fuzz_targets/*.rs`, built with the `libfuzzer` feature and
//!   sancov instrumentation on the stable toolchain: `fuzz/run.sh`).
pub mod alloc;
pub mod corpus;
pub mod mutate;
mod samples;
pub mod targets;
mod tmp;

#[global_allocator]
static ALLOC: alloc::Tracking = alloc::Tracking;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// Feeds the input to the decoder and checks its promises; panics on a finding.
    pub fuzz: fn(&[u8]),
    /// Inputs that reach deep into the decoder: valid encodings and their neighbours.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// The largest single allocation and the most live memory one input may cause, as
    /// `base + per_byte * input length`: more is an unbounded allocation (a length believed
    /// before it was validated).
    pub alloc_base: usize,
    pub alloc_per_byte: usize,
}

impl Target {
    /// Runs the target on one input and checks its allocations.
    pub fn run(&self, data: &[u8]) {
        let ((), usage) = alloc::measure(|| (self.fuzz)(data));
        let budget = self
            .alloc_base
            .saturating_add(self.alloc_per_byte.saturating_mul(data.len()));
        assert!(
            usage.peak_live <= budget && usage.largest <= budget,
            "{}: an input of {} bytes allocated {} bytes at once and {} bytes in all \
             (budget {budget})",
            self.name,
            data.len(),
            usage.largest,
            usage.peak_live,
        );
    }
}

/// Every target, by name.
pub fn targets() -> &'static [Target] {
    targets::ALL
}

/// The target of that name; panics if there is none.
pub fn target(name: &str) -> &'static Target {
    targets()
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}
