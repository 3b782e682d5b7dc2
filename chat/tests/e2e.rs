//! `chat` end to end: real processes and real UDP sockets on loopback.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use corokit_chat::seal::Key;
use corokit_chat::wire::{self, Body, Datagram, Kind, Packet, FLAG_VERIFIED};
use serde_json::Value;

mod support;
use support::*;

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

/// A chat in text mode (where escaping matters), its stdout read directly: the child, its
/// output and its address.
fn text_mode_chat() -> (Child, BufReader<std::process::ChildStdout>, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--no-discovery",
            "--no-ipmsg",
        ])
        .args(["--peers-file", "/dev/null"])
        .env_remove("CHAT_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let addr = first
        .split(" on ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));
    (child, out, addr)
}

#[test]
fn hostile_bytes_are_shown_escaped_and_big_datagrams_whole() {
    let a = Chat::start(&[]);
    drop(a);
    // Text mode, where escaping matters: read its stdout directly.
    let (mut child, mut out, addr) = text_mode_chat();
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

/// A relay between two chats that drops, duplicates and reorders datagrams, and records
/// what goes from `a` to `b`.
struct Relay {
    /// Where `a` should send to reach `b`.
    for_a: SocketAddr,
    /// The socket `b` sees `a` at.
    side_b: Arc<may::net::UdpSocket>,
    b: SocketAddr,
    stop: Arc<AtomicBool>,
    forwarded: Arc<AtomicUsize>,
    recorded: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Relay {
    fn start(a: SocketAddr, b: SocketAddr, drop_pct: u32) -> Relay {
        let side_a = Arc::new(udp()); // faces a
        let side_b = Arc::new(udp()); // faces b
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let for_a = side_a.local_addr().unwrap();
        let relay_b = side_b.clone();
        for (from, to, dest, record) in [
            (side_a.clone(), side_b.clone(), b, Some(recorded.clone())),
            (side_b, side_a, a, None),
        ] {
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
                    if let Some(record) = &record {
                        record.lock().unwrap().push(data.clone());
                    }
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
            side_b: relay_b,
            b,
            stop,
            forwarded,
            recorded,
        }
    }

    fn for_b(&self) -> SocketAddr {
        self.side_b.local_addr().unwrap()
    }

    fn recorded(&self) -> Vec<Vec<u8>> {
        self.recorded.lock().unwrap().clone()
    }

    /// Sends `bytes` to `b` as if `a` had sent them.
    fn inject_to_b(&self, bytes: &[u8]) {
        self.side_b.send_to(bytes, self.b).unwrap();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_lossy_network_delivers_every_message_once_in_order() {
    // A short first wait, so that retransmissions take milliseconds: a peer that answers
    // anything at all is never given up on. Twelve tries allow 2.9 s of silence: with the
    // default six (0.94 s at this wait), two busy loops on a two-core machine starved the
    // exchange long enough for ana to report hundreds of lines not delivered, as she should
    // for a peer that silent, which is not what this test is about.
    let timing = ["--ack-timeout", "20", "--tries", "12"];
    let mut b = Chat::start(&[&["--name", "bob"], &timing[..]].concat());
    // Ana needs her own address before the relay exists, so she starts with no peers.
    let mut a = Chat::start(&[&["--name", "ana"], &timing[..]].concat());
    let relay = Relay::start(a.addr, b.addr, 30);
    let relay_a = relay.for_a;
    // The handshake goes through the lossy relay too: greet until bob answers.
    while !a.seen.iter().any(|v| v["event"] == "join") {
        a.say(&format!("/to {relay_a}"));
        let _ = a.messages(Duration::from_secs(2));
    }
    let sent: Vec<String> = (0..1000)
        .map(|i| {
            if i % 100 == 7 {
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
    assert_eq!(got.len(), sent.len(), "lost or duplicated");
    assert_eq!(got, sent, "reordered");
    assert!(relay.forwarded.load(Ordering::SeqCst) > 1000);
    a.messages(Duration::from_millis(300));
    assert_eq!(count(&a, "not_delivered"), 0, "given up on a live peer");

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
    // Bob was alive all along, so nothing was given up on.
    a.messages(Duration::from_millis(300));
    assert!(
        !a.seen.iter().any(|v| v["event"] == "not_delivered"),
        "ana gave up on a message"
    );
}

#[test]
fn a_flood_from_one_source_does_not_starve_another_peer() {
    let mut b = Chat::start(&["--name", "bob"]);
    let mut a = Chat::start(&["--name", "ana", "--to", &b.addr.to_string()]);
    b.joined(a.addr);
    // Bob's reader stops while a plain source floods him: the flood fills its own share of
    // his queue and no more.
    b.stalled.store(true, Ordering::SeqCst);
    let flooder = udp();
    let flood_from = flooder.local_addr().unwrap();
    for i in 0..40_000u32 {
        let _ = flooder.send_to(format!("flood {i}").as_bytes(), b.addr);
        if i % 1000 == 0 {
            corokit_common::sleep(Duration::from_millis(5));
        }
    }
    let lines: Vec<String> = (0..20).map(|i| format!("important {i}")).collect();
    for line in &lines {
        a.say(line);
    }
    corokit_common::sleep(Duration::from_millis(500));
    b.stalled.store(false, Ordering::SeqCst);
    let last = lines.last().unwrap().clone();
    let aa = a.addr;
    b.wait_for("the last important line", |v| msg_from(v, aa, &last));
    let from_ana: Vec<String> = b
        .seen
        .iter()
        .filter(|v| v["event"] == "message" && v["from"] == aa.to_string().as_str())
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(from_ana, lines);
    b.say("/stats");
    let stats = b.wait_for("drops counted", |v| {
        v.as_str()
            .is_some_and(|s| stat(s, "rate limit") + stat(s, "queue full") > 0)
    });
    let flooded = b
        .seen
        .iter()
        .filter(|v| v["event"] == "message" && v["from"] == flood_from.to_string().as_str())
        .count();
    // Its share of the queue, the output thread's backlog and what a pipe buffer holds.
    assert!(
        flooded <= 4096 + 1024 + 1000,
        "{flooded} flood lines shown: {stats}"
    );
    // The drops are one notice, not a line each.
    let notices = count(&b, "notice");
    assert!((1..=3).contains(&notices), "{notices} notices");
}

#[test]
fn with_a_key_only_authentic_fresh_datagrams_are_shown() {
    let env = [("CHAT_KEY", "our shared secret")];
    let mut b = Chat::start_with(&["--name", "bob"], &env);
    let mut a = Chat::start_with(&["--name", "ana"], &env);
    // Everything ana sends bob goes through a relay that records it.
    let relay = Relay::start(a.addr, b.addr, 0);
    a.say(&format!("/to {}", relay.for_a));
    let from_a = relay.for_b();
    b.joined(from_a);
    a.say("sealed hello");
    b.wait_for("sealed message", |v| msg_from(v, from_a, "sealed hello"));
    let recorded = relay.recorded();
    assert!(!recorded.is_empty());

    let attacker = udp();
    // Plain text, an unsealed protocol message and a wrongly sealed one: dropped.
    attacker
        .send_to(b"plain text is not allowed", b.addr)
        .unwrap();
    let spoof = msg_packet(42, 1, 1, "spoofed");
    attacker.send_to(&spoof.encode(), b.addr).unwrap();
    attacker
        .send_to(
            &Key::derive(b"guess")
                .for_run(42)
                .seal(42, 1, &spoof.encode()),
            b.addr,
        )
        .unwrap();
    // Ana's own traffic, replayed from her address and from the attacker's: not shown
    // again, counted as replayed.
    for bytes in &recorded {
        relay.inject_to_b(bytes);
        attacker.send_to(bytes, b.addr).unwrap();
    }
    a.say("still talking");
    b.wait_for("the next real line", |v| {
        msg_from(v, from_a, "still talking")
    });
    let texts = b.messages(Duration::from_millis(400));
    assert_eq!(
        texts,
        ["sealed hello", "still talking"],
        "something unauthenticated or replayed was shown"
    );
    b.say("/stats");
    b.wait_for("counted", |v| {
        v.as_str().is_some_and(|s| {
            stat(s, "unauthenticated") >= 3 && stat(s, "replayed or stale") >= recorded.len() as u64
        })
    });
    // Bob restarts on the same port: the recording names his earlier run.
    let port = b.addr.port().to_string();
    drop(b);
    let mut b2 = Chat::start_with(&["--name", "bob again", "--port", &port], &env);
    for bytes in &recorded {
        relay.inject_to_b(bytes);
    }
    let texts = b2.messages(Duration::from_millis(500));
    assert!(
        texts.is_empty(),
        "a replay was shown after a restart: {texts:?}"
    );
    b2.say("/stats");
    b2.wait_for("counted", |v| {
        v.as_str().is_some_and(|s| stat(s, "replayed or stale") > 0)
    });
}

/// The number after `label` in a `/stats` line.
fn stat(line: &str, label: &str) -> u64 {
    line.split(&format!("{label} "))
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A one-fragment message from run `src` to run `dst`.
fn msg_packet(src: u64, dst: u64, seq: u64, text: &str) -> Packet {
    Packet {
        kind: Kind::Msg,
        flags: 0,
        src,
        dst,
        body: Body::Msg {
            seq,
            base: 1,
            frag: 0,
            frags: 1,
            nick: Some("ana".into()),
            text: text.as_bytes().to_vec(),
        },
    }
}

/// Runs `chat send TO TEXT ARGS` (with `key` as CHAT_KEY, or none): its exit code and stderr.
fn chat_send(to: &str, text: &str, args: &[&str], key: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat"));
    cmd.args(["send", to, text])
        .args(args)
        .env_remove("CHAT_KEY");
    if let Some(key) = key {
        cmd.env("CHAT_KEY", key);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn chat_send_waits_for_the_acknowledgement() {
    let mut b = Chat::start(&["--name", "bob"]);
    let (code, err) = chat_send(&b.addr.to_string(), "one shot", &["--name", "script"], None);
    assert_eq!(code, Some(0), "{err}");
    b.wait_for("the one message", |v| {
        v["event"] == "message" && v["text"] == "one shot" && v["nick"] == "script"
    });
    // A plain peer: 0 once sent, and it reads plain text.
    let nc = udp();
    let (code, err) = chat_send(
        &nc.local_addr().unwrap().to_string(),
        "to netcat",
        &[],
        None,
    );
    assert_eq!(code, Some(0), "{err}");
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
    let at = nc.local_addr().unwrap().to_string();
    let (code, stderr) = chat_send(&at, "top secret", &[], Some("our shared secret"));
    assert_eq!(code, Some(1), "{stderr}");
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
}

#[test]
#[ignore = "needs IPv6 on loopback (::1); .ci/run runs this where there is one"]
fn a_port_in_use_in_ipv6_only_is_still_an_error() {
    // The default bind is IPv6 and IPv4 at once; a port taken in IPv6 only is still an
    // error, not a quiet fall back to IPv4 alone.
    corokit_common::init();
    let taken = may::net::UdpSocket::bind("[::1]:0").expect("no ::1 here");
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
#[ignore = "needs tmux; .ci/run installs it and runs this"]
fn on_a_terminal_the_input_line_stays_intact_while_messages_arrive() {
    assert!(
        Command::new("tmux").arg("-V").output().is_ok(),
        "tmux is not installed"
    );
    let port = {
        let s = udp();
        s.local_addr().unwrap().port()
    };
    let session = format!("chat-test-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let cmd = format!(
        "{} --bind 127.0.0.1 --port {port} --no-discovery --no-ipmsg --name tty --peers-file {}",
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

fn is_link_local(v: &Value) -> bool {
    v.as_str().is_some_and(|a| a.starts_with("[fe80::"))
}

#[test]
#[ignore = "needs network namespaces (root); .ci/run runs this where it can"]
fn dual_stack_instances_on_two_hosts_find_each_other_once() {
    let lan = Lan::two_hosts(true).expect("creating network namespaces is not permitted here");
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
#[ignore = "needs network namespaces (root); .ci/run runs this where it can"]
fn an_ipv4_only_instance_and_a_dual_stack_one_meet_over_ipv4() {
    let lan = Lan::two_hosts(true).expect("creating network namespaces is not permitted here");
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
#[ignore = "needs network namespaces (root); .ci/run runs this where it can"]
fn instances_on_an_ipv6_only_link_discover_each_other() {
    let lan = Lan::two_hosts(false).expect("creating network namespaces is not permitted here");
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

/// A hand-written protocol peer on a UDP socket of its own: it can complete a handshake as
/// any run it likes and then send whatever it wants, as an attacker would.
struct Raw {
    sock: may::net::UdpSocket,
}

impl Raw {
    fn new() -> Raw {
        Raw { sock: udp() }
    }

    fn send(&self, to: SocketAddr, p: &Packet) {
        self.sock.send_to(&p.encode(), to).unwrap();
    }

    /// The next protocol packet from `from`, in either form, within `limit`.
    fn recv_from(&self, from: SocketAddr, limit: Duration) -> Option<Packet> {
        let deadline = Instant::now() + limit;
        let mut buf = vec![0u8; 65_536];
        while Instant::now() < deadline {
            let Ok((n, at)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            if at != from {
                continue;
            }
            if let Datagram::Packet { packet, .. } = wire::decode(&buf[..n]) {
                return Some(packet);
            }
        }
        None
    }

    /// Completes a handshake with the chat at `chat` as run `instance`; returns the chat's
    /// instance. The hello goes again until it is answered: a chat answers each source only
    /// so often.
    fn handshake(&self, chat: SocketAddr, instance: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            self.send(
                chat,
                &Packet::greeting(Kind::Hello, instance, 0, 7, 0, "raw"),
            );
            let Some(p) = self.recv_from(chat, Duration::from_millis(200)) else {
                continue;
            };
            if let (Kind::Reply, Body::Greeting { token, echo: 7, .. }) = (p.kind, &p.body) {
                let mut confirm = Packet::greeting(Kind::Reply, instance, p.src, 7, *token, "raw");
                confirm.flags = FLAG_VERIFIED;
                self.send(chat, &confirm);
                return p.src;
            }
        }
        panic!("{chat} never answered run {instance}");
    }
}

/// The classic Python UDP chat, reading every datagram as strict UTF-8.
struct PythonChat {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    errors: Arc<Mutex<String>>,
    addr: SocketAddr,
}

impl PythonChat {
    fn start(cmd: &mut Command, dest: SocketAddr) -> PythonChat {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/udp_chat.py");
        let mut child = cmd
            .args(["python3", script, "0.0.0.0", &dest.ip().to_string()])
            .arg(dest.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is needed for this test (.ci/run installs it)");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let errors = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let errs = errors.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut e = errs.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        let ready = lines.recv_timeout(WAIT).expect("the script started");
        let port: u16 = ready.strip_prefix("ready ").unwrap().parse().unwrap();
        PythonChat {
            stdin: child.stdin.take().unwrap(),
            child,
            lines,
            errors,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// Every line it printed until one contains `want`.
    fn until(&self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains(want);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "the script never printed {want:?}; printed {seen:#?}; stderr: {}",
            self.errors.lock().unwrap()
        )
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for PythonChat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines the script printed that were not one of `texts` must be our greetings, as readable
/// text.
fn only_greetings(lines: &[String], texts: &[&str]) {
    for line in lines {
        let body = line.split_once(':').map_or("", |(_, b)| b);
        if texts.contains(&body) {
            continue;
        }
        assert!(
            body.starts_with("corokit-chat/2 hello from ")
                && body.chars().all(|c| c.is_ascii_graphic() || c == ' '),
            "{line:?}"
        );
    }
}

#[test]
fn the_classic_python_chat_survives_everything_we_send_it() {
    let mut a = Chat::start(&["--name", "ana"]);
    let mut py = PythonChat::start(&mut Command::new("env"), a.addr);
    let at_py = py.addr.to_string();
    // /to: greetings, then the user's text.
    a.say(&format!("/to {at_py}"));
    a.say("hello python \u{e9}");
    let seen = py.until("hello python \u{e9}");
    only_greetings(&seen, &["hello python \u{e9}"]);
    // It answers as a plain peer, and from then on gets only the user's text.
    py.say("hi chat");
    let from_py = py.addr;
    a.wait_for("the script's line", |v| msg_from(v, from_py, "hi chat"));
    a.say("second line");
    let seen = py.until("second line");
    assert_eq!(seen.len(), 1, "more than the user's text: {seen:?}");
    // --to, from another chat.
    let b = Chat::start(&["--name", "bob", "--to", &at_py]);
    let _ = b;
    // chat send.
    let (code, err) = chat_send(&at_py, "one shot", &["--bind", "127.0.0.1"], None);
    assert_eq!(code, Some(0), "{err}");
    let seen = py.until("one shot");
    only_greetings(&seen, &["one shot"]);
    // Its receive thread is still alive.
    udp().send_to(b"still alive", py.addr).unwrap();
    py.until("still alive");
    let errors = py.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "the script failed: {errors}");
}

#[test]
fn a_plain_listener_gets_a_few_readable_greetings_then_only_the_users_text() {
    let nc = udp();
    let at = nc.local_addr().unwrap();
    let mut a = Chat::start(&["--name", "ana\u{1b}[2J", "--to", &at.to_string()]);
    let mut buf = vec![0u8; 65_536];
    let mut greetings = Vec::new();
    let quiet_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < quiet_until {
        if let Ok((n, _)) = nc.recv_from(&mut buf) {
            greetings.push(buf[..n].to_vec());
        }
    }
    assert!(
        (1..=3).contains(&greetings.len()),
        "{} greetings",
        greetings.len()
    );
    for g in &greetings {
        let text = std::str::from_utf8(g).expect("valid UTF-8");
        assert!(
            text.chars().all(|c| c.is_ascii_graphic() || c == ' ') && g.len() < 1024,
            "{text:?}"
        );
        assert!(
            text.starts_with("corokit-chat/2 hello from ana\\u{1b}[2J #"),
            "{text}"
        );
    }
    nc.send_to(b"hi", a.addr).unwrap();
    a.wait_for("the plain line", |v| msg_from(v, at, "hi"));
    a.say("typed");
    let (n, _) = nc.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"typed");
    assert!(nc.recv_from(&mut buf).is_err(), "more than the user's text");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn hostile_peers_cannot_grow_memory_and_sigterm_ends_it_at_once() {
    let mut b = Chat::start(&["--name", "bob"]);
    b.stalled.store(true, Ordering::SeqCst);
    let eve = Raw::new();
    // Out-of-order messages of the largest size under 21 invented runs, one after another.
    for run in 1..=21u64 {
        let bob = eve.handshake(b.addr, run);
        let text = "x".repeat(wire::fragment_size());
        for seq in (2..1500).rev() {
            eve.send(b.addr, &msg_packet(run, bob, seq, &text));
        }
        // And datagrams far too large for the protocol.
        let mut huge = msg_packet(run, bob, 3000, "").encode();
        huge.resize(65_000, b'y');
        eve.sock.send_to(&huge, b.addr).unwrap();
        corokit_common::sleep(Duration::from_millis(60));
    }
    // Hello and goodbye with fresh ids, while nobody reads the output.
    let until = Instant::now() + Duration::from_secs(3);
    let mut run = 100u64;
    while Instant::now() < until {
        run += 1;
        eve.send(b.addr, &Packet::greeting(Kind::Hello, run, 0, 7, 0, "x"));
        eve.send(b.addr, &Packet::bye(run, 0));
    }
    let rss = rss_kib(b.child.id());
    assert!(rss < 64 * 1024, "bob grew to {rss} KiB");
    // Its output is still not read: SIGTERM must end it anyway, within a second.
    let started = Instant::now();
    Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .unwrap();
    loop {
        if let Some(status) = b.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "still running after SIGTERM"
        );
        corokit_common::sleep(Duration::from_millis(10));
    }
}

#[test]
fn strangers_cannot_push_out_impersonate_or_remove_a_peer() {
    let mut b = Chat::start(&["--name", "bob"]);
    let mut a = Chat::start(&["--name", "ana", "--to", &b.addr.to_string()]);
    b.joined(a.addr);
    a.say("before");
    let aa = a.addr;
    b.wait_for("the first line", |v| msg_from(v, aa, "before"));
    // 5,000 hellos from as many ports.
    for _ in 0..5000 {
        let s = udp();
        s.send_to(
            &Packet::greeting(Kind::Hello, 99, 0, 1, 0, "x").encode(),
            b.addr,
        )
        .unwrap();
    }
    // Ana's run id is no secret (her replies carry it). Eve uses it from her own port, first
    // without answering bob's challenge, then answering it (she does receive at her port).
    let eve = Raw::new();
    let eve_addr = eve.sock.local_addr().unwrap();
    let ana = eve.handshake(a.addr, 5);
    let bob = eve.handshake(b.addr, 6);
    eve.send(b.addr, &msg_packet(ana, bob, 1, "forged before"));
    eve.send(b.addr, &Packet::bye(ana, bob));
    eve.send(
        b.addr,
        &Packet::greeting(Kind::Hello, ana, 0, 7, 0, "renamed"),
    );
    if let Some(Packet {
        body: Body::Greeting { token, .. },
        ..
    }) = eve.recv_from(b.addr, WAIT)
    {
        let mut confirm = Packet::greeting(Kind::Reply, ana, bob, 7, token, "renamed");
        confirm.flags = FLAG_VERIFIED;
        eve.send(b.addr, &confirm);
    }
    // Now an address of ana's run as far as bob can tell without a key: what she sends is
    // shown as from her own address, she cannot rename ana, acknowledge for her, or make her
    // leave.
    eve.send(b.addr, &msg_packet(ana, bob, 1, "forged after"));
    b.say(&format!("/to {}", a.addr));
    b.say("to ana");
    for seq in 0..4 {
        eve.send(b.addr, &Packet::ack(ana, bob, seq, 3, 5000));
    }
    eve.send(b.addr, &Packet::bye(ana, bob));
    let bb = b.addr;
    a.wait_for("bob's line at ana", |v| msg_from(v, bb, "to ana"));
    a.say("after");
    b.wait_for("the next line, acknowledged", |v| {
        msg_from(v, aa, "after") && v["protocol"] == "chat" && v["nick"] == "ana"
    });
    let eve_says = b.wait_for("eve's line, as hers", |v| {
        msg_from(v, eve_addr, "forged after")
    });
    assert_eq!(eve_says["from"], eve_addr.to_string().as_str());
    let from_ana: Vec<&str> = b
        .seen
        .iter()
        .filter(|v| v["event"] == "message" && v["from"] == aa.to_string().as_str())
        .filter_map(|v| v["text"].as_str())
        .collect();
    assert_eq!(
        from_ana,
        ["before", "after"],
        "something was shown as ana's"
    );
    let a_str = aa.to_string();
    assert!(
        !b.seen
            .iter()
            .any(|v| v["event"] == "leave" && v["from"] == a_str.as_str()),
        "ana was made to leave"
    );
    a.messages(Duration::from_millis(300));
    assert_eq!(count(&a, "not_delivered"), 0);
}

#[test]
fn junk_and_join_floods_are_summed_up_not_printed_line_by_line() {
    let mut b = Chat::start(&["--name", "bob"]);
    let junk = udp();
    for _ in 0..200_000 {
        let _ = junk.send_to(b"\xC6KT\x02\x04\x00junk", b.addr);
    }
    let eve = Raw::new();
    let until = Instant::now() + Duration::from_secs(2);
    let mut run = 1u64;
    while Instant::now() < until {
        run += 1;
        eve.handshake(b.addr, run);
        eve.send(b.addr, &Packet::bye(run, 0));
    }
    b.say("/stats");
    b.wait_for("the junk counted", |v| {
        v.as_str().is_some_and(|s| stat(s, "malformed") > 1000)
    });
    let notices = count(&b, "notice");
    let joins = count(&b, "join");
    assert!(notices <= 5, "{notices} notices");
    assert!(joins <= 2 && run > 10, "{joins} joins for {run} runs");
}

#[test]
fn invisible_and_control_characters_are_shown_escaped_in_text_and_json() {
    let hostile = "a\u{2060}b\u{2062}c\u{ad}d\u{180e}e\u{3164}f\u{e0041}g\u{2028}h\u{2029}i\u{85}j\u{7f}k\u{202e}l";
    // --json: the bytes written contain none of them, and JSON readers get the text back.
    let mut b = Chat::start(&[]);
    let nc = udp();
    nc.send_to(hostile.as_bytes(), b.addr).unwrap();
    let at = nc.local_addr().unwrap();
    let v = b.wait_for("the line", |v| msg_from(v, at, hostile));
    assert_eq!(v["text"], hostile);
    // Text mode: read its stdout directly.
    let (mut child, mut out, addr) = text_mode_chat();
    nc.send_to(hostile.as_bytes(), addr).unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    for escaped in [
        "\\u{2060}",
        "\\u{2062}",
        "\\u{ad}",
        "\\u{180e}",
        "\\u{3164}",
        "\\u{e0041}",
        "\\u{2028}",
        "\\u{2029}",
        "\\u{85}",
        "\\u{7f}",
        "\\u{202e}",
    ] {
        assert!(line.contains(escaped), "{escaped} missing in {line:?}");
    }
    assert!(corokit_common::text::is_safe(line.trim_end()), "{line:?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn json_output_bytes_carry_no_raw_hidden_characters() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--no-discovery",
            "--no-ipmsg",
            "--json",
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
    let v: Value = serde_json::from_str(&first).unwrap();
    let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
    udp()
        .send_to("x\u{9b}y\u{7f}z\u{202e}".as_bytes(), addr)
        .unwrap();
    let mut raw = Vec::new();
    out.read_until(b'\n', &mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    assert!(text.contains(r"x\u009by\u007fz\u202e"), "{text}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn chat_send_fails_when_the_message_is_not_accepted() {
    // Nothing listening: the ICMP "port unreachable" is noticed.
    let port = {
        let s = udp();
        s.local_addr().unwrap().port()
    };
    let local = ["--bind", "127.0.0.1"];
    let (code, stderr) = chat_send(&format!("127.0.0.1:{port}"), "anyone?", &local, None);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("nothing is listening"), "{stderr}");
    // A chat with a key refuses a message without one, and says so.
    let b = Chat::start_with(&["--name", "bob"], &[("CHAT_KEY", "secret")]);
    let (code, stderr) = chat_send(&b.addr.to_string(), "no key", &local, None);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    // And with another key.
    let (code, stderr) = chat_send(&b.addr.to_string(), "wrong key", &local, Some("another"));
    assert_eq!(code, Some(1), "{stderr}");
}

#[test]
fn hostile_sequence_numbers_do_not_crash_a_chat() {
    let mut b = Chat::start(&["--name", "bob"]);
    let eve = Raw::new();
    let bob = eve.handshake(b.addr, 77);
    let mut edge = msg_packet(77, bob, u64::MAX, "end of the line");
    if let Body::Msg { base, .. } = &mut edge.body {
        *base = u64::MAX - 1;
    }
    eve.send(b.addr, &edge);
    eve.send(b.addr, &msg_packet(77, bob, u64::MAX - 1, "near the end"));
    let mut a = Chat::start(&["--name", "ana", "--to", &b.addr.to_string()]);
    let _ = &mut a;
    let aa = a.addr;
    b.joined(aa);
    a.say("still alive");
    b.wait_for("a later line", |v| msg_from(v, aa, "still alive"));
}

#[test]
#[ignore = "needs network namespaces (root); .ci/run runs this where it can"]
fn the_classic_python_chat_on_the_lan_port_survives_our_announcements() {
    let lan = Lan::two_hosts(true).expect("creating network namespaces is not permitted here");
    let (h1, h2) = (lan.names[1].clone(), lan.names[2].clone());
    // The script listens on the chat port of host 2, where host 1 announces.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/udp_chat.py");
    let mut py = Command::new("ip")
        .args([
            "netns",
            "exec",
            &h2,
            "python3",
            script,
            "0.0.0.0",
            "10.213.77.1",
            "7890",
            "7890",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let stdout = py.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    assert!(lines.recv_timeout(WAIT).unwrap().starts_with("ready"));
    let mut one = Chat::start_in(&h1, &["--name", "one"]);
    // The announcement arrives and is printed as a line of text.
    let line = lines.recv_timeout(WAIT).expect("the announcement");
    assert!(line.contains("corokit-chat/2 hello from one"), "{line}");
    // The script answers in plain text; chat shows it and answers with the user's text.
    let mut stdin = py.stdin.take().unwrap();
    writeln!(stdin, "hello from the script").unwrap();
    stdin.flush().unwrap();
    one.wait_for("the script's line", |v| {
        v["event"] == "message" && v["text"] == "hello from the script"
    });
    one.say("/to 10.213.77.2:7890");
    one.say("answer");
    let deadline = Instant::now() + WAIT;
    let mut answered = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(l) if l.ends_with(":answer") => {
                answered = true;
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    let _ = py.kill();
    let out = py.wait_with_output().unwrap();
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(
        answered,
        "the script never printed the answer; stderr: {errors}"
    );
    assert!(!errors.contains("Traceback"), "{errors}");
}
