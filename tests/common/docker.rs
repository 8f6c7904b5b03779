//! Docker Engine started by a test: its own data root, exec root and socket under a
//! temp directory; the system's dockerd (Debian 12: 20.10) or Docker 28 unpacked from
//! Debian's unstable suite (`scripts/sid-unpack.sh`, $TESSERA_DOCKER28), optionally on
//! a containerd of the test's with a snapshotter of its choice.

use super::{require_root, require_tool};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to start a dockerd.
#[derive(Default)]
pub struct DockerdOptions {
    /// Directory holding `dockerd` and `docker` (None: the system's, from PATH).
    pub bin: Option<PathBuf>,
    /// daemon.json contents.
    pub config: Option<String>,
    /// An external containerd's socket (`--containerd`).
    pub containerd: Option<PathBuf>,
    /// Prepended to PATH (containerd's shim, runc).
    pub path: Option<String>,
    pub storage_driver: Option<String>,
}

/// Docker 28's binaries: $TESSERA_DOCKER28 (scripts/test.sh unpacks them there).
pub fn docker28_bin() -> PathBuf {
    let dir = std::env::var("TESSERA_DOCKER28")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/cache/tessera/docker28/usr/bin"));
    let ok = Command::new(dir.join("dockerd"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("version 28."));
    assert!(
        ok,
        "Docker Engine 28 is required: run `scripts/sid-unpack.sh /var/cache/tessera/docker28 docker.io docker-cli` (scripts/test.sh does this) or set TESSERA_DOCKER28 to its usr/bin"
    );
    dir
}

pub struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
    docker: PathBuf,
}

impl Dockerd {
    pub fn start() -> Dockerd {
        Self::start_with(DockerdOptions::default())
    }

    pub fn start_with(o: DockerdOptions) -> Dockerd {
        require_root();
        let (dockerd, docker) = match &o.bin {
            Some(b) => (b.join("dockerd"), b.join("docker")),
            None => {
                require_tool("dockerd", "docker.io");
                require_tool("docker", "docker.io");
                (PathBuf::from("dockerd"), PathBuf::from("docker"))
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("tessera-dockerd")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        let sock = d.join("docker.sock");
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let mut cmd = Command::new(&dockerd);
        cmd.arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"]);
        if let Some(c) = &o.config {
            std::fs::write(d.join("daemon.json"), c).unwrap();
            cmd.arg("--config-file").arg(d.join("daemon.json"));
        }
        if let Some(c) = &o.containerd {
            cmd.arg("--containerd").arg(c);
        }
        if let Some(s) = &o.storage_driver {
            cmd.args(["--storage-driver", s]);
        }
        let mut path =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        if let Some(b) = &o.bin {
            path = format!("{}:{path}", b.display());
        }
        if let Some(p) = &o.path {
            path = format!("{p}:{path}");
        }
        let child = cmd
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", dockerd.display()));
        let mut dk = Dockerd {
            child,
            dir,
            sock,
            docker,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if dk.docker(&["version"]).status.success() {
                break;
            }
            if let Ok(Some(st)) = dk.child.try_wait() {
                panic!("dockerd exited with {st}:\n{}", dk.log());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 60 s:\n{}",
                dk.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        dk
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("client")
    }

    pub fn docker(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(&self.docker);
        c.env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .env("DOCKER_CONFIG", self.config_dir())
            .args(args)
            .stdin(Stdio::null());
        bounded(&mut c, Duration::from_secs(180))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "docker {args:?} succeeded:\n{text}");
        text
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Anything dockerd left mounted under its roots goes before the directory.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let root = self.dir.path().to_string_lossy().into_owned();
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|p| p.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").args(["-l", p]).status();
            }
        }
    }
}

/// Run a command, killing it when it takes longer than `limit`.
pub fn bounded(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let pid = rustix::process::Pid::from_child(&child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            panic!("{what} did not finish within {limit:?}");
        }
    }
}
