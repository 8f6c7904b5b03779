//! FUSE connections that outlive the process serving them.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` descriptor. A
//! daemon that hands a copy of that descriptor to a longer-lived keeper (the node's
//! [`FuseConn`] holder) can die — `kill -9`, a crash, an upgrade — and a new daemon can
//! take the connection back: the kernel keeps the mount, queues what readers ask
//! meanwhile, and re-queues what the dead daemon had read but not answered once the new
//! one asks it to (`FUSE_NOTIFY_RESEND`, Linux 6.9+). Readers stall until then; they
//! never see an error.
//!
//! fuser serves a connection only after answering the kernel's `INIT` itself, and the
//! kernel sends `INIT` once per connection. So every connection's handshake is relayed
//! here: the kernel's `INIT` is read from the device and kept ([`FuseConn::init`]),
//! fuser answers it over a socket pair, and the answer goes to the kernel. A new daemon
//! replays the kept `INIT` to its own fuser session the same way and drops the answer
//! (the kernel has its settings already). Then the session's descriptor is switched to
//! the device.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `FUSE_INIT`'s opcode in `fuse_in_header`.
const FUSE_INIT: u32 = 26;
/// `FUSE_NOTIFY_RESEND` (Linux 6.9): the kernel queues again every request a daemon
/// read but did not answer.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `sizeof(struct fuse_in_header)`.
const IN_HEADER: usize = 40;

/// One FUSE connection: the device descriptor, the kernel's `INIT` request for it and
/// the device number of its mount (the mount's identity).
#[derive(Debug)]
pub struct FuseConn {
    pub fd: OwnedFd,
    pub init: Vec<u8>,
    pub dev: u64,
    /// Whether the kernel can resend what a dead daemon read but did not answer (Linux
    /// 6.9+, probed when the connection is made). Without it, a reader waiting when the
    /// daemon died waits forever, unkillably: such a connection must not be kept.
    pub resumable: bool,
}

impl FuseConn {
    /// A second descriptor for the same connection (what a keeper holds).
    pub fn try_clone(&self) -> std::io::Result<FuseConn> {
        Ok(FuseConn {
            fd: self.fd.try_clone()?,
            init: self.init.clone(),
            dev: self.dev,
            resumable: self.resumable,
        })
    }
}

/// Whether `init` is a `FUSE_INIT` request this code can relay: a header with the INIT
/// opcode and its length, protocol major 7 (fuser's, so it answers in one round).
pub fn check_init(init: &[u8]) -> std::io::Result<()> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    if init.len() < IN_HEADER + 8 {
        return Err(bad("a FUSE INIT request is at least 48 bytes"));
    }
    let u32_at = |o: usize| u32::from_le_bytes([init[o], init[o + 1], init[o + 2], init[o + 3]]);
    if u32_at(0) as usize != init.len() {
        return Err(bad("the FUSE INIT request's length field does not match"));
    }
    if u32_at(4) != FUSE_INIT {
        return Err(bad("the first FUSE request is not INIT"));
    }
    if u32_at(IN_HEADER) != 7 {
        return Err(bad("the kernel speaks a FUSE protocol other than 7.x"));
    }
    Ok(())
}

/// Read the kernel's `INIT` from a freshly mounted connection.
pub(crate) fn read_init(dev: &OwnedFd) -> std::io::Result<Vec<u8>> {
    // The kernel refuses reads into buffers smaller than FUSE_MIN_READ_BUFFER (8 KiB).
    let mut buf = vec![0u8; 64 << 10];
    let n = loop {
        match rustix::io::read(dev, &mut buf) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    buf.truncate(n);
    check_init(&buf)?;
    Ok(buf)
}

/// Start fuser's session on `conn`'s connection. With `fresh`, the kernel still waits
/// for the answer to `conn.init` (and `conn.resumable` is found out); otherwise a daemon
/// before this one answered it, and requests that daemon read but never answered are
/// queued again.
pub(crate) fn session<FS: fuser::Filesystem>(
    fs: FS,
    conn: &mut FuseConn,
    fresh: bool,
    acl: fuser::SessionACL,
    config: fuser::Config,
) -> std::io::Result<fuser::Session<FS>> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    check_init(&conn.init)?;
    let (ours, fusers) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::io::write(&ours, &conn.init)?;
    let slot: RawFd = fusers.as_raw_fd();
    // fuser reads INIT from its end, calls the filesystem's `init` and answers.
    let session = fuser::Session::from_fd(fs, fusers, acl, config)?;
    let mut reply = vec![0u8; 4096];
    let n = rustix::io::read(&ours, &mut reply)?;
    reply.truncate(n);
    drop(ours);
    if reply.len() < 16 {
        return Err(std::io::Error::other("fuser's answer to INIT is too short"));
    }
    // SAFETY: `slot` is the descriptor the session owns (from_fd took it), the session
    // is not running yet and nothing else uses that number; dup3 atomically makes the
    // number refer to the FUSE device instead of the socket, and the session closes it
    // when it ends as it would have closed the socket. ManuallyDrop keeps this borrowed
    // view from closing it.
    let mut target = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(slot) });
    rustix::io::dup3(conn.fd.as_fd(), &mut target, rustix::io::DupFlags::CLOEXEC)?;
    if fresh {
        rustix::io::write(&conn.fd, &reply)?;
        // Nothing was read yet, so nothing is resent: this only asks whether the
        // kernel knows the notification.
        conn.resumable = resend(&conn.fd).is_ok();
        if !conn.resumable {
            tracing::info!("the kernel cannot resend FUSE requests (Linux 6.9+ can): this mount ends with its daemon");
        }
    } else if let Err(e) = resend(&conn.fd) {
        tracing::warn!(error = %e, "the kernel refused to resend unanswered FUSE requests: readers that were waiting when the last daemon died stay blocked");
    }
    Ok(session)
}

/// Ask the kernel to queue again what a dead daemon read but never answered.
fn resend(dev: &OwnedFd) -> rustix::io::Result<usize> {
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_le_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    rustix::io::write(dev, &msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(len_field: u32, opcode: u32, major: u32) -> Vec<u8> {
        let mut b = vec![0u8; 104];
        b[0..4].copy_from_slice(&len_field.to_le_bytes());
        b[4..8].copy_from_slice(&opcode.to_le_bytes());
        b[40..44].copy_from_slice(&major.to_le_bytes());
        b
    }

    #[test]
    fn only_a_whole_protocol_7_init_is_relayed() {
        assert!(check_init(&init(104, 26, 7)).is_ok());
        assert!(check_init(&init(104, 15, 7)).is_err(), "READ is not INIT");
        assert!(check_init(&init(100, 26, 7)).is_err(), "length mismatch");
        assert!(check_init(&init(104, 26, 8)).is_err(), "major 8");
        assert!(check_init(&[0u8; 20]).is_err(), "short");
    }
}
