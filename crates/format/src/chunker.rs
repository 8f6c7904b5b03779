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

/// Iterator over the chunks of one file read from `reader`.
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
