//! The output directory, through a handle. Every file fetch creates, opens, reads state from,
//! renames or removes is named relative to a directory opened once, and opened with
//! `O_NOFOLLOW` (and `O_NONBLOCK`, so a planted FIFO cannot hang a download): no symbolic
//! link or other special file inside the directory can redirect a write outside it, and one
//! that stands where fetch would write is a named error for that download, never a write.
//! Subdirectories (`dir=`) are created and entered one component at a time the same way.
//!
//! A file fetch writes, truncates or appends to must have one link: a hard link planted at a
//! name fetch uses would carry the write to the file it shares. Truncation happens only
//! after that check.
//!
//! The resume state lives in the extended attribute `user.corokit.fetch` of the file it
//! describes, read and written through the open file; where the filesystem has no user
//! xattrs (and only there) it goes to a hidden sidecar `.NAME.fetch`, renamed with its file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, XattrFlags, CWD};
use rustix::io::Errno;

use crate::resume::{self, Record, State};

/// The extended attribute that holds the state.
const XATTR: &str = "user.corokit.fetch";
/// The file that maps URLs to the names they were saved under when not their own.
const NAMES: &str = ".fetch-names";
/// Most of `.fetch-names` read, and its longest line taken (a hash, a space and a name of
/// at most 200 bytes fit well within it): the file is the user's to edit, or to plant.
const NAMES_READ: u64 = 16 << 20;
const NAMES_LINE: usize = 512;

/// Why a file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0} is a symbolic link or not a regular file; fetch does not write through it")]
    NotAFile(PathBuf),
    #[error("{0} has other hard links; fetch does not write through it")]
    Linked(PathBuf),
    #[error("{0} is not this download's (another program put it there meanwhile); not touched")]
    Foreign(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// What stands at a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Missing,
    File {
        len: u64,
    },
    /// A symbolic link, directory, FIFO, device or socket.
    Other,
}

/// A directory fetch writes into.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    /// The filesystem has no user xattrs: states live in sidecar files.
    sidecars: bool,
}

/// True where the filesystem of `fd` cannot hold user xattrs.
fn needs_sidecars(fd: &OwnedFd) -> bool {
    match rustix::fs::fgetxattr(fd, XATTR, &mut [0u8; 0][..]) {
        Err(e) => unsupported(e),
        Ok(_) => false,
    }
}

fn io_err(e: Errno) -> io::Error {
    io::Error::from(e)
}

/// Opens `name` in `dir`, refusing links and special files, and, to write, files with other
/// hard links (truncating only once that is checked).
fn open_in(dir: &Dir, name: &str, flags: OFlags, what: &'static str) -> Result<File, FileError> {
    let truncate = flags.contains(OFlags::TRUNC);
    let writes = flags.intersects(OFlags::WRONLY | OFlags::RDWR);
    let flags = (flags - OFlags::TRUNC) | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(&dir.fd, name, flags, Mode::from_raw_mode(0o666)) {
        Ok(fd) => fd,
        Err(Errno::LOOP) | Err(Errno::NXIO) | Err(Errno::ISDIR) => {
            return Err(FileError::NotAFile(dir.path(name)))
        }
        Err(e) => {
            return Err(FileError::Io {
                what,
                path: dir.path(name),
                source: io_err(e),
            })
        }
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| FileError::Io {
        what,
        path: dir.path(name),
        source: io_err(e),
    })?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(FileError::NotAFile(dir.path(name)));
    }
    if writes && stat.st_nlink != 1 {
        return Err(FileError::Linked(dir.path(name)));
    }
    let file = File::from(fd);
    if truncate {
        file.set_len(0).map_err(|source| FileError::Io {
            what,
            path: dir.path(name),
            source,
        })?;
    }
    Ok(file)
}

impl Dir {
    /// Opens the output directory the user named (creating it), following the path as given.
    pub fn create(path: &Path) -> io::Result<Dir> {
        std::fs::create_dir_all(path)?;
        let fd = rustix::fs::openat(
            CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)?;
        Ok(Dir {
            sidecars: needs_sidecars(&fd),
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The subdirectory `rel` (relative, of plain components), created as needed; a link or
    /// a file where a component should be is refused.
    pub fn sub(&self, rel: &Path) -> Result<Dir, FileError> {
        let mut dir = Dir {
            fd: self.fd.try_clone().map_err(|source| FileError::Io {
                what: "opening",
                path: self.path.clone(),
                source,
            })?,
            path: self.path.clone(),
            sidecars: self.sidecars,
        };
        for part in rel.components() {
            let Component::Normal(name) = part else {
                continue;
            };
            let path = dir.path.join(name);
            match rustix::fs::mkdirat(&dir.fd, name, Mode::from_raw_mode(0o777)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => {
                    return Err(FileError::Io {
                        what: "creating",
                        path,
                        source: io_err(e),
                    })
                }
            }
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = match rustix::fs::openat(&dir.fd, name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => return Err(FileError::NotAFile(path)),
                Err(e) => {
                    return Err(FileError::Io {
                        what: "opening",
                        path,
                        source: io_err(e),
                    })
                }
            };
            dir = Dir {
                sidecars: needs_sidecars(&fd),
                fd,
                path,
            };
        }
        Ok(dir)
    }

    /// The path of `name`, for messages and the report.
    pub fn path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn kind(&self, name: &str) -> io::Result<Kind> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile => {
                Ok(Kind::File {
                    len: stat.st_size as u64,
                })
            }
            Ok(_) => Ok(Kind::Other),
            Err(Errno::NOENT) => Ok(Kind::Missing),
            Err(e) => Err(io_err(e)),
        }
    }

    /// The recorded state of the regular file `name`: its xattr, or its sidecar where the
    /// filesystem has no xattrs (a sidecar anywhere else was not written by fetch).
    pub fn state(&self, name: &str) -> Record {
        if !self.sidecars {
            let Ok(file) = open_in(self, name, OFlags::RDONLY, "reading") else {
                return Record::None;
            };
            let mut buf = vec![0u8; 4096];
            return match rustix::fs::fgetxattr(&file, XATTR, &mut buf[..]) {
                Ok(n) => resume::parse(&buf[..n]),
                Err(Errno::NODATA) => Record::None,
                Err(_) => Record::Unreadable,
            };
        }
        match open_in(self, &sidecar(name), OFlags::RDONLY, "reading") {
            Ok(file) => {
                let mut bytes = Vec::new();
                match io::Read::read_to_end(&mut io::Read::take(file, 4096), &mut bytes) {
                    Ok(_) => resume::parse(&bytes),
                    Err(_) => Record::Unreadable,
                }
            }
            Err(FileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Record::None
            }
            Err(_) => Record::Unreadable,
        }
    }

    /// Records `state` on `file`, the open file `name` it describes.
    pub fn set_state(&self, file: &File, name: &str, state: &State) -> Result<(), FileError> {
        let value = resume::encode(state);
        match rustix::fs::fsetxattr(file, XATTR, &value, XattrFlags::empty()) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(e) => {
                let side = sidecar(name);
                let mut f = open_in(
                    self,
                    &side,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
                    "writing",
                )?;
                f.write_all(&value).map_err(|source| FileError::Io {
                    what: "writing",
                    path: self.path(&side),
                    source,
                })
            }
            Err(e) => Err(FileError::Io {
                what: "recording the state of",
                path: self.path(name),
                source: io_err(e),
            }),
        }
    }

    /// True unless a file stands at `name` that is not a download of the same URL as
    /// `state`'s: the only file fetch replaces is its own.
    fn replaceable(&self, name: &str, state: &State) -> bool {
        match self.kind(name) {
            Ok(Kind::Missing) => true,
            Ok(Kind::File { .. }) => {
                matches!(self.state(name), Record::Valid(s) if s.same_download(state))
            }
            _ => false,
        }
    }

    /// Creates `name` (replacing only this download's own file there) with `state` recorded
    /// from the first moment: an unnamed file gets its state and is then linked in, so no
    /// crash leaves a file without one. Where that cannot be done, the file is created, then
    /// given its state, and removed again if that fails.
    pub fn create_with_state(&self, name: &str, state: &State) -> Result<File, FileError> {
        if !self.replaceable(name, state) {
            return Err(FileError::Foreign(self.path(name)));
        }
        if !self.sidecars {
            if let Some(file) = self.unnamed_with_state(name, state)? {
                return Ok(file);
            }
        }
        let file = self.create_file(name)?;
        if let Err(e) = self.set_state(&file, name, state) {
            self.remove(name);
            return Err(e);
        }
        Ok(file)
    }

    fn unnamed_with_state(&self, name: &str, state: &State) -> Result<Option<File>, FileError> {
        let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::openat(&self.fd, ".", flags, Mode::from_raw_mode(0o666)) else {
            return Ok(None);
        };
        let file = File::from(fd);
        rustix::fs::fsetxattr(&file, XATTR, &resume::encode(state), XattrFlags::empty()).map_err(
            |e| FileError::Io {
                what: "recording the state of",
                path: self.path(name),
                source: io_err(e),
            },
        )?;
        let unnamed = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
        let link = || {
            rustix::fs::linkat(
                CWD,
                unnamed.as_str(),
                &self.fd,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        };
        match link() {
            Ok(()) => return Ok(Some(file)),
            Err(Errno::EXIST) if self.replaceable(name, state) => {}
            Err(Errno::EXIST) => return Err(FileError::Foreign(self.path(name))),
            Err(_) => return Ok(None),
        }
        // What stood there is this download's own earlier file: replaced.
        let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
        Ok(link().is_ok().then_some(file))
    }

    /// Creates (or truncates) `name` for writing.
    pub fn create_file(&self, name: &str) -> Result<File, FileError> {
        open_in(
            self,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
            "creating",
        )
    }

    /// Opens the existing `name` to add to its end.
    pub fn append(&self, name: &str) -> Result<File, FileError> {
        open_in(self, name, OFlags::WRONLY | OFlags::APPEND, "opening")
    }

    /// Opens `name` to read it.
    pub fn open(&self, name: &str) -> Result<File, FileError> {
        open_in(self, name, OFlags::RDONLY, "reading")
    }

    /// Renames `from`, which must be the open file `file`, to `to`: a file put at `from`
    /// meanwhile is not renamed in its place.
    pub fn rename_file(&self, file: &File, from: &str, to: &str) -> Result<(), FileError> {
        let ours = rustix::fs::fstat(file);
        let there = rustix::fs::statat(&self.fd, from, AtFlags::SYMLINK_NOFOLLOW);
        match (ours, there) {
            (Ok(a), Ok(b)) if a.st_dev == b.st_dev && a.st_ino == b.st_ino => self.rename(from, to),
            _ => Err(FileError::Foreign(self.path(from))),
        }
    }

    /// Renames `from` to `to` in this directory (neither followed if a link), with its
    /// sidecar where states live in sidecars.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), FileError> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to).map_err(|e| FileError::Io {
            what: "renaming",
            path: self.path(from),
            source: io_err(e),
        })?;
        if self.sidecars {
            let _ = rustix::fs::renameat(
                &self.fd,
                sidecar(from).as_str(),
                &self.fd,
                sidecar(to).as_str(),
            );
        }
        Ok(())
    }

    /// Removes `name`, and its sidecar where states live in sidecars.
    pub fn remove(&self, name: &str) {
        let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
        if self.sidecars {
            let _ = rustix::fs::unlinkat(&self.fd, sidecar(name).as_str(), AtFlags::empty());
        }
    }

    /// Puts a whole download, already verified, at `name` with its complete state: an
    /// unnamed file is written, given its state and then linked in, so one directory entry is
    /// made, none renamed, and nothing is left behind by a crash. False where unnamed files
    /// or user xattrs are not supported, or `name` exists: the caller goes through `.part`.
    pub fn link_new(&self, name: &str, body: &[u8], state: &State) -> Result<bool, FileError> {
        let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::openat(&self.fd, ".", flags, Mode::from_raw_mode(0o666)) else {
            return Ok(false);
        };
        let mut file = File::from(fd);
        file.write_all(body).map_err(|source| FileError::Io {
            what: "writing",
            path: self.path(name),
            source,
        })?;
        match rustix::fs::fsetxattr(&file, XATTR, &resume::encode(state), XattrFlags::empty()) {
            Ok(()) => {}
            Err(e) if unsupported(e) => return Ok(false),
            Err(e) => {
                return Err(FileError::Io {
                    what: "recording the state of",
                    path: self.path(name),
                    source: io_err(e),
                })
            }
        }
        // The /proc link names the unnamed file itself; the new name is never followed.
        let unnamed = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
        Ok(rustix::fs::linkat(
            CWD,
            unnamed.as_str(),
            &self.fd,
            name,
            AtFlags::SYMLINK_FOLLOW,
        )
        .is_ok())
    }

    /// The names servers gave to URLs in this directory, by URL hash.
    pub fn names(&self) -> HashMap<String, String> {
        let Ok(file) = self.open(NAMES) else {
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

    /// Remembers that `url` is saved as `name` here.
    pub fn remember_name(&self, url: &str, name: &str) -> Result<(), FileError> {
        let mut file = open_in(
            self,
            NAMES,
            OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND,
            "writing",
        )?;
        // One write per line: with O_APPEND it lands whole even while other downloads append.
        let line = format!("{} {name}\n", resume::url_hash(url));
        file.write_all(line.as_bytes())
            .map_err(|source| FileError::Io {
                what: "writing",
                path: self.path(NAMES),
                source,
            })
    }
}

fn sidecar(name: &str) -> String {
    format!(".{name}.fetch")
}

/// The filesystem (or the platform) has no user extended attributes.
fn unsupported(e: Errno) -> bool {
    e == Errno::NOTSUP || e == Errno::OPNOTSUPP
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

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
    fn state_travels_with_the_file_it_describes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path()).unwrap();
        assert_eq!(dir.state("f.part"), Record::None);
        let file = dir.create_file("f.part").unwrap();
        dir.set_state(&file, "f.part", &state(false)).unwrap();
        assert_eq!(dir.state("f.part"), Record::Valid(state(false)));
        dir.rename("f.part", "f").unwrap();
        assert_eq!(
            dir.state("f"),
            Record::Valid(state(false)),
            "lost in the rename"
        );
        assert!(
            !tmp.path().join(".f.fetch").exists(),
            "a sidecar where xattrs work"
        );
    }

    #[test]
    fn links_and_special_files_are_never_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dir = Dir::create(tmp.path()).unwrap();
        symlink(&victim, tmp.path().join("f.part")).unwrap();
        symlink(outside.path().join("planted"), tmp.path().join("g.part")).unwrap();
        assert!(matches!(
            dir.create_file("f.part"),
            Err(FileError::NotAFile(_))
        ));
        assert!(matches!(dir.append("f.part"), Err(FileError::NotAFile(_))));
        assert!(matches!(
            dir.create_file("g.part"),
            Err(FileError::NotAFile(_))
        ));
        assert_eq!(dir.kind("f.part").unwrap(), Kind::Other);
        assert_eq!(dir.state("f.part"), Record::None);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!outside.path().join("planted").exists());
        // A FIFO does not hang an open.
        rustix::fs::mkfifoat(&dir.fd, "p", Mode::from_raw_mode(0o666)).unwrap();
        assert!(matches!(dir.create_file("p"), Err(FileError::NotAFile(_))));
        assert!(matches!(dir.open("p"), Err(FileError::NotAFile(_))));
        // A subdirectory that is a link is refused.
        symlink(outside.path(), tmp.path().join("sub")).unwrap();
        assert!(matches!(
            dir.sub(Path::new("sub/deeper")),
            Err(FileError::NotAFile(_))
        ));
        assert!(!outside.path().join("deeper").exists());
        assert!(dir.sub(Path::new("a/b")).is_ok());
    }

    #[test]
    fn a_whole_download_appears_at_once_with_its_state() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path()).unwrap();
        assert!(dir.link_new("f.bin", b"abc", &state(true)).unwrap());
        assert_eq!(std::fs::read(tmp.path().join("f.bin")).unwrap(), b"abc");
        assert!(matches!(dir.state("f.bin"), Record::Valid(s) if s.complete));
        // An existing name is not replaced this way.
        assert!(!dir.link_new("f.bin", b"abcd", &state(true)).unwrap());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn names_given_by_servers_are_remembered() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path()).unwrap();
        dir.remember_name("http://h/get?id=1", "report.pdf")
            .unwrap();
        dir.remember_name("http://h/get?id=2", "other name.pdf")
            .unwrap();
        let names = dir.names();
        assert_eq!(
            names[&resume::url_hash("http://h/get?id=2")],
            "other name.pdf"
        );
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn names_remembered_at_once_from_many_threads_all_survive() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path()).unwrap();
        let long = "n".repeat(200);
        std::thread::scope(|s| {
            for t in 0..8 {
                let (dir, long) = (&dir, &long);
                s.spawn(move || {
                    for i in 0..200 {
                        let url = format!("http://h/{t}/{i}");
                        dir.remember_name(&url, &format!("{long}{t}-{i}")).unwrap();
                    }
                });
            }
        });
        // An edited line that is not UTF-8 does not hide the lines after it.
        let mut file = dir.append(NAMES).unwrap();
        file.write_all(b"\xff\xfe broken\n").unwrap();
        dir.remember_name("http://h/last", "last").unwrap();
        let names = dir.names();
        assert_eq!(names.len(), 8 * 200 + 1, "lines torn or lost");
        assert_eq!(
            names[&resume::url_hash("http://h/7/199")],
            format!("{long}7-199")
        );
        assert_eq!(names[&resume::url_hash("http://h/last")], "last");
    }
}
