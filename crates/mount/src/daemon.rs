//! The node's mount daemon (`tessera mountd`): one process that serves every mount asked
//! of it over a Unix socket, sharing one node store, one set of caches and one process's
//! memory among all of them; and its client ([`request_mount`]).
//!
//! The protocol is one JSON object per line, one request per connection:
//! `{"op":"mount","reference":R,"dir":D,"opts":{...}}` ([`MountSpec`]) answers
//! `{"ok":true,"message":..}` once the mount is in place (or `{"ok":false,"error":..}`);
//! `{"op":"list"}` answers `{"ok":true,"mounts":[{"reference":R,"dir":D},..]}`. The
//! socket is root's only (0600): whoever can connect can mount images anywhere.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::session::{self, Job, Jobs, MountSpec, Session};
use crate::store::NodeStore;

pub const DEFAULT_SOCKET: &str = "/run/tessera/mountd.sock";

/// Longest a client waits for the daemon to mount (the index comes over the network).
const MOUNT_WAIT: Duration = Duration::from_secs(300);

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("a mount daemon already listens on {0} (stop it first, or use --socket)")]
    Running(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("the mount daemon answered {0:?}")]
    BadAnswer(String),
    #[error("the mount daemon could not mount {reference}: {error}")]
    Refused { reference: String, error: String },
    #[error("{0}")]
    Request(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Io { context, source }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Request {
    Mount {
        reference: String,
        dir: PathBuf,
        opts: Box<MountSpec>,
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

/// A mount daemon: the mounts it serves over one node store.
pub struct Daemon {
    store: Arc<NodeStore>,
    socket: PathBuf,
    jobs: Jobs,
    /// Mount threads still running (finished ones have let go of their pins).
    live: AtomicUsize,
    stopping: AtomicBool,
    /// Connections being served.
    conns: AtomicUsize,
}

impl Daemon {
    /// A daemon for `store`, listening on `socket` (root only), which replaces a stale
    /// socket file but never a live daemon's.
    pub fn bind(
        store: Arc<NodeStore>,
        socket: &Path,
    ) -> Result<(Arc<Daemon>, UnixListener), DaemonError> {
        let listener = listen(socket)?;
        let d = Arc::new(Daemon {
            store,
            socket: socket.to_path_buf(),
            jobs: Arc::default(),
            live: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            conns: AtomicUsize::new(0),
        });
        Ok((d, listener))
    }

    /// Serve requests until [`Daemon::stop`]; then wait (bounded) for the mounts to let
    /// go and remove the socket.
    pub fn run(self: &Arc<Self>, listener: UnixListener) {
        let done = Arc::new(AtomicBool::new(false));
        let publisher = session::publisher(self.store.clone(), self.jobs.clone(), done.clone());
        tracing::info!(socket = %self.socket.display(), store = %self.store.dir().display(), "mount daemon listening");
        for conn in listener.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    continue;
                }
            };
            if self.conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.conns.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("too many mount daemon connections at once; one refused");
                continue;
            }
            let d = self.clone();
            let spawned = std::thread::Builder::new()
                .name("tessera-mountd-conn".into())
                .spawn(move || {
                    if let Err(e) = d.handle(conn) {
                        tracing::warn!(error = %e, "mount daemon request failed");
                    }
                    d.conns.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot serve a connection");
            }
        }
        // Stopping: every mount was unmounted by `stop`; wait for them to let go.
        let start = Instant::now();
        while self.live.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(90) {
            std::thread::sleep(Duration::from_millis(50));
        }
        done.store(true, Ordering::SeqCst);
        let _ = publisher.join();
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("mount daemon stopped");
    }

    /// Unmount every mount and make [`Daemon::run`] return.
    pub fn stop(&self) {
        tracing::info!("stopping: unmounting every mount");
        self.stopping.store(true, Ordering::SeqCst);
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for j in jobs {
            if let Err(e) = crate::unmount(&j.dir) {
                tracing::warn!(dir = %j.dir.display(), error = %e, "cannot unmount");
            }
        }
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.socket);
    }

    fn handle(self: &Arc<Self>, mut conn: UnixStream) -> Result<(), DaemonError> {
        let line = read_request(&conn)?;
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => return answer(&mut conn, &refusal(format!("bad request: {e}"))),
        };
        match req {
            Request::List => {
                let mounts = self
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
                if self.stopping.load(Ordering::SeqCst) {
                    return answer(&mut conn, &refusal("the mount daemon is stopping".into()));
                }
                opts.clamp();
                // Counted before it starts, so a stop waits for it.
                self.live.fetch_add(1, Ordering::SeqCst);
                match session::start(&reference, &dir, 0, &opts, &self.store) {
                    Ok((job, session)) => {
                        self.jobs
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(job.clone());
                        // A stop that began while this mount came up did not see it.
                        if self.stopping.load(Ordering::SeqCst) {
                            let _ = crate::unmount(&dir);
                        }
                        let message = format!("mounted {reference} at {}", dir.display());
                        tracing::info!(image = %reference, dir = %dir.display(), "mounted for a client");
                        let d = self.clone();
                        std::thread::Builder::new()
                            .name("tessera-mountd-reap".into())
                            .spawn(move || d.reap(job, session))
                            .map_err(io("starting a mount's reaper"))?;
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
                        self.live.fetch_sub(1, Ordering::SeqCst);
                        answer(&mut conn, &refusal(e.to_string()))
                    }
                }
            }
        }
    }

    /// Wait for a mount to be unmounted, then let go of it.
    fn reap(&self, job: Arc<Job>, session: Session) {
        if let Err(e) = job.wait(session, &self.store) {
            tracing::warn!(error = %e, "mount ended with an error");
        }
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|j| !Arc::ptr_eq(j, &job));
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

fn refusal(error: String) -> Answer {
    Answer {
        error: Some(error),
        ..Answer::default()
    }
}

/// Bind `socket` (root only), replacing a stale socket file but never a live daemon.
fn listen(socket: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(DaemonError::Running(socket.display().to_string()));
        }
        std::fs::remove_file(socket).map_err(io(format!(
            "removing the stale socket {}",
            socket.display()
        )))?;
    }
    // Created 0600 from the start (no moment in which others could connect).
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(socket);
    rustix::process::umask(old);
    let l = bound.map_err(io(format!("listening on {}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("restricting {} to its owner", socket.display())))?;
    Ok(l)
}

fn answer(conn: &mut UnixStream, a: &Answer) -> Result<(), DaemonError> {
    let mut line = serde_json::to_vec(a).map_err(|e| DaemonError::Request(e.to_string()))?;
    line.push(b'\n');
    conn.write_all(&line).map_err(io("answering"))
}

/// The request line: at most 1 MiB, within 30 s in all.
fn read_request(conn: &UnixStream) -> Result<String, DaemonError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut r = BufReader::new(conn.try_clone().map_err(io("reading the request"))?).take(1 << 20);
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DaemonError::Request(
                "the request did not arrive within 30 s".into(),
            ));
        }
        conn.set_read_timeout(Some(left))
            .map_err(io("reading the request"))?;
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(io("reading the request"))?;
        if n == 0 || line.ends_with(b"\n") {
            break;
        }
    }
    String::from_utf8(line).map_err(|_| DaemonError::Request("the request is not UTF-8".into()))
}

/// Ask the daemon on `socket` to mount `reference` on `dir` (canonicalized here) as
/// `spec` says (its paths must be absolute); returns the daemon's message once mounted.
pub fn request_mount(
    socket: &Path,
    reference: &str,
    dir: &Path,
    spec: &MountSpec,
) -> Result<String, DaemonError> {
    let dir = std::fs::canonicalize(dir).map_err(io(format!("mount point {}", dir.display())))?;
    let mut conn = UnixStream::connect(socket).map_err(io(format!(
        "connecting to the mount daemon at {} (is `tessera mountd` running? start it, or mount without --daemon)",
        socket.display()
    )))?;
    conn.set_read_timeout(Some(MOUNT_WAIT))
        .map_err(io("connecting to the mount daemon"))?;
    let req = Request::Mount {
        reference: reference.to_string(),
        dir,
        opts: Box::new(spec.clone()),
    };
    let mut line = serde_json::to_vec(&req).map_err(|e| DaemonError::Request(e.to_string()))?;
    line.push(b'\n');
    conn.write_all(&line).map_err(io("sending the request"))?;
    let mut reply = String::new();
    BufReader::new(conn)
        .take(1 << 20)
        .read_line(&mut reply)
        .map_err(io("waiting for the mount daemon"))?;
    let a: Answer =
        serde_json::from_str(&reply).map_err(|_| DaemonError::BadAnswer(reply.clone()))?;
    match (a.ok, a.message, a.error) {
        (true, Some(m), _) => Ok(m),
        (_, _, Some(error)) => Err(DaemonError::Refused {
            reference: reference.to_string(),
            error,
        }),
        _ => Err(DaemonError::BadAnswer(reply)),
    }
}
