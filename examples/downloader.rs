//! The concurrent downloader in miniature: a local may_minihttp server answers each request
//! after 100 ms, and 64 downloads run as coroutines through the may-aware agent, 16 at a
//! time. They take about 64 / 16 × 100 ms, not 64 × 100 ms.
//!
//! `cargo run --release --example downloader`

use std::io;
use std::time::{Duration, Instant};

use corokit_common::http::HttpOptions;
use corokit_common::{join_all, Pool};
use may_minihttp::{HttpServer, HttpService, Request, Response};

#[derive(Clone)]
struct SlowFiles;

impl HttpService for SlowFiles {
    fn call(&mut self, req: Request, rsp: &mut Response) -> io::Result<()> {
        corokit_common::sleep(Duration::from_millis(100));
        let n: usize = req.path().trim_start_matches("/file/").parse().unwrap_or(0);
        rsp.body_vec(vec![b'x'; 1024 + n * 100]);
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    corokit_common::init();
    // may_minihttp binds by itself; find a free loopback port for it first.
    let port = may::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let _server = HttpServer(SlowFiles).start(("127.0.0.1", port))?;

    let agent = HttpOptions::default().agent();
    let pool = Pool::new(16);
    let started = Instant::now();
    let mut handles = Vec::new();
    for n in 0..64 {
        let agent = agent.clone();
        let url = format!("http://127.0.0.1:{port}/file/{n}");
        handles.push(pool.spawn(move || -> Result<usize, ureq::Error> {
            let mut rsp = agent.get(&url).call()?;
            let bytes = rsp.body_mut().read_to_vec()?.len();
            println!("{url}: {bytes} bytes after {:?}", started.elapsed());
            Ok(bytes)
        })?);
    }
    let results = join_all(handles);
    let ok: Vec<usize> = results.into_iter().filter_map(|r| r.ok()?.ok()).collect();
    println!(
        "{} of 64 files, {} bytes in {:?} (one at a time: about 6.4 s)",
        ok.len(),
        ok.iter().sum::<usize>(),
        started.elapsed()
    );
    Ok(())
}
