//! Receiving offered files into a directory, never overwriting and never splicing: a file is
//! named as fetch names its files (`corokit_common::names`: one safe component, numbered when
//! taken), its bytes go to `NAME.part`, which carries what it is a part of (sender, offered
//! name, size, modification time and, from a chat peer, SHA-256) in the xattr
//! `user.corokit.chat`, and only a complete file (and verified, from a chat peer) gets its
//! name. When the same file is offered again, its `.part` is continued.
//!
//! A chat peer serves from the offset asked, and the SHA-256 of the whole file is checked at
//! the end. IP Messenger clients may ignore the offset (iptux does): what arrives first is
//! compared with the start of the `.part`; if it is the start again, it is checked against
//! what we have and skipped, else it is the continuation. A stream that fits neither, or ends
//! off the offered size, never yields a named file.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use corokit_common::dir::{Dir, FileError, Kind, Owner, Stored};
use corokit_common::names;
use corokit_common::text::hex;
use may::net::TcpStream;
use ring::digest;
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use super::offer::{self, OfferedFile, DIRECTORY, REGULAR, RETURN_TO_PARENT};
use super::stream::{SealedReader, SealedWriter};
use crate::ipmsg::packet::{self, mode};
use crate::seal::Key;

/// Where chat keeps the state of what it receives.
pub const OWNER: Owner = Owner {
    xattr: "user.corokit.chat",
    sidecar: ".chat",
};

const CONNECT: Duration = Duration::from_secs(10);
/// Longest silence from a sender.
const SILENCE: Duration = Duration::from_secs(30);
const BLOCK: usize = 256 * 1024;
/// Entries and depth taken from one directory stream.
const MAX_ENTRIES: usize = 100_000;
const MAX_DEPTH: usize = 64;

/// Why a file did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error(
        "the sender sent nothing: the offer is gone, or the file changed since it was offered"
    )]
    Nothing,
    #[error("got {got} of {want} bytes before the connection ended; /get it again to continue")]
    Incomplete { got: u64, want: u64 },
    #[error("the sender sent more than the {0} bytes it offered")]
    TooMuch(u64),
    #[error("the file is not the one offered (SHA-256 {got}, offered {want}); discarded")]
    Checksum { got: String, want: String },
    #[error("a malformed directory stream: {0}")]
    Stream(String),
    #[error(
        "the sender's answer could be the file's start again or its rest; nothing was added, \
         /get it again"
    )]
    Ambiguous,
    #[error(
        "{need} more bytes would leave less than {keep} free on the disk ({free} free); \
         --min-free sets what received files leave"
    )]
    NoRoom { need: u64, free: u64, keep: u64 },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What a `.part` is part of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartState {
    pub from: String,
    pub name: String,
    pub size: u64,
    pub mtime: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub complete: bool,
}

impl PartState {
    pub fn of(from: SocketAddr, file: &OfferedFile) -> PartState {
        PartState {
            from: from.ip().to_canonical().to_string(),
            name: file.name.clone(),
            size: file.size,
            mtime: file.mtime,
            sha256: file.sha256.map(|s| hex(&s)),
            complete: false,
        }
    }

    /// The same file: by its checksum where there is one (whoever sends it), else by
    /// sender, name, size and modification time.
    fn same_file(&self, other: &PartState) -> bool {
        match (&self.sha256, &other.sha256) {
            (Some(a), Some(b)) => a == b && self.size == other.size,
            _ => {
                (&self.from, &self.name, self.size, self.mtime)
                    == (&other.from, &other.name, other.size, other.mtime)
            }
        }
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a PartState serialises")
    }

    fn read(dir: &Dir, name: &str) -> Option<PartState> {
        match dir.state(name) {
            Stored::Value(v) => serde_json::from_slice(&v).ok(),
            _ => None,
        }
    }
}

/// How a file of an offer starts, from what is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Already received whole under `name`.
    Have {
        name: String,
    },
    Fresh {
        name: String,
    },
    Resume {
        name: String,
        offset: u64,
    },
}

impl Start {
    pub fn name(&self) -> &str {
        match self {
            Start::Have { name } | Start::Fresh { name } | Start::Resume { name, .. } => name,
        }
    }
}

/// Chooses the name for `want`: the first of `name`, `name.1`, … that is free, or already
/// this file's (complete, or partial to continue). Files that are not this file's are never
/// touched. `taken` says a name is being received by another transfer right now.
pub fn start(
    dir: &Dir,
    name: &str,
    want: &PartState,
    taken: &dyn Fn(&str) -> bool,
) -> Result<Start, FileError> {
    for n in 0..10_000 {
        let candidate = if n == 0 {
            name.to_string()
        } else {
            names::numbered(name, n)
        };
        let part = format!("{candidate}.part");
        if taken(&candidate) {
            continue;
        }
        let done = dir
            .kind(&candidate)
            .map_err(|e| io_error(dir, &candidate, e))?;
        let partial = dir.kind(&part).map_err(|e| io_error(dir, &part, e))?;
        let ours = |n: &str| PartState::read(dir, n).filter(|s| s.same_file(want));
        match (done, partial) {
            (Kind::Missing, Kind::Missing) => return Ok(Start::Fresh { name: candidate }),
            // Whole as recorded, and still of the length it was received at.
            (Kind::File { len }, Kind::Missing)
                if len == want.size && ours(&candidate).is_some_and(|s| s.complete) =>
            {
                return Ok(Start::Have { name: candidate });
            }
            (Kind::Missing, Kind::File { len })
                if ours(&part).is_some_and(|s| !s.complete) && len <= want.size =>
            {
                return Ok(Start::Resume {
                    name: candidate,
                    offset: len,
                });
            }
            _ => {}
        }
    }
    Err(FileError::Foreign(dir.path(name)))
}

/// Who is asking, for the request packet.
#[derive(Debug, Clone)]
pub struct Asker {
    pub user: String,
    pub host: String,
}

/// Opens the connection for one request and returns the stream of the answer.
fn request(
    to: SocketAddr,
    key: Option<&Key>,
    asker: &Asker,
    command: u32,
    extra: &[u8],
) -> Result<Box<dyn Read + Send>, ReceiveError> {
    let mut conn =
        TcpStream::connect_timeout(&to, CONNECT).map_err(|e| ReceiveError::Connect(to, e))?;
    conn.set_read_timeout(Some(SILENCE))?;
    conn.set_write_timeout(Some(SILENCE))?;
    let header = packet::header_name(asker.user.as_bytes());
    let host = packet::header_name(asker.host.as_bytes());
    let req = packet::write(1, &header, &host, command, extra);
    match key {
        None => {
            conn.write_all(&req)?;
            Ok(Box::new(conn))
        }
        Some(key) => {
            let mut theirs = [0u8; 16];
            conn.read_exact(&mut theirs)?;
            let mut ours = [0u8; 16];
            ring::rand::SystemRandom::new()
                .fill(&mut ours)
                .map_err(|_| io::Error::other("no randomness"))?;
            conn.write_all(&ours)?;
            let keys = key.for_stream(&theirs, &ours);
            let mut w = SealedWriter::new(conn.try_clone()?, keys.to_server);
            w.write_all(&req)?;
            w.finish()?;
            Ok(Box::new(SealedReader::new(conn, keys.to_client)))
        }
    }
}

/// One offered file (or directory) to fetch.
pub struct Fetch<'a> {
    pub from: SocketAddr,
    pub packet: u64,
    pub file: &'a OfferedFile,
    pub key: Option<&'a Key>,
    pub asker: &'a Asker,
    /// A chat peer serves from the offset it is asked; an IP Messenger client may not.
    pub honours_offset: bool,
    /// `--min-free`: what received files must leave free on their disk (else see
    /// [`keep_free`]).
    pub min_free: Option<u64>,
    pub progress: &'a dyn Fn(u64),
}

/// Bytes a received file must leave free on a filesystem of `size` bytes: `min_free` when
/// given, else a twentieth of it, at most 1 GiB. A directory offered over IP Messenger says
/// nothing of its size, and its sender can stream without end: this keeps it from filling
/// the disk.
pub fn keep_free(size: u64, min_free: Option<u64>) -> u64 {
    min_free.unwrap_or((size / 20).min(1 << 30))
}

/// Whether `need` more bytes fit in `dir` and leave what must stay free there.
fn room(f: &Fetch, dir: &Dir, need: u64) -> Result<(), ReceiveError> {
    let (free, size) = dir.space()?;
    let keep = keep_free(size, f.min_free);
    if need > free || free - need < keep {
        return Err(ReceiveError::NoRoom { need, free, keep });
    }
    Ok(())
}

/// Receives a regular file into `dir` under `name` (from [`start`]): the file's name when
/// done, and the bytes that came over the network for it this time.
pub fn receive_file(f: &Fetch, dir: &Dir, start: Start) -> Result<(String, u64), ReceiveError> {
    let want = PartState::of(f.from, f.file);
    let (name, offset) = match start {
        Start::Have { name } => return Ok((name, 0)),
        Start::Fresh { name } => (name, 0),
        Start::Resume { name, offset } => (name, offset),
    };
    // A sender that ignores the offset may send the whole file again, into a scratch file
    // beside the `.part` (see `either_way`).
    let need = match offset > 0 && !f.honours_offset {
        true => want.size,
        false => want.size.saturating_sub(offset),
    };
    room(f, dir, need)?;
    let part = format!("{name}.part");
    let mut file = if offset == 0 {
        let encoded = want.encode();
        let same =
            |v: &[u8]| serde_json::from_slice::<PartState>(v).is_ok_and(|s| s.same_file(&want));
        dir.create_with_state(&part, &encoded, &same)?
    } else {
        let mut file = dir.open_rw(&part)?;
        file.seek(SeekFrom::End(0))?;
        file
    };
    let mut hashing = want
        .sha256
        .as_ref()
        .map(|_| digest::Context::new(&digest::SHA256));
    if let Some(h) = &mut hashing {
        hash_prefix(&mut file, offset, h)?;
    }
    let extra = offer::write_request(f.packet, f.file.id, Some(offset));
    let mut stream = request(f.from, f.key, f.asker, mode::GETFILEDATA, &extra)?;
    let mut fetched = 0u64;
    let result = if offset > 0 && !f.honours_offset {
        either_way(
            f,
            dir,
            &mut *stream,
            (&mut file, &part),
            offset,
            want.size,
            &mut fetched,
        )
    } else {
        (|| {
            let mut got = offset;
            let mut buf = vec![0u8; BLOCK];
            let mut last_report = Instant::now();
            loop {
                let n = read_some(&mut *stream, &mut buf)?;
                if n == 0 {
                    break;
                }
                fetched += n as u64;
                let mut data = &buf[..n];
                if got + data.len() as u64 > want.size {
                    data = &data[..(want.size - got) as usize];
                    append(&mut file, data, &mut hashing)?;
                    return Err(ReceiveError::TooMuch(want.size));
                }
                append(&mut file, data, &mut hashing)?;
                got += data.len() as u64;
                if last_report.elapsed() >= Duration::from_millis(500) {
                    last_report = Instant::now();
                    (f.progress)(got);
                }
            }
            if got == offset && offset < want.size {
                return Err(ReceiveError::Nothing);
            }
            if got < want.size {
                return Err(ReceiveError::Incomplete {
                    got,
                    want: want.size,
                });
            }
            Ok(())
        })()
    };
    match result {
        Ok(()) => {}
        Err(e @ ReceiveError::TooMuch(_)) => {
            dir.remove(&part);
            return Err(e);
        }
        Err(e) => return Err(e),
    }
    (f.progress)(want.size);
    if let (Some(h), Some(sum)) = (hashing, &want.sha256) {
        let got = hex(h.finish().as_ref());
        if &got != sum {
            dir.remove(&part);
            return Err(ReceiveError::Checksum {
                got,
                want: sum.clone(),
            });
        }
    }
    let done = PartState {
        complete: true,
        ..want
    };
    file.flush()?;
    dir.set_state(&file, &part, &done.encode())?;
    dir.rename_file_new(&file, &part, &name)?;
    Ok((name, fetched))
}

fn read_some(stream: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn append(file: &mut File, data: &[u8], hashing: &mut Option<digest::Context>) -> io::Result<()> {
    file.write_all(data)?;
    if let Some(h) = hashing {
        h.update(data);
    }
    Ok(())
}

fn hash_prefix(file: &mut File, len: u64, h: &mut digest::Context) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let n = file.read(&mut buf[..left.min(BLOCK as u64) as usize])?;
        if n == 0 {
            return Err(io::Error::other("the partial file shrank"));
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    file.seek(SeekFrom::End(0))?;
    Ok(())
}

/// Receives the rest of a file from a sender that may or may not honour the offset asked
/// (iptux sends from the start whatever was asked; IP Messenger from the offset). What
/// arrives goes to a scratch file, compared on the way with what the `.part` holds; at the
/// end the stream's length and that comparison say which it was:
/// - it differs from our start: the continuation (at most `size - offset` bytes);
/// - it matches our start and is longer than `size - offset`: the whole file again, of
///   which what follows our bytes is added;
/// - it matches and is no longer: either one (a file that repeats its start, like a run of
///   zeros), so nothing is added, and a whole-length answer of this kind means the `.part`
///   cannot be continued: it is removed, and the next try starts over.
///
/// Never a guess from the first bytes: a spliced file cannot come of it.
fn either_way(
    f: &Fetch,
    dir: &Dir,
    stream: &mut dyn Read,
    (part, part_name): (&mut File, &str),
    offset: u64,
    size: u64,
    fetched: &mut u64,
) -> Result<(), ReceiveError> {
    let mut scratch = dir.scratch()?;
    let mut buf = vec![0u8; BLOCK];
    let mut ours = vec![0u8; BLOCK];
    let mut matches = true;
    let mut len = 0u64;
    let mut last_report = Instant::now();
    let ended = loop {
        let n = match read_some(stream, &mut buf) {
            Ok(0) => break None,
            Ok(n) => n,
            // A broken connection: decide with what came.
            Err(e) => break Some(e),
        };
        if len + n as u64 > size {
            return Err(ReceiveError::TooMuch(size));
        }
        if matches && len < offset {
            let k = (offset - len).min(n as u64) as usize;
            part.seek(SeekFrom::Start(len))?;
            part.read_exact(&mut ours[..k])?;
            matches = buf[..k] == ours[..k];
        }
        scratch.write_all(&buf[..n])?;
        len += n as u64;
        *fetched += n as u64;
        if last_report.elapsed() >= Duration::from_millis(500) {
            last_report = Instant::now();
            (f.progress)(offset + len.min(size - offset));
        }
    };
    let continuation = size - offset;
    let (from, add) = if !matches {
        if len > continuation {
            return Err(ReceiveError::TooMuch(size));
        }
        (0, len)
    } else if len > continuation {
        // The whole file again: its bytes after ours are new (those before matched).
        (offset.min(len), len.saturating_sub(offset))
    } else {
        if len == continuation && ended.is_none() {
            // The rest of the file, or its start cut short at just that length: this can
            // only happen again, so the next try starts over.
            dir.remove(part_name);
        }
        (0, 0)
    };
    if add > 0 {
        scratch.seek(SeekFrom::Start(from))?;
        part.seek(SeekFrom::End(0))?;
        let copied = io::copy(&mut (&mut scratch).take(add), part)?;
        if copied != add {
            return Err(io::Error::other("the scratch file shrank").into());
        }
    }
    let got = offset + add;
    if got == size {
        return Ok(());
    }
    match ended {
        Some(e) => Err(e.into()),
        None if len == 0 => Err(ReceiveError::Nothing),
        None if add == 0 && matches => Err(ReceiveError::Ambiguous),
        None => Err(ReceiveError::Incomplete { got, want: size }),
    }
}

/// The first of `name`, `name.1`, … where nothing stands (nor its `.part`).
pub fn free_name(dir: &Dir, name: &str, taken: &dyn Fn(&str) -> bool) -> Result<String, FileError> {
    free_name_from(dir, name, taken, 0).map(|(name, _)| name)
}

/// [`free_name`], trying numbers from `first` on: the name and its number.
fn free_name_from(
    dir: &Dir,
    name: &str,
    taken: &dyn Fn(&str) -> bool,
    first: u32,
) -> Result<(String, u32), FileError> {
    for n in first..first + 10_000 {
        let candidate = if n == 0 {
            name.to_string()
        } else {
            names::numbered(name, n)
        };
        let part = format!("{candidate}.part");
        let free = |n: &str| dir.kind(n).map(|k| k == Kind::Missing);
        if !taken(&candidate)
            && free(&candidate).map_err(|source| io_error(dir, &candidate, source))?
            && free(&part).map_err(|source| io_error(dir, &part, source))?
        {
            return Ok((candidate, n));
        }
    }
    Err(FileError::Foreign(dir.path(name)))
}

fn io_error(dir: &Dir, name: &str, source: io::Error) -> FileError {
    FileError::Io {
        what: "reading",
        path: dir.path(name),
        source,
    }
}

/// Receives a directory into `dir` as `top.part` (`top` is a name where nothing stood, see
/// [`free_name`]: a directory already there is never written into), renamed `top` once its
/// stream ended where it began: its name, and the bytes of its files.
pub fn receive_dir(f: &Fetch, dir: &Dir, top: String) -> Result<(String, u64), ReceiveError> {
    let extra = offer::write_request(f.packet, f.file.id, None);
    let mut stream = request(f.from, f.key, f.asker, mode::GETDIRFILES, &extra)?;
    let mut stack: Vec<Dir> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    let mut entries = 0;
    let mut got = 0u64;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut numbers: std::collections::HashMap<(usize, std::path::PathBuf, String), u32> =
        std::collections::HashMap::new();
    loop {
        let header = loop {
            match offer::parse_dir_header(&pending, text)
                .map_err(|e| ReceiveError::Stream(e.to_string()))?
            {
                Some(h) => break Some(h),
                None => {
                    let n = read_some(&mut *stream, &mut buf)?;
                    if n == 0 {
                        break None;
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        };
        let Some((entry, used)) = header else {
            return Err(ReceiveError::Stream("it ended inside a directory".into()));
        };
        pending.drain(..used);
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(ReceiveError::Stream(format!(
                "more than {MAX_ENTRIES} entries"
            )));
        }
        match entry.attr & 0xff {
            DIRECTORY => {
                if stack.len() >= MAX_DEPTH {
                    return Err(ReceiveError::Stream(format!("deeper than {MAX_DEPTH}")));
                }
                let name = if stack.is_empty() {
                    format!("{top}.part")
                } else {
                    names::sanitize(&entry.name).name
                };
                let parent = stack.last().unwrap_or(dir);
                let sub = parent.sub(std::path::Path::new(&name))?;
                stack.push(sub);
            }
            RETURN_TO_PARENT => {
                stack.pop();
                if stack.is_empty() {
                    dir.rename_dir_new(&format!("{top}.part"), &top)?;
                    (f.progress)(got);
                    return Ok((top, got));
                }
            }
            REGULAR => {
                let Some(here) = stack.last() else {
                    return Err(ReceiveError::Stream("a file outside any directory".into()));
                };
                let want = PartState {
                    from: f.from.ip().to_canonical().to_string(),
                    name: entry.name.clone(),
                    size: entry.size,
                    mtime: entry.mtime.unwrap_or(0),
                    sha256: None,
                    complete: false,
                };
                // Numbers already given in this directory are not tried again: a stream of
                // many entries of one name costs one try each, not all the numbers before.
                let safe = names::sanitize(&entry.name).name;
                let key = (stack.len(), here.path(""), safe.clone());
                let first = numbers.get(&key).map_or(0, |n| n + 1);
                let (name, n) = free_name_from(here, &safe, &|_| false, first)?;
                numbers.insert(key, n);
                room(f, here, entry.size)?;
                let part = format!("{name}.part");
                let mut file = here.create_with_state(&part, &want.encode(), &|_| false)?;
                let mut left = entry.size;
                let take = left.min(pending.len() as u64) as usize;
                file.write_all(&pending[..take])?;
                pending.drain(..take);
                left -= take as u64;
                got += take as u64;
                while left > 0 {
                    let n = read_some(&mut *stream, &mut buf[..left.min(BLOCK as u64) as usize])?;
                    if n == 0 {
                        return Err(ReceiveError::Incomplete {
                            got: entry.size - left,
                            want: entry.size,
                        });
                    }
                    file.write_all(&buf[..n])?;
                    left -= n as u64;
                    got += n as u64;
                }
                let done = PartState {
                    complete: true,
                    ..want
                };
                here.set_state(&file, &part, &done.encode())?;
                here.rename_file_new(&file, &part, &name)?;
                (f.progress)(got);
            }
            _ => return Err(ReceiveError::Stream("an entry of an unknown kind".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_files_leave_a_twentieth_of_the_disk_at_most_a_gib_unless_told() {
        const G: u64 = 1 << 30;
        assert_eq!(keep_free(252 * G, None), G);
        assert_eq!(keep_free(4 * G, None), 4 * G / 20);
        assert_eq!(keep_free(0, None), 0);
        assert_eq!(keep_free(252 * G, Some(0)), 0);
        assert_eq!(keep_free(G, Some(5 * G)), 5 * G);
    }

    fn want(size: u64) -> PartState {
        PartState {
            from: "10.0.0.2".into(),
            name: "f.bin".into(),
            size,
            mtime: 5,
            sha256: None,
            complete: false,
        }
    }

    fn put(dir: &Dir, name: &str, bytes: &[u8], state: Option<&PartState>) {
        let mut f = dir.create_file(name).unwrap();
        f.write_all(bytes).unwrap();
        if let Some(s) = state {
            dir.set_state(&f, name, &s.encode()).unwrap();
        }
    }

    #[test]
    fn a_name_is_chosen_never_over_anothers_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create(tmp.path(), OWNER).unwrap();
        let none = |_: &str| false;
        assert_eq!(
            start(&dir, "f.bin", &want(10), &none).unwrap(),
            Start::Fresh {
                name: "f.bin".into()
            }
        );
        // The user's own file of that name: the next number.
        put(&dir, "f.bin", b"mine", None);
        assert_eq!(
            start(&dir, "f.bin", &want(10), &none).unwrap(),
            Start::Fresh {
                name: "f.1.bin".into()
            }
        );
        // Our partial file of this very file: continued.
        put(&dir, "f.1.bin.part", b"12345", Some(&want(10)));
        assert_eq!(
            start(&dir, "f.bin", &want(10), &none).unwrap(),
            Start::Resume {
                name: "f.1.bin".into(),
                offset: 5
            }
        );
        // Another version (another size or mtime, another sender): not continued.
        let other = PartState {
            mtime: 6,
            ..want(10)
        };
        assert_eq!(
            start(&dir, "f.bin", &other, &none).unwrap(),
            Start::Fresh {
                name: "f.2.bin".into()
            }
        );
        let elsewhere = PartState {
            from: "10.0.0.9".into(),
            ..want(10)
        };
        assert!(matches!(
            start(&dir, "f.bin", &elsewhere, &none).unwrap(),
            Start::Fresh { .. }
        ));
        // From a chat peer the checksum decides, whoever sends it.
        let summed = |from: &str| PartState {
            from: from.into(),
            sha256: Some("ab".repeat(32)),
            ..want(10)
        };
        put(&dir, "g.bin.part", b"12", Some(&summed("10.0.0.2")));
        assert_eq!(
            start(&dir, "g.bin", &summed("10.0.0.7"), &none).unwrap(),
            Start::Resume {
                name: "g.bin".into(),
                offset: 2
            }
        );
        // A complete copy is had, not fetched again.
        put(
            &dir,
            "h.bin",
            b"0123456789",
            Some(&PartState {
                complete: true,
                ..want(10)
            }),
        );
        assert_eq!(
            start(&dir, "h.bin", &want(10), &none).unwrap(),
            Start::Have {
                name: "h.bin".into()
            }
        );
        // A partial longer than the file is not ours to continue.
        put(&dir, "k.bin.part", b"0123456789ab", Some(&want(10)));
        assert_eq!(
            start(&dir, "k.bin", &want(10), &none).unwrap(),
            Start::Fresh {
                name: "k.1.bin".into()
            }
        );
        // A name another transfer is receiving into right now is skipped.
        let busy = |n: &str| n == "m.bin";
        assert_eq!(
            start(&dir, "m.bin", &want(10), &busy).unwrap(),
            Start::Fresh {
                name: "m.1.bin".into()
            }
        );
    }
}
