//! Where images live: image references, the [`Store`] trait, and its three
//! implementations — OCI image layouts, `docker save` archives and registries speaking
//! the OCI Distribution API ([`client`]: the one Distribution client of tessera, async,
//! with [`auth`] for challenges, tokens and docker credentials and helpers).
//!
//! Every blob read through a store is verified against its digest and size before the
//! reader reports end of file.

pub mod archive;
pub mod auth;
pub mod client;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod verify;

pub use reference::ImageRef;
use std::io::Read;
use std::path::Path;
use tessera_format::Digest;

/// Everything that can go wrong talking to an image store.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("registry {host} refused access ({status}): check the credentials (--creds USER:PASS or ~/.docker/config.json)")]
    Unauthorized { host: String, status: u16 },
    #[error("registry error: {0}")]
    Registry(String),
    #[error("malformed manifest: {0}")]
    Manifest(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{what}: digest mismatch (expected {expected}, got {actual}): the data is corrupt or was tampered with")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("this store is read-only: {0}")]
    ReadOnly(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(String),
}

impl OciError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        OciError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = OciError> = std::result::Result<T, E>;

/// What [`Store::read_range_or_whole`] got.
pub enum RangeRead {
    /// The bytes asked for.
    Range(Vec<u8>),
    /// The whole blob (the store ignored the range), verified at its end.
    Whole(Box<dyn Read + Send>),
}

/// A manifest fetched from a store, with its media type and digest.
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// A place that holds images: read side and (unless read-only) write side.
pub trait Store: Send + Sync {
    /// Human-readable name, for messages.
    fn describe(&self) -> String;
    /// The manifest named by `reference` (a tag or `sha256:...` digest); verified when
    /// fetched by digest.
    fn manifest(&self, reference: &str) -> Result<RawManifest>;
    /// A reader of a blob, verified against `digest` and `size` at end of file.
    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>>;
    /// Bytes `offset..offset+len` of a blob (unverified: callers verify chunk ids).
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Like [`Store::read_range`], but a store that answers the range request with the
    /// whole blob (a registry ignoring `Range`) hands over that answer, a reader of the
    /// whole blob of `size` bytes verified at its end, instead of skipping to the range:
    /// a caller wanting many ranges of the blob then needs no other request.
    fn read_range_or_whole(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        _size: u64,
    ) -> Result<RangeRead> {
        self.read_range(digest, offset, len).map(RangeRead::Range)
    }
    /// Whether the store holds the blob.
    fn has_blob(&self, digest: &Digest) -> Result<bool>;
    /// Store a blob from a file whose digest is already known.
    fn put_blob_file(&self, digest: &Digest, size: u64, path: &Path) -> Result<()>;
    /// Store a small blob from memory.
    fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()>;
    /// Store a manifest under `tag` (or only by digest when `tag` is None).
    fn put_manifest(&self, tag: Option<&str>, bytes: &[u8], media_type: &str) -> Result<Digest>;
    /// Copy a blob from another store (cross-repository mount where possible).
    fn copy_blob_from(&self, from: &dyn Store, digest: &Digest, size: u64) -> Result<()> {
        copy_via_temp_file(self, from, digest, size)
    }
    /// A directory on the store's filesystem where blobs can be staged so that
    /// `put_blob_file` can link them instead of copying (None: use the system temp dir).
    fn staging_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// Registry host and repository, when this store is a registry (for cross-repo mounts).
    fn registry_location(&self) -> Option<(String, String)> {
        None
    }
    /// Ask a tessera registry which of these chunks it already holds (one answer per id,
    /// in order). `None`: the store has no chunk index (not a tessera registry).
    fn query_chunks(&self, _ids: &[Digest]) -> Result<Option<Vec<Option<RemoteChunk>>>> {
        Ok(None)
    }
    /// Another repository of the same registry (same host, same credentials).
    fn sibling(&self, _repository: &str) -> Option<Box<dyn Store>> {
        None
    }
    /// Manifests whose `subject` is `subject` and whose artifact type is `artifact_type`
    /// (OCI 1.1 referrers; empty where the store keeps none).
    fn referrers(
        &self,
        _subject: &Digest,
        _artifact_type: &str,
    ) -> Result<Vec<manifest::Descriptor>> {
        Ok(Vec::new())
    }
    /// Store a manifest that names `subject`, by digest, so that [`Store::referrers`]
    /// finds it.
    fn put_referrer(
        &self,
        bytes: &[u8],
        media_type: &str,
        _artifact_type: &str,
        _subject: &manifest::Descriptor,
    ) -> Result<Digest> {
        self.put_manifest(None, bytes, media_type)
    }
}

/// Where a tessera registry holds a chunk (answer of its chunk index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteChunk {
    pub pack: Digest,
    pub pack_size: u64,
    /// A repository of that registry the pack can be read (and mounted) from.
    pub repository: String,
    /// The frame that holds the chunk, and the chunk's place in it (format v2; a v1
    /// chunk is alone in its frame).
    pub offset: u64,
    pub stored_len: u32,
    pub frame_len: u32,
    pub inner: u32,
    pub len: u32,
    pub raw: bool,
}

/// Copy a blob by streaming it (verified) into a temporary file, then storing that.
pub fn copy_via_temp_file<S: Store + ?Sized>(
    to: &S,
    from: &dyn Store,
    digest: &Digest,
    size: u64,
) -> Result<()> {
    let mut r = from.open_blob(digest, size)?;
    let tmp =
        tempfile::NamedTempFile::new().map_err(|e| OciError::io("creating a temp file", e))?;
    let mut f = tmp
        .reopen()
        .map_err(|e| OciError::io("opening a temp file", e))?;
    std::io::copy(&mut r, &mut f).map_err(|e| OciError::io(format!("copying blob {digest}"), e))?;
    to.put_blob_file(digest, size, tmp.path())
}

/// Open a store for a reference. Returns the store and the tag/digest within it.
pub fn open(
    r: &ImageRef,
    opts: &registry::ClientOptions,
) -> Result<(Box<dyn Store>, Option<String>)> {
    match r {
        ImageRef::Layout { dir, tag } => {
            Ok((Box::new(layout::Layout::open_or_create(dir)?), tag.clone()))
        }
        ImageRef::DockerArchive { file } => {
            Ok((Box::new(archive::DockerArchive::open(file)?), None))
        }
        ImageRef::Registry {
            repo,
            reference,
            plain_http,
            ..
        } => {
            let host = r.api_host().unwrap_or_default();
            let client = registry::Registry::new(host, repo, *plain_http, opts)?;
            Ok((Box::new(client), reference.clone()))
        }
    }
}
