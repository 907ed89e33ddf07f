//! The terminal while `netwatch top` runs: raw mode on the alternate screen, and put back as
//! it was when top ends, returns an error, or panics. Diagnostics written meanwhile would
//! scribble over the screen: they are held, and printed once it is put back.
use std::{
    io::{self, Stdout, Write as _},
    sync::Mutex,
};

use anyhow::Context as _;
use crossterm::{
    cursor::{Hide, Show},
    execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::{Frame, Terminal, backend::CrosstermBackend};

pub struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

/// Diagnostics held while the screen is up (None: write them at once).
static HELD: Mutex<Option<Vec<u8>>> = Mutex::new(None);
/// At most this much is held; the rest is counted.
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

/// Leaves raw mode and the alternate screen, then prints what was held; safe to call more
/// than once.
fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
    let held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    if let Some(held) = held.filter(|h| !h.is_empty()) {
        let mut stderr = io::stderr();
        let _ = stderr.write_all(&held);
        if held.len() >= HELD_MAX {
            let _ = writeln!(stderr, "netwatch: (more diagnostics were left out)");
        }
    }
}

impl Screen {
    pub fn enter() -> anyhow::Result<Screen> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        *HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Vec::new());
        if let Err(error) = enable_raw_mode() {
            restore();
            return Err(error).context("putting the terminal in raw mode");
        }
        let entered = execute!(io::stdout(), EnterAlternateScreen, Hide)
            .context("switching to the alternate screen");
        let terminal = entered.and_then(|()| {
            Terminal::new(CrosstermBackend::new(io::stdout())).context("opening the terminal")
        });
        match terminal {
            Ok(terminal) => Ok(Screen { terminal }),
            Err(error) => {
                restore();
                Err(error)
            }
        }
    }

    /// Draws a frame; returns what `draw` returned.
    pub fn draw<T>(&mut self, draw: impl FnOnce(&mut Frame) -> T) -> anyhow::Result<T> {
        let mut out = None;
        self.terminal.draw(|frame| out = Some(draw(frame))).context("drawing on the terminal")?;
        out.context("the frame was not drawn")
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}
