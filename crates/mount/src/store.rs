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
//! * Sealed files: once every chunk of a large regular file is here, the file's whole
//!   content is written out contiguously as `DIR/files/<2 hex>/<key>` (the key names the
//!   file's chunk list, see [`file_key`]) with its chunk list beside it (`<key>.ids`),
//!   so the kernel can read it directly (FUSE passthrough). Its chunk files are then
//!   replaced by 48-byte pointers into it (magic, key, offset, length): the bytes are on
//!   disk once, and chunk lookups by id still find them (verified, as always). A sealed
//!   file, its list and the pointers into it are evicted together.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tessera_format::chunker::MAX_CHUNK;
use tessera_format::digest::Hasher;
use tessera_format::Digest;

/// A hit refreshes a chunk's mtime (its LRU age) at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Sealed files live under `DIR/files`.
const FILES: &str = "files";
/// Extension of a sealed file's chunk list: (sha256, u32 LE length) per chunk.
const IDS_EXT: &str = "ids";
const POINTER_MAGIC: [u8; 4] = *b"TSP1";
/// A pointer: magic, key of the sealed file, offset (u64 LE), length (u32 LE).
pub const POINTER_LEN: usize = 48;

/// The name of the sealed file holding a regular file's content: sha256 over a domain tag
/// and the file's chunk ids, in order (the ids determine the content).
pub fn file_key<'a>(ids: impl IntoIterator<Item = &'a Digest>) -> Digest {
    let mut h = Hasher::new();
    h.update(b"tessera node-store file v1\n");
    for id in ids {
        h.update(&id.0);
    }
    h.finish()
}

/// Where a chunk's bytes are inside a sealed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pointer {
    key: Digest,
    offset: u64,
    len: u32,
}

impl Pointer {
    pub(crate) fn encode(&self) -> [u8; POINTER_LEN] {
        let mut b = [0u8; POINTER_LEN];
        b[..4].copy_from_slice(&POINTER_MAGIC);
        b[4..36].copy_from_slice(&self.key.0);
        b[36..44].copy_from_slice(&self.offset.to_le_bytes());
        b[44..48].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(crate) fn parse(b: &[u8]) -> Option<Pointer> {
        if b.len() != POINTER_LEN || b[..4] != POINTER_MAGIC {
            return None;
        }
        Some(Pointer {
            key: Digest(b[4..36].try_into().ok()?),
            offset: u64::from_le_bytes(b[36..44].try_into().ok()?),
            len: u32::from_le_bytes(b[44..48].try_into().ok()?),
        })
    }
}

/// What [`NodeStore::seal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    /// Written now: bytes of the sealed file, chunk files turned into pointers.
    Written { bytes: u64, pointers: u64 },
    /// The store (or the shared tier) already had it.
    Present,
    /// Some chunk is not here (nothing was written).
    Missing,
}

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
    /// This process's pins, each held open with an exclusive `flock` for the mount's
    /// life: the lock, not a pid, says that a pin is live.
    pins: Mutex<HashMap<PathBuf, File>>,
    /// Sealed files this process checked against their chunk lists, as they were then.
    verified: Mutex<HashMap<Digest, Stamp>>,
    /// A lock per sealed file being opened: concurrent first opens of one file wait for
    /// one check instead of each hashing it, and a mismatch is counted and removed once.
    checking: Mutex<HashMap<Digest, Arc<Mutex<()>>>>,
    /// Chunks in memory, for every mount of this process.
    memory: crate::memory::ChunkMemory,
}

/// What a sealed file was when it was checked: device, inode, size, mtime (s, ns).
type Stamp = (u64, u64, u64, i64, i64);

fn stamp(m: &fs::Metadata) -> Stamp {
    (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())
}

/// Why a sealed file does not match its chunk list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealedMismatch {
    #[error("its chunk list is missing or malformed")]
    List,
    #[error("its chunk list does not hash to its name")]
    ListKey,
    #[error("it has {found} bytes, its chunk list {want}")]
    Size { found: u64, want: u64 },
    #[error("chunk {index} (bytes {offset}..) does not match its id {id}")]
    Chunk {
        index: usize,
        offset: u64,
        id: Digest,
    },
    #[error("it could not be read: {0}")]
    Read(io::ErrorKind),
}

/// What a background eviction shares with the store it works for.
#[derive(Default)]
struct State {
    /// Bytes of chunk files, as counted on open plus what this process added.
    bytes: AtomicU64,
    gc_running: AtomicBool,
    /// Eviction runs again only once the store holds this many bytes (0: at the next
    /// crossing of the quota). A pass that cannot get under the quota (what is left is
    /// pinned) sets it a tenth of the quota above what it kept, so that writes do not
    /// start a pass each; releasing a pin clears it.
    evict_again_at: AtomicU64,
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
    /// Eviction passes started.
    pub eviction_passes: AtomicU64,
    pub sealed_files: AtomicU64,
    pub sealed_bytes: AtomicU64,
}

/// A summary of the store (`tessera cache stats`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreStats {
    pub dir: String,
    /// Chunks held: chunk files plus pointers into sealed files.
    pub chunks: u64,
    /// Bytes on disk: chunk files, pointers, sealed files and their chunk lists.
    pub bytes: u64,
    pub pinned_chunks: u64,
    pub pinned_bytes: u64,
    pub temp_files: u64,
    pub mounts: Vec<MountInfo>,
    pub stale_pins: u64,
    /// Sealed files (whole file contents, read by the kernel directly).
    #[serde(default)]
    pub sealed_files: u64,
    #[serde(default)]
    pub sealed_bytes: u64,
    /// Of `chunks`, how many are pointers into sealed files.
    #[serde(default)]
    pub pointers: u64,
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
    /// Chunks no longer held (chunk files, and pointers of evicted sealed files).
    pub removed_chunks: u64,
    pub removed_bytes: u64,
    pub removed_sealed_files: u64,
    pub kept_chunks: u64,
    pub kept_bytes: u64,
    /// Of `kept_chunks`, those files open on a mount use (never evicted).
    pub pinned_kept: u64,
    /// Of `kept_chunks`, those of mounted images (evicted only after every chunk that no
    /// mounted image uses, and never when the collection spares mounted images).
    #[serde(default)]
    pub mounted_kept: u64,
    pub stale_pins_removed: u64,
    pub temp_files_removed: u64,
    /// Pointers whose sealed file was gone, and chunk lists without their file.
    pub dangling_removed: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Chunk files and pointers checked, and their bytes (pointers: the bytes they name).
    pub checked: u64,
    pub bytes: u64,
    pub corrupt_removed: Vec<String>,
    pub misplaced_removed: Vec<String>,
    /// Sealed files checked (every chunk against the file's list).
    pub sealed_checked: u64,
    pub corrupt_sealed_removed: Vec<String>,
    pub dangling_removed: u64,
}

/// A pin of a live process: its base path (without extension) and what it publishes.
type LivePin = (PathBuf, MountInfo);

/// A pin nobody holds: its base path, and its lock, now held by us.
type StalePin = (PathBuf, File);

/// What a file found by a walk of the store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chunk(Digest),
    Pointer(Digest, Pointer),
    /// A file in a chunk directory whose name is not a chunk id.
    Misplaced,
}

/// One file found by a walk of the chunk directories.
struct ChunkFile {
    path: PathBuf,
    kind: Kind,
    len: u64,
    mtime: SystemTime,
}

/// One sealed file found by a walk of `files/`.
struct SealedFile {
    key: Digest,
    path: PathBuf,
    /// Bytes of the file plus its chunk list.
    len: u64,
    mtime: SystemTime,
    has_ids: bool,
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether the pin file `p` is held by a live mount: its owner keeps an exclusive
/// `flock` on it for the mount's life (a pid would say nothing across pid namespaces, and
/// could be reused). A lock we can take means the holder is gone; it is returned, held,
/// so the stale pin can be removed before anyone else looks. Errors count as live.
fn pin_holder_gone(p: &Path) -> Option<File> {
    let f = File::open(p).ok()?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
    Some(f)
}

/// LRU age: a hit makes the file young again (cheaply: at most once a minute). Returns
/// whether it did.
fn touch(f: &File) -> bool {
    let stale = f
        .metadata()
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().unwrap_or_default() > TOUCH_EVERY)
        .unwrap_or(false);
    stale && f.set_modified(SystemTime::now()).is_ok()
}

fn old_enough(e: &fs::DirEntry) -> bool {
    e.metadata()
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600))
        .unwrap_or(true)
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
            if old_enough(&e) {
                let _ = fs::remove_file(e.path());
            }
        }
        let store = NodeStore {
            dir: dir.to_path_buf(),
            opts,
            state: Arc::default(),
            pins: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
            checking: Mutex::new(HashMap::new()),
            memory: Default::default(),
        };
        if store.opts.quota.is_some() {
            let chunks: u64 = store.walk()?.iter().map(|c| c.len).sum();
            let sealed: u64 = store.walk_sealed()?.iter().map(|c| c.len).sum();
            store.state.bytes.store(chunks + sealed, Ordering::Relaxed);
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

    fn sealed_path_in(dir: &Path, key: &Digest) -> PathBuf {
        let h = key.hex();
        dir.join(FILES).join(&h[..2]).join(h)
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

    fn sub_bytes(&self, n: u64) {
        let _ = self
            .state
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            });
    }

    /// A chunk's verified bytes from the tier rooted at `base` (local or shared). A file
    /// there is a chunk (at most [`MAX_CHUNK`] bytes) or a pointer ([`POINTER_LEN`]):
    /// anything larger, or not a regular file, is refused without being read.
    fn read_in(&self, base: &Path, id: &Digest, local: bool) -> Option<Vec<u8>> {
        let p = NodeStore::path_in(base, id);
        let mut f = File::open(&p).ok()?;
        let buf = match read_file_bounded(&mut f, MAX_CHUNK.max(POINTER_LEN) as u64) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                self.state
                    .counters
                    .corrupt_dropped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(chunk = %id, path = %p.display(), error = %e, "refused a node store file that cannot be a chunk");
                if local && fs::remove_file(&p).is_ok() {
                    self.sub_bytes(f.metadata().map(|m| m.len()).unwrap_or(0));
                }
                return None;
            }
            Err(_) => return None,
        };
        if Digest::of(&buf) == *id {
            if local {
                touch(&f);
            }
            return Some(buf);
        }
        if let Some(ptr) = Pointer::parse(&buf) {
            return self.read_pointed(base, &p, id, &ptr, local);
        }
        self.state
            .counters
            .corrupt_dropped
            .fetch_add(1, Ordering::Relaxed);
        if local {
            tracing::warn!(chunk = %id, path = %p.display(), "corrupt chunk in the node store; removed, will refetch");
            if fs::remove_file(&p).is_ok() {
                self.sub_bytes(buf.len() as u64);
            }
        } else {
            tracing::warn!(chunk = %id, path = %p.display(), "corrupt chunk in the shared tier; ignored");
        }
        None
    }

    /// Follow a pointer into a sealed file; a pointer whose file is gone is removed, a
    /// sealed file whose bytes do not match is removed with it.
    fn read_pointed(
        &self,
        base: &Path,
        ptr_path: &Path,
        id: &Digest,
        ptr: &Pointer,
        local: bool,
    ) -> Option<Vec<u8>> {
        let sp = NodeStore::sealed_path_in(base, &ptr.key);
        let f = match File::open(&sp) {
            Ok(f) => f,
            Err(e) => {
                // Evicted: the pointer is stale. (Other errors, e.g. out of descriptors,
                // say nothing about the pointer.)
                if local && e.kind() == io::ErrorKind::NotFound && fs::remove_file(ptr_path).is_ok()
                {
                    self.sub_bytes(POINTER_LEN as u64);
                }
                return None;
            }
        };
        // A chunk is at most MAX_CHUNK bytes and lies inside the file: a pointer saying
        // otherwise is corrupt (and must not make us allocate what it claims).
        let fits = ptr.len as usize <= MAX_CHUNK
            && f.metadata().is_ok_and(|m| {
                ptr.offset
                    .checked_add(ptr.len as u64)
                    .is_some_and(|e| e <= m.len())
            });
        let mut buf = if fits {
            vec![0u8; ptr.len as usize]
        } else {
            Vec::new()
        };
        if fits && f.read_exact_at(&mut buf, ptr.offset).is_ok() && Digest::of(&buf) == *id {
            if local {
                self.touch_sealed(&ptr.key, &f);
            }
            return Some(buf);
        }
        self.state
            .counters
            .corrupt_dropped
            .fetch_add(1, Ordering::Relaxed);
        if local {
            tracing::warn!(chunk = %id, sealed = %sp.display(), "corrupt sealed file in the node store; removed, will refetch");
            self.remove_sealed(&sp);
            if fs::remove_file(ptr_path).is_ok() {
                self.sub_bytes(POINTER_LEN as u64);
            }
        } else {
            tracing::warn!(chunk = %id, sealed = %sp.display(), "corrupt sealed file in the shared tier; ignored");
        }
        None
    }

    /// Remove a sealed file and its chunk list (their pointers dangle and go lazily).
    fn remove_sealed(&self, p: &Path) {
        let mut n = 0;
        for q in [p.to_path_buf(), p.with_extension(IDS_EXT)] {
            let len = fs::metadata(&q).map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(&q).is_ok() {
                n += len;
            }
        }
        self.sub_bytes(n);
    }

    /// The chunk's bytes if the store (or the shared tier) holds a verified copy.
    pub fn get(&self, id: &Digest) -> Option<Vec<u8>> {
        if let Some(b) = self.read_in(&self.dir, id, true) {
            self.state.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Some(b);
        }
        let shared = self.opts.shared.as_deref()?;
        let b = self.read_in(shared, id, false)?;
        self.state
            .counters
            .shared_hits
            .fetch_add(1, Ordering::Relaxed);
        Some(b)
    }

    /// The sealed file `key` of the local store, opened for reading (`Ok(None)`: there is
    /// none). Before this process first hands it out, and again whenever its device,
    /// inode, size or mtime differ from when it was last checked, the whole file is
    /// checked against its chunk list (under a lock of its own: only opens of this file
    /// wait, and they wait for this check rather than repeat it); one that
    /// does not match is logged and removed with its list (its pointers then dangle and
    /// go when met), and is the error. A shared tier's sealed files are never handed out
    /// (their bytes reach readers only through verified chunk reads).
    pub fn open_sealed(&self, key: &Digest) -> Result<Option<File>, SealedMismatch> {
        let gate = self
            .checking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*key)
            .or_default()
            .clone();
        let held = gate.lock().unwrap_or_else(|e| e.into_inner());
        // Opened under the lock: after another open removed a rotten file, this one
        // finds none (or a new one) rather than checking and removing again.
        let r = self.open_sealed_checked(key);
        drop(held);
        let mut checking = self.checking.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this call hold it: nobody waits, it goes.
        if Arc::strong_count(&gate) == 2 {
            checking.remove(key);
        }
        r
    }

    /// [`NodeStore::open_sealed`], under the file's lock.
    fn open_sealed_checked(&self, key: &Digest) -> Result<Option<File>, SealedMismatch> {
        let path = NodeStore::sealed_path_in(&self.dir, key);
        let Ok(f) = File::open(&path) else {
            return Ok(None);
        };
        let now = f
            .metadata()
            .map(|m| stamp(&m))
            .map_err(|e| SealedMismatch::Read(e.kind()))?;
        if self.verified_lock().get(key) != Some(&now) {
            if let Err(e) = check_sealed(key, &path, &f) {
                self.verified_lock().remove(key);
                self.state
                    .counters
                    .corrupt_dropped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sealed = %key, path = %path.display(), error = %e, "corrupt sealed file in the node store: not passed through; removed, will refetch");
                self.remove_sealed(&path);
                return Err(e);
            }
            self.verified_lock().insert(*key, now);
        }
        self.touch_sealed(key, &f);
        Ok(Some(f))
    }

    fn verified_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Stamp>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`touch`] the sealed file `key`; if this process had checked it as it was, it
    /// stays checked as it is now (only its mtime changed, and by us).
    fn touch_sealed(&self, key: &Digest, f: &File) {
        let Ok(before) = f.metadata().map(|m| stamp(&m)) else {
            return;
        };
        if touch(f) {
            if let Ok(after) = f.metadata().map(|m| stamp(&m)) {
                let mut v = self.verified_lock();
                if v.get(key) == Some(&before) {
                    v.insert(*key, after);
                }
            }
        }
    }

    /// Whether the local store has the sealed file `key`.
    pub fn has_sealed(&self, key: &Digest) -> bool {
        NodeStore::sealed_path_in(&self.dir, key).exists()
    }

    /// Write the sealed file `key` from `chunks` (id, length), in order, taking each
    /// chunk from `mem` (by position) or else from the store (verified): nothing is
    /// fetched. Then the chunk files become pointers into it.
    pub fn seal(
        &self,
        key: &Digest,
        chunks: &[(Digest, u32)],
        mem: &dyn Fn(usize) -> Option<Arc<[u8]>>,
    ) -> io::Result<Sealed> {
        if self.has_sealed(key) {
            return Ok(Sealed::Present);
        }
        let final_path = NodeStore::sealed_path_in(&self.dir, key);
        let (tmp, f) = tempfile_in(&self.dir.join("tmp"))?;
        let cleanup = || {
            let _ = fs::remove_file(&tmp);
        };
        let mut out = io::BufWriter::with_capacity(1 << 20, f);
        let mut list = Vec::with_capacity(chunks.len() * 36);
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut offset = 0u64;
        for (k, (id, len)) in chunks.iter().enumerate() {
            let data = match mem(k) {
                Some(d) => d,
                None => match self.get(id) {
                    Some(b) => b.into(),
                    None => {
                        cleanup();
                        return Ok(Sealed::Missing);
                    }
                },
            };
            if data.len() != *len as usize {
                cleanup();
                return Ok(Sealed::Missing);
            }
            if let Err(e) = out.write_all(&data) {
                cleanup();
                return Err(e);
            }
            list.extend_from_slice(&id.0);
            list.extend_from_slice(&len.to_le_bytes());
            offsets.push(offset);
            offset += *len as u64;
        }
        // The list's temp file is made last: a seal of a huge file may outlast the age
        // after which other processes clean up temp files.
        let mut ids_tmp = None;
        let written = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| {
                f.sync_data()?;
                f.set_permissions(fs::Permissions::from_mode(0o444))
            })
            .and_then(|_| {
                let (p, mut g) = tempfile_in(&self.dir.join("tmp"))?;
                ids_tmp = Some(p.clone());
                g.write_all(&list)?;
                g.sync_data()?;
                Ok(p)
            })
            // The list first: a sealed file is never without its list.
            .and_then(|ids| {
                fs::create_dir_all(final_path.parent().unwrap_or(&self.dir))?;
                fs::rename(&ids, final_path.with_extension(IDS_EXT))
            })
            .and_then(|_| fs::rename(&tmp, &final_path));
        if let Err(e) = written {
            cleanup();
            if let Some(p) = ids_tmp {
                let _ = fs::remove_file(p);
            }
            let _ = fs::remove_file(final_path.with_extension(IDS_EXT));
            return Err(e);
        }
        let sealed_bytes = offset + list.len() as u64;
        self.state.bytes.fetch_add(sealed_bytes, Ordering::Relaxed);
        self.state
            .counters
            .sealed_files
            .fetch_add(1, Ordering::Relaxed);
        self.state
            .counters
            .sealed_bytes
            .fetch_add(offset, Ordering::Relaxed);
        // Chunk files → pointers (the first place of a chunk repeated in the file).
        let mut staged = Vec::new();
        let mut seen = HashSet::new();
        for ((id, len), off) in chunks.iter().zip(&offsets) {
            if *len as usize <= POINTER_LEN || !seen.insert(*id) {
                continue;
            }
            let p = self.path(id);
            // A chunk file becomes a pointer; a chunk not written yet (still on its way
            // to the store) gets one, so it is not written out a second time.
            let replaces = match fs::metadata(&p) {
                Ok(m) => m.is_file() && m.len() == *len as u64,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
            if !replaces {
                continue;
            }
            if let Some(parent) = p.parent() {
                let _ = fs::create_dir_all(parent);
            }
            let ptr = Pointer {
                key: *key,
                offset: *off,
                len: *len,
            };
            match tempfile_in(&self.dir.join("tmp")) {
                Ok((t, mut g)) => {
                    if g.write_all(&ptr.encode()).is_ok() {
                        staged.push((t, p));
                    } else {
                        let _ = fs::remove_file(&t);
                    }
                }
                Err(_) => break,
            }
        }
        let synced =
            File::open(&self.dir).and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from));
        let mut pointers = 0;
        for (t, p) in staged {
            let was = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            if synced.is_ok() && fs::rename(&t, &p).is_ok() {
                pointers += 1;
                self.sub_bytes(was);
                self.state
                    .bytes
                    .fetch_add(POINTER_LEN as u64, Ordering::Relaxed);
            } else {
                let _ = fs::remove_file(&t);
            }
        }
        self.check_quota();
        Ok(Sealed::Written {
            bytes: offset,
            pointers,
        })
    }

    fn check_quota(&self) {
        if let Some(q) = self.opts.quota {
            let bytes = self.state.bytes.load(Ordering::Relaxed);
            if bytes > q && bytes >= self.state.evict_again_at.load(Ordering::Relaxed) {
                self.evict_in_background(q);
            }
        }
    }

    /// Store verified bytes (the caller checked `Digest::of(data) == id`). Never replaces
    /// what is there (a pointer written by a seal meanwhile stays).
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
            .and_then(|_| rename_noreplace(&tmp, &p));
        match written {
            Ok(true) => {}
            Ok(false) => {
                let _ = fs::remove_file(&tmp);
                return Ok(());
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        self.state
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.check_quota();
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
            // Sealed meanwhile: the pointer stays (the bytes are in the sealed file).
            if p.exists() {
                let _ = fs::remove_file(&tmp);
                continue;
            }
            let moved = match &result {
                Ok(()) => p
                    .parent()
                    .map_or(Ok(()), fs::create_dir_all)
                    .and_then(|_| rename_noreplace(&tmp, &p)),
                Err(_) => Err(io::Error::other("not synced")),
            };
            match moved {
                Ok(true) => added += len,
                // Sealed (a pointer) or written by another process meanwhile.
                Ok(false) => {
                    let _ = fs::remove_file(&tmp);
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        self.state.bytes.fetch_add(added, Ordering::Relaxed);
        self.check_quota();
        result
    }

    /// Keep `ids` (chunk ids and sealed-file keys) from eviction while this pin is held
    /// (until [`NodeStore::unpin`], or this process ends); `info` is published beside.
    pub fn pin(&self, ids: &[Digest], info: &MountInfo) -> io::Result<PathBuf> {
        let mounts = self.dir.join("mounts");
        fs::create_dir_all(&mounts)?;
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        // Never reused while the process lives (mounts come and go in a daemon).
        static PIN_SEQ: AtomicU64 = AtomicU64::new(0);
        let base = mounts.join(format!(
            "{}-{}",
            std::process::id(),
            PIN_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut bytes = Vec::with_capacity(ids.len() * 32);
        for id in ids {
            bytes.extend_from_slice(&id.0);
        }
        // Locked before it is visible under its name: a gc never sees it unlocked.
        let path = base.with_extension("pin");
        let tmp = base.with_extension("pin.part");
        let held = File::create(&tmp).and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_data()?;
            rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
            fs::rename(&tmp, &path)?;
            Ok(f)
        });
        let held = match held {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let json = serde_json::to_vec_pretty(info).map_err(io::Error::other)?;
        if let Err(e) = write_atomic(&base.with_extension("json"), &json) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        pins.insert(base.clone(), held);
        Ok(base)
    }

    /// Replace what the pin `pin` keeps with `ids` (a mount's open files changed;
    /// `released`: some file that was open is not any more). The file is rewritten in
    /// place, under the lock it is held by: a gc in another process reading it meanwhile
    /// may see old and new ids mixed or the file cut short, and then evict a chunk of an
    /// open file, which is fetched again when read (files opened since the last rewrite,
    /// up to half a second ago, are not pinned yet either).
    pub fn repin(&self, pin: &Path, ids: &[Digest], released: bool) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut bytes = Vec::with_capacity(ids.len() * 32);
        for id in ids {
            bytes.extend_from_slice(&id.0);
        }
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = pins.get(pin) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such pin"));
        };
        f.write_all_at(&bytes, 0)?;
        f.set_len(bytes.len() as u64)?;
        drop(pins);
        if released {
            // What the pin let go of may go now: the next write over the quota evicts
            // again.
            self.state.evict_again_at.store(0, Ordering::Relaxed);
            self.check_quota();
        }
        Ok(())
    }

    /// Record every id (chunks and sealed-file keys) of the image mounted under `pin`:
    /// eviction takes such chunks only after every chunk no mounted image uses
    /// ([`NodeStore::gc_with`]). Written once, beside the pin (`.image`), renamed into
    /// place but not synced: after a crash the pin is stale and the file goes with it.
    pub fn set_image(&self, pin: &Path, ids: &[Digest]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(ids.len() * 32);
        for id in ids {
            bytes.extend_from_slice(&id.0);
        }
        let path = pin.with_extension("image");
        let tmp = path.with_extension("image.part");
        fs::write(&tmp, &bytes).and_then(|()| fs::rename(&tmp, &path))
    }

    /// Update what a pinned mount publishes (its counters).
    pub fn publish(&self, pin: &Path, info: &MountInfo) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(info).map_err(io::Error::other)?;
        write_atomic(&pin.with_extension("json"), &json)
    }

    /// Chunks kept in memory for every mount of this process (verified, by id).
    pub fn memory(&self) -> &crate::memory::ChunkMemory {
        &self.memory
    }

    /// Drop a pin (the mount ended): its files go, then its lock.
    pub fn unpin(&self, pin: &Path) {
        // What the pin held may go now: the next write over the quota evicts again.
        self.state.evict_again_at.store(0, Ordering::Relaxed);
        let _ = fs::remove_file(pin.with_extension("pin"));
        let _ = fs::remove_file(pin.with_extension("json"));
        let _ = fs::remove_file(pin.with_extension("image"));
        self.pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pin);
    }

    /// Live pins: (pin base path, info); stale ones (nobody holds their lock) are listed
    /// separately, each with its lock, now held by us.
    fn pins(&self) -> io::Result<(Vec<LivePin>, Vec<StalePin>)> {
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
            if let Some(lock) = pin_holder_gone(&p) {
                stale.push((base, lock));
                continue;
            }
            let pid = base
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split('-').next())
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0);
            let info = read_bounded(&base.with_extension("json"), MAX_INFO_JSON)
                .ok()
                .and_then(|b| serde_json::from_slice::<MountInfo>(&b).ok())
                .unwrap_or(MountInfo {
                    pid,
                    ..Default::default()
                });
            live.push((base, info));
        }
        Ok((live, stale))
    }

    fn pinned_ids(&self, live: &[LivePin]) -> HashSet<Digest> {
        self.ids_beside(live, "pin")
    }

    /// Every id of the images mounted now (their `.image` files).
    fn mounted_ids(&self, live: &[LivePin]) -> HashSet<Digest> {
        self.ids_beside(live, "image")
    }

    fn ids_beside(&self, live: &[LivePin], ext: &str) -> HashSet<Digest> {
        let mut set = HashSet::new();
        for (base, _) in live {
            if let Ok(b) = fs::read(base.with_extension(ext)) {
                for c in b.chunks_exact(32) {
                    if let Ok(a) = <[u8; 32]>::try_from(c) {
                        set.insert(Digest(a));
                    }
                }
            }
        }
        set
    }

    /// Every file of the local store's chunk directories (pointers read and parsed).
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
                let kind = match id {
                    None => Kind::Misplaced,
                    Some(id) if m.len() == POINTER_LEN as u64 => {
                        // A 48-byte chunk that happens to look like a pointer is a chunk.
                        match read_bounded(&f.path(), POINTER_LEN as u64)
                            .ok()
                            .filter(|b| Digest::of(b) != id)
                            .and_then(|b| Pointer::parse(&b))
                        {
                            Some(p) => Kind::Pointer(id, p),
                            None => Kind::Chunk(id),
                        }
                    }
                    Some(id) => Kind::Chunk(id),
                };
                out.push(ChunkFile {
                    path: f.path(),
                    kind,
                    len: m.len(),
                    mtime: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }

    /// Every sealed file of the local store, and stray files under `files/` (chunk lists
    /// without their file, foreign names).
    fn walk_sealed(&self) -> io::Result<Vec<SealedFile>> {
        Ok(self.walk_sealed_with_strays()?.0)
    }

    fn walk_sealed_with_strays(&self) -> io::Result<(Vec<SealedFile>, Vec<PathBuf>)> {
        let mut files = Vec::new();
        let mut strays = Vec::new();
        let Ok(rd) = fs::read_dir(self.dir.join(FILES)) else {
            return Ok((files, strays));
        };
        for sub in rd.flatten() {
            if !sub.path().is_dir() {
                continue;
            }
            let mut lists = HashMap::new();
            let mut found = Vec::new();
            for f in fs::read_dir(sub.path())?.flatten() {
                let Ok(m) = f.metadata() else { continue };
                let fname = f.file_name();
                let Some(n) = fname.to_str() else {
                    strays.push(f.path());
                    continue;
                };
                let (stem, is_list) = match n.strip_suffix(".ids") {
                    Some(s) => (s, true),
                    None => (n, false),
                };
                let key = (stem.len() == 64 && is_hex(stem))
                    .then(|| format!("sha256:{stem}").parse::<Digest>().ok())
                    .flatten();
                match (key, is_list) {
                    (Some(k), true) => {
                        lists.insert(k, (f.path(), m.len()));
                    }
                    (Some(k), false) if m.is_file() => found.push((k, f.path(), m)),
                    _ => strays.push(f.path()),
                }
            }
            for (key, path, m) in found {
                let list = lists.remove(&key);
                files.push(SealedFile {
                    key,
                    path,
                    len: m.len() + list.as_ref().map_or(0, |l| l.1),
                    mtime: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    has_ids: list.is_some(),
                });
            }
            strays.extend(lists.into_values().map(|(p, _)| p));
        }
        Ok((files, strays))
    }

    pub fn stats(&self) -> io::Result<StoreStats> {
        let files = self.walk()?;
        let sealed = self.walk_sealed()?;
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
            sealed_files: sealed.len() as u64,
            sealed_bytes: sealed.iter().map(|f| f.len).sum(),
            pointers: 0,
        };
        let mut pinned_keys = HashSet::new();
        for f in &files {
            s.bytes += f.len;
            let id = match f.kind {
                Kind::Chunk(id) => id,
                Kind::Pointer(id, p) => {
                    s.pointers += 1;
                    if pinned.contains(&id) {
                        pinned_keys.insert(p.key);
                    }
                    id
                }
                Kind::Misplaced => continue,
            };
            s.chunks += 1;
            if pinned.contains(&id) {
                s.pinned_chunks += 1;
                s.pinned_bytes += f.len;
            }
        }
        for f in &sealed {
            s.bytes += f.len;
            if pinned.contains(&f.key) || pinned_keys.contains(&f.key) {
                s.pinned_bytes += f.len;
            }
        }
        Ok(s)
    }

    /// [`NodeStore::gc_with`] that may take mounted images' chunks (after all others), as
    /// the quota's eviction does.
    pub fn gc(&self, max_bytes: u64) -> io::Result<GcReport> {
        self.gc_with(max_bytes, false)
    }

    /// Evict least recently used chunks until the store holds at most `max_bytes`: first
    /// those no mounted image uses, then (unless `spare_mounted`) those of mounted images
    /// whose files are not open; never those of open files. Also removes stale pins, old
    /// temp files and dangling pointers. A sealed file goes with its chunk list and every
    /// pointer into it, as one unit, pinned (or mounted) when any of its chunks (or the
    /// file itself) is.
    pub fn gc_with(&self, max_bytes: u64, spare_mounted: bool) -> io::Result<GcReport> {
        let mut r = GcReport::default();
        // Bytes this process adds while the walk runs are not in it: kept on top.
        let counted_before = self.state.bytes.load(Ordering::Relaxed);
        let (live, stale) = self.pins()?;
        for (base, _lock) in stale {
            let _ = fs::remove_file(base.with_extension("pin"));
            let _ = fs::remove_file(base.with_extension("json"));
            let _ = fs::remove_file(base.with_extension("image"));
            r.stale_pins_removed += 1;
        }
        // Pins and publications a process died writing (`*.part`).
        for e in fs::read_dir(self.dir.join("mounts"))?.flatten() {
            let part = e.path().extension().and_then(|x| x.to_str()) == Some("part");
            if part && old_enough(&e) && fs::remove_file(e.path()).is_ok() {
                r.temp_files_removed += 1;
            }
        }
        for e in fs::read_dir(self.dir.join("tmp"))?.flatten() {
            if old_enough(&e) && fs::remove_file(e.path()).is_ok() {
                r.temp_files_removed += 1;
            }
        }
        let pinned = self.pinned_ids(&live);
        let mounted = self.mounted_ids(&live);
        let (sealed, strays) = self.walk_sealed_with_strays()?;
        for p in strays {
            // A list without its file: left by a seal that failed, or one that is being
            // sealed right now (the list is renamed in first) — only old ones go.
            let ours = p.extension().and_then(|x| x.to_str()) == Some(IDS_EXT);
            let old = fs::metadata(&p)
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600))
                .unwrap_or(false);
            if ours && old && !p.with_extension("").exists() && fs::remove_file(&p).is_ok() {
                r.dangling_removed += 1;
            }
        }
        /// What is evicted together: paths, bytes, last use, pinned, chunks it holds.
        struct Unit {
            paths: Vec<PathBuf>,
            bytes: u64,
            mtime: SystemTime,
            pinned: bool,
            mounted: bool,
            chunks: u64,
            sealed: bool,
        }
        let mut units: Vec<Unit> = Vec::new();
        let mut by_key: HashMap<Digest, usize> = HashMap::new();
        for f in sealed {
            by_key.insert(f.key, units.len());
            units.push(Unit {
                paths: vec![f.path.with_extension(IDS_EXT), f.path],
                bytes: f.len,
                mtime: f.mtime,
                pinned: pinned.contains(&f.key),
                mounted: mounted.contains(&f.key),
                chunks: 0,
                sealed: true,
            });
        }
        let mut total = 0;
        for f in self.walk()? {
            match f.kind {
                Kind::Chunk(id) => units.push(Unit {
                    paths: vec![f.path],
                    bytes: f.len,
                    mtime: f.mtime,
                    pinned: pinned.contains(&id),
                    mounted: mounted.contains(&id),
                    chunks: 1,
                    sealed: false,
                }),
                Kind::Pointer(id, p) => match by_key.get(&p.key) {
                    Some(&u) => {
                        let u = &mut units[u];
                        // Pointers go first, so none outlives its file.
                        u.paths.insert(0, f.path);
                        u.bytes += f.len;
                        u.chunks += 1;
                        u.pinned |= pinned.contains(&id);
                        u.mounted |= mounted.contains(&id);
                    }
                    // Dangling, unless its file was sealed after the walk of files/.
                    None if !NodeStore::sealed_path_in(&self.dir, &p.key).exists() => {
                        if fs::remove_file(&f.path).is_ok() {
                            r.dangling_removed += 1;
                        }
                    }
                    None => {
                        r.kept_chunks += 1;
                        r.kept_bytes += f.len;
                        total += f.len;
                    }
                },
                Kind::Misplaced => total += f.len,
            }
        }
        total += units.iter().map(|u| u.bytes).sum::<u64>();
        // What no mounted image uses goes first, least recently used first.
        units.sort_by_key(|u| (u.mounted, u.mtime));
        for u in units {
            if total > max_bytes && !u.pinned && !(spare_mounted && u.mounted) {
                let mut removed = true;
                for p in &u.paths {
                    removed &= fs::remove_file(p).is_ok() || !p.exists();
                }
                if removed {
                    total -= u.bytes;
                    r.removed_chunks += u.chunks;
                    r.removed_bytes += u.bytes;
                    r.removed_sealed_files += u.sealed as u64;
                    continue;
                }
            }
            r.kept_chunks += u.chunks;
            r.kept_bytes += u.bytes;
            if u.pinned {
                r.pinned_kept += u.chunks;
            }
            if u.mounted {
                r.mounted_kept += u.chunks;
            }
        }
        let _ = self
            .state
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                Some(total + now.saturating_sub(counted_before))
            });
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
            pins: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
            checking: Mutex::new(HashMap::new()),
            // The eviction pass reads no chunk into memory.
            memory: crate::memory::ChunkMemory::new(0),
        };
        self.state
            .counters
            .eviction_passes
            .fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("tessera-evict".into())
            .spawn(move || {
                match me.gc(quota / 10 * 9) {
                    Ok(r) => {
                        let again = if r.kept_bytes > quota {
                            r.kept_bytes + quota / 10
                        } else {
                            0
                        };
                        me.state.evict_again_at.store(again, Ordering::Relaxed);
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
                                "node store stays over quota: the rest is used by files open on mounts"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "node store eviction failed"),
                }
                me.state.gc_running.store(false, Ordering::Release);
                // Writes made while the pass ran were not in its walk: look again.
                me.check_quota();
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

    /// Check a sealed file found by a walk against its chunk list ([`check_sealed`]).
    fn sealed_ok(f: &SealedFile) -> bool {
        f.has_ids
            && File::open(&f.path).is_ok_and(|file| check_sealed(&f.key, &f.path, &file).is_ok())
    }

    /// Re-hash every chunk, pointer and sealed file; remove what does not match its name.
    pub fn verify(&self, progress: &dyn Fn(u64, u64)) -> io::Result<VerifyReport> {
        let (sealed, _) = self.walk_sealed_with_strays()?;
        let files = self.walk()?;
        let total = (files.len() + sealed.len()) as u64;
        let mut r = VerifyReport::default();
        let mut n = 0;
        // Sealed files first: pointers into a corrupt one then dangle and go too.
        for f in sealed {
            progress(n, total);
            n += 1;
            r.sealed_checked += 1;
            if !NodeStore::sealed_ok(&f) {
                self.remove_sealed(&f.path);
                r.corrupt_sealed_removed.push(f.key.to_string());
            }
        }
        for f in files {
            progress(n, total);
            n += 1;
            r.checked += 1;
            match f.kind {
                Kind::Misplaced => {
                    let _ = fs::remove_file(&f.path);
                    r.misplaced_removed.push(f.path.display().to_string());
                }
                Kind::Chunk(id) => {
                    r.bytes += f.len;
                    let ok = read_bounded(&f.path, MAX_CHUNK.max(POINTER_LEN) as u64)
                        .map(|b| {
                            // Sealed since the walk: a pointer now, checked as one.
                            Digest::of(&b) == id
                                || Pointer::parse(&b).is_some_and(|p| {
                                    self.read_pointed(&self.dir, &f.path, &id, &p, true)
                                        .is_some()
                                })
                        })
                        .unwrap_or(false);
                    if !ok && f.path.exists() {
                        let _ = fs::remove_file(&f.path);
                        r.corrupt_removed.push(id.to_string());
                    }
                }
                Kind::Pointer(id, p) => {
                    r.bytes += p.len as u64;
                    let sp = NodeStore::sealed_path_in(&self.dir, &p.key);
                    // A pointer names at most one chunk: never allocate what it claims.
                    let mut buf = vec![0u8; (p.len as usize).min(MAX_CHUNK + 1)];
                    match File::open(&sp) {
                        Err(_) => {
                            let _ = fs::remove_file(&f.path);
                            r.dangling_removed += 1;
                        }
                        Ok(s) => {
                            let ok = p.len as usize <= MAX_CHUNK
                                && s.read_exact_at(&mut buf, p.offset).is_ok()
                                && Digest::of(&buf) == id;
                            if !ok {
                                let _ = fs::remove_file(&f.path);
                                r.corrupt_removed.push(id.to_string());
                            }
                        }
                    }
                }
            }
        }
        progress(total, total);
        Ok(r)
    }
}

/// Check the sealed file `key` (at `path`, open as `file`) against its chunk list beside
/// it: the list must hash to the file's name, the file's size must be the sum of the
/// list's lengths, and every chunk of the file must hash to its id.
fn check_sealed(key: &Digest, path: &Path, file: &File) -> Result<(), SealedMismatch> {
    let list = fs::read(path.with_extension(IDS_EXT)).map_err(|_| SealedMismatch::List)?;
    let ids = parse_chunk_list(&list).ok_or(SealedMismatch::List)?;
    if ids.iter().any(|(_, len)| *len as usize > MAX_CHUNK) {
        return Err(SealedMismatch::List);
    }
    if file_key(ids.iter().map(|(id, _)| id)) != *key {
        return Err(SealedMismatch::ListKey);
    }
    let want: u64 = ids.iter().map(|(_, len)| *len as u64).sum();
    let found = file
        .metadata()
        .map_err(|e| SealedMismatch::Read(e.kind()))?
        .len();
    if found != want {
        return Err(SealedMismatch::Size { found, want });
    }
    let mut buf = Vec::new();
    let mut offset = 0u64;
    for (index, (id, len)) in ids.iter().enumerate() {
        buf.resize(*len as usize, 0);
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| SealedMismatch::Read(e.kind()))?;
        if Digest::of(&buf) != *id {
            return Err(SealedMismatch::Chunk {
                index,
                offset,
                id: *id,
            });
        }
        offset += *len as u64;
    }
    Ok(())
}

/// A sealed file's chunk list (`<key>.ids`): (sha256, u32 LE length) per chunk.
pub(crate) fn parse_chunk_list(b: &[u8]) -> Option<Vec<(Digest, u32)>> {
    if !b.len().is_multiple_of(36) {
        return None;
    }
    b.chunks_exact(36)
        .map(|e| {
            Some((
                Digest(e[..32].try_into().ok()?),
                u32::from_le_bytes(e[32..].try_into().ok()?),
            ))
        })
        .collect()
}

/// Largest `<pin>.json` read (what a mount publishes about itself).
const MAX_INFO_JSON: u64 = 1 << 20;

/// All of `f`, a regular file of at most `max` bytes; anything else is refused with
/// `InvalidData` (never read past `max + 1` bytes, so a huge or endless file costs
/// nothing).
fn read_file_bounded(f: &mut File, max: u64) -> io::Result<Vec<u8>> {
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    if m.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes, more than the {max} it can hold", m.len()),
        ));
    }
    let mut buf = Vec::with_capacity(m.len() as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("grew past the {max} bytes it can hold"),
        ));
    }
    Ok(buf)
}

/// [`read_file_bounded`] of the file at `p`.
fn read_bounded(p: &Path, max: u64) -> io::Result<Vec<u8>> {
    read_file_bounded(&mut File::open(p)?, max)
}

/// Rename `from` to `to` unless `to` exists: Ok(false) when it did. Filesystems without
/// RENAME_NOREPLACE fall back to a check and a plain rename (a narrow race: at worst a
/// chunk is stored twice).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            if to.exists() {
                return Ok(false);
            }
            fs::rename(from, to).map(|_| true)
        }
        Err(e) => Err(e.into()),
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

    /// Six chunks of 1000 bytes, chunk i last used 10 - i hours ago (0 is the oldest).
    fn six_aged_chunks(s: &NodeStore) -> Vec<Digest> {
        let ids: Vec<Digest> = (0..6u8).map(|i| put(s, &[i; 1000])).collect();
        for (i, id) in ids.iter().enumerate() {
            let t = SystemTime::now() - Duration::from_secs(3600 * (10 - i as u64));
            File::options()
                .write(true)
                .open(s.path(id))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        ids
    }

    #[test]
    fn gc_evicts_least_recently_used_but_never_pinned() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let ids = six_aged_chunks(&s);
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
    fn eviction_takes_mounted_images_last_and_open_files_never() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let ids = six_aged_chunks(&s);
        // Chunks 0..3 belong to a mounted image and are the oldest; 3..6 to nothing.
        let pin = s.pin(&ids[..1], &MountInfo::default()).unwrap();
        s.set_image(&pin, &ids[..3]).unwrap();
        // Down to 4000 bytes: the unmounted chunks go first although they are younger.
        let r = s.gc(4000).unwrap();
        assert_eq!(r.removed_chunks, 2);
        assert!(ids[..3].iter().all(|id| s.get(id).is_some()));
        assert_eq!((r.mounted_kept, r.pinned_kept), (3, 1));
        // Sparing mounted images: nothing more goes, whatever the size asked.
        let r = s.gc_with(0, true).unwrap();
        assert_eq!(r.removed_chunks, 1, "{r:?}");
        assert!(ids[..3].iter().all(|id| s.get(id).is_some()));
        // Not sparing them: all but the open file's chunk.
        let r = s.gc(0).unwrap();
        assert_eq!((r.removed_chunks, r.kept_chunks), (2, 1));
        assert!(s.get(&ids[0]).is_some());
        s.unpin(&pin);
        assert!(!pin.with_extension("image").exists());
    }

    #[test]
    fn a_pin_follows_what_is_open() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let ids: Vec<Digest> = (0..4u8).map(|i| put(&s, &[i; 1000])).collect();
        let pin = s.pin(&ids, &MountInfo::default()).unwrap();
        // Fewer ids than before: the file shrinks, no old id stays behind.
        s.repin(&pin, &ids[3..], true).unwrap();
        assert_eq!(s.stats().unwrap().pinned_chunks, 1);
        let r = s.gc(0).unwrap();
        assert_eq!((r.removed_chunks, r.pinned_kept), (3, 1));
        assert!(s.get(&ids[3]).is_some());
        // Nothing open: nothing pinned, the mount is still listed.
        s.repin(&pin, &[], true).unwrap();
        let st = s.stats().unwrap();
        assert_eq!((st.pinned_chunks, st.mounts.len()), (0, 1));
        assert_eq!(s.gc(0).unwrap().removed_chunks, 1);
        s.unpin(&pin);
        assert!(
            s.repin(&pin, &ids, false).is_err(),
            "a pin that is gone came back"
        );
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
    fn eviction_runs_once_per_crossing_while_what_is_left_is_pinned() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open_with(
            d.path(),
            StoreOptions {
                quota: Some(10_000),
                shared: None,
            },
        )
        .unwrap();
        let passes = || s.state.counters.eviction_passes.load(Ordering::Relaxed);
        // 40 KB that a mounted image pins: over the quota, nothing evictable.
        let ids: Vec<Digest> = (0..40u32)
            .map(|i| Digest::of(&[i.to_le_bytes().as_slice(); 250].concat()))
            .collect();
        let pin = s.pin(&ids, &MountInfo::default()).unwrap();
        for i in 0..40u32 {
            put(&s, &[i.to_le_bytes().as_slice(); 250].concat());
            s.wait_for_eviction(Duration::from_secs(10));
        }
        let after_fill = passes();
        assert!(after_fill >= 1);
        // Small writes while over the quota start no pass each.
        for i in 0..100u32 {
            put(&s, format!("small {i}").as_bytes());
            s.wait_for_eviction(Duration::from_secs(10));
        }
        assert_eq!(passes(), after_fill, "eviction re-ran on every write");
        // Once the pin goes, the next write evicts, down under the quota.
        s.unpin(&pin);
        put(&s, b"after the pin");
        s.wait_for_eviction(Duration::from_secs(10));
        assert_eq!(passes(), after_fill + 1);
        assert!(s.stats().unwrap().bytes <= 10_000);
    }

    /// A store at `local` with the shared tier `shared`.
    fn with_shared_tier(local: &Path, shared: &Path) -> NodeStore {
        NodeStore::open_with(
            local,
            StoreOptions {
                quota: None,
                shared: Some(shared.to_path_buf()),
            },
        )
        .unwrap()
    }

    #[test]
    fn shared_tier_is_read_verified_and_never_modified() {
        let shared = tempfile::tempdir().unwrap();
        let local = tempfile::tempdir().unwrap();
        let seed = NodeStore::open(shared.path()).unwrap();
        let good = put(&seed, b"shared chunk");
        let bad = put(&seed, b"will be corrupted");
        std::fs::write(seed.path(&bad), b"rot").unwrap();
        let s = with_shared_tier(local.path(), shared.path());
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

    /// Three chunks of a file, stored; returns (chunk list, bytes of the whole file).
    fn stored_file(s: &NodeStore) -> (Vec<(Digest, u32)>, Vec<u8>) {
        let parts: Vec<Vec<u8>> = (0..3u8)
            .map(|i| {
                (0..1000u32 + i as u32 * 10)
                    .map(|n| (n as u8) ^ i)
                    .collect()
            })
            .collect();
        let mut list = Vec::new();
        for p in &parts {
            list.push((put(s, p), p.len() as u32));
        }
        (list, parts.concat())
    }

    /// A stored, sealed file whose sealed copy then has byte `at` XORed with `bit`.
    fn sealed_then_rotten(
        s: &NodeStore,
        at: usize,
        bit: u8,
    ) -> (Vec<(Digest, u32)>, Digest, PathBuf) {
        let (list, mut whole) = stored_file(s);
        let key = file_key(list.iter().map(|(id, _)| id));
        s.seal(&key, &list, &|_| None).unwrap();
        let sp = NodeStore::sealed_path_in(s.dir(), &key);
        whole[at] ^= bit;
        fs::set_permissions(&sp, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&sp, &whole).unwrap();
        (list, key, sp)
    }

    #[test]
    fn sealed_files_hold_the_bytes_once_and_pointers_find_them() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let (list, whole) = stored_file(&s);
        let key = file_key(list.iter().map(|(id, _)| id));
        let before = s.stats().unwrap().bytes;
        let r = s.seal(&key, &list, &|_| None).unwrap();
        assert_eq!(
            r,
            Sealed::Written {
                bytes: whole.len() as u64,
                pointers: 3
            }
        );
        assert_eq!(s.seal(&key, &list, &|_| None).unwrap(), Sealed::Present);
        let mut f = s.open_sealed(&key).unwrap().unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, whole);
        for (id, len) in &list {
            assert_eq!(fs::metadata(s.path(id)).unwrap().len(), POINTER_LEN as u64);
            assert_eq!(s.get(id).unwrap().len(), *len as usize);
        }
        let st = s.stats().unwrap();
        assert_eq!((st.chunks, st.pointers, st.sealed_files), (3, 3, 1));
        // Stored once: the file and its list replace the chunk files.
        assert!(
            st.bytes < before + 3 * 36 + 3 * POINTER_LEN as u64 + 1,
            "{} vs {before}",
            st.bytes
        );
        let v = s.verify(&|_, _| {}).unwrap();
        assert_eq!((v.checked, v.sealed_checked), (3, 1));
        assert!(v.corrupt_removed.is_empty() && v.corrupt_sealed_removed.is_empty());
    }

    #[test]
    fn sealing_never_fetches_and_takes_chunks_from_memory() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let missing = vec![7u8; 500];
        let mut list = vec![(Digest::of(&missing), 500)];
        let (more, _) = stored_file(&s);
        list.extend(more);
        let key = file_key(list.iter().map(|(id, _)| id));
        assert_eq!(s.seal(&key, &list, &|_| None).unwrap(), Sealed::Missing);
        assert!(!s.has_sealed(&key));
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        // Handed over from memory: sealed.
        let m: Arc<[u8]> = missing.clone().into();
        let r = s
            .seal(&key, &list, &|k| (k == 0).then(|| m.clone()))
            .unwrap();
        // The chunk that was only in memory gets a pointer too: it is on disk once.
        assert!(matches!(r, Sealed::Written { pointers: 4, .. }), "{r:?}");
        assert_eq!(s.get(&list[0].0).unwrap(), missing);
        s.put(&list[0].0, &missing).unwrap();
        assert_eq!(
            fs::metadata(s.path(&list[0].0)).unwrap().len(),
            POINTER_LEN as u64,
            "a later write of the chunk replaced its pointer"
        );
    }

    #[test]
    fn a_corrupt_or_missing_sealed_file_is_never_served() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let (list, _, sp) = sealed_then_rotten(&s, 1500, 1);
        // The first chunk is intact; the second is not: dropped with its file.
        assert!(s.get(&list[0].0).is_some());
        assert!(s.get(&list[1].0).is_none(), "corrupt bytes served");
        assert!(!sp.exists(), "corrupt sealed file kept");
        assert_eq!(s.counters().corrupt_dropped.load(Ordering::Relaxed), 1);
        // The other pointers now dangle: a read removes them, gc too.
        assert!(s.get(&list[0].0).is_none());
        assert!(!s.path(&list[0].0).exists());
        let r = s.gc(u64::MAX).unwrap();
        assert_eq!(r.dangling_removed, 1);
        assert_eq!(s.stats().unwrap().chunks, 0);
    }

    #[test]
    fn a_sealed_file_is_checked_before_it_is_handed_out_and_again_when_it_changes() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let (list, whole) = stored_file(&s);
        let key = file_key(list.iter().map(|(id, _)| id));
        s.seal(&key, &list, &|_| None).unwrap();
        assert!(s.open_sealed(&key).unwrap().is_some());
        // Rotten in place after it was checked (same inode and size, another mtime).
        let sp = NodeStore::sealed_path_in(s.dir(), &key);
        let mut bad = whole.clone();
        bad[1500] ^= 1;
        fs::set_permissions(&sp, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&sp, &bad).unwrap();
        File::options()
            .write(true)
            .open(&sp)
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
            .unwrap();
        let e = s.open_sealed(&key).unwrap_err();
        assert!(matches!(e, SealedMismatch::Chunk { index: 1, .. }), "{e}");
        assert!(!sp.exists() && !sp.with_extension(IDS_EXT).exists());
        assert_eq!(s.counters().corrupt_dropped.load(Ordering::Relaxed), 1);
        assert!(s.open_sealed(&key).unwrap().is_none());
        // Its pointers dangle: the chunks are gone, never served from the rotten file.
        assert!(s.get(&list[1].0).is_none());
    }

    #[test]
    fn concurrent_opens_of_a_corrupt_sealed_file_drop_it_once() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let (list, whole) = stored_file(&s);
        let key = file_key(list.iter().map(|(id, _)| id));
        s.seal(&key, &list, &|_| None).unwrap();
        let sp = NodeStore::sealed_path_in(s.dir(), &key);
        let mut bad = whole.clone();
        bad[1500] ^= 1;
        fs::set_permissions(&sp, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&sp, &bad).unwrap();
        let results: Vec<_> = std::thread::scope(|sc| {
            let opens: Vec<_> = (0..8).map(|_| sc.spawn(|| s.open_sealed(&key))).collect();
            opens.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        assert!(results.iter().all(|r| matches!(r, Err(_) | Ok(None))));
        assert_eq!(s.counters().corrupt_dropped.load(Ordering::Relaxed), 1);
        assert!(s.checking.lock().unwrap().is_empty());
    }

    #[test]
    fn verify_finds_a_corrupt_sealed_file() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        // Same length, one bit off: only hashing finds it.
        let (_, key, sp) = sealed_then_rotten(&s, 10, 0x80);
        let v = s.verify(&|_, _| {}).unwrap();
        assert_eq!(v.corrupt_sealed_removed, vec![key.to_string()]);
        assert_eq!(v.dangling_removed, 3);
        assert!(!sp.exists() && !sp.with_extension(IDS_EXT).exists());
    }

    #[test]
    fn gc_evicts_a_sealed_file_with_its_pointers_unless_a_mount_uses_it() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let (list, _) = stored_file(&s);
        let key = file_key(list.iter().map(|(id, _)| id));
        s.seal(&key, &list, &|_| None).unwrap();
        let loose = put(&s, &[9u8; 2000]);
        // A mount using one chunk of the file keeps all of it.
        let pin = s.pin(&[list[2].0], &MountInfo::default()).unwrap();
        let r = s.gc(0).unwrap();
        assert_eq!((r.removed_chunks, r.removed_sealed_files), (1, 0), "{r:?}");
        assert_eq!((r.kept_chunks, r.pinned_kept), (3, 3), "{r:?}");
        assert!(s.get(&loose).is_none());
        assert!(s.get(&list[0].0).is_some());
        s.unpin(&pin);
        let r = s.gc(0).unwrap();
        assert_eq!((r.removed_chunks, r.removed_sealed_files), (3, 1), "{r:?}");
        assert!(!s.has_sealed(&key));
        let st = s.stats().unwrap();
        assert_eq!((st.chunks, st.bytes, st.sealed_files), (0, 0, 0));
    }

    #[test]
    fn pins_are_never_reused_while_mounts_come_and_go() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let a = s.pin(&[], &MountInfo::default()).unwrap();
        let b = s.pin(&[], &MountInfo::default()).unwrap();
        s.unpin(&a);
        let c = s.pin(&[], &MountInfo::default()).unwrap();
        assert_ne!(b, c, "a new mount took over a live mount's pin");
        assert!(b.with_extension("pin").exists());
    }

    #[test]
    fn a_chunk_that_looks_like_a_pointer_is_a_chunk_and_bad_pointers_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let mut fake = Pointer {
            key: Digest::of(b"k"),
            offset: 0,
            len: 10,
        }
        .encode()
        .to_vec();
        let id = put(&s, &fake);
        let st = s.stats().unwrap();
        assert_eq!((st.chunks, st.pointers), (1, 0));
        assert_eq!(s.get(&id).unwrap(), fake);
        // A pointer claiming 4 GiB is refused without allocating it.
        let (list, _) = stored_file(&s);
        let key = file_key(list.iter().map(|(id, _)| id));
        s.seal(&key, &list, &|_| None).unwrap();
        fake = Pointer {
            key,
            offset: 0,
            len: u32::MAX,
        }
        .encode()
        .to_vec();
        fs::write(s.path(&list[0].0), &fake).unwrap();
        assert!(s.get(&list[0].0).is_none());
    }

    /// Wait (bounded) until some other process holds the lock of the pin file `p`.
    fn wait_until_locked(p: &Path) {
        let start = std::time::Instant::now();
        while pin_holder_gone(p).is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the lock holder never took {}",
                p.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_pin_held_in_another_pid_namespace_is_live_until_its_holder_dies() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let id = put(&s, b"used by a mount in a container");
        // Its pid means nothing here (beyond pid_max): only the lock says it is live.
        let pin = d.path().join("mounts/999999999-0.pin");
        std::fs::write(&pin, id.0).unwrap();
        let mut holder = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "flock"])
            .arg(&pin)
            .args(["sleep", "60"])
            .spawn()
            .expect("unshare (util-linux) is needed for this test");
        wait_until_locked(&pin);
        let st = s.stats().unwrap();
        assert_eq!((st.mounts.len(), st.stale_pins), (1, 0), "{st:?}");
        let r = s.gc(0).unwrap();
        assert_eq!((r.removed_chunks, r.pinned_kept), (0, 1), "{r:?}");
        assert!(s.get(&id).is_some(), "a live mount's chunk was evicted");
        holder.kill().unwrap();
        holder.wait().unwrap();
        let start = std::time::Instant::now();
        while pin_holder_gone(&pin).is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "lock never released"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = s.gc(0).unwrap();
        assert_eq!((r.removed_chunks, r.stale_pins_removed), (1, 1), "{r:?}");
    }

    #[test]
    fn a_dead_pin_is_collected_even_when_its_pid_is_alive() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let id = put(&s, b"x");
        // Left by a mount that died; its pid now belongs to a live process (us).
        std::fs::write(
            d.path()
                .join(format!("mounts/{}-77.pin", std::process::id())),
            id.0,
        )
        .unwrap();
        assert_eq!(s.stats().unwrap().stale_pins, 1);
        let r = s.gc(0).unwrap();
        assert_eq!((r.removed_chunks, r.stale_pins_removed), (1, 1), "{r:?}");
        // A pin this process holds is live.
        let id = put(&s, b"y");
        let pin = s.pin(&[id], &MountInfo::default()).unwrap();
        assert_eq!(s.gc(0).unwrap().pinned_kept, 1);
        s.unpin(&pin);
        assert_eq!(s.gc(0).unwrap().removed_chunks, 1);
    }

    #[test]
    fn put_never_replaces_what_is_at_the_chunk_path() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let data = b"chunk";
        let id = Digest::of(data);
        let p = s.path(&id);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        // Something `exists()` does not see (a dangling link): put must leave it.
        std::os::unix::fs::symlink("gone", &p).unwrap();
        s.put(&id, data).unwrap();
        assert!(
            fs::symlink_metadata(&p).unwrap().file_type().is_symlink(),
            "put replaced what was at the chunk path"
        );
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn shared_tier_reads_are_bounded() {
        let shared = tempfile::tempdir().unwrap();
        let local = tempfile::tempdir().unwrap();
        let s = with_shared_tier(local.path(), shared.path());
        // An oversize file: refused from its size, never read.
        let big = Digest::of(b"big");
        let p = NodeStore::path_in(shared.path(), &big);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        File::create(&p).unwrap().set_len(1 << 40).unwrap();
        assert!(s.get(&big).is_none());
        // A FIFO feeding an endless stream: refused, not drained.
        let endless = Digest::of(b"endless");
        let p = NodeStore::path_in(shared.path(), &endless);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let p2 = p.clone();
        let writer = std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new().write(true).open(&p2).unwrap();
            let block = vec![7u8; 1 << 16];
            let mut sent = 0u64;
            while sent < 64 << 20 {
                if f.write_all(&block).is_err() {
                    break;
                }
                sent += block.len() as u64;
            }
            sent
        });
        assert!(s.get(&endless).is_none());
        let sent = writer.join().unwrap();
        assert!(
            sent < (MAX_CHUNK as u64) * 4,
            "read {sent} bytes of a file that can hold at most {MAX_CHUNK}"
        );
        assert!(fs::metadata(&p).is_ok(), "shared tier modified");
    }
}
