//! Docker Engine against `tessera serve` with htpasswd auth and the bearer-token issuer:
//! an anonymous `docker pull` of a repository anonymous may pull (Docker gives up on a
//! Basic challenge, so this needs the token protocol), `docker login` + `docker push`,
//! a push that the rules deny, and a pull of a private repository without login.
//! dockerd is started by the test with its own data root, exec root and socket.

mod common;
use common::serve::TesseraServe;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Dockerd {
    fn start() -> Dockerd {
        require_root();
        require_tool("dockerd", "docker.io");
        require_tool("docker", "docker.io");
        let dir = tempfile::Builder::new()
            .prefix("tessera-dockerd")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        let sock = d.join("docker.sock");
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dockerd: {e}"));
        let mut dk = Dockerd { child, dir, sock };
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("client")
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .env("DOCKER_CONFIG", self.config_dir())
            .args(args)
            .stdin(Stdio::null());
        bounded(&mut c, Duration::from_secs(180))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
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
fn bounded(cmd: &mut Command, limit: Duration) -> std::process::Output {
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

/// A one-file image in dockerd, made from a tar by `docker import`.
fn import_image(dk: &Dockerd, dir: &Path, name: &str, content: &[u8]) {
    let tar = TarBuilder::new()
        .dir(b"etc", 0o755)
        .file(b"etc/greeting", 0o644, content)
        .finish();
    let p = dir.join("rootfs.tar");
    std::fs::write(&p, tar).unwrap();
    dk.ok(&["import", p.to_str().unwrap(), name]);
}

#[test]
fn docker_pulls_anonymously_logs_in_pushes_and_is_denied_what_rules_deny() {
    let dk = Dockerd::start();
    let work = tempfile::tempdir().unwrap();
    let reg = TesseraServe::start_with_users(work.path());
    let host = reg.addr.clone();
    let public = format!("{host}/public/hello:1");
    let private = format!("{host}/private/app:1");

    import_image(&dk, work.path(), &public, b"hello from tessera\n");
    dk.ok(&["tag", &public, &private]);

    // Anonymous push: denied (the token grants pull only).
    let out = dk.fails(&["push", &public]);
    assert!(
        out.contains("denied")
            || out.contains("unauthorized")
            || out.contains("authentication required"),
        "anonymous push: {out}"
    );

    // alice logs in (basic credentials exchanged for a token) and pushes both.
    let out = dk.ok(&["login", &host, "-u", "alice", "-p", "alice-pw"]);
    assert!(out.contains("Login Succeeded"), "{out}");
    dk.ok(&["push", &public]);
    dk.ok(&["push", &private]);
    dk.ok(&["logout", &host]);

    // A wrong password is refused at login.
    let out = dk.fails(&["login", &host, "-u", "alice", "-p", "wrong"]);
    assert!(out.contains("unauthorized") || out.contains("401"), "{out}");

    // bob may pull but not push.
    dk.ok(&["login", &host, "-u", "bob", "-p", "bob-pw"]);
    dk.ok(&["tag", &public, &format!("{host}/public/hello:bob")]);
    let out = dk.fails(&["push", &format!("{host}/public/hello:bob")]);
    assert!(
        out.contains("denied") || out.contains("unauthorized"),
        "bob's push: {out}"
    );
    dk.ok(&["logout", &host]);

    // Anonymous pull of the public repository, with nothing left locally.
    dk.ok(&[
        "rmi",
        "-f",
        &public,
        &private,
        &format!("{host}/public/hello:bob"),
    ]);
    dk.ok(&["pull", &public]);
    let id = dk.ok(&["image", "inspect", "--format", "{{.Id}}", &public]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    // The private one needs a login.
    let out = dk.fails(&["pull", &private]);
    assert!(
        out.contains("denied") || out.contains("unauthorized") || out.contains("not found"),
        "anonymous pull of a private repository: {out}"
    );
    dk.ok(&["login", &host, "-u", "bob", "-p", "bob-pw"]);
    dk.ok(&["pull", &private]);
}
