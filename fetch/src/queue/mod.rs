//! The shared queue: any number of `fetch` processes on any number of machines take entries
//! from one Redis stream with a consumer group, so nothing is lost when a worker dies.
//!
//! Keys, for a queue NAME (the braces keep them in one Redis Cluster slot):
//! - `fetch:{NAME}:jobs`, a stream of entries (`entry`: the entry as JSON), read by the
//!   consumer group `fetch`. An entry is acknowledged only by [`RECORD`], which also stores
//!   its result, once; so a result is recorded once however many workers finish it.
//! - `fetch:{NAME}:results`, a hash: stream id → the entry's report line (JSON).
//! - `fetch:{NAME}:counts`, a hash: `ok`, `failed`, `dead`.
//! - `fetch:{NAME}:dead`, a stream of entries delivered too often (a poison entry, or one that
//!   kills its workers), or that cannot be read, with the reason.
//! - `fetch:{NAME}:enqueued`, a hash: list → entries of it already added, so an enqueue that
//!   was cut short goes on where it stopped.
//!
//! A worker claims entries other workers have held longer than `--claim-after` without a
//! sign of life; a live worker renews the entries it holds (XCLAIM … JUSTID) every third of
//! that time, however long their downloads take.

pub mod conn;
pub mod enqueue;
pub mod metrics;
pub mod status;
pub mod worker;

pub use conn::{Redis, Target};

/// Why a queue command could not run, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("--redis {0}")]
    Url(String),
    #[error("--queue {0:?}: use 1 to 100 letters, digits, '.', '_' or '-'")]
    Name(String),
    #[error("cannot reach Redis at {0}: {1}")]
    Unreachable(String, String),
    #[error("Redis at {0} refused us: {1}")]
    Refused(String, String),
    #[error("lost Redis at {0}: {1}")]
    Lost(String, String),
    #[error("Redis answered with an error: {0}")]
    Server(String),
    #[error("Redis answered something unexpected: {0}")]
    Reply(String),
    #[error("stopped while waiting for Redis")]
    Stopped,
    #[error("the list is not the one whose first {0} entries were added to this queue before (it changed since); add it to another queue")]
    ListChanged(u64),
    #[error("--metrics {0}: {1}")]
    Metrics(std::net::SocketAddr, String),
    #[error("{key} exists in Redis as a {found}, not as fetch's {want}: another program's data, or another queue name")]
    Shape {
        key: String,
        found: String,
        want: &'static str,
    },
}

/// The consumer group every worker reads in.
pub const GROUP: &str = "fetch";

/// The keys of one queue.
#[derive(Debug, Clone)]
pub struct Keys {
    pub name: String,
    pub jobs: String,
    pub results: String,
    pub counts: String,
    pub dead: String,
    pub enqueued: String,
}

impl Keys {
    pub fn new(name: &str) -> Result<Keys, QueueError> {
        let ok = (1..=100).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(QueueError::Name(corokit_common::text::escape(name)));
        }
        let key = |what: &str| format!("fetch:{{{name}}}:{what}");
        Ok(Keys {
            name: name.to_string(),
            jobs: key("jobs"),
            results: key("results"),
            counts: key("counts"),
            dead: key("dead"),
            enqueued: key("enqueued"),
        })
    }

    /// Checks that each key is missing or of fetch's type, and that the group exists.
    pub fn prepare(&self, redis: &mut Redis) -> Result<(), QueueError> {
        self.check(redis)?;
        match redis.call(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&self.jobs)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM"),
        ) {
            Ok(_) => Ok(()),
            Err(QueueError::Server(e)) if e.contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Checks that each key is missing or of fetch's type, writing nothing; whether the
    /// queue exists.
    pub fn check(&self, redis: &mut Redis) -> Result<bool, QueueError> {
        let mut exists = false;
        for (key, want) in [
            (&self.jobs, "stream"),
            (&self.dead, "stream"),
            (&self.results, "hash"),
            (&self.counts, "hash"),
            (&self.enqueued, "hash"),
        ] {
            let found: String = redis.get(redis::cmd("TYPE").arg(key))?;
            if found != "none" && found != want {
                return Err(QueueError::Shape {
                    key: key.clone(),
                    found,
                    want,
                });
            }
            exists |= key == &self.jobs && found != "none";
        }
        Ok(exists)
    }
}

/// Acknowledges an entry and records its result, only if it was not acknowledged before,
/// and gives back the worker's lock on its file: KEYS jobs, results, counts, file lock; ARGV
/// id, result JSON, counter (`ok` or `failed`), lock owner. 1 when this call recorded it.
pub const RECORD: &str = r#"
if redis.call('GET', KEYS[4]) == ARGV[4] then redis.call('DEL', KEYS[4]) end
if redis.call('XACK', KEYS[1], 'fetch', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
  return 1
end
return 0
"#;

/// Moves an entry to the dead letters if it is still pending and was idle at least
/// ARGV[3] ms (so a worker that renewed it keeps it): KEYS jobs, dead, results, counts;
/// ARGV id, consumer, min idle, reason. 1 when moved.
pub const BURY: &str = r#"
local claimed = redis.call('XCLAIM', KEYS[1], 'fetch', ARGV[2], ARGV[3], ARGV[1], 'JUSTID')
if #claimed == 0 then return 0 end
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
local entry = ''
if #found == 1 then
  local f = found[1][2]
  for i = 1, #f, 2 do if f[i] == 'entry' then entry = f[i + 1] end end
end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'entry', entry, 'reason', ARGV[4])
redis.call('XACK', KEYS[1], 'fetch', ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode({outcome = 'dead', error = ARGV[4]}))
redis.call('HINCRBY', KEYS[4], 'dead', 1)
return 1
"#;

/// What a queue command does.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Add the entries of a list (`-` for standard input).
    Enqueue(String),
    Status,
    Work(worker::WorkOptions),
}

/// Runs a queue command; the exit status (0, 1 when a download failed, 2 for a usage
/// error, Redis unusable or bad lines in an enqueued list, 130 when stopped).
pub fn main(
    mode: Mode,
    url: &str,
    queue: &str,
    options: crate::Options,
    shutdown: corokit_common::Shutdown,
) -> u8 {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("fetch: {}", corokit_common::text::escape(&e.to_string()));
        2
    };
    let (target, keys) = match (Target::parse(url), Keys::new(queue)) {
        (Ok(t), Ok(k)) => (t, k),
        (Err(e), _) | (_, Err(e)) => return fail(&e),
    };
    let quiet = |_: &str| {};
    match mode {
        Mode::Work(how) => match worker::work(options, target, keys, how, shutdown.clone()) {
            _ if shutdown.is_requested() => 130,
            Err(e) => fail(&e),
            Ok(s) if s.failed > 0 => 1,
            Ok(_) => 0,
        },
        Mode::Status => {
            let run = Redis::connect(target, false, Box::new(quiet)).and_then(|mut r| {
                let st = status::status(&mut r, &keys)?;
                Ok(st.lines(&keys.name, &r.target().shown))
            });
            match run {
                Ok(lines) => {
                    for l in lines {
                        println!("{l}");
                    }
                    0
                }
                Err(e) => fail(&e),
            }
        }
        Mode::Enqueue(list) => {
            let (lines, id) = if list == "-" {
                (corokit_common::stdin::lines(), None)
            } else {
                match std::fs::File::open(&list) {
                    Ok(f) => {
                        let id = std::fs::canonicalize(&list)
                            .map(|p| p.to_string_lossy().into_owned())
                            .unwrap_or(list.clone());
                        (corokit_common::stdin::read_lines(f), Some(id))
                    }
                    Err(e) => return fail(&format!("cannot read the list {list}: {e}")),
                }
            };
            let bad = |b: &crate::input::BadLine| {
                eprintln!("fetch: {}", corokit_common::text::escape(&b.to_string()))
            };
            let run = Redis::connect(target, false, Box::new(quiet)).and_then(|mut r| {
                enqueue::enqueue(&mut r, &keys, id.as_deref(), lines, &shutdown, &bad)
            });
            match run {
                Err(e @ QueueError::ListChanged(_)) => fail(&e),
                Err(e) => fail(&format!(
                    "{e}; what was added stays, and the same command goes on from there"
                )),
                Ok(done) => {
                    if !options.quiet {
                        println!(
                            "fetch: {} entries added to queue {}{}",
                            done.added,
                            keys.name,
                            if done.before > 0 {
                                format!(" ({} added before)", done.before)
                            } else {
                                String::new()
                            }
                        );
                    }
                    if let Some(e) = &done.unreadable {
                        eprintln!("fetch: the list could not be read to its end: {e}");
                    }
                    match () {
                        _ if shutdown.is_requested() => 130,
                        _ if done.bad_lines > 0 || done.unreadable.is_some() => 2,
                        _ => 0,
                    }
                }
            }
        }
    }
}
