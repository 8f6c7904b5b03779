//! One layer: decompress, read the tar stream, chunk every regular file, and hand the
//! chunks to a pool of workers (hash, dictionary check, zstd) whose results are written
//! to packs in archive order, so the output is deterministic whatever the thread count.

use crate::tree::{LayerEntry, LayerOp, TreePath};
use crate::ConvertError;
use crossbeam_channel::{bounded, unbounded};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufWriter, Read, Seek};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use tessera_format::chunker::StreamChunker;
use tessera_format::digest::HashingWriter;
use tessera_format::index::{Meta, StoredChunk, TreeKind, TreeNode};
use tessera_format::media::LayerCompression;
use tessera_format::pack::{ChunkCompressor, PackWriter};
use tessera_format::Digest;

/// A pack is closed once it holds this many stored bytes.
pub const MAX_PACK_BYTES: u64 = 512 << 20;
/// Chunks in flight between the tar reader and the pack writer (bounds memory).
const IN_FLIGHT: usize = 64;

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

struct Work {
    seq: u64,
    data: Vec<u8>,
}
struct Done {
    seq: u64,
    id: Digest,
    len: u32,
    stored: Option<(Vec<u8>, bool)>,
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
                    permits
                        .send(())
                        .map_err(|_| ConvertError::Internal("pipeline stopped".into()))?;
                    work.send(Work { seq, data: c.data })
                        .map_err(|_| ConvertError::Internal("pipeline stopped".into()))?;
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
    open_chunks: Vec<(Digest, u64, u32, u32, bool)>,
    located: HashMap<Digest, StoredChunk>,
}

impl<'a> PackSink<'a> {
    fn add(&mut self, id: Digest, len: u32, stored: &[u8], raw: bool) -> Result<(), ConvertError> {
        let io = |e: io::Error| ConvertError::Io {
            context: "writing a pack".into(),
            source: e,
        };
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
        let e = w.append(id, len, stored, raw).map_err(io)?;
        self.open_chunks
            .push((id, e.offset, e.stored_len, len, raw));
        if w.stored_bytes() >= MAX_PACK_BYTES
            || w.len() as u64 >= tessera_format::pack::MAX_PACK_ENTRIES
        {
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
        for (id, offset, stored_len, len, raw) in self.open_chunks.drain(..) {
            self.located.insert(
                id,
                StoredChunk {
                    pack: digest,
                    offset,
                    stored_len,
                    len,
                    raw,
                },
            );
        }
        self.done.push((digest, size));
        Ok(())
    }
}

/// New packs (digest, size) and where each kept chunk now is.
pub type Repacked = (Vec<(Digest, u64)>, HashMap<Digest, StoredChunk>);

/// Rewrite staged packs without the chunks in `drop` (the destination registry already
/// holds them). Frames are copied as they are, never recompressed. Returns the new packs
/// (packs left empty disappear) and the new locations of the chunks kept.
pub fn drop_chunks(
    staging: &Path,
    packs: &[(Digest, u64)],
    drop: &std::collections::HashSet<Digest>,
) -> Result<Repacked, ConvertError> {
    let io = |context: &str, e: io::Error| ConvertError::Io {
        context: context.to_string(),
        source: e,
    };
    let mut out_packs = Vec::new();
    let mut located = HashMap::new();
    for (p, size) in packs {
        let path = staging.join(p.hex());
        let mut f = std::fs::File::open(&path).map_err(|e| io("reopening a staged pack", e))?;
        let toc = tessera_format::pack::read_toc(&mut f)
            .map_err(|e| ConvertError::Internal(format!("staged pack {p}: {e}")))?;
        if !toc.iter().any(|e| drop.contains(&e.id)) {
            out_packs.push((*p, *size));
            for e in &toc {
                located.insert(
                    e.id,
                    StoredChunk {
                        pack: *p,
                        offset: e.offset,
                        stored_len: e.stored_len,
                        len: e.uncompressed_len,
                        raw: e.raw,
                    },
                );
            }
            continue;
        }
        let mut sink = PackSink {
            staging,
            current: None,
            done: Vec::new(),
            open_chunks: Vec::new(),
            located: HashMap::new(),
        };
        let mut buf = Vec::new();
        for e in toc.iter().filter(|e| !drop.contains(&e.id)) {
            f.seek(io::SeekFrom::Start(e.offset))
                .map_err(|err| io("reading a staged pack", err))?;
            buf.resize(e.stored_len as usize, 0);
            f.read_exact(&mut buf)
                .map_err(|err| io("reading a staged pack", err))?;
            sink.add(e.id, e.uncompressed_len, &buf, e.raw)?;
        }
        sink.close()?;
        std::fs::remove_file(&path).map_err(|e| io("removing a staged pack", e))?;
        out_packs.extend(sink.done);
        located.extend(sink.located);
    }
    Ok((out_packs, located))
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
                        let id = Digest::of(&w.data);
                        let len = w.data.len() as u32;
                        if known(&id) {
                            Ok(Done {
                                seq: w.seq,
                                id,
                                len,
                                stored: None,
                            })
                        } else {
                            compressor
                                .compress(&w.data)
                                .map(|s| Done {
                                    seq: w.seq,
                                    id,
                                    len,
                                    stored: Some(s),
                                })
                                .map_err(|e| ConvertError::Io {
                                    context: "compressing a chunk".into(),
                                    source: e,
                                })
                        }
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
        let mut sink = PackSink {
            staging,
            current: None,
            done: Vec::new(),
            open_chunks: Vec::new(),
            located: HashMap::new(),
        };
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
                next += 1;
                let _ = permit_rx.recv();
                ids.push(d.id);
                if seen_new.contains_key(&d.id) {
                    continue;
                }
                if let Some((stored, raw)) = &d.stored {
                    if let Err(e) = sink.add(d.id, d.len, stored, *raw) {
                        failure = Some(e);
                        stop.store(true, Ordering::Relaxed);
                        for _ in 0..reorder.len() {
                            let _ = permit_rx.try_recv();
                        }
                        reorder.clear();
                        break;
                    }
                    seen_new.insert(d.id, ());
                    stats.new_chunks += 1;
                    stats.new_bytes += d.len as u64;
                    stats.new_stored_bytes += stored.len() as u64;
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

    #[test]
    fn makedev_matches_linux() {
        assert_eq!(rustix_makedev(1, 3), 0x103);
        assert_eq!(rustix_makedev(8, 1), 0x801);
    }
}
