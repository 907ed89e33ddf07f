//! Where netwatch's diagnostics (`tracing`) go: stderr, or, while a full-screen view is up
//! (`netwatch top`), held and printed once the terminal is given back, since lines written
//! meanwhile would scribble over the screen.
use std::{
    io::{self, Write as _},
    sync::Mutex,
};

/// Diagnostics held while the screen is up (None: write them at once).
static HELD: Mutex<Option<Vec<u8>>> = Mutex::new(None);
/// At most this much is held; the rest is left out, and that is said.
const HELD_MAX: usize = 64 * 1024;

/// Where netwatch's diagnostics go (`tracing_subscriber`'s writer): stderr, or held while
/// the screen is up.
pub struct Stderr;

/// The writer for `tracing_subscriber::fmt().with_writer(..)`.
pub fn stderr() -> Stderr {
    Stderr
}

impl io::Write for Stderr {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match held.as_mut() {
            Some(buffer) => {
                let room = HELD_MAX.saturating_sub(buffer.len());
                buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
                Ok(bytes.len())
            }
            None => io::stderr().write(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Holds what is written from now on.
pub fn hold() {
    *HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Vec::new());
}

/// Writes what was held to stderr, and stops holding.
pub fn release() {
    let held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    if let Some(held) = held.filter(|h| !h.is_empty()) {
        let mut stderr = io::stderr();
        let _ = stderr.write_all(&held);
        if held.len() >= HELD_MAX {
            let _ = writeln!(stderr, "netwatch: (more diagnostics were left out)");
        }
    }
}
