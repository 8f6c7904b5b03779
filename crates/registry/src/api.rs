//! The Distribution API handlers: blobs, uploads, manifests, tags, referrers and the
//! catalog (routing is in [`crate::routes`]).

use crate::body::{blob_body, parse_range, RangeReq};
use crate::config::Action;
use crate::error::{ApiError, Code};
use crate::manifest::{invalid, parse_manifest};
use crate::meta::ManifestMeta;
use crate::names::Reference;
use crate::routes::{parse_query, Route};
use crate::state::{SessionGuard, Shared};
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use std::io::{Read, Write};
use tessera_format::{Algorithm, DigestHasher, OciDigest};
use tessera_oci::reference::{valid_repo, valid_tag};

type ApiResult = Result<Response, ApiError>;

fn q<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn parse_digest(s: &str) -> Result<OciDigest, ApiError> {
    OciDigest::parse(s).map_err(|e| ApiError::new(Code::DigestInvalid, e.to_string()))
}

fn check_repo(repo: &str) -> Result<(), ApiError> {
    if valid_repo(repo) {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::NameInvalid,
            format!("invalid repository name {repo:?}: use lowercase letters, digits and separators . _ __ - between them, components joined by /"),
        ))
    }
}

fn parse_reference(s: &str) -> Result<Reference, ApiError> {
    if s.contains(':') {
        return parse_digest(s).map(Reference::Digest);
    }
    if valid_tag(s) {
        Ok(Reference::Tag(s.to_string()))
    } else {
        Err(ApiError::new(
            Code::TagInvalid,
            format!("invalid tag {s:?}: at most 128 of [A-Za-z0-9_.-], not starting with . or -"),
        ))
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A response builder that cannot fail on our own header values.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
}

impl Reply {
    fn new(status: StatusCode) -> Reply {
        Reply {
            status,
            headers: HeaderMap::new(),
        }
    }
    fn h(mut self, name: &'static str, value: impl AsRef<str>) -> Reply {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.append(name, v);
        }
        self
    }
    fn body(self, body: Body) -> Response {
        let mut r = Response::new(body);
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers;
        r
    }
    fn empty(self) -> Response {
        self.h("content-length", "0").body(Body::empty())
    }
}

/// Run blocking storage work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

pub async fn dispatch(
    reg: Shared,
    route: Route,
    method: Method,
    query: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let query = parse_query(query.as_deref());
    if let Some(repo) = route.repo() {
        check_repo(repo)?;
        let read = method == Method::GET || method == Method::HEAD;
        if !read && reg.proxy.select(repo).is_some() {
            return Err(ApiError::new(
                Code::Unsupported,
                format!("{repo} is a pull-through cache of an upstream registry and is read-only"),
            ));
        }
    }
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => Ok(Reply::new(StatusCode::OK)
            .h("content-type", "application/json")
            .h("content-length", "2")
            .body(Body::from("{}"))),
        (Route::Catalog, Method::GET) => catalog(reg, &query, &headers).await,
        (Route::Blob(repo, d), m @ (Method::GET | Method::HEAD)) => {
            get_blob(reg, repo, &d, m == Method::HEAD, &headers).await
        }
        (Route::Blob(repo, d), Method::DELETE) => delete_blob(reg, repo, &d).await,
        (Route::Manifest(repo, r), m @ (Method::GET | Method::HEAD)) => {
            get_manifest(reg, repo, &r, m == Method::HEAD).await
        }
        (Route::Manifest(repo, r), Method::PUT) => {
            put_manifest(reg, repo, &r, &headers, &query, body).await
        }
        (Route::Manifest(repo, r), Method::DELETE) => delete_manifest(reg, repo, &r).await,
        (Route::Tags(repo), Method::GET) => tags(reg, repo, &query).await,
        (Route::Referrers(repo, d), Method::GET) => referrers(reg, repo, &d, &query).await,
        (Route::UploadStart(repo), Method::POST) => {
            start_upload(reg, repo, &headers, &query, body).await
        }
        (Route::Upload(repo, id), Method::PATCH) => {
            patch_upload(reg, repo, id, &headers, body).await
        }
        (Route::Upload(repo, id), Method::PUT) => {
            put_upload(reg, repo, id, &headers, &query, body).await
        }
        (Route::Upload(repo, id), Method::GET) => upload_status(reg, repo, id).await,
        (Route::Upload(repo, id), Method::DELETE) => cancel_upload(reg, repo, id).await,
        (_, m) => Err(ApiError::new(
            Code::Unsupported,
            format!("method {m} is not supported on this path"),
        )),
    }
}

// ---------------------------------------------------------------- blobs
/// Ranges up to this many bytes are read with the metadata lookup, in one blocking
/// call, and sent from memory: a lazy mount's chunk reads are mostly this small, and each
/// hop between threads costs more than the read.
const SMALL_READ: u64 = 1 << 20;

async fn get_blob(
    reg: Shared,
    repo: String,
    d: &str,
    head: bool,
    headers: &HeaderMap,
) -> ApiResult {
    let d = parse_digest(d)?;
    let range = header(headers, "range").map(str::to_string);
    let (size, small) = {
        let (reg2, repo2, d2, range2) = (reg.clone(), repo.clone(), d.clone(), range.clone());
        blocking(move || {
            let Some(size) = reg2.meta.blob_in_repo(&repo2, &d2)? else {
                return Ok((None, None));
            };
            let (offset, len) = match parse_range(range2.as_deref(), size) {
                RangeReq::Full => (0, size),
                RangeReq::Part(s, e) => (s, e - s + 1),
                RangeReq::Unsatisfiable => return Ok((Some(size), None)),
            };
            if head || len == 0 || len > SMALL_READ {
                return Ok((Some(size), None));
            }
            let mut buf = Vec::with_capacity(len as usize);
            let mut r = reg2.backend.open(&d2, offset)?.take(len);
            r.read_to_end(&mut buf)
                .map_err(|e| ApiError::internal(format!("reading blob {d2}: {e}")))?;
            if buf.len() as u64 != len {
                tracing::error!(digest = %d2, "blob shorter than recorded");
                return Err(ApiError::internal("blob truncated"));
            }
            reg2.metrics.bytes_sent.inc_by(len);
            Ok((Some(size), Some(Bytes::from(buf))))
        })
        .await?
    };
    let (size, flight) = match size {
        Some(s) => (s, None),
        None => match reg.pull_through_blob(&repo, &d).await? {
            Some((s, f)) => (s, Some(f)),
            None => {
                return Err(ApiError::new(
                    Code::BlobUnknown,
                    format!("blob {d} is not in repository {repo}"),
                )
                .detail(serde_json::json!({ "digest": d.to_string() })))
            }
        },
    };
    let base = Reply::new(StatusCode::OK)
        .h("docker-content-digest", d.to_string())
        .h("content-type", "application/octet-stream")
        .h("accept-ranges", "bytes")
        .h("etag", format!("\"{d}\""))
        .h("cache-control", "max-age=31536000");
    let (mut reply, offset, len) = match parse_range(range.as_deref(), size) {
        RangeReq::Full => (base, 0, size),
        RangeReq::Part(s, e) => {
            let mut r = base.h("content-range", format!("bytes {s}-{e}/{size}"));
            r.status = StatusCode::PARTIAL_CONTENT;
            (r, s, e - s + 1)
        }
        RangeReq::Unsatisfiable => {
            return Err(ApiError::new(
                Code::BlobUploadInvalid,
                format!("requested range is outside the blob's {size} bytes"),
            )
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header("content-range", format!("bytes */{size}")))
        }
    };
    reply = reply.h("content-length", len.to_string());
    if head || len == 0 {
        return Ok(reply.body(Body::empty()));
    }
    Ok(reply.body(match (small, flight) {
        (Some(bytes), _) => Body::from(bytes),
        (None, Some(f)) => crate::proxy::flight_body(&reg, f, d, offset, len),
        (None, None) => blob_body(&reg, d, offset, len),
    }))
}

async fn delete_blob(reg: Shared, repo: String, d: &str) -> ApiResult {
    if !reg.config.delete_enabled {
        return Err(ApiError::new(
            Code::Unsupported,
            "deletes are disabled on this registry",
        ));
    }
    let d = parse_digest(d)?;
    let reg2 = reg.clone();
    let existed = blocking(move || {
        let _w = reg2.write_lock();
        let u = reg2.meta.unlink_blob(&repo, &d)?;
        if u.orphan {
            reg2.remove_bytes(&d)?;
        }
        Ok(u.existed)
    })
    .await?;
    if !existed {
        return Err(ApiError::new(
            Code::BlobUnknown,
            "blob is not in this repository",
        ));
    }
    Ok(Reply::new(StatusCode::ACCEPTED).empty())
}

// ---------------------------------------------------------------- uploads

fn upload_location(repo: &str, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

fn range_header(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

fn upload_unknown() -> ApiError {
    ApiError::new(
        Code::BlobUploadUnknown,
        "upload session unknown (finished, cancelled, expired or of another repository); start a new one with POST",
    )
}

/// The session's current size, checking it belongs to `repo`.
async fn session(reg: &Shared, repo: &str, id: &str) -> Result<u64, ApiError> {
    let (reg2, repo2, id2) = (reg.clone(), repo.to_string(), id.to_string());
    blocking(move || {
        match reg2.meta.upload(&id2)? {
            Some(m) if m.repo == repo2 => {}
            _ => return Err(upload_unknown()),
        }
        reg2.backend.upload_size(&id2)?.ok_or_else(upload_unknown)
    })
    .await
}

async fn create_session(reg: &Shared, repo: &str) -> Result<String, ApiError> {
    let id = uuid::Uuid::new_v4().to_string();
    let (reg2, repo2, id2) = (reg.clone(), repo.to_string(), id.clone());
    blocking(move || {
        reg2.backend.upload_create(&id2)?;
        reg2.meta.create_upload(&id2, &repo2)?;
        Ok(())
    })
    .await?;
    Ok(id)
}

fn session_reply(status: StatusCode, repo: &str, id: &str, size: u64) -> Response {
    Reply::new(status)
        .h("location", upload_location(repo, id))
        .h("range", range_header(size))
        .h("docker-upload-uuid", id)
        .empty()
}

/// Parse `Content-Range: <start>-<end>` (an optional `bytes ` prefix is tolerated).
pub(crate) fn content_range(h: &HeaderMap) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(v) = header(h, "content-range") else {
        return Ok(None);
    };
    let v = v.trim();
    let v = v.strip_prefix("bytes ").unwrap_or(v);
    let v = v.split('/').next().unwrap_or(v);
    let bad = || {
        ApiError::new(
            Code::BlobUploadInvalid,
            format!("malformed Content-Range {v:?}: expected <start>-<end>"),
        )
        .status(StatusCode::RANGE_NOT_SATISFIABLE)
    };
    let (a, b) = v.split_once('-').ok_or_else(bad)?;
    let a: u64 = a.parse().map_err(|_| bad())?;
    let b: u64 = b.parse().map_err(|_| bad())?;
    if b < a {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

/// Append a request body to session `id` at `offset`. With `expect`, the body must be
/// exactly that long. Returns the new size. On any failure the session is left as it was.
async fn append_body(
    reg: &Shared,
    id: &str,
    offset: u64,
    expect: Option<u64>,
    body: Body,
) -> Result<u64, ApiError> {
    let _active = ActiveUpload::new(reg);
    let limit = reg.config.max_blob_bytes;
    let mut hasher = reg.take_hasher(id, offset);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(16);
    let (reg2, id2) = (reg.clone(), id.to_string());
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, ApiError> {
        let mut w = reg2.backend.upload_append(&id2, offset)?;
        loop {
            match rx.blocking_recv() {
                Some(Some(b)) => {
                    if let Err(e) = w.write_all(&b) {
                        w.abort();
                        return Err(crate::error::StoreError::io(&id2, e).into());
                    }
                }
                Some(None) => return Ok(w.commit()?),
                None => {
                    w.abort();
                    return Err(ApiError::new(Code::BlobUploadInvalid, "upload aborted"));
                }
            }
        }
    });
    let mut stream = body.into_data_stream();
    let mut n: u64 = 0;
    let mut failure: Option<ApiError> = None;
    let mut writer_gone = false;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(b) => {
                n += b.len() as u64;
                if offset + n > limit {
                    failure = Some(
                        ApiError::new(
                            Code::SizeInvalid,
                            format!("blob larger than this registry's limit of {limit} bytes"),
                        )
                        .status(StatusCode::PAYLOAD_TOO_LARGE),
                    );
                    break;
                }
                if expect.is_some_and(|e| n > e) {
                    break;
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&b);
                }
                if tx.send(Some(b)).await.is_err() {
                    // The writer stopped (e.g. the disk is full): its error is the answer.
                    writer_gone = true;
                    break;
                }
            }
            Err(e) => {
                failure = Some(ApiError::new(
                    Code::BlobUploadInvalid,
                    format!("request body broke off after {n} bytes: {e}"),
                ));
                break;
            }
        }
    }
    if writer_gone {
        // Let the client finish sending so that it reads the error reply.
        drain(stream).await;
    }
    if failure.is_none() && !writer_gone {
        if let Some(e) = expect.filter(|&e| e != n) {
            failure = Some(ApiError::new(
                Code::SizeInvalid,
                format!("Content-Range says {e} bytes but the body had {n}"),
            ));
        }
    }
    if failure.is_none() {
        let _ = tx.send(None).await;
    }
    drop(tx);
    let written = writer.await.map_err(ApiError::internal)?;
    if let Some(f) = failure {
        return Err(f);
    }
    let size = written?;
    reg.metrics.bytes_received.inc_by(n);
    // The running hash is only worth keeping if it covers exactly the session's bytes.
    if let Some(h) = hasher.filter(|_| size == offset + n) {
        reg.put_hasher(id, size, h);
    }
    Ok(size)
}

struct ActiveUpload(Shared);
impl ActiveUpload {
    fn new(reg: &Shared) -> ActiveUpload {
        reg.metrics.uploads_active.inc();
        ActiveUpload(reg.clone())
    }
}
impl Drop for ActiveUpload {
    fn drop(&mut self) {
        self.0.metrics.uploads_active.dec();
    }
}

fn check_length(headers: &HeaderMap, range: Option<(u64, u64)>) -> Result<Option<u64>, ApiError> {
    let cl = header(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    match range {
        Some((a, b)) => {
            let want = b
                .checked_sub(a)
                .and_then(|x| x.checked_add(1))
                .ok_or_else(|| {
                    ApiError::new(
                        Code::BlobUploadInvalid,
                        format!("Content-Range {a}-{b} is not a valid range"),
                    )
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                })?;
            if cl.is_some_and(|cl| cl != want) {
                return Err(ApiError::new(
                    Code::SizeInvalid,
                    format!(
                        "Content-Length {} does not match Content-Range {a}-{b}",
                        cl.unwrap_or(0)
                    ),
                ));
            }
            Ok(Some(want))
        }
        None => Ok(cl),
    }
}

async fn start_upload(
    reg: Shared,
    repo: String,
    headers: &HeaderMap,
    query: &[(String, String)],
    body: Body,
) -> ApiResult {
    if let Some(mount) = q(query, "mount") {
        if let (Ok(d), Some(from)) = (OciDigest::parse(mount), q(query, "from")) {
            if valid_repo(from) && reg.may(headers, Some(from), Action::Pull) {
                let (reg2, repo2, from2, d2) =
                    (reg.clone(), repo.clone(), from.to_string(), d.clone());
                let mounted = blocking(move || {
                    let _r = reg2.read_lock();
                    match reg2.meta.blob_in_repo(&from2, &d2)? {
                        Some(size) => {
                            reg2.meta.link_blob(&repo2, &d2, size)?;
                            Ok(true)
                        }
                        None => Ok(false),
                    }
                })
                .await?;
                if mounted {
                    return Ok(Reply::new(StatusCode::CREATED)
                        .h("location", format!("/v2/{repo}/blobs/{d}"))
                        .h("docker-content-digest", d.to_string())
                        .empty());
                }
            }
        }
        // Not mountable: an ordinary session, as the spec asks.
        let id = create_session(&reg, &repo).await?;
        return Ok(session_reply(StatusCode::ACCEPTED, &repo, &id, 0));
    }
    if let Some(dstr) = q(query, "digest") {
        // Monolithic upload in one POST.
        let d = parse_digest(dstr)?;
        let expect = check_length(headers, None)?;
        let id = create_session(&reg, &repo).await?;
        let result = async {
            append_body(&reg, &id, 0, expect, body).await?;
            finish_upload(&reg, &repo, &id, &d).await
        }
        .await;
        if result.is_err() {
            reg.drop_session(&id).await;
        }
        return result;
    }
    let id = create_session(&reg, &repo).await?;
    Ok(session_reply(StatusCode::ACCEPTED, &repo, &id, 0))
}

async fn patch_upload(
    reg: Shared,
    repo: String,
    id: String,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult {
    let (_writing, body) = lock_or_drain(&reg, &id, body).await?;
    let size = session(&reg, &repo, &id).await?;
    let range = match content_range(headers) {
        Ok(r) => r,
        Err(e) => {
            return Err(e
                .header("location", upload_location(&repo, &id))
                .header("range", range_header(size)))
        }
    };
    if let Some((a, _)) = range {
        if a != size {
            return Err(ApiError::new(
                Code::BlobUploadInvalid,
                format!("chunk starts at {a} but the upload has {size} bytes; resume at {size}"),
            )
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header("location", upload_location(&repo, &id))
            .header("range", range_header(size)));
        }
    }
    let expect = check_length(headers, range)?;
    let expect = if range.is_some() { expect } else { None };
    let new = append_body(&reg, &id, size, expect, body).await?;
    Ok(session_reply(StatusCode::ACCEPTED, &repo, &id, new))
}

async fn put_upload(
    reg: Shared,
    repo: String,
    id: String,
    headers: &HeaderMap,
    query: &[(String, String)],
    body: Body,
) -> ApiResult {
    let (_writing, body) = lock_or_drain(&reg, &id, body).await?;
    let size = session(&reg, &repo, &id).await?;
    let d = match q(query, "digest") {
        Some(d) => parse_digest(d)?,
        None => {
            return Err(ApiError::new(
                Code::DigestInvalid,
                "closing PUT needs ?digest=<algorithm>:<hex>",
            ))
        }
    };
    let range = content_range(headers)?;
    if let Some((a, _)) = range {
        if a != size {
            return Err(ApiError::new(
                Code::BlobUploadInvalid,
                format!("final chunk starts at {a} but the upload has {size} bytes"),
            )
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header("location", upload_location(&repo, &id))
            .header("range", range_header(size)));
        }
    }
    let expect = check_length(headers, range)?;
    if range.is_some() || expect.is_some_and(|e| e > 0) {
        append_body(&reg, &id, size, expect, body).await?;
    } else {
        // Body may still be streamed without a length (chunked transfer encoding).
        append_body(&reg, &id, size, None, body).await?;
    }
    let r = finish_upload(&reg, &repo, &id, &d).await;
    if let Err(e) = &r {
        if e.code == Code::DigestInvalid {
            reg.drop_session(&id).await;
        }
    }
    r
}

/// Verify the session's bytes against `d` and publish the blob in `repo`.
async fn finish_upload(reg: &Shared, repo: &str, id: &str, d: &OciDigest) -> ApiResult {
    let (reg2, repo2, id2, d2) = (reg.clone(), repo.to_string(), id.to_string(), d.clone());
    let hasher = reg.hashers_remove(id);
    blocking(move || {
        let size = reg2.backend.upload_size(&id2)?.ok_or_else(upload_unknown)?;
        let actual = match hasher {
            Some((at, h)) if at == size && d2.algorithm() == Algorithm::Sha256 => h.finish(),
            _ => {
                // After a restart or for sha512: hash what was stored.
                let mut h = DigestHasher::new(d2.algorithm());
                let mut r = reg2.backend.upload_read(&id2, 0)?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = r
                        .read(&mut buf)
                        .map_err(|e| crate::error::StoreError::io(&id2, e))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                h.finish()
            }
        };
        if actual != d2 {
            return Err(ApiError::new(
                Code::DigestInvalid,
                format!("uploaded content has digest {actual}, not {d2}"),
            )
            .detail(
                serde_json::json!({"expected": d2.to_string(), "actual": actual.to_string()}),
            ));
        }
        let _r = reg2.read_lock();
        reg2.backend.upload_commit(&id2, &d2)?;
        reg2.meta.finish_upload(&id2, &repo2, &d2, size)?;
        Ok(())
    })
    .await?;
    Ok(Reply::new(StatusCode::CREATED)
        .h("location", format!("/v2/{repo}/blobs/{d}"))
        .h("docker-content-digest", d.to_string())
        .empty())
}

async fn upload_status(reg: Shared, repo: String, id: String) -> ApiResult {
    let size = session(&reg, &repo, &id).await?;
    Ok(session_reply(StatusCode::NO_CONTENT, &repo, &id, size))
}

/// Take the session's writer lock; a refused request's body is read first, so the
/// client sees the reply rather than a broken pipe.
async fn lock_or_drain(
    reg: &Shared,
    id: &str,
    body: Body,
) -> Result<(SessionGuard, Body), ApiError> {
    match reg.lock_session(id) {
        Ok(g) => Ok((g, body)),
        Err(e) => {
            drain(body.into_data_stream()).await;
            Err(e)
        }
    }
}

async fn cancel_upload(reg: Shared, repo: String, id: String) -> ApiResult {
    let _writing = reg.lock_session(&id)?;
    session(&reg, &repo, &id).await?;
    reg.drop_session(&id).await;
    Ok(Reply::new(StatusCode::NO_CONTENT).empty())
}

// ---------------------------------------------------------------- manifests

async fn resolve(
    reg: &Shared,
    repo: &str,
    reference: &Reference,
) -> Result<Option<(OciDigest, ManifestMeta)>, ApiError> {
    let (reg2, repo2, r2) = (reg.clone(), repo.to_string(), reference.clone());
    blocking(move || {
        let d = match r2 {
            Reference::Digest(d) => d,
            Reference::Tag(t) => match reg2.meta.tag(&repo2, &t)? {
                Some(d) => d,
                None => return Ok(None),
            },
        };
        Ok(reg2.meta.manifest(&repo2, &d)?.map(|m| (d, m)))
    })
    .await
}

async fn manifest_unknown(reg: &Shared, repo: &str, reference: &str) -> ApiError {
    let (reg2, repo2) = (reg.clone(), repo.to_string());
    let exists = blocking(move || Ok(reg2.meta.repo_exists(&repo2)?))
        .await
        .unwrap_or(true);
    if exists {
        ApiError::new(
            Code::ManifestUnknown,
            format!("manifest {reference} is not in repository {repo}"),
        )
    } else {
        ApiError::new(
            Code::NameUnknown,
            format!("repository {repo} is not known to this registry"),
        )
    }
}

/// The reference of a manifest GET, HEAD or DELETE: one that is neither a tag nor a
/// digest names no manifest, so the answer is 404 (400 is only for a PUT).
async fn lookup_reference(reg: &Shared, repo: &str, r: &str) -> Result<Reference, ApiError> {
    match parse_reference(r) {
        Ok(reference) => Ok(reference),
        Err(_) => Err(manifest_unknown(reg, repo, r).await),
    }
}

async fn get_manifest(reg: Shared, repo: String, r: &str, head: bool) -> ApiResult {
    let reference = lookup_reference(&reg, &repo, r).await?;
    // A pull-through tag past its TTL is re-checked upstream before it is served.
    let fresh = match &reference {
        Reference::Tag(t) => reg.fresh_proxy_tag(&repo, t).await,
        Reference::Digest(_) => true,
    };
    let local = if fresh {
        resolve(&reg, &repo, &reference).await?
    } else {
        None
    };
    let found = match local {
        Some(f) => Some(f),
        None => match reg.pull_through_manifest(&repo, &reference).await? {
            Some(p) => {
                if p.wants_twin && reg.config.convert_on_push {
                    crate::twin::schedule(&reg, &repo, &p.digest);
                }
                Some((p.digest, p.meta))
            }
            None => None,
        },
    };
    let Some((d, meta)) = found else {
        return Err(manifest_unknown(&reg, &repo, r).await);
    };
    let reply = Reply::new(StatusCode::OK)
        .h("content-type", &meta.media_type)
        .h("docker-content-digest", d.to_string())
        .h("etag", format!("\"{d}\""))
        .h("content-length", meta.size.to_string());
    if head {
        return Ok(reply.body(Body::empty()));
    }
    let reg2 = reg.clone();
    let bytes = blocking(move || {
        let mut buf = Vec::with_capacity(meta.size as usize);
        reg2.backend
            .open(&d, 0)?
            .read_to_end(&mut buf)
            .map_err(|e| crate::error::StoreError::io(&d, e))?;
        Ok(buf)
    })
    .await?;
    Ok(reply.body(Body::from(bytes)))
}

async fn read_limited(body: Body, limit: u64) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(frame) = stream.next().await {
        let b = frame.map_err(|e| invalid(format!("request body broke off: {e}")))?;
        if (out.len() + b.len()) as u64 > limit {
            drain(stream).await;
            return Err(too_large(limit));
        }
        out.extend_from_slice(&b);
    }
    Ok(out)
}

/// Read and discard the rest of a refused request body (up to 64 MiB) so the client
/// gets to read the error reply instead of a broken pipe.
async fn drain(mut stream: axum::body::BodyDataStream) {
    let mut n: u64 = 0;
    while let Some(Ok(b)) = stream.next().await {
        n += b.len() as u64;
        if n > 64 << 20 {
            break;
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        Code::SizeInvalid,
        format!("manifest larger than this registry's limit of {limit} bytes"),
    )
    .status(StatusCode::PAYLOAD_TOO_LARGE)
    .header("connection", "close")
}

async fn put_manifest(
    reg: Shared,
    repo: String,
    r: &str,
    headers: &HeaderMap,
    query: &[(String, String)],
    body: Body,
) -> ApiResult {
    let reference = parse_reference(r)?;
    let limit = reg.config.max_manifest_bytes;
    if header(headers, "content-length")
        .and_then(|c| c.parse::<u64>().ok())
        .is_some_and(|c| c > limit)
    {
        drain(body.into_data_stream()).await;
        return Err(too_large(limit));
    }
    let bytes = read_limited(body, limit).await?;
    let d = match &reference {
        Reference::Digest(want) => {
            let got = OciDigest::of(want.algorithm(), &bytes);
            if &got != want {
                return Err(ApiError::new(
                    Code::DigestInvalid,
                    format!("manifest body has digest {got}, not {want}"),
                ));
            }
            got
        }
        Reference::Tag(_) => OciDigest::of(Algorithm::Sha256, &bytes),
    };
    let mut tags: Vec<String> = Vec::new();
    if let Reference::Tag(t) = &reference {
        tags.push(t.clone());
    }
    for (k, v) in query {
        if k == "tag" {
            if !valid_tag(v) {
                return Err(ApiError::new(
                    Code::TagInvalid,
                    format!("invalid tag {v:?}"),
                ));
            }
            tags.push(v.clone());
        }
    }
    let parsed = parse_manifest(&bytes, header(headers, "content-type"), &d)?;
    let (reg2, repo2, d2) = (reg.clone(), repo.clone(), d.clone());
    let plain_image = parsed.wants_twin();
    let stored = blocking(move || reg2.store_manifest(&repo2, &d2, bytes, parsed, &tags)).await;
    if stored.is_ok() && plain_image && reg.config.convert_on_push {
        crate::twin::schedule(&reg, &repo, &d);
    }
    stored.map(|subject| {
        let mut reply = Reply::new(StatusCode::CREATED)
            .h("location", format!("/v2/{repo}/manifests/{d}"))
            .h("docker-content-digest", d.to_string());
        if let Some(s) = subject {
            reply = reply.h("oci-subject", s.to_string());
        }
        for t in query.iter().filter(|(k, _)| k == "tag") {
            reply = reply.h("oci-tag", &t.1);
        }
        reply.empty()
    })
}

async fn delete_manifest(reg: Shared, repo: String, r: &str) -> ApiResult {
    if !reg.config.delete_enabled {
        return Err(ApiError::new(
            Code::Unsupported,
            "deletes are disabled on this registry",
        ));
    }
    let reference = lookup_reference(&reg, &repo, r).await?;
    let (reg2, repo2) = (reg.clone(), repo.clone());
    let existed = blocking(move || match reference {
        Reference::Tag(t) => Ok(reg2.meta.delete_tag(&repo2, &t)?),
        Reference::Digest(d) => {
            let _w = reg2.write_lock();
            let u = reg2.meta.delete_manifest(&repo2, &d)?;
            if u.orphan {
                reg2.remove_bytes(&d)?;
            }
            Ok(u.existed)
        }
    })
    .await?;
    if !existed {
        return Err(manifest_unknown(&reg, &repo, r).await);
    }
    Ok(Reply::new(StatusCode::ACCEPTED).empty())
}

// ---------------------------------------------------------------- listings

/// `n` from the query: absent → `default`; garbage → 400; clamped to `max`.
fn page_size(query: &[(String, String)], default: usize, max: usize) -> Result<usize, ApiError> {
    match q(query, "n") {
        None | Some("") => Ok(default),
        Some(n) => n
            .parse::<usize>()
            .map(|n| n.min(max))
            .map_err(|_| ApiError::new(Code::SizeInvalid, format!("n={n:?} is not a number"))),
    }
}

fn link(path: &str, n: usize, last: &str) -> String {
    let enc = percent_encoding::utf8_percent_encode(last, percent_encoding::NON_ALPHANUMERIC);
    format!("<{path}?n={n}&last={enc}>; rel=\"next\"")
}

async fn tags(reg: Shared, repo: String, query: &[(String, String)]) -> ApiResult {
    let n = page_size(query, 10_000, 10_000)?;
    let last = q(query, "last").map(str::to_string);
    let (reg2, repo2) = (reg.clone(), repo.clone());
    let (tags, more, exists) = blocking(move || {
        let (t, more) = reg2.meta.tags(&repo2, last.as_deref(), n)?;
        let exists = !t.is_empty() || reg2.meta.repo_exists(&repo2)?;
        Ok((t, more, exists))
    })
    .await?;
    if !exists {
        return Err(ApiError::new(
            Code::NameUnknown,
            format!("repository {repo} is not known to this registry"),
        ));
    }
    let body = serde_json::json!({ "name": repo, "tags": tags }).to_string();
    let mut reply = Reply::new(StatusCode::OK).h("content-type", "application/json");
    if more && n > 0 {
        if let Some(l) = tags.last() {
            reply = reply.h("link", link(&format!("/v2/{repo}/tags/list"), n, l));
        }
    }
    Ok(reply
        .h("content-length", body.len().to_string())
        .body(Body::from(body)))
}

async fn catalog(reg: Shared, query: &[(String, String)], headers: &HeaderMap) -> ApiResult {
    let n = page_size(query, 1000, 10_000)?;
    let last = q(query, "last").map(str::to_string);
    let (reg2, headers) = (reg.clone(), headers.clone());
    // Only the repositories the caller may pull from, filtered before the page is cut.
    let (repos, more) = blocking(move || {
        Ok(reg2.meta.repos(last.as_deref(), n, |r| {
            reg2.may(&headers, Some(r), Action::Pull)
        })?)
    })
    .await?;
    let body = serde_json::json!({ "repositories": repos }).to_string();
    let mut reply = Reply::new(StatusCode::OK).h("content-type", "application/json");
    if more && n > 0 {
        if let Some(l) = repos.last() {
            reply = reply.h("link", link("/v2/_catalog", n, l));
        }
    }
    Ok(reply
        .h("content-length", body.len().to_string())
        .body(Body::from(body)))
}

async fn referrers(reg: Shared, repo: String, d: &str, query: &[(String, String)]) -> ApiResult {
    let subject = parse_digest(d)?;
    let filter = q(query, "artifactType").map(str::to_string);
    let reg2 = reg.clone();
    let mut list = blocking(move || Ok(reg2.meta.referrers(&repo, &subject)?)).await?;
    if let Some(f) = &filter {
        list.retain(|desc| desc.get("artifactType").and_then(|a| a.as_str()) == Some(f.as_str()));
    }
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": tessera_format::media::OCI_INDEX,
        "manifests": list,
    })
    .to_string();
    let mut reply = Reply::new(StatusCode::OK).h("content-type", tessera_format::media::OCI_INDEX);
    if filter.is_some() {
        reply = reply.h("oci-filters-applied", "artifactType");
    }
    Ok(reply
        .h("content-length", body.len().to_string())
        .body(Body::from(body)))
}
