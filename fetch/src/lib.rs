//! `fetch`: downloads a list of URLs concurrently as coroutines, resumably and safely.
//!
//! A producer coroutine reads the list lazily into a bounded queue and `jobs` worker
//! coroutines take the next entry when they are free, so memory does not grow with the
//! length of the list. Each entry is downloaded by [`download::fetch`].

pub mod download;
pub mod input;
pub mod naming;
pub mod report;
pub mod resume;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use corokit_common::http::HttpOptions;
use corokit_common::stdin::Lines;
use corokit_common::Shutdown;
use may::sync::{mpmc, Semphore};

use crate::download::Context;
use crate::input::Parser;
use crate::report::{Reporter, Summary};

/// Bytes in lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

/// Everything the command line can set.
#[derive(Debug, Clone)]
pub struct Options {
    pub output: PathBuf,
    pub jobs: usize,
    /// Downloads at once from one host; 0 for no limit.
    pub per_host: usize,
    pub retries: u32,
    /// The first wait between tries; it doubles each time (with jitter).
    pub retry_wait: Duration,
    /// Longest a single file may take across all its tries.
    pub file_timeout: Option<Duration>,
    pub headers: Vec<(String, String)>,
    /// Total bytes per second across all downloads.
    pub limit_rate: Option<u64>,
    pub content_disposition: bool,
    pub quiet: bool,
    pub report: Option<PathBuf>,
    pub http: HttpOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            output: PathBuf::from("."),
            jobs: 16,
            per_host: 8,
            retries: 5,
            retry_wait: Duration::from_secs(1),
            file_timeout: None,
            headers: Vec::new(),
            limit_rate: None,
            content_disposition: false,
            quiet: false,
            report: None,
            http: HttpOptions::default(),
        }
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the output directory {path}: {source}")]
    OutputDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the report {path}: {source}")]
    Report {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] corokit_common::Error),
}

/// Downloads every entry of `list` and returns the totals. Stops early, keeping partial
/// files, when `shutdown` is requested.
pub fn run(options: Options, list: Lines, shutdown: Shutdown) -> Result<Summary, RunError> {
    std::fs::create_dir_all(&options.output).map_err(|source| RunError::OutputDir {
        path: options.output.clone(),
        source,
    })?;
    let reporter = Reporter::new(options.quiet, options.report.as_ref()).map_err(|source| {
        RunError::Report {
            path: options.report.clone().unwrap_or_default(),
            source,
        }
    })?;
    let jobs = options.jobs.max(1);
    let ctx = Arc::new(Context::new(options, reporter, shutdown.clone()));

    // may's channels are unbounded: a semaphore of free places bounds the queue, so the
    // producer reads the list only as fast as workers take entries.
    let free = Arc::new(Semphore::new(jobs));
    let (tx, rx) = mpmc::channel();
    let active = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let (ctx, rx, free, active) = (ctx.clone(), rx.clone(), free.clone(), active.clone());
        workers.push(corokit_common::spawn(move || {
            while let Ok(Some(entry)) = rx.recv() {
                free.post();
                let now = active.fetch_add(1, Ordering::Relaxed) + 1;
                ctx.reporter.set_active(now);
                let record = download::fetch(&ctx, &entry);
                ctx.reporter.finished(&record);
                let now = active.fetch_sub(1, Ordering::Relaxed) - 1;
                ctx.reporter.set_active(now);
            }
        })?);
    }
    drop(rx);

    let mut parser = Parser::new();
    while !shutdown.is_requested() {
        let Some(line) = list.recv() else { break };
        let parsed = match line {
            Ok(line) => parser.push(&line),
            Err(e) => {
                ctx.reporter.list_error(&e.to_string());
                break;
            }
        };
        if let Some(bad) = parsed.bad {
            ctx.reporter.bad_line(&bad);
        }
        if let Some(entry) = parsed.entry {
            free.wait();
            let _ = tx.send(Some(entry));
        }
    }
    if !shutdown.is_requested() {
        if let Some(entry) = parser.finish() {
            let _ = tx.send(Some(entry));
        }
    }
    for _ in 0..jobs {
        let _ = tx.send(None);
    }
    corokit_common::join_all(workers);
    Ok(ctx.reporter.finish())
}
