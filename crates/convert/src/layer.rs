//! One layer: decompress, read the tar stream, chunk every regular file, and hand the
//! chunks in groups of consecutive chunks (up to [`MAX_FRAME`] bytes) to a pool of
//! workers (hash, dictionary check, zstd of the group's new chunks as one frame) whose
//! results are written to packs in archive order, so the output is deterministic
//! whatever the thread count.

use crate::tree::{LayerEntry, LayerOp, TreePath};
use crate::ConvertError;
use crossbeam_channel::{bounded, unbounded};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, BufWriter, Read, Seek};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use tessera_format::chunker::StreamChunker;
use tessera_format::digest::HashingWriter;
use tessera_format::index::{Meta, StoredChunk, TreeKind, TreeNode};
use tessera_format::media::LayerCompression;
use tessera_format::pack::{ChunkCompressor, PackWriter, TocEntry, MAX_FRAME};
use tessera_format::Digest;

/// A pack is closed once it holds this many stored bytes.
pub const MAX_PACK_BYTES: u64 = 512 << 20;
/// Groups of chunks (each up to [`MAX_FRAME`] bytes) in flight between the tar reader and
/// the pack writer (bounds memory).
const IN_FLIGHT: usize = 16;

/// What converting one layer produced.
#[derive(Debug, Default)]
pub struct LayerOutput {
    pub entries: Vec<LayerEntry>,
    /// Chunks first stored by this layer.
    pub new_chunks: HashMap<Digest, StoredChunk>,
    /// Packs written (digest, size, path of the staged file).
    pub packs: Vec<(Digest, u64)>,
    pub stats: LayerStats,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct LayerStats {
    /// Uncompressed tar bytes read.
    pub tar_bytes: u64,
    /// Regular-file content bytes chunked.
    pub file_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
    pub new_stored_bytes: u64,
}

/// Counts bytes read (uncompressed tar bytes).
struct Counting<R> {
    inner: R,
    n: u64,
}
impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

fn drain(r: &mut dyn Read) -> io::Result<()> {
    io::copy(r, &mut io::sink()).map(|_| ())
}

/// Normalize a tar path into components. An absolute name (`/etc/passwd`) is relative to
/// the root, as Docker, containerd and umoci take it; `..` is refused.
pub fn normalize(raw: &[u8]) -> Result<TreePath, ConvertError> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(ConvertError::BadLayer(format!(
                    "path {:?} contains '..'",
                    String::from_utf8_lossy(raw)
                )))
            }
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// Consecutive chunks of the layer (sequence numbers `seq..seq + chunks.len()`), at most
/// [`MAX_FRAME`] bytes together: the new ones among them become one frame.
struct Work {
    seq: u64,
    chunks: Vec<Vec<u8>>,
}
struct DoneChunk {
    id: Digest,
    len: u32,
    /// In the group's frame: neither stored already nor repeated within the group.
    new: bool,
}
struct Done {
    seq: u64,
    chunks: Vec<DoneChunk>,
    /// The new chunks concatenated (kept in case the writer must drop one it has
    /// written meanwhile) and their stored frame.
    plain: Vec<u8>,
    frame: Option<(Vec<u8>, bool)>,
}

/// Chunks being grouped by the tar reader.
#[derive(Default)]
struct Group {
    seq: u64,
    chunks: Vec<Vec<u8>>,
    bytes: usize,
}

impl Group {
    /// Hand the group to the workers (after taking a permit) and start the next at `next`.
    fn send(
        &mut self,
        work: &crossbeam_channel::Sender<Work>,
        permits: &crossbeam_channel::Sender<()>,
        next: u64,
    ) -> Result<(), ConvertError> {
        if !self.chunks.is_empty() {
            let stopped = |_| ConvertError::Internal("pipeline stopped".into());
            permits.send(()).map_err(stopped)?;
            work.send(Work {
                seq: self.seq,
                chunks: std::mem::take(&mut self.chunks),
            })
            .map_err(|_| ConvertError::Internal("pipeline stopped".into()))?;
        }
        self.seq = next;
        self.bytes = 0;
        Ok(())
    }
}

/// Parse PAX time "secs[.frac]" into (secs, nanos).
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let negative = secs.starts_with('-');
    let secs: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let mut nanos: u32 = digits.parse().ok()?;
    if negative && nanos > 0 {
        // "-1.5" means 1.5 s before the epoch (the earliest time i64 seconds can say:
        // refused).
        return Some((secs.checked_sub(1)?, 1_000_000_000 - nanos));
    }
    if nanos >= 1_000_000_000 {
        nanos = 0;
    }
    Some((secs, nanos))
}

/// Pending chunk lists of file entries (entry position → chunk sequence numbers).
type Pending = Vec<(usize, Vec<u64>)>;

fn read_tar<R: Read>(
    r: R,
    work: &crossbeam_channel::Sender<Work>,
    permits: &crossbeam_channel::Sender<()>,
    stop: &AtomicBool,
    stats: &mut LayerStats,
) -> Result<(Vec<LayerEntry>, Pending), ConvertError> {
    let mut ar = tar::Archive::new(r);
    let mut entries = Vec::new();
    let mut pending: Pending = Vec::new();
    let mut seq = 0u64;
    let mut group = Group::default();
    let mut chunker = StreamChunker::new();
    let bad = |e: io::Error| ConvertError::BadLayer(format!("reading the layer tar: {e}"));
    for ent in ar.entries().map_err(bad)? {
        let mut ent = ent.map_err(bad)?;
        let et = ent.header().entry_type();
        if et.is_pax_global_extensions()
            || et.is_pax_local_extensions()
            || et.is_gnu_longname()
            || et.is_gnu_longlink()
        {
            continue;
        }
        let raw_path = ent.path_bytes().into_owned();
        let path = normalize(&raw_path)?;
        // Whiteouts.
        if let Some((name, parent)) = path.split_last() {
            if name == b".wh..wh..opq" {
                entries.push(LayerEntry {
                    path: parent.to_vec(),
                    op: LayerOp::Opaque,
                });
                continue;
            }
            if let Some(target) = name.strip_prefix(b".wh.") {
                if target.is_empty() || target == b"." || target == b".." {
                    return Err(ConvertError::BadLayer(format!(
                        "invalid whiteout {:?}",
                        String::from_utf8_lossy(&raw_path)
                    )));
                }
                let mut p = parent.to_vec();
                p.push(target.to_vec());
                entries.push(LayerEntry {
                    path: p,
                    op: LayerOp::Whiteout,
                });
                continue;
            }
        }
        let h = ent.header();
        let mut meta = Meta {
            mode: h.mode().map_err(bad)? & 0o7777,
            uid: u32::try_from(h.uid().map_err(bad)?)
                .map_err(|_| ConvertError::BadLayer("uid out of range".into()))?,
            gid: u32::try_from(h.gid().map_err(bad)?)
                .map_err(|_| ConvertError::BadLayer("gid out of range".into()))?,
            mtime: h.mtime().map_err(bad)? as i64,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        };
        let (dev_major, dev_minor) = (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        );
        let link_name = ent.link_name_bytes().map(|l| l.into_owned());
        if let Some(exts) = ent.pax_extensions().map_err(bad)? {
            for ext in exts {
                let ext = ext.map_err(bad)?;
                let key = ext.key_bytes();
                let val = ext.value_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    meta.xattrs.push((name.to_vec(), val.to_vec()));
                } else if key == b"mtime" {
                    if let Some((s, ns)) = parse_pax_time(val) {
                        meta.mtime = s;
                        meta.mtime_nsec = ns;
                    }
                } else if key == b"uid" || key == b"gid" {
                    let v: u32 = std::str::from_utf8(val)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| ConvertError::BadLayer("bad PAX uid/gid".into()))?;
                    if key == b"uid" {
                        meta.uid = v;
                    } else {
                        meta.gid = v;
                    }
                }
            }
        }
        // The last record of a repeated key wins, as in tar extractors.
        meta.xattrs.reverse();
        meta.xattrs.sort_by(|a, b| a.0.cmp(&b.0));
        meta.xattrs.dedup_by(|a, b| a.0 == b.0);
        let node = |kind| {
            LayerOp::Node(TreeNode {
                meta: meta.clone(),
                kind,
                link_group: None,
            })
        };
        let op = match et {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut seqs = Vec::new();
                let mut size = 0u64;
                chunker.reset();
                while let Some(c) = chunker.next_chunk(&mut ent).map_err(bad)? {
                    if stop.load(Ordering::Relaxed) {
                        return Err(ConvertError::Internal(
                            "stopped after an earlier error".into(),
                        ));
                    }
                    size += c.data.len() as u64;
                    if group.bytes + c.data.len() > MAX_FRAME {
                        group.send(work, permits, seq)?;
                    }
                    group.bytes += c.data.len();
                    group.chunks.push(c.data);
                    seqs.push(seq);
                    seq += 1;
                }
                stats.file_bytes += size;
                stats.chunks += seqs.len() as u64;
                pending.push((entries.len(), seqs));
                node(TreeKind::File {
                    size,
                    chunks: Vec::new(),
                })
            }
            tar::EntryType::Directory => node(TreeKind::Dir),
            tar::EntryType::Symlink => {
                node(TreeKind::Symlink(link_name.ok_or_else(|| {
                    ConvertError::BadLayer("symlink without target".into())
                })?))
            }
            tar::EntryType::Link => {
                let t = link_name
                    .ok_or_else(|| ConvertError::BadLayer("hardlink without target".into()))?;
                LayerOp::HardLink(normalize(&t)?)
            }
            tar::EntryType::Char => node(TreeKind::CharDev(rustix_makedev(dev_major, dev_minor))),
            tar::EntryType::Block => node(TreeKind::BlockDev(rustix_makedev(dev_major, dev_minor))),
            tar::EntryType::Fifo => node(TreeKind::Fifo),
            other => {
                return Err(ConvertError::BadLayer(format!(
                    "unsupported tar entry type {other:?} at {:?}",
                    String::from_utf8_lossy(&raw_path)
                )));
            }
        };
        entries.push(LayerEntry { path, op });
    }
    group.send(work, permits, seq)?;
    Ok((entries, pending))
}

/// Linux `makedev` (the glibc encoding used by `st_rdev`).
pub fn rustix_makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (major as u64, minor as u64);
    ((ma & 0xffff_f000) << 32)
        | ((ma & 0x0000_0fff) << 8)
        | ((mi & 0xffff_ff00) << 12)
        | (mi & 0x0000_00ff)
}

/// Open the decompressed tar stream, run `f` on it, then read everything left so the
/// blob's digest is checked at end of file.
fn with_tar_stream<T>(
    blob: Box<dyn Read + Send>,
    comp: LayerCompression,
    counter: &mut u64,
    f: impl FnOnce(&mut dyn Read) -> Result<T, ConvertError>,
) -> Result<T, ConvertError> {
    let bad = |e: io::Error| ConvertError::BadLayer(format!("layer data: {e}"));
    let buffered = io::BufReader::with_capacity(1 << 20, blob);
    match comp {
        LayerCompression::None => {
            let mut c = Counting {
                inner: buffered,
                n: 0,
            };
            let out = f(&mut c)?;
            drain(&mut c).map_err(bad)?;
            *counter = c.n;
            Ok(out)
        }
        LayerCompression::Gzip => {
            let mut c = Counting {
                inner: flate2::bufread::MultiGzDecoder::new(buffered),
                n: 0,
            };
            let out = f(&mut c)?;
            drain(&mut c).map_err(bad)?;
            *counter = c.n;
            drain(&mut c.inner.into_inner()).map_err(bad)?;
            Ok(out)
        }
        LayerCompression::Zstd => {
            let d = zstd::stream::read::Decoder::with_buffer(buffered).map_err(bad)?;
            let mut c = Counting { inner: d, n: 0 };
            let out = f(&mut c)?;
            drain(&mut c).map_err(bad)?;
            *counter = c.n;
            drain(&mut c.inner.finish()).map_err(bad)?;
            Ok(out)
        }
    }
}

/// Pack files being written into the staging directory.
struct PackSink<'a> {
    staging: &'a Path,
    current: Option<(
        PackWriter<HashingWriter<BufWriter<tempfile::NamedTempFile>>>,
        u64,
    )>,
    done: Vec<(Digest, u64)>,
    /// chunks of the open pack, located once its digest is known
    open_chunks: Vec<TocEntry>,
    located: HashMap<Digest, StoredChunk>,
}

impl<'a> PackSink<'a> {
    fn new(staging: &'a Path) -> Self {
        PackSink {
            staging,
            current: None,
            done: Vec::new(),
            open_chunks: Vec::new(),
            located: HashMap::new(),
        }
    }

    /// Append one frame holding `chunks` (id, length).
    fn add(
        &mut self,
        chunks: &[(Digest, u32)],
        stored: &[u8],
        raw: bool,
    ) -> Result<(), ConvertError> {
        let io = |e: io::Error| ConvertError::Io {
            context: "writing a pack".into(),
            source: e,
        };
        let full = self.current.as_ref().is_some_and(|(w, _)| {
            (w.len() + chunks.len()) as u64 > tessera_format::pack::MAX_PACK_ENTRIES
        });
        if full {
            self.close()?;
        }
        if self.current.is_none() {
            let f = tempfile::NamedTempFile::new_in(self.staging).map_err(io)?;
            self.current = Some((
                PackWriter::new(HashingWriter::new(BufWriter::with_capacity(1 << 20, f))),
                0,
            ));
        }
        let Some((w, _)) = self.current.as_mut() else {
            return Err(ConvertError::Internal("no open pack".into()));
        };
        let e = w.append_frame(chunks, stored, raw).map_err(io)?;
        self.open_chunks.extend(e);
        if w.stored_bytes() >= MAX_PACK_BYTES {
            self.close()?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), ConvertError> {
        let io = |e: io::Error| ConvertError::Io {
            context: "finishing a pack".into(),
            source: e,
        };
        let Some((w, _)) = self.current.take() else {
            return Ok(());
        };
        let (hw, _) = w.finish().map_err(io)?;
        let (buf, digest, size) = hw.into_parts();
        let tmp = buf.into_inner().map_err(|e| io(e.into_error()))?;
        let file = tmp
            .persist(self.staging.join(digest.hex()))
            .map_err(|e| io(e.error))?;
        // Start writeback now, off the pipeline: when the destination links the pack into
        // place and syncs it (its durability point), little is left to flush.
        std::thread::spawn(move || {
            let _ = file.sync_data();
        });
        for e in self.open_chunks.drain(..) {
            self.located.insert(e.id, StoredChunk::from_toc(digest, &e));
        }
        self.done.push((digest, size));
        Ok(())
    }
}

/// New packs (digest, size) and where each kept chunk now is.
pub type Repacked = (Vec<(Digest, u64)>, HashMap<Digest, StoredChunk>);

/// Rewrite staged packs without the chunks in `drop` (the destination registry already
/// holds them). Frames that keep all their chunks are copied as they are; a frame that
/// loses some is recompressed (at `zstd_level`) with the rest. Returns the new packs
/// (packs left empty disappear) and the new locations of the chunks kept.
pub fn drop_chunks(
    staging: &Path,
    packs: &[(Digest, u64)],
    drop: &HashSet<Digest>,
    zstd_level: i32,
) -> Result<Repacked, ConvertError> {
    let io = |context: &str, e: io::Error| ConvertError::Io {
        context: context.to_string(),
        source: e,
    };
    let mut out_packs = Vec::new();
    let mut located = HashMap::new();
    let mut compressor = None;
    for (p, size) in packs {
        let path = staging.join(p.hex());
        let mut f = std::fs::File::open(&path).map_err(|e| io("reopening a staged pack", e))?;
        let toc = tessera_format::pack::read_toc(&mut f)
            .map_err(|e| ConvertError::Internal(format!("staged pack {p}: {e}")))?;
        if !toc.iter().any(|e| drop.contains(&e.id)) {
            out_packs.push((*p, *size));
            for e in &toc {
                located.insert(e.id, StoredChunk::from_toc(*p, e));
            }
            continue;
        }
        let mut sink = PackSink::new(staging);
        let mut buf = Vec::new();
        for frame in tessera_format::pack::frames(&toc) {
            let keep: Vec<&TocEntry> = frame.iter().filter(|e| !drop.contains(&e.id)).collect();
            if keep.is_empty() {
                continue;
            }
            f.seek(io::SeekFrom::Start(frame[0].offset))
                .map_err(|err| io("reading a staged pack", err))?;
            buf.resize(frame[0].stored_len as usize, 0);
            f.read_exact(&mut buf)
                .map_err(|err| io("reading a staged pack", err))?;
            let ids: Vec<(Digest, u32)> = keep.iter().map(|e| (e.id, e.uncompressed_len)).collect();
            if keep.len() == frame.len() {
                sink.add(&ids, &buf, frame[0].raw)?;
                continue;
            }
            let plain = tessera_format::pack::decode_frame(&buf, &frame[0].frame())
                .map_err(|e| ConvertError::Internal(format!("staged pack {p}: {e}")))?;
            let mut rest = Vec::new();
            for e in &keep {
                rest.extend_from_slice(
                    &plain[e.inner as usize..(e.inner + e.uncompressed_len) as usize],
                );
            }
            let c = match &mut compressor {
                Some(c) => c,
                None => compressor.insert(
                    ChunkCompressor::new(zstd_level)
                        .map_err(|e| io("creating a zstd context", e))?,
                ),
            };
            let (stored, raw) = c
                .compress(&rest)
                .map_err(|e| io("compressing a frame", e))?;
            sink.add(&ids, &stored, raw)?;
        }
        sink.close()?;
        std::fs::remove_file(&path).map_err(|e| io("removing a staged pack", e))?;
        out_packs.extend(sink.done);
        located.extend(sink.located);
    }
    Ok((out_packs, located))
}

/// Write the frame of one group of chunks, without those an earlier group of the layer
/// already wrote (then the rest is recompressed here; rare: the same content twice in a
/// layer, in different groups). Returns the chunks written and the stored bytes.
fn write_group(
    sink: &mut PackSink,
    d: &Done,
    written: &HashMap<Digest, ()>,
    compressor: &mut Option<ChunkCompressor>,
    zstd_level: i32,
) -> Result<(Vec<(Digest, u32)>, u64), ConvertError> {
    let Some((stored, raw)) = &d.frame else {
        return Ok((Vec::new(), 0));
    };
    let members: Vec<(Digest, u32)> = d
        .chunks
        .iter()
        .filter(|c| c.new)
        .map(|c| (c.id, c.len))
        .collect();
    if !members.iter().any(|(id, _)| written.contains_key(id)) {
        sink.add(&members, stored, *raw)?;
        return Ok((members, stored.len() as u64));
    }
    let mut keep = Vec::new();
    let mut rest = Vec::new();
    let mut pos = 0usize;
    for &(id, len) in &members {
        let piece = d
            .plain
            .get(pos..pos + len as usize)
            .ok_or_else(|| ConvertError::Internal("a group's bytes are short".into()))?;
        pos += len as usize;
        if !written.contains_key(&id) {
            keep.push((id, len));
            rest.extend_from_slice(piece);
        }
    }
    if keep.is_empty() {
        return Ok((keep, 0));
    }
    let c =
        match compressor {
            Some(c) => c,
            None => compressor.insert(ChunkCompressor::new(zstd_level).map_err(|e| {
                ConvertError::Io {
                    context: "creating a zstd context".into(),
                    source: e,
                }
            })?),
        };
    let (stored, raw) = c.compress(&rest).map_err(|e| ConvertError::Io {
        context: "compressing a frame".into(),
        source: e,
    })?;
    sink.add(&keep, &stored, raw)?;
    Ok((keep, stored.len() as u64))
}

/// Convert one layer blob. `known` says whether a chunk is already stored (dictionary,
/// earlier layers); such chunks are not compressed nor written again.
pub fn convert_layer(
    blob: Box<dyn Read + Send>,
    comp: LayerCompression,
    known: &(dyn Fn(&Digest) -> bool + Sync),
    staging: &Path,
    threads: usize,
    zstd_level: i32,
) -> Result<LayerOutput, ConvertError> {
    let threads = threads.max(1);
    let (work_tx, work_rx) = bounded::<Work>(threads * 2);
    let (done_tx, done_rx) = unbounded::<Result<Done, ConvertError>>();
    let (permit_tx, permit_rx) = bounded::<()>(IN_FLIGHT);
    let mut stats = LayerStats::default();
    let stop = AtomicBool::new(false);

    std::thread::scope(|s| -> Result<LayerOutput, ConvertError> {
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            s.spawn(move || {
                let mut compressor = match ChunkCompressor::new(zstd_level) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = done_tx.send(Err(ConvertError::Io {
                            context: "creating a zstd context".into(),
                            source: e,
                        }));
                        return;
                    }
                };
                for w in work_rx {
                    // A panic here must not leave the writer waiting for this sequence
                    // number forever: it becomes an error for the whole layer.
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let mut chunks = Vec::with_capacity(w.chunks.len());
                        let mut plain = Vec::new();
                        let mut in_group = HashSet::new();
                        for data in &w.chunks {
                            let id = Digest::of(data);
                            let new = !known(&id) && in_group.insert(id);
                            if new {
                                plain.extend_from_slice(data);
                            }
                            chunks.push(DoneChunk {
                                id,
                                len: data.len() as u32,
                                new,
                            });
                        }
                        drop(w.chunks);
                        let frame = if plain.is_empty() {
                            None
                        } else {
                            Some(compressor.compress(&plain).map_err(|e| ConvertError::Io {
                                context: "compressing a frame".into(),
                                source: e,
                            })?)
                        };
                        Ok(Done {
                            seq: w.seq,
                            chunks,
                            plain,
                            frame,
                        })
                    }))
                    .unwrap_or_else(|_| {
                        Err(ConvertError::Internal(
                            "a compression worker panicked".into(),
                        ))
                    });
                    if done_tx.send(res).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        drop(work_rx);
        let stop_r = &stop;
        let reader = s.spawn(move || {
            let mut tar_bytes = 0u64;
            let mut st = LayerStats::default();
            let r = with_tar_stream(blob, comp, &mut tar_bytes, |r| {
                read_tar(r, &work_tx, &permit_tx, stop_r, &mut st)
            });
            drop(work_tx);
            st.tar_bytes = tar_bytes;
            r.map(|(e, p)| (e, p, st))
        });

        // Writer: results in sequence order.
        let mut sink = PackSink::new(staging);
        let mut own_compressor: Option<ChunkCompressor> = None;
        let mut reorder: BTreeMap<u64, Done> = BTreeMap::new();
        let mut next = 0u64;
        let mut ids: Vec<Digest> = Vec::new();
        let mut seen_new: HashMap<Digest, ()> = HashMap::new();
        let mut failure: Option<ConvertError> = None;
        for res in done_rx.iter() {
            if failure.is_some() {
                // Keep the reader unblocked until it sees the stop flag.
                let _ = permit_rx.try_recv();
                continue;
            }
            let d = match res {
                Ok(d) => d,
                Err(e) => {
                    failure = Some(e);
                    stop.store(true, Ordering::Relaxed);
                    for _ in 0..=reorder.len() {
                        let _ = permit_rx.try_recv();
                    }
                    reorder.clear();
                    continue;
                }
            };
            reorder.insert(d.seq, d);
            while let Some(d) = reorder.remove(&next) {
                next += d.chunks.len() as u64;
                let _ = permit_rx.recv();
                ids.extend(d.chunks.iter().map(|c| c.id));
                let written =
                    write_group(&mut sink, &d, &seen_new, &mut own_compressor, zstd_level);
                match written {
                    Ok((members, stored_len)) => {
                        for (id, len) in members {
                            seen_new.insert(id, ());
                            stats.new_chunks += 1;
                            stats.new_bytes += len as u64;
                        }
                        stats.new_stored_bytes += stored_len;
                    }
                    Err(e) => {
                        failure = Some(e);
                        stop.store(true, Ordering::Relaxed);
                        for _ in 0..reorder.len() {
                            let _ = permit_rx.try_recv();
                        }
                        reorder.clear();
                        break;
                    }
                }
            }
        }
        let joined = reader
            .join()
            .map_err(|_| ConvertError::Internal("layer reader panicked".into()))?;
        if let Some(e) = failure {
            return Err(e);
        }
        let (mut entries, pending, st) = joined?;
        sink.close()?;
        for (pos, seqs) in pending {
            if let LayerOp::Node(TreeNode {
                kind: TreeKind::File { chunks, .. },
                ..
            }) = &mut entries[pos].op
            {
                *chunks = seqs.iter().map(|&s| ids[s as usize]).collect();
            }
        }
        stats.tar_bytes = st.tar_bytes;
        stats.file_bytes = st.file_bytes;
        stats.chunks = st.chunks;
        Ok(LayerOutput {
            entries,
            new_chunks: sink.located,
            packs: sink.done,
            stats,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(
            normalize(b"./a//b/./c").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(normalize(b"./").unwrap(), Vec::<Vec<u8>>::new());
        assert!(normalize(b"a/../../etc").is_err());
        // Absolute names are relative to the root; `..` is refused there too.
        assert_eq!(
            normalize(b"/etc/passwd").unwrap(),
            vec![b"etc".to_vec(), b"passwd".to_vec()]
        );
        assert_eq!(normalize(b"//").unwrap(), Vec::<Vec<u8>>::new());
        assert!(normalize(b"/../etc/passwd").is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"-0.5"), Some((-1, 500_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
        // Extremes: no overflow; what i64 seconds cannot hold is refused.
        assert_eq!(parse_pax_time(b"-9223372036854775808"), Some((i64::MIN, 0)));
        assert_eq!(parse_pax_time(b"-9223372036854775808.5"), None);
        assert_eq!(
            parse_pax_time(b"9223372036854775807.999999999"),
            Some((i64::MAX, 999_999_999))
        );
        assert_eq!(parse_pax_time(b"99999999999999999999"), None);
    }

    fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn text(i: usize, len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        let mut j = 0;
        while v.len() < len {
            v.extend_from_slice(format!("file {i} line {j}: some text to compress\n").as_bytes());
            j += 1;
        }
        v.truncate(len);
        v
    }

    fn convert(tar: &[u8], staging: &Path, threads: usize) -> LayerOutput {
        convert_layer(
            Box::new(std::io::Cursor::new(tar.to_vec())),
            LayerCompression::None,
            &|_| false,
            staging,
            threads,
            3,
        )
        .unwrap()
    }

    /// Every chunk of the staged packs, verified, by id.
    fn staged(staging: &Path, packs: &[(Digest, u64)]) -> HashMap<Digest, TocEntry> {
        let mut all = HashMap::new();
        for (p, _) in packs {
            let mut f = std::fs::File::open(staging.join(p.hex())).unwrap();
            for e in tessera_format::pack::verify_pack(&mut f).unwrap() {
                assert!(all.insert(e.id, e).is_none(), "chunk {} stored twice", e.id);
            }
        }
        all
    }

    #[test]
    fn small_chunks_share_frames_and_repeats_are_stored_once() {
        let mut files: Vec<(String, Vec<u8>)> = (0..60)
            .map(|i| (format!("f{i:02}"), text(i, 9_000 + i * 10)))
            .collect();
        // The same content in a later group, and within one group.
        files.push(("again".into(), text(3, 9_030)));
        files.push(("big".into(), text(99, 600_000)));
        files.push(("twin-a".into(), text(77, 5_000)));
        files.push(("twin-b".into(), text(77, 5_000)));
        let tar = tar_of(&files);
        let dir = tempfile::tempdir().unwrap();
        let out = convert(&tar, dir.path(), 2);
        let toc = staged(dir.path(), &out.packs);
        assert_eq!(toc.len(), out.new_chunks.len());
        assert_eq!(out.stats.new_chunks as usize, out.new_chunks.len());
        for (id, loc) in &out.new_chunks {
            assert_eq!(*loc, StoredChunk::from_toc(loc.pack, &toc[id]));
            assert!(loc.frame_len as usize <= MAX_FRAME);
        }
        let frames: HashSet<u64> = toc.values().map(|e| e.offset).collect();
        assert!(
            frames.len() * 4 < toc.len(),
            "{} frames for {} chunks: small chunks are not grouped",
            frames.len(),
            toc.len()
        );
        // Stored bytes count each frame once.
        let stored: u64 = toc
            .values()
            .map(|e| (e.offset, e.stored_len))
            .collect::<HashMap<_, _>>()
            .values()
            .map(|&n| n as u64)
            .sum();
        assert_eq!(out.stats.new_stored_bytes, stored);
        // The same output whatever the thread count.
        let dir1 = tempfile::tempdir().unwrap();
        assert_eq!(convert(&tar, dir1.path(), 1).packs, out.packs);
    }

    #[test]
    fn dropping_some_chunks_of_a_frame_recompresses_the_rest() {
        let files: Vec<(String, Vec<u8>)> = (0..12)
            .map(|i| (format!("f{i:02}"), text(i, 7_000)))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let out = convert(&tar_of(&files), dir.path(), 2);
        let toc = staged(dir.path(), &out.packs);
        let first = toc.values().find(|e| e.inner > 0).unwrap();
        let drop: HashSet<Digest> = [first.id].into_iter().collect();
        let (packs, located) = drop_chunks(dir.path(), &out.packs, &drop, 3).unwrap();
        let after = staged(dir.path(), &packs);
        assert_eq!(after.len(), toc.len() - 1);
        assert!(!after.contains_key(&first.id));
        for (id, loc) in &located {
            assert_eq!(*loc, StoredChunk::from_toc(loc.pack, &after[id]));
        }
        // Dropping every chunk leaves no pack.
        let all: HashSet<Digest> = after.keys().copied().collect();
        let (packs, located) = drop_chunks(dir.path(), &packs, &all, 3).unwrap();
        assert!(packs.is_empty() && located.is_empty());
    }

    #[test]
    fn makedev_matches_linux() {
        assert_eq!(rustix_makedev(1, 3), 0x103);
        assert_eq!(rustix_makedev(8, 1), 0x801);
    }
}
