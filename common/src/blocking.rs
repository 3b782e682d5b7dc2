//! The one place where calls that block an OS thread are made: a small pool of OS threads
//! runs them while the calling coroutine waits on a may channel, and host-name lookups
//! (`getaddrinfo`) go through that pool with a timeout and a cache. Waits for the disk
//! ([`sync_data`]) have threads of their own, so a slow disk never holds up a lookup.
//!
//! This is the only module allowed to call the methods `clippy.toml` bans elsewhere.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::Error;

type Job = Box<dyn FnOnce() + Send>;

/// Threads in the offload pool: enough for a few slow lookups at once, few enough to cost
/// nothing when idle.
const POOL_THREADS: usize = 4;
/// Threads that wait for the disk ([`sync_data`]).
const DISK_THREADS: usize = 2;

struct OffloadPool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl OffloadPool {
    fn start(name: &str, threads: usize) -> OffloadPool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            // A pool that cannot start a thread has fewer threads; with none, jobs wait
            // forever and callers see their timeout, which names the problem.
            let _ = std::thread::Builder::new()
                .name(format!("corokit-{name}-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
        }
        OffloadPool {
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `f` on one of the pool's threads; see [`offload`].
    fn run<T, F>(&self, timeout: Duration, f: F) -> Result<T, Error>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = may::sync::mpsc::channel();
        let job: Job = Box::new(move || {
            let result = catch_unwind(AssertUnwindSafe(f));
            let _ = tx.send(result);
        });
        // The lock only guards a non-blocking send, so it is held for microseconds.
        if let Ok(jobs) = self.jobs.lock() {
            let _ = jobs.send(job);
        }
        match rx.recv_timeout(crate::wait_limit(timeout)) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(Error::OffloadPanicked),
            Err(_) => Err(Error::OffloadTimeout(timeout)),
        }
    }
}

fn pool() -> &'static OffloadPool {
    static POOL: OnceLock<OffloadPool> = OnceLock::new();
    POOL.get_or_init(|| OffloadPool::start("blocking", POOL_THREADS))
}

fn disk() -> &'static OffloadPool {
    static DISK: OnceLock<OffloadPool> = OnceLock::new();
    DISK.get_or_init(|| OffloadPool::start("disk", DISK_THREADS))
}

/// Runs a blocking call `f` on the offload pool and parks the calling coroutine (not its
/// worker) until the result arrives or `timeout` passes. Works from plain threads too.
///
/// On timeout the call keeps running on its pool thread; its result is dropped.
pub fn offload<T, F>(timeout: Duration, f: F) -> Result<T, Error>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    pool().run(timeout, f)
}

/// Flushes `file`'s data to the disk (`fdatasync`) on the disk's own threads while the
/// calling coroutine waits, at most `limit` (the flush goes on after that; its result is
/// dropped). Give it a descriptor of its own: one shared with a lock would hold the lock
/// for as long as the flush takes.
pub fn sync_data(file: std::fs::File, limit: Duration) -> io::Result<()> {
    disk()
        .run(limit, move || file.sync_data())
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// How a host name becomes addresses. The system's `getaddrinfo` by default; tests plug in
/// their own (a slow one, say) to watch what the runtime does meanwhile.
pub trait Lookup: Send + Sync + 'static {
    /// Resolves `host` (never an IP literal) for `port`. May block: it runs on the pool.
    fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// The system resolver (`getaddrinfo`, through `ToSocketAddrs`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok((host, port).to_socket_addrs()?.collect())
    }
}

/// How long a looked-up answer is reused. getaddrinfo gives no TTL; a minute keeps a batch
/// of downloads from one host to one lookup without pinning a stale address for long.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries kept before the cache is cleared; bounds memory for lists of many hosts.
const CACHE_ENTRIES: usize = 4096;

type Answer = Result<Arc<[SocketAddr]>, Arc<io::Error>>;

/// A lookup in flight that other coroutines asking for the same host wait on, so a batch of
/// URLs on one host makes one lookup, not one per URL.
struct Pending {
    done: may::sync::SyncFlag,
    answer: Mutex<Option<Answer>>,
}

enum Entry {
    Ready(Arc<[SocketAddr]>, Instant),
    Pending(Arc<Pending>),
}

/// Host-name resolution that never blocks a may worker: IP literals are parsed in place,
/// names are looked up on the offload pool with a timeout, and answers are cached.
pub struct Dns {
    lookup: Arc<dyn Lookup>,
    cache: Mutex<HashMap<(String, u16), Entry>>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").finish_non_exhaustive()
    }
}

impl Dns {
    /// A resolver with its own cache over `lookup`.
    pub fn new(lookup: impl Lookup) -> Self {
        Dns {
            lookup: Arc::new(lookup),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The process-wide resolver over the system's `getaddrinfo`.
    pub fn system() -> Arc<Dns> {
        static SYSTEM: OnceLock<Arc<Dns>> = OnceLock::new();
        SYSTEM
            .get_or_init(|| Arc::new(Dns::new(SystemLookup)))
            .clone()
    }

    /// Addresses for `host:port`, waiting at most `timeout` for a lookup. `host` may be an
    /// IP literal, with or without IPv6 brackets; that needs no lookup at all.
    pub fn resolve(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, Error> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let key = (host.to_ascii_lowercase(), port);
        let (pending, lead) = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(&key) {
                Some(Entry::Ready(addrs, at)) if at.elapsed() < CACHE_TTL => {
                    return Ok(addrs.to_vec());
                }
                Some(Entry::Pending(p)) => (p.clone(), false),
                _ => {
                    if cache.len() >= CACHE_ENTRIES {
                        cache.retain(|_, e| matches!(e, Entry::Pending(_)));
                    }
                    let p = Arc::new(Pending {
                        done: may::sync::SyncFlag::new(),
                        answer: Mutex::new(None),
                    });
                    cache.insert(key.clone(), Entry::Pending(p.clone()));
                    (p, true)
                }
            }
        };
        if lead {
            let lookup = self.lookup.clone();
            let job_pending = pending.clone();
            let name = key.0.clone();
            let job: Job = Box::new(move || {
                let answer = catch_unwind(AssertUnwindSafe(|| lookup.lookup(&name, port)))
                    .unwrap_or_else(|_| Err(io::Error::other("the resolver panicked")));
                let answer = answer.map(Arc::from).map_err(Arc::new);
                *job_pending.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(answer);
                job_pending.done.fire();
            });
            if let Ok(jobs) = pool().jobs.lock() {
                let _ = jobs.send(job);
            }
        }
        if !pending.done.wait_timeout(crate::wait_limit(timeout)) {
            if lead {
                // Let the next caller start afresh rather than wait on a lookup that hangs.
                self.forget_pending(&key, &pending);
            }
            return Err(Error::ResolveTimeout {
                host: host.to_string(),
                after: timeout,
            });
        }
        let answer = pending
            .answer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let answer = answer.unwrap_or_else(|| Err(Arc::new(io::Error::other("no answer"))));
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match &answer {
                Ok(addrs) if !addrs.is_empty() => {
                    if let Some(Entry::Pending(p)) = cache.get(&key) {
                        if Arc::ptr_eq(p, &pending) {
                            cache.insert(key.clone(), Entry::Ready(addrs.clone(), Instant::now()));
                        }
                    }
                }
                _ => {
                    drop(cache);
                    self.forget_pending(&key, &pending);
                }
            }
        }
        match answer {
            Ok(addrs) if addrs.is_empty() => Err(Error::NoAddress {
                host: host.to_string(),
            }),
            Ok(addrs) => Ok(addrs.to_vec()),
            Err(e) => Err(Error::Resolve {
                host: host.to_string(),
                source: io::Error::new(e.kind(), e.to_string()),
            }),
        }
    }

    fn forget_pending(&self, key: &(String, u16), pending: &Arc<Pending>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Entry::Pending(p)) = cache.get(key) {
            if Arc::ptr_eq(p, pending) {
                cache.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_need_no_lookup() {
        struct Never;
        impl Lookup for Never {
            fn lookup(&self, host: &str, _: u16) -> io::Result<Vec<SocketAddr>> {
                panic!("looked up {host}")
            }
        }
        let dns = Dns::new(Never);
        let t = Duration::from_secs(1);
        assert_eq!(
            dns.resolve("127.0.0.1", 80, t).unwrap(),
            vec!["127.0.0.1:80".parse().unwrap()]
        );
        assert_eq!(
            dns.resolve("[::1]", 443, t).unwrap(),
            vec!["[::1]:443".parse().unwrap()]
        );
    }

    #[test]
    fn answers_are_cached_and_failures_are_not() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Counting(Arc<AtomicUsize>);
        impl Lookup for Counting {
            fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
                self.0.fetch_add(1, Ordering::SeqCst);
                match host {
                    "good.test" => Ok(vec![SocketAddr::from(([127, 0, 0, 9], port))]),
                    _ => Err(io::Error::new(io::ErrorKind::NotFound, "no such host")),
                }
            }
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let dns = Dns::new(Counting(calls.clone()));
        let t = Duration::from_secs(5);
        for _ in 0..3 {
            assert_eq!(dns.resolve("good.test", 8080, t).unwrap()[0].port(), 8080);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for _ in 0..2 {
            let err = dns.resolve("bad.test", 80, t).unwrap_err();
            assert!(err.to_string().contains("bad.test"), "{err}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn offload_returns_the_value_and_reports_panics() {
        assert_eq!(offload(Duration::from_secs(5), || 6 * 7).unwrap(), 42);
        let err = offload(Duration::from_secs(5), || -> u8 { panic!("boom") }).unwrap_err();
        assert!(matches!(err, Error::OffloadPanicked));
    }
}
