//! File names: derived from the URL or given by the list or the server, and made safe (by
//! `corokit_common::names`, which chat's received files share) so no name can leave the
//! output directory or upset a terminal or another OS.

use percent_encoding::percent_decode_str;

pub use corokit_common::names::{numbered, safe_subdir, sanitize, SafeName};

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
    }
}
