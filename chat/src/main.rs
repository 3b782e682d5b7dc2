//! The `chat` command: parses arguments, binds the socket, and connects the user's input and
//! output to a [`Node`]. One coroutine reads what the user types and sends it; the node's
//! receive coroutine delivers what arrives, which is printed above the input line.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use corokit_chat::display::escape;
use corokit_chat::peers::{self, Protocol};
use corokit_chat::seal::Key;
use corokit_chat::{Config, Event, Events, Node, Sent};
use corokit_common::output::Output;
use corokit_common::Shutdown;

/// LAN messaging over UDP: with other `chat` instances (discovery, nicknames, acknowledged
/// and ordered delivery, optional encryption) and with plain peers like `nc -u`.
///
/// Type a line to send it to the current destination (or to every known peer when there is
/// none). Commands: /to HOST:PORT, /msg NICK text (or @NICK text), /all text, /who, /stats,
/// /nick NAME, /help, /quit.
///
/// Exit status: 0 on a normal end (Ctrl-C, SIGTERM, /quit); 1 when `chat send` could not
/// deliver; 2 for usage errors, a port in use, or an unreadable key file.
#[derive(Parser, Debug)]
#[command(
    name = "chat",
    version,
    verbatim_doc_comment,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Add a peer by hand (repeatable), also on another subnet; remembered for next time.
    #[arg(long = "to", value_name = "HOST:PORT")]
    to: Vec<String>,
    /// Do not announce by broadcast and multicast (peers can still be added with --to).
    #[arg(long)]
    no_discovery: bool,
    /// Print one JSON object per event (listening, message, join, leave, not_delivered,
    /// notice) on stdout; replies to commands stay plain text.
    #[arg(long)]
    json: bool,
    /// Append every message sent and received to this file as JSON lines.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Where peers added with --to are remembered.
    #[arg(long, value_name = "FILE")]
    peers_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args, Debug)]
struct Common {
    /// UDP port to bind [default: 7890; for `send`, any free port].
    #[arg(long)]
    port: Option<u16>,
    /// Address to bind: an IP (with --port) or IP:PORT [default: `::`, IPv6 and IPv4].
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// Nickname (default: user@host).
    #[arg(long, value_name = "NICK")]
    name: Option<String>,
    /// Shared secret in this file: all protocol traffic is then encrypted and authenticated.
    /// The secret can also come from the CHAT_KEY environment variable.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Sends of a message before it is reported as not delivered.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=30))]
    tries: u32,
    /// Milliseconds before the first retransmission (doubled after each).
    #[arg(long, default_value_t = 200, value_name = "MS")]
    ack_timeout: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send one message and wait for the acknowledgement: exit 0 if delivered, 1 if not
    /// (a plain peer: 0 once sent).
    Send {
        #[arg(value_name = "HOST:PORT")]
        to: String,
        text: String,
        #[command(flatten)]
        common: Common,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    corokit_common::init();
    let result = match &args.command {
        Some(Command::Send { to, text, common }) => send_one(common, to, text),
        None => run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chat: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `HOST:PORT`, `[v6]:PORT` or `v6` literal with a port, resolved off the worker threads.
fn resolve(text: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = text
        .rsplit_once(':')
        .with_context(|| format!("{text:?} is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{text:?}: bad port"))?;
    let addrs = corokit_common::Dns::system()
        .resolve(host, port, Duration::from_secs(5))
        .with_context(|| format!("{text:?}"))?;
    addrs
        .into_iter()
        .next()
        .with_context(|| format!("{text:?}: no address"))
}

/// Binds `--bind`, or by default `::` for IPv6 and IPv4 at once, falling back to `0.0.0.0`
/// on a host without IPv6 (but not when the port is in use: that stays an error).
fn bind(common: &Common, port: u16) -> anyhow::Result<may::net::UdpSocket> {
    let addr = match &common.bind {
        None => {
            return bind_to(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).or_else(|e| {
                let in_use = e.downcast_ref::<io::Error>().map(io::Error::kind)
                    == Some(io::ErrorKind::AddrInUse);
                if in_use {
                    Err(e)
                } else {
                    bind_to(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
                }
            });
        }
        Some(b) => match b.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                let ip: IpAddr = b
                    .trim_matches(['[', ']'])
                    .parse()
                    .with_context(|| format!("--bind {b:?} is not an IP address or IP:PORT"))?;
                SocketAddr::new(ip, port)
            }
        },
    };
    bind_to(addr)
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

fn load_key(common: &Common) -> anyhow::Result<Option<Key>> {
    let secret = match &common.key_file {
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

fn default_nick() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{user}@{host}")
}

fn start(common: &Common, port: u16, discovery: bool) -> anyhow::Result<(Node, Events)> {
    let socket = bind(common, port)?;
    let local = socket.local_addr()?;
    let config = Config {
        nick: common.name.clone().unwrap_or_else(default_nick),
        key: load_key(common)?,
        discovery_port: discovery.then_some(local.port()),
        tries: common.tries,
        retry_base: Duration::from_millis(common.ack_timeout.max(1)),
        ..Config::default()
    };
    Ok(Node::start(socket, config)?)
}

/// Waits up to `limit` for `addr` to answer our hello.
fn wait_for_peer(node: &Node, addr: SocketAddr, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if node.is_chat_peer(addr) {
            return true;
        }
        corokit_common::sleep(Duration::from_millis(10));
    }
    false
}

fn send_one(common: &Common, to: &str, text: &str) -> anyhow::Result<ExitCode> {
    let to = resolve(to)?;
    // Any free port unless one was asked for, so it works beside a running chat.
    let (node, events) = start(common, common.port.unwrap_or(0), false)?;
    node.hello(to);
    wait_for_peer(&node, to, Duration::from_secs(1));
    let outcome = match node.send(to, text) {
        Err(e) => {
            eprintln!("chat: {e}");
            ExitCode::from(1)
        }
        Ok(Sent::Plain) => ExitCode::SUCCESS,
        Ok(Sent::Reliable(id)) => loop {
            match events.recv_timeout(Duration::from_secs(60)) {
                Some(Event::Delivered { id: d, .. }) if d == id => break ExitCode::SUCCESS,
                Some(Event::NotDelivered { id: d, .. }) if d == id => {
                    eprintln!("chat: not delivered to {to}");
                    break ExitCode::from(1);
                }
                Some(_) => continue,
                None => break ExitCode::from(1),
            }
        },
    };
    node.stop();
    Ok(outcome)
}

/// Lines written to it are printed above the line editor's input line. It is the sink of an
/// output thread, like stdout: the printer can block, and must not block a worker.
struct AboveInput {
    printer: Box<dyn rustyline::ExternalPrinter + Send>,
    pending: Vec<u8>,
}

impl Write for AboveInput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]).into_owned();
            self.printer.print(text).map_err(io::Error::other)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn now() -> String {
    chrono::Local::now().format("%H:%M:%S").to_string()
}

fn who(nick: &Option<String>, addr: SocketAddr) -> String {
    match nick {
        Some(n) => format!("{} ({addr})", escape(n)),
        None => addr.to_string(),
    }
}

fn render(event: &Event, json: bool) -> Option<String> {
    if json {
        let value = match event {
            Event::Message { from, nick, text } => serde_json::json!({
                "event": "message", "time": now(), "from": from.to_string(), "nick": nick, "text": text,
                "protocol": if nick.is_some() { "chat" } else { "plain" } }),
            Event::Join { addr, nick } => {
                serde_json::json!({"event": "join", "time": now(), "from": addr.to_string(), "nick": nick})
            }
            Event::Leave {
                addr,
                nick,
                expired,
            } => {
                serde_json::json!({"event": "leave", "time": now(), "from": addr.to_string(), "nick": nick, "expired": expired})
            }
            Event::NotDelivered { to, nick, text, .. } => {
                serde_json::json!({"event": "not_delivered", "time": now(), "to": to.to_string(), "nick": nick, "text": text})
            }
            Event::Notice(text) => {
                serde_json::json!({"event": "notice", "time": now(), "text": text})
            }
            Event::Delivered { .. } => return None,
        };
        return Some(value.to_string());
    }
    Some(match event {
        Event::Message { from, nick, text } => {
            format!("[{}] {}: {}", now(), who(nick, *from), escape(text))
        }
        Event::Join { addr, nick } => {
            format!("[{}] * {} joined", now(), who(&Some(nick.clone()), *addr))
        }
        Event::Leave {
            addr,
            nick,
            expired,
        } => format!(
            "[{}] * {} {}",
            now(),
            who(&Some(nick.clone()), *addr),
            if *expired { "went silent" } else { "left" }
        ),
        Event::NotDelivered { to, nick, text, .. } => format!(
            "[{}] ! not delivered to {}: {}",
            now(),
            who(nick, *to),
            escape(&text.chars().take(60).collect::<String>())
        ),
        Event::Notice(text) => format!("[{}] ! {}", now(), escape(text)),
        Event::Delivered { .. } => return None,
    })
}

/// `--log`: written by its own output thread, like stdout, so a slow disk holds no worker.
#[derive(Clone)]
struct Log(Option<Output>);

impl Log {
    fn write(&self, direction: &str, peer: SocketAddr, nick: &Option<String>, text: &str) {
        if let Some(file) = &self.0 {
            let line = serde_json::json!({
                "time": chrono::Local::now().to_rfc3339(), "direction": direction,
                "peer": peer.to_string(), "nick": nick, "text": text });
            file.line(line.to_string());
        }
    }

    fn drain(&self) {
        if let Some(file) = &self.0 {
            file.drain();
        }
    }
}

const HELP: &str = "commands: /to HOST:PORT (destination; /to alone: every peer), /msg NICK text or @NICK text, /all text, /who, /stats, /nick NAME, /help, /quit";

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let (node, events) = start(
        &args.common,
        args.common.port.unwrap_or(7890),
        !args.no_discovery,
    )?;
    let shutdown = Shutdown::on_signals()?;
    let log = Log(match &args.log {
        Some(path) => Some(corokit_common::output::write_lines(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the log {}", path.display()))?,
        )?),
        None => None,
    });
    let peers_file = args.peers_file.clone().or_else(|| {
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
        Some(base.join("corokit/chat-peers"))
    });
    let by_hand = args
        .to
        .iter()
        .map(|to| resolve(to))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let remembered = peers_file
        .as_deref()
        .map(peers::load_remembered)
        .unwrap_or_default();
    if let Some(file) = &peers_file {
        if let Err(e) = peers::remember(file, &args.to) {
            eprintln!(
                "chat: cannot remember --to peers in {}: {e}",
                file.display()
            );
        }
    }
    for &addr in &by_hand {
        node.hello(addr);
    }
    // Remembered names are resolved in the background: one slow lookup must not hold up
    // the start. One hello per peer, however it was given.
    {
        let (node, greeted) = (node.clone(), by_hand.clone());
        corokit_common::spawn(move || {
            let mut greeted = greeted;
            for addr in remembered.iter().filter_map(|r| resolve(r).ok()) {
                if !greeted.contains(&addr) {
                    greeted.push(addr);
                    node.hello(addr);
                }
            }
        })?;
    }

    let interactive =
        std::io::stdin().is_terminal() && std::io::stdout().is_terminal() && !args.json;
    let (lines, out) = if interactive {
        let (lines, printer) = editor(shutdown.clone())?;
        let above = AboveInput {
            printer,
            pending: Vec::new(),
        };
        (lines, corokit_common::output::write_lines(above)?)
    } else {
        (
            corokit_common::stdin::lines(),
            corokit_common::output::stdout()?,
        )
    };
    if args.json {
        out.line(serde_json::json!({"event": "listening", "time": now(), "addr": node.local_addr()?.to_string(), "nick": node.nick()}).to_string());
    } else {
        out.line(format!(
            "chat: {} on {} ({}); /help for commands",
            escape(&node.nick()),
            node.local_addr()?,
            if args.common.key_file.is_some() || std::env::var_os("CHAT_KEY").is_some() {
                "encrypted"
            } else {
                "not encrypted"
            }
        ));
    }

    // Showing what arrives: its own coroutine, so input never waits for output.
    {
        let (out, log, json) = (out.clone(), log.clone(), args.json);
        corokit_common::spawn(move || {
            while let Some(event) = events.recv() {
                if let Event::Message { from, nick, text } = &event {
                    log.write("in", *from, nick, text);
                }
                if let Some(line) = render(&event, json) {
                    out.line(line);
                }
            }
        })?;
    }

    // Taking what the user types.
    {
        let (node, out, log, shutdown) = (node.clone(), out.clone(), log.clone(), shutdown.clone());
        let first = by_hand.first().copied();
        corokit_common::spawn(move || {
            // Give peers added by hand a moment to answer, so the first line goes out
            // acknowledged rather than as plain text.
            for &addr in &by_hand {
                wait_for_peer(&node, addr, Duration::from_secs(1));
            }
            let mut input = Input {
                node,
                out,
                log,
                dest: first,
            };
            while let Some(Ok(line)) = lines.recv() {
                if !input.line(&line) {
                    shutdown.request();
                    return;
                }
            }
        })?;
    }

    shutdown.wait();
    node.stop();
    out.drain();
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
}

impl Input {
    /// Handles one typed line; false for /quit.
    fn line(&mut self, line: &str) -> bool {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            return true;
        }
        let (cmd, rest) = match line.split_once(' ') {
            Some((c, r)) => (c, r.trim_start()),
            None => (line, ""),
        };
        match cmd {
            "/quit" | "/exit" => return false,
            "/help" => self.out.line(HELP.into()),
            "/to" if rest.is_empty() => {
                self.dest = None;
                self.out.line("chat: sending to every known peer".into());
            }
            "/to" => match resolve(rest) {
                Ok(addr) => {
                    self.node.hello(addr);
                    self.dest = Some(addr);
                    self.out.line(format!("chat: sending to {addr}"));
                }
                Err(e) => self.out.line(format!("chat: {e:#}")),
            },
            "/nick" if !rest.is_empty() => {
                self.node.set_nick(rest);
                self.out
                    .line(format!("chat: you are now {}", escape(&self.node.nick())));
            }
            "/who" => {
                let peers = self.node.peers();
                if peers.is_empty() {
                    self.out.line("chat: no peers yet".into());
                }
                for p in peers {
                    let also: String = p
                        .also
                        .iter()
                        .map(|(a, _)| format!(", also at {a}"))
                        .collect();
                    self.out.line(format!(
                        "  {:<24} {:<22} {:<5} last seen {:.0?} ago{also}",
                        escape(p.nick.as_deref().unwrap_or("-")),
                        p.addr,
                        if p.protocol == Protocol::Chat {
                            "chat"
                        } else {
                            "plain"
                        },
                        p.last_seen.elapsed()
                    ));
                }
                self.out.line(format!("  {}", self.node.stats().summary()));
            }
            "/stats" => self
                .out
                .line(format!("chat: {}", self.node.stats().summary())),
            "/all" => self.send_all(rest),
            "/msg" => match rest.split_once(' ') {
                Some((nick, text)) => self.send_nick(nick, text),
                None => self.out.line("chat: usage: /msg NICK text".into()),
            },
            _ if line.starts_with('@') => match line[1..].split_once(' ') {
                Some((nick, text)) => self.send_nick(nick, text),
                None => self.out.line("chat: usage: @NICK text".into()),
            },
            _ if line.starts_with('/') && !line.starts_with("//") => self
                .out
                .line(format!("chat: unknown command {}; {HELP}", escape(cmd))),
            _ => {
                // A leading "//" sends a line that starts with "/".
                let text = line
                    .strip_prefix('/')
                    .filter(|t| t.starts_with('/'))
                    .unwrap_or(line);
                match self.dest {
                    Some(to) => self.send(to, text),
                    None => self.send_all(text),
                }
            }
        }
        true
    }

    fn send(&self, to: SocketAddr, text: &str) {
        match self.node.send(to, text) {
            Ok(_) => self.log.write("out", to, &None, text),
            Err(e) => self.out.line(format!("chat: sending to {to}: {e}")),
        }
    }

    fn send_all(&self, text: &str) {
        let peers = self.node.peers();
        if peers.is_empty() {
            self.out
                .line("chat: nobody to send to yet: use /to HOST:PORT".into());
        }
        for p in peers {
            self.send(p.addr, text);
        }
    }

    fn send_nick(&self, nick: &str, text: &str) {
        let matches: Vec<SocketAddr> = self
            .node
            .peers()
            .into_iter()
            .filter(|p| p.nick.as_deref() == Some(nick))
            .map(|p| p.addr)
            .collect();
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

/// The line editor on its own thread (it blocks on the terminal): lines go to a channel,
/// and its external printer shows incoming text above the input line.
fn editor(
    shutdown: Shutdown,
) -> anyhow::Result<(
    corokit_common::stdin::Lines,
    Box<dyn rustyline::ExternalPrinter + Send>,
)> {
    let mut rl = rustyline::DefaultEditor::new()?;
    let printer = rl.create_external_printer()?;
    let (reader, mut writer) = std::io::pipe()?;
    std::thread::Builder::new()
        .name("chat-editor".into())
        .spawn(move || {
            // Ctrl-C or Ctrl-D at the prompt ends the loop: leave, saying goodbye.
            while let Ok(line) = rl.readline("> ") {
                let _ = rl.add_history_entry(line.as_str());
                if writeln!(writer, "{line}").is_err() {
                    break;
                }
            }
            shutdown.request();
        })?;
    Ok((corokit_common::stdin::read_lines(reader), Box::new(printer)))
}
