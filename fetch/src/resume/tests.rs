//! Every row of the resume rules without a server, and a property test: random server
//! answers, honest or broken, never leave anything but one version of the file under its
//! final name.

use super::*;

const LM1: &str = "Sun, 22 Nov 2026 01:00:00 GMT";

fn partial(etag: Option<&str>, lm: Option<&str>, length: Option<u64>) -> State {
    State {
        url: "http://h/f".into(),
        etag: etag.map(str::to_string),
        last_modified: lm.map(str::to_string),
        length,
        complete: false,
        url_hash: None,
        ranges: None,
        last_modified_weak: false,
    }
}

fn from(offset: u64, validator: &str) -> Ask {
    Ask::From {
        offset,
        validator: validator.into(),
    }
}

fn answer(status: u16, range: Option<&'static str>, etag: Option<&'static str>) -> Answer<'static> {
    Answer {
        status,
        content_range: range,
        etag,
        ..Answer::default()
    }
}

#[test]
fn plans_from_what_is_on_disk() {
    let s = partial(Some("\"v1\""), None, Some(5));
    assert_eq!(plan(None, None, None), Plan::Fresh { why: None });
    assert_eq!(
        plan(Some(&s), None, Some(3)),
        Plan::Resume {
            offset: 3,
            validator: "\"v1\"".into()
        }
    );
    assert!(matches!(
        plan(Some(&s), None, None),
        Plan::Fresh { why: Some(_) }
    ));
    assert!(matches!(
        plan(Some(&s), None, Some(9)),
        Plan::Fresh { why: Some(_) }
    ));
    let no_validator = partial(None, None, Some(5));
    assert!(matches!(
        plan(Some(&no_validator), None, Some(3)),
        Plan::Fresh { why: Some(_) }
    ));
    let done = State {
        complete: true,
        ..s.clone()
    };
    assert_eq!(plan(Some(&done), Some(5), None), Plan::Skip);
    assert!(matches!(
        plan(Some(&done), Some(4), None),
        Plan::Fresh { why: Some(_) }
    ));
    assert!(matches!(
        plan(Some(&done), None, None),
        Plan::Fresh { why: Some(_) }
    ));
}

#[test]
fn a_last_modified_within_a_second_of_the_date_is_no_validator() {
    let lm = "Sun, 22 Nov 2026 01:00:00 GMT";
    assert!(within_a_second(lm, lm));
    assert!(within_a_second(lm, "Sun, 22 Nov 2026 00:59:59 GMT"));
    assert!(!within_a_second(lm, "Sun, 22 Nov 2026 01:00:01 GMT"));
    assert!(!within_a_second(lm, "not a date"));
    let mut s = partial(None, Some(lm), Some(100_000));
    assert_eq!(s.validator(), Some(lm));
    s.last_modified_weak = true;
    assert_eq!(s.validator(), None);
    assert!(matches!(
        plan(Some(&s), None, Some(50_000)),
        Plan::Fresh { .. }
    ));
    assert_eq!(parse(&encode(&s)), Record::Valid(s.clone()));
    // A new download's state knows it from its answer's Date.
    let fresh = State::new("http://h/f", (None, Some(lm), Some(lm)), None);
    assert_eq!(fresh.validator(), None);
    let settled = (None, Some(lm), Some("Sun, 22 Nov 2026 02:00:00 GMT"));
    assert_eq!(
        State::new("http://h/f", settled, None).validator(),
        Some(lm)
    );
}

#[test]
fn a_weak_etag_leaves_no_validator_even_beside_a_date() {
    let mut s = partial(Some("W/\"x\""), None, None);
    assert_eq!(s.validator(), None);
    s.last_modified = Some(LM1.into());
    assert_eq!(s.validator(), None);
    // So a partial file under a weak ETag starts over instead of asking for its rest by date.
    let weak = partial(Some("W/\"x\""), Some(LM1), Some(100_000));
    assert!(matches!(
        plan(Some(&weak), None, Some(50_000)),
        Plan::Fresh { .. }
    ));
    s.etag = None;
    assert_eq!(s.validator(), Some(LM1));
}

#[test]
fn only_the_exact_continuation_is_appended() {
    let rec = partial(Some("\"v1\""), None, Some(100_000));
    let rec = Some(&rec);
    let ask = from(50_000, "\"v1\"");
    let ok = answer(206, Some("bytes 50000-99999/100000"), Some("\"v1\""));
    assert_eq!(
        decide(&ask, rec, &ok),
        Decision::Append {
            offset: 50_000,
            length: 50_000,
            total: 100_000
        }
    );
    let rows: &[(Answer, &str)] = &[
        // A server or cache that ignores If-Range sends the new version's bytes.
        (
            answer(206, Some("bytes 50000-99999/100000"), Some("\"v2\"")),
            "changed",
        ),
        (
            answer(206, Some("bytes 50000-99999/100000"), None),
            "changed",
        ),
        // Another total: another version.
        (
            answer(206, Some("bytes 50000-149999/150000"), Some("\"v1\"")),
            "now 150000",
        ),
        // More than was asked for (the whole file as a range), or less.
        (
            answer(206, Some("bytes 0-99999/100000"), Some("\"v1\"")),
            "from 0",
        ),
        (
            answer(206, Some("bytes 50000-79999/100000"), Some("\"v1\"")),
            "not the rest",
        ),
        (
            answer(206, Some("bytes 50000-99999/*"), Some("\"v1\"")),
            "how long",
        ),
        (
            answer(206, Some("bytes 50000-40000/100000"), Some("\"v1\"")),
            "not valid",
        ),
        (answer(206, None, Some("\"v1\"")), "no usable"),
        (
            answer(206, Some("bytes  50000-99999/100000"), Some("\"v1\"")),
            "no usable",
        ),
        (
            answer(206, Some("bytes 50000-99999/10e4"), Some("\"v1\"")),
            "no usable",
        ),
        (
            answer(416, Some("bytes */100000"), Some("\"v1\"")),
            "cannot continue",
        ),
    ];
    for (a, why) in rows {
        match decide(&ask, rec, a) {
            Decision::StartOver(w) => assert!(w.contains(why), "{a:?}: {w}"),
            other => panic!("{a:?} gave {other:?}"),
        }
    }
    // Content-Length that disagrees with the range.
    let mut longer = ok.clone();
    longer.content_length = Some(300_000);
    assert!(matches!(decide(&ask, rec, &longer), Decision::StartOver(_)));
    // Several ranges.
    let mut multi = ok.clone();
    multi.content_type = Some("multipart/byteranges; boundary=x");
    assert!(matches!(decide(&ask, rec, &multi), Decision::StartOver(_)));
    // Validated by Last-Modified: the date must come back.
    let by_date = partial(None, Some(LM1), Some(100_000));
    let ask_date = from(50_000, LM1);
    let mut dated = answer(206, Some("bytes 50000-99999/100000"), None);
    assert!(matches!(
        decide(&ask_date, Some(&by_date), &dated),
        Decision::StartOver(_)
    ));
    dated.last_modified = Some(LM1);
    assert!(matches!(
        decide(&ask_date, Some(&by_date), &dated),
        Decision::Append { .. }
    ));
}

#[test]
fn whole_answers_and_refusals() {
    let rec = partial(Some("\"v1\""), None, Some(10));
    let mut whole = answer(200, None, Some("\"v2\""));
    whole.content_length = Some(12);
    // The file changed (or ranges are not supported): start from the new whole file.
    assert_eq!(
        decide(&from(5, "\"v1\""), Some(&rec), &whole),
        Decision::Whole { length: Some(12) }
    );
    // A part for a request of the whole file is never saved as the file.
    assert!(matches!(
        decide(
            &Ask::Whole,
            None,
            &answer(206, Some("bytes 0-9/20"), Some("\"v1\""))
        ),
        Decision::Refuse(_)
    ));
    assert!(matches!(
        decide(&Ask::Whole, None, &answer(416, None, None)),
        Decision::Refuse(_)
    ));
    assert!(matches!(
        decide(&Ask::Whole, None, &answer(204, None, None)),
        Decision::Refuse(_)
    ));
    assert_eq!(
        decide(&Ask::Whole, None, &answer(503, None, None)),
        Decision::NotSuccess
    );
    // Everything had arrived before the last run stopped.
    assert_eq!(
        decide(
            &from(10, "\"v1\""),
            Some(&rec),
            &answer(416, Some("bytes */10"), None)
        ),
        Decision::Complete
    );
}

#[test]
fn state_forms_round_trip() {
    let s = State {
        url: "http://h/f".into(),
        length: Some(5),
        complete: true,
        ..State::default()
    };
    let Record::Valid(back) = parse(&encode(&s)) else {
        panic!("unreadable");
    };
    assert!(back.complete && back.length == Some(5) && back.belongs_to("http://h/f"));
    assert!(!back.belongs_to("http://h/g"));
    assert!(encode(&s).len() <= 56);
    let p = partial(Some("\"v\""), Some(LM1), None);
    assert_eq!(parse(&encode(&p)), Record::Valid(p));
    assert_eq!(parse(b"done 12 nothex"), Record::Unreadable);
    assert_eq!(parse(b"{\"url\": \"x\", \"comp"), Record::Unreadable);
}

/// One version of the file on the server.
#[derive(Clone)]
struct Version {
    bytes: Vec<u8>,
    etag: Option<String>,
    lm: Option<String>,
}

/// What is on disk: the partial file with its state, and the finished file.
#[derive(Default)]
struct Disk {
    part: Option<Vec<u8>>,
    state: Option<State>,
    done: Option<Vec<u8>>,
}

impl Disk {
    /// What `download` does once the bytes are in: finish only a partial file of exactly the
    /// expected length.
    fn finish(&mut self) {
        let (Some(part), Some(state)) = (&self.part, &self.state) else {
            return;
        };
        if state.length.is_some_and(|l| l == part.len() as u64) {
            self.done = self.part.take();
            self.state = Some(State {
                complete: true,
                ..state.clone()
            });
        }
    }
}

#[test]
fn random_server_answers_never_finish_a_file_that_is_not_one_version() {
    for seed in 0..3000u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let len = rng.usize(1..300);
        let other_len = if rng.bool() { len } else { rng.usize(1..300) };
        let versions: Vec<Version> = [(len, "\"a\"", 1), (other_len, "\"b\"", 2)]
            .into_iter()
            .map(|(n, etag, day)| Version {
                bytes: (0..n).map(|i| (i * day + day) as u8).collect(),
                etag: rng.bool().then(|| etag.to_string()),
                lm: rng
                    .bool()
                    .then(|| format!("Sun, {day:02} Nov 2026 01:00:00 GMT")),
            })
            .collect();
        let mut disk = Disk::default();
        let mut current = 0;
        for _ in 0..30 {
            if rng.u8(0..5) == 0 {
                current = 1 - current;
            }
            let v = &versions[current];
            let part_len = disk.part.as_ref().map(|p| p.len() as u64);
            let done_len = disk.done.as_ref().map(|p| p.len() as u64);
            let ask = match plan(disk.state.as_ref(), done_len, part_len) {
                Plan::Skip => break,
                Plan::Resume { offset, validator } => Ask::From { offset, validator },
                Plan::Fresh { .. } => Ask::Whole,
                Plan::Segments { .. } => unreachable!("nothing is split here"),
            };
            // The server's headers always describe the bytes it sends; what it sends, and
            // with what status and range, may be anything.
            let total = v.bytes.len() as u64;
            let asked_from = match &ask {
                Ask::From { offset, .. } => *offset,
                Ask::Whole | Ask::IfNewer { .. } => 0,
                Ask::Range { .. } => unreachable!("nothing is split here"),
            };
            let start = match rng.u8(0..4) {
                0 => rng.u64(0..=total),
                _ => asked_from.min(total),
            };
            let end = match rng.u8(0..4) {
                0 => rng.u64(start..=total),
                _ => total,
            };
            let status = [200, 206, 206, 206, 416][rng.usize(0..5)];
            let range = format!(
                "bytes {start}-{}/{}",
                end.saturating_sub(1),
                if rng.u8(0..8) == 0 { total + 1 } else { total }
            );
            let unsatisfied = format!("bytes */{total}");
            let (body, content_range): (Vec<u8>, Option<&str>) = match status {
                200 => (v.bytes.clone(), None),
                206 => (v.bytes[start as usize..end as usize].to_vec(), Some(&range)),
                _ => (Vec::new(), Some(&unsatisfied)),
            };
            let a = Answer {
                status,
                content_range,
                content_length: Some(body.len() as u64),
                content_type: None,
                etag: v.etag.as_deref(),
                last_modified: v.lm.as_deref(),
            };
            // A connection can end any time.
            let arrived = if rng.u8(0..3) == 0 {
                rng.usize(0..=body.len())
            } else {
                body.len()
            };
            match decide(&ask, disk.state.as_ref(), &a) {
                Decision::Whole { length } => {
                    disk.part = Some(body[..arrived].to_vec());
                    disk.state = Some(State {
                        url: "http://h/f".into(),
                        etag: v.etag.clone(),
                        last_modified: v.lm.clone(),
                        length,
                        complete: false,
                        url_hash: None,
                        ranges: None,
                        last_modified_weak: false,
                    });
                    disk.finish();
                }
                Decision::Append { offset, length, .. } => {
                    let part = disk.part.as_mut().expect("appending to a partial file");
                    assert_eq!(part.len() as u64, offset, "seed {seed}");
                    part.extend_from_slice(&body[..arrived.min(length as usize)]);
                    disk.finish();
                }
                Decision::Complete => disk.finish(),
                Decision::StartOver(_) => {
                    disk.part = None;
                    disk.state = None;
                }
                Decision::Refuse(_) | Decision::NotSuccess | Decision::Unchanged => {}
                Decision::Segment => panic!("seed {seed}: a segment no request asked for"),
            }
            if let Some(done) = &disk.done {
                assert!(
                    versions.iter().any(|v| v.bytes == *done),
                    "seed {seed}: a finished file that is no version of the server's"
                );
            }
        }
    }
}

#[test]
fn a_conditional_ask_is_unchanged_on_304_and_never_takes_a_part() {
    let ask = Ask::IfNewer {
        since: "Sun, 22 Nov 2026 01:00:00 GMT".into(),
    };
    let answer = |status| Answer {
        status,
        ..Answer::default()
    };
    assert_eq!(decide(&ask, None, &answer(304)), Decision::Unchanged);
    assert_eq!(
        decide(&ask, None, &answer(200)),
        Decision::Whole { length: None }
    );
    assert!(matches!(
        decide(&ask, None, &answer(206)),
        Decision::Refuse(_)
    ));
    assert!(matches!(
        decide(&ask, None, &answer(416)),
        Decision::Refuse(_)
    ));
    // 304 is not a success to anything else.
    assert_eq!(
        decide(&Ask::Whole, None, &answer(304)),
        Decision::NotSuccess
    );
}

fn range(first: u64, last: u64, validator: &str) -> Ask {
    Ask::Range {
        first,
        last,
        validator: validator.into(),
    }
}

/// A segment is written only if the answer is exactly its range, of the recorded version;
/// anything else (another version, a server that ignores ranges or If-Range, a wrong or
/// multi-part range) starts the whole download over.
#[test]
fn a_segment_is_written_only_when_it_is_exactly_the_range_of_the_same_version() {
    let state = partial(Some("\"v1\""), Some(LM1), Some(1000));
    let ask = range(100, 199, "\"v1\"");
    let good = Answer {
        status: 206,
        content_range: Some("bytes 100-199/1000"),
        content_length: Some(100),
        etag: Some("\"v1\""),
        ..Answer::default()
    };
    assert_eq!(decide(&ask, Some(&state), &good), Decision::Segment);
    let hostile = [
        Answer {
            etag: Some("\"v2\""),
            ..good.clone()
        },
        Answer {
            etag: None,
            ..good.clone()
        },
        Answer {
            content_range: Some("bytes 100-299/1000"),
            content_length: Some(200),
            ..good.clone()
        },
        Answer {
            content_range: Some("bytes 0-99/1000"),
            ..good.clone()
        },
        Answer {
            content_range: Some("bytes 100-199/2000"),
            ..good.clone()
        },
        Answer {
            content_range: Some("bytes 100-199/*"),
            ..good.clone()
        },
        Answer {
            content_length: Some(1000),
            ..good.clone()
        },
        Answer {
            content_type: Some("multipart/byteranges; boundary=x"),
            ..good.clone()
        },
        Answer {
            status: 200,
            content_range: None,
            content_length: Some(1000),
            ..good.clone()
        },
        Answer {
            status: 416,
            content_range: Some("bytes */1000"),
            ..good.clone()
        },
    ];
    for a in &hostile {
        assert!(
            matches!(decide(&ask, Some(&state), a), Decision::StartOver(_)),
            "{a:?}"
        );
    }
    // Nothing recorded: nothing to check the segment against.
    assert!(matches!(decide(&ask, None, &good), Decision::StartOver(_)));
    // Errors stay errors (retried by the caller).
    let busy = Answer {
        status: 503,
        ..Answer::default()
    };
    assert_eq!(decide(&ask, Some(&state), &busy), Decision::NotSuccess);
    // Last-Modified as the validator, when there is no strong ETag.
    let by_date = partial(None, Some(LM1), Some(1000));
    let ask = range(0, 99, LM1);
    let a = Answer {
        status: 206,
        content_range: Some("bytes 0-99/1000"),
        last_modified: Some(LM1),
        ..Answer::default()
    };
    assert_eq!(decide(&ask, Some(&by_date), &a), Decision::Segment);
}

#[test]
fn a_split_partial_file_continues_only_at_its_full_length_with_a_validator() {
    let mut state = partial(Some("\"v1\""), None, Some(1000));
    state.ranges = Some(vec![[0, 100], [500, 600]]);
    assert_eq!(
        plan(Some(&state), None, Some(1000)),
        Plan::Segments {
            done: vec![[0, 100], [500, 600]],
            validator: "\"v1\"".into()
        }
    );
    for part in [None, Some(999), Some(1001), Some(100)] {
        assert!(
            matches!(plan(Some(&state), None, part), Plan::Fresh { why: Some(_) }),
            "{part:?}"
        );
    }
    // A planted or torn list of ranges: backwards, past the end, overlapping, unordered.
    for bad in [
        vec![[5, 2]],
        vec![[0, u64::MAX]],
        vec![[0, 1001]],
        vec![[0, 500], [400, 600]],
        vec![[500, 600], [0, 100]],
        vec![[7, 7]],
    ] {
        let mut planted = state.clone();
        planted.ranges = Some(bad.clone());
        assert!(
            matches!(
                plan(Some(&planted), None, Some(1000)),
                Plan::Fresh { why: Some(_) }
            ),
            "{bad:?}"
        );
    }
    let mut weak = partial(Some("W/\"v1\""), None, Some(1000));
    weak.ranges = Some(Vec::new());
    assert!(matches!(
        plan(Some(&weak), None, Some(1000)),
        Plan::Fresh { .. }
    ));
    // The ranges survive the stored form, and a finished file's short form has none.
    assert_eq!(parse(&encode(&state)), Record::Valid(state.clone()));
    state.complete = true;
    state.ranges = None;
    assert!(encode(&state).starts_with(b"done "));
}

/// A split download against a server that changes its file between any two requests and
/// answers each range with anything (another range, another total, another version, the
/// whole file): whatever is assembled is one version of the server's bytes.
#[test]
fn a_split_download_never_assembles_two_versions() {
    for seed in 0..2000u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let len = rng.usize(2..300);
        let versions: Vec<(Vec<u8>, String)> = (0..2)
            .map(|k| {
                let bytes = (0..len).map(|_| rng.u8(..)).collect();
                (bytes, format!("\"v{k}\""))
            })
            .collect();
        let mut current = 0;
        // The first answer fixes the version every segment is checked against.
        let state = partial(Some(&versions[current].1), None, Some(len as u64));
        let validator = versions[current].1.clone();
        let mut part = vec![0u8; len];
        let mut written = vec![false; len];
        let mut started_over = false;
        'segments: for first in (0..len).step_by(rng.usize(1..len)) {
            let last = (first + rng.usize(0..len)).min(len - 1);
            let ask = range(first as u64, last as u64, &validator);
            if rng.u8(0..6) == 0 {
                current = 1 - current;
            }
            let (bytes, etag) = &versions[current];
            let honours_if_range = rng.u8(0..4) != 0;
            let (status, from, to) = if *etag != validator && honours_if_range {
                (200, 0, len - 1)
            } else {
                match rng.u8(0..5) {
                    0 => (200, 0, len - 1),
                    1 => {
                        let a = rng.usize(0..len);
                        (206, a, rng.usize(a..len))
                    }
                    _ => (206, first, last),
                }
            };
            let content_range = format!("bytes {from}-{to}/{len}");
            let a = Answer {
                status,
                content_range: (status == 206).then_some(content_range.as_str()),
                content_length: Some((to - from + 1) as u64),
                etag: Some(etag),
                ..Answer::default()
            };
            match decide(&ask, Some(&state), &a) {
                Decision::Segment => {
                    part[first..=last].copy_from_slice(&bytes[from..=to]);
                    written[first..=last].iter_mut().for_each(|w| *w = true);
                }
                Decision::StartOver(_) => {
                    started_over = true;
                    break 'segments;
                }
                other => panic!("seed {seed}: {other:?}"),
            }
        }
        if !started_over && written.iter().all(|&w| w) {
            assert!(
                versions.iter().any(|(v, _)| *v == part),
                "seed {seed}: two versions spliced"
            );
        }
    }
}

#[test]
fn planted_ranges_count_no_bytes_and_never_wrap() {
    let with = |ranges: Vec<[u64; 2]>| State {
        length: Some(1000),
        ranges: Some(ranges),
        ..State::default()
    };
    assert_eq!(with(vec![[0, 100], [200, 250]]).recorded_bytes(), Some(150));
    for planted in [
        vec![[5, 2]],
        vec![[0, u64::MAX]],
        vec![[0, 600], [500, 1000]],
        vec![[300, 400], [0, 100]],
        vec![[10, 10]],
    ] {
        assert_eq!(with(planted.clone()).recorded_bytes(), None, "{planted:?}");
    }
    assert_eq!(State::default().recorded_bytes(), None);
}
