//! `--metrics ADDR`: a worker's numbers in Prometheus' text format over HTTP (may_minihttp:
//! one small GET at a time suits it), for whoever watches many workers.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use may_minihttp::{HttpServer, HttpService, Request, Response};

use crate::download::Context;

/// What the metrics read: the run's reporter, and the queue's lag as the worker last read it.
#[derive(Clone)]
struct Metrics {
    ctx: Arc<Context>,
    lag: Arc<AtomicU64>,
}

impl HttpService for Metrics {
    fn call(&mut self, req: Request, rsp: &mut Response) -> io::Result<()> {
        if req.path() != "/metrics" {
            rsp.status_code(404, "Not Found");
            rsp.body("only /metrics here\n");
            return Ok(());
        }
        let (totals, active) = self.ctx.reporter.snapshot();
        let text = format!(
            "# HELP fetch_files_total Entries finished by this worker, by outcome.\n\
             # TYPE fetch_files_total counter\n\
             fetch_files_total{{outcome=\"ok\"}} {}\n\
             fetch_files_total{{outcome=\"skipped\"}} {}\n\
             fetch_files_total{{outcome=\"failed\"}} {}\n\
             # HELP fetch_bytes_total Bytes downloaded by this worker.\n\
             # TYPE fetch_bytes_total counter\n\
             fetch_bytes_total {}\n\
             # HELP fetch_active_downloads Downloads running now.\n\
             # TYPE fetch_active_downloads gauge\n\
             fetch_active_downloads {active}\n\
             # HELP fetch_queue_lag Entries in the queue no worker has taken yet.\n\
             # TYPE fetch_queue_lag gauge\n\
             fetch_queue_lag {}\n",
            totals.ok,
            totals.skipped,
            totals.failed,
            totals.bytes,
            self.lag.load(Ordering::Relaxed)
        );
        rsp.header("Content-Type: text/plain; version=0.0.4");
        rsp.body_vec(text.into_bytes());
        Ok(())
    }
}

/// Serves the metrics at `addr` until the process ends.
pub fn serve(addr: SocketAddr, ctx: Arc<Context>, lag: Arc<AtomicU64>) -> io::Result<()> {
    HttpServer(Metrics { ctx, lag }).start(addr).map(drop)
}
