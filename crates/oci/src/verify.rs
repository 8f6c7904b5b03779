//! Verification of content against its descriptor (digest and size), one way for every
//! reader of blobs: [`VerifyingReader`] for blocking readers, [`VerifyingStream`] for the
//! async byte streams of the registry's proxy.

use bytes::Bytes;
use futures_util::Stream;
use std::io::{self, Read};
use std::pin::Pin;
use std::task::{Context, Poll};
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

/// Wraps a stream of byte pieces; ends with an `InvalidData` error instead of its end
/// when the bytes do not match the descriptor. Pieces pass through as they arrive.
pub struct VerifyingStream<S> {
    inner: S,
    v: Verifier,
    done: bool,
}

impl<S> VerifyingStream<S> {
    pub fn new(
        inner: S,
        expected: impl Into<OciDigest>,
        size: u64,
        what: impl Into<String>,
    ) -> Self {
        VerifyingStream {
            inner,
            v: Verifier::new(expected, size, what),
            done: false,
        }
    }
}

impl<S, E> Stream for VerifyingStream<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<io::Error>,
{
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(piece))) => match this.v.update(&piece) {
                Ok(()) => Poll::Ready(Some(Ok(piece))),
                Err(e) => {
                    this.done = true;
                    Poll::Ready(Some(Err(e)))
                }
            },
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.done = true;
                match this.v.finish() {
                    Ok(()) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e))),
                }
            }
        }
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

    #[test]
    fn streams_are_verified() {
        use futures_util::StreamExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let pieces = |p: &[&'static [u8]]| {
            futures_util::stream::iter(
                p.iter()
                    .map(|b| Ok::<_, io::Error>(Bytes::from_static(b)))
                    .collect::<Vec<_>>(),
            )
        };
        let d = Digest::of(b"hello world");
        let all: Vec<_> = rt.block_on(
            VerifyingStream::new(pieces(&[b"hello ", b"world"]), d, 11, "b").collect::<Vec<_>>(),
        );
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|r| r.is_ok()));
        let bad: Vec<_> = rt.block_on(
            VerifyingStream::new(pieces(&[b"hello ", b"worle"]), d, 11, "b").collect::<Vec<_>>(),
        );
        assert!(bad
            .last()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("mismatch"));
        let long: Vec<_> = rt.block_on(
            VerifyingStream::new(pieces(&[b"hello ", b"world", b"!"]), d, 11, "b")
                .collect::<Vec<_>>(),
        );
        assert!(long
            .last()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("longer"));
    }
}
