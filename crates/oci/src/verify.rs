//! Verification of content against its descriptor (digest and size), one way for every
//! reader of blobs: [`Verifier`] fed piece by piece (the registry's proxy feeds it the
//! async pieces of an upstream download), and [`VerifyingReader`] for blocking readers.

use std::io::{self, Read};
use tessera_format::{DigestHasher, OciDigest};

/// Digest and size checking, fed piece by piece.
pub struct Verifier {
    hasher: Option<DigestHasher>,
    expected: OciDigest,
    size: u64,
    read: u64,
    what: String,
}

impl Verifier {
    pub fn new(expected: impl Into<OciDigest>, size: u64, what: impl Into<String>) -> Self {
        let expected = expected.into();
        Verifier {
            hasher: Some(DigestHasher::new(expected.algorithm())),
            expected,
            size,
            read: 0,
            what: what.into(),
        }
    }

    /// Account for `piece`; an error once more than `size` bytes came.
    pub fn update(&mut self, piece: &[u8]) -> io::Result<()> {
        if let Some(h) = self.hasher.as_mut() {
            h.update(piece);
        }
        self.read += piece.len() as u64;
        if self.read > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is longer than its descriptor's {} bytes",
                    self.what, self.size
                ),
            ));
        }
        Ok(())
    }

    /// At end of input: an error unless exactly `size` bytes hashing to the digest came.
    /// Idempotent: a second call after success succeeds again.
    pub fn finish(&mut self) -> io::Result<()> {
        let Some(h) = self.hasher.take() else {
            return Ok(());
        };
        if self.read != self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is truncated: {} of {} bytes",
                    self.what, self.read, self.size
                ),
            ));
        }
        let got = h.finish();
        if got != self.expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: digest mismatch (expected {}, got {got}): corrupt data",
                    self.what, self.expected
                ),
            ));
        }
        Ok(())
    }
}

/// Wraps a reader; returns an `InvalidData` error instead of EOF when the bytes read do
/// not hash to `expected` or are not `size` bytes long. Reading past `size` is an error too.
pub struct VerifyingReader<R> {
    inner: R,
    v: Verifier,
    done: bool,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(
        inner: R,
        expected: impl Into<OciDigest>,
        size: u64,
        what: impl Into<String>,
    ) -> Self {
        VerifyingReader {
            inner,
            v: Verifier::new(expected, size, what),
            done: false,
        }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.v.finish()?;
            self.done = true;
            return Ok(0);
        }
        self.v.update(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_format::Digest;

    #[test]
    fn accepts_good_rejects_bad() {
        let data = b"hello world".to_vec();
        let d = Digest::of(&data);
        let mut out = Vec::new();
        VerifyingReader::new(&data[..], d, 11, "blob")
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        let err = VerifyingReader::new(&b"hello worle"[..], d, 11, "blob")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("digest mismatch"));
        let err = VerifyingReader::new(&b"hello"[..], d, 11, "blob")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("truncated"));
        let err = VerifyingReader::new(&b"hello world!"[..], d, 11, "blob")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("longer"));
        // sha512 content is verified the same way.
        let d5 = tessera_format::OciDigest::of(tessera_format::Algorithm::Sha512, &data);
        VerifyingReader::new(&data[..], d5.clone(), 11, "blob")
            .read_to_end(&mut Vec::new())
            .unwrap();
        assert!(VerifyingReader::new(&b"hello worle"[..], d5, 11, "blob")
            .read_to_end(&mut Vec::new())
            .is_err());
    }
}
