//! Everything the registry knows besides blob bytes, in one embedded transactional
//! database (redb): repositories, blob links per repository, manifests, tags,
//! referrers, upload sessions and the global chunk index. One write transaction per
//! operation, committed durably before the client gets its 201, so a crash never
//! leaves a tag pointing at a missing manifest.
//!
//! Keys are strings joined with NUL: repository names, tags and digests cannot
//! contain it, and NUL sorts before every allowed byte, so a prefix scan of
//! `"repo\0"` lists exactly that repository in byte order.

use crate::error::StoreError;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tessera_format::OciDigest;

const REPOS: TableDefinition<&str, u64> = TableDefinition::new("repos");
/// "repo\0digest" → size: the blob is readable in the repository.
const REPO_BLOBS: TableDefinition<&str, u64> = TableDefinition::new("repo_blobs");
/// "digest\0repo\0kind" (kind b = blob link, m = manifest): who uses stored bytes.
const BLOB_REFS: TableDefinition<&str, u8> = TableDefinition::new("blob_refs");
/// "repo\0digest" → ManifestMeta (JSON).
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// "repo\0tag" → digest.
const TAGS: TableDefinition<&str, &str> = TableDefinition::new("tags");
/// "repo\0subject\0referrer" → descriptor (JSON).
const REFERRERS: TableDefinition<&str, &[u8]> = TableDefinition::new("referrers");
/// session id → UploadMeta (JSON).
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// chunk id (sha256 hex) → pack location (48 bytes, see `ChunkHit`).
const CHUNKS: TableDefinition<&str, &[u8]> = TableDefinition::new("chunks");
/// "repo\0tag" → when the tag was last confirmed with the pull-through upstream.
const PROXY_TAGS: TableDefinition<&str, u64> = TableDefinition::new("proxy_tags");
/// pack digest → number of chunks: packs verified and admitted to the chunk index.
const PACKS: TableDefinition<&str, u64> = TableDefinition::new("packs");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestMeta {
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadMeta {
    pub repo: String,
    pub started: u64,
}

/// Where the registry holds a chunk: the frame of a pack (offset, stored and decoded
/// lengths, flag bit 0 = raw) and the chunk's place in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChunkHit {
    pub pack: String,
    pub offset: u64,
    pub stored_len: u32,
    pub frame_len: u32,
    pub inner: u32,
    pub uncompressed_len: u32,
    pub flags: u32,
}

/// Stored-record flag: the frame's length and the chunk's offset in it follow the flags
/// (records written before format v2 lack them: their chunk is alone in its frame).
const HIT_FRAMED: u32 = 1 << 31;

impl ChunkHit {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(104);
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.stored_len.to_le_bytes());
        v.extend_from_slice(&self.uncompressed_len.to_le_bytes());
        v.extend_from_slice(&(self.flags | HIT_FRAMED).to_le_bytes());
        v.extend_from_slice(&self.frame_len.to_le_bytes());
        v.extend_from_slice(&self.inner.to_le_bytes());
        v.extend_from_slice(self.pack.as_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<ChunkHit, StoreError> {
        let bad = || StoreError::Corrupt("chunk index entry".into());
        if b.len() < 20 {
            return Err(bad());
        }
        let u32at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[..8]);
        let flags = u32at(16);
        let len = u32at(12);
        let (frame_len, inner, rest) = if flags & HIT_FRAMED != 0 {
            if b.len() < 28 {
                return Err(bad());
            }
            (u32at(20), u32at(24), &b[28..])
        } else {
            (len, 0, &b[20..])
        };
        Ok(ChunkHit {
            offset: u64::from_le_bytes(off),
            stored_len: u32at(8),
            frame_len,
            inner,
            uncompressed_len: len,
            flags: flags & !HIT_FRAMED,
            pack: std::str::from_utf8(rest).map_err(|_| bad())?.to_string(),
        })
    }
}

pub struct Meta {
    db: Database,
}

fn key2(a: &str, b: &str) -> String {
    format!("{a}\0{b}")
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn unjson<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// The half-open key range of everything that starts with `prefix`.
fn prefix_end(prefix: &str) -> String {
    // Every key of a prefix "x\0" is below "x\u{1}".
    let mut s = prefix.to_string();
    if s.ends_with('\0') {
        s.pop();
        s.push('\u{1}');
    } else {
        s.push('\u{10FFFF}');
    }
    s
}

/// Outcome of removing a link: whether it existed, and whether the bytes are now unused.
#[derive(Debug, PartialEq, Eq)]
pub struct Unlinked {
    pub existed: bool,
    pub orphan: bool,
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(REPOS)?;
            tx.open_table(REPO_BLOBS)?;
            tx.open_table(BLOB_REFS)?;
            tx.open_table(MANIFESTS)?;
            tx.open_table(TAGS)?;
            tx.open_table(REFERRERS)?;
            tx.open_table(UPLOADS)?;
            tx.open_table(CHUNKS)?;
            tx.open_table(PACKS)?;
            tx.open_table(PROXY_TAGS)?;
        }
        tx.commit()?;
        Ok(Meta { db })
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    pub fn repo_exists(&self, repo: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(REPOS)?.get(repo)?.is_some())
    }

    /// Size of `digest` if it is readable in `repo`.
    pub fn blob_in_repo(&self, repo: &str, d: &OciDigest) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REPO_BLOBS)?;
        let v = t.get(key2(repo, &d.to_string()).as_str())?;
        Ok(v.map(|g| g.value()))
    }

    /// Make `digest` (size `size`) readable in `repo`.
    pub fn link_blob(&self, repo: &str, d: &OciDigest, size: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let ds = d.to_string();
            tx.open_table(REPOS)?.insert(repo, Self::now())?;
            tx.open_table(REPO_BLOBS)?
                .insert(key2(repo, &ds).as_str(), size)?;
            tx.open_table(BLOB_REFS)?
                .insert(format!("{ds}\0{repo}\0b").as_str(), 1)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn orphan(refs: &redb::Table<&str, u8>, ds: &str) -> Result<bool, StoreError> {
        let p = format!("{ds}\0");
        let end = prefix_end(&p);
        Ok(refs.range(p.as_str()..end.as_str())?.next().is_none())
    }

    pub fn unlink_blob(&self, repo: &str, d: &OciDigest) -> Result<Unlinked, StoreError> {
        let ds = d.to_string();
        let tx = self.db.begin_write()?;
        let out;
        {
            let existed = tx
                .open_table(REPO_BLOBS)?
                .remove(key2(repo, &ds).as_str())?
                .is_some();
            let mut refs = tx.open_table(BLOB_REFS)?;
            refs.remove(format!("{ds}\0{repo}\0b").as_str())?;
            let orphan = existed && Self::orphan(&refs, &ds)?;
            out = Unlinked { existed, orphan };
        }
        tx.commit()?;
        Ok(out)
    }

    /// Record a manifest (its bytes are already stored), optionally tag it and
    /// register it as a referrer of its subject.
    pub fn put_manifest(
        &self,
        repo: &str,
        d: &OciDigest,
        meta: &ManifestMeta,
        tags: &[String],
        referrer_descriptor: Option<&serde_json::Value>,
    ) -> Result<(), StoreError> {
        let ds = d.to_string();
        let tx = self.db.begin_write()?;
        {
            tx.open_table(REPOS)?.insert(repo, Self::now())?;
            tx.open_table(MANIFESTS)?
                .insert(key2(repo, &ds).as_str(), json(meta).as_slice())?;
            tx.open_table(BLOB_REFS)?
                .insert(format!("{ds}\0{repo}\0m").as_str(), 1)?;
            let mut t = tx.open_table(TAGS)?;
            for tag in tags {
                t.insert(key2(repo, tag).as_str(), ds.as_str())?;
            }
            if let (Some(subject), Some(desc)) = (&meta.subject, referrer_descriptor) {
                tx.open_table(REFERRERS)?.insert(
                    format!("{repo}\0{subject}\0{ds}").as_str(),
                    json(desc).as_slice(),
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn manifest(&self, repo: &str, d: &OciDigest) -> Result<Option<ManifestMeta>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(MANIFESTS)?;
        let v = t.get(key2(repo, &d.to_string()).as_str())?;
        match v {
            Some(g) => Ok(Some(unjson(g.value(), "manifest record")?)),
            None => Ok(None),
        }
    }

    pub fn tag(&self, repo: &str, tag: &str) -> Result<Option<OciDigest>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TAGS)?;
        let v = t.get(key2(repo, tag).as_str())?;
        match v {
            Some(g) => OciDigest::parse(g.value())
                .map(Some)
                .map_err(|e| StoreError::Corrupt(e.to_string())),
            None => Ok(None),
        }
    }

    pub fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let existed = tx
            .open_table(TAGS)?
            .remove(key2(repo, tag).as_str())?
            .is_some();
        tx.commit()?;
        Ok(existed)
    }

    /// Remove a manifest, every tag that points at it and its referrer entry.
    pub fn delete_manifest(&self, repo: &str, d: &OciDigest) -> Result<Unlinked, StoreError> {
        let ds = d.to_string();
        let tx = self.db.begin_write()?;
        let out;
        {
            let removed = tx
                .open_table(MANIFESTS)?
                .remove(key2(repo, &ds).as_str())?
                .map(|g| g.value().to_vec());
            let Some(raw) = removed else {
                drop(tx);
                return Ok(Unlinked {
                    existed: false,
                    orphan: false,
                });
            };
            let meta: ManifestMeta = unjson(&raw, "manifest record")?;
            let mut tags = tx.open_table(TAGS)?;
            let p = format!("{repo}\0");
            let end = prefix_end(&p);
            let doomed: Vec<String> = tags
                .range(p.as_str()..end.as_str())?
                .filter_map(|r| r.ok())
                .filter(|(_, v)| v.value() == ds)
                .map(|(k, _)| k.value().to_string())
                .collect();
            for k in doomed {
                tags.remove(k.as_str())?;
            }
            if let Some(subject) = &meta.subject {
                tx.open_table(REFERRERS)?
                    .remove(format!("{repo}\0{subject}\0{ds}").as_str())?;
            }
            let mut refs = tx.open_table(BLOB_REFS)?;
            refs.remove(format!("{ds}\0{repo}\0m").as_str())?;
            out = Unlinked {
                existed: true,
                orphan: Self::orphan(&refs, &ds)?,
            };
        }
        tx.commit()?;
        Ok(out)
    }

    /// Up to `n` tags of `repo` after `last` (exclusive), in byte order, and whether more follow.
    pub fn tags(
        &self,
        repo: &str,
        last: Option<&str>,
        n: usize,
    ) -> Result<(Vec<String>, bool), StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TAGS)?;
        let p = format!("{repo}\0");
        page(&t, &p, last, n)
    }

    /// Up to `n` repositories after `last` (exclusive), in byte order, that hold at least
    /// one manifest and pass `keep` (e.g. the caller's read access), and whether more such
    /// follow. Filtering happens before the page is cut, so a page is short only at the end.
    pub fn repos(
        &self,
        last: Option<&str>,
        n: usize,
        mut keep: impl FnMut(&str) -> bool,
    ) -> Result<(Vec<String>, bool), StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REPOS)?;
        let manifests = tx.open_table(MANIFESTS)?;
        // The smallest key strictly after `last`.
        let start = last.map(|l| format!("{l}\0")).unwrap_or_default();
        let mut out = Vec::new();
        for r in t.range(start.as_str()..)? {
            let (k, _) = r?;
            let name = k.value();
            let p = format!("{name}\0");
            let end = prefix_end(&p);
            if manifests.range(p.as_str()..end.as_str())?.next().is_none() || !keep(name) {
                continue;
            }
            if out.len() == n {
                return Ok((out, true));
            }
            out.push(name.to_string());
        }
        Ok((out, false))
    }

    pub fn referrers(
        &self,
        repo: &str,
        subject: &OciDigest,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REFERRERS)?;
        let p = format!("{repo}\0{subject}\0");
        let end = prefix_end(&p);
        let mut out = Vec::new();
        for r in t.range(p.as_str()..end.as_str())? {
            let (_, v) = r?;
            out.push(unjson(v.value(), "referrer record")?);
        }
        Ok(out)
    }

    pub fn create_upload(&self, id: &str, repo: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(UPLOADS)?.insert(
            id,
            json(&UploadMeta {
                repo: repo.to_string(),
                started: Self::now(),
            })
            .as_slice(),
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn upload(&self, id: &str) -> Result<Option<UploadMeta>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(UPLOADS)?;
        let v = t.get(id)?;
        match v {
            Some(g) => Ok(Some(unjson(g.value(), "upload record")?)),
            None => Ok(None),
        }
    }

    pub fn uploads(&self) -> Result<Vec<(String, UploadMeta)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(UPLOADS)?;
        let mut out = Vec::new();
        for r in t.iter()? {
            let (k, v) = r?;
            out.push((k.value().to_string(), unjson(v.value(), "upload record")?));
        }
        Ok(out)
    }

    pub fn delete_upload(&self, id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(UPLOADS)?.remove(id)?;
        tx.commit()?;
        Ok(())
    }

    /// Close an upload: link the blob into the repository and drop the session, atomically.
    pub fn finish_upload(
        &self,
        id: &str,
        repo: &str,
        d: &OciDigest,
        size: u64,
    ) -> Result<(), StoreError> {
        let ds = d.to_string();
        let tx = self.db.begin_write()?;
        {
            tx.open_table(UPLOADS)?.remove(id)?;
            tx.open_table(REPOS)?.insert(repo, Self::now())?;
            tx.open_table(REPO_BLOBS)?
                .insert(key2(repo, &ds).as_str(), size)?;
            tx.open_table(BLOB_REFS)?
                .insert(format!("{ds}\0{repo}\0b").as_str(), 1)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Repositories that link `d` (as a blob).
    pub fn repos_with_blob(&self, d: &str) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(BLOB_REFS)?;
        let p = format!("{d}\0");
        let end = prefix_end(&p);
        let mut out = Vec::new();
        for r in t.range(p.as_str()..end.as_str())? {
            let (k, _) = r?;
            let rest = &k.value()[p.len()..];
            if let Some(repo) = rest.strip_suffix("\0b") {
                out.push(repo.to_string());
            }
        }
        Ok(out)
    }

    pub fn pack_admitted(&self, pack: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(PACKS)?.get(pack)?.is_some())
    }

    /// Add a verified pack's chunks to the global chunk index (first location wins).
    pub fn admit_pack(&self, pack: &str, chunks: &[(String, ChunkHit)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(CHUNKS)?;
            for (id, hit) in chunks {
                if t.get(id.as_str())?.is_none() {
                    t.insert(id.as_str(), hit.encode().as_slice())?;
                }
            }
            tx.open_table(PACKS)?.insert(pack, chunks.len() as u64)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Drop a pack (whose bytes are going away) and the chunk locations pointing into it.
    pub fn forget_pack(&self, pack: &str, chunk_ids: &[String]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(CHUNKS)?;
            for id in chunk_ids {
                let here = match t.get(id.as_str())? {
                    Some(g) => ChunkHit::decode(g.value())?.pack == pack,
                    None => false,
                };
                if here {
                    t.remove(id.as_str())?;
                }
            }
            tx.open_table(PACKS)?.remove(pack)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn chunk(&self, id: &str) -> Result<Option<ChunkHit>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CHUNKS)?;
        let v = t.get(id)?;
        v.map(|g| ChunkHit::decode(g.value())).transpose()
    }

    pub fn chunks(&self, ids: &[String]) -> Result<Vec<Option<ChunkHit>>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CHUNKS)?;
        ids.iter()
            .map(|id| {
                t.get(id.as_str())?
                    .map(|g| ChunkHit::decode(g.value()))
                    .transpose()
            })
            .collect()
    }

    /// Seconds since the epoch when `repo:tag` was last confirmed upstream.
    pub fn proxy_tag_checked(&self, repo: &str, tag: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(PROXY_TAGS)?;
        let v = t.get(key2(repo, tag).as_str())?;
        Ok(v.map(|g| g.value()))
    }

    pub fn set_proxy_tag_checked(&self, repo: &str, tag: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(PROXY_TAGS)?
            .insert(key2(repo, tag).as_str(), Self::now())?;
        tx.commit()?;
        Ok(())
    }

    pub fn now_secs() -> u64 {
        Self::now()
    }

    pub fn stats(&self) -> Result<(u64, u64), StoreError> {
        let tx = self.db.begin_read()?;
        Ok((tx.open_table(CHUNKS)?.len()?, tx.open_table(PACKS)?.len()?))
    }
}

fn page<V: redb::Value + 'static>(
    t: &impl ReadableTable<&'static str, V>,
    prefix: &str,
    last: Option<&str>,
    n: usize,
) -> Result<(Vec<String>, bool), StoreError> {
    let end = prefix_end(prefix);
    let start = match last {
        // The smallest key strictly after prefix+last.
        Some(l) => format!("{prefix}{l}\0"),
        None => prefix.to_string(),
    };
    let mut out = Vec::new();
    let mut more = false;
    let range = if prefix.is_empty() {
        t.range(start.as_str()..)?
    } else {
        t.range(start.as_str()..end.as_str())?
    };
    for r in range {
        let (k, _) = r?;
        if out.len() == n {
            more = true;
            break;
        }
        out.push(k.value()[prefix.len()..].to_string());
    }
    Ok((out, more))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_format::Algorithm;

    /// A fresh database, a digest and a manifest record to store under it.
    fn fixture() -> (tempfile::TempDir, Meta, OciDigest, ManifestMeta) {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("m.redb")).unwrap();
        let d = OciDigest::of(Algorithm::Sha256, b"m");
        let meta = ManifestMeta {
            media_type: "x".into(),
            size: 1,
            subject: None,
        };
        (dir, m, d, meta)
    }

    #[test]
    fn tags_page_in_order_and_stay_in_their_repo() {
        let (_dir, m, d, meta) = fixture();
        let tags: Vec<String> = ["b", "a", "c", "A"].iter().map(|s| s.to_string()).collect();
        m.put_manifest("r", &d, &meta, &tags, None).unwrap();
        m.put_manifest("r/x", &d, &meta, &["zz".to_string()], None)
            .unwrap();
        assert_eq!(
            m.tags("r", None, 10).unwrap(),
            (vec!["A".into(), "a".into(), "b".into(), "c".into()], false)
        );
        assert_eq!(
            m.tags("r", None, 2).unwrap(),
            (vec!["A".into(), "a".into()], true)
        );
        assert_eq!(
            m.tags("r", Some("a"), 2).unwrap(),
            (vec!["b".into(), "c".into()], false)
        );
        assert_eq!(
            m.tags("r", Some("aa"), 5).unwrap(),
            (vec!["b".into(), "c".into()], false)
        );
        assert_eq!(m.tags("r", None, 0).unwrap(), (vec![], true));
        assert_eq!(
            m.repos(None, 10, |_| true).unwrap().0,
            vec!["r".to_string(), "r/x".into()]
        );
        assert_eq!(
            m.repos(Some("r"), 10, |_| true).unwrap().0,
            vec!["r/x".to_string()]
        );
        let u = m.delete_manifest("r", &d).unwrap();
        assert!(u.existed && !u.orphan, "r/x still uses it");
        assert_eq!(m.tags("r", None, 10).unwrap().0, Vec::<String>::new());
        assert!(m.delete_manifest("r/x", &d).unwrap().orphan);
    }

    #[test]
    fn catalog_filters_before_paging_and_skips_repos_without_manifests() {
        let (_dir, m, d, meta) = fixture();
        for r in ["a", "b", "c", "d", "e"] {
            m.put_manifest(r, &d, &meta, &[], None).unwrap();
        }
        // Only "d" and "e" are readable: the first page of one still finds "d".
        let readable = |r: &str| r == "d" || r == "e";
        assert_eq!(
            m.repos(None, 1, readable).unwrap(),
            (vec!["d".into()], true)
        );
        assert_eq!(
            m.repos(Some("d"), 1, readable).unwrap(),
            (vec!["e".into()], false)
        );
        // A repository whose manifests are all deleted leaves the listing, as does one
        // that only has blobs.
        m.delete_manifest("b", &d).unwrap();
        m.link_blob("f", &d, 1).unwrap();
        assert_eq!(
            m.repos(None, 10, |_| true).unwrap(),
            (vec!["a".into(), "c".into(), "d".into(), "e".into()], false)
        );
        assert_eq!(m.repos(None, 0, |_| true).unwrap(), (vec![], true));
    }

    #[test]
    fn blob_links_are_per_repo() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("m.redb")).unwrap();
        let d = OciDigest::of(Algorithm::Sha256, b"b");
        m.link_blob("a", &d, 1).unwrap();
        assert_eq!(m.blob_in_repo("a", &d).unwrap(), Some(1));
        assert_eq!(m.blob_in_repo("b", &d).unwrap(), None);
        m.link_blob("b", &d, 1).unwrap();
        assert_eq!(
            m.repos_with_blob(&d.to_string()).unwrap(),
            vec!["a".to_string(), "b".into()]
        );
        assert_eq!(
            m.unlink_blob("a", &d).unwrap(),
            Unlinked {
                existed: true,
                orphan: false
            }
        );
        assert_eq!(
            m.unlink_blob("a", &d).unwrap(),
            Unlinked {
                existed: false,
                orphan: false
            }
        );
        assert_eq!(
            m.unlink_blob("b", &d).unwrap(),
            Unlinked {
                existed: true,
                orphan: true
            }
        );
    }

    #[test]
    fn chunk_hits_roundtrip() {
        let h = ChunkHit {
            pack: "sha256:ab".into(),
            offset: 1 << 40,
            stored_len: 7,
            frame_len: 20,
            inner: 11,
            uncompressed_len: 9,
            flags: 1,
        };
        assert_eq!(ChunkHit::decode(&h.encode()).unwrap(), h);
        assert!(ChunkHit::decode(&[0; 3]).is_err());
        // A record written before format v2: the chunk alone in its frame.
        let mut old = Vec::new();
        old.extend_from_slice(&5u64.to_le_bytes());
        old.extend_from_slice(&7u32.to_le_bytes());
        old.extend_from_slice(&9u32.to_le_bytes());
        old.extend_from_slice(&0u32.to_le_bytes());
        old.extend_from_slice(b"sha256:ab");
        let got = ChunkHit::decode(&old).unwrap();
        assert_eq!(
            (got.frame_len, got.inner, got.offset, got.pack.as_str()),
            (9, 0, 5, "sha256:ab")
        );
    }
}
