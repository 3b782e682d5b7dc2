//! `chat` and IP Messenger end to end: the real binary against a scripted IPMsg peer written
//! here from the protocol (entries, messages and acknowledgements, absence, encodings, junk),
//! on loopback: chat at 127.0.0.1 and peers at 127.0.0.2, 127.0.0.3, … on one port, as IP
//! Messenger hosts share port 2425. The broadcast discovery runs in network namespaces.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use corokit_chat::ipmsg::packet::{self, mode, opt, Packet};
use encoding_rs::{GBK, SHIFT_JIS};
use may::net::UdpSocket;
use serde_json::Value;

mod support;
use support::*;

const IPTUX: &str = "1_iptux 0.8.3";
const FEIQ: &str = "1_lbt6_0#128#001122334455#0#0#0#4001#9";

/// A scripted IP Messenger client on its own loopback address.
struct Peer {
    socket: UdpSocket,
    version: &'static str,
    number: u64,
    /// Packets received and not yet looked at.
    inbox: Vec<(SocketAddr, Packet)>,
}

impl Peer {
    fn bind(ip: [u8; 4], port: u16, version: &'static str) -> Peer {
        corokit_common::init();
        let socket = UdpSocket::bind(SocketAddr::from((ip, port))).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Peer {
            socket,
            version,
            number: 1000,
            inbox: Vec::new(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// Sends a packet; its number.
    fn send(&mut self, to: SocketAddr, command: u32, extra: &[u8]) -> u64 {
        self.number += 1;
        let mut bytes =
            format!("{}:{}:peer:peerhost:{command}:", self.version, self.number).into_bytes();
        bytes.extend_from_slice(extra);
        self.socket.send_to(&bytes, to).unwrap();
        self.number
    }

    fn receive(&mut self) {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            let p = packet::parse(&buf[..n]).expect("chat writes IPMsg packets right");
            self.inbox.push((from, p));
        }
    }

    /// Waits for a packet matching `pred` and takes it.
    fn expect(&mut self, what: &str, pred: impl Fn(&Packet) -> bool) -> (SocketAddr, Packet) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.inbox.iter().position(|(_, p)| pred(p)) {
                return self.inbox.remove(i);
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not arrive; got {:?}",
                self.inbox
            );
            self.receive();
        }
    }

    /// Packets matching `pred` within `settle`.
    fn count(&mut self, settle: Duration, pred: impl Fn(&Packet) -> bool) -> usize {
        let until = Instant::now() + settle;
        while Instant::now() < until {
            self.receive();
        }
        self.inbox.iter().filter(|(_, p)| pred(p)).count()
    }
}

fn listening_without_ipmsg(v: &Value) -> bool {
    v["event"] == "listening" && v["ipmsg"].is_null()
}

fn ipmsg_at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn is(m: u32) -> impl Fn(&Packet) -> bool {
    move |p: &Packet| p.mode() == m
}

#[test]
fn an_ipmsg_peer_joins_talks_both_ways_and_leaves() {
    let (mut chat, port) = chat_with_ipmsg(
        &[
            "--name",
            "ana",
            "--group",
            "dev",
            "--tries",
            "3",
            "--ack-timeout",
            "100",
        ],
        &[],
    );
    let to = ipmsg_at(port);
    let mut peer = Peer::bind([127, 0, 0, 2], port, "1");
    let pa = peer.addr().to_string();
    peer.send(
        to,
        mode::BR_ENTRY | opt::CAPUTF8OPT,
        b"bob\0sales\0\nUN:peer\nHN:peerhost\nNN:bob\nGN:sales\n",
    );
    let (_, answer) = peer.expect("ANSENTRY", is(mode::ANSENTRY));
    let entry = packet::Entry::parse(&answer.extra);
    assert_eq!(entry.nick, b"ana");
    assert_eq!(entry.group, b"dev");
    assert!(
        answer.has(opt::UTF8OPT),
        "a CAPUTF8 peer is answered in UTF-8"
    );
    let join = chat.wait_for("the join", |v| {
        v["event"] == "join" && v["from"] == pa.as_str()
    });
    assert_eq!(join["protocol"], "ipmsg");
    assert_eq!(join["nick"], "bob");
    assert_eq!(join["group"], "sales");
    assert_eq!(join["client"], "IP Messenger");

    // Their message, shown once however often it comes, acknowledged every time.
    let check = mode::SENDMSG | opt::SENDCHECKOPT | opt::UTF8OPT;
    let n = peer.send(to, check, "héllo a:b\0".as_bytes());
    let again = format!("1:{n}:peer:peerhost:{check}:héllo a:b\0");
    peer.socket.send_to(again.as_bytes(), to).unwrap();
    let acks = peer.count(Duration::from_millis(500), |p| {
        p.mode() == mode::RECVMSG && p.names_number() == Some(n)
    });
    assert_eq!(acks, 2);
    let m = chat.wait_for("the message", |v| {
        v["event"] == "message" && v["text"] == "héllo a:b"
    });
    assert_eq!(m["protocol"], "ipmsg");
    assert_eq!(m["nick"], "bob");
    assert_eq!(
        chat.messages(Duration::from_millis(200))
            .iter()
            .filter(|t| *t == "héllo a:b")
            .count(),
        1
    );
    // Broadcasts and automatic replies are shown and never acknowledged.
    peer.inbox.clear();
    peer.send(to, check | opt::BROADCASTOPT, b"to everyone\0");
    peer.send(to, check | opt::AUTORETOPT, b"I am out\0");
    chat.wait_for("the broadcast", |v| v["text"] == "to everyone");
    chat.wait_for("the automatic reply", |v| v["text"] == "I am out");
    assert_eq!(peer.count(Duration::from_millis(300), is(mode::RECVMSG)), 0);

    // Ours: by nickname, acknowledged; and one never acknowledged is reported.
    chat.say("@bob lunch at noon?");
    let (_, msg) = peer.expect("our message", is(mode::SENDMSG));
    assert!(msg.has(opt::SENDCHECKOPT));
    assert_eq!(msg.text(), b"lunch at noon?");
    peer.send(to, mode::RECVMSG, format!("{}\0", msg.number).as_bytes());
    chat.say("@bob are you there?");
    peer.expect("the unanswered message", |p| p.text() == b"are you there?");
    let lost = chat.wait_for("not delivered", |v| v["event"] == "not_delivered");
    assert_eq!(lost["text"], "are you there?");
    assert_eq!(
        count(&chat, "not_delivered"),
        1,
        "the acknowledged one was delivered"
    );

    // /who lists it with what its entry said.
    chat.say("/who");
    let who = chat.wait_for("/who", |v| v.as_str().is_some_and(|l| l.contains("bob")));
    let who = who.as_str().unwrap();
    assert!(
        who.contains("ipmsg") && who.contains("group sales") && who.contains("IP Messenger"),
        "{who}"
    );

    // It leaves: asked once more, silent, gone.
    peer.send(to, mode::BR_EXIT, b"bob\0\0");
    peer.expect("the check that it left", is(mode::BR_ENTRY));
    let left = chat.wait_for("the leave", |v| {
        v["event"] == "leave" && v["from"] == pa.as_str()
    });
    assert_eq!(left["protocol"], "ipmsg");

    // Our exit reaches the peers we know.
    let mut carol = Peer::bind([127, 0, 0, 3], port, IPTUX);
    carol.send(to, 257, b"carol\0\0icon\0utf-8\0");
    carol.expect("ANSENTRY", is(mode::ANSENTRY));
    let ca = carol.addr().to_string();
    chat.wait_for("carol", |v| {
        v["event"] == "join" && v["from"] == ca.as_str()
    });
    assert_eq!(chat.terminate(), 0);
    carol.expect("our exit", is(mode::BR_EXIT));
}

#[test]
fn a_forged_exit_does_not_remove_a_peer_that_answers() {
    let (mut chat, port) = chat_with_ipmsg(&[], &[]);
    let to = ipmsg_at(port);
    let mut peer = Peer::bind([127, 0, 0, 2], port, "1");
    let pa = peer.addr().to_string();
    peer.send(to, mode::BR_ENTRY, b"bob\0\0");
    peer.expect("ANSENTRY", is(mode::ANSENTRY));
    chat.joined(peer.addr());
    // A forger sends BR_EXIT with bob's address (here: from bob's socket); bob, alive,
    // answers the check as any client does.
    peer.send(to, mode::BR_EXIT, b"");
    peer.expect("the check", is(mode::BR_ENTRY));
    peer.send(to, mode::ANSENTRY, b"bob\0\0");
    corokit_common::sleep(Duration::from_secs(3));
    chat.say("/who");
    chat.wait_for("bob still listed", |v| {
        v.as_str().is_some_and(|l| l.contains("bob"))
    });
    assert!(!chat
        .seen
        .iter()
        .any(|v| v["event"] == "leave" && v["from"] == pa.as_str()));
}

#[test]
fn away_is_announced_and_answered_automatically() {
    let (mut chat, port) = chat_with_ipmsg(&[], &[]);
    let to = ipmsg_at(port);
    let mut peer = Peer::bind([127, 0, 0, 2], port, "1");
    peer.send(to, mode::BR_ENTRY | opt::CAPUTF8OPT, b"bob\0\0");
    peer.expect("ANSENTRY", is(mode::ANSENTRY));
    chat.joined(peer.addr());
    chat.say("/away at lunch");
    let (_, absence) = peer.expect("our absence", is(mode::BR_ABSENCE));
    assert!(absence.has(opt::ABSENCEOPT));
    peer.send(to, mode::SENDMSG | opt::SENDCHECKOPT, b"are you there?\0");
    let (_, reply) = peer.expect("the automatic reply", |p| p.mode() == mode::SENDMSG);
    assert!(reply.has(opt::AUTORETOPT));
    assert_eq!(reply.text(), b"at lunch");
    // An automatic reply is never answered automatically.
    peer.send(to, mode::SENDMSG | opt::AUTORETOPT, b"me too\0");
    assert_eq!(peer.count(Duration::from_millis(400), is(mode::SENDMSG)), 0);
    chat.say("/back");
    let (_, back) = peer.expect("our return", is(mode::BR_ABSENCE));
    assert!(!back.has(opt::ABSENCEOPT));
    // Their absence is shown.
    peer.send(to, mode::BR_ABSENCE | opt::ABSENCEOPT, b"bob\0\0");
    let away = chat.wait_for("bob away", |v| v["event"] == "away");
    assert_eq!(away["away"], true);
}

#[test]
fn feiq_in_gbk_and_an_old_client_in_shift_jis() {
    let (mut chat, port) = chat_with_ipmsg(&["--ipmsg-encoding", "cp932"], &[]);
    let to = ipmsg_at(port);
    let mut feiq = Peer::bind([127, 0, 0, 2], port, FEIQ);
    feiq.send(
        to,
        mode::BR_ENTRY,
        &[GBK.encode("飞秋用户").0.as_ref(), b"\0\0"].concat(),
    );
    feiq.expect("ANSENTRY", is(mode::ANSENTRY));
    let join = chat.wait_for("FeiQ's join", |v| {
        v["event"] == "join" && v["client"] == "FeiQ"
    });
    assert_eq!(join["nick"], "飞秋用户");
    feiq.send(
        to,
        mode::SENDMSG | opt::SENDCHECKOPT,
        &[GBK.encode("你好，世界").0.as_ref(), b"\0"].concat(),
    );
    chat.wait_for("the GBK message", |v| v["text"] == "你好，世界");
    chat.say("@飞秋用户 收到");
    let (_, msg) = feiq.expect("our GBK message", is(mode::SENDMSG));
    assert_eq!(msg.text(), GBK.encode("收到").0.as_ref());

    let mut old = Peer::bind([127, 0, 0, 3], port, "1");
    old.send(
        to,
        mode::BR_ENTRY,
        &[SHIFT_JIS.encode("山田").0.as_ref(), b"\0\0"].concat(),
    );
    old.expect("ANSENTRY", is(mode::ANSENTRY));
    chat.wait_for("the Shift-JIS name", |v| {
        v["event"] == "join" && v["nick"] == "山田"
    });
    old.send(
        to,
        mode::SENDMSG,
        &[SHIFT_JIS.encode("こんにちは").0.as_ref(), b"\0"].concat(),
    );
    chat.wait_for("the Shift-JIS message", |v| v["text"] == "こんにちは");
    chat.say("@山田 さようなら");
    let (_, msg) = old.expect("our Shift-JIS message", is(mode::SENDMSG));
    assert_eq!(msg.text(), SHIFT_JIS.encode("さようなら").0.as_ref());
}

#[test]
fn hostile_packets_are_counted_or_shown_escaped() {
    let (mut chat, port) = chat_with_ipmsg(&[], &[]);
    let to = ipmsg_at(port);
    let junk = UdpSocket::bind("127.0.0.4:0").unwrap();
    let mut huge = b"1:1:u:h:32:".to_vec();
    huge.resize(40_000, b'a');
    for bytes in [
        &b"1:2:u:h"[..],
        b"1:99999999999999999999999:u:h:32:x",
        b"1:1:u:h:4294967296:x",
        &huge,
    ] {
        for _ in 0..50 {
            junk.send_to(bytes, to).unwrap();
        }
    }
    // Colons and terminal controls in names, a long message: shown, escaped by the output.
    let mut peer = Peer::bind([127, 0, 0, 2], port, "1");
    peer.send(to, mode::BR_ENTRY, b"e:v\x1b[2Jil\0gr:oup\0");
    let long = "y".repeat(8000);
    peer.send(to, mode::SENDMSG, format!("{long}\0").as_bytes());
    let join = chat.wait_for("the join", |v| {
        v["event"] == "join" && v["group"] == "gr:oup"
    });
    assert_eq!(join["nick"], "e:v\u{1b}[2Jil");
    chat.wait_for("the long message", |v| {
        v["text"].as_str().is_some_and(|t| t.len() == 8000)
    });
    chat.say("/stats");
    let stats = chat.wait_for("/stats", |v| {
        v.as_str().is_some_and(|l| l.contains("malformed"))
    });
    assert!(stats.as_str().unwrap().contains("malformed 200"), "{stats}");
    let notices = count(&chat, "notice");
    assert!(notices <= 4, "{notices} notices for 200 malformed packets");
}

#[test]
fn chat_send_waits_for_an_ipmsg_acknowledgement() {
    let port = UdpSocket::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let peer_addr = SocketAddr::from(([127, 0, 0, 2], port));
    let p = port.to_string();
    let send = |text: &str, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_chat"))
            .args(["send", &peer_addr.to_string(), text])
            .args([
                "--bind",
                "127.0.0.1",
                "--ipmsg-port",
                &p,
                "--tries",
                "2",
                "--ack-timeout",
                "100",
            ])
            .args(extra)
            .env_clear()
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Nothing there: fails.
    let (code, err) = send("into the void", &[]);
    assert_eq!(code, Some(1), "{err}");
    // A peer that answers entries and acknowledges messages, as IP Messenger does.
    let mut peer = Peer::bind([127, 0, 0, 2], port, IPTUX);
    let answering = std::thread::spawn(move || {
        let mut texts = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let until = Instant::now() + WAIT;
        while Instant::now() < until && texts.is_empty() {
            peer.receive();
            for (from, p) in std::mem::take(&mut peer.inbox) {
                match p.mode() {
                    mode::BR_ENTRY => {
                        peer.send(from, mode::ANSENTRY, b"tux\0\0");
                    }
                    mode::SENDMSG => {
                        // Acknowledged every time, shown once (it may be sent again while
                        // this peer is slow to answer).
                        peer.send(from, mode::RECVMSG, format!("{}\0", p.number).as_bytes());
                        if seen.insert(p.number) {
                            texts.push(String::from_utf8_lossy(p.text()).into_owned());
                        }
                    }
                    _ => {}
                }
            }
        }
        texts
    });
    let (code, err) = send("one shot", &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(answering.join().unwrap(), ["one shot"]);
    // With a key, IP Messenger (which cannot be authenticated) needs asking for.
    let out = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args([
            "send",
            &peer_addr.to_string(),
            "x",
            "--bind",
            "127.0.0.1",
            "--ipmsg-port",
            &p,
        ])
        .env_clear()
        .env("CHAT_KEY", "k")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ipmsg"));
}

#[test]
fn a_taken_port_is_one_notice_and_chat_goes_on() {
    let holder = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let mut chat = Chat::start(&["--ipmsg-port", &port]);
    assert!(
        listening_without_ipmsg(&chat.listening),
        "{}",
        chat.listening
    );
    let notice = chat.wait_for("the notice", |v| v["event"] == "notice");
    assert!(
        notice["text"]
            .as_str()
            .unwrap()
            .contains("without IP Messenger"),
        "{notice}"
    );
    // Still a chat.
    let mut other = Chat::start(&["--name", "other", "--to", &chat.addr.to_string()]);
    other.joined(chat.addr);
    assert_eq!(count(&chat, "notice"), 1);
}

#[test]
fn with_a_key_ipmsg_is_off_unless_asked_and_then_marked() {
    let key = [("CHAT_KEY", "shared secret")];
    let port = UdpSocket::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let chat = Chat::start_with(&["--ipmsg-port", &port], &key);
    assert!(
        listening_without_ipmsg(&chat.listening),
        "{}",
        chat.listening
    );
    drop(chat);
    let (mut chat, port) = chat_with_ipmsg(&["--ipmsg"], &key);
    let mut peer = Peer::bind([127, 0, 0, 2], port, "1");
    peer.send(ipmsg_at(port), mode::SENDMSG, b"plain as ever\0");
    let m = chat.wait_for("the message", |v| v["text"] == "plain as ever");
    assert_eq!(m["unauthenticated"], true);
    assert_eq!(m["protocol"], "ipmsg");
}

#[test]
#[ignore = "needs network namespaces (root); .ci/run runs this where it can"]
fn discovery_by_broadcast_on_the_ipmsg_port() {
    let lan = Lan::two_hosts(true).expect("creating network namespaces is not permitted here");
    let (h1, h2) = (lan.names[1].clone(), lan.names[2].clone());
    // The scripted peer lives on host 2, on the IP Messenger port, hearing broadcasts.
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/run/netns/{h2}")).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        let mut peer = Peer::bind([0, 0, 0, 0], 2425, "1");
        peer.socket.set_broadcast(true).unwrap();
        ready_tx.send(()).unwrap();
        // chat's entry arrives by broadcast; it is answered, and a message sent.
        let (from, entry) = peer.expect("chat's broadcast entry", is(mode::BR_ENTRY));
        assert_eq!(from.ip().to_string(), "10.213.77.1");
        assert_eq!(packet::Entry::parse(&entry.extra).nick, b"one");
        peer.send(from, mode::ANSENTRY | opt::CAPUTF8OPT, b"two\0\0");
        peer.send(
            from,
            mode::SENDMSG | opt::SENDCHECKOPT | opt::UTF8OPT,
            "hi from two\0".as_bytes(),
        );
        peer.expect("the acknowledgement", is(mode::RECVMSG));
        let (_, reply) = peer.expect("chat's reply", is(mode::SENDMSG));
        assert_eq!(reply.text(), b"hello two");
        peer.send(
            from,
            mode::RECVMSG,
            format!("{}\0", reply.number).as_bytes(),
        );
        done.recv_timeout(WAIT).unwrap();
        peer.expect("chat's exit", is(mode::BR_EXIT));
    });
    ready.recv_timeout(WAIT).unwrap();
    let mut one = Chat::start_in(&h1, &["--name", "one"]);
    let j = one.wait_for("the peer's join", |v| {
        v["event"] == "join" && v["protocol"] == "ipmsg"
    });
    assert_eq!(j["from"], "10.213.77.2:2425");
    one.wait_for("its message", |v| v["text"] == "hi from two");
    one.say("@two hello two");
    done_tx.send(()).unwrap();
    corokit_common::sleep(Duration::from_millis(300));
    assert_eq!(one.terminate(), 0);
    peer.join().unwrap();
}
