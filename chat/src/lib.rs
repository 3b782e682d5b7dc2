//! `chat`: LAN messaging over UDP between `chat` instances (acknowledged, ordered, with
//! discovery and optional encryption) and plain peers such as `nc -u`.

pub mod display;
pub mod node;
pub mod peers;
pub mod seal;
pub mod wire;

pub use node::{Config, Event, Events, Node, Sent};
