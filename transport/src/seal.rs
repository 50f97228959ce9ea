//! Payload sealing: the one module that knows zstd and chacha20poly1305.
//!
//! A batch of replication records is *sealed* by the process server before it is cached and
//! shipped, and *opened* by the master target (DESIGN.md §3, "Sealing"):
//!
//! 1. **compress** the plaintext with zstd (level 1 by default; [`seal_with_level`] for
//!    others). Incompressible input needs no special case: zstd stores blocks that do not
//!    shrink as raw blocks (3 bytes of overhead per 128 KiB block), and decoding those is a
//!    memcpy. So there is no "stored" flag; every body is one zstd frame.
//! 2. **encrypt** the compressed bytes with XChaCha20-Poly1305 under the machine's
//!    [`DataKey`]. The result is `ciphertext || 16-byte tag`, in [`Sealed::ciphertext`].
//!
//! ## Nonce
//!
//! A fresh random 24-byte nonce per seal, carried in [`Sealed::nonce`]. XChaCha20's 192-bit
//! nonce makes random nonces safe (no birthday risk at any realistic volume), so a nonce never
//! repeats under a key, whatever happens to sequence numbers around crashes: a process server
//! that sealed a range, crashed before caching it, and later sealed *different* records under
//! the same range (a restarted agent reusing uncached seqs) still uses two different nonces.
//! (An earlier design derived the nonce from the seq range; that was safe only as long as a
//! range never carried two different plaintexts, an invariant too easy to break in recovery.)
//! Binding to machine, epoch and position is the associated data's job.
//!
//! ## Associated data
//!
//! Authenticated but not encrypted, rebuilt by the opener from its own context:
//!
//! ```text
//! b"haven-seal" || SEAL_VERSION (u8) || machine.len() (u64 LE) || machine (UTF-8)
//!   || epoch (u32 LE) || first_seq (u64 LE) || last_seq (u64 LE) || raw_len (u32 LE)
//! ```
//!
//! so a batch replayed into another machine's stream, another epoch or another position, or
//! with a tampered `raw_len`, fails with [`SealError::Authentication`].
//!
//! ## Limits
//!
//! [`open`] checks `ciphertext.len() <= MAX_SEALED_LEN` and `raw_len <= MAX_RAW_LEN` before
//! any work, decompresses into a buffer of exactly `raw_len` capacity (a frame that would
//! expand further is an error, not an allocation), and checks that exactly `raw_len` bytes
//! came out.
//!
//! zstd contexts are kept per thread and reused, so a call allocates only its output.
use std::cell::RefCell;
use std::fmt;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;

/// Version of the sealed format; bound into the associated data.
pub const SEAL_VERSION: u8 = 1;
/// Largest plaintext batch accepted by [`seal`] and announced by a [`Sealed::raw_len`].
pub const MAX_RAW_LEN: usize = 16 << 20;
/// Largest [`Sealed::ciphertext`] accepted by [`open`]; checked before any decrypt or
/// decompress. zstd never expands input by more than a few bytes per 128 KiB block
/// ([`zstd_frame_max`]), so a `MAX_RAW_LEN` batch always seals to less than this.
pub const MAX_SEALED_LEN: usize = MAX_RAW_LEN + 4096;
/// Default zstd level used by [`seal`].
pub const DEFAULT_LEVEL: i32 = 1;

/// Length of the Poly1305 tag at the end of [`Sealed::ciphertext`].
pub const TAG_LEN: usize = 16;

/// zstd's format limits (RFC 8878): the largest frame header, the largest block, a block's
/// header, and the optional content checksum.
const ZSTD_FRAME_HEADER_MAX: usize = 18;
const ZSTD_BLOCK_MAX: usize = 128 << 10;
const ZSTD_BLOCK_HEADER: usize = 3;
const ZSTD_CHECKSUM: usize = 4;

/// The longest zstd frame of `n` bytes of input: zstd stores a block that would not shrink as
/// a raw block, so a frame is never longer than the input stored raw, block by block.
pub const fn zstd_frame_max(n: usize) -> usize {
    let blocks = if n == 0 {
        1
    } else {
        n.div_ceil(ZSTD_BLOCK_MAX)
    };
    n + ZSTD_FRAME_HEADER_MAX + blocks * ZSTD_BLOCK_HEADER + ZSTD_CHECKSUM
}

// `raw_len` travels as a u32 in the sealed batch and in its associated data.
const _: () = assert!(MAX_RAW_LEN <= u32::MAX as usize);
// `seal` refuses nothing that `open` would accept and vice versa: the largest raw batch, in
// the longest zstd frame it can become, plus the tag, is within the sealed limit that `open`
// checks before any work.
const _: () = assert!(zstd_frame_max(MAX_RAW_LEN) + TAG_LEN <= MAX_SEALED_LEN);
const AAD_DOMAIN: &[u8] = b"haven-seal";

/// A machine's 256-bit data key. `Debug` never prints the key; the bytes are wiped on drop
/// (best effort: copies made by moves are not tracked).
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// A fresh random key from the OS-seeded thread RNG.
    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut b);
        DataKey(b)
    }

    pub fn from_bytes(b: [u8; 32]) -> Self {
        DataKey(b)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key from a slice, which must be exactly 32 bytes long.
    pub fn from_slice(b: &[u8]) -> Result<Self, SealError> {
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| SealError::BadKey { len: b.len() })?;
        Ok(DataKey(arr))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference to a u8.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where a batch belongs. Everything here is bound into the AEAD (nonce and associated data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealContext<'a> {
    pub machine: &'a str,
    pub epoch: u32,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// A sealed batch: `ciphertext` is the encrypted zstd frame followed by the 16-byte tag.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sealed {
    /// Length of the plaintext; authenticated.
    pub raw_len: u32,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The random 24-byte XChaCha20 nonce this batch was sealed under.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
}

/// Length of [`Sealed::nonce`].
pub const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{what} is {len} bytes, more than the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "sealed batch failed authentication (wrong key, tampered, or sealed for another \
         machine/epoch/seq range)"
    )]
    Authentication,
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("decompressed length {actual} does not match the sealed raw_len {expected}")]
    LengthMismatch { expected: usize, actual: usize },
    #[error("data key must be 32 bytes, got {len}")]
    BadKey { len: usize },
    #[error("compression failed: {0}")]
    Compress(String),
}

/// Per-thread reusable zstd contexts and decrypt scratch space.
struct Contexts {
    compressor: Option<(zstd::bulk::Compressor<'static>, i32)>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    scratch: Vec<u8>,
}

thread_local! {
    static CONTEXTS: RefCell<Contexts> = const {
        RefCell::new(Contexts { compressor: None, decompressor: None, scratch: Vec::new() })
    };
}

/// Scratch kept between calls is released if it grew beyond this (a rare oversized batch).
const SCRATCH_KEEP: usize = 8 << 20;

/// Runs `f` with this thread's contexts, or with fresh ones if they are unavailable (thread
/// teardown, or a re-entrant call).
fn with_contexts<R>(f: impl FnOnce(&mut Contexts) -> R) -> R {
    let mut f = Some(f);
    let res = CONTEXTS.try_with(|c| {
        c.try_borrow_mut()
            .ok()
            .map(|mut c| (f.take().expect("called once"))(&mut c))
    });
    match res {
        Ok(Some(r)) => r,
        _ => {
            let mut fresh = Contexts {
                compressor: None,
                decompressor: None,
                scratch: Vec::new(),
            };
            (f.take().expect("not yet called"))(&mut fresh)
        }
    }
}

fn random_nonce() -> XNonce {
    let mut n = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut n);
    n.into()
}

fn associated_data(ctx: &SealContext, raw_len: u32) -> Vec<u8> {
    let m = ctx.machine.as_bytes();
    let mut ad = Vec::with_capacity(AAD_DOMAIN.len() + 1 + 8 + m.len() + 4 + 8 + 8 + 4);
    ad.extend_from_slice(AAD_DOMAIN);
    ad.push(SEAL_VERSION);
    ad.extend_from_slice(&(m.len() as u64).to_le_bytes());
    ad.extend_from_slice(m);
    ad.extend_from_slice(&ctx.epoch.to_le_bytes());
    ad.extend_from_slice(&ctx.first_seq.to_le_bytes());
    ad.extend_from_slice(&ctx.last_seq.to_le_bytes());
    ad.extend_from_slice(&raw_len.to_le_bytes());
    ad
}

/// Seals `plaintext` at zstd level 1.
pub fn seal(key: &DataKey, ctx: &SealContext, plaintext: &[u8]) -> Result<Sealed, SealError> {
    seal_with_level(key, ctx, plaintext, DEFAULT_LEVEL)
}

/// Seals `plaintext` at the given zstd level. See the module docs: use one level per key.
pub fn seal_with_level(
    key: &DataKey,
    ctx: &SealContext,
    plaintext: &[u8],
    level: i32,
) -> Result<Sealed, SealError> {
    if plaintext.len() > MAX_RAW_LEN {
        return Err(SealError::TooLarge {
            what: "plaintext batch",
            len: plaintext.len(),
            max: MAX_RAW_LEN,
        });
    }
    let raw_len = plaintext.len() as u32;

    let bound = zstd::zstd_safe::compress_bound(plaintext.len());
    let mut out: Vec<u8> = Vec::with_capacity(bound + TAG_LEN);
    with_contexts(|c| -> Result<(), SealError> {
        let comp = match &mut c.compressor {
            Some((comp, cur)) => {
                if *cur != level {
                    comp.set_compression_level(level)
                        .map_err(|e| SealError::Compress(e.to_string()))?;
                    *cur = level;
                }
                comp
            }
            slot @ None => {
                let comp = zstd::bulk::Compressor::new(level)
                    .map_err(|e| SealError::Compress(e.to_string()))?;
                &mut slot.insert((comp, level)).0
            }
        };
        comp.compress_to_buffer(plaintext, &mut out)
            .map_err(|e| SealError::Compress(e.to_string()))?;
        Ok(())
    })?;

    let nonce = random_nonce();
    let tag = key
        .cipher()
        .encrypt_in_place_detached(&nonce, &associated_data(ctx, raw_len), &mut out)
        .map_err(|_| SealError::Compress("encryption failed".into()))?;
    out.extend_from_slice(&tag);
    if out.len() > MAX_SEALED_LEN {
        // Cannot happen for plaintext <= MAX_RAW_LEN (zstd falls back to raw blocks).
        return Err(SealError::TooLarge {
            what: "sealed batch",
            len: out.len(),
            max: MAX_SEALED_LEN,
        });
    }
    // Give back the unused part of the compress bound; glibc shrinks in place.
    if out.capacity() - out.len() > out.len() / 16 {
        out.shrink_to_fit();
    }
    Ok(Sealed {
        raw_len,
        ciphertext: out,
        nonce: nonce.to_vec(),
    })
}

/// Authenticates, decrypts and decompresses a sealed batch for the given context.
pub fn open(key: &DataKey, ctx: &SealContext, sealed: &Sealed) -> Result<Vec<u8>, SealError> {
    let ct = &sealed.ciphertext;
    if ct.len() > MAX_SEALED_LEN {
        return Err(SealError::TooLarge {
            what: "sealed batch",
            len: ct.len(),
            max: MAX_SEALED_LEN,
        });
    }
    let raw_len = sealed.raw_len as usize;
    if raw_len > MAX_RAW_LEN {
        return Err(SealError::TooLarge {
            what: "announced raw_len",
            len: raw_len,
            max: MAX_RAW_LEN,
        });
    }
    if ct.len() < TAG_LEN {
        return Err(SealError::Authentication);
    }
    let (body, tag) = ct.split_at(ct.len() - TAG_LEN);
    let tag = Tag::clone_from_slice(tag);
    let cipher = key.cipher();
    if sealed.nonce.len() != NONCE_LEN {
        return Err(SealError::Authentication);
    }
    let nonce = *XNonce::from_slice(&sealed.nonce);
    let ad = associated_data(ctx, sealed.raw_len);

    with_contexts(|c| {
        // Decrypt a copy in the reusable scratch buffer (the input is borrowed).
        c.scratch.clear();
        c.scratch.extend_from_slice(body);
        let res = (|| {
            cipher
                .decrypt_in_place_detached(&nonce, &ad, &mut c.scratch, &tag)
                .map_err(|_| SealError::Authentication)?;
            let dec = match &mut c.decompressor {
                Some(d) => d,
                slot @ None => slot.insert(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| SealError::Decompress(e.to_string()))?,
                ),
            };
            // Capacity is exactly raw_len: a frame that expands further fails here.
            let mut out = Vec::with_capacity(raw_len);
            dec.decompress_to_buffer(&c.scratch[..], &mut out)
                .map_err(|e| SealError::Decompress(e.to_string()))?;
            if out.len() != raw_len {
                return Err(SealError::LengthMismatch {
                    expected: raw_len,
                    actual: out.len(),
                });
            }
            Ok(out)
        })();
        if c.scratch.capacity() > SCRATCH_KEEP {
            c.scratch = Vec::new();
        }
        res
    })
}

/// The stages of [`seal`]/[`open`] on their own, on the same per-thread contexts, so that
/// benchmarks can report each stage as a baseline. Not part of the API.
#[doc(hidden)]
pub mod bench_hooks {
    use super::*;

    /// zstd compression only, as [`seal_with_level`] does it.
    pub fn compress(plaintext: &[u8], level: i32) -> Vec<u8> {
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(plaintext.len()));
        with_contexts(|c| {
            let comp = c.compressor.get_or_insert_with(|| {
                (
                    zstd::bulk::Compressor::new(level).expect("zstd context"),
                    level,
                )
            });
            if comp.1 != level {
                comp.0.set_compression_level(level).expect("zstd level");
                comp.1 = level;
            }
            comp.0
                .compress_to_buffer(plaintext, &mut out)
                .expect("compress");
        });
        out
    }

    /// zstd decompression only, as [`open`] does it.
    pub fn decompress(frame: &[u8], raw_len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(raw_len);
        with_contexts(|c| {
            c.decompressor
                .get_or_insert_with(|| zstd::bulk::Decompressor::new().expect("zstd context"))
                .decompress_to_buffer(frame, &mut out)
                .expect("decompress");
        });
        out
    }

    /// XChaCha20-Poly1305 encryption only, in place; returns the tag.
    pub fn encrypt_in_place(key: &DataKey, ctx: &SealContext, buf: &mut [u8]) -> [u8; 16] {
        key.cipher()
            .encrypt_in_place_detached(&random_nonce(), &associated_data(ctx, 0), buf)
            .expect("encrypt")
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> SealContext<'static> {
        SealContext {
            machine: "web-01",
            epoch: 3,
            first_seq: 1000,
            last_seq: 1041,
        }
    }

    fn key() -> DataKey {
        DataKey::from_bytes([7u8; 32])
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    fn mixed(n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        let words = ["alpha ", "beta ", "gamma ", "delta\n"];
        let r = random(n, 99);
        let mut i = 0;
        while v.len() < n {
            match (i / 4096) % 4 {
                0 => v.extend_from_slice(words[r[i % r.len()] as usize % 4].as_bytes()),
                1 => v.push(0),
                2 => v.push(r[i % r.len()]),
                _ => v.extend_from_slice(&(i as u32).to_le_bytes()),
            }
            i += 1;
        }
        v.truncate(n);
        v
    }

    #[test]
    fn round_trip() {
        let k = key();
        let c = ctx();
        for data in [
            Vec::new(),
            vec![0u8; 1 << 20],
            random(1 << 20, 1),
            mixed(3 << 20),
            b"x".to_vec(),
        ] {
            let s = seal(&k, &c, &data).unwrap();
            assert_eq!(s.raw_len as usize, data.len());
            assert_eq!(open(&k, &c, &s).unwrap(), data);
            for level in [-1, 3, 19] {
                let s = seal_with_level(&k, &c, &data, level).unwrap();
                assert_eq!(open(&k, &c, &s).unwrap(), data);
            }
        }
    }

    #[test]
    fn incompressible_stays_within_limit() {
        let data = random(MAX_RAW_LEN, 5);
        let s = seal(&key(), &ctx(), &data).unwrap();
        // Within the bound the size assertions are built on, and so within the limit.
        assert!(s.ciphertext.len() <= zstd_frame_max(MAX_RAW_LEN) + TAG_LEN);
        assert!(s.ciphertext.len() <= MAX_SEALED_LEN);
        assert_eq!(open(&key(), &ctx(), &s).unwrap(), data);
    }

    #[test]
    fn zeros_compress() {
        let s = seal(&key(), &ctx(), &vec![0u8; 4 << 20]).unwrap();
        assert!(s.ciphertext.len() < 4096, "{}", s.ciphertext.len());
    }

    #[test]
    fn flipped_bit_anywhere_fails() {
        let k = key();
        let c = ctx();
        let s = seal(&k, &c, &mixed(64 << 10)).unwrap();
        let n = s.ciphertext.len();
        // Every bit of the first and last bytes (tag), and a spread of bits elsewhere.
        let mut positions: Vec<usize> = (0..8).chain(n * 8 - 8..n * 8).collect();
        positions.extend((0..n * 8).step_by(997));
        for bit in positions {
            let mut t = s.clone();
            t.ciphertext[bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(open(&k, &c, &t), Err(SealError::Authentication)),
                "bit {bit}"
            );
        }
        // Truncated and extended ciphertexts too.
        let mut t = s.clone();
        t.ciphertext.pop();
        assert!(matches!(open(&k, &c, &t), Err(SealError::Authentication)));
        let mut t = s.clone();
        t.ciphertext.push(0);
        assert!(matches!(open(&k, &c, &t), Err(SealError::Authentication)));
        let t = Sealed {
            raw_len: 0,
            ciphertext: vec![0; 5],
            nonce: vec![0; NONCE_LEN],
        };
        assert!(matches!(open(&k, &c, &t), Err(SealError::Authentication)));
        // A tampered or truncated nonce.
        let mut t = s.clone();
        t.nonce[3] ^= 1;
        assert!(matches!(open(&k, &c, &t), Err(SealError::Authentication)));
        let mut t = s.clone();
        t.nonce.pop();
        assert!(matches!(open(&k, &c, &t), Err(SealError::Authentication)));
    }

    #[test]
    fn wrong_key_fails() {
        let s = seal(&key(), &ctx(), b"hello world").unwrap();
        let other = DataKey::from_bytes([8u8; 32]);
        assert!(matches!(
            open(&other, &ctx(), &s),
            Err(SealError::Authentication)
        ));
        assert!(matches!(
            open(&DataKey::generate(), &ctx(), &s),
            Err(SealError::Authentication)
        ));
    }

    #[test]
    fn replay_into_other_context_fails() {
        let k = key();
        let c = ctx();
        let s = seal(&k, &c, b"some records").unwrap();
        let others = [
            SealContext {
                machine: "web-02",
                ..c
            },
            SealContext { machine: "", ..c },
            SealContext {
                machine: "web-0",
                ..c
            },
            SealContext { epoch: 4, ..c },
            SealContext {
                first_seq: 1001,
                ..c
            },
            SealContext {
                last_seq: 1042,
                ..c
            },
            SealContext {
                first_seq: 0,
                last_seq: 0,
                ..c
            },
        ];
        for o in others {
            assert!(
                matches!(open(&k, &o, &s), Err(SealError::Authentication)),
                "{o:?}"
            );
        }
        assert!(open(&k, &c, &s).is_ok());
    }

    #[test]
    fn tampered_raw_len_fails() {
        let k = key();
        let c = ctx();
        let s = seal(&k, &c, b"0123456789").unwrap();
        for raw_len in [0, 9, 11, 1 << 20] {
            let t = Sealed {
                raw_len,
                ..s.clone()
            };
            assert!(matches!(open(&k, &c, &t), Err(SealError::Authentication)));
        }
    }

    #[test]
    fn oversized_refused_before_work() {
        let k = key();
        let c = ctx();
        // Garbage that would fail authentication: the size checks must win.
        let t = Sealed {
            raw_len: 10,
            ciphertext: vec![0; MAX_SEALED_LEN + 1],
            nonce: vec![0; NONCE_LEN],
        };
        assert!(matches!(
            open(&k, &c, &t),
            Err(SealError::TooLarge {
                what: "sealed batch",
                ..
            })
        ));
        let t = Sealed {
            raw_len: MAX_RAW_LEN as u32 + 1,
            ciphertext: vec![0; 100],
            nonce: vec![0; NONCE_LEN],
        };
        assert!(matches!(
            open(&k, &c, &t),
            Err(SealError::TooLarge {
                what: "announced raw_len",
                ..
            })
        ));
        let big = vec![0u8; MAX_RAW_LEN + 1];
        assert!(matches!(
            seal(&k, &c, &big),
            Err(SealError::TooLarge { .. })
        ));
        assert!(seal(&k, &c, &big[..MAX_RAW_LEN]).is_ok());
    }

    #[test]
    fn every_seal_uses_a_fresh_nonce() {
        // Sealing the same range twice (a resend after a crash, possibly with other records)
        // must never reuse a nonce under the key.
        let k = key();
        let c = ctx();
        let data = mixed(1 << 20);
        let a = seal(&k, &c, &data).unwrap();
        let _ = seal_with_level(&k, &c, &random(1000, 3), 5).unwrap();
        let b = seal(&k, &c, &data).unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(a.nonce.len(), NONCE_LEN);
        // Both open to the same plaintext, on this thread and on a fresh one.
        assert_eq!(open(&k, &c, &a).unwrap(), data);
        let (k2, b2) = (k.clone(), b.clone());
        let opened = std::thread::spawn(move || open(&k2, &ctx(), &b2).unwrap())
            .join()
            .unwrap();
        assert_eq!(opened, data);
    }

    #[test]
    fn key_handling() {
        let k = DataKey::generate();
        let dbg = format!("{k:?}");
        assert_eq!(dbg, "DataKey(<redacted>)");
        let k2 = DataKey::from_slice(k.as_bytes()).unwrap();
        assert_eq!(k2.as_bytes(), k.as_bytes());
        assert!(matches!(
            DataKey::from_slice(&[0u8; 31]),
            Err(SealError::BadKey { len: 31 })
        ));
        assert!(DataKey::from_slice(&[0u8; 33]).is_err());
        assert_ne!(
            DataKey::generate().as_bytes(),
            DataKey::generate().as_bytes()
        );
    }

    #[test]
    fn decompression_bomb_refused() {
        // A validly sealed frame whose raw_len lies low (sealer bug or malicious key holder):
        // decompression must stop at raw_len, not allocate the full expansion.
        let k = key();
        let c = ctx();
        let zeros = vec![0u8; 8 << 20];
        let frame = zstd::bulk::compress(&zeros, 1).unwrap();
        let raw_len = 1000u32;
        let mut body = frame.clone();
        let n = random_nonce();
        let tag = k
            .cipher()
            .encrypt_in_place_detached(&n, &associated_data(&c, raw_len), &mut body)
            .unwrap();
        body.extend_from_slice(&tag);
        let t = Sealed {
            raw_len,
            ciphertext: body,
            nonce: n.to_vec(),
        };
        assert!(matches!(open(&k, &c, &t), Err(SealError::Decompress(_))));
        // And a frame shorter than raw_len is a length mismatch.
        let raw_len = (8 << 20) + 1;
        let mut body = frame;
        let n = random_nonce();
        let tag = k
            .cipher()
            .encrypt_in_place_detached(&n, &associated_data(&c, raw_len), &mut body)
            .unwrap();
        body.extend_from_slice(&tag);
        let t = Sealed {
            raw_len,
            ciphertext: body,
            nonce: n.to_vec(),
        };
        assert!(matches!(
            open(&k, &c, &t),
            Err(SealError::LengthMismatch { .. })
        ));
    }
}
