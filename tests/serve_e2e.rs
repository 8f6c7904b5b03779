//! End-to-end scenarios for `tessera serve` with real components: skopeo pushing and
//! pulling corpus images, `tessera convert` using the global chunk index, tessera pack
//! verification, kill -9 during pushes, pull-through from Debian's docker-registry
//! (including a transfer cut mid-way and an upstream that dies and comes back), htpasswd
//! auth with per-repository rules, TLS, metrics and graceful shutdown.

mod common;

use common::node::wait_for_twin;
use common::serve::TesseraServe;
use common::{require_tool, run_json, run_ok, sha, tessera, DockerRegistry};
use sha2::Digest as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn corpus() -> PathBuf {
    let c = PathBuf::from(
        std::env::var("TESSERA_CORPUS").unwrap_or_else(|_| "/var/cache/tessera/corpus".into()),
    );
    assert!(
        c.join("layout/index.json").exists(),
        "corpus missing at {}: run scripts/corpus.sh {} (scripts/test.sh does this)",
        c.display(),
        c.display()
    );
    c
}

/// Manifest digests of the corpus layout by tag.
fn corpus_tags() -> Vec<(String, String)> {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus().join("layout/index.json")).unwrap())
            .unwrap();
    idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                m["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn skopeo(args: &[&str]) -> String {
    require_tool("skopeo", "skopeo");
    run_ok(Command::new("skopeo").args(args))
}

fn push_corpus(addr: &str, tag: &str, dest: &str) {
    let src = format!("oci:{}:{tag}", corpus().join("layout").display());
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src,
        &format!("docker://{addr}/{dest}"),
    ]);
}

fn http() -> reqwest::blocking::Client {
    common::serve::http_client()
}

/// Digest of the manifest `reference` as served.
fn served_digest(addr: &str, repo: &str, reference: &str) -> String {
    let r = http()
        .get(format!("http://{addr}/v2/{repo}/manifests/{reference}"))
        .header("accept", common::serve::ACCEPT_ALL_MANIFESTS)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "GET manifest {repo}:{reference}");
    let header = r.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();
    let body = r.bytes().unwrap();
    assert_eq!(sha(&body), header, "body digest vs Docker-Content-Digest");
    header
}

/// Every tag of every repository resolves to a manifest whose blobs are all readable
/// with the recorded size and digest.
fn fsck(addr: &str) {
    let c = http();
    let cat: serde_json::Value = c
        .get(format!("http://{addr}/v2/_catalog"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    for repo in cat["repositories"].as_array().unwrap() {
        let repo = repo.as_str().unwrap();
        let tags: serde_json::Value = c
            .get(format!("http://{addr}/v2/{repo}/tags/list"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        for tag in tags["tags"].as_array().unwrap() {
            let tag = tag.as_str().unwrap();
            let m = c
                .get(format!("http://{addr}/v2/{repo}/manifests/{tag}"))
                .header("accept", common::serve::ACCEPT_ALL_MANIFESTS)
                .send()
                .unwrap();
            assert_eq!(
                m.status(),
                200,
                "{repo}:{tag} is tagged but its manifest is gone"
            );
            let m: serde_json::Value = m.json().unwrap();
            let mut blobs = vec![m["config"].clone()];
            blobs.extend(m["layers"].as_array().cloned().unwrap_or_default());
            for b in blobs {
                let d = b["digest"].as_str().unwrap();
                let r = c
                    .get(format!("http://{addr}/v2/{repo}/blobs/{d}"))
                    .send()
                    .unwrap();
                assert_eq!(
                    r.status(),
                    200,
                    "{repo}:{tag} references {d}, which is not served"
                );
                let body = r.bytes().unwrap();
                assert_eq!(body.len() as u64, b["size"].as_u64().unwrap());
                assert_eq!(sha(&body), d, "blob {d} served with other content");
            }
        }
    }
}

#[test]
fn skopeo_push_and_pull_every_corpus_image_byte_for_byte() {
    let s = TesseraServe::start();
    let out = tempfile::tempdir().unwrap();
    for (tag, digest) in corpus_tags() {
        push_corpus(&s.addr, &tag, &format!("corpus/{tag}:v1"));
        assert_eq!(
            served_digest(&s.addr, &format!("corpus/{tag}"), "v1"),
            digest
        );
        assert_eq!(
            served_digest(&s.addr, &format!("corpus/{tag}"), &digest),
            digest
        );
        let dst = out.path().join(&tag);
        skopeo(&[
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            &format!("docker://{}/corpus/{tag}:v1", s.addr),
            &format!("oci:{}:{tag}", dst.display()),
        ]);
        let raw = skopeo(&["inspect", "--raw", &format!("oci:{}:{tag}", dst.display())]);
        assert_eq!(
            sha(raw.as_bytes()),
            digest,
            "pulled manifest of {tag} differs"
        );
    }
    fsck(&s.addr);
    // Layers shared by several images are stored once.
    let stored: u64 = walk_size(&s.root.join("blobs"));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus().join("summary.json")).unwrap()).unwrap();
    let mut unique = std::collections::BTreeMap::new();
    for img in summary["images"].as_array().unwrap() {
        for l in img["layers"].as_array().unwrap() {
            unique.insert(
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            );
        }
    }
    let unique_layers: u64 = unique.values().sum();
    assert!(
        stored < unique_layers + 2_000_000,
        "stored {stored} bytes for {unique_layers} bytes of unique layers: blobs are not deduplicated"
    );
}

fn walk_size(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            walk_size(&e.path())
        } else {
            m.len()
        };
    }
    n
}

#[test]
fn convert_into_the_registry_uploads_only_chunks_it_lacks() {
    let s = TesseraServe::start();
    let archives = corpus().join("docker-archive");
    let src = |n: &str| {
        format!(
            "docker-archive:{}",
            archives.join(format!("{n}.tar")).display()
        )
    };
    let first = run_json(tessera().args([
        "convert",
        "--no-cache",
        "--json",
        &src("debian-base"),
        &format!("{}/team-a/base:tessera", s.addr),
    ]));
    assert_eq!(first["images"][0]["registry_dedup_chunks"], 0);
    // Another repository, another image sharing almost every chunk: no dictionary given.
    let second = run_json(tessera().args([
        "convert",
        "--no-cache",
        "--json",
        &src("debian-base-rebuilt"),
        &format!("{}/team-b/rebuilt:tessera", s.addr),
    ]));
    let img = &second["images"][0];
    let chunks = img["chunks"].as_u64().unwrap();
    let deduped = img["registry_dedup_chunks"].as_u64().unwrap();
    assert!(
        deduped * 100 >= chunks * 95,
        "only {deduped} of {chunks} chunks were found in the registry"
    );
    assert!(img["new_stored_bytes"].as_u64().unwrap() < 2_000_000);
    // The result is complete in its own repository (packs were mounted) and unpacks to the
    // same tree as a local conversion.
    fsck(&s.addr);
    let work = tempfile::tempdir().unwrap();
    let local = format!("oci:{}:x", work.path().join("layout").display());
    run_ok(tessera().args(["convert", "--no-cache", &src("debian-base-rebuilt"), &local]));
    let a = work.path().join("a");
    let b = work.path().join("b");
    run_ok(
        tessera()
            .args(["unpack", &format!("{}/team-b/rebuilt:tessera", s.addr)])
            .arg(&a),
    );
    run_ok(tessera().args(["unpack", &local]).arg(&b));
    run_ok(tessera().arg("diff-tree").arg(&a).arg(&b));
    // Without the chunk index (--no-global-dedup) everything is uploaded again.
    let third = run_json(tessera().args([
        "convert",
        "--no-cache",
        "--json",
        "--no-global-dedup",
        &src("debian-base-rebuilt"),
        &format!("{}/team-c/rebuilt:tessera", s.addr),
    ]));
    assert_eq!(third["images"][0]["registry_dedup_chunks"], 0);
}

/// POST ?digest= monolithic upload; returns the digest.
fn push_blob(addr: &str, repo: &str, data: &[u8]) -> String {
    let d = sha(data);
    let r = http()
        .post(format!("http://{addr}/v2/{repo}/blobs/uploads/?digest={d}"))
        .body(data.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "push blob {d}");
    d
}

fn query_chunks(addr: &str, ids: &[String]) -> Vec<serde_json::Value> {
    let r = http()
        .post(format!("http://{addr}/tessera/v1/chunks"))
        .json(&serde_json::json!({ "chunks": ids }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().unwrap();
    v["chunks"].as_array().unwrap().clone()
}

#[test]
fn tessera_packs_are_verified_before_their_chunks_are_admitted() {
    let s = TesseraServe::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    // A small tessera image, converted locally.
    let mut tb = common::TarBuilder::new();
    tb.dir(b"etc", 0o755)
        .file(b"etc/a", 0o644, &common::noise(300_000, 7))
        .file(b"etc/b", 0o644, &common::noise(200_000, 8));
    let layer = tb.finish();
    common::write_image(
        &layout,
        "src",
        &[common::Layer {
            tar: layer,
            compression: "gzip",
        }],
        |_| {},
    );
    run_ok(tessera().args([
        "convert",
        "--no-cache",
        &format!("oci:{}:src", layout.display()),
        &format!("oci:{}:t", layout.display()),
    ]));
    let raw = skopeo(&["inspect", "--raw", &format!("oci:{}:t", layout.display())]);
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let pack_desc = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.tessera.pack.v1")
        .unwrap()
        .clone();
    let pack = blob(pack_desc["digest"].as_str().unwrap());
    let toc = tessera_format::pack::read_toc(&mut std::io::Cursor::new(&pack)).unwrap();
    let ids: Vec<String> = toc.iter().map(|e| e.id.hex()).collect();
    let config = m["config"]["digest"].as_str().unwrap().to_string();
    push_blob(&s.addr, "bad", &blob(&config));

    // A pack whose bytes hash to their blob digest but whose first chunk is corrupt.
    let mut corrupt = pack.clone();
    corrupt[toc[0].offset as usize + toc[0].stored_len as usize / 2] ^= 0x55;
    // A pack cut short (footer and TOC gone).
    let truncated = pack[..pack.len() - 30].to_vec();
    // The manifest must list exactly its index's packs (docs/format.md §5.1), so each
    // bad pack comes with an index that names it: only the pack's own check can fail.
    let index =
        tessera_format::index::Index::decode(&blob(m["layers"][0]["digest"].as_str().unwrap()))
            .unwrap();
    assert_eq!(index.packs.len(), 1, "the test image has one pack");
    for (what, bytes) in [("corrupt", corrupt), ("truncated", truncated)] {
        let d = push_blob(&s.addr, "bad", &bytes);
        let mut naming = index.clone();
        naming.packs = vec![d.parse().unwrap()];
        let naming = naming.encode().unwrap();
        let nd = push_blob(&s.addr, "bad", &naming);
        let mut bad = m.clone();
        bad["layers"] = serde_json::json!([{
            "mediaType": "application/vnd.tessera.index.v1", "digest": nd, "size": naming.len()
        }, {
            "mediaType": "application/vnd.tessera.pack.v1", "digest": d, "size": bytes.len()
        }]);
        let r = http()
            .put(format!("http://{}/v2/bad/manifests/{what}", s.addr))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(serde_json::to_vec(&bad).unwrap())
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{what} pack accepted");
        let body: serde_json::Value = r.json().unwrap();
        assert_eq!(body["errors"][0]["code"], "MANIFEST_INVALID");
        let msg = body["errors"][0]["message"].as_str().unwrap();
        assert!(
            msg.contains(&d),
            "{what}: error does not name the pack: {msg}"
        );
        let g = http()
            .get(format!("http://{}/v2/bad/manifests/{what}", s.addr))
            .send()
            .unwrap();
        assert_eq!(g.status(), 404, "{what}: rejected manifest is visible");
    }
    assert!(
        query_chunks(&s.addr, &ids).iter().all(|c| c.is_null()),
        "chunks of a rejected pack entered the chunk index"
    );
    // An index that names a pack the manifest does not carry is rejected too.
    let index_desc = m["layers"][0].clone();
    assert_eq!(index_desc["mediaType"], "application/vnd.tessera.index.v1");
    push_blob(
        &s.addr,
        "bad",
        &blob(index_desc["digest"].as_str().unwrap()),
    );
    let mut orphan = m.clone();
    orphan["layers"] = serde_json::json!([index_desc]);
    let r = http()
        .put(format!("http://{}/v2/bad/manifests/orphan", s.addr))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&orphan).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);

    // The intact image is accepted and every chunk is then found, in the pack pushed.
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:t", layout.display()),
        &format!("docker://{}/good/img:t", s.addr),
    ]);
    let hits = query_chunks(&s.addr, &ids);
    for (h, e) in hits.iter().zip(&toc) {
        assert_eq!(h["pack"], pack_desc["digest"]);
        assert_eq!(h["repository"], "good/img");
        assert_eq!(h["offset"], e.offset);
        assert_eq!(h["stored_len"], e.stored_len);
        assert_eq!(h["frame_len"], e.frame_len);
        assert_eq!(h["inner"], e.inner);
    }
    // Deleting the pack's last link drops its chunks from the index.
    let r = http()
        .delete(format!(
            "http://{}/v2/good/img/blobs/{}",
            s.addr,
            pack_desc["digest"].as_str().unwrap()
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(query_chunks(&s.addr, &ids).iter().all(|c| c.is_null()));
    // A query as large as the client sends (20000 ids per batch, here 60000) is answered.
    let many: Vec<String> = (0..60_000u32)
        .map(|i| hex::encode(sha2::Sha256::digest(i.to_le_bytes())))
        .collect();
    assert_eq!(query_chunks(&s.addr, &many).len(), 60_000);
    // Malformed queries get a clear 400.
    let r = http()
        .post(format!("http://{}/tessera/v1/chunks", s.addr))
        .body("{\"chunks\": [\"nothex\"]}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[test]
fn kill_9_during_pushes_never_leaves_a_tag_without_its_manifest_or_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let tags = corpus_tags();
    let (tag, digest) = tags
        .iter()
        .find(|(t, _)| t == "app-pandas-a")
        .unwrap()
        .clone();
    for (round, delay_ms) in [200u64, 700, 1500].into_iter().enumerate() {
        let mut s = TesseraServe::start_in(&root, &[]);
        let src = format!("oci:{}:{tag}", corpus().join("layout").display());
        let mut push = Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
                &src,
            ])
            .arg(format!("docker://{}/crash/img:r{round}", s.addr))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        s.kill9();
        let _ = push.kill();
        let _ = push.wait();
        let s = TesseraServe::start_in(&root, &[]);
        fsck(&s.addr);
        drop(s);
    }
    // After the crashes a full push succeeds and everything acknowledged is served.
    let s = TesseraServe::start_in(&root, &[]);
    push_corpus(&s.addr, &tag, "crash/img:final");
    assert_eq!(served_digest(&s.addr, "crash/img", "final"), digest);
    fsck(&s.addr);
}

/// A loopback TCP proxy in front of an upstream registry that records request lines and,
/// while `cut` is non-zero, closes blob responses after that many bytes.
struct CutProxy {
    addr: String,
    cut: Arc<AtomicU64>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl CutProxy {
    fn start(upstream: String) -> CutProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (c2, r2) = (cut.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(client) = conn else { continue };
                let (up, cut, reqs) = (upstream.clone(), c2.clone(), r2.clone());
                std::thread::spawn(move || {
                    let _ = proxy_one(client, &up, &cut, &reqs);
                });
            }
        });
        CutProxy {
            addr,
            cut,
            requests,
        }
    }

    fn count(&self, needle: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.contains(needle))
            .count()
    }
}

fn proxy_one(
    client: TcpStream,
    upstream: &str,
    cut: &AtomicU64,
    reqs: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut request_line = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if request_line.is_empty() {
            request_line = line.trim_end().to_string();
        }
        if line == "\r\n" {
            break;
        }
        // One request per connection: we add our own Connection header.
        if !line.to_ascii_lowercase().starts_with("connection:") {
            head.extend_from_slice(line.as_bytes());
        }
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    reqs.lock().unwrap().push(request_line.clone());
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&head)?;
    let limit = cut.load(Ordering::SeqCst);
    let mut client = client;
    if limit > 0 && request_line.starts_with("GET") && request_line.contains("/blobs/") {
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0u64;
        while sent < limit {
            let n = up.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let n = n.min((limit - sent) as usize);
            client.write_all(&buf[..n])?;
            sent += n as u64;
        }
        // Upstream dies mid-transfer.
        let _ = client.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
    std::io::copy(&mut up, &mut client)?;
    Ok(())
}

/// Push a blob to docker-registry (POST, then PUT with the body).
fn push_blob_upstream(addr: &str, repo: &str, data: &[u8]) -> String {
    let c = http();
    let d = sha(data);
    let r = c
        .post(format!("http://{addr}/v2/{repo}/blobs/uploads/"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let url = if loc.starts_with("http") {
        loc
    } else {
        format!("http://{addr}{loc}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{url}{sep}digest={d}"))
        .body(data.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "push to docker-registry");
    d
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn pull_through_blob_single_flight_and_broken_transfers_cache_nothing() {
    let upstream = DockerRegistry::start();
    let big = common::noise(24 << 20, 42);
    let d = push_blob_upstream(&upstream.addr, "lib/big", &big);
    let proxy = CutProxy::start(upstream.addr.clone());
    let s = TesseraServe::start_args(&["--upstream", &format!("up=http://{}", proxy.addr)]);
    let url = format!("http://{}/v2/up/lib/big/blobs/{d}", s.addr);
    let stored = s.root.join("blobs/sha256").join(&d[7..9]).join(&d[7..]);

    // 1. The upstream transfer breaks after 3 MB: the client fails, nothing is cached.
    proxy.cut.store(3 << 20, Ordering::SeqCst);
    let got = http().get(&url).send().and_then(|r| r.bytes());
    assert!(
        got.map(|b| b.len() < big.len()).unwrap_or(true),
        "a broken upstream transfer was served as complete"
    );
    wait_until("the failed session to be cleaned up", || {
        std::fs::read_dir(s.root.join("uploads")).unwrap().count() == 0
    });
    assert!(!stored.exists(), "a partial blob was cached");

    // 2. Eight clients at once: one upstream download, streamed to all of them.
    proxy.cut.store(0, Ordering::SeqCst);
    let before = proxy.count(&format!("GET /v2/lib/big/blobs/{d}"));
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (url, b) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                let r = http().get(&url).send().unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().unwrap().to_vec()
            })
        })
        .collect();
    for h in handles {
        let body = h.join().unwrap();
        assert_eq!(body.len(), big.len());
        assert!(body == big, "a client got different bytes");
    }
    assert_eq!(
        proxy.count(&format!("GET /v2/lib/big/blobs/{d}")) - before,
        1,
        "concurrent clients caused several upstream downloads"
    );
    wait_until("the blob to be committed", || stored.exists());

    // 3. Cached: served with the upstream gone, Range included.
    drop(upstream);
    let r = http()
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().unwrap()[..], &big[1000..2000]);
    let metrics = http()
        .get(format!("http://{}/metrics", s.addr))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("tessera_registry_upstream_errors_total"),
        "{metrics}"
    );
}

#[test]
fn pull_through_images_from_docker_registry_survive_the_upstream_dying() {
    let mut upstream = DockerRegistry::start();
    push_corpus(&upstream.addr, "debian-base", "corpus/debian:base");
    let base_digest = corpus_tags()
        .into_iter()
        .find(|(t, _)| t == "debian-base")
        .unwrap()
        .1;
    let work = tempfile::tempdir().unwrap();
    let cfg = work.path().join("registry.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\ntag_ttl_secs = 0\n",
            upstream.addr
        ),
    )
    .unwrap();
    let s = TesseraServe::start_args(&["--config", cfg.to_str().unwrap()]);
    let pull = |to: &str| {
        skopeo(&[
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            &format!("docker://{}/up/corpus/debian:base", s.addr),
            &format!("oci:{}:x", work.path().join(to).display()),
        ])
    };
    pull("first");
    assert_eq!(
        served_digest(&s.addr, "up/corpus/debian", "base"),
        base_digest
    );
    // containerd's form: the upstream named by ?ns=.
    let r = http()
        .get(format!(
            "http://{}/v2/corpus/debian/manifests/base?ns=up",
            s.addr
        ))
        .header("accept", common::serve::ACCEPT_ALL_MANIFESTS)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["oci-namespace"], "up");
    // ?ns= names the pull-through repository up/corpus/debian: it never writes into a
    // local repository of the same name.
    let r = http()
        .get(format!("http://{}/v2/corpus/debian/tags/list", s.addr))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404, "?ns= created a local repository");

    // Upstream down: the cached tag (even past its TTL) and blobs are served.
    upstream.kill();
    pull("second");
    // Pushing into a pull-through repository is refused.
    let r = http()
        .post(format!(
            "http://{}/v2/up/corpus/debian/blobs/uploads/",
            s.addr
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);

    // Upstream back with the tag moved: the TTL-expired tag follows it.
    upstream.restart();
    push_corpus(&upstream.addr, "debian-python", "corpus/debian:base");
    let python_digest = corpus_tags()
        .into_iter()
        .find(|(t, _)| t == "debian-python")
        .unwrap()
        .1;
    assert_eq!(
        served_digest(&s.addr, "up/corpus/debian", "base"),
        python_digest
    );
    pull("third");
    // The old image is still there by digest.
    assert_eq!(
        served_digest(&s.addr, "up/corpus/debian", &base_digest),
        base_digest
    );
}

#[test]
fn htpasswd_auth_with_per_repository_rules() {
    let work = tempfile::tempdir().unwrap();
    let s = TesseraServe::start_with_users(work.path());
    let src = format!("oci:{}:debian-base", corpus().join("layout").display());
    let push = |creds: Option<&str>, dest: &str| {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(cr) = creds {
            c.args(["--dest-creds", cr]);
        }
        c.arg(&src).arg(format!("docker://{}/{dest}", s.addr));
        c.output().unwrap()
    };
    assert!(push(Some("alice:alice-pw"), "public/debian:1")
        .status
        .success());
    assert!(push(Some("alice:alice-pw"), "private/debian:1")
        .status
        .success());
    let bob = push(Some("bob:bob-pw"), "private/debian:2");
    assert!(!bob.status.success(), "bob may only pull");
    let wrong = push(Some("alice:nope"), "private/debian:3");
    assert!(!wrong.status.success(), "wrong password accepted");

    let c = http();
    let get = |path: &str, auth: Option<(&str, &str)>| {
        let mut r = c.get(format!("http://{}{path}", s.addr));
        if let Some((u, p)) = auth {
            r = r.basic_auth(u, Some(p));
        }
        r.header("accept", common::serve::ACCEPT_ALL_MANIFESTS)
            .send()
            .unwrap()
    };
    assert_eq!(get("/v2/public/debian/manifests/1", None).status(), 200);
    let cat: serde_json::Value = get("/v2/_catalog", None).json().unwrap();
    assert_eq!(
        cat["repositories"],
        serde_json::json!(["public/debian"]),
        "the catalog shows anonymous callers repositories they cannot read"
    );
    let r = get("/v2/private/debian/manifests/1", None);
    assert_eq!(r.status(), 401);
    // A bearer challenge naming the token endpoint and the scope this request needs.
    let chal = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        chal.starts_with("Bearer realm=\"http://")
            && chal.contains("/token\"")
            && chal.contains("scope=\"repository:private/debian:pull\""),
        "{chal}"
    );
    assert_eq!(
        get("/v2/private/debian/manifests/1", Some(("bob", "bob-pw"))).status(),
        200
    );
    let r = c
        .delete(format!("http://{}/v2/private/debian/manifests/1", s.addr))
        .basic_auth("bob", Some("bob-pw"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    // Without an anonymous rule the base endpoint challenges.
    let cfg2 = work.path().join("closed.toml");
    std::fs::write(
        &cfg2,
        format!(
            "htpasswd = \"{}\"\n",
            work.path().join("htpasswd").display()
        ),
    )
    .unwrap();
    let closed = TesseraServe::start_args(&["--config", cfg2.to_str().unwrap()]);
    let r = c.get(format!("http://{}/v2/", closed.addr)).send().unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("http://{}/v2/", closed.addr))
        .basic_auth("bob", Some("bob-pw"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn tls_with_rustls_from_pem_files() {
    require_tool("openssl", "openssl");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (ca_pem, cert, key) = (w.join("ca.pem"), w.join("cert.pem"), w.join("key.pem"));
    // A throwaway CA and a server certificate for 127.0.0.1 signed by it.
    let openssl = |args: &[&str]| run_ok(Command::new("openssl").current_dir(w).args(args));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=tessera-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
    ]);
    std::fs::write(
        w.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        "cert.pem",
        "-extfile",
        "ext.cnf",
    ]);
    let mut child = tessera()
        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(work.path().join("root"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on https://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_pem).unwrap()).unwrap();
    let c = reqwest::blocking::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let r = c.get(format!("https://{addr}/v2/")).send().unwrap();
    assert_eq!(r.status(), 200);
    // skopeo verifies the certificate through --dest-cert-dir.
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&ca_pem, certs.join("ca.crt")).unwrap();
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-cert-dir",
        certs.to_str().unwrap(),
        &format!("oci:{}:debian-base", corpus().join("layout").display()),
        &format!("docker://{addr}/tls/debian:1"),
    ]);
    let r = c
        .get(format!("https://{addr}/v2/tls/debian/tags/list"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP on the TLS port is not served.
    assert!(
        http().get(format!("http://{addr}/v2/")).send().is_err()
            || http()
                .get(format!("http://{addr}/v2/"))
                .send()
                .unwrap()
                .status()
                != 200
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn sigterm_finishes_in_flight_uploads_and_sessions_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut s = TesseraServe::start_in(&root, &[]);
    let data = common::noise(4 << 20, 9);
    let d = sha(&data);
    let r = http()
        .post(format!("http://{}/v2/g/blobs/uploads/", s.addr))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    // A PATCH in flight when SIGTERM arrives: sent half, signal, then the rest.
    let mut conn = TcpStream::connect(&s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        conn,
        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Range: 0-{}\r\nContent-Length: {}\r\n\r\n",
        s.addr,
        data.len() - 1,
        data.len()
    )
    .unwrap();
    conn.write_all(&data[..data.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = s.child.id();
    run_ok(Command::new("kill").args(["-TERM", &pid.to_string()]));
    std::thread::sleep(Duration::from_millis(300));
    conn.write_all(&data[data.len() / 2..]).unwrap();
    let mut resp = String::new();
    BufReader::new(&conn).read_line(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 202"),
        "in-flight PATCH got {resp:?}"
    );
    drop(conn);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    // A new process on the same root continues the session.
    let s = TesseraServe::start_in(&root, &[]);
    let r = http()
        .get(format!("http://{}{loc}", s.addr))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], format!("0-{}", data.len() - 1));
    let r = http()
        .put(format!("http://{}{loc}?digest={d}", s.addr))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let got = http()
        .get(format!("http://{}/v2/g/blobs/{d}", s.addr))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(got[..] == data[..]);
    let m = http()
        .get(format!("http://{}/metrics", s.addr))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        m.contains("tessera_registry_http_requests_total{method=\"PUT\",route=\"upload\",status=\"201\"} 1"),
        "{m}"
    );
}

#[test]
fn convert_on_push_makes_tessera_twins_of_pushed_and_pulled_through_images() {
    let upstream = DockerRegistry::start();
    push_corpus(&upstream.addr, "debian-python", "lib/python:3");
    let s = TesseraServe::start_args(&[
        "--convert-on-push",
        "--upstream",
        &format!("up=http://{}", upstream.addr),
    ]);
    let tags = corpus_tags();
    let digest_of = |t: &str| tags.iter().find(|(n, _)| n == t).unwrap().1.clone();
    push_corpus(&s.addr, "debian-base", "lib/debian:base");
    let base_twin = wait_for_twin(&s.addr, "lib/debian", &digest_of("debian-base"));
    push_corpus(&s.addr, "debian-base-rebuilt", "lib/debian:rebuilt");
    let rebuilt_twin = wait_for_twin(&s.addr, "lib/debian", &digest_of("debian-base-rebuilt"));
    // The second twin reuses the first one's packs (global chunk index).
    let layers = |d: &str| -> Vec<String> {
        let m: serde_json::Value = http()
            .get(format!("http://{}/v2/lib/debian/manifests/{d}", s.addr))
            .send()
            .unwrap()
            .json()
            .unwrap();
        m["layers"].as_array().unwrap()[1..]
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    };
    let base_packs = layers(&base_twin);
    assert!(
        layers(&rebuilt_twin).iter().any(|p| base_packs.contains(p)),
        "the rebuilt twin shares no pack with the base twin"
    );
    // Twins unpack to the same tree as a conversion done by the client.
    let work = tempfile::tempdir().unwrap();
    let local = format!("oci:{}:x", work.path().join("layout").display());
    let src = format!(
        "docker-archive:{}",
        corpus()
            .join("docker-archive/debian-base-rebuilt.tar")
            .display()
    );
    run_ok(tessera().args(["convert", "--no-cache", &src, &local]));
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    run_ok(
        tessera()
            .args(["unpack", &format!("{}/lib/debian@{rebuilt_twin}", s.addr)])
            .arg(&a),
    );
    run_ok(tessera().args(["unpack", &local]).arg(&b));
    run_ok(tessera().arg("diff-tree").arg(&a).arg(&b));
    // An image pulled through gets its twin too (its blobs are fetched for it).
    let d = served_digest(&s.addr, "up/lib/python", "3");
    assert_eq!(d, digest_of("debian-python"));
    wait_for_twin(&s.addr, "up/lib/python", &d);
    let m = http()
        .get(format!("http://{}/metrics", s.addr))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        m.contains("tessera_registry_twins_converted_total 3"),
        "{m}"
    );
}

#[test]
fn a_full_disk_is_a_clear_507_and_loses_nothing() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=6m", "tessera-full"])
            .arg(&root),
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(root.clone());
    let s = TesseraServe::start_in(&root, &[]);
    let small = common::noise(500_000, 1);
    let d_small = push_blob(&s.addr, "f", &small);
    let big = common::noise(8 << 20, 2);
    let r = http()
        .post(format!(
            "http://{}/v2/f/blobs/uploads/?digest={}",
            s.addr,
            sha(&big)
        ))
        .body(big.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 507, "a full disk must be 507");
    let body: serde_json::Value = r.json().unwrap();
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("full"), "unclear message: {msg}");
    // Nothing half-written is visible, what was stored before is intact, and once space
    // is free again (the failed upload's bytes were released) pushes work.
    let r = http()
        .head(format!("http://{}/v2/f/blobs/{}", s.addr, sha(&big)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let got = http()
        .get(format!("http://{}/v2/f/blobs/{d_small}", s.addr))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(got[..] == small[..]);
    push_blob(&s.addr, "f", &common::noise(300_000, 3));
}

#[test]
fn one_writer_per_upload_session() {
    let s = TesseraServe::start();
    let r = http()
        .post(format!("http://{}/v2/w/blobs/uploads/", s.addr))
        .send()
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let data = common::noise(2 << 20, 5);
    // First PATCH: headers and half of the body, then it stalls.
    let mut conn = TcpStream::connect(&s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        conn,
        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Range: 0-{}\r\nContent-Length: {}\r\n\r\n",
        s.addr,
        data.len() - 1,
        data.len()
    )
    .unwrap();
    conn.write_all(&data[..data.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A second writer meanwhile is refused instead of interleaving its bytes.
    let r = http()
        .patch(format!("http://{}{loc}", s.addr))
        .header("content-range", format!("0-{}", data.len() - 1))
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 416);
    conn.write_all(&data[data.len() / 2..]).unwrap();
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 202"), "{line:?}");
    let r = http()
        .put(format!("http://{}{loc}?digest={}", s.addr, sha(&data)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
}
