//! Blob storage. `Backend` is the seam where a shared object store can replace the
//! local filesystem: blobs are content-addressed (get, range get, put, list, delete)
//! and upload sessions live in the backend too, so any replica can continue them.

use crate::error::StoreError;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tessera_format::{Algorithm, OciDigest};

pub trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

/// Appends to an upload session. Dropping it without `commit` keeps what was written;
/// `abort` truncates back to where it started.
pub trait UploadWriter: Write + Send {
    /// Flush; returns the session's new size.
    fn commit(self: Box<Self>) -> Result<u64, StoreError>;
    fn abort(self: Box<Self>);
}

pub trait Backend: Send + Sync + 'static {
    /// Size of a stored blob, or None.
    fn stat(&self, d: &OciDigest) -> Result<Option<u64>, StoreError>;
    /// A reader positioned at `offset`.
    fn open(&self, d: &OciDigest, offset: u64) -> Result<Box<dyn Read + Send>, StoreError>;
    /// A seekable reader (pack verification reads the table of contents first).
    fn open_seekable(&self, d: &OciDigest) -> Result<Box<dyn ReadSeek>, StoreError>;
    /// Store small content (manifests) atomically and durably.
    fn put(&self, d: &OciDigest, data: &[u8]) -> Result<(), StoreError>;
    fn delete(&self, d: &OciDigest) -> Result<bool, StoreError>;
    fn list(&self) -> Result<Vec<OciDigest>, StoreError>;

    fn upload_create(&self, id: &str) -> Result<(), StoreError>;
    fn upload_size(&self, id: &str) -> Result<Option<u64>, StoreError>;
    /// A writer appending at `offset`, which must equal the current size.
    fn upload_append(&self, id: &str, offset: u64) -> Result<Box<dyn UploadWriter>, StoreError>;
    /// A reader of the session's bytes from `offset`. It keeps reading the same bytes
    /// after the session is committed (pull-through followers rely on that).
    fn upload_read(&self, id: &str, offset: u64) -> Result<Box<dyn Read + Send>, StoreError>;
    /// Make the session's bytes the blob `d` (already verified by the caller), durably.
    fn upload_commit(&self, id: &str, d: &OciDigest) -> Result<(), StoreError>;
    fn upload_delete(&self, id: &str) -> Result<(), StoreError>;
    /// Every session with its last modification time (for expiry).
    fn upload_list(&self) -> Result<Vec<(String, SystemTime)>, StoreError>;
}

/// Blobs under `ROOT/blobs/<alg>/<2 hex>/<hex>`, sessions under `ROOT/uploads/<id>`.
pub struct FsBackend {
    root: PathBuf,
}

impl FsBackend {
    pub fn open(root: &Path) -> Result<FsBackend, StoreError> {
        for d in ["blobs/sha256", "blobs/sha512", "uploads", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| StoreError::io(p.display(), e))?;
        }
        // Leftovers of an interrupted `put` are never visible; remove them.
        if let Ok(rd) = fs::read_dir(root.join("tmp")) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(FsBackend {
            root: root.to_path_buf(),
        })
    }

    pub fn blob_path(&self, d: &OciDigest) -> PathBuf {
        let hex = d.hex();
        self.root
            .join("blobs")
            .join(d.algorithm().name())
            .join(&hex[..2])
            .join(hex)
    }

    fn upload_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        // Session ids are server-made UUIDs; anything else cannot name a file here.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(StoreError::io(
                id,
                io::Error::new(io::ErrorKind::InvalidInput, "bad session id"),
            ));
        }
        Ok(self.root.join("uploads").join(id))
    }

    fn publish(&self, src: &Path, d: &OciDigest) -> Result<(), StoreError> {
        let dst = self.blob_path(d);
        let dir = dst.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| StoreError::io(dir.display(), e))?;
        fs::rename(src, &dst).map_err(|e| StoreError::io(dst.display(), e))?;
        sync_dir(&dir)
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io(dir.display(), e))
}

fn not_found_is_none<T>(r: io::Result<T>, path: &Path) -> Result<Option<T>, StoreError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(path.display(), e)),
    }
}

struct FsUpload {
    file: io::BufWriter<File>,
    start: u64,
    path: PathBuf,
}

impl Write for FsUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl UploadWriter for FsUpload {
    fn commit(mut self: Box<Self>) -> Result<u64, StoreError> {
        self.file
            .flush()
            .map_err(|e| StoreError::io(self.path.display(), e))?;
        self.file
            .get_ref()
            .metadata()
            .map(|m| m.len())
            .map_err(|e| StoreError::io(self.path.display(), e))
    }
    fn abort(mut self: Box<Self>) {
        let _ = self.file.flush();
        let _ = self.file.get_ref().set_len(self.start);
    }
}

impl Backend for FsBackend {
    fn stat(&self, d: &OciDigest) -> Result<Option<u64>, StoreError> {
        let p = self.blob_path(d);
        Ok(not_found_is_none(fs::metadata(&p), &p)?.map(|m| m.len()))
    }

    fn open(&self, d: &OciDigest, offset: u64) -> Result<Box<dyn Read + Send>, StoreError> {
        let p = self.blob_path(d);
        let mut f = not_found_is_none(File::open(&p), &p)?
            .ok_or_else(|| StoreError::MissingBlob(d.to_string()))?;
        if offset > 0 {
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| StoreError::io(p.display(), e))?;
        }
        Ok(Box::new(f))
    }

    fn open_seekable(&self, d: &OciDigest) -> Result<Box<dyn ReadSeek>, StoreError> {
        let p = self.blob_path(d);
        let f = not_found_is_none(File::open(&p), &p)?
            .ok_or_else(|| StoreError::MissingBlob(d.to_string()))?;
        Ok(Box::new(io::BufReader::with_capacity(1 << 20, f)))
    }

    fn put(&self, d: &OciDigest, data: &[u8]) -> Result<(), StoreError> {
        if self.stat(d)? == Some(data.len() as u64) {
            return Ok(());
        }
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(tmp.display(), e));
        }
        self.publish(&tmp, d)
    }

    fn delete(&self, d: &OciDigest) -> Result<bool, StoreError> {
        let p = self.blob_path(d);
        Ok(not_found_is_none(fs::remove_file(&p), &p)?.is_some())
    }

    fn list(&self) -> Result<Vec<OciDigest>, StoreError> {
        let mut out = Vec::new();
        for algo in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.root.join("blobs").join(algo.name());
            let rd = fs::read_dir(&dir).map_err(|e| StoreError::io(dir.display(), e))?;
            for sub in rd.flatten() {
                let Ok(files) = fs::read_dir(sub.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let name = f.file_name();
                    let name = name.to_string_lossy();
                    if let Ok(d) = OciDigest::parse(&format!("{}:{name}", algo.name())) {
                        out.push(d);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn upload_create(&self, id: &str) -> Result<(), StoreError> {
        let p = self.upload_path(id)?;
        File::create(&p).map_err(|e| StoreError::io(p.display(), e))?;
        Ok(())
    }

    fn upload_size(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let p = self.upload_path(id)?;
        Ok(not_found_is_none(fs::metadata(&p), &p)?.map(|m| m.len()))
    }

    fn upload_append(&self, id: &str, offset: u64) -> Result<Box<dyn UploadWriter>, StoreError> {
        let p = self.upload_path(id)?;
        let f = OpenOptions::new()
            .append(true)
            .open(&p)
            .map_err(|e| StoreError::io(p.display(), e))?;
        let len = f
            .metadata()
            .map_err(|e| StoreError::io(p.display(), e))?
            .len();
        if len != offset {
            return Err(StoreError::io(
                p.display(),
                io::Error::other(format!("session is at {len}, not {offset}")),
            ));
        }
        Ok(Box::new(FsUpload {
            file: io::BufWriter::with_capacity(1 << 20, f),
            start: offset,
            path: p,
        }))
    }

    fn upload_read(&self, id: &str, offset: u64) -> Result<Box<dyn Read + Send>, StoreError> {
        let p = self.upload_path(id)?;
        let mut f = File::open(&p).map_err(|e| StoreError::io(p.display(), e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| StoreError::io(p.display(), e))?;
        Ok(Box::new(io::BufReader::with_capacity(1 << 20, f)))
    }

    fn upload_commit(&self, id: &str, d: &OciDigest) -> Result<(), StoreError> {
        let p = self.upload_path(id)?;
        if self.stat(d)?.is_some() {
            // Same digest, same bytes: keep the stored copy.
            return self.upload_delete(id);
        }
        File::open(&p)
            .and_then(|f| f.sync_data())
            .map_err(|e| StoreError::io(p.display(), e))?;
        self.publish(&p, d)
    }

    fn upload_delete(&self, id: &str) -> Result<(), StoreError> {
        let p = self.upload_path(id)?;
        not_found_is_none(fs::remove_file(&p), &p)?;
        Ok(())
    }

    fn upload_list(&self) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let dir = self.root.join("uploads");
        let rd = fs::read_dir(&dir).map_err(|e| StoreError::io(dir.display(), e))?;
        Ok(rd
            .flatten()
            .filter_map(|e| {
                let t = e.metadata().ok()?.modified().ok()?;
                Some((e.file_name().to_string_lossy().into_owned(), t))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_put_delete_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let b = FsBackend::open(dir.path()).unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        b.upload_create(&id).unwrap();
        let mut w = b.upload_append(&id, 0).unwrap();
        w.write_all(b"hello ").unwrap();
        assert_eq!(w.commit().unwrap(), 6);
        assert!(b.upload_append(&id, 0).is_err(), "offset must match");
        let mut w = b.upload_append(&id, 6).unwrap();
        w.write_all(b"garbage").unwrap();
        w.abort();
        assert_eq!(b.upload_size(&id).unwrap(), Some(6));
        let d = OciDigest::of(Algorithm::Sha256, b"hello ");
        b.upload_commit(&id, &d).unwrap();
        assert_eq!(b.stat(&d).unwrap(), Some(6));
        assert_eq!(b.upload_size(&id).unwrap(), None);
        let mut s = String::new();
        b.open(&d, 2).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "llo ");
        assert_eq!(b.list().unwrap(), vec![d.clone()]);
        assert!(b.delete(&d).unwrap());
        assert!(!b.delete(&d).unwrap());
        assert!(b.upload_create("../x").is_err());
    }
}
