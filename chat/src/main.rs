//! The `chat` command: parses arguments and hands them to [`corokit_chat::app`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use corokit_chat::app::{self, IpmsgChoice, Options, Session};

/// LAN messaging over UDP: with other `chat` instances (discovery, nicknames, acknowledged
/// and ordered delivery, optional encryption), with IP Messenger users (IP Messenger, iptux,
/// FeiQ, on UDP 2425) and with plain peers like `nc -u`.
///
/// Type a line to send it to the current destination (or to every known peer when there is
/// none). Commands: /to HOST:PORT (/to HOST: an IP Messenger user), /msg NICK text (or
/// @NICK text), /all text, /who, /stats, /nick NAME, /away [TEXT], /back, /help, /quit.
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
    /// refused, unreachable, notice) on stdout; replies to commands stay plain text.
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
    /// Sends of a datagram, unanswered, before its peer counts as gone and its messages
    /// are reported not delivered (6: 9.4 s of silence with the default --ack-timeout).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=30))]
    tries: u32,
    /// Milliseconds before the first retransmission (doubled after each, up to 16 times).
    #[arg(long, default_value_t = 200, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    ack_timeout: u64,
    /// Do not speak IP Messenger (UDP 2425).
    #[arg(long, conflicts_with = "ipmsg")]
    no_ipmsg: bool,
    /// Speak IP Messenger also with a key (its peers cannot be authenticated, and are marked
    /// so); without a key it is on by default.
    #[arg(long)]
    ipmsg: bool,
    /// The IP Messenger port: bound by chat, and where IP Messenger peers are reached.
    #[arg(long, default_value_t = corokit_chat::ipmsg::PORT, value_name = "PORT")]
    ipmsg_port: u16,
    /// Our IP Messenger group.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// Encoding of IP Messenger peers that do not say (cp932, gbk, gb18030, big5, euc-kr,
    /// utf-8, …) [default: gb18030 in a Chinese locale, else cp932].
    #[arg(long, value_name = "NAME")]
    ipmsg_encoding: Option<String>,
    /// Where /get saves files when no directory is given [default: the current directory].
    #[arg(long, value_name = "DIR")]
    downloads: Option<PathBuf>,
    /// Space a received file must leave free on its disk (K, M, G, T) [default: 5% of the
    /// disk, at most 1G].
    #[arg(long, value_name = "SIZE", value_parser = corokit_common::size::parse)]
    min_free: Option<u64>,
}

impl Common {
    fn options(&self) -> Options {
        Options {
            port: self.port,
            bind: self.bind.clone(),
            nick: self.name.clone(),
            key_file: self.key_file.clone(),
            tries: self.tries,
            ack_timeout: Duration::from_millis(self.ack_timeout),
            ipmsg: match (self.ipmsg, self.no_ipmsg) {
                (true, _) => IpmsgChoice::On,
                (_, true) => IpmsgChoice::Off,
                _ => IpmsgChoice::Unless,
            },
            ipmsg_port: self.ipmsg_port,
            group: self.group.clone(),
            ipmsg_encoding: self.ipmsg_encoding.clone(),
            downloads: self.downloads.clone(),
            min_free: self.min_free,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send one message: exit 0 once a chat peer or an IP Messenger user (HOST:2425, or
    /// HOST alone) acknowledged it (a plain peer: once it was sent), 1 if it was not
    /// accepted (nothing listening, refused, not acknowledged).
    Send {
        #[arg(value_name = "HOST:PORT")]
        to: String,
        text: Option<String>,
        /// Offer this file or directory (repeatable) and exit 0 once the peer fetched every
        /// one, 1 if it declined or did not within --wait.
        #[arg(long = "file", value_name = "PATH")]
        files: Vec<PathBuf>,
        /// Seconds to wait for the peer to fetch the files.
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        wait: u64,
        #[command(flatten)]
        common: Common,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    corokit_common::RuntimeConfig::with_workers(1).init();
    let result = match &args.command {
        Some(Command::Send {
            to,
            text,
            files,
            wait,
            common,
        }) => app::send_one(
            &common.options(),
            to,
            &app::OneShot {
                text: text.clone(),
                files: files.clone(),
                wait: Duration::from_secs(*wait),
            },
        ),
        None => app::run(
            &args.common.options(),
            Session {
                to: args.to.clone(),
                discovery: !args.no_discovery,
                json: args.json,
                log: args.log.clone(),
                peers_file: args.peers_file.clone(),
            },
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chat: {e:#}");
            ExitCode::from(2)
        }
    }
}
