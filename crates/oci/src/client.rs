//! One async client for the OCI Distribution API, used by everything in tessera that
//! talks to a registry: the converter and the mount (through the blocking [`Store`]
//! facade in [`crate::registry`]), the registry's pull-through proxy and the benchmarks.
//!
//! * Authentication answers the registry's challenge: Basic with the credentials of
//!   [`crate::auth::CredentialSource`], or the bearer-token flow (anonymous, or with those
//!   credentials), tokens cached by scope. A 401 on any request — a long blob `PUT`
//!   included, whose body is re-read from its file — gets a fresh token and one resend.
//! * Retries with exponential backoff only where an answer can be transient: connection
//!   failures, timeouts, 408, 429 (honouring `Retry-After`), 500, 502, 503 and 504. Never
//!   on 400, 404, 416 or any other answer, which are the caller's to read.
//! * Credentials are sent only to the registry's own host (and to the token realm it
//!   names), never to an upload `Location` on another host.
//!
//! [`Store`]: crate::Store

use crate::auth::{parse_token_answer, Challenge, CredentialSource, Credentials, TokenCache};
use crate::manifest::ImageIndex;
use crate::{OciError, RawManifest, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE,
    LOCATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tessera_format::{media, Digest};

/// Largest manifest (or referrers index) accepted from a registry.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// Every manifest media type a client of ours asks for.
pub use tessera_format::media::ACCEPT_MANIFESTS;

/// Longest a read of a response may wait for its next bytes: a hung registry must not
/// hang a lazy mount's reader, and a slow link must not fail a long download (so no
/// limit on a whole transfer: a range answered by a whole pack is read to its end).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Most pages of a referrers listing followed (`Link: <..>; rel="next"`).
const MAX_REFERRER_PAGES: usize = 64;

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `USER:PASSWORD` for every registry (overrides the docker config).
    pub creds: Option<String>,
    /// Path of a docker `config.json` or its directory (default `$DOCKER_CONFIG`, then
    /// `~/.docker`); its `auths`, `credsStore` and `credHelpers` are used.
    pub docker_config: Option<PathBuf>,
    /// Retries of a transiently failed request (default 3).
    pub retries: Option<u32>,
}

/// Backoff between attempts: 200 ms doubling, at most 5 s; `Retry-After` up to 10 s.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub retries: u32,
    pub first: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 3,
            first: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self
            .first
            .saturating_mul(1 << attempt.min(16))
            .min(self.max);
        match retry_after {
            Some(r) => r.min(Duration::from_secs(10)),
            None => backoff,
        }
    }
}

/// Whether an HTTP status may be answered differently if asked again.
pub fn is_transient_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

fn is_transient_error(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || (e.is_request() && !e.is_builder())
}

pub(crate) fn http_err(e: reqwest::Error) -> OciError {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    OciError::Http(s)
}

/// A request body that can be sent again (after a 401 or a transient failure).
#[derive(Debug, Clone)]
pub enum Body {
    Empty,
    Bytes(Bytes),
    /// A file's whole content, re-read from the start on every attempt.
    File {
        path: PathBuf,
        len: u64,
    },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    async fn to_reqwest(&self) -> Result<reqwest::Body> {
        Ok(match self {
            Body::Empty => reqwest::Body::from(Bytes::new()),
            Body::Bytes(b) => reqwest::Body::from(b.clone()),
            Body::File { path, .. } => {
                let f = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| OciError::io(format!("opening {}", path.display()), e))?;
                reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                    f,
                    256 << 10,
                ))
            }
        })
    }
}

/// One request, described so that it can be sent again.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Body,
    /// The token scope, e.g. `repository:a/b:pull`.
    pub scope: String,
    pub timeout: Option<Duration>,
}

impl Request {
    pub fn new(method: Method, url: impl Into<String>, scope: impl Into<String>) -> Request {
        Request {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: Body::Empty,
            scope: scope.into(),
            timeout: None,
        }
    }

    pub fn header(mut self, name: HeaderName, value: &str) -> Result<Request> {
        let v = HeaderValue::from_str(value)
            .map_err(|_| OciError::Http(format!("invalid {name} header value {value:?}")))?;
        self.headers.push((name, v));
        Ok(self)
    }

    pub fn body(mut self, body: Body) -> Request {
        self.body = body;
        self
    }

    pub fn timeout(mut self, t: Duration) -> Request {
        self.timeout = Some(t);
        self
    }
}

/// `repository:REPO:ACTIONS`.
pub fn repo_scope(repo: &str, push: bool) -> String {
    format!(
        "repository:{repo}:{}",
        if push { "pull,push" } else { "pull" }
    )
}

/// What a `Range` request got.
pub enum RangeAnswer {
    /// 206: exactly the bytes asked for.
    Partial(Bytes),
    /// 200: the registry ignored `Range` and sends the whole blob.
    Whole(Response),
}

/// A client of one registry host.
pub struct Client {
    http: reqwest::Client,
    /// `host[:port]` as requests name it.
    host: String,
    /// `scheme://host[:port]`.
    origin: String,
    creds: Option<Credentials>,
    tokens: TokenCache,
    /// The registry asked for Basic auth: send it with every request.
    basic: AtomicBool,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("origin", &self.origin)
            .field("creds", &self.creds)
            .finish()
    }
}

impl Client {
    /// A client of `host` (`name[:port]`), over HTTPS unless `plain_http`. Credentials
    /// are looked up once, here; a broken credential helper is logged and the client
    /// goes on anonymously.
    pub fn new(host: &str, plain_http: bool, opts: &ClientOptions) -> Result<Client> {
        let explicit = match &opts.creds {
            Some(c) => Some(Credentials::parse(c).ok_or_else(|| {
                OciError::Reference("--creds".into(), "must be USER:PASSWORD".into())
            })?),
            None => None,
        };
        let source = CredentialSource {
            explicit,
            docker_config: opts.docker_config.clone(),
        };
        let creds = match source.lookup(host) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(host, error = %e, "no credentials: going on anonymously");
                None
            }
        };
        Self::with_credentials(host, plain_http, creds, opts.retries)
    }

    /// A client with these credentials (None: anonymous), e.g. a proxy's upstream.
    pub fn with_credentials(
        host: &str,
        plain_http: bool,
        creds: Option<Credentials>,
        retries: Option<u32>,
    ) -> Result<Client> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("tessera/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(READ_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(http_err)?;
        let scheme = if plain_http { "http" } else { "https" };
        let mut retry = RetryPolicy::default();
        if let Some(r) = retries {
            retry.retries = r;
        }
        Ok(Client {
            http,
            host: host.to_string(),
            origin: format!("{scheme}://{host}"),
            creds,
            tokens: TokenCache::default(),
            basic: AtomicBool::new(false),
            retry,
        })
    }

    /// A client for a base URL such as `https://registry-1.docker.io` (a proxy's upstream).
    pub fn for_url(url: &str, creds: Option<Credentials>) -> Result<Client> {
        let u = reqwest::Url::parse(url)
            .map_err(|e| OciError::Reference(url.to_string(), e.to_string()))?;
        let host = match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => return Err(OciError::Reference(url.to_string(), "no host".into())),
        };
        Self::with_credentials(&host, u.scheme() == "http", creds, None)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// `scheme://host/v2/REPO`.
    pub fn repo_url(&self, repo: &str) -> String {
        format!("{}/v2/{repo}", self.origin)
    }

    /// Whether `url` is on this registry's host (credentials go nowhere else).
    fn same_host(&self, url: &reqwest::Url) -> bool {
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => return false,
        };
        host == self.host
    }

    fn auth_header(&self, scope: &str) -> Option<String> {
        if let Some(t) = self.tokens.get(scope) {
            return Some(format!("Bearer {t}"));
        }
        if self.basic.load(Ordering::Relaxed) {
            return self.creds.as_ref().map(Credentials::basic_header);
        }
        None
    }

    async fn build(&self, req: &Request) -> Result<reqwest::Request> {
        let mut b = self
            .http
            .request(req.method.clone(), &req.url)
            .body(req.body.to_reqwest().await?);
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        if !matches!(req.body, Body::Empty)
            || req.method == Method::PUT
            || req.method == Method::POST
        {
            b = b.header(CONTENT_LENGTH, req.body.len());
        }
        if let Some(t) = req.timeout {
            b = b.timeout(t);
        }
        let mut r = b.build().map_err(http_err)?;
        if let Some(a) = self.auth_header(&req.scope) {
            if self.same_host(r.url()) {
                let v = HeaderValue::from_str(&a)
                    .map_err(|_| OciError::Http("credentials are not a valid header".into()))?;
                r.headers_mut().insert(AUTHORIZATION, v);
            }
        }
        Ok(r)
    }

    /// Send `req`: authenticate when challenged, retry what may be transient. Returns
    /// any answer but 401/403 (those are [`OciError::Unauthorized`]).
    pub async fn send(&self, req: &Request) -> Result<Response> {
        let mut attempt = 0u32;
        let mut authenticated = false;
        loop {
            let r = self.build(req).await?;
            let resp = match self.http.execute(r).await {
                Ok(resp) => resp,
                Err(e) if is_transient_error(&e) && attempt < self.retry.retries => {
                    tracing::debug!(url = %req.url, error = %e, attempt, "retrying");
                    tokio::time::sleep(self.retry.delay(attempt, None)).await;
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(http_err(e)),
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !authenticated {
                authenticated = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                self.tokens.forget(&req.scope);
                match challenge {
                    Some(c) => self.answer(&c, &req.scope).await?,
                    None => return Err(self.unauthorized(401)),
                }
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(self.unauthorized(status.as_u16()));
            }
            if is_transient_status(status) && attempt < self.retry.retries {
                let after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                tracing::debug!(url = %req.url, %status, attempt, "retrying");
                tokio::time::sleep(self.retry.delay(attempt, after)).await;
                attempt += 1;
                continue;
            }
            return Ok(resp);
        }
    }

    fn unauthorized(&self, status: u16) -> OciError {
        OciError::Unauthorized {
            host: self.host.clone(),
            status,
        }
    }

    /// Answer a challenge for `scope`: remember Basic, or get a bearer token.
    async fn answer(&self, c: &Challenge, scope: &str) -> Result<()> {
        if c.is_basic() {
            if self.creds.is_none() {
                return Err(self.unauthorized(401));
            }
            self.basic.store(true, Ordering::Relaxed);
            return Ok(());
        }
        if !c.is_bearer() {
            return Err(OciError::Registry(format!(
                "{} asks for {} authentication, which tessera does not speak",
                self.host, c.scheme
            )));
        }
        let realm = c
            .param("realm")
            .ok_or_else(|| OciError::Registry("bearer challenge without realm".into()))?;
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(s) = c.param("service") {
            query.push(("service", s.to_string()));
        }
        // The challenge's scope is what the registry wants for this request (it may
        // name two repositories for a cross-repository mount); ours otherwise.
        let wanted = c.param("scope").unwrap_or(scope);
        for s in wanted.split(' ').filter(|s| !s.is_empty()) {
            query.push(("scope", s.to_string()));
        }
        let mut attempt = 0u32;
        let resp = loop {
            let mut b = self.http.get(realm).query(&query);
            if let Some(cr) = &self.creds {
                b = b.basic_auth(&cr.username, Some(&cr.password));
            }
            match b.send().await {
                Ok(r) if is_transient_status(r.status()) && attempt < self.retry.retries => {}
                Ok(r) => break r,
                Err(e) if is_transient_error(&e) && attempt < self.retry.retries => {}
                Err(e) => return Err(http_err(e)),
            }
            tokio::time::sleep(self.retry.delay(attempt, None)).await;
            attempt += 1;
        };
        if !resp.status().is_success() {
            return Err(self.unauthorized(resp.status().as_u16()));
        }
        let body = resp.bytes().await.map_err(http_err)?;
        let (token, life) = parse_token_answer(&body).ok_or_else(|| {
            OciError::Registry(format!("token server {realm} answered without a token"))
        })?;
        self.tokens.put(scope, &token, life);
        Ok(())
    }

    /// The error for an unsuccessful answer to a request about `what`.
    pub async fn error_of(&self, what: &str, resp: Response) -> OciError {
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let detail: String = String::from_utf8_lossy(&body).chars().take(400).collect();
        match status {
            StatusCode::NOT_FOUND => OciError::NotFound(format!("{what} on {}", self.host)),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => self.unauthorized(status.as_u16()),
            _ => OciError::Registry(format!("{what}: {status} {}", detail.trim())),
        }
    }

    /// GET a manifest by tag or digest (verified when named by digest).
    pub async fn manifest(&self, repo: &str, reference: &str) -> Result<RawManifest> {
        let url = format!("{}/manifests/{reference}", self.repo_url(repo));
        let req = Request::new(Method::GET, url, repo_scope(repo, false))
            .header(ACCEPT, ACCEPT_MANIFESTS)?;
        let resp = self.send(&req).await?;
        if !resp.status().is_success() {
            return Err(self
                .error_of(&format!("manifest {repo}:{reference}"), resp)
                .await);
        }
        let ct = header_str(resp.headers(), CONTENT_TYPE.as_str());
        let bytes = read_bounded(resp, MAX_MANIFEST, &format!("manifest {reference}")).await?;
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
            bytes: bytes.to_vec(),
            media_type,
            digest,
        })
    }

    /// PUT a manifest under `reference` (a tag or its digest); the successful answer.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Response> {
        let url = format!("{}/manifests/{reference}", self.repo_url(repo));
        let req = Request::new(Method::PUT, url, repo_scope(repo, true))
            .header(CONTENT_TYPE, media_type)?
            .body(Body::Bytes(Bytes::copy_from_slice(bytes)));
        let resp = self.send(&req).await?;
        if !resp.status().is_success() {
            return Err(self
                .error_of(&format!("pushing manifest {repo}:{reference}"), resp)
                .await);
        }
        Ok(resp)
    }

    /// GET a blob; the successful answer, whose body the caller streams and verifies.
    pub async fn blob(&self, repo: &str, digest: &str) -> Result<Response> {
        let url = format!("{}/blobs/{digest}", self.repo_url(repo));
        let resp = self
            .send(&Request::new(Method::GET, url, repo_scope(repo, false)))
            .await?;
        if !resp.status().is_success() {
            return Err(self.error_of(&format!("blob {digest}"), resp).await);
        }
        Ok(resp)
    }

    /// Bytes `offset..offset+len` of a blob (`len` > 0).
    pub async fn blob_range(
        &self,
        repo: &str,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<RangeAnswer> {
        let url = format!("{}/blobs/{digest}", self.repo_url(repo));
        let range = format!("bytes={}-{}", offset, offset + len.max(1) - 1);
        let req = Request::new(Method::GET, url, repo_scope(repo, false)).header(RANGE, &range)?;
        let resp = self.send(&req).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let b = read_bounded(resp, len, &format!("range of blob {digest}")).await?;
                if b.len() as u64 != len {
                    return Err(OciError::Registry(format!(
                        "short range read of {digest}: {} of {len} bytes",
                        b.len()
                    )));
                }
                Ok(RangeAnswer::Partial(b))
            }
            s if s.is_success() => Ok(RangeAnswer::Whole(resp)),
            _ => Err(self
                .error_of(&format!("range of blob {digest}"), resp)
                .await),
        }
    }

    pub async fn has_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let url = format!("{}/blobs/{digest}", self.repo_url(repo));
        let resp = self
            .send(&Request::new(Method::HEAD, url, repo_scope(repo, false)))
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.error_of(&format!("HEAD blob {digest}"), resp).await),
        }
    }

    /// Upload a blob unless the registry has it (monolithic: POST, then PUT).
    pub async fn push_blob(&self, repo: &str, digest: &Digest, body: Body) -> Result<()> {
        if self.has_blob(repo, digest).await? {
            return Ok(());
        }
        let url = format!("{}/blobs/uploads/", self.repo_url(repo));
        let resp = self
            .send(&Request::new(Method::POST, url, repo_scope(repo, true)))
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.error_of("starting an upload", resp).await);
        }
        let loc = header_str(resp.headers(), LOCATION.as_str())
            .ok_or_else(|| OciError::Registry("upload answer without Location".into()))?;
        let url = self.upload_url(&loc);
        let sep = if url.contains('?') { '&' } else { '?' };
        let req = Request::new(
            Method::PUT,
            format!("{url}{sep}digest={digest}"),
            repo_scope(repo, true),
        )
        .header(CONTENT_TYPE, "application/octet-stream")?
        .body(body);
        let resp = self.send(&req).await?;
        if !resp.status().is_success() {
            return Err(self
                .error_of(&format!("uploading blob {digest}"), resp)
                .await);
        }
        Ok(())
    }

    /// Mount a blob from another repository of this registry; false when the registry
    /// started an ordinary upload instead.
    pub async fn mount_blob(&self, repo: &str, digest: &Digest, from: &str) -> Result<bool> {
        let url = format!(
            "{}/blobs/uploads/?mount={digest}&from={from}",
            self.repo_url(repo)
        );
        let scope = format!("{} repository:{from}:pull", repo_scope(repo, true));
        let resp = self.send(&Request::new(Method::POST, url, scope)).await?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    fn upload_url(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.origin)
        }
    }

    /// The referrers of `subject` (OCI 1.1 API, every page); None when the registry has
    /// no referrers API (the caller then reads the fallback tag).
    pub async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<ImageIndex>> {
        let mut url = format!("{}/referrers/{subject}", self.repo_url(repo));
        if let Some(t) = artifact_type {
            url.push_str("?artifactType=");
            url.push_str(&t.replace('+', "%2B"));
        }
        let mut all: Option<ImageIndex> = None;
        for _ in 0..MAX_REFERRER_PAGES {
            let req = Request::new(Method::GET, url.clone(), repo_scope(repo, false))
                .header(ACCEPT, media::OCI_INDEX)?;
            let resp = self.send(&req).await?;
            match resp.status() {
                s if s.is_success() => {}
                StatusCode::NOT_FOUND
                | StatusCode::METHOD_NOT_ALLOWED
                | StatusCode::BAD_REQUEST
                | StatusCode::NOT_IMPLEMENTED
                    if all.is_none() =>
                {
                    return Ok(None)
                }
                _ => {
                    return Err(self
                        .error_of(&format!("referrers of {subject}"), resp)
                        .await)
                }
            }
            let next = next_link(resp.headers()).map(|l| self.upload_url(&l));
            let bytes = read_bounded(resp, MAX_MANIFEST, "referrers").await?;
            let page: ImageIndex = serde_json::from_slice(&bytes)
                .map_err(|e| OciError::Manifest(format!("referrers of {subject}: {e}")))?;
            match &mut all {
                None => all = Some(page),
                Some(a) => a.manifests.extend(page.manifests),
            }
            match next {
                Some(n) => url = n,
                None => return Ok(all),
            }
        }
        tracing::warn!(%subject, "referrers listing has more than {MAX_REFERRER_PAGES} pages; using the first");
        Ok(all)
    }
}

/// The target of `Link: <URL>; rel="next"`.
fn next_link(h: &HeaderMap) -> Option<String> {
    for v in h.get_all(reqwest::header::LINK) {
        let v = v.to_str().ok()?;
        for part in v.split(',') {
            let (target, params) = part.split_once(';')?;
            if params.replace(' ', "").contains("rel=\"next\"") || params.contains("rel=next") {
                let t = target.trim().strip_prefix('<')?.strip_suffix('>')?;
                return Some(t.to_string());
            }
        }
    }
    None
}

pub(crate) fn header_str(h: &HeaderMap, k: &str) -> Option<String> {
    h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The body of `resp`, refusing more than `max` bytes.
pub async fn read_bounded(resp: Response, max: u64, what: &str) -> Result<Bytes> {
    if let Some(n) = resp.content_length() {
        if n > max {
            return Err(OciError::Registry(format!(
                "{what} is {n} bytes, more than the {max} accepted"
            )));
        }
    }
    let mut out = bytes::BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(http_err)?;
        if out.len() as u64 + piece.len() as u64 > max {
            return Err(OciError::Registry(format!(
                "{what} is more than the {max} bytes accepted"
            )));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [200, 206, 400, 401, 403, 404, 405, 409, 416, 501] {
            assert!(
                !is_transient_status(StatusCode::from_u16(s).unwrap()),
                "{s}"
            );
        }
        let p = RetryPolicy::default();
        assert_eq!(p.delay(0, None), Duration::from_millis(200));
        assert_eq!(p.delay(2, None), Duration::from_millis(800));
        assert_eq!(p.delay(30, None), Duration::from_secs(5));
        assert_eq!(
            p.delay(0, Some(Duration::from_secs(99))),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn link_header() {
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            HeaderValue::from_static(r#"</v2/a/referrers/sha256:x?n=2&last=b>; rel="next""#),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("/v2/a/referrers/sha256:x?n=2&last=b")
        );
        assert_eq!(next_link(&HeaderMap::new()), None);
    }

    #[test]
    fn credentials_stay_on_the_registry_host() {
        let c = Client::with_credentials(
            "127.0.0.1:5000",
            true,
            Some(Credentials::new("u", "p")),
            None,
        )
        .unwrap();
        c.basic.store(true, Ordering::Relaxed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let on = rt
            .block_on(c.build(&Request::new(
                Method::GET,
                "http://127.0.0.1:5000/v2/a/b/blobs/uploads/x",
                "s",
            )))
            .unwrap();
        assert_eq!(
            on.headers()[AUTHORIZATION],
            Credentials::new("u", "p").basic_header()
        );
        let off = rt
            .block_on(c.build(&Request::new(
                Method::PUT,
                "http://elsewhere.example:9000/upload/x",
                "s",
            )))
            .unwrap();
        assert!(off.headers().get(AUTHORIZATION).is_none());
    }
}
