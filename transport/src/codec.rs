//! The one module that knows rmp-serde.
//!
//! Configuration, chosen on purpose and pinned by the golden-bytes tests below (and every wire
//! message by `roles/tests/golden.rs`):
//! - structs are encoded as **maps keyed by field name** (`to_vec_named`), so a field added at
//!   the end of a struct with `#[serde(default)]` is readable by old and new peers alike;
//! - enums use serde's external tagging, which rmp-serde writes as a one-entry map
//!   `{variant-name: content}` (unit variants as a bare string). Enums are append-only:
//!   variants are never renamed or reused;
//! - byte buffers must be marked `#[serde(with = "serde_bytes")]` so they travel as msgpack
//!   `bin`, not as an array of integers.
use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode failed: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("malformed message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("message too large for its length field")]
    TooLarge,
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// Like [`encode`], into a buffer of the given capacity: sized right, a large message is
/// encoded without the doubling reallocations (and without holding up to twice its size).
pub fn encode_with_capacity<T: Serialize + ?Sized>(
    value: &T,
    capacity: usize,
) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(capacity);
    rmp_serde::encode::write_named(&mut buf, value)?;
    Ok(buf)
}

/// Appends the encoding of `value` to `buf`.
pub fn encode_into<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) -> Result<(), CodecError> {
    rmp_serde::encode::write_named(buf, value)?;
    Ok(())
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Probe {
        seq: u64,
        name: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Unit,
        Tuple(u32),
        Struct { a: u8 },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct ProbeV2 {
        seq: u64,
        name: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        #[serde(default)]
        added_later: u32,
    }

    #[test]
    fn struct_golden_bytes() {
        let v = Probe {
            seq: 1,
            name: "m".into(),
            data: vec![0xab],
        };
        let bytes = encode(&v).unwrap();
        // fixmap(3) "seq" 1 "name" "m" "data" bin8(1) ab
        let golden: &[u8] = &[
            0x83, 0xa3, b's', b'e', b'q', 0x01, 0xa4, b'n', b'a', b'm', b'e', 0xa1, b'm', 0xa4,
            b'd', b'a', b't', b'a', 0xc4, 0x01, 0xab,
        ];
        assert_eq!(bytes, golden);
        assert_eq!(decode::<Probe>(&bytes).unwrap(), v);
    }

    #[test]
    fn enum_golden_bytes() {
        assert_eq!(
            encode(&Kind::Unit).unwrap(),
            vec![0xa4, b'U', b'n', b'i', b't']
        );
        assert_eq!(
            encode(&Kind::Tuple(7)).unwrap(),
            vec![0x81, 0xa5, b'T', b'u', b'p', b'l', b'e', 0x07]
        );
        assert_eq!(
            encode(&Kind::Struct { a: 2 }).unwrap(),
            vec![0x81, 0xa6, b'S', b't', b'r', b'u', b'c', b't', 0x81, 0xa1, b'a', 0x02]
        );
        for k in [Kind::Unit, Kind::Tuple(7), Kind::Struct { a: 2 }] {
            assert_eq!(decode::<Kind>(&encode(&k).unwrap()).unwrap(), k);
        }
    }

    #[test]
    fn appended_field_is_compatible_both_ways() {
        let old = Probe {
            seq: 9,
            name: "x".into(),
            data: vec![1, 2],
        };
        let new: ProbeV2 = decode(&encode(&old).unwrap()).unwrap();
        assert_eq!(new.added_later, 0);
        let back: Probe = decode(
            &encode(&ProbeV2 {
                added_later: 5,
                ..new
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(back, old);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for junk in [&[][..], &[0xc1][..], &[0x83, 0xa3][..], &[0xff; 64][..]] {
            assert!(decode::<Probe>(junk).is_err());
        }
    }
}
