//! What the user is shown, bounded: the queue of events waiting to be read, with a share per
//! source so that one flooding source fills only its own part, and the tally that turns
//! repeated trouble from one source (malformed datagrams, dropped messages, joins) into one
//! notice per interval instead of a line per datagram.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::ipmsg::packet::Malformed as IpmsgMalformed;
use crate::ipmsg::Client;
use crate::transfer::offer::OfferedFile;
use crate::wire::{Malformed, Refusal};

/// Who a peer is, for the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Speaks our protocol: messages are acknowledged.
    Chat,
    /// Sends plain text (nc, socat, a script): messages go out as plain UTF-8.
    Plain,
    /// An IP Messenger client (IP Messenger, iptux, FeiQ): messages are acknowledged, never
    /// authenticated. `unauthenticated` marks them so where this chat uses a key.
    Ipmsg { unauthenticated: bool },
}

/// An IP Messenger user as its packets describe it. As received: escape before showing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpmsgUser {
    pub user: String,
    pub host: String,
    pub group: String,
    pub client: Client,
    /// Its version field, which names the client.
    pub version: String,
    /// It says it is away (absence mode).
    pub away: bool,
}

/// What the user sees. Text is as received: escape it before showing it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `nick` is `None` for a plain peer.
    Message {
        from: SocketAddr,
        nick: Option<String>,
        text: String,
        protocol: Protocol,
    },
    /// `ipmsg` describes an IP Messenger user.
    Join {
        addr: SocketAddr,
        nick: String,
        protocol: Protocol,
        ipmsg: Option<IpmsgUser>,
    },
    Leave {
        addr: SocketAddr,
        nick: String,
        expired: bool,
        protocol: Protocol,
    },
    /// Files offered to us (`packet` names the offer to the sender), with a message. Names
    /// are as the sender gave them: escape before showing, make safe before saving.
    FileOffer {
        from: SocketAddr,
        nick: Option<String>,
        protocol: Protocol,
        packet: u64,
        text: String,
        files: Vec<OfferedFile>,
    },
    /// The peer will not take the files we offered under `packet`; `via` is the socket it
    /// said so on (an IP Messenger release is not authenticated, a chat peer's decline is).
    OfferDeclined {
        from: SocketAddr,
        packet: u64,
        via: super::Via,
    },
    /// The peer no longer serves the files it offered under `packet`.
    OfferWithdrawn { from: SocketAddr, packet: u64 },
    /// An IP Messenger user went away or came back.
    Away {
        addr: SocketAddr,
        nick: String,
        away: bool,
        protocol: Protocol,
    },
    /// Every fragment of message `id` was delivered to the peer's user.
    Delivered { to: SocketAddr, id: u64 },
    /// The peer stopped answering before message `id` was delivered.
    NotDelivered {
        to: SocketAddr,
        nick: Option<String>,
        id: u64,
        text: String,
    },
    /// A chat at `to` refused our hello.
    Refused { to: SocketAddr, why: Refusal },
    /// Nothing listens at `to` (ICMP port unreachable, on a connected socket).
    Unreachable { to: SocketAddr },
    /// Something about the network worth a line.
    Notice(String),
}

/// Events waiting for the user beyond this many are dropped (and counted), except the ones
/// the protocol already promised (acknowledged messages, delivery reports, leaves).
pub const EVENT_QUEUE: usize = 10_000;
/// Events from one source waiting for the user.
pub const SOURCE_QUEUE: usize = 4096;
/// The same in bytes: a line may be 64 KiB.
pub const EVENT_BYTES: usize = 32 << 20;
pub const SOURCE_BYTES: usize = 8 << 20;

/// What an event costs in the queue.
fn cost(event: &Event) -> usize {
    64 + match event {
        Event::Message { nick, text, .. } => text.len() + nick.as_ref().map_or(0, String::len),
        Event::NotDelivered { nick, text, .. } => text.len() + nick.as_ref().map_or(0, String::len),
        Event::Join { nick, ipmsg, .. } => {
            nick.len()
                + ipmsg.as_ref().map_or(0, |u| {
                    u.user.len() + u.host.len() + u.group.len() + u.version.len()
                })
        }
        Event::Leave { nick, .. } | Event::Away { nick, .. } => nick.len(),
        Event::FileOffer {
            nick, text, files, ..
        } => {
            nick.as_ref().map_or(0, String::len)
                + text.len()
                + files.iter().map(|f| 64 + f.name.len()).sum::<usize>()
        }
        Event::Notice(text) => text.len(),
        _ => 0,
    }
}

/// The bounded queue of events for the user.
#[derive(Debug, Default)]
pub struct EventQueue {
    queue: VecDeque<(Option<SocketAddr>, usize, Event)>,
    /// Per source: events and bytes waiting.
    by_source: BTreeMap<SocketAddr, (usize, usize)>,
    bytes: usize,
}

impl EventQueue {
    /// Events from `source` that fit before its share or the whole queue is full, counting
    /// one as the largest message can be.
    pub fn room(&self, source: SocketAddr) -> usize {
        let (count, bytes) = self.by_source.get(&source).copied().unwrap_or((0, 0));
        let largest = cost(&Event::Notice(String::new())) + 2 * crate::wire::MAX_TEXT;
        if bytes + largest > SOURCE_BYTES || self.bytes + largest > EVENT_BYTES {
            return 0;
        }
        SOURCE_QUEUE
            .saturating_sub(count)
            .min(EVENT_QUEUE.saturating_sub(self.queue.len()))
    }

    /// Queues an event that costs `source`'s share; false (and not queued) when there is no
    /// room for it.
    pub fn offer(&mut self, source: SocketAddr, event: Event) -> bool {
        if self.room(source) == 0 {
            return false;
        }
        self.push(Some(source), event);
        true
    }

    /// Queues an event the protocol already committed to (its room was checked when it was
    /// accepted, or it is bounded elsewhere).
    pub fn push(&mut self, source: Option<SocketAddr>, event: Event) {
        let size = cost(&event);
        if let Some(s) = source {
            let entry = self.by_source.entry(s).or_default();
            entry.0 += 1;
            entry.1 += size;
        }
        self.bytes += size;
        self.queue.push_back((source, size, event));
    }

    pub fn pop(&mut self) -> Option<(Option<SocketAddr>, Event)> {
        let (source, size, event) = self.queue.pop_front()?;
        self.bytes -= size;
        if let Some(s) = source {
            if let Some(entry) = self.by_source.get_mut(&s) {
                entry.0 -= 1;
                entry.1 -= size;
                if entry.0 == 0 {
                    self.by_source.remove(&s);
                }
            }
        }
        Some((source, event))
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Kinds of repeated trouble that are reported once per interval per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Topic {
    Malformed(Malformed),
    /// Lines from a plain peer dropped because its share of the queue was full.
    Dropped,
    /// Peers joining faster than the user can be told.
    Joins,
    /// Protocol datagrams without our key (or with another one).
    Unauthenticated,
    /// The peers table is full of peers we are talking to.
    TableFull,
    IpmsgMalformed(IpmsgMalformed),
    /// An IP Messenger peer said it was leaving and then spoke again.
    ForgedExit,
}

#[derive(Debug)]
struct Count {
    /// The interval ends; what came after the first one is summed up then.
    until: Instant,
    more: u64,
}

/// Sources tallied separately; beyond this, sources share one line.
const TALLY_SOURCES: usize = 1024;

/// Repeated trouble per (source, topic): the first occurrence in an interval is shown, the
/// rest counted and summed up in one line when the interval ends.
#[derive(Debug)]
pub struct Tally {
    interval: Duration,
    counts: BTreeMap<(Option<SocketAddr>, Topic), Count>,
}

impl Tally {
    pub fn new(interval: Duration) -> Self {
        Tally {
            interval,
            counts: BTreeMap::new(),
        }
    }

    /// Records one occurrence; true when it is the first of its interval and should be shown.
    pub fn note(&mut self, now: Instant, source: Option<SocketAddr>, topic: Topic) -> bool {
        let mut key = (source, topic);
        if !self.counts.contains_key(&key) && self.counts.len() >= TALLY_SOURCES {
            key.0 = None;
        }
        match self.counts.get_mut(&key) {
            Some(c) if now < c.until => {
                c.more += 1;
                false
            }
            _ => {
                self.counts.insert(
                    key,
                    Count {
                        until: now + self.interval,
                        more: 0,
                    },
                );
                true
            }
        }
    }

    /// The summaries of intervals that ended: (source, topic, occurrences after the first),
    /// and forgets them.
    pub fn flush(&mut self, now: Instant) -> Vec<(Option<SocketAddr>, Topic, u64)> {
        let mut out = Vec::new();
        self.counts.retain(|&(source, topic), c| {
            if now < c.until {
                return true;
            }
            if c.more > 0 {
                out.push((source, topic, c.more));
            }
            false
        });
        out
    }

    /// When the next summary is due, if one has anything to say.
    pub fn next_due(&self) -> Option<Instant> {
        self.counts
            .values()
            .filter(|c| c.more > 0)
            .map(|c| c.until)
            .min()
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_flooding_source_fills_only_its_share() {
        let mut q = EventQueue::default();
        let flood = addr(1);
        let mut taken = 0;
        while q.offer(flood, Event::Notice("x".into())) {
            taken += 1;
        }
        assert_eq!(taken, SOURCE_QUEUE);
        assert!(q.offer(addr(2), Event::Notice("y".into())));
        assert_eq!(q.room(addr(2)), SOURCE_QUEUE - 1);
        q.pop();
        assert_eq!(q.room(flood), 1);
    }

    #[test]
    fn large_lines_fill_a_share_by_bytes() {
        let mut q = EventQueue::default();
        let big = || Event::Message {
            from: addr(1),
            nick: None,
            text: "x".repeat(65_536),
            protocol: Protocol::Plain,
        };
        let mut taken = 0;
        while q.offer(addr(1), big()) {
            taken += 1;
        }
        assert!(taken < 130, "{taken} lines of 64 KiB");
        assert!(q.bytes() <= SOURCE_BYTES);
        assert!(q.offer(addr(2), big()), "another source has its own share");
    }

    #[test]
    fn repeated_trouble_is_one_line_per_interval() {
        let t = Instant::now();
        let mut tally = Tally::new(Duration::from_secs(10));
        let topic = Topic::Malformed(Malformed::TooShort);
        assert!(tally.note(t, Some(addr(1)), topic));
        for i in 0..1000 {
            assert!(!tally.note(t + Duration::from_millis(i), Some(addr(1)), topic));
        }
        assert!(tally.note(t, Some(addr(2)), topic), "another source");
        assert_eq!(tally.next_due(), Some(t + Duration::from_secs(10)));
        assert!(tally.flush(t + Duration::from_secs(9)).is_empty());
        assert_eq!(
            tally.flush(t + Duration::from_secs(10)),
            [(Some(addr(1)), topic, 1000)]
        );
        assert!(tally.is_empty());
        assert!(tally.note(t + Duration::from_secs(11), Some(addr(1)), topic));
    }

    #[test]
    fn the_tally_is_bounded_whatever_the_sources() {
        let t = Instant::now();
        let mut tally = Tally::new(Duration::from_secs(10));
        let shown = (0..60_000u16)
            .filter(|&p| tally.note(t, Some(addr(p)), Topic::Dropped))
            .count();
        assert!(tally.len() <= TALLY_SOURCES + 1);
        assert_eq!(shown, TALLY_SOURCES + 1);
    }
}
