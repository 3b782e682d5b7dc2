//! Resume state: what a re-run needs to know about each download, kept with it.
//!
//! For `NAME` there are at most two files: `NAME` (only ever a complete, verified download)
//! and `NAME.part` (bytes received so far, exactly as the server sent them). The state (URL,
//! validators, expected length, completeness) is JSON in the extended attribute
//! `user.corokit.fetch` of whichever of the two it describes, so it cannot be separated from
//! its bytes, moves with the final rename, and costs no extra file (file creation dominates
//! the cost of small downloads). On a filesystem without user xattrs it goes to a sidecar
//! `.NAME.fetch` instead.
//!
//! The state is set before the first byte goes to `.part`, so a partial file always has the
//! validators needed to continue it safely with `If-Range`. A state that cannot be parsed
//! (torn by a crash, or edited) only makes that download start over.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The recorded state of one download.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// The full length of the file, when the server said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    pub complete: bool,
}

impl State {
    /// The validator to send in `If-Range`: a strong ETag, else Last-Modified. A weak ETag
    /// cannot be used for ranges (RFC 9110 §13.1.5).
    pub fn validator(&self) -> Option<&str> {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) if !e.starts_with("W/") => Some(e),
            (_, Some(lm)) => Some(lm),
            _ => None,
        }
    }
}

/// The extended attribute that holds the state.
const XATTR: &str = "user.corokit.fetch";

/// The paths of one download.
#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    pub done: PathBuf,
    pub part: PathBuf,
    /// The sidecar, used only where extended attributes are not supported.
    pub state: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path, name: &str) -> Self {
        Paths {
            done: dir.join(name),
            part: dir.join(format!("{name}.part")),
            state: dir.join(format!(".{name}.fetch")),
        }
    }

    /// The state of this download: the partial file's if there is one (a download in
    /// progress, even over an older complete copy), else the complete file's.
    pub fn load(&self) -> Record {
        for file in [&self.part, &self.done] {
            // An error means no such file or no xattrs here: look further.
            if let Ok(Some(json)) = xattr::get(file, XATTR) {
                return parse(&json);
            }
        }
        match fs::read(&self.state) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Record::None,
            Err(_) => Record::Unreadable,
            Ok(json) => parse(&json),
        }
    }

    /// Records `state` on the file it describes (`NAME` when complete, else `NAME.part`),
    /// which must exist.
    pub fn save(&self, state: &State) -> io::Result<()> {
        let json = serde_json::to_vec(state).map_err(io::Error::other)?;
        let file = if state.complete {
            &self.done
        } else {
            &self.part
        };
        match xattr::set(file, XATTR, &json) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => fs::write(&self.state, json),
            Err(e) => Err(e),
        }
    }
}

fn parse(json: &[u8]) -> Record {
    serde_json::from_slice(json).map_or(Record::Unreadable, Record::Valid)
}

/// The filesystem (or the platform) has no user extended attributes.
fn unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported || e.raw_os_error() == Some(95) // EOPNOTSUPP
}

/// What the recorded state is.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    None,
    /// Present but not valid JSON (torn by a crash, or edited): fetch's, but unusable.
    Unreadable,
    Valid(State),
}

/// What to do for a download, from what is on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Complete from an earlier run.
    Skip,
    /// Continue `.part` from `offset`, if the server's copy still matches `validator`.
    Resume { offset: u64, validator: String },
    /// Start from nothing (no record, a missing file, or a partial that cannot be
    /// continued safely); `why` says which when it is worth telling.
    Fresh { why: Option<&'static str> },
}

/// Decides from the record (already known to be this URL's) and the files present.
pub fn plan(paths: &Paths, state: Option<&State>) -> Plan {
    let Some(state) = state else {
        return Plan::Fresh { why: None };
    };
    let size = |p: &Path| fs::metadata(p).ok().map(|m| m.len());
    if state.complete {
        return match size(&paths.done) {
            Some(len) if state.length.is_none_or(|want| want == len) => Plan::Skip,
            Some(_) => Plan::Fresh {
                why: Some("the finished file changed size since it was downloaded"),
            },
            None => Plan::Fresh {
                why: Some("the finished file is gone"),
            },
        };
    }
    match (size(&paths.part), state.validator()) {
        (None, _) => Plan::Fresh {
            why: Some("the partial file is gone"),
        },
        (Some(_), None) => Plan::Fresh {
            why: Some("the server gave no validator to resume against"),
        },
        (Some(offset), Some(v)) => Plan::Resume {
            offset,
            validator: v.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(complete: bool) -> State {
        State {
            url: "http://h/f".into(),
            etag: Some("\"v1\"".into()),
            last_modified: None,
            length: Some(5),
            complete,
        }
    }

    #[test]
    fn the_four_states() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path(), "f");
        assert_eq!(plan(&paths, None), Plan::Fresh { why: None });

        fs::write(&paths.part, b"abc").unwrap();
        let resume = plan(&paths, Some(&state(false)));
        assert_eq!(
            resume,
            Plan::Resume {
                offset: 3,
                validator: "\"v1\"".into()
            }
        );

        fs::remove_file(&paths.part).unwrap();
        assert!(matches!(
            plan(&paths, Some(&state(false))),
            Plan::Fresh { why: Some(_) }
        ));

        fs::write(&paths.done, b"abcde").unwrap();
        assert_eq!(plan(&paths, Some(&state(true))), Plan::Skip);
        fs::remove_file(&paths.done).unwrap();
        assert!(matches!(
            plan(&paths, Some(&state(true))),
            Plan::Fresh { why: Some(_) }
        ));
    }

    #[test]
    fn weak_etags_fall_back_to_last_modified() {
        let mut s = state(false);
        s.etag = Some("W/\"x\"".into());
        assert_eq!(s.validator(), None);
        s.last_modified = Some("Sun, 22 Nov 2026 01:00:00 GMT".into());
        assert_eq!(s.validator(), Some("Sun, 22 Nov 2026 01:00:00 GMT"));
    }

    #[test]
    fn state_travels_with_the_file_it_describes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path(), "f.bin");
        assert_eq!(paths.load(), Record::None);
        fs::write(&paths.part, b"abc").unwrap();
        paths.save(&state(false)).unwrap();
        assert_eq!(paths.load(), Record::Valid(state(false)));
        fs::rename(&paths.part, &paths.done).unwrap();
        assert_eq!(
            paths.load(),
            Record::Valid(state(false)),
            "the rename lost the state"
        );
        paths.save(&state(true)).unwrap();
        assert_eq!(paths.load(), Record::Valid(state(true)));
        // A new partial download over the complete copy takes precedence.
        fs::write(&paths.part, b"").unwrap();
        let mut newer = state(false);
        newer.etag = Some("\"v2\"".into());
        paths.save(&newer).unwrap();
        assert_eq!(paths.load(), Record::Valid(newer));
        xattr::set(&paths.part, XATTR, b"{\"url\": \"http://h/f\", \"comp").unwrap();
        assert_eq!(paths.load(), Record::Unreadable);
        assert!(
            !paths.state.exists(),
            "a sidecar was written where xattrs work"
        );
    }
}
