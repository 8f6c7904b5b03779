//! The [`Store`] of one repository on a registry: a blocking facade over the async
//! [`Client`](crate::client::Client), for the synchronous converter, unpacker and mount.
//! Every call runs on one process-wide runtime ([`runtime`]); callers must not be
//! async tasks themselves (from async code use the client directly, or
//! `spawn_blocking`).

use crate::client::{repo_scope, Body, Client, RangeAnswer, Request};
use crate::verify::VerifyingReader;
use crate::{OciError, RawManifest, Result, Store};
use futures_util::StreamExt;
use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, StatusCode};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use tessera_format::{media, Digest};

pub use crate::client::ClientOptions;

/// The runtime that drives every blocking registry call of this process: two worker
/// threads for the connections' I/O; the calling thread runs its own request.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-http")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            // Creating two threads and an epoll instance fails only when the process is
            // out of threads or descriptors; nothing can run without them.
            Err(e) => panic!("cannot start the HTTP runtime: {e}"),
        }
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// One repository on one registry.
pub struct Registry {
    client: Arc<Client>,
    repo: String,
    /// Whether the registry answers the tessera chunk query (learned on first use).
    chunk_index: Arc<Mutex<Option<bool>>>,
}

impl Registry {
    /// `host` is the API host (see [`crate::ImageRef::api_host`]).
    pub fn new(host: &str, repo: &str, plain_http: bool, opts: &ClientOptions) -> Result<Registry> {
        Ok(Registry {
            client: Arc::new(Client::new(host, plain_http, opts)?),
            repo: repo.to_string(),
            chunk_index: Arc::new(Mutex::new(None)),
        })
    }

    /// The same registry, client and credentials, another repository.
    pub fn with_repo(&self, repo: &str) -> Registry {
        Registry {
            client: self.client.clone(),
            repo: repo.to_string(),
            chunk_index: self.chunk_index.clone(),
        }
    }

    /// The async client under this store.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    fn host(&self) -> &str {
        self.client.host()
    }
}

/// The OCI 1.1 referrers fallback tag of a subject: `sha256-<hex>`.
fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

fn parse_index(bytes: &[u8], what: &str) -> Result<crate::manifest::ImageIndex> {
    serde_json::from_slice(bytes).map_err(|e| OciError::Manifest(format!("{what}: {e}")))
}

impl Registry {
    /// The index under the referrers fallback tag of `subject`, if there is one.
    fn fallback_referrers(&self, subject: &Digest) -> Result<Option<crate::manifest::ImageIndex>> {
        match self.manifest(&fallback_tag(subject)) {
            Ok(m) => Ok(Some(parse_index(&m.bytes, "referrers fallback tag")?)),
            Err(OciError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Store for Registry {
    fn describe(&self) -> String {
        format!("{}/{}", self.host(), self.repo)
    }

    fn registry_location(&self) -> Option<(String, String)> {
        Some((self.host().to_string(), self.repo.clone()))
    }

    fn manifest(&self, reference: &str) -> Result<RawManifest> {
        let reference = if reference.is_empty() {
            "latest"
        } else {
            reference
        };
        block_on(self.client.manifest(&self.repo, reference))
    }

    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>> {
        let resp = block_on(self.client.blob(&self.repo, &digest.to_string()))?;
        Ok(Box::new(VerifyingReader::new(
            body_reader(resp),
            *digest,
            size,
            format!("blob {digest}"),
        )))
    }

    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        match block_on(self.client.blob_range(&self.repo, digest, offset, len))? {
            RangeAnswer::Partial(b) => Ok(b.to_vec()),
            RangeAnswer::Whole(resp) => {
                // The registry ignored Range: skip to the offset (a reader of many
                // ranges uses `read_range_or_whole` and keeps the whole blob instead).
                let mut r = body_reader(resp);
                std::io::copy(&mut (&mut r).take(offset), &mut std::io::sink())
                    .map_err(|e| OciError::io("reading a blob", e))?;
                let mut buf = Vec::with_capacity(len as usize);
                r.take(len)
                    .read_to_end(&mut buf)
                    .map_err(|e| OciError::io("reading a blob", e))?;
                if buf.len() as u64 != len {
                    return Err(OciError::Registry(format!(
                        "short range read of {digest}: {} of {len} bytes",
                        buf.len()
                    )));
                }
                Ok(buf)
            }
        }
    }

    fn read_range_or_whole(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        size: u64,
    ) -> Result<crate::RangeRead> {
        if len == 0 {
            return Ok(crate::RangeRead::Range(Vec::new()));
        }
        match block_on(self.client.blob_range(&self.repo, digest, offset, len))? {
            RangeAnswer::Partial(b) => Ok(crate::RangeRead::Range(b.to_vec())),
            RangeAnswer::Whole(resp) => {
                tracing::warn!(
                    registry = %self.host(),
                    %digest,
                    "the registry ignores HTTP Range requests: reading the whole blob"
                );
                Ok(crate::RangeRead::Whole(Box::new(VerifyingReader::new(
                    body_reader(resp),
                    *digest,
                    size,
                    format!("blob {digest}"),
                ))))
            }
        }
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool> {
        block_on(self.client.has_blob(&self.repo, digest))
    }

    fn put_blob_file(&self, digest: &Digest, size: u64, path: &Path) -> Result<()> {
        let body = Body::File {
            path: path.to_path_buf(),
            len: size,
        };
        block_on(self.client.push_blob(&self.repo, digest, body))
    }

    fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let body = Body::Bytes(bytes::Bytes::copy_from_slice(bytes));
        block_on(self.client.push_blob(&self.repo, digest, body))
    }

    fn put_manifest(&self, tag: Option<&str>, bytes: &[u8], media_type: &str) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let reference = tag
            .map(str::to_string)
            .unwrap_or_else(|| digest.to_string());
        block_on(
            self.client
                .put_manifest(&self.repo, &reference, bytes, media_type),
        )?;
        Ok(digest)
    }

    fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<crate::manifest::Descriptor>> {
        let index = match block_on(
            self.client
                .referrers(&self.repo, subject, Some(artifact_type)),
        )? {
            Some(i) => Some(i),
            // No referrers API (a registry before OCI 1.1): the fallback tag.
            None => self.fallback_referrers(subject)?,
        };
        // The registry may ignore the filter; apply it here too.
        Ok(index
            .map(|i| i.manifests)
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.artifact_type.as_deref() == Some(artifact_type))
            .collect())
    }

    fn put_referrer(
        &self,
        bytes: &[u8],
        media_type: &str,
        artifact_type: &str,
        subject: &crate::manifest::Descriptor,
    ) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let resp =
            block_on(
                self.client
                    .put_manifest(&self.repo, &digest.to_string(), bytes, media_type),
            )?;
        if resp.headers().contains_key("oci-subject") {
            return Ok(digest);
        }
        // The registry does not index referrers: add this one to the fallback tag's index.
        let subject_digest = subject.sha256()?;
        let mut index =
            self.fallback_referrers(&subject_digest)?
                .unwrap_or(crate::manifest::ImageIndex {
                    schema_version: 2,
                    media_type: Some(media::OCI_INDEX.into()),
                    artifact_type: None,
                    manifests: Vec::new(),
                    subject: None,
                    annotations: Default::default(),
                });
        if !index
            .manifests
            .iter()
            .any(|d| d.digest == digest.to_string())
        {
            let mut d = crate::manifest::Descriptor::new(media_type, &digest, bytes.len() as u64);
            d.artifact_type = Some(artifact_type.to_string());
            // As the referrers API would list it: with the manifest's annotations.
            if let Ok(m) = serde_json::from_slice::<crate::manifest::ImageManifest>(bytes) {
                d.annotations = m.annotations;
            }
            index.manifests.push(d);
        }
        let body = crate::manifest::to_bytes(&index)?;
        self.put_manifest(
            Some(&fallback_tag(&subject_digest)),
            &body,
            media::OCI_INDEX,
        )?;
        Ok(digest)
    }

    fn query_chunks(&self, ids: &[Digest]) -> Result<Option<Vec<Option<crate::RemoteChunk>>>> {
        let known = |v: Option<bool>| {
            *self.chunk_index.lock().unwrap_or_else(|p| p.into_inner()) = v;
        };
        if *self.chunk_index.lock().unwrap_or_else(|p| p.into_inner()) == Some(false) {
            return Ok(None);
        }
        let url = format!("{}/tessera/v1/chunks", self.client.origin());
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(20_000) {
            let body = serde_json::json!({
                "chunks": batch.iter().map(|d| d.hex()).collect::<Vec<_>>()
            })
            .to_string();
            let req = Request::new(Method::POST, url.clone(), repo_scope(&self.repo, true))
                .header(CONTENT_TYPE, "application/json")?
                .body(Body::Bytes(body.into()));
            let answer = block_on(async {
                let resp = self.client.send(&req).await?;
                let status = resp.status();
                if !status.is_success() {
                    return Ok((status, None));
                }
                let b = crate::client::read_bounded(resp, 64 << 20, "chunk query answer").await?;
                Ok::<_, OciError>((status, Some(b)))
            })?;
            let bytes = match answer {
                (StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED, _) => {
                    // Any other registry: no chunk index. Remember, ask no more.
                    tracing::debug!("registry has no tessera chunk index");
                    known(Some(false));
                    return Ok(None);
                }
                (status, None) => {
                    // A tessera registry that could not answer this time: convert without it.
                    tracing::warn!(%status, "chunk index query failed; uploading these chunks");
                    return Ok(None);
                }
                (_, Some(b)) => b,
            };
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| OciError::Http(format!("chunk query answer: {e}")))?;
            let answers = v
                .get("chunks")
                .and_then(|c| c.as_array())
                .filter(|a| a.len() == batch.len())
                .ok_or_else(|| OciError::Http("chunk query answer has the wrong shape".into()))?;
            for a in answers {
                out.push(parse_remote_chunk(a)?);
            }
        }
        known(Some(true));
        Ok(Some(out))
    }

    fn sibling(&self, repository: &str) -> Option<Box<dyn Store>> {
        Some(Box::new(self.with_repo(repository)))
    }

    fn copy_blob_from(&self, from: &dyn Store, digest: &Digest, size: u64) -> Result<()> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        if let Some((host, repo)) = from.registry_location() {
            if host == self.host() && block_on(self.client.mount_blob(&self.repo, digest, &repo))? {
                return Ok(());
            }
        }
        crate::copy_via_temp_file(self, from, digest, size)
    }
}

/// A blocking reader of a response body (bytes arrive on the runtime's threads).
fn body_reader(resp: reqwest::Response) -> impl Read + Send {
    let stream = resp
        .bytes_stream()
        .map(|r| r.map_err(std::io::Error::other));
    let reader = tokio_util::io::StreamReader::new(Box::pin(stream));
    tokio_util::io::SyncIoBridge::new_with_handle(reader, runtime().handle().clone())
}

fn parse_remote_chunk(v: &serde_json::Value) -> Result<Option<crate::RemoteChunk>> {
    if v.is_null() {
        return Ok(None);
    }
    let bad = |what: &str| OciError::Http(format!("chunk query answer: bad {what}"));
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).ok_or_else(|| bad(k));
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).ok_or_else(|| bad(k));
    let n32 = |k: &str| u32::try_from(n(k)?).map_err(|_| bad(k));
    let pack: Digest = s("pack")?.parse().map_err(|_| bad("pack"))?;
    let len = n32("uncompressed_len")?;
    // A registry that predates format v2 names no frame: the chunk is alone in it.
    let framed = v.get("frame_len").is_some();
    Ok(Some(crate::RemoteChunk {
        pack,
        pack_size: n("pack_size")?,
        repository: s("repository")?.to_string(),
        offset: n("offset")?,
        stored_len: n32("stored_len")?,
        frame_len: if framed { n32("frame_len")? } else { len },
        inner: if framed { n32("inner")? } else { 0 },
        len,
        raw: v
            .get("raw")
            .and_then(|x| x.as_bool())
            .ok_or_else(|| bad("raw"))?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tags() {
        let d = Digest::of(b"x");
        assert_eq!(fallback_tag(&d), format!("sha256-{}", d.hex()));
    }
}
