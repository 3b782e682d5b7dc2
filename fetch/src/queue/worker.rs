//! A worker: takes entries from the queue's consumer group into the same download
//! coroutines a local list feeds, and acknowledges each one only with its result (see
//! [`super::RECORD`]) once its file is complete or has failed for good. An interrupted
//! download (Ctrl-C, SIGTERM) is not acknowledged: its entry stays pending and another
//! worker claims it once it has been idle for `claim_after`.
//!
//! Connections, each made again when Redis goes away: the reader (new entries, and
//! entries idle too long anywhere, with their file locks), the recorder (results, in
//! batches: [`record_all`]), two the downloads share for locks that were busy ([`Conns`]),
//! and the renewer (a sign of life for every entry and file lock held, every third of
//! `claim_after`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corokit_common::Shutdown;
use redis::Value;

use super::{Keys, QueueError, Redis, Target, BURY, GROUP, RECORD};
use crate::input::Entry;
use crate::report::{Outcome, Record, Reporter, Summary};
use crate::shown::Shown;
use crate::{context, Options, Pool, RunError};

/// How a worker shares the queue.
#[derive(Debug, Clone)]
pub struct WorkOptions {
    /// Wait for new entries instead of ending when the queue is drained.
    pub follow: bool,
    /// How long an entry may be held without a sign of life before another worker takes it.
    pub claim_after: Duration,
    /// Deliveries after which an entry goes to the dead letters instead.
    pub max_deliveries: u64,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Entries asked for at once, at most.
const READ: usize = 100;
/// The largest entry taken from the queue (a list line is at most 1 MiB; an entry of a few
/// URLs and options is far less).
const MAX_ENTRY: usize = 1 << 20;
/// How long one read waits for new entries: short when the worker ends once the queue is
/// drained, since the read that finds nothing is what tells it.
const BLOCK_MS: u64 = 1000;
const DRAIN_BLOCK_MS: u64 = 100;
/// Connections the downloads share for the file locks not taken with their batch.
const LOCKERS: usize = 2;

fn options_jobs(ctx: &crate::download::Context) -> usize {
    ctx.options.jobs.max(1)
}

/// A few connections used in turn.
struct Conns {
    conns: Vec<may::sync::Mutex<Redis>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Conns {
    fn with<T>(&self, f: impl FnOnce(&mut Redis) -> T) -> T {
        let k = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut redis = self.conns[k].lock().unwrap_or_else(|e| e.into_inner());
        f(&mut redis)
    }
}

/// Why a worker stopped early.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Runs a worker until the queue is drained (or, with `follow`, until `shutdown`).
pub fn work(
    options: Options,
    target: Target,
    keys: Keys,
    how: WorkOptions,
    shutdown: Shutdown,
) -> Result<Summary, WorkError> {
    let ctx = context(options, shutdown.clone())?;
    let note = {
        let ctx = ctx.clone();
        move || -> Box<dyn Fn(&str) + Send> {
            let ctx = ctx.clone();
            Box::new(move |text: &str| ctx.reporter.warn(text))
        }
    };
    // Every connection waits for a Redis that went away, and stops waiting on Ctrl-C.
    let connect = || -> Result<Redis, QueueError> {
        let mut r = Redis::connect(target.clone(), true, note())?;
        r.stop_with(shutdown.clone());
        Ok(r)
    };
    let mut reader = connect()?;
    keys.prepare(&mut reader)?;
    let lag = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(addr) = how.metrics {
        super::metrics::serve(addr, ctx.clone(), lag.clone())
            .map_err(|e| QueueError::Metrics(addr, e.to_string()))?;
    }
    // Downloads whose file lock was busy when their batch came wait for it over these.
    let conns = (0..LOCKERS.min(options_jobs(&ctx)))
        .map(|_| connect().map(may::sync::Mutex::new))
        .collect::<Result<Vec<_>, _>>()?;
    let recorder = Arc::new(Conns {
        conns,
        next: std::sync::atomic::AtomicUsize::new(0),
    });
    let renewer = connect()?;
    let me = consumer_name();
    let held: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let (records, to_record) = may::sync::mpsc::channel();
    let recording = {
        let (keys, held, me) = (keys.clone(), held.clone(), me.clone());
        let mut redis = connect()?;
        corokit_common::spawn(move || record_all(&mut redis, &keys, &me, &held, to_record))
            .map_err(RunError::from)?
    };
    let hooks = Arc::new(QueueHooks {
        keys: keys.clone(),
        held: held.clone(),
        redis: recorder.clone(),
        me: me.clone(),
        busy: Arc::default(),
        locked: Mutex::default(),
        records: Mutex::new(Some(records)),
        claim_after: how.claim_after,
        shutdown: shutdown.clone(),
    });
    let pool = Pool::start(&ctx, hooks.clone())?;

    let stop_renewing = Arc::new(AtomicBool::new(false));
    let renewing = {
        let (keys, held, me, stop, busy) = (
            keys.clone(),
            held.clone(),
            me.clone(),
            stop_renewing.clone(),
            hooks.busy.clone(),
        );
        let every = how.claim_after / 3;
        let mut redis = renewer;
        corokit_common::spawn(move || {
            let mut next = Instant::now() + every;
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() < next {
                    corokit_common::sleep(Duration::from_millis(100).min(every));
                    continue;
                }
                next = Instant::now() + every;
                let ids: Vec<String> = lock(&held).iter().cloned().collect();
                for chunk in ids.chunks(READ) {
                    let mut cmd = redis::cmd("EVAL");
                    cmd.arg(RENEW_ENTRIES).arg(1).arg(&keys.jobs).arg(&me);
                    for id in chunk {
                        cmd.arg(id);
                    }
                    // Entries another worker took meanwhile are its own now: not renewed, and
                    // no longer ours to wait for (their file is guarded by its lock).
                    if let Ok(lost) = redis.get::<Vec<String>>(&cmd) {
                        let mut held = lock(&held);
                        for id in lost {
                            held.remove(&id);
                        }
                    }
                }
                let locks: Vec<String> = lock(&busy).iter().cloned().collect();
                // All in one round trip per hundred: a slow link must not let a live
                // worker's locks expire while it renews them one by one.
                for chunk in locks.chunks(READ) {
                    let mut cmd = redis::cmd("EVAL");
                    cmd.arg(RENEW).arg(chunk.len());
                    for key in chunk {
                        cmd.arg(key);
                    }
                    let _ = redis.call(cmd.arg(&me).arg(ttl(every * 3)));
                }
            }
        })
        .map_err(RunError::from)?
    };

    let mut redis = reader;
    let mut last_reap = Instant::now() - how.claim_after;
    let mut last_lag = Instant::now() - Duration::from_secs(1);
    let result = (|| -> Result<(), QueueError> {
        while !shutdown.is_requested() {
            if how.metrics.is_some() && last_lag.elapsed() >= Duration::from_secs(1) {
                last_lag = Instant::now();
                lag.store(super::status::lag(&mut redis, &keys)?, Ordering::Relaxed);
            }
            let places = pool.places(READ);
            let reply = redis.call(
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&me)
                    .arg("COUNT")
                    .arg(places)
                    .arg("BLOCK")
                    .arg(if how.follow { BLOCK_MS } else { DRAIN_BLOCK_MS })
                    .arg("STREAMS")
                    .arg(&keys.jobs)
                    .arg(">"),
            )?;
            let entries = read_entries(reply);
            pool.unused(places - entries.len());
            let got = !entries.is_empty();
            let mut ready = Vec::with_capacity(entries.len());
            for (id, fields) in entries {
                ready.extend(take(
                    &mut redis,
                    &keys,
                    &me,
                    &pool,
                    id,
                    fields,
                    &ctx.reporter,
                )?);
            }
            hooks.lock_all(&mut redis, &ready)?;
            for e in ready {
                lock(&held).extend(e.queue_id.clone());
                pool.put(e);
            }
            if got && last_reap.elapsed() < how.claim_after / 2 {
                continue;
            }
            last_reap = Instant::now();
            let pending = reap(&mut redis, &keys, &me, &how, &pool, &held, &ctx.reporter)?;
            if !got && !how.follow && pending == 0 && lock(&held).is_empty() {
                return Ok(());
            }
        }
        Ok(())
    })();
    pool.finish();
    // Every result is recorded before the worker goes.
    drop(lock(&hooks.records).take());
    let _ = recording.join();
    stop_renewing.store(true, Ordering::Relaxed);
    let _ = renewing.join();
    result?;
    // A worker that ends with nothing pending leaves no consumer behind.
    let mine: Value = redis.call(
        redis::cmd("XPENDING")
            .arg(&keys.jobs)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(1)
            .arg(&me),
    )?;
    if matches!(&mine, Value::Array(a) if a.is_empty()) {
        let _ = redis.call(
            redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&keys.jobs)
                .arg(GROUP)
                .arg(&me),
        );
    }
    Ok(ctx.reporter.finish())
}

/// What a worker does around each download: a lock in Redis on the file it writes (its
/// directory, `out=` and URL), so two workers sharing a directory never write one file at
/// once (the same URL twice in a list, or an entry claimed from a worker cut off from
/// Redis); and the result recorded with the acknowledgement.
struct QueueHooks {
    keys: Keys,
    held: Arc<Mutex<BTreeSet<String>>>,
    redis: Arc<Conns>,
    me: String,
    /// The file locks held, renewed with the entries.
    busy: Arc<Mutex<BTreeSet<String>>>,
    /// Locks taken with their entries' batch: entry id → lock key.
    locked: Mutex<std::collections::HashMap<String, String>>,
    /// Results for the recorder, which acknowledges them in batches ([`record_all`]).
    records: Mutex<Option<may::sync::mpsc::Sender<Done>>>,
    claim_after: Duration,
    shutdown: Shutdown,
}

/// One result to record.
struct Done {
    id: String,
    json: String,
    counter: &'static str,
    /// The file lock to give back with it ("" for none).
    lock_key: String,
}

/// Records results as they come, each batch in one round trip, and lets their entries go
/// (no more renewals) once Redis has them. Ends when every sender has gone.
fn record_all(
    redis: &mut Redis,
    keys: &Keys,
    me: &str,
    held: &Mutex<BTreeSet<String>>,
    results: may::sync::mpsc::Receiver<Done>,
) {
    while let Ok(first) = results.recv() {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match results.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let cmds: Vec<redis::Cmd> = batch
            .iter()
            .map(|d| {
                redis::cmd("EVAL")
                    .arg(RECORD)
                    .arg(4)
                    .arg(&keys.jobs)
                    .arg(&keys.results)
                    .arg(&keys.counts)
                    .arg(&d.lock_key)
                    .arg(&d.id)
                    .arg(&d.json)
                    .arg(d.counter)
                    .arg(me)
                    .clone()
            })
            .collect();
        // Patient: this returns once Redis has them, and RECORD may be repeated.
        let _ = redis.pipeline(&cmds);
        let mut held = lock(held);
        for d in &batch {
            held.remove(&d.id);
        }
    }
}

/// A file's lock key: its directory, `out=` and URL.
fn file_key(keys: &Keys, entry: &Entry) -> String {
    let what = format!(
        "{}\0{}\0{}",
        entry.dir.as_deref().unwrap_or(""),
        entry.out.as_deref().unwrap_or(""),
        entry.urls.first().map(String::as_str).unwrap_or("")
    );
    let hash = ring::digest::digest(&ring::digest::SHA256, what.as_bytes());
    format!(
        "fetch:{{{}}}:file:{}",
        keys.name,
        crate::hex(&hash.as_ref()[..16])
    )
}

/// Takes every free lock of KEYS for ARGV owner, ms: 1 or 0 for each.
const TAKE_ALL: &str = r#"
local out = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v == false or v == ARGV[1] then
    redis.call('SET', k, ARGV[1], 'PX', ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

impl QueueHooks {
    /// Takes the file locks of a batch of entries in one round trip; an entry whose lock is
    /// busy takes it in [`crate::Hooks::begin`].
    fn lock_all(&self, redis: &mut Redis, entries: &[Entry]) -> Result<(), QueueError> {
        if entries.is_empty() {
            return Ok(());
        }
        let file_keys: Vec<String> = entries.iter().map(|e| file_key(&self.keys, e)).collect();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(TAKE_ALL).arg(file_keys.len());
        for k in &file_keys {
            cmd.arg(k);
        }
        let taken: Vec<i64> = redis.get(cmd.arg(&self.me).arg(ttl(self.claim_after)))?;
        let mut locked = lock(&self.locked);
        let mut busy = lock(&self.busy);
        for ((e, k), t) in entries.iter().zip(file_keys).zip(taken) {
            if let (1, Some(id)) = (t, &e.queue_id) {
                busy.insert(k.clone());
                locked.insert(id.clone(), k);
            }
        }
        Ok(())
    }

    fn file_lock(&self, key: String) -> Box<dyn std::any::Any + Send> {
        lock(&self.busy).insert(key.clone());
        Box::new(FileLock {
            key,
            redis: self.redis.clone(),
            me: self.me.clone(),
            busy: self.busy.clone(),
            given: false,
        })
    }
}

/// Renews the entries ARGV[2..] for consumer ARGV[1] if it still holds them: KEYS jobs.
/// The ids it no longer holds (another worker claimed them).
const RENEW_ENTRIES: &str = r#"
local lost = {}
for i = 2, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], 'fetch', ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[1] then
    redis.call('XCLAIM', KEYS[1], 'fetch', ARGV[1], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"#;

/// Takes a file lock if it is free or ours: KEYS lock; ARGV owner, ms. 1 when held.
const TAKE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;
/// Renews the file locks of KEYS that are still ours: ARGV owner, ms.
const RENEW: &str = r#"
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('PEXPIRE', k, ARGV[2]) end
end
return 0
"#;
/// Gives a file lock back if it is ours: KEYS lock; ARGV owner.
const GIVE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

fn ttl(d: Duration) -> u64 {
    d.as_millis().max(1000) as u64
}

/// A file lock held for one download; given back with its result, or when dropped.
struct FileLock {
    key: String,
    redis: Arc<Conns>,
    me: String,
    busy: Arc<Mutex<BTreeSet<String>>>,
    given: bool,
}

impl Drop for FileLock {
    fn drop(&mut self) {
        lock(&self.busy).remove(&self.key);
        if !self.given {
            let _ = self.redis.with(|r| {
                r.call(
                    redis::cmd("EVAL")
                        .arg(GIVE)
                        .arg(1)
                        .arg(&self.key)
                        .arg(&self.me),
                )
            });
        }
    }
}

impl crate::Hooks for QueueHooks {
    fn begin(&self, entry: &Entry) -> Option<Box<dyn std::any::Any + Send>> {
        if let Some(key) = entry
            .queue_id
            .as_ref()
            .and_then(|id| lock(&self.locked).remove(id))
        {
            return Some(self.file_lock(key));
        }
        let key = file_key(&self.keys, entry);
        // Waits while another worker writes this file; then this download finds it whole
        // (or continues what that worker left).
        while !self.shutdown.is_requested() {
            let taken = self.redis.with(|r| {
                r.get::<i64>(
                    redis::cmd("EVAL")
                        .arg(TAKE)
                        .arg(1)
                        .arg(&key)
                        .arg(&self.me)
                        .arg(ttl(self.claim_after)),
                )
            });
            match taken {
                Ok(1) => return Some(self.file_lock(key)),
                Ok(_) => corokit_common::sleep(Duration::from_millis(200)),
                // Redis refused the script: go on without the lock rather than never.
                Err(_) => return None,
            }
        }
        None
    }

    fn done(&self, entry: &Entry, record: &Record, begun: Option<Box<dyn std::any::Any + Send>>) {
        let mut file_lock = begun.and_then(|b| b.downcast::<FileLock>().ok());
        let Some(id) = &entry.queue_id else { return };
        if matches!(record.outcome, Outcome::Interrupted | Outcome::Deferred) {
            // Not acknowledged: it stays pending, no longer renewed, for a worker to take over
            // (one whose disk works, or once the other writer is done).
            lock(&self.held).remove(id);
            return;
        }
        let done = Done {
            id: id.clone(),
            json: serde_json::to_string(record).unwrap_or_default(),
            counter: match record.outcome {
                Outcome::Failed => "failed",
                _ => "ok",
            },
            // A key in the queue's slot even without a lock (Redis Cluster wants every key
            // of a script in one slot).
            lock_key: file_lock.as_ref().map_or_else(
                || format!("fetch:{{{}}}:file:-", self.keys.name),
                |l| l.key.clone(),
            ),
        };
        if let Some(records) = lock(&self.records).as_ref() {
            if records.send(done).is_ok() {
                if let Some(l) = file_lock.as_mut() {
                    l.given = true;
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process's consumer name: host, process id and a random part, so two workers never
/// share one (a restarted worker's entries are claimed like any dead worker's).
fn consumer_name() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{}-{}-{:04x}", host, std::process::id(), fastrand::u16(..))
}

/// One stream entry: its id and fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// The entries of an XREADGROUP reply on one stream: `[[stream, [entries]]]`, nil when none.
fn read_entries(reply: Value) -> Vec<StreamEntry> {
    let Value::Array(streams) = reply else {
        return Vec::new();
    };
    streams
        .into_iter()
        .flat_map(|s| match s {
            Value::Array(mut p) if p.len() == 2 => match p.pop() {
                Some(v) => claimed_entries(v),
                None => Vec::new(),
            },
            _ => Vec::new(),
        })
        .collect()
}

/// The entries of an XCLAIM reply: `[entries]`.
fn claimed_entries(reply: Value) -> Vec<StreamEntry> {
    match reply {
        Value::Array(entries) => entries.into_iter().filter_map(entry).collect(),
        _ => Vec::new(),
    }
}

fn entry(v: Value) -> Option<StreamEntry> {
    let Value::Array(mut p) = v else { return None };
    if p.len() != 2 {
        return None;
    }
    let fields = p.pop()?;
    let Value::BulkString(id) = p.pop()? else {
        return None;
    };
    let id = String::from_utf8(id).ok()?;
    let mut out = Vec::new();
    // A deleted entry still pending comes back with no fields (nil).
    if let Value::Array(f) = fields {
        let mut it = f.into_iter();
        while let (Some(Value::BulkString(k)), Some(Value::BulkString(v))) = (it.next(), it.next())
        {
            out.push((String::from_utf8_lossy(&k).into_owned(), v));
        }
    }
    Some((id, out))
}

/// Hands one delivered entry to the pool (its place already taken), or buries it when it
/// cannot be read.
fn take(
    redis: &mut Redis,
    keys: &Keys,
    me: &str,
    pool: &Pool,
    id: String,
    fields: Vec<(String, Vec<u8>)>,
    reporter: &Reporter,
) -> Result<Option<Entry>, QueueError> {
    let parsed = fields
        .iter()
        .find(|(k, _)| k == "entry")
        .ok_or_else(|| "it has no entry field (deleted, or not fetch's)".to_string())
        .and_then(|(_, v)| match v.len() {
            n if n > MAX_ENTRY => Err(format!("its entry is {n} bytes, more than {MAX_ENTRY}")),
            _ => serde_json::from_slice::<Entry>(v)
                .map_err(|e| format!("its entry is not fetch's: {e}")),
        })
        // What a list line could not hold is not taken from the queue either: every mirror
        // an http(s) URL, a dir= of a few levels.
        .and_then(|e| {
            let urls_ok =
                !e.urls.is_empty() && e.urls.iter().all(|u| crate::input::check_url(u).is_ok());
            let dir_ok = e
                .dir
                .as_deref()
                .is_none_or(|d| d.len() <= 4096 && d.split('/').count() <= 32);
            match (urls_ok, dir_ok) {
                (true, true) => Ok(e),
                (false, _) => Err("its entry has a URL fetch does not take".to_string()),
                (_, false) => Err("its entry's dir= is too long or too deep".to_string()),
            }
        });
    match parsed {
        Ok(mut e) => {
            e.queue_id = Some(id);
            Ok(Some(e))
        }
        Err(why) => {
            pool.unused(1);
            bury(redis, keys, (me, reporter), &id, 0, &why)?;
            Ok(None)
        }
    }
}

/// Moves entry `id` to the dead letters with `why`, and says so, unless another worker took
/// it meanwhile.
fn bury(
    redis: &mut Redis,
    keys: &Keys,
    (me, reporter): (&str, &Reporter),
    id: &str,
    min_idle: u128,
    why: &str,
) -> Result<(), QueueError> {
    let buried = redis.call(
        redis::cmd("EVAL")
            .arg(BURY)
            .arg(4)
            .arg(&keys.jobs)
            .arg(&keys.dead)
            .arg(&keys.results)
            .arg(&keys.counts)
            .arg(id)
            .arg(me)
            .arg(min_idle as u64)
            .arg(why),
    )?;
    if buried == Value::Int(1) {
        reporter.warn(&format!(
            "queue entry {} moved to {}: {why}",
            Shown(id),
            keys.dead
        ));
    }
    Ok(())
}

/// Takes over entries held by others (or lost to us with a reply) without a sign of life for
/// `claim_after`, burying those delivered too often; returns how many entries are pending
/// in the group in all.
fn reap(
    redis: &mut Redis,
    keys: &Keys,
    me: &str,
    how: &WorkOptions,
    pool: &Pool,
    held: &Mutex<BTreeSet<String>>,
    reporter: &Reporter,
) -> Result<u64, QueueError> {
    let idle = how.claim_after.as_millis() as u64;
    let stale = redis.call(
        redis::cmd("XPENDING")
            .arg(&keys.jobs)
            .arg(GROUP)
            .arg("IDLE")
            .arg(idle)
            .arg("-")
            .arg("+")
            .arg(READ),
    )?;
    let Value::Array(rows) = stale else {
        return Err(QueueError::Reply("XPENDING".into()));
    };
    for row in rows {
        let Value::Array(f) = row else { continue };
        let (Some(Value::BulkString(id)), Some(Value::Int(deliveries))) = (f.first(), f.get(3))
        else {
            continue;
        };
        let id = String::from_utf8_lossy(id).into_owned();
        if lock(held).contains(&id) {
            continue;
        }
        if *deliveries as u64 >= how.max_deliveries {
            let why = format!(
                "delivered {deliveries} times and never finished (its workers died or lost Redis with it)"
            );
            bury(redis, keys, (me, reporter), &id, idle as u128, &why)?;
            continue;
        }
        pool.places(1);
        let claimed = redis.call(
            redis::cmd("XCLAIM")
                .arg(&keys.jobs)
                .arg(GROUP)
                .arg(me)
                .arg(idle)
                .arg(&id),
        )?;
        let mut entries = claimed_entries(claimed);
        match entries.pop() {
            Some((id, fields)) => {
                if let Some(e) = take(redis, keys, me, pool, id, fields, reporter)? {
                    lock(held).extend(e.queue_id.clone());
                    pool.put(e);
                }
            }
            None => pool.unused(1),
        }
    }
    let summary = redis.call(redis::cmd("XPENDING").arg(&keys.jobs).arg(GROUP))?;
    match summary {
        Value::Array(s) => match s.first() {
            Some(Value::Int(n)) => Ok(*n as u64),
            _ => Err(QueueError::Reply("XPENDING summary".into())),
        },
        _ => Err(QueueError::Reply("XPENDING summary".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn stream_replies_are_read_in_each_shape() {
        let e = |id: &str| {
            Value::Array(vec![
                bulk(id),
                Value::Array(vec![bulk("entry"), bulk("{}")]),
            ])
        };
        // XREADGROUP
        let read = Value::Array(vec![Value::Array(vec![
            bulk("fetch:{q}:jobs"),
            Value::Array(vec![e("1-0"), e("2-0")]),
        ])]);
        let got = read_entries(read);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, "2-0");
        assert_eq!(got[0].1, vec![("entry".to_string(), b"{}".to_vec())]);
        // XCLAIM: the entries themselves; a deleted one with nil fields.
        let claim = Value::Array(vec![e("3-1"), Value::Array(vec![bulk("4-0"), Value::Nil])]);
        let got = claimed_entries(claim);
        assert_eq!(got.len(), 2);
        assert!(got[1].1.is_empty());
        // Nothing new.
        assert!(read_entries(Value::Nil).is_empty());
    }
}
