//! File offers and file requests in IP Messenger's form, which chat peers share: an offer is a
//! list of `fileID:name:size:mtime:attr[:ext=value…]:` entries separated by `\a` (a `:` in a
//! name written `::`, numbers in hex); a request for a file is `packetID:fileID:offset:` (hex)
//! and for a directory `packetID:fileID:`; a directory comes as a stream of
//! `headersize:name:size:attr[:ext=value…]:` headers, each followed by the file's bytes.
//! Nothing here trusts what it reads: every field is checked, every count and length bounded.

use thiserror::Error;

/// `attr` values.
pub const REGULAR: u32 = 0x1;
pub const DIRECTORY: u32 = 0x2;
/// Closes a directory in a directory stream (its name is `.`).
pub const RETURN_TO_PARENT: u32 = 0x3;

/// Files in one offer.
pub const MAX_FILES: usize = 1000;
/// Longest name taken, in bytes as received (a name is cut to 200 bytes when saved).
pub const MAX_NAME: usize = 1024;
/// Longest directory-stream header.
pub const MAX_HEADER: usize = 2048;

/// Extension attribute: the modification time (IP Messenger's 0x14).
const EXT_MTIME: &str = "14";
/// Extension attribute: the SHA-256 of the file, between chat peers.
const EXT_SHA256: &str = "sha256";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformed {
    #[error("more than {MAX_FILES} files in one offer")]
    TooManyFiles,
    #[error("a file entry without its fields")]
    MissingFields,
    #[error("a number that is not hex, or too large")]
    Number,
    #[error("a name longer than {MAX_NAME} bytes or empty")]
    Name,
    #[error("a header longer than {MAX_HEADER} bytes")]
    Header,
}

/// One file (or directory) of an offer. `name` is as the sender gave it: make it safe before
/// saving under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedFile {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub mtime: u64,
    pub attr: u32,
    pub sha256: Option<[u8; 32]>,
}

impl OfferedFile {
    pub fn is_dir(&self) -> bool {
        self.attr & 0xff == DIRECTORY
    }
}

fn hex(field: &[u8]) -> Result<u64, Malformed> {
    let text = std::str::from_utf8(field).map_err(|_| Malformed::Number)?;
    if text.is_empty() || text.len() > 16 {
        return Err(Malformed::Number);
    }
    u64::from_str_radix(text, 16).map_err(|_| Malformed::Number)
}

/// A file id as the offer wrote it: decimal by IP Messenger and iptux, hex by some others.
fn file_id(field: &[u8]) -> Result<u64, Malformed> {
    let text = std::str::from_utf8(field).map_err(|_| Malformed::Number)?;
    if text.len() > 20 {
        return Err(Malformed::Number);
    }
    text.parse::<u64>()
        .or_else(|_| u64::from_str_radix(text, 16))
        .map_err(|_| Malformed::Number)
}

/// Splits at single `:`s, taking `::` as a colon inside a field (names only have them).
fn fields(entry: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    let mut i = 0;
    while i < entry.len() {
        if entry[i] == b':' {
            if entry.get(i + 1) == Some(&b':') {
                out.last_mut().expect("one field").push(b':');
                i += 2;
                continue;
            }
            out.push(Vec::new());
        } else {
            out.last_mut().expect("one field").push(entry[i]);
        }
        i += 1;
    }
    out
}

fn ext_values(fields: &[Vec<u8>]) -> impl Iterator<Item = (&[u8], &[u8])> {
    fields.iter().filter_map(|f| {
        let eq = f.iter().position(|&b| b == b'=')?;
        Some((&f[..eq], &f[eq + 1..]))
    })
}

fn sha256(value: &[u8]) -> Option<[u8; 32]> {
    if value.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in value.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The files of an offer (what follows the message text and its NUL). `decode` turns a name
/// into text in the sender's encoding.
pub fn parse_files(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> String,
) -> Result<Vec<OfferedFile>, Malformed> {
    let mut files = Vec::new();
    for entry in bytes.split(|&b| b == 0x07) {
        let entry = entry.strip_prefix(b":").unwrap_or(entry);
        if entry.iter().all(|&b| b == 0 || b.is_ascii_whitespace()) {
            continue;
        }
        if files.len() == MAX_FILES {
            return Err(Malformed::TooManyFiles);
        }
        let f = fields(entry);
        if f.len() < 5 {
            return Err(Malformed::MissingFields);
        }
        if f[1].is_empty() || f[1].len() > MAX_NAME {
            return Err(Malformed::Name);
        }
        let mut file = OfferedFile {
            id: file_id(&f[0])?,
            name: decode(&f[1]),
            size: hex(&f[2])?,
            mtime: hex(&f[3])?,
            attr: u32::try_from(hex(&f[4])?).map_err(|_| Malformed::Number)?,
            sha256: None,
        };
        for (key, value) in ext_values(&f[5..]) {
            if key == EXT_SHA256.as_bytes() {
                file.sha256 = sha256(value);
            }
        }
        files.push(file);
    }
    Ok(files)
}

fn escape_name(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    for &b in name {
        match b {
            b':' => out.extend_from_slice(b"::"),
            // A name cannot carry the separators of the list around it.
            0 | 0x07 => out.push(b'_'),
            b => out.push(b),
        }
    }
    out
}

/// The file list of an offer, names in the receiver's encoding (`encode`).
pub fn write_files(files: &[OfferedFile], encode: impl Fn(&str) -> Vec<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    for f in files {
        out.extend_from_slice(format!("{}:", f.id).as_bytes());
        out.extend_from_slice(&escape_name(&encode(&f.name)));
        out.extend_from_slice(format!(":{:x}:{:x}:{:x}:", f.size, f.mtime, f.attr).as_bytes());
        if let Some(sum) = &f.sha256 {
            out.extend_from_slice(
                format!("{EXT_SHA256}={}:", corokit_common::text::hex(sum)).as_bytes(),
            );
        }
        out.push(0x07);
    }
    out
}

/// What a chat peer says about files, in a chat message of its own: the message starts with
/// the byte 0xFF, which no text can (typed lines are UTF-8), then a letter for the kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Files offered under `packet`, with a message.
    Offer {
        packet: u64,
        text: String,
        files: Vec<OfferedFile>,
    },
    /// The receiver will not take the files of `packet`.
    Decline(u64),
    /// The sender no longer serves the files of `packet`.
    Withdraw(u64),
}

const CONTROL: u8 = 0xFF;

impl Control {
    pub fn encode(&self) -> Vec<u8> {
        let (letter, body) = match self {
            Control::Offer {
                packet,
                text,
                files,
            } => {
                let mut body = format!("{packet:x}\0{}\0", text.replace('\0', " ")).into_bytes();
                body.extend_from_slice(&write_files(files, |s| s.as_bytes().to_vec()));
                (b'O', body)
            }
            Control::Decline(p) => (b'D', format!("{p:x}").into_bytes()),
            Control::Withdraw(p) => (b'W', format!("{p:x}").into_bytes()),
        };
        [&[CONTROL, letter][..], &body].concat()
    }

    /// `None` for a message that is text; else the control it carries, or why not.
    pub fn parse(message: &[u8]) -> Option<Result<Control, Malformed>> {
        let (&[CONTROL, letter], body) = (message.get(..2)?, &message[2..]) else {
            return None;
        };
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Some(match letter {
            b'O' => {
                let mut parts = body.splitn(3, |&b| b == 0);
                let (packet, message, files) = (parts.next(), parts.next(), parts.next());
                match (packet, message, files) {
                    (Some(p), Some(m), Some(f)) => hex(p).and_then(|packet| {
                        Ok(Control::Offer {
                            packet,
                            text: text(m),
                            files: parse_files(f, text)?,
                        })
                    }),
                    _ => Err(Malformed::MissingFields),
                }
            }
            b'D' => hex(body).map(Control::Decline),
            b'W' => hex(body).map(Control::Withdraw),
            _ => Err(Malformed::MissingFields),
        })
    }
}

/// A request for a file (GETFILEDATA: with an offset) or a directory (GETDIRFILES).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The offer's packet number.
    pub packet: u64,
    /// The file id as written: hex by IP Messenger and iptux; tried as decimal too.
    pub file: Vec<u8>,
    pub offset: Option<u64>,
}

impl Request {
    /// The ids the request may mean, the hex reading first (what IP Messenger and iptux send).
    pub fn file_ids(&self) -> impl Iterator<Item = u64> + '_ {
        let text = std::str::from_utf8(&self.file).unwrap_or("");
        let as_hex = u64::from_str_radix(text, 16).ok();
        let as_dec = text.parse::<u64>().ok().filter(|d| Some(*d) != as_hex);
        as_hex.into_iter().chain(as_dec)
    }
}

/// Reads `packetID:fileID[:offset]:` (hex). `with_offset` for GETFILEDATA.
pub fn parse_request(extra: &[u8], with_offset: bool) -> Result<Request, Malformed> {
    let text = extra.split(|&b| b == 0).next().unwrap_or_default();
    let mut f: Vec<&[u8]> = text.split(|&b| b == b':').collect();
    if f.last().is_some_and(|l| l.is_empty()) {
        f.pop();
    }
    if f.len() < if with_offset { 3 } else { 2 } || f[1].is_empty() || f[1].len() > 20 {
        return Err(Malformed::MissingFields);
    }
    Ok(Request {
        packet: hex(f[0])?,
        file: f[1].to_vec(),
        offset: if with_offset { Some(hex(f[2])?) } else { None },
    })
}

/// The extra of a request for file `id` of offer `packet`, from `offset`.
pub fn write_request(packet: u64, id: u64, offset: Option<u64>) -> Vec<u8> {
    match offset {
        Some(o) => format!("{packet:x}:{id:x}:{o:x}:").into_bytes(),
        None => format!("{packet:x}:{id:x}:").into_bytes(),
    }
}

/// One header of a directory stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub size: u64,
    pub attr: u32,
    pub mtime: Option<u64>,
}

/// A directory-stream header: its size in hex (4 digits, counting itself and the final `:`),
/// then the name, size, attr and mtime, as iptux writes it.
pub fn write_dir_header(name: &[u8], size: u64, attr: u32, mtime: u64) -> Vec<u8> {
    let rest = [
        b":".as_slice(),
        &escape_name(name),
        format!(":{size:x}:{attr:x}:{EXT_MTIME}={mtime:x}:").as_bytes(),
    ]
    .concat();
    let mut len = rest.len() + 4;
    // The size field may need more digits for a long header.
    while format!("{len:04x}").len() + rest.len() != len {
        len += 1;
    }
    [format!("{len:04x}").into_bytes(), rest].concat()
}

/// Reads the header at the start of `buf`: the entry and the bytes the header took, or
/// `None` when more bytes are needed.
pub fn parse_dir_header(
    buf: &[u8],
    decode: impl Fn(&[u8]) -> String,
) -> Result<Option<(DirEntry, usize)>, Malformed> {
    let Some(colon) = buf.iter().take(9).position(|&b| b == b':') else {
        return if buf.len() >= 9 {
            Err(Malformed::Header)
        } else {
            Ok(None)
        };
    };
    let len = hex(&buf[..colon])? as usize;
    if len > MAX_HEADER || len <= colon + 1 {
        return Err(Malformed::Header);
    }
    if buf.len() < len {
        return Ok(None);
    }
    let f = fields(&buf[colon + 1..len]);
    if f.len() < 3 || f[0].is_empty() || f[0].len() > MAX_NAME {
        return Err(Malformed::MissingFields);
    }
    let mut entry = DirEntry {
        name: decode(&f[0]),
        size: hex(&f[1])?,
        attr: u32::try_from(hex(&f[2])?).map_err(|_| Malformed::Number)?,
        mtime: None,
    };
    for (key, value) in ext_values(&f[3..]) {
        if key == EXT_MTIME.as_bytes() {
            entry.mtime = hex(value).ok();
        }
    }
    Ok(Some((entry, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn offers_as_the_clients_write_them() {
        // iptux: decimal ids, then `\a`; IP Messenger: `\a:` between entries.
        let files = parse_files(b"1:test.bin:3e8:0:1:\x07", text).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(
            (files[0].id, files[0].size, files[0].attr),
            (1, 1000, REGULAR)
        );
        let files = parse_files(
            b"12:a::b.txt:10:5f5e1000:1:14=5f5e1000:\x07:13:docs:0:5f5e1000:2:\x07",
            text,
        )
        .unwrap();
        assert_eq!(files[0].name, "a:b.txt", "`::` is a colon in a name");
        assert!(files[1].is_dir());
        assert_eq!(files[1].id, 13);
        // Ours, with a checksum, reads back whole.
        let ours = OfferedFile {
            id: 3,
            name: "x:y\u{7}z".into(),
            size: 5,
            mtime: 9,
            attr: REGULAR,
            sha256: Some([0xab; 32]),
        };
        let back = parse_files(
            &write_files(std::slice::from_ref(&ours), |s| s.as_bytes().to_vec()),
            text,
        )
        .unwrap();
        assert_eq!(back[0].name, "x:y_z");
        assert_eq!(back[0].sha256, ours.sha256);
        assert_eq!((back[0].id, back[0].size, back[0].mtime), (3, 5, 9));
    }

    #[test]
    fn hostile_offers_are_refused_by_name() {
        let many: Vec<u8> = (0..MAX_FILES + 1)
            .flat_map(|i| format!("{i}:f{i}:1:0:1:\x07").into_bytes())
            .collect();
        assert_eq!(parse_files(&many, text), Err(Malformed::TooManyFiles));
        for (bytes, want) in [
            (&b"1:name:zz:0:1:"[..], Malformed::Number),
            (b"1:name:10000000000000000:0:1:", Malformed::Number),
            (b"1:name:10", Malformed::MissingFields),
            (b"x:name:10:0:1:", Malformed::Number),
        ] {
            assert_eq!(parse_files(bytes, text), Err(want), "{}", text(bytes));
        }
        let long = format!("1:{}:1:0:1:", "n".repeat(MAX_NAME + 1));
        assert_eq!(parse_files(long.as_bytes(), text), Err(Malformed::Name));
    }

    #[test]
    fn controls_between_chat_peers_read_back_and_text_is_never_one() {
        let offer = Control::Offer {
            packet: 0xabc,
            text: "the report\0".into(),
            files: vec![OfferedFile {
                id: 0,
                name: "r.pdf".into(),
                size: 10,
                mtime: 1,
                attr: REGULAR,
                sha256: Some([1; 32]),
            }],
        };
        match Control::parse(&offer.encode()) {
            Some(Ok(Control::Offer {
                packet,
                text,
                files,
            })) => {
                assert_eq!(
                    (packet, text.as_str(), files.len()),
                    (0xabc, "the report ", 1)
                );
                assert_eq!(files[0].sha256, Some([1; 32]));
            }
            other => panic!("{other:?}"),
        }
        for c in [Control::Decline(7), Control::Withdraw(u64::MAX)] {
            assert_eq!(Control::parse(&c.encode()), Some(Ok(c)));
        }
        assert_eq!(Control::parse("plain text".as_bytes()), None);
        assert_eq!(
            Control::parse("\u{ff}O".as_bytes()),
            None,
            "ÿ in UTF-8 is not 0xFF"
        );
        assert_eq!(
            Control::parse(b"\xffO7"),
            Some(Err(Malformed::MissingFields))
        );
        assert_eq!(Control::parse(b"\xffDzz"), Some(Err(Malformed::Number)));
        assert_eq!(Control::parse(b"\xff"), None);
    }

    #[test]
    fn requests_read_as_hex_and_decimal() {
        let r = parse_request(b"6fd5c8:a:10:", true).unwrap();
        assert_eq!((r.packet, r.offset), (0x6fd5c8, Some(0x10)));
        assert_eq!(r.file_ids().collect::<Vec<_>>(), [10]);
        let r = parse_request(b"1:10:0:", true).unwrap();
        assert_eq!(r.file_ids().collect::<Vec<_>>(), [16, 10]);
        assert_eq!(parse_request(b"1:2:", true), Err(Malformed::MissingFields));
        assert_eq!(parse_request(b"1:2:-5:", true), Err(Malformed::Number));
        assert_eq!(parse_request(b"abc:2:", false).unwrap().packet, 0xabc);
        assert_eq!(write_request(255, 10, Some(16)), b"ff:a:10:");
    }

    #[test]
    fn directory_headers_round_trip_and_are_bounded() {
        let h = write_dir_header(b"a:b", 0x1234, REGULAR, 7);
        let len = usize::from_str_radix(std::str::from_utf8(&h[..4]).unwrap(), 16).unwrap();
        assert_eq!(len, h.len(), "the size counts the whole header");
        let mut stream = h.clone();
        stream.extend_from_slice(b"payload");
        let (entry, used) = parse_dir_header(&stream, text).unwrap().unwrap();
        assert_eq!(used, h.len());
        assert_eq!(entry.name, "a:b");
        assert_eq!(
            (entry.size, entry.attr, entry.mtime),
            (0x1234, REGULAR, Some(7))
        );
        // iptux's own header parses too.
        let iptux = b"002f:f.txt:00000000a:1:14=5f5e1000:16=5f5e1000:";
        let (entry, used) = parse_dir_header(iptux, text).unwrap().unwrap();
        assert_eq!(
            (entry.name.as_str(), entry.size, used),
            ("f.txt", 10, iptux.len())
        );
        assert_eq!(parse_dir_header(b"00", text), Ok(None));
        assert_eq!(parse_dir_header(b"ffff:x", text), Err(Malformed::Header));
        assert_eq!(
            parse_dir_header(b"123456789abc", text),
            Err(Malformed::Header)
        );
        assert_eq!(parse_dir_header(b"0003:", text), Err(Malformed::Header));
    }
}
