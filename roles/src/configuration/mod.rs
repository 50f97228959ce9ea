//! The configuration role: cluster identity and CA, inventory, placement, and the admin API.
//!
//! [`ConfigActor`] owns the protocol core ([`core::ConfigCore`]), the redb store and the CA.
//! Connection tasks send it one [`HandleRequest`] per control stream. The data path never
//! waits on it: nodes and agents keep their last assignment when it is down.
pub mod core;

use std::{path::Path, sync::Arc, time::Instant};

use crate::slot::Slot;
use actix::prelude::*;
use haven_actors::{ChildGuard, Shutdown};
use haven_cluster::{store::Store, ClusterMeta};
use haven_transport::{
    identity::{CertificateAuthority, PeerIdentity},
    seal::DataKey,
};

use self::core::{ConfigCore, Persist};
use crate::proto::{AdminCommand, JoinReply, Request, Response};

pub type ConfigSlot = Slot<Addr<ConfigActor>>;

pub struct ConfigActor {
    core: ConfigCore,
    store: Store,
    ca: Arc<CertificateAuthority>,
    guard: ChildGuard,
    /// Wakes long-polling agents (see `node::ask_or_hold`).
    events: Arc<tokio::sync::Notify>,
}

/// A loaded configuration state, not yet running as an actor.
pub struct ConfigParts {
    core: ConfigCore,
    store: Store,
    ca: Arc<CertificateAuthority>,
}

impl ConfigParts {
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
        policy: core::scaleout::RebalancePolicy,
    ) -> Result<ConfigParts, String> {
        let store =
            Store::open(&data_dir.join("config").join("state.redb")).map_err(|e| e.to_string())?;
        let meta = store
            .meta()
            .map_err(|e| e.to_string())?
            .ok_or("cluster state has no identity; was the data dir bootstrapped?")?;
        let nodes = store.nodes().map_err(|e| e.to_string())?;
        let machines = store.machines().map_err(|e| e.to_string())?;
        tracing::info!(nodes = nodes.len(), machines = machines.len(), cluster = %meta.cluster_id, "configuration state loaded");
        let core = ConfigCore::new(meta, nodes, machines)
            .with_failure_timeout(failure_timeout)
            .with_policy(policy);
        Ok(ConfigParts { core, store, ca })
    }

    fn persist(&self, records: Vec<Persist>) -> Result<(), String> {
        for r in records {
            match r {
                Persist::Node(n) => self.store.put_node(&n),
                Persist::Machine(m) => self.store.put_machine(&m),
            }
            .map_err(|e| format!("state store write failed: {e}"))?;
        }
        Ok(())
    }
}

impl Actor for ConfigActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        // Control messages are small; a bounded mailbox pushes back on a flood of polls.
        ctx.set_mailbox_capacity(256);
        // Failover, draining and rebalancing are judged once a second.
        ctx.run_interval(std::time::Duration::from_secs(1), |act, ctx| {
            let persist = act.core.handle_tick(Instant::now());
            if persist.is_empty() {
                return;
            }
            if let Err(e) = act.persist(persist) {
                // Not durable, so not in force: restart from the store.
                tracing::error!("{e}; restarting the configuration service");
                act.guard.fail(e);
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
            (Request::Join(req), _) => match self.core.handle_join(&req) {
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
                );
                let (r, p) = self.core.handle_admin(now, &secret, command, || {
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
                self.core.handle_agent_poll(now, who, report)
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
        };
        if let Err(e) = self.persist(persist) {
            // Answer nothing we could not make durable.
            tracing::error!("{e}");
            return MessageResult(refused(e));
        }
        MessageResult(response)
    }
}

/// Creates a cluster in `data_dir`: CA, identity and secrets. Idempotent: an existing cluster
/// is loaded, not replaced.
pub fn bootstrap(
    data_dir: &Path,
    this_node: &haven_cluster::NodeRecord,
) -> Result<(Arc<CertificateAuthority>, ClusterMeta), String> {
    let dir = data_dir.join("config");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let (ca_path, key_path) = (dir.join("ca.der"), dir.join("ca-key.der"));
    let store = Store::open(&dir.join("state.redb")).map_err(|e| e.to_string())?;
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
    if let Some(meta) = store.meta().map_err(|e| e.to_string())? {
        let cert =
            std::fs::read(&ca_path).map_err(|e| format!("read {}: {e}", ca_path.display()))?;
        let key =
            std::fs::read(&key_path).map_err(|e| format!("read {}: {e}", key_path.display()))?;
        let ca = CertificateAuthority::load(&cert, &key).map_err(|e| e.to_string())?;
        return Ok((Arc::new(ca), meta));
    }
    let cluster_id = hex::encode(rand::random::<[u8; 6]>());
    let ca = CertificateAuthority::generate(&cluster_id).map_err(|e| e.to_string())?;
    crate::fsutil::write_atomic(&key_path, &ca.key_pkcs8()).map_err(|e| e.to_string())?;
    restrict(&key_path);
    crate::fsutil::write_atomic(&ca_path, &ca.cert_der).map_err(|e| e.to_string())?;
    let meta = ClusterMeta {
        cluster_id,
        join_secret: hex::encode(rand::random::<[u8; 24]>()),
        admin_secret: hex::encode(rand::random::<[u8; 24]>()),
    };
    store.put_meta(&meta).map_err(|e| e.to_string())?;
    Ok((Arc::new(ca), meta))
}

/// Owner-only permissions for secrets.
pub fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
