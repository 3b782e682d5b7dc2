//! fetch's files in a [`Dir`] (see `corokit_common::dir`): the resume state on them (a
//! [`State`] in the xattr `user.corokit.fetch`, or the sidecar `.NAME.fetch`), and
//! `.fetch-names`, the names URLs were saved under when not their own (a number, or the
//! server's name).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};

pub use corokit_common::dir::{Dir, FileError, Kind};
use corokit_common::dir::{Owner, Stored};

use crate::resume::{self, Record, State};

/// Where fetch keeps its states.
pub const OWNER: Owner = Owner {
    xattr: "user.corokit.fetch",
    sidecar: ".fetch",
};

/// The file that maps URLs to the names they were saved under when not their own.
const NAMES: &str = ".fetch-names";
/// Most of `.fetch-names` read, and its longest line taken (a hash, a space and a name of
/// at most 200 bytes fit well within it): the file is the user's to edit, or to plant.
const NAMES_READ: u64 = 16 << 20;
const NAMES_LINE: usize = 512;

/// The recorded state of `name` in `dir`.
pub fn state(dir: &Dir, name: &str) -> Record {
    match dir.state(name) {
        Stored::None => Record::None,
        Stored::Unreadable => Record::Unreadable,
        Stored::Value(v) => resume::parse(&v),
    }
}

/// Records `state` on `file`, the open file `name` it describes.
pub fn set_state(dir: &Dir, file: &File, name: &str, state: &State) -> Result<(), FileError> {
    dir.set_state(file, name, &resume::encode(state))
}

/// Creates the partial file `name` with `state` from the first moment, replacing only an
/// earlier file of the same download.
pub fn create_part(dir: &Dir, name: &str, state: &State) -> Result<File, FileError> {
    let same = |v: &[u8]| matches!(resume::parse(v), Record::Valid(s) if s.same_download(state));
    dir.create_with_state(name, &resume::encode(state), &same)
}

/// Puts a whole download at `name` with its state at once (see [`Dir::link_new`]).
pub fn link_new(dir: &Dir, name: &str, body: &[u8], state: &State) -> Result<bool, FileError> {
    dir.link_new(name, body, &resume::encode(state))
}

/// The names URLs were saved under in `dir`, by URL hash.
pub fn names(dir: &Dir) -> HashMap<String, String> {
    let Ok(file) = dir.open(NAMES) else {
        return HashMap::new();
    };
    // A line that is not UTF-8 (an edited file) is skipped, not the end of the index.
    BufReader::new(io::Read::take(file, NAMES_READ))
        .split(b'\n')
        .map_while(Result::ok)
        .filter(|line| line.len() <= NAMES_LINE)
        .filter_map(|line| {
            let line = String::from_utf8(line).ok()?;
            let (hash, name) = line.split_once(' ')?;
            (hash.len() == 24 && !name.is_empty()).then(|| (hash.to_string(), name.to_string()))
        })
        .collect()
}

/// Remembers that `url` is saved as `name` in `dir`.
pub fn remember_name(dir: &Dir, url: &str, name: &str) -> Result<(), FileError> {
    let mut file = dir.append_or_create(NAMES)?;
    // One write per line: with O_APPEND it lands whole even while other downloads append.
    let line = format!("{} {name}\n", resume::url_hash(url));
    file.write_all(line.as_bytes())
        .map_err(|source| FileError::Io {
            what: "writing",
            path: dir.path(NAMES),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(complete: bool) -> State {
        State {
            url: "http://h/f".into(),
            etag: Some("\"v1\"".into()),
            length: Some(5),
            complete,
            ..State::default()
        }
    }

    #[test]
    fn fetchs_state_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path(), OWNER).unwrap();
        let file = create_part(&dir, "f.part", &state(false)).unwrap();
        assert_eq!(super::state(&dir, "f.part"), Record::Valid(state(false)));
        set_state(&dir, &file, "f.part", &state(true)).unwrap();
        dir.rename_file(&file, "f.part", "f").unwrap();
        assert!(matches!(super::state(&dir, "f"), Record::Valid(s) if s.complete));
        assert!(link_new(&dir, "g", b"abc", &state(true)).unwrap());
        assert!(matches!(super::state(&dir, "g"), Record::Valid(s) if s.complete));
    }

    #[test]
    fn names_given_by_servers_are_remembered() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path(), OWNER).unwrap();
        remember_name(&dir, "http://h/get?id=1", "report.pdf").unwrap();
        remember_name(&dir, "http://h/get?id=2", "other name.pdf").unwrap();
        let names = names(&dir);
        assert_eq!(
            names[&resume::url_hash("http://h/get?id=2")],
            "other name.pdf"
        );
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn names_remembered_at_once_from_many_threads_all_survive() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path(), OWNER).unwrap();
        let long = "n".repeat(200);
        std::thread::scope(|s| {
            for t in 0..8 {
                let (dir, long) = (&dir, &long);
                s.spawn(move || {
                    for i in 0..200 {
                        let url = format!("http://h/{t}/{i}");
                        remember_name(dir, &url, &format!("{long}{t}-{i}")).unwrap();
                    }
                });
            }
        });
        // An edited line that is not UTF-8 does not hide the lines after it.
        let mut file = dir.append(NAMES).unwrap();
        file.write_all(b"\xff\xfe broken\n").unwrap();
        remember_name(&dir, "http://h/last", "last").unwrap();
        let names = names(&dir);
        assert_eq!(names.len(), 8 * 200 + 1, "lines torn or lost");
        assert_eq!(
            names[&resume::url_hash("http://h/7/199")],
            format!("{long}7-199")
        );
        assert_eq!(names[&resume::url_hash("http://h/last")], "last");
    }
}
