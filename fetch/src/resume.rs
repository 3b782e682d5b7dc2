//! Resume state and resume decisions, as pure functions: what is on disk, what we asked and
//! what the server answered go in; what to do comes out. Nothing here touches a file or the
//! network (see `files` and `download`).
//!
//! For `NAME` there are at most two files: `NAME` (only ever a complete, verified download)
//! and `NAME.part` (bytes received so far, exactly as the server sent them). The state (URL,
//! validators, expected length, completeness) is kept in the extended attribute
//! `user.corokit.fetch` of whichever of the two it describes, so it cannot be separated from
//! its bytes and moves with the final rename; a filesystem without user xattrs gets a sidecar
//! `.NAME.fetch` instead. A complete file's state is the short form `done LENGTH URLHASH` (the
//! first 96 bits of the URL's SHA-256), small enough to stay inside an ext4 inode.
//!
//! **The rule**: bytes are appended to a partial file only when the answer is exactly the
//! continuation we asked for, of the version we recorded: a 206 whose `Content-Range` starts
//! where the file ends, runs to the end of a file of the recorded length, and carries the
//! recorded validator. Anything else starts over or fails, and says why.

use serde::{Deserialize, Serialize};

/// Longest URL or validator kept in a state: the whole state must fit one extended attribute
/// (about 4 KiB on ext4). A longer URL is kept by its hash; a longer validator is not kept,
/// so that download cannot be resumed.
pub const MAX_STORED: usize = 1024;

/// The recorded state of one download.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// The full length of the file, when the server said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    pub complete: bool,
    /// What a state keeps instead of `url` when the URL is long, and the short form of a
    /// complete file always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_hash: Option<String>,
    /// A partial file written in segments (`--split`): full length, with only these byte
    /// ranges (`[start, end)`) written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<[u64; 2]>>,
    /// The Last-Modified was less than a second before the answer's Date: the file may have
    /// changed again within that second, so the date cannot tell the two apart and is no
    /// validator (RFC 9110 §8.8.2.2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub last_modified_weak: bool,
}

impl State {
    /// The state of a new download of `url`, whose answer gave these validators, this `Date`
    /// and length.
    pub fn new(
        url: &str,
        (etag, last_modified, date): (Option<&str>, Option<&str>, Option<&str>),
        length: Option<u64>,
    ) -> State {
        let kept = |v: Option<&str>| v.filter(|v| v.len() <= MAX_STORED).map(str::to_string);
        let long = url.len() > MAX_STORED;
        State {
            url: if long { String::new() } else { url.to_string() },
            url_hash: long.then(|| url_hash(url)),
            etag: kept(etag),
            last_modified: kept(last_modified),
            length,
            complete: false,
            ranges: None,
            last_modified_weak: last_modified
                .zip(date)
                .is_some_and(|(lm, date)| within_a_second(lm, date)),
        }
    }

    /// True if this is the state of a download of `url`.
    pub fn belongs_to(&self, url: &str) -> bool {
        match &self.url_hash {
            Some(hash) => *hash == url_hash(url),
            None => self.url == url,
        }
    }

    /// True if both are states of a download of the same URL.
    pub fn same_download(&self, other: &State) -> bool {
        let key = |s: &State| s.url_hash.clone().unwrap_or_else(|| url_hash(&s.url));
        key(self) == key(other)
    }

    /// The bytes a split download's ranges say are written; `None` when there are no ranges
    /// or they are not a list fetch could have written (spans in order, each within the
    /// length and not empty): such a list was planted, and its sums could wrap.
    pub fn recorded_bytes(&self) -> Option<u64> {
        let (done, want) = (self.ranges.as_ref()?, self.length?);
        let sound = done.iter().all(|&[a, b]| a < b && b <= want)
            && done.windows(2).all(|w| w[0][1] <= w[1][0]);
        sound.then(|| done.iter().map(|[a, b]| b - a).sum())
    }

    /// The validator to send in `If-Range`: a strong ETag, else Last-Modified from a server
    /// that gave no ETag. A weak ETag cannot be used for ranges, and a client that has one
    /// must not send a date instead (RFC 9110 §13.1.5): the server only promised the two
    /// copies mean the same, not that their bytes are.
    pub fn validator(&self) -> Option<&str> {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) if !e.starts_with("W/") => Some(e),
            (None, Some(lm)) if !self.last_modified_weak => Some(lm),
            _ => None,
        }
    }
}

/// Whether `last_modified` is less than a second before `date` (or after it), as answered
/// together: then it is a weak validator (RFC 9110 §8.8.2.2). Dates that do not parse say
/// nothing.
pub fn within_a_second(last_modified: &str, date: &str) -> bool {
    match (
        httpdate::parse_http_date(last_modified),
        httpdate::parse_http_date(date),
    ) {
        (Ok(lm), Ok(date)) => date
            .duration_since(lm)
            .map_or(true, |d| d < std::time::Duration::from_secs(1)),
        _ => false,
    }
}

/// What the recorded state is.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    None,
    /// Present but not valid (torn, edited or planted): not taken as fetch's.
    Unreadable,
    Valid(State),
}

/// The stored form: short for a complete file of known length, else JSON.
pub fn encode(state: &State) -> Vec<u8> {
    match (state.complete, state.length) {
        (true, Some(length)) => {
            let hash = state
                .url_hash
                .clone()
                .unwrap_or_else(|| url_hash(&state.url));
            format!("done {length} {hash}").into_bytes()
        }
        _ => serde_json::to_vec(state).expect("a State serialises"),
    }
}

pub fn parse(value: &[u8]) -> Record {
    if let Some(short) = value.strip_prefix(b"done ") {
        let text = std::str::from_utf8(short).unwrap_or("");
        let mut parts = text.split(' ');
        return match (
            parts.next().map(str::parse::<u64>),
            parts.next(),
            parts.next(),
        ) {
            (Some(Ok(length)), Some(hash), None)
                if hash.len() == 24 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Record::Valid(State {
                    length: Some(length),
                    complete: true,
                    url_hash: Some(hash.to_string()),
                    ..State::default()
                })
            }
            _ => Record::Unreadable,
        };
    }
    serde_json::from_slice(value).map_or(Record::Unreadable, Record::Valid)
}

/// The first 96 bits of the URL's SHA-256, in hex.
pub fn url_hash(url: &str) -> String {
    crate::hex(&ring::digest::digest(&ring::digest::SHA256, url.as_bytes()).as_ref()[..12])
}

/// What to do for a download, from its record and the sizes of its files (`None`: absent).
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Complete from an earlier run.
    Skip,
    /// Ask for the rest of `.part` from `offset`, if the server's copy still matches.
    Resume { offset: u64, validator: String },
    /// Ask for the ranges of a segmented `.part` not in `done`, if the server's copy still
    /// matches.
    Segments {
        done: Vec<[u64; 2]>,
        validator: String,
    },
    /// Ask for the whole file (no record, a missing file, or a partial that cannot be
    /// continued safely); `why` says which when it is worth telling.
    Fresh { why: Option<&'static str> },
}

/// Decides from the record (already known to be this URL's) and the files present.
pub fn plan(state: Option<&State>, done: Option<u64>, part: Option<u64>) -> Plan {
    let Some(state) = state else {
        return Plan::Fresh { why: None };
    };
    if state.complete {
        return match done {
            Some(len) if state.length.is_none_or(|want| want == len) => Plan::Skip,
            Some(_) => Plan::Fresh {
                why: Some("the finished file changed size since it was downloaded"),
            },
            None => Plan::Fresh {
                why: Some("the finished file is gone"),
            },
        };
    }
    if let Some(done) = &state.ranges {
        return match (part, state.length, state.validator()) {
            (Some(len), Some(want), Some(_)) if len == want && state.recorded_bytes().is_none() => {
                Plan::Fresh {
                    why: Some("the partial file's record of its ranges is not one fetch wrote"),
                }
            }
            (Some(len), Some(want), Some(v)) if len == want => Plan::Segments {
                done: done.clone(),
                validator: v.to_string(),
            },
            (None, ..) => Plan::Fresh {
                why: Some("the partial file is gone"),
            },
            _ => Plan::Fresh {
                why: Some("the partial file changed size since it was written"),
            },
        };
    }
    match (part, state.validator()) {
        (None, _) => Plan::Fresh {
            why: Some("the partial file is gone"),
        },
        (Some(_), None) => Plan::Fresh {
            why: Some("the server gave no validator to resume against"),
        },
        (Some(offset), _) if state.length.is_some_and(|l| offset > l) => Plan::Fresh {
            why: Some("the partial file is longer than the whole file"),
        },
        (Some(offset), Some(v)) => Plan::Resume {
            offset,
            validator: v.to_string(),
        },
    }
}

/// What was asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    Whole,
    /// The whole file with `If-Modified-Since: SINCE` (`-N`): a complete file is fetched
    /// again only if the server's copy is newer.
    IfNewer {
        since: String,
    },
    /// `Range: bytes=OFFSET-` with `If-Range: VALIDATOR`.
    From {
        offset: u64,
        validator: String,
    },
    /// `Range: bytes=FIRST-LAST` with `If-Range: VALIDATOR`: one segment of a split download.
    Range {
        first: u64,
        last: u64,
        validator: String,
    },
}

/// What the server answered: the status and the headers that matter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer<'a> {
    pub status: u16,
    pub content_range: Option<&'a str>,
    pub content_length: Option<u64>,
    pub content_type: Option<&'a str>,
    pub etag: Option<&'a str>,
    pub last_modified: Option<&'a str>,
}

/// What to do with an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A whole body: write it from the start. `length` is what must arrive, when known.
    Whole { length: Option<u64> },
    /// Write exactly the segment asked for (a 206 with that range of the recorded version).
    Segment,
    /// Append exactly `length` bytes at `offset`; the file is then `total` bytes.
    Append {
        offset: u64,
        length: u64,
        total: u64,
    },
    /// Everything was already there: finish the partial file as it is.
    Complete,
    /// The answer does not continue what we have: discard the partial file and ask for the
    /// whole file.
    StartOver(String),
    /// The answer cannot be used, and asking the same server again will not help.
    Refuse(String),
    /// 304 to [`Ask::IfNewer`]: the file we have is the server's.
    Unchanged,
    /// Not a success: redirects, errors and retries are the caller's.
    NotSuccess,
}

/// `bytes FIRST-LAST/TOTAL` (or `bytes */TOTAL`), strictly: no spaces inside, decimal digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRange {
    Range {
        first: u64,
        last: u64,
        total: Option<u64>,
    },
    Unsatisfied {
        total: u64,
    },
}

pub fn content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let total = match total {
        "*" => None,
        t => Some(number(t)?),
    };
    if range == "*" {
        return Some(ContentRange::Unsatisfied { total: total? });
    }
    let (first, last) = range.split_once('-')?;
    Some(ContentRange::Range {
        first: number(first)?,
        last: number(last)?,
        total,
    })
}

/// Decides what an answer means for a download that asked `ask` with `record` on disk.
pub fn decide(ask: &Ask, record: Option<&State>, answer: &Answer<'_>) -> Decision {
    let whole = || Decision::Whole {
        length: answer.content_length,
    };
    match (answer.status, ask) {
        (
            206,
            Ask::Range {
                first,
                last,
                validator,
            },
        ) => match exact_range(*first, *last, validator, record, answer) {
            Ok(()) => Decision::Segment,
            Err(why) => Decision::StartOver(why),
        },
        (200 | 416, Ask::Range { .. }) => Decision::StartOver(format!(
            "the server answered {} to a request for a range of the file",
            answer.status
        )),
        (200, _) => whole(),
        (304, Ask::IfNewer { .. }) => Decision::Unchanged,
        (206, Ask::Whole | Ask::IfNewer { .. }) => Decision::Refuse(
            "the server sent part of the file (206) for a request of all of it".into(),
        ),
        (206, Ask::From { offset, validator }) => continuation(*offset, validator, record, answer),
        (416, Ask::Whole | Ask::IfNewer { .. }) => {
            Decision::Refuse("the server answered 416 to a request for the whole file".into())
        }
        (416, Ask::From { offset, .. }) => {
            let total = answer.content_range.and_then(content_range);
            let recorded = record.and_then(|s| s.length);
            match total {
                Some(ContentRange::Unsatisfied { total })
                    if total == *offset && recorded == Some(*offset) =>
                {
                    Decision::Complete
                }
                _ => Decision::StartOver(format!(
                    "the server cannot continue the partial file from byte {offset}"
                )),
            }
        }
        (200..=299, _) => {
            Decision::Refuse(format!("HTTP {} is not a file download", answer.status))
        }
        _ => Decision::NotSuccess,
    }
}

/// A 206 to `Range: bytes=OFFSET-`: appended only if it is exactly that continuation, of the
/// recorded version.
fn continuation(
    offset: u64,
    validator: &str,
    record: Option<&State>,
    answer: &Answer<'_>,
) -> Decision {
    let total = match record.and_then(|s| s.length) {
        Some(total) => total,
        // Nothing recorded says how long the file is: the answer's total, checked below.
        None => match answer.content_range.and_then(content_range) {
            Some(ContentRange::Range {
                total: Some(total), ..
            }) => total,
            _ => offset.saturating_add(1),
        },
    };
    match exact_range(offset, total.saturating_sub(1), validator, record, answer) {
        Ok(()) => Decision::Append {
            offset,
            length: total - offset,
            total,
        },
        Err(why) => Decision::StartOver(why),
    }
}

/// Why a 206 is not exactly bytes `want_first..=want_last` of the version `record`
/// describes (carrying the `validator` sent in `If-Range`), if it is not.
fn exact_range(
    want_first: u64,
    want_last: u64,
    validator: &str,
    record: Option<&State>,
    answer: &Answer<'_>,
) -> Result<(), String> {
    if answer
        .content_type
        .is_some_and(|t| t.trim().to_ascii_lowercase().starts_with("multipart/"))
    {
        return Err("the server sent several ranges instead of one".into());
    }
    let Some(range) = answer.content_range.and_then(content_range) else {
        return Err("the partial answer has no usable Content-Range".into());
    };
    let ContentRange::Range {
        first,
        last,
        total: Some(total),
    } = range
    else {
        return Err("the partial answer does not say how long the file is".into());
    };
    if first != want_first {
        return Err(format!(
            "the server sent bytes from {first}, not from {want_first}"
        ));
    }
    if last < first || last >= total {
        return Err(format!("the range {first}-{last}/{total} is not valid"));
    }
    let Some(state) = record else {
        return Err("nothing is recorded about the partial file".into());
    };
    if state.length.is_some_and(|l| l != total) {
        return Err(format!(
            "the file is now {total} bytes; it was {}",
            state.length.unwrap_or(0)
        ));
    }
    if last != want_last {
        let wanted = match want_last + 1 == total {
            true => "the rest of the file".to_string(),
            false => format!("{want_first}-{want_last}"),
        };
        return Err(format!(
            "the server sent bytes {first}-{last} of {total}, not {wanted}"
        ));
    }
    let length = last - first + 1;
    if answer.content_length.is_some_and(|l| l != length) {
        return Err(format!(
            "Content-Length {} does not match the range {first}-{last}",
            answer.content_length.unwrap_or(0)
        ));
    }
    // The validator we sent must come back: a server or cache that ignores If-Range would
    // otherwise splice two versions.
    let same = if state.etag.as_deref() == Some(validator) {
        answer.etag == Some(validator)
    } else {
        answer.last_modified == Some(validator)
            && answer.etag.is_none_or(|e| state.etag.as_deref() == Some(e))
    };
    if !same {
        return Err("the server's copy changed since the partial download".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
