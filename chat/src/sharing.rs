//! The user's side of sending files: the TCP listeners beside the UDP sockets, what happens
//! shown as lines or JSON, and the file commands (`/send`, `/files`, `/get`, `/decline`,
//! `/withdraw`). The transfers themselves are `crate::transfer`'s.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corokit_common::output::Output;
use corokit_common::text::escape;

use crate::core::{Protocol, Via};
use crate::node::Node;
use crate::render;
use crate::transfer::{Happening, Sink, Transfers};

/// Progress lines on a terminal: at most one per file this often (`--json` gets them all).
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// A TCP listener on `addr` (`::` for IPv6 and IPv4 at once), taken over by may.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<may::net::TcpListener> {
    use socket2::{Domain, Protocol as P, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(P::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // A restart must not wait for the last run's connections to time out.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the fd comes from a socket we own and give up here; may takes it over.
    Ok(unsafe { may::net::TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// Serves files offered from the UDP socket at `udp` on TCP at the same address; a notice
/// when it cannot.
pub fn serve(transfers: &Transfers, udp: SocketAddr, via: Via, sealed: bool) -> Option<String> {
    let tcp = udp;
    match bind_tcp(tcp).and_then(|l| transfers.serve(l, via, sealed)) {
        Ok(()) => None,
        Err(e) => Some(format!(
            "cannot serve files on TCP {tcp} ({e}); files can still be received"
        )),
    }
}

/// Where happenings are shown: one line each, progress thinned out on a terminal.
pub fn sink(out: Output, json: bool) -> Sink {
    let last: Mutex<HashMap<(u32, String), Instant>> = Mutex::new(HashMap::new());
    Arc::new(move |h: Happening| {
        let clock = render::clock();
        if json {
            out.line(render::happening_json(&h, &clock));
            return;
        }
        if let Happening::Progress {
            id,
            name,
            bytes,
            size,
        } = &h
        {
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            let key = (*id, name.clone());
            let due = last.get(&key).is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
            if !due || bytes == size {
                return;
            }
            last.insert(key, Instant::now());
            if last.len() > 1024 {
                last.clear();
            }
        }
        out.line(render::happening_text(&h, &clock));
    })
}

/// The peers called `nick`. A chat peer of that name wins over an IP Messenger user of the
/// same name: anyone can call itself anything in IP Messenger, and its text goes in clear.
pub fn by_nick(node: &Node, nick: &str) -> Vec<SocketAddr> {
    let named: Vec<_> = node
        .peers()
        .into_iter()
        .filter(|p| p.protocol != Protocol::Plain && p.nick.as_deref() == Some(nick))
        .collect();
    let chat = named.iter().any(|p| p.protocol == Protocol::Chat);
    named
        .iter()
        .filter(|p| !chat || p.protocol == Protocol::Chat)
        .map(|p| p.addr)
        .collect()
}

/// The peer `target` names: a nickname (chat peer or IP Messenger user), or an address.
pub fn target(node: &Node, target: &str, bare_port: Option<u16>) -> Result<SocketAddr, String> {
    let by_nick = by_nick(node, target);
    match by_nick.as_slice() {
        [one] => Ok(*one),
        [] => crate::app::resolve(target, bare_port).map_err(|e| format!("{e:#}")),
        _ => Err(format!(
            "{} names {} peers; give an address",
            escape(target),
            by_nick.len()
        )),
    }
}

/// The file commands, on `out`.
pub struct Files {
    pub transfers: Transfers,
    pub node: Node,
    pub out: Output,
    pub bare_port: Option<u16>,
}

impl Files {
    pub fn send(&self, to: &str, paths: &[String]) {
        let to = match target(&self.node, to, self.bare_port) {
            Ok(a) => a,
            Err(e) => return self.out.line(format!("chat: {e}")),
        };
        let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
        // The offer hashes its files first, which takes a while for a large one: the
        // commands go on meanwhile.
        let (transfers, out) = (self.transfers.clone(), self.out.clone());
        let offering = move || match transfers.offer(to, &paths, "") {
            Ok(packet) => out.line(format!(
                "chat: offered to {to} (offer {packet:x}; /withdraw {packet:x} to take it back)"
            )),
            Err(e) => out.line(format!("chat: {}", escape(&e.to_string()))),
        };
        if let Err(e) = corokit_common::spawn(offering) {
            self.out.line(format!("chat: {e}"));
        }
    }

    pub fn list(&self) {
        for line in self.transfers.lines() {
            self.out.line(line);
        }
    }

    pub fn get(&self, id: u32, dir: Option<&str>) {
        if let Err(e) = self.transfers.get(id, dir.map(Path::new)) {
            self.out.line(format!("chat: {}", escape(&e)));
        }
    }

    pub fn decline(&self, id: u32) {
        match self.transfers.decline(id) {
            Ok(()) => self.out.line(format!("chat: declined offer #{id}")),
            Err(e) => self.out.line(format!("chat: {}", escape(&e))),
        }
    }

    pub fn withdraw(&self, packet: u64) {
        let line = match self.transfers.withdraw(packet) {
            true => format!("chat: offer {packet:x} withdrawn"),
            false => format!("chat: no offer {packet:x} of ours; /files lists them"),
        };
        self.out.line(line);
    }
}
