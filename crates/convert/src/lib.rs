//! Convert OCI images into tessera images.
//!
//! Layers are read in order and streamed through [`layer::convert_layer`]: tar parsing
//! and FastCDC on one thread, hashing and zstd on all cores, packs written in archive
//! order. Chunks already in the [`Dictionary`] (other tessera images, earlier layers)
//! are referenced instead of stored again. The layers are merged into one tree
//! ([`tree::MergedTree`]) whose canonical index is the image's index blob. Nothing is
//! written to the destination until the whole image converted, so bad input leaves
//! nothing visible there.

pub mod layer;
pub mod tree;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tessera_format::index::{build_index, IndexError, StoredChunk};
use tessera_format::{chunker, media, Digest, FORMAT_VERSION};
use tessera_image::{ImageError, TesseraImage};
use tessera_oci::manifest::{self, Descriptor, ImageIndex, ImageManifest, Parsed};
use tessera_oci::{OciError, RemoteChunk, Store};
use tree::{LayerEntry, MergedTree};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0}")]
    Index(#[from] IndexError),
    #[error("bad layer: {0}")]
    BadLayer(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// Conversion settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub zstd_level: i32,
    pub threads: usize,
    /// Where converted-layer records are cached (None: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Only this platform of a multi-platform source (`os/arch`), None for all.
    pub platform: Option<String>,
    /// Where to stage packs before they are published (None: system temp dir).
    pub staging_dir: Option<PathBuf>,
    /// Ask a tessera registry destination which chunks it already holds, and upload
    /// only the others (global dedup without a hand-picked dictionary).
    pub global_dedup: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            zstd_level: tessera_format::pack::DEFAULT_ZSTD_LEVEL,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            cache_dir: None,
            platform: None,
            staging_dir: None,
            global_dedup: true,
        }
    }
}

/// Where a dictionary pack can be copied from.
#[derive(Clone, Copy, Debug)]
enum PackSource {
    /// Index into `Dictionary::stores`.
    Store(usize),
    /// Already at the destination.
    Destination,
}

/// Chunks already stored somewhere, and where their packs are.
#[derive(Default)]
pub struct Dictionary {
    chunks: HashMap<Digest, StoredChunk>,
    packs: HashMap<Digest, (PackSource, u64)>,
    stores: Vec<Box<dyn Store>>,
    /// Repository of the destination registry → index into `stores`.
    remote_repos: HashMap<String, usize>,
}

impl Dictionary {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.chunks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
    pub fn contains(&self, id: &Digest) -> bool {
        self.chunks.contains_key(id)
    }
    pub fn chunk_ids(&self) -> impl Iterator<Item = &Digest> {
        self.chunks.keys()
    }

    /// Add every chunk of a tessera image (every platform of an index).
    pub fn add_image(
        &mut self,
        store: Box<dyn Store>,
        reference: &str,
    ) -> Result<usize, ConvertError> {
        let raw = store.manifest(reference)?;
        let refs: Vec<String> = match manifest::parse(&raw.bytes, &raw.media_type)? {
            Parsed::Image(_) => vec![raw.digest.to_string()],
            Parsed::Index(ix) => ix.manifests.iter().map(|d| d.digest.clone()).collect(),
        };
        let before = self.chunks.len();
        let si = self.stores.len();
        // Load every platform first: a failure leaves the dictionary as it was.
        let mut images = Vec::with_capacity(refs.len());
        for r in refs {
            images.push(TesseraImage::open(store.as_ref(), &r, "")?);
        }
        for img in &images {
            for c in &img.index.chunks {
                let pack = img.index.packs[c.pack as usize];
                self.chunks
                    .entry(c.id)
                    .or_insert(StoredChunk::from_toc(pack, &c.toc_entry()));
            }
            for (d, desc) in &img.packs {
                self.packs
                    .entry(*d)
                    .or_insert((PackSource::Store(si), desc.size));
            }
        }
        self.stores.push(store);
        Ok(self.chunks.len() - before)
    }
}

impl Dictionary {
    /// Add chunks that the destination registry's chunk index reported; their packs are
    /// mounted from `repository` (a sibling of `dst`) when the image is published.
    fn add_remote(
        &mut self,
        dst: &dyn Store,
        found: &[(Digest, RemoteChunk)],
    ) -> Result<(), ConvertError> {
        for (id, c) in found {
            let si = match self.remote_repos.get(&c.repository) {
                Some(i) => *i,
                None => {
                    let store = dst.sibling(&c.repository).ok_or_else(|| {
                        ConvertError::Internal(
                            "chunk index answer from a store without siblings".into(),
                        )
                    })?;
                    self.stores.push(store);
                    self.remote_repos
                        .insert(c.repository.clone(), self.stores.len() - 1);
                    self.stores.len() - 1
                }
            };
            self.chunks.entry(*id).or_insert(StoredChunk {
                pack: c.pack,
                offset: c.offset,
                stored_len: c.stored_len,
                frame_len: c.frame_len,
                inner: c.inner,
                len: c.len,
                raw: c.raw,
            });
            self.packs
                .entry(c.pack)
                .or_insert((PackSource::Store(si), c.pack_size));
        }
        Ok(())
    }
}

/// Figures for one converted image (one platform).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageReport {
    pub platform: Option<String>,
    pub manifest: String,
    pub source_manifest: String,
    pub layers: usize,
    pub layers_from_cache: usize,
    pub source_layer_bytes: u64,
    pub tar_bytes: u64,
    pub entries: usize,
    pub file_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
    pub new_stored_bytes: u64,
    /// Chunks (and their uncompressed bytes) the destination registry already held.
    pub registry_dedup_chunks: u64,
    pub registry_dedup_bytes: u64,
    pub index_bytes: u64,
    pub packs: usize,
    pub seconds: f64,
}

/// Figures for a whole conversion.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Digest of what was tagged at the destination (manifest or index).
    pub digest: String,
    pub images: Vec<ImageReport>,
}

/// A converted layer as cached on disk (keyed by layer digest and parameters).
#[derive(Serialize, Deserialize)]
struct CachedLayer {
    entries: Vec<LayerEntry>,
    chunks: Vec<(Digest, StoredChunk)>,
    packs: Vec<(Digest, u64)>,
    tar_bytes: u64,
}

fn cache_key(layer: &Digest, opts: &Options) -> Digest {
    Digest::of(
        format!(
            "tessera-layer-v{FORMAT_VERSION}|{layer}|{}|zstd{}",
            chunker::params_string(),
            opts.zstd_level
        )
        .as_bytes(),
    )
}

/// Converts images from `src` into `dst`.
pub struct Converter<'a> {
    pub src: &'a dyn Store,
    pub dst: &'a dyn Store,
    pub dict: &'a mut Dictionary,
    pub opts: Options,
    pub progress: MultiProgress,
}

fn pstyle() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// Blob reader that advances a progress bar.
struct ProgressRead<R> {
    inner: R,
    bar: ProgressBar,
}
impl<R: Read> Read for ProgressRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

impl<'a> Converter<'a> {
    /// Drop from this layer's new packs every chunk the destination registry already
    /// holds (its global chunk index); the index then points at the registry's packs.
    fn dedup_with_destination(
        &mut self,
        out: &mut layer::LayerOutput,
        staging: &Path,
        rep: &mut ImageReport,
    ) -> Result<(), ConvertError> {
        if !self.opts.global_dedup || out.new_chunks.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<Digest> = out.new_chunks.keys().copied().collect();
        ids.sort();
        let Some(answers) = self.dst.query_chunks(&ids)? else {
            return Ok(());
        };
        let found: Vec<(Digest, RemoteChunk)> = ids
            .iter()
            .zip(answers)
            .filter_map(|(id, a)| a.map(|a| (*id, a)))
            .filter(|(id, a)| out.new_chunks.get(id).is_some_and(|c| c.len == a.len))
            .collect();
        if found.is_empty() {
            return Ok(());
        }
        self.dict.add_remote(self.dst, &found)?;
        let drop: std::collections::HashSet<Digest> = found.iter().map(|(id, _)| *id).collect();
        let (packs, located) =
            layer::drop_chunks(staging, &out.packs, &drop, self.opts.zstd_level)?;
        let dropped_bytes: u64 = found.iter().map(|(_, c)| u64::from(c.len)).sum();
        out.packs = packs;
        out.new_chunks = located;
        out.stats.new_chunks = out.new_chunks.len() as u64;
        out.stats.new_bytes = out.stats.new_bytes.saturating_sub(dropped_bytes);
        // Each frame once, however many chunks it holds.
        out.stats.new_stored_bytes = out
            .new_chunks
            .values()
            .map(|c| ((c.pack, c.offset), c.stored_len))
            .collect::<HashMap<_, _>>()
            .values()
            .map(|&n| u64::from(n))
            .sum();
        rep.registry_dedup_chunks += found.len() as u64;
        rep.registry_dedup_bytes += dropped_bytes;
        tracing::info!(
            chunks = found.len(),
            bytes = dropped_bytes,
            "chunks already in the destination registry"
        );
        Ok(())
    }

    /// Convert the image `src_ref` and tag the result `dst_tag` at the destination.
    pub fn convert(
        &mut self,
        src_ref: &str,
        dst_tag: Option<&str>,
    ) -> Result<Report, ConvertError> {
        let raw = self.src.manifest(src_ref)?;
        let subject = Descriptor::new(&raw.media_type, &raw.digest, raw.bytes.len() as u64);
        match manifest::parse(&raw.bytes, &raw.media_type)? {
            Parsed::Image(m) => {
                let (desc, bytes, rep) = self.convert_image(&m, &subject)?;
                let digest = self.dst.put_manifest(dst_tag, &bytes, &desc.media_type)?;
                Ok(Report {
                    digest: digest.to_string(),
                    images: vec![rep],
                })
            }
            Parsed::Index(ix) => self.convert_index(&ix, &subject, dst_tag),
        }
    }

    fn convert_index(
        &mut self,
        ix: &ImageIndex,
        subject: &Descriptor,
        dst_tag: Option<&str>,
    ) -> Result<Report, ConvertError> {
        let mut out = Vec::new();
        let mut reports = Vec::new();
        let mut children = Vec::new();
        for child in &ix.manifests {
            let Some(p) = &child.platform else { continue };
            let plat = format!("{}/{}", p.os, p.architecture);
            if p.os == "unknown"
                || self
                    .opts
                    .platform
                    .as_deref()
                    .is_some_and(|want| want != plat)
            {
                continue;
            }
            let raw = self.src.manifest(&child.digest)?;
            let Parsed::Image(m) = manifest::parse(&raw.bytes, &raw.media_type)? else {
                return Err(ConvertError::Oci(OciError::Unsupported(
                    "nested image indexes".into(),
                )));
            };
            let child_subject =
                Descriptor::new(&raw.media_type, &raw.digest, raw.bytes.len() as u64);
            let (mut desc, bytes, mut rep) = self.convert_image(&m, &child_subject)?;
            // Manifests are put only once every platform converted (nothing visible on failure).
            children.push((bytes, desc.media_type.clone()));
            desc.platform = Some(p.clone());
            rep.platform = Some(plat);
            out.push(desc);
            reports.push(rep);
        }
        if out.is_empty() {
            return Err(ConvertError::Oci(OciError::NotFound(format!(
                "no image for platform {} in the source index",
                self.opts.platform.as_deref().unwrap_or("(any)")
            ))));
        }
        let index = ImageIndex {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.into()),
            artifact_type: Some(media::ARTIFACT_TYPE.into()),
            manifests: out,
            subject: Some(subject.clone()),
            annotations: BTreeMap::new(),
        };
        let bytes = manifest::to_bytes(&index)?;
        for (b, mt) in &children {
            self.dst.put_manifest(None, b, mt)?;
        }
        let digest = self.dst.put_manifest(dst_tag, &bytes, media::OCI_INDEX)?;
        Ok(Report {
            digest: digest.to_string(),
            images: reports,
        })
    }

    /// Convert one image manifest; publishes blobs, returns the manifest (not yet put).
    fn convert_image(
        &mut self,
        m: &ImageManifest,
        subject: &Descriptor,
    ) -> Result<(Descriptor, Vec<u8>, ImageReport), ConvertError> {
        let t0 = Instant::now();
        let mut rep = ImageReport {
            source_manifest: subject.digest.clone(),
            layers: m.layers.len(),
            ..Default::default()
        };
        let staging = Staging::new(
            self.opts.staging_dir.as_deref(),
            self.dst.staging_dir().as_deref(),
        )?;

        let mut tree = MergedTree::new();
        let mut local: HashMap<Digest, StoredChunk> = HashMap::new();
        let mut staged: HashMap<Digest, u64> = HashMap::new();
        let mut at_dst: HashMap<Digest, u64> = HashMap::new();
        for (i, l) in m.layers.iter().enumerate() {
            let Some(comp) = media::layer_compression(&l.media_type) else {
                return Err(ConvertError::Oci(OciError::Unsupported(format!(
                    "layer {i} has media type {:?}; tessera reads tar layers (uncompressed, gzip or zstd)",
                    l.media_type
                ))));
            };
            let ld = l.sha256()?;
            rep.source_layer_bytes += l.size;
            let key = cache_key(&ld, &self.opts);
            if let Some(cached) = self.load_cached(&key)? {
                tree.apply(&cached.entries)?;
                for (id, loc) in cached.chunks {
                    local.entry(id).or_insert(loc);
                }
                for (p, size) in cached.packs {
                    at_dst.insert(p, size);
                }
                rep.tar_bytes += cached.tar_bytes;
                rep.layers_from_cache += 1;
                continue;
            }
            let bar = self.progress.add(ProgressBar::new(l.size));
            bar.set_style(pstyle());
            bar.set_prefix(format!("layer {}/{}", i + 1, m.layers.len()));
            bar.set_message(l.digest[7..19].to_string());
            let blob = Box::new(ProgressRead {
                inner: self.src.open_blob(&ld, l.size)?,
                bar: bar.clone(),
            });
            let dict = &self.dict.chunks;
            let local_ref = &local;
            let known = move |d: &Digest| dict.contains_key(d) || local_ref.contains_key(d);
            let mut out = layer::convert_layer(
                blob,
                comp,
                &known,
                staging.path(),
                self.opts.threads,
                self.opts.zstd_level,
            )
            .map_err(|e| match e {
                ConvertError::BadLayer(why) => {
                    ConvertError::BadLayer(format!("layer {i} ({}): {why}", l.digest))
                }
                other => other,
            })?;
            bar.finish_and_clear();
            self.dedup_with_destination(&mut out, staging.path(), &mut rep)?;
            tracing::info!(layer = i, digest = %l.digest, tar_bytes = out.stats.tar_bytes, new_chunks = out.stats.new_chunks, elapsed_ms = t0.elapsed().as_millis() as u64, "layer converted");
            tree.apply(&out.entries)?;
            rep.tar_bytes += out.stats.tar_bytes;
            rep.new_chunks += out.stats.new_chunks;
            rep.new_bytes += out.stats.new_bytes;
            rep.new_stored_bytes += out.stats.new_stored_bytes;
            // Chunks of this layer (new or known) for the cache record.
            let mut layer_chunks: BTreeMap<Digest, StoredChunk> = BTreeMap::new();
            for (id, loc) in &out.new_chunks {
                local.insert(*id, *loc);
            }
            for e in &out.entries {
                if let tree::LayerOp::Node(n) = &e.op {
                    if let tessera_format::index::TreeKind::File { chunks, .. } = &n.kind {
                        for c in chunks {
                            if let Some(loc) = local.get(c).or_else(|| self.dict.chunks.get(c)) {
                                layer_chunks.insert(*c, *loc);
                            }
                        }
                    }
                }
            }
            for (p, size) in &out.packs {
                staged.insert(*p, *size);
            }
            let packs_of_layer: Vec<(Digest, u64)> = layer_chunks
                .values()
                .map(|c| c.pack)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .filter_map(|p| {
                    staged
                        .get(&p)
                        .or_else(|| at_dst.get(&p))
                        .or_else(|| self.dict.packs.get(&p).map(|x| &x.1))
                        .map(|s| (p, *s))
                })
                .collect();
            self.store_cached(
                &key,
                &CachedLayer {
                    entries: out.entries,
                    chunks: layer_chunks.into_iter().collect(),
                    packs: packs_of_layer,
                    tar_bytes: out.stats.tar_bytes,
                },
            );
        }

        tracing::info!(
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "layers done, building the index"
        );
        let index = build_index(&tree.map, &|d| {
            local.get(d).or_else(|| self.dict.chunks.get(d)).copied()
        })?;
        let index_bytes = index.encode()?;
        let index_digest = Digest::of(&index_bytes);
        rep.entries = index.entries.len();
        rep.file_bytes = index.file_bytes();
        rep.chunks = index.chunks.len() as u64;
        rep.index_bytes = index_bytes.len() as u64;
        rep.packs = index.packs.len();

        // Publish: packs, config, index. The manifest is put by the caller.
        let mut layers = Vec::with_capacity(index.packs.len() + 1);
        let mut idesc = Descriptor::new(
            media::INDEX_MEDIA_TYPE,
            &index_digest,
            index_bytes.len() as u64,
        );
        idesc
            .annotations
            .insert(media::ANN_ENTRIES.into(), index.entries.len().to_string());
        idesc
            .annotations
            .insert(media::ANN_FILE_BYTES.into(), index.file_bytes().to_string());
        layers.push(idesc);
        let mut published: HashMap<Digest, u64> = HashMap::new();
        for p in &index.packs {
            let size = if let Some(size) = staged.get(p) {
                self.dst
                    .put_blob_file(p, *size, &staging.path().join(p.hex()))?;
                *size
            } else if let Some(size) = at_dst.get(p) {
                if !self.dst.has_blob(p)? {
                    return Err(ConvertError::Internal(format!(
                        "cached layer refers to pack {p}, missing at the destination"
                    )));
                }
                *size
            } else if let Some((src, size)) = self.dict.packs.get(p) {
                if let PackSource::Store(i) = src {
                    self.dst
                        .copy_blob_from(self.dict.stores[*i].as_ref(), p, *size)?;
                }
                *size
            } else {
                return Err(ConvertError::Internal(format!("no source for pack {p}")));
            };
            layers.push(Descriptor::new(media::PACK_MEDIA_TYPE, p, size));
            published.insert(*p, size);
        }
        tracing::info!(
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "packs published"
        );
        let config = self.read_small_blob(&m.config)?;
        self.dst.put_blob_bytes(&m.config.sha256()?, &config)?;
        self.dst.put_blob_bytes(&index_digest, &index_bytes)?;

        // What this image published is now at the destination: later images reuse it.
        // Only packs of the index were published (a pack whose chunks were all deleted
        // by a later layer was not), so only their chunks enter the dictionary.
        for (id, loc) in &local {
            if published.contains_key(&loc.pack) {
                self.dict.chunks.entry(*id).or_insert(*loc);
            }
        }
        for (p, size) in &published {
            self.dict
                .packs
                .entry(*p)
                .or_insert((PackSource::Destination, *size));
        }

        let mut annotations = BTreeMap::new();
        annotations.insert(
            media::ANN_FORMAT_VERSION.to_string(),
            FORMAT_VERSION.to_string(),
        );
        annotations.insert(media::ANN_CHUNKER.to_string(), chunker::params_string());
        let out = ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            artifact_type: Some(media::ARTIFACT_TYPE.into()),
            config: m.config.clone(),
            layers,
            subject: Some(Descriptor::new(
                &subject.media_type,
                &subject.sha256()?,
                subject.size,
            )),
            annotations,
        };
        let bytes = manifest::to_bytes(&out)?;
        let desc = Descriptor::new(media::OCI_MANIFEST, &Digest::of(&bytes), bytes.len() as u64);
        drop(staging);
        rep.manifest = desc.digest.clone();
        rep.seconds = t0.elapsed().as_secs_f64();
        Ok((desc, bytes, rep))
    }

    fn read_small_blob(&self, d: &Descriptor) -> Result<Vec<u8>, ConvertError> {
        if d.size > 64 << 20 {
            return Err(ConvertError::Oci(OciError::Manifest(format!(
                "config blob of {} bytes is too large",
                d.size
            ))));
        }
        let mut buf = Vec::with_capacity(d.size as usize);
        self.src
            .open_blob(&d.sha256()?, d.size)?
            .read_to_end(&mut buf)
            .map_err(|e| ConvertError::Io {
                context: format!("reading config {}", d.digest),
                source: e,
            })?;
        Ok(buf)
    }

    fn load_cached(&self, key: &Digest) -> Result<Option<CachedLayer>, ConvertError> {
        let Some(dir) = &self.opts.cache_dir else {
            return Ok(None);
        };
        let path = dir.join("layers").join(key.hex());
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(None);
        };
        let Ok(c) = postcard::from_bytes::<CachedLayer>(&bytes) else {
            tracing::warn!(path = %path.display(), "ignoring an unreadable layer cache record");
            return Ok(None);
        };
        // Usable only if every pack it refers to is already at the destination.
        for (p, _) in &c.packs {
            if !self.dst.has_blob(p)? {
                return Ok(None);
            }
        }
        tracing::info!(layer_cache = %key, "layer already converted, reusing it");
        Ok(Some(c))
    }

    fn store_cached(&self, key: &Digest, c: &CachedLayer) {
        let Some(dir) = &self.opts.cache_dir else {
            return;
        };
        let d = dir.join("layers");
        let res = std::fs::create_dir_all(&d).and_then(|_| {
            let bytes = postcard::to_stdvec(c).map_err(std::io::Error::other)?;
            let mut tmp = tempfile::NamedTempFile::new_in(&d)?;
            std::io::Write::write_all(&mut tmp, &bytes)?;
            tmp.persist(d.join(key.hex())).map_err(|e| e.error)?;
            Ok(())
        });
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not write the layer cache");
        }
    }
}

/// The staging directory of one conversion: a fresh directory of its own, removed when
/// dropped (on success and on failure alike). It is made in `--staging-dir`, else in the
/// destination's own staging directory (an OCI layout's `.tessera-staging`, removed once
/// empty — it is tessera's), else in the system temp dir. Only what this conversion
/// created is ever removed: never a directory it was given or found.
struct Staging {
    dir: Option<tempfile::TempDir>,
    /// The parent, when this conversion created it (removed if empty).
    made_parent: Option<PathBuf>,
}

impl Staging {
    fn new(given: Option<&Path>, destination: Option<&Path>) -> Result<Staging, ConvertError> {
        let io = |context: String| move |source| ConvertError::Io { context, source };
        let (parent, ours) = match (given, destination) {
            (Some(d), _) => (d, false),
            (None, Some(d)) => (d, true),
            (None, None) => {
                let dir = tempfile::tempdir().map_err(io("creating a staging directory".into()))?;
                return Ok(Staging {
                    dir: Some(dir),
                    made_parent: None,
                });
            }
        };
        // Another conversion may remove an empty parent at any moment: retry then.
        let mut made = false;
        for _ in 0..8 {
            if !parent.exists() {
                match std::fs::create_dir(parent) {
                    Ok(()) => made = true,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        std::fs::create_dir_all(parent)
                            .map_err(io(format!("creating {}", parent.display())))?;
                        made = true;
                    }
                    Err(e) => return Err(io(format!("creating {}", parent.display()))(e)),
                }
            }
            match tempfile::tempdir_in(parent) {
                Ok(dir) => {
                    return Ok(Staging {
                        dir: Some(dir),
                        made_parent: (ours || made).then(|| parent.to_path_buf()),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    if made {
                        let _ = std::fs::remove_dir(parent);
                    }
                    return Err(io(format!(
                        "creating a staging directory in {}",
                        parent.display()
                    ))(e));
                }
            }
        }
        Err(ConvertError::Io {
            context: format!("creating a staging directory in {}", parent.display()),
            source: std::io::Error::other("its parent kept disappearing"),
        })
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new(""), |d| d.path())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        drop(self.dir.take());
        if let Some(p) = &self.made_parent {
            // Only when empty: a concurrent conversion may be staging there.
            let _ = std::fs::remove_dir(p);
        }
    }
}
