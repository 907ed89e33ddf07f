//! The library's error type: every failure a user can cause, with a message that says what is
//! wrong and what to do about it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("must run as root to load eBPF programs: try `sudo netwatch ...`")]
    NotRoot,

    /// An option names a file netwatch cannot use; the text says which and why.
    #[error("{0}")]
    BadFile(String),

    #[error(
        "netwatch table must run as root: it reads the agent's socket and every process's \
         /proc/PID/fd, which only root may; try `sudo netwatch table ...`"
    )]
    TableNotRoot,

    #[error(
        "this kernel has no BTF ({path} does not exist: it was built without \
         CONFIG_DEBUG_INFO_BTF=y), so only the classic tracepoint can be used (`--source \
         classic`, which `--source auto` falls back to)"
    )]
    NoBtf { path: PathBuf },

    #[error("cannot use kernel BTF at {path}: {reason} (`--source classic` does without it)")]
    Btf { path: PathBuf, reason: String },

    #[error(
        "tp_btf/inet_sock_set_state could not be attached ({reason}); `--source auto` falls \
         back to the classic tracepoint, and `netwatch check` lists every hook"
    )]
    NoTpBtf { reason: String },

    #[error(
        "tracefs is not mounted and mounting it failed ({reason}); run \
         `mount -t tracefs tracefs /sys/kernel/tracing` and try again"
    )]
    Tracefs { reason: String },

    #[error(
        "no TCP state tracepoint could be attached, neither tp_btf nor the classic one \
         ({reasons}); netwatch cannot trace on this kernel"
    )]
    NoStateSource { reasons: String },

    #[error("cannot read tracepoint format {path}: {reason}")]
    TracepointFormat { path: PathBuf, reason: String },

    #[error("loading the eBPF programs failed: {0}")]
    Load(#[from] aya::EbpfError),

    #[error("attaching {program} failed: {source}")]
    Attach {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("eBPF object has no program or map named {0} (build mismatch: rebuild netwatch)")]
    Missing(&'static str),

    #[error("cannot use the agent socket {path}: {reason} (choose another with --socket)")]
    ApiSocket { path: PathBuf, reason: String },

    #[error(
        "no network namespace '{0}': give its inode (`lsns -t net` lists them) or a name from \
         `ip netns list`"
    )]
    NoSuchNetns(String),

    #[error("another netwatch agent is already running on {path}")]
    AgentRunning { path: PathBuf },

    #[error("{context}: {error}")]
    /// The I/O error is part of the message (not a `source`), so it is printed once.
    Io { context: String, error: std::io::Error },
}

impl Error {
    /// A mistake in the command line, rather than a failure: exit code 2, as clap's own.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::NoSuchNetns(_))
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), error: source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
