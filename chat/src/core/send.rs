//! One ordered, acknowledged stream from this run to one peer run: sequence numbers,
//! retransmission with backoff, the peer's receive window, the congestion window, liveness
//! pings, and the decision that the peer stopped answering. Pure: time comes in, datagrams to
//! send and decisions go out.
//!
//! A datagram the receiver *holds* (acknowledged with its own sequence while an earlier one is
//! missing, or while its user is behind) is not sent again, but it is only *delivered* once
//! the receiver's cumulative acknowledgement covers it: until then it may still be given up.
//! The peer is alive while it answers anything; only a peer that sent nothing at all for
//! [`Timing::dead_after`] while we waited on it makes its messages "not delivered".

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::wire;

/// Datagrams queued or in flight to one peer before `send` is told to wait.
pub const SEND_QUEUE: usize = 4096;
/// The congestion window a stream starts with, and the least it shrinks to: datagrams in
/// the network at once. A burst larger than the receiver's socket buffer is mostly lost, and
/// retransmitting all of it at once is lost again.
pub const INITIAL_CWND: usize = 64;
pub const MIN_CWND: usize = 8;
/// Backoff stops doubling at this multiple of the first wait.
pub const MAX_BACKOFF: u32 = 16;
/// Later datagrams acknowledged before a missing one makes it go again at once.
const FAST_RETRANSMIT: u8 = 3;

/// The retransmission schedule.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The first wait for an acknowledgement; doubled after each send up to [`MAX_BACKOFF`]×.
    pub base: Duration,
    /// Sends of one datagram whose waits add up to how long a silent peer is given.
    pub tries: u32,
}

impl Timing {
    /// The wait after the `sends`-th send of a datagram: 1×, 2×, 4×, 8×, 16×, 16×, …
    pub fn backoff(&self, sends: u32) -> Duration {
        let doublings = sends.saturating_sub(1).min(MAX_BACKOFF.trailing_zeros());
        self.base * (1 << doublings)
    }

    /// How long a peer may send nothing at all while we wait on it before its messages are
    /// reported not delivered: the waits of `tries` sends (9.4 s with 200 ms and 6 tries).
    pub fn dead_after(&self) -> Duration {
        (1..=self.tries.max(1)).map(|k| self.backoff(k)).sum()
    }
}

#[derive(Debug)]
struct Pending {
    /// The encoded binary Msg; its `base` is rewritten on every send.
    bytes: Vec<u8>,
    sends: u32,
    next_at: Instant,
    /// Held by the receiver: not sent again, not delivered yet.
    held: bool,
    /// Later datagrams acknowledged since this one was last sent.
    later_acked: u8,
}

#[derive(Debug)]
struct Message {
    id: u64,
    last: u64,
    text: String,
}

/// What the stream asks for after time passed.
#[derive(Debug, Default, PartialEq)]
pub struct Due {
    /// Datagrams to send now (encoded binary Msgs).
    pub send: Vec<Vec<u8>>,
    pub retransmits: u64,
    /// Ask the peer to answer: we have heard nothing from it for a while.
    pub ping: bool,
    /// The peer stopped answering: these messages (id, text) were not delivered.
    pub dead: Vec<(u64, String)>,
}

/// `send` must wait: the peer has this many datagrams of ours queued or in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// How long the peer has delivered nothing to its user while we had something for it.
    pub stalled: Duration,
}

#[derive(Debug)]
pub struct Outgoing {
    next_seq: u64,
    /// Encoded but not yet sent: beyond the receive or congestion window.
    queue: VecDeque<(u64, Vec<u8>)>,
    flight: BTreeMap<u64, Pending>,
    /// Sent, not held, not delivered: in the network as far as we know.
    in_network: usize,
    /// No retransmission is due before this (a lower bound: acknowledgements only make the
    /// real time later), so that most polls need not look at every datagram in flight.
    resend_from: Instant,
    messages: BTreeMap<u64, Message>,
    /// Everything up to here was delivered to the peer's user.
    cumulative: u64,
    /// The highest sequence the peer has room for.
    window: u64,
    cwnd: usize,
    next_cut: Instant,
    /// When we last heard anything from the peer run (kept up to date by the core).
    pub last_heard: Instant,
    last_ping: Option<Instant>,
    /// Since when something has been queued or in flight without being delivered.
    waiting_since: Option<Instant>,
    /// When the peer last delivered something (or since the stream had nothing pending).
    progress: Instant,
}

impl Outgoing {
    pub fn new(now: Instant) -> Self {
        Outgoing {
            next_seq: 1,
            queue: VecDeque::new(),
            flight: BTreeMap::new(),
            in_network: 0,
            resend_from: now,
            messages: BTreeMap::new(),
            cumulative: 0,
            window: SEND_QUEUE as u64,
            cwnd: INITIAL_CWND,
            next_cut: now,
            last_heard: now,
            last_ping: None,
            waiting_since: None,
            progress: now,
        }
    }

    /// Nothing queued, in flight or undelivered.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.flight.is_empty()
    }

    /// The lowest sequence still pending: everything below it is settled.
    pub fn base(&self) -> u64 {
        let flight = self.flight.keys().next().copied();
        let queued = self.queue.front().map(|(s, _)| *s);
        [flight, queued]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.next_seq)
    }

    /// Takes message `id` of `frags` fragments, encoded by `encode(seq, frag)`.
    pub fn push(
        &mut self,
        now: Instant,
        id: u64,
        text: &str,
        frags: usize,
        mut encode: impl FnMut(u64, usize) -> Vec<u8>,
    ) -> Result<u64, Busy> {
        if self.queue.len() + self.flight.len() + frags > SEND_QUEUE {
            return Err(Busy {
                stalled: now.saturating_duration_since(self.progress),
            });
        }
        if self.is_idle() {
            self.progress = now;
        }
        let first = self.next_seq;
        for frag in 0..frags {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.queue.push_back((seq, encode(seq, frag)));
        }
        self.messages.insert(
            first,
            Message {
                id,
                last: self.next_seq - 1,
                text: text.to_string(),
            },
        );
        Ok(id)
    }

    /// An acknowledgement from the peer: `seq` is held (0: none), everything up to
    /// `cumulative` delivered, room up to `window`. Returns the ids of messages now delivered.
    pub fn on_ack(&mut self, now: Instant, seq: u64, cumulative: u64, window: u64) -> Vec<u64> {
        let old_window = self.window;
        self.window = window;
        let mut newly_acked = 0;
        if cumulative > self.cumulative && cumulative < self.next_seq {
            self.cumulative = cumulative;
            self.progress = now;
            while let Some(entry) = self.flight.first_entry() {
                if *entry.key() > cumulative {
                    break;
                }
                let p = entry.remove();
                if !p.held {
                    self.in_network -= 1;
                    newly_acked += 1;
                }
            }
            // A cumulative acknowledgement beyond what was sent is a lie; ignore the rest.
            while self.queue.front().is_some_and(|(s, _)| *s <= cumulative) {
                self.queue.pop_front();
            }
        }
        if seq > self.cumulative {
            if let Some(p) = self.flight.get_mut(&seq) {
                if !p.held {
                    p.held = true;
                    self.in_network -= 1;
                    newly_acked += 1;
                }
            }
            // The first datagram still missing below it was probably lost.
            if let Some(p) = self
                .flight
                .range_mut(..seq)
                .map(|(_, p)| p)
                .find(|p| !p.held)
            {
                p.later_acked = p.later_acked.saturating_add(1);
                if p.later_acked == FAST_RETRANSMIT {
                    p.next_at = now;
                    self.resend_from = now;
                }
            }
        }
        self.cwnd = (self.cwnd + newly_acked).min(SEND_QUEUE);
        if window > old_window {
            // Sent beyond the window before and refused for want of room: they go again as
            // soon as there is.
            for (_, p) in self.flight.range_mut(old_window.saturating_add(1)..=window) {
                if !p.held {
                    p.next_at = p.next_at.min(now);
                    self.resend_from = now;
                }
            }
        }
        let mut delivered = Vec::new();
        while let Some(entry) = self.messages.first_entry() {
            if entry.get().last > self.cumulative {
                break;
            }
            delivered.push(entry.remove().id);
        }
        if self.is_idle() {
            self.waiting_since = None;
        }
        delivered
    }

    /// Sends what is due at `now`: retransmissions, then new datagrams the windows allow;
    /// asks for a ping when the peer has been silent; gives everything up when it has been
    /// silent for too long.
    pub fn poll(&mut self, now: Instant, timing: Timing) -> Due {
        let mut due = Due::default();
        if self.is_idle() {
            return due;
        }
        let waiting = *self.waiting_since.get_or_insert(now);
        let silent_since = self.last_heard.max(waiting);
        if now.saturating_duration_since(silent_since) >= timing.dead_after() {
            due.dead = self.give_up();
            return due;
        }
        let base = self.base();
        let mut budget = self.cwnd;
        let mut lost = false;
        if now >= self.resend_from {
            let mut earliest = None::<Instant>;
            for p in self.flight.values_mut() {
                if p.held {
                    continue;
                }
                if p.next_at <= now {
                    if budget == 0 {
                        // A window's worth at a time: the rest go in the next round, costing
                        // no try.
                        p.next_at = now + timing.base;
                    } else {
                        budget -= 1;
                        p.sends += 1;
                        p.later_acked = 0;
                        p.next_at = now + timing.backoff(p.sends);
                        wire::set_base(&mut p.bytes, base);
                        due.send.push(p.bytes.clone());
                        due.retransmits += 1;
                        lost = true;
                    }
                }
                earliest = Some(earliest.map_or(p.next_at, |e| e.min(p.next_at)));
            }
            self.resend_from = earliest.unwrap_or(now + timing.base);
        }
        if lost && now >= self.next_cut {
            self.cwnd = (self.cwnd / 2).max(MIN_CWND);
            self.next_cut = now + timing.base;
        }
        while self.in_network < self.cwnd {
            let Some(&(seq, _)) = self.queue.front() else {
                break;
            };
            if seq > self.window {
                break;
            }
            let (seq, mut bytes) = self.queue.pop_front().expect("a front");
            wire::set_base(&mut bytes, base);
            due.send.push(bytes.clone());
            let next_at = now + timing.backoff(1);
            self.resend_from = self.resend_from.min(next_at);
            self.flight.insert(
                seq,
                Pending {
                    bytes,
                    sends: 1,
                    next_at,
                    held: false,
                    later_acked: 0,
                },
            );
            self.in_network += 1;
        }
        if let Some(at) = self.next_ping(timing) {
            if at <= now {
                self.last_ping = Some(now);
                due.ping = true;
            }
        }
        due
    }

    /// When to ask the peer for a sign of life: a round after we last heard from it, and
    /// every round while it says nothing; rarely while it holds everything we sent (its user
    /// is behind and it will tell us when it catches up).
    fn next_ping(&self, timing: Timing) -> Option<Instant> {
        let waiting = self.waiting_since?;
        let answered = self.last_ping.is_none_or(|p| self.last_heard >= p);
        Some(if answered {
            let pace = if self.in_network == 0 && self.queue.is_empty() {
                timing.base * MAX_BACKOFF
            } else {
                timing.base
            };
            self.last_heard.max(waiting) + pace
        } else {
            self.last_ping.expect("unanswered") + timing.base
        })
    }

    /// The earliest time [`Outgoing::poll`] has something to do.
    pub fn next_timer(&self, timing: Timing) -> Option<Instant> {
        if self.is_idle() {
            return None;
        }
        let waiting = self.waiting_since?;
        let dead = self.last_heard.max(waiting) + timing.dead_after();
        let resend = self
            .flight
            .values()
            .filter(|p| !p.held)
            .map(|p| p.next_at)
            .min();
        [Some(dead), resend, self.next_ping(timing)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Gives up everything pending: the messages (id, text) that were not delivered. The
    /// sequence goes on, and the next datagram's `base` tells the receiver to skip the gap.
    pub fn give_up(&mut self) -> Vec<(u64, String)> {
        self.queue.clear();
        self.flight.clear();
        self.in_network = 0;
        self.waiting_since = None;
        self.last_ping = None;
        std::mem::take(&mut self.messages)
            .into_values()
            .map(|m| (m.id, m.text))
            .collect()
    }

    /// Datagrams queued and in flight.
    pub fn pending(&self) -> usize {
        self.queue.len() + self.flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timing() -> Timing {
        Timing {
            base: 200 * MS,
            tries: 6,
        }
    }

    fn stream(now: Instant, messages: usize) -> Outgoing {
        let mut out = Outgoing::new(now);
        for i in 0..messages {
            out.push(now, i as u64 + 1, &format!("m{i}"), 1, |seq, _| {
                seq.to_be_bytes().to_vec()
            })
            .unwrap();
        }
        out
    }

    #[test]
    fn the_backoff_doubles_up_to_sixteen_times() {
        let t = timing();
        let waits: Vec<u128> = (1..=7).map(|k| t.backoff(k).as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 3200, 3200]);
        assert_eq!(t.dead_after(), 9400 * MS);
    }

    #[test]
    fn a_peer_that_acknowledges_anything_is_never_given_up() {
        let t0 = Instant::now();
        let mut out = stream(t0, 2);
        assert_eq!(out.poll(t0, timing()).send.len(), 2);
        // Message 1 is never acknowledged, message 2 is held: the peer is alive.
        assert!(out.on_ack(t0 + MS, 2, 0, 5000).is_empty());
        let mut now = t0;
        for _ in 0..200 {
            now += 100 * MS;
            out.last_heard = now; // it answers our pings
            let due = out.poll(now, timing());
            assert!(due.dead.is_empty(), "given up at {:?}", now - t0);
        }
        assert_eq!(out.pending(), 2);
        assert_eq!(out.on_ack(now, 1, 2, 5000), [1, 2]);
        assert!(out.is_idle());
    }

    #[test]
    fn a_silent_peer_is_given_up_after_the_documented_time() {
        let t0 = Instant::now();
        let mut out = stream(t0, 3);
        let mut now = t0;
        let mut sends = 0;
        loop {
            let due = out.poll(now, timing());
            sends += due.send.len();
            if !due.dead.is_empty() {
                assert_eq!(due.dead.len(), 3);
                break;
            }
            now += 10 * MS;
        }
        assert_eq!(now - t0, timing().dead_after());
        assert_eq!(
            sends,
            3 * 6,
            "`tries` sends each before the silence is long enough"
        );
        // The next message carries a base past the gap.
        out.push(now, 99, "again", 1, |seq, _| {
            let mut b = crate::wire::Packet::bye(1, 2).encode();
            b.extend_from_slice(&seq.to_be_bytes());
            b
        })
        .unwrap();
        assert_eq!(out.base(), 4);
    }

    #[test]
    fn the_congestion_window_halves_once_per_loss_burst() {
        let t0 = Instant::now();
        let mut out = stream(t0, 200);
        assert_eq!(out.poll(t0, timing()).send.len(), INITIAL_CWND);
        // Nothing acknowledged: all retransmitted after the first wait, one halving.
        let later = t0 + 200 * MS;
        out.last_heard = later;
        let due = out.poll(later, timing());
        assert_eq!(due.retransmits, INITIAL_CWND as u64);
        assert_eq!(out.cwnd, INITIAL_CWND / 2);
        out.last_heard = later + 20 * MS;
        out.poll(later + 20 * MS, timing());
        assert_eq!(out.cwnd, INITIAL_CWND / 2);
    }

    #[test]
    fn nothing_goes_past_the_receive_window_until_it_opens() {
        let t0 = Instant::now();
        let mut out = stream(t0, 10);
        out.on_ack(t0, 0, 0, 3);
        assert_eq!(out.poll(t0, timing()).send.len(), 3);
        assert!(out.poll(t0 + MS, timing()).send.is_empty());
        out.on_ack(t0 + 2 * MS, 0, 3, 8);
        assert_eq!(out.poll(t0 + 2 * MS, timing()).send.len(), 5);
    }

    #[test]
    fn a_lying_cumulative_acknowledgement_changes_nothing() {
        let t0 = Instant::now();
        let mut out = stream(t0, 2);
        out.poll(t0, timing());
        assert!(out.on_ack(t0, 0, u64::MAX, u64::MAX).is_empty());
        assert_eq!(out.pending(), 2);
    }
}
