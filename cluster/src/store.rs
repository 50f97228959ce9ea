//! The configuration node's durable store (redb): one table per record kind, values encoded
//! with the wire codec so the on-disk format is versioned by the same golden tests.
use std::path::Path;

use haven_transport::codec;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use crate::state::{ClusterMeta, MachineRecord, NodeRecord, RetiredRecord, TokenRecord};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const MACHINES: TableDefinition<&str, &[u8]> = TableDefinition::new("machines");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const RETIRED: TableDefinition<&str, &[u8]> = TableDefinition::new("retired");
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
        let bytes = codec::encode(value).map_err(|e| StoreError::Db(e.to_string()))?;
        let tx = self.db.begin_write()?;
        tx.open_table(table)?.insert(key, bytes.as_slice())?;
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
        let tx = self.db.begin_write()?;
        tx.open_table(table)?.remove(key)?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::*;

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
