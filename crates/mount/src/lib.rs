//! `tessera mount`: serve the tree of a tessera image read-only over FUSE, fetching file
//! content lazily, chunk by chunk, through the node store.
//!
//! * Inode numbers are index entry numbers + 1 (the root is 1); hardlinks report the
//!   inode of the entry they name, so a walk of the mount sees the same hardlink groups
//!   as `tessera unpack`.
//! * A read maps to chunks by binary search ([`tessera_format::index::FileMap`]); chunks
//!   come from the node store, else from the image's store with neighbouring chunks of
//!   one pack coalesced into one range read; every chunk is verified before it is used
//!   or cached. A chunk that cannot be fetched or verified fails that read with EIO.
//! * The image never changes, so the kernel may cache entries, attributes and data for
//!   long (`keep_cache`).
//! * Passthrough: a large file whose content the node store holds sealed (written out
//!   whole after every chunk of it was verified, see [`store::NodeStore::seal`]) is
//!   opened with FUSE passthrough, so the kernel reads and maps the sealed file directly,
//!   at the speed of the store's own filesystem. The daemon checks a sealed file against
//!   its chunk list before it first passes it through, and again when the file changed
//!   ([`store::NodeStore::open_sealed`]); one that does not match is dropped and that
//!   open goes through the daemon. A large file read through the daemon is
//!   sealed in the background when its last open closes, if all its chunks are here.
//!   The kernel allows one mode per inode at a time: while a file is open through the
//!   daemon, new opens of it go through the daemon too.

pub mod conn;
pub mod daemon;
pub mod fetch;
#[doc(hidden)]
pub mod fuzzing;
mod index_cache;
pub mod memory;
pub mod profile;
pub mod session;
pub mod store;

pub use conn::FuseConn;
use fetch::{Failure, Fetcher, Priority};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tessera_format::index::{FileData, FileMap, Meta, Node};
use tessera_format::Digest;
use tessera_image::TesseraImage;

/// Kernel cache lifetime of entries and attributes: the image is immutable.
const TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("node store {path}: {source}")]
    Store {
        path: String,
        source: std::io::Error,
    },
    #[error("mounting on {path}: {source} (mounting needs root and /dev/fuse)")]
    Mount {
        path: String,
        source: std::io::Error,
    },
    #[error("overlay on {path}: {source} (the kernel needs overlayfs; upper and work dirs must be on one filesystem that is not itself an overlay)")]
    Overlay {
        path: String,
        source: std::io::Error,
    },
    #[error("unmounting {path}: {source}")]
    Unmount {
        path: String,
        source: std::io::Error,
    },
    #[error("profile {path}: {source}")]
    Profile {
        path: String,
        source: std::io::Error,
    },
}

/// (parent entry, name) → entry.
type Names = HashMap<(u32, Vec<u8>), u32>;

/// Queues a profile's chunks for prefetching; usable from any thread while the mount
/// is served (e.g. once a profile arrives from the registry).
#[derive(Clone)]
pub struct Prefetcher {
    image: Arc<TesseraImage>,
    names: Arc<Names>,
    fetcher: Arc<Fetcher>,
}

/// Per-file state of readers (for readahead).
#[derive(Default, Clone, Copy)]
struct Cursor {
    /// Where the last read ended.
    last_end: u64,
    /// Bytes of the file queued for readahead so far.
    ahead: u64,
}

pub struct ImageFs {
    image: Arc<TesseraImage>,
    fetcher: Arc<Fetcher>,
    readahead: u64,
    /// What the kernel may read ahead of a reader (also the read-around of a page fault
    /// on a mapped file): small keeps lazy mounts from fetching what mmap never touches.
    kernel_readahead: u32,
    /// Children (entry numbers) of every directory entry, in index order.
    children: Vec<Vec<u32>>,
    /// (parent entry, name) → entry.
    names: Arc<Names>,
    /// Link count of every inode entry.
    nlink: Vec<u32>,
    maps: Mutex<HashMap<u32, Arc<FileMap>>>,
    cursors: Mutex<HashMap<u32, Cursor>>,
    /// `--record-profile`: files in the order they were first read.
    profile: Option<Mutex<Profile>>,
    /// Files of at least this many bytes are sealed and opened with passthrough (None:
    /// every read goes through the daemon).
    passthrough_min: Option<u64>,
    /// Whether the kernel agreed to passthrough (and it has not failed since).
    passthrough_ok: AtomicBool,
    opens: Arc<Mutex<Opens>>,
}

/// Open files, for FUSE passthrough's rule of one mode per inode at a time.
///
/// The kernel holds the same table: a daemon that takes a mount over from a dead one
/// (see [`conn`]) must know which files are open and in which mode, or its answers to
/// further opens of them fail (EIO). So every open and release is appended to a log
/// beside the mount (`o FH ENTRY BACKING_ID`, `r FH`; backing id 0: through the
/// daemon), which the next daemon replays ([`ImageFs::open_log`]).
#[derive(Default)]
struct Opens {
    /// Changes with every open and release (what the mount's pin follows).
    generation: u64,
    next_fh: u64,
    /// File handle → (inode entry, whether it was passed through).
    handles: HashMap<u64, (u32, bool)>,
    by_entry: HashMap<u32, EntryOpens>,
    log: Option<OpensLog>,
}

struct OpensLog {
    path: PathBuf,
    file: std::fs::File,
    lines: u64,
}

/// The files open on a mount ([`ImageFs::open_files`]), read by its pin's publisher.
#[derive(Clone)]
pub struct OpenFiles(Arc<Mutex<Opens>>);

impl OpenFiles {
    /// A number that changes whenever files are opened or released.
    pub fn generation(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).generation
    }

    /// The index entries open now (each once), sorted, with the generation they are of.
    pub fn entries(&self) -> (u64, Vec<u32>) {
        let o = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<u32> = o.by_entry.keys().copied().collect();
        v.sort_unstable();
        (o.generation, v)
    }
}

/// What a mount pins in the node store for the open entries `entries` of `index`: each
/// file's chunk ids and its sealed file's key.
pub fn pins_of(index: &tessera_format::index::Index, entries: &[u32]) -> Vec<Digest> {
    let mut ids = Vec::new();
    for &i in entries {
        if let Some(Node::File(_, f)) = index.entries.get(i as usize).map(|e| &e.node) {
            if let Some(list) = fetch::sealed_list(index, f) {
                ids.extend(list.iter().map(|(id, _)| *id));
                ids.push(store::file_key(list.iter().map(|(id, _)| id)));
            }
        }
    }
    ids
}

/// Lines after which the log is rewritten from the table.
const OPENS_LOG_COMPACT: u64 = 1 << 16;

#[derive(Default)]
struct EntryOpens {
    /// Opens served by the daemon.
    cached: u32,
    /// Opens passed through to `backing` (the same one for every open of the inode).
    passthrough: u32,
    /// The backing file and its id on the connection.
    backing: Option<(Arc<BackingId>, u32)>,
    /// The backing id a daemon before this one opened the inode with (still registered
    /// on the connection: that daemon never closed it), until this one wraps it.
    adopted: Option<u32>,
}

impl Opens {
    fn record(&mut self, line: std::fmt::Arguments<'_>) {
        let Some(log) = &mut self.log else { return };
        if let Err(e) = writeln!(log.file, "{line}") {
            tracing::warn!(path = %log.path.display(), error = %e, "cannot log an open file; a daemon taking this mount over may fail opens of it");
            self.log = None;
            return;
        }
        log.lines += 1;
        if log.lines >= OPENS_LOG_COMPACT {
            self.compact();
        }
    }

    /// Rewrite the log as the table stands (a temp file renamed over it).
    fn compact(&mut self) {
        let Some(log) = &self.log else { return };
        let path = log.path.clone();
        let mut text = String::new();
        let mut fhs: Vec<_> = self.handles.iter().collect();
        fhs.sort();
        for (fh, (i, pt)) in fhs {
            let id = match (pt, self.by_entry.get(i)) {
                (true, Some(st)) => st.backing.as_ref().map(|b| b.1).or(st.adopted).unwrap_or(0),
                _ => 0,
            };
            text.push_str(&format!("o {fh} {i} {id}\n"));
        }
        let tmp = path.with_extension("tmp");
        let r = std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| std::fs::OpenOptions::new().append(true).open(&path));
        match r {
            Ok(file) => {
                self.log = Some(OpensLog {
                    path,
                    file,
                    lines: self.handles.len() as u64,
                })
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot rewrite the open-files log");
                self.log = None;
            }
        }
    }
}

/// Default smallest file opened with passthrough: smaller ones are a read or two.
pub const PASSTHROUGH_MIN: u64 = 1 << 20;

/// A read profile being recorded: a line `K N PATH` says chunks K..K+N of the file at
/// PATH were first read here, in this order (a line with only a path means the whole
/// file, for hand-written profiles).
struct Profile {
    out: std::io::BufWriter<std::fs::File>,
    /// Chunks (of the chunk table) already recorded.
    seen: Vec<bool>,
}

/// Readahead jobs hold this many chunks.
const READAHEAD_JOB_CHUNKS: usize = 4;

/// Prefetch jobs from a profile hold this many chunks (one coalesced fetch, roughly).
const PROFILE_JOB_CHUNKS: usize = 32;

/// `K N PATH` → (Some((K, N)), PATH); anything else is a whole-file PATH.
fn parse_profile_line(line: &[u8]) -> (Option<(usize, usize)>, &[u8]) {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let num = |p: Option<&[u8]>| std::str::from_utf8(p?).ok()?.parse::<usize>().ok();
    match (num(parts.next()), num(parts.next()), parts.next()) {
        (Some(k), Some(n), Some(path)) => (Some((k, n)), path),
        _ => (None, line),
    }
}

/// A timestamp from the index; times the platform cannot represent become the epoch.
fn time(secs: i64, nsec: u32) -> SystemTime {
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(Duration::from_nanos(nsec as u64)))
        .unwrap_or(UNIX_EPOCH)
}

impl Prefetcher {
    /// The entry at `path` (components separated by `/`), following no links.
    pub fn lookup_path(&self, path: &[u8]) -> Option<u32> {
        let mut cur = 0u32;
        for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            cur = *self.names.get(&(cur, part.to_vec()))?;
        }
        Some(cur)
    }

    /// Queue for background fetching the chunks a profile names, in its order, on every
    /// worker; then — with `whole` — every other chunk of the image in index order, at
    /// low priority. Returns the number of chunks queued.
    pub fn prefetch(&self, profile: &[u8], whole: bool) -> usize {
        let chunk_count = self.image.index.chunks.len();
        let mut seen = vec![false; chunk_count];
        let mut queued = 0;
        let mut job = Vec::new();
        for line in profile.split(|&b| b == b'\n') {
            let (range, path) = parse_profile_line(line);
            let Some(i) = self.lookup_path(path) else {
                continue;
            };
            let i = self.image.index.inode_entry(i as usize);
            let Some(Node::File(_, f)) = self.image.index.entries.get(i).map(|e| &e.node) else {
                continue;
            };
            let (k, n) = range.unwrap_or((0, f.chunks.len()));
            for &c in f.chunks.iter().skip(k).take(n) {
                if (c as usize) < chunk_count && !std::mem::replace(&mut seen[c as usize], true) {
                    job.push(c);
                    if job.len() == PROFILE_JOB_CHUNKS {
                        queued += job.len();
                        self.fetcher
                            .enqueue(std::mem::take(&mut job), Priority::Profile);
                    }
                }
            }
        }
        queued += job.len();
        self.fetcher.enqueue(job, Priority::Profile);
        if whole {
            for e in &self.image.index.entries {
                if let Node::File(_, f) = &e.node {
                    let job: Vec<u32> = f
                        .chunks
                        .iter()
                        .copied()
                        .filter(|&c| {
                            (c as usize) < chunk_count
                                && !std::mem::replace(&mut seen[c as usize], true)
                        })
                        .collect();
                    queued += job.len();
                    self.fetcher.enqueue(job, Priority::Low);
                }
            }
        }
        queued
    }
}

impl ImageFs {
    pub fn new(fetcher: Arc<Fetcher>, image: Arc<TesseraImage>, readahead: u64) -> ImageFs {
        let n = image.index.entries.len();
        let mut children = vec![Vec::new(); n];
        let mut names = HashMap::with_capacity(n);
        let mut nlink = vec![0u32; n];
        for (i, e) in image.index.entries.iter().enumerate().skip(1) {
            children[e.parent as usize].push(i as u32);
            names.insert((e.parent, e.name.clone()), i as u32);
        }
        for (i, e) in image.index.entries.iter().enumerate() {
            match &e.node {
                Node::Dir(_) => {
                    let subdirs = children[i]
                        .iter()
                        .filter(|&&c| matches!(image.index.entries[c as usize].node, Node::Dir(_)))
                        .count();
                    nlink[i] = 2 + subdirs as u32;
                }
                Node::HardLink(t) => nlink[*t as usize] += 1,
                _ => nlink[i] += 1,
            }
        }
        ImageFs {
            image,
            fetcher,
            readahead,
            kernel_readahead: 128 << 10,
            children,
            names: Arc::new(names),
            nlink,
            maps: Mutex::new(HashMap::new()),
            cursors: Mutex::new(HashMap::new()),
            profile: None,
            passthrough_min: Some(PASSTHROUGH_MIN),
            passthrough_ok: AtomicBool::new(false),
            // File handles of a daemon before this one (whose connection this one may
            // take over) are still open in the kernel: start past them.
            opens: Arc::new(Mutex::new(Opens {
                next_fh: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1 << 40, |d| d.as_nanos() as u64),
                ..Opens::default()
            })),
        }
    }

    /// Seal files of at least `min` bytes and open them with passthrough (None: never;
    /// every read goes through the daemon and is verified there).
    pub fn set_passthrough(&mut self, min: Option<u64>) {
        self.passthrough_min = min.map(|m| m.max(1));
    }

    /// File entry `i`, if it is large enough to be sealed.
    fn sealable(&self, i: usize) -> Option<&FileData> {
        let min = self.passthrough_min?;
        match &self.image.index.entries.get(i)?.node {
            Node::File(_, f) if f.size >= min => Some(f),
            _ => None,
        }
    }

    /// The sealed-file key of file entry `i`, if it is large enough to be sealed.
    fn seal_key(&self, i: usize) -> Option<Digest> {
        self.key_of(self.sealable(i)?)
    }

    fn key_of(&self, f: &FileData) -> Option<Digest> {
        let list = fetch::sealed_list(&self.image.index, f)?;
        Some(store::file_key(list.iter().map(|(id, _)| id)))
    }

    /// The files open on this mount, as they change (what its pin in the node store keeps).
    pub fn open_files(&self) -> OpenFiles {
        OpenFiles(self.opens.clone())
    }

    /// Answer an open: passthrough to the sealed file when there is one and no open of
    /// the inode goes through the daemon; else through the daemon.
    fn open_file(&self, i: usize, reply: ReplyOpen) {
        let key = if self.passthrough_ok.load(Ordering::Relaxed) {
            self.seal_key(i)
        } else {
            None
        };
        // Checked against its chunk list (the first time: the whole file hashed) before
        // the lock, so opens of other files never wait for it. One that does not match is
        // gone, and this open goes through the daemon, which fetches and verifies again.
        let sealed = key.and_then(|key| match self.fetcher.store().open_sealed(&key) {
            Ok(f) => f,
            Err(_) => {
                self.fetcher
                    .stats
                    .sealed_verify_failures
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
        });
        let mut opens = self.opens.lock().unwrap_or_else(|e| e.into_inner());
        opens.next_fh += 1;
        opens.generation += 1;
        let fh = opens.next_fh;
        let st = opens.by_entry.entry(i as u32).or_default();
        // A backing file a daemon before this one opened the inode with (its opens are
        // still live): every further open must use the same one.
        if st.backing.is_none() && st.passthrough > 0 {
            if let Some(id) = st.adopted {
                // SAFETY: `id` was registered on this connection by the daemon this one
                // took the mount over from, which died or exited without closing it;
                // it is owned from here on (closed when the inode's last passthrough
                // open is released).
                st.backing = Some((Arc::new(unsafe { reply.wrap_backing(id) }), id));
            }
        }
        // An inode open with a backing file takes every further open the same way (the
        // kernel fails any other with EIO), whatever happened to passthrough since.
        let through = st.passthrough > 0;
        if st.backing.is_some() || through || sealed.is_some() && st.cached == 0 {
            let backing = match (&st.backing, sealed) {
                (Some(b), _) => Some(b.clone()),
                (None, None) => None,
                (None, Some(f)) => match reply.open_backing(&f) {
                    Ok(b) => {
                        let id = b.into_raw();
                        // SAFETY: the id was just registered on this connection, and
                        // into_raw gave up the only owner of it.
                        Some((Arc::new(unsafe { reply.wrap_backing(id) }), id))
                    }
                    Err(e) => {
                        // E.g. a store on a stacked filesystem: not again.
                        tracing::warn!(error = %e, "the kernel refused a passthrough file; every read goes through the daemon from now on");
                        self.passthrough_ok.store(false, Ordering::Relaxed);
                        None
                    }
                },
            };
            if let Some((b, id)) = backing {
                st.backing = Some((b.clone(), id));
                st.passthrough += 1;
                opens.handles.insert(fh, (i as u32, true));
                opens.record(format_args!("o {fh} {i} {id}"));
                self.fetcher
                    .stats
                    .passthrough_opens
                    .fetch_add(1, Ordering::Relaxed);
                return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b);
            }
        }
        st.cached += 1;
        opens.handles.insert(fh, (i as u32, false));
        opens.record(format_args!("o {fh} {i} 0"));
        // Verified, immutable data: let the kernel keep its page cache across opens.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn release_file(&self, fh: u64) {
        let mut opens = self.opens.lock().unwrap_or_else(|e| e.into_inner());
        let Some((i, through)) = opens.handles.remove(&fh) else {
            return;
        };
        opens.generation += 1;
        opens.record(format_args!("r {fh}"));
        let Some(st) = opens.by_entry.get_mut(&i) else {
            return;
        };
        if through {
            st.passthrough = st.passthrough.saturating_sub(1);
            if st.passthrough == 0 {
                st.backing = None;
                st.adopted = None;
            }
        } else {
            st.cached = st.cached.saturating_sub(1);
            if st.cached == 0
                && self.passthrough_ok.load(Ordering::Relaxed)
                && self.sealable(i as usize).is_some()
            {
                self.fetcher.request_seal(i);
            }
        }
        if st.cached == 0 && st.passthrough == 0 {
            opens.by_entry.remove(&i);
        }
    }

    /// Log this mount's open files to `path` (see [`Opens`]). With `adopted`, the mount
    /// was served by a daemon before this one: its log is read first, and the files it
    /// says are open are open in the kernel, in the mode it says.
    pub fn open_log(&self, path: &Path, adopted: bool) -> std::io::Result<()> {
        let mut opens = self.opens.lock().unwrap_or_else(|e| e.into_inner());
        if adopted {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e),
            };
            let mut max_fh = 0;
            for line in text.lines() {
                let f: Vec<&str> = line.split(' ').collect();
                match f[..] {
                    ["o", fh, i, id] => {
                        let (Ok(fh), Ok(i), Ok(id)) =
                            (fh.parse::<u64>(), i.parse::<u32>(), id.parse::<u32>())
                        else {
                            continue;
                        };
                        max_fh = max_fh.max(fh);
                        opens.handles.insert(fh, (i, id != 0));
                        let st = opens.by_entry.entry(i).or_default();
                        if id != 0 {
                            st.passthrough += 1;
                            st.adopted = Some(id);
                        } else {
                            st.cached += 1;
                        }
                    }
                    ["r", fh] => {
                        let Ok(fh) = fh.parse::<u64>() else { continue };
                        if let Some((i, through)) = opens.handles.remove(&fh) {
                            if let Some(st) = opens.by_entry.get_mut(&i) {
                                if through {
                                    st.passthrough = st.passthrough.saturating_sub(1);
                                    if st.passthrough == 0 {
                                        st.adopted = None;
                                    }
                                } else {
                                    st.cached = st.cached.saturating_sub(1);
                                }
                                if st.cached == 0 && st.passthrough == 0 {
                                    opens.by_entry.remove(&i);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            opens.next_fh = opens.next_fh.max(max_fh + 1);
            opens.generation += 1;
            tracing::info!(
                open_files = opens.handles.len(),
                "open files of the previous daemon taken over"
            );
        }
        std::fs::write(path, b"")?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        opens.log = Some(OpensLog {
            path: path.to_path_buf(),
            file,
            lines: 0,
        });
        // The table as it stands (empty for a fresh mount).
        opens.compact();
        Ok(())
    }

    /// Set the kernel's readahead (bytes, a multiple of the page size).
    pub fn set_kernel_readahead(&mut self, bytes: u32) {
        self.kernel_readahead = bytes.max(4096);
    }

    /// Append the path of every file to `path` when it is first read.
    pub fn record_profile(&mut self, path: &Path) -> Result<(), MountError> {
        let out = std::fs::File::create(path).map_err(|source| MountError::Profile {
            path: path.display().to_string(),
            source,
        })?;
        self.profile = Some(Mutex::new(Profile {
            out: std::io::BufWriter::new(out),
            seen: vec![false; self.image.index.chunks.len()],
        }));
        Ok(())
    }

    /// The path (from the root, without a leading slash) of entry `i`.
    pub fn path_of(&self, mut i: usize) -> Vec<u8> {
        let mut parts = Vec::new();
        while i != 0 {
            let Some(e) = self.image.index.entries.get(i) else {
                break;
            };
            parts.push(e.name.as_slice());
            i = e.parent as usize;
        }
        parts.reverse();
        parts.join(&b'/')
    }

    /// The entry at `path` (components separated by `/`), following no links.
    pub fn lookup_path(&self, path: &[u8]) -> Option<u32> {
        self.prefetcher().lookup_path(path)
    }

    /// See [`Prefetcher::prefetch`].
    pub fn prefetch(&self, profile: &[u8], whole: bool) -> usize {
        self.prefetcher().prefetch(profile, whole)
    }

    /// A handle that queues prefetches for this mount from any thread.
    pub fn prefetcher(&self) -> Prefetcher {
        Prefetcher {
            image: self.image.clone(),
            names: self.names.clone(),
            fetcher: self.fetcher.clone(),
        }
    }

    /// The inode entry behind an inode number.
    fn entry(&self, ino: INodeNo) -> Option<usize> {
        let i = ino.0.checked_sub(1)? as usize;
        (i < self.image.index.entries.len()).then(|| self.image.index.inode_entry(i))
    }
    fn attr(&self, i: usize) -> Option<FileAttr> {
        let i = self.image.index.inode_entry(i);
        let e = self.image.index.entries.get(i)?;
        let meta: &Meta = e.meta()?;
        let (kind, size, rdev) = match &e.node {
            Node::Dir(_) => (FileType::Directory, 4096, 0),
            Node::File(_, f) => (FileType::RegularFile, f.size, 0),
            Node::Symlink(_, t) => (FileType::Symlink, t.len() as u64, 0),
            Node::CharDev(_, r) => (FileType::CharDevice, 0, *r),
            Node::BlockDev(_, r) => (FileType::BlockDevice, 0, *r),
            Node::Fifo(_) => (FileType::NamedPipe, 0, 0),
            Node::Socket(_) => (FileType::Socket, 0, 0),
            Node::HardLink(_) => return None,
        };
        let t = time(meta.mtime, meta.mtime_nsec);
        Some(FileAttr {
            ino: INodeNo(i as u64 + 1),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: (meta.mode & 0o7777) as u16,
            nlink: self.nlink[i],
            uid: meta.uid,
            gid: meta.gid,
            rdev: rdev as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    fn file_map(&self, i: usize) -> Option<Arc<FileMap>> {
        let Node::File(_, f) = &self.image.index.entries.get(i)?.node else {
            return None;
        };
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            maps.entry(i as u32)
                .or_insert_with(|| Arc::new(FileMap::new(&self.image.index, f)))
                .clone(),
        )
    }

    /// Queue the next `readahead` bytes of a file read sequentially.
    fn read_ahead(&self, i: usize, offset: u64, end: u64, f: &FileData) {
        if self.readahead == 0 || end >= f.size {
            return;
        }
        let (from, to) = {
            let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            let cur = cursors.entry(i as u32).or_default();
            // A stream is a read that continues the previous one (several FUSE threads
            // may deliver it a little behind the furthest end so far). A first read at 0
            // is not yet a stream: programs read the header of a library they then map.
            let continues =
                offset > 0 && offset <= cur.last_end && cur.last_end - offset <= 1 << 20;
            if continues {
                cur.last_end = cur.last_end.max(end);
            } else {
                cur.last_end = end;
                cur.ahead = 0;
                return;
            }
            let to = (end + self.readahead).min(f.size);
            // Top the window up once half of it was consumed.
            if cur.ahead >= end + self.readahead / 2 {
                return;
            }
            let from = cur.ahead.max(end);
            cur.ahead = to;
            (from, to)
        };
        let Some(map) = self.file_map(i) else { return };
        let Some((mut k, mut pos)) = map.locate(from) else {
            return;
        };
        // Small jobs, so every worker takes part (node-store loads run in parallel).
        let mut job = Vec::new();
        while pos < to && k < f.chunks.len() {
            let c = f.chunks[k];
            job.push(c);
            if job.len() == READAHEAD_JOB_CHUNKS {
                self.fetcher
                    .enqueue(std::mem::take(&mut job), Priority::High);
            }
            pos += self.image.index.chunks[c as usize].len as u64;
            k += 1;
        }
        self.fetcher.enqueue(job, Priority::High);
    }

    /// Record chunks `first..first+n` of file `i` in the profile, if not yet recorded.
    fn note_read(&self, i: usize, f: &FileData, first: usize, n: usize) {
        let Some(p) = &self.profile else { return };
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.path_of(i);
        if path.contains(&b'\n') {
            return;
        }
        let mut run: Option<(usize, usize)> = None;
        let mut lines = Vec::new();
        for k in first..(first + n).min(f.chunks.len()) {
            let c = f.chunks[k] as usize;
            let fresh = p.seen.get(c).is_some_and(|s| !s);
            if fresh {
                p.seen[c] = true;
            }
            run = match (run, fresh) {
                (Some((a, m)), true) if a + m == k => Some((a, m + 1)),
                (r, true) => {
                    lines.extend(r);
                    Some((k, 1))
                }
                (r, false) => {
                    lines.extend(r);
                    None
                }
            };
        }
        lines.extend(run);
        for (k, m) in lines {
            let mut line = format!("{k} {m} ").into_bytes();
            line.extend_from_slice(&path);
            line.push(b'\n');
            if let Err(e) = p.out.write_all(&line) {
                tracing::warn!(error = %e, "cannot write the read profile");
            }
        }
        // A daemon that is killed keeps what it recorded.
        let _ = p.out.flush();
    }

    /// Write out what the profile has buffered.
    pub fn flush_profile(&self) {
        if let Some(p) = &self.profile {
            let _ = p.lock().unwrap_or_else(|e| e.into_inner()).out.flush();
        }
    }

    /// Bytes `offset..offset+size` of file entry `i`.
    pub fn read_file(&self, i: usize, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let Some(Node::File(_, f)) = self.image.index.entries.get(i).map(|e| &e.node) else {
            return Err(Errno::EISDIR);
        };
        let end = (offset + size as u64).min(f.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let map = self.file_map(i).ok_or(Errno::EIO)?;
        let Some((first, mut pos)) = map.locate(offset) else {
            return Ok(Vec::new());
        };
        // The file's chunks that cover the range, and where each starts in the file.
        let mut wanted = Vec::new();
        let mut k = first;
        while pos < end && k < f.chunks.len() {
            let c = f.chunks[k];
            wanted.push((c, pos));
            pos += self.image.index.chunks[c as usize].len as u64;
            k += 1;
        }
        self.note_read(i, f, first, wanted.len());
        self.read_ahead(i, offset, end, f);
        let ids: Vec<u32> = wanted.iter().map(|&(c, _)| c).collect();
        let have = self.fetcher.chunks(&ids).map_err(|e| {
            match &e {
                Failure::Unavailable(why) | Failure::Corrupt(why) => {
                    tracing::error!(entry = i, path = %String::from_utf8_lossy(&self.path_of(i)), error = %why, "read fails with EIO")
                }
            }
            Errno::EIO
        })?;
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (c, start) in wanted {
            let data = have.get(&c).ok_or(Errno::EIO)?;
            if data.len() != self.image.index.chunks[c as usize].len as usize {
                // Same id, another length: a malformed index; never slice out of bounds.
                return Err(Errno::EIO);
            }
            let s = offset.max(start) - start;
            let e = (end.min(start + data.len() as u64) - start) as usize;
            out.extend_from_slice(&data[s as usize..e]);
        }
        Ok(out)
    }
}

fn empty_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() <= size as usize {
        reply.data(data);
    } else {
        reply.error(Errno::ERANGE);
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_readahead(self.kernel_readahead) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_write(1 << 20);
        // READDIRPLUS answers a listing with every entry's attributes, so a walk needs no
        // LOOKUP per entry; lookups and listings may run in parallel; symlink targets are
        // cached by the kernel (the image never changes).
        for cap in [
            fuser::InitFlags::FUSE_DO_READDIRPLUS,
            fuser::InitFlags::FUSE_PARALLEL_DIROPS,
            fuser::InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(cap);
        }
        if self.passthrough_min.is_some() {
            // Depth 1: backing files on a plain filesystem, and room for an overlay on
            // top of this mount (--writable).
            let ok = config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!(
                    "the kernel offers no FUSE passthrough: every read goes through the daemon"
                );
            }
            self.passthrough_ok.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.flush_profile();
        self.fetcher.close();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.entry(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match self
            .names
            .get(&(p as u32, name.as_bytes().to_vec()))
            .and_then(|&c| self.attr(c as usize))
        {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            // The image never changes: the kernel may cache that the name is absent too
            // (node id 0 is a negative entry), so programs probing for files that do not
            // exist — Python's imports do — ask once.
            None if matches!(self.image.index.entries[p].node, Node::Dir(_)) => {
                let mut a = self.attr(p).unwrap_or_else(empty_attr);
                a.ino = INodeNo(0);
                reply.entry(&TTL, &a, Generation(0))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.entry(ino).and_then(|i| self.attr(i)) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry(ino).map(|i| &self.image.index.entries[i].node) {
            Some(Node::Symlink(_, t)) => reply.data(t),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.entry(ino) {
            Some(i) => self.open_file(i, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_file(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.entry(ino) {
            Some(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(i) = self.entry(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self.read_file(i, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written.
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(i) = self.entry(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !matches!(self.image.index.entries[i].node, Node::Dir(_)) {
            return reply.error(Errno::ENOTDIR);
        }
        let parent = self.image.index.entries[i].parent as u64 + 1;
        let mut list: Vec<(u64, FileType, &[u8])> = vec![
            (i as u64 + 1, FileType::Directory, b"."),
            (parent, FileType::Directory, b".."),
        ];
        for &c in &self.children[i] {
            let e = &self.image.index.entries[c as usize];
            if let Some(a) = self.attr(c as usize) {
                list.push((a.ino.0, a.kind, &e.name));
            }
        }
        for (k, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), k as u64 + 1, *kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(i) = self.entry(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !matches!(self.image.index.entries[i].node, Node::Dir(_)) {
            return reply.error(Errno::ENOTDIR);
        }
        let parent = self.image.index.entries[i].parent as usize;
        let mut list: Vec<(usize, &[u8])> = vec![(i, b"."), (parent, b"..")];
        for &c in &self.children[i] {
            list.push((c as usize, &self.image.index.entries[c as usize].name));
        }
        for (k, (e, name)) in list.iter().enumerate().skip(offset as usize) {
            let Some(a) = self.attr(*e) else { continue };
            if reply.add(
                a.ino,
                k as u64 + 1,
                OsStr::from_bytes(name),
                &TTL,
                &a,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(meta) = self
            .entry(ino)
            .and_then(|i| self.image.index.entries[i].meta())
        else {
            return reply.error(Errno::ENOENT);
        };
        match meta
            .xattrs
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
        {
            Some((_, v)) => xattr_reply(v, size, reply),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(meta) = self
            .entry(ino)
            .and_then(|i| self.image.index.entries[i].meta())
        else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for (k, _) in &meta.xattrs {
            names.extend_from_slice(k);
            names.push(0);
        }
        xattr_reply(&names, size, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.image.index.entries.len() as u64;
        let blocks = self.image.index.file_bytes().div_ceil(4096);
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }
}

/// Who may use a mount, and what of an image it honours. The default suits an untrusted
/// image: only the mounting user reaches the mount, and setuid bits and device nodes in
/// the image are inert (`nosuid,nodev`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Access {
    /// Let every user reach the mount (FUSE `allow_other`): a container runtime whose
    /// processes run as other users needs it.
    #[serde(default)]
    pub allow_other: bool,
    /// Honour setuid and setgid bits of the image's files.
    #[serde(default)]
    pub suid: bool,
    /// Honour the image's device nodes.
    #[serde(default)]
    pub dev: bool,
}

impl Access {
    fn flags(&self) -> rustix::mount::MountFlags {
        let mut f = rustix::mount::MountFlags::empty();
        if !self.suid {
            f |= rustix::mount::MountFlags::NOSUID;
        }
        if !self.dev {
            f |= rustix::mount::MountFlags::NODEV;
        }
        f
    }
}

/// A copy-on-write root over the read-only image: overlayfs with the FUSE mount as its
/// lower layer and a private upper layer, all under one base directory.
#[derive(Debug, Clone)]
pub struct Writable {
    /// Holds `lower/` (the FUSE mount), `upper/` and `work/`; absolute, so that the
    /// overlay's options name the lower mount as `/proc/self/mountinfo` does (which is
    /// how [`unmount`] finds it).
    pub base: PathBuf,
}

impl Writable {
    /// A copy-on-write root under `base` (created; a relative one is made absolute).
    pub fn new(base: &Path) -> Result<Writable, MountError> {
        let err = |source| MountError::Overlay {
            path: base.display().to_string(),
            source,
        };
        std::fs::create_dir_all(base).map_err(err)?;
        Ok(Writable {
            base: std::fs::canonicalize(base).map_err(err)?,
        })
    }

    /// A fresh copy-on-write root with a unique name under `parent` (for a mount given no
    /// directory of its own; [`Writable::remove`] it once unmounted).
    pub fn fresh_in(parent: &Path) -> Result<Writable, MountError> {
        let err = |source| MountError::Overlay {
            path: parent.display().to_string(),
            source,
        };
        std::fs::create_dir_all(parent).map_err(err)?;
        let dir = tempfile::Builder::new()
            .prefix("overlay-")
            .tempdir_in(parent)
            .map_err(err)?
            .keep();
        Writable::new(&dir)
    }

    /// Remove the base directory and everything in it (the changes made through the
    /// mount), unless something under it is still mounted.
    pub fn remove(&self) -> Result<(), MountError> {
        let err = |source| MountError::Overlay {
            path: self.base.display().to_string(),
            source,
        };
        // Nothing mounted under it, and no overlay still using its upper layer.
        let upper = format!("upperdir={}", self.upper().display());
        if mounts()
            .iter()
            .any(|(p, _, o)| p.starts_with(&self.base) || o.split(',').any(|x| x == upper))
        {
            return Err(err(std::io::Error::other(
                "still mounted; not removed (unmount it first)",
            )));
        }
        std::fs::remove_dir_all(&self.base).map_err(err)
    }

    pub fn lower(&self) -> PathBuf {
        self.base.join("lower")
    }
    pub fn upper(&self) -> PathBuf {
        self.base.join("upper")
    }
    fn mount(&self, target: &Path, access: Access) -> Result<(), MountError> {
        let err = |source: std::io::Error| MountError::Overlay {
            path: target.display().to_string(),
            source,
        };
        for d in ["upper", "work"] {
            std::fs::create_dir_all(self.base.join(d)).map_err(err)?;
        }
        let (lower, upper, work) = (self.lower(), self.upper(), self.base.join("work"));
        for p in [&lower, &upper, &work] {
            let s = p.to_string_lossy();
            if s.contains(',') || s.contains(':') || s.contains('\\') {
                return Err(err(std::io::Error::other(format!(
                    "{s}: overlay directories cannot contain ',', ':' or '\\'"
                ))));
            }
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        rustix::mount::mount(
            "tessera",
            target,
            "overlay",
            access.flags(),
            Some(
                std::ffi::CString::new(opts)
                    .map_err(|e| err(std::io::Error::other(e)))?
                    .as_c_str(),
            ),
        )
        .map_err(|e| err(e.into()))
    }
}

/// Mount `fs` on `dir` (with `writable`, an overlay on `dir` over the FUSE mount on
/// `writable.lower()`) and serve it until it is unmounted. `ready` runs once everything
/// is mounted, while requests are already being served. `access` says who may use the
/// mount and whether setuid bits and device nodes count (by default: not).
///
/// With `adopt`, the FUSE mount on `dir` is already there (a daemon before this one
/// served it; see [`conn`]) and this one takes over its connection. `ready` gets the
/// connection, for a keeper to hold a copy of it.
pub fn serve(
    fs: ImageFs,
    dir: &Path,
    threads: usize,
    writable: Option<&Writable>,
    access: Access,
    adopt: Option<FuseConn>,
    ready: impl FnOnce(&FuseConn),
) -> Result<(), MountError> {
    let fuse_dir = match writable {
        Some(w) => {
            let lower = w.lower();
            std::fs::create_dir_all(&lower).map_err(|source| MountError::Overlay {
                path: lower.display().to_string(),
                source,
            })?;
            lower
        }
        None => dir.to_path_buf(),
    };
    let mut config = fuser::Config::default();
    // Mount flags and options are ours (`mount_fuse`); fuser only serves the connection.
    // Only the mounting user (root) unless asked: an overlay on top reaches its lower
    // layer with the mounter's credentials; containers running as other users need
    // `allow_other`.
    config.acl = if access.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(threads.max(1));
    let err = |source| MountError::Mount {
        path: fuse_dir.display().to_string(),
        source,
    };
    // Mounted here, not by fuser: fuser's mount guard unmounts *by path* when its session
    // ends, and a session can end long after its mount went (a copy of the mount in
    // another mount namespace keeps the connection alive past `tessera umount`), by
    // which time the path may hold a newer mount. Ours is told apart by its device.
    let acl = config.acl;
    let (conn, fresh) = match adopt {
        Some(c) if writable.is_some() => {
            drop(c);
            return Err(err(std::io::Error::other(
                "a writable mount cannot be taken over from another daemon",
            )));
        }
        Some(c) => (c, false),
        None => {
            let (fd, dev) = mount_fuse(&fuse_dir, access).map_err(err)?;
            match conn::read_init(&fd) {
                Ok(init) => (
                    FuseConn {
                        fd,
                        init,
                        dev,
                        resumable: false,
                    },
                    true,
                ),
                Err(e) => {
                    unmount_if_ours(&fuse_dir, dev);
                    return Err(err(e));
                }
            }
        }
    };
    let dev = conn.dev;
    let mut conn = conn;
    let session = match conn::session(fs, &mut conn, fresh, acl, config) {
        Ok(s) => s,
        Err(e) => {
            if fresh {
                unmount_if_ours(&fuse_dir, dev);
            }
            return Err(err(e));
        }
    };
    // The session must answer requests while the overlay is mounted over it (overlayfs
    // looks up its lower layer while mounting): run it on its own thread.
    let runner = std::thread::Builder::new()
        .name("tessera-fuse".into())
        .spawn(move || session.run())
        .map_err(err)?;
    if let Some(w) = writable {
        if let Err(e) = w.mount(dir, access) {
            unmount_if_ours(&fuse_dir, dev);
            let _ = runner.join();
            return Err(e);
        }
    }
    ready(&conn);
    drop(conn);
    let r = match runner.join() {
        Ok(r) => r.map_err(err),
        Err(_) => Err(err(std::io::Error::other(
            "the FUSE session thread panicked",
        ))),
    };
    // The session ends once the mount is gone everywhere, or its connection was aborted
    // (then the dead mount is still there: take it away, if it is still ours).
    unmount_if_ours(&fuse_dir, dev);
    r
}

/// Open `/dev/fuse` and mount it on `dir`; returns the connection and the mount's
/// device number (its identity: a later mount at the same path has another).
fn mount_fuse(dir: &Path, access: Access) -> std::io::Result<(std::os::fd::OwnedFd, u64)> {
    use std::os::fd::AsRawFd;
    let fd = rustix::fs::open(
        "/dev/fuse",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let mut opts = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
        fd.as_raw_fd(),
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw()
    );
    if access.allow_other {
        opts.push_str(",allow_other");
    }
    let opts = std::ffi::CString::new(opts).map_err(std::io::Error::other)?;
    rustix::mount::mount(
        "tessera",
        dir,
        "fuse.tessera",
        access.flags() | rustix::mount::MountFlags::RDONLY,
        Some(opts.as_c_str()),
    )?;
    let dev = mount_dev(dir).ok_or_else(|| {
        std::io::Error::other(format!(
            "{} was mounted but is not in /proc/self/mountinfo",
            dir.display()
        ))
    })?;
    Ok((fd, dev))
}

/// `dir` as mountinfo names it: its parent made absolute and free of symlinks, its last
/// component as it is. `dir` itself is never looked at: a FUSE mount root whose daemon
/// is gone (and whose connection a keeper holds) would block the caller until a daemon
/// comes back.
fn mount_path(dir: &Path) -> PathBuf {
    match (dir.parent(), dir.file_name()) {
        (Some(p), Some(name)) => {
            let p = if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            };
            std::fs::canonicalize(p)
                .map(|p| p.join(name))
                .unwrap_or_else(|_| dir.to_path_buf())
        }
        _ => std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
    }
}

/// The device number of the topmost mount at `dir` (from `/proc/self/mountinfo`, so a
/// FUSE mount whose daemon is busy or gone is not asked).
pub fn mount_dev(dir: &Path) -> Option<u64> {
    let dir = mount_path(dir);
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let (_id, _parent, majmin, _root, point) =
            (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        if unescape_mountinfo(point) != dir {
            return None;
        }
        let (ma, mi) = majmin.split_once(':')?;
        Some(rustix::fs::makedev(ma.parse().ok()?, mi.parse().ok()?))
    })
}

/// Unmount `dir` only while the mount there is the one with device `dev`.
fn unmount_if_ours(dir: &Path, dev: u64) {
    match mount_dev(dir) {
        Some(d) if d == dev => {
            if let Err(e) = unmount_one(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot unmount");
            }
        }
        Some(_) => {
            tracing::info!(dir = %dir.display(), "a newer mount is at this path now; it is left alone")
        }
        None => {}
    }
}

fn unmount_one(dir: &Path) -> Result<(), MountError> {
    rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
        MountError::Unmount {
            path: dir.display().to_string(),
            source: e.into(),
        }
    })
}

/// A path as `/proc/self/mountinfo` writes it (octal escapes for space, tab, newline, \\).
fn unescape_mountinfo(s: &str) -> PathBuf {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// A mount from `/proc/self/mountinfo`: (mount point, fs type, super options).
fn mounts() -> Vec<(PathBuf, String, String)> {
    let unescape = unescape_mountinfo;
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?.to_string();
            let _source = post.next();
            let opts = post.next().unwrap_or("").to_string();
            Some((unescape(point), fstype, opts))
        })
        .collect()
}

/// Unmount `dir` (lazily: also cleans up the mount of a daemon that died). For a
/// writable mount, the overlay goes first, then the tessera mount under it.
pub fn unmount(dir: &Path) -> Result<(), MountError> {
    let dir_abs = mount_path(dir);
    let lower = mounts()
        .into_iter()
        .rev()
        .find(|(p, _, _)| *p == dir_abs)
        .filter(|(_, t, _)| t == "overlay")
        .and_then(|(_, _, opts)| {
            opts.split(',')
                .find_map(|o| o.strip_prefix("lowerdir=").map(PathBuf::from))
        })
        .filter(|l| {
            mounts()
                .iter()
                .any(|(p, t, _)| p == l && (t == "fuse" || t.starts_with("fuse.")))
        });
    unmount_one(dir)?;
    if let Some(l) = lower {
        unmount_one(&l)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_profile_line;

    #[test]
    fn profile_lines() {
        assert_eq!(
            parse_profile_line(b"3 2 usr/lib/a b.so"),
            (Some((3, 2)), &b"usr/lib/a b.so"[..])
        );
        assert_eq!(
            parse_profile_line(b"usr/bin/bash"),
            (None, &b"usr/bin/bash"[..])
        );
        // Numbers that are not a range, or a missing path, make a plain path.
        assert_eq!(parse_profile_line(b"3 x y"), (None, &b"3 x y"[..]));
        assert_eq!(parse_profile_line(b"3 2"), (None, &b"3 2"[..]));
        assert_eq!(
            parse_profile_line(b"99999999999999999999999 1 a"),
            (None, &b"99999999999999999999999 1 a"[..])
        );
        assert_eq!(parse_profile_line(b""), (None, &b""[..]));
    }
}
