//! The daemon around [`Node`]: containerd's snapshots service over a Unix socket (gRPC,
//! `containerd-snapshots`), `/metrics` and `/healthz` over HTTP, and a clean stop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::{self, Status};
use containerd_snapshots::{Info, Kind as ApiKind, Snapshotter, Usage};

use crate::filter::{Fields, Filters};
use crate::meta::{self, Kind};
use crate::metrics::CallLabels;
use crate::snapshotter::{MountEntry, SnapshotInfo};
use crate::{Node, NodeError};

/// Longest a snapshots call may take before containerd hears DeadlineExceeded (a layer
/// download of a placeholder, or a registry that stopped answering, must not hang it).
const CALL_DEADLINE: Duration = Duration::from_secs(600);

/// containerd's `Snapshotter` over a [`Node`].
pub struct Service {
    node: Arc<Node>,
}

impl Service {
    pub fn new(node: Arc<Node>) -> Service {
        Service { node }
    }

    async fn call<T: Send + 'static>(
        &self,
        name: &'static str,
        f: impl FnOnce(&Node) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, Status> {
        let node = self.node.clone();
        let task = tokio::task::spawn_blocking(move || f(&node));
        let out = match tokio::time::timeout(CALL_DEADLINE, task).await {
            Ok(Ok(r)) => r.map_err(Status::from),
            Ok(Err(e)) => Err(Status::internal(format!("{name}: the call failed: {e}"))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{name}: no answer within {} s",
                CALL_DEADLINE.as_secs()
            ))),
        };
        let code = match &out {
            Ok(_) => "ok",
            Err(s) => code_name(s.code()),
        };
        self.node
            .metrics
            .calls
            .get_or_create(&CallLabels { call: name, code })
            .inc();
        if let Err(s) = &out {
            // AlreadyExists and NotFound are how the protocol works, not failures.
            match s.code() {
                tonic::Code::AlreadyExists | tonic::Code::NotFound => {
                    tracing::debug!(call = name, code, message = s.message(), "snapshots call")
                }
                _ => tracing::warn!(
                    call = name,
                    code,
                    message = s.message(),
                    "snapshots call failed"
                ),
            }
        }
        out
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        FailedPrecondition => "failed_precondition",
        InvalidArgument => "invalid_argument",
        Unavailable => "unavailable",
        DeadlineExceeded => "deadline_exceeded",
        _ => "internal",
    }
}

fn to_api(m: Vec<MountEntry>) -> Vec<Mount> {
    m.into_iter()
        .map(|m| Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn to_info(s: SnapshotInfo) -> Info {
    Info {
        kind: match s.record.kind {
            Kind::View => ApiKind::View,
            Kind::Active => ApiKind::Active,
            Kind::Committed => ApiKind::Committed,
        },
        name: s.name,
        parent: s.record.parent,
        labels: s.record.labels,
        created_at: meta::to_system_time(s.record.created),
        updated_at: meta::to_system_time(s.record.updated),
    }
}

type InfoStream = futures_util::stream::Iter<std::vec::IntoIter<Result<Info, Status>>>;

// The stream's item type is fixed by `containerd_snapshots::Snapshotter`.
#[allow(clippy::result_large_err)]
#[tonic::async_trait]
impl Snapshotter for Service {
    type Error = Status;

    async fn stat(&self, key: String) -> Result<Info, Status> {
        self.call("stat", move |n| n.stat(&key)).await.map(to_info)
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Status> {
        let paths = fieldpaths.unwrap_or_default();
        self.call("update", move |n| n.update(&info.name, info.labels, &paths))
            .await
            .map(to_info)
    }

    async fn usage(&self, key: String) -> Result<Usage, Status> {
        let (size, inodes) = self.call("usage", move |n| n.usage(&key)).await?;
        Ok(Usage { inodes, size })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Status> {
        self.call("mounts", move |n| n.mounts(&key))
            .await
            .map(to_api)
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        self.call("prepare", move |n| n.prepare(&key, &parent, labels))
            .await
            .map(to_api)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        self.call("view", move |n| n.view(&key, &parent, labels))
            .await
            .map(to_api)
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        self.call("commit", move |n| n.commit(&name, &key, labels))
            .await
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        self.call("remove", move |n| n.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), Status> {
        self.call("cleanup", |n| n.cleanup().map(|_| ())).await
    }

    type InfoStream = InfoStream;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<InfoStream, Status> {
        let filters =
            Filters::parse(&filters).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let all = self.call("walk", |n| n.list()).await?;
        let picked: Vec<Result<Info, Status>> = all
            .into_iter()
            .filter(|s| {
                filters.matches(&Fields {
                    name: &s.name,
                    parent: &s.record.parent,
                    kind: s.record.kind.as_str(),
                    labels: &s.record.labels,
                })
            })
            .map(|s| Ok(to_info(s)))
            .collect();
        Ok(futures_util::stream::iter(picked))
    }
}

/// Where the daemon listens.
pub struct Listen {
    pub socket: PathBuf,
    /// `/metrics` and `/healthz`; None: off.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Bind the snapshotter socket (root only), replacing a stale socket but never a live
/// daemon's.
fn bind(socket: &Path) -> Result<tokio::net::UnixListener, NodeError> {
    let io = |what: String| {
        move |source| NodeError::Io {
            context: what,
            source,
        }
    };
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(NodeError::Config(format!(
                "a daemon already listens on {} (stop it first, or use --socket)",
                socket.display()
            )));
        }
        std::fs::remove_file(socket).map_err(io(format!(
            "removing the stale socket {}",
            socket.display()
        )))?;
    }
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let l = std::os::unix::net::UnixListener::bind(socket);
    rustix::process::umask(old);
    let l = l.map_err(io(format!("listening on {}", socket.display())))?;
    l.set_nonblocking(true)
        .map_err(io("making the socket non-blocking".into()))?;
    tokio::net::UnixListener::from_std(l).map_err(io("registering the socket".into()))
}

/// Serve until SIGTERM or SIGINT (or `stop` resolves), then unmount the lazy mounts and
/// remove the socket. `ready` is called once both listeners are bound.
pub async fn run(
    node: Arc<Node>,
    listen: Listen,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(Option<std::net::SocketAddr>),
) -> Result<(), NodeError> {
    let uds = bind(&listen.socket)?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let metrics_addr = match listen.metrics {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Io {
                    context: format!("listening on {addr} for /metrics (--metrics-listen)"),
                    source,
                })?;
            let local = l.local_addr().ok();
            let n = node.clone();
            let app = axum::Router::new()
                .route(
                    "/metrics",
                    axum::routing::get(move || {
                        let n = n.clone();
                        async move {
                            (
                                [(
                                    axum::http::header::CONTENT_TYPE,
                                    "text/plain; version=0.0.4",
                                )],
                                n.metrics.encode(),
                            )
                        }
                    }),
                )
                .route("/healthz", axum::routing::get(|| async { "ok\n" }));
            let mut rx2 = rx.clone();
            tokio::spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx2.wait_for(|s| *s).await;
                    })
                    .await;
            });
            local
        }
        None => None,
    };
    // Signal handlers are in place before anyone hears that the daemon is ready.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| NodeError::Io {
            context: "installing the SIGTERM handler".into(),
            source,
        })?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|source| NodeError::Io {
            context: "installing the SIGINT handler".into(),
            source,
        })?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
            _ = stop => {}
        }
        let _ = tx.send(true);
    });
    tracing::info!(socket = %listen.socket.display(), metrics = ?metrics_addr, root = %node.root().display(), "tessera node serving containerd's snapshots API");
    ready(metrics_addr);
    let mut rx3 = rx.clone();
    let served = tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(Service::new(
            node.clone(),
        ))))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(uds),
            async move {
                let _ = rx3.wait_for(|s| *s).await;
            },
        )
        .await;
    let n = node.clone();
    let _ = tokio::task::spawn_blocking(move || n.shutdown()).await;
    let _ = std::fs::remove_file(&listen.socket);
    tracing::info!("tessera node stopped");
    served.map_err(|e| NodeError::Io {
        context: "serving the snapshots API".into(),
        source: std::io::Error::other(e.to_string()),
    })
}
