//! Lines of standard input for coroutines.
//!
//! A dedicated OS thread does the blocking reads and hands the lines over a may channel, as
//! many at once as it read in one go (a list file: up to [`BATCH`] lines per hand-over, so a
//! long list costs a wake-up per batch, not per line; a terminal: each line as it is typed).
//! Wrapping stdin in `may::io::CoIo` instead fails for regular files and `/dev/null`, and
//! sets `O_NONBLOCK` on a shared terminal, which then breaks writes to stdout.
#![allow(clippy::disallowed_methods)]

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;

use may::sync::{mpsc, Semphore};

/// Lines handed over at once, at most.
const BATCH: usize = 64;
/// Batches read ahead of the consumer (so at most `BATCH` × this many lines). The reader
/// thread waits when this many are queued, so a huge input costs no more memory than a
/// short one.
const READ_AHEAD: usize = 16;

/// The longest line delivered; longer ones are skipped (read and dropped, never held in
/// memory) and reported as [`LineError::TooLong`].
pub const MAX_LINE: usize = 1024 * 1024;

/// A line that could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Longer than [`MAX_LINE`] bytes: skipped; the lines after it still come.
    #[error("the line is longer than {limit} bytes; skipped")]
    TooLong { limit: usize },
    /// Reading failed: this is the last item.
    #[error(transparent)]
    Read(#[from] io::Error),
}

/// Lines as they arrive: `None` after end of input or after a read error (which is
/// delivered as the last item).
pub struct Lines {
    rx: mpsc::Receiver<Vec<Result<String, LineError>>>,
    free: Arc<Semphore>,
    /// The rest of the batch last received, in reverse order.
    batch: Vec<Result<String, LineError>>,
}

impl Lines {
    /// The next line, parking the coroutine (or thread) until one arrives.
    pub fn recv(&mut self) -> Option<Result<String, LineError>> {
        if let Some(line) = self.batch.pop() {
            return Some(line);
        }
        let mut next = self.rx.recv().ok()?;
        self.free.post();
        next.reverse();
        let line = next.pop();
        self.batch = next;
        line
    }
}

impl Iterator for Lines {
    type Item = Result<String, LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.recv()
    }
}

/// Reads the next line into `buf` (without its `\n`), keeping at most `limit` bytes:
/// `Ok(None)` at the end of input, `Ok(Some(false))` for a line that was longer (its bytes
/// were consumed and dropped).
fn next_line(
    source: &mut impl BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Option<bool>> {
    buf.clear();
    let mut fits = true;
    let mut any = false;
    loop {
        let chunk = match source.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(any.then_some(fits));
        }
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if fits && buf.len() + take <= limit {
            buf.extend_from_slice(&chunk[..take]);
        } else {
            fits = false;
            buf.clear();
        }
        source.consume(take + usize::from(done));
        if done {
            return Ok(Some(fits));
        }
    }
}

/// Starts reading standard input line by line. Call it once per process.
pub fn lines() -> Lines {
    read_lines(io::stdin())
}

/// Starts reading `source` line by line on its own thread. Line endings (`\n`, `\r\n`) are
/// stripped; bytes that are not UTF-8 become U+FFFD rather than ending the input.
pub fn read_lines<R: Read + Send + 'static>(source: R) -> Lines {
    read_lines_limited(source, MAX_LINE)
}

/// [`read_lines`] with another longest line.
pub fn read_lines_limited<R: Read + Send + 'static>(source: R, limit: usize) -> Lines {
    let (tx, rx) = mpsc::channel();
    let free = Arc::new(Semphore::new(READ_AHEAD));
    let reader_free = free.clone();
    let reader = move || {
        let mut source = BufReader::new(source);
        let mut buf = Vec::new();
        let mut batch = Vec::new();
        loop {
            let (item, last) = match next_line(&mut source, &mut buf, limit) {
                Ok(None) => (None, true),
                Ok(Some(true)) => {
                    if buf.ends_with(b"\r") {
                        buf.pop();
                    }
                    (Some(Ok(String::from_utf8_lossy(&buf).into_owned())), false)
                }
                Ok(Some(false)) => (Some(Err(LineError::TooLong { limit })), false),
                Err(e) => (Some(Err(LineError::Read(e))), true),
            };
            batch.extend(item);
            // Handed over when full, at the end, or when the next line is not read yet (a
            // terminal: the user is still typing it).
            let more = source.buffer().contains(&b'\n');
            if batch.len() >= BATCH || last || (!more && !batch.is_empty()) {
                if !batch.is_empty() {
                    reader_free.wait();
                    if tx.send(std::mem::take(&mut batch)).is_err() {
                        return;
                    }
                }
                if last {
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
        let _ = tx.send(vec![Err(LineError::Read(e))]);
        return Lines {
            rx,
            free,
            batch: Vec::new(),
        };
    }
    Lines {
        rx,
        free,
        batch: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_skipped_without_being_kept() {
        let mut input = b"short\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100_000));
        input.extend_from_slice(b"\nafter\nlast without newline");
        let lines: Vec<String> = read_lines_limited(std::io::Cursor::new(input), 1000)
            .map(|l| match l {
                Ok(l) => l,
                Err(e) => format!("error: {e}"),
            })
            .collect();
        assert_eq!(
            lines,
            [
                "short",
                "error: the line is longer than 1000 bytes; skipped",
                "after",
                "last without newline"
            ]
        );
    }

    /// Lines are handed over in batches only as far as they were already read: a line typed
    /// at a terminal (or written to a pipe that stays open) comes at once.
    #[test]
    fn a_line_comes_as_soon_as_it_is_read_and_a_long_input_whole() {
        use std::io::Write;
        let (reader, mut writer) = std::io::pipe().unwrap();
        let mut lines = read_lines(reader);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            while let Some(line) = lines.recv() {
                if tx.send(line.unwrap()).is_err() {
                    return;
                }
            }
        });
        let wait = std::time::Duration::from_secs(10);
        writer.write_all(b"typed\n").unwrap();
        assert_eq!(
            rx.recv_timeout(wait).expect("a line waited for more"),
            "typed"
        );
        let many: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        writer.write_all(many.as_bytes()).unwrap();
        writer.write_all(b"after\n").unwrap();
        for i in 0..10_000 {
            assert_eq!(rx.recv_timeout(wait).unwrap(), format!("line {i}"));
        }
        assert_eq!(
            rx.recv_timeout(wait).expect("the last line waited"),
            "after"
        );
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_kept() {
        let lines: Vec<_> = read_lines_limited(std::io::Cursor::new(b"abcd\nabcde\n".to_vec()), 4)
            .map(|l| l.is_ok())
            .collect();
        assert_eq!(lines, [true, false]);
    }
}
