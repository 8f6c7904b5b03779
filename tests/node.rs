//! `tessera node` as containerd's remote snapshotter, against a real containerd 2.x
//! (started here with its own root, state and socket) and real registries on loopback:
//! lazy pulls of plain images through their tessera twins, exact root filesystems when
//! images share layers with twin-backed ones, the snapshots API's semantics through
//! `ctr`, and a daemon killed and started again.

mod common;

use common::serve::TesseraServe;
use common::{require_root, require_tool, run_ok, tessera};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn corpus() -> PathBuf {
    let c = PathBuf::from(
        std::env::var("TESSERA_CORPUS").unwrap_or_else(|_| "/var/cache/tessera/corpus".into()),
    );
    assert!(
        c.join("layout/index.json").exists(),
        "corpus missing at {}: run scripts/corpus.sh {} (scripts/test.sh does this)",
        c.display(),
        c.display()
    );
    c
}

/// containerd 2.x's binaries: $TESSERA_CONTAINERD2 (scripts/test.sh fetches them with
/// scripts/containerd2.sh), or the system's when it is 2.x.
fn containerd2_bin() -> PathBuf {
    let dir = std::env::var("TESSERA_CONTAINERD2")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/cache/tessera/containerd2/usr/bin"));
    for d in [dir, PathBuf::from("/usr/bin")] {
        let c = d.join("containerd");
        if let Ok(o) = Command::new(&c).arg("--version").output() {
            if String::from_utf8_lossy(&o.stdout).contains(" 2.") {
                return d;
            }
        }
    }
    panic!("containerd 2.x is required: run `scripts/containerd2.sh /var/cache/tessera/containerd2` (scripts/test.sh does this) or set TESSERA_CONTAINERD2 to its usr/bin");
}

fn push(addr: &str, tag: &str, dest: &str) {
    require_tool("skopeo", "skopeo");
    let src = format!("oci:{}:{tag}", corpus().join("layout").display());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src,
        &format!("docker://{addr}/{dest}"),
    ]));
}

fn manifest_digest(tag: &str) -> String {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus().join("layout/index.json")).unwrap())
            .unwrap();
    idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in the corpus"))["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn wait_for_twin(addr: &str, repo: &str, subject: &str) -> String {
    let url = format!(
        "http://{addr}/v2/{repo}/referrers/{subject}?artifactType=application/vnd.tessera.image.v1"
    );
    let start = Instant::now();
    loop {
        let v: serde_json::Value = common::serve::http_client()
            .get(&url)
            .send()
            .unwrap()
            .json()
            .unwrap();
        if let Some(d) = v["manifests"][0]["digest"].as_str() {
            return d.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no tessera twin of {repo}@{subject} after 180 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Unmount everything mounted under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", &p]).status();
    }
}

/// A `tessera node` on its own root and socket.
struct NodeDaemon {
    child: Child,
    root: PathBuf,
    socket: PathBuf,
    metrics: String,
    log: PathBuf,
}

impl NodeDaemon {
    fn start(root: &Path, socket: &Path, log: &Path) -> NodeDaemon {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = tessera()
            .args(["node", "-v", "--metrics-listen", "127.0.0.1:0", "--root"])
            .arg(root)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start tessera node");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut lines = Vec::new();
            for _ in 0..2 {
                let mut l = String::new();
                if r.read_line(&mut l).unwrap_or(0) == 0 {
                    break;
                }
                lines.push(l.trim().to_string());
            }
            let _ = tx.send(lines);
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let lines = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let metrics = lines
            .iter()
            .find_map(|l| l.strip_prefix("metrics on "))
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "tessera node did not start (stdout {lines:?}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .to_string();
        NodeDaemon {
            child,
            root: root.to_path_buf(),
            socket: socket.to_path_buf(),
            metrics,
            log: log.to_path_buf(),
        }
    }

    fn metrics(&self) -> String {
        common::serve::http_client()
            .get(&self.metrics)
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    fn metric(&self, name: &str) -> f64 {
        let m = self.metrics();
        m.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    #[allow(dead_code)]
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- tessera node log ---\n{}", self.log());
        }
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )
        .ok();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A containerd 2.x with `tessera` as a proxy snapshotter, all under one directory.
struct Containerd {
    child: Child,
    dir: PathBuf,
    bin: PathBuf,
    socket: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, tessera_socket: &Path) -> Containerd {
        require_tool("runc", "runc");
        let bin = containerd2_bin();
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"version = 3
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[proxy_plugins.tessera]
  type = "snapshot"
  address = "{tsock}"
  [proxy_plugins.tessera.exports]
    enable_remote_snapshot_annotations = "true"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "tessera"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
                tsock = tessera_socket.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new(bin.join("containerd"))
            .arg("--config")
            .arg(&cfg)
            .env("PATH", path_with(&bin))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            child,
            dir: dir.to_path_buf(),
            bin,
            socket,
        };
        let start = Instant::now();
        while Command::new(c.bin.join("ctr"))
            .arg("-a")
            .arg(&c.socket)
            .arg("version")
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd did not come up: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new(self.bin.join("ctr"));
        c.arg("-a")
            .arg(&self.socket)
            .env("PATH", path_with(&self.bin));
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr run --rm` of `image` with the tessera snapshotter; its stdout.
    fn run(&self, image: &str, id: &str, script: &str) -> String {
        run_ok(self.ctr().args([
            "run",
            "--snapshotter",
            "tessera",
            "--rm",
            image,
            id,
            "sh",
            "-c",
            script,
        ]))
    }

    fn pull(&self, image: &str) -> String {
        run_ok(self.ctr().args([
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "tessera",
            image,
        ]))
    }

    fn content(&self) -> String {
        run_ok(self.ctr().args(["content", "ls", "-q"]))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- containerd log (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unmount_under(&self.dir);
    }
}

fn path_with(bin: &Path) -> String {
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    )
}

/// What the check script prints for a tree: a digest of every file under /usr with its
/// content, plus the names, types and modes of everything there.
const CHECK: &str = "cd / && find usr -xdev -printf '%p %y %m %l\\n' | LC_ALL=C sort | sha256sum && find usr -xdev -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum";

/// The check script's output for a corpus image unpacked by umoci (the reference).
fn expected(tag: &str, work: &Path) -> String {
    let rootfs = common::umoci_rootfs(&corpus().join("layout"), tag, work);
    let out = run_ok(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["sh", "-c", CHECK]),
    );
    let _ = std::fs::remove_dir_all(rootfs.parent().unwrap());
    out
}

#[test]
fn containerd_runs_plain_images_lazily_from_their_twins_and_exactly_when_they_share_layers() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    // Registry A makes twins of what is pushed; registry B is plain (no twins).
    let a = TesseraServe::start_args(&["--convert-on-push"]);
    let b = TesseraServe::start();
    push(&a.addr, "debian-python", "lib/python:3");
    wait_for_twin(&a.addr, "lib/python", &manifest_digest("debian-python"));
    push(&b.addr, "debian-base", "lib/base:1");
    push(&b.addr, "app-pandas-a", "app/pandas:a");

    let node = NodeDaemon::start(
        &work.path().join("node"),
        &work.path().join("tessera.sock"),
        &work.path().join("node.log"),
    );
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);

    // A plain image with a twin: containerd downloads no layer, the root is lazy.
    let python = format!("{}/lib/python:3", a.addr);
    ctd.pull(&python);
    let content = ctd.content();
    for layer in ["sha256:8c6c9477ab1c", "sha256:a92f83cd0281"] {
        assert!(
            !content.contains(layer),
            "containerd downloaded layer {layer} of a twin-backed image:\n{content}"
        );
    }
    assert_eq!(node.metric("tessera_node_lazy_images"), 1.0);
    assert_eq!(node.metric("tessera_node_placeholder_layers_total"), 1.0);
    let out = ctd.run(
        &python,
        "py",
        &format!("python3 -c 'print(6*7)' && {CHECK}"),
    );
    assert!(out.starts_with("42\n"), "{out}");
    assert_eq!(out["42\n".len()..], expected("debian-python", work.path()));

    // A plain image without a twin whose only layer is the twin-backed image's lower
    // layer (same chain id, so containerd does not even ask): the placeholder is
    // downloaded and unpacked on first use, and the root is exactly that layer.
    let base = format!("{}/lib/base:1", b.addr);
    ctd.pull(&base);
    let out = ctd.run(&base, "base", CHECK);
    assert_eq!(out, expected("debian-base", work.path()));
    assert_eq!(node.metric("tessera_node_materialized_layers_total"), 1.0);

    // A plain image without a twin built on the twin-backed image's top layer (same
    // first two chain ids): its own layer is unpacked by containerd over the lazy tree.
    let pandas = format!("{}/app/pandas:a", b.addr);
    ctd.pull(&pandas);
    let out = ctd.run(&pandas, "pandas", CHECK);
    assert_eq!(out, expected("app-pandas-a", work.path()));
    assert_eq!(node.metric("tessera_node_lazy_images"), 1.0);

    // Removing the images lets containerd's GC remove every snapshot, lazy mounts too.
    for i in [&python, &base, &pandas] {
        run_ok(ctd.ctr().args(["image", "rm", "--sync", i]));
    }
    let start = Instant::now();
    loop {
        let left = run_ok(
            ctd.ctr()
                .args(["snapshots", "--snapshotter", "tessera", "ls"]),
        );
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&*node.root.to_string_lossy()))
            .count();
        if left.lines().count() <= 1 && mounted == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "snapshots or mounts left after the images were removed:\n{left}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(node.metric("tessera_node_lazy_images"), 0.0);
}
