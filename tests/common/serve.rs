//! Harness for `tessera serve`: start the registry on a loopback port with its own
//! storage root, wait for the `listening on http://ADDR` line, and small HTTP helpers
//! (reqwest blocking, redirects disabled) for the OCI Distribution API tests.

use reqwest::blocking::{Client, Response};
use sha2::{Digest as _, Sha512};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// Error codes an OCI registry may put in a JSON error body (spec codes plus the
/// legacy optional ones).
pub const OCI_ERROR_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
    "TAG_INVALID",
    "MANIFEST_UNVERIFIED",
];

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The `{}` blob of the OCI empty descriptor.
pub const EMPTY_JSON_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// The zero-byte blob.
pub const ZERO_DIGEST: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Accept header of a client that takes every manifest type.
pub const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

pub fn sha512(data: &[u8]) -> String {
    format!("sha512:{}", hex::encode(Sha512::digest(data)))
}

/// A `tessera serve` process on a loopback port; killed on drop (its stderr is
/// printed when the dropping thread is panicking, i.e. a test failed).
pub struct TesseraServe {
    pub child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub root: PathBuf,
    pub client: Client,
    stderr_path: PathBuf,
    _log: TempDir,
    _dir: Option<TempDir>,
}

/// A blocking HTTP client that does not follow redirects.
pub fn http_client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

impl TesseraServe {
    /// Start on a fresh temporary storage root.
    pub fn start() -> TesseraServe {
        Self::start_args(&[])
    }

    /// Start on a fresh temporary storage root with extra `serve` flags.
    pub fn start_args(extra_args: &[&str]) -> TesseraServe {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let mut s = Self::start_in(&root, extra_args);
        s._dir = Some(dir);
        s
    }

    /// Start on an existing storage root (e.g. to restart after a crash).
    pub fn start_in(root: &Path, extra_args: &[&str]) -> TesseraServe {
        Self::start_in_netns(root, extra_args, None)
    }

    /// [`TesseraServe::start_in`], listening on the loopback of network namespace `netns`.
    pub fn start_in_netns(root: &Path, extra_args: &[&str], netns: Option<&str>) -> TesseraServe {
        let log = tempfile::tempdir().unwrap();
        let stderr_path = log.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = super::tessera_in(netns);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--root"])
            .arg(root)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut first = String::new();
            let n = r.read_line(&mut first).unwrap_or(0);
            let _ = tx.send(if n == 0 { None } else { Some(first) });
            // Keep draining so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let line = rx.recv_timeout(Duration::from_secs(20));
        let what = format!("{cmd:?}");
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) => fail_start(
                &mut child,
                &what,
                &stderr_path,
                "stdout closed before the first line".into(),
            ),
            Err(_) => fail_start(
                &mut child,
                &what,
                &stderr_path,
                "no `listening on` line on stdout within 20 s".into(),
            ),
        };
        let line = line.trim_end_matches(['\r', '\n']);
        let Some(addr) = line.strip_prefix("listening on http://") else {
            fail_start(
                &mut child,
                &what,
                &stderr_path,
                format!(
                    "first stdout line is {line:?}, expected `listening on http://127.0.0.1:PORT`"
                ),
            )
        };
        let ok = addr
            .strip_prefix("127.0.0.1:")
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| p != 0);
        if !ok {
            fail_start(
                &mut child,
                &what,
                &stderr_path,
                format!("first stdout line {line:?} does not name a bound 127.0.0.1 port"),
            );
        }
        TesseraServe {
            child,
            addr: addr.to_string(),
            root: root.to_path_buf(),
            client: http_client(),
            stderr_path,
            _log: log,
            _dir: None,
        }
    }

    /// A registry with htpasswd users `alice` (pull, push and delete anywhere; password
    /// `alice-pw`) and `bob` (pull anywhere; `bob-pw`), where anonymous may pull
    /// `public/*`. Its files (htpasswd, config) go to `dir`.
    pub fn start_with_users(dir: &Path) -> TesseraServe {
        super::require_tool("htpasswd", "apache2-utils");
        let pw = dir.join("htpasswd");
        for (user, pass) in [("alice", "alice-pw"), ("bob", "bob-pw")] {
            let mut c = std::process::Command::new("htpasswd");
            c.arg("-bB");
            if !pw.exists() {
                c.arg("-c");
            }
            super::run_ok(c.arg(&pw).args([user, pass]));
        }
        let cfg = dir.join("registry.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"htpasswd = "{}"
[[access]]
account = "anonymous"
repository = "public/*"
actions = ["pull"]
[[access]]
account = "alice"
repository = "*"
actions = ["pull", "push", "delete"]
[[access]]
account = "bob"
repository = "*"
actions = ["pull"]
"#,
                pw.display()
            ),
        )
        .unwrap();
        Self::start_args(&["--config", cfg.to_str().unwrap()])
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Absolute URL of a path (`/v2/...`) or of a Location header value (relative or
    /// absolute).
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{path_or_url}", self.base_url())
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send a signal (e.g. `Signal::TERM`) to the server.
    pub fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), sig).unwrap();
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t = std::time::Instant::now();
        while t.elapsed() < timeout {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    // ---- HTTP helpers -------------------------------------------------------------

    pub fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().unwrap()
    }

    pub fn head(&self, path: &str) -> Response {
        self.client.head(self.url(path)).send().unwrap()
    }

    pub fn delete(&self, path: &str) -> Response {
        self.client.delete(self.url(path)).send().unwrap()
    }

    /// POST /v2/<repo>/blobs/uploads/ (empty body); asserts 202 and returns the
    /// Location header value.
    pub fn start_upload(&self, repo: &str) -> String {
        let r = self
            .client
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/")))
            .body(Vec::new())
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "POST upload in {repo}: {}", body_text(r));
        header(&r, "location").expect("POST upload: no Location")
    }

    /// PATCH a chunk to an upload location, with `Content-Range` when `range_start`
    /// is given.
    pub fn patch(&self, location: &str, data: &[u8], range_start: Option<u64>) -> Response {
        let mut rq = self
            .client
            .patch(self.url(location))
            .header("Content-Type", "application/octet-stream");
        if let Some(s) = range_start {
            rq = rq.header(
                "Content-Range",
                format!("{s}-{}", s + data.len() as u64 - 1),
            );
        }
        rq.body(data.to_vec()).send().unwrap()
    }

    /// PUT `<location>?digest=D` with a body (possibly empty).
    pub fn put_close(&self, location: &str, digest: &str, data: &[u8]) -> Response {
        self.client
            .put(with_query(&self.url(location), "digest", digest))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .unwrap()
    }

    /// Monolithic POST + PUT of a blob; asserts 201 and returns its sha256 digest.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = super::sha(data);
        self.push_blob_as(repo, data, &d);
        d
    }

    /// Monolithic POST + PUT of a blob under a given digest (sha256 or sha512);
    /// asserts 201.
    pub fn push_blob_as(&self, repo: &str, data: &[u8], digest: &str) {
        let loc = self.start_upload(repo);
        let r = self.put_close(&loc, digest, data);
        assert_eq!(
            r.status(),
            201,
            "PUT blob {digest} in {repo}: {}",
            body_text(r)
        );
    }

    /// PUT /v2/<repo>/manifests/<reference> with the given Content-Type.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Response {
        self.client
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Content-Type", media_type)
            .body(bytes.to_vec())
            .send()
            .unwrap()
    }

    /// PUT a manifest, assert 201 and return its sha256 digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let r = self.put_manifest(repo, reference, media_type, bytes);
        assert_eq!(
            r.status(),
            201,
            "PUT manifest {repo}:{reference}: {}",
            body_text(r)
        );
        super::sha(bytes)
    }

    /// GET a manifest with an Accept header listing every manifest type.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Response {
        self.client
            .get(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Accept", ACCEPT_ALL_MANIFESTS)
            .send()
            .unwrap()
    }

    pub fn head_manifest(&self, repo: &str, reference: &str) -> Response {
        self.client
            .head(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Accept", ACCEPT_ALL_MANIFESTS)
            .send()
            .unwrap()
    }
}

fn fail_start(child: &mut Child, what: &str, stderr_path: &Path, why: String) -> ! {
    let _ = child.kill();
    let _ = child.wait();
    let err = std::fs::read_to_string(stderr_path).unwrap_or_default();
    panic!("tessera serve did not start ({why}): {what}\n--- stderr ---\n{err}");
}

impl Drop for TesseraServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- tessera serve ({}) stderr ---\n{}",
                self.addr,
                self.stderr()
            );
        }
    }
}

/// Append `key=value` (value percent-encoded where needed) to a URL.
pub fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={}", pct(value))
}

/// Percent-encode a query value (keeps unreserved characters and `:`).
pub fn pct(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response header as a string.
pub fn header(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().expect("non-ASCII header").to_string())
}

/// Status, headers and body of a response, for assertion messages.
pub fn body_text(r: Response) -> String {
    let status = r.status();
    let headers = format!("{:?}", r.headers());
    let body = r.text().unwrap_or_default();
    format!("status {status}, headers {headers}, body {body}")
}

/// Require an exact status, panicking with the whole reply otherwise.
#[track_caller]
pub fn expect_status(r: Response, status: u16, what: &str) -> Response {
    if r.status() != status {
        panic!("{what}: expected {status}, got {}", body_text(r));
    }
    r
}

/// Assert an error reply: exact status, JSON body `{"errors":[{code,message,..}]}`
/// whose codes all come from the OCI list and whose first code is one of `codes`.
/// Returns the parsed body.
#[track_caller]
pub fn assert_error(r: Response, status: u16, codes: &[&str]) -> serde_json::Value {
    assert_error_in(r, &[status], codes)
}

/// Like `assert_error` with a choice of statuses.
#[track_caller]
pub fn assert_error_in(r: Response, statuses: &[u16], codes: &[&str]) -> serde_json::Value {
    let got = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    assert!(
        statuses.contains(&got),
        "expected status {statuses:?} with code {codes:?}, got {got}: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{got} error body is not JSON ({e}): {text:?}"));
    let errs = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("error body without an `errors` array: {text}"));
    assert!(!errs.is_empty(), "empty `errors` array: {text}");
    for e in errs {
        let code = e["code"]
            .as_str()
            .unwrap_or_else(|| panic!("error without code: {text}"));
        assert!(
            OCI_ERROR_CODES.contains(&code),
            "error code {code} is not an OCI code: {text}"
        );
        assert!(e["message"].is_string(), "error without message: {text}");
    }
    let first = errs[0]["code"].as_str().unwrap();
    assert!(
        codes.contains(&first),
        "status {got}: expected code in {codes:?}, got {first}: {text}"
    );
    v
}

/// The path (and query) of a Location value, without scheme and host.
pub fn path_of(location: &str) -> String {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = location.strip_prefix(scheme) {
            return rest[rest.find('/').unwrap_or(rest.len())..].to_string();
        }
    }
    location.to_string()
}

/// A request with a body and `Connection: close` on a raw socket, so that a reply sent
/// before the whole body was read (e.g. 413) is still seen.
pub fn raw_request_with_body(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw_request(addr, &req)
}

/// Send raw bytes on a fresh connection and return the status code and the whole
/// response text (the request must ask for `Connection: close`). The request is
/// written from another thread, ignoring write errors, so a reply sent before the
/// whole body was read is still seen.
pub fn raw_request(addr: &str, request: &[u8]) -> (u16, String) {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let request = request.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&request);
    });
    let mut buf = Vec::new();
    let mut r = s;
    let mut chunk = [0u8; 65536];
    loop {
        match r.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A reset after the reply: keep what was read.
            Err(_) => break,
        }
    }
    let _ = writer.join();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in raw reply: {text:?}"));
    (status, text)
}
