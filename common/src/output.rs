//! Standard output and standard error for coroutines.
//!
//! A write to a pipe whose reader has stopped reading blocks the writing thread; on a may
//! worker that stalls every coroutine scheduled there (a chat node would stop acknowledging).
//! A dedicated OS thread does the writes. Coroutines hand it lines and park, without blocking
//! their worker, only while [`BACKLOG`] lines are already waiting: a stalled reader slows the
//! producer down instead of growing memory.
#![allow(clippy::disallowed_methods)]

use std::io::{self, Write};
use std::sync::Arc;

use may::sync::{mpsc, Semphore};

/// Lines handed over but not yet written, counted in units of [`UNIT`] bytes (a short line
/// is one unit): at most 1,024 short lines, or 4 MiB of long ones.
pub const BACKLOG: usize = 1024;
pub const UNIT: usize = 4096;

/// The units a line of `len` bytes takes.
fn units(len: usize) -> usize {
    len.div_ceil(UNIT).clamp(1, BACKLOG)
}

enum Item {
    Line(String),
    /// Answered once everything before it has been written and flushed.
    Drained(mpsc::Sender<()>),
}

/// A handle on a writer thread; clones share it.
#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<Item>,
    free: Arc<Semphore>,
}

impl Output {
    /// Queues `line` (a newline is added). Output is flushed whenever the writer catches up,
    /// so a burst of lines costs few writes.
    pub fn line(&self, line: String) {
        for _ in 0..units(line.len() + 1) {
            self.free.wait();
        }
        let _ = self.tx.send(Item::Line(line));
    }

    /// Waits until every line queued so far is written: call it before the process exits.
    pub fn drain(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Item::Drained(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Waits at most `limit` for every line queued so far to be written; false when the
    /// reader is not reading (the process can still end: the writer thread holds nothing).
    pub fn drain_timeout(&self, limit: std::time::Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Item::Drained(tx)).is_ok() && rx.recv_timeout(crate::wait_limit(limit)).is_ok()
    }
}

/// Starts the writer thread for the process's standard output. Call it once per process.
pub fn stdout() -> io::Result<Output> {
    write_lines(io::stdout())
}

/// Starts the writer thread for the process's standard error. Call it once per process.
pub fn stderr() -> io::Result<Output> {
    write_lines(io::stderr())
}

/// Starts a writer thread for `sink`. Write errors (a closed pipe) drop the output, never
/// the producer: it keeps going as if the lines were written.
pub fn write_lines<W: Write + Send + 'static>(sink: W) -> io::Result<Output> {
    let (tx, rx) = mpsc::channel::<Item>();
    let free = Arc::new(Semphore::new(BACKLOG));
    let writer_free = free.clone();
    let writer = move || {
        let mut sink = io::BufWriter::with_capacity(64 * 1024, sink);
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Item::Line(line) => {
                        for _ in 0..units(line.len() + 1) {
                            writer_free.post();
                        }
                        let _ = writeln!(sink, "{line}");
                    }
                    Item::Drained(done) => {
                        let _ = sink.flush();
                        let _ = done.send(());
                    }
                }
                next = rx.try_recv().ok();
            }
            let _ = sink.flush();
        }
    };
    std::thread::Builder::new()
        .name("corokit-output".into())
        .spawn(writer)?;
    Ok(Output { tx, free })
}
