//! `tessera mount` end to end, as root with /dev/fuse: a walk of the mount equals
//! `tessera unpack` of the same image for every corpus image; content is fetched lazily
//! from a registry into the node store; corrupt store chunks are refetched; a registry
//! going away fails reads with EIO while the mount stays up, and reads recover when it
//! returns; a dead daemon's mount is cleaned up by `tessera umount`; a writable mount
//! runs `import pandas` in a chroot; one fetch per chunk under concurrent readers; a
//! corrupt pack fails reads, is counted and never cached; quota, pins, gc, verify and the
//! shared tier; read profiles and prefetch; several mounts in one daemon.

mod common;

use common::serve::TesseraServe;
use common::{
    convert, noise, require_root, run_json, run_ok, tessera, tessera_in, write_one_layer,
    TarBuilder, TestNetns,
};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        Mounted::start_with(reference, dir, store, &[])
    }

    fn start_with(reference: &str, dir: &Path, store: &Path, extra: &[&str]) -> Mounted {
        Mounted::start_in(None, reference, dir, store, extra, None)
    }

    fn start_in(
        cwd: Option<&Path>,
        reference: &str,
        dir: &Path,
        store: &Path,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Mounted {
        Mounted::start_cmd(tessera(), cwd, reference, dir, store, extra, log)
    }

    /// Like [`Mounted::start_with`], `cmd` (a `tessera` command) run in the directory
    /// `cwd`, its log (stderr) written to `log`.
    fn start_cmd(
        mut cmd: Command,
        cwd: Option<&Path>,
        reference: &str,
        dir: &Path,
        store: &Path,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        if let Some(c) = cwd {
            cmd.current_dir(c);
        }
        let mut child = cmd
            .args(["mount", reference])
            .arg(dir)
            .arg("--store")
            .arg(store)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log.map_or_else(Stdio::null, |p| std::fs::File::create(p).unwrap().into()))
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
        wait_exit(&mut self.child, "daemon did not exit after umount");
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

/// Wait (bounded: 20 s) until `child` exits; `what` says what did not happen.
fn wait_exit(child: &mut Child, what: &str) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(20), "{what}");
        std::thread::sleep(Duration::from_millis(50));
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

/// Chunk files in a node store (`<2 hex>/<64 hex>`).
fn chunk_paths(store: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(store).unwrap().flatten() {
        if e.file_name().len() == 2 && e.path().is_dir() {
            out.extend(
                std::fs::read_dir(e.path())
                    .unwrap()
                    .flatten()
                    .map(|f| f.path()),
            );
        }
    }
    out
}

fn chunk_files(store: &Path) -> usize {
    chunk_paths(store).len()
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
    // Reading one file fetches (about) its own chunks only (plus neighbours in its pack,
    // up to --amplify).
    let bash = std::fs::read(mnt.join("usr/bin/bash")).unwrap();
    settle(&store, m.child.id());
    let fetched = chunk_files(&store);
    assert!(
        fetched > 0 && fetched < 40,
        "reading bash fetched {fetched} chunks"
    );
    let unpacked = work.path().join("unpacked");
    run_ok(tessera().args(["unpack", &r]).arg(&unpacked));
    assert!(bash == std::fs::read(unpacked.join("usr/bin/bash")).unwrap());

    // A corrupt chunk in the node store is never served: it is dropped and refetched.
    for f in chunk_paths(&store) {
        std::fs::write(f, b"garbage").unwrap();
    }
    m.umount();
    let mut m = Mounted::start_with(&r, &mnt, &store, &["--fetch-timeout", "2"]);
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

/// A TCP forwarder that can be closed (connections are refused and live ones cut) and
/// opened again: a registry outage without losing the registry's port.
struct Gate {
    addr: String,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Gate {
    fn start(upstream: &str) -> Gate {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (o, g, up) = (open.clone(), generation.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(client) = conn else { continue };
                if !o.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&up) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let born = g.load(Ordering::SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let g = g.clone();
                    std::thread::spawn(move || {
                        use std::io::Write;
                        from.set_read_timeout(Some(Duration::from_millis(50)))
                            .unwrap();
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            if g.load(Ordering::SeqCst) != born {
                                break;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Gate {
            addr,
            open,
            generation,
        }
    }

    fn close(&self) {
        use std::sync::atomic::Ordering;
        self.open.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn reopen(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn cache_json(sub: &str, store: &Path, extra: &[&str]) -> (serde_json::Value, i32) {
    let out = tessera()
        .args(["cache", sub, "--json", "--store"])
        .arg(store)
        .args(extra)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tessera cache {sub}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.code().unwrap_or(-1))
}

/// The counters a mount publishes in its node store (its pid's entry), as they are after
/// the caller's last action. A mount publishes every half second or so (slower on a busy
/// machine: each publication is synced), and a publication whose counters were read
/// before the call can land after it; so this waits (up to 10 s) until the mount's file
/// was replaced twice since the call: the second was read after the first landed.
fn counters(store: &Path, pid: u32) -> serde_json::Value {
    let start = Instant::now();
    let mut seen = published(store, pid);
    let mut replaced = 0;
    while replaced < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "mount {pid} published no counters for 10 s ({replaced} publications seen)"
        );
        std::thread::sleep(Duration::from_millis(20));
        let now = published(store, pid);
        if now != seen {
            replaced += 1;
            seen = now;
        }
    }
    let (v, _) = cache_json("stats", store, &[]);
    v["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["pid"] == pid)
        .unwrap_or_else(|| panic!("mount {pid} not listed: {v}"))["counters"]
        .clone()
}

/// What identifies the counter files the mount process `pid` last published in the node
/// store `store` (`mounts/<pid>-<n>.json`, each replaced by a rename): (name, inode,
/// mtime), sorted.
fn published(store: &Path, pid: u32) -> Vec<(String, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let prefix = format!("{pid}-");
    let mut v: Vec<_> = std::fs::read_dir(store.join("mounts"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with(&prefix) || !name.ends_with(".json") {
                return None;
            }
            let m = std::fs::metadata(e.path()).ok()?;
            Some((name, m.ino(), m.mtime(), m.mtime_nsec()))
        })
        .collect();
    v.sort();
    v
}

/// Wait (bounded) until a mount has no fetching or caching left to do.
fn settle(store: &Path, pid: u32) {
    let start = Instant::now();
    loop {
        let c = counters(store, pid);
        if c["idle"] == true {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "mount never idle: {c}"
        );
    }
}

fn corpus_archive(name: &str) -> String {
    format!(
        "docker-archive:{}",
        corpus()
            .join(format!("docker-archive/{name}.tar"))
            .display()
    )
}

/// debian-base and debian-python converted into `s` under `REPO/base:t` and
/// `REPO/python:t`, and debian-base unpacked under `work` (the reference tree).
fn base_and_python(s: &TesseraServe, repo: &str, work: &Path) -> (String, String, PathBuf) {
    let (base, python) = (
        format!("{}/{repo}/base:t", s.addr),
        format!("{}/{repo}/python:t", s.addr),
    );
    for (name, r) in [("debian-base", &base), ("debian-python", &python)] {
        run_ok(tessera().args(["convert", "--no-cache", &corpus_archive(name), r]));
    }
    let unpacked = work.join("unpacked");
    run_ok(tessera().args(["unpack", &base]).arg(&unpacked));
    (base, python, unpacked)
}

fn is_mounted(dir: &Path) -> bool {
    let dir = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.as_str()))
}

#[test]
fn writable_root_runs_python_and_leaves_the_image_untouched() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let s = TesseraServe::start();
    let r = format!("{}/app/pandas:a", s.addr);
    run_ok(tessera().args(["convert", "--no-cache", &corpus_archive("app-pandas-a"), &r]));
    let (store, mnt, ov) = (
        work.path().join("store"),
        work.path().join("root"),
        work.path().join("ov"),
    );
    let ov_s = ov.to_string_lossy().to_string();
    let mut m = Mounted::start_with(&r, &mnt, &store, &["--writable", "--upper", &ov_s]);
    let out = std::process::Command::new("chroot")
        .arg(&mnt)
        .args([
            "python3",
            "-c",
            "import pandas; print(pandas.DataFrame({'a': [1, 2]}).a.sum())",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "3",
        "python in the chroot failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Writes, deletes (whiteouts) and new directories land in the upper layer only.
    std::fs::write(mnt.join("root/hello.txt"), b"hello").unwrap();
    std::fs::remove_file(mnt.join("etc/os-release")).unwrap();
    std::fs::create_dir(mnt.join("srv/new")).unwrap();
    assert!(!mnt.join("etc/os-release").exists());
    assert_eq!(
        std::fs::read(ov.join("upper/root/hello.txt")).unwrap(),
        b"hello"
    );
    use std::os::unix::fs::FileTypeExt;
    let wh = std::fs::symlink_metadata(ov.join("upper/etc/os-release")).unwrap();
    assert!(
        wh.file_type().is_char_device(),
        "no whiteout for a deleted file"
    );
    // The image itself is untouched and read-only.
    let lower = ov.join("lower");
    assert!(lower.join("etc/os-release").exists());
    assert!(!lower.join("root/hello.txt").exists());
    let err = std::fs::write(lower.join("etc/x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "lower writable: {err}");
    // umount takes down the overlay and the image under it; the changes stay.
    m.umount();
    assert!(
        !is_mounted(&mnt) && !is_mounted(&lower),
        "mounts left behind"
    );
    let _m = Mounted::start_with(&r, &mnt, &store, &["--writable", "--upper", &ov_s]);
    assert_eq!(std::fs::read(mnt.join("root/hello.txt")).unwrap(), b"hello");
    assert!(!mnt.join("etc/os-release").exists());
    assert!(mnt.join("etc/passwd").exists());
}

#[test]
fn one_fetch_per_chunk_under_concurrent_readers_and_recovery_after_an_outage() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let s = TesseraServe::start();
    run_ok(tessera().args([
        "convert",
        "--no-cache",
        &corpus_archive("debian-base"),
        &format!("{}/lib/deb:t", s.addr),
    ]));
    let unpacked = work.path().join("unpacked");
    run_ok(
        tessera()
            .args(["unpack", &format!("{}/lib/deb:t", s.addr)])
            .arg(&unpacked),
    );
    let gate = Gate::start(&s.addr);
    let r = format!("{}/lib/deb:t", gate.addr);
    let (store, mnt) = (work.path().join("store"), work.path().join("mnt"));
    let m = Mounted::start_with(&r, &mnt, &store, &["--fetch-timeout", "30"]);

    // 8 readers, each reading the same files 4 KiB at a time in its own order.
    let files = ["usr/bin/perl", "usr/bin/bash", "usr/bin/apt-get"];
    std::thread::scope(|sc| {
        for t in 0..8u64 {
            let mnt = &mnt;
            let unpacked = &unpacked;
            sc.spawn(move || {
                use std::os::unix::fs::FileExt;
                for f in files {
                    let want = std::fs::read(unpacked.join(f)).unwrap();
                    let fh = std::fs::File::open(mnt.join(f)).unwrap();
                    let pages = want.len().div_ceil(4096) as u64;
                    let mut got = vec![0u8; want.len()];
                    for k in 0..pages {
                        // Every page once: a rotation, backwards for odd readers.
                        let k = if t % 2 == 1 { pages - 1 - k } else { k };
                        let p = (k + t * pages / 8) % pages;
                        let off = (p * 4096) as usize;
                        let end = (off + 4096).min(want.len());
                        fh.read_exact_at(&mut got[off..end], off as u64).unwrap();
                    }
                    assert!(got == want, "{f} differs");
                }
            });
        }
    });
    settle(&store, m.child.id());
    let c = counters(&store, m.child.id());
    assert_eq!(
        c["chunks_fetched"].as_u64().unwrap(),
        chunk_files(&store) as u64,
        "a chunk was fetched more than once: {c}"
    );
    assert!(
        c["verification_failures"] == 0 && c["fetch_errors"] == 0,
        "{c}"
    );

    // The registry goes away; a read waits (retrying) and completes once it is back.
    gate.close();
    let reader = {
        let p = mnt.join("usr/lib/x86_64-linux-gnu/libc.so.6");
        std::thread::spawn(move || std::fs::read(p))
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !reader.is_finished(),
        "the read did not wait for the registry"
    );
    gate.reopen();
    let got = reader.join().unwrap().expect("read after the outage");
    assert!(got == std::fs::read(unpacked.join("usr/lib/x86_64-linux-gnu/libc.so.6")).unwrap());
    let c = counters(&store, m.child.id());
    assert!(c["retries"].as_u64().unwrap() > 0, "{c}");
}

#[test]
fn a_corrupt_pack_fails_reads_is_counted_and_never_cached() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let r = format!("oci:{}:deb", layout.display());
    run_ok(tessera().args(["convert", "--no-cache", &corpus_archive("debian-base"), &r]));
    // Rot in the middle of every pack blob.
    let inspect = run_ok(tessera().args(["inspect", "--json", &r]));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let mut packs = 0;
    for l in v["packs"].as_array().unwrap() {
        {
            let d = l["digest"].as_str().unwrap().trim_start_matches("sha256:");
            let p = layout.join("blobs/sha256").join(d);
            let mut b = std::fs::read(&p).unwrap();
            let mid = b.len() / 2;
            for x in &mut b[mid..mid + 64] {
                *x ^= 0x5a;
            }
            std::fs::write(&p, b).unwrap();
            packs += 1;
        }
    }
    assert!(packs > 0, "no pack layers in {inspect}");
    let (store, mnt) = (work.path().join("store"), work.path().join("mnt"));
    let m = Mounted::start_with(&r, &mnt, &store, &["--readahead", "0"]);
    let (mut ok, mut eio) = (0, 0);
    let mut stack = vec![mnt.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                match std::fs::read(e.path()) {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        assert_eq!(e.raw_os_error(), Some(5), "{e}");
                        eio += 1;
                    }
                }
            }
        }
    }
    assert!(eio > 0 && ok > 1000, "ok {ok}, EIO {eio}");
    let c = counters(&store, m.child.id());
    assert!(c["verification_failures"].as_u64().unwrap() > 0, "{c}");
    // Nothing corrupt reached the node store.
    let (v, code) = cache_json("verify", &store, &[]);
    assert_eq!(code, 0, "{v}");
    assert!(v["checked"].as_u64().unwrap() > 1000, "{v}");
}

#[test]
fn node_store_quota_pins_gc_verify_and_shared_tier() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let mut s = TesseraServe::start();
    let (ra, rb) = (
        format!("{}/q/base:t", s.addr),
        format!("{}/q/python:t", s.addr),
    );
    run_ok(tessera().args(["convert", "--no-cache", &corpus_archive("debian-base"), &ra]));
    run_ok(tessera().args([
        "convert",
        "--no-cache",
        &corpus_archive("debian-python"),
        &rb,
    ]));
    let store = work.path().join("store");
    // Fill the store with another image's chunks, then unmount it.
    let mut b = Mounted::start(&rb, &work.path().join("b"), &store);
    let mut stack = vec![b.dir.join("usr/lib/python3.11")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                std::fs::read(e.path()).unwrap();
            }
        }
    }
    b.umount();
    let (st, _) = cache_json("stats", &store, &[]);
    assert!(st["bytes"].as_u64().unwrap() > 20 << 20, "{st}");
    // A mount with a quota reads a whole image while one file is held open: least
    // recently used chunks go, the mounted image's with the rest, so the store stays
    // near the quota; the open file's chunks are pinned and stay.
    let unpacked = work.path().join("unpacked");
    run_ok(tessera().args(["unpack", &ra]).arg(&unpacked));
    let a = Mounted::start_with(&ra, &work.path().join("a"), &store, &["--quota", "10M"]);
    let mut held = std::fs::File::open(a.dir.join("usr/bin/perl")).unwrap();
    let mut perl = Vec::new();
    held.read_to_end(&mut perl).unwrap();
    assert!(perl == std::fs::read(unpacked.join("usr/bin/perl")).unwrap());
    let _ = counters(&store, a.child.id()); // published after the open: the pin has it
    same_tree(&unpacked, &a.dir);
    let _ = counters(&store, a.child.id());
    let (st, _) = cache_json("stats", &store, &[]);
    assert_eq!(st["mounts"].as_array().unwrap().len(), 1, "{st}");
    let (bytes, pinned) = (
        st["bytes"].as_u64().unwrap(),
        st["pinned_bytes"].as_u64().unwrap(),
    );
    assert!(
        bytes < 20 << 20,
        "a mounted image kept the store at {bytes} bytes, quota 10M: {st}"
    );
    assert!(
        pinned >= perl.len() as u64 * 9 / 10 && pinned < 10 << 20,
        "pinned {pinned} bytes; the open file has {}: {st}",
        perl.len()
    );
    // gc while mounted removes what no mounted image uses; with --include-mounted,
    // everything but the open file.
    let (g, _) = cache_json("gc", &store, &["--max-size", "0"]);
    assert_eq!(
        g["kept_chunks"], g["mounted_kept"],
        "gc kept chunks no mounted image uses: {g}"
    );
    let (g, _) = cache_json("gc", &store, &["--max-size", "0", "--include-mounted"]);
    assert_eq!(
        g["kept_chunks"], g["pinned_kept"],
        "gc kept unpinned or dropped pinned chunks: {g}"
    );
    assert!(g["kept_chunks"].as_u64().unwrap() > 0, "{g}");
    // What was evicted is fetched again.
    assert!(
        std::fs::read(a.dir.join("usr/bin/bash")).unwrap()
            == std::fs::read(unpacked.join("usr/bin/bash")).unwrap()
    );

    // A second node reads through this store as its shared tier: no network needed.
    let store2 = work.path().join("store2");
    let shared = store.to_string_lossy().to_string();
    let n2 = Mounted::start_with(
        &ra,
        &work.path().join("n2"),
        &store2,
        &["--shared-store", &shared, "--fetch-timeout", "1"],
    );
    s.kill9();
    assert!(
        std::fs::read(n2.dir.join("usr/bin/perl")).unwrap()
            == std::fs::read(unpacked.join("usr/bin/perl")).unwrap()
    );
    assert_eq!(chunk_files(&store2), 0, "the shared tier was copied");
    drop(n2);

    // verify finds and removes a corrupt chunk; exit code 1 says so.
    let victim = chunk_paths(&store).pop().unwrap();
    std::fs::write(&victim, b"rot").unwrap();
    let (v, code) = cache_json("verify", &store, &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["corrupt_removed"].as_array().unwrap().len(), 1, "{v}");
    assert!(!victim.exists());

    // Unmounted, nothing is pinned: gc empties the store.
    drop(held);
    let mut a = a;
    a.umount();
    let (g, code) = cache_json("gc", &store, &["--max-size", "0"]);
    assert_eq!(code, 0);
    assert_eq!(g["kept_chunks"], 0, "{g}");
    assert_eq!(chunk_files(&store), 0);
}

#[test]
fn read_profiles_prefetch_and_several_mounts_in_one_daemon() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let mut s = TesseraServe::start();
    let (r1, r2, unpacked) = base_and_python(&s, "p", work.path());

    // One daemon, two mounts, recording what is read.
    let (d1, d2) = (work.path().join("d1"), work.path().join("d2"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let profile = work.path().join("base.profile");
    let mut child = tessera()
        .args(["mount", &r1])
        .arg(&d1)
        .arg(&r2)
        .arg(&d2)
        .arg("--store")
        .arg(work.path().join("store"))
        .arg("--record-profile")
        .arg(&profile)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let l = lines.next().unwrap().unwrap();
        assert!(l.starts_with("mounted "), "{l}");
    }
    let read = ["usr/bin/bash", "etc/passwd", "usr/bin/perl"];
    for f in read {
        std::fs::read(d1.join(f)).unwrap();
    }
    std::fs::read(d2.join("usr/bin/python3.11")).unwrap();
    run_ok(tessera().arg("umount").arg(&d1));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "daemon exited with a mount left"
    );
    assert!(std::fs::read(d2.join("etc/hostname")).is_ok() || d2.join("etc").exists());
    run_ok(tessera().arg("umount").arg(&d2));
    wait_exit(&mut child, "daemon did not exit");
    // Lines `K N PATH`, in the order content was first read.
    let recorded = std::fs::read_to_string(&profile).unwrap();
    let mut paths: Vec<&str> = Vec::new();
    for l in recorded.lines() {
        let p = l
            .splitn(3, ' ')
            .nth(2)
            .unwrap_or_else(|| panic!("bad line {l:?}"));
        if paths.last() != Some(&p) {
            paths.push(p);
        }
    }
    assert_eq!(paths, read, "{recorded}");
    let second = std::fs::read_to_string(profile.with_extension("1")).unwrap();
    assert!(second.contains("usr/bin/python3.11"), "{second}");

    // --prefetch: the whole image lands in the store with nothing read.
    let whole = work.path().join("whole");
    let m = Mounted::start_with(&r1, &work.path().join("w"), &whole, &["--prefetch"]);
    let total = {
        let (st, _) = cache_json("stats", &whole, &[]);
        st["mounts"][0]["chunks"].as_u64().unwrap() as usize
    };
    let start = Instant::now();
    while chunk_files(&whole) < total {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "prefetch stalled at {} of {total} chunks",
            chunk_files(&whole)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(m);

    // --prefetch-profile: the profiled files are fetched before anyone reads them.
    let cold = work.path().join("cold");
    let pf = profile.to_string_lossy().to_string();
    let m = Mounted::start_with(
        &r1,
        &work.path().join("m"),
        &cold,
        &["--prefetch-profile", &pf, "--fetch-timeout", "1"],
    );
    let start = Instant::now();
    loop {
        let c = counters(&cold, m.child.id());
        if c["prefetched_chunks"].as_u64().unwrap() > 0
            && chunk_files(&cold) as u64 >= c["prefetched_chunks"].as_u64().unwrap()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "profile prefetch stalled: {c}"
        );
    }
    s.kill9();
    for f in read {
        assert!(
            std::fs::read(m.dir.join(f)).unwrap() == std::fs::read(unpacked.join(f)).unwrap(),
            "{f}"
        );
    }
    let err = std::fs::read(m.dir.join("usr/bin/apt-get")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
}

/// A runtime for an HTTP front, its listener on a loopback port, and its address.
fn front_listener() -> (tokio::runtime::Runtime, tokio::net::TcpListener, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (rt, listener, addr)
}

/// Forward `req` (its path `path`, the request headers `keep` says yes to) to
/// `upstream`, and its answer back.
async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    path: &str,
    req: axum::http::Request<axum::body::Body>,
    keep: impl Fn(&str) -> bool,
) -> axum::http::Response<axum::body::Body> {
    let mut fwd = client.request(req.method().clone(), format!("http://{upstream}{path}"));
    for (k, v) in req.headers() {
        if keep(k.as_str()) {
            fwd = fwd.header(k.as_str(), v.as_bytes());
        }
    }
    drop(req);
    let resp = fwd.send().await.unwrap();
    let mut out = axum::http::Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        out = out.header(k.as_str(), v.as_bytes());
    }
    out.body(axum::body::Body::from(resp.bytes().await.unwrap()))
        .unwrap()
}

/// A bearer-token front for a registry whose tokens expire after `ttl`: requests without
/// a live token get a 401 challenge pointing at its own `/token` endpoint.
struct TokenFront {
    addr: String,
    tokens_issued: std::sync::Arc<std::sync::atomic::AtomicU64>,
    rejected: std::sync::Arc<std::sync::atomic::AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl TokenFront {
    fn start(upstream: &str, ttl: Duration) -> TokenFront {
        use axum::body::Body;
        use axum::http::{Request, Response, StatusCode};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let (rt, listener, addr) = front_listener();
        let issued = Arc::new(AtomicU64::new(0));
        let rejected = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let (up, me, iss, rej) = (
            upstream.to_string(),
            addr.clone(),
            issued.clone(),
            rejected.clone(),
        );
        let client = reqwest::Client::new();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let (up, me, iss, rej, client) = (
                up.clone(),
                me.clone(),
                iss.clone(),
                rej.clone(),
                client.clone(),
            );
            async move {
                let path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                if path.starts_with("/token") {
                    iss.fetch_add(1, Ordering::SeqCst);
                    // The token names the millisecond it was issued at.
                    let tok = format!("t{}", epoch.elapsed().as_millis());
                    return Response::new(Body::from(format!("{{\"token\":\"{tok}\"}}")));
                }
                let live = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer t"))
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .is_some_and(|ms| {
                        epoch.elapsed().as_millis() as u64 - ms < ttl.as_millis() as u64
                    });
                if !live {
                    rej.fetch_add(1, Ordering::SeqCst);
                    return Response::builder()
                        .status(StatusCode::UNAUTHORIZED)
                        .header(
                            "www-authenticate",
                            format!("Bearer realm=\"http://{me}/token\",service=\"front\""),
                        )
                        .body(Body::empty())
                        .unwrap();
                }
                forward(&client, &up, &path, req, |h| h == "range" || h == "accept").await
            }
        });
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        TokenFront {
            addr,
            tokens_issued: issued,
            rejected,
            _rt: rt,
        }
    }
}

#[test]
fn expired_registry_tokens_are_refreshed_mid_mount() {
    require_fuse();
    use std::sync::atomic::Ordering;
    let work = tempfile::tempdir().unwrap();
    let s = TesseraServe::start();
    run_ok(tessera().args([
        "convert",
        "--no-cache",
        &corpus_archive("debian-base"),
        &format!("{}/tok/deb:t", s.addr),
    ]));
    let unpacked = work.path().join("unpacked");
    run_ok(
        tessera()
            .args(["unpack", &format!("{}/tok/deb:t", s.addr)])
            .arg(&unpacked),
    );
    let front = TokenFront::start(&s.addr, Duration::from_secs(2));
    let r = format!("{}/tok/deb:t", front.addr);
    let m = Mounted::start_with(
        &r,
        &work.path().join("mnt"),
        &work.path().join("store"),
        &["--fetch-timeout", "5"],
    );
    let first = front.tokens_issued.load(Ordering::SeqCst);
    assert!(first >= 1, "the mount never asked for a token");
    let f = "usr/bin/bash";
    assert!(std::fs::read(m.dir.join(f)).unwrap() == std::fs::read(unpacked.join(f)).unwrap());
    // The token expires; the next fetch is refused once, gets a new token and goes on.
    std::thread::sleep(Duration::from_millis(2500));
    let rejected = front.rejected.load(Ordering::SeqCst);
    let f = "usr/bin/perl";
    assert!(std::fs::read(m.dir.join(f)).unwrap() == std::fs::read(unpacked.join(f)).unwrap());
    assert!(
        front.tokens_issued.load(Ordering::SeqCst) > first
            && front.rejected.load(Ordering::SeqCst) > rejected,
        "no token refresh happened"
    );
}

/// Whether the running kernel has FUSE passthrough (Linux 6.9 and later).
fn kernel_has_passthrough() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    (major, minor) >= (6, 9)
}

/// The sealed files (not their chunk lists) of the node store `store`.
fn sealed_files(store: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(store.join("files"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_none())
        .collect()
}

/// The largest regular file under `root` (path relative to it, size).
fn largest_file(root: &Path) -> (PathBuf, u64) {
    let mut best = (PathBuf::new(), 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && m.len() > best.1 {
                best = (e.path().strip_prefix(root).unwrap().to_path_buf(), m.len());
            }
        }
    }
    best
}

#[test]
fn large_files_are_sealed_and_passed_through_to_the_kernel() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let s = TesseraServe::start();
    let r = format!("{}/seal/pandas:t", s.addr);
    run_ok(tessera().args(["convert", "--no-cache", &corpus_archive("app-pandas-a"), &r]));
    let unpacked = work.path().join("unpacked");
    run_ok(tessera().args(["unpack", &r]).arg(&unpacked));
    let (big, size) = largest_file(&unpacked);
    assert!(size > 8 << 20, "{big:?} is only {size} bytes");
    let want = std::fs::read(unpacked.join(&big)).unwrap();
    let store = work.path().join("store");

    // Read through the daemon, then sealed when closed; unmounting waits for the seal.
    // A file is sealed only if every chunk of it was cached; the daemon's warnings say
    // why one was not (e.g. a disk too slow to take the chunks).
    let log = work.path().join("m1.log");
    let mut m = Mounted::start_in(None, &r, &work.path().join("m1"), &store, &[], Some(&log));
    assert!(std::fs::read(m.dir.join(&big)).unwrap() == want);
    let c = counters(&store, m.child.id());
    assert_eq!(c["passthrough_opens"], 0, "{c}");
    m.umount();
    let (st, _) = cache_json("stats", &store, &[]);
    assert!(
        st["sealed_files"].as_u64().unwrap() >= 1,
        "{st}\n{c}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(st["pointers"].as_u64().unwrap() >= 100, "{st}");
    // Stored once: chunk files became pointers, the bytes live in the sealed file.
    assert!(
        st["bytes"].as_u64().unwrap() < size + (size / 4),
        "the large file is stored twice: {st}"
    );

    // Now the kernel reads the sealed file: no chunk goes through the daemon. A kernel
    // without passthrough gets every read served (and verified) by the daemon instead.
    let passthrough = kernel_has_passthrough();
    let m = Mounted::start(&r, &work.path().join("m2"), &store);
    assert!(std::fs::read(m.dir.join(&big)).unwrap() == want);
    let c = counters(&store, m.child.id());
    if passthrough {
        assert!(c["passthrough_opens"].as_u64().unwrap() >= 1, "{c}");
        assert_eq!(
            c["chunks_from_store"], 0,
            "passthrough reads reached the daemon: {c}"
        );
    } else {
        assert_eq!(c["passthrough_opens"], 0, "{c}");
        assert!(c["chunks_from_store"].as_u64().unwrap() >= 100, "{c}");
    }
    drop(m);

    // A program mapping it (numpy maps OpenBLAS) through a writable overlay.
    let upper = work.path().join("rw");
    let up = upper.to_string_lossy().to_string();
    let m = Mounted::start_with(
        &r,
        &work.path().join("m3"),
        &store,
        &["--writable", "--upper", &up],
    );
    let out = std::process::Command::new("chroot")
        .arg(&m.dir)
        .args([
            "python3",
            "-c",
            "import numpy; print(int(numpy.arange(10).sum()))",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "45",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = counters(&store, m.child.id());
    assert_eq!(
        c["passthrough_opens"].as_u64().unwrap() >= 1,
        passthrough,
        "{c}"
    );
    drop(m);

    // --no-passthrough: the same bytes, every read through the daemon (verified there).
    let m = Mounted::start_with(&r, &work.path().join("m4"), &store, &["--no-passthrough"]);
    assert!(std::fs::read(m.dir.join(&big)).unwrap() == want);
    let c = counters(&store, m.child.id());
    assert_eq!(c["passthrough_opens"], 0, "{c}");
    assert!(c["chunks_from_store"].as_u64().unwrap() >= 100, "{c}");
    drop(m);

    // verify checks sealed files; one bit off in one is found, and it goes with its
    // pointers; a later mount refetches what it needs and serves the right bytes.
    let (v, code) = cache_json("verify", &store, &[]);
    assert_eq!(code, 0, "{v}");
    assert!(v["sealed_checked"].as_u64().unwrap() >= 1, "{v}");
    let sealed = sealed_files(&store);
    let victim = sealed
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[size as usize / 2] ^= 0x20;
    std::fs::write(&victim, &bytes).unwrap();
    let (v, code) = cache_json("verify", &store, &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(
        v["corrupt_sealed_removed"].as_array().unwrap().len(),
        1,
        "{v}"
    );
    assert!(v["dangling_removed"].as_u64().unwrap() >= 100, "{v}");
    assert!(!victim.exists());
    let m = Mounted::start(&r, &work.path().join("m5"), &store);
    assert!(std::fs::read(m.dir.join(&big)).unwrap() == want);
    let c = counters(&store, m.child.id());
    assert!(c["chunks_fetched"].as_u64().unwrap() >= 100, "{c}");
    drop(m);
    drop(s);
}

/// One byte off in a sealed file on the node's disk never reaches a reader: a new daemon
/// checks the sealed file against its chunk list before its first passthrough open, drops
/// it (counted, logged), serves that open itself from chunks fetched and verified again,
/// and seals the file again; the next daemon passes the good copy through.
#[test]
fn a_corrupt_sealed_file_is_never_passed_through() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let r = small_image(work.path());
    let store = work.path().join("store");
    let want = noise(600_000, 1);
    let small = ["--passthrough-min", "64K"];
    let passthrough = kernel_has_passthrough();

    // Read through the daemon, then sealed when closed; unmounting waits for the seal.
    let mut m = Mounted::start_with(&r, &work.path().join("m1"), &store, &small);
    assert!(std::fs::read(m.dir.join("data/f0")).unwrap() == want);
    m.umount();
    let sealed = sealed_files(&store);
    assert_eq!(sealed.len(), 1, "{sealed:?}");
    let victim = &sealed[0];
    let mut bytes = std::fs::read(victim).unwrap();
    assert_eq!(bytes, want);
    bytes[300_000] ^= 0x01;
    std::fs::write(victim, &bytes).unwrap();

    // A new daemon on the same store: the right bytes, through the daemon.
    let log = work.path().join("m2.log");
    let mut m = Mounted::start_in(
        None,
        &r,
        &work.path().join("m2"),
        &store,
        &small,
        Some(&log),
    );
    assert!(
        std::fs::read(m.dir.join("data/f0")).unwrap() == want,
        "a corrupt sealed file reached the reader"
    );
    let c = counters(&store, m.child.id());
    if passthrough {
        assert_eq!(c["sealed_verify_failures"], 1, "{c}");
        assert!(c["chunks_fetched"].as_u64().unwrap() >= 1, "{c}");
    }
    assert_eq!(c["passthrough_opens"], 0, "{c}");
    m.umount();
    if passthrough {
        let log = std::fs::read_to_string(&log).unwrap();
        let key = victim.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            log.lines()
                .any(|l| l.contains("corrupt sealed file") && l.contains(&key)),
            "no warning names {key}: {log}"
        );
    }

    // Sealed again from verified chunks; the next daemon checks and passes it through.
    assert!(std::fs::read(victim).unwrap() == want);
    let m = Mounted::start_with(&r, &work.path().join("m3"), &store, &small);
    assert!(std::fs::read(m.dir.join("data/f0")).unwrap() == want);
    let c = counters(&store, m.child.id());
    assert_eq!(c["sealed_verify_failures"], 0, "{c}");
    assert_eq!(
        c["passthrough_opens"].as_u64().unwrap() >= 1,
        passthrough,
        "{c}"
    );
    drop(m);
}

#[test]
fn stored_profiles_are_found_by_later_mounts_on_any_registry() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let s = TesseraServe::start();
    let d = common::DockerRegistry::start();
    let read = ["usr/bin/bash", "usr/bin/perl"];
    // tessera serve answers the referrers API; docker-registry 2.8 does not, so the
    // profile goes under the OCI 1.1 fallback tag there.
    for host in [s.addr.clone(), d.addr.clone()] {
        let r = format!("{host}/prof/base:t");
        run_ok(tessera().args(["convert", "--no-cache", &corpus_archive("debian-base"), &r]));
        let profile = work
            .path()
            .join(format!("{}.profile", host.replace(':', "_")));
        let store = work.path().join(format!("rec-{}", host.replace(':', "_")));
        let pf = profile.to_string_lossy().to_string();
        let mut m = Mounted::start_with(
            &r,
            &work.path().join("rec"),
            &store,
            &["--record-profile", &pf],
        );
        for f in read {
            std::fs::read(m.dir.join(f)).unwrap();
        }
        m.umount();
        let text = std::fs::read_to_string(&profile).unwrap();
        assert!(text.contains("usr/bin/perl"), "{text}");
        // Nothing stored yet: show says so and fails.
        let out = tessera().args(["profile", "show", &r]).output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no read profile"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digest = run_ok(tessera().args(["profile", "push", &r, &pf, "--workload", "tools"]));
        assert!(digest.trim().starts_with("sha256:"), "{digest}");
        let shown = run_ok(tessera().args(["profile", "show", &r, "--workload", "tools"]));
        assert_eq!(shown, text);

        // A cold mount prefetches it without being told (and without reading anything).
        let cold = work.path().join(format!("cold-{}", host.replace(':', "_")));
        let m = Mounted::start(&r, &work.path().join("auto"), &cold);
        let start = Instant::now();
        loop {
            let c = counters(&cold, m.child.id());
            if c["prefetched_chunks"].as_u64().unwrap() > 0 && c["idle"] == true {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "stored profile not prefetched from {host}: {c}"
            );
        }
        drop(m);
        // --no-profile: nothing is prefetched.
        let none = work.path().join(format!("none-{}", host.replace(':', "_")));
        let m = Mounted::start_with(&r, &work.path().join("none"), &none, &["--no-profile"]);
        let c = counters(&none, m.child.id());
        assert_eq!(c["prefetched_chunks"], 0, "{c}");
        drop(m);
    }
}

/// A `tessera mountd` on `socket` over `store`, once it listens.
fn start_mountd(socket: &Path, store: &Path) -> Child {
    let mut daemon = tessera()
        .arg("mountd")
        .arg("--socket")
        .arg(socket)
        .arg("--store")
        .arg(store)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(daemon.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on "), "{line:?}");
    daemon
}

/// SIGTERM a mount daemon; it must exit cleanly, in time.
fn stop_mountd(daemon: &mut Child) {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(daemon),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = daemon.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "daemon did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_node_daemon_serves_mounts_asked_over_its_socket() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let s = TesseraServe::start();
    let (ra, rb, unpacked) = base_and_python(&s, "d", work.path());
    let socket = work.path().join("mountd.sock");
    let store = work.path().join("store");
    let mut daemon = start_mountd(&socket, &store);
    // A second daemon on the same socket refuses to start.
    let second = tessera()
        .arg("mountd")
        .arg("--socket")
        .arg(&socket)
        .arg("--store")
        .arg(&store)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already listens"));

    // Two clients, two images, one daemon process; the clients return once mounted.
    let (da, db) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let sock = socket.to_string_lossy().to_string();
    let got = run_ok(tessera().args(["mount", "--daemon", &sock, &ra]).arg(&da));
    assert!(got.starts_with("mounted "), "{got}");
    let upper = work.path().join("upper");
    run_ok(
        tessera()
            .args(["mount", "--daemon", &sock, &rb])
            .arg(&db)
            .arg("--writable")
            .arg("--upper")
            .arg(&upper),
    );
    assert!(
        std::fs::read(da.join("usr/bin/bash")).unwrap()
            == std::fs::read(unpacked.join("usr/bin/bash")).unwrap()
    );
    let py = std::process::Command::new("chroot")
        .arg(&db)
        .args(["python3", "-c", "print(6 * 7)"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "42");
    let (st, _) = cache_json("stats", &store, &[]);
    let mounts = st["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 2, "{st}");
    assert!(mounts.iter().all(|m| m["pid"] == daemon.id()), "{st}");

    // A mount that fails is reported to its client; the daemon stays up.
    let bad = tessera()
        .args([
            "mount",
            "--daemon",
            &sock,
            &format!("{}/d/missing:t", s.addr),
        ])
        .arg(&da)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("could not mount"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // --store belongs to the daemon.
    let refused = tessera()
        .args(["mount", "--daemon", &sock, &ra])
        .arg(&da)
        .arg("--store")
        .arg(&store)
        .output()
        .unwrap();
    assert!(!refused.status.success());

    // umount lets one mount go: its pin goes with it.
    run_ok(tessera().arg("umount").arg(&da));
    let start = Instant::now();
    loop {
        let (st, _) = cache_json("stats", &store, &[]);
        if st["mounts"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "pin kept: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");

    // SIGTERM unmounts everything, removes the socket and exits cleanly.
    stop_mountd(&mut daemon);
    assert!(!is_mounted(&db) && !is_mounted(&da));
    assert!(!socket.exists());
    let (st, _) = cache_json("stats", &store, &[]);
    assert_eq!(st["mounts"].as_array().unwrap().len(), 0, "{st}");
    drop(s);
}

/// A small synthetic image — a setuid program, a device node and a few files of many
/// chunks each — in an OCI layout under `work`; returns its reference.
fn small_source(work: &Path) -> String {
    let mut t = TarBuilder::new();
    t.dir(b"bin", 0o755)
        .file(b"bin/su", 0o4755, b"#!/bin/sh\necho root\n")
        .dir(b"dev", 0o755)
        .special(tar::EntryType::Char, "dev/null", 0o666, 1, 3)
        .dir(b"data", 0o755);
    for i in 0..4u64 {
        t.file(
            format!("data/f{i}").as_bytes(),
            0o644,
            &noise(600_000, i + 1),
        );
    }
    let src = work.join("src");
    write_one_layer(&src, "t", t.finish(), "gzip");
    format!("oci:{}:t", src.display())
}

/// [`small_source`] converted into a tessera image in an OCI layout under `work`.
fn small_image(work: &Path) -> String {
    let r = format!("oci:{}:t", work.join("tessera").display());
    convert(&small_source(work), &r, &[]);
    r
}

/// (per-mount options, superblock options) of the mount on `dir`.
fn mount_options(dir: &Path) -> (String, String) {
    let dir = std::fs::canonicalize(dir).unwrap();
    let dir = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(&*dir))
        .map(|l| {
            let (pre, post) = l.split_once(" - ").unwrap();
            (
                pre.split(' ').nth(5).unwrap().to_string(),
                post.split(' ').nth(2).unwrap_or("").to_string(),
            )
        })
        .unwrap_or_else(|| panic!("nothing mounted on {dir}"))
}

fn has_opt(opts: &str, o: &str) -> bool {
    opts.split(',').any(|x| x == o)
}

#[test]
fn mounts_are_nosuid_nodev_and_private_unless_asked() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let r = small_image(work.path());
    let (mnt, store) = (work.path().join("mnt"), work.path().join("store"));
    let m = Mounted::start(&r, &mnt, &store);
    let (per, sup) = mount_options(&mnt);
    assert!(has_opt(&per, "nosuid") && has_opt(&per, "nodev"), "{per}");
    assert!(!has_opt(&sup, "allow_other"), "{sup}");
    drop(m);
    // What a container runtime asks for.
    let m = Mounted::start_with(&r, &mnt, &store, &["--allow-other", "--suid", "--dev"]);
    let (per, sup) = mount_options(&mnt);
    assert!(!has_opt(&per, "nosuid") && !has_opt(&per, "nodev"), "{per}");
    assert!(has_opt(&sup, "allow_other"), "{sup}");
    drop(m);
    // The overlay of a writable mount too.
    let m = Mounted::start_with(&r, &mnt, &store, &["--writable"]);
    let (per, _) = mount_options(&mnt);
    assert!(has_opt(&per, "nosuid") && has_opt(&per, "nodev"), "{per}");
    drop(m);
}

#[test]
fn a_mount_process_only_ever_unmounts_its_own_mount() {
    require_fuse();
    common::require_tool("unshare", "util-linux");
    let work = tempfile::tempdir().unwrap();
    let r = small_image(work.path());
    let (mnt, store) = (work.path().join("mnt"), work.path().join("store"));
    let mut old = Mounted::start(&r, &mnt, &store);
    // A copy of the mount in another mount namespace keeps the old FUSE connection
    // alive past `tessera umount` (as a container's namespace does).
    let mut holder = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "300"])
        .spawn()
        .unwrap();
    let canon = std::fs::canonicalize(&mnt).unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{}/mountinfo", holder.id()))
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*canon.to_string_lossy()))
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the namespace copy never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    run_ok(tessera().arg("umount").arg(&mnt));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old mount process ended though its connection is still in use"
    );
    // A newer mount at the same path, then the old connection's last mount goes.
    let new = Mounted::start(&r, &mnt, &store);
    let _ = holder.kill();
    let _ = holder.wait();
    wait_exit(
        &mut old.child,
        "the old mount process did not end once its mount was gone",
    );
    assert!(
        is_mounted(&mnt),
        "the old mount process unmounted the newer mount"
    );
    assert_eq!(
        std::fs::read(mnt.join("data/f0")).unwrap(),
        noise(600_000, 1),
        "the newer mount does not serve"
    );
    drop(new);
}

/// Entries of `dir` (0 when it does not exist).
fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

#[test]
fn default_overlay_directories_are_unique_and_removed_and_relative_uppers_unmount() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let r = small_image(work.path());
    let store = work.path().join("store");
    let overlays = store.join("overlays");
    // Two writable mounts of one process: two fresh directories, gone after unmount.
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let mut child = tessera()
        .args(["mount", "--writable", "--store"])
        .arg(&store)
        .arg(&r)
        .arg(&a)
        .arg(&r)
        .arg(&b)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("mounted "), "{line:?}");
    }
    std::fs::write(a.join("new"), b"x").unwrap();
    assert_eq!(entries(&overlays), 2);
    for d in [&a, &b] {
        run_ok(tessera().arg("umount").arg(d));
    }
    wait_exit(&mut child, "mount did not exit");
    assert_eq!(entries(&overlays), 0, "overlay directories left behind");

    // A relative --upper: umount takes down the overlay and the image under it, the
    // process exits, the changes stay.
    let mnt = work.path().join("rel");
    let mut m = Mounted::start_in(
        Some(work.path()),
        &r,
        &mnt,
        &store,
        &["--writable", "--upper", "ov-rel"],
        None,
    );
    std::fs::write(mnt.join("kept"), b"y").unwrap();
    let lower = work.path().join("ov-rel/lower");
    assert!(is_mounted(&lower));
    m.umount();
    assert!(
        !is_mounted(&mnt) && !is_mounted(&lower),
        "mounts left behind"
    );
    assert_eq!(
        std::fs::read(work.path().join("ov-rel/upper/kept")).unwrap(),
        b"y"
    );
}

#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let work = tempfile::tempdir().unwrap();
    let r = small_image(work.path());
    let store = work.path().join("store");
    let store_s = store.to_string_lossy().to_string();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    for (d, n) in [(&a, 0), (&b, 200)] {
        std::fs::create_dir_all(d).unwrap();
        for i in n..n + 200 {
            std::fs::write(d.join(format!("f{i}")), b"x").unwrap();
        }
    }
    let (a_s, b_s) = (a.to_string_lossy(), b.to_string_lossy());
    let commands: [&[&str]; 5] = [
        &["cache", "stats", "--store", &store_s],
        &["cache", "stats", "--json", "--store", &store_s],
        &["inspect", &r],
        &["inspect", "--json", &r],
        &["diff-tree", &a_s, &b_s],
    ];
    for args in commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = tessera()
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "tessera {args:?}: {err}");
        assert!(
            matches!(out.status.code(), Some(0 | 1 | 141)),
            "tessera {args:?}: {:?} {err}",
            out.status
        );
    }
}

/// A front for a registry that ignores `Range` (answers every GET with the whole blob,
/// 200), counting the GETs of each blob.
struct NoRangeFront {
    addr: String,
    gets: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    _rt: tokio::runtime::Runtime,
}

impl NoRangeFront {
    fn start(upstream: &str) -> NoRangeFront {
        use axum::body::Body;
        use axum::http::{Method, Request};
        use std::sync::{Arc, Mutex};
        let (rt, listener, addr) = front_listener();
        let gets: Arc<Mutex<std::collections::HashMap<String, u64>>> = Arc::default();
        let (up, g) = (upstream.to_string(), gets.clone());
        let client = reqwest::Client::new();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let (up, g, client) = (up.clone(), g.clone(), client.clone());
            async move {
                let path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                if req.method() == Method::GET {
                    if let Some((_, d)) = path.split_once("/blobs/") {
                        *g.lock().unwrap().entry(d.to_string()).or_default() += 1;
                    }
                }
                // Everything but Range goes through.
                forward(&client, &up, &path, req, |h| h != "range" && h != "host").await
            }
        });
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        NoRangeFront {
            addr,
            gets,
            _rt: rt,
        }
    }

    fn gets(&self, digest: &str) -> u64 {
        self.gets.lock().unwrap().get(digest).copied().unwrap_or(0)
    }
}

#[test]
fn a_registry_that_ignores_range_costs_one_get_per_pack() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let s = TesseraServe::start();
    let r = format!("{}/norange/img:t", s.addr);
    convert(&small_source(work.path()), &r, &[]);
    let unpacked = work.path().join("unpacked");
    run_ok(tessera().args(["unpack", &r]).arg(&unpacked));
    let summary = run_json(tessera().args(["inspect", "--json", &r]));
    let packs: Vec<String> = summary["packs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["digest"].as_str().unwrap().to_string())
        .collect();
    assert!(
        summary["chunks"].as_u64().unwrap() > 8 * packs.len() as u64,
        "{summary}"
    );
    let front = NoRangeFront::start(&s.addr);
    let m = Mounted::start_with(
        &format!("{}/norange/img:t", front.addr),
        &work.path().join("mnt"),
        &work.path().join("store"),
        &["--no-profile", "--readahead", "0", "--amplify", "0"],
    );
    for i in 0..4 {
        let f = format!("data/f{i}");
        assert!(
            std::fs::read(m.dir.join(&f)).unwrap() == std::fs::read(unpacked.join(&f)).unwrap(),
            "{f}"
        );
    }
    for p in &packs {
        assert_eq!(front.gets(p), 1, "GETs of pack {p}");
    }
    // Served from the node store from now on: no more requests.
    assert!(
        std::fs::read(m.dir.join("data/f0")).unwrap()
            == std::fs::read(unpacked.join("data/f0")).unwrap()
    );
    let total: u64 = packs.iter().map(|p| front.gets(p)).sum();
    assert_eq!(total, packs.len() as u64);
}

#[test]
fn the_node_daemon_mounts_writable_images_privately_and_cleans_up() {
    require_fuse();
    let work = tempfile::tempdir().unwrap();
    let r = small_image(work.path());
    let socket = work.path().join("mountd.sock");
    let store = work.path().join("store");
    let mut daemon = start_mountd(&socket, &store);
    let sock = socket.to_string_lossy().to_string();
    // A relative mount point and options travel absolute; the mount is nosuid,nodev.
    std::fs::create_dir_all(work.path().join("w")).unwrap();
    let got = run_ok(tessera().current_dir(work.path()).args([
        "mount",
        "--daemon",
        &sock,
        &r,
        "w",
        "--writable",
    ]));
    assert!(got.starts_with("mounted "), "{got}");
    let w = work.path().join("w");
    let (per, _) = mount_options(&w);
    assert!(has_opt(&per, "nosuid") && has_opt(&per, "nodev"), "{per}");
    std::fs::write(w.join("scratch"), b"z").unwrap();
    assert_eq!(std::fs::read(w.join("data/f1")).unwrap(), noise(600_000, 2));
    assert_eq!(entries(&store.join("overlays")), 1);
    let (st, _) = cache_json("stats", &store, &[]);
    assert_eq!(st["mounts"].as_array().unwrap().len(), 1, "{st}");
    // umount: the mount, its pin and its fresh overlay directory go; the daemon stays.
    run_ok(tessera().arg("umount").arg(&w));
    let start = Instant::now();
    loop {
        let (st, _) = cache_json("stats", &store, &[]);
        if st["mounts"].as_array().unwrap().is_empty() && entries(&store.join("overlays")) == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not let go: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
    // SIGTERM unmounts everything, removes the socket and exits cleanly.
    let ro = work.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    run_ok(tessera().args(["mount", "--daemon", &sock, &r]).arg(&ro));
    stop_mountd(&mut daemon);
    assert!(!is_mounted(&ro) && !socket.exists());
}

/// Regular files under `dir` (recursively), largest first.
fn files_by_size(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push((e.metadata().unwrap().len(), e.path()));
            }
        }
    }
    out.sort_by(|a, b| b.cmp(a));
    out
}

/// Reads `files` whole with 4 threads.
fn read_all(files: &[PathBuf]) {
    std::thread::scope(|s| {
        for part in files.chunks(files.len().div_ceil(4).max(1)) {
            s.spawn(move || {
                for f in part {
                    std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                }
            });
        }
    });
}

/// Bytes one busy period of range requests must carry before the mount judges its link
/// (`LINK_SAMPLE` in crates/mount/src/fetch.rs).
fn fetch_sample() -> u64 {
    4 << 20
}

/// The kernel's readahead of the FUSE mount at `dir` (its bdi), in KiB.
fn kernel_readahead_kb(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).unwrap().dev();
    let p = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{p}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// The link is judged from the range requests, past a token-bucket burst: behind a 1 MB
/// burst a 100 Mbit/s link (whose first megabyte, the index among it, arrives at line
/// rate, so the first guess is "fast") is found slow: the kernel reads ahead 16 KiB, the
/// daemon asks the registry for what readers ask for. The same mount turns fast once the
/// shaping is gone. Before, the index download alone decided, for the mount's life.
#[test]
fn the_link_speed_is_measured_past_a_burst() {
    require_fuse();
    // Its own name: a second run of the suite beside this one does not delete it.
    let ns = TestNetns::create(&format!("tessera-t-link-{}", std::process::id()));
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("registry");
    std::fs::create_dir_all(&root).unwrap();
    let s = TesseraServe::start_in_netns(&root, &[], Some(&ns.name));
    let r = format!("{}/lib/debian:tessera", s.addr);
    run_ok(tessera_in(Some(&ns.name)).args([
        "convert",
        "--no-cache",
        &corpus_archive("debian-base"),
        &r,
    ]));
    ns.shape_loopback(Some(("100mbit", "1mb")));

    let (store, mnt) = (work.path().join("store"), work.path().join("mnt"));
    let cmd = tessera_in(Some(&ns.name));
    let m = Mounted::start_cmd(cmd, None, &r, &mnt, &store, &[], None);
    // Two sets of files of 35 MB each (10+ MB stored compressed: more than LINK_SAMPLE),
    // the largest ones first.
    let (mut first, mut second, mut n) = (Vec::new(), Vec::new(), 0u64);
    for (len, f) in files_by_size(&mnt) {
        if n < 35_000_000 {
            first.push(f);
        } else if n < 70_000_000 {
            second.push(f);
        } else {
            break;
        }
        n += len;
    }
    assert!(n >= 70_000_000, "debian-base has {n} bytes of files");
    let t = Instant::now();
    read_all(&first);
    let took = t.elapsed();
    let c = counters(&store, m.child.id());
    assert!(
        c["bytes_fetched"].as_u64().unwrap() > 2 * fetch_sample(),
        "too little fetched to judge the link: {c}"
    );
    assert_eq!(
        c["link_fast"], false,
        "a 100mbit link behind a 1 MB burst taken for fast (read 35 MB in {took:?}): {c}"
    );
    assert_eq!(kernel_readahead_kb(&mnt), 16);

    ns.shape_loopback(None);
    read_all(&second);
    let c = counters(&store, m.child.id());
    assert_eq!(
        c["link_fast"], true,
        "an unshaped loopback taken for slow: {c}"
    );
    assert_eq!(
        kernel_readahead_kb(&mnt),
        128,
        "the kernel's readahead follows the link"
    );
    drop(m);
    drop(s);
}
