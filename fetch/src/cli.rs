//! The command line of `fetch`: every flag, its default and its help (`--help` shows these
//! doc comments). The binary parses it and turns it into [`crate::Options`].

use std::path::PathBuf;

use clap::Parser;

/// Download every URL in a list (or given as arguments), concurrently, resumably.
///
/// `fetch LIST`, `fetch URL...` or `fetch -i LIST [URL...]`. The list has one URL per line
/// (`-` reads it from standard input). Blank lines and lines starting with `#` are ignored.
/// Like aria2 input files, tab-separated URLs on one line are mirrors of the same file, and
/// indented lines under a URL set `out=NAME`, `dir=SUBDIR` or `checksum=ALGO=HEX` (md5,
/// sha-1, sha-224, sha-256, sha-384, sha-512) for it.
///
/// A file under its final name is always complete and one version of the server's bytes;
/// nothing is written through a symbolic link, and files fetch did not write are not touched.
///
/// With --redis and --queue, any number of fetch processes share one queue in Redis:
/// --enqueue LIST adds entries, --status shows the queue, and otherwise fetch works on it
/// until it is drained (--follow: until stopped). The exit status is a local run's.
///
/// Exit status: 0 when every file was downloaded or already complete; 1 when any download
/// failed; 2 for usage errors (checked before any request), an unreadable list, or bad lines
/// in it (the good lines still run); 130 when stopped by Ctrl-C, SIGTERM or SIGHUP (partial
/// files are kept for the next run).
#[derive(Parser, Debug)]
#[command(
    name = "fetch",
    version,
    verbatim_doc_comment,
    args_override_self = true
)]
pub struct Args {
    /// URLs to download, or one list of URLs (- for standard input); not with --redis.
    #[arg(value_name = "LIST|URL", required_unless_present_any = ["redis", "queue", "input_file"])]
    pub inputs: Vec<String>,
    /// The list of URLs (- for standard input), besides any URLs given as arguments.
    #[arg(short = 'i', long, value_name = "LIST")]
    pub input_file: Option<String>,
    /// The checksum the one URL given must match: md5, sha-1, sha-224, sha-256, sha-384 or
    /// sha-512 (as in a list's checksum= option).
    #[arg(long, value_name = "ALGO=HEX")]
    pub checksum: Option<String>,
    /// Directory to save into (created if missing).
    #[arg(short, long, default_value = ".")]
    pub output: PathBuf,
    /// Downloads at once (at most what vm.max_map_count allows: two memory maps each).
    #[arg(short, long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub jobs: u32,
    /// Downloads at once from one host (0: no limit).
    #[arg(long, default_value_t = 8)]
    pub per_host: u32,
    /// Connections per file (aria2's -s): a file the server serves in ranges, with a
    /// validator, is fetched in segments written in place; each connection past the first
    /// takes a free --per-host slot, and a free connection takes half of the largest
    /// segment left, or what a stalled one left.
    #[arg(short = 's', long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub split: u32,
    /// No segment smaller than this (aria2's -k): a file is split only if it is at least
    /// twice as large. K, M, G and T suffixes (powers of 1024).
    #[arg(short = 'k', long, default_value = "1M", value_name = "SIZE")]
    pub min_split_size: String,
    /// Tries after the first on connect errors, timeouts, 5xx, 408 and 429.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Seconds before the first retry; doubled after each (with jitter, and at least what
    /// the server's Retry-After asks).
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub retry_wait: f64,
    /// Seconds allowed for connecting (including the name lookup).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub connect_timeout: f64,
    /// Seconds a connection may stay silent while reading.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub read_timeout: f64,
    /// Seconds one file may take across all its tries (no limit by default).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Redirects followed per request (fetch follows them itself: only http and https).
    #[arg(long, default_value_t = 10)]
    pub max_redirects: u32,
    /// Trust the certificates in this PEM file too (a private CA).
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Extra request header, "Name: value" (repeatable; checked at start).
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    pub headers: Vec<String>,
    /// The User-Agent header.
    #[arg(long)]
    pub user_agent: Option<String>,
    /// Total download rate limit in bytes per second; K, M, G and T suffixes (powers of 1024).
    #[arg(long, value_name = "RATE")]
    pub limit_rate: Option<String>,
    /// Save under the file name the server suggests in Content-Disposition (made safe).
    #[arg(long)]
    pub content_disposition: bool,
    /// Ask again for files already complete, and download one again only if the server's
    /// copy is newer (If-Modified-Since with the file's time; wget -N).
    #[arg(short = 'N', long)]
    pub timestamping: bool,
    /// Give each downloaded file the server's Last-Modified as its time (curl -R).
    #[arg(short = 'R', long)]
    pub remote_time: bool,
    /// Log in as USER (Basic), with PASSWORD after ':' or in --password; sent only to the
    /// host of each list URL, never to another host a redirect names.
    #[arg(long, value_name = "USER[:PASSWORD]")]
    pub user: Option<String>,
    /// The password for --user (instead of USER:PASSWORD).
    #[arg(long, value_name = "PASSWORD")]
    pub password: Option<String>,
    /// Log in with the host's entry in ~/.netrc (or $NETRC) when there is no --user.
    #[arg(long)]
    pub netrc: bool,
    /// Print only failures.
    #[arg(short, long)]
    pub quiet: bool,
    /// Write one JSON object per URL to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Share a queue in Redis with other fetch processes: redis://HOST[:PORT][/DB]
    /// [default: FETCH_REDIS]. Without --enqueue or --status, work on the queue.
    #[arg(long, value_name = "URL", requires = "queue", conflicts_with_all = ["inputs", "input_file"])]
    pub redis: Option<String>,
    /// The queue's name.
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
    /// Add this list's entries to the queue (- for standard input), then exit.
    #[arg(long, value_name = "LIST", conflicts_with = "status")]
    pub enqueue: Option<String>,
    /// Print what the queue holds, then exit.
    #[arg(long)]
    pub status: bool,
    /// Keep waiting for new entries instead of ending when the queue is drained.
    #[arg(long)]
    pub follow: bool,
    /// Seconds an entry may be held without a sign of life before another worker takes it.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub claim_after: f64,
    /// Deliveries after which an entry goes to the dead letters.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_deliveries: u64,
    /// Serve a worker's Prometheus metrics at IP:PORT/metrics.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
}
