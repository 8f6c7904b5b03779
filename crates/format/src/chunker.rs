//! Content-defined chunking of one file's content.
//!
//! FastCDC 2020 (the `fastcdc` crate's `v2020` module, normalization level 1, gear seed 0)
//! with min 16 KiB, avg 64 KiB, max 256 KiB. Chunks never span files. The id of a chunk
//! is the sha256 of its uncompressed bytes.

use crate::Digest;
use fastcdc::v2020::{Normalization, StreamCDC};
use std::io::Read;

/// Smallest chunk (except a file's last one).
pub const MIN_CHUNK: usize = 16 * 1024;
/// Target average chunk size.
pub const AVG_CHUNK: usize = 64 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: usize = 256 * 1024;

/// The chunker parameters as written into manifests (`io.tessera.chunker`).
pub fn params_string() -> String {
    format!("fastcdc2020-l1:{MIN_CHUNK}:{AVG_CHUNK}:{MAX_CHUNK}")
}

/// One chunk of a file.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Offset of the chunk within the file.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A reusable streaming chunker: the same cut points as the `fastcdc` crate's
/// `v2020::StreamCDC` (it calls the same `cut_gear` with the same masks and tables), but
/// one 256 KiB window serves every file instead of a fresh allocation per file, which
/// matters for images made of thousands of small files.
pub struct StreamChunker {
    buf: Box<[u8]>,
    len: usize,
    offset: u64,
    eof: bool,
    masks: (u64, u64),
}

impl Default for StreamChunker {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamChunker {
    pub fn new() -> Self {
        StreamChunker {
            buf: vec![0u8; MAX_CHUNK].into_boxed_slice(),
            len: 0,
            offset: 0,
            eof: false,
            masks: fastcdc::v2020::select_masks(AVG_CHUNK, Normalization::Level1),
        }
    }

    /// Start a new file.
    pub fn reset(&mut self) {
        self.len = 0;
        self.offset = 0;
        self.eof = false;
    }

    /// The next chunk of the file read from `r` (pass the same reader until `None`).
    pub fn next_chunk<R: Read + ?Sized>(&mut self, r: &mut R) -> std::io::Result<Option<Chunk>> {
        while !self.eof && self.len < self.buf.len() {
            match r.read(&mut self.buf[self.len..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.len == 0 {
            return Ok(None);
        }
        let (gear, gear_ls) = fastcdc::v2020::get_gear_with_seed(0);
        let (mask_s, mask_l) = self.masks;
        let (_, count) = fastcdc::v2020::cut_gear(
            &self.buf[..self.len],
            MIN_CHUNK,
            AVG_CHUNK,
            MAX_CHUNK,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
            &gear,
            &gear_ls,
        );
        if count == 0 {
            return Ok(None);
        }
        let data = self.buf[..count].to_vec();
        self.buf.copy_within(count..self.len, 0);
        self.len -= count;
        let offset = self.offset;
        self.offset += count as u64;
        Ok(Some(Chunk { offset, data }))
    }
}

/// Iterator over the chunks of one file read from `reader` (the reference form of
/// the chunker, `fastcdc::v2020::StreamCDC`).
pub struct Chunker<R: Read> {
    inner: StreamCDC<R>,
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R) -> Self {
        Chunker {
            inner: StreamCDC::with_level_and_seed(
                reader,
                MIN_CHUNK,
                AVG_CHUNK,
                MAX_CHUNK,
                Normalization::Level1,
                0,
            ),
        }
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = std::io::Result<Chunk>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.inner.next()? {
            Ok(c) => Some(Ok(Chunk {
                offset: c.offset,
                data: c.data,
            })),
            Err(e) => Some(Err(e.into())),
        }
    }
}

/// Chunk boundaries (offset, length, id) of an in-memory buffer. Used by tests and tools.
pub fn chunk_bytes(data: &[u8]) -> Vec<(u64, usize, Digest)> {
    Chunker::new(data)
        .map(|c| {
            // Reading from a slice cannot fail.
            let c = c.unwrap_or_else(|_| unreachable!("slice reads are infallible"));
            (c.offset, c.data.len(), Digest::of(&c.data))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift64*), independent of any crate.
    pub(crate) fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            out.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Golden vector: chunk boundaries of 2 MiB of xorshift data. If this test fails after
    /// a dependency bump, the chunk format changed: do not update the vector, fix the pin.
    #[test]
    fn golden_boundaries() {
        let data = pseudo_random(2 * 1024 * 1024, 0x7e55e7a);
        let got: Vec<(u64, usize)> = chunk_bytes(&data).iter().map(|c| (c.0, c.1)).collect();
        assert_eq!(
            got, GOLDEN_BOUNDARIES,
            "chunk boundaries changed: this breaks the format"
        );
        let ids = chunk_bytes(&data);
        assert_eq!(ids[0].2.to_string(), GOLDEN_FIRST_ID);
    }

    /// Inserting bytes at the start of a file disturbs only the first chunk(s).
    #[test]
    fn insertion_is_local() {
        let data = pseudo_random(4 * 1024 * 1024, 42);
        let mut shifted = b"twenty-seven bytes inserted".to_vec();
        assert_eq!(shifted.len(), 27);
        shifted.extend_from_slice(&data);
        let a: std::collections::HashSet<Digest> =
            chunk_bytes(&data).into_iter().map(|c| c.2).collect();
        let b = chunk_bytes(&shifted);
        let new_bytes: usize = b.iter().filter(|c| !a.contains(&c.2)).map(|c| c.1).sum();
        assert!(new_bytes <= 2 * MAX_CHUNK, "new bytes {new_bytes}");
    }

    /// The reusable chunker cuts exactly where the reference StreamCDC does, across
    /// files of many sizes and with reads that return few bytes at a time.
    #[test]
    fn stream_chunker_matches_reference() {
        struct Trickle<'a>(&'a [u8], usize);
        impl std::io::Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut sc = StreamChunker::new();
        for (len, seed) in [
            (0usize, 1u64),
            (10, 2),
            (70_000, 3),
            (262_144, 4),
            (262_145, 5),
            (3_000_000, 6),
        ] {
            let data = pseudo_random(len, seed);
            let reference: Vec<(u64, Vec<u8>)> = Chunker::new(&data[..])
                .map(|c| c.map(|c| (c.offset, c.data)).unwrap())
                .collect();
            for step in [7usize, 4096, 1 << 20] {
                sc.reset();
                let mut r = Trickle(&data, step);
                let mut got = Vec::new();
                while let Some(c) = sc.next_chunk(&mut r).unwrap() {
                    got.push((c.offset, c.data));
                }
                assert_eq!(got, reference, "len {len} step {step}");
            }
        }
    }

    #[test]
    fn sizes_within_bounds() {
        let data = pseudo_random(3 * 1024 * 1024 + 17, 9);
        let chunks = chunk_bytes(&data);
        let total: usize = chunks.iter().map(|c| c.1).sum();
        assert_eq!(total, data.len());
        for (i, c) in chunks.iter().enumerate() {
            assert!(c.1 <= MAX_CHUNK);
            if i + 1 < chunks.len() {
                assert!(c.1 >= MIN_CHUNK);
            }
        }
        assert!(chunk_bytes(&[]).is_empty());
    }

    const GOLDEN_FIRST_ID: &str =
        "sha256:952edc582284055076f9162aac6a5ab2b7f33ba76098d1ac1e9a110e02306bf6";
    #[rustfmt::skip]
    const GOLDEN_BOUNDARIES: &[(u64, usize)] = &[(0, 80543), (80543, 93886), (174429, 82729), (257158, 42576), (299734, 87999), (387733, 50710), (438443, 78200), (516643, 25485), (542128, 45272), (587400, 40875), (628275, 84444), (712719, 42187), (754906, 96854), (851760, 78480), (930240, 69242), (999482, 89777), (1089259, 103902), (1193161, 54851), (1248012, 42014), (1290026, 71826), (1361852, 103618), (1465470, 111846), (1577316, 148092), (1725408, 119352), (1844760, 72018), (1916778, 24231), (1941009, 69976), (2010985, 77321), (2088306, 8846)];
}
