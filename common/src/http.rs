//! The may-aware HTTP agent: ureq 3 over `may::net::TcpStream`, so every connect, read and
//! write parks the coroutine instead of the worker thread.
//!
//! The connector chain is CONNECT proxy (from `HTTP(S)_PROXY` / `NO_PROXY`) → may TCP →
//! rustls (webpki roots plus any extra roots). Names are resolved by [`Dns`] on the offload
//! pool. Every ureq `Agent` in the workspace comes from [`HttpOptions::agent`] (or
//! [`HttpOptions::agents`], several that share one TLS client).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, Either, NextTimeout,
    RustlsConnector, Transport,
};
use ureq::{Agent, Timeout};

use crate::blocking::Dns;
use crate::Error;

/// How the agent behaves. `Default` suits a downloader talking to many hosts.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// For the whole connect, across every address a name resolves to; also bounds the lookup.
    pub connect_timeout: Duration,
    /// Longest wait for any single read (an idle connection), or none.
    pub read_timeout: Option<Duration>,
    /// Longest a whole request may take, body included, or none.
    pub overall_timeout: Option<Duration>,
    /// Per-connection input buffer to start with (ureq's 128 KiB default costs 256 MB at 1000
    /// connections). It grows while the server keeps it full (a large header, a large body
    /// read in large blocks) up to [`MAX_INPUT_BUFFER`]; it is taken when an answer starts
    /// to arrive and given back when the connection is idle.
    pub input_buffer: usize,
    /// Per-connection output buffer (request line and headers).
    pub output_buffer: usize,
    /// Certificates trusted in addition to the built-in webpki roots (a private or test CA).
    pub extra_roots: Vec<Certificate<'static>>,
    /// Redirects followed before giving up; 0 returns the 3xx response as it is.
    pub max_redirects: u32,
    /// Idle keep-alive connections kept in total and per host.
    pub max_idle: usize,
    pub max_idle_per_host: usize,
    pub user_agent: String,
    /// A CONNECT proxy; by default from `ALL_PROXY`/`HTTPS_PROXY`/`HTTP_PROXY` (and their
    /// lower-case forms), with `NO_PROXY` naming hosts to reach directly.
    pub proxy: Option<ureq::Proxy>,
    /// Where names are looked up; the process-wide system resolver by default.
    pub dns: Arc<Dns>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Some(Duration::from_secs(30)),
            overall_timeout: None,
            input_buffer: 16 * 1024,
            output_buffer: OUTPUT_BUFFER,
            extra_roots: Vec::new(),
            max_redirects: 10,
            max_idle: 1024,
            max_idle_per_host: 64,
            user_agent: concat!("corokit/", env!("CARGO_PKG_VERSION")).to_string(),
            proxy: ureq::Proxy::try_from_env(),
            dns: Dns::system(),
        }
    }
}

impl HttpOptions {
    /// Adds every certificate in the PEM file at `path` to the trusted roots.
    pub fn add_roots_from_pem_file(&mut self, path: &Path) -> Result<(), Error> {
        let failed = |reason: String| Error::Certificates {
            path: path.to_path_buf(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
        let mut found = 0;
        for item in ureq::tls::parse_pem(&pem) {
            match item.map_err(|e| failed(e.to_string()))? {
                ureq::tls::PemItem::Certificate(cert) => {
                    self.extra_roots.push(cert);
                    found += 1;
                }
                _ => continue,
            }
        }
        if found == 0 {
            return Err(failed("no PEM certificate in the file".into()));
        }
        Ok(())
    }

    /// Builds the agent. Responses with an error status are returned, not turned into errors:
    /// the caller decides what a 404 or a 429 means.
    pub fn agent(&self) -> Agent {
        self.agents(1).pop().expect("one agent")
    }

    /// Builds `n` agents alike (each with its own pool of idle connections) that share one
    /// TLS client: its configuration, whose root store is built once, and its sessions, so a
    /// connection any of them makes to a server resumes a session another one started.
    pub fn agents(&self, n: usize) -> Vec<Agent> {
        let roots = if self.extra_roots.is_empty() {
            RootCerts::WebPki
        } else {
            webpki_root_certs::TLS_SERVER_ROOT_CERTS
                .iter()
                .map(|der| Certificate::from_der(der.as_ref()).to_owned())
                .chain(self.extra_roots.iter().cloned())
                .into()
        };
        let config = Config::builder()
            .http_status_as_error(false)
            .timeout_connect(Some(self.connect_timeout))
            .timeout_resolve(Some(self.connect_timeout))
            .timeout_per_read(self.read_timeout)
            .timeout_global(self.overall_timeout)
            .input_buffer_size(self.input_buffer)
            // A header larger than this is an error, not something to keep reading.
            .max_response_header_size(64 * 1024)
            .output_buffer_size(self.output_buffer)
            .max_redirects(self.max_redirects)
            .max_idle_connections(self.max_idle)
            .max_idle_connections_per_host(self.max_idle_per_host)
            .user_agent(self.user_agent.as_str())
            .proxy(self.proxy.clone())
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .build();
        let tls = SharedTls(Arc::new(RustlsConnector::default()));
        (0..n)
            .map(|_| {
                let connector = Connectors(
                    ().chain(ConnectProxyConnector::default())
                        .chain(MayConnector)
                        .chain(tls.clone()),
                );
                Agent::with_parts(
                    config.clone(),
                    connector,
                    MayResolver {
                        dns: self.dns.clone(),
                    },
                )
            })
            .collect()
    }
}

/// The most a connection's input buffer grows to.
pub const MAX_INPUT_BUFFER: usize = 512 * 1024;
/// The output buffer by default: a request head up to this size (long signed URLs fit).
pub const OUTPUT_BUFFER: usize = 8 * 1024;

/// ureq keeps at most this many addresses per name.
const MAX_ADDRS: usize = 16;

/// Resolves through [`Dns`], so a lookup parks the coroutine instead of the worker.
#[derive(Debug)]
struct MayResolver {
    dns: Arc<Dns>,
}

impl Resolver for MayResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let bad = |why: &str| ureq::Error::BadUri(format!("{uri}: {why}"));
        let scheme = uri.scheme().ok_or_else(|| bad("no scheme"))?;
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let port = authority
            .port_u16()
            .or_else(|| match scheme.as_str() {
                "http" => Some(80),
                "https" => Some(443),
                _ => None,
            })
            .ok_or_else(|| bad("unknown scheme"))?;
        let wait = timeout
            .not_zero()
            .map(|d| *d)
            .unwrap_or(Duration::from_secs(30));
        let addrs = self
            .dns
            .resolve(authority.host(), port, wait)
            .map_err(|e| match e {
                Error::ResolveTimeout { .. } => ureq::Error::Timeout(Timeout::Resolve),
                _ => ureq::Error::HostNotFound,
            })?;
        let mut out = self.empty();
        for addr in config
            .ip_family()
            .keep_wanted(addrs.into_iter())
            .take(MAX_ADDRS)
        {
            out.push(addr);
        }
        if out.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(out)
    }
}

/// Plain HTTP without a proxy is connected by [`MayConnector`] alone; the rest goes through
/// the whole chain (proxy, TCP, TLS). The chain's frames take about 9 KiB of stack on every
/// new connection, and a page of a coroutine's stack once touched stays in its memory: with
/// thousands of downloads at once, that is a quarter of each one's.
#[derive(Debug)]
struct Connectors<C>(C);

impl<C> Connector<()> for Connectors<C>
where
    C: Connector<()>,
{
    type Out = Box<dyn Transport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<()>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let plain = details.uri.scheme() == Some(&ureq::http::uri::Scheme::HTTP)
            && details.config.proxy().is_none();
        match plain {
            true => plain_connect(details),
            false => chain_connect(&self.0, details, chained),
        }
    }
}

#[inline(never)]
fn plain_connect(details: &ConnectionDetails) -> Result<Option<Box<dyn Transport>>, ureq::Error> {
    let connected = Connector::<()>::connect(&MayConnector, details, None)?;
    Ok(connected.map(|t| Box::new(t) as Box<dyn Transport>))
}

#[inline(never)]
fn chain_connect<C: Connector<()>>(
    chain: &C,
    details: &ConnectionDetails,
    chained: Option<()>,
) -> Result<Option<Box<dyn Transport>>, ureq::Error> {
    Ok(chain
        .connect(details, chained)?
        .map(|t| Box::new(t) as Box<dyn Transport>))
}

/// One rustls connector for several agents: it builds its client configuration on first use
/// and keeps it, session cache included.
#[derive(Debug, Clone)]
struct SharedTls(Arc<RustlsConnector>);

impl<In: Transport> Connector<In> for SharedTls {
    type Out = <RustlsConnector as Connector<In>>::Out;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        self.0.connect(details, chained)
    }
}

/// Opens `may::net::TcpStream`s, trying each resolved address in turn within the connect
/// timeout.
#[derive(Debug)]
struct MayConnector;

impl<In: Transport> Connector<In> for MayConnector {
    type Out = Either<In, MayTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        // A proxy connector earlier in the chain already made the connection.
        if let Some(chained) = chained {
            return Ok(Some(Either::A(chained)));
        }
        let budget = details.timeout.not_zero().map(|d| *d);
        let stream = connect_any(&details.addrs, budget)?;
        if details.config.no_delay() {
            stream.set_nodelay(true)?;
        }
        // No ShutdownHandle is registered: nothing here calls `Agent::shutdown`, and a
        // handle would cost a duplicated fd per connection.
        let buffers = Elastic::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(Either::B(MayTransport {
            stream,
            buffers,
            read_timeout: None,
            write_timeout: None,
            answered: false,
        })))
    }
}

/// Tries each address with an equal share of what is left of the budget, so one address
/// that drops SYNs cannot eat the time the next one needs.
fn connect_any(
    addrs: &[SocketAddr],
    budget: Option<Duration>,
) -> Result<may::net::TcpStream, ureq::Error> {
    let started = Instant::now();
    let mut last: Option<ureq::Error> = None;
    for (i, addr) in addrs.iter().enumerate() {
        let left = match budget {
            Some(b) => match b.checked_sub(started.elapsed()) {
                Some(left) if !left.is_zero() => Some(left / (addrs.len() - i) as u32),
                _ => break,
            },
            None => None,
        };
        let attempt = match left {
            Some(t) => may::net::TcpStream::connect_timeout(addr, t.max(Duration::from_millis(10))),
            None => may::net::TcpStream::connect(*addr),
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                last = Some(ureq::Error::Timeout(Timeout::Connect));
            }
            Err(e) => {
                last = Some(ureq::Error::Io(io::Error::new(
                    e.kind(),
                    format!("connect to {addr}: {e}"),
                )));
            }
        }
    }
    Err(last.unwrap_or(ureq::Error::Timeout(Timeout::Connect)))
}

/// A connection's buffers. The input buffer starts at `base` (allocated once there is input
/// to read) and doubles, up to [`MAX_INPUT_BUFFER`], whenever a read fills all the room it
/// was given (the peer has more ready than fits) or unparsed input fills it (a header larger
/// than `base`); the output buffer exists while a request is written. A connection waiting
/// for its answer holds no input buffer, and an idle one no buffer at all (`release`): with
/// thousands of downloads waiting at once, these are most of their memory.
struct Elastic {
    base: usize,
    target: usize,
    input: Vec<u8>,
    filled: usize,
    consumed: usize,
    /// The room handed out by the last `input_append_buf`.
    offered: usize,
    output: Vec<u8>,
    output_size: usize,
    progress: bool,
}

impl Elastic {
    fn new(base: usize, output_size: usize) -> Self {
        Elastic {
            base: base.max(1024),
            target: base.max(1024),
            input: Vec::new(),
            filled: 0,
            consumed: 0,
            offered: 0,
            output: Vec::new(),
            output_size: output_size.max(1024),
            progress: false,
        }
    }

    /// Moves unread input to the front when that makes room.
    fn shift(&mut self) {
        if self.consumed == self.filled {
            self.consumed = 0;
            self.filled = 0;
        } else if self.consumed > 0 && self.filled > self.input.len() / 2 {
            self.input.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
    }

    /// Gives both buffers back, if nothing is waiting to be read.
    fn release(&mut self) {
        self.output = Vec::new();
        if self.consumed == self.filled {
            self.input = Vec::new();
            self.target = self.base;
            self.filled = 0;
            self.consumed = 0;
        }
    }

    /// True when no input buffer is allocated (nothing read since the last `release`).
    fn unallocated(&self) -> bool {
        self.input.is_empty()
    }
}

impl Buffers for Elastic {
    fn output(&mut self) -> &mut [u8] {
        if self.output.len() < self.output_size {
            self.output.resize(self.output_size, 0);
        }
        &mut self.output
    }

    fn input(&self) -> &[u8] {
        &self.input[self.consumed..self.filled]
    }

    fn input_append_buf(&mut self) -> &mut [u8] {
        self.shift();
        if self.filled == self.input.len() && self.input.len() >= self.target {
            // Full of what could not be used yet: more room is the only way on.
            self.target = (self.target * 2)
                .min(MAX_INPUT_BUFFER)
                .max(self.input.len() + 1024);
        }
        if self.input.len() < self.target {
            self.input.resize(self.target, 0);
        }
        self.offered = self.input.len() - self.filled;
        &mut self.input[self.filled..]
    }

    fn input_appended(&mut self, amount: usize) {
        self.filled += amount;
        assert!(self.filled <= self.input.len());
        if amount == self.offered && self.target < MAX_INPUT_BUFFER {
            self.target = (self.target * 2).min(MAX_INPUT_BUFFER);
        }
    }

    fn input_consume(&mut self, amount: usize) {
        self.progress = amount > 0;
        self.consumed += amount;
        assert!(self.consumed <= self.filled);
    }

    fn tmp_and_output(&mut self) -> (&mut [u8], &mut [u8]) {
        const MIN_TMP: usize = 10 * 1024;
        self.output();
        if self.input.len() < self.target {
            self.input.resize(self.target, 0);
        }
        if self.input.len() - self.filled < MIN_TMP {
            let len = self.filled + MIN_TMP;
            self.input.resize(len, 0);
        }
        (&mut self.input[self.filled..], &mut self.output)
    }

    fn can_use_input(&self) -> bool {
        self.filled > self.consumed && self.progress
    }
}

/// A plain TCP transport over a may socket.
struct MayTransport {
    stream: may::net::TcpStream,
    buffers: Elastic,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// An answer was read since the connection was last asked whether it is open.
    answered: bool,
}

impl fmt::Debug for MayTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MayTransport")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

/// Turns ureq's remaining time into a socket timeout, or the timeout error when none is left.
/// (may keeps socket timeouts in whole milliseconds, and one under a millisecond would be no
/// timeout at all.)
fn socket_timeout(timeout: NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    match timeout.not_zero() {
        None => Ok(None),
        Some(d) if d.is_zero() => Err(ureq::Error::Timeout(timeout.reason)),
        Some(d) => Ok(Some(crate::wait_limit(*d))),
    }
}

fn timed_out(e: io::Error, reason: Timeout) -> ureq::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    ) {
        ureq::Error::Timeout(reason)
    } else {
        ureq::Error::Io(e)
    }
}

impl Transport for MayTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        let wanted = socket_timeout(timeout)?;
        if wanted != self.write_timeout {
            self.stream.set_write_timeout(wanted)?;
            self.write_timeout = wanted;
        }
        let output = &self.buffers.output()[..amount];
        self.stream
            .write_all(output)
            .map_err(|e| timed_out(e, timeout.reason))?;
        // A request is one write: the answer may be a long wait.
        self.buffers.output = Vec::new();
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        let wanted = socket_timeout(timeout)?;
        if wanted != self.read_timeout {
            self.stream.set_read_timeout(wanted)?;
            self.read_timeout = wanted;
        }
        if self.buffers.unallocated() {
            // Wait for the answer before taking memory to read it into.
            loop {
                match self.stream.peek(&mut [0u8; 1]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(timed_out(e, timeout.reason)),
                    Ok(_) => break,
                }
            }
        }
        let input = self.buffers.input_append_buf();
        let amount = loop {
            match self.stream.read(input) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other.map_err(|e| timed_out(e, timeout.reason))?,
            }
        };
        self.buffers.input_appended(amount);
        self.answered = true;
        Ok(amount > 0)
    }

    /// Called while ureq holds its pool's std mutex, so it must not yield: it peeks through
    /// the socket's std handle, which may has already made non-blocking.
    fn is_open(&mut self) -> bool {
        // Asked when the connection would be reused, so it is idle: its buffers go back.
        self.buffers.release();
        // Asked first as the answer is done, to go back to the pool, and again when it is
        // taken from there: peeking once, at the second, sees both a closed connection and
        // bytes sent after the answer.
        if std::mem::take(&mut self.answered) {
            return true;
        }
        let mut byte = [0u8; 1];
        match self.stream.inner().peek(&mut byte) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            // EOF, or bytes nobody asked for: either way the connection is not reusable.
            Ok(_) => false,
        }
    }
}
