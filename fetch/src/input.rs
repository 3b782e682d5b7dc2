//! The input list: one URL per line, in aria2's input-file format so users can reuse their
//! lists. Blank lines and `#` comments are ignored; tab-separated URLs on one line are
//! mirrors of the same file; indented `key=value` lines under a URL set its options.

use corokit_common::stdin::Lines;

use crate::checksum::Checksum;
use crate::shown::Shown;

/// One file to download, as the list describes it (and as a shared queue carries it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// 1-based line of the URL in the list.
    pub line: usize,
    /// The URL and its mirrors, tried in this order.
    pub urls: Vec<String>,
    /// `out=`: the file name to save as.
    pub out: Option<String>,
    /// `dir=`: a subdirectory of the output directory.
    pub dir: Option<String>,
    /// `checksum=ALGO=HEX`: what the file must hash to.
    pub checksum: Option<Checksum>,
    /// The id of the shared queue's stream entry it came from (see `queue`).
    #[serde(skip)]
    pub queue_id: Option<String>,
}

/// A line that could not be used; the rest of the list still runs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

/// Turns lines into entries as they arrive, so a list of any length is read lazily.
/// An entry is complete when the next URL line (or the end) shows its options are over.
#[derive(Debug, Default)]
pub struct Parser {
    line: usize,
    pending: Option<Entry>,
    /// Options of a URL line that was rejected are skipped with it.
    skipping_options: bool,
}

/// What one line yields: at most one finished entry and at most one bad line.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub entry: Option<Entry>,
    pub bad: Option<BadLine>,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next line of the list.
    pub fn push(&mut self, text: &str) -> Parsed {
        self.line += 1;
        let line = self.line;
        let mut out = Parsed::default();
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            return out;
        }
        if text.starts_with([' ', '\t']) {
            if self.skipping_options {
                return out;
            }
            match self.pending.as_mut() {
                None => out.bad = Some(bad(line, "an option line with no URL above it")),
                Some(entry) => {
                    if let Err(reason) = apply_option(entry, trimmed) {
                        out.bad = Some(bad(line, &reason));
                    }
                }
            }
            return out;
        }
        out.entry = self.pending.take();
        let mut urls = Vec::new();
        for url in trimmed.split('\t').map(str::trim).filter(|u| !u.is_empty()) {
            match check_url(url) {
                Ok(()) => urls.push(url.to_string()),
                Err(reason) => {
                    out.bad = Some(bad(line, &reason));
                    self.skipping_options = true;
                    return out;
                }
            }
        }
        self.skipping_options = false;
        self.pending = Some(Entry {
            line,
            urls,
            out: None,
            dir: None,
            checksum: None,
            queue_id: None,
        });
        out
    }

    /// A line too long to read (it was skipped without being kept): a bad line, and the
    /// options under it go with it.
    pub fn push_too_long(&mut self, limit: usize) -> Parsed {
        self.line += 1;
        self.skipping_options = true;
        Parsed {
            entry: self.pending.take(),
            bad: Some(bad(
                self.line,
                &format!("the line is longer than {limit} bytes"),
            )),
        }
    }

    /// Ends the list, returning the last entry if any.
    pub fn finish(&mut self) -> Option<Entry> {
        self.pending.take()
    }
}

fn bad(line: usize, reason: &str) -> BadLine {
    BadLine {
        line,
        reason: reason.to_string(),
    }
}

/// Accepts absolute http and https URLs that the HTTP client can parse.
pub fn check_url(url: &str) -> Result<(), String> {
    let shown = Shown(url);
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| format!("{shown} is not a valid URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(other) => {
            return Err(format!(
                "{shown}: only http and https are supported, not {other}"
            ))
        }
        None => return Err(format!("{shown} is not an absolute http or https URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{shown} has no host"));
    }
    Ok(())
}

fn apply_option(entry: &mut Entry, option: &str) -> Result<(), String> {
    let (key, value) = option
        .split_once('=')
        .ok_or_else(|| format!("{} is not a key=value option", Shown(option)))?;
    let value = value.trim();
    match key.trim() {
        "out" => entry.out = Some(value.to_string()),
        "dir" => entry.dir = Some(value.to_string()),
        "checksum" => entry.checksum = Some(Checksum::parse(value)?),
        other => return Err(format!("unknown option {}", Shown(other))),
    }
    Ok(())
}

/// Whether a command-line argument is a URL rather than a list's path: it starts with a
/// scheme (`http://`, `https://`, or any `NAME://`, which then fails as a URL with a reason).
pub fn looks_like_url(arg: &str) -> bool {
    arg.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

/// The input of a run from its arguments: one list (`fetch LIST`), or URLs, with a list
/// after `-i`. URLs come first (lines 1 to N, in order), then the list's lines (numbered on
/// from N + 1). A URL argument with a tab or a line break in it would read as mirrors or two
/// lines: it is refused, as is an argument that is not a URL beside others.
///
/// `checksum` (`--checksum ALGO=HEX`) is for one URL given as the only argument.
pub fn command_line(
    args: &[String],
    input_file: Option<&str>,
    checksum: Option<&str>,
) -> Result<Lines, String> {
    let (urls, list) = match (args, input_file) {
        ([one], None) if !looks_like_url(one) => (&[][..], Some(one.as_str())),
        (urls, list) => (urls, list),
    };
    let option = match (checksum, urls, list) {
        (None, ..) => String::new(),
        (Some(c), [_], None) => format!("  checksum={}\n", Checksum::parse(c)?.shown()),
        (Some(_), ..) => return Err("--checksum goes with one URL and no list".into()),
    };
    if let Some(odd) = urls.iter().find(|u| !looks_like_url(u)) {
        return Err(format!(
            "{} is not a URL; give one list, or URLs (a list with URLs goes after -i)",
            Shown(odd)
        ));
    }
    if let Some(bad) = urls.iter().find(|u| u.chars().any(|c| c.is_control())) {
        return Err(format!(
            "the URL argument {} has a control character in it",
            Shown(bad)
        ));
    }
    let given: String = urls.iter().map(|u| format!("{u}\n{option}")).collect();
    let given = std::io::Cursor::new(given.into_bytes());
    Ok(match list {
        None => corokit_common::stdin::read_lines(given),
        Some("-") if urls.is_empty() => corokit_common::stdin::lines(),
        Some("-") => {
            return Err("standard input (-) as the list goes alone, without URL arguments".into())
        }
        Some(path) => {
            let file = std::fs::File::open(path)
                .map_err(|e| format!("cannot read the list {}: {e}", Shown(path)))?;
            corokit_common::stdin::read_lines(std::io::Read::chain(given, file))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &str) -> (Vec<Entry>, Vec<BadLine>) {
        let mut p = Parser::new();
        let (mut entries, mut bad) = (Vec::new(), Vec::new());
        for line in list.lines() {
            let out = p.push(line);
            entries.extend(out.entry);
            bad.extend(out.bad);
        }
        entries.extend(p.finish());
        (entries, bad)
    }

    #[test]
    fn aria2_lists_with_options_mirrors_and_comments() {
        let sum = "ab".repeat(32);
        let list = format!(
            "# a comment\n\nhttp://a/x.bin\thttp://b/x.bin\n  out=y.bin\n  dir=sub\n  checksum=sha-256={sum}\nhttps://c/z\n"
        );
        let (entries, bad) = parse(&list);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].urls, ["http://a/x.bin", "http://b/x.bin"]);
        assert_eq!(entries[0].out.as_deref(), Some("y.bin"));
        assert_eq!(entries[0].dir.as_deref(), Some("sub"));
        let c = entries[0].checksum.as_ref().unwrap();
        assert_eq!(
            (c.algo, c.digest.clone()),
            (crate::checksum::Algo::Sha256, vec![0xab; 32])
        );
        assert_eq!((entries[1].line, entries[1].urls.len()), (7, 1));
    }

    #[test]
    fn bad_lines_are_named_and_skipped_with_their_options() {
        let list = "ftp://a/x\n  out=skipped\nnot a url\nhttp://ok/1\n  colour=red\n  out=fine\n  checksum=md5=00\n";
        let (entries, bad) = parse(list);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].out.as_deref(), Some("fine"));
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, [1, 3, 5, 7]);
        assert!(
            bad[0].to_string().contains("only http and https"),
            "{}",
            bad[0]
        );
        assert!(
            bad[2].to_string().contains("unknown option \"colour\""),
            "{}",
            bad[2]
        );
    }

    #[test]
    fn control_characters_in_errors_are_escaped() {
        let (_, bad) = parse("http://\x1b[2J/x y\n");
        assert!(!bad[0].to_string().contains('\x1b'), "{}", bad[0]);
    }
}
