//! Deterministic test data for the benches (`#[path = "common/mod.rs"] mod common;`).
#![allow(dead_code)]

/// xorshift64* — small, fast, and stable across dependency versions.
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
    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

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
    let vocab = vocabulary(&mut rng);
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

fn vocabulary(rng: &mut Rng) -> Vec<Vec<u8>> {
    const COMMON: &[&str] = &[
        "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be",
        "by", "this", "are", "from", "or", "an", "error", "value", "return", "int", "if", "else",
        "void", "static", "const", "struct", "self", "None", "true", "false",
    ];
    let mut v: Vec<Vec<u8>> = COMMON.iter().map(|w| w.as_bytes().to_vec()).collect();
    while v.len() < 512 {
        let len = 3 + rng.below(9) as usize;
        v.push((0..len).map(|_| b'a' + rng.below(26) as u8).collect());
    }
    v
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
