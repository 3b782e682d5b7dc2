//! A chat node on one UDP socket: a receive coroutine that decodes, authenticates, rate
//! limits, acknowledges, orders and reassembles what arrives; a housekeeping coroutine that
//! retransmits unacknowledged datagrams with backoff, refreshes presence and expires silent
//! peers; and `send` for the user's side. Everything the user should see is an [`Event`].

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use may::net::UdpSocket;
use may::sync::mpsc;

use crate::peers::{Peer, Peers, Protocol};
use crate::seal::{Key, ReplayWindow};
use crate::wire::{self, Datagram, Kind, Packet};

/// IPv4 multicast group for discovery (administratively scoped).
pub const MULTICAST_V4: Ipv4Addr = Ipv4Addr::new(239, 255, 75, 84);
/// IPv6 all-nodes link-local group: every IPv6 host on the link is in it.
const ALL_NODES_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The address families a socket speaks, so the ones announced to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Families {
    V4,
    V6,
    /// `::` without IPV6_V6ONLY: IPv4 too.
    Both,
}

impl Families {
    fn of(socket: &UdpSocket) -> io::Result<Families> {
        Ok(match socket.local_addr()? {
            SocketAddr::V4(_) => Families::V4,
            SocketAddr::V6(a)
                if a.ip().is_unspecified()
                    && !socket2::SockRef::from(socket.inner()).only_v6()? =>
            {
                Families::Both
            }
            SocketAddr::V6(_) => Families::V6,
        })
    }
}

/// How the node behaves; `Default` is what the `chat` binary uses.
#[derive(Debug)]
pub struct Config {
    pub nick: String,
    pub key: Option<Key>,
    /// Announce by broadcast and multicast on this port; `None` turns discovery off.
    pub discovery_port: Option<u16>,
    /// First retransmission after this long; doubled each time.
    pub retry_base: Duration,
    /// Sends of one datagram before it is reported as not delivered.
    pub tries: u32,
    /// Datagrams per second accepted from one source address (and as many in a burst).
    pub rate_per_source: u32,
    pub presence_every: Duration,
    pub expire_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nick: "anonymous".into(),
            key: None,
            discovery_port: None,
            retry_base: Duration::from_millis(200),
            tries: 6,
            rate_per_source: 100_000,
            presence_every: Duration::from_secs(30),
            expire_after: Duration::from_secs(95),
        }
    }
}

/// What the user sees.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `nick` is `None` for a plain peer. Text is as received: escape it before printing.
    Message {
        from: SocketAddr,
        nick: Option<String>,
        text: String,
    },
    Join {
        addr: SocketAddr,
        nick: String,
    },
    Leave {
        addr: SocketAddr,
        nick: String,
        expired: bool,
    },
    Delivered {
        to: SocketAddr,
        id: u64,
    },
    NotDelivered {
        to: SocketAddr,
        nick: Option<String>,
        id: u64,
        text: String,
    },
    /// Something about the network worth a line (a malformed datagram, say).
    Notice(String),
}

/// Counters, shown by `/stats` and `/who`.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub duplicates: AtomicU64,
    pub retransmits: AtomicU64,
    pub rate_limited: AtomicU64,
    pub queue_full: AtomicU64,
    pub malformed: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub replayed: AtomicU64,
    pub out_of_window: AtomicU64,
}

impl Stats {
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "received {}, duplicates {}, retransmits {}, dropped: rate limit {}, queue full {}, malformed {}, unauthenticated {}, replayed {}, beyond window {}",
            g(&self.received),
            g(&self.duplicates),
            g(&self.retransmits),
            g(&self.rate_limited),
            g(&self.queue_full),
            g(&self.malformed),
            g(&self.unauthenticated),
            g(&self.replayed),
            g(&self.out_of_window),
        )
    }
}

/// Events waiting for the user beyond this many are dropped (and counted).
const EVENT_QUEUE: usize = 10_000;
/// Events from one source waiting for the user: a flooding source fills its own share, not
/// the queue, so other peers' messages still get through.
const SOURCE_QUEUE: usize = 4096;
/// Out-of-order datagrams held per sender while a gap is filled.
const REORDER_WINDOW: u64 = 1024;
/// Unacknowledged datagrams per destination before `send` waits, and the receive window a
/// sender assumes before the first acknowledgement tells it the real one.
const SEND_WINDOW: usize = 4096;
/// The congestion window a destination starts with, and the least it shrinks to: datagrams in
/// flight. A burst larger than the receiver's socket buffer (a few hundred small datagrams by
/// default) is mostly lost, and retransmitting all of it at once is lost again.
const INITIAL_CWND: usize = 64;
const MIN_CWND: usize = 8;
/// A sender told it has less room than this is sent window updates as the user catches up.
const LOW_ROOM: usize = SOURCE_QUEUE / 2;
/// Sources tracked by the rate limiter before it starts afresh.
const RATE_SOURCES: usize = 4096;

struct Pending {
    plain: Vec<u8>,
    tries: u32,
    next_at: Instant,
    message: u64,
    /// Turned away by a receiver short of room: it is alive, so waiting for room costs no try.
    parked: bool,
}

/// What this node sends to one destination.
struct Outgoing {
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    /// Message id (its first seq) → (fragments unacknowledged, text).
    messages: HashMap<u64, (usize, String)>,
    /// The receive window: the highest sequence the destination said it has room for.
    limit: u64,
    last_ack: Instant,
    /// Datagrams allowed in flight: one more per acknowledgement (doubling each round trip),
    /// halved when a round of retransmissions shows loss.
    cwnd: usize,
    /// No further halving before this: one loss burst is retransmitted over several ticks,
    /// and should cost one halving, not one per tick.
    next_cut: Instant,
}

impl Outgoing {
    fn new() -> Outgoing {
        Outgoing {
            next_seq: 1,
            pending: BTreeMap::new(),
            messages: HashMap::new(),
            limit: SEND_WINDOW as u64,
            last_ack: Instant::now(),
            cwnd: INITIAL_CWND,
            next_cut: Instant::now(),
        }
    }

    /// Retransmissions at `now` showed loss: halve the window, once per `round` (the first
    /// retransmission wait, a round trip and more).
    fn lost(&mut self, now: Instant, round: Duration) {
        if now >= self.next_cut {
            self.cwnd = (self.cwnd / 2).max(MIN_CWND);
            self.next_cut = now + round;
        }
    }

    /// True while `datagrams` more would overrun the destination. With nothing in flight and
    /// no acknowledgement for `probe_after`, one message goes anyway: its acknowledgement
    /// brings a fresh window if a window update was lost.
    fn must_wait(&self, datagrams: usize, probe_after: Duration) -> bool {
        if self.pending.len() >= self.cwnd {
            return true;
        }
        let over = self.next_seq + datagrams as u64 - 1 > self.limit;
        over && !(self.pending.is_empty() && self.last_ack.elapsed() >= probe_after)
    }

    fn base(&self) -> u64 {
        self.pending.keys().next().copied().unwrap_or(self.next_seq)
    }
}

/// What this node receives from one sender instance.
#[derive(Default)]
struct Incoming {
    expected: Option<u64>,
    held: BTreeMap<u64, Packet>,
    assembling: Vec<u8>,
    /// After a gap was skipped: drop fragments until the first of a new message.
    resync: bool,
    last: Option<Instant>,
}

impl Incoming {
    /// The sender gave up on everything below `base`: move past it.
    fn skip_to(&mut self, base: u64) {
        let expected = self.expected.get_or_insert(base.max(1));
        if base > *expected {
            *expected = base;
            self.held.retain(|&seq, _| seq >= base);
            self.assembling.clear();
            self.resync = true;
        }
    }
}

struct Inner {
    socket: UdpSocket,
    families: Families,
    instance: u64,
    config: Config,
    nick: Mutex<String>,
    peers: Mutex<Peers>,
    outgoing: Mutex<HashMap<SocketAddr, Outgoing>>,
    /// Keyed by where a sender's stream comes from and its instance: a run that is sent to
    /// at two of our addresses keeps two streams.
    incoming: Mutex<HashMap<(SocketAddr, u64), Incoming>>,
    replay: Mutex<HashMap<u64, ReplayWindow>>,
    rate: Mutex<HashMap<SocketAddr, (f64, Instant)>>,
    /// Senders last told they have little room: source → (their instance, room told).
    low_window: Mutex<HashMap<SocketAddr, (u64, usize)>>,
    counter: AtomicU64,
    queued: Arc<Queued>,
    events: mpsc::Sender<(Option<SocketAddr>, Event)>,
    stats: Stats,
    stopped: may::sync::SyncFlag,
}

/// A running node. Dropping it does not stop it; call [`Node::stop`].
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// Events waiting for the user, in all and per source.
#[derive(Default)]
struct Queued {
    total: AtomicUsize,
    by_source: Mutex<HashMap<SocketAddr, usize>>,
}

impl Queued {
    /// Messages from `from` that fit before its share or the whole queue is full.
    fn room(&self, from: SocketAddr) -> usize {
        let mine = lock(&self.by_source).get(&from).copied().unwrap_or(0);
        let total = self.total.load(Ordering::Relaxed);
        SOURCE_QUEUE
            .saturating_sub(mine)
            .min(EVENT_QUEUE.saturating_sub(total))
    }

    fn has_room(&self, from: SocketAddr) -> bool {
        self.room(from) > 0
    }

    fn taken(&self, from: Option<SocketAddr>) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(from) = from {
            let mut by = lock(&self.by_source);
            if let Some(n) = by.get_mut(&from) {
                *n -= 1;
                if *n == 0 {
                    by.remove(&from);
                }
            }
        }
    }
}

/// The user's end of the event stream.
pub struct Events {
    rx: mpsc::Receiver<(Option<SocketAddr>, Event)>,
    queued: Arc<Queued>,
}

impl Events {
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        let (from, e) = self.rx.recv_timeout(timeout).ok()?;
        self.queued.taken(from);
        Some(e)
    }

    pub fn recv(&self) -> Option<Event> {
        let (from, e) = self.rx.recv().ok()?;
        self.queued.taken(from);
        Some(e)
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_recv(&self) -> Option<Event> {
        let (from, e) = self.rx.try_recv().ok()?;
        self.queued.taken(from);
        Some(e)
    }
}

/// How a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// To a `chat` peer; an acknowledgement (or a not-delivered event) follows for this id.
    Reliable(u64),
    /// To a plain peer, as UTF-8 text; nothing follows.
    Plain,
}

impl Node {
    /// Starts a node on an already-bound socket.
    pub fn start(socket: UdpSocket, config: Config) -> io::Result<(Node, Events)> {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(Queued::default());
        let instance = loop {
            let id = fastrand::u64(..);
            if id != 0 {
                break id;
            }
        };
        let families = Families::of(&socket)?;
        if config.discovery_port.is_some() && families != Families::V6 {
            socket.set_broadcast(true)?;
            // Best effort: a host without a multicast route still gets broadcasts.
            let _ = socket.join_multicast_v4(&MULTICAST_V4, &Ipv4Addr::UNSPECIFIED);
        }
        let inner = Arc::new(Inner {
            socket,
            families,
            instance,
            nick: Mutex::new(config.nick.clone()),
            config,
            peers: Mutex::new(Peers::new(1024)),
            outgoing: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            replay: Mutex::new(HashMap::new()),
            rate: Mutex::new(HashMap::new()),
            low_window: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(1),
            queued: queued.clone(),
            events: tx,
            stats: Stats::default(),
            stopped: may::sync::SyncFlag::new(),
        });
        let node = Node { inner };
        let receiver = node.clone();
        corokit_common::spawn(move || receiver.receive_loop()).map_err(io::Error::other)?;
        let keeper = node.clone();
        corokit_common::spawn(move || keeper.housekeeping()).map_err(io::Error::other)?;
        node.announce(Kind::Hello);
        Ok((node, Events { rx, queued }))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.socket.local_addr()
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    pub fn nick(&self) -> String {
        lock(&self.inner.nick).clone()
    }

    pub fn set_nick(&self, nick: &str) {
        *lock(&self.inner.nick) = wire::truncate_nick(nick).to_string();
        self.announce(Kind::Hello);
    }

    /// Known peers, most recently heard first.
    pub fn peers(&self) -> Vec<Peer> {
        lock(&self.inner.peers).list()
    }

    /// Says hello to `addr` directly (a peer added by hand, perhaps on another subnet),
    /// again with backoff until it answers, in case a datagram is lost. An address known to
    /// speak plain text gets no hello: it would show our binary header as text.
    pub fn hello(&self, addr: SocketAddr) {
        if lock(&self.inner.peers)
            .get(addr)
            .is_some_and(|p| p.protocol == Protocol::Plain)
        {
            return;
        }
        let node = self.clone();
        let _ = corokit_common::spawn(move || {
            let mut wait = node.inner.config.retry_base;
            for _ in 0..node.inner.config.tries {
                node.send_packet(addr, &node.control(Kind::Hello));
                if node.inner.stopped.wait_timeout(wait) || node.is_chat_peer(addr) {
                    return;
                }
                wait *= 2;
            }
        });
    }

    /// True once `addr` has spoken our protocol.
    pub fn is_chat_peer(&self, addr: SocketAddr) -> bool {
        lock(&self.inner.peers)
            .get(addr)
            .is_some_and(|p| p.protocol == Protocol::Chat)
    }

    /// Sends `text` to `to`: reliably to a `chat` peer, as plain UTF-8 to anything else. A
    /// chat peer is written to at the address it is listed under, whichever of its addresses
    /// `to` is, so that it gets one ordered stream.
    pub fn send(&self, to: SocketAddr, text: &str) -> io::Result<Sent> {
        if text.len() > wire::MAX_TEXT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "message is {} bytes; the limit is {}",
                    text.len(),
                    wire::MAX_TEXT
                ),
            ));
        }
        let listed = lock(&self.inner.peers)
            .get(to)
            .filter(|p| p.protocol == Protocol::Chat)
            .map(|p| p.addr);
        let Some(to) = listed else {
            if self.inner.config.key.is_some() {
                // The user asked for encryption: never fall back to plain text.
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("{to} has not answered as a chat peer with our key; not sent"),
                ));
            }
            if text.len() > 65_507 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "too long for one datagram",
                ));
            }
            self.inner.socket.send_to(text.as_bytes(), to)?;
            return Ok(Sent::Plain);
        };
        let nick = self.nick();
        let parts = wire::fragments(text, wire::fragment_size(&nick));
        let frags = parts.len() as u16;
        let probe_after = self.inner.config.retry_base;
        // As long as an unanswered datagram is retried before it is given up on: a peer that
        // keeps saying it has no room must not hold the user's other messages forever.
        let patience = self.inner.config.retry_base * 16 * self.inner.config.tries;
        let waiting = Instant::now();
        while lock(&self.inner.outgoing)
            .get(&to)
            .is_some_and(|o| o.must_wait(parts.len(), probe_after))
        {
            if waiting.elapsed() > patience
                || self.inner.stopped.wait_timeout(Duration::from_millis(1))
            {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{to} is not taking messages (its reader is behind); not sent"),
                ));
            }
        }
        let mut datagrams = Vec::with_capacity(parts.len());
        let id = {
            let mut outgoing = lock(&self.inner.outgoing);
            let out = outgoing.entry(to).or_insert_with(Outgoing::new);
            let id = out.next_seq;
            let base = out.base();
            let now = Instant::now();
            for (i, part) in parts.iter().enumerate() {
                let seq = out.next_seq;
                out.next_seq += 1;
                let plain = Packet {
                    kind: Kind::Msg,
                    instance: self.inner.instance,
                    seq,
                    base,
                    frag: i as u16,
                    frags,
                    nick: nick.clone(),
                    body: part.to_vec(),
                }
                .encode();
                datagrams.push(plain.clone());
                out.pending.insert(
                    seq,
                    Pending {
                        plain,
                        tries: 1,
                        next_at: now + self.inner.config.retry_base,
                        message: id,
                        parked: false,
                    },
                );
            }
            out.messages.insert(id, (parts.len(), text.to_string()));
            id
        };
        for plain in datagrams {
            self.transmit(to, &plain);
        }
        Ok(Sent::Reliable(id))
    }

    /// Says goodbye to every known peer and stops the node's coroutines.
    pub fn stop(&self) {
        let bye = self.control(Kind::Bye);
        for peer in self.peers() {
            if peer.protocol == Protocol::Chat {
                self.send_packet(peer.addr, &bye);
            }
        }
        self.announce(Kind::Bye);
        self.inner.stopped.fire();
        // Wake the receive loop with a datagram to itself so it sees the flag (by IPv4 where
        // it can: IPv6 may be off on the loopback interface).
        if let Ok(addr) = self.inner.socket.local_addr() {
            let wake = match addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => {
                    SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
                }
                IpAddr::V6(_) if self.inner.families == Families::Both => {
                    SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
                }
                IpAddr::V6(ip) if ip.is_unspecified() => {
                    SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
                }
                _ => addr,
            };
            let _ = self.inner.socket.send_to(&[], wake);
        }
    }

    fn control(&self, kind: Kind) -> Packet {
        Packet::control(kind, self.inner.instance, &self.nick())
    }

    /// Broadcast and multicast in every family the socket speaks, when discovery is on.
    /// IPv4 goes first, so a dual-stack peer usually hears it first and lists us under the
    /// IPv4 address rather than a link-local IPv6 one.
    fn announce(&self, kind: Kind) {
        let Some(port) = self.inner.config.discovery_port else {
            return;
        };
        let packet = self.control(kind);
        if self.inner.families != Families::V6 {
            self.send_packet(SocketAddr::from((Ipv4Addr::BROADCAST, port)), &packet);
            self.send_packet(SocketAddr::from((MULTICAST_V4, port)), &packet);
        }
        if self.inner.families != Families::V4 {
            self.send_packet(SocketAddr::from((ALL_NODES_V6, port)), &packet);
        }
    }

    fn send_packet(&self, to: SocketAddr, packet: &Packet) {
        self.transmit(to, &packet.encode());
    }

    /// Sends a plain protocol datagram, sealed when there is a key. Errors (an unreachable
    /// network, say) are left to retransmission and, in the end, to not-delivered.
    fn transmit(&self, to: SocketAddr, plain: &[u8]) {
        let _ = match &self.inner.config.key {
            Some(key) => {
                let counter = self.inner.counter.fetch_add(1, Ordering::Relaxed);
                self.inner.socket.send_to(&key.seal(plain, counter), to)
            }
            None => self.inner.socket.send_to(plain, to),
        };
    }

    /// Queues an event for the user. What a source causes (its plain messages, joins and
    /// notices) counts against its share of the queue and is dropped, and counted, beyond it.
    /// A chat peer's message was acknowledged when it was accepted, which needed room, so it
    /// is never dropped here; nor are leaves and delivery reports, which are bounded by the
    /// peers table and the send window.
    fn emit(&self, event: Event) {
        let (source, droppable) = match &event {
            Event::Message { from, nick, .. } => (Some(*from), nick.is_none()),
            Event::Join { addr, .. } => (Some(*addr), true),
            _ => (None, false),
        };
        self.queue(source, droppable, event);
    }

    /// Tells the user something about a datagram from `from`.
    fn notice(&self, from: SocketAddr, text: String) {
        self.queue(Some(from), true, Event::Notice(text));
    }

    fn queue(&self, source: Option<SocketAddr>, droppable: bool, event: Event) {
        let queued = &self.inner.queued;
        if droppable && source.is_some_and(|from| !queued.has_room(from)) {
            self.inner.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queued.total.fetch_add(1, Ordering::Relaxed);
        if let Some(from) = source {
            *lock(&queued.by_source).entry(from).or_default() += 1;
        }
        let _ = self.inner.events.send((source, event));
    }

    fn receive_loop(&self) {
        // The largest UDP payload: anything smaller would truncate silently.
        let mut buf = vec![0u8; 65_536];
        loop {
            let received = self.inner.socket.recv_from(&mut buf);
            if self.inner.stopped.is_fired() {
                return;
            }
            let Ok((n, from)) = received else { continue };
            // On a dual-stack socket IPv4 senders arrive as ::ffff:a.b.c.d; shown and
            // answered as the IPv4 addresses they are.
            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
            if n == 0 && from.ip().is_loopback() {
                continue;
            }
            self.inner.stats.received.fetch_add(1, Ordering::Relaxed);
            if !self.within_rate(from) {
                self.inner
                    .stats
                    .rate_limited
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.handle(&buf[..n], from);
        }
    }

    fn within_rate(&self, source: SocketAddr) -> bool {
        let rate = f64::from(self.inner.config.rate_per_source);
        let now = Instant::now();
        let mut buckets = lock(&self.inner.rate);
        if buckets.len() >= RATE_SOURCES && !buckets.contains_key(&source) {
            buckets.clear();
        }
        let (tokens, last) = buckets.entry(source).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn handle(&self, bytes: &[u8], from: SocketAddr) {
        let opened;
        let plain = match (wire::decode(bytes), &self.inner.config.key) {
            (Datagram::Plain, Some(_)) | (Datagram::Packet(_), Some(_)) => {
                // With a key, everything unauthenticated is dropped and counted, never shown.
                self.inner
                    .stats
                    .unauthenticated
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            (Datagram::Plain, None) => {
                lock(&self.inner.peers).seen(from, None, None, Protocol::Plain);
                self.emit(Event::Message {
                    from,
                    nick: None,
                    text: String::from_utf8_lossy(bytes).into_owned(),
                });
                return;
            }
            (Datagram::Malformed(why), _) => {
                self.inner.stats.malformed.fetch_add(1, Ordering::Relaxed);
                self.notice(
                    from,
                    format!("ignored a malformed datagram from {from}: {why}"),
                );
                return;
            }
            (Datagram::Sealed, None) => {
                self.inner
                    .stats
                    .unauthenticated
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            (Datagram::Sealed, Some(key)) => match key.open(bytes) {
                Err(_) => {
                    self.inner
                        .stats
                        .unauthenticated
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok((counter, inner)) => {
                    opened = inner;
                    match wire::decode(&opened) {
                        Datagram::Packet(p) => {
                            let fresh = lock(&self.inner.replay)
                                .entry(p.instance)
                                .or_default()
                                .accept(counter);
                            if !fresh {
                                self.inner.stats.replayed.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            p
                        }
                        _ => {
                            self.inner.stats.malformed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            },
            (Datagram::Packet(p), None) => p,
        };
        self.handle_packet(plain, from);
    }

    fn handle_packet(&self, p: Packet, from: SocketAddr) {
        if p.instance == self.inner.instance {
            return; // our own broadcast, come back
        }
        if p.kind == Kind::Bye {
            // Goodbyes come directly and by broadcast, perhaps at two of the peer's
            // addresses: only the first finds the peer, and none may bring it back as a join.
            // A late one from a run that has since been restarted must not remove the new run.
            let mut peers = lock(&self.inner.peers);
            let gone = peers
                .get(from)
                .is_some_and(|peer| peer.instance.is_none_or(|i| i == p.instance))
                .then(|| peers.remove(from))
                .flatten();
            drop(peers);
            if let Some(peer) = gone {
                self.emit(Event::Leave {
                    addr: peer.addr,
                    nick: peer.nick.unwrap_or_default(),
                    expired: false,
                });
            }
            return;
        }
        let joined =
            lock(&self.inner.peers).seen(from, Some(p.instance), Some(&p.nick), Protocol::Chat);
        if joined {
            self.emit(Event::Join {
                addr: from,
                nick: p.nick.clone(),
            });
        }
        if p.kind != Kind::Msg && p.base > 0 {
            if let Some(stream) = lock(&self.inner.incoming).get_mut(&(from, p.instance)) {
                stream.skip_to(p.base);
            }
            self.release(p.instance, from);
        }
        match p.kind {
            Kind::Hello => self.send_packet(from, &self.control(Kind::HelloReply)),
            Kind::HelloReply | Kind::Sealed | Kind::Bye => {}
            Kind::Ack => self.acknowledged(from, p.seq, p.window()),
            Kind::Msg => self.received_msg(p, from),
        }
    }

    fn acknowledged(&self, from: SocketAddr, seq: u64, window: Option<u64>) {
        let delivered = {
            let mut outgoing = lock(&self.inner.outgoing);
            let Some(out) = outgoing.get_mut(&from) else {
                return;
            };
            let now = Instant::now();
            out.last_ack = now;
            if let Some(limit) = window {
                out.limit = limit;
                for (&s, pending) in out.pending.iter_mut() {
                    if s > limit && seq == 0 {
                        // Turned away for want of room: wait for the window update, and
                        // only probe now and then in case the update is lost.
                        pending.parked = true;
                        pending.next_at = now + self.inner.config.retry_base * 16;
                    } else if s <= limit && pending.parked {
                        pending.next_at = now;
                    }
                }
            }
            let Some(pending) = out.pending.remove(&seq) else {
                return;
            };
            out.cwnd = (out.cwnd + 1).min(SEND_WINDOW);
            let message = pending.message;
            match out.messages.get_mut(&message) {
                Some((left, _)) if *left > 1 => {
                    *left -= 1;
                    None
                }
                Some(_) => {
                    out.messages.remove(&message);
                    Some(message)
                }
                None => None,
            }
        };
        if let Some(id) = delivered {
            self.emit(Event::Delivered { to: from, id });
        }
    }

    fn received_msg(&self, p: Packet, from: SocketAddr) {
        let (instance, seq) = (p.instance, p.seq);
        {
            let mut incoming = lock(&self.inner.incoming);
            let stream = incoming.entry((from, instance)).or_default();
            stream.last = Some(Instant::now());
            stream.skip_to(p.base);
            let expected = stream.expected.unwrap_or(1);
            if seq < expected || stream.held.contains_key(&seq) {
                self.inner.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                drop(incoming);
                self.ack(from, instance, seq, expected - 1);
                return;
            }
            if !self.inner.queued.has_room(from) {
                // Not acknowledged (an acknowledged message is never dropped); the window
                // update tells the sender to hold it until the user has caught up.
                self.inner.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                drop(incoming);
                self.ack(from, instance, 0, expected - 1);
                return;
            }
            if seq >= expected + REORDER_WINDOW {
                // Not acknowledged: the sender retransmits once the gap is filled.
                self.inner
                    .stats
                    .out_of_window
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            stream.held.insert(seq, p);
        }
        let delivered = self.release(instance, from);
        self.ack(from, instance, seq, delivered);
    }

    /// Shows every message of `instance` that is now complete and in order, and returns the
    /// highest sequence delivered in order.
    fn release(&self, instance: u64, from: SocketAddr) -> u64 {
        let mut complete = Vec::new();
        let delivered;
        {
            let mut incoming = lock(&self.inner.incoming);
            let Some(stream) = incoming.get_mut(&(from, instance)) else {
                return 0;
            };
            let mut next = stream.expected.unwrap_or(1);
            while let Some(packet) = stream.held.remove(&next) {
                next += 1;
                if packet.frag == 0 {
                    stream.assembling.clear();
                    stream.resync = false;
                }
                if stream.resync {
                    continue;
                }
                if stream.assembling.len() + packet.body.len() <= wire::MAX_TEXT {
                    stream.assembling.extend_from_slice(&packet.body);
                }
                if packet.frag + 1 == packet.frags {
                    let text = String::from_utf8_lossy(&stream.assembling).into_owned();
                    stream.assembling.clear();
                    complete.push((packet.nick, text));
                }
            }
            stream.expected = Some(next);
            delivered = next - 1;
        }
        for (nick, text) in complete {
            self.emit(Event::Message {
                from,
                nick: Some(nick),
                text,
            });
        }
        delivered
    }

    /// Acknowledges `seq` (0: acknowledges nothing, a window update) with the window: the
    /// sender may go as far past `delivered` (what arrived in order) as the user's queue has
    /// room.
    fn ack(&self, to: SocketAddr, instance: u64, seq: u64, delivered: u64) {
        let room = self.inner.queued.room(to);
        if room < LOW_ROOM {
            self.short_of_room(to, instance, room);
        } else if seq == 0 {
            lock(&self.inner.low_window).remove(&to);
        }
        let ack = Packet::ack(
            self.inner.instance,
            &self.nick(),
            seq,
            delivered + room as u64,
        );
        self.send_packet(to, &ack);
    }

    /// Remembers that `from` was told it has only `room`, for a window update later. Bounded
    /// like the rate limiter: a sender beyond it recovers by retransmission instead.
    fn short_of_room(&self, from: SocketAddr, instance: u64, room: usize) {
        let mut low = lock(&self.inner.low_window);
        if low.len() < RATE_SOURCES || low.contains_key(&from) {
            low.insert(from, (instance, room));
        }
    }

    /// Tells senders that were short of room, and have more now, how far they may go.
    fn update_windows(&self) {
        let opened: Vec<(SocketAddr, u64)> = lock(&self.inner.low_window)
            .iter()
            .filter(|(&from, &(_, told))| self.inner.queued.room(from) > told)
            .map(|(&from, &(instance, _))| (from, instance))
            .collect();
        for (from, instance) in opened {
            let delivered = lock(&self.inner.incoming)
                .get(&(from, instance))
                .and_then(|s| s.expected)
                .map_or(0, |e| e - 1);
            self.ack(from, instance, 0, delivered);
        }
    }

    /// Retransmits with backoff, reports messages that ran out of tries, refreshes
    /// presence and expires silent peers and stale reassembly.
    fn housekeeping(&self) {
        let tick = Duration::from_millis(20);
        let mut next_presence = Instant::now() + self.inner.config.presence_every;
        while !self.inner.stopped.wait_timeout(tick) {
            self.update_windows();
            let now = Instant::now();
            let mut resend = Vec::new();
            let mut failed = Vec::new();
            let mut gave_up = Vec::new();
            {
                let mut outgoing = lock(&self.inner.outgoing);
                for (&to, out) in outgoing.iter_mut() {
                    let dead: Vec<u64> = out
                        .pending
                        .values()
                        .filter(|p| {
                            p.next_at <= now && p.tries >= self.inner.config.tries && !p.parked
                        })
                        .map(|p| p.message)
                        .collect();
                    for &message in &dead {
                        out.pending.retain(|_, p| p.message != message);
                        if let Some((_, text)) = out.messages.remove(&message) {
                            failed.push((to, message, text));
                        }
                    }
                    let base = out.base();
                    if !dead.is_empty() {
                        gave_up.push((to, base));
                    }
                    // At most a window's worth at once; the rest are due again next tick and
                    // lose no try for the wait.
                    let mut budget = out.cwnd;
                    let mut lost = false;
                    for pending in out.pending.values_mut() {
                        if pending.next_at > now {
                            continue;
                        }
                        if budget == 0 {
                            break;
                        }
                        budget -= 1;
                        if !std::mem::take(&mut pending.parked) {
                            pending.tries += 1;
                            lost = true;
                        }
                        // Doubling up to 16 times the first wait, then steady.
                        let backoff = self.inner.config.retry_base * (1 << pending.tries.min(4));
                        pending.next_at = now + backoff;
                        // Retransmissions carry the current base, so the receiver can skip
                        // anything given up since the first send.
                        wire::set_base(&mut pending.plain, base);
                        resend.push((to, pending.plain.clone()));
                    }
                    if lost {
                        out.lost(now, self.inner.config.retry_base);
                    }
                }
            }
            for (to, plain) in resend {
                self.inner.stats.retransmits.fetch_add(1, Ordering::Relaxed);
                self.transmit(to, &plain);
            }
            for (to, base) in gave_up {
                let mut skip = self.control(Kind::HelloReply);
                skip.base = base;
                self.send_packet(to, &skip);
            }
            for (to, id, text) in failed {
                let nick = lock(&self.inner.peers).get(to).and_then(|p| p.nick.clone());
                self.emit(Event::NotDelivered { to, nick, id, text });
            }
            if now >= next_presence {
                next_presence = now + self.inner.config.presence_every;
                self.announce(Kind::Hello);
                // Directly too: peers added by hand, or on another subnet, hear no broadcast,
                // and would otherwise expire while both ends are running.
                let presence = self.control(Kind::HelloReply);
                for peer in self.peers() {
                    if peer.protocol == Protocol::Chat {
                        self.send_packet(peer.addr, &presence);
                    }
                }
                let expired = lock(&self.inner.peers).expire(self.inner.config.expire_after);
                for peer in expired {
                    if peer.protocol == Protocol::Chat {
                        self.emit(Event::Leave {
                            addr: peer.addr,
                            nick: peer.nick.unwrap_or_default(),
                            expired: true,
                        });
                    }
                }
                let stale = self.inner.config.expire_after;
                lock(&self.inner.incoming)
                    .retain(|_, s| s.last.is_some_and(|t| t.elapsed() < stale));
            }
        }
    }
}

/// Locks a std mutex whose critical sections never yield; a poisoned lock is still usable
/// because every section leaves the data consistent before anything can panic.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(nick: &str) -> (Node, Events, SocketAddr) {
        corokit_common::init();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let config = Config {
            nick: nick.into(),
            presence_every: Duration::from_millis(100),
            expire_after: Duration::from_millis(600),
            ..Config::default()
        };
        let (node, events) = Node::start(socket, config).unwrap();
        let addr = node.local_addr().unwrap();
        (node, events, addr)
    }

    /// Every event within `time`.
    fn events_for(events: &Events, time: Duration) -> Vec<Event> {
        let until = Instant::now() + time;
        let mut seen = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match events.recv_timeout(left) {
                Some(e) => seen.push(e),
                None => break,
            }
        }
        seen.extend(std::iter::from_fn(|| events.try_recv()));
        seen
    }

    #[test]
    fn one_loss_burst_halves_the_congestion_window_once() {
        let mut out = Outgoing::new();
        let round = Duration::from_millis(200);
        let t = Instant::now();
        out.lost(t, round);
        out.lost(t + Duration::from_millis(20), round);
        out.lost(t + Duration::from_millis(40), round);
        assert_eq!(out.cwnd, INITIAL_CWND / 2);
        out.lost(t + round, round);
        assert_eq!(out.cwnd, INITIAL_CWND / 4);
        for i in 0..10 {
            out.lost(t + round * (2 + i), round);
        }
        assert_eq!(out.cwnd, MIN_CWND);
    }

    #[test]
    fn presence_keeps_running_peers_and_silent_ones_expire() {
        let (ana, ana_events, ana_addr) = node("ana");
        let (bob, bob_events, bob_addr) = node("bob");
        // Added by hand, no discovery: only direct presence keeps them known to each other.
        ana.hello(bob_addr);
        let ghost = UdpSocket::bind("127.0.0.1:0").unwrap();
        ghost
            .send_to(
                &Packet::control(Kind::Hello, 99, "ghost").encode(),
                ana_addr,
            )
            .unwrap();
        let ghost_addr = ghost.local_addr().unwrap();
        // Three expiry periods: the ghost said hello once and is gone; bob and ana stay.
        let at_ana = events_for(&ana_events, Duration::from_millis(1800));
        let at_bob = events_for(&bob_events, Duration::ZERO);
        let joined = |seen: &[Event], who: SocketAddr| {
            seen.iter()
                .any(|e| matches!(e, Event::Join { addr, .. } if *addr == who))
        };
        let left = |seen: &[Event], who: SocketAddr| {
            seen.iter()
                .any(|e| matches!(e, Event::Leave { addr, .. } if *addr == who))
        };
        assert!(
            joined(&at_ana, bob_addr) && joined(&at_ana, ghost_addr),
            "{at_ana:?}"
        );
        assert!(joined(&at_bob, ana_addr), "{at_bob:?}");
        assert!(
            at_ana.iter().any(|e| matches!(e,
                Event::Leave { addr, expired: true, .. } if *addr == ghost_addr)),
            "the silent peer did not expire: {at_ana:?}"
        );
        assert!(!left(&at_ana, bob_addr), "{at_ana:?}");
        assert!(!left(&at_bob, ana_addr), "{at_bob:?}");
        assert_eq!(ana.peers().len(), 1);
        ana.stop();
        bob.stop();
    }
}
