//! One entry of the list, from name to verified file: claiming a name (the same URL twice in
//! a list is one download), deciding how to resume, the exchange, streaming to `.part`,
//! retries with backoff across mirrors, verification, and the final rename. What to do with
//! each answer is decided by `resume::decide`; files are touched only through a `Dir` (see `files`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::checksum::{Algo, Checksum, Hasher};
use corokit_common::flag::Flag;
use corokit_common::{Slot, Slots, TokenBucket};

use crate::exchange::{self, Failure};
use crate::files::{self, Dir, FileError, Kind};
use crate::input::Entry;
use crate::naming::{self, SafeName};
use crate::report::{Outcome, Record, Reporter};
use crate::resume::{self, Answer, Ask, Decision, Plan, Record as StateRecord, State};
use crate::segmented::{self, STALLED};
use crate::shown::Shown;
use crate::split::{self, Segments, Span};
use crate::turn::Turn;
use crate::Options;

/// Hosts whose `--per-host` slots are remembered before idle ones are forgotten.
const MAX_HOSTS: usize = 4096;
/// Bodies up to this size are received into memory and written in one go: an unnamed file
/// linked in with its state, no `.part`. A run killed meanwhile has written nothing for them.
const SMALL_BODY: u64 = 16 * 1024;
/// The longest state of a split download: one extended attribute holds about 4 KiB on ext4
/// (name included), and a split one's state grows as it records ranges.
const MAX_SPLIT_STATE: usize = 3800;
/// Large bodies are read and written in blocks of this size.
const BLOCK: usize = 256 * 1024;
/// Times one download may be told to start over (an answer that does not continue the
/// partial file) before it fails: each start-over asks for the whole file, which a working
/// server answers with 200.
const START_OVERS: u32 = 3;

/// A name being downloaded to in this run.
struct Claimant {
    url: String,
    line: usize,
    released: Arc<Flag>,
}

/// What makes two lines one download: the directory, the `out=` name and the URL. A later
/// line with the same key waits for the first (whatever names the server gives meanwhile).
type UnderwayKey = (PathBuf, Option<String>, String);

/// A download under way, as the lines waiting for it see it.
struct Underway {
    line: usize,
    done: Flag,
    /// How it failed, once it has: the lines waiting fail the same way, without trying
    /// again what it tried.
    failure: Mutex<Option<String>>,
}

/// Downloads at once per shard of the HTTP client, about: the client scans its whole idle
/// pool on every request (comparing keys), so many downloads at once share several pools.
const IDLE_PER_SHARD: usize = 16;

/// What every download shares.
pub struct Context {
    pub options: Options,
    /// The HTTP client, in shards: a pool's coroutine always uses the same one (see
    /// [`keep_shard`] and [`IDLE_PER_SHARD`]).
    agents: Vec<ureq::Agent>,
    pub reporter: Reporter,
    pub shutdown: corokit_common::Shutdown,
    root: Dir,
    claims: Mutex<HashMap<PathBuf, Claimant>>,
    underway: Mutex<HashMap<UnderwayKey, Arc<Underway>>>,
    /// Names URLs were saved under when not their own (numbered, or named by the server),
    /// per directory: `.fetch-names`, loaded once and kept up to date.
    names: Mutex<HashMap<PathBuf, HashMap<String, String>>>,
    hosts: Mutex<HashMap<String, Slots>>,
    rate: Option<RateLimit>,
}

may::coroutine_local!(static SHARD: std::cell::Cell<Option<usize>> = std::cell::Cell::new(None));

/// Makes the current coroutine (the `n`th of a pool) use one client shard for all its
/// requests: the connection a download leaves idle is in the shard its next download looks
/// in. (Chosen by URL, a shard could lack an idle connection while another had more than it
/// keeps: a fifth more connections were made than there were downloads at once.)
pub(crate) fn keep_shard(n: usize) {
    SHARD.with(|s| s.set(Some(n)));
}

/// The client's shards: one per [`IDLE_PER_SHARD`] downloads at once (at most 64), each
/// keeping its share of idle connections, with room for an uneven share.
fn agents(options: &Options) -> Vec<ureq::Agent> {
    let n = (options.jobs / IDLE_PER_SHARD).clamp(1, 64);
    let mut http = options.http.clone();
    if n > 1 {
        http.max_idle = (http.max_idle * 3 / 2).div_ceil(n).max(16);
        http.max_idle_per_host = (http.max_idle_per_host * 3 / 2).div_ceil(n).max(16);
    }
    http.agents(n)
}

/// Why a name could not be claimed.
enum NotClaimed {
    /// The same URL is being saved there by an earlier line: wait for it.
    Duplicate {
        line: usize,
        released: Arc<Flag>,
    },
    Failed(Failure),
}

impl Context {
    pub fn new(
        options: Options,
        root: Dir,
        reporter: Reporter,
        shutdown: corokit_common::Shutdown,
    ) -> Self {
        Context {
            agents: agents(&options),
            rate: options.limit_rate.map(RateLimit::new),
            options,
            reporter,
            shutdown,
            root,
            claims: Mutex::new(HashMap::new()),
            underway: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// The client shard of this coroutine (see [`keep_shard`]), else the one for `url`.
    pub(crate) fn agent(&self, url: &str) -> &ureq::Agent {
        let n = self.agents.len();
        let shard = SHARD.with(|s| s.get()).unwrap_or_else(|| {
            use std::hash::{BuildHasher, BuildHasherDefault};
            BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(url) as usize
        });
        &self.agents[shard % n]
    }

    /// Counts `n` bytes received and, under `--limit-rate`, waits until they are due.
    pub(crate) fn received(&self, n: usize) {
        self.reporter.add_bytes(n as u64);
        if let Some(rate) = &self.rate {
            let wait = rate.take(n);
            if !wait.is_zero() {
                corokit_common::sleep(wait);
            }
        }
    }

    /// A slot for `url`'s host under `--per-host`, freed when dropped.
    fn host_slot(&self, url: &str) -> Option<Slot> {
        self.host_slots(url).map(|s| s.take())
    }

    /// A free slot for one more connection to `url`'s host now: `Some(None)` when there is
    /// no `--per-host` limit, `None` when every slot is held.
    pub(crate) fn spare_host_slot(&self, url: &str) -> Option<Option<Slot>> {
        match self.host_slots(url) {
            None => Some(None),
            Some(slots) => slots.try_take().map(Some),
        }
    }

    fn host_slots(&self, url: &str) -> Option<Slots> {
        if self.options.per_host == 0 {
            return None;
        }
        let host = url
            .parse::<ureq::http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.as_str().to_ascii_lowercase()))
            .unwrap_or_default();
        let slots = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            if hosts.len() >= MAX_HOSTS && !hosts.contains_key(&host) {
                // Forget the hosts nobody is downloading from, so a list of many hosts
                // does not grow this map without end.
                hosts.retain(|_, slots| !slots.unused());
            }
            hosts
                .entry(host)
                .or_insert_with(|| Slots::new(self.options.per_host))
                .clone()
        };
        Some(slots)
    }

    /// The name `url` was saved under in `dir` by an earlier line or run, when it was not
    /// its own. Only a name fetch could have given is taken: the file is the user's to edit.
    fn remembered_name(&self, dir: &Dir, url: &str) -> Option<String> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let table = names
            .entry(dir.path(""))
            .or_insert_with(|| files::names(dir));
        table
            .get(&resume::url_hash(url))
            .filter(|name| !naming::sanitize(name).changed)
            .cloned()
    }

    /// Remembers that `url` is saved as `name` in `dir`, for later lines and runs.
    fn remember_name(&self, dir: &Dir, url: &str, name: &str) -> Result<(), Failure> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let table = names
            .entry(dir.path(""))
            .or_insert_with(|| files::names(dir));
        table.insert(resume::url_hash(url), name.to_string());
        files::remember_name(dir, url, name)?;
        Ok(())
    }

    /// Marks a download under way, or gives the one that is.
    fn start(&self, key: UnderwayKey, line: usize) -> Result<Started<'_>, Arc<Underway>> {
        let mut underway = self.underway.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(first) = underway.get(&key) {
            return Err(first.clone());
        }
        let mark = Arc::new(Underway {
            line,
            done: Flag::new(),
            failure: Mutex::new(None),
        });
        underway.insert(key.clone(), mark.clone());
        Ok(Started {
            ctx: self,
            key,
            mark,
        })
    }

    /// Claims a name in `dir` for `url`: the first of `name`, `name.1`, … whose final and
    /// partial names are both free or this URL's (from an earlier run), and that no other
    /// download of this run uses as either. Regular files that belong to another URL, or
    /// that fetch did not write, are never touched; a link or special file where fetch would
    /// write is an error.
    fn claim<'a>(
        &'a self,
        dir: &'a Dir,
        name: &str,
        url: &str,
        line: usize,
    ) -> Result<Claim<'a>, NotClaimed> {
        let failed = |f: Failure| NotClaimed::Failed(f);
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        for n in 0..10_000 {
            let candidate = if n == 0 {
                name.to_string()
            } else {
                naming::numbered(name, n)
            };
            let path = dir.path(&candidate);
            let part = part_name(&candidate);
            let part_path = dir.path(&part);
            // A name this run uses, final or partial, is its download's.
            if let Some(owner) = claims.get(&path).or_else(|| claims.get(&part_path)) {
                if owner.url == url {
                    return Err(NotClaimed::Duplicate {
                        line: owner.line,
                        released: owner.released.clone(),
                    });
                }
                continue;
            }
            let kinds = (dir.kind(&candidate), dir.kind(&part));
            let (done_kind, part_kind) = match kinds {
                (Ok(d), Ok(p)) => (d, p),
                (Err(source), _) | (_, Err(source)) => {
                    return Err(failed(Failure::File(FileError::Io {
                        what: "reading",
                        path,
                        source,
                    })))
                }
            };
            for (kind, at) in [(done_kind, &candidate), (part_kind, &part)] {
                if kind == Kind::Other {
                    return Err(failed(Failure::File(FileError::NotAFile(dir.path(at)))));
                }
            }
            // The name is this URL's only if every file there is: another URL's, a file fetch
            // did not write, or a state nobody can read (which anyone could have planted) is
            // never touched.
            let own = |name: &str, kind: Kind| match kind {
                Kind::Missing => Some(None),
                _ => match files::state(dir, name) {
                    StateRecord::Valid(s) if s.belongs_to(url) => Some(Some(s)),
                    _ => None,
                },
            };
            let (Some(done_state), Some(part_state)) =
                (own(&candidate, done_kind), own(&part, part_kind))
            else {
                continue;
            };
            // A download in progress (even over an older complete copy) goes by the partial
            // file's state; else the complete file's.
            let state = part_state.or(done_state);
            let released = Arc::new(Flag::new());
            let claimant = || Claimant {
                url: url.to_string(),
                line,
                released: released.clone(),
            };
            claims.insert(path, claimant());
            claims.insert(part_path, claimant());
            return Ok(Claim {
                ctx: self,
                dir,
                numbered: n > 0,
                name: candidate,
                part,
                state,
                released,
                if_newer: None,
                no_split: false,
                part_may_exist: part_kind != Kind::Missing,
            });
        }
        Err(failed(Failure::NameClash(format!(
            "no free name like {} in {}",
            Shown(name),
            dir.path("").display()
        ))))
    }
}

fn part_name(name: &str) -> String {
    format!("{name}.part")
}

/// A download marked under way; the mark goes (and waiting lines wake) when it is dropped.
struct Started<'a> {
    ctx: &'a Context,
    key: UnderwayKey,
    mark: Arc<Underway>,
}

impl Started<'_> {
    /// Records how the download ended, for the lines waiting for it.
    fn ended(&self, result: &Result<Outcome, Failure>) {
        if let Err(f) = result {
            if !matches!(f, Failure::Interrupted) {
                *self.mark.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(f.to_string());
            }
        }
    }
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        // The map's lock is let go before the waiting lines are woken: a worker thread is
        // never held on it while coroutines are being scheduled.
        {
            let mut underway = self.ctx.underway.lock().unwrap_or_else(|e| e.into_inner());
            underway.remove(&self.key);
        }
        self.mark.done.fire();
    }
}

/// A name held for one download during this run.
struct Claim<'a> {
    ctx: &'a Context,
    dir: &'a Dir,
    /// Not the name asked for but a numbered one: remembered once the file is made.
    numbered: bool,
    name: String,
    part: String,
    state: Option<State>,
    released: Arc<Flag>,
    /// `-N`: ask for the file only if the server's copy is newer than this HTTP date.
    if_newer: Option<String>,
    /// One connection only: a split download of this file had to start over.
    no_split: bool,
    /// A `.part` may be there: one was when the name was claimed, or this run made one.
    part_may_exist: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        {
            let mut claims = self.ctx.claims.lock().unwrap_or_else(|e| e.into_inner());
            claims.remove(&self.dir.path(&self.name));
            claims.remove(&self.dir.path(&self.part));
        }
        self.released.fire();
    }
}

impl Claim<'_> {
    fn size(&self, name: &str) -> Option<u64> {
        match self.dir.kind(name) {
            Ok(Kind::File { len }) => Some(len),
            _ => None,
        }
    }

    /// Bytes of the download in `.part`: its length, or what a split one has written.
    fn part_bytes(&self) -> Option<u64> {
        match self.state.as_ref().filter(|s| s.ranges.is_some()) {
            Some(state) => state.recorded_bytes(),
            None => self.size(&self.part),
        }
    }

    fn plan(&self) -> Plan {
        // Nothing recorded: nothing on disk matters (and a new download costs no stat).
        if self.state.is_none() {
            return Plan::Fresh { why: None };
        }
        resume::plan(
            self.state.as_ref(),
            self.size(&self.name),
            self.size(&self.part),
        )
    }

    /// Fails with [`Failure::Busy`] when another process holds the `.part` for writing: it
    /// is not replaced under that writer.
    fn not_busy(&self) -> Result<(), Failure> {
        match self.dir.open(&self.part) {
            Ok(f) => writing(&f, self),
            Err(_) => Ok(()),
        }
    }

    /// Forgets the partial file: the next request asks for the whole file.
    fn discard_part(&mut self) {
        self.dir.remove(&self.part);
        self.state = None;
    }

    /// Removes a partial file of this URL left beside a complete file just made.
    fn remove_stale_part(&self, url: &str) {
        if !self.part_may_exist {
            return;
        }
        if let StateRecord::Valid(s) = files::state(self.dir, &self.part) {
            if s.belongs_to(url) {
                self.dir.remove(&self.part);
            }
        }
    }
}

/// `--limit-rate`: one token bucket for the whole run, with at most a tenth of a second of
/// burst.
struct RateLimit(Mutex<TokenBucket>);

impl RateLimit {
    fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        RateLimit(Mutex::new(TokenBucket::empty(
            rate,
            rate / 10.0,
            Instant::now(),
        )))
    }

    /// Takes `n` bytes' worth of tokens and returns how long to wait for them.
    fn take(&self, n: usize) -> Duration {
        let mut bucket = self.0.lock().unwrap_or_else(|e| e.into_inner());
        bucket.take(Instant::now(), n as f64)
    }
}

/// Downloads one entry, retrying as allowed, and says how it went.
pub(crate) fn fetch(ctx: &Arc<Context>, entry: &Entry, mut turn: Turn) -> Record {
    let started = Instant::now();
    let mut record = Record::new(entry.line, &entry.urls[0]);
    let result = run(ctx, entry, &mut record, &mut turn);
    record.elapsed = started.elapsed();
    match result {
        Ok(outcome) => record.outcome = outcome,
        Err(failure) => {
            record.outcome = match failure {
                Failure::Interrupted => Outcome::Interrupted,
                Failure::Busy(_) | Failure::File(FileError::Io { .. }) => Outcome::Deferred,
                _ => Outcome::Failed,
            };
            record.error = Some(crate::shown::redact(&failure.to_string()).into_owned());
        }
    }
    record
}

/// The directory an entry is saved in: the output directory, or its `dir=` below it.
fn entry_dir(ctx: &Context, entry: &Entry) -> Result<Option<Dir>, Failure> {
    let Some(sub) = &entry.dir else {
        return Ok(None);
    };
    let (safe, changed) = naming::safe_subdir(sub);
    if changed {
        ctx.reporter.note(&format!(
            "line {}: dir={} made safe as {}",
            entry.line,
            Shown(sub),
            Shown(&safe.to_string_lossy())
        ));
    }
    Ok(Some(ctx.root.sub(&safe)?))
}

/// A record for an entry whose download panicked: a bug, reported as a failure rather than
/// lost.
pub fn panicked(entry: &Entry, why: &str) -> Record {
    let mut record = Record::new(entry.line, &entry.urls[0]);
    record.outcome = Outcome::Failed;
    record.error = Some(format!(
        "fetch failed internally (a bug; please report it): {}",
        crate::shown::redact(why)
    ));
    record
}

fn run(
    ctx: &Arc<Context>,
    entry: &Entry,
    record: &mut Record,
    turn: &mut Turn,
) -> Result<Outcome, Failure> {
    let sub = entry_dir(ctx, entry)?;
    let dir = sub.as_ref().unwrap_or(&ctx.root);
    // Earlier entries mark their downloads and claim their names first.
    turn.wait();
    // The same URL on an earlier line: one download. Once it is done, this entry finds the
    // file complete under whatever name it got, or fails as it did.
    let key = (dir.path(""), entry.out.clone(), entry.urls[0].clone());
    let started = loop {
        match ctx.start(key.clone(), entry.line) {
            Ok(started) => break started,
            Err(first) => {
                record.duplicate_of = Some(first.line);
                turn.pass();
                first.done.wait();
                let failure = first
                    .failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(error) = failure {
                    return Err(Failure::AsLine {
                        line: first.line,
                        error,
                    });
                }
            }
        }
    };
    let result = run_started(ctx, entry, record, dir, turn);
    started.ended(&result);
    result
}

/// [`run`] once no earlier line is downloading the same file.
fn run_started(
    ctx: &Arc<Context>,
    entry: &Entry,
    record: &mut Record,
    dir: &Dir,
    turn: &mut Turn,
) -> Result<Outcome, Failure> {
    let url = &entry.urls[0];
    // A URL saved under a number, or under the server's name, keeps that name.
    let remembered = entry
        .out
        .is_none()
        .then(|| ctx.remembered_name(dir, url))
        .flatten();
    let named = match (&entry.out, &remembered) {
        (Some(out), _) => naming::sanitize(out),
        (None, Some(name)) => SafeName {
            name: name.clone(),
            changed: false,
        },
        (None, None) => naming::from_url(url),
    };
    if named.changed {
        ctx.reporter.note(&format!(
            "line {}: saving {} as {} (the name was not safe)",
            entry.line,
            Shown(url),
            Shown(&named.name)
        ));
    }
    let mut claim = loop {
        match ctx.claim(dir, &named.name, url, entry.line) {
            Ok(claim) => break claim,
            Err(NotClaimed::Failed(f)) => return Err(f),
            Err(NotClaimed::Duplicate { line, released }) => {
                // The same URL on an earlier line: one download. Once it is done, this
                // entry finds the file complete (or tries again if it failed).
                record.duplicate_of = Some(line);
                turn.pass();
                released.wait();
            }
        }
    };
    turn.pass();
    record.path = Some(dir.path(&claim.name));
    if claim.plan() == Plan::Skip {
        record.bytes = claim.size(&claim.name).unwrap_or(0);
        let good = match &entry.checksum {
            None => true,
            Some(want) => match verify(dir, &claim.name, want) {
                Ok(shown) => {
                    record.checksum = Some(shown);
                    true
                }
                Err(Failure::Checksum { .. }) => {
                    // fetch's own file, and wrong: downloaded again into `.part`, and only
                    // a verified copy replaces it.
                    ctx.reporter.note(&format!(
                        "{} fails its checksum; downloading it again",
                        dir.path(&claim.name).display()
                    ));
                    claim.state = None;
                    false
                }
                Err(other) => return Err(other),
            },
        };
        if good {
            // With -N, asked again only if the server's copy is newer than ours (which
            // stays untouched until a newer one is whole).
            let since = match ctx.options.timestamping {
                true => dir.modified(&claim.name),
                false => None,
            };
            match since {
                Some(t) => claim.if_newer = Some(httpdate::fmt_http_date(t)),
                None => return Ok(Outcome::Skipped),
            }
        }
    }
    // With --content-disposition the server may still rename a download nobody has started.
    let may_rename = ctx.options.content_disposition
        && entry.out.is_none()
        && remembered.is_none()
        && claim.state.is_none();

    // --timeout runs from the first request: waiting for a --per-host slot is not the file's.
    let mut deadline = None;
    let mut dead = vec![false; entry.urls.len()];
    let mut mirror = 0;
    let mut retries_left = ctx.options.retries;
    let mut start_overs = 0;
    loop {
        if ctx.shutdown.is_requested() {
            return Err(Failure::Interrupted);
        }
        record.attempts += 1;
        let attempt_url = &entry.urls[mirror];
        // Until a response has been written somewhere, the server may still name the file.
        let rename = may_rename && claim.state.is_none();
        let result = {
            let slot = ctx.host_slot(attempt_url);
            if deadline.is_none() {
                deadline = ctx
                    .options
                    .file_timeout
                    .map(|limit| (Instant::now() + limit, limit));
            }
            let mut this = Try {
                url: attempt_url,
                deadline,
                slot,
            };
            attempt(ctx, entry, &mut this, &mut claim, rename, record)
        };
        record.path = Some(claim.dir.path(&claim.name));
        // A download just finished has its length in its state: no stat for it.
        let finished = claim
            .state
            .as_ref()
            .filter(|s| s.complete && result.is_ok());
        record.bytes = match finished.and_then(|s| s.length) {
            Some(length) => length,
            None => claim
                .size(&claim.name)
                .filter(|_| result.is_ok())
                .or_else(|| claim.part_bytes())
                .unwrap_or(0),
        };
        let failure = match result {
            Err(Failure::NotModified) => return Ok(Outcome::Skipped),
            Ok(()) => {
                if ctx.options.remote_time {
                    remote_time(&claim);
                }
                return Ok(Outcome::Ok);
            }
            Err(f) => f,
        };
        match &failure {
            Failure::StartOver(why) => {
                start_overs += 1;
                if start_overs > START_OVERS {
                    return Err(Failure::Refused(format!(
                        "{why} (asked for the whole file {START_OVERS} times)"
                    )));
                }
                ctx.reporter
                    .note(&format!("{}: starting over: {why}", Shown(attempt_url)));
                claim.discard_part();
                // Again, on one connection: a server that does not keep to ranges, or a
                // file that changes, is not split again.
                claim.no_split = true;
                continue;
            }
            Failure::Checksum { .. } => {
                // These bytes are wrong: never continued, and this mirror is done.
                claim.discard_part();
                dead[mirror] = true;
            }
            f if f.ends_mirror() => dead[mirror] = true,
            f if f.retryable() => {
                if retries_left == 0 {
                    return Err(failure);
                }
                retries_left -= 1;
            }
            _ => return Err(failure),
        }
        let Some(next) = (1..=entry.urls.len())
            .map(|i| (mirror + i) % entry.urls.len())
            .find(|&i| !dead[i])
        else {
            return Err(failure);
        };
        if failure.retryable() {
            let wait = backoff(ctx.options.retry_wait, record.attempts, &failure);
            if let Some((until, limit)) = deadline {
                let left = until.saturating_duration_since(Instant::now());
                if wait >= left {
                    return Err(Failure::OutOfTime(format!(
                        "{failure}; the next try would wait {:.1} s, past the --timeout of {:?}",
                        wait.as_secs_f64(),
                        limit
                    )));
                }
            }
            ctx.reporter.note(&format!(
                "retrying {} in {:.1} s after: {failure}",
                Shown(&entry.urls[mirror]),
                wait.as_secs_f64()
            ));
            if ctx.shutdown.wait_timeout(wait) {
                return Err(Failure::Interrupted);
            }
        } else {
            ctx.reporter.note(&format!(
                "trying the next mirror after {}: {failure}",
                Shown(&entry.urls[mirror])
            ));
        }
        mirror = next;
    }
}

/// Exponential backoff with full jitter, at least what `Retry-After` asked for.
fn backoff(base: Duration, attempt: u32, failure: &Failure) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(Duration::from_secs(60));
    let jittered = capped.mul_f64(0.5 + fastrand::f64() / 2.0);
    match failure {
        Failure::Status {
            retry_after: Some(after),
            ..
        } => jittered.max((*after).min(Duration::from_secs(600))),
        _ => jittered,
    }
}

/// `Retry-After`: delta-seconds or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn header<'a>(rsp: &'a ureq::http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    rsp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The status and the headers of an answer that the resume rules look at.
pub(crate) fn answer(rsp: &ureq::http::Response<ureq::Body>) -> Answer<'_> {
    Answer {
        status: rsp.status().as_u16(),
        content_range: header(rsp, "Content-Range"),
        content_length: rsp.body().content_length(),
        content_type: header(rsp, "Content-Type"),
        etag: header(rsp, "ETag"),
        last_modified: header(rsp, "Last-Modified"),
    }
}

/// How a decision that writes nothing ends the exchange.
pub(crate) fn failure(decision: Decision, rsp: &ureq::http::Response<ureq::Body>) -> Failure {
    match decision {
        Decision::NotSuccess => Failure::Status {
            status: rsp.status().as_u16(),
            retry_after: header(rsp, "Retry-After").and_then(retry_after),
        },
        Decision::Refuse(why) => Failure::Refused(why),
        Decision::Unchanged => Failure::NotModified,
        Decision::StartOver(why) => Failure::StartOver(why),
        other => Failure::Refused(format!("an answer fetch did not ask for ({other:?})")),
    }
}

/// The checksum being computed over what is written, when one is expected.
struct Hashing(Option<Hasher>);

impl Hashing {
    fn update(&mut self, bytes: &[u8]) {
        if let Some(ctx) = &mut self.0 {
            ctx.update(bytes);
        }
    }
}

/// One exchange, and what the resume rules say to do with its answer.
fn attempt<'a>(
    ctx: &'a Arc<Context>,
    entry: &Entry,
    this: &mut Try<'_>,
    claim: &mut Claim<'a>,
    may_rename: bool,
    record: &mut Record,
) -> Result<(), Failure> {
    let (url, deadline) = (this.url, this.deadline);
    let ask = match claim.plan() {
        Plan::Resume { offset, validator } => Ask::From { offset, validator },
        Plan::Segments { done, .. } => return resume_split(ctx, entry, this, claim, &done, record),
        Plan::Fresh { why } => {
            if let (Some(why), 1) = (why, record.attempts) {
                ctx.reporter
                    .note(&format!("{}: starting over: {why}", Shown(url)));
            }
            Ask::Whole
        }
        Plan::Skip => match &claim.if_newer {
            Some(since) => Ask::IfNewer {
                since: since.clone(),
            },
            None => Ask::Whole,
        },
    };
    let (rsp, _final_url) = exchange::get(ctx, url, &ask, deadline)?;
    let status = rsp.status().as_u16();
    record.http_status = Some(status);
    let answer = answer(&rsp);
    match resume::decide(&ask, claim.state.as_ref(), &answer) {
        d @ (Decision::NotSuccess
        | Decision::Refuse(_)
        | Decision::Unchanged
        | Decision::StartOver(_)
        | Decision::Segment) => Err(failure(d, &rsp)),
        Decision::Complete => {
            let file = claim.dir.open(&claim.part)?;
            let hashing = match &entry.checksum {
                Some(c) => Hashing(Some(hash_file(claim.dir, &claim.part, c.algo)?)),
                None => Hashing(None),
            };
            finish(entry, claim, file, hashing, record)
        }
        Decision::Append { offset, length, .. } => {
            let mut file = claim.dir.append(&claim.part)?;
            writing(&file, claim)?;
            let on_disk = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
            if on_disk != offset {
                return Err(Failure::StartOver(format!(
                    "the partial file is {on_disk} bytes, not the {offset} asked from"
                )));
            }
            let hashing = match &entry.checksum {
                Some(c) => Hashing(Some(hash_file(claim.dir, &claim.part, c.algo)?)),
                None => Hashing(None),
            };
            let hashing = receive(ctx, claim, &mut file, rsp, Some(length), hashing, deadline)?;
            finish(entry, claim, file, hashing, record)
        }
        Decision::Whole { length } => {
            if may_rename {
                if let Some(offered) =
                    header(&rsp, "Content-Disposition").and_then(naming::from_content_disposition)
                {
                    rename_claim(ctx, claim, &offered, &entry.urls[0], entry.line)?;
                }
            }
            if answer.status == 200 && matches!(ask, Ask::From { .. }) {
                ctx.reporter.note(&format!(
                    "{}: the server's copy changed (it sent the whole file); starting over",
                    Shown(url)
                ));
            }
            let validators = (answer.etag, answer.last_modified, header(&rsp, "Date"));
            let mut state = State::new(&entry.urls[0], validators, length);
            let hashing = Hashing(entry.checksum.as_ref().map(|c| c.algo.hasher()));
            if length.is_some_and(|l| l <= SMALL_BODY) {
                return receive_small(ctx, entry, claim, rsp, state, hashing, record);
            }
            let split = split_length(ctx, claim, &rsp, &state, length);
            if split.is_some() {
                state.ranges = Some(Vec::new());
            }
            claim.not_busy()?;
            claim.part_may_exist = true;
            let mut file = files::create_part(claim.dir, &claim.part, &state)?;
            writing(&file, claim)?;
            claim.state = Some(state);
            remember_numbered(ctx, claim, &entry.urls[0])?;
            if let Some(total) = split {
                if let Err(e) = file.set_len(total) {
                    // (A length the filesystem cannot hold, say.) No `.part` is left whose
                    // length is not its state's.
                    claim.discard_part();
                    return Err(disk("writing", &claim.dir.path(&claim.part))(e));
                }
                let o = &ctx.options;
                let segments =
                    Segments::new(total, &[], o.split, o.min_split, STALLED, Instant::now());
                return run_split(ctx, entry, this, claim, file, (segments, Some(rsp)), record);
            }
            let hashing = receive(ctx, claim, &mut file, rsp, length, hashing, deadline)?;
            finish(entry, claim, file, hashing, record)
        }
    }
}

/// A new open file description of the file `file` is open on: its own offset, and none of
/// the locks `file` holds. Without `/proc`, a duplicate of `file` (which shares its lock).
fn reopen(file: &File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .or_else(|_| file.try_clone())
}

/// One try of a download: the URL asked (the list's or a mirror), the file's deadline, and
/// the `--per-host` slot held for it.
struct Try<'u> {
    url: &'u str,
    deadline: Option<(Instant, Duration)>,
    slot: Option<Slot>,
}

/// The length to split a new download of, when `--split` asks for connections and the
/// answer allows it: ranges in bytes, a length worth two segments, and a validator each
/// segment's `If-Range` can carry so that no segment comes from another version: a strong
/// ETag (kept in the state), or Last-Modified from a server that gave no ETag at all (RFC
/// 9110 §13.1.5). The state must also fit its extended attribute with all the ranges it may
/// come to record.
fn split_length(
    ctx: &Context,
    claim: &Claim<'_>,
    rsp: &ureq::http::Response<ureq::Body>,
    state: &State,
    length: Option<u64>,
) -> Option<u64> {
    let total = length?;
    let o = &ctx.options;
    if o.split < 2 || claim.no_split || total <= SMALL_BODY || total < o.min_split.saturating_mul(2)
    {
        return None;
    }
    let ranges = header(rsp, "Accept-Ranges")
        .is_some_and(|v| v.split(',').any(|u| u.trim().eq_ignore_ascii_case("bytes")));
    // Each range carries the validator a resume would send (`State::validator`), so a file
    // is split when its download could be continued; but not by the date of an answer whose
    // ETag was too long to keep: the ranges' answers, carrying it, could never be matched.
    let validator =
        state.validator().is_some() && (state.etag.is_some() || header(rsp, "ETag").is_none());
    let mut longest = state.clone();
    longest.ranges = Some(vec![[u64::MAX; 2]; split::RECORDED]);
    let fits = resume::encode(&longest).len() <= MAX_SPLIT_STATE;
    (ranges && validator && fits).then_some(total)
}

/// Continues a split download from the ranges its `.part` records as done.
fn resume_split(
    ctx: &Arc<Context>,
    entry: &Entry,
    this: &mut Try<'_>,
    claim: &mut Claim<'_>,
    done: &[Span],
    record: &mut Record,
) -> Result<(), Failure> {
    let file = claim.dir.open_rw(&claim.part)?;
    writing(&file, claim)?;
    let total = claim.state.as_ref().and_then(|s| s.length).unwrap_or(0);
    let o = &ctx.options;
    let segments = Segments::new(total, done, o.split, o.min_split, STALLED, Instant::now());
    run_split(ctx, entry, this, claim, file, (segments, None), record)
}

/// Runs a split download over `file` (the `.part`, at its full length) and finishes it.
fn run_split(
    ctx: &Arc<Context>,
    entry: &Entry,
    this: &mut Try<'_>,
    claim: &mut Claim<'_>,
    file: File,
    (segments, first): (Segments, Option<ureq::http::Response<ureq::Body>>),
    record: &mut Record,
) -> Result<(), Failure> {
    let part = claim.dir.path(&claim.part);
    let mut state = claim.state.clone().unwrap_or_default();
    let job = segmented::Job {
        url: this.url.to_string(),
        state: state.clone(),
        deadline: this.deadline,
        // The connections write through a description of their own: one still blocked in
        // a read after the download ended holds neither the file's lock nor its name.
        file: reopen(&file).map_err(disk("opening", &part))?,
        part,
        segments,
        first,
        // The first connection goes on with this try's --per-host slot, and keeps it
        // while it lingers.
        slot: this.slot.take(),
    };
    let result = {
        let mut save = |done: &[Span]| {
            // The bytes before the record that says they are there: after a crash, a
            // range recorded as done is on disk, not a hole. A sync can take seconds: it is
            // waited for off this coroutine's worker, through a description of its own (the
            // `.part`'s lock stays with this download's).
            let path = claim.dir.path(&claim.part);
            let syncing = reopen(&file).map_err(disk("writing", &path))?;
            corokit_common::blocking::sync_data(syncing, SYNC_LIMIT)
                .map_err(disk("writing", &path))?;
            state.ranges = Some(split::recorded(done));
            files::set_state(claim.dir, &file, &claim.part, &state).map_err(Failure::from)
        };
        segmented::run(ctx, job, &mut save)
    };
    claim.state = Some(state);
    result?;
    let hashing = match &entry.checksum {
        Some(c) => Hashing(Some(hash_file(claim.dir, &claim.part, c.algo)?)),
        None => Hashing(None),
    };
    finish(entry, claim, file, hashing, record)
}

/// Renames a claim to the name the server offered, and remembers it for later runs.
fn rename_claim<'a>(
    ctx: &'a Context,
    claim: &mut Claim<'a>,
    offered: &SafeName,
    url: &str,
    line: usize,
) -> Result<(), Failure> {
    if offered.name == claim.name {
        return Ok(());
    }
    let mut renamed = match ctx.claim(claim.dir, &offered.name, url, line) {
        Ok(c) => c,
        Err(NotClaimed::Failed(f)) => return Err(f),
        Err(NotClaimed::Duplicate { .. }) => {
            return Err(Failure::NameClash(format!(
                "{} is being saved by another line",
                Shown(&offered.name)
            )))
        }
    };
    if offered.changed {
        ctx.reporter.note(&format!(
            "line {line}: the server's file name was not safe; saving as {}",
            Shown(&renamed.name)
        ));
    }
    ctx.remember_name(renamed.dir, url, &renamed.name)?;
    // Remembered already: the number is part of the name the server gave.
    renamed.numbered = false;
    *claim = renamed;
    Ok(())
}

/// A download given a numbered name keeps it in later runs, whatever the order of the list.
fn remember_numbered(ctx: &Context, claim: &mut Claim<'_>, url: &str) -> Result<(), Failure> {
    if claim.numbered {
        claim.numbered = false;
        ctx.remember_name(claim.dir, url, &claim.name)?;
    }
    Ok(())
}

fn receive_small(
    ctx: &Context,
    entry: &Entry,
    claim: &mut Claim<'_>,
    rsp: ureq::http::Response<ureq::Body>,
    mut state: State,
    mut hashing: Hashing,
    record: &mut Record,
) -> Result<(), Failure> {
    state.complete = true;
    // The length is at most SMALL_BODY here: one allocation, no regrowth.
    let mut body = Vec::with_capacity(state.length.unwrap_or(0) as usize + 1);
    rsp.into_body()
        .into_reader()
        .take(SMALL_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| Failure::from_io(e, ctx.options.file_timeout))?;
    ctx.received(body.len());
    if state.length != Some(body.len() as u64) {
        return Err(Failure::Incomplete(format!(
            "got {} of {} bytes before the connection ended",
            body.len(),
            state.length.unwrap_or(0)
        )));
    }
    hashing.update(&body);
    if let Some(want) = &entry.checksum {
        record.checksum = Some(check_digest(hashing, want)?);
    }
    if files::link_new(claim.dir, &claim.name, &body, &state)? {
        claim.remove_stale_part(&entry.urls[0]);
    } else {
        claim.not_busy()?;
        claim.part_may_exist = true;
        let mut file = files::create_part(claim.dir, &claim.part, &state)?;
        writing(&file, claim)?;
        file.write_all(&body)
            .map_err(disk("writing", &claim.dir.path(&claim.part)))?;
        claim.dir.rename_file(&file, &claim.part, &claim.name)?;
    }
    claim.state = Some(state);
    remember_numbered(ctx, claim, &entry.urls[0])
}

/// A disk failure on `path`, for `map_err`.
/// Holds `file` (the `.part`) for writing: another fetch process writing it (a worker of a
/// shared queue on the same directory) holds it already, and then this download waits for
/// another time rather than write the same bytes twice. The lock goes with the descriptor.
fn writing(file: &File, claim: &Claim<'_>) -> Result<(), Failure> {
    use rustix::fs::{flock, FlockOperation};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Failure::Busy(
            claim.dir.path(&claim.part).display().to_string(),
        )),
        // A file system without locks: nothing to learn from it.
        Err(_) => Ok(()),
    }
}

/// Longest a split download waits for its `.part` to reach the disk before it records more
/// ranges done; past it, the disk counts as failing.
const SYNC_LIMIT: Duration = Duration::from_secs(600);

fn disk(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Failure {
    let path = path.to_path_buf();
    move |source| Failure::File(FileError::Io { what, path, source })
}

/// Streams the body into `file` (the `.part`, at its end): exactly `expect` bytes when the
/// answer said how many, else until the body ends. Reads and writes in large blocks.
fn receive(
    ctx: &Context,
    claim: &Claim<'_>,
    file: &mut File,
    rsp: ureq::http::Response<ureq::Body>,
    expect: Option<u64>,
    mut hashing: Hashing,
    deadline: Option<(Instant, Duration)>,
) -> Result<Hashing, Failure> {
    let part = claim.dir.path(&claim.part);
    let mut reader = rsp.into_body().into_reader();
    let small = expect.is_some_and(|e| e < BLOCK as u64);
    let mut buf = vec![0u8; if small { 64 * 1024 } else { BLOCK }];
    let mut got: u64 = 0;
    loop {
        let room = match expect {
            Some(e) => (e - got).min(buf.len() as u64) as usize,
            None => buf.len(),
        };
        if room == 0 {
            break;
        }
        // Fill the block before writing it: fewer, larger writes.
        let mut filled = 0;
        let mut ended = false;
        while filled < room {
            match reader.read(&mut buf[filled..room]) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Keep what arrived: the next try continues from it.
                    let _ = file.write_all(&buf[..filled]);
                    return Err(Failure::from_io(e, deadline.map(|(_, limit)| limit)));
                }
            }
        }
        file.write_all(&buf[..filled])
            .map_err(disk("writing", &part))?;
        hashing.update(&buf[..filled]);
        got += filled as u64;
        ctx.received(filled);
        if ctx.shutdown.is_requested() {
            return Err(Failure::Interrupted);
        }
        if let Some((until, limit)) = deadline {
            if Instant::now() > until {
                return Err(Failure::OutOfTime(format!(
                    "the whole file took over {limit:?} (--timeout)"
                )));
            }
        }
        if ended {
            break;
        }
    }
    file.flush().map_err(disk("writing", &part))?;
    if let Some(e) = expect {
        if got < e {
            return Err(Failure::Incomplete(format!(
                "got {got} of {e} bytes before the connection ended"
            )));
        }
    }
    Ok(hashing)
}

/// Checks length and checksum of `file` (the `.part` written), records the complete state
/// on it and renames it to the final name, so the file under that name always has its
/// complete state, and is the file whose bytes were checked.
fn finish(
    entry: &Entry,
    claim: &mut Claim<'_>,
    file: File,
    hashing: Hashing,
    record: &mut Record,
) -> Result<(), Failure> {
    let size = file
        .metadata()
        .map_err(disk("reading", &claim.dir.path(&claim.part)))?
        .len();
    let mut state = claim.state.clone().unwrap_or_default();
    state.ranges = None;
    if let Some(want) = state.length {
        if size != want {
            return Err(Failure::Incomplete(format!(
                "got {size} of {want} bytes before the connection ended"
            )));
        }
    }
    if let Some(want) = &entry.checksum {
        record.checksum = Some(check_digest(hashing, want)?);
    }
    state.complete = true;
    state.length = Some(size);
    files::set_state(claim.dir, &file, &claim.part, &state)?;
    claim.dir.rename_file(&file, &claim.part, &claim.name)?;
    claim.state = Some(state);
    Ok(())
}

/// Gives a downloaded file the server's Last-Modified as its modification time (`-R`, as
/// curl does); a date that does not parse leaves the time of the download.
fn remote_time(claim: &Claim<'_>) {
    let when = claim
        .state
        .as_ref()
        .and_then(|s| s.last_modified.as_deref())
        .and_then(|d| httpdate::parse_http_date(d).ok());
    if let Some(when) = when {
        let _ = claim.dir.set_modified(&claim.name, when);
    }
}

/// The checksum context of what `name` holds so far.
fn hash_file(dir: &Dir, name: &str, algo: Algo) -> Result<Hasher, Failure> {
    let mut file = dir.open(name)?;
    let mut ctx = algo.hasher();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(disk("reading", &dir.path(name)))?;
        if n == 0 {
            return Ok(ctx);
        }
        ctx.update(&buf[..n]);
    }
}

/// The file's checksum (`ALGO=HEX`) if it matches `want`, else a checksum failure.
fn verify(dir: &Dir, name: &str, want: &Checksum) -> Result<String, Failure> {
    check_digest(Hashing(Some(hash_file(dir, name, want.algo)?)), want)
}

/// The checksum (`ALGO=HEX`) if it is the one wanted, else a checksum failure.
fn check_digest(hashing: Hashing, want: &Checksum) -> Result<String, Failure> {
    let got = Checksum {
        algo: want.algo,
        digest: hashing.0.map(Hasher::finish).unwrap_or_default(),
    };
    if &got == want {
        Ok(got.shown())
    } else {
        Err(Failure::Checksum {
            want: want.shown(),
            got: got.shown(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        assert_eq!(retry_after("3"), Some(Duration::from_secs(3)));
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let d = retry_after(&soon).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn backoff_grows_and_honours_retry_after() {
        let base = Duration::from_millis(100);
        let net = Failure::Network("x".into());
        assert!(backoff(base, 1, &net) <= base);
        assert!(backoff(base, 4, &net) >= Duration::from_millis(400));
        let limited = Failure::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(2)),
        };
        assert!(backoff(base, 1, &limited) >= Duration::from_secs(2));
    }
}
