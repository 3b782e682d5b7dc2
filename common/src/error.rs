//! The error type of the shared runtime.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong in the shared runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("looking up {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("looking up {host}: no answer within {after:?}")]
    ResolveTimeout { host: String, after: Duration },
    #[error("looking up {host}: no address found")]
    NoAddress { host: String },
    #[error("a blocking task did not finish within {0:?}")]
    OffloadTimeout(Duration),
    #[error("a blocking task panicked")]
    OffloadPanicked,
    #[error("reading certificates from {path}: {reason}")]
    Certificates { path: PathBuf, reason: String },
    #[error("installing the Ctrl-C handler: {0}")]
    Signal(#[from] ctrlc::Error),
    #[error("starting a coroutine: {0}")]
    Spawn(io::Error),
}
