//! Files between chats end to end: real processes, real TCP and UDP on loopback; what
//! arrives is compared byte for byte, and hostile requesters and senders are played by the
//! test itself.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use corokit_chat::ipmsg::packet::{self, mode, opt};
use may::net::{TcpListener, TcpStream, UdpSocket};
use ring::digest;
use serde_json::Value;

mod support;
use support::*;

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    corokit_common::text::hex(digest::digest(&digest::SHA256, &bytes).as_ref())
}

/// A file of `len` deterministic but varied bytes.
fn make_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    let mut x: u32 = 0x9e37_79b9 ^ len as u32;
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let n = left.min(block.len());
        f.write_all(&block[..n]).unwrap();
        left -= n;
    }
    path
}

/// Two chats that know each other: (receiver ana, sender bob).
fn pair(extra: &[&str], env: &[(&str, &str)]) -> (Chat, Chat) {
    let mut ana_args = vec!["--name", "ana"];
    ana_args.extend_from_slice(extra);
    let mut ana = Chat::start_with(&ana_args, env);
    let to = ana.addr.to_string();
    let mut bob_args = vec!["--name", "bob", "--to", &to];
    bob_args.extend_from_slice(extra);
    let mut bob = Chat::start_with(&bob_args, env);
    ana.joined(bob.addr);
    bob.joined(ana.addr);
    (ana, bob)
}

/// Bob offers `path`; ana gets the offer and its id.
fn offer(ana: &mut Chat, bob: &mut Chat, path: &Path) -> Value {
    bob.say(&format!("/send ana \"{}\"", path.display()));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    ana.wait_for("the offer", |v| {
        v["event"] == "file_offer" && v["files"][0]["name"] == name.as_str()
    })
}

fn get(ana: &mut Chat, id: &Value, into: &Path) -> Value {
    ana.say(&format!("/get {id} \"{}\"", into.display()));
    ana.wait_for("the file", |v| {
        (v["event"] == "file_done" || v["event"] == "file_failed") && v["id"] == *id
    })
}

#[test]
fn files_of_every_size_arrive_whole_and_only_whole_ones_get_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("in");
    let (mut ana, mut bob) = pair(&[], &[]);
    for (name, len) in [("empty", 0), ("one", 1), ("big.bin", 200 << 20)] {
        let path = make_file(dir.path(), name, len);
        let o = offer(&mut ana, &mut bob, &path);
        assert_eq!(o["files"][0]["size"], len);
        let done = get(&mut ana, &o["id"], &into);
        assert_eq!(done["event"], "file_done", "{done}");
        let saved = PathBuf::from(done["path"].as_str().unwrap());
        assert_eq!(saved, into.join(name));
        assert_eq!(sha256(&saved), sha256(&path), "{name} differs");
        bob.wait_for("the sender told", |v| {
            v["event"] == "file_sent" && v["name"] == name && v["all"] == true
        });
    }
    // The same file again gets a new name: nothing is overwritten.
    let path = dir.path().join("one");
    let o = offer(&mut ana, &mut bob, &path);
    let done = get(&mut ana, &o["id"], &into);
    assert_eq!(
        done["path"],
        into.join("one").to_str().unwrap(),
        "already had: {done}"
    );
    std::fs::write(into.join("mine.txt"), b"the user's").unwrap();
    let theirs = make_file(dir.path(), "mine.txt", 10);
    let o = offer(&mut ana, &mut bob, &theirs);
    let done = get(&mut ana, &o["id"], &into);
    assert_eq!(done["path"], into.join("mine.1.txt").to_str().unwrap());
    assert_eq!(std::fs::read(into.join("mine.txt")).unwrap(), b"the user's");
    let leftovers: Vec<_> = std::fs::read_dir(&into)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Leaves in `into` what a receiver killed half way through `path` from `from` leaves: its
/// first half as `NAME.part`, with the state that says what it is a part of.
fn half_received(into: &Path, path: &Path, from: &str, sha: bool) -> u64 {
    std::fs::create_dir_all(into).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let half = bytes.len() / 2;
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let part = into.join(format!("{name}.part"));
    std::fs::write(&part, &bytes[..half]).unwrap();
    let mtime = std::fs::metadata(path)
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut state = serde_json::json!({
        "from": from, "name": name, "size": bytes.len(), "mtime": mtime, "complete": false });
    if sha {
        state["sha256"] = serde_json::json!(sha256(path));
    }
    rustix::fs::setxattr(
        &part,
        "user.corokit.chat",
        state.to_string().as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    half as u64
}

#[test]
fn a_partial_file_is_continued_from_a_new_run_and_another_version_never_spliced() {
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("in");
    let size = 40 << 20;
    let path = make_file(dir.path(), "half.bin", size);
    let half = half_received(&into, &path, "127.0.0.1", true);
    // A new run of each: the same file offered again is continued where it stopped.
    let (mut ana, mut bob) = pair(&[], &[]);
    let o = offer(&mut ana, &mut bob, &path);
    let done = get(&mut ana, &o["id"], &into);
    assert_eq!(done["event"], "file_done", "{done}");
    assert_eq!(done["fetched"].as_u64().unwrap(), size as u64 - half);
    assert_eq!(sha256(&into.join("half.bin")), sha256(&path));
    // The file changed since a partial copy of it was left: that copy is not continued.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let path = make_file(&other, "v.bin", 1 << 20);
    half_received(&into, &path, "127.0.0.1", true);
    let path = make_file(dir.path(), "v.bin", 1 << 20 | 7);
    let o = offer(&mut ana, &mut bob, &path);
    let done = get(&mut ana, &o["id"], &into);
    assert_eq!(
        done["path"],
        into.join("v.1.bin").to_str().unwrap(),
        "{done}"
    );
    assert_eq!(sha256(&into.join("v.1.bin")), sha256(&path));
}

#[test]
fn files_go_sealed_with_a_key_and_a_keyless_requester_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("in");
    let key = [("CHAT_KEY", "shared secret")];
    let (mut ana, mut bob) = pair(&[], &key);
    let path = make_file(dir.path(), "secret.bin", 3 << 20);
    let o = offer(&mut ana, &mut bob, &path);
    let done = get(&mut ana, &o["id"], &into);
    assert_eq!(done["event"], "file_done", "{done}");
    assert_eq!(sha256(&into.join("secret.bin")), sha256(&path));
    // A plain request to the sealed listener is not answered.
    let mut conn = TcpStream::connect(bob.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = packet::write(1, b"x", b"y", mode::GETFILEDATA, b"0:a00000:0:");
    let _ = conn.write_all(&req);
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got);
    assert!(
        got.len() <= 16,
        "{} bytes to a keyless requester",
        got.len()
    );
}

/// Sends one raw request from `local` (a loopback address) to the chat at `to`; the bytes
/// that came back.
fn raw_request(local: [u8; 4], to: SocketAddr, command: u32, extra: &[u8]) -> Vec<u8> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((local, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut conn: std::net::TcpStream = s.into();
    let req = packet::write(1, b"x", b"y", command, extra);
    let _ = conn.write_all(&req);
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got);
    got
}

#[test]
fn a_hostile_requester_gets_nothing_it_was_not_offered() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ana, mut bob) = pair(&[], &[]);
    let path = make_file(dir.path(), "only-for-ana.bin", 1000);
    bob.say(&format!("/send ana \"{}\"", path.display()));
    let line = bob.wait_for("the offer number", |v| {
        v.as_str().is_some_and(|l| l.contains("(offer "))
    });
    let offer = line.as_str().unwrap().split("(offer ").nth(1).unwrap();
    let offer = offer.split(';').next().unwrap().to_string();
    ana.wait_for("the offer", |v| v["event"] == "file_offer");
    let to = SocketAddr::from(([127, 0, 0, 1], bob.addr.port()));
    // The offer was made to 127.0.0.1; another host asks for it.
    let stolen = raw_request(
        [127, 0, 0, 2],
        to,
        mode::GETFILEDATA,
        format!("{offer}:a00000:0:").as_bytes(),
    );
    assert!(stolen.is_empty(), "another host got {} bytes", stolen.len());
    for extra in [
        "0:a00000:0:".to_string(),                   // never offered
        format!("{offer}:a00001:0:"),                // no such file
        format!("{offer}:a00000:-1:"),               // negative offset
        format!("{offer}:a00000:ffffffffffffffff:"), // past the end
        format!("{offer}:../../etc/passwd:0:"),      // a path
        format!("{offer}:a00000:"),                  // a file asked as a directory
    ] {
        let command = if extra.matches(':').count() == 2 {
            mode::GETDIRFILES
        } else {
            mode::GETFILEDATA
        };
        let got = raw_request([127, 0, 0, 1], to, command, extra.as_bytes());
        assert!(got.is_empty(), "{extra}: {} bytes", got.len());
    }
    // A host nothing was offered to cannot hold the serving slots: it is shut out at once.
    let squatters: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::from(([127, 0, 0, 9], 0)).into())
                .unwrap();
            s.connect(&to.into()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.into()
        })
        .collect();
    for mut s in squatters {
        let mut b = [0u8; 1];
        // Closed by the server (end of stream or reset), not kept waiting until our timeout.
        let closed = match s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        };
        assert!(closed, "a squatter was let in");
    }
    // What was offered, asked right, from the right host: served from the offset.
    let got = raw_request(
        [127, 0, 0, 1],
        to,
        mode::GETFILEDATA,
        format!("{offer}:a00000:3e8:").as_bytes(),
    );
    assert!(got.is_empty(), "an offset at the end sends nothing");
    let got = raw_request(
        [127, 0, 0, 1],
        to,
        mode::GETFILEDATA,
        format!("{offer}:a00000:10:").as_bytes(),
    );
    assert!(
        got == std::fs::read(&path).unwrap()[16..],
        "{} bytes",
        got.len()
    );
}

/// A scripted IP Messenger client on 127.0.0.2, UDP and TCP on the chat's IPMsg port.
struct IpmsgPeer {
    udp: UdpSocket,
    tcp: TcpListener,
    number: u64,
}

impl IpmsgPeer {
    fn new(port: u16) -> IpmsgPeer {
        corokit_common::init();
        let udp = UdpSocket::bind(("127.0.0.2", port)).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        IpmsgPeer {
            udp,
            tcp: TcpListener::bind(("127.0.0.2", port)).unwrap(),
            number: 5000,
        }
    }

    fn send(&mut self, to: SocketAddr, command: u32, extra: &[u8]) -> u64 {
        self.number += 1;
        let mut bytes = format!("1:{}:peer:box:{command}:", self.number).into_bytes();
        bytes.extend_from_slice(extra);
        self.udp.send_to(&bytes, to).unwrap();
        self.number
    }

    fn expect(&self, what: &str, m: u32) -> packet::Packet {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.udp.recv_from(&mut buf) {
                let p = packet::parse(&buf[..n]).unwrap();
                if p.mode() == m {
                    return p;
                }
            }
        }
        panic!("{what} did not arrive")
    }
}

#[test]
fn an_ipmsg_client_sends_and_receives_files() {
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("in");
    let (mut chat, port) = chat_with_ipmsg(&["--name", "ana"], &[]);
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let mut peer = IpmsgPeer::new(port);
    peer.send(to, mode::BR_ENTRY, b"tux\0\0");
    peer.expect("ANSENTRY", mode::ANSENTRY);
    chat.wait_for("tux", |v| v["event"] == "join");

    // Its offer: decimal ids as IP Messenger writes them, `::` in a name, a lying size, a
    // name that climbs out, and a file it will not serve whole.
    let content = b"0123456789".repeat(100);
    let list = format!(
        "11:a::b.txt:{:x}:0:1:\x0712:../../evil.sh:5:0:1:\x0713:short.bin:64:0:1:\x07\
         14:../../climb.sh:5:0:1:\x07",
        content.len()
    );
    let n = peer.send(
        to,
        mode::SENDMSG | opt::SENDCHECKOPT | opt::FILEATTACHOPT,
        &[b"files for you\0".as_slice(), list.as_bytes(), b"\0"].concat(),
    );
    let o = chat.wait_for("the offer", |v| v["event"] == "file_offer");
    assert_eq!(o["files"][0]["name"], "a:b.txt");
    assert_eq!(o["text"], "files for you");
    // Serve each request the way IP Messenger does: hex ids, the bytes, close.
    let server = std::thread::spawn(move || {
        let mut asked = Vec::new();
        for _ in 0..4 {
            let Ok((mut conn, _)) = peer.tcp.accept() else {
                break;
            };
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 512];
            let k = conn.read(&mut buf).unwrap_or(0);
            let req = packet::parse(&buf[..k]).unwrap();
            let fields: Vec<String> = String::from_utf8_lossy(&req.extra)
                .split(':')
                .map(str::to_string)
                .collect();
            assert_eq!(
                u64::from_str_radix(&fields[0], 16).unwrap(),
                n,
                "the offer's number"
            );
            asked.push(fields[1].clone());
            let body: Vec<u8> = match fields[1].as_str() {
                "b" => b"0123456789".repeat(100),
                "c" => b"EVIL".to_vec(), // five offered, four sent
                "e" => b"climb".to_vec(),
                _ => vec![b'x'; 50], // 100 offered, 50 sent
            };
            let _ = conn.write_all(&body);
        }
        (peer, asked)
    });
    chat.say(&format!("/get {} \"{}\"", o["id"], into.display()));
    let mut results = Vec::new();
    while results.len() < 4 {
        let v = chat.wait_for("a file's end", |v| {
            (v["event"] == "file_done" || v["event"] == "file_failed")
                && !results.iter().any(|r: &Value| r["name"] == v["name"])
        });
        results.push(v);
    }
    let (_peer, mut asked) = server.join().unwrap();
    asked.sort();
    assert_eq!(asked, ["b", "c", "d", "e"], "file ids asked in hex");
    let by_name = |n: &str| results.iter().find(|r| r["name"] == n).unwrap().clone();
    assert_eq!(by_name("a:b.txt")["event"], "file_done");
    assert!(std::fs::read(into.join("a:b.txt")).unwrap() == content);
    assert_eq!(
        by_name("../../evil.sh")["event"],
        "file_failed",
        "a short file is not whole"
    );
    assert_eq!(by_name("short.bin")["event"], "file_failed");
    assert!(!dir.path().join("evil.sh").exists());
    // A name that climbs out, sent whole: saved inside, under a safe name, nothing outside.
    assert_eq!(by_name("../../climb.sh")["event"], "file_done");
    assert_eq!(
        std::fs::read(into.join("_._.._climb.sh")).unwrap(),
        b"climb"
    );
    let outside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("climb"))
        .collect();
    assert!(outside.is_empty(), "{outside:?}");
    let names: Vec<String> = std::fs::read_dir(&into)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n == "short.bin" || n == "_._.._evil.sh"),
        "{names:?}"
    );
    // 1,001 files in one offer: refused as a whole, said once.
    let many: String = (0..1001).map(|i| format!("{i}:f{i}:1:0:1:\x07")).collect();
    let mut peer = _peer;
    peer.send(
        to,
        mode::SENDMSG | opt::FILEATTACHOPT,
        &[b"\0".as_slice(), many.as_bytes(), b"\0"].concat(),
    );
    chat.wait_for("the refusal", |v| {
        v["event"] == "notice" && v["text"].as_str().is_some_and(|t| t.contains("1000 files"))
    });
}

#[test]
fn an_ipmsg_client_fetches_what_chat_offers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut chat, port) = chat_with_ipmsg(&["--name", "ana"], &[]);
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let mut peer = IpmsgPeer::new(port);
    peer.send(to, mode::BR_ENTRY, b"tux\0\0");
    peer.expect("ANSENTRY", mode::ANSENTRY);
    chat.wait_for("tux", |v| v["event"] == "join");
    let path = make_file(dir.path(), "re:port.pdf", 300_000);
    chat.say(&format!("/send tux \"{}\"", path.display()));
    let offer = peer.expect("the offer", mode::SENDMSG);
    assert!(offer.has(opt::FILEATTACHOPT));
    peer.send(to, mode::RECVMSG, format!("{}\0", offer.number).as_bytes());
    // Another host declines it, forging the release (packet numbers are guessable): the
    // offer stays. The peer's GETINFO after it comes back once the release was handled.
    let forger = UdpSocket::bind("127.0.0.3:0").unwrap();
    let release = format!("1:77:x:y:{}:{}\0", mode::RELEASEFILES, offer.number);
    forger.send_to(release.as_bytes(), to).unwrap();
    peer.send(to, mode::GETINFO, b"");
    peer.expect("SENDINFO", mode::SENDINFO);
    let list = &offer.extra[offer.text().len() + 1..];
    let files = corokit_chat::transfer::offer::parse_files(list, |b| {
        String::from_utf8_lossy(b).into_owned()
    })
    .unwrap();
    assert_eq!(files[0].name, "re:port.pdf");
    assert!(String::from_utf8_lossy(list).contains("re::port.pdf"));
    // Asked as IP Messenger asks, from its host: the file id in hex, from an offset.
    let extra = format!("{:x}:{:x}:{:x}:", offer.number, files[0].id, 100);
    let got = raw_request([127, 0, 0, 2], to, mode::GETFILEDATA, extra.as_bytes());
    assert!(
        got == std::fs::read(&path).unwrap()[100..],
        "{} bytes",
        got.len()
    );
    // The same from another host: nothing.
    let got = raw_request([127, 0, 0, 3], to, mode::GETFILEDATA, extra.as_bytes());
    assert!(got.is_empty());
    chat.wait_for("told it was fetched", |v| v["event"] == "file_sent");
    assert!(!chat.seen.iter().any(|v| v["event"] == "file_declined"));
}

#[test]
fn a_forged_ipmsg_release_never_ends_an_offer_made_over_sealed_chat() {
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("in");
    let key = [("CHAT_KEY", "shared secret")];
    // Keyed, and speaking IP Messenger too (--ipmsg).
    let (mut bob, ipmsg_port) = chat_with_ipmsg(&["--name", "bob", "--ipmsg"], &key);
    let to = bob.addr.to_string();
    let mut ana = Chat::start_with(&["--name", "ana", "--to", &to], &key);
    ana.joined(bob.addr);
    bob.joined(ana.addr);
    let path = make_file(dir.path(), "kept.bin", 100_000);
    let o = offer(&mut ana, &mut bob, &path);
    // The offer's number, as an attacker might learn it (it travels sealed).
    bob.say("/files");
    let listing = bob.wait_for("the listing", |v| {
        v.as_str().is_some_and(|t| t.contains("(offer "))
    });
    let listing = listing.as_str().unwrap();
    let hex = listing
        .split("(offer ")
        .nth(1)
        .unwrap()
        .split([')', ';'])
        .next()
        .unwrap();
    let number = u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{listing:?}: {e}"));
    // From ana's own host, an IP Messenger release of it (not authenticated), to bob's IP
    // Messenger socket.
    let bob_ipmsg = SocketAddr::from(([127, 0, 0, 1], ipmsg_port));
    let forger = UdpSocket::bind("127.0.0.1:0").unwrap();
    forger
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let release = format!("1:100:x:y:{}:{number}\0", mode::RELEASEFILES);
    forger.send_to(release.as_bytes(), bob_ipmsg).unwrap();
    // Handled in order: an entry sent after them is answered once they were.
    let entry = format!("1:99:x:y:{}:x\0\0", mode::BR_ENTRY);
    forger.send_to(entry.as_bytes(), bob_ipmsg).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 65536];
    loop {
        assert!(Instant::now() < deadline, "bob never answered the entry");
        if let Ok((n, _)) = forger.recv_from(&mut buf) {
            if packet::parse(&buf[..n]).is_ok_and(|p| p.mode() == mode::ANSENTRY) {
                break;
            }
        }
    }
    let done = get(&mut ana, &o["id"], &into);
    assert_eq!(done["event"], "file_done", "{done}");
    assert_eq!(sha256(&into.join("kept.bin")), sha256(&path));
    assert!(!bob.seen.iter().any(|v| v["event"] == "file_declined"));
}

#[test]
fn chat_send_file_exits_once_the_peer_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("in");
    let send = |to: SocketAddr, path: &Path, key: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_chat"))
            .args(["send", &to.to_string(), "--file", path.to_str().unwrap()])
            .args(["--bind", "127.0.0.1", "--no-ipmsg", "--name", "script"])
            .args(["--wait", "30"])
            .env_clear()
            .envs(key.iter().copied())
            .spawn()
            .unwrap()
    };
    // With a key the stream ends with a sealed end frame: chat send must not exit before it.
    for (key, len) in [
        (&[][..], 2 << 20),
        (&[("CHAT_KEY", "shared secret")][..], 32 << 20),
    ] {
        let mut ana = Chat::start_with(&["--name", "ana"], key);
        let path = make_file(dir.path(), &format!("script{len}.bin"), len);
        let mut child = send(ana.addr, &path, key);
        let o = ana.wait_for("the offer", |v| v["event"] == "file_offer");
        let done = get(&mut ana, &o["id"], &into);
        assert_eq!(done["event"], "file_done", "{done}");
        assert_eq!(
            sha256(&PathBuf::from(done["path"].as_str().unwrap())),
            sha256(&path)
        );
        let deadline = Instant::now() + WAIT;
        let code = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status.code();
            }
            assert!(Instant::now() < deadline, "chat send did not end");
            corokit_common::sleep(Duration::from_millis(20));
        };
        assert_eq!(code, Some(0));
        if key.is_empty() {
            // Declined: 1.
            let mut child = send(ana.addr, &path, key);
            let o = ana.wait_for("the second offer", |v| {
                v["event"] == "file_offer" && v["id"] != o["id"]
            });
            ana.say(&format!("/decline {}", o["id"]));
            assert_eq!(child.wait().unwrap().code(), Some(1));
        }
    }
}

/// Every file under `dir`, by path relative to it, with its bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A received file must leave `--min-free` on its disk (a directory offered over IP
/// Messenger says nothing of its size, and its sender could stream until the disk is full):
/// a file that would not is refused before any of it is written, in a directory too.
#[test]
fn received_files_leave_the_space_asked_free_on_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("in");
    let src = dir.path().join("tree");
    std::fs::create_dir_all(&src).unwrap();
    make_file(&src, "a", 1000);
    let path = make_file(dir.path(), "one.bin", 100_000);
    let (mut ana, mut bob) = pair(&["--min-free", "1000T"], &[]);
    for offered in [&path, &src] {
        let o = offer(&mut ana, &mut bob, offered);
        let failed = get(&mut ana, &o["id"], &into);
        assert_eq!(failed["event"], "file_failed", "{failed}");
        let why = failed["error"].as_str().unwrap();
        assert!(why.contains("--min-free"), "{why}");
    }
    let mut left: Vec<String> = std::fs::read_dir(&into)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // The directory's own `.part`, empty; nothing else, and nothing under a final name.
    assert_eq!(left, ["tree.part"]);
    assert_eq!(
        std::fs::read_dir(into.join("tree.part")).unwrap().count(),
        0
    );
}

#[test]
fn a_directory_gets_its_name_only_whole_and_never_into_one_already_there() {
    use corokit_chat::transfer::offer::{write_dir_header, DIRECTORY, REGULAR, RETURN_TO_PARENT};
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("in");
    let src = dir.path().join("tree");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    make_file(&src, "a", 1000);
    make_file(&src.join("sub"), "b", 0);
    make_file(&src.join("sub/deeper"), "c", 70_000);
    // The user's own `tree` is not written into.
    std::fs::create_dir_all(into.join("tree")).unwrap();
    std::fs::write(into.join("tree/mine"), b"the user's").unwrap();
    let (mut ana, mut bob) = pair(&[], &[]);
    let o = offer(&mut ana, &mut bob, &src);
    assert_eq!(o["files"][0]["directory"], true);
    let done = get(&mut ana, &o["id"], &into);
    assert_eq!(done["event"], "file_done", "{done}");
    assert_eq!(done["path"], into.join("tree.1").to_str().unwrap());
    // Every byte of every file counted, also those that came with a header.
    assert_eq!(done["fetched"], 71_000, "{done}");
    assert_eq!(tree(&into.join("tree.1")), tree(&src));
    assert_eq!(
        tree(&into.join("tree")),
        [("mine".to_string(), b"the user's".to_vec())]
    );
    drop((ana, bob));

    // An IP Messenger client whose directory stream breaks off: no `pics` appears.
    let (mut chat, port) = chat_with_ipmsg(&["--name", "ana"], &[]);
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let mut peer = IpmsgPeer::new(port);
    peer.send(to, mode::BR_ENTRY, b"tux\0\0");
    peer.expect("ANSENTRY", mode::ANSENTRY);
    chat.wait_for("tux", |v| v["event"] == "join");
    let whole = [
        write_dir_header(b"pics", 0, DIRECTORY, 1),
        write_dir_header(b"cat.jpg", 100, REGULAR, 1),
        vec![b'm'; 100],
        write_dir_header(b".", 0, RETURN_TO_PARENT, 1),
    ];
    let mut last = Value::Null;
    for round in 0..2 {
        peer.send(
            to,
            mode::SENDMSG | opt::FILEATTACHOPT,
            b"\x001:pics:0:1:2:\x07\0",
        );
        let o = chat.wait_for("the offer", |v| {
            v["event"] == "file_offer" && v["id"] != last
        });
        last = o["id"].clone();
        chat.say(&format!("/get {} \"{}\"", o["id"], into.display()));
        let (mut conn, _) = peer.tcp.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let k = conn.read(&mut buf).unwrap();
        assert_eq!(packet::parse(&buf[..k]).unwrap().mode(), mode::GETDIRFILES);
        let mut stream = whole.concat();
        if round == 0 {
            stream.truncate(whole[0].len() + whole[1].len() + 10); // ten bytes of the hundred
        }
        conn.write_all(&stream).unwrap();
        drop(conn);
        let end = chat.wait_for("its end", |v| {
            (v["event"] == "file_done" || v["event"] == "file_failed") && v["id"] == o["id"]
        });
        if round == 0 {
            assert_eq!(end["event"], "file_failed", "{end}");
            assert!(
                !into.join("pics").exists(),
                "a broken directory got its name"
            );
        } else {
            assert_eq!(end["event"], "file_done", "{end}");
            let got = PathBuf::from(end["path"].as_str().unwrap());
            assert_eq!(tree(&got), [("cat.jpg".to_string(), vec![b'm'; 100])]);
        }
    }
}

#[test]
fn nothing_is_offered_when_another_program_holds_the_tcp_port() {
    // Whatever holds the port would answer the peer's requests in chat's name.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = make_file(dir.path(), "f", 10);
    let mut ana = Chat::start(&["--name", "ana"]);
    let to = ana.addr.to_string();
    let mut bob = Chat::start(&["--name", "bob", "--port", &port, "--to", &to]);
    bob.wait_for("the notice", |v| {
        v["event"] == "notice"
            && v["text"]
                .as_str()
                .is_some_and(|t| t.contains("cannot serve files"))
    });
    ana.joined(bob.addr);
    bob.joined(ana.addr);
    bob.say(&format!("/send ana \"{}\"", path.display()));
    bob.wait_for("the refusal", |v| {
        v.as_str()
            .is_some_and(|l| l.contains("nothing serves them"))
    });
    // One ordered stream: an offer sent before this line would have arrived before it.
    bob.say("/msg ana after");
    ana.wait_for("the line", |v| {
        v["event"] == "message" && v["text"] == "after"
    });
    assert!(!ana.seen.iter().any(|v| v["event"] == "file_offer"));
}

/// Serves one GETFILEDATA request as an IP Messenger client: `from` is where it starts in
/// `bytes` (`None`: the offset asked, `Some(0)`: from the start, as iptux does), and after
/// `upto` bytes of the file it stops sending but keeps the connection open. The offset asked.
fn serve_ipmsg(
    peer: &IpmsgPeer,
    bytes: &[u8],
    from: Option<usize>,
    upto: usize,
) -> (u64, TcpStream) {
    let (mut conn, _) = peer.tcp.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    let k = conn.read(&mut buf).unwrap();
    let req = packet::parse(&buf[..k]).unwrap();
    assert_eq!(req.mode(), mode::GETFILEDATA);
    let fields: Vec<String> = String::from_utf8_lossy(&req.extra)
        .split(':')
        .map(str::to_string)
        .collect();
    let asked = u64::from_str_radix(&fields[2], 16).unwrap();
    let start = from.unwrap_or(asked as usize);
    conn.write_all(&bytes[start..upto]).unwrap();
    (asked, conn)
}

/// One round of an IPMsg transfer: a chat run (the same one, or a new one after a kill),
/// the file offered again, `/get`, and the answer served from `from` up to `upto`.
struct Round {
    from: Option<usize>,
    upto: usize,
    /// The offset the chat must ask for.
    asked: u64,
    /// Kill the chat with the connection open (else close it, as a dropped connection).
    kill: bool,
    /// The `.part`'s length after the round (None: no `.part`, the file named).
    part: Option<u64>,
}

fn ipmsg_rounds(bytes: &[u8], rounds: &[Round]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("in");
    let size = bytes.len();
    let (first, port) = chat_with_ipmsg(&["--name", "ana"], &[]);
    let p = port.to_string();
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let mut peer = IpmsgPeer::new(port);
    let part = into.join("big.bin.part");
    let list = format!("0:big.bin:{size:x}:5f5e1000:1:\x07");
    let mut chat = Some(first);
    let mut ends = Vec::new();
    let mut offers = Vec::new();
    for r in rounds {
        let mut c = chat
            .take()
            .unwrap_or_else(|| Chat::start(&["--name", "ana", "--ipmsg-port", &p]));
        peer.send(to, mode::BR_ENTRY, b"tux\0\0");
        peer.expect("ANSENTRY", mode::ANSENTRY);
        c.wait_for("tux", |v| v["event"] == "join");
        peer.send(
            to,
            mode::SENDMSG | opt::FILEATTACHOPT,
            &[b"\0".as_slice(), list.as_bytes(), b"\0"].concat(),
        );
        let o = c.wait_for("the offer", |v| {
            v["event"] == "file_offer" && !offers.contains(&v["id"])
        });
        offers.push(o["id"].clone());
        c.say(&format!("/get {} \"{}\"", o["id"], into.display()));
        let (got, conn) = serve_ipmsg(&peer, bytes, r.from, r.upto);
        assert_eq!(got, r.asked, "the offset asked");
        if r.kill {
            let deadline = Instant::now() + WAIT;
            while std::fs::metadata(&part).map_or(0, |m| m.len()) < r.upto as u64 {
                assert!(
                    Instant::now() < deadline,
                    "the .part never reached {}",
                    r.upto
                );
                corokit_common::sleep(Duration::from_millis(10));
            }
            c.child.kill().unwrap();
            c.child.wait().unwrap();
            drop(conn);
            offers.clear(); // a new run numbers its offers from 1 again
        } else {
            drop(conn);
            let id = o["id"].clone();
            ends.push(c.wait_for("its end", |v| {
                (v["event"] == "file_done" || v["event"] == "file_failed") && v["id"] == id
            }));
            chat = Some(c);
        }
        let left = std::fs::metadata(&part).ok().map(|m| m.len());
        assert_eq!(left, r.part, "the .part after {:?}", ends.last());
        if r.part.is_none() && ends.last().is_some_and(|e| e["event"] == "file_done") {
            assert!(std::fs::read(into.join("big.bin")).unwrap() == bytes);
        } else {
            assert!(
                !into.join("big.bin").exists(),
                "a file got its name unfinished"
            );
        }
    }
    ends
}

#[test]
fn an_ipmsg_transfer_is_continued_whether_the_client_honours_offsets_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(make_file(dir.path(), "big.bin", 4 << 20)).unwrap();
    let (m, size) = (1usize << 20, 4usize << 20);
    let ends = ipmsg_rounds(
        &bytes,
        &[
            // A first run, killed with 1 MiB in.
            Round {
                from: Some(0),
                upto: m,
                asked: 0,
                kill: true,
                part: Some(m as u64),
            },
            // iptux: from 0 whatever was asked; the connection drops at 3.5 MiB.
            Round {
                from: Some(0),
                upto: 7 * m / 2,
                asked: m as u64,
                kill: false,
                part: Some(7 * m as u64 / 2),
            },
            // IP Messenger: from the offset asked.
            Round {
                from: None,
                upto: size,
                asked: 7 * m as u64 / 2,
                kill: false,
                part: None,
            },
        ],
    );
    assert_eq!(ends[0]["event"], "file_failed");
    assert_eq!(ends[1]["event"], "file_done", "{}", ends[1]);
    assert_eq!(ends[1]["fetched"].as_u64(), Some(m as u64 / 2));
}

#[test]
fn a_file_that_repeats_its_start_is_never_spliced_by_a_resume() {
    // 2 MiB of zeros, then 2 MiB of other bytes: the rest from 1 MiB starts like the file.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = vec![0u8; 2 << 20];
    bytes.extend(std::fs::read(make_file(dir.path(), "tail", 2 << 20)).unwrap());
    let m = 1usize << 20;
    let ends = ipmsg_rounds(
        &bytes,
        &[
            Round {
                from: Some(0),
                upto: m,
                asked: 0,
                kill: true,
                part: Some(m as u64),
            },
            // The rest, from the offset: it could as well be the start again, so nothing is
            // added, and the .part that can only be read both ways is dropped.
            Round {
                from: None,
                upto: 4 * m,
                asked: m as u64,
                kill: false,
                part: None,
            },
            // Then the whole file.
            Round {
                from: None,
                upto: 4 * m,
                asked: 0,
                kill: false,
                part: None,
            },
        ],
    );
    assert_eq!(ends[0]["event"], "file_failed");
    assert!(
        ends[0]["error"].as_str().unwrap().contains("could be"),
        "{}",
        ends[0]
    );
    assert_eq!(ends[1]["event"], "file_done", "{}", ends[1]);
}
