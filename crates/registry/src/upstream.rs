//! Upstream registries of the pull-through cache: their HTTP clients and token flow,
//! and the shared blob downloads in progress ([`Flight`]). What the registry does with
//! them is in `proxy.rs`.
//!
//! Upstream credentials (configured per upstream) are used only towards that upstream;
//! client credentials are never forwarded.

use crate::config::UpstreamConfig;
use crate::error::{ApiError, Code};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_format::OciDigest;
use tokio::sync::watch;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

pub struct Upstream {
    pub(crate) cfg: UpstreamConfig,
    client: reqwest::Client,
    /// scope → (bearer token, valid until)
    tokens: Mutex<HashMap<String, (String, Instant)>>,
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
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
                .redirect(reqwest::redirect::Policy::limited(5))
                .build()
                .map_err(|e| e.to_string())?;
            upstreams.push(Upstream {
                cfg: cfg.clone(),
                client,
                tokens: Mutex::new(HashMap::new()),
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
    /// GET or HEAD `path` on the upstream, answering its auth challenge if any.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        repo: &str,
    ) -> Result<reqwest::Response, ApiError> {
        let url = format!("{}{path}", self.cfg.url);
        let scope = format!("repository:{repo}:pull");
        let build = |auth: Option<String>| {
            let mut r = self
                .client
                .request(method.clone(), &url)
                .header("accept", ACCEPT);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r
        };
        let cached = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&scope)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(t, _)| format!("Bearer {t}"));
        let basic = self.basic();
        let first = cached.clone().or_else(|| basic.clone());
        let resp = build(first)
            .send()
            .await
            .map_err(|e| upstream_error(format!("upstream {} unreachable: {e}", self.cfg.name)))?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let auth = if challenge.to_ascii_lowercase().starts_with("bearer") {
            let token = self.token(&challenge, &scope).await?;
            format!("Bearer {token}")
        } else {
            basic.ok_or_else(|| {
                upstream_error(format!(
                    "upstream {} wants credentials; set username/password for it in the config file",
                    self.cfg.name
                ))
            })?
        };
        build(Some(auth))
            .send()
            .await
            .map_err(|e| upstream_error(format!("upstream {} unreachable: {e}", self.cfg.name)))
    }

    fn basic(&self) -> Option<String> {
        use base64::Engine as _;
        let (u, p) = (
            self.cfg.username.as_ref()?,
            self.cfg.password.as_deref().unwrap_or(""),
        );
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        ))
    }

    /// The anonymous (or credentialed) bearer-token flow.
    async fn token(&self, challenge: &str, scope: &str) -> Result<String, ApiError> {
        let params = parse_challenge(challenge);
        let realm = params
            .get("realm")
            .ok_or_else(|| upstream_error("upstream bearer challenge without realm"))?;
        let mut req = self.client.get(realm).query(&[("scope", scope)]);
        if let Some(s) = params.get("service") {
            req = req.query(&[("service", s)]);
        }
        if let Some(b) = self.basic() {
            req = req.header("authorization", b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| upstream_error(format!("token server {realm}: {e}")))?;
        if !resp.status().is_success() {
            return Err(upstream_error(format!(
                "token server {realm} answered {}",
                resp.status()
            )));
        }
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| upstream_error(format!("token server {realm}: {e}")))?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| upstream_error(format!("token server {realm} sent no token")))?
            .to_string();
        let ttl = v
            .get("expires_in")
            .and_then(|e| e.as_u64())
            .unwrap_or(60)
            .max(10);
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                scope.to_string(),
                (token.clone(), Instant::now() + Duration::from_secs(ttl - 5)),
            );
        Ok(token)
    }
}

pub(crate) fn parse_challenge(h: &str) -> HashMap<String, String> {
    let rest = h.split_once(' ').map(|x| x.1).unwrap_or("");
    let mut out = HashMap::new();
    let mut s = rest;
    while let Some(eq) = s.find('=') {
        let key = s[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = &s[eq + 1..];
        let (val, next) = if let Some(stripped) = after.strip_prefix('"') {
            match stripped.find('"') {
                Some(end) => (&stripped[..end], &stripped[end + 1..]),
                None => (stripped, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, val.to_string());
        s = next;
    }
    out
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
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#,
        );
        assert_eq!(c["realm"], "https://auth.example/token");
        assert_eq!(c["service"], "registry.example");
        assert_eq!(c["scope"], "repository:a:pull");
        let c = parse_challenge("Basic realm=x");
        assert_eq!(c["realm"], "x");
    }

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
