//! `tessera serve`: an OCI Distribution v1.1 registry.
//!
//! * Blobs live behind the [`backend::Backend`] trait (local filesystem here); all
//!   metadata — repositories, blob links, manifests, tags, referrers, upload sessions and
//!   the global chunk index — lives in one redb database ([`meta::Meta`]). Neither holds
//!   per-process state that matters: upload sessions survive restarts.
//! * A blob is stored once but readable only in repositories it was pushed or mounted to.
//! * tessera images get extra checks: every pack is verified chunk by chunk before the
//!   manifest is accepted, and its chunks enter the global chunk index, which clients
//!   query in bulk (`POST /tessera/v1/chunks`) to upload only what the registry lacks.
//! * Pull-through caching from upstream registries ([`proxy`]).
//!
//! The HTTP API is documented in docs/registry-api.md.

pub mod api;
pub mod auth;
pub mod backend;
pub mod config;
pub mod error;
pub mod ext;
pub mod fuzzing;
pub mod meta;
pub mod metrics;
pub mod names;
pub mod proxy;
pub mod token;
pub mod twin;

use crate::api::{parse_route, required_action, Hashers, Route, Shared};
use crate::auth::{Auth, Decision};
use crate::backend::{Backend, FsBackend};
use crate::config::{Action, Config};
use crate::error::{ApiError, Code, StoreError};
use crate::meta::Meta;
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::names::{BlobDigest, DigestHasher};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

pub use config::ConfigError;

/// Everything that can stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("pull-through client: {0}")]
    Upstream(String),
}

pub struct Registry {
    pub config: Config,
    pub backend: Arc<dyn Backend>,
    pub meta: Meta,
    pub auth: Option<Auth>,
    pub metrics: Metrics,
    pub proxy: proxy::Proxy,
    hashers: Mutex<Hashers>,
    /// Server-side conversions run one at a time.
    pub(crate) convert_slot: Arc<tokio::sync::Semaphore>,
    /// Upload sessions a request is writing to right now (one writer per session).
    writing: Mutex<std::collections::HashSet<String>>,
    /// Publishing takes it shared; removing bytes takes it exclusively, so a blob is
    /// never deleted between another upload's rename and its link.
    publish: RwLock<()>,
}

impl Registry {
    pub fn open(config: Config) -> Result<Registry, ServeError> {
        config.validate()?;
        std::fs::create_dir_all(&config.root)
            .map_err(|e| StoreError::io(config.root.display(), e))?;
        let backend: Arc<dyn Backend> = Arc::new(FsBackend::open(&config.root)?);
        // Staging of an interrupted server-side conversion is never referenced again.
        let staging = config.root.join("convert-staging");
        let _ = std::fs::remove_dir_all(&staging);
        let meta = Meta::open(&config.root.join("meta.redb"))?;
        let auth = match &config.htpasswd {
            Some(p) => Some(Auth::load(p, config.access.clone())?),
            None => None,
        };
        let proxy = proxy::Proxy::new(&config.upstream).map_err(ServeError::Upstream)?;
        let reg = Registry {
            config,
            backend,
            meta,
            auth,
            metrics: Metrics::new(),
            proxy,
            hashers: Mutex::new(HashMap::new()),
            convert_slot: Arc::new(tokio::sync::Semaphore::new(1)),
            writing: Mutex::new(std::collections::HashSet::new()),
            publish: RwLock::new(()),
        };
        reg.expire_uploads()?;
        Ok(reg)
    }

    pub(crate) fn read_lock(&self) -> RwLockReadGuard<'_, ()> {
        self.publish.read().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn write_lock(&self) -> RwLockWriteGuard<'_, ()> {
        self.publish.write().unwrap_or_else(|e| e.into_inner())
    }

    fn hashers(&self) -> std::sync::MutexGuard<'_, Hashers> {
        self.hashers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The running sha256 of a session, if it is at `offset` (else a fresh one at 0, or None).
    pub(crate) fn take_hasher(&self, id: &str, offset: u64) -> Option<DigestHasher> {
        match self.hashers().remove(id) {
            Some((at, h)) if at == offset => Some(h),
            _ if offset == 0 => Some(DigestHasher::new(names::Algorithm::Sha256)),
            _ => None,
        }
    }
    pub(crate) fn put_hasher(&self, id: &str, at: u64, h: DigestHasher) {
        self.hashers().insert(id.to_string(), (at, h));
    }
    pub(crate) fn hashers_remove(&self, id: &str) -> Option<(u64, DigestHasher)> {
        self.hashers().remove(id)
    }

    /// Exclusive right to write to (or close, or cancel) upload session `id` while the
    /// guard lives: two requests appending at once could interleave their bytes.
    pub(crate) fn lock_session(self: &Arc<Self>, id: &str) -> Result<SessionGuard, ApiError> {
        let mut w = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if !w.insert(id.to_string()) {
            return Err(ApiError::new(
                Code::BlobUploadInvalid,
                "another request is writing to this upload session; retry when it is done",
            )
            .status(StatusCode::RANGE_NOT_SATISFIABLE));
        }
        Ok(SessionGuard {
            reg: self.clone(),
            id: id.to_string(),
        })
    }

    pub(crate) async fn drop_session(self: &Arc<Self>, id: &str) {
        self.hashers_remove(id);
        let (reg, id) = (self.clone(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || {
            let _ = reg.backend.upload_delete(&id);
            let _ = reg.meta.delete_upload(&id);
        })
        .await;
    }

    /// Remove stored bytes nobody links any more (caller holds the write lock).
    pub(crate) fn remove_bytes(&self, d: &BlobDigest) -> Result<(), StoreError> {
        let ds = d.to_string();
        if self.meta.pack_admitted(&ds)? {
            let ids = ext::pack_chunk_ids(self.backend.as_ref(), d)?;
            self.meta.forget_pack(&ds, &ids)?;
        }
        self.backend.delete(d)?;
        Ok(())
    }

    /// Remove upload sessions idle for longer than the configured TTL, and files of
    /// sessions the database does not know (a crash between the two creations).
    pub fn expire_uploads(&self) -> Result<usize, StoreError> {
        let ttl = Duration::from_secs(self.config.upload_ttl_secs);
        let known: HashMap<String, meta::UploadMeta> = self.meta.uploads()?.into_iter().collect();
        let mut n = 0;
        let mut on_disk = std::collections::HashSet::new();
        for (id, modified) in self.backend.upload_list()? {
            let idle = modified.elapsed().unwrap_or_default();
            let orphan = !known.contains_key(&id) && idle > Duration::from_secs(60);
            if idle > ttl || orphan {
                self.backend.upload_delete(&id)?;
                self.meta.delete_upload(&id)?;
                self.hashers().remove(&id);
                n += 1;
            } else {
                on_disk.insert(id);
            }
        }
        for id in known.keys() {
            if !on_disk.contains(id) {
                self.meta.delete_upload(id)?;
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(sessions = n, "expired upload sessions");
        }
        Ok(n)
    }

    /// Whether the caller may do `action` on `repo` (always true without auth).
    pub(crate) fn may(&self, headers: &HeaderMap, repo: Option<&str>, action: Action) -> bool {
        match &self.auth {
            None => true,
            Some(a) => matches!(
                a.decide(
                    headers.get("authorization").and_then(|v| v.to_str().ok()),
                    repo,
                    action
                ),
                Decision::Allow
            ),
        }
    }

    fn authorize(
        &self,
        headers: &HeaderMap,
        route: &Route,
        action: Action,
    ) -> Result<(), ApiError> {
        let Some(a) = &self.auth else {
            return Ok(());
        };
        let hdr = headers.get("authorization").and_then(|v| v.to_str().ok());
        // The base endpoint challenges every caller without credentials, even when
        // anonymous pulls are allowed: clients (containers/image, docker) only send
        // credentials after the /v2/ ping asked for them.
        let decision = if *route == Route::Base {
            match a.identify(hdr) {
                Some(auth::Identity::User(_)) => Decision::Allow,
                _ => Decision::Challenge,
            }
        } else {
            a.decide(hdr, route.repo(), action)
        };
        match decision {
            Decision::Allow => Ok(()),
            Decision::Challenge => Err(ApiError::new(
                Code::Unauthorized,
                "authentication required: log in with a user from the registry's htpasswd file",
            )
            .header("www-authenticate", "Basic realm=\"tessera\"")),
            Decision::Deny => Err(ApiError::new(
                Code::Denied,
                format!("this account may not {action:?} here"),
            )),
        }
    }
}

/// Held while a request writes to an upload session.
pub(crate) struct SessionGuard {
    reg: Arc<Registry>,
    id: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.reg
            .writing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

async fn v2(State(reg): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Some(route) = parse_route(parts.uri.path()) else {
        return ApiError::new(
            Code::NameInvalid,
            format!("no such endpoint: {}", parts.uri.path()),
        )
        .status(StatusCode::NOT_FOUND)
        .into_response();
    };
    // `?ns=NAME` (containerd's mirror form) means the pull-through repository NAME/REPO.
    let ns = parts.uri.query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("ns="))
            .map(str::to_string)
    });
    let ns = ns.filter(|ns| reg.proxy.knows(ns));
    let route = match &ns {
        Some(ns) => route.under_namespace(ns),
        None => route,
    };
    let query = parts.uri.query().map(|q| {
        q.split('&')
            .filter(|kv| !kv.starts_with("ns="))
            .collect::<Vec<_>>()
            .join("&")
    });
    let action = required_action(&route, &parts.method);
    // bcrypt takes tens of milliseconds: keep it off the async worker threads.
    let authorized = if reg.auth.is_some() {
        tokio::task::block_in_place(|| reg.authorize(&parts.headers, &route, action))
    } else {
        Ok(())
    };
    if let Err(e) = authorized {
        return e.into_response();
    }
    let mut resp =
        match api::dispatch(reg.clone(), route, parts.method, query, parts.headers, body).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    let h = resp.headers_mut();
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if let Some(ns) = ns {
        if let Ok(v) = HeaderValue::from_str(&ns) {
            h.insert("oci-namespace", v);
        }
    }
    resp
}

async fn metrics_handler(State(reg): State<Shared>) -> Response {
    if let Ok((chunks, _)) = reg.meta.stats() {
        reg.metrics.chunks_indexed.set(chunks as i64);
    }
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        reg.metrics.render(),
    )
        .into_response()
}

async fn observe(
    State(reg): State<Shared>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let route = if path.starts_with("/tessera/") {
        "tessera"
    } else if path == "/metrics" {
        "metrics"
    } else {
        parse_route(&path).map(|r| r.label()).unwrap_or("other")
    };
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let secs = start.elapsed().as_secs_f64();
    reg.metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.clone(),
            route,
            status,
        })
        .inc();
    reg.metrics
        .latency
        .get_or_create(&RouteLabels { route })
        .observe(secs);
    if status >= 500 {
        tracing::warn!(%method, %path, status, ms = secs * 1000.0, "request failed");
    } else {
        tracing::debug!(%method, %path, status, ms = secs * 1000.0, "request");
    }
    resp
}

/// The HTTP application (also used by tests in-process).
pub fn router(reg: Shared) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .route(
            "/tessera/v1/chunks",
            axum::routing::post(ext::query_chunks)
                // 100000 ids of 71 bytes; axum's default body limit is 2 MiB.
                .layer(axum::extract::DefaultBodyLimit::max(16 << 20)),
        )
        .fallback(v2)
        .layer(axum::middleware::from_fn_with_state(reg.clone(), observe))
        .with_state(reg)
}

/// Run until SIGINT/SIGTERM; `ready` gets the bound address (useful with port 0).
pub async fn serve(config: Config, ready: impl FnOnce(SocketAddr, bool)) -> Result<(), ServeError> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(c, k)
                    .await
                    .map_err(|e| {
                        ServeError::Tls(format!("{} / {}: {e}", c.display(), k.display()))
                    })?,
            )
        }
        _ => None,
    };
    let listen = config.listen;
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let root = config.root.clone();
    let cfg2 = config;
    let reg: Shared = Arc::new(
        tokio::task::spawn_blocking(move || Registry::open(cfg2))
            .await
            .map_err(|e| ServeError::Tls(e.to_string()))??,
    );
    let listener = std::net::TcpListener::bind(listen).map_err(|source| ServeError::Listen {
        addr: listen,
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ServeError::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: listen,
        source,
    })?;
    let handle = axum_server::Handle::new();
    {
        let handle = handle.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing in-flight requests");
            handle.graceful_shutdown(Some(grace));
        });
    }
    {
        let reg = reg.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(600));
            loop {
                tick.tick().await;
                let reg = reg.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = reg.expire_uploads() {
                        tracing::warn!(error = %e, "upload expiry failed");
                    }
                })
                .await;
            }
        });
    }
    tracing::info!(%addr, root = %root.display(), tls = tls.is_some(), "registry listening");
    ready(addr, tls.is_some());
    let app = router(reg).into_make_service();
    let res = match tls {
        Some(t) => {
            // Small replies (Range GETs of one chunk) must not wait for delayed ACKs.
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(t)
                .acceptor(axum_server::accept::NoDelayAcceptor::new());
            axum_server::from_tcp(listener)
                .map_err(|source| ServeError::Listen { addr, source })?
                .acceptor(acceptor)
                .handle(handle)
                .serve(app)
                .await
        }
        None => {
            axum_server::from_tcp(listener)
                .map_err(|source| ServeError::Listen { addr, source })?
                .acceptor(axum_server::accept::NoDelayAcceptor::new())
                .handle(handle)
                .serve(app)
                .await
        }
    };
    res.map_err(|source| ServeError::Listen { addr, source })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
