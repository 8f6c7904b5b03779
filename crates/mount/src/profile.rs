//! Read profiles stored beside the image: an OCI 1.1 artifact whose `subject` is the
//! tessera image manifest, `artifactType` [`media::PROFILE_ARTIFACT_TYPE`], the empty
//! config, and one layer holding the profile text (lines `K N PATH`, as written by
//! `tessera mount --record-profile`). A mount finds the newest one through the referrers
//! API and prefetches what it lists, so a cold node starts a known workload as fast as
//! the link allows without being told where the profile is.

use std::collections::BTreeMap;
use std::io::Read;
use tessera_format::{media, Digest};
use tessera_oci::manifest::{Descriptor, ImageManifest};
use tessera_oci::{OciError, Store};

/// Largest profile read from a registry (a profile is a few bytes per chunk read).
pub const MAX_PROFILE: u64 = 16 << 20;

/// Store `profile` as a referrer of the image manifest `subject`; returns the profile
/// manifest's digest. `created` is an RFC 3339 time (newest wins when mounting).
pub fn push(
    store: &dyn Store,
    subject: &Descriptor,
    profile: &[u8],
    workload: Option<&str>,
    created: &str,
) -> Result<Digest, OciError> {
    if profile.len() as u64 > MAX_PROFILE {
        return Err(OciError::Manifest(format!(
            "the profile is {} bytes; at most {MAX_PROFILE} are stored",
            profile.len()
        )));
    }
    let empty = Digest::of(media::OCI_EMPTY_CONTENT);
    store.put_blob_bytes(&empty, media::OCI_EMPTY_CONTENT)?;
    let blob = Digest::of(profile);
    store.put_blob_bytes(&blob, profile)?;
    let mut annotations = BTreeMap::new();
    annotations.insert(media::ANN_CREATED.to_string(), created.to_string());
    if let Some(w) = workload {
        annotations.insert(media::ANN_PROFILE_WORKLOAD.to_string(), w.to_string());
    }
    let m = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: Some(media::PROFILE_ARTIFACT_TYPE.into()),
        config: Descriptor::new(
            media::OCI_EMPTY,
            &empty,
            media::OCI_EMPTY_CONTENT.len() as u64,
        ),
        layers: vec![Descriptor::new(
            media::PROFILE_MEDIA_TYPE,
            &blob,
            profile.len() as u64,
        )],
        subject: Some(Descriptor::new(
            &subject.media_type,
            &subject.sha256()?,
            subject.size,
        )),
        annotations,
    };
    let bytes = tessera_oci::manifest::to_bytes(&m)?;
    store.put_referrer(
        &bytes,
        media::OCI_MANIFEST,
        media::PROFILE_ARTIFACT_TYPE,
        subject,
    )
}

/// The newest profile stored for the image manifest `subject` (by its creation
/// annotation), if any: (profile manifest digest, profile text).
pub fn fetch_latest(
    store: &dyn Store,
    subject: &Digest,
    workload: Option<&str>,
) -> Result<Option<(Digest, Vec<u8>)>, OciError> {
    let mut found = store.referrers(subject, media::PROFILE_ARTIFACT_TYPE)?;
    if let Some(w) = workload {
        found.retain(|d| {
            d.annotations
                .get(media::ANN_PROFILE_WORKLOAD)
                .map(String::as_str)
                == Some(w)
        });
    }
    // Stable: among equal times the last listed wins.
    found.sort_by(|a, b| {
        a.annotations
            .get(media::ANN_CREATED)
            .cmp(&b.annotations.get(media::ANN_CREATED))
    });
    let Some(d) = found.pop() else {
        return Ok(None);
    };
    let digest = d.sha256()?;
    let raw = store.manifest(&digest.to_string())?;
    let m: ImageManifest = serde_json::from_slice(&raw.bytes)
        .map_err(|e| OciError::Manifest(format!("profile manifest {digest}: {e}")))?;
    let Some(layer) = m
        .layers
        .iter()
        .find(|l| l.media_type == media::PROFILE_MEDIA_TYPE)
    else {
        return Err(OciError::Manifest(format!(
            "profile manifest {digest} has no {} layer",
            media::PROFILE_MEDIA_TYPE
        )));
    };
    if layer.size > MAX_PROFILE {
        return Err(OciError::Manifest(format!(
            "profile {digest} is {} bytes; at most {MAX_PROFILE} are read",
            layer.size
        )));
    }
    let mut text = Vec::with_capacity(layer.size as usize);
    store
        .open_blob(&layer.sha256()?, layer.size)?
        .read_to_end(&mut text)
        .map_err(|e| OciError::io(format!("reading profile {digest}"), e))?;
    Ok(Some((digest, text)))
}
