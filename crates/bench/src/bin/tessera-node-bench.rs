//! `tessera-node-bench`: container start through containerd 2.x (`ctr`) with `tessera
//! node` as its remote snapshotter, against containerd's own overlayfs snapshotter (a
//! full pull and unpack) — same images, same registry, same shaped link, same run.
//!
//! Two network namespaces (`tnb-reg`, `tnb-cli`) joined by a veth pair. `tessera serve
//! --convert-on-push` runs in `tnb-reg`; the corpus images are pushed to it with skopeo
//! (`--preserve-digests`) from `tnb-cli` and the bench waits until the registry lists each
//! one's tessera twin (referrers API). Then both veth ends are shaped with `tc ... tbf`
//! (100 Mbit by default). containerd, `tessera node` and every `ctr` run in `tnb-cli`, so
//! all registry traffic crosses the shaped link (`ctr` talks to containerd over its Unix
//! socket).
//!
//! For every image, round and snapshotter S (tessera or overlayfs), on a fresh containerd
//! root and (for tessera) a fresh `tessera node` root, with page caches dropped:
//!
//! 1. cold: `ctr image pull --plain-http --snapshotter S REF` then `ctr run --snapshotter S
//!    --rm REF ID CMD…` until it exits (CMD is the image's first useful work, e.g.
//!    `python3 -c 'import pandas'`), timed from the pull's spawn to the run's exit; bytes
//!    are the client veth's rx counter around it;
//! 2. warm: a second `ctr run` of the same image on the same containerd (and node), page
//!    cache as the first run left it, then more such runs (`--warm-runs` in all; the last
//!    one is the steady state), then one after `drop_caches`;
//! 3. peak RSS (VmHWM) of `tessera node` and of containerd after the runs.
//!
//! Correctness, outside the timings: every run must exit 0 and print what the workload
//! prints (pandas' version, gcc's program output); on the tessera path the node must have
//! served the image from its twin (`tessera_node_lazy_images` ≥ 1, no layer blob in
//! containerd's content store), on the overlayfs path every layer must be in it. A failed
//! check is reported in the table and the JSON and makes the exit status non-zero.
//!
//! Rounds alternate which snapshotter goes first. Every process, mount and namespace is
//! owned by a guard whose Drop kills, unmounts or deletes it (containerd's guard also
//! kills its tasks and shims), every wait is bounded, daemons get PR_SET_PDEATHSIG, and a
//! run starts by removing what an interrupted run left behind.

#[path = "../common/harness.rs"]
mod harness;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use harness::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    about = "Container start through containerd 2.x (ctr pull + run) over a shaped link: \
             tessera node (lazy, from the image's tessera twin) against containerd's \
             overlayfs snapshotter (full pull + unpack)",
    after_help = "Example:
  cargo build --release -p tessera -p tessera-bench
  target/release/tessera-node-bench \\
      --corpus /var/cache/tessera/corpus --rounds 3 --json /tmp/bench-node.json

Runs as root (network namespaces, tc, mounts, containers, drop_caches). Needs containerd
2.x with ctr and containerd-shim-runc-v2 (scripts/containerd2.sh
/var/cache/tessera/containerd2), runc, skopeo, curl, iproute2 (ip, tc), util-linux
(nsenter, umount) and the corpus (scripts/corpus.sh). Creates and deletes the network
namespaces tnb-reg and tnb-cli (deleted first if left over). Exits non-zero on errors and
failed correctness checks only: missed targets are marked MISSED in the table."
)]
struct Args {
    /// Corpus directory: an OCI image layout in DIR/layout with one tag per image.
    #[arg(long, default_value = "/var/cache/tessera/corpus")]
    corpus: PathBuf,
    /// An image to start (a tag of the corpus layout; repeatable). Known workloads:
    /// app-pandas-a, app-pandas-b (`python3 -c 'import pandas'`), debian-python,
    /// debian-python-rebuilt (`python3 -c 'print(6*7)'`), debian-gcc (compile and run a C
    /// program); others need --workload.
    #[arg(
        long = "image",
        value_name = "TAG",
        default_values_t = ["app-pandas-a".to_string(), "debian-gcc".to_string()]
    )]
    images: Vec<String>,
    /// The first useful work for an image: TAG=SHELL-COMMAND, run with `sh -c` in the
    /// container (exit status 0 is its only check). Overrides the built-in one.
    #[arg(long = "workload", value_name = "TAG=CMD")]
    workloads: Vec<String>,
    /// Scratch directory (emptied first): registry, containerd and node roots, logs.
    #[arg(long, default_value = "/var/tmp/tessera-node-bench")]
    work: PathBuf,
    /// The tessera binary (default: next to this one).
    #[arg(long)]
    tessera: Option<PathBuf>,
    /// Directory of containerd 2.x's containerd, ctr and containerd-shim-runc-v2.
    #[arg(long, default_value = "/var/cache/tessera/containerd2/usr/bin")]
    containerd_bin: PathBuf,
    /// The skopeo binary.
    #[arg(long, default_value = "skopeo")]
    skopeo: String,
    /// tbf rate on both ends of the veth pair.
    #[arg(long, default_value = "100mbit")]
    rate: String,
    /// tbf burst.
    #[arg(long, default_value = "64kb")]
    burst: String,
    /// tbf latency.
    #[arg(long, default_value = "100ms")]
    tbf_latency: String,
    /// Warm runs (page cache as left) after the cold one; the table shows the first (the
    /// second `ctr run` of the image) and the last.
    #[arg(long, default_value_t = 5)]
    warm_runs: usize,
    /// Repeat every measurement this many times (fresh roots each time); the table shows
    /// medians.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Keep registry and roots in --work afterwards (logs are always kept).
    #[arg(long)]
    keep_work: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-node.json")]
    json: PathBuf,
}

const LINK: Link = Link {
    reg_ns: "tnb-reg",
    cli_ns: "tnb-cli",
    veth_reg: "tnb-r",
    veth_cli: "tnb-c",
    reg_ip: "10.232.0.1",
    cli_ip: "10.232.0.2",
};
const REG_PORT: u16 = 5000;

const COLD_TARGET: f64 = 0.2;
const WARM_TARGET: f64 = 1.1;

/// Longest push, pull or other setup command.
const CMD_WAIT: Duration = Duration::from_secs(900);
/// Longest `ctr run` of a workload.
const RUN_WAIT: Duration = Duration::from_secs(600);
/// Longest wait for a twin to appear after the push.
const TWIN_WAIT: Duration = Duration::from_secs(600);
/// Longest wait for a daemon to come up, or to exit after SIGTERM.
const DAEMON_WAIT: Duration = Duration::from_secs(60);
/// Short control commands (ctr version, task kill, curl).
const CTL_WAIT: Duration = Duration::from_secs(30);

/// Prefix of container ids (and so of their cgroups), to find an interrupted run's.
const ID_PREFIX: &str = "tnb-";
const TWIN_TYPE: &str = "application/vnd.tessera.image.v1";

// ---------------------------------------------------------------------------------------
// Workloads

struct Workload {
    tag: String,
    /// Shown in the table.
    label: String,
    argv: Vec<String>,
    /// Expected stdout (trimmed); None: only the exit status is checked.
    expect: Option<String>,
}

fn workload(tag: &str, overrides: &[String]) -> Result<Workload> {
    for o in overrides {
        if let Some(cmd) = o.strip_prefix(tag).and_then(|r| r.strip_prefix('=')) {
            return Ok(Workload {
                tag: tag.into(),
                label: format!("sh -c '{cmd}'"),
                argv: vec!["sh".into(), "-c".into(), cmd.into()],
                expect: None,
            });
        }
    }
    let py = |code: &str, expect: &str, label: &str| Workload {
        tag: tag.into(),
        label: label.into(),
        argv: vec!["python3".into(), "-c".into(), code.into()],
        expect: Some(expect.into()),
    };
    Ok(match tag {
        "app-pandas-a" => py(
            "import pandas; print(pandas.__version__)",
            "2.2.2",
            "python3 -c 'import pandas'",
        ),
        "app-pandas-b" => py(
            "import pandas; print(pandas.__version__)",
            "2.2.3",
            "python3 -c 'import pandas'",
        ),
        "debian-python" | "debian-python-rebuilt" => {
            py("print(6*7)", "42", "python3 -c 'print(6*7)'")
        }
        "debian-gcc" => Workload {
            tag: tag.into(),
            label: "gcc -o /tmp/h /tmp/h.c && /tmp/h".into(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "printf '#include <stdio.h>\\nint main(void) { puts(\"hello from gcc\"); return 0; }\\n' > /tmp/h.c && gcc -o /tmp/h /tmp/h.c && /tmp/h".into(),
            ],
            expect: Some("hello from gcc".into()),
        },
        _ => bail!("no built-in workload for {tag}: give one with --workload {tag}=CMD"),
    })
}

// ---------------------------------------------------------------------------------------
// Daemons

/// `curl -sf URL` from the client namespace (the registry and the node's /metrics are
/// reachable only from there).
fn curl(url: &str) -> Result<String> {
    Ok(run_ok(
        in_netns(Some(LINK.cli_ns), "curl").args(["-sf", "--max-time", "10", url]),
        CTL_WAIT,
    )?
    .stdout)
}

/// This process and its ancestors (never killed, whatever their command lines say).
fn ancestors() -> Vec<u32> {
    let mut v = vec![std::process::id()];
    let mut pid = std::process::id();
    while pid > 1 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Field 4 (ppid) follows the command name in parentheses.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            break;
        };
        v.push(ppid);
        pid = ppid;
    }
    v
}

/// Kill (SIGKILL, by pid) every containerd, containerd-shim-runc-v2 and tessera process
/// whose command line names `dir`: what an interrupted run (or a failed shutdown) left.
/// Returns how many were signalled.
fn kill_processes_naming(dir: &Path) -> usize {
    let mine = ancestors();
    let want = dir.to_string_lossy().into_owned();
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if mine.contains(&pid) {
            continue;
        }
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        let exe = exe.file_name().map(|f| f.to_string_lossy().into_owned());
        if !matches!(
            exe.as_deref(),
            Some("containerd" | "containerd-shim-runc-v2" | "tessera")
        ) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&want) {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                if rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok() {
                    n += 1;
                }
            }
        }
    }
    n
}

/// Kill the processes of leftover containers of this bench (cgroups named `/default/tnb-…`,
/// cgroup v1 or v2) and remove their cgroups.
fn kill_leftover_containers() {
    let mut dirs = Vec::new();
    for ctl in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        // v1: /sys/fs/cgroup/CONTROLLER/default/ID; v2: /sys/fs/cgroup/default/ID.
        for base in [ctl.path().join("default"), ctl.path()] {
            if base == ctl.path() && ctl.file_name() != "default" {
                continue;
            }
            for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(ID_PREFIX) {
                    dirs.push(e.path());
                }
            }
        }
    }
    for d in &dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                eprintln!("killing leftover container process {pid} ({})", d.display());
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(if dirs.is_empty() { 0 } else { 500 }));
    for d in &dirs {
        let _ = std::fs::remove_dir(d);
    }
}

/// `tessera node` in the client namespace on its own root and socket; Drop stops it
/// (SIGTERM, bounded, then SIGKILL) and detaches whatever it left mounted under its root.
struct NodeDaemon {
    proc: Proc,
    root: PathBuf,
    socket: PathBuf,
    metrics: String,
}

impl NodeDaemon {
    fn start(tessera: &Path, dir: &Path, log: &Path) -> Result<NodeDaemon> {
        let root = dir.join("node");
        let socket = dir.join("tessera.sock");
        std::fs::create_dir_all(&root)?;
        let mut cmd = in_netns(Some(LINK.cli_ns), tessera);
        cmd.args(["--no-progress", "node", "--plain-http"])
            .args(["--metrics-listen", "127.0.0.1:0", "--root"])
            .arg(&root)
            .arg("--socket")
            .arg(&socket);
        let mut proc = Proc::spawn("tessera node", &mut cmd, log, true)?;
        let (_, l) = proc.wait_line("metrics on ", DAEMON_WAIT)?;
        let metrics = l["metrics on ".len()..].trim().to_string();
        ensure!(
            socket.exists(),
            "tessera node printed {l:?} but {} is missing",
            socket.display()
        );
        Ok(NodeDaemon {
            proc,
            root,
            socket,
            metrics,
        })
    }

    /// A gauge or counter of the node's /metrics.
    fn metric(&self, name: &str) -> Result<f64> {
        let text = curl(&self.metrics)?;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .filter(|r| r.starts_with(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .with_context(|| format!("no {name} in the node's /metrics"))
    }

    /// SIGTERM and a bounded wait; Err when it did not exit cleanly.
    fn stop(mut self) -> Result<()> {
        let st = self.proc.terminate(DAEMON_WAIT)?;
        ensure!(st.success(), "tessera node exited with {st} after SIGTERM");
        Ok(())
    }
}

impl Drop for NodeDaemon {
    fn drop(&mut self) {
        if matches!(self.proc.check_alive(), Ok(())) {
            let _ = self.proc.terminate(DAEMON_WAIT);
        }
        for m in mounts_under(&self.root) {
            lazy_umount(&m);
        }
    }
}

/// A containerd 2.x in the client namespace, everything (root, state, socket, config,
/// log) under one directory. Drop kills its tasks, then containerd, then any shim left,
/// and detaches the mounts under the directory.
struct Containerd {
    proc: Proc,
    dir: PathBuf,
    bin: PathBuf,
    socket: PathBuf,
}

impl Containerd {
    /// `tessera_socket`: configure `tessera` as a proxy snapshotter (with the remote
    /// snapshot annotations and an unpack config for it); None: overlayfs only.
    fn start(bin: &Path, dir: &Path, tessera_socket: Option<&Path>, log: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let cfg = dir.join("config.toml");
        let mut text = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        if let Some(t) = tessera_socket {
            text.push_str(&format!(
                r#"[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "tessera"
[proxy_plugins.tessera]
  type = "snapshot"
  address = "{}"
  [proxy_plugins.tessera.exports]
    enable_remote_snapshot_annotations = "true"
"#,
                t.display()
            ));
        }
        std::fs::write(&cfg, text)?;
        let mut cmd = in_netns(Some(LINK.cli_ns), bin.join("containerd"));
        cmd.arg("--config").arg(&cfg).env("PATH", path_with(bin));
        let proc = Proc::spawn("containerd", &mut cmd, log, false)?;
        let mut c = Containerd {
            proc,
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            socket,
        };
        let t0 = Instant::now();
        loop {
            c.proc.check_alive()?;
            let ok = run(c.ctr().arg("version"), CTL_WAIT)
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return Ok(c);
            }
            if t0.elapsed() > DAEMON_WAIT {
                bail!(
                    "containerd did not answer `ctr version` within {} s; log {}:\n{}",
                    DAEMON_WAIT.as_secs(),
                    c.proc.log.display(),
                    tail(&c.proc.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ctr -a SOCKET …`, from the client namespace.
    fn ctr(&self) -> Command {
        let mut c = in_netns(Some(LINK.cli_ns), self.bin.join("ctr"));
        c.arg("-a")
            .arg(&self.socket)
            .env("PATH", path_with(&self.bin));
        c
    }

    /// Kill and delete every task, then containerd; kill shims still naming the
    /// directory; detach mounts under it.
    fn shutdown(&mut self) {
        if matches!(self.proc.check_alive(), Ok(())) {
            let tasks = run(self.ctr().args(["task", "ls", "-q"]), CTL_WAIT)
                .map(|o| o.stdout)
                .unwrap_or_default();
            for id in tasks.split_whitespace() {
                let _ = run(
                    self.ctr().args(["task", "kill", "-s", "SIGKILL", id]),
                    CTL_WAIT,
                );
                let _ = run(self.ctr().args(["task", "delete", "-f", id]), CTL_WAIT);
                let _ = run(self.ctr().args(["container", "delete", id]), CTL_WAIT);
            }
            let _ = self.proc.terminate(DAEMON_WAIT);
        }
        let t0 = Instant::now();
        while kill_processes_naming(&self.dir) > 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        for m in mounts_under(&self.dir) {
            lazy_umount(&m);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn path_with(bin: &Path) -> String {
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    )
}

/// The directory holding a containerd 2.x: `dir`, else /usr/bin when that one is 2.x.
fn containerd2(dir: &Path) -> Result<PathBuf> {
    for d in [dir.to_path_buf(), PathBuf::from("/usr/bin")] {
        let v = version(&d.join("containerd").to_string_lossy(), "--version");
        if v.contains(" 2.") && d.join("ctr").exists() {
            return Ok(d);
        }
    }
    bail!(
        "containerd 2.x not found in {} or /usr/bin: run scripts/containerd2.sh /var/cache/tessera/containerd2",
        dir.display()
    )
}

// ---------------------------------------------------------------------------------------
// Measurements

struct Ctx {
    args: Args,
    tessera: PathBuf,
    containerd: PathBuf,
    work: PathBuf,
    layout: PathBuf,
    logs: PathBuf,
    addr: String,
    warnings: Vec<String>,
    failures: Vec<String>,
    runs: usize,
}

impl Ctx {
    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }
    fn warn(&mut self, w: String) {
        eprintln!("warning: {w}");
        self.warnings.push(w);
    }
    fn fail(&mut self, f: String) {
        eprintln!("CHECK FAILED: {f}");
        self.failures.push(f);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sn {
    Tessera,
    Overlayfs,
}

impl Sn {
    fn name(self) -> &'static str {
        match self {
            Sn::Tessera => "tessera",
            Sn::Overlayfs => "overlayfs",
        }
    }
}

/// One snapshotter's figures in one round.
#[derive(Default, Clone)]
struct PathRun {
    cold_s: f64,
    pull_s: f64,
    run_s: f64,
    cold_rx: u64,
    warm_s: f64,
    /// Every warm run, in order (the first is `warm_s`).
    warm_runs: Vec<f64>,
    warm_last_s: f64,
    warm_dropped_s: f64,
    warm_rx: u64,
    node_hwm_kb: u64,
    containerd_hwm_kb: u64,
    /// Layer blobs of the image in containerd's content store after the pull.
    layers_fetched: usize,
    layers: usize,
    node_metrics: Option<Value>,
    outputs_ok: bool,
}

impl PathRun {
    fn json(&self) -> Value {
        json!({
            "cold_seconds": self.cold_s, "pull_seconds": self.pull_s, "run_seconds": self.run_s,
            "cold_rx_bytes": self.cold_rx, "warm_seconds": self.warm_s,
            "warm_runs_seconds": self.warm_runs, "warm_last_seconds": self.warm_last_s,
            "warm_page_cache_dropped_seconds": self.warm_dropped_s, "warm_rx_bytes": self.warm_rx,
            "node_peak_rss_kb": self.node_hwm_kb, "containerd_peak_rss_kb": self.containerd_hwm_kb,
            "layers_in_content_store": self.layers_fetched, "layers": self.layers,
            "node_metrics": self.node_metrics, "outputs_ok": self.outputs_ok,
        })
    }
}

struct ImageInfo {
    w: Workload,
    reference: String,
    digest: String,
    layer_digests: Vec<String>,
    layer_bytes: u64,
    twin: String,
    push_s: f64,
    twin_s: f64,
}

/// `ctr run --rm` of the workload; seconds, and whether its output was the expected one.
fn ctr_run(ctx: &mut Ctx, ctd: &Containerd, sn: Sn, img: &ImageInfo) -> Result<f64> {
    ctx.runs += 1;
    let id = format!("{ID_PREFIX}{}-{}", sn.name(), ctx.runs);
    let out = run(
        ctd.ctr()
            .args(["run", "--snapshotter", sn.name(), "--rm"])
            .args(["--env", "PYTHONDONTWRITEBYTECODE=1"])
            .arg(&img.reference)
            .arg(&id)
            .args(&img.w.argv),
        RUN_WAIT,
    )?;
    if !out.status.success() {
        bail!(
            "`ctr run` of {} ({}) on {} failed ({}):\n{}\n{}",
            img.w.tag,
            img.w.label,
            sn.name(),
            out.status,
            last_lines(&out.stdout),
            last_lines(&out.stderr)
        );
    }
    if let Some(e) = &img.w.expect {
        if out.stdout.trim() != e {
            ctx.fail(format!(
                "{} on {}: `{}` printed {:?}, expected {e:?}",
                img.w.tag,
                sn.name(),
                img.w.label,
                out.stdout.trim()
            ));
            return Ok(f64::NAN);
        }
    }
    Ok(out.secs)
}

/// One snapshotter, one round: fresh roots, cold pull + run, warm runs, RSS.
fn one_path(ctx: &mut Ctx, ns: &Netns, img: &ImageInfo, sn: Sn, round: usize) -> Result<PathRun> {
    let name = format!("{}-{}-{}", img.w.tag, sn.name(), round + 1);
    let dir = ctx.work.join(&name);
    let mut node = match sn {
        Sn::Tessera => Some(NodeDaemon::start(
            &ctx.tessera,
            &dir,
            &ctx.log(&format!("{name}-node.log")),
        )?),
        Sn::Overlayfs => None,
    };
    let mut ctd = Containerd::start(
        &ctx.containerd,
        &dir.join("containerd"),
        node.as_ref().map(|n| n.socket.as_path()),
        &ctx.log(&format!("{name}-containerd.log")),
    )?;
    let mut r = PathRun {
        layers: img.layer_digests.len(),
        ..PathRun::default()
    };
    let failures_before = ctx.failures.len();

    // Cold: pull + first run, page caches dropped.
    drop_caches()?;
    let rx0 = ns.client_rx()?;
    let t0 = Instant::now();
    r.pull_s = run_ok(
        ctd.ctr()
            .args(["image", "pull", "--plain-http", "--snapshotter", sn.name()])
            .arg(&img.reference),
        CMD_WAIT,
    )?
    .secs;
    r.run_s = ctr_run(ctx, &ctd, sn, img)?;
    r.cold_s = t0.elapsed().as_secs_f64();
    r.cold_rx = ns.client_rx()? - rx0;

    // Which path containerd took (outside the timing).
    let content = run_ok(ctd.ctr().args(["content", "ls", "-q"]), CTL_WAIT)?.stdout;
    r.layers_fetched = img
        .layer_digests
        .iter()
        .filter(|d| content.contains(d.as_str()))
        .count();
    match (&node, sn) {
        (Some(n), Sn::Tessera) => {
            let lazy = n.metric("tessera_node_lazy_images")?;
            let fallbacks = n.metric("tessera_node_twin_fallbacks_total")?;
            r.node_metrics = Some(json!({
                "lazy_images": lazy,
                "placeholder_layers_total": n.metric("tessera_node_placeholder_layers_total")?,
                "materialized_layers_total": n.metric("tessera_node_materialized_layers_total")?,
                "twin_fallbacks_total": fallbacks,
            }));
            if lazy < 1.0 || r.layers_fetched > 0 || fallbacks > 0.0 {
                ctx.fail(format!(
                    "{name}: the image did not run from its twin (lazy_images {lazy}, twin fallbacks {fallbacks}, {} of {} layers downloaded by containerd)",
                    r.layers_fetched, r.layers
                ));
            }
        }
        _ => {
            if r.layers_fetched != r.layers {
                ctx.fail(format!(
                    "{name}: {} of {} layers in containerd's content store after an overlayfs pull",
                    r.layers_fetched, r.layers
                ));
            }
        }
    }

    // Warm: the same image again on the same node.
    let rx0 = ns.client_rx()?;
    for _ in 0..ctx.args.warm_runs {
        let s = ctr_run(ctx, &ctd, sn, img)?;
        r.warm_runs.push(s);
    }
    r.warm_s = r.warm_runs[0];
    r.warm_last_s = *r.warm_runs.last().unwrap_or(&f64::NAN);
    drop_caches()?;
    r.warm_dropped_s = ctr_run(ctx, &ctd, sn, img)?;
    r.warm_rx = ns.client_rx()? - rx0;
    r.outputs_ok = ctx.failures.len() == failures_before;

    r.containerd_hwm_kb = ctd.proc.hwm_kb()?;
    if let Some(n) = node.as_mut() {
        r.node_hwm_kb = n.proc.hwm_kb()?;
    }
    eprintln!(
        "[{name}] cold {:.2} s (pull {:.2} s + run {:.2} s), {:.1} MB received; warm {:.2} s (then {}), warm after drop_caches {:.2} s ({:.1} MB received); peak RSS containerd {:.1} MiB{}",
        r.cold_s,
        r.pull_s,
        r.run_s,
        r.cold_rx as f64 / 1e6,
        r.warm_s,
        r.warm_runs[1..]
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        r.warm_dropped_s,
        r.warm_rx as f64 / 1e6,
        mib(r.containerd_hwm_kb),
        if node.is_some() {
            format!(", tessera node {:.1} MiB", mib(r.node_hwm_kb))
        } else {
            String::new()
        }
    );

    // containerd first: its container mounts sit on the node's lazy mounts.
    ctd.shutdown();
    drop(ctd);
    if let Some(n) = node {
        if let Err(e) = n.stop() {
            ctx.warn(format!("{name}: {e:#}"));
        }
    }
    for m in mounts_under(&dir) {
        lazy_umount(&m);
    }
    ensure!(
        mounts_under(&dir).is_empty(),
        "mounts left under {}",
        dir.display()
    );
    if !ctx.args.keep_work {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(r)
}

/// Push `tag` with skopeo from the client namespace and wait for its twin.
fn load_image(ctx: &Ctx, w: Workload) -> Result<ImageInfo> {
    let digest = layout_digest(&ctx.layout, &w.tag)?;
    let manifest = read_json(&layout_blob(&ctx.layout, &digest)?)?;
    let layers = manifest["layers"].as_array().context("manifest layers")?;
    let layer_digests = layers
        .iter()
        .map(|l| l["digest"].as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .context("layer digests")?;
    let layer_bytes = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
    let repo = format!("bench/{}", w.tag);
    let reference = format!("{}/{repo}:latest", ctx.addr);
    let push_s = run_ok(
        in_netns(Some(LINK.cli_ns), &ctx.args.skopeo)
            .args(["--insecure-policy", "copy", "--quiet", "--preserve-digests"])
            .arg("--dest-tls-verify=false")
            .arg(format!("oci:{}:{}", ctx.layout.display(), w.tag))
            .arg(format!("docker://{reference}")),
        CMD_WAIT,
    )?
    .secs;
    let url = format!(
        "http://{}/v2/{repo}/referrers/{digest}?artifactType={TWIN_TYPE}",
        ctx.addr
    );
    let t0 = Instant::now();
    let twin = loop {
        let v: Value =
            serde_json::from_str(&curl(&url)?).with_context(|| format!("GET {url}: not JSON"))?;
        if let Some(d) = v["manifests"][0]["digest"].as_str() {
            break d.to_string();
        }
        if t0.elapsed() > TWIN_WAIT {
            bail!(
                "no tessera twin of {repo}@{digest} {} s after the push (tessera serve --convert-on-push); log {}:\n{}",
                TWIN_WAIT.as_secs(),
                ctx.log("serve.log").display(),
                tail(&ctx.log("serve.log"))
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let twin_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "[load] {}: pushed in {push_s:.1} s ({} layers, {:.1} MB), twin {twin} listed {twin_s:.1} s later",
        w.tag,
        layer_digests.len(),
        layer_bytes as f64 / 1e6
    );
    Ok(ImageInfo {
        w,
        reference,
        digest,
        layer_digests,
        layer_bytes,
        twin,
        push_s,
        twin_s,
    })
}

// ---------------------------------------------------------------------------------------
// Report

struct ImageResult {
    img: ImageInfo,
    tessera: Vec<PathRun>,
    overlayfs: Vec<PathRun>,
}

fn report(ctx: &Ctx, results: &[ImageResult]) -> (String, Value) {
    let rounds = ctx.args.rounds;
    let of = if rounds > 1 {
        format!(", median of {rounds}")
    } else {
        String::new()
    };
    let mut t = String::from(
        "| figure | tessera | overlayfs | ratio (tessera/overlayfs) | target |\n|---|---:|---:|---:|---|\n",
    );
    let mut summary = Vec::new();
    for res in results {
        let (ts, ov) = (&res.tessera, &res.overlayfs);
        let tag = &res.img.w.tag;
        let label = &res.img.w.label;
        let cold = (med(ts, |r| r.cold_s), med(ov, |r| r.cold_s));
        let pull = (med(ts, |r| r.pull_s), med(ov, |r| r.pull_s));
        let runs = (med(ts, |r| r.run_s), med(ov, |r| r.run_s));
        let warm = (med(ts, |r| r.warm_s), med(ov, |r| r.warm_s));
        let warm_last = (med(ts, |r| r.warm_last_s), med(ov, |r| r.warm_last_s));
        let warm_d = (med(ts, |r| r.warm_dropped_s), med(ov, |r| r.warm_dropped_s));
        let rx = (med(ts, |r| r.cold_rx as f64), med(ov, |r| r.cold_rx as f64));
        let node_hwm = ts.iter().map(|r| r.node_hwm_kb).max().unwrap_or(0);
        let node_hwm_med = med(ts, |r| r.node_hwm_kb as f64);
        let ctd_hwm = (
            med(ts, |r| r.containerd_hwm_kb as f64),
            med(ov, |r| r.containerd_hwm_kb as f64),
        );
        let ok = ts.iter().chain(ov).all(|r| r.outputs_ok);
        let cold_r = cold.0 / cold.1;
        let warm_r = warm.0 / warm.1;
        let mb = |b: f64| format!("{:.1} MB", b / 1e6);
        t += &format!(
            "| {tag}: cold start, `ctr image pull` + `ctr run --rm … {label}` until it exits, fresh roots, page cache dropped, {} link{of} | **{:.2} s** (pull {:.2} s + run {:.2} s) | {:.2} s (pull + unpack {:.2} s + run {:.2} s) | {} | ≤ {COLD_TARGET} {} |\n",
            ctx.args.rate, cold.0, pull.0, runs.0, cold.1, pull.1, runs.1,
            show_ratio(cold_r, COLD_TARGET), mark(cold_r <= COLD_TARGET)
        );
        t += &format!(
            "| {tag}: warm start, a second `ctr run` on the same node{of} | {:.2} s | {:.2} s | {} | ≤ {WARM_TARGET} {} |\n",
            warm.0, warm.1, show_ratio(warm_r, WARM_TARGET), mark(warm_r <= WARM_TARGET)
        );
        let n = ctx.args.warm_runs + 1;
        t += &format!(
            "| {tag}: warm start, `ctr run` no. {n} on the same node (steady state){of} | {:.2} s | {:.2} s | {:.2} | |\n",
            warm_last.0,
            warm_last.1,
            warm_last.0 / warm_last.1
        );
        t += &format!(
            "| {tag}: warm start, page cache dropped before it{of} | {:.2} s | {:.2} s | {:.2} | |\n",
            warm_d.0,
            warm_d.1,
            warm_d.0 / warm_d.1
        );
        t += &format!(
            "| {tag}: bytes received over the link, cold path (client veth rx){of} | {} | {} (layers {}) | {:.2} | |\n",
            mb(rx.0), mb(rx.1), mb(res.img.layer_bytes as f64), rx.0 / rx.1
        );
        t += &format!(
            "| {tag}: `tessera node` peak RSS (VmHWM) after the cold and warm runs{of} (max) | {:.1} MiB ({:.1} MiB) | no daemon besides containerd | | |\n",
            node_hwm_med / 1024.0, mib(node_hwm)
        );
        t += &format!(
            "| {tag}: daemons' peak RSS: containerd + tessera node / containerd{of} | {:.1} MiB ({:.1} + {:.1}) | {:.1} MiB | {:.2} | |\n",
            (ctd_hwm.0 + node_hwm_med) / 1024.0, ctd_hwm.0 / 1024.0, node_hwm_med / 1024.0,
            ctd_hwm.1 / 1024.0, (ctd_hwm.0 + node_hwm_med) / ctd_hwm.1
        );
        t += &format!(
            "| {tag}: correctness: every run exited 0 with the expected output; tessera served from the twin with no layer download, overlayfs pulled every layer | {} | {} | | all runs |\n",
            if ts.iter().all(|r| r.outputs_ok) { "ok" } else { "**FAILED**" },
            if ov.iter().all(|r| r.outputs_ok) { "ok" } else { "**FAILED**" },
        );
        summary.push(json!({
            "image": tag,
            "workload": res.img.w.argv,
            "reference": res.img.reference,
            "manifest_digest": res.img.digest,
            "twin_digest": res.img.twin,
            "layers": res.img.layer_digests.len(),
            "layer_bytes": res.img.layer_bytes,
            "push_seconds": res.img.push_s,
            "twin_listed_seconds_after_push": res.img.twin_s,
            "medians": {
                "cold_seconds": {"tessera": cold.0, "overlayfs": cold.1, "ratio": cold_r, "target": COLD_TARGET, "met": cold_r <= COLD_TARGET},
                "pull_seconds": {"tessera": pull.0, "overlayfs": pull.1},
                "first_run_seconds": {"tessera": runs.0, "overlayfs": runs.1},
                "warm_seconds": {"tessera": warm.0, "overlayfs": warm.1, "ratio": warm_r, "target": WARM_TARGET, "met": warm_r <= WARM_TARGET},
                "warm_last_seconds": {"tessera": warm_last.0, "overlayfs": warm_last.1, "ratio": warm_last.0 / warm_last.1},
                "warm_page_cache_dropped_seconds": {"tessera": warm_d.0, "overlayfs": warm_d.1, "ratio": warm_d.0 / warm_d.1},
                "cold_rx_bytes": {"tessera": rx.0, "overlayfs": rx.1, "ratio": rx.0 / rx.1},
                "node_peak_rss_kb": node_hwm_med,
                "node_peak_rss_kb_max": node_hwm,
                "containerd_peak_rss_kb": {"tessera": ctd_hwm.0, "overlayfs": ctd_hwm.1},
            },
            "correct": ok,
            "rounds": {
                "tessera": ts.iter().map(PathRun::json).collect::<Vec<_>>(),
                "overlayfs": ov.iter().map(PathRun::json).collect::<Vec<_>>(),
            },
        }));
    }
    (t, Value::Array(summary))
}

// ---------------------------------------------------------------------------------------

/// Everything an interrupted run may have left: containers, daemons, mounts, namespaces,
/// files.
fn remove_leftovers(work: &Path) -> Result<()> {
    kill_leftover_containers();
    let t0 = Instant::now();
    while kill_processes_naming(work) > 0 {
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "processes naming {} survive SIGKILL",
            work.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for m in mounts_under(work) {
        eprintln!("unmounting leftover {}", m.display());
        lazy_umount(&m);
    }
    ensure!(
        mounts_under(work).is_empty(),
        "mounts left under {} that cannot be removed",
        work.display()
    );
    Netns::delete_all(&LINK);
    std::fs::remove_dir_all(work).with_context(|| format!("emptying {}", work.display()))?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        rustix::process::geteuid().is_root(),
        "tessera-node-bench needs root (network namespaces, tc, mounts, containers, drop_caches): run it with sudo"
    );
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.warm_runs >= 1, "--warm-runs must be at least 1");
    ensure!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    let tessera = match &args.tessera {
        Some(t) => t.clone(),
        None => std::env::current_exe()?.with_file_name("tessera"),
    };
    ensure!(
        tessera.exists(),
        "{} not found: build it with `cargo build --release -p tessera` first",
        tessera.display()
    );
    let containerd = containerd2(&args.containerd_bin)?;
    for (bin, pkg) in [
        (args.skopeo.as_str(), "apt-get install skopeo"),
        ("runc", "apt-get install runc"),
        ("curl", "apt-get install curl"),
        ("ip", "apt-get install iproute2"),
        ("tc", "apt-get install iproute2"),
        ("nsenter", "apt-get install util-linux"),
    ] {
        ensure!(
            Command::new(bin)
                .arg("--help")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "{bin} not found: {pkg}"
        );
    }
    let layout = args.corpus.join("layout");
    let mut workloads = Vec::new();
    for tag in &args.images {
        layout_digest(&layout, tag)?;
        workloads.push(workload(tag, &args.workloads)?);
    }

    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let work = args.work.canonicalize()?;
    remove_leftovers(&work)?;
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let started = Instant::now();
    let load_start = loadavg();
    let mut ctx = Ctx {
        args,
        tessera,
        containerd,
        work: work.clone(),
        layout,
        logs,
        addr: format!("{}:{REG_PORT}", LINK.reg_ip),
        warnings: Vec::new(),
        failures: Vec::new(),
        runs: 0,
    };

    let ns = Netns::create(LINK)?;
    let (mut reg, addr) = start_serve(
        &ctx.tessera,
        Some(LINK.reg_ns),
        &ctx.addr,
        &work.join("registry"),
        &ctx.log("serve.log"),
        &["--convert-on-push"],
    )?;
    ctx.addr = addr;
    eprintln!(
        "[load] tessera serve --convert-on-push in {} at {} (pid {})",
        LINK.reg_ns,
        ctx.addr,
        reg.pid()
    );
    // Load over the unshaped link, then shape it.
    let mut images = Vec::new();
    for w in workloads {
        images.push(load_image(&ctx, w)?);
    }
    reg.check_alive()?;
    ns.shape(&ctx.args.rate, &ctx.args.burst, &ctx.args.tbf_latency)?;
    eprintln!(
        "[load] shaped {} and {}: tbf rate {} burst {} latency {}",
        LINK.veth_reg, LINK.veth_cli, ctx.args.rate, ctx.args.burst, ctx.args.tbf_latency
    );

    let mut results = Vec::new();
    for img in images {
        let mut ts = Vec::new();
        let mut ov = Vec::new();
        for round in 0..ctx.args.rounds {
            // Alternate the order, so neither path always runs right after the other.
            let order = if round % 2 == 0 {
                [Sn::Tessera, Sn::Overlayfs]
            } else {
                [Sn::Overlayfs, Sn::Tessera]
            };
            for sn in order {
                let r = one_path(&mut ctx, &ns, &img, sn, round)?;
                match sn {
                    Sn::Tessera => ts.push(r),
                    Sn::Overlayfs => ov.push(r),
                }
            }
            reg.check_alive()?;
        }
        results.push(ImageResult {
            img,
            tessera: ts,
            overlayfs: ov,
        });
    }
    let st = reg.terminate(DAEMON_WAIT)?;
    if !st.success() {
        ctx.warn(format!("tessera serve exited with {st} after SIGTERM"));
    }
    drop(ns);

    let (table, summary) = report(&ctx, &results);
    let correct = ctx.failures.is_empty();
    println!("{table}");
    if !ctx.warnings.is_empty() {
        println!("Warnings:\n- {}", ctx.warnings.join("\n- "));
    }
    if !correct {
        println!("Failed checks:\n- {}", ctx.failures.join("\n- "));
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let results = json!({
        "images": summary,
        "correct": correct,
        "failures": ctx.failures,
        "warnings": ctx.warnings,
        "settings": {
            "images": ctx.args.images, "rate": ctx.args.rate, "burst": ctx.args.burst,
            "tbf_latency": ctx.args.tbf_latency, "rounds": ctx.args.rounds,
            "warm_runs": ctx.args.warm_runs,
        },
        "machine": {
            "cores": cores,
            "kernel": version("uname", "-r"),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
            "tessera": version(&ctx.tessera.to_string_lossy(), "--version"),
            "containerd": version(&ctx.containerd.join("containerd").to_string_lossy(), "--version"),
            "runc": version("runc", "--version"),
            "skopeo": version(&ctx.args.skopeo, "--version"),
        },
        "seconds": started.elapsed().as_secs_f64(),
        "table_markdown": table,
    });
    std::fs::write(&ctx.args.json, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", ctx.args.json.display()))?;
    eprintln!(
        "JSON written to {}; {:.0} s; load average {} at the start, {} at the end",
        ctx.args.json.display(),
        started.elapsed().as_secs_f64(),
        load_start,
        loadavg()
    );
    if !ctx.args.keep_work {
        clean_work(&work, &ctx.logs)?;
    }
    ensure!(correct, "correctness checks failed (see the table)");
    Ok(())
}
