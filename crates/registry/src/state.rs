//! The registry's state: storage, metadata, access rules, metrics and the pull-through
//! upstreams, shared by every request ([`Shared`]), and the bookkeeping of upload
//! sessions that only lives in memory.

use crate::auth::{Auth, Decision, Identity};
use crate::backend::{Backend, FsBackend};
use crate::config::{Action, Config};
use crate::error::{ApiError, Code, ServeError, StoreError};
use crate::meta::{self, Meta};
use crate::metrics::Metrics;
use crate::routes::Route;
use crate::token::{self, Claims, TokenIssuer};
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
    /// The bearer-token issuer (with auth only).
    pub tokens: Option<TokenIssuer>,
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
        let tokens = match &auth {
            Some(_) => Some(
                TokenIssuer::load_or_create(
                    &config.root,
                    std::time::Duration::from_secs(config.token_ttl_secs),
                )
                .map_err(|e| StoreError::io(config.root.join("token.key").display(), e))?,
            ),
            None => None,
        };
        let proxy = Proxy::new(&config.upstream).map_err(ServeError::Upstream)?;
        let reg = Registry {
            config,
            backend,
            meta,
            auth,
            tokens,
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

    /// Who the `Authorization` header says the caller is: None for bad credentials
    /// (a wrong password, a forged or expired token).
    pub(crate) fn caller(&self, a: &Auth, header: Option<&str>) -> Option<Caller> {
        if let Some(t) = header.and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        }) {
            return self
                .tokens
                .as_ref()?
                .verify(t.trim())
                .ok()
                .map(Caller::Token);
        }
        Some(match a.identify(header)? {
            Identity::Anonymous => Caller::Anonymous,
            Identity::User(u) => Caller::User(u),
        })
    }

    /// Whether the credentials of `header` allow `action` on `repo` (None: the catalog).
    fn decide(
        &self,
        a: &Auth,
        header: Option<&str>,
        repo: Option<&str>,
        action: Action,
    ) -> Decision {
        match self.caller(a, header) {
            None => Decision::Challenge,
            Some(Caller::Token(c)) if c.allows(repo, action) => Decision::Allow,
            Some(Caller::Token(_)) => Decision::InsufficientScope,
            Some(Caller::Anonymous) if a.allowed(&Identity::Anonymous, repo, action) => {
                Decision::Allow
            }
            Some(Caller::Anonymous) => Decision::Challenge,
            Some(Caller::User(u)) => {
                if a.allowed(&Identity::User(u), repo, action) {
                    Decision::Allow
                } else {
                    Decision::Deny
                }
            }
        }
    }

    /// Whether the caller may do `action` on `repo` (always true without auth).
    pub(crate) fn may(&self, headers: &HeaderMap, repo: Option<&str>, action: Action) -> bool {
        match &self.auth {
            None => true,
            Some(a) => matches!(
                self.decide(
                    a,
                    headers.get("authorization").and_then(|v| v.to_str().ok()),
                    repo,
                    action
                ),
                Decision::Allow
            ),
        }
    }

    /// Whether the caller is an account (an htpasswd user, by password or token).
    pub(crate) fn is_account(&self, headers: &HeaderMap) -> bool {
        let Some(a) = &self.auth else {
            return false;
        };
        let hdr = headers.get("authorization").and_then(|v| v.to_str().ok());
        match self.caller(a, hdr) {
            Some(Caller::User(_)) => true,
            Some(Caller::Token(c)) => !c.sub.is_empty(),
            _ => false,
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
        // anonymous pulls are allowed: clients (containers/image, docker) only ask for a
        // token, or send credentials, after the /v2/ ping asked for them. Any valid
        // token will do there, an anonymous one too.
        let decision = if *route == Route::Base {
            match self.caller(a, hdr) {
                Some(Caller::User(_) | Caller::Token(_)) => Decision::Allow,
                _ => Decision::Challenge,
            }
        } else {
            self.decide(a, hdr, route.repo(), action)
        };
        let scope = route.repo().map(|r| token::scope_for(r, action));
        match decision {
            Decision::Allow => Ok(()),
            Decision::Challenge => Err(self.challenge(headers, scope.as_deref())),
            Decision::InsufficientScope => Err(ApiError::new(
                Code::Denied,
                format!("this token does not grant {action:?} here: ask /token for that scope (the access rules may not allow it)"),
            )
            .status(axum::http::StatusCode::UNAUTHORIZED)
            .header(
                "www-authenticate",
                format!(
                    "{},error=\"insufficient_scope\"",
                    token::challenge(&self.realm(headers), scope.as_deref())
                ),
            )),
            Decision::Deny => Err(ApiError::new(
                Code::Denied,
                format!("this account may not {action:?} here"),
            )),
        }
    }

    /// Where clients get tokens: the configured realm, else `/token` on the host the
    /// client addressed (a Host header that is not a plain host[:port] is not echoed).
    fn realm(&self, headers: &HeaderMap) -> String {
        if let Some(r) = &self.config.token_realm {
            return r.clone();
        }
        let scheme = if self.config.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let host = headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.len() <= 255
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .map(str::to_string)
            .unwrap_or_else(|| self.config.listen.to_string());
        format!("{scheme}://{host}/token")
    }

    /// The 401 of a caller without (valid) credentials: a bearer challenge naming the
    /// token endpoint and the scope the request needs.
    pub(crate) fn challenge(&self, headers: &HeaderMap, scope: Option<&str>) -> ApiError {
        ApiError::new(
            Code::Unauthorized,
            "authentication required: log in with a user from the registry's htpasswd file (docker login), or ask /token for an anonymous token",
        )
        .header("www-authenticate", token::challenge(&self.realm(headers), scope))
    }
}

/// Who is asking, by the credentials of a request.
pub(crate) enum Caller {
    Anonymous,
    User(String),
    /// A valid bearer token of ours (its subject may be anonymous).
    Token(Claims),
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
