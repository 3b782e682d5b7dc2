//! `--split`: one file over several connections, against servers that limit each
//! connection, stall, change the file between segments, or do not serve ranges.

mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corokit_testkit::{Fault, Request, Response, Server};
use sha2::Digest;
use support::*;

fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|j| ((j * 7 + j / 251) as u8).wrapping_add(seed))
        .collect()
}

/// The `(first, last)` of every ranged request in `log`.
fn ranges(log: &[Request]) -> Vec<(u64, u64)> {
    log.iter()
        .filter_map(|r| {
            let (a, b) = r.header("Range")?.strip_prefix("bytes=")?.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

fn assert_disjoint(ranges: &[(u64, u64)]) {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    for w in sorted.windows(2) {
        assert!(w[0].1 < w[1].0, "ranges fetched twice: {sorted:?}");
    }
}

const MIB: usize = 1024 * 1024;

#[test]
fn a_split_download_uses_n_connections_and_fetches_each_range_once() {
    let data = body(2 * MIB, 1);
    let served = data.clone();
    let server =
        Server::start(move |req| Response::file(req, &served, "\"v1\"", LM).rate(1024 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let sum = corokit_common::text::hex(&sha2::Sha256::digest(&data));
    let list = format!("{}\n  checksum=sha-256={sum}\n", server.url("/big.bin"));
    let run = run_fetch(dir.path(), &list, &["--split", "4", "-k", "256K"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(std::fs::read(out(dir.path(), "big.bin")).unwrap() == data);
    assert!(!out(dir.path(), "big.bin.part").exists());
    // The finished file's state is a finished file's: no ranges left in it.
    assert!(get_state(&out(dir.path(), "big.bin"))
        .unwrap()
        .starts_with(b"done "));
    let log = server.stats.log();
    assert_eq!(server.stats.max_in_flight(), 4, "{log:?}");
    // One request for the whole file, whose first segment it fills, and the other
    // segments as ranges carrying the first answer's validator, none asked twice.
    assert!(log[0].header("Range").is_none());
    let asked = ranges(&log);
    assert!(asked.len() >= 3, "{asked:?}");
    assert!(asked.iter().all(|&(a, _)| a > 0));
    assert_disjoint(&asked);
    for r in log.iter().skip(1) {
        assert_eq!(r.header("If-Range"), Some("\"v1\""));
    }

    // A wrong checksum: the assembled file never gets its name.
    let dir = tempfile::tempdir().unwrap();
    let list = format!(
        "{}\n  checksum=sha-256={}\n",
        server.url("/big.bin"),
        "0".repeat(64)
    );
    let run = run_fetch(
        dir.path(),
        &list,
        &["--split", "4", "-k", "256K", "--retries", "0"],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("checksum"), "{}", run.stderr);
    assert!(!out(dir.path(), "big.bin").exists());
}

/// A weak ETag is no validator for ranges, and beside it a Last-Modified is none either
/// (RFC 9110 §13.1.5): the file comes whole over one connection, as a resume would start
/// over.
#[test]
fn a_weak_etag_is_never_split_even_beside_a_last_modified() {
    let data = body(2 * MIB, 5);
    let served = data.clone();
    let server = Server::start(move |req| {
        let mut rsp = Response::file(req, &served, "W/\"v1\"", LM).rate(1024 * 1024);
        if req.path == "/weak-only.bin" {
            rsp.headers.retain(|(name, _)| name != "Last-Modified");
        }
        rsp
    });
    for name in ["weak.bin", "weak-only.bin"] {
        assert_eq!(requests_for_split(&server, name, &data), 1, "{name}");
    }
}

/// Downloads `name` from `server` with `--split 4`, checks it arrived whole, and says how
/// many requests it took.
fn requests_for_split(server: &Server, name: &str, data: &[u8]) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let before = server.stats.requests();
    let list = format!("{}\n", server.url(&format!("/{name}")));
    let run = run_fetch(dir.path(), &list, &["--split", "4", "-k", "256K"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(std::fs::read(out(dir.path(), name)).unwrap() == data);
    server.stats.requests() - before
}

/// A Last-Modified less than a second before the answer's Date is no validator either (the
/// file may change again within that second): such a file comes over one connection.
#[test]
fn a_file_changed_within_the_answers_second_is_never_split() {
    let data = body(2 * MIB, 6);
    let served = data.clone();
    let server = Server::start(move |req| {
        let date = match req.path.as_str() {
            "/fresh.bin" => LM,
            _ => "Sun, 22 Nov 2026 02:00:00 GMT",
        };
        let mut rsp = Response::file(req, &served, "", LM)
            .rate(1024 * 1024)
            .header("Date", date);
        rsp.headers.retain(|(name, _)| name != "ETag");
        rsp
    });
    assert_eq!(requests_for_split(&server, "fresh.bin", &data), 1);
    let made = requests_for_split(&server, "settled.bin", &data);
    assert!(made > 1, "settled.bin: {made} request(s)");
}

#[test]
fn split_connections_are_counted_against_per_host() {
    let data = body(MIB, 2);
    let served = data.clone();
    // Each answer waits before it starts, so connections overlap at the server.
    let server = Server::start(move |req| {
        Response::file(req, &served, "\"v1\"", LM).delay(Duration::from_millis(100))
    });
    let dir = tempfile::tempdir().unwrap();
    let list = format!("{}\n{}\n", server.url("/a"), server.url("/b"));
    let run = run_fetch(
        dir.path(),
        &list,
        &["--split", "8", "-k", "64K", "--per-host", "3"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    for name in ["a", "b"] {
        assert!(std::fs::read(out(dir.path(), name)).unwrap() == data);
    }
    assert_eq!(server.stats.max_in_flight(), 3);
}

#[test]
fn a_server_without_ranges_or_validators_gets_one_connection() {
    let data = body(MIB, 3);
    let served = data.clone();
    let server = Server::start(move |req| match req.path.as_str() {
        // No Accept-Ranges.
        "/plain" => Response::ok(served.clone()).header("ETag", "\"p\""),
        // Ranges, but nothing to check a segment against.
        "/novalidator" => Response::ok(served.clone()).header("Accept-Ranges", "bytes"),
        // Says it serves ranges, and answers every request with the whole file.
        _ => Response::ok(served.clone())
            .header("Accept-Ranges", "bytes")
            .header("ETag", "\"l\""),
    });
    let dir = tempfile::tempdir().unwrap();
    let list = format!("{}\n{}\n", server.url("/plain"), server.url("/novalidator"));
    let run = run_fetch(dir.path(), &list, &["--split", "4", "-k", "64K"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for name in ["plain", "novalidator"] {
        assert!(std::fs::read(out(dir.path(), name)).unwrap() == data);
    }
    assert_eq!(server.stats.requests(), 2);
    assert!(ranges(&server.stats.log()).is_empty());
    // The liar: its whole-file answers to ranges start the download over, on one
    // connection, and it ends whole.
    let run = run_fetch(
        dir.path(),
        &server.url("/liar\n"),
        &["--split", "4", "-k", "64K"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(std::fs::read(out(dir.path(), "liar")).unwrap() == data);
    assert!(run.stderr.contains("starting over"), "{}", run.stderr);
}

/// The server changes the file as soon as the first request has been answered: the
/// segments asked for next are of another version. A server that honours If-Range sends
/// the whole new file; one that ignores it sends the new version's range. Either way the
/// download starts over and the file is one version, whole.
#[test]
fn a_file_changing_between_segments_is_started_over_never_spliced() {
    for honours_if_range in [true, false] {
        let old = body(MIB, 4);
        let new = body(MIB, 5);
        let (o, n) = (old.clone(), new.clone());
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        let server = Server::start(move |req| {
            let k = seen.fetch_add(1, Ordering::SeqCst);
            if k == 0 {
                return Response::file(req, &o, "\"old\"", LM).rate(2 * 1024 * 1024);
            }
            let mut req = req.clone();
            if !honours_if_range {
                req.headers
                    .retain(|(h, _)| !h.eq_ignore_ascii_case("If-Range"));
            }
            Response::file(&req, &n, "\"new\"", "Mon, 23 Nov 2026 01:00:00 GMT")
        });
        let dir = tempfile::tempdir().unwrap();
        let list = server.url("/doc.bin\n");
        let run = run_fetch(dir.path(), &list, &["--split", "4", "-k", "64K"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let got = std::fs::read(out(dir.path(), "doc.bin")).unwrap();
        assert!(got == new, "spliced (honours If-Range: {honours_if_range})");
        assert!(run.stderr.contains("starting over"), "{}", run.stderr);
    }
}

#[test]
fn a_split_download_killed_at_half_asks_only_for_the_missing_ranges() {
    let data = body(4 * MIB, 6);
    let served = data.clone();
    let slow = Arc::new(Mutex::new(true));
    let limited = slow.clone();
    let server = Server::start(move |req| {
        let rsp = Response::file(req, &served, "\"v1\"", LM);
        match *limited.lock().unwrap() {
            true => rsp.rate(256 * 1024),
            false => rsp,
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let list_path = dir.path().join("urls.txt");
    std::fs::write(&list_path, server.url("/half.bin\n")).unwrap();
    let mut child = fetch_bin()
        .arg(&list_path)
        .arg("-o")
        .arg(dir.path().join("out"))
        .args(["--split", "4", "-k", "256K"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the state records some ranges done.
    let part = out(dir.path(), "half.bin.part");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut recorded_enough = false;
    while !recorded_enough && Instant::now() < deadline {
        let recorded = get_state(&part)
            .and_then(|s| serde_json::from_slice::<serde_json::Value>(&s).ok())
            .and_then(|v| serde_json::from_value::<Vec<[u64; 2]>>(v["ranges"].clone()).ok())
            .unwrap_or_default();
        recorded_enough = recorded.iter().map(|r| r[1] - r[0]).sum::<u64>() >= MIB as u64;
        corokit_common::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(recorded_enough, "no ranges were recorded");
    // What the state records is on disk.
    let on_disk = std::fs::read(&part).unwrap();
    let recorded = get_state(&part).unwrap();
    let done_now: Vec<[u64; 2]> = serde_json::from_value(
        serde_json::from_slice::<serde_json::Value>(&recorded).unwrap()["ranges"].clone(),
    )
    .unwrap();
    for [a, b] in &done_now {
        assert!(on_disk[*a as usize..*b as usize] == data[*a as usize..*b as usize]);
    }
    assert!(!done_now.is_empty());

    *slow.lock().unwrap() = false;
    let before = server.stats.log().len();
    let run = run_fetch(
        dir.path(),
        &server.url("/half.bin\n"),
        &["--split", "4", "-k", "256K"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(std::fs::read(out(dir.path(), "half.bin")).unwrap() == data);
    let rerun = &server.stats.log()[before..];
    let asked = ranges(rerun);
    assert_eq!(
        asked.len(),
        rerun.len(),
        "a request without a range: {rerun:?}"
    );
    // (A free connection may take the far half of a range asked for: the ranges asked may
    // overlap there, but none starts twice at one byte, and none touches what was done.)
    let mut starts: Vec<u64> = asked.iter().map(|r| r.0).collect();
    starts.sort();
    starts.dedup();
    assert_eq!(starts.len(), asked.len(), "{asked:?}");
    for (a, b) in &asked {
        for [x, y] in &done_now {
            assert!(b < x || *a >= *y, "{a}-{b} was done already ({x}-{y})");
        }
    }
    assert!(rerun.iter().all(|r| r.header("If-Range") == Some("\"v1\"")));
}

/// One segment's connection goes silent: a free connection takes what it left, and the
/// file is done long before the silent one's read timeout.
#[test]
fn what_a_stalled_connection_left_is_taken_by_another() {
    let data = body(2 * MIB, 7);
    let served = data.clone();
    let stalled = Arc::new(AtomicUsize::new(0));
    let count = stalled.clone();
    let server = Server::start(move |req| {
        let rsp = Response::file(req, &served, "\"v1\"", LM).rate(4 * 1024 * 1024);
        let second = req
            .header("Range")
            .is_some_and(|r| r.starts_with(&format!("bytes={}-", MIB)));
        if second && count.fetch_add(1, Ordering::SeqCst) == 0 {
            return rsp.fault(Fault::StallAfter(64 * 1024, Duration::from_secs(120)));
        }
        rsp
    });
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let run = run_fetch(
        dir.path(),
        &server.url("/stall.bin\n"),
        &["--split", "2", "-k", "1M", "--read-timeout", "120"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(std::fs::read(out(dir.path(), "stall.bin")).unwrap() == data);
    assert_eq!(stalled.load(Ordering::SeqCst), 1);
    // Taken over from where the silent connection stopped, not asked for again.
    let asked = ranges(&server.stats.log());
    assert!(
        asked
            .iter()
            .any(|&(a, b)| a >= (MIB + 64 * 1024) as u64 && b == 2 * MIB as u64 - 1),
        "{asked:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(100));
}

/// A validator that cannot be kept whole in the state (an ETag over 1 KiB, or one whose
/// escaping would overflow the state as ranges are recorded): one connection, no restart.
#[test]
fn a_validator_the_state_cannot_keep_is_not_split_on() {
    let data = body(MIB, 8);
    let served = data.clone();
    let server = Server::start(move |req| {
        let (etag, lm) = match req.path.as_str() {
            "/long" => (format!("\"{}\"", "e".repeat(1100)), LM.to_string()),
            // Each kept, but escaped in the state they come to over 3 KiB.
            _ => (
                format!("\"{}\"", "\\".repeat(1000)),
                format!("{LM}{}", "\\".repeat(900)),
            ),
        };
        Response::file(req, &served, &etag, &lm)
    });
    let dir = tempfile::tempdir().unwrap();
    let list = format!("{}\n{}\n", server.url("/long"), server.url("/escaped"));
    let run = run_fetch(dir.path(), &list, &["--split", "4", "-k", "64K"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for name in ["long", "escaped"] {
        assert!(std::fs::read(out(dir.path(), name)).unwrap() == data);
    }
    assert_eq!(server.stats.requests(), 2);
    assert!(!run.stderr.contains("starting over"), "{}", run.stderr);
}

/// The first mirror's whole-file answer stalls and its ranges are gone (404): the next
/// mirror finishes the file, though the stalled connection is still open.
#[test]
fn a_split_download_goes_on_at_the_next_mirror() {
    let data = body(MIB, 9);
    let served = data.clone();
    let server = Server::start(move |req| {
        let rsp = Response::file(req, &served, "\"v1\"", LM);
        match (req.path.as_str(), req.header("Range")) {
            ("/a/f.bin", None) => rsp.fault(Fault::StallAfter(64 * 1024, Duration::from_secs(20))),
            ("/a/f.bin", Some(_)) => Response::new(404, Vec::new()),
            _ => rsp,
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let list = format!("{}\t{}\n", server.url("/a/f.bin"), server.url("/b/f.bin"));
    let run = run_fetch(
        dir.path(),
        &list,
        &["--split", "4", "-k", "64K", "--read-timeout", "60"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(std::fs::read(out(dir.path(), "f.bin")).unwrap() == data);
    assert!(!run.stderr.contains("another fetch"), "{}", run.stderr);
}

/// A connection left reading a stalled answer after its download ended keeps its
/// `--per-host` slot: the next download from the host gets no more connections than free.
#[test]
fn a_lingering_connection_keeps_its_per_host_slot() {
    let data = body(MIB, 10);
    let served = data.clone();
    let server = Server::start(move |req| {
        let rsp = Response::file(req, &served, "\"v1\"", LM);
        if req.path == "/first" && req.header("Range").is_none() {
            return rsp.fault(Fault::StallAfter(64 * 1024, Duration::from_secs(15)));
        }
        rsp.delay(Duration::from_millis(100))
    });
    let dir = tempfile::tempdir().unwrap();
    let list = format!("{}\n{}\n", server.url("/first"), server.url("/second"));
    let run = run_fetch(
        dir.path(),
        &list,
        &[
            "--split",
            "2",
            "-k",
            "64K",
            "--per-host",
            "2",
            "-j",
            "1",
            "--read-timeout",
            "60",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    for name in ["first", "second"] {
        assert!(std::fs::read(out(dir.path(), name)).unwrap() == data);
    }
    assert!(
        server.stats.max_in_flight() <= 2,
        "{}",
        server.stats.max_in_flight()
    );
}
