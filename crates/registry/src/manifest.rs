//! Manifests: parsing and checking a pushed manifest body, and storing it.

use crate::error::{ApiError, Code};
use crate::meta::ManifestMeta;
use crate::state::Registry;
use tessera_format::media::{is_index, MANIFEST_TYPES, OCI_MANIFEST};
use tessera_format::OciDigest;

impl Registry {
    /// Check a parsed manifest against the repository and make it visible (durably),
    /// with its tags and referrer entry. Returns its subject.
    pub(crate) fn store_manifest(
        &self,
        repo: &str,
        d: &OciDigest,
        bytes: Vec<u8>,
        parsed: Parsed,
        tags: &[String],
    ) -> Result<Option<OciDigest>, ApiError> {
        // Shared publish lock across the checks and the commit: a blob cannot be deleted
        // between "the manifest's blobs are present" and "the manifest is visible".
        let _r = self.read_lock();
        let mut missing = Vec::new();
        for (b, declared) in &parsed.required {
            match self.meta.blob_in_repo(repo, b)? {
                None => missing.push(b.to_string()),
                // A descriptor must describe the blob: a client reading `size` bytes of
                // it would otherwise get a short or a failing read.
                Some(stored) if stored != *declared => {
                    return Err(invalid(format!(
                        "descriptor of blob {b} says {declared} bytes, but the blob has {stored}"
                    ))
                    .detail(serde_json::json!({
                        "digest": b.to_string(),
                        "size": declared,
                        "stored": stored,
                    })))
                }
                Some(_) => {}
            }
        }
        if let Some(first) = missing.first() {
            return Err(ApiError::new(
                Code::ManifestBlobUnknown,
                format!("manifest references blob {first}, which is not in repository {repo}; push it first"),
            )
            .detail(serde_json::json!({ "digests": missing })));
        }
        // Packs are verified whatever the artifactType says: a manifest cannot smuggle
        // unverified packs (or a pack-less tessera image) past the checks.
        if parsed.is_tessera() {
            self.admit_tessera_layers(&parsed.layers)?;
        }
        let meta = ManifestMeta {
            media_type: parsed.media_type.clone(),
            size: bytes.len() as u64,
            subject: parsed.subject.as_ref().map(|s| s.to_string()),
        };
        self.backend.put(d, &bytes)?;
        self.meta
            .put_manifest(repo, d, &meta, tags, Some(&parsed.referrer))?;
        tracing::info!(repository = %repo, digest = %d, media_type = %meta.media_type, tags = ?tags, "manifest pushed");
        Ok(parsed.subject)
    }
}

/// Everything `put_manifest` learns from the manifest body.
pub(crate) struct Parsed {
    pub(crate) media_type: String,
    /// Blobs that must be in the repository (config and layers of an image manifest),
    /// with the size their descriptor gives.
    pub(crate) required: Vec<(OciDigest, u64)>,
    pub(crate) subject: Option<OciDigest>,
    /// The descriptor listed by the referrers API when `subject` is set.
    pub(crate) referrer: serde_json::Value,
    pub(crate) artifact_type: Option<String>,
    pub(crate) layers: Vec<(String, OciDigest, u64)>,
}

impl Parsed {
    /// A tessera image by its artifactType or by any of its layers' media types: these
    /// get their packs verified and need exactly one index layer (docs/format.md §5).
    pub(crate) fn is_tessera(&self) -> bool {
        self.artifact_type.as_deref() == Some(tessera_format::media::ARTIFACT_TYPE)
            || self.layers.iter().any(|(mt, _, _)| {
                mt == tessera_format::media::PACK_MEDIA_TYPE
                    || mt == tessera_format::media::INDEX_MEDIA_TYPE
            })
    }

    /// Images and image indexes (not artifacts, not tessera images) get a tessera twin
    /// under --convert-on-push.
    pub(crate) fn wants_twin(&self) -> bool {
        let config_type = self.referrer.get("artifactType").and_then(|a| a.as_str());
        self.artifact_type.is_none()
            && (is_index(&self.media_type)
                || config_type == Some(tessera_format::media::OCI_CONFIG)
                || config_type == Some(tessera_format::media::DOCKER_CONFIG))
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(Code::ManifestInvalid, msg)
}

fn descriptor_digest(
    v: &serde_json::Value,
    what: &str,
) -> Result<(OciDigest, u64, String), ApiError> {
    let d = v
        .get("digest")
        .and_then(|d| d.as_str())
        .ok_or_else(|| invalid(format!("{what}: descriptor without digest")))?;
    let d = OciDigest::parse(d).map_err(|e| invalid(format!("{what}: {e}")))?;
    let size = v
        .get("size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| invalid(format!("{what}: descriptor without a valid size")))?;
    let mt = v
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    Ok((d, size, mt))
}

pub(crate) fn parse_manifest(
    body: &[u8],
    content_type: Option<&str>,
    d: &OciDigest,
) -> Result<Parsed, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("manifest must be a JSON object"))?;
    if obj.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
        return Err(invalid(
            "schemaVersion must be 2 (schema 1 manifests are not supported)",
        ));
    }
    let field = obj.get("mediaType").and_then(|m| m.as_str());
    let ct = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| !c.is_empty() && *c != "application/octet-stream" && *c != "application/json");
    let media_type = match (field, ct) {
        (Some(f), Some(c)) if f != c => {
            return Err(invalid(format!(
                "Content-Type {c} does not match the manifest's mediaType {f}"
            )))
        }
        (Some(f), _) => f.to_string(),
        (None, Some(c)) => c.to_string(),
        // Neither says what the body is: guessing could store an index as an image
        // manifest (or the reverse) and serve it with the wrong type forever.
        (None, None) => {
            return Err(invalid(format!(
                "the Content-Type header is required (one of {}) when the manifest has no mediaType field",
                MANIFEST_TYPES.join(", ")
            )))
        }
    };
    if !MANIFEST_TYPES.contains(&media_type.as_str()) {
        return Err(invalid(format!(
            "unsupported manifest media type {media_type}; supported: {}",
            MANIFEST_TYPES.join(", ")
        )));
    }
    let mut required = Vec::new();
    let mut layers = Vec::new();
    let artifact_type = obj
        .get("artifactType")
        .and_then(|a| a.as_str())
        .map(str::to_string);
    let mut desc_artifact = artifact_type.clone();
    if is_index(&media_type) {
        let list = obj
            .get("manifests")
            .and_then(|m| m.as_array())
            .ok_or_else(|| invalid("an index needs a manifests array"))?;
        for (i, m) in list.iter().enumerate() {
            descriptor_digest(m, &format!("manifests[{i}]"))?;
        }
    } else {
        let config = obj
            .get("config")
            .ok_or_else(|| invalid("an image manifest needs a config descriptor"))?;
        let (cd, csize, cmt) = descriptor_digest(config, "config")?;
        required.push((cd, csize));
        if desc_artifact.is_none() {
            desc_artifact = Some(cmt);
        }
        let list = match obj.get("layers") {
            Some(l) => l
                .as_array()
                .ok_or_else(|| invalid("layers must be an array"))?
                .clone(),
            None if media_type == OCI_MANIFEST => Vec::new(),
            None => return Err(invalid("an image manifest needs a layers array")),
        };
        for (i, l) in list.iter().enumerate() {
            let (ld, size, mt) = descriptor_digest(l, &format!("layers[{i}]"))?;
            let foreign = mt.contains("nondistributable")
                || mt.contains("foreign")
                || l.get("urls").is_some();
            if !foreign {
                required.push((ld.clone(), size));
            }
            layers.push((mt, ld, size));
        }
    }
    let subject = match obj.get("subject") {
        Some(s) => Some(descriptor_digest(s, "subject")?.0),
        None => None,
    };
    let mut referrer = serde_json::json!({
        "mediaType": media_type,
        "digest": d.to_string(),
        "size": body.len(),
    });
    if let Some(a) = desc_artifact {
        referrer["artifactType"] = serde_json::Value::String(a);
    }
    if let Some(a) = obj.get("annotations").filter(|a| a.is_object()) {
        referrer["annotations"] = a.clone();
    }
    Ok(Parsed {
        media_type,
        required,
        subject,
        referrer,
        artifact_type,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use tessera_format::Algorithm;

    #[test]
    fn manifest_parsing() {
        let d = OciDigest::of(Algorithm::Sha256, b"x");
        let cfg = OciDigest::of(Algorithm::Sha256, b"{}");
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/x",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cfg.to_string(), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar", "digest": d.to_string(), "size": 1}],
            "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d.to_string(), "size": 1},
            "annotations": {"a": "b"}
        });
        let body = serde_json::to_vec(&m).unwrap();
        let p = parse_manifest(
            &body,
            Some("application/vnd.oci.image.manifest.v1+json"),
            &d,
        )
        .unwrap();
        assert_eq!(p.required, vec![(cfg, 2)]);
        assert_eq!(p.subject, Some(d.clone()));
        assert_eq!(p.referrer["artifactType"], "application/x");
        assert_eq!(p.referrer["annotations"]["a"], "b");
        let e = parse_manifest(&body, Some("application/vnd.oci.image.index.v1+json"), &d)
            .err()
            .unwrap();
        assert_eq!(e.code, Code::ManifestInvalid);
        assert_eq!(
            parse_manifest(b"{", None, &d).err().unwrap().code,
            Code::ManifestInvalid
        );
        assert_eq!(
            parse_manifest(b"[]", None, &d).err().unwrap().code,
            Code::ManifestInvalid
        );
    }

    #[test]
    fn content_type_is_required_unless_the_body_names_its_type() {
        let d = OciDigest::of(Algorithm::Sha256, b"x");
        let cfg = OciDigest::of(Algorithm::Sha256, b"{}");
        let mut m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cfg.to_string(), "size": 2},
            "layers": []
        });
        let body = serde_json::to_vec(&m).unwrap();
        for ct in [
            None,
            Some("application/json"),
            Some("application/octet-stream"),
        ] {
            let e = parse_manifest(&body, ct, &d).err().unwrap();
            assert_eq!(e.code, Code::ManifestInvalid);
            assert!(
                e.message.contains("Content-Type header is required"),
                "{}",
                e.message
            );
        }
        let p = parse_manifest(&body, Some(OCI_MANIFEST), &d).unwrap();
        assert_eq!(p.media_type, OCI_MANIFEST);
        m["mediaType"] = serde_json::Value::from(OCI_MANIFEST);
        let body = serde_json::to_vec(&m).unwrap();
        let p = parse_manifest(&body, None, &d).unwrap();
        assert_eq!(p.media_type, OCI_MANIFEST);
    }
}
