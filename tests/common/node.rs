//! Harness for the node tests: a `tessera node` and a containerd 2.x started with their
//! own roots and sockets, corpus images pushed with skopeo, and the reference check of a
//! root filesystem (umoci unpack + the same script under chroot).
#![allow(dead_code)]

use super::serve::{http_client, TesseraServe};
use super::{require_tool, run_ok, tessera};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn corpus() -> PathBuf {
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
pub fn containerd2_bin() -> PathBuf {
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

pub fn push(addr: &str, tag: &str, dest: &str) {
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

pub fn manifest_digest(tag: &str) -> String {
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

/// The layer digests of a corpus image (the corpus is built on each machine, and gzip
/// output may differ between builds: never hard-code them).
pub fn layer_digests(tag: &str) -> Vec<String> {
    let d = manifest_digest(tag);
    let blob = corpus()
        .join("layout/blobs/sha256")
        .join(d.trim_start_matches("sha256:"));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(blob).unwrap()).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// A registry that makes twins of what is pushed, holding debian-python as
/// `lib/python:3` with its twin ready; the reference to pull.
pub fn twin_registry() -> (TesseraServe, String) {
    let a = TesseraServe::start_args(&["--convert-on-push"]);
    push(&a.addr, "debian-python", "lib/python:3");
    wait_for_twin(&a.addr, "lib/python", &manifest_digest("debian-python"));
    let python = format!("{}/lib/python:3", a.addr);
    (a, python)
}

pub fn wait_for_twin(addr: &str, repo: &str, subject: &str) -> String {
    let url = format!(
        "http://{addr}/v2/{repo}/referrers/{subject}?artifactType=application/vnd.tessera.image.v1"
    );
    let start = Instant::now();
    loop {
        let v: serde_json::Value = http_client().get(&url).send().unwrap().json().unwrap();
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
pub fn unmount_under(dir: &Path) {
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
pub struct NodeDaemon {
    pub child: Child,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub metrics: String,
    pub log: PathBuf,
}

impl NodeDaemon {
    pub fn start(root: &Path, socket: &Path, log: &Path) -> NodeDaemon {
        Self::start_args(root, socket, log, &[], &[])
    }

    /// A daemon under `work`: root `node/`, socket `tessera.sock`, log `node.log`.
    pub fn start_in(work: &Path) -> NodeDaemon {
        Self::start_in_args(work, &[], &[])
    }

    pub fn start_in_args(work: &Path, extra: &[&str], env: &[(&str, &str)]) -> NodeDaemon {
        Self::start_args(
            &work.join("node"),
            &work.join("tessera.sock"),
            &work.join("node.log"),
            extra,
            env,
        )
    }

    pub fn start_args(
        root: &Path,
        socket: &Path,
        log: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> NodeDaemon {
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
            .args(extra)
            .envs(env.iter().copied())
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

    pub fn metrics(&self) -> String {
        http_client()
            .get(&self.metrics)
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let m = self.metrics();
        m.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as an upgrade stops it; wait for it to exit (its mounts stay).
    pub fn stop(&mut self) {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )
        .ok();
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tessera node did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- tessera node log ---\n{}", self.log());
        }
        // A stopped daemon leaves its lazy mounts to the keeper (for the next daemon):
        // take them away once it is gone, and the keeper exits by itself. (Left mounted
        // with no daemon, they would block whatever walks into them, the removal of
        // the test's directory first.)
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                unmount_under(self.0);
            }
        }
        let _unmount = Unmount(&self.root);
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

/// A containerd with `tessera` as a proxy snapshotter, all under one directory
/// (`start`: containerd 2.x without CRI, for `ctr`).
pub struct Containerd {
    pub child: Child,
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub socket: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path, tessera_socket: &Path) -> Containerd {
        let socket = dir.join("containerd.sock");
        Self::start_config(
            dir,
            containerd2_bin(),
            &format!(
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
    }

    /// containerd from the directory `bin` (with its ctr and shim) on the configuration
    /// `config`, whose root, state and sockets are under `dir`, its gRPC socket
    /// `dir/containerd.sock`.
    pub fn start_config(dir: &Path, bin: PathBuf, config: &str) -> Containerd {
        require_tool("runc", "runc");
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, config).unwrap();
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

    pub fn ctr(&self) -> Command {
        let mut c = Command::new(self.bin.join("ctr"));
        c.arg("-a")
            .arg(&self.socket)
            .env("PATH", path_with(&self.bin));
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr run --rm` of `image` with the tessera snapshotter; its stdout.
    /// The container id is made unique to this containerd: runc keeps its state by
    /// namespace and id under one root for every containerd on the machine, so two tests
    /// running `py` at once would collide.
    pub fn run(&self, image: &str, id: &str, script: &str) -> String {
        run_ok(&mut self.run_cmd(image, id, script))
    }

    /// The `ctr run` command of [`Containerd::run`], to start and watch.
    pub fn run_cmd(&self, image: &str, id: &str, script: &str) -> Command {
        let unique = format!(
            "{}-{id}",
            self.dir
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().trim_start_matches('.').to_string())
                .unwrap_or_default()
        );
        let mut c = self.ctr();
        c.args([
            "run",
            "--snapshotter",
            "tessera",
            "--rm",
            image,
            &unique,
            "sh",
            "-c",
            script,
        ]);
        c
    }

    pub fn pull(&self, image: &str) -> String {
        run_ok(&mut self.pull_cmd(image))
    }

    /// `ctr image pull` of `image` with the tessera snapshotter.
    pub fn pull_cmd(&self, image: &str) -> Command {
        let mut c = self.ctr();
        c.args([
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "tessera",
            image,
        ]);
        c
    }

    pub fn content(&self) -> String {
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
        kill_shims(&self.socket);
        unmount_under(&self.dir);
    }
}

/// Kill the containers of a containerd and their shims (they outlive containerd: a
/// test that failed would leave them running, and reading from mounts nobody serves).
pub fn kill_shims(socket: &Path) {
    let address = format!("-address {}", socket.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        if !cmdline.contains("containerd-shim") || !cmdline.contains(&address) {
            continue;
        }
        // The shim's children are the containers' init processes.
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            if let Some(c) = rustix::process::Pid::from_raw(c) {
                let _ = rustix::process::kill_process(c, rustix::process::Signal::KILL);
            }
        }
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}

pub fn path_with(bin: &Path) -> String {
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    )
}

/// What the check script prints for a tree: a digest of every file under /usr with its
/// content, plus the names, types and modes of everything there.
pub const CHECK: &str = "cd / && find usr -xdev -printf '%p %y %m %l\\n' | LC_ALL=C sort | sha256sum && find usr -xdev -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum";

/// The check script's output for a corpus image unpacked by umoci (the reference).
pub fn expected(tag: &str, work: &Path) -> String {
    expected_of(tag, work, CHECK)
}

/// What `script` prints run in a corpus image unpacked by umoci (the reference).
pub fn expected_of(tag: &str, work: &Path, script: &str) -> String {
    let rootfs = super::umoci_rootfs(&corpus().join("layout"), tag, work);
    let out = run_ok(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["sh", "-c", script]),
    );
    let _ = std::fs::remove_dir_all(rootfs.parent().unwrap());
    out
}
