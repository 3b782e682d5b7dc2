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
    pub fn on_signals() -> Result<Shutdown, Error> {
        static SIGNALS: OnceLock<Shutdown> = OnceLock::new();
        if let Some(s) = SIGNALS.get() {
            return Ok(s.clone());
        }
        let shutdown = Shutdown::new();
        let fired = shutdown.clone();
        ctrlc::try_set_handler(move || fired.request())?;
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
        self.flag.wait_timeout(timeout)
    }
}
