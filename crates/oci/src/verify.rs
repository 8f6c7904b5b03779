//! A reader that verifies digest and size when it reaches end of file.

use std::io::{self, Read};
use tessera_format::digest::Hasher;
use tessera_format::Digest;

/// Wraps a reader; returns an `InvalidData` error instead of EOF when the bytes read do
/// not hash to `expected` or are not `size` bytes long. Reading past `size` is an error too.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    expected: Digest,
    size: u64,
    read: u64,
    what: String,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest, size: u64, what: impl Into<String>) -> Self {
        VerifyingReader {
            inner,
            hasher: Some(Hasher::new()),
            expected,
            size,
            read: 0,
            what: what.into(),
        }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(h) = self.hasher.as_mut() else {
            return Ok(0);
        };
        let n = self.inner.read(buf)?;
        if n == 0 {
            if self.read != self.size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is truncated: {} of {} bytes",
                        self.what, self.read, self.size
                    ),
                ));
            }
            let got = self.hasher.take().map(|h| h.finish());
            if got != Some(self.expected) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: digest mismatch (expected {}, got {}): corrupt data",
                        self.what,
                        self.expected,
                        got.map(|d| d.to_string()).unwrap_or_default()
                    ),
                ));
            }
            return Ok(0);
        }
        h.update(&buf[..n]);
        self.read += n as u64;
        if self.read > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is longer than its descriptor's {} bytes",
                    self.what, self.size
                ),
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
