//! A haven node: one QUIC endpoint, the roles it runs, and the supervision tree over them.
//!
//! ```text
//! Supervisor "node/<name>"
//!  ├─ configuration      ConfigActor (if the role is on)
//!  ├─ acceptor           accepts connections; one task per stream, routed by the first request
//!  ├─ poller             NodePoll to the configuration node every 500 ms; persists assignments
//!  └─ Supervisor "process"         (if the role is on)
//!      ├─ manager        starts/stops one ship child per assigned machine
//!      └─ ship/<machine> ships the machine's cache to its master target
//! ```
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use actix::Addr;
use haven_actors::{AddChild, ChildHandle, ChildSpec, RemoveChild, Supervisor, SupervisorConfig};
use haven_cluster::{NodeRecord, ROLE_CONFIGURATION, ROLE_MASTER_TARGET, ROLE_PROCESS};
use haven_transport::{
    endpoint,
    frame::{self, MAX_CONTROL_FRAME},
    identity::PeerIdentity,
};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::watch;

use crate::{
    client,
    configuration::{self, ConfigActor, ConfigSlot, HandleRequest},
    enroll::{self, Identity},
    fsutil::{read_optional, write_atomic},
    master_target::{self, MasterState},
    process::{self, ProcessState},
    proto::{Assignment, JoinKind, NodePollReply, NodeReport, Request, Response},
};

pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long the configuration node may hold a poll with nothing new (long poll): changes
/// reach nodes and agents at once, and idle polls cost one round trip a second.
pub const LONG_POLL_MS: u32 = 1000;

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub data_dir: PathBuf,
    pub roles: Vec<String>,
    pub listen: SocketAddr,
    /// Address others use to reach this node; defaults to `listen` (0.0.0.0 → 127.0.0.1).
    pub advertise: Option<String>,
    pub name: String,
    pub join: Option<(String, PathBuf)>,
    pub capacity: u32,
    pub cache_limit_bytes: u64,
    /// A process server silent this long is declared failed (configuration role).
    pub failure_timeout: Duration,
    pub rebalance: crate::configuration::core::scaleout::RebalancePolicy,
}

/// Everything the role tasks of one node share.
pub struct NodeContext {
    pub name: String,
    pub roles: Vec<String>,
    pub data_dir: PathBuf,
    pub identity: Identity,
    pub endpoint: Endpoint,
    pub client_cfg: quinn::ClientConfig,
    pub config: Option<ConfigSlot>,
    pub process: Option<Arc<ProcessState>>,
    pub master: Option<Arc<MasterState>>,
    pub assignments: watch::Sender<Vec<Assignment>>,
    /// Signalled by the configuration role when something agents long-poll for happens.
    pub config_events: Arc<tokio::sync::Notify>,
}

impl NodeContext {
    pub fn assignment(&self, machine: &str) -> Option<Assignment> {
        self.assignments
            .borrow()
            .iter()
            .find(|a| a.machine == machine)
            .cloned()
    }
}

fn advertise_addr(opts: &NodeOptions, bound: SocketAddr) -> String {
    opts.advertise.clone().unwrap_or_else(|| {
        if bound.ip().is_unspecified() {
            format!("127.0.0.1:{}", bound.port())
        } else {
            bound.to_string()
        }
    })
}

/// Loads, bootstraps or joins, so the node has credentials. Returns them and, on a
/// configuration node, the CA.
async fn ensure_identity(
    opts: &NodeOptions,
    addr: &str,
) -> Result<
    (
        Identity,
        Option<Arc<haven_transport::identity::CertificateAuthority>>,
    ),
    String,
> {
    let is_config = opts.roles.iter().any(|r| r == ROLE_CONFIGURATION);
    let me = PeerIdentity::Node {
        name: opts.name.clone(),
        roles: opts.roles.clone(),
    };
    if is_config {
        if opts.join.is_some() {
            return Err("a configuration node bootstraps its own cluster; drop --join".into());
        }
        let record = NodeRecord {
            name: opts.name.clone(),
            roles: opts.roles.clone(),
            addr: addr.to_string(),
            capacity: opts.capacity,
            drained: false,
        };
        let (ca, meta) = configuration::bootstrap(&opts.data_dir, &record)?;
        let file = |f: &str| opts.data_dir.join(f).display().to_string();
        tracing::info!(
            cluster = %meta.cluster_id,
            "cluster ready; agent token: {} (enrols agents), node token: {} (enrols server nodes; expires 24h after bootstrap), admin token: {}",
            file(configuration::AGENT_TOKEN_FILE),
            file(configuration::NODE_TOKEN_FILE),
            file(configuration::ADMIN_TOKEN_FILE),
        );
        // A configuration node's certificate is re-issued on every start (roles may change).
        let creds = ca.issue(&me).map_err(|e| e.to_string())?;
        let identity = Identity {
            creds,
            ca: ca.cert_der.clone(),
            cluster_id: meta.cluster_id,
            config_addr: addr.to_string(),
        };
        identity.save(&opts.data_dir)?;
        return Ok((identity, Some(ca)));
    }
    if let Some(id) = Identity::load(&opts.data_dir)? {
        return Ok((id, None));
    }
    let Some((join_addr, token_file)) = &opts.join else {
        return Err("this node has no configuration role and no identity yet: pass --join ADDR --token-file FILE".into());
    };
    let token = enroll::read_join_token(token_file)?;
    let kind = JoinKind::Node {
        name: opts.name.clone(),
        roles: opts.roles.clone(),
        addr: addr.to_string(),
        capacity: opts.capacity,
    };
    let identity = enroll::join(join_addr, &token, kind).await?;
    identity.save(&opts.data_dir)?;
    tracing::info!(cluster = %identity.cluster_id, "joined the cluster at {join_addr}");
    Ok((identity, None))
}

/// Runs a node until SIGINT/SIGTERM. Must be called inside an actix `System` whose tokio
/// runtime is multi-threaded (see `haven_actors` docs).
pub async fn run(opts: NodeOptions) -> Result<(), String> {
    crate::faults::check()?;
    crate::fsutil::create_private_dir(&opts.data_dir)
        .map_err(|e| format!("create {}: {e}", opts.data_dir.display()))?;
    // Bind first: the advertised address must be known before joining.
    let probe = std::net::UdpSocket::bind(opts.listen)
        .map_err(|e| format!("cannot bind {}: {e}", opts.listen))?;
    let bound = probe.local_addr().map_err(|e| e.to_string())?;
    drop(probe);
    let addr = advertise_addr(&opts, bound);
    let (identity, ca) = ensure_identity(&opts, &addr).await?;
    let server_cfg =
        endpoint::server_config(&identity.creds, &identity.ca).map_err(|e| e.to_string())?;
    let ep = endpoint::server_endpoint(bound, server_cfg).map_err(|e| e.to_string())?;
    let client_cfg = identity.client_config()?;
    let has = |r: &str| opts.roles.iter().any(|x| x == r);
    let assignments = watch::Sender::new(load_assignments(&opts.data_dir));
    let ctx = Arc::new(NodeContext {
        name: opts.name.clone(),
        roles: opts.roles.clone(),
        data_dir: opts.data_dir.clone(),
        identity,
        endpoint: ep.clone(),
        client_cfg,
        config: has(ROLE_CONFIGURATION).then(ConfigSlot::default),
        process: has(ROLE_PROCESS)
            .then(|| Arc::new(ProcessState::new(&opts.data_dir, opts.cache_limit_bytes))),
        master: match has(ROLE_MASTER_TARGET) {
            true => {
                let mt = MasterState::new(&opts.data_dir);
                mt.recover()?;
                Some(Arc::new(mt))
            }
            false => None,
        },
        assignments,
        config_events: Arc::new(tokio::sync::Notify::new()),
    });
    tracing::info!(node = %opts.name, roles = ?opts.roles, %addr, "node listening on {bound}");

    let root = Supervisor::start_root(SupervisorConfig::new(format!("node/{}", opts.name)));
    let mut children = vec![];
    if let (Some(slot), Some(ca)) = (ctx.config.clone(), ca) {
        let dir = opts.data_dir.clone();
        let events = ctx.config_events.clone();
        let (failure_timeout, policy) = (opts.failure_timeout, opts.rebalance.clone());
        children.push(ChildSpec::new(
            ROLE_CONFIGURATION,
            move |mut guard| match ConfigActor::load(
                &dir,
                ca.clone(),
                failure_timeout,
                policy.clone(),
            ) {
                Ok(parts) => {
                    let addr = actix::Actor::start(parts.into_actor(guard, events.clone()));
                    slot.set(Some(addr.clone()));
                    ChildHandle::actor(addr)
                }
                Err(e) => {
                    guard.fail(e);
                    ChildHandle::none()
                }
            },
        ));
    }
    let c = ctx.clone();
    children.push(ChildSpec::task("acceptor", move |_| accept_loop(c.clone())));
    // Every node reports, so every node (a configuration-only one too) shows as alive.
    let c = ctx.clone();
    children.push(ChildSpec::task("poller", move |_| poll_loop(c.clone())));
    if let Some(ps) = ctx.process.clone() {
        let sup_cfg = SupervisorConfig::new("process");
        let c = ctx.clone();
        let manager = ChildSpec::task("manager", move |tc| {
            process_manager(c.clone(), ps.clone(), tc.supervisor)
        });
        children.push(Supervisor::child_spec(sup_cfg, vec![manager]));
    }
    for spec in children {
        root.send(AddChild(spec))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let outcome = serve_until_signal(&root).await;
    tracing::info!("shutting down");
    ep.close(0u32.into(), b"node shutting down");
    outcome
}

/// Waits for SIGINT/SIGTERM. Returns an error if the root supervisor gave up first (its restart
/// budget ran out): the process then exits non-zero, so a service manager restarts it, rather
/// than staying up with nothing running inside.
pub(crate) async fn serve_until_signal(root: &Addr<Supervisor>) -> Result<(), String> {
    let gave_up = async {
        while root.connected() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = wait_for_signal() => Ok(()),
        _ = gave_up => Err("the root supervisor gave up (restart budget exhausted; see the errors above); exiting so that a service manager restarts the process".into()),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn assignments_path(dir: &Path) -> PathBuf {
    dir.join("assignments")
}

fn load_assignments(dir: &Path) -> Vec<Assignment> {
    match read_optional(&assignments_path(dir)) {
        Ok(Some(b)) => haven_transport::codec::decode(&b).unwrap_or_else(|e| {
            tracing::warn!("ignoring unreadable assignments file: {e}");
            vec![]
        }),
        Ok(None) => vec![],
        Err(e) => {
            tracing::warn!("cannot read assignments: {e}");
            vec![]
        }
    }
}

async fn accept_loop(ctx: Arc<NodeContext>) -> Result<(), String> {
    while let Some(incoming) = ctx.endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, "connection handshake failed: {e}");
                    return;
                }
            };
            let who = match endpoint::accept_hello(&conn).await {
                Ok((_, who)) => who,
                Err(e) => {
                    tracing::warn!(%remote, "connection refused: {e}");
                    return;
                }
            };
            serve_connection(ctx, conn, who).await;
        });
    }
    Err("endpoint closed".into())
}

async fn serve_connection(ctx: Arc<NodeContext>, conn: Connection, who: Option<PeerIdentity>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (ctx, who, conn) = (ctx.clone(), who.clone(), conn.clone());
        tokio::spawn(async move {
            let peer = who
                .as_ref()
                .map(|w| w.common_name())
                .unwrap_or_else(|| "anonymous".into());
            if let Err(e) = serve_stream(ctx, conn, who, send, recv).await {
                tracing::warn!(%peer, "stream ended: {e}");
            }
        });
    }
}

async fn serve_stream(
    ctx: Arc<NodeContext>,
    conn: Connection,
    who: Option<PeerIdentity>,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), String> {
    let req: Request = frame::expect_msg(&mut recv, MAX_CONTROL_FRAME)
        .await
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = match req {
        Request::OpenStream(open) => {
            return process::ingest::ingest(ctx, conn, who, open, send, recv).await
        }
        Request::OpenShip(open) => {
            return master_target::apply_stream(ctx, who, open, send, recv).await
        }
        Request::Probe => Response::Refused {
            reason: "probes go to agents".into(),
        },
        request => match ctx.config.as_ref().map(|s| s.get()) {
            None => Response::Refused {
                reason: format!("node {} has no configuration role", ctx.name),
            },
            Some(None) => Response::Refused {
                reason: "the configuration service is restarting; retry".into(),
            },
            Some(Some(addr)) => ask_or_hold(&ctx, &addr, who, request).await,
        },
    };
    // A client that gave up on its request (an agent cutting a long poll short) is no error.
    if let Err(e) = frame::send_msg(&mut send, &resp).await {
        tracing::debug!("control reply not delivered: {e}");
    }
    let _ = send.finish();
    Ok(())
}

/// Answers a request; an agent's long poll with nothing to say is held until a
/// configuration event or its `wait_ms`, then answered afresh.
async fn ask_or_hold(
    ctx: &NodeContext,
    addr: &Addr<ConfigActor>,
    who: Option<PeerIdentity>,
    request: Request,
) -> Response {
    const HOLD_MAX: Duration = Duration::from_secs(5);
    let wait = match &request {
        Request::AgentPoll(r) => Duration::from_millis(r.wait_ms as u64).min(HOLD_MAX),
        Request::NodePoll(r) => Duration::from_millis(r.wait_ms as u64).min(HOLD_MAX),
        _ => Duration::ZERO,
    };
    // Registered before the first ask, so an event between the ask and the wait is not lost.
    let event = ctx.config_events.notified();
    tokio::pin!(event);
    event.as_mut().enable();
    let again = (!wait.is_zero()).then(|| request.clone());
    let first = ask(addr, who.clone(), request).await;
    // Hold only if the answer would change nothing for the caller.
    let idle = match (&again, &first) {
        (Some(Request::AgentPoll(q)), Response::AgentPoll(r)) => {
            r.sync_request.is_none() && r.generation.0 == q.known_generation
        }
        (Some(Request::NodePoll(q)), Response::NodePoll(r)) => q.version == r.version,
        _ => false,
    };
    match again {
        Some(mut req) if idle => {
            let _ = tokio::time::timeout(wait, event).await;
            match &mut req {
                Request::AgentPoll(r) => r.held = true,
                Request::NodePoll(r) => r.held = true,
                _ => {}
            }
            ask(addr, who, req).await
        }
        _ => first,
    }
}

async fn ask(addr: &Addr<ConfigActor>, who: Option<PeerIdentity>, request: Request) -> Response {
    match addr.send(HandleRequest { who, request }).await {
        Ok(r) => r,
        Err(e) => Response::Refused {
            reason: format!("configuration service unavailable: {e}"),
        },
    }
}

/// Reports to the configuration node and keeps this node's assignments current. While the
/// configuration node is unreachable the last assignments stay in force.
async fn poll_loop(ctx: Arc<NodeContext>) -> Result<(), String> {
    let addr = ctx.identity.config_socket_addr()?;
    let mut conn: Option<Connection> = None;
    let mut reachable = true;
    let mut version = 0u64;
    // Retirements acted on, reported until the configuration node stops listing them.
    let mut retired_done: Vec<String> = vec![];
    loop {
        let report = NodeReport {
            name: ctx.name.clone(),
            machines: ctx
                .process
                .iter()
                .flat_map(|p| p.reports())
                .chain(ctx.master.iter().flat_map(|m| m.reports()))
                .collect(),
            version,
            wait_ms: LONG_POLL_MS,
            held: false,
            retired_done: retired_done.clone(),
        };
        if conn.as_ref().is_some_and(|c| c.close_reason().is_some()) {
            conn = None;
        }
        let result = async {
            if conn.is_none() {
                conn = Some(
                    client::connect(&ctx.endpoint, ctx.client_cfg.clone(), addr, &ctx.name)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            let c = conn.as_ref().expect("set above");
            let timeout = Duration::from_secs(5) + Duration::from_millis(LONG_POLL_MS as u64);
            client::call(c, &Request::NodePoll(report), timeout)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(Response::NodePoll(NodePollReply {
                assignments,
                version: v,
                retired,
            })) => {
                version = v;
                if !reachable {
                    tracing::info!("configuration node reachable again");
                    reachable = true;
                }
                // Before the assignments: a forgotten machine's replica is moved aside before
                // a new machine of the same name may be assigned here.
                retired_done.retain(|m| retired.iter().any(|r| &r.machine == m));
                for r in &retired {
                    if retired_done.contains(&r.machine) {
                        continue;
                    }
                    match retire(&ctx, r).await {
                        Ok(()) => retired_done.push(r.machine.clone()),
                        Err(e) => {
                            tracing::warn!(machine = %r.machine, "cannot act on the forgotten machine yet: {e}")
                        }
                    }
                }
                if *ctx.assignments.borrow() != assignments {
                    let bytes =
                        haven_transport::codec::encode(&assignments).map_err(|e| e.to_string())?;
                    let path = assignments_path(&ctx.data_dir);
                    if let Err(e) = write_atomic(&path, &bytes) {
                        tracing::error!("cannot persist assignments to {}: {e}", path.display());
                    }
                    configuration::restrict(&path);
                    ctx.assignments.send_replace(assignments);
                }
            }
            Ok(other) => tracing::warn!("unexpected poll reply: {other:?}"),
            Err(e) => {
                conn = None;
                if reachable {
                    tracing::warn!("configuration node unreachable ({e}); replication continues on the last assignments");
                    reachable = false;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
        }
        // The server holds idle polls; this floor only bounds the rate when it answers at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Acts on a forgotten machine: the master target moves its replica aside (or deletes it),
/// the process server drops its cache.
async fn retire(ctx: &Arc<NodeContext>, r: &crate::proto::Retirement) -> Result<(), String> {
    if ctx.assignment(&r.machine).is_some() {
        return Err("it is still assigned here".into());
    }
    if let Some(mt) = ctx.master.clone() {
        let r = r.clone();
        tokio::task::spawn_blocking(move || mt.retire(&r.machine, r.epoch, r.delete_replica))
            .await
            .map_err(|e| e.to_string())??;
    }
    if let Some(ps) = ctx.process.clone() {
        let machine = r.machine.clone();
        tokio::task::spawn_blocking(move || ps.retire(&machine))
            .await
            .map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Keeps one `ship/<machine>` child per machine assigned to this process server.
async fn process_manager(
    ctx: Arc<NodeContext>,
    ps: Arc<ProcessState>,
    sup: Option<Addr<Supervisor>>,
) -> Result<(), String> {
    let sup = sup.ok_or("the process manager must run under a supervisor")?;
    let mut rx = ctx.assignments.subscribe();
    let mut running: std::collections::HashMap<String, haven_cluster::Epoch> = Default::default();
    loop {
        let mine: Vec<Assignment> = rx
            .borrow_and_update()
            .iter()
            .filter(|a| a.process_server == ctx.name)
            .cloned()
            .collect();
        for a in &mine {
            let ps2 = ps.clone();
            let a2 = a.clone();
            let m = tokio::task::spawn_blocking(move || ps2.machine(&a2))
                .await
                .map_err(|e| e.to_string())??;
            if running.get(&a.machine) == Some(&a.epoch) {
                continue;
            }
            let name = format!("ship/{}", a.machine);
            // A ship child may still be draining (or be of an old epoch): replace it.
            let _ = sup.send(RemoveChild(name.clone())).await;
            running.remove(&a.machine);
            let (c, p) = (ctx.clone(), ps.clone());
            let spec = ChildSpec::task(name, move |tc| {
                // Supervisor restarts; the child counts its own reconnects to the same total.
                if tc.restarts > 0 {
                    m.ship_restarts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                process::ship::ship(c.clone(), p.clone(), m.clone())
            });
            sup.send(AddChild(spec))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            running.insert(a.machine.clone(), a.epoch);
        }
        // A machine moved away drains: its ship child ships what is cached, then drops it.
        let gone: Vec<String> = running
            .keys()
            .filter(|k| !mine.iter().any(|a| &a.machine == *k))
            .cloned()
            .collect();
        for machine in gone {
            running.remove(&machine);
            match ps.machines.get(&machine).map(|m| m.clone()) {
                Some(m) => {
                    tracing::info!(%machine, "no longer assigned here; draining its cache to the master target");
                    m.draining.store(true, std::sync::atomic::Ordering::SeqCst);
                    m.assignment.send_modify(|_| {}); // wake the ship child
                }
                None => {
                    let _ = sup.send(RemoveChild(format!("ship/{machine}"))).await;
                }
            }
        }
        rx.changed()
            .await
            .map_err(|_| "assignments closed".to_string())?;
    }
}
