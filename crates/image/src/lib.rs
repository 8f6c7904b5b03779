//! Opening tessera images: find the tessera manifest for a reference, load and validate
//! its index, read and verify chunks (coalescing neighbouring chunks of a pack into one
//! range read), unpack a rootfs and summarize an image.

pub mod inspect;
pub mod unpack;

use std::collections::BTreeMap;
use std::io::Read;
use tessera_format::index::{ChunkLoc, Index, IndexError};
use tessera_format::pack::{check_location, chunk_in_frame, decode_frame, PackError, TocEntry};
use tessera_format::{media, Digest};
use tessera_oci::manifest::{self, Descriptor, ImageManifest, Parsed};
use tessera_oci::{OciError, Store};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("{0}")]
    Index(#[from] IndexError),
    #[error("{0}")]
    Pack(#[from] PackError),
    #[error("{0} is not a tessera image (no layer of type {idx}); convert it first with `tessera convert`", idx = media::INDEX_MEDIA_TYPE)]
    NotTessera(String),
    #[error("no image for platform {want} in the index (available: {have})")]
    Platform { want: String, have: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// The default platform when a reference names a multi-platform index.
pub fn default_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("linux/{arch}")
}

/// Resolve `reference` in `store` to one image manifest (picking `platform` from an index).
pub fn resolve_image(
    store: &dyn Store,
    reference: &str,
    platform: &str,
) -> Result<(ImageManifest, Descriptor)> {
    let raw = store.manifest(reference)?;
    match manifest::parse(&raw.bytes, &raw.media_type)? {
        Parsed::Image(m) => Ok((
            m,
            Descriptor::new(&raw.media_type, &raw.digest, raw.bytes.len() as u64),
        )),
        Parsed::Index(ix) => {
            let matches = |d: &Descriptor| {
                d.platform
                    .as_ref()
                    .map(|p| format!("{}/{}", p.os, p.architecture) == platform)
                    .unwrap_or(false)
            };
            let Some(d) = ix.manifests.iter().find(|d| matches(d)) else {
                let have: Vec<String> = ix
                    .manifests
                    .iter()
                    .filter_map(|d| {
                        d.platform
                            .as_ref()
                            .map(|p| format!("{}/{}", p.os, p.architecture))
                    })
                    .collect();
                return Err(ImageError::Platform {
                    want: platform.into(),
                    have: have.join(", "),
                });
            };
            let raw = store.manifest(&d.digest)?;
            match manifest::parse(&raw.bytes, &raw.media_type)? {
                Parsed::Image(m) => Ok((
                    m,
                    Descriptor::new(&raw.media_type, &raw.digest, raw.bytes.len() as u64),
                )),
                Parsed::Index(_) => Err(ImageError::Other(
                    "nested image indexes are not supported".into(),
                )),
            }
        }
    }
}

/// Where verified index blobs are kept between opens of an image (a node store), so a
/// warm start does not download the index again. Entries are checked against their
/// digest on every use.
pub trait IndexCache {
    fn get_index(&self, digest: &Digest) -> Option<Vec<u8>>;
    fn put_index(&self, digest: &Digest, bytes: &[u8]);
}

/// Whether a manifest is a tessera image (it has an index layer).
pub fn is_tessera(m: &ImageManifest) -> bool {
    m.layers
        .iter()
        .any(|l| l.media_type == media::INDEX_MEDIA_TYPE)
}

/// The tessera twin of the plain image manifest `subject`, if the store has one: the
/// first referrer of artifact type `application/vnd.tessera.image.v1`.
pub fn find_twin(store: &dyn Store, subject: &Digest) -> Result<Option<Digest>> {
    let found = store.referrers(subject, media::ARTIFACT_TYPE)?;
    match found
        .iter()
        .find(|d| d.artifact_type.as_deref() == Some(media::ARTIFACT_TYPE))
    {
        Some(d) => Ok(Some(d.sha256()?)),
        None => Ok(None),
    }
}

/// A tessera image opened from a store.
pub struct TesseraImage {
    pub manifest: ImageManifest,
    pub manifest_desc: Descriptor,
    pub index_desc: Descriptor,
    pub index: Index,
    /// Pack descriptors by digest.
    pub packs: BTreeMap<Digest, Descriptor>,
    /// How long downloading the index took (a sample of the store's bandwidth); None
    /// when it came from an [`IndexCache`].
    pub index_fetch: Option<std::time::Duration>,
}

impl TesseraImage {
    /// Open the tessera image named by `reference` (tag or digest) in `store`.
    /// A plain image whose tessera twin the store knows (a manifest of artifact type
    /// `application/vnd.tessera.image.v1` whose `subject` is the plain manifest, found
    /// through the referrers API) opens as that twin.
    pub fn open(store: &dyn Store, reference: &str, platform: &str) -> Result<TesseraImage> {
        Self::open_cached(store, reference, platform, None)
    }

    /// [`TesseraImage::open`], taking the index from `cache` when it holds it (verified
    /// against the manifest's digest) and keeping a downloaded one there.
    pub fn open_cached(
        store: &dyn Store,
        reference: &str,
        platform: &str,
        cache: Option<&dyn IndexCache>,
    ) -> Result<TesseraImage> {
        let (mut manifest, mut manifest_desc) = resolve_image(store, reference, platform)?;
        if !is_tessera(&manifest) {
            if let Some(twin) = find_twin(store, &manifest_desc.sha256()?)? {
                tracing::debug!(%reference, twin = %twin, "opening the tessera twin of a plain image");
                (manifest, manifest_desc) = resolve_image(store, &twin.to_string(), platform)?;
            }
        }
        let Some(index_desc) = manifest
            .layers
            .iter()
            .find(|l| l.media_type == media::INDEX_MEDIA_TYPE)
            .cloned()
        else {
            return Err(ImageError::NotTessera(format!(
                "{} {reference}",
                store.describe()
            )));
        };
        let index_digest = index_desc.sha256()?;
        let cached = cache
            .and_then(|c| c.get_index(&index_digest))
            .filter(|b| Digest::of(b) == index_digest);
        let (bytes, index_fetch) = match cached {
            Some(b) => (b, None),
            None => {
                let mut bytes = Vec::new();
                let t0 = std::time::Instant::now();
                store
                    .open_blob(&index_digest, index_desc.size)?
                    .take(tessera_format::index::MAX_INDEX_BODY)
                    .read_to_end(&mut bytes)
                    .map_err(|e| ImageError::Io {
                        context: format!("reading index {}", index_desc.digest),
                        source: e,
                    })?;
                let took = t0.elapsed();
                (bytes, Some(took))
            }
        };
        let index = Index::decode(&bytes)?;
        if index_fetch.is_some() {
            if let Some(c) = cache {
                c.put_index(&index_digest, &bytes);
            }
        }
        let mut packs = BTreeMap::new();
        for l in &manifest.layers {
            if l.media_type == media::PACK_MEDIA_TYPE {
                packs.insert(l.sha256()?, l.clone());
            }
        }
        for p in &index.packs {
            if !packs.contains_key(p) {
                return Err(ImageError::Other(format!(
                    "index refers to pack {p}, which is not a layer of the manifest"
                )));
            }
        }
        Ok(TesseraImage {
            manifest,
            manifest_desc,
            index_desc,
            index,
            packs,
            index_fetch,
        })
    }

    /// The TOC-shaped location of a chunk.
    pub fn toc_entry(&self, c: &ChunkLoc) -> TocEntry {
        c.toc_entry()
    }
}

/// Reads chunks of one image from a store, coalescing runs of neighbouring chunks.
pub struct ChunkReader<'a> {
    pub image: &'a TesseraImage,
    pub store: &'a dyn Store,
    /// Largest single range read.
    pub max_read: u64,
    /// Bytes fetched from the store.
    pub fetched: u64,
}

impl<'a> ChunkReader<'a> {
    pub fn new(image: &'a TesseraImage, store: &'a dyn Store) -> Self {
        ChunkReader {
            image,
            store,
            max_read: 8 << 20,
            fetched: 0,
        }
    }

    /// Read and verify the chunks `ids` (indices into the index's chunk table) in order,
    /// calling `sink` with each chunk's bytes.
    pub fn read_chunks(
        &mut self,
        ids: &[u32],
        sink: &mut dyn FnMut(u32, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let chunks = &self.image.index.chunks;
        let mut i = 0;
        while i < ids.len() {
            let first = &chunks[ids[i] as usize];
            let mut j = i + 1;
            let mut last = first;
            let mut end = first.offset + first.stored_len as u64;
            while j < ids.len() {
                let c = &chunks[ids[j] as usize];
                if !c.same_frame(last)
                    && (c.pack != first.pack
                        || c.offset != end
                        || end - first.offset + c.stored_len as u64 > self.max_read)
                {
                    break;
                }
                if !c.same_frame(last) {
                    end += c.stored_len as u64;
                }
                last = c;
                j += 1;
            }
            let pack = self.image.index.packs[first.pack as usize];
            let buf = self
                .store
                .read_range(&pack, first.offset, end - first.offset)?;
            self.fetched += buf.len() as u64;
            // The decoded frame of the previous chunk: chunks of one frame decode it once.
            let mut frame: Option<(u64, Vec<u8>)> = None;
            for &id in &ids[i..j] {
                let c = &chunks[id as usize];
                let corrupt = |why: String| PackError::CorruptChunk { id: c.id, why };
                if frame.as_ref().is_none_or(|(o, _)| *o != c.offset) {
                    let s = (c.offset - first.offset) as usize;
                    let stored = buf
                        .get(s..s + c.stored_len as usize)
                        .ok_or_else(|| corrupt("the store returned a short range".into()))?;
                    check_location(&c.frame(), c.inner, c.len).map_err(corrupt)?;
                    frame = Some((c.offset, decode_frame(stored, &c.frame()).map_err(corrupt)?));
                }
                let Some((_, plain)) = &frame else {
                    continue;
                };
                let data = chunk_in_frame(plain, &c.id, c.inner, c.len).map_err(corrupt)?;
                sink(id, &data)?;
            }
            i = j;
        }
        Ok(())
    }
}
