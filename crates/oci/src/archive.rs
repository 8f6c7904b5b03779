//! `docker save` archives (read-only). The archive's `manifest.json` is turned into an
//! OCI image manifest (uncompressed tar layers) so the rest of tessera sees one shape.

use crate::verify::VerifyingReader;
use crate::{OciError, RawManifest, Result, Store};
use serde::Deserialize;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tessera_format::digest::HashingReader;
use tessera_format::{media, Digest};

#[derive(Deserialize)]
struct ArchiveManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The digest a member name claims: `<hex>.tar`, `<hex>.json` (skopeo, docker < 25) or
/// `blobs/sha256/<hex>` (docker >= 25).
fn claimed_digest(name: &str) -> Option<Digest> {
    let n = name.trim_start_matches("./");
    let hex = n
        .strip_prefix("blobs/sha256/")
        .or_else(|| n.strip_suffix(".tar"))
        .or_else(|| n.strip_suffix(".json"))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    format!("sha256:{hex}").parse().ok()
}

/// A docker-archive tarball opened for reading.
pub struct DockerArchive {
    file: PathBuf,
    /// digest → (offset of the member's data in the tarball, size)
    blobs: HashMap<Digest, (u64, u64)>,
    manifest: Vec<u8>,
}

impl DockerArchive {
    pub fn open(file: &Path) -> Result<DockerArchive> {
        let ctx = |e| OciError::io(format!("reading docker archive {}", file.display()), e);
        let f = File::open(file).map_err(ctx)?;
        let mut ar = tar::Archive::new(io::BufReader::new(f));
        let mut members: HashMap<String, (u64, u64)> = HashMap::new();
        let mut manifest_json = None;
        for e in ar.entries().map_err(ctx)? {
            let mut e = e.map_err(ctx)?;
            let path = String::from_utf8_lossy(&e.path_bytes())
                .trim_start_matches("./")
                .to_string();
            if path == "manifest.json" {
                let mut b = Vec::new();
                (&mut e).take(4 << 20).read_to_end(&mut b).map_err(ctx)?;
                manifest_json = Some(b);
            } else if e.header().entry_type().is_file() {
                members.insert(path, (e.raw_file_position(), e.size()));
            }
        }
        let Some(mj) = manifest_json else {
            return Err(OciError::Manifest(format!(
                "{}: no manifest.json: not a docker-archive",
                file.display()
            )));
        };
        let list: Vec<ArchiveManifest> = serde_json::from_slice(&mj)
            .map_err(|e| OciError::Manifest(format!("{}: manifest.json: {e}", file.display())))?;
        let am = match list.as_slice() {
            [one] => one,
            _ => {
                return Err(OciError::Unsupported(format!(
                    "{}: holds {} images; only single-image archives are supported",
                    file.display(),
                    list.len()
                )))
            }
        };
        let mut blobs = HashMap::new();
        let mut hash_member = |name: &str| -> Result<(Digest, u64)> {
            let &(off, size) = members.get(name.trim_start_matches("./")).ok_or_else(|| {
                OciError::Manifest(format!(
                    "{}: manifest.json names missing member {name}",
                    file.display()
                ))
            })?;
            if let Some(d) = claimed_digest(name) {
                // Named by its digest (`docker save`, skopeo): no hashing pass here; every
                // read of the member is verified against the name, so a lie fails there.
                blobs.insert(d, (off, size));
                return Ok((d, size));
            }
            let mut f = File::open(file).map_err(ctx)?;
            f.seek(SeekFrom::Start(off)).map_err(ctx)?;
            let mut hr = HashingReader::new(io::BufReader::with_capacity(1 << 20, f.take(size)));
            io::copy(&mut hr, &mut io::sink()).map_err(ctx)?;
            let (d, n) = hr.finish();
            if n != size {
                return Err(OciError::Manifest(format!(
                    "{}: member {name} is truncated",
                    file.display()
                )));
            }
            blobs.insert(d, (off, size));
            Ok((d, size))
        };
        let (cd, cs) = hash_member(&am.config)?;
        let mut layers = Vec::new();
        for l in &am.layers {
            let (d, s) = hash_member(l)?;
            layers.push(serde_json::json!({"mediaType": media::OCI_LAYER_TAR, "digest": d.to_string(), "size": s}));
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": {"mediaType": media::OCI_CONFIG, "digest": cd.to_string(), "size": cs},
            "layers": layers,
        }))
        .map_err(|e| OciError::Manifest(e.to_string()))?;
        Ok(DockerArchive {
            file: file.to_path_buf(),
            blobs,
            manifest,
        })
    }

    fn member(&self, digest: &Digest) -> Result<(u64, u64)> {
        self.blobs
            .get(digest)
            .copied()
            .ok_or_else(|| OciError::NotFound(format!("blob {digest} in {}", self.describe())))
    }
}

impl Store for DockerArchive {
    fn describe(&self) -> String {
        format!("docker-archive:{}", self.file.display())
    }
    fn manifest(&self, reference: &str) -> Result<RawManifest> {
        let digest = Digest::of(&self.manifest);
        if !reference.is_empty() && reference != digest.to_string() && reference != "latest" {
            return Err(OciError::NotFound(format!(
                "{reference} in {}",
                self.describe()
            )));
        }
        Ok(RawManifest {
            bytes: self.manifest.clone(),
            media_type: media::OCI_MANIFEST.into(),
            digest,
        })
    }
    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>> {
        let (off, msize) = self.member(digest)?;
        let mut f = File::open(&self.file)
            .map_err(|e| OciError::io(format!("opening {}", self.file.display()), e))?;
        f.seek(SeekFrom::Start(off))
            .map_err(|e| OciError::io("seeking in the archive", e))?;
        Ok(Box::new(VerifyingReader::new(
            io::BufReader::with_capacity(1 << 20, f.take(msize)),
            *digest,
            size,
            format!("blob {digest}"),
        )))
    }
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        let (off, size) = self.member(digest)?;
        if offset.saturating_add(len) > size {
            return Err(OciError::io(
                "reading the archive",
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "range past the end of the blob",
                ),
            ));
        }
        let mut f = File::open(&self.file).map_err(|e| OciError::io("opening the archive", e))?;
        f.seek(SeekFrom::Start(off + offset))
            .map_err(|e| OciError::io("seeking in the archive", e))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf)
            .map_err(|e| OciError::io("reading the archive", e))?;
        Ok(buf)
    }
    fn has_blob(&self, digest: &Digest) -> Result<bool> {
        Ok(self.blobs.contains_key(digest))
    }
    fn put_blob_file(&self, _: &Digest, _: u64, _: &Path) -> Result<()> {
        Err(OciError::ReadOnly(self.describe()))
    }
    fn put_blob_bytes(&self, _: &Digest, _: &[u8]) -> Result<()> {
        Err(OciError::ReadOnly(self.describe()))
    }
    fn put_manifest(&self, _: Option<&str>, _: &[u8], _: &str) -> Result<Digest> {
        Err(OciError::ReadOnly(self.describe()))
    }
}
