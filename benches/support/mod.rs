//! What the end-to-end benches (`pipeline.rs`, `scaleout.rs`) share: the deterministic
//! disk generator, small process and JSON helpers, statistics. Included with `#[path]`, like
//! `common/`, so it is not a bench target of its own.
#![allow(dead_code)]
use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::Value;

pub const BLOCK: u64 = 4096;
pub const MIB: f64 = 1024.0 * 1024.0;
pub const MB: f64 = 1e6;

pub type Res<T> = Result<T, String>;

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

pub fn env_num(name: &str, default: u64) -> Res<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// xorshift64*: small, fast, stable across dependency versions.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }
    pub fn below64(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[derive(Default, Clone, Copy)]
pub struct DiskStats {
    /// Bytes in 4 KiB blocks that are not all zero: what an initial scan must send.
    pub nonzero_bytes: u64,
    pub text: u64,
    pub structured: u64,
    pub random: u64,
    pub zero: u64,
}

/// Vocabulary skewed towards common words, plus generated identifiers, paths and numbers.
pub fn vocabulary(rng: &mut Rng) -> Vec<Vec<u8>> {
    const COMMON: &[&str] = &[
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "with",
        "was",
        "on",
        "be",
        "by",
        "this",
        "are",
        "from",
        "or",
        "an",
        "error",
        "value",
        "return",
        "int",
        "if",
        "else",
        "void",
        "static",
        "const",
        "struct",
        "self",
        "None",
        "true",
        "false",
        "INFO",
        "WARN",
        "kernel:",
        "GET",
        "/index.html",
        "HTTP/1.1",
        "200",
        "user",
        "session",
        "/usr/lib/x86_64-linux-gnu",
    ];
    let mut v: Vec<Vec<u8>> = COMMON.iter().map(|w| w.as_bytes().to_vec()).collect();
    while v.len() < 600 {
        let len = 3 + rng.below(10) as usize;
        let w: Vec<u8> = (0..len)
            .map(|i| match rng.below(10) {
                0 if i > 0 => b'_',
                1 if i > 0 => b'0' + rng.below(10) as u8,
                _ => b'a' + rng.below(26) as u8,
            })
            .collect();
        v.push(w);
    }
    v
}

/// Writes a disk image of realistic mixed content in extents of 64 KiB–1 MiB:
/// ~30 % text (logs, source, config), ~30 % structured binary (fixed-size records with
/// constant fields, counters and small random fields), ~20 % incompressible random data
/// (already-compressed files), ~20 % zero regions (left as holes, like a fresh sparse image).
pub fn generate_disk(path: &Path, size: u64, seed: u64) -> Res<DiskStats> {
    let mut rng = Rng::new(seed);
    let vocab = vocabulary(&mut rng);
    let f = File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    f.set_len(size).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut stats = DiskStats::default();
    let mut off = 0u64;
    let mut counter = 0u64;
    while off < size {
        let ext = ((64u64 << 10) << rng.below(5)).min(size - off) as usize; // 64 KiB..1 MiB
        let chunk = &mut buf[..ext];
        match rng.below(10) {
            0..=2 => {
                let mut i = 0;
                while i < ext {
                    // Zipf-ish: common words much more often.
                    let r = rng.below(1000) as usize;
                    let idx = if r < 600 { r % 46 } else { r % vocab.len() };
                    let w = &vocab[idx];
                    let take = w.len().min(ext - i);
                    chunk[i..i + take].copy_from_slice(&w[..take]);
                    i += take;
                    if i < ext {
                        chunk[i] = match rng.below(16) {
                            0 => b'\n',
                            1 => b',',
                            _ => b' ',
                        };
                        i += 1;
                    }
                }
                stats.text += ext as u64;
            }
            3..=5 => {
                for rec in chunk.chunks_mut(56) {
                    counter += 1;
                    let small = rng.next_u64();
                    let mut r = [0u8; 56];
                    r[0..4].copy_from_slice(b"REC1");
                    r[4..12].copy_from_slice(&counter.to_le_bytes());
                    r[12..16].copy_from_slice(&((small & 0xffff) as u32).to_le_bytes());
                    r[16..20].copy_from_slice(&(((small >> 16) & 0xff) as u32).to_le_bytes());
                    r[20..28].copy_from_slice(&(1_700_000_000u64 + counter / 7).to_le_bytes());
                    r[28] = (small >> 24) as u8 & 3;
                    // r[29..56]: padding / constant fields
                    r[48..56].copy_from_slice(b"\xde\xad\xbe\xef\0\0\0\x01");
                    let n = rec.len();
                    rec.copy_from_slice(&r[..n]);
                }
                stats.structured += ext as u64;
            }
            6..=7 => {
                rng.fill(chunk);
                stats.random += ext as u64;
            }
            _ => {
                stats.zero += ext as u64;
                off += ext as u64;
                continue; // a hole: reads as zeros
            }
        }
        for b in chunk.chunks(BLOCK as usize) {
            if b.iter().any(|&x| x != 0) {
                stats.nonzero_bytes += b.len() as u64;
            }
        }
        f.write_all_at(chunk, off)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        off += ext as u64;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(stats)
}

pub fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

pub fn free_udp_port() -> Res<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(s.local_addr().map_err(|e| e.to_string())?.port())
}

/// Runs a command to completion; Err with its output on failure.
pub fn run_cmd(prog: &str, args: &[&str]) -> Res<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{prog} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cmp` of replica against source: the benchmark of a wrong result is worthless.
pub fn verify_same(source: &Path, replica: &Path, what: &str) -> Res<()> {
    let out = Command::new("cmp")
        .arg(source)
        .arg(replica)
        .output()
        .map_err(|e| format!("run cmp: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "REPLICA MISMATCH after {what}: `cmp {} {}` says: {}{}",
            source.display(),
            replica.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

pub fn u64_field(m: &Value, f: &str) -> u64 {
    m[f].as_u64().unwrap_or(0)
}

pub fn str_field<'a>(m: &'a Value, f: &str) -> &'a str {
    m[f].as_str().unwrap_or("?")
}

#[derive(Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stat(v: &[f64]) -> Stat {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Stat {
        median,
        min: *s.first().unwrap_or(&f64::NAN),
        max: *s.last().unwrap_or(&f64::NAN),
        n,
    }
}

pub fn fmt_stat(s: Stat, prec: usize) -> String {
    if s.n <= 1 {
        format!("{:.p$}", s.median, p = prec)
    } else {
        format!("{:.p$} [{:.p$}–{:.p$}]", s.median, s.min, s.max, p = prec)
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn path_str(p: &Path) -> Res<&str> {
    p.to_str()
        .ok_or_else(|| format!("non-UTF-8 path {}", p.display()))
}
