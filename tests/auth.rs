//! Registry authentication against a real docker-registry configured for token auth:
//! the bearer-token flow (anonymous and with credentials from --creds or a docker
//! config.json), served by a small token server that signs RS256 JWTs with openssl.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn b64url(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..c.len() + 1 {
            out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Standard (padded) base64, for x5c and HTTP basic auth.
fn b64std(data: &[u8]) -> String {
    let s = b64url(data).replace('-', "+").replace('_', "/");
    let pad = (4 - s.len() % 4) % 4;
    format!("{s}{}", "=".repeat(pad))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A token server on loopback: grants the scopes asked for, to anyone or only to
/// `user:password` given by HTTP basic auth. Stops when dropped.
struct TokenServer {
    port: u16,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    fn start(dir: &Path, required: Option<&str>) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (stop2, req2) = (stop.clone(), requests.clone());
        let key = dir.join("key.pem");
        let cert_der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(dir.join("cert.pem"))
            .output()
            .unwrap()
            .stdout;
        let x5c = b64std(&cert_der);
        let expect_basic = required.map(|r| format!("Basic {}", b64std(r.as_bytes())));
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                let mut r = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                let mut auth = None;
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':') {
                        if k.eq_ignore_ascii_case("authorization") {
                            auth = Some(v.trim().to_string());
                        }
                    }
                }
                req2.lock().unwrap().push(first.clone());
                let mut w = stream;
                if expect_basic.is_some() && auth != expect_basic {
                    let _ = w.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    continue;
                }
                let target = first.split_whitespace().nth(1).unwrap_or("");
                let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
                let mut access = Vec::new();
                for kv in query.split('&') {
                    if let Some(v) = kv.strip_prefix("scope=") {
                        let v = percent_decode(v);
                        let parts: Vec<&str> = v.splitn(3, ':').collect();
                        if parts.len() == 3 {
                            access.push(serde_json::json!({"type": parts[0], "name": parts[1], "actions": parts[2].split(',').collect::<Vec<_>>()}));
                        }
                    }
                }
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
                let claims = serde_json::json!({"iss": "tessera-test", "sub": "tester", "aud": "tessera-registry", "exp": now + 600, "nbf": now - 60, "iat": now, "jti": format!("{now}-{}", access.len()), "access": access});
                let signing_input = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let mut child = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(&key)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(signing_input.as_bytes())
                    .unwrap();
                let sig = child.wait_with_output().unwrap().stdout;
                let token = format!("{signing_input}.{}", b64url(&sig));
                let body =
                    serde_json::json!({"token": token, "access_token": token, "expires_in": 600})
                        .to_string();
                let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
        });
        TokenServer {
            port,
            stop,
            handle: Some(handle),
            requests,
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn token_registry(dir: &Path, required: Option<&str>) -> (DockerRegistry, TokenServer) {
    require_tool("openssl", "openssl");
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=tessera-test-token",
                "-keyout",
            ])
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem")),
    );
    let ts = TokenServer::start(dir, required);
    let yaml = format!(
        "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: tessera-registry\n    issuer: tessera-test\n    rootcertbundle: {}\n",
        ts.port,
        dir.join("cert.pem").display()
    );
    (DockerRegistry::start_with(&yaml), ts)
}

fn small_image(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    let mut t = TarBuilder::new();
    t.file(b"hello", 0o644, &noise(200_000, 9));
    write_image(
        &src,
        "v1",
        &[Layer {
            tar: t.finish(),
            compression: "gzip",
        }],
        |_| {},
    );
    src
}

#[test]
fn anonymous_bearer_token_flow() {
    let w = tempfile::tempdir().unwrap();
    let (reg, ts) = token_registry(w.path(), None);
    let src = small_image(w.path());
    let r = format!("{}/anon/img:v1", reg.addr);
    convert(&format!("oci:{}:v1", src.display()), &r, &[]);
    let out = w.path().join("rootfs");
    run_ok(tessera().args(["unpack", &r]).arg(&out));
    assert!(out.join("hello").exists());
    let reqs = ts.requests.lock().unwrap().clone();
    assert!(
        reqs.iter().any(
            |q| q.contains("scope=repository%3Aanon%2Fimg%3Apush%2Cpull")
                || q.contains("repository%3Aanon%2Fimg")
        ),
        "token requests: {reqs:?}"
    );
}

#[test]
fn credentials_from_flag_and_docker_config() {
    let w = tempfile::tempdir().unwrap();
    let (reg, _ts) = token_registry(w.path(), Some("alice:s3cret"));
    let src = small_image(w.path());
    let r = format!("{}/private/img:v1", reg.addr);
    let src_ref = format!("oci:{}:v1", src.display());
    // No credentials: a clear error that says what to do.
    let empty = w.path().join("no-docker-config");
    std::fs::create_dir_all(&empty).unwrap();
    let err = run_err(tessera().env("DOCKER_CONFIG", &empty).args([
        "convert",
        "--no-cache",
        &src_ref,
        &r,
    ]));
    assert!(
        err.contains("refused access") && err.contains("--creds"),
        "{err}"
    );
    // --creds USER:PASSWORD.
    run_ok(tessera().env("DOCKER_CONFIG", &empty).args([
        "convert",
        "--no-cache",
        "--creds",
        "alice:s3cret",
        &src_ref,
        &r,
    ]));
    // ~/.docker/config.json (via DOCKER_CONFIG).
    let cfg = w.path().join("docker");
    std::fs::create_dir_all(&cfg).unwrap();
    let auth = b64std(b"alice:s3cret");
    std::fs::write(
        cfg.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let out = w.path().join("rootfs");
    run_ok(
        tessera()
            .env("DOCKER_CONFIG", &cfg)
            .args(["unpack", &r])
            .arg(&out),
    );
    assert!(out.join("hello").exists());
}
