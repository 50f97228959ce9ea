//! The frame of the end-to-end benches (`benches/pipeline.rs`, `benches/scaleout.rs`): their
//! `main`, their configuration from the environment, their temporary directory and the
//! header of their report.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use crate::{host, Res, BLOCK};

pub const MIB: f64 = 1024.0 * 1024.0;
pub const MB: f64 = 1e6;

/// A bench's `main`: `--help` says where its documentation is (`cargo bench` passes
/// `--bench`; nothing else is understood), and a failure of `run` is reported and exits
/// non-zero.
pub fn main(about: &str, name: &str, run: impl FnOnce() -> Res<()>) -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("{about}; see the header of benches/{name}.rs for the environment variables");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\n{name} bench FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The haven binary to measure: `HAVEN_BIN`, or the release build of the package in
/// `manifest_dir` (the bench's `env!("CARGO_MANIFEST_DIR")`). The benches build nothing.
pub fn haven_bin(manifest_dir: &str) -> Res<PathBuf> {
    let bin = match std::env::var_os("HAVEN_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(manifest_dir).join("target/release/haven"),
    };
    if !bin.is_file() {
        return Err(format!(
            "haven binary not found at {}.\n  This benchmark builds nothing: run `cargo build --release` first, \
             and set HAVEN_BIN=<target dir>/release/haven if you use CARGO_TARGET_DIR.",
            bin.display()
        ));
    }
    Ok(bin)
}

/// `HAVEN_BENCH_DISK` (default `default`, at least `min`, a multiple of MiB), rounded down to
/// whole 4 KiB blocks.
pub fn disk_size_from_env(default: u64, min: u64) -> Res<u64> {
    let disk_size = match std::env::var("HAVEN_BENCH_DISK") {
        Ok(v) => parse_size(&v)?,
        Err(_) => default,
    };
    if disk_size < min {
        return Err(format!(
            "HAVEN_BENCH_DISK must be at least {}MiB",
            min >> 20
        ));
    }
    Ok(disk_size / BLOCK * BLOCK)
}

/// A size such as `64MiB`, `1g`, `4096`.
pub fn parse_size(s: &str) -> Res<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB)"
            ))
        }
    };
    Ok(n * mult)
}

/// A number from the environment, `default` if unset.
pub fn env_num(name: &str, default: u64) -> Res<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Whether `name=1` is set.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// Runs `bench` in a new temporary directory named `prefix…`, which is kept afterwards if
/// `keep` (`HAVEN_BENCH_KEEP=1`) and removed otherwise.
pub fn in_temp_dir(prefix: &str, keep: bool, bench: impl FnOnce(&Path) -> Res<()>) -> Res<()> {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(std::env::temp_dir())
        .map_err(|e| {
            format!(
                "create a temp dir in {}: {e}",
                std::env::temp_dir().display()
            )
        })?;
    let dir = tmp.path().to_path_buf();
    let result = bench(&dir);
    if keep {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
    } else if result.is_err() {
        eprintln!("(set HAVEN_BENCH_KEEP=1 to keep the logs and images in the temp dir)");
    }
    result
}

/// Prints the head of a report: `title — date`, the machine (`machine`) and its load, the
/// binary and how old it is, the temporary directory. Returns the load average at the start.
pub fn print_header(title: &str, machine: &str, bin: &Path, dir: &Path) -> String {
    let date = host::run_cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
        .unwrap_or_default()
        .trim()
        .to_string();
    println!("{title} — {date}");
    let start_load = host::loadavg();
    println!("machine: {machine}; load average at start: {start_load}");
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map(|d| format!("built {:.0} min ago", d.as_secs_f64() / 60.0))
        .unwrap_or_default();
    println!(
        "binary: {} ({built}); temp dir: {}",
        bin.display(),
        dir.display()
    );
    start_load
}

/// A path as a command-line argument.
pub fn path_str(p: &Path) -> Res<&str> {
    p.to_str()
        .ok_or_else(|| format!("non-UTF-8 path {}", p.display()))
}
