//! Unit tests of the protocol core: handshakes and each attack, on cores wired together by
//! hand (the random-network simulator is in `tests/sim.rs`).

use super::*;
use crate::wire::{Malformed, MAX_DATAGRAM};

const MS: Duration = Duration::from_millis(1);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

/// A core at an address, with what it showed the user.
struct Host {
    core: Core,
    addr: SocketAddr,
    shown: Vec<Event>,
}

impl Host {
    fn new(port: u16, seed: u8, key: Option<&[u8]>, t: Instant) -> Host {
        let config = Config {
            nick: format!("n{port}"),
            key: key.map(Key::derive),
            ..Config::default()
        };
        Host {
            core: Core::new(config, [seed; 32], t),
            addr: addr(port),
            shown: Vec::new(),
        }
    }

    fn take_events(&mut self) {
        while let Some(e) = self.core.poll_event() {
            self.shown.push(e);
        }
    }

    fn messages(&self) -> Vec<(SocketAddr, String)> {
        self.shown
            .iter()
            .filter_map(|e| match e {
                Event::Message { from, text, .. } => Some((*from, text.clone())),
                _ => None,
            })
            .collect()
    }

    fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.shown.iter().filter(|e| pred(e)).count()
    }

    fn transmits(&mut self) -> Vec<Transmit> {
        std::iter::from_fn(|| self.core.poll_transmit()).collect()
    }
}

/// Delivers every datagram between the hosts until none is left; returns every datagram
/// seen, as (from, to, bytes), for an attacker to replay.
fn settle(hosts: &mut [&mut Host], now: Instant) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
    let mut seen = Vec::new();
    for _ in 0..100 {
        let mut moved = false;
        for i in 0..hosts.len() {
            let from = hosts[i].addr;
            for t in hosts[i].transmits() {
                seen.push((from, t.to, t.bytes.clone()));
                if let Some(dest) = hosts.iter_mut().find(|h| h.addr == t.to) {
                    dest.core.handle_datagram(now, from, &t.bytes);
                    moved = true;
                }
            }
        }
        for h in hosts.iter_mut() {
            h.take_events();
        }
        if !moved {
            return seen;
        }
    }
    panic!("the hosts never stopped talking");
}

/// The challenge in what `host` sent last, if it sent one.
fn challenge(host: &mut Host) -> Option<u64> {
    host.transmits()
        .iter()
        .find_map(|x| match wire::decode(&x.bytes) {
            Datagram::Packet {
                packet:
                    Packet {
                        body: Body::Greeting { token, .. },
                        ..
                    },
                ..
            } => Some(token),
            _ => None,
        })
}

fn pair(key: Option<&[u8]>) -> (Host, Host, Instant) {
    let t = Instant::now();
    let mut a = Host::new(1, 1, key, t);
    let mut b = Host::new(2, 2, key, t);
    a.core.greet(t, b.addr);
    settle(&mut [&mut a, &mut b], t);
    assert!(a.core.chat_peer(b.addr).is_some() && b.core.chat_peer(a.addr).is_some());
    (a, b, t)
}

#[test]
fn a_greeting_by_hand_is_readable_text_and_completes_a_handshake() {
    let t = Instant::now();
    let mut a = Host::new(1, 1, None, t);
    a.core.greet(t, addr(2));
    let hello = a.transmits().remove(0);
    let line = std::str::from_utf8(&hello.bytes).expect("UTF-8");
    assert!(line.starts_with("corokit-chat/2 hello from n1 #"), "{line}");
    assert!(line.chars().all(|c| c.is_ascii_graphic() || c == ' '));
    let (a, b, _) = pair(None);
    assert_eq!(a.count(|e| matches!(e, Event::Join { .. })), 1);
    assert_eq!(b.count(|e| matches!(e, Event::Join { .. })), 1);
}

#[test]
fn messages_flow_both_ways_in_order() {
    let (mut a, mut b, t) = pair(None);
    for i in 0..20 {
        a.core.send(t, b.addr, &format!("m{i}")).unwrap();
    }
    let long = "é".repeat(20_000);
    a.core.send(t, b.addr, &long).unwrap();
    b.core.send(t, a.addr, "back").unwrap();
    settle(&mut [&mut a, &mut b], t);
    let got: Vec<String> = b.messages().into_iter().map(|(_, m)| m).collect();
    let mut want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    want.push(long);
    assert_eq!(got, want);
    assert_eq!(a.messages(), [(b.addr, "back".to_string())]);
    assert_eq!(a.count(|e| matches!(e, Event::Delivered { .. })), 21);
}

#[test]
fn a_forged_address_cannot_become_an_alias_speak_for_a_peer_or_make_it_leave() {
    let (mut a, mut b, t) = pair(None);
    let eve = addr(666);
    let a_instance = a.core.instance();
    // Eve claims to be ana's run from her own port: a message, then a goodbye.
    let forged = Packet {
        kind: Kind::Msg,
        flags: 0,
        src: a_instance,
        dst: b.core.instance(),
        body: Body::Msg {
            seq: 1,
            base: 1,
            frag: 0,
            frags: 1,
            nick: Some("n1".into()),
            text: b"forged".to_vec(),
        },
    };
    b.core.handle_datagram(t, eve, &forged.encode());
    b.core
        .handle_datagram(t, eve, &Packet::bye(a_instance, b.core.instance()).encode());
    b.take_events();
    assert!(b.messages().is_empty(), "{:?}", b.shown);
    assert_eq!(b.count(|e| matches!(e, Event::Leave { .. })), 0);
    let who = b.core.peers(t);
    assert_eq!((who.len(), who[0].also.len()), (1, 0), "{who:?}");
    // Eve was only challenged, in text form, and the peer still talks.
    let to_eve: Vec<Transmit> = b.transmits().into_iter().filter(|x| x.to == eve).collect();
    assert!(to_eve
        .iter()
        .all(|x| x.bytes.starts_with(b"corokit-chat/2 ")));
    a.core.send(t, b.addr, "real").unwrap();
    settle(&mut [&mut a, &mut b], t);
    assert_eq!(b.messages(), [(a.addr, "real".to_string())]);
}

#[test]
fn a_hello_flood_leaves_no_state_and_never_evicts_a_conversation() {
    let (mut a, mut b, t) = pair(None);
    a.core.send(t, b.addr, "hi").unwrap();
    settle(&mut [&mut a, &mut b], t);
    for port in 10_000..15_000 {
        let hello = Packet::greeting(Kind::Hello, u64::from(port), 0, 5, 0, "x");
        b.core.handle_datagram(t, addr(port), &hello.encode());
    }
    b.take_events();
    assert_eq!(
        b.core.memory().runs,
        1,
        "strangers that never answered are not peers"
    );
    a.core.send(t, b.addr, "still acknowledged").unwrap();
    settle(&mut [&mut a, &mut b], t);
    assert_eq!(b.messages().last().unwrap().1, "still acknowledged");
    assert_eq!(a.count(|e| matches!(e, Event::Delivered { .. })), 2);
}

#[test]
fn sealed_traffic_replayed_after_a_restart_or_to_another_receiver_is_not_shown() {
    let key: &[u8] = b"shared secret";
    let (mut a, mut b, t) = pair(Some(key));
    a.core.send(t, b.addr, "for bob only").unwrap();
    let recorded = settle(&mut [&mut a, &mut b], t);
    assert_eq!(b.messages().len(), 1);
    let to_bob: Vec<Vec<u8>> = recorded
        .iter()
        .filter(|(f, to, _)| *f == a.addr && *to == b.addr)
        .map(|(_, _, bytes)| bytes.clone())
        .collect();
    // Replayed to the same bob: counted, not shown.
    for bytes in &to_bob {
        b.core.handle_datagram(t, a.addr, bytes);
    }
    b.take_events();
    assert_eq!(b.messages().len(), 1);
    assert!(!to_bob.is_empty());
    assert_eq!(
        b.core.stats().replayed,
        to_bob.len() as u64,
        "each replay counted"
    );
    // To carol, who knows ana (same key), from ana's address and from an outsider's.
    let mut c = Host::new(3, 3, Some(key), t);
    c.core.greet(t, a.addr);
    settle(&mut [&mut a, &mut c], t);
    for bytes in &to_bob {
        c.core.handle_datagram(t, a.addr, bytes);
        c.core.handle_datagram(t, addr(666), bytes);
    }
    c.take_events();
    assert!(c.messages().is_empty(), "{:?}", c.shown);
    assert!(c.core.stats().replayed > 0);
    // To bob restarted: a new run, the old datagrams name the old one.
    let mut b2 = Host::new(2, 9, Some(key), t);
    for bytes in &to_bob {
        b2.core.handle_datagram(t, a.addr, bytes);
    }
    b2.take_events();
    assert!(b2.messages().is_empty());
    assert!(b2.core.stats().replayed > 0);
}

#[test]
fn without_our_key_nothing_is_shown_and_a_hello_is_refused() {
    let t = Instant::now();
    let mut keyed = Host::new(2, 2, Some(b"k"), t);
    let mut plain = Host::new(1, 1, None, t);
    plain.core.greet(t, keyed.addr);
    settle(&mut [&mut plain, &mut keyed], t);
    assert_eq!(
        plain.core.greeting(keyed.addr),
        Some(Greeting::Refused(Refusal::NeedsKey))
    );
    assert_eq!(
        plain.core.send(t, keyed.addr, "hi"),
        Err(SendError::Refused {
            to: keyed.addr,
            why: Refusal::NeedsKey
        })
    );
    keyed.core.handle_datagram(t, plain.addr, b"plain words");
    keyed.take_events();
    assert!(keyed.messages().is_empty());
    assert!(keyed.core.stats().unauthenticated >= 2);
    // And the other way round.
    let mut keyed2 = Host::new(3, 3, Some(b"k"), t);
    keyed2.core.greet(t, plain.addr);
    settle(&mut [&mut plain, &mut keyed2], t);
    assert_eq!(
        keyed2.core.greeting(plain.addr),
        Some(Greeting::Refused(Refusal::HasNoKey))
    );
}

#[test]
fn a_skip_is_carried_by_every_later_message_so_nothing_waits_forever() {
    let (mut a, mut b, t) = pair(None);
    a.core.send(t, b.addr, "lost").unwrap();
    // Everything a sends is lost until b is declared gone.
    let dead = t + a.core.timing().dead_after();
    let mut now = t;
    while now <= dead {
        now += 10 * MS;
        a.core.handle_timeout(now);
        a.transmits();
        a.take_events();
    }
    assert_eq!(
        a.count(|e| matches!(e, Event::NotDelivered { .. })),
        1,
        "{:?}",
        a.shown
    );
    a.core.send(now, b.addr, "after").unwrap();
    settle(&mut [&mut a, &mut b], now);
    assert_eq!(b.messages(), [(a.addr, "after".to_string())]);
}

#[test]
fn hostile_sequence_numbers_and_sizes_are_harmless() {
    let (_a, mut b, t) = pair(None);
    let a_addr = addr(1);
    let run = b.core.peers.run_at(a_addr).unwrap();
    let me = b.core.instance();
    let msg = |seq: u64, base: u64, text: Vec<u8>| Packet {
        kind: Kind::Msg,
        flags: 0,
        src: run,
        dst: me,
        body: Body::Msg {
            seq,
            base,
            frag: 0,
            frags: 1,
            nick: None,
            text,
        },
    };
    b.core.handle_datagram(
        t,
        a_addr,
        &msg(u64::MAX, u64::MAX - 1, b"end".to_vec()).encode(),
    );
    b.core.handle_datagram(
        t,
        a_addr,
        &msg(u64::MAX - 1, u64::MAX - 1, b"x".to_vec()).encode(),
    );
    let mut huge = msg(7, 1, vec![b'x'; 65_000]).encode();
    huge.truncate(65_000);
    b.core.handle_datagram(t, a_addr, &huge);
    b.take_events();
    assert!(b.core.stats().malformed >= 1);
    assert!(b.core.memory().held_bytes <= MAX_DATAGRAM);
}

#[test]
fn memory_stays_bounded_whatever_instance_ids_one_source_invents() {
    let t = Instant::now();
    let mut b = Host::new(2, 2, None, t);
    let eve = addr(666);
    // Eve completes a handshake under 21 ids in turn and sends each stream far out of order.
    let mut now = t;
    for id in 1..=21u64 {
        now += Duration::from_secs(1);
        let hello = Packet::greeting(Kind::Hello, id, 0, 0, 0, "eve");
        b.core.handle_datagram(now, eve, &hello.encode());
        let token = challenge(&mut b).expect("a challenge");
        let answer = Packet::greeting(Kind::Reply, id, b.core.instance(), 0, token, "eve");
        b.core.handle_datagram(now, eve, &answer.encode());
        for seq in 2..2000u64 {
            let m = Packet {
                kind: Kind::Msg,
                flags: 0,
                src: id,
                dst: b.core.instance(),
                body: Body::Msg {
                    seq,
                    base: 1,
                    frag: 0,
                    frags: 1,
                    nick: None,
                    text: vec![b'x'; wire::fragment_size()],
                },
            };
            b.core.handle_datagram(now, eve, &m.encode());
        }
        b.transmits();
    }
    let m = b.core.memory();
    assert_eq!(m.runs, 1, "one address holds one run");
    assert!(
        m.held_bytes <= recv::REORDER as usize * (wire::fragment_size() + 160),
        "{m:?}"
    );
}

#[test]
fn junk_and_joins_are_summed_up_not_shown_one_by_one() {
    let t = Instant::now();
    let mut b = Host::new(2, 2, None, t);
    for i in 0..200_000u32 {
        let from = addr(1000 + (i % 7) as u16);
        b.core
            .handle_datagram(t + MS * (i / 1000), from, b"\xC6KT\x02\x04\x00short");
    }
    b.take_events();
    assert_eq!(b.core.stats().malformed, 200_000);
    assert!(b.shown.len() <= 7, "{}", b.shown.len());
    b.core.handle_timeout(t + Duration::from_secs(20));
    b.take_events();
    assert!(b.shown.len() <= 14);
    assert!(b
        .shown
        .iter()
        .any(|e| matches!(e, Event::Notice(n) if n.contains("more malformed datagrams"))));
    // A flood of joins from one source cycling ids.
    let mut c = Host::new(3, 3, None, t);
    let eve = addr(666);
    let mut now = t;
    for id in 1..=5_000u64 {
        now += 100 * MS;
        c.core.handle_timeout(now);
        c.core.handle_datagram(
            now,
            eve,
            &Packet::greeting(Kind::Hello, id, 0, 0, 0, "x").encode(),
        );
        let token = challenge(&mut c);
        if let Some(token) = token {
            let answer = Packet::greeting(Kind::Reply, id, c.core.instance(), 0, token, "x");
            c.core.handle_datagram(now, eve, &answer.encode());
        }
        c.core
            .handle_datagram(now, eve, &Packet::bye(id, c.core.instance()).encode());
    }
    c.take_events();
    let joins = c.count(|e| matches!(e, Event::Join { .. }));
    assert!((40..=51).contains(&joins), "{joins} joins in 500 s");
    assert!(c.shown.len() < 160, "{}", c.shown.len());
    assert!(c.core.memory().events == 0 && c.core.memory().runs <= 1);
}

#[test]
fn plain_text_is_shown_and_a_plain_peer_gets_only_the_users_text() {
    let t = Instant::now();
    let mut b = Host::new(2, 2, None, t);
    let nc = addr(9);
    b.core.greet(t, nc);
    let hello = b.transmits();
    assert_eq!(hello.len(), 1);
    b.core.handle_datagram(t, nc, b"hi \xff there");
    b.take_events();
    assert_eq!(b.messages(), [(nc, "hi \u{fffd} there".to_string())]);
    assert_eq!(b.core.greeting(nc), Some(Greeting::Plain));
    // No more greetings, no presence: only what the user sends.
    for s in 1..60 {
        b.core.handle_timeout(t + Duration::from_secs(s));
    }
    assert!(b.transmits().is_empty());
    assert_eq!(b.core.send(t, nc, "typed"), Ok(Sent::Plain));
    assert_eq!(b.transmits()[0].bytes, b"typed");
}

#[test]
fn a_malformed_version_1_datagram_names_the_problem() {
    let t = Instant::now();
    let mut b = Host::new(2, 2, None, t);
    b.core
        .handle_datagram(t, addr(5), b"\xC6KT\x01\x01\x00rest");
    b.take_events();
    assert!(matches!(&b.shown[0], Event::Notice(n) if n.contains("version 1")));
    assert_eq!(
        wire::decode(b"\xC6KT\x01\x01\x00rest"),
        Datagram::Malformed(Malformed::Version1)
    );
}

#[test]
fn an_idle_core_sleeps_for_seconds() {
    let (mut a, mut b, t) = pair(None);
    settle(&mut [&mut a, &mut b], t);
    a.core.handle_timeout(t + MS);
    assert!(a.core.poll_timeout() >= t + Duration::from_secs(4));
}

#[test]
fn without_a_key_an_address_that_echoes_a_run_id_speaks_only_for_itself() {
    let (mut a, mut b, t) = pair(None);
    let eve = addr(666);
    let ana = a.core.instance();
    let bob = b.core.instance();
    // Eve claims ana's (public) run id from her own port and echoes bob's challenge there.
    b.core.handle_datagram(
        t,
        eve,
        &Packet::greeting(Kind::Hello, ana, 0, 5, 0, "eve").encode(),
    );
    let token = challenge(&mut b).expect("a challenge to eve's address");
    let mut confirm = Packet::greeting(Kind::Reply, ana, bob, 5, token, "renamed");
    confirm.flags = wire::FLAG_VERIFIED;
    b.core.handle_datagram(t, eve, &confirm.encode());
    b.transmits();
    // Her message is shown as from her address, not ana's; ana keeps her name.
    let forged = Packet {
        kind: Kind::Msg,
        flags: 0,
        src: ana,
        dst: bob,
        body: Body::Msg {
            seq: u64::MAX / 2,
            base: u64::MAX / 2,
            frag: 0,
            frags: 1,
            nick: Some("n1".into()),
            text: b"forged".to_vec(),
        },
    };
    b.core.handle_datagram(t, eve, &forged.encode());
    b.take_events();
    assert_eq!(b.messages(), [(eve, "forged".to_string())]);
    assert_eq!(b.core.chat_peer(a.addr).unwrap().1, "n1");
    // Her acknowledgements do not make bob's messages delivered.
    b.core.send(t, a.addr, "to ana").unwrap();
    b.transmits(); // lost
    for seq in 0..5 {
        b.core
            .handle_datagram(t, eve, &Packet::ack(ana, bob, seq, 5, 5000).encode());
    }
    b.take_events();
    assert_eq!(b.count(|e| matches!(e, Event::Delivered { .. })), 0);
    // Her goodbye does not make ana leave, and ana's stream is untouched by her huge base.
    b.core
        .handle_datagram(t, eve, &Packet::bye(ana, bob).encode());
    a.core.send(t, b.addr, "real").unwrap();
    settle(&mut [&mut a, &mut b], t);
    assert_eq!(b.count(|e| matches!(e, Event::Leave { .. })), 0);
    assert!(b.messages().contains(&(a.addr, "real".to_string())));
}

#[test]
fn a_greeting_under_way_is_sent_three_times_however_often_it_is_asked() {
    let t = Instant::now();
    let mut b = Host::new(2, 2, None, t);
    let mut sent = 0;
    for s in 0..16u64 {
        let now = t + Duration::from_millis(500 * s);
        b.core.greet(now, addr(9));
        b.core.handle_timeout(now);
        sent += b.transmits().len();
    }
    assert_eq!(sent, 3);
}

#[test]
fn an_echo_from_long_ago_verifies_nothing() {
    let t = Instant::now();
    let mut b = Host::new(2, 2, None, t);
    b.core.handle_datagram(
        t,
        addr(7),
        &Packet::greeting(Kind::Hello, 70, 0, 5, 0, "x").encode(),
    );
    let token = challenge(&mut b).unwrap();
    let later = t + TOKEN_EPOCH * 3;
    b.core.handle_timeout(later);
    let mut confirm = Packet::greeting(Kind::Reply, 70, b.core.instance(), 5, token, "x");
    confirm.flags = wire::FLAG_VERIFIED;
    b.core.handle_datagram(later, addr(7), &confirm.encode());
    assert!(b.core.chat_peer(addr(7)).is_none());
    // In time, it does.
    b.core.handle_datagram(t, addr(7), &confirm.encode());
    assert!(b.core.chat_peer(addr(7)).is_some());
}

#[test]
fn a_line_to_a_chat_peer_that_left_is_refused_not_sent_as_plain_text() {
    let (mut a, mut b, t) = pair(None);
    a.core.stop(t);
    settle(&mut [&mut a, &mut b], t);
    assert_eq!(b.count(|e| matches!(e, Event::Leave { .. })), 1);
    assert_eq!(
        b.core.send(t, a.addr, "hello?"),
        Err(SendError::Gone(a.addr))
    );
    let out = b.transmits();
    assert!(
        out.iter()
            .all(|x| x.bytes.starts_with(b"corokit-chat/2 hello")),
        "only a greeting went out"
    );
}

#[test]
fn typed_text_that_looks_like_the_protocol_is_shown_as_typed() {
    let t = Instant::now();
    let mut b = Host::new(2, 2, None, t);
    b.core
        .handle_datagram(t, addr(9), b"corokit-chat/2 hello #this is just text");
    b.take_events();
    assert_eq!(
        b.messages(),
        [(
            addr(9),
            "corokit-chat/2 hello #this is just text".to_string()
        )]
    );
}
