//! The `fetch` command: parses arguments and hands over to the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use corokit_common::Shutdown;
use corokit_fetch::cli::Args;
use corokit_fetch::queue::{self, worker::WorkOptions, Mode};
use corokit_fetch::{run, Options};

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
            .map(|r| corokit_fetch::size_arg("--limit-rate", r))
            .transpose()?,
        split: args.split as usize,
        min_split: corokit_fetch::size_arg("--min-split-size", &args.min_split_size)?,
        content_disposition: args.content_disposition,
        remote_time: args.remote_time,
        timestamping: args.timestamping,
        quiet: args.quiet,
        report: args.report.clone(),
        ..Options::default()
    };
    let logins =
        corokit_fetch::login_args(args.user.as_deref(), args.password.as_deref(), args.netrc)?;
    (o.login, o.netrc) = (logins.login, logins.netrc);
    for h in &args.headers {
        o.headers.push(corokit_fetch::header_arg(h)?);
    }
    corokit_fetch::check_jobs(o.jobs, o.split)?;
    corokit_fetch::check_open_files(o.jobs, o.split)?;
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
        // What clap checks for --redis, checked for the URL from the environment too: a list
        // beside a queue would be ignored without a word.
        if !args.inputs.is_empty() || args.input_file.is_some() {
            eprintln!("fetch: URLs and lists are not taken with a queue (--enqueue LIST adds one)");
            return ExitCode::from(2);
        }
    }
    corokit_common::init();
    // Only what downloads: --status and --enqueue need none of the download checks (the
    // open-files limit, -j, a --netrc file).
    let downloads = args.redis.is_none() || (args.enqueue.is_none() && !args.status);
    let options = match downloads {
        true => match options(&args) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("fetch: {e:#}");
                return ExitCode::from(2);
            }
        },
        false => Options {
            quiet: args.quiet,
            ..Options::default()
        },
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
