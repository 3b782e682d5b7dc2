//! What the end-to-end tests of chat share: a running `chat --json` read line by line, and
//! a UDP socket on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn udp() -> may::net::UdpSocket {
    corokit_common::init();
    let s = may::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// A running `chat --json` whose output lines arrive on a channel.
pub struct Chat {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub lines: mpsc::Receiver<String>,
    pub addr: SocketAddr,
    pub seen: Vec<Value>,
    /// The `listening` event it started with.
    pub listening: Value,
    /// While set, nobody reads the output: the pipe fills and `chat` falls behind.
    pub stalled: Arc<AtomicBool>,
}

impl Chat {
    pub fn start(args: &[&str]) -> Chat {
        Self::start_with(args, &[])
    }

    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Chat {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat"));
        cmd.arg("--no-discovery");
        // IP Messenger's port is one per host: only the tests about it speak it.
        if !args.iter().any(|a| a.starts_with("--ipmsg")) {
            cmd.arg("--no-ipmsg");
        }
        if !args.contains(&"--bind") {
            cmd.args(["--bind", "127.0.0.1"]);
        }
        if !args.contains(&"--port") {
            cmd.args(["--port", "0"]);
        }
        Self::spawn(cmd, args, env)
    }

    /// Runs `chat` inside network namespace `ns`, with discovery on its default port.
    pub fn start_in(ns: &str, args: &[&str]) -> Chat {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_chat")]);
        Self::spawn(cmd, args, &[])
    }

    pub fn spawn(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Chat {
        corokit_common::init();
        if !args.contains(&"--peers-file") {
            let dir = tempfile::tempdir().unwrap().keep();
            cmd.arg("--peers-file").arg(dir.join("peers"));
        }
        let mut child = cmd
            .arg("--json")
            .args(args)
            .env_remove("CHAT_KEY")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stalled = Arc::new(AtomicBool::new(false));
        let stall = stalled.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                while stall.load(Ordering::SeqCst) {
                    corokit_common::sleep(Duration::from_millis(10));
                }
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let first = lines.recv_timeout(WAIT).expect("chat printed nothing");
        let v: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["event"], "listening", "{first}");
        let addr = v["addr"].as_str().unwrap().parse().unwrap();
        Chat {
            stdin: child.stdin.take(),
            child,
            lines,
            addr,
            seen: Vec::new(),
            listening: v,
            stalled,
        }
    }

    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for an event matching `pred`, keeping everything seen.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            let v: Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(_) => Value::String(line),
            };
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
        panic!("{what} did not happen; saw {:#?}", self.seen)
    }

    pub fn messages(&mut self, settle: Duration) -> Vec<String> {
        let until = Instant::now() + settle;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => self
                    .seen
                    .push(serde_json::from_str(&line).unwrap_or(Value::String(line))),
                Err(_) => break,
            }
        }
        self.seen
            .iter()
            .filter(|v| v["event"] == "message")
            .map(|v| v["text"].as_str().unwrap().to_string())
            .collect()
    }

    /// `/who`'s line for `nick`, asked again until it shows another address ("also at"):
    /// the second address is heard moments after the first (neighbour discovery).
    pub fn who_with_aliases(&mut self, nick: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let name = format!(" {nick} ");
        loop {
            // Earlier answers go (they are the lines that are not JSON); events stay.
            self.seen.retain(|v| !v.is_string());
            self.say("/who");
            let line = self.wait_for("/who", |v| v.as_str().is_some_and(|l| l.contains(&name)));
            let line = line.as_str().unwrap().to_string();
            if line.contains("also at") || Instant::now() > deadline {
                return line;
            }
            corokit_common::sleep(Duration::from_millis(50));
        }
    }

    pub fn joined(&mut self, addr: SocketAddr) {
        let a = addr.to_string();
        self.wait_for("join", |v| v["event"] == "join" && v["from"] == a.as_str());
    }

    /// Waits for `chat` to end by itself: its exit code, or `None` if it is still running.
    pub fn exit_code(mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            corokit_common::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn terminate(mut self) -> i32 {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        status.code().unwrap_or(-1)
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn msg_from(v: &Value, from: SocketAddr, text: &str) -> bool {
    v["event"] == "message" && v["from"] == from.to_string().as_str() && v["text"] == text
}

/// Hosts in network namespaces joined by a bridge (in a namespace of its own), removed on drop.
pub struct Lan {
    pub names: Vec<String>,
}

impl Lan {
    pub fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Two hosts on one link with IPv6 link-local addresses usable at once (no duplicate
    /// address detection) and, with `ipv4`, 10.213.77.1 and .2; `None` where namespaces are
    /// not permitted.
    pub fn two_hosts(ipv4: bool) -> Option<Lan> {
        static LANS: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}x{}",
            std::process::id(),
            LANS.fetch_add(1, Ordering::SeqCst)
        );
        let (br, h1, h2) = (
            format!("ckbr{id}"),
            format!("ckh1{id}"),
            format!("ckh2{id}"),
        );
        let lan = Lan {
            names: vec![br.clone(), h1.clone(), h2.clone()],
        };
        if !Lan::ip(&["netns", "add", &br]) {
            return None;
        }
        let no_dad = "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad";
        let ok = Lan::ip(&["netns", "add", &h1])
            && Lan::ip(&["netns", "add", &h2])
            && [&h1, &h2]
                .iter()
                .all(|h| Lan::ip(&["netns", "exec", h, "sh", "-c", no_dad]))
            && Lan::ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])
            && Lan::ip(&["-n", &br, "link", "set", "br0", "up"])
            && [(&h1, "1"), (&h2, "2")].iter().all(|(h, n)| {
                let port = format!("p{n}");
                Lan::ip(&["-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", h])
                    && Lan::ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"])
                    && (!ipv4
                        || Lan::ip(&["-n", h, "addr", "add", &format!("10.213.77.{n}/24"), "dev", "eth0"]))
                    && Lan::ip(&["-n", h, "link", "set", "eth0", "up"])
                    && Lan::ip(&["-n", h, "link", "set", "lo", "up"])
                    // Broadcast and multicast leave through eth0; nothing else is there.
                    && (!ipv4 || Lan::ip(&["-n", h, "route", "add", "default", "dev", "eth0"]))
            });
        ok.then_some(lan)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for name in &self.names {
            Lan::ip(&["netns", "del", name]);
        }
    }
}

/// Events of `kind` in everything `chat` printed so far.
pub fn count(chat: &Chat, kind: &str) -> usize {
    chat.seen.iter().filter(|v| v["event"] == kind).count()
}

/// A chat speaking IPMsg at 127.0.0.1 on a free port; the port.
pub fn chat_with_ipmsg(args: &[&str], env: &[(&str, &str)]) -> (Chat, u16) {
    for _ in 0..10 {
        // A port free on 127.0.0.2 is very likely free on 127.0.0.1 too; if not, another.
        corokit_common::init();
        let port = may::net::UdpSocket::bind("127.0.0.2:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Files are served over TCP on the same number: it must be free there too (a
        // client connection of another test may hold it).
        let tcp_free = ["127.0.0.1", "127.0.0.2"]
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok());
        if !tcp_free {
            continue;
        }
        let p = port.to_string();
        let mut all = vec!["--ipmsg-port", p.as_str()];
        all.extend_from_slice(args);
        let chat = Chat::start_with(&all, env);
        if !chat.listening["ipmsg"].is_null() {
            return (chat, port);
        }
    }
    panic!("no free port for IP Messenger on 127.0.0.1");
}
