//! A fault-injecting UDP socket for quinn: drops, duplicates, delays (and so reorders),
//! corrupts and partitions packets, for tests and for manual runs with `HAVEN_NET_FAULTS`.
//!
//! ```text
//!   quinn Endpoint
//!     | try_send(transmit)                 ^ poll_recv(bufs, meta)
//!     v                                    |
//!   FaultySocket ---- one decision per datagram, per direction -----------------+
//!     | partitioned(peer, dir)? -> drop (counted `partitioned`)                 |
//!     | FaultDecider (seeded)   -> drop | deliver {copies 1..2, delay, corrupt} |
//!     |   delay: held by a tokio task, sent (or queued for receive) later,      |
//!     |          so packets behind it overtake it                               |
//!     v                                    |                                    |
//!   inner socket (TokioRuntime.wrap_udp_socket)   <- FaultHandle: partition / heal /
//!                                                    set_rates / stats, from the test
//! ```
//!
//! **One decision per packet.** The socket reports `max_transmit_segments() == 1`, so quinn
//! never hands it a GSO batch. On receive, the inner socket may have GRO enabled and read a
//! coalesced buffer from a peer that sends with GSO: such buffers are split at their stride,
//! each datagram is judged on its own and quinn gets one datagram per `RecvMeta`.
//! `max_receive_segments()` still reports the inner socket's GRO size, because quinn sizes its
//! receive buffers by it; reporting 1 makes the kernel truncate coalesced reads, losing most
//! packets from a GSO sender.
//!
//! **Replay.** Each direction has its own RNG seeded from [`FaultConfig::seed`], and every
//! judged packet consumes the same amount of randomness whatever the rates, so the n-th
//! packet's decision depends only on the seed, n and the rates (raising a rate only adds
//! faults). Which packet is the n-th depends on the traffic, which on a real network is not
//! deterministic; the decision sequence is. Packets cut by a partition take no decision. A
//! send that the inner socket refuses with `WouldBlock` is retried by quinn and takes a fresh
//! decision. The seed is reproducible for a given `rand` version (`StdRng`).
//!
//! **Corruption** flips one byte of a datagram. QUIC authenticates every packet, so the
//! receiver silently drops a corrupted packet: on the wire it is equivalent to a loss. To
//! test the application's handling of damaged frames, corrupt them above QUIC.
//!
//! **Bounds.** At most [`DELAYED_PACKETS_MAX`] packets are held for delay at a time, and at
//! most [`RECV_QUEUE_PACKETS_MAX`] received packets (duplicates, released delays, split GRO
//! buffers) wait for quinn; beyond that packets are dropped and counted as `overflowed`.
//! A delay is at most [`DELAY_LIMIT`].
//!
//! **Partitions between processes.** With `control=PATH` in [`ENV_VAR`] (e.g.
//! `HAVEN_NET_FAULTS=seed=1,control=/tmp/ps1.partitions`), every faulty socket of the process
//! re-reads PATH every [`CONTROL_POLL_INTERVAL`] and makes its content the exact set of
//! file-driven partitions: one `PEER_ADDR DIRECTION` per line, DIRECTION `out`, `in` or
//! `both`, seen from this process:
//!
//! ```text
//!   # cut the process server both ways
//!   127.0.0.1:40123 both
//!   127.0.0.1:40200 out
//! ```
//!
//! Blank lines and `#` comments are ignored; a malformed line is logged once at warn and
//! ignored (the other lines apply); a peer listed twice is cut in the union of its directions.
//! A missing file means no file-driven partitions; a file that exists but cannot be read
//! leaves the previous set in force (warned once). Each change of the set is logged at info.
//! Write the file atomically (write another file, rename it over PATH): a half-written line
//! such as `127.0.0.1:401` is a valid, wrong address. The file-driven set replaces the
//! previous file-driven set and is independent of partitions set through
//! [`FaultHandle::partition`] (`heal`/`heal_all` do not touch it): a packet is cut if either
//! covers it. The path is a per-process setting: sockets built programmatically in a
//! process whose [`ENV_VAR`] names a control file follow it too. Commas separate the keys,
//! so the path cannot contain one.
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt,
    future::poll_fn,
    io::{self, IoSliceMut},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, Weak,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use quinn::{
    udp::{EcnCodepoint, RecvMeta, Transmit},
    AsyncUdpSocket, Endpoint, EndpointConfig, Runtime, UdpPoller,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Debug flag: when set (and not empty), every endpoint built by [`crate::endpoint`] injects
/// these faults, e.g. `seed=42,drop=0.01,dup=0.01,delay=0.05,delay_max=30ms,corrupt=0.001`;
/// `control=PATH` adds partitions read from a file at run time (see the module docs).
pub const ENV_VAR: &str = "HAVEN_NET_FAULTS";
/// How often a partition control file (`control=PATH`) is re-read.
pub const CONTROL_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Packets held for delay at one time, per socket (both directions together).
pub const DELAYED_PACKETS_MAX: usize = 1024;
/// Received packets waiting for quinn to poll them, per socket.
pub const RECV_QUEUE_PACKETS_MAX: usize = 1024;
/// Largest accepted `delay_max`.
pub const DELAY_LIMIT: Duration = Duration::from_secs(10);
/// Sends of a delayed packet retried after `WouldBlock` before it is given up.
const DELAYED_SEND_ATTEMPTS_MAX: usize = 4;
/// Inner-socket reads per `poll_recv` call when every packet read was dropped.
const RECV_ROUNDS_MAX: usize = 16;
/// Makes the incoming RNG stream differ from the outgoing one for the same seed.
const INCOMING_SEED_SALT: u64 = 0x9E37_79B9_7F4A_7C15;

/// Which way packets travel, seen from this endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Packets this endpoint sends.
    Outgoing,
    /// Packets this endpoint receives.
    Incoming,
    Both,
}

impl Direction {
    pub fn covers(self, other: Direction) -> bool {
        self == Direction::Both || self == other
    }

    fn as_str(self) -> &'static str {
        match self {
            Direction::Outgoing => "out",
            Direction::Incoming => "in",
            Direction::Both => "both",
        }
    }
}

/// Per-packet fault probabilities (each in `0.0..=1.0`, rolled independently).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultRates {
    pub drop: f64,
    /// The packet is delivered twice.
    pub duplicate: f64,
    /// The packet is held for a uniformly random time in `0..delay_max`.
    pub delay: f64,
    pub delay_max: Duration,
    /// One byte of the packet is inverted (QUIC then drops it: see the module docs).
    pub corrupt: f64,
}

impl Default for FaultRates {
    /// No faults; a delayed packet would be held up to 20 ms.
    fn default() -> Self {
        Self {
            drop: 0.0,
            duplicate: 0.0,
            delay: 0.0,
            delay_max: Duration::from_millis(20),
            corrupt: 0.0,
        }
    }
}

impl FaultRates {
    pub fn validate(&self) -> Result<(), FaultConfigError> {
        let probabilities = [
            ("drop", self.drop),
            ("dup", self.duplicate),
            ("delay", self.delay),
            ("corrupt", self.corrupt),
        ];
        for (key, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                return Err(FaultConfigError::bad_value(
                    key,
                    p,
                    "a probability must be in 0..=1",
                ));
            }
        }
        if self.delay_max > DELAY_LIMIT {
            return Err(FaultConfigError::bad_value(
                "delay_max",
                DisplayDuration(self.delay_max),
                format!("at most {}", DisplayDuration(DELAY_LIMIT)),
            ));
        }
        if self.delay > 0.0 && self.delay_max.is_zero() {
            return Err(FaultConfigError::bad_value(
                "delay_max",
                DisplayDuration(self.delay_max),
                "must be above zero when delay > 0",
            ));
        }
        Ok(())
    }
}

/// What to inject, and the seed that makes it replayable. Parses from and displays as the
/// [`ENV_VAR`] syntax.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultConfig {
    pub seed: u64,
    pub rates: FaultRates,
    /// Where `rates` apply; partitions are set separately, through the [`FaultHandle`] or a
    /// control file (`control=PATH`, see [`FaultConfig::parse_with_control`]).
    pub direction: Direction,
}

impl FaultConfig {
    /// The given rates, both ways.
    pub fn new(seed: u64, rates: FaultRates) -> Self {
        Self {
            seed,
            rates,
            direction: Direction::Both,
        }
    }

    /// No random faults: only counters, and partitions set through the handle.
    pub fn none(seed: u64) -> Self {
        Self::new(seed, FaultRates::default())
    }

    /// Reads [`ENV_VAR`]; `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>, FaultConfigError> {
        env_value()?.map(|value| value.parse()).transpose()
    }

    /// The partition control file named by `control=PATH` in [`ENV_VAR`], if any.
    pub fn control_file_from_env() -> Result<Option<PathBuf>, FaultConfigError> {
        Ok(match env_value()? {
            Some(value) => Self::parse_with_control(&value)?.1,
            None => None,
        })
    }

    /// Parses the [`ENV_VAR`] syntax (see [`FromStr`]), also returning the `control` path,
    /// which is not part of the config: it is a per-process setting (see the module docs).
    pub fn parse_with_control(s: &str) -> Result<(Self, Option<PathBuf>), FaultConfigError> {
        let mut seed = None;
        let mut rates = FaultRates::default();
        let mut direction = None;
        let mut control = None;
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| FaultConfigError::NotKeyValue(item.to_string()))?;
            let key = match key {
                "duplicate" => "dup",
                "direction" => "dir",
                other => other,
            };
            if seen.contains(&key) {
                return Err(FaultConfigError::DuplicateKey(key.to_string()));
            }
            match key {
                "seed" => seed = Some(parse_seed(value)?),
                "drop" => rates.drop = parse_probability(key, value)?,
                "dup" => rates.duplicate = parse_probability(key, value)?,
                "delay" => rates.delay = parse_probability(key, value)?,
                "corrupt" => rates.corrupt = parse_probability(key, value)?,
                "delay_max" => rates.delay_max = parse_duration(key, value)?,
                "dir" => direction = Some(parse_direction(value)?),
                "control" if value.is_empty() => {
                    return Err(FaultConfigError::bad_value(
                        key,
                        value,
                        "needs the path of a partition control file",
                    ))
                }
                "control" => control = Some(PathBuf::from(value)),
                other => return Err(FaultConfigError::UnknownKey(other.to_string())),
            }
            seen.push(key);
        }
        if seen.is_empty() {
            return Err(FaultConfigError::Empty);
        }
        rates.validate()?;
        let config = Self {
            seed: seed.unwrap_or_else(rand::random),
            rates,
            direction: direction.unwrap_or(Direction::Both),
        };
        Ok((config, control))
    }
}

/// [`ENV_VAR`]'s value; `None` when it is unset or blank.
fn env_value() -> Result<Option<String>, FaultConfigError> {
    match std::env::var(ENV_VAR) {
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(FaultConfigError::NotUnicode),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FaultConfigError {
    #[error("no settings (expected e.g. `seed=42,drop=0.01,dup=0.01,delay=0.05,delay_max=30ms,corrupt=0.001` or `seed=1,control=/tmp/partitions`)")]
    Empty,
    #[error("{ENV_VAR} is not valid UTF-8")]
    NotUnicode,
    #[error("expected key=value, got {0:?}")]
    NotKeyValue(String),
    #[error("unknown key {0:?} (known: seed, drop, dup, delay, delay_max, corrupt, dir, control)")]
    UnknownKey(String),
    #[error("key {0:?} given twice")]
    DuplicateKey(String),
    #[error("{key}={value}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
}

impl FaultConfigError {
    fn bad_value(key: &str, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        Self::BadValue {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl FromStr for FaultConfig {
    type Err = FaultConfigError;

    /// `key=value` items separated by commas. Keys: `seed` (decimal or `0x` hex; a random
    /// one when absent — it is printed with the config, so the run can be replayed), `drop`,
    /// `dup`/`duplicate`, `delay`, `corrupt` (probabilities, `0.05` or `5%`), `delay_max`
    /// (`500us`, `30ms`, `1.5s`; default 20ms), `dir` (`out`, `in` or `both`, default both),
    /// `control` (a partition control file, see the module docs; accepted and validated here
    /// but not kept: [`FaultConfig::parse_with_control`] returns it).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_with_control(s).map(|(config, _control)| config)
    }
}

impl fmt::Display for FaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.rates;
        write!(
            f,
            "seed={},drop={},dup={},delay={},delay_max={},corrupt={},dir={}",
            self.seed,
            r.drop,
            r.duplicate,
            r.delay,
            DisplayDuration(r.delay_max),
            r.corrupt,
            self.direction.as_str()
        )
    }
}

/// A duration in the parser's syntax: whole milliseconds as `ms`, otherwise `us`.
struct DisplayDuration(Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        let (ms, sub_ms_us) = (us / 1000, us % 1000);
        if sub_ms_us == 0 {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{us}us")
        }
    }
}

fn parse_seed(value: &str) -> Result<u64, FaultConfigError> {
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|e| FaultConfigError::bad_value("seed", value, format!("not a u64 ({e})")))
}

fn parse_probability(key: &str, value: &str) -> Result<f64, FaultConfigError> {
    let (number, scale) = match value.strip_suffix('%') {
        Some(percent) => (percent.trim(), 100.0),
        None => (value, 1.0),
    };
    let p = number.parse::<f64>().map_err(|_| {
        FaultConfigError::bad_value(key, value, "not a number (expected e.g. 0.05 or 5%)")
    })? / scale;
    if !(0.0..=1.0).contains(&p) {
        return Err(FaultConfigError::bad_value(
            key,
            value,
            "a probability must be in 0..=1 (or 0%..=100%)",
        ));
    }
    Ok(p)
}

fn parse_duration(key: &str, value: &str) -> Result<Duration, FaultConfigError> {
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let scale_s = match unit.trim() {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "" => {
            return Err(FaultConfigError::bad_value(
                key,
                value,
                "needs a unit: us, ms or s",
            ))
        }
        _ => {
            return Err(FaultConfigError::bad_value(
                key,
                value,
                "unknown unit (expected us, ms or s)",
            ))
        }
    };
    let number: f64 = number
        .parse()
        .map_err(|_| FaultConfigError::bad_value(key, value, "not a number"))?;
    let seconds = number * scale_s;
    if !(0.0..=DELAY_LIMIT.as_secs_f64()).contains(&seconds) {
        return Err(FaultConfigError::bad_value(
            key,
            value,
            format!("at most {}", DisplayDuration(DELAY_LIMIT)),
        ));
    }
    // Whole microseconds, so Display round-trips.
    Ok(Duration::from_micros((seconds * 1e6).round() as u64))
}

fn parse_direction(value: &str) -> Result<Direction, FaultConfigError> {
    match value {
        "out" | "outgoing" | "send" => Ok(Direction::Outgoing),
        "in" | "incoming" | "recv" => Ok(Direction::Incoming),
        "both" => Ok(Direction::Both),
        _ => Err(FaultConfigError::bad_value(
            "dir",
            value,
            "expected out, in or both",
        )),
    }
}

/// Why a line of a partition control file was ignored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlLineError {
    #[error("expected `PEER_ADDR DIRECTION` (e.g. `127.0.0.1:40123 both`), got {0} field(s)")]
    FieldCount(usize),
    #[error("{0:?} is not a socket address (expected e.g. 127.0.0.1:40123 or [::1]:40123)")]
    BadAddr(String),
    #[error("{0:?} is not a direction (expected out, in or both)")]
    BadDirection(String),
}

/// One line of a partition control file: `PEER_ADDR DIRECTION`, separated by whitespace, with
/// DIRECTION `out`, `in` or `both` seen from this process. `Ok(None)` for a blank line or a
/// comment (`#` to the end of the line).
pub fn parse_control_line(line: &str) -> Result<Option<(SocketAddr, Direction)>, ControlLineError> {
    let line = line
        .split_once('#')
        .map_or(line, |(before, _comment)| before);
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields[..] {
        [] => Ok(None),
        [addr, direction] => {
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| ControlLineError::BadAddr(addr.to_string()))?;
            let direction = parse_direction(direction)
                .map_err(|_| ControlLineError::BadDirection(direction.to_string()))?;
            Ok(Some((canonical(addr), direction)))
        }
        _ => Err(ControlLineError::FieldCount(fields.len())),
    }
}

/// A control file line that was ignored: (1-based line number, the line, why).
pub type MalformedLine = (usize, String, ControlLineError);

/// A whole control file: the partitions it sets (a peer listed twice gets the union of its
/// directions) and its malformed lines.
pub fn parse_control_file(text: &str) -> (HashMap<SocketAddr, Direction>, Vec<MalformedLine>) {
    let mut partitions = HashMap::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse_control_line(line) {
            Ok(None) => {}
            Ok(Some((addr, direction))) => {
                partitions
                    .entry(addr)
                    .and_modify(|d: &mut Direction| {
                        if *d != direction {
                            *d = Direction::Both;
                        }
                    })
                    .or_insert(direction);
            }
            Err(e) => errors.push((i + 1, line.to_string(), e)),
        }
    }
    (partitions, errors)
}

/// Partitions in the control-file syntax, sorted: `127.0.0.1:1 both, 127.0.0.1:2 out`.
fn describe_partitions(partitions: &HashMap<SocketAddr, Direction>) -> String {
    if partitions.is_empty() {
        return "none".into();
    }
    let sorted: BTreeMap<_, _> = partitions.iter().collect();
    sorted
        .iter()
        .map(|(addr, d)| format!("{addr} {}", d.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What happens to one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    Deliver {
        /// 1, or 2 when duplicated.
        copies: u8,
        /// Held this long before it is sent (or handed to quinn); all copies together.
        delay: Option<Duration>,
        /// Byte offset to invert, in every copy.
        corrupt: Option<usize>,
    },
}

impl Verdict {
    const CLEAN: Verdict = Verdict::Deliver {
        copies: 1,
        delay: None,
        corrupt: None,
    };
}

/// The seeded, pure part of the socket: one [`Verdict`] per packet.
#[derive(Debug)]
pub struct FaultDecider {
    rng: StdRng,
    rates: FaultRates,
}

impl FaultDecider {
    pub fn new(seed: u64, rates: FaultRates) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            rates,
        }
    }

    pub fn set_rates(&mut self, rates: FaultRates) {
        self.rates = rates;
    }

    /// Decides the fate of the next packet, `len` bytes long. Always draws the same amount of
    /// randomness, so the sequence stays aligned to packets whatever the rates.
    pub fn decide(&mut self, len: usize) -> Verdict {
        let drop_roll: f64 = self.rng.gen();
        let duplicate_roll: f64 = self.rng.gen();
        let delay_roll: f64 = self.rng.gen();
        let delay_fraction: f64 = self.rng.gen();
        let corrupt_roll: f64 = self.rng.gen();
        let corrupt_position: u64 = self.rng.gen();
        let r = &self.rates;
        if drop_roll < r.drop {
            return Verdict::Drop;
        }
        Verdict::Deliver {
            copies: if duplicate_roll < r.duplicate { 2 } else { 1 },
            delay: (delay_roll < r.delay).then(|| r.delay_max.mul_f64(delay_fraction)),
            corrupt: (corrupt_roll < r.corrupt && len > 0)
                .then(|| (corrupt_position % len as u64) as usize),
        }
    }
}

/// Counters for one direction. `seen` counts every datagram; the others count what was done
/// to them (a packet may be duplicated, delayed and corrupted at once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    pub seen: u64,
    /// Dropped at random.
    pub dropped: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    pub delayed: u64,
    pub corrupted: u64,
    /// Dropped by a partition.
    pub partitioned: u64,
    /// Dropped because the delay cap or the receive queue was full, or a delayed send failed.
    pub overflowed: u64,
}

impl FaultCounters {
    fn add(self, o: Self) -> Self {
        Self {
            seen: self.seen + o.seen,
            dropped: self.dropped + o.dropped,
            duplicated: self.duplicated + o.duplicated,
            delayed: self.delayed + o.delayed,
            corrupted: self.corrupted + o.corrupted,
            partitioned: self.partitioned + o.partitioned,
            overflowed: self.overflowed + o.overflowed,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub outgoing: FaultCounters,
    pub incoming: FaultCounters,
}

impl FaultStats {
    pub fn total(&self) -> FaultCounters {
        self.outgoing.add(self.incoming)
    }
}

#[derive(Debug, Default)]
struct AtomicCounters {
    seen: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    delayed: AtomicU64,
    corrupted: AtomicU64,
    partitioned: AtomicU64,
    overflowed: AtomicU64,
}

impl AtomicCounters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> FaultCounters {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultCounters {
            seen: read(&self.seen),
            dropped: read(&self.dropped),
            duplicated: read(&self.duplicated),
            delayed: read(&self.delayed),
            corrupted: read(&self.corrupted),
            partitioned: read(&self.partitioned),
            overflowed: read(&self.overflowed),
        }
    }
}

/// A received datagram waiting for quinn.
#[derive(Debug)]
struct Datagram {
    addr: SocketAddr,
    ecn: Option<EcnCodepoint>,
    dst_ip: Option<IpAddr>,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct RecvQueue {
    ready: VecDeque<Datagram>,
    /// The endpoint driver's waker, registered before the queue is checked so a push from a
    /// delay task cannot be missed.
    waker: Option<Waker>,
}

/// Partitions in force, from both sources; a packet is cut if either covers it.
#[derive(Debug, Default)]
struct Partitions {
    /// Set through the [`FaultHandle`].
    manual: HashMap<SocketAddr, Direction>,
    /// The control file's content, replaced as a whole on each change.
    file: HashMap<SocketAddr, Direction>,
}

impl Partitions {
    fn cuts(&self, peer: SocketAddr, direction: Direction) -> bool {
        let covers = |set: &HashMap<SocketAddr, Direction>| {
            set.get(&peer).is_some_and(|d| d.covers(direction))
        };
        covers(&self.manual) || covers(&self.file)
    }
}

/// State shared by the socket, its handle and its delay tasks.
#[derive(Debug)]
struct Shared {
    seed: u64,
    /// Where random faults apply.
    direction: Direction,
    outgoing: Mutex<FaultDecider>,
    incoming: Mutex<FaultDecider>,
    partitions: Mutex<Partitions>,
    /// Bumped when a control file is followed; a watcher with an older value stops.
    control_generation: AtomicU64,
    outgoing_counters: AtomicCounters,
    incoming_counters: AtomicCounters,
    delayed_in_flight: AtomicUsize,
    recv_queue: Mutex<RecvQueue>,
}

/// A poisoned lock here only means a panic elsewhere; the data stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Partitions match regardless of IPv4-mapped IPv6 spelling.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Shared {
    fn counters(&self, direction: Direction) -> &AtomicCounters {
        match direction {
            Direction::Outgoing => &self.outgoing_counters,
            Direction::Incoming => &self.incoming_counters,
            Direction::Both => unreachable!("a packet travels one way"),
        }
    }

    /// Judges one datagram to or from `peer` and counts the outcome.
    fn judge(&self, direction: Direction, peer: SocketAddr, len: usize) -> Verdict {
        debug_assert!(direction != Direction::Both);
        let counters = self.counters(direction);
        AtomicCounters::bump(&counters.seen);
        let cut = lock(&self.partitions).cuts(canonical(peer), direction);
        if cut {
            AtomicCounters::bump(&counters.partitioned);
            return Verdict::Drop;
        }
        if !self.direction.covers(direction) {
            return Verdict::CLEAN;
        }
        let decider = match direction {
            Direction::Outgoing => &self.outgoing,
            _ => &self.incoming,
        };
        let verdict = lock(decider).decide(len);
        match verdict {
            Verdict::Drop => AtomicCounters::bump(&counters.dropped),
            Verdict::Deliver {
                copies, corrupt, ..
            } => {
                if copies > 1 {
                    AtomicCounters::bump(&counters.duplicated);
                }
                if corrupt.is_some() {
                    AtomicCounters::bump(&counters.corrupted);
                }
                // `delayed` is counted when the packet is actually held (the cap may refuse it).
            }
        }
        verdict
    }

    /// Takes a slot for a delayed packet, or counts an overflow.
    fn reserve_delay_slot(&self, direction: Direction) -> bool {
        let reserved = self
            .delayed_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < DELAYED_PACKETS_MAX).then_some(n + 1)
            })
            .is_ok();
        let counters = self.counters(direction);
        AtomicCounters::bump(if reserved {
            &counters.delayed
        } else {
            &counters.overflowed
        });
        reserved
    }

    fn release_delay_slot(&self) {
        let before = self.delayed_in_flight.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "delay slot released twice");
    }

    /// Queues `copies` of a received datagram for quinn; wakes the driver if `wake`.
    fn push_received(&self, datagram: Datagram, copies: u8, wake: bool) {
        let waker = {
            let mut queue = lock(&self.recv_queue);
            let Datagram {
                addr,
                ecn,
                dst_ip,
                mut data,
            } = datagram;
            for copy in 0..copies {
                if queue.ready.len() >= RECV_QUEUE_PACKETS_MAX {
                    AtomicCounters::bump(&self.incoming_counters.overflowed);
                    continue;
                }
                let data = if copy + 1 == copies {
                    std::mem::take(&mut data)
                } else {
                    data.clone()
                };
                queue.ready.push_back(Datagram {
                    addr,
                    ecn,
                    dst_ip,
                    data,
                });
            }
            if wake {
                queue.waker.take()
            } else {
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Registers `waker`, then moves queued datagrams into the free slots. Returns the number
    /// of slots filled and of datagrams still queued.
    fn take_received(
        &self,
        waker: &Waker,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> (usize, usize) {
        let mut queue = lock(&self.recv_queue);
        match &queue.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => queue.waker = Some(waker.clone()),
        }
        let mut filled = 0;
        while filled < bufs.len() {
            let Some(datagram) = queue.ready.pop_front() else {
                break;
            };
            let len = datagram.data.len();
            if len > bufs[filled].len() {
                // quinn's buffers hold a maximum-size datagram; this cannot happen with quinn.
                AtomicCounters::bump(&self.incoming_counters.overflowed);
                continue;
            }
            bufs[filled][..len].copy_from_slice(&datagram.data);
            meta[filled] = RecvMeta {
                addr: datagram.addr,
                len,
                stride: len,
                ecn: datagram.ecn,
                dst_ip: datagram.dst_ip,
            };
            filled += 1;
        }
        (filled, queue.ready.len())
    }
}

/// Run-time control of one [`FaultySocket`], cloneable into test code.
#[derive(Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for FaultHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultHandle")
            .field("seed", &self.shared.seed)
            .finish_non_exhaustive()
    }
}

impl FaultHandle {
    /// Cuts packets to and/or from `peer`, replacing any earlier partition of that peer set
    /// through the handle. Independent of the control file's partitions.
    pub fn partition(&self, peer: SocketAddr, direction: Direction) {
        tracing::info!(%peer, ?direction, "fault injection: partition");
        lock(&self.shared.partitions)
            .manual
            .insert(canonical(peer), direction);
    }

    /// Heals a partition set through the handle (not one from the control file).
    pub fn heal(&self, peer: SocketAddr) {
        tracing::info!(%peer, "fault injection: heal");
        lock(&self.shared.partitions)
            .manual
            .remove(&canonical(peer));
    }

    /// Heals every partition set through the handle (not those from the control file).
    pub fn heal_all(&self) {
        tracing::info!("fault injection: heal all partitions");
        lock(&self.shared.partitions).manual.clear();
    }

    /// The partitions set through the handle.
    pub fn partitions(&self) -> Vec<(SocketAddr, Direction)> {
        lock(&self.shared.partitions)
            .manual
            .iter()
            .map(|(a, d)| (*a, *d))
            .collect()
    }

    /// The partitions the control file currently sets.
    pub fn control_partitions(&self) -> Vec<(SocketAddr, Direction)> {
        lock(&self.shared.partitions)
            .file
            .iter()
            .map(|(a, d)| (*a, *d))
            .collect()
    }

    /// Re-reads `path` every [`CONTROL_POLL_INTERVAL`] and applies its content as the exact
    /// set of file-driven partitions (syntax in the module docs), until the socket is gone.
    /// Replaces a control file followed before. Must be called within a tokio runtime.
    pub fn follow_control_file(&self, path: PathBuf) -> io::Result<()> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let generation = self
            .shared
            .control_generation
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        tracing::warn!(
            path = %path.display(),
            "fault injection: partitions from the control file, re-read every {}",
            DisplayDuration(CONTROL_POLL_INTERVAL)
        );
        runtime.spawn(follow_control_file(
            Arc::downgrade(&self.shared),
            path,
            generation,
        ));
        Ok(())
    }

    /// Changes the random fault rates from the next packet on; the RNG sequences continue.
    pub fn set_rates(&self, rates: FaultRates) -> Result<(), FaultConfigError> {
        rates.validate()?;
        tracing::info!(?rates, "fault injection: new rates");
        lock(&self.shared.outgoing).set_rates(rates);
        lock(&self.shared.incoming).set_rates(rates);
        Ok(())
    }

    pub fn rates(&self) -> FaultRates {
        lock(&self.shared.outgoing).rates
    }

    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    pub fn stats(&self) -> FaultStats {
        FaultStats {
            outgoing: self.shared.outgoing_counters.snapshot(),
            incoming: self.shared.incoming_counters.snapshot(),
        }
    }
}

/// An [`AsyncUdpSocket`] that injects faults into another one.
pub struct FaultySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    shared: Arc<Shared>,
    /// Where delay tasks run (the endpoint's runtime).
    tasks: tokio::runtime::Handle,
}

impl fmt::Debug for FaultySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultySocket")
            .field("inner", &self.inner)
            .field("seed", &self.shared.seed)
            .finish_non_exhaustive()
    }
}

impl FaultySocket {
    /// Wraps `inner`. Must be called within a tokio runtime, which runs the delay tasks.
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        config: FaultConfig,
    ) -> io::Result<(Self, FaultHandle)> {
        config
            .rates
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tasks = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let shared = Arc::new(Shared {
            seed: config.seed,
            direction: config.direction,
            outgoing: Mutex::new(FaultDecider::new(config.seed, config.rates)),
            incoming: Mutex::new(FaultDecider::new(
                config.seed ^ INCOMING_SEED_SALT,
                config.rates,
            )),
            partitions: Mutex::default(),
            control_generation: AtomicU64::new(0),
            outgoing_counters: AtomicCounters::default(),
            incoming_counters: AtomicCounters::default(),
            delayed_in_flight: AtomicUsize::new(0),
            recv_queue: Mutex::default(),
        });
        let handle = FaultHandle {
            shared: shared.clone(),
        };
        Ok((
            Self {
                inner,
                shared,
                tasks,
            },
            handle,
        ))
    }

    /// Sends one datagram through the fault decision.
    fn send_datagram(&self, t: &Transmit<'_>) -> io::Result<()> {
        let (copies, delay, corrupt) =
            match self
                .shared
                .judge(Direction::Outgoing, t.destination, t.contents.len())
            {
                Verdict::Drop => return Ok(()),
                Verdict::Deliver {
                    copies,
                    delay,
                    corrupt,
                } => (copies, delay, corrupt),
            };
        let mut corrupted;
        let contents = match corrupt {
            Some(offset) => {
                corrupted = t.contents.to_vec();
                corrupted[offset] ^= 0xFF;
                &corrupted[..]
            }
            None => t.contents,
        };
        if let Some(delay) = delay {
            self.send_later(t, contents.to_vec(), copies, delay);
            return Ok(());
        }
        let single = Transmit {
            contents,
            segment_size: None,
            ..t.clone()
        };
        // WouldBlock on the first copy goes back to quinn, which retries the transmit.
        self.inner.try_send(&single)?;
        for _ in 1..copies {
            // Lost if the socket is full, like any UDP packet.
            let _ = self.inner.try_send(&single);
        }
        Ok(())
    }

    fn send_later(&self, t: &Transmit<'_>, data: Vec<u8>, copies: u8, delay: Duration) {
        if !self.shared.reserve_delay_slot(Direction::Outgoing) {
            return;
        }
        let (destination, ecn, src_ip) = (t.destination, t.ecn, t.src_ip);
        let inner = self.inner.clone();
        let shared = self.shared.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let transmit = Transmit {
                destination,
                ecn,
                contents: &data,
                segment_size: None,
                src_ip,
            };
            for _ in 0..copies {
                if !send_when_writable(&inner, &transmit).await {
                    AtomicCounters::bump(&shared.outgoing_counters.overflowed);
                }
            }
            shared.release_delay_slot();
        });
    }

    fn receive_later(&self, datagram: Datagram, copies: u8, delay: Duration) {
        if !self.shared.reserve_delay_slot(Direction::Incoming) {
            return;
        }
        let shared = self.shared.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            shared.release_delay_slot();
            shared.push_received(datagram, copies, true);
        });
    }

    /// Judges the `n` buffers the inner socket just filled at `start..start + n`, splitting
    /// GRO buffers into datagrams. Survivors are compacted into slots from `start` on (at most
    /// one per buffer, so a slot is never overwritten before it is read); extra copies and
    /// further datagrams of a GRO buffer go to the receive queue. Returns the slots filled.
    fn judge_received(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        start: usize,
        n: usize,
    ) -> usize {
        let mut out = start;
        for k in start..start + n {
            debug_assert!(out <= k);
            let m = meta[k];
            let stride = if m.stride == 0 || m.stride > m.len {
                m.len
            } else {
                m.stride
            };
            let mut placed = false;
            let mut offset = 0;
            while offset < m.len {
                let len = stride.min(m.len - offset);
                let range = offset..offset + len;
                offset += len;
                let Verdict::Deliver {
                    copies,
                    delay,
                    corrupt,
                } = self.shared.judge(Direction::Incoming, m.addr, len)
                else {
                    continue;
                };
                let segment = &mut bufs[k][range.clone()];
                if let Some(at) = corrupt {
                    segment[at] ^= 0xFF;
                }
                let datagram = |data: &[u8]| Datagram {
                    addr: m.addr,
                    ecn: m.ecn,
                    dst_ip: m.dst_ip,
                    data: data.to_vec(),
                };
                if let Some(delay) = delay {
                    self.receive_later(datagram(segment), copies, delay);
                    continue;
                }
                let mut copies_left = copies;
                if !placed && len <= bufs[out].len() {
                    if out == k {
                        // Earlier datagrams of this buffer are already handled: safe to overwrite.
                        bufs[k].copy_within(range, 0);
                    } else {
                        let (head, tail) = bufs.split_at_mut(k);
                        head[out][..len].copy_from_slice(&tail[0][range]);
                    }
                    meta[out] = RecvMeta {
                        len,
                        stride: len,
                        ..m
                    };
                    out += 1;
                    placed = true;
                    copies_left -= 1;
                    if copies_left > 0 {
                        self.shared.push_received(
                            datagram(&bufs[out - 1][..len]),
                            copies_left,
                            false,
                        );
                    }
                } else {
                    self.shared
                        .push_received(datagram(&bufs[k][range]), copies_left, false);
                }
            }
        }
        out
    }
}

/// Sends a delayed datagram, waiting for writability a bounded number of times.
async fn send_when_writable(inner: &Arc<dyn AsyncUdpSocket>, transmit: &Transmit<'_>) -> bool {
    let mut poller: Option<Pin<Box<dyn UdpPoller>>> = None;
    for _ in 0..DELAYED_SEND_ATTEMPTS_MAX {
        match inner.try_send(transmit) {
            Ok(()) => return true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let poller = poller.get_or_insert_with(|| inner.clone().create_io_poller());
                if poll_fn(|cx| poller.as_mut().poll_writable(cx))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

impl AsyncUdpSocket for FaultySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match transmit.segment_size {
            Some(size) if size > 0 && size < transmit.contents.len() => {
                // quinn sends no batches to a socket with one transmit segment; split anyway.
                let mut datagrams = transmit.contents.chunks(size);
                let first = datagrams.next().expect("contents longer than one segment");
                self.send_datagram(&Transmit {
                    contents: first,
                    segment_size: None,
                    ..transmit.clone()
                })?;
                for contents in datagrams {
                    let _ = self.send_datagram(&Transmit {
                        contents,
                        segment_size: None,
                        ..transmit.clone()
                    });
                }
                Ok(())
            }
            _ => self.send_datagram(transmit),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let slots = bufs.len().min(meta.len());
        let mut filled = 0;
        // Each buffer read may leave up to two copies of each of its datagrams to queue.
        let queued_per_buffer_max = 2 * self.max_receive_segments().max(1);
        for _ in 0..RECV_ROUNDS_MAX {
            let (taken, queued) = self.shared.take_received(
                cx.waker(),
                &mut bufs[filled..slots],
                &mut meta[filled..slots],
            );
            filled += taken;
            // Read no more than the queue can take, so coalesced reads cannot overflow it.
            let room = RECV_QUEUE_PACKETS_MAX.saturating_sub(queued) / queued_per_buffer_max;
            let end = slots.min(filled + room);
            if filled == end {
                break;
            }
            match self
                .inner
                .poll_recv(cx, &mut bufs[filled..end], &mut meta[filled..end])
            {
                Poll::Pending if filled == 0 => return Poll::Pending,
                Poll::Pending => break,
                // Deliver what we have; a lasting error shows again on the next poll.
                Poll::Ready(Err(e)) if filled == 0 => return Poll::Ready(Err(e)),
                Poll::Ready(Err(_)) => break,
                Poll::Ready(Ok(n)) => filled = self.judge_received(bufs, meta, filled, n),
            }
        }
        // Possibly 0 when everything read was dropped: quinn simply polls again.
        Poll::Ready(Ok(filled))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// One datagram per transmit, so each gets its own decision.
    fn max_transmit_segments(&self) -> usize {
        1
    }

    /// What the inner socket may coalesce (GRO), because quinn sizes its receive buffers by
    /// it: reporting 1 while the kernel still coalesces makes it truncate the buffer and lose
    /// the rest. Each datagram is judged on its own anyway: buffers are split at their stride
    /// and quinn is handed one datagram per `RecvMeta`.
    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The watcher behind [`FaultHandle::follow_control_file`]. Holds the socket's state weakly,
/// so it ends with the socket (or when another control file is followed).
async fn follow_control_file(shared: Weak<Shared>, path: PathBuf, generation: u64) {
    let mut ticks = tokio::time::interval(CONTROL_POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The content last applied; `None` before the first read.
    let mut applied: Option<String> = None;
    let mut warned_lines: HashSet<String> = HashSet::new();
    let mut warned_read: Option<String> = None;
    loop {
        ticks.tick().await;
        let text = match tokio::fs::read(&path).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                let message = e.to_string();
                if warned_read.as_deref() != Some(message.as_str()) {
                    tracing::warn!(
                        path = %path.display(),
                        "fault injection: cannot read the partition control file, partitions unchanged: {message}"
                    );
                    warned_read = Some(message);
                }
                continue;
            }
        };
        warned_read = None;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.control_generation.load(Ordering::Acquire) != generation {
            return;
        }
        if applied.as_deref() == Some(text.as_str()) {
            continue;
        }
        let (partitions, errors) = parse_control_file(&text);
        for (line_no, line, error) in errors {
            if warned_lines.insert(line.clone()) {
                tracing::warn!(
                    path = %path.display(),
                    "fault injection: ignoring line {line_no} of the partition control file ({line:?}): {error}"
                );
            }
        }
        let described = describe_partitions(&partitions);
        let changed = {
            let mut current = lock(&shared.partitions);
            let changed = current.file != partitions;
            current.file = partitions;
            changed
        };
        if changed {
            tracing::info!(
                path = %path.display(),
                "fault injection: control file partitions now: {described}"
            );
        }
        applied = Some(text);
    }
}

/// Builds a quinn endpoint on `socket` through a [`FaultySocket`] (tokio runtime). When
/// [`ENV_VAR`] names a control file (`control=PATH`), the socket follows it.
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
    config: FaultConfig,
) -> io::Result<(Endpoint, FaultHandle)> {
    let runtime = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    let (socket, handle) = FaultySocket::new(inner, config)?;
    // An invalid variable is reported by whoever parses it for the config; here it only
    // means there is no control file to follow.
    if let Ok(Some(path)) = FaultConfig::control_file_from_env() {
        handle.follow_control_file(path)?;
    }
    let endpoint = Endpoint::new_with_abstract_socket(
        EndpointConfig::default(),
        server,
        Arc::new(socket),
        runtime,
    )?;
    Ok((endpoint, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(addr: SocketAddr, len: usize, stride: usize) -> RecvMeta {
        RecvMeta {
            addr,
            len,
            stride,
            ecn: None,
            dst_ip: None,
        }
    }

    fn socket(rates: FaultRates) -> (FaultySocket, FaultHandle) {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inner = quinn::TokioRuntime.wrap_udp_socket(std_socket).unwrap();
        FaultySocket::new(inner, FaultConfig::new(1, rates)).unwrap()
    }

    /// Fills slot `k` like a GRO read: `segments` datagrams of `stride` bytes (the last may be
    /// shorter), datagram `i` made of the byte `first + i`.
    fn fill(buf: &mut [u8], first: u8, len: usize, stride: usize) {
        for (i, chunk) in buf[..len].chunks_mut(stride).enumerate() {
            chunk.fill(first + i as u8);
        }
    }

    #[tokio::test]
    async fn received_buffers_are_split_judged_and_compacted() {
        let (a, b) = ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
        let (socket, handle) = socket(FaultRates::default());
        // Everything from `a` is cut: no randomness involved, so the outcome is exact.
        handle.partition(a, Direction::Incoming);
        let mut storage = [[0u8; 64]; 4];
        fill(&mut storage[0], 1, 10, 10);
        fill(&mut storage[1], 11, 25, 10); // GRO: 10 + 10 + 5 bytes
        fill(&mut storage[2], 21, 7, 7);
        let mut bufs: Vec<IoSliceMut> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut metas = [
            meta(a, 10, 10),
            meta(b, 25, 10),
            meta(b, 7, 7),
            meta(b, 0, 0),
        ];

        let filled = socket.judge_received(&mut bufs, &mut metas, 0, 3);

        // Slot 0 was `a`'s (cut); the first datagram of the GRO buffer moved into it, the
        // single datagram of slot 2 into slot 1; the rest of the GRO buffer waits in the queue.
        assert_eq!(filled, 2);
        assert_eq!((metas[0].addr, metas[0].len, metas[0].stride), (b, 10, 10));
        assert_eq!(&bufs[0][..10], &[11; 10]);
        assert_eq!((metas[1].addr, metas[1].len, metas[1].stride), (b, 7, 7));
        assert_eq!(&bufs[1][..7], &[21; 7]);
        let waker = noop_waker();
        let (taken, left) = socket
            .shared
            .take_received(&waker, &mut bufs[..], &mut metas[..]);
        assert_eq!((taken, left), (2, 0));
        assert_eq!((metas[0].len, &bufs[0][..10]), (10, &[12u8; 10][..]));
        assert_eq!((metas[1].len, &bufs[1][..5]), (5, &[13u8; 5][..]));
        let stats = handle.stats().incoming;
        assert_eq!((stats.seen, stats.partitioned, stats.dropped), (5, 1, 0));
    }

    #[tokio::test]
    async fn duplicates_are_queued_behind_the_original() {
        let b: SocketAddr = "10.0.0.2:2".parse().unwrap();
        let (socket, handle) = socket(FaultRates {
            duplicate: 1.0,
            ..FaultRates::default()
        });
        let mut storage = [[0u8; 64]; 2];
        fill(&mut storage[0], 1, 20, 10); // GRO: two datagrams
        fill(&mut storage[1], 3, 4, 4);
        let mut bufs: Vec<IoSliceMut> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut metas = [meta(b, 20, 10), meta(b, 4, 4)];

        let filled = socket.judge_received(&mut bufs, &mut metas, 0, 2);

        assert_eq!(filled, 2);
        assert_eq!(
            (&bufs[0][..10], &bufs[1][..4]),
            (&[1u8; 10][..], &[3u8; 4][..])
        );
        // Queued: the copy of datagram 1, datagram 2 twice, the copy of slot 1's datagram.
        let mut queued = Vec::new();
        let waker = noop_waker();
        loop {
            let (taken, _) = socket
                .shared
                .take_received(&waker, &mut bufs[..1], &mut metas[..1]);
            if taken == 0 {
                break;
            }
            queued.push(bufs[0][..metas[0].len].to_vec());
        }
        assert_eq!(
            queued,
            vec![vec![1; 10], vec![2; 10], vec![2; 10], vec![3; 4]]
        );
        assert_eq!(handle.stats().incoming.duplicated, 3);
    }

    #[test]
    fn control_lines_parse_or_say_what_is_wrong() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            parse_control_line("127.0.0.1:40123 both"),
            Ok(Some((addr("127.0.0.1:40123"), Direction::Both)))
        );
        assert_eq!(
            parse_control_line("  10.0.0.2:1\tout   # the master target"),
            Ok(Some((addr("10.0.0.2:1"), Direction::Outgoing)))
        );
        assert_eq!(
            parse_control_line("[::1]:7 in"),
            Ok(Some((addr("[::1]:7"), Direction::Incoming)))
        );
        // IPv4-mapped IPv6 is the IPv4 peer, as for the handle's partitions.
        assert_eq!(
            parse_control_line("[::ffff:127.0.0.1]:9 both"),
            Ok(Some((addr("127.0.0.1:9"), Direction::Both)))
        );
        for blank in ["", "   ", "# 127.0.0.1:1 both", "  # comment", "\t"] {
            assert_eq!(parse_control_line(blank), Ok(None), "{blank:?}");
        }
        assert_eq!(
            parse_control_line("127.0.0.1:1"),
            Err(ControlLineError::FieldCount(1))
        );
        assert_eq!(
            parse_control_line("127.0.0.1:1 both now"),
            Err(ControlLineError::FieldCount(3))
        );
        assert_eq!(
            parse_control_line("127.0.0.1 both"),
            Err(ControlLineError::BadAddr("127.0.0.1".into()))
        );
        assert_eq!(
            parse_control_line("localhost:1 both"),
            Err(ControlLineError::BadAddr("localhost:1".into()))
        );
        assert_eq!(
            parse_control_line("127.0.0.1:1 sideways"),
            Err(ControlLineError::BadDirection("sideways".into()))
        );
        assert!(parse_control_line("127.0.0.1:1 sideways")
            .unwrap_err()
            .to_string()
            .contains("expected out, in or both"));
    }

    #[test]
    fn a_control_file_is_its_valid_lines_and_the_union_per_peer() {
        let text = "# partitions\n\n127.0.0.1:1 out\nbogus\n127.0.0.1:2 in\n127.0.0.1:1 in\n127.0.0.1:3 both\n127.0.0.1:3 out\n";
        let (set, errors) = parse_control_file(text);
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        assert_eq!(
            set,
            HashMap::from([
                (addr(1), Direction::Both),
                (addr(2), Direction::Incoming),
                (addr(3), Direction::Both),
            ])
        );
        assert_eq!(
            errors,
            vec![(4, "bogus".to_string(), ControlLineError::FieldCount(1))]
        );
        assert_eq!(
            describe_partitions(&set),
            "127.0.0.1:1 both, 127.0.0.1:2 in, 127.0.0.1:3 both"
        );
        assert_eq!(parse_control_file(""), (HashMap::new(), vec![]));
    }

    #[test]
    fn the_control_key_is_parsed_validated_and_kept_out_of_the_config() {
        let (config, control) =
            FaultConfig::parse_with_control("seed=7, control = /tmp/ps1 partitions ").unwrap();
        assert_eq!(config, FaultConfig::none(7));
        assert_eq!(control, Some(PathBuf::from("/tmp/ps1 partitions")));
        assert_eq!(
            "seed=7,control=/tmp/x".parse::<FaultConfig>(),
            Ok(FaultConfig::none(7))
        );
        assert_eq!(FaultConfig::parse_with_control("seed=7").unwrap().1, None);
        // Alone, it is a valid setting (no random faults, a random seed).
        assert!(FaultConfig::parse_with_control("control=/tmp/x").is_ok());
        assert!(matches!(
            FaultConfig::parse_with_control("seed=1,control="),
            Err(FaultConfigError::BadValue { key, .. }) if key == "control"
        ));
        assert_eq!(
            FaultConfig::parse_with_control("control=/a,control=/b"),
            Err(FaultConfigError::DuplicateKey("control".into()))
        );
        assert!(FaultConfigError::UnknownKey("x".into())
            .to_string()
            .contains("control"));
    }

    /// Polls `f` every 10 ms for up to 5 s.
    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn the_control_file_sets_exactly_its_partitions_beside_the_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partitions");
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:2".parse().unwrap(),
            "10.0.0.3:3".parse().unwrap(),
        );
        let (socket, handle) = socket(FaultRates::default());
        handle.partition(c, Direction::Incoming);
        handle.follow_control_file(path.clone()).unwrap();
        let write = |text: &str| {
            let tmp = dir.path().join("partitions.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        let sorted = |mut v: Vec<(SocketAddr, Direction)>| {
            v.sort_by_key(|(addr, _)| *addr);
            v
        };

        write("10.0.0.1:1 both\n10.0.0.2:2 out\nnot a line at all\n");
        eventually("the file's partitions", || {
            sorted(handle.control_partitions())
                == vec![(a, Direction::Both), (b, Direction::Outgoing)]
        })
        .await;
        let cut = |peer, direction| socket.shared.judge(direction, peer, 10) == Verdict::Drop;
        assert!(cut(a, Direction::Outgoing) && cut(a, Direction::Incoming));
        assert!(cut(b, Direction::Outgoing) && !cut(b, Direction::Incoming));
        assert!(cut(c, Direction::Incoming) && !cut(c, Direction::Outgoing));

        // Replaced, not added to; the handle's partition is untouched.
        write("10.0.0.2:2 in\n");
        eventually("the new file's partitions", || {
            handle.control_partitions() == vec![(b, Direction::Incoming)]
        })
        .await;
        assert!(!cut(a, Direction::Outgoing) && cut(b, Direction::Incoming));
        assert_eq!(handle.partitions(), vec![(c, Direction::Incoming)]);

        // heal_all is the handle's; a missing file is no partitions.
        handle.heal_all();
        assert_eq!(handle.control_partitions(), vec![(b, Direction::Incoming)]);
        std::fs::remove_file(&path).unwrap();
        eventually("no partitions without the file", || {
            handle.control_partitions().is_empty()
        })
        .await;
        assert!(!cut(b, Direction::Incoming) && !cut(c, Direction::Incoming));
        let stats = handle.stats();
        assert_eq!(
            (stats.outgoing.partitioned, stats.incoming.partitioned),
            (2, 3)
        );
    }

    #[tokio::test]
    async fn the_watcher_ends_with_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, handle) = socket(FaultRates::default());
        handle
            .follow_control_file(dir.path().join("partitions"))
            .unwrap();
        // Let it read (a missing file) a few times first.
        tokio::time::sleep(CONTROL_POLL_INTERVAL * 3).await;
        let weak = Arc::downgrade(&socket.shared);
        drop((socket, handle));
        // Only the watcher could keep the state alive, and it holds it weakly.
        assert!(weak.upgrade().is_none());
    }

    fn noop_waker() -> Waker {
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        Waker::from(Arc::new(Noop))
    }
}
