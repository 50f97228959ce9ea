//! Deterministic disk content. Three generators, each pinned by what depends on its exact
//! bytes, so none may change:
//!
//! - [`make_disk`] and [`random_writes`] (seeded [`StdRng`]): the real-process tests' disks
//!   and writes;
//! - [`mixed_disk_data`]: in-memory data for the seal and cache benches;
//! - [`generate_disk`]: the disk images of the end-to-end benches (`pipeline`, `scaleout`),
//!   whose figures in BENCHMARKS.md were measured on exactly these bytes.
//!
//! The two bench generators share the [`Rng`] and the vocabulary of their text.

use std::{fs::File, os::unix::fs::FileExt, path::Path};

use rand::{rngs::StdRng, Rng as _, SeedableRng};

use crate::{Res, Rng, BLOCK};

/// Common words of text, logs and source, in the order the generators index them.
pub const COMMON_WORDS: &[&str] = &[
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

/// The first `common` of [`COMMON_WORDS`], then generated words (`word`) up to `size` words.
pub fn vocabulary(
    rng: &mut Rng,
    common: usize,
    size: usize,
    mut word: impl FnMut(&mut Rng) -> Vec<u8>,
) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = COMMON_WORDS[..common]
        .iter()
        .map(|w| w.as_bytes().to_vec())
        .collect();
    while v.len() < size {
        v.push(word(rng));
    }
    v
}

// ---------------------------------------------------------------------------------------
// The tests' disks

/// A disk image of realistic mixed content: text, structured records, random bytes, zeros.
pub fn make_disk(path: &Path, size: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        let chunk = &mut buf[..n];
        match rng.gen_range(0..4) {
            0 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = b"lorem ipsum dolor sit amet\n"[i % 27]),
            1 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = if i % 16 < 4 { rng.gen() } else { (i % 7) as u8 }),
            2 => rng.fill(chunk),
            _ => {
                off += n as u64;
                continue;
            }
        }
        f.write_all_at(chunk, off).unwrap();
        off += n as u64;
    }
    f.sync_all().unwrap();
}

/// Random writes of mixed sizes (512 B .. 1 MiB, unaligned too). Returns bytes written.
pub fn random_writes(path: &Path, rng: &mut StdRng, count: usize) -> u64 {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    // Seek, not metadata: a block device's metadata length is 0.
    let size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).unwrap();
    let mut total = 0;
    for _ in 0..count {
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..=512),
            1 => 4096,
            2 => rng.gen_range(4096..65536),
            _ => 1 << 20,
        };
        let off = rng.gen_range(0..size - len as u64);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        f.write_all_at(&data, off).unwrap();
        total += len as u64;
    }
    f.sync_data().unwrap();
    total
}

// ---------------------------------------------------------------------------------------
// The seal and cache benches' data

/// Size of one homogeneous extent in [`mixed_disk_data`].
pub const EXTENT: usize = 64 << 10;

/// A disk-like mix, in 64 KiB extents shuffled deterministically:
/// ~30 % text (words from a ~500-word vocabulary, skewed towards common words, with numbers,
/// punctuation and line breaks), ~30 % structured binary (56-byte records with constant
/// fields, counters and small random fields), ~20 % random bytes (incompressible, like
/// already-compressed files), ~20 % zeros.
pub fn mixed_disk_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let n = len.div_ceil(EXTENT);
    // Exact proportions, then a Fisher-Yates shuffle.
    let mut kinds: Vec<u8> = (0..n)
        .map(|i| match (i * 10) / n {
            0..=2 => 0, // text
            3..=5 => 1, // structs
            6..=7 => 2, // random
            _ => 3,     // zeros
        })
        .collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        kinds.swap(i, j);
    }
    // 34 common words, then lower-case words of 3..12 letters.
    let vocab = vocabulary(&mut rng, 34, 512, |rng| {
        let len = 3 + rng.below(9) as usize;
        (0..len).map(|_| b'a' + rng.below(26) as u8).collect()
    });
    let mut out = Vec::with_capacity(n * EXTENT);
    let mut struct_id = 0u64;
    for k in kinds {
        let start = out.len();
        match k {
            0 => text(&mut rng, &vocab, &mut out, EXTENT),
            1 => structs(&mut rng, &mut struct_id, &mut out, EXTENT),
            2 => {
                out.resize(start + EXTENT, 0);
                rng.fill(&mut out[start..]);
            }
            _ => out.resize(start + EXTENT, 0),
        }
        out.truncate(start + EXTENT);
    }
    out.truncate(len);
    out
}

fn text(rng: &mut Rng, vocab: &[Vec<u8>], out: &mut Vec<u8>, n: usize) {
    let end = out.len() + n;
    let mut col = 0;
    while out.len() < end {
        // Skewed choice: the product of two uniforms favours low (common) indices.
        let a = rng.below(vocab.len() as u64);
        let b = rng.below(vocab.len() as u64);
        let r = rng.below(100);
        if r < 4 {
            let num = rng.below(100_000).to_string();
            out.extend_from_slice(num.as_bytes());
        } else {
            out.extend_from_slice(&vocab[(a * b / vocab.len() as u64) as usize]);
        }
        col += 1;
        match rng.below(100) {
            0..=5 => out.extend_from_slice(b". "),
            6..=9 => out.extend_from_slice(b", "),
            _ if col > 12 => {
                out.push(b'\n');
                col = 0;
            }
            _ => out.push(b' '),
        }
    }
}

fn structs(rng: &mut Rng, id: &mut u64, out: &mut Vec<u8>, n: usize) {
    const NAMES: [&[u8; 16]; 4] = [
        b"inode_entry\0\0\0\0\0",
        b"dir_entry\0\0\0\0\0\0\0",
        b"extent\0\0\0\0\0\0\0\0\0\0",
        b"journal_block\0\0\0",
    ];
    let end = out.len() + n;
    let mut ts = 1_700_000_000_000u64 + rng.below(1 << 30);
    while out.len() < end {
        *id += 1;
        ts += rng.below(5000);
        let kind = rng.below(4) as usize;
        out.extend_from_slice(&0xFEED_BEEFu32.to_le_bytes());
        out.extend_from_slice(&(kind as u32).to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&ts.to_le_bytes());
        for _ in 0..3 {
            out.extend_from_slice(&(rng.below(1000) as u32).to_le_bytes());
        }
        out.extend_from_slice(&(rng.next_u64() as u32).to_le_bytes()); // a hash-like field
        out.extend_from_slice(NAMES[kind]);
    }
}

// ---------------------------------------------------------------------------------------
// The end-to-end benches' disks

#[derive(Default, Clone, Copy)]
pub struct DiskStats {
    /// Bytes in 4 KiB blocks that are not all zero: what an initial scan must send.
    pub nonzero_bytes: u64,
    pub text: u64,
    pub structured: u64,
    pub random: u64,
    pub zero: u64,
}

/// Writes a disk image of realistic mixed content in extents of 64 KiB–1 MiB:
/// ~30 % text (logs, source, config), ~30 % structured binary (fixed-size records with
/// constant fields, counters and small random fields), ~20 % incompressible random data
/// (already-compressed files), ~20 % zero regions (left as holes, like a fresh sparse image).
pub fn generate_disk(path: &Path, size: u64, seed: u64) -> Res<DiskStats> {
    let mut rng = Rng::new(seed);
    // Every common word, then generated identifiers, paths and numbers.
    let vocab = vocabulary(&mut rng, COMMON_WORDS.len(), 600, |rng| {
        let len = 3 + rng.below(10) as usize;
        (0..len)
            .map(|i| match rng.below(10) {
                0 if i > 0 => b'_',
                1 if i > 0 => b'0' + rng.below(10) as u8,
                _ => b'a' + rng.below(26) as u8,
            })
            .collect()
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a: a digest that is stable across Rust releases.
    fn fnv(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// The generators' bytes are what the tests' seeds and the benches' figures were chosen
    /// and measured with; a change to any of them must be deliberate.
    #[test]
    fn the_generators_produce_the_same_bytes_as_ever() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk");
        let digests = [
            fnv(&mixed_disk_data(1 << 20, 42)),
            {
                generate_disk(&p, 4 << 20, 42).unwrap();
                fnv(&std::fs::read(&p).unwrap())
            },
            {
                make_disk(&p, 4 << 20, 5);
                random_writes(&p, &mut StdRng::seed_from_u64(6), 10);
                fnv(&std::fs::read(&p).unwrap())
            },
        ];
        assert_eq!(
            digests,
            [
                0x2047_283f_b7f9_f31a,
                0xae72_7fe2_fe34_b4c2,
                0x8dae_4b57_376e_ecb5
            ]
        );
    }
}
