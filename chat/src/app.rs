//! The `chat` program without its argument parsing: binding the sockets, the interactive
//! session (one coroutine takes what the user types, another shows what arrives) and
//! `chat send`.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use corokit_common::output::Output;
use corokit_common::text::{escape, json_line};
use corokit_common::Shutdown;

use crate::command::{self, Command, HELP};
use crate::core::{Config, Discovery, Event, Greeting, IpmsgConfig, Protocol, Sent, Via};
use crate::ipmsg::charset;
use crate::node::{Events, Node};
use crate::seal::Key;
use crate::transfer::receive::Asker;
use crate::transfer::{Happening, Transfers};
use crate::{remembered, render, sharing};

/// What both `chat` and `chat send` are told.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub port: Option<u16>,
    pub bind: Option<String>,
    pub nick: Option<String>,
    pub key_file: Option<PathBuf>,
    pub tries: u32,
    pub ack_timeout: Duration,
    pub ipmsg: IpmsgChoice,
    /// Where IP Messenger peers listen, and the port we bind for it.
    pub ipmsg_port: u16,
    /// Our IP Messenger group.
    pub group: Option<String>,
    /// `--ipmsg-encoding`: for IP Messenger peers that do not say.
    pub ipmsg_encoding: Option<String>,
    /// `--downloads`: where received files go without a directory given.
    pub downloads: Option<PathBuf>,
    /// `--min-free`: what received files leave free on their disk.
    pub min_free: Option<u64>,
}

/// Whether to speak IP Messenger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IpmsgChoice {
    /// Yes, unless there is a key (IP Messenger cannot be authenticated).
    #[default]
    Unless,
    /// `--ipmsg`: yes, also with a key.
    On,
    /// `--no-ipmsg`.
    Off,
}

impl Options {
    fn speaks_ipmsg(&self, keyed: bool) -> bool {
        match self.ipmsg {
            IpmsgChoice::Unless => !keyed,
            IpmsgChoice::On => true,
            IpmsgChoice::Off => false,
        }
    }

    /// The IP Messenger settings, checked before anything is bound.
    fn ipmsg_config(&self, keyed: bool) -> anyhow::Result<IpmsgConfig> {
        let legacy = match &self.ipmsg_encoding {
            Some(name) => charset::by_name(name).filter(charset::usable).with_context(|| {
                format!(
                    "--ipmsg-encoding {:?} is not an encoding (try cp932, gbk, gb18030, big5, euc-kr, utf-8)",
                    escape(name)
                )
            })?,
            None => {
                let locale = ["LC_ALL", "LC_CTYPE", "LANG"]
                    .iter()
                    .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
                charset::legacy_for_locale(locale.as_deref())
            }
        };
        Ok(IpmsgConfig {
            port: self.ipmsg_port,
            user: std::env::var("USER").unwrap_or_else(|_| "user".into()),
            host: hostname(),
            group: self.group.clone().unwrap_or_default(),
            legacy,
            broadcasts: Vec::new(),
            clock: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            keyed,
            exit_to_users: true,
        })
    }
}

/// What only the interactive `chat` is told.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub to: Vec<String>,
    pub discovery: bool,
    pub json: bool,
    pub log: Option<PathBuf>,
    pub peers_file: Option<PathBuf>,
}

/// How long a line to an address greeted by hand waits for it to answer as a chat peer
/// before going out as plain text.
const GREETING_WAIT: Duration = Duration::from_secs(1);
/// How long the output may take to reach its reader once we are asked to stop.
const DRAIN_AT_EXIT: Duration = Duration::from_millis(500);

/// `HOST:PORT`, `[v6]:PORT` or `v6` literal with a port, resolved off the worker threads. A
/// name or IPv4 address alone gets `bare_port` (the IP Messenger port, when it is spoken).
pub fn resolve(text: &str, bare_port: Option<u16>) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = match (text.rsplit_once(':'), bare_port) {
        (Some((host, port)), _) => (
            host,
            port.parse()
                .with_context(|| format!("{:?}: bad port", escape(text)))?,
        ),
        (None, Some(port)) => (text, port),
        (None, None) => bail!("{:?} is not HOST:PORT", escape(text)),
    };
    let addrs = corokit_common::Dns::system()
        .resolve(host.trim_matches(['[', ']']), port, Duration::from_secs(5))
        .with_context(|| format!("{:?}", escape(text)))?;
    addrs
        .into_iter()
        .next()
        .with_context(|| format!("{:?}: no address", escape(text)))
}

/// A UDP socket on any free port whose number is free for TCP too: files are served over TCP
/// on the port number offers go from, and a free UDP port can be a TCP port another program
/// uses (a client connection's, say).
fn bind_serving(at: Option<&str>) -> anyhow::Result<may::net::UdpSocket> {
    let mut tries = 0;
    loop {
        let socket = bind(at, 0)?;
        tries += 1;
        match sharing::bind_tcp(socket.local_addr()?) {
            Ok(_) => return Ok(socket),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 32 => continue,
            Err(e) => {
                return Err(e).context("no port free for both UDP and TCP to serve files from")
            }
        }
    }
}

/// Binds `--bind`, or by default `::` for IPv6 and IPv4 at once, falling back to `0.0.0.0`
/// on a host without IPv6 (but not when the port is in use: that stays an error).
pub fn bind(bind: Option<&str>, port: u16) -> anyhow::Result<may::net::UdpSocket> {
    let addr = match bind {
        None => {
            return bind_to(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).or_else(|e| {
                if in_use(&e) {
                    Err(e)
                } else {
                    bind_to(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
                }
            });
        }
        Some(b) => match b.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                let ip: IpAddr = b.trim_matches(['[', ']']).parse().with_context(|| {
                    format!("--bind {:?} is not an IP address or IP:PORT", escape(b))
                })?;
                SocketAddr::new(ip, port)
            }
        },
    };
    bind_to(addr)
}

/// The IP Messenger socket: IPv4 (IP Messenger speaks nothing else), at `--bind`'s address
/// when that is IPv4 and every address otherwise; `None` when `--bind` is an IPv6 address.
pub fn bind_ipmsg(bind: Option<&str>, port: u16) -> anyhow::Result<Option<may::net::UdpSocket>> {
    let ip = match bind {
        None => Ipv4Addr::UNSPECIFIED,
        Some(b) => match b
            .parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| b.trim_matches(['[', ']']).parse::<IpAddr>())
        {
            Ok(IpAddr::V4(ip)) => ip,
            Ok(IpAddr::V6(ip)) if ip.is_unspecified() => Ipv4Addr::UNSPECIFIED,
            _ => return Ok(None),
        },
    };
    bind_to(SocketAddr::from((ip, port))).map(Some)
}

fn in_use(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>().map(io::Error::kind) == Some(io::ErrorKind::AddrInUse)
}

/// Where IP Messenger entries are broadcast to: everyone on the link (255.255.255.255) and
/// each IPv4 interface's own broadcast address, as iptux does.
fn broadcasts(port: u16) -> Vec<SocketAddr> {
    let mut out = vec![SocketAddr::from((Ipv4Addr::BROADCAST, port))];
    for interface in if_addrs::get_if_addrs().unwrap_or_default() {
        if let if_addrs::IfAddr::V4(v4) = interface.addr {
            if let Some(b) = v4.broadcast.filter(|_| !v4.is_loopback()) {
                let addr = SocketAddr::from((b, port));
                if !out.contains(&addr) {
                    out.push(addr);
                }
            }
        }
    }
    out
}

fn bind_to(addr: SocketAddr) -> anyhow::Result<may::net::UdpSocket> {
    use socket2::{Domain, Protocol as P, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(P::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // Room for bursts; the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(4 << 20);
    // No SO_REUSEADDR/SO_REUSEPORT: a port in use must be an error, not a shared socket.
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot bind UDP {addr} (is another chat using the port?)"))?;
    socket.set_nonblocking(true)?;
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the fd comes from a socket we own and give up here; may takes it over.
    Ok(unsafe { may::net::UdpSocket::from_raw_fd(socket.into_raw_fd()) })
}

/// The shared secret from `--key-file`, or else from `CHAT_KEY`.
pub fn load_key(key_file: Option<&Path>) -> anyhow::Result<Option<Key>> {
    let secret = match key_file {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read the key file {}", path.display()))?,
        None => match std::env::var_os("CHAT_KEY") {
            Some(v) => v.into_encoded_bytes(),
            None => return Ok(None),
        },
    };
    let secret = secret.trim_ascii();
    if secret.is_empty() {
        bail!("the key is empty");
    }
    Ok(Some(Key::derive(secret)))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

fn default_nick() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    format!("{user}@{}", hostname())
}

fn config(
    opts: &Options,
    key: Option<Key>,
    discovery: Option<u16>,
    ipmsg: Option<IpmsgConfig>,
) -> Config {
    Config {
        nick: opts.nick.clone().unwrap_or_else(default_nick),
        key,
        discovery: discovery.map(|port| Discovery {
            port,
            ipv4: true,
            ipv6: true,
        }),
        tries: opts.tries,
        retry_base: opts.ack_timeout.max(Duration::from_millis(1)),
        ipmsg,
        ..Config::default()
    }
}

/// `chat send HOST:PORT TEXT`: 0 once a chat peer acknowledged it or a plain peer was sent
/// it; 1 when it was not accepted (nothing listening, refused, never acknowledged).
/// What `chat send` sends: a line, or files (with an optional line) and how long to wait for
/// the peer to fetch them.
#[derive(Debug, Clone, Default)]
pub struct OneShot {
    pub text: Option<String>,
    pub files: Vec<PathBuf>,
    pub wait: Duration,
}

pub fn send_one(opts: &Options, to: &str, shot: &OneShot) -> anyhow::Result<ExitCode> {
    if shot.text.is_none() && shot.files.is_empty() {
        bail!("give a TEXT to send, or --file PATH");
    }
    let key = load_key(opts.key_file.as_deref())?;
    let keyed = key.is_some();
    let ipmsg = opts.speaks_ipmsg(keyed);
    let to = resolve(to, ipmsg.then_some(opts.ipmsg_port))?;
    let to_ipmsg = to.port() == opts.ipmsg_port;
    if to_ipmsg && !ipmsg && opts.ipmsg == IpmsgChoice::Unless {
        bail!("{to} is at the IP Messenger port, which cannot be authenticated, and this chat has a key; add --ipmsg to send anyway");
    }
    let mut ipmsg_config = None;
    // Any free port unless one was asked for, so it works beside a running chat.
    let socket = match (opts.port.unwrap_or(0), shot.files.is_empty()) {
        (0, false) => bind_serving(opts.bind.as_deref())?,
        (port, _) => bind(opts.bind.as_deref(), port)?,
    };
    let mut ipmsg_socket = None;
    let mut port_held_elsewhere = false;
    if to_ipmsg && ipmsg {
        let mut config = opts.ipmsg_config(keyed)?;
        // iptux acknowledges to the IP Messenger port, not to where a message came from:
        // use that port if it is free.
        let s = match bind_ipmsg(opts.bind.as_deref(), opts.ipmsg_port) {
            Err(e) if in_use(&e) => {
                port_held_elsewhere = true;
                config.exit_to_users = false;
                bind_ipmsg(opts.bind.as_deref(), 0)?
            }
            other => other?,
        };
        ipmsg_socket = Some(s.context("IP Messenger speaks IPv4, and --bind is an IPv6 address")?);
        ipmsg_config = Some(config);
    }
    // Connected, so that an ICMP "port unreachable" comes back as an error.
    ipmsg_socket
        .as_ref()
        .unwrap_or(&socket)
        .connect(to)
        .with_context(|| format!("cannot send to {to}"))?;
    let served_from = ipmsg_socket.as_ref().unwrap_or(&socket).local_addr()?;
    let transfer_key = key.clone();
    let (node, events) = Node::start(socket, ipmsg_socket, config(opts, key, None, ipmsg_config))?;
    node.greet(to);
    node.wait_for_greeting(to, Duration::from_secs(2));
    if !shot.files.is_empty() {
        let via = if to_ipmsg { Via::Ipmsg } else { Via::Chat };
        let outcome = send_files(&node, events, transfer_key, to, served_from, via, shot);
        node.stop();
        return outcome;
    }
    let text = shot.text.as_deref().unwrap_or_default();
    let outcome = match node.send(to, text) {
        Err(e) => {
            eprintln!("chat: {e}");
            ExitCode::from(1)
        }
        Ok(Sent::Plain) => match wait_for(
            &events,
            Duration::from_millis(300),
            |e| matches!(e, Event::Unreachable { to: t } if *t == to),
        ) {
            Some(_) => {
                eprintln!("chat: nothing is listening at {to}; not sent");
                ExitCode::from(1)
            }
            None => ExitCode::SUCCESS,
        },
        Ok(Sent::Reliable(id)) => match wait_for(
            &events,
            Duration::from_secs(120),
            |e| matches!(e, Event::Delivered { id: d, .. } | Event::NotDelivered { id: d, .. } if *d == id),
        ) {
            Some(Event::Delivered { .. }) => ExitCode::SUCCESS,
            _ if port_held_elsewhere => {
                eprintln!(
                    "chat: not delivered to {to}: no acknowledgement (iptux acknowledges on port {}, which another program holds here)",
                    opts.ipmsg_port
                );
                ExitCode::from(1)
            }
            _ => {
                eprintln!("chat: not delivered to {to}");
                ExitCode::from(1)
            }
        },
    };
    node.stop();
    Ok(outcome)
}

/// `chat send --file`: offers the files and waits until the peer fetched every one (0), or
/// declined them or did not fetch them in time (1).
fn send_files(
    node: &Node,
    events: Events,
    key: Option<Key>,
    to: SocketAddr,
    served_from: SocketAddr,
    via: Via,
    shot: &OneShot,
) -> anyhow::Result<ExitCode> {
    let (tx, happened) = may::sync::mpsc::channel();
    let sink: crate::transfer::Sink = Arc::new(move |h| {
        let _ = tx.send(h);
    });
    let sealed = key.is_some() && via == Via::Chat;
    let transfers = Transfers::new(
        node.clone(),
        key,
        Asker {
            user: std::env::var("USER").unwrap_or_else(|_| "user".into()),
            host: hostname(),
        },
        (PathBuf::from("."), None),
        sink,
    );
    if let Some(notice) = sharing::serve(&transfers, served_from, via, sealed) {
        bail!("{notice}");
    }
    // The node's events go to the transfers (a decline arrives as one).
    {
        let transfers = transfers.clone();
        corokit_common::spawn(move || {
            while let Some(e) = events.recv() {
                transfers.on_event(&e);
            }
        })?;
    }
    let packet = match transfers.offer(to, &shot.files, shot.text.as_deref().unwrap_or_default()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("chat: {}", escape(&e.to_string()));
            return Ok(ExitCode::from(1));
        }
    };
    let until = std::time::Instant::now() + shot.wait;
    loop {
        let Some(left) = until.checked_duration_since(std::time::Instant::now()) else {
            eprintln!("chat: {to} did not fetch the files within {:?}", shot.wait);
            return Ok(ExitCode::from(1));
        };
        let Ok(h) = happened.recv_timeout(corokit_common::wait_limit(left)) else {
            continue;
        };
        match h {
            Happening::Served {
                packet: p,
                all: true,
                ..
            } if p == packet => return Ok(ExitCode::SUCCESS),
            Happening::Declined { packet: p, .. } if p == packet => {
                eprintln!("chat: {to} declined the files");
                return Ok(ExitCode::from(1));
            }
            _ => {}
        }
    }
}

/// The first event matching `want` within `limit`.
fn wait_for(events: &Events, limit: Duration, want: impl Fn(&Event) -> bool) -> Option<Event> {
    let until = std::time::Instant::now() + limit;
    loop {
        let left = until.checked_duration_since(std::time::Instant::now())?;
        let e = events.recv_timeout(Some(left))?;
        if want(&e) {
            return Some(e);
        }
    }
}

/// `--log`: written by its own output thread, like stdout, so a slow disk holds no worker.
#[derive(Clone)]
struct Log(Option<Output>);

impl Log {
    fn write(&self, direction: &str, peer: SocketAddr, nick: Option<&str>, text: &str) {
        if let Some(file) = &self.0 {
            file.line(json_line(&serde_json::json!({
                "time": chrono::Local::now().to_rfc3339(), "direction": direction,
                "peer": peer.to_string(), "nick": nick, "text": text })));
        }
    }

    fn drain(&self) {
        if let Some(file) = &self.0 {
            file.drain_timeout(DRAIN_AT_EXIT);
        }
    }
}

/// The interactive `chat` (or a script's, when stdin is not a terminal): runs until
/// Ctrl-C, SIGTERM, SIGHUP or `/quit`.
pub fn run(opts: &Options, session: Session) -> anyhow::Result<ExitCode> {
    let key = load_key(opts.key_file.as_deref())?;
    let encrypted = key.is_some();
    let mut ipmsg_config = match opts.speaks_ipmsg(encrypted) {
        true => Some(opts.ipmsg_config(encrypted)?),
        false => None,
    };
    // Port 0 (any): one whose TCP number is free too, to serve files from.
    let socket = match opts.port.unwrap_or(7890) {
        0 => bind_serving(opts.bind.as_deref())?,
        port => bind(opts.bind.as_deref(), port)?,
    };
    let port = socket.local_addr()?.port();
    // Without the IP Messenger port chat goes on: a notice says why, once.
    let mut ipmsg_notice = None;
    let ipmsg_socket = match &mut ipmsg_config {
        None => None,
        Some(config) => match bind_ipmsg(opts.bind.as_deref(), opts.ipmsg_port) {
            Ok(Some(s)) => {
                if session.discovery {
                    config.broadcasts = broadcasts(opts.ipmsg_port);
                }
                Some(s)
            }
            Ok(None) => {
                ipmsg_notice = Some(
                    "IP Messenger speaks IPv4 and --bind is an IPv6 address: not speaking it"
                        .to_string(),
                );
                None
            }
            Err(e) => {
                ipmsg_notice = Some(format!("{e:#}; going on without IP Messenger"));
                None
            }
        },
    };
    let ipmsg_addr = ipmsg_socket.as_ref().and_then(|s| s.local_addr().ok());
    let transfer_key = key.clone();
    let (node, events) = Node::start(
        socket,
        ipmsg_socket,
        config(opts, key, session.discovery.then_some(port), ipmsg_config),
    )?;
    let bare_port = ipmsg_addr.map(|_| opts.ipmsg_port);
    let shutdown = Shutdown::on_signals()?;
    let log = Log(match &session.log {
        Some(path) => Some(corokit_common::output::write_lines(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the log {}", path.display()))?,
        )?),
        None => None,
    });
    let peers_file = session.peers_file.clone().or_else(remembered::default_file);
    let by_hand = session
        .to
        .iter()
        .map(|to| resolve(to, bare_port))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let remembered = peers_file
        .as_deref()
        .map(remembered::load)
        .unwrap_or_default();
    if let Some(file) = &peers_file {
        if let Err(e) = remembered::remember(file, &session.to) {
            eprintln!(
                "chat: cannot remember --to peers in {}: {e}",
                file.display()
            );
        }
    }
    for &addr in &by_hand {
        node.greet(addr);
    }
    // Remembered names are resolved in the background: one slow lookup must not hold up
    // the start.
    {
        let node = node.clone();
        corokit_common::spawn(move || {
            for addr in remembered.iter().filter_map(|r| resolve(r, bare_port).ok()) {
                node.greet(addr);
            }
        })?;
    }

    let interactive = io::stdin().is_terminal() && io::stdout().is_terminal() && !session.json;
    let (mut lines, out) = if interactive {
        let (lines, above) = crate::terminal::editor(shutdown.clone())?;
        (lines, corokit_common::output::write_lines(above)?)
    } else {
        (
            corokit_common::stdin::lines(),
            corokit_common::output::stdout()?,
        )
    };
    let local = node.local_addr()?;
    if session.json {
        out.line(render::listening(
            local,
            ipmsg_addr,
            &node.nick(),
            &render::clock(),
        ));
    } else {
        out.line(format!(
            "chat: {} on {local} ({}){}; /help for commands",
            escape(&node.nick()),
            if encrypted {
                "encrypted"
            } else {
                "not encrypted"
            },
            match ipmsg_addr {
                Some(a) if encrypted => format!(", IP Messenger on {a} (unauthenticated)"),
                Some(a) => format!(", IP Messenger on {a}"),
                None => String::new(),
            }
        ));
    }
    // Files: served on TCP beside each UDP socket, received into --downloads.
    let transfers = Transfers::new(
        node.clone(),
        transfer_key,
        Asker {
            user: std::env::var("USER").unwrap_or_else(|_| "user".into()),
            host: hostname(),
        },
        (
            opts.downloads.clone().unwrap_or_else(|| PathBuf::from(".")),
            opts.min_free,
        ),
        sharing::sink(out.clone(), session.json),
    );
    let mut notices: Vec<String> = ipmsg_notice.into_iter().collect();
    notices.extend(sharing::serve(&transfers, local, Via::Chat, encrypted));
    if let Some(addr) = ipmsg_addr {
        notices.extend(sharing::serve(&transfers, addr, Via::Ipmsg, false));
    }
    for text in notices {
        let event = Event::Notice(text);
        let line = match session.json {
            true => render::json(&event, &render::clock()),
            false => render::text(&event, &render::clock()),
        };
        out.line(line.expect("a notice is shown"));
    }

    // Showing what arrives: its own coroutine, so input never waits for output.
    {
        let (out, log, json) = (out.clone(), log.clone(), session.json);
        let transfers = transfers.clone();
        corokit_common::spawn(move || {
            while let Some(event) = events.recv() {
                if transfers.on_event(&event) {
                    continue;
                }
                if let Event::Message {
                    from, nick, text, ..
                } = &event
                {
                    log.write("in", *from, nick.as_deref(), text);
                }
                let clock = render::clock();
                let line = if json {
                    render::json(&event, &clock)
                } else {
                    render::text(&event, &clock)
                };
                if let Some(line) = line {
                    out.line(line);
                }
            }
        })?;
    }

    // Taking what the user types.
    {
        let mut input = Input {
            node: node.clone(),
            out: out.clone(),
            log: log.clone(),
            dest: by_hand.first().copied(),
            bare_port,
            files: sharing::Files {
                transfers: transfers.clone(),
                node: node.clone(),
                out: out.clone(),
                bare_port,
            },
            keyed: encrypted,
        };
        let shutdown = shutdown.clone();
        corokit_common::spawn(move || {
            // Give peers added by hand a moment to answer, so the first line goes out
            // acknowledged rather than as plain text.
            for &addr in &by_hand {
                input.node.wait_for_greeting(addr, GREETING_WAIT);
            }
            loop {
                match lines.recv() {
                    Some(Ok(line)) => {
                        if !input.line(&line) {
                            shutdown.request();
                            return;
                        }
                    }
                    Some(Err(corokit_common::stdin::LineError::TooLong { limit })) => {
                        input.out.line(format!(
                            "chat: a line longer than {limit} bytes was not sent"
                        ))
                    }
                    Some(Err(_)) | None => return,
                }
            }
        })?;
    }

    shutdown.wait();
    node.stop();
    // A reader that stopped reading must not keep us from ending.
    out.drain_timeout(DRAIN_AT_EXIT);
    log.drain();
    // Let the goodbyes leave before the process ends.
    corokit_common::sleep(Duration::from_millis(50));
    Ok(ExitCode::SUCCESS)
}

struct Input {
    node: Node,
    out: Output,
    log: Log,
    dest: Option<SocketAddr>,
    /// The port a host given without one gets (IP Messenger's, when spoken).
    bare_port: Option<u16>,
    files: sharing::Files,
    /// This chat has a key.
    keyed: bool,
}

/// What `/away` says to IP Messenger users who write meanwhile.
const AWAY: &str = "I am away from my desk; I will read your message later.";

impl Input {
    /// Handles one typed line; false for /quit.
    fn line(&mut self, line: &str) -> bool {
        match command::parse(line) {
            Command::Nothing => {}
            Command::Quit => return false,
            Command::Help => self.out.line(HELP.into()),
            Command::To(None) => {
                self.dest = None;
                self.out.line("chat: sending to every known peer".into());
            }
            Command::To(Some(to)) => match resolve(to, self.bare_port) {
                Ok(addr) => {
                    self.node.greet(addr);
                    self.dest = Some(addr);
                    self.out.line(format!("chat: sending to {addr}"));
                }
                Err(e) => self.out.line(format!("chat: {e:#}")),
            },
            Command::Nick(name) => {
                self.node.set_nick(name);
                self.out
                    .line(format!("chat: you are now {}", escape(&self.node.nick())));
            }
            Command::Who => {
                for line in render::who_lines(&self.node.peers()) {
                    self.out.line(line);
                }
                self.out.line(format!("  {}", self.node.stats().summary()));
            }
            Command::Stats => self
                .out
                .line(format!("chat: {}", self.node.stats().summary())),
            Command::Away(_) | Command::Back if self.bare_port.is_none() => self.out.line(
                "chat: away and back are told to IP Messenger users, and IP Messenger is off"
                    .into(),
            ),
            Command::Away(text) => {
                let text = text.unwrap_or(AWAY);
                self.node.set_away(Some(text.to_string()));
                self.out.line(format!(
                    "chat: away; IP Messenger users who write get: {}",
                    escape(text)
                ));
            }
            Command::Back => {
                self.node.set_away(None);
                self.out.line("chat: back".into());
            }
            Command::Send { to, paths } => self.files.send(&to, &paths),
            Command::Files => self.files.list(),
            Command::Get { id, dir } => self.files.get(id, dir.as_deref()),
            Command::Decline(id) => self.files.decline(id),
            Command::Withdraw(packet) => self.files.withdraw(packet),
            Command::All(text) => self.send_all(text),
            Command::Msg { nick, text } => self.send_nick(nick, text),
            Command::Say(text) => match self.dest {
                Some(to) => self.send(to, text),
                None => self.send_all(text),
            },
            Command::Usage(usage) => self.out.line(format!("chat: {usage}")),
            Command::Unknown(cmd) => self
                .out
                .line(format!("chat: unknown command {}; {HELP}", escape(cmd))),
        }
        true
    }

    fn send(&self, to: SocketAddr, text: &str) {
        if self.node.greeting(to) == Some(Greeting::Pending) {
            self.node.wait_for_greeting(to, GREETING_WAIT);
        }
        match self.node.send(to, text) {
            Ok(_) => {
                let nick = self
                    .node
                    .chat_peer(to)
                    .map(|(_, n)| n)
                    .or_else(|| self.node.ipmsg_user(to).map(|(n, _)| n));
                self.log.write("out", to, nick.as_deref(), text)
            }
            Err(e) => self.out.line(format!("chat: {e}")),
        }
    }

    fn send_all(&self, text: &str) {
        // With a key, a line for everyone stays sealed: IP Messenger users (cleartext,
        // unauthenticated) get only what is sent to them by name or address.
        let peers: Vec<_> = self
            .node
            .peers()
            .into_iter()
            .filter(|p| !self.keyed || !matches!(p.protocol, Protocol::Ipmsg { .. }))
            .collect();
        if peers.is_empty() {
            self.out
                .line("chat: nobody to send to yet: use /to HOST:PORT".into());
        }
        for p in peers {
            self.send(p.addr, text);
        }
    }

    fn send_nick(&self, nick: &str, text: &str) {
        let matches = sharing::by_nick(&self.node, nick);
        if matches.is_empty() {
            self.out.line(format!(
                "chat: no peer called {}; /who lists them",
                escape(nick)
            ));
        }
        for addr in matches {
            self.send(addr, text);
        }
    }
}
