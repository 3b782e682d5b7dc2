//! Which client a peer runs and which encoding its text is in, both ways. IP Messenger says
//! UTF-8 with UTF8OPT (to peers that advertise CAPUTF8OPT) and uses a legacy code page
//! otherwise; iptux never sets the flags and sends UTF-8 (or, after guessing, GB18030); FeiQ
//! speaks GBK. Decoding never drops text: what does not decode becomes U+FFFD.

use encoding_rs::{Encoding, GB18030, GBK, SHIFT_JIS, UTF_8};

use super::packet::opt;

/// The client a peer runs, from its version field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    IpMessenger,
    Iptux,
    Feiq,
    Other,
}

impl Client {
    pub fn of(version: &[u8]) -> Client {
        if version == b"1" {
            Client::IpMessenger
        } else if version.windows(5).any(|w| w == b"iptux") {
            Client::Iptux
        } else if version.starts_with(b"1_lbt") {
            Client::Feiq
        } else {
            Client::Other
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Client::IpMessenger => "IP Messenger",
            Client::Iptux => "iptux",
            Client::Feiq => "FeiQ",
            Client::Other => "other",
        }
    }
}

/// An encoding by name: any WHATWG label (`gbk`, `gb18030`, `shift_jis`, `utf-8`, `big5`,
/// `euc-kr`, …) and `cp932`, the name IP Messenger users know Shift-JIS by.
pub fn by_name(name: &str) -> Option<&'static Encoding> {
    match name.trim().to_ascii_lowercase().as_str() {
        "cp932" | "ms932" | "windows-932" => Some(SHIFT_JIS),
        "cp936" | "windows-936" => Some(GBK),
        other => Encoding::for_label(other.as_bytes()),
    }
}

/// True for an encoding IP Messenger text can be in: ASCII-compatible (the protocol's
/// colons and digits are ASCII) and a real one (not the WHATWG "replacement" that labels such
/// as `hz-gb-2312` map to, which decodes everything to one U+FFFD).
pub fn usable(encoding: &&'static Encoding) -> bool {
    encoding.is_ascii_compatible() && *encoding != encoding_rs::REPLACEMENT
}

/// The legacy encoding for peers that do not say: GB18030 where the locale is Chinese,
/// else CP932 (IP Messenger's own). `locale` is the first of LC_ALL, LC_CTYPE, LANG set.
pub fn legacy_for_locale(locale: Option<&str>) -> &'static Encoding {
    match locale {
        Some(l) if l.starts_with("zh") => GB18030,
        _ => SHIFT_JIS,
    }
}

/// Text from a peer, as a string. UTF8OPT means UTF-8; text that is valid UTF-8 is UTF-8
/// (iptux sends it without the flag); otherwise FeiQ's GBK, iptux's GB18030 or `legacy`.
pub fn decode(bytes: &[u8], command: u32, client: Client, legacy: &'static Encoding) -> String {
    if command & opt::UTF8OPT != 0 {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        return text.to_string();
    }
    let encoding = match client {
        Client::Feiq => GBK,
        Client::Iptux => GB18030,
        Client::IpMessenger | Client::Other => legacy,
    };
    encoding.decode_without_bom_handling(bytes).0.into_owned()
}

/// How text goes to a peer: the encoding, and whether UTF8OPT says so.
pub fn outgoing(
    client: Client,
    caps_utf8: bool,
    legacy: &'static Encoding,
) -> (&'static Encoding, bool) {
    if caps_utf8 {
        (UTF_8, true)
    } else {
        match client {
            Client::Iptux => (UTF_8, false),
            Client::Feiq => (GBK, false),
            Client::IpMessenger | Client::Other => (legacy, legacy == UTF_8),
        }
    }
}

/// `text` in `encoding`; characters it cannot hold become `?` (as IP Messenger writes them),
/// never markup.
pub fn encode(text: &str, encoding: &'static Encoding) -> Vec<u8> {
    if encoding == UTF_8 {
        return text.as_bytes().to_vec();
    }
    let mut encoder = encoding.new_encoder();
    let mut out = Vec::with_capacity(text.len() * 2);
    let mut buf = [0u8; 1024];
    let mut rest = text;
    loop {
        let (result, read, written) =
            encoder.encode_from_utf8_without_replacement(rest, &mut buf, true);
        out.extend_from_slice(&buf[..written]);
        rest = &rest[read..];
        match result {
            encoding_rs::EncoderResult::InputEmpty => return out,
            encoding_rs::EncoderResult::OutputFull => {}
            encoding_rs::EncoderResult::Unmappable(_) => out.push(b'?'),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_told_apart_by_version() {
        assert_eq!(Client::of(b"1"), Client::IpMessenger);
        assert_eq!(Client::of(b"1_iptux 0.8.3"), Client::Iptux);
        assert_eq!(
            Client::of(b"1_lbt6_0#128#001122334455#0#0#0#4001#9"),
            Client::Feiq
        );
        assert_eq!(Client::of(b"1@shiyeline"), Client::Other);
    }

    #[test]
    fn text_decodes_the_way_each_client_wrote_it() {
        let sjis = encode("こんにちは", SHIFT_JIS);
        let gbk = encode("你好", GBK);
        assert_eq!(
            decode(&sjis, 0, Client::IpMessenger, SHIFT_JIS),
            "こんにちは"
        );
        assert_eq!(
            decode(&gbk, 0, Client::Feiq, SHIFT_JIS),
            "你好",
            "FeiQ is GBK whatever the legacy"
        );
        assert_eq!(decode(&gbk, 0, Client::Iptux, SHIFT_JIS), "你好");
        assert_eq!(
            decode("héllo".as_bytes(), 0, Client::Feiq, SHIFT_JIS),
            "héllo"
        );
        // What does not decode is shown as U+FFFD, never dropped.
        assert_eq!(
            decode(b"a\xffb", opt::UTF8OPT, Client::Other, SHIFT_JIS),
            "a\u{fffd}b"
        );
        assert!(decode(b"ok \x81", 0, Client::IpMessenger, SHIFT_JIS).starts_with("ok "));
    }

    #[test]
    fn text_goes_out_the_way_each_client_reads_it() {
        assert_eq!(
            outgoing(Client::IpMessenger, true, SHIFT_JIS),
            (UTF_8, true)
        );
        assert_eq!(outgoing(Client::Iptux, false, SHIFT_JIS), (UTF_8, false));
        assert_eq!(outgoing(Client::Feiq, false, SHIFT_JIS), (GBK, false));
        assert_eq!(outgoing(Client::Other, false, GB18030), (GB18030, false));
        assert_eq!(
            encode("a😀b", SHIFT_JIS),
            b"a?b",
            "unmappable is ?, not &#128512;"
        );
        assert_eq!(encode("あ", SHIFT_JIS), [0x82, 0xa0]);
        assert_eq!(by_name("CP932"), Some(SHIFT_JIS));
        assert_eq!(by_name("gbk"), Some(GBK));
        assert_eq!(by_name("klingon"), None);
        for label in ["hz-gb-2312", "iso-2022-kr", "utf-16le", "iso-2022-jp"] {
            assert!(!by_name(label).is_some_and(|e| usable(&e)), "{label}");
        }
        for label in ["cp932", "gbk", "big5", "euc-kr", "utf-8", "windows-1252"] {
            assert!(by_name(label).is_some_and(|e| usable(&e)), "{label}");
        }
        assert_eq!(legacy_for_locale(Some("zh_CN.UTF-8")), GB18030);
        assert_eq!(legacy_for_locale(Some("ja_JP.UTF-8")), SHIFT_JIS);
        assert_eq!(legacy_for_locale(None), SHIFT_JIS);
    }
}
