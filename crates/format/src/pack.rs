//! Packs: frames of compressed chunks back to back, then a table of contents, then a
//! footer.
//!
//! ```text
//! frame 0 | frame 1 | ... | frame m-1 | TOC (n entries) | footer (40 bytes)
//! v2 TOC entry (64 bytes): chunk id [32] | frame offset u64 | frame stored_len u32 |
//!                          frame_len u32 | inner u32 | len u32 | flags u8 | 0 [7]
//! v1 TOC entry (56 bytes): chunk id [32] | offset u64 | stored_len u32 | len u32 | flags u8 | 0 [7]
//! footer: toc_offset u64 | entry_count u64 | toc_len u64 | version u32 | 0 u32 | "TSRPACK\0"
//! ```
//! All integers little-endian. A frame is one zstd frame (flags = 0) or raw bytes
//! (flags = 1, used when compression does not pay). In version 2 a frame holds one or
//! more consecutive chunks (`frame_len` bytes once decoded, each chunk at `inner`); in
//! version 1 exactly one. Frames are contiguous from offset 0 to `toc_offset`; TOC
//! entries are in (offset, inner) order. A reader needs only the pack size and two Range
//! requests (footer, TOC) to locate every chunk, and the chunk id verifies each chunk's
//! content after its frame is decoded.

use crate::chunker::MAX_CHUNK;
use crate::Digest;
use std::io::{self, Read, Write};

pub const FOOTER_LEN: usize = 40;
/// Length of a version 1 TOC entry.
pub const TOC_ENTRY_LEN_V1: usize = 56;
/// Length of a version 2 TOC entry.
pub const TOC_ENTRY_LEN: usize = 64;
pub const PACK_MAGIC: &[u8; 8] = b"TSRPACK\0";
/// The pack version this crate writes.
pub const PACK_VERSION: u32 = 2;
/// A pack holds at most this many chunks (bounds the TOC a reader must allocate).
pub const MAX_PACK_ENTRIES: u64 = 1 << 24;
/// A frame decodes to at most this many bytes (the writer groups consecutive chunks up
/// to this size; a chunk is never larger).
pub const MAX_FRAME: usize = MAX_CHUNK;
/// zstd level used for chunks unless configured otherwise.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Flag: the frame holds the raw chunk bytes.
pub const FLAG_RAW: u8 = 1;

/// Why a pack (or a chunk read from one) was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("pack is {0} bytes, too small to hold a footer: truncated or not a tessera pack")]
    TooSmall(u64),
    #[error("pack footer has a bad magic number: not a tessera pack, or truncated")]
    BadMagic,
    #[error("pack format version {0} is not supported (this build reads versions 1 and {PACK_VERSION}); upgrade tessera")]
    Version(u32),
    #[error("pack table of contents is inconsistent: {0}")]
    BadToc(String),
    #[error("chunk {id} in pack is corrupt: {why}")]
    CorruptChunk { id: Digest, why: String },
    #[error("I/O error reading pack: {0}")]
    Io(#[from] io::Error),
}

/// The fixed-size trailer of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub toc_offset: u64,
    pub entry_count: u64,
    /// 1 or 2.
    pub version: u32,
}

impl Footer {
    /// Length of one TOC entry in this pack's version.
    pub fn entry_len(&self) -> usize {
        if self.version == 1 {
            TOC_ENTRY_LEN_V1
        } else {
            TOC_ENTRY_LEN
        }
    }

    pub fn toc_len(&self) -> u64 {
        self.entry_count * self.entry_len() as u64
    }

    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&self.toc_offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.entry_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.toc_len().to_le_bytes());
        b[24..28].copy_from_slice(&self.version.to_le_bytes());
        b[32..40].copy_from_slice(PACK_MAGIC);
        b
    }

    /// Parse and check a footer against the total pack size.
    pub fn decode(b: &[u8], pack_size: u64) -> Result<Footer, PackError> {
        if pack_size < FOOTER_LEN as u64 || b.len() != FOOTER_LEN {
            return Err(PackError::TooSmall(pack_size));
        }
        if &b[32..40] != PACK_MAGIC {
            return Err(PackError::BadMagic);
        }
        let version = u32::from_le_bytes(le4(&b[24..28]));
        if version != 1 && version != 2 {
            return Err(PackError::Version(version));
        }
        let toc_offset = u64::from_le_bytes(le8(&b[0..8]));
        let entry_count = u64::from_le_bytes(le8(&b[8..16]));
        let toc_len = u64::from_le_bytes(le8(&b[16..24]));
        if b[28..32] != [0; 4] {
            return Err(PackError::BadToc(
                "reserved footer bytes are not zero".into(),
            ));
        }
        if entry_count > MAX_PACK_ENTRIES {
            return Err(PackError::BadToc(format!(
                "{entry_count} entries is more than the limit"
            )));
        }
        let f = Footer {
            toc_offset,
            entry_count,
            version,
        };
        if toc_len != f.toc_len() {
            return Err(PackError::BadToc(
                "TOC length does not match the entry count".into(),
            ));
        }
        let end = toc_offset
            .checked_add(toc_len)
            .and_then(|x| x.checked_add(FOOTER_LEN as u64))
            .ok_or_else(|| PackError::BadToc("TOC offset overflows".into()))?;
        if end != pack_size {
            return Err(PackError::BadToc(format!(
                "TOC ends at {end} but the pack is {pack_size} bytes (truncated or padded)"
            )));
        }
        Ok(f)
    }
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    a
}
fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    a
}

/// Where one chunk lives inside a pack: the frame that holds it (`offset`,
/// `stored_len`, `frame_len`, `raw`) and its place in the decoded frame (`inner`,
/// `uncompressed_len`). A version 1 chunk is alone in its frame (`inner` 0,
/// `frame_len` = `uncompressed_len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TocEntry {
    pub id: Digest,
    pub offset: u64,
    pub stored_len: u32,
    pub frame_len: u32,
    pub inner: u32,
    pub uncompressed_len: u32,
    pub raw: bool,
}

impl TocEntry {
    /// The version 2 encoding.
    pub fn encode(&self) -> [u8; TOC_ENTRY_LEN] {
        let mut b = [0u8; TOC_ENTRY_LEN];
        b[0..32].copy_from_slice(&self.id.0);
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..44].copy_from_slice(&self.stored_len.to_le_bytes());
        b[44..48].copy_from_slice(&self.frame_len.to_le_bytes());
        b[48..52].copy_from_slice(&self.inner.to_le_bytes());
        b[52..56].copy_from_slice(&self.uncompressed_len.to_le_bytes());
        b[56] = if self.raw { FLAG_RAW } else { 0 };
        b
    }

    fn decode(b: &[u8], version: u32) -> Result<TocEntry, PackError> {
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[0..32]);
        let offset = u64::from_le_bytes(le8(&b[32..40]));
        let stored_len = u32::from_le_bytes(le4(&b[40..44]));
        let (frame_len, inner, len, flags, reserved) = if version == 1 {
            let len = u32::from_le_bytes(le4(&b[44..48]));
            (len, 0, len, b[48], &b[49..56])
        } else {
            (
                u32::from_le_bytes(le4(&b[44..48])),
                u32::from_le_bytes(le4(&b[48..52])),
                u32::from_le_bytes(le4(&b[52..56])),
                b[56],
                &b[57..64],
            )
        };
        if flags & !FLAG_RAW != 0 || reserved.iter().any(|&x| x != 0) {
            return Err(PackError::BadToc("unknown flags in a TOC entry".into()));
        }
        Ok(TocEntry {
            id: Digest(id),
            offset,
            stored_len,
            frame_len,
            inner,
            uncompressed_len: len,
            raw: flags & FLAG_RAW != 0,
        })
    }

    /// The frame that holds this chunk.
    pub fn frame(&self) -> Frame {
        Frame {
            stored_len: self.stored_len,
            frame_len: self.frame_len,
            raw: self.raw,
        }
    }
}

/// How a frame is stored: its length in the pack, its length decoded, raw or zstd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Frame {
    pub stored_len: u32,
    pub frame_len: u32,
    pub raw: bool,
}

/// Check the shape of one frame.
pub fn check_frame(f: &Frame) -> Result<(), String> {
    if f.frame_len == 0 || f.frame_len as usize > MAX_FRAME {
        return Err(format!(
            "frame length {} is outside 1..={MAX_FRAME}",
            f.frame_len
        ));
    }
    if f.raw && f.stored_len != f.frame_len {
        return Err("raw frame whose stored length differs from its length".into());
    }
    if !f.raw && (f.stored_len == 0 || f.stored_len >= f.frame_len) {
        return Err("compressed frame that is not smaller than its content".into());
    }
    Ok(())
}

/// Check the shape of one chunk location (shared by the TOC and the index decoder): its
/// frame, and the chunk inside the decoded frame.
pub fn check_location(f: &Frame, inner: u32, len: u32) -> Result<(), String> {
    check_frame(f)?;
    if len == 0 || len as usize > MAX_CHUNK {
        return Err(format!("chunk length {len} is outside 1..={MAX_CHUNK}"));
    }
    if u64::from(inner) + u64::from(len) > u64::from(f.frame_len) {
        return Err(format!(
            "chunk at {inner}+{len} does not fit in its frame of {} bytes",
            f.frame_len
        ));
    }
    Ok(())
}

/// Parse a TOC (the bytes between `toc_offset` and the footer) and check that the frames
/// tile `0..toc_offset` exactly and that the chunks of each frame tile the frame.
pub fn decode_toc(toc: &[u8], footer: &Footer) -> Result<Vec<TocEntry>, PackError> {
    if toc.len() as u64 != footer.toc_len() {
        return Err(PackError::BadToc("TOC has the wrong length".into()));
    }
    let mut out: Vec<TocEntry> = Vec::with_capacity(footer.entry_count as usize);
    // End of the previous frame, and where the next chunk of the current frame starts.
    let mut next = 0u64;
    let mut inner_next = 0u32;
    for b in toc.chunks_exact(footer.entry_len()) {
        let e = TocEntry::decode(b, footer.version)?;
        check_location(&e.frame(), e.inner, e.uncompressed_len).map_err(PackError::BadToc)?;
        let continues = match out.last() {
            Some(p) => p.offset == e.offset && inner_next < p.frame_len,
            None => false,
        };
        if continues {
            let p = out[out.len() - 1];
            if e.frame() != p.frame() || e.inner != inner_next {
                return Err(PackError::BadToc(format!(
                    "chunk {} does not follow the previous chunk of its frame",
                    e.id
                )));
            }
        } else {
            if inner_next != out.last().map_or(0, |p| p.frame_len) {
                return Err(PackError::BadToc(
                    "the chunks of a frame do not fill it".into(),
                ));
            }
            if e.offset != next || e.inner != 0 {
                return Err(PackError::BadToc(format!(
                    "chunk {} starts at {}+{} but the previous frame ends at {next}",
                    e.id, e.offset, e.inner
                )));
            }
            next += e.stored_len as u64;
            inner_next = 0;
        }
        inner_next += e.uncompressed_len;
        out.push(e);
    }
    if inner_next != out.last().map_or(0, |p| p.frame_len) {
        return Err(PackError::BadToc(
            "the chunks of the last frame do not fill it".into(),
        ));
    }
    if next != footer.toc_offset {
        return Err(PackError::BadToc(format!(
            "frames end at {next} but the TOC starts at {}",
            footer.toc_offset
        )));
    }
    Ok(out)
}

/// Compress one chunk (or the concatenated chunks of a frame); returns the stored bytes
/// and whether they are raw.
pub fn compress_chunk(data: &[u8], level: i32) -> io::Result<(Vec<u8>, bool)> {
    ChunkCompressor::new(level)?.compress(data)
}

/// A reusable zstd context for compressing many frames (one per thread): creating a
/// context per frame costs more than compressing it at low levels.
pub struct ChunkCompressor {
    inner: zstd::bulk::Compressor<'static>,
}

impl ChunkCompressor {
    pub fn new(level: i32) -> io::Result<Self> {
        Ok(ChunkCompressor {
            inner: zstd::bulk::Compressor::new(level)?,
        })
    }

    /// The stored bytes of `data` and whether they are raw (compression did not pay).
    /// The output is identical to a fresh context's.
    pub fn compress(&mut self, data: &[u8]) -> io::Result<(Vec<u8>, bool)> {
        let c = self.inner.compress(data)?;
        if c.len() >= data.len() {
            Ok((data.to_vec(), true))
        } else {
            Ok((c, false))
        }
    }
}

/// Decode one stored frame: exactly `frame_len` bytes or an error (the output is bounded
/// by `frame_len`, so a frame that claims more fails without a large allocation).
pub fn decode_frame(stored: &[u8], f: &Frame) -> Result<Vec<u8>, String> {
    if stored.len() != f.stored_len as usize {
        return Err(format!(
            "{} stored bytes, expected {}",
            stored.len(),
            f.stored_len
        ));
    }
    check_frame(f)?;
    if f.raw {
        return Ok(stored.to_vec());
    }
    let d =
        zstd::bulk::decompress(stored, f.frame_len as usize).map_err(|e| format!("zstd: {e}"))?;
    if d.len() != f.frame_len as usize {
        return Err(format!(
            "{} bytes after decompression, expected {}",
            d.len(),
            f.frame_len
        ));
    }
    Ok(d)
}

/// The chunk at `inner..inner+len` of a decoded frame, verified against its id.
pub fn chunk_in_frame(frame: &[u8], id: &Digest, inner: u32, len: u32) -> Result<Vec<u8>, String> {
    let data = frame
        .get(inner as usize..inner as usize + len as usize)
        .ok_or_else(|| format!("{inner}+{len} is past the frame's {} bytes", frame.len()))?;
    let got = Digest::of(data);
    if got != *id {
        return Err(format!("content hashes to {got}"));
    }
    Ok(data.to_vec())
}

/// Decode the frame `stored` that holds chunk `e` and return the chunk, verified.
pub fn decode_chunk(stored: &[u8], e: &TocEntry) -> Result<Vec<u8>, PackError> {
    let corrupt = |why: String| PackError::CorruptChunk { id: e.id, why };
    check_location(&e.frame(), e.inner, e.uncompressed_len).map_err(corrupt)?;
    let frame = decode_frame(stored, &e.frame()).map_err(corrupt)?;
    chunk_in_frame(&frame, &e.id, e.inner, e.uncompressed_len).map_err(corrupt)
}

/// Streams frames into a (version 2) pack. Call [`PackWriter::finish`] to write the
/// TOC and footer.
pub struct PackWriter<W: Write> {
    out: W,
    entries: Vec<TocEntry>,
    offset: u64,
    uncompressed: u64,
}

impl<W: Write> PackWriter<W> {
    pub fn new(out: W) -> Self {
        PackWriter {
            out,
            entries: Vec::new(),
            offset: 0,
            uncompressed: 0,
        }
    }

    /// Append one stored frame holding one chunk. Returns its TOC entry.
    pub fn append(
        &mut self,
        id: Digest,
        uncompressed_len: u32,
        stored: &[u8],
        raw: bool,
    ) -> io::Result<TocEntry> {
        let mut v = self.append_frame(&[(id, uncompressed_len)], stored, raw)?;
        v.pop()
            .ok_or_else(|| io::Error::other("a frame without chunks"))
    }

    /// Append one stored frame holding `chunks` (id, length) in order; `stored` decodes
    /// to their concatenation. Returns their TOC entries.
    pub fn append_frame(
        &mut self,
        chunks: &[(Digest, u32)],
        stored: &[u8],
        raw: bool,
    ) -> io::Result<Vec<TocEntry>> {
        let frame_len: u64 = chunks.iter().map(|c| u64::from(c.1)).sum();
        let frame = Frame {
            stored_len: u32::try_from(stored.len()).map_err(io::Error::other)?,
            frame_len: u32::try_from(frame_len).map_err(io::Error::other)?,
            raw,
        };
        let mut out = Vec::with_capacity(chunks.len());
        let mut inner = 0u32;
        for &(id, len) in chunks {
            check_location(&frame, inner, len).map_err(io::Error::other)?;
            out.push(TocEntry {
                id,
                offset: self.offset,
                stored_len: frame.stored_len,
                frame_len: frame.frame_len,
                inner,
                uncompressed_len: len,
                raw,
            });
            inner += len;
        }
        if out.is_empty() {
            return Err(io::Error::other("a frame without chunks"));
        }
        self.out.write_all(stored)?;
        self.offset += stored.len() as u64;
        self.uncompressed += frame_len;
        self.entries.extend_from_slice(&out);
        Ok(out)
    }

    /// Chunks written so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Bytes of frames written so far.
    pub fn stored_bytes(&self) -> u64 {
        self.offset
    }
    pub fn uncompressed_bytes(&self) -> u64 {
        self.uncompressed
    }

    /// Write TOC and footer; returns the writer and the entries.
    pub fn finish(mut self) -> io::Result<(W, Vec<TocEntry>)> {
        for e in &self.entries {
            self.out.write_all(&e.encode())?;
        }
        let f = Footer {
            toc_offset: self.offset,
            entry_count: self.entries.len() as u64,
            version: PACK_VERSION,
        };
        self.out.write_all(&f.encode())?;
        self.out.flush()?;
        Ok((self.out, self.entries))
    }
}

/// Read the footer and TOC of a whole pack held in a seekable reader.
pub fn read_toc<R: Read + io::Seek>(r: &mut R) -> Result<Vec<TocEntry>, PackError> {
    let size = r.seek(io::SeekFrom::End(0))?;
    if size < FOOTER_LEN as u64 {
        return Err(PackError::TooSmall(size));
    }
    r.seek(io::SeekFrom::Start(size - FOOTER_LEN as u64))?;
    let mut fb = [0u8; FOOTER_LEN];
    r.read_exact(&mut fb)?;
    let footer = Footer::decode(&fb, size)?;
    r.seek(io::SeekFrom::Start(footer.toc_offset))?;
    let mut toc = vec![0u8; footer.toc_len() as usize];
    r.read_exact(&mut toc)?;
    decode_toc(&toc, &footer)
}

/// The entries of a (decoded, valid) TOC grouped by frame: runs of entries that share
/// a frame offset.
pub fn frames(entries: &[TocEntry]) -> impl Iterator<Item = &[TocEntry]> {
    entries.chunk_by(|a, b| a.offset == b.offset)
}

/// Check every chunk of one frame against its decoded bytes.
fn verify_frame(stored: &[u8], chunks: &[TocEntry]) -> Result<(), PackError> {
    let Some(first) = chunks.first() else {
        return Ok(());
    };
    let frame = decode_frame(stored, &first.frame())
        .map_err(|why| PackError::CorruptChunk { id: first.id, why })?;
    for e in chunks {
        chunk_in_frame(&frame, &e.id, e.inner, e.uncompressed_len)
            .map_err(|why| PackError::CorruptChunk { id: e.id, why })?;
    }
    Ok(())
}

/// Parse a whole pack held in memory: TOC entries, each frame decoded and each chunk
/// verified.
pub fn verify_pack_bytes(pack: &[u8]) -> Result<Vec<TocEntry>, PackError> {
    let entries = read_toc(&mut io::Cursor::new(pack))?;
    for f in frames(&entries) {
        let start = f[0].offset as usize;
        verify_frame(&pack[start..start + f[0].stored_len as usize], f)?;
    }
    Ok(entries)
}

/// Verify a whole pack read sequentially from a seekable reader (a file): every chunk
/// decompresses and hashes to its id. Memory is bounded by one frame.
pub fn verify_pack<R: Read + io::Seek>(r: &mut R) -> Result<Vec<TocEntry>, PackError> {
    let entries = read_toc(r)?;
    r.seek(io::SeekFrom::Start(0))?;
    let mut buf = Vec::new();
    for f in frames(&entries) {
        buf.resize(f[0].stored_len as usize, 0);
        r.read_exact(&mut buf)?;
        verify_frame(&buf, f)?;
    }
    Ok(entries)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(chunks: &[Vec<u8>]) -> (Vec<u8>, Vec<TocEntry>) {
        let mut w = PackWriter::new(Vec::new());
        for c in chunks {
            let (stored, raw) = compress_chunk(c, 3).unwrap();
            w.append(Digest::of(c), c.len() as u32, &stored, raw)
                .unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_and_raw_fallback() {
        let compressible = vec![7u8; 50_000];
        let incompressible = crate::chunker::tests::pseudo_random(40_000, 3);
        let (pack, entries) = build(&[compressible.clone(), incompressible.clone()]);
        assert!(!entries[0].raw);
        assert!(entries[1].raw);
        let got = verify_pack_bytes(&pack).unwrap();
        assert_eq!(got, entries);
        let e = &entries[1];
        let data = decode_chunk(
            &pack[e.offset as usize..(e.offset + e.stored_len as u64) as usize],
            e,
        )
        .unwrap();
        assert_eq!(data, incompressible);
    }

    #[test]
    fn reused_context_gives_identical_frames() {
        let mut c = ChunkCompressor::new(3).unwrap();
        for seed in 0..5u64 {
            let mut data = crate::chunker::tests::pseudo_random(70_000, seed);
            data[..30_000].fill(b'a');
            assert_eq!(
                c.compress(&data).unwrap(),
                zstd::bulk::compress(&data, 3).map(|v| (v, false)).unwrap()
            );
        }
    }

    #[test]
    fn empty_pack() {
        let (pack, entries) = build(&[]);
        assert!(entries.is_empty());
        assert_eq!(pack.len(), FOOTER_LEN);
        assert!(verify_pack_bytes(&pack).unwrap().is_empty());
    }

    #[test]
    fn truncated_and_corrupt_packs_are_rejected() {
        let (pack, _) = build(&[vec![1u8; 30_000], vec![2u8; 20_000]]);
        for cut in [0, 10, pack.len() - 1, pack.len() - FOOTER_LEN - 1] {
            assert!(verify_pack_bytes(&pack[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = pack.clone();
        bad[3] ^= 0xff;
        assert!(matches!(
            verify_pack_bytes(&bad),
            Err(PackError::CorruptChunk { .. })
        ));
        let mut bad = pack.clone();
        let n = bad.len();
        bad[n - 1] = b'X';
        assert!(matches!(verify_pack_bytes(&bad), Err(PackError::BadMagic)));
    }

    fn build_frames(frames: &[Vec<Vec<u8>>]) -> (Vec<u8>, Vec<TocEntry>) {
        let mut w = PackWriter::new(Vec::new());
        for f in frames {
            let ids: Vec<(Digest, u32)> =
                f.iter().map(|c| (Digest::of(c), c.len() as u32)).collect();
            let (stored, raw) = compress_chunk(&f.concat(), 3).unwrap();
            w.append_frame(&ids, &stored, raw).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn frames_of_several_chunks_round_trip() {
        let a = vec![b'a'; 10_000];
        let b = crate::chunker::tests::pseudo_random(3_000, 9);
        let c = vec![b'c'; 70_000];
        let (pack, entries) = build_frames(&[vec![a.clone(), b.clone()], vec![c.clone()]]);
        assert_eq!(verify_pack_bytes(&pack).unwrap(), entries);
        assert_eq!(verify_pack(&mut io::Cursor::new(&pack)).unwrap(), entries);
        assert_eq!(entries[1].offset, 0);
        assert_eq!(entries[1].inner, 10_000);
        assert_eq!(entries[1].frame_len, 13_000);
        assert_eq!(entries[2].offset, u64::from(entries[0].stored_len));
        for (e, want) in entries.iter().zip([&a, &b, &c]) {
            let s = &pack[e.offset as usize..(e.offset + e.stored_len as u64) as usize];
            assert_eq!(&decode_chunk(s, e).unwrap(), want);
        }
        assert_eq!(frames(&entries).count(), 2);
    }

    /// Rewrite TOC entry `i` of a version 2 pack with `f`.
    fn patch_entry(pack: &mut [u8], i: usize, f: impl Fn(&mut TocEntry)) {
        let n = pack.len();
        let footer = Footer::decode(&pack[n - FOOTER_LEN..], n as u64).unwrap();
        let at = footer.toc_offset as usize + i * TOC_ENTRY_LEN;
        let mut e = TocEntry::decode(&pack[at..at + TOC_ENTRY_LEN], 2).unwrap();
        f(&mut e);
        pack[at..at + TOC_ENTRY_LEN].copy_from_slice(&e.encode());
    }

    #[test]
    fn frames_whose_chunks_do_not_tile_them_are_rejected() {
        let (pack, _) = build_frames(&[
            vec![vec![1u8; 5_000], vec![2u8; 6_000]],
            vec![vec![3u8; 9_000]],
        ]);
        type Patch<'a> = &'a dyn Fn(&mut TocEntry);
        let cases: [(usize, Patch); 5] = [
            (1, &|e| e.inner += 1),
            (1, &|e| e.uncompressed_len -= 1),
            (0, &|e| e.frame_len += 1),
            (1, &|e| e.stored_len += 1),
            (2, &|e| e.inner = 4),
        ];
        for (k, (i, f)) in cases.iter().enumerate() {
            let mut bad = pack.clone();
            patch_entry(&mut bad, *i, f);
            assert!(
                matches!(verify_pack_bytes(&bad), Err(PackError::BadToc(_))),
                "case {k}"
            );
        }
        // A chunk of a frame that hashes to another id.
        let mut bad = pack.clone();
        patch_entry(&mut bad, 1, |e| e.id = Digest::of(b"other"));
        assert!(matches!(
            verify_pack_bytes(&bad),
            Err(PackError::CorruptChunk { .. })
        ));
    }

    /// Appendix B.2 of docs/format.md: a version 1 pack still reads.
    #[test]
    fn golden_v1_pack_reads() {
        let hex = concat!(
            "68656c6c6f0a",
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
            "0000000000000000",
            "06000000",
            "06000000",
            "01",
            "00000000000000",
            "0600000000000000",
            "0100000000000000",
            "3800000000000000",
            "01000000",
            "00000000",
            "5453525041434b00"
        );
        let pack = unhex(hex);
        assert_eq!(
            Digest::of(&pack).to_string(),
            "sha256:2212bc835c2163be869f5492a692bbdae174d02d64fb09bfc93a711916c1fdc0"
        );
        let e = verify_pack_bytes(&pack).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].inner, e[0].frame_len, e[0].uncompressed_len, e[0].raw),
            (0, 6, 6, true)
        );
    }

    /// Appendix B.3 of docs/format.md: a version 2 pack, byte for byte.
    #[test]
    fn golden_v2_pack() {
        let (pack, _) = build_frames(&[vec![b"hello\n".to_vec(), b"world\n".to_vec()]]);
        let hex = concat!(
            "68656c6c6f0a776f726c640a",
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
            "0000000000000000",
            "0c000000",
            "0c000000",
            "00000000",
            "06000000",
            "01",
            "00000000000000",
            "e258d248fda94c63753607f7c4494ee0fcbe92f1a76bfdac795c9d84101eb317",
            "0000000000000000",
            "0c000000",
            "0c000000",
            "06000000",
            "06000000",
            "01",
            "00000000000000",
            "0c00000000000000",
            "0200000000000000",
            "8000000000000000",
            "02000000",
            "00000000",
            "5453525041434b00"
        );
        assert_eq!(pack, unhex(hex));
        assert_eq!(Digest::of(&pack).to_string(), GOLDEN_V2_PACK);
    }

    pub(crate) const GOLDEN_V2_PACK: &str =
        "sha256:3365fa0abe9acdfae9ad17096a5be07c11153e6ea36dc54a63357a4dc669f39b";

    pub(crate) fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    proptest! {
        #[test]
        fn any_chunks_round_trip(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..3000), 0..8)) {
            let (pack, entries) = build(&chunks);
            let got = verify_pack_bytes(&pack).unwrap();
            prop_assert_eq!(got.len(), chunks.len());
            for (e, c) in entries.iter().zip(&chunks) {
                let s = &pack[e.offset as usize..(e.offset + e.stored_len as u64) as usize];
                prop_assert_eq!(&decode_chunk(s, e).unwrap(), c);
            }
        }

        #[test]
        fn any_frames_round_trip(frames in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..2000), 1..5), 0..6)) {
            let (pack, entries) = build_frames(&frames);
            prop_assert_eq!(verify_pack_bytes(&pack).unwrap(), entries.clone());
            for (e, c) in entries.iter().zip(frames.iter().flatten()) {
                let s = &pack[e.offset as usize..(e.offset + e.stored_len as u64) as usize];
                prop_assert_eq!(&decode_chunk(s, e).unwrap(), c);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = verify_pack_bytes(&bytes);
        }
    }
}
