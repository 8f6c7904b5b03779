//! Command output on stdout: a closed stdout (`tessera cache stats | head`) ends the
//! command quietly instead of panicking, for every command that prints.

/// `println!` for command output, in a function returning `anyhow::Result`: a closed
/// stdout becomes [`StdoutClosed`], which `main` ends quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::output::stdout_error)?
    }};
}

/// Whoever read our stdout is gone: the output has nowhere to go, and that is no error.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// A failed write to stdout: a closed pipe becomes [`StdoutClosed`].
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// Exit status of a command whose stdout was closed: what a shell reports for SIGPIPE.
pub const EXIT_STDOUT_CLOSED: i32 = 128 + 13;
