//! One connection to Redis over a may socket: commands encoded and replies parsed by the
//! `redis` crate, bytes carried by `may::net::TcpStream`, so a Redis call parks the
//! coroutine and never blocks a worker thread. A lost connection is made again, with
//! backoff, by [`Redis::call`].

use std::io::Write;
use std::time::Duration;

use may::net::TcpStream;
use redis::{Cmd, Value};

use super::QueueError;

/// Where Redis is: `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub user: Option<String>,
    pub password: Option<String>,
    /// The URL as shown: without its password.
    pub shown: String,
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, QueueError> {
        let bad = |why: &str| QueueError::Url(format!("{}: {why}", crate::shown::redact(text)));
        let url = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "redis" {
            return Err(bad("use redis://HOST:PORT[/DB]"));
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) => h.to_string(),
            None => return Err(bad("no host")),
        };
        let db = match url.path().trim_start_matches('/') {
            "" => 0,
            d => d
                .parse::<i64>()
                .ok()
                .filter(|d| *d >= 0)
                .ok_or_else(|| bad("the database is a number"))?,
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("no ? or # options are understood"));
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let user = Some(url.username()).filter(|u| !u.is_empty()).map(decode);
        let password = url.password().map(decode);
        let port = url.port().unwrap_or(6379);
        let shown = format!(
            "redis://{}{}:{port}/{db}",
            if user.is_some() || password.is_some() {
                "***@"
            } else {
                ""
            },
            if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            }
        );
        Ok(Target {
            host,
            port,
            db,
            user,
            password,
            shown,
        })
    }
}

/// A connection that is made again when it breaks.
pub struct Redis {
    target: Target,
    conn: Option<(TcpStream, redis::Parser)>,
    /// Whether a lost connection is waited for (a worker) or an error (the other commands).
    patient: bool,
    /// Told once per outage, so a log shows when Redis went away and came back.
    notice: Box<dyn Fn(&str) + Send>,
    down: bool,
    /// Waiting for a Redis that is away ends when this is asked to stop.
    stop: Option<corokit_common::Shutdown>,
}

const CONNECT: Duration = Duration::from_secs(5);
/// Longest wait for a reply: above the longest BLOCK a worker asks for.
const REPLY: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Redis {
    /// Connects once, so a wrong address or password is an error at start.
    pub fn connect(
        target: Target,
        patient: bool,
        notice: Box<dyn Fn(&str) + Send>,
    ) -> Result<Redis, QueueError> {
        let mut r = Redis {
            target,
            conn: None,
            patient,
            notice,
            down: false,
            stop: None,
        };
        r.open()?;
        Ok(r)
    }

    /// Stops waiting for Redis (with [`QueueError::Stopped`]) once `shutdown` is requested.
    pub fn stop_with(&mut self, shutdown: corokit_common::Shutdown) {
        self.stop = Some(shutdown);
    }

    fn stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.is_requested())
    }

    /// Sleeps `wait`, or less when asked to stop.
    fn pause(&self, wait: Duration) {
        match &self.stop {
            Some(stop) => {
                stop.wait_timeout(wait);
            }
            None => corokit_common::sleep(wait),
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    fn open(&mut self) -> Result<(), QueueError> {
        let t = &self.target;
        let unreachable =
            |e: std::io::Error| QueueError::Unreachable(t.shown.clone(), e.to_string());
        let addrs = corokit_common::blocking::Dns::system()
            .resolve(&t.host, t.port, CONNECT)
            .map_err(|e| unreachable(std::io::Error::other(e.to_string())))?;
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            unreachable(last.unwrap_or_else(|| std::io::Error::other("no address")))
        })?;
        stream.set_read_timeout(Some(REPLY)).map_err(unreachable)?;
        let _ = stream.set_nodelay(true);
        self.conn = Some((stream, redis::Parser::new()));
        let mut hello = Vec::new();
        if let Some(p) = &self.target.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(u) = &self.target.user {
                auth.arg(u);
            }
            hello.push(auth.arg(p).clone());
        }
        if self.target.db != 0 {
            hello.push(redis::cmd("SELECT").arg(self.target.db).clone());
        }
        // Whatever accepts a connection is not Redis until it answers PING.
        hello.push(redis::cmd("PING"));
        for cmd in hello {
            let ping = cmd.get_packed_command() == redis::cmd("PING").get_packed_command();
            match self.once(&[cmd]) {
                Ok(v) if v.iter().any(loading) => {
                    self.conn = None;
                    return Err(QueueError::Unreachable(
                        self.target.shown.clone(),
                        "it is loading its data".into(),
                    ));
                }
                Ok(v) if ping && !matches!(&v[0], Value::SimpleString(s) if s == "PONG") => {
                    self.conn = None;
                    return Err(QueueError::Unreachable(
                        self.target.shown.clone(),
                        "it does not answer as Redis does".into(),
                    ));
                }
                Ok(mut v) => {
                    if let Err(e) = v.remove(0).extract_error() {
                        self.conn = None;
                        return Err(QueueError::Refused(
                            self.target.shown.clone(),
                            e.to_string(),
                        ));
                    }
                }
                Err(e) => {
                    self.conn = None;
                    let why = match ping {
                        true => "it does not answer as Redis does".to_string(),
                        false => e.to_string(),
                    };
                    return Err(QueueError::Unreachable(self.target.shown.clone(), why));
                }
            }
        }
        if self.down {
            self.down = false;
            (self.notice)(&format!("Redis at {} is back", self.target.shown));
        }
        Ok(())
    }

    /// Sends `cmds` and reads their replies, on the connection there is.
    fn once(&mut self, cmds: &[Cmd]) -> std::io::Result<Vec<Value>> {
        let (stream, parser) = self
            .conn
            .as_mut()
            .ok_or_else(|| std::io::Error::other("not connected"))?;
        let mut bytes = Vec::new();
        for c in cmds {
            c.write_packed_command(&mut bytes);
        }
        stream.write_all(&bytes)?;
        let mut out = Vec::with_capacity(cmds.len());
        for _ in cmds {
            let v = parser
                .parse_value(&mut *stream)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            out.push(v);
        }
        Ok(out)
    }

    /// Sends `cmds` in one write and returns their replies (server errors as
    /// `Value::ServerError`). A broken connection is made again and, when patient, the
    /// commands sent again until it works: so they must be safe to repeat.
    pub fn pipeline(&mut self, cmds: &[Cmd]) -> Result<Vec<Value>, QueueError> {
        let mut wait = Duration::from_millis(100);
        loop {
            if self.conn.is_some() {
                match self.once(cmds) {
                    // A Redis that restarts answers LOADING until its data is back.
                    Ok(v) if self.patient && v.iter().any(loading) => {
                        if self.stopping() {
                            return Err(QueueError::Stopped);
                        }
                        self.pause(wait);
                        wait = (wait * 2).min(MAX_BACKOFF);
                        continue;
                    }
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        self.conn = None;
                        if !self.patient {
                            return Err(QueueError::Lost(self.target.shown.clone(), e.to_string()));
                        }
                        if !self.down {
                            self.down = true;
                            (self.notice)(&format!(
                                "lost Redis at {} ({e}); trying again",
                                self.target.shown
                            ));
                        }
                    }
                }
            }
            match self.open() {
                Ok(()) => continue,
                Err(e @ QueueError::Refused(..)) => return Err(e),
                Err(e) if !self.patient => return Err(e),
                Err(_) => {
                    if self.stopping() {
                        return Err(QueueError::Stopped);
                    }
                    self.pause(wait);
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One command; a server error is an error.
    pub fn call(&mut self, cmd: &Cmd) -> Result<Value, QueueError> {
        let v = self.pipeline(std::slice::from_ref(cmd))?.remove(0);
        v.extract_error()
            .map_err(|e| QueueError::Server(e.to_string()))
    }

    /// One command, its reply as `T`.
    pub fn get<T: redis::FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, QueueError> {
        let v = self.call(cmd)?;
        redis::from_redis_value(v).map_err(|e| QueueError::Reply(e.to_string()))
    }
}

fn loading(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "LOADING")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_their_password() {
        let t = Target::parse("redis://:s3cret@10.0.0.5:7000/2").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("10.0.0.5", 7000, 2));
        assert_eq!(t.password.as_deref(), Some("s3cret"));
        assert!(!t.shown.contains("s3cret"));
        let t = Target::parse("redis://[::1]/0").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 6379));
        for bad in [
            "http://h/",
            "redis://h/x",
            "redis://h/-1",
            "redis:///0",
            "h:6379",
            "redis://h/0?x=1",
        ] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
        }
        let e = Target::parse("http://u:pw@h/").unwrap_err().to_string();
        assert!(!e.contains("pw"), "{e}");
    }
}
