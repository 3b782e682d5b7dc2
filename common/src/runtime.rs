//! Configuring `may` once, and the gevent-style helpers built on it: `sleep`, `join_all`
//! and a bounded pool of coroutines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use may::coroutine::JoinHandle;
use may::sync::Semphore;

/// Coroutine stack size in words: 256 KiB. A rustls handshake needs about 119 KiB in a debug
/// build, and may's 32 KiB default overflows on the first HTTPS request. Pages are touched
/// lazily, so idle coroutines cost little more than with the default.
pub const STACK_WORDS: usize = 0x8000;

/// How long an idle worker sleeps in `epoll_wait` when no I/O deadline is pending. may's
/// default of 10 ms wakes every worker 100 times a second doing nothing (0.5% CPU for an idle
/// chat); I/O timeouts have deadlines of their own, and work from other threads wakes the
/// worker through its event fd, so nothing waits on this.
pub const IDLE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Finished coroutines kept ready for reuse. may's default of 1,000 is built eagerly at start:
/// 1,000 stacks mapped and guarded (2,000 system calls, about 10 ms and 4 MB before any work).
/// Our programs keep their coroutines for the whole run, so a small pool is enough.
pub const POOL_CAPACITY: usize = 64;

/// How `may` is set up. Applied by [`init`], once per process.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Pin workers to cores. Off by default: on a shared machine with helper threads
    /// (DNS, stdin) pinning makes workers fight them for the same core.
    pub pin_workers: bool,
}

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Configures `may` with the defaults. See [`RuntimeConfig::init`].
pub fn init() -> bool {
    RuntimeConfig::default().init()
}

impl RuntimeConfig {
    /// A configuration with this many workers (0: one per core).
    pub fn with_workers(workers: usize) -> Self {
        RuntimeConfig {
            workers,
            ..Self::default()
        }
    }

    /// Applies this configuration if none was applied yet, and says whether it did.
    ///
    /// `may` reads its configuration on first use only, so this must run before the first
    /// spawn or may I/O; a second call changes nothing and is harmless.
    pub fn init(&self) -> bool {
        if INITIALISED.swap(true, Ordering::SeqCst) {
            return false;
        }
        let config = may::config();
        config.set_stack_size(STACK_WORDS);
        config.set_pool_capacity(POOL_CAPACITY);
        config.set_workers(self.workers);
        config.set_worker_pin(self.pin_workers);
        config.set_timeout_ns(IDLE_POLL.as_nanos() as u64);
        true
    }
}

/// A timeout fit for may's blocking waits (`recv_timeout`, `wait_timeout`, parking).
///
/// may keeps those timeouts in whole milliseconds, and one under a millisecond becomes no
/// timeout at all: the wait never ends. Every computed timeout (time left until a deadline)
/// goes through this, which rounds up to the next millisecond. (`sleep` has no such trap.)
pub fn wait_limit(timeout: Duration) -> Duration {
    Duration::from_millis(timeout.as_nanos().div_ceil(1_000_000).max(1) as u64)
}

/// Sleeps the current coroutine without blocking its worker.
///
/// may resumes sleepers on its single timer thread; yielding right after waking moves the
/// rest of the work back to a worker so it cannot delay every other timer.
pub fn sleep(duration: Duration) {
    may::coroutine::sleep(duration);
    if may::coroutine::is_coroutine() {
        may::coroutine::yield_now();
    }
}

/// Waits for every handle, in order, and returns each coroutine's result (gevent's `joinall`).
/// A coroutine that panicked yields `Err` with the panic payload; the others are unaffected.
pub fn join_all<T>(
    handles: impl IntoIterator<Item = JoinHandle<T>>,
) -> Vec<std::thread::Result<T>> {
    handles.into_iter().map(|h| h.join()).collect()
}

/// At most `size` coroutines running at once (gevent's `Pool(size)`).
///
/// [`Pool::spawn`] waits for a free slot before it starts the coroutine, so a producer that
/// spawns in a loop is held back instead of piling up coroutines.
#[derive(Clone)]
pub struct Pool {
    slots: Slots,
}

impl Pool {
    /// A pool that runs at most `size` coroutines at once (at least one).
    pub fn new(size: usize) -> Self {
        Pool {
            slots: Slots::new(size.max(1)),
        }
    }

    /// Waits for a free slot, then runs `f` in a new coroutine that frees the slot when it
    /// ends, even by panicking.
    pub fn spawn<F, T>(&self, f: F) -> Result<JoinHandle<T>, crate::Error>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let slot = self.slots.take();
        // On a failed spawn the closure (and the slot inside it) is dropped, freeing the slot.
        spawn(move || {
            let _slot = slot;
            f()
        })
    }
}

/// A counting limit for coroutines: at most N hold a [`Slot`] at once, and the others park
/// (without blocking their worker) until one is freed. Clones share the slots.
#[derive(Clone)]
pub struct Slots(Arc<Semphore>);

impl Slots {
    pub fn new(n: usize) -> Self {
        Slots(Arc::new(Semphore::new(n)))
    }

    /// Waits for a free slot; it is freed when the [`Slot`] drops, even by a panic.
    pub fn take(&self) -> Slot {
        self.0.wait();
        Slot(self.0.clone())
    }

    /// A free slot now, or `None` when all are held.
    pub fn try_take(&self) -> Option<Slot> {
        self.0.try_wait().then(|| Slot(self.0.clone()))
    }

    /// True when no slot is held or waited for, and no other handle shares these slots.
    pub fn unused(&self) -> bool {
        Arc::strong_count(&self.0) == 1
    }
}

/// One of [`Slots`], held until dropped.
pub struct Slot(Arc<Semphore>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.post();
    }
}

/// Spawns a coroutine with the runtime's stack size (what `go!` does, reporting a failed
/// spawn as an error instead of panicking).
pub fn spawn<F, T>(f: F) -> Result<JoinHandle<T>, crate::Error>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // SAFETY: may's spawn is unsafe for two reasons, the same `go!` accepts for every caller:
    // thread-local state held across a yield (nothing in this workspace keeps a TLS borrow
    // across an I/O wait) and stack overflow (guarded by the 256 KiB stacks set in `init`
    // and exercised by the debug-build HTTPS tests).
    unsafe { may::coroutine::Builder::new().spawn(f) }.map_err(crate::Error::Spawn)
}
