//! The HTTP server: the router (metrics, the tessera extension, the Distribution API
//! behind the access check), request metrics and logging, and start-up and shutdown.

use crate::api;
use crate::config::Config;
use crate::conn::{Limited, Limits, MakeConn};
use crate::error::{ApiError, Code, ServeError};
use crate::ext;
use crate::metrics::{RequestLabels, RouteLabels};
use crate::routes::{parse_route, required_action};
use crate::state::{Registry, Shared};
use crate::token;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

async fn metrics_handler(State(reg): State<Shared>, headers: HeaderMap) -> Response {
    // With auth on, metrics are for accounts only unless `metrics_public` says otherwise.
    if reg.auth.is_some() && !reg.config.metrics_public {
        // bcrypt takes tens of milliseconds: keep it off the async worker threads.
        if !tokio::task::block_in_place(|| reg.is_account(&headers)) {
            return reg.challenge(&headers, None).into_response();
        }
    }
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

/// Other methods on the fixed endpoints: an OCI JSON error, like every other error.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::new(
        Code::Unsupported,
        format!("method {method} is not supported on {}", uri.path()),
    )
    .into_response()
}

/// `GET /token` (Docker token protocol) and `POST /token` (OAuth2 password grant).
async fn token_handler(
    State(reg): State<Shared>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (Some(a), Some(issuer)) = (reg.auth.as_ref(), reg.tokens.as_ref()) else {
        return ApiError::new(
            Code::Unsupported,
            "this registry runs without auth (no htpasswd file): it issues no tokens and needs none",
        )
        .status(StatusCode::NOT_FOUND)
        .into_response();
    };
    let mut scopes: Vec<String> = Vec::new();
    let mut basic: Option<String> = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default();
    scopes.extend(
        query
            .iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.clone()),
    );
    if method == axum::http::Method::POST {
        let form: token::OAuthForm = match serde_urlencoded::from_bytes(&body) {
            Ok(f) => f,
            Err(e) => {
                return ApiError::new(Code::Unsupported, format!("token request form: {e}"))
                    .status(StatusCode::BAD_REQUEST)
                    .into_response()
            }
        };
        if form.grant_type.as_deref() != Some("password") {
            return ApiError::new(
                Code::Unsupported,
                "only grant_type=password is supported (or GET /token with Basic credentials)",
            )
            .status(StatusCode::BAD_REQUEST)
            .into_response();
        }
        let user = form.username.unwrap_or_default();
        let pass = form.password.unwrap_or_default();
        basic = Some(tessera_oci::auth::Credentials::new(user, pass).basic_header());
        scopes.extend(form.scope);
    }
    let scopes = match token::parse_scopes(scopes.iter().map(String::as_str)) {
        Ok(s) => s,
        Err(e) => {
            return ApiError::new(Code::Unsupported, e.to_string())
                .status(StatusCode::BAD_REQUEST)
                .into_response()
        }
    };
    // bcrypt takes tens of milliseconds: keep it off the async worker threads.
    let who = tokio::task::block_in_place(|| a.identify(basic.as_deref()));
    let Some(who) = who else {
        return ApiError::new(
            Code::Unauthorized,
            "wrong user name or password for this registry's htpasswd file",
        )
        .header("www-authenticate", "Basic realm=\"tessera\"")
        .into_response();
    };
    let issued = issuer.issue(a, &who, &scopes);
    tracing::debug!(account = ?who, scopes = scopes.len(), "token issued");
    axum::Json(issued).into_response()
}

/// The HTTP application (also used by tests in-process).
pub fn router(reg: Shared) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(metrics_handler).fallback(method_not_allowed),
        )
        .route(
            "/token",
            axum::routing::get(token_handler)
                .post(token_handler)
                .fallback(method_not_allowed),
        )
        .route(
            "/tessera/v1/chunks",
            axum::routing::post(ext::query_chunks)
                .fallback(method_not_allowed)
                // 100000 ids of 71 bytes; axum's default body limit is 2 MiB.
                .layer(axum::extract::DefaultBodyLimit::max(ext::MAX_QUERY_BYTES)),
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
    let limits = Limits {
        header_read_timeout: Duration::from_secs(config.header_read_timeout_secs),
        idle_timeout: Duration::from_secs(config.idle_timeout_secs),
        max_connections: config.max_connections,
    };
    let root = config.root.clone();
    let cfg2 = config;
    let reg: Shared = Arc::new(start_up(move || Registry::open(cfg2)).await?);
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
        // The handlers are installed here, before `ready` says we listen: a signal that
        // arrives right after must already mean a graceful shutdown, not the default
        // action (which kills the process).
        let signals = shutdown_signals();
        let handle = handle.clone();
        tokio::spawn(async move {
            signals.await;
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
    let limited = Limited::new(axum_server::accept::NoDelayAcceptor::new(), limits);
    let app = MakeConn::new(router(reg), &limits);
    let res = match tls {
        Some(t) => {
            // Small replies (Range GETs of one chunk) must not wait for delayed ACKs.
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(t).acceptor(limited);
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
                .acceptor(limited)
                .handle(handle)
                .serve(app)
                .await
        }
    };
    res.map_err(|source| ServeError::Listen { addr, source })
}

/// Run blocking start-up work off the async threads; a task that panics is reported
/// as such (not as, say, a TLS error).
async fn start_up<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServeError> + Send + 'static,
) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(f).await?
}

/// A future that completes on SIGTERM or SIGINT; the handlers are installed when this
/// is called, not when the future is first polled.
fn shutdown_signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            (Ok(mut term), Err(_)) => {
                term.recv().await;
            }
            (Err(_), Ok(mut int)) => {
                int.recv().await;
            }
            (Err(e), Err(_)) => {
                tracing::warn!(error = %e, "no signal handlers: stop the registry with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_start_up_task_is_its_own_error() {
        let e = start_up(|| -> Result<(), ServeError> { panic!("start-up task panics") })
            .await
            .err();
        assert!(matches!(e, Some(ServeError::Join(_))), "{e:?}");
    }
}
