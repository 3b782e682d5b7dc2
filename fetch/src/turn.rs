//! Turns: the downloads of a run take their names in the order their entries were given,
//! whichever coroutine or worker thread happens to run first, so which line gets `f.bin` and
//! which gets `f.1.bin`, or which of two copies of a URL downloads it, never depends on timing.
//!
//! Each turn is a [`Flag`] fired by the turn before it: a few words each until somebody has
//! to wait, so a queue of thousands of entries costs little.

use std::sync::Arc;

use corokit_common::flag::Flag;

/// Hands out turns in order: each one follows the one handed out before it.
pub(crate) struct Turns {
    last: Arc<Flag>,
}

impl Turns {
    pub(crate) fn new() -> Turns {
        let first = Arc::new(Flag::new());
        first.fire();
        Turns { last: first }
    }

    /// The turn after every turn handed out so far.
    pub(crate) fn next(&mut self) -> Turn {
        let next = Arc::new(Flag::new());
        let mine = std::mem::replace(&mut self.last, next.clone());
        Turn {
            mine,
            next: Some(next),
        }
    }
}

/// One entry's turn: it comes when every earlier turn has been passed, and is passed at the
/// latest when it is dropped (a failure or a panic cannot hold the later entries back).
pub(crate) struct Turn {
    mine: Arc<Flag>,
    next: Option<Arc<Flag>>,
}

impl Turn {
    /// A turn that is always due and holds no other back: for an entry with no order to keep.
    pub(crate) fn unordered() -> Turn {
        let due = Flag::new();
        due.fire();
        Turn {
            mine: Arc::new(due),
            next: None,
        }
    }

    /// Whether every earlier turn has been passed.
    #[cfg(test)]
    fn is_due(&self) -> bool {
        self.mine.is_fired()
    }

    /// Waits until every earlier turn has been passed.
    pub(crate) fn wait(&self) {
        self.mine.wait();
    }

    /// Lets the next turn come (once this one has); passing twice is passing once.
    pub(crate) fn pass(&mut self) {
        if let Some(next) = self.next.take() {
            self.mine.wait();
            next.fire();
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
