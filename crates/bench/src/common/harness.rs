//! What the benches that run daemons share: commands with bounded waits, a guard for
//! long-running processes, mount points, network namespaces joined by a (shaped) veth
//! pair, the corpus layout, and the report's number formats. Included by each bench with
//! `#[path]` (as `registry_bench/http.rs` is); each uses a part of it.
#![allow(dead_code)]

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Commands and processes

pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub secs: f64,
}

pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last 30 lines of `s`.
pub fn last_lines(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

pub fn tail(p: &Path) -> String {
    last_lines(&std::fs::read_to_string(p).unwrap_or_default())
}

pub fn reader<R: Read + Send + 'static>(r: Option<R>) -> Option<Receiver<Vec<u8>>> {
    let mut r = r?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        let _ = tx.send(v);
    });
    Some(rx)
}

/// Run `cmd` to completion (killed after `limit`); stdout to `stdout` or captured. `secs`
/// is wall time from spawn to exit (polled every millisecond).
pub fn run_to(cmd: &mut Command, stdout: Option<File>, limit: Duration) -> Result<Out> {
    let what = describe(cmd);
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    match stdout {
        Some(f) => cmd.stdout(f),
        None => cmd.stdout(Stdio::piped()),
    };
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{what}` did not finish within {} s; killed",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let secs = t0.elapsed().as_secs_f64();
    // A grandchild holding the pipe open must not block us: bounded collection.
    let collect = |rx: Option<Receiver<Vec<u8>>>| {
        rx.and_then(|r| r.recv_timeout(Duration::from_secs(5)).ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    };
    Ok(Out {
        status,
        stdout: collect(out),
        stderr: collect(err),
        secs,
    })
}

pub fn run(cmd: &mut Command, limit: Duration) -> Result<Out> {
    run_to(cmd, None, limit)
}

/// [`run`], and an error unless it exits 0.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> Result<Out> {
    let what = describe(cmd);
    let out = run(cmd, limit)?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}):\n{}\n{}",
            out.status,
            last_lines(&out.stdout),
            last_lines(&out.stderr)
        );
    }
    Ok(out)
}

/// `program` run in network namespace `ns` (only the network namespace changes: mounts
/// made by the program stay visible to this process).
pub fn in_netns(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A long-running child (server, mount daemon); killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// stdout lines with their arrival time (when stdout was asked for).
    lines: Option<Receiver<(Instant, String)>>,
}

impl Proc {
    /// Spawn `cmd`: stderr (and stdout unless `lines`) into `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path, lines: bool) -> Result<Proc> {
        let logf = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stderr(logf.try_clone()?);
        if lines {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(logf);
        }
        let what = describe(cmd);
        // If this process dies without running its guards (SIGKILL, SIGINT), the daemon
        // dies with it; the next run removes the mounts and namespaces left behind.
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    if tx.send((Instant::now(), l)).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            lines,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn check_alive(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("process already reaped")?;
        if let Some(st) = child.try_wait()? {
            bail!(
                "{} exited ({st}); log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }

    /// Wait (at most `limit`) for a stdout line starting with `prefix`; returns it with
    /// the time it was read.
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> Result<(Instant, String)> {
        let t0 = Instant::now();
        let mut other = Vec::new();
        loop {
            let got = self
                .lines
                .as_ref()
                .context("stdout not captured")?
                .recv_timeout(Duration::from_millis(20));
            match got {
                Ok((t, l)) if l.starts_with(prefix) => return Ok((t, l)),
                Ok((_, l)) => other.push(l),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(200));
                    self.check_alive()?;
                    bail!(
                        "{} closed its stdout without a `{prefix}…` line (stdout: {other:?}); log {}:\n{}",
                        self.name,
                        self.log.display(),
                        tail(&self.log)
                    );
                }
            }
            self.check_alive()?;
            if t0.elapsed() > limit {
                bail!(
                    "{} printed no `{prefix}…` line within {} s (stdout: {other:?}); log {}:\n{}",
                    self.name,
                    limit.as_secs(),
                    self.log.display(),
                    tail(&self.log)
                );
            }
        }
    }

    /// Peak RSS (VmHWM) in KiB.
    pub fn hwm_kb(&mut self) -> Result<u64> {
        self.check_alive()?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/PID/status")
    }

    /// Wait for the process to exit on its own; killed (and an error) after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let t0 = Instant::now();
        let child = self.child.as_mut().context("process already reaped")?;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {} s; killed",
                    self.name,
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then [`Proc::wait_exit`].
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus> {
        if let Some(c) = &self.child {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(c),
                rustix::process::Signal::TERM,
            );
        }
        self.wait_exit(limit)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// In-process work (a walk or reads over a mount) bounded by `limit`. On a timeout the
/// worker thread is abandoned; the mount guards then unmount and kill the daemon, which
/// fails its pending requests.
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => {
            bail!("{what} did not finish within {} s", limit.as_secs())
        }
        Err(RecvTimeoutError::Disconnected) => bail!("{what} panicked"),
    }
}

/// The filesystem type mounted exactly at `dir`, if any (from /proc/self/mountinfo).
pub fn mounted_fstype(dir: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = dir.to_string_lossy();
    info.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mp = unescape_mountinfo(left.split(' ').nth(4)?);
        (mp == want).then(|| right.split(' ').next().unwrap_or_default().to_string())
    })
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| Some(PathBuf::from(unescape_mountinfo(l.split(' ').nth(4)?))))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or(""), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn lazy_umount(dir: &Path) {
    let _ = run(
        Command::new("umount").arg("-l").arg(dir),
        Duration::from_secs(30),
    );
}

// ---------------------------------------------------------------------------------------
// Network namespaces

/// The names and addresses of a pair of network namespaces joined by a veth pair: the
/// registry's side and the client's. Each bench has its own, so leftovers of one never
/// collide with another's.
#[derive(Clone, Copy)]
pub struct Link {
    pub reg_ns: &'static str,
    pub cli_ns: &'static str,
    pub veth_reg: &'static str,
    pub veth_cli: &'static str,
    pub reg_ip: &'static str,
    pub cli_ip: &'static str,
}

/// The namespaces of a [`Link`], created by [`Netns::create`]; deleted on drop.
pub struct Netns {
    pub link: Link,
}

impl Netns {
    /// Delete the link's namespaces if they exist (what an interrupted run left).
    pub fn delete_all(link: &Link) {
        for ns in [link.reg_ns, link.cli_ns] {
            if Path::new("/run/netns").join(ns).exists() {
                let _ = run(
                    Command::new("ip").args(["netns", "del", ns]),
                    Duration::from_secs(30),
                );
            }
        }
    }

    pub fn create(link: Link) -> Result<Netns> {
        Self::delete_all(&link);
        let g = Netns { link };
        let ip = |args: &[&str]| -> Result<()> {
            run_ok(Command::new("ip").args(args), Duration::from_secs(30)).map(|_| ())
        };
        let l = &link;
        ip(&["netns", "add", l.reg_ns])?;
        ip(&["netns", "add", l.cli_ns])?;
        ip(&[
            "link", "add", l.veth_reg, "netns", l.reg_ns, "type", "veth", "peer", "name",
            l.veth_cli, "netns", l.cli_ns,
        ])?;
        for (ns, dev, addr) in [
            (l.reg_ns, l.veth_reg, l.reg_ip),
            (l.cli_ns, l.veth_cli, l.cli_ip),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(g)
    }

    /// tbf on both veth ends (netem is not in every kernel; tbf is).
    pub fn shape(&self, rate: &str, burst: &str, latency: &str) -> Result<()> {
        let l = &self.link;
        for (ns, dev) in [(l.reg_ns, l.veth_reg), (l.cli_ns, l.veth_cli)] {
            run_ok(
                Command::new("ip")
                    .args(["netns", "exec", ns, "tc", "qdisc", "add", "dev", dev])
                    .args(["root", "tbf", "rate", rate, "burst", burst])
                    .args(["latency", latency]),
                Duration::from_secs(30),
            )?;
        }
        Ok(())
    }

    /// Bytes received by the client end of the veth pair.
    pub fn client_rx(&self) -> Result<u64> {
        let l = &self.link;
        let out = run_ok(
            Command::new("ip").args([
                "netns",
                "exec",
                l.cli_ns,
                "cat",
                &format!("/sys/class/net/{}/statistics/rx_bytes", l.veth_cli),
            ]),
            Duration::from_secs(30),
        )?;
        out.stdout
            .trim()
            .parse()
            .with_context(|| format!("rx_bytes of {}: {:?}", l.veth_cli, out.stdout))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        Self::delete_all(&self.link);
    }
}

pub fn drop_caches() -> Result<()> {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

pub fn read_json(p: &Path) -> Result<Value> {
    serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
        .with_context(|| format!("parsing {}", p.display()))
}

/// The manifest digest of tag `image` in the OCI layout at `layout`.
pub fn layout_digest(layout: &Path, image: &str) -> Result<String> {
    let index = read_json(&layout.join("index.json"))
        .context("corpus OCI layout (run scripts/corpus.sh)")?;
    Ok(index["manifests"]
        .as_array()
        .context("index.json manifests")?
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == image)
        .and_then(|m| m["digest"].as_str())
        .with_context(|| format!("no tag {image} in {}", layout.display()))?
        .to_string())
}

/// The path of blob `digest` in the OCI layout at `layout`.
pub fn layout_blob(layout: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest {digest}"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

/// Layer blobs (paths, in order) of tag `image` in the OCI layout.
pub fn layout_layers(layout: &Path, image: &str) -> Result<Vec<PathBuf>> {
    let manifest = read_json(&layout_blob(layout, &layout_digest(layout, image)?)?)?;
    manifest["layers"]
        .as_array()
        .context("manifest layers")?
        .iter()
        .map(|l| layout_blob(layout, l["digest"].as_str().context("layer digest")?))
        .collect()
}

pub fn mark(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**MISSED**"
    }
}

/// A ratio with two decimals, or three when two would round it onto the target.
pub fn show_ratio(r: f64, target: f64) -> String {
    let two = format!("{r:.2}");
    if two.parse::<f64>().ok() == Some(target) && r != target {
        format!("{r:.3}")
    } else {
        two
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let s = String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .into_owned();
            // nydusd prints "nydusd \rVersion: \t..." on several lines: keep them all.
            s.split_whitespace().take(12).collect::<Vec<_>>().join(" ")
        })
        .unwrap_or_default()
}

pub fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Median of `f` over `v`.
pub fn med<T>(v: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(&v.iter().map(f).collect::<Vec<_>>())
}

/// `tessera serve --listen LISTEN --root ROOT EXTRA…` (in network namespace `ns`, or in
/// this one); returns it once it printed its address, and the address.
pub fn start_serve(
    tessera: &Path,
    ns: Option<&str>,
    listen: &str,
    root: &Path,
    log: &Path,
    extra: &[&str],
) -> Result<(Proc, String)> {
    std::fs::create_dir_all(root)?;
    let mut cmd = in_netns(ns, tessera);
    cmd.arg("--no-progress")
        .arg("serve")
        .arg("--listen")
        .arg(listen)
        .arg("--root")
        .arg(root)
        .args(extra);
    let mut p = Proc::spawn("tessera serve", &mut cmd, log, true)?;
    let (_, line) = p.wait_line("listening on ", Duration::from_secs(60))?;
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .with_context(|| {
            format!("tessera serve printed {line:?}, expected `listening on http://ADDR`")
        })?
        .trim_end_matches('/')
        .to_string();
    Ok((p, addr))
}

/// Remove everything under the work directory but the logs, after checking that no
/// mount is left under it.
pub fn clean_work(work: &Path, logs: &Path) -> Result<()> {
    ensure!(
        mounts_under(work).is_empty(),
        "mounts left under {}",
        work.display()
    );
    for e in std::fs::read_dir(work)? {
        let p = e?.path();
        if p != logs {
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
    }
    Ok(())
}
