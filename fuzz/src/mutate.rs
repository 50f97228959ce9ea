//! A small deterministic mutator for the bounded runs inside `cargo test`: byte flips,
//! interesting values (including msgpack markers and lengths), insertions, deletions,
//! duplications and splices of other inputs. It is no substitute for libFuzzer's coverage
//! guidance (docs/fuzzing.md); it keeps every target exercised on every test run.

/// xorshift64*: deterministic, no dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Bytes worth trying anywhere: boundaries, and msgpack's markers (nil, false/true, bin8..32,
/// ext, float, uint8..64, int8..64, str8..32, array16/32, map16/32, the reserved 0xc1).
const BYTES: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0xff, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xca, 0xcb, 0xcc,
    0xcd, 0xce, 0xcf, 0xd0, 0xd3, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0x90, 0x9f, 0x80, 0x8f,
    0xa0, 0xbf,
];

const WORDS: &[u64] = &[
    0,
    1,
    2,
    4,
    16,
    255,
    256,
    0x7fff,
    0xffff,
    0x10000,
    1 << 20,
    (20 << 20) + 1,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 1,
];

/// Applies one to four random mutations to `data`, splicing from `others` at times.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, others: &[Vec<u8>], max_len: usize) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = BYTES[rng.below(BYTES.len())];
            }
            2 if len > 0 => {
                // An interesting word, in either byte order and any width.
                let w = WORDS[rng.below(WORDS.len())];
                let width = [1, 2, 4, 8][rng.below(4)];
                let bytes = if rng.below(2) == 0 {
                    w.to_be_bytes()[8 - width..].to_vec()
                } else {
                    w.to_le_bytes()[..width].to_vec()
                };
                let i = rng.below(len);
                for (j, b) in bytes.into_iter().enumerate() {
                    if let Some(d) = data.get_mut(i + j) {
                        *d = b;
                    }
                }
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, fill);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                data.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            6 if len > 0 => data.truncate(rng.below(len)),
            7 if !others.is_empty() => {
                let other = &others[rng.below(others.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = a + 1 + rng.below(other.len() - a);
                    let at = rng.below(len + 1);
                    let end = (at + (b - a)).min(len);
                    data.splice(at..end, other[a..b].iter().copied());
                }
            }
            8 if len > 1 => {
                // Swap two bytes.
                let (i, j) = (rng.below(len), rng.below(len));
                data.swap(i, j);
            }
            _ => {
                let i = rng.below(len + 1);
                data.insert(i, BYTES[rng.below(BYTES.len())]);
            }
        }
    }
    data.truncate(max_len);
}
