//! End-to-end tests of `tessera serve` with real OCI clients: podman (push a corpus
//! image, remove it, pull it back), buildah (build from scratch and push), containerd
//! (`ctr image pull` of an image skopeo pushed) and the `oras` Python client (chunked
//! artifact push, referrers with `subject`, pull). Every test starts its own server on
//! a loopback port and gives the client its own storage under a temporary directory;
//! every external command runs with a time limit. The server runs with `-vv`, so its
//! per-request log (printed when a test fails) shows what the client sent.

mod common;
use common::serve::*;
use common::{noise, require_root, require_tool, sha};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest any single client command may take before the test fails (a hang guard;
/// the commands normally finish in seconds).
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

// ---- helpers ----------------------------------------------------------------------------

/// Output of a finished command.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Run a command with a time limit; kills it (and its process group, so no helper it
/// started keeps the output pipes open) and panics when the limit is reached.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Ran {
    use std::os::unix::process::CommandExt as _;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_child(&child),
                rustix::process::Signal::KILL,
            );
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    let Some(status) = status else {
        panic!("{what} did not finish within {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    };
    Ran {
        ok: status.success(),
        stdout,
        stderr,
    }
}

/// Run with the default time limit and require success; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let r = run_bounded(cmd, CMD_TIMEOUT);
    assert!(
        r.ok,
        "{what} failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
        r.stdout, r.stderr
    );
    r.stdout
}

/// The last non-empty line of a command's output.
fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("no output line in {s:?}"))
        .to_string()
}

/// The corpus OCI layout (`$TESSERA_CORPUS/layout`).
fn corpus_layout() -> PathBuf {
    let root = std::env::var_os("TESSERA_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/tessera/corpus"));
    let layout = root.join("layout");
    assert!(
        layout.join("index.json").is_file(),
        "corpus OCI layout missing at {} (set TESSERA_CORPUS; scripts/test.sh builds the corpus)",
        layout.display()
    );
    layout
}

/// A corpus image: its tag in the layout, manifest digest and config digest.
struct CorpusImage {
    layout: PathBuf,
    tag: String,
    config_digest: String,
}

/// The smallest single-manifest image of the corpus (by compressed size in
/// summary.json), checked to be tagged in the layout's index.json.
fn smallest_corpus_image() -> CorpusImage {
    let layout = corpus_layout();
    let summary_path = layout.parent().unwrap().join("summary.json");
    let summary: Value = serde_json::from_slice(
        &std::fs::read(&summary_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", summary_path.display())),
    )
    .unwrap();
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let tagged = |name: &str| {
        index["manifests"].as_array().unwrap().iter().any(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"] == name
                && m["mediaType"] == OCI_MANIFEST
        })
    };
    let img = summary["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| tagged(i["name"].as_str().unwrap()))
        .min_by_key(|i| i["compressed_total"].as_u64().unwrap())
        .expect("no tagged image manifest in the corpus summary");
    CorpusImage {
        layout,
        tag: img["name"].as_str().unwrap().to_string(),
        config_digest: img["config_digest"].as_str().unwrap().to_string(),
    }
}

fn start_server() -> TesseraServe {
    TesseraServe::start_args(&["-vv"])
}

/// GET a manifest; asserts 200 and that Docker-Content-Digest is the sha256 of the
/// body. Returns (digest, parsed manifest, media type).
fn fetch_manifest(s: &TesseraServe, repo: &str, reference: &str) -> (String, Value, String) {
    let r = expect_status(
        s.get_manifest(repo, reference),
        200,
        &format!("GET manifest {repo}:{reference}"),
    );
    let digest = header(&r, "docker-content-digest").expect("no Docker-Content-Digest");
    let ct = header(&r, "content-type").expect("no Content-Type");
    let body = r.bytes().unwrap();
    assert_eq!(
        sha(&body),
        digest,
        "Docker-Content-Digest of {repo}:{reference} is not the digest of the body"
    );
    (digest, serde_json::from_slice(&body).unwrap(), ct)
}

/// GET a blob; asserts 200 and that its sha256 (and size) match. Returns the bytes.
fn fetch_blob(s: &TesseraServe, repo: &str, desc: &Value) -> Vec<u8> {
    let digest = desc["digest"].as_str().unwrap();
    let r = expect_status(
        s.get(&format!("/v2/{repo}/blobs/{digest}")),
        200,
        &format!("GET blob {digest} in {repo}"),
    );
    let body = r.bytes().unwrap().to_vec();
    assert_eq!(sha(&body), digest, "blob {digest} in {repo}: wrong content");
    if let Some(size) = desc["size"].as_u64() {
        assert_eq!(
            body.len() as u64,
            size,
            "blob {digest} in {repo}: wrong size"
        );
    }
    body
}

fn tags(s: &TesseraServe, repo: &str) -> Value {
    let r = expect_status(
        s.get(&format!("/v2/{repo}/tags/list")),
        200,
        &format!("GET tags of {repo}"),
    );
    r.json().unwrap()
}

// ---- podman ----------------------------------------------------------------------------

/// podman (or buildah) with storage, run and tmp directories of its own: nothing of the
/// machine's container storage is read or written.
struct Isolated {
    tool: &'static str,
    dir: tempfile::TempDir,
}

impl Isolated {
    fn new(tool: &'static str) -> Isolated {
        Isolated {
            tool,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self) -> Command {
        let d = self.dir.path();
        let tmp = d.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let mut c = Command::new(self.tool);
        c.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args(["--storage-driver", "vfs"]);
        if self.tool == "podman" {
            c.arg("--tmpdir")
                .arg(d.join("libpod"))
                .arg("--network-config-dir")
                .arg(d.join("networks"))
                .args(["--events-backend", "none", "--cgroup-manager", "cgroupfs"]);
        }
        // Big temporary files (layer copies) go here rather than /var/tmp.
        c.env("TMPDIR", &tmp);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        run_ok(self.cmd().args(args))
    }
}

#[test]
fn podman_push_and_pull_corpus_image() {
    require_root();
    require_tool("podman", "podman");
    let img = smallest_corpus_image();
    let s = start_server();
    let p = Isolated::new("podman");

    // Load the corpus image into the private storage; its image ID is the config
    // digest.
    let id = last_line(&p.run(&[
        "pull",
        "-q",
        &format!("oci:{}:{}", img.layout.display(), img.tag),
    ]));
    assert_eq!(
        format!("sha256:{id}"),
        img.config_digest,
        "podman image ID of the corpus image {}",
        img.tag
    );

    let remote = format!("{}/podman/img:tag", s.addr);
    p.run(&["push", "--tls-verify=false", &id, &remote]);

    // The registry has the tag, and the manifest it serves references the same config.
    assert_eq!(
        tags(&s, "podman/img"),
        serde_json::json!({"name": "podman/img", "tags": ["tag"]})
    );
    let (manifest_digest, manifest, _) = fetch_manifest(&s, "podman/img", "tag");
    assert_eq!(manifest["config"]["digest"], img.config_digest.as_str());
    let config = fetch_blob(&s, "podman/img", &manifest["config"]);
    assert_eq!(sha(&config), img.config_digest);
    for l in manifest["layers"].as_array().unwrap() {
        let r = expect_status(
            s.head(&format!(
                "/v2/podman/img/blobs/{}",
                l["digest"].as_str().unwrap()
            )),
            200,
            "HEAD pushed layer",
        );
        assert_eq!(
            header(&r, "content-length").and_then(|v| v.parse::<u64>().ok()),
            l["size"].as_u64(),
            "HEAD Content-Length of layer {}",
            l["digest"]
        );
    }

    // Remove it locally and pull it back from tessera.
    p.run(&["rmi", "-f", &id]);
    let left = p.run(&["images", "-q", "--no-trunc"]);
    assert!(left.trim().is_empty(), "images left after rmi: {left}");
    let pulled = last_line(&p.run(&["pull", "-q", "--tls-verify=false", &remote]));
    assert_eq!(pulled, id, "image ID after pulling from tessera");
    let inspect = p.run(&[
        "image",
        "inspect",
        "--format",
        "{{.ID}} {{.Digest}}",
        &remote,
    ]);
    assert_eq!(
        inspect.trim(),
        format!("{id} {manifest_digest}"),
        "podman image inspect after the pull (ID, manifest digest)"
    );
}

// ---- buildah ---------------------------------------------------------------------------

#[test]
fn buildah_push_from_scratch() {
    require_root();
    require_tool("buildah", "buildah");
    let s = start_server();
    let b = Isolated::new("buildah");
    let work = tempfile::tempdir().unwrap();
    let content = b"hello from buildah, stored by tessera\n";
    let file = work.path().join("hello.txt");
    std::fs::write(&file, content).unwrap();

    let ctr = last_line(&b.run(&["from", "--name", "tessera-work", "scratch"]));
    assert_eq!(ctr, "tessera-work");
    b.run(&["copy", &ctr, file.to_str().unwrap(), "/hello.txt"]);
    let id = last_line(&b.run(&["commit", "-q", &ctr, "localhost/tessera-bx:latest"]));
    let digestfile = work.path().join("digest");
    b.run(&[
        "push",
        "--tls-verify=false",
        "--digestfile",
        digestfile.to_str().unwrap(),
        &id,
        &format!("docker://{}/buildah/x:1", s.addr),
    ]);
    let pushed = std::fs::read_to_string(&digestfile).unwrap();

    let (digest, manifest, ct) = fetch_manifest(&s, "buildah/x", "1");
    assert_eq!(
        digest,
        pushed.trim(),
        "served digest vs buildah --digestfile"
    );
    assert_eq!(manifest["mediaType"].as_str(), Some(ct.as_str()));
    let config = fetch_blob(&s, "buildah/x", &manifest["config"]);
    assert_eq!(
        sha(&config),
        format!("sha256:{id}"),
        "config is the image ID"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let blob = fetch_blob(&s, "buildah/x", &layers[0]);

    // The layer is a tar (possibly compressed) holding the copied file.
    let mt = layers[0]["mediaType"].as_str().unwrap();
    let tar_bytes = if mt.ends_with("gzip") {
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(&blob[..])
            .read_to_end(&mut v)
            .unwrap();
        v
    } else if mt.ends_with("zstd") {
        zstd::decode_all(&blob[..]).unwrap()
    } else {
        blob
    };
    let config: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0].as_str(),
        Some(sha(&tar_bytes).as_str()),
        "diff_id is the digest of the uncompressed layer"
    );
    let mut found = None;
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        if path.trim_start_matches("./").trim_start_matches('/') == "hello.txt" {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            found = Some(v);
        }
    }
    assert_eq!(
        found.as_deref(),
        Some(&content[..]),
        "hello.txt in the pushed layer"
    );
    assert_eq!(
        tags(&s, "buildah/x"),
        serde_json::json!({"name": "buildah/x", "tags": ["1"]})
    );
}

// ---- containerd ------------------------------------------------------------------------

/// A private containerd (own root, state and socket), stopped on drop.
struct Containerd {
    child: std::process::Child,
    sock: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sock = d.join("containerd.sock");
        let cfg = d.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{sock}"
"#,
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = sock.display(),
            ),
        )
        .unwrap();
        let log = d.join("containerd.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone().unwrap()))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("start containerd");
        let mut c = Containerd {
            child,
            sock,
            log,
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            if let Some(st) = c.child.try_wait().unwrap() {
                panic!("containerd exited ({st}) during startup:\n{}", c.log_text());
            }
            if c.sock.exists() {
                let r = run_bounded(c.ctr().arg("version"), Duration::from_secs(10));
                if r.ok {
                    return c;
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "containerd did not answer on {} within 30 s:\n{}",
                    c.sock.display(),
                    c.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctr --address SOCK -n tessera-test`
    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.sock)
            .args(["-n", "tessera-test"]);
        c
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- containerd log ---\n{}", self.log_text());
        }
    }
}

#[test]
fn containerd_pulls_image_pushed_by_skopeo() {
    require_root();
    require_tool("containerd", "containerd");
    require_tool("ctr", "containerd");
    require_tool("skopeo", "skopeo");
    let img = smallest_corpus_image();
    let s = start_server();
    let ctd = Containerd::start();

    let remote = format!("{}/ctr/img:tag", s.addr);
    run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:{}", img.layout.display(), img.tag),
        &format!("docker://{remote}"),
    ]));
    let raw = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{remote}"),
    ]));
    let pushed = sha(raw.as_bytes());
    let (served, manifest, _) = fetch_manifest(&s, "ctr/img", "tag");
    assert_eq!(served, pushed, "GET digest vs skopeo inspect --raw");
    assert_eq!(manifest["config"]["digest"], img.config_digest.as_str());

    // The native snapshotter unpacks without mounts (works in any container).
    run_ok(ctd.ctr().args([
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        &remote,
    ]));
    let ls = run_ok(ctd.ctr().args(["image", "ls"]));
    let line = ls
        .lines()
        .find(|l| l.split_whitespace().next() == Some(remote.as_str()))
        .unwrap_or_else(|| panic!("{remote} not in `ctr image ls`:\n{ls}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols.get(1).copied(), Some(OCI_MANIFEST), "type in {line:?}");
    assert_eq!(
        cols.get(2).copied(),
        Some(pushed.as_str()),
        "digest in {line:?}"
    );

    // Unpacking checked each layer's diff_id: the image has a snapshot per layer.
    let snaps = run_ok(
        ctd.ctr()
            .args(["snapshots", "--snapshotter", "native", "ls"]),
    );
    let n = snaps
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    assert_eq!(
        n,
        manifest["layers"].as_array().unwrap().len(),
        "snapshots after unpack:\n{snaps}"
    );
}

// ---- oras (Python) ---------------------------------------------------------------------

const ORAS_SCRIPT: &str = r#"
import hashlib, json, sys
import oras.client, oras.oci

host, outdir = sys.argv[1], sys.argv[2]
c = oras.client.OrasClient(hostname=host, insecure=True)
res = {}

# 1. The artifact: one file, uploaded in 16 KiB chunks (POST, PATCH..., PUT).
r = c.push(target=f"{host}/oras/art:v1", files=["art.bin"], do_chunked=True,
           chunk_size=16384, manifest_config=":application/vnd.example.thing.v1")
res["push_status"] = r.status_code
res["push_digest"] = r.headers.get("Docker-Content-Digest")

# The subject descriptor is taken from the bytes the registry serves.
g = c.do_request(f"http://{host}/v2/oras/art/manifests/v1", "GET",
                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
assert g.status_code == 200, (g.status_code, g.text)
body = g.content
digest = "sha256:" + hashlib.sha256(body).hexdigest()
res["artifact_digest"] = digest
res["artifact_header_digest"] = g.headers.get("Docker-Content-Digest")
subject = oras.oci.Subject(mediaType="application/vnd.oci.image.manifest.v1+json",
                           digest=digest, size=len(body))

# 2. A referrer pushed by oras with `subject`: its artifactType is its config mediaType.
r = c.push(target=f"{host}/oras/art:sig", files=["sig.txt"], subject=subject,
           manifest_config=":application/vnd.example.signature.v1")
res["sig_status"] = r.status_code
res["sig_digest"] = r.headers.get("Docker-Content-Digest")
res["sig_oci_subject"] = r.headers.get("OCI-Subject")

# 3. An OCI 1.1 style referrer with an explicit artifactType and the empty config,
#    uploaded with oras' upload_manifest.
empty = {"mediaType": "application/vnd.oci.empty.v1+json",
         "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
         "size": 2}
with open("empty.json", "w") as f:
    f.write("{}")
r = c.upload_blob("empty.json", c.get_container(f"{host}/oras/art:sbom"), dict(empty))
assert r.status_code in (200, 201, 202), (r.status_code, r.text)
m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "artifactType": "application/vnd.example.sbom.v1", "config": empty,
     "layers": [empty], "subject": {"mediaType": subject.mediaType,
     "digest": subject.digest, "size": subject.size},
     "annotations": {"org.example.kind": "sbom"}}
r = c.upload_manifest(m, c.get_container(f"{host}/oras/art:sbom"))
res["sbom_status"] = r.status_code
res["sbom_digest"] = r.headers.get("Docker-Content-Digest")
res["sbom_oci_subject"] = r.headers.get("OCI-Subject")

# 4. Pull the artifact back.
res["pulled"] = c.pull(target=f"{host}/oras/art:v1", outdir=outdir)
print(json.dumps(res))
"#;

#[test]
fn oras_push_referrers_and_pull() {
    // scripts/test.sh installs oras into a virtual environment and names its python here.
    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    require_tool(&python, "python3");
    let probe = run_bounded(
        Command::new(&python).args(["-c", "import oras.client, oras.oci"]),
        Duration::from_secs(30),
    );
    assert!(
        probe.ok,
        "the Python package oras is required for this test: `python3 -m venv V && V/bin/pip install oras`, then TESSERA_PYTHON=V/bin/python3 (scripts/test.sh does this)\n{}",
        probe.stderr
    );
    let s = start_server();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let art = noise(100_000, 77);
    std::fs::write(w.join("art.bin"), &art).unwrap();
    std::fs::write(w.join("sig.txt"), b"signature bytes\n").unwrap();
    std::fs::write(w.join("script.py"), ORAS_SCRIPT).unwrap();
    let out = w.join("pulled");
    std::fs::create_dir_all(&out).unwrap();

    let stdout = run_ok(
        Command::new(&python)
            .arg(w.join("script.py"))
            .arg(&s.addr)
            .arg(&out)
            .current_dir(w),
    );
    let res: Value = serde_json::from_str(&last_line(&stdout))
        .unwrap_or_else(|e| panic!("script output is not JSON ({e}):\n{stdout}"));
    let field = |k: &str| -> String {
        res[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} missing in {res}"))
            .to_string()
    };

    let artifact = field("artifact_digest");
    assert_eq!(res["push_status"], 201, "{res}");
    assert_eq!(field("push_digest"), artifact, "PUT Docker-Content-Digest");
    assert_eq!(
        field("artifact_header_digest"),
        artifact,
        "GET Docker-Content-Digest"
    );
    for k in ["sig", "sbom"] {
        assert_eq!(res[format!("{k}_status")], 201, "{k}: {res}");
        assert_eq!(
            field(&format!("{k}_oci_subject")),
            artifact,
            "{k}: OCI-Subject header of the PUT"
        );
    }
    let sig = field("sig_digest");
    let sbom = field("sbom_digest");

    // The artifact manifest and its layer, as pushed.
    let (_, manifest, _) = fetch_manifest(&s, "oras/art", "v1");
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.example.thing.v1"
    );
    let layer = &manifest["layers"][0];
    assert_eq!(
        layer["annotations"]["org.opencontainers.image.title"],
        "art.bin"
    );
    assert_eq!(fetch_blob(&s, "oras/art", layer), art);

    // Referrers of the artifact: both, with their artifact types.
    let r = expect_status(
        s.get(&format!("/v2/oras/art/referrers/{artifact}")),
        200,
        "GET referrers",
    );
    assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(header(&r, "oci-filters-applied"), None);
    let index: Value = r.json().unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], OCI_INDEX);
    let list = index["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 2, "referrers: {index}");
    let find = |d: &str| {
        list.iter()
            .find(|e| e["digest"] == d)
            .unwrap_or_else(|| panic!("referrer {d} not listed: {index}"))
    };
    let e = find(&sig);
    assert_eq!(e["artifactType"], "application/vnd.example.signature.v1");
    assert_eq!(e["mediaType"], OCI_MANIFEST);
    let e = find(&sbom);
    assert_eq!(e["artifactType"], "application/vnd.example.sbom.v1");
    assert_eq!(e["mediaType"], OCI_MANIFEST);
    assert_eq!(e["annotations"]["org.example.kind"], "sbom");
    for e in list {
        let d = e["digest"].as_str().unwrap();
        let (_, m, _) = fetch_manifest(&s, "oras/art", d);
        assert_eq!(m["subject"]["digest"], artifact.as_str());
        let r = expect_status(s.head_manifest("oras/art", d), 200, "HEAD referrer");
        assert_eq!(
            header(&r, "content-length").and_then(|v| v.parse::<u64>().ok()),
            e["size"].as_u64(),
            "size of referrer {d}"
        );
    }

    // Filtered by artifactType.
    let r = expect_status(
        s.get(&format!(
            "/v2/oras/art/referrers/{artifact}?artifactType={}",
            pct("application/vnd.example.sbom.v1")
        )),
        200,
        "GET referrers?artifactType",
    );
    assert_eq!(
        header(&r, "oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    let filtered: Value = r.json().unwrap();
    let digests: Vec<&str> = filtered["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, [sbom.as_str()], "filtered referrers: {filtered}");

    // The pulled file is the pushed one.
    let pulled = res["pulled"].as_array().unwrap();
    assert_eq!(pulled.len(), 1, "{res}");
    let p = Path::new(pulled[0].as_str().unwrap());
    assert_eq!(p, out.join("art.bin"));
    assert!(std::fs::read(p).unwrap() == art, "pulled art.bin differs");
    let mut t = tags(&s, "oras/art")["tags"].clone();
    t.as_array_mut()
        .unwrap()
        .sort_by_key(|v| v.as_str().unwrap().to_string());
    assert_eq!(t, serde_json::json!(["sbom", "sig", "v1"]));
}
