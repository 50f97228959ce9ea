//! The bounded run of every fuzz target inside `cargo test`: its seeds, the committed corpus
//! (`fuzz/corpus/<target>.bin`), the inputs of past findings (`fuzz/regressions/<target>/`), then
//! deterministic mutations of all of them for a bounded number of inputs and time.
//!
//! `HAVEN_FUZZ_SMOKE_INPUTS` (default 4000) and `HAVEN_FUZZ_SMOKE_MS` (default 1500) bound the
//! mutations per target; `HAVEN_FUZZ_SEED` changes the mutation seed. docs/fuzzing.md has the
//! long runs.
use std::path::Path;
use std::time::{Duration, Instant};

use haven_fuzz::corpus;
use haven_fuzz::mutate::{mutate, Rng};
use haven_fuzz::Target;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn smoke(name: &str) {
    let target: &Target = haven_fuzz::target(name);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regressions = corpus::files(&root.join("regressions").join(name));
    let corpus = corpus::committed(name);
    let seeds = (target.seeds)();
    for input in regressions.iter().chain(&seeds).chain(&corpus) {
        target.run(input);
    }
    let pool: Vec<Vec<u8>> = seeds.into_iter().chain(corpus).chain(regressions).collect();
    let inputs = env("HAVEN_FUZZ_SMOKE_INPUTS", 4000);
    let budget = Duration::from_millis(env("HAVEN_FUZZ_SMOKE_MS", 1500));
    let mut rng = Rng::new(env("HAVEN_FUZZ_SEED", 0x4a5e) ^ name.len() as u64);
    let start = Instant::now();
    let mut ran = 0;
    while ran < inputs && start.elapsed() < budget {
        let mut input = pool[rng.below(pool.len())].clone();
        mutate(&mut rng, &mut input, &pool, 1 << 16);
        target.run(&input);
        ran += 1;
    }
    eprintln!(
        "{name}: {} seeds and corpus inputs, {ran} mutations in {:?}",
        pool.len(),
        start.elapsed()
    );
}

macro_rules! smoke_tests {
    ($($name:ident)*) => {$(
        #[test]
        fn $name() {
            smoke(stringify!($name));
        }
    )*};
}

smoke_tests! {
    frame wire_request wire_response wire_agent_frame wire_ship_frame wire_batch_body wire_misc
    seal_open cache_open undo_roll_back replica_journal_open journal_replay state_files nbd_proto
    identity_text
}

#[test]
fn every_target_has_a_smoke_test_and_a_binary() {
    let listed = [
        "frame",
        "wire_request",
        "wire_response",
        "wire_agent_frame",
        "wire_ship_frame",
        "wire_batch_body",
        "wire_misc",
        "seal_open",
        "cache_open",
        "undo_roll_back",
        "replica_journal_open",
        "journal_replay",
        "state_files",
        "nbd_proto",
        "identity_text",
    ];
    let names: Vec<&str> = haven_fuzz::targets().iter().map(|t| t.name).collect();
    assert_eq!(names, listed);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in names {
        let bin = root.join("fuzz_targets").join(format!("{name}.rs"));
        assert!(bin.is_file(), "no libFuzzer binary {}", bin.display());
    }
}
