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

pub mod store;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::NodeStore;
use tessera_format::index::{FileMap, Meta, Node};
use tessera_image::{ChunkReader, TesseraImage};
use tessera_oci::Store;

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
    #[error("unmounting {path}: {source}")]
    Unmount {
        path: String,
        source: std::io::Error,
    },
}

/// Counters of one mount.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub chunks_from_store: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    pub fetch_errors: u64,
}

pub struct ImageFs {
    image: Arc<TesseraImage>,
    source: Box<dyn Store>,
    store: Arc<NodeStore>,
    /// Children (entry numbers) of every directory entry, in index order.
    children: Vec<Vec<u32>>,
    /// (parent entry, name) → entry.
    names: HashMap<(u32, Vec<u8>), u32>,
    /// Link count of every inode entry.
    nlink: Vec<u32>,
    maps: Mutex<HashMap<u32, Arc<FileMap>>>,
    stats: Mutex<Stats>,
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

impl ImageFs {
    pub fn new(image: TesseraImage, source: Box<dyn Store>, store: Arc<NodeStore>) -> ImageFs {
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
            image: Arc::new(image),
            source,
            store,
            children,
            names,
            nlink,
            maps: Mutex::new(HashMap::new()),
            stats: Mutex::new(Stats::default()),
        }
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
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
        let mut have: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut missing = Vec::new();
        for &(c, _) in &wanted {
            if have.contains_key(&c) || missing.contains(&c) {
                continue;
            }
            match self.store.get(&self.image.index.chunks[c as usize].id) {
                Some(b) => {
                    have.insert(c, b);
                }
                None => missing.push(c),
            }
        }
        let from_store = have.len() as u64;
        if !missing.is_empty() {
            let mut reader = ChunkReader::new(&self.image, self.source.as_ref());
            let mut sink = |c: u32, data: &[u8]| -> tessera_image::Result<()> {
                // ChunkReader verified the bytes against the chunk id.
                let id = self.image.index.chunks[c as usize].id;
                if let Err(e) = self.store.put(&id, data) {
                    tracing::warn!(chunk = %id, error = %e, "cannot cache a chunk in the node store");
                }
                have.insert(c, data.to_vec());
                Ok(())
            };
            if let Err(e) = reader.read_chunks(&missing, &mut sink) {
                let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                s.fetch_errors += 1;
                tracing::error!(entry = i, error = %e, "fetching chunks failed; read fails with EIO");
                return Err(Errno::EIO);
            }
            let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.chunks_fetched += missing.len() as u64;
            s.bytes_fetched += reader.fetched;
        }
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .chunks_from_store += from_store;
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
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        Ok(())
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
            // Verified, immutable data: let the kernel keep its page cache across opens.
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::ENOENT),
        }
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

/// Mount `fs` on `dir` and serve it until it is unmounted. `ready` runs once the
/// mount is in place.
pub fn serve(
    fs: ImageFs,
    dir: &std::path::Path,
    threads: usize,
    ready: impl FnOnce(),
) -> Result<(), MountError> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("tessera".into()),
        fuser::MountOption::Subtype("tessera".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
        fuser::MountOption::Exec,
    ];
    // Containers run as other users than the daemon.
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(threads.max(1));
    let err = |source| MountError::Mount {
        path: dir.display().to_string(),
        source,
    };
    let session = fuser::Session::new(fs, dir, &config).map_err(err)?;
    ready();
    session.run().map_err(err)
}

/// Unmount `dir` (lazily: also cleans up the mount of a daemon that died).
pub fn unmount(dir: &std::path::Path) -> Result<(), MountError> {
    rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
        MountError::Unmount {
            path: dir.display().to_string(),
            source: e.into(),
        }
    })
}
