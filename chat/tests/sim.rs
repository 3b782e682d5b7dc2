//! A deterministic network simulator for the chat protocol core: seeded loss, duplication,
//! reordering, delay, partitions, peers that vanish or restart, readers that stop reading,
//! and an attacker who records, replays and forges. Thousands of scenarios run in seconds
//! with no sockets and no sleeps; each checks the promises as properties:
//!
//! - to a live peer every message arrives exactly once and in order, however lossy the link;
//! - "not delivered" only for a peer that sent nothing for `Timing::dead_after` (or was
//!   replaced by a restart), and every message ends either delivered or not delivered;
//! - what is reported delivered was shown;
//! - memory stays under its bounds whatever arrives;
//! - nothing an attacker sends is shown as from a peer, and no peer leaves because of it.
//!
//! A failing scenario prints its seed; `SIM_SEED=n cargo test -p corokit-chat --test sim`
//! runs that one alone.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use corokit_chat::core::events::{EVENT_BYTES, EVENT_QUEUE};
use corokit_chat::core::peers::{MAX_PATHS, MAX_RUNS};
use corokit_chat::core::recv::REORDER;
use corokit_chat::core::{Config, Core, Event, SendError, Sent, HELD_BUDGET};
use corokit_chat::seal::Key;
use corokit_chat::wire::{self, Body, Datagram, Kind, Packet};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

fn addr(host: usize) -> SocketAddr {
    SocketAddr::from(([10, 9, 0, host as u8 + 1], 7890))
}

/// How the network treats datagrams.
#[derive(Debug, Clone, Copy)]
struct Link {
    loss: f64,
    dup: f64,
    delay: Duration,
    jitter: Duration,
}

impl Link {
    fn perfect() -> Link {
        Link {
            loss: 0.0,
            dup: 0.0,
            delay: MS,
            jitter: Duration::ZERO,
        }
    }
}

/// A message a host's user sent, and what became of it.
#[derive(Debug, Clone)]
struct Sending {
    to: usize,
    text: String,
    sent_at: Instant,
    id: Option<u64>,
    outcome: Option<(Instant, bool)>,
}

struct Host {
    core: Option<Core>,
    key: Option<Vec<u8>>,
    runs: u32,
    reading: bool,
    shown: Vec<(Instant, u32, Event)>,
    /// Messages the user typed that `send` told to wait (the peer had no room).
    outbox: Vec<usize>,
    sent: Vec<Sending>,
}

struct Flight {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

struct Sim {
    seed: u64,
    t0: Instant,
    now: Instant,
    rng: fastrand::Rng,
    link: Link,
    hosts: Vec<Host>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    flights: BTreeMap<u64, Flight>,
    next_order: u64,
    /// Pairs (from, to) that cannot reach each other until the given time.
    cut_until: BTreeMap<(usize, usize), Instant>,
    /// When each host last received anything from each other host: (to, from) → times.
    heard: BTreeMap<(usize, usize), Vec<Instant>>,
    /// Every datagram sent, for the attacker (when there is one).
    tap: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    recording: bool,
    config: fn() -> Config,
}

fn default_config() -> Config {
    Config {
        retry_base: 100 * MS,
        ..Config::default()
    }
}

impl Sim {
    fn new(seed: u64, hosts: usize, key: Option<&[u8]>, link: Link) -> Sim {
        let t0 = Instant::now();
        let mut sim = Sim {
            seed,
            t0,
            now: t0,
            rng: fastrand::Rng::with_seed(seed),
            link,
            hosts: Vec::new(),
            queue: BinaryHeap::new(),
            flights: BTreeMap::new(),
            next_order: 0,
            cut_until: BTreeMap::new(),
            heard: BTreeMap::new(),
            tap: Vec::new(),
            recording: false,
            config: default_config,
        };
        for _ in 0..hosts {
            sim.hosts.push(Host {
                core: None,
                key: key.map(<[u8]>::to_vec),
                runs: 0,
                reading: true,
                shown: Vec::new(),
                outbox: Vec::new(),
                sent: Vec::new(),
            });
        }
        for h in 0..hosts {
            sim.start(h);
        }
        sim
    }

    fn start(&mut self, h: usize) {
        let mut config = (self.config)();
        config.nick = format!("host{h}");
        config.key = self.hosts[h].key.as_deref().map(Key::derive);
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.rng.u64(..).to_be_bytes());
        let mut core = Core::new(config, seed, self.now);
        core.start(self.now);
        let host = &mut self.hosts[h];
        host.core = Some(core);
        host.runs += 1;
        self.flush(h);
    }

    /// The host's process dies (nothing is said) and, with `restart`, starts again.
    fn crash(&mut self, h: usize, restart: bool) {
        self.hosts[h].core = None;
        self.hosts[h].outbox.clear();
        if restart {
            self.start(h);
        }
    }

    fn core(&mut self, h: usize) -> &mut Core {
        self.hosts[h].core.as_mut().expect("a running host")
    }

    fn greet(&mut self, h: usize, to: usize) {
        let now = self.now;
        self.core(h).greet(now, addr(to));
        self.flush(h);
    }

    /// Greets until `h` knows `to` as a chat peer, as a user would type `/to` again on a bad
    /// link.
    fn connect(&mut self, h: usize, to: usize) {
        for _ in 0..20 {
            self.greet(h, to);
            self.run_until(self.now + 5 * SEC);
            if self.core(h).chat_peer(addr(to)).is_some()
                && self.core(to).chat_peer(addr(h)).is_some()
            {
                return;
            }
        }
        let (g1, s1) = (
            self.core(h).greeting(addr(to)),
            self.core(h).stats().clone(),
        );
        let (g2, s2) = (
            self.core(to).greeting(addr(h)),
            self.core(to).stats().clone(),
        );
        panic!(
            "seed {}: no handshake between {h} and {to}: {g1:?} {s1:?} / {g2:?} {s2:?}; link {:?}",
            self.seed, self.link
        );
    }

    /// The user of `h` types `text` for `to`.
    fn say(&mut self, h: usize, to: usize, text: String) {
        self.hosts[h].sent.push(Sending {
            to,
            text,
            sent_at: self.now,
            id: None,
            outcome: None,
        });
        let i = self.hosts[h].sent.len() - 1;
        self.hosts[h].outbox.push(i);
        self.try_outbox(h);
    }

    fn try_outbox(&mut self, h: usize) {
        let now = self.now;
        while let Some(&i) = self.hosts[h].outbox.first() {
            let (to, text) = {
                let s = &self.hosts[h].sent[i];
                (s.to, s.text.clone())
            };
            let Some(core) = self.hosts[h].core.as_mut() else {
                return;
            };
            match core.send(now, addr(to), &text) {
                Err(SendError::Busy { .. }) => break,
                Ok(Sent::Reliable(id)) => self.hosts[h].sent[i].id = Some(id),
                other => panic!("seed {}: send failed: {other:?}", self.seed),
            }
            self.hosts[h].outbox.remove(0);
        }
        self.flush(h);
    }

    /// Moves what host `h` wants to send into the network, and its events to its user.
    fn flush(&mut self, h: usize) {
        let Some(core) = self.hosts[h].core.as_mut() else {
            return;
        };
        let transmits: Vec<_> = std::iter::from_fn(|| core.poll_transmit()).collect();
        for t in transmits {
            if self.recording {
                self.tap.push((addr(h), t.to, t.bytes.clone()));
            }
            self.inject(addr(h), t.to, t.bytes);
        }
        self.read_events(h);
    }

    fn read_events(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        if !host.reading {
            return;
        }
        let Some(core) = host.core.as_mut() else {
            return;
        };
        while let Some(e) = core.poll_event() {
            match &e {
                Event::Delivered { id, .. } | Event::NotDelivered { id, .. } => {
                    let delivered = matches!(e, Event::Delivered { .. });
                    if let Some(s) = host.sent.iter_mut().find(|s| s.id == Some(*id)) {
                        assert!(
                            s.outcome.is_none(),
                            "seed {}: message {id} reported twice",
                            self.seed
                        );
                        s.outcome = Some((self.now, delivered));
                    }
                }
                _ => {}
            }
            host.shown.push((self.now, host.runs, e));
        }
    }

    /// Puts a datagram on the wire, subject to the link.
    fn inject(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "{:>10?} {from} -> {to}: {} bytes {}",
                self.now - self.t0,
                bytes.len(),
                match wire::decode(&bytes) {
                    Datagram::Packet { packet, text_form } => format!(
                        "{:?} src {:x} dst {:x} text {text_form} {:?}",
                        packet.kind, packet.src, packet.dst, packet.body
                    )
                    .chars()
                    .take(200)
                    .collect::<String>(),
                    other => format!("{other:?}").chars().take(60).collect(),
                }
            );
        }
        let copies = if self.rng.f64() < self.link.dup { 2 } else { 1 };
        for _ in 0..copies {
            if self.rng.f64() < self.link.loss {
                continue;
            }
            let jitter = self.link.jitter.mul_f64(self.rng.f64());
            let at = self.now + self.link.delay + jitter;
            let order = self.next_order;
            self.next_order += 1;
            self.queue.push(Reverse((at, order)));
            self.flights.insert(
                order,
                Flight {
                    from,
                    to,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    fn host_at(&self, a: SocketAddr) -> Option<usize> {
        (0..self.hosts.len()).find(|&h| addr(h) == a)
    }

    /// Runs the world until `until`.
    fn run_until(&mut self, until: Instant) {
        loop {
            let next_flight = self.queue.peek().map(|Reverse((t, _))| *t);
            let next_timer = self
                .hosts
                .iter()
                .enumerate()
                .filter_map(|(h, host)| host.core.as_ref().map(|c| (c.poll_timeout(), h)))
                .min();
            let next = [next_flight, next_timer.map(|(t, _)| t)]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next.filter(|t| *t <= until) else {
                self.now = until;
                return;
            };
            self.now = self.now.max(next);
            if next_flight == Some(next) {
                let Reverse((_, order)) = self.queue.pop().expect("a flight");
                let f = self.flights.remove(&order).expect("its bytes");
                self.deliver(f);
            } else if let Some((_, h)) = next_timer {
                let now = self.now;
                self.core(h).handle_timeout(now);
                self.flush(h);
                self.try_outbox(h);
            }
            self.check_memory();
        }
    }

    fn deliver(&mut self, f: Flight) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "{:>10?} delivered {} -> {}",
                self.now - self.t0,
                f.from,
                f.to
            );
        }
        let Some(to) = self.host_at(f.to) else {
            return;
        };
        if let Some(from) = self.host_at(f.from) {
            if self
                .cut_until
                .get(&(from, to))
                .is_some_and(|t| self.now < *t)
            {
                return;
            }
            if self.hosts[to].core.is_some() {
                self.heard.entry((to, from)).or_default().push(self.now);
            }
        }
        let now = self.now;
        let Some(core) = self.hosts[to].core.as_mut() else {
            return;
        };
        core.handle_datagram(now, f.from, &f.bytes);
        self.flush(to);
        self.try_outbox(to);
    }

    fn partition(&mut self, a: usize, b: usize, length: Duration) {
        let until = self.now + length;
        self.cut_until.insert((a, b), until);
        self.cut_until.insert((b, a), until);
    }

    fn check_memory(&self) {
        for (h, host) in self.hosts.iter().enumerate() {
            let Some(core) = &host.core else { continue };
            let m = core.memory();
            // Out-of-order bytes: the budget, plus the next message of every stream, which
            // is always taken; and no stream past its window.
            let per_stream = REORDER as usize * (wire::MAX_RECEIVED + 160);
            let next_messages =
                m.runs * MAX_PATHS * wire::MAX_FRAGS as usize * (wire::MAX_RECEIVED + 160);
            let ok = m.runs <= MAX_RUNS
                && m.held_bytes
                    <= (HELD_BUDGET + next_messages).min(per_stream * MAX_PATHS * m.runs.max(1))
                && m.events <= EVENT_QUEUE + m.sending + 64
                && m.event_bytes <= EVENT_BYTES + (m.sending + 64) * (wire::MAX_TEXT + 256)
                && m.tally <= 1024 + 16
                && m.sources <= 2 * 4096
                && m.sending <= 4096 * (m.runs + 1);
            assert!(
                ok,
                "seed {}: host {h} memory out of bounds: {m:?}",
                self.seed
            );
        }
    }

    /// Messages host `h` showed from host `from`, in order, per run of `h`.
    fn shown_from(&self, h: usize, from: usize) -> Vec<(u32, String)> {
        self.hosts[h]
            .shown
            .iter()
            .filter_map(|(_, run, e)| match e {
                Event::Message {
                    from: f,
                    nick: Some(_),
                    text,
                    ..
                } if *f == addr(from) => Some((*run, text.clone())),
                _ => None,
            })
            .collect()
    }

    /// True when host `to` heard nothing from `from` during `dead_after` before `at`.
    fn silent_before(&self, to: usize, from: usize, at: Instant, dead_after: Duration) -> bool {
        let since = at.checked_sub(dead_after).unwrap_or(self.t0);
        !self
            .heard
            .get(&(to, from))
            .is_some_and(|times| times.iter().any(|t| *t > since && *t <= at))
    }
}

fn text_of(rng: &mut fastrand::Rng, i: usize) -> String {
    let len = match rng.u8(0..10) {
        0 => rng.usize(1000..5000),
        1 => 0,
        _ => rng.usize(1..80),
    };
    let mut t = format!("#{i}:");
    t.extend((0..len).map(|_| rng.alphanumeric()));
    t
}

/// Checks the delivery promises for messages from `a` to `b` at the end of a scenario.
fn check_delivery(sim: &Sim, a: usize, b: usize, lossless_run: bool) {
    let seed = sim.seed;
    let dead_after = sim.hosts[a]
        .core
        .as_ref()
        .map(|c| c.timing().dead_after())
        .unwrap_or(SEC);
    let sent: Vec<&Sending> = sim.hosts[a].sent.iter().filter(|s| s.to == b).collect();
    let shown = sim.shown_from(b, a);
    // Exactly once, in order: what b showed is a subsequence of what a sent, without repeats.
    let mut next = 0;
    for (_, text) in &shown {
        let at = sent[next..]
            .iter()
            .position(|s| &s.text == text)
            .unwrap_or_else(|| panic!("seed {seed}: shown out of order or twice: {text:.20}"));
        next += at + 1;
    }
    for s in &sent {
        let was_shown = shown.iter().any(|(_, t)| *t == s.text);
        let Some((at, delivered)) = s.outcome else {
            panic!(
                "seed {seed}: {:.20} has no outcome (shown: {was_shown})",
                s.text
            );
        };
        if delivered {
            assert!(
                was_shown,
                "seed {seed}: delivered but not shown: {:.20}",
                s.text
            );
        } else {
            let restarted = sim.hosts[b]
                .shown
                .iter()
                .any(|(t, run, _)| *run > 1 && *t <= at);
            assert!(
                restarted || sim.silent_before(a, b, at, dead_after),
                "seed {seed}: {:.20} not delivered although the peer was answering",
                s.text
            );
        }
        if lossless_run {
            assert!(
                delivered && was_shown,
                "seed {seed}: lost {:.20} (delivered {delivered}, shown {was_shown}, at {:?})",
                s.text,
                at - sim.t0
            );
        }
    }
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => default.collect(),
    }
}

/// Lossy, duplicating, reordering links, messages of every size, sometimes a partition
/// shorter than a peer is given: everything arrives once, in order, and is reported
/// delivered.
#[test]
fn every_message_to_a_live_peer_arrives_once_in_order_however_lossy_the_link() {
    for seed in seeds(0..2000) {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0xA5A5);
        let link = Link {
            loss: rng.f64() * 0.4,
            dup: rng.f64() * 0.1,
            delay: MS * rng.u32(0..20),
            jitter: MS * rng.u32(0..60),
        };
        let key: Option<&[u8]> = rng.bool().then_some(b"shared");
        let mut sim = Sim::new(seed, 2, key, link);
        sim.connect(0, 1);
        let messages = rng.usize(1..40);
        // Shorter than half the silence a peer is given (4.7 s here): loss after it must
        // still leave room for a sign of life.
        let cut = rng
            .bool()
            .then(|| (rng.usize(0..messages), MS * rng.u32(0..2300)));
        for i in 0..messages {
            if cut.is_some_and(|(at, _)| at == i) {
                let (_, length) = cut.unwrap();
                sim.partition(0, 1, length);
            }
            let text = text_of(&mut rng, i);
            let (from, to) = if rng.u8(0..4) == 0 { (1, 0) } else { (0, 1) };
            sim.say(from, to, text);
            sim.run_until(sim.now + MS * rng.u32(0..500));
        }
        sim.run_until(sim.now + 60 * SEC);
        check_delivery(&sim, 0, 1, true);
        check_delivery(&sim, 1, 0, true);
    }
}

/// Partitions longer than a peer is given, peers that crash and restart, readers that stop
/// reading: "not delivered" only for a peer that went silent or was replaced, every message
/// has an outcome, and what is delivered was shown.
#[test]
fn not_delivered_only_for_a_peer_that_stopped_answering() {
    for seed in seeds(10_000..11_000) {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x5A5A);
        let link = Link {
            loss: rng.f64() * 0.3,
            dup: rng.f64() * 0.05,
            delay: MS * rng.u32(0..10),
            jitter: MS * rng.u32(0..30),
        };
        let mut sim = Sim::new(seed, 2, None, link);
        sim.connect(0, 1);
        let messages = rng.usize(5..30);
        let trouble = rng.usize(0..messages);
        let kind = rng.u8(0..4);
        let mut crashed_at = None;
        for i in 0..messages {
            if i == trouble {
                crashed_at = Some(sim.now);
                match kind {
                    0 => sim.partition(0, 1, SEC * rng.u32(5..40)),
                    1 => {
                        sim.crash(1, true);
                        sim.greet(1, 0);
                    }
                    2 => sim.hosts[1].reading = false,
                    // Gone for good: everything after is reported not delivered, in time.
                    _ => sim.crash(1, false),
                }
            }
            sim.say(0, 1, text_of(&mut rng, i));
            sim.run_until(sim.now + MS * rng.u32(0..2000));
        }
        sim.run_until(sim.now + 20 * SEC);
        sim.hosts[1].reading = true;
        sim.read_events(1);
        sim.run_until(sim.now + 60 * SEC);
        // A reader that merely stopped reading is alive: nothing may be lost for it.
        check_delivery(&sim, 0, 1, kind == 2);
        if kind == 3 {
            // Not delivered within the documented time of the peer's silence (plus one
            // retransmission wait for the timer), and the peer reported gone when it expires.
            let crashed = crashed_at.expect("crashed");
            let timing = sim.core(0).timing();
            for s in sim.hosts[0].sent.iter().filter(|s| s.sent_at >= crashed) {
                let (at, delivered) = s.outcome.expect("an outcome");
                assert!(!delivered, "seed {seed}: delivered to a peer that is gone");
                let due = s.sent_at.max(crashed) + timing.dead_after() + timing.base;
                assert!(at <= due, "seed {seed}: reported {:?} late", at - due);
            }
            sim.run_until(sim.now + 100 * SEC);
            let left = sim.hosts[0].shown.iter().any(|(_, _, e)| {
                matches!(e, Event::Leave { addr: a, expired: true, .. } if *a == addr(1))
            });
            assert!(left, "seed {seed}: a vanished peer never went silent");
        }
    }
}

/// A reader that stops reading for a long time: what it was sent waits, bounded, and arrives
/// in order once it reads again; the sender is told nothing was lost.
#[test]
fn a_reader_that_stops_reading_loses_nothing_and_holds_the_sender_back() {
    for seed in seeds(2000..2003) {
        let mut sim = Sim::new(seed, 2, None, Link::perfect());
        sim.greet(0, 1);
        sim.run_until(sim.now + SEC);
        sim.hosts[1].reading = false;
        for i in 0..9000 {
            sim.say(0, 1, format!("m{i}"));
            if i % 500 == 0 {
                sim.run_until(sim.now + 100 * MS);
            }
        }
        sim.run_until(sim.now + 30 * SEC);
        assert!(sim.core(1).memory().events <= EVENT_QUEUE);
        assert!(
            !sim.hosts[0].outbox.is_empty(),
            "the sender was not held back"
        );
        sim.hosts[1].reading = true;
        sim.read_events(1);
        sim.run_until(sim.now + 60 * SEC);
        check_delivery(&sim, 0, 1, true);
        assert_eq!(sim.shown_from(1, 0).len(), 9000);
    }
}

/// Decodes a recorded datagram (unkeyed traffic only) to learn instance ids.
fn packet_of(bytes: &[u8]) -> Option<Packet> {
    match wire::decode(bytes) {
        Datagram::Packet { packet, .. } => Some(packet),
        _ => None,
    }
}

/// An attacker on the same network records everything and sends, from addresses of its
/// own: replays, mutations, forgeries with a peer's instance id, random bytes, hello floods
/// and goodbyes. Peers keep talking as if it were not there.
#[test]
fn an_attacker_cannot_speak_for_a_peer_replay_it_or_make_it_leave() {
    for seed in seeds(20_000..21_000) {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x3C3C);
        let key: Option<&[u8]> = rng.bool().then_some(b"k");
        let link = Link {
            loss: rng.f64() * 0.2,
            dup: 0.0,
            delay: MS,
            jitter: MS * rng.u32(0..20),
        };
        // Hosts 0 and 1 talk; host 2 shares the key and is greeted by 0; 3 is the attacker.
        let mut sim = Sim::new(seed, 3, key, link);
        sim.recording = true;
        sim.connect(0, 1);
        sim.connect(0, 2);
        let eve: Vec<SocketAddr> = (0..4)
            .map(|p| SocketAddr::from(([10, 9, 9, 9], 4000 + p)))
            .collect();
        let messages = rng.usize(5..25);
        for i in 0..messages {
            sim.say(0, 1, text_of(&mut rng, i));
            if rng.bool() {
                sim.say(1, 0, text_of(&mut rng, 1000 + i));
            }
            sim.run_until(sim.now + MS * rng.u32(0..300));
            for _ in 0..rng.usize(0..20) {
                let from = eve[rng.usize(..eve.len())];
                let victim = addr(rng.usize(0..3));
                let bytes = forge(&mut rng, &sim.tap, &sim.hosts, key.is_some());
                sim.inject(from, victim, bytes);
                // Replays from the real sender's address as well (as if spoofed).
                if rng.u8(0..4) == 0 && !sim.tap.is_empty() {
                    let (f, _, b) = sim.tap[rng.usize(..sim.tap.len())].clone();
                    sim.inject(f, victim, b);
                }
            }
        }
        sim.run_until(sim.now + 60 * SEC);
        check_delivery(&sim, 0, 1, link.loss == 0.0);
        // Acknowledgements an attacker forges never make a message "delivered".
        check_delivery(&sim, 1, 0, link.loss == 0.0);
        // Nor does it rename a peer.
        for (_, _, e) in &sim.hosts[1].shown {
            if let Event::Message { from, nick, .. } = e {
                if *from == addr(0) {
                    assert_eq!(nick.as_deref(), Some("host0"), "seed {seed}");
                }
            }
        }
        // Host 1 never saw host 0 leave, and nothing of host 0's reached host 2.
        let left = sim.hosts[1]
            .shown
            .iter()
            .any(|(_, _, e)| matches!(e, Event::Leave { addr: a, .. } if *a == addr(0)));
        assert!(!left, "seed {seed}: the attacker made host 0 leave");
        assert!(
            sim.shown_from(2, 0).is_empty(),
            "seed {seed}: host 2 showed {:?}",
            sim.shown_from(2, 0)
        );
        // Whatever the attacker sends is shown as from the attacker's own addresses, never as
        // from a peer's (without a key it can claim any run id and nickname there, having
        // echoed the challenges it receives); with a key nothing of it is shown at all.
        for (_, _, e) in &sim.hosts[1].shown {
            if let Event::Message { from, .. } = e {
                assert!(
                    *from == addr(0) || (eve.contains(from) && key.is_none()),
                    "seed {seed}: shown from {from}: {e:?}"
                );
            }
        }
    }
}

/// One hostile datagram: a replay, a mutation, a forgery with a peer's instance id, a hello,
/// or random bytes.
fn forge(
    rng: &mut fastrand::Rng,
    tap: &[(SocketAddr, SocketAddr, Vec<u8>)],
    hosts: &[Host],
    keyed: bool,
) -> Vec<u8> {
    let recorded = (!tap.is_empty()).then(|| tap[rng.usize(..tap.len())].2.clone());
    let instances: Vec<u64> = hosts
        .iter()
        .filter_map(|h| h.core.as_ref().map(Core::instance))
        .collect();
    match rng.u8(0..6) {
        0 => recorded.unwrap_or_default(),
        1 => {
            let mut b = recorded.unwrap_or_default();
            if !b.is_empty() {
                let at = rng.usize(..b.len());
                b[at] ^= 1 << rng.u8(0..8);
            }
            b
        }
        2 if !keyed => {
            // A peer's instance id (seen on the wire) on forged Msg, Bye and Ack.
            let src = instances[rng.usize(..instances.len())];
            let dst = instances[rng.usize(..instances.len())];
            let body = match rng.u8(0..3) {
                0 => Body::Msg {
                    seq: rng.u64(1..50),
                    base: 1,
                    frag: 0,
                    frags: 1,
                    nick: Some("host0".into()),
                    text: b"forged".to_vec(),
                },
                1 => Body::Empty,
                _ => Body::Ack {
                    seq: rng.u64(0..50),
                    cumulative: rng.u64(0..50),
                    window: 0,
                },
            };
            let kind = match body {
                Body::Msg { .. } => Kind::Msg,
                Body::Empty => Kind::Bye,
                _ => Kind::Ack,
            };
            Packet {
                kind,
                flags: 0,
                src,
                dst,
                body,
            }
            .encode()
        }
        3 => Packet::greeting(Kind::Hello, rng.u64(1..), 0, rng.u64(..), 0, "eve").encode(),
        4 => {
            // A recorded greeting with its echo kept, claiming the address it came from.
            let p = recorded.as_deref().and_then(packet_of);
            match p {
                Some(mut p) if p.kind == Kind::Reply => {
                    p.src = instances[rng.usize(..instances.len())];
                    p.encode()
                }
                _ => (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect(),
            }
        }
        _ => (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect(),
    }
}

/// Floods of strangers, junk and oversized datagrams from many sources while two peers talk:
/// memory stays bounded, the conversation goes on, and the user sees a bounded number of
/// lines.
#[test]
fn floods_leave_memory_and_output_bounded() {
    for seed in seeds(4000..4004) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut sim = Sim::new(seed, 2, None, Link::perfect());
        sim.greet(0, 1);
        sim.run_until(sim.now + SEC);
        sim.hosts[1].reading = false;
        for round in 0..200u16 {
            sim.say(0, 1, format!("m{round}"));
            for i in 0..100u16 {
                let from = SocketAddr::from(([10, 8, (round % 200) as u8, 1], 1000 + i));
                let bytes: Vec<u8> = match rng.u8(0..3) {
                    0 => Packet::greeting(Kind::Hello, rng.u64(1..), 0, 1, 0, "x").encode(),
                    1 => vec![0xC6, b'K', b'T', 2, 4, 0, 1, 2],
                    _ => {
                        let mut b = vec![0xC6, b'K', b'T', 2, 4, 0];
                        b.resize(65_000, b'x');
                        b
                    }
                };
                sim.inject(from, addr(1), bytes);
            }
            sim.run_until(sim.now + 50 * MS);
        }
        let m = sim.core(1).memory();
        assert!(m.runs == 1 && m.events <= EVENT_QUEUE, "seed {seed}: {m:?}");
        sim.hosts[1].reading = true;
        sim.read_events(1);
        sim.run_until(sim.now + 30 * SEC);
        check_delivery(&sim, 0, 1, true);
        let lines = sim.hosts[1].shown.len();
        assert!(
            lines < 2 * 1025 + 300,
            "seed {seed}: {lines} lines for 60,000 datagrams"
        );
    }
}

/// On a link that loses nothing, nothing is sent twice, however large the burst.
#[test]
fn a_perfect_link_carries_every_datagram_once() {
    for seed in seeds(5000..5005) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut sim = Sim::new(
            seed,
            2,
            rng.bool().then_some(b"k".as_slice()),
            Link::perfect(),
        );
        sim.connect(0, 1);
        for i in 0..5000 {
            let text = text_of(&mut rng, i);
            sim.say(0, 1, text);
        }
        sim.run_until(sim.now + 30 * SEC);
        check_delivery(&sim, 0, 1, true);
        let stats = sim.core(0).stats().clone();
        assert_eq!(stats.retransmits, 0, "seed {seed}: {stats:?}");
        assert_eq!(sim.core(1).stats().duplicates, 0, "seed {seed}");
    }
}
