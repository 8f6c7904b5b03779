//! Content digests, one family for all of tessera:
//!
//! * [`Digest`] — sha256, 32 bytes, `Copy`: what tessera itself computes and stores
//!   (chunk ids, pack and index digests, manifests it writes). Compact because an index
//!   holds one per chunk.
//! * [`OciDigest`] — any digest an OCI registry or client may name (`sha256:` or
//!   `sha512:`): what the registry accepts and the clients verify. A [`Digest`] converts
//!   into it without loss and back when it is sha256 — never through strings.
//! * [`DigestHasher`] — incremental hashing for either algorithm; [`Hasher`] for sha256.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256, Sha512};
use std::fmt;
use std::str::FromStr;

/// A sha256 digest. Displayed and parsed as `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

/// A string that is not a valid digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// Not `algorithm:encoded` at all.
    #[error("digest {0:?} is not of the form algorithm:hex")]
    Syntax(String),
    /// A well-formed algorithm this place does not take (sha512 where only sha256 is).
    #[error("unsupported digest algorithm in {0:?} (use sha256, or sha512 where OCI allows it)")]
    Algorithm(String),
    /// The right algorithm, but the wrong length or characters.
    #[error("malformed digest {0:?} (expected lowercase hex of the algorithm's length)")]
    Malformed(String),
}

impl Digest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// Lowercase hex of the 32 bytes, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.hex()[..12])
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.starts_with("sha256:") {
            return Err(DigestError::Algorithm(s.to_string()));
        }
        match OciDigest::parse(s)? {
            OciDigest::Sha256(d) => Ok(d),
            OciDigest::Sha512(_) => Err(DigestError::Algorithm(s.to_string())),
        }
    }
}

/// A hash algorithm OCI content may be addressed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    pub fn parse(s: &str) -> Option<Algorithm> {
        match s {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

/// An OCI content digest: `sha256:<64 hex>` or `sha512:<128 hex>`, lowercase.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OciDigest {
    Sha256(Digest),
    Sha512([u8; 64]),
}

impl OciDigest {
    /// Parse with the grammar of the OCI image spec: `algorithm:encoded`, where the
    /// algorithm is `[a-z0-9]+([+._-][a-z0-9]+)*`; only sha256 and sha512 are supported.
    pub fn parse(s: &str) -> Result<OciDigest, DigestError> {
        let (alg, enc) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Syntax(s.to_string()))?;
        let valid_alg = !alg.is_empty()
            && alg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !valid_alg || enc.is_empty() {
            return Err(DigestError::Syntax(s.to_string()));
        }
        let algo = Algorithm::parse(alg).ok_or_else(|| DigestError::Algorithm(s.to_string()))?;
        if enc.len() != algo.hex_len()
            || !enc
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Malformed(s.to_string()));
        }
        let bad = |_| DigestError::Malformed(s.to_string());
        Ok(match algo {
            Algorithm::Sha256 => {
                let mut out = [0u8; 32];
                hex::decode_to_slice(enc, &mut out).map_err(bad)?;
                OciDigest::Sha256(Digest(out))
            }
            Algorithm::Sha512 => {
                let mut out = [0u8; 64];
                hex::decode_to_slice(enc, &mut out).map_err(bad)?;
                OciDigest::Sha512(out)
            }
        })
    }

    /// The digest of `data` with `algo`.
    pub fn of(algo: Algorithm, data: &[u8]) -> OciDigest {
        let mut h = DigestHasher::new(algo);
        h.update(data);
        h.finish()
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            OciDigest::Sha256(_) => Algorithm::Sha256,
            OciDigest::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// Lowercase hex, without the algorithm prefix.
    pub fn hex(&self) -> String {
        match self {
            OciDigest::Sha256(d) => d.hex(),
            OciDigest::Sha512(b) => hex::encode(b),
        }
    }

    /// The sha256 digest, when it is one.
    pub fn sha256(&self) -> Option<Digest> {
        match self {
            OciDigest::Sha256(d) => Some(*d),
            OciDigest::Sha512(_) => None,
        }
    }
}

impl From<Digest> for OciDigest {
    fn from(d: Digest) -> Self {
        OciDigest::Sha256(d)
    }
}

impl fmt::Display for OciDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm().name(), self.hex())
    }
}

impl fmt::Debug for OciDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm().name(), &self.hex()[..12])
    }
}

impl FromStr for OciDigest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OciDigest::parse(s)
    }
}

impl Serialize for OciDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OciDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        OciDigest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Incremental hashing with either algorithm.
#[derive(Clone)]
pub enum DigestHasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl DigestHasher {
    pub fn new(algo: Algorithm) -> DigestHasher {
        match algo {
            Algorithm::Sha256 => DigestHasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => DigestHasher::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(data),
            DigestHasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> OciDigest {
        match self {
            DigestHasher::Sha256(h) => OciDigest::Sha256(Digest(h.finalize().into())),
            DigestHasher::Sha512(h) => OciDigest::Sha512(h.finalize().into()),
        }
    }
}

/// Incremental sha256, for streams.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

/// A writer adapter that hashes and counts everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    written: u64,
}

impl<W: std::io::Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
            written: 0,
        }
    }
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
    pub fn into_parts(self) -> (W, Digest, u64) {
        (self.inner, self.hasher.finish(), self.written)
    }
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader adapter that hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    read: u64,
}

impl<R: std::io::Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
            read: 0,
        }
    }
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
    pub fn finish(self) -> (Digest, u64) {
        (self.hasher.finish(), self.read)
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn oci_digests() {
        let d = OciDigest::of(Algorithm::Sha256, b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(OciDigest::parse(&d.to_string()).unwrap(), d);
        assert_eq!(d.sha256(), Some(Digest::of(b"")));
        assert_eq!(OciDigest::from(Digest::of(b"")), d);
        let d5 = OciDigest::of(Algorithm::Sha512, b"");
        assert!(d5.to_string().starts_with("sha512:cf83e1357eefb8bd"));
        assert_eq!(OciDigest::parse(&d5.to_string()).unwrap(), d5);
        assert_eq!(d5.sha256(), None);
        assert!(matches!(
            d5.to_string().parse::<Digest>(),
            Err(DigestError::Algorithm(_))
        ));
        assert!(matches!(
            OciDigest::parse("sha256:totallywrong"),
            Err(DigestError::Malformed(_))
        ));
        assert!(matches!(
            OciDigest::parse("md5:abcd"),
            Err(DigestError::Algorithm(_))
        ));
        assert!(matches!(
            OciDigest::parse("nocolon"),
            Err(DigestError::Syntax(_))
        ));
        assert!(matches!(
            OciDigest::parse("Sha256:00"),
            Err(DigestError::Syntax(_))
        ));
        let json = serde_json::to_string(&d5).unwrap();
        assert_eq!(serde_json::from_str::<OciDigest>(&json).unwrap(), d5);
    }

    #[test]
    fn rejects_bad_digests() {
        assert!(matches!(
            "sha512:00".parse::<Digest>(),
            Err(DigestError::Algorithm(_))
        ));
        assert!(matches!(
            "sha256:abc".parse::<Digest>(),
            Err(DigestError::Malformed(_))
        ));
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(matches!(
            upper.parse::<Digest>(),
            Err(DigestError::Malformed(_))
        ));
        let nonhex = format!("sha256:{}", "g".repeat(64));
        assert!(matches!(
            nonhex.parse::<Digest>(),
            Err(DigestError::Malformed(_))
        ));
    }
}
