//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/...`).
//!
//! Writes are crash-safe: blobs are written to a temporary file, synced and renamed into
//! place; `index.json` is replaced the same way, last, so a reader never sees a tag
//! pointing at a missing manifest.

use crate::verify::VerifyingReader;
use crate::{OciError, RawManifest, Result, Store};
use serde_json::{json, Value};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tessera_format::media;
use tessera_format::Digest;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout on the local filesystem.
pub struct Layout {
    dir: PathBuf,
    /// Serializes index.json updates from this process.
    index_lock: Mutex<()>,
}

impl Layout {
    /// Open an existing layout, or prepare a new one (created on first write).
    pub fn open_or_create(dir: &Path) -> Result<Layout> {
        if dir.exists()
            && !dir.join("oci-layout").exists()
            && fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
        {
            return Err(OciError::Unsupported(format!(
                "{} exists but is not an OCI image layout (no oci-layout file)",
                dir.display()
            )));
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
            index_lock: Mutex::new(()),
        })
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    fn ensure_skeleton(&self) -> Result<()> {
        let blobs = self.dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)
            .map_err(|e| OciError::io(format!("creating {}", blobs.display()), e))?;
        let ol = self.dir.join("oci-layout");
        if !ol.exists() {
            write_atomic(&ol, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        Ok(())
    }

    fn read_index(&self) -> Result<Value> {
        let p = self.dir.join("index.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| OciError::Manifest(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Ok(json!({"schemaVersion": 2, "manifests": []}))
            }
            Err(e) => Err(OciError::io(format!("reading {}", p.display()), e)),
        }
    }

    /// Tags in this layout with their manifest digests.
    pub fn tags(&self) -> Result<Vec<(String, Digest)>> {
        let idx = self.read_index()?;
        let mut out = Vec::new();
        for m in idx["manifests"].as_array().into_iter().flatten() {
            if let (Some(t), Some(d)) = (m["annotations"][REF_NAME].as_str(), m["digest"].as_str())
            {
                if let Ok(d) = d.parse() {
                    out.push((t.to_string(), d));
                }
            }
        }
        Ok(out)
    }
}

/// Write a file atomically: temp file in the same directory, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let ctx = |e| OciError::io(format!("writing {}", path.display()), e);
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(ctx)?;
    readable(tmp.as_file()).map_err(ctx)?;
    tmp.write_all(data).map_err(ctx)?;
    tmp.as_file().sync_all().map_err(ctx)?;
    tmp.persist(path).map_err(|e| ctx(e.error))?;
    sync_dir(dir);
    Ok(())
}

/// Temp files are created 0600; layout files are world-readable like any OCI layout.
fn readable(f: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(0o644))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Store for Layout {
    fn describe(&self) -> String {
        format!("oci:{}", self.dir.display())
    }

    fn staging_dir(&self) -> Option<PathBuf> {
        Some(self.dir.join(".tessera-staging"))
    }

    fn manifest(&self, reference: &str) -> Result<RawManifest> {
        let idx = self.read_index()?;
        let list = idx["manifests"].as_array().cloned().unwrap_or_default();
        let desc = if let Ok(d) = reference.parse::<Digest>() {
            list.iter()
                .find(|m| m["digest"].as_str() == Some(&d.to_string()))
                .cloned()
                .or_else(|| {
                    // Not in index.json but present as a blob (e.g. a child of an index).
                    self.blob_path(&d)
                        .exists()
                        .then(|| json!({"digest": d.to_string()}))
                })
        } else if reference.is_empty() {
            match list.as_slice() {
                [one] => Some(one.clone()),
                [] => None,
                _ => {
                    return Err(OciError::Reference(
                        self.describe(),
                        format!(
                            "the layout holds {} images: name one with oci:DIR:TAG",
                            list.len()
                        ),
                    ))
                }
            }
        } else {
            list.iter()
                .find(|m| m["annotations"][REF_NAME].as_str() == Some(reference))
                .cloned()
        };
        let Some(desc) = desc else {
            return Err(OciError::NotFound(format!(
                "{} in {}",
                if reference.is_empty() {
                    "an image"
                } else {
                    reference
                },
                self.describe()
            )));
        };
        let digest: Digest = desc["digest"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .map_err(|e| OciError::Manifest(format!("index.json: {e}")))?;
        let path = self.blob_path(&digest);
        let bytes = fs::read(&path)
            .map_err(|e| OciError::io(format!("reading manifest {}", path.display()), e))?;
        let got = Digest::of(&bytes);
        if got != digest {
            return Err(OciError::DigestMismatch {
                what: format!("manifest {}", path.display()),
                expected: digest.to_string(),
                actual: got.to_string(),
            });
        }
        let media_type = desc["mediaType"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| sniff_media_type(&bytes));
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>> {
        let p = self.blob_path(digest);
        let f = File::open(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                OciError::NotFound(format!("blob {digest} in {}", self.describe()))
            }
            _ => OciError::io(format!("opening {}", p.display()), e),
        })?;
        Ok(Box::new(VerifyingReader::new(
            io::BufReader::with_capacity(1 << 20, f),
            *digest,
            size,
            format!("blob {digest}"),
        )))
    }

    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        let p = self.blob_path(digest);
        let ctx = |e| OciError::io(format!("reading {}", p.display()), e);
        let mut f = File::open(&p).map_err(ctx)?;
        f.seek(SeekFrom::Start(offset)).map_err(ctx)?;
        let mut buf = Vec::with_capacity(len as usize);
        f.take(len).read_to_end(&mut buf).map_err(ctx)?;
        if buf.len() as u64 != len {
            return Err(OciError::io(
                format!("reading {}", p.display()),
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "range past the end of the blob",
                ),
            ));
        }
        Ok(buf)
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool> {
        Ok(self.blob_path(digest).exists())
    }

    fn put_blob_file(&self, digest: &Digest, size: u64, path: &Path) -> Result<()> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        self.ensure_skeleton()?;
        let dst = self.blob_path(digest);
        let ctx = |e| OciError::io(format!("writing {}", dst.display()), e);
        let dir = self.dir.join("blobs/sha256");
        // Same filesystem (e.g. packs staged by `staging_dir`): verify, then link into
        // place instead of copying, and make it durable once.
        let linked = dir.join(
            format!(
                ".link-{}-{}-{:?}",
                digest.hex(),
                std::process::id(),
                std::thread::current().id()
            )
            .replace(['(', ')'], ""),
        );
        let _ = fs::remove_file(&linked);
        if fs::hard_link(path, &linked).is_ok() {
            let res = (|| -> Result<()> {
                let f = File::open(&linked).map_err(ctx)?;
                readable(&f).map_err(ctx)?;
                let mut r = VerifyingReader::new(
                    io::BufReader::with_capacity(1 << 20, &f),
                    *digest,
                    size,
                    format!("blob {digest}"),
                );
                io::copy(&mut r, &mut io::sink()).map_err(ctx)?;
                f.sync_all().map_err(ctx)?;
                fs::rename(&linked, &dst).map_err(ctx)?;
                Ok(())
            })();
            if res.is_err() {
                let _ = fs::remove_file(&linked);
            }
            return res;
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(ctx)?;
        let src =
            File::open(path).map_err(|e| OciError::io(format!("opening {}", path.display()), e))?;
        let mut r = VerifyingReader::new(
            io::BufReader::with_capacity(1 << 20, src),
            *digest,
            size,
            format!("blob {digest}"),
        );
        io::copy(&mut r, &mut tmp).map_err(ctx)?;
        tmp.as_file().sync_all().map_err(ctx)?;
        tmp.persist(&dst).map_err(|e| ctx(e.error))?;
        Ok(())
    }

    fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let got = Digest::of(bytes);
        if got != *digest {
            return Err(OciError::DigestMismatch {
                what: "blob to store".into(),
                expected: digest.to_string(),
                actual: got.to_string(),
            });
        }
        if self.has_blob(digest)? {
            return Ok(());
        }
        self.ensure_skeleton()?;
        write_atomic(&self.blob_path(digest), bytes)
    }

    fn put_manifest(&self, tag: Option<&str>, bytes: &[u8], media_type: &str) -> Result<Digest> {
        let digest = Digest::of(bytes);
        self.put_blob_bytes(&digest, bytes)?;
        sync_dir(&self.dir.join("blobs/sha256"));
        let Some(t) = tag else {
            // Untagged (e.g. the per-platform children of an index): a blob reachable
            // through whatever refers to it, not an entry of index.json.
            return Ok(digest);
        };
        let _g = self.index_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut idx = self.read_index()?;
        let mut list = idx["manifests"].as_array().cloned().unwrap_or_default();
        let mut desc =
            json!({"mediaType": media_type, "digest": digest.to_string(), "size": bytes.len()});
        list.retain(|m| m["annotations"][REF_NAME].as_str() != Some(t));
        desc["annotations"] = json!({ REF_NAME: t });
        list.push(desc);
        idx["manifests"] = Value::Array(list);
        if idx.get("schemaVersion").is_none() {
            idx["schemaVersion"] = json!(2);
        }
        let out = serde_json::to_vec_pretty(&idx).map_err(|e| OciError::Manifest(e.to_string()))?;
        write_atomic(&self.dir.join("index.json"), &out)?;
        Ok(digest)
    }
}

/// Guess a manifest's media type from its `mediaType` field or shape.
pub fn sniff_media_type(bytes: &[u8]) -> String {
    let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    if let Some(m) = v["mediaType"].as_str() {
        return m.to_string();
    }
    if v.get("manifests").is_some() {
        media::OCI_INDEX.to_string()
    } else {
        media::OCI_MANIFEST.to_string()
    }
}
