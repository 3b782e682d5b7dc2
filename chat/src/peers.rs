//! Who is out there: every address heard from, with its nickname and protocol, bounded in
//! size (the least recently heard is forgotten first); and the peers added by hand with
//! `--to`, remembered in a file for the next start.
//!
//! A `chat` run is listed once, under the first address it was heard at, however many of its
//! addresses speak (a dual-stack host announces by IPv4 and IPv6): the others are kept as its
//! aliases, so a message to every peer reaches each run once.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Speaks our protocol: messages are acknowledged.
    Chat,
    /// Sends plain text (nc, socat, a script): messages go out as plain UTF-8.
    Plain,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// Where it is listed, and where messages to it go.
    pub addr: SocketAddr,
    /// When `addr` last spoke.
    pub addr_seen: Instant,
    /// Other addresses the same run was heard at (its IPv6 address beside its IPv4 one), and
    /// when each last spoke.
    pub also: Vec<(SocketAddr, Instant)>,
    pub instance: Option<u64>,
    /// As received: escape before printing.
    pub nick: Option<String>,
    pub protocol: Protocol,
    /// When any of its addresses last spoke.
    pub last_seen: Instant,
}

impl Peer {
    fn heard(&mut self, addr: SocketAddr, now: Instant) {
        self.last_seen = now;
        if addr == self.addr {
            self.addr_seen = now;
        } else if let Some((_, seen)) = self.also.iter_mut().find(|(a, _)| *a == addr) {
            *seen = now;
        }
    }
}

/// Aliases kept per run; a further address replaces the oldest.
const MAX_ALSO: usize = 4;

#[derive(Debug)]
pub struct Peers {
    map: HashMap<SocketAddr, Peer>,
    /// Every address in a peer's `also` → the address it is listed under.
    aliases: HashMap<SocketAddr, SocketAddr>,
    /// A chat run's instance → the address it is listed under.
    runs: HashMap<u64, SocketAddr>,
    capacity: usize,
}

impl Peers {
    pub fn new(capacity: usize) -> Self {
        Peers {
            map: HashMap::new(),
            aliases: HashMap::new(),
            runs: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records a datagram from `addr`; true when a `chat` run appears (or restarted).
    pub fn seen(
        &mut self,
        addr: SocketAddr,
        instance: Option<u64>,
        nick: Option<&str>,
        protocol: Protocol,
    ) -> bool {
        let now = Instant::now();
        let listed = self.listed(addr);
        if protocol == Protocol::Plain {
            match listed.and_then(|l| self.map.get_mut(&l)) {
                Some(peer) => peer.heard(addr, now),
                None => self.insert(addr, None, None, Protocol::Plain),
            }
            return false;
        }
        // One socket speaks from an address at a time, so a run speaking from an address
        // replaces whatever spoke from it before: a plain tool, or an earlier run, which is
        // gone at all its addresses.
        if let Some(run) = instance.and_then(|i| self.runs.get(&i).copied()) {
            if listed != Some(run) {
                self.remove(addr);
                self.alias(addr, run, now);
            }
            let peer = self.map.get_mut(&run).expect("a run is listed");
            peer.heard(addr, now);
            if peer.nick.as_deref() != nick {
                peer.nick = nick.map(str::to_string);
            }
            return false;
        }
        self.remove(addr);
        self.insert(addr, instance, nick, Protocol::Chat);
        true
    }

    /// The peer `addr` belongs to, whether listed under it or heard there too.
    pub fn get(&self, addr: SocketAddr) -> Option<&Peer> {
        self.map.get(&self.listed(addr)?)
    }

    /// Forgets the peer `addr` belongs to, with all its addresses.
    pub fn remove(&mut self, addr: SocketAddr) -> Option<Peer> {
        let peer = self.map.remove(&self.listed(addr)?)?;
        for (a, _) in &peer.also {
            self.aliases.remove(a);
        }
        if let Some(i) = peer.instance {
            self.runs.remove(&i);
        }
        Some(peer)
    }

    /// Every peer, most recently heard first.
    pub fn list(&self) -> Vec<Peer> {
        let mut peers: Vec<Peer> = self.map.values().cloned().collect();
        peers.sort_by_key(|p| std::cmp::Reverse(p.last_seen));
        peers
    }

    /// Forgets peers silent for longer than `after` and returns them, and addresses of the
    /// others silent that long. A run still heard, but no longer at the address it is listed
    /// under (a new DHCP lease, say), is listed again under its freshest address.
    pub fn expire(&mut self, after: Duration) -> Vec<Peer> {
        let silent = |t: &Instant| t.elapsed() > after;
        let gone: Vec<SocketAddr> = self
            .map
            .values()
            .filter(|p| silent(&p.last_seen))
            .map(|p| p.addr)
            .collect();
        let gone = gone.into_iter().filter_map(|a| self.remove(a)).collect();
        let listed: Vec<SocketAddr> = self.map.keys().copied().collect();
        for addr in listed {
            let peer = self.map.get_mut(&addr).expect("listed just now");
            for (a, _) in peer.also.extract_if(.., |(_, t)| silent(t)) {
                self.aliases.remove(&a);
            }
            if silent(&peer.addr_seen) && !peer.also.is_empty() {
                self.relist(addr);
            }
        }
        gone
    }

    fn listed(&self, addr: SocketAddr) -> Option<SocketAddr> {
        if self.map.contains_key(&addr) {
            Some(addr)
        } else {
            self.aliases.get(&addr).copied()
        }
    }

    fn insert(
        &mut self,
        addr: SocketAddr,
        instance: Option<u64>,
        nick: Option<&str>,
        protocol: Protocol,
    ) {
        if self.map.len() >= self.capacity {
            if let Some(oldest) = self
                .map
                .values()
                .min_by_key(|p| p.last_seen)
                .map(|p| p.addr)
            {
                self.remove(oldest);
            }
        }
        let now = Instant::now();
        self.map.insert(
            addr,
            Peer {
                addr,
                addr_seen: now,
                also: Vec::new(),
                instance,
                nick: nick.map(str::to_string),
                protocol,
                last_seen: now,
            },
        );
        if let Some(i) = instance {
            self.runs.insert(i, addr);
        }
    }

    /// Lists the peer listed under `old` under the freshest of its other addresses instead;
    /// `old` is dropped.
    fn relist(&mut self, old: SocketAddr) {
        let mut peer = self.map.remove(&old).expect("a listed address");
        let freshest = (0..peer.also.len())
            .max_by_key(|&i| peer.also[i].1)
            .expect("another address");
        let (addr, seen) = peer.also.swap_remove(freshest);
        self.aliases.remove(&addr);
        peer.addr = addr;
        peer.addr_seen = seen;
        for (a, _) in &peer.also {
            self.aliases.insert(*a, addr);
        }
        if let Some(i) = peer.instance {
            self.runs.insert(i, addr);
        }
        self.map.insert(addr, peer);
    }

    fn alias(&mut self, addr: SocketAddr, listed: SocketAddr, now: Instant) {
        let Some(peer) = self.map.get_mut(&listed) else {
            return;
        };
        if peer.also.len() >= MAX_ALSO {
            let stalest = (0..peer.also.len())
                .min_by_key(|&i| peer.also[i].1)
                .expect("a full list");
            let (gone, _) = peer.also.swap_remove(stalest);
            self.aliases.remove(&gone);
        }
        peer.also.push((addr, now));
        self.aliases.insert(addr, listed);
    }
}

/// The remembered `--to` peers: one `HOST:PORT` a line.
pub fn load_remembered(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Adds the `peers` that are not in the file yet, with one write.
pub fn remember(path: &Path, peers: &[String]) -> io::Result<()> {
    let mut known = load_remembered(path);
    let before = known.len();
    for peer in peers {
        if !known.contains(peer) {
            known.push(peer.clone());
        }
    }
    if known.len() == before {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, known.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn joins_restarts_and_a_bounded_table() {
        let mut peers = Peers::new(2);
        assert!(!peers.seen(addr(1), None, None, Protocol::Plain));
        assert!(
            peers.seen(addr(1), Some(7), Some("ana"), Protocol::Chat),
            "plain became chat"
        );
        assert!(!peers.seen(addr(1), Some(7), Some("ana"), Protocol::Chat));
        assert!(
            peers.seen(addr(1), Some(8), Some("ana"), Protocol::Chat),
            "a restart is a join"
        );
        assert!(!peers.seen(addr(1), None, None, Protocol::Plain));
        assert_eq!(peers.get(addr(1)).unwrap().protocol, Protocol::Chat);
        peers.seen(addr(2), None, None, Protocol::Plain);
        peers.seen(addr(3), None, None, Protocol::Plain);
        assert_eq!(peers.list().len(), 2);
        assert!(
            peers.get(addr(1)).is_none(),
            "the least recently heard goes first"
        );
    }

    fn addresses(peers: &Peers) -> Vec<(SocketAddr, Vec<SocketAddr>)> {
        peers
            .list()
            .into_iter()
            .map(|p| (p.addr, p.also.iter().map(|(a, _)| *a).collect()))
            .collect()
    }

    #[test]
    fn a_run_heard_at_two_addresses_is_listed_once() {
        let mut peers = Peers::new(8);
        let v6: SocketAddr = "[fe80::1%2]:7890".parse().unwrap();
        assert!(peers.seen(addr(1), Some(7), Some("ana"), Protocol::Chat));
        assert!(
            !peers.seen(v6, Some(7), Some("ana"), Protocol::Chat),
            "the same run by IPv6 is not another join"
        );
        assert_eq!(addresses(&peers), [(addr(1), vec![v6])]);
        assert_eq!(peers.get(v6).unwrap().addr, addr(1));

        // A restart heard first at the other address: the earlier run is gone at both.
        assert!(peers.seen(v6, Some(8), Some("ana"), Protocol::Chat));
        assert_eq!(addresses(&peers), [(v6, vec![])]);
        assert!(!peers.seen(addr(1), Some(8), Some("ana"), Protocol::Chat));
        assert_eq!(addresses(&peers), [(v6, vec![addr(1)])]);

        // A goodbye from either address removes every address of the run.
        assert_eq!(peers.remove(addr(1)).unwrap().instance, Some(8));
        assert!(peers.get(v6).is_none() && peers.get(addr(1)).is_none());
        assert!(peers.seen(addr(1), Some(8), Some("ana"), Protocol::Chat));
        assert_eq!(addresses(&peers), [(addr(1), vec![])]);
    }

    #[test]
    fn a_run_no_longer_heard_where_it_is_listed_moves_to_an_address_still_heard() {
        let mut peers = Peers::new(8);
        let ago = Instant::now() - Duration::from_secs(60);
        peers.seen(addr(1), Some(7), Some("ana"), Protocol::Chat);
        peers.seen(addr(2), Some(7), Some("ana"), Protocol::Chat);
        peers.seen(addr(3), Some(7), Some("ana"), Protocol::Chat);
        // .1 went silent (a new lease, say), .2 too; .3 still speaks.
        let peer = peers.map.get_mut(&addr(1)).unwrap();
        peer.addr_seen = ago;
        peer.also[0].1 = ago;
        assert!(peers.expire(Duration::from_secs(30)).is_empty());
        assert_eq!(addresses(&peers), [(addr(3), vec![])]);
        assert_eq!(peers.get(addr(3)).unwrap().instance, Some(7));
        assert!(peers.get(addr(1)).is_none() && peers.get(addr(2)).is_none());
        // Still the same run: no join.
        assert!(!peers.seen(addr(1), Some(7), Some("ana"), Protocol::Chat));
        assert_eq!(addresses(&peers), [(addr(3), vec![addr(1)])]);
    }

    #[test]
    fn remembered_peers_survive_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/peers");
        remember(&path, &["10.1.2.3:7890".into()]).unwrap();
        remember(&path, &["[::1]:7890".into(), "10.1.2.3:7890".into()]).unwrap();
        assert_eq!(load_remembered(&path), ["10.1.2.3:7890", "[::1]:7890"]);
    }
}
