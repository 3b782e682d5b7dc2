//! File names: derived from the URL or given by the list or the server, and made safe so
//! no name can leave the output directory or upset a terminal or another OS.

use percent_encoding::percent_decode_str;

/// A safe name, and whether it had to be changed from what was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct SafeName {
    pub name: String,
    pub changed: bool,
}

/// The name for a URL: its last path segment, percent-decoded, without query or fragment;
/// `index.html` when the path is empty or ends in `/`.
pub fn from_url(url: &str) -> SafeName {
    let path = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest.find('/').map_or("", |i| &rest[i..]));
    let path = path.split(['?', '#']).next().unwrap_or("");
    let last = path.rsplit('/').next().unwrap_or("");
    if last.is_empty() {
        return SafeName {
            name: "index.html".into(),
            changed: false,
        };
    }
    let decoded = percent_decode_str(last).decode_utf8_lossy();
    let safe = sanitize(&decoded);
    // A name that only lost its percent-encoding is not "changed" for the user.
    SafeName {
        changed: safe.name != decoded,
        name: safe.name,
    }
}

/// The parameters of a header value like `attachment; filename="a;b.pdf"; size=3`, as
/// (lower-case name, value) with quoted strings unquoted (RFC 9110 §5.6.4, §5.6.6).
fn parameters(header: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = header.chars().peekable();
    // The disposition type.
    while chars.next_if(|&c| c != ';').is_some() {}
    while chars.next() == Some(';') {
        let mut name = String::new();
        while let Some(c) = chars.next_if(|&c| c != '=' && c != ';') {
            name.push(c);
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
            while chars.next_if(|&c| c != ';').is_some() {}
        } else {
            while let Some(c) = chars.next_if(|&c| c != ';') {
                value.push(c);
            }
            value = value.trim_end().to_string();
        }
        out.push((name.trim().to_ascii_lowercase(), value));
    }
    out
}

/// The filename a `Content-Disposition` header offers (`filename*=UTF-8''…` preferred).
pub fn from_content_disposition(header: &str) -> Option<SafeName> {
    let params = parameters(header);
    if let Some((_, value)) = params.iter().find(|(n, _)| n == "filename*") {
        let encoded = value.splitn(3, '\'').nth(2).unwrap_or(value);
        let decoded = percent_decode_str(encoded).decode_utf8_lossy();
        return Some(sanitize(&decoded));
    }
    params
        .iter()
        .find(|(n, _)| n == "filename")
        .map(|(_, v)| sanitize(v))
}

/// Makes `name` a single safe path component: no separators, NUL, control or bidi
/// characters, no `.`/`..`, no leading dot (hidden files, and our own state files), no
/// Windows device names, no names our partial/state files use, at most 200 bytes.
pub fn sanitize(name: &str) -> SafeName {
    let mut out: String = name
        .chars()
        .map(|c| {
            let bad = c == '/'
                || c == '\\'
                || c.is_control()
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}');
            if bad {
                '_'
            } else {
                c
            }
        })
        .collect();
    out = out.trim_end_matches(['.', ' ']).trim_start().to_string();
    if out.starts_with('.') {
        out.replace_range(..1, "_");
    }
    if out.is_empty() {
        out = "_".into();
    }
    let stem = out.split('.').next().unwrap_or("").to_ascii_uppercase();
    let reserved = matches!(stem.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((stem.starts_with("COM") || stem.starts_with("LPT"))
            && stem.len() == 4
            && stem.as_bytes()[3].is_ascii_digit());
    if reserved {
        out.insert(0, '_');
    }
    if out.len() > MAX_NAME {
        let ext = out
            .rfind('.')
            .filter(|&i| out.len() - i <= 16)
            .map(|i| out[i..].to_string())
            .unwrap_or_default();
        out = format!("{}{}", cut_to(&out, MAX_NAME - ext.len()), ext);
        out = out.trim_end_matches(['.', ' ']).to_string();
    }
    // After the cut, which can make a name end like our own files.
    if out.ends_with(".part") || out.ends_with(".fetch") {
        if out.len() == MAX_NAME {
            out = cut_to(&out, MAX_NAME - 4).to_string();
        }
        out.push('_');
    }
    SafeName {
        changed: out != name,
        name: out,
    }
}

/// A `dir=` value as a relative path of safe components (`..` and roots dropped).
pub fn safe_subdir(dir: &str) -> (std::path::PathBuf, bool) {
    let mut path = std::path::PathBuf::new();
    let mut changed = false;
    for part in dir.split(['/', '\\']) {
        if part.is_empty() || part == "." {
            continue;
        }
        if part == ".." {
            changed = true;
            continue;
        }
        let safe = sanitize(part);
        changed |= safe.changed;
        path.push(safe.name);
    }
    (path, changed)
}

/// Longest name fetch gives a file, in bytes.
pub const MAX_NAME: usize = 200;

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut_to(text: &str, max: usize) -> &str {
    let mut cut = max.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// `name` (a name [`sanitize`] gave) with `.N` before its extension: `f.bin` → `f.1.bin`,
/// `f` → `f.1`; the stem is cut so the result stays within [`MAX_NAME`], and is itself a
/// name `sanitize` leaves alone.
pub fn numbered(name: &str, n: u32) -> String {
    // An extension as `sanitize` keeps one: up to 16 bytes.
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= 16 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let suffix = format!(".{n}{ext}");
    format!(
        "{}{suffix}",
        cut_to(stem, MAX_NAME.saturating_sub(suffix.len()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_urls() {
        assert_eq!(
            from_url("http://h/a/b/file.tar.gz?x=1#f").name,
            "file.tar.gz"
        );
        assert_eq!(from_url("http://h/").name, "index.html");
        assert_eq!(from_url("http://h").name, "index.html");
        assert_eq!(from_url("http://h/dir/").name, "index.html");
        let spaced = from_url("http://h/my%20file.txt");
        assert_eq!(
            (spaced.name.as_str(), spaced.changed),
            ("my file.txt", false)
        );
    }

    #[test]
    fn hostile_names_stay_inside_the_directory() {
        for (raw, want) in [
            (
                "http://h/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                "_._.._etc_passwd",
            ),
            ("http://h/..", "_"),
            ("http://h/a%00b", "a_b"),
            ("http://h/%1b%5b2Jx", "_[2Jx"),
            ("http://h/CON.txt", "_CON.txt"),
            ("http://h/.bashrc", "_bashrc"),
            ("http://h/evil%E2%80%AEtxt.exe", "evil_txt.exe"),
            ("http://h/x.part", "x.part_"),
        ] {
            let got = from_url(raw);
            assert_eq!(got.name, want, "{raw}");
            assert!(got.changed, "{raw}");
            assert!(!got.name.contains('/') && got.name != "..");
        }
    }

    #[test]
    fn content_disposition_and_subdirs() {
        let cd = from_content_disposition("attachment; filename=\"../../x.sh\"").unwrap();
        assert_eq!(cd.name, "_._.._x.sh");
        let utf8 = from_content_disposition(
            "attachment; filename=a.txt; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf",
        );
        assert_eq!(utf8.unwrap().name, "résumé.pdf");
        for (header, want) in [
            ("attachment; filename=\"a;b.pdf\"", "a;b.pdf"),
            (
                "attachment;filename=\"q\\\"uote.txt\"; size=3",
                "q\"uote.txt",
            ),
            ("inline; FILENAME = plain.txt ; x=1", "plain.txt"),
            ("attachment; name=\"x\"; filename=\"\"", "_"),
        ] {
            assert_eq!(
                from_content_disposition(header).unwrap().name,
                want,
                "{header}"
            );
        }
        assert_eq!(from_content_disposition("attachment"), None);
        assert_eq!(
            safe_subdir("../a/./b/../../c"),
            (["a", "b", "c"].iter().collect(), true)
        );
    }

    #[test]
    fn numbering_keeps_the_extension() {
        assert_eq!(numbered("f.bin", 1), "f.1.bin");
        // Whatever the name: a given name is stable, within the limit, and never one of
        // fetch's own (a `.part` of another download), numbered or not.
        let mut rng = fastrand::Rng::with_seed(5);
        let pieces = [
            "a",
            "é",
            "語",
            ".",
            ".part",
            ".fetch",
            " ",
            "x".repeat(64).leak(),
            "/",
            "..",
            ".tar.gz",
        ];
        for _ in 0..20_000 {
            let raw: String = (0..rng.usize(1..12))
                .map(|_| *rng.choice(&pieces).unwrap())
                .collect();
            let safe = sanitize(&raw).name;
            for name in [safe.clone(), numbered(&safe, rng.u32(1..10_000))] {
                assert!(name.len() <= MAX_NAME, "{name:?}");
                assert!(
                    !name.ends_with(".part") && !name.ends_with(".fetch"),
                    "{raw:?} -> {name:?}"
                );
                assert!(
                    !sanitize(&name).changed,
                    "{raw:?} -> {name:?} is not stable"
                );
            }
        }
        assert_eq!(numbered("f", 2), "f.2");
        assert_eq!(numbered("_bashrc", 1), "_bashrc.1");
    }
}
