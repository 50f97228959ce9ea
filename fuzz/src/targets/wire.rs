//! The wire messages, decoded with the codec as the roles decode them off a frame.
//!
//! What is accepted must survive a round trip: encoding the decoded value and decoding that
//! again gives a value that encodes to the same bytes (the input itself may differ from its
//! re-encoding: msgpack has several encodings of one integer, unknown fields are dropped).
use std::fmt::Debug;

use haven_roles::proto::*;
use haven_transport::codec;
use haven_transport::endpoint::{Hello, HelloReply};
use haven_transport::seal::Sealed;
use serde::{de::DeserializeOwned, Serialize};
use serde_bytes::ByteBuf;

use crate::{samples, Target};

pub(super) const fn target(
    name: &'static str,
    fuzz: fn(&[u8]),
    seeds: fn() -> Vec<Vec<u8>>,
) -> Target {
    Target {
        name,
        fuzz,
        seeds,
        // serde preallocates at most 1 MiB for a sequence whatever length it announces;
        // everything else grows with what the input holds (a one-byte element of the input
        // can be a struct of a hundred bytes in memory, and vectors double).
        alloc_base: 4 << 20,
        alloc_per_byte: 512,
    }
}

/// Decodes `data` as a `T`; if that works, checks the round trip. Returns the value.
pub(crate) fn round_trip<T: Serialize + DeserializeOwned + Debug>(data: &[u8]) -> Option<T> {
    let value: T = codec::decode(data).ok()?;
    let once = codec::encode(&value).expect("an accepted value encodes");
    let again: T = codec::decode(&once)
        .unwrap_or_else(|e| panic!("the encoding of an accepted {value:?} does not decode: {e}"));
    let twice = codec::encode(&again).expect("encodes");
    assert_eq!(
        once, twice,
        "round trip of {value:?} changed it to {again:?}"
    );
    Some(value)
}

fn encodings<T: Serialize>(values: &[T]) -> Vec<Vec<u8>> {
    values.iter().map(|v| codec::encode(v).unwrap()).collect()
}

pub fn request(data: &[u8]) {
    round_trip::<Request>(data);
}

pub fn request_seeds() -> Vec<Vec<u8>> {
    encodings(&samples::requests())
}

pub fn response(data: &[u8]) {
    round_trip::<Response>(data);
}

pub fn response_seeds() -> Vec<Vec<u8>> {
    encodings(&samples::responses())
}

pub fn agent_frame(data: &[u8]) {
    if let Some(AgentFrame::Batch { body, .. }) = round_trip::<AgentFrame>(data) {
        // The process server seals the body without looking inside; the master target
        // decodes it once opened.
        round_trip::<BatchBody>(&body);
    }
}

pub fn agent_frame_seeds() -> Vec<Vec<u8>> {
    encodings(&[AgentFrame::Batch {
        first_seq: 1001,
        last_seq: 1002,
        body: ByteBuf::from(codec::encode(&samples::batch_body()).unwrap()),
    }])
}

pub fn ship_frame(data: &[u8]) {
    round_trip::<ShipFrame>(data);
}

pub fn ship_frame_seeds() -> Vec<Vec<u8>> {
    encodings(&[ShipFrame::Sealed {
        first_seq: 1001,
        last_seq: 1002,
        sealed: samples::sealed(),
    }])
}

pub fn batch_body(data: &[u8]) {
    round_trip::<BatchBody>(data);
}

pub fn batch_body_seeds() -> Vec<Vec<u8>> {
    let mut seeds = encodings(&[samples::batch_body(), BatchBody::default()]);
    // A record whose data is an array of integers rather than bin (serde_bytes accepts both).
    #[derive(Serialize)]
    struct Rec {
        seq: u64,
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    }
    #[derive(Serialize)]
    struct Body {
        records: Vec<Rec>,
    }
    seeds.push(
        codec::encode(&Body {
            records: vec![Rec {
                seq: 1,
                disk: 0,
                offset: 0,
                data: vec![1, 2, 3],
            }],
        })
        .unwrap(),
    );
    seeds
}

/// The small messages: the first byte says which.
pub fn misc(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => drop(round_trip::<Ack>(rest)),
        1 => drop(round_trip::<Applied>(rest)),
        2 => drop(round_trip::<Hello>(rest)),
        3 => drop(round_trip::<HelloReply>(rest)),
        _ => drop(round_trip::<Sealed>(rest)),
    }
}

pub fn misc_seeds() -> Vec<Vec<u8>> {
    let tagged = |tag: u8, bytes: Vec<u8>| [vec![tag], bytes].concat();
    vec![
        tagged(
            0,
            codec::encode(&Ack {
                cached_seq: 5,
                applied_seq: 4,
            })
            .unwrap(),
        ),
        tagged(1, codec::encode(&Applied { applied_seq: 4 }).unwrap()),
        tagged(
            2,
            codec::encode(&Hello {
                protocol: "haven".into(),
                version: 3,
                peer: "agent web-01".into(),
            })
            .unwrap(),
        ),
        tagged(3, codec::encode(&HelloReply::Ok { version: 3 }).unwrap()),
        tagged(
            3,
            codec::encode(&HelloReply::Refused {
                reason: "r".into(),
                version: 3,
            })
            .unwrap(),
        ),
        tagged(4, codec::encode(&samples::sealed()).unwrap()),
    ]
}
