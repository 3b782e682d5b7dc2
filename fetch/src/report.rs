//! What the user sees: a progress display on a terminal or plain log lines otherwise, one
//! line per failure naming the URL, a final summary, and the `--report` JSON lines.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use corokit_common::text::{escape, json_line};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::input::BadLine;
use crate::shown::{redact, Shown};

/// How one entry ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// Already complete from an earlier run.
    Skipped,
    Failed,
    /// Stopped by Ctrl-C or SIGTERM; the partial file is kept.
    Interrupted,
    /// Not done for a reason of this machine's, not the server's: another fetch is writing
    /// the file, or the disk failed. Counted as failed; a shared queue leaves it for another
    /// worker instead of recording it.
    Deferred,
}

/// One line of the report: everything known about one entry.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub line: usize,
    pub url: String,
    pub path: Option<PathBuf>,
    pub outcome: Outcome,
    pub http_status: Option<u16>,
    pub bytes: u64,
    pub attempts: u32,
    /// The earlier line with the same URL whose download this one waited for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<usize>,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// `ALGO=HEX`, when the file matched the checksum it was given.
    pub checksum: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

impl Record {
    pub fn new(line: usize, url: &str) -> Self {
        Record {
            line,
            url: redact(url).into_owned(),
            path: None,
            outcome: Outcome::Failed,
            http_status: None,
            bytes: 0,
            attempts: 0,
            duplicate_of: None,
            elapsed: Duration::ZERO,
            checksum: None,
            error: None,
        }
    }
}

/// Totals for the summary and the exit status.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub ok: u64,
    pub skipped: u64,
    pub failed: u64,
    pub interrupted: u64,
    pub bad_lines: u64,
    /// Reading the list failed part way: the entries after that point were never seen.
    pub list_unreadable: bool,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Collects results as downloads end and shows them.
pub struct Reporter {
    started: Instant,
    bar: Option<ProgressBar>,
    /// Plain log lines when there is no progress display; written by their own thread, so
    /// a reader of a piped stderr that falls behind never blocks a worker.
    log: Option<corokit_common::output::Output>,
    quiet: bool,
    report: Option<Mutex<BufWriter<File>>>,
    totals: Mutex<Summary>,
    bytes: AtomicU64,
    active: AtomicU64,
}

impl Reporter {
    /// Draws a progress display when stderr is a terminal and not `quiet`; writes the
    /// `--report` file at `report` if given.
    pub fn new(quiet: bool, report: Option<&PathBuf>) -> io::Result<Self> {
        let report = match report {
            Some(path) => Some(Mutex::new(BufWriter::new(File::create(path)?))),
            None => None,
        };
        let bar = (!quiet && io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(5));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed} {binary_bytes} {binary_bytes_per_sec} {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let log = match bar {
            Some(_) => None,
            None => Some(corokit_common::output::stderr()?),
        };
        Ok(Reporter {
            started: Instant::now(),
            bar,
            log,
            quiet,
            report,
            totals: Mutex::new(Summary::default()),
            bytes: AtomicU64::new(0),
            active: AtomicU64::new(0),
        })
    }

    fn line(&self, text: &str) {
        match (&self.bar, &self.log) {
            (Some(bar), _) => bar.println(text),
            (None, Some(log)) => log.line(text.to_string()),
            (None, None) => {}
        }
    }

    /// Something worth telling that is not a failure (a renamed file, a restart). Text from
    /// outside in it is already quoted with `Shown`; the rest is escaped here too.
    pub fn note(&self, text: &str) {
        if !self.quiet {
            self.warn(text);
        }
    }

    /// A line shown even with `-q`: trouble that is not one download's failure.
    pub fn warn(&self, text: &str) {
        self.line(&format!("fetch: {}", escape(&redact(text))));
    }

    pub fn bad_line(&self, bad: &BadLine) {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bad_lines += 1;
        self.line(&format!("fetch: skipped {bad}"));
    }

    /// Reading the list failed: shown even when quiet, since the run is incomplete.
    pub fn list_error(&self, list_error: &str) {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .list_unreadable = true;
        self.line(&format!("fetch: reading the list stopped: {list_error}"));
    }

    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// Shows which downloads are running now (on the progress display only).
    pub fn set_active(&self, active: usize) {
        self.active.store(active as u64, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            let t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
            bar.set_message(format!(
                "{} ok, {} skipped, {} failed, {active} active",
                t.ok, t.skipped, t.failed
            ));
        }
    }

    /// The totals so far (bytes included) and the downloads running now.
    pub fn snapshot(&self) -> (Summary, u64) {
        let mut t = self
            .totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        t.bytes = self.bytes.load(Ordering::Relaxed);
        (t, self.active.load(Ordering::Relaxed))
    }

    pub fn finished(&self, record: &Record) {
        {
            let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
            match record.outcome {
                Outcome::Ok => t.ok += 1,
                Outcome::Skipped => t.skipped += 1,
                Outcome::Failed | Outcome::Deferred => t.failed += 1,
                Outcome::Interrupted => t.interrupted += 1,
            }
        }
        let path = record
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match record.outcome {
            Outcome::Failed | Outcome::Deferred => self.line(&format!(
                "fetch: FAILED line {} {}: {}",
                record.line,
                Shown(&record.url),
                escape(&redact(record.error.as_deref().unwrap_or("unknown error")))
            )),
            Outcome::Skipped if !self.quiet && self.bar.is_none() => match record.duplicate_of {
                Some(line) => self.line(&format!(
                    "fetch: line {}: the same URL as line {line}, saved once: {}",
                    record.line,
                    escape(&path)
                )),
                None => self.line(&format!("fetch: already complete: {}", escape(&path))),
            },
            Outcome::Ok if !self.quiet && self.bar.is_none() => self.line(&format!(
                "fetch: ok {} -> {} ({} bytes)",
                Shown(&record.url),
                escape(&path),
                record.bytes
            )),
            _ => {}
        }
        if let Some(report) = &self.report {
            let mut w = report.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(value) = serde_json::to_value(record) {
                // Written through at once, so a killed run still reports what it finished.
                let _ = writeln!(w, "{}", json_line(&value)).and_then(|_| w.flush());
            }
        }
    }

    /// Totals so far; prints the summary line unless quiet.
    pub fn finish(&self) -> Summary {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let mut s = self
            .totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.bytes = self.bytes.load(Ordering::Relaxed);
        s.elapsed = self.started.elapsed();
        if !self.quiet {
            let secs = s.elapsed.as_secs_f64().max(0.001);
            let mut text = format!(
                "fetch: {} ok, {} already complete, {} failed",
                s.ok, s.skipped, s.failed
            );
            if s.interrupted > 0 {
                text.push_str(&format!(", {} interrupted", s.interrupted));
            }
            if s.bad_lines > 0 {
                text.push_str(&format!(", {} bad lines", s.bad_lines));
            }
            text.push_str(&format!(
                "; {} bytes in {:.2} s ({:.1} MB/s)",
                s.bytes,
                secs,
                s.bytes as f64 / secs / 1e6
            ));
            self.line(&text);
        }
        if let Some(log) = &self.log {
            log.drain();
        }
        s
    }
}
