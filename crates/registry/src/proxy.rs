//! Pull-through caching. A repository `NAME/REPO` (or any repository requested with
//! `?ns=NAME`, as containerd sends) is served from upstream `NAME`: manifests are fetched
//! and verified on first use and re-checked with HEAD after the tag TTL (served from cache
//! when the upstream is down); blobs are downloaded once however many clients ask at the
//! same time, streamed to all of them as the bytes arrive, verified, and only then
//! committed. A broken transfer caches nothing and fails every waiting client.
//!
//! Upstream credentials (configured per upstream) are used only towards that upstream;
//! client credentials are never forwarded.

use crate::api::{blob_body, Shared};
use crate::config::UpstreamConfig;
use crate::error::{ApiError, Code, StoreError};
use crate::meta::{ManifestMeta, Meta};
use crate::names::{BlobDigest, DigestHasher, Reference};
use axum::body::{Body, Bytes};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

pub struct Upstream {
    cfg: UpstreamConfig,
    client: reqwest::Client,
    /// scope → (bearer token, valid until)
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

pub struct Proxy {
    upstreams: Vec<Upstream>,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
}

/// A blob download in progress, shared by every client that wants it.
pub struct Flight {
    session: String,
    /// Known once upstream answered.
    size: std::sync::OnceLock<u64>,
    state: watch::Receiver<FlightState>,
}

#[derive(Debug, Clone, PartialEq)]
enum FlightState {
    /// The upstream request is out.
    Starting,
    /// Upstream does not have the blob.
    Missing,
    Running(u64),
    Done,
    Failed(String),
}

fn upstream_error(msg: impl Into<String>) -> ApiError {
    ApiError::new(Code::Unavailable, msg).status(axum::http::StatusCode::BAD_GATEWAY)
}

impl Proxy {
    pub fn new(cfgs: &[UpstreamConfig]) -> Result<Proxy, String> {
        let mut upstreams = Vec::new();
        for cfg in cfgs {
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
                .redirect(reqwest::redirect::Policy::limited(5))
                .build()
                .map_err(|e| e.to_string())?;
            upstreams.push(Upstream {
                cfg: cfg.clone(),
                client,
                tokens: Mutex::new(HashMap::new()),
            });
        }
        Ok(Proxy {
            upstreams,
            flights: Mutex::new(HashMap::new()),
        })
    }

    pub fn knows(&self, ns: &str) -> bool {
        self.upstreams.iter().any(|u| u.cfg.name == ns)
    }

    /// The upstream serving `repo` (`NAME/...`) and the repository name there.
    /// Requests with `?ns=NAME` are rewritten to `NAME/...` before routing (see `lib.rs`),
    /// so a pull-through repository is always under its upstream's prefix and `ns` can
    /// never make a local repository a cache of something else.
    pub fn select(&self, repo: &str) -> Option<(&Upstream, String)> {
        let (first, rest) = repo.split_once('/')?;
        self.upstreams
            .iter()
            .find(|u| u.cfg.name == first)
            .map(|u| (u, rest.to_string()))
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Upstream {
    /// GET or HEAD `path` on the upstream, answering its auth challenge if any.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        repo: &str,
    ) -> Result<reqwest::Response, ApiError> {
        let url = format!("{}{path}", self.cfg.url);
        let scope = format!("repository:{repo}:pull");
        let build = |auth: Option<String>| {
            let mut r = self
                .client
                .request(method.clone(), &url)
                .header("accept", ACCEPT);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r
        };
        let cached = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&scope)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(t, _)| format!("Bearer {t}"));
        let basic = self.basic();
        let first = cached.clone().or_else(|| basic.clone());
        let resp = build(first)
            .send()
            .await
            .map_err(|e| upstream_error(format!("upstream {} unreachable: {e}", self.cfg.name)))?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let auth = if challenge.to_ascii_lowercase().starts_with("bearer") {
            let token = self.token(&challenge, &scope).await?;
            format!("Bearer {token}")
        } else {
            basic.ok_or_else(|| {
                upstream_error(format!(
                    "upstream {} wants credentials; set username/password for it in the config file",
                    self.cfg.name
                ))
            })?
        };
        build(Some(auth))
            .send()
            .await
            .map_err(|e| upstream_error(format!("upstream {} unreachable: {e}", self.cfg.name)))
    }

    fn basic(&self) -> Option<String> {
        use base64::Engine as _;
        let (u, p) = (
            self.cfg.username.as_ref()?,
            self.cfg.password.as_deref().unwrap_or(""),
        );
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        ))
    }

    /// The anonymous (or credentialed) bearer-token flow.
    async fn token(&self, challenge: &str, scope: &str) -> Result<String, ApiError> {
        let params = parse_challenge(challenge);
        let realm = params
            .get("realm")
            .ok_or_else(|| upstream_error("upstream bearer challenge without realm"))?;
        let mut req = self.client.get(realm).query(&[("scope", scope)]);
        if let Some(s) = params.get("service") {
            req = req.query(&[("service", s)]);
        }
        if let Some(b) = self.basic() {
            req = req.header("authorization", b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| upstream_error(format!("token server {realm}: {e}")))?;
        if !resp.status().is_success() {
            return Err(upstream_error(format!(
                "token server {realm} answered {}",
                resp.status()
            )));
        }
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| upstream_error(format!("token server {realm}: {e}")))?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| upstream_error(format!("token server {realm} sent no token")))?
            .to_string();
        let ttl = v
            .get("expires_in")
            .and_then(|e| e.as_u64())
            .unwrap_or(60)
            .max(10);
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                scope.to_string(),
                (token.clone(), Instant::now() + Duration::from_secs(ttl - 5)),
            );
        Ok(token)
    }
}

pub(crate) fn parse_challenge(h: &str) -> HashMap<String, String> {
    let rest = h.split_once(' ').map(|x| x.1).unwrap_or("");
    let mut out = HashMap::new();
    let mut s = rest;
    while let Some(eq) = s.find('=') {
        let key = s[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = &s[eq + 1..];
        let (val, next) = if let Some(stripped) = after.strip_prefix('"') {
            match stripped.find('"') {
                Some(end) => (&stripped[..end], &stripped[end + 1..]),
                None => (stripped, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, val.to_string());
        s = next;
    }
    out
}

fn header_digest(resp: &reqwest::Response) -> Option<BlobDigest> {
    resp.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| BlobDigest::parse(v).ok())
}

impl crate::Registry {
    /// GET `path` upstream: None on 404, an error (counted) on anything but success.
    async fn upstream_get(
        &self,
        up: &Upstream,
        path: &str,
        urepo: &str,
    ) -> Result<Option<reqwest::Response>, ApiError> {
        let resp = match up.send(reqwest::Method::GET, path, urepo).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.upstream_errors.inc();
                return Err(e);
            }
        };
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            self.metrics.upstream_errors.inc();
            return Err(upstream_error(format!(
                "upstream {} answered {} for {path}",
                up.cfg.name,
                resp.status()
            )));
        }
        Ok(Some(resp))
    }

    /// Manifest lookup for a pull-through repository (None when `repo` is not one).
    pub(crate) async fn pull_through_manifest(
        self: &Arc<Self>,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<(BlobDigest, ManifestMeta)>, ApiError> {
        let Some((up, urepo)) = self.proxy.select(repo) else {
            return Ok(None);
        };
        self.metrics.upstream_fetches.inc();
        let reference_str = match reference {
            Reference::Tag(t) => t.clone(),
            Reference::Digest(d) => d.to_string(),
        };
        let path = format!("/v2/{urepo}/manifests/{reference_str}");
        let cached = self.local_manifest(repo, reference).await?;
        if let (Reference::Tag(_), Some(c)) = (reference, &cached) {
            // Confirm the tag still points where it did; on any upstream trouble serve the cache.
            match up.send(reqwest::Method::HEAD, &path, &urepo).await {
                Ok(r) if r.status().is_success() && header_digest(&r).as_ref() == Some(&c.0) => {
                    self.touch_tag(repo, &reference_str).await;
                    return Ok(cached);
                }
                Ok(r) if r.status().is_success() => {}
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => return Ok(None),
                Ok(r) => {
                    self.metrics.upstream_errors.inc();
                    tracing::warn!(upstream = %up.cfg.name, status = %r.status(), "tag check failed; serving cached manifest");
                    return Ok(cached);
                }
                Err(e) => {
                    self.metrics.upstream_errors.inc();
                    tracing::warn!(upstream = %up.cfg.name, error = %e.message, "upstream down; serving cached manifest");
                    return Ok(cached);
                }
            }
        }
        let Some(resp) = self.upstream_get(up, &path, &urepo).await? else {
            return Ok(None);
        };
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
            .unwrap_or_default();
        let limit = self.config.max_manifest_bytes;
        if resp.content_length().is_some_and(|l| l > limit) {
            return Err(upstream_error(format!(
                "upstream manifest exceeds {limit} bytes"
            )));
        }
        let mut bytes = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(part) = stream.next().await {
            let part =
                part.map_err(|e| upstream_error(format!("upstream manifest transfer broke: {e}")))?;
            if (bytes.len() + part.len()) as u64 > limit {
                return Err(upstream_error(format!(
                    "upstream manifest exceeds {limit} bytes"
                )));
            }
            bytes.extend_from_slice(&part);
        }
        let d = match reference {
            Reference::Digest(want) => {
                let got = BlobDigest::of(want.algorithm(), &bytes);
                if &got != want {
                    self.metrics.upstream_errors.inc();
                    return Err(upstream_error(format!(
                        "upstream sent a manifest with digest {got}, not {want}"
                    )));
                }
                got
            }
            Reference::Tag(_) => BlobDigest::of(crate::names::Algorithm::Sha256, &bytes),
        };
        let meta = ManifestMeta {
            media_type,
            size: bytes.len() as u64,
            subject: None,
        };
        let tags: Vec<String> = match reference {
            Reference::Tag(t) => vec![t.clone()],
            Reference::Digest(_) => Vec::new(),
        };
        let wants_twin = crate::api::parse_manifest(&bytes, Some(&meta.media_type), &d)
            .map(|p| p.wants_twin())
            .unwrap_or(false);
        let (reg, repo2, d2, meta2) = (self.clone(), repo.to_string(), d.clone(), meta.clone());
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _r = reg.read_lock();
            reg.backend.put(&d2, &bytes)?;
            reg.meta.put_manifest(&repo2, &d2, &meta2, &tags, None)?;
            for t in &tags {
                reg.meta.set_proxy_tag_checked(&repo2, t)?;
            }
            Ok(())
        })
        .await
        .map_err(ApiError::internal)??;
        tracing::info!(repository = %repo, digest = %d, upstream = %up.cfg.name, "manifest cached from upstream");
        if self.config.convert_on_push && wants_twin {
            crate::twin::schedule(self, repo, &d);
        }
        Ok(Some((d, meta)))
    }

    /// Tags within their TTL are answered from the cache without asking upstream.
    pub(crate) async fn fresh_proxy_tag(self: &Arc<Self>, repo: &str, tag: &str) -> bool {
        let Some((up, _)) = self.proxy.select(repo) else {
            return true;
        };
        let ttl = up.cfg.tag_ttl_secs;
        let (reg, repo, tag) = (self.clone(), repo.to_string(), tag.to_string());
        tokio::task::spawn_blocking(move || {
            matches!(reg.meta.proxy_tag_checked(&repo, &tag), Ok(Some(t)) if Meta::now_secs().saturating_sub(t) < ttl)
        })
        .await
        .unwrap_or(false)
    }

    async fn local_manifest(
        self: &Arc<Self>,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<(BlobDigest, ManifestMeta)>, ApiError> {
        let (reg, repo, r) = (self.clone(), repo.to_string(), reference.clone());
        tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let d = match r {
                Reference::Digest(d) => d,
                Reference::Tag(t) => match reg.meta.tag(&repo, &t)? {
                    Some(d) => d,
                    None => return Ok(None),
                },
            };
            Ok(reg.meta.manifest(&repo, &d)?.map(|m| (d, m)))
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
    }

    async fn touch_tag(self: &Arc<Self>, repo: &str, tag: &str) {
        let (reg, repo, tag) = (self.clone(), repo.to_string(), tag.to_string());
        let _ =
            tokio::task::spawn_blocking(move || reg.meta.set_proxy_tag_checked(&repo, &tag)).await;
    }

    /// A blob of a pull-through repository that is not cached yet: join (or start) the
    /// download. Returns the blob's size and the flight to stream from (None when `repo`
    /// is not a pull-through repository or the upstream does not have the blob).
    pub(crate) async fn pull_through_blob(
        self: &Arc<Self>,
        repo: &str,
        d: &BlobDigest,
    ) -> Result<Option<(u64, Arc<Flight>)>, ApiError> {
        if self.proxy.select(repo).is_none() {
            return Ok(None);
        }
        // Flights are per repository: each one links the blob into its own repository.
        let key = format!("{repo}\0{d}");
        // Register the flight before asking upstream, so that clients arriving while the
        // request is out join it instead of sending their own.
        let (tx, rx) = watch::channel(FlightState::Starting);
        let mine = Arc::new(Flight {
            session: uuid::Uuid::new_v4().to_string(),
            size: std::sync::OnceLock::new(),
            state: rx,
        });
        let existing = {
            let mut flights = self.proxy.flights();
            match flights.get(&key) {
                Some(f) => Some(f.clone()),
                None => {
                    flights.insert(key.clone(), mine.clone());
                    None
                }
            }
        };
        if let Some(f) = existing {
            return join(f).await;
        }
        // The download runs in its own task: a client that goes away (even while the
        // upstream request is out) cannot strand the flight for the others.
        let (reg, repo2, d2, flight) = (self.clone(), repo.to_string(), d.clone(), mine.clone());
        tokio::spawn(async move {
            let Some((up, urepo)) = reg.proxy.select(&repo2) else {
                reg.proxy.flights().remove(&key);
                let _ = tx.send(FlightState::Missing);
                return;
            };
            let resp = match reg
                .start_flight(up, &urepo, &repo2, &d2, &flight, &tx)
                .await
            {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    reg.proxy.flights().remove(&key);
                    let _ = tx.send(FlightState::Missing);
                    return;
                }
                Err(e) => {
                    reg.proxy.flights().remove(&key);
                    let _ = tx.send(FlightState::Failed(e.message.clone()));
                    return;
                }
            };
            let size = flight.size.get().copied().unwrap_or(0);
            let session = flight.session.clone();
            let outcome = reg.download(resp, &session, &d2, size, &tx).await;
            reg.proxy.flights().remove(&key);
            let result = match outcome {
                Ok(()) => {
                    let (reg2, s, d3, r3) =
                        (reg.clone(), session.clone(), d2.clone(), repo2.clone());
                    tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                        let _r = reg2.read_lock();
                        reg2.backend.upload_commit(&s, &d3)?;
                        reg2.meta.finish_upload(&s, &r3, &d3, size)
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                }
                Err(msg) => Err(msg),
            };
            match result {
                Ok(()) => {
                    tracing::info!(repository = %repo2, digest = %d2, size, "blob cached from upstream");
                    let _ = tx.send(FlightState::Done);
                }
                Err(msg) => {
                    reg.metrics.upstream_errors.inc();
                    tracing::warn!(digest = %d2, error = %msg, "upstream blob transfer failed; nothing cached");
                    let _ = tx.send(FlightState::Failed(msg));
                    reg.drop_session(&session).await;
                }
            }
        });
        join(mine).await
    }

    /// Make a pull-through blob local (for the in-process converter): join or start its
    /// download and wait until it is committed.
    pub(crate) async fn fetch_through(
        self: &Arc<Self>,
        repo: &str,
        d: &BlobDigest,
    ) -> Result<(), ApiError> {
        let Some((_, f)) = self.pull_through_blob(repo, d).await? else {
            return Err(ApiError::new(
                Code::BlobUnknown,
                format!("upstream has no blob {d}"),
            ));
        };
        let mut rx = f.state.clone();
        loop {
            let st = rx.borrow_and_update().clone();
            match st {
                FlightState::Done => return Ok(()),
                FlightState::Failed(e) => return Err(upstream_error(e)),
                FlightState::Missing => {
                    return Err(ApiError::new(
                        Code::BlobUnknown,
                        format!("upstream has no blob {d}"),
                    ))
                }
                FlightState::Starting | FlightState::Running(_) => {
                    if rx.changed().await.is_err() && *rx.borrow() != FlightState::Done {
                        return Err(upstream_error("upstream transfer ended"));
                    }
                }
            }
        }
    }

    /// Ask upstream for the blob and open the session; None when upstream lacks it.
    async fn start_flight(
        self: &Arc<Self>,
        up: &Upstream,
        urepo: &str,
        repo: &str,
        d: &BlobDigest,
        flight: &Flight,
        tx: &watch::Sender<FlightState>,
    ) -> Result<Option<reqwest::Response>, ApiError> {
        self.metrics.upstream_fetches.inc();
        let path = format!("/v2/{urepo}/blobs/{d}");
        let Some(resp) = self.upstream_get(up, &path, urepo).await? else {
            return Ok(None);
        };
        let size = resp
            .content_length()
            .ok_or_else(|| upstream_error("upstream blob reply has no Content-Length"))?;
        if size > self.config.max_blob_bytes {
            return Err(upstream_error(format!(
                "upstream blob of {size} bytes exceeds max_blob_bytes"
            )));
        }
        let (reg, s, repo) = (self.clone(), flight.session.clone(), repo.to_string());
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            reg.backend.upload_create(&s)?;
            reg.meta.create_upload(&s, &repo)
        })
        .await
        .map_err(ApiError::internal)??;
        let _ = flight.size.set(size);
        let _ = tx.send(FlightState::Running(0));
        Ok(Some(resp))
    }

    /// Copy the upstream body into the session, publishing progress; verify at the end.
    async fn download(
        self: &Arc<Self>,
        resp: reqwest::Response,
        session: &str,
        d: &BlobDigest,
        size: u64,
        progress: &watch::Sender<FlightState>,
    ) -> Result<(), String> {
        let (btx, mut brx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let (reg, s) = (self.clone(), session.to_string());
        let writer = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let mut w = reg
                .backend
                .upload_append(&s, 0)
                .map_err(|e| e.to_string())?;
            let mut written = 0u64;
            let mut unflushed = 0usize;
            while let Some(b) = brx.blocking_recv() {
                w.write_all(&b).map_err(|e| e.to_string())?;
                written += b.len() as u64;
                unflushed += b.len();
                if unflushed >= 256 << 10 {
                    w.flush().map_err(|e| e.to_string())?;
                    unflushed = 0;
                    let _ = ptx.send(written);
                }
            }
            w.commit().map_err(|e| e.to_string())
        });
        let mut hasher = DigestHasher::new(d.algorithm());
        let mut stream = resp.bytes_stream();
        let mut got = 0u64;
        let mut failure = None;
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(b)) => {
                        got += b.len() as u64;
                        if got > size {
                            failure = Some(format!("upstream sent more than its Content-Length {size}"));
                            break;
                        }
                        hasher.update(&b);
                        if btx.send(b).await.is_err() {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        failure = Some(format!("upstream transfer broke after {got} of {size} bytes: {e}"));
                        break;
                    }
                    None => break,
                },
                Some(n) = prx.recv() => {
                    let _ = progress.send(FlightState::Running(n));
                }
            }
        }
        drop(btx);
        let written = writer.await.map_err(|e| e.to_string())?;
        if let Some(f) = failure {
            return Err(f);
        }
        let written = written?;
        if written != size {
            return Err(format!(
                "upstream transfer ended after {written} of {size} bytes"
            ));
        }
        let actual = hasher.finish();
        if &actual != d {
            return Err(format!(
                "upstream sent content with digest {actual}, not {d}"
            ));
        }
        let _ = progress.send(FlightState::Running(size));
        Ok(())
    }
}

/// Wait until a flight someone else started has an answer from upstream.
async fn join(f: Arc<Flight>) -> Result<Option<(u64, Arc<Flight>)>, ApiError> {
    let mut rx = f.state.clone();
    loop {
        let st = rx.borrow_and_update().clone();
        match st {
            FlightState::Starting => {
                if rx.changed().await.is_err() {
                    return Err(upstream_error("upstream request abandoned"));
                }
            }
            FlightState::Missing => return Ok(None),
            FlightState::Failed(e) => return Err(upstream_error(e)),
            FlightState::Running(_) | FlightState::Done => {
                let size = f.size.get().copied().unwrap_or(0);
                return Ok(Some((size, f)));
            }
        }
    }
}

/// Stream `[offset, offset+len)` of a flight as its bytes arrive; the stream fails if the
/// download does.
pub fn flight_body(
    reg: &Shared,
    flight: Arc<Flight>,
    d: BlobDigest,
    offset: u64,
    len: u64,
) -> Body {
    if *flight.state.borrow() == FlightState::Done {
        return blob_body(reg, d, offset, len);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let reg = reg.clone();
    let rt = tokio::runtime::Handle::current();
    let size = flight.size.get().copied().unwrap_or(0);
    tokio::task::spawn_blocking(move || {
        let fail = |tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>, msg: String| {
            let _ = tx.blocking_send(Err(std::io::Error::other(msg)));
        };
        // Opened once: the descriptor keeps reading the bytes after the commit renames them.
        let mut file = match reg.backend.upload_read(&flight.session, offset) {
            Ok(f) => f,
            Err(_) => {
                // Already committed: read the stored blob.
                match reg.backend.open(&d, offset) {
                    Ok(f) => f,
                    Err(e) => return fail(&tx, e.to_string()),
                }
            }
        };
        let mut state = flight.state.clone();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let available = match state.borrow_and_update().clone() {
                FlightState::Running(n) => n,
                FlightState::Starting | FlightState::Missing => 0,
                FlightState::Done => size,
                FlightState::Failed(e) => {
                    return fail(&tx, format!("upstream transfer failed: {e}"))
                }
            };
            if available <= pos {
                if rt.block_on(state.changed()).is_err() && *state.borrow() != FlightState::Done {
                    return fail(&tx, "upstream transfer ended".into());
                }
                continue;
            }
            let want = (available.min(end) - pos).min(256 << 10) as usize;
            let mut buf = vec![0u8; want];
            if let Err(e) = file.read_exact(&mut buf) {
                return fail(&tx, e.to_string());
            }
            pos += want as u64;
            reg.metrics.bytes_sent.inc_by(want as u64);
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return;
            }
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#,
        );
        assert_eq!(c["realm"], "https://auth.example/token");
        assert_eq!(c["service"], "registry.example");
        assert_eq!(c["scope"], "repository:a:pull");
        let c = parse_challenge("Basic realm=x");
        assert_eq!(c["realm"], "x");
    }

    #[test]
    fn selection() {
        let p = Proxy::new(&[UpstreamConfig::parse_flag("docker.io=http://127.0.0.1:1").unwrap()])
            .unwrap();
        assert_eq!(
            p.select("docker.io/library/debian").map(|x| x.1),
            Some("library/debian".into())
        );
        assert!(p.select("library/debian").is_none());
        assert!(p.knows("docker.io"));
        assert!(!p.knows("library"));
    }
}
