//! The connections of one split download (`--split`). Each takes a segment from
//! [`Segments`], asks for exactly its range with `If-Range` (the validator of the first
//! answer), and writes what arrives in place in the `.part`: positional writes made under
//! the segments' lock, so nothing is written once the download has ended. The download's own
//! coroutine waits for them, records the ranges done on the `.part` (so a run killed
//! meanwhile asks only for the missing ones), and ends at the first answer that shows
//! another version or breaks the rules, when every connection has failed, or when the file
//! is whole. Extra connections take free `--per-host` slots; a connection left holding a
//! stalled answer is not waited for (its segment went to another, and it can write nothing).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::download::{self, Context};
use crate::exchange::{self, Failure};
use crate::resume::{self, Ask, Decision, State};
use crate::split::{Next, Segments, Span, Taken};

/// Blocks read from the network and written in place, per connection.
const BLOCK: usize = 256 * 1024;
/// How often the ranges done are recorded while a download runs.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// A connection silent this long gives what is left of its segment to a free connection.
pub const STALLED: Duration = Duration::from_secs(3);

/// What the connections of one download share.
struct Shared {
    url: String,
    /// The recorded state: the version every answer must be.
    state: State,
    validator: String,
    deadline: Option<(Instant, Duration)>,
    file: File,
    part: PathBuf,
    segments: Mutex<Segments>,
    /// Each connection's end: `Ok` when nothing was left for it.
    ended: may::sync::mpsc::Sender<Result<(), Failure>>,
}

impl Shared {
    fn segments(&self) -> MutexGuard<'_, Segments> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A split download about to run.
pub struct Job {
    /// The URL every segment is asked from (redirects are followed per request).
    pub url: String,
    /// The state on the `.part`, with a validator and the file's length.
    pub state: State,
    pub deadline: Option<(Instant, Duration)>,
    /// The `.part`, open for writing (not appending), and its path (for messages).
    pub file: File,
    pub part: PathBuf,
    pub segments: Segments,
    /// An answer to a request for the whole file, whose first segment it fills.
    pub first: Option<ureq::http::Response<ureq::Body>>,
    /// The download's `--per-host` slot, for the first connection.
    pub slot: Option<corokit_common::Slot>,
}

/// Runs the connections until the file is whole (`Ok`), or the download ends otherwise.
/// `save` records the ranges done: every [`SAVE_EVERY`], and once more when the download
/// ends before the file is whole.
pub fn run(
    ctx: &Arc<Context>,
    job: Job,
    save: &mut dyn FnMut(&[Span]) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let Some(validator) = job.state.validator().map(str::to_string) else {
        return Err(Failure::Refused(
            "a split download needs a validator to check its segments against".into(),
        ));
    };
    let (ended, endings) = may::sync::mpsc::channel();
    let mut segments = job.segments;
    let first = job
        .first
        .and_then(|rsp| Some((segments.hold_first(Instant::now())?, rsp)));
    let worth = (segments.missing_bytes() / segments.min_split()).max(1);
    let shared = Arc::new(Shared {
        url: job.url,
        state: job.state,
        validator,
        deadline: job.deadline,
        file: job.file,
        part: job.part,
        segments: Mutex::new(segments),
        ended,
    });
    let mut live = 0;
    let wanted = ctx.options.split.min(worth as usize).max(1);
    let mut first = first;
    let mut own_slot = job.slot;
    for k in 0..wanted {
        // The first connection has the download's --per-host slot; the others take free
        // ones.
        let slot = match k {
            0 => own_slot.take(),
            _ => match ctx.spare_host_slot(&shared.url) {
                Some(slot) => slot,
                None => break,
            },
        };
        let (ctx, shared, first) = (ctx.clone(), shared.clone(), first.take());
        let spawned = corokit_common::spawn(move || {
            let _slot = slot;
            let result = connection(&ctx, &shared, first);
            let _ = shared.ended.send(result);
        });
        if spawned.is_ok() {
            live += 1;
        }
    }
    let mut failure = None;
    let mut saved = Instant::now();
    let mut recorded: Vec<Span> = shared.segments().done().to_vec();
    let result = loop {
        let wait = corokit_common::wait_limit(SAVE_EVERY);
        match endings.recv_timeout(wait) {
            Ok(Ok(())) => live -= 1,
            Ok(Err(f)) => {
                live -= 1;
                if !f.retryable() {
                    break Err(f);
                }
                failure = Some(f);
            }
            Err(_) => {}
        }
        let (complete, done) = {
            let s = shared.segments();
            (s.complete(), s.done().to_vec())
        };
        if complete {
            break Ok(());
        }
        if ctx.shutdown.is_requested() {
            break Err(Failure::Interrupted);
        }
        if let Some((until, limit)) = shared.deadline {
            if Instant::now() > until {
                break Err(Failure::OutOfTime(format!(
                    "the whole file took over {limit:?} (--timeout)"
                )));
            }
        }
        if live == 0 {
            break Err(failure.take().unwrap_or_else(|| {
                Failure::Incomplete("no connection is left to fetch the missing ranges".into())
            }));
        }
        if done != recorded && saved.elapsed() >= SAVE_EVERY {
            if let Err(f) = save(&done) {
                break Err(f);
            }
            recorded = done;
            saved = Instant::now();
        }
    };
    // Nothing is written from here on, whatever the connections still reading do.
    let done = {
        let mut s = shared.segments();
        s.close();
        s.done().to_vec()
    };
    // A file not whole keeps what was done for the next try; a whole one gets its complete
    // state from the caller (syncing a large file here would only cost time).
    if result.is_err() && done != recorded {
        let _ = save(&done);
    }
    result
}

/// One connection: takes segments until none is left for it, or fails.
fn connection(
    ctx: &Context,
    shared: &Shared,
    first: Option<(Taken, ureq::http::Response<ureq::Body>)>,
) -> Result<(), Failure> {
    let mut buf = Vec::new();
    let mut first = first;
    loop {
        let (taken, rsp) = match first.take() {
            Some(f) => f,
            None => match take(ctx, shared)? {
                Some(t) => t,
                None => return Ok(()),
            },
        };
        if buf.is_empty() {
            buf = vec![0u8; BLOCK];
        }
        if let Err(f) = receive(ctx, shared, taken, rsp, &mut buf) {
            shared.segments().release(taken.id);
            return Err(f);
        }
    }
}

/// The next segment for a free connection, asked for and answered as the rules require;
/// `None` when nothing is left for it.
fn take(
    ctx: &Context,
    shared: &Shared,
) -> Result<Option<(Taken, ureq::http::Response<ureq::Body>)>, Failure> {
    loop {
        if ctx.shutdown.is_requested() {
            return Err(Failure::Interrupted);
        }
        let now = Instant::now();
        let next = shared.segments().next(now);
        let taken = match next {
            Next::Finished => return Ok(None),
            Next::Wait(until) => {
                let wait = until
                    .saturating_duration_since(now)
                    .clamp(Duration::from_millis(10), SAVE_EVERY);
                if ctx.shutdown.wait_timeout(wait) {
                    return Err(Failure::Interrupted);
                }
                continue;
            }
            Next::Take(t) => t,
        };
        let ask = Ask::Range {
            first: taken.from,
            last: taken.to - 1,
            validator: shared.validator.clone(),
        };
        let answered =
            exchange::get(ctx, &shared.url, &ask, shared.deadline).and_then(|(rsp, _)| {
                match resume::decide(&ask, Some(&shared.state), &download::answer(&rsp)) {
                    Decision::Segment => Ok(rsp),
                    other => Err(download::failure(other, &rsp)),
                }
            });
        return match answered {
            Ok(rsp) => Ok(Some((taken, rsp))),
            Err(f) => {
                shared.segments().release(taken.id);
                Err(f)
            }
        };
    }
}

/// Writes the answer's bytes in place as segment `taken`, until the segment is done or no
/// longer this connection's (then the rest of the answer is left unread).
fn receive(
    ctx: &Context,
    shared: &Shared,
    taken: Taken,
    rsp: ureq::http::Response<ureq::Body>,
    buf: &mut [u8],
) -> Result<(), Failure> {
    let length = rsp.body().content_length();
    let mut reader = rsp.into_body().into_reader();
    let limit = shared.deadline.map(|(_, limit)| limit);
    let mut got = 0u64;
    loop {
        let Some((_, room)) = shared.segments().room(taken.id, buf.len()) else {
            return Ok(());
        };
        // Written as it arrives, not a block at a time: a slow connection shows its
        // progress, and only a silent one counts as stalled.
        let n = match reader.read(&mut buf[..room]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::from_io(e, limit)),
        };
        got += n as u64;
        let mine = put(shared, taken, &buf[..n])?;
        ctx.received(n);
        if !mine {
            if Some(got) == length {
                // The answer was read to its end: reading its end lets the connection be
                // kept for the next segment.
                let _ = reader.read(&mut [0u8; 1]);
            }
            return Ok(());
        }
        if n == 0 {
            return Err(Failure::Incomplete(format!(
                "the answer for bytes {}-{} ended early",
                taken.from,
                taken.to - 1
            )));
        }
        if ctx.shutdown.is_requested() {
            return Err(Failure::Interrupted);
        }
    }
}

/// Writes `bytes` where segment `taken` continues, as much of them as is still its own;
/// false when the segment is done or was given to another connection.
fn put(shared: &Shared, taken: Taken, bytes: &[u8]) -> Result<bool, Failure> {
    let mut segments = shared.segments();
    if bytes.is_empty() {
        return Ok(segments.room(taken.id, 1).is_some());
    }
    let Some((at, n)) = segments.room(taken.id, bytes.len()) else {
        return Ok(false);
    };
    shared
        .file
        .write_all_at(&bytes[..n], at)
        .map_err(|source| {
            Failure::File(crate::files::FileError::Io {
                what: "writing",
                path: shared.part.clone(),
                source,
            })
        })?;
    segments.wrote(taken.id, n, Instant::now());
    Ok(segments.room(taken.id, 1).is_some())
}
