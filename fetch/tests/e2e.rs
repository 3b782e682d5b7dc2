//! `fetch` end to end: the real binary in a temp dir against local test servers.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corokit_testkit::{ConnectProxy, Fault, Request, Response, Server, TestCert};

mod support;
use support::*;

#[test]
fn many_files_at_once_arrive_byte_for_byte() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let list: String = (0..300)
        .map(|i| server.url(&format!("/f/{i}.bin\n")))
        .collect();
    let report = dir.path().join("report.jsonl");
    let run = run_fetch(
        dir.path(),
        &list,
        &[
            "-j",
            "64",
            "--per-host",
            "0",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    for i in 0..300 {
        let got = std::fs::read(out(dir.path(), &format!("{i}.bin"))).unwrap();
        assert!(got == content(i), "file {i} differs");
        assert!(!out(dir.path(), &format!("{i}.bin.part")).exists());
    }
    assert!(
        server.stats.max_in_flight() > 8,
        "downloads did not overlap"
    );
    let lines = report_lines(&report);
    assert_eq!(lines.len(), 300);
    assert!(lines
        .iter()
        .all(|l| l["outcome"] == "ok" && l["http_status"] == 200 && l["attempts"] == 1));
    assert!(run.stderr.contains("300 ok"), "{}", run.stderr);

    // A second run finds everything complete and downloads nothing.
    let before = server.stats.requests();
    let again = run_fetch(dir.path(), &list, &["-j", "64"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.contains("300 already complete"),
        "{}",
        again.stderr
    );
    assert_eq!(server.stats.requests(), before);
}

/// A server whose one file can be changed, cut short, or checked for what the client sent.
struct Changing {
    body: Mutex<(Vec<u8>, String)>,
    cut_at: Mutex<Option<usize>>,
}

fn changing_server(body: &[u8], etag: &str) -> (Server, Arc<Changing>) {
    let state = Arc::new(Changing {
        body: Mutex::new((body.to_vec(), etag.to_string())),
        cut_at: Mutex::new(None),
    });
    let s = state.clone();
    let server = Server::start(move |req: &Request| {
        let (body, etag) = s.body.lock().unwrap().clone();
        let rsp = Response::file(req, &body, &etag, LM);
        match s.cut_at.lock().unwrap().take() {
            Some(n) => rsp.fault(Fault::DropAfter(n)),
            None => rsp,
        }
    });
    (server, state)
}

#[test]
fn a_cut_download_resumes_with_if_range() {
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let (server, state) = changing_server(&body, "\"one\"");
    let dir = tempfile::tempdir().unwrap();
    let list = server.url("/data.bin\n");
    *state.cut_at.lock().unwrap() = Some(70_000);
    // No retries: the first run stops with a partial file.
    let first = run_fetch(dir.path(), &list, &["--retries", "0"]);
    assert_eq!(first.code, 1, "{}", first.stderr);
    assert!(first.stderr.contains("data.bin"), "{}", first.stderr);
    assert!(
        !out(dir.path(), "data.bin").exists(),
        "a truncated file got the final name"
    );
    let part = std::fs::metadata(out(dir.path(), "data.bin.part"))
        .unwrap()
        .len();
    assert!(part > 0 && part < 200_000, "{part}");

    let second = run_fetch(dir.path(), &list, &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(std::fs::read(out(dir.path(), "data.bin")).unwrap(), body);
    let last = server.stats.log().pop().unwrap();
    assert_eq!(
        last.header("Range"),
        Some(format!("bytes={part}-").as_str())
    );
    assert_eq!(last.header("If-Range"), Some("\"one\""));
    assert_eq!(last.header("Accept-Encoding"), Some("identity"));
}

#[test]
fn a_file_changed_on_the_server_is_downloaded_again_not_spliced() {
    let old: Vec<u8> = vec![b'o'; 100_000];
    let new: Vec<u8> = vec![b'n'; 120_000];
    let (server, state) = changing_server(&old, "\"old\"");
    let dir = tempfile::tempdir().unwrap();
    let list = server.url("/doc.txt\n");
    *state.cut_at.lock().unwrap() = Some(40_000);
    assert_eq!(run_fetch(dir.path(), &list, &["--retries", "0"]).code, 1);
    assert!(out(dir.path(), "doc.txt.part").exists());

    *state.body.lock().unwrap() = (new.clone(), "\"new\"".into());
    let second = run_fetch(dir.path(), &list, &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let got = std::fs::read(out(dir.path(), "doc.txt")).unwrap();
    assert!(
        got == new,
        "the result mixes two versions ({} bytes)",
        got.len()
    );
    assert!(second.stderr.contains("changed"), "{}", second.stderr);
}

#[test]
fn a_partial_file_that_was_already_whole_is_finished_on_416() {
    let body = vec![7u8; 5000];
    let (server, _) = changing_server(&body, "\"x\"");
    let dir = tempfile::tempdir().unwrap();
    let list = server.url("/whole.bin\n");
    assert_eq!(run_fetch(dir.path(), &list, &[]).code, 0);
    // Make it look as if the last run stopped after the last byte, before the rename.
    let done = out(dir.path(), "whole.bin");
    let part = out(dir.path(), "whole.bin.part");
    let recorded = get_state(&done).expect("the state is on the file");
    assert!(recorded.starts_with(b"done 5000 "), "{recorded:?}");
    let state = serde_json::json!({
        "url": list.trim(), "etag": "\"x\"", "length": 5000, "complete": false
    });
    std::fs::rename(&done, &part).unwrap();
    set_state(&part, state.to_string().as_bytes());

    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&done).unwrap(), body);
    assert_eq!(
        server.stats.log().pop().unwrap().header("Range"),
        Some("bytes=5000-")
    );
}

#[test]
fn missing_files_are_downloaded_again() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let list = format!("{}{}", server.url("/f/1.bin\n"), server.url("/f/2.bin\n"));
    assert_eq!(run_fetch(dir.path(), &list, &[]).code, 0);
    // Record says complete, file gone; and a partial whose .part is gone.
    std::fs::remove_file(out(dir.path(), "1.bin")).unwrap();
    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(out(dir.path(), "1.bin")).unwrap(), content(1));
    assert!(
        run.stderr.contains("1 ok, 1 already complete"),
        "{}",
        run.stderr
    );
}

#[test]
fn kill_9_mid_run_then_a_rerun_completes_every_file() {
    let server = Server::start(|req| {
        let i: usize = req.path.trim_start_matches("/slow/").parse().unwrap_or(0);
        let body: Vec<u8> = (0..300_000usize).map(|j| ((i + j) % 249) as u8).collect();
        // Slow bodies: the kill lands while many files are half written.
        Response::file(req, &body, &format!("\"s{i}\""), LM)
            .delay(Duration::from_millis(20 * (i as u64 % 5)))
    });
    let dir = tempfile::tempdir().unwrap();
    let list: String = (0..40)
        .map(|i| server.url(&format!("/slow/{i}\n")))
        .collect();
    std::fs::write(dir.path().join("urls.txt"), &list).unwrap();
    let mut child = fetch_bin()
        .arg(dir.path().join("urls.txt"))
        .args(["-o"])
        .arg(dir.path().join("out"))
        .args(["-j", "8", "--limit-rate", "4M"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let parts = std::fs::read_dir(dir.path().join("out"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
                    .count()
            })
            .unwrap_or(0);
        if parts >= 4 {
            break;
        }
        corokit_common::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let run = run_fetch(dir.path(), &list, &["-j", "16"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for i in 0..40usize {
        let want: Vec<u8> = (0..300_000usize).map(|j| ((i + j) % 249) as u8).collect();
        assert!(
            std::fs::read(out(dir.path(), &i.to_string())).unwrap() == want,
            "file {i}"
        );
    }
    let resumed = server
        .stats
        .log()
        .iter()
        .filter(|r| r.header("Range").is_some())
        .count();
    assert!(resumed > 0, "nothing was resumed after the kill");
}

#[test]
fn retries_honour_retry_after_and_do_not_retry_404() {
    let calls = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let c = calls.clone();
    let server = Server::start(move |req| {
        let n = {
            let mut calls = c.lock().unwrap();
            let n = calls.entry(req.path.clone()).or_default();
            *n += 1;
            *n
        };
        match (req.path.as_str(), n) {
            ("/busy", 1) => Response::new(429, "slow down").header("Retry-After", "1"),
            ("/flaky", 1 | 2) => Response::new(503, "oops"),
            ("/short", 1) => Response::ok(vec![1u8; 1000]).content_length(5000),
            ("/short", _) => Response::file(req, &[1u8; 5000], "\"s\"", LM),
            ("/gone", _) => Response::new(404, "no"),
            _ => Response::file(req, b"fine", "\"f\"", LM),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let list: String = ["/busy", "/flaky", "/short", "/gone"]
        .iter()
        .map(|p| server.url(p) + "\n")
        .collect();
    let report = dir.path().join("r.jsonl");
    let started = Instant::now();
    let run = run_fetch(dir.path(), &list, &["--report", report.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    let by_url: HashMap<String, serde_json::Value> = report_lines(&report)
        .into_iter()
        .map(|l| {
            (
                l["url"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
                l,
            )
        })
        .collect();
    assert_eq!(by_url["busy"]["outcome"], "ok");
    assert_eq!(by_url["busy"]["attempts"], 2);
    assert_eq!(by_url["flaky"]["attempts"], 3);
    assert_eq!(by_url["short"]["outcome"], "ok");
    assert_eq!(
        std::fs::read(out(dir.path(), "short")).unwrap(),
        vec![1u8; 5000]
    );
    assert_eq!(by_url["gone"]["outcome"], "failed");
    assert_eq!(by_url["gone"]["attempts"], 1);
    assert_eq!(by_url["gone"]["http_status"], 404);
    assert_eq!(calls.lock().unwrap()["/gone"], 1);
    assert!(
        run.stderr.contains("FAILED line 4")
            && run.stderr.contains("/gone")
            && run.stderr.contains("HTTP 404"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_per_host_limit_holds_at_the_server() {
    let server =
        Server::start(|req| Response::ok(req.path.clone()).delay(Duration::from_millis(50)));
    let dir = tempfile::tempdir().unwrap();
    let list: String = (0..40).map(|i| server.url(&format!("/p/{i}\n"))).collect();
    let run = run_fetch(dir.path(), &list, &["-j", "32", "--per-host", "3"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(server.stats.max_in_flight(), 3);
}

#[test]
fn same_names_are_numbered_and_hostile_names_stay_inside() {
    let server = Server::start(|req| Response::ok(format!("body of {}", req.path)));
    let dir = tempfile::tempdir().unwrap();
    let list = [
        "/a/f.bin",
        "/b/f.bin",
        "/%2e%2e%2f%2e%2e%2fescape.txt",
        "/x/..%2F..%2Fevil",
        "/%1b%5b2Jterm.txt",
        "/named?version=2",
    ]
    .iter()
    .map(|p| server.url(p) + "\n")
    .collect::<String>()
        + "  out=../../../tmp/out.txt\n";
    let run = run_fetch(dir.path(), &list, &["-j", "1"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(out(dir.path(), "f.bin")).unwrap(),
        "body of /a/f.bin"
    );
    assert_eq!(
        std::fs::read_to_string(out(dir.path(), "f.1.bin")).unwrap(),
        "body of /b/f.bin"
    );
    // Every file stayed in the output directory.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| !n.contains('/') && !n.contains('\x1b')),
        "{names:?}"
    );
    assert!(
        out(dir.path(), "_._.._.._tmp_out.txt").exists(),
        "{names:?}"
    );
    assert!(run.stderr.contains("not safe"), "{}", run.stderr);
    assert!(!run.stderr.contains('\x1b'), "{}", run.stderr);

    // A re-run skips both f.bin files instead of numbering them again.
    let again = run_fetch(dir.path(), &list, &["-j", "1"]);
    assert!(
        again.stderr.contains("6 already complete"),
        "{}",
        again.stderr
    );
    assert!(!out(dir.path(), "f.2.bin").exists());
}

#[test]
fn bad_lines_are_reported_and_the_rest_still_runs() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let list = format!(
        "# my list\nftp://example.invalid/x\n{}\nnot a url at all\n{}\n  colour=blue\n",
        server.url("/f/3.bin"),
        server.url("/f/4.bin")
    );
    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("line 2") && run.stderr.contains("only http and https"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("line 4"), "{}", run.stderr);
    assert!(
        run.stderr.contains("line 6") && run.stderr.contains("colour"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read(out(dir.path(), "3.bin")).unwrap(), content(3));
    assert_eq!(std::fs::read(out(dir.path(), "4.bin")).unwrap(), content(4));
}

#[test]
fn checksums_mirrors_and_options_from_the_list() {
    let server = files_server();
    let dead = {
        let l = may::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let digest = |b: &[u8]| -> String {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    };
    let list = format!(
        "http://{dead}/f/5.bin\t{}\n  out=five.bin\n  dir=sub/dir\n  checksum=sha-256={}\n{}\n  checksum=sha-256={}\n",
        server.url("/f/5.bin"),
        digest(&content(5)),
        server.url("/f/6.bin"),
        "0".repeat(64),
    );
    let report = dir.path().join("r.jsonl");
    let run = run_fetch(
        dir.path(),
        &list,
        &["--retries", "1", "--report", report.to_str().unwrap()],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        std::fs::read(out(dir.path(), "sub/dir/five.bin")).unwrap(),
        content(5)
    );
    assert!(
        !out(dir.path(), "6.bin").exists(),
        "a file failing its checksum got the final name"
    );
    assert!(run.stderr.contains("checksum mismatch"), "{}", run.stderr);
    let lines = report_lines(&report);
    let five = lines.iter().find(|l| l["line"] == 1).unwrap();
    assert_eq!(
        five["checksum"],
        format!("sha-256={}", digest(&content(5))).as_str()
    );
}

#[test]
fn https_with_a_private_ca() {
    let cert = TestCert::new();
    let server = Server::start_tls(&cert, |req| Response::file(req, b"over tls", "\"t\"", LM));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert.cert_pem).unwrap();
    let list = server.url("/secret.txt\n");
    let refused = run_fetch(dir.path(), &list, &["--retries", "0"]);
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.to_lowercase().contains("certificate"),
        "{}",
        refused.stderr
    );
    let run = run_fetch(dir.path(), &list, &["--ca-cert", ca.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        std::fs::read(out(dir.path(), "secret.txt")).unwrap(),
        b"over tls"
    );
}

#[test]
fn redirects_headers_and_a_stalled_server() {
    let server = Server::start(|req| match req.path.as_str() {
        "/old" => Response::redirect(302, "/new"),
        "/new" => Response::ok(format!("agent={}", req.header("X-Token").unwrap_or("none"))),
        _ => Response::ok(vec![0u8; 10_000]).fault(Fault::StallAfter(100, Duration::from_secs(30))),
    });
    let dir = tempfile::tempdir().unwrap();
    let list = format!("{}{}", server.url("/old\n"), server.url("/stall\n"));
    let started = Instant::now();
    let run = run_fetch(
        dir.path(),
        &list,
        &[
            "-H",
            "X-Token: t1",
            "--read-timeout",
            "0.5",
            "--retries",
            "1",
        ],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(out(dir.path(), "old")).unwrap(),
        "agent=t1"
    );
    assert!(
        run.stderr.contains("/stall") && run.stderr.contains("timed out"),
        "{}",
        run.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = fetch_bin()
        .arg(dir.path().join("nope.txt"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.txt"));
    let bad_rate = fetch_bin()
        .args(["-", "--limit-rate", "fast"])
        .output()
        .unwrap();
    assert_eq!(bad_rate.status.code(), Some(2));
    let help = fetch_bin().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit status"));
}

#[test]
fn the_list_can_come_from_stdin() {
    let server = files_server();
    let dir = tempfile::tempdir().unwrap();
    let mut child = fetch_bin()
        .args(["-", "-o"])
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", server.url("/f/8.bin")).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::read(dir.path().join("8.bin")).unwrap(), content(8));
}

#[test]
fn ctrl_c_stops_cleanly_and_keeps_partial_files() {
    // SIGINT, as Ctrl-C sends.
    stops_cleanly_on("-INT");
}

#[test]
fn sigterm_stops_cleanly_and_keeps_partial_files() {
    stops_cleanly_on("-TERM");
}

fn stops_cleanly_on(signal: &str) {
    use std::os::unix::process::CommandExt;
    let server = Server::start(|req| Response::file(req, &vec![3u8; 2_000_000], "\"big\"", LM));
    let dir = tempfile::tempdir().unwrap();
    let list: String = (0..4).map(|i| server.url(&format!("/big{i}\n"))).collect();
    std::fs::write(dir.path().join("urls.txt"), &list).unwrap();
    let mut fetch = fetch_bin();
    // As a terminal's user starts it. Run from a script's background job, the tests would
    // start fetch with SIGINT ignored, and fetch keeps an ignored signal ignored (on purpose:
    // such a job must outlive a Ctrl-C in the terminal), so the signal would do nothing.
    // SAFETY: signal() with SIG_DFL is async-signal-safe, as pre_exec requires.
    unsafe {
        fetch.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = fetch
        .arg(dir.path().join("urls.txt"))
        .arg("-o")
        .arg(dir.path().join("out"))
        .args(["--limit-rate", "1M"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !out(dir.path(), "big0.part").exists() {
        corokit_common::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    Command::new("kill").args([signal, &pid]).status().unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        out(dir.path(), "big0.part").exists(),
        "the partial file was not kept"
    );
    assert!(!out(dir.path(), "big0").exists());
    let run = run_fetch(dir.path(), &list, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        std::fs::read(out(dir.path(), "big0")).unwrap(),
        vec![3u8; 2_000_000]
    );
}

#[test]
fn a_background_job_keeps_the_signals_it_was_told_to_ignore() {
    let server =
        Server::start(|_req| Response::ok(vec![5u8; 1000]).delay(Duration::from_millis(300)));
    let dir = tempfile::tempdir().unwrap();
    let list: String = (0..4).map(|i| server.url(&format!("/bg{i}\n"))).collect();
    std::fs::write(dir.path().join("urls.txt"), &list).unwrap();
    // As a script's `fetch ... &` under `nohup`: SIGINT and SIGHUP ignored from the start.
    let child = Command::new("sh")
        .arg("-c")
        .arg("trap '' INT HUP; exec \"$0\" \"$1\" -o \"$2\"")
        .arg(env!("CARGO_BIN_EXE_fetch"))
        .arg(dir.path().join("urls.txt"))
        .arg(dir.path().join("out"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    corokit_common::sleep(Duration::from_millis(150));
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    for i in 0..4 {
        assert_eq!(
            std::fs::read(out(dir.path(), &format!("bg{i}"))).unwrap(),
            vec![5u8; 1000]
        );
    }
}

/// How far `pid` has read into its open file `path`, and its resident memory in KiB.
fn read_position_and_rss(pid: u32, path: &Path) -> Option<(Option<u64>, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    // No position when the whole list was read and closed.
    let mut pos = None;
    for fd in fds.filter_map(Result::ok) {
        if std::fs::read_link(fd.path()).ok().as_deref() == Some(path) {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .ok()?;
            pos = info
                .lines()
                .find_map(|l| l.strip_prefix("pos:"))
                .and_then(|p| p.trim().parse().ok());
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some((pos, rss))
}

#[test]
fn a_million_line_list_is_read_lazily_in_flat_memory() {
    let server = Server::start(|_| Response::ok("x").delay(Duration::from_millis(300)));
    let dir = tempfile::tempdir().unwrap();
    let measure = |lines: usize| -> (Option<u64>, u64, u64) {
        let list = dir.path().join(format!("list-{lines}.txt"));
        let mut text = String::with_capacity(lines * 40);
        for i in 0..lines {
            text.push_str(&server.url(&format!("/m/{i}\n")));
        }
        std::fs::write(&list, &text).unwrap();
        let list = list.canonicalize().unwrap();
        let mut child = fetch_bin()
            .arg(&list)
            .arg("-o")
            .arg(dir.path().join(format!("out-{lines}")))
            .args(["-j", "32", "--per-host", "0", "-q"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it settle into the steady state: 32 downloads in flight, queue full.
        corokit_common::sleep(Duration::from_millis(1500));
        let seen = read_position_and_rss(child.id(), &list);
        child.kill().unwrap();
        child.wait().unwrap();
        let (pos, rss) = seen.expect("fetch was running");
        (pos, rss, text.len() as u64)
    };
    let (_, small_rss, _) = measure(1_000);
    let (big_pos, big_rss, big_len) = measure(1_000_000);
    // Read-ahead is bounded (a buffer and a thousand lines), not the whole 30 MB list.
    let big_pos = big_pos.expect("fetch still had the long list open");
    assert!(
        big_pos < 1_000_000,
        "read {big_pos} of {big_len} bytes of the list ahead"
    );
    // The same memory, give or take allocator noise, for a list a thousand times longer.
    assert!(
        big_rss < small_rss + 16 * 1024,
        "RSS {big_rss} KiB for 1,000,000 lines vs {small_rss} KiB for 1,000"
    );
}

#[test]
fn content_disposition_names_files_safely_when_asked() {
    let offered = [
        "attachment; filename=\"report.pdf\"",
        "attachment; filename=a.txt; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf",
        "attachment; filename=\"../../escape.sh\"",
        "attachment; filename=\"report.pdf\"",
    ];
    let server = Server::start(move |req| {
        let i: usize = req.path.trim_start_matches("/get/").parse().unwrap_or(0);
        Response::ok(content(i)).header("Content-Disposition", offered[i % offered.len()])
    });
    let list: String = (0..4).map(|i| server.url(&format!("/get/{i}\n"))).collect();
    let names = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    // Without the flag the URL names the file.
    let plain = tempfile::tempdir().unwrap();
    assert_eq!(run_fetch(plain.path(), &list, &[]).code, 0);
    assert_eq!(names(plain.path()), ["0", "1", "2", "3"]);

    let dir = tempfile::tempdir().unwrap();
    let run = run_fetch(dir.path(), &list, &["--content-disposition"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // .fetch-names remembers which URL the server named what, for the next run.
    let want = [
        ".fetch-names",
        "_._.._escape.sh",
        "report.1.pdf",
        "report.pdf",
        "résumé.pdf",
    ];
    assert_eq!(names(dir.path()), want);
    let read = |name: &str| std::fs::read(out(dir.path(), name)).unwrap();
    assert!(read("résumé.pdf") == content(1));
    assert!(read("_._.._escape.sh") == content(2));
    // Two downloads offered report.pdf; whichever came second was numbered.
    let (first, second) = (read("report.pdf"), read("report.1.pdf"));
    assert!(
        (first == content(0) && second == content(3))
            || (first == content(3) && second == content(0)),
        "report.pdf and report.1.pdf are not the two downloads that offered the name"
    );
    assert!(run.stderr.contains("not safe"), "{}", run.stderr);
    assert!(!dir.path().join("escape.sh").exists());
    // A second run finds the same files again: nothing is downloaded twice or renumbered.
    let requests = server.stats.requests();
    let again = run_fetch(dir.path(), &list, &["--content-disposition"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(names(dir.path()), want);
    assert!(
        again.stderr.contains("0 ok, 4 already complete"),
        "{}",
        again.stderr
    );
    assert_eq!(server.stats.requests(), requests, "downloaded again");
}

#[test]
fn proxies_come_from_the_environment_and_no_proxy_is_honoured() {
    let server = files_server();
    let proxy = ConnectProxy::start();
    let dir = tempfile::tempdir().unwrap();
    let list = server.url("/f/7.bin\n");
    std::fs::write(dir.path().join("urls.txt"), &list).unwrap();
    let run = |out_dir: &str, no_proxy: &str| {
        let output = fetch_bin()
            .arg(dir.path().join("urls.txt"))
            .arg("-o")
            .arg(dir.path().join(out_dir))
            .env_remove("HTTP_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env("http_proxy", proxy.url())
            .env("NO_PROXY", no_proxy)
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(std::fs::read(dir.path().join(out_dir).join("7.bin")).unwrap() == content(7));
    };
    run("via-proxy", "");
    assert_eq!(
        proxy.tunnels(),
        1,
        "the download did not go through the proxy"
    );
    run("direct", "127.0.0.1");
    assert_eq!(proxy.tunnels(), 1, "NO_PROXY was not honoured");
}

#[test]
fn the_rate_limit_holds_for_small_files_too() {
    let server = Server::start(|_req| Response::ok(vec![1u8; 10_000]));
    let dir = tempfile::tempdir().unwrap();
    let list: String = (0..20).map(|i| server.url(&format!("/s{i}\n"))).collect();
    let started = Instant::now();
    let run = run_fetch(dir.path(), &list, &["-j", "20", "--limit-rate", "100K"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // 200 KB at 100 KB/s, less a tenth of a second of burst, cannot take under 1.5 s.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "took only {took:?}");
}

#[test]
fn a_list_that_cannot_be_read_to_the_end_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    // A directory opens, but reading it fails.
    let output = fetch_bin()
        .arg(dir.path())
        .arg("-o")
        .arg(dir.path().join("out"))
        .arg("-q")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("reading the list stopped"), "{stderr}");
}

#[test]
fn content_disposition_still_names_a_file_after_a_retry() {
    let tries = Arc::new(Mutex::new(0));
    let seen = tries.clone();
    let server = Server::start(move |_req| {
        let mut n = seen.lock().unwrap();
        *n += 1;
        if *n == 1 {
            Response::new(503, "busy")
        } else {
            Response::ok(content(5))
                .header("Content-Disposition", "attachment; filename=\"named.bin\"")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let run = run_fetch(
        dir.path(),
        &server.url("/get/5\n"),
        &["--content-disposition"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(*tries.lock().unwrap(), 2);
    assert!(std::fs::read(out(dir.path(), "named.bin")).unwrap() == content(5));
    assert!(!out(dir.path(), "5").exists());
}

#[test]
fn user_agent_redirect_limit_and_whole_file_timeout() {
    let server = Server::start(|req| match req.path.as_str() {
        "/ua" => Response::ok(req.header("User-Agent").unwrap_or("none").to_string()),
        p if p.starts_with("/hop/") => match p["/hop/".len()..].parse::<u32>().unwrap() {
            0 => Response::ok("arrived"),
            n => Response::redirect(302, &format!("/hop/{}", n - 1)),
        },
        _ => Response::ok(vec![0u8; 10_000]).fault(Fault::StallAfter(100, Duration::from_secs(30))),
    });
    let dir = tempfile::tempdir().unwrap();
    let list: String = ["/ua", "/hop/2", "/hop/3", "/stall"]
        .iter()
        .map(|p| server.url(p) + "\n")
        .collect();
    let started = Instant::now();
    // The stalled body is silent for 30 s and each read may wait 20: only --timeout ends it.
    let run = run_fetch(
        dir.path(),
        &list,
        &[
            "--user-agent",
            "probe/1.0",
            "--max-redirects",
            "2",
            "--timeout",
            "1",
            "--read-timeout",
            "20",
        ],
    );
    let took = started.elapsed();
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(out(dir.path(), "ua")).unwrap(),
        "probe/1.0"
    );
    assert_eq!(
        std::fs::read_to_string(out(dir.path(), "2")).unwrap(),
        "arrived"
    );
    assert!(!out(dir.path(), "3").exists());
    let line = |needle: &str| {
        run.stderr
            .lines()
            .find(|l| l.contains(needle) && !l.contains("retrying"))
            .unwrap_or_else(|| panic!("no line about {needle}:\n{}", run.stderr))
            .to_string()
    };
    assert!(
        line("/hop/3").contains("more than 2 redirects"),
        "{}",
        run.stderr
    );
    assert!(line("/stall").contains("took over"), "{}", run.stderr);
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // Without --user-agent, fetch names itself.
    let dir = tempfile::tempdir().unwrap();
    let run = run_fetch(dir.path(), &server.url("/ua\n"), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let agent = std::fs::read_to_string(out(dir.path(), "ua")).unwrap();
    assert!(agent.starts_with("corokit/"), "{agent}");
}

#[test]
fn urls_as_arguments_and_a_list_after_i() {
    let dir = tempfile::tempdir().unwrap();
    let server = files_server();
    let out = dir.path().join("out");
    let list = dir.path().join("more.txt");
    std::fs::write(&list, format!("{}\n", server.url("/f/3.bin"))).unwrap();
    let run = |args: &[&str]| {
        let o = fetch_bin()
            .args(args)
            .arg("-o")
            .arg(&out)
            .args(["-q", "--retries", "0"])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (a, b) = (server.url("/f/1.bin"), server.url("/f/2.bin"));
    assert_eq!(run(&[&a, &b]), (Some(0), String::new()));
    let (code, err) = run(&["-i", list.to_str().unwrap(), &a]);
    assert_eq!(code, Some(0), "{err}");
    for i in 1..=3 {
        assert_eq!(
            std::fs::read(out.join(format!("{i}.bin"))).unwrap(),
            content(i)
        );
    }
    // Not a URL beside URLs, a control character in one, a scheme fetch does not speak.
    let (code, err) = run(&[&a, "list.txt"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("is not a URL") && err.lines().count() == 1,
        "{err}"
    );
    let (code, err) = run(&[&format!("{a}\tftp://x/y")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("control character"), "{err}");
    let (code, err) = run(&["ftp://x/y"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("only http and https"), "{err}");
}

#[test]
fn every_checksum_algorithm_of_aria2_with_a_good_and_a_bad_sum() {
    use corokit_fetch::checksum::Algo;
    let dir = tempfile::tempdir().unwrap();
    let server = files_server();
    let url = server.url("/f/4.bin");
    for (k, algo) in Algo::ALL.into_iter().enumerate() {
        let mut h = algo.hasher();
        h.update(&content(4));
        let good = corokit_common::text::hex(&h.finish());
        let mut bad = good.clone().into_bytes();
        bad[0] = if bad[0] == b'0' { b'1' } else { b'0' };
        let bad = String::from_utf8(bad).unwrap();
        for (sum, code) in [(&bad, 1), (&good, 0)] {
            let out = dir.path().join(format!("out{k}"));
            let o = fetch_bin()
                .arg(&url)
                .arg("--checksum")
                .arg(format!("{}={sum}", algo.name()))
                .arg("-o")
                .arg(&out)
                .args(["-q", "--retries", "0"])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(code), "{} {sum}: {err}", algo.name());
            assert_eq!(out.join("4.bin").exists(), code == 0, "{}", algo.name());
        }
    }
    // A checksum with a list, or two URLs, or a wrong length: usage errors.
    for args in [
        vec![
            url.clone(),
            url.clone(),
            "--checksum".into(),
            "md5=00".into(),
        ],
        vec![url.clone(), "--checksum".into(), "md5=00".into()],
        vec![url.clone(), "--checksum".into(), "crc32=00000000".into()],
    ] {
        let o = fetch_bin()
            .args(&args)
            .arg("-o")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn remote_time_gives_files_the_servers_last_modified() {
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let server = corokit_testkit::Server::start(move |req| {
        let body = if req.path == "/big.bin" {
            big.clone()
        } else {
            content(1)
        };
        corokit_testkit::Response::file(req, &body, "\"v\"", LM)
    });
    let want = httpdate::parse_http_date(LM).unwrap();
    for (args, server_time) in [(&["-R"][..], true), (&[][..], false)] {
        let out = dir.path().join(format!("out{server_time}"));
        let o = fetch_bin()
            .arg(server.url("/small.bin"))
            .arg(server.url("/big.bin"))
            .args(args)
            .arg("-o")
            .arg(&out)
            .arg("-q")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0));
        for name in ["small.bin", "big.bin"] {
            let mtime = std::fs::metadata(out.join(name))
                .unwrap()
                .modified()
                .unwrap();
            assert_eq!(mtime == want, server_time, "{name} {args:?}");
        }
    }
}

#[test]
fn timestamping_fetches_a_complete_file_again_only_when_the_server_has_a_newer_one() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let version = Arc::new(AtomicUsize::new(1));
    let asked: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let (v, a) = (version.clone(), asked.clone());
    let server = corokit_testkit::Server::start(move |req| {
        let n = v.load(Ordering::SeqCst);
        // Version 1 is old; version 2 is newer than any copy made by this test.
        let lm = if n == 1 {
            httpdate::parse_http_date(LM).unwrap()
        } else {
            std::time::SystemTime::now() + Duration::from_secs(86_400)
        };
        let ims = req.header("If-Modified-Since").map(str::to_string);
        a.lock().unwrap().push(ims.clone());
        if let Some(since) = ims.and_then(|s| httpdate::parse_http_date(&s).ok()) {
            if lm <= since {
                return corokit_testkit::Response::new(304, Vec::new());
            }
        }
        corokit_testkit::Response::file(
            req,
            &content(n),
            &format!("\"v{n}\""),
            &httpdate::fmt_http_date(lm),
        )
    });
    let url = server.url("/t.bin");
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        let o = fetch_bin()
            .arg(&url)
            .args(extra)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(run(&[]).0, Some(0));
    // Without -N a complete file is not asked for at all.
    assert_eq!(run(&[]).0, Some(0));
    assert_eq!(asked.lock().unwrap().len(), 1);
    // With -N: asked with the file's time, 304, kept.
    let (code, err) = run(&["-N"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("already complete") || err.contains("1 already complete"),
        "{err}"
    );
    assert!(asked.lock().unwrap()[1].is_some());
    assert_eq!(std::fs::read(out.join("t.bin")).unwrap(), content(1));
    // A newer copy on the server: downloaded and put in place whole.
    version.store(2, Ordering::SeqCst);
    let (code, err) = run(&["-N"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read(out.join("t.bin")).unwrap(), content(2));
    assert!(!out.join("t.bin.part").exists());
}

#[test]
fn logins_go_to_the_list_urls_host_only_and_never_show() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    // Another origin, which a redirect names: it must never see the login.
    let seen_elsewhere: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let seen = seen_elsewhere.clone();
    let other = corokit_testkit::Server::start(move |req| {
        seen.lock()
            .unwrap()
            .push(req.header("Authorization").map(str::to_string));
        corokit_testkit::Response::file(req, &content(7), "\"o\"", LM)
    });
    let away = other.url("/away.bin");
    let server = corokit_testkit::Server::start(move |req| {
        // user:s3cret
        if req.header("Authorization") != Some("Basic dXNlcjpzM2NyZXQ=") {
            return corokit_testkit::Response::new(401, "who are you?");
        }
        if req.path == "/moved.bin" {
            return corokit_testkit::Response::redirect(302, &away);
        }
        corokit_testkit::Response::file(req, &content(6), "\"s\"", LM)
    });
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(
        home.join(".netrc"),
        "machine other.example login nobody password x\nmachine 127.0.0.1 login user password s3cret\n",
    )
    .unwrap();
    let run = |login: &[&str], k: usize| {
        let o = fetch_bin()
            .env("HOME", &home)
            .arg(server.url("/secret.bin"))
            .arg(server.url("/moved.bin"))
            .args(login)
            .arg("-o")
            .arg(dir.path().join(format!("out{k}")))
            .args(["--retries", "0"])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    for (k, login) in [
        vec!["--user", "user:s3cret"],
        vec!["--user", "user", "--password", "s3cret"],
        vec!["--netrc"],
    ]
    .iter()
    .enumerate()
    {
        let (code, err) = run(login, k);
        assert_eq!(code, Some(0), "{login:?}: {err}");
        assert!(!err.contains("s3cret"), "{err}");
        let out = dir.path().join(format!("out{k}"));
        assert_eq!(std::fs::read(out.join("secret.bin")).unwrap(), content(6));
        assert_eq!(std::fs::read(out.join("moved.bin")).unwrap(), content(7));
    }
    assert!(seen_elsewhere.lock().unwrap().iter().all(Option::is_none));
    // Without a login: 401, and a wrong one is not retried forever.
    let (code, _) = run(&[], 9);
    assert_eq!(code, Some(1));
    let (code, err) = run(&["--password", "x"], 10);
    assert_eq!(code, Some(2), "{err}");
    let long = format!("user:{}", "p".repeat(3000));
    let (code, err) = run(&["--user", &long], 11);
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("ppp"), "{err}");
}

#[test]
fn two_fetches_never_write_one_partial_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    let served = body.clone();
    // Each answer sends 600 kB and stalls: the first fetch holds its .part meanwhile, with
    // its first 256 KiB blocks written.
    let server = corokit_testkit::Server::start(move |req| {
        corokit_testkit::Response::file(req, &served, "\"b\"", LM).fault(
            corokit_testkit::Fault::StallAfter(600_000, Duration::from_millis(1500)),
        )
    });
    let url = server.url("/b.bin");
    let out = dir.path().join("out");
    let fetch = || {
        let mut c = fetch_bin();
        c.arg(&url)
            .arg("-o")
            .arg(&out)
            .args(["-q", "--retry-wait", "0.05", "--read-timeout", "5"]);
        c
    };
    let mut first = fetch().spawn().unwrap();
    let part = out.join("b.bin.part");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 262_144 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first fetch never wrote"
        );
        corokit_common::sleep(Duration::from_millis(10));
    }
    let second = fetch().output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("being written by another fetch"), "{err}");
    assert_eq!(first.wait().unwrap().code(), Some(0));
    assert!(std::fs::read(out.join("b.bin")).unwrap() == body);
}

/// Keep-alive: a connection that finished one download carries the next, also when many
/// downloads at once share the client in shards, and after its buffers were given back: no
/// more connections are made than downloads run at once.
#[test]
fn kept_alive_connections_carry_many_downloads() {
    for (jobs, urls) in [(8usize, 200usize), (192, 800)] {
        let server = files_server();
        let dir = tempfile::tempdir().unwrap();
        let list: String = (0..urls)
            .map(|i| server.url(&format!("/f/{i}.bin\n")))
            .collect();
        let run = run_fetch(
            dir.path(),
            &list,
            &["-j", &jobs.to_string(), "--per-host", "0"],
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
        for i in [0, urls / 2, urls - 1] {
            assert_eq!(
                std::fs::read(out(dir.path(), &format!("{i}.bin"))).unwrap(),
                content(i)
            );
        }
        let opened = server.stats.connections();
        assert!(
            opened <= jobs,
            "{opened} connections for {urls} downloads at -j {jobs}"
        );
    }
}
