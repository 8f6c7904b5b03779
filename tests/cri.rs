//! Kubernetes' path: containerd's CRI plugin, driven over its socket with the CRI API as
//! the kubelet drives it (pull, host-network pod, container, its log file), with
//! `tessera node` as the snapshotter, on containerd 1.6 (the CRI plugin passes the image
//! labels itself) and on containerd 2.x (CRI pulls through the transfer service, which
//! passes them when the proxy plugin exports `enable_remote_snapshot_annotations`).
//! A plain image whose twin the registry holds runs without containerd downloading a
//! layer of it, and its root filesystem is exactly umoci's.

mod common;

use common::node::*;
use common::serve::TesseraServe;
use common::{require_root, run_ok};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

/// The two tests each convert an image and run a containerd; on two cores they are
/// quicker and their deadlines safer one after the other.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn cri_of_containerd_1_6_runs_a_plain_image_lazily_from_its_twin() {
    cri_runs_plain_image_lazily(Flavor::V1_6);
}

#[test]
fn cri_of_containerd_2_runs_a_plain_image_lazily_from_its_twin() {
    cri_runs_plain_image_lazily(Flavor::V2);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    /// Debian 12's containerd (`/usr/bin`), config version 2.
    V1_6,
    /// containerd 2.x ([`containerd2_bin`]), config version 3.
    V2,
}

fn cri_runs_plain_image_lazily(flavor: Flavor) {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let bin = match flavor {
        Flavor::V1_6 => containerd16_bin(),
        Flavor::V2 => containerd2_bin(),
    };
    let work = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(work.path().to_path_buf());
    // The pod's cgroup parent; removed after containerd (dropped before it) is gone.
    let cgroup = format!("/tessera-cri-{}-{flavor:?}", std::process::id());
    let _cgroup = RemoveCgroupOnDrop(cgroup.clone());
    // Registry A makes twins of what is pushed; registry B (plain) holds the sandbox
    // image, whose layer is no layer of the image under test.
    let a = TesseraServe::start_args(&["--convert-on-push"]);
    let b = TesseraServe::start();
    push(&a.addr, "debian-python", "lib/python:3");
    let pause = push_pause(&b.addr, work.path());
    wait_for_twin(&a.addr, "lib/python", &manifest_digest("debian-python"));

    let node = NodeDaemon::start(
        &work.path().join("node"),
        &work.path().join("tessera.sock"),
        &work.path().join("node.log"),
    );
    let ctd = CriContainerd::start(
        flavor,
        bin,
        &work.path().join("containerd"),
        &node.socket,
        &pause,
        &[&a.addr, &b.addr],
    );
    let cri = &ctd.cri;

    // The sandbox image has no twin: containerd downloads and unpacks it as usual.
    assert!(
        layers("debian-base-rebuilt")
            .iter()
            .all(|l| !layers("debian-python").contains(l)),
        "the sandbox image must share no layer with the image under test"
    );
    cri.pull(&pause);
    let python = format!("{}/lib/python:3", a.addr);
    let image_id = cri.pull(&python);
    let content = ctd.content();
    for layer in layers("debian-python") {
        assert!(
            !content.contains(&layer),
            "containerd ({flavor:?}) downloaded layer {layer} of a twin-backed image:\n{content}"
        );
    }
    for layer in layers("debian-base-rebuilt") {
        assert!(
            content.contains(&layer),
            "containerd ({flavor:?}) lacks layer {layer} of the sandbox image, which has no twin: is `content ls` the store CRI pulls into?\n{content}"
        );
    }
    assert_eq!(node.metric("tessera_node_lazy_images"), 1.0);

    let logs = work.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = pod_config(&logs, &cgroup);
    let pod_id = cri.run_pod(&pod);
    let script = format!("python3 -c 'print(6*7)' && {CHECK}");
    let ctr_id = cri.create_container(&pod_id, &pod, &image_id, &script);
    cri.start_container(&ctr_id);
    let status = cri.wait_exited(&ctr_id, Duration::from_secs(300));
    let (out, err) = read_cri_log(&logs.join("check.log"));
    assert_eq!(
        status.exit_code, 0,
        "the container exited {} ({}: {}); stdout:\n{out}\nstderr:\n{err}",
        status.exit_code, status.reason, status.message
    );
    assert!(out.starts_with("42\n"), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(out["42\n".len()..], expected("debian-python", work.path()));
    assert_eq!(node.metric("tessera_node_lazy_images"), 1.0);

    // Taking the pod and the image away lets containerd's GC remove the lazy snapshot.
    cri.remove_container(&ctr_id);
    cri.remove_pod(&pod_id);
    cri.remove_image(&image_id);
    let start = Instant::now();
    while node.metric("tessera_node_lazy_images") != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the lazy image is still mounted 30 s after CRI removed it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{flavor:?}: CRI test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Debian 12's containerd 1.6 in /usr/bin (its ctr and shim beside it).
fn containerd16_bin() -> PathBuf {
    let bin = PathBuf::from("/usr/bin");
    let version = Command::new(bin.join("containerd"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        version.contains(" 1.6"),
        "containerd 1.6 is required in /usr/bin (Debian 12's: `apt-get install containerd`, scripts/test.sh does this); /usr/bin/containerd --version says {version:?}"
    );
    for tool in ["ctr", "containerd-shim-runc-v2"] {
        assert!(
            bin.join(tool).exists(),
            "/usr/bin/{tool} is missing: `apt-get install containerd`"
        );
    }
    bin
}

/// Layer digests of a corpus image.
fn layers(tag: &str) -> Vec<String> {
    let blobs = corpus().join("layout/blobs/sha256");
    let digest = manifest_digest(tag);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blobs.join(&digest[7..])).unwrap()).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// Push a sandbox ("pause") image to `addr`: the corpus' debian-base-rebuilt (a layer
/// no other image used here shares) whose process is `sleep infinity`. Returns its
/// reference.
fn push_pause(addr: &str, work: &Path) -> String {
    let src = corpus().join("layout");
    let layout = work.join("pause-layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let read = |d: &str| std::fs::read(src.join("blobs/sha256").join(&d[7..])).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&read(&manifest_digest("debian-base-rebuilt"))).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&read(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    config["config"]["Entrypoint"] = serde_json::json!(["sleep", "infinity"]);
    config["config"]["Cmd"] = serde_json::Value::Null;
    let config = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = common::write_blob(&layout, &config).into();
    manifest["config"]["size"] = config.len().into();
    for l in manifest["layers"].as_array().unwrap() {
        let hex = &l["digest"].as_str().unwrap()[7..];
        let from = src.join("blobs/sha256").join(hex);
        if std::fs::hard_link(&from, blobs.join(hex)).is_err() {
            std::fs::copy(&from, blobs.join(hex)).unwrap();
        }
    }
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let md = common::write_blob(&layout, &manifest);
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "pause"}}]}))
        .unwrap(),
    )
    .unwrap();
    let dest = format!("{addr}/pause:1");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:pause", layout.display()),
        &format!("docker://{dest}"),
    ]));
    dest
}

/// containerd with its CRI plugin on, `tessera` the snapshotter of every CRI image,
/// pulling from the loopback registries `registries` over plain HTTP.
fn cri_config(
    flavor: Flavor,
    dir: &Path,
    tessera_socket: &Path,
    sandbox_image: &str,
    registries: &[&str],
) -> String {
    let hosts = dir.join("certs.d");
    for r in registries {
        std::fs::create_dir_all(hosts.join(r)).unwrap();
        std::fs::write(
            hosts.join(r).join("hosts.toml"),
            format!(
                "server = \"http://{r}\"\n[host.\"http://{r}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
    }
    // Host-network pods need no CNI plugin; empty directories keep containerd from
    // reading the machine's.
    for d in ["cni/bin", "cni/net.d"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let common = format!(
        r#"root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[proxy_plugins.tessera]
  type = "snapshot"
  address = "{tsock}"
{exports}[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = dir.join("containerd.sock").display(),
        tsock = tessera_socket.display(),
        opt = dir.join("opt").display(),
        // 2.x's transfer service passes the image labels to proxy snapshotters that
        // ask for them; 1.6's CRI plugin passes them itself.
        exports = match flavor {
            Flavor::V1_6 => "",
            Flavor::V2 => "  [proxy_plugins.tessera.exports]\n    enable_remote_snapshot_annotations = \"true\"\n",
        },
    );
    let (hosts, cni_bin, cni_conf) = (
        hosts.display(),
        dir.join("cni/bin").display().to_string(),
        dir.join("cni/net.d").display().to_string(),
    );
    // Both: `restrict_oom_score_adj` keeps the sandbox's oom_score_adj (-998) from going
    // below containerd's own, which takes CAP_SYS_RESOURCE, which a test machine may
    // lack (runc init then dies: "can't get final child's PID from pipe: EOF");
    // `disable_apparmor` keeps CRI from loading a profile into the machine's kernel.
    match flavor {
        Flavor::V1_6 => format!(
            r#"version = 2
{common}[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "tessera"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts}"
"#
        ),
        // No `disable_snapshot_annotations` here: set at all, it sends CRI pulls back
        // to the local pull path instead of the transfer service.
        Flavor::V2 => format!(
            r#"version = 3
{common}[plugins."io.containerd.nri.v1.nri"]
  disable = true
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "tessera"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{sandbox_image}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{hosts}"
[plugins."io.containerd.cri.v1.runtime"]
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.transfer.v1.local"]
  config_path = "{hosts}"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "tessera"
"#
        ),
    }
}

/// A CRI-enabled containerd and a CRI client on its socket. Dropping it stops and
/// removes every pod it still runs before containerd is killed.
struct CriContainerd {
    flavor: Flavor,
    cri: Cri,
    ctd: Containerd,
}

impl CriContainerd {
    fn start(
        flavor: Flavor,
        bin: PathBuf,
        dir: &Path,
        tessera_socket: &Path,
        sandbox_image: &str,
        registries: &[&str],
    ) -> CriContainerd {
        std::fs::create_dir_all(dir).unwrap();
        let config = cri_config(flavor, dir, tessera_socket, sandbox_image, registries);
        let ctd = Containerd::start_config(dir, bin, &config);
        let cri = Cri::connect(&ctd.socket, || ctd.log());
        if flavor == Flavor::V2 {
            let log = ctd.log();
            assert!(
                !log.contains("Falling back to local image pull mode"),
                "containerd 2.x's CRI does not pull through the transfer service:\n{log}"
            );
        }
        CriContainerd { flavor, cri, ctd }
    }

    /// Digests in the content store of CRI's namespace.
    fn content(&self) -> String {
        run_ok(self.ctd.ctr().args(["-n", "k8s.io", "content", "ls", "-q"]))
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        let pods = self
            .cri
            .try_call("ListPodSandbox", {
                let mut c = self.cri.runtime.clone();
                async move {
                    c.list_pod_sandbox(cri::ListPodSandboxRequest::default())
                        .await
                }
            })
            .map(|r| r.items)
            .unwrap_or_default();
        for p in pods {
            let stop = self.cri.try_call("StopPodSandbox", {
                let mut c = self.cri.runtime.clone();
                let pod_sandbox_id = p.id.clone();
                async move {
                    c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id })
                        .await
                }
            });
            let remove = self.cri.try_call("RemovePodSandbox", {
                let mut c = self.cri.runtime.clone();
                let pod_sandbox_id = p.id.clone();
                async move {
                    c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id })
                        .await
                }
            });
            if let Err(e) = stop.and(remove) {
                eprintln!("cleanup ({:?}) of pod {}: {e}", self.flavor, p.id);
            }
        }
        // Whatever CRI could not stop: kill and delete its tasks so no shim outlives
        // the containerd that started it.
        if let Ok(o) = self
            .ctd
            .ctr()
            .args(["-n", "k8s.io", "tasks", "ls", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&o.stdout).lines() {
                let _ = self
                    .ctd
                    .ctr()
                    .args(["-n", "k8s.io", "tasks", "kill", "-s", "KILL", id])
                    .output();
                let _ = self
                    .ctd
                    .ctr()
                    .args(["-n", "k8s.io", "tasks", "delete", "-f", id])
                    .output();
            }
        }
    }
}

/// Removes the pod's cgroup (runc removes the containers' cgroups in it, not it), in
/// each v1 hierarchy and in the unified one.
struct RemoveCgroupOnDrop(String);

impl Drop for RemoveCgroupOnDrop {
    fn drop(&mut self) {
        let rel = self.0.trim_start_matches('/');
        let mut dirs = vec![Path::new("/sys/fs/cgroup").join(rel)];
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            dirs.extend(rd.flatten().map(|e| e.path().join(rel)));
        }
        for d in dirs {
            if d.is_dir() {
                if let Err(e) = std::fs::remove_dir(&d) {
                    eprintln!("cannot remove the pod's cgroup {}: {e}", d.display());
                }
            }
        }
    }
}

/// Unmounts what is left mounted under a directory (before the tempdir removes it).
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        unmount_under(&self.0);
    }
}

/// A blocking CRI client over containerd's Unix socket.
struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: cri::runtime_service_client::RuntimeServiceClient<Channel>,
    images: cri::image_service_client::ImageServiceClient<Channel>,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const PULL_TIMEOUT: Duration = Duration::from_secs(300);

impl Cri {
    /// Connect and wait (bounded) until the runtime service answers `Version`.
    fn connect(socket: &Path, log: impl Fn() -> String) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = socket.to_path_buf();
        // The channel's worker task is spawned on this runtime and runs while a call
        // is driven by `block_on`.
        let _enter = rt.enter();
        // The URI is required by tonic and ignored by the connector.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }));
        drop(_enter);
        let cri = Cri {
            runtime: cri::runtime_service_client::RuntimeServiceClient::new(channel.clone()),
            images: cri::image_service_client::ImageServiceClient::new(channel),
            rt,
        };
        let start = Instant::now();
        loop {
            let v = cri.try_call("Version", {
                let mut c = cri.runtime.clone();
                async move { c.version(cri::VersionRequest::default()).await }
            });
            match v {
                Ok(v) => {
                    eprintln!(
                        "CRI: {} {} (API {})",
                        v.runtime_name, v.runtime_version, v.runtime_api_version
                    );
                    break;
                }
                Err(e) => assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "containerd's CRI service does not answer after 30 s ({e}); containerd's log:\n{}",
                    log()
                ),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        cri
    }

    fn try_call_within<T>(
        &self,
        what: &str,
        timeout: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, String> {
        match self
            .rt
            .block_on(async move { tokio::time::timeout(timeout, call).await })
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!(
                "CRI {what} failed: {:?}: {}",
                s.code(),
                s.message()
            )),
            Err(_) => Err(format!("CRI {what}: no answer within {timeout:?}")),
        }
    }

    fn try_call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, String> {
        self.try_call_within(what, CALL_TIMEOUT, call)
    }

    fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> T {
        self.try_call(what, call).unwrap_or_else(|e| panic!("{e}"))
    }

    /// PullImage; the image's id.
    fn pull(&self, image: &str) -> String {
        let mut c = self.images.clone();
        let req = cri::PullImageRequest {
            image: Some(image_spec(image)),
            ..Default::default()
        };
        self.try_call_within(&format!("PullImage {image}"), PULL_TIMEOUT, async move {
            c.pull_image(req).await
        })
        .unwrap_or_else(|e| panic!("{e}"))
        .image_ref
    }

    fn remove_image(&self, image: &str) {
        let mut c = self.images.clone();
        let req = cri::RemoveImageRequest {
            image: Some(image_spec(image)),
        };
        self.call(&format!("RemoveImage {image}"), async move {
            c.remove_image(req).await
        });
    }

    fn run_pod(&self, config: &cri::PodSandboxConfig) -> String {
        let mut c = self.runtime.clone();
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        self.try_call_within("RunPodSandbox", PULL_TIMEOUT, async move {
            c.run_pod_sandbox(req).await
        })
        .unwrap_or_else(|e| panic!("{e}"))
        .pod_sandbox_id
    }

    fn remove_pod(&self, id: &str) {
        let mut c = self.runtime.clone();
        let pod_sandbox_id = id.to_string();
        self.call("StopPodSandbox", async move {
            c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id })
                .await
        });
        let mut c = self.runtime.clone();
        let pod_sandbox_id = id.to_string();
        self.call("RemovePodSandbox", async move {
            c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id })
                .await
        });
    }

    fn create_container(
        &self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        image: &str,
        script: &str,
    ) -> String {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "check".into(),
                attempt: 0,
            }),
            image: Some(image_spec(image)),
            command: vec!["sh".into(), "-c".into(), script.into()],
            log_path: "check.log".into(),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(host_network()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = self.runtime.clone();
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        };
        self.call(
            "CreateContainer",
            async move { c.create_container(req).await },
        )
        .container_id
    }

    fn start_container(&self, id: &str) {
        let mut c = self.runtime.clone();
        let container_id = id.to_string();
        self.call("StartContainer", async move {
            c.start_container(cri::StartContainerRequest { container_id })
                .await
        });
    }

    fn remove_container(&self, id: &str) {
        let mut c = self.runtime.clone();
        let container_id = id.to_string();
        self.call("RemoveContainer", async move {
            c.remove_container(cri::RemoveContainerRequest { container_id })
                .await
        });
    }

    /// Poll ContainerStatus until the container has exited.
    fn wait_exited(&self, id: &str, limit: Duration) -> cri::ContainerStatus {
        let start = Instant::now();
        loop {
            let mut c = self.runtime.clone();
            let container_id = id.to_string();
            let status = self
                .call("ContainerStatus", async move {
                    c.container_status(cri::ContainerStatusRequest {
                        container_id,
                        verbose: false,
                    })
                    .await
                })
                .status
                .expect("ContainerStatus without a status");
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "container {id} has not exited after {limit:?}: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// The node's network namespace (`hostNetwork: true`): no CNI plugin is involved.
fn host_network() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        ..Default::default()
    }
}

fn pod_config(log_directory: &Path, cgroup_parent: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "tessera-cri".into(),
            uid: format!("tessera-cri-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_directory.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A CRI container log (`TIMESTAMP STREAM TAG TEXT` lines, tag `P` for a partial line
/// and `F` for a full one): its stdout and stderr.
fn read_cri_log(path: &Path) -> (String, String) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the container log {}: {e}", path.display()));
    let (mut out, mut err) = (String::new(), String::new());
    for line in text.lines() {
        let mut f = line.splitn(4, ' ');
        let (_, stream, tag, rest) = (f.next(), f.next(), f.next(), f.next().unwrap_or(""));
        let to = match stream {
            Some("stdout") => &mut out,
            Some("stderr") => &mut err,
            _ => panic!("not a CRI log line in {}: {line:?}", path.display()),
        };
        to.push_str(rest);
        if tag != Some("P") {
            to.push('\n');
        }
    }
    (out, err)
}
