//! Repository names, tags and digests as the distribution spec defines them.

use sha2::{Digest as _, Sha256, Sha512};
use std::fmt;

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255 bytes.
pub fn valid_repo(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    name.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run: ".", "_", "__" or "-+"
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

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

/// A validated content digest, `sha256:<64 hex>` or `sha512:<128 hex>` (lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobDigest {
    algo: Algorithm,
    hex: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestParseError {
    #[error("digest {0:?} is not of the form algorithm:hex")]
    Syntax(String),
    #[error("digest algorithm {0:?} is not supported (use sha256 or sha512)")]
    Unsupported(String),
    #[error("digest {0:?} has the wrong length or non-hex characters")]
    Encoding(String),
}

impl BlobDigest {
    pub fn parse(s: &str) -> Result<BlobDigest, DigestParseError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestParseError::Syntax(s.to_string()))?;
        let valid_alg = !alg.is_empty()
            && alg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !valid_alg || hex.is_empty() {
            return Err(DigestParseError::Syntax(s.to_string()));
        }
        let algo =
            Algorithm::parse(alg).ok_or_else(|| DigestParseError::Unsupported(alg.to_string()))?;
        if hex.len() != algo.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestParseError::Encoding(s.to_string()));
        }
        Ok(BlobDigest {
            algo,
            hex: hex.to_string(),
        })
    }

    pub fn of(algo: Algorithm, data: &[u8]) -> BlobDigest {
        let mut h = DigestHasher::new(algo);
        h.update(data);
        h.finish()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algo
    }
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo.name(), self.hex)
    }
}

/// Incremental hashing for either supported algorithm.
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
    pub fn finish(self) -> BlobDigest {
        match self {
            DigestHasher::Sha256(h) => BlobDigest {
                algo: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            DigestHasher::Sha512(h) => BlobDigest {
                algo: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(BlobDigest),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        for ok in [
            "a",
            "library/debian",
            "a/b/c",
            "x.y_z__w---v",
            "a/blobs/manifests/x",
        ] {
            assert!(valid_repo(ok), "{ok}");
        }
        for bad in [
            "", "A", "-a", "a-", "a//b", "a___b", "a..b", "/a", "a/", "a_.b", "é",
        ] {
            assert!(!valid_repo(bad), "{bad}");
        }
    }

    #[test]
    fn tags() {
        assert!(valid_tag("latest"));
        assert!(valid_tag("_x.Y-1"));
        assert!(valid_tag(&"a".repeat(128)));
        assert!(!valid_tag(&"a".repeat(129)));
        assert!(!valid_tag(".a"));
        assert!(!valid_tag("-a"));
        assert!(!valid_tag(""));
        assert!(!valid_tag("a:b"));
    }

    #[test]
    fn digests() {
        let d = BlobDigest::of(Algorithm::Sha256, b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(BlobDigest::parse(&d.to_string()).unwrap(), d);
        let d5 = BlobDigest::of(Algorithm::Sha512, b"");
        assert_eq!(BlobDigest::parse(&d5.to_string()).unwrap(), d5);
        assert!(matches!(
            BlobDigest::parse("sha256:totallywrong"),
            Err(DigestParseError::Encoding(_))
        ));
        assert!(matches!(
            BlobDigest::parse("md5:abcd"),
            Err(DigestParseError::Unsupported(_))
        ));
        assert!(matches!(
            BlobDigest::parse("nocolon"),
            Err(DigestParseError::Syntax(_))
        ));
        let upper = d.to_string().to_uppercase().replace("SHA256", "sha256");
        assert!(BlobDigest::parse(&upper).is_err());
    }
}
