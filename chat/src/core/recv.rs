//! One ordered stream from a peer run to this run: datagrams held until the ones before them
//! arrive, messages reassembled from their fragments and released to the user in order, the
//! cumulative acknowledgement (what the user has been given) and the receive window.
//!
//! Memory is bounded whatever the sender does: at most [`REORDER`] datagrams of at most
//! [`wire::MAX_RECEIVED`] bytes are held per stream, and the caller passes a global budget
//! that an out-of-order datagram must fit. A datagram that is not held is not acknowledged, so
//! the sender sends it again later; nothing acknowledged as held is ever dropped, except when
//! the sender itself says it gave it up (`base`).

use std::collections::BTreeMap;

use crate::wire;

/// Datagrams held per stream beyond the last one delivered; also the receive window.
pub const REORDER: u64 = 1024;

#[derive(Debug)]
struct Fragment {
    frag: u16,
    frags: u16,
    nick: Option<String>,
    text: Vec<u8>,
}

/// What a held fragment costs beyond its bytes: the map entry and allocations. Counted, so
/// that empty fragments are not free.
const FRAGMENT_OVERHEAD: usize = 96;

impl Fragment {
    fn cost(&self) -> usize {
        self.text.len() + self.nick.as_ref().map_or(0, String::len) + FRAGMENT_OVERHEAD
    }
}

/// What became of an offered datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Seen before (delivered or held): acknowledge again.
    Duplicate,
    /// Held until it can be delivered: acknowledge it.
    Held,
    /// Beyond the window or the memory budget: not acknowledged, to be sent again.
    Refused,
}

/// A message complete and in order.
#[derive(Debug, PartialEq)]
pub struct Complete {
    pub nick: Option<String>,
    /// UTF-8 text, or a control message about files (see `transfer::offer::Control`).
    pub text: Vec<u8>,
}

#[derive(Debug)]
pub struct Incoming {
    /// The next sequence to deliver.
    expected: u64,
    held: BTreeMap<u64, Fragment>,
    held_bytes: usize,
}

impl Default for Incoming {
    fn default() -> Self {
        Incoming {
            expected: 1,
            held: BTreeMap::new(),
            held_bytes: 0,
        }
    }
}

impl Incoming {
    /// Every sequence up to this was delivered to the user.
    pub fn cumulative(&self) -> u64 {
        self.expected - 1
    }

    /// The highest sequence there is room for.
    pub fn window(&self) -> u64 {
        self.cumulative().saturating_add(REORDER)
    }

    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// The sender settled everything below `base` (delivered, or given up): skip to it.
    /// Returns the bytes freed.
    pub fn skip_to(&mut self, base: u64) -> usize {
        if base <= self.expected {
            return 0;
        }
        self.expected = base;
        let keep = self.held.split_off(&base);
        let freed: usize = self.held.values().map(Fragment::cost).sum();
        self.held = keep;
        self.held_bytes -= freed;
        freed
    }

    /// Offers one datagram; `budget` is how many more bytes may be held in all.
    #[allow(clippy::too_many_arguments)]
    pub fn offer(
        &mut self,
        seq: u64,
        frag: u16,
        frags: u16,
        nick: Option<String>,
        text: Vec<u8>,
        budget: usize,
    ) -> Offer {
        if seq < self.expected || self.held.contains_key(&seq) {
            return Offer::Duplicate;
        }
        let fragment = Fragment {
            frag,
            frags,
            nick,
            text,
        };
        if seq > self.window() || fragment.cost() > budget {
            return Offer::Refused;
        }
        self.held_bytes += fragment.cost();
        self.held.insert(seq, fragment);
        Offer::Held
    }

    /// True when the next message in order is complete and waits to be delivered.
    pub fn ready(&mut self) -> bool {
        self.next_span().is_some()
    }

    /// The next message in order, if it is complete.
    pub fn take(&mut self) -> Option<Complete> {
        let frags = self.next_span()?;
        let mut nick = None;
        let mut text = Vec::new();
        for seq in self.expected..self.expected + u64::from(frags) {
            let f = self.held.remove(&seq).expect("checked complete");
            self.held_bytes -= f.cost();
            if f.frag == 0 {
                nick = f.nick;
            }
            if text.len() + f.text.len() <= wire::MAX_TEXT {
                text.extend_from_slice(&f.text);
            }
        }
        self.expected += u64::from(frags);
        Some(Complete { nick, text })
    }

    /// The fragment count of the complete message at `expected`. Fragments that cannot start
    /// a message there (the tail of one given up, or an inconsistent one) are dropped.
    fn next_span(&mut self) -> Option<u16> {
        loop {
            let first = self.held.get(&self.expected)?;
            let frags = first.frags;
            let starts = first.frag == 0;
            let fits = self.expected.checked_add(u64::from(frags)).is_some();
            let consistent = starts
                && fits
                && (1..frags).all(|i| {
                    self.held
                        .get(&(self.expected + u64::from(i)))
                        .is_none_or(|f| f.frag == i && f.frags == frags)
                });
            if consistent {
                let all_here =
                    (1..frags).all(|i| self.held.contains_key(&(self.expected + u64::from(i))));
                return all_here.then_some(frags);
            }
            let dropped = self.held.remove(&self.expected).expect("present");
            self.held_bytes -= dropped.cost();
            // Saturating: only a hostile sender gets to the end of the sequence space.
            self.expected = self.expected.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(inc: &mut Incoming, seq: u64, frag: u16, frags: u16, text: &str) -> Offer {
        inc.offer(
            seq,
            frag,
            frags,
            (frag == 0).then(|| "n".into()),
            text.into(),
            usize::MAX,
        )
    }

    #[test]
    fn fragments_are_delivered_once_whole_and_in_order() {
        let mut inc = Incoming::default();
        assert_eq!(offer(&mut inc, 3, 0, 1, "c"), Offer::Held);
        assert_eq!(offer(&mut inc, 2, 1, 2, "b"), Offer::Held);
        assert!(!inc.ready());
        assert_eq!(offer(&mut inc, 1, 0, 2, "a"), Offer::Held);
        assert_eq!(offer(&mut inc, 1, 0, 2, "a"), Offer::Duplicate);
        assert_eq!(inc.take().unwrap().text, b"ab");
        assert_eq!(inc.take().unwrap().text, b"c");
        assert_eq!(inc.take(), None);
        assert_eq!(inc.cumulative(), 3);
        assert_eq!(offer(&mut inc, 2, 1, 2, "b"), Offer::Duplicate);
        assert_eq!(inc.held_bytes(), 0);
    }

    #[test]
    fn a_skip_drops_what_was_given_up_and_the_tail_of_a_message() {
        let mut inc = Incoming::default();
        offer(&mut inc, 2, 0, 1, "given up");
        offer(&mut inc, 5, 1, 2, "tail of 4");
        offer(&mut inc, 6, 0, 1, "next");
        assert_eq!(inc.skip_to(5), "given up".len() + 1 + FRAGMENT_OVERHEAD);
        assert_eq!(inc.take().unwrap().text, b"next");
        assert_eq!(inc.cumulative(), 6);
    }

    #[test]
    fn the_window_and_the_budget_bound_what_is_held() {
        let mut inc = Incoming::default();
        assert_eq!(offer(&mut inc, REORDER + 2, 0, 1, "far"), Offer::Refused);
        let cost = 100 + FRAGMENT_OVERHEAD;
        assert_eq!(
            inc.offer(5, 0, 1, None, vec![0; 100], cost - 1),
            Offer::Refused
        );
        assert_eq!(inc.offer(5, 0, 1, None, vec![0; 100], cost), Offer::Held);
        // Empty fragments cost memory too.
        assert_eq!(
            inc.offer(6, 0, 1, None, Vec::new(), FRAGMENT_OVERHEAD - 1),
            Offer::Refused
        );
        // Sequence numbers near the end of the range do not overflow.
        inc.skip_to(u64::MAX - 3);
        assert_eq!(inc.window(), u64::MAX);
        assert_eq!(offer(&mut inc, u64::MAX, 0, 1, "x"), Offer::Held);
    }

    #[test]
    fn inconsistent_fragments_cannot_wedge_the_stream() {
        let mut inc = Incoming::default();
        offer(&mut inc, 1, 0, 3, "a");
        offer(&mut inc, 2, 1, 2, "liar");
        offer(&mut inc, 3, 0, 1, "after");
        assert_eq!(inc.take().unwrap().text, b"after");
        assert_eq!(inc.held_bytes(), 0);
    }
}
