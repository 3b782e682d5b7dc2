//! The shared coroutine runtime of corokit.
//!
//! Every binary, example and test starts with [`init`]; after that, code written in plain
//! blocking style yields to other coroutines on every wait, provided it only waits through
//! what this crate and `may` offer. Calls that would block a worker thread (DNS lookups,
//! stdin reads, stdout and stderr writes, other blocking syscalls) live in [`blocking`],
//! [`stdin`] and [`output`], and nowhere else.

pub mod blocking;
pub mod dir;
mod error;
pub mod flag;
pub mod http;
pub mod names;
pub mod output;
pub mod rate;
pub mod runtime;
pub mod shutdown;
pub mod size;
pub mod stdin;
pub mod text;

pub use blocking::{offload, Dns, Lookup};
pub use error::Error;
pub use rate::TokenBucket;
pub use runtime::{init, join_all, sleep, spawn, wait_limit, Pool, RuntimeConfig, Slot, Slots};
pub use shutdown::Shutdown;
