//! A haven node: the composition root. It loads or obtains the node's identity, opens the
//! QUIC endpoint, builds the roles it runs, routes every incoming stream to the role that
//! serves it, and supervises them all. Nothing imports this module; the roles see the node
//! only through [`NodeLink`](crate::link::NodeLink).
//!
//! ```text
//! Supervisor "node/<name>"
//!  ├─ configuration       ConfigActor (actix actor; if the role is on)
//!  ├─ acceptor            task: accepts connections; one task per stream, routed by its first request
//!  ├─ poller              task: long-polls the configuration node; persists assignments
//!  ├─ Supervisor "process"         (if the role is on)
//!  │   ├─ manager         task: one ship child per assigned machine
//!  │   └─ ship/<machine>  task: ships the machine's cache to its master target (ShipCore)
//!  └─ Supervisor "master-target"   (if the role is on)
//!      ├─ manager         task: one replica child per assigned machine
//!      └─ replica/<machine> task: the replica's one owner (ApplyCore + Replica)
//! ```
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use haven_actors::{AddChild, ChildSpec, Supervisor, SupervisorConfig, TaskError};
use haven_cluster::{NodeRecord, ROLE_CONFIGURATION, ROLE_MASTER_TARGET, ROLE_PROCESS};
use haven_transport::{
    endpoint,
    frame::{self, MAX_CONTROL_FRAME},
    identity::{CertificateAuthority, PeerIdentity},
};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::watch;
use tracing::Instrument;

use crate::{
    configuration::{self, ConfigService},
    enroll::{self, Identity},
    error::StreamError,
    fsutil::{read_optional, write_private},
    link::{Dialer, NodeLink},
    master_target::MasterService,
    poll::{LongPoll, LONG_POLL_MS, POLL_INTERVAL},
    process::ProcessService,
    proto::{Assignment, JoinKind, NodePollReply, NodeReport, Request, Response, Retirement},
};

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub data_dir: PathBuf,
    /// The site the node runs at (`--site`; placement keeps a machine's process server at its
    /// site and its master target at another).
    pub site: String,
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
    /// While reprotected, a machine takes a reverse pass this often (configuration role).
    pub reverse_every: Duration,
    pub rebalance: crate::configuration::core::scaleout::RebalancePolicy,
}

/// The roles this node runs, as the router and the poller use them.
struct Node {
    link: Arc<NodeLink>,
    data_dir: PathBuf,
    identity: Identity,
    endpoint: Endpoint,
    assignments: watch::Sender<Vec<Assignment>>,
    config: Option<ConfigService>,
    process: Option<ProcessService>,
    master: Option<MasterService>,
    /// `--site`, reported in every poll (a restart may change it).
    site: String,
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
) -> anyhow::Result<(Identity, Option<Arc<CertificateAuthority>>)> {
    let is_config = opts.roles.iter().any(|r| r == ROLE_CONFIGURATION);
    let me = PeerIdentity::Node {
        name: opts.name.clone(),
        roles: opts.roles.clone(),
    };
    if is_config {
        if opts.join.is_some() {
            anyhow::bail!("a configuration node bootstraps its own cluster; drop --join");
        }
        let record = NodeRecord {
            name: opts.name.clone(),
            roles: opts.roles.clone(),
            addr: addr.to_string(),
            capacity: opts.capacity,
            drained: false,
            site: opts.site.clone(),
        };
        let (ca, meta) = configuration::bootstrap(&opts.data_dir, &record)
            .map_err(anyhow::Error::msg)
            .context("bootstrap the cluster")?;
        let file = |f: &str| opts.data_dir.join(f).display().to_string();
        tracing::info!(
            cluster = %meta.cluster_id,
            "cluster ready; agent token: {} (enrols agents), node token: {} (enrols server nodes; expires 24h after bootstrap), admin token: {}",
            file(configuration::AGENT_TOKEN_FILE),
            file(configuration::NODE_TOKEN_FILE),
            file(configuration::ADMIN_TOKEN_FILE),
        );
        // A configuration node's certificate is re-issued on every start (roles may change).
        let creds = ca.issue(&me).context("issue this node's certificate")?;
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
        anyhow::bail!("this node has no configuration role and no identity yet: pass --join ADDR --token-file FILE");
    };
    let token = enroll::read_join_token(token_file)?;
    let kind = JoinKind::Node {
        name: opts.name.clone(),
        roles: opts.roles.clone(),
        addr: addr.to_string(),
        capacity: opts.capacity,
        site: opts.site.clone(),
    };
    let identity = enroll::join(join_addr, &token, kind).await?;
    identity.save(&opts.data_dir)?;
    tracing::info!(cluster = %identity.cluster_id, "joined the cluster at {join_addr}");
    Ok((identity, None))
}

/// Runs a node until SIGINT/SIGTERM. Must be called inside an actix `System` whose tokio
/// runtime is multi-threaded (see `haven_actors` docs).
pub async fn run(opts: NodeOptions) -> anyhow::Result<()> {
    crate::faults::check().map_err(anyhow::Error::msg)?;
    crate::fsutil::create_private_dir(&opts.data_dir)
        .with_context(|| format!("create {}", opts.data_dir.display()))?;
    // Bind first: the advertised address must be known before joining.
    let probe = std::net::UdpSocket::bind(opts.listen)
        .with_context(|| format!("cannot bind {}", opts.listen))?;
    let bound = probe.local_addr()?;
    drop(probe);
    let addr = advertise_addr(&opts, bound);
    let (identity, ca) = ensure_identity(&opts, &addr).await?;
    let server_cfg = endpoint::server_config(&identity.creds, &identity.ca)?;
    let ep = endpoint::server_endpoint(bound, server_cfg)?;
    let dialer = Dialer::new(ep.clone(), identity.client_config()?);
    let has = |r: &str| opts.roles.iter().any(|x| x == r);
    let assignments = watch::Sender::new(load_assignments(&opts.data_dir));
    let link = NodeLink::new(opts.name.clone(), dialer, assignments.subscribe());
    let master = match has(ROLE_MASTER_TARGET) {
        true => {
            let svc = MasterService::new(&opts.data_dir, link.clone());
            svc.state
                .recover()
                .context("roll the replicas back to their durable cursors")?;
            Some(svc)
        }
        false => None,
    };
    let node = Arc::new(Node {
        link: link.clone(),
        data_dir: opts.data_dir.clone(),
        identity,
        endpoint: ep.clone(),
        assignments,
        config: has(ROLE_CONFIGURATION).then(|| ConfigService::new(link.dialer.clone())),
        process: has(ROLE_PROCESS)
            .then(|| ProcessService::new(&opts.data_dir, opts.cache_limit_bytes, link.clone())),
        master,
        site: opts.site.clone(),
    });
    tracing::info!(node = %opts.name, roles = ?opts.roles, %addr, "node listening on {bound}");

    let root = Supervisor::start_root(SupervisorConfig::new(format!("node/{}", opts.name)));
    let mut children = vec![];
    if let (Some(svc), Some(ca)) = (&node.config, ca) {
        children.push(svc.child_spec(
            opts.data_dir.clone(),
            ca,
            opts.failure_timeout,
            opts.reverse_every,
            opts.rebalance.clone(),
        ));
    }
    let n = node.clone();
    children.push(ChildSpec::task("acceptor", move |_| accept_loop(n.clone())));
    // Every node reports, so every node (a configuration-only one too) shows as alive.
    let n = node.clone();
    children.push(ChildSpec::task("poller", move |_| poll_loop(n.clone())));
    if let Some(ps) = &node.process {
        children.push(ps.child_spec());
    }
    if let Some(mt) = &node.master {
        children.push(mt.child_spec());
    }
    for spec in children {
        root.send(AddChild(spec))
            .await
            .context("start the node's supervision tree")?
            .context("start the node's supervision tree")?;
    }
    let outcome = haven_actors::serve_until_signal(&root).await;
    tracing::info!("shutting down");
    ep.close(0u32.into(), b"node shutting down");
    Ok(outcome?)
}

fn assignments_path(dir: &Path) -> PathBuf {
    dir.join("assignments")
}

/// The assignments file's format version (checked on read). Version 0 is the bare list of
/// older nodes.
const ASSIGNMENTS_VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct AssignmentsFile {
    version: u32,
    assignments: Vec<Assignment>,
}

/// The last assignments this node was given, so its streams resume at once after a restart.
/// They are a cache of the configuration node's truth (the next poll replaces them), so an
/// unreadable or newer file is logged and ignored, never fatal.
fn load_assignments(dir: &Path) -> Vec<Assignment> {
    let path = assignments_path(dir);
    let bytes = match read_optional(&path) {
        Ok(Some(b)) => b,
        Ok(None) => return vec![],
        Err(e) => {
            tracing::warn!("cannot read {}: {e}", path.display());
            return vec![];
        }
    };
    match decode_assignments(&bytes) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", path.display());
            vec![]
        }
    }
}

fn decode_assignments(bytes: &[u8]) -> Result<Vec<Assignment>, String> {
    use haven_transport::codec::decode;
    match decode::<AssignmentsFile>(bytes) {
        Ok(f) if f.version <= ASSIGNMENTS_VERSION => Ok(f.assignments),
        Ok(f) => Err(format!(
            "format version {} is newer than this haven's {ASSIGNMENTS_VERSION}",
            f.version
        )),
        Err(e) => decode::<Vec<Assignment>>(bytes).map_err(|_| format!("unreadable: {e}")),
    }
}

async fn accept_loop(node: Arc<Node>) -> Result<(), TaskError> {
    while let Some(incoming) = node.endpoint.accept().await {
        let node = node.clone();
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
            serve_connection(node, conn, who).await;
        });
    }
    Err(TaskError::fatal("the endpoint closed"))
}

async fn serve_connection(node: Arc<Node>, conn: Connection, who: Option<PeerIdentity>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (node, who, conn) = (node.clone(), who.clone(), conn.clone());
        tokio::spawn(async move {
            let peer = who
                .as_ref()
                .map(|w| w.common_name())
                .unwrap_or_else(|| "anonymous".into());
            if let Err(e) = route(&node, conn, who, send, recv).await {
                tracing::warn!(%peer, "stream ended: {e}");
            }
        });
    }
}

/// The router: a stream's first request says which role serves it.
async fn route(
    node: &Node,
    conn: Connection,
    who: Option<PeerIdentity>,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), StreamError> {
    let req: Request = frame::expect_msg(&mut recv, MAX_CONTROL_FRAME)
        .await
        .map_err(|e| StreamError::peer("bad request", e))?;
    let resp = match req {
        Request::OpenStream(open) => match &node.process {
            Some(ps) => {
                let span = tracing::info_span!("ingest", node = %node.link.name, role = ROLE_PROCESS, machine = %open.machine, generation = open.generation.0);
                return crate::process::ingest::ingest(ps, conn, who, open, send, recv)
                    .instrument(span)
                    .await;
            }
            None => not_here(&node.link.name, ROLE_PROCESS),
        },
        Request::OpenShip(open) => match &node.master {
            Some(mt) => {
                let span = tracing::info_span!("apply", node = %node.link.name, role = ROLE_MASTER_TARGET, machine = %open.machine, generation = open.generation.0);
                return crate::master_target::apply::serve(mt, who, open, send, recv)
                    .instrument(span)
                    .await;
            }
            None => not_here(&node.link.name, ROLE_MASTER_TARGET),
        },
        Request::Probe => Response::Refused {
            reason: "probes go to agents".into(),
        },
        Request::Recovery(request) => match (&node.master, &who) {
            (Some(mt), Some(PeerIdentity::Node { roles, .. }))
                if roles.iter().any(|r| r == ROLE_CONFIGURATION) =>
            {
                mt.recovery(request).await
            }
            (Some(_), _) => Response::Refused {
                reason: "recovery requests are taken from configuration nodes only".into(),
            },
            (None, _) => not_here(&node.link.name, ROLE_MASTER_TARGET),
        },
        req @ (Request::ReverseDiff(_) | Request::ReverseMark(_) | Request::ReverseChanged(_)) => {
            match (&node.master, &who) {
                (Some(mt), Some(PeerIdentity::Agent { machine, enrolment }))
                    if req.reverse_machine() == Some(machine.as_str()) =>
                {
                    mt.reverse(enrolment, req).await
                }
                (Some(_), _) => Response::Refused {
                    reason: "the reverse path is asked by the machine's own agent only".into(),
                },
                (None, _) => not_here(&node.link.name, ROLE_MASTER_TARGET),
            }
        }
        request => match &node.config {
            Some(cfg) => cfg.handle(who, request).await,
            None => not_here(&node.link.name, ROLE_CONFIGURATION),
        },
    };
    // A client that gave up on its request (an agent cutting a long poll short) is no error.
    if let Err(e) = frame::send_msg(&mut send, &resp).await {
        tracing::debug!("control reply not delivered: {e}");
    }
    let _ = send.finish();
    Ok(())
}

/// The one answer to a request for a role this node does not run.
fn not_here(node: &str, role: &str) -> Response {
    Response::Refused {
        reason: format!("node {node} has no {role} role"),
    }
}

/// Reports to the configuration node and keeps this node's assignments current. While the
/// configuration node is unreachable the last assignments stay in force.
async fn poll_loop(node: Arc<Node>) -> Result<(), TaskError> {
    let addr = node
        .identity
        .config_socket_addr()
        .map_err(TaskError::fatal)?;
    let mut poll = LongPoll::new(node.link.dialer.clone(), addr, node.link.name.clone());
    let mut version = 0u64;
    // Retirements acted on, reported until the configuration node stops listing them.
    let mut retired_done: Vec<String> = vec![];
    loop {
        let report = NodeReport {
            name: node.link.name.clone(),
            machines: node
                .process
                .iter()
                .flat_map(|p| p.state.reports())
                .chain(node.master.iter().flat_map(|m| m.state.reports()))
                .collect(),
            version,
            wait_ms: LONG_POLL_MS,
            held: false,
            retired_done: retired_done.clone(),
            site: Some(node.site.clone()),
        };
        match poll.call(&Request::NodePoll(report)).await {
            Ok(Response::NodePoll(NodePollReply {
                assignments,
                version: v,
                retired,
            })) => {
                version = v;
                // Before the assignments: a forgotten machine's replica is moved aside before
                // a new machine of the same name may be assigned here.
                retired_done.retain(|m| retired.iter().any(|r| &r.machine == m));
                for r in &retired {
                    if retired_done.contains(&r.machine) {
                        continue;
                    }
                    match retire(&node, r).await {
                        Ok(()) => retired_done.push(r.machine.clone()),
                        Err(e) => {
                            tracing::warn!(machine = %r.machine, "cannot act on the forgotten machine yet: {e}")
                        }
                    }
                }
                if *node.assignments.borrow() != assignments {
                    persist_assignments(&node.data_dir, &assignments);
                    node.assignments.send_replace(assignments);
                }
            }
            Ok(other) => tracing::warn!("unexpected poll reply: {other:?}"),
            Err(e) => {
                tracing::debug!("poll failed: {e}");
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
        }
        // The server holds idle polls; this floor only bounds the rate when it answers at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The assignments carry the machines' data keys: owner-only from creation.
fn persist_assignments(dir: &Path, assignments: &[Assignment]) {
    let path = assignments_path(dir);
    let file = AssignmentsFile {
        version: ASSIGNMENTS_VERSION,
        assignments: assignments.to_vec(),
    };
    let written = haven_transport::codec::encode(&file)
        .map_err(|e| e.to_string())
        .and_then(|bytes| write_private(&path, &bytes).map_err(|e| e.to_string()));
    if let Err(e) = written {
        tracing::error!("cannot persist assignments to {}: {e}", path.display());
    }
}

/// Acts on a forgotten machine: the master target moves its replica aside (or deletes it),
/// the process server drops its cache.
async fn retire(node: &Arc<Node>, r: &Retirement) -> Result<(), String> {
    if node.link.assignment(&r.machine).is_some() {
        return Err("it is still assigned here".into());
    }
    if let Some(mt) = node.master.clone() {
        let r = r.clone();
        tokio::task::spawn_blocking(move || mt.state.retire(&r.machine, r.epoch, r.delete_replica))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    if let Some(ps) = node.process.clone() {
        let machine = r.machine.clone();
        tokio::task::spawn_blocking(move || ps.state.retire(&machine))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_cluster::{DiskInfo, Epoch, Generation};

    fn assignment() -> Assignment {
        Assignment {
            machine: "m1".into(),
            epoch: Epoch(2),
            generation: Generation(5),
            disks: vec![DiskInfo::new("d0", 1 << 20)],
            process_server: "ps".into(),
            master_target: "mt".into(),
            master_target_addr: "127.0.0.1:1".into(),
            data_key: serde_bytes::ByteBuf::from(vec![7; 32]),
            enrolment: "e1".into(),
            policy: Default::default(),
            failover: None,
            failbacks: 0,
        }
    }

    #[test]
    fn assignments_file_round_trips_and_checks_its_version() {
        let dir = tempfile::tempdir().unwrap();
        persist_assignments(dir.path(), &[assignment()]);
        assert_eq!(load_assignments(dir.path()), vec![assignment()]);
        // Owner-only: the file holds data keys.
        let mode = std::fs::metadata(assignments_path(dir.path()))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        // The bare list an older node wrote still loads.
        let bare = haven_transport::codec::encode(&vec![assignment()]).unwrap();
        assert_eq!(decode_assignments(&bare).unwrap(), vec![assignment()]);

        // A newer format is refused with the reason, not misread.
        let newer = haven_transport::codec::encode(&AssignmentsFile {
            version: ASSIGNMENTS_VERSION + 1,
            assignments: vec![assignment()],
        })
        .unwrap();
        let err = decode_assignments(&newer).unwrap_err();
        assert!(err.contains("newer"), "{err}");
        std::fs::write(assignments_path(dir.path()), &newer).unwrap();
        assert!(load_assignments(dir.path()).is_empty());

        assert!(decode_assignments(b"\xc1garbage").is_err());
    }
}
