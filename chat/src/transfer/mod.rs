//! Files between peers: offers in IP Messenger's form (chat peers get them in a chat message,
//! IP Messenger users in theirs), the bytes over TCP on the same port number as the offer's
//! UDP socket, resumable, and sealed between chat peers with a key.
//!
//! [`Transfers`] holds the offers made and received and runs the transfers as coroutines:
//! [`serve`] answers requests for what we offered, [`receive`] fetches what we accept, and
//! what happens is told to the user through a [`Sink`].

pub mod offer;
pub mod receive;
pub mod serve;
pub mod stream;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corokit_common::dir::Dir;
use corokit_common::Slots;
use may::net::TcpListener;
use ring::digest;

use crate::core::{Event, Protocol, SendError, Via};
use crate::node::Node;
use crate::seal::Key;
use offer::{OfferedFile, DIRECTORY, REGULAR};
use receive::{Asker, Fetch, ReceiveError};
use serve::{SentOffer, SentOffers, Served, Server, MAX_SERVING, OFFER_LIFETIME};

/// Offers received and kept (see [`to_forget`] for which go first).
pub const MAX_RECEIVED: usize = 256;
/// Offers received and kept from one host: a flood of offers from one host (IP Messenger's
/// are not authenticated) pushes out only its own.
pub const MAX_RECEIVED_PER_HOST: usize = 32;
/// Files received at once.
pub const MAX_RECEIVING: usize = 4;
/// The first file id of an offer: its hex form has a letter, so a request that names it in
/// hex cannot be read as another id in decimal, or the reverse.
const FIRST_ID: u64 = 0xa0_0000;

/// What the user is told about files.
#[derive(Debug, Clone, PartialEq)]
pub enum Happening {
    /// An offer to us, numbered for `/get` and `/decline`.
    Offered {
        id: u32,
        from: SocketAddr,
        nick: Option<String>,
        protocol: Protocol,
        text: String,
        files: Vec<OfferedFile>,
    },
    Progress {
        id: u32,
        name: String,
        bytes: u64,
        size: u64,
    },
    Done {
        id: u32,
        name: String,
        path: PathBuf,
        size: u64,
        /// Bytes that came over the network for it this time (less than `size` when a
        /// partial file was continued).
        fetched: u64,
    },
    Failed {
        id: u32,
        name: String,
        error: String,
    },
    /// A peer fetched a file of our offer whole; `all` once every file was.
    Served {
        packet: u64,
        to: SocketAddr,
        name: String,
        all: bool,
    },
    Declined {
        packet: u64,
        from: SocketAddr,
    },
    Withdrawn {
        id: u32,
        from: SocketAddr,
    },
}

/// Where happenings go.
pub type Sink = Arc<dyn Fn(Happening) + Send + Sync>;

/// Why files could not be offered.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    #[error("{}: {source}", path.display())]
    Path {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is neither a file nor a directory")]
    Kind(PathBuf),
    #[error("nothing to offer")]
    Empty,
    /// No TCP listener serves this peer's protocol: whatever holds the port would answer.
    #[error("files cannot be offered to {0}: nothing serves them (see the notice at start)")]
    NotServing(SocketAddr),
    #[error("{0}")]
    Send(#[from] SendError),
}

/// The offer received to forget before one more from `host` is kept, if one must go: while
/// `host` has [`MAX_RECEIVED_PER_HOST`], its own oldest; else, once [`MAX_RECEIVED`] are kept,
/// the oldest one already answered (received, failed, declined, withdrawn), or the oldest
/// waiting one of the host that sent the most. An offer being received is never forgotten.
fn to_forget(received: &BTreeMap<u32, ReceivedOffer>, host: IpAddr) -> Option<u32> {
    let host = host.to_canonical();
    let from = |o: &ReceivedOffer| o.from.ip().to_canonical();
    // Ids only grow: the first of each is the oldest.
    let oldest = |keep: &dyn Fn(&ReceivedOffer) -> bool| {
        received
            .iter()
            .find(|(_, o)| o.state != OfferState::Receiving && keep(o))
            .map(|(id, _)| *id)
    };
    if received.values().filter(|o| from(o) == host).count() >= MAX_RECEIVED_PER_HOST {
        return oldest(&|o| from(o) == host);
    }
    if received.len() < MAX_RECEIVED {
        return None;
    }
    let answered = |o: &ReceivedOffer| !matches!(o.state, OfferState::Waiting);
    if let Some(id) = oldest(&answered) {
        return Some(id);
    }
    let mut counts: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for o in received.values() {
        *counts.entry(from(o)).or_default() += 1;
    }
    // Of the hosts with an offer that may go: one being received may not.
    let most = received
        .values()
        .filter(|o| o.state != OfferState::Receiving)
        .map(|o| counts[&from(o)])
        .max()?;
    oldest(&|o| counts[&from(o)] == most)
}

/// The state of an offer received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferState {
    Waiting,
    Receiving,
    Done,
    Failed,
    Declined,
    Withdrawn,
}

impl OfferState {
    fn word(self) -> &'static str {
        match self {
            OfferState::Waiting => "waiting",
            OfferState::Receiving => "receiving",
            OfferState::Done => "received",
            OfferState::Failed => "failed",
            OfferState::Declined => "declined",
            OfferState::Withdrawn => "withdrawn",
        }
    }
}

#[derive(Debug, Clone)]
struct ReceivedOffer {
    from: SocketAddr,
    nick: Option<String>,
    protocol: Protocol,
    packet: u64,
    files: Vec<OfferedFile>,
    at: Instant,
    state: OfferState,
}

struct Inner {
    node: Node,
    key: Option<Key>,
    asker: Asker,
    downloads: PathBuf,
    /// `--min-free`.
    min_free: Option<u64>,
    sent: Arc<Mutex<SentOffers>>,
    received: Mutex<BTreeMap<u32, ReceivedOffer>>,
    next_id: Mutex<u32>,
    /// Names being received into right now, by directory.
    busy: Mutex<BTreeSet<PathBuf>>,
    receiving: Slots,
    serving: Slots,
    /// The protocols a listener serves our offers for.
    served_via: Mutex<Vec<Via>>,
    happen: Sink,
}

/// A name being received into, released when dropped.
struct Held {
    transfers: Transfers,
    path: PathBuf,
}

impl Drop for Held {
    fn drop(&mut self) {
        lock(&self.transfers.0.busy).remove(&self.path);
    }
}

/// Offers made and received, and the transfers under way.
#[derive(Clone)]
pub struct Transfers(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Transfers {
    /// `downloads`: where `/get` saves without a directory given; `min_free`: what received
    /// files leave free on their disk (see [`receive::keep_free`]).
    pub fn new(
        node: Node,
        key: Option<Key>,
        asker: Asker,
        (downloads, min_free): (PathBuf, Option<u64>),
        happen: Sink,
    ) -> Self {
        Transfers(Arc::new(Inner {
            node,
            key,
            asker,
            downloads,
            min_free,
            sent: Arc::new(Mutex::new(SentOffers::default())),
            received: Mutex::new(BTreeMap::new()),
            next_id: Mutex::new(0),
            busy: Mutex::new(BTreeSet::new()),
            receiving: Slots::new(MAX_RECEIVING),
            serving: Slots::new(MAX_SERVING),
            served_via: Mutex::new(Vec::new()),
            happen,
        }))
    }

    /// Serves what was offered from the socket `via` on `listener` (sealed when `sealed`).
    pub fn serve(&self, listener: TcpListener, via: Via, sealed: bool) -> std::io::Result<()> {
        let server = Arc::new(Server {
            offers: self.0.sent.clone(),
            key: if sealed { self.0.key.clone() } else { None },
            happen: self.0.happen.clone(),
            slots: self.0.serving.clone(),
            via,
        });
        corokit_common::spawn(move || server.run(listener)).map_err(std::io::Error::other)?;
        lock(&self.0.served_via).push(via);
        Ok(())
    }

    /// Offers `paths` to `to` with `text`: the offer's packet number.
    pub fn offer(&self, to: SocketAddr, paths: &[PathBuf], text: &str) -> Result<u64, OfferError> {
        if paths.is_empty() {
            return Err(OfferError::Empty);
        }
        let ipmsg = self.0.node.is_ipmsg(to);
        let via = if ipmsg { Via::Ipmsg } else { Via::Chat };
        if !lock(&self.0.served_via).contains(&via) {
            return Err(OfferError::NotServing(to));
        }
        let mut served = Vec::new();
        for (k, path) in paths.iter().enumerate() {
            let (size, mtime, is_dir) =
                serve::identity(path).map_err(|source| OfferError::Path {
                    path: path.clone(),
                    source,
                })?;
            if !is_dir && !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
                return Err(OfferError::Kind(path.clone()));
            }
            // A chat peer checks what it receives against the SHA-256 (hashed off the
            // worker: a large file takes a while).
            let sha256 = if ipmsg || is_dir {
                None
            } else {
                let p = path.clone();
                corokit_common::offload(Duration::from_secs(3600), move || sha256_of(&p))
                    .map_err(|e| OfferError::Path {
                        path: path.clone(),
                        source: std::io::Error::other(e),
                    })?
                    .map_err(|source| OfferError::Path {
                        path: path.clone(),
                        source,
                    })
                    .map(Some)?
            };
            let name = path
                .file_name()
                .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
            served.push(Served {
                file: OfferedFile {
                    id: FIRST_ID + k as u64,
                    name,
                    size: if is_dir { 0 } else { size },
                    mtime,
                    attr: if is_dir { DIRECTORY } else { REGULAR },
                    sha256,
                },
                path: path.clone(),
            });
        }
        let files: Vec<OfferedFile> = served.iter().map(|s| s.file.clone()).collect();
        // The hosts that may fetch: every address the peer is known at.
        let mut hosts = vec![to.ip().to_canonical()];
        if let Some(p) = self.0.node.peers().into_iter().find(|p| p.addr == to) {
            hosts.extend(p.also.iter().map(|a| a.ip().to_canonical()));
        }
        // Served from before the offer leaves: a quick peer asks at once.
        let (_, packet) = self.0.node.send_offer(to, text, &files, |packet| {
            lock(&self.0.sent).add(SentOffer {
                packet,
                to,
                hosts,
                files: served,
                via,
                made: Instant::now(),
                done: Vec::new(),
            })
        })?;
        Ok(packet)
    }

    /// Stops serving our offer `packet`, and tells its peer.
    pub fn withdraw(&self, packet: u64) -> bool {
        let Some(offer) = lock(&self.0.sent).remove(packet) else {
            return false;
        };
        let _ = self.0.node.withdraw_offer(offer.to, packet);
        true
    }

    /// Takes the events about files; false for every other event.
    pub fn on_event(&self, event: &Event) -> bool {
        match event {
            Event::FileOffer {
                from,
                nick,
                protocol,
                packet,
                text,
                files,
            } => {
                let id = {
                    let mut next = lock(&self.0.next_id);
                    *next += 1;
                    *next
                };
                let mut received = lock(&self.0.received);
                if let Some(old) = to_forget(&received, from.ip()) {
                    received.remove(&old);
                }
                // Only a chat peer's checksum is believed: an IPMsg user could name another
                // sender's file by it and have its partial copy taken for its own.
                let mut files = files.clone();
                if *protocol != Protocol::Chat {
                    files.iter_mut().for_each(|f| f.sha256 = None);
                }
                received.insert(
                    id,
                    ReceivedOffer {
                        from: *from,
                        nick: nick.clone(),
                        protocol: *protocol,
                        packet: *packet,
                        files: files.clone(),
                        at: Instant::now(),
                        state: OfferState::Waiting,
                    },
                );
                drop(received);
                (self.0.happen)(Happening::Offered {
                    id,
                    from: *from,
                    nick: nick.clone(),
                    protocol: *protocol,
                    text: text.clone(),
                    files: files.clone(),
                });
                true
            }
            Event::OfferDeclined { from, packet, via } => {
                // Only a host the offer went to may decline it, the way it went: a forged
                // IP Messenger release must not end an offer made over sealed chat.
                let ours = {
                    let mut sent = lock(&self.0.sent);
                    sent.offered_to(*packet, from.ip(), *via) && sent.remove(*packet).is_some()
                };
                if ours {
                    (self.0.happen)(Happening::Declined {
                        packet: *packet,
                        from: *from,
                    });
                }
                true
            }
            Event::OfferWithdrawn { from, packet } => {
                let mut withdrawn = Vec::new();
                for (id, o) in lock(&self.0.received).iter_mut() {
                    // Only a chat peer withdraws (IP Messenger has no word for it).
                    if o.from == *from
                        && o.packet == *packet
                        && o.protocol == Protocol::Chat
                        && o.state == OfferState::Waiting
                    {
                        o.state = OfferState::Withdrawn;
                        withdrawn.push(*id);
                    }
                }
                for id in withdrawn {
                    (self.0.happen)(Happening::Withdrawn { id, from: *from });
                }
                true
            }
            Event::Leave { addr, .. } => {
                // Its offers went with it.
                for o in lock(&self.0.received).values_mut() {
                    if o.from == *addr && o.state == OfferState::Waiting {
                        o.state = OfferState::Withdrawn;
                    }
                }
                false
            }
            _ => false,
        }
    }

    /// Tells the sender of offer `id` we will not take it.
    pub fn decline(&self, id: u32) -> Result<(), String> {
        let offer = {
            let mut received = lock(&self.0.received);
            let o = received
                .get_mut(&id)
                .ok_or(format!("no offer #{id}; /files lists them"))?;
            o.state = OfferState::Declined;
            o.clone()
        };
        self.0
            .node
            .decline_offer(offer.from, offer.packet)
            .map_err(|e| e.to_string())
    }

    /// Fetches every file of offer `id` into `into` (or the downloads directory), each in a
    /// coroutine of its own.
    pub fn get(&self, id: u32, into: Option<&Path>) -> Result<(), String> {
        let offer = {
            let mut received = lock(&self.0.received);
            let o = received
                .get_mut(&id)
                .ok_or(format!("no offer #{id}; /files lists them"))?;
            if Instant::now().saturating_duration_since(o.at) > OFFER_LIFETIME {
                o.state = OfferState::Withdrawn;
            }
            match o.state {
                OfferState::Withdrawn => {
                    return Err(format!("offer #{id} was withdrawn or its sender left"))
                }
                OfferState::Receiving => return Err(format!("offer #{id} is being received")),
                _ => {}
            }
            o.state = OfferState::Receiving;
            o.clone()
        };
        let target = into.map_or_else(|| self.0.downloads.clone(), Path::to_path_buf);
        let cannot = |e: std::io::Error| format!("cannot use {}: {e}", target.display());
        // One spelling per directory, so two transfers into it by different paths see each
        // other's names (see `reserve`).
        let dir = std::fs::create_dir_all(&target)
            .and_then(|()| std::fs::canonicalize(&target))
            .and_then(|real| Dir::create(&real, receive::OWNER))
            .map_err(cannot)?;
        let dir = Arc::new(dir);
        let left = Arc::new(Mutex::new((offer.files.len(), false)));
        for file in offer.files.clone() {
            let (this, dir, offer, left) = (self.clone(), dir.clone(), offer.clone(), left.clone());
            corokit_common::spawn(move || {
                let _slot = this.0.receiving.take();
                let ok = this.receive_one(id, &offer, &file, &dir);
                let mut left = lock(&left);
                left.0 -= 1;
                left.1 |= !ok;
                if left.0 == 0 {
                    let state = if left.1 {
                        OfferState::Failed
                    } else {
                        OfferState::Done
                    };
                    if let Some(o) = lock(&this.0.received).get_mut(&id) {
                        o.state = state;
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn receive_one(&self, id: u32, offer: &ReceivedOffer, file: &OfferedFile, dir: &Dir) -> bool {
        let happen = &self.0.happen;
        let size = file.size;
        let name_shown = file.name.clone();
        let progress = |bytes: u64| {
            happen(Happening::Progress {
                id,
                name: name_shown.clone(),
                bytes,
                size,
            })
        };
        let key = match offer.protocol {
            Protocol::Chat => self.0.key.as_ref(),
            _ => None,
        };
        let fetch = Fetch {
            from: offer.from,
            packet: offer.packet,
            file,
            key,
            asker: &self.0.asker,
            honours_offset: offer.protocol == Protocol::Chat,
            min_free: self.0.min_free,
            progress: &progress,
        };
        let result = self
            .reserve(dir, file, offer.from)
            .and_then(|(start, _held)| {
                if file.is_dir() {
                    receive::receive_dir(&fetch, dir, start.name().to_string())
                } else {
                    receive::receive_file(&fetch, dir, start)
                }
            });
        match result {
            Ok((name, fetched)) => {
                happen(Happening::Done {
                    id,
                    name: file.name.clone(),
                    path: dir.path(&name),
                    size: file.size,
                    fetched,
                });
                true
            }
            Err(e) => {
                happen(Happening::Failed {
                    id,
                    name: file.name.clone(),
                    error: e.to_string(),
                });
                false
            }
        }
    }

    /// Chooses the name `file` is received under in `dir`, and holds it against other
    /// transfers into `dir` until the [`Held`] drops.
    fn reserve(
        &self,
        dir: &Dir,
        file: &OfferedFile,
        from: SocketAddr,
    ) -> Result<(receive::Start, Held), ReceiveError> {
        let mut busy = lock(&self.0.busy);
        let taken = |name: &str| busy.contains(&dir.path(name));
        let safe = corokit_common::names::sanitize(&file.name).name;
        let start = if file.is_dir() {
            receive::Start::Fresh {
                name: receive::free_name(dir, &safe, &taken)?,
            }
        } else {
            receive::start(dir, &safe, &receive::PartState::of(from, file), &taken)?
        };
        let path = dir.path(start.name());
        busy.insert(path.clone());
        Ok((
            start,
            Held {
                transfers: self.clone(),
                path,
            },
        ))
    }

    /// `/files`: offers received and made, with their state.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (id, o) in lock(&self.0.received).iter() {
            let names: Vec<String> = o
                .files
                .iter()
                .map(|f| corokit_common::text::escape(&f.name))
                .collect();
            out.push(format!(
                "  #{id} from {} ({}): {} [{}]",
                corokit_common::text::escape(o.nick.as_deref().unwrap_or("-")),
                o.from,
                names.join(", "),
                o.state.word()
            ));
        }
        for o in lock(&self.0.sent).list() {
            let names: Vec<String> = o
                .files
                .iter()
                .map(|f| corokit_common::text::escape(&f.file.name))
                .collect();
            out.push(format!(
                "  offered to {} (offer {:x}): {} [{} of {} fetched]",
                o.to,
                o.packet,
                names.join(", "),
                o.done.len(),
                o.files.len()
            ));
        }
        if out.is_empty() {
            out.push("chat: no files offered either way".into());
        }
        out
    }
}

/// The SHA-256 of the file at `path`.
fn sha256_of(path: &Path) -> std::io::Result<[u8; 32]> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx.finish().as_ref().try_into().expect("32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(host: [u8; 4], state: OfferState) -> ReceivedOffer {
        ReceivedOffer {
            from: SocketAddr::from((host, 2425)),
            nick: None,
            protocol: Protocol::Ipmsg {
                unauthenticated: false,
            },
            packet: 1,
            files: Vec::new(),
            at: Instant::now(),
            state,
        }
    }

    /// What `offers` (host, state) leave once each is received in turn.
    fn receive(offers: impl IntoIterator<Item = ([u8; 4], OfferState)>) -> Vec<ReceivedOffer> {
        let mut received = BTreeMap::new();
        for (id, (host, state)) in (1u32..).zip(offers) {
            if let Some(old) = to_forget(&received, IpAddr::from(host)) {
                received.remove(&old);
            }
            received.insert(id, offer(host, state));
        }
        received.into_values().collect()
    }

    #[test]
    fn a_flood_of_offers_from_one_host_never_pushes_out_anothers() {
        let real = ([10, 0, 0, 1], OfferState::Waiting);
        let flood = std::iter::repeat_n(([10, 0, 0, 66], OfferState::Waiting), 10_000);
        let kept = receive(std::iter::once(real).chain(flood));
        assert_eq!(kept[0].from.ip(), IpAddr::from([10, 0, 0, 1]));
        assert_eq!(kept.len(), 1 + MAX_RECEIVED_PER_HOST);
    }

    #[test]
    fn many_hosts_keep_the_newest_and_answered_offers_go_first() {
        // 300 hosts, one offer each: the bound holds, and the oldest went.
        let kept = receive((0..300u32).map(|i| (i.to_be_bytes(), OfferState::Waiting)));
        assert_eq!(kept.len(), MAX_RECEIVED);
        assert_eq!(kept[0].from.ip(), IpAddr::from(44u32.to_be_bytes()));
        // Full with offers from many hosts, the first of them already received: that one goes
        // before any waiting one, and one being received is never forgotten.
        let mut offers = vec![
            ([9, 9, 9, 9], OfferState::Receiving),
            ([9, 9, 9, 8], OfferState::Done),
        ];
        offers.extend((0..MAX_RECEIVED as u32 - 2).map(|i| (i.to_be_bytes(), OfferState::Waiting)));
        offers.push(([7, 7, 7, 7], OfferState::Waiting));
        let kept = receive(offers);
        assert_eq!(kept.len(), MAX_RECEIVED);
        assert_eq!(kept[0].state, OfferState::Receiving);
        assert!(kept.iter().all(|o| o.state != OfferState::Done));
        // Then the busiest host's oldest waiting offer goes.
        let mut offers: Vec<_> = (0..MAX_RECEIVED as u32 - 3)
            .map(|i| (i.to_be_bytes(), OfferState::Waiting))
            .collect();
        offers.extend([([8, 8, 8, 8], OfferState::Waiting); 3]);
        offers.push(([7, 7, 7, 7], OfferState::Waiting));
        let kept = receive(offers);
        let busiest = kept
            .iter()
            .filter(|o| o.from.ip() == IpAddr::from([8, 8, 8, 8]))
            .count();
        assert_eq!((kept.len(), busiest), (MAX_RECEIVED, 2));
        // The host that sent the most has only offers being received: the next busiest's
        // oldest goes, and the bound holds.
        let mut offers = vec![([6, 6, 6, 6], OfferState::Receiving); 4];
        offers.extend((0..MAX_RECEIVED as u32 - 4).map(|i| (i.to_be_bytes(), OfferState::Waiting)));
        offers.extend((0..10u32).map(|i| ((i + 1000).to_be_bytes(), OfferState::Waiting)));
        let kept = receive(offers);
        assert_eq!(kept.len(), MAX_RECEIVED);
        assert_eq!(
            kept.iter()
                .filter(|o| o.state == OfferState::Receiving)
                .count(),
            4
        );
    }
}
