//! What containerd tells a remote snapshotter about the layer it unpacks, and how the
//! node finds the tessera twin of the image from it.
//!
//! containerd passes the descriptor annotations that start with `containerd.io/snapshot/`
//! as labels of `Prepare`. Its CRI plugin (`disable_snapshot_annotations = false`), and
//! from 2.1 its transfer service (`ctr image pull`, with the proxy plugin's export
//! `enable_remote_snapshot_annotations = "true"`), set the image reference, the manifest
//! digest and the layer digest there. The node reads the plain manifest, asks the
//! registry for its tessera twin through the referrers API and, when there is one,
//! answers the layer without containerd downloading it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_format::Digest;
use tessera_mount::session::RegistryOptions;
use tessera_mount::store::NodeStore;
use tessera_oci::manifest::{self, Parsed};
use tessera_oci::ImageRef;

use crate::NodeError;

/// The chain id a `Prepare` is meant to become (containerd's unpack).
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// Set by the node on snapshots it answered from a twin.
pub const LABEL_TWIN: &str = "containerd.io/snapshot/tessera.twin";

/// How long "this image has no twin" is believed before the registry is asked again.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// The layer an unpack `Prepare` is about, from its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub target: String,
    pub image_ref: String,
    pub manifest: Digest,
    pub layer: String,
}

impl LayerInfo {
    /// None when the labels do not describe an image layer (not an unpack, or a client
    /// that passes no image information); an error when they do but do not parse.
    pub fn from_labels(labels: &HashMap<String, String>) -> Result<Option<LayerInfo>, NodeError> {
        let Some(target) = labels.get(LABEL_TARGET) else {
            return Ok(None);
        };
        let (Some(image_ref), Some(manifest), Some(layer)) = (
            labels.get(LABEL_IMAGE_REF),
            labels.get(LABEL_MANIFEST),
            labels.get(LABEL_LAYER),
        ) else {
            return Ok(None);
        };
        let manifest = manifest.parse::<Digest>().map_err(|e| {
            NodeError::BadInput(format!("label {LABEL_MANIFEST}={manifest:?}: {e}"))
        })?;
        Ok(Some(LayerInfo {
            target: target.clone(),
            image_ref: image_ref.clone(),
            manifest,
            layer: layer.clone(),
        }))
    }
}

/// A plain image and its tessera twin.
#[derive(Debug, Clone)]
pub struct Twin {
    /// `HOST/REPO` of the image.
    pub repo: String,
    /// `HOST/REPO@DIGEST` of the twin, what the lazy mount opens.
    pub twin_ref: String,
    /// The plain manifest's layers: digest, media type and size, bottom first.
    pub layers: Vec<(String, String, u64)>,
    /// The chain id of each layer (from the config's `rootfs.diff_ids`), bottom first.
    pub chains: Vec<String>,
}

impl Twin {
    /// Position (0 is the bottom) of the layer whose chain id is `target`: what containerd
    /// unpacks. A layer digest alone is ambiguous (images repeat empty layers).
    pub fn position(&self, target: &str) -> Option<usize> {
        self.chains.iter().position(|c| c == target)
    }
    pub fn is_top(&self, pos: usize) -> bool {
        pos + 1 == self.layers.len()
    }
}

/// Chain ids of `diff_ids` as the OCI image spec defines them: the first is its diff id,
/// each next one `sha256(previous + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()).to_string(),
        };
        out.push(next);
    }
    out
}

/// A lookup's answer (None: no twin) and when it was made.
type Cached = (Option<Arc<Twin>>, Instant);

/// Twin lookups, cached by manifest digest.
pub struct Resolver {
    reg: RegistryOptions,
    cache: Mutex<HashMap<Digest, Cached>>,
    /// Where twins' indexes are kept (the node store): the lazy mount that follows a
    /// lookup reads the index from there instead of downloading it again.
    indexes: Option<Arc<NodeStore>>,
}

impl Resolver {
    pub fn new(reg: RegistryOptions) -> Resolver {
        Resolver {
            reg,
            cache: Mutex::new(HashMap::new()),
            indexes: None,
        }
    }

    /// Keep the indexes of the twins it opens in `store`.
    pub fn with_index_cache(mut self, store: Arc<NodeStore>) -> Resolver {
        self.indexes = Some(store);
        self
    }

    pub fn registry_options(&self) -> &RegistryOptions {
        &self.reg
    }

    /// The twin of the image `info` names, or None when it has none.
    pub fn twin(&self, info: &LayerInfo) -> Result<Option<Arc<Twin>>, NodeError> {
        if let Some((t, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&info.manifest)
        {
            if t.is_some() || at.elapsed() < NEGATIVE_TTL {
                return Ok(t.clone());
            }
        }
        // A failed lookup counts as "no twin" for a while, so the image's other layers
        // are unpacked as usual without asking (and failing) again.
        let found = self.lookup(info);
        let cached = found.as_ref().ok().cloned().flatten().map(Arc::new);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.manifest, (cached.clone(), Instant::now()));
        found.map(|_| cached)
    }

    fn lookup(&self, info: &LayerInfo) -> Result<Option<Twin>, NodeError> {
        let parsed = ImageRef::parse(&info.image_ref, self.reg.plain_http)
            .map_err(|e| NodeError::BadInput(format!("label {LABEL_IMAGE_REF}: {e}")))?;
        let ImageRef::Registry { host, repo, .. } = &parsed else {
            return Err(NodeError::BadInput(format!(
                "label {LABEL_IMAGE_REF}={:?} is not a registry reference",
                info.image_ref
            )));
        };
        let repo_ref = format!("{host}/{repo}");
        let by_digest = format!("{repo_ref}@{}", info.manifest);
        let (store, _) = self
            .reg
            .open(&by_digest)
            .map_err(|e| NodeError::Registry(format!("{by_digest}: {e}")))?;
        let raw = store
            .manifest(&info.manifest.to_string())
            .map_err(|e| NodeError::Registry(format!("manifest of {by_digest}: {e}")))?;
        let m = match manifest::parse(&raw.bytes, &raw.media_type)
            .map_err(|e| NodeError::BadInput(format!("manifest of {by_digest}: {e}")))?
        {
            Parsed::Image(m) => m,
            Parsed::Index(_) => {
                return Err(NodeError::BadInput(format!(
                    "{by_digest} is an index, but containerd unpacks one platform's manifest"
                )))
            }
        };
        if tessera_image::is_tessera(&m) {
            return Ok(None);
        }
        let config = {
            let mut bytes = Vec::new();
            store
                .open_blob(
                    &m.config
                        .sha256()
                        .map_err(|e| NodeError::BadInput(format!("config of {by_digest}: {e}")))?,
                    m.config.size,
                )
                .and_then(|r| {
                    std::io::Read::read_to_end(&mut std::io::Read::take(r, 4 << 20), &mut bytes)
                        .map_err(|e| tessera_oci::OciError::io("reading the image config", e))
                })
                .map_err(|e| NodeError::Registry(format!("config of {by_digest}: {e}")))?;
            bytes
        };
        let cfg: serde_json::Value = serde_json::from_slice(&config)
            .map_err(|e| NodeError::BadInput(format!("config of {by_digest}: {e}")))?;
        let diff_ids: Vec<String> = cfg["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != m.layers.len() {
            return Err(NodeError::BadInput(format!(
                "{by_digest}: its config lists {} diff ids for {} layers",
                diff_ids.len(),
                m.layers.len()
            )));
        }
        let twin = tessera_image::find_twin(store.as_ref(), &info.manifest)
            .map_err(|e| NodeError::Registry(format!("referrers of {by_digest}: {e}")))?;
        let Some(twin) = twin else {
            tracing::debug!(image = %info.image_ref, "no tessera twin: unpacking as usual");
            return Ok(None);
        };
        // The twin must open (index fetched, decoded, its packs listed) before any layer
        // is answered from it: a broken twin leaves the whole image to a normal unpack.
        let platform = self
            .reg
            .platform
            .clone()
            .unwrap_or_else(tessera_image::default_platform);
        let cache = self
            .indexes
            .as_deref()
            .map(|s| s as &dyn tessera_image::IndexCache);
        tessera_image::TesseraImage::open_cached(
            store.as_ref(),
            &twin.to_string(),
            &platform,
            cache,
        )
        .map_err(|e| {
            NodeError::BadInput(format!(
                "the tessera twin {twin} of {by_digest} is unusable: {e}"
            ))
        })?;
        tracing::info!(image = %info.image_ref, %twin, "image has a tessera twin: serving it lazily");
        Ok(Some(Twin {
            twin_ref: format!("{repo_ref}@{twin}"),
            repo: repo_ref,
            layers: m
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.media_type.clone(), l.size))
                .collect(),
            chains: chain_ids(&diff_ids),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], Digest::of(format!("{a} {b}").as_bytes()).to_string());
        assert_eq!(
            c[2],
            Digest::of(format!("{} {b}", c[1]).as_bytes()).to_string()
        );
        // A repeated layer has a chain id of its own at each place.
        assert_ne!(c[1], c[2]);
    }

    #[test]
    fn labels_without_image_information_are_not_remote() {
        let mut l = HashMap::new();
        assert_eq!(LayerInfo::from_labels(&l).unwrap(), None);
        l.insert(LABEL_TARGET.into(), "sha256:aa".into());
        assert_eq!(LayerInfo::from_labels(&l).unwrap(), None);
        l.insert(LABEL_IMAGE_REF.into(), "127.0.0.1:5000/a:1".into());
        l.insert(LABEL_LAYER.into(), "sha256:bb".into());
        l.insert(LABEL_MANIFEST.into(), "not-a-digest".into());
        let e = LayerInfo::from_labels(&l).unwrap_err();
        assert!(e.to_string().contains(LABEL_MANIFEST), "{e}");
        l.insert(LABEL_MANIFEST.into(), format!("sha256:{}", "0".repeat(64)));
        assert!(LayerInfo::from_labels(&l).unwrap().is_some());
    }
}
