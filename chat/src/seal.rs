//! Encryption and authentication of protocol datagrams with a shared secret.
//!
//! The secret goes through HKDF-SHA256 to a ChaCha20-Poly1305 key. A sealed datagram is
//! `magic, version, Kind::Sealed, flags=1` (6 bytes, authenticated as AAD), a random
//! 96-bit nonce, and the box of `counter (8) | unix millis (8) | plain datagram`. The
//! receiver rejects a counter it has seen from that sender (a sliding window) and anything
//! more than two minutes away from its own clock, so a replayed datagram is never shown,
//! not even after a restart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::wire::{Kind, MAGIC, VERSION};

/// Bytes a seal adds: header 6, nonce 12, counter 8, time 8, tag 16.
pub const OVERHEAD: usize = 6 + NONCE_LEN + 8 + 8 + 16;
/// How far a sealed datagram's time may be from ours.
pub const FRESHNESS: Duration = Duration::from_secs(120);

/// A key derived from a shared secret.
pub struct Key {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Why a sealed datagram was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not authentic (wrong key or altered)")]
    NotAuthentic,
    #[error("too old or from the future")]
    Stale,
}

fn header() -> [u8; 6] {
    [MAGIC[0], MAGIC[1], MAGIC[2], VERSION, Kind::Sealed as u8, 1]
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Key {
    pub fn derive(secret: &[u8]) -> Key {
        struct Len;
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"corokit chat v1").extract(secret);
        let mut bytes = [0u8; 32];
        prk.expand(&[b"datagram key"], Len)
            .and_then(|okm| okm.fill(&mut bytes))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("32-byte ChaCha20 key");
        Key {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        }
    }

    /// Seals a plain protocol datagram; `counter` must grow with every datagram sent.
    pub fn seal(&self, plain: &[u8], counter: u64) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        // SystemRandom fails only if the OS has no randomness; a zero nonce would then be
        // reused, so refuse to send rather than weaken the seal.
        if self.rng.fill(&mut nonce).is_err() {
            return Vec::new();
        }
        let mut inner = Vec::with_capacity(16 + plain.len() + 16);
        inner.extend_from_slice(&counter.to_be_bytes());
        inner.extend_from_slice(&now_millis().to_be_bytes());
        inner.extend_from_slice(plain);
        let head = header();
        if self
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(head),
                &mut inner,
            )
            .is_err()
        {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(6 + NONCE_LEN + inner.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&inner);
        out
    }

    /// Opens a sealed datagram: its counter and the plain datagram inside.
    pub fn open(&self, sealed: &[u8]) -> Result<(u64, Vec<u8>), Rejected> {
        if sealed.len() < OVERHEAD || sealed[..6] != header() {
            return Err(Rejected::NotAuthentic);
        }
        let nonce: [u8; NONCE_LEN] = sealed[6..6 + NONCE_LEN]
            .try_into()
            .map_err(|_| Rejected::NotAuthentic)?;
        let mut inner = sealed[6 + NONCE_LEN..].to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header()),
                &mut inner,
            )
            .map_err(|_| Rejected::NotAuthentic)?;
        let counter =
            u64::from_be_bytes(plain[..8].try_into().map_err(|_| Rejected::NotAuthentic)?);
        let sent = u64::from_be_bytes(
            plain[8..16]
                .try_into()
                .map_err(|_| Rejected::NotAuthentic)?,
        );
        if now_millis().abs_diff(sent) > FRESHNESS.as_millis() as u64 {
            return Err(Rejected::Stale);
        }
        Ok((counter, plain[16..].to_vec()))
    }
}

/// Which counters a sender has used: the highest, and a bitmap of the 128 below it.
#[derive(Debug, Default, Clone)]
pub struct ReplayWindow {
    highest: u64,
    seen: u128,
    any: bool,
}

impl ReplayWindow {
    /// True the first time `counter` is offered (and not too far below the highest).
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.any {
            self.any = true;
            self.highest = counter;
            self.seen = 1;
            return true;
        }
        if counter > self.highest {
            let shift = counter - self.highest;
            self.seen = if shift >= 128 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = counter;
            return true;
        }
        let back = self.highest - counter;
        if back >= 128 {
            return false;
        }
        let bit = 1u128 << back;
        if self.seen & bit != 0 {
            return false;
        }
        self.seen |= bit;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_datagrams_open_only_with_the_same_secret() {
        let key = Key::derive(b"correct horse");
        let sealed = key.seal(b"\xC6KT\x01\x04 inner", 7);
        assert_eq!(sealed.len(), b"\xC6KT\x01\x04 inner".len() + OVERHEAD);
        assert_eq!(key.open(&sealed), Ok((7, b"\xC6KT\x01\x04 inner".to_vec())));
        assert_eq!(
            Key::derive(b"wrong").open(&sealed),
            Err(Rejected::NotAuthentic)
        );
        let mut altered = sealed.clone();
        let last = altered.len() - 20;
        altered[last] ^= 1;
        assert_eq!(key.open(&altered), Err(Rejected::NotAuthentic));
    }

    #[test]
    fn the_replay_window_accepts_each_counter_once() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(10));
        assert!(!w.accept(10));
        assert!(w.accept(12));
        assert!(w.accept(11));
        assert!(!w.accept(11));
        assert!(w.accept(500));
        assert!(!w.accept(12), "far below the window");
        assert!(w.accept(499));
    }
}
