//! What the agent keeps live, rebuilt from a log: the tables (a mark and its socket lines,
//! put back together), connection histories (`history --log`) and handshake statistics
//! (`stats --log`), by the same code the agent runs on the same records.
use std::collections::HashMap;

use super::{
    Entry, TableMark, TableReason,
    reader::{Next, Reader},
};
use crate::{
    host::snapshot::Snapshot,
    record::{Listed, StreamRecord},
    state::{history::Histories, stats::Stats},
};

/// An entry, with a table's lines put back together.
#[derive(Debug)]
pub enum Assembled {
    Record(StreamRecord),
    Table(TableMark, Vec<Listed>),
}

/// Puts each table back together from its mark and the socket lines after it. A table cut
/// short (the agent stopped while writing it) is handed over with the rows it has.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<(TableMark, Vec<Listed>)>,
}

impl Assembler {
    pub fn feed(&mut self, entry: Entry, out: &mut Vec<Assembled>) {
        match entry {
            Entry::Socket(socket) => {
                if let Some((mark, rows)) = &mut self.pending {
                    rows.push(socket.listed);
                    if rows.len() as u64 >= mark.sockets {
                        self.flush(out);
                    }
                }
            }
            Entry::Table(mark) => {
                self.flush(out);
                self.pending = Some((mark, Vec::new()));
                if self.pending.as_ref().is_some_and(|(mark, _)| mark.sockets == 0) {
                    self.flush(out);
                }
            }
            Entry::Record(record) => {
                self.flush(out);
                out.push(Assembled::Record(record));
            }
        }
    }

    /// Hands over a table still being put together.
    pub fn flush(&mut self, out: &mut Vec<Assembled>) {
        if let Some((mark, rows)) = self.pending.take() {
            out.push(Assembled::Table(mark, rows));
        }
    }
}

/// The snapshot a table's rows stand for, as histories are seeded from.
pub fn snapshot(rows: &[Listed]) -> Snapshot {
    let mut owners = HashMap::new();
    for listed in rows.iter().filter(|l| l.row.inode != 0 && !l.owners.is_empty()) {
        owners.insert(listed.row.inode, listed.owners.clone());
    }
    Snapshot {
        rows: rows.iter().map(|l| l.row.clone()).collect(),
        owners,
        namespaces: Vec::new(),
        unlisted: Vec::new(),
        problems: Vec::new(),
        took: std::time::Duration::ZERO,
    }
}

/// Every connection's history in what `reader` reads, kept without limit.
pub fn histories(reader: &mut Reader) -> std::io::Result<Histories> {
    let mut histories = Histories::default();
    let mut first = true;
    each(reader, |item| match item {
        Assembled::Record(record) => histories.observe(&record),
        Assembled::Table(mark, rows) => {
            take_table(&mut histories, &mark, &rows, std::mem::take(&mut first))
        }
    })?;
    Ok(histories)
}

/// Takes a table into `histories` as the agent takes its snapshots: the first one read
/// seeds them; a later one from a start or a resync is a new snapshot, and a connection it
/// lacks ended unseen. A rotation's table only adds what the histories do not know.
pub fn take_table(histories: &mut Histories, mark: &TableMark, rows: &[Listed], first: bool) {
    let snapshot = snapshot(rows);
    match mark.reason {
        TableReason::Start | TableReason::Resync if !first => {
            histories.reconcile(&snapshot, mark.time)
        }
        _ => histories.seed(&snapshot),
    }
}

/// Handshake statistics over what `reader` reads.
pub fn stats(reader: &mut Reader) -> std::io::Result<Stats> {
    let mut stats = Stats::new();
    each(reader, |item| match item {
        Assembled::Record(StreamRecord::Transition(t)) => stats.record(&t),
        Assembled::Record(StreamRecord::Retransmit(r)) => stats.record_retransmit(&r),
        _ => {}
    })?;
    Ok(stats)
}

/// Hands every assembled entry of `reader` to `take`.
fn each(reader: &mut Reader, mut take: impl FnMut(Assembled)) -> std::io::Result<()> {
    let mut assembler = Assembler::default();
    let mut out = Vec::new();
    loop {
        match reader.next(&mut |_| true)? {
            Next::Entry(entry) => assembler.feed(entry, &mut out),
            Next::Pending | Next::End => {
                assembler.flush(&mut out);
                out.drain(..).for_each(&mut take);
                return Ok(());
            }
        }
        out.drain(..).for_each(&mut take);
    }
}
