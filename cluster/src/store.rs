//! The configuration node's durable state, behind [`StateStore`]: the records it loads at
//! start and the changes it makes durable, all of one handled request in one transaction.
//!
//! [`Store`] is the embedded implementation (redb): one table per record kind, values encoded
//! with the wire codec so the on-disk format is versioned by the same golden tests.
//! [`MemStore`] keeps everything in memory (tests, examples). A store on etcd, for several
//! configuration nodes, slots in behind the same trait.
use std::path::Path;

use haven_transport::codec;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use crate::state::{
    ClusterMeta, GroupRecord, MachineRecord, NodeRecord, RetiredRecord, TokenRecord,
};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const MACHINES: TableDefinition<&str, &[u8]> = TableDefinition::new("machines");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const RETIRED: TableDefinition<&str, &[u8]> = TableDefinition::new("retired");
/// Added after format 1 shipped: a store without it gets it, empty, at open.
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
/// Bumped on an incompatible change of any table's encoding.
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Db(String),
    #[error("state store record {key:?} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("state store format {found} is not supported (this build reads {FORMAT_VERSION})")]
    Version { found: u32 },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(impl From<$t> for StoreError { fn from(e: $t) -> Self { StoreError::Db(e.to_string()) } })*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A change to the configuration node's state (what the core asks to make durable).
#[derive(Debug, Clone, PartialEq)]
pub enum Persist {
    Node(NodeRecord),
    Machine(MachineRecord),
    /// `ctl forget`: the machine's record is removed.
    DeleteMachine(String),
    Token(TokenRecord),
    Retired(RetiredRecord),
    /// Every node named in the retirement has acted on it.
    DeleteRetired(String),
    Group(GroupRecord),
    /// `ctl group delete`: the members stay protected, each on its own.
    DeleteGroup(String),
}

/// Everything the configuration node loads at start.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Loaded {
    pub nodes: Vec<NodeRecord>,
    pub machines: Vec<MachineRecord>,
    pub tokens: Vec<TokenRecord>,
    pub retired: Vec<RetiredRecord>,
    pub groups: Vec<GroupRecord>,
}

/// The configuration node's durable state.
pub trait StateStore: Send {
    fn meta(&self) -> Result<Option<ClusterMeta>, StoreError>;
    fn put_meta(&self, meta: &ClusterMeta) -> Result<(), StoreError>;
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Makes every change durable, atomically (one transaction): after a crash either all
    /// of a request's changes are there or none.
    fn apply(&self, changes: &[Persist]) -> Result<(), StoreError>;
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let store = Self { db };
        let tx = store.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("format")?.map(|v| {
                let b = v.value();
                u32::from_le_bytes(b.try_into().unwrap_or([0xff; 4]))
            });
            match found {
                None => {
                    meta.insert("format", &FORMAT_VERSION.to_le_bytes()[..])?;
                }
                Some(FORMAT_VERSION) => {}
                Some(found) => return Err(StoreError::Version { found }),
            }
            tx.open_table(NODES)?;
            tx.open_table(MACHINES)?;
            tx.open_table(TOKENS)?;
            tx.open_table(RETIRED)?;
            tx.open_table(GROUPS)?;
        }
        tx.commit()?;
        Ok(store)
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.apply_all(|tx| put_in(tx, table, key, value))
    }

    /// Runs `f` in one write transaction and commits it.
    fn apply_all(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        f(&tx)?;
        tx.commit()?;
        Ok(())
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(table)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(codec::decode(v.value()).map_err(|e| StoreError::Corrupt {
                key: k.value().to_string(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    pub fn meta(&self) -> Result<Option<ClusterMeta>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        let Some(v) = t.get("cluster")? else {
            return Ok(None);
        };
        codec::decode(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: "cluster".into(),
                reason: e.to_string(),
            })
    }

    pub fn put_meta(&self, meta: &ClusterMeta) -> Result<(), StoreError> {
        self.put(META, "cluster", meta)
    }

    pub fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.put(NODES, &node.name, node)
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.all(NODES)
    }

    pub fn put_machine(&self, m: &MachineRecord) -> Result<(), StoreError> {
        self.put(MACHINES, &m.name, m)
    }

    pub fn machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        self.all(MACHINES)
    }

    pub fn delete_machine(&self, name: &str) -> Result<(), StoreError> {
        self.delete(MACHINES, name)
    }

    pub fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.put(TOKENS, &t.id, t)
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.all(TOKENS)
    }

    pub fn put_retired(&self, r: &RetiredRecord) -> Result<(), StoreError> {
        self.put(RETIRED, &r.machine, r)
    }

    pub fn delete_retired(&self, machine: &str) -> Result<(), StoreError> {
        self.delete(RETIRED, machine)
    }

    pub fn retired(&self) -> Result<Vec<RetiredRecord>, StoreError> {
        self.all(RETIRED)
    }

    fn delete(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), StoreError> {
        self.apply_all(|tx| {
            tx.open_table(table)?.remove(key)?;
            Ok(())
        })
    }
}

fn put_in<T: Serialize>(
    tx: &redb::WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    let bytes = codec::encode(value).map_err(|e| StoreError::Db(e.to_string()))?;
    tx.open_table(table)?.insert(key, bytes.as_slice())?;
    Ok(())
}

impl StateStore for Store {
    fn meta(&self) -> Result<Option<ClusterMeta>, StoreError> {
        Store::meta(self)
    }

    fn put_meta(&self, meta: &ClusterMeta) -> Result<(), StoreError> {
        Store::put_meta(self, meta)
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        Ok(Loaded {
            nodes: self.nodes()?,
            machines: self.machines()?,
            tokens: self.tokens()?,
            retired: self.retired()?,
            groups: self.all(GROUPS)?,
        })
    }

    fn apply(&self, changes: &[Persist]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.apply_all(|tx| {
            for c in changes {
                match c {
                    Persist::Node(n) => put_in(tx, NODES, &n.name, n)?,
                    Persist::Machine(m) => put_in(tx, MACHINES, &m.name, m)?,
                    Persist::DeleteMachine(m) => {
                        tx.open_table(MACHINES)?.remove(m.as_str())?;
                    }
                    Persist::Token(t) => put_in(tx, TOKENS, &t.id, t)?,
                    Persist::Retired(r) => put_in(tx, RETIRED, &r.machine, r)?,
                    Persist::DeleteRetired(m) => {
                        tx.open_table(RETIRED)?.remove(m.as_str())?;
                    }
                    Persist::Group(g) => put_in(tx, GROUPS, &g.name, g)?,
                    Persist::DeleteGroup(g) => {
                        tx.open_table(GROUPS)?.remove(g.as_str())?;
                    }
                }
            }
            Ok(())
        })
    }
}

/// The state in memory: for tests and examples (nothing survives the process).
#[derive(Default)]
pub struct MemStore {
    state: std::sync::Mutex<(Option<ClusterMeta>, Loaded)>,
}

impl StateStore for MemStore {
    fn meta(&self) -> Result<Option<ClusterMeta>, StoreError> {
        Ok(self.lock()?.0.clone())
    }

    fn put_meta(&self, meta: &ClusterMeta) -> Result<(), StoreError> {
        self.lock()?.0 = Some(meta.clone());
        Ok(())
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        Ok(self.lock()?.1.clone())
    }

    fn apply(&self, changes: &[Persist]) -> Result<(), StoreError> {
        fn upsert<T>(v: &mut Vec<T>, item: &T, same: impl Fn(&T) -> bool)
        where
            T: Clone,
        {
            match v.iter_mut().find(|x| same(x)) {
                Some(x) => *x = item.clone(),
                None => v.push(item.clone()),
            }
        }
        let mut guard = self.lock()?;
        let s = &mut guard.1;
        for c in changes {
            match c {
                Persist::Node(n) => upsert(&mut s.nodes, n, |x| x.name == n.name),
                Persist::Machine(m) => upsert(&mut s.machines, m, |x| x.name == m.name),
                Persist::DeleteMachine(m) => s.machines.retain(|x| &x.name != m),
                Persist::Token(t) => upsert(&mut s.tokens, t, |x| x.id == t.id),
                Persist::Retired(r) => upsert(&mut s.retired, r, |x| x.machine == r.machine),
                Persist::DeleteRetired(m) => s.retired.retain(|x| &x.machine != m),
                Persist::Group(g) => upsert(&mut s.groups, g, |x| x.name == g.name),
                Persist::DeleteGroup(g) => s.groups.retain(|x| &x.name != g),
            }
        }
        Ok(())
    }
}

impl MemStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, (Option<ClusterMeta>, Loaded)>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Db("the in-memory store was poisoned".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::*;

    fn machine(name: &str) -> MachineRecord {
        MachineRecord {
            name: name.into(),
            hostname: "h".into(),
            disks: vec![DiskInfo::new("root", 1)],
            protected: false,
            epoch: Epoch(0),
            generation: Generation(0),
            process_server: None,
            master_target: None,
            data_key: vec![],
            enrolment: String::new(),
            resync: Default::default(),
            policy: Default::default(),
            site: crate::state::default_site(),
            recovery: Default::default(),
            failbacks: 0,
        }
    }

    /// Both stores apply a request's changes the same way, in one go.
    #[test]
    fn a_request_s_changes_apply_together_in_either_store() {
        let dir = tempfile::tempdir().unwrap();
        let redb = Store::open(&dir.path().join("s.redb")).unwrap();
        let mem = MemStore::default();
        for store in [&redb as &dyn StateStore, &mem] {
            store
                .apply(&[
                    Persist::Machine(machine("a")),
                    Persist::Machine(machine("b")),
                    Persist::Retired(RetiredRecord {
                        machine: "c".into(),
                        epoch: Epoch(3),
                        delete_replica: false,
                        pending_nodes: vec!["mt".into()],
                        retired_ms: 1,
                    }),
                ])
                .unwrap();
            store
                .apply(&[
                    Persist::DeleteMachine("a".into()),
                    Persist::Machine(MachineRecord {
                        protected: true,
                        ..machine("b")
                    }),
                    Persist::DeleteRetired("c".into()),
                ])
                .unwrap();
            let loaded = store.load().unwrap();
            assert_eq!(loaded.machines.len(), 1);
            assert!(loaded.machines[0].protected);
            assert!(loaded.retired.is_empty());
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let m = MachineRecord {
            name: "web01".into(),
            hostname: "web01.example".into(),
            disks: vec![DiskInfo::new("root", 1 << 30)],
            protected: true,
            epoch: Epoch(2),
            generation: Generation(7),
            process_server: Some("ps1".into()),
            master_target: Some("mt1".into()),
            data_key: vec![9; 32],
            enrolment: "e1".into(),
            resync: Default::default(),
            policy: Default::default(),
            site: crate::state::default_site(),
            // The failover state is what a restarted configuration node resumes from.
            recovery: Recovery::FailingBack(Box::new(Failover {
                id: 5,
                point: PointSpec::Seq(40),
                planned: true,
                final_mark: Some(3),
                final_seq: Some(40),
                started_ms: 1_700_000_000_000,
                ordered: true,
                reverse: Some(ReversePass {
                    pass: 2,
                    done_pass: 1,
                    bytes_compared: 1 << 30,
                    ..Default::default()
                }),
                failback: Some(Failback {
                    stage: FailbackStage::Materialising,
                    generation: 8,
                    started_ms: 1_700_000_100_000,
                    final_pass: 2,
                    materialised_seq: None,
                    bytes_compared: 0,
                    bytes_written: 0,
                }),
            })),
            failbacks: 1,
        };
        let t = TokenRecord {
            id: "0123456789ab".into(),
            kind: "agent".into(),
            secret_sha256: "ff".repeat(32),
            created_ms: 1,
            expires_ms: Some(2),
            revoked: false,
            uses: 0,
            description: "bootstrap".into(),
        };
        {
            let s = Store::open(&path).unwrap();
            s.put_machine(&m).unwrap();
            s.put_token(&t).unwrap();
            s.put_machine(&MachineRecord {
                name: "gone".into(),
                ..m.clone()
            })
            .unwrap();
            s.delete_machine("gone").unwrap();
            s.put_node(&NodeRecord {
                name: "ps1".into(),
                roles: vec!["process".into()],
                addr: "127.0.0.1:1".into(),
                capacity: 10,
                drained: false,
                site: crate::state::default_site(),
            })
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.machines().unwrap(), vec![m]);
        assert_eq!(s.tokens().unwrap(), vec![t]);
        assert_eq!(s.nodes().unwrap().len(), 1);
        assert!(s.meta().unwrap().is_none());
    }
}
