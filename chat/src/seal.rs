//! Encryption and authentication of datagrams with a shared secret (wire version 2).
//!
//! The secret goes through HKDF-SHA256 (salt `corokit chat v2`) to a master key, and from it
//! to one ChaCha20-Poly1305 key per sender run (`info` = "datagram key" and the run's
//! instance). A sealed datagram is
//! ```text
//! magic 3, version 1, kind=Sealed 1, flags=0 1, src instance 8, counter 8   (authenticated)
//! box: the whole binary datagram, with its 16-byte tag
//! ```
//! The nonce is the counter, which a run never repeats, under a key no other run shares, so no
//! nonce is ever used twice with one key. The receiver checks the counter against a sliding
//! replay window per sender run, and the datagram inside names the receiver's own run (`dst`):
//! a datagram recorded and sent again, to the same receiver, to another receiver, or to a
//! restarted one, is rejected (see `core`).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;

use crate::wire::{Kind, MAGIC, VERSION};

/// The authenticated envelope header: magic, version, kind, flags, src, counter.
const ENVELOPE: usize = 6 + 8 + 8;
/// Bytes a seal adds to a binary datagram.
pub const OVERHEAD: usize = ENVELOPE + 16;

/// The master key derived from a shared secret.
#[derive(Clone)]
pub struct Key {
    prk: hkdf::Prk,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// The key of one sender run.
pub struct RunKey(LessSafeKey);

impl std::fmt::Debug for RunKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunKey(..)")
    }
}

/// The keys of one file-transfer connection.
pub struct StreamKeys {
    pub to_server: LessSafeKey,
    pub to_client: LessSafeKey,
}

/// A sealed datagram did not open: wrong key, or altered on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not authentic (wrong key or altered)")]
pub struct NotAuthentic;

impl Key {
    pub fn derive(secret: &[u8]) -> Key {
        Key {
            prk: hkdf::Salt::new(hkdf::HKDF_SHA256, b"corokit chat v2").extract(secret),
        }
    }

    /// The keys of one file-transfer connection, one per direction, from both ends' random
    /// nonces: no two connections share a key, so counters can start at 0 on each.
    pub fn for_stream(&self, server: &[u8; 16], client: &[u8; 16]) -> StreamKeys {
        let key = |direction: &[u8]| {
            let mut bytes = [0u8; 32];
            self.prk
                .expand(
                    &[b"stream key", direction, server, client],
                    &CHACHA20_POLY1305,
                )
                .and_then(|okm| okm.fill(&mut bytes))
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("32-byte key"))
        };
        StreamKeys {
            to_server: key(b"to server"),
            to_client: key(b"to client"),
        }
    }

    /// The key that run `instance` seals with.
    pub fn for_run(&self, instance: u64) -> RunKey {
        let instance = instance.to_be_bytes();
        let mut bytes = [0u8; 32];
        self.prk
            .expand(&[b"datagram key", &instance], &CHACHA20_POLY1305)
            .and_then(|okm| okm.fill(&mut bytes))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("32-byte ChaCha20 key");
        RunKey(LessSafeKey::new(key))
    }
}

/// The nonce of the `counter`-th datagram (or stream frame) under one key.
pub(crate) fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 8..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The sender run a sealed datagram claims to come from (which key to open it with).
pub fn sealed_by(sealed: &[u8]) -> Option<u64> {
    let src = sealed.get(6..14)?;
    Some(u64::from_be_bytes(src.try_into().ok()?))
}

impl RunKey {
    /// Seals a binary datagram of run `src`; `counter` must never repeat for this key.
    pub fn seal(&self, src: u64, counter: u64, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION, Kind::Sealed as u8, 0]);
        out.extend_from_slice(&src.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(plain);
        let (head, body) = out.split_at_mut(ENVELOPE);
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*head), body)
            .expect("a datagram is far below ChaCha20-Poly1305's length limit");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Opens a sealed datagram: its counter and the binary datagram inside.
    pub fn open(&self, sealed: &[u8]) -> Result<(u64, Vec<u8>), NotAuthentic> {
        if sealed.len() < OVERHEAD
            || sealed[..6] != [MAGIC[0], MAGIC[1], MAGIC[2], VERSION, Kind::Sealed as u8, 0]
        {
            return Err(NotAuthentic);
        }
        let counter = u64::from_be_bytes(sealed[14..22].try_into().map_err(|_| NotAuthentic)?);
        let mut inner = sealed[ENVELOPE..].to_vec();
        let plain_len = self
            .0
            .open_in_place(nonce(counter), Aad::from(&sealed[..ENVELOPE]), &mut inner)
            .map_err(|_| NotAuthentic)?
            .len();
        inner.truncate(plain_len);
        Ok((counter, inner))
    }
}

/// Which counters a sender run has used: the highest, and a bitmap of the ones below it.
#[derive(Debug, Default, Clone)]
pub struct ReplayWindow {
    highest: u64,
    seen: [u64; WINDOW_WORDS],
}

const WINDOW_WORDS: usize = 8;
/// Counters this far below the highest are still accepted once (reordering on the way).
pub const REPLAY_WINDOW: u64 = 64 * WINDOW_WORDS as u64;

impl ReplayWindow {
    /// True the first time `counter` is offered (and not too far below the highest).
    /// Counters start at 1.
    pub fn accept(&mut self, counter: u64) -> bool {
        if counter == 0 {
            return false;
        }
        if counter > self.highest {
            self.shift(counter - self.highest);
            self.highest = counter;
            self.seen[0] |= 1;
            return true;
        }
        let back = self.highest - counter;
        if back >= REPLAY_WINDOW {
            return false;
        }
        let (word, bit) = ((back / 64) as usize, 1u64 << (back % 64));
        if self.seen[word] & bit != 0 {
            return false;
        }
        self.seen[word] |= bit;
        true
    }

    /// Starts the window at `counter`, taking it and every counter below it as seen: what a
    /// run sealed before the datagram that verified it is over (retransmissions are sealed
    /// afresh), so a copy of it is a replay.
    pub fn start_after(&mut self, counter: u64) {
        self.highest = counter;
        self.seen = [u64::MAX; WINDOW_WORDS];
    }

    /// Moves every bit `by` places towards the old end (bit i of the window: `highest - i`).
    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.seen = [0; WINDOW_WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WINDOW_WORDS).rev() {
            let from = i.checked_sub(words);
            let lo = from.map_or(0, |f| self.seen[f]);
            let carry = from
                .and_then(|f| f.checked_sub(1))
                .map_or(0, |f| self.seen[f]);
            self.seen[i] = if bits == 0 {
                lo
            } else {
                (lo << bits) | (carry >> (64 - bits))
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_datagrams_open_only_with_the_same_secret_and_run() {
        let key = Key::derive(b"correct horse");
        let plain = b"\xC6KT\x02\x04 inner";
        let sealed = key.for_run(5).seal(5, 7, plain);
        assert_eq!(sealed.len(), plain.len() + OVERHEAD);
        assert_eq!(sealed_by(&sealed), Some(5));
        assert_eq!(key.for_run(5).open(&sealed), Ok((7, plain.to_vec())));
        assert_eq!(key.for_run(6).open(&sealed), Err(NotAuthentic));
        assert_eq!(
            Key::derive(b"wrong").for_run(5).open(&sealed),
            Err(NotAuthentic)
        );
        for at in [3, 10, 16, 30, sealed.len() - 1] {
            let mut altered = sealed.clone();
            altered[at] ^= 1;
            assert_eq!(
                key.for_run(5).open(&altered),
                Err(NotAuthentic),
                "byte {at}"
            );
        }
    }

    #[test]
    fn the_replay_window_accepts_each_counter_once() {
        let mut w = ReplayWindow::default();
        assert!(!w.accept(0));
        assert!(w.accept(10));
        assert!(!w.accept(10));
        assert!(w.accept(12));
        assert!(w.accept(11));
        assert!(!w.accept(11));
        assert!(w.accept(700));
        assert!(!w.accept(12), "far below the window");
        assert!(w.accept(699));
        assert!(w.accept(700 - 300));
        assert!(!w.accept(700 - 300));
        assert!(w.accept(701));
        assert!(!w.accept(699) && !w.accept(700 - 300));
    }

    #[test]
    fn a_window_started_after_a_counter_refuses_everything_before() {
        let mut w = ReplayWindow::default();
        w.start_after(40);
        assert!(!w.accept(1) && !w.accept(40));
        assert!(w.accept(41) && w.accept(45));
        assert!(!w.accept(39));
    }

    #[test]
    fn the_replay_window_matches_a_set_over_random_counters() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut highest = 0u64;
        for _ in 0..50_000 {
            let c = (highest + 40).saturating_sub(rng.u64(0..700)).max(1);
            let fresh = !seen.contains(&c) && highest.saturating_sub(c) < REPLAY_WINDOW;
            assert_eq!(w.accept(c), fresh, "counter {c}, highest {highest}");
            if fresh {
                seen.insert(c);
                highest = highest.max(c);
            }
        }
    }
}
