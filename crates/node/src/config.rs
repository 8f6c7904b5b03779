//! The node's configuration: a TOML file whose keys mirror the command's flags
//! (`tessera node --config FILE`); flags given on the command line win.

use serde::Deserialize;
use std::path::{Path, PathBuf};

use crate::NodeError;

pub const DEFAULT_ROOT: &str = "/var/lib/tessera";
pub const DEFAULT_SOCKET: &str = "/run/tessera/snapshotter.sock";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";

/// Every key is optional; see `tessera node --help` for each one's meaning.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct NodeConfig {
    pub root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    /// `ADDR:PORT` of `/metrics` and `/healthz`; `""` turns them off.
    pub metrics_listen: Option<String>,
    /// Node store size bound (`20G`).
    pub quota: Option<String>,
    /// A read-only shared chunk store consulted before the network.
    pub shared_store: Option<PathBuf>,
    /// Plain HTTP for registries that are not on loopback.
    pub plain_http: Option<bool>,
    /// `USER:PASSWORD` for registries (default: root's ~/.docker/config.json).
    pub creds: Option<String>,
    /// Seconds a read waits for the registry before it fails.
    pub fetch_timeout: Option<u64>,
    /// Prefetch each image's recorded read profile in the background.
    pub prefetch: Option<bool>,
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("reading {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            NodeError::Config(format!(
                "{}: {e}(keys: root, socket, metrics_listen, quota, shared_store, plain_http, creds, fetch_timeout, prefetch)",
                path.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_mirror_flags_and_typos_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("node.toml");
        std::fs::write(
            &p,
            "root = \"/srv/t\"\nquota = \"20G\"\nplain_http = true\n",
        )
        .unwrap();
        let c = NodeConfig::load(&p).unwrap();
        assert_eq!(c.root.as_deref(), Some(Path::new("/srv/t")));
        assert_eq!(c.quota.as_deref(), Some("20G"));
        assert_eq!(c.plain_http, Some(true));
        std::fs::write(&p, "roots = \"/srv/t\"\n").unwrap();
        let e = NodeConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("roots") && e.contains("keys:"), "{e}");
    }
}
