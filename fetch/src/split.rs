//! One file over several connections (`--split`), as pure decisions: how a file is cut into
//! segments, which segment a free connection takes next (one nobody holds, the far half of
//! the largest one left, or all that is left of one that stalled), how much of a block a
//! connection may still write, and which byte ranges are done. Nothing here touches a file,
//! a socket or a clock: the driver (`segmented`) passes the time in.
//!
//! Every byte is written by exactly one holder: a segment is cut only at the byte its holder
//! writes next, and a holder asks [`Segments::room`] before each write, so a connection whose
//! segment was cut under it stops at the cut.

use std::time::{Duration, Instant};

/// Segments at once: bounds the spans a partial file's state records.
pub const MAX_SEGMENTS: usize = 64;

/// A byte range `[start, end)`.
pub type Span = [u64; 2];

#[derive(Debug, Clone)]
struct Segment {
    id: u64,
    /// The next byte to write.
    at: u64,
    /// One past the last byte of the segment.
    end: u64,
    held: bool,
    /// When its holder last wrote (or took it).
    last: Instant,
}

/// What a free connection does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Fetch bytes `from..to` and write them as segment `id`.
    Take(Taken),
    /// Nothing to take now; a held segment may stall by then.
    Wait(Instant),
    /// Nothing left for another connection.
    Finished,
}

/// A segment a connection now holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub id: u64,
    pub from: u64,
    /// Exclusive.
    pub to: u64,
}

/// The segments of one file being downloaded.
#[derive(Debug)]
pub struct Segments {
    total: u64,
    min_split: u64,
    stalled: Duration,
    /// Ranges written, merged and in order.
    done: Vec<Span>,
    segments: Vec<Segment>,
    next_id: u64,
    closed: bool,
}

impl Segments {
    /// The segments of a file of `total` bytes of which `done` is already written: a new
    /// download is cut into up to `connections` equal segments of at least `min_split`
    /// bytes; a partial one gets a segment per missing range. A holder silent for
    /// `stalled` gives what it has left to the next free connection.
    pub fn new(
        total: u64,
        done: &[Span],
        connections: usize,
        min_split: u64,
        stalled: Duration,
        now: Instant,
    ) -> Segments {
        let mut s = Segments {
            total,
            min_split: min_split.max(1),
            stalled,
            done: Vec::new(),
            segments: Vec::new(),
            next_id: 0,
            closed: false,
        };
        for span in done {
            s.mark_done(span[0].min(total), span[1].min(total));
        }
        let missing = s.missing();
        if s.done.is_empty() {
            let n = (total / s.min_split).clamp(1, connections.clamp(1, MAX_SEGMENTS) as u64);
            for k in 0..n {
                s.add(total * k / n, total * (k + 1) / n, false, now);
            }
        } else {
            // The largest missing ranges first; more than fit are left for a later run.
            let mut missing = missing;
            missing.sort_by_key(|m| std::cmp::Reverse(m[1] - m[0]));
            missing.truncate(MAX_SEGMENTS);
            missing.sort();
            for [from, to] in missing {
                s.add(from, to, false, now);
            }
        }
        s
    }

    fn add(&mut self, at: u64, end: u64, held: bool, now: Instant) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.segments.push(Segment {
            id,
            at,
            end,
            held,
            last: now,
        });
        id
    }

    /// The ranges not yet written.
    fn missing(&self) -> Vec<Span> {
        let mut out = Vec::new();
        let mut at = 0;
        for &[a, b] in &self.done {
            if a > at {
                out.push([at, a]);
            }
            at = at.max(b);
        }
        if at < self.total {
            out.push([at, self.total]);
        }
        out
    }

    fn mark_done(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let i = self.done.partition_point(|s| s[1] < a);
        let mut span = [a, b];
        let mut j = i;
        while j < self.done.len() && self.done[j][0] <= span[1] {
            span = [span[0].min(self.done[j][0]), span[1].max(self.done[j][1])];
            j += 1;
        }
        self.done.splice(i..j, [span]);
    }

    /// The segment that starts at byte 0, held at once: for the connection whose answer to a
    /// request for the whole file is already arriving.
    pub fn hold_first(&mut self, now: Instant) -> Option<Taken> {
        let seg = self
            .segments
            .iter_mut()
            .find(|s| s.at == 0 && !s.held && !self.closed)?;
        seg.held = true;
        seg.last = now;
        Some(Taken {
            id: seg.id,
            from: seg.at,
            to: seg.end,
        })
    }

    /// What a free connection does next.
    pub fn next(&mut self, now: Instant) -> Next {
        if self.closed {
            return Next::Finished;
        }
        if let Some(seg) = self.segments.iter_mut().find(|s| !s.held) {
            seg.held = true;
            seg.last = now;
            return Next::Take(Taken {
                id: seg.id,
                from: seg.at,
                to: seg.end,
            });
        }
        // The far half of the largest segment left, if both halves are worth a connection.
        let room = self.segments.len() < MAX_SEGMENTS;
        let min_split = self.min_split;
        let largest = self
            .segments
            .iter_mut()
            .max_by_key(|s| (s.end - s.at, std::cmp::Reverse(s.id)));
        if let Some(seg) = largest {
            let left = seg.end - seg.at;
            if room && left >= 2 * min_split {
                let mid = seg.at + left / 2;
                let end = std::mem::replace(&mut seg.end, mid);
                let id = self.add(mid, end, true, now);
                return Next::Take(Taken {
                    id,
                    from: mid,
                    to: end,
                });
            }
        }
        // All that is left of a segment whose holder went silent.
        let stalled = self
            .segments
            .iter()
            .position(|s| now.saturating_duration_since(s.last) >= self.stalled);
        if let Some(i) = stalled {
            let seg = &mut self.segments[i];
            seg.id = self.next_id;
            self.next_id += 1;
            seg.last = now;
            return Next::Take(Taken {
                id: seg.id,
                from: seg.at,
                to: seg.end,
            });
        }
        match self.segments.iter().map(|s| s.last + self.stalled).min() {
            Some(when) => Next::Wait(when),
            None => Next::Finished,
        }
    }

    /// Where the holder of segment `id` writes its next bytes, and how many of `len` it may
    /// write there: fewer when the segment was cut under it, `None` when it is no longer
    /// its holder's (given to another connection, finished, or the download closed).
    pub fn room(&self, id: u64, len: usize) -> Option<(u64, usize)> {
        if self.closed {
            return None;
        }
        let seg = self.segments.iter().find(|s| s.id == id)?;
        let n = (seg.end - seg.at).min(len as u64) as usize;
        (n > 0).then_some((seg.at, n))
    }

    /// Records that the holder of `id` wrote `n` bytes where [`Segments::room`] said.
    pub fn wrote(&mut self, id: u64, n: usize, now: Instant) {
        let Some(i) = self.segments.iter().position(|s| s.id == id) else {
            return;
        };
        let seg = &mut self.segments[i];
        let from = seg.at;
        seg.at = (seg.at + n as u64).min(seg.end);
        seg.last = now;
        let (at, end) = (seg.at, seg.end);
        if at == end {
            self.segments.remove(i);
        }
        self.mark_done(from, at);
    }

    /// The holder of `id` is gone (its connection failed): what it left is for another.
    pub fn release(&mut self, id: u64) {
        if let Some(seg) = self.segments.iter_mut().find(|s| s.id == id) {
            seg.held = false;
        }
    }

    /// No more writes: the download ended, one way or another.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Ranges written, merged and in order: what a partial file's state records.
    pub fn done(&self) -> &[Span] {
        &self.done
    }

    pub fn complete(&self) -> bool {
        self.done == [[0, self.total]] || self.total == 0
    }

    /// Bytes written.
    pub fn written(&self) -> u64 {
        self.done.iter().map(|s| s[1] - s[0]).sum()
    }

    /// Bytes not yet written.
    pub fn missing_bytes(&self) -> u64 {
        self.total - self.written()
    }

    pub fn min_split(&self) -> u64 {
        self.min_split
    }
}

/// Spans a partial file's state keeps at most.
pub const RECORDED: usize = 16;

/// Spans a partial file's state keeps: the largest of `done`, in order. Leaving a span out
/// costs only fetching it again; keeping all could overflow the state's extended attribute.
pub fn recorded(done: &[Span]) -> Vec<Span> {
    let mut kept = done.to_vec();
    if kept.len() > RECORDED {
        kept.sort_by_key(|s| std::cmp::Reverse(s[1] - s[0]));
        kept.truncate(RECORDED);
        kept.sort();
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(5);

    fn write_all(s: &mut Segments, t: Taken, now: Instant) {
        while let Some((at, n)) = s.room(t.id, 1000) {
            assert!(at >= t.from && at < t.to);
            s.wrote(t.id, n, now);
        }
    }

    #[test]
    fn a_new_file_is_cut_into_equal_segments_no_smaller_than_the_minimum() {
        let now = Instant::now();
        let mut s = Segments::new(4 << 20, &[], 16, 256 << 10, STALL, now);
        let first = s.hold_first(now).unwrap();
        assert_eq!((first.from, first.to), (0, 256 << 10));
        let mut n = 1;
        while let Next::Take(t) = s.next(now) {
            assert_eq!(t.to - t.from, 256 << 10);
            n += 1;
            if n > 16 {
                break;
            }
        }
        assert_eq!(n, 16);
        // 1 MiB with a 1 MiB minimum: one segment.
        let mut s = Segments::new(1 << 20, &[], 16, 1 << 20, STALL, now);
        assert!(s.hold_first(now).is_some());
        assert!(matches!(s.next(now), Next::Wait(_)));
    }

    #[test]
    fn a_partial_file_gets_only_its_missing_ranges() {
        let now = Instant::now();
        let mut s = Segments::new(100, &[[0, 10], [40, 60], [90, 100]], 4, 1, STALL, now);
        assert_eq!(s.written(), 40);
        let mut got = Vec::new();
        while let Next::Take(t) = s.next(now) {
            got.push([t.from, t.to]);
            if got.len() == 2 {
                break;
            }
        }
        assert_eq!(got, vec![[10, 40], [60, 90]]);
        // Spans past the end, or overlapping, are clipped and merged.
        let s = Segments::new(50, &[[0, 30], [20, 80]], 4, 1, STALL, now);
        assert!(s.complete());
    }

    #[test]
    fn a_free_connection_takes_the_far_half_of_the_largest_segment() {
        let now = Instant::now();
        let mut s = Segments::new(1000, &[], 2, 100, STALL, now);
        let a = s.hold_first(now).unwrap();
        let Next::Take(b) = s.next(now) else { panic!() };
        write_all(&mut s, b, now);
        s.wrote(a.id, 100, now);
        // a holds 100..500: the new connection takes 300..500, and a stops at 300.
        let Next::Take(c) = s.next(now) else { panic!() };
        assert_eq!((c.from, c.to), (300, 500));
        assert_eq!(s.room(a.id, 1000), Some((100, 200)));
        s.wrote(a.id, 200, now);
        assert_eq!(s.room(a.id, 1000), None);
        write_all(&mut s, c, now);
        assert!(s.complete());
        assert_eq!(s.next(now), Next::Finished);
    }

    #[test]
    fn what_a_stalled_connection_left_goes_to_the_next_free_one() {
        let t0 = Instant::now();
        let mut s = Segments::new(1000, &[], 2, 400, STALL, t0);
        let a = s.hold_first(t0).unwrap();
        let Next::Take(b) = s.next(t0) else { panic!() };
        s.wrote(a.id, 10, t0);
        write_all(&mut s, b, t0 + Duration::from_secs(1));
        // a is not worth splitting (490 < 800): wait until it could have stalled.
        assert_eq!(s.next(t0 + Duration::from_secs(1)), Next::Wait(t0 + STALL));
        let Next::Take(c) = s.next(t0 + STALL) else {
            panic!()
        };
        assert_eq!((c.from, c.to), (10, 500));
        // a wakes up: its segment is no longer its own.
        assert_eq!(s.room(a.id, 100), None);
        s.wrote(a.id, 100, t0 + STALL);
        write_all(&mut s, c, t0 + STALL);
        assert!(s.complete());
    }

    #[test]
    fn a_released_segment_is_taken_again_from_where_it_stopped() {
        let now = Instant::now();
        let mut s = Segments::new(1000, &[], 1, 100, STALL, now);
        let a = s.hold_first(now).unwrap();
        s.wrote(a.id, 250, now);
        s.release(a.id);
        assert_eq!(s.done(), &[[0, 250]]);
        let Next::Take(b) = s.next(now) else { panic!() };
        assert_eq!((b.from, b.to), (250, 1000));
        s.close();
        assert_eq!(s.room(b.id, 10), None);
        assert_eq!(s.next(now), Next::Finished);
    }

    /// Connections that write random amounts, fail, stall and come back, in random order:
    /// every byte is written exactly once, only by the holder of its segment, the done
    /// ranges are exactly what was written, and the file always ends complete.
    #[test]
    fn random_connections_write_every_byte_exactly_once() {
        for seed in 0..2000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let total = rng.u64(1..200_000);
            let min_split = rng.u64(1..50_000);
            let mut now = Instant::now();
            let done: Vec<Span> = if rng.bool() {
                let mut v: Vec<u64> = (0..rng.usize(0..8)).map(|_| rng.u64(0..total)).collect();
                v.sort();
                v.chunks(2)
                    .filter(|c| c.len() == 2)
                    .map(|c| [c[0], c[1]])
                    .collect()
            } else {
                Vec::new()
            };
            let mut s = Segments::new(total, &done, rng.usize(1..17), min_split, STALL, now);
            let mut times = vec![0u8; total as usize];
            for span in s.done().to_vec() {
                for b in span[0]..span[1] {
                    times[b as usize] = 1;
                }
            }
            let mut holders: Vec<Option<Taken>> = vec![s.hold_first(now)];
            holders.extend((0..rng.usize(0..16)).map(|_| None));
            let mut steps = 0;
            let mut written: u64 = times.iter().map(|&t| t as u64).sum();
            while !s.complete() {
                steps += 1;
                assert!(steps < 1_000_000, "seed {seed}: no progress");
                now += Duration::from_millis(rng.u64(0..2000));
                let k = rng.usize(..holders.len());
                match holders[k] {
                    None => match s.next(now) {
                        Next::Take(t) => holders[k] = Some(t),
                        Next::Wait(_) | Next::Finished => {}
                    },
                    Some(t) => match rng.u8(0..10) {
                        0 => {
                            s.release(t.id);
                            holders[k] = None;
                        }
                        1 => {} // silent this time
                        _ => match s.room(t.id, rng.usize(1..30_000)) {
                            None => holders[k] = None,
                            Some((at, n)) => {
                                assert!(at >= t.from && at + n as u64 <= t.to, "seed {seed}");
                                for b in at..at + n as u64 {
                                    times[b as usize] += 1;
                                    assert_eq!(times[b as usize], 1, "seed {seed}: byte {b}");
                                }
                                written += n as u64;
                                s.wrote(t.id, n, now);
                            }
                        },
                    },
                }
                assert_eq!(s.written(), written, "seed {seed}");
            }
            assert!(times.iter().all(|&t| t == 1), "seed {seed}");
            assert!(s.segments.len() <= MAX_SEGMENTS);
        }
    }
}
