//! IP Messenger peers inside the core: who is on the LAN's IPMsg port, their messages both
//! ways and their absence, with the same bounds as the rest of chat. Pure like the rest of
//! the core: packets, the time and the clock at start go in, packets and events come out.
//!
//! What it decides:
//! - **Presence.** Entries are broadcast at start (and exits at the end) where the config
//!   says; BR_ENTRY is answered with ANSENTRY in the encoding that peer reads; BR_ABSENCE
//!   updates a peer. A BR_EXIT is believed only if the peer then stays silent: anyone can
//!   forge one, so the peer is asked for its entry and kept if it answers.
//! - **Messages.** Ours ask for an acknowledgement and are sent again (with chat's backoff)
//!   until RECVMSG names them, else they are reported not delivered. Theirs are shown once
//!   per packet number (duplicates are acknowledged again, never shown twice), acknowledged
//!   unless they are broadcasts or automatic replies, and only when the user's queue took
//!   them, so a message dropped for want of room is sent again by its sender.
//! - **Bounds.** The users table, messages waiting for acknowledgement, packet numbers
//!   remembered per user, and automatic answers per second; rate limits per source are the
//!   core's.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use corokit_common::TokenBucket;
use encoding_rs::Encoding;

use super::events::{Event, IpmsgUser, Protocol, Topic};
use super::{Core, Greeting, Hello, SendError, Sent, Transmit, Via};
use crate::ipmsg::charset::{self, Client};
use crate::ipmsg::packet::{self, mode, opt, Entry, Packet};
use crate::transfer::offer::{self, OfferedFile};

/// IP Messenger users in the table.
pub const MAX_USERS: usize = 1024;
/// Our messages waiting for an acknowledgement, per user and in all.
const WAITING_PER_USER: usize = 64;
const WAITING: usize = 1024;
/// Packet numbers remembered per user, to show a message sent again only once.
const SEEN: usize = 256;
/// How long a peer that said BR_EXIT has to show it is still there.
const EXIT_PROBE: Duration = Duration::from_secs(5);
/// Users kept per host: an IP Messenger client has one port; more are a host faking many.
const USERS_PER_HOST: usize = 4;
/// Longest absence text (sent to whoever writes while we are away).
pub const MAX_AWAY: usize = 1024;
/// Automatic answers (ANSENTRY, absence replies, info) in all: a burst and per second.
const ANSWER_BURST: f64 = 200.0;
const ANSWER_RATE: f64 = 100.0;
/// Our broadcast packet numbers remembered, to recognise them when they come back.
const OURS: usize = 16;

/// How `chat` speaks IP Messenger.
#[derive(Debug, Clone)]
pub struct IpmsgConfig {
    /// Where IP Messenger peers listen (2425): an address with this port is one.
    pub port: u16,
    pub user: String,
    pub host: String,
    pub group: String,
    /// For peers that do not say what they read (`--ipmsg-encoding`).
    pub legacy: &'static Encoding,
    /// Where entries and exits are broadcast; empty for none.
    pub broadcasts: Vec<SocketAddr>,
    /// Seconds since the Unix epoch at start: packet numbers follow the clock, as IP
    /// Messenger's do, so a restarted run does not reuse the numbers of the last.
    pub clock: u64,
    /// This chat has a key: IP Messenger peers are marked unauthenticated.
    pub keyed: bool,
    /// Say BR_EXIT to the users we know when we stop. Not where another program holds the
    /// IPMsg port on this host (`chat send` beside a running chat): clients know hosts by
    /// address, and would take that program for gone.
    pub exit_to_users: bool,
}

#[derive(Debug)]
struct User {
    nick: String,
    info: IpmsgUser,
    /// It advertised CAPUTF8OPT: UTF-8 with UTF8OPT reaches it.
    caps_utf8: bool,
    last_heard: Instant,
    talked: Option<Instant>,
    by_hand: bool,
    /// The user was told it joined.
    shown: bool,
    /// Packet numbers of messages already shown, oldest first.
    seen: VecDeque<u64>,
    /// It said BR_EXIT; it leaves at this time unless it speaks first.
    leaving: Option<Instant>,
    /// Our entry went to it in the encoding it reads (the broadcast one may not have).
    entry_sent: bool,
    /// It sent an entry (BR_ENTRY, ANSENTRY, BR_ABSENCE), as a client does: one known only
    /// from a message (which anyone can forge from anywhere) is not listed, nor sent lines
    /// meant for everyone, until it answers our entry.
    entered: bool,
}

impl User {
    /// In a conversation: added by hand, or we sent it something lately (what it sends us
    /// does not count: a stranger could keep itself in the table that way).
    fn engaged(
        &self,
        now: Instant,
        outbox: &BTreeMap<SocketAddr, VecDeque<Outgoing>>,
        to: SocketAddr,
    ) -> bool {
        self.by_hand
            || outbox.contains_key(&to)
            || self
                .talked
                .is_some_and(|t| now.saturating_duration_since(t) < super::peers::CONVERSATION)
    }
}

/// A message of ours to an IPMsg user. One per user is in flight at a time (the head of its
/// queue), the rest wait: iptux drops, after acknowledging it, a message numbered below one
/// it already has, so a retransmission must never follow a later message.
#[derive(Debug)]
struct Outgoing {
    id: u64,
    /// What a not-delivered report quotes.
    text: String,
    number: u64,
    bytes: Vec<u8>,
    /// 0 while it waits behind another.
    sends: u32,
    next_at: Instant,
}

/// The IP Messenger side of a core.
#[derive(Debug)]
pub(super) struct Ipmsg {
    config: IpmsgConfig,
    user_field: Vec<u8>,
    host_field: Vec<u8>,
    users: BTreeMap<SocketAddr, User>,
    outbox: BTreeMap<SocketAddr, VecDeque<Outgoing>>,
    hellos: BTreeMap<SocketAddr, Hello>,
    started: Instant,
    last_number: u64,
    ours: VecDeque<u64>,
    away: Option<String>,
    answers: TokenBucket,
    entered: bool,
}

impl Ipmsg {
    pub(super) fn new(config: IpmsgConfig, now: Instant) -> Ipmsg {
        let field = |s: &str| packet::header_name(&charset::encode(s, config.legacy));
        Ipmsg {
            user_field: field(&config.user),
            host_field: field(&config.host),
            users: BTreeMap::new(),
            outbox: BTreeMap::new(),
            hellos: BTreeMap::new(),
            started: now,
            last_number: 0,
            ours: VecDeque::new(),
            away: None,
            answers: TokenBucket::full(ANSWER_RATE, ANSWER_BURST, now),
            entered: false,
            config,
        }
    }

    pub(super) fn port(&self) -> u16 {
        self.config.port
    }

    pub(super) fn len(&self) -> usize {
        self.users.len()
    }

    pub(super) fn waiting(&self) -> usize {
        self.outbox.values().map(VecDeque::len).sum()
    }

    fn protocol(&self) -> Protocol {
        Protocol::Ipmsg {
            unauthenticated: self.config.keyed,
        }
    }

    /// A packet number: the clock's seconds, or one more than the last if that is later.
    fn number(&mut self, now: Instant) -> u64 {
        let clock = self.config.clock + now.saturating_duration_since(self.started).as_secs();
        self.last_number = clock.max(self.last_number + 1);
        self.last_number
    }

    fn packet(&mut self, now: Instant, command: u32, extra: &[u8]) -> (u64, Vec<u8>) {
        let number = self.number(now);
        let bytes = packet::write(number, &self.user_field, &self.host_field, command, extra);
        (number, bytes)
    }

    /// An entry-type packet (BR_ENTRY, ANSENTRY, BR_ABSENCE, BR_EXIT) for `to` (`None`: a
    /// broadcast, which by the spec never carries UTF8OPT).
    fn entry(&mut self, now: Instant, base: u32, nick: &str, to: Option<SocketAddr>) -> Vec<u8> {
        let (encoding, utf8) = match to.and_then(|a| self.users.get(&a)) {
            Some(u) => charset::outgoing(u.info.client, u.caps_utf8, self.config.legacy),
            None => (self.config.legacy, false),
        };
        let utf8 = utf8 && to.is_some();
        let mut command = base | opt::CAPUTF8OPT;
        if utf8 {
            command |= opt::UTF8OPT;
        }
        if self.away.is_some() && base != mode::BR_EXIT {
            command |= opt::ABSENCEOPT;
        }
        let group = self.config.group.clone();
        let extra = packet::entry_extra(
            &charset::encode(nick, encoding),
            &charset::encode(&group, encoding),
            &self.config.user,
            &self.config.host,
            nick,
            &group,
        );
        let (number, bytes) = self.packet(now, command, &extra);
        if to.is_none() {
            if self.ours.len() >= OURS {
                self.ours.pop_front();
            }
            self.ours.push_back(number);
        }
        bytes
    }

    /// Everything waiting for `to` is not delivered (it left, or gave way to another).
    fn give_up(&mut self, to: SocketAddr, nick: Option<&str>) -> Vec<Event> {
        self.outbox
            .remove(&to)
            .into_iter()
            .flatten()
            .map(|w| Event::NotDelivered {
                to,
                nick: nick.map(str::to_string),
                id: w.id,
                text: w.text,
            })
            .collect()
    }

    /// True for a packet we broadcast, heard back.
    fn is_ours(&self, p: &Packet) -> bool {
        self.ours.contains(&p.number) && p.user == self.user_field && p.host == self.host_field
    }

    fn next_deadline(&self) -> Option<Instant> {
        let waiting = self
            .outbox
            .values()
            .filter_map(VecDeque::front)
            .map(|w| w.next_at);
        let hellos = self
            .hellos
            .values()
            .filter(|h| h.state == Greeting::Pending)
            .map(|h| h.next_at);
        let leaving = self.users.values().filter_map(|u| u.leaving);
        waiting.chain(hellos).chain(leaving).min()
    }
}

impl Core {
    fn ipmsg_transmit(&mut self, to: SocketAddr, bytes: Vec<u8>) {
        self.transmits.push_back(Transmit {
            to,
            bytes,
            via: Via::Ipmsg,
        });
    }

    /// True when a message to `addr` goes by IP Messenger: an IPMsg user is there, or it is
    /// at the IPMsg port and no chat peer is.
    pub fn is_ipmsg(&self, addr: SocketAddr) -> bool {
        let addr = super::canonical(addr);
        let Some(ip) = &self.ipmsg else {
            return false;
        };
        ip.users.contains_key(&addr)
            || (addr.port() == ip.port() && self.peers.run_at(addr).is_none())
    }

    /// The IP Messenger user at `addr`, as (nickname, details).
    pub fn ipmsg_user(&self, addr: SocketAddr) -> Option<(&str, &IpmsgUser)> {
        let u = self.ipmsg.as_ref()?.users.get(&super::canonical(addr))?;
        Some((&u.nick, &u.info))
    }

    pub(super) fn ipmsg_peers(&self, now: Instant) -> Vec<super::PeerInfo> {
        let Some(ip) = &self.ipmsg else {
            return Vec::new();
        };
        ip.users
            .iter()
            .filter(|(_, u)| u.entered || u.by_hand || u.talked.is_some())
            .map(|(addr, u)| super::PeerInfo {
                addr: *addr,
                also: Vec::new(),
                nick: Some(u.nick.clone()),
                protocol: ip.protocol(),
                last_seen: now.saturating_duration_since(u.last_heard),
                ipmsg: Some(u.info.clone()),
            })
            .collect()
    }

    pub(super) fn ipmsg_greeting(&self, addr: SocketAddr) -> Option<Greeting> {
        let ip = self.ipmsg.as_ref()?;
        if ip.users.contains_key(&addr) {
            return Some(Greeting::Ipmsg);
        }
        ip.hellos.get(&addr).map(|h| h.state)
    }

    /// Asks `addr` for its entry, a few times until it answers.
    pub(super) fn ipmsg_greet(&mut self, now: Instant, addr: SocketAddr) {
        let Some(ip) = &mut self.ipmsg else {
            return;
        };
        if let Some(u) = ip.users.get_mut(&addr) {
            u.by_hand = true;
            return;
        }
        if ip
            .hellos
            .get(&addr)
            .is_some_and(|h| h.state == Greeting::Pending)
        {
            return;
        }
        if super::begin_hello(&mut ip.hellos, addr, now) {
            self.ipmsg_timeout(now);
        }
    }

    /// Sends `text` to the IP Messenger user at `to` (known or not), asking for an
    /// acknowledgement.
    pub(super) fn ipmsg_send(
        &mut self,
        now: Instant,
        to: SocketAddr,
        text: &str,
    ) -> Result<Sent, SendError> {
        self.ipmsg_send_with(now, to, text, None)
            .map(|(sent, _)| sent)
    }

    /// Tells the IP Messenger user at `to` we will not take its offer `packet`
    /// (RELEASEFILES).
    pub(super) fn ipmsg_release(&mut self, now: Instant, to: SocketAddr, packet: u64) {
        if self.ipmsg.is_some() {
            self.ipmsg_reply(now, to, mode::RELEASEFILES, &packet.to_string());
        }
    }

    pub(super) fn ipmsg_send_with(
        &mut self,
        now: Instant,
        to: SocketAddr,
        text: &str,
        files: Option<&[OfferedFile]>,
    ) -> Result<(Sent, u64), SendError> {
        let id = self.next_id;
        let Some(ip) = &mut self.ipmsg else {
            return Err(SendError::Unreachable(to));
        };
        if ip
            .hellos
            .get(&to)
            .is_some_and(|h| h.state == Greeting::Unreachable)
        {
            return Err(SendError::Unreachable(to));
        }
        let (client, caps) = ip
            .users
            .get(&to)
            .map_or((Client::Other, false), |u| (u.info.client, u.caps_utf8));
        let (encoding, utf8) = charset::outgoing(client, caps, ip.config.legacy);
        let mut extra = charset::encode(text, encoding);
        extra.push(0);
        let mut command = mode::SENDMSG | opt::SENDCHECKOPT;
        if utf8 {
            command |= opt::UTF8OPT;
        }
        if let Some(files) = files {
            command |= opt::FILEATTACHOPT;
            extra.extend_from_slice(&offer::write_files(files, |n| charset::encode(n, encoding)));
            extra.push(0);
        }
        // Our header is at most ~200 bytes: the text (and the file list) decides.
        let room = packet::MAX_SENT - 40 - ip.user_field.len() - ip.host_field.len();
        if extra.len() > room {
            return Err(SendError::TooLongForIpmsg {
                to,
                len: extra.len() - 1,
                max: room - 1,
                encoding: encoding.name(),
            });
        }
        let for_user = ip.outbox.get(&to).map_or(0, VecDeque::len);
        if for_user >= WAITING_PER_USER || ip.waiting() >= WAITING {
            let stalled = ip
                .outbox
                .get(&to)
                .and_then(VecDeque::front)
                .map(|w| now.saturating_duration_since(w.next_at))
                .unwrap_or_default();
            return Err(SendError::Busy { to, stalled });
        }
        // Numbered now, in the order sent: the queue keeps them in order on the wire.
        let (number, bytes) = ip.packet(now, command, &extra);
        let queue = ip.outbox.entry(to).or_default();
        let first = queue.is_empty();
        queue.push_back(Outgoing {
            id,
            text: text.to_string(),
            number,
            bytes: bytes.clone(),
            sends: u32::from(first),
            next_at: now + self.timing.backoff(1),
        });
        let known = match ip.users.get_mut(&to) {
            Some(u) => {
                u.talked = Some(now);
                true
            }
            None => false,
        };
        self.next_id += 1;
        if first {
            self.ipmsg_transmit(to, bytes);
        }
        if !known {
            // Learn who it is (and how it reads) for the next message.
            self.ipmsg_greet(now, to);
        }
        self.arm(now + self.timing.backoff(1));
        Ok((Sent::Reliable(id), number))
    }

    /// Our entry to every broadcast address (at start), and to peers greeted by hand.
    pub(super) fn ipmsg_timeout(&mut self, now: Instant) {
        let nick = self.nick.clone();
        let tries = self.timing.tries;
        let timing = self.timing;
        let Some(ip) = &mut self.ipmsg else {
            return;
        };
        let mut out = Vec::new();
        if !ip.entered {
            ip.entered = true;
            let broadcasts = ip.config.broadcasts.clone();
            if !broadcasts.is_empty() {
                // One packet number for all of them, as iptux does: one entry, many paths.
                let bytes = ip.entry(now, mode::BR_ENTRY, &nick, None);
                out.extend(broadcasts.into_iter().map(|to| (to, bytes.clone())));
            }
        }
        for addr in super::hellos_due(&mut ip.hellos, now) {
            let bytes = ip.entry(now, mode::BR_ENTRY, &nick, Some(addr));
            out.push((addr, bytes));
        }
        let mut events = Vec::new();
        for (to, queue) in ip.outbox.iter_mut() {
            let Some(w) = queue.front_mut() else { continue };
            if w.next_at > now {
                continue;
            }
            if w.sends < tries {
                w.sends += 1;
                w.next_at = now + timing.backoff(w.sends);
                out.push((*to, w.bytes.clone()));
                self.stats.retransmits += 1;
                continue;
            }
            let w = queue.pop_front().expect("a head");
            let nick = ip.users.get(to).map(|u| u.nick.clone());
            events.push(Event::NotDelivered {
                to: *to,
                nick,
                id: w.id,
                text: w.text,
            });
            if let Some(next) = queue.front_mut() {
                next.sends = 1;
                next.next_at = now + timing.backoff(1);
                out.push((*to, next.bytes.clone()));
            }
        }
        ip.outbox.retain(|_, q| !q.is_empty());
        let left: Vec<SocketAddr> = ip
            .users
            .iter()
            .filter(|(_, u)| u.leaving.is_some_and(|t| t <= now))
            .map(|(a, _)| *a)
            .collect();
        let protocol = ip.protocol();
        for addr in left {
            let u = ip.users.remove(&addr).expect("listed");
            events.extend(ip.give_up(addr, Some(&u.nick)));
            if u.shown {
                events.push(Event::Leave {
                    addr,
                    nick: u.nick,
                    expired: false,
                    protocol,
                });
            }
        }
        if let Some(t) = ip.next_deadline() {
            self.arm(t);
        }
        for (to, bytes) in out {
            self.ipmsg_transmit(to, bytes);
        }
        for e in events {
            let source = match &e {
                Event::Leave { addr, .. } => Some(*addr),
                _ => None,
            };
            self.events.push(source, e);
        }
    }

    /// Nothing listens at `addr` (ICMP port unreachable on a connected socket).
    pub(super) fn ipmsg_unreachable(&mut self, addr: SocketAddr) {
        let Some(ip) = &mut self.ipmsg else {
            return;
        };
        if let Some(h) = ip.hellos.get_mut(&addr) {
            if matches!(h.state, Greeting::Pending | Greeting::Unanswered) {
                h.state = Greeting::Unreachable;
                self.events.push(None, Event::Unreachable { to: addr });
            }
        }
    }

    pub(super) fn ipmsg_next_deadline(&self) -> Option<Instant> {
        self.ipmsg.as_ref()?.next_deadline()
    }

    /// Our new nickname or absence, to every IPMsg user we know.
    pub(super) fn ipmsg_absence(&mut self, now: Instant) {
        self.ipmsg_tell_all(now, mode::BR_ABSENCE);
    }

    /// Goodbye to every IPMsg user and by broadcast.
    pub(super) fn ipmsg_exit(&mut self, now: Instant) {
        self.ipmsg_tell_all(now, mode::BR_EXIT);
    }

    fn ipmsg_tell_all(&mut self, now: Instant, base: u32) {
        let nick = self.nick.clone();
        let Some(ip) = &mut self.ipmsg else {
            return;
        };
        if base == mode::BR_EXIT && !ip.config.exit_to_users {
            return;
        }
        let mut out = Vec::new();
        // An absence goes only to the users we know, each in its own encoding: iptux takes
        // a broadcast in another encoding as a change of ours, and garbles all we send after.
        let broadcasts = match base {
            mode::BR_EXIT => ip.config.broadcasts.clone(),
            _ => Vec::new(),
        };
        if !broadcasts.is_empty() {
            let bytes = ip.entry(now, base, &nick, None);
            out.extend(broadcasts.into_iter().map(|to| (to, bytes.clone())));
        }
        let users: Vec<SocketAddr> = ip.users.keys().copied().collect();
        for to in users {
            let bytes = ip.entry(now, base, &nick, Some(to));
            out.push((to, bytes));
        }
        for (to, bytes) in out {
            self.ipmsg_transmit(to, bytes);
        }
    }

    /// `/away [TEXT]` (`Some`, at most [`MAX_AWAY`] bytes kept) and `/back` (`None`).
    pub fn set_away(&mut self, now: Instant, away: Option<String>) {
        if let Some(ip) = &mut self.ipmsg {
            ip.away = away.map(|mut text| {
                let mut end = text.len().min(MAX_AWAY);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text
            });
            self.ipmsg_absence(now);
        }
    }

    /// One datagram on the IP Messenger socket.
    pub fn handle_ipmsg(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let from = super::canonical(from);
        self.stats.received += 1;
        if self.ipmsg.is_none() {
            return;
        }
        if !self.within_rate(now, from) {
            self.stats.rate_limited += 1;
            return;
        }
        let p = match packet::parse(bytes) {
            Ok(p) => p,
            Err(why) => {
                self.stats.malformed += 1;
                self.trouble(
                    now,
                    Some(from),
                    Topic::IpmsgMalformed(why),
                    format!("ignored a malformed IP Messenger packet from {from}: {why}"),
                );
                return;
            }
        };
        let ip = self.ipmsg.as_mut().expect("checked");
        if ip.is_ours(&p) {
            return;
        }
        if let Some(h) = ip.hellos.get_mut(&from) {
            h.state = Greeting::Ipmsg;
        }
        let mut stays = false;
        if let Some(u) = ip.users.get_mut(&from) {
            u.last_heard = now;
            stays = u.leaving.take().is_some() && p.mode() != mode::BR_EXIT;
        }
        if stays {
            self.trouble(
                now,
                Some(from),
                Topic::ForgedExit,
                format!("{from} said it was leaving and then spoke again; it stays"),
            );
        }
        match p.mode() {
            mode::BR_ENTRY | mode::ANSENTRY | mode::BR_ABSENCE => {
                self.ipmsg_entry_packet(now, from, &p)
            }
            mode::BR_EXIT => self.ipmsg_exit_from(now, from),
            mode::SENDMSG => self.ipmsg_message(now, from, &p),
            mode::RECVMSG => self.ipmsg_ack(now, from, &p),
            mode::RELEASEFILES => {
                if let Some(packet) = p.names_number() {
                    self.events.offer(
                        from,
                        Event::OfferDeclined {
                            from,
                            packet,
                            via: super::Via::Ipmsg,
                        },
                    );
                }
            }
            mode::GETINFO | mode::GETABSENCEINFO => self.ipmsg_inform(now, from, p.mode()),
            // NOOPERATION, READMSG, and the private commands of iptux and FeiQ (icons,
            // signatures, typing notices, shared files): nothing a chat user needs.
            _ => {}
        }
    }

    /// BR_ENTRY is answered with our entry; an answer or absence notice that showed us a
    /// peer reading another encoding than our broadcast gets our entry in its own.
    fn ipmsg_entry_packet(&mut self, now: Instant, from: SocketAddr, p: &Packet) {
        if !self.ipmsg_entry(now, from, p) {
            return;
        }
        if p.mode() == mode::BR_ENTRY {
            self.ipmsg_answer(now, from, mode::ANSENTRY);
        } else {
            self.ipmsg_correct_entry(now, from);
        }
    }

    /// An entry-type packet: the user is added or updated; true if it is in the table.
    fn ipmsg_entry(&mut self, now: Instant, from: SocketAddr, p: &Packet) -> bool {
        let ip = self.ipmsg.as_mut().expect("checked");
        let legacy = ip.config.legacy;
        let client = Client::of(&p.version);
        let entry = Entry::parse(&p.extra);
        let caps = p.has(opt::CAPUTF8OPT);
        let decode = |bytes: &[u8]| charset::decode(bytes, p.command, client, legacy);
        // IP Messenger reads its UTF-8 names when CAPUTF8OPT is set; so do we.
        let nick = match (&entry.utf8_nick, caps) {
            (Some(n), true) if !n.is_empty() => n.clone(),
            _ => decode(&entry.nick),
        };
        let nick = match nick.trim() {
            "" => decode(&p.user),
            _ => nick,
        };
        let group = match (&entry.utf8_group, caps) {
            (Some(g), true) => g.clone(),
            _ => decode(&entry.group),
        };
        // iptux sets ABSENCEOPT on every entry: it is never away by that flag.
        let away = p.has(opt::ABSENCEOPT) && client != Client::Iptux;
        let info = IpmsgUser {
            user: decode(&p.user),
            host: decode(&p.host),
            group,
            client,
            version: String::from_utf8_lossy(&p.version).into_owned(),
            away,
        };
        let nick = crate::wire::truncate_nick(&nick).to_string();
        if let Some(u) = ip.users.get_mut(&from) {
            let was_away = u.info.away;
            u.nick = nick.clone();
            u.info = info;
            u.caps_utf8 = caps;
            u.entered = true;
            // A new run of the client numbers its packets from the start again.
            if p.mode() == mode::BR_ENTRY {
                u.seen.clear();
            }
            let show = u.shown && was_away != away;
            if !u.shown {
                return self.ipmsg_join(now, from);
            }
            if show {
                let protocol = self.ipmsg.as_ref().expect("checked").protocol();
                self.events.offer(
                    from,
                    Event::Away {
                        addr: from,
                        nick,
                        away,
                        protocol,
                    },
                );
            }
            return true;
        }
        if !self.ipmsg_admit(now, from) {
            return false;
        }
        let ip = self.ipmsg.as_mut().expect("checked");
        let by_hand = ip.hellos.contains_key(&from);
        ip.users.insert(
            from,
            User {
                nick,
                info,
                caps_utf8: caps,
                last_heard: now,
                talked: None,
                by_hand,
                shown: false,
                seen: VecDeque::new(),
                leaving: None,
                entry_sent: false,
                entered: true,
            },
        );
        self.ipmsg_join(now, from)
    }

    /// Tells the user `addr` joined, within the joins budget; true (it stays in the table
    /// either way).
    fn ipmsg_join(&mut self, now: Instant, addr: SocketAddr) -> bool {
        let ip = self.ipmsg.as_ref().expect("checked");
        let u = &ip.users[&addr];
        let event = Event::Join {
            addr,
            nick: u.nick.clone(),
            protocol: ip.protocol(),
            ipmsg: Some(u.info.clone()),
        };
        let shown = self.show_join(now, addr, event);
        if let Some(u) = self.ipmsg.as_mut().expect("checked").users.get_mut(&addr) {
            u.shown = shown;
        }
        true
    }

    /// Whether `from` may join the table: a host has at most [`USERS_PER_HOST`], and a full
    /// table makes room (told once per interval when it cannot).
    fn ipmsg_admit(&mut self, now: Instant, from: SocketAddr) -> bool {
        let ip = self.ipmsg.as_ref().expect("checked");
        let same_host = ip.users.keys().filter(|a| a.ip() == from.ip()).count();
        if same_host >= USERS_PER_HOST {
            return false;
        }
        if self.ipmsg_make_room(now) {
            return true;
        }
        self.trouble(
            now,
            None,
            Topic::TableFull,
            format!("not adding {from}: the peers table is full of peers in conversations"),
        );
        false
    }

    /// Room for one more user: the least recently heard one nobody is talking to goes.
    fn ipmsg_make_room(&mut self, now: Instant) -> bool {
        let ip = self.ipmsg.as_mut().expect("checked");
        if ip.users.len() < MAX_USERS {
            return true;
        }
        let victim = ip
            .users
            .iter()
            .filter(|(a, u)| !u.engaged(now, &ip.outbox, **a))
            .min_by_key(|(_, u)| u.last_heard)
            .map(|(a, _)| *a);
        let Some(addr) = victim else {
            return false;
        };
        let u = ip.users.remove(&addr).expect("listed");
        let protocol = ip.protocol();
        if u.shown {
            self.events.push(
                Some(addr),
                Event::Leave {
                    addr,
                    nick: u.nick,
                    expired: true,
                    protocol,
                },
            );
        }
        true
    }

    /// Answers GETINFO (our version) or GETABSENCEINFO (our absence text), to users we know
    /// and within the answers budget: a small question with a forged source must not
    /// become a large answer to someone else.
    fn ipmsg_inform(&mut self, now: Instant, from: SocketAddr, asked: u32) {
        if !self.ipmsg_may_answer(now, from, true) {
            return;
        }
        let (answer, text) = match asked {
            mode::GETINFO => (
                mode::SENDINFO,
                format!("corokit chat {}", env!("CARGO_PKG_VERSION")),
            ),
            _ => {
                let ip = self.ipmsg.as_ref().expect("checked");
                let away = ip.away.clone();
                (
                    mode::SENDABSENCEINFO,
                    away.unwrap_or_else(|| "Not absence mode".into()),
                )
            }
        };
        self.ipmsg_reply(now, from, answer, &text);
    }

    /// True when an automatic answer may go to `to`: within its share (a source flooding
    /// us spends only its own) and the budget for all; with `known`, only to a user in the
    /// table.
    fn ipmsg_may_answer(&mut self, now: Instant, to: SocketAddr, known: bool) -> bool {
        let listed = self
            .ipmsg
            .as_ref()
            .is_some_and(|ip| ip.users.contains_key(&to));
        if (known && !listed) || !self.may_answer(now, to) {
            return false;
        }
        self.ipmsg
            .as_mut()
            .is_some_and(|ip| ip.answers.try_take(now, 1.0))
    }

    /// An automatic entry to `to`, tailored to it, within the answers budget.
    fn ipmsg_answer(&mut self, now: Instant, to: SocketAddr, base: u32) {
        let nick = self.nick.clone();
        if !self.ipmsg_may_answer(now, to, false) {
            return;
        }
        let ip = self.ipmsg.as_mut().expect("checked");
        let bytes = ip.entry(now, base, &nick, Some(to));
        if let Some(u) = ip.users.get_mut(&to) {
            u.entry_sent = true;
        }
        self.ipmsg_transmit(to, bytes);
    }

    /// Our broadcast entry named us in the legacy encoding; a peer that reads another one
    /// (iptux: UTF-8; FeiQ: GBK) gets our entry once more in its own.
    fn ipmsg_correct_entry(&mut self, now: Instant, from: SocketAddr) {
        let nick_ascii = self.nick.is_ascii()
            && self
                .ipmsg
                .as_ref()
                .is_some_and(|ip| ip.config.group.is_ascii());
        let ip = self.ipmsg.as_ref().expect("checked");
        let Some(u) = ip.users.get(&from) else {
            return;
        };
        let (encoding, _) = charset::outgoing(u.info.client, u.caps_utf8, ip.config.legacy);
        if u.entry_sent || nick_ascii || encoding == ip.config.legacy || u.caps_utf8 {
            return;
        }
        self.ipmsg_answer(now, from, mode::BR_ENTRY);
    }

    /// A BR_EXIT: believed if the user stays silent after we ask for its entry. An exit we
    /// cannot check (its source is over its share of answers: a flood) is not believed.
    fn ipmsg_exit_from(&mut self, now: Instant, from: SocketAddr) {
        let nick = self.nick.clone();
        let listed = self
            .ipmsg
            .as_ref()
            .is_some_and(|ip| ip.users.contains_key(&from));
        if !listed || !self.may_answer(now, from) {
            return;
        }
        let ip = self.ipmsg.as_mut().expect("checked");
        if let Some(u) = ip.users.get_mut(&from) {
            u.leaving = Some(now + EXIT_PROBE);
        }
        let bytes = ip.entry(now, mode::BR_ENTRY, &nick, Some(from));
        self.ipmsg_transmit(from, bytes);
        self.arm(now + EXIT_PROBE);
    }

    fn ipmsg_message(&mut self, now: Instant, from: SocketAddr, p: &Packet) {
        let ackable = p.has(opt::SENDCHECKOPT) && !p.has(opt::BROADCASTOPT | opt::AUTORETOPT);
        if p.has(opt::ENCRYPTOPT) {
            // We never advertise encryption; a client that encrypts anyway cannot be read.
            // Not acknowledged, so its sender learns it did not arrive.
            self.trouble(
                now,
                Some(from),
                Topic::Unauthenticated,
                format!("{from} sent an encrypted IP Messenger message, which chat cannot read"),
            );
            return;
        }
        let protocol = self.ipmsg.as_ref().expect("checked").protocol();
        let known = self
            .ipmsg
            .as_ref()
            .expect("checked")
            .users
            .contains_key(&from);
        if !known {
            // A message from someone not listed: add it by its header, ask for its entry.
            let ip = self.ipmsg.as_mut().expect("checked");
            let client = Client::of(&p.version);
            let decode = |b: &[u8]| charset::decode(b, p.command, client, ip.config.legacy);
            let info = IpmsgUser {
                user: decode(&p.user),
                host: decode(&p.host),
                group: String::new(),
                client,
                version: String::from_utf8_lossy(&p.version).into_owned(),
                away: false,
            };
            let nick = crate::wire::truncate_nick(&info.user).to_string();
            if self.ipmsg_admit(now, from) {
                let ip = self.ipmsg.as_mut().expect("checked");
                ip.users.insert(
                    from,
                    User {
                        nick,
                        info,
                        caps_utf8: p.has(opt::UTF8OPT),
                        last_heard: now,
                        talked: None,
                        by_hand: false,
                        shown: false,
                        seen: VecDeque::new(),
                        leaving: None,
                        entry_sent: false,
                        entered: false,
                    },
                );
                self.ipmsg_answer(now, from, mode::BR_ENTRY);
            }
        }
        let ip = self.ipmsg.as_mut().expect("checked");
        let legacy = ip.config.legacy;
        let user = ip.users.get_mut(&from);
        if user.as_ref().is_some_and(|u| u.seen.contains(&p.number)) {
            self.stats.duplicates += 1;
            if ackable {
                self.ipmsg_reply(now, from, mode::RECVMSG, &p.number.to_string());
            }
            return;
        }
        let client = user
            .as_ref()
            .map_or(Client::of(&p.version), |u| u.info.client);
        let nick = user
            .as_ref()
            .map(|u| u.nick.clone())
            .unwrap_or_else(|| charset::decode(&p.user, p.command, client, legacy));
        let text = charset::decode(p.text(), p.command, client, legacy);
        let mut event = Event::Message {
            from,
            nick: Some(nick.clone()),
            text: text.clone(),
            protocol,
        };
        if p.has(opt::FILEATTACHOPT) {
            let list = p.extra.get(p.text().len() + 1..).unwrap_or_default();
            match offer::parse_files(list, |b| charset::decode(b, p.command, client, legacy)) {
                Ok(files) if !files.is_empty() => {
                    event = Event::FileOffer {
                        from,
                        nick: Some(nick),
                        protocol,
                        packet: p.number,
                        text,
                        files,
                    }
                }
                Ok(_) => {}
                Err(why) => {
                    self.stats.malformed += 1;
                    self.trouble(
                        now,
                        Some(from),
                        Topic::IpmsgMalformed(packet::Malformed::Attachment),
                        format!("ignored the files {from} offered: {why}"),
                    );
                }
            }
        }
        if !self.offer_from(now, from, event) {
            // Not acknowledged: its sender sends it again, or reports it not delivered.
            return;
        }
        let ip = self.ipmsg.as_mut().expect("checked");
        if let Some(u) = ip.users.get_mut(&from) {
            if u.seen.len() >= SEEN {
                u.seen.pop_front();
            }
            u.seen.push_back(p.number);
        }
        let away = ip.away.clone();
        if ackable {
            self.ipmsg_reply(now, from, mode::RECVMSG, &p.number.to_string());
        }
        if p.has(opt::SECRETOPT) && self.ipmsg_may_answer(now, from, true) {
            // Shown at once: opened, as IP Messenger's sender is told by READMSG.
            self.ipmsg_reply(now, from, mode::READMSG, &p.number.to_string());
        }
        if let Some(text) = away {
            if !p.has(opt::AUTORETOPT | opt::BROADCASTOPT) {
                self.ipmsg_auto_reply(now, from, &text);
            }
        }
    }

    /// A reply: an acknowledgement (owed, one per message received), or an answer the
    /// caller checked with [`Core::ipmsg_may_answer`].
    fn ipmsg_reply(&mut self, now: Instant, to: SocketAddr, base: u32, text: &str) {
        let ip = self.ipmsg.as_mut().expect("checked");
        let (encoding, utf8) = match ip.users.get(&to) {
            Some(u) => charset::outgoing(u.info.client, u.caps_utf8, ip.config.legacy),
            None => (ip.config.legacy, false),
        };
        let mut extra = charset::encode(text, encoding);
        extra.push(0);
        let command = base | if utf8 { opt::UTF8OPT } else { 0 };
        let (_, bytes) = ip.packet(now, command, &extra);
        self.ipmsg_transmit(to, bytes);
    }

    /// The absence text, as an automatic reply that is itself never answered. Not while a
    /// message of ours to `to` is in flight: numbered after it, the reply would make iptux
    /// drop the message's retransmission.
    fn ipmsg_auto_reply(&mut self, now: Instant, to: SocketAddr, text: &str) {
        let busy = self
            .ipmsg
            .as_ref()
            .is_some_and(|ip| ip.outbox.contains_key(&to));
        if busy || !self.ipmsg_may_answer(now, to, true) {
            return;
        }
        self.ipmsg_reply(now, to, mode::SENDMSG | opt::AUTORETOPT, text);
    }

    fn ipmsg_ack(&mut self, now: Instant, from: SocketAddr, p: &Packet) {
        let first_wait = self.timing.backoff(1);
        let ip = self.ipmsg.as_mut().expect("checked");
        let Some(number) = p.names_number() else {
            return;
        };
        // From the host it went to: iptux answers from port 2425 whatever port we used.
        let Some((&to, queue)) = ip.outbox.iter_mut().find(|(to, q)| {
            to.ip() == from.ip() && q.front().is_some_and(|w| w.number == number && w.sends > 0)
        }) else {
            return;
        };
        let w = queue.pop_front().expect("checked");
        let next = queue.front_mut().map(|next| {
            next.sends = 1;
            next.next_at = now + first_wait;
            next.bytes.clone()
        });
        if queue.is_empty() {
            ip.outbox.remove(&to);
        }
        self.events.push(None, Event::Delivered { to, id: w.id });
        if let Some(bytes) = next {
            self.ipmsg_transmit(to, bytes);
            self.arm(now + first_wait);
        }
    }
}

#[cfg(test)]
mod tests;
