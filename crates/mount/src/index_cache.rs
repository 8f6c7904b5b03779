//! Index blobs kept in the node store (`STORE/indexes/<hex>`), so that mounting an image
//! the node has mounted before does not download its index again. Every entry is checked
//! against its digest when used ([`tessera_image::TesseraImage::open_cached`]); a file
//! that does not match is removed.

use std::io::{Read, Write};
use tessera_format::Digest;
use tessera_image::IndexCache;

use crate::store::NodeStore;

impl IndexCache for NodeStore {
    fn get_index(&self, digest: &Digest) -> Option<Vec<u8>> {
        let path = self.dir().join("indexes").join(digest.hex());
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .ok()?
            .take(tessera_format::index::MAX_INDEX_BODY)
            .read_to_end(&mut bytes)
            .ok()?;
        if Digest::of(&bytes) != *digest {
            tracing::warn!(path = %path.display(), "a cached index does not match its digest; removed");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(bytes)
    }

    fn put_index(&self, digest: &Digest, bytes: &[u8]) {
        let dir = self.dir().join("indexes");
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(self.dir().join("tmp"))?;
            tmp.write_all(bytes)?;
            tmp.as_file().sync_all()?;
            tmp.persist(dir.join(digest.hex())).map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            tracing::debug!(error = %e, "cannot keep the index in the node store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_indexes_come_back_verified_and_rotten_ones_go() {
        let d = tempfile::tempdir().unwrap();
        let s = NodeStore::open(d.path()).unwrap();
        let body = b"an index body".to_vec();
        let id = Digest::of(&body);
        assert_eq!(s.get_index(&id), None);
        s.put_index(&id, &body);
        assert_eq!(s.get_index(&id), Some(body));
        std::fs::write(d.path().join("indexes").join(id.hex()), b"rotten").unwrap();
        assert_eq!(s.get_index(&id), None);
        assert!(!d.path().join("indexes").join(id.hex()).exists());
    }
}
