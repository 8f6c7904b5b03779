//! Media types and annotation keys of tessera images (documented in docs/format.md).

/// `artifactType` of a tessera image manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.tessera.image.v1";
/// Media type of the index layer.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.tessera.index.v1";
/// Media type of a pack layer.
pub const PACK_MEDIA_TYPE: &str = "application/vnd.tessera.pack.v1";

/// Manifest annotation: format version.
pub const ANN_FORMAT_VERSION: &str = "io.tessera.format.version";
/// Manifest annotation: chunker parameters, e.g. `fastcdc2020-l1:16384:65536:262144`.
pub const ANN_CHUNKER: &str = "io.tessera.chunker";
/// Index descriptor annotation: number of entries in the tree.
pub const ANN_ENTRIES: &str = "io.tessera.index.entries";
/// Index descriptor annotation: total uncompressed bytes of regular files.
pub const ANN_FILE_BYTES: &str = "io.tessera.index.file-bytes";

/// Defines the manifest media types once: each constant, [`MANIFEST_TYPES`] and
/// [`ACCEPT_MANIFESTS`] (the same literals, joined at compile time).
macro_rules! manifest_types {
    ($n0:ident = $l0:literal $(, $n:ident = $l:literal)* $(,)?) => {
        pub const $n0: &str = $l0;
        $(pub const $n: &str = $l;)*
        /// The manifest media types (OCI first): what a registry accepts for a manifest.
        pub const MANIFEST_TYPES: [&str; 4] = [$n0 $(, $n)*];
        /// `Accept` of manifest requests: every manifest media type.
        pub const ACCEPT_MANIFESTS: &str = concat!($l0 $(, ", ", $l)*);
    };
}

manifest_types!(
    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json",
    OCI_INDEX = "application/vnd.oci.image.index.v1+json",
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json",
    DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json",
);

/// Whether a manifest media type is an index (an OCI image index or a Docker manifest list).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_NONDIST_TAR: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
pub const OCI_LAYER_NONDIST_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const OCI_LAYER_NONDIST_ZSTD: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a layer media type, or `None` when it is not a layer type we read.
pub fn layer_compression(media_type: &str) -> Option<LayerCompression> {
    match media_type {
        OCI_LAYER_TAR | OCI_LAYER_NONDIST_TAR | DOCKER_LAYER_TAR => Some(LayerCompression::None),
        OCI_LAYER_GZIP | OCI_LAYER_NONDIST_GZIP | DOCKER_LAYER_GZIP | DOCKER_LAYER_FOREIGN_GZIP => {
            Some(LayerCompression::Gzip)
        }
        OCI_LAYER_ZSTD | OCI_LAYER_NONDIST_ZSTD => Some(LayerCompression::Zstd),
        _ => None,
    }
}

/// `artifactType` of a read profile stored as a referrer of a tessera image manifest.
pub const PROFILE_ARTIFACT_TYPE: &str = "application/vnd.tessera.profile.v1";
/// Media type of a read profile's one layer (text, lines `K N PATH`; docs/mount.md).
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.tessera.profile.v1+text";
/// Profile manifest annotation: a name for the workload the profile was recorded for.
pub const ANN_PROFILE_WORKLOAD: &str = "io.tessera.profile.workload";
/// OCI 1.1 empty config of artifacts, and its content.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const OCI_EMPTY_CONTENT: &[u8] = b"{}";
/// Standard creation-time annotation (RFC 3339).
pub const ANN_CREATED: &str = "org.opencontainers.image.created";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_list_of_manifest_types() {
        assert_eq!(ACCEPT_MANIFESTS, MANIFEST_TYPES.join(", "));
        assert_eq!(MANIFEST_TYPES.iter().filter(|t| is_index(t)).count(), 2);
        assert!(!is_index(OCI_MANIFEST) && !is_index(DOCKER_MANIFEST));
    }
}
