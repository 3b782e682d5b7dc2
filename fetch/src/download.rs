//! One entry of the list, from name to verified file: claiming a name, deciding how to
//! resume, the HTTP exchange with `Range`/`If-Range`, streaming to `.part`, retries with
//! backoff across mirrors, verification, and the final rename.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use corokit_common::{Slot, Slots, TokenBucket};
use ring::digest;

use crate::input::{Entry, Shown};
use crate::naming::{self, SafeName};
use crate::report::{Outcome, Record, Reporter};
use crate::resume::{self, Paths, Plan, Record as StateRecord, State};
use crate::Options;

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("HTTP {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Network(String),
    /// A redirect loop, or a chain longer than `--max-redirects`: another try would loop again.
    #[error("too many redirects")]
    Redirects,
    #[error("timed out ({0})")]
    Timeout(String),
    #[error("checksum mismatch: expected sha-256 {want}, got {got}")]
    Checksum { want: String, got: String },
    #[error("{0}")]
    Incomplete(String),
    #[error("{what} {path}: {source}")]
    Disk {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("name clash: {0}")]
    NameClash(String),
    #[error("stopped by a signal; the partial file is kept for the next run")]
    Interrupted,
}

impl Failure {
    /// Worth another try: the network, timeouts, 5xx, 408, 429, and bodies cut short.
    fn retryable(&self) -> bool {
        match self {
            Failure::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Failure::Network(_) | Failure::Timeout(_) | Failure::Incomplete(_) => true,
            _ => false,
        }
    }

    fn from_ureq(e: ureq::Error) -> Failure {
        match e {
            ureq::Error::Timeout(t) => Failure::Timeout(t.to_string()),
            ureq::Error::Io(e) => Failure::from_io(e),
            ureq::Error::TooManyRedirects => Failure::Redirects,
            ureq::Error::HostNotFound => Failure::Network("host not found".into()),
            other => Failure::Network(other.to_string()),
        }
    }

    fn from_io(e: io::Error) -> Failure {
        if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
            if let ureq::Error::Timeout(t) = inner {
                return Failure::Timeout(t.to_string());
            }
            return Failure::Network(inner.to_string());
        }
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Timeout("read".into()),
            io::ErrorKind::UnexpectedEof => {
                Failure::Incomplete("the connection closed before the whole body arrived".into())
            }
            _ => Failure::Network(e.to_string()),
        }
    }
}

/// Hosts whose `--per-host` slots are remembered before idle ones are forgotten.
const MAX_HOSTS: usize = 4096;

/// What every download shares.
pub struct Context {
    pub options: Options,
    pub agent: ureq::Agent,
    pub reporter: Reporter,
    pub shutdown: corokit_common::Shutdown,
    claims: Mutex<HashMap<PathBuf, String>>,
    hosts: Mutex<HashMap<String, Slots>>,
    rate: Option<RateLimit>,
}

impl Context {
    pub fn new(options: Options, reporter: Reporter, shutdown: corokit_common::Shutdown) -> Self {
        Context {
            agent: options.http.agent(),
            rate: options.limit_rate.map(RateLimit::new),
            options,
            reporter,
            shutdown,
            claims: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts `n` bytes received and, under `--limit-rate`, waits until they are due.
    fn received(&self, n: usize) {
        self.reporter.add_bytes(n as u64);
        if let Some(rate) = &self.rate {
            let wait = rate.take(n);
            if !wait.is_zero() {
                corokit_common::sleep(wait);
            }
        }
    }

    /// A slot for `host` under `--per-host`, freed when dropped.
    fn host_slot(&self, url: &str) -> Option<Slot> {
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
        Some(slots.take())
    }

    /// Claims a name in `dir` for `url`: the first of `name`, `name.1`, … that is free or
    /// already this URL's (from an earlier run). Files that belong to another URL, or that
    /// fetch did not write, are never touched.
    fn claim(&self, dir: &Path, name: &str, url: &str) -> Result<Claim<'_>, Failure> {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        for n in 0..10_000 {
            let candidate = if n == 0 {
                name.to_string()
            } else {
                naming::numbered(name, n)
            };
            let paths = Paths::new(dir, &candidate);
            if let Some(owner) = claims.get(&paths.done) {
                if owner == url {
                    return Err(Failure::NameClash(format!(
                        "the same URL is already being saved as {}",
                        paths.done.display()
                    )));
                }
                continue;
            }
            // With neither file present the name is free and no record could change the
            // plan (it would start over), so the state is only read when a file is there.
            let (ours, state) = if !paths.done.exists() && !paths.part.exists() {
                (true, None)
            } else {
                match paths.load() {
                    StateRecord::Valid(s) if s.belongs_to(url) => (true, Some(s)),
                    StateRecord::Valid(_) | StateRecord::None => (false, None),
                    // fetch's own file, torn by a crash: whatever it was, it starts over.
                    StateRecord::Unreadable => (true, None),
                }
            };
            if ours {
                claims.insert(paths.done.clone(), url.to_string());
                return Ok(Claim {
                    ctx: self,
                    name: candidate,
                    paths,
                    state,
                });
            }
        }
        Err(Failure::NameClash(format!(
            "no free name like {} in {}",
            Shown(name),
            dir.display()
        )))
    }
}

/// A name held for one download during this run.
struct Claim<'a> {
    ctx: &'a Context,
    name: String,
    paths: Paths,
    state: Option<State>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claims = self.ctx.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.remove(&self.paths.done);
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
pub fn fetch(ctx: &Context, entry: &Entry) -> Record {
    let started = Instant::now();
    let mut record = Record::new(entry.line, &entry.urls[0]);
    let result = run(ctx, entry, &mut record, started);
    record.elapsed = started.elapsed();
    match result {
        Ok(outcome) => record.outcome = outcome,
        Err(failure) => {
            record.outcome = if matches!(failure, Failure::Interrupted) {
                Outcome::Interrupted
            } else {
                Outcome::Failed
            };
            record.error = Some(failure.to_string());
        }
    }
    record
}

fn run(
    ctx: &Context,
    entry: &Entry,
    record: &mut Record,
    started: Instant,
) -> Result<Outcome, Failure> {
    let url = &entry.urls[0];
    let mut dir = ctx.options.output.clone();
    if let Some(sub) = &entry.dir {
        let (sub, changed) = naming::safe_subdir(sub);
        if changed {
            ctx.reporter.note(&format!(
                "line {}: dir={} made safe as {}",
                entry.line,
                Shown(entry.dir.as_deref().unwrap_or("")),
                Shown(&sub.to_string_lossy())
            ));
        }
        dir.push(sub);
        fs::create_dir_all(&dir).map_err(disk("creating", &dir))?;
    }
    let named = match &entry.out {
        Some(out) => naming::sanitize(out),
        None => naming::from_url(url),
    };
    if named.changed {
        ctx.reporter.note(&format!(
            "line {}: saving {} as {} (the name was not safe)",
            entry.line,
            Shown(url),
            Shown(&named.name)
        ));
    }
    let mut claim = ctx.claim(&dir, &named.name, url)?;
    record.path = Some(claim.paths.done.clone());
    // Only a complete record can skip; anything else is planned once, by the attempt.
    let complete = claim.state.as_ref().filter(|s| s.complete);
    if complete.is_some() && resume::plan(&claim.paths, complete) == Plan::Skip {
        // The plan checked the file's size against the recorded length.
        record.bytes = match complete.and_then(|s| s.length) {
            Some(length) => length,
            None => fs::metadata(&claim.paths.done).map_or(0, |m| m.len()),
        };
        if let Some(want) = entry.sha256 {
            record.sha256 = Some(verify(&claim.paths.done, &want)?);
        }
        return Ok(Outcome::Skipped);
    }
    // With --content-disposition the server may still rename a download nobody has started.
    let may_rename =
        ctx.options.content_disposition && entry.out.is_none() && claim.state.is_none();

    let mut dead = vec![false; entry.urls.len()];
    let mut mirror = 0;
    let mut retries_left = ctx.options.retries;
    loop {
        if ctx.shutdown.is_requested() {
            return Err(Failure::Interrupted);
        }
        record.attempts += 1;
        let attempt_url = &entry.urls[mirror];
        // Until a response has been written somewhere, the server may still name the file.
        let rename = may_rename && claim.state.is_none();
        let result = {
            let _slot = ctx.host_slot(attempt_url);
            attempt(ctx, entry, attempt_url, &mut claim, rename, record, started)
        };
        let failure = match result {
            Ok(()) => return Ok(Outcome::Ok),
            Err(f) => f,
        };
        if matches!(
            failure,
            Failure::Interrupted | Failure::Disk { .. } | Failure::Checksum { .. }
        ) {
            return Err(failure);
        }
        if !failure.retryable() {
            dead[mirror] = true;
        } else if retries_left == 0 {
            return Err(failure);
        } else {
            retries_left -= 1;
        }
        let Some(next) = (1..=entry.urls.len())
            .map(|i| (mirror + i) % entry.urls.len())
            .find(|&i| !dead[i])
        else {
            return Err(failure);
        };
        if let Some(limit) = ctx.options.file_timeout {
            if started.elapsed() >= limit {
                return Err(Failure::Timeout(format!(
                    "the whole file took over {limit:?}; last error: {failure}"
                )));
            }
        }
        ctx.reporter.note(&format!(
            "retrying {} after: {failure}",
            Shown(&entry.urls[mirror])
        ));
        if failure.retryable() {
            let wait = backoff(ctx.options.retry_wait, record.attempts, &failure);
            if ctx.shutdown.wait_timeout(wait) {
                return Err(Failure::Interrupted);
            }
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

/// One HTTP exchange: request (with a range when resuming), then stream and finish.
fn attempt<'a>(
    ctx: &'a Context,
    entry: &Entry,
    url: &str,
    claim: &mut Claim<'a>,
    may_rename: bool,
    record: &mut Record,
    started: Instant,
) -> Result<(), Failure> {
    let plan = resume::plan(&claim.paths, claim.state.as_ref());
    let mut req = ctx.agent.get(url).header("Accept-Encoding", "identity");
    for (name, value) in &ctx.options.headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let resuming = match &plan {
        Plan::Resume { offset, validator } => {
            req = req
                .header("Range", format!("bytes={offset}-"))
                .header("If-Range", validator.as_str());
            Some(*offset)
        }
        Plan::Fresh { why: Some(why) } if record.attempts == 1 => {
            ctx.reporter
                .note(&format!("{}: starting over: {why}", Shown(url)));
            None
        }
        _ => None,
    };
    if let Some(limit) = ctx.options.file_timeout {
        // A hard limit: a body that goes silent must not outlast it by a read timeout.
        let left = limit.saturating_sub(started.elapsed());
        req = req.config().timeout_global(Some(left)).build();
    }
    let rsp = req.call().map_err(Failure::from_ureq)?;
    let status = rsp.status().as_u16();
    record.http_status = Some(status);
    match status {
        206 if resuming.is_some() => {
            let offset = resuming.unwrap_or(0);
            let range_start = header(&rsp, "Content-Range")
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if range_start != Some(offset) {
                claim.state = None;
                return Err(Failure::Incomplete(format!(
                    "the server sent a range that does not start at byte {offset}"
                )));
            }
            let part = &claim.paths.part;
            let file = OpenOptions::new()
                .append(true)
                .open(part)
                .map_err(disk("opening", part))?;
            receive(ctx, entry, claim, file, rsp, record, started)
        }
        416 if resuming.is_some() => {
            let offset = resuming.unwrap_or(0);
            let total = header(&rsp, "Content-Range")
                .and_then(|v| v.strip_prefix("bytes */"))
                .and_then(|v| v.trim().parse::<u64>().ok());
            let want = claim.state.as_ref().and_then(|s| s.length);
            if want == Some(offset) && total.is_none_or(|t| t == offset) {
                // Everything had arrived before the last run stopped.
                finish(entry, claim, record)
            } else {
                claim.state = None;
                Err(Failure::Incomplete(
                    "the server cannot continue the partial file; starting over".into(),
                ))
            }
        }
        200..=299 => {
            if resuming.is_some() {
                ctx.reporter.note(&format!(
                    "{}: the server's copy changed since the partial download; starting over",
                    Shown(url)
                ));
            }
            if may_rename {
                if let Some(offered) =
                    header(&rsp, "Content-Disposition").and_then(naming::from_content_disposition)
                {
                    rename_claim(ctx, claim, &offered, url, entry.line)?;
                }
            }
            let state = State {
                url: entry.urls[0].clone(),
                etag: header(&rsp, "ETag").map(str::to_string),
                last_modified: header(&rsp, "Last-Modified").map(str::to_string),
                length: rsp.body().content_length(),
                complete: false,
                url_hash: None,
            };
            if state.length.is_some_and(|l| l <= SMALL_BODY) {
                return receive_small(ctx, entry, claim, rsp, state, record);
            }
            let part = &claim.paths.part;
            let file = File::create(part).map_err(disk("creating", part))?;
            claim
                .paths
                .save(&state)
                .map_err(disk("recording the state of", part))?;
            claim.state = Some(state);
            receive(ctx, entry, claim, file, rsp, record, started)
        }
        _ => Err(Failure::Status {
            status,
            retry_after: header(&rsp, "Retry-After").and_then(retry_after),
        }),
    }
}

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
    let dir = claim
        .paths
        .done
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let renamed = ctx.claim(&dir, &offered.name, url)?;
    if offered.changed {
        ctx.reporter.note(&format!(
            "line {line}: the server's file name was not safe; saving as {}",
            Shown(&renamed.name)
        ));
    }
    *claim = renamed;
    Ok(())
}

/// Bodies up to this size are received into memory and written in one go: one file created
/// and one rename, instead of a state file written before and after the body. A run killed
/// meanwhile has written nothing for them, and the next run simply starts them over.
const SMALL_BODY: u64 = 16 * 1024;

fn receive_small(
    ctx: &Context,
    entry: &Entry,
    claim: &mut Claim<'_>,
    rsp: ureq::http::Response<ureq::Body>,
    mut state: State,
    record: &mut Record,
) -> Result<(), Failure> {
    state.complete = true;
    // The length is at most SMALL_BODY here: one allocation, no regrowth.
    let mut body = Vec::with_capacity(state.length.unwrap_or(0) as usize + 1);
    rsp.into_body()
        .into_reader()
        .take(SMALL_BODY + 1)
        .read_to_end(&mut body)
        .map_err(Failure::from_io)?;
    ctx.received(body.len());
    if state.length != Some(body.len() as u64) {
        return Err(Failure::Incomplete(format!(
            "got {} of {} bytes before the connection ended",
            body.len(),
            state.length.unwrap_or(0)
        )));
    }
    if let Some(want) = &entry.sha256 {
        record.sha256 = Some(check_digest(
            digest::digest(&digest::SHA256, &body).as_ref(),
            want,
        )?);
    }
    claim
        .paths
        .write_complete(&body, &state)
        .map_err(disk("writing", &claim.paths.done))?;
    claim.state = Some(state);
    record.bytes = body.len() as u64;
    Ok(())
}

/// A disk failure on `path`, for `map_err`.
fn disk(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Failure {
    let path = path.to_path_buf();
    move |source| Failure::Disk { what, path, source }
}

/// Streams the body into `.part` (opened to write at its end), then finishes.
fn receive(
    ctx: &Context,
    entry: &Entry,
    claim: &mut Claim<'_>,
    mut file: File,
    rsp: ureq::http::Response<ureq::Body>,
    record: &mut Record,
    started: Instant,
) -> Result<(), Failure> {
    let part = &claim.paths.part;
    let mut reader = rsp.into_body().into_reader();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::from_io(e)),
        };
        file.write_all(&buf[..n]).map_err(disk("writing", part))?;
        ctx.received(n);
        if ctx.shutdown.is_requested() {
            return Err(Failure::Interrupted);
        }
        if let Some(limit) = ctx.options.file_timeout {
            if started.elapsed() > limit {
                return Err(Failure::Timeout(format!(
                    "the whole file took over {limit:?}"
                )));
            }
        }
    }
    file.flush().map_err(disk("writing", part))?;
    drop(file);
    finish(entry, claim, record)
}

/// Checks length and checksum, then renames `.part` to the final name and records it.
fn finish(entry: &Entry, claim: &mut Claim<'_>, record: &mut Record) -> Result<(), Failure> {
    let paths = claim.paths.clone();
    let size = fs::metadata(&paths.part)
        .map_err(disk("reading", &paths.part))?
        .len();
    let mut state = claim.state.clone().unwrap_or_default();
    if let Some(want) = state.length {
        if size != want {
            return Err(Failure::Incomplete(format!(
                "got {size} of {want} bytes before the connection ended"
            )));
        }
    }
    if let Some(want) = entry.sha256 {
        match verify(&paths.part, &want) {
            Ok(hex) => record.sha256 = Some(hex),
            Err(e) => {
                // A file that does not match must not be continued next time.
                let _ = fs::remove_file(&paths.part);
                claim.state = None;
                return Err(e);
            }
        }
    }
    fs::rename(&paths.part, &paths.done).map_err(disk("renaming", &paths.part))?;
    state.complete = true;
    state.length = Some(size);
    paths
        .save(&state)
        .map_err(disk("recording the state of", &paths.done))?;
    claim.state = Some(state);
    record.bytes = size;
    Ok(())
}

/// The file's SHA-256 in hex if it matches `want`, else a checksum failure.
fn verify(path: &Path, want: &[u8; 32]) -> Result<String, Failure> {
    let mut file = File::open(path).map_err(disk("reading", path))?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(disk("reading", path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    check_digest(ctx.finish().as_ref(), want)
}

/// The digest in hex if it is the one wanted, else a checksum failure.
fn check_digest(got: &[u8], want: &[u8; 32]) -> Result<String, Failure> {
    let (got, want) = (crate::hex(got), crate::hex(want));
    if got == want {
        Ok(got)
    } else {
        Err(Failure::Checksum { want, got })
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

    #[test]
    fn only_transient_failures_are_retried() {
        let status = |s| Failure::Status {
            status: s,
            retry_after: None,
        };
        for s in [408, 429, 500, 503] {
            assert!(status(s).retryable(), "{s}");
        }
        for s in [400, 403, 404, 410] {
            assert!(!status(s).retryable(), "{s}");
        }
    }
}
