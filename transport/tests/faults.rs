//! The fault-injecting socket over real quinn endpoints on 127.0.0.1: a lossy, duplicating,
//! reordering link still delivers a stream intact; partitions time connections out and heal;
//! a one-way cut blocks one direction only; the decision sequence replays from its seed.
use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use haven_transport::{
    endpoint::{self, PROTOCOL_VERSION},
    faults::{
        Direction, FaultConfig, FaultConfigError, FaultDecider, FaultHandle, FaultRates,
        FaultStats, Verdict, ENV_VAR,
    },
    identity::{CertificateAuthority, Credentials, PeerIdentity},
};
use quinn::{Connection, ConnectionError, Endpoint, TransportConfig, VarInt};
use rand::{rngs::StdRng, RngCore, SeedableRng};

/// Every test finishes well within this, or fails.
const TEST_LIMIT: Duration = Duration::from_secs(10);
/// Polling period of the bounded waits.
const POLL: Duration = Duration::from_millis(10);

struct Pki {
    ca: CertificateAuthority,
    server: Credentials,
    client: Credentials,
}

fn pki() -> Pki {
    let ca = CertificateAuthority::generate("faults-test").unwrap();
    let server = ca
        .issue(&PeerIdentity::Node {
            name: "server".into(),
            roles: vec!["storage".into()],
        })
        .unwrap();
    let client = ca
        .issue(&PeerIdentity::Agent {
            machine: "client".into(),
            enrolment: String::new(),
        })
        .unwrap();
    Pki { ca, server, client }
}

/// Test transport: a short idle timeout so a partition ends a connection quickly.
fn short_idle_transport(idle: Duration) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(idle.try_into().unwrap()));
    t.keep_alive_interval(Some(idle / 4));
    Arc::new(t)
}

fn server_config(pki: &Pki, transport: Option<Arc<TransportConfig>>) -> quinn::ServerConfig {
    let mut cfg = endpoint::server_config(&pki.server, &pki.ca.cert_der).unwrap();
    if let Some(t) = transport {
        cfg.transport_config(t);
    }
    cfg
}

fn client_config(pki: &Pki, transport: Option<Arc<TransportConfig>>) -> quinn::ClientConfig {
    let mut cfg = endpoint::client_config(&pki.client, &pki.ca.cert_der).unwrap();
    if let Some(t) = transport {
        cfg.transport_config(t);
    }
    cfg
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A server endpoint on 127.0.0.1 with the given faults; returns its address too.
fn faulty_server(
    cfg: quinn::ServerConfig,
    faults: FaultConfig,
) -> (Endpoint, FaultHandle, SocketAddr) {
    let (ep, handle) = endpoint::server_endpoint_with_faults(localhost(), cfg, faults).unwrap();
    let addr = ep.local_addr().unwrap();
    (ep, handle, addr)
}

/// Accepts connections forever, completing the hello on each and handing it to `serve`.
fn serve<F, Fut>(ep: Endpoint, serve: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Connection) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            if endpoint::accept_hello(&conn).await.is_ok() {
                tokio::spawn(serve(conn));
            }
        }
    })
}

/// Waits, polling, until `condition` holds; panics with `what` after `limit`.
async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took over {limit:?}"))
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

fn lossy_rates() -> FaultRates {
    FaultRates {
        drop: 0.05,
        duplicate: 0.05,
        delay: 0.10,
        delay_max: Duration::from_millis(20),
        corrupt: 0.01,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_duplicating_reordering_link_delivers_2_mib_intact() {
    within("the whole test", TEST_LIMIT, async {
        let pki = pki();
        let (server_ep, server_faults, server_addr) = faulty_server(
            server_config(&pki, None),
            FaultConfig::new(1, lossy_rates()),
        );
        let (client_ep, client_faults) =
            endpoint::client_endpoint_with_faults(FaultConfig::new(2, lossy_rates())).unwrap();

        let (received_tx, received_rx) = tokio::sync::oneshot::channel();
        let received_tx = std::sync::Mutex::new(Some(received_tx));
        let _server = serve(server_ep, move |conn| {
            let tx = received_tx.lock().unwrap().take();
            async move {
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                let data = recv.read_to_end(4 << 20).await.unwrap();
                // Acknowledge at the application level so the client keeps the connection
                // (and its retransmissions) alive until everything has arrived.
                send.write_all(b"ok").await.unwrap();
                send.finish().unwrap();
                let _ = tx.expect("one connection").send(data);
                let _ = conn.closed().await;
            }
        });

        // Phase: connect and send 2 MiB through 5 % loss, 5 % duplication, 10 % delay and 1 %
        // corruption in both directions, on both ends.
        let conn = endpoint::connect(
            &client_ep,
            client_config(&pki, None),
            server_addr,
            "client",
            PROTOCOL_VERSION,
        )
        .await
        .unwrap();
        let sent = payload(2 << 20, 99);
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&sent).await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(16).await.unwrap(), b"ok");
        let received = received_rx.await.unwrap();

        // Phase: the stream is intact, and every kind of fault was injected on the way.
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "stream content differs");
        for (side, stats) in [
            ("client", client_faults.stats()),
            ("server", server_faults.stats()),
        ] {
            let t = stats.total();
            println!("{side}: {stats:?}");
            assert!(
                t.seen > 0 && t.dropped > 0 && t.duplicated > 0,
                "{side}: {t:?}"
            );
            assert!(t.delayed > 0 && t.corrupted > 0, "{side}: {t:?}");
            assert_eq!(t.partitioned, 0, "{side}");
            assert_eq!(t.overflowed, 0, "{side}: bounded queues overflowed");
        }
        // Data went client -> server: the client sent most packets, the server received them.
        assert!(
            client_faults.stats().outgoing.seen > 1000,
            "{:?}",
            client_faults.stats()
        );
        assert!(
            server_faults.stats().incoming.seen > 1000,
            "{:?}",
            server_faults.stats()
        );
        conn.close(VarInt::from_u32(0), b"done");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_receives_from_a_gso_sender_are_judged_per_datagram() {
    within("the whole test", TEST_LIMIT, async {
        let pki = pki();
        // A plain quinn endpoint: it sends with GSO where the kernel allows, and the faulty
        // client's socket receives with GRO, so one read may carry many datagrams.
        let server_ep = Endpoint::server(server_config(&pki, None), localhost()).unwrap();
        let server_addr = server_ep.local_addr().unwrap();
        let sent = payload(2 << 20, 11);
        let served = sent.clone();
        let _server = serve(server_ep, move |conn| {
            let served = served.clone();
            async move {
                let mut send = conn.open_uni().await.unwrap();
                send.write_all(&served).await.unwrap();
                send.finish().unwrap();
                let _ = conn.closed().await;
            }
        });
        let (client_ep, client_faults) =
            endpoint::client_endpoint_with_faults(FaultConfig::new(8, lossy_rates())).unwrap();
        let conn = endpoint::connect(
            &client_ep,
            client_config(&pki, None),
            server_addr,
            "client",
            PROTOCOL_VERSION,
        )
        .await
        .unwrap();
        let mut recv = conn.accept_uni().await.unwrap();
        // Receive buffers too small for GRO made the kernel truncate coalesced reads: the same
        // transfer then took ~17 s instead of a fraction of a second.
        let received = within(
            "the 2 MiB transfer",
            Duration::from_secs(5),
            recv.read_to_end(4 << 20),
        )
        .await
        .unwrap();
        assert!(received == sent, "stream content differs");
        let stats = client_faults.stats();
        // Counted per datagram, not per read: at least one per full-size packet of data.
        assert!(
            stats.incoming.seen as usize >= sent.len() / 1452,
            "{stats:?}"
        );
        assert!(
            stats.incoming.dropped > 0 && stats.incoming.delayed > 0,
            "{stats:?}"
        );
        assert_eq!(stats.incoming.overflowed, 0, "{stats:?}");
        conn.close(VarInt::from_u32(0), b"done");
    })
    .await;
}

fn decisions(seed: u64, rates: FaultRates, n: usize) -> Vec<Verdict> {
    let mut decider = FaultDecider::new(seed, rates);
    (0..n).map(|i| decider.decide(1200 + i % 100)).collect()
}

#[test]
fn same_seed_gives_the_same_decision_sequence() {
    const N: usize = 10_000;
    let rates = lossy_rates();
    let a = decisions(42, rates, N);
    assert_eq!(a, decisions(42, rates, N), "same seed, different decisions");
    assert_ne!(
        a,
        decisions(43, rates, N),
        "different seeds, same decisions"
    );

    // The rates are honoured (within 3 standard deviations or so for N = 10 000).
    let count = |f: &dyn Fn(&Verdict) -> bool| a.iter().filter(|v| f(v)).count() as f64 / N as f64;
    let drop = count(&|v| *v == Verdict::Drop);
    let dup = count(&|v| matches!(v, Verdict::Deliver { copies: 2, .. }));
    let delay = count(&|v| matches!(v, Verdict::Deliver { delay: Some(_), .. }));
    let corrupt = count(&|v| {
        matches!(
            v,
            Verdict::Deliver {
                corrupt: Some(_),
                ..
            }
        )
    });
    assert!((0.04..0.06).contains(&drop), "drop {drop}");
    // Duplication, delay and corruption apply to the packets that were not dropped.
    assert!((0.04..0.06).contains(&dup), "dup {dup}");
    assert!((0.08..0.11).contains(&delay), "delay {delay}");
    assert!((0.005..0.015).contains(&corrupt), "corrupt {corrupt}");
    for v in &a {
        if let Verdict::Deliver { delay: Some(d), .. } = v {
            assert!(*d < rates.delay_max);
        }
    }

    // Each packet takes the same randomness whatever the rates: raising the drop rate only
    // adds drops, it does not reshuffle the others.
    let more_drops = decisions(42, FaultRates { drop: 0.2, ..rates }, N);
    for (before, after) in a.iter().zip(&more_drops) {
        assert!(
            *after == Verdict::Drop || after == before,
            "{before:?} became {after:?}"
        );
    }
    assert!(
        more_drops.iter().filter(|v| **v == Verdict::Drop).count()
            > a.iter().filter(|v| **v == Verdict::Drop).count()
    );
    // No rates, no faults.
    let clean = decisions(42, FaultRates::default(), N);
    assert!(clean.iter().all(|v| *v
        == Verdict::Deliver {
            copies: 1,
            delay: None,
            corrupt: None
        }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_longer_than_idle_timeout_times_out_and_heal_allows_a_new_connection() {
    within("the whole test", TEST_LIMIT, async {
        let pki = pki();
        let idle = Duration::from_millis(800);
        let (server_ep, _server_faults, server_addr) = faulty_server(
            server_config(&pki, Some(short_idle_transport(idle))),
            FaultConfig::none(3),
        );
        let _server = serve(server_ep, |conn| async move {
            let _ = conn.closed().await;
        });
        let (client_ep, client_faults) =
            endpoint::client_endpoint_with_faults(FaultConfig::none(4)).unwrap();
        let connect = || {
            endpoint::connect(
                &client_ep,
                client_config(&pki, Some(short_idle_transport(idle))),
                server_addr,
                "client",
                PROTOCOL_VERSION,
            )
        };

        // Phase: connected, then cut both ways for longer than the idle timeout.
        let conn = within("connect", Duration::from_secs(3), connect())
            .await
            .unwrap();
        client_faults.partition(server_addr, Direction::Both);
        let before = client_faults.stats();
        let error = within("the idle timeout", Duration::from_secs(4), conn.closed()).await;
        assert!(
            matches!(error, ConnectionError::TimedOut),
            "expected TimedOut, got {error:?}"
        );
        let during = client_faults.stats();
        assert!(
            during.outgoing.partitioned > before.outgoing.partitioned,
            "keep-alives were cut: {during:?}"
        );

        // Phase: while still cut, a new connection cannot be made.
        let refused = tokio::time::timeout(Duration::from_millis(300), connect()).await;
        assert!(
            !matches!(refused, Ok(Ok(_))),
            "connected through a partition"
        );

        // Phase: healed, a new connection succeeds (its hello made a round trip).
        client_faults.heal(server_addr);
        assert!(client_faults.partitions().is_empty());
        let conn = within("reconnect after heal", Duration::from_secs(4), connect())
            .await
            .unwrap();
        assert!(conn.close_reason().is_none());
        conn.close(VarInt::from_u32(0), b"done");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_partition_blocks_outgoing_while_incoming_still_flows() {
    within("the whole test", TEST_LIMIT, async {
        let pki = pki();
        let (server_ep, _server_faults, server_addr) =
            faulty_server(server_config(&pki, None), FaultConfig::none(5));
        // Bytes the server has received from the client on its uni stream.
        let server_received = Arc::new(AtomicU64::new(0));
        let counted = server_received.clone();
        let _server = serve(server_ep, move |conn| {
            let counted = counted.clone();
            async move {
                // Stream data to the client without end, so packets keep coming its way.
                let writer = conn.clone();
                tokio::spawn(async move {
                    let mut send = writer.open_uni().await.unwrap();
                    let chunk = vec![7u8; 16 << 10];
                    while send.write_all(&chunk).await.is_ok() {}
                });
                let Ok(mut recv) = conn.accept_uni().await else {
                    return;
                };
                while let Ok(Some(chunk)) = recv.read_chunk(64 << 10, true).await {
                    counted.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                }
            }
        });
        let (client_ep, client_faults) =
            endpoint::client_endpoint_with_faults(FaultConfig::none(6)).unwrap();
        let conn = endpoint::connect(
            &client_ep,
            client_config(&pki, None),
            server_addr,
            "client",
            PROTOCOL_VERSION,
        )
        .await
        .unwrap();
        let client_received = Arc::new(AtomicU64::new(0));
        let mut from_server = conn.accept_uni().await.unwrap();
        let counted = client_received.clone();
        tokio::spawn(async move {
            while let Ok(Some(chunk)) = from_server.read_chunk(64 << 10, true).await {
                counted.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
            }
        });
        wait_until(
            "the client receives the server's stream",
            Duration::from_secs(3),
            || client_received.load(Ordering::Relaxed) > 0,
        )
        .await;

        // Phase: cut only what the client sends to the server, then send 64 KiB.
        client_faults.partition(server_addr, Direction::Outgoing);
        let before = client_faults.stats();
        let sent = payload(64 << 10, 7);
        let mut to_server = conn.open_uni().await.unwrap();
        to_server.write_all(&sent).await.unwrap();
        to_server.finish().unwrap();

        // The client keeps receiving and keeps trying to send; nothing it sends gets through.
        let grew = |a: &FaultStats, b: &FaultStats| {
            b.incoming.seen >= a.incoming.seen + 5
                && b.outgoing.partitioned >= a.outgoing.partitioned + 5
        };
        wait_until(
            "packets flow in and are cut going out",
            Duration::from_secs(4),
            || grew(&before, &client_faults.stats()),
        )
        .await;
        let during = client_faults.stats();
        assert_eq!(
            server_received.load(Ordering::Relaxed),
            0,
            "data crossed a one-way cut: {during:?}"
        );
        assert_eq!(
            during.incoming.partitioned, before.incoming.partitioned,
            "incoming was cut: {during:?}"
        );

        // Phase: healed, the stream gets through.
        client_faults.heal_all();
        wait_until(
            "the server receives the client's 64 KiB",
            Duration::from_secs(5),
            || server_received.load(Ordering::Relaxed) == sent.len() as u64,
        )
        .await;
        conn.close(VarInt::from_u32(0), b"done");
    })
    .await;
}

#[test]
fn parses_the_env_var_syntax() {
    let c: FaultConfig = "seed=42,drop=0.01,dup=0.01,delay=0.05,delay_max=30ms,corrupt=0.001"
        .parse()
        .unwrap();
    assert_eq!(
        c,
        FaultConfig {
            seed: 42,
            rates: FaultRates {
                drop: 0.01,
                duplicate: 0.01,
                delay: 0.05,
                delay_max: Duration::from_millis(30),
                corrupt: 0.001,
            },
            direction: Direction::Both,
        }
    );
    // Display is the same syntax, so a logged config can be pasted back.
    assert_eq!(c.to_string().parse::<FaultConfig>().unwrap(), c);

    let c: FaultConfig = " seed = 0x10 , drop=5% , duplicate=0 , delay=1 , dir=out , "
        .parse()
        .unwrap();
    assert_eq!(c.seed, 16);
    assert_eq!(c.rates.drop, 0.05);
    assert_eq!(c.rates.delay, 1.0);
    assert_eq!(c.rates.delay_max, FaultRates::default().delay_max);
    assert_eq!(c.direction, Direction::Outgoing);
    assert_eq!(
        "drop=0.1,dir=in".parse::<FaultConfig>().unwrap().direction,
        Direction::Incoming
    );
    assert_eq!(
        "delay_max=1.5s"
            .parse::<FaultConfig>()
            .unwrap()
            .rates
            .delay_max,
        Duration::from_millis(1500)
    );
    assert_eq!(
        "delay_max=250us"
            .parse::<FaultConfig>()
            .unwrap()
            .rates
            .delay_max,
        Duration::from_micros(250)
    );
    // Without a seed, a random one (it is printed with the config).
    let unseeded: FaultConfig = "drop=0.1".parse().unwrap();
    assert!(unseeded
        .to_string()
        .starts_with(&format!("seed={},", unseeded.seed)));

    let bad = |s: &str| s.parse::<FaultConfig>().expect_err(s);
    assert_eq!(bad(""), FaultConfigError::Empty);
    assert_eq!(bad(" , "), FaultConfigError::Empty);
    assert_eq!(bad("drop"), FaultConfigError::NotKeyValue("drop".into()));
    assert_eq!(bad("loss=0.1"), FaultConfigError::UnknownKey("loss".into()));
    assert_eq!(
        bad("drop=0.1,drop=0.2"),
        FaultConfigError::DuplicateKey("drop".into())
    );
    assert_eq!(
        bad("dup=0.1,duplicate=0.2"),
        FaultConfigError::DuplicateKey("dup".into())
    );
    for (s, key) in [
        ("seed=-1", "seed"),
        ("seed=0xZZ", "seed"),
        ("drop=abc", "drop"),
        ("drop=1.5", "drop"),
        ("drop=-0.1", "drop"),
        ("corrupt=101%", "corrupt"),
        ("delay=NaN", "delay"),
        ("delay_max=30", "delay_max"),
        ("delay_max=30m", "delay_max"),
        ("delay_max=11s", "delay_max"),
        ("delay_max=ms", "delay_max"),
        ("delay=0.1,delay_max=0ms", "delay_max"),
        ("dir=sideways", "dir"),
    ] {
        match bad(s) {
            FaultConfigError::BadValue { key: k, .. } => assert_eq!(k, key, "{s}"),
            other => panic!("{s}: unexpected {other:?}"),
        }
    }
    // Messages say what is wrong and what would be right.
    assert_eq!(
        bad("delay_max=30").to_string(),
        "delay_max=30: needs a unit: us, ms or s"
    );
    assert!(bad("loss=1")
        .to_string()
        .contains("known: seed, drop, dup, delay, delay_max, corrupt, dir"));
}

#[tokio::test]
async fn env_var_turns_faults_on_and_a_bad_value_is_a_clear_error() {
    // The only test that touches the variable; the others build endpoints explicitly.
    std::env::set_var(ENV_VAR, "seed=1,drop=2");
    let error = endpoint::client_endpoint()
        .expect_err("bad HAVEN_NET_FAULTS accepted")
        .to_string();
    assert!(
        error.contains(ENV_VAR) && error.contains("drop=2"),
        "{error}"
    );
    std::env::set_var(ENV_VAR, "seed=1,drop=0.01");
    assert!(endpoint::client_endpoint().is_ok());
    std::env::set_var(ENV_VAR, "");
    assert!(endpoint::client_endpoint().is_ok());
    std::env::remove_var(ENV_VAR);
    assert_eq!(FaultConfig::from_env(), Ok(None));
}
