//! `tessera mount`, `tessera umount` and `tessera cache`: command-line glue over
//! tessera-mount.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tessera_mount::fetch::{FetchOptions, Fetcher};
use tessera_mount::store::{MountInfo, NodeStore, StoreOptions};
use tessera_mount::{Access, ImageFs, Writable};

use crate::RegistryArgs;

#[derive(Args)]
pub struct MountArgs {
    /// REF DIR pairs: the image to mount and where (one process serves them all).
    #[arg(required = true, num_args = 2.., value_names = ["REF", "DIR"])]
    targets: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    opts: MountOpts,
    /// Hand the mounts to the node's mount daemon (`tessera mountd`) on SOCKET instead of
    /// serving them from this process; returns once they are mounted. The daemon's own
    /// node store is used (--store and friends are the daemon's to set).
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = crate::mountd::DEFAULT_SOCKET)]
    daemon: Option<PathBuf>,
}

/// How one image is mounted (also what `tessera mount --daemon` sends the daemon).
#[derive(Args, Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MountOpts {
    /// Threads serving FUSE requests (per mount).
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Copy-on-write root: overlayfs over the image with a private upper directory.
    #[arg(long)]
    writable: bool,
    /// With --writable: directory holding upper/, work/ and lower/ (kept after unmount,
    /// so a later mount can reuse the changes) [default: a fresh one under the node
    /// store's overlays/, removed with its changes on unmount].
    #[arg(long, value_name = "DIR", requires = "writable")]
    upper: Option<PathBuf>,
    /// Let every user reach the mount (FUSE allow_other), as a container runtime whose
    /// processes run as other users needs; by default only the mounting user can.
    #[arg(long)]
    #[serde(default)]
    allow_other: bool,
    /// Honour setuid/setgid bits of the image's files (default: nosuid; only for images
    /// you trust, e.g. a container runtime that needs them).
    #[arg(long)]
    #[serde(default)]
    suid: bool,
    /// Honour device nodes of the image (default: nodev; only for images you trust).
    #[arg(long)]
    #[serde(default)]
    dev: bool,
    /// How long a read waits for the registry (retrying with backoff) before EIO.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    fetch_timeout: u64,
    /// Bytes fetched ahead of a sequential reader, in the background (0: off).
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_size)]
    readahead: u64,
    /// A read that goes to the registry also fetches the chunks that follow in the same
    /// pack (neighbouring files), up to SIZE (0: off).
    #[arg(long, value_name = "SIZE", default_value = "128K", value_parser = parse_size)]
    amplify: u64,
    /// Kernel readahead of the mount (also the read-around of page faults on mapped
    /// files): small fetches less for programs that map big libraries. `auto`: 128K when
    /// the registry link is fast (the index downloaded at 32 MB/s or more), else 16K —
    /// on a slow link every page read around a fault costs real time.
    #[arg(long, value_name = "SIZE|auto", default_value = "auto", value_parser = parse_size_or_auto)]
    kernel_readahead: SizeOrAuto,
    /// Background fetch threads (readahead and prefetch).
    #[arg(long, value_name = "N", default_value_t = 4)]
    fetch_workers: usize,
    /// Files of at least SIZE, once all their chunks are in the node store, are written
    /// out whole there (verified chunk by chunk) and opened with FUSE passthrough: the
    /// kernel reads them directly, at the store filesystem's speed.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    passthrough_min: u64,
    /// Serve every read through the daemon, re-verifying each chunk on every read from
    /// the node store (slower; passthrough files are verified once, when sealed).
    #[arg(long)]
    no_passthrough: bool,
    /// Fetch the whole image in the background, at low priority, after the profile.
    #[arg(long)]
    prefetch: bool,
    /// Prefetch what FILE lists (as written by --record-profile; a line with only a
    /// path means the whole file) first, in that order, on every fetch worker.
    #[arg(long, value_name = "FILE")]
    prefetch_profile: Option<PathBuf>,
    /// Write what is read, in the order it is first read, to FILE (lines `K N PATH`:
    /// chunks K..K+N of the file at PATH). Store it beside the image with
    /// `tessera profile push REF FILE`; later mounts then prefetch it by themselves.
    #[arg(long, value_name = "FILE")]
    record_profile: Option<PathBuf>,
    /// Do not look for a read profile stored beside the image (OCI referrers of the
    /// image manifest); without --prefetch-profile the newest one is prefetched.
    #[arg(long, conflicts_with = "prefetch_profile")]
    no_profile: bool,
    /// Use the newest stored profile recorded for this workload name (see
    /// `tessera profile push --workload`).
    #[arg(long, value_name = "NAME", conflicts_with = "no_profile")]
    profile_workload: Option<String>,
    #[command(flatten)]
    reg: RegistryArgs,
}

impl MountOpts {
    /// Thread counts kept sane (they come from a client of the daemon).
    pub fn clamp(&mut self) {
        self.threads = self.threads.clamp(1, 64);
        self.fetch_workers = self.fetch_workers.min(64);
    }

    /// Paths made absolute against `cwd` (for a daemon that runs elsewhere).
    pub fn absolute(mut self, cwd: &Path) -> MountOpts {
        for p in [
            &mut self.upper,
            &mut self.prefetch_profile,
            &mut self.record_profile,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = cwd.join(&*p);
            }
        }
        self
    }
}

#[derive(Args)]
pub struct StoreArgs {
    /// Node store: verified chunks shared by every mount [default: /var/lib/tessera/chunks
    /// as root, else $XDG_CACHE_HOME/tessera/chunks].
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Keep the node store under SIZE (e.g. 20G), evicting least recently used chunks
    /// that no mounted image uses.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    quota: Option<u64>,
    /// A read-only directory with the node store's layout (e.g. on NFS), consulted
    /// before the network.
    #[arg(long, value_name = "DIR")]
    shared_store: Option<PathBuf>,
}

impl StoreArgs {
    pub fn open(&self) -> Result<NodeStore> {
        let dir = self.store.clone().unwrap_or_else(crate::default_node_store);
        NodeStore::open_with(
            &dir,
            StoreOptions {
                quota: self.quota,
                shared: self.shared_store.clone(),
            },
        )
        .with_context(|| format!("opening the node store {}", dir.display()))
    }
}

#[derive(Subcommand)]
pub enum CacheCmd {
    /// Chunks, bytes, what mounted images pin, and every live mount with its counters.
    Stats {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// Evict least recently used chunks that no mounted image uses, down to --max-size.
    Gc {
        #[command(flatten)]
        store: StoreArgs,
        /// Keep at most SIZE (default 0: remove every chunk no mounted image uses).
        #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
        max_size: u64,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every chunk and remove the ones that do not match their id.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ProfileCmd {
    /// Store FILE (written by `tessera mount --record-profile`) as a referrer of REF's
    /// tessera manifest; prints the profile manifest's digest.
    Push {
        reference: String,
        file: PathBuf,
        /// A name for the workload (mounts pick it with --profile-workload).
        #[arg(long, value_name = "NAME")]
        workload: Option<String>,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Print the newest profile stored for REF (what a mount would prefetch).
    Show {
        reference: String,
        #[arg(long, value_name = "NAME")]
        workload: Option<String>,
        #[command(flatten)]
        reg: RegistryArgs,
    },
}

pub fn profile(cmd: &ProfileCmd) -> Result<i32> {
    match cmd {
        ProfileCmd::Push {
            reference,
            file,
            workload,
            reg,
        } => {
            let text =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let (store, img) = crate::open_image(reference, reg)?;
            let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            let d = tessera_mount::profile::push(
                store.as_ref(),
                &img.manifest_desc,
                &text,
                workload.as_deref(),
                &created.to_string(),
            )
            .with_context(|| format!("storing the profile beside {reference}"))?;
            outln!("{d}");
        }
        ProfileCmd::Show {
            reference,
            workload,
            reg,
        } => {
            let (store, img) = crate::open_image(reference, reg)?;
            let subject = img.manifest_desc.sha256()?;
            match tessera_mount::profile::fetch_latest(store.as_ref(), &subject, workload.as_deref())
                .with_context(|| format!("looking up profiles of {reference}"))?
            {
                Some((digest, text)) => {
                    eprintln!("profile {digest}");
                    std::io::stdout()
                        .write_all(&text)
                        .map_err(crate::stdout_error)?;
                }
                None => bail!(
                    "no read profile is stored with {reference}{} (record one with tessera mount --record-profile, store it with tessera profile push)",
                    workload.as_deref().map(|w| format!(" for workload {w:?}")).unwrap_or_default()
                ),
            }
        }
    }
    Ok(0)
}

/// A size, or `auto`: chosen by the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SizeOrAuto {
    Auto,
    Size(u64),
}

pub fn parse_size_or_auto(s: &str) -> Result<SizeOrAuto, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(SizeOrAuto::Auto);
    }
    parse_size(s).map(SizeOrAuto::Size)
}

/// `20G`, `512M`, `64K`, `1000` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..].to_ascii_uppercase().trim_end_matches(['B', 'I']) {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                other => return Err(format!("unknown size unit {other:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 20G)"))?;
    if !(0.0..1.8e19).contains(&n) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((n * mult as f64) as u64)
}

/// One image being served.
pub struct Job {
    pub reference: String,
    pub dir: PathBuf,
    fetcher: Arc<Fetcher>,
    pin: PathBuf,
    info: MountInfo,
    /// A fresh copy-on-write directory (no --upper): removed once unmounted.
    scratch: Option<Writable>,
    /// Set (under the lock) when the pin goes: the counters are not published again.
    finished: std::sync::Mutex<bool>,
}

/// The thread serving a mount's FUSE session; it ends when the mount is unmounted.
pub type Session = std::thread::JoinHandle<Result<(), tessera_mount::MountError>>;

impl Job {
    /// Publish the mount's counters beside its pin.
    pub fn publish(&self, store: &NodeStore) {
        let finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        if *finished {
            return;
        }
        let mut info = self.info.clone();
        info.counters = self.fetcher.counters_json();
        let _ = store.publish(&self.pin, &info);
    }

    /// Wait until the mount is unmounted, then let go of it: pending chunks and seals
    /// are written, the pin is dropped.
    pub fn wait(&self, session: Session, store: &NodeStore) -> Result<()> {
        let r = match session.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("{}: {e}", self.reference)),
            Err(_) => Err(anyhow::anyhow!(
                "{}: the mount thread panicked",
                self.reference
            )),
        };
        self.finish(store);
        r
    }

    fn finish(&self, store: &NodeStore) {
        self.fetcher.close();
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
        tracing::info!(image = %self.reference, dir = %self.dir.display(), counters = %self.fetcher.counters_json(), "unmounted");
        store.unpin(&self.pin);
        if let Some(w) = &self.scratch {
            if let Err(e) = w.remove() {
                tracing::warn!(error = %e, "cannot remove the mount's copy-on-write directory");
            }
        }
    }
}

/// Mount `reference` on `dir` with `o` over `store`, serving it from a thread of this
/// process; returns once the mount is in place. `n` numbers the mounts of this process
/// (for default overlay directories and the profiles of second and later mounts).
pub fn start(
    reference: &str,
    dir: &Path,
    n: usize,
    o: &MountOpts,
    store: &Arc<NodeStore>,
) -> Result<(Arc<Job>, Session)> {
    let mut fetch = FetchOptions {
        max_wait: Duration::from_secs(o.fetch_timeout),
        readahead: o.readahead,
        workers: o.fetch_workers,
        amplify: o.amplify,
        ..FetchOptions::default()
    };
    let profile = match &o.prefetch_profile {
        Some(p) => {
            std::fs::read(p).with_context(|| format!("reading the profile {}", p.display()))?
        }
        None => Vec::new(),
    };
    let (source, img) = crate::open_image(reference, &o.reg)?;
    // The index download is the mount's bandwidth sample (see FetchOptions).
    let rate = img.index_desc.size as f64 / img.index_fetch.as_secs_f64().max(1e-6);
    tracing::info!(image = %reference, index_bytes = img.index_desc.size, bytes_per_s = rate as u64, "index fetched");
    let img = Arc::new(img);
    if img.index_desc.size >= 64 << 10 {
        fetch.link_rate = Some(rate);
    }
    let fast_link = fetch.link_rate.is_some_and(|r| r >= fetch.amplify_min_rate);
    let fetcher = Fetcher::start(img.clone(), source, store.clone(), fetch);
    // Until the mount is up, an error stops the fetcher's threads (a daemon lives on).
    let guard = CloseOnError(Some(fetcher.clone()));
    let mut fs = ImageFs::new(fetcher.clone(), img.clone(), o.readahead);
    let kernel_readahead = match o.kernel_readahead {
        SizeOrAuto::Size(n) => n,
        SizeOrAuto::Auto if fast_link => 128 << 10,
        SizeOrAuto::Auto => 16 << 10,
    };
    fs.set_kernel_readahead(kernel_readahead.min(u32::MAX as u64) as u32);
    fs.set_passthrough((!o.no_passthrough).then_some(o.passthrough_min));
    if let Some(p) = &o.record_profile {
        // One profile per mount: the second image's goes to FILE.1, and so on.
        let p = if n == 0 {
            p.clone()
        } else {
            p.with_extension(format!("{n}"))
        };
        fs.record_profile(&p)?;
    }
    if !profile.is_empty() {
        let queued = fs.prefetch(&profile, o.prefetch);
        tracing::info!(image = %reference, chunks = queued, "prefetch queued");
    } else if o.no_profile || o.prefetch_profile.is_some() {
        if o.prefetch {
            let queued = fs.prefetch(&[], true);
            tracing::info!(image = %reference, chunks = queued, "prefetch queued");
        }
    } else {
        // Look for a stored profile while the mount comes up: mounting does not wait.
        let pf = fs.prefetcher();
        let (r, reg) = (reference.to_string(), o.reg.clone());
        let subject = img.manifest_desc.sha256()?;
        let (whole, workload) = (o.prefetch, o.profile_workload.clone());
        std::thread::Builder::new()
            .name("tessera-profile".into())
            .spawn(move || {
                let found = crate::open(&r, &reg)
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|(store, _)| {
                        tessera_mount::profile::fetch_latest(
                            store.as_ref(),
                            &subject,
                            workload.as_deref(),
                        )
                        .map_err(|e| e.to_string())
                    });
                let text = match found {
                    Ok(Some((digest, text))) => {
                        tracing::info!(image = %r, profile = %digest, bytes = text.len(), "prefetching the image's stored read profile");
                        text
                    }
                    Ok(None) => {
                        tracing::debug!(image = %r, "no read profile stored with the image");
                        Vec::new()
                    }
                    Err(e) => {
                        tracing::warn!(image = %r, error = %e, "cannot look up a stored read profile; mounting without one");
                        Vec::new()
                    }
                };
                if !text.is_empty() || whole {
                    let queued = pf.prefetch(&text, whole);
                    tracing::info!(image = %r, chunks = queued, "prefetch queued");
                }
            })
            .context("starting the profile lookup")?;
    }
    // Relative paths are made absolute here, so `tessera umount` finds both mounts.
    let (writable, scratch) = match (&o.upper, o.writable) {
        (_, false) => (None, None),
        (Some(u), true) if n == 0 => (Some(Writable::new(u)?), None),
        (Some(u), true) => (Some(Writable::new(&u.join(format!("{n}")))?), None),
        (None, true) => {
            let w = Writable::fresh_in(&store.dir().join("overlays"))?;
            (Some(w.clone()), Some(w))
        }
    };
    // Chunks and the sealed files of this image stay while it is mounted.
    let mut ids: Vec<_> = img.index.chunks.iter().map(|c| c.id).collect();
    let chunk_count = ids.len() as u64;
    ids.extend(fs.sealed_keys());
    let info = MountInfo {
        pid: std::process::id(),
        reference: reference.to_string(),
        manifest: img.manifest_desc.digest.clone(),
        dir: dir.display().to_string(),
        chunks: chunk_count,
        counters: serde_json::Value::Null,
    };
    let pin = match store.pin(&ids, &info) {
        Ok(p) => p,
        Err(e) => {
            if let Some(w) = &scratch {
                let _ = w.remove();
            }
            return Err(e).context("registering the mount in the node store");
        }
    };
    let access = Access {
        allow_other: o.allow_other,
        suid: o.suid,
        dev: o.dev,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (d2, threads) = (dir.to_path_buf(), o.threads);
    let spawned = std::thread::Builder::new()
        .name(format!("tessera-mount-{n}"))
        .spawn(move || {
            let tx = ready_tx.clone();
            let r = tessera_mount::serve(fs, &d2, threads, writable.as_ref(), access, move || {
                let _ = tx.send(Ok(()));
            });
            if let Err(e) = &r {
                let _ = ready_tx.send(Err(anyhow::anyhow!("{e}")));
            }
            r
        });
    drop(guard.disarm());
    let job = Arc::new(Job {
        reference: reference.to_string(),
        dir: dir.to_path_buf(),
        fetcher,
        pin,
        info,
        scratch,
        finished: Default::default(),
    });
    let session = match spawned {
        Ok(h) => h,
        Err(e) => {
            job.finish(store);
            return Err(e).context("starting a mount thread");
        }
    };
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((job, session)),
        Ok(Err(e)) => {
            let _ = job.wait(session, store);
            Err(e).with_context(|| format!("mounting {reference} on {}", dir.display()))
        }
        Err(_) => {
            let e = job.wait(session, store).err();
            Err(e.unwrap_or_else(|| anyhow::anyhow!("the mount thread ended before mounting")))
                .with_context(|| format!("mounting {reference} on {}", dir.display()))
        }
    }
}

/// Closes a fetcher when dropped, unless disarmed.
struct CloseOnError(Option<Arc<Fetcher>>);

impl CloseOnError {
    fn disarm(mut self) -> Option<Arc<Fetcher>> {
        self.0.take()
    }
}

impl Drop for CloseOnError {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f.close();
        }
    }
}

/// Mounts this process serves.
pub type Jobs = Arc<std::sync::Mutex<Vec<Arc<Job>>>>;

/// Publish every live mount's counters every half second until `done`.
pub fn publisher(
    store: Arc<NodeStore>,
    jobs: Jobs,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let list = jobs.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for j in list {
                j.publish(&store);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

pub fn mount(a: &MountArgs) -> Result<i32> {
    if !a.targets.len().is_multiple_of(2) {
        bail!("give REF DIR pairs: {} arguments is odd", a.targets.len());
    }
    if let Some(socket) = &a.daemon {
        if a.store.store.is_some() || a.store.quota.is_some() || a.store.shared_store.is_some() {
            bail!("--store, --quota and --shared-store belong to the daemon (tessera mountd); drop them with --daemon");
        }
        return crate::mountd::request_mounts(socket, &a.targets, &a.opts);
    }
    let store = Arc::new(a.store.open()?);
    let mut running: Vec<(Arc<Job>, Session)> = Vec::new();
    for (n, pair) in a.targets.chunks(2).enumerate() {
        let (reference, dir) = (&pair[0], PathBuf::from(&pair[1]));
        match start(reference, &dir, n, &a.opts, &store) {
            Ok(r) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "mounted {reference} at {}", dir.display());
                let _ = out.flush();
                running.push(r);
            }
            Err(e) => {
                for (j, session) in running {
                    let _ = tessera_mount::unmount(&j.dir);
                    let _ = j.wait(session, &store);
                }
                return Err(e);
            }
        }
    }
    let jobs: Jobs = Arc::new(std::sync::Mutex::new(
        running.iter().map(|(j, _)| j.clone()).collect(),
    ));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = publisher(store.clone(), jobs, done.clone());
    let mut errors = Vec::new();
    for (j, session) in running {
        if let Err(e) = j.wait(session, &store) {
            errors.push(format!("{e:#}"));
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = publisher.join();
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(0)
}

pub fn umount(dir: &Path) -> Result<i32> {
    tessera_mount::unmount(dir)?;
    Ok(0)
}

fn gib(n: u64) -> String {
    format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64)
}

pub fn cache(cmd: &CacheCmd) -> Result<i32> {
    match cmd {
        CacheCmd::Stats { store, json } => {
            let s = store.open()?.stats().context("reading the node store")?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                outln!("node store   {}", s.dir);
                outln!("chunks       {} ({} in all)", s.chunks, gib(s.bytes));
                outln!(
                    "sealed files {} ({}; {} chunks are pointers into them)",
                    s.sealed_files,
                    gib(s.sealed_bytes),
                    s.pointers
                );
                outln!(
                    "pinned       {} ({}) by {} mount(s)",
                    s.pinned_chunks,
                    gib(s.pinned_bytes),
                    s.mounts.len()
                );
                for m in &s.mounts {
                    outln!(
                        "  pid {:>7}  {}  at {}  fetched {}  verification failures {}",
                        m.pid,
                        m.reference,
                        m.dir,
                        m.counters["bytes_fetched"],
                        m.counters["verification_failures"]
                    );
                }
                if s.stale_pins > 0 || s.temp_files > 0 {
                    outln!(
                        "leftovers    {} stale pin(s), {} temp file(s) (tessera cache gc removes them)",
                        s.stale_pins, s.temp_files
                    );
                }
            }
        }
        CacheCmd::Gc {
            store,
            max_size,
            json,
        } => {
            let r = store.open()?.gc(*max_size).context("collecting garbage")?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                outln!(
                    "removed {} chunk(s) ({}), kept {} ({}), {} of them used by mounted images",
                    r.removed_chunks,
                    gib(r.removed_bytes),
                    r.kept_chunks,
                    gib(r.kept_bytes),
                    r.pinned_kept
                );
            }
        }
        CacheCmd::Verify { store, json } => {
            let s = store.open()?;
            let bar = if std::io::stderr().is_terminal() && !*json {
                ProgressBar::new(0)
            } else {
                ProgressBar::hidden()
            };
            bar.set_style(
                ProgressStyle::with_template("verifying {bar:40} {pos}/{len} chunks {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let r = s
                .verify(&|n, total| {
                    bar.set_length(total);
                    bar.set_position(n);
                })
                .context("verifying the node store")?;
            bar.finish_and_clear();
            if *json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                outln!(
                    "checked {} chunk(s) ({}) and {} sealed file(s): {} corrupt chunk(s), {} corrupt sealed file(s), {} misplaced, removed",
                    r.checked,
                    gib(r.bytes),
                    r.sealed_checked,
                    r.corrupt_removed.len(),
                    r.corrupt_sealed_removed.len(),
                    r.misplaced_removed.len()
                );
            }
            if !r.corrupt_removed.is_empty()
                || !r.misplaced_removed.is_empty()
                || !r.corrupt_sealed_removed.is_empty()
            {
                return Ok(1);
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("lots").is_err());
        assert_eq!(
            super::parse_size_or_auto("auto"),
            Ok(super::SizeOrAuto::Auto)
        );
        assert_eq!(
            super::parse_size_or_auto("16K"),
            Ok(super::SizeOrAuto::Size(16 << 10))
        );
    }
}
