//! How text from outside (the list, URLs, server headers, names) appears in fetch's output:
//! quoted, escaped by the one definition in `corokit_common::text`, cut to a readable length,
//! and with any password in a URL replaced by `***`.

use std::borrow::Cow;
use std::fmt;

use corokit_common::text::escape;

/// Longest text shown, in characters.
const SHOWN: usize = 200;

/// Text from outside, quoted and escaped, for messages.
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = redact(self.0);
        let mut cut: String = text.chars().take(SHOWN).collect();
        if text.chars().nth(SHOWN).is_some() {
            cut.push('…');
        }
        write!(f, "\"{}\"", escape(&cut))
    }
}

/// `text` with the credentials of every URL in it replaced by `***`: the password
/// (`http://ann:***@host/`), or the whole user part when it has no password, since that is
/// how tokens are given (`https://***@git.example/`).
pub fn redact(text: &str) -> Cow<'_, str> {
    if !text.contains('@') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let token = tail.find(char::is_whitespace).unwrap_or(tail.len());
        let mut end = tail[..token].find(['/', '?', '#']).unwrap_or(token);
        // A password with `/`, `?` or `#` in it is not a valid URL, but it is a password: an
        // `@` later in the same word, after a `:`, ends the user part instead.
        if let Some(at) = tail[..token].rfind('@') {
            if at > end && tail[..at].contains(':') {
                end = tail[at..token]
                    .find(['/', '?', '#'])
                    .map_or(token, |i| at + i);
            }
        }
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(i) => {
                let userinfo = &authority[..i];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str("***"),
                }
                out.push_str(&authority[i..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("http://ann:s3cret@h.example:8080/f?x=1"),
            "http://ann:***@h.example:8080/f?x=1"
        );
        assert_eq!(
            redact("error for https://bob:pw@a/x and http://c:d@e"),
            "error for https://bob:***@a/x and http://c:***@e"
        );
        assert_eq!(redact("http://tok@h/"), "http://***@h/");
        for (raw, want) in [
            ("http://ann:a#b@h/f x", "http://ann:***@h/f x"),
            ("http://ann:a/b?c@h/f", "http://ann:***@h/f"),
            ("http://ann:p@SECRET@h/f", "http://ann:***@h/f"),
            ("http://h/p@x is fine", "http://h/p@x is fine"),
        ] {
            assert_eq!(redact(raw), want);
        }
        assert_eq!(
            redact("skipped line 1: \"http://ann:pa\"ss1@127.0.0.1/f\""),
            "skipped line 1: \"http://ann:***@127.0.0.1/f\""
        );
        assert_eq!(redact("mail me@example.org"), "mail me@example.org");
        let shown = Shown("http://u:p@h/\u{9b}\u{202e}x").to_string();
        assert_eq!(shown, "\"http://u:***@h/\\u{9b}\\u{202e}x\"");
    }

    #[test]
    fn long_text_is_cut() {
        let shown = Shown(&"a".repeat(1000)).to_string();
        assert_eq!(shown.chars().count(), SHOWN + 3);
    }
}
