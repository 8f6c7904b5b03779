//! The node store: chunks shared by every mount on the node, content-addressed by their
//! sha256 under `DIR/<2 hex>/<hex>` (uncompressed). A chunk becomes visible only after it
//! was verified, written and synced (temp file + rename); every read is verified again,
//! so a corrupt file is dropped and refetched, never served.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use tessera_format::Digest;

pub struct NodeStore {
    dir: PathBuf,
}

impl NodeStore {
    pub fn open(dir: &Path) -> io::Result<NodeStore> {
        fs::create_dir_all(dir.join("tmp"))?;
        // Temp files of a writer that died are never referenced.
        for e in fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        Ok(NodeStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &Digest) -> PathBuf {
        let h = id.hex();
        self.dir.join(&h[..2]).join(h)
    }

    /// The chunk's bytes if the store holds a verified copy.
    pub fn get(&self, id: &Digest) -> Option<Vec<u8>> {
        let p = self.path(id);
        let mut buf = Vec::new();
        File::open(&p).ok()?.read_to_end(&mut buf).ok()?;
        if Digest::of(&buf) != *id {
            tracing::warn!(chunk = %id, path = %p.display(), "corrupt chunk in the node store; removed, will refetch");
            let _ = fs::remove_file(&p);
            return None;
        }
        Some(buf)
    }

    /// Store verified bytes (the caller checked `Digest::of(data) == id`).
    pub fn put(&self, id: &Digest, data: &[u8]) -> io::Result<()> {
        let p = self.path(id);
        if p.exists() {
            return Ok(());
        }
        let dir = p.parent().unwrap_or(&self.dir);
        fs::create_dir_all(dir)?;
        let mut tmp = tempfile_in(&self.dir.join("tmp"))?;
        tmp.1.write_all(data)?;
        tmp.1.sync_data()?;
        fs::rename(&tmp.0, &p)
    }
}

fn tempfile_in(dir: &Path) -> io::Result<(PathBuf, File)> {
    for n in 0..100u32 {
        let p = dir.join(format!(
            "{}-{n}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        match fs::OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(
        "cannot create a temporary file in the node store",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_put_get_and_corruption_dropped() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let data = b"chunk bytes".to_vec();
        let id = Digest::of(&data);
        assert!(s.get(&id).is_none());
        s.put(&id, &data).unwrap();
        assert_eq!(s.get(&id).unwrap(), data);
        std::fs::write(s.path(&id), b"tampered").unwrap();
        assert!(s.get(&id).is_none(), "corrupt chunk served");
        assert!(!s.path(&id).exists());
    }
}
