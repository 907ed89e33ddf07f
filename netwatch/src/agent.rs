//! `netwatch agent`: loads the programs once and serves their stream on the local API socket
//! (`api`) to any number of `netwatch watch` clients, until SIGTERM/SIGINT.
//!
//! Each client gets its own task and a bounded queue (a tokio broadcast receiver): a slow
//! client is told how many records it missed, in-stream, and never holds up the others; a
//! client that connects and sends nothing is dropped after a short timeout.
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, BufWriter},
    net::{UnixListener, UnixStream},
    sync::broadcast,
};

use crate::{
    api::{self, Command, Request, SocketFile},
    cli::AgentArgs,
    output::{LossReason, LossRecord, StreamRecord, WallClock},
    tracer::Tracer,
    watch::Signals,
};

/// Records a client may fall behind by before it starts missing some.
const CLIENT_QUEUE: usize = 65_536;
/// How long a new client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(args: &AgentArgs) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    // Bind first: a second agent fails before touching the kernel.
    let listener = api::bind(&args.socket)?;
    let socket_file = SocketFile(args.socket.clone());
    listener
        .set_nonblocking(true)
        .context("configuring the agent socket")?;
    let listener = UnixListener::from_std(listener).context("registering the agent socket")?;

    let mut tracer = Tracer::start(&args.load_options())?;
    let (sender, _) = broadcast::channel::<Arc<StreamRecord>>(CLIENT_QUEUE);
    eprintln!(
        "netwatch agent: tracing via {}; serving {}",
        tracer.describe(),
        args.socket.display()
    );
    let mut records = Vec::new();
    loop {
        tokio::select! {
            _ = signals.stop() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(serve(stream, sender.subscribe())); }
                Err(error) => tracing::warn!("accepting an API client: {error}"),
            },
            next = tracer.next(&mut records) => {
                next?;
                for record in records.drain(..) {
                    // No subscriber is fine: nobody is watching.
                    let _ = sender.send(Arc::new(record));
                }
            }
        }
    }
    tracer.finish(&mut records)?;
    for record in records.drain(..) {
        let _ = sender.send(Arc::new(record));
    }
    drop(sender);
    drop(socket_file);
    Ok(())
}

/// One client connection: read its request, then answer it.
async fn serve(stream: UnixStream, records: broadcast::Receiver<Arc<StreamRecord>>) {
    let (read, write) = stream.into_split();
    let mut write = BufWriter::new(write);
    let mut line = Vec::new();
    let limit = api::MAX_REQUEST_BYTES as u64 + 1;
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(read.take(limit)).read_until(b'\n', &mut line),
    )
    .await;
    let request = match read {
        Err(_) => Err("no request within 5 s".to_string()),
        Ok(Err(error)) => Err(format!("reading the request: {error}")),
        Ok(Ok(_)) => Request::parse(line.strip_suffix(b"\n").unwrap_or(&line)),
    };
    let result = match request {
        Ok(Request {
            command: Command::Watch,
            ..
        }) => stream_records(&mut write, records).await,
        Err(message) => {
            let reply = api::error_line(&message) + "\n";
            write
                .write_all(reply.as_bytes())
                .await
                .and(write.flush().await)
        }
    };
    if let Err(error) = result {
        tracing::debug!("API client gone: {error}");
    }
}

async fn stream_records(
    write: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>,
    mut records: broadcast::Receiver<Arc<StreamRecord>>,
) -> std::io::Result<()> {
    let clock = WallClock::now();
    let mut missed_total = 0;
    loop {
        let line = match records.recv().await {
            Ok(record) => record.json(),
            Err(broadcast::error::RecvError::Lagged(count)) => {
                missed_total += count;
                let time = clock.wall(WallClock::monotonic_now_ns());
                let loss = LossRecord {
                    time,
                    reason: LossReason::ClientTooSlow,
                    count,
                    total: missed_total,
                };
                StreamRecord::Lost(loss).json()
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        write.write_all(line.as_bytes()).await?;
        write.write_all(b"\n").await?;
        if records.is_empty() {
            write.flush().await?;
        }
    }
    write.flush().await
}
