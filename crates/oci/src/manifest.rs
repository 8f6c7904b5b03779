//! The OCI manifest shapes tessera reads and writes. Plain serde types (maps are
//! BTreeMaps) so that writing the same manifest always gives the same bytes.
//!
//! Why not `oci-spec`'s types: docs/format.md §5.3 makes the JSON of a tessera manifest
//! part of the format — members in a fixed order, annotation keys sorted — so that the
//! same conversion always gives the same digests. `oci-spec` (0.9) keeps annotations in a
//! `HashMap`, whose order changes from process to process, so a manifest written through
//! it would get a new digest on every run; and its descriptors carry a digest type of
//! their own beside `tessera_format::OciDigest`. These types are what §5.1–5.3 specify,
//! and nothing more.

use crate::{OciError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tessera_format::{media, Digest};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "os.version"
    )]
    pub os_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: digest.to_string(),
            size,
            platform: None,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }
    /// The digest, parsed (only sha256 is supported for content tessera reads).
    pub fn sha256(&self) -> Result<Digest> {
        self.digest
            .parse()
            .map_err(|e: tessera_format::DigestError| OciError::Manifest(e.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A parsed manifest document.
#[derive(Debug, Clone)]
pub enum Parsed {
    Image(ImageManifest),
    Index(ImageIndex),
}

/// Parse a manifest of any supported media type.
pub fn parse(bytes: &[u8], media_type: &str) -> Result<Parsed> {
    let bad = |e: serde_json::Error| OciError::Manifest(format!("{media_type}: {e}"));
    match media_type {
        media::OCI_INDEX | media::DOCKER_MANIFEST_LIST => Ok(Parsed::Index(serde_json::from_slice(bytes).map_err(bad)?)),
        media::OCI_MANIFEST | media::DOCKER_MANIFEST => {
            let m: ImageManifest = serde_json::from_slice(bytes).map_err(bad)?;
            if m.schema_version != 2 {
                return Err(OciError::Manifest(format!("schemaVersion {} (expected 2)", m.schema_version)));
            }
            Ok(Parsed::Image(m))
        }
        other => Err(OciError::Unsupported(format!("manifest media type {other:?} (supported: OCI image manifest and index, Docker v2 schema 2 manifest and list)"))),
    }
}

/// Serialize deterministically.
pub fn to_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| OciError::Manifest(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_and_oci() {
        let d = format!("sha256:{}", "a".repeat(64));
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{d}","size":3}},"layers":[{{"mediaType":"{}","digest":"{d}","size":5}}]}}"#,
            media::DOCKER_MANIFEST,
            media::DOCKER_CONFIG,
            media::DOCKER_LAYER_GZIP
        );
        let Parsed::Image(m) = parse(doc.as_bytes(), media::DOCKER_MANIFEST).unwrap() else {
            panic!()
        };
        assert_eq!(m.layers[0].size, 5);
        assert!(parse(b"{}", media::OCI_MANIFEST).is_err());
        assert!(parse(b"not json", media::OCI_INDEX).is_err());
        assert!(matches!(
            parse(doc.as_bytes(), "text/plain"),
            Err(OciError::Unsupported(_))
        ));
        let again = to_bytes(&m).unwrap();
        let Parsed::Image(m2) = parse(&again, media::DOCKER_MANIFEST).unwrap() else {
            panic!()
        };
        assert_eq!(m, m2);
    }
}
