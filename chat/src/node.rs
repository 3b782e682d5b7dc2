//! A chat node on a UDP socket (and, speaking IP Messenger, a second one on its port): the
//! thin driver of [`Core`]. A receive coroutine per socket feeds it datagrams; a timer coroutine sleeps until its next deadline (an idle node wakes every
//! few seconds, not every few milliseconds) and is woken early when a send moves the deadline
//! closer; whoever takes events waits on a doorbell. The core sits behind a mutex whose
//! critical sections never yield; datagrams are sent after it is released.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use may::net::UdpSocket;
use may::sync::mpsc;
use ring::rand::SecureRandom;

use crate::core::{
    self, Config, Core, Event, Greeting, IpmsgUser, PeerInfo, SendError, Sent, Stats, Via,
};
use crate::transfer::offer::OfferedFile;

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

/// Wakes one waiter; rings that come while it is awake are one ring.
struct Doorbell {
    tx: mpsc::Sender<()>,
    rung: AtomicBool,
}

impl Doorbell {
    fn new() -> (Doorbell, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        (
            Doorbell {
                tx,
                rung: AtomicBool::new(false),
            },
            rx,
        )
    }

    fn ring(&self) {
        if !self.rung.swap(true, Ordering::SeqCst) {
            let _ = self.tx.send(());
        }
    }

    /// Rings even if a ring is pending: for a waiter that may have missed one.
    fn force(&self) {
        self.rung.store(true, Ordering::SeqCst);
        let _ = self.tx.send(());
    }

    /// Called by the waiter before it checks whether there is anything to do.
    fn answer(&self) {
        self.rung.store(false, Ordering::SeqCst);
    }
}

struct Inner {
    socket: UdpSocket,
    /// The IP Messenger socket.
    ipmsg: Option<UdpSocket>,
    core: Mutex<Core>,
    /// The deadline the timer coroutine sleeps until, in nanoseconds after `origin`.
    armed: AtomicU64,
    origin: Instant,
    timer: Doorbell,
    events: Doorbell,
    families: Families,
    stopped: may::sync::SyncFlag,
}

/// What the core has for the driver after an input.
struct Output {
    transmits: Vec<core::Transmit>,
    deadline: Instant,
    events: bool,
}

impl Output {
    fn take(core: &mut Core) -> Output {
        Output {
            transmits: std::iter::from_fn(|| core.poll_transmit()).collect(),
            deadline: core.poll_timeout(),
            events: core.has_events(),
        }
    }
}

/// Datagrams handled under one lock after the one that woke the receive loop.
const BATCH: usize = 63;

/// A running node. Dropping it does not stop it; call [`Node::stop`].
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// The user's end of the event stream.
pub struct Events {
    node: Node,
    bell: mpsc::Receiver<()>,
}

/// How often the watchdog looks at the timer coroutine.
const WATCH: Duration = Duration::from_secs(1);
/// How far past its deadline the timer may be before the watchdog wakes it.
const OVERDUE: Duration = Duration::from_millis(100);

/// Wakes the timer coroutine when it sleeps past its deadline: may can lose the timeout of
/// a timed wait (seen on a loaded machine: `recv_timeout` of 1 ms never returned), and with
/// every datagram of a stream lost nothing else woke the timer, so retransmissions and pings
/// stopped for good. This bounds such a loss to about a second.
fn watch_timer(node: std::sync::Weak<Inner>) {
    loop {
        corokit_common::sleep(WATCH);
        let Some(inner) = node.upgrade() else { return };
        if inner.stopped.is_fired() {
            return;
        }
        let now = Instant::now().saturating_duration_since(inner.origin);
        let armed = Duration::from_nanos(inner.armed.load(Ordering::SeqCst));
        if now > armed + OVERDUE {
            inner.timer.force();
        }
    }
}

fn lock(m: &Mutex<Core>) -> MutexGuard<'_, Core> {
    // A poisoned core is still consistent: no section leaves it half-changed before a panic
    // can happen (panics would be bugs in pure code, caught by the tests).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// 32 bytes from the operating system's random source.
fn seed() -> io::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| io::Error::other("no randomness from the operating system"))?;
    Ok(seed)
}

impl Node {
    /// Starts a node on an already-bound socket, and an IPv4 socket for IP Messenger when
    /// the config speaks it. Discovery, if the config asks for it, is limited to the
    /// families the socket speaks. A connected socket (`chat send`) reports a destination
    /// where nothing listens as [`Event::Unreachable`].
    pub fn start(
        socket: UdpSocket,
        ipmsg: Option<UdpSocket>,
        mut config: Config,
    ) -> io::Result<(Node, Events)> {
        if ipmsg.is_none() {
            config.ipmsg = None;
        }
        if let Some(s) = &ipmsg {
            if config
                .ipmsg
                .as_ref()
                .is_some_and(|c| !c.broadcasts.is_empty())
            {
                s.set_broadcast(true)?;
            }
        }
        let families = Families::of(&socket)?;
        if let Some(d) = &mut config.discovery {
            d.ipv4 &= families != Families::V6;
            d.ipv6 &= families != Families::V4;
            if d.ipv4 {
                socket.set_broadcast(true)?;
                // Best effort: a host without a multicast route still gets broadcasts.
                let _ = socket.join_multicast_v4(&core::MULTICAST_V4, &Ipv4Addr::UNSPECIFIED);
            }
        }
        let origin = Instant::now();
        let core = Core::new(config, seed()?, origin);
        let (timer, timer_rx) = Doorbell::new();
        let (events, events_rx) = Doorbell::new();
        let node = Node {
            inner: Arc::new(Inner {
                socket,
                ipmsg,
                core: Mutex::new(core),
                armed: AtomicU64::new(0),
                origin,
                timer,
                events,
                families,
                stopped: may::sync::SyncFlag::new(),
            }),
        };
        node.with_core(|c, now| c.start(now));
        let receiver = node.clone();
        corokit_common::spawn(move || receiver.receive_loop(Via::Chat))
            .map_err(io::Error::other)?;
        if node.inner.ipmsg.is_some() {
            let receiver = node.clone();
            corokit_common::spawn(move || receiver.receive_loop(Via::Ipmsg))
                .map_err(io::Error::other)?;
        }
        let keeper = node.clone();
        corokit_common::spawn(move || keeper.timer_loop(timer_rx)).map_err(io::Error::other)?;
        // The watchdog holds the node weakly: a stopped node's sockets close at once.
        let watched = Arc::downgrade(&node.inner);
        corokit_common::spawn(move || watch_timer(watched)).map_err(io::Error::other)?;
        let events = Events {
            node: node.clone(),
            bell: events_rx,
        };
        Ok((node, events))
    }

    /// Runs `f` on the core at the current time, then sends what it queued, wakes the timer
    /// if the deadline moved closer, and rings for events.
    fn with_core<T>(&self, f: impl FnOnce(&mut Core, Instant) -> T) -> T {
        self.with_core_then(f, |_| ())
    }

    /// As `with_core`, with `then` run on the result after the core is let go and before
    /// its datagrams leave.
    fn with_core_then<T>(
        &self,
        f: impl FnOnce(&mut Core, Instant) -> T,
        then: impl FnOnce(&T),
    ) -> T {
        let (result, output) = {
            let mut core = lock(&self.inner.core);
            let result = f(&mut core, Instant::now());
            (result, Output::take(&mut core))
        };
        then(&result);
        self.deliver(output);
        result
    }

    fn deliver(&self, output: Output) {
        let mut refused = None;
        for t in output.transmits {
            let Some(socket) = self.socket(t.via) else {
                continue;
            };
            // Errors (an unreachable network, say) are left to retransmission and, in the
            // end, to not-delivered; but on a connected socket a send can be the call that
            // reports the ICMP "port unreachable" of an earlier one.
            if let Err(e) = socket.send_to(&t.bytes, t.to) {
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    refused = Some(t.to);
                }
            }
        }
        if self.nanos(output.deadline) < self.inner.armed.load(Ordering::SeqCst) {
            self.inner.timer.ring();
        }
        if output.events {
            self.inner.events.ring();
        }
        if let Some(to) = refused {
            let more = {
                let mut core = lock(&self.inner.core);
                core.handle_unreachable(Instant::now(), to);
                Output::take(&mut core)
            };
            self.deliver(more);
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.inner.origin).as_nanos() as u64
    }

    fn socket(&self, via: Via) -> Option<&UdpSocket> {
        match via {
            Via::Chat => Some(&self.inner.socket),
            Via::Ipmsg => self.inner.ipmsg.as_ref(),
        }
    }

    fn receive_loop(&self, via: Via) {
        let socket = self.socket(via).expect("a socket for each receive loop");
        let handle = |c: &mut Core, now, from, bytes: &[u8]| match via {
            Via::Chat => c.handle_datagram(now, from, bytes),
            Via::Ipmsg => c.handle_ipmsg(now, from, bytes),
        };
        // The largest UDP payload: anything smaller would truncate silently.
        let mut buf = vec![0u8; 65_536];
        loop {
            let received = socket.recv_from(&mut buf);
            if self.inner.stopped.is_fired() {
                return;
            }
            match received {
                Ok((0, from)) if from.ip().is_loopback() => {} // the wake-up from `stop`
                Ok((n, from)) => {
                    let raw = socket.inner();
                    self.with_core(|c, now| {
                        handle(c, now, from, &buf[..n]);
                        // Whatever else has arrived is handled under the same lock, and
                        // answered with one acknowledgement per sender. The socket is
                        // non-blocking: this never waits.
                        for _ in 0..BATCH {
                            match raw.recv_from(&mut buf) {
                                Ok((0, _)) => {}
                                Ok((n, from)) => handle(c, now, from, &buf[..n]),
                                Err(_) => break,
                            }
                        }
                    });
                    // A socket that always has more would keep this coroutine running and
                    // starve the one showing what arrives (one worker runs both).
                    may::coroutine::yield_now();
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    if let Ok(peer) = socket.inner().peer_addr() {
                        self.with_core(|c, now| c.handle_unreachable(now, peer));
                    }
                }
                Err(_) => {}
            }
        }
    }

    fn timer_loop(&self, kicks: mpsc::Receiver<()>) {
        loop {
            self.inner.timer.answer();
            let deadline = lock(&self.inner.core).poll_timeout();
            let now = Instant::now();
            if deadline <= now {
                self.with_core(|c, now| c.handle_timeout(now));
            } else {
                self.inner
                    .armed
                    .store(self.nanos(deadline), Ordering::SeqCst);
                let woken = kicks.recv_timeout(corokit_common::wait_limit(deadline - now));
                // A timed-out wait resumes on may's timer thread: move back to a worker.
                may::coroutine::yield_now();
                if woken.is_err() && !self.inner.stopped.is_fired() {
                    self.with_core(|c, now| c.handle_timeout(now));
                }
            }
            if self.inner.stopped.is_fired() {
                return;
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.socket.local_addr()
    }

    pub fn stats(&self) -> Stats {
        lock(&self.inner.core).stats().clone()
    }

    pub fn nick(&self) -> String {
        lock(&self.inner.core).nick().to_string()
    }

    pub fn set_nick(&self, nick: &str) {
        self.with_core(|c, now| c.set_nick(now, nick));
    }

    /// Known peers, most recently heard first.
    pub fn peers(&self) -> Vec<PeerInfo> {
        lock(&self.inner.core).peers(Instant::now())
    }

    /// The chat peer `addr` belongs to: (listed address, nickname).
    pub fn chat_peer(&self, addr: SocketAddr) -> Option<(SocketAddr, String)> {
        lock(&self.inner.core)
            .chat_peer(addr)
            .map(|(a, n)| (a, n.to_string()))
    }

    /// The IP Messenger user at `addr`: (nickname, details).
    pub fn ipmsg_user(&self, addr: SocketAddr) -> Option<(String, IpmsgUser)> {
        lock(&self.inner.core)
            .ipmsg_user(addr)
            .map(|(n, u)| (n.to_string(), u.clone()))
    }

    /// True when a message to `addr` goes by IP Messenger.
    pub fn is_ipmsg(&self, addr: SocketAddr) -> bool {
        lock(&self.inner.core).is_ipmsg(addr)
    }

    /// `/away [TEXT]` (`Some`) and `/back` (`None`), told to IP Messenger users.
    pub fn set_away(&self, away: Option<String>) {
        self.with_core(|c, now| c.set_away(now, away));
    }

    /// Greets `addr` (given by hand), a few times until it answers.
    pub fn greet(&self, addr: SocketAddr) {
        self.with_core(|c, now| c.greet(now, addr));
    }

    /// How greeting `addr` went.
    pub fn greeting(&self, addr: SocketAddr) -> Option<Greeting> {
        lock(&self.inner.core).greeting(addr)
    }

    /// Waits up to `limit` for a greeting to `addr` to be settled (answered as a chat peer,
    /// refused, unreachable, or answered with plain text).
    pub fn wait_for_greeting(&self, addr: SocketAddr, limit: Duration) -> Option<Greeting> {
        let until = Instant::now() + limit;
        loop {
            let g = self.greeting(addr);
            if !matches!(g, Some(Greeting::Pending)) || Instant::now() >= until {
                return g;
            }
            if self.inner.stopped.wait_timeout(Duration::from_millis(5)) {
                return g;
            }
        }
    }

    /// Sends `text` to `to` (see [`Core::send`]). While the peer has no room, waits, for as
    /// long as a silent peer would be given before its messages are not delivered.
    pub fn send(&self, to: SocketAddr, text: &str) -> Result<Sent, SendError> {
        let patience = lock(&self.inner.core).timing().dead_after();
        loop {
            match self.with_core(|c, now| c.send(now, to, text)) {
                Err(SendError::Busy { stalled, .. })
                    if stalled < patience && !self.inner.stopped.is_fired() =>
                {
                    corokit_common::sleep(Duration::from_millis(1));
                }
                other => return other,
            }
        }
    }

    /// Offers `files` to `to` (see [`Core::send_offer`]): how it was sent, and the offer's
    /// packet number. `made` is told the number before the offer's datagram leaves: a quick
    /// peer may ask for the files before this returns.
    pub fn send_offer(
        &self,
        to: SocketAddr,
        text: &str,
        files: &[OfferedFile],
        made: impl FnOnce(u64),
    ) -> Result<(Sent, u64), SendError> {
        self.with_core_then(
            |c, now| c.send_offer(now, to, text, files),
            |result| {
                if let Ok((_, packet)) = result {
                    made(*packet);
                }
            },
        )
    }

    pub fn decline_offer(&self, to: SocketAddr, packet: u64) -> Result<(), SendError> {
        self.with_core(|c, now| c.decline_offer(now, to, packet))
    }

    pub fn withdraw_offer(&self, to: SocketAddr, packet: u64) -> Result<(), SendError> {
        self.with_core(|c, now| c.withdraw_offer(now, to, packet))
    }

    /// Says goodbye to every peer and stops the node's coroutines.
    pub fn stop(&self) {
        self.with_core(|c, now| c.stop(now));
        self.inner.stopped.fire();
        self.inner.timer.ring();
        self.inner.events.ring();
        // Wake the receive loops with a datagram to themselves so they see the flag (by IPv4
        // where they can: IPv6 may be off on the loopback interface).
        for socket in std::iter::once(&self.inner.socket).chain(&self.inner.ipmsg) {
            self.wake(socket);
        }
    }

    fn wake(&self, socket: &UdpSocket) {
        if let Ok(addr) = socket.local_addr() {
            let wake = match addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => {
                    SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
                }
                IpAddr::V6(ip) if ip.is_unspecified() && self.inner.families == Families::Both => {
                    SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
                }
                IpAddr::V6(ip) if ip.is_unspecified() => {
                    SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
                }
                _ => addr,
            };
            let _ = socket.send_to(&[], wake);
        }
    }
}

impl Events {
    /// The next event, waiting at most `timeout` (`None`: until there is one or the node
    /// stops).
    pub fn recv_timeout(&self, timeout: Option<Duration>) -> Option<Event> {
        let until = timeout.map(|t| Instant::now() + t);
        loop {
            self.node.inner.events.answer();
            if let Some(e) = self.node.with_core(|c, _| c.poll_event()) {
                return Some(e);
            }
            if self.node.inner.stopped.is_fired() {
                return None;
            }
            match until {
                None => self.bell.recv().ok()?,
                Some(until) => {
                    let left = until.checked_duration_since(Instant::now())?;
                    let rung = self.bell.recv_timeout(corokit_common::wait_limit(left));
                    may::coroutine::yield_now();
                    if rung.is_err() {
                        return self.node.with_core(|c, _| c.poll_event());
                    }
                }
            }
        }
    }

    pub fn recv(&self) -> Option<Event> {
        self.recv_timeout(None)
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.node.with_core(|c, _| c.poll_event())
    }
}
