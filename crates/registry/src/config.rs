//! `tessera serve` configuration: a TOML file whose keys mirror the command-line flags
//! (flags win). See docs/registry-api.md for the full list.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory: blobs, upload sessions and the metadata database.
    pub root: PathBuf,
    /// Largest manifest accepted (bytes); larger PUTs get 413.
    pub max_manifest_bytes: u64,
    /// Largest request body for blob uploads (bytes); larger ones get 413.
    pub max_blob_bytes: u64,
    /// Whether DELETE of manifests and blobs is allowed (else 405 UNSUPPORTED).
    pub delete_enabled: bool,
    /// Upload sessions idle for longer than this are removed.
    pub upload_ttl_secs: u64,
    /// htpasswd file (bcrypt entries). When set, requests need credentials unless an
    /// `[[access]]` rule grants `anonymous`.
    pub htpasswd: Option<PathBuf>,
    /// Per-repository rules; without any, every authenticated user may do everything.
    pub access: Vec<AccessRule>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace_secs: u64,
    /// A client must send a request's headers within this many seconds of its first byte.
    pub header_read_timeout_secs: u64,
    /// A connection with no request in progress is closed after this many seconds.
    pub idle_timeout_secs: u64,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// With an htpasswd file, `/metrics` needs an authenticated account unless this is true.
    pub metrics_public: bool,
    /// Lifetime of the bearer tokens `/token` issues (with an htpasswd file).
    pub token_ttl_secs: u64,
    /// The realm named in bearer challenges, for a registry behind a reverse proxy
    /// (default: `http[s]://HOST/token` with the Host the client asked for).
    pub token_realm: Option<String>,
    /// Pull-through upstreams.
    pub upstream: Vec<UpstreamConfig>,
    /// Convert every plain image pushed (or pulled through) into its tessera twin,
    /// stored untagged in the same repository and linked by `subject`.
    pub convert_on_push: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            root: default_root(),
            max_manifest_bytes: 4 << 20,
            max_blob_bytes: 64 << 30,
            delete_enabled: true,
            upload_ttl_secs: 24 * 3600,
            htpasswd: None,
            access: Vec::new(),
            tls_cert: None,
            tls_key: None,
            shutdown_grace_secs: 30,
            header_read_timeout_secs: 30,
            idle_timeout_secs: 120,
            max_connections: 512,
            metrics_public: false,
            token_ttl_secs: 300,
            token_realm: None,
            upstream: Vec::new(),
            convert_on_push: false,
        }
    }
}

/// `$XDG_DATA_HOME/tessera/registry`, else `~/.local/share/tessera/registry`.
pub fn default_root() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("tessera/registry");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/tessera/registry"),
        None => PathBuf::from("tessera-registry"),
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// A user name from the htpasswd file, `*` for any authenticated user, or
    /// `anonymous` for requests without credentials.
    pub account: String,
    /// A repository name, a prefix ending in `*` (`team/*`), or `*`.
    pub repository: String,
    /// Any of `pull`, `push`, `delete`.
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pull,
    Push,
    Delete,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Path prefix (first repository component) and `ns` value that select it, e.g. `docker.io`.
    pub name: String,
    /// Base URL, e.g. `https://registry-1.docker.io` or `http://127.0.0.1:5001`.
    pub url: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Tags are re-checked with the upstream after this many seconds.
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl_secs: u64,
}

fn default_tag_ttl() -> u64 {
    300
}

impl UpstreamConfig {
    /// Parse the `--upstream NAME=URL` form.
    pub fn parse_flag(s: &str) -> Result<UpstreamConfig, String> {
        let (name, url) = s.split_once('=').ok_or_else(|| {
            format!(
                "--upstream {s:?}: expected NAME=URL, e.g. docker.io=https://registry-1.docker.io"
            )
        })?;
        if name.is_empty() || !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "--upstream {s:?}: NAME must be non-empty and URL must start with http:// or https://"
            ));
        }
        Ok(UpstreamConfig {
            name: name.to_string(),
            url: url.trim_end_matches('/').to_string(),
            username: None,
            password: None,
            tag_ttl_secs: default_tag_ttl(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "TLS needs both tls_cert and tls_key (--tls-cert and --tls-key)".into(),
            ));
        }
        if !self.access.is_empty() && self.htpasswd.is_none() {
            return Err(ConfigError::Invalid(
                "[[access]] rules need an htpasswd file (htpasswd = \"...\" or --htpasswd)".into(),
            ));
        }
        if self.token_ttl_secs < 10 {
            return Err(ConfigError::Invalid(
                "token_ttl_secs must be at least 10".into(),
            ));
        }
        if self.header_read_timeout_secs == 0
            || self.idle_timeout_secs == 0
            || self.max_connections == 0
        {
            return Err(ConfigError::Invalid(
                "header_read_timeout_secs, idle_timeout_secs and max_connections must be at least 1".into(),
            ));
        }
        for u in &self.upstream {
            if u.name.is_empty() || u.name.contains('/') {
                return Err(ConfigError::Invalid(format!(
                    "upstream name {:?} must be one path component, e.g. docker.io",
                    u.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c: Config = toml::from_str(
            r#"
listen = "0.0.0.0:5001"
root = "/srv/r"
max_manifest_bytes = 10
htpasswd = "/etc/h"
[[access]]
account = "anonymous"
repository = "public/*"
actions = ["pull"]
[[upstream]]
name = "docker.io"
url = "https://example.invalid"
tag_ttl_secs = 5
"#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 5001);
        assert_eq!(c.max_manifest_bytes, 10);
        assert_eq!(c.access[0].actions, vec![Action::Pull]);
        assert_eq!(c.upstream[0].tag_ttl_secs, 5);
        c.validate().unwrap();
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
    }

    #[test]
    fn upstream_flag() {
        let u = UpstreamConfig::parse_flag("docker.io=http://127.0.0.1:1/").unwrap();
        assert_eq!(u.url, "http://127.0.0.1:1");
        assert!(UpstreamConfig::parse_flag("nourl").is_err());
        assert!(UpstreamConfig::parse_flag("x=ftp://a").is_err());
    }
}
