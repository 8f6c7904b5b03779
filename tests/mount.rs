//! `tessera mount` end to end, as root with /dev/fuse: a walk of the mount equals
//! `tessera unpack` of the same image for every corpus image; content is fetched lazily
//! from a registry into the node store; corrupt store chunks are refetched; a registry
//! going away fails reads with EIO while the mount stays up; a dead daemon's mount is
//! cleaned up by `tessera umount`.

mod common;

use common::serve::TesseraServe;
use common::{require_root, run_ok, tessera};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn corpus() -> PathBuf {
    let c = PathBuf::from(
        std::env::var("TESSERA_CORPUS").unwrap_or_else(|_| "/var/cache/tessera/corpus".into()),
    );
    assert!(
        c.join("docker-archive").exists(),
        "corpus missing at {} (scripts/test.sh builds it)",
        c.display()
    );
    c
}

fn require_fuse() {
    require_root();
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (modprobe fuse) to run the mount tests"
    );
}

/// A running `tessera mount`, unmounted (and waited for) on drop.
struct Mounted {
    child: Child,
    dir: PathBuf,
}

impl Mounted {
    fn start(reference: &str, dir: &Path, store: &Path) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let mut child = tessera()
            .args(["mount", reference])
            .arg(dir)
            .arg("--store")
            .arg(store)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        assert!(
            line.starts_with("mounted "),
            "tessera mount did not come up: {line:?}"
        );
        Mounted {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn umount(&mut self) {
        run_ok(tessera().arg("umount").arg(&self.dir));
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon did not exit after umount"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = tessera().arg("umount").arg(&self.dir).output();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn same_tree(a: &Path, b: &Path) {
    let diffs = tessera_treediff::compare(a, b, &tessera_treediff::Options::default()).unwrap();
    assert!(
        diffs.is_empty(),
        "{} and {} differ: {:?}",
        a.display(),
        b.display(),
        &diffs[..diffs.len().min(10)]
    );
}

fn files_in(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            n += files_in(&e.path());
        } else if t.is_file() {
            n += 1;
        }
    }
    n
}

#[test]
fn a_walk_of_the_mount_equals_unpack_for_every_corpus_image() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let mut names: Vec<String> = std::fs::read_dir(corpus().join("docker-archive"))
        .unwrap()
        .flatten()
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .trim_end_matches(".tar")
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names.len(), 7, "expected the 7 corpus images");
    let store = work.path().join("store");
    for name in names {
        let src = format!(
            "docker-archive:{}",
            corpus()
                .join("docker-archive")
                .join(format!("{name}.tar"))
                .display()
        );
        let r = format!("oci:{}:{name}", layout.display());
        run_ok(tessera().args(["convert", "--no-cache", &src, &r]));
        let unpacked = work.path().join(format!("{name}-unpacked"));
        run_ok(tessera().args(["unpack", &r]).arg(&unpacked));
        let mut m = Mounted::start(&r, &work.path().join(format!("{name}-mnt")), &store);
        same_tree(&unpacked, &m.dir);
        m.umount();
        std::fs::remove_dir_all(&unpacked).unwrap();
    }
}

fn chunk_files(store: &Path) -> usize {
    std::fs::read_dir(store)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "tmp" && e.path().is_dir())
        .map(|e| std::fs::read_dir(e.path()).unwrap().count())
        .sum()
}

#[test]
fn lazy_from_a_registry_verified_and_failing_cleanly() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let mut s = TesseraServe::start();
    let src = format!(
        "docker-archive:{}",
        corpus().join("docker-archive/debian-base.tar").display()
    );
    let r = format!("{}/lib/debian:tessera", s.addr);
    run_ok(tessera().args(["convert", "--no-cache", &src, &r]));
    let store = work.path().join("store");
    let mnt = work.path().join("mnt");
    let mut m = Mounted::start(&r, &mnt, &store);

    // Walking and stat-ing the whole tree fetches no content.
    assert!(files_in(&mnt) > 5000);
    assert_eq!(
        chunk_files(&store),
        0,
        "metadata operations fetched content"
    );
    // Reading one file fetches (about) its own chunks only.
    let bash = std::fs::read(mnt.join("usr/bin/bash")).unwrap();
    let fetched = chunk_files(&store);
    assert!(
        fetched > 0 && fetched < 40,
        "reading bash fetched {fetched} chunks"
    );
    let unpacked = work.path().join("unpacked");
    run_ok(tessera().args(["unpack", &r]).arg(&unpacked));
    assert!(bash == std::fs::read(unpacked.join("usr/bin/bash")).unwrap());

    // A corrupt chunk in the node store is never served: it is dropped and refetched.
    for sub in std::fs::read_dir(&store).unwrap().flatten() {
        if sub.file_name() == "tmp" || !sub.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            std::fs::write(f.path(), b"garbage").unwrap();
        }
    }
    m.umount();
    let mut m = Mounted::start(&r, &mnt, &store);
    assert!(std::fs::read(mnt.join("usr/bin/bash")).unwrap() == bash);

    // The registry goes away: a read of content not in the store fails with EIO, the
    // mount stays up, cached content is still served.
    s.kill9();
    let mut f = std::fs::File::open(mnt.join("usr/bin/perl")).unwrap();
    let mut buf = Vec::new();
    let err = f.read_to_end(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "expected EIO, got {err}");
    assert!(std::fs::read(mnt.join("usr/bin/bash")).unwrap() == bash);
    assert!(files_in(&mnt) > 5000);

    // The daemon dies: `tessera umount` cleans up the dead mount.
    let _ = m.child.kill();
    let _ = m.child.wait();
    run_ok(tessera().arg("umount").arg(&mnt));
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "mount point not cleaned up"
    );
}
