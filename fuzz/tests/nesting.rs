//! Deeply nested input cannot exhaust the stack of the threads that decode: the codec refuses
//! nesting beyond its depth limit, and what is within the limit decodes on a stack the size
//! of a tokio worker's (2 MiB), where the roles decode frames.
use haven_roles::proto::Request;
use haven_transport::codec;

/// `Request::Join` whose `JoinRequest` carries an unknown field nested `depth` arrays deep
/// (unknown fields are skipped, which recurses through the value).
fn nested_join(depth: usize) -> Vec<u8> {
    let mut b = vec![0x81, 0xa4];
    b.extend_from_slice(b"Join");
    b.push(0x83);
    b.push(0xa6);
    b.extend_from_slice(b"secret");
    b.push(0xa1);
    b.push(b's');
    b.push(0xa4);
    b.extend_from_slice(b"kind");
    // JoinKind::Node { name, roles, addr, capacity }
    b.extend_from_slice(&[0x81, 0xa4]);
    b.extend_from_slice(b"Node");
    b.push(0x84);
    for (k, v) in [("name", "n"), ("addr", "a")] {
        b.push(0xa0 | k.len() as u8);
        b.extend_from_slice(k.as_bytes());
        b.push(0xa0 | v.len() as u8);
        b.extend_from_slice(v.as_bytes());
    }
    b.push(0xa5);
    b.extend_from_slice(b"roles");
    b.push(0x90);
    b.push(0xa8);
    b.extend_from_slice(b"capacity");
    b.push(0x01);
    b.push(0xa1);
    b.push(b'x');
    b.extend(std::iter::repeat_n(0x91, depth));
    b.push(0xc0);
    b
}

fn decode_on_small_stack(bytes: Vec<u8>) -> Result<Request, String> {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || codec::decode::<Request>(&bytes).map_err(|e| e.to_string()))
        .unwrap()
        .join()
        .expect("the decoder thread survived")
}

#[test]
fn nesting_within_the_limit_decodes_on_a_worker_stack() {
    let r = decode_on_small_stack(nested_join(1000));
    assert!(matches!(r, Ok(Request::Join(_))), "{r:?}");
}

#[test]
fn nesting_beyond_the_limit_is_an_error() {
    for depth in [1100, 100_000] {
        let r = decode_on_small_stack(nested_join(depth));
        assert!(r.is_err(), "{r:?}");
    }
}
