//! The snapshotter's metadata: one record per snapshot key in a redb database
//! (`ROOT/snapshots.redb`), each change one durable transaction. A snapshot's files live
//! in `ROOT/snapshots/<id>/` (`fs/` and `work/` for local ones, `lazy/` for a lazy
//! image mount); a directory without a record is debris of a crash and goes at startup
//! or on `Cleanup`.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::NodeError;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Where a snapshot's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Source {
    /// Files in `fs/` (an unpacked layer, or a container's upper directory).
    Local,
    /// The whole image tree, served lazily from the tessera twin `twin` (a full
    /// reference by digest) mounted at `lazy/`. Covers every layer below it.
    Lazy { twin: String, image: String },
    /// A layer of a twin-backed image that was not unpacked: its content is fetched
    /// (`layer` from `image`'s repository) and unpacked into `fs/` only when something
    /// needs this snapshot as a real parent, never when the twin serves the image.
    Placeholder {
        image: String,
        layer: String,
        media_type: String,
        size: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    #[serde(default)]
    pub parent: String,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// Seconds and nanoseconds since the epoch.
    pub created: (u64, u32),
    pub updated: (u64, u32),
    pub source: Source,
}

pub fn now() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

pub fn to_system_time((s, n): (u64, u32)) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::new(s, n)
}

fn db_err<E: Into<redb::Error>>(e: E) -> NodeError {
    NodeError::Db(e.into().to_string())
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, NodeError> {
    serde_json::from_slice(bytes)
        .map_err(|e| NodeError::Db(format!("record of snapshot {key:?} is unreadable: {e}")))
}

pub struct Meta {
    db: Database,
}

/// One write transaction's view (see [`Meta::write`]).
pub struct Tx<'a> {
    table: redb::Table<'a, &'static str, &'static [u8]>,
    counters: redb::Table<'a, &'static str, u64>,
}

impl Tx<'_> {
    pub fn get(&self, key: &str) -> Result<Option<Record>, NodeError> {
        match self.table.get(key).map_err(db_err)? {
            Some(v) => decode(key, v.value()).map(Some),
            None => Ok(None),
        }
    }
    pub fn put(&mut self, key: &str, r: &Record) -> Result<(), NodeError> {
        let bytes = serde_json::to_vec(r).map_err(|e| NodeError::Db(e.to_string()))?;
        self.table.insert(key, bytes.as_slice()).map_err(db_err)?;
        Ok(())
    }
    pub fn delete(&mut self, key: &str) -> Result<(), NodeError> {
        self.table.remove(key).map_err(db_err)?;
        Ok(())
    }
    pub fn next_id(&mut self) -> Result<u64, NodeError> {
        let n = self
            .counters
            .get("next_id")
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(1);
        self.counters.insert("next_id", n + 1).map_err(db_err)?;
        Ok(n)
    }
    pub fn all(&self) -> Result<Vec<(String, Record)>, NodeError> {
        let mut out = Vec::new();
        for item in self.table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta, NodeError> {
        let db = Database::create(path).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(SNAPSHOTS).map_err(db_err)?;
        tx.open_table(COUNTERS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Meta { db })
    }

    /// Run `f` in one write transaction, committed (durably) only when it returns Ok.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut Tx) -> Result<T, NodeError>,
    ) -> Result<T, NodeError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let out = {
            let mut t = Tx {
                table: tx.open_table(SNAPSHOTS).map_err(db_err)?,
                counters: tx.open_table(COUNTERS).map_err(db_err)?,
            };
            f(&mut t)?
        };
        tx.commit().map_err(db_err)?;
        Ok(out)
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, NodeError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(SNAPSHOTS).map_err(db_err)?;
        match t.get(key).map_err(db_err)? {
            Some(v) => decode(key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    pub fn all(&self) -> Result<Vec<(String, Record)>, NodeError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(SNAPSHOTS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }
}
