//! Opening sealed batches (`haven_transport::seal::open`), as the master target does with
//! what arrives in a `ShipFrame`.
//!
//! The first byte picks a mode (its two low bits; bit 7 is a variation of the mode):
//! - **forged**: every field of the `Sealed`, the context and the key from the input. Without
//!   the key nothing authenticates; this covers the checks before decryption.
//! - **authentic**: the input is the body of a sealed batch (a zstd frame, or anything) and
//!   its `raw_len`; the target encrypts it under a fixed key and the right associated data,
//!   so `open` gets past the AEAD and decompresses what the input says: the decoder that only
//!   a key holder (a process server) can reach.
//! - **round trip**: the input is a plaintext; sealing then opening gives it back, and the
//!   sealed size stays within the bound the size assertions rely on.
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use haven_transport::seal::{
    self, zstd_frame_max, DataKey, SealContext, SealError, Sealed, MAX_RAW_LEN, MAX_SEALED_LEN,
    NONCE_LEN, SEAL_VERSION, TAG_LEN,
};

const KEY: [u8; 32] = [0x42; 32];

/// The input's layout after the mode byte, so that seeds are easy to write:
/// `epoch u32 | first_seq u64 | last_seq u64 | raw_len u32 | nonce [24] | key [32]
///  | machine_len u8 | machine | rest` (little endian; a short input is padded with zeros).
struct Input<'a> {
    machine: String,
    epoch: u32,
    first_seq: u64,
    last_seq: u64,
    raw_len: u32,
    nonce: [u8; NONCE_LEN],
    key: [u8; 32],
    rest: &'a [u8],
}

const FIXED: usize = 4 + 8 + 8 + 4 + NONCE_LEN + 32 + 1;

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Self {
        let mut head = [0u8; FIXED];
        let n = data.len().min(FIXED);
        head[..n].copy_from_slice(&data[..n]);
        let rest = &data[n..];
        let machine_len = (head[FIXED - 1] as usize).min(rest.len());
        let (machine, rest) = rest.split_at(machine_len);
        Input {
            machine: String::from_utf8_lossy(machine).into_owned(),
            epoch: u32::from_le_bytes(head[0..4].try_into().unwrap()),
            first_seq: u64::from_le_bytes(head[4..12].try_into().unwrap()),
            last_seq: u64::from_le_bytes(head[12..20].try_into().unwrap()),
            raw_len: u32::from_le_bytes(head[20..24].try_into().unwrap()),
            nonce: head[24..48].try_into().unwrap(),
            key: head[48..80].try_into().unwrap(),
            rest,
        }
    }

    fn ctx(&self) -> SealContext<'_> {
        SealContext {
            machine: &self.machine,
            epoch: self.epoch,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
        }
    }
}

/// The associated data as documented in the seal module.
fn associated_data(ctx: &SealContext, raw_len: u32) -> Vec<u8> {
    let mut ad = b"haven-seal".to_vec();
    ad.push(SEAL_VERSION);
    ad.extend_from_slice(&(ctx.machine.len() as u64).to_le_bytes());
    ad.extend_from_slice(ctx.machine.as_bytes());
    ad.extend_from_slice(&ctx.epoch.to_le_bytes());
    ad.extend_from_slice(&ctx.first_seq.to_le_bytes());
    ad.extend_from_slice(&ctx.last_seq.to_le_bytes());
    ad.extend_from_slice(&raw_len.to_le_bytes());
    ad
}

/// Seals `body` as if it were a compressed batch, under `KEY`.
fn authentic(ctx: &SealContext, raw_len: u32, body: &[u8], nonce: [u8; NONCE_LEN]) -> Sealed {
    let mut ct = body.to_vec();
    let tag = XChaCha20Poly1305::new((&KEY).into())
        .encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            &associated_data(ctx, raw_len),
            &mut ct,
        )
        .expect("encrypt");
    ct.extend_from_slice(&tag);
    Sealed {
        raw_len,
        ciphertext: ct,
        nonce: nonce.to_vec(),
    }
}

fn check(result: Result<Vec<u8>, SealError>, sealed: &Sealed) -> Option<Vec<u8>> {
    match result {
        Ok(plain) => {
            assert_eq!(
                plain.len(),
                sealed.raw_len as usize,
                "opened to another length"
            );
            Some(plain)
        }
        Err(SealError::TooLarge { len, max, .. }) => {
            assert!(len > max);
            None
        }
        Err(_) => None,
    }
}

pub fn fuzz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input = Input::parse(rest);
    let ctx = input.ctx();
    match mode & 3 {
        0 => {
            // The nonce's length is part of what is forged: take it from the rest.
            let (nonce, ciphertext) = match input.rest.split_first() {
                Some((&n, rest)) => rest.split_at((n as usize).min(rest.len())),
                None => (&[][..], &[][..]),
            };
            let sealed = Sealed {
                raw_len: input.raw_len,
                nonce: nonce.to_vec(),
                ciphertext: ciphertext.to_vec(),
            };
            let key = if mode & 0x80 != 0 { KEY } else { input.key };
            check(
                seal::open(&DataKey::from_bytes(key), &ctx, &sealed),
                &sealed,
            );
        }
        1 => {
            // Mostly plausible lengths; sometimes anything (the limit check).
            let raw_len = if mode & 0x80 != 0 {
                input.raw_len
            } else {
                input.raw_len % (1 << 16)
            };
            let body = input.rest;
            let sealed = authentic(&ctx, raw_len, body, input.nonce);
            let opened = check(
                seal::open(&DataKey::from_bytes(KEY), &ctx, &sealed),
                &sealed,
            );
            if let Some(plain) = opened {
                // What opened is what zstd makes of the body.
                let want = zstd::bulk::decompress(body, raw_len as usize).ok();
                assert_eq!(Some(plain), want, "open disagrees with zstd");
            }
        }
        _ => {
            let level = [-5, -1, 1, 3][(mode as usize >> 2) % 4];
            let plain = input.rest;
            let key = DataKey::from_bytes(KEY);
            let sealed = seal::seal_with_level(&key, &ctx, plain, level).expect("seal");
            assert!(sealed.ciphertext.len() <= zstd_frame_max(plain.len()) + TAG_LEN);
            assert!(sealed.ciphertext.len() <= MAX_SEALED_LEN);
            assert!(plain.len() <= MAX_RAW_LEN);
            let opened = seal::open(&key, &ctx, &sealed).expect("open what was sealed");
            assert_eq!(opened, plain);
        }
    }
}

/// A seed: `mode`, a context, `raw_len` and the rest.
fn seed(mode: u8, raw_len: u32, rest: &[u8]) -> Vec<u8> {
    let mut s = vec![mode];
    s.extend_from_slice(&3u32.to_le_bytes());
    s.extend_from_slice(&1000u64.to_le_bytes());
    s.extend_from_slice(&1041u64.to_le_bytes());
    s.extend_from_slice(&raw_len.to_le_bytes());
    s.extend_from_slice(&[7u8; NONCE_LEN]);
    s.extend_from_slice(&KEY);
    s.push(6);
    s.extend_from_slice(b"web-01");
    s.extend_from_slice(rest);
    s
}

pub fn seeds() -> Vec<Vec<u8>> {
    let text = b"alpha beta gamma delta alpha beta gamma delta".repeat(20);
    let mut out = Vec::new();
    for (plain, level) in [
        (vec![0u8; 4096], 1),
        (text.clone(), 3),
        (b"xyz".to_vec(), 1),
    ] {
        let frame = zstd::bulk::compress(&plain, level).unwrap();
        let n = plain.len() as u32;
        out.push(seed(1, n, &frame));
        out.push(seed(1, n - 1, &frame));
        out.push(seed(2, 0, &plain));
        // A genuine sealed batch of this context, in forged form under the right key.
        let key = DataKey::from_bytes(KEY);
        let plain_seed = seed(0, 0, b"");
        let input = Input::parse(&plain_seed[1..]);
        let sealed = seal::seal(&key, &input.ctx(), &plain).unwrap();
        let mut rest = vec![sealed.nonce.len() as u8];
        rest.extend_from_slice(&sealed.nonce);
        rest.extend_from_slice(&sealed.ciphertext);
        out.push(seed(0x80, sealed.raw_len, &rest));
    }
    out.push(seed(0, 10, &[24; 60]));
    out.push(seed(0x81, u32::MAX, b"\x28\xb5\x2f\xfd"));
    out
}
