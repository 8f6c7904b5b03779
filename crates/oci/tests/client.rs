//! The Distribution client against a real HTTP server on loopback that behaves like the
//! registries tessera meets: a token server whose tokens expire mid-upload, Basic auth,
//! transient 503s, answers that must not be retried, and a registry that ignores Range.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tessera_format::Digest;
use tessera_oci::auth::Credentials;
use tessera_oci::client::{Body, Client, ClientOptions};
use tessera_oci::registry::{runtime, Registry};
use tessera_oci::{OciError, RangeRead, Store};

#[derive(Default)]
struct Fake {
    /// "bearer" or "basic" or "" (open).
    auth: Mutex<String>,
    /// Tokens issued and still valid.
    valid: Mutex<Vec<String>>,
    issued: AtomicU64,
    /// Requests answered 401 because their token had been revoked.
    revoked_hits: AtomicUsize,
    /// Revoke every token after this many authorized requests (0: never).
    revoke_every: AtomicUsize,
    authorized: AtomicUsize,
    /// Per path: how many times it was asked.
    hits: Mutex<HashMap<String, usize>>,
    /// Answer 503 this many times before anything else.
    fail_first: AtomicUsize,
    /// Ignore Range headers.
    ignore_range: Mutex<bool>,
    blobs: Mutex<HashMap<String, Vec<u8>>>,
    /// Upload bodies received by PUT (length of each).
    put_lens: Mutex<Vec<usize>>,
    token_scopes: Mutex<Vec<String>>,
}

async fn token(State(f): State<Arc<Fake>>, Query(q): Query<Vec<(String, String)>>) -> Response {
    let n = f.issued.fetch_add(1, Ordering::SeqCst);
    let t = format!("tok{n}");
    f.valid.lock().unwrap().push(t.clone());
    for (k, v) in q {
        if k == "scope" {
            f.token_scopes.lock().unwrap().push(v);
        }
    }
    axum::Json(serde_json::json!({"token": t, "expires_in": 300})).into_response()
}

async fn api(
    State(f): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    *f.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    if f.fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")]).into_response();
    }
    let mode = f.auth.lock().unwrap().clone();
    let got = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let host = h
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let ok = match mode.as_str() {
        "bearer" => got
            .strip_prefix("Bearer ")
            .is_some_and(|t| f.valid.lock().unwrap().iter().any(|v| v == t)),
        "basic" => got == Credentials::new("u", "p").basic_header(),
        _ => true,
    };
    if !ok {
        if got.starts_with("Bearer ") {
            f.revoked_hits.fetch_add(1, Ordering::SeqCst);
        }
        let challenge = match mode.as_str() {
            "bearer" => format!(r#"Bearer realm="http://{host}/token",service="fake""#),
            _ => r#"Basic realm="fake""#.to_string(),
        };
        return (StatusCode::UNAUTHORIZED, [("www-authenticate", challenge)]).into_response();
    }
    if mode == "bearer" {
        let n = f.authorized.fetch_add(1, Ordering::SeqCst) + 1;
        let every = f.revoke_every.load(Ordering::SeqCst);
        if every > 0 && n % every == 0 {
            // The token expires after this request.
            f.valid.lock().unwrap().clear();
        }
    }
    let parts: Vec<&str> = path.trim_start_matches("/v2/").split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["bad", "blobs", _]) => StatusCode::BAD_REQUEST.into_response(),
        ("GET", ["repo", "blobs", d]) | ("HEAD", ["repo", "blobs", d]) => {
            let Some(b) = f.blobs.lock().unwrap().get(*d).cloned() else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let range = h.get("range").and_then(|v| v.to_str().ok());
            match range {
                Some(r) if !*f.ignore_range.lock().unwrap() => {
                    let (a, z) = r.trim_start_matches("bytes=").split_once('-').unwrap();
                    let (a, z): (usize, usize) = (a.parse().unwrap(), z.parse().unwrap());
                    if a >= b.len() {
                        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
                    }
                    let z = z.min(b.len() - 1);
                    (StatusCode::PARTIAL_CONTENT, b[a..=z].to_vec()).into_response()
                }
                _ => (StatusCode::OK, b).into_response(),
            }
        }
        ("POST", ["repo", "blobs", "uploads", ""]) => (
            StatusCode::ACCEPTED,
            [("location", "/v2/repo/blobs/uploads/u1")],
        )
            .into_response(),
        ("PUT", ["repo", "blobs", "uploads", "u1"]) => {
            f.put_lens.lock().unwrap().push(body.len());
            let q = uri.query().unwrap_or("");
            let d = q.trim_start_matches("digest=").to_string();
            if Digest::of(&body).to_string() != d {
                return StatusCode::BAD_REQUEST.into_response();
            }
            f.blobs.lock().unwrap().insert(d, body.to_vec());
            StatusCode::CREATED.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

struct Server {
    fake: Arc<Fake>,
    addr: String,
}

fn start() -> Server {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route("/token", any(token))
        .fallback(api)
        .with_state(fake.clone());
    let listener = runtime()
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    runtime().spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server { fake, addr }
}

fn hits(s: &Server, path: &str) -> usize {
    s.fake.hits.lock().unwrap().get(path).copied().unwrap_or(0)
}

#[test]
fn token_refreshed_on_401_for_every_request_including_file_uploads() {
    let s = start();
    *s.fake.auth.lock().unwrap() = "bearer".into();
    // Every token dies after two authorized requests: the upload's HEAD, POST and PUT
    // each may meet a dead token and must get a new one and resend (the PUT re-reads
    // its body from the file).
    s.fake.revoke_every.store(2, Ordering::SeqCst);
    let reg = Registry::new(&s.addr, "repo", true, &ClientOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3u8 {
        let data: Vec<u8> = (0..300_000u32).map(|x| (x as u8) ^ i).collect();
        let path = dir.path().join(format!("blob{i}"));
        std::fs::write(&path, &data).unwrap();
        let d = Digest::of(&data);
        reg.put_blob_file(&d, data.len() as u64, &path).unwrap();
        assert!(reg.has_blob(&d).unwrap());
        assert_eq!(
            reg.read_range(&d, 1000, 10).unwrap(),
            data[1000..1010].to_vec()
        );
    }
    assert!(
        s.fake.revoked_hits.load(Ordering::SeqCst) >= 3,
        "tokens were never refreshed: the test did not exercise a 401"
    );
    // Every PUT that reached the handler carried the whole file.
    assert!(s
        .fake
        .put_lens
        .lock()
        .unwrap()
        .iter()
        .all(|&n| n == 300_000));
    assert!(s
        .fake
        .token_scopes
        .lock()
        .unwrap()
        .iter()
        .all(|sc| sc.starts_with("repository:repo:")));
}

#[test]
fn basic_auth_when_asked_and_refused_without_credentials() {
    let s = start();
    *s.fake.auth.lock().unwrap() = "basic".into();
    let d = Digest::of(b"hello");
    s.fake
        .blobs
        .lock()
        .unwrap()
        .insert(d.to_string(), b"hello".to_vec());
    let opts = ClientOptions {
        creds: Some("u:p".into()),
        ..Default::default()
    };
    let reg = Registry::new(&s.addr, "repo", true, &opts).unwrap();
    assert!(reg.has_blob(&d).unwrap());
    let anon = Registry::new(&s.addr, "repo", true, &ClientOptions::default()).unwrap();
    match anon.has_blob(&d) {
        Err(OciError::Unauthorized { status: 401, .. }) => {}
        other => panic!("expected 401 Unauthorized, got {other:?}"),
    }
}

#[test]
fn transient_answers_are_retried_and_others_are_not() {
    let s = start();
    let d = Digest::of(b"data");
    s.fake
        .blobs
        .lock()
        .unwrap()
        .insert(d.to_string(), b"data".to_vec());
    let reg = Registry::new(&s.addr, "repo", true, &ClientOptions::default()).unwrap();
    // Two 503s, then the answer.
    s.fake.fail_first.store(2, Ordering::SeqCst);
    assert_eq!(reg.read_range(&d, 0, 4).unwrap(), b"data");
    assert_eq!(hits(&s, &format!("/v2/repo/blobs/{d}")), 3);
    // More 503s than retries: the error says what the registry answered.
    s.fake.fail_first.store(10, Ordering::SeqCst);
    let e = reg.read_range(&d, 0, 4).unwrap_err();
    assert!(e.to_string().contains("503"), "{e}");
    s.fake.fail_first.store(0, Ordering::SeqCst);
    // 404, 416 and 400 are answers, not failures: asked once each.
    let missing = Digest::of(b"missing");
    let before = hits(&s, &format!("/v2/repo/blobs/{missing}"));
    assert!(matches!(
        reg.read_range(&missing, 0, 1),
        Err(OciError::NotFound(_))
    ));
    assert_eq!(hits(&s, &format!("/v2/repo/blobs/{missing}")), before + 1);
    let path = format!("/v2/repo/blobs/{d}");
    let before = hits(&s, &path);
    assert!(reg.read_range(&d, 100, 4).is_err());
    assert_eq!(hits(&s, &path), before + 1, "416 was retried");
    let bad = reg.with_repo("bad");
    assert!(bad.read_range(&d, 0, 1).is_err());
    assert_eq!(
        hits(&s, &format!("/v2/bad/blobs/{d}")),
        1,
        "400 was retried"
    );
}

#[test]
fn a_registry_that_ignores_range_hands_over_the_whole_blob() {
    let s = start();
    let data: Vec<u8> = (0..100_000u32).map(|x| (x % 251) as u8).collect();
    let d = Digest::of(&data);
    s.fake
        .blobs
        .lock()
        .unwrap()
        .insert(d.to_string(), data.clone());
    let reg = Registry::new(&s.addr, "repo", true, &ClientOptions::default()).unwrap();
    let size = data.len() as u64;
    match reg.read_range_or_whole(&d, 10, 5, size).unwrap() {
        RangeRead::Range(b) => assert_eq!(b, data[10..15].to_vec()),
        RangeRead::Whole(_) => panic!("a 206 answer became a whole blob"),
    }
    *s.fake.ignore_range.lock().unwrap() = true;
    // read_range still gives the right bytes...
    assert_eq!(
        reg.read_range(&d, 50_000, 7).unwrap(),
        data[50_000..50_007].to_vec()
    );
    // ...and read_range_or_whole hands over the whole blob, verified.
    match reg.read_range_or_whole(&d, 50_000, 7, size).unwrap() {
        RangeRead::Whole(mut r) => {
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut all).unwrap();
            assert_eq!(all, data);
        }
        RangeRead::Range(_) => panic!("the 200 answer was not noticed"),
    }
    // A whole blob that does not match its digest fails at its end.
    let other = Digest::of(b"other");
    s.fake
        .blobs
        .lock()
        .unwrap()
        .insert(other.to_string(), data.clone());
    match reg.read_range_or_whole(&other, 0, 5, size).unwrap() {
        RangeRead::Whole(mut r) => {
            let e = std::io::Read::read_to_end(&mut r, &mut Vec::new()).unwrap_err();
            assert!(e.to_string().contains("digest mismatch"), "{e}");
        }
        RangeRead::Range(_) => panic!("the 200 answer was not noticed"),
    }
}

#[test]
fn async_client_pushes_bytes_and_reads_manifest_errors() {
    let s = start();
    let c = Client::with_credentials(&s.addr, true, None, Some(0)).unwrap();
    let d = Digest::of(b"abc");
    runtime()
        .block_on(c.push_blob("repo", &d, Body::Bytes(Bytes::from_static(b"abc"))))
        .unwrap();
    assert_eq!(
        s.fake.blobs.lock().unwrap().get(&d.to_string()).cloned(),
        Some(b"abc".to_vec())
    );
    // Already there: no second upload.
    runtime()
        .block_on(c.push_blob("repo", &d, Body::Bytes(Bytes::from_static(b"abc"))))
        .unwrap();
    assert_eq!(s.fake.put_lens.lock().unwrap().len(), 1);
    match runtime().block_on(c.manifest("repo", "latest")) {
        Err(OciError::NotFound(m)) => assert!(m.contains("repo:latest"), "{m}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}
