//! One HTTP exchange for a download: the GET (with `Range`/`If-Range` when resuming), the
//! redirects fetch follows itself (each `Location` checked: present, parseable, http or https
//! only, no loop, at most `--max-redirects`), a request resent at once when a keep-alive
//! connection turns out to have been closed while idle, and every failure sorted into what
//! another try can heal and what it cannot.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use ureq::http::Response;
use ureq::Body;

use crate::download::Context;
use crate::resume::Ask;
use crate::shown::Shown;

/// Why an exchange (or the download around it) failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("HTTP {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Network(String),
    #[error("timed out ({0})")]
    Timeout(String),
    /// `--timeout` reached, or a wait would pass it: never retried.
    #[error("{0}")]
    OutOfTime(String),
    /// A redirect that cannot be followed: no Location, not http(s), a loop, too many.
    #[error("{0}")]
    Redirect(String),
    /// An answer that breaks HTTP (a malformed or oversized header, a bad chunk).
    #[error("{0}")]
    Protocol(String),
    /// An answer the resume rules refuse (see `resume::decide`).
    #[error("{0}")]
    Refused(String),
    /// The answer does not continue the partial file: it is discarded and the whole file
    /// asked for.
    #[error("{0}")]
    StartOver(String),
    #[error("checksum mismatch: expected {want}, got {got}")]
    Checksum { want: String, got: String },
    #[error("{0}")]
    Incomplete(String),
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("name clash: {0}")]
    NameClash(String),
    /// A request too large to send: final for this server (a mirror may do with less).
    #[error("{0}")]
    TooLarge(String),
    /// The same download on an earlier line failed.
    #[error("{error} (as line {line}, the same download)")]
    AsLine { line: usize, error: String },
    #[error("stopped by a signal; the partial file is kept for the next run")]
    Interrupted,
    /// Another fetch process is writing this file now.
    #[error("{0} is being written by another fetch; left for later")]
    Busy(String),
    /// `-N`: the server's copy is not newer than the file we have (not a failure: the
    /// download ends as already complete).
    #[error("not modified")]
    NotModified,
}

impl Failure {
    /// Worth another try (after a wait): the network, timeouts, 5xx, 408, 429, and bodies
    /// cut short. Everything else is either final for this server (a 404, a bad redirect, a
    /// broken answer) or final for the file.
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Failure::Network(_) | Failure::Timeout(_) | Failure::Incomplete(_) => true,
            _ => false,
        }
    }

    /// True when this server (mirror) will not do better on another try, but another
    /// mirror might.
    pub fn ends_mirror(&self) -> bool {
        matches!(
            self,
            Failure::Status { .. }
                | Failure::Redirect(_)
                | Failure::Protocol(_)
                | Failure::Refused(_)
                | Failure::Checksum { .. }
                | Failure::TooLarge(_)
        ) && !self.retryable()
    }

    fn from_ureq(e: ureq::Error, limit: Option<Duration>) -> Failure {
        match e {
            ureq::Error::Timeout(ureq::Timeout::Global) if limit.is_some() => {
                Failure::OutOfTime(format!(
                    "the whole file took over {:?} (--timeout)",
                    limit.unwrap_or_default()
                ))
            }
            ureq::Error::Timeout(t) => Failure::Timeout(t.to_string()),
            ureq::Error::Io(e) => Failure::from_io(e, limit),
            ureq::Error::HostNotFound => Failure::Network("host not found".into()),
            ureq::Error::LargeResponseHeader(_, max) => Failure::Protocol(format!(
                "the server's response header is larger than {} KiB",
                max / 1024
            )),
            e @ (ureq::Error::Protocol(_) | ureq::Error::Http(_) | ureq::Error::BadUri(_)) => {
                Failure::Protocol(format!("a malformed answer: {e}"))
            }
            e @ (ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_)) => {
                Failure::Protocol(format!("TLS: {e}"))
            }
            other => Failure::Network(other.to_string()),
        }
    }

    /// A failure while reading, under `--timeout` `limit` if there is one.
    pub fn from_io(e: io::Error, limit: Option<Duration>) -> Failure {
        if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
            return match inner {
                ureq::Error::Timeout(ureq::Timeout::Global) if limit.is_some() => {
                    Failure::OutOfTime(format!(
                        "the whole file took over {:?} (--timeout)",
                        limit.unwrap_or_default()
                    ))
                }
                ureq::Error::Timeout(t) => Failure::Timeout(t.to_string()),
                // A body that breaks HTTP (a bad chunk) breaks it again on the next try.
                e @ (ureq::Error::Protocol(_) | ureq::Error::Http(_)) => {
                    Failure::Protocol(format!("a malformed answer: {e}"))
                }
                other => Failure::Network(other.to_string()),
            };
        }
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                Failure::Timeout("the server went silent".into())
            }
            io::ErrorKind::UnexpectedEof => {
                Failure::Incomplete("the connection closed before the whole body arrived".into())
            }
            _ => Failure::Network(e.to_string()),
        }
    }
}

/// True for an error that means the connection was closed before any answer arrived, as
/// when a keep-alive connection the server closed while idle is used.
fn closed_before_answer(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Io(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// A redirect's `Location`, resolved against the URL it answered, if fetch may follow it.
pub fn resolve_location(base: &str, location: &str) -> Result<String, Failure> {
    let bad = |why: &str| Failure::Redirect(format!("a redirect to {}: {why}", Shown(location)));
    if location.is_empty() {
        return Err(bad("empty Location"));
    }
    if location
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(bad("the Location has spaces or control characters"));
    }
    let base = url::Url::parse(base).map_err(|_| bad("the request URL cannot be a base"))?;
    let next = base.join(location).map_err(|e| bad(&e.to_string()))?;
    match next.scheme() {
        "http" | "https" => {}
        other => return Err(bad(&format!("{other}: URLs are not followed"))),
    }
    if next.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(next.into())
}

/// `Authorization: Basic …` for `host`: `--user`/`--password`, else its `--netrc` login;
/// none when an `-H Authorization` is given.
fn basic_auth(ctx: &Context, host: Option<&str>) -> Option<String> {
    use base64::Engine;
    let o = &ctx.options;
    if o.headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("authorization"))
    {
        return None;
    }
    let (user, password) = match &o.login {
        Some((u, p)) => (u.clone(), p.clone()),
        None => {
            let l = crate::netrc::find(&o.netrc, host?)?;
            (l.login.clone(), l.password.clone())
        }
    };
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    Some(format!("Basic {token}"))
}

/// Scheme, host and port: where credentials may go.
fn origin(url: &str) -> Option<(String, String, Option<u16>)> {
    let u = url::Url::parse(url).ok()?;
    Some((
        u.scheme().to_string(),
        u.host_str()?.to_ascii_lowercase(),
        u.port_or_known_default(),
    ))
}

/// The longest request head fetch sends (the HTTP client's output buffer).
pub const MAX_REQUEST_HEAD: usize = corokit_common::http::OUTPUT_BUFFER;

/// GETs `url` as `ask` says, following redirects; the final answer and its URL.
pub fn get(
    ctx: &Context,
    url: &str,
    ask: &Ask,
    deadline: Option<(Instant, Duration)>,
) -> Result<(Response<Body>, String), Failure> {
    let mut current = url.to_string();
    let mut seen: Vec<String> = Vec::new();
    // Parsed only when a login or a redirect needs it: most requests need neither.
    let home = std::cell::OnceCell::new();
    let home = || home.get_or_init(|| origin(url));
    let o = &ctx.options;
    let auth = match o.login.is_some() || !o.netrc.is_empty() {
        true => basic_auth(ctx, home().as_ref().map(|(_, host, _)| host.as_str())),
        false => None,
    };
    loop {
        // The user's headers (tokens, API keys, cookies) and logins go only to the origin of
        // the URL in the list, never to another host a redirect names.
        let own_headers = current == url || origin(&current) == *home();
        let auth = auth.as_deref().filter(|_| own_headers);
        let rsp = send(ctx, &current, ask, deadline, own_headers, auth)?;
        let status = rsp.status().as_u16();
        if !matches!(status, 301 | 302 | 303 | 307 | 308) {
            return Ok((rsp, current));
        }
        // Read as bytes: a Location that is not ASCII is still shown (escaped) in the error.
        let Some(location) = rsp
            .headers()
            .get("Location")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        else {
            return Err(Failure::Redirect(format!(
                "HTTP {status} without a Location to follow"
            )));
        };
        let next = resolve_location(&current, &location)?;
        // The body of a redirect is small, and reading it keeps the connection for reuse.
        let _ = rsp
            .into_body()
            .into_reader()
            .take(64 * 1024)
            .read_to_end(&mut Vec::new());
        if next == current || seen.contains(&next) {
            return Err(Failure::Redirect(format!(
                "a redirect loop through {}",
                Shown(&next)
            )));
        }
        if seen.len() as u32 >= ctx.options.max_redirects {
            return Err(Failure::Redirect(format!(
                "more than {} redirects (--max-redirects)",
                ctx.options.max_redirects
            )));
        }
        seen.push(std::mem::replace(&mut current, next));
    }
}

/// One request, resent once at once if the connection turns out to have been closed before
/// it was answered (a GET can always be sent again).
fn send(
    ctx: &Context,
    url: &str,
    ask: &Ask,
    deadline: Option<(Instant, Duration)>,
    own_headers: bool,
    auth: Option<&str>,
) -> Result<Response<Body>, Failure> {
    let headers: &[(String, String)] = match own_headers {
        true => &ctx.options.headers,
        false => &[],
    };
    // The request line, Host, our headers and the user's, with room for ureq's own.
    let head = url.len()
        + 256
        + auth.map_or(0, |a| a.len() + 20)
        + headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>();
    if head > MAX_REQUEST_HEAD {
        return Err(Failure::TooLarge(format!(
            "the request for {} would be about {head} bytes, more than the {} KiB fetch sends",
            Shown(url),
            MAX_REQUEST_HEAD / 1024
        )));
    }
    let mut resent = false;
    loop {
        let mut req = ctx
            .agent(url)
            .get(url)
            .header("Accept-Encoding", "identity");
        for (name, value) in headers {
            req = req.header(name.as_str(), value.as_str());
        }
        if let Some(auth) = auth {
            req = req.header("Authorization", auth);
        }
        match ask {
            Ask::From { offset, validator } => {
                req = req
                    .header("Range", format!("bytes={offset}-"))
                    .header("If-Range", validator.as_str());
            }
            Ask::Range {
                first,
                last,
                validator,
            } => {
                req = req
                    .header("Range", format!("bytes={first}-{last}"))
                    .header("If-Range", validator.as_str());
            }
            Ask::IfNewer { since } => req = req.header("If-Modified-Since", since.as_str()),
            Ask::Whole => {}
        }
        let limit = deadline.map(|(_, limit)| limit);
        if let Some((until, limit)) = deadline {
            // A hard limit: a body that goes silent must not outlast it by a read timeout.
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::OutOfTime(format!(
                    "the whole file took over {limit:?} (--timeout)"
                )));
            }
            req = req.config().timeout_global(Some(left)).build();
        }
        match req.call() {
            Ok(rsp) => return Ok(rsp),
            Err(e) if !resent && closed_before_answer(&e) => resent = true,
            Err(e) => return Err(Failure::from_ureq(e, limit)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_resolved_and_checked() {
        let base = "http://h.example/a/b/file?x=1";
        for (location, want) in [
            ("http://other/x", "http://other/x"),
            ("https://other/x", "https://other/x"),
            ("/root", "http://h.example/root"),
            ("sibling", "http://h.example/a/b/sibling"),
            ("../up?y=2", "http://h.example/a/up?y=2"),
            ("//cdn.example/f", "http://cdn.example/f"),
            ("?q=3", "http://h.example/a/b/file?q=3"),
            // Followed percent-encoded, and shown escaped wherever it is shown.
            ("/x\u{202e}y", "http://h.example/x%E2%80%AEy"),
        ] {
            assert_eq!(
                resolve_location(base, location).unwrap(),
                want,
                "{location}"
            );
        }
        for location in [
            "",
            "ftp://h/x",
            "file:/etc/passwd",
            "file:relative",
            "javascript:alert(1)",
            "http://h/a b",
            "http://h/a\rb",
        ] {
            assert!(
                matches!(resolve_location(base, location), Err(Failure::Redirect(_))),
                "{location:?}"
            );
        }
    }

    #[test]
    fn only_what_can_heal_is_retried() {
        let status = |s| Failure::Status {
            status: s,
            retry_after: None,
        };
        for s in [408, 429, 500, 503] {
            assert!(status(s).retryable(), "{s}");
        }
        for s in [400, 403, 404, 410] {
            assert!(!status(s).retryable() && status(s).ends_mirror(), "{s}");
        }
        for f in [
            Failure::Redirect("x".into()),
            Failure::Protocol("x".into()),
            Failure::Refused("x".into()),
            Failure::OutOfTime("x".into()),
            Failure::StartOver("x".into()),
        ] {
            assert!(!f.retryable(), "{f}");
        }
        assert!(Failure::Checksum {
            want: "a".into(),
            got: "b".into()
        }
        .ends_mirror());
        assert!(!Failure::OutOfTime("x".into()).ends_mirror());
    }
}
