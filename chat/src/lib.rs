//! `chat`: LAN messaging over UDP between `chat` instances (acknowledged, ordered, with
//! discovery and optional encryption) and plain peers such as `nc -u`.
//!
//! [`core`] is the protocol as a state machine with no I/O; [`node`] drives it on a socket;
//! [`app`] is the program around it, with [`command`], [`render`] and [`terminal`].

pub mod app;
pub mod command;
pub mod core;
pub mod ipmsg;
pub mod node;
pub mod remembered;
pub mod render;
pub mod seal;
pub mod sharing;
pub mod terminal;
pub mod transfer;
pub mod wire;

pub use crate::core::{Config, Event, Sent};
pub use node::{Events, Node};
