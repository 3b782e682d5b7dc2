//! The shared queue end to end: a real `redis-server` on a free loopback port (its own, in a
//! temp dir, stopped by the test), real fetch processes as workers, a local HTTP server.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corokit_testkit::Server;
use may::net::TcpStream;

mod support;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

/// A redis-server of our own; stopped on drop.
struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    fn start(persistent: bool) -> RedisServer {
        corokit_common::init();
        let dir = tempfile::tempdir().unwrap();
        let mut r = RedisServer {
            child: Command::new("true").spawn().unwrap(),
            port: free_port(),
            dir,
            persistent,
        };
        // The free port can be taken by another test before redis-server binds it: then it
        // exits, and another port is tried.
        for _ in 0..5 {
            if r.try_launch() {
                return r;
            }
            r.port = free_port();
        }
        panic!("redis-server did not start");
    }

    /// Starts redis-server again on its port (after `stop`).
    fn launch(&mut self) {
        assert!(self.try_launch(), "redis-server did not start again");
    }

    fn try_launch(&mut self) -> bool {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        self.child = cmd
            .spawn()
            .expect("redis-server is needed (Debian package redis-server; .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if matches!(self.child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                return false;
            }
            corokit_common::sleep(Duration::from_millis(20));
        }
        // Ours, not another program that has the port: it is still running.
        corokit_common::sleep(Duration::from_millis(50));
        matches!(self.child.try_wait(), Ok(None))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command (as words) and returns its reply as text, through redis-cli's
    /// protocol written by hand: the test needs no client of its own.
    fn cmd(&self, words: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!("*{}\r\n", words.len());
        for w in words {
            req.push_str(&format!("${}\r\n{w}\r\n", w.len()));
        }
        s.write_all(req.as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        read_reply(&mut r)
    }

    /// An integer reply; a nil reply is 0, and anything else (an error) fails the test.
    fn int(&self, words: &[&str]) -> i64 {
        let reply = self.cmd(words);
        match reply.trim() {
            "" => 0,
            n => n
                .parse()
                .unwrap_or_else(|_| panic!("{words:?} answered {reply:?}")),
        }
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RESP reply as text: integers and strings as they are, arrays one element per line.
fn read_reply(r: &mut impl BufRead) -> String {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let (kind, rest) = line.split_at(1);
    let rest = rest.trim_end();
    match kind {
        "+" | ":" | "-" => rest.to_string(),
        "$" => {
            let n: i64 = rest.parse().unwrap();
            if n < 0 {
                return String::new();
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n as usize]).into_owned()
        }
        "*" => {
            let n: i64 = rest.parse().unwrap();
            (0..n.max(0))
                .map(|_| read_reply(r))
                .collect::<Vec<_>>()
                .join("\n")
        }
        _ => panic!("unexpected reply {line:?}"),
    }
}

fn list_of(dir: &Path, server: &Server, n: usize) -> PathBuf {
    let list: String = (0..n)
        .map(|i| format!("{}\n", server.url(&format!("/f/{i}.bin"))))
        .collect();
    let path = dir.join("urls.txt");
    std::fs::write(&path, list).unwrap();
    path
}

fn queue(redis: &RedisServer, name: &str) -> Command {
    let mut cmd = fetch_bin();
    cmd.args(["--redis", &redis.url(), "--queue", name]);
    cmd
}

/// `fetch --enqueue LIST` into queue `name`, run to its end.
fn enqueue(redis: &RedisServer, name: &str, list: &Path) -> std::process::Output {
    queue(redis, name)
        .arg("--enqueue")
        .arg(list)
        .output()
        .unwrap()
}

fn worker(redis: &RedisServer, name: &str, out: &Path, extra: &[&str]) -> Child {
    queue(redis, name)
        .arg("-o")
        .arg(out)
        .args(["-q", "--retry-wait", "0.05", "--connect-timeout", "2"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to end (killing it after [`WAIT`]): its exit code and stderr.
fn finish(mut child: Child) -> (i32, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a fetch process did not end within {WAIT:?}");
        }
        corokit_common::sleep(Duration::from_millis(50));
    }
}

/// GET /metrics from a worker.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // may_minihttp keeps the connection open: read until the whole body is in.
    while !String::from_utf8_lossy(&got).contains("fetch_queue_lag") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the metrics connection closed");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn counts(redis: &RedisServer, name: &str) -> (i64, i64, i64) {
    let key = format!("fetch:{{{name}}}:counts");
    let f = |c: &str| redis.int(&["HGET", &key, c]);
    (f("ok"), f("failed"), f("dead"))
}

/// Every file of the list is in `out`, whole, and nothing else is.
fn check_files(out: &Path, n: usize) {
    for i in 0..n {
        let got =
            std::fs::read(out.join(format!("{i}.bin"))).unwrap_or_else(|e| panic!("{i}.bin: {e}"));
        assert!(got == content(i), "{i}.bin differs");
    }
    let names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".fetch"))
        .collect();
    assert_eq!(names.len(), n, "{names:?}");
}

#[test]
fn three_workers_one_killed_lose_nothing_and_record_each_entry_once() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(false);
    let server = files_server();
    let n = 300;
    let list = list_of(dir.path(), &server, n);
    // The first 50 URLs again: workers sharing the directory must not write one file at once.
    let mut text = std::fs::read_to_string(&list).unwrap();
    text.push_str(
        &text
            .lines()
            .take(50)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    );
    std::fs::write(&list, text).unwrap();
    let entries = n as i64 + 50;
    let out = enqueue(&redis, "crawl", &list);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let shared = dir.path().join("out");
    let args = ["-j", "4", "--claim-after", "1"];
    let mut victim = worker(&redis, "crawl", &shared, &args);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut watched = args.to_vec();
    watched.extend(["--metrics", &metrics]);
    let others = vec![
        worker(&redis, "crawl", &shared, &args),
        worker(&redis, "crawl", &shared, &watched),
    ];
    // Killed in the middle, holding entries.
    let deadline = Instant::now() + WAIT;
    while counts(&redis, "crawl").0 < 60 {
        assert!(Instant::now() < deadline, "nothing was done");
        corokit_common::sleep(Duration::from_millis(10));
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    let text = scrape(&metrics);
    let metric = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert!(metric("fetch_files_total{outcome=\"ok\"}") > 0, "{text}");
    // Present with a value (they are gauges: any value will do).
    metric("fetch_queue_lag");
    metric("fetch_active_downloads");
    for w in others {
        let (code, err) = finish(w);
        assert_eq!(code, 0, "{err}");
    }
    check_files(&shared, n);
    assert_eq!(counts(&redis, "crawl"), (entries, 0, 0));
    assert_eq!(redis.int(&["HLEN", "fetch:{crawl}:results"]), entries);
    assert_eq!(
        redis
            .cmd(&["XPENDING", "fetch:{crawl}:jobs", "fetch"])
            .lines()
            .next(),
        Some("0")
    );
    // Enqueueing the same list again adds nothing: it is continued, and it was whole.
    let again = enqueue(&redis, "crawl", &list);
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(
        said.contains("0 entries added") && said.contains("350 added before"),
        "{said}"
    );
    let status = queue(&redis, "crawl").arg("--status").output().unwrap();
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(
        said.contains("0 waiting, 0 in progress, 350 done, 0 failed, 0 dead"),
        "{said}"
    );
}

#[test]
fn poison_entries_go_to_the_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(false);
    let server = files_server();
    let jobs = "fetch:{p}:jobs";
    redis.cmd(&["XGROUP", "CREATE", jobs, "fetch", "0", "MKSTREAM"]);
    // Not fetch's: garbage, and a field missing.
    redis.cmd(&["XADD", jobs, "*", "entry", "{not json"]);
    redis.cmd(&["XADD", jobs, "*", "other", "x"]);
    // An entry whose workers kept dying: delivered five times, never acknowledged.
    let entry = format!(
        r#"{{"line":1,"urls":["{}"],"out":null,"dir":null,"checksum":null}}"#,
        server.url("/f/1.bin")
    );
    let id = redis.cmd(&["XADD", jobs, "*", "entry", &entry]);
    redis.cmd(&[
        "XREADGROUP",
        "GROUP",
        "fetch",
        "ghost",
        "COUNT",
        "3",
        "STREAMS",
        jobs,
        ">",
    ]);
    for _ in 0..4 {
        redis.cmd(&["XCLAIM", jobs, "fetch", "ghost", "0", &id]);
    }
    // A mirror fetch would never take from a list, and a dir= a thousand levels deep.
    let mirror = entry.replace(
        &format!(r#"["{}"]"#, server.url("/f/1.bin")),
        &format!(r#"["{}","file:///etc/passwd"]"#, server.url("/f/3.bin")),
    );
    redis.cmd(&["XADD", jobs, "*", "entry", &mirror]);
    let deep = entry.replace("/f/1.bin", "/f/4.bin").replace(
        r#""dir":null"#,
        &format!(r#""dir":"{}""#, "a/".repeat(1000)),
    );
    redis.cmd(&["XADD", jobs, "*", "entry", &deep]);
    // And a good one.
    let good = entry.replace("/f/1.bin", "/f/2.bin");
    redis.cmd(&["XADD", jobs, "*", "entry", &good]);
    let out = dir.path().join("out");
    let (code, err) = finish(worker(
        &redis,
        "p",
        &out,
        &["--claim-after", "1", "--max-deliveries", "5"],
    ));
    assert_eq!(code, 0, "{err}");
    assert_eq!(counts(&redis, "p"), (1, 0, 5));
    // The worker that buried them says so, and why.
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("moved to fetch:{p}:dead"))
        .collect();
    assert_eq!(said.len(), 5, "{err}");
    assert!(
        said.iter().any(|l| l.contains("delivered 5 times")),
        "{err}"
    );
    assert!(out.join("2.bin").exists());
    assert!(!out.join("1.bin").exists(), "a dead entry was downloaded");
    let dead = redis.cmd(&["XRANGE", "fetch:{p}:dead", "-", "+"]);
    assert!(dead.contains("not fetch's"), "{dead}");
    assert!(dead.contains("no entry field"), "{dead}");
    assert!(dead.contains("delivered 5 times"), "{dead}");
    assert!(dead.contains("a URL fetch does not take"), "{dead}");
    assert!(dead.contains("too long or too deep"), "{dead}");
    let status = queue(&redis, "p").arg("--status").output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("1 done, 0 failed, 5 dead"));
}

#[test]
fn a_worker_carries_on_when_redis_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(true);
    let server = files_server();
    let n = 120;
    let list = list_of(dir.path(), &server, n);
    let added = enqueue(&redis, "r", &list);
    assert_eq!(
        added.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let out = dir.path().join("out");
    let w = worker(&redis, "r", &out, &["-j", "2", "--claim-after", "2"]);
    let deadline = Instant::now() + WAIT;
    while counts(&redis, "r").0 < 20 {
        assert!(Instant::now() < deadline, "nothing was done");
        corokit_common::sleep(Duration::from_millis(10));
    }
    redis.stop();
    corokit_common::sleep(Duration::from_millis(700));
    redis.launch();
    let (code, err) = finish(w);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("lost Redis") && err.contains("is back"),
        "{err}"
    );
    check_files(&out, n);
    assert_eq!(counts(&redis, "r"), (n as i64, 0, 0));
    assert_eq!(redis.int(&["HLEN", "fetch:{r}:results"]), n as i64);
}

#[test]
fn bad_queues_and_addresses_are_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(false);
    redis.cmd(&["SET", "fetch:{s}:jobs", "someone else's"]);
    let nobody = format!("redis://127.0.0.1:{}", free_port());
    for (args, says) in [
        (
            vec!["--redis", &nobody, "--queue", "q", "--status"],
            "cannot reach Redis",
        ),
        (
            vec!["--redis", "http://x/", "--queue", "q", "--status"],
            "--redis",
        ),
        (
            vec![
                "--redis",
                "redis://:pw@127.0.0.1:1/x",
                "--queue",
                "q",
                "--status",
            ],
            "database",
        ),
        (
            vec!["--redis", &redis.url(), "--queue", "a b", "--status"],
            "--queue",
        ),
        (
            vec!["--redis", &redis.url(), "--queue", "s", "--status"],
            "exists in Redis as a string",
        ),
        (
            vec!["--redis", &redis.url(), "--queue", "s", "-o", "o"],
            "exists in Redis as a string",
        ),
        (vec!["--queue", "q", "--status"], "needs --redis"),
    ] {
        let out = fetch_bin()
            .current_dir(dir.path())
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("pw"), "{err}");
    }
    assert_eq!(redis.cmd(&["GET", "fetch:{s}:jobs"]), "someone else's");
}

#[test]
fn two_workers_given_one_url_at_once_leave_one_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(false);
    let body: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let served = body.clone();
    // Slow to answer, so both workers are inside the download together.
    let server = Server::start(move |req| {
        corokit_testkit::Response::file(req, &served, "\"big\"", LM)
            .delay(Duration::from_millis(500))
    });
    let list = dir.path().join("urls.txt");
    let url = server.url("/big.bin");
    std::fs::write(&list, format!("{url}\n{url}\n")).unwrap();
    let added = enqueue(&redis, "two", &list);
    assert_eq!(added.status.code(), Some(0));
    let shared = dir.path().join("out");
    let workers: Vec<Child> = (0..2)
        .map(|_| worker(&redis, "two", &shared, &["-j", "1", "--claim-after", "2"]))
        .collect();
    for w in workers {
        let (code, err) = finish(w);
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(counts(&redis, "two"), (2, 0, 0));
    assert!(std::fs::read(shared.join("big.bin")).unwrap() == body);
}

#[test]
fn a_live_worker_never_takes_back_an_entry_another_claimed_and_stops_on_sigterm_without_redis() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(false);
    let body: Vec<u8> = (0..2_000_000u32).map(|i| (i % 239) as u8).collect();
    // A slow answer: the worker holds its entry for a while.
    let server = Server::start(move |req| {
        corokit_testkit::Response::file(req, &body, "\"s\"", LM).fault(
            corokit_testkit::Fault::StallAfter(300_000, Duration::from_secs(5)),
        )
    });
    let list = dir.path().join("urls.txt");
    std::fs::write(&list, format!("{}\n", server.url("/slow.bin"))).unwrap();
    let added = enqueue(&redis, "s", &list);
    assert_eq!(added.status.code(), Some(0));
    let w = worker(
        &redis,
        "s",
        &dir.path().join("out"),
        &["--claim-after", "3"],
    );
    let jobs = "fetch:{s}:jobs";
    let deadline = Instant::now() + WAIT;
    let id = loop {
        let p = redis.cmd(&["XPENDING", jobs, "fetch", "-", "+", "1"]);
        if let Some(id) = p.lines().next().filter(|l| l.contains('-')) {
            break id.to_string();
        }
        assert!(Instant::now() < deadline, "the worker took nothing");
        corokit_common::sleep(Duration::from_millis(20));
    };
    // Another worker's claim (as after a partition): the renewals (every second) leave it.
    redis.cmd(&["XCLAIM", jobs, "fetch", "elsewhere", "0", &id, "JUSTID"]);
    corokit_common::sleep(Duration::from_millis(2500));
    let owner = redis.cmd(&["XPENDING", jobs, "fetch", "-", "+", "1"]);
    assert!(owner.contains("elsewhere"), "{owner}");
    // Redis goes away; SIGTERM still ends the worker, with 130.
    redis.stop();
    corokit_common::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-TERM", &w.id().to_string()])
        .status();
    let started = Instant::now();
    let (code, err) = finish(w);
    assert_eq!(code, 130, "{err}");
    // Within the download's own stall, not waiting for Redis forever.
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn something_that_is_not_redis_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let http = files_server();
    let url = format!("redis://{}", http.addr());
    for extra in [&["--status"][..], &["-o", "out"][..]] {
        let o = fetch_bin()
            .current_dir(dir.path())
            .args(["--redis", &url, "--queue", "q"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("does not answer as Redis"), "{err}");
    }
}

#[test]
fn an_enqueue_goes_on_from_where_it_stopped_only_with_the_same_list() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(false);
    let list = dir.path().join("urls.txt");
    let url = |i: usize| format!("http://127.0.0.1:9/f/{i}.bin\n");
    std::fs::write(&list, (0..3).map(url).collect::<String>()).unwrap();
    assert_eq!(enqueue(&redis, "e", &list).status.code(), Some(0));
    // The same list grown by a line: only that line is added.
    std::fs::write(&list, (0..4).map(url).collect::<String>()).unwrap();
    let o = enqueue(&redis, "e", &list);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("1 entries added") && said.contains("3 added before"),
        "{said}"
    );
    assert_eq!(redis.int(&["XLEN", "fetch:{e}:jobs"]), 4);
    // A list edited in what was added already: refused, nothing added.
    std::fs::write(&list, [url(0), url(9), url(2), url(3), url(4)].concat()).unwrap();
    let o = enqueue(&redis, "e", &list);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("changed since") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(redis.int(&["XLEN", "fetch:{e}:jobs"]), 4);
}

#[test]
fn status_writes_nothing_and_a_checksum_from_the_queue_is_checked_like_a_lists() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(false);
    // A mistyped name: an empty queue shown, nothing created (a download-only flag such as
    // --netrc without a file does not get in the way).
    let o = queue(&redis, "typo")
        .args(["--status", "--netrc"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(said.contains("0 waiting, 0 in progress, 0 done"), "{said}");
    assert_eq!(redis.int(&["EXISTS", "fetch:{typo}:jobs"]), 0);
    // A digest of the wrong length (a list line would be a bad line): dead, not downloaded.
    let jobs = "fetch:{c}:jobs";
    redis.cmd(&["XGROUP", "CREATE", jobs, "fetch", "0", "MKSTREAM"]);
    let entry =
        r#"{"line":1,"urls":["http://127.0.0.1:9/x"],"out":null,"dir":null,"checksum":"md5=00"}"#;
    redis.cmd(&["XADD", jobs, "*", "entry", entry]);
    let (code, err) = finish(worker(&redis, "c", &dir.path().join("out"), &[]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(counts(&redis, "c"), (0, 0, 1));
    assert!(redis
        .cmd(&["XRANGE", "fetch:{c}:dead", "-", "+"])
        .contains("not fetch's"));
}

/// The queue's URL from the environment is held to what `--redis` is: a list given beside
/// the queue is a usage error, not something ignored without a word.
#[test]
fn a_list_beside_a_queue_from_the_environment_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("urls.txt");
    std::fs::write(&list, "http://127.0.0.1:9/a\n").unwrap();
    let out = fetch_bin()
        .env("FETCH_REDIS", "redis://127.0.0.1:9")
        .args(["--queue", "q"])
        .arg(&list)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not taken with a queue"));
}

#[test]
fn an_entry_waiting_for_another_workers_file_holds_no_other_back() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(false);
    let server = files_server();
    let list = list_of(dir.path(), &server, 2);
    let added = enqueue(&redis, "held", &list);
    assert_eq!(added.status.code(), Some(0));
    // Another worker is writing the first entry's file (its lock, as fetch names it: the
    // queue, then a hash of dir, out and URL).
    let first = format!("\0\0{}", server.url("/f/0.bin"));
    let hash = ring::digest::digest(&ring::digest::SHA256, first.as_bytes());
    let key = format!(
        "fetch:{{held}}:file:{}",
        corokit_common::text::hex(&hash.as_ref()[..16])
    );
    assert_eq!(
        redis.cmd(&["SET", &key, "another-worker", "PX", "60000"]),
        "OK"
    );
    let out = dir.path().join("out");
    let w = worker(&redis, "held", &out, &["-j", "2"]);
    // The second entry is downloaded while the first waits for that worker.
    let deadline = Instant::now() + WAIT;
    while !out.join("1.bin").exists() {
        assert!(
            Instant::now() < deadline,
            "the second entry waited for the first one's file"
        );
        corokit_common::sleep(Duration::from_millis(50));
    }
    assert!(!out.join("0.bin").exists());
    redis.int(&["DEL", &key]);
    let (code, err) = finish(w);
    assert_eq!(code, 0, "{err}");
    check_files(&out, 2);
}
