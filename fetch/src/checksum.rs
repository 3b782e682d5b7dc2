//! Checksums a file must match: the algorithms aria2 accepts in `checksum=ALGO=HEX`
//! (`md5`, `sha-1`, `sha-224`, `sha-256`, `sha-384`, `sha-512`), parsed from a list's option
//! or `--checksum`, and computed over what is written.

use serde::{Deserialize, Serialize};
use sha2::digest::DynDigest;

use crate::shown::Shown;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algo {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Algo {
    /// Every algorithm, in aria2's order.
    pub const ALL: [Algo; 6] = [
        Algo::Md5,
        Algo::Sha1,
        Algo::Sha224,
        Algo::Sha256,
        Algo::Sha384,
        Algo::Sha512,
    ];

    /// aria2's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Md5 => "md5",
            Algo::Sha1 => "sha-1",
            Algo::Sha224 => "sha-224",
            Algo::Sha256 => "sha-256",
            Algo::Sha384 => "sha-384",
            Algo::Sha512 => "sha-512",
        }
    }

    fn from_name(name: &str) -> Option<Algo> {
        Algo::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name.trim()))
    }

    /// A hasher for it.
    pub fn hasher(self) -> Hasher {
        Hasher(match self {
            Algo::Md5 => Box::new(md5::Md5::default()),
            Algo::Sha1 => Box::new(sha1::Sha1::default()),
            Algo::Sha224 => Box::new(sha2::Sha224::default()),
            Algo::Sha256 => Box::new(sha2::Sha256::default()),
            Algo::Sha384 => Box::new(sha2::Sha384::default()),
            Algo::Sha512 => Box::new(sha2::Sha512::default()),
        })
    }
}

/// An expected checksum. In a shared queue it travels as `ALGO=HEX` and is read back
/// through [`Checksum::parse`], so an entry cannot carry a digest of the wrong length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Checksum {
    pub algo: Algo,
    pub digest: Vec<u8>,
}

impl Checksum {
    /// `ALGO=HEX`, as aria2 writes it.
    pub fn parse(text: &str) -> Result<Checksum, String> {
        let (algo, hex) = text
            .split_once('=')
            .ok_or_else(|| format!("checksum {} must be ALGO=HEX", Shown(text)))?;
        let algo = Algo::from_name(algo).ok_or_else(|| {
            format!(
                "checksum type {} is not supported (md5, sha-1, sha-224, sha-256, sha-384, sha-512)",
                Shown(algo)
            )
        })?;
        let want = algo.hasher().0.output_size() * 2;
        let hex = hex.trim();
        let digest = (hex.len() == want && hex.is_ascii())
            .then(|| {
                (0..want)
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
                    .collect::<Option<Vec<u8>>>()
            })
            .flatten()
            .ok_or_else(|| {
                format!(
                    "{} is not a {} ({want} hex digits)",
                    Shown(hex),
                    algo.name()
                )
            })?;
        Ok(Checksum { algo, digest })
    }

    /// `ALGO=HEX`.
    pub fn shown(&self) -> String {
        format!("{}={}", self.algo.name(), crate::hex(&self.digest))
    }
}

impl TryFrom<String> for Checksum {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Checksum::parse(&text)
    }
}

impl From<Checksum> for String {
    fn from(c: Checksum) -> String {
        c.shown()
    }
}

/// A running hash of one of [`Algo`].
pub struct Hasher(Box<dyn DynDigest + Send>);

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.finalize().into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_of_aria2_with_its_length() {
        // The digests of "abc" from each algorithm's standard.
        for (algo, hex) in [
            ("md5", "900150983cd24fb0d6963f7d28e17f72"),
            ("sha-1", "a9993e364706816aba3e25717850c26c9cd0d89d"),
            ("SHA-224", "23097d223405d8228642a477bda255b32aadbce4bda0b3f7e36c9da7"),
            ("sha-256", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            ("sha-384", "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7"),
            ("sha-512", "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"),
        ] {
            let c = Checksum::parse(&format!("{algo}={hex}")).unwrap();
            let mut h = c.algo.hasher();
            h.update(b"abc");
            assert_eq!(h.finish(), c.digest, "{algo}");
            assert_eq!(c.shown(), format!("{}={hex}", algo.to_ascii_lowercase()));
        }
        for bad in [
            "sha-256=00",
            "crc32=00000000",
            "md5",
            "sha-1=zz3e364706816aba3e25717850c26c9cd0d89d",
            "md5=é0150983cd24fb0d6963f7d28e17f7",
        ] {
            let e = Checksum::parse(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
