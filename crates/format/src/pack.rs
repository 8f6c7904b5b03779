//! Packs: compressed chunks back to back, then a table of contents, then a footer.
//!
//! ```text
//! frame 0 | frame 1 | ... | frame n-1 | TOC (n × 56 bytes) | footer (40 bytes)
//! TOC entry: chunk id [32] | offset u64 | stored_len u32 | uncompressed_len u32 | flags u8 | 0 [7]
//! footer:    toc_offset u64 | entry_count u64 | toc_len u64 | version u32 | 0 u32 | "TSRPACK\0"
//! ```
//! All integers little-endian. A frame is one zstd frame (flags = 0) or the raw chunk
//! bytes (flags = 1, used when compression does not pay). Frames are contiguous from
//! offset 0 to `toc_offset`; TOC entries are in offset order. A reader needs only the
//! pack size and two Range requests (footer, TOC) to locate every chunk, and the chunk
//! id verifies each frame's content after decompression.

use crate::chunker::MAX_CHUNK;
use crate::Digest;
use std::io::{self, Read, Write};

pub const FOOTER_LEN: usize = 40;
pub const TOC_ENTRY_LEN: usize = 56;
pub const PACK_MAGIC: &[u8; 8] = b"TSRPACK\0";
pub const PACK_VERSION: u32 = 1;
/// A pack holds at most this many chunks (bounds the TOC a reader must allocate).
pub const MAX_PACK_ENTRIES: u64 = 1 << 24;
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
    #[error("pack format version {0} is not supported (this build reads version {PACK_VERSION}); upgrade tessera")]
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
}

impl Footer {
    pub fn toc_len(&self) -> u64 {
        self.entry_count * TOC_ENTRY_LEN as u64
    }

    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&self.toc_offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.entry_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.toc_len().to_le_bytes());
        b[24..28].copy_from_slice(&PACK_VERSION.to_le_bytes());
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
        if version != PACK_VERSION {
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

/// Where one chunk lives inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TocEntry {
    pub id: Digest,
    pub offset: u64,
    pub stored_len: u32,
    pub uncompressed_len: u32,
    pub raw: bool,
}

impl TocEntry {
    pub fn encode(&self) -> [u8; TOC_ENTRY_LEN] {
        let mut b = [0u8; TOC_ENTRY_LEN];
        b[0..32].copy_from_slice(&self.id.0);
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..44].copy_from_slice(&self.stored_len.to_le_bytes());
        b[44..48].copy_from_slice(&self.uncompressed_len.to_le_bytes());
        b[48] = if self.raw { FLAG_RAW } else { 0 };
        b
    }

    fn decode(b: &[u8]) -> Result<TocEntry, PackError> {
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[0..32]);
        let flags = b[48];
        if flags & !FLAG_RAW != 0 || b[49..56] != [0; 7] {
            return Err(PackError::BadToc("unknown flags in a TOC entry".into()));
        }
        Ok(TocEntry {
            id: Digest(id),
            offset: u64::from_le_bytes(le8(&b[32..40])),
            stored_len: u32::from_le_bytes(le4(&b[40..44])),
            uncompressed_len: u32::from_le_bytes(le4(&b[44..48])),
            raw: flags & FLAG_RAW != 0,
        })
    }
}

/// Check the shape of one chunk location (shared by the TOC and the index decoder).
pub fn check_location(stored_len: u32, uncompressed_len: u32, raw: bool) -> Result<(), String> {
    if uncompressed_len == 0 || uncompressed_len as usize > MAX_CHUNK {
        return Err(format!(
            "chunk length {uncompressed_len} is outside 1..={MAX_CHUNK}"
        ));
    }
    if raw && stored_len != uncompressed_len {
        return Err("raw chunk whose stored length differs from its length".into());
    }
    if !raw && (stored_len == 0 || stored_len >= uncompressed_len) {
        return Err("compressed chunk that is not smaller than its content".into());
    }
    Ok(())
}

/// Parse a TOC (the bytes between `toc_offset` and the footer) and check that the frames
/// tile `0..toc_offset` exactly.
pub fn decode_toc(toc: &[u8], footer: &Footer) -> Result<Vec<TocEntry>, PackError> {
    if toc.len() as u64 != footer.toc_len() {
        return Err(PackError::BadToc("TOC has the wrong length".into()));
    }
    let mut out = Vec::with_capacity(footer.entry_count as usize);
    let mut next = 0u64;
    for b in toc.chunks_exact(TOC_ENTRY_LEN) {
        let e = TocEntry::decode(b)?;
        if e.offset != next {
            return Err(PackError::BadToc(format!(
                "chunk {} starts at {} but the previous frame ends at {next}",
                e.id, e.offset
            )));
        }
        check_location(e.stored_len, e.uncompressed_len, e.raw).map_err(PackError::BadToc)?;
        next += e.stored_len as u64;
        out.push(e);
    }
    if next != footer.toc_offset {
        return Err(PackError::BadToc(format!(
            "frames end at {next} but the TOC starts at {}",
            footer.toc_offset
        )));
    }
    Ok(out)
}

/// Compress one chunk; returns the stored bytes and whether they are raw.
pub fn compress_chunk(data: &[u8], level: i32) -> io::Result<(Vec<u8>, bool)> {
    ChunkCompressor::new(level)?.compress(data)
}

/// A reusable zstd context for compressing many chunks (one per thread): creating a
/// context per 64 KiB chunk costs more than compressing it at low levels.
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

/// Decode one stored frame and verify it against its id and length.
pub fn decode_chunk(stored: &[u8], e: &TocEntry) -> Result<Vec<u8>, PackError> {
    let corrupt = |why: String| PackError::CorruptChunk { id: e.id, why };
    if stored.len() != e.stored_len as usize {
        return Err(corrupt(format!(
            "{} stored bytes, expected {}",
            stored.len(),
            e.stored_len
        )));
    }
    check_location(e.stored_len, e.uncompressed_len, e.raw).map_err(corrupt)?;
    let data = if e.raw {
        stored.to_vec()
    } else {
        // The capacity bounds the allocation: a frame that claims more fails here.
        let d = zstd::bulk::decompress(stored, e.uncompressed_len as usize)
            .map_err(|err| corrupt(format!("zstd: {err}")))?;
        if d.len() != e.uncompressed_len as usize {
            return Err(corrupt(format!(
                "{} bytes after decompression, expected {}",
                d.len(),
                e.uncompressed_len
            )));
        }
        d
    };
    let got = Digest::of(&data);
    if got != e.id {
        return Err(corrupt(format!("content hashes to {got}")));
    }
    Ok(data)
}

/// Streams frames into a pack. Call [`PackWriter::finish`] to write the TOC and footer.
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

    /// Append one stored frame. Returns its TOC entry.
    pub fn append(
        &mut self,
        id: Digest,
        uncompressed_len: u32,
        stored: &[u8],
        raw: bool,
    ) -> io::Result<TocEntry> {
        let e = TocEntry {
            id,
            offset: self.offset,
            stored_len: stored.len() as u32,
            uncompressed_len,
            raw,
        };
        check_location(e.stored_len, e.uncompressed_len, raw).map_err(io::Error::other)?;
        self.out.write_all(stored)?;
        self.offset += stored.len() as u64;
        self.uncompressed += uncompressed_len as u64;
        self.entries.push(e);
        Ok(e)
    }

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

/// Parse a whole pack held in memory: TOC entries, each frame decoded and verified.
pub fn verify_pack_bytes(pack: &[u8]) -> Result<Vec<TocEntry>, PackError> {
    let entries = read_toc(&mut io::Cursor::new(pack))?;
    for e in &entries {
        let start = e.offset as usize;
        decode_chunk(&pack[start..start + e.stored_len as usize], e)?;
    }
    Ok(entries)
}

/// Verify a whole pack read sequentially from a seekable reader (a file): every chunk
/// decompresses and hashes to its id. Memory is bounded by one chunk.
pub fn verify_pack<R: Read + io::Seek>(r: &mut R) -> Result<Vec<TocEntry>, PackError> {
    let entries = read_toc(r)?;
    r.seek(io::SeekFrom::Start(0))?;
    let mut buf = Vec::new();
    for e in &entries {
        buf.resize(e.stored_len as usize, 0);
        r.read_exact(&mut buf)?;
        decode_chunk(&buf, e)?;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
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
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = verify_pack_bytes(&bytes);
        }
    }
}
