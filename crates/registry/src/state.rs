//! The registry's state: storage, metadata, access rules, metrics and the pull-through
//! upstreams, shared by every request ([`Shared`]), and the bookkeeping of upload
//! sessions that only lives in memory.

use crate::auth::{self, Auth, Decision};
use crate::backend::{Backend, FsBackend};
use crate::config::{Action, Config};
use crate::error::{ApiError, Code, ServeError, StoreError};
use crate::meta::{self, Meta};
use crate::metrics::Metrics;
use crate::routes::Route;
use crate::upstream::Proxy;
use axum::http::{HeaderMap, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;
use tessera_format::{Algorithm, DigestHasher};

/// The registry as every handler sees it.
pub type Shared = Arc<Registry>;

/// A map for in-memory hash states of upload sessions.
pub type Hashers = HashMap<String, (u64, DigestHasher)>;

pub struct Registry {
    pub config: Config,
    pub backend: Arc<dyn Backend>,
    pub meta: Meta,
    pub auth: Option<Auth>,
    pub metrics: Metrics,
    pub proxy: Proxy,
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
        let proxy = Proxy::new(&config.upstream).map_err(ServeError::Upstream)?;
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
            _ if offset == 0 => Some(DigestHasher::new(Algorithm::Sha256)),
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

    pub(crate) fn authorize(
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
            Decision::Challenge => Err(challenge()),
            Decision::Deny => Err(ApiError::new(
                Code::Denied,
                format!("this account may not {action:?} here"),
            )),
        }
    }
}

/// The 401 of a caller without (valid) credentials.
pub(crate) fn challenge() -> ApiError {
    ApiError::new(
        Code::Unauthorized,
        "authentication required: log in with a user from the registry's htpasswd file",
    )
    .header("www-authenticate", "Basic realm=\"tessera\"")
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
