//! Turns: the downloads of a run take their names in the order their entries were given,
//! whichever coroutine or worker thread happens to run first, so which line gets `f.bin` and
//! which gets `f.1.bin`, or which of two copies of a URL downloads it, never depends on timing.
//!
//! A turn is a number and a shared count of the turns passed: a flag to wait on is made only
//! for a turn that has to wait (most find theirs due), so a queue of thousands of entries
//! costs no more than their numbers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use may::sync::SyncFlag;

#[derive(Default)]
struct Passed {
    /// Turns passed so far, in order: the turn with this number is due.
    count: u64,
    /// The flag of a turn waiting to come, by its number.
    waiting: HashMap<u64, Arc<SyncFlag>>,
}

/// Hands out turns in order: each one follows the one handed out before it.
pub(crate) struct Turns {
    passed: Arc<Mutex<Passed>>,
    next: u64,
}

impl Turns {
    pub(crate) fn new() -> Turns {
        Turns {
            passed: Arc::default(),
            next: 0,
        }
    }

    /// The turn after every turn handed out so far.
    pub(crate) fn next(&mut self) -> Turn {
        self.next += 1;
        Turn {
            order: Some((self.next - 1, self.passed.clone())),
        }
    }
}

/// One entry's turn: it comes when every earlier turn has been passed, and is passed at the
/// latest when it is dropped (a failure or a panic cannot hold the later entries back).
pub(crate) struct Turn {
    /// Its number and the run's count; none once passed, or for an unordered turn.
    order: Option<(u64, Arc<Mutex<Passed>>)>,
}

fn lock(passed: &Mutex<Passed>) -> std::sync::MutexGuard<'_, Passed> {
    passed.lock().unwrap_or_else(|e| e.into_inner())
}

impl Turn {
    /// A turn that is always due and holds no other back: for an entry with no order to keep.
    pub(crate) fn unordered() -> Turn {
        Turn { order: None }
    }

    /// Whether every earlier turn has been passed.
    #[cfg(test)]
    fn is_due(&self) -> bool {
        self.order
            .as_ref()
            .is_none_or(|(n, passed)| lock(passed).count >= *n)
    }

    /// Waits until every earlier turn has been passed.
    pub(crate) fn wait(&self) {
        let Some((n, passed)) = &self.order else {
            return;
        };
        let flag = {
            let mut p = lock(passed);
            if p.count >= *n {
                return;
            }
            p.waiting.entry(*n).or_default().clone()
        };
        flag.wait();
    }

    /// Lets the next turn come (once this one has); passing twice is passing once.
    pub(crate) fn pass(&mut self) {
        self.wait();
        let Some((n, passed)) = self.order.take() else {
            return;
        };
        let next = {
            let mut p = lock(&passed);
            p.count = n + 1;
            p.waiting.remove(&(n + 1))
        };
        // Woken with the lock let go: the woken turn takes it at once.
        if let Some(flag) = next {
            flag.fire();
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.pass();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn turns_come_in_the_order_they_were_handed_out_whoever_runs_first() {
        let mut turns = Turns::new();
        let mut handed: Vec<Turn> = (0..8).map(|_| turns.next()).collect();
        let order = Arc::new(Mutex::new(Vec::new()));
        // Started last to first, so without turns the order would be reversed.
        let threads: Vec<_> = handed
            .drain(..)
            .enumerate()
            .rev()
            .map(|(i, mut turn)| {
                let order = order.clone();
                std::thread::spawn(move || {
                    turn.wait();
                    order.lock().unwrap().push(i);
                    turn.pass();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn a_turn_comes_only_once_every_earlier_one_is_passed_or_dropped() {
        let mut turns = Turns::new();
        let mut first = turns.next();
        let second = turns.next();
        let mut third = turns.next();
        assert!(first.is_due());
        assert!(!second.is_due());
        // The second, dropped while it waits, passes only once the first has.
        let dropped = std::thread::spawn(move || drop(second));
        std::thread::yield_now();
        assert!(!third.is_due());
        first.pass();
        dropped.join().unwrap();
        assert!(third.is_due());
        third.pass();
        third.pass();
        assert!(turns.next().is_due());
    }

    #[test]
    fn an_unordered_turn_is_due_at_once_and_holds_no_one_back() {
        let mut turns = Turns::new();
        let mut first = turns.next();
        let mut unordered = Turn::unordered();
        unordered.wait();
        unordered.pass();
        let second = turns.next();
        assert!(!second.is_due());
        first.pass();
        assert!(second.is_due());
    }
}
