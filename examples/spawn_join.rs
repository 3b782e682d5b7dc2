//! gevent's first example, with coroutines: spawn tasks that sleep, join them all, and see
//! that they overlapped (the total is about the longest sleep, not the sum).
//!
//! `cargo run --example spawn_join`

use std::time::{Duration, Instant};

use corokit_common::{join_all, sleep, spawn};

fn main() -> Result<(), corokit_common::Error> {
    corokit_common::init();
    let started = Instant::now();
    let naps = [300u64, 100, 500, 200, 400];
    let handles = naps
        .iter()
        .enumerate()
        .map(|(task, &ms)| {
            spawn(move || {
                println!("task {task} sleeps {ms} ms");
                sleep(Duration::from_millis(ms));
                println!("task {task} done after {:?}", started.elapsed());
                ms
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let slept: u64 = join_all(handles).into_iter().filter_map(Result::ok).sum();
    println!(
        "{} tasks slept {slept} ms in total; the whole run took {:?}",
        naps.len(),
        started.elapsed()
    );
    Ok(())
}
