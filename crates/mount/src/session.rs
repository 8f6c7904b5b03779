//! The lifecycle of mounts: what one mount is asked to be ([`MountSpec`], also what the
//! node daemon receives over its socket), bringing it up over a node store ([`start`]),
//! publishing its counters while it runs, and letting go of it once it is unmounted
//! ([`Job::wait`]). The command line and the node daemon ([`crate::daemon`]) both use it.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tessera_image::{ImageError, TesseraImage};
use tessera_oci::registry::ClientOptions;
use tessera_oci::{ImageRef, OciError, Store};

use crate::fetch::{FetchOptions, Fetcher};
use crate::store::{MountInfo, NodeStore};
use crate::{Access, FuseConn, ImageFs, MountError, OpenFiles, Writable};

/// The kernel's readahead of a mount (`--kernel-readahead auto`) while the registry link is
/// slow or not yet measured, and once it is measured fast.
pub const KERNEL_READAHEAD_SLOW: u64 = 16 << 10;
pub const KERNEL_READAHEAD_FAST: u64 = 128 << 10;

/// Sets the kernel's readahead for files opened from now on on the FUSE mount with device
/// number `dev`: its bdi's `read_ahead_kb` (the kernel takes the window from the bdi when
/// a file is opened; the INIT reply only sets its first value).
pub fn set_kernel_readahead(dev: u64, bytes: u64) -> std::io::Result<()> {
    let p = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    std::fs::write(&p, format!("{}", bytes >> 10))
}

/// The mount's kernel readahead follows the fetcher's link verdict from now on.
fn follow_link_readahead(fetcher: &Fetcher, dev: u64) {
    let set = move |fast: bool| {
        let bytes = if fast {
            KERNEL_READAHEAD_FAST
        } else {
            KERNEL_READAHEAD_SLOW
        };
        match set_kernel_readahead(dev, bytes) {
            Ok(()) => tracing::debug!(dev, kernel_readahead = bytes, "kernel readahead set"),
            Err(e) => {
                tracing::warn!(dev, error = %e, "cannot set the mount's kernel readahead; it stays as it was")
            }
        }
    };
    // Called at once too: the verdict may have changed since the INIT reply.
    fetcher.on_link_change(Box::new(set));
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("opening {reference}: {source}")]
    Open {
        reference: String,
        source: ImageError,
    },
    #[error("reading the profile {path}: {source}")]
    Profile {
        path: String,
        source: std::io::Error,
    },
    #[error("registering the mount in the node store: {0}")]
    Pin(std::io::Error),
    #[error("{context}: {source}")]
    Thread {
        context: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("mounting {reference} on {dir}: {why}")]
    Failed {
        reference: String,
        dir: String,
        why: String,
    },
    #[error("{0}")]
    Ended(String),
}

/// How to reach the registry an image comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryOptions {
    /// Plain HTTP for registries that are not on loopback.
    #[serde(default)]
    pub plain_http: bool,
    /// Credentials `USER:PASSWORD` (default: ~/.docker/config.json).
    #[serde(default)]
    pub creds: Option<String>,
    /// Platform to pick from a multi-platform image (`os/arch`).
    #[serde(default)]
    pub platform: Option<String>,
    /// Retries of a transiently failed registry request inside the client (None: the
    /// client's default). A mount sets 0: its fetcher retries with its own backoff,
    /// deadline (`--fetch-timeout`) and counters, and two layers of retries would only
    /// hide outages from them.
    #[serde(skip)]
    pub retries: Option<u32>,
}

impl RegistryOptions {
    /// The store `reference` names, and the tag (or digest) in it.
    pub fn open(&self, reference: &str) -> Result<(Box<dyn Store>, String), OciError> {
        let r = ImageRef::parse(reference, self.plain_http)?;
        let opts = ClientOptions {
            creds: self.creds.clone(),
            retries: self.retries,
            ..ClientOptions::default()
        };
        let (store, tag) = tessera_oci::open(&r, &opts)?;
        Ok((store, tag.unwrap_or_default()))
    }

    /// The tessera image `reference` names (the platform from `platform`, or this
    /// machine's).
    pub fn open_image(
        &self,
        reference: &str,
    ) -> Result<(Box<dyn Store>, TesseraImage), SessionError> {
        self.open_image_cached(reference, None)
    }

    /// [`RegistryOptions::open_image`], with the index from (and kept in) `cache`.
    pub fn open_image_cached(
        &self,
        reference: &str,
        cache: Option<&dyn tessera_image::IndexCache>,
    ) -> Result<(Box<dyn Store>, TesseraImage), SessionError> {
        let err = |source| SessionError::Open {
            reference: reference.to_string(),
            source,
        };
        let (store, tag) = self.open(reference).map_err(|e| err(ImageError::from(e)))?;
        let platform = self
            .platform
            .clone()
            .unwrap_or_else(tessera_image::default_platform);
        let img = TesseraImage::open_cached(store.as_ref(), &tag, &platform, cache).map_err(err)?;
        Ok((store, img))
    }
}

/// A size, or `auto`: chosen by the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SizeOrAuto {
    Auto,
    Size(u64),
}

/// How one image is mounted (what `tessera mount` options say; also what a client sends
/// the node daemon). Paths are taken as they are: make them absolute for a daemon that
/// runs elsewhere ([`MountSpec::absolute`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountSpec {
    /// Threads serving FUSE requests.
    pub threads: usize,
    /// Copy-on-write root: overlayfs over the image with a private upper directory.
    pub writable: bool,
    /// With `writable`: the directory holding upper/, work/ and lower/, kept after
    /// unmount (None: a fresh one under the node store, removed on unmount).
    pub upper: Option<PathBuf>,
    /// Who may use the mount, and whether setuid bits and device nodes count.
    #[serde(flatten)]
    pub access: Access,
    /// Seconds a read waits for the registry (retrying) before EIO.
    pub fetch_timeout: u64,
    pub readahead: u64,
    pub amplify: u64,
    pub kernel_readahead: SizeOrAuto,
    pub fetch_workers: usize,
    pub passthrough_min: u64,
    pub no_passthrough: bool,
    pub prefetch: bool,
    pub prefetch_profile: Option<PathBuf>,
    pub record_profile: Option<PathBuf>,
    pub no_profile: bool,
    pub profile_workload: Option<String>,
    pub reg: RegistryOptions,
}

impl Default for MountSpec {
    fn default() -> Self {
        MountSpec {
            threads: 4,
            writable: false,
            upper: None,
            access: Access::default(),
            fetch_timeout: 30,
            readahead: 4 << 20,
            amplify: 128 << 10,
            kernel_readahead: SizeOrAuto::Auto,
            fetch_workers: 4,
            passthrough_min: crate::PASSTHROUGH_MIN,
            no_passthrough: false,
            prefetch: false,
            prefetch_profile: None,
            record_profile: None,
            no_profile: false,
            profile_workload: None,
            reg: RegistryOptions::default(),
        }
    }
}

impl MountSpec {
    /// Thread counts kept sane (they may come from a client of the daemon).
    pub fn clamp(&mut self) {
        self.threads = self.threads.clamp(1, 64);
        self.fetch_workers = self.fetch_workers.min(64);
    }

    /// Paths made absolute against `cwd` (for a daemon that runs elsewhere).
    pub fn absolute(mut self, cwd: &Path) -> MountSpec {
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

/// One image being served.
pub struct Job {
    pub reference: String,
    pub dir: PathBuf,
    fetcher: Arc<Fetcher>,
    pin: PathBuf,
    info: MountInfo,
    /// A fresh copy-on-write directory (no `upper`): removed once unmounted.
    scratch: Option<Writable>,
    /// Set (under the lock) when the pin goes: the counters are not published again.
    finished: Mutex<bool>,
    /// The pin keeps the chunks of the files open on the mount: these, as last written
    /// (the generation of [`OpenFiles`] they are of, and the entries).
    open_files: OpenFiles,
    pinned: Mutex<(u64, Vec<u32>)>,
    image: Arc<TesseraImage>,
    /// Whether the image's ids were written beside the pin ([`Job::record_image`]).
    image_recorded: AtomicBool,
}

/// The thread serving a mount's FUSE session; it ends when the mount is unmounted.
pub type Session = std::thread::JoinHandle<Result<(), MountError>>;

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
        if !self.image_recorded.swap(true, Ordering::Relaxed) {
            self.record_image(store);
        }
        self.repin(store);
    }

    /// Every id of the image beside the pin: eviction takes them only after what no
    /// mounted image uses. Done by the first publication, off the mount's start.
    fn record_image(&self, store: &NodeStore) {
        let files: Vec<u32> = (0..self.image.index.entries.len() as u32).collect();
        let mut all = crate::pins_of(&self.image.index, &files);
        all.sort_unstable_by_key(|d| d.0);
        all.dedup();
        if let Err(e) = store.set_image(&self.pin, &all) {
            tracing::warn!(image = %self.reference, error = %e, "cannot record the mounted image's chunks in the node store; eviction may take them before others");
        }
    }

    /// Rewrite the pin if the set of open files changed since it was last written.
    fn repin(&self, store: &NodeStore) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if self.open_files.generation() == pinned.0 {
            return;
        }
        let (generation, entries) = self.open_files.entries();
        if entries != pinned.1 {
            let ids = crate::pins_of(&self.image.index, &entries);
            // Both lists are sorted: did any entry leave?
            let released = pinned.1.iter().any(|e| entries.binary_search(e).is_err());
            if let Err(e) = store.repin(&self.pin, &ids, released) {
                tracing::warn!(image = %self.reference, error = %e, "cannot update the mount's pin in the node store; trying again");
                return;
            }
            tracing::debug!(image = %self.reference, open_files = entries.len(), pinned = ids.len(), "pin updated");
        }
        *pinned = (generation, entries);
    }

    /// Wait until the mount is unmounted, then let go of it: pending chunks and seals
    /// are written, the pin is dropped.
    pub fn wait(&self, session: Session, store: &NodeStore) -> Result<(), SessionError> {
        let r = match session.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SessionError::Ended(format!("{}: {e}", self.reference))),
            Err(_) => Err(SessionError::Ended(format!(
                "{}: the mount thread panicked",
                self.reference
            ))),
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

/// Mount `reference` on `dir` as `o` says, over `store`, serving it from a thread of this
/// process; returns once the mount is in place. `n` numbers the mounts of this process
/// (for the profiles and `upper` directories of second and later mounts).
pub fn start(
    reference: &str,
    dir: &Path,
    n: usize,
    o: &MountSpec,
    store: &Arc<NodeStore>,
) -> Result<(Arc<Job>, Session), SessionError> {
    start_with(reference, dir, n, o, store, Handover::default())
}

/// What is called with a mount's connection once it is served.
pub type KeepConn = Box<dyn FnOnce(&FuseConn) + Send>;

/// How a mount's FUSE connection passes between daemons (see [`crate::conn`]).
#[derive(Default)]
pub struct Handover {
    /// The connection of a mount already on `dir`, to serve instead of mounting.
    pub adopt: Option<FuseConn>,
    /// Called once the mount is served, with its connection (to keep a copy of it).
    pub keep: Option<KeepConn>,
    /// Where the mount logs its open files (for a daemon that takes it over; with
    /// `adopt`, the log of the daemon before is read first).
    pub opens_log: Option<PathBuf>,
}

/// [`start`], taking over a mount or handing its connection to a keeper.
pub fn start_with(
    reference: &str,
    dir: &Path,
    n: usize,
    o: &MountSpec,
    store: &Arc<NodeStore>,
    handover: Handover,
) -> Result<(Arc<Job>, Session), SessionError> {
    let mut fetch = FetchOptions {
        max_wait: Duration::from_secs(o.fetch_timeout),
        readahead: o.readahead,
        workers: o.fetch_workers,
        amplify: o.amplify,
        ..FetchOptions::default()
    };
    let profile = match &o.prefetch_profile {
        Some(p) => std::fs::read(p).map_err(|source| SessionError::Profile {
            path: p.display().to_string(),
            source,
        })?,
        None => Vec::new(),
    };
    let reg = RegistryOptions {
        retries: Some(0),
        ..o.reg.clone()
    };
    let (source, img) = reg.open_image_cached(reference, Some(store.as_ref()))?;
    // The index download is the first guess of the link's speed (see FetchOptions).
    match img.index_fetch {
        Some(took) => {
            let rate = img.index_desc.size as f64 / took.as_secs_f64().max(1e-6);
            tracing::info!(image = %reference, index_bytes = img.index_desc.size, bytes_per_s = rate as u64, "index fetched");
            // A first guess: a shaper's burst can carry the whole index at line rate, and
            // the range requests correct the guess within LINK_SAMPLE bytes.
            if img.index_desc.size >= 64 << 10 {
                fetch.link_rate = Some(rate);
            }
        }
        None => {
            tracing::info!(image = %reference, index_bytes = img.index_desc.size, "index from the node store")
        }
    }
    let img = Arc::new(img);
    let fast_link = fetch.link_rate.is_some_and(|r| r >= fetch.amplify_min_rate);
    let fetcher = Fetcher::start(img.clone(), source, store.clone(), fetch);
    // Until the mount is up, an error stops the fetcher's threads (a daemon lives on).
    let guard = CloseOnError(Some(fetcher.clone()));
    let mut fs = ImageFs::new(fetcher.clone(), img.clone(), o.readahead);
    // `auto`: 128 KiB while the link counts as fast, 16 KiB while slow. A page fault in a
    // mapped library reads around itself, which on a slow link costs bytes the reader
    // never uses; on a fast one the larger window saves requests. The verdict can change
    // while mounted: the kernel's readahead follows it through the mount's bdi.
    let kernel_readahead = match o.kernel_readahead {
        SizeOrAuto::Size(n) => n,
        SizeOrAuto::Auto if fast_link => KERNEL_READAHEAD_FAST,
        SizeOrAuto::Auto => KERNEL_READAHEAD_SLOW,
    };
    let follow_link = matches!(o.kernel_readahead, SizeOrAuto::Auto);
    fs.set_kernel_readahead(kernel_readahead.min(u32::MAX as u64) as u32);
    fs.set_passthrough((!o.no_passthrough).then_some(o.passthrough_min));
    if let Some(p) = &handover.opens_log {
        if let Err(e) = fs.open_log(p, handover.adopt.is_some()) {
            tracing::warn!(path = %p.display(), error = %e, "cannot keep the open-files log; a daemon taking this mount over may fail opens of files open now");
        }
    }
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
        let subject = img.manifest_desc.sha256().map_err(|e| SessionError::Open {
            reference: reference.to_string(),
            source: e.into(),
        })?;
        let (whole, workload) = (o.prefetch, o.profile_workload.clone());
        std::thread::Builder::new()
            .name("tessera-profile".into())
            .spawn(move || {
                let found = reg
                    .open(&r)
                    .and_then(|(store, _)| {
                        crate::profile::fetch_latest(store.as_ref(), &subject, workload.as_deref())
                    })
                    .map_err(|e| e.to_string());
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
            .map_err(|source| SessionError::Thread {
                context: "starting the profile lookup",
                source,
            })?;
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
    // The pin keeps the chunks and sealed files of the files open on the mount (written
    // by the publisher as they change); the rest of the image may be evicted like any
    // chunk, least recently used first, and is fetched again when read.
    let open_files = fs.open_files();
    let chunk_count = img.index.chunks.len() as u64;
    let info = MountInfo {
        pid: std::process::id(),
        reference: reference.to_string(),
        manifest: img.manifest_desc.digest.clone(),
        dir: dir.display().to_string(),
        chunks: chunk_count,
        counters: serde_json::Value::Null,
    };
    let pin = match store.pin(&[], &info) {
        Ok(p) => p,
        Err(e) => {
            if let Some(w) = &scratch {
                let _ = w.remove();
            }
            return Err(SessionError::Pin(e));
        }
    };
    let access = o.access;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (d2, threads) = (dir.to_path_buf(), o.threads);
    let link_fetcher = fetcher.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("tessera-mount-{n}"))
        .spawn(move || {
            let tx = ready_tx.clone();
            let Handover { adopt, keep, .. } = handover;
            let r = crate::serve(
                fs,
                &d2,
                threads,
                writable.as_ref(),
                access,
                adopt,
                move |c| {
                    if follow_link {
                        follow_link_readahead(&link_fetcher, c.dev);
                    }
                    if let Some(keep) = keep {
                        keep(c);
                    }
                    let _ = tx.send(Ok(()));
                },
            );
            if let Err(e) = &r {
                let _ = ready_tx.send(Err(e.to_string()));
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
        open_files,
        pinned: Mutex::new((0, Vec::new())),
        image: img.clone(),
        image_recorded: AtomicBool::new(false),
    });
    let failed = |why: String| SessionError::Failed {
        reference: reference.to_string(),
        dir: dir.display().to_string(),
        why,
    };
    let session = match spawned {
        Ok(h) => h,
        Err(source) => {
            job.finish(store);
            return Err(SessionError::Thread {
                context: "starting a mount thread",
                source,
            });
        }
    };
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((job, session)),
        Ok(Err(e)) => {
            let _ = job.wait(session, store);
            Err(failed(e))
        }
        Err(_) => {
            let e = job.wait(session, store).err();
            Err(failed(e.map_or_else(
                || "the mount thread ended before mounting".to_string(),
                |e| e.to_string(),
            )))
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

/// Mounts a process serves.
pub type Jobs = Arc<Mutex<Vec<Arc<Job>>>>;

/// Publish every live mount's counters every half second until `done`.
pub fn publisher(
    store: Arc<NodeStore>,
    jobs: Jobs,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            let list = jobs.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for j in list {
                j.publish(&store);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

/// Mount every (reference, directory) of `targets` as `spec` says and serve them from
/// this process until each is unmounted; `mounted` is called as each comes up. If one
/// cannot be mounted, those already up are unmounted and the error returned.
pub fn serve_all(
    targets: &[(String, PathBuf)],
    spec: &MountSpec,
    store: &Arc<NodeStore>,
    mut mounted: impl FnMut(&str, &Path),
) -> Result<(), SessionError> {
    let mut running: Vec<(Arc<Job>, Session)> = Vec::new();
    for (n, (reference, dir)) in targets.iter().enumerate() {
        match start(reference, dir, n, spec, store) {
            Ok(r) => {
                mounted(reference, dir);
                running.push(r);
            }
            Err(e) => {
                for (j, session) in running {
                    let _ = crate::unmount(&j.dir);
                    let _ = j.wait(session, store);
                }
                return Err(e);
            }
        }
    }
    let jobs: Jobs = Arc::new(Mutex::new(running.iter().map(|(j, _)| j.clone()).collect()));
    let done = Arc::new(AtomicBool::new(false));
    let publisher = publisher(store.clone(), jobs, done.clone());
    let mut errors = Vec::new();
    for (j, session) in running {
        if let Err(e) = j.wait(session, store) {
            errors.push(e.to_string());
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = publisher.join();
    if !errors.is_empty() {
        return Err(SessionError::Ended(errors.join("; ")));
    }
    Ok(())
}
