//! The local API between `netwatch agent` and short-lived netwatch commands: a unix stream
//! socket, root-only (mode 0600 in a 0700 directory), one JSON request line per connection,
//! answered with NDJSON lines.
use std::{
    io::{self, ErrorKind},
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    cli::TableSelect,
    error::{Error, Result},
};

pub const DEFAULT_SOCKET: &str = "/run/netwatch/agent.sock";

/// Longest request line the agent reads; anything longer is rejected.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Protocol version, sent in every request.
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Stream every transition and loss report, as NDJSON `StreamRecord`s, until either side
    /// closes.
    Watch,
    /// The socket table now: one line, a JSON array of `Listed` rows; only those `select`
    /// keeps when it is given (agents before it was added ignore it and send every row).
    Table {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        select: Option<TableSelect>,
    },
    /// Handshake latency and failure statistics: one line, a JSON `stats::Report`.
    Stats,
    /// Where the agent logs: one line, `{"path": PATH}` (null when it does not log).
    Log,
    /// Connection histories, open then retained closed ones: one line, a JSON array of
    /// `history::History`; only the connection with `cookie` when it is given.
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cookie: Option<u64>,
    },
    /// For a view that mirrors the table (`netwatch top`): one line, a JSON array of every
    /// `Listed` row (half-open connections aside); then, as `watch`, every record after
    /// that table, with a [`Update::Rows`] line between them whenever rows changed (at most
    /// ten a second). Nothing before the table is sent, nothing after it is missed.
    Live,
    /// Which processes and endpoints the kernel's protocol counters moved for since `since`
    /// (or since the agent started), from its events; and the host's counters at its start:
    /// one line, a JSON `attribution::Account`.
    Counters {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only what happened in this network namespace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<u32>,
    },
}

/// A line of the `live` answer that is not a stream record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Update {
    Rows(crate::record::RowsChange),
}

impl Update {
    /// Whether a `live` line is an update rather than a stream record.
    pub fn is_update(line: &str) -> bool {
        line.starts_with(r#"{"type":"rows""#)
    }

    /// The `rows` line for `change`, serialized where it lies: the agent writes one change
    /// to every live client, and a whole table after a resync.
    pub fn rows_line(change: &crate::record::RowsChange) -> String {
        /// [`Update`]'s shape over a borrowed change.
        #[derive(Serialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum Borrowed<'a> {
            Rows(&'a crate::record::RowsChange),
        }
        serde_json::to_string(&Borrowed::Rows(change))
            .unwrap_or_else(|e| error_line(&e.to_string()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    pub fn new(command: Command) -> Self {
        Request { v: VERSION, command }
    }

    /// Parses one request line; the error text goes back to the client.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        if line.len() > MAX_REQUEST_BYTES {
            return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
        }
        let request: Request =
            serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
        if request.v != VERSION {
            return Err(format!(
                "unsupported protocol version {} (this agent speaks {VERSION})",
                request.v
            ));
        }
        Ok(request)
    }
}

/// An error line sent to a client before closing its connection.
pub fn error_line(message: &str) -> String {
    serde_json::json!({ "type": "error", "error": message }).to_string()
}

/// Checks that no agent answers at `path` and that the socket can be made there, removing a
/// stale socket file left by a killed agent: what `bind` checks, for an agent to run before
/// it spends time loading programs.
pub fn check_free(path: &Path) -> Result<()> {
    let fail = |reason: String| Error::ApiSocket { path: path.to_path_buf(), reason };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(format!("cannot restrict {}: {e}", dir.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(fail("it exists and is not a socket".into()));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::AgentRunning { path: path.to_path_buf() });
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tracing::info!("replacing stale agent socket {}", path.display());
                std::fs::remove_file(path)
                    .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
            }
            Err(e) => return Err(fail(format!("cannot check the existing socket: {e}"))),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    Ok(())
}

/// Binds the agent's socket: refuses when another agent answers there, replaces a stale
/// socket file left by a killed agent, and creates the file with mode 0600.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    let fail = |reason: String| Error::ApiSocket { path: path.to_path_buf(), reason };
    check_free(path)?;
    // The file is created by bind(); a restrictive umask makes it 0600 from the start.
    // SAFETY: umask has no preconditions; it is restored right after.
    let previous = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    bound.map_err(|e| fail(e.to_string()))
}

/// Connects to a running agent; None when no agent listens at `path`.
pub async fn connect(path: &Path) -> io::Result<Option<tokio::net::UnixStream>> {
    match tokio::net::UnixStream::connect(path).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            Ok(None)
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Err(io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} is the agent's socket and only root may use it: run as root (sudo netwatch ...)",
                path.display()
            ),
        )),
        Err(e) => Err(e),
    }
}

/// How long a question to the agent may take: the agent answers from memory, and even a
/// table of 100 000 sockets takes it about two seconds.
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends one request and reads the one-line answer; None when no agent listens at `path`.
pub async fn ask(path: &Path, command: Command) -> io::Result<Option<String>> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let Some(stream) = connect(path).await? else { return Ok(None) };
    let (read, mut write) = stream.into_split();
    let request = serde_json::to_string(&Request::new(command)).map_err(io::Error::other)? + "\n";
    let exchange = async {
        write.write_all(request.as_bytes()).await?;
        let mut line = String::new();
        tokio::io::BufReader::new(read).read_line(&mut line).await?;
        Ok::<_, io::Error>(line)
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
        Ok(line) => line.map(Some),
        Err(_) => Err(io::Error::new(
            ErrorKind::TimedOut,
            format!("the agent at {} did not answer within {ANSWER_TIMEOUT:?}", path.display()),
        )),
    }
}

/// Removes the socket file when the agent stops.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_explained() {
        let line = serde_json::to_string(&Request::new(Command::Watch)).unwrap();
        assert_eq!(line, r#"{"v":1,"cmd":"watch"}"#);
        assert_eq!(Request::parse(line.as_bytes()), Ok(Request::new(Command::Watch)));
        assert!(Request::parse(br#"{"v":1,"cmd":"reboot"}"#).unwrap_err().contains("malformed"));
        assert!(Request::parse(br#"{"v":2,"cmd":"watch"}"#).unwrap_err().contains("version 2"));
        assert!(Request::parse(b"\xff\xfe").unwrap_err().contains("malformed"));
        let long = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(Request::parse(&long).unwrap_err().contains("longer"));
    }

    #[test]
    fn a_table_request_carries_its_selection_or_none() {
        let plain = Request::new(Command::Table { select: None });
        assert_eq!(serde_json::to_string(&plain).unwrap(), r#"{"v":1,"cmd":"table"}"#);
        assert_eq!(Request::parse(br#"{"v":1,"cmd":"table"}"#), Ok(plain));
        let select = TableSelect {
            tcp: true,
            listening: true,
            filter: vec!["sport".into(), "=".into(), ":80".into()],
            ..TableSelect::default()
        };
        let asked = Request::new(Command::Table { select: Some(select) });
        let line = serde_json::to_string(&asked).unwrap();
        assert_eq!(Request::parse(line.as_bytes()), Ok(asked));
        let unknown = br#"{"v":1,"cmd":"table","select":{"bogus":1}}"#;
        assert!(Request::parse(unknown).unwrap_err().contains("unknown field"));
    }

    #[test]
    fn a_rows_update_is_told_from_a_record_by_its_first_bytes() {
        let update = Update::Rows(crate::record::RowsChange::default());
        let line = Update::rows_line(&crate::record::RowsChange::default());
        assert!(Update::is_update(&line), "the tag comes first: {line}");
        assert_eq!(serde_json::from_str::<Update>(&line).unwrap(), update);
        let history = Request::new(Command::History { cookie: Some(7) });
        let line = serde_json::to_string(&history).unwrap();
        assert_eq!(line, r#"{"v":1,"cmd":"history","cookie":7}"#);
        assert_eq!(
            Request::parse(br#"{"v":1,"cmd":"history"}"#).unwrap().command,
            Command::History { cookie: None }
        );
    }

    #[test]
    fn bind_refuses_a_live_agent_and_replaces_a_stale_socket() {
        let dir = std::env::temp_dir().join(format!("netwatch-api-test-{}", std::process::id()));
        let path = dir.join("sub/agent.sock");
        let first = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(matches!(bind(&path), Err(Error::AgentRunning { .. })));
        drop(first); // the file stays behind, as after SIGKILL
        assert!(path.exists());
        let _second = bind(&path).unwrap();
        std::fs::write(dir.join("plain"), b"x").unwrap();
        assert!(bind(&dir.join("plain")).unwrap_err().to_string().contains("not a socket"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest::proptest! {
        /// Any bytes, and any JSON object with a known command's shape, parse or are refused
        /// with a message; nothing panics.
        #[test]
        fn any_request_line_parses_or_is_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            v in proptest::prelude::any::<i64>(),
            cmd in "[a-z]{0,8}",
        ) {
            let _ = Request::parse(&bytes);
            let line = format!(r#"{{"v":{v},"cmd":"{cmd}"}}"#);
            if let Err(message) = Request::parse(line.as_bytes()) {
                proptest::prop_assert!(!message.is_empty());
            }
        }
    }
}
