//! `tessera node`: the node daemon. It owns the node store and every lazy mount of the
//! node, and serves containerd's snapshots API (a proxy plugin over gRPC, through
//! containerd's own `containerd-snapshots` crate) so that containerd, Kubernetes (CRI)
//! and Docker run containers from tessera images without downloading them first.
//!
//! * [`snapshotter`]: snapshot semantics, the lazy path and placeholders (blocking).
//! * [`service`]: the gRPC service, `/metrics` and `/healthz`, and the daemon's run loop.
//! * [`remote`]: what containerd's labels say about a layer; twin lookup.
//! * [`meta`]: the snapshot records (redb). [`layer`]: unpacking OCI layers.
//! * [`filter`]: containerd's filter syntax for `Walk`.

pub mod config;
pub mod filter;
pub mod keeper;
pub mod layer;
pub mod meta;
pub mod metrics;
pub mod remote;
pub mod service;
pub mod snapshotter;

pub use config::NodeConfig;
pub use snapshotter::Node;

/// Errors of the node, each with the gRPC code containerd acts on.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    BadInput(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error("lazy mount: {0}")]
    Mount(String),
    #[error("snapshot database: {0} (the daemon keeps ROOT/snapshots.redb; another daemon on the same --root holds it locked)")]
    Db(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

impl NodeError {
    /// The gRPC code containerd maps back to its own error kinds.
    pub fn code(&self) -> containerd_snapshots::tonic::Code {
        use containerd_snapshots::tonic::Code;
        match self {
            NodeError::NotFound(_) => Code::NotFound,
            NodeError::AlreadyExists(_) => Code::AlreadyExists,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::BadInput(_) | NodeError::Config(_) => Code::InvalidArgument,
            NodeError::Registry(_) => Code::Unavailable,
            NodeError::Mount(_) | NodeError::Db(_) | NodeError::Io { .. } => Code::Internal,
        }
    }
}

impl From<NodeError> for containerd_snapshots::tonic::Status {
    fn from(e: NodeError) -> Self {
        containerd_snapshots::tonic::Status::new(e.code(), e.to_string())
    }
}
