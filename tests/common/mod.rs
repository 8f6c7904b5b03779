//! Shared harness for end-to-end tests: the tessera binary, OCI layouts built from
//! hand-made tar layers, and real components (umoci, docker-registry) that the tests
//! start themselves. A missing component is a test failure with a message saying how
//! to install it (`scripts/test.sh` installs everything).
#![allow(dead_code)]

use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn tessera() -> Command {
    tessera_in(None)
}

/// `tessera` run in the network namespace `netns` (only the network: its mounts are
/// everybody's), or in this one.
pub fn tessera_in(netns: Option<&str>) -> Command {
    let bin = env!("CARGO_BIN_EXE_tessera");
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    c.arg("--no-progress");
    c
}

/// A network namespace of a test's own, with its loopback up; deleted on drop.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    /// `name` is deleted first if an interrupted run left it.
    pub fn create(name: &str) -> TestNetns {
        require_root();
        require_tool("ip", "iproute2");
        require_tool("nsenter", "util-linux");
        require_tool("tc", "iproute2");
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let ns = TestNetns { name: name.into() };
        ns.ip(&["netns", "add", name]);
        ns.ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Shapes the namespace's loopback with tbf (`rate`, `burst`), or removes the shaping.
    pub fn shape_loopback(&self, shape: Option<(&str, &str)>) {
        let n = self.name.as_str();
        match shape {
            Some((rate, burst)) => self.ip(&[
                "netns", "exec", n, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate",
                rate, "burst", burst, "latency", "100ms",
            ]),
            None => self.ip(&[
                "netns", "exec", n, "tc", "qdisc", "del", "dev", "lo", "root",
            ]),
        }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Run and require success; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run, require success and parse stdout as JSON.
pub fn run_json(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{cmd:?} printed invalid JSON ({e}): {out}"))
}

/// Digest of the index blob of the tessera image `reference` (`tessera inspect --json`).
pub fn index_digest(reference: &str) -> String {
    run_json(tessera().args(["inspect", "--json", reference]))["index_digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `tessera convert --no-cache SRC DST [EXTRA...]`, required to succeed; returns stdout.
pub fn convert(src: &str, dst: &str, extra: &[&str]) -> String {
    run_ok(
        tessera()
            .args(["convert", "--no-cache"])
            .args(extra)
            .args([src, dst]),
    )
}

/// Run and require failure; returns stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out: Output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Panics with an install hint when a tool is missing.
pub fn require_tool(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "{tool} is required for this test: install it with `apt-get install {package}` (scripts/test.sh does this)");
}

pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (device nodes, ownership, xattrs); run scripts/test.sh as root"
    );
}

/// A layer blob and its media type.
pub struct Layer {
    pub tar: Vec<u8>,
    pub compression: &'static str, // "gzip", "zstd" or "none"
}

impl Layer {
    pub fn blob(&self) -> (Vec<u8>, &'static str) {
        match self.compression {
            "gzip" => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                std::io::Write::write_all(&mut e, &self.tar).unwrap();
                (
                    e.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            "zstd" => (
                zstd::bulk::compress(&self.tar, 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            _ => (self.tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
        }
    }
}

pub fn write_blob(layout: &Path, data: &[u8]) -> String {
    let d = sha(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&d[7..]), data).unwrap();
    d
}

/// Write an OCI layout with one image tagged `tag`; `tweak` may edit the manifest JSON.
pub fn write_image(
    layout: &Path,
    tag: &str,
    layers: &[Layer],
    tweak: impl Fn(&mut serde_json::Value),
) -> String {
    std::fs::create_dir_all(layout).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let (blob, mt) = l.blob();
        diff_ids.push(sha(&l.tar));
        let d = write_blob(layout, &blob);
        descs.push(serde_json::json!({"mediaType": mt, "digest": d, "size": blob.len()}));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let cd = write_blob(layout, &config);
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    });
    tweak(&mut manifest);
    let mb = serde_json::to_vec(&manifest).unwrap();
    let md = write_blob(layout, &mb);
    let idx_path = layout.join("index.json");
    let mut idx: serde_json::Value = std::fs::read(&idx_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::json!({"schemaVersion": 2, "manifests": []}));
    let list = idx["manifests"].as_array_mut().unwrap();
    list.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
    list.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mb.len(), "annotations": {"org.opencontainers.image.ref.name": tag}}));
    std::fs::write(&idx_path, serde_json::to_vec(&idx).unwrap()).unwrap();
    md
}

/// Write an OCI layout image `tag` of one uncompressed-or-`compression` layer `tar`.
pub fn write_one_layer(
    layout: &Path,
    tag: &str,
    tar: Vec<u8>,
    compression: &'static str,
) -> String {
    write_image(layout, tag, &[Layer { tar, compression }], |_| {})
}

/// Builds tar layers entry by entry with full control over headers and PAX records.
pub struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

pub const MTIME: u64 = 1_700_000_000;

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    pub fn new() -> Self {
        TarBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }
    pub fn pax(&mut self, recs: &[(&str, &[u8])]) -> &mut Self {
        self.b
            .append_pax_extensions(recs.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }
    pub fn dir(&mut self, path: &[u8], mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.b
            .append_data(
                &mut h,
                std::ffi::OsStr::new(std::str::from_utf8(path).unwrap()),
                &[][..],
            )
            .unwrap();
        self
    }
    pub fn file(&mut self, path: &[u8], mode: u32, data: &[u8]) -> &mut Self {
        self.file_owned(path, mode, 0, 0, data)
    }
    pub fn file_owned(
        &mut self,
        path: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        use std::os::unix::ffi::OsStrExt;
        self.b
            .append_data(&mut h, std::ffi::OsStr::from_bytes(path), data)
            .unwrap();
        self
    }
    pub fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, 0o777, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }
    pub fn special(
        &mut self,
        kind: tar::EntryType,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = Self::header(kind, mode, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    /// A raw header whose path bypasses the tar crate's path checks (for hostile input).
    pub fn raw_file(&mut self, path: &[u8], data: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }
    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `umoci unpack` of an image in a layout: the reference rootfs.
pub fn umoci_rootfs(layout: &Path, tag: &str, work: &Path) -> PathBuf {
    require_tool("umoci", "umoci");
    let bundle = work.join(format!("umoci-{tag}"));
    let _ = std::fs::remove_dir_all(&bundle);
    run_ok(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&bundle),
    );
    bundle.join("rootfs")
}

/// Assert two trees are identical, listing every difference otherwise.
pub fn assert_same_tree(reference: &Path, ours: &Path) {
    let diffs =
        tessera_treediff::compare(reference, ours, &tessera_treediff::Options::default()).unwrap();
    let text: Vec<String> = diffs.iter().map(|d| d.to_string()).collect();
    assert!(
        diffs.is_empty(),
        "{} differences between {} and {}:\n{}",
        diffs.len(),
        reference.display(),
        ours.display(),
        text.join("\n")
    );
}

/// A docker-registry (CNCF Distribution) on a free loopback port, stopped on drop.
pub struct DockerRegistry {
    pub child: std::process::Child,
    pub addr: String,
    cfg: PathBuf,
    _dir: tempfile::TempDir,
}

impl DockerRegistry {
    pub fn start() -> DockerRegistry {
        Self::start_with("")
    }

    /// Start with extra top-level YAML appended to the config (e.g. an `auth:` block).
    pub fn start_with(extra_yaml: &str) -> DockerRegistry {
        require_tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{extra_yaml}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Self::spawn(&cfg);
        let r = DockerRegistry {
            child,
            addr,
            cfg,
            _dir: dir,
        };
        r.wait_listening();
        r
    }

    fn spawn(cfg: &Path) -> std::process::Child {
        Command::new("docker-registry")
            .arg("serve")
            .arg(cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry")
    }

    fn wait_listening(&self) {
        for _ in 0..100 {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("docker-registry did not start listening on {}", self.addr);
    }

    /// SIGKILL the registry (storage and port are kept for `restart`).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.cfg);
        self.wait_listening();
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub mod docker;
pub mod node;
pub mod serve;
