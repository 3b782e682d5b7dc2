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
    /// Where it is listed, and where messages to every peer go.
    pub addr: SocketAddr,
    /// Other addresses the same run was heard at (its IPv6 address beside its IPv4 one).
    pub also: Vec<SocketAddr>,
    pub instance: Option<u64>,
    /// As received: escape before printing.
    pub nick: Option<String>,
    pub protocol: Protocol,
    pub last_seen: Instant,
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
                Some(peer) => peer.last_seen = now,
                None => self.insert(addr, None, None, Protocol::Plain),
            }
            return false;
        }
        let run = instance.and_then(|i| self.runs.get(&i).copied());
        if let Some(run) = run {
            if listed != Some(run) {
                // Another address of a run listed already; whatever spoke from it before (a
                // plain tool, an earlier run) is gone.
                self.forget(addr);
                self.alias(addr, run);
            }
            let peer = self.map.get_mut(&run).expect("a run is listed");
            peer.last_seen = now;
            peer.nick = nick.map(str::to_string);
            return false;
        }
        // A run not heard before: new, restarted, or a plain tool's address now speaking chat.
        match self.map.get_mut(&addr) {
            Some(peer) => {
                if let Some(old) = peer.instance {
                    self.runs.remove(&old);
                }
                peer.last_seen = now;
                peer.protocol = Protocol::Chat;
                peer.instance = instance;
                peer.nick = nick.map(str::to_string);
            }
            None => {
                self.forget(addr);
                self.insert(addr, instance, nick, Protocol::Chat);
            }
        }
        if let Some(i) = instance {
            self.runs.insert(i, addr);
        }
        true
    }

    /// The peer `addr` belongs to, whether listed under it or heard there too.
    pub fn get(&self, addr: SocketAddr) -> Option<&Peer> {
        self.map.get(&self.listed(addr)?)
    }

    /// Forgets the peer `addr` belongs to, with all its addresses.
    pub fn remove(&mut self, addr: SocketAddr) -> Option<Peer> {
        let peer = self.map.remove(&self.listed(addr)?)?;
        for a in &peer.also {
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

    /// Forgets peers silent for longer than `after` and returns them.
    pub fn expire(&mut self, after: Duration) -> Vec<Peer> {
        let gone: Vec<SocketAddr> = self
            .map
            .values()
            .filter(|p| p.last_seen.elapsed() > after)
            .map(|p| p.addr)
            .collect();
        gone.into_iter().filter_map(|a| self.remove(a)).collect()
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
        self.map.insert(
            addr,
            Peer {
                addr,
                also: Vec::new(),
                instance,
                nick: nick.map(str::to_string),
                protocol,
                last_seen: Instant::now(),
            },
        );
    }

    /// Drops whatever `addr` stands for: an alias, or a listed peer with its aliases.
    fn forget(&mut self, addr: SocketAddr) {
        match self.aliases.remove(&addr) {
            Some(listed) => {
                if let Some(peer) = self.map.get_mut(&listed) {
                    peer.also.retain(|&a| a != addr);
                }
            }
            None => {
                self.remove(addr);
            }
        }
    }

    fn alias(&mut self, addr: SocketAddr, listed: SocketAddr) {
        let Some(peer) = self.map.get_mut(&listed) else {
            return;
        };
        if peer.also.len() >= MAX_ALSO {
            let oldest = peer.also.remove(0);
            self.aliases.remove(&oldest);
        }
        peer.also.push(addr);
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

/// Adds `peer` to the file unless it is there already.
pub fn remember(path: &Path, peer: &str) -> io::Result<()> {
    let mut known = load_remembered(path);
    if known.iter().any(|k| k == peer) {
        return Ok(());
    }
    known.push(peer.to_string());
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

    #[test]
    fn a_run_heard_at_two_addresses_is_listed_once() {
        let mut peers = Peers::new(8);
        let v6: SocketAddr = "[fe80::1%2]:7890".parse().unwrap();
        assert!(peers.seen(addr(1), Some(7), Some("ana"), Protocol::Chat));
        assert!(
            !peers.seen(v6, Some(7), Some("ana"), Protocol::Chat),
            "the same run by IPv6 is not another join"
        );
        let list = peers.list();
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].addr, list[0].also.clone()), (addr(1), vec![v6]));
        assert_eq!(peers.get(v6).unwrap().addr, addr(1));

        // A restart is heard first at the alias: it is listed there, and the old run goes
        // when the new one speaks from its address.
        assert!(peers.seen(v6, Some(8), Some("ana"), Protocol::Chat));
        assert!(!peers.seen(addr(1), Some(8), Some("ana"), Protocol::Chat));
        let list = peers.list();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!((list[0].addr, list[0].also.clone()), (v6, vec![addr(1)]));

        // A goodbye from either address removes every address of the run.
        assert_eq!(peers.remove(addr(1)).unwrap().instance, Some(8));
        assert!(peers.get(v6).is_none() && peers.get(addr(1)).is_none());
        assert!(peers.seen(addr(1), Some(8), Some("ana"), Protocol::Chat));
    }

    #[test]
    fn remembered_peers_survive_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/peers");
        remember(&path, "10.1.2.3:7890").unwrap();
        remember(&path, "[::1]:7890").unwrap();
        remember(&path, "10.1.2.3:7890").unwrap();
        assert_eq!(load_remembered(&path), ["10.1.2.3:7890", "[::1]:7890"]);
    }
}
