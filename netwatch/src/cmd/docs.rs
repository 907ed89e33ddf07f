//! `netwatch generate-docs DIR` (hidden): the man pages and shell completions, made from the
//! same argument definitions the binary parses, for `cargo xtask dist` to package.
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

pub fn run(dir: &Path) -> anyhow::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for sub in [&man, &completions] {
        std::fs::create_dir_all(sub).with_context(|| format!("creating {}", sub.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages into {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "netwatch", &completions)
            .with_context(|| {
                format!("writing {shell} completions into {}", completions.display())
            })?;
    }
    Ok(())
}
