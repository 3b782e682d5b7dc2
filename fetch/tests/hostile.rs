//! fetch against misbehaving servers and prepared directories: the file under its final name
//! is always complete and one version of the server's bytes, fetch touches nothing but its own
//! files, and what cannot heal is not retried. One test per misbehaviour.

use std::os::unix::fs::symlink;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use corokit_testkit::{Fault, Request, Response, Server};
use ring::digest;

mod support;
use support::*;

fn sha256_hex(bytes: &[u8]) -> String {
    digest::digest(&digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A server for one file of `old` bytes, cut after `cut` bytes on the first request; later
/// requests are answered by `then`.
fn cut_then(
    old: Vec<u8>,
    cut: usize,
    then: impl Fn(&Request) -> Response + Send + Sync + 'static,
) -> Server {
    let first = AtomicUsize::new(0);
    Server::start(move |req| {
        if first.fetch_add(1, Ordering::SeqCst) == 0 {
            Response::file(req, &old, "\"v1\"", LM).fault(Fault::DropAfter(cut))
        } else {
            then(req)
        }
    })
}

/// Runs once cut short, then again: the second run's result and the file.
fn resumed(server: &Server, extra: &[&str]) -> (Run, Option<Vec<u8>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let list = server.url("/f.bin\n");
    let first = run_fetch(dir.path(), &list, &["--retries", "0"]);
    assert_eq!(first.code, 1, "{}", first.stderr);
    assert!(out(dir.path(), "f.bin.part").exists());
    let second = run_fetch(dir.path(), &list, extra);
    let file = std::fs::read(out(dir.path(), "f.bin")).ok();
    (second, file, dir)
}

#[test]
fn a_206_of_another_version_is_never_spliced() {
    // The server (or a cache in front) ignores If-Range: the rest of the new version.
    let old = vec![b'o'; 100_000];
    let new = vec![b'n'; 100_000];
    let new2 = new.clone();
    let server = cut_then(old, 40_000, move |req| {
        let from: usize = req
            .header("Range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        if from == 0 {
            return Response::file(req, &new2, "\"v2\"", LM);
        }
        Response::new(206, new2[from..].to_vec())
            .header("Content-Range", format!("bytes {from}-99999/100000"))
            .header("ETag", "\"v2\"")
    });
    let (run, file, _dir) = resumed(&server, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(file.unwrap() == new, "two versions were spliced");
    assert!(run.stderr.contains("changed"), "{}", run.stderr);
}

#[test]
fn a_206_with_another_total_is_never_spliced() {
    // The file grew to 150,000 bytes; the server sends the range we asked for, up to the old
    // length: appended, it would make a file of the recorded length from two versions.
    let old = vec![b'o'; 100_000];
    let longer: Vec<u8> = vec![b'L'; 150_000];
    let body = longer.clone();
    let server = cut_then(old, 40_000, move |req| match req.header("Range") {
        Some(_) => Response::new(206, body[40_000..100_000].to_vec())
            .header("Content-Range", "bytes 40000-99999/150000")
            .header("ETag", "\"v1\""),
        None => Response::file(req, &body, "\"v1\"", LM),
    });
    let (run, file, _dir) = resumed(&server, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(file.unwrap() == longer, "spliced");
}

#[test]
fn a_206_to_a_request_for_the_whole_file_is_never_saved() {
    let server = Server::start(|_| {
        Response::new(206, vec![b'p'; 5000])
            .header("Content-Range", "bytes 0-4999/100000")
            .header("ETag", "\"v1\"")
    });
    let dir = tempfile::tempdir().unwrap();
    let run = run_fetch(dir.path(), &server.url("/f.bin\n"), &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(!out(dir.path(), "f.bin").exists());
    assert!(run.stderr.contains("part of the file"), "{}", run.stderr);
    assert_eq!(
        server.stats.requests(),
        1,
        "a broken answer was asked for again"
    );
}

#[test]
fn a_206_longer_than_asked_for_never_grows_the_partial_file() {
    // Whatever start is asked for, this server labels the whole file as the range from there.
    let whole: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let body = whole.clone();
    let server = cut_then(whole.clone(), 50_000, move |req| {
        match req
            .header("Range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
        {
            Some(start) => Response::new(206, body.clone())
                .header("Content-Range", format!("bytes {start}-99999/100000"))
                .header("ETag", "\"v1\""),
            None => Response::file(req, &body, "\"v1\"", LM),
        }
    });
    let (run, file, dir) = resumed(&server, &["--retries", "3"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(file.unwrap() == whole);
    assert!(!out(dir.path(), "f.bin.part").exists());
}

#[test]
fn a_planted_link_is_a_named_error_never_a_write() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    // A dangling link where the partial file goes.
    symlink(
        outside.path().join("planted"),
        out(dir.path(), "1.bin.part"),
    )
    .unwrap();
    let run = run_fetch(dir.path(), &server.url("/f/1.bin\n"), &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("symbolic link"), "{}", run.stderr);
    assert!(!outside.path().join("planted").exists());

    // After a complete download, a link planted at NAME.part pointing at a victim.
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let run = run_fetch(dir.path(), &server.url("/f/2.bin\n"), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    symlink(&victim, out(dir.path(), "2.bin.part")).unwrap();
    let run = run_fetch(dir.path(), &server.url("/f/2.bin\n"), &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // A linked subdirectory from dir= is not entered.
    symlink(outside.path(), dir.path().join("out").join("sub")).unwrap();
    let list = format!("{}  dir=sub\n", server.url("/f/3.bin\n"));
    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(!outside.path().join("3.bin").exists());
}

#[test]
fn content_disposition_names_are_reported_and_resumed_under_the_saved_name() {
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let b = body.clone();
    let first = AtomicUsize::new(0);
    let server = Server::start(move |req| {
        let rsp = Response::file(req, &b, "\"v1\"", LM)
            .header("Content-Disposition", "attachment; filename=\"report.pdf\"");
        if first.fetch_add(1, Ordering::SeqCst) == 0 {
            rsp.fault(Fault::DropAfter(70_000))
        } else {
            rsp
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let list = server.url("/download.php?id=7\n");
    let report = dir.path().join("report.jsonl");
    let cd = ["--content-disposition", "--retries", "0"];
    let first = run_fetch(dir.path(), &list, &cd);
    assert_eq!(first.code, 1, "{}", first.stderr);
    assert!(out(dir.path(), "report.pdf.part").exists());
    // The re-run continues the partial file under the server's name.
    let args = [
        "--content-disposition",
        "--report",
        report.to_str().unwrap(),
    ];
    let second = run_fetch(dir.path(), &list, &args);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(std::fs::read(out(dir.path(), "report.pdf")).unwrap() == body);
    let last = server.stats.log().pop().unwrap();
    assert_eq!(last.header("Range"), Some("bytes=70000-"), "not resumed");
    // The ok line and the report name the file that exists.
    let saved = out(dir.path(), "report.pdf");
    assert!(
        second.stderr.contains(&saved.display().to_string()),
        "{}",
        second.stderr
    );
    let line = &report_lines(&report)[0];
    assert_eq!(line["path"], saved.display().to_string());
    // And a third run downloads nothing.
    let requests = server.stats.requests();
    let third = run_fetch(dir.path(), &list, &["--content-disposition"]);
    assert!(
        third.stderr.contains("1 already complete"),
        "{}",
        third.stderr
    );
    assert_eq!(server.stats.requests(), requests);
}

#[test]
fn a_checksum_mismatch_tries_the_next_mirror_and_a_bad_complete_file_is_replaced() {
    let good = content(5);
    let bad = content(6);
    let (g, b) = (good.clone(), bad.clone());
    let server = Server::start(move |req| {
        let body = if req.path.starts_with("/bad") { &b } else { &g };
        Response::file(req, body, "\"x\"", LM)
    });
    let dir = tempfile::tempdir().unwrap();
    let list = format!(
        "{}\t{}\n  out=file.bin\n  checksum=sha-256={}\n",
        server.url("/bad/file.bin"),
        server.url("/good/file.bin"),
        sha256_hex(&good)
    );
    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(std::fs::read(out(dir.path(), "file.bin")).unwrap() == good);
    // A complete file that fails its checksum (bytes on disk went bad) is downloaded again.
    std::fs::write(out(dir.path(), "file.bin"), &bad).unwrap();
    let state = get_state(&out(dir.path(), "file.bin"));
    assert!(state.is_some(), "the state went with the write");
    let again = run_fetch(dir.path(), &list, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(std::fs::read(out(dir.path(), "file.bin")).unwrap() == good);
}

#[test]
fn the_whole_file_timeout_holds_across_retry_waits() {
    let server = Server::start(|_| Response::new(503, "busy").header("Retry-After", "30"));
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let run = run_fetch(dir.path(), &server.url("/f\n"), &["--timeout", "3"]);
    let took = started.elapsed();
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        run.stderr.contains("--timeout") && !run.stderr.contains("read timeout"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_same_url_many_times_is_one_download() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let line = server.url("/f/9.bin\n");
    let list: String = std::iter::repeat_n(line.as_str(), 20_000).collect();
    let report = dir.path().join("r.jsonl");
    let run = run_fetch(
        dir.path(),
        &list,
        &["-j", "64", "-q", "--report", report.to_str().unwrap()],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stderr.contains("FAILED"), "{}", run.stderr);
    assert_eq!(server.stats.requests(), 1);
    let lines = report_lines(&report);
    assert_eq!(lines.len(), 20_000);
    assert!(lines.iter().filter(|l| l["outcome"] == "ok").count() == 1);
    // Each waited for another line with the same URL (or found the file complete).
    assert!(lines
        .iter()
        .filter(|l| l["outcome"] == "skipped")
        .all(|l| { l["duplicate_of"].is_null() || l["duplicate_of"] != l["line"] }));
}

#[test]
fn redirects_that_cannot_be_followed_are_not_retried() {
    let heads: [(&str, &[u8]); 5] = [
        ("/none", b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n"),
        (
            "/ftp",
            b"HTTP/1.1 302 Found\r\nLocation: ftp://h/x\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "/file",
            b"HTTP/1.1 302 Found\r\nLocation: file:etc/passwd\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "/space",
            b"HTTP/1.1 302 Found\r\nLocation: /a b\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "/cr",
            b"HTTP/1.1 302 Found\r\nLocation: /a\rb\r\nContent-Length: 0\r\n\r\n",
        ),
    ];
    let server = Server::start(move |req| {
        let head = heads.iter().find(|(p, _)| *p == req.path).map_or(
            &b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"[..],
            |(_, h)| h,
        );
        Response::raw(head, Vec::new())
    });
    let dir = tempfile::tempdir().unwrap();
    let list: String = ["/none", "/ftp", "/file", "/space", "/cr"]
        .iter()
        .map(|p| server.url(p) + "\n")
        .collect();
    let started = Instant::now();
    let run = run_fetch(dir.path(), &list, &["--retry-wait", "1"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(server.stats.requests(), 5, "{}", run.stderr);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!run.stderr.contains("retrying"), "{}", run.stderr);
    assert!(run.stderr.matches("FAILED").count() == 5, "{}", run.stderr);
    assert!(!dir.path().join("etc").exists());
}

#[test]
fn an_invalid_header_is_a_usage_error_before_any_request() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    for bad in ["Bad Name: x", "Good: line\nbreak", ": empty"] {
        let run = run_fetch(dir.path(), &server.url("/f/1.bin\n"), &["-H", bad]);
        assert_eq!(run.code, 2, "{bad:?}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    }
    assert_eq!(server.stats.requests(), 0);
}

#[test]
fn a_kept_alive_connection_closed_while_idle_is_resent_at_once() {
    // Every second request on a connection finds it closed, as when a server's keep-alive
    // timeout fires as the request arrives.
    let server = Server::start(|req| {
        if req.on_connection > 1 {
            Response::ok(Vec::new()).fault(Fault::Close)
        } else {
            Response::ok(content(req.path.len()))
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let list: String = (0..20)
        .map(|i| server.url(&format!("/{i}/x{i}\n")))
        .collect();
    let run = run_fetch(dir.path(), &list, &["-j", "1", "--retries", "0"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stderr.contains("retrying"), "{}", run.stderr);
}

#[test]
fn server_text_is_escaped_and_passwords_never_shown() {
    let server = Server::start(|req| {
        match req.path.as_str() {
        "/odd" => Response::raw(
            "HTTP/1.1 302 Found\r\nLocation: ftp://evil\u{9b}31m\u{202e}/x\r\nContent-Length: 0\r\n\r\n"
                .as_bytes(),
            Vec::new(),
        ),
        "/big" => {
            let mut head = b"HTTP/1.1 200 OK\r\nX-Junk: ".to_vec();
            head.extend(std::iter::repeat_n(b'j', 100_000));
            head.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\n");
            Response::raw(&head, "ok")
        }
        _ => Response::new(401, "no"),
    }
    });
    let dir = tempfile::tempdir().unwrap();
    let addr = server.addr();
    let list = format!(
        "{}\n{}\nhttp://ann:s3cret@{addr}/private\n",
        server.url("/odd"),
        server.url("/big")
    );
    let report = dir.path().join("r.jsonl");
    let run = run_fetch(dir.path(), &list, &["--report", report.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("\\u{9b}") && run.stderr.contains("\\u{202e}"),
        "{}",
        run.stderr
    );
    assert!(corokit_common::text::is_safe(&run.stderr.replace('\n', "")));
    assert!(run.stderr.contains("header is larger"), "{}", run.stderr);
    let report_text = std::fs::read_to_string(&report).unwrap();
    for text in [&run.stderr, &report_text] {
        assert!(!text.contains("s3cret"), "{text}");
    }
    assert!(run.stderr.contains("ann:***@"), "{}", run.stderr);
}

#[test]
fn the_jobs_limit_is_checked_at_start_and_the_largest_allowed_works() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let list = server.url("/f/1.bin\n");
    let run = run_fetch(dir.path(), &list, &["-j", "100000"]);
    let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // fetch raises its open-files limit to the hard limit, and needs 5 per download.
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let files: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|hard| hard.parse().ok())
        .unwrap_or(u64::MAX);
    let by_maps = (max - 4096) / 2;
    let by_files = files.saturating_sub(64) / 5;
    if by_maps.min(by_files) < 100_000 {
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(
            run.stderr.contains("vm.max_map_count") || run.stderr.contains("ulimit -n"),
            "{}",
            run.stderr
        );
        assert_eq!(server.stats.requests(), 0);
    }
    // The most it allows starts every worker and finishes.
    let most = by_maps.min(by_files).min(100_000);
    let run = run_fetch(dir.path(), &list, &["-j", &most.to_string()]);
    assert_eq!(run.code, 0, "-j {most}: {}", run.stderr);
}

#[test]
fn a_huge_list_line_is_a_bad_line_read_in_flat_memory() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let mut child = fetch_bin()
        .arg("-")
        .arg("-o")
        .arg(dir.path().join("out"))
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let url = server.url("/f/1.bin\n");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let chunk = vec![b'a'; 1 << 20];
        stdin.write_all(b"http://h/").unwrap();
        for _ in 0..200 {
            stdin.write_all(&chunk).unwrap();
        }
        stdin.write_all(b"\n").unwrap();
        stdin.write_all(url.as_bytes()).unwrap();
    });
    let mut peak = 0;
    while !writer.is_finished() {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let rss: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                .unwrap_or(0);
            peak = peak.max(rss);
        }
        corokit_common::sleep(Duration::from_millis(20));
    }
    writer.join().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 1") && stderr.contains("longer"),
        "{stderr}"
    );
    assert!(peak < 64 * 1024, "{peak} KiB for a 200 MB line");
    assert!(
        dir.path().join("out/1.bin").exists(),
        "the next line was skipped"
    );
}

#[test]
fn a_semicolon_in_a_quoted_file_name_is_kept_and_partial_bytes_are_reported() {
    let server = Server::start(|req| match req.path.as_str() {
        "/cd" => {
            Response::ok("x").header("Content-Disposition", "attachment; filename=\"a;b.pdf\"")
        }
        _ => Response::file(req, &vec![1u8; 100_000], "\"e\"", LM).fault(Fault::DropAfter(30_000)),
    });
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.jsonl");
    let list = format!("{}\n{}\n", server.url("/cd"), server.url("/cut.bin"));
    let run = run_fetch(
        dir.path(),
        &list,
        &[
            "--content-disposition",
            "--retries",
            "0",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(out(dir.path(), "a;b.pdf").exists());
    let lines = report_lines(&report);
    let cut = lines.iter().find(|l| l["outcome"] == "failed").unwrap();
    assert_eq!(cut["bytes"], 30_000, "{cut}");
}

#[test]
fn headers_never_follow_a_redirect_to_another_host() {
    let elsewhere = Server::start(|_| Response::ok(b"stolen?".to_vec()));
    let target = elsewhere.url("/collect");
    let server = Server::start(move |req| match req.path.as_str() {
        "/away" => Response::redirect(302, &target),
        "/here" => Response::redirect(302, "/f"),
        _ => Response::ok(b"home".to_vec()),
    });
    let dir = tempfile::tempdir().unwrap();
    let list = format!("{}\n{}\n", server.url("/away"), server.url("/here"));
    let run = run_fetch(
        dir.path(),
        &list,
        &[
            "-H",
            "Authorization: Bearer SECRET-TOKEN",
            "-H",
            "Cookie: session=SECRET",
            "-H",
            "X-Api-Key: SECRET-KEY",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let seen = elsewhere.stats.log();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("Authorization"),
        None,
        "the token went to another host"
    );
    assert_eq!(
        seen[0].header("Cookie"),
        None,
        "the cookie went to another host"
    );
    assert_eq!(
        seen[0].header("X-Api-Key"),
        None,
        "the API key went to another host"
    );
    // The same host after a redirect is still the host the user named.
    let home = server.stats.log();
    let followed = home.iter().find(|r| r.path == "/f").unwrap();
    assert_eq!(followed.header("X-Api-Key"), Some("SECRET-KEY"));
    assert_eq!(
        followed.header("Authorization"),
        Some("Bearer SECRET-TOKEN")
    );
}

#[test]
fn a_bad_user_agent_is_a_usage_error_before_any_request() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let long = "u".repeat(8200);
    for agent in ["x\r\nX-Injected: 1", long.as_str()] {
        let run = run_fetch(
            dir.path(),
            &server.url("/f/1.bin\n"),
            &["--user-agent", agent],
        );
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(run.stderr.contains("--user-agent"), "{}", run.stderr);
    }
    assert_eq!(server.stats.requests(), 0);
}

#[test]
fn the_same_url_twice_with_content_disposition_is_one_download() {
    let server = Server::start(|_| {
        Response::ok(vec![b'r'; 50_000])
            .header("Content-Disposition", "attachment; filename=\"report.pdf\"")
            .delay(Duration::from_millis(200))
    });
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.jsonl");
    let url = server.url("/get");
    for jobs in ["1", "8"] {
        let list = format!("{url}\n{url}\n{url}\n");
        let run = run_fetch(
            dir.path(),
            &list,
            &[
                "--content-disposition",
                "-j",
                jobs,
                "--report",
                report.to_str().unwrap(),
            ],
        );
        assert_eq!(run.code, 0, "-j {jobs}: {}", run.stderr);
        assert!(!run.stderr.contains("clash"), "{}", run.stderr);
    }
    assert_eq!(server.stats.requests(), 1, "downloaded more than once");
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".fetch-names", "report.pdf"]);
    for line in report_lines(&report) {
        assert!(
            line["path"].as_str().unwrap().ends_with("report.pdf"),
            "{line}"
        );
    }
}

#[test]
fn a_malformed_chunked_body_is_not_retried() {
    let server = Server::start(|_| {
        Response::raw(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"5\r\nhello\r\nzz\r\nbroken\r\n0\r\n\r\n".to_vec(),
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let run = run_fetch(dir.path(), &server.url("/f.bin\n"), &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(server.stats.requests(), 1, "{}", run.stderr);
    assert!(!out(dir.path(), "f.bin").exists());
}

#[test]
fn waiting_for_a_per_host_slot_is_not_the_files_time() {
    let server = Server::start(|req| {
        Response::file(req, &content(1), "\"v\"", LM).delay(Duration::from_millis(600))
    });
    let dir = tempfile::tempdir().unwrap();
    let list: String = (0..4).map(|i| server.url(&format!("/{i}.bin\n"))).collect();
    let run = run_fetch(dir.path(), &list, &["--per-host", "1", "--timeout", "1.5"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(server.stats.max_in_flight(), 1);
}

#[test]
fn long_urls_and_validators_work_and_too_long_a_request_says_so() {
    let etag = format!("\"{}\"", "e".repeat(5000));
    let body = vec![b'b'; 100_000];
    let tag = etag.clone();
    let server = Server::start(move |req| Response::file(req, &body, &tag, LM));
    let dir = tempfile::tempdir().unwrap();
    let long = format!("/{}.bin\n", "u".repeat(4200));
    let list = format!("{}{}", server.url("/etag.bin\n"), server.url(&long));
    for _ in 0..2 {
        let run = run_fetch(dir.path(), &list, &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    let names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "orphans or renumbered copies: {names:?}");
    assert_eq!(
        server.stats.requests(),
        2,
        "downloaded again on the second run"
    );
    // A request head that cannot be sent fails at once, blaming the request, not the server.
    let huge = server.url(&format!("/{}.bin\n", "u".repeat(9000)));
    let run = run_fetch(dir.path(), &huge, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("KiB fetch sends"), "{}", run.stderr);
    assert_eq!(server.stats.requests(), 2);
    // A redirect to such a URL ends that mirror; the next one is tried.
    let target = server.url(&format!("/{}.bin", "v".repeat(9000)));
    let redirecting = Server::start(move |_| Response::redirect(302, &target));
    let list = format!("{}\t{}\n", redirecting.url("/m.bin"), server.url("/m.bin"));
    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(out(dir.path(), "m.bin").exists());
}

#[test]
fn the_open_files_limit_is_checked_at_start() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("urls.txt");
    std::fs::write(&list, server.url("/f/1.bin\n")).unwrap();
    let run = |jobs: &str| {
        let script = format!(
            "ulimit -n 256 && exec {} {} -o {} -j {jobs} --per-host 0",
            env!("CARGO_BIN_EXE_fetch"),
            list.display(),
            dir.path().join("out").display()
        );
        std::process::Command::new("sh")
            .env_clear()
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let too_many = run("400");
    assert_eq!(too_many.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&too_many.stderr).contains("ulimit -n"));
    assert_eq!(server.stats.requests(), 0);
    let fits = run("30");
    assert_eq!(
        fits.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fits.stderr)
    );
}

/// The key `.fetch-names` files a URL under.
fn url_hash(url: &str) -> String {
    sha256_hex(url.as_bytes())[..24].to_string()
}

#[test]
fn names_remembered_in_the_directory_never_lead_outside_it() {
    let server = Server::start(|_| {
        Response::ok(vec![b'x'; 1000])
            .header("Content-Disposition", "attachment; filename=\"cd.bin\"")
    });
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    symlink(outside.path(), out(dir.path(), "link")).unwrap();
    let urls = [server.url("/a"), server.url("/b"), server.url("/c")];
    let planted = [
        "../escaped".to_string(),
        outside.path().join("absolute").display().to_string(),
        "link/through".to_string(),
    ];
    let names: String = urls
        .iter()
        .zip(&planted)
        .map(|(u, n)| format!("{} {n}\n", url_hash(u)))
        .collect();
    std::fs::write(out(dir.path(), ".fetch-names"), names).unwrap();
    let list: String = urls.iter().map(|u| format!("{u}\n")).collect();
    for extra in [&[][..], &["--content-disposition"][..]] {
        let run = run_fetch(dir.path(), &list, extra);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    assert!(!dir.path().join("escaped").exists());
}

#[test]
fn a_state_fetch_did_not_write_never_makes_a_file_its_own() {
    let body = vec![b's'; 100_000];
    let served = body.clone();
    let server = Server::start(move |req| Response::file(req, &served, "\"v\"", LM));
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let o = |name: &str| out(dir.path(), name);
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    // The user's own file, with a planted sidecar beside it.
    std::fs::write(o("f.bin"), b"mine").unwrap();
    std::fs::create_dir(o(".f.bin.fetch")).unwrap();
    // A hard link to a file outside, with a forged sidecar that names the URL.
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::hard_link(&victim, o("g.bin.part")).unwrap();
    let forged =
        |url: &str| format!(r#"{{"url":"{url}","etag":"\"v\"","length":100000,"complete":false}}"#);
    std::fs::write(o(".g.bin.part.fetch"), forged(&server.url("/g.bin"))).unwrap();
    // A hard link to another file outside, whose forged state travels with it as an xattr.
    let victim2 = outside.path().join("victim2");
    std::fs::write(&victim2, b"precious").unwrap();
    set_state(&victim2, forged(&server.url("/h.bin")).as_bytes());
    std::fs::hard_link(&victim2, o("h.bin.part")).unwrap();

    let list = ["/f.bin", "/g.bin", "/h.bin"]
        .map(|p| server.url(p) + "\n")
        .concat();
    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(std::fs::read(o("f.bin")).unwrap(), b"mine");
    assert!(std::fs::read(o("f.1.bin")).unwrap() == body);
    assert!(std::fs::read(o("g.1.bin")).unwrap() == body);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read(&victim2).unwrap(), b"precious");
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("hard links"), "{}", run.stderr);
}

#[test]
fn a_smaller_new_version_leaves_no_partial_file_behind() {
    let v2 = b"version two".to_vec();
    let served = v2.clone();
    let server = cut_then(vec![b'1'; 50_000], 20_000, move |req| {
        Response::file(req, &served, "\"v2\"", LM)
    });
    let dir = tempfile::tempdir().unwrap();
    let list = server.url("/f.bin\n");
    let run = run_fetch(dir.path(), &list, &["--retries", "1"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(out(dir.path(), "f.bin")).unwrap(), v2);
    assert!(
        !out(dir.path(), "f.bin.part").exists(),
        "the old partial file stayed"
    );
    let requests = server.stats.requests();
    let again = run_fetch(dir.path(), &list, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.contains("1 already complete"),
        "{}",
        again.stderr
    );
    assert_eq!(server.stats.requests(), requests);
}

#[test]
fn a_rerun_finds_a_numbered_file_whatever_the_order_of_the_list() {
    let server = Server::start(|req| match req.path.as_str() {
        "/a/f.bin" => Response::new(404, Vec::new()).delay(Duration::from_millis(300)),
        _ => Response::file(req, &content(2), "\"b\"", LM),
    });
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (server.url("/a/f.bin"), server.url("/b/f.bin"));
    let first = run_fetch(dir.path(), &format!("{a}\n{b}\n"), &["-j", "2"]);
    assert_eq!(first.code, 1, "{}", first.stderr);
    assert!(std::fs::read(out(dir.path(), "f.1.bin")).unwrap() == content(2));
    let second = run_fetch(dir.path(), &format!("{b}\n{a}\n"), &["-j", "1"]);
    assert_eq!(second.code, 1, "{}", second.stderr);
    let b_requests = server
        .stats
        .log()
        .iter()
        .filter(|r| r.path == "/b/f.bin")
        .count();
    assert_eq!(b_requests, 1, "b was downloaded again");
    assert!(!out(dir.path(), "f.bin").exists());
    assert!(!out(dir.path(), "f.2.bin").exists());
}

#[test]
fn names_follow_the_lists_order_whichever_download_runs_first() {
    // Sixty URLs with one name: line i gets the i-th name, on every run, however the
    // download coroutines are scheduled over the worker threads.
    let server = Server::start(|req| {
        let i: usize = req.path[2..].split('/').next().unwrap().parse().unwrap();
        Response::file(req, &content(i), "\"x\"", LM)
    });
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let list: String = (0..60)
            .map(|i| server.url(&format!("/d{i}/f.bin\n")))
            .collect();
        let run = run_fetch(dir.path(), &list, &["-j", "60", "--per-host", "0"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        for i in 0..60 {
            let name = match i {
                0 => "f.bin".to_string(),
                i => format!("f.{i}.bin"),
            };
            assert!(
                std::fs::read(out(dir.path(), &name)).unwrap() == content(i),
                "round {round}: {name} is not line {}'s",
                i + 1
            );
        }
    }
}

#[test]
#[ignore = "mounts a ramfs (a filesystem without xattrs): needs root"]
fn without_xattrs_the_state_lives_beside_its_file_and_moves_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mount = |args: &[&str]| std::process::Command::new("mount").args(args).status();
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    assert!(mount(&["-t", "ramfs", "ramfs", outdir.to_str().unwrap()])
        .unwrap()
        .success());
    let server = cut_then(vec![b'r'; 100_000], 30_000, |req| {
        Response::file(req, &vec![b'r'; 100_000], "\"v1\"", LM)
    });
    let list = server.url("/f.bin\n");
    let first = run_fetch(dir.path(), &list, &["--retries", "0"]);
    assert_eq!(first.code, 1, "{}", first.stderr);
    assert!(out(dir.path(), ".f.bin.part.fetch").exists());
    let second = run_fetch(dir.path(), &list, &[]);
    let third = run_fetch(dir.path(), &list, &[]);
    let names: Vec<String> = std::fs::read_dir(&outdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let _ = std::process::Command::new("umount").arg(&outdir).status();
    assert_eq!(second.code, 0, "{}", second.stderr);
    let ranges = server
        .stats
        .log()
        .iter()
        .filter(|r| r.header("Range").is_some())
        .count();
    assert_eq!(ranges, 1, "not resumed");
    assert!(
        third.stderr.contains("1 already complete"),
        "{}",
        third.stderr
    );
    let mut names = names;
    names.sort();
    assert_eq!(names, [".f.bin.fetch", "f.bin"]);
}

#[test]
fn a_cut_name_never_lands_on_another_downloads_partial_file() {
    // One name, cut to 200 bytes, would end in `.part`: the partial file of the other.
    let stem = "a".repeat(195);
    let (one, two) = (vec![b'1'; 300_000], vec![b'2'; 300_000]);
    let (o, t) = (one.clone(), two.clone());
    let server = Server::start(move |req| {
        let body = if req.path.contains(".part") { &t } else { &o };
        Response::file(req, body, "\"v\"", LM).delay(Duration::from_millis(100))
    });
    let dir = tempfile::tempdir().unwrap();
    let list = format!(
        "{}\n{}\n",
        server.url(&format!("/{stem}")),
        server.url(&format!("/{stem}.part{}", "x".repeat(20)))
    );
    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    let names: Vec<&String> = files.iter().map(|f| &f.0).collect();
    assert_eq!(files.len(), 2, "{names:?}");
    assert!(
        names.iter().all(|name| !name.ends_with(".part")),
        "{names:?}"
    );
    assert!(files.iter().any(|(_, b)| *b == one) && files.iter().any(|(_, b)| *b == two));
}

#[test]
fn a_users_file_beside_fetchs_own_is_never_replaced_or_removed() {
    let server = Server::start(|req| Response::file(req, &vec![b's'; 100_000], "\"v\"", LM));
    let dir = tempfile::tempdir().unwrap();
    let o = |name: &str| out(dir.path(), name);
    let list = format!("{}{}", server.url("/f.bin\n"), server.url("/g.bin\n"));
    assert_eq!(run_fetch(dir.path(), &list, &[]).code, 0);
    // f.bin: fetch's partial file, and the user's own complete one beside it.
    std::fs::rename(o("f.bin"), o("f.bin.part")).unwrap();
    std::fs::write(o("f.bin"), b"mine").unwrap();
    // g.bin: fetch's complete file (changed since, so it is fetched again), and a browser's
    // partial download of the same name beside it.
    std::fs::write(o("g.bin"), b"changed").unwrap();
    let done = format!("done 100000 {}", url_hash(&server.url("/g.bin")));
    set_state(&o("g.bin"), done.as_bytes());
    std::fs::write(o("g.bin.part"), b"the browser's").unwrap();
    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(o("f.bin")).unwrap(), b"mine");
    assert_eq!(std::fs::read(o("g.bin.part")).unwrap(), b"the browser's");
    assert_eq!(std::fs::read(o("f.1.bin")).unwrap().len(), 100_000);
    assert_eq!(std::fs::read(o("g.1.bin")).unwrap().len(), 100_000);
}

#[test]
fn a_huge_names_file_is_read_in_bounded_memory() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    // 2 GB with no newline, sparse: reading it whole would not fit under the limit below.
    let names = std::fs::File::create(out(dir.path(), ".fetch-names")).unwrap();
    names.set_len(2 << 30).unwrap();
    let list = dir.path().join("urls.txt");
    std::fs::write(&list, server.url("/f/1.bin\n")).unwrap();
    let script = format!(
        "ulimit -v 1000000 && exec {} {} -o {} -j 4",
        env!("CARGO_BIN_EXE_fetch"),
        list.display(),
        dir.path().join("out").display()
    );
    let run = std::process::Command::new("sh")
        .env_clear()
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    assert!(out(dir.path(), "1.bin").exists());
}

#[test]
fn copies_of_a_failing_url_fail_with_it_without_trying_again() {
    let server = Server::start(|_| Response::new(503, Vec::new()));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/down.bin");
    let list: String = (0..10).map(|_| format!("{url}\n")).collect();
    let run = run_fetch(dir.path(), &list, &["--retries", "2"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(server.stats.requests(), 3, "copies tried again");
    assert_eq!(run.stderr.matches("FAILED").count(), 10, "{}", run.stderr);
    assert_eq!(run.stderr.matches("as line 1").count(), 9, "{}", run.stderr);
}
