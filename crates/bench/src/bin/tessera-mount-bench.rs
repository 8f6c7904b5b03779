//! `tessera-mount-bench`: `tessera mount` (a lazy, read-only FUSE mount of an image in a
//! registry) against a full pull and unpack, the native filesystem and nydusd — same
//! image, same run.
//!
//! 1. Time to first useful work over a shaped link: two network namespaces (`tmb-reg`,
//!    `tmb-cli`) joined by a veth pair, both ends shaped with `tc ... tbf` (netem is not
//!    in this kernel). `tessera serve` runs in `tmb-reg` and holds the image twice: as the
//!    original OCI image (pushed by skopeo) and as its tessera twin (`tessera convert`),
//!    both loaded before the link is shaped. From `tmb-cli`, with page caches dropped:
//!    the full path is skopeo copy + umoci unpack + `chroot ROOTFS python3 -c CODE`; the
//!    lazy path is `tessera mount` on an empty node store + the same chroot into the
//!    mount. Bytes are the client veth's rx counter before and after.
//! 2. Warm, on loopback (`tessera serve` on 127.0.0.1 in the root namespace), node store
//!    fully populated: mount time (spawn → `mounted` line), sequential read of the largest
//!    file against the native unpacked tree (page cache dropped, then hot), a full lstat
//!    walk against the native tree (dentry cache dropped), and the daemon's peak RSS.
//! 3. Cold full read on loopback: every regular file read by several threads from a fresh
//!    mount on an empty store, against nydusd serving the same image (nydus-image
//!    tar-rafs, RAFS v6, zstd, blobs pushed to the same registry, `registry` backend,
//!    fresh blobcache).
//!
//! Phases run in the order 1, 3, 2 (3 fills the node store that 2 needs); the table
//! follows the numbering. Correctness is checked outside the timed sections: entry
//! counts and file bytes of every walk against the native tree, and the sha256 of the
//! largest file read through each mount against the native file; a failed check is
//! reported in the table and JSON and makes the exit status non-zero.
//!
//! `--rounds N` repeats every timed measurement and reports medians. Each `tessera mount`
//! runs with `-v`, so it logs its fetch counters when it unmounts; they go into the JSON
//! (chunks from the node store, from memory, fetched; range requests; bytes fetched).
//!
//! Every process, mount and namespace is owned by a guard whose Drop unmounts, kills or
//! deletes it, so error paths clean up too; every wait is bounded. Daemons get
//! PR_SET_PDEATHSIG, and a run starts by removing what an interrupted run left behind.

#[path = "../common/harness.rs"]
mod harness;
#[path = "../registry_bench/http.rs"]
mod http;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use harness::*;
use http::{Client, Outcome};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    about = "tessera mount against a full pull + unpack (time to first useful work over a \
             shaped link), the native filesystem (warm reads, metadata walk) and nydusd \
             (cold full read)",
    after_help = "Example:
  cargo build --release -p tessera -p tessera-bench
  target/release/tessera-mount-bench \\
      --corpus /var/cache/tessera/corpus --json /tmp/bench-mount.json

Runs as root (network namespaces, tc, FUSE, chroot, drop_caches). Needs skopeo, umoci,
iproute2 (ip, tc), util-linux (nsenter, umount), gzip, the corpus
(scripts/corpus.sh), and for the nydusd column nydus-image and nydusd
(cargo install nydus-rs --locked). Creates and deletes the network namespaces tmb-reg and
tmb-cli (deleted first if left over). Exits non-zero on errors and failed correctness
checks only: missed targets are marked MISSED in the table."
)]
struct Args {
    /// Corpus directory: an OCI image layout in DIR/layout with one tag per image.
    #[arg(long, default_value = "/var/cache/tessera/corpus")]
    corpus: PathBuf,
    /// The image (a tag of the corpus layout).
    #[arg(long, default_value = "app-pandas-a")]
    image: String,
    /// The first useful work: Python code run with `chroot ROOTFS python3 -c CODE`.
    #[arg(long, default_value = "import pandas")]
    python: String,
    /// Scratch directory (emptied first): registries, node stores, unpacked tree, logs.
    #[arg(long, default_value = "/var/tmp/tessera-mount-bench")]
    work: PathBuf,
    /// The tessera binary (default: next to this one).
    #[arg(long)]
    tessera: Option<PathBuf>,
    /// The skopeo binary.
    #[arg(long, default_value = "skopeo")]
    skopeo: String,
    /// The umoci binary.
    #[arg(long, default_value = "umoci")]
    umoci: String,
    /// The nydus-image binary.
    #[arg(long, default_value = "nydus-image")]
    nydus_image: String,
    /// The nydusd binary.
    #[arg(long, default_value = "nydusd")]
    nydusd: String,
    /// tbf rate on both ends of the veth pair.
    #[arg(long, default_value = "100mbit")]
    rate: String,
    /// tbf burst.
    #[arg(long, default_value = "64kb")]
    burst: String,
    /// tbf latency.
    #[arg(long, default_value = "100ms")]
    tbf_latency: String,
    /// FUSE threads of `tessera mount` (--threads) and nydusd (--fuse-threads).
    #[arg(long, default_value_t = 4)]
    fuse_threads: usize,
    /// Reader threads of the cold full read.
    #[arg(long, default_value_t = 4)]
    read_threads: usize,
    /// Repeat every timed measurement (both paths of phase 1, the reads and walks of
    /// phase 2, the full reads of phase 3) this many times; the table shows medians.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Warm mounts timed; the table shows the median.
    #[arg(long, default_value_t = 5)]
    mount_runs: usize,
    /// Extra argument for every `tessera mount` (repeatable), e.g. --mount-arg=--prefetch.
    #[arg(long = "mount-arg", value_name = "ARG", allow_hyphen_values = true)]
    mount_args: Vec<String>,
    /// Skip phase 1 (time to first useful work over the shaped link).
    #[arg(long)]
    skip_ttfw: bool,
    /// Skip phase 3 (cold full read; phase 2 then fills the node store untimed).
    #[arg(long)]
    skip_cold: bool,
    /// Skip phase 2 (warm mount, reads and walk).
    #[arg(long)]
    skip_warm: bool,
    /// Skip nydusd in phase 3.
    #[arg(long)]
    skip_nydus: bool,
    /// Phase 4 (off by default): this many mounts served by one `tessera mount` process
    /// (the corpus images in turn; past the corpus's 7, images repeat, and repeated
    /// images share chunks in memory), each walked and read (--many-read bytes of its
    /// largest files); the daemon's peak RSS. Issue 11's row: --many 10.
    #[arg(long, default_value_t = 0)]
    many: usize,
    /// Bytes read from each mount of phase 4 (its largest files first).
    #[arg(long, default_value_t = 64 << 20)]
    many_read: u64,
    /// Keep registries, stores and trees in --work afterwards (logs are always kept).
    #[arg(long)]
    keep_work: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-mount.json")]
    json: PathBuf,
}

const NS_REG: &str = "tmb-reg";
const NS_CLI: &str = "tmb-cli";
const VETH_REG: &str = "tmb-r";
const VETH_CLI: &str = "tmb-c";
const REG_IP: &str = "10.231.0.1";
const LINK: Link = Link {
    reg_ns: NS_REG,
    cli_ns: NS_CLI,
    veth_reg: VETH_REG,
    veth_cli: VETH_CLI,
    reg_ip: REG_IP,
    cli_ip: "10.231.0.2",
};
const REG_PORT: u16 = 5000;

const TTFW_TARGET: f64 = 0.15;
const MOUNT_MS_TARGET: f64 = 50.0;
const SEQ_TARGET: f64 = 0.80;
const WALK_TARGET: f64 = 0.50;
const RSS_BASE_MIB: f64 = 64.0;
/// Issue 11: daemon RSS with 10 images mounted.
const MANY_RSS_MIB: f64 = 128.0;

/// Longest wait for a mount to appear.
const MOUNT_WAIT: Duration = Duration::from_secs(60);
/// Longest run of a setup or client command (convert, skopeo, umoci, nydus-image).
const CMD_WAIT: Duration = Duration::from_secs(900);
/// Longest run of the Python command.
const PY_WAIT: Duration = Duration::from_secs(300);
/// Longest in-process walk or read over a mount.
const IO_WAIT: Duration = Duration::from_secs(900);
/// Longest wait for a daemon to exit once its mount is gone (or after SIGTERM).
const EXIT_WAIT: Duration = Duration::from_secs(30);

const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

// ---------------------------------------------------------------------------------------
// Mounts

/// The counters `tessera -v mount` logs when it unmounts (best effort: None when the log
/// has no such line).
fn mount_counters(log: &Path) -> Option<Value> {
    let text = strip_ansi(&std::fs::read_to_string(log).ok()?);
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("unmounted") && l.contains("counters="))?;
    let json = &line[line.find("counters=")? + "counters=".len()..];
    serde_json::Deserializer::from_str(json)
        .into_iter::<Value>()
        .next()?
        .ok()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Tessera,
    Nydusd,
}

/// A FUSE mount and its daemon: Drop detaches the mount and kills the daemon.
struct Mount {
    daemon: Daemon,
    dir: PathBuf,
    proc: Proc,
    tessera: PathBuf,
    /// Spawn → mount in place.
    ready: Duration,
    live: bool,
}

impl Mount {
    /// `tessera mount REF DIR --store STORE` (in network namespace `ns`); returns once it
    /// printed `mounted`. The caller's clock starts before this call.
    fn tessera(
        ctx: &Ctx,
        ns: Option<&str>,
        reference: &str,
        dir: &Path,
        store: &Path,
        log: &Path,
    ) -> Result<Mount> {
        std::fs::create_dir_all(dir)?;
        let mut cmd = in_netns(ns, &ctx.tessera);
        // -v: the daemon logs its counters when it unmounts (see `mount_counters`).
        cmd.arg("--no-progress")
            .arg("-v")
            .arg("mount")
            .arg(reference)
            .arg(dir)
            .arg("--store")
            .arg(store)
            .arg("--threads")
            .arg(ctx.args.fuse_threads.to_string());
        if ns.is_some() {
            cmd.arg("--plain-http");
        }
        cmd.args(&ctx.args.mount_args);
        let t0 = Instant::now();
        let proc = Proc::spawn("tessera mount", &mut cmd, log, true)?;
        let mut m = Mount {
            daemon: Daemon::Tessera,
            dir: dir.to_path_buf(),
            proc,
            tessera: ctx.tessera.clone(),
            ready: Duration::ZERO,
            live: true,
        };
        let (t, _) = m.proc.wait_line("mounted ", MOUNT_WAIT)?;
        m.ready = t.duration_since(t0);
        let fstype = mounted_fstype(dir);
        ensure!(
            fstype.as_deref().is_some_and(|t| t.starts_with("fuse")),
            "tessera mount printed `mounted` but {} is not a FUSE mount ({fstype:?})",
            dir.display()
        );
        Ok(m)
    }

    /// `nydusd --bootstrap BOOT --mountpoint DIR`; returns once the FUSE mount is in
    /// /proc/self/mountinfo (polled every millisecond).
    fn nydusd(ctx: &Ctx, config: &Path, bootstrap: &Path, dir: &Path, log: &Path) -> Result<Mount> {
        std::fs::create_dir_all(dir)?;
        let mut cmd = Command::new(&ctx.args.nydusd);
        cmd.arg("--config")
            .arg(config)
            .arg("--bootstrap")
            .arg(bootstrap)
            .arg("--mountpoint")
            .arg(dir)
            .arg("--fuse-threads")
            .arg(ctx.args.fuse_threads.to_string())
            .args(["--log-level", "warn"])
            // Keep the open-files limit (raising it needs CAP_SYS_RESOURCE).
            .args(["--rlimit-nofile", "0"]);
        let t0 = Instant::now();
        let proc = Proc::spawn("nydusd", &mut cmd, log, false)?;
        let mut m = Mount {
            daemon: Daemon::Nydusd,
            dir: dir.to_path_buf(),
            proc,
            tessera: ctx.tessera.clone(),
            ready: Duration::ZERO,
            live: true,
        };
        loop {
            if mounted_fstype(dir).is_some_and(|t| t.starts_with("fuse")) {
                m.ready = t0.elapsed();
                return Ok(m);
            }
            m.proc.check_alive()?;
            if t0.elapsed() > MOUNT_WAIT {
                bail!(
                    "nydusd did not mount {} within {} s; log {}:\n{}",
                    dir.display(),
                    MOUNT_WAIT.as_secs(),
                    m.proc.log.display(),
                    tail(&m.proc.log)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn ready_ms(&self) -> f64 {
        self.ready.as_secs_f64() * 1e3
    }

    /// Unmount cleanly (`tessera umount`; SIGTERM for nydusd) and wait for the daemon to
    /// exit. Returns a warning when the exit was not clean.
    fn unmount(mut self) -> Result<Option<String>> {
        let name = match self.daemon {
            Daemon::Tessera => "tessera mount",
            Daemon::Nydusd => "nydusd",
        };
        let st = match self.daemon {
            Daemon::Tessera => {
                run_ok(
                    Command::new(&self.tessera).arg("umount").arg(&self.dir),
                    Duration::from_secs(60),
                )?;
                self.proc.wait_exit(EXIT_WAIT)?
            }
            Daemon::Nydusd => self.proc.terminate(EXIT_WAIT)?,
        };
        let mut warn = (!st.success()).then(|| format!("{name} exited with {st} after unmounting"));
        if mounted_fstype(&self.dir).is_some() {
            lazy_umount(&self.dir);
            warn = Some(format!(
                "{name} exited ({st}) but {} was still mounted; detached",
                self.dir.display()
            ));
        }
        self.live = false;
        Ok(warn)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.live {
            // Detach first: the daemon then sees its session end; `proc` is killed next.
            lazy_umount(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Files

struct Tree {
    /// Entries below the root (every type), each lstat'ed once.
    entries: u64,
    /// Regular files, hardlinked ones once: path, size.
    files: Vec<(PathBuf, u64)>,
    bytes: u64,
    /// Largest regular file: path relative to the root, size.
    largest: Option<(PathBuf, u64)>,
}

/// Walk `root`: read_dir every directory, `symlink_metadata` (lstat) every entry.
fn walk(root: &Path) -> Result<Tree> {
    let mut t = Tree {
        entries: 0,
        files: Vec::new(),
        bytes: 0,
        largest: None,
    };
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e
                .with_context(|| format!("reading {}", d.display()))?
                .path();
            let m =
                std::fs::symlink_metadata(&p).with_context(|| format!("lstat {}", p.display()))?;
            t.entries += 1;
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                if m.nlink() > 1 && !seen.insert(m.ino()) {
                    continue;
                }
                if t.largest.as_ref().is_none_or(|(_, s)| m.len() > *s) {
                    t.largest = Some((p.strip_prefix(root)?.to_path_buf(), m.len()));
                }
                t.bytes += m.len();
                t.files.push((p, m.len()));
            }
        }
    }
    Ok(t)
}

/// Read every file of `files` with `threads` threads (1 MiB reads); bytes read.
fn read_all(files: Arc<Vec<(PathBuf, u64)>>, threads: usize) -> Result<u64> {
    let next = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let files = files.clone();
            let next = next.clone();
            std::thread::spawn(move || -> Result<u64> {
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                while let Some((p, size)) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let mut f =
                        File::open(p).with_context(|| format!("opening {}", p.display()))?;
                    let mut got = 0u64;
                    loop {
                        let k = f
                            .read(&mut buf)
                            .with_context(|| format!("reading {}", p.display()))?;
                        if k == 0 {
                            break;
                        }
                        got += k as u64;
                    }
                    ensure!(
                        got == *size,
                        "{}: read {got} bytes, lstat says {size}",
                        p.display()
                    );
                    n += got;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    }
    Ok(total)
}

/// Read `p` sequentially with 1 MiB reads: bytes, seconds.
fn read_seq(p: &Path) -> Result<(u64, f64)> {
    let t0 = Instant::now();
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    Ok((n, t0.elapsed().as_secs_f64()))
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
// Registries

/// `tessera serve` (in network namespace `ns`, or on loopback); returns it and its address.
fn start_registry(
    ctx: &Ctx,
    ns: Option<&str>,
    listen: &str,
    root: &Path,
    log: &Path,
) -> Result<(Proc, String)> {
    start_serve(&ctx.tessera, ns, listen, root, log, &[])
}

/// Wait until `GET /v2/` answers on a loopback registry.
fn wait_ready(p: &mut Proc, addr: &str) -> Result<()> {
    let t0 = Instant::now();
    loop {
        p.check_alive()?;
        match Client::new(addr).get_bytes("/v2/", &[]) {
            Ok(_) => return Ok(()),
            Err(e) if t0.elapsed() > Duration::from_secs(30) => {
                return Err(e).context(format!("registry at {addr} not ready after 30 s"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Monolithic blob upload: `POST /v2/REPO/blobs/uploads/?digest=D` with the body.
fn upload_blob(addr: &str, repo: &str, path: &Path, digest: &str) -> Result<()> {
    let size = std::fs::metadata(path)?.len();
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.set_write_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "POST /v2/{repo}/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {addr}\r\n\
         User-Agent: tessera-mount-bench\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {size}\r\nConnection: close\r\n\r\n"
    )?;
    std::io::copy(&mut File::open(path)?, &mut s)?;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let status = text.split(' ').nth(1).unwrap_or_default();
    ensure!(
        status == "201" || status == "202",
        "POST blob {digest} to {addr}/{repo}: {}",
        last_lines(&text)
    );
    // Read it back: the backend must serve exactly these bytes.
    let mut h = Sha256::new();
    let out =
        Client::new(addr).get(&format!("/v2/{repo}/blobs/{digest}"), &[], None, &mut |d| {
            h.update(d)
        })?;
    let (head, n) = match out {
        Outcome::Done(head, n) => (head, n),
        Outcome::Aborted(n) => bail!("GET blob {digest}: aborted after {n} bytes"),
    };
    ensure!(
        head.status == 200 && n == size,
        "GET blob {digest}: HTTP {}, {n} bytes",
        head.status
    );
    ensure!(
        format!("sha256:{}", hex::encode(h.finalize())) == digest,
        "GET blob {digest}: content differs"
    );
    Ok(())
}

/// Size of the tessera index blob of `repo:tag` (the manifest layer with the index
/// media type) and the total size of all its blobs.
fn index_size(addr: &str, repo: &str, tag: &str) -> Result<(u64, u64)> {
    let (_, body) = Client::new(addr).get_bytes(
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("Accept", MANIFEST_ACCEPT)],
    )?;
    let m: Value = serde_json::from_slice(&body)?;
    let layers = m["layers"].as_array().context("manifest layers")?;
    let index = layers
        .iter()
        .find(|l| {
            l["mediaType"]
                .as_str()
                .is_some_and(|t| t.contains("tessera.index"))
        })
        .and_then(|l| l["size"].as_u64())
        .context("no tessera index layer in the manifest")?;
    let total = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
    Ok((index, total))
}

// ---------------------------------------------------------------------------------------
// Context and results

struct Ctx {
    args: Args,
    tessera: PathBuf,
    work: PathBuf,
    layout: PathBuf,
    logs: PathBuf,
    warnings: Vec<String>,
}

impl Ctx {
    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }

    /// `chroot ROOT python3 -c CODE` with a clean environment; seconds.
    fn python(&self, root: &Path) -> Result<f64> {
        let mut c = Command::new("chroot");
        c.arg(root)
            .arg("python3")
            .arg("-c")
            .arg(&self.args.python)
            .env_clear()
            .env("PATH", CHROOT_PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        Ok(run_ok(&mut c, PY_WAIT)?.secs)
    }

    fn warn(&mut self, w: Option<String>) {
        if let Some(w) = w {
            eprintln!("warning: {w}");
            self.warnings.push(w);
        }
    }

    fn native_root(&self) -> PathBuf {
        self.work.join("bundle/rootfs")
    }
}

/// One round of phase 1.
#[derive(Default)]
struct TtfwRound {
    full_s: f64,
    copy_s: f64,
    unpack_s: f64,
    full_py_s: f64,
    full_rx: u64,
    lazy_s: f64,
    lazy_mount_ms: f64,
    lazy_py_s: f64,
    lazy_rx: u64,
    lazy_hwm_kb: u64,
    lazy_counters: Option<Value>,
    /// The same lazy path, with the profile stored beside the image (found as a referrer).
    prof: LazyRun,
}

/// One lazy run: spawn → mounted → python done.
#[derive(Default)]
struct LazyRun {
    s: f64,
    mount_ms: f64,
    py_s: f64,
    rx: u64,
    hwm_kb: u64,
    counters: Option<Value>,
}

impl TtfwRound {
    fn json(&self) -> Value {
        json!({
            "tessera": {"seconds": self.lazy_s, "mount_ms": self.lazy_mount_ms, "python_seconds": self.lazy_py_s,
                        "rx_bytes": self.lazy_rx, "peak_rss_kb": self.lazy_hwm_kb, "daemon_counters": self.lazy_counters},
            "tessera_profile": {"seconds": self.prof.s, "mount_ms": self.prof.mount_ms, "python_seconds": self.prof.py_s,
                        "rx_bytes": self.prof.rx, "peak_rss_kb": self.prof.hwm_kb, "daemon_counters": self.prof.counters},
            "full": {"seconds": self.full_s, "skopeo_copy_seconds": self.copy_s, "umoci_unpack_seconds": self.unpack_s,
                     "python_seconds": self.full_py_s, "rx_bytes": self.full_rx},
        })
    }
}

struct Ttfw {
    load_convert_s: f64,
    load_skopeo_s: f64,
    oci_bytes: u64,
    rounds: Vec<TtfwRound>,
}

struct FullRead {
    total_s: f64,
    mount_ms: f64,
    read_s: f64,
    entries: u64,
    files: usize,
    bytes: u64,
    hwm_kb: u64,
    sha_ok: bool,
    /// The daemon's own counters (tessera only).
    counters: Option<Value>,
}

impl FullRead {
    fn json(&self) -> Value {
        json!({
            "seconds_from_spawn": self.total_s,
            "mount_ms": self.mount_ms,
            "read_seconds": self.read_s,
            "mb_per_s_from_spawn": self.bytes as f64 / 1e6 / self.total_s,
            "entries": self.entries,
            "files": self.files,
            "bytes": self.bytes,
            "peak_rss_kb": self.hwm_kb,
            "largest_file_sha256_equal": self.sha_ok,
            "daemon_counters": self.counters,
        })
    }
}

struct Cold {
    tessera: Vec<FullRead>,
    nydus: Result<Vec<FullRead>, String>,
    nydus_mount_ms: Vec<f64>,
}

struct Warm {
    mount_ms: Vec<f64>,
    largest: (PathBuf, u64),
    /// Per round: (mount, native) MB/s or entries/s.
    seq_cold: Vec<(f64, f64)>,
    seq_hot: Vec<(f64, f64)>,
    walk_eps: Vec<(f64, f64)>,
    /// Entries and file bytes every walk saw: (mount, native); `walk_same` is false when
    /// any round differed.
    walk_entries: (u64, u64),
    walk_bytes: (u64, u64),
    walk_same: bool,
    hwm_kb: u64,
    sha_ok: bool,
    counters: Option<Value>,
}

struct Native {
    tree: Tree,
    largest_sha: String,
}

// ---------------------------------------------------------------------------------------
// Phase 1: time to first useful work over a shaped link

fn phase_ttfw(ctx: &mut Ctx) -> Result<Ttfw> {
    let work = ctx.work.clone();
    let ns = Netns::create(LINK)?;
    let reg_addr = format!("{REG_IP}:{REG_PORT}");
    let (mut reg, addr) = start_registry(
        ctx,
        Some(NS_REG),
        &reg_addr,
        &work.join("ns-registry"),
        &ctx.log("ns-serve.log"),
    )?;
    eprintln!(
        "[ttfw] tessera serve in {NS_REG} at {addr} (pid {})",
        reg.pid()
    );
    let tessera_ref = format!("{addr}/bench/app:tessera");
    let image = ctx.args.image.clone();

    // Load both images over the unshaped link.
    let load_convert_s = run_ok(
        in_netns(Some(NS_CLI), &ctx.tessera)
            .arg("--no-progress")
            .arg("convert")
            .arg("--plain-http")
            .arg("--cache-dir")
            .arg(work.join("convert-cache"))
            .arg(format!("oci:{}:{image}", ctx.layout.display()))
            .arg(&tessera_ref),
        CMD_WAIT,
    )?
    .secs;
    let load_skopeo_s = run_ok(
        in_netns(Some(NS_CLI), &ctx.args.skopeo)
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:{image}", ctx.layout.display()))
            .arg(format!("docker://{addr}/bench/app:oci")),
        CMD_WAIT,
    )?
    .secs;
    reg.check_alive()?;
    eprintln!(
        "[ttfw] loaded: tessera convert {load_convert_s:.1} s, skopeo push {load_skopeo_s:.1} s"
    );
    ns.shape(&ctx.args.rate, &ctx.args.burst, &ctx.args.tbf_latency)?;
    eprintln!(
        "[ttfw] shaped {VETH_REG} and {VETH_CLI}: tbf rate {} burst {} latency {}",
        ctx.args.rate, ctx.args.burst, ctx.args.tbf_latency
    );
    let oci_bytes = layout_layers(&ctx.layout, &image)?
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();

    // A read profile of the workload, recorded once (untimed) by a lazy run with
    // --record-profile and stored beside the image (`tessera profile push`: an OCI
    // referrer); the profile rows mount with no extra argument and find it there.
    let profile = work.join("app.profile");
    let rec = ttfw_lazy_run(
        ctx,
        &ns,
        &tessera_ref,
        "ttfw-record.log",
        &[
            "--no-profile".to_string(),
            "--record-profile".to_string(),
            profile.display().to_string(),
        ],
    )?;
    run_ok(
        in_netns(Some(NS_CLI), &ctx.tessera)
            .args(["--no-progress", "profile", "push", "--plain-http"])
            .arg(&tessera_ref)
            .arg(&profile),
        CMD_WAIT,
    )?;
    eprintln!(
        "[ttfw] profile recorded in {:.2} s: {} lines",
        rec.s,
        std::fs::read_to_string(&profile)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    );
    let prof_args: [String; 0] = [];
    let mut rounds = Vec::new();
    for round in 0..ctx.args.rounds {
        let mut r = TtfwRound::default();
        // Alternate the order, so neither path always runs right after the other.
        if round % 2 == 0 {
            ttfw_full(ctx, &ns, &addr, oci_bytes, &mut r)?;
            ttfw_lazy(ctx, &ns, &tessera_ref, round, &mut r)?;
            r.prof = ttfw_lazy_run(
                ctx,
                &ns,
                &tessera_ref,
                &format!("ttfw-profile{}.log", round + 1),
                &prof_args,
            )?;
        } else {
            r.prof = ttfw_lazy_run(
                ctx,
                &ns,
                &tessera_ref,
                &format!("ttfw-profile{}.log", round + 1),
                &prof_args,
            )?;
            ttfw_lazy(ctx, &ns, &tessera_ref, round, &mut r)?;
            ttfw_full(ctx, &ns, &addr, oci_bytes, &mut r)?;
        }
        rounds.push(r);
    }
    let st = reg.terminate(EXIT_WAIT)?;
    if !st.success() {
        ctx.warn(Some(format!(
            "tessera serve in {NS_REG} exited with {st} after SIGTERM"
        )));
    }
    drop(ns);
    Ok(Ttfw {
        load_convert_s,
        load_skopeo_s,
        oci_bytes,
        rounds,
    })
}

/// skopeo copy + umoci unpack + python on the unpacked tree, from the client namespace.
fn ttfw_full(ctx: &Ctx, ns: &Netns, addr: &str, oci_bytes: u64, r: &mut TtfwRound) -> Result<()> {
    let full = ctx.work.join("full");
    let bundle = ctx.work.join("bundle");
    for d in [&full, &bundle] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    drop_caches()?;
    let rx0 = ns.client_rx()?;
    let t0 = Instant::now();
    r.copy_s = run_ok(
        in_netns(Some(NS_CLI), &ctx.args.skopeo)
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
            ])
            .arg(format!("docker://{addr}/bench/app:oci"))
            .arg(format!("oci:{}:app", full.display())),
        CMD_WAIT,
    )?
    .secs;
    let rx1 = ns.client_rx()?;
    r.unpack_s = run_ok(
        Command::new(&ctx.args.umoci)
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:app", full.display()))
            .arg(&bundle),
        CMD_WAIT,
    )?
    .secs;
    r.full_py_s = ctx.python(&bundle.join("rootfs"))?;
    r.full_s = t0.elapsed().as_secs_f64();
    r.full_rx = rx1 - rx0;
    eprintln!(
        "[ttfw] full: {:.2} s (skopeo copy {:.2} s = {:.1} MB/s of layers, umoci unpack {:.2} s, python {:.2} s), {:.1} MB received",
        r.full_s,
        r.copy_s,
        oci_bytes as f64 / 1e6 / r.copy_s,
        r.unpack_s,
        r.full_py_s,
        r.full_rx as f64 / 1e6
    );
    Ok(())
}

/// `tessera mount` on an empty node store + python on the mount, from the client
/// namespace.
fn ttfw_lazy(
    ctx: &mut Ctx,
    ns: &Netns,
    tessera_ref: &str,
    round: usize,
    r: &mut TtfwRound,
) -> Result<()> {
    let run = ttfw_lazy_run(
        ctx,
        ns,
        tessera_ref,
        &format!("ttfw-mount{}.log", round + 1),
        &["--no-profile".to_string()],
    )?;
    r.lazy_s = run.s;
    r.lazy_mount_ms = run.mount_ms;
    r.lazy_py_s = run.py_s;
    r.lazy_rx = run.rx;
    r.lazy_hwm_kb = run.hwm_kb;
    r.lazy_counters = run.counters;
    Ok(())
}

/// One lazy run on an empty node store with `extra` mount arguments.
fn ttfw_lazy_run(
    ctx: &mut Ctx,
    ns: &Netns,
    tessera_ref: &str,
    log_name: &str,
    extra: &[String],
) -> Result<LazyRun> {
    let store = ctx.work.join("store-cold");
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&store)?;
    let mnt = ctx.work.join("mnt-ttfw");
    let log = ctx.log(log_name);
    drop_caches()?;
    let rx0 = ns.client_rx()?;
    let saved = ctx.args.mount_args.clone();
    ctx.args.mount_args.extend(extra.iter().cloned());
    let t0 = Instant::now();
    let mounted = Mount::tessera(ctx, Some(NS_CLI), tessera_ref, &mnt, &store, &log);
    ctx.args.mount_args = saved;
    let mut m = mounted?;
    let mut r = LazyRun {
        mount_ms: m.ready_ms(),
        ..LazyRun::default()
    };
    r.py_s = ctx.python(&mnt)?;
    r.s = t0.elapsed().as_secs_f64();
    r.rx = ns.client_rx()? - rx0;
    r.hwm_kb = m.proc.hwm_kb()?;
    let w = m.unmount()?;
    ctx.warn(w);
    r.counters = mount_counters(&log);
    eprintln!(
        "[ttfw] lazy{}: {:.2} s (mounted after {:.0} ms, python {:.2} s), {:.1} MB received; daemon counters {}",
        if extra.is_empty() { String::new() } else { format!(" {}", extra.join(" ")) },
        r.s,
        r.mount_ms,
        r.py_s,
        r.rx as f64 / 1e6,
        r.counters.as_ref().map(|c| c.to_string()).unwrap_or_else(|| "n/a".into())
    );
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// Phase 3: cold full read, tessera vs nydusd

/// Spawn → mounted → walk → read every file; checks against the native tree.
fn full_read(
    ctx: &Ctx,
    native: &Native,
    start: impl FnOnce() -> Result<Mount>,
) -> Result<(Mount, FullRead)> {
    drop_caches()?;
    let t0 = Instant::now();
    let mut m = start()?;
    let dir = m.dir.clone();
    let threads = ctx.args.read_threads;
    let t1 = Instant::now();
    let (tree, n) = bounded("full read", IO_WAIT, move || {
        let tree = walk(&dir)?;
        let files = Arc::new(tree.files.clone());
        let n = read_all(files, threads)?;
        Ok((tree, n))
    })?;
    let total_s = t0.elapsed().as_secs_f64();
    let read_s = t1.elapsed().as_secs_f64();
    let hwm_kb = m.proc.hwm_kb()?;
    ensure!(
        n == tree.bytes,
        "read {n} bytes, the walk found {}",
        tree.bytes
    );
    let rel = &native
        .tree
        .largest
        .as_ref()
        .context("no regular file in the image")?
        .0;
    let sha = sha256_file(&m.dir.join(rel))?;
    let sha_ok = sha == native.largest_sha;
    if !sha_ok {
        eprintln!(
            "CORRECTNESS: {} through the mount hashes to {sha}, the native file to {}",
            rel.display(),
            native.largest_sha
        );
    }
    if tree.entries != native.tree.entries || tree.bytes != native.tree.bytes {
        eprintln!(
            "CORRECTNESS: the mount has {} entries / {} file bytes, the native tree {} / {}",
            tree.entries, tree.bytes, native.tree.entries, native.tree.bytes
        );
    }
    Ok((
        m,
        FullRead {
            total_s,
            mount_ms: 0.0,
            read_s,
            entries: tree.entries,
            files: tree.files.len(),
            bytes: n,
            hwm_kb,
            sha_ok,
            counters: None,
        },
    ))
}

struct NydusImage {
    bootstrap: PathBuf,
    config: PathBuf,
    cache: PathBuf,
}

/// nydus-image per layer (tar-rafs, RAFS v6, zstd) + merge, the way nydusify converts;
/// blobs pushed to `addr` as bench/nydus.
fn build_nydus(ctx: &Ctx, addr: &str) -> Result<NydusImage> {
    let dir = ctx.work.join("nydus");
    let tars = dir.join("layers");
    let blobs = dir.join("blobs");
    let boots = dir.join("boots");
    for d in [&tars, &blobs, &boots] {
        std::fs::create_dir_all(d)?;
    }
    let mut layer_boots = Vec::new();
    // Blob id of every layer: `merge` names blobs after the layer bootstraps' file names
    // unless it is given the ids (as nydusify does).
    let mut blob_ids = Vec::new();
    for (i, gz) in layout_layers(&ctx.layout, &ctx.args.image)?
        .iter()
        .enumerate()
    {
        let tar = tars.join(format!("layer{i}.tar"));
        let out = run_to(
            Command::new("gzip").arg("-dc").arg(gz),
            Some(File::create(&tar)?),
            CMD_WAIT,
        )?;
        ensure!(
            out.status.success(),
            "gzip -dc {}: {}",
            gz.display(),
            out.stderr
        );
        let boot = boots.join(format!("layer{i}.boot"));
        let report = boots.join(format!("layer{i}.json"));
        run_ok(
            Command::new(&ctx.args.nydus_image)
                .args([
                    "create",
                    "-t",
                    "tar-rafs",
                    "--fs-version",
                    "6",
                    "--compressor",
                    "zstd",
                    "--log-level",
                    "warn",
                ])
                .arg("-D")
                .arg(&blobs)
                .arg("-B")
                .arg(&boot)
                .arg("-J")
                .arg(&report)
                .arg(&tar),
            CMD_WAIT,
        )?;
        let _ = std::fs::remove_file(&tar);
        let ids: Vec<String> = read_json(&report)?["blobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str().map(String::from))
            .collect();
        ensure!(
            ids.len() == 1,
            "nydus-image create wrote {} blobs for layer {i} ({ids:?}), expected one",
            ids.len()
        );
        blob_ids.extend(ids);
        layer_boots.push(boot);
    }
    let sizes = blob_ids
        .iter()
        .map(|id| Ok(std::fs::metadata(blobs.join(id))?.len().to_string()))
        .collect::<Result<Vec<_>>>()?;
    let bootstrap = dir.join("image.boot");
    run_ok(
        Command::new(&ctx.args.nydus_image)
            .args(["merge", "--log-level", "warn"])
            .arg("-B")
            .arg(&bootstrap)
            .arg("-D")
            .arg(&blobs)
            .arg("--blob-digests")
            .arg(blob_ids.join(","))
            .arg("--blob-sizes")
            .arg(sizes.join(","))
            .args(&layer_boots),
        CMD_WAIT,
    )?;
    let mut n = 0;
    let unique: std::collections::BTreeSet<&String> = blob_ids.iter().collect();
    for name in unique {
        let p = blobs.join(name);
        let digest = sha256_file(&p)?;
        ensure!(
            digest == format!("sha256:{name}"),
            "nydus blob {name} hashes to {digest}: the registry backend fetches blobs by id"
        );
        upload_blob(addr, "bench/nydus", &p, &digest)?;
        n += 1;
    }
    ensure!(n > 0, "nydus-image wrote no blob into {}", blobs.display());
    let cache = ctx.work.join("nydus-cache");
    let config = dir.join("nydusd.json");
    let cfg = json!({
        "device": {
            "backend": {
                "type": "registry",
                "config": {
                    "scheme": "http",
                    "host": addr,
                    "repo": "bench/nydus",
                    "timeout": 60,
                    "connect_timeout": 10,
                    "retry_limit": 2
                }
            },
            "cache": {"type": "blobcache", "config": {"work_dir": cache}}
        },
        "mode": "direct",
        "digest_validate": false,
        "iostats_files": false,
        "enable_xattr": true,
        "fs_prefetch": {"enable": false}
    });
    std::fs::write(&config, serde_json::to_vec_pretty(&cfg)?)?;
    eprintln!("[cold] nydus image: {n} blob(s) pushed to {addr}/bench/nydus");
    Ok(NydusImage {
        bootstrap,
        config,
        cache,
    })
}

fn phase_cold(ctx: &mut Ctx, addr: &str, native: &Native) -> Result<Cold> {
    let store = ctx.work.join("store-warm");
    let reference = format!("{addr}/bench/app:tessera");
    let mnt = ctx.work.join("mnt-cold");
    let mut tessera = Vec::new();
    for round in 0..ctx.args.rounds {
        let _ = std::fs::remove_dir_all(&store);
        std::fs::create_dir_all(&store)?;
        let log = ctx.log(&format!("cold-mount{}.log", round + 1));
        let (m, mut r) = full_read(ctx, native, || {
            Mount::tessera(ctx, None, &reference, &mnt, &store, &log)
        })?;
        r.mount_ms = m.ready_ms();
        let w = m.unmount()?;
        ctx.warn(w);
        r.counters = mount_counters(&log);
        eprintln!(
            "[cold] tessera: {:.2} s from spawn ({:.1} MB/s; mounted after {:.0} ms), peak RSS {} MiB; daemon counters {}",
            r.total_s,
            r.bytes as f64 / 1e6 / r.total_s,
            r.mount_ms,
            r.hwm_kb / 1024,
            r.counters.as_ref().map(|c| c.to_string()).unwrap_or_else(|| "n/a".into())
        );
        tessera.push(r);
    }

    let mut nydus_mount_ms = Vec::new();
    let nydus = if ctx.args.skip_nydus {
        Err("skipped (--skip-nydus)".to_string())
    } else {
        let r = (|| -> Result<Vec<FullRead>> {
            let img = build_nydus(ctx, addr)?;
            let mnt = ctx.work.join("mnt-nydus");
            let mut runs = Vec::new();
            for round in 0..ctx.args.rounds {
                let _ = std::fs::remove_dir_all(&img.cache);
                std::fs::create_dir_all(&img.cache)?;
                let log = ctx.log(&format!("nydusd-cold{}.log", round + 1));
                let (m, mut r) = full_read(ctx, native, || {
                    Mount::nydusd(ctx, &img.config, &img.bootstrap, &mnt, &log)
                })?;
                r.mount_ms = m.ready_ms();
                let w = m.unmount()?;
                ctx.warn(w);
                eprintln!(
                    "[cold] nydusd: {:.2} s from spawn ({:.1} MB/s; mounted after {:.0} ms), peak RSS {} MiB",
                    r.total_s,
                    r.bytes as f64 / 1e6 / r.total_s,
                    r.mount_ms,
                    r.hwm_kb / 1024
                );
                runs.push(r);
            }
            // Warm mounts: blobcache filled by the full read.
            for i in 0..ctx.args.mount_runs {
                let m = Mount::nydusd(
                    ctx,
                    &img.config,
                    &img.bootstrap,
                    &mnt,
                    &ctx.log(&format!("nydusd-warm{i}.log")),
                )?;
                nydus_mount_ms.push(m.ready_ms());
                let w = m.unmount()?;
                ctx.warn(w);
            }
            Ok(runs)
        })();
        r.map_err(|e| {
            let e = format!("{e:#}");
            eprintln!("[cold] nydusd FAILED: {e}");
            e
        })
    };
    Ok(Cold {
        tessera,
        nydus,
        nydus_mount_ms,
    })
}

// ---------------------------------------------------------------------------------------
// Phase 2: warm

fn phase_warm(ctx: &mut Ctx, addr: &str, native: &Native, store_filled: bool) -> Result<Warm> {
    let store = ctx.work.join("store-warm");
    let reference = format!("{addr}/bench/app:tessera");
    let mnt = ctx.work.join("mnt-warm");
    if !store_filled {
        std::fs::create_dir_all(&store)?;
        let m = Mount::tessera(
            ctx,
            None,
            &reference,
            &mnt,
            &store,
            &ctx.log("warm-fill.log"),
        )?;
        let dir = m.dir.clone();
        let threads = ctx.args.read_threads;
        bounded("filling the node store", IO_WAIT, move || {
            let t = walk(&dir)?;
            read_all(Arc::new(t.files), threads)
        })?;
        let w = m.unmount()?;
        ctx.warn(w);
    }
    let mut mount_ms = Vec::new();
    for i in 0..ctx.args.mount_runs {
        let m = Mount::tessera(
            ctx,
            None,
            &reference,
            &mnt,
            &store,
            &ctx.log(&format!("warm-mount{i}.log")),
        )?;
        mount_ms.push(m.ready_ms());
        let w = m.unmount()?;
        ctx.warn(w);
    }
    eprintln!("[warm] mount times: {mount_ms:.1?} ms");

    let m = Mount::tessera(
        ctx,
        None,
        &reference,
        &mnt,
        &store,
        &ctx.log("warm-mount.log"),
    )?;
    let mut m = m;
    let (rel, size) = native
        .tree
        .largest
        .clone()
        .context("no regular file in the image")?;
    let on_mount = mnt.join(&rel);
    let on_native = ctx.native_root().join(&rel);
    let mbps = |(n, s): (u64, f64)| n as f64 / 1e6 / s;
    let seq = |p: &Path| {
        let p = p.to_path_buf();
        bounded("sequential read", IO_WAIT, move || read_seq(&p)).map(mbps)
    };
    let timed_walk = |root: &Path| -> Result<(Tree, f64)> {
        let root = root.to_path_buf();
        drop_caches()?;
        bounded("walk", IO_WAIT, move || {
            let t0 = Instant::now();
            let t = walk(&root)?;
            Ok((t, t0.elapsed().as_secs_f64()))
        })
    };
    let (mut seq_cold, mut seq_hot, mut walk_eps) = (Vec::new(), Vec::new(), Vec::new());
    let mut walk_same = true;
    let (mut walk_entries, mut walk_bytes) = ((0, 0), (0, 0));
    for _ in 0..ctx.args.rounds {
        drop_caches()?;
        let mount_cold = seq(&on_mount)?;
        let mount_hot = seq(&on_mount)?;
        drop_caches()?;
        let native_cold = seq(&on_native)?;
        let native_hot = seq(&on_native)?;
        eprintln!(
            "[warm] {} ({:.1} MB): mount {mount_cold:.0} / {mount_hot:.0} MB/s (cold/hot page cache), native {native_cold:.0} / {native_hot:.0} MB/s",
            rel.display(),
            size as f64 / 1e6
        );
        seq_cold.push((mount_cold, native_cold));
        seq_hot.push((mount_hot, native_hot));
        let (mt, ms) = timed_walk(&mnt)?;
        let (nt, ns) = timed_walk(&ctx.native_root())?;
        eprintln!(
            "[warm] walk: mount {} entries in {ms:.3} s, native {} entries in {ns:.3} s",
            mt.entries, nt.entries,
        );
        walk_eps.push((mt.entries as f64 / ms, nt.entries as f64 / ns));
        walk_same &= mt.entries == nt.entries && mt.bytes == nt.bytes;
        walk_entries = (mt.entries, nt.entries);
        walk_bytes = (mt.bytes, nt.bytes);
    }
    let sha_ok = sha256_file(&on_mount)? == native.largest_sha;
    let hwm_kb = m.proc.hwm_kb()?;
    let log = m.proc.log.clone();
    let w = m.unmount()?;
    ctx.warn(w);
    let counters = mount_counters(&log);
    eprintln!(
        "[warm] daemon peak RSS {} MiB; daemon counters {}",
        hwm_kb / 1024,
        counters
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "n/a".into())
    );
    Ok(Warm {
        mount_ms,
        largest: (rel, size),
        seq_cold,
        seq_hot,
        walk_eps,
        walk_entries,
        walk_bytes,
        walk_same,
        hwm_kb,
        sha_ok,
        counters,
    })
}

// ---------------------------------------------------------------------------------------
// Report

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        rustix::process::geteuid().is_root(),
        "tessera-mount-bench needs root (network namespaces, tc, FUSE mounts, chroot, drop_caches): run it with sudo"
    );
    ensure!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    ensure!(args.mount_runs >= 1, "--mount-runs must be at least 1");
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let tessera = match &args.tessera {
        Some(t) => t.clone(),
        None => std::env::current_exe()?.with_file_name("tessera"),
    };
    ensure!(
        tessera.exists(),
        "{} not found: build it with `cargo build --release -p tessera` first",
        tessera.display()
    );
    for (bin, pkg) in [
        (args.skopeo.as_str(), "apt-get install skopeo"),
        (args.umoci.as_str(), "apt-get install umoci"),
        ("ip", "apt-get install iproute2"),
        ("tc", "apt-get install iproute2"),
        ("nsenter", "apt-get install util-linux"),
        ("gzip", "apt-get install gzip"),
    ] {
        ensure!(
            Command::new(bin)
                .arg("--help")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "{bin} not found: {pkg}"
        );
    }
    let layout = args.corpus.join("layout");
    layout_layers(&layout, &args.image)?;

    // Leftovers of an interrupted run: mounts under the work dir, namespaces.
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let work = args.work.canonicalize()?;
    for m in mounts_under(&work) {
        eprintln!("unmounting leftover {}", m.display());
        lazy_umount(&m);
    }
    ensure!(
        mounts_under(&work).is_empty(),
        "mounts left under {} that cannot be removed",
        work.display()
    );
    Netns::delete_all(&LINK);
    std::fs::remove_dir_all(&work).with_context(|| format!("emptying {}", work.display()))?;
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;

    let mut ctx = Ctx {
        args,
        tessera,
        work: work.clone(),
        layout,
        logs,
        warnings: Vec::new(),
    };
    let started = Instant::now();
    let load_start = loadavg();

    // Phase 1.
    let ttfw = if ctx.args.skip_ttfw {
        None
    } else {
        Some(phase_ttfw(&mut ctx)?)
    };
    let lo = if ctx.args.skip_cold && ctx.args.skip_warm && ctx.args.many == 0 {
        None
    } else {
        Some(loopback_phases(&mut ctx)?)
    };

    let (table, summary, correct) = report(&ctx, ttfw.as_ref(), lo.as_ref());
    println!("{table}");
    if !ctx.warnings.is_empty() {
        println!("Warnings:\n- {}", ctx.warnings.join("\n- "));
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let results = json!({
        "summary": summary,
        "correct": correct,
        "warnings": ctx.warnings,
        "native_tree": lo.as_ref().map(|l| json!({
            "entries": l.native.tree.entries, "files": l.native.tree.files.len(), "bytes": l.native.tree.bytes,
            "largest_file": l.native.tree.largest.as_ref().map(|x| &x.0),
            "largest_file_bytes": l.native.tree.largest.as_ref().map(|x| x.1),
            "largest_file_sha256": l.native.largest_sha,
        })),
        "settings": {
            "image": ctx.args.image, "python": ctx.args.python, "rate": ctx.args.rate, "burst": ctx.args.burst,
            "tbf_latency": ctx.args.tbf_latency, "fuse_threads": ctx.args.fuse_threads,
            "read_threads": ctx.args.read_threads, "mount_runs": ctx.args.mount_runs,
            "rounds": ctx.args.rounds,
            "mount_args": ctx.args.mount_args,
        },
        "machine": {
            "cores": cores,
            "kernel": version("uname", "-r"),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
            "tessera": version(&ctx.tessera.to_string_lossy(), "--version"),
            "skopeo": version(&ctx.args.skopeo, "--version"),
            "umoci": version(&ctx.args.umoci, "--version"),
            "nydusd": version(&ctx.args.nydusd, "--version"),
        },
        "seconds": started.elapsed().as_secs_f64(),
        "table_markdown": table,
    });
    std::fs::write(&ctx.args.json, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", ctx.args.json.display()))?;
    eprintln!(
        "JSON written to {}; load average {} at the start, {} at the end",
        ctx.args.json.display(),
        load_start,
        loadavg()
    );
    if !ctx.args.keep_work {
        clean_work(&work, &ctx.logs)?;
    }
    ensure!(correct, "correctness checks failed (see the table)");
    Ok(())
}

struct Loopback {
    native: Native,
    index_bytes: u64,
    image_bytes: u64,
    cold: Option<Cold>,
    warm: Option<Warm>,
    many: Option<Many>,
}

/// Phase 4's result.
struct Many {
    images: Vec<String>,
    /// Indexes of the mounted images, bytes in all.
    index_bytes: u64,
    entries: u64,
    read_bytes: u64,
    rss_kb: u64,
    seconds: f64,
}

/// The tags of the corpus layout, in index.json order.
fn layout_tags(layout: &Path) -> Result<Vec<String>> {
    let index = read_json(&layout.join("index.json"))?;
    Ok(index["manifests"]
        .as_array()
        .context("index.json manifests")?
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(str::to_string)
        .collect())
}

/// Phase 4: `--many` mounts served by one `tessera mount` process (the corpus images in
/// turn, each converted to the loopback registry; an empty node store), each walked and
/// read like a workload (its largest files first, `--many-read` bytes); then the
/// daemon's peak RSS.
fn phase_many(ctx: &mut Ctx, addr: &str) -> Result<Many> {
    let n = ctx.args.many;
    let tags = layout_tags(&ctx.layout)?;
    ensure!(!tags.is_empty(), "no tags in the corpus layout");
    let images: Vec<String> = (0..n).map(|i| tags[i % tags.len()].clone()).collect();
    let mut index_bytes = 0;
    for tag in tags.iter().take(n) {
        run_ok(
            Command::new(&ctx.tessera)
                .arg("--no-progress")
                .arg("convert")
                .arg("--cache-dir")
                .arg(ctx.work.join("convert-cache"))
                .arg(format!("oci:{}:{tag}", ctx.layout.display()))
                .arg(format!("{addr}/many/{tag}:tessera")),
            CMD_WAIT,
        )?;
    }
    for tag in &images {
        index_bytes += index_size(addr, &format!("many/{tag}"), "tessera")?.0;
    }
    let dirs: Vec<PathBuf> = (0..n).map(|i| ctx.work.join(format!("many/{i}"))).collect();
    let mut cmd = Command::new(&ctx.tessera);
    cmd.arg("--no-progress").arg("-v").arg("mount");
    for (tag, d) in images.iter().zip(&dirs) {
        std::fs::create_dir_all(d)?;
        cmd.arg(format!("{addr}/many/{tag}:tessera")).arg(d);
    }
    cmd.arg("--store")
        .arg(ctx.work.join("many-store"))
        .arg("--threads")
        .arg(ctx.args.fuse_threads.to_string())
        .args(&ctx.args.mount_args);
    let t0 = Instant::now();
    let mut proc = Proc::spawn(
        "tessera mount (many)",
        &mut cmd,
        &ctx.log("many-mount.log"),
        true,
    )?;
    // Detached on every path out (the daemon is killed by Proc's Drop).
    struct Detach<'a>(&'a [PathBuf]);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            for d in self.0 {
                if mounted_fstype(d).is_some() {
                    lazy_umount(d);
                }
            }
        }
    }
    let _detach = Detach(&dirs);
    for _ in 0..n {
        proc.wait_line("mounted ", MOUNT_WAIT)?;
    }
    let (mut entries, mut read_bytes) = (0, 0);
    for d in &dirs {
        let tree = walk(d)?;
        entries += tree.entries;
        let mut files = tree.files;
        files.sort_by_key(|f| std::cmp::Reverse(f.1));
        let mut sum = 0;
        let files: Vec<_> = files
            .into_iter()
            .take_while(|(_, len)| {
                let take = sum < ctx.args.many_read;
                sum += len;
                take
            })
            .collect();
        read_bytes += read_all(Arc::new(files), ctx.args.read_threads)?;
    }
    let rss_kb = proc.hwm_kb()?;
    let seconds = t0.elapsed().as_secs_f64();
    for d in &dirs {
        run_ok(
            Command::new(&ctx.tessera).arg("umount").arg(d),
            Duration::from_secs(60),
        )?;
    }
    let st = proc.wait_exit(EXIT_WAIT)?;
    if !st.success() {
        ctx.warn(Some(format!(
            "tessera mount (many) exited with {st} after its mounts were unmounted"
        )));
    }
    eprintln!(
        "[many] {n} mounts in one process: {entries} entries walked, {:.1} MB read, peak RSS {:.1} MiB ({seconds:.1} s)",
        read_bytes as f64 / 1e6,
        rss_kb as f64 / 1024.0
    );
    Ok(Many {
        images,
        index_bytes,
        entries,
        read_bytes,
        rss_kb,
        seconds,
    })
}

/// Phases 3 and 2 against a `tessera serve` on loopback (3 first: it fills the node store
/// 2 needs).
fn loopback_phases(ctx: &mut Ctx) -> Result<Loopback> {
    let work = ctx.work.clone();
    if !ctx.native_root().exists() {
        // Phase 1 did not run: the native tree, unpacked untimed from the layout.
        let full = work.join("full");
        run_ok(
            Command::new(&ctx.args.skopeo)
                .args(["--insecure-policy", "copy", "--quiet"])
                .arg(format!("oci:{}:{}", ctx.layout.display(), ctx.args.image))
                .arg(format!("oci:{}:app", full.display())),
            CMD_WAIT,
        )?;
        run_ok(
            Command::new(&ctx.args.umoci)
                .arg("unpack")
                .arg("--image")
                .arg(format!("{}:app", full.display()))
                .arg(work.join("bundle")),
            CMD_WAIT,
        )?;
    }
    let tree = walk(&ctx.native_root())?;
    let largest = tree
        .largest
        .clone()
        .context("no regular file in the image")?;
    let native = Native {
        largest_sha: sha256_file(&ctx.native_root().join(&largest.0))?,
        tree,
    };
    eprintln!(
        "native tree: {} entries, {} regular files, {:.1} MB; largest file {} ({:.1} MB)",
        native.tree.entries,
        native.tree.files.len(),
        native.tree.bytes as f64 / 1e6,
        largest.0.display(),
        largest.1 as f64 / 1e6
    );
    let (mut lo_reg, addr) = start_registry(
        ctx,
        None,
        "127.0.0.1:0",
        &work.join("lo-registry"),
        &ctx.log("lo-serve.log"),
    )?;
    wait_ready(&mut lo_reg, &addr)?;
    let convert = run_ok(
        Command::new(&ctx.tessera)
            .arg("--no-progress")
            .arg("convert")
            .arg("--cache-dir")
            .arg(work.join("convert-cache"))
            .arg(format!("oci:{}:{}", ctx.layout.display(), ctx.args.image))
            .arg(format!("{addr}/bench/app:tessera")),
        CMD_WAIT,
    )?;
    let (index_bytes, image_bytes) = index_size(&addr, "bench/app", "tessera")?;
    eprintln!(
        "loopback registry {addr}: tessera image pushed in {:.1} s; index {:.2} MB, index + packs {:.1} MB",
        convert.secs,
        index_bytes as f64 / 1e6,
        image_bytes as f64 / 1e6
    );
    let cold = if ctx.args.skip_cold {
        None
    } else {
        Some(phase_cold(ctx, &addr, &native)?)
    };
    let warm = if ctx.args.skip_warm {
        None
    } else {
        Some(phase_warm(ctx, &addr, &native, cold.is_some())?)
    };
    let many = if ctx.args.many == 0 {
        None
    } else {
        Some(phase_many(ctx, &addr)?)
    };
    let st = lo_reg.terminate(EXIT_WAIT)?;
    if !st.success() {
        ctx.warn(Some(format!(
            "loopback tessera serve exited with {st} after SIGTERM"
        )));
    }
    Ok(Loopback {
        native,
        index_bytes,
        image_bytes,
        cold,
        warm,
        many,
    })
}

/// The Markdown table, the JSON summary, and whether every correctness check passed.
fn report(
    ctx: &Ctx,
    ttfw: Option<&Ttfw>,
    lo: Option<&Loopback>,
) -> (String, serde_json::Map<String, Value>, bool) {
    let rounds = ctx.args.rounds;
    let of_rounds = if rounds > 1 {
        format!(", median of {rounds}")
    } else {
        String::new()
    };
    let mut table = String::from(
        "| figure | tessera | peer | ratio (tessera/peer) | target |\n|---|---:|---:|---:|---|\n",
    );
    let mut summary = serde_json::Map::new();
    let mut correct = true;
    let img = &ctx.args.image;
    let code = &ctx.args.python;
    if let Some(t) = ttfw {
        let r = &t.rounds;
        let lazy = med(r, |r| r.lazy_s);
        let full = med(r, |r| r.full_s);
        let ratio = lazy / full;
        table.push_str(&format!(
            "| time to first useful work: `python3 -c '{code}'` in {img} over a {} link{of_rounds}, cold store, no profile (`--no-profile`); peer: skopeo copy + umoci unpack + chroot | \
             **{lazy:.2} s** (mounted {:.0} ms + python {:.2} s) | {full:.2} s (copy {:.2} s + unpack {:.2} s + python {:.2} s) | {} | ≤ {TTFW_TARGET} {} |\n",
            ctx.args.rate,
            med(r, |r| r.lazy_mount_ms),
            med(r, |r| r.lazy_py_s),
            med(r, |r| r.copy_s),
            med(r, |r| r.unpack_s),
            med(r, |r| r.full_py_s),
            show_ratio(ratio, TTFW_TARGET),
            mark(ratio <= TTFW_TARGET)
        ));
        let plazy = med(r, |r| r.prof.s);
        let pratio = plazy / full;
        table.push_str(&format!(
            "| same, cold store, the image's stored read profile (recorded once with `--record-profile`, stored with `tessera profile push`; the mount finds it as a referrer) | \
             **{plazy:.2} s** (mounted {:.0} ms + python {:.2} s), {:.1} MB received | {full:.2} s | {} | ≤ {TTFW_TARGET} {} |\n",
            med(r, |r| r.prof.mount_ms),
            med(r, |r| r.prof.py_s),
            med(r, |r| r.prof.rx as f64) / 1e6,
            show_ratio(pratio, TTFW_TARGET),
            mark(pratio <= TTFW_TARGET)
        ));
        let (lrx, frx) = (med(r, |r| r.lazy_rx as f64), med(r, |r| r.full_rx as f64));
        table.push_str(&format!(
            "| bytes received by the client (veth rx) | {:.1} MB | {:.1} MB (layers {:.1} MB) | {:.2} | |\n",
            lrx / 1e6,
            frx / 1e6,
            t.oci_bytes as f64 / 1e6,
            lrx / frx
        ));
        summary.insert(
            "ttfw".into(),
            json!({
                "ratio": ratio,
                "profile_ratio": pratio,
                "tessera_profile_seconds": plazy,
                "tessera_seconds": lazy,
                "full_seconds": full,
                "tessera_rx_bytes": lrx,
                "full_rx_bytes": frx,
                "layer_bytes": t.oci_bytes,
                "rounds": r.iter().map(TtfwRound::json).collect::<Vec<_>>(),
                "load": {"tessera_convert_seconds": t.load_convert_s, "skopeo_push_seconds": t.load_skopeo_s},
            }),
        );
    }
    let Some(lo) = lo else {
        return (table, summary, correct);
    };
    let cold = lo.cold.as_ref();
    let native = &lo.native;
    let mut sha_ours = Vec::new();
    let mut sha_peer = None;
    if let Some(warm) = &lo.warm {
        let mount_med = median(&warm.mount_ms);
        let nydus_mount_med = cold
            .filter(|c| !c.nydus_mount_ms.is_empty())
            .map(|c| median(&c.nydus_mount_ms));
        table.push_str(&format!(
            "| warm mount: spawn → mounted, loopback registry, node store filled (median of {}; min {:.1} ms) | {mount_med:.1} ms | {} | {} | ≤ {MOUNT_MS_TARGET:.0} ms {} |\n",
            warm.mount_ms.len(),
            warm.mount_ms.iter().copied().fold(f64::INFINITY, f64::min),
            nydus_mount_med.map(|n| format!("nydusd {n:.1} ms (blobcache filled, local bootstrap)")).unwrap_or_else(|| "—".into()),
            nydus_mount_med.map(|n| format!("{:.2}", mount_med / n)).unwrap_or_default(),
            mark(mount_med <= MOUNT_MS_TARGET)
        ));
        let (rel, size) = &warm.largest;
        let mut json_pairs = serde_json::Map::new();
        for (what, key, v) in [
            (
                "page cache dropped",
                "seq_read_cold_mb_per_s",
                &warm.seq_cold,
            ),
            ("hot page cache", "seq_read_hot_mb_per_s", &warm.seq_hot),
        ] {
            let (o, p) = (med(v, |x| x.0), med(v, |x| x.1));
            let ratio = o / p;
            table.push_str(&format!(
                "| sequential read of the largest file ({}, {:.1} MB), {what}{of_rounds}; peer: native tree | {o:.0} MB/s | {p:.0} MB/s | {} | ≥ {SEQ_TARGET} {} |\n",
                rel.file_name().unwrap_or_default().to_string_lossy(),
                *size as f64 / 1e6,
                show_ratio(ratio, SEQ_TARGET),
                mark(ratio >= SEQ_TARGET)
            ));
            json_pairs.insert(
                key.into(),
                json!({"tessera": o, "native": p, "ratio": ratio, "rounds": v}),
            );
        }
        let (o, p) = (med(&warm.walk_eps, |x| x.0), med(&warm.walk_eps, |x| x.1));
        let (oe, pe) = warm.walk_entries;
        correct &= warm.walk_same;
        table.push_str(&format!(
            "| metadata walk: read_dir + lstat of every entry, dentry cache dropped{of_rounds}; peer: native tree | {o:.0} entries/s ({oe} entries) | {p:.0} entries/s ({pe} entries) | {} | ≥ {WALK_TARGET} {}{} |\n",
            show_ratio(o / p, WALK_TARGET),
            mark(o / p >= WALK_TARGET),
            if warm.walk_same { "" } else { "; **ENTRY COUNTS OR BYTES DIFFER**" }
        ));
        json_pairs.insert(
            "walk_entries_per_s".into(),
            json!({"tessera": o, "native": p, "ratio": o / p, "rounds": warm.walk_eps}),
        );
        let rss_target = RSS_BASE_MIB + lo.index_bytes as f64 / (1 << 20) as f64;
        let o = mib(warm.hwm_kb);
        table.push_str(&format!(
            "| daemon peak RSS (VmHWM) after the reads and the walk | {o:.1} MiB | index blob {:.2} MiB | | ≤ 64 MiB + index = {rss_target:.1} MiB {} |\n",
            lo.index_bytes as f64 / (1 << 20) as f64,
            mark(o <= rss_target)
        ));
        let mut w = json!({
            "mount_ms": warm.mount_ms, "mount_ms_median": mount_med,
            "nydusd_mount_ms": cold.map(|c| c.nydus_mount_ms.clone()), "nydusd_mount_ms_median": nydus_mount_med,
            "largest_file": rel, "largest_file_bytes": size,
            "walk_entries": {"tessera": oe, "native": pe},
            "walk_file_bytes": {"tessera": warm.walk_bytes.0, "native": warm.walk_bytes.1},
            "walk_counts_equal_every_round": warm.walk_same,
            "peak_rss_kb": warm.hwm_kb, "index_bytes": lo.index_bytes, "image_blob_bytes": lo.image_bytes,
            "rss_target_mib": rss_target,
            "largest_file_sha256_equal": warm.sha_ok,
            "daemon_counters": warm.counters,
        });
        if let Some(m) = w.as_object_mut() {
            m.extend(json_pairs);
        }
        summary.insert("warm".into(), w);
        sha_ours.push(warm.sha_ok);
    }
    if let Some(c) = cold {
        let t = &c.tessera;
        let bytes = t.first().map(|r| r.bytes).unwrap_or(0);
        let files = format!(
            "{} files, {:.1} MB",
            t.first().map(|r| r.files).unwrap_or(0),
            bytes as f64 / 1e6
        );
        let cell = |v: &[FullRead]| {
            let s = med(v, |r| r.total_s);
            format!(
                "{s:.2} s = {:.0} MB/s (mounted {:.0} ms)",
                bytes as f64 / 1e6 / s,
                med(v, |r| r.mount_ms)
            )
        };
        let t_s = med(t, |r| r.total_s);
        let (peer, ratio) = match &c.nydus {
            Ok(n) => (
                cell(n),
                format!("{:.2}× the MB/s", med(n, |r| r.total_s) / t_s),
            ),
            Err(e) => (
                format!(
                    "nydusd failed: {}",
                    e.lines().next().unwrap_or_default().replace('|', "/")
                ),
                String::new(),
            ),
        };
        table.push_str(&format!(
            "| cold full read: every regular file ({files}), {} threads, empty cache, loopback registry, from spawn{of_rounds}; peer: nydusd (registry backend, blobcache) | {} | {peer} | {ratio} | |\n",
            ctx.args.read_threads,
            cell(t)
        ));
        let max_hwm = |v: &[FullRead]| mib(v.iter().map(|r| r.hwm_kb).max().unwrap_or(0));
        let (peer_rss, rss_ratio) = match &c.nydus {
            Ok(n) => (
                format!("{:.1} MiB", max_hwm(n)),
                format!("{:.2}", max_hwm(t) / max_hwm(n)),
            ),
            Err(_) => ("—".into(), String::new()),
        };
        table.push_str(&format!(
            "| daemon peak RSS after the cold full read | {:.1} MiB | {peer_rss} | {rss_ratio} | |\n",
            max_hwm(t)
        ));
        let peer_runs: &[FullRead] = c.nydus.as_deref().unwrap_or(&[]);
        for r in t.iter().chain(peer_runs) {
            let same = r.entries == native.tree.entries && r.bytes == native.tree.bytes;
            if !same {
                table.push_str(&format!(
                    "| **a cold full read saw {} entries / {} bytes, the native tree has {} / {}** | | | | |\n",
                    r.entries, r.bytes, native.tree.entries, native.tree.bytes
                ));
            }
            correct &= same;
        }
        sha_ours.extend(t.iter().map(|r| r.sha_ok));
        if let Ok(n) = &c.nydus {
            sha_peer = Some(n.iter().all(|r| r.sha_ok));
        }
        summary.insert(
            "cold".into(),
            json!({
                "tessera_seconds": t_s,
                "nydusd_seconds": c.nydus.as_ref().ok().map(|n| med(n, |r| r.total_s)),
                "ratio_mb_per_s": c.nydus.as_ref().ok().map(|n| med(n, |r| r.total_s) / t_s),
                "tessera": t.iter().map(FullRead::json).collect::<Vec<_>>(),
                "nydusd": match &c.nydus {
                    Ok(n) => json!(n.iter().map(FullRead::json).collect::<Vec<_>>()),
                    Err(e) => json!({"error": e}),
                },
            }),
        );
    }
    if let Some(m) = &lo.many {
        let mib = m.rss_kb as f64 / 1024.0;
        let mut distinct = m.images.clone();
        distinct.sort();
        distinct.dedup();
        table.push_str(&format!(
            "| daemon peak RSS (VmHWM) with {} images mounted in one process ({} distinct corpus images, {:.1} MB of indexes), each walked ({} entries in all) and read ({:.0} MB in all, largest files first), empty store, loopback | {mib:.1} MiB | nydusd not run (one daemon per image) | | ≤ {MANY_RSS_MIB:.0} MiB {} |\n",
            m.images.len(),
            distinct.len(),
            m.index_bytes as f64 / 1e6,
            m.entries,
            m.read_bytes as f64 / 1e6,
            mark(mib <= MANY_RSS_MIB)
        ));
        summary.insert(
            "many".into(),
            json!({"images": m.images, "index_bytes": m.index_bytes, "entries": m.entries,
                   "read_bytes": m.read_bytes, "peak_rss_kb": m.rss_kb, "seconds": m.seconds}),
        );
    }
    if let Some((rel, _)) = &native.tree.largest {
        let check = |ok: bool| if ok { "equal" } else { "**DIFFERENT**" };
        let ours = sha_ours.iter().all(|&ok| ok);
        correct &= ours && sha_peer.unwrap_or(true);
        table.push_str(&format!(
            "| correctness: sha256 of {} read through the mount = native file | {} | {} | | equal |\n",
            rel.file_name().unwrap_or_default().to_string_lossy(),
            check(ours),
            sha_peer
                .map(|ok| format!("nydusd: {}", check(ok)))
                .unwrap_or_else(|| "—".into())
        ));
    }
    (table, summary, correct)
}
