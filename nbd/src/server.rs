//! The tokio driver: a registry of exports, listeners on unix and TCP sockets, and per
//! connection a reader (handshake, then request headers and write payloads; it starts each
//! request) and one writer that drives the requests in flight (bounded by count and bytes)
//! and writes their replies as they complete.
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    BufWriter,
};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument};

use crate::backend::{nbd_error, Backend};
use crate::proto::{
    self, decide, encode_simple_reply, parse_request, transmission_flags, BadMagic, CloseReason,
    Command, Decision, ExportCatalog, ExportInfo, Handshake, HandshakeStatus, RequestClose,
    REQUEST_LEN,
};

/// The exports a server hands out, by name; add and remove them at any time. A removed
/// export is no longer offered to new connections; connections already using it keep their
/// `Arc` until they close.
#[derive(Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<dyn Backend>>>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports")
            .field("names", &self.names())
            .finish()
    }
}

impl Exports {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an export; returns the one it replaced.
    pub fn insert(
        &self,
        name: impl Into<String>,
        backend: Arc<dyn Backend>,
    ) -> Option<Arc<dyn Backend>> {
        self.write().insert(name.into(), backend)
    }

    pub fn remove(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.write().remove(name)
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.read().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<dyn Backend>>> {
        // The map stays consistent whatever panicked while holding the lock.
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<dyn Backend>>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The export information of a backend.
pub fn export_info(backend: &dyn Backend) -> ExportInfo {
    ExportInfo {
        size: backend.size(),
        flags: transmission_flags(backend.read_only(), backend.multi_conn()),
    }
}

/// The handshake's view of the registry for one connection: remembers the backend of the
/// last lookup, which is the one transmission starts on (the final GO or EXPORT_NAME), so an
/// export removed or replaced meanwhile cannot swap under the client.
struct Chooser<'a> {
    exports: &'a Exports,
    chosen: Mutex<Option<Arc<dyn Backend>>>,
}

impl ExportCatalog for Chooser<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let backend = self.exports.get(name)?;
        let info = export_info(&*backend);
        *self.chosen.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
        Some(info)
    }

    fn names(&self) -> Vec<String> {
        self.exports.names()
    }
}

/// Bounds of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests in flight per connection (read, being served, or reply not yet written).
    pub max_in_flight: usize,
    /// Read and write payload bytes in flight per connection; at least `MAX_PAYLOAD`.
    pub max_in_flight_bytes: usize,
    /// Connections at once per listener; more are closed on accept.
    pub max_connections: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// On shutdown, how long connections get to finish what is in flight before they are
    /// dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 64,
            max_in_flight_bytes: 128 << 20,
            max_connections: 256,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Why a connection ended badly (logged once per connection).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("handshake: {0}")]
    Handshake(CloseReason),
    #[error("handshake not finished in {0:?}")]
    HandshakeTimeout(Duration),
    #[error("{0}; closing the connection")]
    BadMagic(BadMagic),
    #[error("{0}; closing the connection")]
    Request(RequestClose),
}

/// An NBD server over a registry of exports.
#[derive(Clone)]
pub struct Server {
    exports: Arc<Exports>,
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.exports)
            .field("config", &self.config)
            .finish()
    }
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A running listener. [`shutdown`](Self::shutdown) stops accepting, lets connections finish
/// what is in flight (up to the grace period) and removes the unix socket file; dropping the
/// handle starts the same shutdown without waiting for it.
#[derive(Debug)]
pub struct ServerHandle {
    addr: ListenAddr,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ServerHandle {
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The TCP address (with the port picked if 0 was asked for).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self.addr {
            ListenAddr::Tcp(a) => Some(a),
            ListenAddr::Unix(_) => None,
        }
    }

    pub fn unix_path(&self) -> Option<&Path> {
        match &self.addr {
            ListenAddr::Unix(p) => Some(p),
            ListenAddr::Tcp(_) => None,
        }
    }

    /// Stops the listener and waits for its connections (at most the grace period).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Removes the socket file when the accept task ends, however it ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

trait Listener: Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn accept(
        &self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Read, Self::Write, String)>> + Send;
}

impl Listener for UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, _) = UnixListener::accept(self).await?;
        let (r, w) = stream.into_split();
        Ok((r, w, "unix".to_owned()))
    }
}

impl Listener for TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok((r, w, peer.to_string()))
    }
}

impl Server {
    pub fn new(exports: Arc<Exports>) -> Self {
        Self::with_config(exports, ServerConfig::default())
    }

    pub fn with_config(exports: Arc<Exports>, mut config: ServerConfig) -> Self {
        config.max_in_flight = config.max_in_flight.max(1);
        config.max_in_flight_bytes = config
            .max_in_flight_bytes
            .clamp(proto::MAX_PAYLOAD as usize, u32::MAX as usize);
        Server {
            exports,
            config: Arc::new(config),
        }
    }

    pub fn exports(&self) -> &Arc<Exports> {
        &self.exports
    }

    /// Listens on a unix socket at `path`. A stale socket file (nobody accepting on it) is
    /// replaced; the file is removed when the listener stops.
    pub async fn serve_unix(&self, path: impl AsRef<Path>) -> io::Result<ServerHandle> {
        let path = path.as_ref().to_path_buf();
        let listener = match UnixListener::bind(&path) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                match std::os::unix::net::UnixStream::connect(&path) {
                    Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(&path)?;
                        UnixListener::bind(&path)?
                    }
                    _ => return Err(e),
                }
            }
            r => r?,
        };
        let guard = RemoveOnDrop(path.clone());
        Ok(self.spawn_listener(listener, ListenAddr::Unix(path), Some(guard)))
    }

    /// Listens on TCP (`127.0.0.1:0` picks a port: see [`ServerHandle::tcp_addr`]).
    pub async fn serve_tcp(&self, addr: SocketAddr) -> io::Result<ServerHandle> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(self.spawn_listener(listener, ListenAddr::Tcp(addr), None))
    }

    fn spawn_listener<L: Listener>(
        &self,
        listener: L,
        addr: ListenAddr,
        guard: Option<RemoveOnDrop>,
    ) -> ServerHandle {
        let (stop, stop_rx) = watch::channel(false);
        let server = self.clone();
        let task = tokio::spawn(async move {
            let _guard = guard;
            server.accept_loop(listener, stop_rx).await;
        });
        ServerHandle {
            addr,
            stop,
            task: Some(task),
        }
    }

    async fn accept_loop<L: Listener>(&self, listener: L, mut stop: watch::Receiver<bool>) {
        let mut conns = JoinSet::new();
        let mut next_id = 0u64;
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((r, w, peer)) => {
                        next_id += 1;
                        if conns.len() >= self.config.max_connections {
                            warn!(peer, limit = self.config.max_connections,
                                "nbd: too many connections; closing the new one");
                            continue;
                        }
                        let server = self.clone();
                        let stop = stop.clone();
                        let span = tracing::info_span!("nbd", conn = next_id, peer, export = tracing::field::Empty);
                        conns.spawn(async move {
                            server.log_end(server.connection(r, w, Some(stop)).await);
                        }.instrument(span));
                    }
                    Err(e) => {
                        // EMFILE and the like: do not spin; the listener itself stays.
                        warn!("nbd: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        let grace = self.config.shutdown_grace;
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drain).await.is_err() {
            warn!(
                left = conns.len(),
                "nbd: connections still busy after {grace:?}; dropping them"
            );
            conns.shutdown().await;
        }
    }

    fn log_end(&self, end: Result<(), ConnError>) {
        match end {
            Ok(()) => debug!("nbd: connection closed"),
            Err(ConnError::Handshake(CloseReason::Abort)) => debug!("nbd: client aborted"),
            Err(ConnError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                debug!("nbd: client went away: {e}")
            }
            Err(e) => warn!("nbd: connection closed: {e}"),
        }
    }

    /// Serves one connection on any byte stream (split in its two halves) until the client
    /// disconnects; the listeners call this. Errors are returned, not logged.
    pub async fn serve_connection<R, W>(&self, reader: R, writer: W) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        self.connection(reader, writer, None).await
    }

    async fn connection<R, W>(
        &self,
        reader: R,
        mut writer: W,
        mut stop: Option<watch::Receiver<bool>>,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut reader = BufReader::with_capacity(128 << 10, reader);
        let timeout = self.config.handshake_timeout;
        let hs = handshake(&mut reader, &mut writer, &self.exports);
        let chosen = tokio::select! {
            _ = stopped_opt(&mut stop) => return Ok(()),
            r = tokio::time::timeout(timeout, hs) => r.map_err(|_| ConnError::HandshakeTimeout(timeout))??,
        };
        let (export, backend) = chosen;
        tracing::Span::current().record("export", export.as_str());
        debug!(export, "nbd: transmission");
        self.transmission(reader, writer, backend, stop).await
    }

    async fn transmission<R, W>(
        &self,
        mut reader: BufReader<R>,
        writer: W,
        backend: Arc<dyn Backend>,
        mut stop: Option<watch::Receiver<bool>>,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let info = export_info(&*backend);
        let count = Arc::new(Semaphore::new(self.config.max_in_flight));
        let bytes = Arc::new(Semaphore::new(self.config.max_in_flight_bytes));
        // Never full: a reply is only sent under a count permit.
        let (tx, rx) = mpsc::channel::<Pending>(self.config.max_in_flight);
        let mut writer_task = tokio::spawn(write_replies(
            BufWriter::with_capacity(128 << 10, writer),
            rx,
        ));
        let mut writer_done = None;
        let result = loop {
            let next = next_request(&mut reader, &info, &count, &bytes);
            let job = tokio::select! {
                biased;
                _ = stopped_opt(&mut stop) => break Ok(()),
                r = &mut writer_task, if writer_done.is_none() => {
                    writer_done = Some(r);
                    break Ok(());
                }
                job = next => job,
            };
            match job {
                Ok(Some(job)) => self.dispatch(job, &backend, &tx),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        // Finish what is in flight: the writer drives it to the end.
        drop(tx);
        let written = match writer_done {
            Some(r) => r,
            None => writer_task.await,
        };
        let written = written.unwrap_or_else(|e| Err(io::Error::other(e)));
        result?;
        written.map_err(ConnError::from)
    }

    /// Starts a request and hands it to the writer. The request's future is polled once
    /// here, so the backend call (for `FileBackend`, the hand-off to a blocking thread) starts
    /// before the writer task is even woken.
    fn dispatch(&self, job: Job, backend: &Arc<dyn Backend>, tx: &mpsc::Sender<Pending>) {
        let Job {
            handle,
            work,
            permits,
        } = job;
        let pending = match work {
            Work::Reply(error) => Pending::Ready(Reply::new(error, handle, None, permits)),
            Work::Run(command, data) => {
                let backend = backend.clone();
                let mut fut: BoxFuture<'static, Reply> = Box::pin(async move {
                    let run = AssertUnwindSafe(execute(&*backend, command, data)).catch_unwind();
                    let (error, data) = match run.await {
                        Ok(Ok(data)) => (0, data),
                        Ok(Err(e)) => {
                            debug!("nbd: {command:?} failed: {e}");
                            (nbd_error(&e), None)
                        }
                        Err(_) => {
                            warn!("nbd: backend panicked serving {command:?}");
                            (proto::EIO, None)
                        }
                    };
                    Reply::new(error, handle, data, permits)
                });
                // Polled again (with the writer's waker) by the writer: a wake-up meanwhile is
                // not lost, the future re-registers on that poll.
                match (&mut fut).now_or_never() {
                    Some(reply) => Pending::Ready(reply),
                    None => Pending::Running(fut),
                }
            }
        };
        // `try_send` cannot fail for lack of room (the channel holds max_in_flight and every
        // entry holds a count permit), only when the writer is gone, and then nobody would
        // read the reply anyway.
        let _ = tx.try_send(pending);
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            // The handle is gone: that is a stop too.
            return;
        }
    }
}

async fn stopped_opt(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        Some(stop) => stopped(stop).await,
        None => std::future::pending().await,
    }
}

/// Runs the handshake; the backend chosen, or why not.
async fn handshake<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &Exports,
) -> Result<(String, Arc<dyn Backend>), ConnError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hs = Handshake::new();
    let chooser = Chooser {
        exports,
        chosen: Mutex::new(None),
    };
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            writer.write_all(&out).await?;
            writer.flush().await?;
        }
        let input = reader.fill_buf().await?;
        if input.is_empty() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        let (used, status) = hs.feed(input, &chooser);
        reader.consume(used);
        match status {
            HandshakeStatus::NeedInput => continue,
            HandshakeStatus::Transmission { export, .. } => {
                writer.write_all(&hs.take_output()).await?;
                writer.flush().await?;
                let backend = chooser
                    .chosen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                let backend = backend.ok_or_else(|| io::Error::other("no backend chosen"))?;
                return Ok((export, backend));
            }
            HandshakeStatus::Close(reason) => {
                writer.write_all(&hs.take_output()).await?;
                writer.flush().await?;
                return Err(ConnError::Handshake(reason));
            }
        }
    }
}

/// The permits a request holds until its reply is written.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

enum Work {
    Run(Command, Option<Vec<u8>>),
    Reply(u32),
}

struct Job {
    handle: u64,
    work: Work,
    permits: Permits,
}

struct Reply {
    header: [u8; proto::REPLY_LEN],
    data: Option<Vec<u8>>,
    _permits: Permits,
}

impl Reply {
    fn new(error: u32, handle: u64, data: Option<Vec<u8>>, permits: Permits) -> Self {
        Reply {
            header: encode_simple_reply(error, handle),
            data: if error == 0 { data } else { None },
            _permits: permits,
        }
    }
}

/// Reads the next request (header, and a write's payload), under its permits. `None` once
/// the client disconnected (NBD_CMD_DISC, or end of stream between requests).
async fn next_request<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    info: &ExportInfo,
    count: &Arc<Semaphore>,
    bytes: &Arc<Semaphore>,
) -> Result<Option<Job>, ConnError> {
    let mut header = [0u8; REQUEST_LEN];
    match reader.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            debug!("nbd: client closed without NBD_CMD_DISC");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    }
    reader.read_exact(&mut header[1..]).await?;
    let req = match parse_request(&header) {
        Ok(req) => req,
        Err(bad) => return Err(ConnError::BadMagic(bad)),
    };
    let count = count
        .clone()
        .acquire_owned()
        .await
        .map_err(io::Error::other)?;
    let decision = decide(&req, info);
    let (work, payload) = match decision {
        Decision::Close(why) => return Err(ConnError::Request(why)),
        Decision::Execute(Command::Disconnect) => return Ok(None),
        Decision::Reject { error, drain } => {
            if drain > 0 {
                let mut take = (&mut *reader).take(u64::from(drain));
                let n = tokio::io::copy_buf(&mut take, &mut tokio::io::sink()).await?;
                if n < u64::from(drain) {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
            }
            debug!(?req, error, "nbd: request refused");
            (Work::Reply(error), 0)
        }
        Decision::Execute(command) => {
            let payload = match command {
                Command::Read { len, .. } | Command::Write { len, .. } => len,
                _ => 0,
            };
            (Work::Run(command, None), payload)
        }
    };
    let bytes = if payload > 0 {
        Some(
            bytes
                .clone()
                .acquire_many_owned(payload)
                .await
                .map_err(io::Error::other)?,
        )
    } else {
        None
    };
    let work = match work {
        Work::Run(command @ Command::Write { len, .. }, _) if len > 0 => {
            let len = len as usize;
            let mut data = Vec::with_capacity(len);
            let mut take = (&mut *reader).take(len as u64);
            while data.len() < len {
                if take.read_buf(&mut data).await? == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
            }
            Work::Run(command, Some(data))
        }
        work => work,
    };
    Ok(Some(Job {
        handle: req.handle,
        work,
        permits: Permits {
            _count: count,
            _bytes: bytes,
        },
    }))
}

/// Calls the backend; a read's data on success.
async fn execute(
    backend: &dyn Backend,
    command: Command,
    data: Option<Vec<u8>>,
) -> io::Result<Option<Vec<u8>>> {
    match command {
        Command::Read { len: 0, .. } => Ok(Some(Vec::new())),
        Command::Read { offset, len } => {
            let data = backend.read(offset, len).await?;
            if data.len() != len as usize {
                return Err(io::Error::other(format!(
                    "backend read {} bytes for {len}",
                    data.len()
                )));
            }
            Ok(Some(data))
        }
        Command::Write { len: 0, .. } | Command::Trim { len: 0, .. } => Ok(None),
        Command::WriteZeroes { len: 0, .. } => Ok(None),
        Command::Write { offset, fua, .. } => {
            let data = data.unwrap_or_default();
            backend.write(offset, data, fua).await.map(|()| None)
        }
        Command::Flush => backend.flush().await.map(|()| None),
        Command::Trim { offset, len } => backend.trim(offset, len).await.map(|()| None),
        Command::WriteZeroes { offset, len, fua } => {
            backend.write_zeroes(offset, len, fua).await.map(|()| None)
        }
        Command::Disconnect => Ok(None),
    }
}

/// A request handed to the writer: answered already, or still running.
enum Pending {
    Ready(Reply),
    Running(BoxFuture<'static, Reply>),
}

/// The one writer of a connection's replies. It also drives the requests still running
/// (so a completion wakes only this task), writes replies as they complete, flushes when
/// nothing more is ready, and releases each request's permits once its reply is written.
/// Ends when the reader is gone and every request is answered.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Pending>,
) -> io::Result<()> {
    let mut running = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(reply) = running.next(), if !running.is_empty() => {
                write_reply(&mut w, reply).await?;
            }
            pending = rx.recv(), if open => match pending {
                Some(Pending::Ready(reply)) => write_reply(&mut w, reply).await?,
                Some(Pending::Running(fut)) => running.push(fut),
                None => open = false,
            },
            else => break,
        }
        // Everything that is ready now goes out in one flush.
        loop {
            if !running.is_empty() {
                if let Some(Some(reply)) = running.next().now_or_never() {
                    write_reply(&mut w, reply).await?;
                    continue;
                }
            }
            match rx.try_recv() {
                Ok(Pending::Ready(reply)) => write_reply(&mut w, reply).await?,
                Ok(Pending::Running(fut)) => running.push(fut),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        w.flush().await?;
    }
    w.shutdown().await
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, reply: Reply) -> io::Result<()> {
    w.write_all(&reply.header).await?;
    if let Some(data) = &reply.data {
        w.write_all(data).await?;
    }
    Ok(())
}
