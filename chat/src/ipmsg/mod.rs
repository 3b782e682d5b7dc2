//! The IP Messenger protocol (IPMsg) as IP Messenger, iptux and FeiQ speak it on UDP 2425:
//! its wire form ([`packet`]) and its encodings ([`charset`]). What `chat` does with it is in
//! `crate::core::ipmsg`.

pub mod charset;
pub mod packet;

pub use charset::Client;

/// The port every IP Messenger client uses.
pub const PORT: u16 = 2425;
