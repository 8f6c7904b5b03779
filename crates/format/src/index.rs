//! The image index: the merged filesystem tree with per-file chunk lists.
//!
//! Encoding (version 2, and 1 for reading): `"TSRINDEX"` | version u32 LE | body length
//! u64 LE | one zstd frame holding the postcard encoding of [`Index`] (version 1 chunk
//! locations lack `frame_len` and `inner`). The encoding is canonical: entries
//! are in depth-first pre-order with siblings sorted by name bytes, chunks sorted by id,
//! packs sorted by digest, and hardlink groups point at their first member in that order,
//! so the same tree always gives the same bytes. See docs/format.md.

use crate::pack::{check_location, Frame, TocEntry};
use crate::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub const INDEX_MAGIC: &[u8; 8] = b"TSRINDEX";
/// The index version this crate writes (it reads 1 and 2).
pub const INDEX_VERSION: u32 = 2;
const HEADER_LEN: usize = 20;
/// Largest decoded index body accepted (bounds memory on hostile input).
pub const MAX_INDEX_BODY: u64 = 512 << 20;
/// Most entries an index may hold (4 Mi names).
pub const MAX_ENTRIES: usize = 1 << 22;
/// Most distinct chunks an index may hold (8 Mi chunks, about 512 GiB of content).
pub const MAX_CHUNKS: usize = 1 << 23;
/// Most packs an index may refer to.
pub const MAX_PACKS: usize = 1 << 20;
/// Most extended attributes per inode.
pub const MAX_XATTRS: usize = 1 << 12;

/// Deserialize a sequence, refusing more than `max` elements *before* allocating them:
/// postcard announces the length up front, so a hostile length fails immediately and a
/// lying one fails as soon as it is exceeded.
fn bounded<'de, D, T>(d: D, max: usize, what: &'static str) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T> {
        max: usize,
        what: &'static str,
        _t: std::marker::PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "at most {} {}", self.max, self.what)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > self.max {
                return Err(serde::de::Error::custom(format!(
                    "{hint} {} exceeds the limit of {}",
                    self.what, self.max
                )));
            }
            let mut v = Vec::with_capacity(hint.min(1024));
            while let Some(x) = seq.next_element()? {
                if v.len() == self.max {
                    return Err(serde::de::Error::custom(format!(
                        "more than {} {}",
                        self.max, self.what
                    )));
                }
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V {
        max,
        what,
        _t: std::marker::PhantomData,
    })
}

fn de_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Entry>, D::Error> {
    bounded(d, MAX_ENTRIES, "entries")
}
fn de_chunks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ChunkLoc>, D::Error> {
    bounded(d, MAX_CHUNKS, "chunks")
}
fn de_chunks_v1<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ChunkLocV1>, D::Error> {
    bounded(d, MAX_CHUNKS, "chunks")
}
fn de_packs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Digest>, D::Error> {
    bounded(d, MAX_PACKS, "packs")
}
fn de_xattrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Xattrs, D::Error> {
    bounded(d, MAX_XATTRS, "xattrs")
}
fn de_file_chunks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    bounded(d, MAX_CHUNKS, "chunk references")
}
const INDEX_ZSTD_LEVEL: i32 = 9;

/// Why an index could not be built or decoded.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index is truncated or not a tessera index (bad header)")]
    BadHeader,
    #[error("index format version {0} is not supported (this build reads versions 1 and {INDEX_VERSION}); upgrade tessera")]
    Version(u32),
    #[error("index body of {0} bytes exceeds the limit of {MAX_INDEX_BODY}")]
    TooLarge(u64),
    #[error("index body does not decompress: {0}")]
    Compression(String),
    #[error("index body does not decode: {0}")]
    Decode(String),
    #[error("index is invalid: {0}")]
    Invalid(String),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, IndexError> {
    Err(IndexError::Invalid(msg.into()))
}

/// Extended attributes: (name, value) pairs sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Metadata shared by every inode kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time (< 1e9).
    pub mtime_nsec: u32,
    /// Extended attributes sorted by name.
    #[serde(deserialize_with = "de_xattrs")]
    pub xattrs: Xattrs,
}

/// The content of a regular file: its size and its chunks (indices into [`Index::chunks`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    pub size: u64,
    #[serde(deserialize_with = "de_file_chunks")]
    pub chunks: Vec<u32>,
}

/// What an index entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    Dir(Meta),
    File(Meta, FileData),
    Symlink(Meta, Vec<u8>),
    /// Character device with its `rdev` (Linux encoding of major/minor).
    CharDev(Meta, u64),
    BlockDev(Meta, u64),
    Fifo(Meta),
    Socket(Meta),
    /// Another name for the inode of an earlier (non-directory) entry.
    HardLink(u32),
}

/// One name in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Index of the parent directory entry (0, the root, for itself).
    pub parent: u32,
    /// Name bytes (empty only for the root). Any bytes but `/` and NUL.
    pub name: Vec<u8>,
    pub node: Node,
}

/// Where a chunk is stored: the frame of a pack that holds it (`offset`, `stored_len`,
/// `frame_len`, `raw`) and its place in the decoded frame (`inner`, `len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLoc {
    pub id: Digest,
    /// Index into [`Index::packs`].
    pub pack: u32,
    /// Offset of the frame in the pack.
    pub offset: u64,
    /// Length of the frame in the pack.
    pub stored_len: u32,
    /// Length of the decoded frame.
    pub frame_len: u32,
    /// Offset of the chunk in the decoded frame.
    pub inner: u32,
    /// Length of the chunk.
    pub len: u32,
    pub raw: bool,
}

impl ChunkLoc {
    /// The frame that holds this chunk.
    pub fn frame(&self) -> Frame {
        Frame {
            stored_len: self.stored_len,
            frame_len: self.frame_len,
            raw: self.raw,
        }
    }

    /// The pack TOC entry this location mirrors.
    pub fn toc_entry(&self) -> TocEntry {
        TocEntry {
            id: self.id,
            offset: self.offset,
            stored_len: self.stored_len,
            frame_len: self.frame_len,
            inner: self.inner,
            uncompressed_len: self.len,
            raw: self.raw,
        }
    }

    /// Whether `other` is stored in the same frame (of the same pack).
    pub fn same_frame(&self, other: &ChunkLoc) -> bool {
        self.pack == other.pack && self.offset == other.offset
    }
}

/// A version 1 chunk location: alone in its frame.
#[derive(Deserialize)]
struct ChunkLocV1 {
    id: Digest,
    pack: u32,
    offset: u64,
    stored_len: u32,
    len: u32,
    raw: bool,
}

/// A version 1 index body.
#[derive(Deserialize)]
struct IndexV1 {
    #[serde(deserialize_with = "de_packs")]
    packs: Vec<Digest>,
    #[serde(deserialize_with = "de_chunks_v1")]
    chunks: Vec<ChunkLocV1>,
    #[serde(deserialize_with = "de_entries")]
    entries: Vec<Entry>,
}

impl From<IndexV1> for Index {
    fn from(v: IndexV1) -> Index {
        Index {
            packs: v.packs,
            chunks: v
                .chunks
                .into_iter()
                .map(|c| ChunkLoc {
                    id: c.id,
                    pack: c.pack,
                    offset: c.offset,
                    stored_len: c.stored_len,
                    frame_len: c.len,
                    inner: 0,
                    len: c.len,
                    raw: c.raw,
                })
                .collect(),
            entries: v.entries,
        }
    }
}

/// A decoded, validated index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    #[serde(deserialize_with = "de_packs")]
    pub packs: Vec<Digest>,
    #[serde(deserialize_with = "de_chunks")]
    pub chunks: Vec<ChunkLoc>,
    #[serde(deserialize_with = "de_entries")]
    pub entries: Vec<Entry>,
}

impl Index {
    /// Canonical bytes of this index.
    pub fn encode(&self) -> Result<Vec<u8>, IndexError> {
        let body = postcard::to_stdvec(self).map_err(|e| IndexError::Decode(e.to_string()))?;
        let frame = zstd::bulk::compress(&body, INDEX_ZSTD_LEVEL)
            .map_err(|e| IndexError::Compression(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER_LEN + frame.len());
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&frame);
        Ok(out)
    }

    /// Decode and validate untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Index, IndexError> {
        if bytes.len() < HEADER_LEN || &bytes[0..8] != INDEX_MAGIC {
            return Err(IndexError::BadHeader);
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&bytes[8..12]);
        let version = u32::from_le_bytes(v);
        if version != 1 && version != INDEX_VERSION {
            return Err(IndexError::Version(version));
        }
        let mut l = [0u8; 8];
        l.copy_from_slice(&bytes[12..20]);
        let body_len = u64::from_le_bytes(l);
        if body_len > MAX_INDEX_BODY {
            return Err(IndexError::TooLarge(body_len));
        }
        // Stream the frame so memory grows with the real body, never with the claimed length.
        let mut body = Vec::new();
        let dec = zstd::stream::read::Decoder::new(&bytes[HEADER_LEN..])
            .map_err(|e| IndexError::Compression(e.to_string()))?;
        std::io::Read::read_to_end(&mut std::io::Read::take(dec, body_len + 1), &mut body)
            .map_err(|e| IndexError::Compression(e.to_string()))?;
        if body.len() as u64 != body_len {
            return Err(IndexError::Compression(format!(
                "body is {} bytes, header says {body_len}",
                body.len()
            )));
        }
        let (index, rest): (Index, &[u8]) = if version == 1 {
            let (v1, rest): (IndexV1, &[u8]) =
                postcard::take_from_bytes(&body).map_err(|e| IndexError::Decode(e.to_string()))?;
            (v1.into(), rest)
        } else {
            postcard::take_from_bytes(&body).map_err(|e| IndexError::Decode(e.to_string()))?
        };
        if !rest.is_empty() {
            return Err(IndexError::Decode(format!("{} trailing bytes", rest.len())));
        }
        index.validate()?;
        Ok(index)
    }

    /// Check every structural rule of the format (see docs/format.md).
    pub fn validate(&self) -> Result<(), IndexError> {
        if self.packs.len() > u32::MAX as usize || self.chunks.len() > u32::MAX as usize {
            return invalid("too many packs or chunks");
        }
        if self.packs.windows(2).any(|w| w[0] >= w[1]) {
            return invalid("pack list is not strictly sorted");
        }
        if self.chunks.windows(2).any(|w| w[0].id >= w[1].id) {
            return invalid("chunk list is not strictly sorted by id");
        }
        // Chunks that share a frame must agree on it.
        let mut frames: HashMap<(u32, u64), Frame> = HashMap::new();
        for c in &self.chunks {
            if c.pack as usize >= self.packs.len() {
                return invalid(format!(
                    "chunk {} refers to pack {} of {}",
                    c.id,
                    c.pack,
                    self.packs.len()
                ));
            }
            check_location(&c.frame(), c.inner, c.len)
                .map_err(|e| IndexError::Invalid(format!("chunk {}: {e}", c.id)))?;
            if c.offset.checked_add(c.stored_len as u64).is_none() {
                return invalid("chunk offset overflows");
            }
            if *frames.entry((c.pack, c.offset)).or_insert(c.frame()) != c.frame() {
                return invalid(format!(
                    "chunk {} disagrees with another chunk of its frame on the frame's shape",
                    c.id
                ));
            }
        }
        let Some(root) = self.entries.first() else {
            return invalid("no root entry");
        };
        if root.parent != 0 || !root.name.is_empty() || !matches!(root.node, Node::Dir(_)) {
            return invalid("entry 0 must be the root directory with an empty name");
        }
        if let Some(meta) = root.meta() {
            check_meta(0, meta)?;
        }
        // Pre-order check: the parent of each entry must be on the stack of open dirs,
        // and siblings must be strictly increasing by name.
        let mut stack: Vec<(u32, Option<&[u8]>)> = vec![(0, None)];
        for (i, e) in self.entries.iter().enumerate().skip(1) {
            let i32_ = i as u32;
            if e.name.is_empty()
                || e.name.contains(&b'/')
                || e.name.contains(&0)
                || e.name == b"."
                || e.name == b".."
            {
                return invalid(format!(
                    "entry {i} has an invalid name {:?}",
                    String::from_utf8_lossy(&e.name)
                ));
            }
            while let Some(&(top, _)) = stack.last() {
                if top == e.parent {
                    break;
                }
                stack.pop();
            }
            let Some(last) = stack.last_mut() else {
                return invalid(format!(
                    "entry {i} is not in depth-first order under its parent"
                ));
            };
            if let Some(prev) = last.1 {
                if prev >= e.name.as_slice() {
                    return invalid(format!("entry {i} is out of order among its siblings"));
                }
            }
            last.1 = Some(&e.name);
            if let Some(meta) = e.meta() {
                check_meta(i, meta)?;
            }
            match &e.node {
                Node::Dir(_) => stack.push((i32_, None)),
                Node::File(_, f) => {
                    let mut total = 0u64;
                    for &c in &f.chunks {
                        let Some(loc) = self.chunks.get(c as usize) else {
                            return invalid(format!(
                                "entry {i} refers to chunk {c} of {}",
                                self.chunks.len()
                            ));
                        };
                        total += loc.len as u64;
                    }
                    if total != f.size {
                        return invalid(format!(
                            "entry {i}: size {} but its chunks hold {total} bytes",
                            f.size
                        ));
                    }
                }
                Node::HardLink(t)
                    if *t as usize >= i
                        || matches!(
                            self.entries[*t as usize].node,
                            Node::Dir(_) | Node::HardLink(_)
                        ) =>
                {
                    return invalid(format!(
                        "entry {i}: hardlink to {t}, which is not an earlier non-directory inode"
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Metadata of an entry, following a hardlink to its inode.
    pub fn meta(&self, i: usize) -> Option<&Meta> {
        let e = self.entries.get(i)?;
        match &e.node {
            Node::HardLink(t) => self.entries.get(*t as usize)?.meta(),
            _ => e.meta(),
        }
    }

    /// The inode entry an entry names (itself unless it is a hardlink).
    pub fn inode_entry(&self, i: usize) -> usize {
        match self.entries.get(i).map(|e| &e.node) {
            Some(Node::HardLink(t)) => *t as usize,
            _ => i,
        }
    }

    /// Path of entry `i` relative to the root, as components.
    pub fn path_components(&self, mut i: usize) -> Vec<&[u8]> {
        let mut out = Vec::new();
        while i != 0 {
            let e = &self.entries[i];
            out.push(e.name.as_slice());
            i = e.parent as usize;
        }
        out.reverse();
        out
    }

    /// Path of entry `i` as `a/b/c` bytes (empty for the root).
    pub fn path(&self, i: usize) -> Vec<u8> {
        self.path_components(i).join(&b'/')
    }

    /// Total uncompressed bytes of regular files (each inode counted once).
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match &e.node {
                Node::File(_, f) => f.size,
                _ => 0,
            })
            .sum()
    }
}

fn check_meta(i: usize, meta: &Meta) -> Result<(), IndexError> {
    if meta.mode & !0o7777 != 0 || meta.mtime_nsec >= 1_000_000_000 {
        return invalid(format!("entry {i} has an invalid mode or time"));
    }
    if meta.xattrs.windows(2).any(|w| w[0].0 >= w[1].0) {
        return invalid(format!("entry {i} has unsorted or duplicate xattrs"));
    }
    Ok(())
}

impl Entry {
    /// Metadata of this entry unless it is a hardlink.
    pub fn meta(&self) -> Option<&Meta> {
        match &self.node {
            Node::Dir(m)
            | Node::File(m, _)
            | Node::Symlink(m, _)
            | Node::CharDev(m, _)
            | Node::BlockDev(m, _)
            | Node::Fifo(m)
            | Node::Socket(m) => Some(m),
            Node::HardLink(_) => None,
        }
    }
}

/// Chunk offsets of one file, for O(log n) lookup of the chunk holding a file offset.
#[derive(Debug, Clone)]
pub struct FileMap {
    /// `starts[k]` = offset in the file of chunk k; `starts[n]` = file size.
    starts: Vec<u64>,
}

impl FileMap {
    pub fn new(index: &Index, file: &FileData) -> FileMap {
        let mut starts = Vec::with_capacity(file.chunks.len() + 1);
        let mut off = 0u64;
        for &c in &file.chunks {
            starts.push(off);
            off += index.chunks[c as usize].len as u64;
        }
        starts.push(off);
        FileMap { starts }
    }
    /// The chunk (position in the file's list) holding byte `offset`, and where it starts.
    pub fn locate(&self, offset: u64) -> Option<(usize, u64)> {
        let n = self.starts.len() - 1;
        if offset >= self.starts[n] {
            return None;
        }
        let k = self.starts.partition_point(|&s| s <= offset) - 1;
        Some((k, self.starts[k]))
    }
}

/// A node of a tree being built (paths are component lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeNode {
    pub meta: Meta,
    pub kind: TreeKind,
    /// Nodes with the same group are hardlinks of one inode.
    pub link_group: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TreeKind {
    Dir,
    File { size: u64, chunks: Vec<Digest> },
    Symlink(Vec<u8>),
    CharDev(u64),
    BlockDev(u64),
    Fifo,
    Socket,
}

/// A tree being built: nodes keyed by path components (BTreeMap order is the canonical
/// depth-first order).
pub type Tree = BTreeMap<Vec<Vec<u8>>, TreeNode>;

/// Where a chunk is stored, by pack digest (fields as in [`ChunkLoc`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StoredChunk {
    pub pack: Digest,
    pub offset: u64,
    pub stored_len: u32,
    pub frame_len: u32,
    pub inner: u32,
    pub len: u32,
    pub raw: bool,
}

impl StoredChunk {
    /// The location of the chunk of TOC entry `e` of pack `pack`.
    pub fn from_toc(pack: Digest, e: &TocEntry) -> StoredChunk {
        StoredChunk {
            pack,
            offset: e.offset,
            stored_len: e.stored_len,
            frame_len: e.frame_len,
            inner: e.inner,
            len: e.uncompressed_len,
            raw: e.raw,
        }
    }

    /// A chunk alone in its frame (as every version 1 chunk is).
    pub fn alone(pack: Digest, offset: u64, stored_len: u32, len: u32, raw: bool) -> StoredChunk {
        StoredChunk {
            pack,
            offset,
            stored_len,
            frame_len: len,
            inner: 0,
            len,
            raw,
        }
    }
}

/// Build the canonical index of a tree. `tree` is keyed by path components (its
/// BTreeMap order is exactly the canonical pre-order); the root (`[]`) may be absent.
pub fn build_index(
    tree: &Tree,
    locations: &dyn Fn(&Digest) -> Option<StoredChunk>,
) -> Result<Index, IndexError> {
    // Collect chunks and packs first, so their indices are canonical.
    let mut chunk_set: BTreeMap<Digest, StoredChunk> = BTreeMap::new();
    for (path, node) in tree {
        if let TreeKind::File { chunks, .. } = &node.kind {
            for id in chunks {
                if !chunk_set.contains_key(id) {
                    let loc = locations(id).ok_or_else(|| {
                        IndexError::Invalid(format!(
                            "no stored location for chunk {id} of {}",
                            show(path)
                        ))
                    })?;
                    chunk_set.insert(*id, loc);
                }
            }
        }
    }
    let packs: Vec<Digest> = chunk_set
        .values()
        .map(|l| l.pack)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let pack_idx: HashMap<Digest, u32> = packs
        .iter()
        .enumerate()
        .map(|(i, d)| (*d, i as u32))
        .collect();
    let mut chunk_idx: HashMap<Digest, u32> = HashMap::with_capacity(chunk_set.len());
    let mut chunks = Vec::with_capacity(chunk_set.len());
    for (i, (id, l)) in chunk_set.iter().enumerate() {
        chunk_idx.insert(*id, i as u32);
        chunks.push(ChunkLoc {
            id: *id,
            pack: pack_idx[&l.pack],
            offset: l.offset,
            stored_len: l.stored_len,
            frame_len: l.frame_len,
            inner: l.inner,
            len: l.len,
            raw: l.raw,
        });
    }

    let default_root = TreeNode {
        meta: Meta {
            mode: 0o755,
            ..Meta::default()
        },
        kind: TreeKind::Dir,
        link_group: None,
    };
    let root_node = tree.get(&Vec::new()).unwrap_or(&default_root);
    let mut entries = Vec::with_capacity(tree.len() + 1);
    let mut by_path: HashMap<&[Vec<u8>], u32> = HashMap::with_capacity(tree.len() + 1);
    let mut groups: HashMap<u64, u32> = HashMap::new();
    entries.push(Entry {
        parent: 0,
        name: Vec::new(),
        node: to_node(root_node, &chunk_idx),
    });
    by_path.insert(&[], 0);
    for (path, node) in tree {
        let Some((name, parent_path)) = path.split_last() else {
            continue;
        };
        let parent = *by_path.get(parent_path).ok_or_else(|| {
            IndexError::Invalid(format!("{} has no parent directory", show(path)))
        })?;
        if !matches!(entries[parent as usize].node, Node::Dir(_)) {
            return invalid(format!("parent of {} is not a directory", show(path)));
        }
        let i = entries.len() as u32;
        let n = match node.link_group {
            Some(g) if !matches!(node.kind, TreeKind::Dir) => match groups.get(&g) {
                Some(&first) => Node::HardLink(first),
                None => {
                    groups.insert(g, i);
                    to_node(node, &chunk_idx)
                }
            },
            _ => to_node(node, &chunk_idx),
        };
        entries.push(Entry {
            parent,
            name: name.clone(),
            node: n,
        });
        by_path.insert(path.as_slice(), i);
    }
    let mut index = Index {
        packs,
        chunks,
        entries,
    };
    for e in &mut index.entries {
        if let Node::Dir(m)
        | Node::File(m, _)
        | Node::Symlink(m, _)
        | Node::CharDev(m, _)
        | Node::BlockDev(m, _)
        | Node::Fifo(m)
        | Node::Socket(m) = &mut e.node
        {
            m.xattrs.sort();
            m.xattrs.dedup_by(|a, b| a.0 == b.0);
        }
    }
    index.validate()?;
    Ok(index)
}

fn to_node(n: &TreeNode, chunk_idx: &HashMap<Digest, u32>) -> Node {
    let m = n.meta.clone();
    match &n.kind {
        TreeKind::Dir => Node::Dir(m),
        TreeKind::File { size, chunks } => Node::File(
            m,
            FileData {
                size: *size,
                chunks: chunks.iter().map(|c| chunk_idx[c]).collect(),
            },
        ),
        TreeKind::Symlink(t) => Node::Symlink(m, t.clone()),
        TreeKind::CharDev(r) => Node::CharDev(m, *r),
        TreeKind::BlockDev(r) => Node::BlockDev(m, *r),
        TreeKind::Fifo => Node::Fifo(m),
        TreeKind::Socket => Node::Socket(m),
    }
}

/// A path as text for messages.
pub fn show(path: &[Vec<u8>]) -> String {
    if path.is_empty() {
        return "/".into();
    }
    String::from_utf8_lossy(&path.join(&b'/')).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 1,
            gid: 2,
            mtime: 1_700_000_000,
            mtime_nsec: 5,
            xattrs: vec![],
        }
    }

    fn sample() -> (Tree, HashMap<Digest, StoredChunk>) {
        let c1 = Digest::of(b"one");
        let c2 = Digest::of(b"two");
        let pack = Digest::of(b"pack");
        let mut locs = HashMap::new();
        locs.insert(c1, StoredChunk::alone(pack, 0, 3, 3, true));
        locs.insert(c2, StoredChunk::alone(pack, 3, 3, 3, true));
        let mut t = BTreeMap::new();
        let p = |s: &str| {
            s.split('/')
                .map(|c| c.as_bytes().to_vec())
                .collect::<Vec<_>>()
        };
        t.insert(
            vec![],
            TreeNode {
                meta: meta(0o755),
                kind: TreeKind::Dir,
                link_group: None,
            },
        );
        t.insert(
            p("a"),
            TreeNode {
                meta: meta(0o755),
                kind: TreeKind::Dir,
                link_group: None,
            },
        );
        t.insert(
            p("a/f"),
            TreeNode {
                meta: meta(0o4755),
                kind: TreeKind::File {
                    size: 6,
                    chunks: vec![c1, c2],
                },
                link_group: Some(1),
            },
        );
        t.insert(
            p("a.b"),
            TreeNode {
                meta: meta(0o644),
                kind: TreeKind::File {
                    size: 6,
                    chunks: vec![c1, c2],
                },
                link_group: Some(1),
            },
        );
        t.insert(
            p("dev"),
            TreeNode {
                meta: meta(0o600),
                kind: TreeKind::CharDev(0x0501),
                link_group: None,
            },
        );
        let mut x = meta(0o777);
        x.xattrs = vec![
            (b"user.z".to_vec(), b"1".to_vec()),
            (b"security.capability".to_vec(), vec![1, 0, 0, 2]),
        ];
        t.insert(
            vec![b"l\xff".to_vec()],
            TreeNode {
                meta: x,
                kind: TreeKind::Symlink(b"a/f".to_vec()),
                link_group: None,
            },
        );
        t.insert(
            p("e"),
            TreeNode {
                meta: meta(0o644),
                kind: TreeKind::File {
                    size: 0,
                    chunks: vec![],
                },
                link_group: None,
            },
        );
        (t, locs)
    }

    #[test]
    fn build_encode_decode() {
        let (t, locs) = sample();
        let idx = build_index(&t, &|d| locs.get(d).copied()).unwrap();
        // DFS order: a, a/f, a.b (hardlink to a/f), dev, e, l\xff
        let names: Vec<Vec<u8>> = (0..idx.entries.len()).map(|i| idx.path(i)).collect();
        assert_eq!(
            names,
            vec![
                b"".to_vec(),
                b"a".to_vec(),
                b"a/f".to_vec(),
                b"a.b".to_vec(),
                b"dev".to_vec(),
                b"e".to_vec(),
                b"l\xff".to_vec()
            ]
        );
        assert_eq!(idx.entries[3].node, Node::HardLink(2));
        let bytes = idx.encode().unwrap();
        let back = Index::decode(&bytes).unwrap();
        assert_eq!(back, idx);
        assert_eq!(back.encode().unwrap(), bytes, "encoding is canonical");
        let Node::File(_, f) = &idx.entries[2].node else {
            panic!()
        };
        let fm = FileMap::new(&idx, f);
        assert_eq!(fm.locate(0), Some((0, 0)));
        assert_eq!(fm.locate(4), Some((1, 3)));
        assert_eq!(fm.locate(6), None);
    }

    #[test]
    fn rejects_structural_errors() {
        let (t, locs) = sample();
        let idx = build_index(&t, &|d| locs.get(d).copied()).unwrap();
        let mut bad = idx.clone();
        bad.entries.swap(4, 5);
        assert!(bad.validate().is_err(), "sibling order");
        let mut bad = idx.clone();
        bad.entries[3].node = Node::HardLink(5);
        assert!(bad.validate().is_err(), "forward hardlink");
        let mut bad = idx.clone();
        bad.entries[2].parent = 6;
        assert!(bad.validate().is_err(), "parent not a dir");
        let mut bad = idx.clone();
        bad.entries[1].name = b"x/y".to_vec();
        assert!(bad.validate().is_err(), "slash in name");
        let mut bad = idx.clone();
        if let Node::File(_, f) = &mut bad.entries[2].node {
            f.size = 7;
        }
        assert!(bad.validate().is_err(), "size mismatch");
        let bytes = idx.encode().unwrap();
        for cut in [0, 5, 19, 20, bytes.len() - 1] {
            assert!(Index::decode(&bytes[..cut]).is_err());
        }
        let mut v = bytes.clone();
        v[8] = 9;
        assert!(matches!(Index::decode(&v), Err(IndexError::Version(9))));
    }

    fn blob(version: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = INDEX_MAGIC.to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&zstd::bulk::compress(body, 3).unwrap());
        bytes
    }

    fn golden_tree(files: &[(&str, &[u8])]) -> Tree {
        let mut t = BTreeMap::new();
        for (name, _) in files {
            let content: &[u8] = files.iter().find(|f| f.0 == *name).map(|f| f.1).unwrap();
            t.insert(
                vec![name.as_bytes().to_vec()],
                TreeNode {
                    meta: Meta {
                        mode: 0o644,
                        mtime: 1_700_000_000,
                        ..Meta::default()
                    },
                    kind: TreeKind::File {
                        size: content.len() as u64,
                        chunks: vec![Digest::of(content)],
                    },
                    link_group: None,
                },
            );
        }
        t
    }

    /// Appendix B.2 of docs/format.md: a version 1 index body still reads, its chunk
    /// alone in its frame.
    #[test]
    fn golden_v1_index_reads() {
        let body = crate::pack::tests::unhex(concat!(
            "012212bc835c2163be869f5492a692bbdae174d02d64fb09bfc93a711916c1fdc0015891b5b522d5df08",
            "6d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03000006060102000000ed0300000000000005",
            "68656c6c6f01a403000080c49fd50c0000060100"
        ));
        let idx = Index::decode(&blob(1, &body)).unwrap();
        let pack = Digest::of(b"");
        let hello = Digest::of(b"hello\n");
        let mut want = build_index(&golden_tree(&[("hello", b"hello\n")]), &|_| {
            Some(StoredChunk::alone(pack, 0, 6, 6, true))
        })
        .unwrap();
        want.packs = idx.packs.clone();
        assert_eq!(idx, want);
        assert_eq!(idx.chunks[0].id, hello);
        assert_eq!((idx.chunks[0].inner, idx.chunks[0].frame_len), (0, 6));
    }

    /// Appendix B.3 of docs/format.md: a version 2 index body, byte for byte: two files
    /// whose chunks share one raw frame.
    #[test]
    fn golden_v2_index() {
        let pack = crate::pack::tests::GOLDEN_V2_PACK
            .parse::<Digest>()
            .unwrap();
        let hello = Digest::of(b"hello\n");
        let idx = build_index(
            &golden_tree(&[("hello", b"hello\n"), ("world", b"world\n")]),
            &|d| {
                let inner = if *d == hello { 0 } else { 6 };
                Some(StoredChunk {
                    pack,
                    offset: 0,
                    stored_len: 12,
                    frame_len: 12,
                    inner,
                    len: 6,
                    raw: true,
                })
            },
        )
        .unwrap();
        let bytes = idx.encode().unwrap();
        let body = postcard::to_stdvec(&idx).unwrap();
        assert_eq!(
            &bytes[8..20],
            &[
                &2u32.to_le_bytes()[..],
                &(body.len() as u64).to_le_bytes()[..]
            ]
            .concat()[..]
        );
        let want = crate::pack::tests::unhex(concat!(
            "013365fa0abe9acdfae9ad17096a5be07c11153e6ea36dc54a63357a4dc669f39b",
            "025891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
            "00000c0c000601",
            "e258d248fda94c63753607f7c4494ee0fcbe92f1a76bfdac795c9d84101eb317",
            "00000c0c060601",
            "03000000ed030000000000",
            "000568656c6c6f01a403000080c49fd50c0000060100",
            "0005776f726c6401a403000080c49fd50c0000060101"
        ));
        assert_eq!(body, want);
        assert_eq!(Index::decode(&bytes).unwrap(), idx);
    }

    #[test]
    fn chunks_of_one_frame_must_agree_on_it() {
        let pack = Digest::of(b"p");
        let hello = Digest::of(b"hello\n");
        let idx = build_index(
            &golden_tree(&[("hello", b"hello\n"), ("world", b"world\n")]),
            &|d| {
                let inner = if *d == hello { 0 } else { 6 };
                Some(StoredChunk {
                    pack,
                    offset: 0,
                    stored_len: 12,
                    frame_len: 12,
                    inner,
                    len: 6,
                    raw: true,
                })
            },
        )
        .unwrap();
        let mut bad = idx.clone();
        bad.chunks[1].frame_len = 13;
        bad.chunks[1].stored_len = 13;
        assert!(bad.validate().is_err());
        let mut bad = idx.clone();
        bad.chunks[1].inner = 7;
        assert!(bad.validate().is_err(), "past the frame's end");
    }

    #[test]
    fn hostile_lengths_fail_before_allocating() {
        // Body: 0 packs, 0 chunks, then an entry count far above the limit.
        let mut body = vec![0u8, 0u8];
        let count = MAX_ENTRIES as u64 + 1;
        let mut n = count;
        while n >= 0x80 {
            body.push((n as u8) | 0x80);
            n >>= 7;
        }
        body.push(n as u8);
        // Each entry: parent 0, empty name, HardLink(0): 4 bytes that would cost ~100 in memory.
        for _ in 0..count {
            body.extend_from_slice(&[0, 0, 7, 0]);
        }
        let frame = zstd::bulk::compress(&body, 1).unwrap();
        let mut bytes = INDEX_MAGIC.to_vec();
        bytes.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&frame);
        // postcard reports serde errors without their text; the bound is what fails here.
        let err = Index::decode(&bytes).unwrap_err();
        assert!(matches!(err, IndexError::Decode(_)), "{err}");
    }

    #[test]
    fn missing_parent_is_an_error() {
        let mut t = BTreeMap::new();
        t.insert(
            vec![b"a".to_vec(), b"b".to_vec()],
            TreeNode {
                meta: meta(0o644),
                kind: TreeKind::Fifo,
                link_group: None,
            },
        );
        assert!(build_index(&t, &|_| None).is_err());
    }

    fn arb_name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(1u8..=255, 1..6).prop_filter("no slash or dots", |n| {
            !n.contains(&b'/') && n != b"." && n != b".."
        })
    }

    proptest! {
        #[test]
        fn prop_round_trip(names in proptest::collection::vec((arb_name(), arb_name(), 0u8..5, any::<u32>(), any::<i64>()), 0..30)) {
            let c = Digest::of(b"c");
            let pack = Digest::of(b"p");
            let mut t = BTreeMap::new();
            for (d, n, k, id, mt) in names {
                t.insert(vec![d.clone()], TreeNode { meta: Meta::default(), kind: TreeKind::Dir, link_group: None });
                let kind = match k {
                    0 => TreeKind::File { size: 1, chunks: vec![c] },
                    1 => TreeKind::Symlink(n.clone()),
                    2 => TreeKind::BlockDev(id as u64),
                    3 => TreeKind::Dir,
                    _ => TreeKind::Fifo,
                };
                let meta = Meta { mode: id & 0o7777, uid: id, gid: id / 3, mtime: mt, mtime_nsec: id % 1_000_000_000, xattrs: vec![(n.clone(), d.clone())] };
                t.insert(vec![d, n], TreeNode { meta, kind, link_group: if k == 0 { Some(7) } else { None } });
            }
            let idx = build_index(&t, &|_| Some(StoredChunk::alone(pack, 0, 1, 1, true))).unwrap();
            let bytes = idx.encode().unwrap();
            let back = Index::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &idx);
            prop_assert_eq!(back.encode().unwrap(), bytes);
        }

        #[test]
        fn prop_garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Index::decode(&bytes);
            if bytes.len() >= 20 {
                bytes[..8].copy_from_slice(INDEX_MAGIC);
                bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
                let _ = Index::decode(&bytes);
            }
        }
    }
}
