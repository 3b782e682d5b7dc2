//! Names for files that come from outside (a URL, a server's Content-Disposition, a peer's
//! file offer), made safe: one path component that cannot leave its directory, upset a
//! terminal or another OS, or collide with the partial and state files kept beside it. fetch
//! and chat name their files by this one definition.

/// A safe name, and whether it had to be changed from what was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct SafeName {
    pub name: String,
    pub changed: bool,
}

/// Makes `name` a single safe path component: no separators, NUL, control, bidi, format or
/// other invisible characters, no `.`/`..`, no leading dot (hidden files, and our own state files), no
/// Windows device names, no names our partial/state files use, at most 200 bytes.
pub fn sanitize(name: &str) -> SafeName {
    let mut out: String = name
        .chars()
        .map(|c| {
            // Every character the terminal escaping hides (controls, bidi and other format
            // characters, separators, default-ignorables): a saved name cannot pass for
            // another one beside it.
            let bad = c == '/' || c == '\\' || crate::text::is_hidden(c);
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
    fn hostile_names_become_one_safe_component() {
        for (raw, want) in [
            ("../../etc/passwd", "_._.._etc_passwd"),
            ("..", "_"),
            ("a\0b", "a_b"),
            ("\x1b[2Jx", "_[2Jx"),
            ("CON.txt", "_CON.txt"),
            (".bashrc", "_bashrc"),
            ("evil\u{202e}txt.exe", "evil_txt.exe"),
            // Look-alikes of `report.pdf` by invisible characters.
            ("report\u{200b}.pdf", "report_.pdf"),
            ("re\u{ad}port\u{2060}.pdf", "re_port_.pdf"),
            ("a\u{2028}b\u{e0041}.pdf", "a_b_.pdf"),
            ("x.part", "x.part_"),
            ("", "_"),
        ] {
            let got = sanitize(raw);
            assert_eq!(got.name, want, "{raw:?}");
            assert!(got.changed, "{raw:?}");
        }
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
