//! `tessera mountd`: command-line glue over the node's mount daemon
//! ([`tessera_mount::daemon`]): it serves every mount asked of it over a Unix socket
//! (`tessera mount --daemon`) until SIGTERM or SIGINT.

use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use tessera_mount::daemon::{Daemon, DEFAULT_SOCKET};

use crate::args::StoreArgs;

#[derive(Args)]
pub struct MountdArgs {
    /// Where to listen.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

/// `tessera mountd`: serve mounts asked for over the socket until SIGTERM or SIGINT,
/// then unmount them all.
pub fn mountd(a: &MountdArgs) -> Result<i32> {
    let store = Arc::new(a.store.open()?);
    let (d, listener) = Daemon::bind(store, &a.socket)?;
    {
        let d = d.clone();
        std::thread::Builder::new()
            .name("tessera-signals".into())
            .spawn(move || wait_for_signal(&d))
            .context("starting the signal handler")?;
    }
    {
        // A daemon whose stdout is gone keeps serving.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", a.socket.display());
        let _ = out.flush();
    }
    d.run(listener);
    Ok(0)
}

/// Stop the daemon on SIGTERM or SIGINT.
fn wait_for_signal(d: &Daemon) {
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
    d.stop();
}
