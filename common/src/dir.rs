//! A directory both programs save files into (fetch's output, chat's downloads), through a
//! handle. Every file created, opened, given a state, renamed or removed is named relative to
//! a directory opened once, and opened with `O_NOFOLLOW` (and `O_NONBLOCK`, so a planted FIFO
//! cannot hang a download): no symbolic link or other special file inside the directory can
//! redirect a write outside it, and one that stands where a file would be written is a named
//! error, never a write. Subdirectories are created and entered one component at a time the
//! same way.
//!
//! A file written, truncated or appended to must have one link: a hard link planted at a
//! name in use would carry the write to the file it shares. Truncation happens only after
//! that check.
//!
//! A file's state (what download it belongs to, how far it got; its meaning is the caller's)
//! lives in an extended attribute of the file it describes (`user.corokit.fetch` for fetch,
//! `user.corokit.chat` for chat), read and written through the open file; where the
//! filesystem has no user xattrs (and only there) it goes to a hidden sidecar
//! `.NAME.<program>`, renamed with its file.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, XattrFlags, CWD};
use rustix::io::Errno;

/// Whose states a directory holds: the extended attribute, and the sidecar's suffix where
/// there are no xattrs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub xattr: &'static str,
    pub sidecar: &'static str,
}

/// A state as read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    None,
    /// Present but not readable (too large, an I/O error, a sidecar that is not a file).
    Unreadable,
    Value(Vec<u8>),
}

/// The largest state read back.
const MAX_STATE: usize = 4096;

/// Why a file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0} is a symbolic link or not a regular file; not written through")]
    NotAFile(PathBuf),
    #[error("{0} has other hard links; not written through")]
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

/// A directory files are saved into.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    owner: Owner,
    /// The filesystem has no user xattrs: states live in sidecar files.
    sidecars: bool,
}

/// True where the filesystem of `fd` cannot hold user xattrs.
fn needs_sidecars(fd: &OwnedFd, owner: Owner) -> bool {
    match rustix::fs::fgetxattr(fd, owner.xattr, &mut [0u8; 0][..]) {
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
    /// Opens the directory the user named (creating it), following the path as given, for
    /// the files of `owner`.
    pub fn create(path: &Path, owner: Owner) -> io::Result<Dir> {
        std::fs::create_dir_all(path)?;
        let fd = rustix::fs::openat(
            CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)?;
        Ok(Dir {
            sidecars: needs_sidecars(&fd, owner),
            fd,
            path: path.to_path_buf(),
            owner,
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
            owner: self.owner,
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
                sidecars: needs_sidecars(&fd, self.owner),
                fd,
                path,
                owner: self.owner,
            };
        }
        Ok(dir)
    }

    /// The space on this directory's filesystem: the bytes a user without privileges may
    /// still write, and the filesystem's size.
    pub fn space(&self) -> io::Result<(u64, u64)> {
        let s = rustix::fs::fstatvfs(&self.fd).map_err(io_err)?;
        Ok((
            s.f_bavail.saturating_mul(s.f_frsize),
            s.f_blocks.saturating_mul(s.f_frsize),
        ))
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
    pub fn state(&self, name: &str) -> Stored {
        if !self.sidecars {
            let Ok(file) = open_in(self, name, OFlags::RDONLY, "reading") else {
                return Stored::None;
            };
            let mut buf = vec![0u8; MAX_STATE];
            return match rustix::fs::fgetxattr(&file, self.owner.xattr, &mut buf[..]) {
                Ok(n) => Stored::Value(buf[..n].to_vec()),
                Err(Errno::NODATA) => Stored::None,
                Err(_) => Stored::Unreadable,
            };
        }
        match open_in(self, &self.sidecar(name), OFlags::RDONLY, "reading") {
            Ok(file) => {
                let mut bytes = Vec::new();
                let mut limited = io::Read::take(file, MAX_STATE as u64);
                match io::Read::read_to_end(&mut limited, &mut bytes) {
                    Ok(_) => Stored::Value(bytes),
                    Err(_) => Stored::Unreadable,
                }
            }
            Err(FileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Stored::None
            }
            Err(_) => Stored::Unreadable,
        }
    }

    /// Records the state `value` on `file`, the open file `name` it describes.
    pub fn set_state(&self, file: &File, name: &str, value: &[u8]) -> Result<(), FileError> {
        match rustix::fs::fsetxattr(file, self.owner.xattr, value, XattrFlags::empty()) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(e) => {
                let side = self.sidecar(name);
                let mut f = open_in(
                    self,
                    &side,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
                    "writing",
                )?;
                f.write_all(value).map_err(|source| FileError::Io {
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

    /// True unless a file stands at `name` whose state `same` does not accept: the only file
    /// replaced is the caller's own.
    fn replaceable(&self, name: &str, same: &dyn Fn(&[u8]) -> bool) -> bool {
        match self.kind(name) {
            Ok(Kind::Missing) => true,
            Ok(Kind::File { .. }) => matches!(self.state(name), Stored::Value(v) if same(&v)),
            _ => false,
        }
    }

    /// Creates `name` with the state `value` recorded from the first moment, replacing only
    /// a file whose state `same` accepts (the caller's own earlier file): an unnamed file gets
    /// its state and is then linked in, so no crash leaves a file without one. Where that
    /// cannot be done, the file is created, then given its state, and removed again if that
    /// fails.
    pub fn create_with_state(
        &self,
        name: &str,
        value: &[u8],
        same: &dyn Fn(&[u8]) -> bool,
    ) -> Result<File, FileError> {
        if !self.replaceable(name, same) {
            return Err(FileError::Foreign(self.path(name)));
        }
        if !self.sidecars {
            if let Some(file) = self.unnamed_with_state(name, value, same)? {
                return Ok(file);
            }
        }
        let file = self.create_file(name)?;
        if let Err(e) = self.set_state(&file, name, value) {
            self.remove(name);
            return Err(e);
        }
        Ok(file)
    }

    fn unnamed_with_state(
        &self,
        name: &str,
        value: &[u8],
        same: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Option<File>, FileError> {
        let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::openat(&self.fd, ".", flags, Mode::from_raw_mode(0o666)) else {
            return Ok(None);
        };
        let file = File::from(fd);
        rustix::fs::fsetxattr(&file, self.owner.xattr, value, XattrFlags::empty()).map_err(
            |e| FileError::Io {
                what: "recording the state of",
                path: self.path(name),
                source: io_err(e),
            },
        )?;
        let link = || self.link_unnamed(&file, name);
        match link() {
            Ok(()) => return Ok(Some(file)),
            Err(Errno::EXIST) if self.replaceable(name, same) => {}
            Err(Errno::EXIST) => return Err(FileError::Foreign(self.path(name))),
            Err(_) => return Ok(None),
        }
        // What stood there is the caller's own earlier file: replaced.
        let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
        Ok(link().is_ok().then_some(file))
    }

    /// Opens `name` to add lines to its end, creating it if need be.
    pub fn append_or_create(&self, name: &str) -> Result<File, FileError> {
        open_in(
            self,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND,
            "writing",
        )
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

    /// Opens the existing `name` to read it and write to it (a partial file continued).
    pub fn open_rw(&self, name: &str) -> Result<File, FileError> {
        open_in(self, name, OFlags::RDWR, "opening")
    }

    /// Opens `name` to read it.
    pub fn open(&self, name: &str) -> Result<File, FileError> {
        open_in(self, name, OFlags::RDONLY, "reading")
    }

    /// Renames `from`, which must be the open file `file`, to `to`: a file put at `from`
    /// meanwhile is not renamed in its place.
    pub fn rename_file(&self, file: &File, from: &str, to: &str) -> Result<(), FileError> {
        self.check_same(file, from)?;
        self.rename(from, to)
    }

    /// [`Dir::rename_file`], but only to a name where nothing stands: what appeared at `to`
    /// meanwhile (the user's own file) is never replaced.
    pub fn rename_file_new(&self, file: &File, from: &str, to: &str) -> Result<(), FileError> {
        self.check_same(file, from)?;
        self.rename_with(from, to, RenameFlags::NOREPLACE)
    }

    /// Renames `from` to `to` in this directory (neither followed if a link), with its
    /// sidecar where states live in sidecars.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), FileError> {
        self.rename_with(from, to, RenameFlags::empty())
    }

    /// Renames the directory `from` to `to`, unless something is at `to` by then: a
    /// directory received whole gets its name only where nothing stands.
    pub fn rename_dir_new(&self, from: &str, to: &str) -> Result<(), FileError> {
        self.rename_with(from, to, RenameFlags::NOREPLACE)
    }

    /// Whether `name` is still the open file `file`.
    fn check_same(&self, file: &File, name: &str) -> Result<(), FileError> {
        let ours = rustix::fs::fstat(file);
        let there = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW);
        match (ours, there) {
            (Ok(a), Ok(b)) if a.st_dev == b.st_dev && a.st_ino == b.st_ino => Ok(()),
            _ => Err(FileError::Foreign(self.path(name))),
        }
    }

    fn rename_with(&self, from: &str, to: &str, flags: RenameFlags) -> Result<(), FileError> {
        match rustix::fs::renameat_with(&self.fd, from, &self.fd, to, flags) {
            Ok(()) => {}
            Err(Errno::EXIST) | Err(Errno::NOTEMPTY) if flags.contains(RenameFlags::NOREPLACE) => {
                return Err(FileError::Foreign(self.path(to)))
            }
            Err(e) => {
                return Err(FileError::Io {
                    what: "renaming",
                    path: self.path(from),
                    source: io_err(e),
                })
            }
        }
        if self.sidecars {
            let _ = rustix::fs::renameat(
                &self.fd,
                self.sidecar(from).as_str(),
                &self.fd,
                self.sidecar(to).as_str(),
            );
        }
        Ok(())
    }

    /// The modification time of `name` (not followed if a link), if it can be read.
    pub fn modified(&self, name: &str) -> Option<std::time::SystemTime> {
        let st = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
        let secs = u64::try_from(st.st_mtime).ok()?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs, st.st_mtime_nsec as u32))
    }

    /// Sets the modification time of `name` (not followed if a link).
    pub fn set_modified(&self, name: &str, when: std::time::SystemTime) -> io::Result<()> {
        let since = when
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let times = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: since.as_secs() as i64,
                tv_nsec: since.subsec_nanos() as _,
            },
        };
        rustix::fs::utimensat(&self.fd, name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)
    }

    /// A scratch file in this directory that has no name and is gone when closed.
    pub fn scratch(&self) -> Result<File, FileError> {
        let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
        rustix::fs::openat(&self.fd, ".", flags, Mode::from_raw_mode(0o600))
            .map(File::from)
            .map_err(|e| FileError::Io {
                what: "creating a scratch file in",
                path: self.path.clone(),
                source: io_err(e),
            })
    }

    /// Removes `name`, and its sidecar where states live in sidecars.
    pub fn remove(&self, name: &str) {
        let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
        if self.sidecars {
            let _ = rustix::fs::unlinkat(&self.fd, self.sidecar(name).as_str(), AtFlags::empty());
        }
    }

    /// Puts a whole download, already verified, at `name` with its complete state: an
    /// unnamed file is written, given its state and then linked in, so one directory entry is
    /// made, none renamed, and nothing is left behind by a crash. False where unnamed files
    /// or user xattrs are not supported, or `name` exists: the caller goes through `.part`.
    pub fn link_new(&self, name: &str, body: &[u8], value: &[u8]) -> Result<bool, FileError> {
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
        match rustix::fs::fsetxattr(&file, self.owner.xattr, value, XattrFlags::empty()) {
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
        Ok(self.link_unnamed(&file, name).is_ok())
    }

    /// Gives the unnamed (`O_TMPFILE`) `file` the name `name` here; the new name is never
    /// followed. By the descriptor itself where the kernel allows it (Linux 6.10 and later,
    /// or with CAP_DAC_READ_SEARCH), else through its `/proc` link: a path walk through
    /// procfs, which costs more than the link.
    fn link_unnamed(&self, file: &File, name: &str) -> Result<(), Errno> {
        static BY_PROC: AtomicBool = AtomicBool::new(false);
        if !BY_PROC.load(Ordering::Relaxed) {
            match rustix::fs::linkat(file, "", &self.fd, name, AtFlags::EMPTY_PATH) {
                Err(Errno::NOENT | Errno::PERM | Errno::INVAL) => {
                    BY_PROC.store(true, Ordering::Relaxed)
                }
                other => return other,
            }
        }
        let unnamed = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
        rustix::fs::linkat(
            CWD,
            unnamed.as_str(),
            &self.fd,
            name,
            AtFlags::SYMLINK_FOLLOW,
        )
    }

    fn sidecar(&self, name: &str) -> String {
        format!(".{name}{}", self.owner.sidecar)
    }
}

/// The filesystem (or the platform) has no user extended attributes.
fn unsupported(e: Errno) -> bool {
    e == Errno::NOTSUP || e == Errno::OPNOTSUPP
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const OWNER: Owner = Owner {
        xattr: "user.corokit.test",
        sidecar: ".test",
    };

    #[test]
    fn state_travels_with_the_file_it_describes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path(), OWNER).unwrap();
        assert_eq!(dir.state("f.part"), Stored::None);
        let file = dir.create_file("f.part").unwrap();
        dir.set_state(&file, "f.part", b"partial").unwrap();
        assert_eq!(dir.state("f.part"), Stored::Value(b"partial".to_vec()));
        dir.rename_file(&file, "f.part", "f").unwrap();
        assert_eq!(
            dir.state("f"),
            Stored::Value(b"partial".to_vec()),
            "lost in the rename"
        );
        assert!(
            !tmp.path().join(".f.test").exists(),
            "a sidecar where xattrs work"
        );
        // A planted sidecar means nothing where xattrs work.
        std::fs::write(tmp.path().join(".g.test"), b"forged").unwrap();
        std::fs::write(tmp.path().join("g"), b"theirs").unwrap();
        assert_eq!(dir.state("g"), Stored::None);
    }

    #[test]
    fn links_and_special_files_are_never_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dir = Dir::create(tmp.path(), OWNER).unwrap();
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
        assert_eq!(dir.state("f.part"), Stored::None);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!outside.path().join("planted").exists());
        // A hard link to a file outside is neither truncated nor appended to.
        std::fs::hard_link(&victim, tmp.path().join("h.part")).unwrap();
        assert!(matches!(
            dir.create_file("h.part"),
            Err(FileError::Linked(_))
        ));
        assert!(matches!(dir.append("h.part"), Err(FileError::Linked(_))));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
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
    fn a_whole_file_appears_at_once_with_its_state() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path(), OWNER).unwrap();
        assert!(dir.link_new("f.bin", b"abc", b"done").unwrap());
        assert_eq!(std::fs::read(tmp.path().join("f.bin")).unwrap(), b"abc");
        assert_eq!(dir.state("f.bin"), Stored::Value(b"done".to_vec()));
        // An existing name is not replaced this way.
        assert!(!dir.link_new("f.bin", b"abcd", b"done").unwrap());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn only_the_callers_own_file_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path(), OWNER).unwrap();
        let mine = |v: &[u8]| v == b"mine";
        let mut f = dir.create_with_state("f.part", b"mine", &mine).unwrap();
        f.write_all(b"old").unwrap();
        let mut f = dir.create_with_state("f.part", b"mine", &mine).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("f.part")).unwrap(), b"new");
        std::fs::write(tmp.path().join("g.part"), b"theirs").unwrap();
        assert!(matches!(
            dir.create_with_state("g.part", b"mine", &mine),
            Err(FileError::Foreign(_))
        ));
        assert_eq!(std::fs::read(tmp.path().join("g.part")).unwrap(), b"theirs");
    }
}
