//! Sizes as command lines take them: a number of bytes with an optional K, M, G or T (powers
//! of 1024), as aria2 and wget spell them.

/// `text` as a number of bytes ("4096", "256K", "1.5M"); the error says what was wrong.
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let usage = || format!("{text:?}: use a number with an optional K, M, G or T");
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, 'B'),
    };
    let factor: u64 = match unit {
        'B' => 1,
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => return Err(usage()),
    };
    let n: f64 = digits.trim().parse().map_err(|_| usage())?;
    if !n.is_finite() || n < 0.0 {
        return Err(usage());
    }
    let bytes = n * factor as f64;
    if bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is more bytes than can be counted"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_aria2_writes_them_and_nonsense_is_refused() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse(" 256k "), Ok(256 << 10));
        assert_eq!(parse("1.5M"), Ok(3 << 19));
        assert_eq!(parse("2G"), Ok(2 << 30));
        assert_eq!(parse("1T"), Ok(1 << 40));
        assert_eq!(parse("0"), Ok(0));
        for bad in ["", "K", "-1", "1X", "NaN", "inf", "1e30T", "1 2"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
