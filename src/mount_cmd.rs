//! `tessera mount`, `tessera umount` and `tessera cache`: command-line glue over
//! tessera-mount.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tessera_mount::daemon;
use tessera_mount::session::{self, MountSpec, SizeOrAuto};
use tessera_mount::Access;

use crate::args::{parse_size, parse_size_or_auto, RegistryArgs, StoreArgs};

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
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = daemon::DEFAULT_SOCKET)]
    daemon: Option<PathBuf>,
}

/// How one image is mounted (the command line of a [`MountSpec`]).
#[derive(Args, Clone, Debug)]
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
    allow_other: bool,
    /// Honour setuid/setgid bits of the image's files (default: nosuid; only for images
    /// you trust, e.g. a container runtime that needs them).
    #[arg(long)]
    suid: bool,
    /// Honour device nodes of the image (default: nodev; only for images you trust).
    #[arg(long)]
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
    /// files): small fetches less for programs that map big libraries. `auto`: 128K while
    /// the registry link counts as fast (32 MB/s or more, measured from the range
    /// requests; the index download is the first guess), else 16K — on a slow link
    /// every page read around a fault costs real time.
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
    pub fn spec(&self) -> MountSpec {
        MountSpec {
            threads: self.threads,
            writable: self.writable,
            upper: self.upper.clone(),
            access: Access {
                allow_other: self.allow_other,
                suid: self.suid,
                dev: self.dev,
            },
            fetch_timeout: self.fetch_timeout,
            readahead: self.readahead,
            amplify: self.amplify,
            kernel_readahead: self.kernel_readahead,
            fetch_workers: self.fetch_workers,
            passthrough_min: self.passthrough_min,
            no_passthrough: self.no_passthrough,
            prefetch: self.prefetch,
            prefetch_profile: self.prefetch_profile.clone(),
            record_profile: self.record_profile.clone(),
            no_profile: self.no_profile,
            profile_workload: self.profile_workload.clone(),
            reg: self.reg.options(),
        }
    }
}

#[derive(Subcommand)]
pub enum CacheCmd {
    /// Chunks, bytes, what open files on mounts pin, and every live mount with its counters.
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
        /// Also take chunks of mounted images (after all others), sparing only those of
        /// files open on a mount; what is taken is fetched again when read.
        #[arg(long)]
        include_mounted: bool,
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
            let (store, img) = reg.open_image(reference)?;
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
            let (store, img) = reg.open_image(reference)?;
            let subject = img.manifest_desc.sha256()?;
            match tessera_mount::profile::fetch_latest(store.as_ref(), &subject, workload.as_deref())
                .with_context(|| format!("looking up profiles of {reference}"))?
            {
                Some((digest, text)) => {
                    eprintln!("profile {digest}");
                    std::io::stdout()
                        .write_all(&text)
                        .map_err(crate::output::stdout_error)?;
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

pub fn mount(a: &MountArgs) -> Result<i32> {
    if !a.targets.len().is_multiple_of(2) {
        bail!("give REF DIR pairs: {} arguments is odd", a.targets.len());
    }
    let spec = a.opts.spec();
    if let Some(socket) = &a.daemon {
        if a.store.store.is_some() || a.store.quota.is_some() || a.store.shared_store.is_some() {
            bail!("--store, --quota and --shared-store belong to the daemon (tessera mountd); drop them with --daemon");
        }
        let cwd = std::env::current_dir().context("reading the current directory")?;
        let spec = spec.absolute(&cwd);
        for pair in a.targets.chunks(2) {
            let m = daemon::request_mount(socket, &pair[0], Path::new(&pair[1]), &spec)?;
            outln!("{m}");
        }
        return Ok(0);
    }
    let store = Arc::new(a.store.open()?);
    let targets: Vec<(String, PathBuf)> = a
        .targets
        .chunks(2)
        .map(|p| (p[0].clone(), PathBuf::from(&p[1])))
        .collect();
    session::serve_all(&targets, &spec, &store, |reference, dir| {
        // A mount whose stdout is gone keeps serving.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "mounted {reference} at {}", dir.display());
        let _ = out.flush();
    })?;
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
            include_mounted,
            json,
        } => {
            let r = store
                .open()?
                .gc_with(*max_size, !include_mounted)
                .context("collecting garbage")?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                outln!(
                    "removed {} chunk(s) ({}), kept {} ({}): {} of mounted images, {} of them used by files open on mounts",
                    r.removed_chunks,
                    gib(r.removed_bytes),
                    r.kept_chunks,
                    gib(r.kept_bytes),
                    r.mounted_kept,
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
