//! Ctrl-C and SIGTERM turned into a flag that coroutines check or wait on, so a program
//! stops by finishing its work cleanly instead of being killed mid-write.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use may::sync::SyncFlag;

use crate::Error;

/// A request to stop, shared by every coroutine of the process.
#[derive(Clone)]
pub struct Shutdown {
    flag: Arc<SyncFlag>,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("requested", &self.is_requested())
            .finish()
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A flag of its own, not tied to signals (for a component that stops on its own terms).
    pub fn new() -> Self {
        Shutdown {
            flag: Arc::new(SyncFlag::new()),
        }
    }

    /// The process's flag, fired by Ctrl-C (SIGINT), SIGTERM and SIGHUP. The handler is
    /// installed on the first call; later calls return the same flag.
    ///
    /// A signal the process started with ignored stays ignored: a shell starts background
    /// jobs of a script with SIGINT ignored, and `nohup` ignores SIGHUP, so that the job
    /// outlives a Ctrl-C in the terminal or the terminal itself.
    pub fn on_signals() -> Result<Shutdown, Error> {
        static SIGNALS: OnceLock<Shutdown> = OnceLock::new();
        if let Some(s) = SIGNALS.get() {
            return Ok(s.clone());
        }
        let shutdown = Shutdown::new();
        let fired = shutdown.clone();
        let ignored: Vec<libc::c_int> = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
            .into_iter()
            .filter(|&sig| is_ignored(sig))
            .collect();
        // ctrlc refuses to install over any handler, SIG_IGN included: install over them,
        // then put the ignored ones back.
        ctrlc::set_handler(move || fired.request())?;
        for sig in ignored {
            // SAFETY: SIG_IGN is a valid disposition for these catchable signals.
            unsafe { libc::signal(sig, libc::SIG_IGN) };
        }
        Ok(SIGNALS.get_or_init(|| shutdown).clone())
    }

    /// Asks everything watching this flag to stop.
    pub fn request(&self) {
        self.flag.fire();
    }

    pub fn is_requested(&self) -> bool {
        self.flag.is_fired()
    }

    /// Parks until a stop is requested.
    pub fn wait(&self) {
        self.flag.wait();
    }

    /// Parks until a stop is requested or `timeout` passes; true if requested. A coroutine
    /// that should pause between tries uses this instead of `sleep` so it stops at once.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.flag.wait_timeout(crate::wait_limit(timeout))
    }
}

/// True if `sig` is currently ignored.
fn is_ignored(sig: libc::c_int) -> bool {
    // SAFETY: with a null new action, sigaction only reads the disposition into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}
