//! Waits for the disk go on threads of their own: in a process of its own, since it keeps
//! the shared offload pool busy on purpose.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corokit_common::blocking::{offload, sync_data};

#[test]
fn a_sync_never_waits_behind_lookups_and_other_offloaded_calls() {
    corokit_common::init();
    let (release, released) = mpsc::channel::<()>();
    let released = Arc::new(Mutex::new(released));
    // More blocked calls than the offload pool has threads: every thread busy, more queued.
    let busy: Vec<_> = (0..8)
        .map(|_| {
            let released = released.clone();
            std::thread::spawn(move || {
                offload(Duration::from_secs(60), move || {
                    let _ = released.lock().unwrap().recv();
                })
            })
        })
        .collect();
    let file = tempfile::tempfile().unwrap();
    let synced = sync_data(file, Duration::from_secs(10));
    for _ in 0..busy.len() {
        release.send(()).unwrap();
    }
    for b in busy {
        b.join().unwrap().unwrap();
    }
    assert!(synced.is_ok(), "{synced:?}");
}
