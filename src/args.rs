//! Command-line arguments shared by several commands, and what they open.

use anyhow::{Context, Result};
use std::path::PathBuf;
use tessera_image::TesseraImage;
use tessera_mount::session::{RegistryOptions, SizeOrAuto};
use tessera_mount::store::{NodeStore, StoreOptions};
use tessera_oci::Store;

#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// Use plain HTTP for registries that are not on loopback.
    #[arg(long)]
    pub plain_http: bool,
    /// Registry credentials USER:PASSWORD (default: ~/.docker/config.json).
    #[arg(long, value_name = "USER:PASSWORD")]
    pub creds: Option<String>,
    /// Platform to pick from a multi-platform image (os/arch).
    #[arg(long)]
    pub platform: Option<String>,
}

impl RegistryArgs {
    pub fn options(&self) -> RegistryOptions {
        RegistryOptions {
            plain_http: self.plain_http,
            creds: self.creds.clone(),
            platform: self.platform.clone(),
            retries: None,
        }
    }

    /// The store `reference` names, and the tag in it ("" when none).
    pub fn open(&self, reference: &str) -> Result<(Box<dyn Store>, String)> {
        self.options()
            .open(reference)
            .with_context(|| format!("opening {reference}"))
    }

    /// A tessera image (the platform from --platform or this machine's).
    pub fn open_image(&self, reference: &str) -> Result<(Box<dyn Store>, TesseraImage)> {
        Ok(self.options().open_image(reference)?)
    }
}

#[derive(clap::Args)]
pub struct StoreArgs {
    /// Node store: verified chunks shared by every mount [default: /var/lib/tessera/chunks
    /// as root, else $XDG_CACHE_HOME/tessera/chunks].
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Keep the node store under SIZE (e.g. 20G), evicting least recently used chunks:
    /// first those no mounted image uses, then those of mounted images' files that are
    /// not open (fetched again when read); never those of open files.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub quota: Option<u64>,
    /// A read-only directory with the node store's layout (e.g. on NFS), consulted
    /// before the network.
    #[arg(long, value_name = "DIR")]
    pub shared_store: Option<PathBuf>,
}

impl StoreArgs {
    pub fn open(&self) -> Result<NodeStore> {
        let dir = self.store.clone().unwrap_or_else(default_node_store);
        NodeStore::open_with(
            &dir,
            StoreOptions {
                quota: self.quota,
                shared: self.shared_store.clone(),
            },
        )
        .with_context(|| format!("opening the node store {}", dir.display()))
    }
}

pub fn default_node_store() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/tessera/chunks");
    }
    default_cache_dir()
        .map(|d| d.join("chunks"))
        .unwrap_or_else(|| PathBuf::from("tessera-chunks"))
}

pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("tessera"))
}

pub fn parse_size_or_auto(s: &str) -> Result<SizeOrAuto, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(SizeOrAuto::Auto);
    }
    parse_size(s).map(SizeOrAuto::Size)
}

/// `20G`, `512M`, `64K`, `1000` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..].to_ascii_uppercase().trim_end_matches(['B', 'I']) {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                other => return Err(format!("unknown size unit {other:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 20G)"))?;
    if !(0.0..1.8e19).contains(&n) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_size_or_auto("auto"), Ok(SizeOrAuto::Auto));
        assert_eq!(parse_size_or_auto("16K"), Ok(SizeOrAuto::Size(16 << 10)));
    }
}
