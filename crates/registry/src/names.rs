//! Manifest references as the distribution spec defines them. Digests are
//! `tessera_format::OciDigest`; repository names and tags follow
//! `tessera_oci::reference::{valid_repo, valid_tag}`.

use tessera_format::OciDigest;

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(OciDigest),
}
