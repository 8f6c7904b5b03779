//! Compare two root filesystem trees on disk and report every difference.
//!
//! The typical use is checking that the rootfs produced by `tessera unpack` is
//! identical to the one produced by a reference unpacker such as `umoci unpack`.
//!
//! Both trees are walked without following symlinks (everything is `lstat`ed),
//! and for every path the file type, permission bits, owner, mtime, extended
//! attributes (all namespaces), symlink target, size and content of regular files,
//! device numbers and hard-link structure are compared. See [`compare`].
//!
//! Reading `trusted.*` extended attributes requires `CAP_SYS_ADMIN`; without it
//! the kernel silently leaves them out of the listing on both sides.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Size of the read buffer used when hashing file contents.
const HASH_BUF_SIZE: usize = 1 << 20;

/// How many times a racing extended-attribute listing/read is retried before
/// giving up with `ERANGE`.
const XATTR_RETRIES: usize = 8;

/// Knobs for [`compare`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Skip Mode, Owner, Mtime and Xattrs of the root directory itself.
    pub ignore_root_metadata: bool,
    /// Skip Mtime of directories (other types are still compared).
    pub ignore_dir_mtime: bool,
}

/// One difference between the two trees.
///
/// `path` is relative to the roots and starts with `/` (the root itself is `/`).
/// Non-UTF-8 names are shown lossily; comparison and ordering use the raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub path: String,
    pub kind: DiffKind,
    /// The value on the left side, rendered for humans.
    pub left: String,
    /// The value on the right side, rendered for humans.
    pub right: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} differs: {} != {}",
            self.path, self.kind, self.left, self.right
        )
    }
}

/// What differs at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffKind {
    /// Present on one side only (`left`/`right` are `present`/`absent`). Only the
    /// top of a missing subtree is reported.
    Missing,
    /// File type (`dir`, `file`, `symlink`, `char`, `block`, `fifo`, `socket`).
    /// When the type differs nothing else is reported for the path.
    Type,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`, octal).
    /// Not compared for symlinks.
    Mode,
    /// `uid:gid`.
    Owner,
    /// Modification time as `seconds.nanoseconds`.
    Mtime,
    /// Extended attributes; only the attributes that differ are shown.
    Xattrs,
    /// Target of a symlink.
    SymlinkTarget,
    /// Content of regular files of equal size (shown as sha256).
    Content,
    /// Size of regular files in bytes.
    Size,
    /// `major:minor` of character and block devices.
    Device,
    /// The set of other paths hard-linked to this one.
    Hardlinks,
}

impl DiffKind {
    fn as_str(self) -> &'static str {
        match self {
            DiffKind::Missing => "missing",
            DiffKind::Type => "type",
            DiffKind::Mode => "mode",
            DiffKind::Owner => "owner",
            DiffKind::Mtime => "mtime",
            DiffKind::Xattrs => "xattrs",
            DiffKind::SymlinkTarget => "symlink target",
            DiffKind::Content => "content",
            DiffKind::Size => "size",
            DiffKind::Device => "device",
            DiffKind::Hardlinks => "hardlinks",
        }
    }
}

impl fmt::Display for DiffKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors from [`compare`]. Each I/O error carries the operation and the path
/// that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TreeDiffError {
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> TreeDiffError {
    TreeDiffError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn errno_err(op: &'static str, path: &Path, errno: Errno) -> TreeDiffError {
    io_err(op, path, io::Error::from(errno))
}

/// Compare the trees rooted at `left` and `right`.
///
/// The roots themselves may be given through symlinks (they are resolved);
/// everything below them is examined without following symlinks. The result is
/// sorted by path bytes, and for one path by [`DiffKind`] declaration order, so it
/// is deterministic. An empty vector means the trees are identical.
pub fn compare(
    left: &Path,
    right: &Path,
    opts: &Options,
) -> Result<Vec<Difference>, TreeDiffError> {
    let left = Tree::scan(left)?;
    let right = Tree::scan(right)?;
    let mut cmp = Comparer {
        left: &left,
        right: &right,
        opts,
        buf: vec![0; HASH_BUF_SIZE],
        out: Vec::new(),
    };

    // Directories present as directories on both sides and reached through such
    // directories: only their children are compared.
    let mut descend: HashSet<&[u8]> = HashSet::new();
    let mut li = left.entries.iter().peekable();
    let mut ri = right.entries.iter().peekable();
    loop {
        let (path, lm, rm) = match (li.peek(), ri.peek()) {
            (None, None) => break,
            (Some((lp, lm)), None) => {
                let item = (lp.as_slice(), Some(*lm), None);
                li.next();
                item
            }
            (None, Some((rp, rm))) => {
                let item = (rp.as_slice(), None, Some(*rm));
                ri.next();
                item
            }
            (Some((lp, lm)), Some((rp, rm))) => match lp.cmp(rp) {
                std::cmp::Ordering::Less => {
                    let item = (lp.as_slice(), Some(*lm), None);
                    li.next();
                    item
                }
                std::cmp::Ordering::Greater => {
                    let item = (rp.as_slice(), None, Some(*rm));
                    ri.next();
                    item
                }
                std::cmp::Ordering::Equal => {
                    let item = (lp.as_slice(), Some(*lm), Some(*rm));
                    li.next();
                    ri.next();
                    item
                }
            },
        };
        if let Some(parent) = parent_of(path) {
            if !descend.contains(parent) {
                continue;
            }
        }
        match (lm, rm) {
            (Some(lm), Some(rm)) => {
                if cmp.entry(path, lm, rm)? {
                    descend.insert(path);
                }
            }
            (Some(_), None) => cmp.push(path, DiffKind::Missing, "present", "absent"),
            (None, Some(_)) => cmp.push(path, DiffKind::Missing, "absent", "present"),
            (None, None) => {}
        }
    }
    Ok(cmp.out)
}

/// Parent of a relative path (`/a/b` → `/a`, `/a` → `/`, `/` → none).
fn parent_of(path: &[u8]) -> Option<&[u8]> {
    if path == b"/" {
        return None;
    }
    match path.iter().rposition(|&b| b == b'/') {
        Some(0) | None => Some(b"/"),
        Some(i) => Some(&path[..i]),
    }
}

/// Lossy rendering of raw path bytes.
fn show_path(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Everything found in one tree.
struct Tree {
    root: PathBuf,
    /// Relative path (`/`, `/etc`, `/etc/passwd`, ...) → lstat result.
    entries: BTreeMap<Vec<u8>, Metadata>,
    /// (st_dev, st_ino) → sorted relative paths, for non-directories with nlink > 1.
    links: HashMap<(u64, u64), Vec<Vec<u8>>>,
}

impl Tree {
    fn scan(root: &Path) -> Result<Tree, TreeDiffError> {
        let root = fs::canonicalize(root).map_err(|e| io_err("resolve", root, e))?;
        let meta = fs::symlink_metadata(&root).map_err(|e| io_err("lstat", &root, e))?;
        if !meta.is_dir() {
            return Err(TreeDiffError::NotADirectory { path: root });
        }
        let mut entries = BTreeMap::new();
        let mut links: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
        entries.insert(b"/".to_vec(), meta);
        let mut stack = vec![b"/".to_vec()];
        while let Some(dir) = stack.pop() {
            let dir_abs = abs_path(&root, &dir);
            let read = fs::read_dir(&dir_abs).map_err(|e| io_err("read directory", &dir_abs, e))?;
            for ent in read {
                let ent = ent.map_err(|e| io_err("read directory", &dir_abs, e))?;
                let mut rel = dir.clone();
                if rel != b"/" {
                    rel.push(b'/');
                }
                rel.extend_from_slice(ent.file_name().as_bytes());
                // DirEntry::metadata does not traverse symlinks on Unix.
                let meta = ent
                    .metadata()
                    .map_err(|e| io_err("lstat", &ent.path(), e))?;
                if meta.is_dir() {
                    stack.push(rel.clone());
                } else if meta.nlink() > 1 {
                    links
                        .entry((meta.dev(), meta.ino()))
                        .or_default()
                        .push(rel.clone());
                }
                entries.insert(rel, meta);
            }
        }
        for group in links.values_mut() {
            group.sort();
        }
        Ok(Tree {
            root,
            entries,
            links,
        })
    }

    fn abs(&self, rel: &[u8]) -> PathBuf {
        abs_path(&self.root, rel)
    }

    /// The other paths of this tree hard-linked to `rel`, sorted.
    fn link_partners(&self, rel: &[u8], meta: &Metadata) -> Vec<&[u8]> {
        if meta.is_dir() || meta.nlink() <= 1 {
            return Vec::new();
        }
        self.links
            .get(&(meta.dev(), meta.ino()))
            .map(|group| {
                group
                    .iter()
                    .map(Vec::as_slice)
                    .filter(|p| *p != rel)
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn abs_path(root: &Path, rel: &[u8]) -> PathBuf {
    match rel.strip_prefix(b"/") {
        Some(r) if !r.is_empty() => root.join(OsStr::from_bytes(r)),
        _ => root.to_path_buf(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
    Unknown,
}

impl Kind {
    fn of(meta: &Metadata) -> Kind {
        let ft = meta.file_type();
        if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            Kind::Unknown
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File => "file",
            Kind::Symlink => "symlink",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::Unknown => "unknown",
        }
    }
}

struct Comparer<'a> {
    left: &'a Tree,
    right: &'a Tree,
    opts: &'a Options,
    buf: Vec<u8>,
    out: Vec<Difference>,
}

impl Comparer<'_> {
    fn push(
        &mut self,
        path: &[u8],
        kind: DiffKind,
        left: impl Into<String>,
        right: impl Into<String>,
    ) {
        self.out.push(Difference {
            path: show_path(path),
            kind,
            left: left.into(),
            right: right.into(),
        });
    }

    /// Compare a path present on both sides. Returns whether it is a directory on
    /// both sides (so its children should be compared).
    fn entry(&mut self, path: &[u8], lm: &Metadata, rm: &Metadata) -> Result<bool, TreeDiffError> {
        let (lk, rk) = (Kind::of(lm), Kind::of(rm));
        if lk != rk {
            self.push(path, DiffKind::Type, lk.name(), rk.name());
            return Ok(false);
        }
        let kind = lk;
        let metadata = !(path == b"/" && self.opts.ignore_root_metadata);

        if metadata && kind != Kind::Symlink {
            let (l, r) = (lm.mode() & 0o7777, rm.mode() & 0o7777);
            if l != r {
                self.push(path, DiffKind::Mode, format!("{l:04o}"), format!("{r:04o}"));
            }
        }
        if metadata && (lm.uid(), lm.gid()) != (rm.uid(), rm.gid()) {
            self.push(
                path,
                DiffKind::Owner,
                format!("{}:{}", lm.uid(), lm.gid()),
                format!("{}:{}", rm.uid(), rm.gid()),
            );
        }
        if metadata
            && !(kind == Kind::Dir && self.opts.ignore_dir_mtime)
            && (lm.mtime(), lm.mtime_nsec()) != (rm.mtime(), rm.mtime_nsec())
        {
            self.push(path, DiffKind::Mtime, show_mtime(lm), show_mtime(rm));
        }
        if metadata {
            let lx = read_xattrs(&self.left.abs(path))?;
            let rx = read_xattrs(&self.right.abs(path))?;
            if lx != rx {
                let (l, r) = show_xattr_diff(&lx, &rx);
                self.push(path, DiffKind::Xattrs, l, r);
            }
        }

        match kind {
            Kind::Symlink => {
                let (lp, rp) = (self.left.abs(path), self.right.abs(path));
                let lt = fs::read_link(&lp).map_err(|e| io_err("read symlink", &lp, e))?;
                let rt = fs::read_link(&rp).map_err(|e| io_err("read symlink", &rp, e))?;
                if lt.as_os_str().as_bytes() != rt.as_os_str().as_bytes() {
                    self.push(
                        path,
                        DiffKind::SymlinkTarget,
                        show_path(lt.as_os_str().as_bytes()),
                        show_path(rt.as_os_str().as_bytes()),
                    );
                }
            }
            Kind::File => {
                if lm.size() != rm.size() {
                    self.push(
                        path,
                        DiffKind::Size,
                        lm.size().to_string(),
                        rm.size().to_string(),
                    );
                } else {
                    let lh = sha256_file(&self.left.abs(path), &mut self.buf)?;
                    let rh = sha256_file(&self.right.abs(path), &mut self.buf)?;
                    if lh != rh {
                        self.push(
                            path,
                            DiffKind::Content,
                            format!("sha256:{}", hex::encode(lh)),
                            format!("sha256:{}", hex::encode(rh)),
                        );
                    }
                }
            }
            Kind::Char | Kind::Block => {
                if lm.rdev() != rm.rdev() {
                    self.push(
                        path,
                        DiffKind::Device,
                        show_dev(lm.rdev()),
                        show_dev(rm.rdev()),
                    );
                }
            }
            Kind::Dir | Kind::Fifo | Kind::Socket | Kind::Unknown => {}
        }

        if kind != Kind::Dir {
            let l = self.left.link_partners(path, lm);
            let r = self.right.link_partners(path, rm);
            if l != r {
                let (l, r) = (show_path_set(&l), show_path_set(&r));
                self.push(path, DiffKind::Hardlinks, l, r);
            }
        }

        Ok(kind == Kind::Dir)
    }
}

fn show_mtime(meta: &Metadata) -> String {
    format!("{}.{:09}", meta.mtime(), meta.mtime_nsec())
}

fn show_dev(rdev: u64) -> String {
    format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev))
}

fn show_path_set(paths: &[&[u8]]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| show_path(p)).collect();
    format!("[{}]", shown.join(", "))
}

/// Quoted string if the bytes are printable ASCII (a single trailing NUL, as
/// C tools often store, is allowed and shown as `\0`), otherwise `0x` + hex.
fn show_bytes(bytes: &[u8]) -> String {
    let body = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) if body.iter().all(|b| (0x20..0x7f).contains(b)) => format!("{s:?}"),
        _ => format!("0x{}", hex::encode(bytes)),
    }
}

fn show_xattr_name(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(s) if name.iter().all(|b| (0x21..0x7f).contains(b)) => s.to_owned(),
        _ => show_bytes(name),
    }
}

type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

/// Render only the attributes that differ, e.g. `{user.a="1"}` vs `{}`.
fn show_xattr_diff(left: &Xattrs, right: &Xattrs) -> (String, String) {
    let names: std::collections::BTreeSet<&Vec<u8>> = left.keys().chain(right.keys()).collect();
    let mut l = Vec::new();
    let mut r = Vec::new();
    for name in names {
        let (lv, rv) = (left.get(name), right.get(name));
        if lv == rv {
            continue;
        }
        if let Some(v) = lv {
            l.push(format!("{}={}", show_xattr_name(name), show_bytes(v)));
        }
        if let Some(v) = rv {
            r.push(format!("{}={}", show_xattr_name(name), show_bytes(v)));
        }
    }
    (
        format!("{{{}}}", l.join(", ")),
        format!("{{{}}}", r.join(", ")),
    )
}

fn xattrs_unsupported(e: Errno) -> bool {
    e == Errno::OPNOTSUPP || e == Errno::NOTSUP
}

/// All extended attributes of `path` (not following a symlink at `path`).
fn read_xattrs(path: &Path) -> Result<Xattrs, TreeDiffError> {
    let mut map = Xattrs::new();
    let Some(list) = list_xattrs(path)? else {
        return Ok(map);
    };
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if let Some(value) = get_xattr(path, name)? {
            map.insert(name.to_vec(), value);
        }
    }
    Ok(map)
}

/// The NUL-separated attribute name list, or `None` if the filesystem has no
/// xattr support.
fn list_xattrs(path: &Path) -> Result<Option<Vec<u8>>, TreeDiffError> {
    for _ in 0..XATTR_RETRIES {
        let size = match rustix::fs::llistxattr_query(path) {
            Ok(size) => size,
            Err(e) if xattrs_unsupported(e) => return Ok(None),
            Err(e) => return Err(errno_err("list xattrs of", path, e)),
        };
        if size == 0 {
            return Ok(Some(Vec::new()));
        }
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(Some(buf));
            }
            // The list grew between the two calls.
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(errno_err("list xattrs of", path, e)),
        }
    }
    Err(errno_err("list xattrs of", path, Errno::RANGE))
}

/// One attribute value, or `None` if it vanished since it was listed.
fn get_xattr(path: &Path, name: &[u8]) -> Result<Option<Vec<u8>>, TreeDiffError> {
    let op = "read xattrs of";
    for _ in 0..XATTR_RETRIES {
        let size = match rustix::fs::lgetxattr_query(path, name) {
            Ok(size) => size,
            Err(Errno::NODATA) => return Ok(None),
            Err(e) => return Err(errno_err(op, path, e)),
        };
        if size == 0 {
            return Ok(Some(Vec::new()));
        }
        let mut buf = vec![0u8; size];
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(Some(buf));
            }
            Err(Errno::NODATA) => return Ok(None),
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(errno_err(op, path, e)),
        }
    }
    Err(errno_err(op, path, Errno::RANGE))
}

/// Streaming sha256 of a regular file, refusing to follow a symlink that may
/// have replaced it since the walk.
fn sha256_file(path: &Path, buf: &mut [u8]) -> Result<[u8; 32], TreeDiffError> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| errno_err("open", path, e))?;
    let mut file = File::from(fd);
    let mut hasher = Sha256::new();
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path, e)),
        }
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{makedev, AtFlags, FileType, Timespec, Timestamps, XattrFlags, CWD};
    use std::os::unix::fs::{lchown, symlink, PermissionsExt};

    const SEC: i64 = 1_600_000_000;
    const NSEC: i64 = 123_456_789;

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn set_mtime(path: &Path, sec: i64, nsec: i64) {
        let ts = Timespec {
            tv_sec: sec,
            tv_nsec: nsec as _,
        };
        let times = Timestamps {
            last_access: ts,
            last_modification: ts,
        };
        rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    /// Give every entry of the tree (including the root and symlinks) the same
    /// explicit mtime.
    fn stamp(path: &Path) {
        let meta = fs::symlink_metadata(path).unwrap();
        if meta.is_dir() {
            for ent in fs::read_dir(path).unwrap() {
                stamp(&ent.unwrap().path());
            }
        }
        set_mtime(path, SEC, NSEC);
    }

    fn mknod_char(path: &Path, major: u32, minor: u32) {
        rustix::fs::mknodat(
            CWD,
            path,
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            makedev(major, minor),
        )
        .unwrap();
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()).unwrap();
    }

    /// A tree with one of everything.
    fn build(root: &Path) {
        fs::create_dir_all(root).unwrap();
        fs::create_dir(root.join("etc")).unwrap();
        fs::write(root.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::create_dir(root.join("etc/dir")).unwrap();
        chmod(&root.join("etc/dir"), 0o750);
        fs::write(root.join("etc/dir/inner"), b"inner\n").unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::write(root.join("owned"), b"owned by 1000\n").unwrap();
        lchown(root.join("owned"), Some(1000), Some(1000)).unwrap();
        symlink("etc/passwd", root.join("link")).unwrap();
        fs::write(root.join("hl1"), b"hardlinked\n").unwrap();
        fs::hard_link(root.join("hl1"), root.join("hl2")).unwrap();
        rustix::fs::mkfifoat(CWD, root.join("fifo"), Mode::from_raw_mode(0o644)).unwrap();
        mknod_char(&root.join("null"), 1, 3);
        fs::write(root.join("xattr"), b"has xattrs\n").unwrap();
        set_xattr(&root.join("xattr"), "user.comment", b"hello");
        set_xattr(&root.join("xattr"), "trusted.bin", &[0, 1, 2, 0xff]);
        fs::write(root.join("suid"), b"#!/bin/sh\n").unwrap();
        chmod(&root.join("suid"), 0o4755);
        stamp(root);
    }

    /// Two identical trees `left` and `right` in a fresh temporary directory.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let left = tmp.path().join("left");
        let right = tmp.path().join("right");
        build(&left);
        build(&right);
        (tmp, left, right)
    }

    fn diff(left: &Path, right: &Path) -> Vec<Difference> {
        compare(left, right, &Options::default()).unwrap()
    }

    fn kinds(diffs: &[Difference]) -> Vec<(&str, DiffKind)> {
        diffs.iter().map(|d| (d.path.as_str(), d.kind)).collect()
    }

    /// Apply `mutate` to the right tree, restore the mtimes it disturbed and
    /// return the differences.
    fn diff_after(mutate: impl FnOnce(&Path)) -> Vec<Difference> {
        let (_tmp, left, right) = setup();
        mutate(&right);
        stamp(&right);
        diff(&left, &right)
    }

    #[test]
    fn identical_trees_have_no_differences() {
        let (_tmp, left, right) = setup();
        // The fixture really contains what it claims.
        let meta = |p: &str| fs::symlink_metadata(left.join(p)).unwrap();
        assert!(meta("null").file_type().is_char_device());
        assert!(meta("fifo").file_type().is_fifo());
        assert!(meta("link").file_type().is_symlink());
        assert_eq!(meta("hl1").nlink(), 2);
        assert_eq!(meta("suid").mode() & 0o7777, 0o4755);
        assert_eq!(meta("link").mtime_nsec(), NSEC);
        assert_eq!(read_xattrs(&left.join("xattr")).unwrap().len(), 2);

        assert_eq!(diff(&left, &right), vec![]);
        assert_eq!(diff(&right, &left), vec![]);
        assert_eq!(diff(&left, &left), vec![]);
    }

    #[test]
    fn content_same_size() {
        let d = diff_after(|r| {
            fs::write(r.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/SH\n").unwrap();
        });
        assert_eq!(kinds(&d), vec![("/etc/passwd", DiffKind::Content)]);
        assert!(d[0].left.starts_with("sha256:"), "{}", d[0]);
        assert_ne!(d[0].left, d[0].right);
    }

    #[test]
    fn size() {
        let d = diff_after(|r| fs::write(r.join("etc/passwd"), b"root\n").unwrap());
        assert_eq!(kinds(&d), vec![("/etc/passwd", DiffKind::Size)]);
        assert_eq!((d[0].left.as_str(), d[0].right.as_str()), ("30", "5"));
    }

    #[test]
    fn mode() {
        let d = diff_after(|r| chmod(&r.join("etc/passwd"), 0o600));
        assert_eq!(kinds(&d), vec![("/etc/passwd", DiffKind::Mode)]);
        assert_eq!(d[0].to_string(), "/etc/passwd: mode differs: 0644 != 0600");
    }

    #[test]
    fn setuid_bit() {
        let d = diff_after(|r| chmod(&r.join("suid"), 0o755));
        assert_eq!(kinds(&d), vec![("/suid", DiffKind::Mode)]);
        assert_eq!((d[0].left.as_str(), d[0].right.as_str()), ("4755", "0755"));
    }

    #[test]
    fn owner() {
        let d = diff_after(|r| lchown(r.join("owned"), Some(1001), None).unwrap());
        assert_eq!(kinds(&d), vec![("/owned", DiffKind::Owner)]);
        assert_eq!(
            (d[0].left.as_str(), d[0].right.as_str()),
            ("1000:1000", "1001:1000")
        );
    }

    #[test]
    fn mtime_nanoseconds() {
        let (_tmp, left, right) = setup();
        set_mtime(&right.join("etc/passwd"), SEC, NSEC + 1);
        let d = diff(&left, &right);
        assert_eq!(kinds(&d), vec![("/etc/passwd", DiffKind::Mtime)]);
        assert_eq!(
            d[0].to_string(),
            "/etc/passwd: mtime differs: 1600000000.123456789 != 1600000000.123456790"
        );
    }

    #[test]
    fn symlink_mtime() {
        let (_tmp, left, right) = setup();
        set_mtime(&right.join("link"), SEC + 1, NSEC);
        let d = diff(&left, &right);
        assert_eq!(kinds(&d), vec![("/link", DiffKind::Mtime)]);
    }

    #[test]
    fn dir_mtime_and_ignore_dir_mtime() {
        let (_tmp, left, right) = setup();
        set_mtime(&right.join("etc"), SEC + 1, NSEC);
        assert_eq!(kinds(&diff(&left, &right)), vec![("/etc", DiffKind::Mtime)]);
        let opts = Options {
            ignore_dir_mtime: true,
            ..Options::default()
        };
        assert_eq!(compare(&left, &right, &opts).unwrap(), vec![]);
    }

    #[test]
    fn root_metadata_and_ignore_root_metadata() {
        let (_tmp, left, right) = setup();
        chmod(&right, 0o700);
        lchown(&right, Some(1000), Some(1000)).unwrap();
        set_xattr(&right, "user.root", b"1");
        set_mtime(&right, SEC + 5, 0);
        let d = diff(&left, &right);
        assert_eq!(
            kinds(&d),
            vec![
                ("/", DiffKind::Mode),
                ("/", DiffKind::Owner),
                ("/", DiffKind::Mtime),
                ("/", DiffKind::Xattrs),
            ]
        );
        let opts = Options {
            ignore_root_metadata: true,
            ..Options::default()
        };
        assert_eq!(compare(&left, &right, &opts).unwrap(), vec![]);
    }

    #[test]
    fn xattr_value() {
        let d = diff_after(|r| set_xattr(&r.join("xattr"), "user.comment", b"hellp"));
        assert_eq!(kinds(&d), vec![("/xattr", DiffKind::Xattrs)]);
        assert_eq!(
            d[0].to_string(),
            r#"/xattr: xattrs differs: {user.comment="hello"} != {user.comment="hellp"}"#
        );
    }

    #[test]
    fn trusted_xattr_binary_value_and_missing_name() {
        let d = diff_after(|r| {
            let p = r.join("xattr");
            set_xattr(&p, "trusted.bin", &[0, 1, 2, 0xfe]);
            set_xattr(
                &p,
                "security.capability",
                &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            );
        });
        assert_eq!(kinds(&d), vec![("/xattr", DiffKind::Xattrs)]);
        assert_eq!(d[0].left, "{trusted.bin=0x000102ff}");
        assert_eq!(
            d[0].right,
            "{security.capability=0x0100000200040000000000000000000000000000, trusted.bin=0x000102fe}"
        );
    }

    #[test]
    fn symlink_target() {
        let d = diff_after(|r| {
            fs::remove_file(r.join("link")).unwrap();
            symlink("etc/passwX", r.join("link")).unwrap();
        });
        assert_eq!(kinds(&d), vec![("/link", DiffKind::SymlinkTarget)]);
        assert_eq!(
            d[0].to_string(),
            "/link: symlink target differs: etc/passwd != etc/passwX"
        );
    }

    #[test]
    fn hardlink_replaced_by_identical_copy() {
        let d = diff_after(|r| {
            fs::remove_file(r.join("hl2")).unwrap();
            fs::copy(r.join("hl1"), r.join("hl2")).unwrap();
        });
        assert_eq!(
            kinds(&d),
            vec![("/hl1", DiffKind::Hardlinks), ("/hl2", DiffKind::Hardlinks)]
        );
        assert_eq!((d[0].left.as_str(), d[0].right.as_str()), ("[/hl2]", "[]"));
        assert_eq!((d[1].left.as_str(), d[1].right.as_str()), ("[/hl1]", "[]"));
    }

    #[test]
    fn hardlinks_regrouped() {
        let d = diff_after(|r| {
            fs::remove_file(r.join("hl2")).unwrap();
            fs::copy(r.join("hl1"), r.join("hl2")).unwrap();
            fs::hard_link(r.join("empty"), r.join("hl3")).unwrap();
        });
        assert_eq!(
            kinds(&d),
            vec![
                ("/empty", DiffKind::Hardlinks),
                ("/hl1", DiffKind::Hardlinks),
                ("/hl2", DiffKind::Hardlinks),
                ("/hl3", DiffKind::Missing),
            ]
        );
        assert_eq!((d[0].left.as_str(), d[0].right.as_str()), ("[]", "[/hl3]"));
    }

    #[test]
    fn extra_file() {
        let d = diff_after(|r| fs::write(r.join("etc/extra"), b"x").unwrap());
        assert_eq!(kinds(&d), vec![("/etc/extra", DiffKind::Missing)]);
        assert_eq!(
            d[0].to_string(),
            "/etc/extra: missing differs: absent != present"
        );
    }

    #[test]
    fn missing_dir_reports_only_its_top() {
        let d = diff_after(|r| fs::remove_dir_all(r.join("etc/dir")).unwrap());
        assert_eq!(kinds(&d), vec![("/etc/dir", DiffKind::Missing)]);
        assert_eq!(
            (d[0].left.as_str(), d[0].right.as_str()),
            ("present", "absent")
        );
    }

    #[test]
    fn type_change_file_to_dir() {
        let d = diff_after(|r| {
            fs::remove_file(r.join("etc/passwd")).unwrap();
            fs::create_dir(r.join("etc/passwd")).unwrap();
            fs::write(r.join("etc/passwd/child"), b"x").unwrap();
        });
        assert_eq!(kinds(&d), vec![("/etc/passwd", DiffKind::Type)]);
        assert_eq!((d[0].left.as_str(), d[0].right.as_str()), ("file", "dir"));
    }

    #[test]
    fn device_number() {
        let d = diff_after(|r| {
            fs::remove_file(r.join("null")).unwrap();
            mknod_char(&r.join("null"), 1, 5);
        });
        assert_eq!(kinds(&d), vec![("/null", DiffKind::Device)]);
        assert_eq!((d[0].left.as_str(), d[0].right.as_str()), ("1:3", "1:5"));
    }

    #[test]
    fn output_is_sorted_by_path_bytes() {
        let d = diff_after(|r| {
            fs::write(r.join("zz"), b"").unwrap();
            fs::write(r.join("a.b"), b"").unwrap();
            fs::write(r.join("etc/dir/new"), b"").unwrap();
            fs::write(r.join("etc/passwd"), b"").unwrap();
        });
        assert_eq!(
            kinds(&d),
            vec![
                ("/a.b", DiffKind::Missing),
                ("/etc/dir/new", DiffKind::Missing),
                ("/etc/passwd", DiffKind::Size),
                ("/zz", DiffKind::Missing),
            ]
        );
    }

    /// Copy a tree of dirs, files and symlinks preserving mode, owner and mtime.
    fn copy_tree(from: &Path, to: &Path) {
        let meta = fs::symlink_metadata(from).unwrap();
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(to).unwrap();
            for ent in fs::read_dir(from).unwrap() {
                let ent = ent.unwrap();
                copy_tree(&ent.path(), &to.join(ent.file_name()));
            }
        } else if ft.is_symlink() {
            symlink(fs::read_link(from).unwrap(), to).unwrap();
        } else {
            fs::copy(from, to).unwrap();
        }
        lchown(to, Some(meta.uid()), Some(meta.gid())).unwrap();
        if !ft.is_symlink() {
            chmod(to, meta.mode() & 0o7777);
        }
        set_mtime(to, meta.mtime(), meta.mtime_nsec());
    }

    #[test]
    fn non_utf8_names_compare_equal_to_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let left = tmp.path().join("left");
        fs::create_dir(&left).unwrap();
        let dir = left.join(OsStr::from_bytes(b"d\xff"));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1\n").unwrap();
        symlink(
            OsStr::from_bytes(b"d\xff/caf\xe9"),
            left.join(OsStr::from_bytes(b"l\xfe")),
        )
        .unwrap();
        stamp(&left);
        let right = tmp.path().join("right");
        copy_tree(&left, &right);

        assert_eq!(diff(&left, &right), vec![]);

        // A difference below such a name is reported with a lossy path.
        let changed = right.join(OsStr::from_bytes(b"d\xff/caf\xe9"));
        fs::write(&changed, b"latin-2\n").unwrap();
        set_mtime(&changed, SEC, NSEC);
        let d = diff(&left, &right);
        assert_eq!(
            kinds(&d),
            vec![("/d\u{fffd}/caf\u{fffd}", DiffKind::Content)]
        );
    }

    #[test]
    fn displays_kinds() {
        assert_eq!(DiffKind::SymlinkTarget.to_string(), "symlink target");
        assert_eq!(DiffKind::Hardlinks.to_string(), "hardlinks");
    }

    #[test]
    fn missing_root_is_an_io_error_with_path() {
        let tmp = tempfile::tempdir().unwrap();
        let nope = tmp.path().join("nope");
        let err = compare(&nope, tmp.path(), &Options::default()).unwrap_err();
        match &err {
            TreeDiffError::Io { path, source, .. } => {
                assert_eq!(path, &nope);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("nope"), "{err}");

        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        let err = compare(&file, tmp.path(), &Options::default()).unwrap_err();
        assert!(
            matches!(err, TreeDiffError::NotADirectory { .. }),
            "{err:?}"
        );
    }
}
