//! Lines of standard input for coroutines.
//!
//! A dedicated OS thread does the blocking reads and hands each line over a may channel.
//! Wrapping stdin in `may::io::CoIo` instead fails for regular files and `/dev/null`, and
//! sets `O_NONBLOCK` on a shared terminal, which then breaks writes to stdout.
#![allow(clippy::disallowed_methods)]

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;

use may::sync::{mpsc, Semphore};

/// Lines read ahead of the consumer. The reader thread waits when this many are queued, so
/// a huge input costs no more memory than a short one.
const READ_AHEAD: usize = 1024;

/// Lines as they arrive: `None` after end of input or after a read error (which is
/// delivered as the last item).
pub struct Lines {
    rx: mpsc::Receiver<io::Result<String>>,
    free: Arc<Semphore>,
}

impl Lines {
    /// The next line, parking the coroutine (or thread) until one arrives.
    pub fn recv(&self) -> Option<io::Result<String>> {
        let line = self.rx.recv().ok()?;
        self.free.post();
        Some(line)
    }
}

impl Iterator for Lines {
    type Item = io::Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        self.recv()
    }
}

/// Starts reading standard input line by line. Call it once per process.
pub fn lines() -> Lines {
    read_lines(io::stdin())
}

/// Starts reading `source` line by line on its own thread. Line endings (`\n`, `\r\n`) are
/// stripped; bytes that are not UTF-8 become U+FFFD rather than ending the input.
pub fn read_lines<R: Read + Send + 'static>(source: R) -> Lines {
    let (tx, rx) = mpsc::channel();
    let free = Arc::new(Semphore::new(READ_AHEAD));
    let reader_free = free.clone();
    let reader = move || {
        let mut source = BufReader::new(source);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match source.read_until(b'\n', &mut buf) {
                Ok(0) => return,
                Ok(_) => {
                    if buf.ends_with(b"\n") {
                        buf.pop();
                        if buf.ends_with(b"\r") {
                            buf.pop();
                        }
                    }
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    reader_free.wait();
                    if tx.send(Ok(line)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("corokit-stdin".into())
        .spawn(reader)
    {
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(Err(e));
        return Lines { rx, free };
    }
    Lines { rx, free }
}
