//! The node store: chunks shared by every mount on the node, content-addressed by their
//! sha256 under `DIR/<2 hex>/<hex>` (uncompressed).
//!
//! * Crash-safe: a chunk becomes visible only after it was verified, written and synced
//!   (temp file under `DIR/tmp` + rename); temp files of dead writers are removed on open.
//! * Every read is verified again, so a corrupt file is dropped and refetched, never served.
//! * Bounded: with a quota, the least recently used chunks are evicted (a hit refreshes a
//!   chunk's mtime), except chunks of images that are mounted. Every mount registers its
//!   chunk ids in `DIR/mounts/<pid>-<n>.pin` (with `<pid>-<n>.json` beside it: what is
//!   mounted where, and the mount's counters); a pin whose process is gone is stale.
//! * An optional read-only shared tier (same layout, e.g. on NFS) is consulted before the
//!   network; its chunks are verified like local ones and never modified.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tessera_format::Digest;

/// A hit refreshes a chunk's mtime (its LRU age) at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Evict least recently used, unpinned chunks beyond this many bytes.
    pub quota: Option<u64>,
    /// A read-only directory with the same layout, consulted before the network.
    pub shared: Option<PathBuf>,
}

pub struct NodeStore {
    dir: PathBuf,
    opts: StoreOptions,
    state: Arc<State>,
    pins: Mutex<Vec<PathBuf>>,
}

/// What a background eviction shares with the store it works for.
#[derive(Default)]
struct State {
    /// Bytes of chunk files, as counted on open plus what this process added.
    bytes: AtomicU64,
    gc_running: AtomicBool,
    counters: StoreCounters,
}

/// What the store did for this process.
#[derive(Debug, Default)]
pub struct StoreCounters {
    pub hits: AtomicU64,
    pub shared_hits: AtomicU64,
    pub corrupt_dropped: AtomicU64,
    pub evicted_chunks: AtomicU64,
    pub evicted_bytes: AtomicU64,
}

/// A summary of the store (`tessera cache stats`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreStats {
    pub dir: String,
    pub chunks: u64,
    pub bytes: u64,
    pub pinned_chunks: u64,
    pub pinned_bytes: u64,
    pub temp_files: u64,
    pub mounts: Vec<MountInfo>,
    pub stale_pins: u64,
}

/// What a mount publishes about itself beside its pin.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct MountInfo {
    pub pid: u32,
    pub reference: String,
    pub manifest: String,
    pub dir: String,
    pub chunks: u64,
    #[serde(default)]
    pub counters: serde_json::Value,
}

/// What a garbage collection or verification did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub removed_chunks: u64,
    pub removed_bytes: u64,
    pub kept_chunks: u64,
    pub kept_bytes: u64,
    pub pinned_kept: u64,
    pub stale_pins_removed: u64,
    pub temp_files_removed: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    pub corrupt_removed: Vec<String>,
    pub misplaced_removed: Vec<String>,
}

/// A pin of a live process: its base path (without extension) and what it publishes.
type LivePin = (PathBuf, MountInfo);

/// One chunk file found by a walk of the store.
struct ChunkFile {
    path: PathBuf,
    id: Option<Digest>,
    len: u64,
    mtime: SystemTime,
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl NodeStore {
    pub fn open(dir: &Path) -> io::Result<NodeStore> {
        NodeStore::open_with(dir, StoreOptions::default())
    }

    pub fn open_with(dir: &Path, opts: StoreOptions) -> io::Result<NodeStore> {
        fs::create_dir_all(dir.join("tmp"))?;
        fs::create_dir_all(dir.join("mounts"))?;
        // Temp files of a writer that died are never referenced. Another live process
        // may be writing one right now: only remove files nobody touched for a while.
        for e in fs::read_dir(dir.join("tmp"))?.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600))
                .unwrap_or(true);
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
        let store = NodeStore {
            dir: dir.to_path_buf(),
            opts,
            state: Arc::default(),
            pins: Mutex::new(Vec::new()),
        };
        if store.opts.quota.is_some() {
            let total = store.walk()?.iter().map(|c| c.len).sum();
            store.state.bytes.store(total, Ordering::Relaxed);
        }
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_in(dir: &Path, id: &Digest) -> PathBuf {
        let h = id.hex();
        dir.join(&h[..2]).join(h)
    }

    fn path(&self, id: &Digest) -> PathBuf {
        NodeStore::path_in(&self.dir, id)
    }

    /// Whether the local store has a file for the chunk (not verified).
    pub fn contains(&self, id: &Digest) -> bool {
        self.path(id).exists()
            || self
                .opts
                .shared
                .as_deref()
                .is_some_and(|s| NodeStore::path_in(s, id).exists())
    }

    fn read_verified(&self, p: &Path, id: &Digest, local: bool) -> Option<Vec<u8>> {
        let mut f = File::open(p).ok()?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).ok()?;
        if Digest::of(&buf) != *id {
            self.state
                .counters
                .corrupt_dropped
                .fetch_add(1, Ordering::Relaxed);
            if local {
                tracing::warn!(chunk = %id, path = %p.display(), "corrupt chunk in the node store; removed, will refetch");
                let _ = fs::remove_file(p);
                self.state.bytes.fetch_sub(
                    (buf.len() as u64).min(self.state.bytes.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
            } else {
                tracing::warn!(chunk = %id, path = %p.display(), "corrupt chunk in the shared tier; ignored");
            }
            return None;
        }
        if local {
            // LRU age: a hit makes the chunk young again (cheaply: at most once a minute).
            let stale = f
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() > TOUCH_EVERY)
                .unwrap_or(false);
            if stale {
                let _ = f.set_modified(SystemTime::now());
            }
        }
        Some(buf)
    }

    /// The chunk's bytes if the store (or the shared tier) holds a verified copy.
    pub fn get(&self, id: &Digest) -> Option<Vec<u8>> {
        if let Some(b) = self.read_verified(&self.path(id), id, true) {
            self.state.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Some(b);
        }
        let shared = self.opts.shared.as_deref()?;
        let b = self.read_verified(&NodeStore::path_in(shared, id), id, false)?;
        self.state
            .counters
            .shared_hits
            .fetch_add(1, Ordering::Relaxed);
        Some(b)
    }

    /// Store verified bytes (the caller checked `Digest::of(data) == id`).
    pub fn put(&self, id: &Digest, data: &[u8]) -> io::Result<()> {
        let p = self.path(id);
        if p.exists() {
            return Ok(());
        }
        let dir = p.parent().unwrap_or(&self.dir);
        fs::create_dir_all(dir)?;
        let (tmp, mut f) = tempfile_in(&self.dir.join("tmp"))?;
        let written = f
            .write_all(data)
            .and_then(|_| f.sync_data())
            .and_then(|_| fs::rename(&tmp, &p));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let total = self
            .state
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed)
            + data.len() as u64;
        if let Some(q) = self.opts.quota {
            if total > q {
                self.evict_in_background(q);
            }
        }
        Ok(())
    }

    /// Store many verified chunks with one filesystem sync: every temp file is written,
    /// then `syncfs`, then each is renamed into place — as crash-safe as [`put`] one
    /// by one, without a journal commit per chunk.
    ///
    /// [`put`]: NodeStore::put
    pub fn put_many(&self, items: &[(Digest, &[u8])]) -> io::Result<()> {
        let mut staged = Vec::with_capacity(items.len());
        let mut result = Ok(());
        for (id, data) in items {
            let p = self.path(id);
            if p.exists() {
                continue;
            }
            let written = tempfile_in(&self.dir.join("tmp")).and_then(|(tmp, mut f)| {
                match f.write_all(data) {
                    Ok(()) => Ok((tmp, p, data.len() as u64)),
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        Err(e)
                    }
                }
            });
            match written {
                Ok(s) => staged.push(s),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() && !staged.is_empty() {
            result =
                File::open(&self.dir).and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from));
        }
        let mut added = 0;
        for (tmp, p, len) in staged {
            let moved = match &result {
                Ok(()) => p
                    .parent()
                    .map_or(Ok(()), fs::create_dir_all)
                    .and_then(|_| fs::rename(&tmp, &p)),
                Err(_) => Err(io::Error::other("not synced")),
            };
            match moved {
                Ok(()) => added += len,
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        let total = self.state.bytes.fetch_add(added, Ordering::Relaxed) + added;
        if let Some(q) = self.opts.quota {
            if total > q {
                self.evict_in_background(q);
            }
        }
        result
    }

    /// Keep `ids` from eviction while this process lives; `info` is published beside.
    pub fn pin(&self, ids: &[Digest], info: &MountInfo) -> io::Result<PathBuf> {
        let mounts = self.dir.join("mounts");
        fs::create_dir_all(&mounts)?;
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let base = mounts.join(format!("{}-{}", std::process::id(), pins.len()));
        let mut bytes = Vec::with_capacity(ids.len() * 32);
        for id in ids {
            bytes.extend_from_slice(&id.0);
        }
        write_atomic(&base.with_extension("pin"), &bytes)?;
        let json = serde_json::to_vec_pretty(info).map_err(io::Error::other)?;
        write_atomic(&base.with_extension("json"), &json)?;
        pins.push(base.clone());
        Ok(base)
    }

    /// Update what a pinned mount publishes (its counters).
    pub fn publish(&self, pin: &Path, info: &MountInfo) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(info).map_err(io::Error::other)?;
        write_atomic(&pin.with_extension("json"), &json)
    }

    /// Drop a pin (the mount ended).
    pub fn unpin(&self, pin: &Path) {
        let _ = fs::remove_file(pin.with_extension("pin"));
        let _ = fs::remove_file(pin.with_extension("json"));
        self.pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != pin);
    }

    /// Live pins: (pin base path, info); stale ones are listed separately.
    fn pins(&self) -> io::Result<(Vec<LivePin>, Vec<PathBuf>)> {
        let mut live = Vec::new();
        let mut stale = Vec::new();
        let Ok(rd) = fs::read_dir(self.dir.join("mounts")) else {
            return Ok((live, stale));
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("pin") {
                continue;
            }
            let base = p.with_extension("");
            let pid = base
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split('-').next())
                .and_then(|n| n.parse::<u32>().ok());
            match pid {
                Some(pid) if pid_alive(pid) => {
                    let info = fs::read(base.with_extension("json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<MountInfo>(&b).ok())
                        .unwrap_or(MountInfo {
                            pid,
                            ..Default::default()
                        });
                    live.push((base, info));
                }
                _ => stale.push(base),
            }
        }
        Ok((live, stale))
    }

    fn pinned_ids(&self, live: &[LivePin]) -> HashSet<Digest> {
        let mut set = HashSet::new();
        for (base, _) in live {
            if let Ok(b) = fs::read(base.with_extension("pin")) {
                for c in b.chunks_exact(32) {
                    if let Ok(a) = <[u8; 32]>::try_from(c) {
                        set.insert(Digest(a));
                    }
                }
            }
        }
        set
    }

    /// Every chunk file of the local store.
    fn walk(&self) -> io::Result<Vec<ChunkFile>> {
        let mut out = Vec::new();
        for sub in fs::read_dir(&self.dir)?.flatten() {
            let name = sub.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 2 || !is_hex(name) || !sub.path().is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())?.flatten() {
                let Ok(m) = f.metadata() else { continue };
                if !m.is_file() {
                    continue;
                }
                let fname = f.file_name();
                let id = fname
                    .to_str()
                    .filter(|n| n.len() == 64 && n.starts_with(name))
                    .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok());
                out.push(ChunkFile {
                    path: f.path(),
                    id,
                    len: m.len(),
                    mtime: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }

    pub fn stats(&self) -> io::Result<StoreStats> {
        let files = self.walk()?;
        let (live, stale) = self.pins()?;
        let pinned = self.pinned_ids(&live);
        let mut s = StoreStats {
            dir: self.dir.display().to_string(),
            chunks: 0,
            bytes: 0,
            pinned_chunks: 0,
            pinned_bytes: 0,
            temp_files: fs::read_dir(self.dir.join("tmp"))
                .map(|r| r.count() as u64)
                .unwrap_or(0),
            mounts: live.into_iter().map(|(_, i)| i).collect(),
            stale_pins: stale.len() as u64,
        };
        for f in files {
            s.chunks += 1;
            s.bytes += f.len;
            if f.id.is_some_and(|id| pinned.contains(&id)) {
                s.pinned_chunks += 1;
                s.pinned_bytes += f.len;
            }
        }
        Ok(s)
    }

    /// Evict least recently used chunks that no mounted image uses until the store holds
    /// at most `max_bytes`; also removes stale pins and old temp files.
    pub fn gc(&self, max_bytes: u64) -> io::Result<GcReport> {
        let mut r = GcReport::default();
        let (live, stale) = self.pins()?;
        for base in stale {
            let _ = fs::remove_file(base.with_extension("pin"));
            let _ = fs::remove_file(base.with_extension("json"));
            r.stale_pins_removed += 1;
        }
        for e in fs::read_dir(self.dir.join("tmp"))?.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600))
                .unwrap_or(true);
            if old && fs::remove_file(e.path()).is_ok() {
                r.temp_files_removed += 1;
            }
        }
        let pinned = self.pinned_ids(&live);
        let mut files = self.walk()?;
        let mut total: u64 = files.iter().map(|f| f.len).sum();
        files.sort_by_key(|f| f.mtime);
        for f in files {
            let is_pinned = f.id.is_some_and(|id| pinned.contains(&id));
            if total > max_bytes && !is_pinned && fs::remove_file(&f.path).is_ok() {
                total -= f.len;
                r.removed_chunks += 1;
                r.removed_bytes += f.len;
            } else {
                r.kept_chunks += 1;
                r.kept_bytes += f.len;
                r.pinned_kept += is_pinned as u64;
            }
        }
        self.state.bytes.store(total, Ordering::Relaxed);
        self.state
            .counters
            .evicted_chunks
            .fetch_add(r.removed_chunks, Ordering::Relaxed);
        self.state
            .counters
            .evicted_bytes
            .fetch_add(r.removed_bytes, Ordering::Relaxed);
        Ok(r)
    }

    /// Run one eviction down to 90% of `quota` in a background thread (one at a time),
    /// so the read that crossed the quota does not wait for a walk of the store.
    fn evict_in_background(&self, quota: u64) {
        if self.state.gc_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = NodeStore {
            dir: self.dir.clone(),
            opts: self.opts.clone(),
            state: self.state.clone(),
            pins: Mutex::new(Vec::new()),
        };
        let spawned = std::thread::Builder::new()
            .name("tessera-evict".into())
            .spawn(move || {
                match me.gc(quota / 10 * 9) {
                    Ok(r) => {
                        tracing::info!(
                            removed_chunks = r.removed_chunks,
                            removed_bytes = r.removed_bytes,
                            kept_bytes = r.kept_bytes,
                            pinned = r.pinned_kept,
                            "node store over quota: evicted least recently used chunks"
                        );
                        if r.kept_bytes > quota {
                            tracing::warn!(
                                kept_bytes = r.kept_bytes,
                                quota,
                                "node store stays over quota: the rest is used by mounted images"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "node store eviction failed"),
                }
                me.state.gc_running.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start node store eviction");
            self.state.gc_running.store(false, Ordering::Release);
        }
    }

    /// Counters of this process.
    pub fn counters(&self) -> &StoreCounters {
        &self.state.counters
    }

    /// Wait (bounded) for a background eviction to finish.
    pub fn wait_for_eviction(&self, max: Duration) {
        let start = std::time::Instant::now();
        while self.state.gc_running.load(Ordering::Acquire) && start.elapsed() < max {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Re-hash every chunk; remove the ones whose bytes do not match their name.
    pub fn verify(&self, progress: &dyn Fn(u64, u64)) -> io::Result<VerifyReport> {
        let files = self.walk()?;
        let total = files.len() as u64;
        let mut r = VerifyReport::default();
        for (n, f) in files.into_iter().enumerate() {
            progress(n as u64, total);
            r.checked += 1;
            r.bytes += f.len;
            let Some(id) = f.id else {
                let _ = fs::remove_file(&f.path);
                r.misplaced_removed.push(f.path.display().to_string());
                continue;
            };
            let ok = fs::read(&f.path)
                .map(|b| Digest::of(&b) == id)
                .unwrap_or(false);
            if !ok {
                let _ = fs::remove_file(&f.path);
                r.corrupt_removed.push(id.to_string());
            }
        }
        progress(total, total);
        Ok(r)
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("part");
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    fs::rename(&tmp, path)
}

fn tempfile_in(dir: &Path) -> io::Result<(PathBuf, File)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100u32 {
        let p = dir.join(format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(
        "cannot create a temporary file in the node store",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &NodeStore, data: &[u8]) -> Digest {
        let id = Digest::of(data);
        s.put(&id, data).unwrap();
        id
    }

    #[test]
    fn verified_put_get_and_corruption_dropped() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let data = b"chunk bytes".to_vec();
        let id = Digest::of(&data);
        assert!(s.get(&id).is_none());
        s.put(&id, &data).unwrap();
        assert_eq!(s.get(&id).unwrap(), data);
        std::fs::write(s.path(&id), b"tampered").unwrap();
        assert!(s.get(&id).is_none(), "corrupt chunk served");
        assert!(!s.path(&id).exists());
    }

    #[test]
    fn put_many_stores_everything_once() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let datas: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 100 + i as usize]).collect();
        let items: Vec<(Digest, &[u8])> = datas
            .iter()
            .map(|b| (Digest::of(b), b.as_slice()))
            .collect();
        s.put_many(&items).unwrap();
        s.put_many(&items[..5]).unwrap();
        for (id, b) in &items {
            assert_eq!(s.get(id).unwrap(), *b);
        }
        let st = s.stats().unwrap();
        assert_eq!((st.chunks, st.temp_files), (20, 0));
    }

    #[test]
    fn gc_evicts_least_recently_used_but_never_pinned() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let ids: Vec<Digest> = (0..6u8).map(|i| put(&s, &[i; 1000])).collect();
        // Ages: chunk i was last used i hours ago... reversed: 0 is the oldest.
        for (i, id) in ids.iter().enumerate() {
            let t = SystemTime::now() - Duration::from_secs(3600 * (10 - i as u64));
            File::options()
                .write(true)
                .open(s.path(id))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let pin = s.pin(&ids[..1], &MountInfo::default()).unwrap();
        let r = s.gc(3000).unwrap();
        assert_eq!(r.removed_chunks, 3);
        assert_eq!(r.pinned_kept, 1);
        assert!(s.get(&ids[0]).is_some(), "pinned chunk evicted");
        for id in &ids[1..4] {
            assert!(s.get(id).is_none(), "old chunk kept");
        }
        for id in &ids[4..] {
            assert!(s.get(id).is_some(), "young chunk evicted");
        }
        let st = s.stats().unwrap();
        assert_eq!((st.chunks, st.pinned_chunks, st.mounts.len()), (3, 1, 1));
        s.unpin(&pin);
        let r = s.gc(0).unwrap();
        assert_eq!((r.removed_chunks, r.kept_chunks), (3, 0));
    }

    #[test]
    fn stale_pins_do_not_protect() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let id = put(&s, b"x");
        // A pid that cannot be alive (beyond pid_max).
        std::fs::write(d.path().join("mounts/999999999-0.pin"), id.0).unwrap();
        assert_eq!(s.stats().unwrap().stale_pins, 1);
        let r = s.gc(0).unwrap();
        assert_eq!((r.removed_chunks, r.stale_pins_removed), (1, 1));
    }

    #[test]
    fn quota_is_enforced_on_put() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open_with(
            d.path(),
            StoreOptions {
                quota: Some(10_000),
                shared: None,
            },
        )
        .unwrap();
        for i in 0..40u32 {
            put(&s, &[i.to_le_bytes().as_slice(); 250].concat());
        }
        s.wait_for_eviction(Duration::from_secs(10));
        // Puts may race a running eviction; one more pass settles the quota.
        s.put(&Digest::of(b"last"), b"last").unwrap();
        s.wait_for_eviction(Duration::from_secs(10));
        let st = s.stats().unwrap();
        assert!(st.bytes <= 10_000, "store holds {} bytes", st.bytes);
        assert!(s.state.counters.evicted_chunks.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn shared_tier_is_read_verified_and_never_modified() {
        let shared = tempfile::tempdir().unwrap();
        let local = tempfile::tempdir().unwrap();
        let seed = NodeStore::open(shared.path()).unwrap();
        let good = put(&seed, b"shared chunk");
        let bad = put(&seed, b"will be corrupted");
        std::fs::write(seed.path(&bad), b"rot").unwrap();
        let s = NodeStore::open_with(
            local.path(),
            StoreOptions {
                quota: None,
                shared: Some(shared.path().to_path_buf()),
            },
        )
        .unwrap();
        assert_eq!(s.get(&good).unwrap(), b"shared chunk");
        assert!(s.get(&bad).is_none());
        assert!(seed.path(&bad).exists(), "shared tier modified");
        assert_eq!(s.state.counters.shared_hits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn verify_removes_corrupt_and_misplaced_files() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let a = put(&s, b"aaa");
        let b = put(&s, b"bbb");
        std::fs::write(s.path(&b), b"zzz").unwrap();
        let h = a.hex();
        std::fs::write(d.path().join(&h[..2]).join("junk"), b"?").unwrap();
        let r = s.verify(&|_, _| {}).unwrap();
        assert_eq!(r.checked, 3);
        assert_eq!(r.corrupt_removed, vec![b.to_string()]);
        assert_eq!(r.misplaced_removed.len(), 1);
        assert!(s.get(&a).is_some());
    }
}
