//! The `fetch` command: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use corokit_common::Shutdown;
use corokit_fetch::queue::{self, worker::WorkOptions, Mode};
use corokit_fetch::{run, Options};

/// Download every URL in a list (or given as arguments), concurrently, resumably.
///
/// `fetch LIST`, `fetch URL...` or `fetch -i LIST [URL...]`. The list has one URL per line
/// (`-` reads it from standard input). Blank lines and lines
/// starting with `#` are ignored. Like aria2 input files, tab-separated URLs on one line are
/// mirrors of the same file, and indented lines under a URL set `out=NAME`, `dir=SUBDIR` or
/// `checksum=sha-256=HEX` for it.
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
struct Args {
    /// URLs to download, or one list of URLs (- for standard input); not with --redis.
    #[arg(value_name = "LIST|URL", required_unless_present_any = ["redis", "queue", "input_file"])]
    inputs: Vec<String>,
    /// The list of URLs (- for standard input), besides any URLs given as arguments.
    #[arg(short = 'i', long, value_name = "LIST")]
    input_file: Option<String>,
    /// The checksum the one URL given must match: md5, sha-1, sha-224, sha-256, sha-384 or
    /// sha-512 (as in a list's checksum= option).
    #[arg(long, value_name = "ALGO=HEX")]
    checksum: Option<String>,
    /// Directory to save into (created if missing).
    #[arg(short, long, default_value = ".")]
    output: PathBuf,
    /// Downloads at once (at most what vm.max_map_count allows: two memory maps each).
    #[arg(short, long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    jobs: u32,
    /// Downloads at once from one host (0: no limit).
    #[arg(long, default_value_t = 8)]
    per_host: u32,
    /// Tries after the first on connect errors, timeouts, 5xx, 408 and 429.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Seconds before the first retry; doubled after each (with jitter, and at least what
    /// the server's Retry-After asks).
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    retry_wait: f64,
    /// Seconds allowed for connecting (including the name lookup).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    connect_timeout: f64,
    /// Seconds a connection may stay silent while reading.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    read_timeout: f64,
    /// Seconds one file may take across all its tries (no limit by default).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Redirects followed per request (fetch follows them itself: only http and https).
    #[arg(long, default_value_t = 10)]
    max_redirects: u32,
    /// Trust the certificates in this PEM file too (a private CA).
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Extra request header, "Name: value" (repeatable; checked at start).
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// The User-Agent header.
    #[arg(long)]
    user_agent: Option<String>,
    /// Total download rate limit in bytes per second; K, M and G suffixes (powers of 1024).
    #[arg(long, value_name = "RATE")]
    limit_rate: Option<String>,
    /// Save under the file name the server suggests in Content-Disposition (made safe).
    #[arg(long)]
    content_disposition: bool,
    /// Ask again for files already complete, and download one again only if the server's
    /// copy is newer (If-Modified-Since with the file's time; wget -N).
    #[arg(short = 'N', long)]
    timestamping: bool,
    /// Give each downloaded file the server's Last-Modified as its time (curl -R).
    #[arg(short = 'R', long)]
    remote_time: bool,
    /// Print only failures.
    #[arg(short, long)]
    quiet: bool,
    /// Write one JSON object per URL to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Share a queue in Redis with other fetch processes: redis://HOST[:PORT][/DB]
    /// [default: FETCH_REDIS]. Without --enqueue or --status, work on the queue.
    #[arg(long, value_name = "URL", requires = "queue", conflicts_with_all = ["inputs", "input_file"])]
    redis: Option<String>,
    /// The queue's name.
    #[arg(long, value_name = "NAME")]
    queue: Option<String>,
    /// Add this list's entries to the queue (- for standard input), then exit.
    #[arg(long, value_name = "LIST", conflicts_with = "status")]
    enqueue: Option<String>,
    /// Print what the queue holds, then exit.
    #[arg(long)]
    status: bool,
    /// Keep waiting for new entries instead of ending when the queue is drained.
    #[arg(long)]
    follow: bool,
    /// Seconds an entry may be held without a sign of life before another worker takes it.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    claim_after: f64,
    /// Deliveries after which an entry goes to the dead letters.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    max_deliveries: u64,
    /// Serve a worker's Prometheus metrics at IP:PORT/metrics.
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<std::net::SocketAddr>,
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("--{name} {value} is not a number of seconds"))
}

fn options(args: &Args) -> anyhow::Result<Options> {
    let mut o = Options {
        output: args.output.clone(),
        jobs: args.jobs as usize,
        per_host: args.per_host as usize,
        retries: args.retries,
        retry_wait: seconds("retry-wait", args.retry_wait)?,
        file_timeout: args.timeout.map(|t| seconds("timeout", t)).transpose()?,
        limit_rate: args
            .limit_rate
            .as_deref()
            .map(corokit_fetch::rate_arg)
            .transpose()?,
        content_disposition: args.content_disposition,
        remote_time: args.remote_time,
        timestamping: args.timestamping,
        quiet: args.quiet,
        report: args.report.clone(),
        ..Options::default()
    };
    for h in &args.headers {
        o.headers.push(corokit_fetch::header_arg(h)?);
    }
    corokit_fetch::check_jobs(o.jobs)?;
    corokit_fetch::check_open_files(o.jobs)?;
    o.http.connect_timeout = seconds("connect-timeout", args.connect_timeout)?;
    o.http.read_timeout = Some(seconds("read-timeout", args.read_timeout)?);
    o.max_redirects = args.max_redirects;
    // Keep-alive connections for every job, so a host's connections are reused.
    o.http.max_idle = o.jobs.max(16);
    o.http.max_idle_per_host = o.jobs.max(16);
    if let Some(ua) = &args.user_agent {
        o.http.user_agent = corokit_fetch::user_agent_arg(ua)?;
    }
    corokit_fetch::check_request_head(&o.headers, &o.http.user_agent)?;
    if let Some(ca) = &args.ca_cert {
        o.http.add_roots_from_pem_file(ca)?;
    }
    Ok(o)
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.redis.is_none() && args.queue.is_some() {
        args.redis = std::env::var("FETCH_REDIS").ok();
        if args.redis.is_none() {
            eprintln!("fetch: --queue needs --redis URL (or FETCH_REDIS)");
            return ExitCode::from(2);
        }
    }
    corokit_common::init();
    let options = match options(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fetch: {e:#}");
            return ExitCode::from(2);
        }
    };
    let shutdown = match Shutdown::on_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fetch: {e}");
            return ExitCode::from(2);
        }
    };
    if let (Some(url), Some(queue)) = (&args.redis, &args.queue) {
        let mode = match (&args.enqueue, args.status) {
            (Some(list), _) => Mode::Enqueue(list.clone()),
            (None, true) => Mode::Status,
            (None, false) => match seconds("claim-after", args.claim_after) {
                Ok(claim_after) if claim_after >= Duration::from_secs(1) => {
                    Mode::Work(WorkOptions {
                        follow: args.follow,
                        claim_after,
                        max_deliveries: args.max_deliveries,
                        metrics: args.metrics,
                    })
                }
                _ => {
                    eprintln!("fetch: --claim-after is at least 1 second");
                    return ExitCode::from(2);
                }
            },
        };
        return ExitCode::from(queue::main(mode, url, queue, options, shutdown));
    }
    let list = match corokit_fetch::input::command_line(
        &args.inputs,
        args.input_file.as_deref(),
        args.checksum.as_deref(),
    ) {
        Ok(lines) => lines,
        Err(e) => {
            eprintln!("fetch: {e}");
            return ExitCode::from(2);
        }
    };
    match run(options, list, shutdown.clone()) {
        Err(e) => {
            eprintln!("fetch: {e}");
            ExitCode::from(2)
        }
        Ok(_) if shutdown.is_requested() => ExitCode::from(130),
        Ok(s) if s.failed > 0 => ExitCode::from(1),
        Ok(s) if s.bad_lines > 0 || s.list_unreadable => ExitCode::from(2),
        Ok(_) => ExitCode::SUCCESS,
    }
}
