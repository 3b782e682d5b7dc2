//! A flag coroutines (or threads) wait on until it is fired, once. Unlike may's `SyncFlag`
//! (about 400 bytes, with its queue of waiters), it costs a few words until somebody actually
//! waits: fetch keeps one for every download under way and every name it holds, and those
//! are waited on only by a later copy of the same URL.

use std::sync::{Arc, Mutex, MutexGuard};

use may::sync::SyncFlag;

/// Fired once, for good; waited on by any number.
#[derive(Default)]
pub struct Flag(Mutex<State>);

#[derive(Default)]
struct State {
    fired: bool,
    /// Made by the first waiter.
    waiters: Option<Arc<SyncFlag>>,
}

impl Flag {
    pub fn new() -> Flag {
        Flag::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks the coroutine (or thread) until the flag is fired; returns at once if it was.
    pub fn wait(&self) {
        let waiters = {
            let mut s = self.state();
            if s.fired {
                return;
            }
            s.waiters.get_or_insert_with(Default::default).clone()
        };
        waiters.wait();
    }

    /// Fires the flag: every waiter, now or later, goes on.
    pub fn fire(&self) {
        let waiters = {
            let mut s = self.state();
            s.fired = true;
            s.waiters.take()
        };
        // Woken with the lock let go.
        if let Some(w) = waiters {
            w.fire();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.state().fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_before_and_after_the_fire_all_go_on() {
        crate::init();
        let flag = Arc::new(Flag::new());
        let early: Vec<_> = (0..4)
            .map(|_| {
                let flag = flag.clone();
                crate::spawn(move || flag.wait()).unwrap()
            })
            .collect();
        let thread = {
            let flag = flag.clone();
            std::thread::spawn(move || flag.wait())
        };
        assert!(!flag.is_fired());
        flag.fire();
        flag.fire();
        crate::join_all(early).into_iter().for_each(|r| r.unwrap());
        thread.join().unwrap();
        flag.wait();
        assert!(flag.is_fired());
        assert!(std::mem::size_of::<Flag>() <= 32);
    }
}
