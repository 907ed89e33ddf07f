//! Where `netwatch top` gets its data: a running agent's `live` answer (the table, then its
//! changes and the stream), or, without an agent, programs of its own run in-process as the
//! agent runs them. Either way the view sees the same updates, and can ask for one
//! connection's history and the listeners' queues.
use std::path::PathBuf;

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
};

use super::replay::Replaying;
use crate::{
    kernel::loader::LoadOptions,
    record::{Listed, RowsChange, StreamRecord},
    serve::api::{self, Command, Request, Update},
    state::{
        history::{Histories, History, Retention},
        stats::{ListenerSummary, listener_summaries},
        tracer::{Scope, Tracer},
    },
};

/// One thing that happened, for the model.
#[derive(Debug)]
pub enum News {
    Record(StreamRecord),
    /// A record from before the stretch a replay plays: for the table, not the stream pane.
    Past(StreamRecord),
    Rows(RowsChange),
}

pub enum Feed {
    Agent {
        socket: PathBuf,
        lines: Lines<BufReader<OwnedReadHalf>>,
        /// Kept open for as long as the feed is read.
        _request: OwnedWriteHalf,
    },
    Direct(Box<Direct>),
    /// `--replay`: an event log played back.
    Replay(Box<Replaying>),
}

/// Programs of top's own, with what the agent would keep for the detail view.
pub struct Direct {
    tracer: Tracer,
    histories: Histories,
    records: Vec<StreamRecord>,
}

impl Feed {
    /// Attaches to the agent at `socket` unless `own_programs`, or no agent runs there;
    /// returns the feed, the table to start from, and where it comes from in words.
    pub async fn open(
        socket: &std::path::Path,
        own_programs: bool,
        load: &LoadOptions,
    ) -> anyhow::Result<(Feed, Vec<Listed>, String)> {
        if !own_programs {
            let attached = api::connect(socket)
                .await
                .with_context(|| format!("attaching to the agent at {}", socket.display()))?;
            if let Some(stream) = attached {
                let (read, mut write) = stream.into_split();
                let request = serde_json::to_string(&Request::new(Command::Live))? + "\n";
                write.write_all(request.as_bytes()).await.context("asking the agent")?;
                let mut lines = BufReader::new(read).lines();
                let first = tokio::time::timeout(api::ANSWER_TIMEOUT, lines.next_line())
                    .await
                    .with_context(|| format!("the agent at {} did not answer", socket.display()))?
                    .context("reading the agent's table")?
                    .unwrap_or_default();
                let rows: Vec<Listed> = serde_json::from_str(&first).map_err(|_| {
                    anyhow::anyhow!(
                        "the agent at {} answered: {} (an agent older than this netwatch: \
                         restart it, or run `netwatch top --no-agent`)",
                        socket.display(),
                        first.trim()
                    )
                })?;
                let feed = Feed::Agent { socket: socket.to_path_buf(), lines, _request: write };
                return Ok((feed, rows, format!("agent {}", socket.display())));
            }
        }
        let mut tracer = Tracer::start(load)?.keeping_rows();
        let mut histories = Histories::new(Retention::default());
        if let Some(snapshot) = tracer.take_snapshot() {
            histories.seed(&snapshot);
        }
        tracer.track_changes(true);
        let rows = tracer.listed_with_half_open(Scope::LIVE, |_| true, |_| true);
        let source = format!("own programs, {}", tracer.describe());
        let direct = Direct { tracer, histories, records: Vec::new() };
        Ok((Feed::Direct(Box::new(direct)), rows, source))
    }

    /// Waits for what happens next and appends it to `out`.
    pub async fn next(&mut self, out: &mut Vec<News>) -> anyhow::Result<()> {
        match self {
            Feed::Agent { socket, lines, .. } => {
                let Some(line) = lines.next_line().await.context("reading the agent's stream")?
                else {
                    anyhow::bail!("the agent at {} stopped", socket.display());
                };
                if Update::is_update(&line) {
                    match serde_json::from_str(&line) {
                        Ok(Update::Rows(change)) => out.push(News::Rows(change)),
                        Err(error) => anyhow::bail!("the agent sent a bad update: {error}"),
                    }
                } else {
                    match serde_json::from_str::<StreamRecord>(&line) {
                        Ok(record) => out.push(News::Record(record)),
                        Err(_) => anyhow::bail!("the agent said: {line}"),
                    }
                }
            }
            Feed::Direct(direct) => {
                direct.tracer.next(&mut direct.records).await?;
                direct.absorb(out);
            }
            Feed::Replay(replaying) => replaying.next(out).await?,
        }
        Ok(())
    }

    /// The player, when replaying.
    pub fn replaying(&mut self) -> Option<&mut Replaying> {
        match self {
            Feed::Replay(replaying) => Some(replaying),
            _ => None,
        }
    }

    /// The clock the view runs on: CLOCK_MONOTONIC, or the recording's when replaying.
    pub fn now_ns(&self) -> u64 {
        match self {
            Feed::Replay(replaying) => replaying.now_ns(),
            _ => crate::record::WallClock::monotonic_now_ns(),
        }
    }

    /// Stops the programs of a direct feed, handing on what the kernel had delivered.
    pub fn finish(&mut self, out: &mut Vec<News>) -> anyhow::Result<()> {
        if let Feed::Direct(direct) = self {
            direct.tracer.finish(&mut direct.records)?;
            direct.absorb(out);
        }
        Ok(())
    }

    /// The connection's history, and the listener's queues when it is one.
    pub async fn detail(
        &mut self,
        cookie: u64,
    ) -> anyhow::Result<(Option<History>, Option<ListenerSummary>)> {
        match self {
            Feed::Agent { socket, .. } => {
                let line = api::ask(socket, Command::History { cookie: Some(cookie) })
                    .await?
                    .context("the agent stopped")?;
                let mut found: Vec<History> = serde_json::from_str(&line)
                    .map_err(|_| anyhow::anyhow!("the agent answered: {}", line.trim()))?;
                let history = found.pop();
                // The listeners' queues, only for a listener: stats dumps the kernel's.
                let Some(h) = history.as_ref().filter(|h| is_listener(h)) else {
                    return Ok((history, None));
                };
                let line = api::ask(socket, Command::Stats).await?.context("the agent stopped")?;
                let report: crate::state::stats::Report = serde_json::from_str(&line)
                    .map_err(|_| anyhow::anyhow!("the agent answered: {}", line.trim()))?;
                let listener = listener_of(h, report.listeners);
                Ok((history, listener))
            }
            Feed::Replay(replaying) => Ok((replaying.history(cookie), None)),
            Feed::Direct(direct) => {
                let history = direct.histories.of(cookie).pop();
                let listener = match &history {
                    Some(h) if is_listener(h) => {
                        let listeners = direct.tracer.listeners();
                        let kernel = direct.tracer.passive_sockets(&listeners);
                        listener_of(h, listener_summaries(listeners, kernel.as_deref()))
                    }
                    _ => None,
                };
                Ok((history, listener))
            }
        }
    }
}

/// Whether `h` is a listener's (unconnected, on a port).
fn is_listener(h: &History) -> bool {
    h.raddr.is_unspecified() && h.rport == 0 && h.lport != 0
}

/// The summary of the listener `h` is.
fn listener_of(h: &History, listeners: Vec<ListenerSummary>) -> Option<ListenerSummary> {
    listeners.into_iter().find(|l| l.netns == h.netns && l.lport == h.lport && l.laddr == h.laddr)
}

impl Direct {
    /// Hands new records to the histories and the view, then the rows they changed.
    fn absorb(&mut self, out: &mut Vec<News>) {
        for record in self.records.drain(..) {
            self.histories.observe(&record);
            out.push(News::Record(record));
        }
        if let Some(snapshot) = self.tracer.take_snapshot() {
            self.histories.reconcile(&snapshot, chrono::Utc::now());
        }
        self.histories.expire(chrono::Utc::now());
        if self.tracer.has_changes() {
            out.push(News::Rows(self.tracer.take_changes()));
        }
    }
}
