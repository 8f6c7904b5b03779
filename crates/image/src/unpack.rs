//! Materialize an image's rootfs on disk, verifying every chunk.
//!
//! The tree is written into a temporary sibling directory and renamed into place at the
//! end, so a failed unpack (corrupt chunk, full disk) leaves nothing at the destination.
//! Parents are always directories this function created itself, so no path is ever
//! resolved through a symlink from the image.

use crate::{ChunkReader, ImageError, Result, TesseraImage};
use indicatif::ProgressBar;
use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags, CWD,
};
use rustix::process::{Gid, Uid};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use tessera_format::index::{Meta, Node};
use tessera_oci::Store;

/// Result of an unpack.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UnpackReport {
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
    pub fetched_bytes: u64,
}

fn io_err<'a>(what: &str, path: &'a Path) -> impl Fn(rustix::io::Errno) -> ImageError + 'a {
    let what = what.to_string();
    move |e| ImageError::Io {
        context: format!("{what} {}", path.display()),
        source: e.into(),
    }
}

fn ts(m: &Meta) -> Timestamps {
    let t = Timespec {
        tv_sec: m.mtime,
        tv_nsec: m.mtime_nsec as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Whether ownership can be set (root); rootless unpacks keep the caller's ids.
fn can_chown() -> bool {
    rustix::process::geteuid().is_root()
}

fn apply_meta(path: &Path, m: &Meta, is_symlink: bool, chown: bool) -> Result<()> {
    if chown {
        rfs::chownat(
            CWD,
            path,
            Some(Uid::from_raw(m.uid)),
            Some(Gid::from_raw(m.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(io_err("chown", path))?;
    }
    for (k, v) in &m.xattrs {
        rfs::lsetxattr(path, OsStr::from_bytes(k), v, XattrFlags::empty()).map_err(|e| {
            ImageError::Io {
                context: format!(
                    "setting xattr {} on {}",
                    String::from_utf8_lossy(k),
                    path.display()
                ),
                source: e.into(),
            }
        })?;
    }
    if !is_symlink {
        // After chown: chown clears setuid/setgid.
        rfs::chmodat(CWD, path, Mode::from_raw_mode(m.mode), AtFlags::empty())
            .map_err(io_err("chmod", path))?;
    }
    rfs::utimensat(CWD, path, &ts(m), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(io_err("setting times of", path))?;
    Ok(())
}

/// Unpack `image` (read from `store`) into `dest`, which must not exist or be empty.
pub fn unpack(
    image: &TesseraImage,
    store: &dyn Store,
    dest: &Path,
    progress: &ProgressBar,
) -> Result<UnpackReport> {
    if dest.exists() {
        let empty = std::fs::read_dir(dest)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(ImageError::Other(format!(
                "{} exists and is not empty: choose a new directory",
                dest.display()
            )));
        }
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| ImageError::Io {
        context: format!("creating {}", parent.display()),
        source: e,
    })?;
    let tmp = tempfile::Builder::new()
        .prefix(".tessera-unpack-")
        .tempdir_in(&parent)
        .map_err(|e| ImageError::Io {
            context: format!("creating a temporary directory in {}", parent.display()),
            source: e,
        })?;
    let root = tmp.path().to_path_buf();
    let report = write_tree(image, store, &root, progress)?;
    if dest.exists() {
        std::fs::remove_dir(dest).map_err(|e| ImageError::Io {
            context: format!("replacing {}", dest.display()),
            source: e,
        })?;
    }
    let kept = tmp.keep();
    if let Err(e) = std::fs::rename(&kept, dest) {
        let _ = std::fs::remove_dir_all(&kept);
        return Err(ImageError::Io {
            context: format!("renaming into {}", dest.display()),
            source: e,
        });
    }
    Ok(report)
}

fn write_tree(
    image: &TesseraImage,
    store: &dyn Store,
    root: &Path,
    progress: &ProgressBar,
) -> Result<UnpackReport> {
    let idx = &image.index;
    let chown = can_chown();
    if !chown {
        tracing::warn!("not running as root: file owners are not restored");
    }
    let mut reader = ChunkReader::new(image, store);
    let mut paths: Vec<PathBuf> = Vec::with_capacity(idx.entries.len());
    let mut dirs: Vec<usize> = Vec::new();
    let mut report = UnpackReport::default();
    progress.set_length(idx.file_bytes());
    let mut inode_paths: HashMap<usize, usize> = HashMap::new();
    for (i, e) in idx.entries.iter().enumerate() {
        let path = if i == 0 {
            root.to_path_buf()
        } else {
            paths[e.parent as usize].join(OsStr::from_bytes(&e.name))
        };
        report.entries += 1;
        match &e.node {
            Node::Dir(_) => {
                if i != 0 {
                    rfs::mkdirat(CWD, &path, Mode::from_raw_mode(0o700))
                        .map_err(io_err("creating directory", &path))?;
                }
                dirs.push(i);
            }
            Node::File(m, f) => {
                let fd = rfs::openat(
                    CWD,
                    &path,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io_err("creating", &path))?;
                let mut file = std::io::BufWriter::with_capacity(1 << 20, File::from(fd));
                reader.read_chunks(&f.chunks, &mut |_, data| {
                    progress.inc(data.len() as u64);
                    file.write_all(data).map_err(|e| ImageError::Io {
                        context: format!("writing {}", path.display()),
                        source: e,
                    })
                })?;
                let file = file.into_inner().map_err(|e| ImageError::Io {
                    context: format!("writing {}", path.display()),
                    source: e.into_error(),
                })?;
                drop(file);
                report.files += 1;
                report.file_bytes += f.size;
                apply_meta(&path, m, false, chown)?;
            }
            Node::Symlink(m, target) => {
                rfs::symlinkat(OsStr::from_bytes(target), CWD, &path)
                    .map_err(io_err("creating symlink", &path))?;
                apply_meta(&path, m, true, chown)?;
            }
            Node::CharDev(m, rdev) | Node::BlockDev(m, rdev) => {
                let ft = if matches!(e.node, Node::CharDev(..)) {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                rfs::mknodat(CWD, &path, ft, Mode::from_raw_mode(0o600), *rdev)
                    .map_err(io_err("creating device", &path))?;
                apply_meta(&path, m, false, chown)?;
            }
            Node::Fifo(m) | Node::Socket(m) => {
                let ft = if matches!(e.node, Node::Fifo(_)) {
                    FileType::Fifo
                } else {
                    FileType::Socket
                };
                rfs::mknodat(CWD, &path, ft, Mode::from_raw_mode(0o600), 0)
                    .map_err(io_err("creating", &path))?;
                apply_meta(&path, m, false, chown)?;
            }
            Node::HardLink(t) => {
                let target = &paths[*t as usize];
                rfs::linkat(CWD, target, CWD, &path, AtFlags::empty())
                    .map_err(io_err("creating hardlink", &path))?;
                inode_paths.insert(i, *t as usize);
            }
        }
        paths.push(path);
    }
    // Directories last, deepest first, so their times are not disturbed by children.
    for &i in dirs.iter().rev() {
        if let Some(m) = idx.entries[i].meta() {
            apply_meta(&paths[i], m, false, chown)?;
        }
    }
    report.fetched_bytes = reader.fetched;
    Ok(report)
}
