//! Pull-through caching. A repository `NAME/REPO` (or any repository requested with
//! `?ns=NAME`, as containerd sends) is served from upstream `NAME`: manifests are fetched
//! and verified on first use and re-checked with HEAD after the tag TTL (served from cache
//! when the upstream is down); blobs are downloaded once however many clients ask at the
//! same time, streamed to all of them as the bytes arrive, verified, and only then
//! committed. A broken transfer caches nothing and fails every waiting client.
//!
//! Upstream credentials (configured per upstream) are used only towards that upstream;
//! client credentials are never forwarded.

use crate::body::blob_body;
use crate::error::{ApiError, Code, StoreError};
use crate::manifest::parse_manifest;
use crate::meta::{ManifestMeta, Meta};
use crate::names::Reference;
use crate::state::{Registry, Shared};
use crate::upstream::{header_digest, join, upstream_error, Flight, FlightState, Upstream};
use axum::body::{Body, Bytes};
use futures_util::StreamExt;
use std::io::{Read, Write};
use std::sync::Arc;
use tessera_format::OciDigest;
use tessera_oci::verify::Verifier;
use tokio::sync::watch;

/// A manifest served by a pull-through repository.
pub(crate) struct Pulled {
    pub(crate) digest: OciDigest,
    pub(crate) meta: ManifestMeta,
    /// Fetched from upstream just now, and a plain image that gets a tessera twin
    /// under --convert-on-push.
    pub(crate) wants_twin: bool,
}

impl Pulled {
    fn cached((digest, meta): (OciDigest, ManifestMeta)) -> Pulled {
        Pulled {
            digest,
            meta,
            wants_twin: false,
        }
    }
}

impl Registry {
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
    /// The caller schedules the tessera twin of a manifest just fetched (`wants_twin`).
    pub(crate) async fn pull_through_manifest(
        self: &Arc<Self>,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<Pulled>, ApiError> {
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
                    return Ok(cached.map(Pulled::cached));
                }
                Ok(r) if r.status().is_success() => {}
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => return Ok(None),
                Ok(r) => {
                    self.metrics.upstream_errors.inc();
                    tracing::warn!(upstream = %up.cfg.name, status = %r.status(), "tag check failed; serving cached manifest");
                    return Ok(cached.map(Pulled::cached));
                }
                Err(e) => {
                    self.metrics.upstream_errors.inc();
                    tracing::warn!(upstream = %up.cfg.name, error = %e.message, "upstream down; serving cached manifest");
                    return Ok(cached.map(Pulled::cached));
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
                let got = OciDigest::of(want.algorithm(), &bytes);
                if &got != want {
                    self.metrics.upstream_errors.inc();
                    return Err(upstream_error(format!(
                        "upstream sent a manifest with digest {got}, not {want}"
                    )));
                }
                got
            }
            Reference::Tag(_) => OciDigest::of(tessera_format::Algorithm::Sha256, &bytes),
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
        let wants_twin = parse_manifest(&bytes, Some(&meta.media_type), &d)
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
        Ok(Some(Pulled {
            digest: d,
            meta,
            wants_twin,
        }))
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
    ) -> Result<Option<(OciDigest, ManifestMeta)>, ApiError> {
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
        d: &OciDigest,
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
        d: &OciDigest,
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
        d: &OciDigest,
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
        d: &OciDigest,
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
        // Checks the length against Content-Length as the bytes arrive and the digest at the end.
        let mut verifier = Verifier::new(d.clone(), size, format!("upstream blob {d}"));
        let mut stream = resp.bytes_stream();
        let mut got = 0u64;
        let mut failure = None;
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(b)) => {
                        got += b.len() as u64;
                        if let Err(e) = verifier.update(&b) {
                            failure = Some(e.to_string());
                            break;
                        }
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
        verifier.finish().map_err(|e| e.to_string())?;
        let _ = progress.send(FlightState::Running(size));
        Ok(())
    }
}

/// Stream `[offset, offset+len)` of a flight as its bytes arrive; the stream fails if the
/// download does.
pub fn flight_body(reg: &Shared, flight: Arc<Flight>, d: OciDigest, offset: u64, len: u64) -> Body {
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
