//! The chat protocol as a state machine that owns no socket, clock or random source
//! (sans-IO, the way quinn-proto and smoltcp work): datagrams, the time and a random seed go
//! in; datagrams to send, events for the user and the next deadline come out. The node
//! (`crate::node`) is a thin driver that does the I/O and sleeps until the deadline; the
//! simulator in the test suite drives thousands of these through a simulated network.
//!
//! What it decides:
//! - **Handshake.** An address becomes a peer only by echoing a challenge we sent to it (a
//!   token that is a MAC of its address under a secret of this run, so strangers cost no
//!   state); datagrams from an address not verified for the run they claim are answered with
//!   a challenge and otherwise ignored. Peers, their addresses and aliases: [`peers`].
//! - **Delivery.** One ordered stream per pair of runs: [`send`] retransmits with backoff,
//!   respects the receive and congestion windows and gives up only on a peer that has sent
//!   nothing at all for `Timing::dead_after`; [`recv`] holds, reorders and reassembles.
//! - **Keys.** With a shared secret everything is sealed (`crate::seal`), every datagram names
//!   the receiver's run (`dst`), and counters go through a replay window per sender run.
//! - **Bounds.** Rate limit per source, the peers table, held datagrams per stream and in all,
//!   the user's queue per source and in all, and one notice per interval for repeated junk.

pub mod events;
pub mod ipmsg;
mod offers;
pub mod peers;
pub mod recv;
pub mod send;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use corokit_common::TokenBucket;
use ring::{digest, hmac};

use crate::seal::{self, Key, RunKey};
use crate::wire::{self, Body, Datagram, Kind, Packet, Refusal};
use events::{EventQueue, Tally, Topic};
use ipmsg::Ipmsg;
use peers::{Peers, Verified};
use recv::Offer;
use send::{Busy, Timing};

pub use events::{Event, IpmsgUser, Protocol};
pub use ipmsg::IpmsgConfig;

/// IPv4 multicast group for discovery (administratively scoped).
pub const MULTICAST_V4: Ipv4Addr = Ipv4Addr::new(239, 255, 75, 84);
/// IPv6 all-nodes link-local group: every IPv6 host on the link is in it.
pub const ALL_NODES_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Bytes held out of order across all streams; past it only the datagrams of the next
/// message of each stream are taken, so every stream can still make progress.
pub const HELD_BUDGET: usize = 32 << 20;
/// Sources tracked by the rate limiter in each of its two generations: a source heard in
/// either keeps its buckets; when the newer one fills, the older one is forgotten.
const RATE_SOURCES: usize = 4096;
/// Addresses of chat peers that left or expired, remembered so that a line to one of them is
/// refused instead of going out as plain text.
const FORMER: usize = 1024;
/// A challenge token is good for this epoch and the one before: a recording of an echo
/// stops verifying anything after at most twice this.
const TOKEN_EPOCH: Duration = Duration::from_secs(300);
/// Greetings by hand remembered (addresses given with `--to`, `/to`, `chat send`).
const HELLOS: usize = 256;
/// Sends of a greeting by hand, and the waits after each.
const HELLO_WAITS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(3),
    Duration::from_secs(5),
];
/// How often silent peers are expired and tallies summed up.
const HOUSEKEEPING: Duration = Duration::from_secs(5);
/// Joins shown at once, and per second after that; the rest are summed up.
const JOIN_BURST: f64 = 50.0;
const JOIN_RATE: f64 = 2.0;
/// Challenges and refusals sent to one source: a burst and per second.
const CHALLENGE_BURST: f64 = 8.0;
const CHALLENGE_RATE: f64 = 20.0;
/// The interval over which repeated trouble from one source is one notice.
const TALLY_INTERVAL: Duration = Duration::from_secs(10);

/// Where announcements go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discovery {
    pub port: u16,
    pub ipv4: bool,
    pub ipv6: bool,
}

/// How the protocol behaves; `Default` is what the `chat` binary uses.
#[derive(Debug)]
pub struct Config {
    pub nick: String,
    pub key: Option<Key>,
    /// Announce by broadcast and multicast; `None` turns discovery off.
    pub discovery: Option<Discovery>,
    /// First retransmission after this long; doubled each time up to 16×.
    pub retry_base: Duration,
    /// Sends of a datagram, unanswered, before its peer counts as gone.
    pub tries: u32,
    /// Datagrams per second accepted from one source address (and as many in a burst).
    pub rate_per_source: u32,
    /// Presence sent directly to every peer.
    pub presence_every: Duration,
    /// Announcements by broadcast and multicast after the two at start.
    pub announce_every: Duration,
    pub expire_after: Duration,
    /// Speak IP Messenger too (on its own socket); `None` for not.
    pub ipmsg: Option<IpmsgConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nick: "anonymous".into(),
            key: None,
            discovery: None,
            retry_base: Duration::from_millis(200),
            tries: 6,
            rate_per_source: 100_000,
            presence_every: Duration::from_secs(30),
            announce_every: Duration::from_secs(120),
            expire_after: Duration::from_secs(95),
            ipmsg: None,
        }
    }
}

/// Which socket a datagram goes out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Chat,
    /// The IP Messenger socket (port 2425): peers answer to the port they know.
    Ipmsg,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
    pub via: Via,
}

/// How a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// To a chat peer: a [`Event::Delivered`] or [`Event::NotDelivered`] follows for this id.
    Reliable(u64),
    /// To a plain peer, as UTF-8 text; nothing follows.
    Plain,
}

/// Why a message was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("message is {0} bytes; the limit is {max}", max = wire::MAX_TEXT)]
    TooLong(usize),
    /// The peer holds as much as it can take; try again, or give up after `stalled`.
    #[error("{to} is not taking messages (its reader is behind); not sent")]
    Busy { to: SocketAddr, stalled: Duration },
    #[error("{0} has not answered as a chat peer with our key; not sent")]
    NotAKeyedPeer(SocketAddr),
    #[error("{to} refused: {}; not sent", why.describe())]
    Refused { to: SocketAddr, why: Refusal },
    #[error("nothing is listening at {0}; not sent")]
    Unreachable(SocketAddr),
    #[error("{0} was a chat peer and is not answering; greeting it again; not sent")]
    Gone(SocketAddr),
    #[error("{0} is not a chat peer or IP Messenger user; it cannot take files")]
    NoFiles(SocketAddr),
    #[error("message is {len} bytes in {encoding} for IP Messenger peer {to}, which takes {max} in one packet; not sent")]
    TooLongForIpmsg {
        to: SocketAddr,
        len: usize,
        max: usize,
        encoding: &'static str,
    },
}

/// How a greeting by hand went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// Still being sent.
    Pending,
    /// The address answered as a chat peer.
    Chat,
    /// The address sent plain text: it gets nothing but the user's text.
    Plain,
    /// The address answered as an IP Messenger client.
    Ipmsg,
    Refused(Refusal),
    Unreachable,
    /// Every greeting went unanswered.
    Unanswered,
}

/// A greeting by hand (chat's hello, or IP Messenger's entry) being sent.
#[derive(Debug)]
struct Hello {
    sent: usize,
    next_at: Instant,
    state: Greeting,
}

/// The greetings to send now, each scheduled for its next send; one sent [`HELLO_WAITS`]
/// times and waited on is unanswered.
fn hellos_due(hellos: &mut BTreeMap<SocketAddr, Hello>, now: Instant) -> Vec<SocketAddr> {
    let mut due = Vec::new();
    for (addr, h) in hellos.iter_mut() {
        if h.state != Greeting::Pending || h.next_at > now {
            continue;
        }
        if h.sent >= HELLO_WAITS.len() {
            h.state = Greeting::Unanswered;
            continue;
        }
        h.next_at = now + HELLO_WAITS[h.sent];
        h.sent += 1;
        due.push(*addr);
    }
    due
}

/// Starts greeting `addr`, within [`HELLOS`]: a full table gives up a greeting that has
/// ended, never one under way (false then, and nothing is started).
fn begin_hello(hellos: &mut BTreeMap<SocketAddr, Hello>, addr: SocketAddr, now: Instant) -> bool {
    if hellos.len() >= HELLOS && !hellos.contains_key(&addr) {
        let ended = hellos
            .iter()
            .find(|(_, h)| h.state != Greeting::Pending)
            .map(|(a, _)| *a);
        match ended {
            Some(a) => {
                hellos.remove(&a);
            }
            None => return false,
        }
    }
    hellos.insert(
        addr,
        Hello {
            sent: 0,
            next_at: now,
            state: Greeting::Pending,
        },
    );
    true
}

/// Counters, shown by `/stats` and `/who`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub received: u64,
    pub duplicates: u64,
    pub retransmits: u64,
    pub rate_limited: u64,
    pub queue_full: u64,
    pub malformed: u64,
    pub unauthenticated: u64,
    pub replayed: u64,
    pub out_of_window: u64,
    pub unverified: u64,
}

impl Stats {
    pub fn summary(&self) -> String {
        format!(
            "received {}, duplicates {}, retransmits {}, dropped: rate limit {}, queue full {}, malformed {}, unauthenticated {}, replayed or stale {}, beyond window {}, unverified address {}",
            self.received,
            self.duplicates,
            self.retransmits,
            self.rate_limited,
            self.queue_full,
            self.malformed,
            self.unauthenticated,
            self.replayed,
            self.out_of_window,
            self.unverified,
        )
    }
}

/// One row of `/who`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub also: Vec<SocketAddr>,
    pub nick: Option<String>,
    pub protocol: Protocol,
    pub last_seen: Duration,
    pub ipmsg: Option<IpmsgUser>,
}

/// What the core holds, for bounds checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub runs: usize,
    pub plain: usize,
    pub held_bytes: usize,
    pub events: usize,
    pub event_bytes: usize,
    pub sources: usize,
    pub tally: usize,
    pub hellos: usize,
    pub sending: usize,
    pub ipmsg_users: usize,
    pub ipmsg_waiting: usize,
}

/// What we know of a source address, for rate limits.
#[derive(Debug)]
struct Source {
    datagrams: TokenBucket,
    challenges: TokenBucket,
}

/// How a datagram goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Binary,
    Text,
}

pub struct Core {
    config: Config,
    timing: Timing,
    instance: u64,
    tokens: hmac::Key,
    /// The key this run seals with, with a shared secret.
    own_key: Option<RunKey>,
    counter: u64,
    /// The id of the next message the user sends (unique for the life of the run).
    next_id: u64,
    /// The packet number of the last file offer to a chat peer.
    next_offer: u64,
    nick: String,
    peers: Peers,
    events: EventQueue,
    tally: Tally,
    joins: TokenBucket,
    /// Rate limits per source, in two generations (see [`RATE_SOURCES`]).
    sources: BTreeMap<SocketAddr, Source>,
    older_sources: BTreeMap<SocketAddr, Source>,
    hellos: BTreeMap<SocketAddr, Hello>,
    /// Addresses of chat peers gone, with when they went (see [`FORMER`]).
    former: BTreeMap<SocketAddr, Instant>,
    started: Instant,
    transmits: VecDeque<Transmit>,
    /// Streams (run, source address) owed an acknowledgement of messages delivered in
    /// order: one cumulative acknowledgement covers every datagram handled before the next
    /// transmit.
    acks_due: BTreeSet<(u64, SocketAddr)>,
    held_total: usize,
    /// Streams with a complete message waiting for room in the user's queue.
    waiting_room: BTreeSet<(u64, SocketAddr)>,
    next_housekeeping: Instant,
    next_presence: Instant,
    next_announce: Instant,
    announced: u32,
    wakeup: Instant,
    stats: Stats,
    ipmsg: Option<Ipmsg>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("instance", &format_args!("{:016x}", self.instance))
            .field("nick", &self.nick)
            .finish_non_exhaustive()
    }
}

fn derive(seed: &[u8; 32], what: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(seed);
    ctx.update(what);
    ctx.finish().as_ref().try_into().expect("32 bytes")
}

/// Shown and answered as the IPv4 address it is, not as `::ffff:a.b.c.d`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Core {
    /// A new run. `seed` must be random (it makes the instance id and the challenge secret).
    pub fn new(mut config: Config, seed: [u8; 32], now: Instant) -> Core {
        let id = derive(&seed, b"instance");
        let instance = u64::from_be_bytes(id[..8].try_into().expect("8 bytes")).max(1);
        let tokens = hmac::Key::new(hmac::HMAC_SHA256, &derive(&seed, b"tokens"));
        let own_key = config.key.as_ref().map(|k| k.for_run(instance));
        let timing = Timing {
            base: config.retry_base.max(Duration::from_millis(1)),
            tries: config.tries.max(1),
        };
        Core {
            nick: wire::truncate_nick(&config.nick).to_string(),
            timing,
            instance,
            tokens,
            own_key,
            counter: 0,
            next_id: 1,
            // From the seed: a restarted run does not reuse the numbers of the last.
            next_offer: u64::from_be_bytes(derive(&seed, b"offers")[..8].try_into().expect("8"))
                >> 16,
            peers: Peers::new(config.key.is_some()),
            events: EventQueue::default(),
            tally: Tally::new(TALLY_INTERVAL),
            joins: TokenBucket::full(JOIN_RATE, JOIN_BURST, now),
            sources: BTreeMap::new(),
            older_sources: BTreeMap::new(),
            hellos: BTreeMap::new(),
            former: BTreeMap::new(),
            started: now,
            transmits: VecDeque::new(),
            acks_due: BTreeSet::new(),
            held_total: 0,
            waiting_room: BTreeSet::new(),
            next_housekeeping: now + HOUSEKEEPING,
            next_presence: now + config.presence_every,
            next_announce: now,
            announced: 0,
            wakeup: now,
            stats: Stats::default(),
            ipmsg: config.ipmsg.take().map(|c| Ipmsg::new(c, now)),
            config,
        }
    }

    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub fn nick(&self) -> &str {
        &self.nick
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn memory(&self) -> Memory {
        let (runs, plain) = self.peers.len();
        Memory {
            runs,
            plain,
            held_bytes: self.held_total,
            events: self.events.len(),
            event_bytes: self.events.bytes(),
            sources: self.sources.len() + self.older_sources.len(),
            tally: self.tally.len(),
            hellos: self.hellos.len(),
            sending: self.peers.runs().map(|r| r.out.pending()).sum(),
            ipmsg_users: self.ipmsg.as_ref().map_or(0, Ipmsg::len),
            ipmsg_waiting: self.ipmsg.as_ref().map_or(0, Ipmsg::waiting),
        }
    }

    // ---- outputs ----

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        for (instance, from) in std::mem::take(&mut self.acks_due) {
            self.ack_stream(instance, from, 0);
        }
        self.transmits.pop_front()
    }

    /// Acknowledges `seq` (0: none) with the state of the stream run `instance` sends us from
    /// `from`, to that address.
    fn ack_stream(&mut self, instance: u64, from: SocketAddr, seq: u64) {
        let (cumulative, window) = match self.peers.run(instance).and_then(|r| r.inc.get(&from)) {
            Some(inc) => (inc.cumulative(), inc.window()),
            None => (0, recv::REORDER),
        };
        let ack = Packet::ack(self.instance, instance, seq, cumulative, window);
        self.send_packet(from, &ack, Form::Binary);
    }

    /// When [`Core::handle_timeout`] next has something to do (it may be early, never late).
    pub fn poll_timeout(&self) -> Instant {
        self.wakeup
    }

    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next event for the user. Taking it makes room: messages held for want of room are
    /// released and their senders told.
    pub fn poll_event(&mut self) -> Option<Event> {
        let (_, event) = self.events.pop()?;
        for (instance, from) in std::mem::take(&mut self.waiting_room) {
            let cumulative = |core: &Core| {
                core.peers
                    .run(instance)
                    .and_then(|r| r.inc.get(&from))
                    .map(|i| i.cumulative())
            };
            let before = cumulative(self);
            self.release(instance, from);
            if cumulative(self) != before {
                self.ack_stream(instance, from, 0);
            }
        }
        Some(event)
    }

    /// Known peers, most recently heard first.
    pub fn peers(&self, now: Instant) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .peers
            .runs()
            .map(|r| PeerInfo {
                addr: r.listed,
                also: r.aliases().collect(),
                nick: Some(r.nick.clone()),
                protocol: Protocol::Chat,
                last_seen: now.saturating_duration_since(r.last_heard),
                ipmsg: None,
            })
            .chain(self.peers.plains().map(|(addr, p)| PeerInfo {
                addr,
                also: Vec::new(),
                nick: None,
                protocol: Protocol::Plain,
                last_seen: now.saturating_duration_since(p.last_heard),
                ipmsg: None,
            }))
            .chain(self.ipmsg_peers(now))
            .collect();
        out.sort_by_key(|p| p.last_seen);
        out
    }

    /// The chat peer `addr` is an address of, as (listed address, nickname).
    pub fn chat_peer(&self, addr: SocketAddr) -> Option<(SocketAddr, &str)> {
        let run = self.peers.run(self.peers.run_at(canonical(addr))?)?;
        Some((run.listed, &run.nick))
    }

    /// How greeting `addr` by hand went (`None`: never greeted).
    pub fn greeting(&self, addr: SocketAddr) -> Option<Greeting> {
        let addr = canonical(addr);
        if self.peers.run_at(addr).is_some() {
            return Some(Greeting::Chat);
        }
        if self.is_ipmsg(addr) {
            return self.ipmsg_greeting(addr);
        }
        self.hellos.get(&addr).map(|h| h.state)
    }

    // ---- inputs ----

    /// Announces this run, when discovery is on. Call once, after [`Core::new`].
    pub fn start(&mut self, now: Instant) {
        self.handle_timeout(now);
    }

    /// Says hello to `addr` directly (an address given by hand, perhaps on another subnet),
    /// a few times until it answers. An address known to speak plain text gets nothing.
    pub fn greet(&mut self, now: Instant, addr: SocketAddr) {
        let addr = canonical(addr);
        if self.is_ipmsg(addr) {
            return self.ipmsg_greet(now, addr);
        }
        if let Some(i) = self.peers.run_at(addr) {
            if let Some(run) = self.peers.run_mut(i) {
                run.by_hand = true;
                if !run.confirmed {
                    // Greeted again by hand: it may not know us yet, so confirm again.
                    run.confirm_sends = 0;
                    run.confirm_at = now;
                    self.handle_timeout(now);
                }
            }
            return;
        }
        // A plain peer gets nothing but the user's text, and a greeting under way is not
        // started again (`--to` and the remembered peers can name one address twice).
        let pending = |h: &Hello| h.state == Greeting::Pending;
        if self.peers.plain(addr).is_some() || self.hellos.get(&addr).is_some_and(pending) {
            return;
        }
        if begin_hello(&mut self.hellos, addr, now) {
            self.handle_timeout(now);
        }
    }

    pub fn set_nick(&mut self, now: Instant, nick: &str) {
        self.nick = wire::truncate_nick(nick).to_string();
        self.presence(now);
        self.ipmsg_absence(now);
    }

    /// Sends `text` to `to`: reliably to a chat peer (at the address it is listed under), as
    /// plain UTF-8 to anything else.
    pub fn send(&mut self, now: Instant, to: SocketAddr, text: &str) -> Result<Sent, SendError> {
        let to = canonical(to);
        if text.len() > wire::MAX_TEXT {
            return Err(SendError::TooLong(text.len()));
        }
        if self.is_ipmsg(to) {
            return self.ipmsg_send(now, to, text);
        }
        if let Some(instance) = self.peers.run_at(to) {
            return self.send_reliable(now, instance, text.as_bytes(), text);
        }
        match self.hellos.get(&to).map(|h| h.state) {
            Some(Greeting::Refused(why)) => return Err(SendError::Refused { to, why }),
            Some(Greeting::Unreachable) => return Err(SendError::Unreachable(to)),
            _ => {}
        }
        if self.former.contains_key(&to) && self.peers.plain(to).is_none() {
            // It spoke our protocol: plain text there would be shown as from a stranger, and
            // unacknowledged. Greet it instead, and let the user send again.
            self.former.remove(&to);
            self.greet(now, to);
            return Err(SendError::Gone(to));
        }
        if self.config.key.is_some() {
            // The user asked for encryption: never fall back to plain text.
            return Err(SendError::NotAKeyedPeer(to));
        }
        self.peers.talked_plain(now, to);
        // The user's text, and from now on nothing else: no more greetings.
        if let Some(h) = self.hellos.get_mut(&to) {
            if h.state == Greeting::Pending {
                h.state = Greeting::Plain;
            }
        }
        self.transmits.push_back(Transmit {
            to,
            bytes: text.as_bytes().to_vec(),
            via: Via::Chat,
        });
        Ok(Sent::Plain)
    }

    /// Sends `payload` (a text, or a control message about files) to run `instance`,
    /// reliably; `shown` is what a not-delivered report quotes.
    fn send_reliable(
        &mut self,
        now: Instant,
        instance: u64,
        payload: &[u8],
        shown: &str,
    ) -> Result<Sent, SendError> {
        let (src, nick) = (self.instance, self.nick.clone());
        let parts = wire::fragments(payload, wire::fragment_size());
        let frags = parts.len() as u16;
        let run = self.peers.run_mut(instance).expect("a known run");
        let to = run.listed;
        let id = run
            .out
            .push(now, self.next_id, shown, parts.len(), |seq, frag| {
                Packet {
                    kind: Kind::Msg,
                    flags: 0,
                    src,
                    dst: instance,
                    body: Body::Msg {
                        seq,
                        base: 0,
                        frag: frag as u16,
                        frags,
                        nick: (frag == 0).then(|| nick.clone()),
                        text: parts[frag].to_vec(),
                    },
                }
                .encode()
            })
            .map_err(|Busy { stalled }| SendError::Busy { to, stalled })?;
        self.next_id += 1;
        run.talked = Some(now);
        self.poll_run(now, instance);
        Ok(Sent::Reliable(id))
    }

    /// Nothing listens at `addr`: an ICMP port unreachable arrived (on a connected socket).
    pub fn handle_unreachable(&mut self, _now: Instant, addr: SocketAddr) {
        let addr = canonical(addr);
        self.ipmsg_unreachable(addr);
        if let Some(h) = self.hellos.get_mut(&addr) {
            if matches!(h.state, Greeting::Pending | Greeting::Unanswered) {
                h.state = Greeting::Unreachable;
                self.events.push(None, Event::Unreachable { to: addr });
            }
        }
    }

    /// Says goodbye to every peer, directly and by announcement.
    pub fn stop(&mut self, now: Instant) {
        let runs: Vec<(SocketAddr, u64)> =
            self.peers.runs().map(|r| (r.listed, r.instance)).collect();
        for (to, instance) in runs {
            self.send_packet(to, &Packet::bye(self.instance, instance), Form::Binary);
        }
        self.announce(Kind::Bye);
        self.ipmsg_exit(now);
    }

    /// Does what is due at `now`: retransmissions, pings, greetings, presence,
    /// announcements, expiry and summaries.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING;
            self.housekeeping(now);
        }
        if self.config.discovery.is_some() && now >= self.next_announce {
            self.announce(Kind::Hello);
            self.announced += 1;
            // Twice at start (an announcement can be lost), then rarely: a plain peer sharing
            // the port sees a line every few minutes, not a flood.
            self.next_announce = now
                + if self.announced < 2 {
                    Duration::from_secs(1)
                } else {
                    self.config.announce_every
                };
        }
        if now >= self.next_presence {
            self.next_presence = now + self.config.presence_every;
            self.presence(now);
        }
        for addr in hellos_due(&mut self.hellos, now) {
            self.send_hello(now, addr);
        }
        self.confirm(now);
        let busy: Vec<u64> = self
            .peers
            .runs()
            .filter(|r| !r.out.is_idle())
            .map(|r| r.instance)
            .collect();
        for instance in busy {
            self.poll_run(now, instance);
        }
        self.ipmsg_timeout(now);
        self.recompute_wakeup();
    }

    /// One datagram from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let from = canonical(from);
        self.stats.received += 1;
        if !self.within_rate(now, from) {
            self.stats.rate_limited += 1;
            return;
        }
        match (wire::decode(bytes), self.config.key.is_some()) {
            (Datagram::Plain, false) => self.plain_text(now, from, bytes),
            (Datagram::Plain, true) => {
                self.stats.unauthenticated += 1;
                self.trouble(
                    now,
                    Some(from),
                    Topic::Unauthenticated,
                    format!("ignored plain text from {from}: this chat uses a key"),
                );
            }
            (Datagram::Malformed(why), _) => {
                self.stats.malformed += 1;
                self.trouble(
                    now,
                    Some(from),
                    Topic::Malformed(why),
                    format!("ignored a malformed datagram from {from}: {why}"),
                );
            }
            (Datagram::Packet { packet, .. }, false) => self.packet(now, from, packet),
            // A refusal cannot be sealed (the refuser cannot seal for us); it only ends a
            // greeting we are waiting on.
            (Datagram::Packet { packet, .. }, true) if packet.kind == Kind::Refused => {
                self.packet(now, from, packet)
            }
            (Datagram::Packet { packet, .. }, true) => {
                self.stats.unauthenticated += 1;
                if packet.kind == Kind::Hello {
                    self.refuse(now, from, Refusal::NeedsKey);
                }
                self.trouble(
                    now,
                    Some(from),
                    Topic::Unauthenticated,
                    format!("{from} speaks the chat protocol without our key; ignored"),
                );
            }
            (Datagram::Sealed { text_form, .. }, false) => {
                self.stats.unauthenticated += 1;
                if text_form {
                    self.refuse(now, from, Refusal::HasNoKey);
                }
                self.trouble(
                    now,
                    Some(from),
                    Topic::Unauthenticated,
                    format!("{from} speaks the chat protocol with a key, and this chat has none; ignored"),
                );
            }
            (Datagram::Sealed { bytes, text_form }, true) => {
                self.sealed(now, from, &bytes, text_form)
            }
        }
    }

    // ---- receiving ----

    fn within_rate(&mut self, now: Instant, from: SocketAddr) -> bool {
        let rate = f64::from(self.config.rate_per_source.max(1));
        if !self.sources.contains_key(&from) {
            let source = match self.older_sources.remove(&from) {
                Some(s) => s,
                None => Source {
                    datagrams: TokenBucket::full(rate, rate, now),
                    challenges: TokenBucket::full(CHALLENGE_RATE, CHALLENGE_BURST, now),
                },
            };
            if self.sources.len() >= RATE_SOURCES {
                self.older_sources = std::mem::take(&mut self.sources);
            }
            self.sources.insert(from, source);
        }
        self.sources
            .get_mut(&from)
            .is_some_and(|s| s.datagrams.try_take(now, 1.0))
    }

    /// True if one more challenge or refusal may go to `to` now.
    fn may_answer(&mut self, now: Instant, to: SocketAddr) -> bool {
        self.sources
            .get_mut(&to)
            .is_some_and(|s| s.challenges.try_take(now, 1.0))
    }

    fn plain_text(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.peers.heard_plain(now, from);
        if let Some(h) = self.hellos.get_mut(&from) {
            h.state = Greeting::Plain;
        }
        let text = String::from_utf8_lossy(bytes).into_owned();
        let message = Event::Message {
            from,
            nick: None,
            text,
            protocol: Protocol::Plain,
        };
        self.offer_from(now, from, message);
    }

    /// A message (or offer) from a sender that does not wait for room (a plain peer, an
    /// IPMsg user), into its share of the user's queue; false (counted, and told once per
    /// interval) when the share is full.
    fn offer_from(&mut self, now: Instant, from: SocketAddr, event: Event) -> bool {
        if self.events.offer(from, event) {
            return true;
        }
        self.stats.queue_full += 1;
        self.trouble(
            now,
            Some(from),
            Topic::Dropped,
            format!("dropped messages from {from}: it sends faster than they are read"),
        );
        false
    }

    /// One occurrence of repeated trouble: a notice for the first of an interval.
    fn trouble(&mut self, now: Instant, source: Option<SocketAddr>, topic: Topic, text: String) {
        if self.tally.note(now, source, topic) {
            self.notice(source, text);
        }
    }

    /// Notices share one part of the queue, apart from every source: a source whose own
    /// share is full is exactly the one to tell the user about. The tally keeps them few.
    fn notice(&mut self, _about: Option<SocketAddr>, text: String) {
        let notices = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        self.events.offer(notices, Event::Notice(text));
    }

    fn sealed(&mut self, now: Instant, from: SocketAddr, bytes: &[u8], text_form: bool) {
        let Some(src) = seal::sealed_by(bytes) else {
            self.stats.malformed += 1;
            return;
        };
        let opened = match self.peers.run(src).and_then(|r| r.key.as_ref()) {
            Some(k) => k.open(bytes),
            None => self
                .config
                .key
                .as_ref()
                .expect("sealed only with a key")
                .for_run(src)
                .open(bytes),
        };
        let Ok((counter, inner)) = opened else {
            self.stats.unauthenticated += 1;
            if text_form {
                self.refuse(now, from, Refusal::NeedsKey);
            }
            self.trouble(
                now,
                Some(from),
                Topic::Unauthenticated,
                format!("{from} speaks the chat protocol with another key; ignored"),
            );
            return;
        };
        let packet = match wire::decode(&inner) {
            Datagram::Packet {
                packet,
                text_form: false,
            } if packet.src == src => packet,
            _ => {
                self.stats.malformed += 1;
                return;
            }
        };
        // The counter is checked (and used up) only for a verified address of the run: a copy
        // raced from elsewhere must not make the genuine datagram look replayed.
        let verified = self.peers.run_at(from) == Some(src);
        let known = self.peers.run(src).is_some();
        if verified {
            if let Some(run) = self.peers.run_mut(src) {
                if !run.replay.accept(counter) {
                    self.stats.replayed += 1;
                    return;
                }
            }
        }
        self.packet(now, from, packet);
        if !verified && self.peers.run_at(from) == Some(src) {
            if let Some(run) = self.peers.run_mut(src) {
                if known {
                    run.replay.accept(counter);
                } else {
                    run.replay.start_after(counter);
                }
            }
        }
    }

    fn packet(&mut self, now: Instant, from: SocketAddr, p: Packet) {
        if p.src == self.instance {
            return; // our own announcement, come back
        }
        if p.src == 0 {
            self.stats.malformed += 1;
            return;
        }
        let to_us = p.dst == self.instance;
        if p.dst != 0 && !to_us {
            // For an earlier run of ours, or another receiver: recorded and sent again, or a
            // peer that has not heard we restarted. Tell the sender who we are now.
            self.stats.replayed += 1;
            if !matches!(p.kind, Kind::Bye | Kind::Refused) {
                self.challenge(now, from, p.src, 0);
            }
            return;
        }
        let verified = self.peers.run_at(from) == Some(p.src);
        let sealed = self.config.key.is_some();
        let listed = self.peers.run(p.src).is_some_and(|r| r.listed == from);
        if verified {
            if let Some(run) = self.peers.run_mut(p.src) {
                run.heard(now, from, sealed);
                if matches!(p.kind, Kind::Msg | Kind::Ack | Kind::Ping) {
                    run.confirmed = true;
                }
            }
        }
        match (p.kind, p.body) {
            (Kind::Hello | Kind::Reply | Kind::Presence, Body::Greeting { token, echo, nick }) => {
                self.greeting_in(now, from, p.kind, p.flags, p.src, to_us, token, echo, &nick)
            }
            (Kind::Bye, Body::Empty) if verified => self.bye(from, p.src),
            (Kind::Refused, Body::Refused(why)) => {
                if let Some(h) = self.hellos.get_mut(&from) {
                    if matches!(h.state, Greeting::Pending | Greeting::Unanswered) {
                        h.state = Greeting::Refused(why);
                        self.events.push(None, Event::Refused { to: from, why });
                    }
                }
            }
            (Kind::Msg | Kind::Ack | Kind::Ping, _) if !verified || !to_us => {
                self.stats.unverified += 1;
                self.challenge(now, from, p.src, 0);
            }
            (
                Kind::Msg,
                Body::Msg {
                    seq,
                    base,
                    frag,
                    frags,
                    nick,
                    text,
                },
            ) => self.msg(now, from, p.src, seq, base, frag, frags, nick, text),
            // What we send a run goes to its listed address, and is acknowledged from there;
            // without a key, an alias saying otherwise is not believed.
            (
                Kind::Ack,
                Body::Ack {
                    seq,
                    cumulative,
                    window,
                },
            ) if listed || sealed => self.ack_in(now, p.src, seq, cumulative, window),
            (Kind::Ping, Body::Empty) => self.ack_stream(p.src, from, 0),
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn greeting_in(
        &mut self,
        now: Instant,
        from: SocketAddr,
        kind: Kind,
        flags: u8,
        src: u64,
        to_us: bool,
        token: u64,
        echo: u64,
        nick: &str,
    ) {
        let was_verified = self.peers.run_at(from) == Some(src);
        if !was_verified && echo != 0 && self.echoes(now, from, echo) {
            self.verify(now, from, src, nick, token);
        }
        let verified = self.peers.run_at(from) == Some(src);
        let verified_us = flags & wire::FLAG_VERIFIED != 0;
        let sealed = self.config.key.is_some();
        if verified {
            if let Some(run) = self.peers.run_mut(src) {
                run.heard(now, from, sealed);
                // Without a key only the listed address names the run.
                if run.nick != nick && (sealed || run.listed == from) {
                    run.nick = nick.to_string();
                }
                if token != 0 {
                    run.their_token = token;
                }
                // Only a peer that verified our address sends a presence, a verified reply
                // or a hello naming us.
                if match kind {
                    Kind::Reply => verified_us,
                    Kind::Presence => true,
                    _ => to_us,
                } {
                    run.confirmed = true;
                }
            }
        } else if kind == Kind::Presence {
            self.stats.unverified += 1;
        }
        match kind {
            // It does not know us yet, or we do not know it.
            Kind::Hello if !to_us || !verified => self.challenge(now, from, src, token),
            // It has not verified our address yet.
            Kind::Reply if !verified_us => self.challenge(now, from, src, token),
            // The handshake is complete on both sides: say so, or it keeps confirming.
            Kind::Reply if verified && self.may_answer(now, from) => {
                self.presence_to(now, from, src)
            }
            // It knows us and we lost it (we expired it after a partition).
            Kind::Presence if !verified => self.challenge(now, from, src, token),
            _ => {}
        }
    }

    /// Answers `from` with our challenge (and its token echoed), rate limited per source.
    fn challenge(&mut self, now: Instant, from: SocketAddr, src: u64, their_token: u64) {
        if !self.may_answer(now, from) {
            return;
        }
        let verified = self.peers.run_at(from) == Some(src);
        let mut reply = Packet::greeting(
            Kind::Reply,
            self.instance,
            src,
            self.token(now, from),
            their_token,
            &self.nick,
        );
        if verified {
            reply.flags = wire::FLAG_VERIFIED;
        }
        let form = if verified { Form::Binary } else { Form::Text };
        self.send_packet(from, &reply, form);
    }

    fn refuse(&mut self, now: Instant, to: SocketAddr, why: Refusal) {
        if self.may_answer(now, to) {
            let bytes = Packet::refused(self.instance, why).encode();
            // Never sealed: the other side cannot open our seal.
            self.transmits.push_back(Transmit {
                to,
                bytes: wire::text_form(Kind::Refused, None, &bytes),
                via: Via::Chat,
            });
        }
    }

    /// `addr` echoed our challenge as run `instance`, which challenged us with `token`.
    fn verify(&mut self, now: Instant, addr: SocketAddr, instance: u64, nick: &str, token: u64) {
        let key = self.config.key.as_ref();
        let (verified, gone) = self.peers.verify(now, addr, instance, nick, token, || {
            key.map(|k| k.for_run(instance))
        });
        for run in gone {
            self.gone(run, false);
        }
        match verified {
            Verified::New => {
                let by_hand = self
                    .hellos
                    .get(&addr)
                    .is_some_and(|h| h.state != Greeting::Plain);
                if let Some(h) = self.hellos.get_mut(&addr) {
                    h.state = Greeting::Chat;
                }
                let join = Event::Join {
                    addr,
                    nick: nick.to_string(),
                    protocol: Protocol::Chat,
                    ipmsg: None,
                };
                let show = self.show_join(now, addr, join);
                let confirm_at = now + self.timing.base;
                if let Some(run) = self.peers.run_mut(instance) {
                    run.shown = show;
                    run.by_hand = by_hand;
                    run.confirm_at = confirm_at;
                }
                self.former.remove(&addr);
                self.arm(confirm_at);
            }
            Verified::Full => {
                self.trouble(
                    now,
                    None,
                    Topic::TableFull,
                    format!("not adding {addr}: the peers table is full of peers in conversations"),
                );
            }
            Verified::Alias | Verified::Known => {}
        }
    }

    /// Tells the user of a join, true if shown: one join per address per interval (a
    /// restart loop is one line), and a budget for all of them (a thousand hosts starting at
    /// once are a summary).
    fn show_join(&mut self, now: Instant, addr: SocketAddr, join: Event) -> bool {
        let first_here = self.tally.note(now, Some(addr), Topic::Joins);
        let show = first_here && self.joins.try_take(now, 1.0) && self.events.offer(addr, join);
        if first_here && !show {
            self.trouble(
                now,
                None,
                Topic::Joins,
                "peers are joining faster than they can be shown; /who lists them".into(),
            );
        }
        show
    }

    /// A run is gone (left, expired or replaced by a new run at its address): what we had
    /// for it was not delivered, and the user is told it left if it was told it joined.
    fn gone(&mut self, mut run: peers::Run, expired: bool) {
        self.held_total -= run.held_bytes();
        self.waiting_room.retain(|(i, _)| *i != run.instance);
        for (addr, _) in &run.paths {
            if self.former.len() >= FORMER {
                if let Some(oldest) = self.former.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a) {
                    self.former.remove(&oldest);
                }
            }
            self.former.insert(*addr, run.last_heard);
        }
        for (id, text) in run.out.give_up() {
            self.events.push(
                None,
                Event::NotDelivered {
                    to: run.listed,
                    nick: Some(run.nick.clone()),
                    id,
                    text,
                },
            );
        }
        if run.shown {
            self.events.push(
                Some(run.listed),
                Event::Leave {
                    addr: run.listed,
                    nick: run.nick,
                    expired,
                    protocol: Protocol::Chat,
                },
            );
        }
    }

    /// A goodbye from a verified address: the run leaves if it is its listed address; an
    /// alias saying goodbye is only an address going away.
    fn bye(&mut self, from: SocketAddr, instance: u64) {
        let Some(run) = self.peers.run(instance) else {
            return;
        };
        if run.listed == from {
            if let Some(run) = self.peers.remove(instance) {
                self.gone(run, false);
            }
        } else {
            self.held_total -= self.peers.drop_alias(instance, from);
            self.waiting_room.remove(&(instance, from));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn msg(
        &mut self,
        now: Instant,
        from: SocketAddr,
        instance: u64,
        seq: u64,
        base: u64,
        frag: u16,
        frags: u16,
        nick: Option<String>,
        text: Vec<u8>,
    ) {
        let budget = HELD_BUDGET.saturating_sub(self.held_total);
        let Some(run) = self.peers.run_mut(instance) else {
            return;
        };
        run.talked = Some(now);
        let before = run.held_bytes();
        let inc = run.inc.entry(from).or_default();
        inc.skip_to(base);
        // The datagrams of the next message are always taken, so that every stream can make
        // progress however full the budget is.
        let next = inc.cumulative() + 1;
        let in_next = seq >= next && seq - next < u64::from(wire::MAX_FRAGS);
        let budget = if in_next { usize::MAX } else { budget };
        let offer = inc.offer(seq, frag, frags, nick, text, budget);
        let delivered = inc.cumulative();
        self.held_total = self.held_total + run.held_bytes() - before;
        match offer {
            Offer::Duplicate => self.stats.duplicates += 1,
            Offer::Refused => self.stats.out_of_window += 1,
            Offer::Held => self.release(instance, from),
        }
        let delivered = self
            .peers
            .run(instance)
            .and_then(|r| r.inc.get(&from))
            .map_or(delivered, |i| i.cumulative());
        if offer == Offer::Held && seq <= delivered {
            // Delivered in order: the cumulative acknowledgement says so, once per batch.
            self.acks_due.insert((instance, from));
            return;
        }
        let acked = if offer == Offer::Refused { 0 } else { seq };
        self.ack_stream(instance, from, acked);
    }

    /// Gives the user every message run `instance` sent from `from` that is complete and in
    /// order, while there is room for it. Shown as from the address it came from.
    fn release(&mut self, instance: u64, from: SocketAddr) {
        let Some(run) = self.peers.run_mut(instance) else {
            return;
        };
        let nick = run.nick.clone();
        let before = run.held_bytes();
        let Some(inc) = run.inc.get_mut(&from) else {
            return;
        };
        while self.events.room(from) > 0 {
            let Some(c) = inc.take() else {
                break;
            };
            let nick = c.nick.unwrap_or_else(|| nick.clone());
            let (event, malformed) = offers::chat_message(from, nick, c.text);
            self.stats.malformed += u64::from(malformed);
            self.events.push(Some(from), event);
        }
        if inc.ready() {
            self.waiting_room.insert((instance, from));
        }
        self.held_total = self.held_total + run.held_bytes() - before;
    }

    fn ack_in(&mut self, now: Instant, instance: u64, seq: u64, cumulative: u64, window: u64) {
        let Some(run) = self.peers.run_mut(instance) else {
            return;
        };
        let to = run.listed;
        for id in run.out.on_ack(now, seq, cumulative, window) {
            self.events.push(None, Event::Delivered { to, id });
        }
        self.poll_run(now, instance);
    }

    /// Sends what run `instance`'s stream has due, and reports what it gave up.
    fn poll_run(&mut self, now: Instant, instance: u64) {
        let Some(run) = self.peers.run_mut(instance) else {
            return;
        };
        let to = run.listed;
        let due = run.out.poll(now, self.timing);
        let nick = run.nick.clone();
        let idle = run.out.is_idle();
        self.stats.retransmits += due.retransmits;
        for bytes in due.send {
            self.seal_out(to, bytes, Kind::Msg, Form::Binary);
        }
        if due.ping {
            // Any datagram from the run is a sign of life; the answer also brings its window.
            self.send_packet(to, &Packet::ping(self.instance, instance), Form::Binary);
        }
        for (id, text) in due.dead {
            self.events.push(
                None,
                Event::NotDelivered {
                    to,
                    nick: Some(nick.clone()),
                    id,
                    text,
                },
            );
        }
        if !idle {
            self.arm(now + self.timing.base);
        }
    }

    // ---- sending ----

    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / TOKEN_EPOCH.as_secs()
    }

    /// The challenge for `addr` in `epoch`: a MAC of the address under this run's secret, so
    /// it costs no state and no one elsewhere can compute it.
    fn token_in(&self, epoch: u64, addr: SocketAddr) -> u64 {
        let mut bytes = Vec::with_capacity(27);
        match addr.ip() {
            IpAddr::V4(ip) => bytes.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => bytes.extend_from_slice(&ip.octets()),
        }
        bytes.extend_from_slice(&addr.port().to_be_bytes());
        bytes.extend_from_slice(&epoch.to_be_bytes());
        let tag = hmac::sign(&self.tokens, &bytes);
        u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("8 bytes")).max(1)
    }

    fn token(&self, now: Instant, addr: SocketAddr) -> u64 {
        self.token_in(self.epoch(now), addr)
    }

    /// True when `echo` is the challenge we sent `addr` in this epoch or the one before.
    fn echoes(&self, now: Instant, addr: SocketAddr, echo: u64) -> bool {
        let epoch = self.epoch(now);
        echo == self.token_in(epoch, addr)
            || epoch
                .checked_sub(1)
                .is_some_and(|e| echo == self.token_in(e, addr))
    }

    fn send_hello(&mut self, now: Instant, addr: SocketAddr) {
        let hello = Packet::greeting(
            Kind::Hello,
            self.instance,
            0,
            self.token(now, addr),
            0,
            &self.nick,
        );
        self.send_packet(addr, &hello, Form::Text);
    }

    /// Presence to every verified address of every peer: each address of a dual-stack peer
    /// then hears from us, and answers from the matching address of ours.
    fn presence(&mut self, now: Instant) {
        let paths: Vec<(SocketAddr, u64)> = self
            .peers
            .runs()
            .flat_map(|r| r.paths.iter().map(move |(a, _)| (*a, r.instance)))
            .collect();
        for (to, instance) in paths {
            self.presence_to(now, to, instance);
        }
    }

    fn presence_to(&mut self, now: Instant, to: SocketAddr, instance: u64) {
        let p = Packet::greeting(
            Kind::Presence,
            self.instance,
            instance,
            self.token(now, to),
            0,
            &self.nick,
        );
        self.send_packet(to, &p, Form::Binary);
    }

    /// Sends our confirmation again to runs that have not shown they verified us: the last
    /// datagram of a handshake is lost like any other.
    fn confirm(&mut self, now: Instant) {
        let due: Vec<(SocketAddr, u64, u64)> = self
            .peers
            .runs_mut()
            .filter(|r| !r.confirmed && r.confirm_at <= now && r.confirm_sends < self.timing.tries)
            .map(|r| {
                r.confirm_sends += 1;
                r.confirm_at = now + self.timing.backoff(r.confirm_sends);
                (r.listed, r.instance, r.their_token)
            })
            .collect();
        for (to, instance, their_token) in due {
            let mut reply = Packet::greeting(
                Kind::Reply,
                self.instance,
                instance,
                self.token(now, to),
                their_token,
                &self.nick,
            );
            reply.flags = wire::FLAG_VERIFIED;
            self.send_packet(to, &reply, Form::Binary);
        }
    }

    /// Broadcast and multicast in every family announced, IPv4 first (a dual-stack peer
    /// then usually lists us under our IPv4 address rather than a link-local one).
    fn announce(&mut self, kind: Kind) {
        let Some(d) = self.config.discovery else {
            return;
        };
        let packet = match kind {
            Kind::Bye => Packet::bye(self.instance, 0),
            _ => Packet::greeting(kind, self.instance, 0, 0, 0, &self.nick),
        };
        let mut to = Vec::new();
        if d.ipv4 {
            to.push(SocketAddr::from((Ipv4Addr::BROADCAST, d.port)));
            to.push(SocketAddr::from((MULTICAST_V4, d.port)));
        }
        if d.ipv6 {
            to.push(SocketAddr::from((ALL_NODES_V6, d.port)));
        }
        for addr in to {
            self.send_packet(addr, &packet, Form::Text);
        }
    }

    fn send_packet(&mut self, to: SocketAddr, packet: &Packet, form: Form) {
        self.seal_out(to, packet.encode(), packet.kind, form);
    }

    /// Seals a binary datagram when there is a key, wraps it in the text form when asked,
    /// and queues it.
    fn seal_out(&mut self, to: SocketAddr, binary: Vec<u8>, kind: Kind, form: Form) {
        let bytes = match &self.own_key {
            Some(key) => {
                self.counter += 1;
                key.seal(self.instance, self.counter, &binary)
            }
            None => binary,
        };
        let bytes = match form {
            Form::Binary => bytes,
            // With a key the nickname stays inside the seal.
            Form::Text => wire::text_form(
                kind,
                self.own_key.is_none().then_some(self.nick.as_str()),
                &bytes,
            ),
        };
        self.transmits.push_back(Transmit {
            to,
            bytes,
            via: Via::Chat,
        });
    }

    // ---- time ----

    fn housekeeping(&mut self, now: Instant) {
        let (gone, freed) = self.peers.expire(now, self.config.expire_after);
        self.held_total -= freed;
        for run in gone {
            self.gone(run, true);
        }
        let secs = TALLY_INTERVAL.as_secs();
        for (source, topic, more) in self.tally.flush(now) {
            let from = source.map_or("other sources".to_string(), |s| s.to_string());
            let text = match topic {
                Topic::Malformed(_) => {
                    format!("{more} more malformed datagrams from {from} in the last {secs}s")
                }
                Topic::Dropped => format!(
                    "{more} more messages from {from} dropped (read too slowly) in the last {secs}s"
                ),
                Topic::Joins => match source {
                    Some(s) => format!("{more} more runs joined from {s} in the last {secs}s"),
                    None => {
                        format!("{more} more peers joined in the last {secs}s; /who lists them")
                    }
                },
                Topic::Unauthenticated => {
                    format!("{more} more datagrams without our key from {from} in the last {secs}s")
                }
                Topic::TableFull => {
                    format!("{more} more peers not added (the table is full) in the last {secs}s")
                }
                Topic::IpmsgMalformed(_) => format!(
                    "{more} more malformed IP Messenger packets from {from} in the last {secs}s"
                ),
                Topic::ForgedExit => format!(
                    "{more} more exits from {from} followed by more packets in the last {secs}s"
                ),
            };
            self.notice(source, text);
        }
    }

    fn arm(&mut self, at: Instant) {
        self.wakeup = self.wakeup.min(at);
    }

    fn recompute_wakeup(&mut self) {
        let mut next = self.next_housekeeping.min(self.next_presence);
        if self.config.discovery.is_some() {
            next = next.min(self.next_announce);
        }
        for h in self.hellos.values() {
            if h.state == Greeting::Pending {
                next = next.min(h.next_at);
            }
        }
        if let Some(t) = self.ipmsg_next_deadline() {
            next = next.min(t);
        }
        for run in self.peers.runs() {
            if let Some(t) = run.out.next_timer(self.timing) {
                next = next.min(t);
            }
            if !run.confirmed && run.confirm_sends < self.timing.tries {
                next = next.min(run.confirm_at);
            }
        }
        self.wakeup = next;
    }
}

#[cfg(test)]
mod tests;
