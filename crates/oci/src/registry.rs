//! A blocking client for the OCI Distribution API: manifests, blobs (whole and by
//! Range), monolithic uploads, cross-repository mounts, basic auth and the bearer-token
//! flow (anonymous or with credentials from `--creds` or `~/.docker/config.json`).

use crate::verify::VerifyingReader;
use crate::{OciError, RawManifest, Result, Store};
use base64::Engine as _;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RANGE, WWW_AUTHENTICATE,
};
use reqwest::StatusCode;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tessera_format::{media, Digest};

/// Largest manifest accepted from a registry.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// Longest a range read may take (ranges are at most a few MiB).
const RANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `USER:PASSWORD` for every registry (overrides docker config).
    pub creds: Option<String>,
    /// Path of a docker `config.json` (default `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
}

/// One repository on one registry.
pub struct Registry {
    http: Client,
    host: String,
    repo: String,
    base: String,
    basic: Option<(String, String)>,
    auth: Mutex<Option<String>>,
    /// `scheme://host`, for registry-wide endpoints.
    origin: String,
    /// Whether the registry answers the tessera chunk query (learned on first use).
    chunk_index: Mutex<Option<bool>>,
}

fn http_err(e: reqwest::Error) -> OciError {
    OciError::Http(format!("{e}{}", source_chain(&e)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Credentials for `host` from a docker config file.
fn docker_creds(host: &str, path: Option<&Path>) -> Option<(String, String)> {
    let p = match path {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?
            .join("config.json"),
    };
    let p = if p.is_dir() { p.join("config.json") } else { p };
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    let auths = v["auths"].as_object()?;
    for (k, a) in auths {
        let key = k
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .trim_end_matches("/v2");
        if key != host {
            continue;
        }
        if let (Some(u), Some(pw)) = (a["username"].as_str(), a["password"].as_str()) {
            return Some((u.to_string(), pw.to_string()));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a["auth"].as_str()?)
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, pw) = s.split_once(':')?;
        return Some((u.to_string(), pw.to_string()));
    }
    None
}

/// Parse `Bearer realm="..",service="..",scope=".."` into its scheme and parameters.
pub fn parse_challenge(h: &str) -> Option<(String, Vec<(String, String)>)> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_string();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_string(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.push((k, v));
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_string(), params))
}

impl Registry {
    pub fn new(host: &str, repo: &str, plain_http: bool, opts: &ClientOptions) -> Result<Registry> {
        let http = Client::builder()
            .user_agent(concat!("tessera/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .timeout(None)
            .build()
            .map_err(http_err)?;
        let basic = match &opts.creds {
            Some(c) => {
                let (u, p) = c.split_once(':').ok_or_else(|| {
                    OciError::Reference(c.clone(), "--creds must be USER:PASSWORD".into())
                })?;
                Some((u.to_string(), p.to_string()))
            }
            None => docker_creds(host, opts.docker_config.as_deref()),
        };
        let scheme = if plain_http { "http" } else { "https" };
        Ok(Registry {
            http,
            host: host.to_string(),
            repo: repo.to_string(),
            base: format!("{scheme}://{host}/v2/{repo}"),
            basic,
            auth: Mutex::new(None),
            origin: format!("{scheme}://{host}"),
            chunk_index: Mutex::new(None),
        })
    }

    /// The same registry and credentials, another repository.
    pub fn with_repo(&self, repo: &str) -> Registry {
        Registry {
            http: self.http.clone(),
            host: self.host.clone(),
            repo: repo.to_string(),
            base: format!("{}/v2/{repo}", self.origin),
            basic: self.basic.clone(),
            auth: Mutex::new(None),
            origin: self.origin.clone(),
            chunk_index: Mutex::new(*self.chunk_index.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// Whether `url` is on this registry's host (credentials never go anywhere else,
    /// e.g. to an upload Location on another host).
    fn same_host(&self, url: &reqwest::Url) -> bool {
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => return false,
        };
        host == self.host
    }

    /// Build the request and attach credentials when it goes to this registry.
    fn with_auth(
        &self,
        builder: RequestBuilder,
        auth: Option<String>,
    ) -> Result<reqwest::blocking::Request> {
        let mut req = builder.build().map_err(http_err)?;
        if let Some(a) = auth {
            if self.same_host(req.url()) {
                let v = reqwest::header::HeaderValue::from_str(&a)
                    .map_err(|e| OciError::Http(e.to_string()))?;
                req.headers_mut().insert(AUTHORIZATION, v);
            }
        }
        Ok(req)
    }

    fn current_auth(&self) -> Option<String> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Send a request, answering one authentication challenge if the registry asks.
    fn send(&self, build: &dyn Fn(&Client) -> RequestBuilder) -> Result<Response> {
        let req = self.with_auth(build(&self.http), self.current_auth())?;
        let resp = self.http.execute(req).map_err(http_err)?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let Some((scheme, params)) = challenge.as_deref().and_then(parse_challenge) else {
            return Err(OciError::Unauthorized {
                host: self.host.clone(),
                status: 401,
            });
        };
        let header = if scheme.eq_ignore_ascii_case("basic") {
            let (u, p) = self.basic.clone().ok_or(OciError::Unauthorized {
                host: self.host.clone(),
                status: 401,
            })?;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        } else {
            format!("Bearer {}", self.fetch_token(&params)?)
        };
        *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = Some(header.clone());
        let req = self.with_auth(build(&self.http), Some(header))?;
        let resp = self.http.execute(req).map_err(http_err)?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(OciError::Unauthorized {
                host: self.host.clone(),
                status: resp.status().as_u16(),
            });
        }
        Ok(resp)
    }

    fn fetch_token(&self, params: &[(String, String)]) -> Result<String> {
        let get = |k: &str| {
            params
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.clone())
        };
        let realm = get("realm")
            .ok_or_else(|| OciError::Registry("bearer challenge without realm".into()))?;
        let mut query: Vec<(String, String)> = Vec::new();
        if let Some(s) = get("service") {
            query.push(("service".into(), s));
        }
        let scope = get("scope").unwrap_or_else(|| format!("repository:{}:pull,push", self.repo));
        for s in scope.split(' ') {
            query.push(("scope".into(), s.to_string()));
        }
        let mut req = self.http.get(&realm).query(&query);
        if let Some((u, p)) = &self.basic {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().map_err(http_err)?;
        if !resp.status().is_success() {
            return Err(OciError::Unauthorized {
                host: self.host.clone(),
                status: resp.status().as_u16(),
            });
        }
        let v: serde_json::Value = resp.json().map_err(http_err)?;
        v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .map(str::to_string)
            .ok_or_else(|| OciError::Registry("token response without a token".into()))
    }

    fn error_of(&self, what: &str, resp: Response) -> OciError {
        let status = resp.status();
        let body = resp.text().unwrap_or_default();
        let detail: String = body.chars().take(400).collect();
        match status {
            StatusCode::NOT_FOUND => {
                OciError::NotFound(format!("{what} on {}/{}", self.host, self.repo))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OciError::Unauthorized {
                host: self.host.clone(),
                status: status.as_u16(),
            },
            _ => OciError::Registry(format!("{what}: {status} {detail}")),
        }
    }

    fn upload_url(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            let root = self.base.split("/v2/").next().unwrap_or(&self.base);
            format!("{root}{location}")
        }
    }

    fn start_upload(&self, query: &str) -> Result<Response> {
        let url = format!("{}/blobs/uploads/{query}", self.base);
        self.send(&|c| c.post(&url).header("Content-Length", "0"))
    }

    /// Start a monolithic upload unless the blob is already there; returns the PUT URL.
    fn begin_upload(&self, digest: &Digest) -> Result<Option<String>> {
        if self.has_blob(digest)? {
            return Ok(None);
        }
        let resp = self.start_upload("")?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.error_of("starting an upload", resp));
        }
        let loc = header_str(resp.headers(), LOCATION.as_str())
            .ok_or_else(|| OciError::Registry("upload without Location".into()))?;
        let url = self.upload_url(&loc);
        let sep = if url.contains('?') { '&' } else { '?' };
        Ok(Some(format!("{url}{sep}digest={digest}")))
    }
}

/// The OCI 1.1 referrers fallback tag of a subject: `sha256-<hex>`.
impl Registry {
    /// GET bytes `offset..offset+len` of a blob: a successful answer, 206 or (from a
    /// registry that ignores `Range`) 200 with the whole blob.
    fn range_request(&self, digest: &Digest, offset: u64, len: u64) -> Result<Response> {
        let url = format!("{}/blobs/{digest}", self.base);
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        // A hung registry must not hang the reader (lazy mounts retry on errors).
        let resp = self.send(&|c| {
            c.get(&url)
                .header(RANGE, range.as_str())
                .timeout(RANGE_TIMEOUT)
        })?;
        if !resp.status().is_success() {
            return Err(self.error_of(&format!("range of blob {digest}"), resp));
        }
        Ok(resp)
    }
}

fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

fn parse_index(bytes: &[u8], what: &str) -> Result<crate::manifest::ImageIndex> {
    serde_json::from_slice(bytes).map_err(|e| OciError::Manifest(format!("{what}: {e}")))
}

impl Registry {
    /// PUT a manifest under `reference` (a tag or its digest); the successful answer.
    fn send_manifest(&self, reference: &str, bytes: &[u8], media_type: &str) -> Result<Response> {
        let url = format!("{}/manifests/{reference}", self.base);
        let owned = bytes.to_vec();
        let resp = self.send(&|c| {
            c.put(&url)
                .header(CONTENT_TYPE, media_type)
                .body(owned.clone())
        })?;
        if !resp.status().is_success() {
            return Err(self.error_of(&format!("pushing manifest {reference}"), resp));
        }
        Ok(resp)
    }

    /// The index under the referrers fallback tag of `subject`, if there is one.
    fn fallback_referrers(&self, subject: &Digest) -> Result<Option<crate::manifest::ImageIndex>> {
        match self.manifest(&fallback_tag(subject)) {
            Ok(m) => Ok(Some(parse_index(&m.bytes, "referrers fallback tag")?)),
            Err(OciError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn header_str(h: &HeaderMap, k: &str) -> Option<String> {
    h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string)
}

const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

impl Store for Registry {
    fn describe(&self) -> String {
        format!("{}/{}", self.host, self.repo)
    }

    fn registry_location(&self) -> Option<(String, String)> {
        Some((self.host.clone(), self.repo.clone()))
    }

    fn manifest(&self, reference: &str) -> Result<RawManifest> {
        let reference = if reference.is_empty() {
            "latest"
        } else {
            reference
        };
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self.send(&|c| c.get(&url).header(ACCEPT, ACCEPT_MANIFESTS))?;
        if !resp.status().is_success() {
            return Err(self.error_of(&format!("manifest {reference}"), resp));
        }
        let ct = header_str(resp.headers(), "content-type");
        let mut bytes = Vec::new();
        resp.take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| OciError::io("reading a manifest", e))?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(OciError::Manifest(format!(
                "manifest {reference} is larger than {MAX_MANIFEST} bytes"
            )));
        }
        let digest = Digest::of(&bytes);
        if let Ok(want) = reference.parse::<Digest>() {
            if want != digest {
                return Err(OciError::DigestMismatch {
                    what: format!("manifest {reference}"),
                    expected: want.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let media_type = match ct {
            Some(ct) if ct.starts_with("application/vnd.") => {
                ct.split(';').next().unwrap_or_default().trim().to_string()
            }
            _ => crate::layout::sniff_media_type(&bytes),
        };
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.send(&|c| c.get(&url))?;
        if !resp.status().is_success() {
            return Err(self.error_of(&format!("blob {digest}"), resp));
        }
        Ok(Box::new(VerifyingReader::new(
            resp,
            *digest,
            size,
            format!("blob {digest}"),
        )))
    }

    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let resp = self.range_request(digest, offset, len)?;
        let mut buf = Vec::with_capacity(len as usize);
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            resp.take(len)
                .read_to_end(&mut buf)
                .map_err(|e| OciError::io("reading a blob range", e))?;
        } else {
            // The registry ignored Range: skip to the offset.
            let mut r = resp;
            std::io::copy(&mut (&mut r).take(offset), &mut std::io::sink())
                .map_err(|e| OciError::io("reading a blob", e))?;
            r.take(len)
                .read_to_end(&mut buf)
                .map_err(|e| OciError::io("reading a blob", e))?;
        }
        if buf.len() as u64 != len {
            return Err(OciError::Registry(format!(
                "short range read of {digest}: {} of {len} bytes",
                buf.len()
            )));
        }
        Ok(buf)
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
        let resp = self.range_request(digest, offset, len)?;
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            let mut buf = Vec::with_capacity(len as usize);
            resp.take(len)
                .read_to_end(&mut buf)
                .map_err(|e| OciError::io("reading a blob range", e))?;
            if buf.len() as u64 != len {
                return Err(OciError::Registry(format!(
                    "short range read of {digest}: {} of {len} bytes",
                    buf.len()
                )));
            }
            return Ok(crate::RangeRead::Range(buf));
        }
        Ok(crate::RangeRead::Whole(Box::new(VerifyingReader::new(
            resp,
            *digest,
            size,
            format!("blob {digest}"),
        ))))
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.send(&|c| c.head(&url))?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.error_of(&format!("HEAD blob {digest}"), resp)),
        }
    }

    fn put_blob_file(&self, digest: &Digest, size: u64, path: &Path) -> Result<()> {
        let Some(url) = self.begin_upload(digest)? else {
            return Ok(());
        };
        let f = std::fs::File::open(path)
            .map_err(|e| OciError::io(format!("opening {}", path.display()), e))?;
        // The file body is consumed once; authentication was settled by the POST.
        let builder = self
            .http
            .put(&url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::blocking::Body::sized(f, size));
        let req = self.with_auth(builder, self.current_auth())?;
        let resp = self.http.execute(req).map_err(http_err)?;
        if !resp.status().is_success() {
            return Err(self.error_of(&format!("uploading blob {digest}"), resp));
        }
        Ok(())
    }

    fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let Some(url) = self.begin_upload(digest)? else {
            return Ok(());
        };
        let resp = self.send(&|c| {
            c.put(&url)
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(bytes.to_vec())
        })?;
        if !resp.status().is_success() {
            return Err(self.error_of(&format!("uploading blob {digest}"), resp));
        }
        Ok(())
    }

    fn put_manifest(&self, tag: Option<&str>, bytes: &[u8], media_type: &str) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let reference = tag
            .map(str::to_string)
            .unwrap_or_else(|| digest.to_string());
        self.send_manifest(&reference, bytes, media_type)?;
        Ok(digest)
    }

    fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<crate::manifest::Descriptor>> {
        let url = format!("{}/referrers/{subject}", self.base);
        let resp = self.send(&|c| {
            c.get(&url)
                .query(&[("artifactType", artifact_type)])
                .header(ACCEPT, media::OCI_INDEX)
        })?;
        let index = match resp.status() {
            s if s.is_success() => {
                let mut bytes = Vec::new();
                resp.take(MAX_MANIFEST + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| OciError::io("reading referrers", e))?;
                Some(parse_index(&bytes, "referrers")?)
            }
            // No referrers API (a registry before OCI 1.1): the fallback tag.
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::BAD_REQUEST => {
                self.fallback_referrers(subject)?
            }
            _ => return Err(self.error_of(&format!("referrers of {subject}"), resp)),
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
        let resp = self.send_manifest(&digest.to_string(), bytes, media_type)?;
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
        if *self.chunk_index.lock().unwrap_or_else(|p| p.into_inner()) == Some(false) {
            return Ok(None);
        }
        let url = format!("{}/tessera/v1/chunks", self.origin);
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(20_000) {
            let body = serde_json::json!({
                "chunks": batch.iter().map(|d| d.hex()).collect::<Vec<_>>()
            })
            .to_string();
            let resp = self.send(&|c| {
                c.post(&url)
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })?;
            if resp.status() == StatusCode::NOT_FOUND
                || resp.status() == StatusCode::METHOD_NOT_ALLOWED
            {
                // Any other registry: no chunk index. Remember, ask no more.
                tracing::debug!(status = %resp.status(), "registry has no tessera chunk index");
                *self.chunk_index.lock().unwrap_or_else(|p| p.into_inner()) = Some(false);
                return Ok(None);
            }
            if !resp.status().is_success() {
                // A tessera registry that could not answer this time: convert without it.
                tracing::warn!(status = %resp.status(), "chunk index query failed; uploading these chunks");
                return Ok(None);
            }
            let v: serde_json::Value = resp
                .json()
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
        *self.chunk_index.lock().unwrap_or_else(|p| p.into_inner()) = Some(true);
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
            if host == self.host {
                let resp = self.start_upload(&format!("?mount={digest}&from={repo}"))?;
                if resp.status() == StatusCode::CREATED {
                    return Ok(());
                }
            }
        }
        crate::copy_via_temp_file(self, from, digest, size)
    }
}

fn parse_remote_chunk(v: &serde_json::Value) -> Result<Option<crate::RemoteChunk>> {
    if v.is_null() {
        return Ok(None);
    }
    let bad = |what: &str| OciError::Http(format!("chunk query answer: bad {what}"));
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).ok_or_else(|| bad(k));
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).ok_or_else(|| bad(k));
    let pack: Digest = s("pack")?.parse().map_err(|_| bad("pack"))?;
    Ok(Some(crate::RemoteChunk {
        pack,
        pack_size: n("pack_size")?,
        repository: s("repository")?.to_string(),
        offset: n("offset")?,
        stored_len: u32::try_from(n("stored_len")?).map_err(|_| bad("stored_len"))?,
        len: u32::try_from(n("uncompressed_len")?).map_err(|_| bad("uncompressed_len"))?,
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
    fn challenge_parsing() {
        let (s, p) = parse_challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#).unwrap();
        assert_eq!(s, "Bearer");
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull,push".into()));
        let (s, p) = parse_challenge(r#"Basic realm="x""#).unwrap();
        assert_eq!(s, "Basic");
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn credentials_stay_on_the_registry_host() {
        let r = Registry::new("127.0.0.1:5000", "a/b", true, &ClientOptions::default()).unwrap();
        let on = r
            .with_auth(
                r.http.get("http://127.0.0.1:5000/v2/a/b/blobs/uploads/x"),
                Some("Bearer t".into()),
            )
            .unwrap();
        assert_eq!(on.headers()[AUTHORIZATION], "Bearer t");
        let off = r
            .with_auth(
                r.http.put("http://elsewhere.example:9000/upload/x"),
                Some("Bearer t".into()),
            )
            .unwrap();
        assert!(off.headers().get(AUTHORIZATION).is_none());
    }

    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("me:secret");
        std::fs::write(
            &p,
            format!(r#"{{"auths":{{"https://reg.example:5000":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        assert_eq!(
            docker_creds("reg.example:5000", Some(&p)),
            Some(("me".into(), "secret".into()))
        );
        assert_eq!(docker_creds("other", Some(&p)), None);
    }
}
