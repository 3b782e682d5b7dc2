//! `fetch`: downloads a list of URLs concurrently as coroutines, resumably and safely.
//!
//! The main thread reads the list lazily into a bounded queue and `jobs` worker coroutines
//! take the next entry when they are free, so memory does not grow with the length of the
//! list. Each entry is downloaded by [`download::fetch`], in its turn (see [`turn`]).

pub mod checksum;
pub mod cli;
pub mod download;
pub mod exchange;
pub mod files;
pub mod input;
pub mod naming;
pub mod netrc;
pub mod queue;
pub mod report;
pub mod resume;
pub mod segmented;
pub mod shown;
pub mod split;
mod turn;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use corokit_common::http::HttpOptions;
use corokit_common::stdin::Lines;
use corokit_common::Shutdown;
use may::sync::{mpmc, Semphore};

use crate::download::Context;
use crate::input::{Entry, Parser};
use crate::report::{Record, Reporter, Summary};

pub(crate) use corokit_common::text::hex;

/// Everything the command line can set.
#[derive(Debug, Clone)]
pub struct Options {
    pub output: PathBuf,
    pub jobs: usize,
    /// Downloads at once from one host; 0 for no limit.
    pub per_host: usize,
    pub retries: u32,
    /// The first wait between tries; it doubles each time (with jitter).
    pub retry_wait: Duration,
    /// Longest a single file may take across all its tries.
    pub file_timeout: Option<Duration>,
    pub headers: Vec<(String, String)>,
    /// Redirects followed per request (fetch follows them itself).
    pub max_redirects: u32,
    /// Connections per file (`--split`), when the server allows ranges.
    pub split: usize,
    /// No segment smaller than this (`--min-split-size`).
    pub min_split: u64,
    /// Total bytes per second across all downloads.
    pub limit_rate: Option<u64>,
    pub content_disposition: bool,
    /// Give each downloaded file the server's Last-Modified as its time.
    pub remote_time: bool,
    /// Fetch a complete file again only if the server's copy is newer (`-N`).
    pub timestamping: bool,
    /// `--user`/`--password`: sent (Basic) to the host of each list URL, never elsewhere.
    pub login: Option<(String, String)>,
    /// `--netrc`: logins by host, used when there is no `--user`.
    pub netrc: Vec<netrc::Login>,
    pub quiet: bool,
    pub report: Option<PathBuf>,
    pub http: HttpOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            output: PathBuf::from("."),
            jobs: 16,
            per_host: 8,
            retries: 5,
            retry_wait: Duration::from_secs(1),
            file_timeout: None,
            headers: Vec::new(),
            max_redirects: 10,
            split: 1,
            min_split: 1024 * 1024,
            limit_rate: None,
            content_disposition: false,
            remote_time: false,
            timestamping: false,
            login: None,
            netrc: Vec::new(),
            quiet: false,
            report: None,
            http: HttpOptions::default(),
        }
    }
}

/// A `-H "Name: value"` argument, checked the way the request will need it.
pub fn header_arg(arg: &str) -> Result<(String, String), RunError> {
    let bad = |why: &str| RunError::Usage(format!("--header {}: {why}", shown::Shown(arg)));
    let (name, value) = arg
        .split_once(':')
        .ok_or_else(|| bad("not \"Name: value\""))?;
    let (name, value) = (name.trim(), value.trim());
    ureq::http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| bad("not a valid header name"))?;
    ureq::http::HeaderValue::from_str(value).map_err(|_| bad("not a valid header value"))?;
    Ok((name.to_string(), value.to_string()))
}

/// Room for the user's headers in a request head, which also holds the request line (with
/// the URL), Host, Range and If-Range.
const USER_HEADERS: usize = 4 * 1024;

/// Checks that the `-H` headers and the User-Agent leave room for a URL in a request head.
pub fn check_request_head(headers: &[(String, String)], user_agent: &str) -> Result<(), RunError> {
    let size: usize = headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum::<usize>()
        + user_agent.len()
        + 14;
    if size > USER_HEADERS {
        return Err(RunError::Usage(format!(
            "the -H headers and --user-agent come to {size} bytes; at most {} KiB fit in a request with its URL",
            USER_HEADERS / 1024
        )));
    }
    Ok(())
}

/// The `--user-agent` value, checked the way the request will need it.
pub fn user_agent_arg(value: &str) -> Result<String, RunError> {
    ureq::http::HeaderValue::from_str(value).map_err(|_| {
        RunError::Usage(format!(
            "--user-agent {}: not a valid header value",
            shown::Shown(value)
        ))
    })?;
    Ok(value.to_string())
}

/// Open files each download may hold: its connection, one left idle by a redirect to another
/// host, its `dir=` directory, its file, and the file again while a checksum is computed.
const FILES_PER_JOB: u64 = 5;
/// Open files left for everything else (the list, the report, DNS, idle connections).
const FILES_SPARE: u64 = 64;

/// Raises the open-files limit as far as allowed and checks that `jobs` downloads, each
/// over up to `split` connections, fit in it.
pub fn check_open_files(jobs: usize, split: usize) -> Result<(), RunError> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (limit.current, limit.maximum) {
        if cur < max {
            limit.current = Some(max);
            let _ = setrlimit(Resource::Nofile, limit);
        }
    }
    let Some(cur) = getrlimit(Resource::Nofile).current else {
        return Ok(());
    };
    let per_job = FILES_PER_JOB + split.saturating_sub(1) as u64;
    let needs = jobs as u64 * per_job + FILES_SPARE;
    if needs > cur {
        let fits = cur.saturating_sub(FILES_SPARE) / per_job;
        return Err(RunError::Usage(format!(
            "-j {jobs} needs about {needs} open files, and this process may have {cur} \
             (ulimit -n); use -j {fits} or less, or raise the limit"
        )));
    }
    Ok(())
}

/// Memory maps each download coroutine takes: its stack and the guard page below it.
const MAPS_PER_JOB: u64 = 2;
/// Memory maps left for everything else (libraries, heap arenas, threads, buffers).
const MAPS_SPARE: u64 = 4096;

/// Checks that `jobs` downloads, each with up to `split` coroutines, fit in the memory maps
/// the kernel allows a process (`vm.max_map_count`): past it, creating one fails half-way
/// through a run.
pub fn check_jobs(jobs: usize, split: usize) -> Result<(), RunError> {
    let Some(max) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return Ok(());
    };
    let per_job = MAPS_PER_JOB * split.max(1) as u64;
    let fits = max.saturating_sub(MAPS_SPARE) / per_job;
    if jobs as u64 > fits {
        return Err(RunError::Usage(format!(
            "-j {jobs} needs about {} memory maps, and this system allows {max} \
             (vm.max_map_count); use -j {fits} or less, or raise vm.max_map_count",
            jobs as u64 * per_job + MAPS_SPARE
        )));
    }
    Ok(())
}

/// The logins of `--user USER[:PASSWORD]`, `--password` and `--netrc` (`$NETRC`, else
/// `~/.netrc`), checked at start.
pub fn login_args(
    user: Option<&str>,
    password: Option<&str>,
    use_netrc: bool,
) -> Result<Logins, RunError> {
    let login = match (user, password) {
        (None, None) => None,
        (None, Some(_)) => return Err(RunError::Usage("--password goes with --user".into())),
        (Some(u), Some(p)) => Some((u.to_string(), p.to_string())),
        (Some(u), None) => Some(match u.split_once(':') {
            Some((u, p)) => (u.to_string(), p.to_string()),
            None => (u.to_string(), String::new()),
        }),
    };
    // The Basic header must fit the request head with everything else (see
    // `check_request_head`): a login that cannot is refused here, not on every URL.
    if login
        .as_ref()
        .is_some_and(|(u, p)| u.len() + p.len() > 2048)
    {
        return Err(RunError::Usage(
            "--user/--password: more than 2 KiB does not fit a request".into(),
        ));
    }
    if login
        .as_ref()
        .is_some_and(|(u, p)| u.contains(':') || format!("{u}{p}").chars().any(char::is_control))
    {
        return Err(RunError::Usage(
            "--user: a user name without ':' and no control characters".into(),
        ));
    }
    let mut logins = Vec::new();
    if use_netrc {
        let path = std::env::var_os("NETRC")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".netrc")))
            .ok_or_else(|| RunError::Usage("--netrc: neither NETRC nor HOME is set".into()))?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            RunError::Usage(format!("--netrc: cannot read {}: {e}", path.display()))
        })?;
        logins = netrc::parse(&text);
    }
    Ok(Logins {
        login,
        netrc: logins,
    })
}

/// What [`login_args`] read.
pub struct Logins {
    pub login: Option<(String, String)>,
    pub netrc: Vec<netrc::Login>,
}

/// A size or rate argument (`--limit-rate`, `--min-split-size`): a number of bytes with an
/// optional K, M, G or T (powers of 1024), more than zero.
pub fn size_arg(flag: &str, text: &str) -> Result<u64, RunError> {
    match corokit_common::size::parse(text) {
        Ok(0) => Err(RunError::Usage(format!(
            "{flag} {text:?} must be more than zero"
        ))),
        Ok(n) => Ok(n),
        Err(why) => Err(RunError::Usage(format!("{flag} {why}"))),
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the output directory {path}: {source}")]
    OutputDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the report {path}: {source}")]
    Report {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] corokit_common::Error),
    #[error("{0}")]
    Usage(String),
}

/// Downloads every entry of `list` and returns the totals. Stops early, keeping partial
/// files, when `shutdown` is requested.
pub fn run(options: Options, list: Lines, shutdown: Shutdown) -> Result<Summary, RunError> {
    let ctx = context(options, shutdown.clone())?;
    let pool = Pool::start(&ctx, Arc::new(NoHooks))?;
    // The list is read on this thread: entries reach the download coroutines in the list's
    // order, so the first of several lines of one URL is the one that downloads it.
    produce(&ctx, pool, list, &shutdown);
    Ok(ctx.reporter.finish())
}

/// Parses the list's lines and gives each entry to the pool; then lets the pool finish.
fn produce(ctx: &Context, mut pool: Pool, mut list: Lines, shutdown: &Shutdown) {
    let mut parser = Parser::new();
    while !shutdown.is_requested() {
        let Some(line) = list.recv() else { break };
        let parsed = match line {
            Ok(line) => parser.push(&line),
            Err(corokit_common::stdin::LineError::TooLong { limit }) => parser.push_too_long(limit),
            Err(e) => {
                ctx.reporter.list_error(&e.to_string());
                break;
            }
        };
        if let Some(bad) = parsed.bad {
            ctx.reporter.bad_line(&bad);
        }
        if let Some(entry) = parsed.entry {
            pool.give(entry);
        }
    }
    if !shutdown.is_requested() {
        if let Some(entry) = parser.finish() {
            pool.give(entry);
        }
    }
    pool.finish();
}

/// The shared state of a run: the output directory, the reporter and the options.
pub(crate) fn context(mut options: Options, shutdown: Shutdown) -> Result<Arc<Context>, RunError> {
    let root = files::Dir::create(&options.output, files::OWNER).map_err(|source| {
        RunError::OutputDir {
            path: options.output.clone(),
            source,
        }
    })?;
    // fetch follows redirects itself, checking each one (see `exchange`).
    options.http.max_redirects = 0;
    let reporter = Reporter::new(options.quiet, options.report.as_ref()).map_err(|source| {
        RunError::Report {
            path: options.report.clone().unwrap_or_default(),
            source,
        }
    })?;
    Ok(Arc::new(Context::new(options, root, reporter, shutdown)))
}

/// What a pool's owner does around each download.
pub(crate) trait Hooks: Send + Sync {
    /// Before the download; what it returns is handed to [`Hooks::done`].
    fn begin(&self, _entry: &Entry) -> Option<Box<dyn std::any::Any + Send>> {
        None
    }
    /// With the entry's record, once the reporter has it.
    fn done(&self, entry: &Entry, record: &Record, begun: Option<Box<dyn std::any::Any + Send>>);
}

/// A local list's run: nothing around downloads.
struct NoHooks;

impl Hooks for NoHooks {
    fn done(&self, _: &Entry, _: &Record, _: Option<Box<dyn std::any::Any + Send>>) {}
}

/// `jobs` download coroutines taking entries from a queue bounded to `jobs` places, so
/// whoever gives entries goes only as fast as they are taken.
pub(crate) struct Pool {
    // may's channels are unbounded: its free places bound the queue.
    free: Arc<Places>,
    /// The turns of a list's lines, handed out as they are queued.
    turns: turn::Turns,
    tx: mpmc::Sender<Option<(Entry, turn::Turn)>>,
    workers: Vec<may::coroutine::JoinHandle<()>>,
}

/// The free places of a pool's queue. Places taken by the coroutines are given back in
/// batches, with one post of a semaphore that counts batches: whoever fills the queue (the
/// main thread, for a list) is woken once per batch, not once per entry. (Woken once per
/// entry, the main thread took a fifth of a small file's CPU in thread switches; posting a
/// batch place by place wakes it as often, since the woken thread runs at once.) A batch is
/// at most a quarter of the queue, so the queue is still three quarters full when the filler
/// has to wait, and no coroutine waits for an entry because of it.
struct Places {
    /// Batches given back and not yet taken by the filler.
    batches: Semphore,
    /// Places the filler holds: free places it may fill without waiting.
    held: AtomicUsize,
    /// Entries ever taken: the places of the last `taken % batch` are not given back yet.
    taken: AtomicUsize,
    batch: usize,
}

impl Places {
    fn new(jobs: usize) -> Places {
        Places {
            batches: Semphore::new(0),
            held: AtomicUsize::new(jobs),
            taken: AtomicUsize::new(0),
            batch: (jobs / 4).clamp(1, 64),
        }
    }

    /// An entry was taken from the queue.
    fn taken(&self) {
        if (self.taken.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(self.batch) {
            self.batches.post();
        }
    }

    /// Waits for a free place; then takes as many more as are free, up to `most`.
    fn take(&self, most: usize) -> usize {
        let mut held = self.held.load(Ordering::Relaxed);
        if held == 0 {
            self.batches.wait();
            held = self.batch;
        }
        while held < most && self.batches.try_wait() {
            held += self.batch;
        }
        let n = held.min(most.max(1));
        self.held.store(held - n, Ordering::Relaxed);
        n
    }

    /// Gives back places taken by [`Places::take`] and not filled.
    fn unused(&self, n: usize) {
        self.held.fetch_add(n, Ordering::Relaxed);
    }
}

impl Pool {
    pub(crate) fn start(ctx: &Arc<Context>, hooks: Arc<dyn Hooks>) -> Result<Pool, RunError> {
        let jobs = ctx.options.jobs.max(1);
        let free = Arc::new(Places::new(jobs));
        let (tx, rx) = mpmc::channel();
        let active = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::with_capacity(jobs);
        for n in 0..jobs {
            let (ctx, rx, free, active, hooks) = (
                ctx.clone(),
                rx.clone(),
                free.clone(),
                active.clone(),
                hooks.clone(),
            );
            workers.push(corokit_common::spawn(move || {
                download::keep_shard(n);
                while let Ok(Some((entry, turn))) = rx.recv() {
                    free.taken();
                    let now = active.fetch_add(1, Ordering::Relaxed) + 1;
                    ctx.reporter.set_active(now);
                    // A panic is a bug; it fails its entry (and the run's exit status)
                    // instead of making the entry vanish with its worker.
                    let begun = hooks.begin(&entry);
                    let fetched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        download::fetch(&ctx, &entry, turn)
                    }));
                    let record = fetched.unwrap_or_else(|panic| {
                        let why = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        download::panicked(&entry, &why)
                    });
                    ctx.reporter.finished(&record);
                    hooks.done(&entry, &record, begun);
                    let now = active.fetch_sub(1, Ordering::Relaxed) - 1;
                    ctx.reporter.set_active(now);
                }
            })?);
        }
        Ok(Pool {
            free,
            turns: turn::Turns::new(),
            tx,
            workers,
        })
    }

    /// Waits for a free place, then queues `entry`, a line of a list: lines take their names
    /// in the list's order.
    pub(crate) fn give(&mut self, entry: Entry) {
        self.free.take(1);
        let _ = self.tx.send(Some((entry, self.turns.next())));
    }

    /// Waits for a free place; then as many more as are free too, up to `most`: the number
    /// of entries that may be given at once without waiting.
    pub(crate) fn places(&self, most: usize) -> usize {
        self.free.take(most)
    }

    /// Queues `entry` into a place taken by [`Pool::places`].
    /// A queue's entries keep no order (other workers take their neighbours), and one may
    /// wait in [`Hooks::begin`] until another worker has written its file: in turns, it would
    /// hold back every entry after it.
    pub(crate) fn put(&self, entry: Entry) {
        let _ = self.tx.send(Some((entry, turn::Turn::unordered())));
    }

    /// Gives back places taken by [`Pool::places`] and not used.
    pub(crate) fn unused(&self, n: usize) {
        self.free.unused(n);
    }

    /// Lets the coroutines finish what they have, and waits for them.
    pub(crate) fn finish(self) {
        for _ in 0..self.workers.len() {
            let _ = self.tx.send(None);
        }
        corokit_common::join_all(self.workers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_come_back_a_batch_at_a_time_and_unused_ones_at_once() {
        let places = Places::new(8);
        assert_eq!(places.batch, 2);
        // The queue's places, all free at first.
        assert_eq!(places.take(5), 5);
        assert_eq!(places.take(5), 3);
        // One entry taken is not a batch: nothing comes back yet.
        places.taken();
        assert!(!places.batches.try_wait());
        places.taken();
        // A batch: the filler gets two places for one wake-up.
        assert_eq!(places.take(5), 2);
        places.unused(1);
        assert_eq!(places.take(1), 1);
    }

    /// Whatever the number of coroutines (and so the batch), every entry given is taken:
    /// the places a batch holds back never leave the filler waiting on an empty queue.
    #[test]
    fn a_filler_never_waits_on_places_held_back_in_a_batch() {
        corokit_common::init();
        for jobs in [1, 2, 3, 4, 5, 7, 8, 9, 63, 64, 65, 300] {
            let places = Arc::new(Places::new(jobs));
            let (tx, rx) = mpmc::channel::<Option<usize>>();
            let got = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..jobs)
                .map(|_| {
                    let (places, rx, got) = (places.clone(), rx.clone(), got.clone());
                    corokit_common::spawn(move || {
                        while let Ok(Some(_)) = rx.recv() {
                            places.taken();
                            got.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                    .unwrap()
                })
                .collect();
            let (done, filled) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for i in 0..2_000 {
                    places.take(1);
                    tx.send(Some(i)).unwrap();
                }
                for _ in 0..jobs {
                    tx.send(None).unwrap();
                }
                done.send(()).unwrap();
            });
            assert!(
                filled.recv_timeout(Duration::from_secs(20)).is_ok(),
                "-j {jobs}: the filler is still waiting for a place"
            );
            corokit_common::join_all(workers);
            assert_eq!(got.load(Ordering::Relaxed), 2_000, "-j {jobs}");
        }
    }
}
