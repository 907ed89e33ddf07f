//! The terminal while `netwatch top` runs: raw mode on the alternate screen, and put back as
//! it was when top ends, returns an error, or panics. Diagnostics written meanwhile would
//! scribble over the screen: they are held, and printed once it is put back.
use std::io::{self, Stdout};

use anyhow::Context as _;
use crossterm::{
    cursor::{Hide, Show},
    execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::{Frame, Terminal, backend::CrosstermBackend};

use crate::output::diagnostics;

pub struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

/// Leaves raw mode and the alternate screen, then prints what was held; safe to call more
/// than once.
fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
    diagnostics::release();
}

impl Screen {
    pub fn enter() -> anyhow::Result<Screen> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        diagnostics::hold();
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

    /// Ctrl-Z: gives the terminal back, stops as a shell job does, and takes the screen
    /// again once continued (`fg`), drawn afresh. In raw mode the terminal sends the key
    /// rather than the signal.
    pub fn suspend(&mut self) -> anyhow::Result<()> {
        restore();
        // SAFETY: raising a signal at this process has no memory-safety preconditions; its
        // default action stops it until SIGCONT.
        unsafe { libc::raise(libc::SIGTSTP) };
        diagnostics::hold();
        enable_raw_mode().context("putting the terminal in raw mode")?;
        execute!(io::stdout(), EnterAlternateScreen, Hide)
            .context("switching to the alternate screen")?;
        self.terminal.clear().context("clearing the terminal")
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
