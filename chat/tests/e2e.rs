//! `chat` end to end: real processes and real UDP sockets on loopback.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use corokit_chat::seal::Key;
use corokit_chat::wire::{Kind, Packet};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn udp() -> may::net::UdpSocket {
    corokit_common::init();
    let s = may::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// A running `chat --json` whose output lines arrive on a channel.
struct Chat {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
    seen: Vec<Value>,
    /// While set, nobody reads the output: the pipe fills and `chat` falls behind.
    stalled: Arc<AtomicBool>,
}

impl Chat {
    fn start(args: &[&str]) -> Chat {
        Self::start_with(args, &[])
    }

    fn start_with(args: &[&str], env: &[(&str, &str)]) -> Chat {
        let bind: &[&str] = if args.contains(&"--bind") {
            &[]
        } else {
            &["--bind", "127.0.0.1"]
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat"));
        cmd.args(["--port", "0", "--no-discovery"]).args(bind);
        Self::spawn(cmd, args, env)
    }

    /// Runs `chat` inside network namespace `ns`, with discovery on its default port.
    fn start_in(ns: &str, args: &[&str]) -> Chat {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_chat")]);
        Self::spawn(cmd, args, &[])
    }

    fn spawn(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Chat {
        corokit_common::init();
        if !args.contains(&"--peers-file") {
            let dir = tempfile::tempdir().unwrap().keep();
            cmd.arg("--peers-file").arg(dir.join("peers"));
        }
        let mut child = cmd
            .arg("--json")
            .args(args)
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
            stalled,
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for an event matching `pred`, keeping everything seen.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
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

    fn messages(&mut self, settle: Duration) -> Vec<String> {
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
    fn who_with_aliases(&mut self, nick: &str) -> String {
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

    fn joined(&mut self, addr: SocketAddr) {
        let a = addr.to_string();
        self.wait_for("join", |v| v["event"] == "join" && v["from"] == a.as_str());
    }

    /// Waits for `chat` to end by itself: its exit code, or `None` if it is still running.
    fn exit_code(mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            corokit_common::sleep(Duration::from_millis(20));
        }
        None
    }

    fn terminate(mut self) -> i32 {
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

fn msg_from(v: &Value, from: SocketAddr, text: &str) -> bool {
    v["event"] == "message" && v["from"] == from.to_string().as_str() && v["text"] == text
}

#[test]
fn three_instances_talk_in_every_direction() {
    let mut a = Chat::start(&["--name", "ana"]);
    let to_a = a.addr.to_string();
    let mut b = Chat::start(&["--name", "bob", "--to", &to_a]);
    let mut c = Chat::start(&["--name", "cy", "--to", &to_a]);
    a.joined(b.addr);
    a.joined(c.addr);
    b.say("hello from bob");
    c.say("hello from cy");
    let (ba, ca) = (b.addr, c.addr);
    a.wait_for("bob's line", |v| {
        msg_from(v, ba, "hello from bob") && v["nick"] == "bob"
    });
    a.wait_for("cy's line", |v| msg_from(v, ca, "hello from cy"));
    // Ana has no destination: a plain line goes to every known peer.
    a.say("hello all");
    let aa = a.addr;
    b.wait_for("ana's line at bob", |v| {
        msg_from(v, aa, "hello all") && v["nick"] == "ana"
    });
    c.wait_for("ana's line at cy", |v| msg_from(v, aa, "hello all"));
    // A private message by nickname reaches only its peer.
    a.say("@cy just for you");
    c.wait_for("private line", |v| msg_from(v, aa, "just for you"));
    assert!(!b
        .messages(Duration::from_millis(300))
        .contains(&"just for you".to_string()));
    // Goodbye on SIGTERM, and a clean exit.
    assert_eq!(b.terminate(), 0);
    let bs = ba.to_string();
    a.wait_for("bob leaving", |v| {
        v["event"] == "leave" && v["from"] == bs.as_str()
    });
}

#[test]
fn plain_udp_peers_both_ways() {
    let mut a = Chat::start(&[]);
    let nc = udp();
    nc.send_to("from netcat \u{e9}".as_bytes(), a.addr).unwrap();
    let ncaddr = nc.local_addr().unwrap();
    a.wait_for("plain text", |v| {
        msg_from(v, ncaddr, "from netcat \u{e9}") && v["protocol"] == "plain"
    });
    // Typed text goes to a plain peer as plain UTF-8, as nc would show it.
    a.say(&format!("/to {ncaddr}"));
    a.say("back to you \u{263a}");
    let mut buf = [0u8; 2048];
    let (n, from) = nc.recv_from(&mut buf).unwrap();
    assert_eq!(from, a.addr);
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        "back to you \u{263a}"
    );
}

#[test]
fn hostile_bytes_are_shown_escaped_and_big_datagrams_whole() {
    let a = Chat::start(&[]);
    drop(a);
    // Text mode, where escaping matters: read its stdout directly.
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--no-discovery",
            "--peers-file",
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let addr: SocketAddr = first
        .split(" on ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let nc = udp();
    nc.send_to(
        b"\x1b[2J\x1b[H\x1b]0;owned\x07 wipe \xff\xfe \xe2\x80\xaeexe.txt \x9b1m",
        addr,
    )
    .unwrap();
    let big = vec![b'z'; 65_507];
    nc.send_to(&big, addr).unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        !line.trim_end().chars().any(|c| c.is_control()),
        "raw control characters: {line:?}"
    );
    assert!(
        line.contains("\\u{1b}[2J") && line.contains("\\u{202e}") && line.contains('\u{fffd}'),
        "{line}"
    );
    let mut big_line = String::new();
    out.read_line(&mut big_line).unwrap();
    assert!(
        big_line.trim_end().ends_with(&"z".repeat(65_507)),
        "the big datagram was cut"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A relay between two chats that drops, duplicates and reorders datagrams.
struct Relay {
    /// Where `a` should send to reach `b`.
    for_a: SocketAddr,
    stop: Arc<AtomicBool>,
    forwarded: Arc<AtomicUsize>,
}

impl Relay {
    fn start(a: SocketAddr, b: SocketAddr, drop_pct: u32) -> Relay {
        let side_a = Arc::new(udp()); // faces a
        let side_b = Arc::new(udp()); // faces b
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let for_a = side_a.local_addr().unwrap();
        for (from, to, dest) in [(side_a.clone(), side_b.clone(), b), (side_b, side_a, a)] {
            let (stop, forwarded) = (stop.clone(), forwarded.clone());
            corokit_common::spawn(move || {
                let mut held: Option<Vec<u8>> = None;
                let mut buf = vec![0u8; 65_536];
                let mut rng = 12345u32;
                let mut roll = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 17;
                    rng ^= rng << 5;
                    rng % 100
                };
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, _)) = from.recv_from(&mut buf) else {
                        continue;
                    };
                    let r = roll();
                    if r < drop_pct {
                        continue;
                    }
                    forwarded.fetch_add(1, Ordering::SeqCst);
                    let data = buf[..n].to_vec();
                    if r < drop_pct + 10 {
                        // Hold this one back: it goes out after the next (reordered).
                        if let Some(prev) = held.replace(data) {
                            let _ = to.send_to(&prev, dest);
                        }
                        continue;
                    }
                    let _ = to.send_to(&data, dest);
                    if r > 90 {
                        let _ = to.send_to(&data, dest); // duplicated
                    }
                    if let Some(prev) = held.take() {
                        let _ = to.send_to(&prev, dest);
                    }
                }
            })
            .unwrap();
        }
        Relay {
            for_a,
            stop,
            forwarded,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_lossy_network_delivers_every_message_once_in_order() {
    let mut b = Chat::start(&["--name", "bob", "--ack-timeout", "50"]);
    // Ana needs her own address before the relay exists, so she starts with no peers.
    // Enough tries that 30% loss each way cannot exhaust them (0.51^16 per datagram).
    let mut a = Chat::start(&["--name", "ana", "--ack-timeout", "50", "--tries", "16"]);
    let relay = Relay::start(a.addr, b.addr, 30);
    a.say(&format!("/to {}", relay.for_a));
    let relay_a = relay.for_a;
    a.wait_for("bob via the relay", |v| {
        v["event"] == "join" && v["from"] == relay_a.to_string().as_str()
    });
    let sent: Vec<String> = (0..60)
        .map(|i| {
            if i % 20 == 7 {
                format!("long {i} {}", "x".repeat(3000))
            } else {
                format!("line {i}")
            }
        })
        .collect();
    for line in &sent {
        a.say(line);
    }
    let last = sent.last().unwrap().clone();
    b.wait_for("the last line", |v| {
        v["event"] == "message" && v["text"] == last.as_str()
    });
    let got = b.messages(Duration::from_millis(500));
    assert_eq!(got, sent, "lost, duplicated or reordered");
    assert!(relay.forwarded.load(Ordering::SeqCst) > 60);

    // Now bob vanishes without a goodbye: ana is told her message was not delivered.
    drop(b);
    a.say("are you there?");
    a.wait_for("not delivered", |v| {
        v["event"] == "not_delivered" && v["text"] == "are you there?"
    });
}

#[test]
fn a_receiver_that_falls_behind_holds_the_sender_back_without_losing_anything() {
    let mut b = Chat::start(&["--name", "bob"]);
    // Ana gives up on an unanswered datagram after about 2.3 s.
    let mut a = Chat::start(&[
        "--name",
        "ana",
        "--ack-timeout",
        "50",
        "--to",
        &b.addr.to_string(),
    ]);
    b.joined(a.addr);
    // Bob's output is not read: his pipe fills, then his queue, so he must turn ana away.
    b.stalled.store(true, Ordering::SeqCst);
    let lines: Vec<String> = (0..8000).map(|i| format!("line {i}")).collect();
    let mut stdin = a.stdin.take().unwrap();
    let writer = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in &lines {
                writeln!(stdin, "{line}").unwrap();
            }
            stdin
        })
    };
    corokit_common::sleep(Duration::from_secs(4));
    b.stalled.store(false, Ordering::SeqCst);
    let aa = a.addr;
    let last = lines.last().unwrap().clone();
    b.wait_for("the last line", |v| msg_from(v, aa, &last));
    let from_ana: Vec<&str> = b
        .seen
        .iter()
        .filter(|v| v["event"] == "message")
        .filter_map(|v| v["text"].as_str())
        .collect();
    assert_eq!(from_ana, lines);
    a.stdin = Some(writer.join().unwrap());
    // Bob was alive all along, so nothing was given up on; and he did turn ana away.
    a.messages(Duration::from_millis(300));
    assert!(
        !a.seen.iter().any(|v| v["event"] == "not_delivered"),
        "ana gave up on a message"
    );
    b.say("/stats");
    b.wait_for("refusals counted", |v| {
        v.as_str()
            .is_some_and(|s| s.contains("queue full ") && !s.contains("queue full 0,"))
    });
}

#[test]
fn a_flood_from_one_source_does_not_starve_another_peer() {
    let mut b = Chat::start(&["--name", "bob"]);
    let mut a = Chat::start(&["--name", "ana", "--to", &b.addr.to_string()]);
    b.joined(a.addr);
    let flooding = Arc::new(AtomicBool::new(true));
    let flooded = Arc::new(AtomicUsize::new(0));
    let flooder = {
        let (flooding, flooded, target) = (flooding.clone(), flooded.clone(), b.addr);
        std::thread::spawn(move || {
            let s = udp();
            while flooding.load(Ordering::SeqCst) && flooded.load(Ordering::SeqCst) < 1_000_000 {
                let _ = s.send_to(b"flood flood flood flood", target);
                flooded.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    while flooded.load(Ordering::SeqCst) < 20_000 {
        std::thread::yield_now();
    }
    let lines: Vec<String> = (0..20).map(|i| format!("important {i}")).collect();
    for line in &lines {
        a.say(line);
    }
    let last = lines.last().unwrap().clone();
    let aa = a.addr;
    b.wait_for("the last important line", |v| msg_from(v, aa, &last));
    flooding.store(false, Ordering::SeqCst);
    flooder.join().unwrap();
    let from_ana: Vec<String> = b
        .seen
        .iter()
        .filter(|v| v["event"] == "message" && v["from"] == aa.to_string().as_str())
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(from_ana, lines);
    // The flood is turned away by the rate limit or by its full share of the queue; either
    // way the drops are counted where the user can see them.
    b.say("/stats");
    b.wait_for("drops counted", |v| {
        v.as_str().is_some_and(|s| {
            let count = |label: &str| -> u64 {
                s.split(label)
                    .nth(1)
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            count("rate limit ") + count("queue full ") > 0
        })
    });
}

#[test]
fn with_a_key_only_authentic_fresh_datagrams_are_shown() {
    let env = [("CHAT_KEY", "our shared secret")];
    let mut b = Chat::start_with(&["--name", "bob"], &env);
    let mut a = Chat::start_with(&["--name", "ana", "--to", &b.addr.to_string()], &env);
    b.joined(a.addr);
    a.say("sealed hello");
    let aa = a.addr;
    b.wait_for("sealed message", |v| msg_from(v, aa, "sealed hello"));

    let attacker = udp();
    // Plain text and an unsealed protocol message claiming to be ana: dropped.
    attacker
        .send_to(b"plain text is not allowed", b.addr)
        .unwrap();
    let mut spoof = Packet::control(Kind::Msg, 42, "ana");
    spoof.seq = 1;
    spoof.base = 1;
    spoof.frags = 1;
    spoof.body = b"spoofed".to_vec();
    attacker.send_to(&spoof.encode(), b.addr).unwrap();
    // The wrong key: dropped.
    attacker
        .send_to(&Key::derive(b"guess").seal(&spoof.encode(), 1), b.addr)
        .unwrap();
    // The right key, sent twice: shown once (the copy is a replay).
    let right = Key::derive(b"our shared secret").seal(&spoof.encode(), 1);
    attacker.send_to(&right, b.addr).unwrap();
    attacker.send_to(&right, b.addr).unwrap();
    let at = attacker.local_addr().unwrap();
    b.wait_for("the authentic one", |v| msg_from(v, at, "spoofed"));
    let texts = b.messages(Duration::from_millis(400));
    assert_eq!(
        texts,
        ["sealed hello", "spoofed"],
        "something unauthenticated or replayed was shown"
    );
    b.say("/stats");
    b.wait_for("counted", |v| {
        v.as_str()
            .is_some_and(|s| s.contains("unauthenticated 3") && s.contains("replayed 1"))
    });
}

#[test]
fn chat_send_waits_for_the_acknowledgement() {
    let mut b = Chat::start(&["--name", "bob"]);
    let out = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["send", &b.addr.to_string(), "one shot", "--name", "script"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.wait_for("the one message", |v| {
        v["event"] == "message" && v["text"] == "one shot" && v["nick"] == "script"
    });
    // A plain peer: 0 once sent, and it reads plain text.
    let nc = udp();
    let out = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["send", &nc.local_addr().unwrap().to_string(), "to netcat"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let mut buf = [0u8; 1500];
    let mut texts = Vec::new();
    while let Ok((n, _)) = nc.recv_from(&mut buf) {
        texts.push(buf[..n].to_vec());
    }
    assert!(texts.iter().any(|t| t == b"to netcat"), "{texts:?}");
}

#[test]
fn peers_added_by_hand_are_greeted_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("peers");
    let file = file.to_str().unwrap();
    let mut b = Chat::start(&["--name", "bob"]);
    let a = Chat::start(&[
        "--name",
        "ana",
        "--peers-file",
        file,
        "--to",
        &b.addr.to_string(),
    ]);
    b.joined(a.addr);
    let first = a.addr.to_string();
    assert_eq!(a.terminate(), 0);
    b.wait_for("the goodbye", |v| {
        v["event"] == "leave" && v["from"] == first.as_str()
    });
    // No --to this time: bob is remembered, greeted, and gets a plain line as a chat peer.
    let mut again = Chat::start(&["--name", "ana again", "--peers-file", file]);
    b.joined(again.addr);
    again.joined(b.addr);
    again.say("back again");
    let aa = again.addr;
    b.wait_for("the line", |v| {
        msg_from(v, aa, "back again") && v["nick"] == "ana again"
    });
}

#[test]
fn with_a_key_nothing_goes_out_in_clear_text() {
    // A plain listener never answers as a keyed chat peer: the message is refused, exit 1.
    let nc = udp();
    let out = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["send", &nc.local_addr().unwrap().to_string(), "top secret"])
        .env("CHAT_KEY", "our shared secret")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not sent"), "{stderr}");
    let mut buf = [0u8; 1500];
    while let Ok((n, _)) = nc.recv_from(&mut buf) {
        assert!(
            !buf[..n].windows(10).any(|w| w == b"top secret"),
            "the text went out in clear"
        );
    }
}

/// Runs `chat ARGS` that should fail at once: its exit code and stderr. Killed after a while
/// if it starts instead, so a regression fails the test rather than hanging it.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        corokit_common::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let a = Chat::start(&[]);
    let port = a.addr.port().to_string();
    let (code, err) = refused(&["--bind", "127.0.0.1", "--port", &port, "--no-discovery"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cannot bind") && err.contains(&a.addr.to_string()),
        "{err}"
    );
    // The default bind is IPv6 and IPv4 at once; a port taken in IPv6 only is still an
    // error, not a quiet fall back to IPv4 alone.
    let Ok(taken) = may::net::UdpSocket::bind("[::1]:0") else {
        eprintln!("skipped the IPv6 half: no ::1 here");
        return;
    };
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, err) = refused(&["--port", &port, "--no-discovery"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot bind UDP [::]:{port}")),
        "{err}"
    );
}

#[test]
fn ipv6_loopback_works_like_ipv4() {
    let mut b = Chat::start(&["--bind", "[::1]:0", "--name", "six"]);
    assert!(b.addr.is_ipv6());
    let mut a = Chat::start(&["--bind", "::1", "--to", &b.addr.to_string()]);
    b.joined(a.addr);
    a.say("over v6");
    let aa = a.addr;
    b.wait_for("v6 message", |v| msg_from(v, aa, "over v6"));
}

#[test]
fn a_dual_stack_instance_shows_ipv4_senders_as_ipv4() {
    let mut b = Chat::start(&["--bind", "::", "--name", "bob"]);
    let port = b.addr.port();
    let s = udp();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.send_to(b"from a v4 socket", ("127.0.0.1", port)).unwrap();
    let from = s.local_addr().unwrap();
    b.wait_for("the plain line", |v| msg_from(v, from, "from a v4 socket"));
    // And the answer goes back to that IPv4 address.
    b.say(&format!("/to {from}"));
    b.say("answer");
    let mut buf = [0u8; 100];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"answer");
}

#[test]
fn a_peer_reached_at_two_addresses_is_one_peer() {
    let mut ana = Chat::start(&["--bind", "::", "--name", "ana"]);
    let port = ana.addr.port();
    let (v4, v6) = (format!("127.0.0.1:{port}"), format!("[::1]:{port}"));
    let mut bob = Chat::start(&["--bind", "::", "--name", "bob", "--to", &v4, "--to", &v6]);
    bob.wait_for("ana found", |v| v["event"] == "join" && v["nick"] == "ana");
    ana.wait_for("bob found", |v| v["event"] == "join" && v["nick"] == "bob");
    let listed = bob.who_with_aliases("ana");
    assert!(
        listed.contains(&v4) && listed.contains(&v6) && listed.contains("also at"),
        "ana is listed once with both addresses: {listed}"
    );
    // To every peer, and to each of ana's addresses: one stream, every line once, in order.
    bob.say("to everyone");
    bob.say(&format!("/to {v6}"));
    bob.say("by IPv6");
    bob.say(&format!("/to {v4}"));
    bob.say("by IPv4");
    ana.wait_for("the last line", |v| {
        v["event"] == "message" && v["text"] == "by IPv4"
    });
    assert_eq!(
        ana.messages(Duration::from_millis(300)),
        ["to everyone", "by IPv6", "by IPv4"]
    );
    assert_eq!(bob.terminate(), 0);
    ana.wait_for("the goodbye", |v| {
        v["event"] == "leave" && v["nick"] == "bob"
    });
    ana.messages(Duration::from_millis(300));
    assert_eq!(count(&ana, "join"), 1, "{:#?}", ana.seen);
    assert_eq!(count(&ana, "leave"), 1, "{:#?}", ana.seen);
}

#[test]
fn a_rename_shows_in_the_next_message_and_quit_says_goodbye() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "a shared secret\n").unwrap();
    let key = key.to_str().unwrap();
    let mut a = Chat::start(&["--name", "ana", "--key-file", key]);
    let to_a = a.addr.to_string();
    let mut b = Chat::start(&["--name", "bob", "--key-file", key, "--to", &to_a]);
    a.joined(b.addr);
    b.say("/nick rob");
    b.say("after the rename");
    let ba = b.addr;
    a.wait_for("the line under the new name", |v| {
        msg_from(v, ba, "after the rename") && v["nick"] == "rob"
    });
    b.say("/quit");
    assert_eq!(b.exit_code(), Some(0));
    let bs = ba.to_string();
    a.wait_for("the goodbye", |v| {
        v["event"] == "leave" && v["from"] == bs.as_str()
    });
    // A key file that cannot be read is a usage error, not a run without a key.
    let (code, err) = refused(&["--key-file", "/nonexistent/key", "--no-discovery"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cannot read the key file /nonexistent/key"),
        "{err}"
    );
}

#[test]
fn the_log_keeps_what_was_sent_and_received() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("chat.jsonl");
    let mut b = Chat::start(&["--log", log.to_str().unwrap()]);
    let nc = udp();
    nc.send_to(b"incoming", b.addr).unwrap();
    let ncaddr = nc.local_addr().unwrap();
    b.wait_for("incoming", |v| msg_from(v, ncaddr, "incoming"));
    b.say(&format!("/to {ncaddr}"));
    b.say("outgoing");
    let mut buf = [0u8; 100];
    nc.recv_from(&mut buf).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut logged = String::new();
    while Instant::now() < deadline && logged.lines().count() < 2 {
        corokit_common::sleep(Duration::from_millis(20));
        logged = std::fs::read_to_string(&log).unwrap();
    }
    let lines: Vec<Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{logged}");
    assert_eq!(
        (lines[0]["direction"].as_str(), lines[0]["text"].as_str()),
        (Some("in"), Some("incoming"))
    );
    assert_eq!(
        (lines[1]["direction"].as_str(), lines[1]["text"].as_str()),
        (Some("out"), Some("outgoing"))
    );
}

#[test]
fn on_a_terminal_the_input_line_stays_intact_while_messages_arrive() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipped: tmux is not installed");
        return;
    }
    let port = {
        let s = udp();
        s.local_addr().unwrap().port()
    };
    let session = format!("chat-test-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let cmd = format!(
        "{} --bind 127.0.0.1 --port {port} --no-discovery --name tty --peers-file {}",
        env!("CARGO_BIN_EXE_chat"),
        dir.path().join("peers").display()
    );
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().unwrap();
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "10",
        &cmd,
    ]);
    let screen = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-t", &session, "-p"]).stdout).into_owned()
    };
    let wait_screen = |want: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = screen();
            if s.contains(want) || Instant::now() > deadline {
                return s;
            }
            corokit_common::sleep(Duration::from_millis(50));
        }
    };
    // The prompt ("> "; the pane is captured without trailing spaces).
    wait_screen(">");
    tmux(&["send-keys", "-t", &session, "half typed"]);
    wait_screen("half typed");
    let nc = udp();
    nc.send_to(
        b"arrived \x1b[2J meanwhile",
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
    .unwrap();
    let shown = wait_screen("meanwhile");
    tmux(&["send-keys", "-t", &session, "/quit", "Enter"]);
    tmux(&["kill-session", "-t", &session]);
    let lines: Vec<&str> = shown.lines().filter(|l| !l.trim().is_empty()).collect();
    let arrived = lines
        .iter()
        .position(|l| l.contains("arrived \\u{1b}[2J meanwhile"));
    let input = lines.iter().position(|l| l.trim_end() == "> half typed");
    assert!(arrived.is_some() && input.is_some(), "screen:\n{shown}");
    assert!(
        arrived < input,
        "the message was not printed above the input line:\n{shown}"
    );
}

/// Hosts in network namespaces joined by a bridge (in a namespace of its own), removed on drop.
struct Lan {
    names: Vec<String>,
}

impl Lan {
    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Two hosts on one link with IPv6 link-local addresses usable at once (no duplicate
    /// address detection) and, with `ipv4`, 10.213.77.1 and .2; `None` where namespaces are
    /// not permitted.
    fn two_hosts(ipv4: bool) -> Option<Lan> {
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
fn count(chat: &Chat, kind: &str) -> usize {
    chat.seen.iter().filter(|v| v["event"] == kind).count()
}

fn is_link_local(v: &Value) -> bool {
    v.as_str().is_some_and(|a| a.starts_with("[fe80::"))
}

#[test]
fn dual_stack_instances_on_two_hosts_find_each_other_once() {
    let Some(lan) = Lan::two_hosts(true) else {
        eprintln!("skipped: creating network namespaces is not permitted here");
        return;
    };
    let (h1, h2) = (lan.names[1].clone(), lan.names[2].clone());
    // The default bind: both announce by IPv4 broadcast and multicast and by IPv6 multicast,
    // so each hears the other at two addresses.
    let mut one = Chat::start_in(&h1, &["--name", "one"]);
    let mut two = Chat::start_in(&h2, &["--name", "two"]);
    assert!(
        one.addr.is_ipv6() && one.addr.ip().is_unspecified(),
        "{}",
        one.addr
    );
    let (at1, at2) = ("10.213.77.1:7890", "10.213.77.2:7890");
    let found = |nick: &'static str, v4: &'static str| {
        move |v: &Value| {
            v["event"] == "join"
                && v["nick"] == nick
                && (v["from"] == v4 || is_link_local(&v["from"]))
        }
    };
    one.wait_for("two found", found("two", at2));
    let from1 = two.wait_for("one found", found("one", at1))["from"].clone();
    let listed = two.who_with_aliases("one");
    assert!(
        listed.contains(at1) && listed.contains("[fe80::") && listed.contains("also at"),
        "one is listed once with both addresses: {listed}"
    );
    // With no destination a line goes to every peer: one copy, not one per address.
    one.say("hello across the bridge");
    two.wait_for("the message", |v| {
        v["event"] == "message" && v["nick"] == "one" && v["text"] == "hello across the bridge"
    });
    two.say("hello back");
    one.wait_for("the answer", |v| {
        v["event"] == "message" && v["text"] == "hello back"
    });
    one.messages(Duration::from_millis(300));
    assert_eq!(count(&one, "join"), 1, "{:#?}", one.seen);
    assert_eq!(one.terminate(), 0);
    two.wait_for("the goodbye", |v| {
        v["event"] == "leave" && v["from"] == from1
    });
    two.messages(Duration::from_millis(500));
    assert_eq!(count(&two, "join"), 1, "{:#?}", two.seen);
    assert_eq!(count(&two, "leave"), 1, "{:#?}", two.seen);
    assert_eq!(two.messages(Duration::ZERO), ["hello across the bridge"]);
    drop(two);
}

#[test]
fn an_ipv4_only_instance_and_a_dual_stack_one_meet_over_ipv4() {
    let Some(lan) = Lan::two_hosts(true) else {
        eprintln!("skipped: creating network namespaces is not permitted here");
        return;
    };
    let (h1, h2) = (lan.names[1].clone(), lan.names[2].clone());
    let mut one = Chat::start_in(&h1, &["--name", "one", "--bind", "0.0.0.0"]);
    let mut two = Chat::start_in(&h2, &["--name", "two"]);
    let (at1, at2) = ("10.213.77.1:7890", "10.213.77.2:7890");
    one.wait_for("two found", |v| {
        v["event"] == "join" && v["from"] == at2 && v["nick"] == "two"
    });
    two.wait_for("one found", |v| {
        v["event"] == "join" && v["from"] == at1 && v["nick"] == "one"
    });
    one.say("from the IPv4 side");
    two.wait_for("the message", |v| msg_at(v, at1, "from the IPv4 side"));
    two.say("from the dual-stack side");
    one.wait_for("the answer", |v| msg_at(v, at2, "from the dual-stack side"));
    assert_eq!(one.terminate(), 0);
    two.wait_for("the goodbye", |v| v["event"] == "leave" && v["from"] == at1);
    drop(two);
}

fn msg_at(v: &Value, from: &str, text: &str) -> bool {
    v["event"] == "message" && v["from"] == from && v["text"] == text
}

#[test]
fn instances_on_an_ipv6_only_link_discover_each_other() {
    let Some(lan) = Lan::two_hosts(false) else {
        eprintln!("skipped: creating network namespaces is not permitted here");
        return;
    };
    let (h1, h2) = (lan.names[1].clone(), lan.names[2].clone());
    let mut one = Chat::start_in(&h1, &["--name", "one"]);
    let mut two = Chat::start_in(&h2, &["--name", "two"]);
    // Found through the all-nodes link-local group ff02::1, so from a link-local address.
    let found = |nick: &'static str| {
        move |v: &Value| v["event"] == "join" && v["nick"] == nick && is_link_local(&v["from"])
    };
    let at2 = one.wait_for("two found", found("two"))["from"].clone();
    let at1 = two.wait_for("one found", found("one"))["from"].clone();
    one.say("hello over IPv6");
    two.wait_for("the message", |v| {
        v["event"] == "message" && v["from"] == at1 && v["text"] == "hello over IPv6"
    });
    assert_eq!(one.terminate(), 0);
    two.wait_for("the goodbye", |v| v["event"] == "leave" && v["from"] == at1);
    // The goodbye comes directly and by multicast; the second copy must not bring one back.
    two.messages(Duration::from_millis(500));
    let after_leave: Vec<&Value> = two
        .seen
        .iter()
        .skip_while(|v| v["event"] != "leave")
        .filter(|v| v["event"] == "join")
        .collect();
    assert!(after_leave.is_empty(), "one came back: {after_leave:?}");
    assert_ne!(at1, at2);
    drop(two);
}
