//! What the end-to-end tests of fetch share: running the real binary in a temp dir with a
//! clean environment, deterministic file contents, and the state fetch keeps on files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use corokit_testkit::{Response, Server};

pub const LM: &str = "Sun, 22 Nov 2026 01:00:00 GMT";

/// The fetch binary with a clean environment (no proxies, no HOME) and no stdin.
pub fn fetch_bin() -> Command {
    corokit_common::init();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fetch"));
    cmd.env_clear().stdin(Stdio::null());
    cmd
}

pub struct Run {
    pub code: i32,
    pub stderr: String,
}

pub fn run_fetch(dir: &Path, list: &str, extra: &[&str]) -> Run {
    let list_path = dir.join("urls.txt");
    std::fs::write(&list_path, list).unwrap();
    let out: Output = fetch_bin()
        .arg(&list_path)
        .arg("-o")
        .arg(dir.join("out"))
        .args([
            "--retry-wait",
            "0.05",
            "--connect-timeout",
            "2",
            "--read-timeout",
            "5",
        ])
        .args(extra)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Deterministic content for file `i`, 1–16 KB.
pub fn content(i: usize) -> Vec<u8> {
    let len = 1024 + (i * 7919) % (15 * 1024);
    (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect()
}

pub fn files_server() -> Server {
    Server::start(|req| {
        let i: usize = req
            .path
            .trim_start_matches("/f/")
            .trim_end_matches(".bin")
            .parse()
            .unwrap_or(0);
        Response::file(req, &content(i), &format!("\"v{i}\""), LM).delay(Duration::from_millis(20))
    })
}

pub fn out(dir: &Path, name: &str) -> PathBuf {
    dir.join("out").join(name)
}

/// The resume state fetch keeps on a file.
pub fn get_state(path: &Path) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::getxattr(path, "user.corokit.fetch", &mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

pub fn set_state(path: &Path, value: &[u8]) {
    rustix::fs::setxattr(
        path,
        "user.corokit.fetch",
        value,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

pub fn report_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
