//! Making received text safe to print: C0 controls (except tab), DEL, C1 controls and the
//! invisible bidirectional and zero-width formatting characters are shown escaped, so a
//! message (or a nickname) cannot clear the screen, retitle the window, hide text or pass
//! itself off as something else.

/// `text` with every dangerous character replaced by a visible escape like `\u{1b}`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let dangerous = (c.is_control() && c != '\t')
            || matches!(c,
                '\u{200b}'..='\u{200f}'   // zero-width, LRM, RLM
                | '\u{202a}'..='\u{202e}' // bidi embeddings and overrides
                | '\u{2066}'..='\u{2069}' // bidi isolates
                | '\u{061c}'              // Arabic letter mark
                | '\u{feff}');
        if dangerous {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Received bytes as text: invalid UTF-8 becomes U+FFFD, then [`escape`].
pub fn escape_bytes(bytes: &[u8]) -> String {
    escape(&String::from_utf8_lossy(bytes))
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
}
