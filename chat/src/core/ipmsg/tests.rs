//! The IP Messenger side of the core against scripted peers: each client's habits, each
//! attack, with time passed in (no test waits).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use encoding_rs::{GBK, SHIFT_JIS};

use super::*;
use crate::core::{Config, Core, Event, Greeting, Protocol, SendError, Sent, Transmit, Via};
use crate::ipmsg::packet::{self, mode, opt, Packet};

const IPTUX: &str = "1_iptux 0.8.3";
const FEIQ: &str = "1_lbt6_0#128#001122334455#0#0#0#4001#9";

fn at(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 2425))
}

fn broadcast() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 255], 2425))
}

fn config(keyed: bool) -> Config {
    Config {
        nick: "me".into(),
        ipmsg: Some(IpmsgConfig {
            port: 2425,
            user: "meuser".into(),
            host: "mybox".into(),
            group: "grp".into(),
            legacy: SHIFT_JIS,
            broadcasts: vec![broadcast()],
            clock: 1_000_000,
            keyed,
            exit_to_users: true,
        }),
        ..Config::default()
    }
}

/// A core that has started (and broadcast its entry), with what it showed.
struct Chat {
    core: Core,
    shown: Vec<Event>,
    t: Instant,
}

impl Chat {
    fn new() -> Chat {
        Chat::with(config(false))
    }

    fn with(config: Config) -> Chat {
        let t = Instant::now();
        let mut core = Core::new(config, [7; 32], t);
        core.start(t);
        Chat {
            core,
            shown: Vec::new(),
            t,
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t + Duration::from_millis(ms)
    }

    /// A packet from `from`, written as client `version` writes it.
    fn hear(
        &mut self,
        ms: u64,
        from: SocketAddr,
        version: &str,
        number: u64,
        command: u32,
        extra: &[u8],
    ) {
        let mut bytes =
            format!("{version}:{number}:user{}:host:{command}:", from.ip()).into_bytes();
        bytes.extend_from_slice(extra);
        self.core.handle_ipmsg(self.at(ms), from, &bytes);
        self.drain();
    }

    fn tick(&mut self, ms: u64) {
        self.core.handle_timeout(self.at(ms));
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(e) = self.core.poll_event() {
            self.shown.push(e);
        }
    }

    /// What went out on the IP Messenger socket since the last call, parsed.
    fn sent(&mut self) -> Vec<(SocketAddr, Packet)> {
        let all: Vec<Transmit> = std::iter::from_fn(|| self.core.poll_transmit()).collect();
        assert!(all.iter().all(|t| t.via == Via::Ipmsg), "{all:?}");
        all.into_iter()
            .map(|t| {
                (
                    t.to,
                    packet::parse(&t.bytes).expect("we write what we read"),
                )
            })
            .collect()
    }

    fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.shown.iter().filter(|e| pred(e)).count()
    }

    fn texts(&self) -> Vec<String> {
        self.shown
            .iter()
            .filter_map(|e| match e {
                Event::Message { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    }
}

fn modes(sent: &[(SocketAddr, Packet)]) -> Vec<(SocketAddr, u32)> {
    sent.iter().map(|(to, p)| (*to, p.mode())).collect()
}

#[test]
fn presence_entry_answer_and_exit() {
    let mut c = Chat::new();
    let start = c.sent();
    assert_eq!(modes(&start), [(broadcast(), mode::BR_ENTRY)]);
    assert!(start[0].1.has(opt::CAPUTF8OPT) && !start[0].1.has(opt::UTF8OPT));
    // Our own broadcast, heard back, is not a peer.
    let own = packet::write(
        start[0].1.number,
        b"meuser",
        b"mybox",
        start[0].1.command,
        &start[0].1.extra,
    );
    c.core
        .handle_ipmsg(c.at(1), SocketAddr::from(([10, 0, 0, 9], 2425)), &own);
    c.drain();
    assert!(c.shown.is_empty(), "{:?}", c.shown);

    c.hear(
        10,
        at(2),
        IPTUX,
        1,
        257,
        b"tux\0office\0icon-tux.png\0utf-8\0",
    );
    let answer = c.sent();
    assert_eq!(modes(&answer), [(at(2), mode::ANSENTRY)]);
    let e = packet::Entry::parse(&answer[0].1.extra);
    assert_eq!(e.nick, b"me");
    match &c.shown[..] {
        [Event::Join {
            addr,
            nick,
            protocol,
            ipmsg: Some(u),
        }] => {
            assert_eq!((*addr, nick.as_str()), (at(2), "tux"));
            assert_eq!(
                *protocol,
                Protocol::Ipmsg {
                    unauthenticated: false
                }
            );
            assert_eq!((u.group.as_str(), u.client), ("office", Client::Iptux));
            assert!(!u.away, "iptux sets ABSENCEOPT on every entry: not away");
        }
        other => panic!("{other:?}"),
    }
    let who = c.core.peers(c.at(20));
    assert_eq!(who.len(), 1);
    assert_eq!(who[0].ipmsg.as_ref().unwrap().client, Client::Iptux);

    // An answer to our entry adds a peer without a reply.
    c.hear(
        30,
        at(3),
        "1",
        5,
        mode::ANSENTRY | opt::CAPUTF8OPT,
        b"msgr\0\0\nUN:u\nHN:h\nNN:\xe3\x81\x82\nGN:\n",
    );
    assert!(c.sent().is_empty());
    assert_eq!(
        c.core.ipmsg_user(at(3)).unwrap().0,
        "あ",
        "the UTF-8 name of a CAPUTF8 peer"
    );

    // A real exit: it is asked once more, stays silent, and leaves.
    c.hear(100, at(2), IPTUX, 2, 65538, b"");
    assert_eq!(modes(&c.sent()), [(at(2), mode::BR_ENTRY)]);
    assert_eq!(
        c.count(|e| matches!(e, Event::Leave { .. })),
        0,
        "not before it stayed silent"
    );
    c.tick(100 + 5_000);
    assert_eq!(
        c.count(|e| matches!(e, Event::Leave { addr, .. } if *addr == at(2))),
        1
    );
    assert!(c.core.ipmsg_user(at(2)).is_none());

    // Our exit reaches the broadcast address and every peer.
    c.core.stop(c.at(3_000));
    let exits = modes(&c.sent());
    assert!(exits.contains(&(broadcast(), mode::BR_EXIT)), "{exits:?}");
    assert!(exits.contains(&(at(3), mode::BR_EXIT)), "{exits:?}");
}

#[test]
fn a_forged_exit_does_not_remove_a_peer_that_keeps_talking() {
    let mut c = Chat::new();
    c.sent();
    c.hear(
        0,
        at(2),
        "1",
        1,
        mode::BR_ENTRY | opt::CAPUTF8OPT,
        b"ana\0\0",
    );
    c.sent();
    // Anyone can send a BR_EXIT from ana's address; ana answers the check.
    c.hear(10, at(2), "1", 999, mode::BR_EXIT, b"");
    let probe = c.sent();
    assert_eq!(modes(&probe), [(at(2), mode::BR_ENTRY)]);
    c.hear(
        20,
        at(2),
        "1",
        2,
        mode::ANSENTRY | opt::CAPUTF8OPT,
        b"ana\0\0",
    );
    c.tick(5_000);
    assert_eq!(
        c.count(|e| matches!(e, Event::Leave { .. })),
        0,
        "{:?}",
        c.shown
    );
    assert!(c.core.ipmsg_user(at(2)).is_some());
    assert_eq!(
        c.count(|e| matches!(e, Event::Notice(n) if n.contains("spoke again"))),
        1
    );
}

#[test]
fn our_messages_are_acknowledged_or_reported_not_delivered() {
    let mut c = Chat::new();
    c.sent();
    c.hear(
        0,
        at(2),
        "1",
        1,
        mode::BR_ENTRY | opt::CAPUTF8OPT,
        b"ana\0\0",
    );
    c.sent();
    let Ok(Sent::Reliable(id)) = c.core.send(c.at(10), at(2), "héllo a:b") else {
        panic!()
    };
    let out = c.sent();
    let (to, msg) = &out[0];
    assert_eq!((*to, msg.mode()), (at(2), mode::SENDMSG));
    assert!(msg.has(opt::SENDCHECKOPT) && msg.has(opt::UTF8OPT));
    assert_eq!(msg.text(), "héllo a:b".as_bytes());
    // An acknowledgement from elsewhere is not ana's.
    c.hear(
        20,
        at(9),
        "1",
        3,
        mode::RECVMSG,
        msg.number.to_string().as_bytes(),
    );
    assert_eq!(c.count(|e| matches!(e, Event::Delivered { .. })), 0);
    // iptux acknowledges from its IPMsg port whatever port we used: same host is enough.
    let ack_from = SocketAddr::from(([10, 0, 0, 2], 2425));
    c.hear(
        30,
        ack_from,
        "1",
        2,
        mode::RECVMSG,
        format!("{}\0", msg.number).as_bytes(),
    );
    assert_eq!(
        c.count(|e| matches!(e, Event::Delivered { id: d, .. } if *d == id)),
        1
    );

    // Never acknowledged: sent again with backoff, then reported, once.
    let Ok(Sent::Reliable(lost)) = c.core.send(c.at(100), at(2), "lost") else {
        panic!()
    };
    let first = c.sent();
    let number = first[0].1.number;
    let timing = c.core.timing();
    let mut resent = 0;
    for ms in (100..100 + timing.dead_after().as_millis() as u64 + 1000).step_by(50) {
        c.tick(ms);
        resent += c.sent().iter().filter(|(_, p)| p.number == number).count();
    }
    assert_eq!(resent as u32, timing.tries - 1);
    assert_eq!(
        c.count(|e| matches!(e, Event::NotDelivered { id, .. } if *id == lost)),
        1
    );
}

#[test]
fn their_messages_are_shown_once_and_acknowledged_as_each_asks() {
    let mut c = Chat::new();
    c.sent();
    c.hear(0, at(2), IPTUX, 1, 257, b"tux\0\0");
    c.sent();
    let check = mode::SENDMSG | opt::SENDCHECKOPT;
    c.hear(10, at(2), IPTUX, 7, check, b"hello \xe4\xbd\xa0 a:b:c\0");
    c.hear(11, at(2), IPTUX, 7, check, b"hello \xe4\xbd\xa0 a:b:c\0");
    assert_eq!(c.texts(), ["hello 你 a:b:c"], "a duplicate is shown once");
    let acks = c.sent();
    assert_eq!(acks.len(), 2, "a duplicate is acknowledged again");
    assert!(acks
        .iter()
        .all(|(_, p)| p.mode() == mode::RECVMSG && p.names_number() == Some(7)));
    // Broadcasts and automatic replies are never acknowledged.
    c.hear(20, at(2), IPTUX, 8, check | opt::BROADCASTOPT, b"to all\0");
    c.hear(21, at(2), IPTUX, 9, check | opt::AUTORETOPT, b"I am out\0");
    assert!(c.sent().is_empty());
    assert_eq!(c.texts().len(), 3);
    // A restarted client numbers from 1 again after its entry: shown, not a duplicate.
    c.hear(30, at(2), IPTUX, 1, 257, b"tux\0\0");
    c.sent();
    c.hear(31, at(2), IPTUX, 7, check, b"after restart\0");
    assert_eq!(c.texts().last().unwrap(), "after restart");
    // A stranger's message is shown, and it is asked who it is.
    c.hear(40, at(5), "1", 50, check, b"who am I\0");
    assert_eq!(c.texts().last().unwrap(), "who am I");
    let m = modes(&c.sent());
    assert!(
        m.contains(&(at(5), mode::RECVMSG)) && m.contains(&(at(5), mode::BR_ENTRY)),
        "{m:?}"
    );
}

#[test]
fn away_is_announced_and_answered_but_never_to_an_automatic_reply() {
    let mut c = Chat::new();
    c.sent();
    c.hear(
        0,
        at(2),
        "1",
        1,
        mode::BR_ENTRY | opt::CAPUTF8OPT,
        b"ana\0\0",
    );
    c.sent();
    c.core.set_away(c.at(10), Some("at lunch".into()));
    let told = c.sent();
    assert!(told
        .iter()
        .all(|(_, p)| p.mode() == mode::BR_ABSENCE && p.has(opt::ABSENCEOPT)));
    assert_eq!(
        modes(&told),
        [(at(2), mode::BR_ABSENCE)],
        "to ana alone, in her encoding: a broadcast would garble iptux"
    );
    c.hear(
        20,
        at(2),
        "1",
        2,
        mode::SENDMSG | opt::SENDCHECKOPT,
        b"lunch?\0",
    );
    let replies = c.sent();
    let auto: Vec<_> = replies
        .iter()
        .filter(|(_, p)| p.mode() == mode::SENDMSG)
        .collect();
    assert_eq!(auto.len(), 1);
    assert!(auto[0].1.has(opt::AUTORETOPT) && !auto[0].1.has(opt::SENDCHECKOPT));
    assert_eq!(auto[0].1.text(), b"at lunch");
    // Two absent users do not answer each other for ever.
    c.hear(
        30,
        at(2),
        "1",
        3,
        mode::SENDMSG | opt::AUTORETOPT,
        b"me too\0",
    );
    assert!(c.sent().iter().all(|(_, p)| p.mode() != mode::SENDMSG));
    c.core.set_away(c.at(40), None);
    assert!(c.sent().iter().all(|(_, p)| !p.has(opt::ABSENCEOPT)));
    // Their absence is shown when it changes.
    c.hear(
        50,
        at(2),
        "1",
        4,
        mode::BR_ABSENCE | opt::ABSENCEOPT | opt::CAPUTF8OPT,
        b"ana\0\0",
    );
    assert_eq!(c.count(|e| matches!(e, Event::Away { away: true, .. })), 1);
    assert!(c.core.ipmsg_user(at(2)).unwrap().1.away);
}

#[test]
fn each_client_is_read_and_written_in_its_encoding() {
    let mut c = Chat::new();
    c.sent();
    // FeiQ: GBK both ways, whatever the legacy encoding.
    c.hear(
        0,
        at(2),
        FEIQ,
        1,
        mode::BR_ENTRY,
        &[GBK.encode("飞秋").0.as_ref(), b"\0\0"].concat(),
    );
    assert_eq!(c.core.ipmsg_user(at(2)).unwrap().0, "飞秋");
    c.hear(
        1,
        at(2),
        FEIQ,
        2,
        mode::SENDMSG | opt::SENDCHECKOPT,
        &[GBK.encode("你好").0.as_ref(), b"\0"].concat(),
    );
    assert_eq!(c.texts(), ["你好"]);
    c.sent();
    c.core.send(c.at(2), at(2), "你好").unwrap();
    let out = c.sent();
    assert_eq!(out[0].1.text(), GBK.encode("你好").0.as_ref());
    assert!(!out[0].1.has(opt::UTF8OPT));
    // An old IP Messenger in Shift-JIS (the legacy encoding here), without CAPUTF8OPT.
    c.hear(
        10,
        at(3),
        "1",
        1,
        mode::BR_ENTRY,
        &[SHIFT_JIS.encode("山田").0.as_ref(), b"\0\0"].concat(),
    );
    c.hear(
        11,
        at(3),
        "1",
        2,
        mode::SENDMSG,
        &[SHIFT_JIS.encode("こんにちは").0.as_ref(), b"\0"].concat(),
    );
    assert_eq!(c.core.ipmsg_user(at(3)).unwrap().0, "山田");
    assert_eq!(c.texts().last().unwrap(), "こんにちは");
    c.sent();
    c.core.send(c.at(12), at(3), "さようなら").unwrap();
    assert_eq!(
        c.sent()[0].1.text(),
        SHIFT_JIS.encode("さようなら").0.as_ref()
    );
    // Text that decodes in nothing is shown with U+FFFD, never dropped.
    c.hear(
        20,
        at(3),
        "1",
        3,
        mode::SENDMSG | opt::UTF8OPT,
        b"bad \xff\xfe end\0",
    );
    assert_eq!(c.texts().last().unwrap(), "bad \u{fffd}\u{fffd} end");
    // Names are the peer's to choose: kept as received (and escaped when shown).
    c.hear(30, at(4), "1", 1, mode::BR_ENTRY, b"e:v\x1b[2Je\0g:r\0");
    assert_eq!(c.core.ipmsg_user(at(4)).unwrap().0, "e:v\x1b[2Je");
}

#[test]
fn malformed_packets_are_counted_and_told_once() {
    let mut c = Chat::new();
    c.sent();
    let mut huge = b"1:1:u:h:32:".to_vec();
    huge.resize(packet::MAX_RECEIVED + 10, b'a');
    let bad: Vec<Vec<u8>> = vec![
        b"1:2:u:h".to_vec(),
        b"1:99999999999999999999999:u:h:32:x".to_vec(),
        b"1:1:u:h:99999999999:x".to_vec(),
        b"2:1:u:h:32:x".to_vec(),
        huge,
    ];
    for round in 0..20 {
        for bytes in &bad {
            c.core.handle_ipmsg(c.at(round), at(2), bytes);
        }
    }
    c.drain();
    assert_eq!(c.core.stats().malformed, 100);
    // One line per kind of trouble per interval, not one per packet.
    assert_eq!(
        c.count(|e| matches!(e, Event::Notice(_))),
        5,
        "{:?}",
        c.shown
    );
    assert!(c.core.peers(c.at(10)).is_empty());
    assert!(c.sent().is_empty(), "nothing answers junk");
    // The largest packet iptux reads: shown whole.
    let mut big = b"1:5:u:h:32:".to_vec();
    big.resize(8191, b'x');
    c.core.handle_ipmsg(c.at(20), at(3), &big);
    c.drain();
    assert_eq!(c.texts().last().map(String::len), Some(8191 - 11));
}

#[test]
fn floods_of_entries_and_messages_stay_bounded() {
    let mut c = Chat::new();
    c.sent();
    c.hear(0, at(2), "1", 1, mode::BR_ENTRY, b"friend\0\0");
    c.core.send(c.at(1), at(2), "hi").unwrap();
    for i in 0..5_000u32 {
        let from = SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 2425));
        c.core
            .handle_ipmsg(c.at(2), from, format!("1:{i}:u:h:1:n{i}\0\0").as_bytes());
    }
    c.drain();
    let mem = c.core.memory();
    assert!(mem.ipmsg_users <= MAX_USERS, "{mem:?}");
    assert!(
        c.core.ipmsg_user(at(2)).is_some(),
        "a peer in a conversation is never given up"
    );
    let answers = c
        .sent()
        .iter()
        .filter(|(_, p)| p.mode() == mode::ANSENTRY)
        .count();
    assert!(
        answers <= ANSWER_BURST as usize + 1,
        "{answers} answers at once"
    );
    // One source flooding messages fills only its share of the user's queue, and what it
    // could not show is not acknowledged (its sender will send it again).
    let mut acked = 0;
    for n in 0..20_000u64 {
        c.core.handle_ipmsg(
            c.at(3),
            at(2),
            format!("1:{}:u:h:288:{}\0", 100 + n, "x".repeat(60)).as_bytes(),
        );
        acked += c
            .sent()
            .iter()
            .filter(|(_, p)| p.mode() == mode::RECVMSG)
            .count();
    }
    let mem = c.core.memory();
    assert!(
        mem.events <= crate::core::events::SOURCE_QUEUE + 1100,
        "{mem:?}"
    );
    assert!(
        (crate::core::events::SOURCE_QUEUE - 1100..20_000).contains(&acked),
        "{acked}"
    );
}

#[test]
fn a_message_too_long_for_one_packet_is_refused_saying_so() {
    let mut c = Chat::new();
    c.sent();
    let text = "長".repeat(3000); // 9,000 bytes of UTF-8, 6,000 in Shift-JIS
    assert!(
        matches!(c.core.send(c.at(0), at(2), &text), Ok(Sent::Reliable(_))),
        "an unknown peer gets the legacy encoding, where it fits"
    );
    c.hear(
        0,
        at(3),
        "1",
        1,
        mode::BR_ENTRY | opt::CAPUTF8OPT,
        b"u8\0\0",
    );
    match c.core.send(c.at(1), at(3), &text) {
        Err(SendError::TooLongForIpmsg {
            len: 9000,
            encoding: "UTF-8",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn with_a_key_ipmsg_peers_are_marked_unauthenticated() {
    let mut c = Chat::with(config(true));
    c.sent();
    c.hear(0, at(2), "1", 1, mode::BR_ENTRY, b"ana\0\0");
    c.hear(1, at(2), "1", 2, mode::SENDMSG, b"hi\0");
    let marked = Protocol::Ipmsg {
        unauthenticated: true,
    };
    assert_eq!(
        c.count(|e| matches!(e, Event::Join { protocol, .. } if *protocol == marked)),
        1
    );
    assert_eq!(
        c.count(|e| matches!(e, Event::Message { protocol, .. } if *protocol == marked)),
        1
    );
    assert_eq!(c.core.peers(c.at(2))[0].protocol, marked);
}

#[test]
fn greeting_an_address_by_hand_asks_for_its_entry() {
    let mut c = Chat::new();
    c.sent();
    c.core.greet(c.at(0), at(7));
    assert_eq!(c.core.greeting(at(7)), Some(Greeting::Pending));
    assert_eq!(modes(&c.sent()), [(at(7), mode::BR_ENTRY)]);
    c.hear(5, at(7), "1", 1, mode::ANSENTRY, b"seven\0\0");
    assert_eq!(c.core.greeting(at(7)), Some(Greeting::Ipmsg));
    c.core.greet(c.at(10), at(8));
    c.sent();
    for ms in (10..20_000).step_by(100) {
        c.tick(ms);
    }
    assert_eq!(c.core.greeting(at(8)), Some(Greeting::Unanswered));
    assert_eq!(c.sent().len(), 2, "sent again, a few times");
}

#[test]
fn small_questions_never_become_large_answers_to_someone_else() {
    let mut c = Chat::new();
    c.sent();
    c.core
        .set_away(c.at(0), Some("a long absence text ".repeat(500)));
    // From a stranger (a forged source): no answer at all.
    for n in 0..50 {
        c.hear(1, at(9), "1", n, mode::GETABSENCEINFO, b"");
        c.hear(1, at(9), "1", 100 + n, mode::GETINFO, b"");
    }
    assert!(c.sent().is_empty());
    // From a user we know: a few, then its share is spent.
    c.hear(2, at(2), "1", 1, mode::BR_ENTRY, b"ana\0\0");
    c.sent();
    for n in 0..200 {
        c.hear(3, at(2), "1", 10 + n, mode::GETABSENCEINFO, b"");
    }
    let answers = c.sent();
    assert!(
        answers.len() <= 8,
        "{} answers to one source at once",
        answers.len()
    );
    assert!(answers.iter().all(|(_, p)| p.extra.len() <= MAX_AWAY + 1));
    // Secret messages: acknowledged every time, READMSG within the share.
    for n in 0..200 {
        c.hear(
            10_000,
            at(2),
            "1",
            1000 + n,
            mode::SENDMSG | opt::SENDCHECKOPT | opt::SECRETOPT,
            b"s\0",
        );
    }
    let out = c.sent();
    assert_eq!(
        out.iter()
            .filter(|(_, p)| p.mode() == mode::RECVMSG)
            .count(),
        200
    );
    assert!(
        out.iter()
            .filter(|(_, p)| p.mode() == mode::READMSG)
            .count()
            <= 8
    );
}

#[test]
fn messages_to_a_user_who_leaves_are_reported_not_delivered() {
    let mut c = Chat::new();
    c.sent();
    c.hear(0, at(2), "1", 1, mode::BR_ENTRY, b"ana\0\0");
    let Ok(Sent::Reliable(id)) = c.core.send(c.at(1), at(2), "bye?") else {
        panic!()
    };
    c.hear(10, at(2), "1", 2, mode::BR_EXIT, b"");
    c.tick(10 + 5_000);
    assert_eq!(
        c.count(|e| matches!(e, Event::NotDelivered { id: d, .. } if *d == id)),
        1
    );
    assert_eq!(c.core.memory().ipmsg_waiting, 0);
}

#[test]
fn every_user_of_a_big_lan_is_listed() {
    let mut c = Chat::new();
    c.sent();
    for i in 0..300u32 {
        let from = SocketAddr::from(([10, 2, (i >> 8) as u8, i as u8], 2425));
        c.core
            .handle_ipmsg(c.at(0), from, format!("1:{i}:u:h:1:n{i}\0\0").as_bytes());
    }
    c.drain();
    assert!(
        c.count(|e| matches!(e, Event::Join { .. })) < 300,
        "joins are summed up"
    );
    assert_eq!(c.core.peers(c.at(1)).len(), 300, "but every user is listed");
}

#[test]
fn a_forged_exit_during_a_flood_does_not_remove_a_user() {
    let mut c = Chat::new();
    c.sent();
    c.hear(0, at(2), "1", 1, mode::BR_ENTRY, b"ana\0\0");
    // Another host floods entries: only its own share of answers is spent.
    for n in 0..400 {
        c.hear(1, at(7), "1", 10 + n, mode::BR_ENTRY, b"flood\0\0");
    }
    c.sent();
    c.hear(2, at(2), "1", 999, mode::BR_EXIT, b"");
    assert_eq!(
        modes(&c.sent()),
        [(at(2), mode::BR_ENTRY)],
        "ana is still asked"
    );
    c.hear(3, at(2), "1", 3, mode::ANSENTRY, b"ana\0\0");
    // Exits from a source over its share are not believed at all.
    for n in 0..100 {
        c.hear(4, at(2), "1", 2000 + n, mode::BR_EXIT, b"");
    }
    c.tick(20_000);
    assert!(c.core.ipmsg_user(at(2)).is_some());
    assert_eq!(c.count(|e| matches!(e, Event::Leave { .. })), 0);
}

#[test]
fn one_message_at_a_time_so_a_retransmission_never_follows_a_later_one() {
    let mut c = Chat::new();
    c.sent();
    c.hear(0, at(2), IPTUX, 1, 257, b"tux\0\0");
    c.sent();
    c.core.send(c.at(1), at(2), "first").unwrap();
    c.core.send(c.at(1), at(2), "second").unwrap();
    let out = c.sent();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.text(), b"first");
    // Lost: sent again, and still before the second.
    c.tick(1 + 250);
    let again = c.sent();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1.text(), b"first");
    assert_eq!(again[0].1.number, out[0].1.number);
    c.hear(
        300,
        at(2),
        IPTUX,
        2,
        289,
        format!("{}\0", out[0].1.number).as_bytes(),
    );
    let next = c.sent();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1.text(), b"second");
    assert!(next[0].1.number > out[0].1.number);
}

#[test]
fn one_host_cannot_fill_the_table_or_the_list() {
    let mut c = Chat::new();
    c.sent();
    for port in 1000..2100u16 {
        let from = SocketAddr::from(([10, 0, 0, 66], port));
        c.core
            .handle_ipmsg(c.at(0), from, format!("1:{port}:u:h:288:hi\0").as_bytes());
    }
    c.drain();
    assert!(c.core.memory().ipmsg_users <= USERS_PER_HOST);
    assert!(
        c.core.peers(c.at(1)).is_empty(),
        "known only from messages: not listed"
    );
    // A real client arriving meanwhile still gets in.
    c.hear(2, at(2), "1", 1, mode::BR_ENTRY, b"ana\0\0");
    assert!(c.core.ipmsg_user(at(2)).is_some());
}
