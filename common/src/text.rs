//! Text from outside (datagrams, HTTP headers, URLs, file names, nicknames) made safe to show,
//! the one definition both programs use for the terminal, logs and JSON output.
//!
//! A character is *hidden* when it can change how a terminal or a reader interprets what
//! surrounds it while showing nothing itself: every control (C0 except tab, DEL, C1), every
//! format character (Unicode category Cf: bidi overrides and isolates, soft hyphen, word
//! joiner, invisible operators, tags, …), the line and paragraph separators U+2028/2029, and
//! every default-ignorable code point (Hangul fillers, variation selectors, U+180E, …).
//! Hidden characters are shown as `\u{..}` on a terminal and as `\uXXXX` in JSON, so the
//! bytes written never contain one while JSON readers still get the original text.
//!
//! Emoji stay intact: a zero-width joiner between two pictographs (👩‍💻), an emoji
//! variation selector after an emoji (❤️) and the three subdivision flags Unicode recommends
//! (England, Scotland, Wales: 🏴 with tag letters) are part of what the sender meant. Any
//! other tag character is shown: a run of them can carry text no one sees.

use std::fmt::Write as _;
use std::io;

use icu_properties::props::{
    BinaryProperty, DefaultIgnorableCodePoint, Emoji, EmojiModifier, ExtendedPictographic,
    GeneralCategory,
};
use icu_properties::CodePointMapData;

const ZWJ: char = '\u{200d}';
const BLACK_FLAG: char = '\u{1f3f4}';
const CANCEL_TAG: char = '\u{e007f}';

/// True for the characters this module shows escaped (outside an emoji sequence).
pub fn is_hidden(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_control() && c != '\t';
    }
    matches!(
        CodePointMapData::<GeneralCategory>::new().get(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    ) || DefaultIgnorableCodePoint::for_char(c)
}

fn is_tag_spec(c: char) -> bool {
    ('\u{e0020}'..='\u{e007e}').contains(&c)
}

/// Hidden characters that are part of an emoji sequence and may stay.
struct EmojiContext<'a> {
    chars: &'a [char],
}

impl EmojiContext<'_> {
    fn allowed(&self, i: usize) -> bool {
        let c = self.chars[i];
        let prev = i.checked_sub(1).map(|p| self.chars[p]);
        let next = self.chars.get(i + 1).copied();
        match c {
            ZWJ => {
                prev.is_some_and(|p| {
                    ExtendedPictographic::for_char(p)
                        || EmojiModifier::for_char(p)
                        || p == '\u{fe0f}'
                }) && next.is_some_and(ExtendedPictographic::for_char)
            }
            '\u{fe0e}' | '\u{fe0f}' => prev.is_some_and(Emoji::for_char),
            c if is_tag_spec(c) || c == CANCEL_TAG => self.in_flag(i),
            _ => false,
        }
    }

    /// True when `i` is inside one of the recommended subdivision flags: `BLACK_FLAG`, the
    /// tag letters of `gbeng`, `gbsct` or `gbwls`, `CANCEL_TAG`.
    fn in_flag(&self, i: usize) -> bool {
        const FLAGS: [&str; 3] = ["gbeng", "gbsct", "gbwls"];
        let tag = |c: char| char::from_u32(c as u32 - 0xE0000);
        (i.saturating_sub(6)..=i).any(|start| {
            self.chars.get(start) == Some(&BLACK_FLAG)
                && self.chars.get(start + 6) == Some(&CANCEL_TAG)
                && i > start
                && i <= start + 6
                && FLAGS.iter().any(|f| {
                    f.chars()
                        .zip(&self.chars[start + 1..start + 6])
                        .all(|(want, &c)| is_tag_spec(c) && tag(c) == Some(want))
                })
        })
    }
}

/// A run of characters to show as they are, or one to escape.
enum Piece<'a> {
    Raw(&'a str),
    Hidden(char),
}

/// Calls `f` with the pieces of `text`, in order.
fn pieces<'a>(text: &'a str, mut f: impl FnMut(Piece<'a>)) {
    // The common case, ASCII without controls, needs no work at all.
    if text
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) || b == b'\t')
    {
        f(Piece::Raw(text));
        return;
    }
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let plain: Vec<char> = chars.iter().map(|&(_, c)| c).collect();
    let context = EmojiContext { chars: &plain };
    let mut run_start = 0;
    for (i, &(at, c)) in chars.iter().enumerate() {
        if is_hidden(c) && !context.allowed(i) {
            f(Piece::Raw(&text[run_start..at]));
            f(Piece::Hidden(c));
            run_start = at + c.len_utf8();
        }
    }
    f(Piece::Raw(&text[run_start..]));
}

/// `text` with every hidden character replaced by a visible escape like `\u{1b}`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    pieces(text, |piece| match piece {
        Piece::Raw(s) => out.push_str(s),
        Piece::Hidden(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    });
    out
}

/// Received bytes as text: invalid UTF-8 becomes U+FFFD, then [`escape`].
pub fn escape_bytes(bytes: &[u8]) -> String {
    escape(&String::from_utf8_lossy(bytes))
}

/// True when `text` would be shown unchanged by [`escape`].
pub fn is_safe(text: &str) -> bool {
    let mut safe = true;
    pieces(text, |piece| safe &= matches!(piece, Piece::Raw(_)));
    safe
}

/// A serde_json formatter that writes every hidden character as a `\uXXXX` escape
/// (serde_json itself escapes only C0 controls, quotes and backslashes).
struct SafeJson;

impl serde_json::ser::Formatter for SafeJson {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut result = Ok(());
        let mut units = [0u16; 2];
        pieces(fragment, |piece| {
            if result.is_err() {
                return;
            }
            result = match piece {
                Piece::Raw(s) => writer.write_all(s.as_bytes()),
                Piece::Hidden(c) => c
                    .encode_utf16(&mut units)
                    .iter()
                    .try_for_each(|unit| write!(writer, "\\u{unit:04x}")),
            };
        });
        result
    }
}

/// One JSON line for `value`, with every hidden character escaped.
pub fn json_line(value: &serde_json::Value) -> String {
    use serde::Serialize;
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, SafeJson);
    value
        .serialize(&mut ser)
        .expect("a JSON value serialises into memory");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Bytes in lowercase hex (digests, hashes).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_tricks_are_shown_not_obeyed() {
        assert_eq!(escape("\x1b[2J\x1b[Hgone"), "\\u{1b}[2J\\u{1b}[Hgone");
        assert_eq!(escape("a\tb\r\nc\x7f"), "a\tb\\u{d}\\u{a}c\\u{7f}");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape("txt\u{202e}exe.pdf"), "txt\\u{202e}exe.pdf");
        assert_eq!(escape_bytes(b"ok \xff\xfe"), "ok \u{fffd}\u{fffd}");
        assert_eq!(escape("héllo 世界 🙂"), "héllo 世界 🙂");
    }

    #[test]
    fn every_invisible_character_is_shown() {
        for c in [
            '\u{00ad}',
            '\u{034f}',
            '\u{061c}',
            '\u{115f}',
            '\u{180e}',
            '\u{200b}',
            '\u{200d}',
            '\u{2028}',
            '\u{2029}',
            '\u{2060}',
            '\u{2062}',
            '\u{2066}',
            '\u{3164}',
            '\u{fe00}',
            '\u{fe0f}',
            '\u{feff}',
            '\u{ffa0}',
            '\u{fff9}',
            '\u{e0001}',
            '\u{e0041}',
            '\u{e007f}',
            '\u{e0100}',
            '\u{1d173}',
        ] {
            let shown = escape(&format!("a{c}b"));
            assert_eq!(
                shown,
                format!("a\\u{{{:x}}}b", c as u32),
                "U+{:04X}",
                c as u32
            );
            assert!(is_hidden(c));
        }
        for c in ['a', 'é', '世', '🙂', ' ', '\t', '\u{20e3}', '\u{301}'] {
            assert!(!is_hidden(c), "U+{:04X}", c as u32);
        }
    }

    #[test]
    fn emoji_sequences_stay_whole() {
        for emoji in [
            "👩\u{200d}💻",          // woman technologist
            "👨\u{1f3fd}\u{200d}🚀", // with a skin tone
            "❤\u{fe0f}",             // red heart
            "❤\u{fe0f}\u{200d}🔥",   // heart on fire
            "1\u{fe0f}\u{20e3}",     // keycap
            "\u{1f3f4}\u{e0067}\u{e0062}\u{e0065}\u{e006e}\u{e0067}\u{e007f}", // England
        ] {
            assert_eq!(escape(emoji), emoji);
            assert!(is_safe(emoji));
        }
        // The same characters where they hide something are shown.
        assert_eq!(escape("a\u{200d}b"), "a\\u{200d}b");
        assert_eq!(escape("x\u{fe0f}"), "x\\u{fe0f}");
        assert_eq!(escape("🙂\u{200d}"), "🙂\\u{200d}");
        assert_eq!(escape("\u{1f3f4}\u{e0067}"), "\u{1f3f4}\\u{e0067}");
        assert_eq!(escape("hi\u{e0067}\u{e007f}"), "hi\\u{e0067}\\u{e007f}");
        // A black flag does not make any run of tags invisible text.
        let smuggled: String = std::iter::once('\u{1f3f4}')
            .chain(
                "secret"
                    .chars()
                    .map(|c| char::from_u32(0xE0000 + c as u32).unwrap()),
            )
            .chain(std::iter::once('\u{e007f}'))
            .collect();
        assert!(
            escape(&smuggled).starts_with("\u{1f3f4}\\u{e0073}"),
            "{}",
            escape(&smuggled)
        );
        let upper: String =
            "\u{1f3f4}\u{e0047}\u{e0042}\u{e0045}\u{e004e}\u{e0047}\u{e007f}".into();
        assert!(!is_safe(&upper));
    }

    #[test]
    fn json_lines_escape_the_same_set_and_keep_the_text() {
        let text = "a\u{7f}b\u{85}c\u{202e}d\u{e0041}e\u{2028}f\"\\\n👩\u{200d}💻";
        let line = json_line(&serde_json::json!({ "text": text }));
        assert_eq!(
            line,
            r#"{"text":"a\u007fb\u0085c\u202ed\udb40\udc41e\u2028f\"\\\n👩‍💻"}"#
        );
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["text"], text);
        assert!(line.chars().all(|c| !is_hidden(c) || c == '\u{200d}'));
    }
}
