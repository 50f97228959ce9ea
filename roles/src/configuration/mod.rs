//! The configuration role: cluster identity and CA, inventory, placement, and the admin API.
//!
//! [`ConfigActor`] owns the protocol core ([`core::ConfigCore`]), the redb store and the CA.
//! Connection tasks send it one [`HandleRequest`] per control stream. The data path never
//! waits on it: nodes and agents keep their last assignment when it is down.
pub mod core;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::slot::Slot;
use actix::prelude::*;
use haven_actors::{ChildGuard, ChildHandle, ChildSpec, Shutdown};
use haven_cluster::{
    store::{StateStore, Store},
    ClusterMeta,
};
use haven_transport::{
    identity::{CertificateAuthority, PeerIdentity, Token, TokenKind},
    seal::DataKey,
};

use self::core::{ConfigCore, Persist};
use crate::fsutil::unix_ms;
use crate::link::Dialer;
use crate::proto::{AdminCommand, AdminReply, JoinReply, RecoveryRequest, Request, Response};

pub type ConfigSlot = Slot<Addr<ConfigActor>>;

/// The configuration role as the node's router sees it: the (restartable) actor's address,
/// and the wake-up for held long polls.
#[derive(Clone)]
pub struct ConfigService {
    slot: ConfigSlot,
    /// Signalled by the actor when something agents and nodes long-poll for happens.
    events: Arc<tokio::sync::Notify>,
    /// Reaches master targets, to forward recovery commands.
    dialer: Dialer,
}

/// Longest a forwarded recovery command may take at the master target (writing a view as
/// images with `--export` is the slow one).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(600);

impl ConfigService {
    pub fn new(dialer: Dialer) -> Self {
        Self {
            slot: ConfigSlot::default(),
            events: Arc::default(),
            dialer,
        }
    }

    /// Sends a recovery command to the master target the core named, and answers with its
    /// reply.
    async fn forward(&self, node: &str, addr: &str, request: RecoveryRequest) -> Response {
        let reply = async {
            let conn = self.dialer.connect(addr, node).await?;
            crate::client::call(&conn, &Request::Recovery(request), FORWARD_TIMEOUT).await
        };
        match reply.await {
            Ok(Response::Recovery(r)) => Response::Admin(AdminReply::Recovery(r)),
            Ok(Response::Refused { reason }) => Response::Refused {
                reason: format!("master target {node}: {reason}"),
            },
            Ok(other) => Response::Refused {
                reason: format!("master target {node} answered {other:?}"),
            },
            Err(e) => Response::Refused {
                reason: format!("master target {node} at {addr} is unreachable: {e}"),
            },
        }
    }

    /// The `configuration` child: the [`ConfigActor`], loaded from the store at every start.
    pub fn child_spec(
        &self,
        data_dir: PathBuf,
        ca: Arc<CertificateAuthority>,
        failure_timeout: Duration,
        reverse_every: Duration,
        policy: core::scaleout::RebalancePolicy,
    ) -> ChildSpec {
        let (slot, events) = (self.slot.clone(), self.events.clone());
        ChildSpec::new(
            haven_cluster::ROLE_CONFIGURATION,
            move |mut guard| match ConfigActor::load(
                &data_dir,
                ca.clone(),
                failure_timeout,
                reverse_every,
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
        )
    }

    /// Answers a control request; an agent's or node's long poll with nothing to say is held
    /// until a configuration event or its `wait_ms`, then answered afresh.
    pub async fn handle(&self, who: Option<PeerIdentity>, request: Request) -> Response {
        let Some(addr) = self.slot.get() else {
            return Response::Refused {
                reason: "the configuration service is restarting; retry".into(),
            };
        };
        const HOLD_MAX: Duration = Duration::from_secs(5);
        let wait = match &request {
            Request::AgentPoll(r) => Duration::from_millis(r.wait_ms as u64).min(HOLD_MAX),
            Request::NodePoll(r) => Duration::from_millis(r.wait_ms as u64).min(HOLD_MAX),
            _ => Duration::ZERO,
        };
        // Registered before the first ask, so an event between the ask and the wait is not lost.
        let event = self.events.notified();
        tokio::pin!(event);
        event.as_mut().enable();
        let again = (!wait.is_zero()).then(|| request.clone());
        let first = ask(&addr, who.clone(), request).await;
        if let Response::Admin(AdminReply::Forward {
            node,
            addr,
            request,
        }) = first
        {
            return self.forward(&node, &addr, request).await;
        }
        // Hold only if the answer would change nothing for the caller.
        let idle = match (&again, &first) {
            (Some(Request::AgentPoll(q)), Response::AgentPoll(r)) => {
                r.sync_request.is_none()
                    && r.marks.is_empty()
                    && r.release.is_empty()
                    && r.generation.0 == q.known_generation
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
                ask(&addr, who, req).await
            }
            _ => first,
        }
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

pub struct ConfigActor {
    core: ConfigCore,
    store: Box<dyn StateStore>,
    ca: Arc<CertificateAuthority>,
    guard: ChildGuard,
    /// Wakes long-polling agents and nodes (see [`ConfigService::handle`]).
    events: Arc<tokio::sync::Notify>,
}

/// A loaded configuration state, not yet running as an actor.
pub struct ConfigParts {
    core: ConfigCore,
    store: Box<dyn StateStore>,
    ca: Arc<CertificateAuthority>,
}

impl ConfigParts {
    /// How often a reprotected machine takes a reverse pass (see `ConfigCore::reverse_tick`).
    pub fn with_reverse_every(mut self, every: std::time::Duration) -> Self {
        self.core = self.core.with_reverse_every(every);
        self
    }

    pub fn into_actor(self, guard: ChildGuard, events: Arc<tokio::sync::Notify>) -> ConfigActor {
        ConfigActor {
            core: self.core,
            store: self.store,
            ca: self.ca,
            guard,
            events,
        }
    }
}

impl ConfigActor {
    /// Loads state from `<data>/config/`. The store must already have been bootstrapped.
    pub fn load(
        data_dir: &Path,
        ca: Arc<CertificateAuthority>,
        failure_timeout: std::time::Duration,
        reverse_every: std::time::Duration,
        policy: core::scaleout::RebalancePolicy,
    ) -> Result<ConfigParts, String> {
        let store =
            Store::open(&data_dir.join("config").join("state.redb")).map_err(|e| e.to_string())?;
        Self::load_from(Box::new(store), ca, failure_timeout, policy)
            .map(|p| p.with_reverse_every(reverse_every))
    }

    /// Loads state from any [`StateStore`] (the embedded one, or another behind the trait).
    pub fn load_from(
        store: Box<dyn StateStore>,
        ca: Arc<CertificateAuthority>,
        failure_timeout: std::time::Duration,
        policy: core::scaleout::RebalancePolicy,
    ) -> Result<ConfigParts, String> {
        let meta = store
            .meta()
            .map_err(|e| e.to_string())?
            .ok_or("cluster state has no identity; was the data dir bootstrapped?")?;
        let loaded = store.load().map_err(|e| e.to_string())?;
        tracing::info!(nodes = loaded.nodes.len(), machines = loaded.machines.len(), tokens = loaded.tokens.len(), cluster = %meta.cluster_id, "configuration state loaded");
        let core = ConfigCore::with_seed(meta, loaded.nodes, loaded.machines, rand::random())
            .with_tokens(loaded.tokens)
            .with_retired(loaded.retired)
            .with_groups(loaded.groups)
            .with_failure_timeout(failure_timeout)
            .with_policy(policy);
        Ok(ConfigParts { core, store, ca })
    }

    /// One transaction for everything a handled request changed.
    fn persist(&self, records: Vec<Persist>) -> Result<(), haven_cluster::store::StoreError> {
        self.store.apply(&records)
    }
}

impl Actor for ConfigActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        // Control messages are small; a bounded mailbox pushes back on a flood of polls.
        ctx.set_mailbox_capacity(256);
        // Failover, draining and rebalancing are judged once a second.
        ctx.run_interval(std::time::Duration::from_secs(1), |act, ctx| {
            let now = Instant::now();
            let mut persist = act.core.handle_tick(now);
            persist.extend(act.core.reverse_tick(now, crate::fsutil::unix_ms()));
            if act.core.take_wake() {
                act.events.notify_waiters();
            }
            if persist.is_empty() {
                return;
            }
            if let Err(e) = act.persist(persist) {
                // Not durable, so not in force: restart from the store.
                tracing::error!(
                    "state store write failed: {e}; restarting the configuration service"
                );
                act.guard.fail(e.to_string());
                ctx.stop();
                return;
            }
            act.events.notify_waiters();
        });
    }
}

impl Handler<Shutdown> for ConfigActor {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        self.guard.finish();
        ctx.stop();
    }
}

/// One control request from a connection task.
#[derive(Message)]
#[rtype(result = "Response")]
pub struct HandleRequest {
    pub who: Option<PeerIdentity>,
    pub request: Request,
}

impl Handler<HandleRequest> for ConfigActor {
    type Result = MessageResult<HandleRequest>;

    fn handle(&mut self, msg: HandleRequest, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let refused = |reason: String| Response::Refused { reason };
        let (response, persist) = match (msg.request, &msg.who) {
            (Request::Join(req), _) => match self.core.handle_join(unix_ms(), &req) {
                Err(reason) => {
                    tracing::warn!(%reason, "join refused");
                    (refused(reason), vec![])
                }
                Ok((identity, persist)) => match self.ca.issue(&identity) {
                    Ok(creds) => {
                        tracing::info!(identity = %identity.common_name(), "joined");
                        let reply = JoinReply {
                            cluster_id: self.core.meta().cluster_id.clone(),
                            chain: creds
                                .chain
                                .into_iter()
                                .map(serde_bytes::ByteBuf::from)
                                .collect(),
                            key_pkcs8: serde_bytes::ByteBuf::from(creds.key_pkcs8),
                            ca: serde_bytes::ByteBuf::from(self.ca.cert_der.clone()),
                        };
                        (Response::Joined(reply), persist)
                    }
                    Err(e) => (refused(format!("certificate issue failed: {e}")), vec![]),
                },
            },
            (Request::Admin { secret, command }, _) => {
                let wakes_agents = !matches!(
                    command,
                    AdminCommand::Status
                        | AdminCommand::Nodes
                        | AdminCommand::Machines
                        | AdminCommand::Events
                        | AdminCommand::SyncState { .. }
                        | AdminCommand::MarkState { .. }
                        | AdminCommand::Groups
                        | AdminCommand::GroupMarkState { .. }
                        | AdminCommand::GroupPoints { .. }
                );
                let (r, p) = self
                    .core
                    .handle_admin(now, unix_ms(), &secret, command, || {
                        DataKey::generate().as_bytes().to_vec()
                    });
                if let Response::Refused { reason } = &r {
                    tracing::warn!(%reason, "admin request refused");
                } else if wakes_agents {
                    self.events.notify_waiters();
                }
                (r, p)
            }
            (Request::AgentPoll(report), Some(who)) => {
                self.core.handle_agent_poll(now, who, *report)
            }
            (Request::NodePoll(report), Some(who)) => self.core.handle_node_poll(now, who, report),
            (Request::AgentPoll(_) | Request::NodePoll(_), None) => (
                refused("polling requires a cluster certificate".into()),
                vec![],
            ),
            (Request::OpenStream(_) | Request::OpenShip(_), _) => (
                refused("data streams go to process servers and master targets".into()),
                vec![],
            ),
            (Request::Probe, _) => (refused("probes go to agents".into()), vec![]),
            (Request::ReverseDiff(_) | Request::ReverseMark(_) | Request::ReverseChanged(_), _) => {
                (
                    refused("reverse diffs go to the machine's master target".into()),
                    vec![],
                )
            }
            (Request::Recovery(_), _) => (
                refused("recovery requests go to master targets".into()),
                vec![],
            ),
        };
        if let Err(e) = self.persist(persist) {
            // Answer nothing we could not make durable.
            let e = format!("state store write failed: {e}");
            tracing::error!("{e}");
            return MessageResult(refused(e));
        }
        if self.core.take_wake() {
            self.events.notify_waiters();
        }
        MessageResult(response)
    }
}

/// How long the node token written at bootstrap enrols server nodes (kubeadm's bootstrap
/// tokens last as long). After that, `haven ctl token create --kind node` makes another.
pub const BOOTSTRAP_NODE_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The files bootstrap writes in the configuration node's data dir.
pub const AGENT_TOKEN_FILE: &str = "agent-token";
pub const NODE_TOKEN_FILE: &str = "node-token";
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Creates a cluster in `data_dir`: CA, identity and secrets. Idempotent: an existing cluster
/// is loaded, not replaced. Writes the token files: `admin-token` every time (its secret is
/// the cluster's), `agent-token` (no expiry) and `node-token` (24 h) when they are missing,
/// each a fresh token recorded by its digest only. So deleting `node-token` and restarting is
/// how a lost node token is replaced; the old one stays valid until it expires or is revoked.
pub fn bootstrap(
    data_dir: &Path,
    this_node: &haven_cluster::NodeRecord,
) -> Result<(Arc<CertificateAuthority>, ClusterMeta), String> {
    let dir = data_dir.join("config");
    crate::fsutil::create_private_dir(&dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let (ca_path, key_path) = (dir.join("ca.der"), dir.join("ca-key.der"));
    // It holds every machine's data key: owner-only from creation.
    let state_path = dir.join("state.redb");
    crate::fsutil::precreate_private(&state_path)
        .map_err(|e| format!("create {}: {e}", state_path.display()))?;
    restrict(&state_path);
    let store = Store::open(&state_path).map_err(|e| e.to_string())?;
    let mut this_node = this_node.clone();
    if let Some(old) = store
        .nodes()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|n| n.name == this_node.name)
    {
        this_node.drained = old.drained;
    }
    store.put_node(&this_node).map_err(|e| e.to_string())?;
    let (ca, meta) = match store.meta().map_err(|e| e.to_string())? {
        Some(meta) => {
            let cert =
                std::fs::read(&ca_path).map_err(|e| format!("read {}: {e}", ca_path.display()))?;
            let key = std::fs::read(&key_path)
                .map_err(|e| format!("read {}: {e}", key_path.display()))?;
            let ca = CertificateAuthority::load(&cert, &key).map_err(|e| e.to_string())?;
            (ca, meta)
        }
        None => {
            let cluster_id = hex::encode(rand::random::<[u8; 6]>());
            let ca = CertificateAuthority::generate(&cluster_id).map_err(|e| e.to_string())?;
            crate::fsutil::write_private(&key_path, &ca.key_pkcs8()).map_err(|e| e.to_string())?;
            crate::fsutil::write_atomic(&ca_path, &ca.cert_der).map_err(|e| e.to_string())?;
            let meta = ClusterMeta {
                cluster_id,
                admin_secret: hex::encode(rand::random::<[u8; 24]>()),
            };
            store.put_meta(&meta).map_err(|e| e.to_string())?;
            (ca, meta)
        }
    };
    let fp = ca.fingerprint();
    let write_token = |kind: TokenKind, secret: &str, file: &str| -> Result<(), String> {
        let token = Token {
            kind,
            cluster_id: meta.cluster_id.clone(),
            ca_fingerprint: fp.clone(),
            secret: secret.to_string(),
        };
        let path = data_dir.join(file);
        crate::fsutil::write_private(&path, format!("{}\n", token.encode()).as_bytes())
            .map_err(|e| format!("write {}: {e}", path.display()))
    };
    write_token(TokenKind::Admin, &meta.admin_secret, ADMIN_TOKEN_FILE)?;
    for (kind, file, ttl) in [
        (TokenKind::Agent, AGENT_TOKEN_FILE, None),
        (
            TokenKind::Node,
            NODE_TOKEN_FILE,
            Some(BOOTSTRAP_NODE_TOKEN_TTL),
        ),
    ] {
        if data_dir.join(file).exists() {
            continue;
        }
        let secret = hex::encode(rand::random::<[u8; 24]>());
        let ttl_ms = ttl.map(|t| t.as_millis() as u64);
        let record = core::enrolment::new_token(
            kind,
            &secret,
            unix_ms(),
            ttl_ms,
            &format!("bootstrap {file}"),
        );
        store.put_token(&record).map_err(|e| e.to_string())?;
        write_token(kind, &secret, file)?;
    }
    Ok((Arc::new(ca), meta))
}

/// Owner-only permissions for secrets.
pub fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
