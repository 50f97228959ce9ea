//! The targets. Each module has the target functions and their seeds.
use crate::Target;

mod cache;
mod frame;
mod identity;
mod journal;
mod nbd;
mod replica_journal;
mod seal;
mod state;
mod undo;
mod wire;

const MIB: usize = 1 << 20;

pub(crate) static ALL: &[Target] = &[
    Target {
        name: "frame",
        fuzz: frame::fuzz,
        seeds: frame::seeds,
        // A frame's payload is allocated once its length is checked against the reader's
        // limit (at most MAX_DATA_FRAME), before it arrives: that much is by design.
        alloc_base: haven_transport::frame::MAX_DATA_FRAME + 2 * MIB,
        alloc_per_byte: 64,
    },
    wire::target("wire_request", wire::request, wire::request_seeds),
    wire::target("wire_response", wire::response, wire::response_seeds),
    wire::target(
        "wire_agent_frame",
        wire::agent_frame,
        wire::agent_frame_seeds,
    ),
    wire::target("wire_ship_frame", wire::ship_frame, wire::ship_frame_seeds),
    wire::target("wire_batch_body", wire::batch_body, wire::batch_body_seeds),
    wire::target("wire_misc", wire::misc, wire::misc_seeds),
    Target {
        name: "seal_open",
        fuzz: seal::fuzz,
        seeds: seal::seeds,
        // `open` decrypts a copy of the ciphertext and decompresses into `raw_len` bytes,
        // both checked against their limits first (sealing, in the round-trip mode, the same).
        alloc_base: 3 * haven_transport::seal::MAX_SEALED_LEN,
        alloc_per_byte: 8,
    },
    Target {
        name: "cache_open",
        fuzz: cache::fuzz,
        seeds: cache::seeds,
        // Recovery checksums payloads through a 1 MiB buffer; reads allocate what a record
        // header says only once the file is known to hold that much.
        alloc_base: 4 * MIB,
        alloc_per_byte: 16,
    },
    Target {
        name: "undo_roll_back",
        fuzz: undo::fuzz,
        seeds: undo::seeds,
        // The log is read whole; a hole is zeroed through a buffer of at most 1 MiB.
        alloc_base: 4 * MIB,
        alloc_per_byte: 16,
    },
    Target {
        name: "replica_journal_open",
        fuzz: replica_journal::fuzz,
        seeds: replica_journal::seeds,
        // The last segment is read whole; a view or a roll back reads one record body at a
        // time (at most 256 KiB, checked against the header); a hole is zeroed through a
        // buffer of at most 1 MiB.
        alloc_base: 4 * MIB,
        alloc_per_byte: 16,
    },
    Target {
        name: "journal_replay",
        fuzz: journal::fuzz,
        seeds: journal::seeds,
        // The journal is read whole; its updates take 16 bytes in memory for 14 on disk.
        alloc_base: 2 * MIB,
        alloc_per_byte: 16,
    },
    Target {
        name: "state_files",
        fuzz: state::fuzz,
        seeds: state::seeds,
        alloc_base: 4 * MIB,
        alloc_per_byte: 256,
    },
    Target {
        name: "nbd_proto",
        fuzz: nbd::fuzz,
        seeds: nbd::seeds,
        // The handshake buffers at most one option's data (MAX_OPTION_DATA) and queues its
        // replies, a small multiple of the input.
        alloc_base: MIB,
        alloc_per_byte: 64,
    },
    Target {
        name: "identity_text",
        fuzz: identity::fuzz,
        seeds: identity::seeds,
        alloc_base: MIB,
        alloc_per_byte: 64,
    },
];
