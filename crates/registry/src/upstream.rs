//! Upstream registries of the pull-through cache: one `tessera_oci::client::Client` per
//! upstream (challenges answered, bearer tokens cached by scope, transient failures
//! retried), and the shared blob downloads in progress ([`Flight`]). What the registry
//! does with them is in `proxy.rs`.
//!
//! Upstream credentials (configured per upstream) are used only towards that upstream;
//! client credentials are never forwarded.

use crate::config::UpstreamConfig;
use crate::error::{ApiError, Code};
use reqwest::header::ACCEPT;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tessera_format::OciDigest;
use tessera_oci::auth::Credentials;
use tessera_oci::client::{repo_scope, Client, Request, ACCEPT_MANIFESTS};
use tessera_oci::OciError;
use tokio::sync::watch;

pub struct Upstream {
    pub(crate) cfg: UpstreamConfig,
    client: Client,
}

pub struct Proxy {
    upstreams: Vec<Upstream>,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
}

/// A blob download in progress, shared by every client that wants it.
pub struct Flight {
    pub(crate) session: String,
    /// Known once upstream answered.
    pub(crate) size: std::sync::OnceLock<u64>,
    pub(crate) state: watch::Receiver<FlightState>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FlightState {
    /// The upstream request is out.
    Starting,
    /// Upstream does not have the blob.
    Missing,
    Running(u64),
    Done,
    Failed(String),
}

pub(crate) fn upstream_error(msg: impl Into<String>) -> ApiError {
    ApiError::new(Code::Unavailable, msg).status(axum::http::StatusCode::BAD_GATEWAY)
}

impl Proxy {
    pub fn new(cfgs: &[UpstreamConfig]) -> Result<Proxy, String> {
        let mut upstreams = Vec::new();
        for cfg in cfgs {
            let creds = cfg
                .username
                .as_ref()
                .map(|u| Credentials::new(u, cfg.password.as_deref().unwrap_or("")));
            let client = Client::for_url(&cfg.url, creds)
                .map_err(|e| format!("upstream {}: {e}", cfg.name))?;
            upstreams.push(Upstream {
                cfg: cfg.clone(),
                client,
            });
        }
        Ok(Proxy {
            upstreams,
            flights: Mutex::new(HashMap::new()),
        })
    }

    pub fn knows(&self, ns: &str) -> bool {
        self.upstreams.iter().any(|u| u.cfg.name == ns)
    }

    /// The upstream serving `repo` (`NAME/...`) and the repository name there.
    /// Requests with `?ns=NAME` are rewritten to `NAME/...` before routing (see `server.rs`),
    /// so a pull-through repository is always under its upstream's prefix and `ns` can
    /// never make a local repository a cache of something else.
    pub fn select(&self, repo: &str) -> Option<(&Upstream, String)> {
        let (first, rest) = repo.split_once('/')?;
        self.upstreams
            .iter()
            .find(|u| u.cfg.name == first)
            .map(|u| (u, rest.to_string()))
    }

    pub(crate) fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Upstream {
    /// GET or HEAD `path` on the upstream, answering its auth challenge if any. Any
    /// answer but a refused authentication is the caller's to read.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        repo: &str,
    ) -> Result<reqwest::Response, ApiError> {
        let url = format!("{}{path}", self.cfg.url);
        let req = Request::new(method, url, repo_scope(repo, false))
            .header(ACCEPT, ACCEPT_MANIFESTS)
            .map_err(|e| self.error(path, e))?;
        self.client
            .send(&req)
            .await
            .map_err(|e| self.error(path, e))
    }

    /// The proxy's answer for a failed upstream request.
    fn error(&self, path: &str, e: OciError) -> ApiError {
        let name = &self.cfg.name;
        match e {
            OciError::Unauthorized { status, .. } if self.cfg.username.is_some() => {
                let status = reqwest::StatusCode::from_u16(status)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|_| status.to_string());
                upstream_error(format!("upstream {name} answered {status} for {path}"))
            }
            OciError::Unauthorized { .. } => upstream_error(format!(
                "upstream {name} wants credentials; set username/password for it in the config file"
            )),
            OciError::Http(m) => upstream_error(format!("upstream {name} unreachable: {m}")),
            other => upstream_error(format!("upstream {name}: {other}")),
        }
    }
}

pub(crate) fn header_digest(resp: &reqwest::Response) -> Option<OciDigest> {
    resp.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| OciDigest::parse(v).ok())
}

/// Wait until a flight someone else started has an answer from upstream.
pub(crate) async fn join(f: Arc<Flight>) -> Result<Option<(u64, Arc<Flight>)>, ApiError> {
    let mut rx = f.state.clone();
    loop {
        let st = rx.borrow_and_update().clone();
        match st {
            FlightState::Starting => {
                if rx.changed().await.is_err() {
                    return Err(upstream_error("upstream request abandoned"));
                }
            }
            FlightState::Missing => return Ok(None),
            FlightState::Failed(e) => return Err(upstream_error(e)),
            FlightState::Running(_) | FlightState::Done => {
                let size = f.size.get().copied().unwrap_or(0);
                return Ok(Some((size, f)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection() {
        let p = Proxy::new(&[UpstreamConfig::parse_flag("docker.io=http://127.0.0.1:1").unwrap()])
            .unwrap();
        assert_eq!(
            p.select("docker.io/library/debian").map(|x| x.1),
            Some("library/debian".into())
        );
        assert!(p.select("library/debian").is_none());
        assert!(p.knows("docker.io"));
        assert!(!p.knows("library"));
    }
}
