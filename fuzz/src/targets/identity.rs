//! The identity texts: enrolment and admin tokens (`Token::parse`, from token files and the
//! command line) and the identity in a peer certificate's common name
//! (`PeerIdentity::parse`). What parses must print back to text that parses to the same.
use haven_transport::identity::{PeerIdentity, Token, TokenKind};

pub fn fuzz(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if which & 1 == 0 {
        if let Ok(token) = Token::parse(&text) {
            let again = Token::parse(&token.encode()).expect("an encoded token parses");
            assert_eq!(again, token);
            assert!(token.secret_matches(&again.secret));
        }
    } else if let Ok(id) = PeerIdentity::parse(&text) {
        let again = PeerIdentity::parse(&id.common_name()).expect("a common name parses");
        assert_eq!(again, id);
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let fp = "ab".repeat(32);
    let mut seeds: Vec<Vec<u8>> = [TokenKind::Agent, TokenKind::Node, TokenKind::Admin]
        .into_iter()
        .map(|k| [vec![0], Token::new(k, "c-7f3e", &fp).encode().into_bytes()].concat())
        .collect();
    seeds.push([&[0u8][..], b"haven-join.c.x.y"].concat());
    for cn in [
        "node/ps-1/process,master-target",
        "node/n/",
        "agent/web-01/e-4f2a",
        "agent/web-01",
    ] {
        seeds.push([&[1u8][..], cn.as_bytes()].concat());
    }
    seeds
}
