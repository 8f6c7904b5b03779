//! `tessera`: the command-line front end. Thin glue over the library crates.

#[macro_use]
mod output;

mod args;
mod mount_cmd;
mod mountd;
mod node_cmd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use tessera_convert::{Converter, Dictionary, Options as ConvertOptions};
use tessera_oci::ImageRef;

use args::RegistryArgs;

const REFS_HELP: &str = "Image references:
  HOST[:PORT]/REPO[:TAG|@DIGEST]   a registry (plain HTTP for loopback hosts or with --plain-http)
  oci:DIR[:TAG]                    an OCI image layout directory
  docker-archive:FILE              a `docker save` tarball (source only)";

#[derive(Parser)]
#[command(name = "tessera", version, about = "Container images as content-addressed chunks", after_help = REFS_HELP)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Never draw progress bars.
    #[arg(long, global = true)]
    no_progress: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert an OCI image into a tessera image.
    #[command(after_help = "Examples:
  tessera convert oci:./layout:app oci:./out:app
  tessera convert docker-archive:app.tar localhost:5000/app:tessera
  tessera convert localhost:5000/app:v2 localhost:5000/app:v2-tessera --dedup-with localhost:5000/app:v1-tessera

SRC and DST are image references (see `tessera --help`).")]
    Convert {
        src: String,
        dst: String,
        /// Reuse chunks already stored by these tessera images (repeatable).
        #[arg(long, value_name = "REF")]
        dedup_with: Vec<String>,
        /// zstd level for chunks.
        #[arg(long, default_value_t = tessera_format::pack::DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
        /// Worker threads for hashing and compression (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Directory for the converted-layer cache (default: $XDG_CACHE_HOME/tessera).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Do not use or fill the converted-layer cache.
        #[arg(long)]
        no_cache: bool,
        /// Do not ask a tessera registry destination which chunks it already holds
        /// (by default only chunks it lacks are uploaded).
        #[arg(long)]
        no_global_dedup: bool,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Write the root filesystem of a tessera image into DIR, verifying every chunk.
    #[command(after_help = "Examples:
  tessera unpack oci:./out:app ./rootfs
  tessera unpack localhost:5000/app:tessera /var/tmp/app-rootfs")]
    Unpack {
        reference: String,
        dir: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Summarize a tessera image: files, chunks, unique bytes, packs, dedup.
    #[command(after_help = "Examples:
  tessera inspect oci:./out:app
  tessera inspect localhost:5000/app:v2-tessera --dedup-with localhost:5000/app:v1-tessera --json")]
    Inspect {
        reference: String,
        /// Report how many chunks these tessera images already hold.
        #[arg(long, value_name = "REF")]
        dedup_with: Vec<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Run the registry: OCI Distribution v1.1 with a global chunk index and pull-through caching.
    #[command(
        after_help = "Every flag has a config-file key of the same name with _ for -
(listen, root, htpasswd, tls_cert, tls_key, max_manifest_bytes, max_blob_bytes,
delete_enabled, upload_ttl_secs, shutdown_grace_secs, [[access]], [[upstream]]);
flags win over the file. See docs/registry-api.md.

Examples:
  tessera serve                                   # 127.0.0.1:5000, data in ~/.local/share/tessera/registry
  tessera serve --listen 0.0.0.0:5000 --root /srv/tessera
  tessera serve --htpasswd /etc/tessera/htpasswd --tls-cert cert.pem --tls-key key.pem
  tessera serve --upstream docker.io=https://registry-1.docker.io   # pull docker.io/library/debian:12
  tessera serve --config /etc/tessera/registry.toml"
    )]
    Serve(ServeArgs),
    /// Serve tessera images read-only (or copy-on-write) over FUSE, fetching content
    /// lazily into the node store (root needed).
    #[command(
        after_help = "Runs in the foreground until every directory is unmounted (tessera umount DIR);
prints `mounted REF at DIR` on stdout for each mount once it is in place. A read that
needs chunks the node store lacks fetches them from the registry (retrying up to
--fetch-timeout, then failing that read with EIO; the mount stays up).

Examples:
  tessera mount 127.0.0.1:5000/app:1-tessera /run/tessera/app
  tessera mount oci:./out:app /mnt/app --store /var/lib/tessera/chunks --quota 20G
  tessera mount reg:5000/app:1 /run/app --writable          # copy-on-write root for chroot
  tessera mount reg:5000/a:1 /run/a reg:5000/b:1 /run/b     # one daemon, two mounts
  tessera mount reg:5000/app:1 /run/app --record-profile app.profile
  tessera profile push reg:5000/app:1 app.profile          # later mounts prefetch it by themselves
  tessera mount reg:5000/app:1 /run/app --prefetch-profile app.profile --prefetch

Unless --no-profile or --prefetch-profile is given, the newest read profile stored with
the image (an OCI referrer, see `tessera profile`) is prefetched while the mount runs."
    )]
    Mount(mount_cmd::MountArgs),
    /// The node's mount daemon: serves every mount asked of it with `tessera mount
    /// --daemon`, from one process and one node store (root needed).
    #[command(
        after_help = "Runs in the foreground; prints `listening on SOCKET` once ready. SIGTERM or
SIGINT unmounts every mount it serves, then it exits. `tessera umount DIR` unmounts one.

Examples:
  tessera mountd --store /var/lib/tessera/chunks --quota 50G &
  tessera mount --daemon reg:5000/app:1 /run/app --writable    # returns once mounted
  tessera mount --daemon reg:5000/db:2 /run/db
  tessera umount /run/app"
    )]
    Mountd(mountd::MountdArgs),
    /// The node daemon: containerd's remote snapshotter (proxy plugin `tessera`), every
    /// lazy mount of the node, /metrics and /healthz (root needed).
    #[command(
        after_help = "Runs in the foreground; prints `listening on SOCKET` once ready. SIGTERM or SIGINT
stops it cleanly. containerd reaches it as a proxy plugin (docs/node.md):

  [proxy_plugins.tessera]
    type = \"snapshot\"
    address = \"/run/tessera/snapshotter.sock\"
    [proxy_plugins.tessera.exports]
      enable_remote_snapshot_annotations = \"true\"

A plain image whose tessera twin the registry holds (found through the referrers API)
runs without being downloaded: its root is overlayfs over a lazy mount of the twin.
Images without a twin are unpacked as by containerd's overlayfs snapshotter.

Examples:
  tessera node                                        # /var/lib/tessera, /run/tessera/snapshotter.sock
  tessera node --root /srv/tessera --quota 50G --log-format json
  tessera node --config /etc/tessera/node.toml
  ctr image pull --snapshotter tessera registry:5000/app:1 && ctr run --snapshotter tessera --rm registry:5000/app:1 c1
  tessera node gc --root /var/lib/tessera             # what a killed daemon left (it also does this at start)"
    )]
    Node(node_cmd::NodeArgs),
    /// Store a read profile beside a tessera image (an OCI 1.1 referrer of its manifest),
    /// or show the one a mount would use.
    #[command(after_help = "Examples:
  tessera mount reg:5000/app:1 /run/app --record-profile app.profile   # run the workload, unmount
  tessera profile push reg:5000/app:1 app.profile --workload import-pandas
  tessera profile show reg:5000/app:1 --workload import-pandas")]
    Profile {
        #[command(subcommand)]
        cmd: mount_cmd::ProfileCmd,
    },
    /// Unmount a `tessera mount` (also one whose process died; with --writable, the
    /// overlay and the image under it).
    #[command(after_help = "Example:
  tessera umount /run/tessera/app")]
    Umount { dir: PathBuf },
    /// Inspect and maintain the node store: stats, gc, verify.
    #[command(after_help = "Examples:
  tessera cache stats --json
  tessera cache gc --max-size 20G
  tessera cache verify --store /var/lib/tessera/chunks")]
    Cache {
        #[command(subcommand)]
        cmd: mount_cmd::CacheCmd,
    },
    /// Compare two directory trees (content, type, mode, owner, mtime, xattrs, links).
    #[command(
        name = "diff-tree",
        after_help = "Exit status: 0 when equal, 1 when they differ.

Example:
  tessera diff-tree ./rootfs-umoci ./rootfs-tessera --ignore-root-metadata"
    )]
    DiffTree {
        left: PathBuf,
        right: PathBuf,
        #[arg(long)]
        ignore_root_metadata: bool,
        #[arg(long)]
        ignore_dir_mtime: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:5000]; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Data directory [default: $XDG_DATA_HOME/tessera/registry].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// TOML config file; its keys are the flags' names.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// htpasswd file with bcrypt entries (`htpasswd -B`); requests then need credentials.
    #[arg(long, value_name = "FILE")]
    htpasswd: Option<PathBuf>,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Pull-through upstream NAME=URL (repeatable): repositories NAME/... and requests
    /// with ?ns=NAME are served from URL and cached.
    #[arg(long, value_name = "NAME=URL")]
    upstream: Vec<String>,
    /// Largest manifest accepted, in bytes [default: 4194304].
    #[arg(long, value_name = "BYTES")]
    max_manifest_bytes: Option<u64>,
    /// Largest blob upload accepted, in bytes [default: 64 GiB].
    #[arg(long, value_name = "BYTES")]
    max_blob_bytes: Option<u64>,
    /// Refuse DELETE of manifests and blobs (405).
    #[arg(long)]
    no_delete: bool,
    /// Convert every plain image pushed or pulled through into its tessera twin
    /// (untagged, same repository, found through the referrers API).
    #[arg(long)]
    convert_on_push: bool,
    /// Seconds a client may take to send a request's headers [default: 30].
    #[arg(long, value_name = "SECS")]
    header_read_timeout: Option<u64>,
    /// Seconds a connection may sit without a request before it is closed [default: 120].
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Connections served at once; more wait in the listen backlog [default: 512].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Serve /metrics without credentials even when --htpasswd is set.
    #[arg(long)]
    metrics_public: bool,
    /// Lifetime of the bearer tokens /token issues, with --htpasswd [default: 300].
    #[arg(long, value_name = "SECS")]
    token_ttl: Option<u64>,
    /// Realm named in bearer challenges, for a registry behind a reverse proxy
    /// [default: http(s)://HOST/token, HOST as the client addressed us].
    #[arg(long, value_name = "URL")]
    token_realm: Option<String>,
}

fn serve(args: &ServeArgs) -> Result<i32> {
    use tessera_registry::config::{Config, UpstreamConfig};
    let mut cfg = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = &args.root {
        cfg.root = v.clone();
    }
    if let Some(v) = &args.htpasswd {
        cfg.htpasswd = Some(v.clone());
    }
    if let Some(v) = &args.tls_cert {
        cfg.tls_cert = Some(v.clone());
    }
    if let Some(v) = &args.tls_key {
        cfg.tls_key = Some(v.clone());
    }
    if let Some(v) = args.max_manifest_bytes {
        cfg.max_manifest_bytes = v;
    }
    if let Some(v) = args.max_blob_bytes {
        cfg.max_blob_bytes = v;
    }
    if args.no_delete {
        cfg.delete_enabled = false;
    }
    if args.convert_on_push {
        cfg.convert_on_push = true;
    }
    if let Some(v) = args.header_read_timeout {
        cfg.header_read_timeout_secs = v;
    }
    if let Some(v) = args.idle_timeout {
        cfg.idle_timeout_secs = v;
    }
    if let Some(v) = args.max_connections {
        cfg.max_connections = v;
    }
    if args.metrics_public {
        cfg.metrics_public = true;
    }
    if let Some(v) = args.token_ttl {
        cfg.token_ttl_secs = v;
    }
    if let Some(v) = &args.token_realm {
        cfg.token_realm = Some(v.clone());
    }
    for u in &args.upstream {
        cfg.upstream
            .push(UpstreamConfig::parse_flag(u).map_err(anyhow::Error::msg)?);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(tessera_registry::serve(cfg, |addr, tls| {
        use std::io::Write as _;
        let scheme = if tls { "https" } else { "http" };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {scheme}://{addr}");
        let _ = out.flush();
    }))
    .context("tessera serve")?;
    Ok(0)
}

fn init_logging(cli: &Cli) {
    let default = match cli.verbose {
        0 if matches!(cli.cmd, Cmd::Serve(_)) => "info",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // fuser warns when its own unmount finds the mount already gone, which is how
    // `tessera umount` ends every mount.
    let default = format!("{default},fuser::session=error");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn progress(cli: &Cli) -> MultiProgress {
    if cli.no_progress || !std::io::stderr().is_terminal() {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    } else {
        MultiProgress::new()
    }
}

fn load_dictionary(refs: &[String], reg: &RegistryArgs) -> Result<Dictionary> {
    let mut dict = Dictionary::new();
    for r in refs {
        let (store, tag) = reg.open(r)?;
        let n = dict
            .add_image(store, &tag)
            .with_context(|| format!("loading chunk dictionary from {r}"))?;
        tracing::info!(image = %r, chunks = n, "chunk dictionary loaded");
    }
    Ok(dict)
}

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

fn run(cli: &Cli) -> Result<i32> {
    match &cli.cmd {
        Cmd::Serve(args) => serve(args),
        Cmd::Mount(args) => mount_cmd::mount(args),
        Cmd::Mountd(args) => mountd::mountd(args),
        Cmd::Node(args) => node_cmd::node(args),
        Cmd::Umount { dir } => mount_cmd::umount(dir),
        Cmd::Cache { cmd } => mount_cmd::cache(cmd),
        Cmd::Profile { cmd } => mount_cmd::profile(cmd),
        Cmd::Convert {
            src,
            dst,
            dedup_with,
            zstd_level,
            threads,
            cache_dir,
            no_cache,
            no_global_dedup,
            json,
            reg,
        } => {
            let (src_store, src_tag) = reg.open(src)?;
            let dst_ref = ImageRef::parse(dst, reg.plain_http)?;
            if matches!(dst_ref, ImageRef::DockerArchive { .. }) {
                bail!("docker-archive is only supported as a source: write to a registry or oci:DIR[:TAG]");
            }
            let (dst_store, dst_tag) = reg.open(dst)?;
            let dst_tag = if dst_tag.is_empty() {
                "latest".to_string()
            } else {
                dst_tag
            };
            if dst_tag.parse::<tessera_format::Digest>().is_ok() {
                bail!("the destination must be a tag, not a digest: the digest of the converted image is not known in advance");
            }
            let mut dict = load_dictionary(dedup_with, reg)?;
            let mut opts = ConvertOptions {
                zstd_level: *zstd_level,
                platform: reg.platform.clone(),
                global_dedup: !*no_global_dedup,
                ..ConvertOptions::default()
            };
            if let Some(t) = threads {
                opts.threads = (*t).max(1);
            }
            opts.cache_dir = if *no_cache {
                None
            } else {
                cache_dir.clone().or_else(args::default_cache_dir)
            };
            let mut conv = Converter {
                src: src_store.as_ref(),
                dst: dst_store.as_ref(),
                dict: &mut dict,
                opts,
                progress: progress(cli),
            };
            let report = conv
                .convert(&src_tag, Some(&dst_tag))
                .with_context(|| format!("converting {src} to {dst}"))?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for i in &report.images {
                    let plat = i
                        .platform
                        .as_deref()
                        .map(|p| format!(" [{p}]"))
                        .unwrap_or_default();
                    let remote = if i.registry_dedup_chunks > 0 {
                        format!(
                            "; {} chunks ({}) already in the registry",
                            i.registry_dedup_chunks,
                            mb(i.registry_dedup_bytes)
                        )
                    } else {
                        String::new()
                    };
                    eprintln!(
                        "converted{plat}: {} layers ({} cached), {} entries, {} of files in {} chunks; new: {} chunks, {} → {} stored{remote}; index {}; {:.1}s ({:.0} MB/s)",
                        i.layers,
                        i.layers_from_cache,
                        i.entries,
                        mb(i.file_bytes),
                        i.chunks,
                        i.new_chunks,
                        mb(i.new_bytes),
                        mb(i.new_stored_bytes),
                        mb(i.index_bytes),
                        i.seconds,
                        i.tar_bytes as f64 / 1e6 / i.seconds.max(1e-9)
                    );
                }
                outln!("{dst} {}", report.digest);
            }
            Ok(0)
        }
        Cmd::Unpack {
            reference,
            dir,
            json,
            reg,
        } => {
            let (store, img) = reg.open_image(reference)?;
            let mp = progress(cli);
            let bar = mp.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} unpacking [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )?
                .progress_chars("=> "),
            );
            let rep = tessera_image::unpack::unpack(&img, store.as_ref(), dir, &bar)
                .with_context(|| format!("unpacking {reference} into {}", dir.display()))?;
            bar.finish_and_clear();
            if *json {
                outln!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                eprintln!(
                    "unpacked {} entries ({} files, {}) into {}",
                    rep.entries,
                    rep.files,
                    mb(rep.file_bytes),
                    dir.display()
                );
            }
            Ok(0)
        }
        Cmd::Inspect {
            reference,
            dedup_with,
            json,
            reg,
        } => {
            let (_store, img) = reg.open_image(reference)?;
            let dict = load_dictionary(dedup_with, reg)?;
            let set: Option<HashSet<tessera_format::Digest>> =
                (!dedup_with.is_empty()).then(|| dict.chunk_ids().copied().collect());
            let s = tessera_image::inspect::summarize(&img, set.as_ref());
            if *json {
                outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                outln!("manifest      {}", s.manifest);
                outln!("subject       {}", s.subject.as_deref().unwrap_or("-"));
                outln!(
                    "index         {} ({} bytes, {:.1} bytes/entry)",
                    s.index_digest,
                    s.index_bytes,
                    s.index_bytes_per_entry
                );
                outln!(
                    "entries       {} ({} dirs, {} files, {} symlinks, {} hardlinks, {} other)",
                    s.entries,
                    s.directories,
                    s.files,
                    s.symlinks,
                    s.hardlinks,
                    s.other
                );
                outln!("file bytes    {}", mb(s.file_bytes));
                outln!(
                    "chunks        {} distinct of {} references",
                    s.chunks,
                    s.chunk_refs
                );
                outln!(
                    "unique bytes  {} ({} stored, ratio {:.2})",
                    mb(s.unique_bytes),
                    mb(s.stored_bytes),
                    s.unique_bytes as f64 / s.stored_bytes.max(1) as f64
                );
                outln!("packs         {}", s.packs.len());
                for p in &s.packs {
                    outln!(
                        "  {} {:>10} bytes, {} chunks used",
                        p.digest,
                        p.size,
                        p.chunks_used
                    );
                }
                if let Some(d) = &s.dictionary {
                    outln!(
                        "dictionary    {} chunks ({}) shared, {} chunks ({}) new",
                        d.shared_chunks,
                        mb(d.shared_bytes),
                        d.new_chunks,
                        mb(d.new_bytes)
                    );
                }
            }
            Ok(0)
        }
        Cmd::DiffTree {
            left,
            right,
            ignore_root_metadata,
            ignore_dir_mtime,
            json,
        } => {
            let opts = tessera_treediff::Options {
                ignore_root_metadata: *ignore_root_metadata,
                ignore_dir_mtime: *ignore_dir_mtime,
            };
            let diffs = tessera_treediff::compare(left, right, &opts)
                .with_context(|| format!("comparing {} and {}", left.display(), right.display()))?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&diffs)?);
            } else {
                for d in &diffs {
                    outln!("{d}");
                }
                if diffs.is_empty() {
                    eprintln!("trees are identical");
                } else {
                    eprintln!("{} differences", diffs.len());
                }
            }
            Ok(if diffs.is_empty() { 0 } else { 1 })
        }
    }
}

/// Buffers of 128 KiB to 4 MiB (range reads, chunks, sealed-file writes) come and go all
/// the time in the mount and node daemons. glibc raises its mmap threshold to the size of
/// the largest block freed (up to 32 MiB), and from then on such buffers come from its
/// heap arenas and stay resident: one daemon serving ten images peaked at 354 MiB, and
/// at 141 MiB with the threshold fixed (`tessera-mount-bench --many 10`); its cold full
/// read took the same time either way. A fixed threshold keeps them mapped on their own
/// and returned to the kernel when freed. Only the daemons (`mount`, `mountd`, `node`);
/// an explicit `MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES` in the environment wins.
fn bound_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
        && std::env::var_os("GLIBC_TUNABLES").is_none()
    {
        // SAFETY: mallopt(3) only sets an allocator parameter; M_MMAP_THRESHOLD takes a
        // size in bytes (128 KiB is glibc's own starting value) and has no other effect.
        // It runs right after argument parsing in main, before this process starts any
        // other thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Mount(_) | Cmd::Mountd(_) | Cmd::Node(_)) {
        bound_heap();
    }
    init_logging(&cli);
    match run(&cli) {
        Ok(code) => std::process::exit(code),
        Err(e) if e.chain().any(|c| c.is::<output::StdoutClosed>()) => {
            std::process::exit(output::EXIT_STDOUT_CLOSED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
