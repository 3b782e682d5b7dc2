//! The wire format between `chat` instances, version 2. Pure encoding and decoding: what a
//! datagram is, never what to do about it.
//!
//! A datagram that is neither of the two forms below is plain text from a plain peer (`nc -u`,
//! `socat`, a script).
//!
//! **Binary form**, sent only to an address that has proved it speaks the protocol:
//! ```text
//! magic    3  C6 4B 54          (0xC6 cannot start UTF-8 text)
//! version  1  2
//! kind     1  Hello 1 | Reply 2 | Bye 3 | Msg 4 | Ack 5 | Sealed 6 | Presence 7 | Refused 8
//!             | Ping 9
//! flags    1  Reply: bit 1 = "your address is verified"; others 0
//! src      8  the sender's instance: random, fixed for the life of its process (its run)
//! dst      8  the receiver's instance as the sender knows it; 0 when unknown (announcements)
//! then by kind:
//! Hello, Reply, Presence
//!          token 8   a challenge for the receiver to echo (0: none)
//!          echo  8   the last token the receiver sent to this address (0: none)
//!          nick  1+n length-prefixed UTF-8, at most 64 bytes
//! Msg      seq 8, base 8, frag 2, frags 2, then (first fragment only) nick 1+n, then the text
//!          bytes; `seq` counts datagrams of one sender run to one receiver run from 1, `base`
//!          is the lowest sequence the sender still sends (everything below it is settled)
//! Ack      seq 8 (the datagram received, held until the ones before it arrive; 0: none),
//!          cumulative 8 (every sequence up to it was delivered to the user, in order),
//!          window 8 (the highest sequence the receiver has room for)
//! Refused  reason 1: 1 = this chat needs a key and the hello was not sealed with it,
//!          2 = this chat has no key and cannot open a sealed hello
//! Bye      nothing (an alias saying goodbye only takes that address away)
//! Ping     nothing: "answer me"; the answer is an Ack of sequence 0
//! ```
//! **Sealed**: with a shared key, every datagram is `magic, version, kind=6, flags=0, src 8,
//! counter 8` (22 bytes, authenticated) followed by the ChaCha20-Poly1305 box of the whole
//! binary datagram above; see [`crate::seal`].
//!
//! **Text form**, for every datagram to an address not yet known to speak the protocol
//! (announcements by broadcast and multicast, hellos to addresses given by hand, replies to
//! a hello from an unverified address): one short line of printable ASCII that a plain peer
//! reading strict UTF-8 can print, ending in the binary (or sealed) datagram in base64url:
//! ```text
//! corokit-chat/2 hello from alice #xkVUAgEA…
//! ```
//! Version 1 (no text form, no `dst`, no challenge) is not understood by version 2.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// The first bytes of every binary datagram.
pub const MAGIC: &[u8; 3] = b"\xC6KT";
pub const VERSION: u8 = 2;
/// The start of every text-form datagram.
pub const TEXT_PREFIX: &str = "corokit-chat/2 ";
/// Longest nickname on the wire, in bytes.
pub const MAX_NICK: usize = 64;
/// The common header: magic, version, kind, flags, src, dst.
pub const HEADER: usize = 3 + 1 + 1 + 1 + 8 + 8;
/// Msg fields after the header: seq, base, frag, frags.
const MSG_FIELDS: usize = 8 + 8 + 2 + 2;
/// Largest datagram we send: fits any IPv6 path (1280) with room for the seal.
pub const MAX_DATAGRAM: usize = 1200;
/// Largest datagram we accept from a chat peer (a sealed [`MAX_DATAGRAM`]); anything longer
/// is not from a version-2 chat and would only cost memory.
pub const MAX_RECEIVED: usize = MAX_DATAGRAM + crate::seal::OVERHEAD;
/// Largest message text: 64 KiB.
pub const MAX_TEXT: usize = 64 * 1024;
/// Most fragments a message can have: a longest text in fragments of [`fragment_size`].
pub const MAX_FRAGS: u16 = 64;
/// Longest text-form datagram we accept: a plain peer's line is anything, but an announcement
/// is short.
const MAX_TEXT_FORM: usize = 1023;

/// Reply flag: the sender has verified the receiver's address.
pub const FLAG_VERIFIED: u8 = 0x02;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Hello = 1,
    Reply = 2,
    Bye = 3,
    Msg = 4,
    Ack = 5,
    Sealed = 6,
    Presence = 7,
    Refused = 8,
    Ping = 9,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Reply,
            3 => Kind::Bye,
            4 => Kind::Msg,
            5 => Kind::Ack,
            6 => Kind::Sealed,
            7 => Kind::Presence,
            8 => Kind::Refused,
            9 => Kind::Ping,
            _ => return None,
        })
    }

    /// Kinds that may travel in text form, to an address not yet verified.
    pub fn is_handshake(self) -> bool {
        matches!(
            self,
            Kind::Hello | Kind::Reply | Kind::Bye | Kind::Refused | Kind::Sealed
        )
    }
}

/// Why a chat refused our hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It has a key and our hello was not sealed with it.
    NeedsKey,
    /// It has no key and our hello was sealed.
    HasNoKey,
}

impl Refusal {
    fn code(self) -> u8 {
        match self {
            Refusal::NeedsKey => 1,
            Refusal::HasNoKey => 2,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Refusal::NeedsKey => "it uses a key, and ours is missing or different",
            Refusal::HasNoKey => "it has no key, and we only speak encrypted",
        }
    }
}

/// What a datagram carries after the header.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// Hello, Reply and Presence.
    Greeting {
        token: u64,
        echo: u64,
        nick: String,
    },
    /// Bye and Ping.
    Empty,
    Msg {
        seq: u64,
        base: u64,
        frag: u16,
        frags: u16,
        /// The sender's nickname, on the first fragment of a message.
        nick: Option<String>,
        text: Vec<u8>,
    },
    Ack {
        seq: u64,
        cumulative: u64,
        window: u64,
    },
    Refused(Refusal),
}

/// One binary datagram, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    pub kind: Kind,
    pub flags: u8,
    pub src: u64,
    pub dst: u64,
    pub body: Body,
}

impl Packet {
    pub fn greeting(kind: Kind, src: u64, dst: u64, token: u64, echo: u64, nick: &str) -> Self {
        Packet {
            kind,
            flags: 0,
            src,
            dst,
            body: Body::Greeting {
                token,
                echo,
                nick: truncate_nick(nick).to_string(),
            },
        }
    }

    pub fn bye(src: u64, dst: u64) -> Self {
        Packet {
            kind: Kind::Bye,
            flags: 0,
            src,
            dst,
            body: Body::Empty,
        }
    }

    pub fn ping(src: u64, dst: u64) -> Self {
        Packet {
            kind: Kind::Ping,
            body: Body::Empty,
            ..Packet::bye(src, dst)
        }
    }

    pub fn ack(src: u64, dst: u64, seq: u64, cumulative: u64, window: u64) -> Self {
        Packet {
            kind: Kind::Ack,
            flags: 0,
            src,
            dst,
            body: Body::Ack {
                seq,
                cumulative,
                window,
            },
        }
    }

    pub fn refused(src: u64, why: Refusal) -> Self {
        Packet {
            kind: Kind::Refused,
            flags: 0,
            src,
            dst: 0,
            body: Body::Refused(why),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 64);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.kind as u8);
        out.push(self.flags);
        out.extend_from_slice(&self.src.to_be_bytes());
        out.extend_from_slice(&self.dst.to_be_bytes());
        match &self.body {
            Body::Greeting { token, echo, nick } => {
                out.extend_from_slice(&token.to_be_bytes());
                out.extend_from_slice(&echo.to_be_bytes());
                push_nick(&mut out, nick);
            }
            Body::Empty => {}
            Body::Msg {
                seq,
                base,
                frag,
                frags,
                nick,
                text,
            } => {
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&base.to_be_bytes());
                out.extend_from_slice(&frag.to_be_bytes());
                out.extend_from_slice(&frags.to_be_bytes());
                if *frag == 0 {
                    push_nick(&mut out, nick.as_deref().unwrap_or(""));
                }
                out.extend_from_slice(text);
            }
            Body::Ack {
                seq,
                cumulative,
                window,
            } => {
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&cumulative.to_be_bytes());
                out.extend_from_slice(&window.to_be_bytes());
            }
            Body::Refused(why) => out.push(why.code()),
        }
        out
    }
}

fn push_nick(out: &mut Vec<u8>, nick: &str) {
    let nick = truncate_nick(nick);
    out.push(nick.len() as u8);
    out.extend_from_slice(nick.as_bytes());
}

/// Rewrites the `base` field of an encoded Msg (retransmissions carry the current one).
pub fn set_base(encoded: &mut [u8], base: u64) {
    if encoded.len() >= HEADER + MSG_FIELDS && encoded[4] == Kind::Msg as u8 {
        encoded[HEADER + 8..HEADER + 16].copy_from_slice(&base.to_be_bytes());
    }
}

/// What a received datagram is.
#[derive(Debug, PartialEq)]
pub enum Datagram {
    /// Not the protocol: text from a plain peer.
    Plain,
    /// A sealed datagram (bytes to open with the key), and whether it came in text form.
    Sealed {
        bytes: Vec<u8>,
        text_form: bool,
    },
    Packet {
        packet: Packet,
        text_form: bool,
    },
    /// Starts like the protocol but does not parse.
    Malformed(Malformed),
}

/// Why a protocol datagram was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum Malformed {
    #[error("from a chat speaking protocol version 1, which this one does not understand")]
    Version1,
    #[error("unknown protocol version")]
    UnknownVersion,
    #[error("unknown kind")]
    UnknownKind,
    #[error("too short")]
    TooShort,
    #[error("too long")]
    TooLong,
    #[error("bad nickname")]
    BadNick,
    #[error("bad fragment numbers")]
    BadFragments,
    #[error("a kind that never comes in text form")]
    NotTextForm,
    #[error("not the binary form")]
    BadTextForm,
}

pub fn decode(bytes: &[u8]) -> Datagram {
    // Something that only looks like the text form (a person typing our prefix) is a line
    // of text: only a payload that decodes to our binary form is the protocol.
    if let Some(Some(inner)) = text_form_payload(bytes) {
        if inner.starts_with(MAGIC) {
            return match decode_binary(&inner, true) {
                Datagram::Packet { packet, .. } if !packet.kind.is_handshake() => {
                    Datagram::Malformed(Malformed::NotTextForm)
                }
                other => other,
            };
        }
    }
    if !bytes.starts_with(MAGIC) {
        return Datagram::Plain;
    }
    decode_binary(bytes, false)
}

/// The base64 payload of a text-form datagram: `None` when `bytes` is not one, `Some(None)`
/// when it claims to be and is damaged.
fn text_form_payload(bytes: &[u8]) -> Option<Option<Vec<u8>>> {
    if !bytes.starts_with(TEXT_PREFIX.as_bytes()) {
        return None;
    }
    let hash = bytes.iter().rposition(|&b| b == b'#')?;
    if bytes.len() > MAX_TEXT_FORM {
        return None;
    }
    Some(URL_SAFE_NO_PAD.decode(&bytes[hash + 1..]).ok())
}

fn decode_binary(bytes: &[u8], text_form: bool) -> Datagram {
    let malformed = Datagram::Malformed;
    if !bytes.starts_with(MAGIC) {
        return malformed(Malformed::BadTextForm);
    }
    if bytes.len() < 5 {
        return malformed(Malformed::TooShort);
    }
    match bytes[3] {
        VERSION => {}
        1 => return malformed(Malformed::Version1),
        _ => return malformed(Malformed::UnknownVersion),
    }
    let Some(kind) = Kind::from_u8(bytes[4]) else {
        return malformed(Malformed::UnknownKind);
    };
    if bytes.len() > MAX_RECEIVED {
        return malformed(Malformed::TooLong);
    }
    if kind == Kind::Sealed {
        return if bytes.len() < crate::seal::OVERHEAD {
            malformed(Malformed::TooShort)
        } else {
            Datagram::Sealed {
                bytes: bytes.to_vec(),
                text_form,
            }
        };
    }
    match decode_packet(kind, bytes) {
        Ok(packet) => Datagram::Packet { packet, text_form },
        Err(why) => malformed(why),
    }
}

/// A reader over the bytes after the header.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.rest.len() < n {
            return Err(Malformed::TooShort);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn nick(&mut self) -> Result<String, Malformed> {
        let len = self.take(1)?[0] as usize;
        if len > MAX_NICK {
            return Err(Malformed::BadNick);
        }
        let bytes = self.take(len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn end(&self) -> Result<(), Malformed> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Malformed::TooLong)
        }
    }
}

/// Decodes the binary datagram `bytes`, whose kind byte says `kind`.
fn decode_packet(kind: Kind, bytes: &[u8]) -> Result<Packet, Malformed> {
    if bytes.len() < HEADER {
        return Err(Malformed::TooShort);
    }
    let mut f = Fields { rest: &bytes[6..] };
    let flags = bytes[5];
    let src = f.u64()?;
    let dst = f.u64()?;
    let body = match kind {
        Kind::Hello | Kind::Reply | Kind::Presence => {
            let token = f.u64()?;
            let echo = f.u64()?;
            let nick = f.nick()?;
            f.end()?;
            Body::Greeting { token, echo, nick }
        }
        Kind::Bye | Kind::Ping => {
            f.end()?;
            Body::Empty
        }
        Kind::Msg => {
            let seq = f.u64()?;
            let base = f.u64()?;
            let frag = f.u16()?;
            let frags = f.u16()?;
            if frags == 0 || frags > MAX_FRAGS || frag >= frags || seq == 0 || base > seq {
                return Err(Malformed::BadFragments);
            }
            let nick = if frag == 0 { Some(f.nick()?) } else { None };
            Body::Msg {
                seq,
                base,
                frag,
                frags,
                nick,
                text: f.rest.to_vec(),
            }
        }
        Kind::Ack => {
            let seq = f.u64()?;
            let cumulative = f.u64()?;
            let window = f.u64()?;
            f.end()?;
            Body::Ack {
                seq,
                cumulative,
                window,
            }
        }
        Kind::Refused => {
            let why = match f.take(1)?[0] {
                1 => Refusal::NeedsKey,
                2 => Refusal::HasNoKey,
                _ => return Err(Malformed::UnknownKind),
            };
            f.end()?;
            Body::Refused(why)
        }
        Kind::Sealed => unreachable!("sealed datagrams are opened before they are decoded"),
    };
    Ok(Packet {
        kind,
        flags,
        src,
        dst,
        body,
    })
}

/// A binary (or sealed) datagram wrapped in the text form, for an address not yet known to
/// speak the protocol. `nick`, when given, is shown readably (escaped) for plain readers.
pub fn text_form(kind: Kind, nick: Option<&str>, binary: &[u8]) -> Vec<u8> {
    let word = match kind {
        Kind::Hello => "hello",
        Kind::Reply => "reply",
        Kind::Bye => "bye",
        Kind::Refused => "refused",
        _ => "note",
    };
    let mut out = String::with_capacity(TEXT_PREFIX.len() + 96 + binary.len() * 4 / 3);
    out.push_str(TEXT_PREFIX);
    out.push_str(word);
    if let Some(nick) = nick {
        out.push_str(" from ");
        // Printable ASCII only, so a reader that cuts the datagram anywhere still has UTF-8.
        for c in truncate_nick(nick).chars() {
            if c.is_ascii_graphic() || c == ' ' {
                out.push(c);
            } else {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
        }
    }
    out.push_str(" #");
    URL_SAFE_NO_PAD.encode_string(binary, &mut out);
    out.into_bytes()
}

/// The nickname cut to [`MAX_NICK`] bytes on a character boundary.
pub fn truncate_nick(nick: &str) -> &str {
    if nick.len() <= MAX_NICK {
        return nick;
    }
    let mut end = MAX_NICK;
    while !nick.is_char_boundary(end) {
        end -= 1;
    }
    &nick[..end]
}

/// Text bytes per fragment, leaving room for the header, the nickname on the first fragment
/// and the seal.
pub fn fragment_size() -> usize {
    MAX_DATAGRAM - HEADER - MSG_FIELDS - 1 - MAX_NICK - crate::seal::OVERHEAD
}

/// Splits a message into fragments of at most `size` bytes, not inside a UTF-8 sequence
/// (each fragment of a text is text; a control message's leading 0xFF is a byte of its own).
pub fn fragments(bytes: &[u8], size: usize) -> Vec<&[u8]> {
    if bytes.is_empty() {
        return vec![bytes];
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let mut end = (start + size).min(bytes.len());
        while end < bytes.len() && end > start + 1 && bytes[end] & 0xC0 == 0x80 {
            end -= 1;
        }
        out.push(&bytes[start..end]);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(frag: u16, frags: u16) -> Packet {
        Packet {
            kind: Kind::Msg,
            flags: 0,
            src: 0x0102_0304_0506_0708,
            dst: 9,
            body: Body::Msg {
                seq: 42,
                base: 40,
                frag,
                frags,
                nick: (frag == 0).then(|| "ana@box".to_string()),
                text: "héllo".as_bytes().to_vec(),
            },
        }
    }

    fn packet(bytes: &[u8]) -> Packet {
        match decode(bytes) {
            Datagram::Packet { packet, .. } => packet,
            other => panic!("not a packet: {other:?}"),
        }
    }

    #[test]
    fn packets_round_trip() {
        for p in [
            msg(0, 3),
            msg(2, 3),
            Packet::greeting(Kind::Hello, 7, 0, 11, 0, "bo"),
            Packet::greeting(Kind::Reply, 7, 8, 11, 12, "bo"),
            Packet::bye(7, 8),
            Packet::ping(7, 8),
            Packet::ack(7, 8, 42, 40, 5000),
            Packet::refused(7, Refusal::NeedsKey),
        ] {
            assert_eq!(packet(&p.encode()), p);
        }
    }

    #[test]
    fn the_text_form_is_short_printable_ascii_and_decodes() {
        let hello = Packet::greeting(Kind::Hello, 7, 0, 11, 0, "ana\x1b[2J\u{202e}é");
        let text = text_form(Kind::Hello, Some("ana\x1b[2J\u{202e}é"), &hello.encode());
        let line = std::str::from_utf8(&text).unwrap();
        assert!(line.starts_with("corokit-chat/2 hello from ana\\u{1b}[2J\\u{202e}\\u{e9} #"));
        assert!(
            line.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
            "{line}"
        );
        assert!(text.len() < 256, "{}", text.len());
        match decode(&text) {
            Datagram::Packet { packet, text_form } => {
                assert!(text_form);
                assert_eq!(packet, hello);
            }
            other => panic!("{other:?}"),
        }
        // A long nickname still fits the classic script's 1024-byte receive buffer.
        let nick = "\u{7}".repeat(64);
        let hello = Packet::greeting(Kind::Hello, 7, 0, 11, 0, &nick);
        assert!(text_form(Kind::Hello, Some(&nick), &hello.encode()).len() < 1024);
    }

    #[test]
    fn messages_never_travel_in_text_form() {
        let text = text_form(Kind::Msg, None, &msg(0, 1).encode());
        assert_eq!(decode(&text), Datagram::Malformed(Malformed::NotTextForm));
        // Text that merely looks like the protocol is someone's line.
        assert_eq!(
            decode(b"corokit-chat/2 hello #not base64!"),
            Datagram::Plain
        );
        assert_eq!(decode(b"corokit-chat/2 is nice #hashtag"), Datagram::Plain);
        assert_eq!(decode(b"corokit-chat/2 is nice"), Datagram::Plain);
    }

    #[test]
    fn plain_text_and_damage_are_told_apart() {
        assert_eq!(decode(b"hello from nc"), Datagram::Plain);
        assert_eq!(decode(b""), Datagram::Plain);
        assert_eq!(
            decode(b"\xC6KT\x01\x04\x00short"),
            Datagram::Malformed(Malformed::Version1)
        );
        assert_eq!(
            decode(b"\xC6KT\x09"),
            Datagram::Malformed(Malformed::TooShort)
        );
        let mut bad = msg(0, 1).encode();
        bad[HEADER + MSG_FIELDS] = 200;
        assert_eq!(decode(&bad), Datagram::Malformed(Malformed::BadNick));
        let mut huge = msg(1, 2).encode();
        huge.resize(65_000, b'x');
        assert_eq!(decode(&huge), Datagram::Malformed(Malformed::TooLong));
        let mut zero = msg(0, 1);
        if let Body::Msg { frags, .. } = &mut zero.body {
            *frags = 0;
        }
        assert_eq!(
            decode(&zero.encode()),
            Datagram::Malformed(Malformed::BadFragments)
        );
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        let mut rng = fastrand::Rng::with_seed(7);
        let seeds = [
            msg(0, 2).encode(),
            Packet::ack(1, 2, 3, 4, 5).encode(),
            text_form(
                Kind::Hello,
                Some("x"),
                &Packet::greeting(Kind::Hello, 1, 0, 2, 0, "x").encode(),
            ),
        ];
        for i in 0..20_000 {
            let mut bytes = seeds[i % seeds.len()].clone();
            for _ in 0..rng.usize(1..4) {
                match rng.u8(0..3) {
                    0 if !bytes.is_empty() => {
                        let at = rng.usize(..bytes.len());
                        bytes[at] = rng.u8(..);
                    }
                    1 => bytes.truncate(rng.usize(..=bytes.len())),
                    _ => bytes.extend((0..rng.usize(0..8)).map(|_| rng.u8(..))),
                }
            }
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn fragments_respect_utf8_and_size() {
        let text = "é".repeat(1000);
        let parts = fragments(text.as_bytes(), 999);
        assert!(parts
            .iter()
            .all(|p| p.len() <= 999 && std::str::from_utf8(p).is_ok()));
        assert_eq!(parts.concat(), text.as_bytes());
        let nick = "n".repeat(100);
        let longest = Packet {
            kind: Kind::Msg,
            flags: 0,
            src: 1,
            dst: 2,
            body: Body::Msg {
                seq: 1,
                base: 1,
                frag: 0,
                frags: 1,
                nick: Some(nick),
                text: vec![b'x'; fragment_size()],
            },
        };
        assert!(longest.encode().len() + crate::seal::OVERHEAD <= MAX_DATAGRAM);
        let longest_text = "x".repeat(MAX_TEXT);
        assert!(fragments(longest_text.as_bytes(), fragment_size()).len() <= MAX_FRAGS as usize);
    }
}
