//! Size relationships between the crates' limits that no one crate can state: compile-time
//! assertions where the relation is between constants, and checks of the real encodings
//! against the envelope bound the transport's assertions rely on
//! (`haven_transport::frame::MAX_DATA_ENVELOPE`).
use haven_roles::agent::scan::EXTENT_BYTES_MAX;
use haven_roles::proto::{AgentFrame, BatchBody, ShipFrame, WriteRecord};
use haven_storage::cache::MAX_PAYLOAD;
use haven_transport::codec;
use haven_transport::frame::{MAX_DATA_ENVELOPE, MAX_DATA_FRAME};
use haven_transport::seal::{Sealed, MAX_RAW_LEN, MAX_SEALED_LEN, NONCE_LEN};
use serde_bytes::ByteBuf;

// The process server caches each sealed batch in its `ShipFrame` as one cache record, and
// ships that record as one frame: the largest such frame must be a record the cache takes.
const _: () = assert!(MAX_SEALED_LEN + MAX_DATA_ENVELOPE <= MAX_PAYLOAD);
// ...and one the master target's reader accepts (also asserted in the transport).
const _: () = assert!(MAX_SEALED_LEN + MAX_DATA_ENVELOPE <= MAX_DATA_FRAME);
// An agent's batch holds whole extents: the largest extent, in its record, must fit the raw
// batch limit that the process server enforces (else a single changed run could never be
// sent).
const _: () = assert!(EXTENT_BYTES_MAX + MAX_DATA_ENVELOPE <= MAX_RAW_LEN);

/// The envelope of the largest sealed batch, with every number at its widest.
#[test]
fn ship_frame_envelope_is_within_the_bound() {
    let frame = ShipFrame::Sealed {
        first_seq: u64::MAX,
        last_seq: u64::MAX,
        sealed: Sealed {
            raw_len: u32::MAX,
            ciphertext: vec![0; MAX_SEALED_LEN],
            nonce: vec![0; NONCE_LEN],
        },
    };
    let len = codec::encode(&frame).unwrap().len();
    assert!(
        len - MAX_SEALED_LEN <= MAX_DATA_ENVELOPE,
        "a ShipFrame adds {} bytes to its ciphertext",
        len - MAX_SEALED_LEN
    );
    // (and so within MAX_PAYLOAD, by the assertions above)
    assert!(len <= MAX_DATA_FRAME);
}

/// The envelope of the largest raw batch an agent may send.
#[test]
fn agent_frame_envelope_is_within_the_bound() {
    let frame = AgentFrame::Batch {
        first_seq: u64::MAX,
        last_seq: u64::MAX,
        body: ByteBuf::from(vec![0; MAX_RAW_LEN]),
    };
    let len = codec::encode(&frame).unwrap().len();
    assert!(
        len - MAX_RAW_LEN <= MAX_DATA_ENVELOPE,
        "an AgentFrame adds {} bytes to its body",
        len - MAX_RAW_LEN
    );
    assert!(len <= MAX_DATA_FRAME);
}

/// A batch of one extent of the largest size, in a record with every number at its widest.
#[test]
fn one_extent_batch_is_within_the_bound() {
    let body = BatchBody {
        records: vec![WriteRecord {
            seq: u64::MAX,
            disk: u16::MAX,
            offset: u64::MAX,
            data: ByteBuf::from(vec![0; EXTENT_BYTES_MAX]),
        }],
        disk_sizes: vec![u64::MAX; 16],
        points: vec![],
    };
    let len = codec::encode(&body).unwrap().len();
    assert!(len - EXTENT_BYTES_MAX <= MAX_DATA_ENVELOPE, "{len}");
}
