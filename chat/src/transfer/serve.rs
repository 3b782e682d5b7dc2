//! Serving offered files over TCP on the port number of the socket the offer went from. A
//! request is IP Messenger's GETFILEDATA (a file from an offset) or GETDIRFILES (a directory,
//! as a stream of headers and contents), naming an offer by its packet number and a file by
//! its id: never a path. It is served only if the offer lives, was made to the host asking,
//! holds that id, and the file on disk is still the one offered (same size and modification
//! time). Between chat peers with a key the connection is sealed both ways
//! (`transfer::stream`). At most [`MAX_SERVING`] transfers run at once, and a receiver that
//! stalls is dropped after [`STALL`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corokit_common::Slots;
use may::net::{TcpListener, TcpStream};
use ring::rand::SecureRandom;

use super::offer::{self, OfferedFile, Request, DIRECTORY, REGULAR, RETURN_TO_PARENT};
use super::stream::{SealedReader, SealedWriter};
use super::{Happening, Sink};
use crate::core::Via;
use crate::ipmsg::packet::{self, mode};
use crate::seal::Key;

/// Transfers served at once; more wait for a free one.
pub const MAX_SERVING: usize = 8;
/// How long a receiver may take to send its request, or to take the next block.
pub const STALL: Duration = Duration::from_secs(30);
/// How long an offer is served.
pub const OFFER_LIFETIME: Duration = Duration::from_secs(3600);
/// Offers kept at once; the oldest goes first.
pub const MAX_OFFERS: usize = 256;
/// Largest request read.
const MAX_REQUEST: usize = 4096;
/// The handshake and the request, in all.
const REQUEST: Duration = Duration::from_secs(10);
/// Files and directories walked in one directory stream.
const MAX_WALK: usize = 100_000;
const BLOCK: usize = 256 * 1024;

/// A file or directory we offer, as it was when offered.
#[derive(Debug, Clone)]
pub struct Served {
    pub file: OfferedFile,
    pub path: PathBuf,
}

/// An offer we made.
#[derive(Debug, Clone)]
pub struct SentOffer {
    pub packet: u64,
    pub to: SocketAddr,
    /// The hosts that may fetch it (the peer's addresses).
    pub hosts: Vec<IpAddr>,
    pub files: Vec<Served>,
    /// The socket the offer went from: only its listener serves it.
    pub via: Via,
    pub made: Instant,
    /// Files served whole at least once, by id.
    pub done: Vec<u64>,
}

/// The offers we serve.
#[derive(Debug, Default)]
pub struct SentOffers {
    offers: BTreeMap<u64, SentOffer>,
}

impl SentOffers {
    pub fn add(&mut self, offer: SentOffer) {
        if self.offers.len() >= MAX_OFFERS {
            if let Some(oldest) = self
                .offers
                .values()
                .min_by_key(|o| o.made)
                .map(|o| o.packet)
            {
                self.offers.remove(&oldest);
            }
        }
        self.offers.insert(offer.packet, offer);
    }

    pub fn remove(&mut self, packet: u64) -> Option<SentOffer> {
        self.offers.remove(&packet)
    }

    pub fn list(&self) -> Vec<SentOffer> {
        self.offers.values().cloned().collect()
    }

    /// Whether `host` may fetch anything from us now (an offer to it lives).
    fn serves(&mut self, now: Instant, via: Via, host: IpAddr) -> bool {
        self.offers
            .retain(|_, o| now.saturating_duration_since(o.made) < OFFER_LIFETIME);
        let host = host.to_canonical();
        self.offers
            .values()
            .any(|o| o.via == via && o.hosts.contains(&host))
    }

    /// Whether `host` is one an offer went to, through `via`: only they may decline it.
    pub fn offered_to(&self, packet: u64, host: IpAddr, via: Via) -> bool {
        self.offers
            .get(&packet)
            .is_some_and(|o| o.via == via && o.hosts.contains(&host.to_canonical()))
    }

    /// The file a request names, if `host` may have it now.
    fn find(
        &mut self,
        now: Instant,
        via: Via,
        host: IpAddr,
        req: &Request,
    ) -> Option<(u64, SocketAddr, Served)> {
        self.offers
            .retain(|_, o| now.saturating_duration_since(o.made) < OFFER_LIFETIME);
        let o = self.offers.get(&req.packet)?;
        if o.via != via || !o.hosts.contains(&host.to_canonical()) {
            return None;
        }
        let served = req
            .file_ids()
            .find_map(|id| o.files.iter().find(|s| s.file.id == id))?;
        Some((o.packet, o.to, served.clone()))
    }

    fn served_whole(&mut self, packet: u64, id: u64) -> bool {
        let Some(o) = self.offers.get_mut(&packet) else {
            return false;
        };
        if !o.done.contains(&id) {
            o.done.push(id);
        }
        o.files.iter().all(|f| o.done.contains(&f.file.id))
    }
}

/// Size, modification time (seconds) and whether it is a directory, of what `path` names.
pub fn identity(path: &Path) -> io::Result<(u64, u64, bool)> {
    let meta = std::fs::metadata(path)?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok((meta.len(), mtime, meta.is_dir()))
}

/// What a server needs.
pub struct Server {
    pub offers: Arc<Mutex<SentOffers>>,
    /// With a key, every connection on this listener is sealed.
    pub key: Option<Key>,
    pub happen: Sink,
    /// Which offers this listener serves: those that went from its socket.
    pub via: Via,
    pub slots: Slots,
}

impl Server {
    /// Accepts and serves connections on `listener` until the process ends. A connection
    /// from a host no live offer went to, or beyond [`MAX_SERVING`] at once, is closed at
    /// once: nobody can hold the slots of the peers we offered files to.
    pub fn run(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                // Out of descriptors, say: wait for some to close instead of spinning.
                Err(_) => {
                    corokit_common::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let Ok(peer) = conn.peer_addr() else { continue };
            let welcome = {
                let mut offers = self.offers.lock().unwrap_or_else(|e| e.into_inner());
                offers.serves(Instant::now(), self.via, peer.ip())
            };
            if !welcome {
                continue;
            }
            let Some(slot) = self.slots.try_take() else {
                continue;
            };
            let server = self.clone();
            let _ = corokit_common::spawn(move || {
                let _slot = slot;
                let _ = server.serve(conn);
            });
        }
    }

    fn serve(&self, mut conn: TcpStream) -> io::Result<()> {
        let peer = conn.peer_addr()?;
        // The handshake and the request have REQUEST in all, however slowly they trickle.
        conn.set_read_timeout(Some(REQUEST))?;
        conn.set_write_timeout(Some(STALL))?;
        let _ = conn.set_nodelay(true);
        match &self.key {
            None => {
                let request = read_request(&mut Deadline::new(&mut conn, REQUEST))?;
                let mut out = io::BufWriter::with_capacity(BLOCK, conn);
                let whole = self.send(peer, request, &mut out)?;
                out.flush()?;
                self.told(whole);
                Ok(())
            }
            Some(key) => {
                let mut ours = [0u8; 16];
                ring::rand::SystemRandom::new()
                    .fill(&mut ours)
                    .map_err(|_| io::Error::other("no randomness"))?;
                conn.write_all(&ours)?;
                let mut theirs = [0u8; 16];
                conn.read_exact(&mut theirs)?;
                let keys = key.for_stream(&ours, &theirs);
                let mut reader =
                    SealedReader::new(Deadline::new(conn.try_clone()?, REQUEST), keys.to_server);
                let request = read_request(&mut reader)?;
                // Its end frame is read too: unread data at close would reset the connection
                // under the answer.
                let mut rest = Vec::new();
                (&mut reader)
                    .take(MAX_REQUEST as u64)
                    .read_to_end(&mut rest)?;
                let mut out = SealedWriter::new(conn, keys.to_client);
                let whole = self.send(peer, request, &mut out)?;
                out.finish()?;
                self.told(whole);
                Ok(())
            }
        }
    }

    /// Sends what `req` asks for to `out`, if it may have it: the file, when it went whole.
    fn send(
        &self,
        peer: SocketAddr,
        (command, req): (u32, Request),
        out: &mut dyn Write,
    ) -> io::Result<Option<Whole>> {
        let found = {
            let mut offers = self.offers.lock().unwrap_or_else(|e| e.into_inner());
            offers.find(Instant::now(), self.via, peer.ip(), &req)
        };
        let Some((packet, to, served)) = found else {
            return Err(io::Error::other("not an offer to this host"));
        };
        let (size, mtime, is_dir) = identity(&served.path)?;
        let changed = is_dir != served.file.is_dir()
            || (!is_dir && (size, mtime) != (served.file.size, served.file.mtime));
        if changed {
            // Changed since it was offered: a receiver would get another version.
            return Err(io::Error::other("the file changed since it was offered"));
        }
        let whole = match (command & 0xff, is_dir) {
            (mode::GETFILEDATA, false) => {
                let offset = req.offset.unwrap_or(0);
                if offset > size {
                    return Err(io::Error::other("an offset past the end"));
                }
                // The path the user offered (a link they chose is followed), opened without
                // blocking on a FIFO put there since, and checked once open.
                let mut file = open_regular(&served.path, true)?;
                let now = file.metadata()?;
                if (now.len(), mtime_of(&now)) != (served.file.size, served.file.mtime) {
                    return Err(io::Error::other("the file changed since it was offered"));
                }
                file.seek(SeekFrom::Start(offset))?;
                let sent = copy_exactly(&mut file, out, size - offset)?;
                sent == size - offset && (sent > 0 || size == 0)
            }
            (mode::GETDIRFILES, true) => {
                send_dir(&served.path, out)?;
                true
            }
            _ => return Err(io::Error::other("a request of the wrong kind")),
        };
        Ok(whole.then(|| Whole {
            packet,
            to,
            id: served.file.id,
            name: served.file.name.clone(),
        }))
    }

    /// Tells that a file went whole, once its stream has ended: `chat send` exits when every
    /// file has, and must not cut a stream short.
    fn told(&self, whole: Option<Whole>) {
        let Some(w) = whole else { return };
        let all = {
            let mut offers = self.offers.lock().unwrap_or_else(|e| e.into_inner());
            offers.served_whole(w.packet, w.id)
        };
        (self.happen)(Happening::Served {
            packet: w.packet,
            to: w.to,
            name: w.name,
            all,
        });
    }
}

/// A file sent whole to a peer.
struct Whole {
    packet: u64,
    to: SocketAddr,
    id: u64,
    name: String,
}

/// Reads one IP Messenger request packet: the command and what it asks for.
fn read_request(input: &mut dyn Read) -> io::Result<(u32, Request)> {
    let mut buf = Vec::with_capacity(256);
    let mut byte = [0u8; 1024];
    loop {
        if let Some(parsed) = complete_request(&buf) {
            return parsed;
        }
        if buf.len() >= MAX_REQUEST {
            return Err(io::Error::other("a request longer than allowed"));
        }
        let n = input.read(&mut byte[..(MAX_REQUEST - buf.len()).min(1024)])?;
        if n == 0 {
            return complete_request(&buf)
                .unwrap_or_else(|| Err(io::Error::other("the request ended early")));
        }
        buf.extend_from_slice(&byte[..n]);
    }
}

/// The request in `buf` once all its fields are there.
fn complete_request(buf: &[u8]) -> Option<io::Result<(u32, Request)>> {
    let p = packet::parse(buf).ok()?;
    let with_offset = match p.mode() {
        mode::GETFILEDATA => true,
        mode::GETDIRFILES => false,
        _ => return Some(Err(io::Error::other("not a file request"))),
    };
    // The extra is complete at its last colon (or NUL): `packet:file:offset:`.
    let fields = p.extra.iter().filter(|&&b| b == b':').count();
    let ended = p.extra.contains(&0);
    if fields < if with_offset { 3 } else { 2 } && !ended {
        return None;
    }
    Some(
        offer::parse_request(&p.extra, with_offset)
            .map(|r| (p.command, r))
            .map_err(io::Error::other),
    )
}

/// Opens `path` for reading only if it is a regular file now (not a link, FIFO or device
/// put there since it was listed): a FIFO would block the worker.
fn open_regular(path: &Path, follow: bool) -> io::Result<File> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = match follow {
        true => OFlags::NONBLOCK,
        false => OFlags::NOFOLLOW | OFlags::NONBLOCK,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

fn mtime_of(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// A reader that fails once `limit` has passed since it was made, however slowly its
/// bytes trickle in (each read still has the socket's own timeout).
struct Deadline<R> {
    inner: R,
    until: Instant,
}

impl<R> Deadline<R> {
    fn new(inner: R, limit: Duration) -> Self {
        Deadline {
            inner,
            until: Instant::now() + limit,
        }
    }
}

impl<R: Read> Read for Deadline<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.until {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request took too long",
            ));
        }
        self.inner.read(buf)
    }
}

/// Copies `len` bytes (at most) of `file` to `out`; the count copied.
fn copy_exactly(file: &mut File, out: &mut dyn Write, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let want = left.min(BLOCK as u64) as usize;
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(len - left)
}

/// A directory as IP Messenger streams it: each entry's header, a file's bytes after its
/// header, and a return-to-parent entry closing each directory. Links and special files
/// are left out; so is anything past [`MAX_WALK`] entries.
fn send_dir(root: &Path, out: &mut dyn Write) -> io::Result<()> {
    let mut walked = 0;
    walk(root, out, &mut walked, 0)
}

/// Levels below the offered directory that are sent (the receiver takes no more).
const MAX_DEPTH: usize = 64;

fn walk(dir: &Path, out: &mut dyn Write, walked: &mut usize, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other(
            "a directory deeper than the receiver takes",
        ));
    }
    if std::fs::symlink_metadata(dir)?.file_type().is_symlink() {
        return Err(io::Error::other("a directory became a link"));
    }
    let name = dir
        .file_name()
        .map_or_else(|| ".".into(), |n| n.to_string_lossy().into_owned());
    let (_, mtime, _) = identity(dir)?;
    out.write_all(&offer::write_dir_header(
        name.as_bytes(),
        0,
        DIRECTORY,
        mtime,
    ))?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        *walked += 1;
        if *walked > MAX_WALK {
            break;
        }
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            walk(&path, out, walked, depth + 1)?;
        } else if kind.is_file() {
            let (size, mtime, _) = identity(&path)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            out.write_all(&offer::write_dir_header(
                name.as_bytes(),
                size,
                REGULAR,
                mtime,
            ))?;
            let mut file = open_regular(&path, false)?;
            // A file that changed while it was sent ends the stream: the receiver sees it
            // cut short and names nothing.
            let sent = copy_exactly(&mut file, out, size)?;
            let now = file.metadata()?;
            if sent < size || now.len() != size || mtime_of(&now) != mtime {
                return Err(io::Error::other("a file changed while it was sent"));
            }
        }
    }
    out.write_all(&offer::write_dir_header(b".", 0, RETURN_TO_PARENT, 0))
}
