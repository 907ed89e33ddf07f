//! One module per verb of the command line; each turns its resolved arguments into output.
pub mod agent;
pub mod check;
pub mod counters;
pub mod docs;
pub mod history;
pub mod log;
pub mod stats;
pub mod table;
pub mod watch;

use std::io::{self, Write as _};

/// Prints `text` and a newline on stdout. A reader that went away (`| head`) is not an
/// error: what it wanted was written, and the command ends with success.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(error) if reader_gone(&error) => Ok(()),
        other => Ok(other?),
    }
}

/// Whether a write to stdout failed because its reader went away. Only stdout's errors are
/// asked: a broken pipe to the agent is a failure to report.
pub(crate) fn reader_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
}

/// Hands the heap pages start-up used and freed (BTF parsing, the snapshot's rows and fd
/// walk) back to the kernel. glibc keeps them otherwise, and a process that runs for months
/// would report that start-up peak as its resident size.
pub(crate) fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
