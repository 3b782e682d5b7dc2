//! `--status`: what a queue holds, read from Redis without changing anything.

use redis::Value;

use super::{Keys, QueueError, Redis, GROUP};

/// A queue's state.
#[derive(Debug, Default, PartialEq)]
pub struct Status {
    /// Entries no worker has taken yet.
    pub waiting: u64,
    /// Entries taken and not finished, by worker.
    pub in_progress: Vec<(String, u64)>,
    pub ok: u64,
    pub failed: u64,
    pub dead: u64,
}

pub fn status(redis: &mut Redis, keys: &Keys) -> Result<Status, QueueError> {
    // Read-only: a mistyped name shows an empty queue, and creates nothing.
    if !keys.check(redis)? {
        return Ok(Status::default());
    }
    let mut st = Status {
        waiting: lag(redis, keys)?,
        ..Status::default()
    };
    let pending = redis.call(redis::cmd("XPENDING").arg(&keys.jobs).arg(GROUP))?;
    if let Value::Array(p) = pending {
        if let Some(Value::Array(consumers)) = p.get(3) {
            for c in consumers {
                if let Value::Array(c) = c {
                    if let (Some(name), Some(n)) = (c.first(), c.get(1)) {
                        st.in_progress
                            .push((text(name), text(n).parse().unwrap_or(0)));
                    }
                }
            }
        }
    }
    let counts: Vec<Option<u64>> = redis.get(
        redis::cmd("HMGET")
            .arg(&keys.counts)
            .arg("ok")
            .arg("failed")
            .arg("dead"),
    )?;
    st.ok = counts.first().copied().flatten().unwrap_or(0);
    st.failed = counts.get(1).copied().flatten().unwrap_or(0);
    st.dead = counts.get(2).copied().flatten().unwrap_or(0);
    Ok(st)
}

/// Where counting the entries after the last delivered one stops.
const LAG_COUNTED: u64 = 100_000;

/// Entries no worker has taken yet: the group's `lag` (Redis 7), or, when Redis cannot know
/// it (entries were deleted), the entries after the last one delivered.
pub fn lag(redis: &mut Redis, keys: &Keys) -> Result<u64, QueueError> {
    let groups = redis.call(redis::cmd("XINFO").arg("GROUPS").arg(&keys.jobs))?;
    let Value::Array(groups) = groups else {
        return Ok(0);
    };
    for g in groups {
        let fields = pairs(g);
        if !fields.iter().any(|(k, v)| k == "name" && text(v) == GROUP) {
            continue;
        }
        if let Some(Value::Int(n)) = fields.iter().find(|(k, _)| k == "lag").map(|(_, v)| v) {
            return Ok(*n as u64);
        }
        let last = fields
            .iter()
            .find(|(k, _)| k == "last-delivered-id")
            .map(|(_, v)| text(v))
            .unwrap_or_else(|| "0".into());
        // Counted a page at a time (the entries come with their fields), and only so far:
        // past [`LAG_COUNTED`] the count says "at least".
        let mut from = format!("({last}");
        let mut n = 0u64;
        loop {
            let ids = redis.call(
                redis::cmd("XRANGE")
                    .arg(&keys.jobs)
                    .arg(&from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(100),
            )?;
            let Value::Array(page) = ids else { break };
            let Some(Value::Array(last_entry)) = page.last() else {
                break;
            };
            let Some(Value::BulkString(id)) = last_entry.first() else {
                break;
            };
            from = format!("({}", String::from_utf8_lossy(id));
            n += page.len() as u64;
            if page.len() < 100 || n >= LAG_COUNTED {
                break;
            }
        }
        return Ok(n);
    }
    Ok(0)
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        _ => String::new(),
    }
}

/// A flat [key, value, ...] reply (or a RESP3 map) as pairs.
fn pairs(v: Value) -> Vec<(String, Value)> {
    match v {
        Value::Array(a) => {
            let mut out = Vec::new();
            let mut it = a.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((text(&k), v));
            }
            out
        }
        Value::Map(m) => m.into_iter().map(|(k, v)| (text(&k), v)).collect(),
        _ => Vec::new(),
    }
}

impl Status {
    /// The lines `--status` prints (worker names escaped: they come from Redis).
    pub fn lines(&self, queue: &str, at: &str) -> Vec<String> {
        let busy: u64 = self.in_progress.iter().map(|(_, n)| n).sum();
        let mut out = vec![format!(
            "queue {queue} at {at}: {} waiting, {busy} in progress, {} done, {} failed, {} dead",
            self.waiting, self.ok, self.failed, self.dead
        )];
        for (worker, n) in &self.in_progress {
            out.push(format!(
                "  {}: {n} in progress",
                corokit_common::text::escape(worker)
            ));
        }
        out
    }
}
