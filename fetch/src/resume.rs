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
//!
//! A complete file needs only its owner and length, so its state is the short form
//! `done LENGTH URLHASH` (the first 96 bits of the URL's SHA-256, in hex): short enough to
//! stay inside an ext4 inode, where the JSON form needs a block of its own.

use std::fs::{self, File};
use std::io::{self, Write};
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
    /// What the short form of a complete file keeps instead of `url`.
    #[serde(skip)]
    pub url_hash: Option<String>,
}

impl State {
    /// True if this is the state of a download of `url`.
    pub fn belongs_to(&self, url: &str) -> bool {
        match &self.url_hash {
            Some(hash) => *hash == url_hash(url),
            None => self.url == url,
        }
    }

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
        let value = encode(state)?;
        let file = if state.complete {
            &self.done
        } else {
            &self.part
        };
        match xattr::set(file, XATTR, &value) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => fs::write(&self.state, value),
            Err(e) => Err(e),
        }
    }

    /// Puts a whole download, already verified, at `NAME` with its complete state. Where
    /// the filesystem allows, an unnamed file is written, given its state and then linked in:
    /// one directory entry made, none renamed, and nothing left behind by a crash. Elsewhere
    /// (or when `NAME` exists) it goes through `.part` and a rename.
    pub fn write_complete(&self, body: &[u8], state: &State) -> io::Result<()> {
        if self.link_new(body, state)? {
            return Ok(());
        }
        fs::write(&self.part, body)?;
        fs::rename(&self.part, &self.done)?;
        self.save(state)
    }

    /// False where unnamed files or user xattrs are not supported, or `NAME` exists.
    #[cfg(target_os = "linux")]
    fn link_new(&self, body: &[u8], state: &State) -> io::Result<bool> {
        use rustix::fs::{linkat, openat, AtFlags, Mode, OFlags, CWD};
        use std::os::fd::AsRawFd;
        use xattr::FileExt;

        let dir = match self.done.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
        let Ok(fd) = openat(CWD, dir, flags, Mode::from_raw_mode(0o666)) else {
            return Ok(false);
        };
        let mut file = File::from(fd);
        file.write_all(body)?;
        match file.set_xattr(XATTR, &encode(state)?) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
        let unnamed = format!("/proc/self/fd/{}", file.as_raw_fd());
        Ok(linkat(
            CWD,
            unnamed.as_str(),
            CWD,
            &self.done,
            AtFlags::SYMLINK_FOLLOW,
        )
        .is_ok())
    }

    #[cfg(not(target_os = "linux"))]
    fn link_new(&self, _body: &[u8], _state: &State) -> io::Result<bool> {
        Ok(false)
    }
}

/// The stored form: short for a complete file of known length, else JSON.
fn encode(state: &State) -> io::Result<Vec<u8>> {
    match (state.complete, state.length) {
        (true, Some(length)) => {
            let hash = state
                .url_hash
                .clone()
                .unwrap_or_else(|| url_hash(&state.url));
            Ok(format!("done {length} {hash}").into_bytes())
        }
        _ => serde_json::to_vec(state).map_err(io::Error::other),
    }
}

fn parse(value: &[u8]) -> Record {
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
fn url_hash(url: &str) -> String {
    crate::hex(&ring::digest::digest(&ring::digest::SHA256, url.as_bytes()).as_ref()[..12])
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
            url_hash: None,
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
        let Record::Valid(done) = paths.load() else {
            panic!("the complete state was not read back");
        };
        assert!(done.complete && done.length == Some(5) && done.belongs_to("http://h/f"));
        assert!(!done.belongs_to("http://h/g"));
        // Short enough to stay in the inode.
        let raw = xattr::get(&paths.done, XATTR).unwrap().unwrap();
        assert!(raw.len() <= 56, "{}", String::from_utf8_lossy(&raw));
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

#[cfg(test)]
mod complete_files {
    use super::*;

    #[test]
    fn a_whole_download_appears_at_once_with_its_state() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path(), "f.bin");
        let state = State {
            url: "http://h/f.bin".into(),
            length: Some(3),
            complete: true,
            ..State::default()
        };
        paths.write_complete(b"abc", &state).unwrap();
        assert_eq!(fs::read(&paths.done).unwrap(), b"abc");
        assert!(!paths.part.exists());
        assert_eq!(
            plan(
                &paths,
                match &paths.load() {
                    Record::Valid(s) if s.belongs_to("http://h/f.bin") => Some(s),
                    other => panic!("{other:?}"),
                }
            ),
            Plan::Skip
        );
        // An older copy at NAME is replaced, not kept.
        paths
            .write_complete(
                b"abcd",
                &State {
                    length: Some(4),
                    ..state
                },
            )
            .unwrap();
        assert_eq!(fs::read(&paths.done).unwrap(), b"abcd");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_damaged_short_form_is_unreadable() {
        assert_eq!(parse(b"done 12 nothex"), Record::Unreadable);
        assert_eq!(
            parse(b"done x 0123456789abcdef01234567"),
            Record::Unreadable
        );
        assert!(matches!(
            parse(b"done 12 0123456789abcdef01234567"),
            Record::Valid(_)
        ));
    }
}
