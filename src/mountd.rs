//! `tessera mountd`: one process per node that serves every mount asked of it over a
//! Unix socket (`tessera mount --daemon`), sharing one node store, one set of caches and
//! one process's memory among all of them.
//!
//! The protocol is one JSON object per line, one request per connection:
//! `{"op":"mount","reference":R,"dir":D,"opts":{...}}` answers `{"ok":true,"message":..}`
//! once the mount is in place (or `{"ok":false,"error":..}`); `{"op":"list"}` answers
//! `{"ok":true,"mounts":[{"reference":R,"dir":D},..]}`. The socket is root's only (0600):
//! whoever can connect can mount images anywhere.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mount_cmd::{self, Job, Jobs, MountOpts, StoreArgs};

pub const DEFAULT_SOCKET: &str = "/run/tessera/mountd.sock";

/// Longest a client waits for the daemon to mount (the index comes over the network).
const MOUNT_WAIT: Duration = Duration::from_secs(300);

#[derive(Args)]
pub struct MountdArgs {
    /// Where to listen.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Request {
    Mount {
        reference: String,
        dir: PathBuf,
        opts: Box<MountOpts>,
    },
    List,
}

#[derive(Serialize, Deserialize, Default)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<Listed>,
}

#[derive(Serialize, Deserialize)]
struct Listed {
    reference: String,
    dir: String,
}

struct Daemon {
    store: Arc<tessera_mount::store::NodeStore>,
    jobs: Jobs,
    /// Mount threads still running (finished ones have let go of their pins).
    live: AtomicUsize,
    stopping: AtomicBool,
    /// Connections being served.
    conns: AtomicUsize,
}

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// `tessera mountd`: serve mounts asked for over `socket` until SIGTERM or SIGINT, then
/// unmount them all.
pub fn mountd(a: &MountdArgs) -> Result<i32> {
    let store = Arc::new(a.store.open()?);
    let listener = listen(&a.socket)?;
    let d = Arc::new(Daemon {
        store: store.clone(),
        jobs: Arc::default(),
        live: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        conns: AtomicUsize::new(0),
    });
    let done = Arc::new(AtomicBool::new(false));
    let publisher = mount_cmd::publisher(store.clone(), d.jobs.clone(), done.clone());
    {
        let (d, socket) = (d.clone(), a.socket.clone());
        std::thread::Builder::new()
            .name("tessera-signals".into())
            .spawn(move || wait_for_signal(&d, &socket))
            .context("starting the signal handler")?;
    }
    {
        // A daemon whose stdout is gone keeps serving.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", a.socket.display());
        let _ = out.flush();
    }
    tracing::info!(socket = %a.socket.display(), store = %store.dir().display(), "mount daemon listening");
    for conn in listener.incoming() {
        if d.stopping.load(Ordering::SeqCst) {
            break;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection");
                continue;
            }
        };
        if d.conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            d.conns.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("too many mount daemon connections at once; one refused");
            continue;
        }
        let d = d.clone();
        let spawned = std::thread::Builder::new()
            .name("tessera-mountd-conn".into())
            .spawn(move || {
                if let Err(e) = handle(&d, conn) {
                    tracing::warn!(error = %format!("{e:#}"), "mount daemon request failed");
                }
                d.conns.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot serve a connection");
        }
    }
    // Stopping: every mount was unmounted by the signal handler; wait for them to let go.
    let start = Instant::now();
    while d.live.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(50));
    }
    done.store(true, Ordering::SeqCst);
    let _ = publisher.join();
    let _ = std::fs::remove_file(&a.socket);
    tracing::info!("mount daemon stopped");
    Ok(0)
}

/// Bind `socket` (root only), replacing a stale socket file but never a live daemon.
fn listen(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            bail!(
                "a mount daemon already listens on {} (stop it first, or use --socket)",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    // Created 0600 from the start (no moment in which others could connect).
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(socket);
    rustix::process::umask(old);
    let l = bound.with_context(|| format!("listening on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", socket.display()))?;
    Ok(l)
}

fn wait_for_signal(d: &Arc<Daemon>, socket: &Path) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(error = %e, "no signal handling: stop the daemon by unmounting and killing it");
            return;
        }
    };
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers");
                std::future::pending::<()>().await;
            }
        }
    });
    tracing::info!("stopping: unmounting every mount");
    d.stopping.store(true, Ordering::SeqCst);
    let jobs = d.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for j in jobs {
        if let Err(e) = tessera_mount::unmount(&j.dir) {
            tracing::warn!(dir = %j.dir.display(), error = %e, "cannot unmount");
        }
    }
    // Wake the accept loop.
    let _ = UnixStream::connect(socket);
}

fn answer(conn: &mut UnixStream, a: &Answer) -> Result<()> {
    let mut line = serde_json::to_vec(a)?;
    line.push(b'\n');
    conn.write_all(&line).context("answering")?;
    Ok(())
}

/// The request line: at most 1 MiB, within 30 s in all.
fn read_request(conn: &UnixStream) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut r = BufReader::new(conn.try_clone()?).take(1 << 20);
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the request did not arrive within 30 s");
        }
        conn.set_read_timeout(Some(left))?;
        let n = r
            .read_until(b'\n', &mut line)
            .context("reading the request")?;
        if n == 0 || line.ends_with(b"\n") {
            break;
        }
    }
    String::from_utf8(line).context("the request is not UTF-8")
}

fn handle(d: &Arc<Daemon>, mut conn: UnixStream) -> Result<()> {
    let line = read_request(&conn)?;
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            return answer(
                &mut conn,
                &Answer {
                    error: Some(format!("bad request: {e}")),
                    ..Answer::default()
                },
            )
        }
    };
    match req {
        Request::List => {
            let mounts = d
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|j| Listed {
                    reference: j.reference.clone(),
                    dir: j.dir.display().to_string(),
                })
                .collect();
            answer(
                &mut conn,
                &Answer {
                    ok: true,
                    mounts,
                    ..Answer::default()
                },
            )
        }
        Request::Mount {
            reference,
            dir,
            mut opts,
        } => {
            if d.stopping.load(Ordering::SeqCst) {
                return answer(
                    &mut conn,
                    &Answer {
                        error: Some("the mount daemon is stopping".into()),
                        ..Answer::default()
                    },
                );
            }
            opts.clamp();
            // Counted before it starts, so a stop waits for it.
            d.live.fetch_add(1, Ordering::SeqCst);
            match mount_cmd::start(&reference, &dir, 0, &opts, &d.store) {
                Ok((job, session)) => {
                    d.jobs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(job.clone());
                    // A stop that began while this mount came up did not see it.
                    if d.stopping.load(Ordering::SeqCst) {
                        let _ = tessera_mount::unmount(&dir);
                    }
                    let message = format!("mounted {reference} at {}", dir.display());
                    tracing::info!(image = %reference, dir = %dir.display(), "mounted for a client");
                    let d2 = d.clone();
                    std::thread::Builder::new()
                        .name("tessera-mountd-reap".into())
                        .spawn(move || reap(&d2, job, session))
                        .context("starting a mount's reaper")?;
                    answer(
                        &mut conn,
                        &Answer {
                            ok: true,
                            message: Some(message),
                            ..Answer::default()
                        },
                    )
                }
                Err(e) => {
                    d.live.fetch_sub(1, Ordering::SeqCst);
                    answer(
                        &mut conn,
                        &Answer {
                            error: Some(format!("{e:#}")),
                            ..Answer::default()
                        },
                    )
                }
            }
        }
    }
}

/// Wait for a mount to be unmounted, then let go of it.
fn reap(d: &Daemon, job: Arc<Job>, session: mount_cmd::Session) {
    if let Err(e) = job.wait(session, &d.store) {
        tracing::warn!(error = %format!("{e:#}"), "mount ended with an error");
    }
    d.jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|j| !Arc::ptr_eq(j, &job));
    d.live.fetch_sub(1, Ordering::SeqCst);
}

/// `tessera mount --daemon SOCKET REF DIR...`: ask the daemon for each mount in turn.
pub fn request_mounts(socket: &Path, targets: &[String], opts: &MountOpts) -> Result<i32> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let opts = opts.clone().absolute(&cwd);
    for pair in targets.chunks(2) {
        let (reference, dir) = (&pair[0], Path::new(&pair[1]));
        let dir =
            std::fs::canonicalize(dir).with_context(|| format!("mount point {}", dir.display()))?;
        let mut conn = UnixStream::connect(socket).with_context(|| {
            format!(
                "connecting to the mount daemon at {} (is `tessera mountd` running? start it, or mount without --daemon)",
                socket.display()
            )
        })?;
        conn.set_read_timeout(Some(MOUNT_WAIT))?;
        let req = Request::Mount {
            reference: reference.clone(),
            dir: dir.clone(),
            opts: Box::new(opts.clone()),
        };
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        conn.write_all(&line).context("sending the request")?;
        let mut reply = String::new();
        BufReader::new(conn)
            .take(1 << 20)
            .read_line(&mut reply)
            .context("waiting for the mount daemon")?;
        let a: Answer = serde_json::from_str(&reply)
            .with_context(|| format!("the mount daemon answered {reply:?}"))?;
        match (a.ok, a.message, a.error) {
            (true, Some(m), _) => outln!("{m}"),
            (_, _, Some(e)) => bail!("the mount daemon could not mount {reference}: {e}"),
            _ => bail!("the mount daemon answered {reply:?}"),
        }
    }
    Ok(0)
}
