//! The IP Messenger wire form, `Ver:PacketNo:User:Host:Command:Extra`, as IP Messenger,
//! iptux and FeiQ write it: parsing (which never trusts a field) and writing, the command and
//! option numbers, and the payloads of entry packets.

use thiserror::Error;

/// Command modes (the low 8 bits of the command).
pub mod mode {
    pub const NOOPERATION: u32 = 0x00;
    pub const BR_ENTRY: u32 = 0x01;
    pub const BR_EXIT: u32 = 0x02;
    pub const ANSENTRY: u32 = 0x03;
    pub const BR_ABSENCE: u32 = 0x04;
    pub const SENDMSG: u32 = 0x20;
    pub const RECVMSG: u32 = 0x21;
    pub const READMSG: u32 = 0x30;
    pub const GETINFO: u32 = 0x40;
    pub const SENDINFO: u32 = 0x41;
    pub const GETABSENCEINFO: u32 = 0x50;
    pub const SENDABSENCEINFO: u32 = 0x51;
    pub const GETFILEDATA: u32 = 0x60;
    pub const RELEASEFILES: u32 = 0x61;
    pub const GETDIRFILES: u32 = 0x62;
}

/// Option bits (the high 24 bits of the command).
pub mod opt {
    pub const ABSENCEOPT: u32 = 0x100;
    pub const DIALUPOPT: u32 = 0x10000;
    pub const FILEATTACHOPT: u32 = 0x20_0000;
    pub const ENCRYPTOPT: u32 = 0x40_0000;
    pub const UTF8OPT: u32 = 0x80_0000;
    pub const CAPUTF8OPT: u32 = 0x100_0000;
    /// SENDMSG only.
    pub const SENDCHECKOPT: u32 = 0x100;
    pub const SECRETOPT: u32 = 0x200;
    pub const BROADCASTOPT: u32 = 0x400;
    pub const AUTORETOPT: u32 = 0x2000;
    pub const RETRYOPT: u32 = 0x4000;
}

/// Largest datagram taken: IP Messenger's own receive buffer. iptux cuts at 8 KiB.
pub const MAX_RECEIVED: usize = 32 * 1024;
/// Largest datagram sent: what iptux reads whole.
pub const MAX_SENT: usize = 8192;
/// Longest user, host, nickname or group kept (IP Messenger's name buffer is 80 bytes).
pub const MAX_NAME: usize = 80;
/// Longest version field kept.
pub const MAX_VERSION: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Error)]
pub enum Malformed {
    #[error("fewer than six fields")]
    MissingFields,
    #[error("not protocol version 1")]
    Version,
    #[error("packet number not a decimal number")]
    PacketNumber,
    #[error("command not a decimal 32-bit number")]
    Command,
    #[error("longer than 32 KiB")]
    TooLong,
    #[error("a malformed file offer")]
    Attachment,
}

/// One packet. Names and text are bytes in the sender's encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub version: Vec<u8>,
    pub number: u64,
    pub user: Vec<u8>,
    pub host: Vec<u8>,
    pub command: u32,
    pub extra: Vec<u8>,
}

impl Packet {
    pub fn mode(&self) -> u32 {
        self.command & 0xff
    }

    pub fn has(&self, option: u32) -> bool {
        self.command & option != 0
    }

    /// The message text of a SENDMSG: up to the first NUL (attachments follow it).
    pub fn text(&self) -> &[u8] {
        first_field(&self.extra)
    }

    /// The packet number an acknowledgement (RECVMSG, READMSG) names.
    pub fn names_number(&self) -> Option<u64> {
        decimal(first_field(&self.extra).trim_ascii())
    }
}

fn first_field(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == 0).next().unwrap_or_default()
}

fn decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 20 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Reads a packet. A colon inside Extra is text (every client takes everything after the
/// fifth colon); empty fields are kept in place, not collapsed.
pub fn parse(bytes: &[u8]) -> Result<Packet, Malformed> {
    if bytes.len() > MAX_RECEIVED {
        return Err(Malformed::TooLong);
    }
    let mut fields = bytes.splitn(6, |&b| b == b':');
    let mut next = || fields.next().ok_or(Malformed::MissingFields);
    let (version, number, user, host, command) = (next()?, next()?, next()?, next()?, next()?);
    let extra = next()?;
    // IP Messenger takes a version whose leading number is 1: `1`, `1_iptux 0.8.3`, `1_lbt6…`.
    let digits = version.iter().take_while(|b| b.is_ascii_digit()).count();
    if decimal(&version[..digits]) != Some(1) {
        return Err(Malformed::Version);
    }
    Ok(Packet {
        version: version[..version.len().min(MAX_VERSION)].to_vec(),
        number: decimal(number).ok_or(Malformed::PacketNumber)?,
        user: user[..user.len().min(MAX_NAME)].to_vec(),
        host: host[..host.len().min(MAX_NAME)].to_vec(),
        command: decimal(command)
            .and_then(|c| u32::try_from(c).ok())
            .ok_or(Malformed::Command)?,
        extra: extra.to_vec(),
    })
}

/// A name fit for the User or Host field: no colon (the spec's `;` instead) and no NUL.
pub fn header_name(name: &[u8]) -> Vec<u8> {
    name.iter()
        .take(MAX_NAME)
        .map(|&b| match b {
            b':' => b';',
            0 => b' ',
            b => b,
        })
        .collect()
}

/// Writes a packet from our side (version `1`, which every client accepts). `user` and
/// `host` must have been through [`header_name`].
pub fn write(number: u64, user: &[u8], host: &[u8], command: u32, extra: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + user.len() + host.len() + extra.len());
    out.extend_from_slice(format!("1:{number}:").as_bytes());
    out.extend_from_slice(user);
    out.push(b':');
    out.extend_from_slice(host);
    out.extend_from_slice(format!(":{command}:").as_bytes());
    out.extend_from_slice(extra);
    out
}

/// What an entry packet (BR_ENTRY, ANSENTRY, BR_ABSENCE) says about its sender: the
/// nickname and group in its encoding, and the UTF-8 names IP Messenger adds after them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub nick: Vec<u8>,
    pub group: Vec<u8>,
    /// `NN:` and `GN:` of the block after `\0\n`, when there is one.
    pub utf8_nick: Option<String>,
    pub utf8_group: Option<String>,
}

impl Entry {
    /// `nick\0group\0` then, for IP Messenger, `\nUN:user\nHN:host\nNN:nick\nGN:group\n`
    /// (iptux adds `icon\0encoding\0` instead; FeiQ writes only the first two).
    pub fn parse(extra: &[u8]) -> Entry {
        let mut parts = extra.split(|&b| b == 0);
        let cut = |p: Option<&[u8]>| p.map(|p| p[..p.len().min(MAX_NAME)].to_vec());
        let nick = cut(parts.next()).unwrap_or_default();
        let group = cut(parts.next()).unwrap_or_default();
        let mut entry = Entry {
            nick,
            group,
            ..Entry::default()
        };
        for part in parts {
            if part.first() != Some(&b'\n') {
                continue;
            }
            for line in String::from_utf8_lossy(part).lines() {
                let value = |v: &str| v.chars().take(MAX_NAME).collect::<String>();
                if let Some(v) = line.strip_prefix("NN:") {
                    entry.utf8_nick = Some(value(v));
                } else if let Some(v) = line.strip_prefix("GN:") {
                    entry.utf8_group = Some(value(v));
                }
            }
        }
        entry
    }
}

/// Our entry payload: names in the peer's encoding, then the UTF-8 block for clients that
/// read it (IP Messenger does when the command carries CAPUTF8OPT).
pub fn entry_extra(
    nick: &[u8],
    group: &[u8],
    user: &str,
    host: &str,
    utf8_nick: &str,
    utf8_group: &str,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&no_nul(nick));
    out.push(0);
    out.extend_from_slice(&no_nul(group));
    out.push(0);
    let clean = |s: &str| s.replace(['\n', '\0'], " ");
    out.extend_from_slice(
        format!(
            "\nUN:{}\nHN:{}\nNN:{}\nGN:{}\n",
            clean(user),
            clean(host),
            clean(utf8_nick),
            clean(utf8_group)
        )
        .as_bytes(),
    );
    out
}

fn no_nul(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .map(|&b| if b == 0 { b' ' } else { b })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_as_the_clients_write_them() {
        let p = parse(b"1_iptux 0.8.3:1:root:vm:257:iptuxA\x00grpA\x00icon-tux.png\x00utf-8\x00")
            .unwrap();
        assert_eq!(p.version, b"1_iptux 0.8.3");
        assert_eq!((p.number, p.mode()), (1, mode::BR_ENTRY));
        assert!(p.has(opt::ABSENCEOPT));
        let e = Entry::parse(&p.extra);
        assert_eq!(
            (e.nick.as_slice(), e.group.as_slice()),
            (&b"iptuxA"[..], &b"grpA"[..])
        );
        assert_eq!(e.utf8_nick, None);

        let p = parse(b"1:2000000000:tester:hostb:8388896:hello \xe4\xbd\xa0 a:b:c\x00").unwrap();
        assert_eq!(
            p.text(),
            "hello 你 a:b:c".as_bytes(),
            "colons in the text are text"
        );
        assert!(p.has(opt::UTF8OPT) && p.has(opt::SENDCHECKOPT));

        let p = parse(b"1_lbt6_0#128#001122334455#0#0#0#4001#9:7:u:h:32:\xc4\xe3\xba\xc3").unwrap();
        assert_eq!(p.text(), b"\xc4\xe3\xba\xc3");

        let ack = parse(b"1_iptux 0.8.3:10:root:vm:289:2000000000\x00").unwrap();
        assert_eq!(ack.mode(), mode::RECVMSG);
        assert_eq!(ack.names_number(), Some(2_000_000_000));

        let e = Entry::parse(b"nick\0grp\0\nUN:u\nHN:h\nNN:\xe3\x81\x82\nGN:g\xc3\xa9\n");
        assert_eq!(e.utf8_nick.as_deref(), Some("あ"));
        assert_eq!(e.utf8_group.as_deref(), Some("gé"));
        // Empty user and host stay empty (IP Messenger's tokenizer would shift the fields).
        let p = parse(b"1:5:::32:x").unwrap();
        assert_eq!((p.user.len(), p.host.len(), p.text()), (0, 0, &b"x"[..]));
    }

    #[test]
    fn hostile_packets_are_refused_by_name() {
        let cases: [(&[u8], Malformed); 9] = [
            (b"1:2:u:h", Malformed::MissingFields),
            (b"", Malformed::MissingFields),
            (b"2:1:u:h:32:x", Malformed::Version),
            (b"10:1:u:h:32:x", Malformed::Version),
            (b"x:1:u:h:32:x", Malformed::Version),
            (
                b"1:99999999999999999999999:u:h:32:x",
                Malformed::PacketNumber,
            ),
            (b"1:-1:u:h:32:x", Malformed::PacketNumber),
            (b"1:1:u:h:4294967296:x", Malformed::Command),
            (b"1:1:u:h:0x20:x", Malformed::Command),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                parse(bytes),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let mut huge = b"1:1:u:h:32:".to_vec();
        huge.resize(MAX_RECEIVED + 1, b'a');
        assert_eq!(parse(&huge), Err(Malformed::TooLong));
        // Long names are cut, not trusted.
        let long = format!("1:1:{}:h:1:{}\0", "u".repeat(5000), "n".repeat(5000));
        let p = parse(long.as_bytes()).unwrap();
        assert_eq!(p.user.len(), MAX_NAME);
        assert_eq!(Entry::parse(&p.extra).nick.len(), MAX_NAME);
    }

    #[test]
    fn what_we_write_reads_back() {
        let user = header_name(b"a:b\0c");
        assert_eq!(user, b"a;b c");
        let extra = entry_extra(b"ana", b"", "a;b", "host", "ana é", "");
        let bytes = write(42, &user, b"host", mode::BR_ENTRY | opt::CAPUTF8OPT, &extra);
        let p = parse(&bytes).unwrap();
        assert_eq!((p.number, p.user.as_slice()), (42, &b"a;b c"[..]));
        assert_eq!(p.mode(), mode::BR_ENTRY);
        let e = Entry::parse(&p.extra);
        assert_eq!(e.nick, b"ana");
        assert_eq!(e.utf8_nick.as_deref(), Some("ana é"));
        assert_eq!(e.utf8_group.as_deref(), Some(""));
        // Random bytes never panic and never yield more than they hold.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let bytes: Vec<u8> = (0..len)
                .map(|_| *rng.choice(b"01:9a\0\n").unwrap())
                .collect();
            if let Ok(p) = parse(&bytes) {
                assert!(p.extra.len() <= bytes.len());
                let _ = Entry::parse(&p.extra);
            }
        }
    }
}
