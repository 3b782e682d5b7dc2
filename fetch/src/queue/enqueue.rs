//! Adding a list to the queue: read lazily, parsed as a local run parses it (bad lines are
//! reported and left out), sent in batches of [`BATCH`] entries, each batch one transaction
//! with the count of entries of this list added so far. A run cut short (Redis lost, Ctrl-C)
//! is continued by running it again with the same list: the entries already added are
//! counted, not added twice.

use corokit_common::stdin::{LineError, Lines};
use corokit_common::Shutdown;
use redis::Value;

use super::{Keys, QueueError, Redis};
use crate::input::{BadLine, Entry, Parser};

/// Entries per transaction.
pub const BATCH: usize = 1000;

/// What an enqueue did.
#[derive(Debug, Default, PartialEq)]
pub struct Enqueued {
    pub added: u64,
    /// Entries of this list added by an earlier run, skipped.
    pub before: u64,
    pub bad_lines: u64,
    /// The list could not be read to its end.
    pub unreadable: Option<String>,
}

/// Adds the entries of `list` to the queue; `bad` is told each bad line. A list known as
/// `list_id` (a file) is continued where an earlier run stopped; one without (standard
/// input) is added whole every time.
pub fn enqueue(
    redis: &mut Redis,
    keys: &Keys,
    list_id: Option<&str>,
    mut list: Lines,
    shutdown: &Shutdown,
    bad: &dyn Fn(&BadLine),
) -> Result<Enqueued, QueueError> {
    keys.prepare(redis)?;
    // "COUNT SHA256": the entries of this list added so far, and the hash of their JSON, so
    // a list that changed since is refused rather than resumed at the wrong entry.
    let recorded = match list_id {
        Some(id) => redis.get::<Option<String>>(redis::cmd("HGET").arg(&keys.enqueued).arg(id))?,
        None => None,
    };
    let (before, before_hash) = match recorded.as_deref().map(|r| r.split_once(' ')) {
        None => (0, String::new()),
        Some(Some((n, h))) => (
            n.parse::<u64>()
                .map_err(|_| QueueError::Reply(format!("enqueue progress {n:?}")))?,
            h.to_string(),
        ),
        Some(None) => {
            return Err(QueueError::Reply(
                "enqueue progress without its hash".into(),
            ))
        }
    };
    let mut done = Enqueued {
        before,
        ..Enqueued::default()
    };
    let mut parser = Parser::new();
    let mut batch: Vec<Entry> = Vec::with_capacity(BATCH);
    let mut counted = 0u64;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let progress = |counted: u64, hash: &ring::digest::Context| {
        format!("{counted} {}", crate::hex(hash.clone().finish().as_ref()))
    };
    let mut take = |entry: Entry, batch: &mut Vec<Entry>, redis: &mut Redis| {
        counted += 1;
        let json = serde_json::to_string(&entry).map_err(|e| QueueError::Reply(e.to_string()))?;
        hash.update(json.as_bytes());
        hash.update(b"\n");
        if counted == before && progress(counted, &hash) != format!("{before} {before_hash}") {
            return Err(QueueError::ListChanged(before));
        }
        if counted > before {
            batch.push(entry);
            if batch.len() == BATCH {
                send(redis, keys, list_id, &progress(counted, &hash), batch)?;
            }
        }
        Ok::<_, QueueError>(())
    };
    while !shutdown.is_requested() {
        let Some(line) = list.recv() else { break };
        let parsed = match line {
            Ok(line) => parser.push(&line),
            Err(LineError::TooLong { limit }) => parser.push_too_long(limit),
            Err(e) => {
                done.unreadable = Some(e.to_string());
                break;
            }
        };
        if let Some(b) = parsed.bad {
            done.bad_lines += 1;
            bad(&b);
        }
        if let Some(entry) = parsed.entry {
            take(entry, &mut batch, redis)?;
        }
    }
    if !shutdown.is_requested() && done.unreadable.is_none() {
        if let Some(entry) = parser.finish() {
            take(entry, &mut batch, redis)?;
        }
    }
    if !batch.is_empty() {
        send(redis, keys, list_id, &progress(counted, &hash), &mut batch)?;
    }
    if counted < before && !shutdown.is_requested() && done.unreadable.is_none() {
        return Err(QueueError::ListChanged(before));
    }
    done.added = counted.saturating_sub(before);
    Ok(done)
}

/// One transaction: the entries, and the count of this list's entries added with them.
fn send(
    redis: &mut Redis,
    keys: &Keys,
    list_id: Option<&str>,
    progress: &str,
    batch: &mut Vec<Entry>,
) -> Result<(), QueueError> {
    let mut cmds = Vec::with_capacity(batch.len() + 3);
    cmds.push(redis::cmd("MULTI"));
    for e in batch.iter() {
        let json = serde_json::to_string(e).map_err(|e| QueueError::Reply(e.to_string()))?;
        cmds.push(
            redis::cmd("XADD")
                .arg(&keys.jobs)
                .arg("*")
                .arg("entry")
                .arg(json)
                .clone(),
        );
    }
    if let Some(id) = list_id {
        cmds.push(
            redis::cmd("HSET")
                .arg(&keys.enqueued)
                .arg(id)
                .arg(progress)
                .clone(),
        );
    }
    cmds.push(redis::cmd("EXEC"));
    let replies = redis.pipeline(&cmds)?;
    match replies.last() {
        Some(Value::Array(results)) if results.len() == cmds.len() - 2 => {
            if let Some(e) = results.iter().find_map(|v| v.clone().extract_error().err()) {
                return Err(QueueError::Server(e.to_string()));
            }
        }
        other => {
            let why = replies
                .iter()
                .find_map(|v| v.clone().extract_error().err())
                .map(|e| e.to_string())
                .unwrap_or_else(|| format!("{other:?}"));
            return Err(QueueError::Server(why));
        }
    }
    batch.clear();
    Ok(())
}
