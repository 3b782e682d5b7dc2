//! Who is out there: every address heard from, with its nickname and protocol, bounded in
//! size (the least recently heard is forgotten first); and the peers added by hand with
//! `--to`, remembered in a file for the next start.

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
    pub addr: SocketAddr,
    pub instance: Option<u64>,
    /// As received: escape before printing.
    pub nick: Option<String>,
    pub protocol: Protocol,
    pub last_seen: Instant,
}

#[derive(Debug)]
pub struct Peers {
    map: HashMap<SocketAddr, Peer>,
    capacity: usize,
}

impl Peers {
    pub fn new(capacity: usize) -> Self {
        Peers {
            map: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records a datagram from `addr`; true when a `chat` peer appears (or restarted).
    pub fn seen(
        &mut self,
        addr: SocketAddr,
        instance: Option<u64>,
        nick: Option<&str>,
        protocol: Protocol,
    ) -> bool {
        let now = Instant::now();
        if let Some(peer) = self.map.get_mut(&addr) {
            peer.last_seen = now;
            if protocol == Protocol::Plain {
                return false;
            }
            let joined = peer.protocol == Protocol::Plain || peer.instance != instance;
            peer.protocol = Protocol::Chat;
            peer.instance = instance;
            peer.nick = nick.map(str::to_string);
            return joined;
        }
        if self.map.len() >= self.capacity {
            if let Some(oldest) = self
                .map
                .values()
                .min_by_key(|p| p.last_seen)
                .map(|p| p.addr)
            {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(
            addr,
            Peer {
                addr,
                instance,
                nick: nick.map(str::to_string),
                protocol,
                last_seen: now,
            },
        );
        protocol == Protocol::Chat
    }

    pub fn get(&self, addr: SocketAddr) -> Option<&Peer> {
        self.map.get(&addr)
    }

    pub fn remove(&mut self, addr: SocketAddr) -> Option<Peer> {
        self.map.remove(&addr)
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
        gone.iter().filter_map(|a| self.map.remove(a)).collect()
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
    fn remembered_peers_survive_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/peers");
        remember(&path, "10.1.2.3:7890").unwrap();
        remember(&path, "[::1]:7890").unwrap();
        remember(&path, "10.1.2.3:7890").unwrap();
        assert_eq!(load_remembered(&path), ["10.1.2.3:7890", "[::1]:7890"]);
    }
}
