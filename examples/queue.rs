//! Producer and consumers over a bounded queue (gevent's `Queue` example): the producer is
//! held back when the queue is full, and consumers take the next item when they are free.
//!
//! `cargo run --example queue`

use std::sync::Arc;
use std::time::Duration;

use corokit_common::{join_all, sleep, spawn};
use may::sync::{mpmc, Semphore};

const CAPACITY: usize = 4;

fn main() -> Result<(), corokit_common::Error> {
    corokit_common::init();
    // may's channels are unbounded; a semaphore of free slots makes this one bounded.
    let free = Arc::new(Semphore::new(CAPACITY));
    let (tx, rx) = mpmc::channel::<Option<u32>>();
    let workers = 3;

    let producer = {
        let free = free.clone();
        spawn(move || {
            for job in 1..=12 {
                free.wait();
                println!("producer: queued job {job}");
                let _ = tx.send(Some(job));
            }
            for _ in 0..workers {
                let _ = tx.send(None);
            }
        })?
    };
    let consumers = (0..workers)
        .map(|w| {
            let (rx, free) = (rx.clone(), free.clone());
            spawn(move || {
                let mut done = 0;
                while let Ok(Some(job)) = rx.recv() {
                    free.post();
                    sleep(Duration::from_millis(50 + 10 * u64::from(job % 3)));
                    println!("worker {w}: finished job {job}");
                    done += 1;
                }
                done
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let _ = producer.join();
    for (w, done) in join_all(consumers).into_iter().enumerate() {
        println!("worker {w} did {} jobs", done.unwrap_or(0));
    }
    Ok(())
}
