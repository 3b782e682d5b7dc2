//! The wire format between `chat` instances (version 1). Anything that does not start with
//! the magic bytes is a plain datagram from a plain peer (`nc -u`, `socat`, a script).
//!
//! ```text
//! magic   3  b"\xC6KT"        (0xC6 is not valid UTF-8 at the start of text)
//! version 1  1
//! kind    1  Hello | HelloReply | Bye | Msg | Ack
//! flags   1  bit 0: sealed (the rest is an AEAD box, see `seal`)
//! instance 8 random id of the sending process, fixed for its life; a peer heard at several
//!            addresses with one instance is one peer
//! seq     8  Msg: sequence per sender and destination address; Ack: the sequence acknowledged (0: a window update
//!            that acknowledges nothing); others: 0
//! base    8  lowest sequence the sender still retransmits (gaps below it are given up); 0 in
//!            an Ack
//! frag    2  Msg: index of this fragment
//! frags   2  Msg: fragments in the message (1 for a short one)
//! nick    1+n length-prefixed UTF-8 nickname (at most 64 bytes)
//! body    rest: Msg: text bytes (UTF-8); Ack: the receive window, 8 bytes, the highest
//!            sequence the receiver has room for now; empty for the others
//! ```
//! Flow control: a sender sends no sequence above the latest window it was given (before the
//! first Ack it assumes 4096). A receiver whose queue for the user is full neither accepts nor
//! acknowledges a Msg, and sends a window update (an Ack of sequence 0) once room opens.
//! Sealed datagrams carry `magic, version, kind=Sealed, flags=1, nonce(12), box` where the box
//! is ChaCha20-Poly1305 over the whole plain datagram above, with the 6 header bytes as AAD.

/// The first bytes of every protocol datagram.
pub const MAGIC: &[u8; 3] = b"\xC6KT";
pub const VERSION: u8 = 1;
/// Longest nickname on the wire, in bytes.
pub const MAX_NICK: usize = 64;
/// Header bytes before the nickname.
const FIXED: usize = 3 + 1 + 1 + 1 + 8 + 8 + 8 + 2 + 2;
/// Largest datagram we send: fits any IPv6 path (1280) with room for the seal.
pub const MAX_DATAGRAM: usize = 1200;
/// Largest message text: 64 KiB.
pub const MAX_TEXT: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    HelloReply = 2,
    Bye = 3,
    Msg = 4,
    Ack = 5,
    Sealed = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::HelloReply,
            3 => Kind::Bye,
            4 => Kind::Msg,
            5 => Kind::Ack,
            6 => Kind::Sealed,
            _ => return None,
        })
    }
}

/// One protocol datagram, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    pub kind: Kind,
    pub instance: u64,
    pub seq: u64,
    pub base: u64,
    pub frag: u16,
    pub frags: u16,
    pub nick: String,
    pub body: Vec<u8>,
}

impl Packet {
    pub fn control(kind: Kind, instance: u64, nick: &str) -> Packet {
        Packet {
            kind,
            instance,
            seq: 0,
            base: 0,
            frag: 0,
            frags: 0,
            nick: nick.to_string(),
            body: Vec::new(),
        }
    }

    /// An acknowledgement of `seq` carrying the receive window `limit`.
    pub fn ack(instance: u64, nick: &str, seq: u64, limit: u64) -> Packet {
        Packet {
            seq,
            body: limit.to_be_bytes().to_vec(),
            ..Packet::control(Kind::Ack, instance, nick)
        }
    }

    /// The receive window an Ack carries, if it carries one.
    pub fn window(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.body.get(..8)?.try_into().ok()?;
        (self.kind == Kind::Ack).then(|| u64::from_be_bytes(bytes))
    }

    pub fn encode(&self) -> Vec<u8> {
        let nick = truncate_nick(&self.nick);
        let mut out = Vec::with_capacity(FIXED + 1 + nick.len() + self.body.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&self.instance.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.base.to_be_bytes());
        out.extend_from_slice(&self.frag.to_be_bytes());
        out.extend_from_slice(&self.frags.to_be_bytes());
        out.push(nick.len() as u8);
        out.extend_from_slice(nick.as_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Rewrites the `base` field of an encoded datagram.
pub fn set_base(encoded: &mut [u8], base: u64) {
    if encoded.len() >= FIXED {
        encoded[22..30].copy_from_slice(&base.to_be_bytes());
    }
}

/// What a received datagram is.
#[derive(Debug, PartialEq)]
pub enum Datagram {
    /// Not our protocol: text from a plain peer.
    Plain,
    /// Ours, sealed with a key.
    Sealed,
    Packet(Packet),
    /// Starts like ours but does not parse (another version, or damaged).
    Malformed(&'static str),
}

pub fn is_protocol(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

pub fn decode(bytes: &[u8]) -> Datagram {
    if !is_protocol(bytes) {
        return Datagram::Plain;
    }
    if bytes.len() < 6 {
        return Datagram::Malformed("too short");
    }
    if bytes[3] != VERSION {
        return Datagram::Malformed("unknown protocol version");
    }
    let Some(kind) = Kind::from_u8(bytes[4]) else {
        return Datagram::Malformed("unknown kind");
    };
    if kind == Kind::Sealed {
        return Datagram::Sealed;
    }
    if bytes.len() < FIXED + 1 {
        return Datagram::Malformed("too short");
    }
    let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
    let u16_at = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
    let nick_len = bytes[FIXED] as usize;
    let nick_end = FIXED + 1 + nick_len;
    if nick_len > MAX_NICK || bytes.len() < nick_end {
        return Datagram::Malformed("bad nickname length");
    }
    let packet = Packet {
        kind,
        instance: u64_at(6),
        seq: u64_at(14),
        base: u64_at(22),
        frag: u16_at(30),
        frags: u16_at(32),
        nick: String::from_utf8_lossy(&bytes[FIXED + 1..nick_end]).into_owned(),
        body: bytes[nick_end..].to_vec(),
    };
    if kind == Kind::Msg && (packet.frags == 0 || packet.frag >= packet.frags) {
        return Datagram::Malformed("bad fragment numbers");
    }
    Datagram::Packet(packet)
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

/// Body bytes per fragment for a sender with this nickname, leaving room for the seal.
pub fn fragment_size(nick: &str) -> usize {
    MAX_DATAGRAM - FIXED - 1 - truncate_nick(nick).len() - crate::seal::OVERHEAD
}

/// Splits `text` into fragments of at most `size` bytes, on UTF-8 boundaries.
pub fn fragments(text: &str, size: usize) -> Vec<&[u8]> {
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return vec![bytes];
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let mut end = (start + size).min(bytes.len());
        while end < bytes.len() && !text.is_char_boundary(end) {
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

    #[test]
    fn packets_round_trip() {
        let p = Packet {
            kind: Kind::Msg,
            instance: 0x0102_0304_0506_0708,
            seq: 42,
            base: 40,
            frag: 1,
            frags: 3,
            nick: "ana@box".into(),
            body: "héllo".as_bytes().to_vec(),
        };
        assert_eq!(decode(&p.encode()), Datagram::Packet(p));
        let ack = Packet::ack(7, "bo", 42, 5000);
        let Datagram::Packet(back) = decode(&ack.encode()) else {
            panic!("an ack must decode");
        };
        assert_eq!((back.seq, back.window()), (42, Some(5000)));
        assert_eq!(Packet::control(Kind::Hello, 7, "bo").window(), None);
    }

    #[test]
    fn plain_text_and_damage_are_told_apart() {
        assert_eq!(decode(b"hello from nc"), Datagram::Plain);
        assert_eq!(decode(b""), Datagram::Plain);
        assert!(matches!(
            decode(b"\xC6KT\x01\x04\x00short"),
            Datagram::Malformed(_)
        ));
        assert!(matches!(decode(b"\xC6KT\x09"), Datagram::Malformed(_)));
        let mut bad = Packet::control(Kind::Msg, 1, "x").encode();
        bad[FIXED] = 200;
        assert!(matches!(decode(&bad), Datagram::Malformed(_)));
    }

    #[test]
    fn fragments_respect_utf8_and_size() {
        let text = "é".repeat(1000);
        let parts = fragments(&text, 999);
        assert!(parts
            .iter()
            .all(|p| p.len() <= 999 && std::str::from_utf8(p).is_ok()));
        assert_eq!(parts.concat(), text.as_bytes());
        let nick = "n".repeat(100);
        assert_eq!(truncate_nick(&nick).len(), MAX_NICK);
        assert!(
            fragment_size(&nick) + FIXED + 1 + MAX_NICK + crate::seal::OVERHEAD <= MAX_DATAGRAM
        );
    }
}
