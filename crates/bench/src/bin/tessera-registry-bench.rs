//! `tessera-registry-bench`: `tessera serve` against docker-registry (CNCF Distribution),
//! same client, same corpus, same run.
//!
//! For each registry, on a fresh, empty storage root: skopeo pushes every corpus image
//! (from the OCI layout), then pulls every image back into a fresh OCI layout, then
//! `--clients` threads hammer the layer blobs with full GETs and Range GETs for
//! `--seconds`. Every figure comes from this run: wall times around the skopeo processes,
//! per-request latencies in the load clients, and the server's peak RSS (VmHWM from
//! /proc/PID/status, reset between phases through /proc/PID/clear_refs). Load requests
//! still in flight at the deadline are abandoned: their bytes count towards MB/s, not
//! towards requests/s or latencies.
//!
//! Correctness is checked on the way, outside the timed sections: manifests served after
//! the push must hash to the source manifest digests (skopeo runs with
//! --preserve-digests), pulled layouts must reference the same manifest digests, every
//! layer blob must hash to its digest, and every Range response must be a 206 whose body
//! equals the corpus bytes at that offset. Any failure is an error and fails the run.

#[path = "../registry_bench/http.rs"]
mod http;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use http::{Client, Outcome};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    about = "tessera serve against docker-registry: skopeo push and pull of the corpus, \
             concurrent blob and Range GETs; throughput, p99 latency, peak RSS",
    after_help = "Example:
  cargo build --release -p tessera -p tessera-bench
  target/release/tessera-registry-bench \\
      --corpus /var/cache/tessera/corpus --json /tmp/bench-registry.json

Needs skopeo, docker-registry (Debian: apt-get install skopeo docker-registry) and the
corpus (scripts/corpus.sh). Exits non-zero on errors only: missed targets
are marked MISSED in the table."
)]
struct Args {
    /// Corpus directory: an OCI image layout in DIR/layout with one tag per image.
    #[arg(long, default_value = "/var/cache/tessera/corpus")]
    corpus: PathBuf,
    /// Where pulls write their OCI layouts (default: WORK/pulled). Same for both
    /// registries; a tmpfs such as /dev/shm takes the client's disk out of the pull figure.
    #[arg(long, value_name = "DIR")]
    pull_dir: Option<PathBuf>,
    /// Scratch directory (emptied first): registry storage, pulled layouts, server logs.
    #[arg(long, default_value = "/var/tmp/tessera-registry-bench")]
    work: PathBuf,
    /// The tessera binary (default: next to this one).
    #[arg(long)]
    tessera: Option<PathBuf>,
    /// The docker-registry binary.
    #[arg(long, default_value = "docker-registry")]
    docker_registry: String,
    /// The skopeo binary.
    #[arg(long, default_value = "skopeo")]
    skopeo: String,
    /// Run every phase this many times (fresh servers each round, the order of the two
    /// registries alternating); the table shows medians, peak RSS the maximum.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Concurrent clients in the load phase.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Duration of the load phase, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Only run the load phase (images are still pushed, untimed, to have blobs to GET).
    #[arg(long)]
    skip_push_pull: bool,
    /// Seed of the load clients' random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-registry.json")]
    json: PathBuf,
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";
const RSS_TARGET_MIB: f64 = 128.0;
const THROUGHPUT_TARGET: f64 = 1.2;
const RANGE_MIN: u64 = 64 << 10;
const RANGE_MAX: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Corpus

struct Image {
    tag: String,
    repo: String,
    manifest_digest: String,
}

struct Blob {
    digest: String,
    size: u64,
    /// A repository the blob is pushed to (the first image referencing it).
    repo: String,
    path: PathBuf,
}

struct Corpus {
    layout: PathBuf,
    images: Vec<Image>,
    /// Layer blobs, the targets of the load phase.
    layers: Vec<Blob>,
    /// Bytes of the unique blobs (configs and layers) all images reference.
    unique_bytes: u64,
    unique_blobs: usize,
}

fn read_json(p: &Path) -> Result<Value> {
    serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
        .with_context(|| format!("parsing {}", p.display()))
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest {digest}"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn load_corpus(dir: &Path) -> Result<Corpus> {
    let layout = dir.join("layout");
    let index = read_json(&layout.join("index.json"))
        .context("corpus OCI layout (run scripts/corpus.sh)")?;
    let mut images = Vec::new();
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut layers: Vec<Blob> = Vec::new();
    for m in index["manifests"]
        .as_array()
        .context("index.json manifests")?
    {
        let tag = m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .context("index.json entry without org.opencontainers.image.ref.name")?
            .to_string();
        let digest = m["digest"].as_str().context("manifest digest")?.to_string();
        ensure!(
            m["mediaType"] == "application/vnd.oci.image.manifest.v1+json",
            "{tag}: only single-platform OCI manifests are supported, got {}",
            m["mediaType"]
        );
        let repo = format!("corpus/{tag}");
        let manifest = read_json(&blob_path(&layout, &digest)?)?;
        let config = &manifest["config"];
        let mut blobs = vec![(config, false)];
        blobs.extend(
            manifest["layers"]
                .as_array()
                .context("manifest layers")?
                .iter()
                .map(|l| (l, true)),
        );
        for (b, is_layer) in blobs {
            let d = b["digest"].as_str().context("blob digest")?.to_string();
            let size = b["size"].as_u64().context("blob size")?;
            if seen.insert(d.clone(), size).is_none() && is_layer {
                layers.push(Blob {
                    path: blob_path(&layout, &d)?,
                    digest: d,
                    size,
                    repo: repo.clone(),
                });
            }
        }
        images.push(Image {
            tag,
            repo,
            manifest_digest: digest,
        });
    }
    ensure!(!images.is_empty(), "no images in {}", layout.display());
    ensure!(
        layers.iter().all(|l| l.size >= RANGE_MAX),
        "layer blobs smaller than 1 MiB: the Range GETs need larger blobs"
    );
    Ok(Corpus {
        layout,
        images,
        layers,
        unique_bytes: seen.values().sum(),
        unique_blobs: seen.len(),
    })
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

// ---------------------------------------------------------------------------------------
// Servers

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Tessera,
    Docker,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tessera => "tessera",
            Kind::Docker => "docker-registry",
        }
    }
}

struct Server {
    kind: Kind,
    child: Option<Child>,
    addr: String,
    log: PathBuf,
    /// Highest VmHWM seen over the server's life (peaks are reset between phases).
    peak_kb: u64,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Server {
    fn start(kind: Kind, bin: &str, dir: &Path) -> Result<Server> {
        let root = dir.join("root");
        std::fs::create_dir_all(&root)?;
        let log = dir.join("server.log");
        let logf = File::create(&log)?;
        match kind {
            Kind::Tessera => {
                let mut child = Command::new(bin)
                    .arg("serve")
                    .arg("--listen")
                    .arg("127.0.0.1:0")
                    .arg("--root")
                    .arg(&root)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(logf)
                    .spawn()
                    .with_context(|| format!("starting {bin} serve"))?;
                let stdout = child.stdout.take().context("stdout")?;
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stdout);
                    let mut first = String::new();
                    let res = r.read_line(&mut first).map(|_| first);
                    let _ = tx.send(res);
                    // Keep draining so the server never blocks on a full pipe.
                    let _ = std::io::copy(&mut r, &mut std::io::sink());
                });
                let mut server = Server {
                    kind,
                    child: Some(child),
                    addr: String::new(),
                    log,
                    peak_kb: 0,
                };
                let line = match rx.recv_timeout(Duration::from_secs(60)) {
                    Ok(Ok(l)) => l,
                    Ok(Err(e)) => bail!("reading tessera serve's stdout: {e}"),
                    Err(_) => bail!(
                        "tessera serve printed no `listening on` line within 60 s:\n{}",
                        tail(&server.log)
                    ),
                };
                let addr = line
                    .trim()
                    .strip_prefix("listening on http://")
                    .with_context(|| {
                        format!(
                            "tessera serve's first line is {line:?}, expected \
                             `listening on http://ADDR`; log:\n{}",
                            tail(&server.log)
                        )
                    })?;
                server.addr = addr.trim_end_matches('/').to_string();
                server.wait_ready()?;
                Ok(server)
            }
            Kind::Docker => {
                let addr = format!("127.0.0.1:{}", free_port()?);
                let cfg = dir.join("config.yml");
                std::fs::write(
                    &cfg,
                    format!(
                        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    \
                         rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                        root.display()
                    ),
                )?;
                let child = Command::new(bin)
                    .arg("serve")
                    .arg(&cfg)
                    .stdin(Stdio::null())
                    .stdout(logf.try_clone()?)
                    .stderr(logf)
                    .spawn()
                    .with_context(|| {
                        format!("starting {bin} (Debian: apt-get install docker-registry)")
                    })?;
                let mut server = Server {
                    kind,
                    child: Some(child),
                    addr,
                    log,
                    peak_kb: 0,
                };
                server.wait_ready()?;
                Ok(server)
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn check_alive(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("server stopped")?;
        if let Some(st) = child.try_wait()? {
            bail!(
                "{} exited ({st}); log {}:\n{}",
                self.kind.name(),
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }

    /// Wait until `GET /v2/` answers 200.
    fn wait_ready(&mut self) -> Result<()> {
        let t0 = Instant::now();
        loop {
            self.check_alive()?;
            let mut c = Client::new(&self.addr);
            match c.get_bytes("/v2/", &[]) {
                Ok(_) => return Ok(()),
                Err(e) if t0.elapsed() > Duration::from_secs(30) => {
                    return Err(e).context(format!(
                        "{} at {} not ready after 30 s",
                        self.kind.name(),
                        self.addr
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// VmHWM since the last call (then reset to the current RSS), in KiB.
    fn take_peak_kb(&mut self) -> Result<u64> {
        self.check_alive()?;
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/PID/status")?;
        self.peak_kb = self.peak_kb.max(kb);
        // "5" resets the peak RSS (Linux >= 4.0); if that fails, peaks stay cumulative.
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        Ok(kb)
    }

    /// SIGTERM, then wait (SIGKILL after 20 s). Returns a warning if the exit was unclean.
    fn stop(&mut self) -> Option<String> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(format!("{} had already exited ({st})", self.kind.name()));
        }
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        );
        let t0 = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return None,
                Ok(Some(st)) => {
                    // Go programs exit 2 on an unhandled SIGTERM: expected for
                    // docker-registry, worth a note for tessera.
                    return (self.kind == Kind::Tessera)
                        .then(|| format!("tessera serve exited with {st} after SIGTERM"));
                }
                Ok(None) if t0.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Some(format!(
                        "{} did not exit within 20 s of SIGTERM; killed",
                        self.kind.name()
                    ));
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Push and pull

struct Ctx {
    args: Args,
    tessera: PathBuf,
    corpus: Corpus,
}

impl Ctx {
    fn skopeo_copy(&self, src: &str, dest: &str, extra: &[&str]) -> Result<()> {
        let out = Command::new(&self.args.skopeo)
            .args(["--insecure-policy", "copy", "--quiet", "--preserve-digests"])
            .args(extra)
            .arg(src)
            .arg(dest)
            .stdin(Stdio::null())
            .output()
            .with_context(|| {
                format!(
                    "running {} (Debian: apt-get install skopeo)",
                    self.args.skopeo
                )
            })?;
        if !out.status.success() {
            bail!(
                "skopeo copy {src} {dest} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn push_all(&self, addr: &str) -> Result<f64> {
        let t0 = Instant::now();
        for img in &self.corpus.images {
            self.skopeo_copy(
                &format!("oci:{}:{}", self.corpus.layout.display(), img.tag),
                &format!("docker://{addr}/{}:{}", img.repo, img.tag),
                &["--dest-tls-verify=false"],
            )?;
        }
        Ok(t0.elapsed().as_secs_f64())
    }

    fn pull_all(&self, addr: &str, dir: &Path) -> Result<f64> {
        let t0 = Instant::now();
        for img in &self.corpus.images {
            self.skopeo_copy(
                &format!("docker://{addr}/{}:{}", img.repo, img.tag),
                &format!("oci:{}:{}", dir.display(), img.tag),
                &["--src-tls-verify=false"],
            )?;
        }
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Every manifest, fetched by tag, must hash to the source manifest digest.
    fn verify_manifests(&self, server: &Server) -> Result<()> {
        let mut c = Client::new(&server.addr);
        for img in &self.corpus.images {
            let path = format!("/v2/{}/manifests/{}", img.repo, img.tag);
            let (head, body) = c
                .get_bytes(&path, &[("Accept", MANIFEST_ACCEPT)])
                .with_context(|| format!("{}: manifest of {}", server.kind.name(), img.tag))?;
            let got = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
            if got != img.manifest_digest {
                bail!(
                    "MANIFEST DIGEST MISMATCH on {}: GET {path} returned a manifest with digest \
                     {got}, the source manifest is {} (body: {})",
                    server.kind.name(),
                    img.manifest_digest,
                    String::from_utf8_lossy(&body)
                );
            }
            if let Some(h) = head.header("docker-content-digest") {
                ensure!(
                    h == img.manifest_digest,
                    "{}: GET {path}: Docker-Content-Digest {h}, expected {}",
                    server.kind.name(),
                    img.manifest_digest
                );
            }
        }
        Ok(())
    }

    /// Every layer blob, fetched whole, must hash to its digest.
    fn verify_blobs(&self, server: &Server) -> Result<()> {
        let mut c = Client::new(&server.addr);
        for b in &self.corpus.layers {
            let path = format!("/v2/{}/blobs/{}", b.repo, b.digest);
            let mut h = Sha256::new();
            let out = c.get(&path, &[], None, &mut |d| h.update(d))?;
            let Outcome::Done(head, n) = out else {
                unreachable!("no deadline")
            };
            ensure!(
                head.status == 200,
                "{}: GET {path}: HTTP {}",
                server.kind.name(),
                head.status
            );
            ensure!(
                n == b.size,
                "{}: GET {path}: {n} bytes, expected {}",
                server.kind.name(),
                b.size
            );
            let got = format!("sha256:{}", hex::encode(h.finalize()));
            ensure!(
                got == b.digest,
                "{}: GET {path}: content hashes to {got}",
                server.kind.name()
            );
        }
        Ok(())
    }
}

/// The pulled layout must tag every image with its source manifest digest.
fn verify_pulled(corpus: &Corpus, dir: &Path, who: &str) -> Result<()> {
    let index = read_json(&dir.join("index.json"))?;
    for img in &corpus.images {
        let m = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == img.tag.as_str())
            .with_context(|| format!("{who}: pulled layout has no tag {}", img.tag))?;
        ensure!(
            m["digest"] == img.manifest_digest.as_str(),
            "MANIFEST DIGEST MISMATCH after pulling {} from {who}: {} (source {})",
            img.tag,
            m["digest"],
            img.manifest_digest
        );
        let p = blob_path(dir, &img.manifest_digest)?;
        ensure!(
            sha256_file(&p)? == img.manifest_digest,
            "{who}: pulled manifest of {} does not hash to its digest",
            img.tag
        );
    }
    Ok(())
}

/// Flush dirty pages so one phase's writeback does not land in the next one's timing.
fn sync() {
    let _ = Command::new("sync").status();
}

// ---------------------------------------------------------------------------------------
// Load

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Default)]
struct WorkerOut {
    full_ms: Vec<f64>,
    range_ms: Vec<f64>,
    bytes: u64,
    aborted: u64,
    errors: u64,
    first_errors: Vec<String>,
    connects: u64,
}

impl WorkerOut {
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_errors.len() < 3 {
            self.first_errors.push(e);
        }
    }
}

fn worker(
    addr: &str,
    corpus: &Corpus,
    files: &[File],
    id: u64,
    seed: u64,
    start: Instant,
    deadline: Instant,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut rng = Rng((seed.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (id + 1) << 32);
    let mut c = Client::new(addr);
    // Open the connection before the clock starts.
    if let Err(e) = c.get_bytes("/v2/", &[]) {
        out.error(format!("GET /v2/: {e:#}"));
        return out;
    }
    let now = Instant::now();
    if now < start {
        std::thread::sleep(start - now);
    }
    let mut body = Vec::with_capacity(RANGE_MAX as usize);
    let mut expect = vec![0u8; RANGE_MAX as usize];
    while Instant::now() < deadline && out.errors < 50 {
        let i = rng.below(corpus.layers.len() as u64) as usize;
        let b = &corpus.layers[i];
        let path = format!("/v2/{}/blobs/{}", b.repo, b.digest);
        if rng.next() & 1 == 0 {
            let t0 = Instant::now();
            let r = c.get(&path, &[], Some(deadline), &mut |_| {});
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            match r {
                Ok(Outcome::Done(h, n)) => {
                    out.bytes += n;
                    if h.status != 200 || n != b.size {
                        out.error(format!(
                            "GET {path}: HTTP {}, {n} of {} bytes",
                            h.status, b.size
                        ));
                    } else {
                        out.full_ms.push(ms);
                    }
                }
                Ok(Outcome::Aborted(n)) => {
                    out.bytes += n;
                    out.aborted += 1;
                }
                Err(e) => out.error(format!("GET {path}: {e:#}")),
            }
        } else {
            let len = RANGE_MIN + rng.below(RANGE_MAX - RANGE_MIN + 1);
            let off = rng.below(b.size - len + 1);
            let range = format!("bytes={}-{}", off, off + len - 1);
            body.clear();
            let t0 = Instant::now();
            let r = c.get(&path, &[("Range", &range)], Some(deadline), &mut |d| {
                body.extend_from_slice(d)
            });
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            match r {
                Ok(Outcome::Done(h, n)) => {
                    out.bytes += n;
                    let want_cr = format!("bytes {}-{}/{}", off, off + len - 1, b.size);
                    let exp = &mut expect[..len as usize];
                    if h.status != 206 || n != len {
                        out.error(format!(
                            "GET {path} Range {range}: HTTP {}, {n} bytes (expected 206, {len})",
                            h.status
                        ));
                    } else if h.header("content-range") != Some(want_cr.as_str()) {
                        out.error(format!(
                            "GET {path} Range {range}: Content-Range {:?}, expected {want_cr:?}",
                            h.header("content-range")
                        ));
                    } else if let Err(e) = files[i].read_exact_at(exp, off) {
                        out.error(format!("reading the corpus blob {}: {e}", b.digest));
                    } else if body != *exp {
                        out.error(format!(
                            "GET {path} Range {range}: body differs from the blob's bytes"
                        ));
                    } else {
                        out.range_ms.push(ms);
                    }
                }
                Ok(Outcome::Aborted(n)) => {
                    out.bytes += n;
                    out.aborted += 1;
                }
                Err(e) => out.error(format!("GET {path} Range {range}: {e:#}")),
            }
        }
    }
    out.connects = c.connects;
    out
}

#[derive(Debug, Clone)]
struct LoadResult {
    seconds: f64,
    bytes: u64,
    full: Vec<f64>,
    range: Vec<f64>,
    aborted: u64,
    errors: u64,
    first_errors: Vec<String>,
    connects: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

impl LoadResult {
    fn requests(&self) -> usize {
        self.full.len() + self.range.len()
    }
    fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds
    }
    fn rps(&self) -> f64 {
        self.requests() as f64 / self.seconds
    }
    fn json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "bytes": self.bytes,
            "mb_per_s": self.mbps(),
            "requests_completed": self.requests(),
            "requests_per_s": self.rps(),
            "full_gets": self.full.len(),
            "range_gets": self.range.len(),
            "full_p50_ms": percentile(&self.full, 50.0),
            "full_p99_ms": percentile(&self.full, 99.0),
            "full_max_ms": self.full.last(),
            "range_p50_ms": percentile(&self.range, 50.0),
            "range_p99_ms": percentile(&self.range, 99.0),
            "range_max_ms": self.range.last(),
            "aborted_at_deadline": self.aborted,
            "errors": self.errors,
            "connections": self.connects,
        })
    }
}

fn load(ctx: &Ctx, addr: &str) -> Result<LoadResult> {
    let files: Vec<File> = ctx
        .corpus
        .layers
        .iter()
        .map(|b| File::open(&b.path).with_context(|| format!("opening {}", b.path.display())))
        .collect::<Result<_>>()?;
    let secs = ctx.args.seconds;
    let start = Instant::now() + Duration::from_millis(500);
    let deadline = start + Duration::from_secs_f64(secs);
    let outs: Vec<WorkerOut> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..ctx.args.clients)
            .map(|i| {
                let files = &files;
                s.spawn(move || {
                    worker(
                        addr,
                        &ctx.corpus,
                        files,
                        i as u64,
                        ctx.args.seed,
                        start,
                        deadline,
                    )
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("load client panicked"))
            .collect()
    });
    let mut r = LoadResult {
        seconds: secs,
        bytes: 0,
        full: vec![],
        range: vec![],
        aborted: 0,
        errors: 0,
        first_errors: vec![],
        connects: 0,
    };
    for o in outs {
        r.bytes += o.bytes;
        r.full.extend(o.full_ms);
        r.range.extend(o.range_ms);
        r.aborted += o.aborted;
        r.errors += o.errors;
        r.connects += o.connects;
        if r.first_errors.len() < 10 {
            r.first_errors.extend(o.first_errors);
        }
    }
    r.full.sort_by(f64::total_cmp);
    r.range.sort_by(f64::total_cmp);
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// One registry, one round

struct RegResult {
    push_secs: Option<f64>,
    pull_secs: Option<f64>,
    push_peak_kb: Option<u64>,
    pull_peak_kb: Option<u64>,
    load: LoadResult,
    load_peak_kb: u64,
    peak_kb: u64,
    warnings: Vec<String>,
}

fn run_registry(ctx: &Ctx, kind: Kind, round: usize) -> Result<RegResult> {
    let dir = ctx
        .args
        .work
        .join(format!("round{}", round + 1))
        .join(kind.name());
    let bin = match kind {
        Kind::Tessera => ctx.tessera.to_string_lossy().into_owned(),
        Kind::Docker => ctx.args.docker_registry.clone(),
    };
    let who = kind.name();
    let mut server = Server::start(kind, &bin, &dir)?;
    eprintln!(
        "[round {}] {who}: listening on {} (pid {})",
        round + 1,
        server.addr,
        server.pid()
    );
    server.take_peak_kb()?;
    let mut res = RegResult {
        push_secs: None,
        pull_secs: None,
        push_peak_kb: None,
        pull_peak_kb: None,
        load: LoadResult {
            seconds: 0.0,
            bytes: 0,
            full: vec![],
            range: vec![],
            aborted: 0,
            errors: 0,
            first_errors: vec![],
            connects: 0,
        },
        load_peak_kb: 0,
        peak_kb: 0,
        warnings: vec![],
    };
    let mb = ctx.corpus.unique_bytes as f64 / 1e6;
    sync();
    server.take_peak_kb()?;
    let push = ctx
        .push_all(&server.addr)
        .with_context(|| format!("pushing the corpus to {who}"))?;
    res.push_peak_kb = Some(server.take_peak_kb()?);
    ctx.verify_manifests(&server)?;
    if !ctx.args.skip_push_pull {
        res.push_secs = Some(push);
        eprintln!(
            "[round {}] {who}: push {push:.2} s ({:.1} MB/s), manifests verified",
            round + 1,
            mb / push
        );
        let pull_dir = match &ctx.args.pull_dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("creating --pull-dir {}", d.display()))?;
                d.join(format!("pulled-{who}"))
            }
            None => dir.join("pulled"),
        };
        let _ = std::fs::remove_dir_all(&pull_dir);
        sync();
        server.take_peak_kb()?;
        let pull = ctx
            .pull_all(&server.addr, &pull_dir)
            .with_context(|| format!("pulling the corpus from {who}"))?;
        res.pull_peak_kb = Some(server.take_peak_kb()?);
        res.pull_secs = Some(pull);
        verify_pulled(&ctx.corpus, &pull_dir, who)?;
        let _ = std::fs::remove_dir_all(&pull_dir);
        eprintln!(
            "[round {}] {who}: pull {pull:.2} s ({:.1} MB/s), manifests verified",
            round + 1,
            mb / pull
        );
    }
    ctx.verify_blobs(&server)?;
    sync();
    server.take_peak_kb()?;
    let l = load(ctx, &server.addr)?;
    res.load_peak_kb = server.take_peak_kb()?;
    eprintln!(
        "[round {}] {who}: load {:.1} MB/s, {:.1} req/s, p99 full {:.1} ms, p99 range {:.1} ms, \
         {} errors, peak RSS {} MiB",
        round + 1,
        l.mbps(),
        l.rps(),
        percentile(&l.full, 99.0),
        percentile(&l.range, 99.0),
        l.errors,
        res.load_peak_kb / 1024
    );
    if l.errors > 0 {
        bail!(
            "{who}: {} errors in the load phase, first ones:\n  {}",
            l.errors,
            l.first_errors.join("\n  ")
        );
    }
    ensure!(
        !l.full.is_empty() && !l.range.is_empty(),
        "{who}: no completed full or Range GET in {} s",
        l.seconds
    );
    res.load = l;
    res.peak_kb = server.peak_kb;
    if let Some(w) = server.stop() {
        eprintln!("warning: {w}");
        res.warnings.push(w);
    }
    let _ = std::fs::remove_dir_all(dir.join("root"));
    Ok(res)
}

// ---------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mark(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**MISSED**"
    }
}

/// A ratio with two decimals, or three when two would round it onto the target.
fn show_ratio(r: f64, target: f64) -> String {
    let two = format!("{r:.2}");
    if two.parse::<f64>().ok() == Some(target) && r != target {
        format!("{r:.3}")
    } else {
        two
    }
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
        })
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.clients >= 1, "--clients must be at least 1");
    ensure!(args.seconds > 0.0, "--seconds must be positive");
    let tessera = match &args.tessera {
        Some(t) => t.clone(),
        None => std::env::current_exe()?.with_file_name("tessera"),
    };
    ensure!(
        tessera.exists(),
        "{} not found: build it with `cargo build --release` first",
        tessera.display()
    );
    for (bin, pkg) in [
        (&args.skopeo, "skopeo"),
        (&args.docker_registry, "docker-registry"),
    ] {
        if Command::new(bin).arg("--version").output().is_err() {
            bail!("{bin} not found: apt-get install {pkg}");
        }
    }
    let corpus = load_corpus(&args.corpus)?;
    // Warm the page cache: the first registry must not pay for cold corpus reads.
    for b in &corpus.layers {
        ensure!(
            sha256_file(&b.path)? == b.digest,
            "corpus blob {} is corrupt",
            b.path.display()
        );
    }
    let _ = std::fs::remove_dir_all(&args.work);
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    eprintln!(
        "corpus: {} images, {} unique blobs ({} layers) of {:.1} MB",
        corpus.images.len(),
        corpus.unique_blobs,
        corpus.layers.len(),
        corpus.unique_bytes as f64 / 1e6
    );
    let ctx = Ctx {
        args,
        tessera,
        corpus,
    };

    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for round in 0..ctx.args.rounds {
        let order = if round % 2 == 0 {
            [Kind::Docker, Kind::Tessera]
        } else {
            [Kind::Tessera, Kind::Docker]
        };
        for kind in order {
            let r = run_registry(&ctx, kind, round)?;
            match kind {
                Kind::Tessera => ours.push(r),
                Kind::Docker => peer.push(r),
            }
        }
    }

    let mb = ctx.corpus.unique_bytes as f64 / 1e6;
    let med = |v: &[RegResult], f: &dyn Fn(&RegResult) -> Option<f64>| -> f64 {
        median(v.iter().filter_map(f).collect())
    };
    let mut table = String::from(
        "| figure | tessera | docker-registry | ratio (tessera/docker-registry) | target |\n\
         |---|---:|---:|---:|---|\n",
    );
    let n_img = ctx.corpus.images.len();
    let mut summary = serde_json::Map::new();
    if !ctx.args.skip_push_pull {
        for (what, get) in [
            (
                "push",
                &(|r: &RegResult| r.push_secs) as &dyn Fn(&RegResult) -> Option<f64>,
            ),
            ("pull", &|r: &RegResult| r.pull_secs),
        ] {
            let o = med(&ours, &|r| get(r).map(|s| mb / s));
            let p = med(&peer, &|r| get(r).map(|s| mb / s));
            let ratio = o / p;
            table.push_str(&format!(
                "| {what}: skopeo, {n_img} images, {mb:.1} MB of unique blobs, sequential | \
                 {o:.1} MB/s ({:.2} s) | {p:.1} MB/s ({:.2} s) | {}× | ≥ {THROUGHPUT_TARGET}× {} |\n",
                mb / o,
                mb / p,
                show_ratio(ratio, THROUGHPUT_TARGET),
                mark(ratio >= THROUGHPUT_TARGET)
            ));
            summary.insert(
                format!("{what}_mb_per_s"),
                json!({"tessera": o, "docker_registry": p, "ratio": ratio}),
            );
        }
    }
    let lmed = |v: &[RegResult], f: &dyn Fn(&LoadResult) -> f64| -> f64 {
        median(v.iter().map(|r| f(&r.load)).collect())
    };
    let clients = ctx.args.clients;
    let secs = ctx.args.seconds;
    let (o, p) = (
        lmed(&ours, &LoadResult::mbps),
        lmed(&peer, &LoadResult::mbps),
    );
    table.push_str(&format!(
        "| load: {clients} clients × {secs} s, 50/50 full layer GETs and 64 KiB–1 MiB Range GETs: \
         throughput | {o:.0} MB/s | {p:.0} MB/s | {:.2}× | |\n",
        o / p
    ));
    summary.insert(
        "load_mb_per_s".into(),
        json!({"tessera": o, "docker_registry": p, "ratio": o / p}),
    );
    let (o, p) = (lmed(&ours, &LoadResult::rps), lmed(&peer, &LoadResult::rps));
    table.push_str(&format!(
        "| load: completed requests/s | {o:.1} | {p:.1} | {:.2}× | |\n",
        o / p
    ));
    summary.insert(
        "load_requests_per_s".into(),
        json!({"tessera": o, "docker_registry": p, "ratio": o / p}),
    );
    fn full(l: &LoadResult) -> &[f64] {
        &l.full
    }
    fn range(l: &LoadResult) -> &[f64] {
        &l.range
    }
    for (what, key, get) in [
        ("full layer GET", "full", full as fn(&LoadResult) -> &[f64]),
        ("Range GET", "range", range),
    ] {
        let o99 = lmed(&ours, &|l| percentile(get(l), 99.0));
        let p99 = lmed(&peer, &|l| percentile(get(l), 99.0));
        let o50 = lmed(&ours, &|l| percentile(get(l), 50.0));
        let p50 = lmed(&peer, &|l| percentile(get(l), 50.0));
        let on = lmed(&ours, &|l| get(l).len() as f64);
        let pn = lmed(&peer, &|l| get(l).len() as f64);
        let ratio = o99 / p99;
        table.push_str(&format!(
            "| load: {what} latency p99 (p50; requests) | {o99:.1} ms ({o50:.1} ms; {on:.0}) | \
             {p99:.1} ms ({p50:.1} ms; {pn:.0}) | {} | ≤ 1.0 {} |\n",
            show_ratio(ratio, 1.0),
            mark(ratio <= 1.0)
        ));
        summary.insert(
            format!("load_{key}_p99_ms"),
            json!({"tessera": o99, "docker_registry": p99, "ratio": ratio}),
        );
        summary.insert(
            format!("load_{key}_p50_ms"),
            json!({"tessera": o50, "docker_registry": p50, "ratio": o50 / p50}),
        );
    }
    let maxkb = |v: &[RegResult], f: &dyn Fn(&RegResult) -> u64| -> f64 {
        v.iter().map(f).max().unwrap_or(0) as f64 / 1024.0
    };
    let (o, p) = (
        maxkb(&ours, &|r| r.load_peak_kb),
        maxkb(&peer, &|r| r.load_peak_kb),
    );
    table.push_str(&format!(
        "| peak RSS under the load ({clients} clients) | {o:.0} MiB | {p:.0} MiB | {:.2} | ≤ {RSS_TARGET_MIB:.0} MiB {} |\n",
        o / p,
        mark(o <= RSS_TARGET_MIB)
    ));
    summary.insert(
        "load_peak_rss_mib".into(),
        json!({"tessera": o, "docker_registry": p, "ratio": o / p}),
    );
    if !ctx.args.skip_push_pull {
        for (what, key, get) in [
            (
                "push",
                "push",
                &(|r: &RegResult| r.push_peak_kb.unwrap_or(0)) as &dyn Fn(&RegResult) -> u64,
            ),
            ("pull", "pull", &|r: &RegResult| r.pull_peak_kb.unwrap_or(0)),
        ] {
            let (o, p) = (maxkb(&ours, get), maxkb(&peer, get));
            table.push_str(&format!(
                "| peak RSS during the {what} | {o:.0} MiB | {p:.0} MiB | {:.2} | |\n",
                o / p
            ));
            summary.insert(
                format!("{key}_peak_rss_mib"),
                json!({"tessera": o, "docker_registry": p, "ratio": o / p}),
            );
        }
    }
    let (o, p) = (maxkb(&ours, &|r| r.peak_kb), maxkb(&peer, &|r| r.peak_kb));
    table.push_str(&format!(
        "| peak RSS, whole run | {o:.0} MiB | {p:.0} MiB | {:.2} | |\n",
        o / p
    ));
    summary.insert(
        "peak_rss_mib".into(),
        json!({"tessera": o, "docker_registry": p, "ratio": o / p}),
    );

    println!("{table}");
    let round_json = |r: &RegResult| {
        json!({
            "push_seconds": r.push_secs,
            "push_mb_per_s": r.push_secs.map(|s| mb / s),
            "pull_seconds": r.pull_secs,
            "pull_mb_per_s": r.pull_secs.map(|s| mb / s),
            "push_peak_rss_kb": r.push_peak_kb,
            "pull_peak_rss_kb": r.pull_peak_kb,
            "load": r.load.json(),
            "load_peak_rss_kb": r.load_peak_kb,
            "peak_rss_kb": r.peak_kb,
            "warnings": r.warnings,
        })
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let results = json!({
        "summary": summary,
        "rounds": {
            "tessera": ours.iter().map(round_json).collect::<Vec<_>>(),
            "docker_registry": peer.iter().map(round_json).collect::<Vec<_>>(),
        },
        "corpus": {
            "dir": ctx.args.corpus,
            "images": ctx.corpus.images.iter().map(|i| json!({"tag": i.tag, "manifest_digest": i.manifest_digest})).collect::<Vec<_>>(),
            "unique_blob_bytes": ctx.corpus.unique_bytes,
            "layers": ctx.corpus.layers.iter().map(|b| json!({"digest": b.digest, "size": b.size})).collect::<Vec<_>>(),
        },
        "settings": {
            "rounds": ctx.args.rounds,
            "clients": clients,
            "seconds": secs,
            "seed": ctx.args.seed,
            "skip_push_pull": ctx.args.skip_push_pull,
            "range_bytes": [RANGE_MIN, RANGE_MAX],
        },
        "machine": {
            "cores": cores,
            "skopeo": version(&ctx.args.skopeo, "--version"),
            "docker_registry": version(&ctx.args.docker_registry, "--version"),
            "tessera": version(&ctx.tessera.to_string_lossy(), "--version"),
        },
        "table_markdown": table,
    });
    std::fs::write(&ctx.args.json, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", ctx.args.json.display()))?;
    eprintln!("JSON written to {}", ctx.args.json.display());
    Ok(())
}
