//! Server-side conversion (`--convert-on-push`): every plain image pushed or pulled
//! through gets its tessera twin, converted in-process against the global chunk index
//! (so it stores only chunks no other image has), stored untagged in the same repository
//! and linked to the source by `subject` (the referrers API finds it).
//!
//! The converter talks to the registry through [`LocalRepo`], a `tessera_oci::Store`
//! over one repository that goes through the same checks as HTTP pushes.

use crate::error::{ApiError, StoreError};
use crate::manifest::parse_manifest;
use crate::state::{Registry, Shared};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tessera_convert::{Converter, Dictionary, Options};
use tessera_format::media::ARTIFACT_TYPE;
use tessera_format::Digest;
use tessera_format::{Algorithm, OciDigest};
use tessera_oci::verify::VerifyingReader;
use tessera_oci::{OciError, RawManifest, RemoteChunk, Store};

/// `registry_location` host of in-process stores (never a real host name).
const LOCAL: &str = "tessera-serve.local";

/// Queue the conversion of `d` (a manifest just stored in `repo`).
pub fn schedule(reg: &Shared, repo: &str, d: &OciDigest) {
    if d.algorithm() != Algorithm::Sha256 {
        return;
    }
    let (reg, repo, d) = (reg.clone(), repo.to_string(), d.clone());
    tokio::spawn(async move {
        // One conversion at a time, waiting without holding a blocking thread: pushes and
        // pulls keep the other core.
        let Ok(permit) = reg.convert_slot.clone().acquire_owned().await else {
            return;
        };
        let _ = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            match convert_twin(&reg, &repo, &d) {
                Ok(Some(twin)) => {
                    reg.metrics.twins_converted.inc();
                    tracing::info!(repository = %repo, source = %d, twin = %twin, "tessera twin converted");
                }
                Ok(None) => {
                    tracing::debug!(repository = %repo, source = %d, "twin exists or not an image")
                }
                Err(e) => {
                    reg.metrics.twins_failed.inc();
                    tracing::warn!(repository = %repo, source = %d, error = %e, "tessera twin conversion failed");
                }
            }
        })
        .await;
    });
}

fn convert_twin(reg: &Arc<Registry>, repo: &str, d: &OciDigest) -> Result<Option<String>, String> {
    let existing = reg.meta.referrers(repo, d).map_err(|e| e.to_string())?;
    if existing
        .iter()
        .any(|r| r.get("artifactType").and_then(|a| a.as_str()) == Some(ARTIFACT_TYPE))
    {
        return Ok(None);
    }
    let staging = reg.config.root.join("convert-staging");
    let store = LocalRepo::new(reg.clone(), repo, &staging);
    let mut dict = Dictionary::new();
    let opts = Options {
        cache_dir: None,
        staging_dir: Some(staging),
        threads: std::thread::available_parallelism()
            .map(|n| n.get() / 2)
            .unwrap_or(1)
            .max(1),
        global_dedup: true,
        ..Options::default()
    };
    let mut conv = Converter {
        src: &store,
        dst: &store,
        dict: &mut dict,
        opts,
        progress: indicatif::MultiProgress::with_draw_target(
            indicatif::ProgressDrawTarget::hidden(),
        ),
    };
    match conv.convert(&d.to_string(), None) {
        Ok(report) => Ok(Some(report.digest)),
        Err(e) => Err(e.to_string()),
    }
}

/// One repository of this registry as a `tessera_oci::Store`, in-process.
pub struct LocalRepo {
    reg: Arc<Registry>,
    repo: String,
    staging: PathBuf,
}

impl LocalRepo {
    pub fn new(reg: Arc<Registry>, repo: &str, staging: &Path) -> LocalRepo {
        LocalRepo {
            reg,
            repo: repo.to_string(),
            staging: staging.to_path_buf(),
        }
    }

    fn bd(d: &Digest) -> OciDigest {
        OciDigest::from(*d)
    }

    /// The blob's size if this repository can read it, fetching it from the pull-through
    /// upstream when needed.
    fn size_of(&self, d: &Digest) -> tessera_oci::Result<u64> {
        let bd = Self::bd(d);
        if let Some(s) = self
            .reg
            .meta
            .blob_in_repo(&self.repo, &bd)
            .map_err(store_err)?
        {
            return Ok(s);
        }
        if self.reg.proxy.select(&self.repo).is_some() {
            let rt = tokio::runtime::Handle::current();
            rt.block_on(self.reg.fetch_through(&self.repo, &bd))
                .map_err(|e| OciError::Registry(e.message))?;
            if let Some(s) = self
                .reg
                .meta
                .blob_in_repo(&self.repo, &bd)
                .map_err(store_err)?
            {
                return Ok(s);
            }
        }
        Err(OciError::NotFound(format!("blob {d} in {}", self.repo)))
    }

    fn link(&self, d: &OciDigest, size: u64) -> tessera_oci::Result<()> {
        let _r = self.reg.read_lock();
        self.reg
            .meta
            .link_blob(&self.repo, d, size)
            .map_err(store_err)
    }
}

fn store_err(e: StoreError) -> OciError {
    OciError::Registry(e.to_string())
}

fn api_err(e: ApiError) -> OciError {
    OciError::Registry(format!("{}: {}", e.code.as_str(), e.message))
}

impl Store for LocalRepo {
    fn describe(&self) -> String {
        format!("this registry's {}", self.repo)
    }

    fn manifest(&self, reference: &str) -> tessera_oci::Result<RawManifest> {
        let d = match OciDigest::parse(reference) {
            Ok(d) => d,
            Err(_) => self
                .reg
                .meta
                .tag(&self.repo, reference)
                .map_err(store_err)?
                .ok_or_else(|| OciError::NotFound(format!("{}:{reference}", self.repo)))?,
        };
        let meta = self
            .reg
            .meta
            .manifest(&self.repo, &d)
            .map_err(store_err)?
            .ok_or_else(|| OciError::NotFound(format!("manifest {d} in {}", self.repo)))?;
        let mut bytes = Vec::new();
        self.reg
            .backend
            .open(&d, 0)
            .map_err(store_err)?
            .read_to_end(&mut bytes)
            .map_err(|e| OciError::io("reading a manifest", e))?;
        let digest = d
            .sha256()
            .ok_or_else(|| OciError::Unsupported(format!("manifest digest {d} (sha256 only)")))?;
        if Digest::of(&bytes) != digest {
            return Err(OciError::DigestMismatch {
                what: format!("manifest {d}"),
                expected: d.to_string(),
                actual: Digest::of(&bytes).to_string(),
            });
        }
        Ok(RawManifest {
            bytes,
            media_type: meta.media_type,
            digest,
        })
    }

    fn open_blob(&self, digest: &Digest, size: u64) -> tessera_oci::Result<Box<dyn Read + Send>> {
        self.size_of(digest)?;
        let r = self
            .reg
            .backend
            .open(&Self::bd(digest), 0)
            .map_err(store_err)?;
        Ok(Box::new(VerifyingReader::new(
            r,
            *digest,
            size,
            format!("blob {digest}"),
        )))
    }

    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> tessera_oci::Result<Vec<u8>> {
        self.size_of(digest)?;
        let mut out = Vec::with_capacity(len as usize);
        self.reg
            .backend
            .open(&Self::bd(digest), offset)
            .map_err(store_err)?
            .take(len)
            .read_to_end(&mut out)
            .map_err(|e| OciError::io("reading a blob range", e))?;
        Ok(out)
    }

    fn has_blob(&self, digest: &Digest) -> tessera_oci::Result<bool> {
        Ok(self
            .reg
            .meta
            .blob_in_repo(&self.repo, &Self::bd(digest))
            .map_err(store_err)?
            .is_some())
    }

    fn put_blob_file(&self, digest: &Digest, size: u64, path: &Path) -> tessera_oci::Result<()> {
        let bd = Self::bd(digest);
        let session = uuid::Uuid::new_v4().to_string();
        let b = &self.reg.backend;
        b.upload_create(&session).map_err(store_err)?;
        let copy = || -> tessera_oci::Result<()> {
            let mut w = b.upload_append(&session, 0).map_err(store_err)?;
            let mut f =
                std::fs::File::open(path).map_err(|e| OciError::io("reading a staged blob", e))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f
                    .read(&mut buf)
                    .map_err(|e| OciError::io("reading a staged blob", e))?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n])
                    .map_err(|e| OciError::io("storing a blob", e))?;
            }
            let written = w.commit().map_err(store_err)?;
            if written != size {
                return Err(OciError::Registry(format!(
                    "staged blob {digest} is {written} bytes, not {size}"
                )));
            }
            let _r = self.reg.read_lock();
            b.upload_commit(&session, &bd).map_err(store_err)?;
            self.reg
                .meta
                .link_blob(&self.repo, &bd, size)
                .map_err(store_err)
        };
        let r = copy();
        if r.is_err() {
            let _ = b.upload_delete(&session);
        }
        r
    }

    fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> tessera_oci::Result<()> {
        let bd = Self::bd(digest);
        if Digest::of(bytes) != *digest {
            return Err(OciError::DigestMismatch {
                what: "blob".into(),
                expected: digest.to_string(),
                actual: Digest::of(bytes).to_string(),
            });
        }
        let _r = self.reg.read_lock();
        self.reg.backend.put(&bd, bytes).map_err(store_err)?;
        self.reg
            .meta
            .link_blob(&self.repo, &bd, bytes.len() as u64)
            .map_err(store_err)
    }

    fn put_manifest(
        &self,
        tag: Option<&str>,
        bytes: &[u8],
        media_type: &str,
    ) -> tessera_oci::Result<Digest> {
        let digest = Digest::of(bytes);
        let bd = Self::bd(&digest);
        let parsed = parse_manifest(bytes, Some(media_type), &bd).map_err(api_err)?;
        let tags: Vec<String> = tag.map(|t| vec![t.to_string()]).unwrap_or_default();
        self.reg
            .store_manifest(&self.repo, &bd, bytes.to_vec(), parsed, &tags)
            .map_err(api_err)?;
        Ok(digest)
    }

    fn copy_blob_from(
        &self,
        from: &dyn Store,
        digest: &Digest,
        size: u64,
    ) -> tessera_oci::Result<()> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        if let Some((host, repo)) = from.registry_location() {
            let bd = Self::bd(digest);
            if host == LOCAL {
                if let Some(s) = self.reg.meta.blob_in_repo(&repo, &bd).map_err(store_err)? {
                    return self.link(&bd, s);
                }
            }
        }
        tessera_oci::copy_via_temp_file(self, from, digest, size)
    }

    fn staging_dir(&self) -> Option<PathBuf> {
        Some(self.staging.clone())
    }

    fn registry_location(&self) -> Option<(String, String)> {
        Some((LOCAL.to_string(), self.repo.clone()))
    }

    fn query_chunks(
        &self,
        ids: &[Digest],
    ) -> tessera_oci::Result<Option<Vec<Option<RemoteChunk>>>> {
        let hex: Vec<String> = ids.iter().map(|d| d.hex()).collect();
        let hits = self.reg.meta.chunks(&hex).map_err(store_err)?;
        let mut out = Vec::with_capacity(hits.len());
        for h in hits {
            let Some(h) = h else {
                out.push(None);
                continue;
            };
            let pack: Digest = match h.pack.parse() {
                Ok(p) => p,
                Err(_) => {
                    out.push(None);
                    continue;
                }
            };
            let bd = Self::bd(&pack);
            let mut found = None;
            // With auth, the pushing user may not read other repositories: reuse only packs
            // already in this one. Without auth every repository is readable by anyone.
            let candidates = if self.reg.auth.is_some() {
                vec![self.repo.clone()]
            } else {
                self.reg.meta.repos_with_blob(&h.pack).map_err(store_err)?
            };
            for repo in candidates {
                if let Some(size) = self.reg.meta.blob_in_repo(&repo, &bd).map_err(store_err)? {
                    found = Some((repo, size));
                    break;
                }
            }
            out.push(found.map(|(repository, pack_size)| RemoteChunk {
                pack,
                pack_size,
                repository,
                offset: h.offset,
                stored_len: h.stored_len,
                frame_len: h.frame_len,
                inner: h.inner,
                len: h.uncompressed_len,
                raw: h.flags & 1 == 1,
            }));
        }
        Ok(Some(out))
    }

    fn sibling(&self, repository: &str) -> Option<Box<dyn Store>> {
        Some(Box::new(LocalRepo::new(
            self.reg.clone(),
            repository,
            &self.staging,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tessera_digest_names_the_same_blob_in_the_registry() {
        let d = Digest::of(b"x");
        assert_eq!(LocalRepo::bd(&d).to_string(), d.to_string());
        assert_eq!(LocalRepo::bd(&d).sha256(), Some(d));
    }
}
