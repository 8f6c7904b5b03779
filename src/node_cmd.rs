//! `tessera node`: command-line glue over the node daemon ([`tessera_node`]).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use tessera_mount::session::{MountSpec, RegistryOptions};
use tessera_mount::store::{NodeStore, StoreOptions};
use tessera_node::config::{DEFAULT_METRICS, DEFAULT_ROOT, DEFAULT_SOCKET};
use tessera_node::keeper::Keeper;
use tessera_node::metrics::Metrics;
use tessera_node::remote::Resolver;
use tessera_node::service::{self, Listen};
use tessera_node::{Node, NodeConfig};

use crate::args::parse_size;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    #[command(subcommand)]
    cmd: Option<NodeCmd>,
    #[command(flatten)]
    opts: NodeOpts,
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Remove snapshot directories and mounts that no snapshot record names (what a
    /// daemon killed mid-call leaves); the running daemon does this itself at start and
    /// whenever containerd's garbage collector asks it to clean up.
    Gc {
        /// The node's state directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hold the lazy mounts' FUSE connections while no daemon runs (started by the
    /// daemon itself; see docs/node.md).
    #[command(hide = true)]
    Keeper {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_ROOT)]
        root: PathBuf,
    },
}

#[derive(Args)]
pub struct NodeOpts {
    /// State directory: snapshots, their database and the node store (ROOT/chunks)
    /// [default: /var/lib/tessera].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// containerd's proxy-plugin socket (gRPC snapshots API)
    /// [default: /run/tessera/snapshotter.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TOML config file; its keys are the flags' names with _ for - (flags win).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address of /metrics and /healthz [default: 127.0.0.1:9464]; `off` turns them off.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Keep the node store under SIZE (e.g. 20G).
    #[arg(long, value_name = "SIZE")]
    quota: Option<String>,
    /// A read-only chunk store with the node store's layout, consulted before the network.
    #[arg(long, value_name = "DIR")]
    shared_store: Option<PathBuf>,
    /// Plain HTTP for registries that are not on loopback.
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials USER:PASSWORD [default: root's ~/.docker/config.json].
    #[arg(long, value_name = "USER:PASSWORD")]
    creds: Option<String>,
    /// Seconds a read waits for the registry (retrying) before it fails [default: 30].
    #[arg(long, value_name = "SECS")]
    fetch_timeout: Option<u64>,
    /// Prefetch each image's stored read profile in the background.
    #[arg(long)]
    prefetch: bool,
}

pub fn node(a: &NodeArgs) -> Result<i32> {
    match &a.cmd {
        Some(NodeCmd::Gc { root, json }) => gc(root, *json),
        Some(NodeCmd::Keeper { root }) => {
            tessera_node::keeper::run(root)?;
            Ok(0)
        }
        None => run(&a.opts),
    }
}

fn gc(root: &std::path::Path, json: bool) -> Result<i32> {
    let node = open(
        root,
        None,
        &RegistryOptions::default(),
        MountSpec::default(),
        None,
    )
    .context(
        "opening the node's state (is `tessera node` running on it? it cleans up by itself)",
    )?;
    let removed = node.cleaned_at_open() + node.cleanup()?;
    node.shutdown();
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::json!({ "removed": removed }));
    } else {
        let _ = writeln!(out, "removed {removed} unreferenced snapshot directories");
    }
    Ok(0)
}

fn open(
    root: &std::path::Path,
    store_opts: Option<StoreOptions>,
    reg: &RegistryOptions,
    spec: MountSpec,
    keeper: Option<Arc<Keeper>>,
) -> Result<Arc<Node>> {
    let chunks = root.join("chunks");
    let store = NodeStore::open_with(&chunks, store_opts.unwrap_or_default())
        .with_context(|| format!("opening the node store {}", chunks.display()))?;
    let store = Arc::new(store);
    Ok(Node::open(
        root,
        store.clone(),
        Resolver::new(reg.clone()).with_index_cache(store),
        spec,
        Arc::new(Metrics::default()),
        keeper,
    )?)
}

fn run(o: &NodeOpts) -> Result<i32> {
    let file = match &o.config {
        Some(p) => NodeConfig::load(p)?,
        None => NodeConfig::default(),
    };
    let root = o
        .root
        .clone()
        .or(file.root)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    let socket = o
        .socket
        .clone()
        .or(file.socket)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let metrics = o
        .metrics_listen
        .clone()
        .or(file.metrics_listen)
        .unwrap_or_else(|| DEFAULT_METRICS.to_string());
    let metrics = match metrics.as_str() {
        "" | "off" => None,
        m => Some(
            m.parse::<std::net::SocketAddr>()
                .with_context(|| format!("--metrics-listen {m:?}: expected ADDR:PORT or off"))?,
        ),
    };
    let quota = match o.quota.clone().or(file.quota) {
        Some(q) => Some(
            parse_size(&q)
                .map_err(anyhow::Error::msg)
                .context("--quota")?,
        ),
        None => None,
    };
    let reg = RegistryOptions {
        plain_http: o.plain_http || file.plain_http.unwrap_or(false),
        creds: o.creds.clone().or(file.creds),
        platform: None,
        retries: None,
    };
    let spec = MountSpec {
        fetch_timeout: o.fetch_timeout.or(file.fetch_timeout).unwrap_or(30),
        prefetch: o.prefetch || file.prefetch.unwrap_or(false),
        reg: reg.clone(),
        ..MountSpec::default()
    };
    let store_opts = StoreOptions {
        quota,
        shared: o.shared_store.clone().or(file.shared_store),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let program = std::env::current_exe().context("finding this program's path")?;
    // Without a keeper the node still works; its lazy mounts then end with it.
    let keeper = match Keeper::connect(&root, &program) {
        Ok(k) => Some(Arc::new(k)),
        Err(e) => {
            tracing::warn!(error = %e, "no mount keeper: lazy mounts (and the containers on them) will not survive a restart of this daemon");
            None
        }
    };
    let node = open(&root, Some(store_opts), &reg, spec, keeper)?;
    node.resume()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let sock = socket.clone();
    rt.block_on(service::run(
        node,
        Listen { socket, metrics },
        std::future::pending(),
        move |addr| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {}", sock.display());
            if let Some(a) = addr {
                let _ = writeln!(out, "metrics on http://{a}/metrics");
            }
            let _ = out.flush();
        },
    ))
    .context("tessera node")?;
    Ok(0)
}
