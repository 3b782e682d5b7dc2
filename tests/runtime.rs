//! The shared runtime, end to end on loopback: every test here runs its coroutines on a
//! single may worker, so anything that blocked that worker would stall the rest and show.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corokit_common::http::HttpOptions;
use corokit_common::{join_all, output, spawn, stdin, Dns, Lookup, Pool, RuntimeConfig, Shutdown};
use corokit_testkit::{ConnectProxy, Response, Server, TestCert};

fn one_worker() {
    RuntimeConfig::with_workers(1).init();
}

fn body_of(agent: &ureq::Agent, url: &str) -> Result<(u16, String), ureq::Error> {
    let mut rsp = agent.get(url).call()?;
    let status = rsp.status().as_u16();
    Ok((status, rsp.body_mut().read_to_string()?))
}

#[test]
fn init_configures_may_once() {
    one_worker();
    assert!(!corokit_common::init(), "a second init must change nothing");
    assert_eq!(
        may::config().get_stack_size(),
        corokit_common::runtime::STACK_WORDS
    );
    assert_eq!(may::config().get_workers(), 1);
}

#[test]
fn two_hundred_slow_requests_overlap_on_one_worker() {
    one_worker();
    let server = Server::start(|req| {
        Response::ok(format!("hello {}", req.path)).delay(Duration::from_millis(200))
    });
    let agent = HttpOptions::default().agent();
    let started = Instant::now();
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let agent = agent.clone();
            let url = server.url(&format!("/{i}"));
            spawn(move || body_of(&agent, &url).map(|(_, body)| body)).unwrap()
        })
        .collect();
    let results = join_all(handles);
    let elapsed = started.elapsed();
    for (i, r) in results.into_iter().enumerate() {
        let body = r.expect("no panic").expect("request ok");
        assert_eq!(body, format!("hello /{i}"));
    }
    // Blocking sockets would take 200 × 200 ms = 40 s; overlapping ones about 0.3 s.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let overlap = server.stats.max_in_flight();
    assert!(
        overlap > 100,
        "the server saw at most {overlap} requests at once"
    );
}

#[test]
fn keep_alive_connections_are_reused() {
    one_worker();
    let server = Server::start(|_| Response::ok("x"));
    let agent = HttpOptions::default().agent();
    let url = server.url("/a");
    spawn(move || {
        for _ in 0..5 {
            assert_eq!(body_of(&agent, &url).unwrap().1, "x");
        }
    })
    .unwrap()
    .join()
    .unwrap();
    assert_eq!(server.stats.requests(), 5);
    assert_eq!(
        server.stats.connections(),
        1,
        "the pooled connection was not reused"
    );
}

/// Options that trust `cert`, given as a CA file in `dir`, as `--ca-cert` gives it.
fn trusting(cert: &TestCert, dir: &std::path::Path) -> HttpOptions {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &cert.cert_pem).unwrap();
    let mut options = HttpOptions::default();
    options.add_roots_from_pem_file(&ca).unwrap();
    options
}

#[test]
fn https_with_a_test_ca_in_a_coroutine() {
    one_worker();
    let cert = TestCert::new();
    let server = Server::start_tls(&cert, |_| Response::ok("secure hello"));
    let dir = tempfile::tempdir().unwrap();
    let trusting = trusting(&cert, dir.path()).agent();
    let untrusting = HttpOptions::default().agent();
    let url = server.url("/");
    let localhost_url = url.replace("127.0.0.1", "localhost");

    // In a coroutine, on its stack: a debug-build handshake overflows a too-small stack.
    let (ok, by_name, refused) = spawn(move || {
        (
            body_of(&trusting, &url),
            body_of(&trusting, &localhost_url),
            body_of(&untrusting, &url),
        )
    })
    .unwrap()
    .join()
    .expect("the HTTPS coroutine must not overflow its stack");
    assert_eq!(ok.unwrap(), (200, "secure hello".to_string()));
    assert_eq!(by_name.unwrap(), (200, "secure hello".to_string()));
    let err = refused.expect_err("a certificate no root vouches for must be refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

/// Agents made together (fetch's client shards) share one TLS client: a connection one of
/// them makes resumes a session another started, instead of a full handshake.
#[test]
fn agents_made_together_resume_each_others_tls_sessions() {
    one_worker();
    let cert = TestCert::new();
    let server = Server::start_tls(&cert, |_| Response::ok("hello"));
    let dir = tempfile::tempdir().unwrap();
    let agents = trusting(&cert, dir.path()).agents(3);
    let url = server.url("/");
    let answers = spawn(move || {
        agents
            .iter()
            .map(|a| body_of(a, &url).unwrap())
            .collect::<Vec<_>>()
    })
    .unwrap()
    .join()
    .unwrap();
    assert!(answers.iter().all(|a| *a == (200, "hello".to_string())));
    // A connection each (their idle pools are their own), and one full handshake.
    assert_eq!(server.stats.connections(), 3);
    assert_eq!(server.stats.resumed(), 2);
}

#[test]
fn a_ca_file_without_certificates_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.pem");
    std::fs::write(&path, "not a certificate\n").unwrap();
    let err = HttpOptions::default()
        .add_roots_from_pem_file(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.pem") && err.contains("no PEM certificate"),
        "{err}"
    );
}

/// A resolver that takes `delay` (blocking its pool thread, as getaddrinfo would) and then
/// answers like the system's.
struct SlowLookup(Duration);

impl Lookup for SlowLookup {
    fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let (_never, wait) = std::sync::mpsc::channel::<()>();
        let _ = wait.recv_timeout(self.0);
        corokit_common::blocking::SystemLookup.lookup(host, port)
    }
}

#[test]
fn a_slow_lookup_does_not_stop_other_coroutines() {
    one_worker();
    let dns = Arc::new(Dns::new(SlowLookup(Duration::from_millis(400))));
    let ticks = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (ticks, done) = (ticks.clone(), done.clone());
        spawn(move || {
            while !done.load(Ordering::SeqCst) {
                corokit_common::sleep(Duration::from_millis(10));
                ticks.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap()
    };
    let lookup = {
        let (dns, done) = (dns.clone(), done.clone());
        spawn(move || {
            let addrs = dns.resolve("localhost", 8080, Duration::from_secs(5));
            done.store(true, Ordering::SeqCst);
            addrs
        })
        .unwrap()
    };
    let addrs = lookup.join().unwrap().expect("localhost resolves");
    ticker.join().unwrap();
    assert!(
        addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 8080),
        "{addrs:?}"
    );
    let ticks = ticks.load(Ordering::SeqCst);
    // 400 ms of lookup at one tick per 10 ms: a blocked worker would give about 1.
    assert!(
        ticks >= 10,
        "the ticker ticked only {ticks} times during the lookup"
    );

    // A lookup slower than its timeout gives up with an error that names the host.
    let slow = Dns::new(SlowLookup(Duration::from_secs(3)));
    let started = Instant::now();
    let err = spawn(move || slow.resolve("localhost", 80, Duration::from_millis(100)))
        .unwrap()
        .join()
        .unwrap()
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(err.to_string().contains("localhost"), "{err}");
}

#[test]
fn stdin_lines_from_a_pipe_a_file_and_dev_null() {
    one_worker();
    let collect = |rx: stdin::Lines| rx.map(|l| l.unwrap()).collect::<Vec<_>>();

    let (reader, mut writer) = std::io::pipe().unwrap();
    let rx = stdin::read_lines(reader);
    writer
        .write_all(b"first\nsecond\r\nlast without newline")
        .unwrap();
    drop(writer);
    assert_eq!(collect(rx), ["first", "second", "last without newline"]);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lines.txt");
    std::fs::write(&path, b"ok\nbad \xff byte\n\n").unwrap();
    let rx = stdin::read_lines(std::fs::File::open(&path).unwrap());
    assert_eq!(collect(rx), ["ok", "bad \u{fffd} byte", ""]);

    let rx = stdin::read_lines(std::fs::File::open("/dev/null").unwrap());
    assert!(collect(rx).is_empty());
}

#[test]
fn output_to_a_pipe_nobody_reads_parks_the_writer_not_the_worker() {
    one_worker();
    let (mut reader, writer) = std::io::pipe().unwrap();
    let out = output::write_lines(writer).unwrap();
    let lines: Vec<String> = (0..5000).map(|i| format!("{i:>99}")).collect();
    let producer = {
        let (out, lines) = (out.clone(), lines.clone());
        spawn(move || lines.into_iter().for_each(|l| out.line(l))).unwrap()
    };
    // 500 KB cannot fit in the pipe, the writer's buffer and the backlog together, so the
    // producer is parked now; another coroutine still runs on the one worker.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(300) {
        assert_eq!(spawn(|| 42).unwrap().join().unwrap(), 42);
        corokit_common::sleep(Duration::from_millis(20));
    }
    assert!(!producer.is_done(), "the output never filled up");
    let reading = std::thread::spawn(move || {
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        text
    });
    producer.join().unwrap();
    out.drain();
    drop(out);
    let text = reading.join().unwrap();
    assert!(text.lines().eq(lines.iter().map(String::as_str)));
}

#[test]
fn a_refused_connect_names_the_address() {
    one_worker();
    let port = {
        let l = may::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let agent = HttpOptions::default().agent();
    let url = format!("http://127.0.0.1:{port}/x");
    let err = spawn(move || body_of(&agent, &url))
        .unwrap()
        .join()
        .unwrap()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.to_lowercase().contains("refused"),
        "{msg}"
    );
}

#[test]
fn a_connect_that_gets_no_answer_times_out_within_the_limit() {
    one_worker();
    // A listener that never accepts, with the smallest backlog: once its queue is full the
    // kernel drops further SYNs, so a connect hangs until the client gives up.
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    let mut full = false;
    for _ in 0..16 {
        match may::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => {
                full = true;
                break;
            }
        }
    }
    assert!(full, "the accept queue never filled");

    let options = HttpOptions {
        connect_timeout: Duration::from_millis(500),
        ..HttpOptions::default()
    };
    let agent = options.agent();
    let url = format!("http://{addr}/");
    let started = Instant::now();
    let err = spawn(move || body_of(&agent, &url))
        .unwrap()
        .join()
        .unwrap()
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, ureq::Error::Timeout(ureq::Timeout::Connect)),
        "{err}"
    );
    assert!(err.to_string().contains("connect"), "{err}");
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    drop(fillers);
}

#[test]
fn a_pool_never_runs_more_than_its_size() {
    one_worker();
    let pool = Pool::new(3);
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let (running, most) = (running.clone(), most.clone());
            pool.spawn(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                corokit_common::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
            })
            .unwrap()
        })
        .collect();
    assert!(join_all(handles).iter().all(|r| r.is_ok()));
    assert_eq!(most.load(Ordering::SeqCst), 3);
}

#[test]
fn join_all_reports_a_panic_without_losing_the_others() {
    one_worker();
    let handles = vec![
        spawn(|| 1).unwrap(),
        spawn(|| -> i32 { panic!("one task fails") }).unwrap(),
        spawn(|| 3).unwrap(),
    ];
    let results = join_all(handles);
    assert_eq!(*results[0].as_ref().unwrap(), 1);
    assert!(results[1].is_err());
    assert_eq!(*results[2].as_ref().unwrap(), 3);
}

#[test]
fn shutdown_wakes_a_waiting_coroutine() {
    one_worker();
    let shutdown = Shutdown::new();
    let waiter = {
        let s = shutdown.clone();
        spawn(move || s.wait_timeout(Duration::from_secs(10))).unwrap()
    };
    let s = shutdown.clone();
    spawn(move || {
        corokit_common::sleep(Duration::from_millis(30));
        s.request();
    })
    .unwrap();
    assert!(
        waiter.join().unwrap(),
        "the waiter was not woken by the request"
    );
    assert!(shutdown.is_requested());
}

#[test]
fn the_agent_saves_the_bytes_as_sent() {
    one_worker();
    // A gzip body must arrive as the compressed bytes the server sent: resuming with Range
    // is only correct on the stored representation.
    let server = Server::start(|_| {
        Response::ok(vec![0x1f, 0x8b, 8, 0, 1, 2, 3]).header("Content-Encoding", "gzip")
    });
    let agent = HttpOptions::default().agent();
    let url = server.url("/z");
    let bytes = spawn(move || {
        let mut rsp = agent.get(&url).call().unwrap();
        let mut out = Vec::new();
        rsp.body_mut().as_reader().read_to_end(&mut out).unwrap();
        out
    })
    .unwrap()
    .join()
    .unwrap();
    assert_eq!(bytes, [0x1f, 0x8b, 8, 0, 1, 2, 3]);
}

#[test]
fn http_and_https_go_through_a_connect_proxy() {
    one_worker();
    let cert = TestCert::new();
    let plain = Server::start(|_| Response::ok("plain via proxy"));
    let tls = Server::start_tls(&cert, |_| Response::ok("tls via proxy"));
    let proxy = ConnectProxy::start();
    let mut options = HttpOptions {
        proxy: Some(ureq::Proxy::new(&proxy.url()).unwrap()),
        ..HttpOptions::default()
    };
    options
        .extra_roots
        .push(ureq::tls::Certificate::from_der(&cert.cert_der).to_owned());
    let agent = options.agent();
    let (a, b) = (plain.url("/"), tls.url("/"));
    let (plain_body, tls_body) = spawn(move || (body_of(&agent, &a), body_of(&agent, &b)))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(plain_body.unwrap().1, "plain via proxy");
    assert_eq!(tls_body.unwrap().1, "tls via proxy");
    assert_eq!(
        proxy.tunnels(),
        2,
        "the requests did not go through the proxy"
    );
}

#[test]
fn waits_shorter_than_a_millisecond_still_end() {
    one_worker();
    // may keeps such timeouts in whole milliseconds: under one, a raw wait never ends. The
    // test thread waits with a deadline of its own, so a regression fails instead of hanging.
    let (done, finished) = std::sync::mpsc::channel();
    spawn(move || {
        for micros in [1, 100, 658, 999] {
            assert!(!Shutdown::new().wait_timeout(Duration::from_micros(micros)));
            let (_tx, rx) = may::sync::mpsc::channel::<()>();
            let limit = corokit_common::wait_limit(Duration::from_micros(micros));
            assert!(rx.recv_timeout(limit).is_err());
        }
        let _ = done.send(());
    })
    .unwrap();
    assert!(
        finished.recv_timeout(Duration::from_secs(5)).is_ok(),
        "a sub-millisecond wait never ended"
    );
    assert_eq!(
        corokit_common::wait_limit(Duration::from_micros(1500)),
        Duration::from_millis(2)
    );
}
