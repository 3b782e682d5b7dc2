//! Who is out there: chat runs whose addresses were verified by a challenge, and plain peers
//! (addresses that sent plain text), both bounded.
//!
//! A run is one `chat` process, known by its random instance id. It is listed under the
//! first address it was verified at; the other addresses it was verified at (its IPv6 address
//! beside its IPv4 one) are its aliases. An address that claims to belong to a run but has not
//! echoed our challenge is nothing. Strangers that never completed a handshake never enter the
//! table, and a full table gives up a peer nobody is talking to, never one in a conversation.
//!
//! Without a key, a run id is no secret (announcements carry it) and anyone who can receive
//! at an address can echo a challenge there, so an alias proves only that it receives: what
//! arrives from it is shown as from that address (its own stream), and only the listed
//! address keeps the run alive, acknowledges what we send, renames it or makes it leave. With
//! a key every datagram is sealed by the run itself, so every verified address is the run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::recv::Incoming;
use super::send::Outgoing;
use crate::seal::{ReplayWindow, RunKey};

/// Chat runs in the table.
pub const MAX_RUNS: usize = 1024;
/// Plain peers in the table.
pub const MAX_PLAIN: usize = 1024;
/// Addresses per run.
pub const MAX_PATHS: usize = 4;
/// A peer talked with this recently is in a conversation and is never given up for another.
pub const CONVERSATION: Duration = Duration::from_secs(600);

/// One chat run.
#[derive(Debug)]
pub struct Run {
    pub instance: u64,
    /// As received: escape before showing.
    pub nick: String,
    /// Where it is listed, and where everything to it goes.
    pub listed: SocketAddr,
    /// Its verified addresses (the listed one first) and when each last spoke.
    pub paths: Vec<(SocketAddr, Instant)>,
    pub last_heard: Instant,
    /// When a message last went either way.
    pub talked: Option<Instant>,
    /// Added by the user (`--to`, `/to`): kept whatever strangers do.
    pub by_hand: bool,
    /// The user was told it joined, so it is told when it leaves.
    pub shown: bool,
    /// The last challenge it sent us, to echo.
    pub their_token: u64,
    /// It has shown that it verified our address (it sent something only a verified peer
    /// gets); until then our confirmation is sent again.
    pub confirmed: bool,
    pub confirm_sends: u32,
    pub confirm_at: Instant,
    pub out: Outgoing,
    /// What it sends us, one stream per address it sends from.
    pub inc: BTreeMap<SocketAddr, Incoming>,
    pub replay: ReplayWindow,
    /// The key it seals with, with a shared secret.
    pub key: Option<RunKey>,
}

impl Run {
    fn engaged(&self, now: Instant) -> bool {
        self.by_hand
            || !self.out.is_idle()
            || self.held_bytes() > 0
            || self
                .talked
                .is_some_and(|t| now.saturating_duration_since(t) < CONVERSATION)
    }

    /// Bytes held out of order in all its streams.
    pub fn held_bytes(&self) -> usize {
        self.inc.values().map(Incoming::held_bytes).sum()
    }

    /// Something arrived from `addr`, one of its verified addresses. Only `authentic`
    /// traffic (sealed, or from the listed address) keeps the run itself alive.
    pub fn heard(&mut self, now: Instant, addr: SocketAddr, authentic: bool) {
        if authentic || addr == self.listed {
            self.last_heard = now;
            self.out.last_heard = now;
        }
        if let Some(p) = self.paths.iter_mut().find(|(a, _)| *a == addr) {
            p.1 = now;
        }
    }

    /// Its addresses other than the listed one.
    pub fn aliases(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.paths
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| *a != self.listed)
    }
}

/// A plain peer.
#[derive(Debug, Clone, Copy)]
pub struct Plain {
    pub last_heard: Instant,
    pub talked: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
enum Owner {
    Run(u64),
    Plain(Plain),
}

/// What verifying an address for a run did.
#[derive(Debug)]
pub enum Verified {
    /// A run we did not know.
    New,
    /// Another address of a run we knew.
    Alias,
    /// Nothing new.
    Known,
    /// The table is full of peers in conversations: not added.
    Full,
}

#[derive(Debug, Default)]
pub struct Peers {
    runs: BTreeMap<u64, Run>,
    addrs: BTreeMap<SocketAddr, Owner>,
    plain: usize,
    /// Datagrams are sealed: every verified address speaks for its run.
    sealed: bool,
}

impl Peers {
    pub fn new(sealed: bool) -> Self {
        Peers {
            sealed,
            ..Peers::default()
        }
    }

    /// The run `addr` is a verified address of.
    pub fn run_at(&self, addr: SocketAddr) -> Option<u64> {
        match self.addrs.get(&addr)? {
            Owner::Run(i) => Some(*i),
            Owner::Plain(_) => None,
        }
    }

    pub fn run(&self, instance: u64) -> Option<&Run> {
        self.runs.get(&instance)
    }

    pub fn run_mut(&mut self, instance: u64) -> Option<&mut Run> {
        self.runs.get_mut(&instance)
    }

    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.runs.values()
    }

    pub fn runs_mut(&mut self) -> impl Iterator<Item = &mut Run> {
        self.runs.values_mut()
    }

    pub fn plain(&self, addr: SocketAddr) -> Option<&Plain> {
        match self.addrs.get(&addr)? {
            Owner::Plain(p) => Some(p),
            Owner::Run(_) => None,
        }
    }

    pub fn plains(&self) -> impl Iterator<Item = (SocketAddr, &Plain)> {
        self.addrs.iter().filter_map(|(a, o)| match o {
            Owner::Plain(p) => Some((*a, p)),
            Owner::Run(_) => None,
        })
    }

    pub fn len(&self) -> (usize, usize) {
        (self.runs.len(), self.plain)
    }

    /// Plain text arrived from `addr`. A verified run's address stays the run's: one socket
    /// holds an address, so the text is the run's own (a chat sends plain text to plain
    /// peers only), and a plain tool that took the address over first has to say hello.
    pub fn heard_plain(&mut self, now: Instant, addr: SocketAddr) {
        match self.addrs.get_mut(&addr) {
            Some(Owner::Plain(p)) => p.last_heard = now,
            Some(Owner::Run(_)) => {}
            None => {
                if self.plain >= MAX_PLAIN && !self.evict_plain(now) {
                    return;
                }
                self.plain += 1;
                self.addrs.insert(
                    addr,
                    Owner::Plain(Plain {
                        last_heard: now,
                        talked: None,
                    }),
                );
            }
        }
    }

    /// We sent the user's text to the plain peer at `addr`.
    pub fn talked_plain(&mut self, now: Instant, addr: SocketAddr) {
        if let Some(Owner::Plain(p)) = self.addrs.get_mut(&addr) {
            p.talked = Some(now);
        }
    }

    /// `addr` echoed our challenge as run `instance`. A run that takes over an address of
    /// another run replaces it (one socket holds an address: the other run is gone); the
    /// replaced runs are returned.
    pub fn verify(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        instance: u64,
        nick: &str,
        their_token: u64,
        key: impl FnOnce() -> Option<RunKey>,
    ) -> (Verified, Vec<Run>) {
        let mut gone = Vec::new();
        match self.addrs.get(&addr).copied() {
            Some(Owner::Run(i)) if i == instance => {
                return (Verified::Known, gone);
            }
            Some(Owner::Run(other)) => gone.extend(self.remove(other)),
            Some(Owner::Plain(_)) => {
                self.addrs.remove(&addr);
                self.plain -= 1;
            }
            None => {}
        }
        if let Some(run) = self.runs.get_mut(&instance) {
            if run.paths.len() >= MAX_PATHS {
                let stalest = run
                    .paths
                    .iter()
                    .filter(|(a, _)| *a != run.listed)
                    .min_by_key(|(_, t)| *t)
                    .map(|(a, _)| *a)
                    .expect("aliases beside the listed address");
                run.paths.retain(|(a, _)| *a != stalest);
                run.inc.remove(&stalest);
                self.addrs.remove(&stalest);
            }
            run.paths.push((addr, now));
            run.heard(now, addr, self.sealed);
            self.addrs.insert(addr, Owner::Run(instance));
            return (Verified::Alias, gone);
        }
        if self.runs.len() >= MAX_RUNS {
            match self.idle_run(now) {
                Some(victim) => gone.extend(self.remove(victim)),
                None => return (Verified::Full, gone),
            }
        }
        self.runs.insert(
            instance,
            Run {
                instance,
                nick: nick.to_string(),
                listed: addr,
                paths: vec![(addr, now)],
                last_heard: now,
                talked: None,
                by_hand: false,
                shown: false,
                their_token,
                confirmed: false,
                confirm_sends: 1,
                confirm_at: now,
                out: Outgoing::new(now),
                inc: BTreeMap::new(),
                replay: ReplayWindow::default(),
                key: key(),
            },
        );
        self.addrs.insert(addr, Owner::Run(instance));
        (Verified::New, gone)
    }

    /// Forgets run `instance` with all its addresses.
    pub fn remove(&mut self, instance: u64) -> Option<Run> {
        let run = self.runs.remove(&instance)?;
        for (a, _) in &run.paths {
            self.addrs.remove(a);
        }
        Some(run)
    }

    /// Forgets one alias of a run (never its listed address), with what it sent us; returns
    /// the bytes that were held for it.
    pub fn drop_alias(&mut self, instance: u64, addr: SocketAddr) -> usize {
        let Some(run) = self.runs.get_mut(&instance) else {
            return 0;
        };
        if addr == run.listed {
            return 0;
        }
        run.paths.retain(|(a, _)| *a != addr);
        self.addrs.remove(&addr);
        run.inc.remove(&addr).map_or(0, |i| i.held_bytes())
    }

    /// Forgets runs silent for `after` and returns them, with the bytes held for aliases that
    /// were dropped because they fell silent that long. With sealed datagrams a run still
    /// heard, but no longer at the address it is listed under (a new DHCP lease, say), is
    /// listed again under its freshest address; without, only the listed address keeps a
    /// run, and the other address becomes a peer of its own when it next speaks.
    pub fn expire(&mut self, now: Instant, after: Duration) -> (Vec<Run>, usize) {
        let silent = |t: Instant| now.saturating_duration_since(t) >= after;
        let gone: Vec<u64> = self
            .runs
            .values()
            .filter(|r| silent(r.last_heard))
            .map(|r| r.instance)
            .collect();
        let gone: Vec<Run> = gone.into_iter().filter_map(|i| self.remove(i)).collect();
        let mut freed = 0;
        for run in self.runs.values_mut() {
            let listed_silent = run
                .paths
                .iter()
                .any(|(a, t)| *a == run.listed && silent(*t));
            if listed_silent && self.sealed {
                let freshest = run.paths.iter().max_by_key(|(_, t)| *t).map(|(a, _)| *a);
                if let Some(fresh) = freshest {
                    run.listed = fresh;
                }
            }
            let listed = run.listed;
            for (a, _) in run.paths.iter().filter(|(a, t)| *a != listed && silent(*t)) {
                self.addrs.remove(a);
                freed += run.inc.remove(a).map_or(0, |i| i.held_bytes());
            }
            run.paths.retain(|(a, t)| *a == listed || !silent(*t));
        }
        (gone, freed)
    }

    /// The least recently heard run not in a conversation.
    fn idle_run(&self, now: Instant) -> Option<u64> {
        self.runs
            .values()
            .filter(|r| !r.engaged(now))
            .min_by_key(|r| r.last_heard)
            .map(|r| r.instance)
    }

    /// Makes room for a plain peer by forgetting the least recently heard one nobody talked
    /// with lately; false when every one is in a conversation.
    fn evict_plain(&mut self, now: Instant) -> bool {
        let victim = self
            .plains()
            .filter(|(_, p)| {
                p.talked
                    .is_none_or(|t| now.saturating_duration_since(t) >= CONVERSATION)
            })
            .min_by_key(|(_, p)| p.last_heard)
            .map(|(a, _)| a);
        match victim {
            Some(a) => {
                self.addrs.remove(&a);
                self.plain -= 1;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_run_at_two_addresses_is_one_peer_and_a_restart_replaces_it() {
        let now = Instant::now();
        let mut peers = Peers::new(true);
        let v6: SocketAddr = "[fe80::1%2]:7890".parse().unwrap();
        assert!(matches!(
            peers.verify(now, addr(1), 7, "ana", 0, || None).0,
            Verified::New
        ));
        assert!(matches!(
            peers.verify(now, v6, 7, "ana", 0, || None).0,
            Verified::Alias
        ));
        assert!(matches!(
            peers.verify(now, v6, 7, "ana", 0, || None).0,
            Verified::Known
        ));
        assert_eq!(peers.run_at(v6), Some(7));
        assert_eq!(peers.run(7).unwrap().aliases().collect::<Vec<_>>(), [v6]);
        // Run 8 at the IPv6 address: run 7 is gone at both.
        let (v, gone) = peers.verify(now, v6, 8, "ana", 0, || None);
        assert!(matches!(v, Verified::New));
        assert_eq!(gone.len(), 1);
        assert_eq!(peers.run_at(addr(1)), None);
        assert_eq!(peers.len(), (1, 0));
    }

    #[test]
    fn strangers_never_push_out_a_conversation() {
        let now = Instant::now();
        let mut peers = Peers::default();
        peers.verify(now, addr(1), 1, "friend", 0, || None);
        peers.run_mut(1).unwrap().talked = Some(now);
        for i in 0..5000u16 {
            peers.verify(now, addr(100 + i), 1000 + u64::from(i), "x", 0, || None);
        }
        assert_eq!(peers.len().0, MAX_RUNS);
        assert_eq!(peers.run_at(addr(1)), Some(1), "the friend stays");
        // Plain peers likewise.
        peers.heard_plain(now, addr(60_000));
        peers.talked_plain(now, addr(60_000));
        for i in 0..3000u16 {
            peers.heard_plain(now, addr(20_000 + i));
        }
        assert!(peers.plain(addr(60_000)).is_some());
        assert_eq!(peers.len().1, MAX_PLAIN);
    }

    #[test]
    fn silent_addresses_expire_and_a_sealed_run_moves_to_the_one_still_heard() {
        let t0 = Instant::now();
        let mut peers = Peers::new(true);
        peers.verify(t0, addr(1), 7, "ana", 0, || None);
        peers.verify(t0, addr(2), 7, "ana", 0, || None);
        let later = t0 + Duration::from_secs(60);
        peers.run_mut(7).unwrap().heard(later, addr(2), true);
        assert!(peers.expire(later, Duration::from_secs(30)).0.is_empty());
        let run = peers.run(7).unwrap();
        assert_eq!((run.listed, run.paths.len()), (addr(2), 1));
        assert_eq!(peers.run_at(addr(1)), None);
        let gone = peers.expire(later + Duration::from_secs(31), Duration::from_secs(30));
        assert_eq!(gone.0.len(), 1);
    }

    #[test]
    fn without_a_key_an_alias_cannot_keep_a_silent_run_or_take_its_listing() {
        let t0 = Instant::now();
        let mut peers = Peers::new(false);
        peers.verify(t0, addr(1), 7, "ana", 0, || None);
        peers.verify(t0, addr(666), 7, "ana", 0, || None);
        let later = t0 + Duration::from_secs(60);
        peers.run_mut(7).unwrap().heard(later, addr(666), false);
        let (gone, _) = peers.expire(later, Duration::from_secs(30));
        assert_eq!(
            gone.len(),
            1,
            "the listed address fell silent: the run is gone"
        );
        assert_eq!(gone[0].listed, addr(1));
        assert_eq!(peers.run_at(addr(666)), None);
    }
}
