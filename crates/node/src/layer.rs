//! Unpacking one OCI layer (tar, gzip or zstd) into a directory in overlayfs's own
//! format: a whiteout `.wh.NAME` becomes a 0/0 character device `NAME`, an opaque marker
//! `.wh..wh..opq` the `trusted.overlay.opaque` xattr of its directory. This is how a
//! placeholder layer of a twin-backed image becomes a real parent when a plain image
//! builds on it.

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use crate::NodeError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How a layer blob is compressed, from its media type.
pub fn compression(media_type: &str) -> Result<Compression, NodeError> {
    let m = media_type;
    if m.ends_with("+gzip") || m.ends_with(".gzip") {
        Ok(Compression::Gzip)
    } else if m.ends_with("+zstd") || m.ends_with(".zstd") {
        Ok(Compression::Zstd)
    } else if m.ends_with(".tar") || m.ends_with("diff.tar") {
        Ok(Compression::None)
    } else {
        Err(NodeError::BadInput(format!(
            "layer media type {m:?} is not a tar layer this node can unpack"
        )))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Unpack the layer in `blob` into `dst` (which must exist and be empty), then read the
/// blob to its end so that a verifying reader checks its digest. Returns the number of
/// tar entries.
pub fn unpack(blob: Box<dyn Read + Send>, comp: Compression, dst: &Path) -> Result<u64, NodeError> {
    let buffered = io::BufReader::with_capacity(1 << 20, blob);
    let bad = |e: io::Error| NodeError::BadInput(format!("layer data: {e}"));
    match comp {
        Compression::None => {
            let mut r = buffered;
            let n = apply(&mut r, dst)?;
            io::copy(&mut r, &mut io::sink()).map_err(bad)?;
            Ok(n)
        }
        Compression::Gzip => {
            let mut r = flate2::bufread::MultiGzDecoder::new(buffered);
            let n = apply(&mut r, dst)?;
            io::copy(&mut r, &mut io::sink()).map_err(bad)?;
            io::copy(&mut r.into_inner(), &mut io::sink()).map_err(bad)?;
            Ok(n)
        }
        Compression::Zstd => {
            let mut r = zstd::stream::read::Decoder::with_buffer(buffered).map_err(bad)?;
            let n = apply(&mut r, dst)?;
            io::copy(&mut r, &mut io::sink()).map_err(bad)?;
            io::copy(&mut r.finish(), &mut io::sink()).map_err(bad)?;
            Ok(n)
        }
    }
}

/// The member's path relative to the layer root, refusing `..`.
fn relative(p: &Path) -> Result<PathBuf, NodeError> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(NodeError::BadInput(format!(
                    "layer member {} leaves the layer",
                    p.display()
                )))
            }
        }
    }
    Ok(out)
}

fn apply(r: &mut dyn Read, dst: &Path) -> Result<u64, NodeError> {
    let io_err = |what: String| {
        move |e: io::Error| NodeError::Io {
            context: what,
            source: e,
        }
    };
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    let mut n = 0u64;
    let entries = ar
        .entries()
        .map_err(|e| NodeError::BadInput(format!("layer is not a tar stream: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| NodeError::BadInput(format!("layer tar: {e}")))?;
        n += 1;
        let path = entry
            .path()
            .map_err(|e| NodeError::BadInput(format!("layer member name: {e}")))?
            .into_owned();
        let rel = relative(&path)?;
        let Some(name) = rel.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue; // the root itself
        };
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if name == OPAQUE_MARKER {
            let d = dst.join(&parent);
            std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
            rustix::fs::setxattr(
                &d,
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| NodeError::Io {
                context: format!("marking {} opaque", d.display()),
                source: e.into(),
            })?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let d = dst.join(&parent);
            std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
            let target = d.join(hidden);
            if let Ok(m) = std::fs::symlink_metadata(&target) {
                let _ = if m.is_dir() {
                    std::fs::remove_dir_all(&target)
                } else {
                    std::fs::remove_file(&target)
                };
            }
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &target,
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::empty(),
                0,
            )
            .map_err(|e| NodeError::Io {
                context: format!("creating the whiteout {}", target.display()),
                source: e.into(),
            })?;
            continue;
        }
        entry.unpack_in(dst).map_err(|e| {
            let why = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            NodeError::BadInput(format!("unpacking {}: {e}{why}", rel.display()))
        })?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let t = tar_of(&[("etc/a", b"one"), ("etc/.wh.gone", b""), ("usr/x", b"2")]);
        let n = unpack(Box::new(io::Cursor::new(t)), Compression::None, d.path()).unwrap();
        assert_eq!(n, 3);
        assert_eq!(std::fs::read(d.path().join("etc/a")).unwrap(), b"one");
        let w = std::fs::symlink_metadata(d.path().join("etc/gone")).unwrap();
        assert!(w.file_type().is_char_device());
        assert!(!d.path().join("etc/.wh.gone").exists());
    }

    #[test]
    fn members_that_leave_the_layer_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // tar::Builder refuses `..` itself: write the name into the header by hand.
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let t = b.into_inner().unwrap();
        let d = tempfile::tempdir().unwrap();
        let e = unpack(Box::new(io::Cursor::new(t)), Compression::None, d.path()).unwrap_err();
        assert!(e.to_string().contains("leaves the layer"), "{e}");
    }

    #[test]
    fn media_types() {
        assert_eq!(
            compression("application/vnd.oci.image.layer.v1.tar+gzip").unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            compression("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            compression("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            compression("application/vnd.oci.image.layer.v1.tar").unwrap(),
            Compression::None
        );
        assert!(compression("application/vnd.tessera.pack.v1").is_err());
    }

    #[test]
    fn corrupt_gzip_is_an_error_not_a_partial_tree_claimed_whole() {
        let d = tempfile::tempdir().unwrap();
        let e = unpack(
            Box::new(io::Cursor::new(b"\x1f\x8bnot really gzip".to_vec())),
            Compression::Gzip,
            d.path(),
        );
        assert!(e.is_err());
    }
}
