//! Test-only helpers: a scriptable HTTP/1.1 server (plain or TLS) on loopback, run as may
//! coroutines, that can delay, serve ranges with validators, redirect, drop a connection
//! mid-body, send a short body, stall, send raw (malformed) status lines and headers, or close
//! a kept-alive connection instead of answering; and a self-signed certificate to trust.
//!
//! may_minihttp cannot do most of this (no Range, no way to misbehave on purpose), and a
//! real test of a downloader needs a server that misbehaves exactly as asked.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use rcgen;

/// A request as the handler sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// 1 for the first request on its connection, 2 for the next one kept alive, …
    pub on_connection: usize,
}

impl Request {
    /// The first header of this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How the server misbehaves while sending the body.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Fault {
    #[default]
    None,
    /// Send this many body bytes, then close the connection (a dropped connection).
    DropAfter(usize),
    /// Send this many body bytes, then go silent for the duration, then close.
    StallAfter(usize, Duration),
    /// Close the connection without answering, as a server whose keep-alive timeout fires just
    /// as the next request arrives.
    Close,
}

/// What the handler answers.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Waited (as a coroutine sleep) before anything is sent.
    pub delay: Duration,
    pub fault: Fault,
    /// Content-Length sent; defaults to the body's length. Larger than the body gives a
    /// short body (the server closes after the body).
    pub content_length: Option<usize>,
    /// Sent instead of the status line and headers, as they are (with the blank line that
    /// ends them); the connection closes after the body.
    pub raw_head: Option<Vec<u8>>,
    /// The body is sent at this many bytes per second (a server or CDN that limits each
    /// connection).
    pub rate: Option<u64>,
}

impl Response {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
            fault: Fault::None,
            content_length: None,
            raw_head: None,
            rate: None,
        }
    }

    /// An answer whose status line and headers are `head` exactly (CRLFs and all), then
    /// `body`: for answers no well-behaved server would send.
    pub fn raw(head: &[u8], body: impl Into<Vec<u8>>) -> Self {
        Response {
            raw_head: Some(head.to_vec()),
            ..Self::new(200, body)
        }
    }

    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self::new(200, body)
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }

    /// Sends the body at `bytes_per_second`.
    pub fn rate(mut self, bytes_per_second: u64) -> Self {
        self.rate = Some(bytes_per_second.max(10));
        self
    }

    pub fn content_length(mut self, len: usize) -> Self {
        self.content_length = Some(len);
        self
    }

    pub fn redirect(status: u16, location: &str) -> Self {
        Self::new(status, Vec::new()).header("Location", location)
    }

    /// Serves `body` as a file with the given ETag (strong) and Last-Modified, honouring
    /// `Range` (`bytes=FIRST-` or `bytes=FIRST-LAST`) and `If-Range` the way RFC 9110 asks: a
    /// range only when the validator still matches, 416 for a range past the end.
    pub fn file(req: &Request, body: &[u8], etag: &str, last_modified: &str) -> Self {
        let full = || {
            Response::ok(body.to_vec())
                .header("ETag", etag)
                .header("Last-Modified", last_modified)
                .header("Accept-Ranges", "bytes")
        };
        let Some(range) = req.header("Range") else {
            return full();
        };
        if let Some(if_range) = req.header("If-Range") {
            if if_range != etag && if_range != last_modified {
                return full();
            }
        }
        let Some((start, last)) = range.strip_prefix("bytes=").and_then(|r| {
            let (a, b) = r.split_once('-')?;
            let a = a.parse::<usize>().ok()?;
            match b {
                "" => Some((a, usize::MAX)),
                b => b.parse::<usize>().ok().filter(|&b| b >= a).map(|b| (a, b)),
            }
        }) else {
            return full();
        };
        if start >= body.len() {
            return Response::new(416, Vec::new())
                .header("Content-Range", format!("bytes */{}", body.len()))
                .header("ETag", etag);
        }
        let last = last.min(body.len() - 1);
        Response::new(206, body[start..=last].to_vec())
            .header(
                "Content-Range",
                format!("bytes {}-{}/{}", start, last, body.len()),
            )
            .header("ETag", etag)
            .header("Last-Modified", last_modified)
            .header("Accept-Ranges", "bytes")
    }
}

type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// Counters the tests read to see what the server saw.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicUsize,
    pub connections: AtomicUsize,
    /// TLS connections whose handshake resumed an earlier session.
    pub resumed: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    log: Mutex<Vec<Request>>,
}

impl Stats {
    /// The most requests the server was handling at the same moment.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn resumed(&self) -> usize {
        self.resumed.load(Ordering::SeqCst)
    }

    /// Every request seen so far, in arrival order.
    pub fn log(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
}

/// A certificate for `localhost` and `127.0.0.1`, signed by itself, to be trusted as a root.
pub struct TestCert {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl TestCert {
    pub fn new() -> Self {
        let names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        let key = rcgen::generate_simple_self_signed(names).expect("generate test certificate");
        TestCert {
            cert_pem: key.cert.pem(),
            cert_der: key.cert.der().to_vec(),
            key_der: key.signing_key.serialize_der(),
        }
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .expect("server certificate");
        Arc::new(config)
    }
}

impl Default for TestCert {
    fn default() -> Self {
        Self::new()
    }
}

/// A running server; it stops accepting when dropped.
pub struct Server {
    addr: SocketAddr,
    scheme: &'static str,
    pub stats: Arc<Stats>,
    stopped: Arc<AtomicBool>,
}

impl Server {
    /// Starts a plain HTTP server on 127.0.0.1 with a free port.
    pub fn start(handler: impl Fn(&Request) -> Response + Send + Sync + 'static) -> Server {
        Self::start_on("127.0.0.1:0".parse().unwrap(), None, Arc::new(handler))
    }

    /// Starts an HTTPS server on 127.0.0.1 presenting `cert`.
    pub fn start_tls(
        cert: &TestCert,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> Server {
        Self::start_on(
            "127.0.0.1:0".parse().unwrap(),
            Some(cert.server_config()),
            Arc::new(handler),
        )
    }

    fn start_on(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        handler: Arc<Handler>,
    ) -> Server {
        corokit_common::init();
        let listener = may::net::TcpListener::bind(addr).expect("bind test server");
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(Stats::default());
        let stopped = Arc::new(AtomicBool::new(false));
        let scheme = if tls.is_some() { "https" } else { "http" };
        {
            let stats = stats.clone();
            let stopped = stopped.clone();
            corokit_common::spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let _ = conn.set_nodelay(true);
                    stats.connections.fetch_add(1, Ordering::SeqCst);
                    let stats = stats.clone();
                    let handler = handler.clone();
                    let tls = tls.clone();
                    let _ = corokit_common::spawn(move || match tls {
                        None => serve(conn, &*handler, &stats),
                        Some(config) => {
                            let Ok(session) = rustls::ServerConnection::new(config) else {
                                return;
                            };
                            let mut tls = rustls::StreamOwned::new(session, conn);
                            while tls.conn.is_handshaking() {
                                if tls.conn.complete_io(&mut tls.sock).is_err() {
                                    return;
                                }
                            }
                            if tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                                stats.resumed.fetch_add(1, Ordering::SeqCst);
                            }
                            serve(tls, &*handler, &stats)
                        }
                    });
                }
            })
            .expect("spawn accept loop");
        }
        Server {
            addr,
            scheme,
            stats,
            stopped,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and ends.
        let _ = may::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    fn enter(stats: &'a Stats) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves requests on one connection until the client closes or a fault ends it.
fn serve<S: Read + Write>(mut conn: S, handler: &Handler, stats: &Stats) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut on_connection = 0;
    loop {
        on_connection += 1;
        let (req, consumed, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    let req = Request {
                        method: parsed.method.unwrap_or("GET").to_string(),
                        path: parsed.path.unwrap_or("/").to_string(),
                        headers,
                        on_connection,
                    };
                    let close = req
                        .header("Connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    let body_len: usize = req
                        .header("Content-Length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    break (req, n + body_len, close);
                }
                Ok(httparse::Status::Partial) => {
                    let mut chunk = [0u8; 4096];
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                Err(_) => {
                    let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                }
            }
        };
        // A request body (rare in these tests) is read and ignored.
        while buf.len() < consumed {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..consumed);

        stats.requests.fetch_add(1, Ordering::SeqCst);
        stats.log.lock().unwrap().push(req.clone());
        // The client may finish the answer, and send its next request, as soon as the last
        // of it is written: the answer stops counting as in flight just before that write, or
        // a limit the client keeps would look broken at the server.
        let mut in_flight = Some(InFlight::enter(stats));
        let rsp = handler(&req);
        if !rsp.delay.is_zero() {
            corokit_common::sleep(rsp.delay);
        }
        if rsp.fault == Fault::Close {
            return;
        }
        if let Some(head) = &rsp.raw_head {
            in_flight.take();
            let _ = conn
                .write_all(head)
                .and_then(|_| conn.write_all(&rsp.body))
                .and_then(|_| conn.flush());
            return;
        }
        let declared = rsp.content_length.unwrap_or(rsp.body.len());
        let mut head = format!("HTTP/1.1 {} {}\r\n", rsp.status, reason(rsp.status));
        let mut seen: HashMap<String, ()> = HashMap::new();
        for (name, value) in &rsp.headers {
            seen.insert(name.to_ascii_lowercase(), ());
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !seen.contains_key("content-length") {
            head.push_str(&format!("Content-Length: {declared}\r\n"));
        }
        let short = declared > rsp.body.len();
        if close || short || rsp.fault != Fault::None {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let body: &[u8] = if req.method == "HEAD" { &[] } else { &rsp.body };
        let sent = match rsp.fault {
            Fault::None => body,
            Fault::DropAfter(n) | Fault::StallAfter(n, _) => &body[..n.min(body.len())],
            Fault::Close => &[],
        };
        if rsp.rate.is_none() || sent.is_empty() {
            in_flight.take();
        }
        if conn.write_all(head.as_bytes()).is_err() {
            return;
        }
        let written = match rsp.rate {
            None => conn.write_all(sent),
            Some(rate) => {
                let chunk = (rate / 10) as usize;
                let last = sent.len().div_ceil(chunk).saturating_sub(1);
                sent.chunks(chunk).enumerate().try_for_each(|(k, piece)| {
                    if k > 0 {
                        corokit_common::sleep(Duration::from_millis(100));
                    }
                    if k == last {
                        in_flight.take();
                    }
                    conn.write_all(piece)?;
                    conn.flush()
                })
            }
        };
        if written.and_then(|_| conn.flush()).is_err() {
            return;
        }
        if let Fault::StallAfter(_, stall) = rsp.fault {
            corokit_common::sleep(stall);
        }
        if close || short || rsp.fault != Fault::None {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A CONNECT proxy on 127.0.0.1 that tunnels to IP-literal targets and counts its tunnels.
pub struct ConnectProxy {
    addr: SocketAddr,
    tunnels: Arc<AtomicUsize>,
}

impl ConnectProxy {
    pub fn start() -> ConnectProxy {
        corokit_common::init();
        let listener = may::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("local addr");
        let tunnels = Arc::new(AtomicUsize::new(0));
        let counter = tunnels.clone();
        corokit_common::spawn(move || {
            for client in listener.incoming().flatten() {
                let counter = counter.clone();
                let _ = corokit_common::spawn(move || tunnel(client, &counter));
            }
        })
        .expect("spawn proxy");
        ConnectProxy { addr, tunnels }
    }

    /// `http://127.0.0.1:PORT`, for a proxy setting.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }
}

fn tunnel(mut client: may::net::TcpStream, tunnels: &AtomicUsize) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head
        .strip_prefix("CONNECT ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| t.parse::<SocketAddr>().ok());
    let Some(target) = target else {
        let _ = client.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        return;
    };
    let Ok(mut upstream) = may::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
    else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    tunnels.fetch_add(1, Ordering::SeqCst);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    let (Ok(mut client_in), Ok(mut upstream_out)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let _ = corokit_common::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut upstream_out);
        let _ = upstream_out.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Both);
}
