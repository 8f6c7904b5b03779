//! The keeper: a small process that holds a copy of every lazy mount's FUSE connection,
//! so that the mounts (and the containers reading from them) outlive the node daemon.
//!
//! When the daemon dies — `kill -9`, a crash, SIGTERM for an upgrade — the kernel keeps
//! each mount as long as one descriptor of its connection is open: the keeper's. Readers
//! wait; the next daemon asks the keeper for the connections by snapshot, serves them
//! again (see `tessera_mount::conn`) and the waiting reads complete. A connection whose
//! mount went away (unmounted everywhere, aborted) is dropped by the keeper by itself.
//!
//! The keeper is `tessera node keeper --root ROOT`, started by the daemon when none
//! runs (one per root: `ROOT/keeper.lock`), in its own process group so signals for the
//! daemon do not reach it. It talks over `ROOT/keeper.sock` (a SEQPACKET Unix socket:
//! one JSON message per packet, descriptors as SCM_RIGHTS) and exits once it holds no
//! connection and no daemon is connected. Under systemd the unit stops only the daemon
//! (`KillMode=process`), as containerd's does for its shims.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tessera_mount::FuseConn;

use crate::NodeError;

/// Largest message (JSON) on the keeper's socket.
const MAX_MESSAGE: usize = 64 << 10;
/// How long a new keeper waits for its first daemon before it gives up.
const FIRST_CLIENT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// Hold this connection (the descriptor comes with the message) under `name`.
    Keep {
        name: String,
        dev: u64,
        init: Vec<u8>,
    },
    /// A copy of the connection held under `name` (the keeper keeps its own).
    Take { name: String },
    /// Stop holding `name`.
    Forget { name: String },
    /// The names held.
    List,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default)]
    dev: u64,
    #[serde(default)]
    init: Vec<u8>,
    #[serde(default)]
    names: Vec<String>,
    /// With `ok: false`: the keeper holds nothing under that name (not an error).
    #[serde(default)]
    missing: bool,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let context = context.into();
    move |source| NodeError::Io { context, source }
}

fn errno(context: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> NodeError {
    let f = io(context);
    move |e| f(e.into())
}

/// Send one message, with `fd` attached if given.
fn send(
    sock: BorrowedFd<'_>,
    msg: &impl Serialize,
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        cmsg.push(SendAncillaryMessage::ScmRights(&fds));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut cmsg,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Receive one message and the descriptor that came with it; None when the peer closed.
fn recv<T: serde::de::DeserializeOwned>(
    sock: BorrowedFd<'_>,
) -> std::io::Result<Option<(T, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            // One descriptor per message; any more are closed as they drop.
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    if r.bytes == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..r.bytes])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, fd)))
}

fn socket_path(root: &Path) -> PathBuf {
    root.join("keeper.sock")
}

/// Run the keeper for `root` until it holds nothing and no daemon is connected. Returns
/// at once if another keeper runs for `root`.
pub fn run(root: &Path) -> Result<(), NodeError> {
    use rustix::event::{PollFd, PollFlags};
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    let lock_path = root.join("keeper.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("opening {}", lock_path.display())))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        // Another keeper: a live one answers on the socket (then this one is not
        // needed); one that is exiting (it holds nothing) lets go of the lock soon.
        if rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .ok()
        .zip(SocketAddrUnix::new(socket_path(root)).ok())
        .is_some_and(|(s, a)| rustix::net::connect(&s, &a).is_ok())
        {
            tracing::info!(root = %root.display(), "another keeper holds this root's connections");
            return Ok(());
        }
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(errno(format!("locking {}", lock_path.display())))?;
    }
    let path = socket_path(root);
    let _ = std::fs::remove_file(&path);
    let listener = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(errno("creating the keeper's socket"))?;
    let addr = SocketAddrUnix::new(&path).map_err(errno(format!("{}", path.display())))?;
    rustix::net::bind(&listener, &addr).map_err(errno(format!("binding {}", path.display())))?;
    // Whoever reaches the socket could take a FUSE connection and serve containers'
    // root filesystems: root only.
    rustix::fs::chmod(&path, rustix::fs::Mode::from_raw_mode(0o600))
        .map_err(errno(format!("chmod {}", path.display())))?;
    rustix::net::listen(&listener, 16).map_err(errno("listening on the keeper's socket"))?;
    tracing::info!(socket = %path.display(), "keeper up");
    let started = Instant::now();
    let mut seen_client = false;
    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut held: BTreeMap<String, FuseConn> = BTreeMap::new();
    loop {
        if clients.is_empty()
            && held.is_empty()
            && (seen_client || started.elapsed() > FIRST_CLIENT_GRACE)
        {
            break;
        }
        let names: Vec<String> = held.keys().cloned().collect();
        let (listen_ev, client_ev) = {
            let mut fds = Vec::with_capacity(1 + clients.len());
            fds.push(PollFd::new(&listener, PollFlags::IN));
            for c in &clients {
                fds.push(PollFd::new(c, PollFlags::IN));
            }
            let timeout = rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(errno("waiting on the keeper's descriptors")(e)),
            }
            let ev: Vec<PollFlags> = fds.iter().map(|f| f.revents()).collect();
            (ev[0], ev[1..].to_vec())
        };
        // The FUSE devices are looked at without waiting on them (a wait would be woken
        // by every request the kernel queues on them). No events are asked: only
        // errors (the connection ended) are reported, and requests waiting on a device
        // are not the keeper's to read.
        let held_ev: Vec<PollFlags> = {
            let mut fds: Vec<PollFd<'_>> = held
                .values()
                .map(|c| PollFd::new(&c.fd, PollFlags::empty()))
                .collect();
            let zero = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            match rustix::event::poll(&mut fds, Some(&zero)) {
                Ok(_) => fds.iter().map(|f| f.revents()).collect(),
                Err(_) => vec![PollFlags::empty(); held.len()],
            }
        };
        for (name, ev) in names.iter().zip(held_ev) {
            if ev.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
                tracing::info!(%name, "the mount's connection ended; no longer held");
                held.remove(name);
            }
        }
        let mut gone = Vec::new();
        for (i, ev) in client_ev.iter().enumerate() {
            if ev.is_empty() {
                continue;
            }
            let c = &clients[i];
            let msg = match recv::<Request>(c.as_fd()) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    gone.push(i);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a bad message on the keeper's socket; closing that connection");
                    gone.push(i);
                    continue;
                }
            };
            let (reply, fd) = answer(&mut held, msg);
            let fd_ref = fd.as_ref().map(|f| f.as_fd());
            if let Err(e) = send(c.as_fd(), &reply, fd_ref) {
                tracing::warn!(error = %e, "cannot answer a daemon; closing that connection");
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            clients.remove(i);
        }
        if listen_ev.contains(PollFlags::IN) {
            match rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) {
                Ok(c) => {
                    seen_client = true;
                    clients.push(c);
                }
                Err(e) => tracing::warn!(error = %e, "accepting a daemon"),
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    tracing::info!("keeper holds nothing and no daemon is connected: exiting");
    Ok(())
}

fn answer(
    held: &mut BTreeMap<String, FuseConn>,
    (msg, fd): (Request, Option<OwnedFd>),
) -> (Reply, Option<OwnedFd>) {
    let fail = |e: String| Reply {
        error: Some(e),
        ..Reply::default()
    };
    match msg {
        Request::Keep { name, dev, init } => {
            let Some(fd) = fd else {
                return (
                    fail("keep: no descriptor came with the message".into()),
                    None,
                );
            };
            if let Err(e) = tessera_mount::conn::check_init(&init) {
                return (fail(format!("keep {name}: {e}")), None);
            }
            tracing::info!(%name, dev, "holding a mount's connection");
            held.insert(
                name,
                FuseConn {
                    fd,
                    init,
                    dev,
                    resumable: true,
                },
            );
            (
                Reply {
                    ok: true,
                    ..Reply::default()
                },
                None,
            )
        }
        Request::Take { name } => match held.get(&name).map(|c| c.try_clone()) {
            Some(Ok(c)) => (
                Reply {
                    ok: true,
                    dev: c.dev,
                    init: c.init,
                    ..Reply::default()
                },
                Some(c.fd),
            ),
            Some(Err(e)) => (fail(format!("take {name}: {e}")), None),
            None => (
                Reply {
                    missing: true,
                    ..fail(format!("{name}: not held"))
                },
                None,
            ),
        },
        Request::Forget { name } => {
            held.remove(&name);
            (
                Reply {
                    ok: true,
                    ..Reply::default()
                },
                None,
            )
        }
        Request::List => (
            Reply {
                ok: true,
                names: held.keys().cloned().collect(),
                ..Reply::default()
            },
            None,
        ),
    }
}

/// A daemon's side of the keeper: connects to it (starting one when none runs) and
/// keeps the connection open for the daemon's lifetime. If the keeper dies, the next
/// call starts another and gives it every connection this daemon handed over.
pub struct Keeper {
    root: PathBuf,
    program: PathBuf,
    sock: Mutex<Option<OwnedFd>>,
    kept: Mutex<BTreeMap<String, FuseConn>>,
}

impl Keeper {
    /// The keeper of `root`, started as `program node keeper --root ROOT` when needed.
    pub fn connect(root: &Path, program: &Path) -> Result<Keeper, NodeError> {
        let k = Keeper {
            root: root.to_path_buf(),
            program: program.to_path_buf(),
            sock: Mutex::new(None),
            kept: Mutex::new(BTreeMap::new()),
        };
        let s = k.open()?;
        *k.sock.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        Ok(k)
    }

    fn try_open(&self) -> std::io::Result<OwnedFd> {
        let s = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let addr = SocketAddrUnix::new(socket_path(&self.root))?;
        rustix::net::connect(&s, &addr)?;
        // A keeper that stopped answering must not hang the daemon (a snapshots call,
        // or its stop): every exchange has a deadline.
        for t in [
            rustix::net::sockopt::Timeout::Recv,
            rustix::net::sockopt::Timeout::Send,
        ] {
            rustix::net::sockopt::set_socket_timeout(&s, t, Some(Duration::from_secs(10)))?;
        }
        Ok(s)
    }

    fn open(&self) -> Result<OwnedFd, NodeError> {
        if let Ok(s) = self.try_open() {
            return Ok(s);
        }
        self.spawn()?;
        let start = Instant::now();
        loop {
            match self.try_open() {
                Ok(s) => return Ok(s),
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    return Err(io(format!(
                        "the keeper did not come up on {} (see {})",
                        socket_path(&self.root).display(),
                        self.root.join("keeper.log").display()
                    ))(e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn spawn(&self) -> Result<(), NodeError> {
        use std::os::unix::process::CommandExt;
        let log_path = self.root.join("keeper.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io(format!("opening {}", log_path.display())))?;
        let child = std::process::Command::new(&self.program)
            .args(["-v", "node", "keeper", "--root"])
            .arg(&self.root)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: ^C or a signal to the daemon's group spares it.
            .process_group(0)
            .spawn()
            .map_err(io(format!(
                "starting {} node keeper",
                self.program.display()
            )))?;
        tracing::info!(pid = child.id(), "started the mount keeper");
        // Reaped by whoever adopts it when this daemon exits; while it runs, a thread
        // here waits for it so it never lingers as a zombie.
        std::thread::Builder::new()
            .name("tessera-keeper-wait".into())
            .spawn(move || {
                let mut child = child;
                let _ = child.wait();
            })
            .map_err(io("starting a thread"))?;
        Ok(())
    }

    /// One request and its answer; after a broken connection, reconnect (the keeper
    /// may have been started again: give it everything kept) and ask once more.
    fn call(
        &self,
        req: &Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(Reply, Option<OwnedFd>), NodeError> {
        let mut sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            if sock.is_none() {
                let s = self.open()?;
                let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
                for (name, c) in kept.iter() {
                    let keep = Request::Keep {
                        name: name.clone(),
                        dev: c.dev,
                        init: c.init.clone(),
                    };
                    exchange(s.as_fd(), &keep, Some(c.fd.as_fd()))
                        .map_err(io("handing the mounts to a new keeper"))?;
                }
                *sock = Some(s);
            }
            let Some(s) = sock.as_ref() else { continue };
            match exchange(s.as_fd(), req, fd) {
                Ok(r) => return Ok(r),
                Err(e) if attempt == 0 => {
                    tracing::warn!(error = %e, "the keeper's connection broke; reconnecting");
                    *sock = None;
                }
                Err(e) => return Err(io("talking to the keeper")(e)),
            }
        }
        Err(NodeError::Mount("the keeper cannot be reached".into()))
    }

    /// Hand a copy of `conn` (the lazy mount `name`) to the keeper.
    pub fn keep(&self, name: &str, conn: &FuseConn) -> Result<(), NodeError> {
        let copy = conn
            .try_clone()
            .map_err(io("copying a FUSE connection's descriptor"))?;
        let req = Request::Keep {
            name: name.to_string(),
            dev: conn.dev,
            init: conn.init.clone(),
        };
        let (r, _) = self.call(&req, Some(conn.fd.as_fd()))?;
        if !r.ok {
            return Err(NodeError::Mount(r.error.unwrap_or_default()));
        }
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), copy);
        Ok(())
    }

    /// The connection the keeper holds for `name` (left by an earlier daemon), if any.
    pub fn take(&self, name: &str) -> Result<Option<FuseConn>, NodeError> {
        let (r, fd) = self.call(
            &Request::Take {
                name: name.to_string(),
            },
            None,
        )?;
        if !r.ok && !r.missing {
            return Err(NodeError::Mount(format!(
                "the keeper cannot hand over {name}: {}",
                r.error.unwrap_or_default()
            )));
        }
        match (r.ok, fd) {
            (true, Some(fd)) => Ok(Some(FuseConn {
                fd,
                init: r.init,
                dev: r.dev,
                resumable: true,
            })),
            _ => Ok(None),
        }
    }

    /// Stop holding `name` (its snapshot is going away).
    pub fn forget(&self, name: &str) -> Result<(), NodeError> {
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.call(
            &Request::Forget {
                name: name.to_string(),
            },
            None,
        )?;
        Ok(())
    }

    /// Names of the connections the keeper holds.
    pub fn list(&self) -> Result<Vec<String>, NodeError> {
        Ok(self.call(&Request::List, None)?.0.names)
    }
}

fn exchange(
    sock: BorrowedFd<'_>,
    req: &Request,
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<(Reply, Option<OwnedFd>)> {
    send(sock, req, fd)?;
    recv::<Reply>(sock)?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the keeper closed the connection",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> Vec<u8> {
        let mut b = vec![0u8; 104];
        b[0..4].copy_from_slice(&104u32.to_le_bytes());
        b[4..8].copy_from_slice(&26u32.to_le_bytes());
        b[40..44].copy_from_slice(&7u32.to_le_bytes());
        b
    }

    #[test]
    fn the_keeper_hands_back_what_it_holds_and_refuses_what_is_not_a_connection() {
        let mut held = BTreeMap::new();
        // Any descriptor does for the bookkeeping: a pipe's read end.
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let keep = Request::Keep {
            name: "snapshot-7".into(),
            dev: 42,
            init: init(),
        };
        let (reply, _) = answer(&mut held, (keep, Some(r)));
        assert!(reply.ok, "{reply:?}");
        let (reply, fd) = answer(
            &mut held,
            (
                Request::Take {
                    name: "snapshot-7".into(),
                },
                None,
            ),
        );
        assert!(reply.ok && reply.dev == 42 && reply.init == init() && fd.is_some());
        let (reply, fd) = answer(
            &mut held,
            (
                Request::Take {
                    name: "snapshot-8".into(),
                },
                None,
            ),
        );
        assert!(!reply.ok && fd.is_none());
        // Without a descriptor, or with bytes that are not a FUSE INIT: refused.
        let keep = Request::Keep {
            name: "x".into(),
            dev: 1,
            init: init(),
        };
        assert!(!answer(&mut held, (keep, None)).0.ok);
        let (r2, _w2) = rustix::pipe::pipe().unwrap();
        let keep = Request::Keep {
            name: "x".into(),
            dev: 1,
            init: vec![1, 2, 3],
        };
        assert!(!answer(&mut held, (keep, Some(r2))).0.ok);
        let (reply, _) = answer(&mut held, (Request::List, None));
        assert_eq!(reply.names, vec!["snapshot-7".to_string()]);
        answer(
            &mut held,
            (
                Request::Forget {
                    name: "snapshot-7".into(),
                },
                None,
            ),
        );
        assert!(held.is_empty());
    }

    #[test]
    fn messages_cross_a_socket_with_their_descriptor() {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        let req = Request::Take { name: "n".into() };
        send(a.as_fd(), &req, Some(r.as_fd())).unwrap();
        let (got, fd): (Request, _) = recv(b.as_fd()).unwrap().unwrap();
        assert!(matches!(got, Request::Take { name } if name == "n"));
        // The descriptor that arrived is the same pipe.
        rustix::io::write(&w, b"x").unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(rustix::io::read(fd.unwrap(), &mut buf).unwrap(), 1);
        drop(a);
        assert!(
            recv::<Request>(b.as_fd()).unwrap().is_none(),
            "a closed peer"
        );
    }
}
